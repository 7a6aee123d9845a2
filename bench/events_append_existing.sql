\set a random(1, 1000)
BEGIN;
SELECT resilience.append_events('acct-' || :a, NULL, ARRAY['{"type": "Deposited", "data": {"amount": 10}}'::jsonb]);
COMMIT;
