/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The launcher, one worker per database, and the job scheduler.
 *
 * The launcher is a static background worker started by the postmaster.  It
 * connects to no database (it reads only the shared catalog pg_database) and
 * keeps one dynamic worker running per database named in
 * resilience.database_names, at most resilience.max_workers of them.
 *
 * Launcher state machine, per shared slot:
 *
 *	  free --(name listed, database exists)--> launched
 *	  launched --(worker exits or crashes)--> free, restarted after naptime
 *	  launched --(name no longer listed)--> stop requested --> free
 *	  launched --(DROP/RENAME DATABASE in progress)--> dropping: the worker is
 *		  asked to leave and is not restarted until that transaction ends
 *
 * Each worker waits (latch, woken by SIGHUP, a stop request or its next job
 * being due) until CREATE EXTENSION resilience exists in its database, and
 * while the server is in recovery (a standby: nothing wakes a process at
 * promotion, so it looks every RECOVERY_CHECK_MS, a cheap shared-memory
 * read), then runs the jobs below on their own intervals.  No job runs in
 * recovery; the relay and the sagas refuse to run there even when called by
 * hand (relay.c, saga.c).  A job is a SQL call run in its own transaction;
 * it takes a conditional lock on the extension first, so DROP EXTENSION
 * never waits for more than one job and a job never fails because the
 * extension vanished.
 * A job marked says_when returns how many ms until it wants to run again: 0
 * means it did some work and may have more, and it is called again at once,
 * each call in a new transaction, for up to JOB_BURST_MS at a time (the
 * sagas job: a batch of sagas, each to its end or its first wait, per
 * transaction).  SQL jobs run a plan prepared once per process.
 * worker_wake(dboid) runs the jobs marked on_wake of that database's worker
 * at once (saga_start and publishing outbox transactions call it at
 * commit).  A job may also be a C
 * function, called with no transaction open, that runs transactions of its
 * own and says when (the outbox relay: it must not hold a transaction open
 * across network I/O); it locks the extension the same way
 * (worker_lock_extension).  A failing job is logged and recorded in the workers view;
 * the worker goes on.  Failures of the launcher are logged once per kind.
 *
 * Saga orchestrators: the sagas job runs in the database's worker and, with
 * resilience.saga_workers = n > 1, in n - 1 more processes per database
 * (saga helpers) that the worker starts, restarts after a crash and stops
 * with itself.  Ticks claim sagas FOR UPDATE SKIP LOCKED (saga.c), so the
 * orchestrators share the due sagas without ever running one step twice;
 * worker_wake wakes them all.  A helper runs nothing but the sagas job,
 * counts in the worker's sagas job status, and leaves when its worker's
 * slot is stopped, given away, or no longer wants it.
 *
 * The worker status in shared memory is guarded by one LWLock; it changes a
 * few times per job run, never on a hot path.
 *
 * Privileges: who the jobs run as, and what a database owner can affect
 * ---------------------------------------------------------------------
 * A worker connects as the bootstrap superuser: it must connect as some
 * role that always exists and may log in, and the role it should act as
 * (the extension's owner) is only known once connected, from the
 * database's own catalog.  Connecting applies the database's settings, and
 * the database's owner, who need not be a superuser, sets those (ALTER
 * DATABASE ... SET search_path = public, pg_catalog): any name the worker
 * resolved through that path could be an object the owner planted
 * (public.count(*) ran as a superuser within one reaper interval).  So:
 *
 *	1. search_path = pg_catalog, pg_temp is pinned for the whole connection
 *	   right after connecting (PGC_S_CLIENT, as a client's startup options:
 *	   above the database's and roles' settings; below a function's own SET
 *	   clause, which a saga step's function may need);
 *	2. every job runs as the extension's owner (resilience_become_owner,
 *	   privilege.c), in a security-restricted operation, with search_path
 *	   pinned again for the job; the relay switches the same way in each of
 *	   its transactions (relay.c);
 *	3. every name in the jobs' SQL, and in the SQL and PL/pgSQL functions
 *	   they call, is qualified (pg_catalog.count, OPERATOR(pg_catalog.=)),
 *	   and those functions carry SET search_path = pg_catalog, pg_temp;
 *	4. user code runs only in saga steps and schedule commands, as the
 *	   saga's definer or the schedule's creator, never a superuser (saga.c,
 *	   schedule.c), with its settings reverted when it returns.
 *
 * Why the extension's owner, not a role per database or the database's
 * owner: the jobs do nothing but read and write the extension's tables and
 * call its functions, all of which belong to that role, so it is the least
 * privilege that works without asking the administrator to create and
 * grant a role per database.  It is usually a superuser (the control file
 * says superuser = true), so what actually protects is 1-3, not the role:
 * no name the owner of the database controls is ever resolved, and the
 * restricted operation keeps anything that might run from leaving state in
 * the session (temporary objects, SET ROLE, LISTEN, cursors WITH HOLD).
 * The database's owner would be wrong: its objects would then run with its
 * own rights, harmless, but the jobs would need it to be granted every
 * table, and the worker's session would be one that role controls.
 *
 * A database owner may still change other settings of the worker's session
 * (statement_timeout, lock_timeout, default_transaction_read_only...):
 * enough to make jobs fail, which the workers view shows, never to run code.
 * DROP DATABASE and ALTER DATABASE ... RENAME ask the worker to leave only
 * when the server will go on with the command (the same checks it makes
 * first: ownership, CREATEDB, a free name, not a template, not in a
 * transaction block...), so a refused command never makes it reconnect.
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"
#include "metrics.h"
#include "outbox.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_subscription.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "replication/slot.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#define WORKER_TRANCHE "resilience_workers"
#define MAX_JOBS 4
#define ERROR_LEN 256
/* How long DROP DATABASE waits for the worker to leave. */
#define RELEASE_WAIT_MS 10000
/* How long a says_when job with more to do runs before the others' turn. */
#define JOB_BURST_MS 1000
/* How often a worker on a standby looks whether it has been promoted. */
#define RECOVERY_CHECK_MS 1000
/* Most saga helpers per database (resilience.saga_workers - 1). */
#define MAX_SAGA_HELPERS (RESILIENCE_MAX_SAGA_WORKERS - 1)

