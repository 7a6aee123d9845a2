-- Objects for the locks section of `make bench`.
--
-- Baselines: what an application would write without resilience.  A raw
-- advisory lock on hashtext(key) plus a token from a sequence; and a lease
-- over a table, taken with one INSERT ... ON CONFLICT DO UPDATE ... WHERE
-- expired RETURNING, released with one UPDATE: the same durability as
-- resilience's leases (both commit; both draw tokens from a sequence).
\set ON_ERROR_STOP 1

CREATE SEQUENCE bench.tokens;
CREATE TABLE bench.leases (
	name text PRIMARY KEY,
	owner text NOT NULL,
	token bigint NOT NULL,
	expires_at timestamptz NOT NULL
) WITH (fillfactor = 70);

-- 1,000 names, every one free, in both implementations.
INSERT INTO bench.leases
SELECT 'k' || i, 'bench', nextval('bench.tokens'), clock_timestamp() FROM generate_series(1, 1000) i
UNION ALL SELECT 'hot', 'bench', nextval('bench.tokens'), clock_timestamp();
SELECT count(resilience.lock_release('k' || i, resilience.lock_acquire('k' || i, '1 minute', 'bench')))
  FROM generate_series(1, 1000) i;
SELECT resilience.lock_release('hot', resilience.lock_acquire('hot', '1 minute', 'bench'));
VACUUM ANALYZE bench.leases;
VACUUM ANALYZE resilience.leases;
