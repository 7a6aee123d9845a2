/*-------------------------------------------------------------------------
 *
 * idempotency.c
 *		Idempotency keys, the consumer inbox, and their reaper.
 *
 * Everything lives in two tables (resilience.idempotency_keys and
 * resilience.inbox) and is written in the caller's transaction, so a key and
 * the business effect it guards commit together, and a rollback forgets both.
 * Nothing here needs shared_preload_libraries.
 *
 * A key's states:
 *
 *	  (none) --begin: proceed--> started --complete--> completed
 *	  started --checkpoint--> started (new recovery point, lock renewed)
 *	  started --fail(retryable)--> retry --begin: proceed--> started
 *	  started --fail(not retryable)--> failed
 *	  started, lock expired --begin: proceed (takeover)--> started
 *	  any state, dead --begin: proceed (as new)--> started
 *
 * A row is dead once expires_at has passed, unless it is started and its lock
 * has not expired; begin treats a dead row as absent and the reaper deletes
 * dead rows, so the two agree on what exists whenever the reaper runs.
 *
 * begin, and how concurrent attempts are kept apart
 * -------------------------------------------------
 * 1. Read the row through the primary-key index with the statement's
 *	  snapshot, taking no lock.  A live completed or failed row with the same
 *	  fingerprint is replayed, another fingerprint is a mismatch, a started row
 *	  whose lock has not expired is in progress.  Replays therefore cost one
 *	  index probe and write nothing.
 * 2. Anything else may proceed: take the key's transaction-level lock (a
 *	  heavyweight advisory lock on a 64-bit hash of scope and key, in a key
 *	  space of its own: objsubid 4 in pg_locks), without waiting.  If another
 *	  transaction holds it, that transaction has begun the key and not ended:
 *	  in_progress (idempotent() waits for it instead, up to lock_timeout).
 *	  The lock is what makes an uncommitted begin visible to others.
 * 3. Holding the lock: a new key is inserted (ON CONFLICT DO NOTHING; a
 *	  conflict means the row appeared since step 1, so it is read again and
 *	  decided afresh); an existing row is locked with FOR UPDATE SKIP LOCKED
 *	  (a transaction that has updated it is a live attempt: in_progress,
 *	  without waiting), decided again on its newest version, then taken over
 *	  or reset.  On proceed the lock is kept until the transaction ends, so a
 *	  begin in a transaction that has not committed yet is never taken over.
 *
 * Hash collisions of the lock can only make two different keys wait for each
 * other (or report in_progress) while both are being begun: never a wrong
 * replay.  Under REPEATABLE READ or SERIALIZABLE, a key committed by another
 * transaction after the snapshot was taken raises 40001 at the insert.
 *
 * The clock
 * ---------
 * Lock expiry and ttl are wall-clock times stored in the row (other sessions,
 * other servers after failover, must understand them), read with
 * GetCurrentTimestamp() -- clock_timestamp(), never the transaction start
 * now(): in a long transaction now() would set a lock that is already in the
 * past for everyone else.  A clock stepped backwards delays expiry (a lock
 * is held longer); one stepped forwards expires locks early, so lock_timeout
 * should leave a wide margin over the longest phase (docs/idempotency.md).
 *
 * Privileges
 * ----------
 * Callers need no privilege on the tables.  Reads go straight to the primary
 * key index (no permission check, as for catalogs), unless Citus is
 * installed (citus_present(), src/resilience.c: the rows may live on other
 * nodes; they are then read through SPI, as the owner); each statement that
 * writes runs as the tables' owner (spi_connect_as_owner), and qualifies
 * every name and operator, so the caller's search_path cannot change what it
 * does.  None of these functions runs caller-supplied SQL: idempotent(),
 * which does, is PL/pgSQL and SECURITY INVOKER.  They are not SECURITY
 * DEFINER because that saves and restores search_path on every call, a few
 * percent of a replay (one index probe, which needs no privilege at all).
 * For the same reason the owner switch (privilege.c) is the one that does
 * not pin search_path: pinning it (set, then restore, and the plan cache's
 * search_path check each time) made begin + complete of a new key 31 ->
 * 38 us and inbox_accept 9.5 -> 11.3 us (best of 10 runs each, one backend,
 * 20,000 calls; 2026-12), about 20% for no gain, since every name and
 * operator below is qualified and no user code runs under the switch.
 *
 * Owners
 * ------
 * A key belongs to the role that began it (owner_role, the caller's
 * GetUserId() taken before the switch to the tables' owner; src/tenants.c
 * has the rule): only that role, the roles that have its privileges and
 * resilience_admin may replay, resume, checkpoint, complete or fail it.
 * Another role gets 42501 before anything about the row is told (no
 * replay, no mismatch, no in_progress, no state), and nothing changes, so
 * no role can pre-answer, or end, another role's keys.  The check is one Oid
 * compare when the caller is the owner (the common case); has_privs_of_role
 * runs only when they differ.  A dead row is absent for everyone (as for
 * the reaper), so begin restarts it as the caller's.  checkpoint, complete
 * and fail match only rows of the role they act as ($N); a miss re-reads
 * the row, refuses another role's key, and runs again as its owner when the
 * caller may act for it.  With Citus the rows live on workers, where the
 * same role has another oid: reads through SPI take the owner by name
 * (owner_role::text, resolved here), a regrole written from here reaches
 * the worker as a constant deparsed by name, and the transitions lock the
 * row and check its owner before updating it.  Keys from
 * 0.1 have no owner (NULL): any role may act on them, and the first begin
 * that resumes one records its caller.  On a 0.1 schema (the new library before ALTER EXTENSION ... UPDATE) there
 * is no owner_role column, and nothing is checked, as in 0.1.
 *
 *-------------------------------------------------------------------------
 */
#include "resilience.h"
#include "metrics.h"
#include "tenants.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include <openssl/evp.h>

/* Longest scope, key, consumer, message id or recovery point (Stripe's limit). */
#define MAX_NAME_CHARS 255

/* pg_locks objsubid of key locks (PostgreSQL's advisory locks use 1 and 2). */
#define KEY_LOCK_SPACE 4

