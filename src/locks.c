/*-------------------------------------------------------------------------
 *
 * locks.c
 *		Lease locks with fencing tokens, fences, and advisory-lock helpers
 *		on text names.
 *
 * Leases are rows of resilience.leases, so they survive across transactions,
 * connections, restarts and failover, and work through transaction-pooling
 * proxies.  A lease is taken by an update of an expired (or released) row or
 * an INSERT ... ON CONFLICT DO NOTHING of a new one: a failed attempt locks
 * nothing, so it never blocks the holder's renew or release.  Updates of an
 * existing row go through the table API ("Leases without SQL" below), the
 * rest through SPI.
 *
 * Tokens come from one sequence, resilience.fencing_tokens, so they strictly
 * increase for every name forever: a sequence is not transactional (a
 * rollback never gives a value back) and WAL-logs ahead of what it hands out.
 * Before a token leaves this file, the WAL record covering it is flushed and,
 * when synchronous_standby_names is set, flushed by the synchronous standbys
 * too, whatever the session's synchronous_commit (a wait cut short by a
 * cancel raises an error instead): a token can therefore never be issued
 * twice, not after a crash, an immediate shutdown, or the promotion of a
 * synchronous standby.  See docs/locks.md and, for the argument, "High
 * availability" in docs/operations.md.
 *
 * Waiting for a lease sleeps on one of LOCK_WAIT_CVS condition variables
 * (chosen by the name's hash) until the holder's expiry or the end of the
 * wait, and is woken when a release or renewal of that name commits.  Without
 * shared_preload_libraries there are no condition variables and a waiter
 * re-checks every LOCK_POLL_MS instead.
 *
 * Advisory helpers map a name to a 64-bit key with hash_bytes_extended and
 * take a PostgreSQL advisory lock in a key space of our own (locktag field 4
 * = ADVISORY_SPACE; PostgreSQL uses 1 and 2 for its bigint and int4-pair
 * forms), so they never collide with the application's own advisory locks.
 * When preloaded, a shared dictionary remembers which name a key came from
 * for the resilience.locks view.
 *
 * Owners (src/tenants.c): a lease name belongs to the role in its row's
 * owner_role; the lease functions are SECURITY INVOKER so that they see the
 * caller, switch to the table's owner themselves, and pass the role they act
 * as ($5) to every statement, which matches only that role's rows.  A miss
 * re-reads the row: another role's lease is 42501 unless the caller has that
 * role's privileges (or resilience_admin's), and then the statement runs
 * again as that role.  fence refuses tokens never issued (22023).
 *
 * search_path: the owner switch of the lease functions does not pin it
 * (privilege.c), as on idempotency.c's hot path: every statement here
 * qualifies every name, operator and the sequence, and runs no user code,
 * and pinning (a GUC set and restore, and the namespace path recomputed
 * after it) cost about a third of the time spent outside the statements
 * themselves (docs/benchmarks.md, "Where the time goes").
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"
#include "metrics.h"
#include "tenants.h"

#include "access/genam.h"
#include "access/relation.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "commands/sequence.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "replication/walsender_private.h"
#include "storage/bufmgr.h"
#include "storage/condition_variable.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "utils/fmgroids.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define LOCK_NAME_MAX 255
/* SQLSTATEs of our own (class RS): RS001 here, RS002 in breaker.h. */
#define ERRCODE_STALE_FENCING_TOKEN MAKE_SQLSTATE('R', 'S', '0', '0', '1')
#define LOCK_WAIT_CVS 256
#define LOCK_POLL_MS 10
#define ADVISORY_SPACE 3
#define ADVISORY_SEED UINT64CONST(0x7265736c6c6f636b) /* "reslleock" */
#define MAX_TTL_USECS (INT64CONST(7) * USECS_PER_DAY)
#define MAX_WAIT_USECS USECS_PER_DAY
#define NAMES_TRANCHE "resilience_lock_names"
#define NAMES_PARTITIONS 16

/* Shared state: wait queues, who waits for what, and advisory names. */
typedef struct LockWaitSlot
{
	pg_atomic_uint32 waiting;	/* 1 while the backend waits for `name` */
	int			pid;
	char		name[LOCK_NAME_MAX + 1];
} LockWaitSlot;

typedef struct LocksShared
{
	ConditionVariable cvs[LOCK_WAIT_CVS];
	int			nslots;
	LockWaitSlot slots[FLEXIBLE_ARRAY_MEMBER];
} LocksShared;

/* Payload of the advisory-name dictionary: the key the name hashes to. */
typedef struct AdvisoryName
{
	uint64		key;
} AdvisoryName;

static LocksShared *locks_shared = NULL;
static ShmTable *advisory_names = NULL;

/* Names released or renewed by this transaction: wake their waiters at commit. */
static List *wake_at_commit = NIL;
static bool xact_callback_registered = false;

/* Cached OID of the token sequence (reset when the extension's objects change). */
static Oid	token_seq_oid = InvalidOid;

/*
 * Does resilience.leases have released_at (added in 0.2)?  -1: not known
 * yet.  A 0.1 schema still works with this library until ALTER EXTENSION
 * ... UPDATE: only lease takeovers are not counted then.
 */
static Oid	leases_relid = InvalidOid;
static int	leases_released_at = -1;

/*
 * The direct path (see "Leases without SQL" below): the columns of
 * resilience.leases by attribute number, its primary key, and whether the
 * table is one the direct path may write (-1: not known yet).
 */
typedef enum LeaseCol
{
	LCOL_NAME,
	LCOL_OWNER,
	LCOL_TOKEN,
	LCOL_ACQUIRED_AT,
	LCOL_EXPIRES_AT,
	LCOL_RELEASED_AT,
	LCOL_OWNER_ROLE,
	LCOL_COUNT
} LeaseCol;

static const char *const lease_col_names[LCOL_COUNT] = {
	"name", "owner", "token", "acquired_at", "expires_at", "released_at", "owner_role"
};
static const Oid lease_col_types[LCOL_COUNT] = {
	TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID, REGROLEOID
};
static AttrNumber lease_attnums[LCOL_COUNT];
static Oid	leases_pkey = InvalidOid;
static int	leases_direct = -1;

PG_FUNCTION_INFO_V1(lock_acquire);
PG_FUNCTION_INFO_V1(lock_renew);
PG_FUNCTION_INFO_V1(lock_release);
PG_FUNCTION_INFO_V1(lock_check);
PG_FUNCTION_INFO_V1(fence);
PG_FUNCTION_INFO_V1(fence_check);
PG_FUNCTION_INFO_V1(advisory_xact_lock);
PG_FUNCTION_INFO_V1(advisory_lock);
PG_FUNCTION_INFO_V1(try_advisory_lock);
PG_FUNCTION_INFO_V1(advisory_unlock);
PG_FUNCTION_INFO_V1(lock_key);
PG_FUNCTION_INFO_V1(lock_waiters);
PG_FUNCTION_INFO_V1(advisory_lock_names);

/* ---- shared memory ---- */

static int
wait_slot_count(void)
{
	return resilience_max_backends_compat();
}

Size
locks_shmem_size(void)
{
	Size		size = add_size(offsetof(LocksShared, slots),
								mul_size(wait_slot_count(), sizeof(LockWaitSlot)));

	return add_size(size, shm_table_size(resilience_max_lock_names,
										 sizeof(AdvisoryName), LOCK_NAME_MAX));
}

