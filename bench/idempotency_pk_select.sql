\set i random(1, 10000)
SELECT response, status_code FROM resilience.idempotency_keys WHERE scope = 'bench' AND key = 'replay:' || :i;
