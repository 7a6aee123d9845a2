/*-------------------------------------------------------------------------
 *
 * bulkhead.c
 *		Bulkheads: named counting semaphores in shared memory that bound how
 *		many sessions of the whole cluster do something at once.
 *
 * A bulkhead is an entry of a shared keyed table (shmem.c) of
 * resilience.max_bulkheads entries, keyed by name (cluster-wide, like rate
 * limits).  Its max_concurrent is the one the latest caller passed.
 *
 * Permits
 * -------
 * bulkhead_acquire takes a permit held until the end of the transaction (or
 * of the subtransaction, if that aborts: like a lock taken there);
 * bulkhead_acquire_session one held until bulkhead_release or the end of the
 * session.  Each backend remembers the permits it holds (HeldPermit) and
 * gives back exactly those: at commit, abort or PREPARE (XactCallback), at
 * subtransaction abort (SubXactCallback), at exit (before_shmem_exit, which
 * also leaves a wait cut short by FATAL).  After a backend crash the
 * postmaster reinitialises shared memory, so permits come back by
 * construction.  A backend never releases a permit it does not hold.
 *
 * Waiting, in FIFO order
 * ----------------------
 * A caller that finds no free permit, or others already waiting, waits on
 * the bulkhead's condition variable (never polls), for at most max_wait; an
 * optional max_queue refuses at once when that many already wait.  Newcomers
 * never overtake waiters: while anyone waits, a freed permit is handed off
 * (handoffs) and the longest waiter is signalled; ConditionVariableSignal
 * wakes waiters in the order they started to wait.  A waiter that is woken
 * takes a handed-off permit; one that gives up (timeout, error, exit) having
 * consumed a signal passes it on, so no handed-off permit is ever stranded,
 * and handoffs never exceed waiters (the surplus goes back to the pool).
 *
 *	in_use		permits held
 *	handoffs	permits freed for waiters and not yet taken by them
 *	waiting		sessions registered as waiting (signalled or not)
 *	a newcomer takes a permit at once iff waiting == 0 and in_use < max
 *
 * Locking: the partition lock in shared mode and the entry's spinlock for
 * every change; the partition lock exclusively only to create an entry.  An
 * entry with permits held or sessions waiting is never removed, so a holder
 * may keep a pointer to it; condition variable calls are made outside the
 * spinlock (but under the partition lock, except the sleep itself).
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"
#include "metrics.h"

#include <math.h>

#include "access/xact.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#define BULKHEAD_PARTITIONS 16
#define BULKHEAD_TRANCHE "resilience_bulkheads"
#define KIND_BULKHEAD 1
/*
 * The relay's route bulkheads (bulkhead_try_acquire_internal): a kind no SQL
 * function asks for, so no name a caller passes reaches them.
 */
#define KIND_INTERNAL 2
#define BULKHEAD_KEY_LEN (NAMEDATALEN - 1)
/* Longest single sleep; a longer wait sleeps again, keeping its place. */
#define MAX_SLEEP_MS 3600000

typedef struct Bulkhead
{
	ConditionVariable cv;
	int32		max_concurrent;
	int32		in_use;
	int32		waiting;
	int32		handoffs;
	uint64		acquired;
	uint64		rejected;		/* refused at once: no wait, or queue full */
	uint64		timed_out;		/* waited max_wait in vain */
} Bulkhead;

typedef enum EnterOutcome
{
	ENTER_ACQUIRED,
	ENTER_REJECTED,
	ENTER_MUST_WAIT,
	ENTER_WAITING,
	ENTER_TIMED_OUT
} EnterOutcome;

/* A permit this backend holds: InvalidSubTransactionId for session ones. */
typedef struct HeldPermit
{
	ShmEntry   *entry;
	SubTransactionId subid;
} HeldPermit;

static ShmTable *bulkhead_table = NULL;
static HeldPermit *held = NULL;
static int	nheld = 0;
static int	maxheld = 0;
static ShmEntry *waiting_on = NULL; /* while registered as a waiter */

