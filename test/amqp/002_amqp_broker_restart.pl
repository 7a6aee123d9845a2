# The broker stopped for 10 s in the middle of a stream of events, then
# started again: the relay's connection is lost, its attempts fail, the
# destination's breaker opens, probes reconnect once the broker is back,
# and every committed event arrives (durable queue, persistent messages),
# per key in commit order; an event delivered more than once always carries
# the same message id (its event id).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(usleep time);
use lib 'test/perl';
use AmqpBroker;

my $node = PostgreSQL::Test::Cluster->new('amqp_restart');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
resilience.reaper_interval = 0
resilience.outbox_breaker_failures = 3
resilience.outbox_breaker_open_time = '1s'
track_commit_timestamp = on
});
$node->start;

my $broker = AmqpBroker->new("$PostgreSQL::Test::Utils::tmp_check/rabbit_restart");
note(sprintf('RabbitMQ node started in %.1f s', $broker->startup_seconds));
$broker->client('declare', 'stream', 'restart', 'restart.#');
my $consumer = $broker->consumer('restart', 'restart');
my $target = 'amqp://guest:guest@localhost:' . $broker->port;
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
CREATE TABLE published (id bigint PRIMARY KEY, k int, xid text);
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('restart.%', 'amqp', '$target',
   '{"exchange": "stream", "max_attempts": 1000, "backoff_base_ms": 100, "backoff_max_ms": 1000,
     "timeout_ms": 3000, "connect_timeout_ms": 1000}');
});

# 2 producers at 200 events/s for 25 s, on 10 keys
my $script = "$PostgreSQL::Test::Utils::tmp_check/002_publish.sql";
open(my $fh, '>', $script) or die $!;
print $fh q{
\set k random(1, 10)
BEGIN;
INSERT INTO published
SELECT resilience.outbox_publish('restart.ev', jsonb_build_object('k', :k, 'xid', txid_current()::text), 'key-' || :k),
       :k, txid_current()::text;
COMMIT;
};
close $fh;
my ($out, $err) = ('', '');
my $pgbench = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '2', '-j', '2', '-R', '200', '-T', '25', '-f', $script,
	  '-h', $node->host, '-p', $node->port, 'postgres' ],
	'>', \$out, '2>', \$err);

ok($consumer->wait_for(sub { scalar @{ $_[0] } >= 500 }, 30), 'events flow to the consumer');
my $offset = -s $node->logfile;
$broker->stop;
my $stopped_at = time;
note('broker stopped');
ok( $node->poll_query_until('postgres',
		q{SELECT breaker = 'open' OR breaker = 'half_open' FROM resilience.outbox_status WHERE topic_pattern = 'restart.%'}),
	'while the broker is down, the breaker opens');
my $backlog = $node->safe_psql('postgres', q{SELECT count(*) FROM resilience.outbox});
cmp_ok($backlog, '>', 0, "events wait in the outbox ($backlog)");
usleep(int((10 - (time - $stopped_at)) * 1e6)) if time - $stopped_at < 10;
$broker->start;
note(sprintf('broker started again after %.1f s down', time - $stopped_at));
$pgbench->finish;
like($out, qr/number of failed transactions: 0 /, 'the producers never failed') or diag($err);

my %published = map { my ($i, $k, $x) = split /\|/; ($i => [ $k, $x ]) } split /\n/,
  $node->safe_psql('postgres', q{SELECT id || '|' || k || '|' || xid FROM published});
my $n = scalar(keys %published);
cmp_ok($n, '>=', 3000, "$n events published across the outage");
ok( $consumer->wait_for(
		sub { my %ids = map { $_->{id} => 1 } @{ $_[0] }; !grep { !$ids{$_} } keys %published }, 120),
	'every committed event arrives after the broker is back');
ok($node->poll_query_until('postgres', q{SELECT count(*) FROM resilience.outbox}, '0'), 'the outbox is drained');
ok($node->log_contains(qr/breaker for amqp:\/\/localhost:\d+ opened/, $offset), 'the breaker opening is logged');
ok($node->log_contains(qr/breaker for amqp:\/\/localhost:\d+ closed/, $offset), 'and its closing once a probe got through');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.outbox_dead_letters}), '0', 'no dead letters');

my (%count, @order, $wrong_id);
$wrong_id = 0;
for my $r ($consumer->records)
{
	my ($k) = $r->{body} =~ /"k": (\d+)/;
	my ($xid) = $r->{body} =~ /"xid": "(\d+)"/;
	my $p = $published{ $r->{id} };
	$wrong_id++ unless $p && $p->[0] == $k && $p->[1] eq $xid;
	push @order, [ $k, $xid ] unless $count{ $r->{id} }++;
}
is($wrong_id, 0, 'every delivery, duplicates included, carries the id of the event it carries');
my $dups = grep { $count{$_} > 1 } keys %count;
note("$dups events delivered more than once");
my %pos;
my $values = join(',', map { my $k = $_->[0]; "($k, $_->[1], " . ($pos{$k}++) . ')' } @order);
is( $node->safe_psql('postgres', qq{
SELECT count(*) FROM (
  SELECT pg_xact_commit_timestamp(xid::text::xid) AS ts,
         lag(pg_xact_commit_timestamp(xid::text::xid)) OVER (PARTITION BY k ORDER BY pos) AS prev
    FROM (VALUES $values) v(k, xid, pos)) s
 WHERE ts < prev}), '0', 'per key, first deliveries are in commit order');

$consumer->stop;
$broker->shutdown;
$node->stop;
done_testing();
