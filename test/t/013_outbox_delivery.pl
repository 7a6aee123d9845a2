# The relay delivering to a local HTTP receiver (test/receiver.pl) and to
# NOTIFY listeners, woken on commit (the safety poll is an hour here):
#  - headers (Idempotency-Key = event id, Content-Type, event and route
#    headers), body = payload;
#  - a rolled-back event never arrives; events committed out of id order
#    all arrive;
#  - 8 producers, 50 keys: every event arrives, per key in commit order
#    (checked against commit timestamps);
#  - 500s retried; 429 Retry-After honoured; receiver down: backoff, the
#    breaker opens, everything arrives once it is back;
#  - 400 goes to the dead letters, redrive delivers it;
#  - no transaction (xid or snapshot) is held while a request is in flight;
#  - NOTIFY listeners get the envelope.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use lib 'test/perl';
use OutboxReceiver;

my $node = PostgreSQL::Test::Cluster->new('outbox');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
resilience.relay_interval = '1h'
resilience.reaper_interval = 0
resilience.outbox_breaker_failures = 3
resilience.outbox_breaker_open_time = '1s'
track_commit_timestamp = on
max_connections = 40
});
$node->start;
my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
SET log_statement = 'none';  -- the route's secret must not reach the log through us either
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('hook.%', 'http', '@{[ $recv->url('/hook') ]}',
   '{"headers": {"Authorization": "Bearer route-secret"}, "backoff_base_ms": 100, "backoff_max_ms": 1000}'),
  ('load.%', 'http', '@{[ $recv->url('/load') ]}', '{}'),
  ('note.%', 'notify', 'notes', '{}');
});
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM resilience.workers WHERE job = 'relay' AND runs > 0})
  or die 'the relay never ran';

sub by_body
{
	my ($marker) = @_;
	return grep { $_->{body} =~ /"m": "\Q$marker\E"/ } $recv->records;
}

sub wait_marker
{
	my ($marker, $timeout) = @_;
	return $recv->wait_for(sub { grep { $_->{status} == 200 && $_->{body} =~ /"m": "\Q$marker\E"/ } @{ $_[0] } },
		$timeout);
}

# --- one event: headers, body, woken on commit ---
my $t0 = time;
my $id = $node->safe_psql('postgres',
	q{SELECT resilience.outbox_publish('hook.basic', '{"m": "basic", "n": 1}', 'k1', '{"X-Trace": "t-1"}')});
ok(wait_marker('basic', 10), 'a published event is delivered');
my $latency = time - $t0;
ok($latency < 5, sprintf('woken on commit: delivered in %.3f s with a one-hour safety poll', $latency));
my ($r) = by_body('basic');
is($r->{key}, $id, 'Idempotency-Key is the event id');
is($r->{type}, 'application/json', 'Content-Type is application/json');
like($r->{x}, qr/x-trace=t-1/, 'the event headers are sent');
like($r->{x}, qr/authorization=Bearer route-secret/, 'the route headers are sent');
is($r->{body}, '{"m": "basic", "n": 1}', 'the body is the payload');
unlike(slurp_file($node->logfile), qr/route-secret/, 'route credentials never reach the log');

# --- rollback never delivered; commits out of id order all delivered ---
my $s1 = $node->background_psql('postgres');
$s1->query_safe('BEGIN');
my $low = $s1->query_safe(q{SELECT resilience.outbox_publish('hook.order', '{"m": "low-id"}')});
my $high = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.order', '{"m": "high-id"}')});
cmp_ok($low, '<', $high, 'the open transaction took the lower id');
ok(wait_marker('high-id', 10), 'the later id, committed first, is delivered');
$s1->query_safe('COMMIT');
ok(wait_marker('low-id', 10), 'the lower id, committed later, is delivered too');
$s1->query_safe(q{BEGIN; SELECT resilience.outbox_publish('hook.order', '{"m": "rolled-back"}'); ROLLBACK});
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.order', '{"m": "after-rollback"}')});
ok(wait_marker('after-rollback', 10), 'an event committed after the rollback arrives');
is(scalar(by_body('rolled-back')), 0, 'the rolled-back event never arrives');
$s1->quit;

# --- 8 producers, 50 keys: all delivered, per key in commit order ---
$node->pgbench(
	'-n -c 8 -j 2 -t 100',
	0,
	[qr{processed: 800/800}],
	[qr{^$}],
	'8 producers publish 800 events on 50 keys',
	{
		'005_load' => q{
\set k random(1, 50)
\set d random(0, 3)
BEGIN;
SELECT resilience.outbox_publish('load.ev', jsonb_build_object('m', 'load', 'k', :k, 'xid', txid_current()::text), 'key-' || :k);
SELECT pg_sleep(:d / 1000.0);
COMMIT;
}
	});
