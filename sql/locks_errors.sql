-- Bad input: a specific SQLSTATE, nothing changed.  Stale tokens are not
-- errors: they return false.
SELECT sqlstate_of($$SELECT resilience.lock_acquire(NULL, '1 minute')$$);
SELECT resilience.lock_acquire('', '1 minute');
SELECT resilience.lock_acquire(repeat('n', 256), '1 minute');
SELECT sqlstate_of($$SELECT resilience.lock_acquire(repeat('n', 255), '1 minute')$$);
SELECT sqlstate_of($$SELECT resilience.lock_acquire('bad:1', NULL)$$);
SELECT resilience.lock_acquire('bad:1', '0 seconds');
SELECT sqlstate_of($$SELECT resilience.lock_acquire('bad:1', '-1 minute')$$);
SELECT resilience.lock_acquire('bad:1', '8 days');
SELECT resilience.lock_acquire('bad:1', '1 minute', 'me', '-1 second');
SELECT sqlstate_of($$SELECT resilience.lock_acquire('bad:1', '1 minute', 'me', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.lock_acquire('bad:1', '1 minute', 'me', '2 days')$$);
SELECT sqlstate_of($$SELECT resilience.lock_acquire('bad:1', '1 minute', repeat('o', 256))$$);
SELECT resilience.lock_renew('bad:1', NULL, '1 minute');
SELECT sqlstate_of($$SELECT resilience.lock_renew('bad:1', 1, '0 s')$$);
SELECT sqlstate_of($$SELECT resilience.lock_release(NULL, 1)$$);
SELECT sqlstate_of($$SELECT resilience.lock_release('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.lock_check('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.fence(NULL, 1)$$);
SELECT sqlstate_of($$SELECT resilience.fence('', 1)$$);
SELECT sqlstate_of($$SELECT resilience.fence('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.fence_check('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.advisory_xact_lock(NULL)$$);
SELECT sqlstate_of($$SELECT resilience.advisory_lock('')$$);
SELECT sqlstate_of($$SELECT resilience.try_advisory_lock('bad:1', '-1 s')$$);
SELECT sqlstate_of($$SELECT resilience.try_advisory_lock('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.advisory_unlock(repeat('n', 256))$$);

-- Stale or unknown tokens: false, and the caller's transaction goes on.
BEGIN;
SELECT resilience.lock_release('bad:never', 12345) AS released,
       resilience.lock_renew('bad:never', 12345, '1 minute') AS renewed,
       resilience.lock_check('bad:never', 12345) AS holds;
SELECT 'still in the transaction' AS status;
COMMIT;

-- Nothing was created by the calls above.
SELECT count(*) FROM resilience.leases WHERE name LIKE 'bad:%';
SELECT count(*) FROM resilience.fences WHERE resource LIKE 'bad:%';
SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3;

-- Roles isolated from each other (docs/operations.md, "Roles and tenants"):
-- a lease name belongs to the role that took it; any other role gets 42501
-- (renew, release, check, acquire) and nothing changes.
CREATE ROLE regress_tenant_a NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_tenant_b NOLOGIN IN ROLE resilience_user;
SET ROLE regress_tenant_a;
SELECT resilience.lock_acquire('tenant:a', '1 hour', 'a-1') AS a_token \gset
SET ROLE regress_tenant_b;
SELECT resilience.lock_renew('tenant:a', :a_token, '7 days');
SELECT sqlstate_of(format('SELECT resilience.lock_release(%L, %s)', 'tenant:a', :a_token)) AS release,
       sqlstate_of(format('SELECT resilience.lock_check(%L, %s)', 'tenant:a', :a_token)) AS "check",
       sqlstate_of(format('SELECT resilience.lock_check(%L, %s)', 'tenant:a', :a_token + 1)) AS guess,
       sqlstate_of($$SELECT resilience.lock_acquire('tenant:a', '1 hour')$$) AS acquire;
RESET ROLE;
SELECT token = :a_token AS same_token, owner, owner_role, released_at IS NULL AS held,
       expires_at < now() + interval '2 hours' AS not_renewed
  FROM resilience.leases WHERE name = 'tenant:a';

-- A fence refuses a token that was never issued: it would pin the resource
-- for ever.
SELECT sqlstate_of($$SELECT resilience.fence('tenant:res', 9223372036854775807)$$) AS fence;
SELECT sqlstate_of($$SELECT resilience.fence_check('tenant:res', 9000000000000000000)$$) AS fence_check;
SELECT count(*) AS pinned FROM resilience.fences WHERE resource = 'tenant:res';
DELETE FROM resilience.leases WHERE name = 'tenant:a';
DROP ROLE regress_tenant_a;
DROP ROLE regress_tenant_b;
