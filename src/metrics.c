/*-------------------------------------------------------------------------
 *
 * metrics.c
 *		resilience.metrics() (the Prometheus text exposition format) and
 *		resilience.metric_samples() (the same as rows), and the counters
 *		behind them.
 *
 * Counters
 * --------
 * One shared hash (resilience.max_metric_series entries, fixed at startup)
 * maps (database, counter, variant, label) to a pg_atomic_uint64.  Entries
 * are never removed, so a pointer to one stays valid for the life of the
 * shared memory segment: each backend caches them (a static array for
 * counters without a free label, a local hash for the others), and an
 * increment is one atomic add with no lock.  The hash's LWLock is taken
 * only when a backend meets a series for the first time.  Counters of
 * per-database families carry the database's OID; server-wide ones
 * (rate limits, bulkheads: their state is server-wide too) carry 0.  They
 * start at zero when the server starts (and after a crash), and only grow:
 * Prometheus' rate() and increase() handle the reset.  When the hash is
 * full, increments of new series go to resilience_metric_series_dropped_total.
 *
 * Decisions (a rate limit, a breaker, an idempotency outcome...) are counted
 * when they are made, whatever the caller's transaction does next; facts
 * that exist only if a transaction commits (an event published, a saga
 * transition, a dead letter, rows reaped) are counted at commit
 * (metrics_add_at_commit), and not at all if it rolls back.
 *
 * Gauges
 * ------
 * Computed at scrape time: from shared memory in C, or from the tables and
 * views by the queries in gauge_queries[], each returning rows of (metric,
 * labels as a text array of names and values, value).  The functions are
 * SECURITY DEFINER with a pinned search_path: the monitoring role needs no
 * privilege on the tables.
 *
 *-------------------------------------------------------------------------
 */
#include "metrics.h"
#include "shmem.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#define METRICS_TRANCHE "resilience_metrics"
#define MAX_VARIANTS 16
#define MAX_LABELS 6

PG_FUNCTION_INFO_V1(metrics);
PG_FUNCTION_INFO_V1(metric_samples);
PG_FUNCTION_INFO_V1(metrics_reaped);
PG_FUNCTION_INFO_V1(metrics_count);

/* ---- the families ---- */

typedef enum FamilyKind
{
	FAMILY_COUNTER,				/* a ResilienceCounter */
	FAMILY_C,					/* samples from a C function */
	FAMILY_QUERY				/* samples from gauge_queries[] */
} FamilyKind;

typedef struct Sample
{
	int			nlabels;
	const char *names[MAX_LABELS];
	const char *values[MAX_LABELS];
	double		value;
} Sample;

typedef struct FamilyDef
{
	const char *name;
	const char *type;			/* "counter" or "gauge" */
	const char *help;
	FamilyKind	kind;
	/* FAMILY_COUNTER */
	int			counter;
	bool		per_database;
	const char *label;			/* the free label's name, or NULL */
	const char *variant_label;	/* the enumerated label's name, or NULL */
	const char *const *variants;
	double		scale;			/* printed value = count * scale (0: 1) */
	/* FAMILY_C: append Sample *s to *samples */
	void		(*collect) (List **samples);
} FamilyDef;

static const char *const decisions[] = {"allowed", "denied", NULL};
static const char *const breaker_outcomes[] = {"success", "failure", "not_permitted", NULL};

/* breaker.c's BreakerState order */
static const char *const breaker_states[] = {
	"closed", "open", "half_open", "forced_open", "metrics_only", "disabled", NULL
};
static const char *const bulkhead_outcomes[] = {"acquired", "rejected", "timed_out", NULL};
static const char *const lease_outcomes[] = {"acquired", "not_acquired", NULL};

/* idempotency.c's Outcome order */
static const char *const begin_outcomes[] = {"proceed", "replay", "in_progress", "mismatch", NULL};
static const char *const results[] = {"completed", "failed", "retry", NULL};
static const char *const inbox_results[] = {"accepted", "duplicate", NULL};
static const char *const saga_events[] = {
	"saga_started", "step_completed", "step_failed", "step_timed_out", "command_sent",
	"reply_received", "reply_ignored", "compensation_started", "step_compensated",
	"compensation_failed", "saga_completed", "saga_compensated", "saga_parked",
	"saga_retried", "saga_aborted", "saga_suspended", "timer_started", "timer_fired",
	"signal_received", "signal_awaited", "signal_consumed", "signal_timed_out",
	"group_started", "group_failed", NULL
};
static const char *const retry_kinds[] = {"action", "compensation", NULL};
static const char *const job_results[] = {"success", "failure", NULL};
static const char *const schedule_outcomes[] = {"succeeded", "retrying", "failed", "skipped", NULL};

static void collect_info(List **samples);
static void collect_rate_limit_table(List **samples);
static void collect_rate_limit_evictions(List **samples);
static void collect_rate_limit_full(List **samples);
static void collect_series(List **samples);
static void collect_series_max(List **samples);
static void collect_series_dropped(List **samples);

/*
 * Every family, in the order metrics() prints them.  Names, labels and
 * meanings are a contract (docs/monitoring.md): add, never rename.
 */
