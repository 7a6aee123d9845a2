# Sourced by bench/run.sh: the outbox section of `make bench` (issue 5).
#   outbox_publish in a transaction vs a plain INSERT of the same row;
#   relay throughput (events/s) to NOTIFY and to the local HTTP receiver,
#   and the same backlog drained by a DELETE ... SKIP LOCKED ... RETURNING
#   loop to NOTIFY; commit-to-delivery latency p50/p99 at 100 events/s;
#   a sustained publish-and-relay run at 80% of the HTTP relay's capacity,
#   with the outbox table's size every minute.
#   BENCH_OUTBOX_EVENTS=50000   backlog drained in the throughput runs
#   BENCH_OUTBOX_MINUTES=10     length of the sustained run (0 skips it)
#   BENCH_OUTBOX_RATE=N         its publish rate (default: 80% of the relay's
#                               capacity measured while publishing)
#   BENCH_OUTBOX_PARTS="publish notify http latency sustained"   which parts
#                               (sustained needs http: it starts from its figure)
# The publish runs (against the plain INSERT) and the NOTIFY drains (against
# the reference loop) take turns BENCH_ROUNDS times, like the other sections.
# Alone: BENCH_SECTIONS=outbox BENCH_OUTBOX_PARTS="publish notify" make bench

OUTBOX_EVENTS=${BENCH_OUTBOX_EVENTS:-50000}
OUTBOX_MINUTES=${BENCH_OUTBOX_MINUTES:-10}
OUTBOX_PARTS=${BENCH_OUTBOX_PARTS:-publish notify http latency sustained}
outbox_part() { [[ " $OUTBOX_PARTS " == *" $1 "* ]]; }
RECEIVER_PID=""

start_receiver() {
	rm -f "$WORK/receiver.port"
	# (not through runuser: $! must be the receiver itself, so that kill stops it)
	perl "$SRC_DIR/test/receiver.pl" --port-file "$WORK/receiver.port" \
		--log "$WORK/receiver.log" --max-seconds 7200 &
	RECEIVER_PID=$!
	local _
	for _ in $(seq 100); do
		[ -s "$WORK/receiver.port" ] && break
		sleep 0.05
	done
	[ -s "$WORK/receiver.port" ] || die "the HTTP receiver did not start"
	RECEIVER_URL="http://127.0.0.1:$(cat "$WORK/receiver.port")"
}

stop_receiver() {
	[ -n "$RECEIVER_PID" ] && kill "$RECEIVER_PID" 2>/dev/null
	RECEIVER_PID=""
}

now_ms() { date +%s%3N; }

# The relay's delivered counter for a route (shared memory: polling it
# costs the relay nothing, where counting the table's rows every 50 ms took
# a good part of a core from it).  The drain waits for it in the server.
route_delivered() {
	psql -X -Atc "SELECT coalesce(sum(s.delivered), 0) FROM resilience._outbox_relay_stats() s
		JOIN resilience.outbox_routes r ON r.id = s.route_id WHERE r.topic_pattern = '$1'"
}

# drain id label route-topic: publish a backlog with the route disabled,
# enable it (which wakes the relay), time until the route's backlog is gone:
# until the relay counted them all delivered, then (once) that no row is left.
outbox_drain() {
	local id=$1 topic=$3 t0 t1 goal
	say "-- $2: $OUTBOX_EVENTS events"
	psql -X -q -v ON_ERROR_STOP=1 -c "UPDATE resilience.outbox_routes SET enabled = false WHERE topic_pattern = '$topic'" \
		-c "SELECT count(resilience.outbox_publish('$topic', jsonb_build_object('order', i, 'amount', 1999))) FROM generate_series(1, $OUTBOX_EVENTS) i" >/dev/null
	goal=$(($(route_delivered "$topic") + OUTBOX_EVENTS))
	t0=$(now_ms)
	psql -X -q -c "UPDATE resilience.outbox_routes SET enabled = true WHERE topic_pattern = '$topic'"
	# wait inside the server (a psql per poll cost more than the poll)
	psql -X -q -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
		WHILE (SELECT coalesce(sum(s.delivered), 0) FROM resilience._outbox_relay_stats() s
			   JOIN resilience.outbox_routes r ON r.id = s.route_id WHERE r.topic_pattern = '$topic') < $goal LOOP
			PERFORM pg_sleep(0.005);
			IF clock_timestamp() - statement_timestamp() > interval '10 minutes' THEN RAISE 'not drained'; END IF;
		END LOOP; END \$\$" || die "the relay did not drain $topic in 10 minutes"
	while [ "$(psql -X -Atc "SELECT count(*) FROM resilience.outbox o JOIN resilience.outbox_routes r ON r.id = o.route_id WHERE r.topic_pattern = '$topic'")" != 0 ]; do
		sleep 0.05
		[ $(($(now_ms) - t0)) -lt 600000 ] || die "the relay did not drain $topic in 10 minutes"
	done
	t1=$(now_ms)
	record "$id" "$2" "$(awk -v n="$OUTBOX_EVENTS" -v ms=$((t1 - t0)) 'BEGIN { printf "%.0f", n * 1000 / ms }')"
}

