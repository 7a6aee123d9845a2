# Rate-limit state across restarts and crashes, and without preloading.
#  - a clean restart keeps bucket levels, window counts and counters;
#  - after a crash (immediate stop, or kill -9 of a backend) buckets start full;
#  - kill -9 of a backend in the middle of calls leaves nothing locked;
#  - a damaged or foreign state file is ignored, never fatal;
#  - entries of the state file with invalid values (NaN, infinite or negative
#    rates, counts out of range) are skipped one by one, the rest restored;
#  - without shared_preload_libraries the functions raise 55000 with a hint.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('restart');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
restart_after_crash = on
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec)
VALUES ('tier', 10, 0);
SELECT resilience.rate_limit('r:bucket', 10, 0, 7);
SELECT resilience.rate_limit('r:bucket', 10, 0, 7);  -- refused: 3 left
SELECT resilience.window_limit('r:window', 5, '1 hour', 4);
SELECT resilience.rate_limit('r:policy', 'tier', 6);
SELECT resilience.rate_limit('r:slow', 100, 0.5, 100);
});

# what a peek (cost 0) reports for each key
sub levels
{
	return $node->safe_psql('postgres', q{
SELECT string_agg(k || '=' || remaining, ' ' ORDER BY k) FROM (
  SELECT 'bucket' k, remaining FROM resilience.rate_limit_check('r:bucket', 10, 0, 0)
  UNION ALL SELECT 'window', remaining FROM resilience.window_limit_check('r:window', 5, '1 hour', 0)
  UNION ALL SELECT 'policy', remaining FROM resilience.rate_limit_check('r:policy', 'tier', 0)
) s});
}

is(levels(), 'bucket=3 policy=4 window=1', 'levels before the restart');

$node->restart;    # fast shutdown: the state file is written
is(levels(), 'bucket=3 policy=4 window=1', 'a clean restart keeps bucket levels and window counts');
is( $node->safe_psql('postgres',
		q{SELECT allowed || '/' || denied FROM resilience.rate_limits WHERE key = 'r:bucket'}),
	'1/1',
	'decision counters survive a clean restart');
# a slowly refilling bucket resumes at its level (downtime is not credited)
my $slow = $node->safe_psql('postgres',
	q{SELECT remaining FROM resilience.rate_limit_check('r:slow', 100, 0.5, 0)});
ok($slow < 100, "a refilling bucket resumes near its level at shutdown ($slow of 100), not full");
ok(!-e $node->data_dir . '/pg_stat/resilience.state',
	'the state file is removed once read');

# a crash (immediate stop writes nothing): buckets start full
$node->stop('immediate');
$node->start;
is(levels(), 'bucket=10 policy=10 window=5', 'after a crash every bucket starts full');

# kill -9 of a backend in the middle of calls
$node->safe_psql('postgres', q{SELECT resilience.rate_limit('r:k9', 5, 0, 5)});
my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $bg_pid = $bg->query_safe('SELECT pg_backend_pid()');
$bg->query_until(qr/started/, q{
\echo started
SELECT count(*) FROM generate_series(1, 100000000) i
 WHERE resilience.rate_limit('r:hammer' || (i % 1000), 1000, 1000);
});
$node->poll_query_until('postgres',
	qq{SELECT count(*) > 0 FROM resilience.rate_limits WHERE key LIKE 'r:hammer%'})
  or die 'the hammering backend never started';
kill 'KILL', $bg_pid;
$bg->{run}->kill_kill;
$node->poll_query_until('postgres', 'SELECT 1', '1')
  or die 'the server did not come back after kill -9';
ok( $node->poll_query_until('postgres',
		q{SELECT resilience.rate_limit('r:k9', 5, 0, 5)}, 't'),
	'after kill -9 of a backend in the middle of calls, the next call works and the bucket starts full');
ok( $node->log_contains(qr/\(PID \d+\) was terminated by signal 9/),
	'the kill was seen as a crash');
my @sessions;
for my $i (1 .. 4)
{
	push @sessions, $node->background_psql('postgres');
}
for my $s (@sessions)
{
	is($s->query_safe(q{SELECT resilience.rate_limit('r:after', 100, 0)}),
		't', 'a new session can decide on any key (no lock left held)');
	$s->quit;
}

# damaged and foreign state files are ignored, never fatal
$node->stop('fast');
my $file = $node->data_dir . '/pg_stat/resilience.state';
ok(-s $file, 'a clean stop writes the state file');
my $content = slurp_file($file);
open(my $fh, '>', $file) or die $!;
print $fh substr($content, 0, int(length($content) / 2) + 3);
close $fh;
my $offset = -s $node->logfile;
$node->start;
ok($node->log_contains(qr/resilience state file .* is damaged/, $offset),
	'a truncated state file is reported');
is($node->safe_psql('postgres', q{SELECT resilience.rate_limit('r:fresh', 1, 0)}),
	't', 'and the server runs');
$node->stop('fast');
open($fh, '>', $file) or die $!;
print $fh 'not a resilience state file at all';
close $fh;
$offset = -s $node->logfile;
$node->start;
ok($node->log_contains(qr/ignoring resilience state file/, $offset),
	'a foreign state file is ignored');
is($node->safe_psql('postgres', q{SELECT resilience.rate_limit('r:fresh2', 1, 0)}),
	't', 'and the server runs');

