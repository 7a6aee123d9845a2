# The sagas section of `make bench`, sourced by bench/run.sh.
#
# 3-step sagas of trivial steps (bench/sagas_setup.sql):
#   - the three step functions called directly in one transaction (pgbench);
#   - end to end: 8 pgbench clients call saga_start for BENCH_SECONDS while
#     1, 2 and 4 orchestrators (resilience.saga_workers) drive the sagas;
#     the rate is the sagas started divided by the time from the first start
#     to the last completion (server clock);
#   - drained: BENCH_SAGA_BACKLOG sagas (default 20,000) started in one
#     transaction, then driven by 1, 2 and 4 orchestrators per database
#     (resilience.saga_workers: the worker and its saga helpers);
#   - a 3-branch parallel group of the same steps (bench_fan), end to end
#     as above with 1 and 4 orchestrators: each branch is claimed and run
#     in a transaction of its own, then the saga's tick joins them;
# and the ratio of a saga's cost to the direct calls, and of 2 and 4
# orchestrators to 1.  For scale, the CPU time the one orchestrator (the
# worker) used per saga end to end: it is one process, while the direct
# calls run in 8 backends on every core.

SAGA_BACKLOG=${BENCH_SAGA_BACKLOG:-20000}

# Empty the saga tables (definitions stay), vacuumed.
sagas_reset() {
	psql -X -q -c 'TRUNCATE resilience.saga_events, resilience.saga_steps, resilience.saga_branches, resilience.sagas' \
		-c 'VACUUM ANALYZE resilience.sagas, resilience.saga_steps, resilience.saga_branches, resilience.saga_events' >/dev/null
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

# worker_cpu_us: CPU time (user + system, µs) of this database's worker so far.
worker_cpu_us() {
	local pid
	pid=$(psql -X -Atq -c "SELECT pid FROM pg_stat_activity
		WHERE backend_type = 'resilience worker' AND datname = current_database()")
	awk -v hz="$(getconf CLK_TCK)" '{ printf "%d\n", ($14 + $15) * 1000000 / hz }' "/proc/$pid/stat"
}

# One round of the section (bench/sagas_setup.sql is loaded once before).
run_sagas() {
	local t0 cpu0
	run_pgbench saga_direct "3 step functions called directly, one transaction" saga_direct.sql

	for n in 1 2 4; do
		sagas_set_workers "$n"
		sagas_reset
		cpu0=$(worker_cpu_us)
		run_pgbench "saga_start$(sfx "$n")" "saga_start (while $n orchestrator(s) drive them)" saga_start.sql
		say "-- waiting for the orchestrators to finish the sagas"
		sagas_wait_done
		record_saga_rate "saga_e2e$(sfx "$n")" "3-step sagas/s, end to end, $n orchestrator(s)"
		if [ "$n" = 1 ]; then
			record saga_cpu "orchestrator CPU per saga, end to end, 1 orchestrator (us)" \
				"$(awk -v c="$(($(worker_cpu_us) - cpu0))" \
					-v n="$(psql -X -Atq -c 'SELECT count(*) FROM resilience.sagas')" \
					'BEGIN { printf "%.1f", c / n }')"
		fi
	done

	for n in 1 4; do
		sagas_set_workers "$n"
		sagas_reset
		run_pgbench "saga_fan_start$(sfx "$n")" "saga_start of a 3-branch group (while $n orchestrator(s) drive them)" \
			saga_fan_start.sql
		say "-- waiting for the orchestrators to finish the sagas"
		sagas_wait_done
		record_saga_rate "saga_fan$(sfx "$n")" "3-branch group sagas/s, end to end, $n orchestrator(s)"
	done

	for n in 1 2 4; do
		say "-- $SAGA_BACKLOG sagas started in one transaction, drained by $n orchestrator(s)"
		sagas_set_workers "$n"
		sagas_reset
		# the orchestrators start at the commit; t0 is taken just before it
		t0=$(psql -X -Atq -c 'BEGIN' \
			-c "SELECT count(resilience.saga_start('bench3', '{}')) FROM generate_series(1, $SAGA_BACKLOG)" \
			-c 'SELECT clock_timestamp()' -c 'COMMIT' | sed -n 2p)
		sagas_wait_done
		record_saga_rate "saga_drain$(sfx "$n")" \
			"3-step sagas/s, a backlog drained by $n orchestrator(s)" "$t0"
	done
	sagas_set_workers 1
}

# sfx n: the suffix of a measurement's id for n orchestrators ("" for 1).
sfx() { [ "$1" = 1 ] || echo "_$1"; }

# sagas_set_workers n: resilience.saga_workers = n, and wait for the n - 1
# saga helpers of this database (at most 30 s).
sagas_set_workers() {
	local waited=0
	psql -X -q -c "ALTER SYSTEM SET resilience.saga_workers = $1" -c 'SELECT pg_reload_conf()' >/dev/null
	while [ "$(psql -X -Atq -c "SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'resilience saga helper' AND datname = current_database()")" != $(($1 - 1)) ]; do
		sleep 0.2
		waited=$((waited + 1))
		[ "$waited" -lt 150 ] || die "resilience.saga_workers = $1: the saga helpers did not start"
	done
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
	value_line "3-step sagas/s, end to end, 2 orchestrators" saga_e2e_2 ">=" 1000
	value_line "3-step sagas/s, end to end, 4 orchestrators" saga_e2e_4 ">=" 1000
	value_line "3-step sagas/s, backlog drained by the worker" saga_drain ">=" 1000
	value_line "3-step sagas/s, backlog, 2 orchestrators" saga_drain_2 ">=" 1000
	value_line "3-step sagas/s, backlog, 4 orchestrators" saga_drain_4 ">=" 1000
	ratio_line "2 orchestrators / 1 (end to end, x)" saga_e2e_2 saga_e2e ">" 1
	ratio_line "4 orchestrators / 1 (end to end, x)" saga_e2e_4 saga_e2e ">" 1
	ratio_line "2 orchestrators / 1 (drained backlog, x)" saga_drain_2 saga_drain ">" 1
	ratio_line "4 orchestrators / 1 (drained backlog, x)" saga_drain_4 saga_drain ">" 1
	ratio_line "direct calls / sagas end to end (saga cost, x)" saga_direct saga_e2e
	info_line "orchestrator CPU per saga, end to end (us)" saga_cpu
	info_line "3-branch group sagas/s, end to end, 1 orchestrator" saga_fan
	info_line "3-branch group sagas/s, end to end, 4 orchestrators" saga_fan_4
	ratio_line "3-step sagas / 3-branch group sagas (end to end, x)" saga_e2e saga_fan
	ratio_line "4 orchestrators / 1 (3-branch group, x)" saga_fan_4 saga_fan ">" 1
}

# info_line label id: a figure without a target.
info_line() {
	awk -v l="$1" -v v="$(tput "$2")" 'BEGIN { printf "  %-54s %7.0f\n", l, v }'
}
