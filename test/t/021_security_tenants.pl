# Roles isolated from each other (issue 14, item 3; docs/operations.md,
# "Roles and tenants").  Two application roles, both resilience_user and
# not members of each other, share one database.  Everything one of them
# owns (an outbox queue consumer name, an inbox consumer, a saga, a lease, an
# event stream) is refused to the other with 42501, the error naming the
# owner, and nothing changes; the owner, a member of the owner role and
# resilience_admin succeed.  A fence refuses a token that was never issued.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('tenants');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
});
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->safe_psql(
	'app', q{
	CREATE EXTENSION resilience;
	CREATE ROLE app_a NOLOGIN IN ROLE resilience_user;
	CREATE ROLE app_b NOLOGIN IN ROLE resilience_user;
	CREATE ROLE app_a_worker NOLOGIN IN ROLE resilience_user, app_a;
	CREATE ROLE ops NOLOGIN IN ROLE resilience_admin;
	CREATE ROLE saga_agent NOLOGIN IN ROLE resilience_admin;
	INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('a.%', 'queue', 'a-queue');
	SET ROLE saga_agent;
	SELECT resilience.saga_define('pay', $$[
	  {"name": "charge", "action": "async", "topic": "pay.commands", "timeout": "1 day", "max_attempts": 1}
	]$$);
});

# Run sql as role; returns (ok, stdout, stderr) with the SQLSTATE in stderr.
sub as_role
{
	my ($role, $sql) = @_;
	my ($ret, $out, $err) = $node->psql('app', "\\set VERBOSITY verbose\nSET ROLE $role;\n$sql",
		on_error_stop => 1);
	return ($ret == 0, $out, $err);
}

sub q1
{
	my ($sql) = @_;
	return $node->safe_psql('app', $sql);
}

# $role's $sql must fail with 42501, the detail naming $owner.
sub refused
{
	my ($role, $sql, $owner, $what) = @_;
	my ($ok, $out, $err) = as_role($role, $sql);
	ok(!$ok && $err =~ /ERROR:\s+42501:/, "$what: refused with 42501")
	  or diag("ok=$ok out=$out err=$err");
	like($err, qr/DETAIL:.*"\Q$owner\E"/, "$what: the detail names the owner $owner");
	like($err, qr/HINT:.*resilience_admin|HINT:.*member/, "$what: the hint says how to get access");
}

# $role's $sql succeeds; returns its output.
sub allowed
{
	my ($role, $sql, $what) = @_;
	my ($ok, $out, $err) = as_role($role, $sql);
	ok($ok, "$what: allowed") or diag($err);
	return $out;
}

# ---- outbox queue consumers ----
q1(q{SET ROLE app_a; SELECT resilience.outbox_publish('a.order', jsonb_build_object('n', i), 'k' || i)
	  FROM generate_series(1, 3) i});
my $claimed = allowed('app_a', q{SELECT string_agg(id::text, ',' ORDER BY id) FROM resilience.outbox_claim('a-queue', 1, '1 hour')},
	'the owner claims its queue');
ok($claimed =~ /^\d+$/, 'one event claimed by app_a') or diag($claimed);
my $rows = q1(q{SELECT string_agg(id || ':' || coalesce(claimed_by, '-'), ',' ORDER BY id) FROM resilience.outbox});
refused('app_b', q{SELECT count(*) FROM resilience.outbox_claim('a-queue', 10, '1 hour')}, 'app_a',
	'outbox_claim of another role\'s consumer');
refused('app_b', qq{SELECT resilience.outbox_ack('a-queue', ARRAY[$claimed]::bigint[])}, 'app_a',
	'outbox_ack of another role\'s consumer');
refused('app_b', qq{SELECT resilience.outbox_nack('a-queue', $claimed)}, 'app_a',
	'outbox_nack of another role\'s consumer');
is(q1(q{SELECT string_agg(id || ':' || coalesce(claimed_by, '-'), ',' ORDER BY id) FROM resilience.outbox}),
	$rows, 'the queue\'s rows are unchanged');
is(allowed('app_a_worker', qq{SELECT resilience.outbox_ack('a-queue', ARRAY[$claimed]::bigint[])},
		'a member of the owner acks'), '1', 'the member acked the event');
my $second = allowed('ops', q{SELECT id FROM resilience.outbox_claim('a-queue', 1, '1 hour')},
	'resilience_admin claims');
