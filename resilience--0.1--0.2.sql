/* resilience--0.1--0.2.sql: metrics, lease takeovers. */

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

-- The reaper counts what it removes (as the extension's owner).
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

-- Only the extension's owner (run_reaper) counts reaped rows; the metrics
-- are for resilience_admin and PostgreSQL's monitoring role.
REVOKE ALL ON FUNCTION resilience.metrics(), resilience.metric_samples(),
    resilience._metrics_reaped(text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.metrics(), resilience.metric_samples()
    TO resilience_admin, pg_monitor;
GRANT USAGE ON SCHEMA resilience TO pg_monitor;
