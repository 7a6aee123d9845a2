/*-------------------------------------------------------------------------
 *
 * compat.h
 *		The one place that knows about differences between PostgreSQL
 *		major versions.  Code elsewhere calls the _compat wrappers instead
 *		of testing PG_VERSION_NUM itself.  Each difference names the
 *		release that introduced it.
 *
 * Tested on every commit (make test): PostgreSQL 15 and 18.  The branches
 * for 16 and 17 are the ones 18 takes, but those releases are not built
 * here; the branches for 14 are untested.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_COMPAT_H
#define RESILIENCE_COMPAT_H

#include "postgres.h"

#if PG_VERSION_NUM < 140000
#error "resilience requires PostgreSQL 14 or later"
#endif

/* PostgreSQL 16 moved the varlena macros (VARDATA_ANY...) to varatt.h. */
#if PG_VERSION_NUM >= 160000
#include "varatt.h"
#endif

/*
 * PostgreSQL 15 added shmem_request_hook; before it, shared memory and
 * LWLock tranches are requested directly from _PG_init.
 */
#if PG_VERSION_NUM >= 150000
#define RESILIENCE_HAS_SHMEM_REQUEST_HOOK 1
#endif

/* MarkGUCPrefixReserved is the PostgreSQL 15 name of EmitWarningsOnPlaceholders. */
#if PG_VERSION_NUM < 150000
#define MarkGUCPrefixReserved(prefix) EmitWarningsOnPlaceholders(prefix)
#endif

/*
 * PostgreSQL 18 replaced pg_attribute_noreturn(), written after the
 * declarator, with pg_noreturn, written before it; both may go between
 * "static" and the return type.
 */
#if PG_VERSION_NUM >= 180000
#define pg_noreturn_compat pg_noreturn
#else
#define pg_noreturn_compat pg_attribute_noreturn()
#endif

/* PostgreSQL 17 registers custom wait events by name. */
#if PG_VERSION_NUM >= 170000
#include "utils/wait_event.h"
#define resilience_wait_event_compat(name) WaitEventExtensionNew(name)
#else
#define resilience_wait_event_compat(name) PG_WAIT_EXTENSION
#endif

/*
 * This backend's index among the PGPROCs, and how many backends there can be
 * (PostgreSQL 14 has not computed MaxBackends yet when _PG_init requests
 * shared memory).
 */
#if PG_VERSION_NUM >= 170000
#define MyProcNumber_compat MyProcNumber
#else
#define MyProcNumber_compat (MyProc->pgprocno)
#endif

#if PG_VERSION_NUM >= 150000
#define resilience_max_backends_compat() (MaxBackends)
#else
#define resilience_max_backends_compat() \
	(MaxConnections + autovacuum_max_workers + 1 + max_worker_processes + max_wal_senders)
#endif

/* PostgreSQL 17 added LockHeldByMe's orstronger argument. */
#if PG_VERSION_NUM >= 170000
#define LockHeldByMe_compat(tag, mode) LockHeldByMe(tag, mode, false)
#else
#define LockHeldByMe_compat(tag, mode) LockHeldByMe(tag, mode)
#endif

/*
 * A procedure's SPI_commit starts the next transaction itself from
 * PostgreSQL 15 on; before, SPI_start_transaction must follow it.
 */
#if PG_VERSION_NUM >= 150000
#define resilience_spi_commit_compat() SPI_commit()
#else
#define resilience_spi_commit_compat() (SPI_commit(), SPI_start_transaction())
#endif

/* A uniform random double in [0, 1): pg_prng arrived in PostgreSQL 15. */
#if PG_VERSION_NUM >= 150000
#include "common/pg_prng.h"
#define resilience_random_compat() pg_prng_double(&pg_global_prng_state)
#else
#define resilience_random_compat() ((double) random() / ((double) MAX_RANDOM_VALUE + 1))
#endif

/* PostgreSQL 16 replaced pg_proc_aclcheck with object_aclcheck. */
#if PG_VERSION_NUM >= 160000
#define pg_proc_aclcheck_compat(proc, role, mode) \
	object_aclcheck(ProcedureRelationId, (proc), (role), (mode))
#else
#define pg_proc_aclcheck_compat(proc, role, mode) pg_proc_aclcheck((proc), (role), (mode))
#endif

/* InitMaterializedSRF arrived in PostgreSQL 15; this is its 14 equivalent. */
#if PG_VERSION_NUM < 150000
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/tuplestore.h"

static inline void
InitMaterializedSRF(FunctionCallInfo fcinfo, bits32 flags)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext oldcontext;
	TupleDesc	tupdesc;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		!(rsinfo->allowedModes & SFRM_Materialize))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("set-valued function called in context that cannot accept a set")));
	oldcontext = MemoryContextSwitchTo(rsinfo->econtext->ecxt_per_query_memory);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = tuplestore_begin_heap(true, false, work_mem);
	rsinfo->setDesc = CreateTupleDescCopy(tupdesc);
	MemoryContextSwitchTo(oldcontext);
}
#endif

/*
 * Leave a condition variable's wait list, saying whether we had been taken
 * off it by a signal (that we must then act on or pass on).  PostgreSQL 16
 * made ConditionVariableCancelSleep return that; before, the same check is
 * made here, atomically with leaving, under the list's own spinlock.  Call
 * only after ConditionVariablePrepareToSleep(cv).
 */
#include "storage/condition_variable.h"

#if PG_VERSION_NUM >= 160000
static inline bool
ConditionVariableCancelSleep_compat(ConditionVariable *cv)
{
	return ConditionVariableCancelSleep();
}
#else
#include "storage/proc.h"
#include "storage/proclist.h"