/* Columns of resilience.idempotency_keys, in the order the table defines them. */
#define Anum_scope 1
#define Anum_key 2
#define Anum_fingerprint 3
#define Anum_state 4
#define Anum_recovery_point 5
#define Anum_response 6
#define Anum_status_code 7
#define Anum_error 8
#define Anum_locked_until 11
#define Anum_expires_at 14
#define Anum_owner_role 15		/* added by 0.2: absent on a 0.1 schema */
#define Anum_owner_name 16		/* owner_role::text, in what SPI reads return */

typedef enum KeyState
{
	KEY_ABSENT,
	KEY_STARTED,
	KEY_RETRY,
	KEY_COMPLETED,
	KEY_FAILED
} KeyState;

static const char *const key_state_names[] = {
	"absent", "started", "retry", "completed", "failed"
};

/* What begin tells its caller. */
typedef enum Outcome
{
	OUTCOME_PROCEED,
	OUTCOME_REPLAY,
	OUTCOME_IN_PROGRESS,
	OUTCOME_MISMATCH
} Outcome;

static const char *const outcome_names[] = {
	"proceed", "replay", "in_progress", "mismatch"
};

/* What begin must do about a row before it can answer. */
typedef enum Claim
{
	CLAIM_NONE,					/* the outcome is decided */
	CLAIM_NEW,					/* no row: insert one */
	CLAIM_RESET,				/* a dead row: start it afresh */
	CLAIM_TAKEOVER				/* a retry, or a lock that expired: resume */
} Claim;

/* The parts of a key row begin looks at, copied out of the table. */
typedef struct KeyRow
{
	KeyState	state;
	bool		same_request;
	bool		locked;			/* started and its lock has not expired */
	bool		dead;
	Datum		response;		/* the response, or the error of a failed key */
	bool		response_null;
	Datum		status_code;
	bool		status_code_null;
	Datum		recovery_point;
	bool		recovery_point_null;
	Oid			owner;			/* owner_role; InvalidOid: none (0.1) */
} KeyRow;

/* A validated call of begin. */
typedef struct BeginArgs
{
	text	   *scope;
	text	   *key;
	uint8		fingerprint[PG_SHA256_DIGEST_LENGTH];
	Interval   *lock_timeout;
	TimestampTz now;
	TimestampTz locked_until;
	TimestampTz expires_at;
	Oid			caller;			/* the calling role (GetUserId() on entry) */
} BeginArgs;

/* Prepared statements, kept for the life of the backend. */
typedef enum Statement
{
	STMT_INSERT,
	STMT_LOCK_ROW,
	STMT_RESTART,
	STMT_CHECKPOINT,
	STMT_COMPLETE,
	STMT_FAIL,
	STMT_INBOX,
	STMT_REAP_KEYS,
	STMT_REAP_INBOX,
	STMT_READ,
	STMT_REAP_KEYS_CITUS,
	STMT_REAP_INBOX_CITUS,
	STMT_LOCK_KEY,
	NUM_STATEMENTS
} Statement;

typedef struct StatementDef
{
	const char *sql;
	int			nargs;
	Oid			argtypes[9];
	const char *sql_0_1;		/* on a 0.1 schema (no owner_role), if different */
	bool		citus_0_1;		/* with Citus too (the owner checked first) */
} StatementDef;

#define KEY_MATCHES \
	" WHERE scope OPERATOR(pg_catalog.=) $1 AND key OPERATOR(pg_catalog.=) $2"

/* ... and owned by the role the call acts as ($n), or by nobody (a key from 0.1) */
#define OWNED_BY(n) \
	" AND (owner_role IS NULL OR owner_role::pg_catalog.oid OPERATOR(pg_catalog.=) $" #n ")"

/*
 * A key's row read through SPI, with its owner's name as one more column:
 * with Citus the row lives on a worker, where the role has another oid (a
 * regrole written from the coordinator reaches the worker as a constant,
 * deparsed by name), so the owner is read back by name.
 */
#define SELECT_ROW \
	"SELECT *, owner_role::pg_catalog.text FROM resilience.idempotency_keys" KEY_MATCHES

/* What a restart sets, on either schema ($3 to $8 as below) */
#define RESTART_SET \
	"UPDATE resilience.idempotency_keys SET" \
	" fingerprint = $3, state = 'started', response = NULL, status_code = NULL," \
	" recovery_point = CASE WHEN $8 THEN NULL ELSE recovery_point END," \
	" error = CASE WHEN $8 THEN NULL ELSE error END," \
	" attempts = CASE WHEN $8 THEN 1 ELSE attempts OPERATOR(pg_catalog.+) 1 END," \
	" created_at = CASE WHEN $8 THEN $6 ELSE created_at END," \
	" lock_timeout = $4, locked_until = $5, updated_at = $6, expires_at = $7"

