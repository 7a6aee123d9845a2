-- The quota section of `make bench` (bench/quota.sh): 100,000 keys and the
-- hot key created before the runs, so the runs measure decisions on
-- existing keys.  A limit no run reaches: every call is admitted.
SELECT count(*) FILTER (WHERE resilience.quota('q' || i, 1000000000, 'month'))
  FROM generate_series(1, 100000) i;
SELECT resilience.quota('qhot', 1000000000, 'month');
CHECKPOINT;
-- The first decision on a key after a checkpoint logs (src/quota.c,
-- "Logging ahead"); a 10-second run touches each of 100,000 keys about
-- once, so without this it would measure mostly first decisions.  This
-- puts every key where a key in use is after its first decision of a
-- checkpoint interval (5 minutes by default): with a reservation.
SELECT count(*) FILTER (WHERE resilience.quota('q' || i, 1000000000, 'month'))
  FROM generate_series(1, 100000) i;
