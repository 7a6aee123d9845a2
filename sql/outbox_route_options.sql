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
