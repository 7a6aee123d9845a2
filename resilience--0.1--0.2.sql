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
-- Idempotency keys: idempotency_begin returns a named row type
------------------------------------------------------------------------------

-- The same four columns as the OUT parameters of 0.1.  A function with OUT
-- parameters has its row type rebuilt from pg_proc on every execution of a
-- query that calls it; a named type's comes from the type cache, which was
-- a thirtieth of a replay (docs/benchmarks.md).  Recreated before the
-- REVOKE from PUBLIC and the GRANT to resilience_user below.
CREATE TYPE resilience.idempotency_decision AS (
    outcome text, response jsonb, status_code integer, recovery_point text);
COMMENT ON TYPE resilience.idempotency_decision IS
'What idempotency_begin decided: proceed (from recovery_point), replay (response, status_code), in_progress or mismatch';

DROP FUNCTION resilience.idempotency_begin(text, text, jsonb, interval, interval);
CREATE FUNCTION resilience.idempotency_begin(
    scope text, key text, request jsonb,
    ttl interval DEFAULT '24 hours', lock_timeout interval DEFAULT '5 minutes')
RETURNS resilience.idempotency_decision
AS 'MODULE_PATHNAME', 'idempotency_begin'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
COMMENT ON FUNCTION resilience.idempotency_begin(text, text, jsonb, interval, interval) IS
'Start or resume work under an idempotency key: proceed (from recovery_point), replay (the stored response), in_progress or mismatch';

DROP FUNCTION resilience._idempotency_begin_wait(text, text, jsonb, interval, interval);
CREATE FUNCTION resilience._idempotency_begin_wait(
    scope text, key text, request jsonb, ttl interval, lock_timeout interval)
RETURNS resilience.idempotency_decision
AS 'MODULE_PATHNAME', 'idempotency_begin_wait'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience._idempotency_begin_wait(text, text, jsonb, interval, interval) IS
'Internal (idempotent): idempotency_begin that waits up to lock_timeout for a transaction holding the key';

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
    cutoff timestamptz := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) older_than;
    distributed boolean := false;
    removed bigint := 0;
    n bigint;
BEGIN
    -- On Citus (citus_setup() distributes leases by name) the ctid + FOR
    -- UPDATE SKIP LOCKED batch is not a query Citus runs on a distributed
    -- table: delete by a cutoff taken first, one statement per shard; a lease
    -- taken again meanwhile no longer matches when its row lock is granted.
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition'
                ' WHERE logicalrelid OPERATOR(pg_catalog.=) ''resilience.leases''::pg_catalog.regclass)'
            INTO distributed;
    END IF;
    IF distributed THEN
        DELETE FROM resilience.leases WHERE expires_at OPERATOR(pg_catalog.<) cutoff;
        GET DIAGNOSTICS removed = ROW_COUNT;
        RETURN removed;
    END IF;
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
DECLARE
    owner_name text;
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
    -- The owner read first, by name, and checked here: in one query Citus
    -- would run the check on the worker, against the worker's tables, and a
    -- role has another oid on each node (issue 21).  A name unknown here is
    -- nobody's (oid 4294967295): only superusers and resilience_admin pass.
    SELECT s.owner_role::pg_catalog.text INTO owner_name
      FROM resilience.streams s WHERE s.stream = _read_stream.stream;
    IF FOUND THEN
        PERFORM resilience._tenant_check('stream', _read_stream.stream,
            CASE WHEN owner_name IS NOT NULL
                 THEN coalesce(pg_catalog.to_regrole(owner_name)::pg_catalog.oid, 4294967295) END,
            caller);
    END IF;
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
    owner_name text;
BEGIN
    -- the owner by name, checked here (see _read_stream)
    SELECT s.version, s.owner_role::pg_catalog.text INTO v, owner_name
      FROM resilience.streams s WHERE s.stream = $1;
    PERFORM resilience._tenant_check('stream', $1,
        CASE WHEN owner_name IS NOT NULL
             THEN coalesce(pg_catalog.to_regrole(owner_name)::pg_catalog.oid, 4294967295) END,
        caller);
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

-- The role that began the idempotency key (src/idempotency.c, "Owners");
-- NULL for keys from 0.1: any role may act on them until one begins them
-- again.  Added before citus_setup() can distribute the table (by key).
ALTER TABLE resilience.idempotency_keys ADD COLUMN owner_role regrole;
COMMENT ON COLUMN resilience.idempotency_keys.owner_role IS
'The role that began the key: only it, its members and resilience_admin may replay, resume, checkpoint, complete or fail it';

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

-- Issue 17: durable schedules (cron that fires exactly once per slot)

