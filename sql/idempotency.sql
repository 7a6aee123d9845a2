-- Idempotency keys and the inbox: the SQL contract.  Time-dependent steps use
-- lock_timeout or ttl of a millisecond and a sleep many times longer.

-- What a key's row holds, without the times that change from run to run.
CREATE FUNCTION pg_temp.key_row(s text, k text)
RETURNS TABLE (state text, recovery_point text, response jsonb, status_code int,
               error jsonb, attempts int, locked boolean)
LANGUAGE sql AS $$
    SELECT state, recovery_point, response, status_code, error, attempts,
           locked_until > clock_timestamp()
      FROM resilience.idempotency_keys WHERE scope = s AND key = k
$$;

-- A new key proceeds, from no recovery point.
SELECT * FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 100, "currency": "eur"}');
SELECT * FROM pg_temp.key_row('pay', 'k1');

-- While it is in progress, a retry is told so (HTTP 409) ...
SELECT * FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 100, "currency": "eur"}');
-- ... also when the same JSON is written differently (fingerprints are of
-- jsonb's canonical text: key order and whitespace do not matter) ...
SELECT outcome FROM resilience.idempotency_begin('pay', 'k1', '{ "currency":"eur",  "amount":100 }');
-- ... and a different request under the same key is a mismatch (HTTP 422).
SELECT * FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 999, "currency": "eur"}');
SELECT outcome FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 100.0, "currency": "eur"}');

-- A checkpoint records the phase reached and renews the lock.
SELECT locked_until AS lock_before FROM resilience.idempotency_keys WHERE key = 'k1' \gset
SELECT resilience.idempotency_checkpoint('pay', 'k1', 'charged');
SELECT recovery_point, locked_until > :'lock_before' AS renewed
  FROM resilience.idempotency_keys WHERE key = 'k1';

-- Completing stores the response; every retry replays it.
SELECT resilience.idempotency_complete('pay', 'k1', '{"charge": "ch_1"}', 201);
SELECT * FROM pg_temp.key_row('pay', 'k1');
SELECT * FROM resilience.idempotency_begin('pay', 'k1', '{"currency": "eur", "amount": 100}');
SELECT * FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 1, "currency": "eur"}');

-- Scopes are separate key spaces.
SELECT outcome FROM resilience.idempotency_begin('refund', 'k1', '{}');

-- A retryable failure is not cached: the next attempt proceeds, from the
-- last checkpoint.
SELECT outcome FROM resilience.idempotency_begin('pay', 'k2', '{"amount": 5}');
SELECT resilience.idempotency_checkpoint('pay', 'k2', 'reserved');
SELECT resilience.idempotency_fail('pay', 'k2', '{"error": "gateway timeout"}', retryable => true);
SELECT * FROM pg_temp.key_row('pay', 'k2');
SELECT * FROM resilience.idempotency_begin('pay', 'k2', '{"amount": 5}');
SELECT * FROM pg_temp.key_row('pay', 'k2');
SELECT resilience.idempotency_complete('pay', 'k2', '{"charge": "ch_2"}', 200);

-- A failure that is not retryable is stored and replayed, with its status.
SELECT outcome FROM resilience.idempotency_begin('pay', 'k3', '{"amount": 7}');
SELECT resilience.idempotency_fail('pay', 'k3', '{"error": "card declined"}', false, 402);
SELECT * FROM resilience.idempotency_begin('pay', 'k3', '{"amount": 7}');
SELECT * FROM pg_temp.key_row('pay', 'k3');

-- An attempt whose lock expired (its backend died, or it took too long) is
-- taken over by the next one, from the last checkpoint.
SELECT outcome FROM resilience.idempotency_begin('pay', 'k4', '{"amount": 9}', lock_timeout => '1 ms');
SELECT resilience.idempotency_checkpoint('pay', 'k4', 'charged');
SELECT pg_sleep(0.05);
SELECT * FROM resilience.idempotency_begin('pay', 'k4', '{"amount": 9}');
SELECT * FROM pg_temp.key_row('pay', 'k4');
-- ... but not with another request.
SELECT outcome FROM resilience.idempotency_begin('pay', 'k4', '{"amount": 10}');

-- After its ttl a finished key is forgotten: the key may be used afresh,
-- for any request.
SELECT outcome FROM resilience.idempotency_begin('pay', 'k5', '{"v": 1}', ttl => '1 ms');
SELECT resilience.idempotency_complete('pay', 'k5', '{"done": 1}', 200);
SELECT pg_sleep(0.05);
SELECT * FROM resilience.idempotency_begin('pay', 'k5', '{"v": 2}');
SELECT * FROM pg_temp.key_row('pay', 'k5');
-- A started key past its ttl is still in progress while its lock holds.
SELECT outcome FROM resilience.idempotency_begin('pay', 'k6', '{}', ttl => '1 ms', lock_timeout => '1 hour');
SELECT pg_sleep(0.05);
SELECT outcome FROM resilience.idempotency_begin('pay', 'k6', '{}');

