/*-------------------------------------------------------------------------
 *
 * events.c
 *		append_events: append to an event stream at an expected version.
 *
 * One head row per stream (resilience.streams) is the lock that orders
 * appends: it is inserted or updated only if the stream is at the expected
 * version, so a concurrent append that got there first makes it find
 * nothing (40001), exactly as the executor's ON CONFLICT and EvalPlanQual
 * rules say.  The head row of a stream that exists is updated directly
 * with the table API ("The head row without SQL" below), as locks.c does
 * for leases; a new stream's INSERT ... ON CONFLICT, and everything when
 * the direct path does not apply, is one statement run through SPI (a
 * saved plan).  The events are then written after it.  Holding the head
 * row, no other append can write the same (stream, version): the event
 * rows are inserted directly with the heap and index APIs
 * (ExecSimpleRelationInsert, the path logical replication's apply uses:
 * constraints, every index with its uniqueness check, row triggers), which
 * costs a fraction of an executor INSERT.
 * When Citus is installed the tables may be distributed and the local
 * heap is not where the rows live: the events then go through SPI too
 * (citus_present(), src/resilience.c), and the head row is locked, checked
 * and written by statements Citus accepts ("The head row with Citus").
 *
 * Privileges: like the other stream functions (src/tenants.c) this one is
 * SECURITY INVOKER and switches to the tables' owner itself, so it knows
 * the calling role, which owns a new stream and must own (or have the
 * privileges of the owner of) an existing one: 42501 otherwise.
 * search_path is not pinned for the head row and the events (the SQL below
 * qualifies every name and operator, and runs no user code); it is pinned
 * for forwarding, which calls outbox_publish.
 *
 * Forwards (resilience.stream_forwards) are rare: an empty table has no
 * pages, which is checked without a query; otherwise a query publishes the
 * events of every forward whose pattern matches.
 *
 *-------------------------------------------------------------------------
 */
#include "resilience.h"
#include "metrics.h"
#include "tenants.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define STREAM_NAME_MAX 255
#define EVENT_TYPE_MAX 255

/* Columns of resilience.stream_events, in table order. */
#define EVENT_COLUMNS 6

PG_FUNCTION_INFO_V1(append_events);

/* The statements, prepared once per backend. */
typedef enum EventStatement
{
	ES_BUMP,					/* expected version NULL, the stream exists */
	ES_APPEND_ANY,				/* expected version NULL: insert or bump */
	ES_CREATE,					/* -1: insert only */
	ES_APPEND_AT,				/* a version: bump if at it */
	ES_ACTUAL,					/* after a conflict: the actual version */
	ES_INSERT_EVENT,			/* an event through the executor (Citus) */
	ES_FORWARD,					/* publish the events to matching forwards */
	ES_LOCK_CITUS,				/* Citus: lock the head row, owner by name */
	ES_INSERT_CITUS,			/* Citus: a new head row */
	ES_SET_CITUS,				/* Citus: the locked head row's new version */
	ES_SET_OWNER_CITUS,			/* Citus: the same, and its first owner */
	NUM_EVENT_STATEMENTS
} EventStatement;

/*
 * $1 stream, $2 n (events), $3 the owner of a new stream, $4 the caller,
 * $5 the expected version.  A stream from 0.1 (no owner) becomes the
 * caller's.
 */
