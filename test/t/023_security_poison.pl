# Poison input never stalls the others, and never leaks across tenants:
#  - events whose headers passed publication but are invalid at send (a CR/LF
#    that would inject a header, a name the transport reserves such as
#    Authorization, too many headers) are dead letters with a clear error,
#    and the 20 ordinary events after them (same key, same destination)
#    arrive; the receiver never sees the publisher's Authorization;
#  - an event header the route sets too is dropped: the route's value wins,
#    never both;
#  - a saga whose async command cannot be published (the route refuses its
#    payload) is isolated: it compensates with the error while 20 healthy
#    sagas started after it complete; a step name with a line break is
#    refused by saga_define;
#  - an answer body cut in the middle of a character (or not UTF-8 at all)
#    leaves a valid last_error;
#  - the relay's per-route statistics are per database: database other's
#    route 1 does not show postgres's route-1 counters.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use lib 'test/perl';
use OutboxReceiver;

my $node = PostgreSQL::Test::Cluster->new('poison');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres, other'
resilience.worker_naptime = '100ms'
resilience.relay_interval = '1h'
resilience.saga_interval = '1h'
resilience.reaper_interval = 0
resilience.outbox_breaker_failures = 100
});
$node->start;
my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);
my $hook = $recv->url('/hook');
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
SET log_statement = 'none';
INSERT INTO resilience.outbox_routes (id, topic_pattern, sink, target, options) VALUES
  (1, 'hook.%', 'http', '$hook',
   '{"headers": {"Authorization": "Bearer route-secret", "X-Route": "route"}, "max_attempts": 3,
     "backoff_base_ms": 100, "backoff_max_ms": 200}'),
  (2, 'cmd.bad', 'queue', 'bad', '{"payload": "array"}');
});
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM resilience.workers WHERE job = 'relay' AND runs > 0})
  or die 'the relay never ran';

sub marker
{
	my ($m) = @_;
	return grep { $_->{body} =~ /"m": "\Q$m\E"/ } $recv->records;
}

# --- poison events: valid at publication, invalid at send ---
# The rows are changed as if published before these checks existed (an
# upgrade) or by someone writing the table; deliver_after keeps the relay off
# them meanwhile.
my @poison = (
	[ 'crlf', q{{"X-A": "v\r\nAuthorization: Bearer attacker"}}, qr/line break|not allowed/ ],
	[ 'auth', q{{"Authorization": "Bearer attacker"}}, qr/Authorization/ ],
	[ 'many', '{' . join(', ', map { qq{"X-H$_": "v"} } 1 .. 100) . '}', qr/at most 64 headers|too many/ ],
);
my %pid;
for my $p (@poison)
{
	my ($name, $headers) = @$p;
	$pid{$name} = $node->safe_psql('postgres',
		qq{SELECT resilience.outbox_publish('hook.p', '{"m": "poison-$name"}', 'k', '{"X-A": "v"}', '3 s')});
	$node->safe_psql('postgres', qq{UPDATE resilience.outbox SET headers = '$headers' WHERE id = $pid{$name}});
}
my $collide = $node->safe_psql('postgres',
	q{SELECT resilience.outbox_publish('hook.p', '{"m": "collide"}', 'k', '{"X-Other": "1"}', '3 s')});
$node->safe_psql('postgres', qq{UPDATE resilience.outbox SET headers = '{"X-Route": "evil"}' WHERE id = $collide});
$node->safe_psql('postgres', q{
SELECT resilience.outbox_publish('hook.p', jsonb_build_object('m', 'ordinary-' || i), 'k', '{"X-N": "n"}')
  FROM generate_series(1, 20) i});

ok($recv->wait_for(sub { (grep { $_->{status} == 200 && $_->{body} =~ /"m": "ordinary-/ } @{ $_[0] }) >= 20 }, 60),
	'the 20 ordinary events after the poison ones arrive');
for my $p (@poison)
{
	my ($name, undef, $why) = @$p;
	ok( $node->poll_query_until('postgres',
			qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $pid{$name}}, '1'),
		"poison event ($name) is a dead letter");
	like($node->safe_psql('postgres', qq{SELECT last_error FROM resilience.outbox_dead_letters WHERE id = $pid{$name}}),
		$why, "... with a clear error ($name)");
	is(scalar(marker("poison-$name")), 0, "... and was never sent ($name)");
}
my @auth = map { $_->{x} =~ /authorization=([^&]*)/ ? $1 : '' } $recv->records;
is(scalar(grep { /attacker/ } @auth), 0, "the receiver never sees the publisher's Authorization");
is(scalar(grep { $_ ne 'Bearer route-secret' } @auth), 0, "every request carries the route's Authorization, once");
my ($c) = marker('collide');
ok($c, 'an event header the route also sets is delivered');
like($c ? $c->{x} : '', qr/(^|&)x-route=route(&|$)/, "... with the route's value only, never both");

# --- a poison saga does not stall the others ---
$node->safe_psql('postgres', q{
CREATE ROLE agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA app AUTHORIZATION agent;
SET ROLE agent;
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
SELECT resilience.saga_define('poison', '[
  {"name": "ask", "action": "async", "topic": "cmd.bad", "timeout": "1 h", "max_attempts": 1}]');
SELECT resilience.saga_define('healthy', '[
  {"name": "one", "action": "app.act"}, {"name": "two", "action": "app.act"}]');
RESET ROLE;
});
my $bad = $node->safe_psql('postgres', q{SELECT resilience.saga_start('poison', '{}')});
$node->safe_psql('postgres', q{SELECT resilience.saga_start('healthy', '{}') FROM generate_series(1, 20)});
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) FROM resilience.sagas WHERE name = 'healthy' AND state = 'completed'}, '20'),
	'20 healthy sagas started after a poison one complete');
