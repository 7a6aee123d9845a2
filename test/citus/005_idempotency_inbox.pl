# Idempotency keys and the inbox distributed by key
# (resilience.citus_setup()), called through the coordinator by 8 clients:
#  - random requests over 20 idempotency keys: one effect per key, each
#    key's row on the worker that owns it, keys on both workers;
#  - random messages over 50 ids to one inbox consumer: each accepted once;
#  - a key belongs to the role that began it, also when its row is read
#    and written through the coordinator (42501 for another role);
#  - the reapers delete expired rows on the workers.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);
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

# --- owners: another role is refused the key, read through the coordinator ---
$coord->safe_psql('postgres', q{CREATE ROLE idem_other NOLOGIN IN ROLE resilience_user});
my ($ret, $out, $err) = $coord->psql('postgres', qq{SET ROLE idem_other;
	SELECT outcome FROM resilience.idempotency_begin('orders', '$key',
	  jsonb_build_object('n', substr('$key', 7)::int))});
like($err, qr/permission denied for idempotency key "\Q$key\E"/,
	"$key: another role gets 42501, not the replay");
($ret, $out, $err) = $coord->psql('postgres', qq{SET ROLE idem_other;
	SELECT resilience.idempotency_complete('orders', '$key', '{"forged": true}')});
like($err, qr/permission denied for idempotency key/, "$key: nor completes it (not even its state is told)");
is($coord->safe_psql('postgres', qq{SET ROLE idem_other;
	SELECT outcome FROM resilience.idempotency_begin('other', 'o-1', '{}');
	SELECT resilience.idempotency_complete('other', 'o-1', '{"mine": true}');
	SELECT outcome || ' ' || response::text FROM resilience.idempotency_begin('other', 'o-1', '{}')}),
	"proceed\n\nreplay {\"mine\": true}", 'its own key is begun, completed and replayed');
is($coord->safe_psql('postgres', qq{
	SELECT state || ' ' || response::text || ' ' || owner_role::text FROM resilience.idempotency_keys
	 WHERE key IN ('$key', 'o-1') ORDER BY key = 'o-1'}),
	"completed {\"ok\": true} " . $coord->safe_psql('postgres', 'SELECT current_user')
	  . "\ncompleted {\"mine\": true} idem_other", 'each key is its owner\'s, unchanged by the other role');
# an expired key is begun afresh by another role (the reset writes the new owner)
$coord->safe_psql('postgres', q{CREATE ROLE idem_third NOLOGIN IN ROLE resilience_user});
$coord->safe_psql('postgres', q{SET ROLE idem_other;
	SELECT outcome FROM resilience.idempotency_begin('other', 'o-2', '{}', ttl => '1 ms');
	SELECT resilience.idempotency_complete('other', 'o-2', '{"old": true}')});
usleep(50_000);
is($coord->safe_psql('postgres', q{SET ROLE idem_third;
	SELECT outcome FROM resilience.idempotency_begin('other', 'o-2', '{}');
	SELECT resilience.idempotency_complete('other', 'o-2', '{"new": true}')}),
	"proceed\n", 'an expired key is begun and completed by the next role');
($ret, $out, $err) = $coord->psql('postgres', q{SET ROLE idem_other;
	SELECT outcome FROM resilience.idempotency_begin('other', 'o-2', '{}')});
like($err, qr/permission denied for idempotency key "o-2"/, 'which owns it from then on');
$coord->safe_psql('postgres', q{DELETE FROM resilience.idempotency_keys WHERE scope = 'other'});

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
