-- Idempotency keys and privileges: callers reach the tables only through the
-- functions; the SECURITY DEFINER ones pin search_path; idempotent() runs its
-- SQL as the caller; and a hostile search_path (an "=" operator that is
-- always true, ahead of pg_catalog) changes nothing.
BEGIN;
SELECT plan(17);

CREATE ROLE idem_app IN ROLE resilience_user;
CREATE ROLE idem_ops IN ROLE resilience_admin;   -- runs the reaper
CREATE ROLE idem_other IN ROLE resilience_user;  -- another application
CREATE SCHEMA idem_evil AUTHORIZATION idem_app;
GRANT USAGE ON SCHEMA idem_evil TO idem_ops;
CREATE TABLE idem_secret (v int);
INSERT INTO idem_secret VALUES (1);

-- The tables grant nothing to anybody.
SELECT table_privs_are('resilience', 'idempotency_keys', 'public', ARRAY[]::text[],
    'PUBLIC has no privilege on resilience.idempotency_keys');
SELECT table_privs_are('resilience', 'inbox', 'public', ARRAY[]::text[],
    'PUBLIC has no privilege on resilience.inbox');
SELECT table_privs_are('resilience', 'idempotency_keys', 'idem_app', ARRAY[]::text[],
    'nor has an application role');

-- Any SECURITY DEFINER function pins search_path; idempotent() is not one.
SELECT is_empty($$
    SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'resilience' AND p.prosecdef
       AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)$$,
    'every SECURITY DEFINER function sets search_path = pg_catalog, pg_temp');
SELECT isnt_definer('resilience', 'idempotent',
    ARRAY['text', 'text', 'jsonb', 'text', 'interval', 'interval'],
    'idempotent() runs as its caller');

SET ROLE idem_app;
SELECT throws_ok($$SELECT count(*) FROM resilience.idempotency_keys$$, '42501', NULL,
    'an application role cannot read the keys directly');
SELECT throws_ok($$DELETE FROM resilience.inbox$$, '42501', NULL,
    'nor change the inbox directly');

-- ... but it can use every function.
SELECT is((SELECT outcome FROM resilience.idempotency_begin('sec', 'k1', '{"a": 1}')), 'proceed',
    'an application role begins a key');
SELECT lives_ok($$SELECT resilience.idempotency_complete('sec', 'k1', '{"r": 1}', 200)$$,
    'and completes it');
SELECT is((SELECT response FROM resilience.idempotency_begin('sec', 'k1', '{"a": 1}')), '{"r": 1}'::jsonb,
    'and gets the replay');
SELECT ok(resilience.inbox_accept('sec', 'm1'), 'and accepts inbox messages');

-- Its keys are its own: another application role can neither replay nor
-- answer them (docs/idempotency.md, "Security").
SET ROLE idem_other;
SELECT throws_ok($$SELECT resilience.idempotency_begin('sec', 'k1', '{"a": 1}')$$, '42501', NULL,
    'another application role cannot replay its key');
SET ROLE idem_app;
SELECT outcome FROM resilience.idempotency_begin('sec', 'k2', '{}');
SET ROLE idem_other;
SELECT throws_ok($$SELECT resilience.idempotency_complete('sec', 'k2', '{"forged": true}')$$, '42501', NULL,
    'nor complete its key in progress');
SET ROLE idem_app;

-- idempotent() runs its SQL with the caller's privileges, never the owner's.
SELECT is(resilience.idempotent('sec', 'who', '{}', $$SELECT to_jsonb(current_user::text)$$),
    '"idem_app"'::jsonb, 'idempotent() runs its SQL as the caller');
SELECT throws_ok($$SELECT resilience.idempotent('sec', 'secret', '{}', 'SELECT to_jsonb(v) FROM idem_secret')$$,
    '42501', NULL, 'so the SQL cannot read what the caller cannot');

-- A hostile search_path: text = text is always true in idem_evil, ahead of
-- pg_catalog.  Had any statement inside the functions compared keys with a
-- bare "=", it would also checkpoint, complete or lock the bystander key.  The calls run under that path and
-- record what happened; pgTAP checks afterwards (pgTAP itself would be fooled).
SELECT outcome FROM resilience.idempotency_begin('sec', 'bystander', '{}');   -- in progress throughout
CREATE FUNCTION idem_evil.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR idem_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = idem_evil.always);
CREATE TEMP TABLE evil (step text, result text);
SET search_path = idem_evil, pg_catalog, public;
DO $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM resilience.idempotency_begin('sec', 'evil', '{"x": 1}');
    INSERT INTO pg_temp.evil VALUES ('begin', r.outcome);
    PERFORM resilience.idempotency_checkpoint('sec', 'evil', 'phase 1');
    PERFORM resilience.idempotency_complete('sec', 'evil', '{"done": 1}', 200);
    SELECT * INTO r FROM resilience.idempotency_begin('sec', 'evil', '{"x": 2}');
    INSERT INTO pg_temp.evil VALUES ('other request', r.outcome);
    INSERT INTO pg_temp.evil
    VALUES ('inbox', resilience.inbox_accept('sec', 'evil')::text || ' ' || resilience.inbox_accept('sec', 'evil')::text);
    BEGIN
        PERFORM resilience.idempotency_complete('sec', 'never-begun', '{}');
        INSERT INTO pg_temp.evil VALUES ('complete unknown', 'no error');
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO pg_temp.evil VALUES ('complete unknown', SQLSTATE);
    END;
END
$$;
INSERT INTO pg_temp.evil
SELECT 'idempotent', resilience.idempotent('sec', 'who2', '{}', $$SELECT to_jsonb(42)$$)::text;
GRANT INSERT ON pg_temp.evil TO idem_ops;
SET ROLE idem_ops;   -- the reaper is for resilience_admin, under the same path
INSERT INTO pg_temp.evil SELECT 'reaper', string_agg(removed::text, ' ' ORDER BY item)
  FROM resilience.run_reaper()
 WHERE item OPERATOR(pg_catalog.=) ANY (ARRAY['idempotency_keys', 'inbox']);   -- not "=": hijacked here
RESET search_path;
RESET ROLE;

SELECT is((SELECT string_agg(step || ': ' || result, ', ') FROM evil),
    'begin: proceed, other request: mismatch, inbox: true false, complete unknown: 42704, idempotent: 42, reaper: 0 0',
    'with "=" hijacked, every function still does exactly what it should');
SELECT is((SELECT string_agg(key || ' ' || state || ' ' || coalesce(response::text, '-') || coalesce(' @' || recovery_point, ''),
                              ', ' ORDER BY key)
             FROM resilience.idempotency_keys WHERE scope = 'sec'),
    'bystander started -, evil completed {"done": 1} @phase 1, k1 completed {"r": 1}, k2 started -, who completed "idem_app", who2 completed 42',
    'and changed no other key: exactly the keys used were written, each with its own result');

SELECT * FROM finish();
ROLLBACK;