PG_FUNCTION_INFO_V1(bulkhead_acquire);
PG_FUNCTION_INFO_V1(bulkhead_acquire_session);
PG_FUNCTION_INFO_V1(bulkhead_release);
PG_FUNCTION_INFO_V1(bulkhead_entries);
PG_FUNCTION_INFO_V1(bulkhead_sweep);

/* ---- shared memory ---- */

/* Shared memory for the bulkhead table. */
Size
bulkhead_shmem_size(void)
{
	return shm_table_size(resilience_max_bulkheads, sizeof(Bulkhead), BULKHEAD_KEY_LEN);
}

/* The partition locks of the bulkhead table. */
void
bulkhead_shmem_request(void)
{
	shm_table_request_locks(BULKHEAD_TRANCHE, BULKHEAD_PARTITIONS);
}

/* Create or attach to the bulkhead table (AddinShmemInitLock held). */
void
bulkhead_shmem_init(void)
{
	bulkhead_table = shm_table_init("resilience bulkheads", resilience_max_bulkheads,
									sizeof(Bulkhead), BULKHEAD_KEY_LEN,
									BULKHEAD_TRANCHE, BULKHEAD_PARTITIONS);
}

/* ---- the counts (under the entry spinlock: no errors, no calls) ---- */

/*
 * Hand free permits to waiters that have none coming yet; returns how many
 * waiters to signal.  Handed-off permits beyond the waiters go back first.
 */
static int
bulkhead_dispatch(Bulkhead *b)
{
	int			n;

	if (b->handoffs > b->waiting)
		b->handoffs = b->waiting;
	n = Min(b->max_concurrent - b->in_use - b->handoffs, b->waiting - b->handoffs);
	if (n <= 0)
		return 0;
	b->handoffs += n;
	return n;
}

/* A newcomer's chance: a permit now, a refusal now, or a wait. */
static EnterOutcome
bulkhead_try_enter(Bulkhead *b, bool can_wait, int32 max_queue)
{
	if (b->waiting == 0 && b->in_use < b->max_concurrent)
	{
		b->in_use++;
		b->acquired++;
		return ENTER_ACQUIRED;
	}
	if (!can_wait || (max_queue >= 0 && b->waiting >= max_queue))
	{
		b->rejected++;
		return ENTER_REJECTED;
	}
	return ENTER_MUST_WAIT;
}

/* A waiter takes the permit handed to it, if there is one. */
static bool
bulkhead_take_handoff(Bulkhead *b)
{
	if (b->handoffs <= 0)
		return false;
	b->handoffs--;
	b->waiting--;
	b->in_use++;
	b->acquired++;
	return true;
}

/* Wake the n longest waiters (outside the spinlock). */
static void
signal_waiters(Bulkhead *b, int n)
{
	while (n-- > 0)
		ConditionVariableSignal(&b->cv);
}

/* ---- leaving, releasing ---- */

/*
 * A registered waiter gives up (error or exit) without a permit: leave the
 * wait list and the count, passing on a signal it consumed.
 */
static void
bulkhead_abandon_wait(void)
{
	ShmEntry   *entry = waiting_on;
	Bulkhead   *b;
	LWLock	   *lock;
	bool		signaled;
	int			nsignal;

	if (entry == NULL)
		return;
	waiting_on = NULL;
	b = shm_entry_payload(bulkhead_table, entry);
	lock = shm_table_lock(bulkhead_table, entry->hash);
	signaled = ConditionVariableCancelSleep_compat(&b->cv);
	LWLockAcquire(lock, LW_SHARED);
	SpinLockAcquire(&entry->mutex);
	b->waiting--;
	/* a permit handed to us goes to the next waiter, or back to the pool */
	nsignal = (signaled && b->handoffs > 0 && b->handoffs <= b->waiting) ? 1 : 0;
	nsignal += bulkhead_dispatch(b);
	SpinLockRelease(&entry->mutex);
	signal_waiters(b, nsignal);
	LWLockRelease(lock);
}

