/* resilience--0.1--0.2.sql: metrics, the complete privilege model, lease takeovers,
 * event streams, the amqp sink. */

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

CREATE FUNCTION resilience._metrics_count(what text, n bigint)
RETURNS bigint
AS 'MODULE_PATHNAME', 'metrics_count'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._metrics_count(text, bigint) IS
'Internal (append_events): counts appended events at commit (stream_events) or a conflict at once (stream_conflicts); returns n';

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

-- The table reapers run_reaper calls, every name and operator qualified (as
-- well as their pinned search_path): the worker runs them, and nothing a
-- database owner puts on a search_path may ever be what they call.
CREATE OR REPLACE FUNCTION resilience._reap_leases(older_than interval DEFAULT '1 hour')
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch_size integer := coalesce(pg_catalog.current_setting('resilience.reaper_batch_size', true)::integer, 5000);
    max_batches integer := coalesce(pg_catalog.current_setting('resilience.reaper_max_batches', true)::integer, 20);
    removed bigint := 0;
    n bigint;
BEGIN
    FOR i IN 1 .. max_batches LOOP
        WITH doomed AS (
            SELECT ctid FROM resilience.leases
             WHERE expires_at OPERATOR(pg_catalog.<)
                   (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) older_than)
             LIMIT batch_size FOR UPDATE SKIP LOCKED)
        DELETE FROM resilience.leases l USING doomed WHERE l.ctid OPERATOR(pg_catalog.=) doomed.ctid;
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed OPERATOR(pg_catalog.+) n;
        EXIT WHEN n OPERATOR(pg_catalog.<) batch_size;
    END LOOP;
    RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION resilience._saga_reap()
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    retention interval := resilience._saga_retention();
    batch_size integer := coalesce(pg_catalog.current_setting('resilience.reaper_batch_size', true)::integer, 5000);
    max_batches integer := coalesce(pg_catalog.current_setting('resilience.reaper_max_batches', true)::integer, 20);
    removed bigint := 0;
    ids bigint[];
BEGIN
    FOR i IN 1 .. max_batches LOOP
        SELECT pg_catalog.array_agg(s.id) INTO ids
          FROM (SELECT id FROM resilience.sagas
                 WHERE finished_at OPERATOR(pg_catalog.<)
                       (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) retention)
                 ORDER BY finished_at LIMIT batch_size FOR UPDATE SKIP LOCKED) s;
        EXIT WHEN ids IS NULL;
        DELETE FROM resilience.saga_events WHERE saga_id OPERATOR(pg_catalog.=) ANY (ids);
        DELETE FROM resilience.saga_steps WHERE saga_id OPERATOR(pg_catalog.=) ANY (ids);
        DELETE FROM resilience.sagas WHERE id OPERATOR(pg_catalog.=) ANY (ids);
        removed := removed OPERATOR(pg_catalog.+) pg_catalog.cardinality(ids);
        EXIT WHEN pg_catalog.cardinality(ids) OPERATOR(pg_catalog.<) batch_size;
    END LOOP;
    RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION resilience._outbox_reap(batch_size integer DEFAULT 5000, max_batches integer DEFAULT 20)
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
             WHERE delivered_at IS NOT NULL
               AND not_before OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp()
             LIMIT batch_size FOR UPDATE SKIP LOCKED)
        DELETE FROM resilience.outbox o USING doomed WHERE o.ctid OPERATOR(pg_catalog.=) doomed.ctid;
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed OPERATOR(pg_catalog.+) n;
        EXIT WHEN n OPERATOR(pg_catalog.<) batch_size;
    END LOOP;
    RETURN removed;
END
$$;

------------------------------------------------------------------------------
-- The outbox's amqp sink (src/sink_amqp.c): only the routes' comment changes
------------------------------------------------------------------------------

