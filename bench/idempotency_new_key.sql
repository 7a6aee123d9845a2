\set k random(1, 9223372036854775807)
BEGIN;
SELECT outcome FROM resilience.idempotency_begin('bench', 'new:' || :k, '{"amount": 1000, "currency": "eur"}');
SELECT resilience.idempotency_complete('bench', 'new:' || :k, '{"id": 1, "status": "succeeded"}', 201);
END;