/*
 * A scheduled job: a SQL call and the GUC holding its interval (0 = off);
 * says_when: the SQL returns one bigint, the ms until the job wants to run
 * again (0: at once, -1: after its interval); on_wake: worker_wake runs it;
 * run: instead of sql, a C function called with no transaction open that
 * returns what a says_when job returns.
 */
typedef struct WorkerJob
{
	const char *name;
	const char *sql;
	int		   *interval_ms;
	bool		says_when;
	bool		on_wake;
	long		(*run) (void);
} WorkerJob;

static const WorkerJob jobs[] = {
	{"reaper", "SELECT pg_catalog.count(*) FROM resilience.run_reaper()", &resilience_reaper_interval_ms, false, false, NULL},
	{"sagas", "SELECT resilience._saga_worker_tick()", &resilience_saga_interval_ms, true, true, NULL},
	{"relay", NULL, &resilience_relay_interval_ms, true, true, relay_worker_job},
	{"schedules", NULL, &resilience_schedule_interval_ms, true, true, schedule_worker_job},
};

#define NUM_JOBS lengthof(jobs)
StaticAssertDecl(lengthof(jobs) <= MAX_JOBS, "too many worker jobs");

typedef enum WorkerState
{
	WORKER_STOPPED,
	WORKER_STARTING,
	WORKER_WAITING_EXTENSION,
	WORKER_IN_RECOVERY,
	WORKER_IDLE,
	WORKER_RUNNING
} WorkerState;

static const char *const worker_state_names[] = {
	"stopped", "starting", "waiting_for_extension", "in_recovery", "idle", "running"
};

typedef struct JobStatus
{
	int			interval_ms;	/* as the worker last read it */
	TimestampTz last_start;
	TimestampTz last_end;
	int64		runs;
	int64		failures;
	TimestampTz last_error_at;
	char		last_error[ERROR_LEN];
} JobStatus;

typedef struct WorkerSlot
{
	bool		in_use;			/* assigned to a database by the launcher */
	bool		stop_requested;
	pid_t		dropping_pid;	/* backend running DROP/RENAME DATABASE on
								 * it, or 0 */
	Oid			dboid;
	char		dbname[NAMEDATALEN];
	pid_t		pid;			/* 0 when no process runs */
	bool		wake_pending;	/* set by worker_wake, cleared by the worker */
	pid_t		helper_pids[MAX_SAGA_HELPERS];	/* saga helpers running, or 0 */
	bool		helper_wake[MAX_SAGA_HELPERS];	/* wake_pending, per helper */
	WorkerState state;
	TimestampTz started_at;
	JobStatus	jobs[MAX_JOBS];
} WorkerSlot;

typedef struct WorkerShared
{
	LWLock	   *lock;
	pid_t		launcher_pid;
	WorkerSlot	slots[FLEXIBLE_ARRAY_MEMBER];
} WorkerShared;

static WorkerShared *worker_shared = NULL;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

/*
 * Whether this backend marked slots as dropping (dropping_pid = MyProcPid).
 * A transaction can rename several databases, so the marks are found by pid
 * at transaction end rather than remembered one by one.
 */
static bool holds_dropping_slots = false;

PGDLLEXPORT void resilience_launcher_main(Datum main_arg);
PGDLLEXPORT void resilience_worker_main(Datum main_arg);
PGDLLEXPORT void resilience_saga_helper_main(Datum main_arg);

PG_FUNCTION_INFO_V1(worker_status);

/* ---- shared memory ---- */

Size
worker_shmem_size(void)
{
	return add_size(offsetof(WorkerShared, slots),
					mul_size(resilience_max_workers, sizeof(WorkerSlot)));
}

void
worker_shmem_request(void)
{
	RequestNamedLWLockTranche(WORKER_TRANCHE, 1);
}

void
worker_shmem_init(void)
{
	bool		found;

	worker_shared = ShmemInitStruct("resilience workers", worker_shmem_size(), &found);
	if (!found)
	{
		memset(worker_shared, 0, worker_shmem_size());
		worker_shared->lock = &(GetNamedLWLockTranche(WORKER_TRANCHE))->lock;
	}
}

/* Set the latch of a backend by pid, if it is still one of ours. */
static void
wake_pid(pid_t pid)
{
	PGPROC	   *proc;

	if (pid == 0)
		return;
	proc = BackendPidGetProc(pid);
	if (proc)
		SetLatch(&proc->procLatch);
}

/* Wake a slot's worker and its saga helpers (to look at stop_requested). */
static void
wake_slot(WorkerSlot *slot)
{
	int			h;

	wake_pid(slot->pid);
	for (h = 0; h < MAX_SAGA_HELPERS; h++)
		wake_pid(slot->helper_pids[h]);
}

/* Does a process of this slot (its worker or a saga helper) still run? */
static bool
slot_has_process(WorkerSlot *slot)
{
	int			h;

	if (slot->pid != 0)
		return true;
	for (h = 0; h < MAX_SAGA_HELPERS; h++)
		if (slot->helper_pids[h] != 0)
			return true;
	return false;
}

/*
 * Run the on_wake jobs (the sagas) of the worker of database dboid now.
 * Called at commit: cheap, takes no lock, and sets the latch only if the
 * worker has not been woken already.  The worker clears the flag before it
 * looks at the jobs, so a wake is never lost.
 */
