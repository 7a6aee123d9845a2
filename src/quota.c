/*-------------------------------------------------------------------------
 *
 * quota.c
 *		Durable quotas: per-key usage counters per calendar period (hour,
 *		day, week, month, year in a time zone) or rolling interval, kept
 *		across crashes, immediate shutdowns and failover to a synchronous
 *		standby.
 *
 * Where the state lives, and why
 * ------------------------------
 * Shared memory (rate_limit) is fast but forgotten by a crash and not
 * replicated.  A table row per key updated by SQL is durable but costs a
 * new row version, an index update and a row lock held to the caller's
 * commit.  A quota needs neither MVCC history nor a lock across the
 * caller's transaction, only that the counter reaches WAL before the
 * decision's commit is acknowledged.  That is exactly what sequences do,
 * and this file does it the same way:
 *
 *	- Each key is one heap tuple of the logged table resilience.quota_usage
 *	  (period_start, period_end, used, limit, updated_at, policy, key).  The
 *	  tuple is frozen (xmin FrozenTransactionId, no xmax) and is updated IN
 *	  PLACE: the fixed-width columns come first, so their bytes never move.
 *	  No call creates a row version, so VACUUM has nothing to prune here and
 *	  the tuple's TID never changes.
 *	- A change is made under the buffer's exclusive content lock and logged
 *	  by this library's custom WAL resource manager (RegisterCustomRmgr,
 *	  PostgreSQL 15+, id RM_RESILIENCE_QUOTA_ID): a record of the tuple's
 *	  offset and its new 40-byte head, the block registered as usual so a
 *	  full-page image follows a checkpoint.  Generic WAL (which the first
 *	  version used) copies the page and computes a delta by comparing it
 *	  byte by byte: that was half of a decision's CPU time in one
 *	  transaction (docs/benchmarks.md).  The price: crash recovery, a
 *	  standby and pg_rewind need resilience in shared_preload_libraries
 *	  (which the extension needs anyway), and pg_waldump shows the records
 *	  as an unknown resource manager.  Adding a key (rare) still writes
 *	  one generic WAL record: the page gets a new tuple.
 *	- Not every decision writes a record: like nextval, a record logs a
 *	  few decisions ahead, and the decisions it covers change the page in
 *	  place without WAL (below, "Logging ahead").
 *	- The caller's commit is not acknowledged before the record that covers
 *	  its decisions is durable: a pre-commit callback flushes WAL up to it
 *	  (usually already done for a decision within a reservation) and waits
 *	  for the
 *	  synchronous standbys, as this session's synchronous_commit makes a
 *	  commit do.  Hence: every decision a committed transaction saw as
 *	  allowed is durable and on the synchronous standby.  nextval gets the
 *	  same effect by giving the transaction an xid, so that its commit
 *	  record's flush covers the sequence's record; a flush of our own saves
 *	  the xid, the commit record, the CLOG entry and the ProcArray work of a
 *	  transaction that only decides (measured: that is most of a call's
 *	  cost beyond SELECT 1).  A decision of a transaction that rolls back
 *	  stays counted (like nextval, it is not transactional) unless the
 *	  server crashes before anything flushes its WAL record.
 *	- A refused decision writes nothing: no WAL, no xid, no flush.
 *	- New keys: a frozen tuple is added to the last page (or a new page)
 *	  the same way, in one generic WAL record that also counts the first
 *	  decision.  Nothing happens in the caller's MVCC transaction, so no
 *	  lock outlives the call and a rollback does not remove the key.
 *
 * Finding a key's tuple: a shared hash (shmem.c's keyed table, sized by
 * resilience.quota_max_keys) maps (database, policy, key) to the tuple's
 * TID and the relation's file number.  It is only a cache of the table:
 * rebuilt by one scan of the table the first time a database is used after
 * start (or crash, or promotion), and again whenever the table's file
 * changes (TRUNCATE, VACUUM FULL, DROP/CREATE EXTENSION, restore).  Every
 * use checks, under the buffer lock, that the tuple at the TID is live and
 * holds the key; if not, the database's part of the hash is rebuilt.
 * Since the table has no index, a key missing from the hash is known to be
 * new only while the database's part of the hash is complete; if the hash
 * could not hold every row, new keys are refused (resilience.quota_when_full
 * decides how) rather than risk a second row for a key.
 *
 * Named policies (resilience.quota_policies: limit, period, tz) are read
 * by SPI once per backend and cached like rate-limit policies; a statement
 * trigger on the table invalidates every backend's cache at commit, and a
 * row trigger refuses rows that the functions' argument checks would
 * refuse.  A key under a policy is its own row (column policy).
 *
 * Logging ahead
 * -------------
 * A flushed WAL record per decision costs more than the decision (the
 * pwrite of the flush: docs/benchmarks.md).  So a decision that must log
 * logs used + ahead instead of used, ahead = min(resilience.quota_log_ahead
 * (default 32), limit / 64), never beyond the limit: a reservation.  The
 * page gets the true used (the record is made while the page holds the
 * logged value, so a full-page image in it has the reservation, as nextval
 * does it); the key's hash entry keeps the logged value and the record's
 * end.  The next decisions up to the logged value change the tuple in
 * place, mark the buffer dirty and write no WAL; their commit only makes
 * sure the reservation's record is durable (flushed, and on the
 * synchronous standbys), which it nearly always already is.  A decision
 * beyond the logged value, one that changes the period or the limit, and
 * quota_set/quota_reset log (the last two exactly).
 *
 * Why no admitted decision can be lost: the page holds the truth and the
 * last record of a key holds at least that.  A checkpoint writes the page
 * with every in-place change made before it starts writing buffers (the
 * buffer is dirtied before the redo pointer is compared, so a change that
 * saw the old redo pointer is in a buffer the checkpoint will write).
 * Changes after the checkpoint's redo pointer would be lost if crash
 * recovery started from a page that lacks them, so a decision in place
 * requires that the key's own reservation was logged after the current
 * redo pointer (GetRedoRecPtr): then recovery restores the page from the
 * full-page image of the first record after the redo pointer (at or before
 * the reservation) and replays the reservation over it.  Sequences test
 * the page's LSN instead; here a page holds 32 keys, and another key's
 * record after the checkpoint would leave a key whose reservation is older
 * with in-place changes no replayed record covers: so the test is per key.
 * Hence the condition full_page_writes = on: without images, recovery
 * skips a record that the page on disk (written after in-place changes)
 * is newer than, and the changes made after that write would be lost, so
 * with it off every decision is logged.  After turning full_page_writes
 * on, pages touched while it was off carry no image until the next
 * checkpoint: run one (docs/quotas.md).  A standby replays the records,
 * never sees the in-place changes, and so holds every key at its last
 * reservation: after a promotion, as after a crash, a key may be charged up
 * to ahead decisions that were never made, never fewer than were admitted.
 * A clean shutdown writes the pages: nothing is over-counted.  After any
 * restart the hash is rebuilt with no record known, so each key's first
 * decision logs.  limit / 64 bounds the over-count to 1.6 % of a small
 * limit (none below 64: every decision logs, exactly as before).
 *
 * So a call on an existing key is: a hash lookup under a partition lock in
 * shared mode, one buffer lock, a check, then either a second look at the
 * key's entry and an in-place change, or (one call in ahead + 1) a WAL
 * record of 48 bytes of data; the unlock.
 *
 * Locking rules:
 *	- Decisions on one key (on one page) are serialised by the buffer's
 *	  exclusive content lock; a peek (cost 0) takes it shared.  So never more
 *	  than limit is admitted, however many sessions race.
 *	- Inserting a key and (re)building a database's part of the hash happen
 *	  under the single LWLock QUOTA_LOAD_TRANCHE, exclusively; a hash entry
 *	  whose TID is invalid is a reservation made under it (or left by an
 *	  insert that failed): outside the lock it means "ask again under it".
 *	- Hash partition locks are held only for lookups and linking, never
 *	  across buffer I/O; one may be taken (shared) while a buffer lock is
 *	  held, never the other way round.
 *	- The table is opened with RowExclusiveLock, so TRUNCATE, VACUUM FULL
 *	  and CLUSTER (which change the file) wait for calls in flight.
 *
 * What protects the tuples: UPDATE and DELETE of resilience.quota_usage are
 * refused by a trigger (a new row version would leave the hash pointing at
 * a dead one; the check above would notice, but VACUUM might later shorten
 * the file); only the functions here change rows.  pg_dump carries the rows
 * (pg_extension_config_dump); a restore inserts them as ordinary rows,
 * which are found by the rebuild scan and then updated in place like ours.
 * pg_upgrade copies the file; frozen tuples need nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

/* before compat.h (through shmem.h): ExtendRelationLocked_compat needs them */
#include "storage/bufmgr.h"
#include "storage/lmgr.h"

#include "shmem.h"
#include "metrics.h"

#include "access/generic_xlog.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/rmgr.h"
#include "access/tableam.h"
#include "access/tupmacs.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xloginsert.h"
#include "access/xlogutils.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "storage/bufpage.h"
#include "storage/lwlock.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define QUOTA_PARTITIONS 64
#define QUOTA_TRANCHE "resilience_quotas"
#define QUOTA_LOAD_TRANCHE "resilience_quota_load"