void
locks_shmem_request(void)
{
	shm_table_request_locks(NAMES_TRANCHE, NAMES_PARTITIONS);
}

void
locks_shmem_init(void)
{
	bool		found;
	int			i;

	locks_shared = ShmemInitStruct("resilience locks",
								   add_size(offsetof(LocksShared, slots),
											mul_size(wait_slot_count(), sizeof(LockWaitSlot))),
								   &found);
	if (!found)
	{
		for (i = 0; i < LOCK_WAIT_CVS; i++)
			ConditionVariableInit(&locks_shared->cvs[i]);
		locks_shared->nslots = wait_slot_count();
		for (i = 0; i < locks_shared->nslots; i++)
		{
			pg_atomic_init_u32(&locks_shared->slots[i].waiting, 0);
			locks_shared->slots[i].name[0] = '\0';
		}
	}
	advisory_names = shm_table_init("resilience advisory lock names",
									resilience_max_lock_names, sizeof(AdvisoryName),
									LOCK_NAME_MAX, NAMES_TRANCHE, NAMES_PARTITIONS);
}

static inline uint32
name_hash(const char *name, int len)
{
	return hash_bytes((const unsigned char *) name, len);
}

/* ---- arguments ---- */

/* A lease, resource or lock name: not NULL, 1..LOCK_NAME_MAX bytes. */
static text *
name_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	text	   *name;
	int			len;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	name = PG_GETARG_TEXT_PP(argno);
	len = VARSIZE_ANY_EXHDR(name);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (len > LOCK_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", what),
				 errdetail("It is %d bytes; at most %d are allowed.", len, LOCK_NAME_MAX),
				 errhint("Hash long names, e.g. with md5().")));
	return name;
}

static int64
token_arg(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("token must not be null"),
				 errhint("Pass the token lock_acquire returned; NULL means the lease was not acquired.")));
	return PG_GETARG_INT64(argno);
}

static int64
interval_usecs(Interval *iv)
{
	int128		usecs = (int128) iv->time + (int128) iv->day * USECS_PER_DAY +
		(int128) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;

	if (usecs > PG_INT64_MAX || usecs < PG_INT64_MIN)
		return usecs > 0 ? PG_INT64_MAX : PG_INT64_MIN;
	return (int64) usecs;
}

static char *
interval_text(Interval *iv)
{
	return DatumGetCString(DirectFunctionCall1(interval_out, IntervalPGetDatum(iv)));
}

/* A lease TTL: more than zero, at most 7 days. */
static Interval *
ttl_arg(FunctionCallInfo fcinfo, int argno)
{
	Interval   *ttl;
	int64		usecs;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("ttl must not be null")));
	ttl = PG_GETARG_INTERVAL_P(argno);
	usecs = interval_usecs(ttl);
	if (usecs <= 0 || usecs > MAX_TTL_USECS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("ttl must be positive and at most 7 days"),
				 errdetail("ttl is %s.", interval_text(ttl)),
				 errhint("Size a lease at 2 to 3 times the work it guards, and renew it for longer work.")));
	return ttl;
}

/* A wait: zero or more, at most a day; microseconds. */
static int64
wait_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	Interval   *wait;
	int64		usecs;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	wait = PG_GETARG_INTERVAL_P(argno);
	usecs = interval_usecs(wait);
	if (usecs < 0 || usecs > MAX_WAIT_USECS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between 0 and 1 day", what),
				 errdetail("%s is %s.", what, interval_text(wait))));
	return usecs;
}

/* ---- tokens ---- */

static void
token_seq_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == token_seq_oid)
		token_seq_oid = InvalidOid;
	if (relid == InvalidOid || relid == leases_relid)
		leases_released_at = -1;
	if (relid == InvalidOid || relid == leases_relid || relid == leases_pkey)
		leases_direct = -1;
}

/* Our relcache callback: forget cached OIDs when the objects change. */
static void
register_invalidation(void)
{
	static bool callback_registered = false;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(token_seq_invalidate, (Datum) 0);
		callback_registered = true;
	}
}

static Oid
token_seq(void)
{
	if (!OidIsValid(token_seq_oid))
	{
		register_invalidation();
		token_seq_oid = get_relname_relid("fencing_tokens",
										  get_namespace_oid("resilience", false));
		if (!OidIsValid(token_seq_oid))
			elog(ERROR, "sequence resilience.fencing_tokens does not exist");
	}
	return token_seq_oid;
}

/*
 * Wait until the synchronous standbys have flushed WAL up to lsn, whatever
 * this session's synchronous_commit says: a standby promoted without the
 * record that covers a token would hand it out again.  SyncRepWaitForLSN
 * waits only when synchronous_commit asks for it, hence the GUC set for the
 * wait.  It ends the wait early, with a WARNING, when the statement is
 * cancelled or times out; the token is then refused with an error instead of
 * being handed out unconfirmed.
 */
static void
wait_for_sync_standbys(XLogRecPtr lsn)
{
	int			nestlevel = -1;

	if (max_wal_senders == 0 || sync_standbys_flushed(lsn))
		return;

	/* not at commit, SyncRepWaitForLSN waits for a flush at most */
	if (synchronous_commit < SYNCHRONOUS_COMMIT_REMOTE_FLUSH)
	{
		nestlevel = NewGUCNestLevel();
		(void) set_config_option("synchronous_commit", "on", PGC_USERSET,
								 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	}
	HOLD_INTERRUPTS();			/* as at commit: the wait handles them itself */
	SyncRepWaitForLSN(lsn, false);
	RESUME_INTERRUPTS();
	if (nestlevel >= 0)
		AtEOXact_GUC(true, nestlevel);
	CHECK_FOR_INTERRUPTS();		/* a terminated session ends here */

	if (!sync_standbys_flushed(lsn))
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("no fencing token was handed out: the synchronous standby has not confirmed it"),
				 errdetail("The wait for synchronous replication was cancelled or timed out "
						   "before the standby flushed the WAL that covers the token."),
				 errhint("Retry.  A token is handed out only once a standby that could be promoted has it.")));
}

/*
 * Make sure the WAL record that covers the sequence's current value is
 * durable, and flushed by the synchronous standbys if any are configured,
 * before a token is handed out.  The sequence logs 32 values ahead, so this
 * flushes at most once per 32 tokens, and not at all when a commit already
 * did.  See "High availability" in docs/operations.md for why this keeps
 * tokens increasing across the promotion of a synchronous standby.
 */
static void
make_token_durable(void)
{
	Relation	rel = relation_open(token_seq(), AccessShareLock);
	Buffer		buf = ReadBuffer(rel, 0);
	XLogRecPtr	lsn;

	LockBuffer(buf, BUFFER_LOCK_SHARE);
	lsn = PageGetLSN(BufferGetPage(buf));
	UnlockReleaseBuffer(buf);
	relation_close(rel, AccessShareLock);

	if (lsn > GetFlushRecPtr_compat())
		XLogFlush(lsn);
	wait_for_sync_standbys(lsn);
}

/* The next fencing token, durable. */
static int64
next_token(void)
{
	int64		token = nextval_internal(token_seq(), false);

	make_token_durable();
	return token;
}

/* ---- waking waiters at commit ---- */

