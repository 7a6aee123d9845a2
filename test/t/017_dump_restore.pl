# pg_dump and pg_restore into a fresh database keep everything the
# extension holds for its users: every table of the extension is registered
# with pg_extension_config_dump, and after a round trip
#  - every table and sequence of the extension has the same contents;
#  - routes, policies, breaker configuration, saga definitions, running
#    sagas, pending outbox events, dead letters, idempotency keys, the inbox,
#    leases and fences are there and work: a completed key replays, a held
#    lease is still held and its token still valid, the fence still refuses
#    older tokens, new tokens and ids are higher than every old one, pending
#    events are claimed, a running saga finishes;
#  - the privileges are the same.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('dump');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
});
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE src');
$node->safe_psql('src', 'CREATE EXTENSION resilience');

# Every table of the extension is dumped with its data.
is( $node->safe_psql(
		'src', q{
	SELECT string_agg(c.relname, ', ' ORDER BY c.relname)
	  FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
	  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'resilience'
	 WHERE c.relkind IN ('r', 'S') AND c.oid <> ALL (e.extconfig)}),
	'', 'every table and sequence of the extension is registered with pg_extension_config_dump');

# ---- fill it: configuration, then state ----
$node->safe_psql(
	'src', q{
	CREATE ROLE dump_agent NOLOGIN IN ROLE resilience_admin;
	CREATE SCHEMA trip AUTHORIZATION dump_agent;
	SET ROLE dump_agent;
	CREATE FUNCTION trip.reserve(saga_id bigint, ctx jsonb) RETURNS jsonb
	LANGUAGE sql AS $$ SELECT '{"reserved": true}'::jsonb $$;
	INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec, description)
	VALUES ('gold', 3, 0.001, 'three, then wait');
	INSERT INTO resilience.breaker_config (name, window_size, minimum_calls) VALUES ('payments', 7, 3);
	INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
	VALUES ('orders.%', 'queue', 'shipping', '{}'), ('pay.%', 'queue', 'payments', '{}'),
	       ('bad.%', 'queue', 'quarantine', '{"max_attempts": 1}');
	SELECT resilience.saga_define('checkout', $$[
	  {"name": "reserve", "action": "trip.reserve"},
	  {"name": "charge", "action": "async", "topic": "pay.commands", "timeout": "1 day", "max_attempts": 1}
	]$$);
	RESET ROLE;
	-- state
	SELECT resilience.outbox_publish('orders.new', jsonb_build_object('n', i), 'o-' || i) FROM generate_series(1, 3) i;
	SELECT resilience.outbox_publish('nobody.listens', '{"lost": false}');
	SELECT resilience.outbox_publish('bad.order', '{"poison": true}', 'bad');
});
# a dead letter: the poison event is nacked with max_attempts 1
$node->safe_psql(
	'src', q{
	SELECT count(*) FROM resilience.outbox_claim('quarantine', 10, '1 minute');
	SELECT resilience.outbox_nack('quarantine', (SELECT id FROM resilience.outbox WHERE key = 'bad'));
});
my $saga = $node->safe_psql('src', q{SELECT resilience.saga_start('checkout', '{"cart": 7}', 'cart-7')});
$node->safe_psql('src', 'CALL resilience.saga_run()');    # reserve, then the command
$node->safe_psql(
	'src', q{
	SELECT outcome FROM resilience.idempotency_begin('api', 'done', '{"a": 1}');
	SELECT resilience.idempotency_complete('api', 'done', '{"id": 42}', 201);
	SELECT outcome FROM resilience.idempotency_begin('api', 'running', '{"a": 2}', lock_timeout => '1 day');
	SELECT resilience.idempotency_checkpoint('api', 'running', 'step-2');
	SELECT resilience.inbox_accept('billing', 'msg-1');
	SELECT resilience.stream_forward('cart-%', 'carts');
	SELECT resilience.append_events('cart-7', -1, ARRAY['{"type": "opened"}', '{"type": "added", "data": 3}']::jsonb[]);
});
my $token = $node->safe_psql('src', q{SELECT resilience.lock_acquire('leader', '1 day', 'node-a')});
$node->safe_psql('src', qq{SELECT resilience.fence('ledger', $token)});
my $old_max_token = $node->safe_psql('src', q{SELECT max(token) FROM resilience.leases});

is($node->safe_psql('src', qq{SELECT state || ' ' || awaiting FROM resilience.sagas WHERE id = $saga}),
	'running true', 'the saga is running, waiting for its reply');
is($node->safe_psql('src', q{SELECT count(*) FROM resilience.outbox_dead_letters}), 1, 'one dead letter');

# Contents of every table and sequence of the extension, one line each.
sub contents
{
	my ($db) = @_;
	my %t;
	my @rels = split /\n/,
	  $node->safe_psql($db,
		q{SELECT c.relname || ' ' || c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		   WHERE n.nspname = 'resilience' AND c.relkind IN ('r', 'S') ORDER BY 1});
	for my $r (@rels)
	{
		my ($rel, $kind) = split / /, $r;
		$t{$rel} = $node->safe_psql($db,
			$kind eq 'S'
			? qq{SELECT last_value || ' ' || is_called FROM resilience.$rel}
			: qq{SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM resilience.$rel t});
	}
	return \%t;
}

# The privilege map: ACLs of every object of the extension, and role memberships.
my $acl_sql = q{
	SELECT string_agg(o, E'\n' ORDER BY o) FROM (
	  SELECT p.oid::regprocedure::text || ' ' || coalesce(p.proacl::text, 'default') AS o
	    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'resilience'
	  UNION ALL
	  SELECT c.relname || ' ' || coalesce(c.relacl::text, 'default')
	    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'resilience'
	  UNION ALL
	  SELECT 'schema ' || coalesce(nspacl::text, 'default') FROM pg_namespace WHERE nspname = 'resilience'
	) x};

