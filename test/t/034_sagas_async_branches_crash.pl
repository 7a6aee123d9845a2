# Async branches of parallel groups under kill -9 (issue 16): sagas
# a -> [air (async, async undo), hotel (async, SQL undo), car (SQL)] -> c,
# run by 2 orchestrators.  Once every saga has sent its group's commands,
# an orchestrator is killed with SIGKILL (crash recovery restarts every
# backend); then the test plays the participants, replying from the outbox
# (hotel fails in one saga in three), and kills an orchestrator again while
# the replies are being applied.  Every saga ends completed or compensated,
# each command went out exactly once per attempt (outbox events counted per
# idempotency key and attempt), and no SQL step or undo ran twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $nsagas = 60;
my $node = PostgreSQL::Test::Cluster->new('sagas_async_branches_crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.saga_workers = 2
max_worker_processes = 16
restart_after_crash = on
});
$node->start;

# applied has no unique constraint: a step applied twice is counted, not refused
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE tap_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA app AUTHORIZATION tap_agent;
SET ROLE tap_agent;
SET search_path = app;
CREATE TABLE applied (saga_id bigint, step text, kind text);
CREATE FUNCTION act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO applied VALUES (saga_id, ctx #>> '{_saga,step}', 'action') RETURNING jsonb_build_object('done', true)
$$;
CREATE FUNCTION undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO applied VALUES (saga_id, ctx #>> '{_saga,step}', 'undo') RETURNING NULL::jsonb
$$;
SELECT resilience.saga_define('trip', '[
    {"name": "a", "action": "act", "compensation": "undo"},
    {"name": "g", "parallel": [
        {"name": "air", "action": "async", "compensation": "async", "topic": "air", "timeout": "10 min"},
        {"name": "hotel", "action": "async", "compensation": "undo", "topic": "stay", "timeout": "10 min"},
        {"name": "car", "action": "act", "compensation": "undo"}]},
    {"name": "c", "action": "act"}]');
RESET ROLE;
-- the participants: answer every command of the outbox not answered yet
CREATE TABLE app.answered (key text, attempt int, PRIMARY KEY (key, attempt));
CREATE FUNCTION app.answer() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    cmd record;
    n bigint := 0;
BEGIN
    FOR cmd IN SELECT (o.payload ->> 'saga_id')::bigint AS saga_id, o.payload ->> 'step' AS step,
                      o.payload ->> 'command' AS command, o.payload ->> 'idempotency_key' AS key,
                      (o.payload ->> 'attempt')::int AS attempt, o.payload #>> '{context,fail}' AS fail
                 FROM resilience.outbox o
                WHERE NOT EXISTS (SELECT FROM app.answered a WHERE a.key = o.payload ->> 'idempotency_key'
                                     AND a.attempt = (o.payload ->> 'attempt')::int)
                ORDER BY o.id LOOP
        IF cmd.command = 'compensation' THEN
            PERFORM resilience.saga_step_completed(cmd.saga_id, cmd.step, NULL, true);
        ELSIF cmd.fail = cmd.step THEN
            PERFORM resilience.saga_step_failed(cmd.saga_id, cmd.step, '{"why": "full"}', false, false);
        ELSE
            PERFORM resilience.saga_step_completed(cmd.saga_id, cmd.step, jsonb_build_object('ref', cmd.key), false);
        END IF;
        INSERT INTO app.answered VALUES (cmd.key, cmd.attempt);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;
});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
	WHERE backend_type = 'resilience saga helper'}), 'the worker starts a saga helper');

$node->safe_psql('postgres', qq{
	SELECT resilience.saga_start('trip', CASE WHEN i % 3 = 0 THEN '{"fail": "hotel"}' ELSE '{}' END::jsonb)
	  FROM generate_series(1, $nsagas) i});

# every saga waits at its group, both commands out, its SQL branch done
ok($node->poll_query_until('postgres', qq{
	SELECT count(*) FILTER (WHERE awaiting) = 2 * $nsagas
	   AND count(*) FILTER (WHERE name = 'car' AND state = 'completed') = $nsagas
	  FROM resilience.saga_branches}),
	'every saga sent its two async commands and ran its SQL branch');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.saga_events WHERE event = 'command_sent' GROUP BY xmin HAVING count(*) <> 2}),
	'', 'each saga sent its two commands in one transaction');

