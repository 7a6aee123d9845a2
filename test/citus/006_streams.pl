# Event streams distributed by stream (resilience.citus_setup()), appended
# through the coordinator by 8 clients over 3 streams, each append at the
# version the client read just before (a conflict is 40001, and pgbench
# retries the read and the append):
#  - no append is lost or applied on a stale read: every event records the
#    version its client read, which is the version just before it;
#  - each stream's head row and events are in one shard, on one worker.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('streams');
my $coord = $c->{coord};
$c->setup;

$coord->pgbench('-n -c 8 -j 2 -t 15 --max-tries=1000', 0, [qr{processed: 120/120}], [qr{^$}],
	'8 clients append to 3 streams at the version they read',
	{ '006_append' => q{
\set s random(1, 3)
BEGIN;
SELECT resilience.stream_version('s-' || :s) AS v \gset
SELECT resilience.append_events('s-' || :s, :v,
	ARRAY[jsonb_build_object('type', 't', 'data', jsonb_build_object('read', :v, 'client', :client_id))]);
COMMIT;
} });
is($coord->safe_psql('postgres', q{
	SELECT sum(resilience.stream_version('s-' || i) + 1) FROM generate_series(1, 3) i}),
	'120', 'every append committed once: 120 events over the 3 streams');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM generate_series(1, 3) i, resilience.read_stream('s-' || i) e
	 WHERE (e.data ->> 'read')::bigint <> e.version - 1}),
	'0', 'each event was appended at the version its client read just before');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM run_command_on_shards('resilience.stream_events',
	  $$SELECT count(*) FROM %s WHERE stream = 's-1'$$) WHERE result::int > 0}),
	'1', "a stream's events are in one shard");
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM run_command_on_shards('resilience.streams',
	  $$SELECT count(*) FROM %s WHERE stream = 's-1'$$) WHERE result = '1'}),
	'1', "and its head row too");
my ($ret, $out, $err) = $coord->psql('postgres', q{
	SELECT resilience.append_events('s-1', 0, ARRAY['{"type": "late"}'::jsonb])},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/40001/, 'a stale expected version: 40001');

$c->stop;
done_testing();
