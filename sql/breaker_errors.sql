-- Bad input to breakers gets a specific SQLSTATE and changes nothing.  Every
-- call below names a breaker starting with 'bad:'; the last queries check
-- that none was created and no configuration row was written.
\set VERBOSITY default

-- NULLs (22004)
SELECT resilience.breaker_allow(NULL);
SELECT sqlstate_of($$SELECT resilience.breaker_guard(NULL)$$);
SELECT sqlstate_of($$SELECT resilience.breaker_record(NULL, true)$$);
SELECT resilience.breaker_record('bad:1', NULL);
SELECT sqlstate_of($$SELECT resilience.breaker_state(NULL)$$);
SELECT sqlstate_of($$SELECT resilience.breaker_reset(NULL)$$);
SELECT sqlstate_of($$SELECT resilience.breaker_force_open(NULL)$$);
SELECT sqlstate_of($$SELECT resilience.breaker_force_closed(NULL)$$);
SELECT sqlstate_of($$SELECT resilience.breaker_disable(NULL)$$);

-- names: not empty, at most 63 bytes (22023)
SELECT resilience.breaker_allow('');
SELECT resilience.breaker_allow(repeat('n', 64));
SELECT sqlstate_of($$SELECT resilience.breaker_record('', false)$$);
SELECT sqlstate_of($$SELECT resilience.breaker_force_open(repeat('é', 32))$$);
SELECT sqlstate_of($$SELECT resilience.breaker_state(repeat('n', 64))$$);
SELECT resilience.breaker_state(repeat('n', 63));   -- the longest name is fine

-- durations are not negative (22023); success without a duration is fine
SELECT resilience.breaker_record('bad:1', false, '-1 ms');
SELECT sqlstate_of($$SELECT resilience.breaker_record('bad:1', true, '-1 day')$$);

-- breaker_config checks its rows (23514): thresholds in (0, 100], window and
-- minimum calls positive, window at most 1000, probes 1 to 100, positive
-- durations, a known window type
INSERT INTO resilience.breaker_config (name, failure_rate_threshold) VALUES ('bad:1', 0);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, failure_rate_threshold) VALUES ('bad:1', 100.5)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, failure_rate_threshold) VALUES ('bad:1', -10)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, slow_call_rate_threshold) VALUES ('bad:1', 0)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, slow_call_rate_threshold) VALUES ('bad:1', 101)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, window_size) VALUES ('bad:1', 0)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, window_size) VALUES ('bad:1', 1001)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, minimum_calls) VALUES ('bad:1', 0)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, minimum_calls) VALUES ('bad:1', -1)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, half_open_calls) VALUES ('bad:1', 0)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, half_open_calls) VALUES ('bad:1', 101)$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, window_type) VALUES ('bad:1', 'sliding')$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, open_timeout) VALUES ('bad:1', '0 s')$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, open_timeout) VALUES ('bad:1', '400 days')$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, slow_call_duration) VALUES ('bad:1', '-1 s')$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name, probe_timeout) VALUES ('bad:1', '0 s')$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name) VALUES ('')$$);
SELECT sqlstate_of($$INSERT INTO resilience.breaker_config (name) VALUES (repeat('n', 64))$$);

-- the defaults are checked too (22023), and cannot be set per session (55P02)
ALTER SYSTEM SET resilience.breaker_failure_rate_threshold = 0;
ALTER SYSTEM SET resilience.breaker_slow_call_rate_threshold = 150;
ALTER SYSTEM SET resilience.breaker_window_size = 0;
ALTER SYSTEM SET resilience.breaker_half_open_calls = 101;
ALTER SYSTEM SET resilience.breaker_window_type = 'sliding';
SELECT sqlstate_of($$SET resilience.breaker_window_size = 10$$);

-- Nothing was created by any of the calls above.
SELECT count(*) FROM resilience.breakers WHERE name LIKE 'bad:%' OR name LIKE 'nnn%' OR name LIKE 'é%';
SELECT count(*) FROM resilience.breaker_config WHERE name LIKE 'bad:%' OR name = '' OR name LIKE 'nnn%';
