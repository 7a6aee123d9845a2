\set k random(1, 9223372036854775807)
BEGIN;
INSERT INTO bench_idempotency_handmade (scope, key, fingerprint, state, created_at, expires_at)
VALUES ('bench', 'new:' || :k, sha256(convert_to('{"amount": 1000, "currency": "eur"}'::jsonb::text, 'UTF8')),
        'started', now(), now() + interval '24 hours')
ON CONFLICT (scope, key) DO NOTHING;
UPDATE bench_idempotency_handmade SET state = 'completed', response = '{"id": 1, "status": "succeeded"}', status_code = 201
 WHERE scope = 'bench' AND key = 'new:' || :k;
END;