static const StatementDef statements[NUM_STATEMENTS] = {
	/* $8: the owner, the calling role */
	[STMT_INSERT] = {
		"INSERT INTO resilience.idempotency_keys"
		" (scope, key, fingerprint, state, attempts, lock_timeout, locked_until,"
		"  created_at, updated_at, expires_at, owner_role)"
		" VALUES ($1, $2, $3, 'started', 1, $4, $5, $6, $6, $7, $8)"
		" ON CONFLICT (scope, key) DO NOTHING",
		8, {TEXTOID, TEXTOID, BYTEAOID, INTERVALOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
		TIMESTAMPTZOID, OIDOID},
		"INSERT INTO resilience.idempotency_keys"
		" (scope, key, fingerprint, state, attempts, lock_timeout, locked_until,"
		"  created_at, updated_at, expires_at)"
		" VALUES ($1, $2, $3, 'started', 1, $4, $5, $6, $6, $7)"
		" ON CONFLICT (scope, key) DO NOTHING"
	},
	[STMT_LOCK_ROW] = {
		SELECT_ROW " FOR UPDATE SKIP LOCKED",
		2, {TEXTOID, TEXTOID},
		"SELECT * FROM resilience.idempotency_keys" KEY_MATCHES
		" FOR UPDATE SKIP LOCKED"
	},
	/*
	 * $8: reset a dead row as new (true) or take over an attempt (false).
	 * $9: the calling role, the owner of a reset row (a new key) and of a
	 * key from 0.1 taken over; a taken-over key keeps its owner.
	 */
	[STMT_RESTART] = {
		RESTART_SET ","
		" owner_role = CASE WHEN $8 OR owner_role IS NULL THEN $9::pg_catalog.regrole"
		" ELSE owner_role END"
		KEY_MATCHES,
		9, {TEXTOID, TEXTOID, BYTEAOID, INTERVALOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
		TIMESTAMPTZOID, BOOLOID, OIDOID},
		RESTART_SET
		KEY_MATCHES
	},
	/* the transitions: the function's arguments, the time, the role acted as */
	[STMT_CHECKPOINT] = {
		"UPDATE resilience.idempotency_keys SET"
		" recovery_point = $3, updated_at = $4,"
		" locked_until = $4 OPERATOR(pg_catalog.+) lock_timeout"
		KEY_MATCHES " AND state OPERATOR(pg_catalog.=) 'started'" OWNED_BY(5),
		5, {TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, OIDOID},
		"UPDATE resilience.idempotency_keys SET"
		" recovery_point = $3, updated_at = $4,"
		" locked_until = $4 OPERATOR(pg_catalog.+) lock_timeout"
		KEY_MATCHES " AND state OPERATOR(pg_catalog.=) 'started'",
		true
	},
	[STMT_COMPLETE] = {
		"UPDATE resilience.idempotency_keys SET"
		" state = 'completed', response = $3, status_code = $4, locked_until = NULL,"
		" updated_at = $5"
		KEY_MATCHES " AND state OPERATOR(pg_catalog.=) 'started'" OWNED_BY(6),
		6, {TEXTOID, TEXTOID, JSONBOID, INT4OID, TIMESTAMPTZOID, OIDOID},
		"UPDATE resilience.idempotency_keys SET"
		" state = 'completed', response = $3, status_code = $4, locked_until = NULL,"
		" updated_at = $5"
		KEY_MATCHES " AND state OPERATOR(pg_catalog.=) 'started'",
		true
	},
	[STMT_FAIL] = {
		"UPDATE resilience.idempotency_keys SET"
		" state = CASE WHEN $4 THEN 'retry' ELSE 'failed' END,"
		" error = $3, status_code = $5, locked_until = NULL, updated_at = $6"
		KEY_MATCHES " AND state OPERATOR(pg_catalog.=) 'started'" OWNED_BY(7),
		7, {TEXTOID, TEXTOID, JSONBOID, BOOLOID, INT4OID, TIMESTAMPTZOID, OIDOID},
		"UPDATE resilience.idempotency_keys SET"
		" state = CASE WHEN $4 THEN 'retry' ELSE 'failed' END,"
		" error = $3, status_code = $5, locked_until = NULL, updated_at = $6"
		KEY_MATCHES " AND state OPERATOR(pg_catalog.=) 'started'",
		true
	},
	/* an expired row still waiting for the reaper counts as absent */
	[STMT_INBOX] = {
		"INSERT INTO resilience.inbox AS i (consumer, message_id, accepted_at, expires_at)"
		" VALUES ($1, $2, $3, $4)"
		" ON CONFLICT (consumer, message_id) DO UPDATE"
		" SET accepted_at = excluded.accepted_at, expires_at = excluded.expires_at"
		" WHERE i.expires_at OPERATOR(pg_catalog.<=) excluded.accepted_at",
		4, {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID}
	},
	/*
	 * One bounded batch: lock up to $2 dead rows, oldest first (the
	 * expires_at index), skipping any another transaction holds, and delete
	 * exactly those (by ctid, a TID scan).
	 */
	[STMT_REAP_KEYS] = {
		"DELETE FROM resilience.idempotency_keys"
		" WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY("
		"  SELECT ctid FROM resilience.idempotency_keys"
		"   WHERE expires_at OPERATOR(pg_catalog.<=) $1"
		"     AND (state OPERATOR(pg_catalog.<>) 'started'"
		"          OR locked_until OPERATOR(pg_catalog.<=) $1)"
		"   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
		2, {TIMESTAMPTZOID, INT8OID}
	},
	[STMT_REAP_INBOX] = {
		"DELETE FROM resilience.inbox"
		" WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY("
		"  SELECT ctid FROM resilience.inbox"
		"   WHERE expires_at OPERATOR(pg_catalog.<=) $1"
		"   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
		2, {TIMESTAMPTZOID, INT8OID}
	},
	/* a key's row through the executor, when Citus is installed (lookup_key) */
	[STMT_READ] = {
		SELECT_ROW,
		2, {TEXTOID, TEXTOID},
		"SELECT * FROM resilience.idempotency_keys" KEY_MATCHES
	},

	/*
	 * The reaper when Citus is installed: Citus runs neither ctid nor FOR
	 * UPDATE on a table distributed over several shards, so it deletes every
	 * dead row in one statement (one per shard, in parallel).  A row another
	 * transaction holds is waited for, not skipped; re-checked then, a key
	 * taken again meanwhile no longer matches and stays.
	 */
	[STMT_REAP_KEYS_CITUS] = {
		"DELETE FROM resilience.idempotency_keys"
		" WHERE expires_at OPERATOR(pg_catalog.<=) $1"
		"   AND (state OPERATOR(pg_catalog.<>) 'started'"
		"        OR locked_until OPERATOR(pg_catalog.<=) $1)",
		1, {TIMESTAMPTZOID}
	},
	[STMT_REAP_INBOX_CITUS] = {
		"DELETE FROM resilience.inbox"
		" WHERE expires_at OPERATOR(pg_catalog.<=) $1",
		1, {TIMESTAMPTZOID}
	},

	/*
	 * A transition when Citus is installed: Citus refuses owner_role::text
	 * (a STABLE function of a column) in an UPDATE, and owner_role's oid on
	 * the worker is not the coordinator's, so the row is locked and its
	 * owner checked first, then updated by the 0.1 form (citus_0_1).
	 */
	[STMT_LOCK_KEY] = {
		SELECT_ROW " FOR UPDATE",
		2, {TEXTOID, TEXTOID},
		"SELECT * FROM resilience.idempotency_keys" KEY_MATCHES " FOR UPDATE"
	},
};

static SPIPlanPtr plans[NUM_STATEMENTS];
static bool plan_for_0_1[NUM_STATEMENTS];	/* prepared from sql_0_1 */

PG_FUNCTION_INFO_V1(idempotency_begin);
PG_FUNCTION_INFO_V1(idempotency_begin_wait);
PG_FUNCTION_INFO_V1(idempotency_checkpoint);
PG_FUNCTION_INFO_V1(idempotency_complete);
PG_FUNCTION_INFO_V1(idempotency_fail);
PG_FUNCTION_INFO_V1(inbox_accept);
PG_FUNCTION_INFO_V1(idempotency_reap);
PG_FUNCTION_INFO_V1(inbox_reap);

