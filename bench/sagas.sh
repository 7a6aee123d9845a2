# The sagas section of `make bench`, sourced by bench/run.sh.
#
# 3-step sagas of trivial steps (bench/sagas_setup.sql):
#   - the three step functions called directly in one transaction (pgbench);
#   - end to end: 8 pgbench clients call saga_start for BENCH_SECONDS while
#     the database's worker drives the sagas; the rate is the sagas started
#     divided by the time from the first start to the last completion
#     (server clock);
#   - drained: BENCH_SAGA_BACKLOG sagas (default 20,000) started with the
#     sagas job off, then driven by the worker alone;
# and the ratio of a saga's cost to the direct calls.

SAGA_BACKLOG=${BENCH_SAGA_BACKLOG:-20000}

# Empty the saga tables (definitions stay), vacuumed.
sagas_reset() {
	psql -X -q -c 'TRUNCATE resilience.saga_events, resilience.saga_steps, resilience.sagas' \
		-c 'VACUUM ANALYZE resilience.sagas, resilience.saga_steps, resilience.saga_events' >/dev/null
}

# Wait until every saga has finished (at most 10 minutes).
sagas_wait_done() {
	local waited=0
	while [ "$(psql -X -Atq -c "SELECT count(*) FROM resilience.sagas
			WHERE state NOT IN ('completed', 'compensated')")" != 0 ]; do
		sleep 0.2
		waited=$((waited + 1))
		[ "$waited" -lt 3000 ] || die "sagas did not finish within 10 minutes"
	done
	[ "$(psql -X -Atq -c "SELECT count(*) FROM resilience.sagas WHERE state <> 'completed'")" = 0 ] ||
		die "some bench sagas did not complete"
}

# record_saga_rate id label since: sagas per second from since (a server
# timestamp; default the first start) to the last completion.
record_saga_rate() {
	local since=${3:-} rate
	rate=$(psql -X -Atq -c "SELECT round(count(*) / extract(epoch FROM max(finished_at)
			- coalesce(nullif('$since', '')::timestamptz, min(created_at))), 1) FROM resilience.sagas")
	record "$1" "$2" "$rate"
	say "   $(psql -X -Atq -c 'SELECT count(*) FROM resilience.sagas') sagas, $rate/s"
}

# One round of the section (bench/sagas_setup.sql is loaded once before).
run_sagas() {
	local t0
	run_pgbench saga_direct "3 step functions called directly, one transaction" saga_direct.sql

	sagas_reset
	run_pgbench saga_start "saga_start (while the worker drives them)" saga_start.sql
	say "-- waiting for the worker to finish the sagas"
	sagas_wait_done
	record_saga_rate saga_e2e "3-step sagas/s, end to end (8 starting clients)"

	say "-- $SAGA_BACKLOG sagas started with the sagas job off, then drained by the worker"
	sagas_reset
	psql -X -q -c 'ALTER SYSTEM SET resilience.saga_interval = 0' -c 'SELECT pg_reload_conf()' >/dev/null
	sleep 1
	psql -X -q -c "SELECT count(resilience.saga_start('bench3', '{}')) FROM generate_series(1, $SAGA_BACKLOG)" \
		-c 'VACUUM ANALYZE resilience.sagas, resilience.saga_events' >/dev/null
	t0=$(psql -X -Atq -c 'SELECT clock_timestamp()')
	psql -X -q -c 'ALTER SYSTEM RESET resilience.saga_interval' -c 'SELECT pg_reload_conf()' >/dev/null
	sagas_wait_done
	record_saga_rate saga_drain "3-step sagas/s, a backlog drained by the worker" "$t0"
}

# value_line label id op target: a throughput against its target.
value_line() {
	awk -v l="$1" -v v="$(tput "$2")" -v op="$3" -v t="$4" 'BEGIN {
		ok = (op == ">=") ? v >= t : v > t
		printf "  %-54s %7.0f   %2s %-4s  %s\n", l, v, op, t, ok ? "PASS" : "BELOW"
	}'
}

report_sagas() {
	value_line "3-step sagas/s, end to end" saga_e2e ">=" 1000
	value_line "3-step sagas/s, backlog drained by the worker" saga_drain ">=" 1000
	ratio_line "direct calls / sagas end to end (saga cost, x)" saga_direct saga_e2e
}