/* Give back one permit of the bulkhead. */
static void
permit_release(ShmEntry *entry)
{
	Bulkhead   *b = shm_entry_payload(bulkhead_table, entry);
	LWLock	   *lock = shm_table_lock(bulkhead_table, entry->hash);
	int			nsignal;

	LWLockAcquire(lock, LW_SHARED);
	SpinLockAcquire(&entry->mutex);
	b->in_use--;
	nsignal = bulkhead_dispatch(b);
	SpinLockRelease(&entry->mutex);
	signal_waiters(b, nsignal);
	LWLockRelease(lock);
}

/*
 * Release the permits held for the transaction (all of them if subid is
 * InvalidSubTransactionId, else those taken in that subtransaction), or
 * every permit with everything.
 */
static void
release_held(bool everything, SubTransactionId subid)
{
	int			i;

	for (i = nheld - 1; i >= 0; i--)
	{
		if (!everything &&
			(held[i].subid == InvalidSubTransactionId ||
			 (subid != InvalidSubTransactionId && held[i].subid != subid)))
			continue;
		permit_release(held[i].entry);
		held[i] = held[--nheld];
	}
}

/* At the end of a transaction, its permits go back. */
static void
bulkhead_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			release_held(false, InvalidSubTransactionId);
			break;
		default:
			break;
	}
}

/* Permits taken in an aborted subtransaction go; a committed one's pass up. */
static void
bulkhead_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						  SubTransactionId parentSubid, void *arg)
{
	int			i;

	if (event == SUBXACT_EVENT_ABORT_SUB)
		release_held(false, mySubid);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		for (i = 0; i < nheld; i++)
			if (held[i].subid == mySubid)
				held[i].subid = parentSubid;
}

/* At backend exit, leave a wait and give back every permit. */
static void
bulkhead_exit(int code, Datum arg)
{
	bulkhead_abandon_wait();
	release_held(true, InvalidSubTransactionId);
}

/* Register the callbacks and make room to remember one more permit. */
static void
bulkhead_prepare_backend(void)
{
	static bool registered = false;

	if (!registered)
	{
		RegisterXactCallback(bulkhead_xact_callback, NULL);
		RegisterSubXactCallback(bulkhead_subxact_callback, NULL);
		before_shmem_exit(bulkhead_exit, (Datum) 0);
		registered = true;
	}
	if (nheld == maxheld)
	{
		int			newmax = maxheld > 0 ? maxheld * 2 : 8;

		held = held ? repalloc(held, newmax * sizeof(HeldPermit)) :
			MemoryContextAlloc(TopMemoryContext, newmax * sizeof(HeldPermit));
		maxheld = newmax;
	}
}

/* ---- acquiring ---- */

/*
 * Wait, registered, until a permit is handed to us or the deadline passes.
 * Called without locks; returns ENTER_ACQUIRED or ENTER_TIMED_OUT.
 */