ok($recv->wait_for(sub { (grep { $_->{path} eq '/load' && $_->{status} == 200 } @{ $_[0] }) >= 800 }, 120),
	'all 800 events of 8 producers arrive');
my (%seen, %per_key);
for my $rec (grep { $_->{path} eq '/load' } $recv->records)
{
	next if $seen{ $rec->{key} }++;
	my ($k) = $rec->{body} =~ /"k": (\d+)/;
	my ($xid) = $rec->{body} =~ /"xid": "(\d+)"/;
	push @{ $per_key{$k} }, $xid;
}
is(scalar(keys %seen), 800, 'every one of the 800 events arrived (distinct Idempotency-Keys)');
# commit timestamps of each key's events, in arrival order, never go back
my $values = join(',', map { my $k = $_; map { "($k, $per_key{$k}[$_], $_)" } 0 .. $#{ $per_key{$k} } } keys %per_key);
my $out_of_order = $node->safe_psql('postgres', qq{
SELECT count(*) FROM (
  SELECT k, pos, pg_xact_commit_timestamp(xid::text::xid) AS ts,
         lag(pg_xact_commit_timestamp(xid::text::xid)) OVER (PARTITION BY k ORDER BY pos) AS prev
    FROM (VALUES $values) v(k, xid, pos)) s
 WHERE ts < prev});
is($out_of_order, '0', 'per key, events arrive in commit order');
my $inversions = $node->safe_psql('postgres', q{
SELECT count(*) FROM resilience.outbox_status WHERE backlog > 0});
is($inversions, '0', 'nothing left in the outbox');

# --- publishing while vacuum and route changes invalidate the caches ---
$node->pgbench(
	'-n -c 4 -j 2 -T 5',
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'publishers never fail while VACUUM and route changes invalidate their caches',
	{
		'008_publish@20' => q{SELECT resilience.outbox_publish('load.inval', '{"m": "inval"}', 'k' || random());},
		'008_vacuum@1' => q{VACUUM (ANALYZE) resilience.outbox;},
		'008_routes@1' => q{UPDATE resilience.outbox_routes SET enabled = enabled WHERE false;}
	});
ok($node->poll_query_until('postgres', q{SELECT count(*) FROM resilience.outbox}, '0'),
	'and everything they published is delivered');

# --- 500s are retried with the same Idempotency-Key ---
$recv->control('mode=fail&status=500&count=2');
my $rid = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.retry', '{"m": "retry"}')});
ok(wait_marker('retry', 30), 'an event answered 500 twice is delivered on the third attempt');
my @tries = by_body('retry');
is(scalar(@tries), 3, 'three attempts');
is(scalar(grep { $_->{key} eq $rid } @tries), 3, 'every attempt carries the same Idempotency-Key');

# --- 429 with Retry-After: not retried before ---
$recv->control('mode=fail&status=429&retry_after=2&count=1');
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.slow', '{"m": "retry-after"}')});
ok(wait_marker('retry-after', 30), 'an event answered 429 is delivered later');
@tries = by_body('retry-after');
cmp_ok($tries[1]{t} - $tries[0]{t}, '>=', 1900,
	sprintf('Retry-After: 2 is honoured (retried after %.0f ms)', $tries[1]{t} - $tries[0]{t}));

# --- receiver down: backoff, breaker opens, then everything arrives ---
$recv->control('mode=down&for=5');
my $offset = -s $node->logfile;
$node->safe_psql('postgres', q{
SELECT resilience.outbox_publish('hook.down', jsonb_build_object('m', 'down-' || i)) FROM generate_series(1, 30) i});
ok( $node->poll_query_until('postgres',
		q{SELECT breaker FROM resilience.outbox_status WHERE topic_pattern = 'hook.%'}, 'open'),
	'the breaker opens while the receiver is down');
ok($node->log_contains(qr/breaker for http:\/\/127.0.0.1:\d+ opened after 3 consecutive failures/, $offset),
	'the breaker opening is logged');
my $retries = $node->safe_psql('postgres',
	q{SELECT retries > 0 AND last_error IS NOT NULL FROM resilience.outbox_status WHERE topic_pattern = 'hook.%'});
is($retries, 't', 'failed attempts are counted as retries, with the last error');
ok( $recv->wait_for(sub { (grep { $_->{status} == 200 && $_->{body} =~ /"m": "down-/ } @{ $_[0] }) >= 30 }, 60),
	'once the receiver is back, all 30 events arrive');
ok( $node->poll_query_until('postgres',
		q{SELECT breaker FROM resilience.outbox_status WHERE topic_pattern = 'hook.%'}, 'closed'),
	'and the breaker closes');

# --- one failing key holds up only itself ---
$recv->control('mode=fail&status=500&match=stuck-&for=4');
$node->safe_psql('postgres', q{
SELECT resilience.outbox_publish('hook.keys', '{"m": "stuck-1"}', 'stuck');
SELECT resilience.outbox_publish('hook.keys', '{"m": "stuck-2"}', 'stuck');
SELECT resilience.outbox_publish('hook.keys', jsonb_build_object('m', 'free-' || i), 'free-' || i)
  FROM generate_series(1, 20) i;});
ok( $recv->wait_for(sub { (grep { $_->{status} == 200 && $_->{body} =~ /"m": "free-/ } @{ $_[0] }) >= 20 }, 30),
	'the other keys are all delivered while one key keeps failing');
is(scalar(grep { $_->{status} == 200 } by_body('stuck-1')), 0, 'meanwhile the failing key has not got through');
is(scalar(by_body('stuck-2')), 0, 'and its next event was not sent');
ok(wait_marker('stuck-2', 30), 'once the endpoint accepts it, the key goes on');
my @stuck = grep { $_->{body} =~ /stuck-/ } $recv->records;
my ($first_ok) = grep { $stuck[$_]{status} == 200 && $stuck[$_]{body} =~ /stuck-1/ } 0 .. $#stuck;
my ($second) = grep { $stuck[$_]{body} =~ /stuck-2/ } 0 .. $#stuck;
cmp_ok($first_ok, '<', $second, "the key's second event is sent only after its first succeeded");

# --- non-retryable 4xx: dead letter, redrive, delivered ---
$recv->control('mode=fail&status=400&count=1');
my $did = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.bad', '{"m": "rejected"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $did AND last_error LIKE 'HTTP 400%'}, '1'),
	'a 400 goes straight to the dead letters');
is(scalar(by_body('rejected')), 1, 'after a single attempt');
ok($node->log_contains(qr/event $did .* is a dead letter after 1 attempts: HTTP 400/), 'the dead letter is logged');
is($node->safe_psql('postgres', qq{SELECT resilience.outbox_redrive(ARRAY[$did]::bigint[])}), '1', 'redrive');
ok(wait_marker('rejected', 30), 'the redriven event is delivered');

# --- no transaction open while waiting for the endpoint ---
$recv->control('mode=ok&delay_ms=3000');
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.xmin', '{"m": "slow"}')});
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'resilience worker'
		    AND query LIKE 'resilience relay: delivering%'}, '1'),
	'the relay is waiting for a slow endpoint');
is( $node->safe_psql('postgres', q{
SELECT coalesce(backend_xid::text, 'none') || '/' || coalesce(backend_xmin::text, 'none')
  FROM pg_stat_activity WHERE backend_type = 'resilience worker'}),
	'none/none', 'meanwhile it holds no transaction id and no snapshot (vacuum is not held back)');
ok(wait_marker('slow', 30), 'the slow delivery completes');
$recv->control('mode=ok&delay_ms=0');

# the same for relay_outbox by hand (the procedure commits before delivering)
$node->safe_psql('postgres', q{ALTER SYSTEM SET resilience.relay_interval = 0; SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('resilience.relay_interval')}, '0');
$recv->control('mode=ok&delay_ms=3000');
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.xmin', '{"m": "slow-by-hand"}')});
my $caller = $node->background_psql('postgres');
my $caller_pid = $caller->query_safe('SELECT pg_backend_pid()');
$caller->query_until(qr/calling/, "\\echo calling\nCALL resilience.relay_outbox(1);\n");
ok($recv->wait_for(sub { 1 }, 1), 'CALL relay_outbox started');
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM pg_stat_activity WHERE pid = $caller_pid
		    AND query LIKE 'resilience relay: delivering%'}, '1'),
	'relay_outbox by hand is waiting for the slow endpoint');
is( $node->safe_psql('postgres', qq{
SELECT coalesce(backend_xid::text, 'none') || '/' || coalesce(backend_xmin::text, 'none')
  FROM pg_stat_activity WHERE pid = $caller_pid}),
	'none/none', 'and holds no transaction id and no snapshot meanwhile');
ok(wait_marker('slow-by-hand', 30), 'then delivers');
$caller->quit;
$recv->control('mode=ok&delay_ms=0');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET resilience.relay_interval; SELECT pg_reload_conf()});

# --- NOTIFY ---
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN notes');
my $nid = $node->safe_psql('postgres',
	q{SELECT resilience.outbox_publish('note.hello', '{"hello": "world"}', 'n-1', '{"X-A": "b"}')});
my $got = '';
for (1 .. 100)
{
	$got .= $listener->query_safe('SELECT 1');
	last if $got =~ /notes/;
	usleep(100_000);
}
like($got, qr/Asynchronous notification "notes" with payload "\{"id": $nid, "topic": "note.hello", "key": "n-1", "headers": \{"X-A": "b"\}, "payload": \{"hello": "world"\}\}"/,
	'a NOTIFY listener gets the event envelope');
$listener->quit;

$recv->stop;
$node->stop;
done_testing();