#define KIND_QUOTA_KEY 1
#define KIND_QUOTA_DB 2			/* one per database: what the hash holds of it */

/*
 * Rows per page added here, for 256 bytes of disk per key.  Chosen when
 * every decision wrote generic WAL (its page comparison grows with the
 * used part of the page); it still keeps the full-page image a decision
 * writes after a checkpoint at about a third of a page (the free hole is
 * left out) and spreads hot keys over more buffer locks.
 */
#define QUOTA_ROWS_PER_PAGE 32

/* How often a call rebuilds the hash and retries before giving up. */
#define QUOTA_ATTEMPTS 4

/* resilience.quota_when_full */
typedef enum QuotaWhenFull
{
	QUOTA_FULL_DENY,
	QUOTA_FULL_ALLOW,
	QUOTA_FULL_ERROR
} QuotaWhenFull;

static const struct config_enum_entry quota_when_full_options[] = {
	{"deny", QUOTA_FULL_DENY, false},
	{"allow", QUOTA_FULL_ALLOW, false},
	{"error", QUOTA_FULL_ERROR, false},
	{NULL, 0, false}
};

static int	quota_max_keys = 100000;
static int	quota_when_full = QUOTA_FULL_DENY;

static int	quota_log_ahead = 32;

/*
 * The payload of a hash entry.  For a key: where its tuple is, in which
 * file of the table, and the key's last WAL record (see "Logging ahead").
 * For a database: the file the hash was loaded from, and whether every row
 * fitted.  Written only under the partition lock held exclusively (and the
 * load lock); read under it in any mode -- except logged and logged_lsn,
 * which a decision holding the tuple's buffer lock reads and writes under
 * the entry's spinlock with the partition lock held shared.
 */
typedef struct QuotaSlot
{
	Oid			relfile;
	BlockNumber blkno;			/* InvalidBlockNumber: a reservation */
	OffsetNumber offnum;
	bool		complete;
	int64		logged;			/* used as the key's last record has it */
	XLogRecPtr	logged_lsn;		/* that record's end; invalid: none known */
} QuotaSlot;

/*
 * The fixed-width head of a quota_usage tuple's data, the columns updated
 * in place.  All are 8-byte aligned and come first, so they sit at the
 * start of the data area whatever the variable-width columns hold.
 */
typedef struct QuotaRow
{
	TimestampTz period_start;
	TimestampTz period_end;
	int64		used;
	int64		quota_limit;
	TimestampTz updated_at;
} QuotaRow;

#define QUOTA_NCOLS 7
static const Oid quota_coltypes[QUOTA_NCOLS] = {
	TIMESTAMPTZOID, TIMESTAMPTZOID, INT8OID, INT8OID, TIMESTAMPTZOID,
	TEXTOID, TEXTOID
};

StaticAssertDecl(sizeof(QuotaRow) == 5 * sizeof(int64),
				 "QuotaRow must match the first five columns of quota_usage");

/* A tuple of quota_usage taken apart (pointers into the tuple). */
typedef struct QuotaTuple
{
	QuotaRow   *row;
	const char *policy;
	int			policylen;
	const char *key;
	int			keylen;
} QuotaTuple;

/* A period: a calendar unit in a time zone, or a rolling length. */
typedef struct QuotaPeriod
{
	const char *unit;			/* "day"...; NULL when rolling */
	int64		span;			/* rolling: microseconds */
	TimestampTz start;			/* the period a new count starts now */
	TimestampTz end;
} QuotaPeriod;

typedef enum QuotaOp
{
	QOP_CONSUME,				/* quota, quota_check */
	QOP_SET						/* quota_set, quota_reset */
} QuotaOp;

typedef struct QuotaRequest
{
	QuotaOp		op;
	const char *policy;
	int			policylen;
	const char *key;
	int			keylen;
	int64		limit;			/* CONSUME; SET under a policy (else 0) */
	int64		amount;			/* CONSUME: the cost; SET: the new usage */
	QuotaPeriod *period;		/* SET: NULL keeps the key's period */
	bool		create;			/* may add the key */
	TimestampTz now;
} QuotaRequest;

typedef struct QuotaResult
{
	bool		allowed;
	bool		tracked;		/* false: not in the table (new peek, full) */
	bool		existed;
	int64		used;
	TimestampTz resets_at;		/* DT_NOBEGIN: none */
	int64		limit;			/* the request's (set by quota_decide) */
	int64		cost;
} QuotaResult;

typedef enum QuotaLookup
{
	QL_FOUND,
	QL_ABSENT,					/* surely new */
	QL_ASK_UNDER_LOCK			/* not loaded, stale, reserved or incomplete */
} QuotaLookup;

/*
 * The custom WAL resource manager of a decision on an existing key (see
 * the header): the tuple's offset on the registered block and the new
 * fixed-width head.  The id is in the custom range (128 is
 * RM_EXPERIMENTAL_ID, for development only); docs/quotas.md says how a
 * collision with another library shows and what to do.
 */
#define RM_RESILIENCE_QUOTA_ID 187
#define XLOG_QUOTA_SET_ROW 0x00

typedef struct xl_quota_set_row
{
	OffsetNumber offnum;
	QuotaRow	row;			/* 8-byte fields: copied, never accessed in place */
} xl_quota_set_row;

#define SizeOfQuotaSetRow (offsetof(xl_quota_set_row, row) + sizeof(QuotaRow))

static RmgrData quota_rmgr;

static ShmTable *quota_table = NULL;
static LWLock *quota_load_lock = NULL;

/* This backend's lookup of resilience.quota_usage. */
static Oid	quota_relid = InvalidOid;
static Oid	quota_nspid = InvalidOid;

static pg_atomic_uint64 *quota_counters[2];

PG_FUNCTION_INFO_V1(quota);
PG_FUNCTION_INFO_V1(quota_check);
PG_FUNCTION_INFO_V1(quota_set);
PG_FUNCTION_INFO_V1(quota_reset);
PG_FUNCTION_INFO_V1(quota_usage_guard);
PG_FUNCTION_INFO_V1(quota_policy);
PG_FUNCTION_INFO_V1(quota_policy_check_decide);
PG_FUNCTION_INFO_V1(quota_policy_set);
PG_FUNCTION_INFO_V1(quota_policy_reset);
PG_FUNCTION_INFO_V1(quota_policy_check);

/* ---- settings and shared memory ---- */

