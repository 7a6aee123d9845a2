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
-- Circuit breakers (shared memory; need shared_preload_libraries = 'resilience')
------------------------------------------------------------------------------

-- Per-breaker configuration; a NULL column (or no row) takes the
-- resilience.breaker_* default.  A change applies to every call made after
-- it commits.
CREATE TABLE resilience.breaker_config (
    name text PRIMARY KEY
        CHECK (octet_length(name) BETWEEN 1 AND 63),
    failure_rate_threshold double precision
        CHECK (failure_rate_threshold > 0 AND failure_rate_threshold <= 100),
    slow_call_rate_threshold double precision
        CHECK (slow_call_rate_threshold > 0 AND slow_call_rate_threshold <= 100),
    slow_call_duration interval
        CHECK (slow_call_duration > interval '0' AND slow_call_duration <= interval '366 days'),
    window_type text
        CHECK (window_type IN ('count', 'time')),
    window_size integer
        CHECK (window_size BETWEEN 1 AND 1000),
    minimum_calls integer
        CHECK (minimum_calls >= 1),
    open_timeout interval
        CHECK (open_timeout > interval '0' AND open_timeout <= interval '366 days'),
    half_open_calls integer
        CHECK (half_open_calls BETWEEN 1 AND 100),
    probe_timeout interval
        CHECK (probe_timeout > interval '0' AND probe_timeout <= interval '366 days'),
    description text
);
COMMENT ON TABLE resilience.breaker_config IS
'Circuit breaker settings by name; NULL columns take the resilience.breaker_* defaults';
SELECT pg_catalog.pg_extension_config_dump('resilience.breaker_config', '');

CREATE FUNCTION resilience._breaker_config_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'breaker_config_changed'
LANGUAGE C;
COMMENT ON FUNCTION resilience._breaker_config_changed() IS
'Internal: makes every breaker re-read its configuration when a change to breaker_config commits';

CREATE TRIGGER breaker_config_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON resilience.breaker_config
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._breaker_config_changed();

