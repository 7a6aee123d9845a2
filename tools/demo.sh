#!/usr/bin/env bash
# `make demo`: build and install resilience into a throwaway PostgreSQL, then
# walk through what it does, explaining each step. Nothing is left behind.
. "$(dirname "$0")/cluster.sh"

ensure_packages
build_and_install
start_cluster "resilience.database_names = 'postgres'" \
	"resilience.worker_naptime = '1s'" "resilience.reaper_interval = '5s'"

BOLD="" DIM="" PLAIN=""
if [ -t 1 ]; then BOLD=$'\033[1m' DIM=$'\033[2m' PLAIN=$'\033[0m'; fi
step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$PLAIN"; }
explain() { printf '%s\n' "$*" | fold -s -w 78; }
sql() {
	printf '%s\n' "$1" | sed "s/^/  ${DIM}sql> /; s/\$/${PLAIN}/"
	as_owner psql -X -v ON_ERROR_STOP=1 -P footer=off -c "$1" | sed 's/^/  /'
}

say
say "A throwaway PostgreSQL $PG_MAJOR is running in $WORK with"
say "shared_preload_libraries = 'resilience'."

step "1. Install the extension"
sql "CREATE EXTENSION resilience;"
explain "Everything lives in the schema resilience. Rate limits are kept in shared memory, so every connection of every application instance sees the same limits, and a decision costs about as much as SELECT 1."

step "2. A token bucket: 5 requests at once, then 1 per second"
explain "rate_limit(key, capacity, refill_per_sec) takes a token and says whether there was one. Seven quick calls: the first five pass, the last two are refused."
sql "SELECT i AS call, resilience.rate_limit('user:42', 5, 1) AS allowed FROM generate_series(1, 7) i;"
explain "rate_limit_check returns what an HTTP layer needs for its RateLimit and Retry-After headers: this caller may retry in about a second."
sql "SELECT * FROM resilience.rate_limit_check('user:42', 5, 1);"
sleep 2
explain "Two seconds later two tokens are back (refills are continuous and fractional, on the server's monotonic clock)."
sql "SELECT allowed, remaining FROM resilience.rate_limit_check('user:42', 5, 1, cost => 0);"

step "3. A sliding window: at most 3 calls in any 10 seconds"
sql "SELECT i AS call, resilience.window_limit('login:alice', 3, '10 seconds') AS allowed FROM generate_series(1, 4) i;"
explain "Unlike a fixed window, there is no burst at the window boundary: no 10-second interval ever holds more than 3 admitted calls."

step "4. Tiers live in data: named policies"
sql "INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec, description)
VALUES ('free', 2, 0.5, 'free tier'), ('pro', 100, 50, 'paid tier');"
sql "SELECT resilience.rate_limit('acct:7', 'free') AS free_1, resilience.rate_limit('acct:7', 'free') AS free_2,
       resilience.rate_limit('acct:7', 'free') AS free_3, resilience.rate_limit('acct:7', 'pro') AS pro_1;"
explain "Changing a row changes the limit for every connection at commit; no code change, no restart."

step "5. What is being limited right now"
sql "SELECT key, policy, kind, round(available::numeric, 2) AS available, \"limit\", allowed, denied FROM resilience.rate_limits ORDER BY key, policy;"

step "6. Background workers"
explain "A launcher keeps one worker per database listed in resilience.database_names. It waits until the extension exists, then runs its jobs (for now the reaper, which drops rate-limit keys whose state is worth nothing)."
as_owner psql -X -q -c "SELECT pg_sleep(1.5)" >/dev/null
sql "SELECT database, state, job, job_interval, runs, failures FROM resilience.workers;"