/* Called from _PG_init while shared_preload_libraries is processed. */
void
quota_define_settings(void)
{
	DefineCustomIntVariable("resilience.quota_max_keys",
							"Number of quota keys (all databases) shared memory can locate.",
							"Each costs about 48 bytes plus resilience.max_key_length + 4.",
							&quota_max_keys,
							100000, 16, 50000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("resilience.quota_when_full",
							 "What quota does with a new key when resilience.quota_max_keys are in use.",
							 "deny refuses it, allow admits it uncounted, error raises 53200.",
							 &quota_when_full,
							 QUOTA_FULL_DENY, quota_when_full_options,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.quota_log_ahead",
							"Decisions a quota WAL record reserves beyond the one it logs.",
							"At most limit / 64 of a key; 0 logs every decision.  A crash may count up to this many decisions per key that were never made.",
							&quota_log_ahead,
							32, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	/* here because this runs only while shared_preload_libraries loads */
	RegisterCustomRmgr(RM_RESILIENCE_QUOTA_ID, &quota_rmgr);
}

static int
quota_hash_key_len(void)
{
	return (int) sizeof(Oid) + resilience_max_key_length;
}

Size
quota_shmem_size(void)
{
	/* one extra entry per database is not counted: 64 are added for them */
	return shm_table_size(quota_max_keys + 64, sizeof(QuotaSlot),
						  quota_hash_key_len());
}

void
quota_shmem_request(void)
{
	shm_table_request_locks(QUOTA_TRANCHE, QUOTA_PARTITIONS);
	RequestNamedLWLockTranche(QUOTA_LOAD_TRANCHE, 1);
}

void
quota_shmem_init(void)
{
	quota_table = shm_table_init("resilience quotas", quota_max_keys + 64,
								 sizeof(QuotaSlot), quota_hash_key_len(),
								 QUOTA_TRANCHE, QUOTA_PARTITIONS);
	quota_load_lock = &GetNamedLWLockTranche(QUOTA_LOAD_TRANCHE)->lock;
}

/* ---- the WAL resource manager ---- */

/*
 * Redo of a decision: write the logged head into the tuple.  The record
 * carries absolute values, so replaying it again, or over a full-page
 * image that already holds it (XLogReadBufferForRedo compares the page
 * LSN), leaves the same bytes.
 */
static void
quota_redo(XLogReaderState *record)
{
	uint8		info = XLogRecGetInfo(record) & ~XLR_INFO_MASK;
	xl_quota_set_row xlrec;
	Buffer		buf;

	if (info != XLOG_QUOTA_SET_ROW || XLogRecGetDataLen(record) != SizeOfQuotaSetRow)
		elog(PANIC, "resilience_quota redo: unknown record (info %u, length %u)",
			 info, (unsigned) XLogRecGetDataLen(record));
	memcpy(&xlrec, XLogRecGetData(record), SizeOfQuotaSetRow);
	if (XLogReadBufferForRedo(record, 0, &buf) == BLK_NEEDS_REDO)
	{
		Page		page = BufferGetPage(buf);
		ItemId		lp;
		HeapTupleHeader htup;

		if (xlrec.offnum < FirstOffsetNumber || xlrec.offnum > PageGetMaxOffsetNumber(page) ||
			!ItemIdIsNormal(lp = PageGetItemId(page, xlrec.offnum)) ||
			ItemIdGetLength(lp) < SizeofHeapTupleHeader + sizeof(QuotaRow))
			elog(PANIC, "resilience_quota redo: no quota row at offset %u", xlrec.offnum);
		htup = (HeapTupleHeader) PageGetItem(page, lp);
		memcpy((char *) htup + htup->t_hoff, &xlrec.row, sizeof(QuotaRow));
		PageSetLSN(page, record->EndRecPtr);
		MarkBufferDirty(buf);
	}
	if (BufferIsValid(buf))
		UnlockReleaseBuffer(buf);
}

static void
quota_desc(StringInfo buf, XLogReaderState *record)
{
	xl_quota_set_row xlrec;

	if (XLogRecGetDataLen(record) != SizeOfQuotaSetRow)
		return;
	memcpy(&xlrec, XLogRecGetData(record), SizeOfQuotaSetRow);
	appendStringInfo(buf, "off %u used " INT64_FORMAT " limit " INT64_FORMAT,
					 xlrec.offnum, xlrec.row.used, xlrec.row.quota_limit);
}

static const char *
quota_identify(uint8 info)
{
	return (info & ~XLR_INFO_MASK) == XLOG_QUOTA_SET_ROW ? "SET_ROW" : NULL;
}

static RmgrData quota_rmgr = {
	.rm_name = "resilience_quota",
	.rm_redo = quota_redo,
	.rm_desc = quota_desc,
	.rm_identify = quota_identify,
};

/*
 * Write next into the row at offnum of the exclusively locked buf and log
 * it with used = logged (>= next->used: the reservation); returns the
 * record's end.  As nextval does, the page holds the logged value while
 * the record is made, so a full-page image in it carries the reservation
 * too, and the true value after.
 */
static XLogRecPtr
quota_log_row(Buffer buf, OffsetNumber offnum, QuotaRow *row, const QuotaRow *next,
			  int64 logged)
{
	xl_quota_set_row xlrec;
	XLogRecPtr	lsn;

	xlrec.offnum = offnum;
	memcpy(&xlrec.row, next, sizeof(QuotaRow));
	xlrec.row.used = logged;
	START_CRIT_SECTION();
	memcpy(row, &xlrec.row, sizeof(QuotaRow));
	MarkBufferDirty(buf);
	XLogBeginInsert();
	XLogRegisterData((char *) &xlrec, SizeOfQuotaSetRow);
	XLogRegisterBuffer(0, buf, REGBUF_STANDARD);
	lsn = XLogInsert(RM_RESILIENCE_QUOTA_ID, XLOG_QUOTA_SET_ROW);
	PageSetLSN(BufferGetPage(buf), lsn);
	row->used = next->used;
	END_CRIT_SECTION();
	return lsn;
}

/* ---- the table ---- */

/* Is rel resilience.quota_usage, with the columns this code writes? */
static bool
quota_rel_ok(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			i;

	if (rel->rd_rel->relkind != RELKIND_RELATION ||
		RelationGetNamespace(rel) != quota_nspid ||
		strcmp(RelationGetRelationName(rel), "quota_usage") != 0 ||
		!RelationNeedsWAL(rel) ||
		desc->natts != QUOTA_NCOLS)
		return false;
	for (i = 0; i < QUOTA_NCOLS; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || att->atttypid != quota_coltypes[i] || !att->attnotnull)
			return false;
	}
	return true;
}

/* Open resilience.quota_usage with RowExclusiveLock (see the header). */
static Relation
quota_open(void)
{
	Relation	rel = NULL;

	if (OidIsValid(quota_relid))
	{
		rel = try_relation_open(quota_relid, RowExclusiveLock);
		if (rel != NULL && !quota_rel_ok(rel))
		{
			relation_close(rel, RowExclusiveLock);
			rel = NULL;
		}
	}
	if (rel == NULL)
	{
		quota_relid = resilience_relid("quota_usage");
		quota_nspid = get_rel_namespace(quota_relid);
		rel = relation_open(quota_relid, RowExclusiveLock);
		if (!quota_rel_ok(rel))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("resilience.quota_usage does not have the expected columns"),
					 errhint("Reinstall the extension: DROP EXTENSION resilience; CREATE EXTENSION resilience.")));
	}
	return rel;
}

/* Read a text column at *off of a tuple's data of len bytes. */
static bool
quota_text_at(char *data, uint32 len, uint32 *off, const char **str, int *slen)
{
	char	   *p;

	if (*off >= len)
		return false;
	*off = att_align_pointer(*off, TYPALIGN_INT, -1, data + *off);
	if (*off >= len)
		return false;
	p = data + *off;
	if (VARATT_IS_EXTENDED(p) && !VARATT_IS_SHORT(p))
		return false;			/* compressed or external: never written here */
	if (*off + VARSIZE_ANY(p) > len)
		return false;
	*str = VARDATA_ANY(p);
	*slen = VARSIZE_ANY_EXHDR(p);
	*off += VARSIZE_ANY(p);
	return true;
}

/*
 * Take a live quota_usage tuple of len bytes apart; false if it is not one
 * (deleted or updated, wrong shape).
 */
static bool
quota_parse(HeapTupleHeader htup, uint32 len, QuotaTuple *qt)
{
	char	   *data;
	uint32		datalen;
	uint32		off = sizeof(QuotaRow);

	if (!(htup->t_infomask & HEAP_XMAX_INVALID) &&
		!HEAP_XMAX_IS_LOCKED_ONLY(htup->t_infomask))
		return false;
	if (HeapTupleHeaderGetNatts(htup) != QUOTA_NCOLS ||
		(htup->t_infomask & HEAP_HASNULL) || htup->t_hoff >= len)
		return false;
	data = (char *) htup + htup->t_hoff;
	datalen = len - htup->t_hoff;
	if (datalen < sizeof(QuotaRow))
		return false;
	qt->row = (QuotaRow *) data;
	return quota_text_at(data, datalen, &off, &qt->policy, &qt->policylen) &&
		quota_text_at(data, datalen, &off, &qt->key, &qt->keylen);
}

/* The tuple at offnum of page if it is the live row of (policy, key). */
static QuotaRow *
quota_row_at(Page page, OffsetNumber offnum, const QuotaRequest *req)
{
	ItemId		lp;
	QuotaTuple	qt;

	if (offnum < FirstOffsetNumber || offnum > PageGetMaxOffsetNumber(page))
		return NULL;
	lp = PageGetItemId(page, offnum);
	if (!ItemIdIsNormal(lp) ||
		!quota_parse((HeapTupleHeader) PageGetItem(page, lp), ItemIdGetLength(lp), &qt))
		return NULL;
	if (qt.keylen != req->keylen || qt.policylen != req->policylen ||
		memcmp(qt.key, req->key, req->keylen) != 0 ||
		memcmp(qt.policy, req->policy, req->policylen) != 0)
		return NULL;
	return qt.row;
}

/* ---- the hash ---- */

/* The hash key of (database, policy, key): dboid, then [policy NUL] key. */
static int
quota_hash_key(char *buf, const char *policy, int policylen,
			   const char *key, int keylen)
{
	int			len = sizeof(Oid);

	memcpy(buf, &MyDatabaseId, sizeof(Oid));
	if (policylen > 0)
	{
		memcpy(buf + len, policy, policylen);
		len += policylen;
		buf[len++] = '\0';
	}
	memcpy(buf + len, key, keylen);
	return len + keylen;
}

/*
 * Where is the key's tuple?  *reserved: the key's entry is a reservation
 * (under the load lock: one left by an insert that failed).
 */
static QuotaLookup
quota_lookup(const char *hkey, int hlen, Oid relfile, ItemPointer tid,
			 bool *reserved)
{
	uint32		hash = shm_table_hash(KIND_QUOTA_KEY, hkey, hlen);
	LWLock	   *lock = shm_table_lock(quota_table, hash);
	ShmEntry   *entry;
	QuotaLookup result = QL_ASK_UNDER_LOCK;
	bool		in_hash = false;

	*reserved = false;

	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(quota_table, hash, KIND_QUOTA_KEY, hkey, hlen);
	if (entry)
	{
		QuotaSlot  *slot = shm_entry_payload(quota_table, entry);

		in_hash = true;
		*reserved = slot->relfile == relfile && !BlockNumberIsValid(slot->blkno);
		if (slot->relfile == relfile && BlockNumberIsValid(slot->blkno))
		{
			ItemPointerSet(tid, slot->blkno, slot->offnum);
			result = QL_FOUND;
		}
	}
	LWLockRelease(lock);
	if (in_hash)
		return result;

	/* not there: surely new only if this database's rows are all loaded */
	hash = shm_table_hash(KIND_QUOTA_DB, (const char *) &MyDatabaseId, sizeof(Oid));
	lock = shm_table_lock(quota_table, hash);
	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(quota_table, hash, KIND_QUOTA_DB,
						   (const char *) &MyDatabaseId, sizeof(Oid));
	if (entry)
	{
		QuotaSlot  *slot = shm_entry_payload(quota_table, entry);

		if (slot->relfile == relfile && slot->complete)
			result = QL_ABSENT;
	}
	LWLockRelease(lock);
	return result;
}

