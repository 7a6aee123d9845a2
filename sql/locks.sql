-- Lease locks: the token, renewal, release, takeover after expiry.
SELECT resilience.lock_acquire('job:nightly', '1 minute', 'worker-a') AS t1 \gset
SELECT :t1 > 0 AS got_a_token;
-- Held: a second acquirer gets NULL at once (wait defaults to 0).
SELECT resilience.lock_acquire('job:nightly', '1 minute', 'worker-b') IS NULL AS refused;
SELECT resilience.lock_check('job:nightly', :t1) AS holds;
SELECT resilience.lock_check('job:nightly', :t1 - 1) AS other_token_holds;
-- Renewal keeps the token; release frees the lease.
SELECT resilience.lock_renew('job:nightly', :t1, '2 minutes') AS renewed;
SELECT token = :t1 AS same_token, owner, expires_at > now() + interval '90 seconds' AS extended
  FROM resilience.leases WHERE name = 'job:nightly';
SELECT resilience.lock_release('job:nightly', :t1) AS released;
SELECT resilience.lock_release('job:nightly', :t1) AS released_twice;
SELECT resilience.lock_renew('job:nightly', :t1, '1 minute') AS renew_after_release;
SELECT resilience.lock_check('job:nightly', :t1) AS holds_after_release;
-- The next holder gets a newer token.
SELECT resilience.lock_acquire('job:nightly', '1 minute', 'worker-b') AS t2 \gset
SELECT :t2 > :t1 AS newer_token;
-- A stale token never releases or renews the lease of another holder.
SELECT resilience.lock_release('job:nightly', :t1) AS stale_release,
       resilience.lock_renew('job:nightly', :t1, '1 minute') AS stale_renew,
       resilience.lock_check('job:nightly', :t2) AS new_holder_still_holds;
-- A read-only transaction may check a lease, not take, renew or release one.
\set VERBOSITY terse
BEGIN READ ONLY;
SELECT resilience.lock_check('job:nightly', :t2) AS holds_read_only;
SELECT resilience.lock_release('job:nightly', :t2);
ROLLBACK;
BEGIN READ ONLY;
SELECT resilience.lock_renew('job:nightly', :t2, '1 minute');
ROLLBACK;
\set VERBOSITY default
SELECT resilience.lock_check('job:nightly', :t2) AS still_holds;

-- An expired lease is taken over at once, with a new token.
SELECT resilience.lock_acquire('job:short', '50 milliseconds', 'worker-a') AS t3 \gset
SELECT pg_sleep(0.1);
SELECT resilience.lock_check('job:short', :t3) AS expired_lease_holds;
SELECT resilience.lock_renew('job:short', :t3, '1 minute') AS renew_expired;
SELECT resilience.lock_acquire('job:short', '1 minute', 'worker-b') AS t4 \gset
SELECT :t4 > :t3 AS takeover_token_newer;

-- Waiting: the acquirer waits for the holder's lease to expire, no longer.
SELECT resilience.lock_acquire('job:wait', '300 milliseconds', 'worker-a') IS NOT NULL AS held;
SELECT clock_timestamp() AS before \gset
SELECT resilience.lock_acquire('job:wait', '1 minute', 'worker-b', wait => '5 seconds') IS NOT NULL AS got_after_expiry;
SELECT clock_timestamp() - :'before'::timestamptz BETWEEN interval '150 milliseconds' AND interval '4 seconds' AS waited_for_expiry;
-- ...and gives up after its wait.
SELECT clock_timestamp() AS before \gset
SELECT resilience.lock_acquire('job:wait', '1 minute', 'worker-c', wait => '200 milliseconds') IS NULL AS gave_up;
SELECT clock_timestamp() - :'before'::timestamptz >= interval '190 milliseconds' AS waited_the_wait;

-- Waiting honours statement_timeout (and cancellation); no waiter is left behind.
SELECT resilience.lock_acquire('job:timeout', '1 minute', 'holder') IS NOT NULL AS held;
SET statement_timeout = '200ms';
SELECT resilience.lock_acquire('job:timeout', '1 minute', 'waiter', wait => '10 seconds');
RESET statement_timeout;
SELECT waiters FROM resilience.locks WHERE name = 'job:timeout';

-- The default owner names the application and backend.
SET application_name = 'billing';
SELECT resilience.lock_acquire('job:owner', '1 minute') IS NOT NULL AS held;
SELECT owner = 'billing/' || pg_backend_pid() AS default_owner FROM resilience.leases WHERE name = 'job:owner';
RESET application_name;

