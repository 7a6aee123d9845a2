\set k random(1, 100000)
BEGIN;
INSERT INTO bench_outbox (topic, key, payload) VALUES ('bench.pub', 'order-' || :k, '{"order": 42, "amount": 1999, "currency": "EUR"}');
COMMIT;