is(allowed('ops', qq{SELECT resilience.outbox_nack('a-queue', $second)}, 'resilience_admin nacks'), 't',
	'the admin gave the event back');
# a name nobody used yet: the first role to use it owns it
allowed('app_b', q{SELECT count(*) FROM resilience.outbox_claim('b-queue', 1)}, 'app_b claims a new name');
refused('app_a', q{SELECT count(*) FROM resilience.outbox_claim('b-queue', 1)}, 'app_b',
	'and app_a then may not');

# ---- inbox consumers ----
is(allowed('app_a', q{SELECT resilience.inbox_accept('a-inbox', 'm1')}, 'the owner accepts'), 't',
	'first message accepted');
refused('app_b', q{SELECT resilience.inbox_accept('a-inbox', 'm2')}, 'app_a',
	'inbox_accept for another role\'s consumer');
is(q1(q{SELECT count(*) FROM resilience.inbox WHERE message_id = 'm2'}), '0', 'm2 was not recorded');
is(allowed('app_a', q{SELECT resilience.inbox_accept('a-inbox', 'm2')}, 'the owner accepts m2'), 't',
	'm2 is still new to its consumer');
is(allowed('app_a_worker', q{SELECT resilience.inbox_accept('a-inbox', 'm3')}, 'a member accepts'), 't',
	'the member accepted m3');
is(allowed('ops', q{SELECT resilience.inbox_accept('a-inbox', 'm4')}, 'resilience_admin accepts'), 't',
	'the admin accepted m4');

# ---- sagas: replies to async steps ----
my @sagas = map {
	q1(qq{SET ROLE app_a; SELECT resilience.saga_start('pay', '{"amount": $_}')})
} 1 .. 3;
q1('SELECT resilience.saga_tick()') for 1 .. 3;    # each sends its command and waits
is(q1(qq{SELECT count(*) FROM resilience.sagas WHERE awaiting AND id IN (@{[join ',', @sagas]})}), '3',
	'three sagas wait for a reply');
my $ctx = q1(qq{SELECT context::text || coalesce(reply::text, '-') FROM resilience.sagas WHERE id = $sagas[0]});
refused('app_b', qq{SELECT resilience.saga_step_completed($sagas[0], 'charge', '{"amount": 0, "evil": true}')},
	'app_a', 'saga_step_completed on another role\'s saga');
refused('app_b', qq{SELECT resilience.saga_step_failed($sagas[0], 'charge', '{"x": 1}', false)},
	'app_a', 'saga_step_failed on another role\'s saga');
is(q1(qq{SELECT context::text || coalesce(reply::text, '-') FROM resilience.sagas WHERE id = $sagas[0]}),
	$ctx, 'the saga\'s context and reply are unchanged');
is(allowed('app_a_worker', qq{SELECT resilience.saga_step_completed($sagas[0], 'charge', '{"paid": 1}')},
		'a member of the starter replies'), 't', 'the member\'s reply was accepted');
is(allowed('ops', qq{SELECT resilience.saga_step_completed($sagas[1], 'charge', '{"paid": 2}')},
		'resilience_admin replies'), 't', 'the admin\'s reply was accepted');
is(allowed('app_a', qq{SELECT resilience.saga_step_failed($sagas[2], 'charge', '{"no": 3}', false)},
		'the starter replies'), 't', 'the starter\'s reply was accepted');

# ---- event streams ----
allowed('app_a', q{SELECT resilience.append_events('a-stream', -1, ARRAY['{"type": "opened"}']::jsonb[])},
	'the owner appends');
refused('app_b', q{SELECT count(*) FROM resilience.read_stream('a-stream')}, 'app_a',
	'read_stream of another role\'s stream');
refused('app_b', q{SELECT resilience.stream_version('a-stream')}, 'app_a',
	'stream_version of another role\'s stream');
refused('app_b', q{SELECT resilience.append_events('a-stream', NULL, ARRAY['{"type": "evil"}']::jsonb[])},
	'app_a', 'append_events to another role\'s stream');
refused('app_b', q{SELECT resilience.append_events('a-stream', 0, ARRAY['{"type": "evil"}']::jsonb[])},
	'app_a', 'append_events at the right version to another role\'s stream');
