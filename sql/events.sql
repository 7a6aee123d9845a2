-- Event streams: append with an expected version, read back, forward to the outbox.
SET client_min_messages = warning;
\set SHOW_CONTEXT never
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;

-- A new stream (-1: must not exist); versions count from 0.
SELECT resilience.stream_version('order-1') AS before;
SELECT resilience.append_events('order-1', -1, ARRAY[
    '{"type": "OrderPlaced", "data": {"total": 1999}, "metadata": {"by": "alice"}}',
    '{"type": "OrderPaid", "data": {"amount": 1999}}']::jsonb[]) AS version;
SELECT resilience.stream_version('order-1') AS after;
-- At the expected version: appended after it.
SELECT resilience.append_events('order-1', 1, ARRAY['{"type": "OrderShipped"}']::jsonb[]) AS version;
-- NULL: whatever the version.
SELECT resilience.append_events('order-1', NULL, ARRAY['{"type": "Note", "data": "free text"}']::jsonb[]) AS version;
SELECT resilience.append_events('order-2', NULL, ARRAY['{"type": "OrderPlaced", "data": [1, 2]}']::jsonb[]) AS version;

-- data defaults to JSON null, metadata to {}.
SELECT version, type, data, metadata, recorded_at <= now() AS recorded FROM resilience.read_stream('order-1');
SELECT version, type FROM resilience.read_stream('order-1', 2);
SELECT version, type FROM resilience.read_stream('order-1', 1, 2);
SELECT version, type FROM resilience.read_stream('order-1', 10);
SELECT count(*) AS none FROM resilience.read_stream('no-such-stream');

-- Conflicts: 40001, the actual version in the detail, nothing written.
\set VERBOSITY default
SELECT resilience.append_events('order-1', 1, ARRAY['{"type": "Late"}']::jsonb[]);
SELECT resilience.append_events('order-1', -1, ARRAY['{"type": "Again"}']::jsonb[]);
SELECT resilience.append_events('order-9', 0, ARRAY['{"type": "Nope"}']::jsonb[]);
SELECT sqlstate_of($$SELECT resilience.append_events('order-1', 5, ARRAY['{"type": "X"}']::jsonb[])$$);
SELECT resilience.stream_version('order-1') AS unchanged, resilience.stream_version('order-9') AS still_absent;
SELECT count(*) AS events FROM resilience.stream_events WHERE stream = 'order-1';

-- A retry loop with is_retryable: read the version, append with it.
SELECT resilience.is_retryable('40001') AS conflict_is_retryable;

-- Forwarding: appended events go to the outbox in the same transaction,
-- key = stream, in version order; a rolled-back append forwards nothing.
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('orders.events', 'queue', 'projector');
SELECT resilience.stream_forward('order-%', 'orders.events') > 0 AS forwarding;
SELECT resilience.stream_forward('order-%', 'orders.events') = resilience.stream_forward('order-%', 'orders.events') AS idempotent;
SELECT resilience.append_events('order-3', -1, ARRAY['{"type": "A", "data": 1}', '{"type": "B", "data": 2}']::jsonb[]);
BEGIN;
SELECT resilience.append_events('order-4', -1, ARRAY['{"type": "RolledBack"}']::jsonb[]);
ROLLBACK;
SELECT resilience.append_events('other-1', -1, ARRAY['{"type": "NotForwarded"}']::jsonb[]);
SELECT key, payload - 'recorded_at' AS payload, payload ? 'recorded_at' AS has_time
  FROM resilience.outbox WHERE topic = 'orders.events' ORDER BY seq;
SELECT resilience.stream_version('order-4') AS rolled_back;
-- the pull API hands them out one per key (stream) at a time, in order
SELECT key, payload->>'type' AS type FROM resilience.outbox_claim('projector', 10, '1 minute');
-- a conflict forwards nothing either
SELECT sqlstate_of($$SELECT resilience.append_events('order-3', 0, ARRAY['{"type": "C"}']::jsonb[])$$);
SELECT count(*) AS forwarded FROM resilience.outbox WHERE topic = 'orders.events';
-- without the forward, appends stay out of the outbox
DELETE FROM resilience.stream_forwards;
SELECT resilience.append_events('order-3', 1, ARRAY['{"type": "C"}']::jsonb[]);
SELECT count(*) AS forwarded FROM resilience.outbox WHERE topic = 'orders.events';

-- Privileges: users append and read; forwards are the admin's.
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       has_function_privilege('resilience_user', p.oid, 'EXECUTE') AS "user",
       has_function_privilege('resilience_admin', p.oid, 'EXECUTE') AS admin
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND p.proname IN ('append_events', 'read_stream', 'stream_version', 'stream_forward')
 ORDER BY 1;
SET ROLE resilience_user;
SELECT resilience.append_events('user-1', -1, ARRAY['{"type": "ByUser"}']::jsonb[]);
SELECT version, type FROM resilience.read_stream('user-1');
SELECT sqlstate_of($$SELECT * FROM resilience.stream_events$$);
SELECT sqlstate_of($$SELECT resilience.stream_forward('user-%', 't')$$);
SELECT sqlstate_of($$INSERT INTO resilience.stream_forwards (stream_pattern, topic) VALUES ('x', 'y')$$);
RESET ROLE;
SET ROLE resilience_admin;
SELECT resilience.stream_forward('admin-%', 'admin.events') > 0 AS admin_forwards;
DELETE FROM resilience.stream_forwards WHERE topic = 'admin.events';
RESET ROLE;

DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox, resilience.streams, resilience.stream_events;
RESET client_min_messages;
