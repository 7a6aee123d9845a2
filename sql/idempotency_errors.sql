-- Bad input gets a specific SQLSTATE and changes nothing.  Keys that must not
-- be created start with 'bad'; the last queries check that none was, and
-- that the keys set up here kept their state.
\set VERBOSITY default

SELECT outcome FROM resilience.idempotency_begin('e', 'done', '{}');
SELECT resilience.idempotency_complete('e', 'done', '{"r": 1}', 200);
SELECT outcome FROM resilience.idempotency_begin('e', 'failed', '{}');
SELECT resilience.idempotency_fail('e', 'failed', '{"e": 1}', false);
SELECT outcome FROM resilience.idempotency_begin('e', 'retry', '{}');
SELECT resilience.idempotency_fail('e', 'retry', '{"e": 2}', true);
SELECT outcome FROM resilience.idempotency_begin('e', 'started', '{}');
CREATE TEMP TABLE before AS SELECT * FROM resilience.idempotency_keys;

-- NULLs (22004)
SELECT resilience.idempotency_begin(NULL, 'bad', '{}');
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', NULL, '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', ttl => NULL)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', lock_timeout => NULL)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint(NULL, 'started', 'p')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('e', NULL, 'p')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('e', 'started', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete(NULL, 'started', '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('e', NULL, '{}')$$);
SELECT resilience.idempotency_fail('e', 'started', '{}', NULL);
SELECT sqlstate_of($$SELECT resilience.idempotency_fail(NULL, 'started', '{}', true)$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('e', 'bad', '{}', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.idempotent(NULL, 'bad', '{}', 'SELECT 1')$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('e', 'bad', NULL, 'SELECT 1')$$);
SELECT sqlstate_of($$SELECT resilience.inbox_accept(NULL, 'bad')$$);
SELECT sqlstate_of($$SELECT resilience.inbox_accept('bad', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.inbox_accept('bad', 'bad', NULL)$$);

-- empty or too long names (22023): at most 255 characters
SELECT resilience.idempotency_begin('e', '', '{}');
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('', 'bad', '{}')$$);
SELECT resilience.idempotency_begin('e', 'bad' || repeat('k', 253), '{}');
SELECT sqlstate_of($$SELECT resilience.idempotency_begin(repeat('s', 256), 'bad', '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad' || repeat('é', 253), '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('e', 'started', '')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('e', 'started', repeat('p', 256))$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('e', '', '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('e', '', '{}', 'SELECT 1')$$);
SELECT sqlstate_of($$SELECT resilience.inbox_accept('', 'bad')$$);
SELECT sqlstate_of($$SELECT resilience.inbox_accept('bad', repeat('m', 256))$$);

-- ttl and lock_timeout must be positive (22023)
SELECT resilience.idempotency_begin('e', 'bad', '{}', ttl => '0');
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', ttl => '-1 hour')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', ttl => '1 month -40 days')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', lock_timeout => '0')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', lock_timeout => '-1 s')$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('e', 'bad', '{}', 'SELECT 1', ttl => '0')$$);
SELECT sqlstate_of($$SELECT resilience.inbox_accept('bad', 'bad', '0')$$);
-- ... and end within the range of timestamptz (22008)
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('e', 'bad', '{}', ttl => '300000 years')$$);

-- status codes are HTTP's: 100 to 599 (22023)
SELECT resilience.idempotency_complete('e', 'started', '{}', 99);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('e', 'started', '{}', 600)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_fail('e', 'started', '{}', false, 1000)$$);

-- a key that was never begun (42704)
SELECT resilience.idempotency_complete('e', 'bad-never', '{}');
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('e', 'bad-never', 'p')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_fail('e', 'bad-never', '{}', true)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('other-scope', 'done', '{}')$$);

