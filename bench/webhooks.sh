# Sourced by bench/run.sh: the webhooks section of `make bench` (issue 18).
#   relay throughput (events/s) to a local HTTP receiver with Standard
#   Webhooks signing on (route option signing_secret) against the same
#   route without it, measured by turns in this one run, and the relay
#   worker's CPU per event.  The receiver is bench/fast_receiver.c (one C
#   epoll loop that answers 200 and neither logs nor verifies), so that it
#   is not the bottleneck and the ratio measures the relay's cost of
#   signing; the tests verify the signatures (test/t/050_outbox_signing.pl);
#   long-poll claims: the CPU 100 consumers idling in
#   outbox_claim(..., wait => '30 s') use, and commit-to-claim latency
#   (p50/p99) of one long-polling consumer at 100 events/s.
#   BENCH_WEBHOOK_EVENTS=20000   backlog drained in each run
#   BENCH_WEBHOOK_ROUNDS=2       runs of each, taking turns
# Alone: BENCH_SECTIONS=webhooks make bench PG=15

WEBHOOK_EVENTS=${BENCH_WEBHOOK_EVENTS:-20000}
WEBHOOK_ROUNDS=${BENCH_WEBHOOK_ROUNDS:-2}
FAST_RECEIVER_PID=""

# Build and start bench/fast_receiver.c; sets FAST_RECEIVER_PID, _URL.
start_fast_receiver() {
	local _
	cc -O2 -Wall -o "$WORK/fast_receiver" "$SRC_DIR/bench/fast_receiver.c" ||
		die "cannot build bench/fast_receiver.c"
	rm -f "$WORK/fast_receiver.port" "$WORK/fast_receiver.stats"
	"$WORK/fast_receiver" "$WORK/fast_receiver.port" "$WORK/fast_receiver.stats" &
	FAST_RECEIVER_PID=$!
	for _ in $(seq 100); do
		[ -s "$WORK/fast_receiver.port" ] && break
		sleep 0.05
	done
	[ -s "$WORK/fast_receiver.port" ] || die "the fast HTTP receiver did not start"
	FAST_RECEIVER_URL="http://127.0.0.1:$(cat "$WORK/fast_receiver.port")"
}

stop_fast_receiver() {
	[ -n "$FAST_RECEIVER_PID" ] && kill "$FAST_RECEIVER_PID" 2>/dev/null && wait "$FAST_RECEIVER_PID" 2>/dev/null
	FAST_RECEIVER_PID=""
}