static const struct
{
	const char *sql;
	int			nargs;
	Oid			argtypes[6];
}			event_sql[NUM_EVENT_STATEMENTS] = {
	/*
	 * Most appends without an expected version are to a stream that exists:
	 * a plain UPDATE spares the insert's conflict probe and row lock.
	 */
	[ES_BUMP] = {
		"UPDATE resilience.streams s SET version = s.version OPERATOR(pg_catalog.+) $2,"
		" updated_at = pg_catalog.now(),"
		" owner_role = COALESCE(s.owner_role, $4::pg_catalog.regrole)"
		" WHERE s.stream OPERATOR(pg_catalog.=) $1"
		" RETURNING s.version, s.owner_role::pg_catalog.oid",
		4, {TEXTOID, INT8OID, OIDOID, OIDOID}
	},
	[ES_APPEND_ANY] = {
		"INSERT INTO resilience.streams AS s (stream, version, updated_at, owner_role)"
		" VALUES ($1, $2 OPERATOR(pg_catalog.-) 1, pg_catalog.now(), $3::pg_catalog.regrole)"
		" ON CONFLICT (stream) DO UPDATE SET version = s.version OPERATOR(pg_catalog.+) $2,"
		" updated_at = pg_catalog.now(),"
		" owner_role = COALESCE(s.owner_role, $4::pg_catalog.regrole)"
		" RETURNING s.version, s.owner_role::pg_catalog.oid",
		4, {TEXTOID, INT8OID, OIDOID, OIDOID}
	},
	[ES_CREATE] = {
		"INSERT INTO resilience.streams AS s (stream, version, updated_at, owner_role)"
		" VALUES ($1, $2 OPERATOR(pg_catalog.-) 1, pg_catalog.now(), $3::pg_catalog.regrole)"
		" ON CONFLICT (stream) DO NOTHING"
		" RETURNING s.version, s.owner_role::pg_catalog.oid",
		4, {TEXTOID, INT8OID, OIDOID, OIDOID}
	},
	[ES_APPEND_AT] = {
		"UPDATE resilience.streams s SET version = s.version OPERATOR(pg_catalog.+) $2,"
		" updated_at = pg_catalog.now(),"
		" owner_role = COALESCE(s.owner_role, $4::pg_catalog.regrole)"
		" WHERE s.stream OPERATOR(pg_catalog.=) $1 AND s.version OPERATOR(pg_catalog.=) $5"
		" RETURNING s.version, s.owner_role::pg_catalog.oid",
		5, {TEXTOID, INT8OID, OIDOID, OIDOID, INT8OID}
	},
	[ES_ACTUAL] = {
		"SELECT s.version, s.owner_role::pg_catalog.oid FROM resilience.streams s"
		" WHERE s.stream OPERATOR(pg_catalog.=) $1",
		1, {TEXTOID}
	},
	[ES_INSERT_EVENT] = {
		"INSERT INTO resilience.stream_events (stream, version, type, data, metadata, recorded_at)"
		" VALUES ($1, $2, $3, $4, $5, $6)",
		6, {TEXTOID, INT8OID, TEXTOID, JSONBOID, JSONBOID, TIMESTAMPTZOID}
	},
	/*
	 * $1 stream, $2 the new version, $3 n, $4 the events; in forward order,
	 * then event order (volatile calls are made after the sort)
	 */
	[ES_FORWARD] = {
		"SELECT pg_catalog.count(*) FROM ("
		" SELECT resilience.outbox_publish(w.topic,"
		"  pg_catalog.jsonb_build_object('stream', $1, 'version',"
		"   $2 OPERATOR(pg_catalog.-) $3 OPERATOR(pg_catalog.+) x.i,"
		"   'type', x.e OPERATOR(pg_catalog.->>) 'type',"
		"   'data', COALESCE(x.e OPERATOR(pg_catalog.->) 'data', 'null'),"
		"   'metadata', COALESCE(x.e OPERATOR(pg_catalog.->) 'metadata', '{}'),"
		"   'recorded_at', pg_catalog.now()),"
		"  $1)"
		"  FROM resilience.stream_forwards w,"
		"   pg_catalog.unnest($4) WITH ORDINALITY x(e, i)"
		"  WHERE $1 OPERATOR(pg_catalog.~~) w.stream_pattern COLLATE pg_catalog.\"C\""
		"  ORDER BY w.id, x.i) p",
		4, {TEXTOID, INT8OID, INT8OID, JSONBARRAYOID}
	},

	/*
	 * With Citus (head_citus): $1 stream, $2 the new version, $3 the time,
	 * $4 the owner.  The owner is read by name, and nothing reads or
	 * compares owner_role in an UPDATE (see head_citus).
	 */
	[ES_LOCK_CITUS] = {
		"SELECT s.version, s.owner_role::pg_catalog.text FROM resilience.streams s"
		" WHERE s.stream OPERATOR(pg_catalog.=) $1 FOR UPDATE",
		1, {TEXTOID}
	},
	[ES_INSERT_CITUS] = {
		"INSERT INTO resilience.streams (stream, version, updated_at, owner_role)"
		" VALUES ($1, $2, $3, $4::pg_catalog.regrole)"
		" ON CONFLICT (stream) DO NOTHING",
		4, {TEXTOID, INT8OID, TIMESTAMPTZOID, OIDOID}
	},
	[ES_SET_CITUS] = {
		"UPDATE resilience.streams SET version = $2, updated_at = $3"
		" WHERE stream OPERATOR(pg_catalog.=) $1",
		3, {TEXTOID, INT8OID, TIMESTAMPTZOID}
	},
	[ES_SET_OWNER_CITUS] = {
		"UPDATE resilience.streams SET version = $2, updated_at = $3,"
		" owner_role = $4::pg_catalog.regrole"
		" WHERE stream OPERATOR(pg_catalog.=) $1",
		4, {TEXTOID, INT8OID, TIMESTAMPTZOID, OIDOID}
	},
};