static const FamilyDef families[] = {
	{"resilience_info", "gauge",
		"The installed extension version (label version); 1.", FAMILY_C,
	.collect = collect_info},

	/* rate limits (server-wide) */
	{"resilience_rate_limit_decisions_total", "counter",
		"Rate-limit decisions that consumed (cost > 0), by policy (empty: limits given inline) and decision.",
		FAMILY_COUNTER, RC_RATE_LIMIT_DECISIONS, false, "policy", "decision", decisions},
	{"resilience_rate_limit_keys", "gauge",
		"Rate-limit keys in shared memory (server-wide).", FAMILY_C,
	.collect = collect_rate_limit_table},
	{"resilience_rate_limit_max_keys", "gauge",
		"resilience.max_keys: rate-limit keys shared memory can hold.", FAMILY_QUERY},
	{"resilience_rate_limit_evictions_total", "counter",
		"Rate-limit keys evicted for a new key while the table was full, idle ones or active ones.",
		FAMILY_C,.collect = collect_rate_limit_evictions},
	{"resilience_rate_limit_table_full_total", "counter",
		"New rate-limit keys that found no room (resilience.when_full decided).", FAMILY_C,
	.collect = collect_rate_limit_full},

	/* circuit breakers (this database) */
	{"resilience_breaker_calls_total", "counter",
		"Calls reported to a breaker (success, failure) and calls it refused (not_permitted).",
		FAMILY_COUNTER, RC_BREAKER_CALLS, true, "breaker", "outcome", breaker_outcomes},
	{"resilience_breaker_transitions_total", "counter",
		"Breaker transitions, by the state entered (a reset from another state counts as closed).",
		FAMILY_COUNTER, RC_BREAKER_TRANSITIONS, true, "breaker", "state", breaker_states},
	{"resilience_breaker_state", "gauge",
		"1 for a breaker's current state, 0 for the others.", FAMILY_QUERY},
	{"resilience_breaker_failure_rate_percent", "gauge",
		"Failure rate over a breaker's window (probe calls when half-open).", FAMILY_QUERY},
	{"resilience_breaker_slow_call_rate_percent", "gauge",
		"Slow-call rate over a breaker's window (probe calls when half-open).", FAMILY_QUERY},
	{"resilience_breaker_window_calls", "gauge",
		"Calls in a breaker's window (probe results when half-open).", FAMILY_QUERY},

	/* bulkheads (server-wide) */
	{"resilience_bulkhead_acquisitions_total", "counter",
		"Bulkhead permits acquired, refused at once (rejected) and waited for in vain (timed_out).",
		FAMILY_COUNTER, RC_BULKHEAD_ACQUISITIONS, false, "bulkhead", "outcome", bulkhead_outcomes},
	{"resilience_bulkhead_permits_in_use", "gauge",
		"Permits of a bulkhead held now.", FAMILY_QUERY},
	{"resilience_bulkhead_waiting", "gauge",
		"Sessions waiting for a permit of a bulkhead.", FAMILY_QUERY},
	{"resilience_bulkhead_max_concurrent", "gauge",
		"A bulkhead's max_concurrent, as its latest caller gave it.", FAMILY_QUERY},

	/* leases and fences (this database) */
	{"resilience_lease_acquisitions_total", "counter",
		"lock_acquire calls, by whether they returned a token.",
		FAMILY_COUNTER, RC_LEASE_ACQUISITIONS, true, NULL, "outcome", lease_outcomes},
	{"resilience_lease_takeovers_total", "counter",
		"Leases acquired from a holder whose lease expired without being released.",
		FAMILY_COUNTER, RC_LEASE_TAKEOVERS, true},
	{"resilience_lease_waits_total", "counter",
		"lock_acquire calls that waited for a lease held by another owner.",
		FAMILY_COUNTER, RC_LEASE_WAITS, true},
	{"resilience_fence_rejections_total", "counter",
		"Stale fencing tokens refused by fence and fence_check.",
		FAMILY_COUNTER, RC_FENCE_REJECTIONS, true},
	{"resilience_leases_held", "gauge",
		"Leases held now (not expired, not released).", FAMILY_QUERY},

	/* idempotency keys and the inbox (this database) */
	{"resilience_idempotency_begins_total", "counter",
		"idempotency_begin (and idempotent) answers, by outcome.",
		FAMILY_COUNTER, RC_IDEMPOTENCY_BEGINS, true, NULL, "outcome", begin_outcomes},
	{"resilience_idempotency_results_total", "counter",
		"Attempts ended: completed, failed (stored, replayed) or retry (a retryable failure).",
		FAMILY_COUNTER, RC_IDEMPOTENCY_RESULTS, true, NULL, "result", results},
	{"resilience_inbox_messages_total", "counter",
		"inbox_accept answers: accepted (first time) or duplicate.",
		FAMILY_COUNTER, RC_INBOX_MESSAGES, true, NULL, "result", inbox_results},

	/* the reaper (this database) */
	{"resilience_reaper_removed_total", "counter",
		"What run_reaper removed, by item (its rows), counted when its transaction commits.",
		FAMILY_COUNTER, RC_REAPED, true, "item"},

	/* the outbox (this database) */
	{"resilience_outbox_published_total", "counter",
		"Events published by committed transactions.",
		FAMILY_COUNTER, RC_OUTBOX_PUBLISHED, true},
	{"resilience_outbox_delivered_total", "counter",
		"Events delivered (relayed, or acknowledged by a queue consumer), by route.",
		FAMILY_COUNTER, RC_OUTBOX_DELIVERED, true, "route_id"},
	{"resilience_outbox_retries_total", "counter",
		"Failed deliveries scheduled for another attempt (a queue consumer's nack), by route.",
		FAMILY_COUNTER, RC_OUTBOX_RETRIES, true, "route_id"},
	{"resilience_outbox_dead_lettered_total", "counter",
		"Events moved to the dead letters, by route.",
		FAMILY_COUNTER, RC_OUTBOX_DEAD_LETTERS, true, "route_id"},
	{"resilience_outbox_backlog", "gauge",
		"Events not delivered yet, by route (route_id unrouted: no route matched them yet).",
		FAMILY_QUERY},
	{"resilience_outbox_oldest_pending_age_seconds", "gauge",
		"Age of the oldest event not delivered yet, by route.", FAMILY_QUERY},
	{"resilience_outbox_in_flight", "gauge",
		"Events claimed and not yet delivered, by route.", FAMILY_QUERY},
	{"resilience_outbox_retrying", "gauge",
		"Events waiting for another attempt after a failure, by route.", FAMILY_QUERY},
	{"resilience_outbox_dead_letters", "gauge",
		"Dead letters kept now, by route.", FAMILY_QUERY},
	{"resilience_outbox_breaker_state", "gauge",
		"1 for the state of the relay's breaker for a route's destination, 0 for the others.",
		FAMILY_QUERY},
	{"resilience_outbox_route_info", "gauge",
		"A route's topic pattern, sink, host (never the target's path: webhook URLs carry tokens there) and whether it is enabled; 1.",
		FAMILY_QUERY},

	/* sagas (this database) */
	{"resilience_saga_events_total", "counter",
		"Saga transitions (the events of resilience.saga_events), by saga and event.",
		FAMILY_COUNTER, RC_SAGA_EVENTS, true, "saga", "event", saga_events},
	{"resilience_saga_step_retries_total", "counter",
		"Failed step attempts scheduled for a retry, by saga and kind (action, compensation).",
		FAMILY_COUNTER, RC_SAGA_STEP_RETRIES, true, "saga", "kind", retry_kinds},
	{"resilience_sagas", "gauge",
		"Unfinished sagas, by saga and state (running, compensating, compensation_failed, suspended).",
		FAMILY_QUERY},
	{"resilience_sagas_stuck", "gauge",
		"Unfinished sagas without progress for resilience.saga_stuck_after, by saga and state.",
		FAMILY_QUERY},

	/* event streams (this database) */
	{"resilience_stream_events_appended_total", "counter",
		"Events appended to streams by committed transactions (append_events).",
		FAMILY_COUNTER, RC_STREAM_EVENTS, true},
	{"resilience_stream_conflicts_total", "counter",
		"append_events calls refused because the stream was not at the expected version (40001).",
		FAMILY_COUNTER, RC_STREAM_CONFLICTS, true},

	/* schedules (this database) */
	{"resilience_schedule_runs_total", "counter",
		"Attempts of schedule slots by outcome (succeeded, retrying: failed and retried later, failed: after max_attempts), and slots skipped by the catch-up or overlap policy.",
		FAMILY_COUNTER, RC_SCHEDULE_RUNS, true, "schedule", "outcome", schedule_outcomes},
	{"resilience_schedule_lag_seconds_total", "counter",
		"Sum of the lag between a slot's time and its first attempt's start, by schedule.",
		FAMILY_COUNTER, RC_SCHEDULE_LAG, true, "schedule",.scale = 1e-6},
	{"resilience_schedule_slots_started_total", "counter",
		"Slots whose first attempt started, by schedule (divide the lag by it for the mean lag).",
		FAMILY_COUNTER, RC_SCHEDULE_STARTS, true, "schedule"},
	{"resilience_schedule_last_success_timestamp_seconds", "gauge",
		"When a schedule's last successful run finished (Unix time; absent before the first).",
		FAMILY_QUERY},
	{"resilience_schedule_next_slot_timestamp_seconds", "gauge",
		"The next slot of an enabled schedule (Unix time).", FAMILY_QUERY},
	/* quotas (this database) */
	{"resilience_quota_decisions_total", "counter",
		"quota and quota_check decisions that asked for something (cost > 0), by decision.",
		FAMILY_COUNTER, RC_QUOTA_DECISIONS, true, NULL, "decision", decisions},

	/* the worker (this database) */
	{"resilience_worker_job_runs_total", "counter",
		"Runs of the worker's jobs in this database, by job and result.",
		FAMILY_COUNTER, RC_WORKER_JOB_RUNS, true, "job", "result", job_results},
	{"resilience_worker_job_seconds_total", "counter",
		"Time spent running the worker's jobs in this database, by job.",
		FAMILY_COUNTER, RC_WORKER_JOB_SECONDS, true, "job",.scale = 1e-6},
	{"resilience_worker_state", "gauge",
		"1 for the state of this database's worker, 0 for the others.", FAMILY_QUERY},
	{"resilience_worker_job_last_run_timestamp_seconds", "gauge",
		"When a job last started (Unix time).", FAMILY_QUERY},
	{"resilience_worker_job_last_duration_seconds", "gauge",
		"How long a job's last finished run took.", FAMILY_QUERY},
	{"resilience_worker_job_last_error_timestamp_seconds", "gauge",
		"When a job last failed (Unix time).", FAMILY_QUERY},
	{"resilience_worker_job_last_error_info", "gauge",
		"A job's last error message (label error); 1.", FAMILY_QUERY},

	/* the counters themselves (server-wide) */
	{"resilience_metric_series", "gauge",
		"Counter series in shared memory.", FAMILY_C,.collect = collect_series},
	{"resilience_metric_series_max", "gauge",
		"resilience.max_metric_series: counter series shared memory can hold.", FAMILY_C,
	.collect = collect_series_max},
	{"resilience_metric_series_dropped_total", "counter",
		"Increments lost because resilience.max_metric_series series were in use.", FAMILY_C,
	.collect = collect_series_dropped},
};

