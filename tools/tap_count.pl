#!/usr/bin/perl
# Run TAP test files (Perl TAP tests, or pgTAP SQL files with --pgtap) and end
# with a line "TAPCOUNT <passed> <failed>" that tools/test.sh adds to its total.
# Each file runs in a harness of its own, so a file that bails out does not
# stop the others.  A file that dies, bails out, exits non-zero or breaks its
# plan counts as one failure even when none of its assertions failed.
use strict;
use warnings;
use TAP::Harness;

my %args = (verbosity => $ENV{TAP_VERBOSE} ? 1 : 0, color => 0, failures => 1);
if (@ARGV && $ARGV[0] eq '--pgtap')
{
	shift @ARGV;
	$args{sources} = {
		pgTAP => {
			dbname => $ENV{PGDATABASE},
			username => $ENV{PGUSER},
			host => $ENV{PGHOST},
			port => $ENV{PGPORT},
			suffix => '.sql',
		}
	};
}
elsif (@ARGV && $ARGV[0] eq '--lib')
{
	shift @ARGV;
	$args{lib} = [ shift @ARGV, '.' ];
}

my ($passed, $failed) = (0, 0);
for my $file (@ARGV)
{
	my $agg = eval { TAP::Harness->new(\%args)->runtests($file) };
	if (!$agg)
	{
		print "$file: the harness stopped: $@";
		$failed++;
		next;
	}
	$passed += $agg->passed;
	$failed += $agg->failed;
	$failed++
	  if !$agg->failed && ($agg->parse_errors || $agg->exit || $agg->wait);
}
print "TAPCOUNT $passed $failed\n";