/* ---- arguments ---- */

/* A name argument (scope, key, ...): not NULL, 1 to 255 characters. */
static text *
name_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	text	   *t;
	int			chars;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	t = PG_GETARG_TEXT_PP(argno);
	chars = pg_mbstrlen_with_len(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	if (chars == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (chars > MAX_NAME_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", what),
				 errdetail("It has %d characters; at most %d are allowed.",
						   chars, MAX_NAME_CHARS)));
	return t;
}

/* now + a positive interval argument (ttl, lock_timeout). */
static TimestampTz
after_arg(FunctionCallInfo fcinfo, int argno, const char *what, TimestampTz now)
{
	Interval   *iv;
	TimestampTz result;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	iv = PG_GETARG_INTERVAL_P(argno);
	result = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													 TimestampTzGetDatum(now),
													 IntervalPGetDatum(iv)));
	if (result <= now || TIMESTAMP_NOT_FINITE(result))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be positive", what),
				 errdetail("%s is %s.", what,
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(iv))))));
	return result;
}

/* An HTTP status code argument: NULL, or 100 to 599. */
static void
check_status_code(FunctionCallInfo fcinfo, int argno)
{
	int32		code;

	if (PG_ARGISNULL(argno))
		return;
	code = PG_GETARG_INT32(argno);
	if (code < 100 || code > 599)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("status_code must be between 100 and 599"),
				 errdetail("status_code is %d.", code),
				 errhint("Pass NULL when there is no HTTP status to store.")));
}

/*
 * SHA-256 of the request's canonical text: jsonb output orders object keys
 * and drops insignificant whitespace (and duplicate keys), so equal JSON
 * documents have equal fingerprints however they were written.
 *
 * OpenSSL directly, with the digest fetched once per backend and one context
 * reused: pg_cryptohash_create would look the algorithm up in OpenSSL's
 * provider table and allocate and register a context on every call, which
 * was a twentieth of a replay (docs/benchmarks.md).
 */
static void
fingerprint(Jsonb *request, uint8 *digest)
{
	static EVP_MD_CTX *ctx = NULL;
	static EVP_MD *sha256 = NULL;
	char	   *canonical = JsonbToCString(NULL, &request->root, VARSIZE(request));
	unsigned int len;

	if (ctx == NULL)
	{
		EVP_MD_CTX *c = EVP_MD_CTX_new();

		if (sha256 == NULL)
			sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
		if (c == NULL || sha256 == NULL)
		{
			EVP_MD_CTX_free(c);
			elog(ERROR, "could not set up the SHA-256 fingerprint of requests");
		}
		ctx = c;
	}
	if (EVP_DigestInit_ex(ctx, sha256, NULL) != 1 ||
		EVP_DigestUpdate(ctx, canonical, strlen(canonical)) != 1 ||
		EVP_DigestFinal_ex(ctx, digest, &len) != 1 ||
		len != PG_SHA256_DIGEST_LENGTH)
		elog(ERROR, "could not compute the SHA-256 fingerprint of the request");
	pfree(canonical);
}

/* Datum of a byte string as bytea. */
static Datum
bytea_datum(const uint8 *bytes, int len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), bytes, len);
	return PointerGetDatum(b);
}

/* ---- the tables ---- */

/* The state column's text as a KeyState. */
static KeyState
parse_state(Datum d)
{
	char	   *s = TextDatumGetCString(d);
	int			i;

	for (i = KEY_STARTED; i <= KEY_FAILED; i++)
		if (strcmp(s, key_state_names[i]) == 0)
			return (KeyState) i;
	elog(ERROR, "unexpected idempotency key state \"%s\"", s);
	return KEY_ABSENT;			/* keep the compiler quiet */
}

/* A column of a key row, copied (and detoasted) into row memory: it outlives the scan. */
static Datum
copy_column(TupleDesc desc, const Datum *values, const bool *nulls, int attnum, bool *isnull)
{
	*isnull = nulls[attnum - 1];
	if (*isnull)
		return (Datum) 0;
	if (TupleDescAttr(desc, attnum - 1)->attlen == -1)
		return PointerGetDatum(PG_DETOAST_DATUM_COPY(values[attnum - 1]));
	return values[attnum - 1];
}

/* Fill row from a key tuple (from an index scan, or a SELECT of the table). */
static void
read_row(HeapTuple tuple, TupleDesc desc, const BeginArgs *a, KeyRow *row)
{
	Datum		values[Anum_owner_name];
	bool		nulls[Anum_owner_name];
	bytea	   *fp;

	/*
	 * The columns of 0.2 (and the owner's name, from SPI), or of 0.1 (no
	 * owner_role).  Read through SPI, the owner is taken by name: with
	 * Citus the oid is the worker's.
	 */
	if (desc->natts < Anum_expires_at || desc->natts > Anum_owner_name)
		elog(ERROR, "resilience.idempotency_keys has %d columns, expected %d",
			 desc->natts, Anum_owner_role);
	heap_deform_tuple(tuple, desc, values, nulls);
	if (desc->natts < Anum_owner_role || nulls[Anum_owner_role - 1])
		row->owner = InvalidOid;
	else if (desc->natts == Anum_owner_name)
		row->owner = tenant_role_by_name(TextDatumGetCString(values[Anum_owner_name - 1]));
	else
		row->owner = DatumGetObjectId(values[Anum_owner_role - 1]);
	row->state = parse_state(values[Anum_state - 1]);
	fp = DatumGetByteaPP(values[Anum_fingerprint - 1]);
	row->same_request = a != NULL &&
		VARSIZE_ANY_EXHDR(fp) == PG_SHA256_DIGEST_LENGTH &&
		memcmp(VARDATA_ANY(fp), a->fingerprint, PG_SHA256_DIGEST_LENGTH) == 0;
	row->locked = row->state == KEY_STARTED && !nulls[Anum_locked_until - 1] &&
		a != NULL && DatumGetTimestampTz(values[Anum_locked_until - 1]) > a->now;
	row->dead = a != NULL && !row->locked &&
		DatumGetTimestampTz(values[Anum_expires_at - 1]) <= a->now;
	row->response = copy_column(desc, values, nulls,
								row->state == KEY_FAILED ? Anum_error : Anum_response,
								&row->response_null);
	row->status_code = copy_column(desc, values, nulls, Anum_status_code,
								   &row->status_code_null);
	row->recovery_point = copy_column(desc, values, nulls, Anum_recovery_point,
									  &row->recovery_point_null);
}

