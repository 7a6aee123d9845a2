#!/usr/bin/env bash
# `make test`: every suite against a throwaway installation and cluster.
#   pg_regress (sql/, expected/), isolation (test/specs), pgTAP (test/pgtap),
#   TAP (test/t, PostgreSQL::Test::Cluster; each test makes its own nodes),
#   dist (META.json, and `make dist`'s tarball builds and installs with PGXS).
# Ends with one line "N passed, N failed"; exits non-zero on any failure.
#   amqp (test/amqp: TAP tests against a private RabbitMQ node; installs
#   rabbitmq-server and python3-pika only when this suite runs).
# SUITES="regress isolation pgtap tap amqp dist" selects suites, TAP_FILES the TAP
# files (default test/t/*.pl), AMQP_FILES the amqp ones (test/amqp/*.pl);
# KEEP_WORK=1 keeps the temporary files.
. "$(dirname "$0")/cluster.sh"

ensure_packages
build_and_install
start_cluster "resilience.database_names = 'postgres'" "resilience.worker_naptime = '1s'"

SUITES=${SUITES:-regress isolation pgtap tap amqp dist}
PASSED=0
FAILED=0
FAILURES=()

count() { # suite passed failed
	PASSED=$((PASSED + $2))
	FAILED=$((FAILED + $3))
	[ "$3" -gt 0 ] && FAILURES+=("$1")
	say "== $1: $2 passed, $3 failed"
}

# pg_regress and pg_isolation_regress print one line per test: "... ok" / "... FAILED".
run_pg_regress() { # suite make-overrides...
	local suite=$1 out="$WORK/$1.out" ok bad
	shift
	say "== $suite"
	as_owner make -s -C "$WORK/src" PG_CONFIG="$PG_CONFIG" installcheck "$@" >"$out" 2>&1 || true
	cat "$out"
	ok=$(grep -cE '\.\.\. ok' "$out" || true)
	bad=$(grep -cE '\.\.\. FAILED|failed \(ignored\)' "$out" || true)
	if [ "$ok" -eq 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi # the runner itself failed
	for f in "$WORK"/src/regression.diffs "$WORK"/src/output_iso/regression.diffs; do
		[ "$bad" -gt 0 ] && [ -s "$f" ] && { say "--- $f"; cat "$f"; }
	done
	count "$suite" "$ok" "$bad"
	rm -f "$WORK"/src/regression.diffs "$WORK"/src/output_iso/regression.diffs
}

run_tap_count() { # suite args...
	local suite=$1 out="$WORK/$1.out" line
	shift
	say "== $suite"
	(cd "$WORK/src" && as_owner perl tools/tap_count.pl "$@") >"$out" 2>&1 || true
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
	local out="$WORK/dist.out" ok=0 bad=0 ver tarball dir files
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
	tarball="$WORK/resilience-${ver}.0.tar.gz"
	[[ $ver == *.*.* ]] && tarball="$WORK/resilience-$ver.tar.gz"
	check "make dist writes $(basename "$tarball")" \
		make -s -C "$SRC_DIR" PG_CONFIG="$PG_CONFIG" DISTDIR="$WORK" dist
	files=$(tar -tzf "$tarball" 2>/dev/null || true)
	# the released install script and every upgrade script to this version
	scripts=$(cd "$SRC_DIR" && ls resilience--*.sql)
	check "the tarball holds the sources, the control file, META.json and LICENSE" \
		bash -c 'for f in Makefile META.json LICENSE resilience.control '"$(echo $scripts)"' src/resilience.c; do
			grep -qx "[^/]*/$f" <<<"$1" || { echo "missing: $f"; exit 1; }; done' _ "$files"
	check "the tarball holds no build output or test result" \
		bash -c '! grep -E "\.(o|so|bc|a)$|/(results|tmp_check|output_iso|log)/|regression\.(diffs|out)$|\.tar\.gz$" <<<"$1"' _ "$files"
	dir="$WORK/dist"
	mkdir -p "$dir"
	tar -C "$dir" -xzf "$tarball"
	[ -n "$RUNAS" ] && chown -R "$RUNAS:" "$dir"
	dir=$(echo "$dir"/resilience-*/)
	check "the unpacked tarball builds with PGXS" \
		as_owner make -s -C "$dir" -j2 PG_CONFIG="$PG_CONFIG"
	check "and installs" \
		as_owner make -s -C "$dir" PG_CONFIG="$PG_CONFIG" DESTDIR="$WORK/dist/root" install
	check "the installed files are there" \
		bash -c 'test -f "$1/resilience.so" || exit 1; shift
			for f; do test -f "$0/$f" || { echo "missing: $f"; exit 1; }; done' \
			"$WORK/dist/root$("$PG_CONFIG" --sharedir)/extension" \
			"$WORK/dist/root$("$PG_CONFIG" --pkglibdir)" $scripts
	count dist "$ok" "$bad"
}

for suite in $SUITES; do
	case $suite in
	regress)
		run_pg_regress regress ISOLATION= TAP_TESTS= ;;
	isolation)
		run_pg_regress isolation REGRESS= TAP_TESTS= ;;
	pgtap)
		as_owner psql -X -q -c 'DROP DATABASE IF EXISTS pgtap_regression' -c 'CREATE DATABASE pgtap_regression' >/dev/null
		PGDATABASE=pgtap_regression as_owner psql -X -q \
			-c 'CREATE EXTENSION pgtap' -c 'CREATE EXTENSION resilience' >/dev/null
		PGDATABASE=pgtap_regression run_tap_count pgtap --pgtap test/pgtap/*.sql ;;
	tap | amqp)
		files=${TAP_FILES:-test/t/*.pl}
		if [ "$suite" = amqp ]; then
			t0=$(date +%s)
			ensure_packages rabbitmq-server python3-pika
			say "amqp: rabbitmq-server and python3-pika ready ($(($(date +%s) - t0)) s)"
			files=${AMQP_FILES:-test/amqp/*.pl}
		fi
		rm -rf "$WORK/src/tmp_check"
		as_owner mkdir -p "$WORK/src/tmp_check"
		TESTDIR="$WORK/src" PG_REGRESS="$(dirname "$PG_CONFIG")/../lib/pgxs/src/test/regress/pg_regress" \
			run_tap_count "$suite" --lib "$(dirname "$PG_CONFIG")/../lib/pgxs/src/test/perl" $files
		if [ "${FAILURES[*]}" != "${FAILURES[*]/$suite/}" ]; then
			for f in "$WORK"/src/tmp_check/log/* "$WORK"/src/tmp_check/rabbit_*/log/*.log; do
				[ -f "$f" ] && { say "--- $f (tail)"; tail -n 40 "$f"; }
			done
		fi ;;
	dist)
		run_dist ;;
	*) die "unknown suite $suite" ;;
	esac
done

if [ "$FAILED" -gt 0 ]; then
	say "--- server log (tail)"
	tail -n 60 "$WORK/server.log"
fi
say "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