static void
locks_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
	{
		if (locks_shared)
			foreach(lc, wake_at_commit)
				ConditionVariableBroadcast(&locks_shared->cvs[lfirst_int(lc) % LOCK_WAIT_CVS]);
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		wake_at_commit = NIL;	/* the list lived in TopTransactionContext */
}

/* Remember to wake the waiters of `name` when this transaction commits. */
static void
wake_waiters_at_commit(const char *name, int len)
{
	MemoryContext old;

	if (!locks_shared)
		return;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(locks_xact_callback, NULL);
		xact_callback_registered = true;
	}
	old = MemoryContextSwitchTo(TopTransactionContext);
	wake_at_commit = lappend_int(wake_at_commit, (int) (name_hash(name, len) & 0x7fffffff));
	MemoryContextSwitchTo(old);
}

/* ---- leases ---- */

typedef enum LeasePlan
{
	PLAN_TAKEOVER,
	PLAN_INSERT,
	PLAN_EXPIRY,
	PLAN_RENEW,
	PLAN_RELEASE,
	PLAN_CHECK,
	PLAN_FENCE,
	PLAN_FENCE_CURRENT,
	PLAN_TAKEOVER_LOCK,
	PLAN_TAKEOVER_SET,
	PLAN_OWNER,
	NUM_PLANS
} LeasePlan;

/*
 * Every statement takes the same five arguments: name, token or holder,
 * now, expiry, and the role acting on the lease ($5: the caller, or the
 * lease's owner role when the caller has its privileges).  A lease with no
 * owner role yet (from 0.1) becomes $5's when taken, renewed or released.
 */
/* Only rows of the role acted as ($5), or of nobody (a lease from 0.1). */
#define OWNER_IS_5 \
	" AND (owner_role IS NULL OR owner_role::pg_catalog.oid OPERATOR(pg_catalog.=) $5)"
/* renew, release and check of the lease held with token $2 (plan_sql, plan_sql_citus) */
#define HELD_BY_TOKEN \
	" WHERE name OPERATOR(pg_catalog.=) $1 AND token OPERATOR(pg_catalog.=) $2" \
	" AND expires_at OPERATOR(pg_catalog.>) $3"
#define RENEW_SQL \
	"UPDATE resilience.leases SET expires_at = $4, owner_role = $5" HELD_BY_TOKEN
#define RELEASE_SQL \
	"UPDATE resilience.leases SET expires_at = $3, released_at = $3, owner_role = $5" HELD_BY_TOKEN
#define CHECK_SQL "SELECT token FROM resilience.leases" HELD_BY_TOKEN

static const char *const plan_sql[NUM_PLANS] = {
	/*
	 * take over an expired or released lease; the sub-select sees the row as
	 * it was before this statement: was it released, or did it expire?
	 */
	"UPDATE resilience.leases SET owner = $2, token = pg_catalog.nextval('resilience.fencing_tokens'),"
	" acquired_at = $3, expires_at = $4, released_at = NULL, owner_role = $5"
	" WHERE name OPERATOR(pg_catalog.=) $1 AND expires_at OPERATOR(pg_catalog.<=) $3"
	OWNER_IS_5
	" RETURNING token, (SELECT o.released_at IS NULL FROM resilience.leases o"
	"                    WHERE o.name OPERATOR(pg_catalog.=) $1)",
	/* a name never seen (or reaped) */
	"INSERT INTO resilience.leases (name, owner, token, acquired_at, expires_at, owner_role)"
	" VALUES ($1, $2, pg_catalog.nextval('resilience.fencing_tokens'), $3, $4, $5)"
	" ON CONFLICT (name) DO NOTHING RETURNING token",
	/* when the current holder's lease ends, and whose the name is */
	"SELECT expires_at, owner_role::pg_catalog.oid FROM resilience.leases WHERE name OPERATOR(pg_catalog.=) $1",
	RENEW_SQL OWNER_IS_5 " RETURNING token",
	RELEASE_SQL OWNER_IS_5 " RETURNING token",
	CHECK_SQL OWNER_IS_5,
	/* a fence moves forward only */
	"INSERT INTO resilience.fences AS f (resource, token, updated_at) VALUES ($1, $2, $3)"
	" ON CONFLICT (resource) DO UPDATE SET token = excluded.token, updated_at = excluded.updated_at"
	" WHERE f.token OPERATOR(pg_catalog.<=) excluded.token RETURNING token",
	"SELECT token FROM resilience.fences WHERE resource OPERATOR(pg_catalog.=) $1",

	/*
	 * The takeover when Citus is present (leases distributed by name): Citus
	 * refuses nextval() in an UPDATE and a sub-select in its RETURNING, so
	 * the expired or released row is locked first, then the token is taken
	 * (on the coordinator, its one sequence) and written as $6.  Any later
	 * taker waits for this row lock, so its token is larger.
	 */
	"SELECT released_at IS NULL FROM resilience.leases"
	" WHERE name OPERATOR(pg_catalog.=) $1 AND expires_at OPERATOR(pg_catalog.<=) $3"
	OWNER_IS_5 " FOR UPDATE",
	"UPDATE resilience.leases SET owner = $2, token = $6,"
	" acquired_at = $3, expires_at = $4, released_at = NULL, owner_role = $5"
	" WHERE name OPERATOR(pg_catalog.=) $1 RETURNING token",
	/* Citus: lock the row, and read its owner by name (plan_sql_citus) */
	"SELECT owner_role::pg_catalog.text FROM resilience.leases"
	" WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE",
};

/*
 * With Citus the rows live on the workers, where a role has another oid
 * than here: owner_role written from here reaches a worker as the role's
 * name (Citus deparses the regrole constant), so it holds the worker's oid
 * for that role, and no statement can compare it with $5.  These forms read
 * the owner by name and do not filter by it: lease_statement and
 * citus_try_takeover lock the row, check its owner here (row_owner), then
 * write.
 */
static const char *const plan_sql_citus[NUM_PLANS] = {
	[PLAN_EXPIRY] =
	"SELECT expires_at, owner_role::pg_catalog.text FROM resilience.leases"
	" WHERE name OPERATOR(pg_catalog.=) $1",
	[PLAN_RENEW] = RENEW_SQL " RETURNING token",
	[PLAN_RELEASE] = RELEASE_SQL " RETURNING token",
	[PLAN_CHECK] = CHECK_SQL,
	[PLAN_TAKEOVER_LOCK] =
	"SELECT released_at IS NULL, owner_role::pg_catalog.text FROM resilience.leases"
	" WHERE name OPERATOR(pg_catalog.=) $1 AND expires_at OPERATOR(pg_catalog.<=) $3 FOR UPDATE",
};

/*
 * PLAN_EXPIRY takes the name only: lease_statement runs it with a token as
 * $2, and Citus sends every parameter on, by its declared type.
 */
static const int plan_nargs[NUM_PLANS] = {5, 5, 1, 5, 5, 5, 3, 1, 5, 6, 1};

