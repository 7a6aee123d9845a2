# overlap => 'allow' (src/schedule.c, "Concurrent runs"): a command slower
# than its period (2.5 s every second) runs in executors of its own, so
# runs overlap in time, at most resilience.schedule_max_parallel at once,
# and still every slot runs exactly once.  Then kill -9 of an executor
# while it is inside a command: its slot (and those of the other executors,
# which the crash restart ends too) still runs exactly once afterwards.
# app.effects has no unique key: a slot run twice would show as two rows.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('schedule_allow');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.schedule_interval = '1s'
resilience.schedule_max_parallel = 3
max_worker_processes = 16
restart_after_crash = on
log_line_prefix = '%m [%p] %b '
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE tap_sched NOLOGIN IN ROLE resilience_user;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO tap_sched;
CREATE TABLE app.effects (slot timestamptz, pid int DEFAULT pg_backend_pid(),
    at timestamptz DEFAULT clock_timestamp());
GRANT INSERT ON app.effects TO tap_sched;
SET ROLE tap_sched;
SELECT resilience.schedule('slow', '@every 1 second',
    jsonb_build_object('sql',
        'INSERT INTO app.effects (slot) VALUES (current_setting(''resilience.schedule_slot'')::timestamptz);'
        || ' SELECT pg_catalog.pg_sleep(2.5)'),
    catch_up => 'all', overlap => 'allow');
});

sub psql { $node->safe_psql('postgres', $_[0]) }

# Pause, and wait until every dispatched run has finished.
sub settle
{
	psql(q{SET ROLE tap_sched; SELECT resilience.schedule_pause('slow')});
	$node->poll_query_until('postgres', q{
SELECT count(*) = 0 FROM resilience.schedule_runs WHERE state IN ('pending', 'retrying')}, 't')
	  or die 'the dispatched runs did not finish';
	$node->poll_query_until('postgres', q{
SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'resilience schedule executor'})
	  or die 'the executors did not exit';
}

# Every slot from the first to the last after $after exactly once, run
# rows 1:1 (slots of a pause are not run: each phase is checked alone).
sub check_once
{
	my ($what, $after) = @_;
	my $e = qq{(SELECT * FROM app.effects WHERE slot > '$after')};
	is(psql(qq{SELECT count(*) - count(DISTINCT slot) FROM $e e}), '0',
		"$what: no slot ran twice");
	is(psql(qq{
SELECT (extract(epoch FROM max(slot) - min(slot)) + 1 - count(DISTINCT slot))::int FROM $e e}), '0',
		"$what: no slot between the first and the last was forgotten");
	is(psql(qq{
SELECT count(*) FROM (SELECT * FROM resilience.schedule_runs WHERE schedule = 'slow' AND slot > '$after') r
  FULL JOIN $e e ON e.slot = r.slot
 WHERE r.slot IS NULL OR e.slot IS NULL OR r.state <> 'succeeded'}), '0',
		"$what: one succeeded run row per side effect");
	return psql(q{SELECT max(slot) FROM app.effects});
}

# ---- runs overlap ----
$node->poll_query_until('postgres', q{SELECT count(*) >= 8 FROM app.effects})
  or die 'the schedule does not run';
settle();
my $last = check_once('allow', '-infinity');
cmp_ok(psql(q{
SELECT count(*) FROM resilience.schedule_runs a JOIN resilience.schedule_runs b
    ON a.slot < b.slot AND b.started_at < a.finished_at}), '>', 0,
	'allow: runs overlap in time ([started, finished) of a later slot begins inside an earlier one)');
is(psql(q{
SELECT max(n) FROM (SELECT (SELECT count(*) FROM resilience.schedule_runs b
                             WHERE b.started_at <= a.started_at AND a.started_at < b.finished_at) AS n
                      FROM resilience.schedule_runs a) c}) <= 3 ? 'yes' : 'no', 'yes',
	'allow: at most resilience.schedule_max_parallel runs at once');
cmp_ok(psql(q{SELECT count(DISTINCT pid) FROM app.effects}), '>', 1,
	'allow: the runs were executed by several executors');

# ---- kill -9 of an executor inside its command ----
psql(q{SET ROLE tap_sched; SELECT resilience.schedule_resume('slow')});
$node->poll_query_until('postgres', q{
SELECT count(*) >= 2 FROM pg_stat_activity
 WHERE backend_type = 'resilience schedule executor' AND wait_event = 'PgSleep'})
  or die 'no executor inside a command';
my $before = psql(q{SELECT count(*) FROM app.effects});
my $pid = psql(q{
SELECT pid FROM pg_stat_activity
 WHERE backend_type = 'resilience schedule executor' AND wait_event = 'PgSleep' LIMIT 1});
kill 'KILL', $pid;
$node->poll_query_until('postgres', qq{SELECT count(*) >= $before + 6 FROM app.effects})
  or die 'the schedule does not run after the crash';
settle();
like(slurp_file($node->logfile), qr/schedule executor.*\(PID $pid\) was terminated by signal 9/,
	'an executor was killed inside its command');
check_once('after kill -9 of an executor', $last);

# ---- a failing 'allow' run: retried after its backoff, then failed ----
psql(q{SET ROLE tap_sched;
SELECT resilience.schedule('flaky', '@hourly', '{"sql": "SELECT 1/0"}', overlap => 'allow',
       max_attempts => 2, backoff => '1 second')});
psql(q{UPDATE resilience.schedule_definitions
          SET next_slot = date_trunc('hour', now()), due_at = date_trunc('hour', now()) WHERE name = 'flaky'});
$node->poll_query_until('postgres', q{
SELECT count(*) = 1 FROM resilience.schedule_runs WHERE schedule = 'flaky' AND state = 'failed'})
  or die 'the failing run did not end';
is(psql(q{
SELECT attempt || ' ' || split_part(error, ':', 1) || ' ' || (dispatch_at IS NULL)
  FROM resilience.schedule_runs WHERE schedule = 'flaky'}), '2 22012 true',
	'allow: a failing run is retried after its backoff (dispatched again), then failed');
is(psql(q{SELECT last_state FROM resilience.schedules WHERE name = 'flaky'}), 'failed',
	'... and the schedule shows it');

$node->stop;
done_testing();
