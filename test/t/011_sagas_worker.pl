# Sagas driven by the worker's sagas job.
#  - saga_start wakes the worker: sagas finish long before its safety poll
#    (resilience.saga_interval = 1h here);
#  - the worker sleeps only until the next deadline: an async step with no
#    reply times out on time, and a SQL step running past its timeout is
#    cancelled inside the worker;
#  - the test plays an async participant: it sees the command, replies, and
#    the worker completes the saga; a reply after the deadline is ignored;
#  - a compensation that keeps failing parks the saga and says so at LOG;
#  - stuck_sagas shows a saga nobody drives (no worker in that database);
#  - the reaper removes finished sagas after resilience.saga_retention;
#  - DROP EXTENSION does not wait for the job, and after CREATE EXTENSION
#    the same worker runs sagas again.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = PostgreSQL::Test::Cluster->new('sagas_worker');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.saga_interval = '1h'
resilience.reaper_interval = '200ms'
resilience.saga_retention = '1h'
log_line_prefix = '%m [%p] %b '
});
$node->start;

my $schema = q{
CREATE EXTENSION resilience;
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tap_agent') THEN
        CREATE ROLE tap_agent NOLOGIN IN ROLE resilience_admin;
    END IF;
END $$;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO tap_agent;
CREATE TABLE app.log (id serial, saga_id bigint, step text, op text);
GRANT INSERT ON app.log TO tap_agent;
GRANT USAGE ON SEQUENCE app.log_id_seq TO tap_agent;
CREATE TABLE app.broken (step text);
GRANT SELECT ON app.broken TO tap_agent;
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO app.log (saga_id, step, op) VALUES (saga_id, ctx #>> '{_saga,step}', 'do');
    IF ctx -> 'sleep' ? (ctx #>> '{_saga,step}') THEN
        PERFORM pg_sleep((ctx -> 'sleep' ->> (ctx #>> '{_saga,step}'))::float8);
    END IF;
    RETURN jsonb_build_object(ctx #>> '{_saga,step}', 'done');
END $$;
CREATE FUNCTION app.undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM app.broken b WHERE b.step = ctx #>> '{_saga,step}') THEN
        RAISE EXCEPTION 'cannot undo %', ctx #>> '{_saga,step}';
    END IF;
    INSERT INTO app.log (saga_id, step, op) VALUES (saga_id, ctx #>> '{_saga,step}', 'undo');
    RETURN NULL;
END $$;
SET ROLE tap_agent;
SELECT resilience.saga_define('three', '[
  {"name": "a", "action": "app.act", "compensation": "app.undo"},
  {"name": "b", "action": "app.act", "compensation": "app.undo"},
  {"name": "c", "action": "app.act", "compensation": "app.undo", "timeout": "500 ms", "max_attempts": 1}]');
SELECT resilience.saga_define('async', '[
  {"name": "a", "action": "app.act", "compensation": "app.undo"},
  {"name": "remote", "action": "async", "topic": "remote.commands", "timeout": "1 s", "max_attempts": 1}]');
-- the same with a timeout no loaded machine reaches: for the replies
SELECT resilience.saga_define('async_patient', '[
  {"name": "a", "action": "app.act", "compensation": "app.undo"},
  {"name": "remote", "action": "async", "topic": "remote.commands", "timeout": "10 minutes", "max_attempts": 1}]');
RESET ROLE;
};
$node->safe_psql('postgres', $schema);

# Wait (bounded) until saga $id is in one of the states of $re; returns the
# state and the seconds it took.
sub wait_saga
{
	my ($id, $re, $limit) = @_;
	$limit //= 60;
	my $t0 = time;
	my $state = '';
	while (time - $t0 < $limit)
	{
		$state = $node->safe_psql('postgres', "SELECT state FROM resilience.sagas WHERE id = $id");
		return ($state, time - $t0) if $state =~ $re;
		usleep(20_000);
	}
	return ($state, time - $t0);
}

sub story
{
	my ($id) = @_;
	return $node->safe_psql('postgres',
		"SELECT string_agg(event || coalesce(':' || step, ''), ' ' ORDER BY id) FROM resilience.saga_events WHERE saga_id = $id");
}

ok( $node->poll_query_until('postgres',
		q{SELECT state IN ('idle', 'running') FROM resilience.workers WHERE job = 'sagas'}),
	'the worker runs the sagas job once the extension exists');

# --- saga_start wakes the worker ---
for my $i (1 .. 3)
{
	my $id = $node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{}')});
	my ($state, $took) = wait_saga($id, qr/^completed$/, 20);
	is($state, 'completed', "saga $i completed by the worker");
	cmp_ok($took, '<', 20, sprintf('... in %.2f s, not at the safety poll an hour away', $took));
}
is($node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE op = 'do') || '/' || count(*) FROM app.log}),
	'9/9', 'each of the 9 steps ran once, nothing was undone');

# --- the worker wakes for deadlines: a SQL step past its timeout is cancelled ---
my $slow = $node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{"sleep": {"c": 60}}')});
my ($state, $took) = wait_saga($slow, qr/^(compensated|compensation_failed)$/, 50);
is($state, 'compensated', 'a SQL step running past its timeout is cancelled in the worker, then compensated');
cmp_ok($took, '<', 50, sprintf('... in %.2f s (step c sleeps 60 s; its timeout is 500 ms)', $took));
like(story($slow), qr/^saga_started step_completed:a step_completed:b step_timed_out:c compensation_started step_compensated:b step_compensated:a saga_compensated$/,
	'... with the whole story in saga_events');

# --- async: the test plays the participant ---
# (a 10-minute timeout: the reply below must not race the deadline on a loaded machine)
my $async = $node->safe_psql('postgres', q{SELECT resilience.saga_start('async_patient', '{"order": 1}')});
ok( $node->poll_query_until('postgres',
		qq{SELECT awaiting FROM resilience.sagas WHERE id = $async}),
	'the worker sends the async command and waits');
is($node->safe_psql('postgres', qq{
	SELECT detail ->> 'topic' FROM resilience.saga_events WHERE saga_id = $async AND event = 'command_sent'}),
	'remote.commands', 'the command went to the step\'s topic');
is($node->safe_psql('postgres', qq{SELECT resilience.saga_step_completed($async, 'remote', '{"remote_id": 7}')}),
	't', 'the participant\'s reply is accepted');
($state, $took) = wait_saga($async, qr/^completed$/, 20);
is($state, 'completed', 'the reply wakes the worker, which completes the saga');
is($node->safe_psql('postgres', qq{SELECT context ->> 'remote_id' FROM resilience.sagas WHERE id = $async}),
	'7', 'the reply\'s result is in the context');

# no reply: the worker times the step out on time (its poll is an hour away)
my $silent = $node->safe_psql('postgres', q{SELECT resilience.saga_start('async', '{"order": 2}')});
($state, $took) = wait_saga($silent, qr/^(compensated|compensating)$/, 30);
like($state, qr/^compensat/, 'an async step without a reply times out');
cmp_ok($took, '<', 30, sprintf('... in %.2f s: the worker does not wait for its safety poll', $took));
my $after = $node->safe_psql('postgres', qq{
	SELECT extract(epoch FROM max(at) FILTER (WHERE event = 'step_timed_out')
	                        - max(at) FILTER (WHERE event = 'command_sent'))
	  FROM resilience.saga_events WHERE saga_id = $silent});
cmp_ok($after, '>=', 1, sprintf('... and not before its 1 s timeout (%.3f s after the command)', $after));
is($node->safe_psql('postgres', qq{SELECT resilience.saga_step_completed($silent, 'remote', '{"remote_id": 8}')}),
	'f', 'a reply after the timeout is ignored');
($state) = wait_saga($silent, qr/^compensated$/, 20);
is($state, 'compensated', 'the saga is compensated');
is($node->safe_psql('postgres', qq{
	SELECT string_agg(step || ' ' || op, ', ' ORDER BY id) FROM app.log WHERE saga_id = $silent}),
	'a do, a undo', 'step a was undone, the late reply changed nothing');
like(story($silent), qr/command_sent:remote step_timed_out:remote .*reply_ignored:remote$/,
	'the timeout and the ignored reply are in the story');

# --- parked sagas are logged ---
my $offset = -s $node->logfile;
$node->safe_psql('postgres', q{INSERT INTO app.broken VALUES ('a')});
my $parked = $node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{"sleep": {"c": 60}}')});
($state) = wait_saga($parked, qr/^compensation_failed$/, 60);
is($state, 'compensation_failed', 'a compensation that keeps failing parks the saga');
ok( $node->wait_for_log(qr/LOG:  saga $parked \("three" version 1\) is parked in compensation_failed/, $offset),
	'... and says so at LOG, with what to do');
like(slurp_file($node->logfile, $offset), qr/HINT:  Fix the cause, then call resilience\.saga_retry\($parked\)/,
	'... with the hint');
$node->safe_psql('postgres', qq{DELETE FROM app.broken; SELECT resilience.saga_retry($parked)});
($state) = wait_saga($parked, qr/^compensated$/, 20);
is($state, 'compensated', 'saga_retry wakes the worker, which compensates it');

# --- a database without a worker: stuck_sagas shows what waits ---
$node->safe_psql('postgres', 'CREATE DATABASE idle');
$node->safe_psql('idle', $schema);
my $stuck = $node->safe_psql('idle', q{SELECT resilience.saga_start('three', '{}')});
usleep(1_200_000);
is($node->safe_psql('idle', q{
	SET resilience.saga_stuck_after = '1s';
	SELECT step_name || ' ' || waiting_for FROM resilience.stuck_sagas}),
	'a worker', 'stuck_sagas shows a saga no worker drives');
$node->safe_psql('idle', 'CALL resilience.saga_run()');
is($node->safe_psql('idle', "SELECT state FROM resilience.sagas WHERE id = $stuck"),
	'completed', 'saga_run drives it by hand');

# --- retention ---
my $finished = $node->safe_psql('postgres',
	q{SELECT count(*) FROM resilience.sagas WHERE state IN ('completed', 'compensated')});
cmp_ok($finished, '>', 0, 'there are finished sagas');
my $waiting = $node->safe_psql('postgres', q{SELECT resilience.saga_start('async_patient', '{"order": 3}')});
$node->poll_query_until('postgres', qq{SELECT awaiting FROM resilience.sagas WHERE id = $waiting})
  or die 'no command';
$node->append_conf('postgresql.conf', "resilience.saga_retention = '1s'");
$node->reload;
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM resilience.sagas WHERE state IN ('completed', 'compensated')}),
	'the reaper removes finished sagas after resilience.saga_retention');
is($node->safe_psql('postgres', qq{SELECT state FROM resilience.sagas WHERE id = $waiting}),
	'running', 'an unfinished saga is kept');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.saga_events e
	 WHERE NOT EXISTS (SELECT FROM resilience.sagas s WHERE s.id = e.saga_id)}),
	'0', 'their events went with them');