#define NUM_FAMILIES lengthof(families)

/*
 * The gauges read from tables and views: each query returns (metric,
 * labels text[] of names and values, value float8); rows with a NULL value
 * are skipped.  needs_preload: it reads shared memory.
 */
typedef struct GaugeQuery
{
	bool		needs_preload;
	const char *sql;
} GaugeQuery;

static const GaugeQuery gauge_queries[] = {
	{false,
		"SELECT 'resilience_rate_limit_max_keys', '{}'::text[],"
		" pg_catalog.current_setting('resilience.max_keys', true)::float8"},
	{true,
		"SELECT m.metric, ARRAY['breaker', b.name] || m.labels, m.value"
		"  FROM resilience.breaker_entries() b, LATERAL ("
		"   SELECT 'resilience_breaker_state', ARRAY['state', s.state],"
		"          CASE WHEN b.state = s.state THEN 1 ELSE 0 END::float8"
		"     FROM unnest(ARRAY['closed', 'open', 'half_open', 'forced_open',"
		"                       'metrics_only', 'disabled']) s(state)"
		"   UNION ALL SELECT 'resilience_breaker_failure_rate_percent', '{}', b.failure_rate"
		"   UNION ALL SELECT 'resilience_breaker_slow_call_rate_percent', '{}', b.slow_call_rate"
		"   UNION ALL SELECT 'resilience_breaker_window_calls', '{}', b.calls::float8"
		"  ) m(metric, labels, value)"},
	{true,
		"SELECT m.metric, ARRAY['bulkhead', b.name], m.value"
		"  FROM resilience.bulkhead_entries() b, LATERAL (VALUES"
		"   ('resilience_bulkhead_permits_in_use', b.in_use::float8),"
		"   ('resilience_bulkhead_waiting', b.waiting::float8),"
		"   ('resilience_bulkhead_max_concurrent', b.max_concurrent::float8)"
		"  ) m(metric, value)"},
	{false,
		"SELECT 'resilience_leases_held', '{}'::text[], count(*)::float8"
		"  FROM resilience.leases WHERE expires_at > clock_timestamp()"},
	{false,
		"SELECT m.metric, ARRAY['route_id', coalesce(o.route_id::text, 'unrouted')] || m.labels, m.value"
		"  FROM resilience.outbox_status o, LATERAL ("
		"   SELECT 'resilience_outbox_backlog', '{}'::text[], o.backlog::float8"
		"   UNION ALL SELECT 'resilience_outbox_oldest_pending_age_seconds', '{}',"
		"          extract(epoch FROM o.oldest_pending_age)::float8"
		"   UNION ALL SELECT 'resilience_outbox_in_flight', '{}', o.in_flight::float8"
		"    WHERE o.route_id IS NOT NULL"
		"   UNION ALL SELECT 'resilience_outbox_retrying', '{}', o.retrying::float8"
		"    WHERE o.route_id IS NOT NULL"
		"   UNION ALL SELECT 'resilience_outbox_dead_letters', '{}', o.dead_letters::float8"
		"    WHERE o.route_id IS NOT NULL"
		"   UNION ALL SELECT 'resilience_outbox_breaker_state', ARRAY['state', s.state],"
		"          CASE WHEN o.breaker = s.state THEN 1 ELSE 0 END::float8"
		"     FROM unnest(ARRAY['closed', 'open', 'half_open', 'paused']) s(state)"
		"    WHERE o.route_id IS NOT NULL"
		"   UNION ALL SELECT 'resilience_outbox_route_info',"
		"          ARRAY['topic_pattern', o.topic_pattern, 'sink', o.sink, 'host',"
		"                CASE WHEN o.sink IN ('http', 'amqp')"
		"                     THEN pg_catalog.substring(o.target,"
		"                          '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\\[[^]/?#]*\\]|[^:/?#]*)')"
		"                     ELSE o.target END,"
		"                'enabled', o.enabled::text], 1"
		"    WHERE o.route_id IS NOT NULL"
		"  ) m(metric, labels, value)"},
	/* unfinished sagas only, through indexes: finished ones are counted by events */
	{false,
		"SELECT m.metric, ARRAY['saga', g.name, 'state', g.state], m.value"
		"  FROM (SELECT s.name, s.state, count(*) AS n,"
		"               count(*) FILTER (WHERE s.updated_at < clock_timestamp()"
		"                 - coalesce(nullif(current_setting('resilience.saga_stuck_after', true), ''),"
		"                            '5 min')::interval) AS stuck"
		"          FROM (SELECT name, state, updated_at FROM resilience.sagas"
		"                 WHERE next_run_at IS NOT NULL"
		"                UNION ALL"
		"                SELECT name, state, updated_at FROM resilience.sagas"
		"                 WHERE state = 'compensation_failed' AND next_run_at IS NULL"
		"                UNION ALL"
		"                SELECT name, state, updated_at FROM resilience.sagas"
		"                 WHERE state = 'suspended') s"
		"         GROUP BY s.name, s.state) g,"
		"       LATERAL (VALUES ('resilience_sagas', g.n::float8),"
		"                       ('resilience_sagas_stuck', g.stuck::float8)) m(metric, value)"},
	{false,
		"SELECT m.metric, ARRAY['schedule', d.name], m.value"
		"  FROM resilience.schedule_definitions d, LATERAL (VALUES"
		"   ('resilience_schedule_last_success_timestamp_seconds',"
		"    extract(epoch FROM d.last_success)::float8),"
		"   ('resilience_schedule_next_slot_timestamp_seconds',"
		"    CASE WHEN d.enabled THEN extract(epoch FROM d.next_slot)::float8 END)"
		"  ) m(metric, value)"},
	{true,
		"SELECT m.metric, m.labels, m.value"
		"  FROM resilience.worker_status() w, LATERAL ("
		"   SELECT 'resilience_worker_state', ARRAY['state', s.state],"
		"          CASE WHEN w.state = s.state THEN 1 ELSE 0 END::float8"
		"     FROM unnest(ARRAY['starting', 'waiting_for_extension', 'in_recovery', 'idle',"
		"                       'running', 'stopped']) s(state)"
		"    WHERE w.job = 'reaper'"
		"   UNION ALL SELECT 'resilience_worker_job_last_run_timestamp_seconds',"
		"          ARRAY['job', w.job], extract(epoch FROM w.last_run)::float8"
		"   UNION ALL SELECT 'resilience_worker_job_last_duration_seconds',"
		"          ARRAY['job', w.job], w.last_duration_ms / 1000"
		"   UNION ALL SELECT 'resilience_worker_job_last_error_timestamp_seconds',"
		"          ARRAY['job', w.job], extract(epoch FROM w.last_error_at)::float8"
		"   UNION ALL SELECT 'resilience_worker_job_last_error_info',"
		"          ARRAY['job', w.job, 'error', w.last_error], 1"
		"    WHERE w.last_error IS NOT NULL"
		"  ) m(metric, labels, value)"
		" WHERE w.database = current_database()"},
};