-- Not STRICT: NULL arguments raise 22004.  Breakers are shared state that
-- does not roll back, so none of these is PARALLEL SAFE except the readers.
CREATE FUNCTION resilience.breaker_allow(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'breaker_allow'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_allow(text) IS
'May a call guarded by this circuit breaker be made now? False while open; in half-open, true for at most half_open_calls probes';

CREATE FUNCTION resilience.breaker_record(name text, success boolean, duration interval DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'breaker_record'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_record(text, boolean, interval) IS
'Report the outcome (and duration, for slow-call rates) of a call the breaker permitted';

CREATE FUNCTION resilience.breaker_guard(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'breaker_guard'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_guard(text) IS
'Like breaker_allow, but raises SQLSTATE RS001 (with the time until the next probe) when the call is not permitted';

CREATE FUNCTION resilience.breaker_state(name text)
RETURNS text
AS 'MODULE_PATHNAME', 'breaker_state'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience.breaker_state(text) IS
'closed, open, half_open, forced_open, metrics_only or disabled, as the next call would see it';

CREATE FUNCTION resilience.breaker_reset(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'breaker_reset'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_reset(text) IS
'Forget a breaker: the next call finds it closed with an empty window; true if it existed';

CREATE FUNCTION resilience.breaker_force_open(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'breaker_force_open'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_force_open(text) IS
'Refuse every call until breaker_reset or breaker_force_closed';

CREATE FUNCTION resilience.breaker_force_closed(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'breaker_force_closed'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_force_closed(text) IS
'Permit every call and keep measuring, but never open (state metrics_only) until breaker_reset';

CREATE FUNCTION resilience.breaker_disable(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'breaker_disable'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.breaker_disable(text) IS
'Permit every call and measure nothing (state disabled) until breaker_reset';

CREATE FUNCTION resilience.breaker_entries(
    OUT name text, OUT state text, OUT failure_rate double precision,
    OUT slow_call_rate double precision, OUT calls integer, OUT failed_calls integer,
    OUT slow_calls integer, OUT not_permitted bigint, OUT probes_in_flight integer,
    OUT window_type text, OUT window_size integer,
    OUT since timestamptz, OUT next_probe timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'breaker_entries'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience.breaker_entries() IS
'Every circuit breaker of this database, as the next call would see it; backs the breakers view';

CREATE VIEW resilience.breakers AS
    SELECT * FROM resilience.breaker_entries();
COMMENT ON VIEW resilience.breakers IS
'Circuit breakers of this database: state, failure and slow-call rates over the window, calls, since when, next probe';

CREATE FUNCTION resilience._breaker_sweep()
RETURNS bigint
AS 'MODULE_PATHNAME', 'breaker_sweep'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._breaker_sweep() IS
'Internal (part of run_reaper): forget closed breakers whose window is empty';

------------------------------------------------------------------------------
-- Bulkheads (shared memory; need shared_preload_libraries = 'resilience')
------------------------------------------------------------------------------

-- Permits belong to the backend that took them: PARALLEL UNSAFE.
CREATE FUNCTION resilience.bulkhead_acquire(
    name text, max_concurrent integer, max_wait interval DEFAULT '0', max_queue integer DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'bulkhead_acquire'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004 (max_queue NULL: no limit)
COMMENT ON FUNCTION resilience.bulkhead_acquire(text, integer, interval, integer) IS
'Take a permit of the bulkhead until the end of the transaction, waiting in FIFO order at most max_wait; false if none was had';

CREATE FUNCTION resilience.bulkhead_acquire_session(
    name text, max_concurrent integer, max_wait interval DEFAULT '0', max_queue integer DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'bulkhead_acquire_session'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.bulkhead_acquire_session(text, integer, interval, integer) IS
'Take a permit of the bulkhead until bulkhead_release or the end of the session';

CREATE FUNCTION resilience.bulkhead_release(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'bulkhead_release'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.bulkhead_release(text) IS
'Give back one session permit of the bulkhead held by this session; false if it holds none';

CREATE FUNCTION resilience.bulkhead_entries(
    OUT name text, OUT max_concurrent integer, OUT in_use integer, OUT waiting integer,
    OUT acquired bigint, OUT rejected bigint, OUT timed_out bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'bulkhead_entries'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience.bulkhead_entries() IS
'Every bulkhead in shared memory; backs the bulkheads view';

CREATE VIEW resilience.bulkheads AS
    SELECT * FROM resilience.bulkhead_entries();
COMMENT ON VIEW resilience.bulkheads IS
'Bulkheads: permits in use, sessions waiting, maximum, and permits acquired, rejected at once and timed out';

CREATE FUNCTION resilience._bulkhead_sweep()
RETURNS bigint
AS 'MODULE_PATHNAME', 'bulkhead_sweep'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._bulkhead_sweep() IS
'Internal (part of run_reaper): remove bulkheads nobody holds or waits for';

------------------------------------------------------------------------------
-- Retries (no shared memory)
------------------------------------------------------------------------------

-- PARALLEL RESTRICTED: it draws from random()'s per-backend generator.
CREATE FUNCTION resilience.backoff(
    attempt integer, base interval, cap interval, jitter text DEFAULT 'full',
    previous interval DEFAULT NULL)
RETURNS interval
AS 'MODULE_PATHNAME', 'backoff'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;   -- not STRICT: NULLs raise 22004 (previous NULL: base)
COMMENT ON FUNCTION resilience.backoff(integer, interval, interval, text, interval) IS
'Delay before retry number attempt (0 first): min(cap, base * 2^attempt) with none, full, equal or decorrelated jitter';

CREATE FUNCTION resilience.is_retryable(sqlstate text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'is_retryable'
LANGUAGE C IMMUTABLE PARALLEL SAFE;   -- not STRICT: NULL raises 22004
COMMENT ON FUNCTION resilience.is_retryable(text) IS
'Is an error with this SQLSTATE worth retrying as it is (serialization failure, deadlock, lock timeout, lost connection, shutdown...)?';

CREATE PROCEDURE resilience.retry(
    sql text, max_attempts integer DEFAULT 5, base interval DEFAULT '10 ms',
    cap interval DEFAULT '1 s', jitter text DEFAULT 'full', breaker text DEFAULT NULL)
AS 'MODULE_PATHNAME', 'retry'
LANGUAGE C;
COMMENT ON PROCEDURE resilience.retry(text, integer, interval, interval, text, text) IS
'Run sql in a transaction of its own per attempt, retrying retryable errors with backoff; with breaker, each attempt goes through it';

------------------------------------------------------------------------------
-- Workers and jobs
------------------------------------------------------------------------------

CREATE FUNCTION resilience.run_reaper(OUT item text, OUT removed bigint)
RETURNS SETOF record
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT 'rate_limit_keys', resilience._rate_limit_sweep()
    UNION ALL SELECT 'breakers', resilience._breaker_sweep()
    UNION ALL SELECT 'bulkheads', resilience._bulkhead_sweep()
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