/* Set an entry's payload; returns false if the hash is full. */
static bool
quota_hash_set(uint8 kind, const char *hkey, int hlen, const QuotaSlot *value,
			   bool *found)
{
	uint32		hash = shm_table_hash(kind, hkey, hlen);
	ShmEntry   *entry;

	entry = shm_table_enter(quota_table, hash, kind, hkey, hlen, false, NULL, found);
	if (entry == NULL)
		return false;
	memcpy(shm_entry_payload(quota_table, entry), value, sizeof(QuotaSlot));
	LWLockRelease(shm_table_lock(quota_table, hash));
	return true;
}

typedef struct QuotaPurge
{
	List	   *keys;			/* of bytea-like palloc'd copies */
} QuotaPurge;

static void
quota_collect_db(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	QuotaPurge *purge = arg;

	if (entry->kind == KIND_QUOTA_KEY &&
		memcmp(key, &MyDatabaseId, sizeof(Oid)) == 0)
	{
		bytea	   *copy = palloc(VARHDRSZ + entry->keylen);

		SET_VARSIZE(copy, VARHDRSZ + entry->keylen);
		memcpy(VARDATA(copy), key, entry->keylen);
		purge->keys = lappend(purge->keys, copy);
	}
}

/*
 * (Re)build this database's part of the hash from the table, unless it was
 * built from the table's current file already (force: rebuild anyway).
 * The caller holds the load lock exclusively.
 */
static void
quota_load(Relation rel, bool force)
{
	Oid			relfile = RelationGetRelFileNumber_compat(rel);
	uint32		dbhash = shm_table_hash(KIND_QUOTA_DB, (const char *) &MyDatabaseId, sizeof(Oid));
	LWLock	   *dblock = shm_table_lock(quota_table, dbhash);
	ShmEntry   *entry;
	bool		loaded = false;
	QuotaPurge	purge = {NIL};
	ListCell   *lc;
	Snapshot	snapshot;
	TableScanDesc scan;
	HeapTuple	tuple;
	QuotaSlot	db = {relfile, InvalidBlockNumber, InvalidOffsetNumber, true, 0,
	InvalidXLogRecPtr};
	char	   *hkey = palloc(quota_hash_key_len());
	bool		found;
	int64		duplicates = 0;

	LWLockAcquire(dblock, LW_SHARED);
	entry = shm_table_find(quota_table, dbhash, KIND_QUOTA_DB,
						   (const char *) &MyDatabaseId, sizeof(Oid));
	if (entry)
		loaded = ((QuotaSlot *) shm_entry_payload(quota_table, entry))->relfile == relfile;
	LWLockRelease(dblock);
	if (loaded && !force)
		return;

	/* forget what the hash held of this database */
	shm_table_visit(quota_table, quota_collect_db, &purge);
	foreach(lc, purge.keys)
	{
		bytea	   *k = lfirst(lc);

		shm_table_remove(quota_table,
						 shm_table_hash(KIND_QUOTA_KEY, VARDATA(k), VARSIZE(k) - VARHDRSZ),
						 KIND_QUOTA_KEY, VARDATA(k), VARSIZE(k) - VARHDRSZ);
	}
	list_free_deep(purge.keys);

	snapshot = RegisterSnapshot(GetLatestSnapshot());
	scan = table_beginscan(rel, snapshot, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		QuotaTuple	qt;
		QuotaSlot	slot;
		int			hlen;

		if (!quota_parse(tuple->t_data, tuple->t_len, &qt) ||
			qt.policylen + (qt.policylen > 0 ? 1 : 0) + qt.keylen > resilience_max_key_length)
			continue;			/* not usable: its key will be refused anyway */
		hlen = quota_hash_key(hkey, qt.policy, qt.policylen, qt.key, qt.keylen);
		slot.relfile = relfile;
		slot.blkno = ItemPointerGetBlockNumber(&tuple->t_self);
		slot.offnum = ItemPointerGetOffsetNumber(&tuple->t_self);
		slot.complete = true;
		/* no record known: the key's next decision logs */
		slot.logged = qt.row->used;
		slot.logged_lsn = InvalidXLogRecPtr;
		if (!quota_hash_set(KIND_QUOTA_KEY, hkey, hlen, &slot, &found))
		{
			db.complete = false;
			break;
		}
		if (found)
			duplicates++;
	}
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	pfree(hkey);

	if (!quota_hash_set(KIND_QUOTA_DB, (const char *) &MyDatabaseId, sizeof(Oid), &db, &found))
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("quota table is full"),
				 errdetail("Not even this database's entry fits in resilience.quota_max_keys (%d).",
						   quota_max_keys)));
	if (!db.complete)
		ereport(WARNING,
				(errmsg("resilience.quota_usage holds more keys than resilience.quota_max_keys (%d)",
						quota_max_keys),
				 errdetail("New quota keys in this database are refused (resilience.quota_when_full) until it is raised.")));
	if (duplicates > 0)
		ereport(WARNING,
				(errmsg("resilience.quota_usage holds %lld duplicate keys; the last row of each is used",
						(long long) duplicates)));
}

/* ---- durability at commit ---- */

/*
 * The end of this transaction's last quota WAL record: its commit (or
 * PREPARE) must not be acknowledged before that is durable.
 */
static XLogRecPtr quota_commit_lsn = InvalidXLogRecPtr;
static bool quota_callback_registered = false;

/*
 * Make WAL up to lsn as durable as this session's synchronous_commit makes
 * a commit: written and flushed (local and above), and flushed by the
 * synchronous standbys (on and above), or only handed to the WAL writer
 * (off).  A cancelled or timed-out wait for the standbys raises an error
 * here, before the commit, instead of the WARNING a commit gives after it:
 * the caller never sees a commit whose decisions a promoted standby lacks.
 */
static void
quota_make_durable(XLogRecPtr lsn)
{
	if (synchronous_commit <= SYNCHRONOUS_COMMIT_OFF)
	{
		XLogSetAsyncXactLSN(lsn);
		return;
	}
	/* returns at once if lsn is flushed: usually so within a reservation */
	XLogFlush(lsn);
	/* unlocked first, as SyncRepWaitForLSN does: no standbys, no lock */
	if (max_wal_senders == 0 || synchronous_commit <= SYNCHRONOUS_COMMIT_LOCAL_FLUSH ||
		!sync_standbys_defined_compat() || sync_standbys_flushed(lsn))
		return;
	HOLD_INTERRUPTS();			/* as at commit: the wait handles them itself */
	SyncRepWaitForLSN(lsn, false);
	RESUME_INTERRUPTS();
	CHECK_FOR_INTERRUPTS();
	if (!sync_standbys_flushed(lsn))
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("the transaction was not committed: the synchronous standby has not confirmed its quota decisions"),
				 errdetail("The wait for synchronous replication was cancelled or timed out."),
				 errhint("The decisions stay counted; retry.")));
}

static void
quota_xact_callback(XactEvent event, void *arg)
{
	XLogRecPtr	lsn = quota_commit_lsn;

	quota_commit_lsn = InvalidXLogRecPtr;
	if ((event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PRE_PREPARE) &&
		!XLogRecPtrIsInvalid(lsn))
		quota_make_durable(lsn);
}

/*
 * Have the caller's commit wait for lsn.  Instead of giving the transaction
 * an xid (as nextval does) so that its commit record flushes ours: a
 * transaction that only decides needs no commit record, CLOG entry or xid.
 */
static void
quota_flush_at_commit(XLogRecPtr lsn)
{
	if (!quota_callback_registered)
	{
		RegisterXactCallback(quota_xact_callback, NULL);
		quota_callback_registered = true;
	}
	if (lsn > quota_commit_lsn)
		quota_commit_lsn = lsn;
}

/* The new state of a row for req, given what it holds; false: refused. */
static bool
quota_next_state(const QuotaRequest *req, const QuotaRow *old, QuotaRow *new)
{
	bool		ended = old != NULL && req->now >= old->period_end;

	if (old != NULL)
		*new = *old;
	else
	{
		new->used = 0;
		new->quota_limit = 0;
	}
	new->updated_at = req->now;
	if (req->op == QOP_SET)
	{
		if (req->period)
		{
			new->period_start = req->period->start;
			new->period_end = req->period->end;
		}
		if (req->limit > 0)		/* under a policy: its limit is known */
			new->quota_limit = req->limit;
		new->used = req->amount;
		return true;
	}
	if (old == NULL || ended)
	{
		new->period_start = req->period->start;
		new->period_end = req->period->end;
		new->used = 0;
	}
	new->quota_limit = req->limit;
	/* a peek (cost 0) asks whether a cost-1 request would be admitted */
	if (new->used > req->limit - Max(req->amount, 1))
		return false;
	new->used += req->amount;
	return true;
}

