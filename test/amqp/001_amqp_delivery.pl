# The relay publishing to a real RabbitMQ node (test/perl/AmqpBroker.pm:
# a private node on loopback) with publisher confirms, read back by a
# consumer (test/amqp_consumer.py):
#  - message properties: message id = event id, type = topic, persistent,
#    content type, headers from the event (W3C trace context included),
#    routing key from the template;
#  - woken on commit (the safety poll is an hour here);
#  - 10,000 events on 20 keys from 4 producers: all arrive, per key in
#    commit order, each under its own event id, over the one connection
#    the relay keeps across batches;
#  - an unroutable message (mandatory) is retried, then dead-lettered, and
#    does not open the broker's breaker; so is a message the broker nacks
#    (a full queue with x-overflow reject-publish);
#  - an unknown exchange is a dead letter at the first attempt; an exchange
#    deleted after use too, at the next attempt;
#  - refused credentials are retried without opening the breaker that
#    the broker's other routes share; the password shows nowhere but in
#    the routes table (which only resilience_admin may read);
#  - with an allow-list, a listed name that resolves to loopback is refused
#    (a dead letter naming the address) until a CIDR entry allows it.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use lib 'test/perl';
use AmqpBroker;

my $node = PostgreSQL::Test::Cluster->new('amqp');
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

my $broker = AmqpBroker->new("$PostgreSQL::Test::Utils::tmp_check/rabbit_delivery");
note(sprintf('RabbitMQ node %s on port %d started in %.1f s',
		$broker->node, $broker->port, $broker->startup_seconds));
$broker->ctl('rabbitmqctl', q{add_user relay 'Pa55-relay-secret'});
$broker->ctl('rabbitmqctl', q{set_permissions -p / relay '.*' '.*' '.*'});
$broker->client('declare', 'events', 'orders', 'orders.#');
$broker->client('declare', 'events', 'load', 'load.#');
$broker->client('declare', 'temp', 'temp', '#');
$broker->client('--max-length', '0', 'declare', 'events', 'full', 'full.#');
my $orders = $broker->consumer('orders', 'orders');
my $load = $broker->consumer('load', 'load');

my $target = 'amqp://relay:Pa55-relay-secret@127.0.0.1:' . $broker->port . '/%2f';
my $bad_target = 'amqp://relay:Wr0ng-secret@127.0.0.1:' . $broker->port;
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
CREATE TABLE published (id bigint PRIMARY KEY, k int, xid text);
SET log_statement = 'none';
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('orders.%', 'amqp', '$target', '{"exchange": "events"}'),
  ('load.%', 'amqp', '$target', '{"exchange": "events", "routing_key": "load.{key}"}'),
  ('lost.%', 'amqp', '$target',
   '{"exchange": "events", "max_attempts": 3, "backoff_base_ms": 50, "backoff_max_ms": 200}'),
  ('full.%', 'amqp', '$target',
   '{"exchange": "events", "max_attempts": 3, "backoff_base_ms": 50, "backoff_max_ms": 200}'),
  ('nowhere.%', 'amqp', '$target', '{"exchange": "no_such_exchange"}'),
  ('temp.%', 'amqp', '$target', '{"exchange": "temp", "backoff_base_ms": 50, "backoff_max_ms": 200}'),
  ('refused.%', 'amqp', '$bad_target', '{"backoff_base_ms": 100, "backoff_max_ms": 500}');
});
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM resilience.workers WHERE job = 'relay' AND runs > 0})
  or die 'the relay never ran';

sub route_of
{
	my ($pattern) = @_;
	return $node->safe_psql('postgres',
		qq{SELECT id FROM resilience.outbox_routes WHERE topic_pattern = '$pattern'});
}

# --- one event: properties, headers, body; woken on commit ---
my $t0 = time;
my $id = $node->safe_psql('postgres',
	q{SELECT resilience.outbox_publish('orders.created', '{"m": "basic", "n": 1}', 'o-1', '{"X-Trace": "t-1"}',
	    traceparent => '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', tracestate => 'congo=t61rcWkgMzE')});
