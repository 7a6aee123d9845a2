# Outbox destinations with an allow-list (resilience.outbox_allowed_hosts):
#  - a listed host name that resolves to a loopback address (localhost) is
#    refused at connect time: the event is a dead letter whose error names
#    the address, and nothing reaches the endpoint;
#  - once a CIDR entry (127.0.0.0/8, ::1/128) allows that range, the same
#    event (redriven) is delivered;
#  - an http_proxy variable in the server's environment is not used; a route
#    that asks for a proxy (option "proxy") gets it.
# Network: loopback only; a refused address is refused before any socket.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use OutboxReceiver;

my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);
my $proxy_dir = "$PostgreSQL::Test::Utils::tmp_check/proxy";
mkdir $proxy_dir;
my $proxy = OutboxReceiver->new($proxy_dir);

my $node = PostgreSQL::Test::Cluster->new('ssrf');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.relay_interval = '1h'
resilience.reaper_interval = 0
resilience.outbox_allowed_hosts = 'localhost'
});
{
	# the server starts with a proxy in its environment
	local $ENV{http_proxy} = $proxy->url('');
	local $ENV{HTTP_PROXY} = $proxy->url('');
	local $ENV{https_proxy} = $proxy->url('');
	local $ENV{ALL_PROXY} = $proxy->url('');
	$node->start;
}
my $port = $recv->port;
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
INSERT INTO resilience.outbox_routes (id, topic_pattern, sink, target, options) VALUES
  (1, 'ssrf.%', 'http', 'http://localhost:$port/ssrf', '{"max_attempts": 1}');
});

# --- a listed name that resolves to loopback: refused, naming the address ---
my $id = $node->safe_psql('postgres', q{SELECT resilience.outbox_publish('ssrf.a', '{"m": "loopback-name"}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) FROM resilience.outbox_dead_letters WHERE id = $id}, '1'),
	'an event to a listed host that resolves to loopback is a dead letter');
like($node->safe_psql('postgres', qq{SELECT last_error FROM resilience.outbox_dead_letters WHERE id = $id}),
	qr/(127\.0\.0\.1|::1).*not allowed|not allowed.*(127\.0\.0\.1|::1)/, '... with an error naming the address');
is(scalar($recv->records) + scalar($proxy->records), 0, '... and nothing reached the endpoint or the proxy');

# --- a CIDR entry allows the range ---
$node->safe_psql('postgres', q{
ALTER SYSTEM SET resilience.outbox_allowed_hosts = 'localhost, 127.0.0.0/8, ::1/128';
SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('resilience.outbox_allowed_hosts') LIKE '%/8%'});
$node->safe_psql('postgres', qq{SELECT resilience.outbox_redrive(ARRAY[$id]::bigint[])});
ok($recv->wait_for(sub { grep { $_->{body} =~ /loopback-name/ && $_->{status} == 200 } @{ $_[0] } }, 30),
	'once 127.0.0.0/8 is listed, the redriven event is delivered');
is(scalar($proxy->records), 0, "the http_proxy of the server's environment is not used");
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.outbox_dead_letters}), '0', 'no dead letter left');

# --- a route may ask for a proxy ---
my $purl = $proxy->url('');
$node->safe_psql('postgres', qq{
INSERT INTO resilience.outbox_routes (id, topic_pattern, sink, target, options) VALUES
  (2, 'via.%', 'http', 'http://localhost:$port/via', '{"proxy": "$purl"}');
SELECT resilience.outbox_publish('via.a', '{"m": "via-proxy"}');
});
ok($proxy->wait_for(sub { grep { $_->{body} =~ /via-proxy/ } @{ $_[0] } }, 30),
	'a route with option "proxy" is sent through that proxy');
my ($ret, $out, $err) = $node->psql('postgres', q{
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('x.%', 'http', 'http://localhost/x', '{"proxy": "http://proxy.example.com:3128"}')});
like($err, qr/proxy.*not allowed/, 'a proxy host that is not allowed is refused');

$recv->stop;
$proxy->stop;
$node->stop;
done_testing();