static EnterOutcome
bulkhead_wait(ShmEntry *entry, int64 deadline)
{
	static uint32 wait_event = 0;
	Bulkhead   *b = shm_entry_payload(bulkhead_table, entry);
	LWLock	   *lock = shm_table_lock(bulkhead_table, entry->hash);
	EnterOutcome outcome = ENTER_TIMED_OUT;

	if (wait_event == 0)
		wait_event = resilience_wait_event_compat("ResilienceBulkhead");
	waiting_on = entry;
	PG_TRY();
	{
		for (;;)
		{
			int64		left_ms = (deadline - resilience_clock_ns() + 999999) / 1000000;
			bool		timed_out = true;
			bool		signaled;
			int			nsignal = 0;

			if (left_ms > 0)
			{
				timed_out = ConditionVariableTimedSleep(&b->cv, Min(left_ms, MAX_SLEEP_MS),
														wait_event);
				if (timed_out && resilience_clock_ns() < deadline)
					continue;	/* a long wait, sleeping in steps */
			}
			if (!timed_out)
			{
				/* signalled: a permit was handed to the waiters */
				bool		took;

				LWLockAcquire(lock, LW_SHARED);
				SpinLockAcquire(&entry->mutex);
				took = bulkhead_take_handoff(b);
				SpinLockRelease(&entry->mutex);
				LWLockRelease(lock);
				if (!took)
					continue;
				ConditionVariableCancelSleep();
				outcome = ENTER_ACQUIRED;
				break;
			}

			/* the deadline passed; a signal may have come at the same time */
			signaled = ConditionVariableCancelSleep_compat(&b->cv);
			LWLockAcquire(lock, LW_SHARED);
			SpinLockAcquire(&entry->mutex);
			if (signaled && bulkhead_take_handoff(b))
				outcome = ENTER_ACQUIRED;
			else
			{
				b->waiting--;
				b->timed_out++;
				nsignal = bulkhead_dispatch(b);
			}
			SpinLockRelease(&entry->mutex);
			signal_waiters(b, nsignal);
			LWLockRelease(lock);
			break;
		}
	}
	PG_CATCH();
	{
		bulkhead_abandon_wait();
		PG_RE_THROW();
	}
	PG_END_TRY();
	waiting_on = NULL;
	return outcome;
}

/*
 * Take a permit of bulkhead name, waiting at most wait_usec; returns
 * ENTER_ACQUIRED with *acquired set to its entry, or ENTER_REJECTED or
 * ENTER_TIMED_OUT.  53200 if the bulkhead is new and max_bulkheads are in
 * use.
 */
static EnterOutcome
permit_acquire(uint8 kind, const char *name, int len, int32 max_concurrent,
			   int64 wait_usec, int32 max_queue, ShmEntry **acquired)
{
	uint32		hash = shm_table_hash(kind, name, len);
	LWLock	   *lock = shm_table_lock(bulkhead_table, hash);
	int64		deadline = resilience_clock_ns() + wait_usec * 1000;
	ShmEntry   *entry;
	Bulkhead   *b;
	EnterOutcome outcome;
	int			nsignal;
	bool		found;

	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(bulkhead_table, hash, kind, name, len);
	if (entry == NULL)
	{
		LWLockRelease(lock);
		entry = shm_table_enter(bulkhead_table, hash, kind, name, len,
								false, NULL, &found);
		if (entry == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("bulkhead table is full"),
					 errdetail("All %d bulkheads (resilience.max_bulkheads) are in use; bulkhead \"%s\" cannot be created.",
							   resilience_max_bulkheads, name),
					 errhint("Raise resilience.max_bulkheads (server restart); idle bulkheads are removed by run_reaper().")));
		if (!found)
			ConditionVariableInit(&((Bulkhead *) shm_entry_payload(bulkhead_table, entry))->cv);
		/* the partition lock is held exclusively: good for what follows */
	}
	b = shm_entry_payload(bulkhead_table, entry);

	SpinLockAcquire(&entry->mutex);
	b->max_concurrent = max_concurrent;
	outcome = bulkhead_try_enter(b, wait_usec > 0, max_queue);
	nsignal = bulkhead_dispatch(b); /* max_concurrent may have grown */
	if (!entry->referenced)
		entry->referenced = true;
	SpinLockRelease(&entry->mutex);
	signal_waiters(b, nsignal);

	if (outcome == ENTER_MUST_WAIT)
	{
		/* be on the wait list before anyone can count us as waiting */
		ConditionVariablePrepareToSleep(&b->cv);
		SpinLockAcquire(&entry->mutex);
		outcome = bulkhead_try_enter(b, true, max_queue);
		if (outcome == ENTER_MUST_WAIT)
		{
			b->waiting++;
			outcome = ENTER_WAITING;
		}
		SpinLockRelease(&entry->mutex);
		if (outcome != ENTER_WAITING &&
			ConditionVariableCancelSleep_compat(&b->cv))
		{
			/* we consumed a signal meant for a waiter: pass it on */
			bool		pass;

			SpinLockAcquire(&entry->mutex);
			pass = b->handoffs > 0;
			SpinLockRelease(&entry->mutex);
			if (pass)
				ConditionVariableSignal(&b->cv);
		}
	}
	LWLockRelease(lock);

	if (outcome == ENTER_WAITING)
		outcome = bulkhead_wait(entry, deadline);
	*acquired = entry;
	return outcome;
}

