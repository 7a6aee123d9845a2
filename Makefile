# resilience: PGXS build.  `make test` and `make demo` are the two commands a
# newcomer needs (see README.md); the rest is ordinary PGXS, plus `make bench`,
# `make bench-chart` and `make dist`.

EXTENSION = resilience
MODULE_big = resilience
OBJS = \
	src/resilience.o \
	src/shmem.o \
	src/args.o \
	src/privilege.o \
	src/ratelimit.o \
	src/locks.o \
	src/idempotency.o \
	src/breaker.o \
	src/bulkhead.o \
	src/backoff.o \
	src/saga.o \
	src/outbox.o \
	src/relay.o \
	src/sink_http.o \
	src/sink_amqp.o \
	src/sink_notify.o \
	src/metrics.o \
	src/worker.o \
	src/tenants.o \
	src/cron.o \
	src/schedule.o \
	src/quota.o \
	src/events.o

# the outbox's http and amqp sinks (libcrypto: webhook signatures' HMAC)
SHLIB_LINK += -lcurl -lrabbitmq -lcrypto

# A call to an undeclared function is an error, not a warning: on PostgreSQL
# 18 one built a library that could not be loaded (a macro that had moved to
# another header became an undefined symbol).  `override` keeps it when
# PG_CFLAGS is also given on the command line (make test adds -Wall -Wextra).
override PG_CFLAGS += -Werror=implicit-function-declaration

DATA = $(wildcard resilience--*.sql)
PGFILEDESC = "resilience - reliability patterns inside PostgreSQL"

# pg_regress: one test per capability, the SQL contract with its errors.
REGRESS = setup ratelimit ratelimit_errors locks locks_errors idempotency idempotency_errors \
	breaker breaker_errors bulkhead retry sagas sagas_errors sagas_by_hand \
	outbox outbox_errors events events_errors roles \
	schedules_cron schedules quota quota_errors sagas_waits outbox_signing outbox_trace outbox_route_options \
	citus_errors sagas_groups outbox_write

# Isolation specs: one per race we promise to win.
ISOLATION = ratelimit_shared lease_race lease_takeover idempotency_begin idempotent_wait \
	inbox_accept idempotency_reaper breaker_shared bulkhead_wakeup retry_serialization \
	saga_reply_timeout saga_ticks saga_start_key saga_abort_race \
	outbox_order outbox_consumers events_append events_append_direct \
	schedule_run_once quota_race saga_signal_race outbox_longpoll quota_policy_cache \
	saga_branch_claim saga_batch saga_branch_replies lease_direct_race
ISOLATION_OPTS = --inputdir=test

# TAP tests (crash, restart, workers) live in test/t.
TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

.PHONY: test demo bench bench-breakers bench-chart dist

# PG selects the PostgreSQL major version(s): make test runs 15 and 18 unless
# told otherwise (PG=15, PG=18); demo and bench use one (default 15).
PG ?=

# Every suite on throwaway clusters; installs what is missing (as root).
test:
	PG="$(PG)" bash tools/test.sh

# A short guided scenario on a throwaway cluster.
demo:
	PG_MAJOR="$(or $(PG),15)" bash tools/demo.sh

# Side-by-side throughput ratios (SELECT 1, plain SQL, Redis).
bench:
	PG_MAJOR="$(or $(PG),15)" bash bench/run.sh

# Breaker and bulkhead calls as ratios to SELECT 1.
bench-breakers:
	PG_MAJOR="$(or $(PG),15)" bash bench/breakers.sh

# A source tarball for PGXN: resilience-<META.json version>.tar.gz, the files
# git tracks at HEAD (so no build outputs), in DISTDIR (default: here).
DISTVERSION = $(shell perl -MJSON::PP -e 'local $$/; print decode_json(<>)->{version}' META.json)
DISTDIR ?= .
dist:
	@test -z "$$(git status --porcelain --untracked-files=no)" || \
		echo "warning: uncommitted changes are not in the tarball (it is made from HEAD)" >&2
	git archive --format=tar.gz --prefix=$(EXTENSION)-$(DISTVERSION)/ \
		-o $(DISTDIR)/$(EXTENSION)-$(DISTVERSION).tar.gz HEAD
	@echo "$(DISTDIR)/$(EXTENSION)-$(DISTVERSION).tar.gz"

# Rate-limit throughput vs clients (SELECT 1, rate_limit, Redis): the data
# and the chart in docs/img (gnuplot).
bench-chart:
	PG_MAJOR="$(or $(PG),15)" bash bench/chart.sh
