-- bench/idempotency*: setup.  10,000 completed keys to replay, and the
-- hand-written baseline: a table of the same shape with the same indexes.
CREATE EXTENSION IF NOT EXISTS resilience;
DROP TABLE IF EXISTS bench_idempotency_handmade;
CREATE TABLE bench_idempotency_handmade (
    scope text NOT NULL,
    key text NOT NULL,
    fingerprint bytea NOT NULL,
    state text NOT NULL,
    response jsonb,
    status_code integer,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX ON bench_idempotency_handmade (expires_at);
DELETE FROM resilience.idempotency_keys WHERE scope = 'bench';
DO $$
BEGIN
    FOR i IN 1..10000 LOOP
        PERFORM resilience.idempotency_begin('bench', 'replay:' || i, '{"amount": 1000, "currency": "eur"}');
        PERFORM resilience.idempotency_complete('bench', 'replay:' || i, '{"id": 1, "status": "succeeded"}', 201);
        IF i % 500 = 0 THEN
            COMMIT;   -- each key begun holds a lock until its transaction ends
        END IF;
    END LOOP;
END
$$;
VACUUM ANALYZE resilience.idempotency_keys;
