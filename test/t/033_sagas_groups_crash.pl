# Parallel groups under kill -9 (issue 16): 4 orchestrators run sagas
# a -> [b1, b2, b3] -> c whose branches take a while; one in three sagas has
# a branch that fails, so its completed branches and step a are
# compensated.  An orchestrator running a branch is killed with SIGKILL
# (crash recovery restarts every backend); afterwards every saga ends
# completed or compensated, no SQL step or compensation was applied twice,
# and every compensated saga undid exactly what it had done.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = PostgreSQL::Test::Cluster->new('sagas_groups_crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.saga_workers = 4
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
CREATE TABLE applied (saga_id bigint, step text, kind text, pid int);
CREATE FUNCTION act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    IF ctx #>> '{_saga,group}' IS NOT NULL THEN
        PERFORM pg_sleep(0.02);
    END IF;
    INSERT INTO applied VALUES (saga_id, ctx #>> '{_saga,step}', 'action', pg_backend_pid());
    IF ctx ->> 'fail' = ctx #>> '{_saga,step}' THEN
        RAISE EXCEPTION 'branch % fails', ctx ->> 'fail';
    END IF;
    RETURN jsonb_build_object('by', pg_backend_pid());
END $$;
CREATE FUNCTION undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO applied VALUES (saga_id, ctx #>> '{_saga,step}', 'undo', pg_backend_pid()) RETURNING NULL::jsonb
$$;
SELECT resilience.saga_define('fan', '[
    {"name": "a", "action": "act", "compensation": "undo"},
    {"name": "g", "parallel": [
        {"name": "b1", "action": "act", "compensation": "undo"},
        {"name": "b2", "action": "act", "compensation": "undo"},
        {"name": "b3", "action": "act", "compensation": "undo"}]},
    {"name": "c", "action": "act"}]');
});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 3 FROM pg_stat_activity
	WHERE backend_type = 'resilience saga helper'}), 'the worker starts 3 saga helpers');

# 150 sagas; every third has branch b2 fail
$node->safe_psql('postgres', q{
	SELECT resilience.saga_start('fan', CASE WHEN i % 3 = 0 THEN '{"fail": "b2"}' ELSE '{}' END::jsonb)
	  FROM generate_series(1, 150) i});

# kill -9 an orchestrator while it runs a branch (pg_sleep in a branch)
my $victim = '';
my $t0 = time;
while (!$victim && time - $t0 < 60)
{
	$victim = $node->safe_psql('postgres', q{
		SELECT pid FROM pg_stat_activity
		 WHERE backend_type IN ('resilience saga helper', 'resilience worker')
		   AND wait_event = 'PgSleep' LIMIT 1});
	usleep(5_000) unless $victim;
}
ok($victim, "an orchestrator ($victim) was caught running a branch");
my $branches_done = $node->safe_psql('postgres',
	q{SELECT count(*) FROM resilience.saga_branches WHERE state <> 'pending'});
my $log_offset = -s $node->logfile;
kill 'KILL', $victim if $victim;
# the postmaster logs the death when it reaps the child, which a first
# connection can beat (and then be cut by the crash restart): wait for the
# line first (dies after the default timeout)
ok($node->wait_for_log(qr/terminated by signal 9/, $log_offset), 'the postmaster saw the SIGKILL');
ok($node->poll_query_until('postgres', 'SELECT true'), 'the server is back after crash recovery');
cmp_ok($branches_done, '<', 450, "it was mid-group ($branches_done of 450 branches had finished)");

my $finished = 0;
$t0 = time;
while (time - $t0 < 120)
{
	$finished = $node->safe_psql('postgres',
		q{SELECT count(*) FROM resilience.sagas WHERE state IN ('completed', 'compensated')});
	last if $finished == 150;
	usleep(200_000);
}
is($finished, 150, 'every saga ended completed or compensated');
is($node->safe_psql('postgres', q{
	SELECT string_agg(DISTINCT state || ':' || (context ->> 'fail' IS NOT NULL), ' ' ORDER BY state || ':' || (context ->> 'fail' IS NOT NULL))
	  FROM resilience.sagas}),
	'compensated:true completed:false', 'the failing ones compensated, the others completed');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT saga_id, step, kind FROM app.applied GROUP BY 1, 2, 3 HAVING count(*) > 1) d}),
	'0', 'no step, branch or compensation was applied twice');
# completed sagas: a, b1, b2, b3, c once each, nothing undone
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s WHERE s.state = 'completed' AND
	  (SELECT string_agg(step || '/' || kind, ' ' ORDER BY step, kind) FROM app.applied p WHERE p.saga_id = s.id)
	  IS DISTINCT FROM 'a/action b1/action b2/action b3/action c/action'}),
	'0', 'each completed saga applied a, b1, b2, b3 and c once');
# compensated sagas: every branch that completed (and a) undone once, b2 never
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s WHERE s.state = 'compensated' AND (
	    EXISTS (SELECT FROM resilience.saga_branches b WHERE b.saga_id = s.id
	             AND b.state NOT IN ('compensated', 'cancelled', 'failed'))
	 OR (SELECT count(*) FROM app.applied p WHERE p.saga_id = s.id AND p.kind = 'undo')
	    <> 1 + (SELECT count(*) FROM resilience.saga_branches b WHERE b.saga_id = s.id AND b.state = 'compensated')
	 OR EXISTS (SELECT FROM app.applied p WHERE p.saga_id = s.id AND p.step IN ('b2', 'c') AND p.kind = 'undo')
	 OR NOT EXISTS (SELECT FROM app.applied p WHERE p.saga_id = s.id AND p.step = 'a' AND p.kind = 'undo'))}),
	'0', 'each compensated saga undid its completed branches and a, once each');
# a's undo comes after the branches' undos
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s WHERE s.state = 'compensated' AND EXISTS (
	  SELECT FROM resilience.saga_events u, resilience.saga_events b
	   WHERE u.saga_id = s.id AND b.saga_id = s.id AND u.step = 'a' AND u.event = 'step_compensated'
	     AND b.step LIKE 'b_' AND b.event = 'step_compensated' AND b.id > u.id)}),
	'0', 'the step before the group was undone after the group\'s branches');
cmp_ok($node->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT saga_id FROM app.applied WHERE step LIKE 'b_' AND kind = 'action'
	  GROUP BY saga_id HAVING count(DISTINCT pid) > 1) x}), '>', 0,
	'the branches of a group ran in several orchestrators');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.saga_branches WHERE next_run_at IS NOT NULL}),
	'0', 'no branch is left due');

$node->stop;
done_testing();