ok($orders->wait_for(sub { grep { $_->{body} =~ /"basic"/ } @{ $_[0] } }, 10), 'a published event arrives');
my $latency = time - $t0;
ok($latency < 5, sprintf('woken on commit: arrived in %.3f s with a one-hour safety poll', $latency));
my ($m) = grep { $_->{body} =~ /"basic"/ } $orders->records;
is($m->{id}, $id, 'message id is the event id');
is($m->{body}, '{"m": "basic", "n": 1}', 'the body is the payload');
is($m->{exchange}, 'events', 'published to the route\'s exchange');
is($m->{routing_key}, 'orders.created', 'routing key: the default template {topic}');
is($m->{type}, 'orders.created', 'type is the topic');
is($m->{content_type}, 'application/json', 'content type application/json');
is($m->{delivery_mode}, 2, 'persistent delivery mode');
is($m->{app_id}, 'resilience', 'app id');
is($m->{headers}{'X-Trace'}, 't-1', 'the event headers are message headers');
is($m->{headers}{traceparent}, '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
	'the trace context is in the message headers: traceparent');
is($m->{headers}{tracestate}, 'congo=t61rcWkgMzE', 'and tracestate');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.outbox}), '0',
	'a confirmed event leaves the outbox');

# The relay's connections as the broker sees them: "connected_at" of each
# connection logged in as relay.
sub relay_connections
{
	my ($rc, $out) = $broker->ctl('rabbitmqctl', '--quiet --no-table-headers list_connections user connected_at');
	die "rabbitmqctl list_connections failed: $out" if $rc;
	return sort map { (split /\s+/)[1] } grep { /^relay\s/ } split /\n/, $out;
}
my @connections_before = relay_connections();
is(scalar(@connections_before), 1, 'the relay holds one connection to the broker');

# --- 10,000 events, 20 keys, 4 producers: all arrive, per key in commit order ---
$node->pgbench(
	'-n -c 4 -j 2 -t 2500',
	0,
	[qr{processed: 10000/10000}],
	[qr{^$}],
	'4 producers publish 10,000 events on 20 keys',
	{
		'001_amqp_load' => q{
\set k random(1, 20)
BEGIN;
INSERT INTO published
SELECT resilience.outbox_publish('load.ev', jsonb_build_object('k', :k, 'xid', txid_current()::text), 'key-' || :k),
       :k, txid_current()::text;
COMMIT;
}
	});
my %published = map { my ($i, $k, $x) = split /\|/; ($i => [ $k, $x ]) } split /\n/,
  $node->safe_psql('postgres', q{SELECT id || '|' || k || '|' || xid FROM published});
is(scalar(keys %published), 10000, '10,000 events published');
$t0 = time;
ok( $load->wait_for(
		sub { my %ids = map { $_->{id} => 1 } @{ $_[0] }; scalar(keys %ids) >= 10000 }, 240),
	'all 10,000 events arrive');
note(sprintf('10,000 events drained in about %.1f s', time - $t0));
my (%first, @order, $wrong_id, $wrong_key, $dups);
($wrong_id, $wrong_key, $dups) = (0, 0, 0);
for my $r ($load->records)
{
	my ($k) = $r->{body} =~ /"k": (\d+)/;
	my ($xid) = $r->{body} =~ /"xid": "(\d+)"/;
	my $p = $published{ $r->{id} };
	$wrong_id++ unless $p && $p->[0] == $k && $p->[1] eq $xid;
	$wrong_key++ unless $r->{routing_key} eq "load.key-$k";
	if ($first{ $r->{id} }++) { $dups++; next; }
	push @order, [ $k, $xid ];
}
is($wrong_id, 0, 'every message carries the id of the event whose payload it carries');
is($wrong_key, 0, 'routing keys follow the template load.{key}');
note("$dups duplicate deliveries");
my %pos;
my $values = join(',', map { my $k = $_->[0]; "($k, $_->[1], " . ($pos{$k}++) . ')' } @order);
my $out_of_order = $node->safe_psql('postgres', qq{
SELECT count(*) FROM (
  SELECT pg_xact_commit_timestamp(xid::text::xid) AS ts,
         lag(pg_xact_commit_timestamp(xid::text::xid)) OVER (PARTITION BY k ORDER BY pos) AS prev
    FROM (VALUES $values) v(k, xid, pos)) s
 WHERE ts < prev});
