BEGIN;
INSERT INTO bench_stream_events (stream, version, type, data, metadata, recorded_at)
VALUES ('s-' || nextval('bench_stream_seq'), 0, 'Deposited', '{"amount": 10}', '{}', now());
COMMIT;