-- a key that is not in progress (55000)
SELECT resilience.idempotency_complete('e', 'done', '{}');
SELECT resilience.idempotency_checkpoint('e', 'retry', 'p');
SELECT sqlstate_of($$SELECT resilience.idempotency_fail('e', 'failed', '{}', true)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('e', 'failed', '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('e', 'done', 'p')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_fail('e', 'retry', '{}', false)$$);

-- idempotent(): another request under the key (22023), a key in progress in
-- another transaction (55P03), and a SQL error (which leaves nothing behind)
SELECT resilience.idempotent('e', 'done', '{"other": true}', 'SELECT 1');
SELECT resilience.idempotent('e', 'started', '{}', 'SELECT 1');
SELECT sqlstate_of($$SELECT resilience.idempotent('e', 'bad-sql', '{}', 'SELECT 1/0')$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('e', 'bad-sql', '{}', 'SELECT ''not json''')$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('e', 'bad-sql', '{}', 'no such statement')$$);

-- Nothing was created or changed by any of the calls above.
SELECT count(*) AS bad_keys FROM resilience.idempotency_keys WHERE key LIKE 'bad%' OR scope <> 'e';
SELECT count(*) AS bad_messages FROM resilience.inbox;
SELECT k.key, k.state
  FROM resilience.idempotency_keys k JOIN before b USING (scope, key)
 WHERE (k.*)::text IS DISTINCT FROM (b.*)::text;
SELECT key, state, response, error, status_code, recovery_point
  FROM resilience.idempotency_keys ORDER BY key;

-- Roles isolated from each other (docs/operations.md, "Roles and tenants"):
-- an inbox consumer belongs to the first role that uses it; another role
-- cannot accept (and so burn) its message ids: 42501, and nothing changes.
CREATE ROLE regress_tenant_a NOLOGIN IN ROLE resilience_user;
CREATE ROLE regress_tenant_b NOLOGIN IN ROLE resilience_user;
SET ROLE regress_tenant_a;
SELECT resilience.inbox_accept('tenant-inbox', 'm1') AS a_first;
SET ROLE regress_tenant_b;
SELECT resilience.inbox_accept('tenant-inbox', 'm2');
SET ROLE regress_tenant_a;
SELECT resilience.inbox_accept('tenant-inbox', 'm2') AS m2_still_new;
RESET ROLE;
SELECT kind, name, owner, declared FROM resilience.owners WHERE name = 'tenant-inbox';
DELETE FROM resilience.inbox WHERE consumer = 'tenant-inbox';
DELETE FROM resilience.owners WHERE name = 'tenant-inbox';

-- An idempotency key belongs to the role that began it: another role can
-- neither replay, answer, end nor resume it.  It gets 42501 before anything
-- about the key is told (no replay, mismatch, in_progress or state), and
-- nothing changes.
CREATE ROLE regress_tenant_a2 NOLOGIN IN ROLE regress_tenant_a;    -- a member of a
CREATE ROLE regress_tenant_ops NOLOGIN IN ROLE resilience_admin;
SET ROLE regress_tenant_a;
SELECT outcome FROM resilience.idempotency_begin('t', 'done', '{"n": 1}');
SELECT resilience.idempotency_complete('t', 'done', '{"secret": 1}', 201);
SELECT outcome FROM resilience.idempotency_begin('t', 'failed', '{"n": 2}');
SELECT resilience.idempotency_fail('t', 'failed', '{"secret": 2}', false, 402);
SELECT outcome FROM resilience.idempotency_begin('t', 'running', '{"n": 3}');
SELECT resilience.idempotency_checkpoint('t', 'running', 'phase-1');
SELECT outcome FROM resilience.idempotency_begin('t', 'lock-expired', '{"n": 4}', lock_timeout => '1 ms');
SELECT outcome FROM resilience.idempotency_begin('t', 'retry', '{"n": 5}');
SELECT resilience.idempotency_fail('t', 'retry', '{"e": 1}', true);
RESET ROLE;
SELECT pg_sleep(0.05);   -- the lock of 'lock-expired' has expired
SELECT key, state, owner_role FROM resilience.idempotency_keys WHERE scope = 't' ORDER BY key;
CREATE TEMP TABLE t_before AS SELECT * FROM resilience.idempotency_keys WHERE scope = 't';

SET ROLE regress_tenant_b;
-- a replay, with the request or another one (not told: a mismatch)
SELECT * FROM resilience.idempotency_begin('t', 'done', '{"n": 1}');
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('t', 'done', '{"n": 0}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('t', 'failed', '{"n": 2}')$$);
-- a key in progress (not told: in_progress), its lock expired, or retryable (no takeover)
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('t', 'running', '{"n": 3}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('t', 'running', '{"n": 0}')$$);
SELECT sqlstate_of($$SELECT resilience._idempotency_begin_wait('t', 'running', '{"n": 3}', '1 day', '1 s')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('t', 'lock-expired', '{"n": 4}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_begin('t', 'retry', '{"n": 5}')$$);
-- answering, ending or resuming another role's attempt
SELECT resilience.idempotency_complete('t', 'running', '{"forged": true}', 200);
SELECT sqlstate_of($$SELECT resilience.idempotency_fail('t', 'running', '{}', false)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_fail('t', 'lock-expired', '{}', true)$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('t', 'running', 'forged')$$);
-- ... nor learning the state of a key that is not in progress (not 55000)
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('t', 'done', '{}')$$);
SELECT sqlstate_of($$SELECT resilience.idempotency_checkpoint('t', 'retry', 'p')$$);
-- idempotent(): neither the stored response nor running the statement
SELECT sqlstate_of($$SELECT resilience.idempotent('t', 'done', '{"n": 1}', 'SELECT ''{"forged": 1}''::jsonb')$$);
SELECT sqlstate_of($$SELECT resilience.idempotent('t', 'retry', '{"n": 5}', 'SELECT ''{"forged": 2}''::jsonb')$$);
-- its own keys in the same scope work as before
SELECT outcome FROM resilience.idempotency_begin('t', 'b-own', '{}');
SELECT resilience.idempotency_complete('t', 'b-own', '{"mine": true}');
SELECT outcome, response FROM resilience.idempotency_begin('t', 'b-own', '{}');
RESET ROLE;
SELECT b.key AS changed_key
  FROM t_before b LEFT JOIN resilience.idempotency_keys k USING (scope, key)
 WHERE (k.*)::text IS DISTINCT FROM (b.*)::text;

-- A member of the owner role acts for it, and the key stays the owner's.
SET ROLE regress_tenant_a2;
SELECT outcome, response, status_code FROM resilience.idempotency_begin('t', 'done', '{"n": 1}');
SELECT outcome FROM resilience.idempotency_begin('t', 'done', '{"n": 0}');
SELECT outcome FROM resilience.idempotency_begin('t', 'running', '{"n": 3}');
SELECT resilience.idempotency_checkpoint('t', 'running', 'phase-2');
SELECT resilience.idempotency_complete('t', 'running', '{"by": "member"}', 200);
SELECT outcome, recovery_point FROM resilience.idempotency_begin('t', 'lock-expired', '{"n": 4}');
SELECT resilience.idempotency_fail('t', 'lock-expired', '{"by": "member"}', false);
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('t', 'done', '{}')$$);
-- so does a member of resilience_admin
SET ROLE regress_tenant_ops;
SELECT outcome FROM resilience.idempotency_begin('t', 'retry', '{"n": 5}');
SELECT resilience.idempotency_complete('t', 'retry', '{"by": "admin"}');
SELECT outcome, response FROM resilience.idempotency_begin('t', 'failed', '{"n": 2}');
SELECT resilience.idempotent('t', 'retry', '{"n": 5}', 'SELECT ''{"never": "run"}''::jsonb');
RESET ROLE;
SELECT key, state, response, error, attempts, owner_role
  FROM resilience.idempotency_keys WHERE scope = 't' ORDER BY key;

-- A dead key (expired) is absent for every role, as after the reaper: the
-- next role to begin it starts it afresh, and owns it.
SET ROLE regress_tenant_a;
SELECT outcome FROM resilience.idempotency_begin('t', 'expired', '{"n": 6}', ttl => '1 ms');
SELECT resilience.idempotency_complete('t', 'expired', '{"secret": 6}');
SELECT pg_sleep(0.05);
SET ROLE regress_tenant_b;
SELECT * FROM resilience.idempotency_begin('t', 'expired', '{"n": 6}');
RESET ROLE;
SELECT state, response, attempts, owner_role FROM resilience.idempotency_keys
 WHERE scope = 't' AND key = 'expired';

-- Keys from 0.1 have no owner: any role may act on them; the first begin
-- that resumes one records its caller as the owner.
SELECT outcome FROM resilience.idempotency_begin('t', 'old-done', '{}');
SELECT resilience.idempotency_complete('t', 'old-done', '{"old": 1}');
SELECT outcome FROM resilience.idempotency_begin('t', 'old-open', '{}');
SELECT outcome FROM resilience.idempotency_begin('t', 'old-retry', '{}');
SELECT resilience.idempotency_fail('t', 'old-retry', '{}', true);
UPDATE resilience.idempotency_keys SET owner_role = NULL WHERE scope = 't' AND key LIKE 'old-%';
SET ROLE regress_tenant_b;
SELECT outcome, response FROM resilience.idempotency_begin('t', 'old-done', '{}');
SELECT resilience.idempotency_checkpoint('t', 'old-open', 'p');
SELECT resilience.idempotency_complete('t', 'old-open', '{"by": "b"}');
SELECT outcome FROM resilience.idempotency_begin('t', 'old-retry', '{}');
SET ROLE regress_tenant_a;
SELECT outcome, response FROM resilience.idempotency_begin('t', 'old-open', '{}');
SELECT sqlstate_of($$SELECT resilience.idempotency_complete('t', 'old-retry', '{}')$$);
RESET ROLE;
SELECT key, state, response, owner_role FROM resilience.idempotency_keys
 WHERE scope = 't' AND key LIKE 'old-%' ORDER BY key;

DELETE FROM resilience.idempotency_keys WHERE scope = 't';
DROP ROLE regress_tenant_a2;
DROP ROLE regress_tenant_ops;
DROP ROLE regress_tenant_a;
DROP ROLE regress_tenant_b;