/* bulkhead_acquire and bulkhead_acquire_session: check, take, remember. */
static Datum
acquire(FunctionCallInfo fcinfo, bool session, const char *fn)
{
	char		name[NAMEDATALEN];
	int			len;
	int32		max_concurrent;
	int64		wait_usec;
	int32		max_queue = -1;
	ShmEntry   *entry;
	EnterOutcome outcome;
	pg_atomic_uint64 *counted;

	resilience_require_preload(fn);
	len = resilience_arg_name(fcinfo, 0, "bulkhead name", name);
	max_concurrent = resilience_arg_positive(fcinfo, 1, "max_concurrent");
	wait_usec = resilience_arg_duration(fcinfo, 2, "max_wait", true);
	if (!PG_ARGISNULL(3))
	{
		max_queue = PG_GETARG_INT32(3);
		if (max_queue < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("max_queue must not be negative"),
					 errdetail("max_queue is %d.", max_queue),
					 errhint("Use NULL for no limit on waiting sessions, 0 to never wait.")));
	}

	bulkhead_prepare_backend();
	/* before the permit is taken: nothing may fail until it is remembered */
	counted = metrics_counter(RC_BULKHEAD_ACQUISITIONS, RV_ACQUIRED, name);
	outcome = permit_acquire(KIND_BULKHEAD, name, len, max_concurrent, wait_usec,
							 max_queue, &entry);
	if (outcome != ENTER_ACQUIRED)
	{
		metrics_add(RC_BULKHEAD_ACQUISITIONS,
					outcome == ENTER_REJECTED ? RV_REJECTED : RV_TIMED_OUT, name, 1);
		PG_RETURN_BOOL(false);
	}
	held[nheld].entry = entry;
	held[nheld].subid = session ? InvalidSubTransactionId : GetCurrentSubTransactionId();
	nheld++;
	metrics_inc(counted);
	PG_RETURN_BOOL(true);
}

/*
 * bulkhead_acquire(name, max_concurrent, max_wait, max_queue) → boolean: a
 * permit held until the end of the transaction.
 */
Datum
bulkhead_acquire(PG_FUNCTION_ARGS)
{
	return acquire(fcinfo, false, "bulkhead_acquire");
}

/* bulkhead_acquire_session(...) → boolean: a permit until released. */
Datum
bulkhead_acquire_session(PG_FUNCTION_ARGS)
{
	return acquire(fcinfo, true, "bulkhead_acquire_session");
}

/* Give back one session permit this backend holds; false if none. */
static bool
release_session_permit(uint8 kind, const char *name, int len)
{
	int			i;

	for (i = nheld - 1; i >= 0; i--)
	{
		ShmEntry   *entry = held[i].entry;

		/* the key of an entry we hold a permit of cannot change */
		if (held[i].subid == InvalidSubTransactionId && entry->kind == kind &&
			entry->keylen == len &&
			memcmp(shm_entry_key(bulkhead_table, entry), name, len) == 0)
		{
			permit_release(entry);
			held[i] = held[--nheld];
			return true;
		}
	}
	return false;
}

/*
 * A permit of a bulkhead of the relay's own (a route's max_in_flight,
 * sink_http.c), never waiting: true if taken.  Held like a session permit
 * until bulkhead_release_internal or exit.  Its entry is of a kind no SQL
 * function reaches, and the bulkheads view does not list it.  Needs
 * preloading.
 */
