#!/usr/bin/env bash
# `make test`: every suite, on every supported PostgreSQL version, against
# throwaway installations and clusters:
#   build (the extension compiles without a warning under -Wall -Wextra),
#   pg_regress (sql/, expected/), isolation (test/specs), pgTAP (test/pgtap),
#   TAP (test/t, PostgreSQL::Test::Cluster; each test makes its own nodes),
#   amqp (test/amqp: TAP tests against a private RabbitMQ node; installs
#   rabbitmq-server and python3-pika only when this suite runs),
#   upgrade (test/upgrade: pg_upgrade from 15 to the version under test; not
#   run for 15 itself),
#   dist (META.json, and `make dist`'s tarball builds and installs with PGXS),
#   citus (test/citus: TAP tests against a Citus coordinator and two workers;
#   PostgreSQL 16 and later only, Citus built once by tools/citus.sh).
# Each suite's line names its version ("== regress@18: N passed, N failed");
# the run ends with one line "N passed, N failed" over everything and exits
# non-zero on any failure.
# PG="15 18" (default) selects the versions, SUITES="build regress isolation
# pgtap tap amqp upgrade dist citus" the suites, TAP_FILES the TAP files (default
# test/t/*.pl), AMQP_FILES the amqp ones (test/amqp/*.pl), CITUS_FILES the
# citus ones (test/citus/*.pl); KEEP_WORK=1 keeps
# the temporary files.
. "$(dirname "$0")/cluster.sh"

VERSIONS=${PG:-15 18}
SUITES=${SUITES:-build regress isolation pgtap tap amqp upgrade dist citus}

ensure_packages
# Every version is built before any suite runs, so a build failure shows at
# once; the upgrade suite needs 15 even when only a later version is tested.
PREPARE=$VERSIONS
case " $SUITES " in *" upgrade "*) [[ " $VERSIONS " == *" 15 "* ]] || PREPARE="15 $VERSIONS" ;; esac
for v in $PREPARE; do build_and_install "$v"; done
PASSED=0
FAILED=0
FAILURES=()

count() { # suite passed failed
	PASSED=$((PASSED + $2))
	FAILED=$((FAILED + $3))
	[ "$3" -gt 0 ] && FAILURES+=("$1@$PG_MAJOR")
	say "== $1@$PG_MAJOR: $2 passed, $3 failed"
}

# The build of build_and_install: no warning at all.
run_build() {
	local n
	say "== build"
	n=$(grep -c 'warning:' "$BUILD/build.log" || true)
	[ "$n" -gt 0 ] && grep -A3 'warning:' "$BUILD/build.log"
	if [ "$n" -eq 0 ]; then count build 1 0; else count build 0 1; fi
}

