-- The quota section of `make bench` (bench/quota.sh): 100,000 keys and the
-- hot key created before the runs, so the runs measure decisions on
-- existing keys.  A limit no run reaches: every call is admitted and writes.
SELECT count(*) FILTER (WHERE resilience.quota('q' || i, 1000000000, 'month'))
  FROM generate_series(1, 100000) i;
SELECT resilience.quota('qhot', 1000000000, 'month');
CHECKPOINT;
