# A worker node dies in the middle of commits, through the coordinator of a
# Citus cluster: 4 clients run transactions that each write a distributed
# table (one row: one worker) and either publish an outbox event or start a
# saga, both coordinator tables.  The victim worker is made to hold every
# commit it is asked for (synchronous_standby_names names a standby that
# never comes: the commit is durable on the worker, the answer never
# leaves), so each client that reaches the victim stops in that window;
# then its postmaster is killed (kill -9) and restarted.  This is the
# window where a one-phase commit loses the coordinator's half: the worker
# has committed, the coordinator rolls back.  With citus_setup()'s Citus
# local tables Citus prepares the worker's half instead (two-phase commit),
# and its recovery rolls the prepared halves back.  Afterwards:
#  - every business row has its event and every event its row (zero lost),
#    none is claimed twice, per-key order holds;
#  - every saga started with a business row has that row and the row its
#    saga, and they all complete;
#  - an idempotent request done before the crash is replayed, not run again,
#    by 8 clients after it;
#  - fencing tokens issued after it exceed those issued before it, and the
#    fence on the killed worker remembers the newest one.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(sleep);
use CitusCluster;

# synchronous replication (the hold below) needs WAL senders
my $c = CitusCluster->new('crash', conf => "wal_level = replica\nmax_wal_senders = 2");
my $coord = $c->{coord};
$c->setup;
$c->effects_table;
$c->queue_route('orders.%', 'c1');
$c->saga_role('agent');
$coord->safe_psql('postgres', q{
CREATE FUNCTION public.noop(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
SET ROLE agent;
SELECT resilience.saga_define('crashtrip', '[{"name": "a", "action": "public.noop"}]');
RESET ROLE;
});
my $victim = $c->worker_of('res-x');
my $idem = q{SELECT resilience.idempotent('orders', 'before-crash', '{}',
	$$INSERT INTO public.effects VALUES ('before-crash', 1, 'idem') RETURNING '{}'::jsonb$$,
	lock_timeout => '30 seconds');};
$coord->safe_psql('postgres', $idem);
my $t1 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('lease-x', '100 ms', 'a')});
$coord->safe_psql('postgres', "SELECT resilience.fence('res-x', $t1)");

# --- the load, and the kill in the middle of a commit ---
# Rows spread over both workers; one event key per client, so per-key order
# is the order of n.
my $publish = "$PostgreSQL::Test::Utils::tmp_check/crash_publish.sql";
PostgreSQL::Test::Utils::append_to_file($publish, q{
BEGIN;
SELECT nextval('pub_order') AS n \gset
INSERT INTO effects VALUES ('row-' || :n, :n, 'load');
SELECT resilience.outbox_publish('orders.created', jsonb_build_object('n', :n), 'key-' || :client_id);
COMMIT;
});
my $saga = "$PostgreSQL::Test::Utils::tmp_check/crash_saga.sql";
PostgreSQL::Test::Utils::append_to_file($saga, q{
BEGIN;
SELECT nextval('pub_order') AS n \gset
INSERT INTO effects VALUES ('saga-' || :n, :n, 'saga');
SELECT resilience.saga_start('crashtrip', jsonb_build_object('n', :n), 'n' || :n);
COMMIT;
});
my ($out, $err) = ('', '');
my $load = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '60', '-f', $publish, '-f', $saga,
	  '-h', $coord->host, '-p', $coord->port, 'postgres' ],
	'>', \$out, '2>', \$err);