/* The lease statements on a 0.1 schema (no released_at, no owner_role; $5 unused). */
static const char *const plan_sql_0_1[NUM_PLANS] = {
	[PLAN_TAKEOVER] =
	"UPDATE resilience.leases SET owner = $2, token = pg_catalog.nextval('resilience.fencing_tokens'),"
	" acquired_at = $3, expires_at = $4"
	" WHERE name OPERATOR(pg_catalog.=) $1 AND expires_at OPERATOR(pg_catalog.<=) $3"
	" RETURNING token, false",
	[PLAN_INSERT] =
	"INSERT INTO resilience.leases (name, owner, token, acquired_at, expires_at)"
	" VALUES ($1, $2, pg_catalog.nextval('resilience.fencing_tokens'), $3, $4)"
	" ON CONFLICT (name) DO NOTHING RETURNING token",
	[PLAN_EXPIRY] =
	"SELECT expires_at, NULL::pg_catalog.oid FROM resilience.leases WHERE name OPERATOR(pg_catalog.=) $1",
	[PLAN_RENEW] =
	"UPDATE resilience.leases SET expires_at = $4" HELD_BY_TOKEN " RETURNING token",
	[PLAN_RELEASE] =
	"UPDATE resilience.leases SET expires_at = $3" HELD_BY_TOKEN " RETURNING token",
	[PLAN_CHECK] = CHECK_SQL,
};

static SPIPlanPtr plans[NUM_PLANS];
static const char *plan_from[NUM_PLANS];	/* the text it was prepared from */

/* Does resilience.leases have the column released_at? */
static bool
leases_have_released_at(void)
{
	if (leases_released_at < 0)
	{
		Oid			relid;

		register_invalidation();
		relid = get_relname_relid("leases", get_namespace_oid("resilience", false));
		if (!OidIsValid(relid))
			elog(ERROR, "table resilience.leases does not exist");
		leases_relid = relid;
		leases_released_at = get_attnum(relid, "released_at") != InvalidAttrNumber;
	}
	return leases_released_at;
}

/* Run one of the statements above (inside SPI); returns rows processed. */
static uint64
run_plan(LeasePlan which, Datum *values)
{
	static Oid	argtypes[NUM_PLANS][6] = {
		{TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, INT8OID, TIMESTAMPTZOID},
		{TEXTOID},
		{TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
		{TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID, INT8OID},
		{TEXTOID},
	};
	int			ret;
	const char *sql = plan_sql[which];

	if (plan_sql_0_1[which] != NULL && !leases_have_released_at())
		sql = plan_sql_0_1[which];
	else if (plan_sql_citus[which] != NULL && citus_present())
		sql = plan_sql_citus[which];
	if (plans[which] != NULL && plan_from[which] != sql)
	{
		SPI_freeplan(plans[which]);
		plans[which] = NULL;
	}
	if (plans[which] == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, plan_nargs[which], argtypes[which]);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		plans[which] = plan;
		plan_from[which] = sql;
	}
	ret = SPI_execute_plan(plans[which], values, NULL, false, 1);
	if (ret < 0)
		elog(ERROR, "SPI_execute_plan failed: %s", SPI_result_code_string(ret));
	return SPI_processed;
}

static Datum
first_value(bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
}

/* The owner role in column col of the row just read: by name with Citus (plan_sql_citus). */
static Oid
row_owner(int col, bool *isnull)
{
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, isnull);

	if (*isnull)
		return InvalidOid;
	if (SPI_gettypeid(SPI_tuptable->tupdesc, col) == TEXTOID)
		return tenant_role_by_name(TextDatumGetCString(d));
	return DatumGetObjectId(d);
}

/* The default owner: application_name/pid, stable for a connection. */
static text *
default_owner(void)
{
	const char *app = application_name && application_name[0] ? application_name : "backend";

	return cstring_to_text(psprintf("%s/%d", app, MyProcPid));
}

/*
 * The role the caller acts as on lease `name` owned by row_role (SPI
 * connected): row_role if the caller may act on it (itself, a role whose
 * privileges it has, or as resilience_admin); 42501 otherwise.
 */
static Oid
lease_acting_role(text *name, Oid row_role, Oid caller)
{
	if (!tenants_enabled() || !OidIsValid(row_role) || row_role == caller)
		return caller;
	tenant_check(TENANT_LEASE, text_to_cstring(name), row_role, caller);
	return row_role;
}

/*
 * A new lease row is the acting role's, unless an admin declared the name
 * another role's: then it is that role's, if the caller may act on it.
 */
static void
lease_adopt_declared_owner(text *name, Oid as_role, Oid caller)
{
	Oid			declared = tenant_declared_owner(TENANT_LEASE, VARDATA_ANY(name),
												 VARSIZE_ANY_EXHDR(name));
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2];

	if (!OidIsValid(declared) || declared == as_role)
		return;
	tenant_check(TENANT_LEASE, text_to_cstring(name), declared, caller);
	values[0] = PointerGetDatum(name);
	values[1] = ObjectIdGetDatum(declared);
	if (SPI_execute_with_args("UPDATE resilience.leases SET owner_role = $2"
							  " WHERE name OPERATOR(pg_catalog.=) $1",
							  2, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "recording the owner of lease \"%s\" failed", text_to_cstring(name));
}

/* ---- leases without SQL ---- */

/*
 * Taking over, renewing, releasing and checking a lease that has a row do
 * what their UPDATE (or SELECT) would, without the executor: one probe of
 * leases_pkey with a snapshot taken as SPI takes one for a statement, the
 * WHERE clause checked in C, and table_tuple_update of the version found.
 * A concurrent transaction that changed the row first makes the update wait
 * for it and fail (TM_Updated); under READ COMMITTED the probe is then
 * repeated with a new snapshot, so the checks always hold for the version
 * written (as EvalPlanQual would recheck them), and a failed attempt holds
 * no row lock.  Under REPEATABLE READ or SERIALIZABLE that is a
 * serialization failure, as for the UPDATE.  A takeover draws its token
 * after its snapshot saw the version it replaces, so it is larger than that
 * version's token, and any later taker sees this one's.
 *
 * Only for the table as the extension creates it: with Citus (which
 * distributes it and routes statements itself), a 0.1 schema, triggers,
 * rules, row-level security, check constraints or generated columns, every
 * statement goes through SPI as before.  A name without a row goes through
 * SPI too (the INSERT ... ON CONFLICT of a new lease).
 */

/* May the direct path write resilience.leases, as it is now? */
static bool
leases_direct_layout(void)
{
	Relation	rel;

	if (leases_direct >= 0)
		return leases_direct;
	if (!leases_have_released_at())
		return (leases_direct = 0);
	rel = table_open(leases_relid, AccessShareLock);
	leases_pkey = direct_update_layout(rel, LCOL_COUNT, lease_col_names, lease_col_types,
									   lease_attnums, LCOL_NAME);
	table_close(rel, AccessShareLock);
	leases_direct = OidIsValid(leases_pkey);
	return leases_direct;
}

typedef struct LeaseScan
{
	Relation	rel;
	Relation	idx;
	TupleTableSlot *slot;		/* the row found, all columns deformed */
	bool		snapshot_pushed;
} LeaseScan;

#define LEASE_VALUE(ls, c) ((ls)->slot->tts_values[lease_attnums[c] - 1])
#define LEASE_ISNULL(ls, c) ((ls)->slot->tts_isnull[lease_attnums[c] - 1])

/*
 * Open the table for the direct path; false: use SPI (which also raises
 * the executor's error for a write in a read-only transaction).
 */
