# Idempotency keys and the inbox distributed by key
# (resilience.citus_setup()), called through the coordinator by 8 clients:
#  - random requests over 20 idempotency keys: one effect per key, each
#    key's row on the worker that owns it, keys on both workers;
#  - random messages over 50 ids to one inbox consumer: each accepted once;
#  - the reapers delete expired rows on the workers.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('idempotency');
my $coord = $c->{coord};
$c->setup;
$c->effects_table;

# --- idempotency keys: 8 clients, 20 keys ---
$coord->pgbench('-n -c 8 -j 2 -t 20', 0, [qr{processed: 160/160}], [qr{^$}],
	'8 clients send requests over 20 idempotency keys',
	{ '005_idem' => q{
\set n random(1, 20)
SELECT resilience.idempotent('orders', 'order-' || :n, jsonb_build_object('n', :n),
	format($$INSERT INTO public.effects VALUES ('order-%s', %s, 'idem') RETURNING '{"ok": true}'::jsonb$$, :n, :client_id),
	lock_timeout => '30 seconds');
} });
my ($effects, $keys) = split /\|/, $coord->safe_psql('postgres', q{
	SELECT count(*), count(DISTINCT k) FROM effects WHERE src = 'idem'});
is($effects, $keys, "one effect per idempotency key ($keys keys, $effects effects)");
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.idempotency_keys WHERE state = 'completed'}), $keys,
	'each key completed, its row read through the coordinator');
is($coord->safe_psql('postgres', q{
	SELECT count(DISTINCT p.nodeport) FROM resilience.idempotency_keys k
	  JOIN pg_dist_shard_placement p
	    ON p.shardid = get_shard_id_for_distribution_column('resilience.idempotency_keys', k.key)}),
	'2', 'the keys live on both workers');
my $key = $coord->safe_psql('postgres', q{SELECT min(key) FROM resilience.idempotency_keys});
my $owner = $c->worker_of($key);
is($owner->safe_psql('postgres', qq{
	SELECT count(*) FROM run_command_on_shards('resilience.idempotency_keys',
	  \$\$SELECT count(*) FROM %s WHERE key = '$key'\$\$) WHERE result = '1'}),
	'1', "$key: its row is in one shard");
is($coord->safe_psql('postgres', qq{
	SELECT outcome FROM resilience.idempotency_begin('orders', '$key',
	  jsonb_build_object('n', substr('$key', 7)::int))}),
	'replay', "$key: a later request replays the stored outcome");

# --- inbox: 8 clients, 50 message ids ---
$coord->pgbench('-n -c 8 -j 2 -t 30', 0, [qr{processed: 240/240}], [qr{^$}],
	'8 clients accept messages over 50 ids',
	{ '005_inbox' => q{
\set n random(1, 50)
BEGIN;
SELECT resilience.inbox_accept('billing', 'msg-' || :n)::int AS fresh \gset
\if :fresh
INSERT INTO effects VALUES ('msg-' || :n, :client_id, 'inbox');
\endif
COMMIT;
} });
my ($accepted, $ids) = split /\|/, $coord->safe_psql('postgres', q{
	SELECT count(*), count(DISTINCT k) FROM effects WHERE src = 'inbox'});
is($accepted, $ids, "each message accepted once ($ids ids)");
is($coord->safe_psql('postgres', q{SELECT count(*) FROM resilience.inbox}), $ids,
	'one inbox row per message id');

# --- the reapers on the distributed tables ---
$coord->safe_psql('postgres', q{
	UPDATE resilience.idempotency_keys SET expires_at = now() - interval '1 second';
	UPDATE resilience.inbox SET expires_at = now() - interval '1 second'});
is($coord->safe_psql('postgres', q{SELECT resilience._idempotency_reap()}), $keys,
	'the key reaper deletes the expired keys on the workers');
is($coord->safe_psql('postgres', q{SELECT resilience._inbox_reap()}), $ids,
	'the inbox reaper deletes the expired messages on the workers');
is($coord->safe_psql('postgres', q{
	SELECT (SELECT count(*) FROM resilience.idempotency_keys) + (SELECT count(*) FROM resilience.inbox)}),
	'0', 'none left');

$c->stop;
done_testing();
