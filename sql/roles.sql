-- Roles and privileges.  resilience_user calls the API; resilience_admin (a
-- member of resilience_user) also manages routes, saga definitions, policies
-- and breaker configuration, resets, redrives, runs the jobs by hand and
-- reads the status views and metrics.  PUBLIC gets only pure computations.
-- The whole API runs here as regress_app, a member of resilience_user and of
-- nothing else; every function it is not granted is refused with 42501.
\set SHOW_CONTEXT never

SELECT rolname, rolcanlogin, rolsuper, rolinherit
  FROM pg_roles WHERE rolname IN ('resilience_user', 'resilience_admin') ORDER BY 1;
SELECT pg_has_role('resilience_admin', 'resilience_user', 'MEMBER') AS admin_is_a_user,
       pg_has_role('resilience_user', 'resilience_admin', 'MEMBER') AS user_is_an_admin;

------------------------------------------------------------------------------
-- The privilege map
------------------------------------------------------------------------------

-- PUBLIC: arithmetic on the arguments only; no table, view or sequence; not
-- even the schema.
SELECT p.oid::regprocedure AS executable_by_public
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND has_function_privilege('public', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;
SELECT c.oid::regclass AS relation_with_public_privileges
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'resilience'
   AND EXISTS (SELECT FROM aclexplode(c.relacl) a WHERE a.grantee = 0);
SELECT has_schema_privilege('public', 'resilience', 'USAGE') AS public_schema_usage,
       has_schema_privilege('resilience_user', 'resilience', 'USAGE') AS user_schema_usage,
       has_schema_privilege('pg_monitor', 'resilience', 'USAGE') AS monitor_schema_usage;

-- Every routine and who may call it: user (and so admin), admin, or only
-- the extension's owner (internal: the reapers, triggers, the worker's tick).
SELECT p.oid::regprocedure AS routine,
       CASE WHEN has_function_privilege('resilience_user', p.oid, 'EXECUTE') THEN 'user'
            WHEN has_function_privilege('resilience_admin', p.oid, 'EXECUTE') THEN 'admin'
            ELSE 'owner' END AS who,
       CASE WHEN p.prosecdef THEN 'definer' ELSE '' END AS security
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience'
 ORDER BY 2 DESC, p.oid::regprocedure::text;

-- Every SECURITY DEFINER routine pins search_path.
SELECT p.oid::regprocedure AS unpinned_security_definer
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND p.prosecdef
   AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false);

-- Tables, views and sequences: what each role may do.
SELECT c.relname, c.relkind,
       concat_ws(',', CASE WHEN has_table_privilege('resilience_user', c.oid, 'SELECT') THEN 'SELECT' END,
                 CASE WHEN has_table_privilege('resilience_user', c.oid, 'INSERT') THEN 'INSERT' END,
                 CASE WHEN has_table_privilege('resilience_user', c.oid, 'UPDATE') THEN 'UPDATE' END,
                 CASE WHEN has_table_privilege('resilience_user', c.oid, 'DELETE') THEN 'DELETE' END,
                 CASE WHEN c.relkind = 'S' AND has_sequence_privilege('resilience_user', c.oid, 'USAGE') THEN 'USAGE' END) AS "user",
       concat_ws(',', CASE WHEN has_table_privilege('resilience_admin', c.oid, 'SELECT') THEN 'SELECT' END,
                 CASE WHEN has_table_privilege('resilience_admin', c.oid, 'INSERT') THEN 'INSERT' END,
                 CASE WHEN has_table_privilege('resilience_admin', c.oid, 'UPDATE') THEN 'UPDATE' END,
                 CASE WHEN has_table_privilege('resilience_admin', c.oid, 'DELETE') THEN 'DELETE' END,
                 CASE WHEN c.relkind = 'S' AND has_sequence_privilege('resilience_admin', c.oid, 'USAGE') THEN 'USAGE' END) AS admin
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'resilience' AND c.relkind IN ('r', 'v', 'S')
 ORDER BY c.relkind, c.relname;