void
worker_wake(Oid dboid)
{
	int			i;

	if (worker_shared == NULL)
		return;
	for (i = 0; i < resilience_max_workers; i++)
	{
		WorkerSlot *slot = &worker_shared->slots[i];

		if (slot->in_use && slot->dboid == dboid)
		{
			int			h;

			if (!slot->wake_pending)
			{
				slot->wake_pending = true;
				wake_pid(slot->pid);
			}
			for (h = 0; h < MAX_SAGA_HELPERS; h++)
				if (slot->helper_pids[h] != 0 && !slot->helper_wake[h])
				{
					slot->helper_wake[h] = true;
					wake_pid(slot->helper_pids[h]);
				}
			return;
		}
	}
}

/*
 * worker_wake(MyDatabaseId) when this transaction commits (sagas started or
 * signalled, schedules changed): nothing on abort or PREPARE.
 */
static bool wake_at_commit = false;

static void
wake_xact_callback(XactEvent event, void *arg)
{
	if ((event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT) && wake_at_commit)
		worker_wake(MyDatabaseId);
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		wake_at_commit = false;
}

void
worker_wake_at_commit(void)
{
	static bool registered = false;

	if (!registered)
	{
		RegisterXactCallback(wake_xact_callback, NULL);
		registered = true;
	}
	wake_at_commit = true;
}

/* ---- registration ---- */

void
worker_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "resilience");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "resilience_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "resilience launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "resilience launcher");
	RegisterBackgroundWorker(&worker);
}

/* ---- the launcher ---- */

typedef struct LauncherState
{
	int			nslots;
	BackgroundWorkerHandle *handles[FLEXIBLE_ARRAY_MEMBER];
} LauncherState;

/* Launcher problems, each logged once per name until it goes away. */
static const char *const MSG_BAD_LIST =
"resilience.database_names \"%s\" is not a valid list of names";
static const char *const MSG_NO_DATABASE =
"database \"%s\" listed in resilience.database_names does not exist";
static const char *const MSG_MAX_WORKERS =
"resilience.max_workers is reached: no worker for database \"%s\"";
static const char *const MSG_NO_BGW_SLOT =
"resilience could not start a worker for database \"%s\": no free background worker slot (raise max_worker_processes)";

static char *
once_key(const char *msg, const char *name)
{
	return psprintf("%p %s", msg, name);
}

/* Log a launcher problem the first time it happens for this name. */
static void
log_once(List **seen, const char *msg, const char *name)
{
	char	   *key = once_key(msg, name);
	MemoryContext oldcontext;
	ListCell   *lc;

	foreach(lc, *seen)
		if (strcmp((char *) lfirst(lc), key) == 0)
			return;
	/* the list outlives the launcher's per-loop memory context */
	oldcontext = MemoryContextSwitchTo(TopMemoryContext);
	*seen = lappend(*seen, pstrdup(key));
	MemoryContextSwitchTo(oldcontext);
	ereport(LOG, (errmsg_internal(msg, name)));
}

/* The problem went away: log it again if it comes back. */
static void
forget_once(List **seen, const char *msg, const char *name)
{
	char	   *key = once_key(msg, name);
	ListCell   *lc;

	foreach(lc, *seen)
		if (strcmp((char *) lfirst(lc), key) == 0)
		{
			pfree(lfirst(lc));
			*seen = foreach_delete_current(*seen, lc);
			return;
		}
}

/*
 * Register a dynamic background worker running function of this library,
 * type and name as pg_stat_activity shows them, started once the server is
 * consistent (after_recovery: once it accepts writes), never restarted by
 * the postmaster.  With handle, this process is told when it starts and
 * stops; the handle outlives the caller's memory context (the launcher's is
 * reset every time round), so it is allocated in TopMemoryContext, and the
 * caller frees it when the worker is seen gone.  False if no slot is free.
 * The worker (launch_worker), its saga helpers and the schedule executors
 * (schedule.c) all start this way.
 */
bool
worker_start_dynamic(const char *function, const char *type, const char *name,
					 bool after_recovery, Datum main_arg, const void *extra, Size extra_len,
					 BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;
	MemoryContext oldcontext;
	bool		ok;

	Assert(extra_len <= BGW_EXTRALEN);
	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = after_recovery ? BgWorkerStart_RecoveryFinished : BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "resilience");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(worker.bgw_name, BGW_MAXLEN, "%s", name);
	snprintf(worker.bgw_type, BGW_MAXLEN, "%s", type);
	worker.bgw_main_arg = main_arg;
	if (extra_len > 0)
		memcpy(worker.bgw_extra, extra, extra_len);
	if (handle)
		worker.bgw_notify_pid = MyProcPid;
	oldcontext = MemoryContextSwitchTo(TopMemoryContext);
	ok = RegisterDynamicBackgroundWorker(&worker, handle);
	MemoryContextSwitchTo(oldcontext);
	return ok;
}

/* Register the dynamic worker for a slot (its database's oid in bgw_extra). */
static bool
launch_worker(int slotno, Oid dboid, BackgroundWorkerHandle **handle)
{
	char		name[BGW_MAXLEN];

	snprintf(name, BGW_MAXLEN, "resilience worker %u", dboid);
	return worker_start_dynamic("resilience_worker_main", "resilience worker", name, false,
								Int32GetDatum(slotno), &dboid, sizeof(Oid), handle);
}

/*
 * The OID of a database, or InvalidOid.  A heap scan of pg_database (as the
 * autovacuum launcher does): with no database selected, the launcher cannot
 * open the catalog's indexes before the shared relcache init file exists.
 */
