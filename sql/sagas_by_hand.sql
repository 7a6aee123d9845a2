-- A saga tick run by hand (saga_tick, CALL saga_run) runs a step in the
-- session that ticks, where that session's temporary tables and custom
-- settings are visible to the step.  So it takes only the sagas whose
-- definer the session's role has the privileges of (the definer itself, a
-- role that inherits from it, a superuser); the others wait for the worker
-- or for their definer.  No worker runs in this database.
\set SHOW_CONTEXT never

CREATE ROLE regress_tick_alice NOLOGIN IN ROLE resilience_admin;
CREATE ROLE regress_tick_bob NOLOGIN IN ROLE resilience_admin;
CREATE ROLE regress_tick_bob_ops NOLOGIN IN ROLE regress_tick_bob;   -- inherits bob's privileges
CREATE SCHEMA tick;
GRANT USAGE ON SCHEMA tick TO regress_tick_alice, regress_tick_bob;
-- what a step saw: who it ran as, the session's secret setting, its temp table
CREATE TABLE tick.seen (saga text, ran_as text, secret text, sees_temp_table boolean);
GRANT INSERT ON tick.seen TO regress_tick_alice, regress_tick_bob;
CREATE FUNCTION tick.peek(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tick.seen
    VALUES (ctx ->> 'who', current_user, current_setting('app.secret', true),
            to_regclass('pg_temp.private') IS NOT NULL);
    RETURN NULL;
END
$$;

SET ROLE regress_tick_alice;
SELECT resilience.saga_define('tick_alice', '[{"name": "peek", "action": "tick.peek"}]') AS version;
RESET ROLE;
SET ROLE regress_tick_bob;
SELECT resilience.saga_define('tick_bob', '[{"name": "peek", "action": "tick.peek"}]') AS version;
RESET ROLE;
SELECT resilience.saga_start('tick_bob', '{"who": "bob"}') > 0 AS started;
SELECT resilience.saga_start('tick_alice', '{"who": "alice"}') > 0 AS started;

-- Alice, with a temporary table and a secret in her session, drives the
-- sagas by hand: her own saga runs (and sees her session, which is hers),
-- Bob's is left alone.
SET ROLE regress_tick_alice;
CREATE TEMPORARY TABLE private (x int);
SET app.secret = 'alice-secret';
CALL resilience.saga_run();
SELECT resilience.saga_tick() AS advanced;   -- nothing of hers is due any more
RESET app.secret;
DISCARD TEMP;
RESET ROLE;
SELECT name, state FROM resilience.sagas WHERE name LIKE 'tick\_%' ORDER BY name;
SELECT * FROM tick.seen ORDER BY saga;

-- A role that inherits Bob's privileges may drive Bob's sagas: it could run
-- his step functions as Bob anyway (SET ROLE).
SET ROLE regress_tick_bob_ops;
SET app.secret = 'ops-secret';
SELECT resilience.saga_tick() AS advanced;
RESET app.secret;
RESET ROLE;
SELECT name, state FROM resilience.sagas WHERE name LIKE 'tick\_%' ORDER BY name;
SELECT * FROM tick.seen ORDER BY saga;

-- A superuser has the privileges of every role: its tick takes every saga.
SELECT resilience.saga_start('tick_alice', '{"who": "alice again"}') > 0 AS started;
CALL resilience.saga_run();
SELECT name, state, count(*) FROM resilience.sagas WHERE name LIKE 'tick\_%' GROUP BY 1, 2 ORDER BY 1, 2;
SELECT saga, ran_as FROM tick.seen ORDER BY saga;
