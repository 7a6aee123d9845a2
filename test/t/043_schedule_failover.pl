# Schedules are exactly once per slot across a failover: a primary and a
# synchronous standby, both preloading the library with workers on.  A
# schedule fires every 3 seconds; its SQL command sleeps 2 s, then writes a
# side-effect row (the slot it ran for, and the port of the server that ran
# it).  The primary's postmaster is killed with SIGKILL while the worker is
# inside the command, the standby is promoted, and its worker runs the
# schedule on.  app.effects has no unique constraint: a slot run twice would
# show as two rows.  Afterwards (catch_up => 'all'), on the new primary:
#  - no slot ran twice, and every slot from the first to the last ran;
#  - the slot in flight at the kill ran once, on the new primary;
#  - the run rows match the side effects one to one.
# The commit of a run waits for the synchronous standby: a run the old
# primary committed is on the standby, so the new primary does not run it
# again (an asynchronous standby can lack it: docs/schedules.md).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $primary = PostgreSQL::Test::Cluster->new('sched_primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.schedule_interval = '1s'
synchronous_commit = on
log_line_prefix = '%m [%p] %b '
});
$primary->start;
$primary->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE tap_sched NOLOGIN IN ROLE resilience_user;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO tap_sched;
CREATE TABLE app.effects (slot timestamptz, port int, at timestamptz DEFAULT clock_timestamp());
GRANT INSERT ON app.effects TO tap_sched;
});

$primary->backup('sched_backup');
my $standby = PostgreSQL::Test::Cluster->new('sched_standby');
$standby->init_from_backup($primary, 'sched_backup', has_streaming => 1);
# Once promoted, the standby has no standby of its own to wait for.
$standby->append_conf('postgresql.conf', "synchronous_standby_names = ''\n");
$standby->start;
$primary->append_conf('postgresql.conf', "synchronous_standby_names = 'sched_standby'\n");
$primary->reload;
ok( $primary->poll_query_until('postgres',
		q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'sched_standby'}),
	'the standby streams as the synchronous standby')
  or BAIL_OUT('the standby never became synchronous');
my $old_port = $primary->port;
my $new_port = $standby->port;

$primary->safe_psql('postgres', q{
SET ROLE tap_sched;
SELECT resilience.schedule('slow', '@every 3 seconds',
    jsonb_build_object('sql',
        'SELECT pg_catalog.pg_sleep(2);'
        || ' INSERT INTO app.effects (slot, port)'
        || ' VALUES (pg_catalog.current_setting(''resilience.schedule_slot'')::timestamptz,'
        || ' pg_catalog.current_setting(''port'')::int)'),
    catch_up => 'all', overlap => 'queue');
});

ok($primary->poll_query_until('postgres', 'SELECT count(*) >= 2 FROM app.effects'),
	'the old primary runs the schedule');

# The worker is inside the command (sleeping in it): kill the postmaster.
my $worker_sql = q{
SELECT pid FROM pg_stat_activity
 WHERE backend_type = 'resilience worker' AND datname = 'postgres' AND wait_event = 'PgSleep'};
$primary->poll_query_until('postgres', "SELECT count(*) = 1 FROM ($worker_sql) w")
  or die 'the worker never ran the command';
# Every process of the old primary, so that we can wait for all to be gone.
my @old_pids = split /\n/, $primary->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()});
# The slot in flight: not yet committed, so still the next slot, on both.
my $in_flight = $primary->safe_psql('postgres',
	q{SELECT next_slot FROM resilience.schedules WHERE name = 'slow'});
is($primary->safe_psql('postgres', "SELECT count(*) FROM ($worker_sql) w"),
	'1', 'the worker is still inside the command');
my $postmaster = $primary->{_pid};
kill 'KILL', $postmaster;
# Its children notice that the postmaster is gone and exit (the worker from
# its sleep, the walsender too).
my $deadline = time + 60;
usleep(100_000) while (grep { kill 0, $_ } $postmaster, @old_pids) && time < $deadline;
is(scalar(grep { kill 0, $_ } $postmaster, @old_pids), 0,
	'the old primary\'s postmaster was killed and its processes are gone');
$primary->_update_pid(-1);    # stale postmaster.pid: nothing to stop at the end

my $before = $standby->safe_psql('postgres', 'SELECT count(*) FROM app.effects');
cmp_ok($before, '>=', 2, "the standby has the effects committed on the old primary ($before)");
is($standby->safe_psql('postgres', q{SELECT next_slot FROM resilience.schedules WHERE name = 'slow'}),
	$in_flight, '... and, as its next slot, the slot that was in flight');
is($standby->safe_psql('postgres', qq{SELECT count(*) FROM app.effects WHERE slot = '$in_flight'}),
	'0', '... which has no effect there');

$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()') or die 'no promotion';
my $new = $standby;
ok( $new->poll_query_until('postgres', qq{
SELECT count(*) >= 3 FROM app.effects WHERE port = $new_port}),
	'the new primary\'s worker runs the schedule on');

# Let it catch up, then pause it and look.
$new->poll_query_until('postgres', q{
SELECT next_slot > now() AND failed_attempts = 0 FROM resilience.schedules WHERE name = 'slow'})
  or die 'the schedule did not catch up';
$new->safe_psql('postgres', q{SET ROLE tap_sched; SELECT resilience.schedule_pause('slow')});
# a run in progress finishes (or its slot stays due) before we read
$new->poll_query_until('postgres', q{
SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'resilience worker' AND wait_event = 'PgSleep'})
  or die 'a run does not end';

is($new->safe_psql('postgres',
	'SELECT count(*) FROM (SELECT slot FROM app.effects GROUP BY slot HAVING count(*) > 1) d'),
	'0', 'no slot ran twice');
is( $new->safe_psql('postgres', q{
SELECT extract(epoch FROM max(slot) - min(slot))::int / 3 + 1 - count(DISTINCT slot) FROM app.effects}),
	'0', 'no slot between the first and the last was forgotten');
is($new->safe_psql('postgres', qq{SELECT string_agg(port::text, ',') FROM app.effects WHERE slot = '$in_flight'}),
	$new_port, 'the slot in flight at the kill ran once, on the new primary');
is( $new->safe_psql('postgres', q{
SELECT count(*) FROM app.effects e FULL JOIN resilience.schedule_runs r
    ON r.slot = e.slot AND r.schedule = 'slow' AND r.state = 'succeeded'
 WHERE e.slot IS NULL OR r.slot IS NULL}),
	'0', 'every side effect has its run row and every run row its side effect');
is( $new->safe_psql('postgres', qq{
SELECT bool_and(port = $old_port) FILTER (WHERE slot < '$in_flight')
       AND bool_and(port = $new_port) FILTER (WHERE slot >= '$in_flight') FROM app.effects}),
	't', 'the slots before it ran on the old primary, it and those after on the new one');
is($new->safe_psql('postgres', q{SELECT count(*) FROM resilience.schedule_runs WHERE state <> 'succeeded'}),
	'0', 'no run failed');

$new->stop;
done_testing();
