/* resilience--0.1--0.2.sql: metrics, the complete privilege model, lease takeovers. */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION resilience UPDATE TO '0.2'" to load this file. \quit

-- A fresh CREATE EXTENSION runs resilience--0.1.sql and then this script
-- (there is no resilience--0.2.sql): released scripts are never edited, so
-- every later change goes into a script like this one.

------------------------------------------------------------------------------
-- Leases: released_at tells a released lease from one that expired
------------------------------------------------------------------------------

-- NULL while held; set by lock_release.  A lease taken over while its
-- released_at is NULL was abandoned by its holder: a takeover
-- (resilience_lease_takeovers_total).  Until this script runs, the library
-- keeps using the 0.1 statements (and counts no takeover).
ALTER TABLE resilience.leases ADD COLUMN released_at timestamptz;
-- Leases that ended before the upgrade count as released: no false takeover.
UPDATE resilience.leases SET released_at = expires_at
 WHERE expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp();
COMMENT ON COLUMN resilience.leases.released_at IS
'When lock_release ended the lease; NULL while held, and for a lease that expired without being released';

------------------------------------------------------------------------------
-- Sagas: parked sagas are found without scanning the table (metrics)
------------------------------------------------------------------------------

CREATE INDEX sagas_parked ON resilience.sagas (name)
    WHERE state OPERATOR(pg_catalog.=) 'compensation_failed';

------------------------------------------------------------------------------
-- Metrics (docs/monitoring.md)
------------------------------------------------------------------------------

-- SECURITY DEFINER so that a monitoring role needs no privilege on the
-- tables; the queries inside are fixed and qualify every name.
CREATE FUNCTION resilience.metrics()
RETURNS text
AS 'MODULE_PATHNAME', 'metrics'
LANGUAGE C VOLATILE PARALLEL RESTRICTED SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.metrics() IS
'Every metric of this database and the server-wide ones, in the Prometheus text exposition format';

CREATE FUNCTION resilience.metric_samples(
    OUT metric text, OUT type text, OUT labels jsonb, OUT value double precision)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'metric_samples'
LANGUAGE C VOLATILE PARALLEL RESTRICTED SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.metric_samples() IS
'The samples of resilience.metrics() as rows, for SQL-to-metrics bridges (postgres_exporter custom queries)';

CREATE FUNCTION resilience._metrics_reaped(item text, removed bigint)
RETURNS bigint
AS 'MODULE_PATHNAME', 'metrics_reaped'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._metrics_reaped(text, bigint) IS
'Internal (run_reaper): counts what a reaper removed when the transaction commits; returns removed';

-- The reaper counts what it removes, and runs as the extension's owner: the
-- reapers it calls are no longer executable by PUBLIC.
CREATE OR REPLACE FUNCTION resilience.run_reaper(OUT item text, OUT removed bigint)
RETURNS SETOF record
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.item, resilience._metrics_reaped(r.item, r.removed) FROM (
        SELECT 'rate_limit_keys' AS item, resilience._rate_limit_sweep() AS removed
        UNION ALL SELECT 'leases', resilience._reap_leases()
        UNION ALL SELECT 'idempotency_keys', resilience._idempotency_reap()
        UNION ALL SELECT 'inbox', resilience._inbox_reap()
        UNION ALL SELECT 'breakers', resilience._breaker_sweep()
        UNION ALL SELECT 'bulkheads', resilience._bulkhead_sweep()
        UNION ALL SELECT 'sagas', resilience._saga_reap()
        UNION ALL SELECT 'outbox_delivered', resilience._outbox_reap(
            coalesce(pg_catalog.current_setting('resilience.reaper_batch_size', true)::integer, 5000),
            coalesce(pg_catalog.current_setting('resilience.reaper_max_batches', true)::integer, 20))
    ) r
$$;

------------------------------------------------------------------------------
-- Privileges (docs/operations.md, "Roles and privileges")
------------------------------------------------------------------------------

