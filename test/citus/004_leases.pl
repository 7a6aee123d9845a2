# Leases distributed by name (resilience.citus_setup()), called through the
# coordinator by 8 clients:
#  - mutual exclusion: every holder logs when it enters and leaves; no two
#    holds of the lease overlap, and each holder's token is larger than the
#    one before it (tokens from the coordinator's one sequence);
#  - takeover of an expired lease hands out a larger token, and the fence
#    refuses the stale one;
#  - the lease row is in one shard, on the worker that owns the name;
#  - the reaper deletes old released leases on the workers.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('leases');
my $coord = $c->{coord};
my ($w1, $w2) = @{ $c->{workers} };
$c->setup;
$coord->safe_psql('postgres', q{
CREATE TABLE hold_log (token bigint NOT NULL, at timestamptz NOT NULL, what text NOT NULL);
});

# --- mutual exclusion, 8 clients ---
$coord->pgbench('-n -c 8 -j 2 -t 15', 0, [qr{processed: 120/120}], [qr{^$}],
	'8 clients take, hold and release one lease through the coordinator',
	{ '004_mutex' => q{
SELECT resilience.lock_acquire('mx', '1 minute', NULL, '1 minute') AS tok \gset
INSERT INTO hold_log VALUES (:tok, clock_timestamp(), 'in');
SELECT pg_sleep(0.005);
INSERT INTO hold_log VALUES (:tok, clock_timestamp(), 'out');
SELECT resilience.lock_release('mx', :tok);
} });
is($coord->safe_psql('postgres', q{SELECT count(*), count(DISTINCT token) FROM hold_log}),
	'240|120', 'every client got the lease each time, each time with its own token');
# ordered by time, the log alternates in/out of one token, and tokens increase
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM (
	  SELECT what, token, lag(what) OVER w AS pwhat, lag(token) OVER w AS ptoken
	    FROM hold_log WINDOW w AS (ORDER BY at, what)) x
	 WHERE (what = 'in' AND (pwhat = 'in' OR token <= ptoken))
	    OR (what = 'out' AND (pwhat IS DISTINCT FROM 'in' OR token <> ptoken))}),
	'0', 'no two holds overlap, and each holder has a larger token than the one before');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM run_command_on_shards('resilience.leases',
	  $$SELECT count(*) FROM %s WHERE name = 'mx'$$) WHERE result = '1'}),
	'1', "the lease's row is in one shard");

# --- takeover after expiry: a larger token; the fence refuses the old one ---
my $t1 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('exp', '100 ms', 'a')});
$coord->safe_psql('postgres', "SELECT resilience.fence('exp-res', $t1)");
sleep 1;
my $t2 = $coord->safe_psql('postgres', q{SELECT resilience.lock_acquire('exp', '1 minute', 'b')});
ok($t2 > $t1, "takeover of the expired lease: token $t2 > $t1");
is($coord->safe_psql('postgres', "SELECT resilience.lock_check('exp', $t1)"), 'f',
	'the old holder no longer holds it');
is($coord->safe_psql('postgres', qq{SELECT resilience.lock_acquire('exp', '1 minute', 'c')}), '',
	'a third client does not get a held lease');
$coord->safe_psql('postgres', "SELECT resilience.fence('exp-res', $t2)");
my ($ret, $out, $err) = $coord->psql('postgres', "SELECT resilience.fence('exp-res', $t1)",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/RS001/, 'the fence refuses the stale token');

# --- the reaper, on the distributed table ---
is($coord->safe_psql('postgres', q{
	SELECT resilience.lock_release('exp', } . $t2 . q{);
	SELECT resilience._reap_leases('0 s')}), "t\n2",
	'the reaper deletes the released leases on the workers');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM resilience.leases}), '0',
	'none left');

$c->stop;
done_testing();