outbox_reference_drain() {
	local t0 t1
	say "-- reference: DELETE ... SKIP LOCKED ... RETURNING loop to NOTIFY: $OUTBOX_EVENTS events"
	psql -X -q -c "INSERT INTO bench_outbox (topic, payload) SELECT 'bench.ref', jsonb_build_object('order', i, 'amount', 1999) FROM generate_series(1, $OUTBOX_EVENTS) i"
	t0=$(now_ms)
	psql -X -q -c "CALL bench_reference_drain(500)"
	t1=$(now_ms)
	record ref_drain "reference: DELETE SKIP LOCKED loop to NOTIFY (events/s)" \
		"$(awk -v n="$OUTBOX_EVENTS" -v ms=$((t1 - t0)) 'BEGIN { printf "%.0f", n * 1000 / ms }')"
}

outbox_latency() {
	say "-- commit-to-delivery latency, 100 events/s for 30 s"
	local before
	before=$(wc -l <"$WORK/receiver.log")
	pgbench -n -c 2 -j 2 -R 100 -T 30 -f "$BENCH_DIR/outbox_latency.sql" >"$OUT/outbox_latency.txt" 2>&1 ||
		{ cat "$OUT/outbox_latency.txt"; die "pgbench latency run failed"; }
	sleep 2
	tail -n +$((before + 1)) "$WORK/receiver.log" | awk -F'\t' '$4 == "/lat" && $2 == 200 {
		if (match($7, /"t": "[0-9.]+"/)) { t = substr($7, RSTART + 6, RLENGTH - 7); print $1 - t }
	}' | sort -n >"$OUT/outbox_latency_ms.txt"
	LAT_N=$(wc -l <"$OUT/outbox_latency_ms.txt")
	LAT_P50=$(awk -v n="$LAT_N" 'NR == int(n * 0.50 + 0.5) { printf "%.1f", $1 }' "$OUT/outbox_latency_ms.txt")
	LAT_P99=$(awk -v n="$LAT_N" 'NR == int(n * 0.99 + 0.5) { printf "%.1f", $1 }' "$OUT/outbox_latency_ms.txt")
}

outbox_size() { psql -X -Atc "SELECT pg_total_relation_size('resilience.outbox')"; }
outbox_backlog() { psql -X -Atc "SELECT count(*) FROM resilience.outbox"; }

# The relay's capacity while publishers share the machine with it: publish
# for 60 s at the rate it drained a backlog alone, and count what it
# delivered meanwhile.  Then let it drain what is left.
outbox_calibrate() {
	local probe=$(tput http_drain) published backlog t0
	say "-- calibration: HTTP relay capacity while publishing (60 s at $probe events/s)"
	pgbench -n -c 4 -j 2 -R "$probe" -T 60 -f "$BENCH_DIR/outbox_sustained.sql" \
		>"$OUT/outbox_calibration.txt" 2>&1 || { cat "$OUT/outbox_calibration.txt"; die "pgbench calibration failed"; }
	published=$(awk '/actually processed/ { print $NF; exit }' "$OUT/outbox_calibration.txt")
	backlog=$(outbox_backlog)
	MIXED_CAPACITY=$(awk -v p="$published" -v b="$backlog" 'BEGIN { printf "%d", (p - b) / 60 }')
	t0=$(now_ms)
	while [ "$(outbox_backlog)" != 0 ]; do
		sleep 1
		[ $(($(now_ms) - t0)) -lt 900000 ] || die "the relay did not drain the calibration backlog"
	done
}

