#!/usr/bin/env bash
# `make bench`: throughput of resilience.rate_limit side by side with SELECT 1,
# a PL/pgSQL token bucket over a logged and an unlogged table, and a Redis
# token bucket in Lua, all measured in this one run with the same client count.
# Prints a table of throughputs and ratios against the targets of issue 2.
# Performance is reported, not asserted: exits 0 whenever the runs succeed.
#   BENCH_SECONDS=10   length of each run
#   BENCH_SECTIONS="ratelimit locks idempotency breakers sagas outbox amqp events schedules quota webhooks citus"   which comparisons to run (citus: PostgreSQL 16+ only)
#   BENCH_SCHEDULES=5000   the schedules section's schedules (see bench/schedules.sh)
#   BENCH_SAGA_BACKLOG=20000   the sagas section's backlog (see bench/sagas.sh)
#   BENCH_ROUNDS=1     repeat every section's runs, taking turns, and average:
#                      other work on a shared machine then weighs on both
#                      sides of a ratio alike
#   BENCH_OUTBOX_MINUTES=10   the outbox section's sustained run (see bench/outbox.sh)
#   BENCH_AMQP_EVENTS=50000   the amqp section's backlog (see bench/amqp.sh)
#   KEEP_WORK=1        keep $WORK (raw pgbench/redis-benchmark outputs in $WORK/bench)
. "$(dirname "$0")/../tools/cluster.sh"
. "$(dirname "$0")/sagas.sh"
. "$(dirname "$0")/outbox.sh"
. "$(dirname "$0")/amqp.sh"
. "$(dirname "$0")/redis.sh"
. "$(dirname "$0")/schedules.sh"
. "$(dirname "$0")/quota.sh"
. "$(dirname "$0")/webhooks.sh"
. "$(dirname "$0")/events.sh"
. "$(dirname "$0")/citus.sh"

BENCH_DIR="$SRC_DIR/bench"
DURATION=${BENCH_SECONDS:-10}
CLIENTS=8
THREADS=2	# pgbench -j
# A huge bucket: every call is admitted, so each one does the same work.
CAPACITY=1000000
REFILL=1000000
COST=1
NKEYS=100000

# cluster.sh's cleanup stops the cluster and exits with the status it sees:
# stop Redis first, then hand it our exit status.
bench_cleanup() {
	local rc=$?
	set +e
	stop_receiver
	stop_fast_receiver
	stop_broker
	stop_redis
	stop_citus_nodes
	(exit "$rc")
	cleanup
}
trap bench_cleanup EXIT

declare -A SUM RUNS LABEL
ORDER=()

# record id label value: add one measurement (averaged over the rounds).
record() {
	if [ -z "${RUNS[$1]:-}" ]; then
		ORDER+=("$1")
		LABEL[$1]=$2
		SUM[$1]=0
		RUNS[$1]=0
	fi
	SUM[$1]=$(awk -v a="${SUM[$1]}" -v b="$3" 'BEGIN { print a + b }')
	RUNS[$1]=$((RUNS[$1] + 1))
}

tput() { awk -v s="${SUM[$1]}" -v n="${RUNS[$1]}" 'BEGIN { print s / n }'; }

# run_pgbench id label script: one pgbench run; records its tps.
run_pgbench() {
	local id=$1 out="$OUT/$1.txt"
	say "-- $2: pgbench -f bench/$3"
	if ! pgbench -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$DURATION" \
		-f "$BENCH_DIR/$3" >"$out" 2>&1; then
		cat "$out"
		die "pgbench $id failed"
	fi
	# pgbench counts SQL errors as failed transactions; any would void the run.
	grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out"; die "pgbench $id had failures"; }
	record "$id" "$2" "$(awk '/^tps = /{ print $3; exit }' "$out")"
}

# redis_rps out requests args...: one redis-benchmark run, prints requests/s.
# One client thread (the default): on 2 cores it beat --threads 2 for Redis.
redis_rps() {
	local out=$1 n=$2
	shift 2
	redis-benchmark -s "$REDIS_SOCK" -c "$CLIENTS" -n "$n" --csv "$@" \
		>"$out" 2>&1 || { cat "$out"; die "redis-benchmark failed"; }
	# An error reply would be "counted" as a request: refuse the run instead.
	! grep -qi 'error' "$out" || { cat "$out"; die "redis-benchmark got errors"; }
	awk -F'"' '$2 != "test" && $4 != "" { print $4; exit }' "$out"
}

