-- The outbox contract: an event exists for the relay if and only if its
-- transaction commits; routes; the pull API; dead letters and redrive.
-- (The relay's deliveries are in test/t; here it runs by hand.)
SET client_min_messages = warning;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;   -- earlier tests (sagas) publish too
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target)
VALUES ('orders.%', 'queue', 'shipping'), ('orders.paid', 'queue', 'billing');

-- Published at commit: invisible inside the transaction, gone with a rollback.
BEGIN;
SELECT resilience.outbox_publish('orders.created', '{"n": 1}', 'o-1') > 0 AS has_id;
SELECT count(*) AS rows_before_commit FROM resilience.outbox;
COMMIT;
SELECT topic, key, payload, headers, route_id IS NOT NULL AS routed FROM resilience.outbox ORDER BY seq;
BEGIN;
SELECT resilience.outbox_publish('orders.created', '{"n": "rolled back"}', 'o-1') > 0;
ROLLBACK;
-- a rolled-back subtransaction takes its events with it, a committed one not
BEGIN;
SAVEPOINT a;
SELECT resilience.outbox_publish('orders.created', '{"n": "savepoint rolled back"}') > 0;
ROLLBACK TO SAVEPOINT a;
SAVEPOINT b;
SELECT resilience.outbox_publish('orders.created', '{"n": 2}') > 0;
RELEASE SAVEPOINT b;
COMMIT;
DO $$
BEGIN
    PERFORM resilience.outbox_publish('orders.created', '{"n": "exception block"}');
    RAISE EXCEPTION 'undo';
EXCEPTION WHEN OTHERS THEN
    NULL;
END
$$;
SELECT payload FROM resilience.outbox ORDER BY seq;

-- An event goes to every route it matches, with one id.
SELECT resilience.outbox_publish('orders.paid', '{"n": 3}', 'o-1', '{"X-Trace": "t-3"}') AS paid_id \gset
SELECT r.target, o.payload, o.headers FROM resilience.outbox o
  JOIN resilience.outbox_routes r ON r.id = o.route_id WHERE o.id = :paid_id ORDER BY 1;

-- deliver_after: not claimable before
SELECT resilience.outbox_publish('orders.later', '{"n": 4}', NULL, '{}', '1 hour') IS NOT NULL;

-- The pull API: one event per key at a time, in commit order.
SELECT id = :paid_id AS is_paid, key, payload, attempts FROM resilience.outbox_claim('shipping', 10, '1 minute') ORDER BY payload->>'n';
-- o-1's next event waits until the one claimed is acked; nothing else is ready
SELECT count(*) FROM resilience.outbox_claim('shipping', 10, '1 minute');
SELECT resilience.outbox_ack('shipping', array_agg(id)) FROM resilience.outbox
 WHERE route_id = (SELECT id FROM resilience.outbox_routes WHERE target = 'shipping')
   AND payload->>'n' IN ('1', '2');
SELECT payload FROM resilience.outbox_claim('shipping', 10, '1 minute');
-- acks by another consumer, or of unclaimed events, do nothing
SELECT resilience.outbox_ack('billing', ARRAY[:paid_id]::bigint[]) AS billing_acks_unclaimed;
SELECT resilience.outbox_ack('shipping', ARRAY[:paid_id]::bigint[]) AS shipping_acks;
SELECT resilience.outbox_ack('shipping', ARRAY[:paid_id]::bigint[]) AS twice;

-- nack: back after the delay, with its attempt counted
SELECT payload, attempts FROM resilience.outbox_claim('billing', 10, '1 minute');
SELECT resilience.outbox_nack('billing', :paid_id, '0 seconds');
SELECT resilience.outbox_nack('billing', :paid_id, '0 seconds') AS not_claimed_any_more;
SELECT payload, attempts FROM resilience.outbox_claim('billing', 10, '1 minute');
SELECT resilience.outbox_nack('billing', :paid_id, '1 hour');
SELECT count(*) FROM resilience.outbox_claim('billing', 10, '1 minute');

-- Dead letters: max_attempts claims, then the event is moved aside.
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('fragile.%', 'queue', 'fragile', '{"max_attempts": 2}');
SELECT resilience.outbox_publish('fragile.x', '{"n": 5}', 'f-1') AS fragile_id \gset
SELECT resilience.outbox_publish('fragile.x', '{"n": 6}', 'f-1') IS NOT NULL;
SELECT payload, attempts FROM resilience.outbox_claim('fragile', 1, '1 minute');
SELECT resilience.outbox_nack('fragile', :fragile_id);
SELECT payload, attempts FROM resilience.outbox_claim('fragile', 1, '1 minute');
SELECT resilience.outbox_nack('fragile', :fragile_id);
SELECT id = :fragile_id AS same, attempts, last_error, blocking FROM resilience.outbox_dead_letters;
-- on_dead_letter skip (the default): the key goes on
SELECT payload FROM resilience.outbox_claim('fragile', 10, '1 minute');
SELECT resilience.outbox_ack('fragile', ARRAY(SELECT id FROM resilience.outbox WHERE topic = 'fragile.x'));
-- redrive: back in the outbox, attempts reset, claimable again
SELECT resilience.outbox_redrive(ARRAY[:fragile_id]::bigint[]);
SELECT count(*) AS dead_letters FROM resilience.outbox_dead_letters;
SELECT payload, attempts FROM resilience.outbox_claim('fragile', 10, '1 minute');
SELECT resilience.outbox_ack('fragile', ARRAY[:fragile_id]::bigint[]);

-- on_dead_letter block: the key waits until its dead letter is redriven
UPDATE resilience.outbox_routes SET options = '{"max_attempts": 1, "on_dead_letter": "block"}'
 WHERE target = 'fragile';