/* ---- shared memory ---- */

/* A series: its key (zero-padded, hashed as bytes) and its count. */
typedef struct MetricKey
{
	Oid			dboid;			/* InvalidOid for server-wide families */
	uint16		counter;
	uint16		variant;
	char		label[NAMEDATALEN];
} MetricKey;

typedef struct MetricEntry
{
	MetricKey	key;
	pg_atomic_uint64 value;
} MetricEntry;

typedef struct MetricsShared
{
	LWLock	   *lock;			/* inserting into (and scanning) the hash */
	pg_atomic_uint64 dropped;
} MetricsShared;

/* What a backend caches: a series' counter. */
typedef struct LocalEntry
{
	MetricKey	key;
	pg_atomic_uint64 *counter;
} LocalEntry;

/* An increment waiting for its (sub)transaction to commit. */
typedef struct PendingAdd
{
	pg_atomic_uint64 *counter;
	uint64		n;
	SubTransactionId subid;
} PendingAdd;

static MetricsShared *metrics_shared = NULL;
static HTAB *metrics_hash = NULL;
static HTAB *local_cache = NULL;
static pg_atomic_uint64 *plain[RC_NUM_COUNTERS][MAX_VARIANTS];
static const FamilyDef *counter_family[RC_NUM_COUNTERS];
static pg_atomic_uint64 local_sink; /* without shared memory */
static bool local_sink_ready = false;