# run_redis id label args...: a probe run of about a second sizes the real
# one so that it lasts about $DURATION seconds like the pgbench runs.
run_redis() {
	local id=$1 rps n
	say "-- $2: redis-benchmark ${*:3}"
	rps=$(redis_rps "$OUT/$id.probe.txt" 50000 "${@:3}")
	n=$(awk -v r="$rps" -v d="$DURATION" 'BEGIN { n = int(r * d); print (n < 1000 ? 1000 : n) }')
	record "$id" "$2" "$(redis_rps "$OUT/$id.txt" "$n" "${@:3}")"
}

ensure_packages postgresql-client-15 redis-server redis-tools
build_and_install
# 100k random keys must fit without eviction; room for 8 clients and more.
# fsync stays off as in the test harness (reported below).
start_cluster "resilience.max_keys = 200000" "max_connections = 120" "shared_buffers = 256MB"
start_redis
OUT="$WORK/bench"
mkdir -p "$OUT"

say "Setting up (tables, functions, $NKEYS keys pre-populated everywhere)"
psql -X -q -f "$BENCH_DIR/setup.sql" >"$OUT/setup.txt" 2>&1 || { cat "$OUT/setup.txt"; die "setup failed"; }
grep -q ' t *| t *| t *| f *$' "$OUT/setup.txt" || { cat "$OUT/setup.txt"; die "sanity check failed"; }

SHA=$(redis-cli -s "$REDIS_SOCK" SCRIPT LOAD "$(cat "$BENCH_DIR/bucket.lua")")
[ "$(redis-cli -s "$REDIS_SOCK" EVALSHA "$SHA" 1 hot $CAPACITY $REFILL $COST)" = 1 ] ||
	die "the Redis bucket script does not admit a call"
# redis-benchmark's -r keys are __rand_int__ = 12 zero-padded digits, 0..r-1.
redis-cli -s "$REDIS_SOCK" EVAL "for i = 0, $NKEYS - 1 do
	local k = string.format('k:%012d', i)
	redis.call('HSET', k, 'tokens', ARGV[1], 'ts', 0)
	redis.call('PEXPIRE', k, 600000)
end" 0 $CAPACITY >/dev/null

SECTIONS=${BENCH_SECTIONS:-ratelimit locks idempotency breakers sagas outbox amqp events schedules quota webhooks citus}
ROUNDS=${BENCH_ROUNDS:-1}
section() { [[ " $SECTIONS " == *" $1 "* ]]; }

# load_sql file: set up a section's objects.
load_sql() {
	psql -X -q -v ON_ERROR_STOP=1 -f "$BENCH_DIR/$1" >"$OUT/$1.txt" 2>&1 ||
		{ cat "$OUT/$1.txt"; die "$1 failed"; }
}

# The reaper (every resilience.reaper_interval, a minute) drops rate-limit
# entries that are idle (a full bucket is) and unused since its previous
# sweep: between sections and rounds it took most of the 100,000
# pre-populated keys, and the random run then measured re-creating them
# (a second lookup under an exclusive lock, the free list), more or less
# of them by where the sweeps fell: 0.77 to 0.93 x SELECT 1 on quiet runs.
# Using every key just before the run keeps them all for it (a sweep
# removes only entries unused since the one before), so the run measures
# decisions on existing keys, as it says.
warm_rate_limit_keys() {
	psql -X -q -v ON_ERROR_STOP=1 -c "SELECT count(resilience.rate_limit('k' || i, $CAPACITY, $REFILL))
		FROM generate_series(1, $NKEYS) i" >"$OUT/rl_warm.txt" 2>&1 ||
		{ cat "$OUT/rl_warm.txt"; die "warming the rate-limit keys failed"; }
}

run_ratelimit() {
	warm_rate_limit_keys
	run_pgbench rl_random "rate_limit, random keys" rate_limit_random.sql
	run_pgbench rl_hot "rate_limit, hot key" rate_limit_hot.sql
	run_pgbench logged_random "PL/pgSQL bucket, logged table, random keys" bucket_logged_random.sql
	run_pgbench logged_hot "PL/pgSQL bucket, logged table, hot key" bucket_logged_hot.sql
	run_pgbench unlogged_random "PL/pgSQL bucket, unlogged table, random keys" bucket_unlogged_random.sql
	run_pgbench unlogged_hot "PL/pgSQL bucket, unlogged table, hot key" bucket_unlogged_hot.sql
	run_redis redis_random "Redis+Lua bucket, random keys" \
		-r $NKEYS EVALSHA "$SHA" 1 k:__rand_int__ $CAPACITY $REFILL $COST
	run_redis redis_hot "Redis+Lua bucket, hot key" EVALSHA "$SHA" 1 hot $CAPACITY $REFILL $COST
	# only the pre-populated keys (full buckets expire a minute after use)
	[ "$(redis-cli -s "$REDIS_SOCK" DBSIZE)" -le $((NKEYS + 1)) ] ||
		die "Redis holds $(redis-cli -s "$REDIS_SOCK" DBSIZE) keys, more than the $((NKEYS + 1)) expected"
}