------------------------------------------------------------------------------
-- Set up, as resilience_admin: a policy, a breaker, a route, a saga
------------------------------------------------------------------------------
CREATE ROLE regress_app NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_ops NOLOGIN IN ROLE resilience_admin;
CREATE ROLE regress_monitor NOLOGIN IN ROLE pg_monitor;
CREATE SCHEMA roles_ops AUTHORIZATION regress_ops;
CREATE TABLE public.roles_effects (what text);
GRANT INSERT, SELECT ON public.roles_effects TO regress_app;

SET ROLE regress_ops;
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('roles-tier', 2, 0.001);
INSERT INTO resilience.breaker_config (name, window_size) VALUES ('roles-breaker', 4);
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('roles.%', 'queue', 'roles-consumer');
CREATE FUNCTION roles_ops.reserve(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT jsonb_build_object('reserved', current_user) $$;
SELECT resilience.saga_define('roles_pay', $$[
  {"name": "reserve", "action": "roles_ops.reserve"},
  {"name": "charge", "action": "async", "topic": "roles.payments", "timeout": "1 hour", "max_attempts": 1}
]$$) AS version;
RESET ROLE;

------------------------------------------------------------------------------
-- The whole API as regress_app (resilience_user only)
------------------------------------------------------------------------------
SET ROLE regress_app;
-- rate limits
SELECT resilience.rate_limit('roles:k1', 1, 0.001) AS first, resilience.rate_limit('roles:k1', 1, 0.001) AS second;
SELECT allowed, remaining, "limit" FROM resilience.rate_limit_check('roles:k2', 5, 1);
SELECT resilience.rate_limit('roles:k3', 'roles-tier') AS by_policy;
SELECT allowed, remaining, "limit" FROM resilience.rate_limit_check('roles:k3', 'roles-tier');
SELECT resilience.window_limit('roles:w', 3, '1 minute') AS window;
SELECT allowed, remaining FROM resilience.window_limit_check('roles:w', 3, '1 minute');
SELECT name, capacity FROM resilience.rate_limit_policies WHERE name = 'roles-tier';
-- leases, fences, advisory locks
SELECT resilience.lock_acquire('roles:lease', '1 minute', 'app') AS token \gset
SELECT resilience.lock_renew('roles:lease', :token, '2 minutes') AS renewed,
       resilience.lock_check('roles:lease', :token) AS valid;
SELECT resilience.fence('roles:res', :token) AS fenced, resilience.fence_check('roles:res', :token) AS still_fine;
SELECT resilience.lock_release('roles:lease', :token) AS released;
SELECT resilience.advisory_xact_lock('roles:adv') > 0 AS xact_token;
SELECT resilience.advisory_lock('roles:adv2') > 0 AS session_token,
       resilience.try_advisory_lock('roles:adv3', '10 ms') > 0 AS try_token;
SELECT resilience.advisory_unlock('roles:adv2') AS unlocked, resilience.advisory_unlock('roles:adv3') AS unlocked_too;
SELECT resilience.lock_key('roles:adv') = resilience.lock_key('roles:adv') AS stable_key;
-- idempotency keys and the inbox
SELECT outcome FROM resilience.idempotency_begin('roles', 'k1', '{"n": 1}');
SELECT resilience.idempotency_checkpoint('roles', 'k1', 'charged');
SELECT resilience.idempotency_complete('roles', 'k1', '{"ok": true}', 201);
SELECT outcome, response, status_code FROM resilience.idempotency_begin('roles', 'k1', '{"n": 1}');
SELECT outcome FROM resilience.idempotency_begin('roles', 'k2', '{}');
SELECT resilience.idempotency_fail('roles', 'k2', '{"e": "x"}', true);
SELECT resilience.idempotent('roles', 'k3', '{}', $$INSERT INTO public.roles_effects VALUES ('once') RETURNING to_jsonb(what)$$) AS first,
       resilience.idempotent('roles', 'k3', '{}', $$INSERT INTO public.roles_effects VALUES ('twice') RETURNING to_jsonb(what)$$) AS replayed;
SELECT resilience.inbox_accept('roles', 'm1') AS first, resilience.inbox_accept('roles', 'm1') AS duplicate;
-- breakers, bulkheads, retries
SELECT resilience.breaker_allow('roles-breaker') AS allowed;
SELECT resilience.breaker_record('roles-breaker', true, '5 ms');
SELECT resilience.breaker_guard('roles-breaker');
SELECT resilience.breaker_state('roles-breaker') AS state;
SELECT resilience.bulkhead_acquire('roles-bh', 1) AS xact_permit;
SELECT resilience.bulkhead_acquire_session('roles-bh', 1) AS session_permit,
       resilience.bulkhead_release('roles-bh') AS released;
SELECT resilience.backoff(3, '100 ms', '10 s', 'none') AS backoff, resilience.is_retryable('40001') AS retryable;
CALL resilience.retry($$INSERT INTO public.roles_effects VALUES ('retried')$$, 3);
SELECT what FROM public.roles_effects ORDER BY what;
-- the outbox
SELECT resilience.outbox_publish('roles.orders', '{"n": 1}', 'o-1') AS event1 \gset
SELECT resilience.outbox_publish('roles.orders', '{"n": 2}', 'o-2') AS event2 \gset
SELECT topic, key, payload FROM resilience.outbox_claim('roles-consumer', 10, '1 minute') ORDER BY id;
SELECT resilience.outbox_ack('roles-consumer', ARRAY[:event1]::bigint[]) AS acked;
SELECT resilience.outbox_nack('roles-consumer', :event2) AS nacked;
SELECT topic, key FROM resilience.outbox_event(:event2);
-- sagas: start, answer the async step's command, read the statistics
SELECT resilience.saga_start('roles_pay', '{"amount": 5}') AS saga1 \gset
SELECT resilience.saga_start('roles_pay', '{"amount": 6}') AS saga2 \gset
RESET ROLE;
CALL resilience.saga_run();   -- the worker's job: reserve, then send the commands
SET ROLE regress_app;
SELECT topic, payload ->> 'step' AS step FROM resilience.outbox_claim('roles-consumer', 10, '1 minute')
 WHERE topic = 'roles.payments' ORDER BY id;
SELECT resilience.saga_step_completed(:saga1, 'charge', '{"charge_id": "ch_1"}') AS completed;
SELECT resilience.saga_step_failed(:saga2, 'charge', '{"reason": "declined"}', false) AS failed;
RESET ROLE;
CALL resilience.saga_run();
SELECT id = :saga1 AS first, state FROM resilience.sagas WHERE id IN (:saga1, :saga2) ORDER BY id;
SET ROLE regress_app;
SELECT name, state, sagas FROM resilience.saga_stats WHERE name = 'roles_pay' ORDER BY state;
-- event streams
SELECT resilience.append_events('roles-stream', -1, ARRAY['{"type": "opened"}', '{"type": "paid", "data": 5}']::jsonb[]) AS version;
SELECT left(sqlstate_of($$SELECT resilience.append_events('roles-stream', 0, ARRAY['{"type": "late"}']::jsonb[])$$), 5) AS conflict;
SELECT version, type, data FROM resilience.read_stream('roles-stream');
SELECT resilience.stream_version('roles-stream') AS stream_version;

------------------------------------------------------------------------------
-- Everything else is refused to regress_app with 42501
------------------------------------------------------------------------------
RESET ROLE;
-- Call a routine with NULL arguments; its SQLSTATE, or 'no error'.  The
-- arguments come from a subquery the planner keeps (OFFSET 0): constant
-- NULLs would let it fold a STRICT call away, and no call, no check.
CREATE FUNCTION public.roles_call(fn regprocedure) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    p pg_proc;
    args text;
    cols text;
BEGIN
    SELECT * INTO p FROM pg_proc WHERE oid = fn;
    SELECT string_agg(format('NULL::%s AS a%s', t::regtype, i), ', ' ORDER BY i),
           string_agg(format('a%s', i), ', ' ORDER BY i) INTO cols, args
      FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, i);
    IF p.prokind = 'p' THEN
        EXECUTE format('CALL %I.%I(%s)', 'resilience', p.proname,
                       (SELECT string_agg(format('NULL::%s', t::regtype), ', ' ORDER BY i)
                          FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, i)));
    ELSE
        EXECUTE format('SELECT %I.%I(%s) FROM (SELECT %s OFFSET 0) s', 'resilience', p.proname,
                       coalesce(args, ''), coalesce(cols, '1 AS a0'));
    END IF;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;