static Oid
database_oid(const char *name)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	Oid			dboid = InvalidOid;
	MemoryContext caller_context = CurrentMemoryContext;

	StartTransactionCommand();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);

		if (strcmp(NameStr(db->datname), name) == 0)
		{
			dboid = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller_context);
	return dboid;
}

/* One pass: bring the running workers in line with resilience.database_names. */
static void
launcher_reconcile(LauncherState *ls, TimestampTz *next_start, List **logged)
{
	char	   *names_copy = pstrdup(resilience_database_names);
	List	   *names = NIL;
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;
	int			i;

	if (!SplitGUCList(names_copy, ',', &names))
	{
		log_once(logged, MSG_BAD_LIST, resilience_database_names);
		names = NIL;
	}
	else
		forget_once(logged, MSG_BAD_LIST, resilience_database_names);

	/* notice workers that are gone; stop those no longer wanted */
	for (i = 0; i < resilience_max_workers; i++)
	{
		WorkerSlot *slot = &worker_shared->slots[i];
		bool		wanted = false;
		pid_t		pid;

		if (!slot->in_use || slot->dropping_pid != 0)
			continue;
		if (ls->handles[i] &&
			GetBackgroundWorkerPid(ls->handles[i], &pid) == BGWH_STOPPED)
		{
			pfree(ls->handles[i]);
			ls->handles[i] = NULL;
			next_start[i] = TimestampTzPlusMilliseconds(now, resilience_worker_naptime_ms);
			LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
			slot->pid = 0;
			slot->state = WORKER_STOPPED;
			LWLockRelease(worker_shared->lock);
		}
		foreach(lc, names)
			if (strcmp(slot->dbname, (char *) lfirst(lc)) == 0)
				wanted = true;
		if (!wanted || slot->stop_requested)
		{
			if (ls->handles[i] == NULL)
			{
				LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
				memset(slot, 0, sizeof(WorkerSlot));
				LWLockRelease(worker_shared->lock);
			}
			else if (!slot->stop_requested)
			{
				slot->stop_requested = true;
				wake_pid(slot->pid);
			}
		}
	}

	/* start what is missing */
	foreach(lc, names)
	{
		char	   *name = (char *) lfirst(lc);
		int			slotno = -1;
		int			free_slot = -1;
		Oid			dboid;

		for (i = 0; i < resilience_max_workers; i++)
		{
			if (worker_shared->slots[i].in_use &&
				strcmp(worker_shared->slots[i].dbname, name) == 0)
				slotno = i;
			else if (!worker_shared->slots[i].in_use && ls->handles[i] == NULL &&
					 free_slot < 0)
				free_slot = i;
		}
		if (slotno >= 0)
		{
			WorkerSlot *slot = &worker_shared->slots[slotno];

			if (ls->handles[slotno] || slot->dropping_pid != 0 || slot->stop_requested ||
				now < next_start[slotno])
				continue;
		}
		else if (free_slot < 0)
		{
			log_once(logged, MSG_MAX_WORKERS, name);
			continue;
		}

		dboid = database_oid(name);
		if (!OidIsValid(dboid))
		{
			log_once(logged, MSG_NO_DATABASE, name);
			if (slotno >= 0)
			{
				LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
				memset(&worker_shared->slots[slotno], 0, sizeof(WorkerSlot));
				LWLockRelease(worker_shared->lock);
			}
			continue;
		}
		forget_once(logged, MSG_NO_DATABASE, name);
		forget_once(logged, MSG_MAX_WORKERS, name);

		if (slotno < 0)
		{
			slotno = free_slot;
			LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
			memset(&worker_shared->slots[slotno], 0, sizeof(WorkerSlot));
			worker_shared->slots[slotno].in_use = true;
			strlcpy(worker_shared->slots[slotno].dbname, name, NAMEDATALEN);
			LWLockRelease(worker_shared->lock);
		}
		worker_shared->slots[slotno].dboid = dboid;
		if (!launch_worker(slotno, dboid, &ls->handles[slotno]))
		{
			ls->handles[slotno] = NULL;
			next_start[slotno] = TimestampTzPlusMilliseconds(now, resilience_worker_naptime_ms);
			log_once(logged, MSG_NO_BGW_SLOT, name);
		}
		else
			forget_once(logged, MSG_NO_BGW_SLOT, name);
	}
	list_free(names);
	pfree(names_copy);
}

/*
 * A new launcher has no handles for workers a previous launcher started (it
 * exits only when terminated; after a crash shared memory starts empty):
 * ask them to stop, wait for them, and start from empty slots.
 */
static void
launcher_adopt_slots(void)
{
	int			waited;
	int			i;
	bool		alive = true;

	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	worker_shared->launcher_pid = MyProcPid;
	for (i = 0; i < resilience_max_workers; i++)
		if (slot_has_process(&worker_shared->slots[i]))
		{
			worker_shared->slots[i].stop_requested = true;
			wake_slot(&worker_shared->slots[i]);
		}
	LWLockRelease(worker_shared->lock);

	for (waited = 0; alive && waited < RELEASE_WAIT_MS && !ShutdownRequestPending; waited += 10)
	{
		alive = false;
		for (i = 0; i < resilience_max_workers; i++)
			if (slot_has_process(&worker_shared->slots[i]))
				alive = true;
		if (alive)
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 10, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
	}
	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	memset(worker_shared->slots, 0, resilience_max_workers * sizeof(WorkerSlot));
	LWLockRelease(worker_shared->lock);
}

