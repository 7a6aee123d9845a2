# Every guarantee through the coordinator of a Citus cluster (coordinator and
# two workers, resilience.citus_setup() done), each with clients racing:
#  - a hot rate-limit key, 8 clients: admitted == capacity + refill x elapsed
#    (elapsed from the first call to the last, bound in the test), and the
#    bucket lives on one worker only;
#  - the same idempotency key from 8 clients: one effect in a distributed
#    table;
#  - a stale fencing token is refused after a lease changed hands;
#  - outbox events published in transactions that also write a distributed
#    table, 8 clients: every committed event is claimed, in per-key order,
#    and there is one event per business row (2PC keeps them together);
#  - inbox: a message id accepted once among 8 consumers' tries;
#  - sagas whose steps write a distributed table complete, or compensate,
#    driven by the coordinator's worker;
#  - a schedule every second writing a distributed table runs each slot
#    once while 4 clients tick beside the coordinator's worker.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('guarantees');
my $coord = $c->{coord};
my ($w1, $w2) = @{ $c->{workers} };
$c->setup;
$c->effects_table;

# --- rate limit: one hot key, 8 clients ---
# The first call takes the whole capacity at once (cost = capacity): from
# then on the 8 clients keep the bucket empty, so every token refilled is
# admitted.  (A full bucket would drop refill while pgbench connects; this
# one takes 20 s to fill, far longer than that.)
my ($cap, $refill) = (100, 5);
is($coord->safe_psql('postgres', "SELECT resilience.rate_limit('hot', $cap, $refill, $cap)"), 't',
	'the first call takes the whole capacity');
my $owner = $c->worker_of('hot');
my $other = $owner == $w1 ? $w2 : $w1;
# elapsed: from the first call to the last one, both as the worker saw them
my $t0 = $owner->safe_psql('postgres',
	q{SELECT extract(epoch FROM last_used) FROM resilience.rate_limit_entries() WHERE key = 'hot'});
$coord->pgbench('-n -c 8 -j 2 -T 4', 0, [qr{processed: \d+}], [qr{^$}],
	'8 clients call rate_limit on one key through the coordinator',
	{ '001_hot' => "SELECT resilience.rate_limit('hot', $cap, $refill);" });
my ($allowed, $denied, $elapsed) = split /\|/, $owner->safe_psql('postgres', qq{
	SELECT allowed, denied, extract(epoch FROM last_used) - $t0
	  FROM resilience.rate_limit_entries() WHERE key = 'hot'});
my $tokens = $cap + $allowed - 1;
my $expect = $cap + $refill * $elapsed;
note("admitted $tokens tokens ($allowed calls), denied $denied in $elapsed s: capacity + refill x elapsed = $expect");
# bound: the partial token either way, and 0.3 s of refill for the gap
# between the last admitted call and the last call
ok($tokens <= $expect + 1 && $tokens >= $expect - 1 - $refill * 0.3,
	"admitted $tokens == capacity + refill x elapsed ($expect, +1/-(1 + 0.3 s of refill))");
ok($denied > 0, 'and the rest was denied');
is($other->safe_psql('postgres', q{SELECT count(*) FROM resilience.rate_limit_entries() WHERE key = 'hot'})
	. $coord->safe_psql('postgres', q{SELECT count(*) FROM resilience.rate_limit_entries() WHERE key = 'hot'}),
	'00', 'the hot bucket lives on its worker only');

# --- the same idempotency key from 8 clients ---
$coord->pgbench('-n -c 8 -j 2 -t 1', 0, [qr{processed: 8/8}], [qr{^$}],
	'8 clients run the same idempotent request',
	{ '001_idem' => q{SELECT resilience.idempotent('orders', 'order-1', '{"total": 5}',
		$$INSERT INTO public.effects VALUES ('order-1', 1, 'idem') RETURNING '{"ok": true}'::jsonb$$,
		lock_timeout => '30 seconds');} });
is($coord->safe_psql('postgres', q{SELECT count(*) FROM effects WHERE src = 'idem'}), '1',
	'one effect for one idempotency key');

# --- fencing: a stale token is refused ---
my $t1 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('job', '200 ms', 'a')});
sleep 1;
my $t2 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('job', '1 minute', 'b')});
ok($t2 > $t1, "the new holder's token ($t2) is above the old one ($t1)");
$coord->safe_psql('postgres', "SELECT resilience.fence('res', $t2)");
my ($ret, $out, $err) = $coord->psql('postgres', "SELECT resilience.fence('res', $t1)",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/RS001/, 'the stale token is refused (RS001)');
is($coord->safe_psql('postgres', q{SELECT token FROM resilience.fences WHERE resource = 'res'}),
	$t2, 'the fence keeps the newest token');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM run_command_on_shards('resilience.fences',
	  $$SELECT count(*) FROM %s WHERE resource = 'res'$$) WHERE result = '1'}),
	'1', "the fence's row is in one shard");

