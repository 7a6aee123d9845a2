# Sourced by bench/run.sh and bench/chart.sh (after tools/cluster.sh).

REDIS_STARTED=""

# Private Redis on a unix socket in $WORK: no TCP, no persistence.
start_redis() {
	REDIS_SOCK="$WORK/redis.sock"
	as_owner redis-server --port 0 --unixsocket "$REDIS_SOCK" --unixsocketperm 700 \
		--save '' --appendonly no --daemonize yes --dir "$WORK" \
		--pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
	REDIS_STARTED=1
	local _
	for _ in $(seq 50); do
		if redis-cli -s "$REDIS_SOCK" ping >/dev/null 2>&1; then
			REDIS_PID=$(cat "$WORK/redis.pid")
			return 0
		fi
		sleep 0.1
	done
	cat "$WORK/redis.log"
	die "redis-server did not start"
}

stop_redis() {
	[ -n "$REDIS_STARTED" ] || return 0
	redis-cli -s "$REDIS_SOCK" shutdown nosave >/dev/null 2>&1 ||
		{ [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID"; }
	REDIS_STARTED=""
}
