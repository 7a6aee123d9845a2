-- Bad input gets a specific SQLSTATE and changes nothing.  Every call below
-- uses a key starting with 'bad:'; the last query checks none was created.
\set VERBOSITY default

-- NULLs (22004)
SELECT sqlstate_of($$SELECT resilience.rate_limit(NULL, 10, 1)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', NULL::integer, 1)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', 10, NULL)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', 10, 1, NULL)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit_check(NULL, 10, 1)$$);
SELECT sqlstate_of($$SELECT resilience.window_limit(NULL, 10, '1 minute')$$);
SELECT sqlstate_of($$SELECT resilience.window_limit('bad:1', 10, NULL)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', NULL::text)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit(NULL, 'free')$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit_reset(NULL)$$);

-- capacity and max must be positive (22023)
SELECT resilience.rate_limit('bad:1', 0, 1);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', -5, 1)$$);
SELECT sqlstate_of($$SELECT resilience.window_limit('bad:1', 0, '1 minute')$$);

-- refill_per_sec must be finite and >= 0 (22023)
SELECT resilience.rate_limit('bad:1', 10, -1);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', 10, 'NaN')$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', 10, 'Infinity')$$);

-- cost must be >= 0 and <= capacity (22023)
SELECT resilience.rate_limit('bad:1', 10, 1, -1);
SELECT resilience.rate_limit('bad:1', 10, 1, 11);
SELECT sqlstate_of($$SELECT resilience.window_limit('bad:1', 10, '1 minute', 11)$$);

-- window must be positive and at most 366 days (22023)
SELECT resilience.window_limit('bad:1', 10, '0 seconds');
SELECT sqlstate_of($$SELECT resilience.window_limit('bad:1', 10, '-1 minute')$$);
SELECT sqlstate_of($$SELECT resilience.window_limit('bad:1', 10, '400 days')$$);

-- keys: not empty, at most resilience.max_key_length bytes (22023)
SELECT sqlstate_of($$SELECT resilience.rate_limit('', 10, 1)$$);
SELECT resilience.rate_limit(repeat('k', 129), 10, 1);
SELECT sqlstate_of($$SELECT resilience.rate_limit(repeat('k', 128), 10, 1, 0)$$);
SELECT resilience.rate_limit_reset(repeat('k', 128));

-- policies: unknown (42704), bad names (22023), cost above the capacity (22023)
SELECT resilience.rate_limit('bad:1', 'no_such_policy');
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', '')$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', repeat('p', 64))$$);
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('tiny', 2, 1);
SELECT sqlstate_of($$SELECT resilience.rate_limit('bad:1', 'tiny', 3)$$);
SELECT sqlstate_of($$SELECT resilience.rate_limit_reset('bad:1', 'no_such_policy')$$);
-- the policy table checks its rows
SELECT sqlstate_of($$INSERT INTO resilience.rate_limit_policies VALUES ('zero', 0, 1)$$);
SELECT sqlstate_of($$INSERT INTO resilience.rate_limit_policies VALUES ('neg', 1, -1)$$);
SELECT sqlstate_of($$INSERT INTO resilience.rate_limit_policies VALUES ('inf', 1, 'Infinity')$$);
SELECT sqlstate_of($$INSERT INTO resilience.rate_limit_policies (name, capacity, "window") VALUES ('w0', 1, '0 s')$$);
SELECT sqlstate_of($$INSERT INTO resilience.rate_limit_policies VALUES ('both', 1, 1, '1 minute')$$);
SELECT sqlstate_of($$INSERT INTO resilience.rate_limit_policies VALUES ('', 1, 1)$$);

-- when_full is for superusers to choose
CREATE ROLE resilience_test_plain;
SET ROLE resilience_test_plain;
SELECT sqlstate_of($$SET resilience.when_full = 'allow'$$);
RESET ROLE;
DROP ROLE resilience_test_plain;

-- Nothing was created by any of the calls above.
SELECT count(*) FROM resilience.rate_limits WHERE key LIKE 'bad:%' OR key LIKE 'kkk%';
SELECT name FROM resilience.rate_limit_policies ORDER BY name;