my $before = contents('src');
my $acl_before = $node->safe_psql('src', $acl_sql);

# ---- the round trip ----
my $dump = $node->basedir . '/src.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-d', $node->connstr('src'), '-f', $dump ], 'pg_dump');
$node->safe_psql('postgres', 'CREATE DATABASE dst');
my $ok = $node->run_log(
	[ 'pg_restore', '--exit-on-error', '-d', $node->connstr('dst'), $dump ]);
ok($ok, 'pg_restore into a fresh database, without an error');

my $after = contents('dst');
is_deeply([ sort keys %$after ], [ sort keys %$before ], 'the same tables and sequences');
for my $rel (sort keys %$before)
{
	is($after->{$rel}, $before->{$rel}, "$rel: same contents");
}
ok(length($before->{$_}) > 0, "$_ was not empty") for qw(rate_limit_policies breaker_config outbox_routes
  saga_definitions sagas saga_steps saga_events outbox outbox_dead_letters idempotency_keys inbox
  leases fences streams stream_events stream_forwards);
is($node->safe_psql('dst', $acl_sql), $acl_before, 'the same privileges');
is($node->safe_psql('dst', q{SELECT extversion FROM pg_extension WHERE extname = 'resilience'}),
	$node->safe_psql('src', q{SELECT extversion FROM pg_extension WHERE extname = 'resilience'}),
	'the same extension version');

# ---- and it all works ----
is($node->safe_psql('dst', q{SELECT outcome || ' ' || response::text || ' ' || status_code
	FROM resilience.idempotency_begin('api', 'done', '{"a": 1}')}),
	'replay {"id": 42} 201', 'a completed idempotency key replays its response');
is($node->safe_psql('dst', q{SELECT outcome FROM resilience.idempotency_begin('api', 'running', '{"a": 2}')}),
	'in_progress', 'a key in progress is still in progress');
is($node->safe_psql('dst', q{SELECT resilience.inbox_accept('billing', 'msg-1')}), 'f',
	'the inbox still knows its message');
is($node->safe_psql('dst', qq{SELECT resilience.lock_check('leader', $token)}), 't',
	'the lease is still held, its token valid');
is($node->safe_psql('dst', q{SELECT resilience.lock_acquire('leader', '1 min', 'node-b') IS NULL}), 't',
	'and nobody else gets it');
ok($node->safe_psql('dst', q{SELECT resilience.lock_acquire('other', '1 min', 'node-b')}) > $old_max_token,
	'a new lease gets a higher token than any before the dump');
is($node->safe_psql('dst', q{SELECT resilience.fence_check('ledger', } . ($token - 1) . ')'), 'f',
	'the fence still refuses an older token');
is($node->safe_psql('dst', q{SELECT string_agg(payload->>'n', ',' ORDER BY payload->>'n')
	FROM resilience.outbox_claim('shipping', 10, '1 minute')}), '1,2,3', 'pending events are claimed');
ok($node->safe_psql('dst', q{SELECT resilience.outbox_publish('orders.new', '{}')})
	  > $node->safe_psql('src', q{SELECT max(id) FROM resilience.outbox}),
	'a new event gets a higher id');
is($node->safe_psql('dst', q{SELECT resilience.outbox_redrive(topic_pattern => 'bad.%')}), 1,
	'the dead letter can be redriven');
is($node->safe_psql('dst', q{SELECT string_agg(CASE WHEN r THEN 't' ELSE 'f' END, '') FROM (
	SELECT resilience.rate_limit('u1', 'gold') r FROM generate_series(1, 4)) x}), 'tttf',
	'the policy limits');
$node->safe_psql('dst', q{SELECT resilience.breaker_allow('payments')});
is($node->safe_psql('dst', q{SELECT window_size FROM resilience.breakers WHERE name = 'payments'}), 7,
	'the breaker follows its configuration');
is($node->safe_psql('dst', q{SELECT resilience.stream_version('cart-7')}), 1, 'a stream keeps its version');
my ($stale_ret) = $node->psql('dst', q{SELECT resilience.append_events('cart-7', 0, ARRAY['{"type": "x"}']::jsonb[])});
isnt($stale_ret, 0, 'an append at a stale version is refused');
is($node->safe_psql('dst', q{SELECT resilience.append_events('cart-7', 1, ARRAY['{"type": "paid"}']::jsonb[])}), 2,
	'an append at its version goes on from it');
is($node->safe_psql('dst', q{SELECT count(*) FROM resilience.outbox WHERE topic = 'carts'}), 3,
	'and is still forwarded to the outbox');
is($node->safe_psql('dst', qq{SELECT resilience.saga_step_completed($saga, 'charge', '{"charge": "ch_1"}')}),
	't', 'the running saga takes its reply');
$node->safe_psql('dst', 'CALL resilience.saga_run()');
is($node->safe_psql('dst', qq{SELECT state FROM resilience.sagas WHERE id = $saga}), 'completed',
	'and completes');
is($node->safe_psql('dst', q{SELECT resilience.saga_start('checkout', '{"cart": 7}', 'cart-7')}), $saga,
	'its idempotency key still names it');
ok($node->safe_psql('dst', q{SELECT resilience.saga_start('checkout', '{}')}) > $saga,
	'a new saga gets a higher id');

$node->stop;
done_testing();