static bool
lease_direct_begin(LeaseScan *ls, LOCKMODE mode)
{
	if (citus_present() || (mode != AccessShareLock && XactReadOnly) ||
		!leases_direct_layout())
		return false;
	ls->rel = table_open(leases_relid, mode);
	if (leases_direct != 1)
	{
		/* changed while we waited for the lock */
		table_close(ls->rel, mode);
		return false;
	}
	ls->idx = index_open(leases_pkey, mode);
	ls->slot = table_slot_create(ls->rel, NULL);
	ls->snapshot_pushed = false;
	return true;
}

static void
lease_direct_end(LeaseScan *ls)
{
	if (ls->snapshot_pushed)
		PopActiveSnapshot();
	ExecDropSingleTupleTableSlot(ls->slot);
	index_close(ls->idx, NoLock);
	table_close(ls->rel, NoLock);
}

/*
 * Find name's row as a statement run through SPI would: this transaction's
 * earlier changes made visible, then a snapshot (a new one under READ
 * COMMITTED).  True with the row in ls->slot.
 */
static bool
lease_probe(LeaseScan *ls, text *name)
{
	ScanKeyData key;
	IndexScanDesc scan;
	bool		found;

	if (ls->snapshot_pushed)
		PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());
	ls->snapshot_pushed = true;
	CommandCounterIncrement();
	UpdateActiveSnapshotCommandId();

	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_TEXTEQ, PointerGetDatum(name));
	key.sk_collation = ls->idx->rd_indcollation[0];
	scan = index_beginscan_compat(ls->rel, ls->idx, GetActiveSnapshot(), 1, 0);
	index_rescan(scan, &key, 1, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, ls->slot);
	index_endscan(scan);
	if (found)
		slot_getallattrs(ls->slot);
	return found;
}

/*
 * Write the row found with the columns in replace[] set to values[]/nulls[]:
 * TM_Ok, or TM_Updated/TM_Deleted if another transaction changed it first
 * (READ COMMITTED: probe again; otherwise a serialization failure is raised
 * here, as the UPDATE would).
 */
static TM_Result
lease_write(LeaseScan *ls, const Datum *values, const bool *nulls, const bool *replace)
{
	TupleDesc	desc = RelationGetDescr(ls->rel);
	TupleTableSlot *slot = table_slot_create(ls->rel, NULL);
	TM_FailureData tmfd;
	LockTupleMode lockmode;
	UpdateIndexes_compat update_indexes;
	TM_Result	result;

	ExecClearTuple(slot);
	memcpy(slot->tts_values, ls->slot->tts_values, sizeof(Datum) * desc->natts);
	memcpy(slot->tts_isnull, ls->slot->tts_isnull, sizeof(bool) * desc->natts);
	for (int c = 0; c < LCOL_COUNT; c++)
	{
		if (!replace[c])
			continue;
		slot->tts_values[lease_attnums[c] - 1] = values[c];
		slot->tts_isnull[lease_attnums[c] - 1] = nulls[c];
	}
	ExecStoreVirtualTuple(slot);
	result = table_tuple_update(ls->rel, &ls->slot->tts_tid, slot, GetCurrentCommandId(true),
								GetActiveSnapshot(), InvalidSnapshot, true,
								&tmfd, &lockmode, &update_indexes);
	if (result == TM_Ok)
		direct_update_indexes(ls->rel, slot, (int) update_indexes);
	ExecDropSingleTupleTableSlot(slot);

	switch (result)
	{
		case TM_Ok:
			break;
		case TM_Updated:
		case TM_Deleted:
			if (IsolationUsesXactSnapshot())
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg("could not serialize access due to concurrent %s",
								result == TM_Updated ? "update" : "delete")));
			break;
		default:
			elog(ERROR, "unexpected result %d updating a lease", (int) result);
	}
	return result;
}

typedef enum DirectOutcome
{
	DIRECT_UNAVAILABLE,			/* use SPI */
	DIRECT_ABSENT,				/* no row: SPI inserts one */
	DIRECT_HELD,
	DIRECT_TAKEN
} DirectOutcome;

/*
 * lease_try_acquire for a name that has a row: take it over if it expired
 * or was released, else report until when it is held (and switch *as_role
 * as lease_try_acquire does when the name is another role's).
 */
static DirectOutcome
lease_direct_acquire(text *name, text *owner, TimestampTz now, Datum expires,
					 Oid caller, Oid *as_role, int64 *token, bool *takeover,
					 TimestampTz *held_until)
{
	LeaseScan	ls;
	DirectOutcome outcome;

	if (!lease_direct_begin(&ls, RowExclusiveLock))
		return DIRECT_UNAVAILABLE;
	for (;;)
	{
		Oid			row_role;
		TimestampTz row_expires;

		CHECK_FOR_INTERRUPTS();
		if (!lease_probe(&ls, name))
		{
			outcome = DIRECT_ABSENT;
			break;
		}
		row_role = LEASE_ISNULL(&ls, LCOL_OWNER_ROLE) ? InvalidOid :
			DatumGetObjectId(LEASE_VALUE(&ls, LCOL_OWNER_ROLE));
		row_expires = DatumGetTimestampTz(LEASE_VALUE(&ls, LCOL_EXPIRES_AT));
		if (row_expires <= now && (!OidIsValid(row_role) || row_role == *as_role))
		{
			Datum		values[LCOL_COUNT] = {0};
			bool		nulls[LCOL_COUNT] = {false};
			bool		replace[LCOL_COUNT] = {false};
			bool		was_held = LEASE_ISNULL(&ls, LCOL_RELEASED_AT);
			int64		t = nextval_internal(token_seq(), false);

			values[LCOL_OWNER] = PointerGetDatum(owner);
			values[LCOL_TOKEN] = Int64GetDatum(t);
			values[LCOL_ACQUIRED_AT] = TimestampTzGetDatum(now);
			values[LCOL_EXPIRES_AT] = expires;
			nulls[LCOL_RELEASED_AT] = true;
			values[LCOL_OWNER_ROLE] = ObjectIdGetDatum(*as_role);
			replace[LCOL_OWNER] = replace[LCOL_TOKEN] = replace[LCOL_ACQUIRED_AT] = true;
			replace[LCOL_EXPIRES_AT] = replace[LCOL_RELEASED_AT] = replace[LCOL_OWNER_ROLE] = true;
			if (lease_write(&ls, values, nulls, replace) != TM_Ok)
				continue;		/* changed meanwhile: look again */
			*token = t;
			*takeover = was_held;
			outcome = DIRECT_TAKEN;
			break;
		}
		*held_until = row_expires;
		if (OidIsValid(row_role) && row_role != *as_role)
		{
			*as_role = lease_acting_role(name, row_role, caller);
			*held_until = now;	/* try again at once, as a member */
		}
		outcome = DIRECT_HELD;
		break;
	}
	lease_direct_end(&ls);
	return outcome;
}

/*
 * lease_statement's renew, release or check, directly: 1 if the lease
 * matched (and was written), 0 if not, -1 if SPI must do it.
 */
