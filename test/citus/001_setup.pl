# resilience.citus_setup() on a coordinator and two workers:
#  - refused with 55000 in a database without Citus, on a worker, and
#    while the coordinator is not in Citus's metadata, with nothing placed;
#  - the outbox, saga and schedule tables become Citus local tables, their
#    grants, comments, triggers, views and extension membership intact;
#  - places every table and delegated function as docs/citus.md says, and a
#    second call changes nothing;
#  - a delegated rate limit keeps its bucket on the one worker that owns the
#    key, and the coordinator's named policies (a reference table) reach it;
#  - streams (distributed by stream) append at the expected version, refuse
#    a stale one (40001).
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('setup', no_coordinator_host => 1);
my $coord = $c->{coord};
my ($w1, $w2) = @{ $c->{workers} };

# --- refused where it does not apply, nothing placed ---
$coord->safe_psql('postgres', 'CREATE DATABASE plain');
$coord->safe_psql('plain', 'CREATE EXTENSION resilience');
my ($ret, $out, $err) = $coord->psql('plain', 'SELECT * FROM resilience.citus_setup()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/55000: Citus is not installed in database "plain"/, 'without Citus: 55000');
like($err, qr/HINT:.*CREATE EXTENSION citus/, '... with a hint saying what to do');

($ret, $out, $err) = $w1->psql('postgres', 'SELECT * FROM resilience.citus_setup()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/55000: resilience.citus_setup\(\) must be called on the Citus coordinator/,
	'on a worker: 55000');
($ret, $out, $err) = $coord->psql('postgres', 'SELECT * FROM resilience.citus_setup()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/55000: the Citus coordinator is not in the Citus metadata/,
	'the coordinator not in the metadata: 55000');
like($err, qr/HINT:.*citus_set_coordinator_host/, '... with a hint saying what to do');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE 'resilience.%'}),
	'0', 'nothing placed by the refused calls');
$c->set_coordinator_host;

# --- the placement, and a second call is a no-op ---
# What the extension's tables and views are, as a user sees them: Citus
# replaces a local table by a shell (and its views by new ones): grants,
# comments, row security, triggers and extension membership must survive.
my $shape = q{
	SELECT string_agg(concat_ws(' ', c.relname, c.relkind, c.relacl, obj_description(c.oid, 'pg_class'),
	           c.relrowsecurity, d.deptype,
	           (SELECT string_agg(attname || ':' || col_description(c.oid, attnum), ',' ORDER BY attnum)
	              FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0),
	           (SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger
	             WHERE tgrelid = c.oid AND NOT tgisinternal AND tgname NOT LIKE 'truncate_trigger%')),
	         E'\n' ORDER BY c.relname)
	  FROM pg_class c
	  LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
	 WHERE c.relnamespace = 'resilience'::regnamespace AND c.relkind IN ('r', 'v')
	   AND c.relname !~ '_[0-9]+$'};
my $shape_before = $coord->safe_psql('postgres', $shape);
my $first = $coord->safe_psql('postgres',
	q{SELECT object, placement, changed FROM resilience.citus_setup() ORDER BY 1});
my $second = $coord->safe_psql('postgres',
	q{SELECT object, placement, changed FROM resilience.citus_setup() ORDER BY 1});
like($first, qr/^resilience\.leases\|distributed by name\|t$/m, 'leases by name');
like($first, qr/^resilience\.fences\|distributed by resource\|t$/m, 'fences by resource');
like($first, qr/^resilience\.inbox\|distributed by message_id\|t$/m, 'the inbox by message id');
like($first, qr/^resilience\.stream_events\|distributed by stream\|t$/m, 'stream events by stream');
like($first, qr/^resilience\.rate_limit_policies\|reference\|t$/m, 'policies: a reference table');
for my $t (qw(outbox outbox_routes outbox_dead_letters saga_definitions sagas saga_steps saga_events
	saga_signals saga_branches schedule_definitions schedule_runs))
{
	like($first, qr/^resilience\.$t\|Citus local table \(coordinator\)\|t$/m, "$t: a Citus local table");
}
like($first, qr/^resilience\.quota_usage\|coordinator only\|f$/m, 'quotas stay plain coordinator tables');
unlike($first, qr/_\d+\|/, 'the local tables\' shards are not listed');
is($coord->safe_psql('postgres', $shape), $shape_before,
	'tables and views keep their grants, comments, row security, triggers and extension membership');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)
	 WHERE s.logicalrelid = 'resilience.outbox'::regclass AND p.groupid = 0}),
	'1', "the outbox's one shard is on the coordinator");
