# The reaper under load.
#  - 1M expired idempotency keys (and 200k expired inbox rows) are removed by
#    run_reaper() in bounded batches while two sessions keep inserting keys:
#    their inserts kept committing throughout, none of them ever waited for a
#    lock (log_lock_waits reports any wait over deadlock_timeout = 100 ms),
#    and no row with a future expiry (or a live lock) was removed;
#  - the worker runs the same job on its own.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my ($batch_size, $max_batches) = (10000, 10);

my $node = PostgreSQL::Test::Cluster->new('idempotency_reaper');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
resilience.worker_naptime = '200ms'
resilience.reaper_interval = '300ms'
log_lock_waits = on
deadlock_timeout = '100ms'
});
$node->start;

my $t0 = time;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
INSERT INTO resilience.idempotency_keys
    (scope, key, fingerprint, state, response, status_code, attempts, lock_timeout, locked_until,
     created_at, updated_at, expires_at)
SELECT 'old', 'k' || i, sha256(''), 'completed', '{"ok": true}'::jsonb, 200, 1, interval '5 minutes',
       NULL::timestamptz, now() - interval '2 days', now() - interval '2 days', now() - interval '1 day'
  FROM generate_series(1, 1000000) i
UNION ALL  -- abandoned: started, lock expired long ago
SELECT 'old', 'abandoned' || i, sha256(''), 'started', NULL, NULL, 1, '5 minutes', now() - interval '1 day',
       now() - interval '2 days', now() - interval '2 days', now() - interval '1 day'
  FROM generate_series(1, 100) i
UNION ALL  -- past their ttl, but their lock holds: not reaped
SELECT 'working', 'k' || i, sha256(''), 'started', NULL, NULL, 1, '2 hours', now() + interval '1 hour',
       now() - interval '2 days', now(), now() - interval '1 day'
  FROM generate_series(1, 100) i
UNION ALL
SELECT 'future', 'k' || i, sha256(''), 'completed', '{"ok": true}', 200, 1, '5 minutes', NULL,
       now(), now(), now() + interval '1 day'
  FROM generate_series(1, 10000) i;
INSERT INTO resilience.inbox
SELECT 'old', 'm' || i, now() - interval '8 days', now() - interval '1 day' FROM generate_series(1, 200000) i
UNION ALL
SELECT 'future', 'm' || i, now(), now() + interval '1 day' FROM generate_series(1, 10000) i;
VACUUM ANALYZE resilience.idempotency_keys, resilience.inbox;

-- The insert load: begin + complete of new keys, one transaction each, until told to stop.
CREATE TABLE stop_load (stop boolean);
CREATE TABLE load_log (loader int, inserted int);
CREATE PROCEDURE load(loader int) LANGUAGE plpgsql AS $$
DECLARE
    n int := 0;
BEGIN
    WHILE NOT EXISTS (SELECT FROM stop_load) LOOP
        n := n + 1;
        PERFORM resilience.idempotency_begin('load', loader || ':' || n, '{}');
        PERFORM resilience.idempotency_complete('load', loader || ':' || n, '{}', 201);
        COMMIT;
    END LOOP;
    INSERT INTO load_log VALUES (loader, n);
END
$$;
});
note sprintf('loaded 1,010,200 keys and 210,000 inbox rows in %.1f s', time - $t0);

my @loaders;
for my $i (1, 2)
{
	my $bg = $node->background_psql('postgres');
	$bg->query_until(qr/loading/, "\\echo loading\nCALL load($i);\n");
	push @loaders, $bg;
}
$node->poll_query_until('postgres',
	q{SELECT count(DISTINCT split_part(key, ':', 1)) = 2 FROM resilience.idempotency_keys WHERE scope = 'load'})
  or die 'the insert load did not start';

# Reap by hand, one run_reaper() call (one transaction) at a time, until done.
my $reap_start = $node->safe_psql('postgres', 'SELECT clock_timestamp()');
my ($calls, $max_removed, $keys_removed, $inbox_removed, $longest) = (0, 0, 0, 0, 0);
while (1)
{
	my $start = time;
	my ($k, $m) = split /\|/, $node->safe_psql('postgres', qq{
SET resilience.reaper_batch_size = $batch_size;
SET resilience.reaper_max_batches = $max_batches;
SELECT max(removed) FILTER (WHERE item = 'idempotency_keys'), max(removed) FILTER (WHERE item = 'inbox')
  FROM resilience.run_reaper()});
	my $took = time - $start;
	$calls++;
	$keys_removed += $k;
	$inbox_removed += $m;
	$max_removed = $k if $k > $max_removed;
	$max_removed = $m if $m > $max_removed;
	$longest = $took if $took > $longest;
	last if $k == 0 && $m == 0;
	die 'the reaper does not converge' if $calls > 100;
}
my $reap_end = $node->safe_psql('postgres', 'SELECT clock_timestamp()');
note sprintf('%d run_reaper() calls removed %d keys and %d inbox rows; longest call %.2f s',
	$calls, $keys_removed, $inbox_removed, $longest);