static PendingAdd *pending = NULL;	/* in TopTransactionContext */
static int	npending = 0;
static int	maxpending = 0;

Size
metrics_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(MetricsShared)),
					hash_estimate_size(resilience_max_metric_series, sizeof(MetricEntry)));
}

void
metrics_shmem_request(void)
{
	RequestNamedLWLockTranche(METRICS_TRANCHE, 1);
}

/* Create or attach to the series hash (AddinShmemInitLock held). */
void
metrics_shmem_init(void)
{
	HASHCTL		info;
	bool		found;

	metrics_shared = ShmemInitStruct("resilience metrics", sizeof(MetricsShared), &found);
	if (!found)
	{
		metrics_shared->lock = &(GetNamedLWLockTranche(METRICS_TRANCHE))->lock;
		pg_atomic_init_u64(&metrics_shared->dropped, 0);
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(MetricKey);
	info.entrysize = sizeof(MetricEntry);
	metrics_hash = ShmemInitHash("resilience metric series",
								 resilience_max_metric_series, resilience_max_metric_series,
								 &info, HASH_ELEM | HASH_BLOBS | HASH_FIXED_SIZE);
}

/* ---- counters ---- */

/* The family of a counter. */
static const FamilyDef *
family_of(ResilienceCounter counter)
{
	if (counter_family[counter] == NULL)
	{
		for (int i = 0; i < NUM_FAMILIES; i++)
			if (families[i].kind == FAMILY_COUNTER)
				counter_family[families[i].counter] = &families[i];
		if (counter_family[counter] == NULL)
			elog(ERROR, "counter %d has no family", (int) counter);
	}
	return counter_family[counter];
}

/* The shared counter of a series, created if it is new (no lock held). */
static pg_atomic_uint64 *
shared_counter(const MetricKey *key)
{
	MetricEntry *entry;
	bool		found;

	LWLockAcquire(metrics_shared->lock, LW_SHARED);
	entry = hash_search(metrics_hash, key, HASH_FIND, NULL);
	LWLockRelease(metrics_shared->lock);
	if (entry)
		return &entry->value;

	LWLockAcquire(metrics_shared->lock, LW_EXCLUSIVE);
	entry = hash_search(metrics_hash, key, HASH_ENTER_NULL, &found);
	if (entry && !found)
		pg_atomic_init_u64(&entry->value, 0);
	LWLockRelease(metrics_shared->lock);
	return entry ? &entry->value : &metrics_shared->dropped;
}

pg_atomic_uint64 *
metrics_counter(ResilienceCounter counter, int variant, const char *label)
{
	const FamilyDef *f;
	MetricKey	key;
	LocalEntry *local;
	bool		found;

	Assert(counter >= 0 && counter < RC_NUM_COUNTERS);
	Assert(variant >= 0 && variant < MAX_VARIANTS);
	if (label == NULL && plain[counter][variant] != NULL)
		return plain[counter][variant];
	if (metrics_shared == NULL)
	{
		if (!local_sink_ready)
			pg_atomic_init_u64(&local_sink, 0);
		local_sink_ready = true;
		return &local_sink;
	}

	f = family_of(counter);
	memset(&key, 0, sizeof(key));
	key.dboid = f->per_database ? MyDatabaseId : InvalidOid;
	key.counter = (uint16) counter;
	key.variant = (uint16) variant;
	if (label)
	{
		/* cut to NAMEDATALEN - 1 bytes, never inside a character */
		int			len = pg_mbcliplen(label, strlen(label), NAMEDATALEN - 1);

		memcpy(key.label, label, len);
	}
	if (label == NULL)
		return plain[counter][variant] = shared_counter(&key);

	if (local_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(MetricKey);
		ctl.entrysize = sizeof(LocalEntry);
		ctl.hcxt = TopMemoryContext;
		local_cache = hash_create("resilience metric series", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	local = hash_search(local_cache, &key, HASH_FIND, NULL);
	if (local)
		return local->counter;
	{
		pg_atomic_uint64 *c = shared_counter(&key);

		local = hash_search(local_cache, &key, HASH_ENTER, &found);
		local->counter = c;
	}
	return local->counter;
}

void
metrics_add(ResilienceCounter counter, int variant, const char *label, uint64 n)
{
	pg_atomic_fetch_add_u64(metrics_counter(counter, variant, label), n);
}

/* Apply the increments of a committed transaction, or forget them. */
static void
metrics_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			for (int i = 0; i < npending; i++)
				pg_atomic_fetch_add_u64(pending[i].counter, pending[i].n);
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			pending = NULL;		/* freed with TopTransactionContext */
			npending = maxpending = 0;
			break;
		default:
			break;
	}
}

/* A subtransaction's increments go to its parent, or away with it. */
static void
metrics_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	int			kept = 0;

	if (event != SUBXACT_EVENT_ABORT_SUB && event != SUBXACT_EVENT_COMMIT_SUB)
		return;
	for (int i = 0; i < npending; i++)
	{
		if (pending[i].subid == mySubid)
		{
			if (event == SUBXACT_EVENT_ABORT_SUB)
				continue;
			pending[i].subid = parentSubid;
		}
		pending[kept++] = pending[i];
	}
	npending = kept;
}