is($out_of_order, '0', 'per key, events arrive in commit order');
is_deeply([ relay_connections() ], \@connections_before,
	'the same connection carried every batch (reused, not reopened)');

# --- unroutable with mandatory: retried, then a dead letter; the breaker stays closed ---
my $offset = -s $node->logfile;
my $lost = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('lost.x', '{"m": "lost"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $lost}, '1'),
	'an unroutable message becomes a dead letter');
my $route = route_of('lost.%');
like(
	$node->safe_psql('postgres',
		qq{SELECT attempts || ' ' || last_error FROM resilience.outbox_dead_letters WHERE id = $lost}),
	qr/^3 returned by amqp:\/\/127\.0\.0\.1:\d+ as unroutable: 312 NO_ROUTE/,
	'after max_attempts (3) attempts, each returned as unroutable (312 NO_ROUTE)');
ok($node->log_contains(qr/event $lost .* is a dead letter after 3 attempts: returned by/, $offset),
	'the dead letter is logged');
is($node->safe_psql('postgres', qq{SELECT breaker FROM resilience.outbox_status WHERE route_id = $route}),
	'closed', 'returned messages do not open the breaker of a broker that answers');
ok(!$node->log_contains(qr/breaker for amqp:.* opened/, $offset), 'no breaker opened');

# --- nacked (a queue that rejects publishes): retried, then a dead letter; the breaker stays closed ---
$offset = -s $node->logfile;
my $full = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('full.x', '{"m": "full"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $full}, '1'),
	'a message the broker nacks becomes a dead letter');
like(
	$node->safe_psql('postgres',
		qq{SELECT attempts || ' ' || last_error FROM resilience.outbox_dead_letters WHERE id = $full}),
	qr/^3 amqp:\/\/127\.0\.0\.1:\d+ refused the message \(basic\.nack\)$/,
	'after max_attempts (3) attempts, each nacked');
is($broker->client('count', 'full'), '0', 'the full queue took none of them');
is($node->safe_psql('postgres', q{SELECT breaker FROM resilience.outbox_status WHERE topic_pattern = 'full.%'}),
	'closed', 'nacks do not open the breaker the broker\'s other routes share');
ok(!$node->log_contains(qr/breaker for amqp:.* opened/, $offset), 'no breaker opened');

# --- unknown exchange: a dead letter at once ---
my $nowhere = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('nowhere.x', '{"m": "nowhere"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $nowhere}, '1'),
	'an event for an exchange that does not exist becomes a dead letter');
is( $node->safe_psql('postgres',
		qq{SELECT attempts || ' ' || last_error FROM resilience.outbox_dead_letters WHERE id = $nowhere}),
	'1 exchange "no_such_exchange" does not exist on amqp://127.0.0.1:' . $broker->port
	  . ' (checked with a passive exchange.declare)',
	'at the first attempt, saying which exchange is missing');

# --- an exchange deleted after it was used: a dead letter at the next attempt ---
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('temp.one', '{"m": "temp-1"}')});
ok( $node->poll_query_until('postgres', q{SELECT count(*) FROM resilience.outbox WHERE topic LIKE 'temp.%'}, '0'),
	'an event for exchange temp is confirmed');
$broker->client('delete-exchange', 'temp');
my $gone = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('temp.two', '{"m": "temp-2"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $gone}, '1'),
	'after the exchange is deleted, the next event becomes a dead letter');
like($node->safe_psql('postgres', qq{SELECT attempts || ' ' || last_error FROM resilience.outbox_dead_letters WHERE id = $gone}),
	qr/^2 exchange "temp" does not exist/,
	'its first attempt closed the channel (404), the second found the exchange missing');
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('orders.after', '{"m": "after-404"}')});
ok($orders->wait_for(sub { grep { $_->{body} =~ /after-404/ } @{ $_[0] } }, 10),
	'the connection recovers from the closed channel');