void
resilience_launcher_main(Datum main_arg)
{
	LauncherState *ls;
	TimestampTz *next_start;
	List	   *logged = NIL;
	MemoryContext loop_context;
	uint32		wait_event = resilience_wait_event_compat("ResilienceLauncherMain");

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	ls = MemoryContextAllocZero(TopMemoryContext,
								offsetof(LauncherState, handles) +
								resilience_max_workers * sizeof(BackgroundWorkerHandle *));
	ls->nslots = resilience_max_workers;
	next_start = MemoryContextAllocZero(TopMemoryContext,
										resilience_max_workers * sizeof(TimestampTz));

	launcher_adopt_slots();
	loop_context = AllocSetContextCreate(TopMemoryContext, "resilience launcher",
										 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		/* exit 1: the postmaster restarts us unless it is shutting down */
		if (ShutdownRequestPending)
			proc_exit(1);
		MemoryContextReset(loop_context);
		MemoryContextSwitchTo(loop_context);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		launcher_reconcile(ls, next_start, &logged);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 resilience_worker_naptime_ms, wait_event);
		ResetLatch(MyLatch);
	}
}

/* ---- a worker ---- */

static WorkerSlot *my_slot = NULL;
static int	my_helper = -1;		/* a saga helper: its number, else -1 */

static void
set_state(WorkerState state)
{
	if (my_slot->state == state)
		return;
	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	my_slot->state = state;
	LWLockRelease(worker_shared->lock);
}

static void
worker_detach(int code, Datum arg)
{
	LWLockReleaseAll();
	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	if (my_slot->pid == MyProcPid)	/* not if a new launcher gave it away */
	{
		my_slot->pid = 0;
		my_slot->state = WORKER_STOPPED;
	}
	LWLockRelease(worker_shared->lock);
	wake_slot(my_slot);			/* its saga helpers leave with it */
	wake_pid(worker_shared->launcher_pid);
}

/* Does the extension exist in this database?  (Own short transaction.) */
static bool
extension_exists(void)
{
	bool		exists;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	exists = OidIsValid(get_extension_oid("resilience", true));
	CommitTransactionCommand();
	return exists;
}

/*
 * In a transaction: lock the extension against DROP EXTENSION, without
 * waiting; false if it is being dropped or is gone.  Looks again after
 * locking in case the drop committed in between.
 */
bool
worker_lock_extension(void)
{
	Oid			extoid = get_extension_oid("resilience", true);

	return OidIsValid(extoid) &&
		ConditionalLockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock) &&
		get_extension_oid("resilience", true) == extoid;
}

/* Should a job that runs for long give up now (stop or shutdown requested)? */
bool
worker_stop_requested(void)
{
	return ShutdownRequestPending || (my_slot != NULL && my_slot->stop_requested);
}

/* The SQL jobs' statements, prepared once per process (kept across transactions). */
static SPIPlanPtr job_plans[MAX_JOBS];

/* A SQL job in its own transaction: false if skipped; *wish as run_job's. */
static bool
run_sql_job(int jobno, long *wish)
{
	const WorkerJob *job = &jobs[jobno];
	bool		ran = false;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, job->sql);

	/* DROP EXTENSION holds an exclusive lock: skip the job, not wait */
	if (worker_lock_extension())
	{
		ResilienceUser save;
		int			ret;

		/* as the extension's owner, restricted, search_path pinned */
		resilience_become_owner(true, &save);
		if (job_plans[jobno] == NULL)
		{
			SPIPlanPtr	plan = SPI_prepare(job->sql, 0, NULL);

			if (plan == NULL)
				elog(ERROR, "%s failed: %s", job->sql, SPI_result_code_string(SPI_result));
			SPI_keepplan(plan);
			job_plans[jobno] = plan;
		}
		ret = SPI_execute_plan(job_plans[jobno], NULL, NULL, false, 0);
		if (ret < 0)
			elog(ERROR, "%s failed: %s", job->sql, SPI_result_code_string(ret));
		if (job->says_when && SPI_processed == 1)
		{
			bool		isnull;
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull)
				*wish = (long) Min(DatumGetInt64(d), (int64) INT_MAX);
		}
		resilience_restore_user(&save);
		ran = true;
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	return ran;
}

/*
 * Run one job (a SQL job in its own transaction, a C job as it likes);
 * errors are caught and recorded.  Returns what a says_when job wants (ms
 * until its next run), else -1.
 */
static long
run_job(int jobno, MemoryContext job_context)
{
	const WorkerJob *job = &jobs[jobno];
	JobStatus  *status = &my_slot->jobs[jobno];
	TimestampTz start = GetCurrentTimestamp();
	ErrorData  *edata = NULL;
	bool		ran = false;
	long		wish = -1;

	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	if (my_helper < 0)
		my_slot->state = WORKER_RUNNING;
	status->last_start = start;
	LWLockRelease(worker_shared->lock);

	PG_TRY();
	{
		if (job->run)
		{
			wish = job->run();
			ran = true;
		}
		else
			ran = run_sql_job(jobno, &wish);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(job_context);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	/* at most once a second within a burst; run_job_burst flushes at its end */
	pgstat_report_stat(false);

	if (edata)
		ereport(LOG,
				(errmsg("resilience job \"%s\" failed in database \"%s\": %s",
						job->name, my_slot->dbname, edata->message)));

	if (ran || edata)
	{
		metrics_add(RC_WORKER_JOB_RUNS, edata ? RV_FAILURE : RV_SUCCESS, job->name, 1);
		metrics_add(RC_WORKER_JOB_SECONDS, 0, job->name,
					(uint64) Max(GetCurrentTimestamp() - start, 0));
	}

	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	if (my_helper < 0)
		my_slot->state = WORKER_IDLE;
	status->last_end = GetCurrentTimestamp();
	if (ran)
		status->runs++;
	if (edata)
	{
		status->failures++;
		status->last_error_at = status->last_end;
		strlcpy(status->last_error, edata->message, ERROR_LEN);
	}
	LWLockRelease(worker_shared->lock);
	return wish;
}

/*
 * Run a job; a says_when job that has more to do (wishes 0) runs again at
 * once, each run in a transaction of its own, for up to JOB_BURST_MS.
 */
static long
run_job_burst(int jobno, MemoryContext job_context)
{
	TimestampTz burst_end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), JOB_BURST_MS);
	long		wish;

	for (;;)
	{
		wish = run_job(jobno, job_context);
		MemoryContextReset(job_context);
		CHECK_FOR_INTERRUPTS();
		if (wish != 0 || GetCurrentTimestamp() >= burst_end || ConfigReloadPending ||
			my_slot->stop_requested || ShutdownRequestPending)
			break;
	}
	pgstat_report_stat(true);
	return wish;
}

