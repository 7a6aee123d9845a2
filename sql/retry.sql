-- Retry helpers: backoff, is_retryable, and the retry procedure.
\set VERBOSITY default

-- backoff without jitter: min(cap, base * 2^attempt), attempt 0 first.
SELECT attempt, resilience.backoff(attempt, '10 ms', '1 s', 'none')
  FROM generate_series(0, 8) attempt;
SELECT resilience.backoff(1000, '1 ms', '1 day', 'none');   -- no overflow: the cap
-- with jitter each stays within its bounds (test/pgtap/backoff_distribution.sql
-- checks the distributions)
SELECT bool_and(d BETWEEN '0' AND '80 ms') AS full_in_bounds
  FROM (SELECT resilience.backoff(3, '10 ms', '1 s') d FROM generate_series(1, 1000)) s;
SELECT bool_and(d BETWEEN '40 ms' AND '80 ms') AS equal_in_bounds
  FROM (SELECT resilience.backoff(3, '10 ms', '1 s', 'equal') d FROM generate_series(1, 1000)) s;
SELECT bool_and(d BETWEEN '10 ms' AND '300 ms') AS decorrelated_in_bounds
  FROM (SELECT resilience.backoff(3, '10 ms', '1 s', 'decorrelated', '100 ms') d
          FROM generate_series(1, 1000)) s;
SELECT bool_and(d BETWEEN '10 ms' AND '1 s') AS decorrelated_capped
  FROM (SELECT resilience.backoff(9, '10 ms', '1 s', 'decorrelated', '900 ms') d
          FROM generate_series(1, 1000)) s;
-- it draws from random()'s generator: setseed makes it reproducible
SELECT setseed(0.25);
CREATE TEMP TABLE first_draw AS
    SELECT i, resilience.backoff(i % 8, '1 ms', '10 s', 'full') d FROM generate_series(1, 20) i;
SELECT setseed(0.25);
SELECT count(*) AS same FROM first_draw
 WHERE d = resilience.backoff(i % 8, '1 ms', '10 s', 'full');

-- is_retryable: transient conflicts and lost connections, not user errors.
SELECT code, resilience.is_retryable(code) FROM unnest(ARRAY[
    '40001', '40P01', '55P03', '08000', '08003', '08006', '08001', '08004', '08P01',
    '57P01', '57P02', '57P03', '57P05', '53300', '72000',
    '57014', '40002', '40003', '23505', '22012', '42P01', '53100', 'XX000', 'RS002']) code;

-- retry: success at once; a retryable error retried until it succeeds; a
-- non-retryable one raised at once; a retryable one raised after max_attempts.
CREATE SEQUENCE attempts;
CREATE TABLE retried (v int);
CALL resilience.retry($$INSERT INTO retried VALUES (1)$$);
SELECT * FROM retried;
CALL resilience.retry($q$
    INSERT INTO retried VALUES (2);
    DO $x$ BEGIN
        IF nextval('attempts') < 3 THEN
            RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure';
        END IF;
    END $x$$q$, base => '1 ms', cap => '5 ms');
SELECT last_value AS attempts FROM attempts;
SELECT * FROM retried ORDER BY v;   -- the failed attempts were rolled back
ALTER SEQUENCE attempts RESTART;
CALL resilience.retry($$SELECT nextval('attempts'); SELECT 1 / 0$$);
SELECT last_value AS attempts FROM attempts;
ALTER SEQUENCE attempts RESTART;
CALL resilience.retry($q$
    SELECT nextval('attempts');
    DO $x$ BEGIN RAISE EXCEPTION 'always deadlocked' USING ERRCODE = 'deadlock_detected'; END $x$$q$,
    3, '1 ms', '2 ms', 'none');
SELECT last_value AS attempts FROM attempts;

-- Errors raised at COMMIT are caught and retried too: a deferred constraint
-- trigger fails the first two commits with a serialization failure.
CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('attempts') < 3 THEN
        RAISE EXCEPTION 'conflict found at commit' USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NULL;
