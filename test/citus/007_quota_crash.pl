# Quotas through a Citus coordinator: a decision is durable before any part
# of its transaction commits.  resilience.quota_usage stays a plain
# coordinator table (its tuples are changed in place: docs/citus.md), so a
# transaction that takes a quota and writes a distributed row is committed
# by Citus in one phase, the worker's half first, from Citus's pre-commit
# callback.  The quota's own pre-commit callback flushes the decision's WAL,
# and PostgreSQL calls the newest callback first: the quota registers its
# at the session's first decision, after Citus registered its at load.
#
# The test holds every commit one worker is asked for (synchronous_standby_names
# names a standby that never comes: the worker's commit is durable there,
# its answer never leaves), kills the coordinator (kill -9) while
# transactions wait there, then lets the worker answer and restarts the
# coordinator.  Each transaction took a quota on a new key (a WAL record of
# its own).  Every business row the workers committed must find its key
# counted after the restart.  Nothing else flushes the coordinator's WAL in
# the meantime (no background workers, no autovacuum, the WAL writer asleep
# for 10 s), so if the worker's half were committed before the quota's
# flush, the decisions of the held transactions would be lost with the
# coordinator's WAL buffers.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(sleep);
use CitusCluster;

my $c = CitusCluster->new('quota',
	conf => "wal_level = replica\nmax_wal_senders = 2",
	coord_conf => "resilience.database_names = ''\nautovacuum = off\nwal_writer_delay = '10s'");
my $coord = $c->{coord};
$c->setup;
$c->effects_table;
my $victim = $c->worker_of('q-1');

my $script = "$PostgreSQL::Test::Utils::tmp_check/quota_load.sql";
PostgreSQL::Test::Utils::append_to_file($script, q{
BEGIN;
SELECT nextval('pub_order') AS n \gset
INSERT INTO effects VALUES ('q-' || :n, :n, 'quota');
SELECT resilience.quota('q-' || :n, 10, 'day');
COMMIT;
});
my ($out, $err) = ('', '');
my $load = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '60', '-f', $script,
	  '-h', $coord->host, '-p', $coord->port, 'postgres' ],
	'>', \$out, '2>', \$err);
sleep 2;
$victim->append_conf('postgresql.conf', "synchronous_standby_names = 'never_connects'");
$victim->reload;
my $held = 0;
for my $try (1 .. 60)
{
	$held = $victim->safe_psql('postgres', q{
		SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query ILIKE 'COMMIT%'});
	last if $held == 4;
	sleep 0.5;
}
note("one-phase commits held on the worker: $held");
ok($held >= 1, "the coordinator dies while $held transactions wait for the worker's commit");
$coord->kill9;
$load->finish;
note("pgbench: $out\n$err");
# The held commits complete on the worker; then the coordinator comes back
$victim->append_conf('postgresql.conf', "synchronous_standby_names = ''");
$victim->reload;
$victim->poll_query_until('postgres',
	q{SELECT count(*) = 0 FROM pg_stat_activity WHERE wait_event = 'SyncRep'})
  or die 'the worker still holds commits';
# its children may take a moment to notice the postmaster is gone
for my $try (1 .. 60)
{
	last if $coord->start(fail_ok => 1);
	$coord->{_pid} = undef;    # a failed start read the dead postmaster's pid
	sleep 1;
}

$coord->safe_psql('postgres', q{CREATE TABLE quota_rows AS SELECT k FROM effects WHERE src = 'quota'});
my $rows = $coord->safe_psql('postgres', q{SELECT count(*) FROM quota_rows});
ok($rows > 20, "$rows business rows committed, some of them while the coordinator died");
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM quota_rows r
	 WHERE (resilience.quota_check(r.k, 10, 'day', 0)).used IS DISTINCT FROM 1}),
	'0', "every committed row's quota decision survived the coordinator's crash");

$c->stop;
done_testing();