void
metrics_add_at_commit(ResilienceCounter counter, int variant, const char *label, uint64 n)
{
	static bool registered = false;
	pg_atomic_uint64 *c = metrics_counter(counter, variant, label);
	SubTransactionId subid;

	if (!IsTransactionState())
	{
		pg_atomic_fetch_add_u64(c, n);
		return;
	}
	if (!registered)
	{
		RegisterXactCallback(metrics_xact_callback, NULL);
		RegisterSubXactCallback(metrics_subxact_callback, NULL);
		registered = true;
	}
	subid = GetCurrentSubTransactionId();
	if (npending > 0 && pending[npending - 1].counter == c &&
		pending[npending - 1].subid == subid)
	{
		pending[npending - 1].n += n;
		return;
	}
	if (npending == maxpending)
	{
		maxpending = Max(16, maxpending * 2);
		pending = pending == NULL ?
			MemoryContextAlloc(TopTransactionContext, maxpending * sizeof(PendingAdd)) :
			repalloc(pending, maxpending * sizeof(PendingAdd));
	}
	pending[npending].counter = c;
	pending[npending].n = n;
	pending[npending].subid = subid;
	npending++;
}

int
metrics_saga_event(const char *event)
{
	for (int i = 0; saga_events[i]; i++)
		if (strcmp(saga_events[i], event) == 0)
			return i;
	elog(ERROR, "unknown saga event \"%s\"", event);
	return -1;					/* keep the compiler quiet */
}

/*
 * _metrics_reaped(item, removed) → removed: count what a reaper removed, at
 * commit.  Internal to run_reaper (executable by the extension's owner only).
 */
Datum
metrics_reaped(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	if (PG_GETARG_INT64(1) > 0)
		metrics_add_at_commit(RC_REAPED, 0, text_to_cstring(PG_GETARG_TEXT_PP(0)),
							  (uint64) PG_GETARG_INT64(1));
	PG_RETURN_INT64(PG_GETARG_INT64(1));
}

/*
 * _metrics_count(what, n) -> n: count for SQL code of the extension
 * (executable by its owner only; append_events is SECURITY DEFINER).
 * stream_events are counted at commit, stream_conflicts at once (the
 * conflict's error rolls the transaction back).
 */
Datum
metrics_count(PG_FUNCTION_ARGS)
{
	char	   *what;
	int64		n;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	what = text_to_cstring(PG_GETARG_TEXT_PP(0));
	n = PG_GETARG_INT64(1);
	if (n < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a count must not be negative"),
				 errdetail("It is " INT64_FORMAT ".", n)));
	if (strcmp(what, "stream_events") == 0)
		metrics_add_at_commit(RC_STREAM_EVENTS, 0, NULL, (uint64) n);
	else if (strcmp(what, "stream_conflicts") == 0)
		metrics_add(RC_STREAM_CONFLICTS, 0, NULL, (uint64) n);
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown counter \"%s\"", what),
				 errhint("Known: stream_events, stream_conflicts.")));
	PG_RETURN_INT64(n);
}

/* ---- collecting ---- */

static Sample *
new_sample(double value)
{
	Sample	   *s = palloc0(sizeof(Sample));

	s->value = value;
	return s;
}

static void
add_label(Sample *s, const char *name, const char *value)
{
	if (s->nlabels >= MAX_LABELS)
		elog(ERROR, "too many labels in a metric sample");
	s->names[s->nlabels] = name;
	s->values[s->nlabels] = value;
	s->nlabels++;
}

/* A copy of a counter series, read at scrape time. */
typedef struct SeriesCopy
{
	MetricKey	key;
	uint64		value;
} SeriesCopy;

typedef struct Scrape
{
	SeriesCopy *series;			/* of this database and server-wide, sorted */
	int			nseries;
	long		nshared;		/* series of the whole server */
	List	   *samples[NUM_FAMILIES];
} Scrape;

static int
series_cmp(const void *a, const void *b)
{
	const MetricKey *x = &((const SeriesCopy *) a)->key;
	const MetricKey *y = &((const SeriesCopy *) b)->key;
	int			c;

	if (x->counter != y->counter)
		return x->counter < y->counter ? -1 : 1;
	if ((c = strcmp(x->label, y->label)) != 0)
		return c;
	return x->variant < y->variant ? -1 : x->variant > y->variant ? 1 : 0;
}

