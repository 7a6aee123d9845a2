# Rate limits cannot be reset by flooding (issue 14, item 4).
# An end user who controls key material (one key per IP, per login...) floods
# the limiter with new keys while a victim key is depleted:
#  - 8 clients create 10 x max_keys new keys (token buckets and sliding
#    windows) with resilience.when_full = evict: afterwards every depleted
#    victim (token bucket, sliding window, named policy) is still depleted;
#  - the flood's keys that found no room got the documented fallback of
#    evict when nothing may be evicted: refused, untracked (remaining 0,
#    retry_after_ms and reset_after_ms NULL); the others were tracked;
#  - normal churn still works: keys whose state equals a fresh one (a full
#    bucket, a bucket that has refilled by now, a window that counts nothing)
#    are evicted for new keys, and only those;
#  - the other tables sharing the eviction code keep their rules: a held
#    bulkhead permit is never evicted or swept, a forced-open breaker is not
#    evicted from a full breaker table.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $max_keys = 1000;
my $node = PostgreSQL::Test::Cluster->new('flooding');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
resilience.max_keys = $max_keys
resilience.when_full = evict
resilience.max_breakers = 16
resilience.max_bulkheads = 16
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec)
VALUES ('login', 3, 0.001);
CREATE SEQUENCE flood_seq;
CREATE UNLOGGED TABLE flood (n bigint, kind text, allowed bool, remaining int,
                             retry_after bigint, reset_after bigint);
});

# --- the victims: depleted, refilling one token per 1000 s ---
$node->safe_psql('postgres', q{
SELECT resilience.rate_limit('victim:bucket', 5, 0.001, 5);
SELECT resilience.window_limit('victim:window', 5, '1 hour', 5);
SELECT resilience.rate_limit('victim:login', 'login', 3);
});

# what each victim answers now (a real request, cost 1)
sub victims
{
	return $node->safe_psql('postgres', q{
SELECT string_agg(k || '=' || allowed || '/' || remaining, ' ' ORDER BY k) FROM (
  SELECT 'bucket' k, allowed, remaining FROM resilience.rate_limit_check('victim:bucket', 5, 0.001)
  UNION ALL SELECT 'login', allowed, remaining FROM resilience.rate_limit_check('victim:login', 'login')
  UNION ALL SELECT 'window', allowed, remaining FROM resilience.window_limit_check('victim:window', 5, '1 hour')
) s});
}
my $depleted = 'bucket=false/0 login=false/0 window=false/0';
is(victims(), $depleted, 'the victims are depleted before the flood');

# --- the flood: 8 clients, 5000 transactions of two new keys each ---
my $per_client = 10 * $max_keys / 2 / 8;
$node->pgbench(
	"-n -c 8 -j 2 -t $per_client",
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'8 clients flood the limiter with 10 x max_keys new keys',
	{
		'022_flood' => q{
SELECT nextval('flood_seq') AS n \gset
INSERT INTO flood SELECT :n, 'bucket', allowed, remaining, retry_after_ms, reset_after_ms
  FROM resilience.rate_limit_check('flood:b:' || :n, 10, 0.001);
INSERT INTO flood SELECT :n, 'window', allowed, remaining, retry_after_ms, reset_after_ms
  FROM resilience.window_limit_check('flood:w:' || :n, 10, '1 hour');
}
	});
is($node->safe_psql('postgres', 'SELECT count(*) FROM flood'),
	10 * $max_keys, 'the flood made 10 x max_keys calls with distinct new keys');

is(victims(), $depleted,
	'after the flood every victim is still depleted (bucket, window, policy)');
is( $node->safe_psql('postgres', q{
SELECT string_agg(key || ':' || floor(available), ' ' ORDER BY key)
  FROM resilience.rate_limits WHERE key LIKE 'victim:%'}),
	'victim:bucket:0 victim:login:0 victim:window:0',
	'the victims are still in the table, empty');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.rate_limits WHERE policy = 'login' AND key = 'victim:login' AND floor(available) = 0}),
	'1', 'the policy victim too');

# room for max_keys - 3 flood keys; every other one got the fallback
my $room = $max_keys - 3;
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM flood WHERE allowed AND remaining = 9}),
	$room, 'the flood keys that found room were admitted and tracked');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM flood
 WHERE NOT allowed AND remaining = 0 AND retry_after IS NULL AND reset_after IS NULL}),
	10 * $max_keys - $room,
	'every other flood key got the fallback of evict: refused, untracked');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'flood:%'}),
	$room, 'only the admitted flood keys are in the table');