# Locks: 1,000 names or one hot name; raw advisory lock + sequence, and a
# hand-written lease table, as baselines.
run_locks() {
	run_pgbench adv_raw_random "pg_advisory_xact_lock(hashtext) + nextval, 1000 keys" advisory_raw_random.sql
	run_pgbench adv_random "advisory_xact_lock, 1000 keys" advisory_random.sql
	run_pgbench adv_raw_hot "pg_advisory_xact_lock(hashtext) + nextval, hot key" advisory_raw_hot.sql
	run_pgbench adv_hot "advisory_xact_lock, hot key" advisory_hot.sql
	run_pgbench lease_table_random "hand-written lease table cycle, 1000 keys" lease_table_random.sql
	run_pgbench lease_random "lock_acquire + lock_release, 1000 keys" lease_random.sql
	run_pgbench lease_table_hot "hand-written lease table cycle, hot key" lease_table_hot.sql
	run_pgbench lease_hot "lock_acquire + lock_release, hot key" lease_hot.sql
}

# Idempotency: begin + complete of new keys against INSERT ON CONFLICT +
# UPDATE by hand; replay of a completed key against a primary-key SELECT.
run_idempotency() {
	run_pgbench idem_new "idempotency_begin + complete, new key" idempotency_new_key.sql
	run_pgbench idem_hand "hand-written INSERT ON CONFLICT + UPDATE" idempotency_handmade.sql
	run_pgbench idem_replay "idempotency_begin, replay" idempotency_replay.sql
	run_pgbench idem_pk "primary-key SELECT of the same row" idempotency_pk_select.sql
}

# Breakers and bulkheads: one breaker (two calls per statement) and one
# bulkhead (its permit released by the commit), against SELECT 1 and, for
# context, a statement of two trivial built-in calls.
run_breakers() {
	run_pgbench two_calls "two built-in function calls (control)" two_calls.sql
	run_pgbench breaker "breaker_allow + breaker_record" breaker.sql
	run_pgbench bulkhead "bulkhead_acquire + commit" bulkhead.sql
}

section locks && load_sql locks_setup.sql
section idempotency && load_sql idempotency_setup.sql
section sagas && load_sql sagas_setup.sql
section quota && load_sql quota_setup.sql
section events && load_sql events_setup.sql

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
say "Running: $CLIENTS clients, ${DURATION}s per run, $ROUNDS round(s)"
for round in $(seq "$ROUNDS"); do
	run_pgbench select1 "SELECT 1" select1.sql
	for s in ratelimit locks idempotency breakers sagas quota events; do
		if section "$s"; then "run_$s"; fi
	done
done

# Outbox: publish vs INSERT and the NOTIFY relay vs its reference loop
# (BENCH_ROUNDS turns), HTTP relay throughput, latency, and the table's size
# under a sustained load (bench/outbox.sh).
if section outbox; then
	run_outbox_section
fi
# AMQP relay throughput (a private RabbitMQ node) and event streams (bench/amqp.sh).
if section amqp; then
	run_amqp_section
fi
if section schedules; then
	run_schedules_section
	record sched_floor "the floor" 16.7
fi
if section webhooks; then
	run_webhooks_section
fi
# Citus (PostgreSQL 16 and later): through a coordinator vs one plain node.
if section citus && [ "$PG_MAJOR" -ge 16 ] && bash "$SRC_DIR/tools/citus.sh" "$BINDIR"; then
	run_citus_section
fi

# ratio_line label numerator-id denominator-id [target-op target]
ratio_line() {
	awk -v l="$1" -v a="$(tput "$2")" -v b="$(tput "$3")" -v op="${4:-}" -v t="${5:-}" 'BEGIN {
		r = a / b
		if (op == "") { printf "  %-54s %7.3f\n", l, r; exit }
		ok = (op == ">=") ? r >= t : r > t
		printf "  %-54s %7.3f   %2s %-4s  %s\n", l, r, op, t, ok ? "PASS" : "BELOW"
	}'
}

