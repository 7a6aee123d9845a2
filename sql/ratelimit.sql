-- Token bucket: 3 tokens, refilled one per hour.  Three calls pass, the
-- fourth does not.
SELECT resilience.rate_limit('t:basic', 3, 1.0 / 3600) FROM generate_series(1, 4);

-- The header fields: Retry-After is about an hour away, a full bucket three.
SELECT allowed, remaining, "limit",
       retry_after_ms BETWEEN 3599000 AND 3600000 AS retry_in_1h,
       reset_after_ms BETWEEN 3 * 3600000 - 1000 AND 3 * 3600000 AS full_in_3h
  FROM resilience.rate_limit_check('t:basic', 3, 1.0 / 3600);

-- cost => 0 looks without taking (and answers for a request of cost 1).
SELECT allowed, remaining FROM resilience.rate_limit_check('t:peek', 5, 0.001, 0);
SELECT allowed, remaining FROM resilience.rate_limit_check('t:peek', 5, 0.001, 2);
SELECT allowed, remaining FROM resilience.rate_limit_check('t:peek', 5, 0.001, 0);
SELECT allowed, remaining FROM resilience.rate_limit_check('t:peek', 5, 0.001, 3);
SELECT allowed, remaining, retry_after_ms > 0 AS must_wait
  FROM resilience.rate_limit_check('t:peek', 5, 0.001, 0);

-- A request larger than what is left is refused and takes nothing.
SELECT allowed, remaining FROM resilience.rate_limit_check('t:cost', 10, 0.001, 7);
SELECT allowed, remaining FROM resilience.rate_limit_check('t:cost', 10, 0.001, 7);
SELECT allowed, remaining FROM resilience.rate_limit_check('t:cost', 10, 0.001, 3);

-- refill_per_sec 0: a fixed quota that never refills; waits are NULL (never).
SELECT allowed, remaining, retry_after_ms, reset_after_ms
  FROM resilience.rate_limit_check('t:quota', 2, 0, 2);
SELECT allowed, remaining, retry_after_ms, reset_after_ms
  FROM resilience.rate_limit_check('t:quota', 2, 0);

-- Changing a key's capacity keeps its tokens, clamped to the new capacity.
SELECT remaining FROM resilience.rate_limit_check('t:shrink', 10, 0.001, 1);
SELECT remaining, "limit" FROM resilience.rate_limit_check('t:shrink', 4, 0.001, 0);

-- Sliding window: 3 requests per hour.
SELECT resilience.window_limit('w:basic', 3, '1 hour') FROM generate_series(1, 4);
-- Retry-After is when the oldest request stops counting: after the window,
-- plus at most one slot (window / 15).
SELECT allowed, remaining, "limit",
       retry_after_ms BETWEEN 3600000 AND 3600000 + 240000 AS retry_after_window
  FROM resilience.window_limit_check('w:basic', 3, '1 hour');
SELECT allowed, remaining FROM resilience.window_limit_check('w:cost', 10, '1 minute', 4);
SELECT allowed, remaining FROM resilience.window_limit_check('w:cost', 10, '1 minute', 7);
SELECT allowed, remaining FROM resilience.window_limit_check('w:cost', 10, '1 minute', 0);
-- Changing a key's window keeps what it counted (conservatively).
SELECT resilience.window_limit('w:change', 3, '1 hour', 3);
SELECT allowed, remaining FROM resilience.window_limit_check('w:change', 3, '10 minutes', 0);
SELECT allowed, remaining FROM resilience.window_limit_check('w:change', 5, '1 minute', 2);
-- Buckets and windows with the same key are separate.
SELECT resilience.rate_limit('w:basic', 1, 1);

-- Named policies: tiers live in data.
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec, description)
VALUES ('free', 2, 0.001, 'free tier'),
       ('pro', 5, 0.001, 'paid tier');
INSERT INTO resilience.rate_limit_policies (name, capacity, "window")
VALUES ('daily', 3, '1 day');
SELECT resilience.rate_limit('user:1', 'free') FROM generate_series(1, 3);
SELECT resilience.rate_limit('user:1', 'pro') FROM generate_series(1, 3);
SELECT resilience.rate_limit('user:1', 'daily', 2), resilience.rate_limit('user:1', 'daily', 2);
SELECT allowed, remaining, "limit" FROM resilience.rate_limit_check('user:2', 'free');
-- A policy change is seen at once.
UPDATE resilience.rate_limit_policies SET capacity = 20 WHERE name = 'free';
SELECT allowed, remaining, "limit" FROM resilience.rate_limit_check('user:2', 'free', 0);
-- ...also when it is made in the same transaction and rolled back.
BEGIN;
UPDATE resilience.rate_limit_policies SET capacity = 1 WHERE name = 'free';
SELECT "limit" FROM resilience.rate_limit_check('user:3', 'free', 0);
ROLLBACK;
SELECT "limit" FROM resilience.rate_limit_check('user:3', 'free', 0);

-- The view.
SELECT key, policy, kind, floor(available) AS available, "limit", refill_per_sec,
       "window", last_used <= now() + interval '1 second' AS used_recently, allowed, denied
  FROM resilience.rate_limits
 WHERE key IN ('t:basic', 'w:basic', 'user:1', 't:quota')
 ORDER BY key, policy NULLS FIRST, kind;

-- Reset forgets a key's bucket and window; false when there was nothing.
SELECT resilience.rate_limit_reset('t:basic');
SELECT resilience.rate_limit_reset('t:basic');
SELECT resilience.rate_limit('t:basic', 3, 1.0 / 3600);
SELECT resilience.rate_limit_reset('w:basic');
SELECT count(*) FROM resilience.rate_limits WHERE key = 'w:basic';
SELECT resilience.rate_limit_reset('user:1', 'free');
SELECT resilience.rate_limit('user:1', 'free');

-- The reaper drops only state worth nothing: a full bucket, unused since the
-- previous sweep.
SELECT resilience.rate_limit('t:idle', 5, 1000, 0);
SELECT item FROM resilience.run_reaper() WHERE item = 'rate_limit_keys';
SELECT item FROM resilience.run_reaper() WHERE item = 'rate_limit_keys';
SELECT count(*) FROM resilience.rate_limits WHERE key = 't:idle';
SELECT count(*) FROM resilience.rate_limits WHERE key = 't:quota';
