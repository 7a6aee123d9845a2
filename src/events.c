/*-------------------------------------------------------------------------
 *
 * events.c
 *		append_events: append to an event stream at an expected version.
 *
 * One head row per stream (resilience.streams) is the lock that orders
 * appends: it is inserted or updated only if the stream is at the expected
 * version, by one statement run through SPI (a saved plan), so a concurrent
 * append that got there first makes it find nothing (40001), exactly as
 * the executor's ON CONFLICT and EvalPlanQual rules say.  The events are
 * then written after it.  Holding the head row, no other append can write
 * the same (stream, version): the event rows are inserted directly with
 * the heap and index APIs (ExecSimpleRelationInsert, the path logical
 * replication's apply uses: constraints, every index with its uniqueness
 * check, row triggers), which costs a fraction of an executor INSERT.
 * When Citus is installed the tables may be distributed and the local
 * heap is not where the rows live: the events then go through SPI too
 * (citus_present(), src/resilience.c).
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

#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
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
insert_events(Datum (*values)[EVENT_COLUMNS], int n)
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	bool		nulls[EVENT_COLUMNS] = {false};

	if (citus_present())
	{
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
forward_events(Datum stream, int64 new_version, int n, Datum events)
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
	/* outbox_publish runs here: with search_path pinned */
	resilience_become_owner(true, &save);
	run_event_statement(ES_FORWARD, values, NULL);
	resilience_restore_user(&save);
}

/*
 * The head row was not at the expected version: 40001 with the actual
 * version, unless the stream is another role's (42501: its version is that
 * role's business too).  values: the statement's, SPI connected.
 */
static pg_noreturn_compat void
conflict(const char *name, int64 expected, Datum *values, Oid caller)
{
	int64		actual = -1;
	bool		isnull;

	if (run_event_statement(ES_ACTUAL, values, NULL) == 1)
	{
		Oid			owner;

		actual = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
		owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
											   SPI_tuptable->tupdesc, 2, &isnull));
		if (!isnull)
			tenant_check(TENANT_STREAM, name, owner, caller);
	}
	metrics_add(RC_STREAM_CONFLICTS, 0, NULL, 1);
	ereport(ERROR,
			(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
			 errmsg("stream \"%s\" is not at version " INT64_FORMAT, name, expected),
			 actual < 0 ? errdetail("Its actual version is -1 (it does not exist).")
			 : errdetail("Its actual version is " INT64_FORMAT ".", actual),
			 errhint("Read the stream again, decide again, and append with the version read.")));
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
	SPI_connect();
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
	if (which != ES_APPEND_ANY || run_event_statement(ES_BUMP, values, nulls) != 1)
	{
		Oid			declared = InvalidOid;

		if (which != ES_APPEND_AT)
			declared = tenant_declared_owner(TENANT_STREAM, VARDATA_ANY(stream),
											 VARSIZE_ANY_EXHDR(stream));
		if (OidIsValid(declared))
			values[2] = ObjectIdGetDatum(declared);
		if (run_event_statement(which, values, nulls) != 1)
			conflict(name, PG_GETARG_INT64(1), values, caller);
	}
	new_version = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	stream_owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 2, &isnull));
	tenant_check(TENANT_STREAM, name, stream_owner, caller);

	for (int i = 0; i < n; i++)
		rows[i][1] = Int64GetDatum(new_version - n + 1 + i);
	insert_events(rows, n);
	forward_events(PointerGetDatum(stream), new_version, n, PointerGetDatum(events));

	resilience_restore_user(&save);
	SPI_finish();
	metrics_add_at_commit(RC_STREAM_EVENTS, 0, NULL, (uint64) n);
	PG_RETURN_INT64(new_version);
}
