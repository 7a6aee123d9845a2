#!/usr/bin/perl
# Run TAP test files (Perl TAP tests, or pgTAP SQL files with --pgtap) and end
# with a line "TAPCOUNT <passed> <failed>" that tools/test.sh adds to its total.
# A file that dies, exits non-zero or breaks its plan counts as one failure
# even when none of its assertions failed.
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

my $agg = TAP::Harness->new(\%args)->runtests(@ARGV);
my %failed_files = map { $_ => 1 } $agg->failed;
my $broken = grep { !$failed_files{$_} } do {
	my %seen;
	grep { !$seen{$_}++ } ($agg->parse_errors, $agg->exit, $agg->wait);
};
printf "TAPCOUNT %d %d\n", scalar($agg->passed), scalar($agg->failed) + $broken;
