-- Sagas that wait and fan out (issue 16), driven by hand (CALL
-- resilience.saga_run(), each step attempt in a transaction of its own):
-- steps resolve names with their definer's search_path, and a saga whose
-- orchestration fails outside its step is suspended while the others go on.
\set SHOW_CONTEXT never
SELECT setval('resilience.saga_ids', 2000) AS first_saga_id_is_2001;

CREATE ROLE regress_wait_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA shop AUTHORIZATION regress_wait_agent;

SET ROLE regress_wait_agent;
-- Written the usual way: the table named without its schema.
SET search_path = shop, public;
CREATE TABLE orders (saga_id bigint, step text, path text);
CREATE FUNCTION shop.take(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO orders VALUES (saga_id, ctx #>> '{_saga,step}', current_setting('search_path'));
    RETURN jsonb_build_object(ctx #>> '{_saga,step}', 'done');
END
$$;
SELECT resilience.saga_define('order', '[{"name": "take", "action": "take"},
                                        {"name": "again", "action": "take"}]') AS version;
RESET search_path;
RESET ROLE;
SELECT name, search_path FROM resilience.saga_definitions WHERE name = 'order';

------------------------------------------------------------------------------
-- The steps run with the definer's search_path, pg_temp last
------------------------------------------------------------------------------
SET search_path = pg_temp, public;   -- the session that ticks has another one
SELECT resilience.saga_start('order', '{}') AS ordered \gset
CALL resilience.saga_run();
RESET search_path;
SELECT state, context FROM resilience.sagas WHERE id = :ordered;
SELECT step, path FROM shop.orders WHERE saga_id = :ordered;

-- The same definition from another search_path is a new version.
SET ROLE regress_wait_agent;
SET search_path = shop;
SELECT resilience.saga_define('order', '[{"name": "take", "action": "take"},
                                        {"name": "again", "action": "take"}]') AS version;
SELECT resilience.saga_define('order', '[{"name": "take", "action": "take"},
                                        {"name": "again", "action": "take"}]') AS same_version;
RESET search_path;
RESET ROLE;

------------------------------------------------------------------------------
-- No poison saga: an error outside a step suspends that saga only
------------------------------------------------------------------------------
-- A saga whose row points past its definition: reading it fails in every
-- tick, outside any step.  It is due first, yet the others complete.
BEGIN;
SELECT resilience.saga_start('order', '{}') AS poison \gset
UPDATE resilience.sagas SET step = 99 WHERE id = :poison;
COMMIT;
SELECT resilience.saga_start('order', '{}') AS healthy1 \gset
SELECT resilience.saga_start('order', '{}') AS healthy2 \gset
CALL resilience.saga_run();
SELECT id = :poison AS poison, state, next_run_at FROM resilience.sagas
 WHERE id IN (:poison, :healthy1, :healthy2) ORDER BY id;
SELECT event, state, error ->> 'message' AS error FROM resilience.saga_events
 WHERE saga_id = :poison ORDER BY id;
SELECT name, state, waiting_for, last_error ->> 'message' AS last_error
  FROM resilience.stuck_sagas WHERE id = :poison;
-- saga_retry reads the saga first: still broken, nothing changes.
SELECT sqlstate_of(format('SELECT resilience.saga_retry(%s)', :poison));
SELECT state FROM resilience.sagas WHERE id = :poison;
-- Repaired, it resumes where it was (running, step 1) and completes.
UPDATE resilience.sagas SET step = 1 WHERE id = :poison;
SELECT resilience.saga_retry(:poison);
SELECT state, step, next_run_at IS NOT NULL AS due FROM resilience.sagas WHERE id = :poison;
CALL resilience.saga_run();
SELECT state, context FROM resilience.sagas WHERE id = :poison;
SELECT event, state FROM resilience.saga_events WHERE saga_id = :poison ORDER BY id;

-- A suspended running saga can be aborted instead.
BEGIN;
SELECT resilience.saga_start('order', '{}') AS doomed \gset
UPDATE resilience.sagas SET step = 99 WHERE id = :doomed;
COMMIT;
CALL resilience.saga_run();
UPDATE resilience.sagas SET step = 1 WHERE id = :doomed;
SELECT resilience.saga_abort(:doomed, 'given up');
CALL resilience.saga_run();
SELECT state FROM resilience.sagas WHERE id = :doomed;

------------------------------------------------------------------------------
-- Timers and signals
------------------------------------------------------------------------------
CREATE ROLE regress_wait_approver NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_wait_stranger NOLOGIN IN ROLE resilience_user;
SET ROLE regress_wait_agent;
SET search_path = shop;
CREATE FUNCTION shop.untake(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO orders VALUES (saga_id, 'undo ' || (ctx #>> '{_saga,step}'), NULL);
    RETURN NULL;
END
$$;
SELECT resilience.saga_define('stay', $$[
  {"name": "take", "action": "take", "compensation": "untake"},
  {"name": "cool_off", "sleep": "300 ms"},
  {"name": "at_checkin", "until": "checkin"},
  {"name": "approval", "await": "approved", "timeout": "1 hour", "signalers": ["regress_wait_approver"]},
  {"name": "again", "action": "take"}]$$) AS version;
SELECT resilience.saga_define('approve', $$[
  {"name": "take", "action": "take", "compensation": "untake"},
  {"name": "approval", "await": "approved", "timeout": "200 ms"}]$$) AS version;
SELECT resilience.saga_define('approve_or_not', $$[
  {"name": "approval", "await": "approved", "timeout": "200 ms", "on_timeout": "continue"},
  {"name": "take", "action": "take"}]$$) AS version;
RESET search_path;
RESET ROLE;
SELECT name, jsonb_pretty(steps) FROM resilience.saga_definitions WHERE name = 'stay';

-- Drive a saga until it finishes, or waits for a signal at least a minute.
CREATE PROCEDURE shop.settle(saga bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. 200 LOOP
        CALL resilience.saga_run();
        EXIT WHEN (SELECT s.state IN ('completed', 'compensated', 'compensation_failed', 'suspended')
                          OR (s.awaiting AND d.steps -> (s.step - 1) ? 'await'
                              AND s.next_run_at > clock_timestamp() + interval '1 minute')
                     FROM resilience.sagas s JOIN resilience.saga_definitions d ON d.id = s.definition_id
                    WHERE s.id = saga);
        COMMIT;
        PERFORM pg_sleep(0.05);
    END LOOP;
END
$$;

-- A sleep, an until, and a signal that comes before the saga awaits it.
SELECT resilience.saga_start('stay', jsonb_build_object('checkin', clock_timestamp() + interval '2 s'))
    AS stay \gset
CALL resilience.saga_run();
SELECT state, step, awaiting, next_run_at > clock_timestamp() AS timer_set FROM resilience.sagas WHERE id = :stay;
-- A timer not due yet is not stuck.
SET resilience.saga_stuck_after = 0;
SELECT count(*) AS stuck FROM resilience.stuck_sagas WHERE id = :stay;
RESET resilience.saga_stuck_after;
-- The approver signals early; the same signal_id again is recorded once.
SET ROLE regress_wait_approver;
SELECT resilience.saga_signal(:stay, 'approved', '{"approver": "bob"}', 'ticket-1') AS recorded;
SELECT resilience.saga_signal(:stay, 'approved', '{"approver": "eve"}', 'ticket-1') AS recorded_again;
RESET ROLE;
CALL shop.settle(:stay);
SELECT state, context - 'checkin' AS context FROM resilience.sagas WHERE id = :stay;
SELECT event, step, detail ->> 'signal_id' AS signal_id, (detail ->> 'late_ms')::int >= 0 AS fired_late_or_on_time
  FROM resilience.saga_events WHERE saga_id = :stay ORDER BY id;
SELECT signal, signal_id, payload, sent_by, consumed_by FROM resilience.saga_signals WHERE saga_id = :stay;
SELECT step_no, name, state, attempts FROM resilience.saga_steps WHERE saga_id = :stay ORDER BY step_no;

-- A signal while the saga awaits it, addressed by name and idempotency key.
SELECT resilience.saga_start('approve', '{}', 'order-7') AS approve \gset
CALL resilience.saga_run();
SET resilience.saga_stuck_after = 0;
SELECT state, step_name, waiting_for FROM resilience.stuck_sagas WHERE id = :approve;
RESET resilience.saga_stuck_after;
SELECT resilience.saga_signal_by_key('approve', 'order-7', 'approved', '{"ok": true}') AS recorded;
SELECT next_run_at <= clock_timestamp() AS due_at_once FROM resilience.sagas WHERE id = :approve;
CALL resilience.saga_run();
SELECT state, context FROM resilience.sagas WHERE id = :approve;

-- No signal within the timeout: fail (compensating what came before), or
-- continue without a payload.
SELECT resilience.saga_start('approve', '{}') AS refused \gset
CALL shop.settle(:refused);
SELECT state, error #>> '{error,message}' AS error FROM resilience.sagas WHERE id = :refused;
SELECT step, path FROM shop.orders WHERE saga_id = :refused ORDER BY step;
SELECT resilience.saga_start('approve_or_not', '{}') AS unanswered \gset
CALL shop.settle(:unanswered);
SELECT state, context FROM resilience.sagas WHERE id = :unanswered;
SELECT event, step, detail ->> 'on_timeout' AS on_timeout FROM resilience.saga_events
 WHERE saga_id = :unanswered ORDER BY id;

-- until: a key that is missing, or not a time, fails the step.
SELECT resilience.saga_start('stay', '{"checkin": "soon"}') AS bad_time \gset
SELECT resilience.saga_start('stay', '{}') AS no_time \gset
CALL shop.settle(:bad_time);
CALL shop.settle(:no_time);
SELECT id = :bad_time AS bad_time, state, error #>> '{error,message}' AS error
  FROM resilience.sagas WHERE id IN (:bad_time, :no_time) ORDER BY id;

-- Signals refused: a clear error, nothing recorded.
SELECT sqlstate_of(format($$SELECT resilience.saga_signal(%s, 'approved')$$, :approve));  -- finished
SELECT sqlstate_of(format($$SELECT resilience.saga_signal(%s, 'rejected')$$, :stay));     -- no such await
SELECT sqlstate_of($$SELECT resilience.saga_signal(999999, 'approved')$$);
SELECT sqlstate_of($$SELECT resilience.saga_signal_by_key('approve', 'no-such-key', 'approved')$$);
SELECT sqlstate_of($$SELECT resilience.saga_signal(NULL::bigint, 'approved')$$);
SELECT sqlstate_of(format($$SELECT resilience.saga_signal(%s, NULL)$$, :stay));
SELECT sqlstate_of(format($$SELECT resilience.saga_signal(%s, 'approved', '[1]')$$, :stay));
SELECT sqlstate_of(format($$SELECT resilience.saga_signal(%s, 'approved', NULL, '')$$, :stay));
SELECT resilience.saga_start('stay', jsonb_build_object('checkin', clock_timestamp() + interval '1 hour'))
    AS later \gset
SET ROLE regress_wait_stranger;   -- not the definer, not admin, not a signaler
SELECT sqlstate_of(format($$SELECT resilience.saga_signal(%s, 'approved')$$, :later));
RESET ROLE;
SELECT count(*) AS kept FROM resilience.saga_signals WHERE saga_id IN (:approve, :later);

------------------------------------------------------------------------------
-- saga_graph: the definition as Graphviz DOT, and the path a saga took
------------------------------------------------------------------------------
SELECT resilience.saga_graph('stay');
-- :stay completed: every step green, the path bold.
SELECT resilience.saga_graph('stay', :stay);
-- :refused ran take, waited for approval in vain, and undid take.
SELECT resilience.saga_graph('approve', :refused);
SELECT sqlstate_of($$SELECT resilience.saga_graph('no such saga')$$);
SELECT sqlstate_of(format($$SELECT resilience.saga_graph('stay', %s)$$, :refused));
SELECT sqlstate_of($$SELECT resilience.saga_graph(NULL)$$);
