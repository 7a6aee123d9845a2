-- Bulkheads: permits held until the end of the transaction (or of the
-- session), refusals, timeouts, and bad input.
\set VERBOSITY default
CREATE VIEW public.bh AS
    SELECT name, max_concurrent, in_use, waiting, acquired, rejected, timed_out
      FROM resilience.bulkheads WHERE name LIKE 'bh:%' ORDER BY name;

-- Two permits; the third caller is refused at once (max_wait defaults to 0).
BEGIN;
SELECT resilience.bulkhead_acquire('bh:db', 2) FROM generate_series(1, 3);
SELECT * FROM bh;
-- a wait that nobody ends times out (this session holds both permits)
SELECT resilience.bulkhead_acquire('bh:db', 2, '50 ms');
SELECT * FROM bh;
COMMIT;
-- commit gave both permits back
SELECT * FROM bh;

-- Abort gives them back too.
BEGIN;
SELECT resilience.bulkhead_acquire('bh:db', 2);
SELECT in_use FROM bh;
ROLLBACK;
SELECT in_use FROM bh;
BEGIN;
SELECT resilience.bulkhead_acquire('bh:db', 2);
SELECT 1 / 0;
ROLLBACK;
SELECT in_use FROM bh;

-- A permit taken in a subtransaction that aborts is given back then, like a
-- lock; one taken in a subtransaction that commits stays with the transaction.
BEGIN;
SELECT resilience.bulkhead_acquire('bh:db', 2);
SAVEPOINT a;
SELECT resilience.bulkhead_acquire('bh:db', 2);
SELECT in_use FROM bh;
ROLLBACK TO a;
SELECT in_use FROM bh;
SAVEPOINT b;
SELECT resilience.bulkhead_acquire('bh:db', 2);
RELEASE b;
SELECT in_use FROM bh;
COMMIT;
SELECT in_use FROM bh;
-- ... and the same through a PL/pgSQL exception block
DO $$
BEGIN
    BEGIN
        PERFORM resilience.bulkhead_acquire('bh:db', 2);
        RAISE EXCEPTION 'fails after taking a permit';
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'caught; in use: %', (SELECT in_use FROM resilience.bulkheads WHERE name = 'bh:db');
    END;
END
$$;

-- Session permits outlive transactions until bulkhead_release.
SELECT resilience.bulkhead_acquire_session('bh:session', 1);
SELECT resilience.bulkhead_acquire_session('bh:session', 1);   -- the only permit is taken
SELECT in_use FROM bh WHERE name = 'bh:session';
BEGIN;
SELECT resilience.bulkhead_acquire('bh:session', 2);   -- room for a transaction permit
ROLLBACK;
SELECT in_use FROM bh WHERE name = 'bh:session';
SELECT resilience.bulkhead_release('bh:session');
SELECT in_use FROM bh WHERE name = 'bh:session';
-- a session releases only the session permits it holds (with a warning)
SELECT resilience.bulkhead_release('bh:session');
BEGIN;
SELECT resilience.bulkhead_acquire('bh:session', 1);
SELECT resilience.bulkhead_release('bh:session');      -- not a session permit
SELECT in_use FROM bh WHERE name = 'bh:session';
COMMIT;
SELECT resilience.bulkhead_release('bh:never-used');

-- max_queue 0: never wait, even with a max_wait.
BEGIN;
SELECT resilience.bulkhead_acquire('bh:queue', 1);
SELECT resilience.bulkhead_acquire('bh:queue', 1, '10 s', 0);
COMMIT;
SELECT * FROM bh WHERE name = 'bh:queue';

-- max_concurrent is the latest caller's: lowering it leaves holders alone.
BEGIN;
SELECT resilience.bulkhead_acquire('bh:resize', 3), resilience.bulkhead_acquire('bh:resize', 3);
SELECT resilience.bulkhead_acquire('bh:resize', 1);
SELECT max_concurrent, in_use FROM bh WHERE name = 'bh:resize';
COMMIT;
SELECT max_concurrent, in_use FROM bh WHERE name = 'bh:resize';

-- run_reaper removes bulkheads nobody holds or waits for, once unused for a run.
SELECT resilience.bulkhead_acquire_session('bh:held', 1);
SELECT item FROM resilience.run_reaper() WHERE item = 'bulkheads';   -- clears the "used" marks
SELECT item FROM resilience.run_reaper() WHERE item = 'bulkheads';   -- removes what was idle since
SELECT name, in_use FROM bh;
SELECT resilience.bulkhead_release('bh:held');

-- Bad input: a specific SQLSTATE, and nothing taken.
SELECT resilience.bulkhead_acquire(NULL, 1);
SELECT sqlstate_of($$SELECT resilience.bulkhead_acquire('bh:bad', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.bulkhead_acquire('bh:bad', 1, NULL)$$);
SELECT sqlstate_of($$SELECT resilience.bulkhead_acquire_session(NULL, 1)$$);
SELECT sqlstate_of($$SELECT resilience.bulkhead_release(NULL)$$);
SELECT resilience.bulkhead_acquire('', 1);
SELECT sqlstate_of($$SELECT resilience.bulkhead_acquire(repeat('b', 64), 1)$$);
SELECT sqlstate_of($$SELECT resilience.bulkhead_release('')$$);
SELECT resilience.bulkhead_acquire('bh:bad', 0);
SELECT sqlstate_of($$SELECT resilience.bulkhead_acquire_session('bh:bad', -1)$$);
SELECT resilience.bulkhead_acquire('bh:bad', 1, '-1 s');
SELECT sqlstate_of($$SELECT resilience.bulkhead_acquire('bh:bad', 1, '400 days')$$);
SELECT resilience.bulkhead_acquire('bh:bad', 1, '1 s', -1);
SELECT count(*) FROM resilience.bulkheads WHERE name = 'bh:bad' OR name LIKE 'bbb%';