sub kill_orchestrator
{
	my ($what) = @_;
	my $victim = $node->safe_psql('postgres', q{
		SELECT pid FROM pg_stat_activity
		 WHERE backend_type IN ('resilience saga helper', 'resilience worker') LIMIT 1});
	ok($victim, "an orchestrator ($victim) to kill $what");
	my $log_offset = -s $node->logfile;
	kill 'KILL', $victim if $victim;
	# the postmaster logs the death when it reaps the child, which a first
	# connection can beat (and then be cut by the crash restart): wait for
	# the line first (dies after the default timeout)
	ok($node->wait_for_log(qr/terminated by signal 9/, $log_offset),
		"the postmaster saw the SIGKILL ($what)");
	ok($node->poll_query_until('postgres', 'SELECT true'), "the server is back after crash recovery ($what)");
}

kill_orchestrator('between dispatch and replies');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.saga_branches WHERE awaiting AND reply IS NULL}),
	2 * $nsagas, 'the commands are still out after the crash');

# reply to everything; kill again while the first replies are applied
my $answered = $node->safe_psql('postgres', 'SELECT app.answer()');
is($answered, 2 * $nsagas, 'the participants answered every command');
kill_orchestrator('while replies are applied');

my $finished = 0;
my $t0 = time;
while (time - $t0 < 120)
{
	$node->safe_psql('postgres', 'SELECT app.answer()');
	$finished = $node->safe_psql('postgres',
		q{SELECT count(*) FROM resilience.sagas WHERE state IN ('completed', 'compensated')});
	last if $finished == $nsagas;
	usleep(200_000);
}
is($finished, $nsagas, 'every saga ended completed or compensated');
is($node->safe_psql('postgres', q{
	SELECT string_agg(DISTINCT state || ':' || (context ->> 'fail' IS NOT NULL), ' ' ORDER BY state || ':' || (context ->> 'fail' IS NOT NULL))
	  FROM resilience.sagas}),
	'compensated:true completed:false', 'the sagas whose hotel failed compensated, the others completed');

# each command exactly once per attempt, and as many attempts as recorded
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT payload ->> 'idempotency_key', payload ->> 'attempt' FROM resilience.outbox
	                      GROUP BY 1, 2 HAVING count(*) > 1) d}),
	'0', 'no command went out twice for one attempt');
is($node->safe_psql('postgres', q{
	WITH sent AS (SELECT payload ->> 'idempotency_key' AS key, count(*) AS n FROM resilience.outbox GROUP BY 1),
	     recorded AS (SELECT 'saga:' || saga_id || ':' || name AS key, attempts AS n FROM resilience.saga_branches
	                   WHERE name IN ('air', 'hotel')
	                  UNION ALL
	                  SELECT 'saga:' || saga_id || ':' || name || ':compensate', compensation_attempts
	                    FROM resilience.saga_branches WHERE name = 'air' AND compensation_attempts > 0)
	SELECT count(*) FROM sent FULL JOIN recorded USING (key) WHERE sent.n IS DISTINCT FROM recorded.n}),
	'0', 'each command went out once per attempt the branch records');
is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM resilience.outbox WHERE payload ->> 'command' = 'action'}),
	2 * $nsagas, 'one attempt of each async action');
is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM resilience.outbox WHERE payload ->> 'command' = 'compensation'}),
	$nsagas / 3, 'one compensation command per compensated saga (air)');

is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT saga_id, step, kind FROM app.applied GROUP BY 1, 2, 3 HAVING count(*) > 1) d}),
	'0', 'no SQL step or undo was applied twice');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s WHERE s.state = 'completed' AND (
	  (SELECT string_agg(step || '/' || kind, ' ' ORDER BY step, kind) FROM app.applied p WHERE p.saga_id = s.id)
	    IS DISTINCT FROM 'a/action c/action car/action'
	  OR s.context -> 'air' ->> 'ref' IS DISTINCT FROM 'saga:' || s.id || ':air'
	  OR s.context -> 'hotel' ->> 'ref' IS DISTINCT FROM 'saga:' || s.id || ':hotel')}),
	'0', 'each completed saga ran a, car and c once and has both replies under the branch names');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s WHERE s.state = 'compensated' AND (
	  (SELECT string_agg(step || '/' || kind, ' ' ORDER BY step, kind) FROM app.applied p WHERE p.saga_id = s.id)
	    IS DISTINCT FROM 'a/action a/undo car/action car/undo'
	  OR (SELECT string_agg(name || '/' || state, ' ' ORDER BY branch_no) FROM resilience.saga_branches b
	       WHERE b.saga_id = s.id) IS DISTINCT FROM 'air/compensated hotel/failed car/compensated')}),
	'0', 'each compensated saga undid air (by command), car and a, and not the failed hotel');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.saga_branches WHERE next_run_at IS NOT NULL OR awaiting}),
	'0', 'no branch is left due or waiting');

$node->stop;
done_testing();