bool
bulkhead_try_acquire_internal(const char *name, int32 max_concurrent)
{
	ShmEntry   *entry;

	Assert(strlen(name) <= BULKHEAD_KEY_LEN);
	bulkhead_prepare_backend();
	if (permit_acquire(KIND_INTERNAL, name, strlen(name), max_concurrent, 0, -1,
					   &entry) != ENTER_ACQUIRED)
		return false;
	held[nheld].entry = entry;
	held[nheld].subid = InvalidSubTransactionId;
	nheld++;
	return true;
}

/* Give back a permit taken with bulkhead_try_acquire_internal. */
void
bulkhead_release_internal(const char *name)
{
	if (!release_session_permit(KIND_INTERNAL, name, strlen(name)))
		elog(WARNING, "resilience: no permit of internal bulkhead \"%s\" is held", name);
}

/*
 * bulkhead_release(name) → boolean: give back one session permit of the
 * bulkhead held by this session; false (with a warning) if it holds none.
 */
Datum
bulkhead_release(PG_FUNCTION_ARGS)
{
	char		name[NAMEDATALEN];
	int			len;

	resilience_require_preload("bulkhead_release");
	len = resilience_arg_name(fcinfo, 0, "bulkhead name", name);
	if (release_session_permit(KIND_BULKHEAD, name, len))
		PG_RETURN_BOOL(true);
	ereport(WARNING,
			(errmsg("this session holds no session permit of bulkhead \"%s\"", name),
			 errhint("Permits taken with bulkhead_acquire are given back when their transaction ends.")));
	PG_RETURN_BOOL(false);
}

/* ---- the view ---- */

typedef struct BulkheadCopy
{
	char		name[NAMEDATALEN];
	Bulkhead	b;
} BulkheadCopy;

/* shm_table_visit callback: copy a bulkhead for the view. */
static void
copy_bulkhead(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	List	  **list = (List **) arg;
	BulkheadCopy *copy;

	if (entry->kind != KIND_BULKHEAD)
		return;					/* the relay's: not a bulkhead of anybody's */
	copy = palloc(sizeof(BulkheadCopy));
	memcpy(copy->name, key, entry->keylen);
	copy->name[entry->keylen] = '\0';
	SpinLockAcquire(&entry->mutex);
	memcpy(&copy->b, payload, sizeof(Bulkhead));
	SpinLockRelease(&entry->mutex);
	*list = lappend(*list, copy);
}

/* bulkhead_entries() → the rows of the bulkheads view. */
Datum
bulkhead_entries(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	List	   *list = NIL;
	ListCell   *lc;

	resilience_require_preload("bulkheads");
	InitMaterializedSRF(fcinfo, 0);
	shm_table_visit(bulkhead_table, copy_bulkhead, &list);
	foreach(lc, list)
	{
		BulkheadCopy *c = lfirst(lc);
		Datum		values[7];
		bool		nulls[7] = {0};

		values[0] = CStringGetTextDatum(c->name);
		values[1] = Int32GetDatum(c->b.max_concurrent);
		values[2] = Int32GetDatum(c->b.in_use);
		values[3] = Int32GetDatum(c->b.waiting);
		values[4] = Int64GetDatum((int64) c->b.acquired);
		values[5] = Int64GetDatum((int64) c->b.rejected);
		values[6] = Int64GetDatum((int64) c->b.timed_out);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* Nobody holds or waits: dropping the bulkhead loses only counters. */
static bool
bulkhead_idle(ShmEntry *entry, void *payload, int64 now)
{
	Bulkhead   *b = (Bulkhead *) payload;

	return b->in_use == 0 && b->waiting == 0 && b->handoffs == 0;
}

/*
 * bulkhead_sweep() → bulkheads removed: idle ones not used since the
 * previous sweep.  Part of run_reaper(); 0 without preloading.
 */
Datum
bulkhead_sweep(PG_FUNCTION_ARGS)
{
	if (!resilience_preloaded || bulkhead_table == NULL)
		PG_RETURN_INT64(0);
	PG_RETURN_INT64(shm_table_sweep(bulkhead_table, bulkhead_idle));
}