like($node->safe_psql('postgres', q{SELECT resilience.metrics()}),
	qr/^resilience_rate_limit_table_full_total(?:\{[^}]*\})? (\d+)/m,
	'the fallbacks are counted in resilience_rate_limit_table_full_total');
my ($full) = $node->safe_psql('postgres', q{SELECT resilience.metrics()})
  =~ /^resilience_rate_limit_table_full_total(?:\{[^}]*\})? (\d+)/m;
cmp_ok($full // 0, '>=', 10 * $max_keys - $room, '... all of them');

# --- normal churn: fresh-equivalent keys are evicted, and only those ---
# free 60 slots, then fill them with keys whose state equals a fresh one:
# full buckets (a peek), buckets that have refilled by now, empty windows
$node->safe_psql('postgres', q{
SELECT resilience.rate_limit_reset('flood:b:' || n) FROM (
  SELECT n FROM flood WHERE kind = 'bucket' AND allowed ORDER BY n LIMIT 60) s;
SELECT resilience.rate_limit('fresh:peek:' || i, 10, 0.001, 0) FROM generate_series(1, 20) i;
SELECT resilience.rate_limit('fresh:refilled:' || i, 10, 100000, 10) FROM generate_series(1, 20) i;
SELECT resilience.window_limit('fresh:window:' || i, 10, '20 milliseconds', 10) FROM generate_series(1, 20) i;
});
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.rate_limits'),
	$max_keys, 'the table is full again');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.rate_limits
 WHERE key LIKE 'fresh:refilled:%' AND floor(available) = 10}),
	'20', 'drained buckets with a fast refill are full again by now');
select(undef, undef, undef, 0.2);    # the 20 ms windows count nothing any more
is( $node->safe_psql('postgres', q{
SELECT count(*) FILTER (WHERE resilience.rate_limit('churn:' || i, 10, 0.001)) FROM generate_series(1, 60) i}),
	'60', 'new keys take the place of the 60 fresh-equivalent ones');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'fresh:%'}),
	'0', 'every fresh-equivalent key was evicted');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'churn:%'}),
	'60', 'the new keys are tracked');
is( $node->safe_psql('postgres', q{
SELECT allowed::text || ',' || remaining FROM resilience.rate_limit_check('churn:one-more', 10, 1)}),
	'false,0', 'with nothing fresh-equivalent left, a new key is refused again');
is(victims(), $depleted, 'the victims are still depleted after the churn');

# --- the other tables that share the eviction code ---
my $holder = $node->background_psql('postgres');
$holder->query_safe(q{SELECT resilience.bulkhead_acquire_session('held', 1, '0')});
$node->safe_psql('postgres', q{
SELECT resilience.bulkhead_acquire('bh:' || i, 1, '0') FROM generate_series(1, 15) i});
my ($ret, $out, $err) = $node->psql('postgres',
	q{SELECT resilience.bulkhead_acquire('bh:one-more', 1, '0')});
like($err, qr/bulkhead table is full/, 'a full bulkhead table refuses a new bulkhead');
# the first sweep clears the bulkheads' referenced bits, the second removes
$node->safe_psql('postgres', q{SELECT * FROM resilience.run_reaper()}) for 1 .. 2;
is( $node->safe_psql('postgres', q{
SELECT string_agg(name || ':' || in_use, ',') FROM resilience.bulkheads}),
	'held:1', 'the reaper swept the idle bulkheads and kept the one with a permit held');
is($node->safe_psql('postgres', q{SELECT resilience.bulkhead_acquire('held', 1, '0')}),
	'f', 'its permit is still held');
$holder->quit;

$node->safe_psql('postgres', q{
SELECT resilience.breaker_force_open('open');
SELECT resilience.breaker_allow('br:' || i) FROM generate_series(1, 15) i});
($ret, $out, $err) = $node->psql('postgres', q{SELECT resilience.breaker_allow('br:one-more')});
like($err, qr/circuit breaker table is full/, 'a full breaker table refuses a new breaker');
is($node->safe_psql('postgres', q{SELECT state FROM resilience.breakers WHERE name = 'open'}),
	'forced_open', 'the open breaker was not evicted');

$node->stop;
done_testing();
