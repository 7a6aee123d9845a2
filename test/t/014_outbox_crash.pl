# Crashes in the middle of relaying: kill -9 of the worker mid-batch, and
# pg_ctl stop -m immediate mid-backlog.  After each restart every committed
# event reaches the receiver at least once, within seconds; every delivery of
# an event carries the same Idempotency-Key (its id); nothing rolled back
# ever arrives.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use lib 'test/perl';
use OutboxReceiver;

my $node = PostgreSQL::Test::Cluster->new('outbox_crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
resilience.reaper_interval = 0
resilience.outbox_batch_size = 20
restart_after_crash = on
});
$node->start;
my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
CREATE TABLE published (m text PRIMARY KEY, id bigint);
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('crash.%', 'http', '@{[ $recv->url('/c') ]}', '{"timeout_ms": 20000}');
});

# Publish n events named prefix-i (half with keys), plus rolled-back ones.
sub publish
{
	my ($prefix, $n) = @_;
	$node->safe_psql('postgres', qq{
INSERT INTO published
SELECT '$prefix-' || i, resilience.outbox_publish('crash.ev', jsonb_build_object('m', '$prefix-' || i),
                                                 CASE WHEN i % 2 = 0 THEN 'key-' || (i % 7) END)
  FROM generate_series(1, $n) i;
BEGIN;
SELECT resilience.outbox_publish('crash.ev', jsonb_build_object('m', '$prefix-rolled-back-' || i))
  FROM generate_series(1, 5) i;
ROLLBACK;
});
}

# Check the receiver against table published for prefix.
sub check_delivered
{
	my ($prefix, $what, $since) = @_;
	my %ids = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres', qq{SELECT m || '|' || id FROM published WHERE m LIKE '$prefix-%'});
	my $all = $recv->wait_for(
		sub {
			my %ok = map { ($_->{body} =~ /"m": "([^"]+)"/)[0] => 1 } grep { $_->{status} == 200 } @{ $_[0] };
			!grep { !$ok{$_} } keys %ids;
		},
		60);
	ok($all, "$what: every committed event reached the receiver");
	# in-flight claims would expire only after 20 s + 30 s: the restarted
	# relay must release them at once
	$node->poll_query_until('postgres', q{SELECT count(*) FROM resilience.outbox}, '0');
	my $elapsed = time - $since;
	cmp_ok($elapsed, '<', 30,
		sprintf("$what: the outbox is drained within seconds of the restart (%.1f s)", $elapsed));
	my ($bad_key, $dups) = (0, 0);
	my %count;
	for my $r ($recv->records)
	{
		my ($m) = $r->{body} =~ /"m": "([^"]+)"/;
		next unless defined $m && $m =~ /^\Q$prefix\E-/;
		$count{$m}++;
		$bad_key++ if defined $ids{$m} && $r->{key} ne $ids{$m};
	}
	$dups = grep { $count{$_} > 1 } keys %count;
	is($bad_key, 0, "$what: every delivery carries the event id as Idempotency-Key ($dups delivered more than once)");
	is(scalar(grep { /rolled-back/ } keys %count), 0, "$what: nothing rolled back arrived");
}

sub worker_pid
{
	return $node->safe_psql('postgres',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'resilience worker'});
}

# --- kill -9 of the worker in the middle of a batch ---
$recv->control('mode=ok&delay_ms=1500');
publish('k9', 100);
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'resilience worker'
		    AND query LIKE 'resilience relay: delivering%'}, '1'),
	'the worker is in the middle of a batch');
ok($recv->wait_for(sub { scalar @{ $_[0] } > 0 }, 30), 'requests of the batch reached the receiver');
my $in_flight = $node->safe_psql('postgres',
	q{SELECT count(*) FROM resilience.outbox WHERE claimed_by LIKE 'relay:%'});
cmp_ok($in_flight, '>', 0, "events are claimed in flight ($in_flight)");
kill 'KILL', worker_pid();
$node->poll_query_until('postgres', 'SELECT 1', '1') or die 'no restart after kill -9';
ok($node->log_contains(qr/resilience worker.*was terminated by signal 9/), 'the kill was seen as a crash');
my $t0 = time;
$recv->control('mode=ok&delay_ms=0');
check_delivered('k9', 'kill -9 of the worker', $t0);

# --- immediate stop with a backlog in flight ---
$recv->control('mode=ok&delay_ms=1500');
publish('imm', 200);
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) > 0 FROM resilience.outbox WHERE claimed_by LIKE 'relay:%'}),
	'a batch is in flight');
$node->stop('immediate');
$recv->control('mode=ok&delay_ms=0');
$node->start;
$t0 = time;
check_delivered('imm', 'pg_ctl stop -m immediate', $t0);

$recv->stop;
$node->stop;
done_testing();