static SPIPlanPtr event_plans[NUM_EVENT_STATEMENTS];

/* Run a statement (SPI connected); returns the rows it processed. */
static uint64
run_event_statement(EventStatement which, Datum *values, const char *nulls)
{
	int			ret;

	if (event_plans[which] == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(event_sql[which].sql, event_sql[which].nargs,
									   (Oid *) event_sql[which].argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 event_sql[which].sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		event_plans[which] = plan;
	}
	ret = SPI_execute_plan(event_plans[which], values, nulls, false, 0);
	if (ret < 0)
		elog(ERROR, "SPI_execute_plan failed for \"%s\": %s",
			 event_sql[which].sql, SPI_result_code_string(ret));
	return SPI_processed;
}

/*
 * Connect to SPI the first time a statement is needed: an append that
 * writes its head row directly, to a stream without forwards, runs none.
 */
static void
need_spi(bool *connected)
{
	if (!*connected)
	{
		SPI_connect();
		*connected = true;
	}
}

/* ---- arguments ---- */

static pg_noreturn_compat void
bad_event(int i, int n, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("event %d of %d %s", i, n, why),
			 errhint("Each event is {\"type\": \"…\", \"data\": any JSON, \"metadata\": {…}}; data and metadata may be left out.")));
}

/* The value of top-level key `key` of object container jc, or NULL. */
static JsonbValue *
object_field(JsonbContainer *jc, const char *key, JsonbValue *buf)
{
	return getKeyJsonValueFromContainer(jc, key, strlen(key), buf);
}

/*
 * Check event i of n (1-based) and split it into type, data and metadata:
 * an object with a "type" of 1 to 255 bytes, "metadata" an object if given,
 * no other key.  data defaults to JSON null, metadata to {}.
 */
static void
parse_event(Jsonb *e, int i, int n, Datum *type, Datum *data, Datum *metadata)
{
	JsonbValue	tbuf,
				mbuf,
				dbuf;
	JsonbValue *t,
			   *m,
			   *d;
	uint32		nkeys;

	if (!JB_ROOT_IS_OBJECT(e))
		bad_event(i, n, "is not a JSON object");
	t = object_field(&e->root, "type", &tbuf);
	if (t == NULL)
		bad_event(i, n, "has no \"type\"");
	if (t->type != jbvString)
		bad_event(i, n, "has a \"type\" that is not a string");
	if (t->val.string.len < 1 || t->val.string.len > EVENT_TYPE_MAX)
		bad_event(i, n, "has a \"type\" that is not 1 to 255 bytes");
	m = object_field(&e->root, "metadata", &mbuf);
	if (m != NULL && !(m->type == jbvBinary && JsonContainerIsObject(m->val.binary.data)))
		bad_event(i, n, "has \"metadata\" that is not a JSON object");
	d = object_field(&e->root, "data", &dbuf);
	nkeys = 1 + (m != NULL) + (d != NULL);
	if (JB_ROOT_COUNT(e) != nkeys)
		bad_event(i, n, "has a key other than \"type\", \"data\" and \"metadata\"");

	*type = PointerGetDatum(cstring_to_text_with_len(t->val.string.val, t->val.string.len));
	*data = d ? JsonbPGetDatum(JsonbValueToJsonb(d))
		: DirectFunctionCall1(jsonb_in, CStringGetDatum("null"));
	*metadata = m ? JsonbPGetDatum(JsonbValueToJsonb(m))
		: DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
}

