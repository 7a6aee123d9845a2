#!/usr/bin/env bash
# Idempotency-key throughput, side by side in one run (8 clients, pgbench
# -M prepared -j 2), on a throwaway cluster:
#
#   new key   idempotency_begin + idempotency_complete of a fresh key, in one
#             transaction (bench/idempotency_new_key.sql), against the same
#             work by hand: INSERT ... ON CONFLICT DO NOTHING with a SHA-256 of
#             the request, then UPDATE (bench/idempotency_handmade.sql);
#   replay    idempotency_begin of one of 10,000 completed keys
#             (bench/idempotency_replay.sql), against a primary-key SELECT of
#             the same rows (bench/idempotency_pk_select.sql).
#
# Targets (issue 4): new key >= 0.7 x hand-written; replay >= 0.8 x PK SELECT.
# The four loads take turns for ROUNDS rounds of BENCH_SECONDS each, so other
# work on a shared machine weighs on both sides of a ratio alike.  Figures are
# reported, not asserted: exits 0 whenever the runs succeed.
#
#   bash bench/idempotency.sh          BENCH_SECONDS=5 ROUNDS=3 by default
. "$(dirname "$0")/../tools/cluster.sh"

BENCH_DIR="$SRC_DIR/bench"
DURATION=${BENCH_SECONDS:-5}
ROUNDS=${ROUNDS:-3}
LOADS=(new_key handmade replay pk_select)

ensure_packages
build_and_install
start_cluster "resilience.database_names = ''" "resilience.reaper_interval = 0" "max_connections = 50"
OUT="$WORK/bench"
mkdir -p "$OUT"
chown "${RUNAS:-$(id -un)}" "$OUT"

say "Setting up (10,000 completed keys, the hand-written table)"
as_owner psql -X -q -v ON_ERROR_STOP=1 -f "$BENCH_DIR/idempotency_setup.sql" >"$OUT/setup.txt" 2>&1 ||
	{ cat "$OUT/setup.txt"; die "setup failed"; }

declare -A SUM
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
say "Running: 8 clients, -j 2, -M prepared; $ROUNDS rounds of ${DURATION}s per load"
for round in $(seq 1 "$ROUNDS"); do
	for load in "${LOADS[@]}"; do
		out="$OUT/$load.$round.txt"
		as_owner pgbench -n -M prepared -c 8 -j 2 -T "$DURATION" \
			-f "$BENCH_DIR/idempotency_$load.sql" >"$out" 2>&1 || { cat "$out"; die "pgbench $load failed"; }
		grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out"; die "pgbench $load had failures"; }
		SUM[$load]=$(awk -v s="${SUM[$load]:-0}" '/^tps = / { print s + $3; exit }' "$out")
	done
done

say ""
say "== resilience idempotency bench: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
	"load avg $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after"
say "   PostgreSQL $(psql -X -Atc 'SHOW server_version'), fsync=$(psql -X -Atc 'SHOW fsync') as in the test harness"
awk -v n="$ROUNDS" -v nk="${SUM[new_key]}" -v hm="${SUM[handmade]}" \
	-v rp="${SUM[replay]}" -v pk="${SUM[pk_select]}" 'BEGIN {
	nk /= n; hm /= n; rp /= n; pk /= n
	printf "  %-56s %10s\n", "workload (mean of the rounds)", "tx/s"
	printf "  %-56s %10.0f\n", "new key: idempotency_begin + idempotency_complete", nk
	printf "  %-56s %10.0f\n", "new key by hand: INSERT ... ON CONFLICT + UPDATE", hm
	printf "  %-56s %10.0f\n", "replay: idempotency_begin of a completed key", rp
	printf "  %-56s %10.0f\n", "primary-key SELECT of the same row", pk
	printf "\n  %-56s %7s   %s\n", "ratio", "value", "target"
	printf "  %-56s %7.3f   >= 0.7  %s\n", "new key / by hand", nk / hm, (nk / hm >= 0.7 ? "PASS" : "BELOW")
	printf "  %-56s %7.3f   >= 0.8  %s\n", "replay / primary-key SELECT", rp / pk, (rp / pk >= 0.8 ? "PASS" : "BELOW")
}'