static int
lease_direct_statement(LeasePlan which, text *name, int64 token, TimestampTz now,
					   Datum expires, Oid caller)
{
	LeaseScan	ls;
	Oid			as_role = caller;
	int			matched;

	if (!lease_direct_begin(&ls, which == PLAN_CHECK ? AccessShareLock : RowExclusiveLock))
		return -1;
	for (;;)
	{
		Oid			row_role;

		CHECK_FOR_INTERRUPTS();
		if (!lease_probe(&ls, name))
		{
			matched = 0;
			break;
		}
		row_role = LEASE_ISNULL(&ls, LCOL_OWNER_ROLE) ? InvalidOid :
			DatumGetObjectId(LEASE_VALUE(&ls, LCOL_OWNER_ROLE));
		if (DatumGetInt64(LEASE_VALUE(&ls, LCOL_TOKEN)) == token &&
			DatumGetTimestampTz(LEASE_VALUE(&ls, LCOL_EXPIRES_AT)) > now &&
			(!OidIsValid(row_role) || row_role == as_role))
		{
			Datum		values[LCOL_COUNT] = {0};
			bool		nulls[LCOL_COUNT] = {false};
			bool		replace[LCOL_COUNT] = {false};

			if (which == PLAN_CHECK)
			{
				matched = 1;
				break;
			}
			values[LCOL_EXPIRES_AT] = expires;
			values[LCOL_OWNER_ROLE] = ObjectIdGetDatum(as_role);
			replace[LCOL_EXPIRES_AT] = replace[LCOL_OWNER_ROLE] = true;
			if (which == PLAN_RELEASE)
			{
				values[LCOL_RELEASED_AT] = TimestampTzGetDatum(now);
				replace[LCOL_RELEASED_AT] = true;
			}
			if (lease_write(&ls, values, nulls, replace) != TM_Ok)
				continue;		/* changed meanwhile: look again */
			matched = 1;
			break;
		}
		if (tenants_enabled() && OidIsValid(row_role) && row_role != caller && as_role == caller)
		{
			/* another role's lease (42501), or one the caller may act as */
			as_role = lease_acting_role(name, row_role, caller);
			continue;
		}
		matched = 0;
		break;
	}
	lease_direct_end(&ls);
	return matched;
}

/*
 * The takeover when Citus is present: two statements it can route to the
 * name's shard (PLAN_TAKEOVER_LOCK, then PLAN_TAKEOVER_SET with a token taken
 * in between), in a subtransaction.  A FOR UPDATE that waited for another
 * taker and then found the lease held keeps its row lock (EvalPlanQual locks
 * the newest version first): a failed attempt is rolled back so that the
 * caller, about to wait for the holder, does not block the holder's release.
 */
static bool
citus_try_takeover(Datum *values, Oid caller, int64 *token, bool *takeover)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	bool		got = false;
	bool		isnull;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	if (run_plan(PLAN_TAKEOVER_LOCK, values) == 1)
	{
		Oid			row_role = row_owner(2, &isnull);

		*takeover = DatumGetBool(first_value(&isnull)) && !isnull;
		/* another role's name: 42501, or act as that role (tenants.c) */
		if (OidIsValid(row_role) && row_role != DatumGetObjectId(values[4]))
			values[4] = ObjectIdGetDatum(lease_acting_role(DatumGetTextPP(values[0]),
														   row_role, caller));
		values[5] = Int64GetDatum(next_token());
		if (run_plan(PLAN_TAKEOVER_SET, values) != 1)
			elog(ERROR, "lease \"%s\" vanished while locked",
				 text_to_cstring(DatumGetTextPP(values[0])));
		*token = DatumGetInt64(first_value(&isnull));
		got = true;
	}
	if (got)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return got;
}

/*
 * One attempt at a lease, acting as *as_role: take it over if expired or
 * released, or create it.  Returns true with *token set, and *takeover if
 * the previous holder let it expire; otherwise *held_until is when the
 * current holder's lease ends (now, if the row vanished meanwhile).  A name
 * owned by another role makes *as_role that role (the caller may act on it:
 * try again at once) or raises 42501.
 */
static bool
lease_try_acquire(text *name, text *owner, Interval *ttl, TimestampTz now, Oid caller,
				  Oid *as_role, int64 *token, bool *takeover, TimestampTz *held_until)
{
	Datum		values[6];
	bool		isnull;

	values[0] = PointerGetDatum(name);
	values[1] = PointerGetDatum(owner);
	values[2] = TimestampTzGetDatum(now);
	values[3] = DirectFunctionCall2(timestamptz_pl_interval,
									TimestampTzGetDatum(now), IntervalPGetDatum(ttl));
	values[4] = ObjectIdGetDatum(*as_role);
	if (citus_present() && leases_have_released_at())
	{
		if (citus_try_takeover(values, caller, token, takeover))
			return true;
	}
	else if (run_plan(PLAN_TAKEOVER, values) == 1)
	{
		*token = DatumGetInt64(first_value(&isnull));
		*takeover = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
											   SPI_tuptable->tupdesc, 2, &isnull)) && !isnull;
		return true;
	}
	if (run_plan(PLAN_INSERT, values) == 1)
	{
		*token = DatumGetInt64(first_value(&isnull));
		*takeover = false;
		if (tenants_enabled())
			lease_adopt_declared_owner(name, *as_role, caller);
		return true;
	}
	*held_until = now;
	if (run_plan(PLAN_EXPIRY, values) == 1)
	{
		Oid			row_role;

		*held_until = DatumGetTimestampTz(first_value(&isnull));
		row_role = row_owner(2, &isnull);
		if (!isnull && row_role != *as_role)
		{
			*as_role = lease_acting_role(name, row_role, caller);
			*held_until = now;	/* try again at once, as a member */
		}
	}
	return false;
}

/*
 * Sleep up to sleep_ms for a lease to be released or renewed, visible in the
 * locks view as a waiter meanwhile.
 */
static void
lease_wait(const char *name, int len, long sleep_ms)
{
	LockWaitSlot *volatile slot = NULL;

	if (!locks_shared)
	{
		/* no condition variables without preloading: re-check often */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(sleep_ms, LOCK_POLL_MS), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		return;
	}
	if (MyProcNumber_compat < locks_shared->nslots)
	{
		slot = &locks_shared->slots[MyProcNumber_compat];
		strlcpy(slot->name, name, sizeof(slot->name));
		slot->pid = MyProcPid;
		pg_write_barrier();
		pg_atomic_write_u32(&slot->waiting, 1);
	}
	PG_TRY();
	{
		(void) ConditionVariableTimedSleep(&locks_shared->cvs[(name_hash(name, len) & 0x7fffffff) % LOCK_WAIT_CVS],
										   sleep_ms, PG_WAIT_EXTENSION);
	}
	PG_FINALLY();
	{
		/* also when cancelled or timed out by statement_timeout */
		if (slot)
			pg_atomic_write_u32(&slot->waiting, 0);
	}
	PG_END_TRY();
}

/*
 * lock_acquire(name, ttl, owner, wait) → fencing token, or NULL if the lease
 * could not be taken within wait.
 */