# pg_regress and pg_isolation_regress print one line per test.
run_pg_regress() { # suite make-overrides...
	local suite=$1 out="$BUILD/$1.out" ok bad
	shift
	say "== $suite"
	as_owner make -s -C "$BUILD" PG_CONFIG="$PG_CONFIG" installcheck "$@" >"$out" 2>&1 || true
	cat "$out"
	# 15: "test name ... ok"; 16 and later: "ok 1 - name" (TAP)
	ok=$(grep -cE '\.\.\. ok|^ok [0-9]+ ' "$out" || true)
	bad=$(grep -cE '\.\.\. FAILED|failed \(ignored\)|^not ok [0-9]+ ' "$out" || true)
	if [ "$ok" -eq 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi # the runner itself failed
	# A runner that stops early (e.g. a spec without its expected file makes
	# the diff fail) prints no summary: count that as a failure, never as a
	# shorter green run.
	if ! grep -qE 'All [0-9]+ tests passed|[0-9]+ of [0-9]+ tests failed' "$out"; then
		say "not ok - $suite stopped before its summary line"
		bad=$((bad + 1))
	fi
	for f in "$BUILD"/regression.diffs "$BUILD"/output_iso/regression.diffs; do
		[ "$bad" -gt 0 ] && [ -s "$f" ] && { say "--- $f"; cat "$f"; }
	done
	count "$suite" "$ok" "$bad"
	rm -f "$BUILD"/regression.diffs "$BUILD"/output_iso/regression.diffs
}

run_tap_count() { # suite args...
	local suite=$1 out="$BUILD/$1.out" line
	shift
	say "== $suite"
	(cd "$BUILD" && as_owner perl tools/tap_count.pl "$@") >"$out" 2>&1 || true
	grep -v '^TAPCOUNT' "$out" || true
	line=$(grep "^TAPCOUNT" "$out" | tail -n 1 || true)
	if [ -n "$line" ]; then
		count "$suite" "$(echo "$line" | cut -d' ' -f2)" "$(echo "$line" | cut -d' ' -f3)"
	else
		count "$suite" 0 1
	fi
}

# The package: META.json agrees with the control file, and the tarball of
# `make dist` holds no build output and builds and installs on its own with
# PGXS, as on a clean machine (no git, nothing but the tarball).  Needs a git
# checkout (the tarball is made from HEAD): skipped in an unpacked tarball.
run_dist() {
	local out="$BUILD/dist.out" ok=0 bad=0 ver tarball dir files
	say "== dist"
	check() { # description command...
		local what=$1
		shift
		if "$@" >>"$out" 2>&1; then
			ok=$((ok + 1))
			say "ok - $what"
		else
			bad=$((bad + 1))
			say "not ok - $what"
			tail -n 20 "$out"
		fi
	}
	if ! git -C "$SRC_DIR" rev-parse --verify -q HEAD >/dev/null 2>&1; then
		say "skipped: $SRC_DIR is not a git checkout"
		count dist 0 0
		return
	fi
	ver=$(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" "$SRC_DIR/resilience.control")
	check "META.json: version, provides and license agree with resilience.control and LICENSE" \
		perl -MJSON::PP -e '
			local $/;
			open my $f, "<", "$ARGV[0]/META.json" or die "META.json: $!";
			my $m = decode_json(<$f>);
			(my $semver = $ARGV[1]) =~ s/^(\d+\.\d+)$/$1.0/;
			my $p = $m->{provides}{resilience} or die "provides.resilience missing";
			die "version $m->{version} is not $semver\n" unless $m->{version} eq $semver;
			die "provides version $p->{version} is not $semver\n" unless $p->{version} eq $semver;
			die "provides file $p->{file}\n" unless $p->{file} =~ /^resilience--[0-9.]+\.sql$/ && -f "$ARGV[0]/$p->{file}";
			die "license\n" unless $m->{license} eq "postgresql" && -f "$ARGV[0]/LICENSE";
			die "meta-spec\n" unless $m->{"meta-spec"}{version} eq "1.0.0";
			die "prereqs\n" unless $m->{prereqs}{runtime}{requires}{PostgreSQL};
			die "$_ missing\n" for grep { !$m->{$_} } qw(name abstract maintainer tags);
		' "$SRC_DIR" "$ver"
	tarball="$BUILD/resilience-${ver}.0.tar.gz"
	[[ $ver == *.*.* ]] && tarball="$BUILD/resilience-$ver.tar.gz"
	check "make dist writes $(basename "$tarball")" \
		make -s -C "$SRC_DIR" PG_CONFIG="$PG_CONFIG" DISTDIR="$BUILD" dist
	files=$(tar -tzf "$tarball" 2>/dev/null || true)
	# the released install script and every upgrade script to this version
	scripts=$(cd "$SRC_DIR" && ls resilience--*.sql)
	check "the tarball holds the sources, the control file, META.json and LICENSE" \
		bash -c 'for f in Makefile META.json LICENSE resilience.control '"$(echo $scripts)"' src/resilience.c; do
			grep -qx "[^/]*/$f" <<<"$1" || { echo "missing: $f"; exit 1; }; done' _ "$files"
	check "the tarball holds no build output or test result" \
		bash -c '! grep -E "\.(o|so|bc|a)$|/(results|tmp_check|output_iso|log)/|regression\.(diffs|out)$|\.tar\.gz$" <<<"$1"' _ "$files"
	dir="$BUILD/dist"
	mkdir -p "$dir"
	tar -C "$dir" -xzf "$tarball"
	[ -n "$RUNAS" ] && chown -R "$RUNAS:" "$dir"
	dir=$(echo "$dir"/resilience-*/)
	check "the unpacked tarball builds with PGXS" \
		as_owner make -s -C "$dir" -j2 PG_CONFIG="$PG_CONFIG"
	check "and installs" \
		as_owner make -s -C "$dir" PG_CONFIG="$PG_CONFIG" DESTDIR="$BUILD/dist/root" install
	check "the installed files are there" \
		bash -c 'test -f "$1/resilience.so" || exit 1; shift
			for f; do test -f "$0/$f" || { echo "missing: $f"; exit 1; }; done' \
			"$BUILD/dist/root$("$PG_CONFIG" --sharedir)/extension" \
			"$BUILD/dist/root$("$PG_CONFIG" --pkglibdir)" $scripts
	count dist "$ok" "$bad"
}

# The PostgreSQL 15 installation pg_upgrade starts from, with resilience.
# Debian's 15.20 gives every column an attribute option (pg_attver) that
# 18.6 does not know, so pg_upgrade from it to 18.6 fails on any table, with
# or without resilience.  Then Debian's 15.18 (the release before) is
# unpacked beside the others, its packages cached like PostgreSQL 18, and
# resilience is built for it.
upgrade_source() {
	local v=$PG_MAJOR cache p ver deb dir="$WORK/pg15old"
	if ! grep -qa pg_attver "$BINDIR_15/postgres"; then
		dirname "$BINDIR_15"
		return
	fi
	if [ ! -d "$dir" ]; then
		cache=${RESILIENCE_CACHE:-/var/cache/resilience}
		mkdir -p "$cache"
		for p in postgresql-15 postgresql-client-15 postgresql-server-dev-15; do
			deb=$(ls "$cache/${p}_15.18-"*.deb 2>/dev/null | head -n 1 || true)
			if [ -z "$deb" ]; then
				ver=$(apt-cache madison "$p" | awk '$3 ~ /^15\.18-/ { print $3; exit }')
				[ -n "$ver" ] || die "$p 15.18 is not available to upgrade from (apt-get update?)"
				(cd "$cache" && apt-get download -qq "$p=$ver" 2>/dev/null) >&2
				deb=$(ls "$cache/${p}_15.18-"*.deb | head -n 1)
			fi
			dpkg-deb -x "$deb" "$dir"
		done
		BINDIR_15old="$dir/usr/lib/postgresql/15/bin"
		use_version 15old
		build_extension >&2
		use_version "$v"
	fi
	echo "$dir/usr/lib/postgresql/15"
}

# TAP files of one suite, with the version's own PostgreSQL::Test::Cluster.
run_tap_suite() { # suite files...
	local suite=$1 pgxs f
	shift
	pgxs=$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")
	rm -rf "$BUILD/tmp_check" "$BUILD/log"
	as_owner mkdir -p "$BUILD/tmp_check"
	TESTDIR="$BUILD" PG_REGRESS="$pgxs/test/regress/pg_regress" \
		run_tap_count "$suite" --lib "$pgxs/test/perl" "$@"
	if [ "${FAILURES[*]}" != "${FAILURES[*]/$suite@$PG_MAJOR/}" ]; then
		# the logs: tmp_check/log on 15, log on 16 and later
		for f in "$BUILD"/tmp_check/log/* "$BUILD"/log/* "$BUILD"/tmp_check/rabbit_*/log/*.log; do
			[ -f "$f" ] && { say "--- $f (tail)"; tail -n 40 "$f"; }
		done
	fi
	return 0
}

for v in $VERSIONS; do
	use_version "$v"
	failed_before=$FAILED
	say "=== PostgreSQL $("$PG_CONFIG" --version | cut -d' ' -f2)"
	start_cluster "resilience.database_names = 'postgres'" "resilience.worker_naptime = '1s'"
	for suite in $SUITES; do
		case $suite in
		build)
			run_build ;;
		regress)
			run_pg_regress regress ISOLATION= TAP_TESTS= ;;
		isolation)
			run_pg_regress isolation REGRESS= TAP_TESTS= ;;
		pgtap)
			as_owner psql -X -q -c 'DROP DATABASE IF EXISTS pgtap_regression' -c 'CREATE DATABASE pgtap_regression' >/dev/null
			PGDATABASE=pgtap_regression as_owner psql -X -q \
				-c 'CREATE EXTENSION pgtap' -c 'CREATE EXTENSION resilience' >/dev/null
			PGDATABASE=pgtap_regression run_tap_count pgtap --pgtap test/pgtap/*.sql ;;
		tap)
			ensure_packages $(tap_packages ${TAP_FILES:-test/t/*.pl})
			run_tap_suite tap ${TAP_FILES:-test/t/*.pl} ;;
		amqp)
			t0=$(date +%s)
			ensure_packages rabbitmq-server python3-pika
			say "amqp: rabbitmq-server and python3-pika ready ($(($(date +%s) - t0)) s)"
			run_tap_suite amqp ${AMQP_FILES:-test/amqp/*.pl} ;;
		upgrade)
			# from 15 to this version; 15 itself has nothing to upgrade to
			[ "$v" = 15 ] && continue
			OLD_INSTALL=$(upgrade_source) run_tap_suite upgrade test/upgrade/*.pl ;;
		dist)
			run_dist ;;
		citus)
			# Citus 14 supports PostgreSQL 16-18: said, not counted as passed
			if [ "$v" -lt 16 ]; then
				say "== citus@$v: does not apply (Citus 14 supports PostgreSQL 16-18), not run"
				continue
			fi
			if ! bash "$SRC_DIR/tools/citus.sh" "$BINDIR"; then
				count citus 0 1
				continue
			fi
			run_tap_suite citus ${CITUS_FILES:-test/citus/*.pl} ;;
		*) die "unknown suite $suite" ;;
		esac
	done
	if [ "$FAILED" -gt "$failed_before" ]; then
		say "--- server log of PostgreSQL $v (tail)"
		tail -n 60 "$SERVER_LOG"
	fi
	stop_cluster
done

[ "$FAILED" -gt 0 ] && say "failed: ${FAILURES[*]}"
say "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