/*
 * The OIDs of the key table and its primary key, looked up once: a replay
 * is one index probe, and four catalog lookups were a visible part of it.
 * Forgotten when the table changes (or every relation does).
 */
static Oid	keys_relid = InvalidOid;
static Oid	keys_pkey_relid = InvalidOid;
static int	keys_owner_column = -1; /* has the table owner_role?  -1: not known */

static void
keys_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == keys_relid || relid == keys_pkey_relid)
	{
		keys_relid = keys_pkey_relid = InvalidOid;
		keys_owner_column = -1;
	}
}

static Oid
keys_table(Oid *pkey)
{
	static bool registered = false;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(keys_relcache_callback, (Datum) 0);
		registered = true;
	}
	if (!OidIsValid(keys_relid) || !OidIsValid(keys_pkey_relid))
	{
		keys_pkey_relid = resilience_relid("idempotency_keys_pkey");
		keys_relid = resilience_relid("idempotency_keys");
	}
	*pkey = keys_pkey_relid;
	return keys_relid;
}

/* Has resilience.idempotency_keys the column owner_role (a 0.2 schema)? */
static bool
keys_have_owner(void)
{
	if (keys_owner_column < 0)
	{
		Oid			pkey;
		Oid			relid = keys_table(&pkey);

		keys_owner_column = get_attnum(relid, "owner_role") != InvalidAttrNumber;
	}
	return keys_owner_column == 1;
}

static void spi_connect_as_owner(ResilienceUser *save);
static void spi_finish(const ResilienceUser *save);
static SPIPlanPtr statement_plan(Statement which);

/*
 * lookup_key through the executor, as the tables' owner: when Citus is
 * installed the rows may live on other nodes.  fresh: see everything
 * committed until now (a read-write SPI call takes a new snapshot), else
 * the statement's snapshot (read-only).
 */
static bool
lookup_key_spi(text *scope, text *key, bool fresh, const BeginArgs *a, KeyRow *row)
{
	MemoryContext caller_context = CurrentMemoryContext;
	ResilienceUser save;
	Datum		values[2];
	int			ret;

	values[0] = PointerGetDatum(scope);
	values[1] = PointerGetDatum(key);
	memset(row, 0, sizeof(KeyRow));
	row->state = KEY_ABSENT;
	spi_connect_as_owner(&save);
	ret = SPI_execute_plan(statement_plan(STMT_READ), values, NULL, !fresh, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_plan failed for \"%s\": %s",
			 statements[STMT_READ].sql, SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		MemoryContext spi_context = MemoryContextSwitchTo(caller_context);

		read_row(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, a, row);
		MemoryContextSwitchTo(spi_context);
	}
	spi_finish(&save);
	return row->state != KEY_ABSENT;
}

/*
 * Read the key row through the primary key with the given snapshot, taking
 * no row lock.  Returns false (row->state = KEY_ABSENT) if there is none.
 */
static bool
lookup_key(text *scope, text *key, Snapshot snapshot, const BeginArgs *a, KeyRow *row)
{
	Relation	rel;
	Oid			pkey;
	ScanKeyData skey[2];
	SysScanDesc scan;
	HeapTuple	tuple;

	if (citus_present())
		return lookup_key_spi(scope, key, false, a, row);
	rel = table_open(keys_table(&pkey), AccessShareLock);

	ScanKeyEntryInitialize(&skey[0], 0, Anum_scope, BTEqualStrategyNumber,
						   InvalidOid, C_COLLATION_OID, F_TEXTEQ, PointerGetDatum(scope));
	ScanKeyEntryInitialize(&skey[1], 0, Anum_key, BTEqualStrategyNumber,
						   InvalidOid, C_COLLATION_OID, F_TEXTEQ, PointerGetDatum(key));
	scan = systable_beginscan(rel, pkey, true, snapshot, 2, skey);
	tuple = systable_getnext(scan);
	memset(row, 0, sizeof(KeyRow));
	if (HeapTupleIsValid(tuple))
		read_row(tuple, RelationGetDescr(rel), a, row);
	else
		row->state = KEY_ABSENT;
	systable_endscan(scan);
	table_close(rel, NoLock);
	return row->state != KEY_ABSENT;
}

/* lookup_key with a snapshot that sees everything committed until now. */
static bool
lookup_key_now(text *scope, text *key, const BeginArgs *a, KeyRow *row)
{
	Snapshot	snapshot;
	bool		found;

	if (citus_present())
		return lookup_key_spi(scope, key, true, a, row);
	CommandCounterIncrement();
	snapshot = RegisterSnapshot(GetTransactionSnapshot());
	found = lookup_key(scope, key, snapshot, a, row);
	UnregisterSnapshot(snapshot);
	return found;
}

/*
 * SPI_connect, then act as the owner of the extension's tables until
 * spi_finish (as PostgreSQL's foreign-key triggers do), through the one
 * privilege helper (privilege.c): callers need no privilege on the tables.
 * search_path is not pinned, the one documented hot path that skips it (see
 * Privileges above): every statement below qualifies every name and
 * operator and runs no user code.  An error restores the caller's identity
 * with the (sub)transaction's abort.
 */
static void
spi_connect_as_owner(ResilienceUser *save)
{
	SPI_connect();
	resilience_become_owner(false, save);
}

/* Back to the caller's identity, and SPI_finish. */
static void
spi_finish(const ResilienceUser *save)
{
	resilience_restore_user(save);
	SPI_finish();
}

/*
 * The saved plan of a statement, prepared on first use (SPI connected):
 * the 0.1 form on a 0.1 schema (prepared again after the update), and for
 * the transitions with Citus.
 */
