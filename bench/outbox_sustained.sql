\set k random(1, 1000)
SELECT resilience.outbox_publish('bench.sustained', '{"order": 42, "amount": 1999, "currency": "EUR"}', 'order-' || :k);