step "7. A clean restart keeps every bucket"
sql "SELECT allowed, remaining FROM resilience.rate_limit_check('user:99', 5, 0.001, cost => 4);"
explain "Restarting the server (the state is written to a file at shutdown and read at start)..."
as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$SERVER_LOG" -w restart >/dev/null
sql "SELECT allowed, remaining FROM resilience.rate_limit_check('user:99', 5, 0.001, cost => 0);"
explain "The bucket still holds the 1 token it had: a restart is not a way around a limit. (After a crash buckets start full; see docs/rate-limiting.md.)"

step "8. A circuit breaker shared by every connection"
explain "A dependency (a payments API, say) starts failing. Every application instance reports its calls to one breaker in shared memory; once half of the last 4 calls failed, the breaker opens for everyone and callers fail fast instead of waiting on timeouts."
sql "INSERT INTO resilience.breaker_config (name, window_size, minimum_calls, open_timeout, half_open_calls)
VALUES ('payments-api', 4, 4, '2 seconds', 1);"
sql "SELECT ok AS call_succeeded FROM unnest(array[true, false, false, true]) ok, resilience.breaker_record('payments-api', ok);
SELECT resilience.breaker_state('payments-api') AS state, resilience.breaker_allow('payments-api') AS may_call;"
explain "Two seconds later it lets one probe through (half_open); a successful probe closes it again."
sleep 2.1
sql "SELECT resilience.breaker_allow('payments-api') AS probe_allowed, resilience.breaker_state('payments-api') AS state;"
sql "SELECT resilience.breaker_state('payments-api') AS state FROM resilience.breaker_record('payments-api', true);"
explain "A bulkhead caps how many sessions use a dependency at once; the permit goes back when the transaction ends."
sql "SELECT resilience.bulkhead_acquire('reports', 2) AS got_permit;
SELECT name, in_use, max_concurrent FROM resilience.bulkheads WHERE name = 'reports';"

step "9. A lease with a fencing token"
explain "lock_acquire takes a named lease for a while and returns a fencing token. The guarded data remembers the newest token it accepted, so a holder whose lease ran out while it was paused cannot overwrite the work of the next holder. (The demo keeps each worker's token in a small table.)"
sql "CREATE TABLE accounts (id int PRIMARY KEY, balance int); INSERT INTO accounts VALUES (42, 100);
CREATE TABLE tokens (worker text, token bigint);"
sql "INSERT INTO tokens SELECT 'A', resilience.lock_acquire('account:42', '1 second', 'worker-A') RETURNING *;"
explain "worker-A now stalls (a long GC pause, say) for 1.5 seconds. Its lease expires, and worker-B takes it over with a newer token, then writes through the fence:"
sleep 1.5
sql "INSERT INTO tokens SELECT 'B', resilience.lock_acquire('account:42', '30 seconds', 'worker-B') RETURNING *;"
sql "UPDATE accounts SET balance = balance - 30
 WHERE id = 42 AND resilience.fence_check('account:42', (SELECT token FROM tokens WHERE worker = 'B'));"
explain "worker-A wakes up and tries its write with its old token: the fence refuses it, and the UPDATE changes nothing."
sql "UPDATE accounts SET balance = balance - 10
 WHERE id = 42 AND resilience.fence_check('account:42', (SELECT token FROM tokens WHERE worker = 'A'));"
sql "SELECT balance FROM accounts WHERE id = 42;"
sql "SELECT kind, name, owner, token, expires_at > now() AS held FROM resilience.locks;"