# --- outbox: 8 clients publish with a distributed write ---
$c->queue_route('orders.%', 'c1');
$coord->pgbench('-n -c 8 -j 2 -t 25', 0, [qr{processed: 200/200}], [qr{^$}],
	'8 clients publish 25 events each, each with a write to a distributed table',
	{ '001_pub' => q{
BEGIN;
SELECT nextval('pub_order') AS n \gset
INSERT INTO effects VALUES ('key-' || :client_id, :n, 'outbox');
SELECT resilience.outbox_publish('orders.created', jsonb_build_object('n', :n), 'key-' || :client_id);
COMMIT;
} });
$c->drain_queue('c1');
is($coord->safe_psql('postgres', q{SELECT count(*), count(DISTINCT n) FROM claimed}), '200|200',
	'every committed event claimed once');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM effects e FULL JOIN claimed c ON c.n = e.n
	 WHERE e.src = 'outbox' AND c.n IS NULL OR e.n IS NULL}), '0',
	'one event per business row on the workers');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT n < lag(n) OVER (PARTITION BY key ORDER BY ord) AS back FROM claimed) x
	 WHERE back}), '0', 'per-key order kept');

# --- inbox: 8 consumers' tries, one accepted ---
$coord->pgbench('-n -c 8 -j 2 -t 1', 0, [qr{processed: 8/8}], [qr{^$}],
	'8 clients accept the same message',
	{ '001_inbox' => q{
BEGIN;
SELECT resilience.inbox_accept('billing', 'msg-1')::int AS fresh \gset
\if :fresh
INSERT INTO effects VALUES ('msg-1', 1, 'inbox');
\endif
COMMIT;
} });
is($coord->safe_psql('postgres', q{SELECT count(*) FROM effects WHERE src = 'inbox'}), '1',
	'the message is accepted once');

# --- sagas: steps write a distributed table; complete or compensate ---
$c->saga_role('agent');
$coord->safe_psql('postgres', q{
CREATE FUNCTION public.step(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    IF ctx ->> 'fail' = ctx #>> '{_saga,step}' THEN
        RAISE EXCEPTION 'step % fails', ctx #>> '{_saga,step}';
    END IF;
    INSERT INTO public.effects VALUES ('saga-' || saga_id, saga_id, 'saga:' || (ctx #>> '{_saga,step}'));
    RETURN '{}';
END $$;
CREATE FUNCTION public.undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    UPDATE public.effects SET src = src || ':undone'
     WHERE k = 'saga-' || saga_id AND src = 'saga:' || (ctx #>> '{_saga,step}')
    RETURNING NULL::jsonb
$$;
SET ROLE agent;
SELECT resilience.saga_define('trip', '[
  {"name": "a", "action": "public.step", "compensation": "public.undo"},
  {"name": "b", "action": "public.step", "compensation": "public.undo", "max_attempts": 1}]');
RESET ROLE;
});
my $ok = $coord->safe_psql('postgres', q{SELECT resilience.saga_start('trip', '{}', 'ok')});
my $bad = $coord->safe_psql('postgres', q{SELECT resilience.saga_start('trip', '{"fail": "b"}', 'bad')});
ok($coord->poll_query_until('postgres', qq{
	SELECT string_agg(state, ',' ORDER BY id) FROM resilience.sagas WHERE id IN ($ok, $bad)},
	'completed,compensated'), 'one saga completed, the other compensated');
is($coord->safe_psql('postgres', qq{
	SELECT string_agg(k || ':' || src, ',' ORDER BY k, src) FROM effects WHERE src LIKE 'saga:%'}),
	"saga-$ok:saga:a,saga-$ok:saga:b,saga-$bad:saga:a:undone", 'their writes on the workers agree');

# --- schedules: once per slot, with 4 clients ticking beside the worker ---
$coord->safe_psql('postgres', q{
SET ROLE agent;
SELECT resilience.schedule('tick', '@every 1 second',
    '{"sql": "INSERT INTO public.effects VALUES (''sched'', 0, current_setting(''resilience.schedule_slot''))"}');
RESET ROLE;
});
$coord->pgbench('-n -c 4 -j 2 -T 4', 0, [qr{processed: \d+}], [qr{^$}],
	'4 clients run schedule_tick beside the worker',
	{ '001_tick' => q{SELECT resilience.schedule_tick();} });
$coord->safe_psql('postgres', q{SET ROLE agent; SELECT resilience.schedule_pause('tick')});
my ($slots, $dups) = split /\|/, $coord->safe_psql('postgres', q{
	SELECT count(DISTINCT src), count(*) - count(DISTINCT src) FROM effects WHERE k = 'sched'});
ok($slots >= 3, "$slots slots ran, their writes on a worker");
is($dups, '0', 'no slot ran twice');

$c->stop;
done_testing();
