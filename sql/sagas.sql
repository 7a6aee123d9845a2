-- Sagas: the contract.  No worker runs in this database: sagas are driven
-- by hand, CALL resilience.saga_run() running every due step attempt, each
-- in a transaction of its own.  trip.log records every effect that
-- committed; a failed attempt rolls its own effect back.
\set SHOW_CONTEXT never

CREATE ROLE regress_saga_agent NOLOGIN IN ROLE resilience_admin;   -- defines sagas: steps run as it
CREATE ROLE regress_saga_app NOLOGIN IN ROLE resilience_user;      -- starts sagas, answers commands
CREATE SCHEMA trip;
GRANT USAGE ON SCHEMA trip TO regress_saga_agent;
CREATE TABLE trip.log (id bigserial, saga_id bigint, step text, op text, attempt int, who text, path text);
GRANT SELECT, INSERT ON trip.log TO regress_saga_agent;
GRANT USAGE ON SEQUENCE trip.log_id_seq TO regress_saga_agent;
-- a compensation fails while its step is listed here (with this SQLSTATE)
CREATE TABLE trip.broken (step text, sqlstate text);
GRANT SELECT ON trip.broken TO regress_saga_agent;
-- regress_saga_agent has no privilege at all on this one
CREATE TABLE trip.secret (x int);
INSERT INTO trip.secret VALUES (42);

