BEGIN;
SELECT resilience.append_events('s-' || nextval('bench_stream_seq'), -1, ARRAY['{"type": "Deposited", "data": {"amount": 10}}'::jsonb]);
COMMIT;
