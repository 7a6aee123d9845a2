# Schedules are exactly once per slot across crashes: a schedule fires every
# second, its SQL command writes a side-effect row (the slot it ran for, from
# resilience.schedule_slot) and sleeps, so that a crash lands inside a run.
# The worker is killed with SIGKILL (twice) and the server is shut down in
# immediate mode (twice), each time while the worker is inside a command.
# app.effects has no unique constraint: a slot run twice would show as two
# rows.  Afterwards (catch_up => 'all') every slot from the first to the last
# ran exactly once, and the run rows match the side effects one to one.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('schedule_crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.schedule_interval = '1s'
restart_after_crash = on
log_line_prefix = '%m [%p] %b '
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE tap_sched NOLOGIN IN ROLE resilience_user;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO tap_sched;
CREATE TABLE app.effects (slot timestamptz, at timestamptz DEFAULT clock_timestamp());
GRANT INSERT ON app.effects TO tap_sched;
SET ROLE tap_sched;
SELECT resilience.schedule('every_second', '@every 1 second',
    jsonb_build_object('sql',
        'INSERT INTO app.effects (slot) VALUES (current_setting(''resilience.schedule_slot'')::timestamptz);'
        || ' SELECT pg_catalog.pg_sleep(0.3)'),
    catch_up => 'all', overlap => 'queue');
});

sub effects { $node->safe_psql('postgres', 'SELECT count(*) FROM app.effects') }

# wait until the worker is inside a command (sleeping in it)
sub in_command
{
	$node->poll_query_until('postgres', q{
SELECT count(*) = 1 FROM pg_stat_activity
 WHERE backend_type = 'resilience worker' AND datname = 'postgres' AND wait_event = 'PgSleep'})
	  or die 'the worker never ran the command';
}

$node->poll_query_until('postgres', 'SELECT count(*) >= 3 FROM app.effects')
  or die 'the worker does not run the schedule';
pass('the worker runs the schedule');

my $offset = -s $node->logfile;
for my $crash ('kill -9 of the worker', 'immediate shutdown', 'kill -9 of the worker',
	'immediate shutdown')
{
	my $before = effects();
	$node->poll_query_until('postgres', "SELECT count(*) > $before FROM app.effects")
	  or die 'the schedule stopped running';
	in_command();
	if ($crash eq 'immediate shutdown')
	{
		$node->stop('immediate');
		usleep(1_500_000);    # a slot or two come due while down
		$node->start;
	}
	else
	{
		my $pid = $node->safe_psql('postgres',
			q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'resilience worker' AND datname = 'postgres'});
		my $logpos = -s $node->logfile;
		kill 'KILL', $pid;
		$node->wait_for_log(qr/database system is ready to accept connections/, $logpos)
		  or die 'the server did not recover';
		$node->poll_query_until('postgres', 'SELECT true') or die 'the server did not come back';
	}
	pass("$crash inside a run");
}
my $log = slurp_file($node->logfile, $offset);
like($log, qr/resilience worker.*terminated by signal 9/, 'the worker was killed');
like($log, qr/database system was not properly shut down; automatic recovery in progress/,
	'and the server recovered from crashes');

# let it catch up, then stop it and look
$node->poll_query_until('postgres', q{
SELECT next_slot > now() AND failed_attempts = 0 FROM resilience.schedules WHERE name = 'every_second'})
  or die 'the schedule did not catch up';
$node->safe_psql('postgres', q{SET ROLE tap_sched; SELECT resilience.schedule_pause('every_second')});
usleep(500_000);

is($node->safe_psql('postgres', 'SELECT count(*) FROM (SELECT slot FROM app.effects GROUP BY slot HAVING count(*) > 1) d'),
	'0', 'no slot ran twice');
is( $node->safe_psql('postgres', q{
SELECT count(*) FROM app.effects e FULL JOIN resilience.schedule_runs r
    ON r.slot = e.slot AND r.schedule = 'every_second' AND r.state = 'succeeded'
 WHERE e.slot IS NULL OR r.slot IS NULL}),
	'0', 'every side effect has its run row and every run row its side effect');
is( $node->safe_psql('postgres', q{
SELECT extract(epoch FROM max(slot) - min(slot))::int + 1 - count(DISTINCT slot) FROM app.effects}),
	'0', 'no slot between the first and the last was forgotten');
cmp_ok(effects(), '>=', 8, 'slots ran before, between and after the crashes');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.schedule_runs WHERE state <> 'succeeded'}),
	'0', 'no run failed');

$node->stop;
done_testing();
