-- The distributions of backoff, over 10,000 samples per jitter mode.
--
-- backoff draws from the generator behind random(), so setseed() fixes the
-- samples: the checks below give the same answer on every run (they cannot
-- flake).  The thresholds are those a correct implementation fails with a
-- probability of one in a million on any seed -- chi-square with 19 degrees
-- of freedom: 63.68; Kolmogorov-Smirnov with n = 10,000: 0.0270 -- so a new
-- PostgreSQL version, with another generator, passes too, while a wrong
-- range or shape (half the range, a bias to one end) fails by far.
BEGIN;
SELECT plan(19);
SELECT setseed(0.4242);

-- Samples in microseconds.  t = min(cap, base * 2^attempt) = 16 ms here.
CREATE TEMP TABLE full_jitter AS
    SELECT (extract(epoch FROM resilience.backoff(4, '1 ms', '1 s', 'full')) * 1e6)::bigint AS v
      FROM generate_series(1, 10000);
CREATE TEMP TABLE equal_jitter AS
    SELECT (extract(epoch FROM resilience.backoff(4, '1 ms', '1 s', 'equal')) * 1e6)::bigint AS v
      FROM generate_series(1, 10000);
CREATE TEMP TABLE no_jitter AS
    SELECT (extract(epoch FROM resilience.backoff(4, '1 ms', '1 s', 'none')) * 1e6)::bigint AS v
      FROM generate_series(1, 10000);
CREATE TEMP TABLE decorrelated AS
    SELECT (extract(epoch FROM resilience.backoff(4, '1 ms', '1 s', 'decorrelated', '100 ms')) * 1e6)::bigint AS v
      FROM generate_series(1, 10000);

-- Pearson's chi-square of samples against the discrete uniform distribution
-- on [lo, hi], in 20 bins (expected counts from the exact bin widths).
CREATE FUNCTION pg_temp.chi_square(samples regclass, lo bigint, hi bigint) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    result float8;
BEGIN
    EXECUTE format($q$
        WITH width AS (SELECT (%2$s - %1$s + 1)::float8 AS n),
        expected AS (
            SELECT floor((x - %1$s) * 20 / (SELECT n FROM width))::int AS bin,
                   count(*) / (SELECT n FROM width) * (SELECT count(*) FROM %3$s) AS e
              FROM generate_series(%1$s::bigint, %2$s::bigint) x GROUP BY 1),
        observed AS (
            SELECT floor((v - %1$s) * 20 / (SELECT n FROM width))::int AS bin, count(*) AS o
              FROM %3$s GROUP BY 1)
        SELECT sum((coalesce(o, 0) - e) ^ 2 / e)
          FROM expected LEFT JOIN observed USING (bin)$q$, lo, hi, samples)
      INTO result;
    RETURN result;
END
$$;

-- Kolmogorov-Smirnov statistic against the uniform distribution on [lo, hi].
CREATE FUNCTION pg_temp.ks(samples regclass, lo bigint, hi bigint) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    result float8;
BEGIN
    EXECUTE format($q$
        SELECT max(greatest(abs(i::float8 / n - f), abs((i - 1)::float8 / n - f)))
          FROM (SELECT row_number() OVER (ORDER BY v) AS i, count(*) OVER () AS n,
                       (v - %1$s + 1)::float8 / (%2$s - %1$s + 1) AS f
                  FROM %3$s) s$q$, lo, hi, samples)
      INTO result;
    RETURN result;
END
$$;

-- none: exactly t, every time
SELECT is((SELECT min(v) || '..' || max(v) FROM no_jitter), '16000..16000',
          'none: always min(cap, base * 2^attempt)');

-- full: uniform on [0, t]
SELECT ok((SELECT min(v) >= 0 AND max(v) <= 16000 FROM full_jitter), 'full: within [0, t]');
SELECT ok((SELECT min(v) < 160 AND max(v) > 15840 FROM full_jitter), 'full: reaches both ends of [0, t]');
SELECT cmp_ok(pg_temp.chi_square('full_jitter', 0, 16000), '<', 63.68::float8,
              'full: chi-square against uniform on [0, t] is below the 1e-6 critical value');
