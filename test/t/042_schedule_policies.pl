# Schedule policies with the worker running them:
#  - catch-up after 5 minutes down, for each policy: the schedules' slots of
#    the last 5 minutes are left unrun (the job is off: the worker is down
#    for them) and the server is restarted; none runs none of them, latest
#    only the newest, all every one, in order;
#  - overlap with a command slower than its period (1 s period, 2.7 s run):
#    skip drops the slots that came due during a run, queue runs every slot,
#    one after another;
#  - every database in resilience.database_names has its own schedules.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('schedule_policies');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres, second'
resilience.worker_naptime = '100ms'
resilience.schedule_interval = '0'
log_line_prefix = '%m [%p] %b '
});
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE second');

my $schema = q{
CREATE EXTENSION resilience;
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tap_sched') THEN
        CREATE ROLE tap_sched NOLOGIN IN ROLE resilience_user;
    END IF;
END $$;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO tap_sched;
CREATE TABLE app.effects (schedule text, slot timestamptz,
    started timestamptz DEFAULT clock_timestamp(), db text DEFAULT current_database());
GRANT INSERT ON app.effects TO tap_sched;
CREATE FUNCTION app.cmd(name text, sleep float8 DEFAULT 0) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('sql', format(
        'INSERT INTO app.effects (schedule, slot) VALUES (%L, current_setting(''resilience.schedule_slot'')::timestamptz);'
        ' SELECT pg_catalog.pg_sleep(%s)', name, sleep)) $$;
};
$node->safe_psql($_, $schema) for ('postgres', 'second');

sub psql { $node->safe_psql('postgres', $_[0]) }

sub set_job_interval
{
	$node->safe_psql('postgres', "ALTER SYSTEM SET resilience.schedule_interval = '$_[0]'");
	$node->reload;
}

# ---- catch-up after 5 minutes down ----
psql(q{
SET ROLE tap_sched;
SELECT resilience.schedule('c_' || p, '* * * * *', app.cmd('c_' || p), catch_up => p)
  FROM unnest(ARRAY['none', 'latest', 'all']) p;
});
# a point 32-50 s into a minute: the newest due slot is then more than its
# grace (30 s) late when the worker comes back, and no new minute begins
$node->poll_query_until('postgres', q{SELECT extract(second FROM clock_timestamp()) BETWEEN 32 AND 45})
  or die 'no clock';
my $minute = psql(q{
UPDATE resilience.schedule_definitions
   SET next_slot = date_trunc('minute', now()) - interval '5 min',
       due_at = date_trunc('minute', now()) - interval '5 min'
 WHERE name LIKE 'c\_%';
SELECT date_trunc('minute', now())});
$node->stop('immediate');
$node->append_conf('postgresql.conf', "resilience.schedule_interval = '1s'");
$node->start;
$node->poll_query_until('postgres', q{
SELECT bool_and(next_slot > now()) FROM resilience.schedules WHERE name LIKE 'c\_%'})
  or die 'the schedules did not catch up';
is(psql(q{SELECT count(*) FROM app.effects WHERE schedule = 'c_none'}), '0',
	'catch_up none: none of the 6 missed slots ran');
is(psql(q{SELECT skipped_slots FROM resilience.schedules WHERE name = 'c_none'}), '6',
	'... all 6 were skipped');
is(psql(qq{SELECT string_agg(slot::text, ',') = '$minute'::timestamptz::text FROM app.effects WHERE schedule = 'c_latest'}),
	't', 'catch_up latest: only the newest missed slot ran');
is(psql(qq{
SELECT count(*) || ' ' || count(DISTINCT slot) || ' ' || (min(slot) = '$minute'::timestamptz - interval '5 min')
       || ' ' || (max(slot) = '$minute'::timestamptz)
  FROM app.effects WHERE schedule = 'c_all'}), '6 6 true true',
	'catch_up all: each of the 6 missed slots ran once');
is(psql(q{
SELECT bool_and(ordered) FROM (
    SELECT slot > lag(slot) OVER w AND started > lag(started) OVER w AS ordered
      FROM app.effects WHERE schedule = 'c_all' WINDOW w AS (ORDER BY started)) o}),
	't', '... in order');
psql(q{SET ROLE tap_sched; SELECT resilience.schedule_pause(name) FROM resilience.schedules WHERE name LIKE 'c\_%'});

# ---- overlap: a 2.7 s command every second ----
sub overlap_run
{
	my ($policy) = @_;
	psql(qq{SET ROLE tap_sched;
SELECT resilience.schedule('o_$policy', '\@every 1 second', app.cmd('o_$policy', 2.7), overlap => '$policy',
       catch_up => 'all')});
	$node->poll_query_until('postgres', qq{SELECT count(*) >= 4 FROM app.effects WHERE schedule = 'o_$policy'})
	  or die "overlap $policy: the schedule does not run";
	psql(qq{SET ROLE tap_sched; SELECT resilience.schedule_pause('o_$policy')});
	# the run in progress finishes
	$node->poll_query_until('postgres', qq{
SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'resilience worker' AND wait_event = 'PgSleep'});
}

overlap_run('skip');
is(psql(q{
SELECT bool_and(gap >= 3) FROM (
    SELECT extract(epoch FROM slot - lag(slot) OVER (ORDER BY slot)) AS gap
      FROM app.effects WHERE schedule = 'o_skip') g WHERE gap IS NOT NULL}),
	't', 'overlap skip: the slots that came due during a run were dropped');
cmp_ok(psql(q{SELECT skipped_slots FROM resilience.schedules WHERE name = 'o_skip'}), '>=', 6,
	'... and counted as skipped');
is(psql(q{
SELECT count(*) FROM app.effects a JOIN app.effects b ON a.schedule = b.schedule AND a.slot < b.slot
 WHERE a.schedule = 'o_skip' AND b.started < a.started + interval '2.7 s'}),
	'0', '... and no run started before the previous one finished');

overlap_run('queue');
is(psql(q{
SELECT bool_and(gap = 1) FROM (
    SELECT extract(epoch FROM slot - lag(slot) OVER (ORDER BY slot)) AS gap
      FROM app.effects WHERE schedule = 'o_queue') g WHERE gap IS NOT NULL}),
	't', 'overlap queue: every slot ran, in order');
is(psql(q{SELECT skipped_slots FROM resilience.schedules WHERE name = 'o_queue'}), '0',
	'... none skipped');
is(psql(q{
SELECT count(*) FROM app.effects a JOIN app.effects b ON a.schedule = b.schedule AND a.slot < b.slot
 WHERE a.schedule = 'o_queue' AND b.started < a.started + interval '2.7 s'}),
	'0', '... one after another');
cmp_ok(psql(q{
SELECT extract(epoch FROM max(started - slot)) FROM app.effects WHERE schedule = 'o_queue'}), '>', 3,
	'... falling behind the clock');

# ---- many databases ----
$node->safe_psql('second', q{SET ROLE tap_sched;
SELECT resilience.schedule('second_db', '@every 1 second', app.cmd('second_db'))});
$node->poll_query_until('second', q{SELECT count(*) >= 2 FROM app.effects WHERE schedule = 'second_db'})
  or die 'the second database\'s schedule does not run';
pass("the second database's worker runs its schedules");
is($node->safe_psql('second', q{SELECT count(*) FROM resilience.schedules}), '1',
	'... which are its own');
is(psql(q{SELECT count(*) FROM app.effects WHERE schedule = 'second_db'}), '0',
	'... and run there, not in the first database');

$node->stop;
done_testing();
