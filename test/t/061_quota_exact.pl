# Quotas admit exactly their limit, however many sessions race: 8 clients
# for 10 seconds on one key with a small limit (admitted == limit, exactly),
# and on 40 new keys at once (each created once, one row each, admitted ==
# limit for each).  Every decision is recorded by the transaction that made
# it, so an admission that was not committed cannot be counted here.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('quota_exact');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
max_connections = 30
log_statement = none
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE TABLE decisions (key text, allowed boolean);
});

$node->pgbench(
	'--no-vacuum --client=8 --jobs=8 --time=10',
	0,
	[qr{processed: [1-9]}],
	[qr{^$}],
	'8 clients for 10 s on one key',
	{
		'quota_hot' => q{
INSERT INTO decisions SELECT 'hot', resilience.quota('x:hot', 137, 'day');
}
	});
my ($admitted, $refused, $used) = split /\|/, $node->safe_psql('postgres', q{
SELECT count(*) FILTER (WHERE allowed), count(*) FILTER (WHERE NOT allowed),
       (SELECT used FROM resilience.quota_usage WHERE key = 'x:hot')
  FROM decisions WHERE key = 'hot'});
is($admitted, 137, "exactly the limit admitted ($refused refused)");
cmp_ok($refused, '>', 1000, 'the clients kept trying long after the limit');
is($used, 137, 'the usage is the limit');

# New keys created by many sessions at once.
$node->pgbench(
	'--no-vacuum --client=8 --jobs=8 --transactions=200',
	0,
	[qr{processed: 1600/1600}],
	[qr{^$}],
	'8 clients on 40 new keys',
	{
		'quota_new' => q{
\set k random(1, 40)
INSERT INTO decisions SELECT 'new:' || :k, resilience.quota('x:new:' || :k, 7, 'day', 1, 'Europe/Paris');
}
	});
is($node->safe_psql('postgres', q{
SELECT count(*) FROM (SELECT key FROM decisions WHERE key LIKE 'new:%'
                       GROUP BY key HAVING count(*) FILTER (WHERE allowed) <> 7) s}),
	'0', 'every new key admitted exactly its limit');
is($node->safe_psql('postgres', q{
SELECT count(*), count(DISTINCT key), min(used), max(used)
  FROM resilience.quota_usage WHERE key LIKE 'x:new:%'}),
	'40|40|7|7', 'one row per new key, each at its limit');

$node->stop;
done_testing();