/* Copy the series this database reports (its own and the server-wide ones). */
static void
copy_series(Scrape *scrape)
{
	HASH_SEQ_STATUS seq;
	MetricEntry *entry;
	int			max = resilience_max_metric_series;

	scrape->series = palloc(sizeof(SeriesCopy) * Max(max, 1));
	scrape->nseries = 0;
	if (metrics_shared == NULL)
		return;
	LWLockAcquire(metrics_shared->lock, LW_SHARED);
	scrape->nshared = hash_get_num_entries(metrics_hash);
	hash_seq_init(&seq, metrics_hash);
	while ((entry = hash_seq_search(&seq)) != NULL)
	{
		if (entry->key.dboid != InvalidOid && entry->key.dboid != MyDatabaseId)
			continue;
		if (scrape->nseries >= max)
		{
			hash_seq_term(&seq);
			break;
		}
		scrape->series[scrape->nseries].key = entry->key;
		scrape->series[scrape->nseries].value = pg_atomic_read_u64(&entry->value);
		scrape->nseries++;
	}
	LWLockRelease(metrics_shared->lock);
	qsort(scrape->series, scrape->nseries, sizeof(SeriesCopy), series_cmp);
}

/* The samples of a counter family: every variant when it has no free label. */
static List *
counter_samples(const FamilyDef *f, Scrape *scrape)
{
	List	   *samples = NIL;
	double		scale = f->scale > 0 ? f->scale : 1;
	Oid			dboid = f->per_database ? MyDatabaseId : InvalidOid;

	if (f->label == NULL)
	{
		int			nvariants = 0;

		while (f->variants && f->variants[nvariants])
			nvariants++;
		for (int v = 0; v < Max(nvariants, 1); v++)
		{
			uint64		count = 0;
			Sample	   *s;

			for (int i = 0; i < scrape->nseries; i++)
				if (scrape->series[i].key.counter == f->counter &&
					scrape->series[i].key.variant == v &&
					scrape->series[i].key.dboid == dboid)
					count += scrape->series[i].value;
			s = new_sample(count * scale);
			if (f->variant_label)
				add_label(s, f->variant_label, f->variants[v]);
			samples = lappend(samples, s);
		}
		return samples;
	}

	for (int i = 0; i < scrape->nseries; i++)
	{
		SeriesCopy *c = &scrape->series[i];
		Sample	   *s;

		if (c->key.counter != f->counter || c->key.dboid != dboid)
			continue;
		s = new_sample(c->value * scale);
		add_label(s, f->label, pstrdup(c->key.label));
		if (f->variant_label)
			add_label(s, f->variant_label, f->variants[c->key.variant]);
		samples = lappend(samples, s);
	}
	return samples;
}

static Scrape *current_scrape = NULL;

static void
collect_info(List **samples)
{
	Sample	   *s = new_sample(1);
	int			ret;

	ret = SPI_execute("SELECT extversion FROM pg_catalog.pg_extension"
					  " WHERE extname OPERATOR(pg_catalog.=) 'resilience'", true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the extension's version: %s", SPI_result_code_string(ret));
	add_label(s, "version", SPI_processed == 1 ?
			  SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1) : "");
	add_label(s, "shared_preload_libraries", resilience_preloaded ? "true" : "false");
	*samples = lappend(*samples, s);
}

static void
collect_rate_limit_table(List **samples)
{
	ShmTableStats stats;

	if (ratelimit_table_stats(&stats))
		*samples = lappend(*samples, new_sample(stats.used));
}

static void
collect_rate_limit_evictions(List **samples)
{
	ShmTableStats stats;
	Sample	   *s;

	if (!ratelimit_table_stats(&stats))
		return;
	s = new_sample((double) stats.evicted_idle);
	add_label(s, "reason", "idle");
	*samples = lappend(*samples, s);
	s = new_sample((double) stats.evicted_active);
	add_label(s, "reason", "active");
	*samples = lappend(*samples, s);
}

static void
collect_rate_limit_full(List **samples)
{
	ShmTableStats stats;

	if (ratelimit_table_stats(&stats))
		*samples = lappend(*samples, new_sample((double) stats.full));
}

static void
collect_series(List **samples)
{
	if (metrics_shared)
		*samples = lappend(*samples, new_sample(current_scrape->nshared));
}

static void
collect_series_max(List **samples)
{
	if (metrics_shared)
		*samples = lappend(*samples, new_sample(resilience_max_metric_series));
}

static void
collect_series_dropped(List **samples)
{
	if (metrics_shared)
		*samples = lappend(*samples,
						   new_sample((double) pg_atomic_read_u64(&metrics_shared->dropped)));
}

/* The family called name, for a gauge query's row. */
static int
family_index(const char *name)
{
	for (int i = 0; i < NUM_FAMILIES; i++)
		if (families[i].kind == FAMILY_QUERY && strcmp(families[i].name, name) == 0)
			return i;
	elog(ERROR, "a metrics query returned an unknown metric \"%s\"", name);
	return -1;					/* keep the compiler quiet */
}