sleep 3;
# From now on the victim holds each commit (or prepare) it gets
$victim->append_conf('postgresql.conf', "synchronous_standby_names = 'never_connects'");
$victim->reload;
# until every client waits there (each row has its chance to be on it)
my $held = 0;
for my $try (1 .. 60)
{
	$held = $victim->safe_psql('postgres', q{
		SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'});
	last if $held == 4;
	sleep 0.5;
}
my $committed_on_victim = $victim->safe_psql('postgres', q{
	SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query ILIKE 'COMMIT%'});
note("commits held on the victim: $held (of which one-phase COMMITs: $committed_on_victim)");
ok($held >= 1, "the kill comes while $held transactions wait for the victim's commit");
$victim->kill9;
note('killed worker ' . $victim->name);
$victim->append_conf('postgresql.conf', "synchronous_standby_names = ''");
# its children may take a moment to notice the postmaster is gone
for my $try (1 .. 60)
{
	last if $victim->start(fail_ok => 1);
	$victim->{_pid} = undef;    # a failed start read the dead postmaster's pid
	sleep 1;
}
$load->finish;
note("pgbench: $out\n$err");
like($out . $err, qr/processed: \d+/, 'the load ran around the crash');

# Citus finishes or rolls back the prepared transactions of the crash
$coord->poll_query_until('postgres', q{SELECT recover_prepared_transactions() >= 0})
  or die 'recovery';
$coord->poll_query_until('postgres', q{
	SELECT count(*) = 0 FROM pg_dist_transaction}) or note('pg_dist_transaction not empty yet');

# --- drain the outbox through the pull API ---
$c->drain_queue('c1');
# The committed business rows, copied to the coordinator to compare
$coord->safe_psql('postgres', q{CREATE TABLE load_rows AS SELECT n FROM effects WHERE src = 'load'});
my $rows = $coord->safe_psql('postgres', q{SELECT count(*) FROM load_rows});
ok($rows > 20, "$rows transactions committed around the crash");
is($coord->safe_psql('postgres', q{SELECT count(*) - count(DISTINCT n) FROM claimed}), '0',
	'no event claimed twice');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM claimed c WHERE NOT EXISTS (SELECT FROM load_rows e WHERE e.n = c.n)}),
	'0', 'every event has its business row');
my $orphans = $coord->safe_psql('postgres', q{
	SELECT count(*) FROM load_rows e WHERE NOT EXISTS (SELECT FROM claimed c WHERE c.n = e.n)});
is($orphans, '0', 'no business row lacks its event (two-phase commit with the worker)');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT n < lag(n) OVER (PARTITION BY key ORDER BY ord) AS back FROM claimed) x
	 WHERE back}), '0', 'per-key order kept');

# --- sagas started with a business row: both or neither, and they complete ---
$coord->safe_psql('postgres', q{CREATE TABLE saga_rows AS SELECT n FROM effects WHERE src = 'saga'});
my $sagas = $coord->safe_psql('postgres', q{SELECT count(*) FROM saga_rows});
ok($sagas > 5, "$sagas sagas started around the crash");
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM saga_rows r
	 WHERE NOT EXISTS (SELECT FROM resilience.sagas s
	                    WHERE s.name = 'crashtrip' AND s.idempotency_key = 'n' || r.n)}),
	'0', 'every business row written with a saga has its saga');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s
	 WHERE s.name = 'crashtrip'
	   AND NOT EXISTS (SELECT FROM saga_rows r WHERE s.idempotency_key = 'n' || r.n)}),
	'0', 'every saga has its business row');
ok($coord->poll_query_until('postgres', q{
	SELECT count(*) FILTER (WHERE state <> 'completed') FROM resilience.sagas WHERE name = 'crashtrip'}, '0'),
	'and every saga completed');

# --- after the crash: nothing runs twice, tokens go on increasing ---
$coord->pgbench('-n -c 8 -j 2 -t 1', 0, [qr{processed: 8/8}], [qr{^$}],
	'8 clients repeat the request made before the crash', { '001_idem' => $idem });
is($coord->safe_psql('postgres', q{SELECT count(*) FROM effects WHERE src = 'idem'}), '1',
	'the request made before the crash ran once');
my $t2 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('lease-x', '1 minute', 'b')});
ok($t2 > $t1, "a token after the crash ($t2) exceeds one before it ($t1)");
$coord->safe_psql('postgres', "SELECT resilience.fence('res-x', $t2)");
my ($ret, $o, $e) = $coord->psql('postgres', "SELECT resilience.fence('res-x', $t1)",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($e, qr/RS001/, 'the fence on the restarted worker refuses the token from before the crash');

$c->stop;
done_testing();
