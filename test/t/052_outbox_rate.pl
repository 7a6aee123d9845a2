# Per-route limits of the http sink:
#  - rate: a route of 20 requests/s (burst 2) with a backlog of 400 events
#    delivers 20/s, measured over 10 s (within 10%), whatever the backlog;
#  - max_in_flight: with a receiver that answers 200 ms late, a route of
#    max_in_flight 2 never has more than 2 requests at once (throughput
#    about 10/s), where an unlimited one runs 16 at once;
#  - both are the extension's own shared token bucket and bulkhead, but in
#    kinds of their own: not listed in resilience.rate_limits or
#    resilience.bulkheads, and a resilience_user role that calls rate_limit
#    or bulkhead_acquire_session with the route's name
#    (outbox:<database oid>:<route id>) spends only a key of its own: the
#    route goes on delivering while that role holds "its" permit and drains
#    "its" bucket.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
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
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'outbox:%'}),
	'0', "the route's token bucket is not a key of the rate_limits view");

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
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.bulkheads WHERE name LIKE 'outbox:%'}),
	'0', "the route's bulkhead is not in the bulkheads view");

# every permit was given back: the next requests run 2 at once again
my $tn = (sort { $b <=> $a } map { $_->{t} } $recv->records)[0];
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('narrow.e', jsonb_build_object('n', i)) FROM generate_series(31, 36) i});
ok($recv->wait_for(sub { (grep { $_->{path} eq '/narrow' && $_->{t} > $tn } @{ $_[0] }) >= 6 }, 60), 'six more deliver');
my @again = sort { $a <=> $b } map { $_->{t} } grep { $_->{path} eq '/narrow' && $_->{t} > $tn } $recv->records;
my $pairs = grep { $again[$_ + 1] - $again[$_] < 150 } 0 .. $#again - 1;
cmp_ok($pairs, '>=', 1, 'every in-flight permit was given back (two run at once again)');

# --- hostile neighbours: the route's name in rate_limit/bulkhead_acquire ---
$recv->control('delay_ms=0');
$node->safe_psql('postgres', qq{
CREATE ROLE mallory LOGIN IN ROLE resilience_user;
DELETE FROM resilience.outbox_routes;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('guarded.%', 'http', '@{[ $recv->url('/guarded') ]}', '{"rate": 5, "burst": 5, "max_in_flight": 1}');
});
my $name = $node->safe_psql('postgres', q{
	SELECT 'outbox:' || d.oid || ':' || r.id FROM pg_database d, resilience.outbox_routes r
	 WHERE d.datname = current_database() AND r.topic_pattern = 'guarded.%'});
# mallory holds the one permit of bulkhead $name and keeps bucket $name
# empty for 20 s
my $mallory_out = '';
my $mallory = IPC::Run::start(
	[ 'psql', '-XAtq', '-d', $node->connstr('postgres') . ' user=mallory', '-c',
	  "SELECT resilience.bulkhead_acquire_session('$name', 1); "
	  . "DO \$\$ BEGIN FOR i IN 1 .. 200 LOOP "
	  . "PERFORM resilience.rate_limit('$name', 5, 5) FROM generate_series(1, 10); "
	  . "PERFORM pg_sleep(0.1); END LOOP; END \$\$" ],
	'>', \$mallory_out, '2>', \$mallory_out);
ok($node->poll_query_until('postgres', qq{
	SELECT in_use = 1 FROM resilience.bulkheads WHERE name = '$name'}),
	"mallory holds the one permit of a bulkhead named like the route's");
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('guarded.e', jsonb_build_object('n', i)) FROM generate_series(1, 10) i});
ok($recv->wait_for(sub { (grep { $_->{path} eq '/guarded' } @{ $_[0] }) >= 10 }, 12),
	"the route delivers all 10 while mallory holds that permit and drains that bucket");
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity WHERE usename = 'mallory' AND state = 'active'}),
	'1', 'mallory was at it all along');
is($node->safe_psql('postgres', qq{SELECT allowed > 0 AND available < 5 FROM resilience.rate_limits WHERE key = '$name'}),
	't', "mallory's own bucket of that name is spent");
$node->safe_psql('postgres', q{SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = 'mallory'});
$mallory->finish;

$recv->stop;
$node->stop;
done_testing();
