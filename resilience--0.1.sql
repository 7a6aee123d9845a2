/* resilience--0.1.sql: first release. */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION resilience" to load this file. \quit

------------------------------------------------------------------------------
-- Rate limits (shared memory; need shared_preload_libraries = 'resilience')
------------------------------------------------------------------------------

CREATE FUNCTION resilience.rate_limit(
    key text, capacity integer, refill_per_sec double precision, cost integer DEFAULT 1)
RETURNS boolean
AS 'MODULE_PATHNAME', 'rate_limit'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
COMMENT ON FUNCTION resilience.rate_limit(text, integer, double precision, integer) IS
'Token bucket: take cost tokens from key''s bucket (capacity tokens, refilled at refill_per_sec); true if they were there';

CREATE FUNCTION resilience.rate_limit_check(
    key text, capacity integer, refill_per_sec double precision, cost integer DEFAULT 1,
    OUT allowed boolean, OUT remaining integer, OUT "limit" integer,
    OUT retry_after_ms bigint, OUT reset_after_ms bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'rate_limit_check'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.rate_limit_check(text, integer, double precision, integer) IS
'Token bucket decision with everything RateLimit/Retry-After headers need; cost 0 looks without taking';

CREATE FUNCTION resilience.window_limit(
    key text, max integer, "window" interval, cost integer DEFAULT 1)
RETURNS boolean
AS 'MODULE_PATHNAME', 'window_limit'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.window_limit(text, integer, interval, integer) IS
'Sliding window: admit cost requests if no window-long interval then holds more than max';

CREATE FUNCTION resilience.window_limit_check(
    key text, max integer, "window" interval, cost integer DEFAULT 1,
    OUT allowed boolean, OUT remaining integer, OUT "limit" integer,
    OUT retry_after_ms bigint, OUT reset_after_ms bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'window_limit_check'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.window_limit_check(text, integer, interval, integer) IS
'Sliding window decision with everything RateLimit/Retry-After headers need; cost 0 looks without taking';

-- Named policies: tiers live in data, not in code.
CREATE TABLE resilience.rate_limit_policies (
    name text PRIMARY KEY
        CHECK (length(name) BETWEEN 1 AND 63),
    capacity integer NOT NULL
        CHECK (capacity > 0),
    refill_per_sec double precision NOT NULL DEFAULT 0
        CHECK (refill_per_sec >= 0 AND refill_per_sec < 'Infinity'),
    "window" interval
        CHECK ("window" > interval '0' AND "window" <= interval '366 days'),
    description text,
    CHECK ("window" IS NULL OR refill_per_sec = 0)
);
COMMENT ON TABLE resilience.rate_limit_policies IS
'Named rate-limit policies: a token bucket (capacity, refill_per_sec), or a sliding window (capacity requests per window) when window is set';
SELECT pg_catalog.pg_extension_config_dump('resilience.rate_limit_policies', '');

CREATE FUNCTION resilience._rate_limit_policies_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'rate_limit_policies_changed'
LANGUAGE C;
COMMENT ON FUNCTION resilience._rate_limit_policies_changed() IS
'Internal: makes every backend drop its cached policies when the table changes';

CREATE TRIGGER policies_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON resilience.rate_limit_policies
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._rate_limit_policies_changed();

CREATE FUNCTION resilience.rate_limit(key text, policy text, cost integer DEFAULT 1)
RETURNS boolean
AS 'MODULE_PATHNAME', 'rate_limit_policy'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.rate_limit(text, text, integer) IS
'Rate limit key under a named policy of resilience.rate_limit_policies';

CREATE FUNCTION resilience.rate_limit_check(
    key text, policy text, cost integer DEFAULT 1,
    OUT allowed boolean, OUT remaining integer, OUT "limit" integer,
    OUT retry_after_ms bigint, OUT reset_after_ms bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'rate_limit_policy_check'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.rate_limit_check(text, text, integer) IS
'Rate-limit decision under a named policy, with the header fields';

CREATE FUNCTION resilience.rate_limit_reset(key text, policy text DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'rate_limit_reset'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.rate_limit_reset(text, text) IS
'Forget key''s bucket and window (or its state under policy); true if there was any';

CREATE FUNCTION resilience.rate_limit_entries(
    OUT key text, OUT policy text, OUT kind text, OUT available double precision,
    OUT "limit" integer, OUT refill_per_sec double precision, OUT "window" interval,
    OUT last_used timestamptz, OUT allowed bigint, OUT denied bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'rate_limit_entries'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience.rate_limit_entries() IS
'Every rate-limit key in shared memory, with what is available now; backs the rate_limits view';

CREATE VIEW resilience.rate_limits AS
    SELECT * FROM resilience.rate_limit_entries();
COMMENT ON VIEW resilience.rate_limits IS
'Rate-limit keys in shared memory: tokens (or window requests) available now, limit, rate, last use';

CREATE FUNCTION resilience._rate_limit_sweep()
RETURNS bigint
AS 'MODULE_PATHNAME', 'rate_limit_sweep'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._rate_limit_sweep() IS
'Internal (part of run_reaper): drop keys whose state is worth nothing (full bucket, empty window)';

------------------------------------------------------------------------------
-- Workers and jobs
------------------------------------------------------------------------------

CREATE FUNCTION resilience.run_reaper(OUT item text, OUT removed bigint)
RETURNS SETOF record
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT 'rate_limit_keys', resilience._rate_limit_sweep()
$$;
COMMENT ON FUNCTION resilience.run_reaper() IS
'The reaper job the worker runs every resilience.reaper_interval: removes what has expired, per item';

CREATE FUNCTION resilience.worker_status(
    OUT database text, OUT pid integer, OUT state text, OUT started_at timestamptz,
    OUT job text, OUT job_interval interval, OUT last_run timestamptz,
    OUT last_duration_ms double precision, OUT runs bigint, OUT failures bigint,
    OUT last_error text, OUT last_error_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'worker_status'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience.worker_status() IS
'One row per resilience worker and job; backs the workers view';

CREATE VIEW resilience.workers AS
    SELECT * FROM resilience.worker_status();
COMMENT ON VIEW resilience.workers IS
'Each resilience worker (one per database of resilience.database_names) and its jobs: state, last run, last error';