/* ---- writing the events ---- */

/*
 * Insert the n events (values[i][0..5]) after the head row was written:
 * directly, or through SPI when Citus may have distributed the table.
 */
static void
insert_events(Datum (*values)[EVENT_COLUMNS], int n, bool *spi)
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	bool		nulls[EVENT_COLUMNS] = {false};

	if (citus_present())
	{
		need_spi(spi);
		for (int i = 0; i < n; i++)
			run_event_statement(ES_INSERT_EVENT, values[i], NULL);
		return;
	}

	rel = table_open(resilience_relid("stream_events"), RowExclusiveLock);
	estate = CreateExecutorState();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	ExecOpenIndices(rri, false);
	slot = table_slot_create(rel, NULL);
	for (int i = 0; i < n; i++)
	{
		ExecClearTuple(slot);
		memcpy(slot->tts_values, values[i], sizeof(Datum) * EVENT_COLUMNS);
		memcpy(slot->tts_isnull, nulls, sizeof(nulls));
		ExecStoreVirtualTuple(slot);
		ExecSimpleRelationInsert(rri, estate, slot);
		ResetPerTupleExprContext(estate);
	}
	ExecDropSingleTupleTableSlot(slot);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
}

/*
 * Publish the events to the outbox under every matching forward's topic.
 * A table that has never held a forward has no pages: nothing to do, and
 * no query to run (with Citus the local table says nothing: always ask).
 */
static void
forward_events(Datum stream, int64 new_version, int n, Datum events, bool *spi)
{
	Relation	rel;
	BlockNumber nblocks;
	Datum		values[4];
	ResilienceUser save;

	if (!citus_present())
	{
		rel = table_open(resilience_relid("stream_forwards"), AccessShareLock);
		nblocks = RelationGetNumberOfBlocks(rel);
		table_close(rel, NoLock);
		if (nblocks == 0)
			return;
	}
	values[0] = stream;
	values[1] = Int64GetDatum(new_version);
	values[2] = Int64GetDatum(n);
	values[3] = events;
	need_spi(spi);
	/* outbox_publish runs here: with search_path pinned */
	resilience_become_owner(true, &save);
	run_event_statement(ES_FORWARD, values, NULL);
	resilience_restore_user(&save);
}

/* ---- the head row without SQL ---- */

/*
 * Appending to a stream that has a head row, at an expected version or
 * with NULL, does what ES_APPEND_AT or ES_BUMP would, without the executor
 * (the way locks.c renews a lease): one probe of the primary key with a
 * snapshot taken as SPI takes one for a statement, the expected version
 * checked in C, and table_tuple_update of the version found.  A concurrent
 * append that updated the row first makes the update wait for it and fail
 * (TM_Updated); under READ COMMITTED the probe is then repeated with a new
 * snapshot, so the version is checked again on the row that will be
 * written, as EvalPlanQual rechecks the UPDATE's WHERE: a stream now at
 * another version is a conflict, and a failed attempt holds no row lock.
 * Under REPEATABLE READ or SERIALIZABLE that is a serialization failure,
 * as for the UPDATE.
 *
 * The probe also answers the conflict's question (the actual version and
 * owner), which the SQL path asks with a second statement (ES_ACTUAL); and
 * when it finds no row, a NULL append goes straight to the SPI insert
 * (ES_APPEND_ANY) without trying the UPDATE first.
 *
 * Only for the table as the extension creates it: with Citus (which may
 * distribute it and routes statements itself), triggers (foreign keys
 * included), rules, row-level security, check constraints or generated
 * columns, every statement goes through SPI as before.
 */

typedef enum StreamCol
{
	SCOL_STREAM,
	SCOL_VERSION,
	SCOL_UPDATED_AT,
	SCOL_OWNER_ROLE,
	SCOL_COUNT
} StreamCol;

static const char *const stream_col_names[SCOL_COUNT] = {
	"stream", "version", "updated_at", "owner_role"
};
static const Oid stream_col_types[SCOL_COUNT] = {
	TEXTOID, INT8OID, TIMESTAMPTZOID, REGROLEOID
};
static AttrNumber stream_attnums[SCOL_COUNT];
static Oid	streams_relid = InvalidOid;
static Oid	streams_pkey = InvalidOid;
static int	streams_direct = -1;	/* -1: not known yet */

