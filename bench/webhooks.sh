# Sourced by bench/run.sh: the webhooks section of `make bench` (issue 18).
#   relay throughput (events/s) to the local HTTP receiver with Standard
#   Webhooks signing on (route option signing_secret) against the same
#   route without it, measured by turns in this one run.
#   BENCH_WEBHOOK_EVENTS=20000   backlog drained in each run
#   BENCH_WEBHOOK_ROUNDS=2       runs of each, taking turns
# Alone: BENCH_SECTIONS=webhooks make bench PG=15

WEBHOOK_EVENTS=${BENCH_WEBHOOK_EVENTS:-20000}
WEBHOOK_ROUNDS=${BENCH_WEBHOOK_ROUNDS:-2}

run_webhooks_section() {
	local round
	[ -n "$RECEIVER_PID" ] || start_receiver
	psql -X -q -v ON_ERROR_STOP=1 -c "DELETE FROM resilience.outbox_routes WHERE topic_pattern LIKE 'bench.webhook.%'" \
		-c "INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options, enabled) VALUES
			('bench.webhook.unsigned', 'http', '$RECEIVER_URL/unsigned', '{}', false),
			('bench.webhook.signed', 'http', '$RECEIVER_URL/signed',
			 '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}', false)" >/dev/null ||
		die "webhooks setup failed"
	for round in $(seq "$WEBHOOK_ROUNDS"); do
		OUTBOX_EVENTS=$WEBHOOK_EVENTS outbox_drain webhook_unsigned "relay to HTTP, unsigned (events/s)" bench.webhook.unsigned
		OUTBOX_EVENTS=$WEBHOOK_EVENTS outbox_drain webhook_signed "relay to HTTP, signed (events/s)" bench.webhook.signed
	done
	# the receiver saw signatures on the signed route only
	grep -q $'/signed\t[^\t]*\t[^\t]*webhook-signature=v1,' "$WORK/receiver.log" ||
		die "the signed route's requests carry no signature"
}

report_webhooks() {
	ratio_line "relay to HTTP: signed / unsigned (signing costs < 10%)" webhook_signed webhook_unsigned ">=" 0.9
}
