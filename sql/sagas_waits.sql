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
