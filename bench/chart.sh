#!/usr/bin/env bash
# `make bench-chart`: rate-limit throughput against the number of clients.
# For 1, 2, 4 and 8 clients, measures calls per second of
#   SELECT 1                                    (pgbench, the ceiling)
#   resilience.rate_limit on 100,000 random keys (pgbench)
#   a Redis token bucket in Lua (bench/bucket.lua) on 100,000 random keys
#                                               (redis-benchmark EVALSHA)
# writes them to docs/img/ratelimit-clients.dat and draws
# docs/img/ratelimit-clients.png with gnuplot.  Installs what is missing
# (gnuplot-nox, redis-server, redis-tools) as make bench does.
#   BENCH_SECONDS=5        length of each run
#   BENCH_ROUNDS=3         every point measured this many times, the runs
#                          taking turns; the chart shows the median (other
#                          work on a shared machine then weighs less)
#   BENCH_CLIENTS="1 2 4 8"
#   CHART_DIR=docs/img     where the .dat and .png go
#   KEEP_WORK=1            keep $WORK (raw outputs in $WORK/chart)
. "$(dirname "$0")/../tools/cluster.sh"
. "$(dirname "$0")/redis.sh"

BENCH_DIR="$SRC_DIR/bench"
DURATION=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
CLIENT_COUNTS=${BENCH_CLIENTS:-1 2 4 8}
CHART_DIR=${CHART_DIR:-$SRC_DIR/docs/img}
CAPACITY=1000000
REFILL=1000000
NKEYS=100000
chart_cleanup() {
	local rc=$?
	set +e
	stop_redis
	(exit "$rc")
	cleanup
}
trap chart_cleanup EXIT

# pgbench_tps clients script: calls per second (one statement per transaction).
pgbench_tps() {
	local c=$1 out="$OUT/$2.c$1.r$round.txt" j=$(($1 < 2 ? $1 : 2))
	pgbench -n -M prepared -c "$c" -j "$j" -T "$DURATION" -f "$BENCH_DIR/$2" >"$out" 2>&1 ||
		{ cat "$out"; die "pgbench $2 failed"; }
	grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out"; die "pgbench $2 had failures"; }
	awk '/^tps = /{ print $3; exit }' "$out"
}

# redis_rps clients requests out: one redis-benchmark run of the bucket script.
redis_rps() {
	redis-benchmark -s "$REDIS_SOCK" -c "$1" -n "$2" --csv -r $NKEYS \
		EVALSHA "$SHA" 1 k:__rand_int__ $CAPACITY $REFILL 1 >"$3" 2>&1 ||
		{ cat "$3"; die "redis-benchmark failed"; }
	! grep -qi 'error' "$3" || { cat "$3"; die "redis-benchmark got errors"; }
	awk -F'"' '$2 != "test" && $4 != "" { print $4; exit }' "$3"
}

# redis_tps clients: a one-second probe sizes a run of about $DURATION seconds.
redis_tps() {
	local rps n
	rps=$(redis_rps "$1" 20000 "$OUT/redis.c$1.r$round.probe.txt")
	n=$(awk -v r="$rps" -v d="$DURATION" 'BEGIN { n = int(r * d); print (n < 1000 ? 1000 : n) }')
	redis_rps "$1" "$n" "$OUT/redis.c$1.r$round.txt"
}

# median values...: the middle value (the mean of the two middle ones).
median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
		print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ensure_packages postgresql-client-15 redis-server redis-tools gnuplot-nox
build_and_install
start_cluster "resilience.max_keys = 200000" "max_connections = 100" "shared_buffers = 256MB"
start_redis
OUT="$WORK/chart"
mkdir -p "$OUT"

say "Setting up ($NKEYS keys pre-populated in shared memory and in Redis)"
psql -X -q -v ON_ERROR_STOP=1 >"$OUT/setup.txt" 2>&1 <<EOF || { cat "$OUT/setup.txt"; die "setup failed"; }
CREATE EXTENSION resilience;
SELECT count(*) FROM (SELECT resilience.rate_limit('k' || i, $CAPACITY, $REFILL)
                        FROM generate_series(1, $NKEYS) i) AS warm;
