-- Parallel groups (issue 16), driven by hand (CALL resilience.saga_run():
-- each branch attempt and each saga tick in a transaction of its own).
\set SHOW_CONTEXT never
SELECT setval('resilience.saga_ids', 3000) AS first_saga_id_is_3001;

CREATE ROLE regress_group_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA grp AUTHORIZATION regress_group_agent;
SET ROLE regress_group_agent;
SET search_path = grp;
-- every effect once: a second action or undo of one step would be refused
CREATE TABLE effects (saga_id bigint, step text, kind text, n serial, UNIQUE (saga_id, step, kind));
CREATE FUNCTION act(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    step text := ctx #>> '{_saga,step}';
BEGIN
    INSERT INTO effects (saga_id, step, kind) VALUES (saga_id, step, 'action');
    IF ctx ->> 'fail' = step THEN
        RAISE EXCEPTION 'no % available', step USING ERRCODE = 'check_violation';
    END IF;
    RETURN jsonb_build_object('ref', upper(step), 'group', ctx #>> '{_saga,group}',
                              'key', ctx #>> '{_saga,idempotency_key}');
END
$$;
CREATE FUNCTION undo(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO effects (saga_id, step, kind) VALUES (saga_id, ctx #>> '{_saga,step}', 'undo');
    IF ctx ->> 'fail_undo' = ctx #>> '{_saga,step}' AND NOT EXISTS (SELECT FROM grp.repaired) THEN
        RAISE EXCEPTION 'cannot undo %', ctx #>> '{_saga,step}';
    END IF;
    RETURN NULL;
END
$$;
CREATE TABLE repaired ();
SELECT resilience.saga_define('holiday', '[
    {"name": "reserve", "action": "act", "compensation": "undo"},
    {"name": "book", "parallel": [
        {"name": "flight", "action": "act", "compensation": "undo"},
        {"name": "hotel", "action": "act", "compensation": "undo"},
        {"name": "car", "action": "act"}]},
    {"name": "pay", "action": "act", "compensation": "undo"}]') AS version;
RESET search_path;
RESET ROLE;
-- the group is stored with its branches normalized
SELECT jsonb_pretty(steps -> 1) FROM resilience.saga_definitions WHERE name = 'holiday';

------------------------------------------------------------------------------
-- Every branch completes: the results merge under the branch names
------------------------------------------------------------------------------
SELECT resilience.saga_start('holiday', '{}') AS happy \gset
CALL resilience.saga_run();
SELECT state, jsonb_pretty(context) AS context FROM resilience.sagas WHERE id = :happy;
SELECT step_no, name, state, attempts, result IS NOT NULL AS has_result
  FROM resilience.saga_steps WHERE saga_id = :happy ORDER BY step_no;
SELECT step_no, branch_no, name, state, attempts, next_run_at, result ->> 'ref' AS ref
  FROM resilience.saga_branches WHERE saga_id = :happy ORDER BY branch_no;
SELECT event, step, state FROM resilience.saga_events WHERE saga_id = :happy ORDER BY id;
SELECT step, kind FROM grp.effects WHERE saga_id = :happy ORDER BY n;

------------------------------------------------------------------------------
-- A branch fails: the completed branches are compensated, then the steps
-- before the group in reverse
------------------------------------------------------------------------------
SELECT resilience.saga_start('holiday', '{"fail": "car"}') AS late_fail \gset
CALL resilience.saga_run();
SELECT state, error FROM resilience.sagas WHERE id = :late_fail;
SELECT name, state, attempts, compensation_attempts, error ->> 'message' AS error
  FROM resilience.saga_branches WHERE saga_id = :late_fail ORDER BY branch_no;
SELECT step_no, name, state FROM resilience.saga_steps WHERE saga_id = :late_fail ORDER BY step_no;
SELECT step, kind FROM grp.effects WHERE saga_id = :late_fail ORDER BY n;
-- the undo of reserve comes after every branch compensation
SELECT (SELECT n FROM grp.effects WHERE saga_id = :late_fail AND step = 'reserve' AND kind = 'undo')
       > (SELECT max(n) FROM grp.effects WHERE saga_id = :late_fail AND step <> 'reserve' AND kind = 'undo')
       AS reserve_undone_last;
SELECT event, step, state FROM resilience.saga_events WHERE saga_id = :late_fail ORDER BY id;

-- The first branch fails: the branches not started are cancelled, never run.
SELECT resilience.saga_start('holiday', '{"fail": "flight"}') AS early_fail \gset
CALL resilience.saga_run();
SELECT state FROM resilience.sagas WHERE id = :early_fail;
SELECT name, state, attempts FROM resilience.saga_branches WHERE saga_id = :early_fail ORDER BY branch_no;
SELECT step, kind FROM grp.effects WHERE saga_id = :early_fail ORDER BY n;

------------------------------------------------------------------------------
-- Aborted while in the group: branches not started are cancelled, the
-- completed ones compensated, then the earlier steps
------------------------------------------------------------------------------
SELECT resilience.saga_start('holiday', '{}') AS aborted \gset
SELECT resilience.saga_tick() AS reserve, resilience.saga_tick() AS enter_group,
       resilience.saga_tick() AS first_branch;
SELECT name, state FROM resilience.saga_branches WHERE saga_id = :aborted ORDER BY branch_no;
-- an hour without progress: stuck_sagas says it waits for its branches
UPDATE resilience.sagas SET updated_at = updated_at - interval '1 hour' WHERE id = :aborted;
SELECT step_name, waiting_for FROM resilience.stuck_sagas WHERE id = :aborted;
SELECT resilience.saga_abort(:aborted, 'changed my mind');
SELECT name, state FROM resilience.saga_branches WHERE saga_id = :aborted ORDER BY branch_no;
CALL resilience.saga_run();
SELECT state FROM resilience.sagas WHERE id = :aborted;
SELECT step, kind FROM grp.effects WHERE saga_id = :aborted ORDER BY n;

------------------------------------------------------------------------------
-- A branch compensation that fails parks the saga; saga_retry resumes it
------------------------------------------------------------------------------
SELECT resilience.saga_start('holiday', '{"fail": "car", "fail_undo": "hotel"}') AS parked \gset
CALL resilience.saga_run();
SELECT state, step FROM resilience.sagas WHERE id = :parked;
SELECT name, state, compensation_attempts FROM resilience.saga_branches WHERE saga_id = :parked ORDER BY branch_no;
SELECT event, step, state FROM resilience.saga_events WHERE saga_id = :parked AND id > (
    SELECT max(id) FROM resilience.saga_events WHERE saga_id = :parked AND event = 'group_failed') ORDER BY id;
INSERT INTO grp.repaired DEFAULT VALUES;
SELECT resilience.saga_retry(:parked);
CALL resilience.saga_run();
SELECT state FROM resilience.sagas WHERE id = :parked;
SELECT name, state, compensation_attempts FROM resilience.saga_branches WHERE saga_id = :parked ORDER BY branch_no;
SELECT step, kind FROM grp.effects WHERE saga_id = :parked AND kind = 'undo' ORDER BY n;

------------------------------------------------------------------------------
-- Async branches (the test plays the participants): every command of the
-- group goes out in the transaction that enters it, beside SQL branches
------------------------------------------------------------------------------
SET ROLE regress_group_agent;
SET search_path = grp;
SELECT resilience.saga_define('trip', '[
    {"name": "reserve", "action": "act", "compensation": "undo"},
    {"name": "book", "parallel": [
        {"name": "flight", "action": "async", "compensation": "async", "topic": "air", "timeout": "1 hour"},
        {"name": "hotel", "action": "async", "compensation": "undo", "topic": "stay", "timeout": "1 hour",
         "max_attempts": 2, "backoff": {"base": "10 ms", "cap": "10 ms", "jitter": "none"}},
        {"name": "car", "action": "act", "compensation": "undo"}]},
    {"name": "pay", "action": "act", "compensation": "undo"}]') AS version;
SELECT resilience.saga_define('trip_timeout', '[
    {"name": "reserve", "action": "act", "compensation": "undo"},
    {"name": "book", "parallel": [
        {"name": "slow", "action": "async", "compensation": "undo", "topic": "slow", "timeout": "100 ms", "max_attempts": 1},
        {"name": "fast", "action": "act", "compensation": "undo"}]}]') AS version;
RESET search_path;
RESET ROLE;
CREATE ROLE regress_group_stranger NOLOGIN IN ROLE resilience_user;
-- the commands sent for a saga, numbered by the transaction that sent them
CREATE FUNCTION pg_temp.commands(saga bigint)
RETURNS TABLE (key text, attempt text, topic text, "group" text, transaction bigint)
LANGUAGE sql AS $$
    SELECT o.payload ->> 'idempotency_key', o.payload ->> 'attempt', o.topic, o.payload ->> 'group',
           dense_rank() OVER (ORDER BY o.xmin::text::bigint)
      FROM resilience.outbox o WHERE o.payload ->> 'saga_id' = saga::text ORDER BY o.id, o.seq
$$;

-- Replies in any order: the group completes when both came, results under
-- the branch names
SELECT resilience.saga_start('trip', '{}') AS trip \gset
CALL resilience.saga_run();
SELECT * FROM pg_temp.commands(:trip);
SELECT name, state, attempts, awaiting, result ->> 'ref' AS ref
  FROM resilience.saga_branches WHERE saga_id = :trip ORDER BY branch_no;
SELECT state, step, awaiting FROM resilience.sagas WHERE id = :trip;
-- a role that neither started nor defined the saga may not reply: 42501, nothing changes
SET ROLE regress_group_stranger;
SELECT resilience.saga_step_completed(:trip, 'hotel', '{"evil": true}');
RESET ROLE;
SELECT resilience.saga_step_completed(:trip, 'hotel', '{"room": 12}') AS hotel_reply;
CALL resilience.saga_run();
SELECT state, step, awaiting FROM resilience.sagas WHERE id = :trip;
SELECT resilience.saga_step_completed(:trip, 'flight', '{"seat": "3A"}') AS flight_reply;
-- the same reply again is ignored (false), whether applied yet or not
SELECT resilience.saga_step_completed(:trip, 'flight', '{"seat": "9C"}') AS flight_again;
CALL resilience.saga_run();
SELECT resilience.saga_step_completed(:trip, 'hotel', '{"room": 13}') AS hotel_again;
SELECT state, context -> 'flight' AS flight, context -> 'hotel' AS hotel, context -> 'car' ->> 'ref' AS car,
       context ->> 'ref' AS pay
  FROM resilience.sagas WHERE id = :trip;
SELECT name, state, attempts, awaiting, reply IS NULL AS reply_applied, result
  FROM resilience.saga_branches WHERE saga_id = :trip ORDER BY branch_no;
SELECT event, step, attempt, detail ->> 'reason' AS reason
  FROM resilience.saga_events WHERE saga_id = :trip ORDER BY id;
-- no compensation command was ever sent for it: the stale-reply error
SELECT resilience.saga_step_completed(:trip, 'flight', NULL, true);
-- not async: the same error as for a step
SELECT resilience.saga_step_completed(:trip, 'car', NULL);

-- A failed branch: the completed async branch's compensation goes out,
-- the SQL branch is undone, then reserve; a retryable failure is retried
SELECT resilience.saga_start('trip', '{}') AS trip_fail \gset
CALL resilience.saga_run();
SELECT resilience.saga_step_failed(:trip_fail, 'hotel', '{"why": "full"}', true) AS hotel_retryable;
CALL resilience.saga_run();
SELECT pg_sleep(0.1);
CALL resilience.saga_run();
SELECT * FROM pg_temp.commands(:trip_fail);
SELECT resilience.saga_step_completed(:trip_fail, 'flight', '{"seat": "1A"}') AS flight_reply;
SELECT resilience.saga_step_failed(:trip_fail, 'hotel', '{"why": "still full"}', false) AS hotel_failed;
CALL resilience.saga_run();
SELECT state, error -> 'branch' AS branch FROM resilience.sagas WHERE id = :trip_fail;
SELECT name, state, attempts, compensation_attempts, awaiting FROM resilience.saga_branches
 WHERE saga_id = :trip_fail ORDER BY branch_no;
SELECT * FROM pg_temp.commands(:trip_fail);
SELECT step, kind FROM grp.effects WHERE saga_id = :trip_fail ORDER BY n;
-- a reply for the failed branch is stale (false); its compensation is SQL (error)
SELECT resilience.saga_step_completed(:trip_fail, 'hotel', '{"room": 1}') AS hotel_late;
SELECT resilience.saga_step_completed(:trip_fail, 'hotel', NULL, true);
SELECT resilience.saga_step_completed(:trip_fail, 'flight', NULL, true) AS flight_undone;
CALL resilience.saga_run();
SELECT state FROM resilience.sagas WHERE id = :trip_fail;
SELECT name, state, compensation_attempts FROM resilience.saga_branches WHERE saga_id = :trip_fail ORDER BY branch_no;
SELECT step, kind FROM grp.effects WHERE saga_id = :trip_fail ORDER BY n;
SELECT event, step, attempt FROM resilience.saga_events WHERE saga_id = :trip_fail ORDER BY id;

-- No reply within the timeout: the branch is timed_out, and compensated
-- (it may have been done), with the completed SQL branch and reserve
SELECT resilience.saga_start('trip_timeout', '{}') AS trip_slow \gset
CALL resilience.saga_run();
SELECT pg_sleep(0.3);
CALL resilience.saga_run();
SELECT state FROM resilience.sagas WHERE id = :trip_slow;
SELECT name, state, attempts, compensation_attempts FROM resilience.saga_branches WHERE saga_id = :trip_slow ORDER BY branch_no;
SELECT step, kind FROM grp.effects WHERE saga_id = :trip_slow ORDER BY n;
SELECT resilience.saga_step_completed(:trip_slow, 'slow', NULL) AS too_late;
SELECT resilience.saga_graph('trip', :trip_fail);

------------------------------------------------------------------------------
-- The picture: the group as a cluster; with a saga, the path it took
------------------------------------------------------------------------------
SELECT resilience.saga_graph('holiday');
SELECT resilience.saga_graph('holiday', :late_fail);

-- every effect above happened once (the unique constraint), and nothing is left due
SELECT count(*) AS due_branches FROM resilience.saga_branches WHERE next_run_at IS NOT NULL;
SELECT count(*) AS unfinished FROM resilience.sagas WHERE id > 3000 AND finished_at IS NULL;