/* ---- logging ahead ---- */

/*
 * The used value to log for a row about to hold next: next's own, or for
 * a decision up to min(resilience.quota_log_ahead, limit / 64) more, never
 * beyond the limit.  Only while full_page_writes is on (see the header).
 */
static int64
quota_reserve(const QuotaRequest *req, const QuotaRow *next)
{
	int64		ahead;

	if (req->op != QOP_CONSUME || !fullPageWrites)
		return next->used;
	ahead = Min((int64) quota_log_ahead, req->limit / 64);
	if (next->used >= req->limit - ahead)
		return Max(next->used, req->limit);
	return next->used + ahead;
}

/*
 * Read (store false) or write (store true) the logged value and record of
 * the key's hash entry, if the entry still points at tid in relfile.  The
 * caller holds the tuple's buffer lock exclusively: that serialises the
 * key's decisions; the spinlock keeps a reader of the other fields whole.
 */
static bool
quota_slot_logged(const char *hkey, int hlen, Oid relfile, ItemPointer tid,
				  bool store, int64 *logged, XLogRecPtr *lsn)
{
	uint32		hash = shm_table_hash(KIND_QUOTA_KEY, hkey, hlen);
	LWLock	   *lock = shm_table_lock(quota_table, hash);
	ShmEntry   *entry;
	bool		found = false;

	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(quota_table, hash, KIND_QUOTA_KEY, hkey, hlen);
	if (entry)
	{
		QuotaSlot  *slot = shm_entry_payload(quota_table, entry);

		SpinLockAcquire(&entry->mutex);
		found = slot->relfile == relfile &&
			slot->blkno == ItemPointerGetBlockNumber(tid) &&
			slot->offnum == ItemPointerGetOffsetNumber(tid);
		if (found && store)
		{
			slot->logged = *logged;
			slot->logged_lsn = *lsn;
		}
		else if (found)
		{
			*logged = slot->logged;
			*lsn = slot->logged_lsn;
		}
		SpinLockRelease(&entry->mutex);
	}
	LWLockRelease(lock);
	return found;
}

/*
 * May a decision taking row to next skip its WAL record?  Only if the
 * key's last record reserved next's usage for the same period and limit,
 * and was written after the last checkpoint's redo pointer (so that crash
 * recovery replays it, over a full-page image of the page taken at or
 * before it); returns that record's end in *lsn.
 */
static bool
quota_within_reservation(const char *hkey, int hlen, Oid relfile, ItemPointer tid,
						 const QuotaRow *row, const QuotaRow *next, XLogRecPtr *lsn)
{
	int64		logged;

	if (!fullPageWrites ||
		next->period_start != row->period_start || next->period_end != row->period_end ||
		next->quota_limit != row->quota_limit ||
		!quota_slot_logged(hkey, hlen, relfile, tid, false, &logged, lsn))
		return false;
	return !XLogRecPtrIsInvalid(*lsn) && next->used <= logged &&
		*lsn > GetRedoRecPtr();
}

/* ---- changing a tuple ---- */

/*
 * Apply req to the tuple at tid (hash key hkey); false if that is not the
 * key's tuple any more (the caller rebuilds the hash and asks again).
 */
static bool
quota_apply(Relation rel, const char *hkey, int hlen, ItemPointer tid,
			const QuotaRequest *req, QuotaResult *res)
{
	bool		write = req->op == QOP_SET || req->amount > 0;
	Oid			relfile = RelationGetRelFileNumber_compat(rel);
	Buffer		buf;
	QuotaRow   *row;
	QuotaRow	next;
	bool		allowed;
	XLogRecPtr	lsn;

	/*
	 * No check against the relation's length (an lseek per call): rows are
	 * never deleted (the guard trigger), so VACUUM cannot shorten the file
	 * under a TID the hash holds, and a new file is noticed by its number.
	 */
	buf = ReadBuffer(rel, ItemPointerGetBlockNumber(tid));
	LockBuffer(buf, write ? BUFFER_LOCK_EXCLUSIVE : BUFFER_LOCK_SHARE);
	row = quota_row_at(BufferGetPage(buf), ItemPointerGetOffsetNumber(tid), req);
	if (row == NULL)
	{
		UnlockReleaseBuffer(buf);
		return false;
	}
	allowed = quota_next_state(req, row, &next);
	res->tracked = true;
	res->existed = true;
	res->allowed = allowed;
	res->used = allowed ? next.used : (req->now >= row->period_end ? 0 : row->used);
	res->resets_at = allowed ? next.period_end :
		(req->now >= row->period_end ? req->period->end : row->period_end);
	if (write && allowed)
	{
		/*
		 * Dirty before the redo pointer is read (quota_within_reservation):
		 * if a checkpoint's redo pointer is still the old one there, its
		 * buffer sync starts later and finds the buffer dirty, so it writes
		 * the change made in place (transam/README, SyncOneBuffer).
		 */
		MarkBufferDirty(buf);
	}
	if (write && allowed &&
		req->op == QOP_CONSUME &&
		quota_within_reservation(hkey, hlen, relfile, tid, row, &next, &lsn))
	{
		/* in place, no WAL: the record that reserved it must be durable */
		memcpy(row, &next, sizeof(QuotaRow));
		quota_flush_at_commit(lsn);
	}
	else if (write && allowed)
	{
		int64		logged = quota_reserve(req, &next);

		lsn = quota_log_row(buf, ItemPointerGetOffsetNumber(tid), row, &next, logged);
		quota_flush_at_commit(lsn);
		(void) quota_slot_logged(hkey, hlen, relfile, tid, true, &logged, &lsn);
	}
	UnlockReleaseBuffer(buf);
	return true;
}

/*
 * Add the key's tuple (frozen, outside the caller's transaction) holding
 * the state after req, logged with used = logged (a reservation, as in
 * quota_log_row); return its TID and the record's end.  The caller holds
 * the load lock.
 */
static XLogRecPtr
quota_insert(Relation rel, const QuotaRequest *req, const QuotaRow *state,
			 int64 logged, ItemPointer tid)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Datum		values[QUOTA_NCOLS];
	bool		nulls[QUOTA_NCOLS] = {false};
	HeapTuple	tuple;
	Size		len;
	BlockNumber nblocks = RelationGetNumberOfBlocks(rel);
	Buffer		buf = InvalidBuffer;
	bool		fresh = false;
	GenericXLogState *xlog;
	Page		page;
	OffsetNumber offnum;
	HeapTupleHeader htup;
	XLogRecPtr	lsn;

	values[0] = TimestampTzGetDatum(state->period_start);
	values[1] = TimestampTzGetDatum(state->period_end);
	values[2] = Int64GetDatum(logged);
	values[3] = Int64GetDatum(state->quota_limit);
	values[4] = TimestampTzGetDatum(state->updated_at);
	values[5] = PointerGetDatum(cstring_to_text_with_len(req->policy, req->policylen));
	values[6] = PointerGetDatum(cstring_to_text_with_len(req->key, req->keylen));
	tuple = heap_form_tuple(desc, values, nulls);
	/* frozen, as sequence.c makes its tuple: visible to every snapshot */
	HeapTupleHeaderSetXmin(tuple->t_data, FrozenTransactionId);
	HeapTupleHeaderSetXminFrozen(tuple->t_data);
	HeapTupleHeaderSetCmin(tuple->t_data, FirstCommandId);
	HeapTupleHeaderSetXmax(tuple->t_data, InvalidTransactionId);
	tuple->t_data->t_infomask |= HEAP_XMAX_INVALID;
	len = tuple->t_len;

	if (nblocks > 0)
	{
		buf = ReadBuffer(rel, nblocks - 1);
		LockBuffer(buf, BUFFER_LOCK_EXCLUSIVE);
		if (PageIsNew(BufferGetPage(buf)))
			fresh = true;
		else if (PageGetHeapFreeSpace(BufferGetPage(buf)) < MAXALIGN(len) ||
				 PageGetMaxOffsetNumber(BufferGetPage(buf)) >= QUOTA_ROWS_PER_PAGE)
		{
			UnlockReleaseBuffer(buf);
			buf = InvalidBuffer;
		}
	}
	if (!BufferIsValid(buf))
	{
		buf = ExtendRelationLocked_compat(rel);
		fresh = true;
	}

	xlog = GenericXLogStart(rel);
	page = GenericXLogRegisterBuffer(xlog, buf, fresh ? GENERIC_XLOG_FULL_IMAGE : 0);
	if (fresh)
		PageInit(page, BufferGetPageSize(buf), 0);
	offnum = PageAddItem(page, (Item) tuple->t_data, len, InvalidOffsetNumber,
						 false, true);
	if (offnum == InvalidOffsetNumber)
	{
		GenericXLogAbort(xlog);
		UnlockReleaseBuffer(buf);
		elog(ERROR, "could not add a quota row to block %u of resilience.quota_usage",
			 BufferGetBlockNumber(buf));
	}
	htup = (HeapTupleHeader) PageGetItem(page, PageGetItemId(page, offnum));
	ItemPointerSet(&htup->t_ctid, BufferGetBlockNumber(buf), offnum);
	ItemPointerSet(tid, BufferGetBlockNumber(buf), offnum);
	lsn = GenericXLogFinish(xlog);
	/* still locked: the page gets the true value after the logged one */
	page = BufferGetPage(buf);
	htup = (HeapTupleHeader) PageGetItem(page, PageGetItemId(page, offnum));
	((QuotaRow *) ((char *) htup + htup->t_hoff))->used = state->used;
	MarkBufferDirty(buf);
	quota_flush_at_commit(lsn);
	UnlockReleaseBuffer(buf);
	heap_freetuple(tuple);
	return lsn;
}

