# Durable quotas (src/quota.c, docs/quotas.md): every decision a committed
# transaction saw as allowed is still counted after
#  - kill -9 of the postmaster,
#  - an immediate shutdown,
#  - promotion of a synchronous standby after the primary died,
# each while 4 clients make decisions on their own keys (new keys among
# them, so rows are being added) and on one shared hot key.  Each client
# logs every answer that reached it (autocommit: an answer is a committed
# decision); afterwards every key's usage is at least the client-side count
# of its allowed decisions, and at most that plus one decision in flight per
# client.  The quota keeps counting from there.  On the standby before the
# promotion, the usage is readable and quota() refuses to run (25006).
# While the synchronous standby is away, a cancelled wait for it fails the
# COMMIT of a transaction that counted something (57014).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(usleep);

my $CLIENTS = 4;
my $LIMIT = 100000000;

my $primary = PostgreSQL::Test::Cluster->new('quota_primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
synchronous_commit = on
restart_after_crash = on
});
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION resilience');

# One script per client: its own keys (50 of them, the first use of each
# adds a row) alternating with the shared hot key.
my $dir = PostgreSQL::Test::Utils::tempdir();
for my $c (1 .. $CLIENTS)
{
	open(my $fh, '>', "$dir/client$c.sql") or die $!;
	for my $i (1 .. 200000)
	{
		my $key = $i % 2 ? "d:hot" : "d:$c:" . ($i % 100);
		print $fh "SELECT '$key', resilience.quota('$key', $LIMIT, 'month');\n";
	}
	close $fh;
}

# Start the clients against node; returns their handles and output files.
sub start_clients
{
	my ($node, $round) = @_;
	my @runs;
	for my $c (1 .. $CLIENTS)
	{
		my $out = "$dir/out_${round}_$c.txt";
		my $h = IPC::Run::start(
			[ 'psql', '-X', '-At', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
			  '-f', "$dir/client$c.sql" ],
			'>', $out, '2>', "$out.err");
		push @runs, [ $h, $out ];
	}
	return \@runs;
}

# Wait for the clients (they stop at the first error) and count, per key,
# the allowed decisions that reached them.
sub finish_clients
{
	my ($runs, $counts) = @_;
	for my $r (@$runs)
	{
		$r->[0]->finish;
		open(my $fh, '<', $r->[1]) or die $!;
		while (my $line = <$fh>)
		{
			chomp $line;
			my ($key, $allowed) = split /\|/, $line;
			next unless defined $allowed;
			die "a decision was refused below the limit: $line" unless $allowed eq 't';
			$counts->{$key}++;
		}
		close $fh;
	}
}

# Usage per key as the node has it now.
sub usage
{
	my ($node) = @_;
	my %used = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres', q{SELECT key, used FROM resilience.quota_usage WHERE key LIKE 'd:%'});
	return \%used;
}

# Every committed allowed decision counted; no more than one in flight per
# client on top, per failure: the decisions in flight at an earlier failure
# stay counted (the rounds add up), so they are carried forward.
my $earlier_uncommitted = 0;

