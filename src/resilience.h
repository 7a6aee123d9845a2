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
extern int	resilience_relay_interval_ms;
extern int	resilience_outbox_batch_size;
extern int	resilience_outbox_http_parallelism;
extern char *resilience_outbox_http_allowed_hosts;
extern int	resilience_outbox_retention_s;
extern int	resilience_outbox_breaker_failures;
extern int	resilience_outbox_breaker_open_ms;

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

/* An interval in microseconds (months as 30 days), clamped to int64. */
static inline int64
resilience_interval_usecs(const Interval *iv)
{
	int128		usecs = (int128) iv->time + (int128) iv->day * USECS_PER_DAY +
		(int128) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;

	if (usecs > PG_INT64_MAX || usecs < PG_INT64_MIN)
		return usecs > 0 ? PG_INT64_MAX : PG_INT64_MIN;
	return (int64) usecs;
}

/* shmem.c: raise 55000 unless the library was preloaded. */
extern void resilience_require_preload(const char *feature);

/* worker.c */
extern void worker_register_launcher(void);
extern void worker_utility_hook_init(void);
extern bool worker_stop_requested(void);

#endif							/* RESILIENCE_H */
