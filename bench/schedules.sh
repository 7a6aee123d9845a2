# The schedules section of `make bench` (BENCH_SECTIONS=... schedules),
# sourced by bench/run.sh; alone: `bash bench/schedules.sh` (PG_MAJOR=15 by
# default, KEEP_WORK=1 to keep the cluster's files).
#
# How many due slots per second the worker fires: BENCH_SCHEDULES schedules
# (default 5,000) of '* * * * *' with a trivial SQL command are created with
# the schedules job off and made due at once (the current minute's slot);
# then the job is turned on and the worker runs them, one slot per
# transaction.  The rate is the slots run divided by the time from turning
# the job on to the last run's end (server clock).  The floor is 1,000
# schedules every minute: 16.7 slots/s.  For context, the same slots run by
# hand: schedule_tick() called in a loop by one session, one transaction
# per call (what the worker's job does, without the worker).

SCHEDULES_N=${BENCH_SCHEDULES:-5000}

# Create (or recreate) the bench schedules, all due now, the job off.
schedules_prepare() {
	psql -X -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
ALTER SYSTEM SET resilience.schedule_interval = 0;
SELECT pg_reload_conf();
DO \$\$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_sched') THEN
        CREATE ROLE bench_sched NOLOGIN IN ROLE resilience_admin;
    END IF;
END \$\$;
DELETE FROM resilience.schedule_runs WHERE schedule LIKE 'bench\_%';
DELETE FROM resilience.schedule_definitions WHERE name LIKE 'bench\_%';
SET ROLE bench_sched;
SELECT count(resilience.schedule('bench_' || i, '* * * * *', '{"sql": "SELECT 1"}'))
  FROM generate_series(1, $SCHEDULES_N) i;
RESET ROLE;
UPDATE resilience.schedule_definitions
   SET next_slot = date_trunc('minute', now()), due_at = date_trunc('minute', now())
 WHERE name LIKE 'bench\_%';
VACUUM ANALYZE resilience.schedule_definitions, resilience.schedule_runs;
SQL
}

# schedules_wait: until every bench schedule has run its due slot (10 min at most).
schedules_wait() {
	local waited=0
	while [ "$(psql -X -Atq -c "SELECT count(*) FROM resilience.schedule_definitions
			WHERE name LIKE 'bench\_%' AND due_at <= now()")" != 0 ]; do
		sleep 0.2
		waited=$((waited + 1))
		[ "$waited" -lt 3000 ] || die "the bench schedules did not run within 10 minutes"
	done
}

# schedules_rate since: slots run per second from since to the last run's end.
schedules_rate() {
	psql -X -Atq -c "SELECT round(count(*) / extract(epoch FROM max(finished_at) - '$1'::timestamptz), 1)
		FROM resilience.schedule_runs WHERE schedule LIKE 'bench\_%' AND state = 'succeeded'"
}

run_schedules_section() {
	local t0 rate
	say "-- $SCHEDULES_N due schedules fired by the worker"
	schedules_prepare
	t0=$(psql -X -Atq -c 'SELECT clock_timestamp()')
	psql -X -q -c 'ALTER SYSTEM RESET resilience.schedule_interval' -c 'SELECT pg_reload_conf()' >/dev/null
	schedules_wait
	rate=$(schedules_rate "$t0")
	record sched_worker "due slots/s fired by the worker" "$rate"
	say "   $rate slots/s"

	say "-- $SCHEDULES_N due schedules run by hand (schedule_tick() in a loop, one session)"
	schedules_prepare
	t0=$(psql -X -Atq -c 'SELECT clock_timestamp()')
	psql -X -q -c "DO \$\$ BEGIN FOR i IN 1..$SCHEDULES_N LOOP
		EXIT WHEN resilience.schedule_tick() = 0; COMMIT; END LOOP; END \$\$" >/dev/null
	rate=$(schedules_rate "$t0")
	record sched_tick "due slots/s, schedule_tick() by hand" "$rate"
	say "   $rate slots/s"
	psql -X -q -c 'ALTER SYSTEM RESET resilience.schedule_interval' -c 'SELECT pg_reload_conf()' \
		-c "SELECT count(resilience.unschedule(name)) FROM resilience.schedule_definitions WHERE name LIKE 'bench\_%'" >/dev/null
}

report_schedules() {
	value_line "due slots/s fired by the worker (floor 1,000/min)" sched_worker ">=" 16.7
	ratio_line "worker / the floor of 16.7 slots/s (x)" sched_worker sched_floor ">=" 1
	ratio_line "worker / schedule_tick() by hand" sched_worker sched_tick
}

# Alone: a cluster of its own, this section only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	set -euo pipefail
	. "$(dirname "$0")/../tools/cluster.sh"
	declare -A SUM RUNS
	record() { SUM[$1]=$3; RUNS[$1]=1; }
	tput() { echo "${SUM[$1]}"; }
	value_line() {
		awk -v l="$1" -v v="$(tput "$2")" -v op="$3" -v t="$4" 'BEGIN {
			ok = (op == ">=") ? v >= t : v > t
			printf "  %-54s %7.1f   %2s %-4s  %s\n", l, v, op, t, ok ? "PASS" : "BELOW" }'
	}
	ratio_line() {
		awk -v l="$1" -v a="$(tput "$2")" -v b="$(tput "$3")" -v op="${4:-}" -v t="${5:-}" 'BEGIN {
			r = a / b; ok = (op == ">=") ? r >= t : r > t
			printf "  %-54s %7.3f   %2s %-4s  %s\n", l, r, op, t, op == "" ? "" : ok ? "PASS" : "BELOW" }'
	}
	trap cleanup EXIT
	ensure_packages postgresql-client-15
	build_and_install
	start_cluster "resilience.database_names = 'postgres'" "resilience.worker_naptime = '100ms'"
	psql -X -q -c 'CREATE EXTENSION resilience'
	run_schedules_section
	record sched_floor "the floor" 16.7
	printf '  %-54s %7s   %-7s  %s\n' "ratio" "value" "target" ""
	report_schedules
fi