/* Run the gauge queries (SPI connected), appending their rows' samples. */
static void
run_gauge_queries(Scrape *scrape, MemoryContext cxt)
{
	for (int q = 0; q < lengthof(gauge_queries); q++)
	{
		int			ret;

		if (gauge_queries[q].needs_preload && !resilience_preloaded)
			continue;
		ret = SPI_execute(gauge_queries[q].sql, true, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "a metrics query failed: %s", SPI_result_code_string(ret));
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			HeapTuple	tuple = SPI_tuptable->vals[r];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			Datum		value = SPI_getbinval(tuple, desc, 3, &isnull);
			MemoryContext old;
			Datum	   *labels;
			bool	   *nulls;
			int			nlabels;
			int			f;
			Sample	   *s;

			if (isnull)
				continue;
			f = family_index(SPI_getvalue(tuple, desc, 1));
			old = MemoryContextSwitchTo(cxt);
			s = new_sample(DatumGetFloat8(value));
			deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 2, &isnull)),
							  TEXTOID, -1, false, TYPALIGN_INT, &labels, &nulls, &nlabels);
			for (int i = 0; i + 1 < nlabels; i += 2)
				add_label(s, nulls[i] ? "" : TextDatumGetCString(labels[i]),
						  nulls[i + 1] ? "" : TextDatumGetCString(labels[i + 1]));
			scrape->samples[f] = lappend(scrape->samples[f], s);
			MemoryContextSwitchTo(old);
		}
	}
}

/* Samples of a family in a stable order: by their label values. */
static int
sample_cmp(const ListCell *a, const ListCell *b)
{
	const Sample *x = lfirst(a);
	const Sample *y = lfirst(b);

	for (int i = 0; i < Min(x->nlabels, y->nlabels); i++)
	{
		int			c = strcmp(x->values[i], y->values[i]);

		if (c != 0)
			return c;
	}
	return x->nlabels - y->nlabels;
}

/* Everything this database reports, family by family. */
static Scrape *
collect(void)
{
	Scrape	   *scrape = palloc0(sizeof(Scrape));
	MemoryContext cxt = CurrentMemoryContext;

	copy_series(scrape);
	current_scrape = scrape;
	SPI_connect();
	for (int i = 0; i < NUM_FAMILIES; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		if (families[i].kind == FAMILY_COUNTER)
			scrape->samples[i] = counter_samples(&families[i], scrape);
		else if (families[i].kind == FAMILY_C)
			families[i].collect(&scrape->samples[i]);
		MemoryContextSwitchTo(old);
	}
	run_gauge_queries(scrape, cxt);
	SPI_finish();
	current_scrape = NULL;
	for (int i = 0; i < NUM_FAMILIES; i++)
		if (families[i].kind == FAMILY_QUERY)
			list_sort(scrape->samples[i], sample_cmp);
	return scrape;
}

/* ---- the exposition format ---- */

/* Append s escaped: backslash and newline always, double quotes in labels. */
static void
append_escaped(StringInfo buf, const char *s, bool label)
{
	for (; *s; s++)
	{
		if (*s == '\\')
			appendStringInfoString(buf, "\\\\");
		else if (*s == '\n')
			appendStringInfoString(buf, "\\n");
		else if (*s == '"' && label)
			appendStringInfoString(buf, "\\\"");
		else
			appendStringInfoChar(buf, *s);
	}
}

/* A sample value as Prometheus reads it (Go's ParseFloat). */
static void
append_value(StringInfo buf, double v)
{
	if (isnan(v))
		appendStringInfoString(buf, "NaN");
	else if (isinf(v))
		appendStringInfoString(buf, v > 0 ? "+Inf" : "-Inf");
	else if (v == floor(v) && fabs(v) < 1e15)
		appendStringInfo(buf, "%.0f", v);
	else
		appendStringInfo(buf, "%.15g", v);
}

/* resilience.metrics() → text: every family, HELP and TYPE first. */
Datum
metrics(PG_FUNCTION_ARGS)
{
	Scrape	   *scrape = collect();
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < NUM_FAMILIES; i++)
	{
		const FamilyDef *f = &families[i];
		ListCell   *lc;

		appendStringInfo(&buf, "# HELP %s ", f->name);
		append_escaped(&buf, f->help, false);
		appendStringInfo(&buf, "\n# TYPE %s %s\n", f->name, f->type);
		foreach(lc, scrape->samples[i])
		{
			Sample	   *s = lfirst(lc);

			appendStringInfoString(&buf, f->name);
			for (int l = 0; l < s->nlabels; l++)
			{
				appendStringInfo(&buf, "%c%s=\"", l == 0 ? '{' : ',', s->names[l]);
				append_escaped(&buf, s->values[l], true);
				appendStringInfoChar(&buf, '"');
			}
			if (s->nlabels > 0)
				appendStringInfoChar(&buf, '}');
			appendStringInfoChar(&buf, ' ');
			append_value(&buf, s->value);
			appendStringInfoChar(&buf, '\n');
		}
	}
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}

/*
 * resilience.metric_samples() → (metric, type, labels jsonb, value): the same
 * samples as rows, for SQL-to-metrics bridges that read columns.
 */
Datum
metric_samples(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Scrape	   *scrape;

	InitMaterializedSRF(fcinfo, 0);
	scrape = collect();
	for (int i = 0; i < NUM_FAMILIES; i++)
	{
		ListCell   *lc;

		foreach(lc, scrape->samples[i])
		{
			Sample	   *s = lfirst(lc);
			StringInfoData json;
			Datum		values[4];
			bool		nulls[4] = {false, false, false, false};

			initStringInfo(&json);
			appendStringInfoChar(&json, '{');
			for (int l = 0; l < s->nlabels; l++)
			{
				if (l > 0)
					appendStringInfoString(&json, ", ");
				escape_json(&json, s->names[l]);
				appendStringInfoString(&json, ": ");
				escape_json(&json, s->values[l]);
			}
			appendStringInfoChar(&json, '}');
			values[0] = CStringGetTextDatum(families[i].name);
			values[1] = CStringGetTextDatum(families[i].type);
			values[2] = DirectFunctionCall1(jsonb_in, CStringGetDatum(json.data));
			values[3] = Float8GetDatum(s->value);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}