/* ---- saga helpers: more orchestrators for a database ---- */

/* Handles of this worker's saga helpers, and when to start each again. */
static BackgroundWorkerHandle *helper_handles[MAX_SAGA_HELPERS];
static TimestampTz helper_next_start[MAX_SAGA_HELPERS];

/* Should saga helper h of this database run now? */
static bool
helper_wanted(int h)
{
	return h < resilience_saga_workers - 1 && resilience_saga_interval_ms > 0;
}

/*
 * In the worker: start the saga helpers resilience.saga_workers asks for,
 * again after one exits (not sooner than the naptime).  Helpers no longer
 * wanted leave by themselves.
 */
static void
saga_helpers_reconcile(void)
{
	TimestampTz now = GetCurrentTimestamp();
	int			h;

	for (h = 0; h < MAX_SAGA_HELPERS; h++)
	{
		pid_t		pid;
		int			args[2] = {h, MyProcPid};
		char		extra[sizeof(Oid) + sizeof(args)];
		char		name[BGW_MAXLEN];

		if (helper_handles[h] &&
			GetBackgroundWorkerPid(helper_handles[h], &pid) == BGWH_STOPPED)
		{
			pfree(helper_handles[h]);
			helper_handles[h] = NULL;
			helper_next_start[h] = TimestampTzPlusMilliseconds(now, resilience_worker_naptime_ms);
		}
		if (helper_handles[h] || !helper_wanted(h) || now < helper_next_start[h])
			continue;

		memcpy(extra, &my_slot->dboid, sizeof(Oid));
		memcpy(extra + sizeof(Oid), args, sizeof(args));
		snprintf(name, BGW_MAXLEN, "resilience saga helper %u/%d", my_slot->dboid, h + 1);
		if (!worker_start_dynamic("resilience_saga_helper_main", "resilience saga helper", name, false,
								  Int32GetDatum(my_slot - worker_shared->slots), extra, sizeof(extra),
								  &helper_handles[h]))
		{
			helper_handles[h] = NULL;
			helper_next_start[h] = TimestampTzPlusMilliseconds(now, resilience_worker_naptime_ms);
			ereport(LOG,
					(errmsg("resilience could not start saga helper %d for database \"%s\": no free background worker slot",
							h + 1, my_slot->dbname),
					 errhint("Raise max_worker_processes, or lower resilience.saga_workers.")));
		}
	}
}

static void
helper_detach(int code, Datum arg)
{
	LWLockReleaseAll();
	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	if (my_slot->helper_pids[my_helper] == MyProcPid)
		my_slot->helper_pids[my_helper] = 0;
	LWLockRelease(worker_shared->lock);
	wake_pid(my_slot->pid);
}

/*
 * A saga helper: the sagas job of its worker's database, woken like the
 * worker by worker_wake and by its own next due saga, until its worker's
 * slot stops, changes hands, or no longer wants it.
 */
void
resilience_saga_helper_main(Datum main_arg)
{
	uint32		wait_event = resilience_wait_event_compat("ResilienceSagaHelperMain");
	MemoryContext job_context;
	TimestampTz next_due = 0;
	Oid			dboid;
	int			args[2];
	pid_t		parent;
	int			sagas_job = 0;

	while (strcmp(jobs[sagas_job].name, "sagas") != 0)	/* the job helpers run */
		sagas_job++;

	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	memcpy(args, MyBgworkerEntry->bgw_extra + sizeof(Oid), sizeof(args));
	my_helper = args[0];
	parent = (pid_t) args[1];
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	/* as the worker does, for the same reasons (see resilience_worker_main) */
	SetConfigOption("search_path", RESILIENCE_SEARCH_PATH, PGC_SUSET, PGC_S_CLIENT);

	my_slot = &worker_shared->slots[DatumGetInt32(main_arg)];
	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	if (my_slot->pid != parent || my_slot->dboid != dboid || my_slot->stop_requested)
	{
		LWLockRelease(worker_shared->lock);
		proc_exit(0);
	}
	my_slot->helper_pids[my_helper] = MyProcPid;
	LWLockRelease(worker_shared->lock);
	before_shmem_exit(helper_detach, (Datum) 0);

	job_context = AllocSetContextCreate(TopMemoryContext, "resilience saga helper",
										ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		long		timeout = resilience_worker_naptime_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (my_slot->stop_requested || ShutdownRequestPending || my_slot->pid != parent ||
			!helper_wanted(my_helper))
			proc_exit(0);
		if (RecoveryInProgress())
			timeout = Min(timeout, RECOVERY_CHECK_MS);
		else if (extension_exists())
		{
			bool		woken = my_slot->helper_wake[my_helper];

			if (woken)
			{
				my_slot->helper_wake[my_helper] = false;
				pg_memory_barrier();
			}
			if (woken || GetCurrentTimestamp() >= next_due)
			{
				long		wish = run_job_burst(sagas_job, job_context);

				next_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   wish >= 0 ? wish : resilience_saga_interval_ms);
			}
			timeout = Min(timeout, Max((next_due - GetCurrentTimestamp()) / 1000, 0));
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, wait_event);
		ResetLatch(MyLatch);
	}
}