static SPIPlanPtr
statement_plan(Statement which)
{
	bool		old_schema = statements[which].sql_0_1 != NULL &&
		(!keys_have_owner() || (statements[which].citus_0_1 && citus_present()));

	if (plans[which] != NULL && plan_for_0_1[which] != old_schema)
	{
		SPI_freeplan(plans[which]);
		plans[which] = NULL;
	}
	if (plans[which] == NULL)
	{
		const char *sql = old_schema ? statements[which].sql_0_1 : statements[which].sql;
		SPIPlanPtr	plan = SPI_prepare(sql, statements[which].nargs,
									   (Oid *) statements[which].argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		plans[which] = plan;
		plan_for_0_1[which] = old_schema;
	}
	return plans[which];
}

/* Run a prepared statement (SPI connected); returns the rows it processed. */
static uint64
run(Statement which, Datum *values, const char *nulls)
{
	int			ret = SPI_execute_plan(statement_plan(which), values, nulls, false, 0);

	if (ret < 0)
		elog(ERROR, "SPI_execute_plan failed for \"%s\": %s",
			 statements[which].sql, SPI_result_code_string(ret));
	return SPI_processed;
}

/* ---- the key lock ---- */

/* The lock tag of a key: a 64-bit hash of scope and key, in our own key space. */
static void
key_locktag(LOCKTAG *tag, text *scope, text *key)
{
	uint64		h = hash_bytes_extended((unsigned char *) VARDATA_ANY(scope),
										VARSIZE_ANY_EXHDR(scope), 0);

	h = hash_bytes_extended((unsigned char *) VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key), h);
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (h >> 32), (uint32) h,
						 KEY_LOCK_SPACE);
}

/* Error context of a wait for a key's lock (a lock_timeout error says which key). */
static void
wait_error_context(void *arg)
{
	const BeginArgs *a = (const BeginArgs *) arg;

	errcontext("waiting for the transaction that holds idempotency key \"%s\" in scope \"%s\"",
			   text_to_cstring(a->key), text_to_cstring(a->scope));
}

/*
 * Take the key's lock until the end of the transaction.  Without wait, give
 * up at once if another transaction holds it; with wait, wait at most until
 * the lock_timeout of this call has passed (then raise 55P03).
 */
static bool
lock_key(const BeginArgs *a, bool wait)
{
	LOCKTAG		tag;
	int			nestlevel;
	char		timeout[32];
	ErrorContextCallback errcallback;

	key_locktag(&tag, a->scope, a->key);
	if (LockAcquire(&tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL)
		return true;
	if (!wait)
		return false;

	/* bound the wait the way SET LOCAL lock_timeout would, for this call only */
	snprintf(timeout, sizeof(timeout), INT64_FORMAT,
			 Max(Min((a->locked_until - a->now) / 1000, INT_MAX), 1));
	nestlevel = NewGUCNestLevel();
	(void) set_config_option("lock_timeout", timeout, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	errcallback.callback = wait_error_context;
	errcallback.arg = (void *) a;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
	error_context_stack = errcallback.previous;
	AtEOXact_GUC(true, nestlevel);
	return true;
}

/* Release the key's lock taken by lock_key (once: an earlier hold stays). */
static void
unlock_key(const BeginArgs *a)
{
	LOCKTAG		tag;

	key_locktag(&tag, a->scope, a->key);
	LockRelease(&tag, ExclusiveLock, false);
}

/* ---- owners ---- */

/*
 * Raise 42501: the key belongs to owner, and the caller may not act for it.
 * Says nothing about the row but its owner (tenant_deny's style, for a
 * thing that is not in resilience.owners and has no set_owner).
 */
static void
key_deny(text *scope, text *key, Oid owner, Oid caller)
{
	char	   *role = GetUserNameFromId(owner, true);

	if (role == NULL)
		role = psprintf("%u", owner);	/* a dropped role */
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied for idempotency key \"%s\" in scope \"%s\"",
					text_to_cstring(key), text_to_cstring(scope)),
			 errdetail("The key belongs to role \"%s\", which began it; only that role, its members and resilience_admin may use it.",
					   role),
			 errhint("Use keys in a scope of your own, or be granted membership in role \"%s\" (GRANT %s TO %s) or in resilience_admin.",
					 role, quote_identifier(role),
					 quote_identifier(GetUserNameFromId(caller, false)))));
}

/*
 * 42501 unless caller may act on a key owned by owner (InvalidOid: a key
 * from 0.1, anyone may).  The owner itself costs one compare.
 */
static inline void
key_check_owner(text *scope, text *key, Oid owner, Oid caller)
{
	if (OidIsValid(owner) && owner != caller && !tenant_may_act(caller, owner))
		key_deny(scope, key, owner, caller);
}

/* ---- begin ---- */

/*
 * What begin answers for row, or what it must do first (*outcome unset).
 * A live row of a role the caller may not act for is 42501 before anything
 * else is decided: its request, state and response stay untold.
 */
static Claim
decide(const BeginArgs *a, const KeyRow *row, Outcome *outcome)
{
	if (row->state == KEY_ABSENT)
		return CLAIM_NEW;
	if (row->dead)
		return CLAIM_RESET;
	key_check_owner(a->scope, a->key, row->owner, a->caller);
	if (!row->same_request)
		*outcome = OUTCOME_MISMATCH;
	else if (row->state == KEY_COMPLETED || row->state == KEY_FAILED)
		*outcome = OUTCOME_REPLAY;
	else if (row->locked)
		*outcome = OUTCOME_IN_PROGRESS;
	else
		return CLAIM_TAKEOVER;
	return CLAIM_NONE;
}

/*
 * Steps 2 and 3 of the header comment: lock the key and insert, reset or
 * take over its row.  Returns the outcome; row holds what a replay returns,
 * or the recovery point to resume from.
 */