/* The answer for a key the table does not hold and will not hold now. */
static void
quota_untracked(const QuotaRequest *req, bool allowed, QuotaResult *res)
{
	res->tracked = false;
	res->existed = false;
	res->allowed = allowed;
	res->used = 0;
	res->resets_at = DT_NOBEGIN;
}

/* A new key under the load lock: reserve its hash entry, add the tuple. */
static void
quota_add_key(Relation rel, const char *hkey, int hlen, const QuotaRequest *req,
			  QuotaResult *res)
{
	QuotaSlot	slot = {RelationGetRelFileNumber_compat(rel), InvalidBlockNumber,
	InvalidOffsetNumber, true, 0, InvalidXLogRecPtr};
	QuotaRow	state;
	ItemPointerData tid;
	bool		found;

	if (!quota_hash_set(KIND_QUOTA_KEY, hkey, hlen, &slot, &found))
	{
		if (quota_when_full == QUOTA_FULL_ERROR)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("quota table is full"),
					 errdetail("All %d entries (resilience.quota_max_keys) are in use.",
							   quota_max_keys),
					 errhint("Raise resilience.quota_max_keys (server restart), or set resilience.quota_when_full to deny or allow.")));
		quota_untracked(req, quota_when_full == QUOTA_FULL_ALLOW, res);
		return;
	}
	(void) quota_next_state(req, NULL, &state);
	slot.logged = quota_reserve(req, &state);
	slot.logged_lsn = quota_insert(rel, req, &state, slot.logged, &tid);
	slot.blkno = ItemPointerGetBlockNumber(&tid);
	slot.offnum = ItemPointerGetOffsetNumber(&tid);
	(void) quota_hash_set(KIND_QUOTA_KEY, hkey, hlen, &slot, &found);

	res->tracked = true;
	res->existed = false;
	res->allowed = true;
	res->used = state.used;
	res->resets_at = state.period_end;
}

/* Carry out req on its key, creating the key if req allows it. */
static void
quota_run(const QuotaRequest *req, QuotaResult *res)
{
	Relation	rel;
	Oid			relfile;
	char	   *hkey = palloc(quota_hash_key_len());
	int			hlen = quota_hash_key(hkey, req->policy, req->policylen,
									  req->key, req->keylen);
	int			attempt;

	/*
	 * Even a peek needs the hash, which a standby cannot keep up to date
	 * with the primary's new keys: on a standby, read resilience.quotas.
	 */
	PreventCommandDuringRecovery("quota()");
	if (req->op == QOP_SET || req->amount > 0)
	{
		PreventCommandIfReadOnly("quota()");
		PreventCommandIfParallelMode("quota()");
	}
	rel = quota_open();
	relfile = RelationGetRelFileNumber_compat(rel);
	for (attempt = 0; attempt < QUOTA_ATTEMPTS; attempt++)
	{
		ItemPointerData tid;
		bool		reserved;
		QuotaLookup look = quota_lookup(hkey, hlen, relfile, &tid, &reserved);

		if (look == QL_FOUND)
		{
			if (quota_apply(rel, hkey, hlen, &tid, req, res))
				break;
			/* the tuple is not where the hash says: rebuild, ask again */
			LWLockAcquire(quota_load_lock, LW_EXCLUSIVE);
			quota_load(rel, true);
			LWLockRelease(quota_load_lock);
			continue;
		}
		if (look == QL_ABSENT && !req->create)
		{
			quota_untracked(req, req->op == QOP_CONSUME && req->limit >= 1, res);
			break;
		}

		LWLockAcquire(quota_load_lock, LW_EXCLUSIVE);
		quota_load(rel, false);
		look = quota_lookup(hkey, hlen, relfile, &tid, &reserved);
		if (look == QL_FOUND)
		{
			LWLockRelease(quota_load_lock);
			continue;
		}
		if (!req->create)
			quota_untracked(req, req->op == QOP_CONSUME && req->limit >= 1, res);
		else if (look == QL_ABSENT || reserved)
			quota_add_key(rel, hkey, hlen, req, res);
		else
		{
			/* the hash could not hold every row: a new key might exist */
			if (quota_when_full == QUOTA_FULL_ERROR)
				ereport(ERROR,
						(errcode(ERRCODE_OUT_OF_MEMORY),
						 errmsg("quota table is full"),
						 errdetail("resilience.quota_usage holds more keys than resilience.quota_max_keys (%d).",
								   quota_max_keys),
						 errhint("Raise resilience.quota_max_keys (server restart).")));
			quota_untracked(req, quota_when_full == QUOTA_FULL_ALLOW, res);
		}
		LWLockRelease(quota_load_lock);
		break;
	}
	if (attempt == QUOTA_ATTEMPTS)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("quota row for key \"%.*s\" could not be located",
						req->keylen, req->key),
				 errhint("Check resilience.quota_usage for duplicate or damaged rows.")));
	relation_close(rel, RowExclusiveLock);
	pfree(hkey);
}

/* ---- arguments ---- */

static const char *const quota_units[] = {"hour", "day", "week", "month", "year"};

/* A key (and its policy) within resilience.max_key_length, or 22004/22023. */
static void
quota_arg_key(FunctionCallInfo fcinfo, int argno, QuotaRequest *req)
{
	text	   *key = resilience_arg_text(fcinfo, argno, "key");
	int			len = VARSIZE_ANY_EXHDR(key);
	int			stored = len + (req->policylen > 0 ? req->policylen + 1 : 0);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota key must not be empty")));
	if (stored > resilience_max_key_length)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota key is too long"),
				 errdetail("The key takes %d bytes; at most %d are allowed.",
						   stored, resilience_max_key_length),
				 errhint("Hash long keys, or raise resilience.max_key_length (server restart).")));
	req->key = VARDATA_ANY(key);
	req->keylen = len;
}

/* A bigint argument that must not be NULL (22004). */
static int64
quota_arg_int64(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	return PG_GETARG_INT64(argno);
}

/* A local timestamp in time zone tz as timestamptz. */
static TimestampTz
quota_from_local(text *tz, Timestamp local)
{
	return DatumGetTimestampTz(DirectFunctionCall2(timestamp_zone, PointerGetDatum(tz),
												   TimestampGetDatum(local)));
}

/*
 * The last period definition this backend computed: the same period and
 * time zone strings give the same calendar period as long as now falls in
 * it (the time zone conversions are most of an argument check's cost).
 */
#define QUOTA_CACHE_LEN 64
static struct
{
	bool		valid;
	char		period[QUOTA_CACHE_LEN];
	char		tz[QUOTA_CACHE_LEN];
	QuotaPeriod p;
}			period_cache;

/* The cached period for (period, tz) at now, if there is one. */
static bool
quota_cached_period(const char *str, text *tz, TimestampTz now, QuotaPeriod *period)
{
	int			tzlen = VARSIZE_ANY_EXHDR(tz);

	if (!period_cache.valid || tzlen >= QUOTA_CACHE_LEN ||
		strcmp(period_cache.period, str) != 0 ||
		strncmp(period_cache.tz, VARDATA_ANY(tz), tzlen) != 0 ||
		period_cache.tz[tzlen] != '\0')
		return false;
	*period = period_cache.p;
	if (period->unit == NULL)
	{
		period->start = now;
		period->end = now + period->span;
		return true;
	}
	return period->start <= now && now < period->end;
}

static void
quota_cache_period(const char *str, text *tz, const QuotaPeriod *period)
{
	int			tzlen = VARSIZE_ANY_EXHDR(tz);

	period_cache.valid = false;
	if (strlen(str) >= QUOTA_CACHE_LEN || tzlen >= QUOTA_CACHE_LEN)
		return;
	strcpy(period_cache.period, str);
	memcpy(period_cache.tz, VARDATA_ANY(tz), tzlen);
	period_cache.tz[tzlen] = '\0';
	period_cache.p = *period;
	period_cache.valid = true;
}

/*
 * The period str in time zone tz as the period a count starting at now
 * falls in.  22023 for an unknown unit, a bad interval or an unknown time
 * zone; nothing is changed yet.
 */
