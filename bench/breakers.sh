#!/usr/bin/env bash
# bench/breakers.sh: what a circuit breaker and a bulkhead cost per call, as
# throughput ratios to SELECT 1, measured side by side in one run:
#   SELECT 1                                   the round trip alone
#   breaker_allow + breaker_record, one key    both calls in one statement
#   bulkhead_acquire, then commit              autocommit: the permit is
#                                              released by the commit
# pgbench -n -M prepared -c 8 -j 2, DURATION seconds (default 5) per run,
# ROUNDS rounds (default 5) taken in turn; the median of each is printed.
#
# Standalone: bash bench/breakers.sh (builds, starts a throwaway cluster).
# From bench/run.sh, inside its own running cluster: source this file with
# BREAKERS_AS_LIBRARY=1 and call bench_breakers (it needs $WORK, $PGHOST,
# $PGPORT, $PGUSER and as_owner from tools/cluster.sh).
if [ -z "${BREAKERS_AS_LIBRARY:-}" ]; then
	. "$(dirname "$0")/../tools/cluster.sh"
fi

# The tps of one pgbench run of script $1.
bench_tps() {
	as_owner pgbench -n -M prepared -c 8 -j 2 -T "$DURATION" -f "$1" 2>&1 |
		sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p'
}

# The median of the numbers given.
bench_median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

bench_breakers() {
	local dir="$WORK/bench-breakers" name i
	local -A tps=()
	DURATION=${DURATION:-5}
	ROUNDS=${ROUNDS:-5}
	mkdir -p "$dir"
	echo 'SELECT 1;' >"$dir/select1.sql"
	echo "SELECT resilience.breaker_allow('bench'), resilience.breaker_record('bench', true);" >"$dir/breaker.sql"
	echo "SELECT resilience.bulkhead_acquire('bench', 64);" >"$dir/bulkhead.sql"
	[ -n "${RUNAS:-}" ] && chown -R "$RUNAS:" "$dir"
	as_owner psql -X -q -c 'CREATE EXTENSION IF NOT EXISTS resilience' >/dev/null

	for i in $(seq "$ROUNDS"); do
		for name in select1 breaker bulkhead; do
			tps[$name]="${tps[$name]:-} $(bench_tps "$dir/$name.sql")"
		done
	done
	# the workloads did what they claim: the breaker stayed closed, no permit is left
	as_owner psql -X -q -At -c "SELECT 'breaker ' || state || ', ' || calls || ' calls in window; bulkhead '
		|| (SELECT acquired || ' acquired, ' || rejected || ' rejected, ' || in_use || ' in use'
		      FROM resilience.bulkheads WHERE name = 'bench')
		FROM resilience.breakers WHERE name = 'bench'" | sed 's/^/  check: /'

	local base breaker bulkhead
	# shellcheck disable=SC2086
	base=$(bench_median ${tps[select1]})
	# shellcheck disable=SC2086
	breaker=$(bench_median ${tps[breaker]})
	# shellcheck disable=SC2086
	bulkhead=$(bench_median ${tps[bulkhead]})
	printf '\nresilience breakers and bulkheads: pgbench -M prepared -c 8 -j 2, %s s x %s rounds, median tps\n' \
		"$DURATION" "$ROUNDS"
	printf '  %-40s %10s %8s\n' workload tps ratio
	awk -v b="$base" -v r="$breaker" -v k="$bulkhead" 'BEGIN {
		printf "  %-40s %10.0f %8.2f\n", "SELECT 1", b, 1
		printf "  %-40s %10.0f %8.2f   (target >= 0.90)\n", "breaker_allow + breaker_record", r, r / b
		printf "  %-40s %10.0f %8.2f   (target >= 0.85)\n", "bulkhead_acquire + commit", k, k / b
	}'
}

if [ -z "${BREAKERS_AS_LIBRARY:-}" ]; then
	ensure_packages
	build_and_install
	start_cluster "resilience.database_names = ''"
	bench_breakers
fi