run_webhooks_section() {
	local round kind order worker hz t0 stats
	start_fast_receiver
	psql -X -q -v ON_ERROR_STOP=1 -c "DELETE FROM resilience.outbox_routes WHERE topic_pattern LIKE 'bench.webhook.%'" \
		-c "INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options, enabled) VALUES
			('bench.webhook.unsigned', 'http', '$FAST_RECEIVER_URL/unsigned', '{}', false),
			('bench.webhook.signed', 'http', '$FAST_RECEIVER_URL/signed',
			 '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}', false)" >/dev/null ||
		die "webhooks setup failed"
	# the relay worker's own CPU per event too
	worker=$(psql -X -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'resilience worker' AND datname = current_database()")
	hz=$(getconf CLK_TCK)
	# turns alternate which goes first, so that neither always drains the
	# table the other has just left full of dead rows
	for round in $(seq "$WEBHOOK_ROUNDS"); do
		order="unsigned signed"
		[ $((round % 2)) = 0 ] && order="signed unsigned"
		for kind in $order; do
			t0=$(cpu_ticks $worker)
			OUTBOX_EVENTS=$WEBHOOK_EVENTS outbox_drain "webhook_$kind" "relay to HTTP, $kind (events/s)" "bench.webhook.$kind"
			record "webhook_${kind}_cpu" "relay worker CPU per event, $kind (us)" \
				"$(awk -v t=$(($(cpu_ticks $worker) - t0)) -v hz="$hz" -v n="$WEBHOOK_EVENTS" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
		done
	done
	# the receiver saw a signature on every signed request and on no other
	stop_fast_receiver
	stats=$(cat "$WORK/fast_receiver.stats" 2>/dev/null)
	say "-- fast receiver: $stats"
	set -- $stats
	[ "${2:-0}" -ge $((WEBHOOK_EVENTS * WEBHOOK_ROUNDS)) ] && [ "$4" = "$2" ] &&
		[ "${6:-0}" -ge $((WEBHOOK_EVENTS * WEBHOOK_ROUNDS)) ] && [ "$8" = 0 ] ||
		die "the signed route's requests are not all signed, or others are: $stats"
	webhooks_longpoll
}

# CPU ticks (utime + stime) of the given processes, from /proc.
cpu_ticks() {
	local pid sum=0 f
	for pid in "$@"; do
		f=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
		set -- $f
		sum=$((sum + ${12} + ${13}))
	done
	echo "$sum"
}

webhooks_longpoll() {
	local i pids ticks0 ticks1 hz clients=()
	say "-- long poll: 100 idle consumers, then commit-to-claim latency at 100 events/s"
	psql -X -q -v ON_ERROR_STOP=1 -c "DELETE FROM resilience.outbox_routes WHERE topic_pattern = 'bench.lp.%'" \
		-c "INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('bench.lp.%', 'queue', 'bench-lp')" \
		-c "DROP TABLE IF EXISTS bench_lp_latency" -c "CREATE TABLE bench_lp_latency (ms float8)" >/dev/null ||
		die "long-poll setup failed"
	for i in $(seq 100); do
		psql -X -q -c "SELECT count(*) FROM resilience.outbox_claim('bench-idle-$i', 10, '1 min', wait => '30 s')" >/dev/null 2>&1 &
		clients+=($!)
	done
	sleep 3
	pids=$(psql -X -Atc "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE query LIKE '%bench-idle-%' AND pid <> pg_backend_pid()")
	hz=$(getconf CLK_TCK)
	ticks0=$(cpu_ticks $pids)
	sleep 10
	ticks1=$(cpu_ticks $pids)
	record lp_idle_cpu "100 idle long-poll consumers, % of one core" \
		"$(awk -v t=$((ticks1 - ticks0)) -v hz="$hz" 'BEGIN { printf "%.2f", t * 100 / (hz * 10) }')"
	LP_IDLE_N=$(wc -w <<<"$pids")
	# one consumer claiming in a loop, each claim a long poll; pgbench publishes 100/s
	psql -X -q -c "DO \$\$ DECLARE r record; t0 timestamptz := clock_timestamp(); BEGIN
		WHILE clock_timestamp() < t0 + interval '13 s' LOOP
			FOR r IN SELECT * FROM resilience.outbox_claim('bench-lp', 100, '1 min', wait => '1 s') LOOP
				INSERT INTO bench_lp_latency VALUES (extract(epoch FROM clock_timestamp()) * 1000 - (r.payload->>'t')::float8);
				PERFORM resilience.outbox_ack('bench-lp', ARRAY[r.id]);
			END LOOP;
		END LOOP; END \$\$" >"$OUT/longpoll_consumer.txt" 2>&1 &
	i=$!
	sleep 1
	pgbench -n -c 1 -R 100 -T 10 -f "$BENCH_DIR/longpoll_publish.sql" >"$OUT/longpoll_publish.txt" 2>&1 ||
		{ cat "$OUT/longpoll_publish.txt"; die "pgbench long-poll publish failed"; }
	wait "$i" || { cat "$OUT/longpoll_consumer.txt"; die "the long-poll consumer failed"; }
	read -r LP_N LP_P50 LP_P99 < <(psql -X -Atc "SELECT count(*), round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
		round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM bench_lp_latency" | tr '|' ' ')
	for i in "${clients[@]}"; do wait "$i" 2>/dev/null || true; done
}

report_webhooks() {
	ratio_line "relay to HTTP: signed / unsigned (signing costs < 10%)" webhook_signed webhook_unsigned ">=" 0.9
	ratio_line "relay worker CPU per event: unsigned / signed" webhook_unsigned_cpu webhook_signed_cpu ">=" 0.9
	awk -v c="$(tput lp_idle_cpu)" -v n="$LP_IDLE_N" 'BEGIN { ok = (c < 1) ? "PASS" : "ABOVE"; printf "  %-54s %7.2f   <  1    %s   (%d sleeping backends)\n", "100 idle long-poll consumers, % of one core", c, ok, n }'
	awk -v p="$LP_P99" -v m="$LP_P50" -v n="$LP_N" 'BEGIN { ok = (p <= 10) ? "PASS" : "ABOVE"; printf "  %-54s %7.1f   <= 10    %s   (p50 %.1f ms, %d events)\n", "long poll: commit-to-claim p99 at 100/s, ms", p, ok, m, n }'
}
