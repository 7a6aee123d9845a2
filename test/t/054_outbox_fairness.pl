# Fair sharing (route option partition_by): with tenant A's 50,000-event
# backlog queued first, tenant B's 100 events published afterwards are all
# delivered before A's backlog is half done; per-key order still holds
# (each key's events arrive in publication order).  Without partition_by,
# B's events would wait behind all of A's.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use OutboxReceiver;

my $node = PostgreSQL::Test::Cluster->new('fairness');
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
  ('tenant.%', 'http', '@{[ $recv->url('/fair') ]}', '{"partition_by": "\$.tenant"}', false);
});
$node->safe_psql('postgres', q{
SELECT count(resilience.outbox_publish('tenant.a', jsonb_build_object('tenant', 'A', 'n', i), 'a-' || (i % 50)))
  FROM generate_series(1, 50000) i;
});
$node->safe_psql('postgres', q{
SELECT count(resilience.outbox_publish('tenant.b', jsonb_build_object('tenant', 'B', 'n', i), 'b-' || (i % 10)))
  FROM generate_series(1, 100) i;
UPDATE resilience.outbox_routes SET enabled = true;
});

sub tenant_count
{
	my ($t, $recs) = @_;
	return scalar grep { $_->{status} == 200 && $_->{body} =~ /"tenant": "$t"/ } @$recs;
}
ok($recv->wait_for(sub { tenant_count('B', $_[0]) >= 100 }, 120), "all of B's 100 events are delivered");
my @recs = $recv->records;
my ($last_b) = (grep { $recs[$_]{body} =~ /"tenant": "B"/ } 0 .. $#recs)[-1];
my $a_before = tenant_count('A', [ @recs[ 0 .. $last_b ] ]);
note("A's events delivered before B's last: $a_before of 50000");
cmp_ok($a_before, '<', 25000, "B's events all arrive before A's backlog is half done");
$node->safe_psql('postgres', q{UPDATE resilience.outbox_routes SET enabled = false});

# per key, arrival order is publication order (n grows)
my (%last, $inversions, $checked);
for my $r (grep { $_->{status} == 200 } $recv->records)
{
	my ($t, $n) = $r->{body} =~ /"n": (\d+), "tenant": "(\w)"/ ? ($2, $1) : next;
	my $key = $t . ($t eq 'A' ? $n % 50 : $n % 10);
	$checked++;
	$inversions++ if defined $last{$key} && $n < $last{$key};
	$last{$key} = $n;
}
cmp_ok($checked // 0, '>=', 100, "the order of every delivered event is checked ($checked)");
is($inversions // 0, 0, 'per-key order holds');

$recv->stop;
$node->stop;
done_testing();