static inline bool
ConditionVariableCancelSleep_compat(ConditionVariable *cv)
{
	bool		signaled = false;

	SpinLockAcquire(&cv->mutex);
	if (proclist_contains(&cv->wakeup, MyProc->pgprocno, cvWaitLink))
		proclist_delete(&cv->wakeup, MyProc->pgprocno, cvWaitLink);
	else
		signaled = true;
	SpinLockRelease(&cv->mutex);
	ConditionVariableCancelSleep(); /* forget the target: we are off the list */
	return signaled;
}
#endif

/*
 * Transaction control in a procedure.  From PostgreSQL 15, SPI_commit and
 * SPI_rollback start the next transaction themselves, and a failing
 * SPI_commit cleans up before it raises, so the error can be caught.
 */
#if PG_VERSION_NUM >= 150000
#define RESILIENCE_COMMIT_ERRORS_CATCHABLE true
#define SPI_commit_compat() SPI_commit()
#define SPI_rollback_compat() SPI_rollback()
#else
#define RESILIENCE_COMMIT_ERRORS_CATCHABLE false
#define SPI_commit_compat() (SPI_commit(), SPI_start_transaction())
#define SPI_rollback_compat() (SPI_rollback(), SPI_start_transaction())
#endif

/* PostgreSQL 15 gave GetFlushRecPtr an argument (the timeline, if wanted). */
#if PG_VERSION_NUM >= 150000
#define GetFlushRecPtr_compat() GetFlushRecPtr(NULL)
#else
#define GetFlushRecPtr_compat() GetFlushRecPtr()
#endif

/*
 * Does this primary wait for synchronous standbys, as the checkpointer last
 * published synchronous_standby_names (what commits go by)?  Later minor
 * releases of 14 to 17 (15.13 is one) replaced the flag with status bits:
 * until the checkpointer has published the setting, the backend's own value
 * counts, as in SyncRepWaitForLSN.  The caller holds SyncRepLock.
 */
#include "replication/syncrep.h"
#include "replication/walsender_private.h"

static inline bool
sync_standbys_defined_compat(void)
{
#ifdef SYNC_STANDBY_DEFINED
	if ((WalSndCtl->sync_standbys_status & SYNC_STANDBY_INIT) == 0)
		return SyncRepStandbyNames != NULL && SyncRepStandbyNames[0] != '\0';
	return (WalSndCtl->sync_standbys_status & SYNC_STANDBY_DEFINED) != 0;
#else
	return WalSndCtl->sync_standbys_defined;
#endif
}

/*
 * The physical file of a relation (quota.c notices a rewrite by it):
 * PostgreSQL 16 renamed rd_node.relNode to rd_locator.relNumber.
 */
#if PG_VERSION_NUM >= 160000
#define RelationGetRelFileNumber_compat(rel) ((rel)->rd_locator.relNumber)
#else
#define RelationGetRelFileNumber_compat(rel) ((rel)->rd_node.relNode)
#endif

/*
 * A new page at the end of a relation, pinned and locked exclusively
 * (quota.c).  PostgreSQL 16 added ExtendBufferedRel, which takes the
 * relation extension lock itself; before it, P_NEW under that lock.
 * Defined for files that include storage/bufmgr.h and storage/lmgr.h
 * before this header (the buffer manager's headers clash with some
 * client libraries' names).
 */
#if defined(BUFMGR_H) && defined(LMGR_H)
#if PG_VERSION_NUM >= 160000
static inline Buffer
ExtendRelationLocked_compat(Relation rel)
{
	return ExtendBufferedRel(BMR_REL(rel), MAIN_FORKNUM, NULL, EB_LOCK_FIRST);
}
#else
static inline Buffer
ExtendRelationLocked_compat(Relation rel)
{
	Buffer		buffer;

	LockRelationForExtension(rel, ExclusiveLock);
	buffer = ReadBuffer(rel, P_NEW);
	LockBuffer(buffer, BUFFER_LOCK_EXCLUSIVE);
	UnlockRelationForExtension(rel, ExclusiveLock);
	return buffer;
}
#endif
#endif							/* BUFMGR_H && LMGR_H */

/*
 * Direct row updates (locks.c).  PostgreSQL 16 made table_tuple_update
 * report which indexes need entries (TU_UpdateIndexes, with summarizing
 * indexes only for HOT updates) and gave ExecInsertIndexTuples an
 * onlySummarizing argument; PostgreSQL 18 gave index_beginscan an
 * instrumentation argument.
 */
#if PG_VERSION_NUM >= 160000
#define UpdateIndexes_compat TU_UpdateIndexes
#define update_indexes_none_compat(u) ((u) == TU_None)
#define ExecUpdateIndexTuples_compat(rri, slot, estate, u) \
	ExecInsertIndexTuples((rri), (slot), (estate), true, false, NULL, NIL, (u) == TU_Summarizing)
#else
#define UpdateIndexes_compat bool
#define update_indexes_none_compat(u) (!(u))
#define ExecUpdateIndexTuples_compat(rri, slot, estate, u) \
	ExecInsertIndexTuples((rri), (slot), (estate), true, false, NULL, NIL)
#endif
#if PG_VERSION_NUM >= 180000
#define index_beginscan_compat(heap, index, snapshot, nkeys, norderbys) \
	index_beginscan((heap), (index), (snapshot), NULL, (nkeys), (norderbys))
#else
#define index_beginscan_compat(heap, index, snapshot, nkeys, norderbys) \
	index_beginscan((heap), (index), (snapshot), (nkeys), (norderbys))
#endif

#endif							/* RESILIENCE_COMPAT_H */