outbox_sustained() {
	local rate minutes=$OUTBOX_MINUTES i
	outbox_calibrate
	rate=${BENCH_OUTBOX_RATE:-$(awk -v t="$MIXED_CAPACITY" 'BEGIN { printf "%d", t * 0.8 }')}
	SUSTAINED_RATE=$rate
	say "-- sustained: publish and relay at $rate events/s (80% of $MIXED_CAPACITY/s) for $minutes min"
	psql -X -q -c "VACUUM resilience.outbox"
	SIZES=("$(outbox_size)")
	pgbench -n -c 4 -j 2 -R "$rate" -T $((minutes * 60)) -f "$BENCH_DIR/outbox_sustained.sql" \
		>"$OUT/outbox_sustained.txt" 2>&1 &
	local pgb=$!
	for i in $(seq "$minutes"); do
		sleep 60
		SIZES+=("$(outbox_size)")
	done
	wait "$pgb" || { cat "$OUT/outbox_sustained.txt"; die "pgbench sustained run failed"; }
	SUSTAINED_TPS=$(awk '/^tps = / { printf "%.0f", $3; exit }' "$OUT/outbox_sustained.txt")
	SUSTAINED_BACKLOG=$(psql -X -Atc "SELECT count(*) FROM resilience.outbox")
}

run_outbox_section() {
	start_receiver
	psql -X -q -v ON_ERROR_STOP=1 -v receiver="$RECEIVER_URL" -f "$BENCH_DIR/outbox_setup.sql" >"$OUT/outbox_setup.txt" 2>&1 ||
		{ cat "$OUT/outbox_setup.txt"; die "outbox setup failed"; }
	local round
	for round in $(seq "$ROUNDS"); do
		if outbox_part publish; then
			run_pgbench outbox_insert "plain INSERT of the same row, in a transaction" outbox_insert.sql
			run_pgbench outbox_publish "outbox_publish, in a transaction" outbox_publish.sql
			run_pgbench outbox_publish_nokey "outbox_publish without a key, in a transaction" outbox_publish_nokey.sql
		fi
		psql -X -q -c "TRUNCATE resilience.outbox, bench_outbox"
		if outbox_part notify; then
			outbox_drain notify_drain "relay to NOTIFY (events/s)" bench.notify
			outbox_reference_drain
		fi
	done
	if outbox_part http; then outbox_drain http_drain "relay to the local HTTP receiver (events/s)" bench.http; fi
	if outbox_part latency; then outbox_latency; fi
	if outbox_part sustained && outbox_part http && [ "$OUTBOX_MINUTES" -gt 0 ]; then outbox_sustained; fi
}

report_outbox() {
	if outbox_part publish; then
		ratio_line "outbox_publish / plain INSERT" outbox_publish outbox_insert ">=" 0.8
		ratio_line "outbox_publish without a key / plain INSERT" outbox_publish_nokey outbox_insert
	fi
	if outbox_part notify; then
		ratio_line "relay to NOTIFY / reference loop" notify_drain ref_drain ">=" 0.8
		awk -v t="$(tput notify_drain)" 'BEGIN { ok = (t >= 20000) ? "PASS" : "BELOW"; printf "  %-48s %7.0f   >= 20000 %s\n", "relay to NOTIFY, events/s", t, ok }'
	fi
	if outbox_part http; then
		awk -v t="$(tput http_drain)" 'BEGIN { ok = (t >= 5000) ? "PASS" : "BELOW"; printf "  %-48s %7.0f   >= 5000  %s\n", "relay to HTTP (loopback), events/s", t, ok }'
	fi
	if outbox_part latency; then
		awk -v p="$LAT_P99" -v m="$LAT_P50" -v n="$LAT_N" 'BEGIN { ok = (p <= 20) ? "PASS" : "ABOVE"; printf "  %-48s %7.1f   <= 20    %s   (p50 %.1f ms, %d events)\n", "commit-to-delivery p99 at 100/s, ms", p, ok, m, n }'
	fi
	if outbox_part sustained && outbox_part http && [ "$OUTBOX_MINUTES" -gt 0 ]; then
		say "  HTTP relay capacity while publishing (calibration): $MIXED_CAPACITY events/s"
		say "  sustained run: $SUSTAINED_RATE events/s asked, $SUSTAINED_TPS published/s, backlog at the end: $SUSTAINED_BACKLOG"
		say "  outbox table size (bytes) at start and after each minute: ${SIZES[*]}"
	fi
}
