-- Circuit breakers: the contract, transition by transition.  Transitions are
-- logged at LOG; this file shows those whose text does not depend on time.

-- The error a refused guard raises: SQLSTATE, message, and the detail with
-- its durations masked.
CREATE FUNCTION public.guard_error(name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    msg text; detail text;
BEGIN
    PERFORM resilience.breaker_guard(name);
    RETURN 'permitted';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
    RETURN SQLSTATE || ': ' || msg || ' / ' ||
           regexp_replace(detail, '[0-9]+\.[0-9]+ (ms|s)', 'N \1');
END
$$;

-- A breaker never used is closed, permits calls, and is not in the view
-- until something is recorded or asked of it.
SELECT resilience.breaker_state('b:unknown');
SELECT count(*) FROM resilience.breakers WHERE name = 'b:unknown';
SELECT resilience.breaker_allow('b:unknown');
SELECT name, state, failure_rate, calls, window_type, window_size, next_probe
  FROM resilience.breakers WHERE name = 'b:unknown';

-- Without a row in breaker_config the defaults apply: a count window of 100
-- calls, at least 100 calls before rates count.  99 failures do not open it.
SELECT count(resilience.breaker_record('b:defaults', false)) FROM generate_series(1, 99);
SELECT state, calls, failed_calls, failure_rate FROM resilience.breakers WHERE name = 'b:defaults';
SET client_min_messages = log;
SELECT resilience.breaker_record('b:defaults', false);
RESET client_min_messages;
SELECT state, calls, failed_calls, failure_rate FROM resilience.breakers WHERE name = 'b:defaults';

-- A small count window: 4 calls, rates once all 4 are in, 50% opens it.
INSERT INTO resilience.breaker_config
    (name, window_size, minimum_calls, open_timeout, half_open_calls, slow_call_duration)
VALUES ('b:count', 4, 4, '1 hour', 2, '1 s');
SELECT resilience.breaker_record('b:count', true);
SELECT resilience.breaker_record('b:count', false);
SELECT resilience.breaker_record('b:count', true);
SELECT state, calls, failed_calls, round(failure_rate::numeric, 2) AS failure_rate
  FROM resilience.breakers WHERE name = 'b:count';
SET client_min_messages = log;
SELECT resilience.breaker_record('b:count', false);   -- 2 of 4: 50% >= 50%
RESET client_min_messages;
SELECT resilience.breaker_state('b:count'), resilience.breaker_allow('b:count');
SELECT state, calls, failed_calls, failure_rate, not_permitted,
       next_probe BETWEEN now() + interval '59 minutes' AND clock_timestamp() + interval '1 hour' AS probe_in_1h
  FROM resilience.breakers WHERE name = 'b:count';
-- breaker_guard raises RS002 with the time until the next probe
SELECT public.guard_error('b:count');
-- records while open change nothing
SELECT resilience.breaker_record('b:count', true);
SELECT state, calls, failed_calls FROM resilience.breakers WHERE name = 'b:count';

-- The window slides: the oldest outcome leaves as a new one enters.
INSERT INTO resilience.breaker_config (name, window_size, minimum_calls)
VALUES ('b:slide', 3, 3);
SELECT count(resilience.breaker_record('b:slide', ok))
  FROM unnest(ARRAY[false, true, true, true, false]) ok;
SELECT state, calls, failed_calls FROM resilience.breakers WHERE name = 'b:slide';
-- minimum_calls above window_size counts as window_size (3 here)
UPDATE resilience.breaker_config SET minimum_calls = 50, failure_rate_threshold = 60
 WHERE name = 'b:slide';
SELECT resilience.breaker_record('b:slide', false);   -- [true, false, false]: 67%
SELECT state, calls, failed_calls FROM resilience.breakers WHERE name = 'b:slide';

-- Slow calls: duration > slow_call_duration; a slow failure counts in both rates.
INSERT INTO resilience.breaker_config
    (name, window_size, minimum_calls, slow_call_duration, slow_call_rate_threshold)
VALUES ('b:slow', 10, 4, '100 ms', 75);
SELECT resilience.breaker_record('b:slow', true, '100 ms');   -- not slow: not above
SELECT resilience.breaker_record('b:slow', true, '101 ms');
SELECT resilience.breaker_record('b:slow', false, '5 s');
SELECT resilience.breaker_record('b:slow', true);              -- no duration: not slow
SELECT state, calls, failed_calls, slow_calls, slow_call_rate FROM resilience.breakers WHERE name = 'b:slow';
SET client_min_messages = log;
SELECT resilience.breaker_record('b:slow', true, '1 minute');  -- 3 of 5 slow is 60%
SELECT resilience.breaker_record('b:slow', true, '1 minute');  -- 4 of 6: 67%
SELECT resilience.breaker_record('b:slow', true, '1 minute');  -- 5 of 7: 71%
SELECT resilience.breaker_record('b:slow', true, '1 minute');  -- 6 of 8: 75% >= 75%
RESET client_min_messages;
SELECT state, calls, failed_calls, slow_calls, slow_call_rate FROM resilience.breakers WHERE name = 'b:slow';

-- Half-open: after open_timeout, half_open_calls probes; all succeed: closed.
INSERT INTO resilience.breaker_config
    (name, window_size, minimum_calls, open_timeout, half_open_calls, probe_timeout)
VALUES ('b:half', 2, 2, '10 ms', 3, '1 hour');
SELECT count(resilience.breaker_record('b:half', false)) FROM generate_series(1, 2);
SELECT pg_sleep(0.05);
SELECT resilience.breaker_state('b:half');     -- as the next call will see it
SELECT resilience.breaker_allow('b:half') FROM generate_series(1, 4);   -- three probes
SELECT state, calls, probes_in_flight, next_probe IS NOT NULL AS has_next_probe
  FROM resilience.breakers WHERE name = 'b:half';
SELECT public.guard_error('b:half');
SET client_min_messages = log;
SELECT resilience.breaker_record('b:half', true);
SELECT resilience.breaker_record('b:half', true);
SELECT state, calls, probes_in_flight FROM resilience.breakers WHERE name = 'b:half';
SELECT resilience.breaker_record('b:half', true);   -- the third result decides
RESET client_min_messages;
SELECT state, calls, failed_calls, probes_in_flight, next_probe FROM resilience.breakers WHERE name = 'b:half';
-- closed again: a record counts in the (new, empty) window
SELECT resilience.breaker_record('b:half', true);
SELECT state, calls FROM resilience.breakers WHERE name = 'b:half';

-- Half-open probes that fail reopen it, with the probes' rates logged.
SELECT count(resilience.breaker_record('b:half', false)) FROM generate_series(1, 2);
SELECT pg_sleep(0.05);
SELECT count(*) FILTER (WHERE resilience.breaker_allow('b:half')) FROM generate_series(1, 3);
SET client_min_messages = log;
SELECT resilience.breaker_record('b:half', false);
SELECT resilience.breaker_record('b:half', true);
SELECT resilience.breaker_record('b:half', true);   -- 1 of 3 failed: 33% < 50%: closed
SELECT count(resilience.breaker_record('b:half', false)) FROM generate_series(1, 2);
RESET client_min_messages;
SELECT pg_sleep(0.05);
SELECT count(*) FILTER (WHERE resilience.breaker_allow('b:half')) FROM generate_series(1, 3);
-- a long open_timeout from here: the state read below must not depend on load
UPDATE resilience.breaker_config SET open_timeout = '1 hour' WHERE name = 'b:half';
SET client_min_messages = log;
SELECT resilience.breaker_record('b:half', false);
SELECT resilience.breaker_record('b:half', true);
SELECT resilience.breaker_record('b:half', false);  -- 2 of 3: 67%: open again
RESET client_min_messages;
SELECT state, calls, failed_calls FROM resilience.breakers WHERE name = 'b:half';

-- A probe that never reports frees its slot after probe_timeout.
UPDATE resilience.breaker_config SET half_open_calls = 1, probe_timeout = '1 s', open_timeout = '10 ms'
 WHERE name = 'b:half';
SELECT pg_sleep(0.05);
SELECT resilience.breaker_allow('b:half'), resilience.breaker_allow('b:half');
SELECT probes_in_flight FROM resilience.breakers WHERE name = 'b:half';
SELECT pg_sleep(1.1);
SELECT resilience.breaker_allow('b:half'), resilience.breaker_allow('b:half');
SELECT resilience.breaker_record('b:half', true);
SELECT state FROM resilience.breakers WHERE name = 'b:half';

-- Forced states, logged; breaker_reset forgets the breaker.
SET client_min_messages = log;
SELECT resilience.breaker_force_open('b:forced');
SELECT resilience.breaker_force_open('b:forced');     -- already: nothing logged
RESET client_min_messages;
SELECT resilience.breaker_allow('b:forced'), public.guard_error('b:forced');
SELECT state, not_permitted, next_probe FROM resilience.breakers WHERE name = 'b:forced';
INSERT INTO resilience.breaker_config (name, window_size, minimum_calls) VALUES ('b:forced', 2, 2);
SET client_min_messages = log;
SELECT resilience.breaker_force_closed('b:forced');
RESET client_min_messages;
SELECT count(resilience.breaker_record('b:forced', false)) FROM generate_series(1, 5);
SELECT resilience.breaker_allow('b:forced');           -- metrics_only: measures, never opens
SELECT state, calls, failed_calls, failure_rate FROM resilience.breakers WHERE name = 'b:forced';
SET client_min_messages = log;
SELECT resilience.breaker_disable('b:forced');
RESET client_min_messages;
SELECT count(resilience.breaker_record('b:forced', false)) FROM generate_series(1, 5);
SELECT resilience.breaker_allow('b:forced');
SELECT state, calls, failure_rate FROM resilience.breakers WHERE name = 'b:forced';
SET client_min_messages = log;
SELECT resilience.breaker_reset('b:forced');
RESET client_min_messages;
SELECT resilience.breaker_reset('b:forced');         -- gone already
SELECT resilience.breaker_state('b:forced');
SELECT count(*) FROM resilience.breakers WHERE name = 'b:forced';

-- A time window counts the calls of the last window_size seconds.
INSERT INTO resilience.breaker_config (name, window_type, window_size, minimum_calls)
VALUES ('b:time', 'time', 2, 3);
SELECT count(resilience.breaker_record('b:time', false)) FROM generate_series(1, 2);
SELECT state, calls, window_type, window_size FROM resilience.breakers WHERE name = 'b:time';
SELECT pg_sleep(2.2);   -- two one-second buckets later, both calls are out
SELECT state, calls FROM resilience.breakers WHERE name = 'b:time';
SELECT resilience.breaker_record('b:time', false);  -- alone in the window: no quorum
SELECT state, calls FROM resilience.breakers WHERE name = 'b:time';

-- A configuration change applies from the next call after its commit; a new
-- window shape starts an empty window.
SELECT count(resilience.breaker_record('b:reconf', true)) FROM generate_series(1, 5);
SELECT calls, window_type, window_size FROM resilience.breakers WHERE name = 'b:reconf';
BEGIN;
INSERT INTO resilience.breaker_config (name, window_size) VALUES ('b:reconf', 10);
SELECT resilience.breaker_allow('b:reconf');
SELECT calls, window_size FROM resilience.breakers WHERE name = 'b:reconf';  -- not yet
COMMIT;
SELECT resilience.breaker_allow('b:reconf');
SELECT calls, window_size FROM resilience.breakers WHERE name = 'b:reconf';
-- a change rolled back is never applied
BEGIN;
UPDATE resilience.breaker_config SET window_size = 20 WHERE name = 'b:reconf';
ROLLBACK;
SELECT resilience.breaker_allow('b:reconf');
SELECT window_size FROM resilience.breakers WHERE name = 'b:reconf';
-- deleting the row brings the defaults back
DELETE FROM resilience.breaker_config WHERE name = 'b:reconf';
SELECT resilience.breaker_allow('b:reconf');
SELECT window_size FROM resilience.breakers WHERE name = 'b:reconf';
-- a change cannot be prepared for a later COMMIT PREPARED
BEGIN;
INSERT INTO resilience.breaker_config (name) VALUES ('b:prepared');
PREPARE TRANSACTION 'breaker_config_change';
SELECT count(*) FROM resilience.breaker_config WHERE name = 'b:prepared';

-- The configuration is read as the table's owner: a caller needs no
-- privilege on breaker_config for its breakers to follow it.
CREATE ROLE resilience_test_caller IN ROLE resilience_user;
INSERT INTO resilience.breaker_config (name, window_size) VALUES ('b:role', 3);
SET ROLE resilience_test_caller;
SELECT sqlstate_of($$SELECT count(*) FROM resilience.breaker_config$$);
SELECT resilience.breaker_allow('b:role');
RESET ROLE;
SELECT window_size FROM resilience.breakers WHERE name = 'b:role';
DROP ROLE resilience_test_caller;

-- Breakers belong to a database: another database has its own.
SELECT resilience.breaker_force_open('b:db');
\set regress_db :DBNAME
CREATE DATABASE breaker_other;
\c breaker_other
CREATE EXTENSION resilience;
SELECT resilience.breaker_state('b:db'), resilience.breaker_allow('b:db');
SELECT name, state FROM resilience.breakers;
\c :regress_db
DROP DATABASE breaker_other;
SELECT resilience.breaker_state('b:db');

-- run_reaper forgets closed breakers with an empty window that were not
-- used since its previous run; open ones stay.
SELECT resilience.breaker_allow('b:idle');
SELECT count(*) FROM resilience.breakers WHERE name = 'b:idle';
SELECT item FROM resilience.run_reaper() WHERE item = 'breakers';   -- clears the "used" marks
SELECT item FROM resilience.run_reaper() WHERE item = 'breakers';   -- forgets what was idle since
SELECT count(*) FROM resilience.breakers WHERE name = 'b:idle';
SELECT state FROM resilience.breakers WHERE name = 'b:count';
