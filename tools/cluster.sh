# Sourced by tools/test.sh, tools/demo.sh and bench/run.sh: everything needed
# to go from a fresh Debian 12 machine to a running throwaway cluster with the
# extension preloaded.
#
#   ensure_packages [extra debian packages...]   (root: apt-get what is missing)
#   build_and_install      copy the tree, build it, install it into a private
#                          copy of the PostgreSQL installation ($INST)
#   start_cluster [conf lines...]   initdb + start on a private socket dir
#   stop_cluster           (also runs from the EXIT trap)
#
# PostgreSQL refuses to run as root, so when we are root everything after
# apt-get runs as the unprivileged "postgres" user ($RUNAS).  Nothing is
# written to the checkout and nothing is installed outside $WORK.

set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=${PG_MAJOR:-15}
BASE_PACKAGES=(build-essential "postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR"
	"postgresql-$PG_MAJOR-pgtap" libtap-parser-sourcehandler-pgtap-perl
	libipc-run-perl libcurl4-openssl-dev librabbitmq-dev python3-prometheus-client)

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Install the Debian packages that are missing (apt-get update first).
ensure_packages() {
	local missing=() p
	for p in "${BASE_PACKAGES[@]}" "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing packages (run as root to install): ${missing[*]}"
	say "Installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Run a command as the unprivileged owner of $WORK.
as_owner() {
	if [ -n "$RUNAS" ]; then
		runuser -u "$RUNAS" -- env PATH="$PATH" "$@"
	else
		"$@"
	fi
}

# Create $WORK, copy the PostgreSQL installation and the source tree into it,
# build the extension and install it into the copy.  The server is relocatable,
# so the copy finds its own share and lib directories.
build_and_install() {
	local sys_bindir
	sys_bindir=$(/usr/lib/postgresql/$PG_MAJOR/bin/pg_config --bindir 2>/dev/null) ||
		die "PostgreSQL $PG_MAJOR server development files are not installed"
	RUNAS=""
	[ "$(id -u)" -eq 0 ] && RUNAS=postgres
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/resilience.XXXXXX")
	chmod 755 "$WORK"
	mkdir -p "$WORK/inst/usr/lib/postgresql" "$WORK/inst/usr/share/postgresql" "$WORK/inst/usr/include"
	cp -a "/usr/lib/postgresql/$PG_MAJOR" "$WORK/inst/usr/lib/postgresql/"
	cp -a "/usr/share/postgresql/$PG_MAJOR" "$WORK/inst/usr/share/postgresql/"
	cp -a /usr/include/postgresql "$WORK/inst/usr/include/"
	rm -f "$WORK"/inst/usr/share/postgresql/"$PG_MAJOR"/extension/resilience*
	mkdir -p "$WORK/src"
	tar -C "$SRC_DIR" --exclude=.git --exclude=results --exclude=tmp_check \
		--exclude=output_iso --exclude='*.o' --exclude='*.so' --exclude='*.bc' -cf - . |
		tar -C "$WORK/src" -xf -
	[ -n "$RUNAS" ] && chown -R "$RUNAS:" "$WORK"
	BINDIR="$WORK/inst/usr/lib/postgresql/$PG_MAJOR/bin"
	PG_CONFIG="$BINDIR/pg_config"
	export PATH="$BINDIR:$PATH"
	say "Building resilience in $WORK/src"
	if ! as_owner make -s -C "$WORK/src" -j2 PG_CONFIG="$PG_CONFIG" install >"$WORK/build.log" 2>&1; then
		cat "$WORK/build.log"
		die "build failed"
	fi
	grep -E 'warning:' "$WORK/build.log" || true
}

# initdb and start a cluster on a private socket directory (no TCP).
# Extra arguments are appended to postgresql.conf.
start_cluster() {
	DATA="$WORK/data"
	SOCK="$WORK/sock"
	mkdir -p "$SOCK"
	[ -n "$RUNAS" ] && chown "$RUNAS:" "$SOCK"
	as_owner "$BINDIR/initdb" -D "$DATA" -A trust -U postgres --no-sync >"$WORK/initdb.log" 2>&1 ||
		{ cat "$WORK/initdb.log"; die "initdb failed"; }
	PORT=${PORT:-$((50000 + RANDOM % 10000))}
	{
		echo "shared_preload_libraries = 'resilience'"
		echo "listen_addresses = ''"
		echo "unix_socket_directories = '$SOCK'"
		echo "port = $PORT"
		echo "fsync = off"
		echo "max_connections = 50"
		echo "log_line_prefix = '%m [%p] %b '"
		local line
		for line in "$@"; do echo "$line"; done
	} >>"$DATA/postgresql.conf"
	CLUSTER_STARTED=1
	as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$WORK/server.log" -w start >/dev/null ||
		{ tail -n 30 "$WORK/server.log"; die "server did not start"; }
	export PGHOST="$SOCK" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres
	PG_PID=$(head -n 1 "$DATA/postmaster.pid")
}

stop_cluster() {
	local pid
	if [ -n "${CLUSTER_STARTED:-}" ]; then
		pid=$(head -n 1 "$DATA/postmaster.pid" 2>/dev/null || echo "${PG_PID:-}")
		as_owner "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 ||
			{ [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null; } || true
		CLUSTER_STARTED=""
	fi
}

# Stop what we started; keep $WORK only when asked to (KEEP_WORK=1).
cleanup() {
	local rc=$?
	stop_cluster
	if [ -n "${WORK:-}" ] && [ -z "${KEEP_WORK:-}" ]; then
		rm -rf "$WORK"
	elif [ -n "${WORK:-}" ]; then
		say "kept $WORK"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
