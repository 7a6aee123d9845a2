# Sourced by bench/run.sh: the amqp section of `make bench` (issue 8).
#   amqp: relay throughput to a private RabbitMQ node on loopback (events/s,
#         every event confirmed by the broker: publisher confirms, persistent
#         messages, a durable queue), with and without keys;
#   BENCH_AMQP_EVENTS=50000   backlog drained in each amqp run

AMQP_EVENTS=${BENCH_AMQP_EVENTS:-50000}
BROKER_PID=""

start_broker() {
	local _
	ensure_packages rabbitmq-server python3-pika
	mkdir -p "$WORK/rabbit"
	[ -n "$RUNAS" ] && chown "$RUNAS:" "$WORK/rabbit"
	# as the unprivileged owner; the helper's own pid comes in the port file
	as_owner perl "$SRC_DIR/test/amqp_broker.pl" "$WORK/rabbit/node" "$WORK/rabbit/port" \
		>"$WORK/rabbit/broker.log" 2>&1 &
	BROKER_PID=$!
	for _ in $(seq 600); do
		[ -s "$WORK/rabbit/port" ] && break
		kill -0 "$BROKER_PID" 2>/dev/null || break
		sleep 0.2
	done
	[ -s "$WORK/rabbit/port" ] || { cat "$WORK/rabbit/broker.log"; die "the RabbitMQ node did not start"; }
	read -r BROKER_PORT BROKER_STARTUP BROKER_HELPER <"$WORK/rabbit/port"
	as_owner /usr/bin/python3 "$SRC_DIR/test/amqp_consumer.py" --port "$BROKER_PORT" \
		declare bench bench '#' >/dev/null || die "declaring the bench queue failed"
}

# Stop the helper (it stops its node and epmd), by the pid it reported.
stop_broker() {
	local _
	[ -n "$BROKER_PID" ] || return 0
	if [ -n "${BROKER_HELPER:-}" ]; then
		kill "$BROKER_HELPER" 2>/dev/null || true
		for _ in $(seq 300); do
			kill -0 "$BROKER_HELPER" 2>/dev/null || break
			sleep 0.2
		done
	else
		kill "$BROKER_PID" 2>/dev/null || true
	fi
	wait "$BROKER_PID" 2>/dev/null || true
	BROKER_PID=""
	BROKER_HELPER=""
}

# amqp_drain id label with-keys: publish a backlog with the route disabled,
# enable it, time until the backlog is confirmed by the broker.
amqp_drain() {
	local id=$1 key="NULL" t0 t1
	[ "$3" = keys ] && key="'k-' || (i % 100)"
	say "-- $2: $AMQP_EVENTS events"
	psql -X -q -v ON_ERROR_STOP=1 -c "UPDATE resilience.outbox_routes SET enabled = false WHERE topic_pattern = 'bench.amqp'" \
		-c "SELECT count(resilience.outbox_publish('bench.amqp', jsonb_build_object('order', i, 'amount', 1999), $key)) FROM generate_series(1, $AMQP_EVENTS) i" >/dev/null
	t0=$(now_ms)
	psql -X -q -c "UPDATE resilience.outbox_routes SET enabled = true WHERE topic_pattern = 'bench.amqp'"
	while [ "$(psql -X -Atc "SELECT count(*) FROM resilience.outbox WHERE topic = 'bench.amqp'")" != 0 ]; do
		sleep 0.05
		[ $(($(now_ms) - t0)) -lt 600000 ] || die "the relay did not drain bench.amqp in 10 minutes"
	done
	t1=$(now_ms)
	record "$id" "$2" "$(awk -v n="$AMQP_EVENTS" -v ms=$((t1 - t0)) 'BEGIN { printf "%.0f", n * 1000 / ms }')"
}

run_amqp_section() {
	start_broker
	psql -X -q -v ON_ERROR_STOP=1 -c "DELETE FROM resilience.outbox_routes WHERE topic_pattern = 'bench.amqp'" \
		-c "INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options, enabled)
		    VALUES ('bench.amqp', 'amqp', 'amqp://guest:guest@127.0.0.1:$BROKER_PORT', '{\"exchange\": \"bench\"}', false)" >/dev/null
	amqp_drain amqp_drain "relay to RabbitMQ, confirmed (events/s)" nokeys
	amqp_drain amqp_drain_keys "relay to RabbitMQ, confirmed, 100 keys (events/s)" keys
	AMQP_QUEUED=$(as_owner /usr/bin/python3 "$SRC_DIR/test/amqp_consumer.py" --port "$BROKER_PORT" count bench)
	psql -X -q -c "DELETE FROM resilience.outbox_routes WHERE topic_pattern = 'bench.amqp'"
	stop_broker
}

report_amqp() {
	awk -v t="$(tput amqp_drain)" 'BEGIN { ok = (t >= 5000) ? "PASS" : "BELOW"; printf "  %-48s %7.0f   >= 5000  %s\n", "relay to RabbitMQ, confirmed, events/s", t, ok }'
	awk -v t="$(tput amqp_drain_keys)" 'BEGIN { printf "  %-48s %7.0f\n", "  the same, 100 keys (per-key chains)", t }'
	say "  RabbitMQ node started in ${BROKER_STARTUP} s; messages in its queue afterwards: $AMQP_QUEUED (expected $((2 * AMQP_EVENTS)))"
}