#define HEAD_VALUE(slot, c) ((slot)->tts_values[stream_attnums[c] - 1])
#define HEAD_ISNULL(slot, c) ((slot)->tts_isnull[stream_attnums[c] - 1])

/* Relcache callback: the table or its key changed, look again. */
static void
streams_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == streams_relid || relid == streams_pkey)
		streams_direct = -1;
}

/* May the direct path write resilience.streams, as it is now? */
static bool
streams_direct_layout(void)
{
	static bool callback_registered = false;
	Oid			nsp;
	Relation	rel;

	if (streams_direct >= 0)
		return streams_direct;
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(streams_invalidate, (Datum) 0);
		callback_registered = true;
	}
	nsp = get_namespace_oid("resilience", true);
	streams_relid = OidIsValid(nsp) ? get_relname_relid("streams", nsp) : InvalidOid;
	if (!OidIsValid(streams_relid))
		return false;			/* not cached: SPI raises the error */
	rel = table_open(streams_relid, AccessShareLock);
	streams_pkey = direct_update_layout(rel, SCOL_COUNT, stream_col_names, stream_col_types,
										stream_attnums, SCOL_STREAM);
	table_close(rel, AccessShareLock);
	streams_direct = OidIsValid(streams_pkey);
	return streams_direct;
}

/*
 * Find stream's head row as a statement run through SPI would: this
 * transaction's earlier changes made visible, then a snapshot (a new one
 * under READ COMMITTED), pushed until the caller pops it.  True with the
 * row in slot, every column deformed.
 */
static bool
head_probe(Relation rel, Relation idx, text *stream, TupleTableSlot *slot)
{
	ScanKeyData key;
	IndexScanDesc scan;
	bool		found;

	PushActiveSnapshot(GetTransactionSnapshot());
	CommandCounterIncrement();
	UpdateActiveSnapshotCommandId();

	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_TEXTEQ, PointerGetDatum(stream));
	key.sk_collation = idx->rd_indcollation[0];
	scan = index_beginscan_compat(rel, idx, GetActiveSnapshot(), 1, 0);
	index_rescan(scan, &key, 1, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	index_endscan(scan);
	if (found)
		slot_getallattrs(slot);
	return found;
}

typedef enum HeadOutcome
{
	HEAD_UNAVAILABLE,			/* use SPI */
	HEAD_ABSENT,				/* no head row */
	HEAD_CONFLICT,				/* not at the expected version */
	HEAD_BUMPED					/* written */
} HeadOutcome;

/*
 * ES_APPEND_AT (at_version) or ES_BUMP of the n events of stream, directly.
 * *version and *owner: the row's new version and owner role when bumped,
 * its actual ones on a conflict (owner InvalidOid if it has none).
 */
