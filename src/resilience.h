/*-------------------------------------------------------------------------
 *
 * resilience.h
 *		Settings and helpers shared by every capability.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_H
#define RESILIENCE_H

#include "compat.h"

#include <time.h>

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "utils/guc.h"
#include "utils/relcache.h"

/* What a shared-memory table does when it is full (resilience.when_full). */
typedef enum ResilienceWhenFull
{
	WHEN_FULL_EVICT,
	WHEN_FULL_ALLOW,
	WHEN_FULL_DENY,
	WHEN_FULL_ERROR
} ResilienceWhenFull;

/* GUCs, defined in resilience.c; see docs/operations.md. */
extern int	resilience_max_keys;
extern int	resilience_max_key_length;
extern int	resilience_when_full;
extern char *resilience_database_names;
extern int	resilience_max_workers;
extern int	resilience_worker_naptime_ms;
extern int	resilience_reaper_interval_ms;
extern int	resilience_max_lock_names;
extern int	resilience_reaper_batch_size;
extern int	resilience_reaper_max_batches;
extern int	resilience_max_breakers;
extern int	resilience_max_bulkheads;
extern int	resilience_max_metric_series;

/* Breaker defaults (resilience.breaker_*), for breaker_config's NULL columns. */
typedef enum ResilienceWindowType
{
	WINDOW_COUNT,
	WINDOW_TIME
} ResilienceWindowType;

extern double resilience_breaker_failure_rate_threshold;
extern double resilience_breaker_slow_call_rate_threshold;
extern int	resilience_breaker_slow_call_duration_ms;
extern int	resilience_breaker_window_type;
extern int	resilience_breaker_window_size;
extern int	resilience_breaker_minimum_calls;
extern int	resilience_breaker_open_timeout_ms;
extern int	resilience_breaker_half_open_calls;
extern int	resilience_breaker_probe_timeout_ms;

/* Set when a breaker default may have changed (GUC assign hooks). */
extern bool resilience_breaker_defaults_changed;
extern int	resilience_saga_interval_ms;
extern int	resilience_saga_workers;
/* Most saga orchestrators per database (resilience.saga_workers). */
#define RESILIENCE_MAX_SAGA_WORKERS 16
extern int	resilience_saga_retention_s;
extern int	resilience_saga_stuck_after_s;
extern int	resilience_relay_interval_ms;
extern int	resilience_schedule_interval_ms;
extern int	resilience_schedule_retention_s;
extern int	resilience_schedule_max_parallel;
extern char *resilience_schedule_slot;
extern int	resilience_outbox_batch_size;
extern int	resilience_outbox_http_parallelism;
extern char *resilience_outbox_http_allowed_hosts;
extern char *resilience_outbox_allowed_hosts;
extern int	resilience_outbox_retention_s;
extern int	resilience_outbox_breaker_failures;
extern int	resilience_outbox_breaker_open_ms;

/* W3C trace context of the events a session publishes (outbox.c checks it). */
extern char *resilience_traceparent;
extern char *resilience_tracestate;
extern bool outbox_check_traceparent_guc(char **newval, void **extra, GucSource source);
extern bool outbox_check_tracestate_guc(char **newval, void **extra, GucSource source);

/* True once _PG_init ran from shared_preload_libraries. */
extern bool resilience_preloaded;

/*
 * The clock every rate and TTL decision uses: CLOCK_MONOTONIC, shared by all
 * processes on the machine and never stepped by changes to the wall clock.
 */
static inline int64
resilience_clock_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64) ts.tv_sec * INT64CONST(1000000000) + ts.tv_nsec;
}

/* Longest interval accepted by functions taking durations: 366 days. */
#define RESILIENCE_MAX_INTERVAL_USEC (INT64CONST(366) * USECS_PER_DAY)

/*
 * An interval in microseconds, a month counting as 30 days (PostgreSQL's own
 * convention for interval arithmetic); wide enough never to overflow.
 */
static inline int128
resilience_interval_usec(const Interval *interval)
{
	return (int128) interval->time +
		(int128) interval->day * USECS_PER_DAY +
		(int128) interval->month * DAYS_PER_MONTH * USECS_PER_DAY;
}