report() {
	say ""
	say "== resilience bench: $(date -u '+%Y-%m-%d %H:%M UTC')"
	say "machine:    $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
	say "load avg:   $LOAD_BEFORE before the runs, $(cut -d' ' -f1-3 /proc/loadavg) after" \
		"(other work on the machine makes the figures noisy)"
	say "PostgreSQL: $(psql -X -Atc 'SHOW server_version'), unix socket," \
		"shared_buffers=$(psql -X -Atc 'SHOW shared_buffers')," \
		"resilience.max_keys=$(psql -X -Atc 'SHOW resilience.max_keys')"
	say "            synchronous_commit=$(psql -X -Atc 'SHOW synchronous_commit')," \
		"fsync=$(psql -X -Atc 'SHOW fsync') as in the test harness" \
		"(commits of the logged table do not wait for the disk)"
	say "Redis:      $(redis-server --version | awk '{ print $3 }' | cut -d= -f2), unix socket, no persistence;" \
		"time from TIME inside the script (Redis 7 replicates script effects)"
	say "load:       $CLIENTS clients; pgbench -n -M prepared -j $THREADS -T $DURATION;" \
		"redis-benchmark (one client thread), EVALSHA, -n sized to last ~${DURATION}s"
	say "bucket:     capacity $CAPACITY, refill $REFILL/s, cost $COST (every call admitted);" \
		"random = $NKEYS pre-populated keys, hot = one key"
	say ""
	printf '  %-54s %12s\n' "workload" "calls/s"
	local id
	for id in "${ORDER[@]}"; do
		printf '  %-54s %12.0f\n' "${LABEL[$id]}" "$(tput "$id")"
	done
	say ""
	printf '  %-54s %7s   %-7s  %s\n' "ratio" "value" "target" ""
	section ratelimit && report_ratelimit
	section locks && report_locks
	section idempotency && report_idempotency
	section breakers && report_breakers
	section sagas && report_sagas
	section outbox && report_outbox
	section amqp && report_amqp
	section events && report_events
	section schedules && report_schedules
	section quota && report_quota
	section webhooks && report_webhooks
	[ -n "${CITUS_SPREAD:-}" ] && report_citus
	true
}

report_breakers() {
	ratio_line "breaker_allow + breaker_record / SELECT 1" breaker select1 ">=" 0.9
	ratio_line "bulkhead_acquire + commit / SELECT 1" bulkhead select1 ">=" 0.85
	ratio_line "two built-in calls / SELECT 1 (control)" two_calls select1
}

report_idempotency() {
	ratio_line "idempotency new key / hand-written" idem_new idem_hand ">=" 0.7
	ratio_line "idempotency replay / primary-key SELECT" idem_replay idem_pk ">=" 0.85
}

report_locks() {
	ratio_line "advisory helper / raw advisory+nextval, 1000" adv_random adv_raw_random ">=" 0.9
	ratio_line "advisory helper / raw advisory+nextval, hot" adv_hot adv_raw_hot ">=" 0.9
	ratio_line "lease cycle / hand-written table, 1000" lease_random lease_table_random ">=" 1.0
	ratio_line "lease cycle / hand-written table, hot" lease_hot lease_table_hot ">=" 1.0
}

report_ratelimit() {
	ratio_line "rate_limit random / SELECT 1" rl_random select1 ">=" 0.9
	ratio_line "rate_limit hot / SELECT 1" rl_hot select1 ">=" 0.8
	ratio_line "rate_limit hot / unlogged-table bucket hot" rl_hot unlogged_hot ">=" 4
	ratio_line "rate_limit random / Redis+Lua random" rl_random redis_random ">" 1
	ratio_line "rate_limit hot / Redis+Lua hot" rl_hot redis_hot ">" 1
	say "  for context:"
	ratio_line "SELECT 1 / unlogged-table bucket hot" select1 unlogged_hot
	ratio_line "SELECT 1 / Redis+Lua random" select1 redis_random
	ratio_line "rate_limit random / logged-table bucket random" rl_random logged_random
	ratio_line "rate_limit random / unlogged-table bucket random" rl_random unlogged_random
}

report | tee "$OUT/summary.txt"
# A copy of the summary in bench/results/ (gitignored), when the checkout is writable.
if mkdir -p "$BENCH_DIR/results" 2>/dev/null &&
	cp "$OUT/summary.txt" "$BENCH_DIR/results/$(date -u +%Y%m%d-%H%M%S).txt" 2>/dev/null; then
	say "summary copied to bench/results/"
fi