END $$;
CREATE TABLE committed (v int UNIQUE DEFERRABLE INITIALLY DEFERRED);
CREATE CONSTRAINT TRIGGER check_at_commit AFTER INSERT ON committed
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit();
ALTER SEQUENCE attempts RESTART;
CALL resilience.retry($$INSERT INTO committed VALUES (1)$$, base => '1 ms', cap => '2 ms');
SELECT last_value AS attempts FROM attempts;
SELECT * FROM committed;
-- a commit-time error that is not retryable is raised at once
CALL resilience.retry($$INSERT INTO committed VALUES (1)$$);
SELECT * FROM committed;

-- Retries go inside the breaker: each attempt asks it and reports to it; an
-- open breaker stops the retries at once (RS002 is not retryable).
INSERT INTO resilience.breaker_config (name, window_size, minimum_calls, open_timeout)
VALUES ('r:dependency', 2, 2, '1 hour');
ALTER SEQUENCE attempts RESTART;
\set VERBOSITY terse
CALL resilience.retry($q$
    SELECT nextval('attempts');
    DO $x$ BEGIN RAISE EXCEPTION 'dependency down' USING ERRCODE = 'connection_failure'; END $x$$q$,
    10, '1 ms', '2 ms', breaker => 'r:dependency');
\set VERBOSITY default
SELECT last_value AS attempts FROM attempts;
SELECT state, calls, failed_calls FROM resilience.breakers WHERE name = 'r:dependency';
SELECT resilience.breaker_reset('r:dependency');
CALL resilience.retry($$INSERT INTO retried VALUES (3)$$, breaker => 'r:dependency');
SELECT state, calls, failed_calls FROM resilience.breakers WHERE name = 'r:dependency';

-- Bad input: a specific SQLSTATE, nothing run.
ALTER SEQUENCE attempts RESTART;
SELECT resilience.backoff(NULL, '1 ms', '1 s');
SELECT sqlstate_of($$SELECT resilience.backoff(1, NULL, '1 s')$$);
SELECT sqlstate_of($$SELECT resilience.backoff(1, '1 ms', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.backoff(1, '1 ms', '1 s', NULL)$$);
SELECT resilience.backoff(-1, '1 ms', '1 s');
SELECT resilience.backoff(1, '1 s', '1 ms');
SELECT sqlstate_of($$SELECT resilience.backoff(1, '0 s', '1 s')$$);
SELECT sqlstate_of($$SELECT resilience.backoff(1, '-1 s', '1 s')$$);
SELECT sqlstate_of($$SELECT resilience.backoff(1, '1 ms', '400 days')$$);
SELECT resilience.backoff(1, '1 ms', '1 s', 'random');
SELECT sqlstate_of($$SELECT resilience.backoff(1, '1 ms', '1 s', 'decorrelated', '-1 s')$$);
SELECT resilience.is_retryable(NULL);
SELECT resilience.is_retryable('4000');
SELECT sqlstate_of($$SELECT resilience.is_retryable('40p01')$$);
SELECT sqlstate_of($$SELECT resilience.is_retryable('serialization_failure')$$);
CALL resilience.retry(NULL);
CALL resilience.retry('  ;  ');
CALL resilience.retry($$SELECT nextval('attempts')$$, 0);
CALL resilience.retry($$SELECT nextval('attempts')$$, NULL);
CALL resilience.retry($$SELECT nextval('attempts')$$, 3, '1 s', '1 ms');
CALL resilience.retry($$SELECT nextval('attempts')$$, 3, jitter => 'sometimes');
CALL resilience.retry($$SELECT nextval('attempts')$$, breaker => '');
-- transaction control inside sql is refused, and retry itself needs its own
-- transactions: not inside a transaction block
CALL resilience.retry('COMMIT');
BEGIN;
CALL resilience.retry($$SELECT nextval('attempts')$$);
ROLLBACK;
SELECT last_value, is_called FROM attempts;