void
resilience_worker_main(Datum main_arg)
{
	int			slotno = DatumGetInt32(main_arg);
	Oid			dboid;
	bool		logged_recovery = false;
	uint32		wait_event = resilience_wait_event_compat("ResilienceWorkerMain");
	MemoryContext job_context;
	TimestampTz next_due[MAX_JOBS] = {0};

	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);

	/*
	 * The database's settings (ALTER DATABASE ... SET, which its owner may
	 * run) were applied while connecting.  Pin search_path for the whole
	 * connection as a client's startup options would (PGC_S_CLIENT: above
	 * the database's and roles' settings, and it is also what RESET gives),
	 * yet below a function's own SET clause, which a saga step's function
	 * may rely on.  Nothing else can change it: the worker runs only its own
	 * jobs, and the settings a step changes are reverted when it returns.
	 */
	SetConfigOption("search_path", RESILIENCE_SEARCH_PATH, PGC_SUSET, PGC_S_CLIENT);

	my_slot = &worker_shared->slots[slotno];
	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	my_slot->pid = MyProcPid;
	my_slot->state = WORKER_STARTING;
	my_slot->started_at = GetCurrentTimestamp();
	LWLockRelease(worker_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	job_context = AllocSetContextCreate(TopMemoryContext, "resilience worker jobs",
										ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		long		timeout = resilience_worker_naptime_ms;
		TimestampTz now;
		int			i;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		/* asked to stop, or our slot was taken back by a new launcher */
		if (my_slot->stop_requested || ShutdownRequestPending ||
			my_slot->pid != MyProcPid)
			proc_exit(0);
		MemoryContextReset(job_context);
		for (i = 0; i < NUM_JOBS; i++)	/* for the view */
			my_slot->jobs[i].interval_ms = *jobs[i].interval_ms;

		if (logged_recovery && !RecoveryInProgress())
		{
			ereport(LOG,
					(errmsg("resilience worker for database \"%s\": recovery has ended",
							my_slot->dbname)));
			logged_recovery = false;
		}
		if (RecoveryInProgress())
		{
			if (!logged_recovery)
				ereport(LOG,
						(errmsg("resilience worker for database \"%s\" is waiting for recovery to end",
								my_slot->dbname)));
			logged_recovery = true;
			set_state(WORKER_IN_RECOVERY);
			/* nothing signals the end of recovery: look again soon */
			timeout = Min(timeout, RECOVERY_CHECK_MS);
		}
		else if (!extension_exists())
			set_state(WORKER_WAITING_EXTENSION);
		else
		{
			/* clear first: a wake after this is seen next time round */
			bool		woken = my_slot->wake_pending;

			if (woken)
			{
				my_slot->wake_pending = false;
				pg_memory_barrier();
			}
			set_state(WORKER_IDLE);
			for (i = 0; i < NUM_JOBS; i++)
			{
				int			interval = *jobs[i].interval_ms;
				TimestampTz due;

				if (interval <= 0)
					continue;
				due = TimestampTzPlusMilliseconds(my_slot->jobs[i].last_start, interval);
				if (jobs[i].says_when)
					due = Min(due, next_due[i]);
				if (woken && jobs[i].on_wake)
					due = 0;
				if (GetCurrentTimestamp() >= due)
				{
					long		wish = run_job_burst(i, job_context);

					due = TimestampTzPlusMilliseconds(my_slot->jobs[i].last_start, interval);
					if (wish >= 0)
						due = Min(due, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wish));
					next_due[i] = due;
				}
				now = GetCurrentTimestamp();
				timeout = Min(timeout, Max((due - now) / 1000, 0));
				if (my_slot->stop_requested || ShutdownRequestPending)
					proc_exit(0);
			}
			saga_helpers_reconcile();
		}

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, wait_event);
		ResetLatch(MyLatch);
	}
}

/* ---- DROP / RENAME DATABASE must not wait for our worker ---- */

static void
release_at_xact_end(XactEvent event, void *arg)
{
	int			i;

	if (!holds_dropping_slots || worker_shared == NULL)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT)
	{
		/*
		 * Plain stores: only this backend sets or clears its marks, and the
		 * launcher only reads them (it never reuses a marked slot).
		 */
		for (i = 0; i < resilience_max_workers; i++)
			if (worker_shared->slots[i].dropping_pid == MyProcPid)
				worker_shared->slots[i].dropping_pid = 0;
		holds_dropping_slots = false;
		wake_pid(worker_shared->launcher_pid);
	}
}

/* Does this user have the CREATEDB privilege (as dbcommands.c sees it)? */
static bool
may_create_databases(void)
{
	HeapTuple	tuple;
	bool		result = false;

	if (superuser())
		return true;
	tuple = SearchSysCache1(AUTHOID, ObjectIdGetDatum(GetUserId()));
	if (HeapTupleIsValid(tuple))
	{
		result = ((Form_pg_authid) GETSTRUCT(tuple))->rolcreatedb;
		ReleaseSysCache(tuple);
	}
	return result;
}

/*
 * Will PostgreSQL go on to wait for the other sessions of database dbname to
 * leave, for DROP DATABASE (newname NULL) or ALTER DATABASE ... RENAME TO
 * newname?  Only then is our worker asked to leave: a command the server
 * refuses must not stop or restart it (a database owner could otherwise
 * make it reconnect at will).  These are the checks dropdb() and
 * RenameDatabase() make before that wait, whatever their order: the
 * database exists and is not ours, the user has the privileges of its
 * owner; to rename, the CREATEDB privilege and a free new name; to drop,
 * not a template, no active logical replication slot, no subscription.
 * (DROP DATABASE outside a transaction block is checked by the caller.)
 */
