/*-------------------------------------------------------------------------
 *
 * metrics.h
 *		Counters in shared memory, monotonic over the server's lifetime,
 *		and what resilience.metrics() reports (docs/monitoring.md).
 *
 * A counter is one of the families below, a variant (the value of its
 * enumerated label, 0 when it has none) and the value of its free label
 * (a policy, breaker, route... or NULL when it has none).  To add one: a
 * ResilienceCounter, its variants, an entry in metrics.c's families[], a
 * metrics_add() where the thing happens, and a line in docs/monitoring.md.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_METRICS_H
#define RESILIENCE_METRICS_H

#include "resilience.h"

#include "port/atomics.h"

typedef enum ResilienceCounter
{
	RC_RATE_LIMIT_DECISIONS,	/* policy; RV_ALLOWED, RV_DENIED */
	RC_BREAKER_CALLS,			/* breaker; RV_SUCCESS, RV_FAILURE, RV_NOT_PERMITTED */
	RC_BREAKER_TRANSITIONS,		/* breaker; the state entered (breaker.c's order) */
	RC_BULKHEAD_ACQUISITIONS,	/* bulkhead; RV_ACQUIRED, RV_REJECTED, RV_TIMED_OUT */
	RC_LEASE_ACQUISITIONS,		/* RV_LEASE_ACQUIRED, RV_LEASE_NOT_ACQUIRED */
	RC_LEASE_TAKEOVERS,
	RC_LEASE_WAITS,
	RC_FENCE_REJECTIONS,
	RC_IDEMPOTENCY_BEGINS,		/* idempotency.c's outcome order */
	RC_IDEMPOTENCY_RESULTS,		/* RV_COMPLETED, RV_FAILED, RV_RETRY */
	RC_INBOX_MESSAGES,			/* RV_ACCEPTED, RV_DUPLICATE */
	RC_REAPED,					/* item */
	RC_OUTBOX_PUBLISHED,
	RC_OUTBOX_DELIVERED,		/* route_id */
	RC_OUTBOX_RETRIES,			/* route_id */
	RC_OUTBOX_DEAD_LETTERS,		/* route_id */
	RC_SAGA_EVENTS,				/* saga; the event (metrics_saga_event) */
	RC_SAGA_STEP_RETRIES,		/* saga; RV_ACTION, RV_COMPENSATION */
	RC_WORKER_JOB_RUNS,			/* job; RV_SUCCESS, RV_FAILURE */
	RC_WORKER_JOB_SECONDS,		/* job; counted in microseconds */
	RC_STREAM_EVENTS,			/* events appended (append_events) */
	RC_STREAM_CONFLICTS,		/* appends refused with 40001 */
	RC_SCHEDULE_RUNS,			/* schedule; RV_SCHEDULE_* */
	RC_SCHEDULE_LAG,			/* schedule; slot time to first start, in microseconds */
	RC_SCHEDULE_STARTS,			/* schedule; slots started (first attempts) */
	RC_QUOTA_DECISIONS,			/* RV_ALLOWED, RV_DENIED (cost > 0) */
	RC_NUM_COUNTERS
} ResilienceCounter;

/* Variants (values of a counter's enumerated label), in families[] order. */
#define RV_ALLOWED 0
#define RV_DENIED 1
#define RV_SUCCESS 0
#define RV_FAILURE 1
#define RV_NOT_PERMITTED 2
#define RV_ACQUIRED 0
#define RV_REJECTED 1
#define RV_TIMED_OUT 2
#define RV_LEASE_ACQUIRED 0
#define RV_LEASE_NOT_ACQUIRED 1
#define RV_COMPLETED 0
#define RV_FAILED 1
#define RV_RETRY 2
#define RV_ACCEPTED 0
#define RV_DUPLICATE 1
#define RV_SCHEDULE_SUCCEEDED 0
#define RV_SCHEDULE_RETRYING 1
#define RV_SCHEDULE_FAILED 2
#define RV_SCHEDULE_SKIPPED 3
#define RV_ACTION 0
#define RV_COMPENSATION 1

/*
 * The counter for (counter, variant, label), created on first use.  The
 * pointer stays valid for the life of the process: cache it on hot paths.
 * Never call it under a spinlock (it may take an LWLock and allocate).
 */
extern pg_atomic_uint64 *metrics_counter(ResilienceCounter counter, int variant,
										 const char *label);

/* Add n now (a decision made, whatever the transaction does next). */
extern void metrics_add(ResilienceCounter counter, int variant, const char *label,
						uint64 n);

/* Add n when (and if) the current (sub)transaction commits. */
extern void metrics_add_at_commit(ResilienceCounter counter, int variant,
								  const char *label, uint64 n);

/* The variant of a saga event's name (saga.c's saga_event). */
extern int	metrics_saga_event(const char *event);

static inline void
metrics_inc(pg_atomic_uint64 *counter)
{
	pg_atomic_fetch_add_u64(counter, 1);
}

#endif							/* RESILIENCE_METRICS_H */
