-- Route options of issue 18 (rate, burst, max_in_flight) and the wait of
-- outbox_claim: good values are
-- taken, bad ones refused when the route is written (22023 naming the
-- option), nothing written.
SET client_min_messages = warning;
DELETE FROM resilience.outbox_routes;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('limited.%', 'http', 'http://127.0.0.1:9/h', '{"rate": 50, "burst": 10, "max_in_flight": 4}'),
  ('slow.%', 'http', 'http://127.0.0.1:9/h', '{"rate": 0.5}');
SELECT topic_pattern, options FROM resilience.outbox_routes ORDER BY id;

INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"rate": 0}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"rate": -5}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"rate": "fast"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"burst": 5}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"rate": 5, "burst": 0}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"max_in_flight": 0}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"max_in_flight": 1.5}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"rate": 5}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"rate_limit": 5}');
SELECT count(*) AS routes FROM resilience.outbox_routes;

-- partition_by: "key" or a JSON path ($ the payload, $headers the headers)
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('fair.%', 'queue', 'fair', '{"partition_by": "$.tenant"}'),
  ('fairh.%', 'queue', 'fairh', '{"partition_by": "$headers.\"X-Tenant\""}'),
  ('fairk.%', 'queue', 'fairk', '{"partition_by": "key"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"partition_by": "tenant"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"partition_by": "$.[tenant"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"partition_by": "$x.tenant"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES ('x', 'queue', 'c', '{"partition_by": 1}');
SELECT count(*) AS routes FROM resilience.outbox_routes;
-- tenant a's backlog first, then b's: a claim serves them round-robin
SELECT count(resilience.outbox_publish('fair.e', jsonb_build_object('tenant', 'a', 'n', i), 'a-' || i)) FROM generate_series(1, 6) i;
SELECT count(resilience.outbox_publish('fair.e', jsonb_build_object('tenant', 'b', 'n', i), 'b-' || i)) FROM generate_series(1, 2) i;
SELECT string_agg((payload->>'tenant') || (payload->>'n'), ',' ORDER BY id) AS first_claim FROM resilience.outbox_claim('fair', 4);
SELECT string_agg((payload->>'tenant') || (payload->>'n'), ',' ORDER BY id) AS second_claim FROM resilience.outbox_claim('fair', 4);
-- by a header
SELECT count(resilience.outbox_publish('fairh.e', jsonb_build_object('n', i), NULL, jsonb_build_object('X-Tenant', 'a'))) FROM generate_series(1, 4) i;
SELECT count(resilience.outbox_publish('fairh.e', jsonb_build_object('n', i), NULL, jsonb_build_object('X-Tenant', 'b'))) FROM generate_series(1, 2) i;
SELECT string_agg((headers->>'X-Tenant') || (payload->>'n'), ',' ORDER BY id) AS by_header FROM resilience.outbox_claim('fairh', 4);
-- by key: one key's events keep their order; a path that spans a key's
-- events over partitions never lets a later one out first
SELECT count(resilience.outbox_publish('fairk.e', jsonb_build_object('n', i), 'hot')) FROM generate_series(1, 3) i;
SELECT count(resilience.outbox_publish('fairk.e', jsonb_build_object('n', 10 + i), 'cold-' || i)) FROM generate_series(1, 2) i;
SELECT string_agg(key || ':' || (payload->>'n'), ',' ORDER BY id) AS by_key FROM resilience.outbox_claim('fairk', 10);
TRUNCATE resilience.outbox;
SELECT count(resilience.outbox_publish('fair.e', jsonb_build_object('tenant', 'c', 'n', i), 'shared')) FROM generate_series(1, 3) i;
SELECT count(resilience.outbox_publish('fair.e', jsonb_build_object('tenant', 'd', 'n', 4), 'shared'));
SELECT count(resilience.outbox_publish('fair.e', jsonb_build_object('tenant', 'e', 'n', 5), 'other'));
SELECT string_agg((payload->>'tenant') || (payload->>'n'), ',' ORDER BY id) AS one_per_key_in_order FROM resilience.outbox_claim('fair', 10);
-- the relay takes runs of a key, but only an unbroken run from its oldest
-- row: with c2 not ready, c1 goes and d4 waits (d4 is read before c2, as
-- the first of its partition)
UPDATE resilience.outbox_routes SET sink = 'notify', target = 'fair_channel' WHERE target = 'fair';
UPDATE resilience.outbox SET claimed_by = NULL, claim_until = NULL, attempts = 0, pull = false,
       not_before = CASE WHEN payload->>'n' = '2' THEN now() + interval '1 hour' ELSE not_before END;
CALL resilience.relay_outbox(1);
SELECT string_agg((payload->>'tenant') || (payload->>'n'), ',' ORDER BY seq) AS left_after_a_batch FROM resilience.outbox;
DELETE FROM resilience.outbox_routes WHERE topic_pattern LIKE 'fair%';

-- outbox_claim(..., wait): bad waits refused
SELECT sqlstate_of($$SELECT * FROM resilience.outbox_claim('c', 1, '1 min', wait => '-1 s')$$);
SELECT sqlstate_of($$SELECT * FROM resilience.outbox_claim('c', 1, '1 min', wait => '2 hours')$$);
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT * FROM resilience.outbox_claim('c', 1, '1 min', wait => '1 s');
ROLLBACK;
-- nothing there: an empty result once the wait is over; no wait, no sleep
SELECT count(*) AS got FROM resilience.outbox_claim('c', 1, '1 min', wait => '50 ms');
SELECT count(*) AS got FROM resilience.outbox_claim('c', 1, '1 min', wait => NULL);

DELETE FROM resilience.outbox_routes;
RESET client_min_messages;