step "10. Idempotency keys: a retried request takes effect once"
explain "A client retries a payment after a timeout, sending the same Idempotency-Key. The handler asks idempotency_begin first. The first attempt may proceed: it makes the payment and stores its response in the same transaction, so both commit or neither does."
sql "CREATE TABLE payments (id serial PRIMARY KEY, amount int);"
sql "SELECT outcome FROM resilience.idempotency_begin('payments', 'key-123', '{\"amount\": 1000}');
INSERT INTO payments (amount) VALUES (1000);
SELECT resilience.idempotency_complete('payments', 'key-123', '{\"payment\": 1}', 201);"
explain "The retry gets the stored response (an HTTP layer answers it with Idempotent-Replayed: true); the same key with a different request is a mismatch (HTTP 422). One payment was made."
sql "SELECT * FROM resilience.idempotency_begin('payments', 'key-123', '{\"amount\": 1000}');"
sql "SELECT outcome FROM resilience.idempotency_begin('payments', 'key-123', '{\"amount\": 5}');"
sql "SELECT count(*) AS payments FROM payments;"
explain "idempotent() does it in one call: the statement runs once per key, and later calls return its result."
sql "SELECT resilience.idempotent('payments', 'key-456', '{\"amount\": 7}', 'INSERT INTO payments (amount) VALUES (7) RETURNING to_jsonb(id)') AS first_call,
       resilience.idempotent('payments', 'key-456', '{\"amount\": 7}', 'INSERT INTO payments (amount) VALUES (7) RETURNING to_jsonb(id)') AS retry;"
explain "Message consumers deduplicate with inbox_accept: true the first time, false for a redelivery."
sql "SELECT resilience.inbox_accept('billing', 'msg-1') AS first, resilience.inbox_accept('billing', 'msg-1') AS redelivered;"

step "11. A saga: book a trip, or undo it"
explain "A saga is a business transaction whose steps each commit on their own: book a flight, a hotel, a car. When a step fails for good, the steps that completed are undone by their compensations, in reverse order. Each step runs in its own transaction together with the saga's advance, as the role that defined the saga (never a superuser), driven by the background worker."
sql "CREATE SCHEMA travel;
CREATE TABLE travel.bookings (saga_id bigint, kind text, ref text, status text NOT NULL DEFAULT 'booked',
                              PRIMARY KEY (saga_id, kind));