-- The key and the business effect commit together: a rollback forgets both.
CREATE TABLE charges (id serial, amount int);
BEGIN;
SELECT outcome FROM resilience.idempotency_begin('pay', 'k7', '{"amount": 3}');
INSERT INTO charges (amount) VALUES (3);
SELECT resilience.idempotency_complete('pay', 'k7', '{"ok": true}', 201);
ROLLBACK;
SELECT count(*) AS keys FROM resilience.idempotency_keys WHERE key = 'k7';
SELECT count(*) AS charges FROM charges;
-- In one transaction: begin, effect, complete, and a replay.
BEGIN;
SELECT outcome FROM resilience.idempotency_begin('pay', 'k7', '{"amount": 3}');
INSERT INTO charges (amount) VALUES (3);
SELECT resilience.idempotency_complete('pay', 'k7', '{"ok": true}', 201);
SELECT outcome, response FROM resilience.idempotency_begin('pay', 'k7', '{"amount": 3}');
COMMIT;
SELECT count(*) AS charges FROM charges;

-- Keys up to 255 characters, counted as characters.
SELECT outcome FROM resilience.idempotency_begin('pay', repeat('k', 255), '{}');
SELECT outcome FROM resilience.idempotency_begin(repeat('s', 255), repeat('é', 255), '{}');

-- idempotent(): runs its SQL once per key, replays the result afterwards.
SELECT resilience.idempotent('orders', 'o1', '{"item": "book"}',
    $$INSERT INTO charges (amount) VALUES (42) RETURNING jsonb_build_object('charge', id, 'amount', amount)$$);
SELECT resilience.idempotent('orders', 'o1', '{"item": "book"}',
    $$INSERT INTO charges (amount) VALUES (42) RETURNING jsonb_build_object('charge', id, 'amount', amount)$$);
SELECT count(*) AS charges_of_42 FROM charges WHERE amount = 42;
SELECT * FROM pg_temp.key_row('orders', 'o1');
-- The SQL's result may be NULL (no row), and is replayed as such.
SELECT resilience.idempotent('orders', 'o2', '{}', $$SELECT jsonb_build_object('x', 1) WHERE false$$) IS NULL AS is_null;
SELECT outcome, response IS NULL AS response_is_null FROM resilience.idempotency_begin('orders', 'o2', '{}');
-- Results are cast to jsonb.
SELECT resilience.idempotent('orders', 'o3', '{}', $$SELECT 7$$);

-- inbox_accept(): true the first time a consumer sees a message.
SELECT resilience.inbox_accept('billing', 'msg-1') AS first,
       resilience.inbox_accept('billing', 'msg-1') AS again,
       resilience.inbox_accept('shipping', 'msg-1') AS other_consumer;
BEGIN;
SELECT resilience.inbox_accept('billing', 'msg-2');
ROLLBACK;
SELECT resilience.inbox_accept('billing', 'msg-2') AS after_rollback;
-- After its ttl a message id is new again.
SELECT resilience.inbox_accept('billing', 'msg-3', '1 ms');
SELECT pg_sleep(0.05);
SELECT resilience.inbox_accept('billing', 'msg-3') AS after_ttl;

-- The reaper removes what has expired, in bounded batches, and nothing else.
SELECT count(*) FROM generate_series(1, 5) i,
  LATERAL resilience.idempotency_begin('reap', 'done' || i, '{}', ttl => '1 ms') b,
  LATERAL resilience.idempotency_complete('reap', 'done' || i, '{}') c;
SELECT outcome FROM resilience.idempotency_begin('reap', 'abandoned', '{}', ttl => '1 ms', lock_timeout => '1 ms');
SELECT outcome FROM resilience.idempotency_begin('reap', 'working', '{}', ttl => '1 ms', lock_timeout => '1 hour');
SELECT outcome FROM resilience.idempotency_begin('reap', 'fresh', '{}');
SELECT count(*) FROM generate_series(1, 3) i, LATERAL resilience.inbox_accept('reap', 'm' || i, '1 ms');
SELECT resilience.inbox_accept('reap', 'fresh');
SELECT pg_sleep(0.05);
SET resilience.reaper_batch_size = 2;
SET resilience.reaper_max_batches = 2;
SELECT * FROM resilience.run_reaper() WHERE item IN ('idempotency_keys', 'inbox');
SELECT * FROM resilience.run_reaper() WHERE item IN ('idempotency_keys', 'inbox');
SELECT * FROM resilience.run_reaper() WHERE item IN ('idempotency_keys', 'inbox');
RESET resilience.reaper_batch_size;
RESET resilience.reaper_max_batches;
SELECT key, state FROM resilience.idempotency_keys WHERE scope = 'reap' ORDER BY key;
SELECT message_id FROM resilience.inbox WHERE consumer = 'reap' ORDER BY message_id;
-- k5 and msg-3 expired once too, but were used afresh since: they stay.
SELECT count(*) FROM resilience.idempotency_keys WHERE scope = 'pay' AND key = 'k5';
SELECT count(*) FROM resilience.inbox WHERE message_id = 'msg-3';

DROP TABLE charges;

-- Leave the tables empty for the next test.
DELETE FROM resilience.idempotency_keys;
DELETE FROM resilience.inbox;
