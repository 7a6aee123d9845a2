#!/usr/bin/env bash
# The citus section of `make bench` (issue 21): rate_limit and idempotency
# new-key throughput through a Citus coordinator (keys spread over two
# workers) against the same on one plain node, measured side by side in one
# run, 8 clients, pgbench -M prepared.
#
# All four servers share this machine's cores, so on 2 cores the cluster can
# only lose: every delegated call is a coordinator backend, a TCP round trip
# and a worker backend where the plain node has one backend.  The ratio
# measures that cost (docs/citus.md says what it does and does not tell).
#
# Sourced by bench/run.sh when PostgreSQL is 16 or later (BENCH_SECTIONS has
# citus); alone: `PG_MAJOR=18 bash bench/citus.sh` (BENCH_SECONDS as run.sh).
# It starts its own three Citus nodes beside run.sh's plain cluster.

citus_alone=""
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	citus_alone=1
	PG_MAJOR=${PG_MAJOR:-18}
	. "$(dirname "$0")/../tools/cluster.sh"
fi

CITUS_PORTS=()

# Start the coordinator (first port) and two workers, add them, set up.
start_citus_nodes() {
	local i port dir
	for i in 0 1 2; do
		port=$((PORT + 1 + i))
		dir="$WORK/citus$i"
		as_owner "$BINDIR/initdb" -D "$dir" -A trust -U postgres --no-sync >"$WORK/citus-initdb.log" 2>&1 ||
			{ cat "$WORK/citus-initdb.log"; die "initdb failed"; }
		{
			echo "shared_preload_libraries = 'citus,resilience'"
			echo "listen_addresses = '127.0.0.1'"
			echo "unix_socket_directories = '$SOCK'"
			echo "port = $port"
			echo "fsync = off"
			echo "max_connections = 100"
			echo "max_prepared_transactions = 100"
			echo "citus.shard_count = 8"
			echo "resilience.database_names = ''"
		} >>"$dir/postgresql.conf"
		as_owner "$BINDIR/pg_ctl" -D "$dir" -l "$WORK/citus$i.log" -w start >/dev/null ||
			{ tail -n 30 "$WORK/citus$i.log"; die "Citus node $i did not start"; }
		CITUS_PORTS+=("$port")
		psql -X -q -p "$port" -c 'CREATE EXTENSION citus' >/dev/null
	done
	psql -X -q -p "${CITUS_PORTS[0]}" -v ON_ERROR_STOP=1 \
		-c "SELECT citus_set_coordinator_host('127.0.0.1', ${CITUS_PORTS[0]})" \
		-c "SELECT citus_add_node('127.0.0.1', ${CITUS_PORTS[1]})" \
		-c "SELECT citus_add_node('127.0.0.1', ${CITUS_PORTS[2]})" \
		-c 'CREATE EXTENSION resilience' \
		-c 'SELECT count(*) FROM resilience.citus_setup()' >/dev/null
}

stop_citus_nodes() {
	local i
	for i in 0 1 2; do
		[ -f "$WORK/citus$i/postmaster.pid" ] &&
			as_owner "$BINDIR/pg_ctl" -D "$WORK/citus$i" -m fast -w stop >/dev/null 2>&1
	done
	return 0
}

# citus_pgbench id label script port: one pgbench run against a port.
citus_pgbench() {
	local out="$OUT/$1.txt"
	say "-- $2: pgbench -f bench/$3 (port $4)"
	pgbench -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -p "$4" \
		-f "$BENCH_DIR/$3" >"$out" 2>&1 || { cat "$out"; die "pgbench $1 failed"; }
	grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out"; die "pgbench $1 had failures"; }
	record "$1" "$2" "$(awk '/^tps = /{ print $3; exit }' "$out")"
}

run_citus_section() {
	start_citus_nodes
	citus_pgbench citus_rl_plain "rate_limit, random keys, one plain node" rate_limit_random.sql "$PORT"
	citus_pgbench citus_rl "rate_limit, random keys, Citus coordinator + 2 workers" rate_limit_random.sql "${CITUS_PORTS[0]}"
	citus_pgbench citus_idem_plain "idempotency new key, one plain node" idempotency_new_key.sql "$PORT"
	citus_pgbench citus_idem "idempotency new key, Citus coordinator" idempotency_new_key.sql "${CITUS_PORTS[0]}"
	# where the keys went: one bucket per key, on the worker owning it
	CITUS_SPREAD=$(for p in "${CITUS_PORTS[@]}"; do
		psql -X -Atc 'SELECT count(*) FROM resilience.rate_limit_entries()' -p "$p"
	done | paste -sd/)
	stop_citus_nodes
}

report_citus() {
	say "  citus (4 servers on $(nproc) cores; buckets on coordinator/worker1/worker2: $CITUS_SPREAD):"
	ratio_line "rate_limit random: Citus coordinator / plain node" citus_rl citus_rl_plain ">=" 0.25
	ratio_line "idempotency new key: Citus coordinator / plain node" citus_idem citus_idem_plain ">=" 0.5
}

if [ -n "$citus_alone" ]; then
	BENCH_DIR="$SRC_DIR/bench"
	DURATION=${BENCH_SECONDS:-10}
	CLIENTS=8
	THREADS=2
	declare -A SUM RUNS LABEL
	ORDER=()
	record() {
		[ -n "${RUNS[$1]:-}" ] || { ORDER+=("$1"); LABEL[$1]=$2; SUM[$1]=0; RUNS[$1]=0; }
		SUM[$1]=$(awk -v a="${SUM[$1]}" -v b="$3" 'BEGIN { print a + b }')
		RUNS[$1]=$((RUNS[$1] + 1))
	}
	tput() { awk -v s="${SUM[$1]}" -v n="${RUNS[$1]}" 'BEGIN { print s / n }'; }
	ratio_line() {
		awk -v l="$1" -v a="$(tput "$2")" -v b="$(tput "$3")" -v op="${4:-}" -v t="${5:-}" 'BEGIN {
			r = a / b
			if (op == "") { printf "  %-54s %7.3f\n", l, r; exit }
			ok = (op == ">=") ? r >= t : r > t
			printf "  %-54s %7.3f   %2s %-4s  %s\n", l, r, op, t, ok ? "PASS" : "BELOW"
		}'
	}
	trap 'stop_citus_nodes; cleanup' EXIT
	ensure_packages
	build_and_install "$PG_MAJOR"
	bash "$SRC_DIR/tools/citus.sh" "$BINDIR" || die "Citus is not available for PostgreSQL $PG_MAJOR"
	start_cluster
	OUT="$WORK/bench"
	mkdir -p "$OUT"
	[ -n "$RUNAS" ] && chown "$RUNAS:" "$OUT"
	run_citus_section
	say ""
	say "== resilience bench, citus: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
	say "PostgreSQL $("$PG_CONFIG" --version | cut -d' ' -f2), $CLIENTS clients, pgbench -M prepared -T $DURATION"
	for id in "${ORDER[@]}"; do
		printf '  %-54s %12.0f\n' "${LABEL[$id]}" "$(tput "$id")"
	done
	report_citus
fi