SELECT cmp_ok(pg_temp.ks('full_jitter', 0, 16000), '<', 0.0270::float8,
              'full: Kolmogorov-Smirnov distance to uniform on [0, t] is below the 1e-6 critical value');
SELECT ok((SELECT abs(avg(v) - 8000) < 6 * 16000 / sqrt(12 * 10000) FROM full_jitter),
          'full: the mean is t/2 within six standard errors');

-- equal: uniform on [t/2, t]
SELECT ok((SELECT min(v) >= 8000 AND max(v) <= 16000 FROM equal_jitter), 'equal: within [t/2, t]');
SELECT ok((SELECT min(v) < 8080 AND max(v) > 15920 FROM equal_jitter), 'equal: reaches both ends of [t/2, t]');
SELECT cmp_ok(pg_temp.chi_square('equal_jitter', 8000, 16000), '<', 63.68::float8,
              'equal: chi-square against uniform on [t/2, t] is below the 1e-6 critical value');
SELECT cmp_ok(pg_temp.ks('equal_jitter', 8000, 16000), '<', 0.0270::float8,
              'equal: Kolmogorov-Smirnov distance is below the 1e-6 critical value');

-- decorrelated: uniform on [base, min(cap, 3 * previous)]
SELECT ok((SELECT min(v) >= 1000 AND max(v) <= 300000 FROM decorrelated),
          'decorrelated: within [base, 3 * previous]');
SELECT cmp_ok(pg_temp.chi_square('decorrelated', 1000, 300000), '<', 63.68::float8,
              'decorrelated: chi-square against uniform on [base, 3 * previous] is below the 1e-6 critical value');
SELECT cmp_ok(pg_temp.ks('decorrelated', 1000, 300000), '<', 0.0270::float8,
              'decorrelated: Kolmogorov-Smirnov distance is below the 1e-6 critical value');

-- decorrelated, as a sequence (AWS: sleep = min(cap, random_between(base,
-- sleep * 3))): 10,000 steps stay within [base, cap] and do reach the cap
CREATE TEMP TABLE chain (step int, v bigint);
DO $$
DECLARE
    prev interval := '10 ms';
    d interval;
BEGIN
    FOR i IN 1 .. 10000 LOOP
        d := resilience.backoff(i, '10 ms', '2 s', 'decorrelated', prev);
        INSERT INTO chain VALUES (i, (extract(epoch FROM d) * 1e6)::bigint);
        prev := d;
    END LOOP;
END
$$;
SELECT ok((SELECT min(v) >= 10000 AND max(v) <= 2000000 FROM chain),
          'decorrelated sequence: every delay within [base, cap]');
SELECT ok((SELECT max(v) > 1900000 FROM chain), 'decorrelated sequence: grows to the cap');

-- the cap holds for every mode at large attempts, and none grows by doubling
SELECT is((SELECT max(extract(epoch FROM resilience.backoff(40, '1 ms', '250 ms', j)))
             FROM unnest(ARRAY['none', 'full', 'equal', 'decorrelated']) j, generate_series(1, 200)) <= 0.25,
          true, 'every mode stays within the cap');
SELECT is(ARRAY(SELECT extract(epoch FROM resilience.backoff(a, '1 ms', '1 s', 'none')) * 1000
                  FROM generate_series(0, 11) a),
          ARRAY[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000]::numeric[],
          'none doubles from base up to the cap');

-- the same seed gives the same samples (the reason the checks above are stable)
SELECT setseed(0.4242);
SELECT is((SELECT array_agg((extract(epoch FROM resilience.backoff(4, '1 ms', '1 s', 'full')) * 1e6)::bigint)
             FROM generate_series(1, 5)),
          (SELECT array_agg(v) FROM (SELECT v FROM full_jitter LIMIT 5) s),
          'setseed makes backoff reproducible');
SELECT isnt((SELECT array_agg(v) FROM (SELECT v FROM full_jitter LIMIT 20) s),
            (SELECT array_agg(v) FROM (SELECT v FROM full_jitter OFFSET 20 LIMIT 20) s),
            'successive samples differ');

SELECT * FROM finish();
ROLLBACK;