is(q1(q{SELECT version FROM resilience.streams WHERE stream = 'a-stream'}), '0', 'the stream is unchanged');
is(q1(q{SELECT count(*) FROM resilience.stream_events WHERE stream = 'a-stream'}), '1', 'one event');
is(allowed('app_a_worker', q{SELECT count(*) FROM resilience.read_stream('a-stream')}, 'a member reads'),
	'1', 'the member read the event');
is(allowed('ops', q{SELECT resilience.append_events('a-stream', 0, ARRAY['{"type": "closed"}']::jsonb[])},
		'resilience_admin appends'), '1', 'the admin appended');
is(allowed('app_a', q{SELECT resilience.stream_version('a-stream')}, 'the owner reads'), '1',
	'the owner sees both events');

# ---- leases ----
my $token = q1(q{SET ROLE app_a; SELECT resilience.lock_acquire('a-lease', '1 hour', 'a-1')});
my $lease = q1(q{SELECT token || ' ' || expires_at FROM resilience.leases WHERE name = 'a-lease'});
refused('app_b', qq{SELECT resilience.lock_renew('a-lease', $token, '7 days')}, 'app_a',
	'lock_renew of another role\'s lease');
refused('app_b', qq{SELECT resilience.lock_release('a-lease', $token)}, 'app_a',
	'lock_release of another role\'s lease');
refused('app_b', qq{SELECT resilience.lock_check('a-lease', $token)}, 'app_a',
	'lock_check of another role\'s lease (no confirmation of a guessed token)');
refused('app_b', q{SELECT resilience.lock_acquire('a-lease', '1 hour')}, 'app_a',
	'lock_acquire of another role\'s lease name');
is(q1(q{SELECT token || ' ' || expires_at FROM resilience.leases WHERE name = 'a-lease'}), $lease,
	'the lease is unchanged');
is(q1(qq{SET ROLE app_a; SELECT resilience.lock_check('a-lease', $token)}), 't', 'and still held');
is(allowed('app_a_worker', qq{SELECT resilience.lock_renew('a-lease', $token, '2 hours')}, 'a member renews'),
	't', 'the member renewed the lease');
is(allowed('ops', qq{SELECT resilience.lock_check('a-lease', $token)}, 'resilience_admin checks'), 't',
	'the admin checked the lease');
is(allowed('app_a', qq{SELECT resilience.lock_release('a-lease', $token)}, 'the owner releases'), 't',
	'the owner released the lease');
ok(allowed('app_a', q{SELECT resilience.lock_acquire('a-lease', '1 hour')}, 'the owner acquires again') > $token,
	'with a higher token');

# ---- fences: only tokens that were issued ----
my ($ok, $out, $err) = as_role('app_b', q{SELECT resilience.fence('res', 9223372036854775807)});
ok(!$ok && $err =~ /ERROR:\s+22023:/, 'a fence refuses a token never issued (22023)') or diag($err);
($ok, $out, $err) = as_role('app_b', q{SELECT resilience.fence_check('res', 9223372036854775807)});
ok(!$ok && $err =~ /ERROR:\s+22023:/, 'so does fence_check') or diag($err);
is(q1(q{SELECT count(*) FROM resilience.fences WHERE resource = 'res'}), '0', 'the fence is not pinned');
$token = q1(q{SET ROLE app_b; SELECT resilience.lock_acquire('b-lease', '1 hour')});
allowed('app_b', qq{SELECT resilience.fence('res', $token)}, 'an issued token is accepted');
is(q1(q{SELECT token FROM resilience.fences WHERE resource = 'res'}), $token, 'the fence moved to it');

# ---- an admin declares (or transfers) an owner ----
allowed('ops', q{SELECT resilience.set_owner('inbox_consumer', 'a-inbox', 'app_b')}, 'an admin transfers');
is(allowed('app_b', q{SELECT resilience.inbox_accept('a-inbox', 'm9')}, 'the new owner accepts'), 't',
	'app_b now owns the inbox consumer');
refused('app_a', q{SELECT resilience.inbox_accept('a-inbox', 'm10')}, 'app_b', 'the old owner is refused');
($ok, $out, $err) = as_role('app_a', q{SELECT resilience.set_owner('inbox_consumer', 'a-inbox', 'app_a')});
ok(!$ok && $err =~ /ERROR:\s+42501:/, 'only an admin declares owners') or diag($err);

done_testing();