Datum
lock_acquire(PG_FUNCTION_ARGS)
{
	text	   *name = name_arg(fcinfo, 0, "lease name");
	Interval   *ttl = ttl_arg(fcinfo, 1);
	text	   *owner = PG_ARGISNULL(2) ? default_owner() : PG_GETARG_TEXT_PP(2);
	int64		wait = wait_arg(fcinfo, 3, "wait");
	TimestampTz deadline = GetCurrentTimestamp() + wait;
	int64		token = 0;
	bool		got = false;
	bool		waited = false;
	bool		takeover = false;
	ResilienceUser save;
	bool		spi = false;
	Oid			caller = GetUserId();
	Oid			as_role = caller;

	if (VARSIZE_ANY_EXHDR(owner) > LOCK_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("owner is too long"),
				 errdetail("It is %d bytes; at most %d are allowed.",
						   (int) VARSIZE_ANY_EXHDR(owner), LOCK_NAME_MAX)));

	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz held_until = now;
		Oid			tried_as = as_role;
		DirectOutcome direct;

		direct = lease_direct_acquire(name, owner, now,
									  DirectFunctionCall2(timestamptz_pl_interval,
														  TimestampTzGetDatum(now),
														  IntervalPGetDatum(ttl)),
									  caller, &as_role, &token, &takeover, &held_until);
		if (direct == DIRECT_TAKEN)
		{
			got = true;
			break;
		}
		if (direct != DIRECT_HELD)
		{
			if (!spi)
			{
				SPI_connect();
				resilience_become_owner(false, &save);	/* see "search_path" above */
				spi = true;
			}
			if (lease_try_acquire(name, owner, ttl, now, caller, &as_role,
								  &token, &takeover, &held_until))
			{
				got = true;
				break;
			}
		}
		if (as_role != tried_as)
			continue;			/* the name's owner role, which the caller may act as */
		if (now >= deadline)
			break;
		/* until it expires, a release or renewal commits, or the wait ends */
		lease_wait(text_to_cstring(name), VARSIZE_ANY_EXHDR(name),
				   Max((Min(held_until, deadline) - now + 999) / 1000, 1));
		waited = true;
	}
	if (waited && locks_shared)
		ConditionVariableCancelSleep();
	if (spi)
	{
		resilience_restore_user(&save);
		SPI_finish();
	}

	metrics_add(RC_LEASE_ACQUISITIONS, got ? RV_LEASE_ACQUIRED : RV_LEASE_NOT_ACQUIRED, NULL, 1);
	if (takeover)
		metrics_add(RC_LEASE_TAKEOVERS, 0, NULL, 1);
	if (waited)
		metrics_add(RC_LEASE_WAITS, 0, NULL, 1);
	if (!got)
		PG_RETURN_NULL();
	/* the lease must outlive a crash once the caller has seen its token */
	ForceSyncCommit();
	make_token_durable();
	PG_RETURN_INT64(token);
}

/* Shared by renew, release and check: run the plan, true if a row matched. */
static bool
lease_statement(FunctionCallInfo fcinfo, LeasePlan which, Interval *ttl)
{
	text	   *name = name_arg(fcinfo, 0, "lease name");
	int64		token = token_arg(fcinfo, 1);
	TimestampTz now = GetCurrentTimestamp();
	Datum		values[5];
	bool		matched;
	int			direct;
	ResilienceUser save;

	values[0] = PointerGetDatum(name);
	values[1] = Int64GetDatum(token);
	values[2] = TimestampTzGetDatum(now);
	values[3] = ttl ? DirectFunctionCall2(timestamptz_pl_interval,
										  TimestampTzGetDatum(now), IntervalPGetDatum(ttl))
		: TimestampTzGetDatum(now);
	values[4] = ObjectIdGetDatum(GetUserId());
	direct = lease_direct_statement(which, name, token, now, values[3], GetUserId());
	if (direct >= 0)
		matched = direct;
	else
	{
		SPI_connect();
		resilience_become_owner(false, &save);	/* see "search_path" above */
		if (citus_present() && tenants_enabled())
		{
			/* the row locked and its owner checked first (plan_sql_citus) */
			bool		isnull;

			if (run_plan(which == PLAN_CHECK ? PLAN_EXPIRY : PLAN_OWNER, values) == 1)
			{
				Oid			row_role = row_owner(which == PLAN_CHECK ? 2 : 1, &isnull);

				if (!isnull)
					values[4] = ObjectIdGetDatum(lease_acting_role(name, row_role, save.userid));
			}
			matched = run_plan(which, values) == 1;
		}
		else
		{
			matched = run_plan(which, values) == 1;
			if (!matched && tenants_enabled() && run_plan(PLAN_EXPIRY, values) == 1)
			{
				/* not the caller's role's lease: another role's (42501), or one it may act as */
				bool		isnull;
				Oid			row_role = row_owner(2, &isnull);

				if (!isnull && row_role != save.userid)
				{
					values[4] = ObjectIdGetDatum(lease_acting_role(name, row_role, save.userid));
					matched = run_plan(which, values) == 1;
				}
			}
		}
		resilience_restore_user(&save);
		SPI_finish();
	}
	if (matched && which == PLAN_RENEW)
		ForceSyncCommit();		/* a renewal the holder relies on must not be lost */
	if (matched && which != PLAN_CHECK)
		wake_waiters_at_commit(VARDATA_ANY(name), VARSIZE_ANY_EXHDR(name));
	return matched;
}

/* lock_renew(name, token, ttl) → false if the lease was lost; the token stays. */
Datum
lock_renew(PG_FUNCTION_ARGS)
{
	Interval   *ttl = ttl_arg(fcinfo, 2);

	PG_RETURN_BOOL(lease_statement(fcinfo, PLAN_RENEW, ttl));
}

/* lock_release(name, token) → false if that token no longer holds the lease. */
Datum
lock_release(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(lease_statement(fcinfo, PLAN_RELEASE, NULL));
}

/* lock_check(name, token) → does that token hold the lease right now? */
Datum
lock_check(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(lease_statement(fcinfo, PLAN_CHECK, NULL));
}

/* ---- fences ---- */

/* The newest token this backend knows was issued (tokens only grow). */
static int64 max_issued_token = 0;

/* The newest fencing token issued so far (SPI connected). */
static int64
last_issued_token(void)
{
	bool		isnull;
	int			ret;

	ret = SPI_execute("SELECT CASE WHEN is_called THEN last_value ELSE last_value OPERATOR(pg_catalog.-) 1 END"
					  " FROM resilience.fencing_tokens", true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "reading resilience.fencing_tokens failed: %s", SPI_result_code_string(ret));
	return DatumGetInt64(first_value(&isnull));
}

/*
 * Record token for resource unless it has seen a newer one; true if
 * accepted.  A token never issued is refused (22023): it would pin the
 * resource for ever.
 */
static bool
fence_advance(text *resource, int64 token, int64 *seen)
{
	Datum		values[3];
	bool		accepted;
	bool		isnull;

	values[0] = PointerGetDatum(resource);
	values[1] = Int64GetDatum(token);
	values[2] = TimestampTzGetDatum(GetCurrentTimestamp());
	SPI_connect();
	if (token > max_issued_token && (max_issued_token = last_issued_token()) < token)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("fencing token %lld was never issued", (long long) token),
				 errdetail("The newest token issued is %lld.", (long long) max_issued_token),
				 errhint("Pass a token that lock_acquire or an advisory helper returned.")));
	accepted = run_plan(PLAN_FENCE, values) == 1;
	if (!accepted && seen && run_plan(PLAN_FENCE_CURRENT, values) == 1)
		*seen = DatumGetInt64(first_value(&isnull));
	SPI_finish();
	if (!accepted)
		metrics_add(RC_FENCE_REJECTIONS, 0, NULL, 1);
	return accepted;
}

