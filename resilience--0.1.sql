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
-- Lease locks with fencing tokens; advisory-lock helpers on text names
------------------------------------------------------------------------------

-- Every fencing token comes from this one sequence: strictly increasing for
-- every name, across rollbacks, crashes, restarts and failover (docs/locks.md).
CREATE SEQUENCE resilience.fencing_tokens;
COMMENT ON SEQUENCE resilience.fencing_tokens IS
'Source of every fencing token; never reset it (dumped and restored with its value)';
SELECT pg_catalog.pg_extension_config_dump('resilience.fencing_tokens', '');

CREATE TABLE resilience.leases (
    name text PRIMARY KEY,
    owner text NOT NULL,
    token bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
) WITH (fillfactor = 70);   -- room for HOT updates: every acquire, renew and release is one
COMMENT ON TABLE resilience.leases IS
'Lease locks: a lease is held while expires_at is in the future; released leases have expires_at set to the release time';
SELECT pg_catalog.pg_extension_config_dump('resilience.leases', '');

CREATE TABLE resilience.fences (
    resource text PRIMARY KEY,
    token bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
COMMENT ON TABLE resilience.fences IS
'The highest fencing token each guarded resource has accepted; writes with an older token are refused';
SELECT pg_catalog.pg_extension_config_dump('resilience.fences', '');

-- Lease and fence functions are SECURITY DEFINER so that callers need no
-- privileges on the tables (nobody may forge a token or move a fence back);
-- they pin search_path, and their SQL qualifies every name and operator.
CREATE FUNCTION resilience.lock_acquire(
    name text, ttl interval, owner text DEFAULT NULL, wait interval DEFAULT '0')
RETURNS bigint
AS 'MODULE_PATHNAME', 'lock_acquire'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.lock_acquire(text, interval, text, interval) IS
'Take the lease name for ttl; returns its fencing token, or NULL if not acquired within wait';

CREATE FUNCTION resilience.lock_renew(name text, token bigint, ttl interval)
RETURNS boolean
AS 'MODULE_PATHNAME', 'lock_renew'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.lock_renew(text, bigint, interval) IS
'Extend a lease held under token to ttl from now; false if the lease was lost';

CREATE FUNCTION resilience.lock_release(name text, token bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'lock_release'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.lock_release(text, bigint) IS
'Release a lease held under token; false (never an error) if that token no longer holds it';

CREATE FUNCTION resilience.lock_check(name text, token bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'lock_check'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.lock_check(text, bigint) IS
'Does token hold the lease right now?';

CREATE FUNCTION resilience.fence(resource text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'fence'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.fence(text, bigint) IS
'Record token as the newest for resource; raises RS001 if the resource has accepted a newer one';

CREATE FUNCTION resilience.fence_check(resource text, token bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'fence_check'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.fence_check(text, bigint) IS
'Like fence, as a boolean for WHERE clauses: UPDATE ... WHERE resilience.fence_check(resource, token)';

-- Advisory helpers: PostgreSQL advisory locks on text names (64-bit hash, in
-- a key space of their own), each returning a fencing token.
CREATE FUNCTION resilience.advisory_xact_lock(name text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'advisory_xact_lock'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.advisory_xact_lock(text) IS
'Wait for the advisory lock on name, held until the transaction ends; returns a fencing token';

CREATE FUNCTION resilience.advisory_lock(name text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'advisory_lock'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.advisory_lock(text) IS
'Wait for the session advisory lock on name (not through transaction-pooling proxies); returns a fencing token';

CREATE FUNCTION resilience.try_advisory_lock(name text, timeout interval DEFAULT '0')
RETURNS bigint
AS 'MODULE_PATHNAME', 'try_advisory_lock'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.try_advisory_lock(text, interval) IS
'Session advisory lock on name if granted within timeout: a fencing token, else NULL';

CREATE FUNCTION resilience.advisory_unlock(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'advisory_unlock'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.advisory_unlock(text) IS
'Release the session advisory lock on name; false if this session did not hold it';

CREATE FUNCTION resilience.lock_key(name text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'lock_key'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION resilience.lock_key(text) IS
'The 64-bit key of the advisory helper lock on name (pg_locks: classid = high 32 bits, objid = low, objsubid = 3)';

CREATE FUNCTION resilience._lock_waiters(OUT name text, OUT pid integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'lock_waiters'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience._lock_waiters() IS
'Internal: one row per session waiting in lock_acquire, with the lease it waits for';

CREATE FUNCTION resilience._advisory_lock_names(OUT key bigint, OUT name text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'advisory_lock_names'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience._advisory_lock_names() IS
'Internal: names the advisory helpers have locked, by key (for the locks view)';

CREATE VIEW resilience.locks AS
    SELECT 'lease'::text AS kind, l.name, l.owner, l.token, l.acquired_at, l.expires_at,
           (SELECT count(*) FROM resilience._lock_waiters() w
             WHERE w.name OPERATOR(pg_catalog.=) l.name)::integer AS waiters,
           NULL::integer AS pid
      FROM resilience.leases l
     WHERE l.expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()
    UNION ALL
    SELECT 'advisory', n.name, a.application_name, NULL, NULL, NULL,
           (SELECT count(*) FROM pg_catalog.pg_locks q
             WHERE q.locktype OPERATOR(pg_catalog.=) 'advisory' AND NOT q.granted
               AND q.database OPERATOR(pg_catalog.=) g.database
               AND q.classid OPERATOR(pg_catalog.=) g.classid
               AND q.objid OPERATOR(pg_catalog.=) g.objid
               AND q.objsubid OPERATOR(pg_catalog.=) g.objsubid)::integer,
           g.pid
      FROM pg_catalog.pg_locks g
      LEFT JOIN resilience._advisory_lock_names() n
        ON n.key OPERATOR(pg_catalog.=) ((g.classid::bigint OPERATOR(pg_catalog.<<) 32)
                                         OPERATOR(pg_catalog.|) g.objid::bigint)
      LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) g.pid
     WHERE g.locktype OPERATOR(pg_catalog.=) 'advisory' AND g.granted
       AND g.objsubid OPERATOR(pg_catalog.=) 3
       AND g.database OPERATOR(pg_catalog.=)
           (SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
COMMENT ON VIEW resilience.locks IS
'Held leases (with sessions waiting for them) and advisory locks taken through the helpers, by name';

-- Long-expired leases are only history: the reaper removes them (tokens come
-- from the sequence, so forgetting a lease never lets a token repeat).
CREATE FUNCTION resilience._reap_leases(older_than interval DEFAULT '1 hour')
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch_size integer := coalesce(current_setting('resilience.reaper_batch_size', true)::integer, 5000);
    max_batches integer := coalesce(current_setting('resilience.reaper_max_batches', true)::integer, 20);
    removed bigint := 0;
    n bigint;
BEGIN
    FOR i IN 1 .. max_batches LOOP
        WITH doomed AS (
            SELECT ctid FROM resilience.leases
             WHERE expires_at < clock_timestamp() - older_than
             LIMIT batch_size FOR UPDATE SKIP LOCKED)
        DELETE FROM resilience.leases l USING doomed WHERE l.ctid = doomed.ctid;
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
        EXIT WHEN n < batch_size;
    END LOOP;
    RETURN removed;
END
$$;
COMMENT ON FUNCTION resilience._reap_leases(interval) IS
'Internal (part of run_reaper): delete leases expired for longer than older_than, in batches of resilience.reaper_batch_size';

------------------------------------------------------------------------------
-- Idempotency keys and the consumer inbox (tables; work without preloading)
------------------------------------------------------------------------------

-- One row per (scope, key).  Keys are opaque: compared byte for byte (C
-- collation), at most 255 characters (Stripe's limit).  src/idempotency.c
-- reads rows by column number: keep the column order in step with it.
--
-- The functions below are the only writers and check every value they write
-- (lengths, states, status codes), so the tables carry no CHECK constraints:
-- PostgreSQL re-reads each constraint's expression for every INSERT and
-- UPDATE statement, which cost 40% of the throughput of a new key.
-- Invariants: state is started, retry, completed or failed; locked_until is
-- set exactly when state = started; fingerprint is 32 bytes.
CREATE TABLE resilience.idempotency_keys (
    scope text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    fingerprint bytea NOT NULL,         -- SHA-256 of the request's jsonb text
    state text NOT NULL,
    recovery_point text,                -- the last checkpoint; NULL: none yet
    response jsonb,
    status_code integer,
    error jsonb,                        -- from idempotency_fail; replayed when failed
    attempts integer NOT NULL,          -- how many times begin answered proceed
    lock_timeout interval NOT NULL,
    locked_until timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (scope, key)
) WITH (fillfactor = 80);   -- room for the HOT update that completes a new key
CREATE INDEX idempotency_keys_expires_at ON resilience.idempotency_keys (expires_at);
COMMENT ON TABLE resilience.idempotency_keys IS
'Idempotency keys: the request fingerprint (SHA-256), the state, the last checkpoint, the stored response, the lock expiry; reaped after expires_at';
SELECT pg_catalog.pg_extension_config_dump('resilience.idempotency_keys', '');

CREATE TABLE resilience.inbox (
    consumer text COLLATE "C" NOT NULL,
    message_id text COLLATE "C" NOT NULL,
    accepted_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT inbox_pkey PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_expires_at ON resilience.inbox (expires_at);
COMMENT ON TABLE resilience.inbox IS
'Message ids each consumer has accepted, remembered until expires_at';
SELECT pg_catalog.pg_extension_config_dump('resilience.inbox', '');

-- Callers get no privilege on the tables: the functions below are their only
-- way in (a stored response is readable only by whoever can replay it).
REVOKE ALL ON resilience.idempotency_keys, resilience.inbox FROM PUBLIC;

-- The C functions below read through the primary key directly and run their
-- writing statements as the tables' owner, qualifying every name and
-- operator (src/idempotency.c, "Privileges"): the effect of SECURITY DEFINER
-- with a pinned search_path, without its cost on every call.  None of them
-- runs caller-supplied SQL: idempotent(), which does, is SECURITY INVOKER.
CREATE FUNCTION resilience.idempotency_begin(
    scope text, key text, request jsonb,
    ttl interval DEFAULT '24 hours', lock_timeout interval DEFAULT '5 minutes',
    OUT outcome text, OUT response jsonb, OUT status_code integer, OUT recovery_point text)
RETURNS record
AS 'MODULE_PATHNAME', 'idempotency_begin'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
COMMENT ON FUNCTION resilience.idempotency_begin(text, text, jsonb, interval, interval) IS
'Start or resume work under an idempotency key: proceed (from recovery_point), replay (the stored response), in_progress or mismatch';

CREATE FUNCTION resilience._idempotency_begin_wait(
    scope text, key text, request jsonb, ttl interval, lock_timeout interval,
    OUT outcome text, OUT response jsonb, OUT status_code integer, OUT recovery_point text)
RETURNS record
AS 'MODULE_PATHNAME', 'idempotency_begin_wait'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._idempotency_begin_wait(text, text, jsonb, interval, interval) IS
'Internal (idempotent): idempotency_begin that waits up to lock_timeout for a transaction holding the key';

CREATE FUNCTION resilience.idempotency_checkpoint(scope text, key text, recovery_point text)
RETURNS void
AS 'MODULE_PATHNAME', 'idempotency_checkpoint'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.idempotency_checkpoint(text, text, text) IS
'Record the phase a key in progress has reached (a retry resumes there) and renew its lock';

CREATE FUNCTION resilience.idempotency_complete(
    scope text, key text, response jsonb, status_code integer DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'idempotency_complete'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.idempotency_complete(text, text, jsonb, integer) IS
'Store the response of a key in progress; every later begin with the same request replays it';

CREATE FUNCTION resilience.idempotency_fail(
    scope text, key text, error jsonb, retryable boolean, status_code integer DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'idempotency_fail'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.idempotency_fail(text, text, jsonb, boolean, integer) IS
'End an attempt with an error: retryable ones are not cached (the next begin proceeds), others are replayed';

-- SECURITY INVOKER, and no SET clause: sql runs as the caller, with the
-- caller's search_path, exactly as if the caller had run it.
CREATE FUNCTION resilience.idempotent(
    scope text, key text, request jsonb, sql text,
    ttl interval DEFAULT '24 hours', lock_timeout interval DEFAULT '5 minutes')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE   -- not STRICT: NULLs raise 22004
AS $$
DECLARE
    b record;
    result jsonb;
BEGIN
    IF sql IS NULL THEN
        RAISE EXCEPTION 'sql must not be null' USING ERRCODE = '22004';
    END IF;
    b := resilience._idempotency_begin_wait(scope, key, request, ttl, lock_timeout);
    IF b.outcome OPERATOR(pg_catalog.=) 'replay' THEN
        RETURN b.response;
    ELSIF b.outcome OPERATOR(pg_catalog.=) 'mismatch' THEN
        RAISE EXCEPTION 'idempotency key "%" in scope "%" was used with a different request', key, scope
            USING ERRCODE = '22023',
                  HINT = 'Use a new key for a new request.';
    ELSIF b.outcome OPERATOR(pg_catalog.=) 'in_progress' THEN
        RAISE EXCEPTION 'idempotency key "%" in scope "%" is in progress', key, scope
            USING ERRCODE = '55P03',
                  DETAIL = 'An attempt that began in another transaction holds its lock.',
                  HINT = 'Retry after its lock_timeout.';
    END IF;
    EXECUTE sql INTO result;
    PERFORM resilience.idempotency_complete(scope, key, result);
    RETURN result;
END
$$;
COMMENT ON FUNCTION resilience.idempotent(text, text, jsonb, text, interval, interval) IS
'Run sql (returning jsonb) at most once per key, in the caller''s transaction and with the caller''s privileges; replay its result afterwards';

CREATE FUNCTION resilience.inbox_accept(
    consumer text, message_id text, ttl interval DEFAULT '7 days')
RETURNS boolean
AS 'MODULE_PATHNAME', 'inbox_accept'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
COMMENT ON FUNCTION resilience.inbox_accept(text, text, interval) IS
'True the first time consumer sees message_id (within ttl), false afterwards; forgotten if the transaction rolls back';

CREATE FUNCTION resilience._idempotency_reap()
RETURNS bigint
AS 'MODULE_PATHNAME', 'idempotency_reap'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._idempotency_reap() IS
'Internal (part of run_reaper): delete expired idempotency keys in batches of resilience.reaper_batch_size';

CREATE FUNCTION resilience._inbox_reap()
RETURNS bigint
AS 'MODULE_PATHNAME', 'inbox_reap'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._inbox_reap() IS
'Internal (part of run_reaper): delete expired inbox rows in batches of resilience.reaper_batch_size';

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
'Like breaker_allow, but raises SQLSTATE RS002 (with the time until the next probe) when the call is not permitted';

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
-- Sagas: orchestrated, compensating (tables; the worker that drives them
-- needs shared_preload_libraries, saga_tick() and saga_run() work without it)
------------------------------------------------------------------------------

-- Roles: resilience_admin defines sagas and handles parked ones;
-- resilience_user starts sagas and answers async steps.  Roles are
-- cluster-wide and outlive the extension; they are created only if missing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'resilience_user') THEN
        CREATE ROLE resilience_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'resilience_admin') THEN
        CREATE ROLE resilience_admin NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('resilience_admin', 'resilience_user', 'MEMBER') THEN
        GRANT resilience_user TO resilience_admin;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA resilience TO resilience_user;

-- Definitions are versioned and immutable: saga_define adds a version, and
-- a saga runs on the version it started with.  steps is the normalized
-- definition (every default spelled out, functions schema-qualified);
-- definer is the role that defined it, the role every step runs as.
CREATE SEQUENCE resilience.saga_definition_ids;
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_definition_ids', '');
CREATE TABLE resilience.saga_definitions (
    id bigint PRIMARY KEY DEFAULT pg_catalog.nextval('resilience.saga_definition_ids'),
    name text NOT NULL CHECK (pg_catalog.octet_length(name) BETWEEN 1 AND 63),
    version integer NOT NULL CHECK (version > 0),
    steps jsonb NOT NULL,
    definer regrole NOT NULL,
    defined_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    UNIQUE (name, version)
);
COMMENT ON TABLE resilience.saga_definitions IS
'Saga definitions, one row per version (written by saga_define, never updated); steps run as definer';
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_definitions', '');

CREATE FUNCTION resilience._saga_definitions_immutable()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'saga definitions cannot be changed'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('Version %s of saga "%s" may be running.', OLD.version, OLD.name),
              HINT = 'Call resilience.saga_define to add a new version; new sagas start on it.';
END
$$;
COMMENT ON FUNCTION resilience._saga_definitions_immutable() IS
'Internal: refuses updates of saga definitions (running sagas depend on their version)';

CREATE TRIGGER definitions_immutable
    BEFORE UPDATE ON resilience.saga_definitions
    FOR EACH ROW EXECUTE FUNCTION resilience._saga_definitions_immutable();

-- One row per saga.  The orchestrator (saga_tick) looks at a saga when
-- next_run_at has come: to run its step, send its command, time out the
-- reply it awaits, apply the reply it got, or retry; next_run_at is NULL
-- once it has finished or is parked.  step counts up from 1 while running
-- and down while compensating; attempt counts the attempts made at it.
CREATE SEQUENCE resilience.saga_ids;
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_ids', '');
CREATE TABLE resilience.sagas (
    id bigint PRIMARY KEY DEFAULT pg_catalog.nextval('resilience.saga_ids'),
    definition_id bigint NOT NULL REFERENCES resilience.saga_definitions (id),
    name text NOT NULL,
    state text NOT NULL
        CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'compensation_failed')),
    step integer NOT NULL,
    attempt integer NOT NULL DEFAULT 0,
    awaiting boolean NOT NULL DEFAULT false,
    reply jsonb,
    payload jsonb NOT NULL,
    context jsonb NOT NULL,
    idempotency_key text,
    error jsonb,
    next_run_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX sagas_due ON resilience.sagas (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE UNIQUE INDEX sagas_idempotency_key ON resilience.sagas (name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX sagas_finished ON resilience.sagas (finished_at) WHERE finished_at IS NOT NULL;
COMMENT ON TABLE resilience.sagas IS
'Sagas: state (running, compensating, completed, compensated, compensation_failed), current step and attempt, context';
SELECT pg_catalog.pg_extension_config_dump('resilience.sagas', '');

-- One row per step a saga has reached (written in the step's transaction).
CREATE TABLE resilience.saga_steps (
    saga_id bigint NOT NULL,
    step_no integer NOT NULL,
    name text NOT NULL,
    state text NOT NULL
        CHECK (state IN ('waiting', 'retrying', 'completed', 'failed', 'timed_out', 'abandoned',
                         'compensating', 'compensated', 'compensation_failed')),
    attempts integer NOT NULL DEFAULT 0,
    compensation_attempts integer NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    compensated_at timestamptz,
    result jsonb,
    error jsonb,
    PRIMARY KEY (saga_id, step_no)
);
COMMENT ON TABLE resilience.saga_steps IS
'Each step a saga has reached: its state, attempts, result and last error, and its compensation';
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_steps', '');

-- Every transition, committed with it: the whole story of each saga.
CREATE SEQUENCE resilience.saga_event_ids;
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_event_ids', '');
CREATE TABLE resilience.saga_events (
    saga_id bigint NOT NULL,
    id bigint NOT NULL DEFAULT pg_catalog.nextval('resilience.saga_event_ids'),
    at timestamptz NOT NULL,
    event text NOT NULL,
    step text,
    attempt integer,
    state text NOT NULL,
    error jsonb,
    detail jsonb,
    correlation_id text NOT NULL,
    PRIMARY KEY (saga_id, id)
);
COMMENT ON TABLE resilience.saga_events IS
'Every saga transition (time, step, attempt, the saga''s state after it, error, correlation id = the idempotency key participants see)';
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_events', '');

-- Validation and normalization of a definition, run as the caller of
-- saga_define: function names are resolved with the caller's search_path
-- (passed in; everything else runs under a pinned one) and must be
-- executable by the caller.
CREATE FUNCTION resilience._saga_normalize(name text, steps jsonb, caller_search_path text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
SET intervalstyle = postgres   -- the normalized text must not depend on the session
AS $$
DECLARE
    known_keys constant text[] := ARRAY['name', 'action', 'compensation', 'topic', 'timeout',
                                        'max_attempts', 'backoff', 'retry_on'];
    step jsonb;
    pos bigint;
    k text;
    label text;
    step_name text;
    step_names text[] := '{}';
    part text;
    fn text;
    parts text[];
    fn_oid regprocedure;
    fn_rec record;
    found_sigs text;
    resolved jsonb;
    is_async boolean;
    topic text;
    timeout interval;
    max_attempts integer;
    backoff jsonb;
    base interval;
    cap interval;
    jitter text;
    retry_on jsonb;
    code text;
    normalized jsonb := '[]';
BEGIN
    IF name IS NULL THEN
        RAISE EXCEPTION 'saga name must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(name) NOT BETWEEN 1 AND 63 THEN
        RAISE EXCEPTION 'saga name must be 1 to 63 bytes long'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s bytes.', octet_length(name));
    END IF;
    IF steps IS NULL THEN
        RAISE EXCEPTION 'steps must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(steps) <> 'array' OR jsonb_array_length(steps) = 0 THEN
        RAISE EXCEPTION 'steps must be a non-empty JSON array of step objects'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('steps is %s.', left(steps::text, 200)),
                  HINT = 'Steps run in array order, e.g. [{"name": "reserve", "action": "shop.reserve", "compensation": "shop.release"}].';
    END IF;
    IF jsonb_array_length(steps) > 100 THEN
        RAISE EXCEPTION 'a saga has at most 100 steps'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It has %s.', jsonb_array_length(steps));
    END IF;

    FOR step, pos IN SELECT e.value, e.ordinality FROM jsonb_array_elements(steps) WITH ORDINALITY e ORDER BY e.ordinality LOOP
        label := format('step %s', pos);
        IF jsonb_typeof(step) <> 'object' THEN
            RAISE EXCEPTION '% must be a JSON object', label
                USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', left(step::text, 200));
        END IF;
        FOR k IN SELECT jsonb_object_keys(step) LOOP
            IF NOT k = ANY (known_keys) THEN
                RAISE EXCEPTION '% has an unknown key "%"', label, k
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = format('A step has the keys %s.', array_to_string(known_keys, ', ')),
                          HINT = 'Steps run in the order of the array: there are no "next" links, so no cycles.';
            END IF;
        END LOOP;

        IF jsonb_typeof(step -> 'name') IS DISTINCT FROM 'string'
           OR octet_length(step ->> 'name') NOT BETWEEN 1 AND 63 THEN
            RAISE EXCEPTION '% needs a name of 1 to 63 bytes', label
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('name is %s.', coalesce((step -> 'name')::text, 'missing'));
        END IF;
        step_name := step ->> 'name';
        IF step_name = ANY (step_names) THEN
            RAISE EXCEPTION 'duplicate step name "%"', step_name
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('Steps %s and %s have that name.', array_position(step_names, step_name), pos),
                      HINT = 'Step names identify steps in replies and events: make them unique.';
        END IF;
        step_names := step_names || step_name;
        label := format('step %s ("%s")', pos, step_name);

        -- action (required) and compensation (optional): a function, or "async"
        resolved := '{}';
        is_async := false;
        FOREACH part IN ARRAY ARRAY['action', 'compensation'] LOOP
            IF NOT step ? part OR jsonb_typeof(step -> part) = 'null' THEN
                IF part = 'action' THEN
                    RAISE EXCEPTION '% has no action', label
                        USING ERRCODE = 'invalid_parameter_value',
                              HINT = 'An action is a function f(saga_id bigint, context jsonb) returns jsonb, or "async".';
                END IF;
                resolved := resolved || jsonb_build_object(part, NULL);
                CONTINUE;
            END IF;
            IF jsonb_typeof(step -> part) <> 'string' OR btrim(step ->> part) = '' THEN
                RAISE EXCEPTION '% of % must be a function name or "async"', part, label
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = format('It is %s.', left((step -> part)::text, 200));
            END IF;
            fn := step ->> part;
            IF fn = 'async' THEN
                is_async := true;
                resolved := resolved || jsonb_build_object(part, 'async');
                CONTINUE;
            END IF;
            BEGIN
                parts := parse_ident(fn);
            EXCEPTION WHEN invalid_parameter_value OR invalid_text_representation THEN
                parts := NULL;
            END;
            IF parts IS NULL OR cardinality(parts) > 2 THEN
                RAISE EXCEPTION '% of % is not a function name: %', part, label, fn
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Give the name only, optionally schema-qualified (shop.reserve), without arguments.';
            END IF;
            -- resolve as the caller would: with the caller's search_path
            PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
            fn_oid := pg_catalog.to_regprocedure(
                pg_catalog.array_to_string(ARRAY(SELECT pg_catalog.quote_ident(p) FROM pg_catalog.unnest(parts) p), '.')
                OPERATOR(pg_catalog.||) '(pg_catalog.int8, pg_catalog.jsonb)');
            IF fn_oid IS NULL THEN
                SELECT pg_catalog.string_agg(p.oid::regprocedure::text, ', ' ORDER BY p.oid) INTO found_sigs
                  FROM pg_catalog.pg_proc p
                 WHERE p.proname OPERATOR(pg_catalog.=) parts[pg_catalog.cardinality(parts)]
                   AND (CASE WHEN pg_catalog.cardinality(parts) OPERATOR(pg_catalog.=) 2
                             THEN p.pronamespace OPERATOR(pg_catalog.=)
                                  (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) parts[1])
                             ELSE pg_catalog.pg_function_is_visible(p.oid) END);
            END IF;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            IF fn_oid IS NULL THEN
                RAISE EXCEPTION 'function %(bigint, jsonb) does not exist', fn
                    USING ERRCODE = 'undefined_function',
                          DETAIL = CASE WHEN found_sigs IS NULL THEN format('Needed by the %s of %s.', part, label)
                                        ELSE format('The %s of %s needs it; there is only %s.', part, label, found_sigs) END,
                          HINT = 'A step function is f(saga_id bigint, context jsonb) returns jsonb.';
            END IF;
            SELECT p.prokind, p.proretset, p.prorettype, n.nspname, p.proname INTO fn_rec
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = fn_oid;
            IF fn_rec.prokind <> 'f' OR fn_rec.proretset THEN
                RAISE EXCEPTION '% is not a plain function', fn_oid
                    USING ERRCODE = 'wrong_object_type',
                          DETAIL = format('The %s of %s must be a function returning one jsonb value, not a procedure, aggregate or set-returning function.', part, label);
            END IF;
            IF fn_rec.prorettype <> 'jsonb'::regtype THEN
                RAISE EXCEPTION 'function % returns %, not jsonb', fn_oid, fn_rec.prorettype::regtype
                    USING ERRCODE = 'datatype_mismatch',
                          DETAIL = format('It is the %s of %s.', part, label),
                          HINT = 'A step function is f(saga_id bigint, context jsonb) returns jsonb; its result is merged into the saga''s context.';
            END IF;
            IF NOT has_function_privilege(fn_oid, 'EXECUTE') THEN
                RAISE EXCEPTION 'permission denied for function %', fn_oid
                    USING ERRCODE = 'insufficient_privilege',
                          DETAIL = format('Steps run as the role that defines the saga, %s, which cannot execute the %s of %s.',
                                          current_user, part, label);
            END IF;
            resolved := resolved || jsonb_build_object(part, quote_ident(fn_rec.nspname) || '.' || quote_ident(fn_rec.proname));
        END LOOP;

        topic := NULL;
        IF step ? 'topic' AND jsonb_typeof(step -> 'topic') <> 'null' THEN
            IF NOT is_async THEN
                RAISE EXCEPTION '% has a topic but nothing async', label
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'A topic names where the commands of an async action or compensation are published.';
            END IF;
            IF jsonb_typeof(step -> 'topic') <> 'string' OR octet_length(step ->> 'topic') NOT BETWEEN 1 AND 255 THEN
                RAISE EXCEPTION 'topic of % must be a string of 1 to 255 bytes', label
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = format('It is %s.', left((step -> 'topic')::text, 300));
            END IF;
            topic := step ->> 'topic';
        ELSIF is_async THEN
            RAISE EXCEPTION '% is async but has no topic', label
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Commands of async steps are published on the step''s topic, e.g. "topic": "payments.commands".';
        END IF;

        timeout := resilience._saga_interval(step, 'timeout', '1 minute', label);
        IF timeout <= interval '0' OR timeout > interval '30 days' THEN
            RAISE EXCEPTION 'timeout of % must be more than 0 and at most 30 days', label
                USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', timeout);
        END IF;

        max_attempts := 3;
        IF step ? 'max_attempts' THEN
            IF jsonb_typeof(step -> 'max_attempts') IS DISTINCT FROM 'number'
               OR (step ->> 'max_attempts')::numeric <> trunc((step ->> 'max_attempts')::numeric)
               OR (step ->> 'max_attempts')::numeric NOT BETWEEN 1 AND 100 THEN
                RAISE EXCEPTION 'max_attempts of % must be an integer from 1 to 100', label
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = format('It is %s.', left((step -> 'max_attempts')::text, 100));
            END IF;
            max_attempts := (step ->> 'max_attempts')::numeric::integer;
        END IF;

        backoff := coalesce(step -> 'backoff', '{}');
        IF jsonb_typeof(backoff) <> 'object' THEN
            RAISE EXCEPTION 'backoff of % must be an object {"base", "cap", "jitter"}', label
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR k IN SELECT jsonb_object_keys(backoff) LOOP
            IF NOT k = ANY (ARRAY['base', 'cap', 'jitter']) THEN
                RAISE EXCEPTION 'backoff of % has an unknown key "%"', label, k
                    USING ERRCODE = 'invalid_parameter_value', DETAIL = 'backoff has the keys base, cap and jitter.';
            END IF;
        END LOOP;
        base := resilience._saga_interval(backoff, 'base', '1 second', 'backoff of ' || label);
        cap := resilience._saga_interval(backoff, 'cap', '1 minute', 'backoff of ' || label);
        IF base <= interval '0' OR base > interval '1 day' OR cap < base OR cap > interval '1 day' THEN
            RAISE EXCEPTION 'backoff of % must have 0 < base <= cap <= 1 day', label
                USING ERRCODE = 'invalid_parameter_value', DETAIL = format('base is %s, cap is %s.', base, cap);
        END IF;
        jitter := coalesce(backoff ->> 'jitter', 'full');
        IF jsonb_typeof(coalesce(backoff -> 'jitter', '"full"')) <> 'string' OR jitter NOT IN ('none', 'full', 'equal') THEN
            RAISE EXCEPTION 'jitter of % must be "none", "full" or "equal"', label
                USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', left((backoff -> 'jitter')::text, 100));
        END IF;

        retry_on := coalesce(step -> 'retry_on', '["40", "53", "08", "55P03"]');
        IF jsonb_typeof(retry_on) <> 'array' THEN
            RAISE EXCEPTION 'retry_on of % must be an array of SQLSTATEs or SQLSTATE classes', label
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ["40001", "55P03", "53"].';
        END IF;
        FOR code IN SELECT e::text FROM jsonb_array_elements(retry_on) e LOOP
            IF code !~ '^"[0-9A-Z]{2}([0-9A-Z]{3})?"$' THEN
                RAISE EXCEPTION 'retry_on of % holds %, which is neither a SQLSTATE nor a class', label, code
                    USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ["40001", "55P03", "53"].';
            END IF;
        END LOOP;

        normalized := normalized || jsonb_build_array(resolved || jsonb_build_object(
            'name', step_name, 'topic', topic, 'timeout', timeout::text, 'max_attempts', max_attempts,
            'backoff', jsonb_build_object('base', base::text, 'cap', cap::text, 'jitter', jitter),
            'retry_on', retry_on));
    END LOOP;
    RETURN normalized;
END
$$;
COMMENT ON FUNCTION resilience._saga_normalize(text, jsonb, text) IS
'Internal (saga_define): validates a definition as its caller and returns it with every default spelled out';

CREATE FUNCTION resilience._saga_interval(obj jsonb, key text, dflt interval, label text)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT obj ? key OR jsonb_typeof(obj -> key) = 'null' THEN
        RETURN dflt;
    END IF;
    IF jsonb_typeof(obj -> key) <> 'string' THEN
        RAISE EXCEPTION '% of % must be an interval such as "30 seconds"', key, label
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', left((obj -> key)::text, 100));
    END IF;
    RETURN (obj ->> key)::interval;
EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
    RAISE EXCEPTION '% of % must be an interval such as "30 seconds"', key, label
        USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', left((obj -> key)::text, 100));
END
$$;
COMMENT ON FUNCTION resilience._saga_interval(jsonb, text, interval, text) IS
'Internal (saga_define): an interval-valued key of a step, its default when absent, 22023 when malformed';

CREATE FUNCTION resilience.saga_define(name text, steps jsonb)
RETURNS integer
AS 'MODULE_PATHNAME', 'saga_define'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
COMMENT ON FUNCTION resilience.saga_define(text, jsonb) IS
'Define (a new version of) saga name; returns its version.  Steps run as the calling role, which must not be a superuser';

CREATE FUNCTION resilience.saga_start(name text, payload jsonb, idempotency_key text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'saga_start'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.saga_start(text, jsonb, text) IS
'Start a saga on the latest version of its definition, in this transaction; the same idempotency_key returns the same saga';

CREATE FUNCTION resilience.saga_tick()
RETURNS integer
AS 'MODULE_PATHNAME', 'saga_tick'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.saga_tick() IS
'Orchestrate by hand: advance one due saga by one step attempt or transition, in this transaction; 1 if one was due, else 0';

CREATE FUNCTION resilience._saga_worker_tick()
RETURNS bigint
AS 'MODULE_PATHNAME', 'saga_worker_tick'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience._saga_worker_tick() IS
'Internal (the worker''s sagas job): saga_tick, then ms until the next saga is due (0: at once, -1: none)';

-- CALL resilience.saga_run(): drive sagas by hand until none is due (or
-- max_steps), one transaction per step attempt.  Not inside BEGIN ... COMMIT.
CREATE PROCEDURE resilience.saga_run(max_steps integer DEFAULT 10000)
LANGUAGE plpgsql
AS $$
BEGIN
    IF max_steps IS NULL OR max_steps OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'max_steps must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 1 .. max_steps LOOP
        EXIT WHEN resilience.saga_tick() OPERATOR(pg_catalog.=) 0;
        COMMIT;
    END LOOP;
END
$$;
COMMENT ON PROCEDURE resilience.saga_run(integer) IS
'Drive sagas by hand (without a worker): saga_tick in its own transaction until no saga is due or max_steps';

CREATE FUNCTION resilience.saga_step_completed(
    saga_id bigint, step text, result jsonb, compensation boolean DEFAULT false)
RETURNS boolean
AS 'MODULE_PATHNAME', 'saga_step_completed'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.saga_step_completed(bigint, text, jsonb, boolean) IS
'Reply to the command of an async step (or, with compensation, of its async compensation): it succeeded; false if the reply came late or twice (recorded, ignored)';

CREATE FUNCTION resilience.saga_step_failed(
    saga_id bigint, step text, error jsonb, retryable boolean, compensation boolean DEFAULT false)
RETURNS boolean
AS 'MODULE_PATHNAME', 'saga_step_failed'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.saga_step_failed(bigint, text, jsonb, boolean, boolean) IS
'Reply to the command of an async step (or compensation): it failed, retryable or not; false if the reply came late or twice (recorded, ignored)';

CREATE FUNCTION resilience.saga_retry(saga_id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'saga_retry'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.saga_retry(bigint) IS
'Resume a saga parked in compensation_failed: its compensation is attempted again (max_attempts afresh)';

CREATE FUNCTION resilience.saga_abort(saga_id bigint, reason text)
RETURNS void
AS 'MODULE_PATHNAME', 'saga_abort'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.saga_abort(bigint, text) IS
'Stop a running saga and compensate its completed steps, in reverse order';

-- Finished sagas (completed or compensated) are kept for
-- resilience.saga_retention (default 7 days; parked and running sagas are
-- kept until they finish), then removed with their steps and events in
-- batches.  Like every reaper, executable by anyone: it removes only what the
-- retention allows, read from the library (a placeholder setting cannot
-- shorten it).
CREATE FUNCTION resilience._saga_retention()
RETURNS interval
AS 'MODULE_PATHNAME', 'saga_retention'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION resilience._saga_retention() IS
'Internal (_saga_reap): resilience.saga_retention (its default without shared_preload_libraries)';

CREATE FUNCTION resilience._saga_reap()
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    retention interval := resilience._saga_retention();
    batch_size integer := coalesce(current_setting('resilience.reaper_batch_size', true)::integer, 5000);
    max_batches integer := coalesce(current_setting('resilience.reaper_max_batches', true)::integer, 20);
    removed bigint := 0;
    ids bigint[];
BEGIN
    FOR i IN 1 .. max_batches LOOP
        SELECT array_agg(s.id) INTO ids
          FROM (SELECT id FROM resilience.sagas
                 WHERE finished_at < clock_timestamp() - retention
                 ORDER BY finished_at LIMIT batch_size FOR UPDATE SKIP LOCKED) s;
        EXIT WHEN ids IS NULL;
        DELETE FROM resilience.saga_events WHERE saga_id = ANY (ids);
        DELETE FROM resilience.saga_steps WHERE saga_id = ANY (ids);
        DELETE FROM resilience.sagas WHERE id = ANY (ids);
        removed := removed + cardinality(ids);
        EXIT WHEN cardinality(ids) < batch_size;
    END LOOP;
    RETURN removed;
END
$$;
COMMENT ON FUNCTION resilience._saga_reap() IS
'Internal (part of run_reaper): delete sagas finished longer ago than resilience.saga_retention, with their steps and events, in batches of resilience.reaper_batch_size';

CREATE VIEW resilience.saga_stats AS
    SELECT s.name, d.version, s.state,
           count(*) AS sagas,
           percentile_cont(0.5) WITHIN GROUP
               (ORDER BY coalesce(s.finished_at, pg_catalog.clock_timestamp()) - s.created_at) AS p50_duration,
           percentile_cont(0.95) WITHIN GROUP
               (ORDER BY coalesce(s.finished_at, pg_catalog.clock_timestamp()) - s.created_at) AS p95_duration,
           coalesce(sum(r.retries), 0)::bigint AS retries,
           min(s.created_at) AS first_started_at,
           max(s.updated_at) AS last_progress_at
      FROM resilience.sagas s
      JOIN resilience.saga_definitions d ON d.id = s.definition_id
      LEFT JOIN (SELECT saga_id,
                        sum(greatest(attempts - 1, 0) + greatest(compensation_attempts - 1, 0)) AS retries
                   FROM resilience.saga_steps GROUP BY saga_id) r ON r.saga_id = s.id
     GROUP BY s.name, d.version, s.state;
COMMENT ON VIEW resilience.saga_stats IS
'Per saga definition, version and state: how many, p50/p95 duration (so far, for unfinished ones), retries';

CREATE VIEW resilience.stuck_sagas AS
    SELECT s.id, s.name, d.version, s.state, s.step, d.steps -> (s.step - 1) ->> 'name' AS step_name,
           s.attempt,
           CASE WHEN s.state = 'compensation_failed' THEN 'saga_retry'
                WHEN s.awaiting AND s.reply IS NULL THEN 'reply'
                WHEN s.next_run_at > pg_catalog.clock_timestamp() THEN 'retry'
                ELSE 'worker' END AS waiting_for,
           s.next_run_at,
           s.updated_at AS last_progress_at,
           pg_catalog.clock_timestamp() - s.updated_at AS stuck_for,
           (SELECT e.error FROM resilience.saga_events e
             WHERE e.saga_id = s.id AND e.error IS NOT NULL ORDER BY e.id DESC LIMIT 1) AS last_error
      FROM resilience.sagas s
      JOIN resilience.saga_definitions d ON d.id = s.definition_id
     WHERE s.state IN ('running', 'compensating', 'compensation_failed')
       AND s.updated_at < pg_catalog.clock_timestamp()
           - coalesce(nullif(pg_catalog.current_setting('resilience.saga_stuck_after', true), ''), '5 min')::interval;
COMMENT ON VIEW resilience.stuck_sagas IS
'Unfinished sagas without progress for longer than resilience.saga_stuck_after, and what each waits for (reply, retry, worker, saga_retry)';

-- Privileges.  Functions are executable by PUBLIC by default: revoke that
-- from every saga function and grant by role.  saga_define is not SECURITY
-- DEFINER: it records its caller as the definer (and writes the table as
-- the extension's owner).
REVOKE ALL ON FUNCTION resilience.saga_define(text, jsonb), resilience.saga_start(text, jsonb, text),
    resilience.saga_tick(), resilience._saga_worker_tick(),
    resilience.saga_step_completed(bigint, text, jsonb, boolean),
    resilience.saga_step_failed(bigint, text, jsonb, boolean, boolean),
    resilience.saga_retry(bigint), resilience.saga_abort(bigint, text),
    resilience._saga_normalize(text, jsonb, text), resilience._saga_interval(jsonb, text, interval, text),
    resilience._saga_retention(), resilience._saga_definitions_immutable()
    FROM PUBLIC;
REVOKE ALL ON PROCEDURE resilience.saga_run(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.saga_define(text, jsonb), resilience.saga_tick(),
    resilience.saga_retry(bigint), resilience.saga_abort(bigint, text),
    resilience._saga_normalize(text, jsonb, text), resilience._saga_interval(jsonb, text, interval, text)
    TO resilience_admin;
GRANT EXECUTE ON PROCEDURE resilience.saga_run(integer) TO resilience_admin;
GRANT EXECUTE ON FUNCTION resilience.saga_start(text, jsonb, text),
    resilience.saga_step_completed(bigint, text, jsonb, boolean),
    resilience.saga_step_failed(bigint, text, jsonb, boolean, boolean)
    TO resilience_user;
GRANT SELECT ON resilience.saga_definitions, resilience.sagas, resilience.saga_steps,
    resilience.saga_events, resilience.stuck_sagas TO resilience_admin;
GRANT SELECT ON resilience.saga_stats TO resilience_user;

------------------------------------------------------------------------------
-- Transactional outbox and relay (tables: work without preloading; the
-- worker that relays on commit needs shared_preload_libraries)
------------------------------------------------------------------------------

-- The roles resilience_admin (routes, dead letters, the relay by hand) and
-- resilience_user (publish, consume) are created by the sagas section above.

-- Event ids are taken from it at publish, and each event's commit order
-- (seq) at commit, under a lock on its key: so for one key, seq order is
-- commit order (docs/outbox.md, "Per-key order").  CACHE 1 on purpose: a
-- per-backend cache would hand out values out of order.
CREATE SEQUENCE resilience.outbox_seq CACHE 1;
SELECT pg_catalog.pg_extension_config_dump('resilience.outbox_seq', '');

CREATE TABLE resilience.outbox_routes (
    id serial PRIMARY KEY,
    topic_pattern text NOT NULL,
    sink text NOT NULL,
    target text NOT NULL,
    options jsonb NOT NULL DEFAULT '{}',
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE resilience.outbox_routes IS
'Where events go: every route whose topic_pattern (LIKE) matches an event''s topic gets it, through sink notify, http, amqp or queue';
SELECT pg_catalog.pg_extension_config_dump('resilience.outbox_routes', '');
SELECT pg_catalog.pg_extension_config_dump('resilience.outbox_routes_id_seq', '');

-- One row per event and route (route_id NULL: the event matched no route
-- yet; it is routed when a matching route is created).  Delivered rows are
-- deleted, or kept (delivered_at set) for resilience.outbox_retention.
-- Vacuum-friendly: rows are inserted once, claimed by a HOT update (claim
-- columns are not indexed) and deleted in batches; autovacuum visits the
-- table after every few thousand dead rows instead of a fraction of it.
CREATE TABLE resilience.outbox (
    id bigint NOT NULL,
    seq bigint NOT NULL,
    route_id integer,
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL,
    published_at timestamptz NOT NULL,
    not_before timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    claimed_by text,
    claim_until timestamptz,
    last_error text,
    delivered_at timestamptz,
    pull boolean NOT NULL DEFAULT false   -- a queue route's row: found by id (ack, nack)
) WITH (fillfactor = 80,
        autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000,
        autovacuum_vacuum_cost_delay = 0);
CREATE INDEX outbox_pending ON resilience.outbox (route_id, seq) WHERE delivered_at IS NULL;
-- By id only where ids are looked up: queue routes (ack, nack) and delivered
-- rows kept (outbox_event).  The rows of push routes go into one index.
CREATE INDEX outbox_id ON resilience.outbox (id) WHERE pull OR delivered_at IS NOT NULL;
COMMENT ON TABLE resilience.outbox IS
'Events waiting for delivery, one row per route; written at commit by outbox_publish, removed once delivered';
SELECT pg_catalog.pg_extension_config_dump('resilience.outbox', '');

CREATE TABLE resilience.outbox_dead_letters (
    id bigint NOT NULL,
    seq bigint NOT NULL,
    route_id integer NOT NULL,
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL,
    published_at timestamptz NOT NULL,
    attempts integer NOT NULL,
    last_error text,
    dead_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    blocking boolean NOT NULL DEFAULT false,
    PRIMARY KEY (route_id, id)
);
CREATE INDEX outbox_dead_letters_blocking ON resilience.outbox_dead_letters (route_id, key) WHERE blocking;
COMMENT ON TABLE resilience.outbox_dead_letters IS
'Events a route gave up on (max_attempts, or a permanent error), with the last error; outbox_redrive puts them back';
SELECT pg_catalog.pg_extension_config_dump('resilience.outbox_dead_letters', '');

-- Routes are checked (sink, target, options) when written.
CREATE FUNCTION resilience._outbox_route_check()
RETURNS trigger
AS 'MODULE_PATHNAME', 'outbox_route_check'
LANGUAGE C;
COMMENT ON FUNCTION resilience._outbox_route_check() IS
'Internal: validates a route (sink, target URL or channel, options) before it is written';

CREATE TRIGGER route_check
    BEFORE INSERT OR UPDATE ON resilience.outbox_routes
    FOR EACH ROW EXECUTE FUNCTION resilience._outbox_route_check();

CREATE FUNCTION resilience._outbox_routes_invalidate()
RETURNS void
AS 'MODULE_PATHNAME', 'outbox_routes_invalidate'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._outbox_routes_invalidate() IS
'Internal: makes every backend reload its cached routes when this transaction commits';

-- After routes change: events that matched no route are routed to the new
-- ones; the pending events of deleted routes are discarded.
CREATE FUNCTION resilience._outbox_routes_changed()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM resilience._outbox_routes_invalidate();
    IF TG_OP = 'DELETE' THEN
        DELETE FROM resilience.outbox o
         WHERE o.route_id IN (SELECT d.id FROM old_routes d)
           AND NOT EXISTS (SELECT FROM resilience.outbox_routes r WHERE r.id = o.route_id);
    ELSE
        INSERT INTO resilience.outbox (id, seq, route_id, topic, key, payload, headers, published_at, not_before, pull)
        SELECT o.id, o.seq, r.id, o.topic, o.key, o.payload, o.headers, o.published_at, o.not_before, r.sink = 'queue'
          FROM resilience.outbox o JOIN resilience.outbox_routes r ON o.topic LIKE r.topic_pattern COLLATE "C"
         WHERE o.route_id IS NULL;
        -- a route whose sink changed: its rows are looked up by id or not
        UPDATE resilience.outbox o SET pull = (r.sink = 'queue')
          FROM resilience.outbox_routes r
         WHERE TG_OP = 'UPDATE' AND r.id = o.route_id AND o.pull <> (r.sink = 'queue');
        DELETE FROM resilience.outbox o
         WHERE o.route_id IS NULL
           AND EXISTS (SELECT FROM resilience.outbox_routes r WHERE o.topic LIKE r.topic_pattern COLLATE "C");
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION resilience._outbox_routes_changed() IS
'Internal: routes waiting unrouted events to new routes, drops the pending events of deleted routes';

CREATE TRIGGER routes_changed_ins
    AFTER INSERT ON resilience.outbox_routes
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._outbox_routes_changed();
CREATE TRIGGER routes_changed_upd
    AFTER UPDATE ON resilience.outbox_routes
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._outbox_routes_changed();
CREATE TRIGGER routes_changed_del
    AFTER DELETE ON resilience.outbox_routes
    REFERENCING OLD TABLE AS old_routes
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._outbox_routes_changed();
CREATE TRIGGER routes_changed_trunc
    AFTER TRUNCATE ON resilience.outbox_routes
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._outbox_routes_changed();

CREATE FUNCTION resilience.outbox_publish(
    topic text, payload jsonb, key text DEFAULT NULL, headers jsonb DEFAULT '{}',
    deliver_after interval DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'outbox_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: a NULL topic or payload raises 22004
COMMENT ON FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval) IS
'Publish an event in this transaction: it exists for the relay if and only if the transaction commits; returns its id (the Idempotency-Key)';

-- The pull API (sink queue, target = consumer name).  SECURITY DEFINER so
-- that consumers need no privileges on the tables.
CREATE FUNCTION resilience.outbox_claim(
    consumer text, batch integer DEFAULT 100, visibility interval DEFAULT '30 seconds')
RETURNS TABLE (id bigint, topic text, key text, payload jsonb, headers jsonb,
               published_at timestamptz, attempts integer)
AS 'MODULE_PATHNAME', 'outbox_claim'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.outbox_claim(text, integer, interval) IS
'Claim up to batch events of consumer''s queue routes for visibility: no other consumer gets them meanwhile; one event per key at a time, in commit order';

CREATE FUNCTION resilience.outbox_ack(consumer text, ids bigint[])
RETURNS integer
AS 'MODULE_PATHNAME', 'outbox_ack'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.outbox_ack(text, bigint[]) IS
'Mark events consumer claimed as delivered; returns how many were still claimed by it';

CREATE FUNCTION resilience.outbox_nack(consumer text, id bigint, delay interval DEFAULT '0')
RETURNS boolean
AS 'MODULE_PATHNAME', 'outbox_nack'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.outbox_nack(text, bigint, interval) IS
'Give back an event consumer claimed, to be claimed again after delay (a dead letter after the route''s max_attempts)';

CREATE FUNCTION resilience.outbox_redrive(
    ids bigint[] DEFAULT NULL, topic_pattern text DEFAULT NULL, route_id integer DEFAULT NULL)
RETURNS integer
AS 'MODULE_PATHNAME', 'outbox_redrive'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.outbox_redrive(bigint[], text, integer) IS
'Put dead letters back in the outbox (by ids, and/or topic pattern, and/or route), with their attempts reset; returns how many';

CREATE FUNCTION resilience.outbox_event(id bigint)
RETURNS TABLE (topic text, key text, payload jsonb, headers jsonb, published_at timestamptz)
LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.topic, o.key, o.payload, o.headers, o.published_at
      FROM resilience.outbox o
     WHERE o.id OPERATOR(pg_catalog.=) $1 AND (o.pull OR o.delivered_at IS NOT NULL) LIMIT 1
$$;
COMMENT ON FUNCTION resilience.outbox_event(bigint) IS
'An event kept after delivery (a payload too large for NOTIFY, or resilience.outbox_retention), or waiting on a queue route';

CREATE PROCEDURE resilience.relay_outbox(max_batches integer DEFAULT 10, INOUT delivered bigint DEFAULT NULL)
AS 'MODULE_PATHNAME', 'relay_outbox'
LANGUAGE C;   -- no SECURITY DEFINER or SET: either would forbid its commits; it switches to the owner itself
COMMENT ON PROCEDURE resilience.relay_outbox(integer, bigint) IS
'Run the relay by hand (CALL, outside a transaction block): each batch is claimed and committed, delivered with no transaction open, then recorded';

CREATE FUNCTION resilience._outbox_relay_stats(
    OUT route_id integer, OUT destination text, OUT delivered bigint, OUT retries bigint,
    OUT delivered_per_sec double precision, OUT breaker text, OUT breaker_until timestamptz,
    OUT last_error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'outbox_relay_stats'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION resilience._outbox_relay_stats() IS
'Internal: per-route counters and per-destination breaker state kept by the relay in shared memory';

CREATE FUNCTION resilience._outbox_redact(target text)
RETURNS text
AS 'MODULE_PATHNAME', 'outbox_redact'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION resilience._outbox_redact(text) IS
'Internal: a route target with credentials and query string removed, for views and logs';

CREATE VIEW resilience.outbox_status AS
    SELECT r.id AS route_id, r.topic_pattern, r.sink,
           resilience._outbox_redact(r.target) AS target, r.enabled,
           coalesce(p.backlog, 0) AS backlog,
           pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) p.oldest AS oldest_pending_age,
           coalesce(p.in_flight, 0) AS in_flight,
           coalesce(p.retrying, 0) AS retrying,
           s.delivered_per_sec, s.delivered, s.retries,
           coalesce(d.dead_letters, 0) AS dead_letters,
           coalesce(s.breaker, 'closed') AS breaker, s.breaker_until, s.last_error
      FROM resilience.outbox_routes r
      LEFT JOIN (SELECT o.route_id, count(*) AS backlog, min(o.published_at) AS oldest,
                        count(*) FILTER (WHERE o.claim_until OPERATOR(pg_catalog.>) pg_catalog.now()) AS in_flight,
                        count(*) FILTER (WHERE o.attempts OPERATOR(pg_catalog.>) 0
                                           AND (o.claim_until IS NULL
                                                OR o.claim_until OPERATOR(pg_catalog.<=) pg_catalog.now())) AS retrying
                   FROM resilience.outbox o WHERE o.delivered_at IS NULL GROUP BY o.route_id) p
        ON p.route_id OPERATOR(pg_catalog.=) r.id
      LEFT JOIN (SELECT x.route_id, count(*) AS dead_letters
                   FROM resilience.outbox_dead_letters x GROUP BY x.route_id) d
        ON d.route_id OPERATOR(pg_catalog.=) r.id
      LEFT JOIN resilience._outbox_relay_stats() s ON s.route_id OPERATOR(pg_catalog.=) r.id
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, count(*), pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) min(o.published_at),
           0, 0, NULL, NULL, NULL, 0, NULL, NULL, NULL
      FROM resilience.outbox o WHERE o.route_id IS NULL HAVING count(*) OPERATOR(pg_catalog.>) 0;
COMMENT ON VIEW resilience.outbox_status IS
'Per route: backlog, oldest pending age, in flight, retrying, delivered/s, dead letters, breaker; a row with route_id NULL counts events no route matched yet';

-- Delivered events kept for resilience.outbox_retention (and oversized NOTIFY
-- events, kept at least an hour for outbox_event) are removed in batches.
CREATE FUNCTION resilience._outbox_reap(batch_size integer DEFAULT 5000, max_batches integer DEFAULT 20)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    removed bigint := 0;
    n bigint;
BEGIN
    FOR i IN 1 .. max_batches LOOP
        WITH doomed AS (
            SELECT ctid FROM resilience.outbox
             WHERE delivered_at IS NOT NULL AND not_before < clock_timestamp()
             LIMIT batch_size FOR UPDATE SKIP LOCKED)
        DELETE FROM resilience.outbox o USING doomed WHERE o.ctid = doomed.ctid;
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
        EXIT WHEN n < batch_size;
    END LOOP;
    RETURN removed;
END
$$;
COMMENT ON FUNCTION resilience._outbox_reap(integer, integer) IS
'Internal (part of run_reaper): delete delivered events whose retention has passed, in batches of resilience.reaper_batch_size';

-- Privileges.  Tables: no direct access for the roles except what the admin
-- manages (routes, dead letters); everything else goes through the
-- functions.  Functions are executable by PUBLIC by default: revoke that
-- from the outbox's and grant by role.
REVOKE ALL ON FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval),
    resilience.outbox_claim(text, integer, interval), resilience.outbox_ack(text, bigint[]),
    resilience.outbox_nack(text, bigint, interval), resilience.outbox_event(bigint),
    resilience.outbox_redrive(bigint[], text, integer), resilience._outbox_relay_stats(),
    resilience._outbox_routes_invalidate(), resilience._outbox_routes_changed(),
    resilience._outbox_route_check()
    FROM PUBLIC;
-- (_outbox_reap stays executable by PUBLIC, like the other reapers that
-- run_reaper() calls: it only removes delivered events whose time is up.)
REVOKE ALL ON PROCEDURE resilience.relay_outbox(integer, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval),
    resilience.outbox_claim(text, integer, interval), resilience.outbox_ack(text, bigint[]),
    resilience.outbox_nack(text, bigint, interval), resilience.outbox_event(bigint)
    TO resilience_user;
GRANT EXECUTE ON FUNCTION resilience.outbox_redrive(bigint[], text, integer),
    resilience._outbox_relay_stats() TO resilience_admin;
GRANT EXECUTE ON PROCEDURE resilience.relay_outbox(integer, bigint) TO resilience_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON resilience.outbox_routes TO resilience_admin;
GRANT USAGE ON SEQUENCE resilience.outbox_routes_id_seq TO resilience_admin;
GRANT SELECT, DELETE ON resilience.outbox_dead_letters TO resilience_admin;
GRANT SELECT ON resilience.outbox_status TO resilience_admin;

------------------------------------------------------------------------------
-- Event streams: append with an expected version (tables; work without
-- preloading)
------------------------------------------------------------------------------

-- Versions count from 0 (the first event of a stream is version 0); a
-- stream that does not exist is at version -1.  One head row per stream is
-- the lock that orders appends: append_events updates it only if it is at
-- the expected version (a concurrent append that got there first makes the
-- update find nothing: 40001), then writes the events after it.
CREATE TABLE resilience.streams (
    stream text PRIMARY KEY,
    version bigint NOT NULL,              -- the version of its last event
    updated_at timestamptz NOT NULL
);
COMMENT ON TABLE resilience.streams IS
'One row per event stream: the version of its last event (versions count from 0)';
SELECT pg_catalog.pg_extension_config_dump('resilience.streams', '');

CREATE TABLE resilience.stream_events (
    stream text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb NOT NULL,
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (stream, version)
);
COMMENT ON TABLE resilience.stream_events IS
'The events of every stream, by (stream, version); written only by append_events';
SELECT pg_catalog.pg_extension_config_dump('resilience.stream_events', '');

CREATE TABLE resilience.stream_forwards (
    id serial PRIMARY KEY,
    stream_pattern text NOT NULL
        CHECK (pg_catalog.octet_length(stream_pattern) OPERATOR(pg_catalog.>=) 1
           AND pg_catalog.octet_length(stream_pattern) OPERATOR(pg_catalog.<=) 255),
    topic text NOT NULL
        CHECK (pg_catalog.octet_length(topic) OPERATOR(pg_catalog.>=) 1
           AND pg_catalog.octet_length(topic) OPERATOR(pg_catalog.<=) 255),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    UNIQUE (stream_pattern, topic)
);
COMMENT ON TABLE resilience.stream_forwards IS
'Streams (LIKE pattern) whose appended events are published to the outbox under topic, in the appending transaction';
SELECT pg_catalog.pg_extension_config_dump('resilience.stream_forwards', '');
SELECT pg_catalog.pg_extension_config_dump('resilience.stream_forwards_id_seq', '');

-- append_events(stream, expected_version, events) → the stream's new
-- version.  Each event is a JSON object {"type": text, "data": any JSON
-- (default null), "metadata": object (default {})}; nothing else.
-- SECURITY DEFINER: callers need no privileges on the tables.
CREATE FUNCTION resilience.append_events(stream text, expected_version bigint, events jsonb[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n integer;
    bad record;
    new_version bigint;
    actual bigint;
    f record;
BEGIN
    IF append_events.stream IS NULL OR append_events.events IS NULL THEN
        RAISE EXCEPTION '% must not be null', CASE WHEN append_events.stream IS NULL THEN 'stream' ELSE 'events' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(append_events.stream) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'stream must be 1 to 255 bytes'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s bytes.', octet_length(append_events.stream));
    END IF;
    IF append_events.expected_version < -1 THEN
        RAISE EXCEPTION 'expected_version must be -1, a version (0 or more), or NULL'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s.', append_events.expected_version),
                  HINT = '-1: the stream must not exist yet; NULL: append whatever its version.';
    END IF;
    n := coalesce(cardinality(append_events.events), 0);
    IF n = 0 THEN
        RAISE EXCEPTION 'events must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT u.i, u.why INTO bad FROM (
        SELECT i, CASE
            WHEN e IS NULL THEN 'is NULL'
            WHEN jsonb_typeof(e) <> 'object' THEN 'is not a JSON object'
            WHEN NOT e ? 'type' THEN 'has no "type"'
            WHEN jsonb_typeof(e -> 'type') <> 'string' THEN 'has a "type" that is not a string'
            WHEN octet_length(e ->> 'type') NOT BETWEEN 1 AND 255 THEN 'has a "type" that is not 1 to 255 bytes'
            WHEN e ? 'metadata' AND jsonb_typeof(e -> 'metadata') <> 'object' THEN 'has "metadata" that is not a JSON object'
            WHEN EXISTS (SELECT FROM jsonb_object_keys(e) k WHERE k NOT IN ('type', 'data', 'metadata'))
                THEN 'has a key other than "type", "data" and "metadata"'
            END AS why
          FROM unnest(append_events.events) WITH ORDINALITY x(e, i)) u
     WHERE u.why IS NOT NULL ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'event % of % %', bad.i, n, bad.why
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Each event is {"type": "…", "data": any JSON, "metadata": {…}}; data and metadata may be left out.';
    END IF;

    IF append_events.expected_version IS NULL THEN
        INSERT INTO resilience.streams AS s (stream, version, updated_at)
        VALUES (append_events.stream, n - 1, now())
        ON CONFLICT (stream) DO UPDATE SET version = s.version + n, updated_at = now()
        RETURNING s.version INTO new_version;
    ELSIF append_events.expected_version = -1 THEN
        INSERT INTO resilience.streams AS s (stream, version, updated_at)
        VALUES (append_events.stream, n - 1, now())
        ON CONFLICT (stream) DO NOTHING
        RETURNING s.version INTO new_version;
    ELSE
        UPDATE resilience.streams s SET version = s.version + n, updated_at = now()
         WHERE s.stream = append_events.stream AND s.version = append_events.expected_version
        RETURNING s.version INTO new_version;
    END IF;
    IF new_version IS NULL THEN
        SELECT s.version INTO actual FROM resilience.streams s WHERE s.stream = append_events.stream;
        RAISE EXCEPTION 'stream "%" is not at version %', append_events.stream, append_events.expected_version
            USING ERRCODE = 'serialization_failure',
                  DETAIL = CASE WHEN actual IS NULL THEN 'Its actual version is -1 (it does not exist).'
                                ELSE format('Its actual version is %s.', actual) END,
                  HINT = 'Read the stream again, decide again, and append with the version read.';
    END IF;

    INSERT INTO resilience.stream_events (stream, version, type, data, metadata, recorded_at)
    SELECT append_events.stream, new_version - n + x.i, x.e ->> 'type', coalesce(x.e -> 'data', 'null'),
           coalesce(x.e -> 'metadata', '{}'), now()
      FROM unnest(append_events.events) WITH ORDINALITY x(e, i);

    FOR f IN SELECT w.topic FROM resilience.stream_forwards w
              WHERE append_events.stream LIKE w.stream_pattern COLLATE "C" ORDER BY w.id LOOP
        PERFORM resilience.outbox_publish(f.topic,
                    jsonb_build_object('stream', append_events.stream, 'version', new_version - n + x.i,
                                       'type', x.e ->> 'type', 'data', coalesce(x.e -> 'data', 'null'),
                                       'metadata', coalesce(x.e -> 'metadata', '{}'), 'recorded_at', now()),
                    append_events.stream)
           FROM unnest(append_events.events) WITH ORDINALITY x(e, i) ORDER BY x.i;
    END LOOP;
    RETURN new_version;
END
$$;
COMMENT ON FUNCTION resilience.append_events(text, bigint, jsonb[]) IS
'Append events to a stream if it is at expected_version (-1: must not exist; NULL: any); returns its new version; 40001 on a conflict, with the actual version in the detail';

CREATE FUNCTION resilience.read_stream(stream text, from_version bigint DEFAULT 0, max integer DEFAULT NULL)
RETURNS TABLE (version bigint, type text, data jsonb, metadata jsonb, recorded_at timestamptz)
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF read_stream.stream IS NULL OR read_stream.from_version IS NULL THEN
        RAISE EXCEPTION '% must not be null', CASE WHEN read_stream.stream IS NULL THEN 'stream' ELSE 'from_version' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF read_stream.from_version < 0 THEN
        RAISE EXCEPTION 'from_version must not be negative'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', read_stream.from_version);
    END IF;
    IF read_stream.max <= 0 THEN
        RAISE EXCEPTION 'max must be positive, or NULL for no limit'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', read_stream.max);
    END IF;
    RETURN QUERY
        SELECT e.version, e.type, e.data, e.metadata, e.recorded_at
          FROM resilience.stream_events e
         WHERE e.stream = read_stream.stream AND e.version >= read_stream.from_version
         ORDER BY e.version
         LIMIT read_stream.max;
END
$$;
COMMENT ON FUNCTION resilience.read_stream(text, bigint, integer) IS
'The events of a stream from from_version on (at most max; NULL: all), in version order';

CREATE FUNCTION resilience.stream_version(stream text)
RETURNS bigint
LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT s.version FROM resilience.streams s WHERE s.stream OPERATOR(pg_catalog.=) $1), -1)
$$;
COMMENT ON FUNCTION resilience.stream_version(text) IS
'The version of a stream''s last event; -1 if the stream does not exist';

-- SECURITY INVOKER: resilience_admin writes resilience.stream_forwards itself.
CREATE FUNCTION resilience.stream_forward(stream_pattern text, topic text)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    result integer;
BEGIN
    IF stream_forward.stream_pattern IS NULL OR stream_forward.topic IS NULL THEN
        RAISE EXCEPTION '% must not be null', CASE WHEN stream_forward.topic IS NULL THEN 'topic' ELSE 'stream_pattern' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(stream_forward.stream_pattern) NOT BETWEEN 1 AND 255
       OR octet_length(stream_forward.topic) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'stream_pattern and topic must be 1 to 255 bytes'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'stream_pattern is a LIKE pattern: order-% matches every stream whose name starts with "order-".';
    END IF;
    INSERT INTO resilience.stream_forwards AS w (stream_pattern, topic)
    VALUES (stream_forward.stream_pattern, stream_forward.topic)
    ON CONFLICT (stream_pattern, topic) DO UPDATE SET topic = excluded.topic
    RETURNING w.id INTO result;
    RETURN result;
END
$$;
COMMENT ON FUNCTION resilience.stream_forward(text, text) IS
'Publish the events appended to streams matching stream_pattern (LIKE) to the outbox under topic, key = stream, in the appending transaction; returns the forward''s id (DELETE it from resilience.stream_forwards to stop)';

-- Privileges: appending and reading through the functions only
-- (resilience_user); forwards are configuration (resilience_admin).
REVOKE ALL ON FUNCTION resilience.append_events(text, bigint, jsonb[]),
    resilience.read_stream(text, bigint, integer), resilience.stream_version(text),
    resilience.stream_forward(text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.append_events(text, bigint, jsonb[]),
    resilience.read_stream(text, bigint, integer), resilience.stream_version(text)
    TO resilience_user;
GRANT EXECUTE ON FUNCTION resilience.stream_forward(text, text) TO resilience_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON resilience.stream_forwards TO resilience_admin;
GRANT USAGE ON SEQUENCE resilience.stream_forwards_id_seq TO resilience_admin;
GRANT SELECT ON resilience.streams, resilience.stream_events TO resilience_admin;

------------------------------------------------------------------------------
-- Workers and jobs
------------------------------------------------------------------------------

CREATE FUNCTION resilience.run_reaper(OUT item text, OUT removed bigint)
RETURNS SETOF record
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT 'rate_limit_keys', resilience._rate_limit_sweep()
    UNION ALL SELECT 'leases', resilience._reap_leases()
    UNION ALL SELECT 'idempotency_keys', resilience._idempotency_reap()
    UNION ALL SELECT 'inbox', resilience._inbox_reap()
    UNION ALL SELECT 'breakers', resilience._breaker_sweep()
    UNION ALL SELECT 'bulkheads', resilience._bulkhead_sweep()
    UNION ALL SELECT 'sagas', resilience._saga_reap()
    UNION ALL SELECT 'outbox_delivered', resilience._outbox_reap(
        coalesce(pg_catalog.current_setting('resilience.reaper_batch_size', true)::integer, 5000),
        coalesce(pg_catalog.current_setting('resilience.reaper_max_batches', true)::integer, 20))
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
