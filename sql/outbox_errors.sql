-- Bad input: a specific SQLSTATE, nothing changed.
SET client_min_messages = warning;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('hook.%', 'http', 'http://127.0.0.1:9/h', '{"headers": {"X-Route": "route"}}'), ('q.%', 'queue', 'c', '{}');

-- publish
SELECT sqlstate_of($$SELECT resilience.outbox_publish(NULL, '{}')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('t', NULL)$$);
SELECT resilience.outbox_publish('', '{}');
SELECT sqlstate_of($$SELECT resilience.outbox_publish(repeat('t', 256), '{}')$$);
SELECT resilience.outbox_publish('t', '{}', '');
SELECT sqlstate_of($$SELECT resilience.outbox_publish('t', '{}', repeat('k', 256))$$);
SELECT resilience.outbox_publish('t', '{}', 'k', '[1]');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"Bad Name": "x"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"X-Num": 1}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"X-A": "line\nbreak"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"Idempotency-Key": "mine"}');
-- headers: at most 64, 8192 bytes in all; names the transport or the route sets are refused
SELECT resilience.outbox_publish('t', '{}', 'k', (SELECT jsonb_object_agg('X-H' || i, 'v') FROM generate_series(1, 65) i));
SELECT resilience.outbox_publish('t', '{}', 'k', (SELECT jsonb_object_agg('X-H' || i, repeat('v', 1000)) FROM generate_series(1, 9) i));
SELECT resilience.outbox_publish('t', '{}', 'k', '{"Authorization": "Bearer attacker"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"cookie": "session=1"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"Proxy-Authorization": "Basic eA=="}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"CC": "other.queue"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"bcc": "other.queue"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"X-A": "carriage\rreturn"}');
SELECT resilience.outbox_publish('hook.x', '{}', 'k', '{"X-Route": "mine"}');
SELECT resilience.outbox_publish('t', '{}', 'k', '{"X-Route": "fine: no route sets it for t"}') > 0 AS unrouted_ok;
SELECT resilience.outbox_publish('t', '{}', 'k', '{}', '-1 second');
SELECT sqlstate_of($$SELECT resilience.outbox_publish('t', '{}', 'k', '{}', '400 days')$$);
-- the http route takes JSON objects or arrays; the queue route anything
SELECT resilience.outbox_publish('hook.x', '42');
SELECT sqlstate_of($$SELECT resilience.outbox_publish('hook.x', '"text"')$$);
SELECT resilience.outbox_publish('hook.x', '[1, 2]') > 0 AS array_ok;
SELECT resilience.outbox_publish('q.x', '42') > 0 AS scalar_ok_for_queue;
SELECT count(*) AS written FROM resilience.outbox;

-- routes
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'kafka', 'k');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'http', 'not a url');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'http', 'ftp://127.0.0.1/x');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'http', 'http:///x');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'http', 'http://example.com/hook');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'http', 'http://10.0.0.1/hook');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'notify', repeat('c', 64));
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('', 'queue', 'c');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'queue', '');
SELECT sqlstate_of($$INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES (NULL, 'queue', 'c')$$);
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '[]');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"max_attempts": 0}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"max_attempts": "3"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"retries": 3}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"on_dead_letter": "drop"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"payload": "xml"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"headers": {}}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"timeout_ms": 100, "connect_timeout_ms": 200}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"backoff_base_ms": 100, "backoff_max_ms": 50}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"headers": {"Content-Type": "text/plain"}}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"proxy": 5}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"proxy": "socks5://127.0.0.1:1080"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"proxy": "http://proxy.example.com:3128"}');
-- amqp targets and options (checked without contacting any broker)
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'http://127.0.0.1/');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqps://u:secret@127.0.0.1/');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@127.0.0.1:notaport/v');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@127.0.0.1:99999/v');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@:5672/v');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@127.0.0.1/');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@127.0.0.1/v?heartbeat=10');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@broker.example.com/v');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('x', 'amqp', 'amqp://u:secret@10.1.2.3/v');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"exchange": 5}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', jsonb_build_object('exchange', repeat('e', 256)));
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"routing_key": "{topic}.{id}"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"routing_key": "a}b"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', jsonb_build_object('routing_key', repeat('r', 256)));
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"mandatory": "yes"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"persistent": 1}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"headers": {"A": "b"}}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1/', '{"exchange": "e"}');
UPDATE resilience.outbox_routes SET sink = 'smtp' WHERE target = 'c';
SELECT count(*) AS routes FROM resilience.outbox_routes;

-- the pull API
SELECT sqlstate_of($$SELECT * FROM resilience.outbox_claim(NULL, 1, '1 minute')$$);
SELECT * FROM resilience.outbox_claim('c', 0, '1 minute');
SELECT * FROM resilience.outbox_claim('c', -5, '1 minute');
SELECT sqlstate_of($$SELECT * FROM resilience.outbox_claim('c', NULL, '1 minute')$$);
SELECT * FROM resilience.outbox_claim('c', 1, '0 seconds');
SELECT * FROM resilience.outbox_claim('c', 1, '-1 minute');
SELECT sqlstate_of($$SELECT * FROM resilience.outbox_claim('c', 1, NULL)$$);
SELECT sqlstate_of($$SELECT resilience.outbox_ack('c', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.outbox_ack('', ARRAY[1]::bigint[])$$);
SELECT sqlstate_of($$SELECT resilience.outbox_nack('c', NULL)$$);
SELECT resilience.outbox_nack('c', 1, '-1 second');
SELECT resilience.outbox_redrive();
CALL resilience.relay_outbox(0);
SELECT sqlstate_of($$CALL resilience.relay_outbox(NULL)$$);
SELECT count(*) AS still_written FROM resilience.outbox;

DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;
RESET client_min_messages;

-- Roles isolated from each other (docs/operations.md, "Roles and tenants"):
-- a queue consumer name belongs to the first role that uses it; another
-- role cannot claim, ack (which deletes) or nack its events: 42501, and
-- nothing changes.
CREATE ROLE regress_tenant_a NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_tenant_b NOLOGIN IN ROLE resilience_user;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('tenant.%', 'queue', 'tenant-queue');
SET ROLE regress_tenant_a;
SELECT resilience.outbox_publish('tenant.x', '{}') AS event_id \gset
SELECT count(*) AS claimed FROM resilience.outbox_claim('tenant-queue', 10, '1 hour');
SET ROLE regress_tenant_b;
SELECT count(*) FROM resilience.outbox_claim('tenant-queue', 10, '1 hour');
SELECT sqlstate_of(format('SELECT resilience.outbox_ack(%L, ARRAY[%s]::bigint[])', 'tenant-queue', :event_id)) AS ack,
       sqlstate_of(format('SELECT resilience.outbox_nack(%L, %s)', 'tenant-queue', :event_id)) AS nack;
RESET ROLE;
SELECT claimed_by, attempts, delivered_at IS NULL AS pending FROM resilience.outbox WHERE id = :event_id;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;
DELETE FROM resilience.owners WHERE name = 'tenant-queue';
DROP ROLE regress_tenant_a;
DROP ROLE regress_tenant_b;