/* fence(resource, token): raise RS001 if resource has seen a newer token. */
Datum
fence(PG_FUNCTION_ARGS)
{
	text	   *resource = name_arg(fcinfo, 0, "resource");
	int64		token = token_arg(fcinfo, 1);
	int64		seen = 0;

	if (!fence_advance(resource, token, &seen))
		ereport(ERROR,
				(errcode(ERRCODE_STALE_FENCING_TOKEN),
				 errmsg("fencing token %lld is stale for resource \"%s\"",
						(long long) token, text_to_cstring(resource)),
				 errdetail("The resource has already accepted token %lld.", (long long) seen),
				 errhint("The lease behind this token was lost; stop and acquire it again.")));
	PG_RETURN_VOID();
}

/* fence_check(resource, token) → the same test as fence, as a boolean for WHERE. */
Datum
fence_check(PG_FUNCTION_ARGS)
{
	text	   *resource = name_arg(fcinfo, 0, "resource");
	int64		token = token_arg(fcinfo, 1);

	PG_RETURN_BOOL(fence_advance(resource, token, NULL));
}

/* ---- advisory helpers ---- */

static uint64
advisory_key(text *name)
{
	return hash_bytes_extended((const unsigned char *) VARDATA_ANY(name),
							   VARSIZE_ANY_EXHDR(name), ADVISORY_SEED);
}

static void
advisory_tag(LOCKTAG *tag, uint64 key)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (key >> 32), (uint32) key,
						 ADVISORY_SPACE);
}

/* Any name may be forgotten: the dictionary only labels the locks view. */
static bool
name_idle(ShmEntry *entry, void *payload, int64 now)
{
	return true;
}

/* Remember which name a key came from, for the locks view (best effort). */
static void
remember_name(text *name, uint64 key)
{
	const char *str = VARDATA_ANY(name);
	int			len = VARSIZE_ANY_EXHDR(name);
	uint32		hash = shm_table_hash(0, str, len);
	LWLock	   *lock;
	ShmEntry   *entry;
	bool		found;

	if (!advisory_names)
		return;
	lock = shm_table_lock(advisory_names, hash);
	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(advisory_names, hash, 0, str, len);
	if (entry)
	{
		entry->referenced = true;	/* a plain store: only the CLOCK hint */
		LWLockRelease(lock);
		return;
	}
	LWLockRelease(lock);
	entry = shm_table_enter(advisory_names, hash, 0, str, len, true, name_idle, &found);
	if (entry)
	{
		((AdvisoryName *) shm_entry_payload(advisory_names, entry))->key = key;
		LWLockRelease(lock);
	}
}

/* Take the helper lock for name; returns whether it was granted. */
static bool
advisory_take(text *name, bool session, int64 wait_usecs)
{
	uint64		key = advisory_key(name);
	LOCKTAG		tag;
	LockAcquireResult res;

	advisory_tag(&tag, key);
	remember_name(name, key);
	if (wait_usecs == 0)
		return LockAcquire(&tag, ExclusiveLock, session, true) != LOCKACQUIRE_NOT_AVAIL;
	if (wait_usecs < 0)
	{
		(void) LockAcquire(&tag, ExclusiveLock, session, false);
		return true;
	}

	/*
	 * Wait at most wait_usecs: the lock manager's own lock_timeout does the
	 * timing, in a subtransaction so that its error can be caught cleanly.
	 * A shorter lock_timeout of the caller's is honoured the same way.
	 */
	{
		MemoryContext oldcontext = CurrentMemoryContext;
		ResourceOwner oldowner = CurrentResourceOwner;
		int			saved_timeout = LockTimeout;
		int			timeout_ms = (int) Max((wait_usecs + 999) / 1000, 1);
		bool		granted = false;

		if (saved_timeout > 0)
			timeout_ms = Min(timeout_ms, saved_timeout);
		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(oldcontext);
		PG_TRY();
		{
			LockTimeout = timeout_ms;
			res = LockAcquire(&tag, ExclusiveLock, session, false);
			LockTimeout = saved_timeout;
			granted = (res != LOCKACQUIRE_NOT_AVAIL);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			LockTimeout = saved_timeout;
			MemoryContextSwitchTo(oldcontext);
			edata = CopyErrorData();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
			if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
				ReThrowError(edata);
			FlushErrorState();
			FreeErrorData(edata);
		}
		PG_END_TRY();
		return granted;
	}
}

/* advisory_xact_lock(name) → token; the lock is held until transaction end. */
Datum
advisory_xact_lock(PG_FUNCTION_ARGS)
{
	text	   *name = name_arg(fcinfo, 0, "lock name");

	advisory_take(name, false, -1);
	PG_RETURN_INT64(next_token());
}

/* advisory_lock(name) → token; a session lock, held until advisory_unlock. */
Datum
advisory_lock(PG_FUNCTION_ARGS)
{
	text	   *name = name_arg(fcinfo, 0, "lock name");

	advisory_take(name, true, -1);
	PG_RETURN_INT64(next_token());
}

/* try_advisory_lock(name, timeout) → token, or NULL if not granted in time. */
Datum
try_advisory_lock(PG_FUNCTION_ARGS)
{
	text	   *name = name_arg(fcinfo, 0, "lock name");
	int64		wait = wait_arg(fcinfo, 1, "timeout");

	if (!advisory_take(name, true, wait))
		PG_RETURN_NULL();
	PG_RETURN_INT64(next_token());
}

/* advisory_unlock(name) → false if this session did not hold it. */
Datum
advisory_unlock(PG_FUNCTION_ARGS)
{
	text	   *name = name_arg(fcinfo, 0, "lock name");
	LOCKTAG		tag;

	advisory_tag(&tag, advisory_key(name));
	if (!LockHeldByMe_compat(&tag, ExclusiveLock))
		PG_RETURN_BOOL(false);	/* LockRelease would warn */
	PG_RETURN_BOOL(LockRelease(&tag, ExclusiveLock, true));
}

/* ---- the locks view ---- */

/* lock_key(name) → the 64-bit key an advisory helper lock on name uses. */
Datum
lock_key(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64((int64) advisory_key(PG_GETARG_TEXT_PP(0)));
}

/* lock_waiters() → (name, pid) of each session waiting in lock_acquire. */
Datum
lock_waiters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	if (!locks_shared)
		return (Datum) 0;
	for (i = 0; i < locks_shared->nslots; i++)
	{
		LockWaitSlot *slot = &locks_shared->slots[i];
		char		name[LOCK_NAME_MAX + 1];
		Datum		values[2];
		bool		nulls[2] = {false, false};

		if (pg_atomic_read_u32(&slot->waiting) == 0)
			continue;
		pg_read_barrier();
		strlcpy(name, slot->name, sizeof(name));
		values[0] = CStringGetTextDatum(name);
		values[1] = Int32GetDatum(slot->pid);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

typedef struct NameList
{
	ReturnSetInfo *rsinfo;
} NameList;

static void
emit_name(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	ReturnSetInfo *rsinfo = ((NameList *) arg)->rsinfo;
	Datum		values[2];
	bool		nulls[2] = {false, false};

	values[0] = Int64GetDatum((int64) ((AdvisoryName *) payload)->key);
	values[1] = PointerGetDatum(cstring_to_text_with_len(key, entry->keylen));
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/* advisory_lock_names() → (key, name) of names the helpers have locked. */
Datum
advisory_lock_names(PG_FUNCTION_ARGS)
{
	NameList	list;

	InitMaterializedSRF(fcinfo, 0);
	list.rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	if (advisory_names)
		shm_table_visit(advisory_names, emit_name, &list);
	return (Datum) 0;
}