-- Pure computation on its arguments (and the server's zone data): PUBLIC may
-- call it, like backoff().  STABLE, not IMMUTABLE: zone data changes with
-- the server's tzdata.
CREATE FUNCTION resilience.cron_next(cron text, after timestamptz DEFAULT pg_catalog.now(),
                                     timezone text DEFAULT 'UTC')
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'cron_next_sql'
LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION resilience.cron_next(text, timestamptz, text) IS
'The first time after after at which the cron expression (5 fields, @hourly..., @every <interval>) fires, evaluated in timezone';
REVOKE ALL ON FUNCTION resilience.cron_next(text, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.cron_next(text, timestamptz, text) TO PUBLIC;

-- Schedules: one row per schedule.  next_slot is the slot the worker runs
-- next, due_at when (the slot's time, or a retry's); both change only in the
-- transaction that runs the slot, together with its run row and the
-- command's own effects (src/schedule.c).
CREATE TABLE resilience.schedule_definitions (
    name text COLLATE "C" PRIMARY KEY
        CHECK (pg_catalog.octet_length(name) BETWEEN 1 AND 63),
    cron text NOT NULL,
    timezone text NOT NULL,
    command jsonb NOT NULL,
    overlap text NOT NULL CHECK (overlap IN ('skip', 'queue', 'allow')),
    catch_up text NOT NULL CHECK (catch_up IN ('none', 'latest', 'all')),
    max_attempts integer NOT NULL CHECK (max_attempts > 0),
    backoff interval NOT NULL,
    enabled boolean NOT NULL,
    creator regrole NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    next_slot timestamptz NOT NULL,
    attempt integer NOT NULL DEFAULT 0,     -- failed attempts of next_slot
    due_at timestamptz NOT NULL,
    last_slot timestamptz,
    last_state text,
    last_started timestamptz,
    last_finished timestamptz,
    last_success timestamptz,
    skipped_slots bigint NOT NULL DEFAULT 0
);
CREATE INDEX schedule_definitions_due ON resilience.schedule_definitions (due_at) WHERE enabled;
COMMENT ON TABLE resilience.schedule_definitions IS
'Durable cron schedules (resilience.schedule); written only by the extension''s functions';
SELECT pg_catalog.pg_extension_config_dump('resilience.schedule_definitions', '');

-- One row per slot that ran (or is being retried): the slot is the key.
CREATE TABLE resilience.schedule_runs (
    schedule text COLLATE "C" NOT NULL,
    slot timestamptz NOT NULL,
    state text NOT NULL CHECK (state IN ('succeeded', 'retrying', 'failed')),
    attempt integer NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    duration interval GENERATED ALWAYS AS (finished_at - started_at) STORED,
    error text,
    result jsonb,
    creator regrole NOT NULL,
    PRIMARY KEY (schedule, slot)
);
COMMENT ON TABLE resilience.schedule_runs IS
'One row per slot of a schedule that ran: its state, attempts, timing, error and result; rows older than resilience.schedule_retention are removed';
SELECT pg_catalog.pg_extension_config_dump('resilience.schedule_runs', '');
-- each role sees the runs of the schedules it created (or whose creator it
-- has the privileges of); the extension's owner, who writes them, sees all
ALTER TABLE resilience.schedule_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY schedule_runs_own ON resilience.schedule_runs FOR SELECT
    USING (pg_catalog.pg_has_role(creator::pg_catalog.oid, 'USAGE')
           OR pg_catalog.pg_has_role('resilience_admin', 'USAGE'));

-- security_barrier: a caller's function in WHERE never sees another role's rows
CREATE VIEW resilience.schedules WITH (security_barrier) AS
SELECT d.name, d.cron, d.timezone, d.command, d.overlap, d.catch_up, d.max_attempts,
       d.backoff, d.enabled, d.creator, d.created_at,
       CASE WHEN d.enabled THEN d.next_slot END AS next_slot,
       CASE WHEN d.enabled THEN d.due_at END AS next_due,
       d.attempt AS failed_attempts,
       d.last_slot, d.last_state, d.last_finished, d.last_success, d.skipped_slots,
       CASE WHEN NOT d.enabled THEN 'paused'
            WHEN d.attempt OPERATOR(pg_catalog.>) 0 THEN 'retrying'
            WHEN d.due_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'due'
            ELSE 'waiting' END AS state
  FROM resilience.schedule_definitions d
 WHERE pg_catalog.pg_has_role(d.creator::pg_catalog.oid, 'USAGE')
    OR pg_catalog.pg_has_role('resilience_admin', 'USAGE');
COMMENT ON VIEW resilience.schedules IS
'Schedules the current role created (or whose creator it has the privileges of; all for resilience_admin): next slot and due time, last run, state';

CREATE FUNCTION resilience.schedule(name text, cron text, command jsonb,
                                    timezone text DEFAULT 'UTC',
                                    overlap text DEFAULT 'skip',
                                    catch_up text DEFAULT 'latest',
                                    max_attempts integer DEFAULT 3,
                                    backoff interval DEFAULT '10 seconds',
                                    enabled boolean DEFAULT true)
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'schedule_create'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.schedule(text, text, jsonb, text, text, text, integer, interval, boolean) IS
'Create a durable schedule that runs command ({"sql"}, {"saga"}, {"publish"}) as the calling role once per cron slot; returns the first slot';

CREATE FUNCTION resilience.unschedule(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'schedule_drop'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.unschedule(text) IS
'Remove a schedule and its runs; false if there is none of that name';

CREATE FUNCTION resilience.schedule_pause(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'schedule_pause'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.schedule_pause(text) IS
'Stop running a schedule''s slots until schedule_resume; false if there is none of that name';

CREATE FUNCTION resilience.schedule_resume(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'schedule_resume'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.schedule_resume(text) IS
'Run a paused schedule again from its next slot after now (slots of the pause are not caught up); false if there is none of that name';

-- SECURITY DEFINER (pinned path): it writes the tables; it takes only the
-- schedules whose creator the calling role has the privileges of.
CREATE FUNCTION resilience.schedule_tick()
RETURNS integer
AS 'MODULE_PATHNAME', 'schedule_tick'
LANGUAGE C VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.schedule_tick() IS
'Run (or skip, or retry) one due slot of a schedule by hand, in this transaction: 1 if it did, 0 if nothing was due';

REVOKE ALL ON FUNCTION
    resilience.schedule(text, text, jsonb, text, text, text, integer, interval, boolean),
    resilience.unschedule(text), resilience.schedule_pause(text),
    resilience.schedule_resume(text), resilience.schedule_tick() FROM PUBLIC;
REVOKE ALL ON resilience.schedule_definitions, resilience.schedule_runs,
    resilience.schedules FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    resilience.schedule(text, text, jsonb, text, text, text, integer, interval, boolean),
    resilience.unschedule(text), resilience.schedule_pause(text),
    resilience.schedule_resume(text)
    TO resilience_user;
GRANT EXECUTE ON FUNCTION resilience.schedule_tick() TO resilience_admin;
GRANT SELECT ON resilience.schedules, resilience.schedule_runs TO resilience_user;

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

------------------------------------------------------------------------------
-- Issue 16: sagas that wait and fan out
------------------------------------------------------------------------------

-- A saga whose tick fails outside its step (a context past jsonb's limit, a
-- broken definition) is suspended: out of the queue, the error in its
-- events, until saga_retry.  The others go on.
ALTER TABLE resilience.sagas DROP CONSTRAINT sagas_state_check;
ALTER TABLE resilience.sagas ADD CONSTRAINT sagas_state_check
    CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'compensation_failed',
                     'suspended'));
CREATE INDEX sagas_suspended ON resilience.sagas (name)
    WHERE state OPERATOR(pg_catalog.=) 'suspended';
COMMENT ON TABLE resilience.sagas IS
'Sagas: state (running, compensating, completed, compensated, compensation_failed, suspended), current step and attempt, context';

-- The search_path the steps run with: the definer's at saga_define, pg_temp
-- last.  NULL for definitions from 0.1 (their steps keep pg_catalog, pg_temp).
ALTER TABLE resilience.saga_definitions ADD COLUMN search_path text;
COMMENT ON COLUMN resilience.saga_definitions.search_path IS
'The search_path the steps run with: the definer''s when it called saga_define, with pg_temp last';


-- Timers and signals: steps without an action.  A step is one of
--   {"name", "action", ...}                      a SQL function or "async"
--   {"name", "sleep": "10 minutes"}              a durable timer
--   {"name", "until": "<context key>"}           until the timestamptz there
--   {"name", "await": "<signal>", "timeout": "3 days", "on_timeout":
--    "fail" | "continue", "signalers": ["role", ...]}
-- saga_define refuses (22023, nothing stored) a sleep <= 0 or above the
-- longest step timeout (30 days), an until naming no key, an await without
-- a timeout, and any other key on such a step.
CREATE FUNCTION resilience._saga_normalize_wait(step jsonb, label text)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
SET intervalstyle = postgres   -- the normalized text must not depend on the session
AS $$
DECLARE
    kind text;
    allowed text[];
    k text;
    d interval;
    r text;
    out jsonb;
BEGIN
    SELECT pg_catalog.array_agg(w) INTO allowed
      FROM pg_catalog.unnest(ARRAY['sleep', 'until', 'await']) w WHERE step ? w;
    IF pg_catalog.cardinality(allowed) OPERATOR(pg_catalog.<>) 1 OR step ? 'action' THEN
        RAISE EXCEPTION '% must be one of: an action, a sleep, an until, an await', label
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It has %s.', pg_catalog.array_to_string(
                      allowed OPERATOR(pg_catalog.||) CASE WHEN step ? 'action' THEN ARRAY['action'] END, ', '));
    END IF;
    kind := allowed[1];
    allowed := CASE kind WHEN 'await' THEN ARRAY['name', 'await', 'timeout', 'on_timeout', 'signalers']
                         ELSE ARRAY['name', kind] END;
    FOR k IN SELECT pg_catalog.jsonb_object_keys(step) LOOP
        IF NOT k OPERATOR(pg_catalog.=) ANY (allowed) THEN
            RAISE EXCEPTION '% is a% % step and cannot have "%"', label,
                  CASE WHEN kind OPERATOR(pg_catalog.=) 'until' THEN 'n' ELSE '' END, kind, k
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('A %s step has the keys %s.', kind, pg_catalog.array_to_string(allowed, ', ')),
                      HINT = 'Timers and signals have no action or compensation: there is nothing to undo.';
        END IF;
    END LOOP;
    out := pg_catalog.jsonb_build_object('name', step OPERATOR(pg_catalog.->>) 'name');

    IF kind OPERATOR(pg_catalog.=) 'sleep' THEN
        d := resilience._saga_interval(step, 'sleep', NULL, label);
        IF d IS NULL OR d OPERATOR(pg_catalog.<=) interval '0' OR d OPERATOR(pg_catalog.>) interval '30 days' THEN
            RAISE EXCEPTION 'sleep of % must be more than 0 and at most 30 days', label
                USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', coalesce(d::text, 'null')),
                      HINT = '30 days is the longest step timeout; chain sleeps, or use "until", for longer.';
        END IF;
        RETURN out OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('sleep', d::text);
    END IF;

    IF kind OPERATOR(pg_catalog.=) 'until' THEN
        IF pg_catalog.jsonb_typeof(step OPERATOR(pg_catalog.->) 'until') IS DISTINCT FROM 'string'
           OR pg_catalog.octet_length(step OPERATOR(pg_catalog.->>) 'until') NOT BETWEEN 1 AND 255 THEN
            RAISE EXCEPTION 'until of % must name a key of the context', label
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('It is %s.', pg_catalog.left((step OPERATOR(pg_catalog.->) 'until')::text, 100)),
                      HINT = 'The key (1 to 255 bytes) holds a timestamptz, e.g. "until": "check_in_at" with {"check_in_at": "2027-01-01 14:00+00"} in the context.';
        END IF;
        RETURN out OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('until', step OPERATOR(pg_catalog.->>) 'until');
    END IF;

    -- await
    IF pg_catalog.jsonb_typeof(step OPERATOR(pg_catalog.->) 'await') IS DISTINCT FROM 'string'
       OR (step OPERATOR(pg_catalog.->>) 'await') !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
        RAISE EXCEPTION 'await of % must be a signal name', label
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s; a signal name is 1 to 63 ASCII letters, digits, "_", "-" and ".".',
                                  pg_catalog.left((step OPERATOR(pg_catalog.->) 'await')::text, 100));
    END IF;
    d := resilience._saga_interval(step, 'timeout', NULL, label);
    IF d IS NULL THEN
        RAISE EXCEPTION '% awaits a signal without a timeout', label
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Say how long to wait, and what then: "timeout": "3 days", "on_timeout": "fail" or "continue".';
    END IF;
    IF d OPERATOR(pg_catalog.<=) interval '0' OR d OPERATOR(pg_catalog.>) interval '30 days' THEN
        RAISE EXCEPTION 'timeout of % must be more than 0 and at most 30 days', label
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('It is %s.', d);
    END IF;
    r := coalesce(step OPERATOR(pg_catalog.->>) 'on_timeout', 'fail');
    IF pg_catalog.jsonb_typeof(coalesce(step OPERATOR(pg_catalog.->) 'on_timeout', '"fail"')) OPERATOR(pg_catalog.<>) 'string'
       OR r NOT IN ('fail', 'continue') THEN
        RAISE EXCEPTION 'on_timeout of % must be "fail" or "continue"', label
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('It is %s.', pg_catalog.left((step OPERATOR(pg_catalog.->) 'on_timeout')::text, 100));
    END IF;
    out := out OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('await', step OPERATOR(pg_catalog.->>) 'await',
                                                                     'timeout', d::text, 'on_timeout', r,
                                                                     'signalers', '[]'::jsonb);
    IF step ? 'signalers' THEN
        IF pg_catalog.jsonb_typeof(step OPERATOR(pg_catalog.->) 'signalers') OPERATOR(pg_catalog.<>) 'array' THEN
            RAISE EXCEPTION 'signalers of % must be an array of role names', label
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR k IN SELECT e FROM pg_catalog.jsonb_array_elements(step OPERATOR(pg_catalog.->) 'signalers') e LOOP
            IF pg_catalog.jsonb_typeof(k::jsonb) OPERATOR(pg_catalog.<>) 'string'
               OR NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) (k::jsonb OPERATOR(pg_catalog.#>>) '{}')) THEN
                RAISE EXCEPTION 'signalers of % names %, which is not a role', label, k
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
        out := out OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('signalers', step OPERATOR(pg_catalog.->) 'signalers');
    END IF;
    RETURN out;
END
$$;
COMMENT ON FUNCTION resilience._saga_normalize_wait(jsonb, text) IS
'Internal (saga_define): validates a sleep, until or await step and returns it normalized';

-- The checks of a parallel group {"name", "parallel": [step, step, ...]}
-- (22023): only those two keys, at least two branches, one level (a branch
-- is not a group), actions only (SQL or async; no timer or await branch), and
-- step names unique across the branches and the other steps.  Each branch
-- is validated as a step of a definition would be; returns the normalized
-- branches.
CREATE FUNCTION resilience._saga_check_group(name text, step jsonb, label text, caller_search_path text,
                                             steps jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    branch jsonb;
    bpos bigint;
    k text;
    branch_name text;
    other_names text[];
    branch_names text[] := '{}';
    normalized jsonb;
    msg text;
    det text;
    hnt text;
    state text;
BEGIN
    FOR k IN SELECT jsonb_object_keys(step) LOOP
        IF NOT k = ANY (ARRAY['name', 'parallel']) THEN
            RAISE EXCEPTION '% is a parallel group with the key "%"', label, k
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A parallel group has the keys name and parallel; timeouts and retries belong to its branches.';
        END IF;
    END LOOP;
    IF jsonb_typeof(step -> 'name') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION '% needs a name of 1 to 63 bytes', label USING ERRCODE = 'invalid_parameter_value';
    END IF;
    label := format('%s ("%s")', label, step ->> 'name');
    IF jsonb_typeof(step -> 'parallel') IS DISTINCT FROM 'array' OR jsonb_array_length(step -> 'parallel') < 2 THEN
        RAISE EXCEPTION 'parallel group % needs at least two branches', label
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('parallel is %s.', left((step -> 'parallel')::text, 200)),
                  HINT = 'A group with one branch is a plain step: write it as one.';
    END IF;
    -- the names of every step outside this group, earlier and later
    SELECT array_agg(e ->> 'name') INTO other_names
      FROM jsonb_array_elements(steps) e WHERE e IS DISTINCT FROM step;
    other_names := coalesce(other_names, '{}') || (step ->> 'name');
    FOR branch, bpos IN SELECT e.value, e.ordinality FROM jsonb_array_elements(step -> 'parallel') WITH ORDINALITY e LOOP
        IF jsonb_typeof(branch) = 'object' AND branch ? 'parallel' THEN
            RAISE EXCEPTION 'branch % of parallel group % is itself a parallel group', bpos, label
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Parallel groups nest one level deep: a branch is a single step.',
                      HINT = 'Put the inner branches into the outer group, or make the inner group a step of its own after it.';
        END IF;
        IF jsonb_typeof(branch) = 'object' AND branch ?| ARRAY['sleep', 'until', 'await'] THEN
            RAISE EXCEPTION 'branch % of parallel group % is not an action step', bpos, label
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A branch has an action, SQL or async (and optionally a compensation): sleep, until and await are not branches.',
                      HINT = 'Put the wait before or after the group.';
        END IF;
        branch_name := branch ->> 'name';
        IF branch_name = ANY (branch_names) THEN
            RAISE EXCEPTION 'duplicate step name "%"', branch_name
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('Branches %s and %s of parallel group %s have that name.',
                                      array_position(branch_names, branch_name), bpos, label),
                      HINT = 'Branch results merge into the context under their step names: make them unique across the saga.';
        END IF;
        branch_names := branch_names || branch_name;
        IF branch_name = ANY (other_names) THEN
            RAISE EXCEPTION 'duplicate step name "%"', branch_name
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('Branch %s of parallel group %s has the name of another step or group.', bpos, label),
                      HINT = 'Branch results merge into the context under their step names: make them unique across the saga.';
        END IF;
    END LOOP;
    -- each branch as a step (this also refuses two branches of one name)
    BEGIN
        normalized := resilience._saga_normalize(name, step -> 'parallel', caller_search_path);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT,
                                state = RETURNED_SQLSTATE;
        -- the same error, saying where it is (an empty DETAIL or HINT is left out)
        msg := format('in parallel group %s: %s', label, replace(msg, 'step ', 'branch '));
        det := replace(det, 'step ', 'branch ');
        IF coalesce(det, '') = '' AND coalesce(hnt, '') = '' THEN
            RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg;
        ELSIF coalesce(hnt, '') = '' THEN
            RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg, DETAIL = det;
        ELSIF coalesce(det, '') = '' THEN
            RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg, HINT = hnt;
        END IF;
        RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg, DETAIL = det, HINT = hnt;
    END;
    RETURN normalized;
END
$$;
COMMENT ON FUNCTION resilience._saga_check_group(text, jsonb, text, text, jsonb) IS
'Internal (saga_define): validates a parallel group (22023) and returns its branches normalized';
REVOKE ALL ON FUNCTION resilience._saga_check_group(text, jsonb, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience._saga_check_group(text, jsonb, text, text, jsonb) TO resilience_admin;

-- The validation of a definition, as in 0.1, with timers and signals.
CREATE OR REPLACE FUNCTION resilience._saga_normalize(name text, steps jsonb, caller_search_path text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
SET intervalstyle = postgres   -- the normalized text must not depend on the session
AS $$
DECLARE
    known_keys constant text[] := ARRAY['name', 'action', 'compensation', 'topic', 'timeout',
                                        'max_attempts', 'backoff', 'retry_on',
                                        'sleep', 'until', 'await', 'on_timeout', 'signalers'];
    wait_kinds constant text[] := ARRAY['sleep', 'until', 'await'];
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
        IF step ? 'parallel' THEN
            -- a parallel group: stored as {"name", "parallel": [normalized branches]}
            IF step ->> 'name' = ANY (step_names) THEN
                RAISE EXCEPTION 'duplicate step name "%"', step ->> 'name'
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = format('Steps %s and %s have that name.',
                                          array_position(step_names, step ->> 'name'), pos),
                          HINT = 'Step names identify steps in replies and events: make them unique.';
            END IF;
            normalized := normalized || jsonb_build_array(jsonb_build_object(
                'name', step -> 'name',
                'parallel', resilience._saga_check_group(name, step, label, caller_search_path, steps)));
            step_names := step_names || coalesce(step ->> 'name', '');
            CONTINUE;
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

        -- a timer or a signal: no action, validated on its own
        IF step ?| wait_kinds THEN
            normalized := normalized || jsonb_build_array(resilience._saga_normalize_wait(step, label));
            CONTINUE;
        END IF;
        IF step ?| ARRAY['on_timeout', 'signalers'] THEN
            RAISE EXCEPTION '% has on_timeout or signalers but does not await a signal', label
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'They belong to a step {"name": ..., "await": "signal", "timeout": ...}.';
        END IF;

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

REVOKE ALL ON FUNCTION resilience._saga_normalize_wait(jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience._saga_normalize_wait(jsonb, text) TO resilience_admin;

-- Signals sent to sagas: kept until an await step of that name consumes
-- one (the oldest first), so a signal may come before the saga gets there.
-- signal_id deduplicates: the same one twice is recorded once.  Written and
-- read under the saga's row lock (saga_signal, the orchestrator).
CREATE SEQUENCE resilience.saga_signal_ids;
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_signal_ids', '');
CREATE TABLE resilience.saga_signals (
    saga_id bigint NOT NULL,
    id bigint NOT NULL DEFAULT pg_catalog.nextval('resilience.saga_signal_ids'),
    signal text NOT NULL,
    signal_id text,
    payload jsonb,
    sent_by regrole NOT NULL,
    received_at timestamptz NOT NULL,
    consumed_at timestamptz,
    consumed_by text,
    PRIMARY KEY (saga_id, id),
    UNIQUE (saga_id, signal_id)
);
CREATE INDEX saga_signals_kept ON resilience.saga_signals (saga_id, signal, id)
    WHERE consumed_at IS NULL;
COMMENT ON TABLE resilience.saga_signals IS
'Signals sent to sagas (saga_signal): kept until an await step consumes them; signal_id deduplicates';
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_signals', '');

-- saga_signal: SECURITY INVOKER, it checks the caller (the definer, roles
-- with its privileges, resilience_admin, or the await step's signalers)
-- and writes the tables as the extension's owner itself (src/saga.c).
CREATE FUNCTION resilience.saga_signal(saga_id bigint, signal text, payload jsonb DEFAULT NULL,
                                       signal_id text DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'saga_signal'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004 (payload, signal_id may be NULL)
COMMENT ON FUNCTION resilience.saga_signal(bigint, text, jsonb, text) IS
'Signal a saga: an await step of that name consumes it (now, or when the saga gets there) and merges the payload into the context; false if signal_id was seen';

-- A name of its own: as an overload of saga_signal, calls with literals
-- would be ambiguous.
CREATE FUNCTION resilience.saga_signal_by_key(name text, idempotency_key text, signal text,
                                              payload jsonb DEFAULT NULL, signal_id text DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'saga_signal_by_key'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION resilience.saga_signal_by_key(text, text, text, jsonb, text) IS
'Signal the saga started as name with idempotency_key (see saga_signal(bigint, ...))';

REVOKE ALL ON FUNCTION resilience.saga_signal(bigint, text, jsonb, text),
    resilience.saga_signal_by_key(text, text, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.saga_signal(bigint, text, jsonb, text),
    resilience.saga_signal_by_key(text, text, text, jsonb, text) TO resilience_user;
GRANT SELECT ON resilience.saga_signals TO resilience_admin;

-- One row per branch of a parallel group a saga has reached, inserted by
-- the tick that enters the group.  A due row (next_run_at) is claimed FOR
-- UPDATE SKIP LOCKED by any orchestrator and one attempt of its action (or
-- compensation) runs in that transaction; lock order: branch row, then the
-- saga row (the orchestrators' tick never waits for a branch row).
CREATE TABLE resilience.saga_branches (
    saga_id bigint NOT NULL,
    step_no integer NOT NULL,
    branch_no integer NOT NULL,
    name text NOT NULL,
    state text NOT NULL
        CHECK (state IN ('pending', 'completed', 'failed', 'cancelled',
                         'compensating', 'compensated', 'compensation_failed')),
    attempts integer NOT NULL DEFAULT 0,
    compensation_attempts integer NOT NULL DEFAULT 0,
    next_run_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    compensated_at timestamptz,
    result jsonb,
    error jsonb,
    PRIMARY KEY (saga_id, step_no, branch_no)
);
CREATE INDEX saga_branches_due ON resilience.saga_branches (next_run_at) WHERE next_run_at IS NOT NULL;
COMMENT ON TABLE resilience.saga_branches IS
'The branches of the parallel groups sagas have reached: state, attempts, result and last error, and compensation';
SELECT pg_catalog.pg_extension_config_dump('resilience.saga_branches', '');
GRANT SELECT ON resilience.saga_branches TO resilience_admin;

-- The reaper removes a finished saga's signals and branches with it.
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
        DELETE FROM resilience.saga_branches WHERE saga_id OPERATOR(pg_catalog.=) ANY (ids);
        DELETE FROM resilience.saga_signals WHERE saga_id OPERATOR(pg_catalog.=) ANY (ids);
        DELETE FROM resilience.sagas WHERE id OPERATOR(pg_catalog.=) ANY (ids);
        removed := removed OPERATOR(pg_catalog.+) pg_catalog.cardinality(ids);
        EXIT WHEN pg_catalog.cardinality(ids) OPERATOR(pg_catalog.<) batch_size;
    END LOOP;
    RETURN removed;
END
$$;

-- stuck_sagas: suspended sagas at once (nothing moves them but
-- saga_retry); a timer that is not due yet is not stuck; an await shows as
-- waiting for a signal, a saga at a parallel group as waiting for its branches.
CREATE OR REPLACE VIEW resilience.stuck_sagas AS
    SELECT s.id, s.name, d.version, s.state, s.step, d.steps -> (s.step - 1) ->> 'name' AS step_name,
           s.attempt,
           CASE WHEN s.state IN ('compensation_failed', 'suspended') THEN 'saga_retry'
                WHEN d.steps -> (s.step - 1) ? 'parallel' AND (s.awaiting OR s.state = 'compensating') THEN 'branches'
                WHEN s.awaiting AND d.steps -> (s.step - 1) ? 'await' THEN 'signal'
                WHEN s.awaiting AND d.steps -> (s.step - 1) ?| ARRAY['sleep', 'until'] THEN 'timer'
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
     WHERE s.state = 'suspended'
        OR (s.state IN ('running', 'compensating', 'compensation_failed')
            AND s.updated_at < pg_catalog.clock_timestamp()
                - coalesce(nullif(pg_catalog.current_setting('resilience.saga_stuck_after', true), ''), '5 min')::interval
            AND NOT (s.awaiting AND d.steps -> (s.step - 1) ?| ARRAY['sleep', 'until']
                     AND s.next_run_at > pg_catalog.clock_timestamp()));
COMMENT ON VIEW resilience.stuck_sagas IS
'Unfinished sagas without progress for longer than resilience.saga_stuck_after (a timer not yet due excepted), and suspended ones, and what each waits for (reply, signal, timer, branches, retry, worker, saga_retry)';

-- saga_graph(name [, saga_id]): the latest definition (or the one saga_id
-- runs on) as Graphviz DOT.  Steps in order, timers and awaits in shapes of
-- their own, parallel groups as clusters, each compensation a dashed node and the compensation path
-- dashed edges in reverse; given a saga, the steps coloured by what they
-- came to and the path it took drawn bold.  Render with `dot -Tpng`.
CREATE FUNCTION resilience._saga_dot(s text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '"' OPERATOR(pg_catalog.||)
              pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(s, '\', '\\'), '"', '\"'), E'\n', '\n')
              OPERATOR(pg_catalog.||) '"' $$;
COMMENT ON FUNCTION resilience._saga_dot(text) IS
'Internal (saga_graph): a DOT string literal (line breaks as \n)';

CREATE FUNCTION resilience.saga_graph(name text, saga_id bigint DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    steps jsonb;
    saga_state text;
    st jsonb;
    n bigint;
    step_state text;
    label text;
    shape text;
    fill text;
    reached boolean;
    prev text := 'start';
    prev_reached boolean := true;
    comp_in text[] := '{}';      -- each compensation's first and last node
    comp_out text[] := '{}';
    comp_done boolean[] := '{}';
    br jsonb;
    bn bigint;
    branch_state text;
    group_comps text[];
    group_done boolean;
    out text[];
BEGIN
    IF name IS NULL THEN
        RAISE EXCEPTION 'saga name must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF saga_id IS NULL THEN
        SELECT d.steps INTO steps FROM resilience.saga_definitions d
         WHERE d.name OPERATOR(pg_catalog.=) saga_graph.name ORDER BY d.version DESC LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'saga "%" is not defined', name USING ERRCODE = 'undefined_object';
        END IF;
    ELSE
        SELECT d.steps, s.state INTO steps, saga_state
          FROM resilience.sagas s JOIN resilience.saga_definitions d ON d.id OPERATOR(pg_catalog.=) s.definition_id
         WHERE s.id OPERATOR(pg_catalog.=) saga_graph.saga_id AND s.name OPERATOR(pg_catalog.=) saga_graph.name;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'saga % of "%" does not exist', saga_id, name
                USING ERRCODE = 'undefined_object',
                      HINT = 'Finished sagas are removed after resilience.saga_retention.';
        END IF;
    END IF;

    out := ARRAY[format('digraph %s {', resilience._saga_dot(name)),
                 '  rankdir=LR; node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=11]; edge [fontname="Helvetica", fontsize=9];',
                 '  start [shape=circle, label="", width=0.25, fillcolor=black];',
                 format('  done [shape=doublecircle, label="completed", fontsize=9, fillcolor=%s];',
                        CASE WHEN saga_state OPERATOR(pg_catalog.=) 'completed' THEN '"#a5d6a7"' ELSE 'white' END),
                 format('  undone [shape=doublecircle, label="compensated", fontsize=9, style="dashed,filled", fillcolor=%s];',
                        CASE WHEN saga_state OPERATOR(pg_catalog.=) 'compensated' THEN '"#e0e0e0"' ELSE 'white' END)];
    FOR st, n IN SELECT e.value, e.ordinality FROM pg_catalog.jsonb_array_elements(steps) WITH ORDINALITY e LOOP
        step_state := NULL;
        IF saga_id IS NOT NULL THEN
            SELECT ss.state INTO step_state FROM resilience.saga_steps ss
             WHERE ss.saga_id OPERATOR(pg_catalog.=) saga_graph.saga_id AND ss.step_no OPERATOR(pg_catalog.=) n;
        END IF;
        reached := step_state IS NOT NULL;
        IF st ? 'parallel' THEN
            -- a parallel group: a cluster, forked and joined; its branches'
            -- compensations run concurrently too
            out := out OPERATOR(pg_catalog.||) ARRAY[
                format('  subgraph cluster_%s {', n),
                format('    label=%s; style="rounded,dashed"; color="#757575"; fontname="Helvetica"; fontsize=10;',
                       resilience._saga_dot('parallel: ' OPERATOR(pg_catalog.||) (st OPERATOR(pg_catalog.->>) 'name'))),
                format('    f%s [shape=point, width=0.1]; j%s [shape=point, width=0.1];', n, n)];
            group_comps := '{}';
            group_done := true;
            FOR br, bn IN SELECT e.value, e.ordinality
                            FROM pg_catalog.jsonb_array_elements(st OPERATOR(pg_catalog.->) 'parallel') WITH ORDINALITY e LOOP
                branch_state := NULL;
                IF saga_id IS NOT NULL THEN
                    SELECT b.state INTO branch_state FROM resilience.saga_branches b
                     WHERE b.saga_id OPERATOR(pg_catalog.=) saga_graph.saga_id AND b.step_no OPERATOR(pg_catalog.=) n
                       AND b.branch_no OPERATOR(pg_catalog.=) bn;
                END IF;
                fill := CASE WHEN branch_state IN ('completed', 'compensating', 'compensated', 'compensation_failed') THEN '"#a5d6a7"'
                             WHEN branch_state IN ('failed', 'timed_out') THEN '"#ef9a9a"'
                             WHEN branch_state = 'pending' THEN '"#fff59d"'
                             WHEN branch_state = 'cancelled' THEN '"#e0e0e0"'
                             ELSE 'white' END;
                out := out OPERATOR(pg_catalog.||) ARRAY[
                    format('    s%s_%s [label=%s, fillcolor=%s];', n, bn,
                           resilience._saga_dot((br OPERATOR(pg_catalog.->>) 'name') OPERATOR(pg_catalog.||) E'\n'
                                                OPERATOR(pg_catalog.||) CASE WHEN br OPERATOR(pg_catalog.->>) 'action' OPERATOR(pg_catalog.=) 'async'
                                                    THEN 'async: ' OPERATOR(pg_catalog.||) (br OPERATOR(pg_catalog.->>) 'topic')
                                                    ELSE br OPERATOR(pg_catalog.->>) 'action' END), fill),
                    format('    f%s -> s%s_%s%s;', n, n, bn,
                           CASE WHEN branch_state IS NOT NULL AND branch_state <> 'cancelled' THEN ' [penwidth=2.5]' ELSE '' END),
                    format('    s%s_%s -> j%s%s;', n, bn, n,
                           CASE WHEN branch_state IN ('completed', 'compensating', 'compensated', 'compensation_failed')
                                THEN ' [penwidth=2.5]' ELSE '' END)];
                IF br OPERATOR(pg_catalog.->>) 'compensation' IS NOT NULL THEN
                    group_comps := group_comps OPERATOR(pg_catalog.||) format('c%s_%s', n, bn);
                    group_done := group_done AND branch_state IS NOT DISTINCT FROM 'compensated';
                    out := out OPERATOR(pg_catalog.||) ARRAY[
                        format('    c%s_%s [label=%s, style="rounded,dashed,filled", fillcolor=%s];', n, bn,
                               resilience._saga_dot('undo ' OPERATOR(pg_catalog.||) (br OPERATOR(pg_catalog.->>) 'name')
                                                    OPERATOR(pg_catalog.||) E'\n' OPERATOR(pg_catalog.||)
                                                    CASE WHEN br OPERATOR(pg_catalog.->>) 'compensation' OPERATOR(pg_catalog.=) 'async'
                                                        THEN 'async: ' OPERATOR(pg_catalog.||) (br OPERATOR(pg_catalog.->>) 'topic')
                                                        ELSE br OPERATOR(pg_catalog.->>) 'compensation' END),
                               CASE branch_state WHEN 'compensated' THEN '"#e0e0e0"' WHEN 'compensation_failed' THEN '"#ef9a9a"'
                                                 WHEN 'compensating' THEN '"#fff59d"' ELSE 'white' END),
                        format('    s%s_%s -> c%s_%s [style=dashed, arrowhead=empty, constraint=false];', n, bn, n, bn)];
                END IF;
            END LOOP;
            out := out OPERATOR(pg_catalog.||) '  }'::text OPERATOR(pg_catalog.||)
                format('  %s -> f%s%s;', prev, n, CASE WHEN reached AND prev_reached THEN ' [penwidth=2.5]' ELSE '' END);
            IF pg_catalog.cardinality(group_comps) OPERATOR(pg_catalog.>) 0 THEN
                out := out OPERATOR(pg_catalog.||) format('  cf%s [shape=point, width=0.1]; cj%s [shape=point, width=0.1];', n, n);
                FOR i IN 1 .. pg_catalog.cardinality(group_comps) LOOP
                    out := out OPERATOR(pg_catalog.||) ARRAY[
                        format('  cf%s -> %s [style=dashed];', n, group_comps[i]),
                        format('  %s -> cj%s [style=dashed];', group_comps[i], n)];
                END LOOP;
                comp_in := comp_in OPERATOR(pg_catalog.||) ('cf' OPERATOR(pg_catalog.||) n);
                comp_out := comp_out OPERATOR(pg_catalog.||) ('cj' OPERATOR(pg_catalog.||) n);
                comp_done := comp_done OPERATOR(pg_catalog.||) (reached AND group_done);
            END IF;
            prev := 'j' OPERATOR(pg_catalog.||) n;
            prev_reached := step_state IN ('completed', 'compensating', 'compensated', 'compensation_failed');
            CONTINUE;
        END IF;
        shape := CASE WHEN st ? 'await' THEN 'invhouse' WHEN st ?| ARRAY['sleep', 'until'] THEN 'hexagon' ELSE 'box' END;
        label := (st OPERATOR(pg_catalog.->>) 'name') OPERATOR(pg_catalog.||) E'\n' OPERATOR(pg_catalog.||)
            CASE WHEN st ? 'sleep' THEN 'sleep ' OPERATOR(pg_catalog.||) (st OPERATOR(pg_catalog.->>) 'sleep')
                 WHEN st ? 'until' THEN 'until context.' OPERATOR(pg_catalog.||) (st OPERATOR(pg_catalog.->>) 'until')
                 WHEN st ? 'await' THEN format(E'await "%s"\ntimeout %s, then %s', st OPERATOR(pg_catalog.->>) 'await',
                                               st OPERATOR(pg_catalog.->>) 'timeout', st OPERATOR(pg_catalog.->>) 'on_timeout')
                 WHEN st OPERATOR(pg_catalog.->>) 'action' OPERATOR(pg_catalog.=) 'async'
                     THEN 'async: ' OPERATOR(pg_catalog.||) (st OPERATOR(pg_catalog.->>) 'topic')
                 ELSE st OPERATOR(pg_catalog.->>) 'action' END;
        fill := CASE WHEN step_state IN ('completed', 'compensating', 'compensated', 'compensation_failed') THEN '"#a5d6a7"'
                     WHEN step_state IN ('failed', 'timed_out', 'abandoned') THEN '"#ef9a9a"'
                     WHEN step_state IN ('waiting', 'retrying') THEN '"#fff59d"'
                     ELSE 'white' END;
        out := out OPERATOR(pg_catalog.||) format('  s%s [label=%s, shape=%s, fillcolor=%s];', n, resilience._saga_dot(label), shape, fill);
        out := out OPERATOR(pg_catalog.||) format('  %s -> s%s%s;', prev, n,
                                                  CASE WHEN reached AND prev_reached THEN ' [penwidth=2.5]' ELSE '' END);
        IF st OPERATOR(pg_catalog.->>) 'compensation' IS NOT NULL THEN
            out := out OPERATOR(pg_catalog.||) format('  c%s [label=%s, style="rounded,dashed,filled", fillcolor=%s];', n,
                resilience._saga_dot('undo ' OPERATOR(pg_catalog.||) (st OPERATOR(pg_catalog.->>) 'name') OPERATOR(pg_catalog.||) E'\n'
                    OPERATOR(pg_catalog.||) CASE WHEN st OPERATOR(pg_catalog.->>) 'compensation' OPERATOR(pg_catalog.=) 'async'
                                                 THEN 'async: ' OPERATOR(pg_catalog.||) (st OPERATOR(pg_catalog.->>) 'topic')
                                                 ELSE st OPERATOR(pg_catalog.->>) 'compensation' END),
                CASE step_state WHEN 'compensated' THEN '"#e0e0e0"' WHEN 'compensation_failed' THEN '"#ef9a9a"'
                                WHEN 'compensating' THEN '"#fff59d"' ELSE 'white' END);
            out := out OPERATOR(pg_catalog.||) format('  s%s -> c%s [style=dashed, arrowhead=empty, constraint=false];', n, n);
            comp_in := comp_in OPERATOR(pg_catalog.||) ('c' OPERATOR(pg_catalog.||) n);
            comp_out := comp_out OPERATOR(pg_catalog.||) ('c' OPERATOR(pg_catalog.||) n);
            comp_done := comp_done OPERATOR(pg_catalog.||) (step_state OPERATOR(pg_catalog.=) 'compensated');
        END IF;
        prev := 's' OPERATOR(pg_catalog.||) n;
        prev_reached := reached;
    END LOOP;
    out := out OPERATOR(pg_catalog.||) format('  %s -> done%s;', prev,
                                              CASE WHEN saga_state OPERATOR(pg_catalog.=) 'completed' THEN ' [penwidth=2.5]' ELSE '' END);
    -- the compensation path: each compensation, in reverse, then compensated
    FOR i IN REVERSE pg_catalog.cardinality(comp_out) .. 1 LOOP
        out := out OPERATOR(pg_catalog.||) format('  %s -> %s [style=dashed%s];', comp_out[i],
            CASE WHEN i OPERATOR(pg_catalog.>) 1 THEN comp_in[i OPERATOR(pg_catalog.-) 1] ELSE 'undone' END,
            CASE WHEN comp_done[i] AND (i OPERATOR(pg_catalog.=) 1 OR comp_done[i OPERATOR(pg_catalog.-) 1]) THEN ', penwidth=2.5' ELSE '' END);
    END LOOP;
    RETURN pg_catalog.array_to_string(out OPERATOR(pg_catalog.||) '}'::text, E'\n');
END
$$;
COMMENT ON FUNCTION resilience.saga_graph(text, bigint) IS
'The saga''s definition (the latest, or saga_id''s) as Graphviz DOT; given saga_id, coloured by the path that saga took';

REVOKE ALL ON FUNCTION resilience._saga_dot(text), resilience.saga_graph(text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience._saga_dot(text), resilience.saga_graph(text, bigint) TO resilience_admin;

------------------------------------------------------------------------------
-- Issue 18: a relay ready for production webhooks (docs/outbox.md)
------------------------------------------------------------------------------

-- Standard Webhooks signatures (route option signing_secret of http routes;
-- src/sink_http.c).  This computes one for checks against the
-- specification's examples; admin only, as it takes a secret.
CREATE FUNCTION resilience._webhook_sign(secret text, msg_id text, "timestamp" bigint, body text)
RETURNS text
AS 'MODULE_PATHNAME', 'webhook_signature_sql'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;  -- STRICT: no secret, no signature
COMMENT ON FUNCTION resilience._webhook_sign(text, text, bigint, text) IS
'Internal: the webhook-signature header value (v1,<base64 HMAC-SHA256 of "msg_id.timestamp.body">) for a whsec_ secret';
REVOKE ALL ON FUNCTION resilience._webhook_sign(text, text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience._webhook_sign(text, text, bigint, text) TO resilience_admin;

-- W3C trace context: outbox_publish records traceparent/tracestate (as the
-- event headers of those names, which the http and amqp sinks send) from
-- its new arguments or from the settings resilience.traceparent and
-- resilience.tracestate.  New arguments with defaults: the old signature
-- goes (callers that name or omit them are unchanged).
DROP FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval);
CREATE FUNCTION resilience.outbox_publish(
    topic text, payload jsonb, key text DEFAULT NULL, headers jsonb DEFAULT '{}',
    deliver_after interval DEFAULT NULL, traceparent text DEFAULT NULL, tracestate text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'outbox_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: a NULL topic or payload raises 22004
COMMENT ON FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval, text, text) IS
'Publish an event in this transaction: it exists for the relay if and only if the transaction commits; returns its id (the Idempotency-Key); traceparent/tracestate (else resilience.traceparent) are sent with it';
REVOKE ALL ON FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.outbox_publish(text, jsonb, text, jsonb, interval, text, text) TO resilience_user;

-- Long-poll claims: outbox_claim(..., wait) sleeps until an event for the
-- consumer commits (or wait is over) when it finds nothing.  SECURITY
-- INVOKER, as the 0.2 tenants section made the old one: it checks the
-- calling role against the consumer name itself.
DROP FUNCTION resilience.outbox_claim(text, integer, interval);
CREATE FUNCTION resilience.outbox_claim(
    consumer text, batch integer DEFAULT 100, visibility interval DEFAULT '30 seconds',
    wait interval DEFAULT NULL)
RETURNS TABLE (id bigint, topic text, key text, payload jsonb, headers jsonb,
               published_at timestamptz, attempts integer)
AS 'MODULE_PATHNAME', 'outbox_claim'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION resilience.outbox_claim(text, integer, interval, interval) IS
'Claim up to batch events of consumer''s queue routes for visibility: no other consumer gets them meanwhile; one event per key at a time, in commit order; with wait, sleeps until one commits (at most wait) when there is none';
REVOKE ALL ON FUNCTION resilience.outbox_claim(text, integer, interval, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION resilience.outbox_claim(text, integer, interval, interval) TO resilience_user;

-- A saga carries the trace context (resilience.traceparent, tracestate) of
-- the transaction that started it to the commands it publishes (docs/sagas.md).
ALTER TABLE resilience.sagas ADD COLUMN trace_context jsonb;
COMMENT ON COLUMN resilience.sagas.trace_context IS
'The W3C traceparent/tracestate of the transaction that started the saga (NULL: none); sent as headers of its commands';

------------------------------------------------------------------------------
-- Issue 20: append_events in C (src/events.c); faster leases and replays
------------------------------------------------------------------------------

-- append_events no longer runs a PL/pgSQL body through the stream gate: the
-- C function checks the events, writes the head row through a saved plan
-- and the events directly (docs/benchmarks.md).  Same signature, errors and
-- privileges; the internal function it replaces goes.
CREATE OR REPLACE FUNCTION resilience.append_events(stream text, expected_version bigint, events jsonb[])
RETURNS bigint
AS 'MODULE_PATHNAME', 'append_events'
LANGUAGE C VOLATILE PARALLEL UNSAFE;   -- not STRICT: NULLs raise 22004
DROP FUNCTION resilience._append_events(text, bigint, jsonb[], oid);

-- The lease functions are SECURITY INVOKER and switch to the tables' owner
-- themselves; every statement they run qualifies every name and operator.
-- Their SET search_path saved, set and restored a setting on every call
-- (and made the server recompute the path): a third of a lease cycle's time
-- outside its statements (docs/benchmarks.md).  As for idempotency_begin,
-- the qualification is the defence, not the setting.
ALTER FUNCTION resilience.lock_acquire(text, interval, text, interval) RESET search_path;
ALTER FUNCTION resilience.lock_renew(text, bigint, interval) RESET search_path;
ALTER FUNCTION resilience.lock_release(text, bigint) RESET search_path;
ALTER FUNCTION resilience.lock_check(text, bigint) RESET search_path;

------------------------------------------------------------------------------
-- Issue 17: overlap => 'allow' runs slots concurrently (src/schedule.c)
------------------------------------------------------------------------------

-- An 'allow' slot gets its run row when it comes due, in state pending, in
-- the transaction that advances the schedule; an executor (a background
-- worker of its own) takes it FOR UPDATE SKIP LOCKED and runs it.
-- dispatch_at: when an executor may take it (pending: since its dispatch;
-- retrying: after the backoff); NULL once it is finished, and always for
-- the runs of 'skip' and 'queue' schedules.
ALTER TABLE resilience.schedule_runs
    DROP CONSTRAINT schedule_runs_state_check,
    ADD CONSTRAINT schedule_runs_state_check
        CHECK (state IN ('pending', 'succeeded', 'retrying', 'failed')),
    ALTER COLUMN started_at DROP NOT NULL,
    ALTER COLUMN finished_at DROP NOT NULL,
    ADD COLUMN dispatch_at timestamptz;
CREATE INDEX schedule_runs_dispatch ON resilience.schedule_runs (dispatch_at)
    WHERE dispatch_at IS NOT NULL;
COMMENT ON COLUMN resilience.schedule_runs.dispatch_at IS
'overlap => ''allow'': when an executor may take this run (pending since, or retry after); NULL when finished and for other schedules';

-- Issue 21: Citus
-- citus_setup() places every table and key-addressed function of the
-- extension on a Citus cluster (docs/citus.md argues each placement):
-- tables keyed by what their guarantee is about are hash-distributed by that
-- column, the configuration read by delegated functions becomes reference
-- tables, the rest stays on the coordinator, where the relay, the
-- orchestrator and the scheduler run.  Shared-memory functions are
-- delegated to the node that owns their key.  Checks come first and it runs
-- in the caller's one transaction: an error changes nothing, a second call
-- changes nothing (each row says whether this call placed the object).
-- Distributing the extension's tables needs their owner: not granted.
--
-- A transaction that writes a distributed table on one worker and a plain
-- coordinator table (an outbox event, a saga) was committed by Citus in one
-- phase on the worker before the coordinator: a worker dying after its
-- COMMIT lost the coordinator's rows.  Citus uses two-phase commit once a
-- transaction has modified a table through its local execution, so the
-- tables an application writes on the coordinator become Citus local
-- tables (docs/citus.md).  The coordinator must be
-- in Citus's metadata; checked first, like the rest.
CREATE FUNCTION resilience.citus_setup(
    OUT object text, OUT placement text, OUT changed boolean)
RETURNS SETOF record
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $citus$
DECLARE
    -- table, distribution column (NULL: reference table), co-location anchor
    dist CONSTANT text[] := ARRAY[
        ['resilience.fences', 'resource', 'none'],
        ['resilience.leases', 'name', 'resilience.fences'],
        ['resilience.streams', 'stream', 'resilience.fences'],
        ['resilience.stream_events', 'stream', 'resilience.fences'],
        -- their keys collate "C": a co-location group of their own
        ['resilience.idempotency_keys', 'key', 'none'],
        ['resilience.inbox', 'message_id', 'resilience.idempotency_keys'],
        ['resilience.rate_limit_policies', NULL, NULL],
        ['resilience.breaker_config', NULL, NULL]];
    -- Citus local tables: their rows stay on the coordinator, but a write
    -- to them goes through Citus's local execution, which makes Citus commit
    -- a transaction that also wrote a worker with two-phase commit.  These
    -- are the tables an application writes in its own transaction (an
    -- outbox event, a saga, a schedule) and those their queries join.
    -- FK-connected tables are converted together (cascade).
    coord_local CONSTANT text[] := ARRAY['resilience.outbox', 'resilience.outbox_routes',
        'resilience.outbox_dead_letters', 'resilience.saga_definitions', 'resilience.sagas',
        'resilience.saga_steps', 'resilience.saga_events', 'resilience.saga_signals',
        'resilience.saga_branches', 'resilience.schedule_definitions',
        'resilience.schedule_runs'];
    l text;
    -- the extension's views over them, kept across the conversion
    views CONSTANT text := $v$
        WITH RECURSIVE dep(oid) AS (
            SELECT r.ev_class FROM pg_catalog.pg_depend d
              JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid
             WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
               AND d.refobjid OPERATOR(pg_catalog.=) ANY ($1)
               AND r.ev_class OPERATOR(pg_catalog.<>) d.refobjid
            UNION
            SELECT r.ev_class FROM dep
              JOIN pg_catalog.pg_depend d ON d.refobjid OPERATOR(pg_catalog.=) dep.oid
              JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid
             WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
               AND r.ev_class OPERATOR(pg_catalog.<>) dep.oid)
        SELECT c.oid::pg_catalog.regclass::pg_catalog.text, c.relacl,
               pg_catalog.obj_description(c.oid, 'pg_class')
          FROM dep JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) dep.oid
         WHERE c.relkind OPERATOR(pg_catalog.=) 'v'$v$;
    todo oid[];
    todo_names text[];
    attempt int;
    lockable text;
    v record;
    g record;
    saved jsonb := '[]';
    saved_comments jsonb := '[]';
    col record;
    -- shared-memory state addressed by its first argument (key or name)
    delegated CONSTANT name[] := ARRAY['rate_limit', 'rate_limit_check', 'window_limit',
        'window_limit_check', 'rate_limit_reset', 'breaker_allow', 'breaker_record',
        'breaker_guard', 'breaker_state', 'breaker_reset', 'breaker_force_open'];
    t text[];
    f regprocedure;
    ok boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname OPERATOR(pg_catalog.=) 'citus') THEN
        RAISE EXCEPTION 'Citus is not installed in database "%"', current_database()
            USING ERRCODE = '55000',
                  DETAIL = 'resilience.citus_setup() distributes resilience''s tables with Citus; on a single server there is nothing to place.',
                  HINT = 'Add citus to shared_preload_libraries, CREATE EXTENSION citus and add the workers on the coordinator first (docs/citus.md).';
    END IF;
    EXECUTE 'SELECT pg_catalog.citus_is_coordinator()' INTO ok;
    IF NOT ok THEN
        RAISE EXCEPTION 'resilience.citus_setup() must be called on the Citus coordinator'
            USING ERRCODE = '55000',
                  DETAIL = 'This node is a Citus worker: placements are decided and recorded by the coordinator.',
                  HINT = 'Connect to the coordinator and call it there.';
    END IF;
    EXECUTE 'SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM pg_catalog.citus_get_active_worker_nodes()'
        INTO ok;
    IF NOT ok THEN
        RAISE EXCEPTION 'the Citus cluster has no active worker node'
            USING ERRCODE = '55000',
                  DETAIL = 'Distributed tables would all live on the coordinator.',
                  HINT = 'Add the workers with citus_add_node() first.';
    END IF;
    -- Citus local tables need the coordinator in Citus's metadata (group 0)
    IF NOT EXISTS (SELECT FROM pg_dist_node WHERE groupid OPERATOR(pg_catalog.=) 0) THEN
        RAISE EXCEPTION 'the Citus coordinator is not in the Citus metadata'
            USING ERRCODE = '55000',
                  DETAIL = 'resilience.citus_setup() makes the outbox, saga and schedule tables Citus local tables, which live on the coordinator''s node (group 0).',
                  HINT = 'Call citus_set_coordinator_host(''<coordinator host>'', <port>) first (docs/citus.md).';
    END IF;
    SELECT pg_catalog.array_agg(x::regclass::oid), pg_catalog.array_agg(x) INTO todo, todo_names
      FROM pg_catalog.unnest(coord_local) x
     WHERE NOT EXISTS (SELECT FROM pg_dist_partition
                        WHERE logicalrelid OPERATOR(pg_catalog.=) x::regclass);
    -- The coordinator's workers (relay, orchestrator, scheduler, reaper)
    -- use these tables, several in one transaction: take every table this
    -- call places at once before placing any, never waiting while holding
    -- some (no deadlock); their transactions are short, so try again for
    -- up to a minute.
    SELECT pg_catalog.string_agg(x::regclass::text, ', ') INTO lockable
      FROM (SELECT pg_catalog.unnest(todo_names) x
            UNION ALL
            SELECT dist[i][1] FROM pg_catalog.generate_subscripts(dist, 1) i
             WHERE NOT EXISTS (SELECT FROM pg_dist_partition
                                WHERE logicalrelid OPERATOR(pg_catalog.=) dist[i][1]::regclass)) z(x);
    IF lockable IS NOT NULL THEN
        FOR attempt IN 1..600 LOOP
            BEGIN
                EXECUTE 'LOCK TABLE ' OPERATOR(pg_catalog.||) lockable
                    OPERATOR(pg_catalog.||) ' IN ACCESS EXCLUSIVE MODE NOWAIT';
                EXIT;
            EXCEPTION WHEN lock_not_available THEN
                IF attempt OPERATOR(pg_catalog.=) 600 THEN
                    RAISE EXCEPTION 'resilience.citus_setup() could not lock the coordinator''s tables'
                        USING ERRCODE = '55P03',
                              DETAIL = 'Sessions kept them in use for a minute.',
                              HINT = 'Call it again when the load is lower; nothing was changed.';
                END IF;
                PERFORM pg_catalog.pg_sleep(0.1);
            END;
        END LOOP;
    END IF;
    -- Reference tables with triggers (their caches are invalidated on every
    -- node by the trigger on each placement) need this, for this call only.
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    -- one connection per node: the local tables' foreign keys (sagas to
    -- saga_definitions) must not follow a parallel operation in this call
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);

    FOREACH t SLICE 1 IN ARRAY dist LOOP
        object := t[1];
        placement := CASE WHEN t[2] IS NULL THEN 'reference'
                          ELSE 'distributed by ' OPERATOR(pg_catalog.||) t[2] END;
        changed := NOT EXISTS (SELECT FROM pg_dist_partition
                                WHERE logicalrelid OPERATOR(pg_catalog.=) t[1]::regclass);
        IF changed AND t[2] IS NULL THEN
            EXECUTE 'SELECT pg_catalog.create_reference_table($1)' USING t[1]::regclass;
        ELSIF changed THEN
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, $2, colocate_with => $3)'
                USING t[1]::regclass, t[2], t[3];
        END IF;
        RETURN NEXT;
    END LOOP;

    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace OPERATOR(pg_catalog.=) 'resilience'::regnamespace
                AND p.proname OPERATOR(pg_catalog.=) ANY (delegated)
                AND p.proargtypes[0] OPERATOR(pg_catalog.=) 'text'::regtype
              ORDER BY p.oid::regprocedure::text LOOP
        object := f::text;
        placement := 'delegated to the node of $1 (co-located with resilience.fences)';
        changed := NOT EXISTS (SELECT FROM pg_dist_object o
                                WHERE o.classid OPERATOR(pg_catalog.=) 'pg_proc'::regclass
                                  AND o.objid OPERATOR(pg_catalog.=) f::oid
                                  AND o.distribution_argument_index IS NOT NULL);
        IF changed THEN
            EXECUTE 'SELECT pg_catalog.create_distributed_function($1, ''$1'', colocate_with => ''resilience.fences'')'
                USING f;
        END IF;
        RETURN NEXT;
    END LOOP;

    -- Citus turns each table into a shell and its shard, dropping and
    -- recreating the views over it: an extension's member cannot be
    -- dropped, and a recreated view loses its grants and comment.  So they
    -- leave the extension for the conversion and come back as they were.
    IF todo IS NOT NULL THEN
        -- The workers have these tables already (the extension was created
        -- there): Citus must not create the shells there too.  It skips an
        -- extension's tables, so the shells join the extension below; the
        -- metadata of these coordinator tables is not synced to the
        -- workers, which never query them.
        PERFORM set_config('citus.enable_metadata_sync', 'off', true);
        FOR v IN EXECUTE views USING todo LOOP
            saved := saved OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_array(
                pg_catalog.jsonb_build_object('name', v.oid, 'acl', v.relacl::text[], 'comment', v.obj_description));
            EXECUTE pg_catalog.format('ALTER EXTENSION resilience DROP VIEW %s', v.oid);
        END LOOP;
        -- and the shells get no comments: the tables' and their columns'
        FOR v IN SELECT c.oid::regclass::text AS name, pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
                        (SELECT COALESCE(pg_catalog.jsonb_object_agg(a.attname, pg_catalog.col_description(c.oid, a.attnum)), '{}')
                           FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
                            AND pg_catalog.col_description(c.oid, a.attnum) IS NOT NULL) AS columns
                   FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) ANY (todo) LOOP
            saved_comments := saved_comments OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_array(
                pg_catalog.jsonb_build_object('name', v.name, 'comment', v.comment, 'columns', v.columns));
        END LOOP;
    END IF;
    FOREACH l IN ARRAY coord_local LOOP
        object := l;
        placement := 'Citus local table (coordinator)';
        -- this call placed it (maybe by the cascade from an earlier one)
        changed := COALESCE(l OPERATOR(pg_catalog.=) ANY (todo_names), false);
        IF NOT EXISTS (SELECT FROM pg_dist_partition
                        WHERE logicalrelid OPERATOR(pg_catalog.=) l::regclass) THEN
            -- cascade: tables tied by foreign keys (sagas, saga_definitions)
            -- must become local tables together
            EXECUTE 'SELECT pg_catalog.citus_add_local_table_to_metadata($1, cascade_via_foreign_keys => true)'
                USING l::regclass;
        END IF;
        RETURN NEXT;
    END LOOP;
    FOREACH l IN ARRAY coord_local LOOP
        IF NOT EXISTS (SELECT FROM pg_depend
                        WHERE classid OPERATOR(pg_catalog.=) 'pg_class'::regclass
                          AND objid OPERATOR(pg_catalog.=) l::regclass
                          AND deptype OPERATOR(pg_catalog.=) 'e') THEN
            EXECUTE pg_catalog.format('ALTER EXTENSION resilience ADD TABLE %s', l);
        END IF;
    END LOOP;
    FOR v IN SELECT x->>'name' AS name, x->>'comment' AS comment, x->'columns' AS columns
               FROM pg_catalog.jsonb_array_elements(saved_comments) x LOOP
        EXECUTE pg_catalog.format('COMMENT ON TABLE %s IS %L', v.name, v.comment);
        FOR col IN SELECT * FROM pg_catalog.jsonb_each_text(v.columns) LOOP
            EXECUTE pg_catalog.format('COMMENT ON COLUMN %s.%I IS %L', v.name, col.key, col.value);
        END LOOP;
    END LOOP;
    FOR v IN SELECT x->>'name' AS name, x->'acl' AS acl, x->>'comment' AS comment
               FROM pg_catalog.jsonb_array_elements(saved) x LOOP
        EXECUTE pg_catalog.format('ALTER EXTENSION resilience ADD VIEW %s', v.name);
        EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', v.name, v.comment);
        FOR g IN SELECT a.privilege_type,
                        CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                             ELSE a.grantee::regrole::text END AS grantee
                   FROM pg_catalog.aclexplode(ARRAY(
                        SELECT pg_catalog.jsonb_array_elements_text(v.acl))::aclitem[]) a LOOP
            EXECUTE pg_catalog.format('GRANT %s ON %s TO %s', g.privilege_type, v.name, g.grantee);
        END LOOP;
    END LOOP;
    PERFORM set_config('citus.enable_metadata_sync', 'on', true);

    -- Everything else stays where it is: a plain table on every node, the
    -- coordinator's being the one the API uses (docs/citus.md says why).
    FOR object IN SELECT c.oid::regclass::text FROM pg_class c
                   WHERE c.relnamespace OPERATOR(pg_catalog.=) 'resilience'::regnamespace
                     AND c.relkind OPERATOR(pg_catalog.=) 'r'
                     -- nor a Citus local table's shard (the shell's name, _shardid)
                     AND NOT EXISTS (SELECT FROM pg_dist_shard s
                                       JOIN pg_class lc ON lc.oid OPERATOR(pg_catalog.=) s.logicalrelid
                                      WHERE c.relname::text OPERATOR(pg_catalog.=)
                                            pg_catalog.concat(lc.relname, '_', s.shardid))
                     AND NOT EXISTS (SELECT FROM pg_dist_partition d
                                      WHERE d.logicalrelid OPERATOR(pg_catalog.=) c.oid)
                   ORDER BY 1 LOOP
        placement := 'coordinator only';
        changed := false;
        RETURN NEXT;
    END LOOP;
END
$citus$;
COMMENT ON FUNCTION resilience.citus_setup() IS
'On a Citus coordinator: distribute resilience''s tables by the column each guarantee is about, make the outbox, saga and schedule tables Citus local tables (two-phase commit with distributed writes) and delegate key-addressed shared-memory functions to the node of their key; idempotent; one row per object';
REVOKE ALL ON FUNCTION resilience.citus_setup() FROM PUBLIC;   -- needs the tables' owner

-- Issue 16: async branches
-- A branch of a parallel group may be an async step: its command is sent
-- by the tick that enters the group, with the other async branches', and
-- its reply is stored on its row (awaiting, reply, as on the saga's row)
-- for the orchestrator that claims the branch to apply.  An async action
-- whose last attempt got no reply in time ends timed_out: it may have been
-- done, so the group's compensation undoes it with the completed ones.
ALTER TABLE resilience.saga_branches
    ADD COLUMN awaiting boolean NOT NULL DEFAULT false,
    ADD COLUMN reply jsonb,
    DROP CONSTRAINT saga_branches_state_check,
    ADD CONSTRAINT saga_branches_state_check
        CHECK (state IN ('pending', 'completed', 'failed', 'timed_out', 'cancelled',
                         'compensating', 'compensated', 'compensation_failed'));

------------------------------------------------------------------------------
-- Sagas: the state columns' CHECK constraints as one function call
------------------------------------------------------------------------------

-- The same sets of states as the IN lists they replace.  An IN list is
-- rebuilt from its stored form (a text array constant, token by token) for
-- every statement that writes the table, which the orchestrator does
-- several times per step; a function call is a short node
-- (docs/benchmarks.md).  A constraint's function is checked for EXECUTE
-- as the role that writes the row: only the extension's owner writes these
-- tables.
CREATE FUNCTION resilience._saga_state_valid(kind text, state text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'saga_state_valid'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION resilience._saga_state_valid(text, text) IS
'Internal: the CHECK constraint of the state columns of sagas (kind saga), saga_steps (step) and saga_branches (branch)';
REVOKE ALL ON FUNCTION resilience._saga_state_valid(text, text) FROM PUBLIC;
ALTER TABLE resilience.sagas DROP CONSTRAINT sagas_state_check,
    ADD CONSTRAINT sagas_state_check CHECK (resilience._saga_state_valid('saga', state));
ALTER TABLE resilience.saga_steps DROP CONSTRAINT saga_steps_state_check,
    ADD CONSTRAINT saga_steps_state_check CHECK (resilience._saga_state_valid('step', state));
ALTER TABLE resilience.saga_branches DROP CONSTRAINT saga_branches_state_check,
    ADD CONSTRAINT saga_branches_state_check CHECK (resilience._saga_state_valid('branch', state));