EOF
SHA=$(redis-cli -s "$REDIS_SOCK" SCRIPT LOAD "$(cat "$BENCH_DIR/bucket.lua")")
redis-cli -s "$REDIS_SOCK" EVAL "for i = 0, $NKEYS - 1 do
	local k = string.format('k:%012d', i)
	redis.call('HSET', k, 'tokens', ARGV[1], 'ts', 0)
	redis.call('PEXPIRE', k, 600000)
end" 0 $CAPACITY >/dev/null

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
DAT="$OUT/ratelimit-clients.dat"
{
	echo "# rate-limit throughput (calls/s) against clients: make bench-chart, $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "# $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), shared with other work: noisy"
	echo "# PostgreSQL $(psql -X -Atc 'SHOW server_version'), unix socket, pgbench -n -M prepared -T $DURATION;" \
		"Redis $(redis-server --version | awk '{ print $3 }' | cut -d= -f2), unix socket, redis-benchmark EVALSHA"
	echo "# random keys: $NKEYS, bucket capacity $CAPACITY refill $REFILL/s cost 1 (every call admitted)"
	echo "# median of $ROUNDS rounds of ${DURATION}s runs, taking turns (raw runs in the comments below)"
	echo "# clients select1 rate_limit redis_lua"
} >"$DAT"
declare -A RUNS
for round in $(seq "$ROUNDS"); do
	for c in $CLIENT_COUNTS; do
		s=$(pgbench_tps "$c" select1.sql)
		r=$(pgbench_tps "$c" rate_limit_random.sql)
		l=$(redis_tps "$c")
		say "-- round $round, $c client(s): SELECT 1 $s, rate_limit $r, Redis $l"
		RUNS[select1,$c]+=" $s"
		RUNS[rate_limit,$c]+=" $r"
		RUNS[redis,$c]+=" $l"
	done
done
for c in $CLIENT_COUNTS; do
	# shellcheck disable=SC2086
	printf '%s %.0f %.0f %.0f\n' "$c" "$(median ${RUNS[select1,$c]})" \
		"$(median ${RUNS[rate_limit,$c]})" "$(median ${RUNS[redis,$c]})" >>"$DAT"
done
for c in $CLIENT_COUNTS; do
	echo "# $c clients, each round: SELECT 1${RUNS[select1,$c]}; rate_limit${RUNS[rate_limit,$c]}; Redis${RUNS[redis,$c]}" >>"$DAT"
done
echo "# load average $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after" >>"$DAT"

gnuplot <<EOF || die "gnuplot failed"
set terminal pngcairo size 800,520 font "sans,10" noenhanced
set output "$OUT/ratelimit-clients.png"
set title "Rate-limit decisions per second vs clients (median of $ROUNDS; $(nproc) CPUs shared with other work: noisy)"
set xlabel "clients"
set ylabel "calls per second"
set logscale x 2
set xrange [0.8:$(echo "$CLIENT_COUNTS" | awk '{ print $NF * 1.25 }')]
set xtics ($(echo "$CLIENT_COUNTS" | sed 's/\([0-9]\+\)/"\1" \1/g; s/ "/, "/g'))
set yrange [0:*]
set format y "%.0s%c"
set key below
set grid ytics
plot "$DAT" using 1:2 with linespoints lw 2 pt 7 title "SELECT 1 (pgbench)", \
     "$DAT" using 1:3 with linespoints lw 2 pt 5 title "resilience.rate_limit, random keys (pgbench)", \
     "$DAT" using 1:4 with linespoints lw 2 pt 9 title "Redis + Lua token bucket, random keys (redis-benchmark)"
EOF

mkdir -p "$CHART_DIR"
cp "$DAT" "$OUT/ratelimit-clients.png" "$CHART_DIR/"
say ""
cat "$DAT"
say "wrote $CHART_DIR/ratelimit-clients.dat and ratelimit-clients.png"
