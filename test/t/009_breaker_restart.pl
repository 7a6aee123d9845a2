# Circuit breaker state across restarts and crashes, default changes, and
# life without preloading.
#  - a clean restart keeps every breaker's state, window and counters (an open
#    breaker's timeout resumes where it was: downtime is not credited);
#    probes in flight at shutdown are dropped (their sessions are gone);
#  - after a crash (immediate stop, or kill -9 of a backend) every breaker
#    starts closed and empty; breaker_config, a table, is kept;
#  - a reload that changes a resilience.breaker_* default applies to breakers
#    without a row at their next call;
#  - without shared_preload_libraries breakers and bulkheads raise 55000,
#    the table-free helpers work.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('breakers');
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
INSERT INTO resilience.breaker_config
    (name, window_type, window_size, minimum_calls, open_timeout, half_open_calls, slow_call_duration)
VALUES ('r:open', 'count', 4, 4, '1 hour', 2, '1 s'),
       ('r:closed', 'count', 10, 10, '1 hour', 2, '1 s'),
       ('r:time', 'time', 600, 100, '1 hour', 2, '1 s'),
       ('r:half', 'count', 2, 2, '1 ms', 3, '1 s'),
       ('r:metrics', 'count', 5, 5, '1 hour', 2, '1 s');
SELECT resilience.breaker_record('r:open', ok) FROM unnest(ARRAY[true, false, true, false]) ok;
SELECT resilience.breaker_allow('r:open');
SELECT resilience.breaker_record('r:closed', ok, d)
  FROM unnest(ARRAY[true, true, false, true], ARRAY['10 ms', '2 s', '10 ms', NULL]::interval[]) t(ok, d);
SELECT resilience.breaker_record('r:time', false) FROM generate_series(1, 5);
SELECT resilience.breaker_record('r:time', true, '5 s') FROM generate_series(1, 3);
SELECT resilience.breaker_force_open('r:forced');
SELECT resilience.breaker_force_closed('r:metrics');
SELECT resilience.breaker_record('r:metrics', false) FROM generate_series(1, 7);
SELECT resilience.breaker_record('r:half', false) FROM generate_series(1, 2);
SELECT pg_sleep(0.01);
SELECT resilience.breaker_allow('r:half'), resilience.breaker_allow('r:half');
SELECT resilience.breaker_record('r:half', true);
});

my $snapshot_sql = q{
SELECT string_agg(format('%s=%s/%s/%s/%s/%s/%s', name, state, calls, failed_calls, slow_calls,
                         not_permitted, window_size), ' ' ORDER BY name)
  FROM resilience.breakers};
my $before = $node->safe_psql('postgres', $snapshot_sql);
is( $before,
	'r:closed=closed/4/1/1/0/10 r:forced=forced_open/0/0/0/0/100 r:half=half_open/1/0/0/0/2 '
	  . 'r:metrics=metrics_only/5/5/0/0/5 r:open=open/4/2/0/1/4 r:time=closed/8/5/3/0/600',
	'breakers before the restart');
is($node->safe_psql('postgres', q{SELECT probes_in_flight FROM resilience.breakers WHERE name = 'r:half'}),
	'1', 'one probe in flight before the restart');
ok($node->log_contains(qr/circuit breaker "r:open" opened: failure rate 50.0% \(2 of 4 calls\)/),
	'the opening was logged with its rates');
ok($node->log_contains(qr/circuit breaker "r:half" is half-open after [0-9.]+ m?s open: up to 3 probe calls/),
	'the half-open transition was logged');

$node->restart;    # fast shutdown: the state file is written
is($node->safe_psql('postgres', $snapshot_sql), $before,
	'a clean restart keeps states, windows and counters');
is($node->safe_psql('postgres', q{SELECT probes_in_flight FROM resilience.breakers WHERE name = 'r:half'}),
	'0', 'probes in flight at shutdown are dropped');
is( $node->safe_psql('postgres', q{
SELECT resilience.breaker_allow('r:half'), resilience.breaker_allow('r:half'), resilience.breaker_allow('r:half')}),
	't|t|f', 'a half-open breaker resumes with the probe slots not yet reported (3 - 1)');
ok( $node->safe_psql('postgres', q{
SELECT next_probe BETWEEN now() + interval '50 minutes' AND now() + interval '1 hour'
  FROM resilience.breakers WHERE name = 'r:open'}) eq 't',
	'an open breaker is still open for the rest of its hour');
is($node->safe_psql('postgres', q{SELECT resilience.breaker_allow('r:open')}), 'f',
	'an open breaker refuses calls after the restart');
$node->safe_psql('postgres', q{SELECT resilience.breaker_record('r:closed', false)});
is($node->safe_psql('postgres', q{SELECT calls || '/' || failed_calls FROM resilience.breakers WHERE name = 'r:closed'}),
	'5/2', 'a restored count window goes on counting');
