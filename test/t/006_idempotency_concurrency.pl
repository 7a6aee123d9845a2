# idempotent() under concurrency.
#  - 50 concurrent calls with one key, whose SQL takes a second: the side
#    effect happens once and all 50 return its result;
#  - 50 clients for 5 s on 20 keys, committing or rolling back at random:
#    every key has a committed side effect exactly when it has a stored
#    result, and then exactly one, and every committed caller got that result.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('idempotency_concurrency');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
max_connections = 70
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE TABLE effects (id serial PRIMARY KEY, key text, client int);
CREATE TABLE results (client int, key text, called_at timestamptz, result jsonb, returned_at timestamptz);
});

# --- one key, 50 calls at once ---
$node->pgbench(
	'-n -c 50 -j 2 -t 1',
	0,
	[qr{processed: 50/50}],
	[qr{^$}],
	'50 concurrent calls of idempotent() with one key',
	{
		'001_one_key' => q{
INSERT INTO results
SELECT :client_id, 'one', clock_timestamp(),
       resilience.idempotent('t', 'one', '{"order": 1}',
           'INSERT INTO effects (key, client) SELECT ''one'', ' || :client_id || ' FROM pg_sleep(1)'
           ' RETURNING jsonb_build_object(''effect'', id, ''client'', client)'),
       clock_timestamp();
}
	});
is($node->safe_psql('postgres', q{SELECT count(*) FROM effects WHERE key = 'one'}),
	'1', 'the side effect happened exactly once');
is($node->safe_psql('postgres', q{SELECT count(*) FROM results WHERE key = 'one'}),
	'50', 'all 50 calls returned');
is( $node->safe_psql('postgres', q{
SELECT count(DISTINCT result) || ',' ||
       bool_and(result = (SELECT jsonb_build_object('effect', id, 'client', client) FROM effects WHERE key = 'one'))
  FROM results WHERE key = 'one'}),
	'1,true', 'all 50 returned the same result: the side effect\'s');
# The caller whose SQL ran returned a second after it was called (pg_sleep):
# the calls that began before it returned had to wait for it.
my $overlapped = $node->safe_psql('postgres', q{
SELECT count(*) FROM results
 WHERE key = 'one'
   AND called_at < (SELECT r.returned_at FROM results r JOIN effects e ON e.client = r.client
                     WHERE r.key = 'one' AND e.key = 'one')});
note "$overlapped of 50 calls began while the first was running its SQL";
cmp_ok($overlapped, '>=', 25, 'most calls were concurrent with the one that ran the SQL');

# --- 20 keys, 50 clients, random rollbacks ---
$node->pgbench(
	'-n -c 50 -j 2 -T 5',
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'50 clients call idempotent() on 20 keys for 5 s, rolling back half the time',
	{
		'002_many_keys' => q{
\set k random(1, 20)
\set rollback random(0, 1)
BEGIN;
INSERT INTO results
SELECT :client_id, 'many:' || :k, clock_timestamp(),
       resilience.idempotent('t', 'many:' || :k, '{}',
           'INSERT INTO effects (key, client) VALUES (''many:' || :k || ''', ' || :client_id || ')'
           ' RETURNING jsonb_build_object(''effect'', id)'),
       clock_timestamp();
\if :rollback
ROLLBACK;
\else
COMMIT;
\endif
}
	});
my ($calls, $keys_done) = split /\|/, $node->safe_psql('postgres', q{
SELECT (SELECT count(*) FROM results WHERE key LIKE 'many:%'),
       (SELECT count(*) FROM resilience.idempotency_keys WHERE key LIKE 'many:%')});
note "$calls committed calls, $keys_done keys completed";
cmp_ok($calls, '>', 100, 'many calls committed');
is($keys_done, '20', 'every key was completed by a committed call');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM (SELECT key, count(*) n FROM effects WHERE key LIKE 'many:%' GROUP BY key) s
 WHERE n <> 1}),
	'0', 'every key has exactly one committed side effect (rolled-back ones are gone)');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.idempotency_keys k
  JOIN effects e ON e.key = k.key
 WHERE k.key LIKE 'many:%' AND k.response <> jsonb_build_object('effect', e.id)}),
	'0', 'the stored result of every key is that of its side effect');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM results r JOIN resilience.idempotency_keys k ON k.key = r.key
 WHERE r.key LIKE 'many:%' AND r.result <> k.response}),
	'0', 'every committed caller got the stored result');

$node->stop;
done_testing();