-- Fencing: the resource remembers the newest token and refuses older ones.
-- (tokens up to 14 exist: fence refuses a token never issued)
SELECT setval('resilience.fencing_tokens', greatest(last_value, 14)) >= 14 AS issued FROM resilience.fencing_tokens;
SELECT resilience.fence('account:42', 10);
SELECT resilience.fence('account:42', 10);   -- the same holder may write again
SELECT resilience.fence('account:42', 12);
SELECT resilience.fence('account:42', 11);
SELECT token FROM resilience.fences WHERE resource = 'account:42';
SELECT resilience.fence_check('account:42', 11) AS stale_ok, resilience.fence_check('account:42', 13) AS newer_ok;
-- The documented pattern: a fenced UPDATE changes nothing for a stale token.
CREATE TABLE accounts (id int PRIMARY KEY, balance int);
INSERT INTO accounts VALUES (42, 100);
UPDATE accounts SET balance = balance - 10 WHERE id = 42 AND resilience.fence_check('account:42', 12);
UPDATE accounts SET balance = balance - 10 WHERE id = 42 AND resilience.fence_check('account:42', 14);
SELECT balance FROM accounts WHERE id = 42;
-- fence raises RS001, catchable by its SQLSTATE.
DO $$
BEGIN
    PERFORM resilience.fence('account:42', 1);
EXCEPTION WHEN SQLSTATE 'RS001' THEN
    RAISE NOTICE 'stale token refused: %', SQLERRM;
END $$;

-- Advisory helpers: tokens from the same source, released as documented.
BEGIN;
SELECT resilience.advisory_xact_lock('report:daily') > :t4 AS xact_token_newer;
SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3
   AND (classid::bigint << 32 | objid::bigint) = resilience.lock_key('report:daily');
COMMIT;
SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3;
SELECT resilience.advisory_lock('report:weekly') IS NOT NULL AS session_lock;
SELECT resilience.try_advisory_lock('report:weekly') IS NOT NULL AS reentrant;
SELECT resilience.advisory_unlock('report:weekly'), resilience.advisory_unlock('report:weekly'),
       resilience.advisory_unlock('report:weekly') AS not_held_any_more;
-- The helpers' key space is apart from the application's own advisory locks.
SELECT pg_advisory_lock(resilience.lock_key('report:weekly'));
SELECT resilience.try_advisory_lock('report:weekly') IS NOT NULL AS not_blocked_by_app_lock;
SELECT resilience.advisory_unlock('report:weekly'), pg_advisory_unlock(resilience.lock_key('report:weekly'));
-- 64-bit keys: no collision among 200,000 names (hashtext's 32 bits would have several).
SELECT count(DISTINCT resilience.lock_key('name:' || i)) AS distinct_keys,
       count(DISTINCT hashtext('name:' || i)) AS distinct_hashtext
  FROM generate_series(1, 200000) i;

-- The view: held leases and helper locks, by name.
SELECT resilience.advisory_lock('report:monthly') IS NOT NULL AS locked;
SELECT kind, name, regexp_replace(owner, '/[0-9]+$', '/<pid>') AS owner, waiters, pid = pg_backend_pid() AS mine
  FROM resilience.locks ORDER BY kind, name;
SELECT resilience.advisory_unlock('report:monthly');

-- Tokens strictly increase across every kind of acquisition.
SELECT bool_and(t > prev) AS strictly_increasing FROM (
  SELECT t, lag(t) OVER (ORDER BY i) AS prev FROM (
    SELECT i, CASE i % 3
                WHEN 0 THEN resilience.lock_acquire('seq:' || i, '1 second')
                WHEN 1 THEN resilience.advisory_xact_lock('seq:' || i)
                ELSE resilience.try_advisory_lock('seq:' || i) END AS t
      FROM generate_series(1, 30) i) s) s2 WHERE prev IS NOT NULL;
SELECT pg_advisory_unlock_all();

-- The reaper removes long-expired leases only.
UPDATE resilience.leases SET expires_at = clock_timestamp() - interval '2 hours' WHERE name LIKE 'seq:%';
SELECT removed FROM resilience.run_reaper() WHERE item = 'leases';
SELECT count(*) AS left_behind FROM resilience.leases WHERE name LIKE 'seq:%';
SELECT count(*) > 0 AS others_kept FROM resilience.leases WHERE name LIKE 'job:%';
