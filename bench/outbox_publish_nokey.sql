BEGIN;
SELECT resilience.outbox_publish('bench.pub', '{"order": 42, "amount": 1999, "currency": "EUR"}');
COMMIT;