$node->safe_psql('postgres', 'INSERT INTO stop_load VALUES (true)');
$_->quit for @loaders;

is($keys_removed, 1000100, 'every expired key was removed (completed, and started with an expired lock)');
is($inbox_removed, 200000, 'every expired inbox row was removed');
cmp_ok($max_removed, '<=', $batch_size * $max_batches,
	'no call removed more than reaper_batch_size * reaper_max_batches rows');
cmp_ok($calls, '>', 10, 'so it took many short transactions');
is( $node->safe_psql('postgres', q{
SELECT scope || '=' || count(*) FROM resilience.idempotency_keys WHERE scope <> 'load' GROUP BY scope ORDER BY scope}),
	"future=10000\nworking=100", 'keys with a future expiry, or a live lock, were all kept');
is($node->safe_psql('postgres', q{SELECT consumer || '=' || count(*) FROM resilience.inbox GROUP BY consumer}),
	'future=10000', 'inbox rows with a future expiry were all kept');
is( $node->safe_psql('postgres', q{
SELECT (SELECT sum(inserted) FROM load_log) = (SELECT count(*) FROM resilience.idempotency_keys WHERE scope = 'load')}),
	't', 'every key the load inserted is still there');

# The load kept committing while the reaper ran, and never waited for a lock.
# Every gap between two consecutive inserts of a loader that overlaps the
# reaping: how many there were, and the longest.
my @per_loader = split /\n/, $node->safe_psql('postgres', qq{
SELECT count(*) || ' ' || round(extract(epoch FROM max(created_at - previous))::numeric, 3)
  FROM (SELECT split_part(key, ':', 1) AS loader, created_at,
               lag(created_at) OVER (PARTITION BY split_part(key, ':', 1) ORDER BY created_at) AS previous
          FROM resilience.idempotency_keys WHERE scope = 'load') s
 WHERE created_at > '$reap_start' AND previous < '$reap_end'
 GROUP BY loader ORDER BY loader});
note "while reaping, per loader: inserts and longest gap (s): @per_loader";
is(scalar(@per_loader), 2, 'both loaders inserted keys while the reaper ran');
for my $i (0, 1)
{
	my ($n, $gap) = split / /, $per_loader[$i] // '0 0';
	cmp_ok($n, '>', 100, 'loader ' . ($i + 1) . ' kept inserting');
	cmp_ok($gap, '<', 5, 'loader ' . ($i + 1) . ' never stalled (longest gap between two inserts)');
}
ok(!$node->log_contains(qr/still waiting for/), 'no session waited for a lock (log_lock_waits)');

# The worker runs the job by itself.
$node->safe_psql('postgres', q{
INSERT INTO resilience.idempotency_keys
    (scope, key, fingerprint, state, attempts, lock_timeout, created_at, updated_at, expires_at)
SELECT 'worker', 'k' || i, sha256(''), 'completed', 1, '5 minutes', now(), now(), now() - interval '1 s'
  FROM generate_series(1, 1000) i;
INSERT INTO resilience.inbox SELECT 'worker', 'm' || i, now(), now() - interval '1 s' FROM generate_series(1, 1000) i;
ALTER SYSTEM SET resilience.database_names = 'postgres';
SELECT pg_reload_conf();
});
ok( $node->poll_query_until('postgres', q{
SELECT (SELECT count(*) FROM resilience.idempotency_keys WHERE scope = 'worker')
     + (SELECT count(*) FROM resilience.inbox WHERE consumer = 'worker') = 0}),
	'the worker reaped expired keys and inbox rows');
is( $node->safe_psql('postgres',
		q{SELECT runs > 0 AND failures = 0 FROM resilience.workers WHERE job = 'reaper'}),
	't', 'its reaper job ran without failures');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.idempotency_keys WHERE scope = 'future'}),
	'10000', 'and left live keys alone');

$node->stop;
done_testing();
