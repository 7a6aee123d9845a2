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
extern int	resilience_saga_interval_ms;
extern int	resilience_saga_retention_s;
extern int	resilience_saga_stuck_after_s;

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

/* shmem.c: raise 55000 unless the library was preloaded. */
extern void resilience_require_preload(const char *feature);

/* worker.c */
extern void worker_register_launcher(void);
extern void worker_utility_hook_init(void);
extern void worker_wake(Oid dboid);

#endif							/* RESILIENCE_H */