static HeadOutcome
head_direct_bump(text *stream, int64 n, bool at_version, int64 expected,
				 Oid caller, int64 *version, Oid *owner)
{
	Relation	rel;
	Relation	idx;
	TupleTableSlot *old;
	TupleTableSlot *new;
	TupleDesc	desc;
	HeadOutcome outcome;
	bool		pushed = false;

	/* a read-only transaction gets the executor's error from SPI */
	if (citus_present() || XactReadOnly || !streams_direct_layout())
		return HEAD_UNAVAILABLE;
	rel = table_open(streams_relid, RowExclusiveLock);
	if (streams_direct != 1)
	{
		/* changed while we waited for the lock */
		table_close(rel, RowExclusiveLock);
		return HEAD_UNAVAILABLE;
	}
	/* a publication of updates needs a replica identity, as for the UPDATE */
	CheckCmdReplicaIdentity(rel, CMD_UPDATE);
	idx = index_open(streams_pkey, RowExclusiveLock);
	desc = RelationGetDescr(rel);
	old = table_slot_create(rel, NULL);
	new = table_slot_create(rel, NULL);
	for (;;)
	{
		int64		row_version;
		TM_FailureData tmfd;
		LockTupleMode lockmode;
		UpdateIndexes_compat update_indexes;
		TM_Result	result;
		bool		found;

		CHECK_FOR_INTERRUPTS();
		if (pushed)
			PopActiveSnapshot();
		found = head_probe(rel, idx, stream, old);
		pushed = true;
		if (!found)
		{
			outcome = HEAD_ABSENT;
			break;
		}
		row_version = DatumGetInt64(HEAD_VALUE(old, SCOL_VERSION));
		*owner = HEAD_ISNULL(old, SCOL_OWNER_ROLE) ? InvalidOid :
			DatumGetObjectId(HEAD_VALUE(old, SCOL_OWNER_ROLE));
		if (at_version && row_version != expected)
		{
			*version = row_version;
			outcome = HEAD_CONFLICT;
			break;
		}
		if (pg_add_s64_overflow(row_version, n, version))
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("bigint out of range")));
		/* owner_role = COALESCE(owner_role, caller), as the UPDATE sets it */
		if (!OidIsValid(*owner))
			*owner = caller;

		ExecClearTuple(new);
		memcpy(new->tts_values, old->tts_values, sizeof(Datum) * desc->natts);
		memcpy(new->tts_isnull, old->tts_isnull, sizeof(bool) * desc->natts);
		HEAD_VALUE(new, SCOL_VERSION) = Int64GetDatum(*version);
		HEAD_VALUE(new, SCOL_UPDATED_AT) =
			TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
		HEAD_VALUE(new, SCOL_OWNER_ROLE) = ObjectIdGetDatum(*owner);
		HEAD_ISNULL(new, SCOL_OWNER_ROLE) = false;
		ExecStoreVirtualTuple(new);
		result = table_tuple_update(rel, &old->tts_tid, new, GetCurrentCommandId(true),
									GetActiveSnapshot(), InvalidSnapshot, true,
									&tmfd, &lockmode, &update_indexes);
		if (result == TM_Ok)
		{
			direct_update_indexes(rel, new, (int) update_indexes);
			outcome = HEAD_BUMPED;
			break;
		}
		if (result != TM_Updated && result != TM_Deleted)
			elog(ERROR, "unexpected result %d updating the head row of stream \"%s\"",
				 (int) result, text_to_cstring(stream));
		if (IsolationUsesXactSnapshot())
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to concurrent %s",
							result == TM_Updated ? "update" : "delete")));
		/* READ COMMITTED: changed meanwhile, look again with a new snapshot */
	}
	if (pushed)
		PopActiveSnapshot();
	ExecDropSingleTupleTableSlot(new);
	ExecDropSingleTupleTableSlot(old);
	index_close(idx, NoLock);
	table_close(rel, NoLock);
	return outcome;
}

/*
 * The head row was not at the expected version: 40001 with the actual
 * version (-1: no row), unless the stream is another role's (42501: its
 * version is that role's business too; owner InvalidOid: nobody's).
 */
static pg_noreturn_compat void
conflict(const char *name, int64 expected, int64 actual, Oid owner, Oid caller)
{
	if (OidIsValid(owner))
		tenant_check(TENANT_STREAM, name, owner, caller);
	metrics_add(RC_STREAM_CONFLICTS, 0, NULL, 1);
	ereport(ERROR,
			(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
			 errmsg("stream \"%s\" is not at version " INT64_FORMAT, name, expected),
			 actual < 0 ? errdetail("Its actual version is -1 (it does not exist).")
			 : errdetail("Its actual version is " INT64_FORMAT ".", actual),
			 errhint("Read the stream again, decide again, and append with the version read.")));
}

/* conflict() after a statement found nothing: read the row (SPI connected). */
static pg_noreturn_compat void
conflict_spi(const char *name, int64 expected, Datum *values, Oid caller)
{
	int64		actual = -1;
	Oid			owner = InvalidOid;
	bool		isnull;

	if (run_event_statement(ES_ACTUAL, values, NULL) == 1)
	{
		actual = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
		owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
											   SPI_tuptable->tupdesc, 2, &isnull));
		if (isnull)
			owner = InvalidOid;
	}
	conflict(name, expected, actual, owner, caller);
}

/* ---- the head row with Citus ---- */