static void
quota_period(char *str, text *tz, TimestampTz now, QuotaPeriod *period)
{
	Timestamp	local;
	int			i;

	if (quota_cached_period(str, tz, now, period))
		return;
	/* the time zone is checked whatever the period (22023 if unknown) */
	local = DatumGetTimestamp(DirectFunctionCall2(timestamptz_zone, PointerGetDatum(tz),
												  TimestampTzGetDatum(now)));
	period->unit = NULL;
	for (i = 0; i < lengthof(quota_units); i++)
		if (pg_strcasecmp(str, quota_units[i]) == 0)
			period->unit = quota_units[i];
	if (period->unit)
	{
		Interval	one = {0};
		Timestamp	start;
		Timestamp	end;

		if (strcmp(period->unit, "hour") == 0)
			one.time = USECS_PER_HOUR;
		else if (strcmp(period->unit, "day") == 0)
			one.day = 1;
		else if (strcmp(period->unit, "week") == 0)
			one.day = 7;
		else if (strcmp(period->unit, "month") == 0)
			one.month = 1;
		else
			one.month = MONTHS_PER_YEAR;
		start = DatumGetTimestamp(DirectFunctionCall2(timestamp_trunc,
													  PointerGetDatum(cstring_to_text(period->unit)),
													  TimestampGetDatum(local)));
		end = DatumGetTimestamp(DirectFunctionCall2(timestamp_pl_interval,
													TimestampGetDatum(start),
													IntervalPGetDatum(&one)));
		period->start = quota_from_local(tz, start);
		period->end = quota_from_local(tz, end);
		period->span = 0;
	}
	else
	{
		char		workbuf[256];
		char	   *field[MAXDATEFIELDS];
		int			ftype[MAXDATEFIELDS];
		int			nf;
		int			dtype = 0;
		struct pg_itm_in itm;
		Interval	span;
		int			dterr;
		int128		usec = 0;

		dterr = ParseDateTime(str, workbuf, sizeof(workbuf), field, ftype,
							  MAXDATEFIELDS, &nf);
		if (dterr == 0)
			dterr = DecodeInterval(field, ftype, nf, INTERVAL_FULL_RANGE, &dtype, &itm);
		if (dterr == DTERR_BAD_FORMAT)
			dterr = DecodeISO8601Interval(str, &dtype, &itm);
		if (dterr == 0 && dtype == DTK_DELTA && itmin2interval(&itm, &span) == 0)
			usec = resilience_interval_usec(&span);
		if (usec <= 0 || usec > RESILIENCE_MAX_INTERVAL_USEC)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown quota period \"%s\"", str),
					 errdetail("A period is hour, day, week, month or year (calendar periods in the time zone tz), "
							   "or a rolling interval greater than 0 and at most 366 days."),
					 errhint("For example 'day', 'month' or '15 minutes'.")));
		period->span = (int64) usec;
		period->start = now;
		period->end = now + period->span;
	}
	quota_cache_period(str, tz, period);
}

/* The period and time zone arguments at argno and tzargno (see quota_period). */
static void
quota_arg_period(FunctionCallInfo fcinfo, int argno, int tzargno, TimestampTz now,
				 QuotaPeriod *period)
{
	text	   *arg = resilience_arg_text(fcinfo, argno, "period");
	text	   *tz = resilience_arg_text(fcinfo, tzargno, "tz");
	char	   *str = text_to_cstring(arg);

	quota_period(str, tz, now, period);
	pfree(str);
}

/* cost: not NULL, 0 to limit (22004, 22023). */
static int64
quota_arg_cost(FunctionCallInfo fcinfo, int argno, int64 limit)
{
	int64		cost = quota_arg_int64(fcinfo, argno, "cost");

	if (cost < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must not be negative"),
				 errdetail("cost is " INT64_FORMAT ".", cost)));
	if (cost > limit)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must not exceed limit"),
				 errdetail("cost is " INT64_FORMAT " and limit is " INT64_FORMAT
						   ", so the request could never be admitted.", cost, limit)));
	return cost;
}

/* ---- named policies ---- */

#define QUOTA_POLICY_TEXT 64	/* period and tz of a policy: shorter than this */

/* A row of resilience.quota_policies, cached per backend. */
typedef struct QuotaPolicy
{
	char		name[NAMEDATALEN];	/* hash key */
	int64		limit;
	char		period[QUOTA_POLICY_TEXT];
	union
	{
		char		data[VARHDRSZ + QUOTA_POLICY_TEXT];
		int32		align;
	}			tz;				/* a text datum */
} QuotaPolicy;

static HTAB *quota_policy_cache = NULL;
static Oid	quota_policy_relid = InvalidOid;

/* A policy name of 1 to NAMEDATALEN - 1 bytes into buf (22023). */
static void
quota_policy_name(text *name, char *buf)
{
	int			len = VARSIZE_ANY_EXHDR(name);

	if (len == 0 || len >= NAMEDATALEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota policy name must be 1 to %d bytes long", NAMEDATALEN - 1)));
	memcpy(buf, VARDATA_ANY(name), len);
	buf[len] = '\0';
}

/*
 * Check a policy's limit, period and time zone the way quota's arguments
 * are checked, and store them into policy (22004, 22023).
 */
static void
quota_policy_fill(QuotaPolicy *policy, bool limitnull, int64 limit,
				  text *period, text *tz)
{
	QuotaPeriod p;
	int			plen;
	int			tzlen;

	if (limitnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("limit must not be null")));
	if (limit <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("limit must be positive"),
				 errdetail("limit is " INT64_FORMAT ".", limit)));
	if (period == NULL || tz == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", period == NULL ? "period" : "tz")));
	plen = VARSIZE_ANY_EXHDR(period);
	tzlen = VARSIZE_ANY_EXHDR(tz);
	if (plen >= QUOTA_POLICY_TEXT || tzlen >= QUOTA_POLICY_TEXT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a quota policy's %s must be shorter than %d bytes",
						plen >= QUOTA_POLICY_TEXT ? "period" : "tz", QUOTA_POLICY_TEXT)));
	policy->limit = limit;
	memcpy(policy->period, VARDATA_ANY(period), plen);
	policy->period[plen] = '\0';
	SET_VARSIZE(policy->tz.data, VARHDRSZ + tzlen);
	memcpy(VARDATA(policy->tz.data), VARDATA_ANY(tz), tzlen);
	quota_period(policy->period, (text *) policy->tz.data, GetCurrentTimestamp(), &p);
}

static void
quota_policy_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == quota_policy_relid)
	{
		if (quota_policy_cache)
			hash_destroy(quota_policy_cache);
		quota_policy_cache = NULL;
		quota_policy_relid = InvalidOid;
	}
}

/*
 * The policy named by argument argno: this backend's cache first, the
 * table on a miss (42704 if there is no such row).  A change committed
 * after the read sends an invalidation that empties the cache again.
 */
static QuotaPolicy *
quota_policy_lookup(FunctionCallInfo fcinfo, int argno)
{
	static bool callback_registered = false;
	text	   *name_text = resilience_arg_text(fcinfo, argno, "policy");
	char		name[NAMEDATALEN];
	QuotaPolicy fetched;
	QuotaPolicy *entry;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {PointerGetDatum(name_text)};
	bool		limitnull;
	bool		isnull;
	Datum		d;
	int			ret;

	quota_policy_name(name_text, name);
	if (quota_policy_cache &&
		(entry = hash_search(quota_policy_cache, name, HASH_FIND, NULL)) != NULL)
		return entry;
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(quota_policy_invalidate, (Datum) 0);
		callback_registered = true;
	}

	SPI_connect();
	ret = SPI_execute_with_args("SELECT \"limit\", period, tz FROM resilience.quota_policies "
								"WHERE name OPERATOR(pg_catalog.=) $1",
								1, argtypes, values, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read resilience.quota_policies: %s",
			 SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("quota policy \"%s\" does not exist", name),
				 errhint("Policies are rows of resilience.quota_policies.")));
	memset(&fetched, 0, sizeof(fetched));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &limitnull);
	fetched.limit = limitnull ? 0 : DatumGetInt64(d);
	{
		Datum		period = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		text	   *p = isnull ? NULL : DatumGetTextPP(period);
		Datum		tz = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull);
		text	   *t = isnull ? NULL : DatumGetTextPP(tz);

		/* rows are checked on write; this catches a row written past the trigger */
		quota_policy_fill(&fetched, limitnull, fetched.limit, p, t);
	}
	SPI_finish();

	/* only now: an invalidation processed during the query reset the relid */
	quota_policy_relid = get_relname_relid("quota_policies",
										   get_namespace_oid("resilience", false));
	if (quota_policy_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = NAMEDATALEN;
		ctl.entrysize = sizeof(QuotaPolicy);
		ctl.hcxt = CacheMemoryContext;
		quota_policy_cache = hash_create("resilience quota policies", 16, &ctl,
										 HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	entry = hash_search(quota_policy_cache, name, HASH_ENTER, NULL);
	entry->limit = fetched.limit;
	memcpy(entry->period, fetched.period, sizeof(entry->period));
	memcpy(&entry->tz, &fetched.tz, sizeof(entry->tz));
	return entry;
}

/* A text column of the trigger's new row, or NULL. */
static text *
quota_policy_column(HeapTuple tuple, TupleDesc desc, const char *column)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, SPI_fnumber(desc, column), desc, &isnull);

	return isnull ? NULL : DatumGetTextPP(d);
}

