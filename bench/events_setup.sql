-- make bench, events section: the reference table (the same columns and key
-- as resilience.stream_events) and 1000 existing streams.
DROP TABLE IF EXISTS bench_stream_events;
CREATE TABLE bench_stream_events (LIKE resilience.stream_events INCLUDING ALL);
DROP SEQUENCE IF EXISTS bench_stream_seq;
CREATE SEQUENCE bench_stream_seq;
TRUNCATE resilience.streams, resilience.stream_events;
SELECT count(resilience.append_events('acct-' || i, -1, ARRAY['{"type": "Opened"}'::jsonb]))
  FROM generate_series(1, 1000) i;
