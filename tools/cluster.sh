# Sourced by tools/test.sh, tools/demo.sh and bench/run.sh: everything needed
# to go from a fresh Debian 12 machine to a running throwaway cluster with the
# extension preloaded.
#
#   ensure_packages [extra debian packages...]   (root: apt-get what is missing)
#   build_and_install [major]   copy the tree, build it, install it into a
#                          private copy of that PostgreSQL installation
#   use_version major      point BINDIR, PG_CONFIG, BUILD and PATH at a
#                          version built by build_and_install
#   start_cluster [conf lines...]   initdb + start on a private socket dir
#   stop_cluster           (also runs from the EXIT trap)
#
# PG_MAJOR (default 15) is the version used when none is named.  PostgreSQL 15
# is Debian 12's package; 18 comes from tools/pg18.sh (a PGDG install, or the
# release tarball built once into a cache).  Every version gets its own
# installation copy ($WORK/pgNN), build directory ($WORK/buildNN) and data
# directory ($WORK/dataNN) under one $WORK.
#
# PostgreSQL refuses to run as root, so when we are root everything after
# apt-get runs as the unprivileged "postgres" user ($RUNAS).  Nothing is
# written to the checkout and nothing is installed outside $WORK (and the
# PostgreSQL 18 cache).

set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=${PG_MAJOR:-15}
# Debian 12's PostgreSQL 15 is always needed: pg_prove and pgTAP's SQL files
# come with it, and the pg_upgrade suite upgrades from it.
BASE_PACKAGES=(build-essential postgresql-15 postgresql-server-dev-15
	postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl
	libipc-run-perl libcurl4-openssl-dev librabbitmq-dev python3-prometheus-client)
# -Wall -Wextra less the noise of PostgreSQL's own headers and style.
WARN_CFLAGS="-Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare"

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

# The extra Debian packages the given TAP files need (for ensure_packages).
tap_packages() { # tap files...
	local f
	for f in "$@"; do
		case $f in
		*040_schedule_croniter.pl) echo python3-croniter ;; # the independent cron implementation
		esac
	done
}

# Run a command as the unprivileged owner of $WORK.
as_owner() {
	if [ -n "$RUNAS" ]; then
		runuser -u "$RUNAS" -- env PATH="$PATH" "$@"
	else
		"$@"
	fi
}

# The bindir of an installed PostgreSQL major version (18: found or built).
system_bindir() { # major
	if [ -x "/usr/lib/postgresql/$1/bin/pg_config" ] &&
		[ -f "$("/usr/lib/postgresql/$1/bin/pg_config" --pgxs)" ]; then
		echo "/usr/lib/postgresql/$1/bin"
	elif [ "$1" = 18 ]; then
		bash "$SRC_DIR/tools/pg18.sh"
	else
		die "PostgreSQL $1 server development files are not installed"
	fi
}

# Create $WORK once.
make_work() {
	[ -n "${WORK:-}" ] && return 0
	RUNAS=""
	[ "$(id -u)" -eq 0 ] && RUNAS=postgres
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/resilience.XXXXXX")
	chmod 755 "$WORK"
	[ -n "$RUNAS" ] && chown "$RUNAS:" "$WORK"
	return 0
}

# Copy a PostgreSQL installation into $WORK and build the extension into it.
# The server is relocatable, so the copy finds its own share and lib
# directories.
build_and_install() { # [major]
	local v=${1:-$PG_MAJOR} sys_bindir inst
	sys_bindir=$(system_bindir "$v") || exit 1
	make_work
	inst="$WORK/pg$v"
	if [ "${sys_bindir#/usr/lib/postgresql/}" != "$sys_bindir" ]; then
		# Debian's layout: bin and lib, share and include in three places
		mkdir -p "$inst/usr/lib/postgresql" "$inst/usr/share/postgresql" "$inst/usr/include"
		cp -a "/usr/lib/postgresql/$v" "$inst/usr/lib/postgresql/"
		cp -a "/usr/share/postgresql/$v" "$inst/usr/share/postgresql/"
		cp -a /usr/include/postgresql "$inst/usr/include/"
		eval "BINDIR_$v=\$inst/usr/lib/postgresql/$v/bin"
	else
		# one prefix (a source build)
		cp -a "$(dirname "$sys_bindir")" "$inst"
		eval "BINDIR_$v=\$inst/bin"
	fi
	use_version "$v"
	build_extension
}

# Build the tree into $BUILD and install it into the selected installation
# copy (warnings shown; implicit declarations fatal: see the Makefile).
# pgTAP's SQL files (Debian's 15 package) go into every copy: they load into
# later versions too.
build_extension() {
	rm -f "$("$PG_CONFIG" --sharedir)"/extension/resilience*
	[ -f "$("$PG_CONFIG" --sharedir)/extension/pgtap.control" ] ||
		cp /usr/share/postgresql/15/extension/pgtap* "$("$PG_CONFIG" --sharedir)/extension/"
	mkdir -p "$BUILD"
	tar -C "$SRC_DIR" --exclude=.git --exclude=results --exclude=tmp_check \
		--exclude=output_iso --exclude='*.o' --exclude='*.so' --exclude='*.bc' -cf - . |
		tar -C "$BUILD" -xf -
	[ -n "$RUNAS" ] && chown -R "$RUNAS:" "$WORK/pg$PG_MAJOR" "$BUILD"
	say "Building resilience for PostgreSQL $("$PG_CONFIG" --version | cut -d' ' -f2) in $BUILD"
	if ! as_owner make -s -C "$BUILD" -j2 PG_CONFIG="$PG_CONFIG" PG_CFLAGS="$WARN_CFLAGS" install \
		>"$BUILD/build.log" 2>&1; then
		cat "$BUILD/build.log"
		die "build failed"
	fi
	grep -E 'warning:' "$BUILD/build.log" || true
}

# Select a version prepared by build_and_install.
use_version() { # major
	local var="BINDIR_$1"
	[ -n "${!var:-}" ] || die "PostgreSQL $1 was not prepared"
	PG_MAJOR=$1
	BINDIR=${!var}
	PG_CONFIG="$BINDIR/pg_config"
	BUILD="$WORK/build$1"
	PATH="$BINDIR:${PATH#"${PREV_BINDIR:-}:"}"
	PREV_BINDIR=$BINDIR
	export PATH
}

# initdb and start a cluster on a private socket directory (no TCP).
# Extra arguments are appended to postgresql.conf.
start_cluster() {
	DATA="$WORK/data$PG_MAJOR"
	SERVER_LOG="$WORK/server$PG_MAJOR.log"
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
	as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$SERVER_LOG" -w start >/dev/null ||
		{ tail -n 30 "$SERVER_LOG"; die "server did not start"; }
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
