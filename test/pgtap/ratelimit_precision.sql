-- Precision of refills, at high and at very low rates.  Each check brackets
-- the server's decision between clock readings taken before and after the
-- calls, so it cannot flake on a slow machine, yet it fails if refills are
-- off by more than a fraction of a token (10,000/s: 0.1 ms per token).
BEGIN;
SELECT plan(9);

CREATE FUNCTION pg_temp.refill_after(key text, capacity int, rate float8, pause float8,
    OUT remaining int, OUT available float8, OUT retry_ms bigint,
    OUT min_s float8, OUT max_s float8)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz; t1 timestamptz; t2 timestamptz; t3 timestamptz;
BEGIN
    PERFORM resilience.rate_limit_reset(key);
    t0 := clock_timestamp();
    PERFORM resilience.rate_limit(key, capacity, rate, capacity);   -- drain
    t1 := clock_timestamp();
    PERFORM pg_sleep(pause);
    t2 := clock_timestamp();
    SELECT c.remaining, c.retry_after_ms INTO remaining, retry_ms
      FROM resilience.rate_limit_check(key, capacity, rate, 0) c;    -- peek
    SELECT r.available INTO available FROM resilience.rate_limits r
     WHERE r.key = refill_after.key AND r.kind = 'token_bucket';
    t3 := clock_timestamp();
    min_s := extract(epoch FROM t2 - t1);
    max_s := extract(epoch FROM t3 - t0);
END
$$;

-- 10,000 tokens per second for 0.2 s: about 2,000 tokens, to the token.
SELECT * INTO TEMP fast FROM pg_temp.refill_after('p:fast', 100000, 10000, 0.2);
SELECT ok(remaining BETWEEN floor(10000 * min_s) AND floor(10000 * max_s),
          format('10,000/s: %s tokens after %s..%s s', remaining, min_s, max_s))
  FROM fast;
SELECT ok(max_s - min_s < 0.05, 'the bracket is tight enough to mean something') FROM fast;

-- 50,000 tokens per second, fractional tokens kept: the fraction is there.
SELECT * INTO TEMP faster FROM pg_temp.refill_after('p:faster', 1000000, 50000, 0.1);
SELECT ok(remaining BETWEEN floor(50000 * min_s) AND floor(50000 * max_s),
          format('50,000/s: %s tokens after %s..%s s', remaining, min_s, max_s))
  FROM faster;

-- One token per hour: after a short pause the fraction refilled gives the
-- elapsed time to well under a millisecond.
SELECT * INTO TEMP slow FROM pg_temp.refill_after('p:slow', 1, 1.0 / 3600, 0.05);
SELECT ok(available * 3600 BETWEEN min_s AND max_s + 0.01,
          format('1/hour: %s tokens = %s s refilled, measured %s..%s s',
                 available, available * 3600, min_s, max_s))
  FROM slow;
SELECT is(remaining, 0, '1/hour: not a whole token yet') FROM slow;
SELECT ok(retry_ms BETWEEN 3600000 - ceil(max_s * 1000) - 1 AND 3600000 - floor(min_s * 1000),
          format('1/hour: Retry-After %s ms = one hour minus the %s..%s s already refilled',
                 retry_ms, min_s, max_s))
  FROM slow;

-- cost 0 takes nothing and counts nothing.
SELECT resilience.rate_limit('p:peek', 3, 0, 2);
SELECT is((SELECT allowed || '/' || denied FROM resilience.rate_limits WHERE key = 'p:peek'),
          '1/0', 'one decision counted');
SELECT resilience.rate_limit_check('p:peek', 3, 0, 0) FROM generate_series(1, 5);
SELECT is((SELECT allowed || '/' || denied || '/' || available FROM resilience.rate_limits
            WHERE key = 'p:peek'),
          '1/0/1', 'peeks take nothing and count nothing');

-- A bucket that was idle for longer than it takes to fill holds exactly its
-- capacity.  (p:full is never drained; p:fast, drained 0.2 s ago, would still
-- be refilling at 10,000/s, and two peeks of it may differ by a token.)
SELECT resilience.rate_limit_check('p:full', 100000, 10000, 0);
SELECT is((SELECT remaining FROM resilience.rate_limit_check('p:full', 100000, 10000, 0)),
          (SELECT remaining FROM resilience.rate_limit_check('p:full', 100000, 10000, 0)),
          'peeking twice in a row reports the same level');

SELECT * FROM finish();
ROLLBACK;