ok(!-e $node->data_dir . '/pg_stat/resilience.state', 'the state file is removed once read');

# a crash: every breaker starts closed and empty; the configuration stays
$node->stop('immediate');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.breakers'), '0',
	'after a crash no breaker is left');
is( $node->safe_psql('postgres', q{
SELECT resilience.breaker_state('r:open'), resilience.breaker_allow('r:open');
SELECT window_size FROM resilience.breakers WHERE name = 'r:open'}),
	"closed|t\n4", 'an open breaker starts closed, still configured by breaker_config');

# kill -9 of a backend has the same effect (shared memory is reinitialised)
$node->safe_psql('postgres', q{SELECT resilience.breaker_force_open('r:k9')});
my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $bg_pid = $bg->query_safe('SELECT pg_backend_pid()');
kill 'KILL', $bg_pid;
$bg->{run}->kill_kill;
$node->poll_query_until('postgres', 'SELECT 1', '1')
  or die 'the server did not come back after kill -9';
ok($node->log_contains(qr/\(PID \d+\) was terminated by signal 9/), 'the kill was seen as a crash');
is($node->safe_psql('postgres', q{SELECT resilience.breaker_state('r:k9')}), 'closed',
	'after kill -9 of a backend breakers start closed');

# a reload that changes a default reaches breakers without a row
$node->safe_psql('postgres', q{SELECT resilience.breaker_allow('r:defaults')});
is($node->safe_psql('postgres', q{SELECT window_size FROM resilience.breakers WHERE name = 'r:defaults'}),
	'100', 'the default window size');
my $old_session = $node->background_psql('postgres');
$old_session->query_safe(q{SELECT resilience.breaker_allow('r:defaults')});
$node->safe_psql('postgres', q{
ALTER SYSTEM SET resilience.breaker_window_size = 7;
SELECT pg_reload_conf()});
ok( $node->poll_query_until('postgres', q{
SELECT resilience.breaker_allow('r:defaults');
SELECT window_size FROM resilience.breakers WHERE name = 'r:defaults'}, "t\n7"),
	'after a reload a new session sees the new default window size');
is( $old_session->query_safe(q{
SELECT resilience.breaker_allow('r:defaults');
SELECT window_size FROM resilience.breakers WHERE name = 'r:defaults'}),
	"t\n7", 'and so does a session that was there before the reload');
$node->safe_psql('postgres', q{SELECT resilience.breaker_allow('r:open')});
is($node->safe_psql('postgres', q{SELECT window_size FROM resilience.breakers WHERE name = 'r:open'}),
	'4', 'breakers with a window_size in breaker_config keep theirs');
$old_session->quit;
$node->safe_psql('postgres', q{
ALTER SYSTEM RESET resilience.breaker_window_size;
SELECT pg_reload_conf()});

# a damaged state file is ignored, never fatal
$node->safe_psql('postgres', q{SELECT resilience.breaker_force_open('r:file')});
$node->stop('fast');
my $file = $node->data_dir . '/pg_stat/resilience.state';
my $content = slurp_file($file);
open(my $fh, '>', $file) or die $!;
print $fh substr($content, 0, length($content) - 10);
close $fh;
my $offset = -s $node->logfile;
$node->start;
ok($node->log_contains(qr/resilience state file .* is damaged/, $offset), 'a truncated state file is reported');
is($node->safe_psql('postgres', q{SELECT resilience.breaker_allow('r:fresh')}), 't', 'and the server runs');
$node->stop;

# without shared_preload_libraries
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION resilience');
for my $call (
	q{SELECT resilience.breaker_allow('b')},
	q{SELECT resilience.breaker_record('b', true)},
	q{SELECT resilience.breaker_state('b')},
	q{SELECT * FROM resilience.breakers},
	q{SELECT resilience.bulkhead_acquire('b', 1)},
	q{SELECT * FROM resilience.bulkheads},
	q{CALL resilience.retry('SELECT 1', breaker => 'b')})
{
	my ($ret, $out, $err) = $plain->psql('postgres', "\\set VERBOSITY verbose\n$call");
	like($err, qr/55000.*HINT:.*shared_preload_libraries/s, "without preloading: $call raises 55000 with a hint");
}
is( $plain->safe_psql('postgres', q{
INSERT INTO resilience.breaker_config (name, window_size) VALUES ('b', 5);
CALL resilience.retry('SELECT 1');
SELECT resilience.backoff(2, '10 ms', '1 s', 'none'), resilience.is_retryable('40001')}),
	'00:00:00.04|t', 'the configuration table, retry, backoff and is_retryable work without preloading');
is( $plain->safe_psql('postgres',
		q{SELECT string_agg(item || '=' || removed, ' ' ORDER BY item) FROM resilience.run_reaper()
		   WHERE item IN ('breakers', 'bulkheads')}),
	'breakers=0 bulkheads=0', 'run_reaper works without preloading');
$plain->stop;

done_testing();
