# resilience.citus_setup() on a coordinator and two workers:
#  - refused with 55000 in a database without Citus, and on a worker, with
#    nothing placed;
#  - places every table and delegated function as docs/citus.md says, and a
#    second call changes nothing;
#  - a delegated rate limit keeps its bucket on the one worker that owns the
#    key, and the coordinator's named policies (a reference table) reach it;
#  - streams (kept on the coordinator: append_events' INSERT has a subquery
#    Citus refuses) append at the expected version, refuse a stale one (40001).
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('setup');
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
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE 'resilience.%'}),
	'0', 'nothing placed by the refused calls');

# --- the placement, and a second call is a no-op ---
my $first = $coord->safe_psql('postgres',
	q{SELECT object, placement, changed FROM resilience.citus_setup() ORDER BY 1});
my $second = $coord->safe_psql('postgres',
	q{SELECT object, placement, changed FROM resilience.citus_setup() ORDER BY 1});
like($first, qr/^resilience\.leases\|distributed by name\|t$/m, 'leases by name');
like($first, qr/^resilience\.fences\|distributed by resource\|t$/m, 'fences by resource');
like($first, qr/^resilience\.inbox\|distributed by message_id\|t$/m, 'the inbox by message id');
like($first, qr/^resilience\.stream_events\|distributed by stream\|t$/m, 'stream events by stream');
like($first, qr/^resilience\.rate_limit_policies\|reference\|t$/m, 'policies: a reference table');
like($first, qr/^resilience\.outbox\|coordinator only\|f$/m, 'the outbox stays on the coordinator');
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