# --- refused credentials: retried; the password is shown nowhere ---
$offset = -s $node->logfile;
my $refused = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('refused.x', '{"m": "refused"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT attempts >= 5 FROM resilience.outbox WHERE id = $refused}),
	'an event whose route has wrong credentials is retried');
like($node->safe_psql('postgres', qq{SELECT last_error FROM resilience.outbox WHERE id = $refused}),
	qr/logging in to amqp:\/\/127\.0\.0\.1:\d+: connection closed by the broker: 403 ACCESS_REFUSED/,
	'with the broker\'s refusal as the error');
is( $node->safe_psql('postgres',
		q{SELECT string_agg(DISTINCT breaker, ',') FROM resilience.outbox_status WHERE target LIKE 'amqp:%'}),
	'closed',
	'refused logins (5, more than outbox_breaker_failures) do not open the breaker the broker\'s other routes share');
ok(!$node->log_contains(qr/breaker for amqp:.* opened/, $offset), 'no breaker opened');
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('orders.refused', '{"m": "while-refused"}')});
ok($orders->wait_for(sub { grep { $_->{body} =~ /while-refused/ } @{ $_[0] } }, 10),
	'the routes that log in keep delivering');
my $status = $node->safe_psql('postgres', q{SELECT string_agg(concat_ws(' ', target, last_error), ' ') FROM resilience.outbox_status});
like($status, qr/amqp:\/\/127\.0\.0\.1:\d+/, 'outbox_status shows the targets');
unlike($status, qr/secret|relay:/, 'without user or password');
unlike(slurp_file($node->logfile), qr/secret/, 'the server log never shows a password');
$node->safe_psql('postgres', q{CREATE ROLE app LOGIN IN ROLE resilience_user});
my ($rc, $stdout, $stderr) = $node->psql('postgres', 'SELECT target FROM resilience.outbox_routes',
	extra_params => [ '-U', 'app' ]);
like($stderr, qr/permission denied/, 'resilience_user cannot read the routes (and their credentials)');
($rc, $stdout, $stderr) = $node->psql('postgres', 'SELECT target FROM resilience.outbox_status',
	extra_params => [ '-U', 'app' ]);
like($stderr, qr/permission denied/, 'nor the status view');
$node->safe_psql('postgres', q{DELETE FROM resilience.outbox_routes WHERE topic_pattern = 'refused.%'});

# --- the address policy: a listed name that resolves to loopback is refused ---
$node->safe_psql('postgres', q{
ALTER SYSTEM SET resilience.outbox_allowed_hosts = 'localhost';
SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('resilience.outbox_allowed_hosts')}, 'localhost');
my $local_target = 'amqp://relay:Pa55-relay-secret@localhost:' . $broker->port . '/%2f';
$node->safe_psql('postgres', qq{
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('ssrf.%', 'amqp', '$local_target', '{"exchange": "events", "routing_key": "orders.{topic}", "max_attempts": 1}')});
my $ssrf = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('ssrf.x', '{"m": "via-localhost"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $ssrf}, '1'),
	'amqp: a listed host that resolves to loopback is a dead letter');
like($node->safe_psql('postgres', qq{SELECT last_error FROM resilience.outbox_dead_letters WHERE id = $ssrf}),
	qr/address (127\.0\.0\.1|::1) not allowed/, '... naming the address');
$node->safe_psql('postgres', q{
ALTER SYSTEM SET resilience.outbox_allowed_hosts = 'localhost, 127.0.0.0/8, ::1/128';
SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('resilience.outbox_allowed_hosts') LIKE '%/8%'});
$node->safe_psql('postgres', qq{SELECT resilience.outbox_redrive(ARRAY[$ssrf]::bigint[])});
ok($orders->wait_for(sub { grep { $_->{body} =~ /via-localhost/ } @{ $_[0] } }, 30),
	'amqp: once a CIDR entry allows the range, it is delivered');

$orders->stop;
$load->stop;
$broker->shutdown;
$node->stop;
done_testing();