is($node->safe_psql('postgres', qq{SELECT state <> 'running' FROM resilience.sagas WHERE id = $bad}),
	't', 'the poison saga is taken out of the way (failed and compensated)');
like($node->safe_psql('postgres', qq{SELECT error::text FROM resilience.sagas WHERE id = $bad}),
	qr/payload must be a JSON array/, '... with the error that stopped it');

my ($ret, $out, $err) = $node->psql('postgres', q{
SET ROLE agent;
SELECT resilience.saga_define('newline', jsonb_build_array(
  jsonb_build_object('name', E'x\ny', 'action', 'async', 'topic', 'cmd.x')))});
isnt($ret, 0, 'saga_define refuses a step name with a line break');
like($err, qr/step name/, '... saying what is wrong with it');

# --- last_error is valid text whatever the endpoint answers ---
# 119 ASCII bytes then a two-byte character: the 120-byte snippet cuts it
my $cut = unpack('H*', ('a' x 119) . "\xc3\xa9" . ('b' x 20));
$recv->control("mode=fail&status=400&match=cut-char&body_hex=$cut");
my $cid = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.u', '{"m": "cut-char"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $cid}, '1'),
	'an event answered 400 is a dead letter');
my ($rc, $valid) = $node->psql('postgres',
	qq{SELECT length(convert_to(last_error, 'UTF8')) FROM resilience.outbox_dead_letters WHERE id = $cid});
is($rc, 0, 'its last_error, cut from an answer in the middle of a character, is valid UTF-8');
$recv->control('mode=fail&status=400&match=bad-bytes&body_hex=' . unpack('H*', "nope \xff\xfe\xc3 end"));
my $bid = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('hook.u', '{"m": "bad-bytes"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $bid}, '1'),
	'an event answered 400 with bytes that are not UTF-8 is a dead letter');
($rc, $valid) = $node->psql('postgres',
	qq{SELECT convert_from(convert_to(last_error, 'UTF8'), 'UTF8') FROM resilience.outbox_dead_letters WHERE id = $bid});
is($rc, 0, 'its last_error is valid UTF-8');
like($valid, qr/nope .* end/, '... and keeps the readable part of the answer');
($rc, $valid) = $node->psql('postgres',
	q{SELECT length(convert_to(last_error, 'UTF8')) FROM resilience.outbox_status WHERE route_id = 1});
is($rc, 0, 'the status view shows a valid last_error too');
$recv->control('mode=ok');

# --- relay statistics are per database ---
my $delivered = $node->safe_psql('postgres', q{SELECT delivered FROM resilience.outbox_status WHERE route_id = 1});
cmp_ok($delivered, '>=', 20, "postgres's route 1 has delivered events");
$node->safe_psql('postgres', 'CREATE DATABASE other');
$node->safe_psql('other', qq{
CREATE EXTENSION resilience;
INSERT INTO resilience.outbox_routes (id, topic_pattern, sink, target) VALUES (1, 'o.%', 'http', '@{[ $recv->url('/other') ]}');
});
is($node->safe_psql('other', q{SELECT coalesce(delivered, 0) || '/' || coalesce(last_error, 'none')
  FROM resilience.outbox_status WHERE route_id = 1}),
	'0/none', "database other's route 1 does not show postgres's route-1 counters");
$node->safe_psql('other', q{SELECT resilience.outbox_publish('o.x', '{"m": "other-db"}')});
ok($recv->wait_for(sub { grep { $_->{body} =~ /other-db/ } @{ $_[0] } }, 30), "other's event is delivered");
ok($node->poll_query_until('other', q{SELECT delivered FROM resilience.outbox_status WHERE route_id = 1}, '1'),
	"other's route 1 counts its own delivery");
is($node->safe_psql('postgres', q{SELECT delivered FROM resilience.outbox_status WHERE route_id = 1}),
	$delivered, "and postgres's route 1 does not count it");

$recv->stop;
$node->stop;
done_testing();
