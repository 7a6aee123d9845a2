# outbox_claim(..., wait) is a long poll (several clients at once):
#  - a consumer that finds nothing sleeps (wait event ResilienceOutboxClaim,
#    or Extension before PostgreSQL 17) and is woken by the commit of an
#    event for it: it returns the event within a second, not at the end of
#    its 30 s wait;
#  - a rolled-back event wakes nobody for good: the claim waits its whole
#    wait and returns nothing;
#  - an event for another consumer does not end the wait either;
#  - 20 consumers idling in a long poll use no CPU to speak of.
# (test/specs/outbox_longpoll.spec shows the first three as an isolation
# spec; this test adds the CPU of idle waiters.)
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(usleep time);

my $node = PostgreSQL::Test::Cluster->new('longpoll');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.relay_interval = '1h'
resilience.reaper_interval = 0
max_connections = 60
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES
  ('lp.%', 'queue', 'lp'), ('other.%', 'queue', 'other');
});

# start a claim in its own psql; returns [handle, \$out, start time]
sub start_claim
{
	my ($consumer, $wait) = @_;
	my $out = '';
	my $h = IPC::Run::start(
		[ 'psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
		  "SELECT coalesce(string_agg(payload->>'n', ','), '') FROM resilience.outbox_claim('$consumer', 10, '1 minute', wait => '$wait')" ],
		'>', \$out, '2>', \$out);
	return [ $h, \$out, time ];
}

sub finish_claim
{
	my ($c) = @_;
	$c->[0]->finish;
	my $out = ${ $c->[1] };
	chomp $out;
	return ($out, time - $c->[2]);
}

sub sleepers
{
	return $node->safe_psql('postgres', q{
		SELECT count(*) FROM pg_stat_activity
		 WHERE query LIKE '%outbox_claim(%wait =>%' AND pid <> pg_backend_pid()
		   AND wait_event IN ('ResilienceOutboxClaim', 'Extension')});
}

sub wait_sleepers
{
	my ($n) = @_;
	for (1 .. 500)
	{
		return 1 if sleepers() >= $n;
		usleep(10_000);
	}
	return 0;
}

# --- woken by the commit of an event for it ---
my $c = start_claim('lp', '30 s');
ok(wait_sleepers(1), 'a claim that finds nothing sleeps');
$node->safe_psql('postgres', q{SELECT resilience.outbox_publish('lp.x', jsonb_build_object('n', 1))});
my ($got, $took) = finish_claim($c);
is($got, '1', 'the sleeping claim returns the event that committed');
cmp_ok($took, '<', 5, sprintf('woken by the commit: returned after %.2f s of a 30 s wait', $took));

# --- a rollback, or another consumer's event, ends no wait ---
$c = start_claim('lp', '3 s');
ok(wait_sleepers(1), 'the next claim sleeps');
$node->safe_psql('postgres', q{
BEGIN; SELECT resilience.outbox_publish('lp.x', jsonb_build_object('n', 2)); ROLLBACK;
SELECT resilience.outbox_publish('other.x', jsonb_build_object('n', 3));
});
($got, $took) = finish_claim($c);
is($got, '', 'a rolled-back event is never claimed; another consumer\'s is not ours');
cmp_ok($took, '>=', 2.9, sprintf('and the claim waited its whole wait (%.2f s)', $took));

# --- 20 idle consumers: next to no CPU ---
my @idle = map { start_claim("idle-$_", '10 s') } 1 .. 20;
ok(wait_sleepers(20), '20 consumers sleep in a long poll');
my $pids = $node->safe_psql('postgres', q{
	SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE query LIKE '%outbox_claim(''idle-%' AND pid <> pg_backend_pid()});
is(scalar(split / /, $pids), 20, 'the 20 sleeping backends are found');
sub cpu_ticks
{
	my $sum = 0;
	for my $pid (split / /, $pids)
	{
		open(my $fh, '<', "/proc/$pid/stat") or next;
		my @f = split / /, (<$fh> =~ s/^.*\) //r);
		$sum += $f[11] + $f[12];    # utime + stime
	}
	return $sum;
}
my $before = cpu_ticks();
sleep 3;
my $used = cpu_ticks() - $before;
note("20 sleeping consumers used $used clock ticks in 3 s");
cmp_ok($used, '<=', 5, '20 sleeping consumers use next to no CPU (at most 5 ticks in 3 s in all)');
finish_claim($_) for @idle;

$node->stop;
done_testing();
