# Quotas and the table's file: pg_dump carries the usage (the rows are
# data), a restore into another database is used and counted on (the
# restored rows are ordinary MVCC rows, updated in place from then on);
# VACUUM FULL (a new file, same rows) keeps every key; TRUNCATE forgets
# them.  Each of these changes the table's file, so shared memory must
# notice and locate the rows again.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('quota_dump');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
SELECT resilience.quota('dump:spent', 3, 'month') FROM generate_series(1, 3);
SELECT resilience.quota('dump:part', 10, 'day', 4, 'Asia/Tokyo');
SELECT resilience.quota('dump:k' || i, 100, 'year') FROM generate_series(1, 500) i;
});

my $dump = PostgreSQL::Test::Utils::tempdir() . '/dump.pgc';
$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('postgres') ], 'pg_dump');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok([ 'pg_restore', '-d', $node->connstr('restored'), $dump ], 'pg_restore');

is($node->safe_psql('restored', q{
	SELECT string_agg(key || '=' || used, ',' ORDER BY key) FROM resilience.quotas
	 WHERE key IN ('dump:spent', 'dump:part')}),
	'dump:part=4,dump:spent=3', 'the usage was restored');
is($node->safe_psql('restored', q{SELECT resilience.quota('dump:spent', 3, 'month')}), 'f',
	'a spent quota stays spent after the restore');
is($node->safe_psql('restored', q{
	SELECT string_agg(resilience.quota('dump:part', 10, 'day', 3, 'Asia/Tokyo')::text, ',') FROM generate_series(1, 3)}),
	'true,true,false', 'a restored key counts on from its usage');
is($node->safe_psql('restored', q{
	SELECT count(*), count(DISTINCT key), sum(used) FROM resilience.quota_usage WHERE key LIKE 'dump:k%'}),
	'500|500|500', 'every restored key is there once');
$node->safe_psql('restored', q{SELECT resilience.quota('dump:k' || i, 100, 'year') FROM generate_series(1, 500) i});
is($node->safe_psql('restored', q{
	SELECT count(*), min(used), max(used) FROM resilience.quota_usage WHERE key LIKE 'dump:k%'}),
	'500|2|2', 'restored keys are updated in place, no row added');

# the source database is untouched by the restored copy
is($node->safe_psql('postgres', q{SELECT used FROM resilience.quotas WHERE key = 'dump:part'}), '4',
	'the databases count apart');

# VACUUM FULL: a new file holding the same rows
$node->safe_psql('postgres', 'VACUUM FULL resilience.quota_usage');
is($node->safe_psql('postgres', q{
	SELECT string_agg(resilience.quota('dump:part', 10, 'day', 3, 'Asia/Tokyo')::text, ',') FROM generate_series(1, 3)}),
	'true,true,false', 'after VACUUM FULL the keys are found again and count on');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.quota_usage}), '502',
	'no row added after VACUUM FULL');

# TRUNCATE forgets every key of the database
$node->safe_psql('postgres', 'TRUNCATE resilience.quota_usage');
is($node->safe_psql('postgres', q{SELECT resilience.quota('dump:spent', 3, 'month')}), 't',
	'after TRUNCATE a key starts afresh');
is($node->safe_psql('restored', q{SELECT resilience.quota('dump:spent', 3, 'month')}), 'f',
	'another database is not affected');

# UPDATE and DELETE are refused; a superuser who bypasses the guard makes a
# new row version, which the functions notice and follow
my ($ret, $out, $err) = $node->psql('postgres', q{DELETE FROM resilience.quota_usage});
like($err, qr/cannot be updated or deleted/, 'DELETE is refused');
$node->safe_psql('postgres', q{
ALTER TABLE resilience.quota_usage DISABLE TRIGGER quota_usage_guard;
UPDATE resilience.quota_usage SET used = 2 WHERE key = 'dump:spent';
ALTER TABLE resilience.quota_usage ENABLE TRIGGER quota_usage_guard;
});
is($node->safe_psql('postgres', q{
	SELECT string_agg(resilience.quota('dump:spent', 3, 'month')::text, ',') FROM generate_series(1, 2)}),
	'true,false', 'a row version made by UPDATE is found and used');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.quota_usage WHERE key = 'dump:spent'}), '1',
	'one live row for the key');

$node->stop;
done_testing();