sub check_counted
{
	my ($node, $counts, $what) = @_;
	my $used = usage($node);
	my @forgotten = grep { ($used->{$_} // 0) < $counts->{$_} } sort keys %$counts;
	is(scalar(@forgotten), 0, "$what: no committed allowed decision forgotten")
	  or diag(join(', ', map { "$_: used " . ($used->{$_} // 'none') . " < $counts->{$_}" } @forgotten[0 .. 4]));
	my ($sum_used, $sum_counted) = (0, 0);
	$sum_used += $used->{$_} for keys %$used;
	$sum_counted += $counts->{$_} for keys %$counts;
	ok($sum_used <= $sum_counted + $earlier_uncommitted + $CLIENTS,
		"$what: at most one uncommitted decision per client counted ($sum_used used, $sum_counted acknowledged, $earlier_uncommitted in flight at earlier failures)");
	$earlier_uncommitted = $sum_used - $sum_counted;
	ok($counts->{'d:hot'} > 200, "$what: the clients made decisions before the failure ($counts->{'d:hot'} on the hot key)");
	my $rows = $node->safe_psql('postgres',
		q{SELECT count(*) = count(DISTINCT key) FROM resilience.quota_usage});
	is($rows, 't', "$what: one row per key");
}

my %counts;

# --- kill -9 of the postmaster ---
# Recovery replays from this checkpoint: the decisions' records (custom
# resource manager 187, src/quota.c), the first after it on each page with
# a full-page image, the others applied by quota_redo.
$primary->safe_psql('postgres', 'CHECKPOINT');
my $wal_start = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
my $runs = start_clients($primary, 'kill9');
sleep 3;
my $wal_end = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
# pg_waldump cannot decode them (it does not load the library): it shows
# them as resource manager custom187, and can count them
my ($dump, $dump_err) = ('', '');
IPC::Run::run([ 'pg_waldump', '--rmgr=custom187', '-s', $wal_start, '-e', $wal_end,
	'-p', $primary->data_dir . '/pg_wal' ], '>', \$dump, '2>', \$dump_err);
my $records = () = $dump =~ /^rmgr: custom187 /mg;
my $fpis = () = $dump =~ /^rmgr: custom187 .*FPW/mg;
cmp_ok($records - $fpis, '>', 1000,
	"the decisions were logged by the custom resource manager ($records records, $fpis with a full-page image)")
  or diag($dump_err);
$primary->kill9;
finish_clients($runs, \%counts);
# its children notice the postmaster's death and leave; start once they have
my $started = 0;
for (1 .. 60)
{
	last if ($started = $primary->start(fail_ok => 1));
	$primary->{_pid} = undef;    # the failed start read the dead postmaster's pid file
	sleep 1;
}
ok($started, 'the server starts again after kill -9 of the postmaster');
check_counted($primary, \%counts, 'kill -9 of the postmaster');

# --- immediate shutdown ---
$runs = start_clients($primary, 'immediate');
sleep 3;
$primary->stop('immediate');
finish_clients($runs, \%counts);
$primary->start;
check_counted($primary, \%counts, 'immediate shutdown');

# The counters are exact again: count on from what was kept.
my $before = usage($primary)->{'d:hot'};
$primary->safe_psql('postgres', q{SELECT resilience.quota('d:hot', 100000000, 'month') FROM generate_series(1, 10)});
is(usage($primary)->{'d:hot'}, $before + 10, 'after recovery the hot key counts on from its usage');
$counts{'d:hot'} += 10;

# --- a synchronous standby, promoted after the primary dies ---
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('quota_standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;
$primary->append_conf('postgresql.conf', "synchronous_standby_names = 'quota_standby'");
$primary->reload;
$primary->poll_query_until('postgres',
	q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'quota_standby'})
  or die 'the standby did not become synchronous';

my ($ret, $stdout, $stderr) = $standby->psql('postgres',
	q{SELECT resilience.quota('d:hot', 100000000, 'month')});
like($stderr, qr/cannot execute quota\(\) during recovery/, 'a standby refuses to count');
$standby->poll_query_until('postgres',
	qq{SELECT used >= $counts{'d:hot'} FROM resilience.quotas WHERE key = 'd:hot'})
  or die 'the standby does not show the usage';
pass('a hot standby reads the usage');

# With the synchronous standby away, a transaction that counted something
# does not commit: cancelling its wait for the standby fails the COMMIT
# (57014) instead of returning it with a warning.  The decision stays
# counted, as a rolled-back one does.
$standby->stop;
my ($out, $err) = ('', '');
my $h = IPC::Run::start(
	[ 'psql', '-X', '-At', '-d', $primary->connstr('postgres'),
	  '-c', q{SELECT resilience.quota('u:unconfirmed', 10, 'day')} ],
	'>', \$out, '2>', \$err);
$primary->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM pg_stat_activity
	 WHERE wait_event = 'SyncRep' AND query LIKE '%u:unconfirmed%'})
  or die 'the decision did not wait for the standby';
$primary->safe_psql('postgres', q{
	SELECT pg_cancel_backend(pid) FROM pg_stat_activity
	 WHERE wait_event = 'SyncRep' AND query LIKE '%u:unconfirmed%'});
$h->finish;
like($err, qr/not committed: the synchronous standby has not confirmed its quota decisions/,
	'a cancelled wait for the synchronous standby fails the commit');
is($out, '', 'no answer reached the client');
is($primary->safe_psql('postgres', q{SELECT used FROM resilience.quotas WHERE key = 'u:unconfirmed'}),
	'1', 'the unconfirmed decision stays counted');
$standby->start;
$primary->poll_query_until('postgres',
	q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'quota_standby'})
  or die 'the standby did not become synchronous again';

$runs = start_clients($primary, 'failover');
sleep 3;
$primary->stop('immediate');
finish_clients($runs, \%counts);
$standby->promote;
check_counted($standby, \%counts, 'promotion of the synchronous standby');

$before = usage($standby)->{'d:hot'};
$standby->safe_psql('postgres', q{SELECT resilience.quota('d:hot', 100000000, 'month') FROM generate_series(1, 10)});
is(usage($standby)->{'d:hot'}, $before + 10, 'the promoted standby counts on');

# A small limit on the new primary is still exact.
is($standby->safe_psql('postgres',
	q{SELECT count(*) FILTER (WHERE resilience.quota('d:small', 3, 'day')) FROM generate_series(1, 10)}),
	'3', 'the promoted standby admits exactly the limit');

$standby->stop;
done_testing();
