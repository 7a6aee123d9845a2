# Idempotency keys across a crash (kill -9 of the backend working on a key).
#  - a key whose begin and first checkpoint committed stays in_progress until
#    its lock_timeout has passed, then a retry proceeds from that checkpoint;
#  - the work in flight when the backend died (a later checkpoint and its
#    business effect, uncommitted) is gone, so the retry does it once;
#  - a key begun in a transaction that never committed is free at once.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('idempotency_crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE TABLE shipments (order_key text, shipped_at timestamptz DEFAULT clock_timestamp());
CREATE TABLE attempts (at timestamptz, outcome text, recovery_point text);
});

# Attempt 1, phase 1 (charge) committed: begin, then a checkpoint.  The lock
# expires 15 s after the checkpoint: far longer than a crash and restart.
my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $pid = $bg->query_safe('SELECT pg_backend_pid()');
is( $bg->query_safe(q{
SELECT outcome FROM resilience.idempotency_begin('orders', 'o-1', '{"order": 1}', lock_timeout => '15 s')}),
	'proceed', 'attempt 1 proceeds');
$bg->query_safe(q{SELECT resilience.idempotency_checkpoint('orders', 'o-1', 'charged')});
my $locked_until = $node->safe_psql('postgres',
	q{SELECT locked_until FROM resilience.idempotency_keys WHERE key = 'o-1'});

# Phase 2 (ship) in flight: a checkpoint and the shipment, not committed; in
# the same transaction a second key is begun.  Then the backend is killed.
$bg->query_until(qr/shipping/, q{
BEGIN;
SELECT resilience.idempotency_checkpoint('orders', 'o-1', 'shipped');
INSERT INTO shipments (order_key) VALUES ('o-1');
SELECT outcome FROM resilience.idempotency_begin('orders', 'o-2', '{"order": 2}');
\echo shipping
SELECT pg_sleep(600);
});
kill 'KILL', $pid;
$bg->{run}->kill_kill;
$node->poll_query_until('postgres', 'SELECT 1', '1')
  or die 'the server did not come back after kill -9';
ok($node->log_contains(qr/\(PID \d+\) was terminated by signal 9/),
	'the backend was killed and the server restarted');

# Right after the restart: still in progress, its lock has not expired.
my ($outcome, $before_expiry) = split /\|/, $node->safe_psql('postgres', qq{
SELECT outcome, clock_timestamp() < '$locked_until'
  FROM resilience.idempotency_begin('orders', 'o-1', '{"order": 1}')});
is($before_expiry, 't', 'the retry came before the lock expired');
is($outcome, 'in_progress', 'so the key is still in progress');

# The key begun in the transaction that died was never committed: free.
is( $node->safe_psql('postgres',
		q{SELECT outcome FROM resilience.idempotency_begin('orders', 'o-2', '{"order": 2}')}),
	'proceed', 'a key begun in a transaction that never committed is free at once');

# Retry until it may proceed; record every answer and when it came.
ok( $node->poll_query_until('postgres', q{
WITH b AS (SELECT * FROM resilience.idempotency_begin('orders', 'o-1', '{"order": 1}')),
     logged AS (INSERT INTO attempts SELECT clock_timestamp(), outcome, recovery_point FROM b
                RETURNING outcome)
SELECT outcome = 'proceed' FROM logged}),
	'a retry proceeds eventually');
my ($proceeds, $early, $others) = split /\|/, $node->safe_psql('postgres', qq{
SELECT count(*) FILTER (WHERE outcome = 'proceed'),
       count(*) FILTER (WHERE outcome = 'proceed' AND at < '$locked_until'),
       count(*) FILTER (WHERE outcome NOT IN ('proceed', 'in_progress'))
  FROM attempts});
is($proceeds, '1', 'exactly one retry proceeded');
is($early, '0', 'not before the lock expired');
is($others, '0', 'every earlier retry was told in_progress');
is( $node->safe_psql('postgres', q{SELECT recovery_point FROM attempts WHERE outcome = 'proceed'}),
	'charged', 'it resumes from the last committed checkpoint (the uncommitted one died with the backend)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM shipments'),
	'0', 'the shipment of the killed transaction was rolled back with it');
is( $node->safe_psql('postgres',
		q{SELECT state || ',' || attempts FROM resilience.idempotency_keys WHERE key = 'o-1'}),
	'started,2', 'the key is held by the second attempt');

# The second attempt ships and completes; later retries replay.
$node->safe_psql('postgres', q{
BEGIN;
SELECT resilience.idempotency_checkpoint('orders', 'o-1', 'shipped');
INSERT INTO shipments (order_key) VALUES ('o-1');
SELECT resilience.idempotency_complete('orders', 'o-1', '{"shipped": true}', 201);
COMMIT;
});
is( $node->safe_psql('postgres', q{
SELECT outcome || ',' || response::text || ',' || status_code
  FROM resilience.idempotency_begin('orders', 'o-1', '{"order": 1}')}),
	'replay,{"shipped": true},201', 'then the key replays');
is($node->safe_psql('postgres', 'SELECT count(*) FROM shipments'),
	'1', 'and the order shipped exactly once');

$node->stop;
done_testing();