static Outcome
claim_key(const BeginArgs *a, Claim claim, bool wait, KeyRow *row)
{
	Outcome		outcome = OUTCOME_IN_PROGRESS;
	Datum		values[9];
	char		nulls[9];
	MemoryContext caller_context = CurrentMemoryContext;
	MemoryContext spi_context;
	ResilienceUser save;

	if (!lock_key(a, wait))
		return OUTCOME_IN_PROGRESS;

	values[0] = PointerGetDatum(a->scope);
	values[1] = PointerGetDatum(a->key);
	values[2] = bytea_datum(a->fingerprint, PG_SHA256_DIGEST_LENGTH);
	values[3] = IntervalPGetDatum(a->lock_timeout);
	values[4] = TimestampTzGetDatum(a->locked_until);
	values[5] = TimestampTzGetDatum(a->now);
	values[6] = TimestampTzGetDatum(a->expires_at);
	values[7] = ObjectIdGetDatum(a->caller);	/* the owner of a new key */
	memset(nulls, ' ', sizeof(nulls));

	spi_connect_as_owner(&save);
	if (claim == CLAIM_NEW)
	{
		if (run(STMT_INSERT, values, nulls) == 1)
		{
			row->recovery_point_null = true;
			outcome = OUTCOME_PROCEED;
			goto done;
		}
		/* the row appeared since we looked: look again */
		spi_context = MemoryContextSwitchTo(caller_context);
		lookup_key_now(a->scope, a->key, a, row);
		MemoryContextSwitchTo(spi_context);
		claim = decide(a, row, &outcome);
		if (claim == CLAIM_NONE)
			goto done;
		if (claim == CLAIM_NEW)
		{
			/* inserted by a transaction we cannot see yet */
			outcome = OUTCOME_IN_PROGRESS;
			goto done;
		}
	}

	/* lock the row without waiting: a transaction that has updated it is a live attempt */
	if (run(STMT_LOCK_ROW, values, nulls) == 0)
	{
		outcome = OUTCOME_IN_PROGRESS;
		goto done;
	}
	spi_context = MemoryContextSwitchTo(caller_context);
	read_row(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, a, row);
	MemoryContextSwitchTo(spi_context);
	claim = decide(a, row, &outcome);
	if (claim == CLAIM_NONE)
		goto done;

	values[7] = BoolGetDatum(claim != CLAIM_TAKEOVER);
	values[8] = ObjectIdGetDatum(a->caller);
	run(STMT_RESTART, values, nulls);
	if (claim != CLAIM_TAKEOVER)
		row->recovery_point_null = true;
	outcome = OUTCOME_PROCEED;

done:
	spi_finish(&save);
	if (outcome != OUTCOME_PROCEED)
		unlock_key(a);
	return outcome;
}

/* idempotency_begin, waiting for a transaction holding the key or not. */
static Datum
begin_common(FunctionCallInfo fcinfo, bool wait)
{
	BeginArgs	a;
	KeyRow		row;
	Outcome		outcome = OUTCOME_IN_PROGRESS;
	Claim		claim;
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, true, true, true};

	a.caller = GetUserId();		/* SECURITY INVOKER: the calling role */
	a.scope = name_arg(fcinfo, 0, "scope");
	a.key = name_arg(fcinfo, 1, "key");
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("request must not be null"),
				 errhint("Pass the request's parameters as jsonb; '{}' if it has none.")));
	a.now = GetCurrentTimestamp();
	a.expires_at = after_arg(fcinfo, 3, "ttl", a.now);
	a.locked_until = after_arg(fcinfo, 4, "lock_timeout", a.now);
	a.lock_timeout = PG_GETARG_INTERVAL_P(4);
	fingerprint(PG_GETARG_JSONB_P(2), a.fingerprint);

	/* the result's descriptor, built once per call site */
	tupdesc = (TupleDesc) fcinfo->flinfo->fn_extra;
	if (tupdesc == NULL)
	{
		MemoryContext oldcontext = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);

		if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "return type must be a row type");
		tupdesc = BlessTupleDesc(tupdesc);
		fcinfo->flinfo->fn_extra = tupdesc;
		MemoryContextSwitchTo(oldcontext);
	}

	lookup_key(a.scope, a.key, GetActiveSnapshot(), &a, &row);
	claim = decide(&a, &row, &outcome);
	if (claim != CLAIM_NONE)
		outcome = claim_key(&a, claim, wait, &row);
	metrics_add(RC_IDEMPOTENCY_BEGINS, outcome, NULL, 1);

	values[0] = CStringGetTextDatum(outcome_names[outcome]);
	if (outcome == OUTCOME_REPLAY)
	{
		values[1] = row.response;
		nulls[1] = row.response_null;
		values[2] = row.status_code;
		nulls[2] = row.status_code_null;
	}
	if (outcome == OUTCOME_REPLAY || outcome == OUTCOME_PROCEED)
	{
		values[3] = row.recovery_point;
		nulls[3] = row.recovery_point_null;
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * idempotency_begin(scope, key, request, ttl, lock_timeout) →
 * (outcome, response, status_code, recovery_point).
 */
Datum
idempotency_begin(PG_FUNCTION_ARGS)
{
	return begin_common(fcinfo, false);
}

/* The same, waiting up to lock_timeout for a transaction holding the key. */
Datum
idempotency_begin_wait(PG_FUNCTION_ARGS)
{
	return begin_common(fcinfo, true);
}

/* ---- checkpoint, complete, fail ---- */

/*
 * Run a transition of a started key: the statement's parameters are the
 * function's arguments (validated by the caller), the time and the role it
 * acts as.  It acts as the caller, and matches only the caller's keys (and
 * keys from 0.1, which have no owner); on a miss, a key of another role is
 * 42501 unless the caller may act for that role, and then the statement
 * runs again as that role.  With Citus, the row is locked and its owner
 * checked before it is updated (see STMT_LOCK_KEY).  If no started row
 * matched, raise 42704 (never begun) or 55000 (in another state), having
 * changed nothing.
 */
static void
transition(FunctionCallInfo fcinfo, Statement which, const char *verb)
{
	text	   *scope = PG_GETARG_TEXT_PP(0);
	text	   *key = PG_GETARG_TEXT_PP(1);
	Oid			caller = GetUserId();	/* before the switch to the owner */
	Datum		values[8];
	char		nulls[8];
	KeyRow		row;
	uint64		n;
	int			i;
	ResilienceUser save;

	Assert(PG_NARGS() + 2 == statements[which].nargs);
	for (i = 0; i < PG_NARGS(); i++)
	{
		values[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
	values[i] = TimestampTzGetDatum(GetCurrentTimestamp());
	nulls[i] = ' ';
	values[i + 1] = ObjectIdGetDatum(caller);
	nulls[i + 1] = ' ';

	if (citus_present() && keys_have_owner())
	{
		/* lock the row and check its owner, then update it (STMT_LOCK_KEY) */
		MemoryContext caller_context = CurrentMemoryContext;
		bool		found = false;

		spi_connect_as_owner(&save);
		if (run(STMT_LOCK_KEY, values, nulls) == 1)
		{
			MemoryContext spi_context = MemoryContextSwitchTo(caller_context);

			read_row(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, NULL, &row);
			MemoryContextSwitchTo(spi_context);
			found = true;
		}
		spi_finish(&save);
		if (found)
			key_check_owner(scope, key, row.owner, caller);
		spi_connect_as_owner(&save);
		n = run(which, values, nulls);
		spi_finish(&save);
	}
	else
	{
		spi_connect_as_owner(&save);
		n = run(which, values, nulls);
		spi_finish(&save);
	}
	if (n == 0 && !citus_present() && lookup_key_now(scope, key, NULL, &row) &&
		OidIsValid(row.owner) && row.owner != caller)
	{
		/* another role's key: refused, or acted on as that role */
		key_check_owner(scope, key, row.owner, caller);
		values[i + 1] = ObjectIdGetDatum(row.owner);
		spi_connect_as_owner(&save);
		n = run(which, values, nulls);
		spi_finish(&save);
	}
	if (n == 1)
	{
		if (which == STMT_COMPLETE)
			metrics_add(RC_IDEMPOTENCY_RESULTS, RV_COMPLETED, NULL, 1);
		else if (which == STMT_FAIL)
			metrics_add(RC_IDEMPOTENCY_RESULTS,
						PG_GETARG_BOOL(3) ? RV_RETRY : RV_FAILED, NULL, 1);
		return;
	}

	if (!lookup_key_now(scope, key, NULL, &row))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("cannot %s idempotency key \"%s\" in scope \"%s\": it was never begun",
						verb, text_to_cstring(key), text_to_cstring(scope)),
				 errhint("Call resilience.idempotency_begin first, and go on only if its outcome is proceed.")));
	/* its state is told only to who may act on it (the owner may have changed) */
	key_check_owner(scope, key, row.owner, caller);
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("cannot %s idempotency key \"%s\" in scope \"%s\": its state is %s",
					verb, text_to_cstring(key), text_to_cstring(scope),
					key_state_names[row.state]),
			 errdetail("Only a key in progress (state started) can be checkpointed, completed or failed."),
			 row.state == KEY_RETRY ?
			 errhint("Its last attempt failed retryably: begin it again to proceed.") :
			 errhint("Its outcome is stored: resilience.idempotency_begin replays it.")));
}

