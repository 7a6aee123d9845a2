#!/usr/bin/env bash
# bench/breakers.sh: what a circuit breaker and a bulkhead cost per call, as
# ratios to SELECT 1, measured in one run:
#   SELECT 1                                   the round trip alone
#   two built-in function calls                what any two calls cost (control)
#   breaker_allow + breaker_record, one key    both calls in one statement
#   bulkhead_acquire, then commit              autocommit: the permit is
#                                              released by the commit
# pgbench -n -M prepared, DURATION seconds (default 5) per run, ROUNDS
# rounds (default 3); medians.  Three ratios are printed:
#   tps        each workload alone with -c 8 -j 2, in turn, divided by
#              SELECT 1's (the figure the issue asks for);
#   side by side  the workload and SELECT 1 at the same time, 8 clients
#              each (-j 1 each): whatever else loads the machine loads both
#              alike, so the ratio is that of their costs per transaction;
#   cpu        CPU per transaction (backends and pgbench, from /proc) in
#              the runs alone, SELECT 1's divided by the workload's.
# On a machine shared with other work the tps ratio moves with that work
# from run to run; the other two much less.
#
# Standalone: bash bench/breakers.sh (builds, starts a throwaway cluster).
# From bench/run.sh, inside its own running cluster: source this file with
# BREAKERS_AS_LIBRARY=1 and call bench_breakers (it needs $WORK, $DATA,
# $PGHOST, $PGPORT, $PGUSER and as_owner from tools/cluster.sh).
if [ -z "${BREAKERS_AS_LIBRARY:-}" ]; then
	. "$(dirname "$0")/../tools/cluster.sh"
fi

# CPU time (clock ticks) of the reaped children of process $1.
bench_children_cpu() {
	awk '{ print $16 + $17 }' "/proc/$1/stat"
}

# One pgbench run of script $1: prints "tps cpu_seconds_per_transaction".
bench_run() {
	local pm out cpu0 cpu1 txns tps
	pm=$(head -n 1 "$DATA/postmaster.pid")
	cpu0=$(($(bench_children_cpu "$pm") + $(bench_children_cpu $$)))
	out=$(as_owner pgbench -n -M prepared -c 8 -j 2 -T "$DURATION" -f "$1" 2>&1)
	sleep 0.2 # the postmaster reaps the backends
	cpu1=$(($(bench_children_cpu "$pm") + $(bench_children_cpu $$)))
	tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
	txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
	if [ -z "$tps" ] || [ -z "$txns" ] || [ "$txns" -eq 0 ]; then
		printf '%s\n' "$out" >&2
		die "pgbench failed on $1"
	fi
	awk -v t="$tps" -v n="$txns" -v c=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" \
		'BEGIN { printf "%s %.9f\n", t, c / hz / n }'
}

# Script $1 and SELECT 1 ($2) at the same time, 8 clients each: prints the
# ratio of their throughputs.
bench_pair() {
	local a b
	as_owner pgbench -n -M prepared -c 8 -j 1 -T "$DURATION" -f "$2" >"$WORK/pair-base.out" 2>&1 &
	as_owner pgbench -n -M prepared -c 8 -j 1 -T "$DURATION" -f "$1" >"$WORK/pair-load.out" 2>&1
	wait $!
	a=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$WORK/pair-base.out")
	b=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$WORK/pair-load.out")
	if [ -z "$a" ] || [ -z "$b" ]; then
		cat "$WORK/pair-base.out" "$WORK/pair-load.out" >&2
		die "pgbench failed on $1 side by side with $2"
	fi
	awk -v a="$a" -v b="$b" 'BEGIN { printf "%.4f\n", b / a }'
}

# The median of the numbers given.
bench_median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

bench_breakers() {
	local dir="$WORK/bench-breakers" name i r
	local -A tps=() cpu=() pair=()
	DURATION=${DURATION:-5}
	ROUNDS=${ROUNDS:-3}
	mkdir -p "$dir"
	echo 'SELECT 1;' >"$dir/select1.sql"
	echo "SELECT length('bench'), length('bench');" >"$dir/control.sql"
	echo "SELECT resilience.breaker_allow('bench'), resilience.breaker_record('bench', true);" >"$dir/breaker.sql"
	echo "SELECT resilience.bulkhead_acquire('bench', 64);" >"$dir/bulkhead.sql"
	[ -n "${RUNAS:-}" ] && chown -R "$RUNAS:" "$dir"
	as_owner psql -X -q -c 'CREATE EXTENSION IF NOT EXISTS resilience' >/dev/null

	for i in $(seq "$ROUNDS"); do
		for name in select1 control breaker bulkhead; do
			r=$(bench_run "$dir/$name.sql")
			tps[$name]="${tps[$name]:-} ${r% *}"
			cpu[$name]="${cpu[$name]:-} ${r#* }"
		done
		pair[select1]="${pair[select1]:-} 1"
		for name in control breaker bulkhead; do
			pair[$name]="${pair[$name]:-} $(bench_pair "$dir/$name.sql" "$dir/select1.sql")"
		done
	done
	# the workloads did what they claim: the breaker stayed closed, no permit is left
	as_owner psql -X -q -At -c "SELECT 'breaker ' || state || ', ' || calls || ' calls in window; bulkhead '
		|| (SELECT acquired || ' acquired, ' || rejected || ' rejected, ' || in_use || ' in use'
		      FROM resilience.bulkheads WHERE name = 'bench')
		FROM resilience.breakers WHERE name = 'bench'" | sed 's/^/  check: /'

	printf '\nresilience breakers and bulkheads: pgbench -M prepared, 8 clients, %s s x %s rounds (medians)\n' \
		"$DURATION" "$ROUNDS"
	printf '  %-32s %9s %6s %13s %12s %6s\n' workload tps ratio 'side by side' 'cpu/txn' ratio
	for name in select1 control breaker bulkhead; do
		# shellcheck disable=SC2086
		echo "$name $(bench_median ${tps[$name]}) $(bench_median ${cpu[$name]}) $(bench_median ${pair[$name]})"
	done | awk '
		{ t[$1] = $2; c[$1] = $3; p[$1] = $4; order[NR] = $1 }
		END {
			label["select1"] = "SELECT 1"
			label["control"] = "two built-in function calls"
			label["breaker"] = "breaker_allow + breaker_record"
			label["bulkhead"] = "bulkhead_acquire + commit"
			note["control"] = "   (control)"
			note["breaker"] = "   (target >= 0.90)"
			note["bulkhead"] = "   (target >= 0.85)"
			for (i = 1; i <= NR; i++) {
				n = order[i]
				printf "  %-32s %9.0f %6.2f %13.2f %9.1f us %6.2f%s\n", label[n], t[n], t[n] / t["select1"],
					p[n], c[n] * 1e6, c["select1"] / c[n], note[n]
			}
		}'
}

if [ -z "${BREAKERS_AS_LIBRARY:-}" ]; then
	ensure_packages
	build_and_install
	start_cluster "resilience.database_names = ''"
	bench_breakers
fi