SELECT resilience.outbox_publish('fragile.x', '{"n": 7}', 'f-2') AS blocker \gset
SELECT resilience.outbox_publish('fragile.x', '{"n": 8}', 'f-2') IS NOT NULL;
SELECT resilience.outbox_publish('fragile.x', '{"n": 9}', 'f-3') IS NOT NULL;
SELECT payload FROM resilience.outbox_claim('fragile', 10, '1 minute') ORDER BY 1;
SELECT resilience.outbox_nack('fragile', :blocker);
SELECT blocking FROM resilience.outbox_dead_letters WHERE id = :blocker;
SELECT resilience.outbox_ack('fragile', ARRAY(SELECT id FROM resilience.outbox WHERE payload->>'n' = '9'));
SELECT count(*) AS f2_blocked FROM resilience.outbox_claim('fragile', 10, '1 minute');
SELECT resilience.outbox_redrive(topic_pattern => 'fragile.%');
SELECT payload FROM resilience.outbox_claim('fragile', 10, '1 minute');

-- Routes added later get the events no route matched yet.
SELECT resilience.outbox_publish('audit.login', '{"user": "ann"}') IS NOT NULL;
SELECT route_id, backlog FROM resilience.outbox_status WHERE route_id IS NULL;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('audit.%', 'queue', 'audit');
SELECT payload FROM resilience.outbox_claim('audit', 10, '1 minute');
SELECT count(*) AS unrouted FROM resilience.outbox WHERE route_id IS NULL;
-- deleting a route discards its pending events
DELETE FROM resilience.outbox_routes WHERE target = 'audit';
SELECT count(*) FROM resilience.outbox WHERE topic = 'audit.login';

-- The status view: per route, with credentials and query strings redacted.
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target)
VALUES ('hooks.%', 'http', 'http://user:secret@127.0.0.1:9/hook?token=abc');
-- an amqp route: defaults (exchange amq.topic, routing key {topic}); {{ }} are braces
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('bus.%', 'amqp', 'amqp://relay:s3cret@localhost:5673/%2f', '{"routing_key": "{{x}}.{topic}.{key}"}'),
       ('bus2.%', 'amqp', 'amqp://[::1]', '{"exchange": "", "mandatory": false, "persistent": false}');
SELECT sink, target, backlog, in_flight, dead_letters, breaker
  FROM resilience.outbox_status ORDER BY route_id;
DELETE FROM resilience.outbox_routes WHERE sink = 'amqp';
SELECT resilience._outbox_redact('https://u:p@example.com:8443/a/b?x=1#f');

-- The relay by hand: a procedure that commits between claim and record.
-- Port 9 refuses connections: the attempt is recorded and retried later.
SELECT resilience.outbox_publish('hooks.x', '{"n": 10}') AS hook_id \gset
CALL resilience.relay_outbox(1);
SELECT attempts, last_error LIKE '%onnect%' AS connection_error, not_before > published_at AS backing_off,
       claimed_by IS NULL AS released
  FROM resilience.outbox WHERE id = :hook_id;
BEGIN;
CALL resilience.relay_outbox(1);
ROLLBACK;

-- NOTIFY: the event's envelope goes out when the relay's transaction
-- commits, and the row goes with it; one too large for NOTIFY is sent as a
-- reference and kept for outbox_event().
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('note.%', 'notify', 'notes');
SELECT resilience.outbox_publish('note.small', '{"n": 11}') AS small_id \gset
SELECT resilience.outbox_publish('note.big', jsonb_build_object('blob', repeat('x', 9000))) AS big_id \gset
CALL resilience.relay_outbox(1);
SELECT topic, delivered_at IS NOT NULL AS kept_delivered, not_before > now() + interval '50 minutes' AS kept_an_hour
  FROM resilience.outbox WHERE topic LIKE 'note.%';
SELECT topic, length(payload->>'blob') FROM resilience.outbox_event(:big_id);
SELECT count(*) FROM resilience.outbox_event(:small_id);
SELECT count(*) FROM resilience.outbox_event(-1);
-- delivered rows kept are not claimed again, and are reaped once expired
CALL resilience.relay_outbox(1);
UPDATE resilience.outbox SET not_before = now() - interval '1 second' WHERE id = :big_id;
SELECT removed FROM resilience.run_reaper() WHERE item = 'outbox_delivered';

-- Privileges: nothing for PUBLIC; roles for the rest.
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       has_function_privilege('resilience_user', p.oid, 'EXECUTE') AS "user",
       has_function_privilege('resilience_admin', p.oid, 'EXECUTE') AS admin
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND (p.proname LIKE '%outbox%')
 ORDER BY 1;
SELECT has_table_privilege('resilience_user', 'resilience.outbox', 'SELECT') AS user_reads_outbox,
       has_table_privilege('resilience_admin', 'resilience.outbox_routes', 'INSERT') AS admin_routes,
       has_table_privilege('resilience_user', 'resilience.outbox_routes', 'SELECT') AS user_reads_routes;
SET ROLE resilience_user;
SELECT resilience.outbox_publish('orders.created', '{"as": "user"}', 'o-9') > 0;
-- a consumer name of its own (shipping is the superuser's: docs/operations.md, "Roles and tenants")
SELECT count(*) >= 0 FROM resilience.outbox_claim('user-queue', 1, '1 second');
SELECT sqlstate_of($$INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('%', 'queue', 'x')$$);
SELECT sqlstate_of($$SELECT * FROM resilience.outbox$$);
RESET ROLE;

DELETE FROM resilience.outbox_routes;
DELETE FROM resilience.outbox_dead_letters;
TRUNCATE resilience.outbox;
RESET client_min_messages;