$node->append_conf('postgresql.conf', "resilience.saga_retention = '1h'");
$node->reload;

is($node->safe_psql('postgres', q{
	SELECT runs > 0 AND failures = 0 FROM resilience.workers WHERE job = 'sagas'}),
	't', 'the sagas job ran without a failure');

# --- DROP EXTENSION while sagas run; CREATE EXTENSION again ---
$node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{"sleep": {"a": 0.05, "b": 0.05, "c": 0.05}}') FROM generate_series(1, 20)});
usleep(100_000);
my $t0 = time;
$node->safe_psql('postgres', 'DROP EXTENSION resilience CASCADE; DROP SCHEMA app CASCADE');
cmp_ok(time - $t0, '<', 10, 'DROP EXTENSION does not wait for the sagas job');
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'resilience worker'
		   AND wait_event_type = 'Lock'}),
	'the worker does not wait for a lock');
$offset = -s $node->logfile;
$node->safe_psql('postgres', $schema);
my $again = $node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{}')});
($state) = wait_saga($again, qr/^completed$/, 20);
is($state, 'completed', 'after CREATE EXTENSION the worker runs sagas again');
unlike(slurp_file($node->logfile, $offset), qr/ERROR|FATAL|PANIC/, 'with nothing alarming in the log');

$node->stop;
done_testing();
