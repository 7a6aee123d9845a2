# Breakers and bulkheads under 8 concurrent clients.
#  - a half-open breaker admits exactly half_open_calls probes, however many
#    sessions ask at once;
#  - concurrent failures open a breaker exactly once (one transition logged);
#  - a bulkhead never lets more than max_concurrent sessions hold a permit at
#    once (checked from timestamps taken inside the permit's lifetime), and
#    every caller eventually gets one within its max_wait;
#  - a full breaker table (resilience.max_breakers) raises 53200, evicts
#    nothing, and breaker_reset makes room.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('load');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
resilience.max_breakers = 16
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
INSERT INTO resilience.breaker_config
    (name, window_size, minimum_calls, open_timeout, half_open_calls, probe_timeout)
VALUES ('load:probes', 2, 2, '1 ms', 5, '1 hour'),
       ('load:storm', 100, 100, '1 hour', 10, '1 hour');
CREATE UNLOGGED TABLE admitted (pid int);
CREATE UNLOGGED TABLE spans (id bigserial PRIMARY KEY, t0 timestamptz NOT NULL, t1 timestamptz);
});

# --- a half-open breaker under contention ---
$node->safe_psql('postgres', q{
SELECT resilience.breaker_record('load:probes', false) FROM generate_series(1, 2);
SELECT pg_sleep(0.01)});
$node->pgbench(
	'-n -c 8 -j 2 -t 200',
	0,
	[qr{processed: 1600/1600}],
	[qr{^$}],
	'8 clients ask a half-open breaker for probes',
	{
		'001_probe' => q{
INSERT INTO admitted SELECT pg_backend_pid() WHERE resilience.breaker_allow('load:probes');
}
	});
is($node->safe_psql('postgres', 'SELECT count(*) FROM admitted'), '5',
	'exactly half_open_calls (5) probes were admitted');
is( $node->safe_psql('postgres', q{
SELECT state || '/' || probes_in_flight || '/' || not_permitted FROM resilience.breakers WHERE name = 'load:probes'}),
	'half_open/5/1595', 'the other 1595 calls were refused');

# --- concurrent failures open a breaker once ---
my $offset = -s $node->logfile;
$node->pgbench(
	'-n -c 8 -j 2 -t 100',
	0,
	[qr{processed: 800/800}],
	[qr{^$}],
	'8 clients record failures',
	{
		'002_fail' => q{
SELECT resilience.breaker_record('load:storm', false);
}
	});
is( $node->safe_psql('postgres', q{
SELECT state || '/' || calls || '/' || failed_calls FROM resilience.breakers WHERE name = 'load:storm'}),
	'open/100/100', 'the breaker opened at its 100th failure; later records were ignored');
my $log = slurp_file($node->logfile, $offset);
my $openings = () = $log =~ /circuit breaker "load:storm" opened/g;
is($openings, 1, 'the opening happened, and was logged, exactly once');

# --- a bulkhead of 3 under 8 clients ---
my ($acquired_before) = $node->safe_psql('postgres',
	q{SELECT coalesce(sum(acquired), 0) FROM resilience.bulkheads WHERE name = 'load:bh'});
$node->pgbench(
	'-n -c 8 -j 2 -T 5',
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'8 clients share a bulkhead of 3',
	{
		'003_bulkhead' => q{
BEGIN;
SELECT resilience.bulkhead_acquire('load:bh', 3, '60 s') AS ok \gset
INSERT INTO spans (t0) VALUES (clock_timestamp()) RETURNING id \gset
SELECT pg_sleep(0.002);
UPDATE spans SET t1 = clock_timestamp() WHERE id = :id AND ':ok' = 't';
COMMIT;
}
	});
my ($spans, $held, $overlap) = split /\|/, $node->safe_psql('postgres', q{
SELECT count(*), count(t1),
       (SELECT max(n) FROM (SELECT (SELECT count(*) FROM spans o
                                     WHERE o.t0 <= s.t0 AND s.t0 < o.t1) n
                              FROM spans s WHERE s.t1 IS NOT NULL) c)
  FROM spans});
note "bulkhead: $spans transactions, most holding at once: $overlap";
cmp_ok($spans, '>', 100, 'the load ran');
is($held, $spans, 'every transaction got a permit within max_wait');
is($overlap, '3', 'never more than 3 sessions held a permit at once (and 3 did)');
is( $node->safe_psql('postgres', qq{
SELECT acquired - $acquired_before || '/' || in_use || '/' || waiting || '/' || timed_out
  FROM resilience.bulkheads WHERE name = 'load:bh'}),
	"$spans/0/0/0", 'the counters add up, and nothing is left held or waiting');

# --- a full breaker table ---
$node->safe_psql('postgres', q{
SELECT resilience.breaker_force_open('full:' || i)
  FROM generate_series(1, 16 - (SELECT count(*) FROM resilience.breakers)) i});
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.breakers'), '16', 'the breaker table is full');
my ($ret, $out, $err) = $node->psql('postgres', q{\set VERBOSITY verbose
SELECT resilience.breaker_allow('full:one-more')});
like($err, qr/53200.*circuit breaker table is full/s, 'a new breaker in a full table: 53200');
like($err, qr/HINT:.*resilience.max_breakers/, '... with a hint');
is( $node->safe_psql('postgres', q{
SELECT string_agg(state, ',') FROM (SELECT DISTINCT state FROM resilience.breakers WHERE name LIKE 'full:%') s}),
	'forced_open', 'no breaker was evicted to make room');
is($node->safe_psql('postgres', q{SELECT resilience.breaker_allow('load:storm')}), 'f',
	'breakers already in the table keep working');
is( $node->safe_psql('postgres', q{
SELECT resilience.breaker_reset('full:1');
SELECT resilience.breaker_allow('full:one-more')}),
	"t\nt", 'breaker_reset makes room for a new breaker');

$node->stop;
done_testing();