CREATE TABLE travel.cars (city text PRIMARY KEY, available int NOT NULL);
INSERT INTO travel.cars VALUES ('Porto', 3), ('Lisbon', 0);
CREATE ROLE travel_agent NOLOGIN IN ROLE resilience_admin;
GRANT USAGE ON SCHEMA travel TO travel_agent;
GRANT SELECT, INSERT, UPDATE ON travel.bookings, travel.cars TO travel_agent;"
explain "Each step is a function f(saga_id, context) returning JSON that is merged into the saga's context. Booking a car fails when the city has none left."
sql "CREATE FUNCTION travel.book(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    INSERT INTO travel.bookings (saga_id, kind, ref)
    VALUES (saga_id, ctx #>> '{_saga,step}', upper(ctx #>> '{_saga,step}') || '-' || saga_id)
    RETURNING jsonb_build_object(kind, ref) \$\$;
CREATE FUNCTION travel.book_car(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    UPDATE travel.cars SET available = available - 1 WHERE city = ctx ->> 'city' AND available > 0;
    IF NOT FOUND THEN RAISE EXCEPTION 'no car available in %', ctx ->> 'city'; END IF;
    RETURN travel.book(saga_id, ctx);
END \$\$;
CREATE FUNCTION travel.cancel(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    UPDATE travel.bookings b SET status = 'cancelled'
     WHERE b.saga_id = cancel.saga_id AND b.kind = ctx #>> '{_saga,step}'
    RETURNING NULL::jsonb \$\$;"
explain "The saga is defined by the role its steps run as: travel_agent may touch the travel tables and nothing else."
sql "SET ROLE travel_agent;
SELECT resilience.saga_define('book_trip', '[
  {\"name\": \"flight\", \"action\": \"travel.book\",     \"compensation\": \"travel.cancel\"},
  {\"name\": \"hotel\",  \"action\": \"travel.book\",     \"compensation\": \"travel.cancel\"},
  {\"name\": \"car\",    \"action\": \"travel.book_car\", \"compensation\": \"travel.cancel\"}
]') AS version;"
explain "Ann travels to Porto, Bob to Lisbon, where no car is left. saga_start commits the saga and wakes the worker."
sql "SELECT resilience.saga_start('book_trip', '{\"traveller\": \"Ann\", \"city\": \"Porto\"}', 'trip-ann') AS ann,
       resilience.saga_start('book_trip', '{\"traveller\": \"Bob\", \"city\": \"Lisbon\"}', 'trip-bob') AS bob;"
as_owner psql -X -q -c "DO \$\$ BEGIN
	FOR i IN 1 .. 100 LOOP
		EXIT WHEN NOT EXISTS (SELECT FROM resilience.sagas WHERE state IN ('running', 'compensating'));
		PERFORM pg_sleep(0.1);
	END LOOP;
END \$\$" >/dev/null
sql "SELECT id, payload ->> 'traveller' AS traveller, state, context - 'traveller' - 'city' AS context
  FROM resilience.sagas ORDER BY id;"
explain "Ann's trip is booked. Bob's car failed, so his hotel and then his flight were cancelled:"
sql "SELECT * FROM travel.bookings ORDER BY saga_id, kind;"
explain "Every transition is a committed row: Bob's saga tells its whole story."
sql "SELECT event, step, attempt, state, error ->> 'message' AS error
  FROM resilience.saga_events WHERE saga_id = (SELECT id FROM resilience.sagas WHERE idempotency_key = 'trip-bob')
 ORDER BY id;"
explain "Starting a saga again with the same idempotency key returns the same saga instead of booking twice:"
sql "SELECT resilience.saga_start('book_trip', '{\"traveller\": \"Ann\", \"city\": \"Porto\"}', 'trip-ann') AS same_as_ann;"
explain "Steps can also be async (a command sent through the outbox, answered with saga_step_completed); failed steps are retried with backoff; a compensation that keeps failing parks the saga for a person, who fixes the cause and calls saga_retry. See docs/sagas.md."

step "12. An event stream with optimistic concurrency"
explain "append_events(stream, expected_version, events) appends only if the stream is still at the version the caller decided on (-1: it must not exist yet). Versions count from 0. stream_forward also publishes every appended event to the outbox, in the same transaction, for read models and other services."
sql "SELECT resilience.stream_forward('account-%', 'accounts.events');
SELECT resilience.append_events('account-42', -1, ARRAY[
  '{\"type\": \"Opened\", \"data\": {\"owner\": \"alice\"}}',
  '{\"type\": \"Deposited\", \"data\": {\"amount\": 100}}']::jsonb[]) AS version;"
explain "Two clerks both read version 1 and decide. The first append wins; the second is refused with SQLSTATE 40001 and the actual version, so it reads again and decides again:"
sql "SELECT resilience.append_events('account-42', 1, ARRAY['{\"type\": \"Withdrawn\", \"data\": {\"amount\": 30}}']::jsonb[]) AS version;"
sql "DO \$\$ DECLARE detail text; BEGIN
  PERFORM resilience.append_events('account-42', 1, ARRAY['{\"type\": \"Withdrawn\", \"data\": {\"amount\": 90}}']::jsonb[]);
EXCEPTION WHEN serialization_failure THEN
  GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
  RAISE NOTICE 'refused (40001): %', detail;
END \$\$;" 2>&1
sql "SELECT version, type, data FROM resilience.read_stream('account-42');"
explain "Only the appended events were forwarded, keyed by the stream so that consumers get them in version order:"
sql "SELECT key, payload ->> 'version' AS version, payload ->> 'type' AS type FROM resilience.outbox WHERE topic = 'accounts.events' ORDER BY seq;"

step "Done"
explain "Reference: docs/rate-limiting.md, docs/breakers.md, docs/bulkheads-and-retries.md, docs/locks.md, docs/idempotency.md, docs/sagas.md, docs/outbox.md, docs/event-streams.md and docs/operations.md. All tests: make test. Throughput against SELECT 1, plain SQL and Redis: make bench."
