# Rate limits under concurrency, and a full table.
#  - 8 clients hammering one token bucket for 10 s admit no more than
#    capacity + refill_per_sec * elapsed, and at least 99% of it;
#  - a sliding window never admits more than max in any window-long interval
#    (checked from timestamps taken before and after each admitted call);
#  - resilience.when_full: evict (idle keys only; refused when there is
#    none), allow, deny, error.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('concurrency');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
resilience.max_keys = 16
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE UNLOGGED TABLE span (client int PRIMARY KEY, first_at timestamptz, last_at timestamptz);
CREATE UNLOGGED TABLE admitted (t0 timestamptz, t1 timestamptz);
});

# --- token bucket: capacity 2000, 1000 tokens/s, 8 clients, 10 s ---
# Each client records when it first called (before the call) and when it last
# returned (after the call), so the measured span covers every decision.
my ($capacity, $rate) = (2000, 1000);
$node->pgbench(
	'-n -c 8 -j 2 -T 10',
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'8 clients hammer one token bucket for 10 s',
	{
		'001_bucket' => qq{
SELECT clock_timestamp() AS t0, resilience.rate_limit('hot', $capacity, $rate) AS ok \\gset
INSERT INTO span VALUES (:client_id, ':t0', clock_timestamp())
  ON CONFLICT (client) DO UPDATE SET last_at = excluded.last_at;
}
	});
my ($allowed, $denied, $elapsed) = split /\|/, $node->safe_psql('postgres', q{
SELECT allowed, denied, extract(epoch FROM (SELECT max(last_at) - min(first_at) FROM span))
  FROM resilience.rate_limits WHERE key = 'hot'});
my $bound = $capacity + $rate * $elapsed;
note sprintf('admitted %d, refused %d in %.3f s; bound %.1f', $allowed, $denied, $elapsed, $bound);
ok($denied > $allowed, 'the load exceeded the rate (most calls were refused)');
cmp_ok($allowed, '<=', $bound, 'never more than capacity + rate * elapsed');
cmp_ok($allowed, '>=', 0.99 * $bound, 'at least 99% of capacity + rate * elapsed');

# --- sliding window: 50 per 200 ms, 8 clients, 5 s ---
my ($max, $window_ms) = (50, 200);
$node->pgbench(
	'-n -c 8 -j 2 -T 5',
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'8 clients hammer one sliding window for 5 s',
	{
		'002_window' => qq{
SELECT clock_timestamp() AS t0 \\gset
INSERT INTO admitted SELECT ':t0', clock_timestamp()
 WHERE resilience.window_limit('win', $max, '$window_ms milliseconds');
}
	});
# Admitted calls i..i+max (max+1 of them, by start time) that all began and
# ended within less than a window would prove a window held more than max.
my $violations = $node->safe_psql('postgres', qq{
SELECT count(*) FROM (
  SELECT t0, max(t1) OVER w AS last_t1, count(*) OVER w AS n
    FROM admitted
  WINDOW w AS (ORDER BY t0 ROWS BETWEEN CURRENT ROW AND $max FOLLOWING)
) s WHERE n = $max + 1 AND last_t1 - t0 < interval '$window_ms milliseconds'});
is($violations, '0', "no window-long interval holds more than $max admitted calls");
my ($n_admitted, $span) = split /\|/, $node->safe_psql('postgres', q{
SELECT count(*), extract(epoch FROM max(t1) - min(t0)) FROM admitted});
# The window counts whole slots of window/15: it admits at least max per
# (window + window/15) under continuous load.
my $floor = $max * $span / ($window_ms / 1000.0 * 16 / 15);
note sprintf('window admitted %d in %.3f s (floor %.1f)', $n_admitted, $span, $floor);
cmp_ok($span, '>=', 4, 'admissions spread over the 5 s run');
cmp_ok($n_admitted, '>=', 0.95 * $floor, 'the window admits what it should under load');

# --- a full table (resilience.max_keys = 16) ---
$node->safe_psql('postgres', q{SELECT resilience.rate_limit_reset(key) FROM resilience.rate_limits});
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.rate_limits'), '0', 'table emptied');

# 8 drained buckets (state worth keeping) and 8 full ones (worth nothing)
$node->safe_psql('postgres', q{
SELECT resilience.rate_limit('busy:' || i, 10, 0.001, 10) FROM generate_series(1, 8) i;
SELECT resilience.rate_limit('idle:' || i, 10, 1000, 0) FROM generate_series(1, 8) i;
});
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.rate_limits'), '16', 'the table is full');
is( $node->safe_psql('postgres', q{
SELECT count(*) FILTER (WHERE resilience.rate_limit('new:' || i, 10, 1)) FROM generate_series(1, 8) i}),
	'8', 'evict: new keys are admitted');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'busy:%' AND floor(available) = 0}),
	'8', 'evict: idle keys were dropped first; drained buckets kept their state');
is( $node->safe_psql('postgres', q{SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'idle:%'}),
	'0', 'evict: every idle key is gone');

# nothing idle left: no key with state is evicted, the new key is refused
$node->safe_psql('postgres', q{SELECT resilience.rate_limit('new:' || i, 10, 0.001, 10) FROM generate_series(1, 8) i});
is( $node->safe_psql('postgres', q{
SELECT allowed::text || ',' || remaining || ',' || coalesce(retry_after_ms::text, 'null')
  FROM resilience.rate_limit_check('last', 10, 1)}),
	'false,0,null', 'evict with no idle key: the new key is refused, as with deny');
is( $node->safe_psql('postgres', q{SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'busy:%' OR key LIKE 'new:%'}),
	'16', 'evict with no idle key: no drained bucket was dropped');

is( $node->safe_psql('postgres', q{
SET resilience.when_full = 'deny';
SELECT allowed::text || ',' || remaining || ',' || coalesce(retry_after_ms::text, 'null')
  FROM resilience.rate_limit_check('deny:1', 10, 1)}),
	'false,0,null', 'deny: a new key is refused');
is( $node->safe_psql('postgres', q{
SET resilience.when_full = 'allow';
SELECT allowed::text || ',' || remaining FROM resilience.rate_limit_check('allow:1', 10, 1, 3)}),
	'true,7', 'allow: a new key is admitted');
my ($ret, $out, $err) = $node->psql('postgres', q{
SET resilience.when_full = 'error';
\set VERBOSITY verbose
SELECT resilience.rate_limit('error:1', 10, 1)});
like($err, qr/53200.*rate-limit table is full/s, 'error: 53200');
like($err, qr/HINT:.*resilience.max_keys/, 'error: with a hint');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM resilience.rate_limits WHERE key IN ('deny:1', 'allow:1', 'error:1', 'last')}),
	'0', 'evict (with nothing to evict), allow, deny and error track nothing');
is( $node->safe_psql('postgres', q{
SET resilience.when_full = 'error';
SELECT remaining FROM resilience.rate_limit_check('busy:1', 10, 0.001, 0)}),
	'0', 'keys already in the table keep working when it is full');

$node->stop;
done_testing();
