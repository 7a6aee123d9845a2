-- Sagas, bad input: a specific SQLSTATE and a clear message, nothing changed.
-- (CONTEXT lines would only show line numbers of the validating function.)
\set SHOW_CONTEXT never
SELECT setval('resilience.saga_ids', 1000) AS first_saga_id_is_1001;
CREATE ROLE regress_saga_definer NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA bad;
GRANT USAGE ON SCHEMA bad TO regress_saga_definer;
CREATE FUNCTION bad.ok(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION bad.int_arg(saga_id int, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION bad.returns_text(saga_id bigint, ctx jsonb) RETURNS text LANGUAGE sql AS $$ SELECT '' $$;
CREATE FUNCTION bad.returns_set(saga_id bigint, ctx jsonb) RETURNS SETOF jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE PROCEDURE bad.proc(saga_id bigint, ctx jsonb) LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION bad.private(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
REVOKE EXECUTE ON FUNCTION bad.private(bigint, jsonb) FROM PUBLIC;
CREATE FUNCTION bad.async(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;

SET ROLE regress_saga_definer;
-- definitions
SELECT sqlstate_of($$SELECT resilience.saga_define(NULL, '[{"name": "a", "action": "bad.ok"}]')$$);
SELECT sqlstate_of($$SELECT resilience.saga_define('s', NULL)$$);
SELECT resilience.saga_define('', '[{"name": "a", "action": "bad.ok"}]');
SELECT resilience.saga_define(repeat('n', 64), '[{"name": "a", "action": "bad.ok"}]');
SELECT resilience.saga_define('s', '{"name": "a", "action": "bad.ok"}');
SELECT resilience.saga_define('s', '[]');
SELECT resilience.saga_define('s', (SELECT jsonb_agg(jsonb_build_object('name', 's' || i, 'action', 'bad.ok'))
                                      FROM generate_series(1, 101) i));
SELECT resilience.saga_define('s', '["bad.ok"]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "next": "b"}]');
SELECT resilience.saga_define('s', '[{"action": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "", "action": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": 7, "action": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok"}, {"name": "a", "action": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "a"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": null, "compensation": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": 12}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": " "}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok(bigint, jsonb)"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "db.bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.missing"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "ok"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.int_arg"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "compensation": "bad.returns_text"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.returns_set"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.proc"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.private"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "topic": "t"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "async"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "async", "topic": ""}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "async", "topic": ["t"]}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "timeout": "0 s"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "timeout": "-1 minute"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "timeout": "31 days"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "timeout": "soon"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "timeout": 30}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "max_attempts": 0}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "max_attempts": 101}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "max_attempts": 2.5}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "max_attempts": "3"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "backoff": "1 s"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "backoff": {"factor": 2}}]');
-- step names: 1 to 63 letters, digits, _ - . (they travel in headers and events)
SELECT resilience.saga_define('s', jsonb_build_array(jsonb_build_object('name', E'x\ny', 'action', 'async', 'topic', 't')));
SELECT resilience.saga_define('s', '[{"name": "a b", "action": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "ok", "action": "bad.ok"}, {"name": "caf\u00e9", "action": "bad.ok"}]');
SELECT resilience.saga_define(E'tab\there', '[{"name": "a", "action": "bad.ok"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "backoff": {"base": "0 s"}}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "backoff": {"base": "2 s", "cap": "1 s"}}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "backoff": {"cap": "2 days"}}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "backoff": {"jitter": "random"}}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "retry_on": "40001"}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "retry_on": ["4000"]}]');
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok", "retry_on": [40001]}]');
-- a function literally named async is reached by qualifying it
SELECT resilience.saga_define('qualified_async', '[{"name": "a", "action": "bad.async"}]') AS version;
SELECT steps -> 0 -> 'action' FROM resilience.saga_definitions WHERE name = 'qualified_async';
RESET ROLE;
-- a superuser may not define sagas (steps would run as a superuser)
SELECT resilience.saga_define('s', '[{"name": "a", "action": "bad.ok"}]');
SELECT count(*) AS definitions FROM resilience.saga_definitions WHERE name = 's';

-- starting
SET ROLE regress_saga_definer;
SELECT resilience.saga_define('good', '[{"name": "a", "action": "bad.ok"}, {"name": "b", "action": "async", "topic": "t"}]') AS version;
RESET ROLE;
SELECT sqlstate_of($$SELECT resilience.saga_start(NULL, '{}')$$);
SELECT resilience.saga_start('', '{}');
SELECT resilience.saga_start(repeat('n', 64), '{}');
SELECT resilience.saga_start('nonesuch', '{}');
SELECT sqlstate_of($$SELECT resilience.saga_start('good', NULL)$$);
SELECT resilience.saga_start('good', '[1, 2]');
SELECT resilience.saga_start('good', '"text"');
SELECT resilience.saga_start('good', '{}', '');
SELECT resilience.saga_start('good', '{}', repeat('k', 256));
SELECT count(*) AS sagas FROM resilience.sagas WHERE name = 'good';

-- replies, retry, abort
SELECT resilience.saga_start('good', '{}') AS id \gset
SELECT sqlstate_of($$SELECT resilience.saga_step_completed(NULL, 'b', '{}')$$);
SELECT resilience.saga_step_completed(-1, 'b', '{}');
SELECT resilience.saga_step_completed(:id, 'nonesuch', '{}');
SELECT sqlstate_of($$SELECT resilience.saga_step_completed($$ || :id || $$, NULL, '{}')$$);
SELECT resilience.saga_step_completed(:id, 'a', '{}');
SELECT resilience.saga_step_completed(:id, 'b', '{}', compensation => true);
SELECT resilience.saga_step_completed(:id, 'b', '{}');
SELECT resilience.saga_step_completed(:id, 'b', '[1]');
SELECT sqlstate_of($$SELECT resilience.saga_step_completed($$ || :id || $$, 'b', '{}', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.saga_step_failed($$ || :id || $$, 'b', NULL, true)$$);
SELECT sqlstate_of($$SELECT resilience.saga_step_failed($$ || :id || $$, 'b', '{}', NULL)$$);
SELECT resilience.saga_step_failed(:id, 'b', '{"message": "no"}', false);
SELECT sqlstate_of($$SELECT resilience.saga_retry(NULL)$$);
SELECT resilience.saga_retry(-1);
SELECT resilience.saga_retry(:id);
SELECT sqlstate_of($$SELECT resilience.saga_abort(NULL, 'r')$$);
SELECT resilience.saga_abort(-1, 'r');
SELECT sqlstate_of($$SELECT resilience.saga_abort($$ || :id || $$, NULL)$$);
SELECT resilience.saga_abort(:id, '');
SELECT resilience.saga_abort(:id, repeat('r', 1025));
CALL resilience.saga_run(0);
CALL resilience.saga_run(NULL);
-- nothing changed: the saga has not moved, and only saga_started was recorded
SELECT state, step, attempt, awaiting, reply FROM resilience.sagas WHERE id = :id;
SELECT event FROM resilience.saga_events WHERE saga_id = :id ORDER BY id;

-- a saga function called from a step of that very saga is refused
CREATE FUNCTION bad.reentrant(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    PERFORM resilience.saga_abort(saga_id, 'from inside');
    RETURN '{}';
END
$$;
CREATE FUNCTION bad.ticks(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    PERFORM resilience.saga_tick();
    RETURN '{}';
END
$$;
SET ROLE regress_saga_definer;
SELECT resilience.saga_define('reentrant', '[{"name": "abort_myself", "action": "bad.reentrant"}]');
SELECT resilience.saga_define('ticks', '[{"name": "tick", "action": "bad.ticks"}]');
RESET ROLE;
SELECT resilience.saga_start('reentrant', '{}') AS reentrant \gset
SELECT resilience.saga_start('ticks', '{}') AS ticks \gset
CALL resilience.saga_run();
SELECT id = :reentrant AS reentrant, state, error #>> '{error,message}' AS message
  FROM resilience.sagas WHERE id IN (:reentrant, :ticks) ORDER BY id;

-- Roles isolated from each other (docs/operations.md, "Roles and tenants"):
-- only the role that started a saga (its members, the definer's, and
-- resilience_admin) may answer its async steps; another role gets 42501 and
-- the saga does not change.
CREATE ROLE regress_tenant_a NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_tenant_b NOLOGIN IN ROLE resilience_user;
SET ROLE regress_tenant_a;
SELECT resilience.saga_start('good', '{"tenant": "a"}') AS tenant_saga \gset
SET ROLE regress_tenant_b;
SELECT replace(sqlstate_of(format('SELECT resilience.saga_step_completed(%s, %L, %L)', :tenant_saga, 'b', '{"evil": true}')),
               :'tenant_saga', 'N') AS completed,
       replace(sqlstate_of(format('SELECT resilience.saga_step_failed(%s, %L, %L, false)', :tenant_saga, 'b', '{}')),
               :'tenant_saga', 'N') AS failed;
RESET ROLE;
SELECT owner_role, context, reply FROM resilience.sagas WHERE id = :tenant_saga;
SELECT count(*) AS events FROM resilience.saga_events WHERE saga_id = :tenant_saga;

-- set_owner: resilience_admin only; known kinds, names and sagas
SELECT resilience.set_owner('table', 'x', 'regress_tenant_a');
SELECT resilience.set_owner('lease', '', 'regress_tenant_a');
SELECT resilience.set_owner('saga', 'x', 'regress_tenant_a');
SELECT resilience.set_owner('saga', '999999999', 'regress_tenant_a');
SELECT sqlstate_of($$SELECT resilience.set_owner(NULL, 'x', 'regress_tenant_a')$$) AS null_kind;
SET ROLE regress_tenant_a;
SELECT sqlstate_of($$SELECT resilience.set_owner('lease', 'x', 'regress_tenant_a')$$) AS not_an_admin;
RESET ROLE;
SELECT count(*) AS declared FROM resilience.owners WHERE name = 'x';
-- an admin transfers the saga: now regress_tenant_b may answer, regress_tenant_a may not
SELECT resilience.set_owner('saga', :'tenant_saga', 'regress_tenant_b');
SET ROLE regress_tenant_a;
SELECT replace(sqlstate_of(format('SELECT resilience.saga_step_failed(%s, %L, %L, false)', :tenant_saga, 'b', '{}')),
               :'tenant_saga', 'N') AS old_owner;
RESET ROLE;
SELECT owner_role FROM resilience.sagas WHERE id = :tenant_saga;
UPDATE resilience.sagas SET owner_role = NULL WHERE id = :tenant_saga;
DROP ROLE regress_tenant_a;
DROP ROLE regress_tenant_b;

-- Timers and signals (issue 16): each refused with 22023, nothing stored.
SET ROLE regress_saga_definer;
SELECT count(*) AS definitions_before FROM resilience.saga_definitions \gset
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "0 s"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "-1 minute"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "31 days"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "a while"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": null}]');
SELECT resilience.saga_define('w', '[{"name": "a", "until": ""}]');
SELECT resilience.saga_define('w', '[{"name": "a", "until": 5}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "approved"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "approved", "timeout": "0 s"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "approved", "timeout": "31 days"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "", "timeout": "1 day"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "approved", "timeout": "1 day", "on_timeout": "retry"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "approved", "timeout": "1 day", "signalers": "bob"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "await": "approved", "timeout": "1 day", "signalers": ["regress_no_such_role"]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "1 s", "until": "t"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "1 s", "action": "bad.ok"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "sleep": "1 s", "max_attempts": 2}]');
SELECT resilience.saga_define('w', '[{"name": "a", "action": "bad.ok", "on_timeout": "continue"}]');
-- parallel groups: malformed ones are 22023 (one level deep, at least two
-- branches, names unique across the saga, action branches only (SQL or
-- async: no sleep, until or await), each branch checked as a step)
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": []}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": {"name": "b", "action": "bad.ok"}}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "parallel": [{"name": "d", "action": "bad.ok"}, {"name": "e", "action": "bad.ok"}]}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "b", "action": "bad.ok"}]}]');
SELECT resilience.saga_define('w', '[{"name": "b", "action": "bad.ok"}, {"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}, {"name": "c", "action": "bad.ok"}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "a", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "async", "topic": "t"}, {"name": "c", "until": "due"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "async", "topic": "t"}, {"name": "c", "await": "go", "timeout": "1 h"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "async"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "sleep": "1 s"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "timeout": "1 s", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.no_such"}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok", "max_attempts": 0}]}]');
SELECT resilience.saga_define('w', '[{"name": "a", "action": "bad.ok"}, {"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}]');
-- the SQLSTATE of each malformed group (22023)
SELECT left(sqlstate_of(format($$SELECT resilience.saga_define('w', %L)$$, d)), 5) AS sqlstate, count(*) AS definitions
  FROM (VALUES ('[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}]}]'),
               ('[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "parallel": [{"name": "d", "action": "bad.ok"}, {"name": "e", "action": "bad.ok"}]}]}]'),
               ('[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "b", "action": "bad.ok"}]}]'),
               ('[{"name": "b", "action": "bad.ok"}, {"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}]'),
               ('[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "sleep": "1 s"}]}]'),
               ('[{"name": "a", "parallel": [{"name": "b", "action": "async", "topic": "t"}, {"name": "c", "until": "due"}]}]'),
               ('[{"name": "a", "parallel": [{"name": "b", "action": "async", "topic": "t"}, {"name": "c", "await": "go", "timeout": "1 h"}]}]'),
               ('[{"name": "a", "timeout": "1 s", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}]'),
               ('[{"name": "a", "parallel": [{"name": "b", "action": "bad.ok"}, {"name": "c", "action": "bad.ok"}]}, {"name": "a", "action": "bad.ok"}]')) v(d)
 GROUP BY 1 ORDER BY 1;
SELECT count(*) OPERATOR(pg_catalog.=) :definitions_before AS nothing_stored FROM resilience.saga_definitions;
RESET ROLE;

-- The state columns' checks (one C function call each) refuse a state the
-- orchestrator never writes, and an unknown kind is an error.
SELECT resilience._saga_state_valid('saga', 'suspended') AS saga_state,
       resilience._saga_state_valid('step', 'abandoned') AS step_state,
       resilience._saga_state_valid('branch', 'timed_out') AS branch_state,
       resilience._saga_state_valid('saga', 'abandoned') AS step_state_on_saga;
SELECT resilience._saga_state_valid('group', 'running');
SELECT resilience.saga_start('good', '{}', 'state-check') AS state_check_saga \gset
SELECT left(sqlstate_of($$UPDATE resilience.sagas SET state = 'bogus' WHERE id = $$ || :state_check_saga), 5) AS saga_row,
       left(sqlstate_of($$INSERT INTO resilience.saga_steps (saga_id, step_no, name, state, started_at)
                          VALUES ($$ || :state_check_saga || $$, 1, 'a', 'pending', now())$$), 5) AS step_row,
       left(sqlstate_of($$INSERT INTO resilience.saga_branches (saga_id, step_no, branch_no, name, state)
                          VALUES ($$ || :state_check_saga || $$, 1, 1, 'b', 'running')$$), 5) AS branch_row;
SELECT state <> 'bogus' AS unchanged FROM resilience.sagas WHERE id = :state_check_saga;
