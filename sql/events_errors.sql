-- Event streams, bad input: a specific SQLSTATE, a clear message, nothing changed.
SET client_min_messages = warning;
\set SHOW_CONTEXT never
TRUNCATE resilience.streams, resilience.stream_events, resilience.outbox;
-- with a forward in place, so that "nothing changed" covers the outbox too
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('s.events', 'queue', 'errors');
SELECT resilience.stream_forward('s%', 's.events') > 0 AS forwarding;
SELECT resilience.append_events('s', -1, ARRAY['{"type": "First"}']::jsonb[]);

SELECT sqlstate_of($$SELECT resilience.append_events(NULL, 0, ARRAY['{"type": "X"}']::jsonb[])$$);
SELECT sqlstate_of($$SELECT resilience.append_events('s', 0, NULL)$$);
SELECT resilience.append_events('', -1, ARRAY['{"type": "X"}']::jsonb[]);
SELECT resilience.append_events(repeat('s', 256), -1, ARRAY['{"type": "X"}']::jsonb[]);
SELECT resilience.append_events('s', -2, ARRAY['{"type": "X"}']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY[]::jsonb[]);
SELECT resilience.append_events('s', 0, '{}'::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['{"type": "X"}', NULL]::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['[1, 2]']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['"OrderPlaced"']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['{"type": "X"}', '{"data": {}}']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['{"type": 5}']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['{"type": ""}']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY[jsonb_build_object('type', repeat('t', 256))]::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['{"type": "X", "metadata": [1]}']::jsonb[]);
SELECT resilience.append_events('s', 0, ARRAY['{"type": "X", "payload": {}}']::jsonb[]);
-- a multi-dimensional array is read element by element, like any other
SELECT resilience.append_events('s', 0, ARRAY[['{"type": "X"}', '5']]::jsonb[]);

SELECT sqlstate_of($$SELECT * FROM resilience.read_stream(NULL)$$);
SELECT sqlstate_of($$SELECT * FROM resilience.read_stream('s', NULL)$$);
SELECT * FROM resilience.read_stream('s', -1);
SELECT * FROM resilience.read_stream('s', 0, 0);
SELECT * FROM resilience.read_stream('s', 0, -5);
SELECT resilience.stream_version(NULL) AS null_stream;

SELECT sqlstate_of($$SELECT resilience.stream_forward(NULL, 't')$$);
SELECT sqlstate_of($$SELECT resilience.stream_forward('s%', NULL)$$);
SELECT resilience.stream_forward('', 't');
SELECT resilience.stream_forward('s%', repeat('t', 256));

SELECT sqlstate_of($$SELECT resilience.append_events('s', 0, ARRAY['[1]']::jsonb[])$$),
       sqlstate_of($$SELECT resilience.append_events('s', -7, ARRAY['{"type": "X"}']::jsonb[])$$),
       sqlstate_of($$SELECT * FROM resilience.read_stream('s', -1)$$);

-- nothing changed: one stream at version 0, its one event, forwarded once, one forward
SELECT resilience.stream_version('s') AS version, (SELECT count(*) FROM resilience.stream_events) AS events,
       (SELECT count(*) FROM resilience.streams) AS streams, (SELECT count(*) FROM resilience.stream_forwards) AS forwards,
       (SELECT count(*) FROM resilience.outbox) AS forwarded;
DELETE FROM resilience.stream_forwards;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.streams, resilience.stream_events, resilience.outbox;
RESET client_min_messages;

-- Roles isolated from each other (docs/operations.md, "Roles and tenants"):
-- a stream belongs to the role that created it; another role can neither
-- read nor append (not even learn its version from a conflict): 42501, and
-- nothing changes.
CREATE ROLE regress_tenant_a NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_tenant_b NOLOGIN IN ROLE resilience_user;
SET ROLE regress_tenant_a;
SELECT resilience.append_events('tenant-stream', -1, ARRAY['{"type": "opened"}']::jsonb[]) AS version;
SET ROLE regress_tenant_b;
SELECT * FROM resilience.read_stream('tenant-stream');
SELECT sqlstate_of($$SELECT resilience.stream_version('tenant-stream')$$) AS version,
       sqlstate_of($$SELECT resilience.append_events('tenant-stream', 0, ARRAY['{"type": "evil"}']::jsonb[])$$) AS append,
       sqlstate_of($$SELECT resilience.append_events('tenant-stream', NULL, ARRAY['{"type": "evil"}']::jsonb[])$$) AS append_any,
       sqlstate_of($$SELECT resilience.append_events('tenant-stream', 5, ARRAY['{"type": "evil"}']::jsonb[])$$) AS conflict;
RESET ROLE;
SELECT stream, version, owner_role, (SELECT count(*) FROM resilience.stream_events e WHERE e.stream = s.stream) AS events
  FROM resilience.streams s WHERE stream = 'tenant-stream';
TRUNCATE resilience.streams, resilience.stream_events;
DROP ROLE regress_tenant_a;
DROP ROLE regress_tenant_b;