COMMENT ON TABLE resilience.outbox_routes IS
'Where events go: every route whose topic_pattern (LIKE) matches an event''s topic gets it, through sink notify, http, amqp or queue';

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
    updated_at timestamptz NOT NULL,
    owner_role regrole                    -- who may read and append (docs/operations.md, "Roles and tenants")
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
-- The public append_events, read_stream and stream_version are C functions
-- (src/tenants.c, stream_gate) that run the internal ones below as the
-- extension's owner, passing the calling role as caller: callers need no
-- privileges on the tables, and only the stream's owner role, its members
-- and resilience_admin may use a stream (docs/operations.md, "Roles and
-- tenants").  The internal ones are executable by the owner only.
CREATE FUNCTION resilience._append_events(stream text, expected_version bigint, events jsonb[], caller oid)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n integer;
    bad record;
    new_version bigint;
    actual bigint;
    f record;
    stream_owner oid;
BEGIN
    IF _append_events.stream IS NULL OR _append_events.events IS NULL THEN
        RAISE EXCEPTION '% must not be null', CASE WHEN _append_events.stream IS NULL THEN 'stream' ELSE 'events' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF octet_length(_append_events.stream) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'stream must be 1 to 255 bytes'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s bytes.', octet_length(_append_events.stream));
    END IF;
    IF _append_events.expected_version < -1 THEN
        RAISE EXCEPTION 'expected_version must be -1, a version (0 or more), or NULL'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s.', _append_events.expected_version),
                  HINT = '-1: the stream must not exist yet; NULL: append whatever its version.';
    END IF;
    n := coalesce(cardinality(_append_events.events), 0);
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
          FROM unnest(_append_events.events) WITH ORDINALITY x(e, i)) u
     WHERE u.why IS NOT NULL ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'event % of % %', bad.i, n, bad.why
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Each event is {"type": "…", "data": any JSON, "metadata": {…}}; data and metadata may be left out.';
    END IF;

    -- The owner of a new stream: the one an admin declared, else the caller.
    -- The head row is locked by the write, so its owner is checked after it
    -- (an error undoes the write); a stream from 0.1 (no owner) becomes the
    -- caller's.
    IF _append_events.expected_version IS NULL THEN
        INSERT INTO resilience.streams AS s (stream, version, updated_at, owner_role)
        VALUES (_append_events.stream, n - 1, now(),
                coalesce((SELECT o.owner FROM resilience.owners o
                           WHERE o.kind = 'stream' AND o.name = _append_events.stream), caller::regrole))
        ON CONFLICT (stream) DO UPDATE SET version = s.version + n, updated_at = now(),
                                           owner_role = coalesce(s.owner_role, caller::regrole)
        RETURNING s.version, s.owner_role INTO new_version, stream_owner;
    ELSIF _append_events.expected_version = -1 THEN
        INSERT INTO resilience.streams AS s (stream, version, updated_at, owner_role)
        VALUES (_append_events.stream, n - 1, now(),
                coalesce((SELECT o.owner FROM resilience.owners o
                           WHERE o.kind = 'stream' AND o.name = _append_events.stream), caller::regrole))
        ON CONFLICT (stream) DO NOTHING
        RETURNING s.version, s.owner_role INTO new_version, stream_owner;
    ELSE
        UPDATE resilience.streams s SET version = s.version + n, updated_at = now(),
                                        owner_role = coalesce(s.owner_role, caller::regrole)
         WHERE s.stream = _append_events.stream AND s.version = _append_events.expected_version
        RETURNING s.version, s.owner_role INTO new_version, stream_owner;
    END IF;
    IF new_version IS NULL THEN
        SELECT s.version, s.owner_role INTO actual, stream_owner
          FROM resilience.streams s WHERE s.stream = _append_events.stream;
        -- the actual version is the owner's business too
        PERFORM resilience._tenant_check('stream', _append_events.stream, stream_owner, caller);
        PERFORM resilience._metrics_count('stream_conflicts', 1);
        RAISE EXCEPTION 'stream "%" is not at version %', _append_events.stream, _append_events.expected_version
            USING ERRCODE = 'serialization_failure',
                  DETAIL = CASE WHEN actual IS NULL THEN 'Its actual version is -1 (it does not exist).'
                                ELSE format('Its actual version is %s.', actual) END,
                  HINT = 'Read the stream again, decide again, and append with the version read.';
    END IF;

    PERFORM resilience._tenant_check('stream', _append_events.stream, stream_owner, caller);

    INSERT INTO resilience.stream_events (stream, version, type, data, metadata, recorded_at)
    SELECT _append_events.stream, new_version - n + x.i, x.e ->> 'type', coalesce(x.e -> 'data', 'null'),
           coalesce(x.e -> 'metadata', '{}'), now()
      FROM unnest(_append_events.events) WITH ORDINALITY x(e, i);

    FOR f IN SELECT w.topic FROM resilience.stream_forwards w
              WHERE _append_events.stream LIKE w.stream_pattern COLLATE "C" ORDER BY w.id LOOP
        PERFORM resilience.outbox_publish(f.topic,
                    jsonb_build_object('stream', _append_events.stream, 'version', new_version - n + x.i,
                                       'type', x.e ->> 'type', 'data', coalesce(x.e -> 'data', 'null'),
                                       'metadata', coalesce(x.e -> 'metadata', '{}'), 'recorded_at', now()),
                    _append_events.stream)
           FROM unnest(_append_events.events) WITH ORDINALITY x(e, i) ORDER BY x.i;
    END LOOP;
    PERFORM resilience._metrics_count('stream_events', n);
    RETURN new_version;