-- Read a relation; its SQLSTATE, or 'no error'.
CREATE FUNCTION public.roles_read(rel regclass) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('SELECT 1 FROM %s LIMIT 1', rel);
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;

SET ROLE regress_app;
-- every routine not granted to resilience_user (trigger functions can only fire as triggers)
SELECT p.oid::regprocedure AS routine, public.roles_call(p.oid) AS refused_with
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND p.prorettype <> 'trigger'::regtype
   AND NOT has_function_privilege('resilience_user', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;
-- every table, view and sequence but the two it may read
SELECT c.oid::regclass AS relation, public.roles_read(c.oid) AS refused_with
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'resilience' AND c.relkind IN ('r', 'v', 'S')
 ORDER BY c.oid::regclass::text;
-- and no configuration can be changed
SELECT left(sqlstate_of($$INSERT INTO resilience.rate_limit_policies (name, capacity) VALUES ('mine', 1)$$), 5) AS policy,
       left(sqlstate_of($$INSERT INTO resilience.breaker_config (name) VALUES ('mine')$$), 5) AS breaker,
       left(sqlstate_of($$INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('%', 'queue', 'x')$$), 5) AS route,
       left(sqlstate_of($$DELETE FROM resilience.outbox_dead_letters$$), 5) AS dead_letters,
       left(sqlstate_of($$UPDATE resilience.leases SET token = token + 1$$), 5) AS lease,
       left(sqlstate_of($$SELECT nextval('resilience.fencing_tokens')$$), 5) AS token;
RESET ROLE;

------------------------------------------------------------------------------
-- resilience_admin and pg_monitor
------------------------------------------------------------------------------
SET ROLE regress_ops;
SELECT resilience.rate_limit_reset('roles:k1') AS reset;
SELECT resilience.breaker_force_open('roles-breaker');
SELECT state, window_size FROM resilience.breakers WHERE name = 'roles-breaker';
SELECT resilience.breaker_reset('roles-breaker') AS reset;
SELECT count(*) >= 0 AS sees_limits FROM resilience.rate_limits;
SELECT count(*) >= 0 AS sees_locks FROM resilience.locks;
SELECT count(*) >= 0 AS sees_bulkheads FROM resilience.bulkheads;
SELECT count(*) >= 0 AS sees_workers FROM resilience.workers;
SELECT count(*) > 0 AS sees_outbox FROM resilience.outbox_status;
SELECT count(*) > 0 AS reaps FROM resilience.run_reaper();
SELECT resilience.metrics() LIKE '%resilience_outbox_backlog{route_id="%' AS scrapes;
SELECT left(sqlstate_of($$SELECT count(*) FROM resilience.leases$$), 5) AS leases_table;
RESET ROLE;
SET ROLE regress_monitor;
SELECT resilience.metrics() LIKE '%# TYPE resilience_saga_events_total counter%' AS monitor_scrapes,
       (SELECT count(*) > 0 FROM resilience.metric_samples()) AS monitor_reads_samples;
SELECT left(sqlstate_of($$SELECT resilience.rate_limit('x', 1, 1)$$), 5) AS monitor_cannot_call_the_api;
RESET ROLE;

-- clean up
DELETE FROM resilience.outbox WHERE topic LIKE 'roles.%';
DELETE FROM resilience.outbox_routes WHERE target = 'roles-consumer';
DELETE FROM resilience.breaker_config WHERE name = 'roles-breaker';
DELETE FROM resilience.rate_limit_policies WHERE name = 'roles-tier';
DROP FUNCTION public.roles_call(regprocedure), public.roles_read(regclass);
DROP TABLE public.roles_effects;
