-- Objects for `make bench`, loaded with psql into the throwaway cluster.
--
-- The comparison point for resilience.rate_limit is what an application would
-- write without it: a token bucket in PL/pgSQL over a table, one row per key,
-- with the same semantics (capacity, refill per second, cost; a new key
-- starts full; time never runs backwards for a bucket).  One statement per
-- call: the upsert takes the row lock, refills, decides and writes.
\set ON_ERROR_STOP 1

CREATE EXTENSION IF NOT EXISTS resilience;
CREATE SCHEMA bench;

CREATE TABLE bench.bucket_logged (
	key text PRIMARY KEY,
	tokens float8 NOT NULL,
	ts timestamptz NOT NULL,
	allowed boolean NOT NULL	-- the last decision, so RETURNING can report it
);

CREATE FUNCTION bench.bucket_logged(p_key text, p_capacity int, p_refill float8,
									p_cost int DEFAULT 1)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
	v_now timestamptz := clock_timestamp();
	v_allowed boolean;
BEGIN
	INSERT INTO bench.bucket_logged AS b (key, tokens, ts, allowed)
	VALUES (p_key, CASE WHEN p_cost <= p_capacity THEN p_capacity - p_cost ELSE p_capacity END,
			v_now, p_cost <= p_capacity)
	ON CONFLICT (key) DO UPDATE SET (tokens, ts, allowed) = (
		SELECT CASE WHEN level >= p_cost THEN level - p_cost ELSE level END,
			   greatest(b.ts, v_now),
			   level >= p_cost
		FROM (SELECT least(p_capacity::float8,
						   b.tokens + greatest(0, date_part('epoch', v_now - b.ts)) * p_refill)
					 AS level) AS refilled)
	RETURNING b.allowed INTO v_allowed;
	RETURN v_allowed;
END
$$;

-- The same table and function, unlogged.
CREATE UNLOGGED TABLE bench.bucket_unlogged (LIKE bench.bucket_logged INCLUDING ALL);
SELECT replace(pg_get_functiondef('bench.bucket_logged'::regproc),
			   'bench.bucket_logged', 'bench.bucket_unlogged')
\gexec

-- Pre-populate the 100,000 random keys and the hot key everywhere, so the runs
-- measure updates of existing buckets, not inserts.
INSERT INTO bench.bucket_logged
SELECT 'k' || i, 1000000, clock_timestamp(), true FROM generate_series(1, 100000) i
UNION ALL SELECT 'hot', 1000000, clock_timestamp(), true;
INSERT INTO bench.bucket_unlogged SELECT * FROM bench.bucket_logged;
SELECT count(*) AS rate_limit_keys
FROM (SELECT resilience.rate_limit('k' || i, 1000000, 1000000) FROM generate_series(1, 100000) i
	  UNION ALL SELECT resilience.rate_limit('hot', 1000000, 1000000)) AS warm;
VACUUM ANALYZE bench.bucket_logged;
VACUUM ANALYZE bench.bucket_unlogged;
CHECKPOINT;

-- Sanity: every implementation admits a call with these parameters.
SELECT resilience.rate_limit('hot', 1000000, 1000000) AS rate_limit,
	   bench.bucket_logged('hot', 1000000, 1000000) AS logged,
	   bench.bucket_unlogged('hot', 1000000, 1000000) AS unlogged,
	   bench.bucket_unlogged('new key', 5, 1, 6) AS too_costly;