END
$$;
COMMENT ON FUNCTION resilience._append_events(text, bigint, jsonb[], oid) IS
'Internal (append_events): the append, for caller';

CREATE FUNCTION resilience.append_events(stream text, expected_version bigint, events jsonb[])
RETURNS bigint
AS 'MODULE_PATHNAME', 'stream_gate'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
COMMENT ON FUNCTION resilience.append_events(text, bigint, jsonb[]) IS
'Append events to a stream if it is at expected_version (-1: must not exist; NULL: any); returns its new version; 40001 on a conflict, with the actual version in the detail';

CREATE FUNCTION resilience._read_stream(stream text, from_version bigint, max integer, caller oid)
RETURNS TABLE (version bigint, type text, data jsonb, metadata jsonb, recorded_at timestamptz)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF _read_stream.stream IS NULL OR _read_stream.from_version IS NULL THEN
        RAISE EXCEPTION '% must not be null', CASE WHEN _read_stream.stream IS NULL THEN 'stream' ELSE 'from_version' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF _read_stream.from_version < 0 THEN
        RAISE EXCEPTION 'from_version must not be negative'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', _read_stream.from_version);
    END IF;
    IF _read_stream.max <= 0 THEN
        RAISE EXCEPTION 'max must be positive, or NULL for no limit'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', _read_stream.max);
    END IF;
    PERFORM resilience._tenant_check('stream', _read_stream.stream, s.owner_role, caller)
       FROM resilience.streams s WHERE s.stream = _read_stream.stream;
    RETURN QUERY
        SELECT e.version, e.type, e.data, e.metadata, e.recorded_at
          FROM resilience.stream_events e
         WHERE e.stream = _read_stream.stream AND e.version >= _read_stream.from_version
         ORDER BY e.version
         LIMIT _read_stream.max;
END
$$;
COMMENT ON FUNCTION resilience._read_stream(text, bigint, integer, oid) IS
'Internal (read_stream): the read, for caller';

CREATE FUNCTION resilience.read_stream(stream text, from_version bigint DEFAULT 0, max integer DEFAULT NULL)
RETURNS TABLE (version bigint, type text, data jsonb, metadata jsonb, recorded_at timestamptz)
AS 'MODULE_PATHNAME', 'stream_gate'
LANGUAGE C STABLE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.read_stream(text, bigint, integer) IS
'The events of a stream from from_version on (at most max; NULL: all), in version order';

CREATE FUNCTION resilience._stream_version(stream text, caller oid)
RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v bigint;
    o oid;
BEGIN
    SELECT s.version, s.owner_role INTO v, o FROM resilience.streams s WHERE s.stream = $1;
    PERFORM resilience._tenant_check('stream', $1, o, caller);
    RETURN coalesce(v, -1);
END
$$;
COMMENT ON FUNCTION resilience._stream_version(text, oid) IS
'Internal (stream_version): the version, for caller';

