# Lease locks and fencing under load, across crashes and restarts.
#  - torture: 8 clients for 10 s take leases with short random TTLs (many
#    expire mid-work), write through the fence, renew or release; no two
#    accepted writes share a token and, per resource, accepted tokens strictly
#    increase in the order the writes were accepted;
#  - tokens issued after kill -9 of the postmaster (and after an immediate
#    shutdown) exceed every token issued before;
#  - leases survive a clean restart;
#  - try_advisory_lock waits at most its timeout, and gets the lock when it
#    is released in time.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $node = PostgreSQL::Test::Cluster->new('locks');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE SEQUENCE accept_order;
CREATE TABLE writes (resource int, token bigint, accepted boolean, seq bigint);
});

# --- torture ---
$node->pgbench(
	'-n -c 8 -j 2 -T 10',
	0,
	[qr{processed: \d+}],
	[qr{^$}],
	'8 clients take leases, write through the fence, renew or release for 10 s',
	{
		'001_lease_cycle' => q{
\set r random(1, 4)
\set ttl random(20, 100)
\set work random(0, 150)
\set renew random(0, 1)
SELECT coalesce(resilience.lock_acquire('torture:' || :r, make_interval(secs => :ttl / 1000.0), 'c' || :client_id), 0) AS tok \gset
\if :tok > 0
\sleep :work ms
INSERT INTO writes
SELECT :r, :tok, ok, CASE WHEN ok THEN nextval('accept_order') END
  FROM (SELECT resilience.fence_check('torture:' || :r, :tok) AS ok) s;
\if :renew
SELECT resilience.lock_renew('torture:' || :r, :tok, make_interval(secs => :ttl / 1000.0));
\endif
SELECT resilience.lock_release('torture:' || :r, :tok);
\endif
}
	});
my ($accepted, $refused, $resources) = split /\|/, $node->safe_psql('postgres', q{
SELECT count(*) FILTER (WHERE accepted), count(*) FILTER (WHERE NOT accepted), count(DISTINCT resource)
  FROM writes});
note "accepted $accepted writes, refused $refused stale ones, on $resources resources";
cmp_ok($accepted, '>', 100, 'many fenced writes were accepted');
cmp_ok($refused, '>', 0, 'some holders lost their lease mid-work and were fenced off');
is( $node->safe_psql('postgres',
		q{SELECT count(*) - count(DISTINCT token) FROM writes WHERE accepted}),
	'0', 'no two accepted writes share a token');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM (
  SELECT token, lag(token) OVER (PARTITION BY resource ORDER BY seq) AS prev
    FROM writes WHERE accepted) s
 WHERE token <= prev}),
	'0', 'per resource, accepted tokens strictly increase in acceptance order');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM writes w JOIN resilience.fences f ON f.resource = 'torture:' || w.resource
 WHERE w.accepted AND w.token > f.token}),
	'0', 'each fence holds the highest token it accepted');

# --- tokens across crashes ---
sub issue_tokens
{
	# leases (committed), transaction and session advisory locks (no writes)
	return $node->safe_psql('postgres', q{
SELECT max(t) FROM (
  SELECT resilience.lock_acquire('crash:' || i, '1 hour') AS t FROM generate_series(1, 5) i
  UNION ALL SELECT resilience.advisory_xact_lock('crash:x' || i) FROM generate_series(1, 50) i
  UNION ALL SELECT resilience.try_advisory_lock('crash:s' || i) FROM generate_series(1, 50) i) s});
}
my $before = issue_tokens();
# tokens handed out by statements that wrote nothing else, right before the kill
my $last = 0;
for my $i (1 .. 20)
{
	$last = $node->safe_psql('postgres', qq{SELECT resilience.advisory_xact_lock('crash:last$i')});
}
cmp_ok($last, '>', $before, 'tokens increase before the crash');
$node->kill9;
# its children notice the postmaster's death and leave; start once they have
my $started = 0;
for (1 .. 60)
{
	last if ($started = $node->start(fail_ok => 1));
	$node->{_pid} = undef;    # the failed start read the dead postmaster's pid file
	sleep 1;
}
ok($started, 'the server starts again after kill -9 of the postmaster');
my $after = issue_tokens();
cmp_ok($after, '>', $last, "after kill -9 of the postmaster every token is newer ($after > $last)");
my $first_after = $node->safe_psql('postgres', q{SELECT resilience.advisory_xact_lock('crash:first')});
$node->stop('immediate');
$node->start;
my $after_immediate = $node->safe_psql('postgres', q{SELECT resilience.advisory_xact_lock('crash:again')});
cmp_ok($after_immediate, '>', $first_after, 'after an immediate shutdown every token is newer');

# --- leases survive a clean restart ---
my $held = $node->safe_psql('postgres', q{SELECT resilience.lock_acquire('restart:lease', '1 hour', 'me')});
$node->restart;
is($node->safe_psql('postgres', qq{SELECT resilience.lock_check('restart:lease', $held)}),
	't', 'a lease survives a clean restart');
is( $node->safe_psql('postgres',
		q{SELECT resilience.lock_acquire('restart:lease', '1 minute', 'other') IS NULL}),
	't', 'and still keeps others out');

# --- try_advisory_lock with a timeout ---
my $holder = $node->background_psql('postgres');
$holder->query_safe(q{SELECT resilience.advisory_lock('adv:shared')});
my $t0 = time();
is( $node->safe_psql('postgres', q{SELECT resilience.try_advisory_lock('adv:shared', '300 milliseconds') IS NULL}),
	't', 'try_advisory_lock gives up when the lock stays held');
my $waited = time() - $t0;
cmp_ok($waited, '>=', 0.29, sprintf('... after its timeout (%.2f s)', $waited));
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted}),
	'0', '... and leaves no lock request behind');
my $waiter = $node->background_psql('postgres');
$waiter->query_until(qr/sent/, q{
\echo sent
SELECT resilience.try_advisory_lock('adv:shared', '30 seconds') IS NOT NULL AS got;
});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3 AND NOT granted})
  or die 'the waiter never queued';
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.locks WHERE name = 'adv:shared' AND waiters = 1}),
	'1', 'the locks view shows the holder by name, with one waiter');
$t0 = time();
$holder->query_safe(q{SELECT resilience.advisory_unlock('adv:shared')});
is( $node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3 AND granted}),
	1, 'the waiter got the lock once it was released');
cmp_ok(time() - $t0, '<', 10, 'promptly, not at the end of its timeout');
$holder->quit;
$waiter->quit;
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3}),
	'0', 'session locks end with their sessions');

$node->stop;
done_testing();
