# Per-route limits of the http sink:
#  - rate: a route of 20 requests/s (burst 2) with a backlog of 400 events
#    delivers 20/s, measured over 10 s (within 10%), whatever the backlog;
#  - max_in_flight: with a receiver that answers 200 ms late, a route of
#    max_in_flight 2 never has more than 2 requests at once (throughput
#    about 10/s), where an unlimited one runs 16 at once;
#  - both are the extension's own shared rate limit and bulkhead (visible
#    in resilience.rate_limits and resilience.bulkheads).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use lib 'test/perl';
use OutboxReceiver;

my $node = PostgreSQL::Test::Cluster->new('rate');
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
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options, enabled) VALUES
  ('rated.%', 'http', '@{[ $recv->url('/rated') ]}', '{"rate": 20, "burst": 2}', false);
});

# --- rate: 20/s over 10 s, however big the backlog ---
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('rated.e', jsonb_build_object('n', i)) FROM generate_series(1, 400) i});
$node->safe_psql('postgres', q{UPDATE resilience.outbox_routes SET enabled = true WHERE topic_pattern = 'rated.%'});
ok($recv->wait_for(sub { (grep { $_->{path} eq '/rated' } @{ $_[0] }) >= 260 }, 60), 'the rate-limited route delivers');
my @t = sort { $a <=> $b } map { $_->{t} } grep { $_->{path} eq '/rated' } $recv->records;
my $from = $t[10];    # after the burst
my $n = grep { $_ >= $from && $_ < $from + 10_000 } @t;
note("rate 20/s: $n requests in the 10 s after the burst");
cmp_ok($n, '>=', 180, 'at least 90% of the rate over 10 s');
cmp_ok($n, '<=', 220, 'at most 110% of the rate over 10 s');
like($node->safe_psql('postgres', q{SELECT string_agg(key, ',') FROM resilience.rate_limits}),
	qr/outbox:\d+:\d+/, "the route's token bucket is a shared rate limit");

# --- max_in_flight: 2 at once against a slow receiver ---
$recv->control('delay_ms=200');
$node->safe_psql('postgres', qq{
DELETE FROM resilience.outbox_routes;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('narrow.%', 'http', '@{[ $recv->url('/narrow') ]}', '{"max_in_flight": 2}'),
  ('wide.%', 'http', '@{[ $recv->url('/wide') ]}', '{}');
});
my $t0 = time;
$node->safe_psql('postgres', q{
SELECT resilience.outbox_publish('narrow.e', jsonb_build_object('n', i)) FROM generate_series(1, 30) i;
SELECT resilience.outbox_publish('wide.e', jsonb_build_object('n', i)) FROM generate_series(1, 30) i;
});
ok($recv->wait_for(sub { (grep { $_->{path} eq '/narrow' } @{ $_[0] }) >= 30 && (grep { $_->{path} eq '/wide' } @{ $_[0] }) >= 30 }, 60),
	'both routes deliver');

# the receiver logs a request when it arrives and answers 200 ms later:
# requests that arrived within 200 ms of each other were in flight together
sub max_concurrent
{
	my ($path) = @_;
	my @a = sort { $a <=> $b } map { $_->{t} } grep { $_->{path} eq $path } $recv->records;
	my $max = 0;
	for my $i (0 .. $#a)
	{
		my $c = grep { $_ >= $a[$i] && $_ < $a[$i] + 190 } @a;
		$max = $c if $c > $max;
	}
	return $max;
}
my $narrow = max_concurrent('/narrow');
my $wide = max_concurrent('/wide');
note("requests at once: max_in_flight 2: $narrow, unlimited: $wide");
cmp_ok($narrow, '<=', 2, 'max_in_flight 2: never more than 2 requests at once');
cmp_ok($wide, '>', 2, 'without it, more at once (the test can see concurrency)');
ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM resilience.outbox}), 'the outbox drains');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.bulkheads WHERE name LIKE 'outbox:%' AND in_use > 0}),
	'0', 'every in-flight permit is given back');

$recv->stop;
$node->stop;
done_testing();
