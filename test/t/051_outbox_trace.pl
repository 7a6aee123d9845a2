# W3C trace context end to end through the http sink: the traceparent and
# tracestate an application sets with SET LOCAL resilience.traceparent (or
# passes to outbox_publish) arrive as HTTP headers with the event; an event
# published without one carries none.  (Through AMQP: test/amqp/001.)
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use OutboxReceiver;

my $node = PostgreSQL::Test::Cluster->new('trace');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
resilience.relay_interval = '1h'
resilience.reaper_interval = 0
});
$node->start;
my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES
  ('traced.%', 'http', '@{[ $recv->url('/traced') ]}');
});

my $tp1 = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
my $tp2 = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00';
$node->safe_psql('postgres', qq{
BEGIN;
SET LOCAL resilience.traceparent = '$tp1';
SET LOCAL resilience.tracestate = 'congo=t61rcWkgMzE,rojo=00f067aa0ba902b7';
SELECT resilience.outbox_publish('traced.setting', '{"m": "setting"}');
COMMIT;
SELECT resilience.outbox_publish('traced.arg', '{"m": "argument"}', traceparent => '$tp2');
SELECT resilience.outbox_publish('traced.none', '{"m": "none"}');
});
ok($recv->wait_for(sub { (grep { $_->{path} eq '/traced' && $_->{status} == 200 } @{ $_[0] }) >= 3 }, 30),
	'the three events are delivered');
my %by = map { ($_->{body} =~ /"m": "(\w+)"/)[0] => $_ } grep { $_->{path} eq '/traced' } $recv->records;
like($by{setting}{x}, qr/(^|&)traceparent=\Q$tp1\E(&|$)/, 'SET LOCAL resilience.traceparent: sent as the traceparent header');
like($by{setting}{x}, qr/(^|&)tracestate=congo=t61rcWkgMzE,rojo=00f067aa0ba902b7(&|$)/,
	'resilience.tracestate: sent as the tracestate header');
like($by{argument}{x}, qr/(^|&)traceparent=\Q$tp2\E(&|$)/, 'the traceparent argument: sent as the traceparent header');
unlike($by{argument}{x}, qr/tracestate=/, 'no tracestate when none was given');
unlike($by{none}{x}, qr/trace/, 'an event published without trace context carries none (SET LOCAL ended with its transaction)');

$recv->stop;
$node->stop;
done_testing();