static bool
database_command_proceeds(const char *dbname, const char *newname)
{
	Oid			dboid = get_database_oid(dbname, true);
	HeapTuple	tuple;
	Form_pg_database db;
	bool		proceeds;

	if (!OidIsValid(dboid) || dboid == MyDatabaseId)
		return false;
	tuple = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(dboid));
	if (!HeapTupleIsValid(tuple))
		return false;
	db = (Form_pg_database) GETSTRUCT(tuple);
	proceeds = has_privs_of_role(GetUserId(), db->datdba);
	if (newname != NULL)
		proceeds = proceeds && may_create_databases() &&
			!OidIsValid(get_database_oid(newname, true));
	else
	{
		int			nslots;
		int			nslots_active;

		proceeds = proceeds && !db->datistemplate &&
			!(ReplicationSlotsCountDBSlots(dboid, &nslots, &nslots_active) && nslots_active > 0) &&
			CountDBSubscriptions(dboid) == 0;
	}
	ReleaseSysCache(tuple);
	return proceeds;
}

/*
 * Ask the worker connected to `dbname` to leave and wait (bounded) until it
 * has; the launcher does not restart it before this transaction ends.
 */
static void
release_database(const char *dbname, const char *newname)
{
	static bool callback_registered = false;
	int			slotno = -1;
	int			waited;
	int			i;

	if (!database_command_proceeds(dbname, newname))
		return;

	/* before marking anything, so that the mark is always cleared */
	if (!callback_registered)
	{
		RegisterXactCallback(release_at_xact_end, NULL);
		callback_registered = true;
	}
	holds_dropping_slots = true;

	LWLockAcquire(worker_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < resilience_max_workers; i++)
	{
		WorkerSlot *slot = &worker_shared->slots[i];

		if (slot->in_use && strcmp(slot->dbname, dbname) == 0)
		{
			slot->dropping_pid = MyProcPid;
			slot->stop_requested = true;
			slotno = i;
			break;
		}
	}
	LWLockRelease(worker_shared->lock);
	if (slotno < 0)
		return;

	wake_slot(&worker_shared->slots[slotno]);
	for (waited = 0; waited < RELEASE_WAIT_MS && slot_has_process(&worker_shared->slots[slotno]);
		 waited += 10)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

static void
resilience_ProcessUtility(PlannedStmt *pstmt, const char *queryString,
						  bool readOnlyTree, ProcessUtilityContext context,
						  ParamListInfo params, QueryEnvironment *queryEnv,
						  DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (worker_shared != NULL)
	{
		if (IsA(parsetree, DropdbStmt))
		{
			/* the server's own first check (standard_ProcessUtility), made early */
			PreventInTransactionBlock(context == PROCESS_UTILITY_TOPLEVEL, "DROP DATABASE");
			release_database(((DropdbStmt *) parsetree)->dbname, NULL);
		}
		else if (IsA(parsetree, RenameStmt) &&
				 ((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
			release_database(((RenameStmt *) parsetree)->subname,
							 ((RenameStmt *) parsetree)->newname);
	}

	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
							queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);
}

void
worker_utility_hook_init(void)
{
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = resilience_ProcessUtility;
}

/* ---- the workers view ---- */

/*
 * worker_status() → one row per worker and job: database, pid, state, start
 * time, job, interval, last run, its duration, runs, failures, last error.
 * Empty without preloading (no worker runs then).
 */
Datum
worker_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	WorkerSlot *copy;
	int			nslots = resilience_max_workers;
	int			i;
	int			j;

	InitMaterializedSRF(fcinfo, 0);
	if (!resilience_preloaded || worker_shared == NULL)
		return (Datum) 0;

	copy = palloc(nslots * sizeof(WorkerSlot));
	LWLockAcquire(worker_shared->lock, LW_SHARED);
	memcpy(copy, worker_shared->slots, nslots * sizeof(WorkerSlot));
	LWLockRelease(worker_shared->lock);

	for (i = 0; i < nslots; i++)
	{
		WorkerSlot *slot = &copy[i];

		if (!slot->in_use)
			continue;
		for (j = 0; j < NUM_JOBS; j++)
		{
			JobStatus  *js = &slot->jobs[j];
			Datum		values[12];
			bool		nulls[12] = {0};

			values[0] = CStringGetTextDatum(slot->dbname);
			values[1] = Int32GetDatum(slot->pid);
			nulls[1] = slot->pid == 0;
			values[2] = CStringGetTextDatum(worker_state_names[slot->state]);
			values[3] = TimestampTzGetDatum(slot->started_at);
			nulls[3] = slot->started_at == 0;
			values[4] = CStringGetTextDatum(jobs[j].name);
			values[5] = DirectFunctionCall7(make_interval,
											Int32GetDatum(0), Int32GetDatum(0),
											Int32GetDatum(0), Int32GetDatum(0),
											Int32GetDatum(0), Int32GetDatum(0),
											Float8GetDatum(js->interval_ms / 1000.0));
			values[6] = TimestampTzGetDatum(js->last_start);
			nulls[6] = js->last_start == 0;
			values[7] = Float8GetDatum((js->last_end - js->last_start) / 1000.0);
			nulls[7] = js->last_start == 0 || js->last_end < js->last_start;
			values[8] = Int64GetDatum(js->runs);
			values[9] = Int64GetDatum(js->failures);
			values[10] = CStringGetTextDatum(js->last_error);
			nulls[10] = js->last_error[0] == '\0';
			values[11] = TimestampTzGetDatum(js->last_error_at);
			nulls[11] = js->last_error_at == 0;
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}