CREATE FUNCTION resilience.stream_version(stream text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'stream_gate'
LANGUAGE C STABLE STRICT PARALLEL UNSAFE;
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

------------------------------------------------------------------------------
-- Roles and tenants (docs/operations.md, "Roles and tenants"; src/tenants.c)
------------------------------------------------------------------------------

-- Only the owner role of a consumer name, inbox consumer, lease, stream or
-- saga, the roles that have its privileges and resilience_admin may act on
-- it; others get 42501.  Names that have no row of their own (outbox queue
-- consumers, inbox consumers) are owned by the first role that uses them,
-- recorded here; owners an admin declares (set_owner) are recorded here
-- too.  Role names, not numbers, are dumped (regrole): restore into a
-- cluster that has the same roles (pg_dumpall --globals-only).
CREATE TABLE resilience.owners (
    kind text NOT NULL
        CHECK (kind IN ('outbox_consumer', 'inbox_consumer', 'lease', 'stream')),
    name text COLLATE "C" NOT NULL,
    owner regrole NOT NULL,
    declared boolean NOT NULL DEFAULT false,    -- by set_owner, not by first use
    since timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (kind, name)
);
COMMENT ON TABLE resilience.owners IS
'The owner role of consumer names and inbox consumers (their first user, or declared), and of leases and streams an admin declared; written only by the extension''s functions';
SELECT pg_catalog.pg_extension_config_dump('resilience.owners', '');

-- The role that holds or last held the lease name (its owner); NULL for
-- leases from 0.1: the first role to use one after the update owns it.
ALTER TABLE resilience.leases ADD COLUMN owner_role regrole;
COMMENT ON COLUMN resilience.leases.owner_role IS
'The role that owns the lease name: only it, its members and resilience_admin may acquire, renew, release or check it';

-- The role that started the saga; NULL for sagas started before 0.2 (they
-- take replies from any resilience_user, as in 0.1).
ALTER TABLE resilience.sagas ADD COLUMN owner_role regrole;
COMMENT ON COLUMN resilience.sagas.owner_role IS
'The role that started the saga: it, its members, the definer''s members and resilience_admin may reply to its async steps';

CREATE FUNCTION resilience._tenant_check(kind text, name text, owner oid, caller oid)
RETURNS void
AS 'MODULE_PATHNAME', 'tenant_check_sql'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION resilience._tenant_check(text, text, oid, oid) IS
'Internal (the stream functions): raises 42501 unless caller may act on kind name, owned by owner (NULL: no owner yet)';

-- SECURITY INVOKER and granted to resilience_admin only: it writes the
-- tables as the extension's owner itself.
CREATE FUNCTION resilience.set_owner(kind text, name text, owner regrole)
RETURNS void
AS 'MODULE_PATHNAME', 'set_owner'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.set_owner(text, text, regrole) IS
'Declare or transfer the owner role of an outbox_consumer, inbox_consumer, lease, stream or saga (by id); NULL: no owner (the next role to use it owns it)';

-- The functions that check the caller against an owner must see the caller:
-- they switch to the extension's owner themselves (src/tenants.c).
ALTER FUNCTION resilience.lock_acquire(text, interval, text, interval) SECURITY INVOKER;
ALTER FUNCTION resilience.lock_renew(text, bigint, interval) SECURITY INVOKER;
ALTER FUNCTION resilience.lock_release(text, bigint) SECURITY INVOKER;
ALTER FUNCTION resilience.lock_check(text, bigint) SECURITY INVOKER;
ALTER FUNCTION resilience.outbox_claim(text, integer, interval) SECURITY INVOKER;
ALTER FUNCTION resilience.outbox_ack(text, bigint[]) SECURITY INVOKER;
ALTER FUNCTION resilience.outbox_nack(text, bigint, interval) SECURITY INVOKER;
ALTER FUNCTION resilience.saga_start(text, jsonb, text) SECURITY INVOKER;
ALTER FUNCTION resilience.saga_step_completed(bigint, text, jsonb, boolean) SECURITY INVOKER;
ALTER FUNCTION resilience.saga_step_failed(bigint, text, jsonb, boolean, boolean) SECURITY INVOKER;

REVOKE ALL ON FUNCTION resilience._tenant_check(text, text, oid, oid),
    resilience.set_owner(text, text, regrole) FROM PUBLIC;
REVOKE ALL ON resilience.owners FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.set_owner(text, text, regrole) TO resilience_admin;
GRANT SELECT ON resilience.owners TO resilience_admin;

------------------------------------------------------------------------------
-- Issue 19: durable quotas (src/quota.c, docs/quotas.md)
------------------------------------------------------------------------------

-- One row per key, updated in place by the library (frozen tuples, generic
-- WAL; see src/quota.c): no row version per call.  The fixed-width columns
-- come first and never move; quota.c checks this layout before it writes.
-- No index: shared memory locates the rows.  Rows are dumped (usage is
-- carried by pg_dump) and found again after a restore.
CREATE TABLE resilience.quota_usage (
    period_start timestamptz NOT NULL,
    period_end timestamptz NOT NULL,
    used bigint NOT NULL,
    "limit" bigint NOT NULL,
    updated_at timestamptz NOT NULL,
    policy text NOT NULL DEFAULT '',
    key text NOT NULL
);
COMMENT ON TABLE resilience.quota_usage IS
'Durable quota counters, one row per key, changed in place by quota, quota_check, quota_set and quota_reset only';
SELECT pg_catalog.pg_extension_config_dump('resilience.quota_usage', '');

-- A new row version would leave shared memory pointing at a dead tuple:
-- rows change through the functions only.  TRUNCATE (forget every key)
-- stays possible for the owner.
CREATE FUNCTION resilience._quota_usage_guard()
RETURNS trigger
AS 'MODULE_PATHNAME', 'quota_usage_guard'
LANGUAGE C;
COMMENT ON FUNCTION resilience._quota_usage_guard() IS
'Internal (trigger on quota_usage): refuses UPDATE and DELETE';
CREATE TRIGGER quota_usage_guard
    BEFORE UPDATE OR DELETE ON resilience.quota_usage
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._quota_usage_guard();

-- Not STRICT on purpose: a NULL argument raises 22004 instead of a NULL
-- answer.  VOLATILE (they change state) and PARALLEL UNSAFE (they write WAL
-- and need an xid).
CREATE FUNCTION resilience.quota(key text, "limit" bigint, period text,
                                 cost bigint DEFAULT 1, tz text DEFAULT 'UTC')
RETURNS boolean
AS 'MODULE_PATHNAME', 'quota'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota(text, bigint, text, bigint, text) IS
'Count cost against key''s limit for the current period (hour, day, week, month, year in tz, or a rolling interval); true if admitted.  Durable: survives crashes and failover to a synchronous standby';

CREATE FUNCTION resilience.quota_check(key text, "limit" bigint, period text,
                                       cost bigint DEFAULT 1, tz text DEFAULT 'UTC',
    OUT allowed boolean, OUT used bigint, OUT remaining bigint, OUT resets_at timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'quota_check'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota_check(text, bigint, text, bigint, text) IS
'quota, returning the usage after the decision, what remains and when the period ends; cost 0 only peeks';

CREATE FUNCTION resilience.quota_set(key text, used bigint, period text DEFAULT NULL,
                                     tz text DEFAULT 'UTC')
RETURNS boolean
AS 'MODULE_PATHNAME', 'quota_set'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota_set(text, bigint, text, text) IS
'Admin: set key''s usage (migrations, refunds); with period, in the current period of that definition (creating the key); true if the key existed';

CREATE FUNCTION resilience.quota_reset(key text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'quota_reset'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota_reset(text) IS
'Admin: usage of key back to 0 for its current period; true if the key exists';

-- Admins only (keys often name users).  A period that has ended shows 0
-- used: the next call starts a new one.
CREATE VIEW resilience.quotas AS
SELECT q.key,
       q.policy,
       u.used,
       q."limit",
       GREATEST(q."limit" OPERATOR(pg_catalog.-) u.used, 0) AS remaining,
       q.period_start,
       q.period_end AS resets_at,
       q.updated_at
  FROM resilience.quota_usage q,
       LATERAL (SELECT CASE WHEN q.period_end OPERATOR(pg_catalog.<=) pg_catalog.now()
                            THEN 0::bigint ELSE q.used END AS used) u;
COMMENT ON VIEW resilience.quotas IS
'Every quota key of this database with its usage in the current period';

REVOKE ALL ON FUNCTION resilience.quota(text, bigint, text, bigint, text),
    resilience.quota_check(text, bigint, text, bigint, text),
    resilience.quota_set(text, bigint, text, text),
    resilience.quota_reset(text),
    resilience._quota_usage_guard() FROM PUBLIC;
REVOKE ALL ON resilience.quota_usage, resilience.quotas FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.quota(text, bigint, text, bigint, text),
    resilience.quota_check(text, bigint, text, bigint, text) TO resilience_user;
GRANT EXECUTE ON FUNCTION resilience.quota_set(text, bigint, text, text),
    resilience.quota_reset(text) TO resilience_admin;
GRANT SELECT ON resilience.quota_usage, resilience.quotas TO resilience_admin;

-- Issue 19: named quota policies (src/quota.c, docs/quotas.md)
-- A policy names a limit, a period and a time zone, so that tiers live in
-- data.  Rows are validated by a trigger with the functions' own checks
-- (22004/22023, nothing stored); each backend caches the rows it used and
-- drops them when the table changes (the rate-limit policies' trigger
-- function is generic: it invalidates the relation it fires on).
CREATE TABLE resilience.quota_policies (
    name text PRIMARY KEY
        CHECK (length(name) BETWEEN 1 AND 63),
    "limit" bigint NOT NULL
        CHECK ("limit" > 0),
    period text NOT NULL,
    tz text NOT NULL DEFAULT 'UTC',
    description text
);
COMMENT ON TABLE resilience.quota_policies IS
'Named quotas: limit per period (hour, day, week, month, year in tz, or a rolling interval)';
SELECT pg_catalog.pg_extension_config_dump('resilience.quota_policies', '');

CREATE FUNCTION resilience._quota_policy_check()
RETURNS trigger
AS 'MODULE_PATHNAME', 'quota_policy_check'
LANGUAGE C;
COMMENT ON FUNCTION resilience._quota_policy_check() IS
'Internal (trigger on quota_policies): refuses a row the quota functions would refuse';
CREATE TRIGGER quota_policy_check
    BEFORE INSERT OR UPDATE ON resilience.quota_policies
    FOR EACH ROW EXECUTE FUNCTION resilience._quota_policy_check();
CREATE TRIGGER quota_policies_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON resilience.quota_policies
    FOR EACH STATEMENT EXECUTE FUNCTION resilience._rate_limit_policies_changed();

CREATE FUNCTION resilience.quota(key text, policy text, cost bigint DEFAULT 1)
RETURNS boolean
AS 'MODULE_PATHNAME', 'quota_policy'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota(text, text, bigint) IS
'quota under a named policy of resilience.quota_policies';

CREATE FUNCTION resilience.quota_check(key text, policy text, cost bigint DEFAULT 1,
    OUT allowed boolean, OUT used bigint, OUT remaining bigint, OUT resets_at timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'quota_policy_check_decide'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota_check(text, text, bigint) IS
'quota_check under a named policy of resilience.quota_policies';

CREATE FUNCTION resilience.quota_set(key text, policy text, used bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'quota_policy_set'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota_set(text, text, bigint) IS
'Admin: set key''s usage under policy (creating the key in the policy''s current period); true if the key existed';

CREATE FUNCTION resilience.quota_reset(key text, policy text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'quota_policy_reset'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.quota_reset(text, text) IS
'Admin: usage of key under policy back to 0 for its current period; true if the key exists';

REVOKE ALL ON FUNCTION resilience.quota(text, text, bigint),
    resilience.quota_check(text, text, bigint),
    resilience.quota_set(text, text, bigint),
    resilience.quota_reset(text, text),
    resilience._quota_policy_check() FROM PUBLIC;
REVOKE ALL ON resilience.quota_policies FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.quota(text, text, bigint),
    resilience.quota_check(text, text, bigint) TO resilience_user;
GRANT EXECUTE ON FUNCTION resilience.quota_set(text, text, bigint),
    resilience.quota_reset(text, text) TO resilience_admin;
GRANT SELECT ON resilience.quota_policies TO resilience_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON resilience.quota_policies TO resilience_admin;