/* idempotency_checkpoint(scope, key, recovery_point): record a phase, renew the lock. */
Datum
idempotency_checkpoint(PG_FUNCTION_ARGS)
{
	(void) name_arg(fcinfo, 0, "scope");
	(void) name_arg(fcinfo, 1, "key");
	(void) name_arg(fcinfo, 2, "recovery_point");
	transition(fcinfo, STMT_CHECKPOINT, "checkpoint");
	PG_RETURN_VOID();
}

/* idempotency_complete(scope, key, response, status_code): store the outcome. */
Datum
idempotency_complete(PG_FUNCTION_ARGS)
{
	(void) name_arg(fcinfo, 0, "scope");
	(void) name_arg(fcinfo, 1, "key");
	check_status_code(fcinfo, 3);
	transition(fcinfo, STMT_COMPLETE, "complete");
	PG_RETURN_VOID();
}

/*
 * idempotency_fail(scope, key, error, retryable, status_code): end the
 * attempt; a retryable failure leaves the key to the next begin (state
 * retry), any other is stored and replayed (state failed).
 */
Datum
idempotency_fail(PG_FUNCTION_ARGS)
{
	(void) name_arg(fcinfo, 0, "scope");
	(void) name_arg(fcinfo, 1, "key");
	if (PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("retryable must not be null"),
				 errhint("true lets the next attempt proceed; false stores the error and replays it.")));
	check_status_code(fcinfo, 4);
	transition(fcinfo, STMT_FAIL, "fail");
	PG_RETURN_VOID();
}

/* ---- inbox ---- */

/* inbox_accept(consumer, message_id, ttl): true the first time, false afterwards. */
Datum
inbox_accept(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTimestamp();
	Datum		values[4];
	uint64		n;
	ResilienceUser save;

	values[0] = PointerGetDatum(name_arg(fcinfo, 0, "consumer"));
	values[1] = PointerGetDatum(name_arg(fcinfo, 1, "message_id"));
	values[2] = TimestampTzGetDatum(now);
	values[3] = TimestampTzGetDatum(after_arg(fcinfo, 2, "ttl", now));

	spi_connect_as_owner(&save);
	/* only the consumer's owner role, its members and resilience_admin */
	tenant_claim(TENANT_INBOX_CONSUMER, VARDATA_ANY(DatumGetTextPP(values[0])),
				 VARSIZE_ANY_EXHDR(DatumGetTextPP(values[0])), save.userid);
	n = run(STMT_INBOX, values, "    ");
	spi_finish(&save);
	metrics_add(RC_INBOX_MESSAGES, n == 1 ? RV_ACCEPTED : RV_DUPLICATE, NULL, 1);
	PG_RETURN_BOOL(n == 1);
}

/* ---- the reaper ---- */

/*
 * Delete dead rows in batches of resilience.reaper_batch_size, at most
 * resilience.reaper_max_batches per call, each batch skipping rows another
 * transaction has locked.  Returns how many rows it deleted.
 */
static int64
reap(Statement which)
{
	int64		removed = 0;
	int			batch;
	ResilienceUser save;

	spi_connect_as_owner(&save);
	for (batch = 0; batch < resilience_reaper_max_batches; batch++)
	{
		Datum		values[2];
		uint64		n;

		CHECK_FOR_INTERRUPTS();
		values[0] = TimestampTzGetDatum(GetCurrentTimestamp());
		values[1] = Int64GetDatum(resilience_reaper_batch_size);
		if (citus_present())
		{
			/* one statement deletes them all (see STMT_REAP_KEYS_CITUS) */
			removed += run(which == STMT_REAP_KEYS ? STMT_REAP_KEYS_CITUS :
						   STMT_REAP_INBOX_CITUS, values, "  ");
			break;
		}
		n = run(which, values, "  ");
		removed += n;
		if (n < (uint64) resilience_reaper_batch_size)
			break;
	}
	spi_finish(&save);
	return removed;
}

/* _idempotency_reap() → number of expired keys deleted. */
Datum
idempotency_reap(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(reap(STMT_REAP_KEYS));
}

/* _inbox_reap() → number of expired inbox rows deleted. */
Datum
inbox_reap(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(reap(STMT_REAP_INBOX));
}