-- resilience_user calls the API; resilience_admin (a member of
-- resilience_user) also manages routes, saga definitions, policies and
-- breaker configuration, resets, redrives, runs the relay, the sagas and the
-- reaper by hand, and reads the status views and metrics.  Both roles were
-- created by 0.1.
--
-- Functions are executable by PUBLIC by default.  Take that away from every
-- function and procedure, then give back: to PUBLIC only pure computations
-- that read and change nothing; the API to resilience_user; the rest to
-- resilience_admin.  Internal functions (a leading underscore) stay with
-- the extension's owner unless a role's calls need them.  Functions added
-- after this statement, by this script or a later one, must be granted
-- explicitly (test sql/roles.sql lists what PUBLIC may run).
REVOKE ALL ON ALL ROUTINES IN SCHEMA resilience FROM PUBLIC;

-- harmless: arithmetic on the arguments only
GRANT EXECUTE ON FUNCTION
    resilience.backoff(integer, interval, interval, text, interval),
    resilience.is_retryable(text),
    resilience.lock_key(text)
    TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    -- rate limits (named policies are read as the caller: SELECT below)
    resilience.rate_limit(text, integer, double precision, integer),
    resilience.rate_limit(text, text, integer),
    resilience.rate_limit_check(text, integer, double precision, integer),
    resilience.rate_limit_check(text, text, integer),
    resilience.window_limit(text, integer, interval, integer),
    resilience.window_limit_check(text, integer, interval, integer),
    -- leases, fences, advisory helpers
    resilience.lock_acquire(text, interval, text, interval),
    resilience.lock_renew(text, bigint, interval),
    resilience.lock_release(text, bigint),
    resilience.lock_check(text, bigint),
    resilience.fence(text, bigint),
    resilience.fence_check(text, bigint),
    resilience.advisory_xact_lock(text),
    resilience.advisory_lock(text),
    resilience.try_advisory_lock(text, interval),
    resilience.advisory_unlock(text),
    -- idempotency keys and the inbox (idempotent() calls the internal one as its caller)
    resilience.idempotency_begin(text, text, jsonb, interval, interval),
    resilience._idempotency_begin_wait(text, text, jsonb, interval, interval),
    resilience.idempotency_checkpoint(text, text, text),
    resilience.idempotency_complete(text, text, jsonb, integer),
    resilience.idempotency_fail(text, text, jsonb, boolean, integer),
    resilience.idempotent(text, text, jsonb, text, interval, interval),
    resilience.inbox_accept(text, text, interval),
    -- breakers and bulkheads
    resilience.breaker_allow(text),
    resilience.breaker_record(text, boolean, interval),
    resilience.breaker_guard(text),
    resilience.breaker_state(text),
    resilience.bulkhead_acquire(text, integer, interval, integer),
    resilience.bulkhead_acquire_session(text, integer, interval, integer),
    resilience.bulkhead_release(text)
    TO resilience_user;
GRANT EXECUTE ON PROCEDURE resilience.retry(text, integer, interval, interval, text, text)
    TO resilience_user;
GRANT SELECT ON resilience.rate_limit_policies TO resilience_user;

GRANT EXECUTE ON FUNCTION
    resilience.rate_limit_reset(text, text),
    resilience.rate_limit_entries(),
    resilience._lock_waiters(),
    resilience._advisory_lock_names(),
    resilience.breaker_reset(text),
    resilience.breaker_force_open(text),
    resilience.breaker_force_closed(text),
    resilience.breaker_disable(text),
    resilience.breaker_entries(),
    resilience.bulkhead_entries(),
    resilience._outbox_redact(text),
    resilience.run_reaper(),
    resilience.worker_status(),
    resilience.metrics(),
    resilience.metric_samples()
    TO resilience_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON resilience.rate_limit_policies,
    resilience.breaker_config TO resilience_admin;
GRANT SELECT ON resilience.rate_limits, resilience.locks, resilience.breakers,
    resilience.bulkheads, resilience.workers TO resilience_admin;

-- PostgreSQL's monitoring role may scrape the metrics.
GRANT USAGE ON SCHEMA resilience TO pg_monitor;
GRANT EXECUTE ON FUNCTION resilience.metrics(), resilience.metric_samples() TO pg_monitor;