/*
 * With Citus, resilience.streams is distributed by stream and the head row
 * lives on a worker, where a role has another oid than here: a regrole
 * written from the coordinator reaches the worker deparsed by name, so the
 * worker stores its own oid for the same role, and owner_role::oid read
 * back is not comparable with the caller's.  Citus also refuses the other
 * statements' forms: owner_role::text (a STABLE function of a column) in
 * an UPDATE, and COALESCE in ON CONFLICT DO UPDATE SET.  So the head row is
 * locked by a SELECT ... FOR UPDATE (routed to its one shard), which reads
 * the owner by name; the expected version and the owner are checked here,
 * then a plain UPDATE or INSERT writes it.  Holding the row lock, no other
 * append can move the version in between; the outcomes and errors are
 * those of the SPI statements.
 *
 * (SPI connected, as the tables' owner.)  Returns HEAD_BUMPED with the new
 * version and the owner (the caller's oid here for a stream that had none),
 * or raises the conflict.
 */
static HeadOutcome
head_citus(text *stream, const char *name, EventStatement which, int64 n,
		   int64 expected, Oid caller, int64 *version, Oid *owner)
{
	Datum		values[4];

	values[0] = PointerGetDatum(stream);
	/* what now() is in the statements without Citus */
	values[2] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	for (;;)
	{
		Oid			declared;

		CHECK_FOR_INTERRUPTS();
		if (run_event_statement(ES_LOCK_CITUS, values, NULL) == 1)
		{
			bool		isnull;
			int64		row_version;
			char	   *owner_name;

			row_version = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
													  SPI_tuptable->tupdesc, 1, &isnull));
			owner_name = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
			*owner = owner_name ? tenant_role_by_name(owner_name) : InvalidOid;
			if (which == ES_CREATE)
				conflict(name, -1, row_version, *owner, caller);
			if (which == ES_APPEND_AT && row_version != expected)
				conflict(name, expected, row_version, *owner, caller);
			/* before the write: nothing of another role's is written */
			tenant_check(TENANT_STREAM, name, *owner, caller);
			if (pg_add_s64_overflow(row_version, n, version))
				ereport(ERROR,
						(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						 errmsg("bigint out of range")));
			values[1] = Int64GetDatum(*version);
			values[3] = ObjectIdGetDatum(caller);
			/* a stream from 0.1 (no owner) becomes the caller's */
			run_event_statement(OidIsValid(*owner) ? ES_SET_CITUS : ES_SET_OWNER_CITUS,
								values, NULL);
			if (!OidIsValid(*owner))
				*owner = caller;
			return HEAD_BUMPED;
		}
		if (which == ES_APPEND_AT)
			conflict(name, expected, -1, InvalidOid, caller);

		/* a new stream: the role an admin declared for it, else the caller */
		declared = tenant_declared_owner(TENANT_STREAM, VARDATA_ANY(stream),
										 VARSIZE_ANY_EXHDR(stream));
		*owner = OidIsValid(declared) ? declared : caller;
		*version = n - 1;
		values[1] = Int64GetDatum(*version);
		values[3] = ObjectIdGetDatum(*owner);
		if (run_event_statement(ES_INSERT_CITUS, values, NULL) == 1)
			return HEAD_BUMPED;
		/* created meanwhile: lock it, then a conflict (-1) or a bump (NULL) */
	}
}

/*
 * append_events(stream, expected_version, events jsonb[]) → the stream's
 * new version.  -1: the stream must not exist; NULL: whatever its version.
 */