# Entries with impossible values (NaN, infinite or negative refill rates,
# tokens beyond the capacity, negative or overflowing window counts, ...) are
# skipped one by one with one LOG line; the valid ones are restored.
# RateSaved in src/ratelimit.c: kind, pad, keylen, limit, allowed, denied,
# tokens, rate, slot_ns, counts[16], idle_ns.
my $rec_tmpl = 'C x S l Q Q d d q l16 q';
my $rec_len = length(pack($rec_tmpl, (0) x 25));
my $inf = 9**9**9;
my $nan = $inf - $inf;
$node->safe_psql('postgres', q{
SELECT resilience.rate_limit('sf:good-bucket', 10, 0, 7);
SELECT resilience.window_limit('sf:good-window', 5, '1 hour', 4);
SELECT resilience.rate_limit('sf:' || k, 10, 0.001, 10)
  FROM unnest(ARRAY['nan-rate', 'inf-rate', 'neg-rate', 'nan-tokens', 'big-tokens', 'neg-idle']) k;
SELECT resilience.window_limit('sf:' || k, 5, '1 hour', 5)
  FROM unnest(ARRAY['neg-count', 'overflow-counts', 'huge-slot']) k;
});
$node->stop('fast');
my $state = slurp_file($file);
my %damage = (
	'sf:nan-rate' => sub { $_[0][6] = $nan },
	'sf:inf-rate' => sub { $_[0][6] = $inf },
	'sf:neg-rate' => sub { $_[0][6] = -5 },
	'sf:nan-tokens' => sub { $_[0][5] = $nan },
	'sf:big-tokens' => sub { $_[0][5] = 1e300 },
	'sf:neg-idle' => sub { $_[0][24] = -4e18 },
	'sf:neg-count' => sub { $_[0][23] = -1000 },
	'sf:overflow-counts' => sub { $_[0][$_] = 2147483647 for 8 .. 23 },
	'sf:huge-slot' => sub { $_[0][7] = 9223372036854775807 },
);
my ($magic, $version, $format, $section, $n) = unpack('L5', $state);
is($section, 1, 'the rate-limit section comes first in the state file');
my $pos = 20;
my ($crafted, $damaged) = (substr($state, 0, $pos), 0);
for (1 .. $n)
{
	my @f = unpack($rec_tmpl, substr($state, $pos, $rec_len));
	my $key = substr($state, $pos + $rec_len, $f[1]);
	if ($damage{$key})
	{
		$damage{$key}->(\@f);
		$damaged++;
	}
	$crafted .= pack($rec_tmpl, @f) . $key;
	$pos += $rec_len + $f[1];
}
$crafted .= substr($state, $pos);
is($damaged, 9, 'nine entries of the state file were damaged');
ok(substr($state, -8) eq pack('L2', 0, 0) && unpack('L', substr($state, $pos, 4)) == 2,
	'the record layout the test assumes matches the file');
open($fh, '>', $file) or die $!;
print $fh $crafted;
close $fh;
$offset = -s $node->logfile;
$node->start;
is($node->safe_psql('postgres', q{SELECT resilience.rate_limit('r:fresh3', 1, 0)}),
	't', 'a state file with invalid entries does not stop the server');
my $log = slurp_file($node->logfile, $offset);
my @skipped = $log =~ /(skipped \d+ of \d+ saved rate-limit keys)/g;
is(scalar(@skipped), 1, 'one LOG line for the invalid entries');
like($skipped[0] // '', qr/^skipped 9 of $n /, '... counting the nine skipped');
unlike($log, qr/resilience state file .* is damaged/, 'the file is not taken for damaged');
is( $node->safe_psql('postgres', q{
SELECT string_agg(key, ' ' ORDER BY key) FROM resilience.rate_limits
 WHERE key LIKE 'sf:%' AND key NOT LIKE 'sf:good-%'}),
	'', 'the invalid entries were dropped');
is( $node->safe_psql('postgres', q{
SELECT string_agg(k || '=' || remaining, ' ' ORDER BY k) FROM (
  SELECT 'bucket' k, remaining FROM resilience.rate_limit_check('sf:good-bucket', 10, 0, 0)
  UNION ALL SELECT 'window', remaining FROM resilience.window_limit_check('sf:good-window', 5, '1 hour', 0)
) s}),
	'bucket=3 window=1', 'the valid entries next to them were restored');
$node->stop('fast');

# without shared_preload_libraries
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION resilience');
my ($ret, $out, $err) = $plain->psql('postgres',
	q{\set VERBOSITY verbose
SELECT resilience.rate_limit('k', 1, 1)});
isnt($ret, 0, 'rate_limit fails without preloading');
like($err, qr/55000/, '... with SQLSTATE 55000');
like($err, qr/HINT:.*shared_preload_libraries/, '... and a hint naming shared_preload_libraries');
($ret, $out, $err) = $plain->psql('postgres', q{SELECT * FROM resilience.rate_limits});
like($err, qr/shared_preload_libraries/, 'the rate_limits view says the same');
is( $plain->safe_psql('postgres', q{
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('p', 1, 1);
SELECT count(*) FROM resilience.rate_limit_policies}),
	'1', 'the policy table works without preloading');
is($plain->safe_psql('postgres', q{SELECT count(*) FROM resilience.workers}),
	'0', 'no worker runs without preloading');
is( $plain->safe_psql('postgres',
		q{SELECT removed FROM resilience.run_reaper() WHERE item = 'rate_limit_keys'}),
	'0', 'run_reaper works without preloading');
$plain->stop;

done_testing();
