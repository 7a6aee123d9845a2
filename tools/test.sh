#!/usr/bin/env bash
# `make test`: every suite against a throwaway installation and cluster.
#   pg_regress (sql/, expected/), isolation (test/specs), pgTAP (test/pgtap),
#   TAP (test/t, PostgreSQL::Test::Cluster; each test makes its own nodes).
# Ends with one line "N passed, N failed"; exits non-zero on any failure.
#   amqp (test/amqp: TAP tests against a private RabbitMQ node; installs
#   rabbitmq-server and python3-pika only when this suite runs).
# SUITES="regress isolation pgtap tap amqp" selects suites, TAP_FILES the TAP
# files (default test/t/*.pl), AMQP_FILES the amqp ones (test/amqp/*.pl);
# KEEP_WORK=1 keeps the temporary files.
. "$(dirname "$0")/cluster.sh"

ensure_packages
build_and_install
start_cluster "resilience.database_names = 'postgres'" "resilience.worker_naptime = '1s'"

SUITES=${SUITES:-regress isolation pgtap tap amqp}
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
	*) die "unknown suite $suite" ;;
	esac
done

if [ "$FAILED" -gt 0 ]; then
	say "--- server log (tail)"
	tail -n 60 "$WORK/server.log"
fi
say "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
