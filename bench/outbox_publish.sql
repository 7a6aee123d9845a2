\set k random(1, 100000)
BEGIN;
SELECT resilience.outbox_publish('bench.pub', '{"order": 42, "amount": 1999, "currency": "EUR"}', 'order-' || :k);
COMMIT;