-- An action: log, optionally sleep, optionally fail (payload "fail": {step:
-- {"times": n, "sqlstate": s}} fails the first n attempts, or all).
CREATE FUNCTION trip.act(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    this_step text := ctx #>> '{_saga,step}';
    attempt int := (ctx #>> '{_saga,attempt}')::int;
    f jsonb := ctx -> 'fail' -> this_step;
BEGIN
    INSERT INTO trip.log (saga_id, step, op, attempt, who, path)
    VALUES (saga_id, this_step, 'do', attempt, current_user, current_setting('search_path'));
    IF ctx -> 'sleep' ? this_step THEN
        PERFORM pg_sleep((ctx -> 'sleep' ->> this_step)::float8);
    END IF;
    IF f IS NOT NULL AND attempt <= coalesce((f ->> 'times')::int, 1000) THEN
        RAISE EXCEPTION '% failed on attempt %', this_step, attempt
            USING ERRCODE = coalesce(f ->> 'sqlstate', 'P0001');
    END IF;
    RETURN jsonb_build_object(this_step || '_ref', upper(this_step));
END
$$;

CREATE FUNCTION trip.undo(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    this_step text := ctx #>> '{_saga,step}';
    code text;
BEGIN
    INSERT INTO trip.log (saga_id, step, op, attempt, who, path)
    VALUES (saga_id, this_step, 'undo', (ctx #>> '{_saga,attempt}')::int, current_user,
            current_setting('search_path'));
    SELECT b.sqlstate INTO code FROM trip.broken b WHERE b.step = this_step;
    IF FOUND THEN
        RAISE EXCEPTION 'cannot undo %', this_step USING ERRCODE = code;
    END IF;
    RETURN jsonb_build_object(this_step || '_undone', true);
END
$$;

-- Drive one saga until it finishes, parks, or waits for a reply.
CREATE PROCEDURE trip.settle(saga bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. 500 LOOP
        CALL resilience.saga_run();
        EXIT WHEN (SELECT state IN ('completed', 'compensated', 'compensation_failed')
                          OR (awaiting AND reply IS NULL)
                     FROM resilience.sagas WHERE id = saga);
        COMMIT;
        PERFORM pg_sleep(0.02);
    END LOOP;
END
$$;

-- A saga's story, and the effects of its steps.
CREATE FUNCTION trip.story(saga bigint)
RETURNS TABLE (event text, step text, attempt int, state text, error text)
LANGUAGE sql AS $$
    SELECT event, step, attempt, state, error ->> 'message'
      FROM resilience.saga_events WHERE saga_id = saga ORDER BY id
$$;
CREATE FUNCTION trip.effects(saga bigint) RETURNS TABLE (step text, op text, attempt int, who text)
LANGUAGE sql AS $$
    SELECT step, op, attempt, who FROM trip.log WHERE saga_id = saga ORDER BY id
$$;

SET ROLE regress_saga_agent;
SELECT resilience.saga_define('trip', $$[
  {"name": "flight", "action": "trip.act", "compensation": "trip.undo",
   "backoff": {"base": "10 ms", "cap": "20 ms"}},
  {"name": "hotel", "action": "trip.act", "compensation": "trip.undo",
   "backoff": {"base": "10 ms", "cap": "20 ms"}},
  {"name": "car", "action": "trip.act", "compensation": "trip.undo",
   "backoff": {"base": "10 ms", "cap": "20 ms"}, "timeout": "300 ms", "max_attempts": 2}
]$$) AS version;
RESET ROLE;
-- Defaults spelled out, functions schema-qualified, the definer recorded.
SELECT name, version, definer, jsonb_pretty(steps -> 0) AS first_step
  FROM resilience.saga_definitions WHERE name = 'trip';

------------------------------------------------------------------------------
-- Happy path
------------------------------------------------------------------------------
SET ROLE regress_saga_app;
SELECT resilience.saga_start('trip', '{"traveller": "ann"}') AS happy \gset
RESET ROLE;
SELECT state, step, attempt, context FROM resilience.sagas WHERE id = :happy;
CALL trip.settle(:happy);
SELECT state, step, context, error, finished_at IS NOT NULL AS finished, next_run_at
  FROM resilience.sagas WHERE id = :happy;
SELECT * FROM trip.story(:happy);
-- Each step ran once, as the role that defined the saga, with its search_path (pg_temp last).
SELECT step, op, attempt, who, path FROM trip.log WHERE saga_id = :happy ORDER BY id;
SELECT step_no, name, state, attempts, result FROM resilience.saga_steps WHERE saga_id = :happy ORDER BY step_no;
-- Every event carries the key participants see.
SELECT event, step, replace(correlation_id, :'happy', 'ID') AS correlation_id
  FROM resilience.saga_events WHERE saga_id = :happy ORDER BY id;

------------------------------------------------------------------------------
-- A failure in step 3 compensates step 2, then step 1
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{"fail": {"car": {}}}') AS failing \gset
CALL trip.settle(:failing);
SELECT state, step, error #>> '{step}' AS failed_step, error #>> '{error,message}' AS failure,
       context ? 'hotel_undone' AND context ? 'flight_undone' AS undone
  FROM resilience.sagas WHERE id = :failing;
SELECT * FROM trip.story(:failing);
-- The failed attempt's own effect was rolled back: car never happened.
SELECT * FROM trip.effects(:failing);
SELECT step_no, name, state, attempts, compensation_attempts, compensated_at IS NOT NULL AS compensated
  FROM resilience.saga_steps WHERE saga_id = :failing ORDER BY step_no;

------------------------------------------------------------------------------
-- A retryable failure is retried with backoff, then succeeds
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{"fail": {"hotel": {"times": 2, "sqlstate": "40001"}}}') AS retried \gset
CALL trip.settle(:retried);
SELECT state FROM resilience.sagas WHERE id = :retried;
SELECT event, step, attempt, error ->> 'sqlstate' AS sqlstate, detail ->> 'retryable' AS retryable,
       detail ? 'retry_at' AS retry_scheduled
  FROM resilience.saga_events WHERE saga_id = :retried AND step = 'hotel' ORDER BY id;
-- Only the successful attempt's effect committed.
SELECT * FROM trip.effects(:retried) WHERE step = 'hotel';
SELECT attempts FROM resilience.saga_steps WHERE saga_id = :retried AND name = 'hotel';
-- Each retry waited until the time its backoff set, which was at most the cap (20 ms) away.
SELECT count(*) AS retries, bool_and(next_at >= retry_at) AS waited,
       bool_and(retry_at <= at + interval '20 ms') AS capped
  FROM (SELECT at, (detail ->> 'retry_at')::timestamptz AS retry_at, lead(at) OVER (ORDER BY id) AS next_at
          FROM resilience.saga_events WHERE saga_id = :retried AND step = 'hotel') e
 WHERE retry_at IS NOT NULL;

-- A retryable failure that persists uses up max_attempts, then compensates.
SELECT resilience.saga_start('trip', '{"fail": {"hotel": {"sqlstate": "40P01"}}}') AS exhausted \gset
CALL trip.settle(:exhausted);
SELECT * FROM trip.story(:exhausted);
SELECT * FROM trip.effects(:exhausted);

------------------------------------------------------------------------------
-- A step that exceeds its timeout is cancelled (retried: timeouts are
-- retryable), then the saga compensates
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{"sleep": {"car": 30}}') AS slow \gset
SELECT clock_timestamp() AS t0 \gset
CALL trip.settle(:slow);
SELECT clock_timestamp() - :'t0' < interval '10 seconds' AS did_not_wait_for_the_step;
SELECT * FROM trip.story(:slow);
SELECT error FROM resilience.saga_steps WHERE saga_id = :slow AND name = 'car';
SELECT * FROM trip.effects(:slow);
-- The caller's own statement_timeout still applies, and a cancel that is not
-- the step's timeout is not taken for a step failure: nothing is recorded.
SELECT resilience.saga_start('trip', '{"sleep": {"flight": 30}}') AS cancelled \gset
SET statement_timeout = '100ms';
SELECT resilience.saga_tick();
RESET statement_timeout;
SELECT state, step, attempt FROM resilience.sagas WHERE id = :cancelled;
SELECT * FROM trip.story(:cancelled);
SELECT resilience.saga_abort(:cancelled, 'test over');
CALL trip.settle(:cancelled);

------------------------------------------------------------------------------
-- A compensation that keeps failing parks the saga; saga_retry resumes it
------------------------------------------------------------------------------
INSERT INTO trip.broken VALUES ('flight', '55P03');
SELECT resilience.saga_start('trip', '{"fail": {"car": {}}}') AS parked \gset
CALL trip.settle(:parked);
SELECT state, step, attempt, next_run_at FROM resilience.sagas WHERE id = :parked;
SELECT * FROM trip.story(:parked);
SELECT name, state, compensation_attempts, error ->> 'message' AS error
  FROM resilience.saga_steps WHERE saga_id = :parked ORDER BY step_no;
-- stuck_sagas says what it waits for.
SET resilience.saga_stuck_after = 0;
SELECT step, step_name, state, waiting_for, last_error ->> 'message' AS last_error
  FROM resilience.stuck_sagas WHERE id = :parked;
-- Aborting it makes no sense: it is already compensating.
SELECT resilience.saga_abort(:parked, 'give up');
-- Retried before the cause is fixed: max_attempts afresh, parked again.
SELECT resilience.saga_retry(:parked);
SELECT state, next_run_at IS NOT NULL AS due FROM resilience.sagas WHERE id = :parked;
CALL trip.settle(:parked);
SELECT state, (SELECT compensation_attempts FROM resilience.saga_steps WHERE saga_id = :parked AND name = 'flight')
  FROM resilience.sagas WHERE id = :parked;
-- Fixed, then retried: compensated.
DELETE FROM trip.broken;
SELECT resilience.saga_retry(:parked);
CALL trip.settle(:parked);
SELECT state FROM resilience.sagas WHERE id = :parked;
SELECT * FROM trip.story(:parked) OFFSET 10;
-- Every undo that failed was rolled back; the one that worked committed once.
SELECT step, op, count(*) FROM trip.log WHERE saga_id = :parked GROUP BY step, op ORDER BY step, op;
SELECT count(*) AS stuck FROM resilience.stuck_sagas WHERE id = :parked;
RESET resilience.saga_stuck_after;

------------------------------------------------------------------------------
-- saga_abort compensates what a running saga completed
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{}') AS aborted \gset
SELECT resilience.saga_tick();   -- flight
SELECT resilience.saga_abort(:aborted, 'customer cancelled');
SELECT state, error FROM resilience.sagas WHERE id = :aborted;
CALL trip.settle(:aborted);
SELECT * FROM trip.story(:aborted);
SELECT * FROM trip.effects(:aborted);
SELECT resilience.saga_abort(:aborted, 'again');
SELECT resilience.saga_retry(:happy);

------------------------------------------------------------------------------
-- A step's effect commits with the saga's advance, or not at all
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{}') AS atomic \gset
BEGIN;
SELECT resilience.saga_tick();
SELECT count(*) AS effects_inside FROM trip.log WHERE saga_id = :atomic;
ROLLBACK;
SELECT state, step, attempt FROM resilience.sagas WHERE id = :atomic;
SELECT count(*) AS effects_after_rollback FROM trip.log WHERE saga_id = :atomic;
SELECT count(*) AS events FROM resilience.saga_events WHERE saga_id = :atomic;
CALL trip.settle(:atomic);
SELECT step, op, attempt FROM trip.log WHERE saga_id = :atomic ORDER BY id;

------------------------------------------------------------------------------
-- saga_start is idempotent per saga name and key
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{"order": 7}', 'order-7') AS first \gset
SELECT resilience.saga_start('trip', '{"order": 7}', 'order-7') = :first AS same_saga;
SELECT count(*) AS sagas, (SELECT count(*) FROM resilience.saga_events e
                            WHERE e.saga_id = :first AND e.event = 'saga_started') AS started
  FROM resilience.sagas WHERE idempotency_key = 'order-7';
-- the same key with another payload is a mistake
SELECT resilience.saga_start('trip', '{"order": 8}', 'order-7');
-- a rolled-back start leaves no trace: the key is free again
BEGIN;
SELECT resilience.saga_start('trip', '{}', 'order-9') IS NOT NULL AS started;
ROLLBACK;
SELECT count(*) FROM resilience.sagas WHERE idempotency_key = 'order-9';
SELECT resilience.saga_start('trip', '{}', 'order-9') > :first AS new_saga;
-- once it has run, the key still returns it
CALL resilience.saga_run();
SELECT resilience.saga_start('trip', '{"order": 7}', 'order-7') = :first AS still_same;

------------------------------------------------------------------------------
-- Versions: running sagas finish on the version they started with
------------------------------------------------------------------------------
SELECT resilience.saga_start('trip', '{}') AS on_v1 \gset
SET ROLE regress_saga_agent;
SELECT resilience.saga_define('trip', $$[
  {"name": "flight", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "hotel", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "car", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "insurance", "action": "trip.act"}
]$$) AS version;
-- the same definition again is the same version
SELECT resilience.saga_define('trip', $$[
  {"name": "flight", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "hotel", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "car", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "insurance", "action": "trip.act", "max_attempts": 3}
]$$) AS version;
RESET ROLE;
SELECT resilience.saga_start('trip', '{}') AS on_v2 \gset
CALL resilience.saga_run();
SELECT s.id = :on_v1 AS first, d.version, s.state, (SELECT count(*) FROM trip.log l WHERE l.saga_id = s.id) AS steps
  FROM resilience.sagas s JOIN resilience.saga_definitions d ON d.id = s.definition_id
 WHERE s.id IN (:on_v1, :on_v2) ORDER BY s.id;
-- definitions are immutable
UPDATE resilience.saga_definitions SET steps = '[]' WHERE name = 'trip' AND version = 1;

------------------------------------------------------------------------------
-- Async steps: a command, answered by a reply handler
------------------------------------------------------------------------------
SET ROLE regress_saga_agent;
SELECT resilience.saga_define('pay', $$[
  {"name": "reserve", "action": "trip.act", "compensation": "trip.undo"},
  {"name": "charge", "action": "async", "compensation": "async", "topic": "payments",
   "timeout": "5 s", "max_attempts": 1},
  {"name": "ship", "action": "trip.act"}
]$$) AS version;
RESET ROLE;

-- completed by a reply; a second reply is recorded and ignored (the app
-- starts the saga: only its role, the definer's and resilience_admin may
-- reply, docs/operations.md "Roles and tenants")
SET ROLE regress_saga_app;
SELECT resilience.saga_start('pay', '{"amount": 10}') AS paid \gset
RESET ROLE;
CALL trip.settle(:paid);
SELECT state, step, attempt, awaiting, reply FROM resilience.sagas WHERE id = :paid;
SELECT event, step, detail ->> 'command' AS command, detail ->> 'topic' AS topic,
       detail -> 'outbox_event_id' <> 'null' AS published
  FROM resilience.saga_events WHERE saga_id = :paid AND event = 'command_sent';
SET resilience.saga_stuck_after = 0;
SELECT step_name, waiting_for FROM resilience.stuck_sagas WHERE id = :paid;
RESET resilience.saga_stuck_after;
SET ROLE regress_saga_app;
SELECT resilience.saga_step_completed(:paid, 'charge', '{"charge_id": "ch_1"}') AS accepted;
SELECT resilience.saga_step_completed(:paid, 'charge', '{"charge_id": "ch_2"}') AS accepted;
RESET ROLE;
CALL trip.settle(:paid);
SELECT state, context ->> 'charge_id' AS charge_id FROM resilience.sagas WHERE id = :paid;
-- a reply after the saga moved on is recorded and ignored, too
SELECT resilience.saga_step_completed(:paid, 'charge', '{"charge_id": "ch_3"}') AS accepted;
SELECT * FROM trip.story(:paid);
SELECT event, detail ->> 'reason' AS reason, detail -> 'result' AS result
  FROM resilience.saga_events WHERE saga_id = :paid AND event = 'reply_ignored' ORDER BY id;
SELECT * FROM trip.effects(:paid);

-- a late reply after the timeout is recorded and ignored; the step timed
-- out, and since it may have been done it is compensated too
SELECT resilience.saga_start('pay', '{"amount": 20}') AS late \gset
CALL trip.settle(:late);
-- as if the 5 s had passed (test/t/011_sagas_worker.pl waits for real)
UPDATE resilience.sagas SET next_run_at = clock_timestamp() - interval '1 ms' WHERE id = :late;
SELECT resilience.saga_step_completed(:late, 'charge', '{"charge_id": "ch_late"}') AS accepted;
CALL trip.settle(:late);
SELECT state, step, awaiting, context ? 'charge_id' AS got_charge FROM resilience.sagas WHERE id = :late;
-- its compensation is async too: the refund is answered with compensation => true
SELECT resilience.saga_step_completed(:late, 'charge', '{"refund_id": "re_1"}');
SELECT resilience.saga_step_completed(:late, 'charge', '{"refund_id": "re_1"}', compensation => true) AS accepted;
CALL trip.settle(:late);
SELECT state, context ->> 'refund_id' AS refund_id FROM resilience.sagas WHERE id = :late;
SELECT * FROM trip.story(:late);
SELECT event, detail ->> 'reason' AS reason FROM resilience.saga_events
 WHERE saga_id = :late AND event LIKE 'reply%' ORDER BY id;
SELECT * FROM trip.effects(:late);

-- a failure reply (not retryable): the charge is not compensated, reserve is
SELECT resilience.saga_start('pay', '{"amount": 30}') AS declined \gset
CALL trip.settle(:declined);
SELECT resilience.saga_step_failed(:declined, 'charge', '{"message": "card declined"}', false) AS accepted;
CALL trip.settle(:declined);
SELECT state, error FROM resilience.sagas WHERE id = :declined;
SELECT * FROM trip.story(:declined);
SELECT name, state FROM resilience.saga_steps WHERE saga_id = :declined ORDER BY step_no;

-- aborting a saga whose command is out abandons it (its reply is ignored)
-- and compensates it
SELECT resilience.saga_start('pay', '{"amount": 40}') AS abandoned \gset
CALL trip.settle(:abandoned);
SELECT resilience.saga_abort(:abandoned, 'too slow');
SELECT resilience.saga_step_completed(:abandoned, 'charge', '{}') AS accepted;
CALL trip.settle(:abandoned);
SELECT name, state FROM resilience.saga_steps WHERE saga_id = :abandoned ORDER BY step_no;
SELECT state, step, awaiting FROM resilience.sagas WHERE id = :abandoned;
-- the participant finds nothing to refund: for a compensation, that is done
SELECT resilience.saga_step_completed(:abandoned, 'charge', '{"refund": "none"}', compensation => true) AS accepted;
CALL trip.settle(:abandoned);
SELECT state FROM resilience.sagas WHERE id = :abandoned;

-- Commands are published through resilience.outbox_publish in the
-- transaction that records them (written when it commits); a queue route
-- lets the test read them as a participant would.
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('payments', 'queue', 'trip-payments');
SELECT resilience.saga_start('pay', '{"amount": 50}') AS published \gset
SELECT resilience.saga_tick();   -- reserve
BEGIN;
SELECT resilience.saga_tick();   -- the command, in a transaction that rolls back
SELECT count(*) AS published_inside FROM resilience.outbox WHERE key = 'saga:' || :'published';
ROLLBACK;
SELECT count(*) AS published_after_rollback FROM resilience.outbox WHERE key = 'saga:' || :'published';
SELECT resilience.saga_tick();
SELECT topic, replace(key, :'published', 'ID') AS key,
       payload - 'context' - 'saga_id' - 'reply_by' - 'idempotency_key' AS payload,
       payload -> 'context' AS context,
       replace(payload ->> 'idempotency_key', :'published', 'ID') AS idempotency_key,
       headers - 'Saga-Id' - 'Saga-Idempotency-Key' AS headers,
       replace(headers ->> 'Saga-Idempotency-Key', :'published', 'ID') AS header_key
  FROM resilience.outbox_claim('trip-payments', 100, '1 minute') WHERE key = 'saga:' || :'published';
SELECT (detail ->> 'outbox_event_id')::bigint =
       (SELECT id FROM resilience.outbox WHERE key = 'saga:' || :'published') AS event_has_outbox_id
  FROM resilience.saga_events WHERE saga_id = :published AND event = 'command_sent';
SELECT resilience.saga_step_completed(:published, 'charge', '{}');
CALL trip.settle(:published);
SELECT state FROM resilience.sagas WHERE id = :published;
-- the trace context of the transaction that started the saga travels with
-- its commands (docs/outbox.md, "Trace context")
BEGIN;
SET LOCAL resilience.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SET LOCAL resilience.tracestate = 'rojo=00f067aa0ba902b7';
SELECT resilience.saga_start('pay', '{"amount": 60}') AS traced \gset
COMMIT;
SELECT resilience.saga_tick();   -- reserve
SELECT resilience.saga_tick();   -- the command
SELECT headers ->> 'traceparent' AS traceparent, headers ->> 'tracestate' AS tracestate
  FROM resilience.outbox_claim('trip-payments', 100, '1 minute') WHERE key = 'saga:' || :'traced';
SELECT resilience.saga_step_completed(:traced, 'charge', '{}');
CALL trip.settle(:traced);
SELECT state, trace_context IS NOT NULL AS traced FROM resilience.sagas WHERE id = :traced;
DELETE FROM resilience.outbox_routes WHERE target = 'trip-payments';

------------------------------------------------------------------------------
-- Security: steps run as the definer, with the definer's privileges only
------------------------------------------------------------------------------
CREATE FUNCTION trip.snoop(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT jsonb_build_object('secret', (SELECT x FROM trip.secret)) $$;
CREATE FUNCTION trip.escalate(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN SET ROLE postgres; RETURN '{}'; END $$;
CREATE FUNCTION trip.temp_table(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN CREATE TEMP TABLE shadow (x int); RETURN '{}'; END $$;
CREATE FUNCTION trip.leak(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('regress.leak', 'leaked', false);
    PERFORM set_config('search_path', 'trip', false);
    RETURN jsonb_build_object('set', current_setting('regress.leak'));
END
$$;
CREATE FUNCTION trip.look(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('seen', current_setting('regress.leak', true), 'path', current_setting('search_path'))
$$;
SET ROLE regress_saga_agent;
SELECT resilience.saga_define('snoop', '[{"name": "read_secret", "action": "trip.snoop"}]');
SELECT resilience.saga_define('escalate', '[{"name": "become_superuser", "action": "trip.escalate"}]');
SELECT resilience.saga_define('temp', '[{"name": "temp_table", "action": "trip.temp_table"}]');
SELECT resilience.saga_define('leak', '[{"name": "set", "action": "trip.leak"}, {"name": "look", "action": "trip.look"}]');
RESET ROLE;
-- the function works for a role that may read the table...
SELECT trip.snoop(0, '{}');
-- ...but a step runs as regress_saga_agent, which may not
SELECT resilience.saga_start('snoop', '{}') AS snoop \gset
CALL trip.settle(:snoop);
SELECT state, error #>> '{error,sqlstate}' AS sqlstate, error #>> '{error,message}' AS message
  FROM resilience.sagas WHERE id = :snoop;
SELECT resilience.saga_start('escalate', '{}') AS escalate \gset
CALL trip.settle(:escalate);
SELECT state, error #>> '{error,sqlstate}' AS sqlstate, error #>> '{error,message}' AS message
  FROM resilience.sagas WHERE id = :escalate;
SELECT resilience.saga_start('temp', '{}') AS temp \gset
CALL trip.settle(:temp);
SELECT state, error #>> '{error,sqlstate}' AS sqlstate, error #>> '{error,message}' AS message
  FROM resilience.sagas WHERE id = :temp;
-- settings a step changes, even for the session, end with the step
SELECT resilience.saga_start('leak', '{}') AS leak \gset
CALL trip.settle(:leak);
SELECT state, context FROM resilience.sagas WHERE id = :leak;
SELECT current_setting('regress.leak', true) AS in_this_session, current_setting('search_path') AS search_path;
-- a definer that has become a superuser is refused
ALTER ROLE regress_saga_agent SUPERUSER;
SELECT resilience.saga_start('trip', '{}') AS now_super \gset
CALL trip.settle(:now_super);
ALTER ROLE regress_saga_agent NOSUPERUSER;
SELECT state, error #>> '{error,sqlstate}' AS sqlstate, error #>> '{error,message}' AS message
  FROM resilience.sagas WHERE id = :now_super;
SELECT count(*) AS effects FROM trip.log WHERE saga_id = :now_super;
-- a superuser cannot define a saga
SELECT resilience.saga_define('as_superuser', '[{"name": "a", "action": "trip.act"}]');
-- resilience_user starts sagas and answers commands, and does nothing else
SET ROLE regress_saga_app;
SELECT resilience.saga_define('app', '[{"name": "a", "action": "trip.act"}]');
SELECT resilience.saga_tick();
SELECT resilience.saga_abort(:happy, 'no');
SELECT resilience.saga_retry(:happy);
SELECT count(*) FROM resilience.sagas;
SELECT count(*) >= 0 AS can_see_stats FROM resilience.saga_stats;
RESET ROLE;
-- resilience_admin handles sagas, and reads their tables
SET ROLE regress_saga_agent;
SELECT count(*) > 0 AS sees_sagas FROM resilience.sagas;
SELECT count(*) >= 0 AS sees_stuck FROM resilience.stuck_sagas;
UPDATE resilience.sagas SET state = 'completed' WHERE id = :escalate;
RESET ROLE;
-- nothing but resilience_admin and resilience_user may call saga functions
SELECT p.oid::regprocedure AS function, r.rolname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace,
       LATERAL aclexplode(p.proacl) a JOIN pg_roles r ON r.oid = a.grantee
 WHERE n.nspname = 'resilience' AND p.proname LIKE '%saga%' AND a.privilege_type = 'EXECUTE'
   AND r.rolname NOT IN ('postgres')
 ORDER BY p.oid::regprocedure::text, r.rolname;
-- and PUBLIC none of them (the reaper is the owner's, run by run_reaper)
SELECT p.oid::regprocedure AS function_executable_by_public
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND p.proname LIKE '%saga%'
   AND (p.proacl IS NULL OR EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0));
-- SECURITY DEFINER functions pin search_path
SELECT p.oid::regprocedure AS unpinned_security_definer
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND p.prosecdef
   AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false);

------------------------------------------------------------------------------
-- Statistics, and the reaper
------------------------------------------------------------------------------
SELECT name, version, state, sagas, p50_duration <= p95_duration AS ordered, retries
  FROM resilience.saga_stats ORDER BY name, version, state;
SELECT item FROM resilience.run_reaper() WHERE item = 'sagas';
-- unfinished sagas are kept, whatever their age
SELECT resilience.saga_start('pay', '{}') AS unfinished \gset
CALL trip.settle(:unfinished);
SELECT count(*) AS finished FROM resilience.sagas WHERE state IN ('completed', 'compensated') \gset
SET resilience.saga_retention = 0;
SELECT resilience._saga_reap() = :finished AS reaped_every_finished_saga;
RESET resilience.saga_retention;
SELECT id = :unfinished AS unfinished, state, awaiting FROM resilience.sagas;
SELECT count(*) AS orphan_events FROM resilience.saga_events e
 WHERE NOT EXISTS (SELECT FROM resilience.sagas s WHERE s.id = e.saga_id);
SELECT count(*) AS orphan_steps FROM resilience.saga_steps t
 WHERE NOT EXISTS (SELECT FROM resilience.sagas s WHERE s.id = t.saga_id);