/* shmem.c: raise 55000 unless the library was preloaded. */
extern void resilience_require_preload(const char *feature);

/* args.c: argument checking shared by the SQL functions (22004, 22023). */
extern text *resilience_arg_text(FunctionCallInfo fcinfo, int argno, const char *what);
extern int32 resilience_arg_int(FunctionCallInfo fcinfo, int argno, const char *what);
extern int32 resilience_arg_positive(FunctionCallInfo fcinfo, int argno, const char *what);
extern int	resilience_arg_name(FunctionCallInfo fcinfo, int argno, const char *what,
								char *name);
extern int64 resilience_arg_duration(FunctionCallInfo fcinfo, int argno, const char *what,
									 bool allow_zero);
extern char *resilience_interval_text(int64 usec);

/*
 * privilege.c: the one way to act as another role (the owner of the
 * extension's tables, a saga's definer): SECURITY_LOCAL_USERID_CHANGE |
 * SECURITY_RESTRICTED_OPERATION, search_path pinned unless a documented hot
 * path says otherwise.
 */
#define RESILIENCE_SEARCH_PATH "pg_catalog, pg_temp"

typedef struct ResilienceUser
{
	Oid			userid;			/* the caller's, restored */
	int			sec_context;
	int			guc_level;		/* 0: search_path was not pinned */
} ResilienceUser;

extern Oid	resilience_relid(const char *name);
extern Oid	resilience_owner(void);
extern void resilience_become(Oid role, bool pin_path, ResilienceUser *save);
extern void resilience_become_owner(bool pin_path, ResilienceUser *save);
extern void resilience_restore_user(const ResilienceUser *save);
extern ErrorData *resilience_run_caught(void (*fn) (void *arg), void *arg);

/* Is Citus installed here?  Then no direct heap/index access (src/events.c). */
extern bool citus_present(void);

/* WAL up to lsn flushed by the synchronous standbys, or none configured? */
extern bool sync_standbys_flushed(XLogRecPtr lsn);

/*
 * Rows updated without the executor (leases, stream head rows): may rel be,
 * and the index entries of a version that is not HOT (src/resilience.c).
 */
struct TupleTableSlot;
extern Oid	direct_update_layout(Relation rel, int ncols, const char *const *names,
								 const Oid *types, AttrNumber *attnums, int key_col);
/* update_indexes: table_tuple_update's (a bool before 16, an enum from 16) */
extern void direct_update_indexes(Relation rel, struct TupleTableSlot *slot, int update_indexes);

/*
 * The relay's per-route limits (sink_http.c): a token bucket and a bulkhead
 * in the shared tables under kinds of their own, which no name a SQL caller
 * of rate_limit or bulkhead_acquire passes can reach.  Need preloading.
 */
extern bool rate_limit_take_internal(const char *key, int keylen, int32 capacity,
									 double rate);
extern bool bulkhead_try_acquire_internal(const char *name, int32 max_concurrent);
extern void bulkhead_release_internal(const char *name);

/* backoff.c: exponential backoff with jitter (docs/bulkheads-and-retries.md). */
typedef enum ResilienceJitter
{
	JITTER_NONE,
	JITTER_FULL,
	JITTER_EQUAL,
	JITTER_DECORRELATED
} ResilienceJitter;

extern int64 resilience_backoff_usec(int attempt, int64 base, int64 cap,
									 ResilienceJitter jitter, int64 previous);

/* worker.c */
struct BackgroundWorkerHandle;
extern void worker_register_launcher(void);
extern bool worker_start_dynamic(const char *function, const char *type, const char *name,
								 bool after_recovery, Datum main_arg, const void *extra,
								 Size extra_len, struct BackgroundWorkerHandle **handle);
extern void worker_utility_hook_init(void);
extern void worker_wake(Oid dboid);
extern void worker_wake_at_commit(void);
extern bool worker_stop_requested(void);

/* schedule.c: the worker's schedules job */
extern long schedule_worker_job(void);

#endif							/* RESILIENCE_H */
