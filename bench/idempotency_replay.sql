\set i random(1, 10000)
SELECT outcome, response, status_code FROM resilience.idempotency_begin('bench', 'replay:' || :i, '{"amount": 1000, "currency": "eur"}');