/* Row trigger on quota_policies: refuse what quota would refuse. */
Datum
quota_policy_check(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	HeapTuple	tuple;
	TupleDesc	desc;
	text	   *name;
	char		buf[NAMEDATALEN];
	QuotaPolicy policy;
	bool		limitnull;
	Datum		limit;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		elog(ERROR, "quota_policy_check: not called as a row trigger");
	tuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ?
		trigdata->tg_newtuple : trigdata->tg_trigtuple;
	desc = trigdata->tg_relation->rd_att;
	name = quota_policy_column(tuple, desc, "name");
	if (name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("quota policy name must not be null")));
	quota_policy_name(name, buf);
	limit = heap_getattr(tuple, SPI_fnumber(desc, "limit"), desc, &limitnull);
	quota_policy_fill(&policy, limitnull, limitnull ? 0 : DatumGetInt64(limit),
					  quota_policy_column(tuple, desc, "period"),
					  quota_policy_column(tuple, desc, "tz"));
	return PointerGetDatum(tuple);
}

/* ---- decisions ---- */

/*
 * quota(key, limit, period, cost, tz) and quota_check: arguments 0 to 4;
 * with named, quota(key, policy, cost): arguments 0 to 2.  Every one is
 * checked before anything is looked at or changed.
 */
static void
quota_decide(FunctionCallInfo fcinfo, bool named, QuotaResult *res)
{
	QuotaRequest req = {0};
	QuotaPeriod period;

	resilience_require_preload("quota");
	req.op = QOP_CONSUME;
	req.policy = "";
	req.now = GetCurrentTimestamp();
	if (named)
	{
		QuotaPolicy *policy = quota_policy_lookup(fcinfo, 1);

		req.policy = policy->name;
		req.policylen = strlen(policy->name);
		quota_arg_key(fcinfo, 0, &req);
		req.limit = policy->limit;
		quota_period(policy->period, (text *) policy->tz.data, req.now, &period);
		req.amount = quota_arg_cost(fcinfo, 2, req.limit);
	}
	else
	{
		quota_arg_key(fcinfo, 0, &req);
		req.limit = quota_arg_int64(fcinfo, 1, "limit");
		if (req.limit <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("limit must be positive"),
					 errdetail("limit is " INT64_FORMAT ".", req.limit)));
		quota_arg_period(fcinfo, 2, 4, req.now, &period);
		req.amount = quota_arg_cost(fcinfo, 3, req.limit);
	}
	req.period = &period;
	req.create = req.amount > 0;
	quota_run(&req, res);
	res->limit = req.limit;
	res->cost = req.amount;
	if (req.amount > 0)
		metrics_inc(quota_counters[res->allowed ? RV_ALLOWED : RV_DENIED]);
}

/* Counters, looked up once per backend (metrics_counter may allocate). */
static void
quota_init_counters(void)
{
	if (quota_counters[0] == NULL)
	{
		quota_counters[RV_ALLOWED] = metrics_counter(RC_QUOTA_DECISIONS, RV_ALLOWED, NULL);
		quota_counters[RV_DENIED] = metrics_counter(RC_QUOTA_DECISIONS, RV_DENIED, NULL);
	}
}

/* quota_check's record: (allowed, used, remaining, resets_at) */
static Datum
quota_check_result(FunctionCallInfo fcinfo, const QuotaResult *res)
{
	TupleDesc	desc;
	Datum		values[4];
	bool		nulls[4] = {false};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	desc = BlessTupleDesc(desc);
	values[0] = BoolGetDatum(res->allowed);
	if (res->tracked || res->allowed)
	{
		int64		used = res->tracked ? res->used : res->cost;

		values[1] = Int64GetDatum(used);
		values[2] = Int64GetDatum(Max(res->limit - used, 0));
	}
	else
	{
		nulls[1] = true;
		values[2] = Int64GetDatum(0);
	}
	values[3] = TimestampTzGetDatum(res->resets_at);
	nulls[3] = res->resets_at == DT_NOBEGIN;
	return HeapTupleGetDatum(heap_form_tuple(desc, values, nulls));
}

/* quota(key, limit, period, cost, tz) -> boolean */
Datum
quota(PG_FUNCTION_ARGS)
{
	QuotaResult res;

	quota_init_counters();
	quota_decide(fcinfo, false, &res);
	PG_RETURN_BOOL(res.allowed);
}

/* quota_check(key, limit, period, cost, tz) -> (allowed, used, remaining, resets_at) */
Datum
quota_check(PG_FUNCTION_ARGS)
{
	QuotaResult res;

	quota_init_counters();
	quota_decide(fcinfo, false, &res);
	PG_RETURN_DATUM(quota_check_result(fcinfo, &res));
}

/* quota(key, policy, cost) -> boolean */
Datum
quota_policy(PG_FUNCTION_ARGS)
{
	QuotaResult res;

	quota_init_counters();
	quota_decide(fcinfo, true, &res);
	PG_RETURN_BOOL(res.allowed);
}

/* quota_check(key, policy, cost) -> (allowed, used, remaining, resets_at) */
Datum
quota_policy_check_decide(PG_FUNCTION_ARGS)
{
	QuotaResult res;

	quota_init_counters();
	quota_decide(fcinfo, true, &res);
	PG_RETURN_DATUM(quota_check_result(fcinfo, &res));
}

/* used: not NULL, not negative (22004, 22023). */
static int64
quota_arg_used(FunctionCallInfo fcinfo, int argno)
{
	int64		used = quota_arg_int64(fcinfo, argno, "used");

	if (used < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("used must not be negative"),
				 errdetail("used is " INT64_FORMAT ".", used)));
	return used;
}

/* quota_set's work once its arguments are checked: did the key exist? */
static bool
quota_set_run(QuotaRequest *req)
{
	QuotaResult res;

	quota_run(req, &res);
	if (!res.tracked && req->create)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("quota table is full"),
				 errdetail("All %d entries (resilience.quota_max_keys) are in use.",
						   quota_max_keys)));
	if (!res.tracked)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota key \"%.*s\" does not exist", req->keylen, req->key),
				 errhint("Pass a period to create it.")));
	return res.existed;
}

/* quota_set(key, used, period, tz) -> boolean: did the key exist? */
Datum
quota_set(PG_FUNCTION_ARGS)
{
	QuotaRequest req = {0};
	QuotaPeriod period;

	resilience_require_preload("quota_set");
	req.op = QOP_SET;
	req.policy = "";
	req.now = GetCurrentTimestamp();
	quota_arg_key(fcinfo, 0, &req);
	req.amount = quota_arg_used(fcinfo, 1);
	if (!PG_ARGISNULL(2))
	{
		quota_arg_period(fcinfo, 2, 3, req.now, &period);
		req.period = &period;
		req.create = true;
	}
	PG_RETURN_BOOL(quota_set_run(&req));
}

/* quota_set(key, policy, used) -> boolean: creates the key in the policy's period. */
Datum
quota_policy_set(PG_FUNCTION_ARGS)
{
	QuotaRequest req = {0};
	QuotaPeriod period;
	QuotaPolicy *policy;

	resilience_require_preload("quota_set");
	req.op = QOP_SET;
	req.now = GetCurrentTimestamp();
	policy = quota_policy_lookup(fcinfo, 1);
	req.policy = policy->name;
	req.policylen = strlen(policy->name);
	quota_arg_key(fcinfo, 0, &req);
	req.amount = quota_arg_used(fcinfo, 2);
	req.limit = policy->limit;
	quota_period(policy->period, (text *) policy->tz.data, req.now, &period);
	req.period = &period;
	req.create = true;
	PG_RETURN_BOOL(quota_set_run(&req));
}

/* quota_reset(key) -> boolean: usage back to 0 in the key's period. */
Datum
quota_reset(PG_FUNCTION_ARGS)
{
	QuotaRequest req = {0};
	QuotaResult res;

	resilience_require_preload("quota_reset");
	req.op = QOP_SET;
	req.policy = "";
	req.now = GetCurrentTimestamp();
	quota_arg_key(fcinfo, 0, &req);
	quota_run(&req, &res);
	PG_RETURN_BOOL(res.tracked);
}

/* quota_reset(key, policy) -> boolean: the same for a key under a policy. */
Datum
quota_policy_reset(PG_FUNCTION_ARGS)
{
	QuotaRequest req = {0};
	QuotaResult res;
	char		name[NAMEDATALEN];

	resilience_require_preload("quota_reset");
	req.op = QOP_SET;
	req.now = GetCurrentTimestamp();
	/* the name only: a key stays resettable after its policy is deleted */
	quota_policy_name(resilience_arg_text(fcinfo, 1, "policy"), name);
	req.policy = name;
	req.policylen = strlen(name);
	quota_arg_key(fcinfo, 0, &req);
	quota_run(&req, &res);
	PG_RETURN_BOOL(res.tracked);
}

/* Statement trigger: rows of quota_usage change only through quota.c. */
Datum
quota_usage_guard(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "quota_usage_guard: not called as a trigger");
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("rows of resilience.quota_usage cannot be updated or deleted"),
			 errdetail("They are changed in place by the quota functions."),
			 errhint("Use resilience.quota_set or resilience.quota_reset; TRUNCATE forgets every key.")));
	PG_RETURN_NULL();
}