is($w1->safe_psql('postgres', q{SELECT count(*) FROM resilience.outbox_status})
	. $coord->safe_psql('postgres', q{SELECT count(*) >= 0 FROM resilience.stuck_sagas}),
	'0t', 'the views over them still work, and the workers keep their own tables');
like($first, qr/^resilience\.idempotency_keys\|distributed by key\|t$/m,
	'idempotency keys by key');
like($first, qr/^resilience\.rate_limit\(text,integer,double precision,integer\)\|delegated.*\|t$/m,
	'rate_limit delegated');
(my $expect = $first) =~ s/\|t$/|f/mg;
is($second, $expect, 'a second call places the same and changes nothing');

# --- a delegated limiter lives on the key's worker only ---
$coord->safe_psql('postgres', q{
	INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('tier', 3, 0)});
# two keys owned by each worker
my @keys = split /\n/, $coord->safe_psql('postgres', q{
	SELECT k FROM (SELECT k, p.nodeport, row_number() OVER (PARTITION BY p.nodeport ORDER BY i) AS r
	                 FROM generate_series(1, 50) i, LATERAL (SELECT 'k' || i AS k) x
	                 JOIN pg_dist_shard_placement p
	                   ON p.shardid = get_shard_id_for_distribution_column('resilience.fences', x.k)) y
	 WHERE r <= 2 ORDER BY nodeport, k});
is(scalar(@keys), 4, 'two keys on each worker');
my %allowed;
for my $key (@keys)
{
	$allowed{$key} = join ',', map {
		$coord->safe_psql('postgres', "SELECT resilience.rate_limit('$key', 'tier')")
	} 1 .. 5;
	is($allowed{$key}, 't,t,t,f,f', "$key: 5 calls through the coordinator, 3 admitted (named policy)");
	my $owner = $c->worker_of($key);
	my $other = $owner == $w1 ? $w2 : $w1;
	is($owner->safe_psql('postgres', qq{
		SELECT allowed || '/' || denied FROM resilience.rate_limit_entries() WHERE key = '$key'}),
		'3/2', "$key: its bucket is on the worker that owns it");
	is($other->safe_psql('postgres', qq{
		SELECT count(*) FROM resilience.rate_limit_entries() WHERE key = '$key'})
		. $coord->safe_psql('postgres', qq{
		SELECT count(*) FROM resilience.rate_limit_entries() WHERE key = '$key'}),
		'00', "$key: and nowhere else");
}

# --- streams (distributed by stream): append with an expected version ---
is($coord->safe_psql('postgres', q{
	SELECT resilience.append_events('order-9', -1, ARRAY['{"type": "created", "data": {}}'::jsonb])}),
	'0', 'a new stream appended through the coordinator');
is($coord->safe_psql('postgres', q{
	SELECT resilience.append_events('order-9', 0, ARRAY['{"type": "paid", "data": {}}'::jsonb])}),
	'1', 'appended at the expected version');
($ret, $out, $err) = $coord->psql('postgres', q{
	SELECT resilience.append_events('order-9', 0, ARRAY['{"type": "paid", "data": {}}'::jsonb])},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/40001/, 'a stale expected version: 40001');
is($coord->safe_psql('postgres', q{
	SELECT string_agg(type, ',' ORDER BY version) FROM resilience.read_stream('order-9', 0)}),
	'created,paid', 'read back in order, nothing from the refused append');

$c->stop;
done_testing();
