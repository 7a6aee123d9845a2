# kill -9 of a worker node mid-load, through the coordinator of a Citus
# cluster: 4 clients publish outbox events in transactions that also write a
# distributed table (on both workers); one worker's postmaster is killed and
# restarted under them.  Afterwards, once Citus has recovered its prepared
# transactions:
#  - every event has its business row, none is claimed twice, per-key order
#    holds, and at most one business row per client in flight at the kill
#    lacks its event (Citus commits a one-worker transaction in one phase
#    before the coordinator: docs/citus.md, "a known gap");
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
use CitusCluster;

my $c = CitusCluster->new('crash');
my $coord = $c->{coord};
$c->setup;
$coord->safe_psql('postgres', q{
CREATE TABLE effects (k text NOT NULL, n bigint, src text);
SELECT create_distributed_table('effects', 'k');
CREATE SEQUENCE pub_order;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('orders.%', 'queue', 'c1');
});
my $victim = $c->worker_of('res-x');
my $idem = q{SELECT resilience.idempotent('orders', 'before-crash', '{}',
	$$INSERT INTO public.effects VALUES ('before-crash', 1, 'idem') RETURNING '{}'::jsonb$$,
	lock_timeout => '30 seconds');};
$coord->safe_psql('postgres', $idem);
my $t1 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('lease-x', '100 ms', 'a')});
$coord->safe_psql('postgres', "SELECT resilience.fence('res-x', $t1)");

# --- the load, and the kill in the middle of it ---
# Rows spread over both workers; one event key per client, so per-key order
# is the order of n.
my $script = "$PostgreSQL::Test::Utils::tmp_check/crash_load.sql";
PostgreSQL::Test::Utils::append_to_file($script, q{
BEGIN;
SELECT nextval('pub_order') AS n \gset
INSERT INTO effects VALUES ('row-' || :n, :n, 'load');
SELECT resilience.outbox_publish('orders.created', jsonb_build_object('n', :n), 'key-' || :client_id);
COMMIT;
});
my ($out, $err) = ('', '');
my $load = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '12', '-f', $script,
	  '-h', $coord->host, '-p', $coord->port, 'postgres' ],
	'>', \$out, '2>', \$err);
sleep 3;
$victim->kill9;
note('killed worker ' . $victim->name);
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
$coord->safe_psql('postgres', q{
CREATE TABLE claimed (ord serial, key text, n bigint);
DO $$
DECLARE got int;
BEGIN
  LOOP
    WITH c AS (SELECT * FROM resilience.outbox_claim('c1', 100)),
         i AS (INSERT INTO claimed (key, n) SELECT key, (payload->>'n')::bigint FROM c ORDER BY id RETURNING 1)
    SELECT count(*) INTO got FROM i;
    EXIT WHEN got = 0;
    PERFORM resilience.outbox_ack('c1', array_agg(o.id)) FROM resilience.outbox o WHERE o.claimed_by IS NOT NULL;
  END LOOP;
END $$;
});
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
note("business rows without their event: $orphans");
ok($orphans <= 4, "at most the 4 in-flight transactions' rows lack their event ($orphans)");
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT n < lag(n) OVER (PARTITION BY key ORDER BY ord) AS back FROM claimed) x
	 WHERE back}), '0', 'per-key order kept');

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