Datum
append_events(PG_FUNCTION_ARGS)
{
	text	   *stream;
	ArrayType  *events;
	Datum	   *elems;
	bool	   *elem_nulls;
	int			n;
	Datum		(*rows)[EVENT_COLUMNS];
	Datum		recorded_at = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	Oid			caller = GetUserId();
	Oid			stream_owner;
	int64		new_version;
	bool		isnull;
	EventStatement which;
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	ResilienceUser save;
	char	   *name;
	HeadOutcome head = HEAD_UNAVAILABLE;
	bool		spi = false;	/* connected (only when a statement runs) */

	if (PG_ARGISNULL(0) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", PG_ARGISNULL(0) ? "stream" : "events")));
	stream = PG_GETARG_TEXT_PP(0);
	if (VARSIZE_ANY_EXHDR(stream) < 1 || VARSIZE_ANY_EXHDR(stream) > STREAM_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stream must be 1 to 255 bytes"),
				 errdetail("It is %d bytes.", (int) VARSIZE_ANY_EXHDR(stream))));
	if (!PG_ARGISNULL(1) && PG_GETARG_INT64(1) < -1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("expected_version must be -1, a version (0 or more), or NULL"),
				 errdetail("It is " INT64_FORMAT ".", PG_GETARG_INT64(1)),
				 errhint("-1: the stream must not exist yet; NULL: append whatever its version.")));
	events = PG_GETARG_ARRAYTYPE_P(2);
	/* every element, whatever the dimensions, in storage order (like unnest) */
	deconstruct_array(events, JSONBOID, -1, false, TYPALIGN_INT, &elems, &elem_nulls, &n);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("events must not be empty")));
	rows = palloc(sizeof(*rows) * n);
	for (int i = 0; i < n; i++)
	{
		if (elem_nulls[i])
			bad_event(i + 1, n, "is NULL");
		parse_event(DatumGetJsonbP(elems[i]), i + 1, n,
					&rows[i][2], &rows[i][3], &rows[i][4]);
		rows[i][0] = PointerGetDatum(stream);
		rows[i][5] = recorded_at;
	}

	name = text_to_cstring(stream);
	resilience_become_owner(false, &save);
	values[0] = PointerGetDatum(stream);
	values[1] = Int64GetDatum(n);
	values[2] = ObjectIdGetDatum(caller);
	values[3] = ObjectIdGetDatum(caller);
	if (PG_ARGISNULL(1))
		which = ES_APPEND_ANY;
	else
	{
		which = PG_GETARG_INT64(1) == -1 ? ES_CREATE : ES_APPEND_AT;
		values[4] = PG_GETARG_DATUM(1);
	}

	/*
	 * The head row is locked by the write, so its owner is checked after it
	 * (an error undoes the write).  A stream that may be new belongs to the
	 * role an admin declared for it, else to the caller.
	 */
	if (citus_present())
	{
		need_spi(&spi);
		head = head_citus(stream, name, which, n,
						  which == ES_APPEND_AT ? PG_GETARG_INT64(1) : 0,
						  caller, &new_version, &stream_owner);
	}
	else if (which != ES_CREATE)
		head = head_direct_bump(stream, n, which == ES_APPEND_AT,
								which == ES_APPEND_AT ? PG_GETARG_INT64(1) : 0,
								caller, &new_version, &stream_owner);
	if (head == HEAD_CONFLICT)
		conflict(name, PG_GETARG_INT64(1), new_version, stream_owner, caller);
	if (head == HEAD_ABSENT && which == ES_APPEND_AT)
		conflict(name, PG_GETARG_INT64(1), -1, InvalidOid, caller);
	if (head != HEAD_BUMPED)
	{
		need_spi(&spi);
		/* the direct probe already found no row: straight to the insert */
		if (which != ES_APPEND_ANY || head == HEAD_ABSENT ||
			run_event_statement(ES_BUMP, values, nulls) != 1)
		{
			Oid			declared = InvalidOid;

			if (which != ES_APPEND_AT)
				declared = tenant_declared_owner(TENANT_STREAM, VARDATA_ANY(stream),
												 VARSIZE_ANY_EXHDR(stream));
			if (OidIsValid(declared))
				values[2] = ObjectIdGetDatum(declared);
			if (run_event_statement(which, values, nulls) != 1)
				conflict_spi(name, PG_GETARG_INT64(1), values, caller);
		}
		new_version = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 1, &isnull));
		stream_owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
													  SPI_tuptable->tupdesc, 2, &isnull));
	}
	tenant_check(TENANT_STREAM, name, stream_owner, caller);

	for (int i = 0; i < n; i++)
		rows[i][1] = Int64GetDatum(new_version - n + 1 + i);
	insert_events(rows, n, &spi);
	forward_events(PointerGetDatum(stream), new_version, n, PointerGetDatum(events), &spi);

	resilience_restore_user(&save);
	if (spi)
		SPI_finish();
	metrics_add_at_commit(RC_STREAM_EVENTS, 0, NULL, (uint64) n);
	PG_RETURN_INT64(new_version);
}
