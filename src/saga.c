/*-------------------------------------------------------------------------
 *
 * saga.c
 *		Orchestrated sagas: versioned definitions, the orchestrator
 *		(saga_tick), replies of async steps, and retry and abort by hand.
 *
 * A saga is a row of resilience.sagas; its definition is an immutable row of
 * resilience.saga_definitions.  The orchestrator, saga_tick(), takes the saga
 * whose next_run_at is the oldest past one, locked FOR UPDATE SKIP LOCKED,
 * and does one unit of work on it in the caller's transaction: one attempt
 * of a SQL step or compensation, sending the command of an async one,
 * applying the reply received for it, or timing it out.  The worker's sagas
 * job runs batches of such units, each batch in a transaction of its own
 * (saga_worker_tick, worker.c), until nothing is due; CALL saga_run() runs
 * one unit per transaction by hand.
 *
 * Exactly once for SQL steps: the step function runs in a subtransaction of
 * the tick's transaction, and the saga's advance (its row, the step's row and
 * the events) is written in that same transaction, so both commit or neither
 * does.  A crash before the commit leaves the saga as it was, and the step is
 * attempted again from scratch; an error in the step rolls back only the
 * subtransaction, and the failure is recorded instead.  Two ticks never work
 * on one saga at once (the row lock), and a tick reads the saga's state from
 * the row version it has locked, so it never repeats a committed step.
 *
 * Async steps are at least once: the command is published through the outbox
 * (resilience.outbox_publish, when that function exists) in the transaction
 * that records the step as waiting.  A reply (saga_step_completed/failed) is
 * stored on the saga row under the same row lock (a branch's: on the
 * branch's row, see "parallel groups") and applied by the next tick.  A
 * reply is accepted only while the step waits for it and its
 * deadline has not passed; any other reply to a command that was sent is
 * recorded as an event and ignored.  An async step whose last attempt timed
 * out (or that was abandoned by saga_abort) may have been done by its
 * participant, so it is compensated too.  A command the outbox refuses (a
 * route that does not accept its payload, say) is published in a
 * subtransaction, and its error fails that attempt for good: one saga never
 * keeps the orchestrator from the others.  Names that travel in command
 * headers are checked by saga_define (step names: letters, digits, _ - .;
 * saga names: no control characters).
 *
 * Security: every step runs as the role that defined the saga, never as a
 * superuser (saga_define refuses one; a step refuses a definer that has
 * become one), within SECURITY_LOCAL_USERID_CHANGE |
 * SECURITY_RESTRICTED_OPERATION and with search_path = pg_catalog, pg_temp
 * (resilience_become, privilege.c); every setting a step changes is
 * reverted when it returns.  A step runs in the session that ticks, and
 * sees that session's temporary tables and custom settings: a tick run by
 * hand (saga_tick, saga_run) therefore takes only the sagas whose definer
 * the session's role has the privileges of (see tick_once); the worker's
 * session belongs to no one and takes them all.  The SQL entry points are
 * SECURITY DEFINER, except saga_define, saga_start and the replies, which
 * must know who calls them and act as the extension's owner themselves:
 * saga_start records the caller as the saga's owner role, and only that
 * role, the definer, the roles that have the privileges of either, and
 * resilience_admin may reply to its async steps (src/tenants.c).
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"
#include "metrics.h"
#include "tenants.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parse_func.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#define SAGA_NAME_MAX 63
#define KEY_MAX 255
#define REASON_MAX 1024
/* How soon the worker looks again at a due saga another transaction holds. */
#define LOCKED_RETRY_MS 100
/* How often a pick scans the queue from its start rather than from the floor. */
#define FLOOR_RESET_MS 100
/*
 * The worker's batch (saga_worker_tick): at most how many units of work, and
 * for how long, it runs in one transaction, and how many subtransaction ids
 * that transaction may take before it commits (past PGPROC_MAX_CACHED_SUBXIDS
 * every other backend's snapshots would look them up in pg_subtrans).
 */
#define BATCH_UNITS 64
#define BATCH_MS 100
#define BATCH_SUBXIDS (PGPROC_MAX_CACHED_SUBXIDS / 2)

typedef enum SagaState
{
	SAGA_RUNNING,
	SAGA_COMPENSATING,
	SAGA_COMPLETED,
	SAGA_COMPENSATED,
	SAGA_PARKED,
	SAGA_SUSPENDED
} SagaState;

static const char *const state_names[] = {
	"running", "compensating", "completed", "compensated", "compensation_failed", "suspended"
};
StaticAssertDecl(lengthof(state_names) == SAGA_SUSPENDED + 1, "state_names");

typedef enum OpKind
{
	OP_NONE,
	OP_SQL,
	OP_ASYNC
} OpKind;

/* An action or a compensation. */
typedef struct SagaOp
{
	OpKind		kind;
	char	   *function;		/* OP_SQL: schema-qualified, quoted name */
} SagaOp;

/* What a step is: an action (SQL or async), a timer, or a wait for a signal. */
typedef enum StepKind
{
	STEP_ACTION,
	STEP_SLEEP,
	STEP_UNTIL,
	STEP_AWAIT,
	STEP_GROUP
} StepKind;

typedef struct SagaStepDef SagaStepDef;

struct SagaStepDef
{
	char	   *name;
	StepKind	kind;
	int64		sleep_us;		/* STEP_SLEEP */
	char	   *until_key;		/* STEP_UNTIL: the context key of its time */
	char	   *signal;			/* STEP_AWAIT (timeout_us: how long) */
	bool		continue_on_timeout;
	int			nsignalers;		/* roles that may signal besides the definer */
	char	  **signalers;
	SagaOp		action;
	SagaOp		compensation;
	char	   *topic;			/* for async operations */
	int64		timeout_us;
	int			max_attempts;
	int64		backoff_base_us;
	int64		backoff_cap_us;
	ResilienceJitter jitter;	/* none, full or equal */
	int			nretry_on;
	int		   *retry_on;		/* SQLSTATEs, or classes when retry_on_class */
	bool	   *retry_on_class;
	int			nbranches;		/* STEP_GROUP: its branches (actions) */
	SagaStepDef *branches;
};

/* A definition as loaded from resilience.saga_definitions (immutable). */
typedef struct SagaDef
{
	int64		id;
	char	   *name;
	int			version;
	Oid			definer;
	char	   *search_path;	/* the steps', or NULL (defined before 0.2) */
	int			nsteps;
	SagaStepDef *steps;
} SagaDef;

/* A saga as read from (and written back to) its locked row. */
typedef struct Saga
{
	int64		id;
	SagaDef    *def;
	SagaState	state;
	int			step;			/* 1-based; compensating: next to undo */
	int			attempt;		/* attempts made at it */
	bool		awaiting;		/* a command is out, its reply awaited */
	Jsonb	   *reply;			/* a reply not yet applied, or NULL */
	Jsonb	   *context;
	Jsonb	   *error;			/* why it compensates, or NULL */
	TimestampTz next_run_at;	/* 0: never (finished or parked) */
	TimestampTz finished_at;	/* 0: not finished */
	TimestampTz attempt_start;	/* when this tick's attempt began, or 0 */
} Saga;

/* What one attempt of a SQL step or compensation came to. */
typedef struct StepCall
{
	bool		ok;
	Jsonb	   *result;			/* ok: the function's result, or NULL */
	Jsonb	   *error;			/* !ok: the error as JSON */
	bool		retryable;
	bool		timed_out;
	int64		duration_us;
} StepCall;

/* A JSON object written as text, then parsed into a Jsonb. */
typedef struct JsonBuf
{
	StringInfoData buf;
	bool		first;
} JsonBuf;

PG_FUNCTION_INFO_V1(saga_define);
PG_FUNCTION_INFO_V1(saga_start);
PG_FUNCTION_INFO_V1(saga_tick);
PG_FUNCTION_INFO_V1(saga_worker_tick);
PG_FUNCTION_INFO_V1(saga_step_completed);
PG_FUNCTION_INFO_V1(saga_step_failed);
PG_FUNCTION_INFO_V1(saga_retry);
PG_FUNCTION_INFO_V1(saga_abort);
PG_FUNCTION_INFO_V1(saga_retention);
PG_FUNCTION_INFO_V1(saga_signal);
PG_FUNCTION_INFO_V1(saga_signal_by_key);
PG_FUNCTION_INFO_V1(saga_state_valid);

/* The saga whose step this backend is running (0: none). */
static int64 step_saga_id = 0;

/* Wake this database's worker when the transaction commits. */

/*
 * Where this backend's next tick looks first (see tick_once): the saga it
 * left due at once, and the next_run_at below which it does not scan.
 */
static int64 sticky_saga_id = 0;
static TimestampTz pick_floor = DT_NOBEGIN;
static TimestampTz pick_floor_since = 0;

/* The worker's batch, as its units go (see saga_worker_tick). */
typedef struct TickBatch
{
	int			units;			/* units run before this one */
	bool		stop;			/* end the batch after this unit */
} TickBatch;

/* Definitions by id, valid while saga_definitions is the same relation. */
typedef struct DefCacheEntry
{
	int64		id;
	SagaDef    *def;
} DefCacheEntry;

static HTAB *def_cache = NULL;
static MemoryContext def_cache_context = NULL;
static Oid	def_cache_relid = InvalidOid;

/* ---- JSON ---- */

/* Start an empty JSON object. */
static void
jb_init(JsonBuf *jb)
{
	initStringInfo(&jb->buf);
	appendStringInfoChar(&jb->buf, '{');
	jb->first = true;
}

/* Write a key (and the comma before it). */
static void
jb_key(JsonBuf *jb, const char *key)
{
	if (!jb->first)
		appendStringInfoChar(&jb->buf, ',');
	jb->first = false;
	escape_json(&jb->buf, key);
	appendStringInfoChar(&jb->buf, ':');
}

/* key: a string, or null. */
static void
jb_str(JsonBuf *jb, const char *key, const char *value)
{
	jb_key(jb, key);
	if (value)
		escape_json(&jb->buf, value);
	else
		appendStringInfoString(&jb->buf, "null");
}

/* key: an integer. */
static void
jb_int(JsonBuf *jb, const char *key, int64 value)
{
	jb_key(jb, key);
	appendStringInfo(&jb->buf, INT64_FORMAT, value);
}

/* key: a boolean. */
static void
jb_bool(JsonBuf *jb, const char *key, bool value)
{
	jb_key(jb, key);
	appendStringInfoString(&jb->buf, value ? "true" : "false");
}

/* key: a timestamp, as an ISO string. */
static void
jb_time(JsonBuf *jb, const char *key, TimestampTz t)
{
	jb_str(jb, key, timestamptz_to_str(t));
}

/* key: a JSON value, or null. */
static void
jb_jsonb(JsonBuf *jb, const char *key, Jsonb *value)
{
	jb_key(jb, key);
	if (value)
		(void) JsonbToCString(&jb->buf, &value->root, VARSIZE(value));
	else
		appendStringInfoString(&jb->buf, "null");
}

/* Close the object and parse it. */
static Jsonb *
jb_done(JsonBuf *jb)
{
	appendStringInfoChar(&jb->buf, '}');
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(jb->buf.data)));
}

/* The value of key in a JSON object (NULL if absent or JSON null). */
static Jsonb *
jsonb_get(Jsonb *obj, const char *key)
{
	JsonbValue	v;

	if (obj == NULL || !JB_ROOT_IS_OBJECT(obj) ||
		getKeyJsonValueFromContainer(&obj->root, key, strlen(key), &v) == NULL ||
		v.type == jbvNull)
		return NULL;
	return JsonbValueToJsonb(&v);
}

/* A string member of a JSON object, or NULL. */
static char *
jsonb_get_string(Jsonb *obj, const char *key)
{
	JsonbValue	v;

	if (obj == NULL || !JB_ROOT_IS_OBJECT(obj) ||
		getKeyJsonValueFromContainer(&obj->root, key, strlen(key), &v) == NULL ||
		v.type != jbvString)
		return NULL;
	return pnstrdup(v.val.string.val, v.val.string.len);
}

/* An error's message for the log: its "message" member, else its JSON. */
static char *
error_message(Jsonb *error)
{
	char	   *message = jsonb_get_string(error, "message");

	if (message)
		return message;
	return error ? JsonbToCString(NULL, &error->root, VARSIZE(error)) : pstrdup("(none)");
}

/* An ErrorData as JSON: sqlstate, message, detail, hint, context. */
static Jsonb *
error_json(ErrorData *edata, const char *message)
{
	JsonBuf		jb;

	jb_init(&jb);
	jb_str(&jb, "sqlstate", unpack_sql_state(edata->sqlerrcode));
	jb_str(&jb, "message", message ? message : edata->message);
	if (edata->detail)
		jb_str(&jb, "detail", edata->detail);
	if (edata->hint)
		jb_str(&jb, "hint", edata->hint);
	if (edata->context)
		jb_str(&jb, "context", edata->context);
	return jb_done(&jb);
}

/* ---- arguments ---- */

/* Raise 22004 if an argument is NULL. */
static void
require_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
}

/* A text argument: not NULL, 1..max bytes. */
static char *
text_arg(FunctionCallInfo fcinfo, int argno, const char *what, int max)
{
	text	   *t = resilience_arg_text(fcinfo, argno, what);
	int			len = VARSIZE_ANY_EXHDR(t);

	if (len == 0 || len > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be 1 to %d bytes long", what, max),
				 errdetail("It is %d bytes.", len)));
	return text_to_cstring(t);
}

/* Refuse to change the saga whose step is running in this transaction. */
static void
not_from_own_step(int64 saga_id, const char *function)
{
	if (step_saga_id != 0 && (saga_id == 0 || saga_id == step_saga_id))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s cannot be called from a step of saga " INT64_FORMAT,
						function, step_saga_id),
				 errdetail("The orchestrator writes that saga's state when the step returns.")));
}

/* The saga_id argument (first) of function: not NULL, not the saga of a running step. */
static int64
saga_id_arg(FunctionCallInfo fcinfo, const char *function)
{
	int64		saga_id;

	require_arg(fcinfo, 0, "saga_id");
	saga_id = PG_GETARG_INT64(0);
	not_from_own_step(saga_id, function);
	return saga_id;
}

/* ---- SPI statements ---- */

typedef enum SagaPlan
{
	PLAN_PICK,
	PLAN_PICK_ID,
	PLAN_LOCK,
	PLAN_WRITE,
	PLAN_STEP_ACTION,
	PLAN_STEP_COMP,
	PLAN_STEP_STATE,
	PLAN_STEP_ROW,
	PLAN_COMP_CANDIDATES,
	PLAN_EVENT,
	PLAN_NEXT_DUE,
	PLAN_LATEST,
	PLAN_START,
	PLAN_BY_KEY,
	PLAN_LOAD_DEF,
	PLAN_DEF_LATEST,
	PLAN_DEF_INSERT,
	PLAN_PICK_BY_HAND,
	PLAN_PICK_ID_BY_HAND,
	PLAN_SUSPEND,
	PLAN_SIGNAL_NEXT,
	PLAN_SIGNAL_CONSUME,
	PLAN_SIGNAL_INSERT,
	PLAN_ID_BY_KEY,
	PLAN_BRANCH_PICK,
	PLAN_SAGA_READ,
	PLAN_BRANCH_WRITE,
	PLAN_POKE,
	PLAN_BRANCH_INSERT,
	PLAN_BRANCH_LIST,
	PLAN_BRANCH_CANCEL,
	PLAN_BRANCH_ARM,
	PLAN_BRANCH_LOCK,
	NUM_PLANS
} SagaPlan;

#define BRANCH_COLUMNS \
	"saga_id, step_no, branch_no, state, attempts, compensation_attempts, started_at," \
	" awaiting, reply, next_run_at"
#define SAGA_COLUMNS \
	"id, definition_id, state, step, attempt, awaiting, reply, context, error, next_run_at, name"
/* a tick run by hand takes only the sagas of definers whose privileges $3 has */
#define BY_HAND_FILTER \
	" AND pg_catalog.pg_has_role($3, (SELECT d.definer::pg_catalog.oid" \
	" FROM resilience.saga_definitions d" \
	" WHERE d.id OPERATOR(pg_catalog.=) sagas.definition_id), 'USAGE')"

/*
 * a definition, one row per step in order, intervals in microseconds; a
 * parallel group's row (column 21) is followed by one per branch (column 20:
 * the branch's number, 0 for a step)
 */
#define LOAD_DEF(search_path) \
	"SELECT d.name, d.version, d.definer::pg_catalog.oid, e.s OPERATOR(pg_catalog.->>) 'name', e.s OPERATOR(pg_catalog.->>) 'action'," \
	" e.s OPERATOR(pg_catalog.->>) 'compensation', e.s OPERATOR(pg_catalog.->>) 'topic'," \
	" (pg_catalog.date_part('epoch', (e.s OPERATOR(pg_catalog.->>) 'timeout')::pg_catalog.interval) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8," \
	" (e.s OPERATOR(pg_catalog.->>) 'max_attempts')::pg_catalog.int4," \
	" (pg_catalog.date_part('epoch', (e.s OPERATOR(pg_catalog.#>>) '{backoff,base}')::pg_catalog.interval) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8," \
	" (pg_catalog.date_part('epoch', (e.s OPERATOR(pg_catalog.#>>) '{backoff,cap}')::pg_catalog.interval) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8," \
	" e.s OPERATOR(pg_catalog.#>>) '{backoff,jitter}'," \
	" ARRAY(SELECT pg_catalog.jsonb_array_elements_text(e.s OPERATOR(pg_catalog.->) 'retry_on'))," \
	" " search_path "," \
	" (pg_catalog.date_part('epoch', (e.s OPERATOR(pg_catalog.->>) 'sleep')::pg_catalog.interval) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8," \
	" e.s OPERATOR(pg_catalog.->>) 'until', e.s OPERATOR(pg_catalog.->>) 'await', e.s OPERATOR(pg_catalog.->>) 'on_timeout'," \
	" ARRAY(SELECT pg_catalog.jsonb_array_elements_text(e.s OPERATOR(pg_catalog.->) 'signalers'))," \
	" e.k, e.s OPERATOR(pg_catalog.?) 'parallel'" \
	" FROM resilience.saga_definitions d, pg_catalog.jsonb_array_elements(d.steps) WITH ORDINALITY AS g(s, n)," \
	" LATERAL (SELECT g.s, 0::pg_catalog.int8 UNION ALL SELECT b.s, b.k" \
	" FROM pg_catalog.jsonb_array_elements(g.s OPERATOR(pg_catalog.->) 'parallel') WITH ORDINALITY AS b(s, k)) AS e(s, k)" \
	" WHERE d.id OPERATOR(pg_catalog.=) $1 ORDER BY g.n, e.k"

static const char *const plan_sql[NUM_PLANS] = {
	/* the saga due longest (from a floor on), unless another tick has it */
	"SELECT " SAGA_COLUMNS " FROM resilience.sagas"
	" WHERE next_run_at OPERATOR(pg_catalog.<=) $1 AND next_run_at OPERATOR(pg_catalog.>=) $2"
	" ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED",
	"SELECT " SAGA_COLUMNS " FROM resilience.sagas"
	" WHERE id OPERATOR(pg_catalog.=) $1 AND next_run_at OPERATOR(pg_catalog.<=) $2"
	" FOR UPDATE SKIP LOCKED",
	"SELECT " SAGA_COLUMNS " FROM resilience.sagas WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
	"UPDATE resilience.sagas SET state = $2, step = $3, attempt = $4, awaiting = $5, reply = $6,"
	" context = $7, error = $8, next_run_at = $9, updated_at = $10, finished_at = $11"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	"INSERT INTO resilience.saga_steps AS s"
	" (saga_id, step_no, name, state, attempts, started_at, finished_at, result, error)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (saga_id, step_no) DO UPDATE"
	" SET state = excluded.state, attempts = excluded.attempts, finished_at = excluded.finished_at,"
	" result = excluded.result, error = COALESCE(excluded.error, s.error)",
	"UPDATE resilience.saga_steps SET state = $3, compensation_attempts = compensation_attempts OPERATOR(pg_catalog.+) $4,"
	" compensated_at = $5, error = COALESCE($6, error)"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2",
	"UPDATE resilience.saga_steps SET state = $3"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2",
	"SELECT state, attempts, compensation_attempts FROM resilience.saga_steps"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2",
	"SELECT step_no, state FROM resilience.saga_steps"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.<=) $2"
	" ORDER BY step_no DESC",
	"INSERT INTO resilience.saga_events"
	" (saga_id, at, event, step, attempt, state, error, detail, correlation_id)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
	"SELECT LEAST((SELECT pg_catalog.min(next_run_at) FROM resilience.sagas),"
	" (SELECT pg_catalog.min(next_run_at) FROM resilience.saga_branches))",
	"SELECT id, version FROM resilience.saga_definitions WHERE name OPERATOR(pg_catalog.=) $1"
	" ORDER BY version DESC LIMIT 1",
	/* a new saga, its owner role ($6) and trace context ($7) in the same row */
	"INSERT INTO resilience.sagas (definition_id, name, state, step, payload, context,"
	" idempotency_key, next_run_at, created_at, updated_at, owner_role, trace_context)"
	" VALUES ($1, $2, 'running', 1, $3, $3, $4, $5, $5, $5, $6::pg_catalog.regrole, $7)"
	" ON CONFLICT (name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
	"SELECT id, payload OPERATOR(pg_catalog.=) $3 FROM resilience.sagas"
	" WHERE name OPERATOR(pg_catalog.=) $1 AND idempotency_key OPERATOR(pg_catalog.=) $2",
	LOAD_DEF("d.search_path"),
	"SELECT version, steps OPERATOR(pg_catalog.=) $2 AND definer::pg_catalog.oid OPERATOR(pg_catalog.=) $3"
	" AND search_path IS NOT DISTINCT FROM $4"
	" FROM resilience.saga_definitions WHERE name OPERATOR(pg_catalog.=) $1 ORDER BY version DESC LIMIT 1",
	"INSERT INTO resilience.saga_definitions (name, version, steps, definer, search_path)"
	" VALUES ($1, $2, $3, $4::pg_catalog.regrole, $5)",
	/* PLAN_PICK and PLAN_PICK_ID for a tick run by hand ($3: the caller) */
	"SELECT " SAGA_COLUMNS " FROM resilience.sagas"
	" WHERE next_run_at OPERATOR(pg_catalog.<=) $1 AND next_run_at OPERATOR(pg_catalog.>=) $2"
	BY_HAND_FILTER
	" ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED",
	"SELECT " SAGA_COLUMNS " FROM resilience.sagas"
	" WHERE id OPERATOR(pg_catalog.=) $1 AND next_run_at OPERATOR(pg_catalog.<=) $2"
	BY_HAND_FILTER
	" FOR UPDATE SKIP LOCKED",
	/* park a saga whose tick failed outside its step (see tick_once) */
	"UPDATE resilience.sagas SET state = 'suspended', next_run_at = NULL, updated_at = $2"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	/* signals: the oldest one kept for an await step, its use, its arrival */
	"SELECT id, signal_id, payload FROM resilience.saga_signals"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND signal OPERATOR(pg_catalog.=) $2 AND consumed_at IS NULL"
	" ORDER BY id LIMIT 1",
	"UPDATE resilience.saga_signals SET consumed_at = $3, consumed_by = $4"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND id OPERATOR(pg_catalog.=) $2",
	"INSERT INTO resilience.saga_signals (saga_id, signal, signal_id, payload, sent_by, received_at)"
	" VALUES ($1, $2, $3, $4, $5::pg_catalog.regrole, $6) ON CONFLICT (saga_id, signal_id) DO NOTHING RETURNING id",
	"SELECT id FROM resilience.sagas"
	" WHERE name OPERATOR(pg_catalog.=) $1 AND idempotency_key OPERATOR(pg_catalog.=) $2",
	/* parallel groups: the branch due longest, unless another tick has it ($2: by hand) */
	"SELECT " BRANCH_COLUMNS " FROM resilience.saga_branches b"
	" WHERE next_run_at OPERATOR(pg_catalog.<=) $1 AND ($2 OPERATOR(pg_catalog.=) 0::pg_catalog.oid"
	" OR pg_catalog.pg_has_role($2, (SELECT d.definer::pg_catalog.oid"
	" FROM resilience.sagas s, resilience.saga_definitions d WHERE s.id OPERATOR(pg_catalog.=) b.saga_id"
	" AND d.id OPERATOR(pg_catalog.=) s.definition_id), 'USAGE'))"
	" ORDER BY next_run_at LIMIT 1 FOR UPDATE OF b SKIP LOCKED",
	"SELECT " SAGA_COLUMNS " FROM resilience.sagas WHERE id OPERATOR(pg_catalog.=) $1",
	"UPDATE resilience.saga_branches SET state = $4, attempts = $5, compensation_attempts = $6,"
	" next_run_at = $7, started_at = COALESCE(started_at, $8), finished_at = COALESCE($9, finished_at),"
	" compensated_at = $10, result = COALESCE($11, result), error = COALESCE($12, error),"
	" awaiting = $13, reply = $14"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2"
	" AND branch_no OPERATOR(pg_catalog.=) $3",
	/* a branch finished: its saga is due (it waits at the group) */
	"UPDATE resilience.sagas SET next_run_at = $2 WHERE id OPERATOR(pg_catalog.=) $1"
	" AND state OPERATOR(pg_catalog.=) ANY ('{running,compensating}'::pg_catalog.text[]) AND next_run_at OPERATOR(pg_catalog.>) $2",
	"INSERT INTO resilience.saga_branches (saga_id, step_no, branch_no, name, state, next_run_at)"
	" SELECT $1, $2, b.n::pg_catalog.int4, b.name, 'pending', $3"
	" FROM pg_catalog.unnest($4) WITH ORDINALITY AS b(name, n) ON CONFLICT DO NOTHING RETURNING branch_no",
	"SELECT branch_no, state, result, error FROM resilience.saga_branches"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2 ORDER BY branch_no",
	/*
	 * the saga's tick never waits for a branch row: a locked one is running;
	 * one whose command is out is running too
	 */
	"UPDATE resilience.saga_branches SET next_run_at = NULL, finished_at = $3,"
	" state = CASE WHEN branch_no OPERATOR(pg_catalog.=) ANY ($4) AND attempts OPERATOR(pg_catalog.>) 0"
	" AND error OPERATOR(pg_catalog.->>) 'sqlstate' OPERATOR(pg_catalog.=) '57014' THEN 'timed_out' ELSE 'cancelled' END"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2 AND branch_no OPERATOR(pg_catalog.=) ANY"
	" (SELECT branch_no FROM resilience.saga_branches WHERE saga_id OPERATOR(pg_catalog.=) $1"
	" AND step_no OPERATOR(pg_catalog.=) $2 AND state OPERATOR(pg_catalog.=) 'pending' AND NOT awaiting"
	" FOR UPDATE SKIP LOCKED)",
	"UPDATE resilience.saga_branches SET state = 'compensating', next_run_at = $4"
	" WHERE saga_id OPERATOR(pg_catalog.=) $1 AND step_no OPERATOR(pg_catalog.=) $2 AND branch_no OPERATOR(pg_catalog.=) ANY"
	" (SELECT branch_no FROM resilience.saga_branches WHERE saga_id OPERATOR(pg_catalog.=) $1"
	" AND step_no OPERATOR(pg_catalog.=) $2 AND state OPERATOR(pg_catalog.=) ANY ($3)"
	" AND branch_no OPERATOR(pg_catalog.=) ANY ($5) FOR UPDATE SKIP LOCKED) RETURNING " BRANCH_COLUMNS,
	/* a reply to a branch's command: its row, waiting for a tick that holds it */
	"SELECT " BRANCH_COLUMNS " FROM resilience.saga_branches WHERE saga_id OPERATOR(pg_catalog.=) $1"
	" AND step_no OPERATOR(pg_catalog.=) $2 AND branch_no OPERATOR(pg_catalog.=) $3 FOR UPDATE",
};

static const int plan_nargs[NUM_PLANS] = {2, 2, 1, 11, 9, 6, 3, 2, 2, 9, 0, 1, 7, 3, 1, 4, 5, 3, 3, 2, 2, 4, 6, 2,
2, 1, 14, 2, 4, 2, 4, 5, 3};

#define MAX_PLAN_ARGS 14
static const Oid plan_argtypes[NUM_PLANS][MAX_PLAN_ARGS] = {
	{TIMESTAMPTZOID, TIMESTAMPTZOID},
	{INT8OID, TIMESTAMPTZOID},
	{INT8OID},
	{INT8OID, TEXTOID, INT4OID, INT4OID, BOOLOID, JSONBOID, JSONBOID, JSONBOID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID},
	{INT8OID, INT4OID, TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID, JSONBOID, JSONBOID},
	{INT8OID, INT4OID, TEXTOID, INT4OID, TIMESTAMPTZOID, JSONBOID},
	{INT8OID, INT4OID, TEXTOID},
	{INT8OID, INT4OID},
	{INT8OID, INT4OID},
	{INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID, INT4OID, TEXTOID, JSONBOID, JSONBOID, TEXTOID},
	{InvalidOid},
	{TEXTOID},
	{INT8OID, TEXTOID, JSONBOID, TEXTOID, TIMESTAMPTZOID, OIDOID, JSONBOID},
	{TEXTOID, TEXTOID, JSONBOID},
	{INT8OID},
	{TEXTOID, JSONBOID, OIDOID, TEXTOID},
	{TEXTOID, INT4OID, JSONBOID, OIDOID, TEXTOID},
	{TIMESTAMPTZOID, TIMESTAMPTZOID, OIDOID},
	{INT8OID, TIMESTAMPTZOID, OIDOID},
	{INT8OID, TIMESTAMPTZOID},
	{INT8OID, TEXTOID},
	{INT8OID, INT8OID, TIMESTAMPTZOID, TEXTOID},
	{INT8OID, TEXTOID, TEXTOID, JSONBOID, OIDOID, TIMESTAMPTZOID},
	{TEXTOID, TEXTOID},
	{TIMESTAMPTZOID, OIDOID},
	{INT8OID},
	{INT8OID, INT4OID, INT4OID, TEXTOID, INT4OID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, JSONBOID, JSONBOID, BOOLOID, JSONBOID},
	{INT8OID, TIMESTAMPTZOID},
	{INT8OID, INT4OID, TIMESTAMPTZOID, TEXTARRAYOID},
	{INT8OID, INT4OID},
	{INT8OID, INT4OID, TIMESTAMPTZOID, INT4ARRAYOID},
	{INT8OID, INT4OID, TEXTARRAYOID, TIMESTAMPTZOID, INT4ARRAYOID},
	{INT8OID, INT4OID, INT4OID},
};

/*
 * The statements that differ on a 0.1 schema, which this library still
 * drives until ALTER EXTENSION resilience UPDATE: no search_path recorded,
 * no parallel groups (saga_branches).
 */
static const char *const plan_sql_0_1[NUM_PLANS] = {
	[PLAN_NEXT_DUE] = "SELECT pg_catalog.min(next_run_at) FROM resilience.sagas",
	/* no owner_role, no trace_context ($6 and $7 unused) */
	[PLAN_START] = "INSERT INTO resilience.sagas (definition_id, name, state, step, payload, context,"
	" idempotency_key, next_run_at, created_at, updated_at)"
	" VALUES ($1, $2, 'running', 1, $3, $3, $4, $5, $5, $5)"
	" ON CONFLICT (name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
	[PLAN_LOAD_DEF] = LOAD_DEF("NULL::pg_catalog.text"),
	[PLAN_DEF_LATEST] = "SELECT version, steps OPERATOR(pg_catalog.=) $2"
	" AND definer::pg_catalog.oid OPERATOR(pg_catalog.=) $3"
	" FROM resilience.saga_definitions WHERE name OPERATOR(pg_catalog.=) $1 ORDER BY version DESC LIMIT 1",
	[PLAN_DEF_INSERT] = "INSERT INTO resilience.saga_definitions (name, version, steps, definer)"
	" VALUES ($1, $2, $3, $4::pg_catalog.regrole)",
};

static SPIPlanPtr plans[NUM_PLANS];
static SPIPlanPtr plans_0_1[NUM_PLANS];

/* Is the schema 0.1's (saga_definitions without search_path)? */
static bool
schema_is_0_1(void)
{
	return get_attnum(resilience_relid("saga_definitions"), "search_path") == InvalidAttrNumber;
}

/*
 * Run one of the statements above (inside SPI); isnull may be NULL when no
 * argument is NULL.  Returns the number of rows processed.
 *
 * Every statement has an index to use, and must use it whatever the
 * statistics say: a plan made while a table was empty (new, or vacuumed
 * after the reaper emptied it) would otherwise scan the whole table on
 * every step until the next ANALYZE.  So they are planned, and run, with
 * enable_seqscan off, for these statements only.
 */
static uint64
run_plan(SagaPlan which, Datum *values, const bool *isnull)
{
	char		nulls[MAX_PLAN_ARGS];
	int			i;
	int			ret;
	int			nestlevel;

	bool		old = plan_sql_0_1[which] != NULL && schema_is_0_1();
	SPIPlanPtr *slot = old ? &plans_0_1[which] : &plans[which];

	if (*slot == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(old ? plan_sql_0_1[which] : plan_sql[which],
									   plan_nargs[which], (Oid *) plan_argtypes[which]);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		*slot = plan;
	}
	for (i = 0; i < plan_nargs[which]; i++)
		nulls[i] = (isnull && isnull[i]) ? 'n' : ' ';
	nestlevel = NewGUCNestLevel();
	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	ret = SPI_execute_plan(*slot, values, nulls, false, 0);
	AtEOXact_GUC(true, nestlevel);
	if (ret < 0)
		elog(ERROR, "SPI_execute_plan failed: %s", SPI_result_code_string(ret));
	return SPI_processed;
}

/* Column attno of row of the last result (1-based attno). */
static Datum
column(uint64 row, int attno, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, attno, isnull);
}

/* Is column attno of row of the last result NULL? */
static bool
column_is_null(uint64 row, int attno)
{
	bool		isnull;

	(void) column(row, attno, &isnull);
	return isnull;
}

/* A jsonb column of the last result, or NULL. */
static Jsonb *
column_jsonb(uint64 row, int attno)
{
	bool		isnull;
	Datum		d = column(row, attno, &isnull);

	return isnull ? NULL : DatumGetJsonbP(d);
}

/* A text column of the last result, as a C string, or NULL. */
static char *
column_text(uint64 row, int attno)
{
	bool		isnull;
	Datum		d = column(row, attno, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* ---- definitions ---- */

/* One action or compensation as stored: NULL, "async" or a function name. */
static SagaOp
parse_op(const char *value)
{
	SagaOp		op = {OP_NONE, NULL};

	if (value == NULL)
		return op;
	if (strcmp(value, "async") == 0)
		op.kind = OP_ASYNC;
	else
	{
		op.kind = OP_SQL;
		op.function = pstrdup(value);
	}
	return op;
}

/* "40001" or the class "40" as a SQLSTATE code. */
static int
parse_sqlstate(const char *code, bool *is_class)
{
	*is_class = strlen(code) == 2;
	if (*is_class)
		return MAKE_SQLSTATE(code[0], code[1], '0', '0', '0');
	if (strlen(code) != 5)
		elog(ERROR, "invalid SQLSTATE \"%s\" in a saga definition", code);
	return MAKE_SQLSTATE(code[0], code[1], code[2], code[3], code[4]);
}

/* Step (or branch) pos of definition id from row i of PLAN_LOAD_DEF's result. */
static void
step_parse(uint64 i, SagaStepDef *st, int64 id, int pos)
{
	char	   *jitter;
	Datum	   *codes;
	bool	   *code_nulls;
	int			j;
	bool		isnull;

	st->name = column_text(i, 4);
	st->until_key = column_text(i, 16);
	st->signal = column_text(i, 17);
	st->continue_on_timeout = st->signal && strcmp(column_text(i, 18), "continue") == 0;
	if (DatumGetBool(column(i, 21, &isnull)))
		st->kind = STEP_GROUP;
	else if (!column_is_null(i, 15))
	{
		st->kind = STEP_SLEEP;
		st->sleep_us = DatumGetInt64(column(i, 15, &isnull));
	}
	else
		st->kind = st->until_key ? STEP_UNTIL : st->signal ? STEP_AWAIT : STEP_ACTION;
	deconstruct_array(DatumGetArrayTypeP(column(i, 19, &isnull)), TEXTOID, -1, false,
					  TYPALIGN_INT, &codes, &code_nulls, &st->nsignalers);
	st->signalers = palloc0(Max(st->nsignalers, 1) * sizeof(char *));
	for (j = 0; j < st->nsignalers; j++)
		st->signalers[j] = TextDatumGetCString(codes[j]);
	st->action = parse_op(column_text(i, 5));
	st->compensation = parse_op(column_text(i, 6));
	st->topic = column_text(i, 7);
	st->timeout_us = DatumGetInt64(column(i, 8, &isnull));
	st->max_attempts = DatumGetInt32(column(i, 9, &isnull));
	st->backoff_base_us = DatumGetInt64(column(i, 10, &isnull));
	st->backoff_cap_us = DatumGetInt64(column(i, 11, &isnull));
	jitter = column_text(i, 12);
	st->jitter = jitter == NULL ? JITTER_FULL : strcmp(jitter, "none") == 0 ? JITTER_NONE :
		strcmp(jitter, "equal") == 0 ? JITTER_EQUAL : JITTER_FULL;
	deconstruct_array(DatumGetArrayTypeP(column(i, 13, &isnull)), TEXTOID, -1, false,
					  TYPALIGN_INT, &codes, &code_nulls, &st->nretry_on);
	st->retry_on = palloc0(Max(st->nretry_on, 1) * sizeof(int));
	st->retry_on_class = palloc0(Max(st->nretry_on, 1) * sizeof(bool));
	for (j = 0; j < st->nretry_on; j++)
		st->retry_on[j] = parse_sqlstate(TextDatumGetCString(codes[j]), &st->retry_on_class[j]);
	if (st->name == NULL ||
		(st->kind == STEP_ACTION &&
		 (st->action.kind == OP_NONE || st->timeout_us <= 0 || st->max_attempts < 1 ||
		  st->backoff_base_us <= 0 || st->backoff_cap_us < st->backoff_base_us)) ||
		(st->kind == STEP_SLEEP && st->sleep_us <= 0) ||
		(st->kind == STEP_AWAIT && st->timeout_us <= 0) ||
		(st->kind != STEP_ACTION && (st->action.kind != OP_NONE || st->compensation.kind != OP_NONE)))
		elog(ERROR, "saga definition " INT64_FORMAT " is invalid at step %d", id, pos);
}

/* Load definition id (inside SPI) into mcxt. */
static SagaDef *
definition_load(int64 id, MemoryContext mcxt)
{
	Datum		values[1];
	SagaDef    *def;
	MemoryContext oldcontext;
	uint64		n;
	uint64		i;
	bool		isnull;
	SagaStepDef *group = NULL;

	values[0] = Int64GetDatum(id);
	n = run_plan(PLAN_LOAD_DEF, values, NULL);
	if (n == 0)
		elog(ERROR, "saga definition " INT64_FORMAT " does not exist", id);

	oldcontext = MemoryContextSwitchTo(mcxt);
	def = palloc0(sizeof(SagaDef));
	def->id = id;
	def->name = column_text(0, 1);
	def->version = DatumGetInt32(column(0, 2, &isnull));
	def->definer = DatumGetObjectId(column(0, 3, &isnull));
	def->search_path = column_text(0, 14);
	def->steps = palloc0(n * sizeof(SagaStepDef));
	for (i = 0; i < n; i++)
	{
		int64		branch = DatumGetInt64(column(i, 20, &isnull));
		SagaStepDef *st;

		if (branch == 0)
		{
			st = &def->steps[def->nsteps++];
			step_parse(i, st, id, def->nsteps);
			group = st->kind == STEP_GROUP ? st : NULL;
			if (group)
				group->branches = palloc0(n * sizeof(SagaStepDef));
			continue;
		}
		if (group == NULL || branch != group->nbranches + 1)
			elog(ERROR, "saga definition " INT64_FORMAT " is invalid at step %d", id, def->nsteps);
		st = &group->branches[group->nbranches++];
		step_parse(i, st, id, def->nsteps);
		if (st->kind != STEP_ACTION)
			elog(ERROR, "saga definition " INT64_FORMAT " is invalid at step %d", id, def->nsteps);
	}
	for (i = 0; i < def->nsteps; i++)
		if (def->steps[i].kind == STEP_GROUP && def->steps[i].nbranches < 2)
			elog(ERROR, "saga definition " INT64_FORMAT " is invalid at step %d", id, (int) i + 1);
	MemoryContextSwitchTo(oldcontext);
	return def;
}

/*
 * Definition id, from the cache (definitions never change; the cache is
 * dropped when saga_definitions is a new relation, after the extension was
 * dropped and created again).
 */
static SagaDef *
definition_get(int64 id)
{
	Oid			relid = resilience_relid("saga_definitions");
	DefCacheEntry *entry;
	SagaDef    *def;
	bool		found;

	if (def_cache != NULL && relid != def_cache_relid)
	{
		hash_destroy(def_cache);
		def_cache = NULL;
		MemoryContextReset(def_cache_context);
	}
	if (def_cache == NULL)
	{
		HASHCTL		ctl;

		if (def_cache_context == NULL)
			def_cache_context = AllocSetContextCreate(CacheMemoryContext, "resilience saga definitions",
													  ALLOCSET_SMALL_SIZES);
		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(DefCacheEntry);
		ctl.hcxt = def_cache_context;
		def_cache = hash_create("resilience saga definitions", 64, &ctl,
								HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		def_cache_relid = relid;
	}
	entry = hash_search(def_cache, &id, HASH_FIND, NULL);
	if (entry)
		return entry->def;
	def = definition_load(id, def_cache_context);
	entry = hash_search(def_cache, &id, HASH_ENTER, &found);
	entry->def = def;
	return def;
}

/* The 1-based number of the step called name, or 0. */
static int
step_number(SagaDef *def, const char *name)
{
	int			i;

	for (i = 0; i < def->nsteps; i++)
		if (strcmp(def->steps[i].name, name) == 0)
			return i + 1;
	return 0;
}

/* ---- the saga row ---- */

/* The SagaState of a state name. */
static SagaState
state_from_name(const char *name)
{
	int			i;

	for (i = 0; i < lengthof(state_names); i++)
		if (strcmp(state_names[i], name) == 0)
			return (SagaState) i;
	elog(ERROR, "unknown saga state \"%s\"", name);
	return SAGA_RUNNING;		/* keep the compiler quiet */
}

/* Read the saga of row 0 of the last result (SAGA_COLUMNS). */
static void
saga_read(Saga *s)
{
	bool		isnull;
	int64		definition_id;
	Datum		d;

	memset(s, 0, sizeof(Saga));
	s->id = DatumGetInt64(column(0, 1, &isnull));
	definition_id = DatumGetInt64(column(0, 2, &isnull));
	s->state = state_from_name(column_text(0, 3));
	s->step = DatumGetInt32(column(0, 4, &isnull));
	s->attempt = DatumGetInt32(column(0, 5, &isnull));
	s->awaiting = DatumGetBool(column(0, 6, &isnull));
	s->reply = column_jsonb(0, 7);
	s->context = column_jsonb(0, 8);
	s->error = column_jsonb(0, 9);
	d = column(0, 10, &isnull);
	s->next_run_at = isnull ? 0 : DatumGetTimestampTz(d);
	/* last: it may run another statement */
	s->def = definition_get(definition_id);
	if (s->step < 0 || s->step > s->def->nsteps ||
		(s->step == 0 && (s->state == SAGA_RUNNING || s->state == SAGA_PARKED)))
		elog(ERROR, "saga " INT64_FORMAT " is at step %d, which its definition does not have",
			 s->id, s->step);
}

/* Lock saga id (waiting for other transactions); 42704 if there is none. */
static void
saga_lock(Saga *s, int64 id)
{
	Datum		values[1];

	values[0] = Int64GetDatum(id);
	if (run_plan(PLAN_LOCK, values, NULL) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("saga " INT64_FORMAT " does not exist", id),
				 errhint("Finished sagas are removed after resilience.saga_retention.")));
	saga_read(s);
}

/* Write the saga back to its (locked) row. */
static void
saga_write(Saga *s)
{
	Datum		values[11];
	bool		isnull[11] = {0};

	values[0] = Int64GetDatum(s->id);
	values[1] = CStringGetTextDatum(state_names[s->state]);
	values[2] = Int32GetDatum(s->step);
	values[3] = Int32GetDatum(s->attempt);
	values[4] = BoolGetDatum(s->awaiting);
	values[5] = JsonbPGetDatum(s->reply);
	isnull[5] = s->reply == NULL;
	values[6] = JsonbPGetDatum(s->context);
	values[7] = JsonbPGetDatum(s->error);
	isnull[7] = s->error == NULL;
	values[8] = TimestampTzGetDatum(s->next_run_at);
	isnull[8] = s->next_run_at == 0;
	values[9] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[10] = TimestampTzGetDatum(s->finished_at);
	isnull[10] = s->finished_at == 0;
	run_plan(PLAN_WRITE, values, isnull);
}

/*
 * The key participants see: saga:<id>:<step>[:compensate] (step: a step's
 * or a branch's name, unique in the saga).
 */
static char *
idempotency_key(Saga *s, const char *step, bool compensation)
{
	return psprintf("saga:" INT64_FORMAT ":%s%s", s->id, step, compensation ? ":compensate" : "");
}

/*
 * Record an event about step (a step's or a branch's name; NULL: about the
 * saga as a whole; attempt 0: none), with the saga's state as it is now.
 */
static void
saga_event_at(Saga *s, const char *event, const char *step, int attempt, bool compensation,
			  Jsonb *error, Jsonb *detail)
{
	Datum		values[9];
	bool		isnull[9] = {0};

	values[0] = Int64GetDatum(s->id);
	values[1] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[2] = CStringGetTextDatum(event);
	isnull[3] = step == NULL;
	if (step)
		values[3] = CStringGetTextDatum(step);
	values[4] = Int32GetDatum(attempt);
	isnull[4] = attempt == 0;
	values[5] = CStringGetTextDatum(state_names[s->state]);
	values[6] = JsonbPGetDatum(error);
	isnull[6] = error == NULL;
	values[7] = JsonbPGetDatum(detail);
	isnull[7] = detail == NULL;
	values[8] = CStringGetTextDatum(step ? idempotency_key(s, step, compensation) :
									psprintf("saga:" INT64_FORMAT, s->id));
	run_plan(PLAN_EVENT, values, isnull);
	if (s->def)					/* saga_start counts its own */
		metrics_add_at_commit(RC_SAGA_EVENTS, metrics_saga_event(event), s->def->name, 1);
}

/* An event about step number stepno (0: about the saga as a whole). */
static void
saga_event(Saga *s, const char *event, int stepno, int attempt, bool compensation,
		   Jsonb *error, Jsonb *detail)
{
	saga_event_at(s, event, stepno ? s->def->steps[stepno - 1].name : NULL, attempt,
				  compensation, error, detail);
}

/* Write the action side of a step's row (created on its first attempt). */
static void
step_row_action(Saga *s, const char *state, int attempts, TimestampTz finished_at,
				Jsonb *result, Jsonb *error)
{
	Datum		values[9];
	bool		isnull[9] = {0};

	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	values[2] = CStringGetTextDatum(s->def->steps[s->step - 1].name);
	values[3] = CStringGetTextDatum(state);
	values[4] = Int32GetDatum(attempts);
	values[5] = TimestampTzGetDatum(s->attempt_start ? s->attempt_start : GetCurrentTimestamp());
	values[6] = TimestampTzGetDatum(finished_at);
	isnull[6] = finished_at == 0;
	values[7] = JsonbPGetDatum(result);
	isnull[7] = result == NULL;
	values[8] = JsonbPGetDatum(error);
	isnull[8] = error == NULL;
	run_plan(PLAN_STEP_ACTION, values, isnull);
}

/*
 * Write the compensation side of a step's row; its compensation_attempts
 * count every attempt (a SQL call, or a command sent) across saga_retry.
 */
static void
step_row_compensation(Saga *s, const char *state, bool new_attempt, TimestampTz compensated_at,
					  Jsonb *error)
{
	Datum		values[6];
	bool		isnull[6] = {0};

	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	values[2] = CStringGetTextDatum(state);
	values[3] = Int32GetDatum(new_attempt ? 1 : 0);
	values[4] = TimestampTzGetDatum(compensated_at);
	isnull[4] = compensated_at == 0;
	values[5] = JsonbPGetDatum(error);
	isnull[5] = error == NULL;
	run_plan(PLAN_STEP_COMP, values, isnull);
}

/* Set the state of step stepno's row, if it has one. */
static void
step_row_state(Saga *s, int stepno, const char *state)
{
	Datum		values[3];

	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(stepno);
	values[2] = CStringGetTextDatum(state);
	run_plan(PLAN_STEP_STATE, values, NULL);
}

/*
 * State and attempts (of the action, or of the compensation) of step
 * stepno's row; false if the saga has not reached that step.
 */
static bool
step_row_read(Saga *s, int stepno, bool compensation, char **state, int *attempts)
{
	Datum		values[2];
	bool		isnull;

	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(stepno);
	if (run_plan(PLAN_STEP_ROW, values, NULL) == 0)
		return false;
	*state = column_text(0, 1);
	*attempts = DatumGetInt32(column(0, compensation ? 3 : 2, &isnull));
	return true;
}

/* ---- context ---- */

/* Push "key": v into the object being built (v NULL: a string, str). */
static void
jv_push(JsonbParseState **state, const char *key, JsonbValue *v, const char *str)
{
	JsonbValue	k;
	JsonbValue	s;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	pushJsonbValue(state, WJB_KEY, &k);
	if (v == NULL)
	{
		s.type = jbvString;
		s.val.string.val = (char *) str;
		s.val.string.len = strlen(str);
		v = &s;
	}
	pushJsonbValue(state, WJB_VALUE, v);
}

/* An integer or a boolean as a JsonbValue, for jv_push. */
static JsonbValue *
jv_int(JsonbValue *v, int64 value)
{
	v->type = jbvNumeric;
	v->val.numeric = int64_to_numeric(value);
	return v;
}

static JsonbValue *
jv_bool(JsonbValue *v, bool value)
{
	v->type = jbvBool;
	v->val.boolean = value;
	return v;
}

/*
 * The context step st (the current step, or a branch of it, a group)
 * receives: the saga's, with "_saga" describing the call.  Built as a
 * JsonbValue, not as text to parse: it is made for every step attempt.
 */
static Jsonb *
step_context(Saga *s, SagaStepDef *st, bool compensation, int attempt)
{
	SagaStepDef *current = &s->def->steps[s->step - 1];
	JsonbParseState *state = NULL;
	JsonbValue	k;
	JsonbValue	v;
	JsonbValue *call;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	k.type = jbvString;
	k.val.string.val = "_saga";
	k.val.string.len = strlen("_saga");
	pushJsonbValue(&state, WJB_KEY, &k);
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	jv_push(&state, "id", jv_int(&v, s->id), NULL);
	jv_push(&state, "name", NULL, s->def->name);
	jv_push(&state, "version", jv_int(&v, s->def->version), NULL);
	jv_push(&state, "step", NULL, st->name);
	jv_push(&state, "step_no", jv_int(&v, s->step), NULL);
	if (st != current)
		jv_push(&state, "group", NULL, current->name);
	jv_push(&state, "attempt", jv_int(&v, attempt), NULL);
	jv_push(&state, "compensating", jv_bool(&v, compensation), NULL);
	jv_push(&state, "idempotency_key", NULL, idempotency_key(s, st->name, compensation));
	pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	call = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(s->context),
											  JsonbPGetDatum(JsonbValueToJsonb(call))));
}

/* The saga's context with a step's result merged in (top-level keys). */
static Jsonb *
context_merge(Jsonb *context, Jsonb *result)
{
	Datum		d;

	if (result == NULL)
		return context;
	d = DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(context), JsonbPGetDatum(result));
	d = DirectFunctionCall2(jsonb_delete, d, CStringGetTextDatum("_saga"));
	return DatumGetJsonbP(d);
}

/* ---- running a SQL step ---- */

/*
 * The function to call for a step, as the definer sees it, with every check
 * the executor would make.  Raises (inside the step's subtransaction, so that
 * the attempt fails) if it cannot run.
 */
static Oid
step_function(const char *name, Oid definer)
{
	Oid			argtypes[2] = {INT8OID, JSONBOID};
	Oid			fn;
	char	   *role = GetUserNameFromId(definer, true);

	if (role == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the role that defined this saga no longer exists"),
				 errhint("Define the saga again as an existing role.")));
	if (superuser_arg(definer))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("saga steps never run as a superuser"),
				 errdetail("Role %s, which defined this saga, is a superuser now.", role),
				 errhint("Revoke SUPERUSER from %s, or define the saga again as another role.", role)));
	fn = LookupFuncName(textToQualifiedNameList(cstring_to_text(name)), 2, argtypes, true);
	if (!OidIsValid(fn))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function %s(bigint, jsonb) does not exist", name),
				 errhint("It existed when the saga was defined: create it again.")));
	if (get_func_prokind(fn) != PROKIND_FUNCTION || get_func_retset(fn) ||
		get_func_rettype(fn) != JSONBOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("%s is no longer a function returning jsonb", name)));
	if (pg_proc_aclcheck_compat(fn, definer, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", name),
				 errdetail("Steps run as %s, which defined the saga.", role)));
	return fn;
}

/*
 * Act as the saga's definer for a step (resilience_become: a restricted
 * operation whose settings are reverted), with the search_path recorded
 * when the saga was defined: the step resolves names as its author did.
 * Definitions from before 0.2 have none and keep the pinned one.
 */
static void
step_become(SagaDef *def, ResilienceUser *save)
{
	resilience_become(def->definer, true, save);
	if (def->search_path)
		(void) set_config_option("search_path", def->search_path, PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
}

/* Put back the caller's statement timeout after a step's own. */
static void
restore_statement_timeout(bool outer_active, TimestampTz outer_fin)
{
	disable_timeout(STATEMENT_TIMEOUT, false);
	if (outer_active)
		enable_timeout_at(STATEMENT_TIMEOUT, outer_fin);
}

/* Is this error one the step says to retry (retry_on)? */
static bool
sql_retryable(SagaStepDef *st, int sqlerrcode)
{
	int			i;

	for (i = 0; i < st->nretry_on; i++)
		if (st->retry_on_class[i] ? ERRCODE_TO_CATEGORY(sqlerrcode) == st->retry_on[i]
			: sqlerrcode == st->retry_on[i])
			return true;
	return false;
}

/*
 * One attempt of the SQL action (or compensation) of step st (the saga's
 * current step, or a branch of it), in a subtransaction: as the definer, in a security-restricted
 * operation, with a pinned search_path, every setting it changes reverted,
 * and cancelled when its timeout passes.  An error rolls the subtransaction
 * back and is returned in *out; a cancel that is not the step's own timeout
 * (the caller's statement_timeout, pg_cancel_backend) is raised again.
 */
static void
call_sql_step(Saga *s, SagaStepDef *st, bool compensation, int attempt, StepCall *out)
{
	SagaOp	   *op = compensation ? &st->compensation : &st->action;
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	TimestampTz start = GetCurrentTimestamp();
	TimestampTz deadline = start + st->timeout_us;
	bool		outer_active = get_timeout_active(STATEMENT_TIMEOUT);
	TimestampTz outer_fin = outer_active ? get_timeout_finish_time(STATEMENT_TIMEOUT) : 0;
	bool		armed = !outer_active || deadline < outer_fin;
	Jsonb	   *context = step_context(s, st, compensation, attempt);
	ErrorContextCallback *outer_context = error_context_stack;
	ResilienceUser save;

	memset(out, 0, sizeof(StepCall));
	s->attempt_start = start;
	GetUserIdAndSecContext(&save.userid, &save.sec_context);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	step_saga_id = s->id;
	PG_TRY();
	{
		Oid			fn = step_function(op->function, s->def->definer);
		FmgrInfo	flinfo;
		LOCAL_FCINFO(fcinfo, 2);
		Datum		result;

		fmgr_info(fn, &flinfo);
		InitFunctionCallInfoData(*fcinfo, &flinfo, 2, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = Int64GetDatum(s->id);
		fcinfo->args[0].isnull = false;
		fcinfo->args[1].value = JsonbPGetDatum(context);
		fcinfo->args[1].isnull = false;

		if (armed)
			enable_timeout_at(STATEMENT_TIMEOUT, deadline);
		step_become(s->def, &save);
		InvokeFunctionExecuteHook(fn);
		/* the step's errors carry its own context, not the orchestrator's */
		error_context_stack = NULL;
		result = FunctionCallInvoke(fcinfo);
		error_context_stack = outer_context;
		if (!fcinfo->isnull)
		{
			out->result = DatumGetJsonbPCopy(result);
			if (!JB_ROOT_IS_OBJECT(out->result))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("%s returned a JSON value that is not an object", op->function),
						 errdetail("Its result is merged into the saga's context: return an object, or NULL.")));
		}
		resilience_restore_user(&save);
		if (armed)
			restore_statement_timeout(outer_active, outer_fin);

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		out->ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		if (armed)
			restore_statement_timeout(outer_active, outer_fin);
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		/* the rollback restored the settings; the user, to be sure */
		SetUserIdAndSecContext(save.userid, save.sec_context);
		step_saga_id = 0;

		out->timed_out = edata->sqlerrcode == ERRCODE_QUERY_CANCELED &&
			armed && GetCurrentTimestamp() >= deadline;
		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED && !out->timed_out)
			ReThrowError(edata);
		out->ok = false;
		out->result = NULL;
		out->error = error_json(edata, out->timed_out ?
								psprintf("the %s of step \"%s\" did not finish within its timeout",
										 compensation ? "compensation" : "action", st->name) : NULL);
		out->retryable = out->timed_out || sql_retryable(st, edata->sqlerrcode);
	}
	PG_END_TRY();
	step_saga_id = 0;
	out->duration_us = GetCurrentTimestamp() - start;
}

/* ---- transitions ---- */

static bool step_undoable(SagaStepDef *st);

/*
 * Compensation goes on from s->step downwards: find the next step that has
 * something to undo (it completed, or its outcome is unknown, and it has a
 * compensation); when none is left, the saga is compensated.
 */
static void
compensation_settle(Saga *s)
{
	Datum		values[2];
	uint64		n;
	uint64		i;
	int			next = 0;
	bool		isnull;

	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	n = s->step > 0 ? run_plan(PLAN_COMP_CANDIDATES, values, NULL) : 0;
	for (i = 0; i < n && next == 0; i++)
	{
		int			stepno = DatumGetInt32(column(i, 1, &isnull));
		char	   *state = column_text(i, 2);
		SagaStepDef *st = &s->def->steps[stepno - 1];

		/* a group that failed may have completed branches */
		if (step_undoable(st) &&
			(strcmp(state, "completed") == 0 || strcmp(state, "timed_out") == 0 ||
			 strcmp(state, "abandoned") == 0 || strcmp(state, "compensating") == 0 ||
			 (st->kind == STEP_GROUP && strcmp(state, "failed") == 0)))
			next = stepno;
	}
	s->attempt = 0;
	s->awaiting = false;
	s->reply = NULL;
	s->step = next;
	if (next > 0)
		s->next_run_at = GetCurrentTimestamp();
	else
	{
		s->state = SAGA_COMPENSATED;
		s->next_run_at = 0;
		s->finished_at = GetCurrentTimestamp();
		saga_event(s, "saga_compensated", 0, 0, false, NULL, NULL);
	}
}

/* Start compensating from step from downwards (the caller writes the saga). */
static void
compensation_begin(Saga *s, int from, Jsonb *error)
{
	JsonBuf		detail;

	s->state = SAGA_COMPENSATING;
	s->step = from;
	s->error = error;
	jb_init(&detail);
	jb_int(&detail, "from_step", from);
	saga_event(s, "compensation_started", 0, 0, false, error, jb_done(&detail));
	compensation_settle(s);
}

/* The action of the current step succeeded. */
static void
action_done(Saga *s, Jsonb *result, int attempt, int64 duration_us)
{
	JsonBuf		detail;
	TimestampTz now = GetCurrentTimestamp();

	s->context = context_merge(s->context, result);
	step_row_action(s, "completed", attempt, now, result, NULL);
	jb_init(&detail);
	if (duration_us >= 0)
		jb_int(&detail, "duration_us", duration_us);
	saga_event(s, "step_completed", s->step, attempt, false, NULL, jb_done(&detail));
	s->attempt = 0;
	s->awaiting = false;
	s->reply = NULL;
	if (s->step == s->def->nsteps)
	{
		s->state = SAGA_COMPLETED;
		s->next_run_at = 0;
		s->finished_at = now;
		saga_event(s, "saga_completed", 0, 0, false, NULL, NULL);
	}
	else
	{
		s->step++;
		s->next_run_at = now;
	}
	saga_write(s);
}

/* The compensation of the current step succeeded. */
static void
compensation_done(Saga *s, Jsonb *result, int attempt)
{
	bool		sql = s->def->steps[s->step - 1].compensation.kind == OP_SQL;

	s->context = context_merge(s->context, result);
	step_row_compensation(s, "compensated", sql, GetCurrentTimestamp(), NULL);
	saga_event(s, "step_compensated", s->step, attempt, true, NULL, NULL);
	s->step--;
	compensation_settle(s);
	saga_write(s);
}

/*
 * Attempt number attempt of the current step's action (or compensation)
 * failed.  Retry it after a backoff if the failure is retryable and attempts
 * remain; otherwise an action failure starts compensation (including this
 * step when its outcome is unknown: an async command that timed out), and a
 * compensation failure parks the saga in compensation_failed.
 */
static void
attempt_failed(Saga *s, bool compensation, int attempt, Jsonb *error, bool retryable,
			   bool timed_out, bool outcome_unknown)
{
	SagaStepDef *st = &s->def->steps[s->step - 1];
	TimestampTz now = GetCurrentTimestamp();
	const char *event = compensation ? "compensation_failed" :
		timed_out ? "step_timed_out" : "step_failed";
	JsonBuf		detail;
	bool		retry = retryable && attempt < st->max_attempts;

	s->awaiting = false;
	s->reply = NULL;
	s->attempt = attempt;
	jb_init(&detail);
	jb_bool(&detail, "retryable", retryable);
	jb_int(&detail, "max_attempts", st->max_attempts);
	if (retry)
	{
		s->next_run_at = now + resilience_backoff_usec(attempt - 1, st->backoff_base_us,
													   st->backoff_cap_us, st->jitter,
													   st->backoff_base_us);
		jb_time(&detail, "retry_at", s->next_run_at);
		if (compensation)
			step_row_compensation(s, "compensating", st->compensation.kind == OP_SQL, 0, error);
		else
			step_row_action(s, "retrying", attempt, 0, NULL, error);
		saga_event(s, event, s->step, attempt, compensation, error, jb_done(&detail));
		metrics_add_at_commit(RC_SAGA_STEP_RETRIES, compensation ? RV_COMPENSATION : RV_ACTION,
							  s->def->name, 1);
	}
	else if (!compensation)
	{
		JsonBuf		failure;

		step_row_action(s, outcome_unknown ? "timed_out" : "failed", attempt, now, NULL, error);
		saga_event(s, event, s->step, attempt, false, error, jb_done(&detail));
		jb_init(&failure);
		jb_str(&failure, "step", st->name);
		jb_jsonb(&failure, "error", error);
		compensation_begin(s, outcome_unknown ? s->step : s->step - 1, jb_done(&failure));
	}
	else
	{
		step_row_compensation(s, "compensation_failed", st->compensation.kind == OP_SQL, 0, error);
		saga_event(s, event, s->step, attempt, true, error, jb_done(&detail));
		s->state = SAGA_PARKED;
		s->next_run_at = 0;
		saga_event(s, "saga_parked", s->step, attempt, true, error, NULL);
		ereport(LOG,
				(errmsg("saga " INT64_FORMAT " (\"%s\" version %d) is parked in compensation_failed",
						s->id, s->def->name, s->def->version),
				 errdetail("The compensation of step \"%s\" failed after %d attempts: %s",
						   st->name, attempt, error_message(error)),
				 errhint("Fix the cause, then call resilience.saga_retry(" INT64_FORMAT ").", s->id)));
	}
	saga_write(s);
}

static bool has_trace_context(void);
static void add_trace_context(int64 id, JsonBuf *headers);

/*
 * The oid of resilience.outbox_publish, if it exists (by name: it gains
 * arguments with defaults, and is called by name with four).
 */
static Oid
outbox_publish_function(void)
{
	return LookupFuncName(list_make2(makeString("resilience"), makeString("outbox_publish")),
						  -1, NULL, true);
}

/* A command to publish (values: topic, payload, key, headers) and its outcome. */
typedef struct PublishCall
{
	Datum	   *values;
	int64		event_id;
	bool		published;
} PublishCall;

static void
publish_call(void *arg)
{
	PublishCall *call = arg;
	Oid			argtypes[4] = {TEXTOID, JSONBOID, TEXTOID, JSONBOID};
	bool		isnull;
	int			ret;

	ret = SPI_execute_with_args("SELECT resilience.outbox_publish($1, $2, $3, $4)",
								4, argtypes, call->values, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "resilience.outbox_publish failed: %s", SPI_result_code_string(ret));
	call->event_id = DatumGetInt64(column(0, 1, &isnull));
	call->published = !isnull;
}

/*
 * Publish a command (values: topic, payload, key, headers) in a
 * subtransaction: NULL and the event id, or the error that refused it (the
 * outbox's checks: a route that refuses the payload, say), rolled back so
 * that the tick can record it and go on.  A cancel is raised again.
 */
static ErrorData *
publish_command(Datum *values, int64 *event_id, bool *published)
{
	PublishCall call = {values, 0, false};
	ErrorData  *edata = resilience_run_caught(publish_call, &call);

	if (edata && edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
		ReThrowError(edata);
	*event_id = call.event_id;
	*published = call.published;
	return edata;
}

/*
 * Publish the command of attempt attempt of step st's async action (or
 * compensation); st is the saga's current step or a branch of it (a group).
 * NULL and the detail of its command_sent event, or the error that refused
 * it as JSON.  Without the outbox the command is only recorded: the
 * participant must learn of it another way.
 */
static Jsonb *
command_publish(Saga *s, SagaStepDef *st, bool compensation, int attempt, TimestampTz deadline,
				Jsonb **detail)
{
	SagaStepDef *current = &s->def->steps[s->step - 1];
	const char *command = compensation ? "compensation" : "action";
	char	   *key = idempotency_key(s, st->name, compensation);
	JsonBuf		payload;
	JsonBuf		headers;
	JsonBuf		jb;
	bool		published = false;
	int64		event_id = 0;

	jb_init(&payload);
	jb_int(&payload, "saga_id", s->id);
	jb_str(&payload, "saga", s->def->name);
	jb_int(&payload, "version", s->def->version);
	jb_str(&payload, "step", st->name);
	if (st != current)
		jb_str(&payload, "group", current->name);
	jb_str(&payload, "command", command);
	jb_int(&payload, "attempt", attempt);
	jb_str(&payload, "idempotency_key", key);
	jb_time(&payload, "reply_by", deadline);
	jb_jsonb(&payload, "context", s->context);
	jb_init(&headers);
	jb_str(&headers, "Saga-Id", psprintf(INT64_FORMAT, s->id));
	jb_str(&headers, "Saga-Name", s->def->name);
	jb_str(&headers, "Saga-Step", st->name);
	jb_str(&headers, "Saga-Command", command);
	jb_str(&headers, "Saga-Attempt", psprintf("%d", attempt));
	jb_str(&headers, "Saga-Idempotency-Key", key);
	add_trace_context(s->id, &headers);

	if (OidIsValid(outbox_publish_function()))
	{
		Datum		values[4];
		ErrorData  *edata;

		values[0] = CStringGetTextDatum(st->topic);
		values[1] = JsonbPGetDatum(jb_done(&payload));
		values[2] = CStringGetTextDatum(psprintf("saga:" INT64_FORMAT, s->id));
		values[3] = JsonbPGetDatum(jb_done(&headers));
		edata = publish_command(values, &event_id, &published);
		if (edata)
			return error_json(edata, psprintf("the %s command of step \"%s\" could not be published: %s",
											  command, st->name, edata->message));
	}
	jb_init(&jb);
	jb_str(&jb, "command", command);
	jb_str(&jb, "topic", st->topic);
	jb_key(&jb, "outbox_event_id");
	if (published)
		appendStringInfo(&jb.buf, INT64_FORMAT, event_id);
	else
		appendStringInfoString(&jb.buf, "null");
	jb_time(&jb, "reply_by", deadline);
	*detail = jb_done(&jb);
	return NULL;
}

/*
 * Send the command of the current step's async action (or compensation)
 * in this transaction; the saga waits for its reply until the step's
 * timeout.  A command the outbox refuses fails the attempt for good: this
 * saga's command cannot go out, the others go on.
 */
static void
send_command(Saga *s, bool compensation)
{
	SagaStepDef *st = &s->def->steps[s->step - 1];
	int			attempt = s->attempt + 1;
	TimestampTz deadline;
	Jsonb	   *detail;
	Jsonb	   *error;

	s->attempt_start = GetCurrentTimestamp();
	deadline = s->attempt_start + st->timeout_us;
	error = command_publish(s, st, compensation, attempt, deadline, &detail);
	if (error)
	{
		attempt_failed(s, compensation, attempt, error, false, false, false);
		return;
	}
	if (compensation)
		step_row_compensation(s, "compensating", true, 0, NULL);
	else
		step_row_action(s, "waiting", attempt, 0, NULL, NULL);
	s->attempt = attempt;
	s->awaiting = true;
	s->reply = NULL;
	s->next_run_at = deadline;
	saga_event(s, "command_sent", s->step, attempt, compensation, NULL, detail);
	saga_write(s);
}

/*
 * What the reply recorded for a command (reply, as saga_reply stores it)
 * came to, as the outcome of a step call; without a reply, the command's
 * deadline passed (st: the step or branch; its outcome is unknown).
 */
static void
reply_outcome(Jsonb *reply, SagaStepDef *st, bool compensation, StepCall *out)
{
	char	   *status = jsonb_get_string(reply, "status");

	memset(out, 0, sizeof(StepCall));
	out->duration_us = -1;
	if (reply == NULL)
	{
		JsonBuf		jb;

		jb_init(&jb);
		jb_str(&jb, "sqlstate", "57014");
		jb_str(&jb, "message", psprintf("no reply to the %s command of step \"%s\" within its timeout",
										compensation ? "compensation" : "action", st->name));
		out->error = jb_done(&jb);
		out->retryable = true;
		out->timed_out = true;
	}
	else if (status && strcmp(status, "completed") == 0)
	{
		out->ok = true;
		out->result = jsonb_get(reply, "result");
	}
	else
	{
		Jsonb	   *retryable = jsonb_get(reply, "retryable");
		JsonbValue	v;

		out->error = jsonb_get(reply, "error");
		out->retryable = retryable && JsonbExtractScalar(&retryable->root, &v) &&
			v.type == jbvBool && v.val.boolean;
	}
}

/*
 * Apply the reply recorded for the current step's command, or its absence
 * when the deadline passed (an action that timed out may have been done:
 * it is compensated too).
 */
static void
apply_reply(Saga *s, bool compensation)
{
	StepCall	call;

	reply_outcome(s->reply, &s->def->steps[s->step - 1], compensation, &call);
	if (call.ok && compensation)
		compensation_done(s, call.result, s->attempt);
	else if (call.ok)
		action_done(s, call.result, s->attempt, -1);
	else
		attempt_failed(s, compensation, s->attempt, call.error, call.retryable,
					   call.timed_out, call.timed_out && !compensation);
}

/* ---- timers and signals ---- */

/* A time to parse, and the result. */
typedef struct TimeParse
{
	const char *text;
	TimestampTz time;
} TimeParse;

static void
time_parse(void *arg)
{
	TimeParse  *parse = arg;

	parse->time = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in, CStringGetDatum(parse->text),
														  ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
}

/*
 * The time under key in the context (a JSON string a timestamptz accepts):
 * true, or false and why in *error.  Parsed in a subtransaction: a value
 * that is not a time fails the step, it does not suspend the saga.
 */
static bool
context_time(Jsonb *context, const char *key, TimestampTz *out, Jsonb **error)
{
	TimeParse	parse = {jsonb_get_string(context, key), 0};
	ErrorData  *edata;

	if (parse.text == NULL)
	{
		JsonBuf		jb;

		jb_init(&jb);
		jb_str(&jb, "sqlstate", "22023");
		jb_str(&jb, "message", psprintf("the context has no time under \"%s\"", key));
		*error = jb_done(&jb);
		return false;
	}
	edata = resilience_run_caught(time_parse, &parse);
	if (edata == NULL)
	{
		*out = parse.time;
		return true;
	}
	if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
		ReThrowError(edata);
	*error = error_json(edata, psprintf("\"%s\" of the context is not a time: %s", key, edata->message));
	return false;
}

/*
 * A sleep or until step: the first tick computes when it is due and leaves
 * the time in next_run_at (nothing sleeps), a tick at that time completes
 * it.  A time already past completes it at once.  The timer is a committed
 * fact: it survives restarts and crashes, and fires once, late if the
 * server was down when it was due.
 */
static void
timer_advance(Saga *s, SagaStepDef *st)
{
	TimestampTz now = GetCurrentTimestamp();
	JsonBuf		detail;

	if (!s->awaiting)
	{
		TimestampTz due = now + st->sleep_us;
		Jsonb	   *error = NULL;

		if (st->kind == STEP_UNTIL && !context_time(s->context, st->until_key, &due, &error))
		{
			attempt_failed(s, false, 1, error, false, false, false);
			return;
		}
		if (due > now)
		{
			step_row_action(s, "waiting", 0, 0, NULL, NULL);
			s->awaiting = true;
			s->next_run_at = due;
			jb_init(&detail);
			jb_time(&detail, "due", due);
			saga_event(s, "timer_started", s->step, 0, false, NULL, jb_done(&detail));
			saga_write(s);
			return;
		}
	}
	jb_init(&detail);
	if (s->awaiting)
		jb_int(&detail, "late_ms", (now - s->next_run_at) / 1000);
	saga_event(s, "timer_fired", s->step, 0, false, NULL, jb_done(&detail));
	action_done(s, NULL, 1, -1);
}

/*
 * An await step: a signal kept for it (it may have come before the saga
 * got here) completes it with its payload; otherwise the saga waits until
 * the timeout, which saga_signal cuts short.  At the timeout the step fails
 * (compensating the steps before it) or, with on_timeout "continue",
 * completes without a payload.
 */
static void
await_advance(Saga *s, SagaStepDef *st)
{
	TimestampTz now = GetCurrentTimestamp();
	Datum		values[4];
	JsonBuf		detail;
	bool		isnull;

	values[0] = Int64GetDatum(s->id);
	values[1] = CStringGetTextDatum(st->signal);
	if (run_plan(PLAN_SIGNAL_NEXT, values, NULL) == 1)
	{
		int64		signal_row = DatumGetInt64(column(0, 1, &isnull));
		char	   *signal_id = column_text(0, 2);
		Jsonb	   *payload = column_jsonb(0, 3);

		values[1] = Int64GetDatum(signal_row);
		values[2] = TimestampTzGetDatum(now);
		values[3] = CStringGetTextDatum(st->name);
		run_plan(PLAN_SIGNAL_CONSUME, values, NULL);
		jb_init(&detail);
		jb_str(&detail, "signal", st->signal);
		jb_str(&detail, "signal_id", signal_id);
		saga_event(s, "signal_consumed", s->step, 0, false, NULL, jb_done(&detail));
		action_done(s, payload, 1, -1);
		return;
	}
	if (!s->awaiting)
	{
		step_row_action(s, "waiting", 0, 0, NULL, NULL);
		s->awaiting = true;
		s->next_run_at = now + st->timeout_us;
		jb_init(&detail);
		jb_str(&detail, "signal", st->signal);
		jb_time(&detail, "timeout_at", s->next_run_at);
		saga_event(s, "signal_awaited", s->step, 0, false, NULL, jb_done(&detail));
		saga_write(s);
		return;
	}
	/* the timeout passed with no signal */
	jb_init(&detail);
	jb_str(&detail, "signal", st->signal);
	jb_str(&detail, "on_timeout", st->continue_on_timeout ? "continue" : "fail");
	saga_event(s, "signal_timed_out", s->step, 0, false, NULL, jb_done(&detail));
	if (st->continue_on_timeout)
		action_done(s, NULL, 1, -1);
	else
	{
		JsonBuf		error;

		jb_init(&error);
		jb_str(&error, "sqlstate", "57014");
		jb_str(&error, "message", psprintf("no signal \"%s\" for step \"%s\" within its timeout",
										   st->signal, st->name));
		attempt_failed(s, false, 1, jb_done(&error), false, true, false);
	}
}

/* ---- parallel groups ---- */

/*
 * A parallel group is one step whose branches (SQL or async actions) are
 * rows of resilience.saga_branches, each claimed and run by any
 * orchestrator in a transaction of its own (branch_tick), so with several
 * orchestrators they run at the same time; the commands of its async
 * branches are sent together by the tick entering the group, and each
 * reply is stored on its branch's row (saga_reply locks that row only) for
 * the orchestrator claiming it to apply.  The saga waits at the group; each branch that
 * finishes makes it due (a poke, committed with the branch: branch_write),
 * and the saga's tick (group_advance) looks at the branches: when all completed,
 * their results merge into the context under their names; when one failed,
 * the branches not started are cancelled, the running ones finish, and the
 * completed ones are compensated, concurrently, before the steps before the
 * group, in reverse.  The saga's tick never waits for a branch row (SKIP
 * LOCKED): a locked branch is running (or being replied to), and its poke
 * will come.
 */

/* What a saga's tick sees of a group's branches. */
typedef struct GroupView
{
	int			pending;		/* not finished (running, or due, or to retry) */
	int			completed;
	int			failed;
	int			compensating;
	int			compensation_failed;
	int			undoable;		/* completed or timed_out, with a compensation */
	Jsonb	   *results;		/* {branch name: result} of the completed ones */
	Jsonb	   *error;			/* the first failed branch's failure */
} GroupView;

/* Does undoing step st do anything (a group: one of its branches)? */
static bool
step_undoable(SagaStepDef *st)
{
	int			i;

	if (st->kind != STEP_GROUP)
		return st->compensation.kind != OP_NONE;
	for (i = 0; i < st->nbranches; i++)
		if (st->branches[i].compensation.kind != OP_NONE)
			return true;
	return false;
}

/* A branch row as claimed (BRANCH_COLUMNS). */
typedef struct Branch
{
	int64		saga_id;
	int			step_no;
	int			branch_no;
	char	   *state;
	int			attempts;
	int			compensation_attempts;
	TimestampTz started_at;		/* 0: not yet */
	TimestampTz next_run_at;	/* 0: not due */
	TimestampTz finished_at;
	TimestampTz compensated_at;
	Jsonb	   *result;
	Jsonb	   *error;
	bool		awaiting;		/* its async command is out */
	Jsonb	   *reply;			/* the reply to it, not yet applied */
} Branch;

/*
 * Write branch b back to its (locked) row; a finished one makes its saga due
 * (lock order: the branch row, then the saga's).  Every finished branch
 * pokes: counting the unfinished ones first would need the saga's lock to
 * be sure, and costs more than the poke (an orchestrator takes due branches
 * before sagas, so the saga's tick mostly comes after the last one).
 */
static void
branch_write(Branch *b)
{
	Datum		values[14];
	bool		isnull[14] = {0};
	TimestampTz now = GetCurrentTimestamp();

	values[0] = Int64GetDatum(b->saga_id);
	values[1] = Int32GetDatum(b->step_no);
	values[2] = Int32GetDatum(b->branch_no);
	values[3] = CStringGetTextDatum(b->state);
	values[4] = Int32GetDatum(b->attempts);
	values[5] = Int32GetDatum(b->compensation_attempts);
	values[6] = TimestampTzGetDatum(b->next_run_at);
	isnull[6] = b->next_run_at == 0;
	values[7] = TimestampTzGetDatum(b->started_at);
	isnull[7] = b->started_at == 0;
	values[8] = TimestampTzGetDatum(b->finished_at);
	isnull[8] = b->finished_at == 0;
	values[9] = TimestampTzGetDatum(b->compensated_at);
	isnull[9] = b->compensated_at == 0;
	values[10] = JsonbPGetDatum(b->result);
	isnull[10] = b->result == NULL;
	values[11] = JsonbPGetDatum(b->error);
	isnull[11] = b->error == NULL;
	values[12] = BoolGetDatum(b->awaiting);
	values[13] = JsonbPGetDatum(b->reply);
	isnull[13] = b->reply == NULL;
	run_plan(PLAN_BRANCH_WRITE, values, isnull);
	if (b->next_run_at == 0)
	{
		values[0] = Int64GetDatum(b->saga_id);
		values[1] = TimestampTzGetDatum(now);
		run_plan(PLAN_POKE, values, NULL);
		worker_wake_at_commit();
	}
}

/* Read branch row of the last result (BRANCH_COLUMNS). */
static void
branch_read(uint64 row, Branch *b)
{
	bool		isnull;
	Datum		d;

	memset(b, 0, sizeof(Branch));
	b->saga_id = DatumGetInt64(column(row, 1, &isnull));
	b->step_no = DatumGetInt32(column(row, 2, &isnull));
	b->branch_no = DatumGetInt32(column(row, 3, &isnull));
	b->state = column_text(row, 4);
	b->attempts = DatumGetInt32(column(row, 5, &isnull));
	b->compensation_attempts = DatumGetInt32(column(row, 6, &isnull));
	d = column(row, 7, &isnull);
	b->started_at = isnull ? 0 : DatumGetTimestampTz(d);
	b->awaiting = DatumGetBool(column(row, 8, &isnull));
	b->reply = column_jsonb(row, 9);
	d = column(row, 10, &isnull);
	b->next_run_at = isnull ? 0 : DatumGetTimestampTz(d);
}

/* Read the branches of the saga's current step (a group). */
static void
group_view(Saga *s, SagaStepDef *st, GroupView *v)
{
	Datum		values[2];
	uint64		n;
	uint64		i;
	bool		isnull;
	JsonBuf		results;

	memset(v, 0, sizeof(GroupView));
	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	n = run_plan(PLAN_BRANCH_LIST, values, NULL);
	jb_init(&results);
	for (i = 0; i < n; i++)
	{
		int			b = DatumGetInt32(column(i, 1, &isnull));
		char	   *state = column_text(i, 2);

		if (b < 1 || b > st->nbranches)
			elog(ERROR, "saga " INT64_FORMAT " has branch %d of step %d, which its definition does not have",
				 s->id, b, s->step);
		if ((strcmp(state, "completed") == 0 || strcmp(state, "timed_out") == 0) &&
			st->branches[b - 1].compensation.kind != OP_NONE)
			v->undoable++;
		if (strcmp(state, "pending") == 0)
			v->pending++;
		else if (strcmp(state, "completed") == 0)
		{
			v->completed++;
			jb_jsonb(&results, st->branches[b - 1].name, column_jsonb(i, 3));
		}
		else if (strcmp(state, "failed") == 0 || strcmp(state, "timed_out") == 0)
		{
			if (v->failed++ == 0)
			{
				JsonBuf		failure;

				jb_init(&failure);
				jb_str(&failure, "step", st->name);
				jb_str(&failure, "branch", st->branches[b - 1].name);
				jb_jsonb(&failure, "error", column_jsonb(i, 4));
				v->error = jb_done(&failure);
			}
		}
		else if (strcmp(state, "compensating") == 0)
			v->compensating++;
		else if (strcmp(state, "compensation_failed") == 0)
			v->compensation_failed++;
	}
	v->results = jb_done(&results);
}

/*
 * Cancel the branches of the current group that no tick is running and
 * whose command is not out.  An async one whose last attempt got no reply
 * in time (waiting to be sent again) may have been done: it ends timed_out,
 * to be compensated.
 */
static void
group_cancel_pending(Saga *s)
{
	SagaStepDef *st = &s->def->steps[s->step - 1];
	Datum		values[4];
	Datum	   *numbers = palloc(Max(st->nbranches, 1) * sizeof(Datum));
	int			n = 0;
	int			i;

	for (i = 0; i < st->nbranches; i++)
		if (st->branches[i].action.kind == OP_ASYNC)
			numbers[n++] = Int32GetDatum(i + 1);
	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	values[2] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[3] = PointerGetDatum(construct_array(numbers, n, INT4OID, sizeof(int32), true, TYPALIGN_INT));
	run_plan(PLAN_BRANCH_CANCEL, values, NULL);
}

/*
 * Write what attempt attempt of branch st's action (or compensation) came
 * to into b (its row, locked): done, retried after a backoff, or failed for
 * good, which cancels the branches of the group not started.  An async
 * action whose last attempt got no reply in time ends timed_out: it may
 * have been done, so it is compensated with the completed ones.
 */
static void
branch_settle(Saga *s, SagaStepDef *st, Branch *b, bool compensation, int attempt, StepCall *call)
{
	TimestampTz now = GetCurrentTimestamp();
	JsonBuf		detail;

	b->awaiting = false;
	b->reply = NULL;
	jb_init(&detail);
	if (call->ok)
	{
		b->next_run_at = 0;
		if (compensation)
		{
			b->state = "compensated";
			b->compensated_at = now;
			saga_event_at(s, "step_compensated", st->name, attempt, true, NULL, NULL);
		}
		else
		{
			b->state = "completed";
			b->finished_at = now;
			b->result = call->result;
			if (call->duration_us >= 0)
				jb_int(&detail, "duration_us", call->duration_us);
			saga_event_at(s, "step_completed", st->name, attempt, false, NULL, jb_done(&detail));
		}
	}
	else
	{
		bool		retry = call->retryable && attempt < st->max_attempts;

		b->error = call->error;
		jb_bool(&detail, "retryable", call->retryable);
		jb_int(&detail, "max_attempts", st->max_attempts);
		if (retry)
		{
			b->next_run_at = now + resilience_backoff_usec(attempt - 1, st->backoff_base_us,
														   st->backoff_cap_us, st->jitter,
														   st->backoff_base_us);
			jb_time(&detail, "retry_at", b->next_run_at);
			metrics_add_at_commit(RC_SAGA_STEP_RETRIES, compensation ? RV_COMPENSATION : RV_ACTION,
								  s->def->name, 1);
		}
		else
		{
			b->next_run_at = 0;
			if (compensation)
				b->state = "compensation_failed";
			else
			{
				/* the group fails: the branches not started never will */
				b->state = call->timed_out && st->action.kind == OP_ASYNC ? "timed_out" : "failed";
				b->finished_at = now;
				group_cancel_pending(s);
			}
		}
		saga_event_at(s, compensation ? "compensation_failed" :
					  call->timed_out ? "step_timed_out" : "step_failed",
					  st->name, attempt, compensation, call->error, jb_done(&detail));
	}
	branch_write(b);
}

/*
 * Send the command of branch st's async action (or compensation) for b
 * (its row, locked): the branch waits for its reply until its timeout.
 * False if the outbox refused the command, which fails that attempt for
 * good (written).
 */
static bool
branch_send(Saga *s, SagaStepDef *st, Branch *b, bool compensation)
{
	int			attempt = (compensation ? b->compensation_attempts : b->attempts) + 1;
	TimestampTz now = GetCurrentTimestamp();
	Jsonb	   *detail;
	StepCall	call;

	memset(&call, 0, sizeof(call));
	call.error = command_publish(s, st, compensation, attempt, now + st->timeout_us, &detail);
	if (compensation)
		b->compensation_attempts = attempt;
	else
		b->attempts = attempt;
	if (b->started_at == 0)
		b->started_at = now;
	if (call.error)
	{
		branch_settle(s, st, b, compensation, attempt, &call);
		return false;
	}
	b->awaiting = true;
	b->reply = NULL;
	b->next_run_at = now + st->timeout_us;
	saga_event_at(s, "command_sent", st->name, attempt, compensation, NULL, detail);
	branch_write(b);
	return true;
}

/*
 * Make the branches of the current group that are in state from (or
 * or_from, if not NULL) and have a compensation due for it (those a tick
 * is running are left alone); the async compensations are sent at once,
 * together in this transaction, the SQL ones are left to the orchestrators.
 */
static uint64
group_arm_compensations(Saga *s, SagaStepDef *st, const char *from, const char *or_from)
{
	Datum		states[2] = {CStringGetTextDatum(from), CStringGetTextDatum(or_from ? or_from : from)};
	Datum		values[5];
	Datum	   *numbers = palloc(st->nbranches * sizeof(Datum));
	int			n = 0;
	int			i;
	uint64		armed;
	uint64		j;
	Branch	   *rows;

	for (i = 0; i < st->nbranches; i++)
		if (st->branches[i].compensation.kind != OP_NONE)
			numbers[n++] = Int32GetDatum(i + 1);
	if (n == 0)
		return 0;
	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	values[2] = PointerGetDatum(construct_array(states, 2, TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[4] = PointerGetDatum(construct_array(numbers, n, INT4OID, sizeof(int32), true, TYPALIGN_INT));
	armed = run_plan(PLAN_BRANCH_ARM, values, NULL);
	rows = palloc0(Max(armed, 1) * sizeof(Branch));
	for (j = 0; j < armed; j++)
		branch_read(j, &rows[j]);
	for (j = 0; j < armed; j++)
		if (st->branches[rows[j].branch_no - 1].compensation.kind == OP_ASYNC)
			(void) branch_send(s, &st->branches[rows[j].branch_no - 1], &rows[j], true);
	return armed;
}

/*
 * The saga waits at its group: for the branches' pokes, and at the latest
 * after the longest branch timeout (a safety net: a poke commits with its
 * branch, so none is lost).
 */
static void
group_wait(Saga *s, SagaStepDef *st)
{
	int64		longest = 0;
	int			i;

	for (i = 0; i < st->nbranches; i++)
		longest = Max(longest, st->branches[i].timeout_us);
	s->awaiting = true;
	s->next_run_at = GetCurrentTimestamp() + longest + USECS_PER_SEC;
	saga_write(s);
}

/*
 * Enter group st: one row per branch, the SQL ones due now (every
 * orchestrator woken for them), the async ones' commands sent together
 * in this transaction.
 */
static void
group_enter(Saga *s, SagaStepDef *st)
{
	Datum		values[4];
	Datum	   *names = palloc(st->nbranches * sizeof(Datum));
	int		   *inserted = palloc(st->nbranches * sizeof(int));
	uint64		n;
	uint64		i;
	bool		isnull;
	bool		refused = false;
	JsonBuf		detail;

	for (i = 0; i < (uint64) st->nbranches; i++)
		names[i] = CStringGetTextDatum(st->branches[i].name);
	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(s->step);
	values[2] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[3] = PointerGetDatum(construct_array(names, st->nbranches, TEXTOID, -1, false, TYPALIGN_INT));
	n = run_plan(PLAN_BRANCH_INSERT, values, NULL);
	for (i = 0; i < n; i++)
		inserted[i] = DatumGetInt32(column(i, 1, &isnull));
	step_row_action(s, "waiting", 0, 0, NULL, NULL);
	jb_init(&detail);
	jb_int(&detail, "branches", st->nbranches);
	saga_event(s, "group_started", s->step, 0, false, NULL, jb_done(&detail));
	for (i = 0; i < n; i++)
	{
		SagaStepDef *branch = &st->branches[inserted[i] - 1];
		Branch		b;

		if (branch->action.kind != OP_ASYNC)
			continue;
		memset(&b, 0, sizeof(b));
		b.saga_id = s->id;
		b.step_no = s->step;
		b.branch_no = inserted[i];
		b.state = "pending";
		/* a refused one cancelled the branches not sent yet */
		if (!branch_send(s, branch, &b, false))
		{
			refused = true;
			break;
		}
	}
	group_wait(s, st);
	if (refused)
	{
		/* a branch failed at once: the saga's next tick starts undoing */
		s->next_run_at = GetCurrentTimestamp();
		saga_write(s);
	}
	worker_wake_at_commit();
}

/* A saga's tick at a parallel group (running, or compensating it). */
static void
group_advance(Saga *s, SagaStepDef *st, bool compensation)
{
	GroupView	v;

	if (!compensation && !s->awaiting)
	{
		group_enter(s, st);
		return;
	}

	group_view(s, st, &v);
	if ((compensation || v.failed > 0) && v.pending > 0)
	{
		/* stop the branches not started; the running ones finish */
		group_cancel_pending(s);
		group_view(s, st, &v);
	}
	if (v.pending > 0)
	{
		group_wait(s, st);
		return;
	}

	if (!compensation)
	{
		if (v.failed == 0)
		{
			/* every branch completed: their results under their names */
			action_done(s, v.results, 1, -1);
			return;
		}
		step_row_action(s, "failed", 1, GetCurrentTimestamp(), NULL, v.error);
		saga_event(s, "group_failed", s->step, 0, false, v.error, NULL);
		compensation_begin(s, s->step, v.error);
		saga_write(s);
		return;
	}

	/* compensating the group: its completed branches, concurrently */
	if (v.undoable > 0 && group_arm_compensations(s, st, "completed", "timed_out") > 0)
	{
		group_view(s, st, &v);
		worker_wake_at_commit();
	}
	if (v.compensating > 0)
	{
		group_wait(s, st);
		return;
	}
	if (v.undoable > 0)
	{
		/* a stale reply holds a branch row this tick skipped: look again soon */
		s->awaiting = true;
		s->next_run_at = GetCurrentTimestamp() + LOCKED_RETRY_MS * INT64CONST(1000);
		saga_write(s);
		return;
	}
	if (v.compensation_failed > 0)
	{
		step_row_compensation(s, "compensation_failed", false, 0, NULL);
		s->state = SAGA_PARKED;
		s->awaiting = false;
		s->next_run_at = 0;
		saga_event(s, "saga_parked", s->step, 0, true, NULL, NULL);
		ereport(LOG,
				(errmsg("saga " INT64_FORMAT " (\"%s\" version %d) is parked in compensation_failed",
						s->id, s->def->name, s->def->version),
				 errdetail("The compensation of a branch of parallel group \"%s\" failed; see resilience.saga_branches.",
						   st->name),
				 errhint("Fix the cause, then call resilience.saga_retry(" INT64_FORMAT ").", s->id)));
		saga_write(s);
		return;
	}
	step_row_compensation(s, "compensated", false, GetCurrentTimestamp(), NULL);
	saga_event(s, "step_compensated", s->step, 0, true, NULL, NULL);
	s->step--;
	compensation_settle(s);
	saga_write(s);
}

/* One unit of work on a running or compensating saga. */
static void
saga_advance(Saga *s)
{
	bool		compensation = s->state == SAGA_COMPENSATING;
	SagaStepDef *st;
	SagaOp	   *op;

	if (s->step == 0)			/* compensating, nothing left (be safe) */
	{
		compensation_settle(s);
		saga_write(s);
		return;
	}
	st = &s->def->steps[s->step - 1];
	if (st->kind == STEP_GROUP)
	{
		group_advance(s, st, compensation);
		return;
	}
	if (!compensation && st->kind == STEP_AWAIT)
	{
		await_advance(s, st);
		return;
	}
	if (!compensation && st->kind != STEP_ACTION)
	{
		timer_advance(s, st);
		return;
	}
	op = compensation ? &st->compensation : &st->action;
	if (op->kind == OP_ASYNC)
	{
		if (!s->awaiting)
			send_command(s, compensation);
		else
			apply_reply(s, compensation);
	}
	else if (op->kind == OP_SQL)
	{
		StepCall	call;
		int			attempt = s->attempt + 1;

		call_sql_step(s, st, compensation, attempt, &call);
		if (call.ok && compensation)
			compensation_done(s, call.result, attempt);
		else if (call.ok)
			action_done(s, call.result, attempt, call.duration_us);
		else
			attempt_failed(s, compensation, attempt, call.error, call.retryable,
						   call.timed_out, false);
	}
	else
	{
		/* nothing to undo here (settling skips such steps; be safe) */
		s->step--;
		compensation_settle(s);
		saga_write(s);
	}
}

/*
 * Errors a tick gives up on rather than suspend the saga for: a cancel or
 * shutdown, a serialization failure or deadlock, a lock not available, and
 * a lack of resources (memory, disk).  The next tick tries again.
 */
static bool
tick_error_is_transient(ErrorData *edata)
{
	int			category = ERRCODE_TO_CATEGORY(edata->sqlerrcode);

	return category == ERRCODE_TO_CATEGORY(ERRCODE_OPERATOR_INTERVENTION) ||
		category == ERRCODE_TO_CATEGORY(ERRCODE_TRANSACTION_ROLLBACK) ||
		category == ERRCODE_TO_CATEGORY(ERRCODE_INSUFFICIENT_RESOURCES) ||
		category == ERRCODE_TO_CATEGORY(ERRCODE_SYSTEM_ERROR) ||
		edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
}

/*
 * Suspend saga id (locked) after its tick failed outside a step: it leaves
 * the queue, with the error in its events, until saga_retry (which resumes
 * it as running, or as compensating if it has an error: see saga_retry).
 */
static void
saga_suspend(int64 id, const char *name, ErrorData *edata)
{
	Datum		values[2];
	Saga		s;
	Jsonb	   *error = error_json(edata, NULL);

	values[0] = Int64GetDatum(id);
	values[1] = TimestampTzGetDatum(GetCurrentTimestamp());
	run_plan(PLAN_SUSPEND, values, NULL);
	memset(&s, 0, sizeof(s));
	s.id = id;
	s.state = SAGA_SUSPENDED;
	saga_event(&s, "saga_suspended", 0, 0, false, error, NULL);
	metrics_add_at_commit(RC_SAGA_EVENTS, metrics_saga_event("saga_suspended"), name, 1);
	ereport(LOG,
			(errmsg("saga " INT64_FORMAT " (\"%s\") is suspended: its orchestration failed: %s",
					id, name, edata->message),
			 errdetail("The other sagas go on; this one waits in state suspended."),
			 errhint("Fix the cause, then call resilience.saga_retry(" INT64_FORMAT ").", id)));
}

/*
 * One unit of work on branch b of saga s, read unlocked (its context does
 * not change while it is at the group): one attempt of its SQL action (or
 * compensation, when it is compensating), or for an async one, sending its
 * command, applying the reply received, or timing it out.  The branch's
 * effects and its row commit together, as a step's do.
 */
static void
branch_run(Saga *s, SagaStepDef *st, Branch *b)
{
	bool		compensation = strcmp(b->state, "compensating") == 0;
	SagaOp	   *op = compensation ? &st->compensation : &st->action;
	StepCall	call;
	int			attempt;

	if (!compensation && strcmp(b->state, "pending") != 0)
		elog(ERROR, "branch \"%s\" of saga " INT64_FORMAT " is %s and not due", st->name, s->id, b->state);
	if (op->kind == OP_ASYNC && !b->awaiting)
	{
		(void) branch_send(s, st, b, compensation);
		return;
	}
	if (op->kind == OP_ASYNC)
	{
		attempt = compensation ? b->compensation_attempts : b->attempts;
		reply_outcome(b->reply, st, compensation, &call);
		branch_settle(s, st, b, compensation, attempt, &call);
		return;
	}
	attempt = (compensation ? b->compensation_attempts : b->attempts) + 1;
	call_sql_step(s, st, compensation, attempt, &call);
	if (compensation)
		b->compensation_attempts = attempt;
	else
		b->attempts = attempt;
	if (b->started_at == 0)
		b->started_at = s->attempt_start;
	branch_settle(s, st, b, compensation, attempt, &call);
}

/* Run one unit of work on the claimed branch arg (a copy: it changes). */
static void
branch_claimed(void *arg)
{
	Branch	   *b = arg;
	Datum		values[1];
	Saga		s;
	SagaStepDef *group;

	values[0] = Int64GetDatum(b->saga_id);
	if (run_plan(PLAN_SAGA_READ, values, NULL) != 1)
		elog(ERROR, "saga " INT64_FORMAT " of a parallel branch does not exist", b->saga_id);
	saga_read(&s);
	if (b->step_no < 1 || b->step_no > s.def->nsteps ||
		s.def->steps[b->step_no - 1].kind != STEP_GROUP ||
		b->branch_no < 1 || b->branch_no > s.def->steps[b->step_no - 1].nbranches)
		elog(ERROR, "saga " INT64_FORMAT " has no branch %d of step %d", b->saga_id, b->branch_no, b->step_no);
	s.step = b->step_no;
	group = &s.def->steps[b->step_no - 1];
	branch_run(&s, &group->branches[b->branch_no - 1], b);
}

/*
 * Claim a due branch of a parallel group (skipping those another tick
 * holds) and run one attempt of it.  False if none is due.  An error
 * outside the branch's own subtransaction fails the branch (its saga then
 * compensates) rather than the tick, so one branch never blocks the queue.
 */
static bool
branch_tick(Oid by_hand)
{
	Datum		values[2];
	Branch		b;
	Branch		run;
	ErrorData  *edata;

	if (schema_is_0_1())
		return false;
	values[0] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[1] = ObjectIdGetDatum(by_hand);
	if (run_plan(PLAN_BRANCH_PICK, values, NULL) == 0)
		return false;
	branch_read(0, &b);
	run = b;
	edata = resilience_run_caught(branch_claimed, &run);
	if (edata == NULL)
		return true;
	step_saga_id = 0;
	if (tick_error_is_transient(edata))
		ReThrowError(edata);
	ereport(LOG,
			(errmsg("branch %d of step %d of saga " INT64_FORMAT " failed outside its step: %s",
					b.branch_no, b.step_no, b.saga_id, edata->message)));
	if (strcmp(b.state, "compensating") == 0)
		b.state = "compensation_failed";
	else
	{
		b.state = "failed";
		b.finished_at = GetCurrentTimestamp();
	}
	b.next_run_at = 0;
	b.awaiting = false;
	b.reply = NULL;
	b.error = error_json(edata, NULL);
	branch_write(&b);
	return true;
}

/*
 * Lock a due saga for this tick, skipping those another transaction holds;
 * it is row 0 of the last result (SAGA_COLUMNS).
 *
 * A saga that the previous tick of this backend left due at once (its next
 * step) comes first, found by its key: a saga runs to its end or its first
 * wait without going round the queue again.  Otherwise the saga due longest
 * is taken from sagas_due.  Each step moves a saga's entry in that index, so
 * its front fills with entries of row versions already processed, which
 * every scan would step over until vacuum removes them: a scan starts at the
 * next_run_at of the last saga picked (the floor), and from the start only
 * every FLOOR_RESET_MS or when nothing is due above the floor, so a saga due
 * below the floor (a late commit, a skipped lock) waits at most that long.
 */
static bool
saga_pick(Oid by_hand)
{
	TimestampTz now = GetCurrentTimestamp();
	SagaPlan	pick = OidIsValid(by_hand) ? PLAN_PICK_BY_HAND : PLAN_PICK;
	SagaPlan	pick_id = OidIsValid(by_hand) ? PLAN_PICK_ID_BY_HAND : PLAN_PICK_ID;
	Datum		values[3];
	bool		isnull;

	values[1] = TimestampTzGetDatum(now);
	values[2] = ObjectIdGetDatum(by_hand);
	if (sticky_saga_id != 0)
	{
		values[0] = Int64GetDatum(sticky_saga_id);
		sticky_saga_id = 0;
		if (run_plan(pick_id, values, NULL) == 1)
			return true;
	}

	if (now - pick_floor_since >= FLOOR_RESET_MS * INT64CONST(1000))
	{
		pick_floor = DT_NOBEGIN;
		pick_floor_since = now;
	}
	values[0] = TimestampTzGetDatum(now);
	values[1] = TimestampTzGetDatum(pick_floor);
	if (run_plan(pick, values, NULL) == 0 && pick_floor != DT_NOBEGIN)
	{
		pick_floor = DT_NOBEGIN;
		pick_floor_since = now;
		values[1] = TimestampTzGetDatum(pick_floor);
		(void) run_plan(pick, values, NULL);
	}
	if (SPI_processed == 0)
		return false;
	pick_floor = DatumGetTimestampTz(column(0, 10, &isnull));
	return true;
}

/*
 * The orchestrator's unit of work, inside SPI: lock a due saga and advance
 * it by one step attempt or transition.  False if no saga is due.  Never on
 * a standby, where the sagas belong to the primary: the row lock would fail
 * there anyway, but that must not be what keeps a step from running.
 *
 * by_hand: the role whose session runs a tick by hand (saga_tick,
 * saga_run), or InvalidOid for the worker.  A step runs in the session that
 * ticks, where that session's temporary tables and custom settings are
 * visible to it, so a tick by hand takes only the sagas whose definer that
 * role has the privileges of (is, inherits from, or is a superuser): steps
 * it could have run itself by SET ROLE.  The others are left to the worker
 * (a session of no one) or to their definers (docs/sagas.md).
 *
 * batch: the worker's batch this unit belongs to (saga_worker_tick), or
 * NULL.  In a batch, only the first unit looks for a branch, and a branch
 * ends the batch: a finished branch has locked its saga's row to make it
 * due, and the other branches' orchestrators wait for that lock.  A
 * transient error in a unit after the first rolls back only that unit and
 * ends the batch, so the units before it still commit.
 */
static bool
tick_once(Oid by_hand, TickBatch *batch)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Saga		s;
	int64		id;
	char	   *name;
	bool		isnull;

	PreventCommandDuringRecovery("saga_tick()");
	/* a branch of a parallel group first, unless a saga is running on */
	if (sticky_saga_id == 0 && (batch == NULL || batch->units == 0) && branch_tick(by_hand))
	{
		if (batch)
			batch->stop = true;
		return true;
	}
	if (!saga_pick(by_hand))
		return false;
	id = DatumGetInt64(column(0, 1, &isnull));
	name = column_text(0, 11);

	/*
	 * The saga's row is locked in the tick's transaction; the work on it is
	 * done in a subtransaction, so that an error outside its step's own
	 * subtransaction (a context past jsonb's limit, a broken definition)
	 * suspends this saga instead of aborting every tick that picks it: it
	 * would stay the oldest due saga, and no other would ever run.
	 */
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		saga_read(&s);
		if (s.state == SAGA_RUNNING || s.state == SAGA_COMPENSATING)
			saga_advance(&s);
		else
		{
			s.next_run_at = 0;	/* finished or parked: nothing is due */
			saga_write(&s);
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		step_saga_id = 0;
		if (!tick_error_is_transient(edata))
			saga_suspend(id, name, edata);
		else if (batch == NULL || batch->units == 0)
			ReThrowError(edata);
		else
		{
			/* the saga stays as it was, locked until the batch commits */
			ereport(LOG,
					(errmsg("saga " INT64_FORMAT " (\"%s\") was not advanced in this batch: %s",
							id, name, edata->message),
					 errdetail("The batch ends here; the saga is taken again by the next tick.")));
			batch->stop = true;
		}
		return true;
	}
	PG_END_TRY();

	/*
	 * Its next step is due at once: the next tick takes it first.  Or it
	 * waits for other processes now (the relay for a command it sent,
	 * orchestrators for the branches of a group), which see it at the
	 * commit: the batch ends here.
	 */
	if (s.next_run_at != 0 && s.next_run_at <= GetCurrentTimestamp())
		sticky_saga_id = s.id;
	else if (batch && (s.state == SAGA_RUNNING || s.state == SAGA_COMPENSATING) && s.step > 0 &&
			 (s.awaiting || s.def->steps[s.step - 1].kind == STEP_GROUP))
		batch->stop = true;
	return true;
}

/* ---- SQL-callable functions ---- */

/*
 * A saga name travels in command headers and metrics labels: refuse control
 * characters (22023).  Its length is checked by _saga_normalize.
 */
static void
check_saga_name(text *name)
{
	const char *p = VARDATA_ANY(name);
	int			len = VARSIZE_ANY_EXHDR(name);
	int			i;

	for (i = 0; i < len; i++)
		if ((unsigned char) p[i] < 0x20 || p[i] == 0x7F)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("saga name must not contain control characters"),
					 errdetail("Byte %d is 0x%02X.", i + 1, (unsigned char) p[i]),
					 errhint("Saga names travel in the headers of async commands and in metrics labels.")));
}

/*
 * Step names travel in the headers and payloads of async commands, in
 * idempotency keys and in events: 1 to 63 bytes of ASCII letters, digits,
 * '_', '-' and '.' (22023).  steps is _saga_normalize's array (or a
 * group's branches, group_pos the group's position).
 */
static void
check_step_names(JsonbContainer *steps, int group_pos)
{
	JsonbIterator *it = JsonbIteratorInit(steps);
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			pos = 0;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		JsonbValue *name;
		JsonbValue *branches;
		int			i;
		bool		ok;

		if (tok != WJB_ELEM || v.type != jbvBinary)
			continue;
		pos++;
		name = getKeyJsonValueFromContainer(v.val.binary.data, "name", 4, NULL);
		ok = name != NULL && name->type == jbvString && name->val.string.len >= 1 &&
			name->val.string.len <= SAGA_NAME_MAX;
		for (i = 0; ok && i < name->val.string.len; i++)
		{
			char		c = name->val.string.val[i];

			ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
				c == '_' || c == '-' || c == '.';
		}
		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 group_pos ? errmsg("branch %d of step %d has an invalid step name", pos, group_pos) :
					 errmsg("step %d has an invalid step name", pos),
					 errdetail("Step names are 1 to %d ASCII letters, digits, \"_\", \"-\" and \".\".",
							   SAGA_NAME_MAX),
					 errhint("Step names travel in the headers of async commands, in idempotency keys and in events.")));
		branches = getKeyJsonValueFromContainer(v.val.binary.data, "parallel", 8, NULL);
		if (branches && branches->type == jbvBinary && group_pos == 0)
			check_step_names(branches->val.binary.data, pos);
	}
}

/*
 * The search_path the steps will run with: the caller's, with pg_temp
 * moved to the end (a temporary object never shadows what the author
 * meant; "$user" stays, and resolves to the definer the steps run as).
 */
static char *
definer_search_path(void)
{
	char	   *raw = pstrdup(namespace_search_path);
	List	   *names;
	ListCell   *lc;
	StringInfoData buf;

	initStringInfo(&buf);
	if (!SplitIdentifierString(raw, ',', &names))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("search_path \"%s\" cannot be parsed", namespace_search_path)));
	foreach(lc, names)
	{
		const char *name = lfirst(lc);

		if (strcmp(name, "pg_temp") == 0 || strncmp(name, "pg_temp_", 8) == 0)
			continue;
		appendStringInfo(&buf, "%s, ", quote_identifier(name));
	}
	appendStringInfoString(&buf, "pg_temp");
	return buf.data;
}

/*
 * saga_define(name, steps) → version.  Validates and normalizes the steps as
 * the caller (resolving function names with the caller's search_path), then
 * stores a new version unless the latest one is identical.  The caller is
 * recorded as the role the steps run as, so it must not be a superuser.
 */
Datum
saga_define(PG_FUNCTION_ARGS)
{
	Oid			definer = GetUserId();
	char	   *search_path = definer_search_path();
	Datum		values[5];
	bool		isnull;
	Jsonb	   *normalized;
	int			version = 1;
	ResilienceUser save;
	int			ret;

	require_arg(fcinfo, 0, "saga name");
	require_arg(fcinfo, 1, "steps");
	check_saga_name(PG_GETARG_TEXT_PP(0));
	if (superuser_arg(definer))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("a saga cannot be defined by a superuser"),
				 errdetail("Steps run as the role that defines the saga, and never as a superuser."),
				 errhint("SET ROLE to a role that has just the privileges the steps need (and is a member of resilience_admin), then call saga_define.")));

	SPI_connect();
	{
		Oid			argtypes[3] = {TEXTOID, JSONBOID, TEXTOID};

		values[0] = PG_GETARG_DATUM(0);
		values[1] = PG_GETARG_DATUM(1);
		values[2] = CStringGetTextDatum(namespace_search_path);
		ret = SPI_execute_with_args("SELECT resilience._saga_normalize($1, $2, $3)",
									3, argtypes, values, NULL, false, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "resilience._saga_normalize failed: %s", SPI_result_code_string(ret));
		normalized = column_jsonb(0, 1);
		if (normalized == NULL)
			elog(ERROR, "resilience._saga_normalize returned NULL");
		check_step_names(&normalized->root, 0);
	}

	/* store it as the extension's owner, with a pinned search_path */
	resilience_become_owner(true, &save);

	/* one definer of a name at a time; saga_start is not blocked */
	ret = SPI_execute("LOCK TABLE resilience.saga_definitions IN SHARE ROW EXCLUSIVE MODE", false, 0);
	if (ret != SPI_OK_UTILITY)
		elog(ERROR, "LOCK TABLE failed: %s", SPI_result_code_string(ret));
	values[0] = PG_GETARG_DATUM(0);
	values[1] = JsonbPGetDatum(normalized);
	values[2] = ObjectIdGetDatum(definer);
	values[3] = CStringGetTextDatum(search_path);
	if (run_plan(PLAN_DEF_LATEST, values, NULL) == 1)
	{
		version = DatumGetInt32(column(0, 1, &isnull));
		if (!DatumGetBool(column(0, 2, &isnull)))
			version++;
		else
			version = -version; /* identical: keep it */
	}
	if (version > 0)
	{
		values[1] = Int32GetDatum(version);
		values[2] = JsonbPGetDatum(normalized);
		values[3] = ObjectIdGetDatum(definer);
		values[4] = CStringGetTextDatum(search_path);
		run_plan(PLAN_DEF_INSERT, values, NULL);
	}
	else
		version = -version;

	resilience_restore_user(&save);
	SPI_finish();
	PG_RETURN_INT32(version);
}

/*
 * saga_start(name, payload, idempotency_key) → saga id.  The saga exists if
 * and only if this transaction commits; its first step runs in a transaction
 * of its own.  A key already used for this saga name returns that saga (if
 * the payload is the same).
 */
Datum
saga_start(PG_FUNCTION_ARGS)
{
	char	   *name = text_arg(fcinfo, 0, "saga name", SAGA_NAME_MAX);
	Jsonb	   *payload;
	char	   *key = NULL;
	Datum		values[7];
	bool		isnull[7] = {0};
	bool		null;
	int64		definition_id;
	int			version;
	int64		id;
	TimestampTz now = GetCurrentTimestamp();
	ResilienceUser save;
	char	   *traceparent;
	char	   *tracestate;

	require_arg(fcinfo, 1, "payload");
	payload = PG_GETARG_JSONB_P(1);
	if (!JB_ROOT_IS_OBJECT(payload))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload must be a JSON object"),
				 errdetail("It becomes the saga's context, into which the steps' results are merged."),
				 errhint("Pass '{}' for an empty payload.")));
	if (!PG_ARGISNULL(2))
		key = text_arg(fcinfo, 2, "idempotency_key", KEY_MAX);
	/* the caller's trace, for the commands the saga will publish */
	traceparent = pstrdup(resilience_traceparent ? resilience_traceparent : "");
	tracestate = pstrdup(resilience_tracestate ? resilience_tracestate : "");

	SPI_connect();
	resilience_become_owner(true, &save);
	values[0] = CStringGetTextDatum(name);
	if (run_plan(PLAN_LATEST, values, NULL) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("saga \"%s\" is not defined", name),
				 errhint("Define it with resilience.saga_define.")));
	definition_id = DatumGetInt64(column(0, 1, &null));
	version = DatumGetInt32(column(0, 2, &null));

	values[0] = Int64GetDatum(definition_id);
	values[1] = CStringGetTextDatum(name);
	values[2] = JsonbPGetDatum(payload);
	values[3] = key ? CStringGetTextDatum(key) : (Datum) 0;
	isnull[3] = key == NULL;
	values[4] = TimestampTzGetDatum(now);
	values[5] = ObjectIdGetDatum(save.userid);
	isnull[5] = !tenants_enabled();
	isnull[6] = traceparent[0] == '\0';
	if (!isnull[6])
	{
		JsonBuf		trace;

		jb_init(&trace);
		jb_str(&trace, "traceparent", traceparent);
		if (tracestate[0] != '\0')
			jb_str(&trace, "tracestate", tracestate);
		values[6] = JsonbPGetDatum(jb_done(&trace));
	}
	if (run_plan(PLAN_START, values, isnull) == 1)
	{
		Saga		s;
		JsonBuf		detail;

		id = DatumGetInt64(column(0, 1, &null));
		memset(&s, 0, sizeof(s));
		s.id = id;
		s.state = SAGA_RUNNING;
		jb_init(&detail);
		jb_int(&detail, "version", version);
		jb_str(&detail, "idempotency_key", key);
		saga_event(&s, "saga_started", 0, 0, false, NULL, jb_done(&detail));
		metrics_add_at_commit(RC_SAGA_EVENTS, metrics_saga_event("saga_started"), name, 1);
		worker_wake_at_commit();
	}
	else
	{
		/* the key was used: that saga, if its payload is the same */
		values[0] = CStringGetTextDatum(name);
		values[1] = CStringGetTextDatum(key);
		values[2] = JsonbPGetDatum(payload);
		if (run_plan(PLAN_BY_KEY, values, NULL) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not start saga \"%s\" with idempotency key \"%s\"", name, key),
					 errdetail("A concurrent transaction started it, and this transaction's snapshot cannot see it."),
					 errhint("Retry the transaction.")));
		id = DatumGetInt64(column(0, 1, &null));
		if (!DatumGetBool(column(0, 2, &null)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("idempotency key \"%s\" was used for saga " INT64_FORMAT " with another payload",
							key, id),
					 errhint("Use a new key for a new saga.")));
	}
	resilience_restore_user(&save);
	SPI_finish();
	PG_RETURN_INT64(id);
}

/* saga_tick() → 1 if a saga was due and advanced, else 0. */
Datum
saga_tick(PG_FUNCTION_ARGS)
{
	bool		did;

	not_from_own_step(0, "saga_tick");
	SPI_connect();
	/* the role of the session, not the owner this SECURITY DEFINER runs as */
	did = tick_once(GetOuterUserId(), NULL);
	SPI_finish();
	PG_RETURN_INT32(did ? 1 : 0);
}

/*
 * _saga_worker_tick() → ms until the worker's sagas job should run again: 0
 * after advancing a saga (there may be more), else until the next saga is
 * due, or -1 if none is.
 *
 * One call is a batch: after its first unit it goes on, in the same
 * transaction, with the saga it advanced (to its end or its first wait) and
 * then with the next due sagas, at most BATCH_UNITS units, BATCH_MS after
 * the first one, and BATCH_SUBXIDS subtransaction ids.  Each saga's work
 * keeps its subtransaction (and each SQL step its own in that), so an
 * error in one never touches another; all commit together, so a crash
 * redoes the whole batch and applies no step twice.  A saga left waiting
 * for other processes (a command sent, a group's branches) ends the batch,
 * so they see it at once (tick_once).
 */
Datum
saga_worker_tick(PG_FUNCTION_ARGS)
{
	int64		wish = 0;
	TickBatch	batch = {0};

	not_from_own_step(0, "saga_tick");
	SPI_connect();
	if (!tick_once(InvalidOid, &batch))
	{
		bool		isnull;
		Datum		next;

		run_plan(PLAN_NEXT_DUE, NULL, NULL);
		next = column(0, 1, &isnull);
		if (isnull)
			wish = -1;
		else
		{
			/* due now but locked by another transaction: look again soon */
			wish = (DatumGetTimestampTz(next) - GetCurrentTimestamp() + 999) / 1000;
			if (wish <= 0)
				wish = LOCKED_RETRY_MS;
		}
	}
	else
	{
		TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), BATCH_MS);

		for (batch.units = 1; batch.units < BATCH_UNITS && !batch.stop; batch.units++)
		{
			if (GetCurrentTimestamp() >= until ||
				MyProc->subxidStatus.overflowed || MyProc->subxidStatus.count >= BATCH_SUBXIDS ||
				!tick_once(InvalidOid, &batch))
				break;
		}
	}
	SPI_finish();
	PG_RETURN_INT64(wish);
}

/* Has resilience.sagas the trace_context column (not before 0.2)? */
static bool
has_trace_context(void)
{
	return get_attnum(resilience_relid("sagas"), "trace_context") != InvalidAttrNumber;
}

/* Add the trace context saga id was started in (if any) to headers. */
static void
add_trace_context(int64 id, JsonBuf *headers)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	bool		isnull;
	const char *names[2] = {"traceparent", "tracestate"};

	if (!has_trace_context())
		return;
	values[0] = Int64GetDatum(id);
	if (SPI_execute_with_args("SELECT trace_context ->> 'traceparent', trace_context ->> 'tracestate'"
							  " FROM resilience.sagas WHERE id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "reading the trace context of saga " INT64_FORMAT " failed", id);
	for (int i = 0; i < 2; i++)
	{
		Datum		d = column(0, i + 1, &isnull);

		if (!isnull)
			jb_str(headers, names[i], TextDatumGetCString(d));
	}
}

/*
 * May caller reply to saga s (locked)?  Its owner role (who started it), the
 * definer, the roles that have the privileges of either and resilience_admin
 * may; a saga started before 0.2 has no owner and takes any reply.
 */
static void
saga_check_replier(Saga *s, Oid caller)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	bool		isnull;
	Oid			owner;

	values[0] = Int64GetDatum(s->id);
	if (SPI_execute_with_args("SELECT owner_role::pg_catalog.oid FROM resilience.sagas"
							  " WHERE id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "reading the owner of saga " INT64_FORMAT " failed", s->id);
	owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull || tenant_may_act(caller, s->def->definer))
		return;
	tenant_check(TENANT_SAGA, psprintf(INT64_FORMAT, s->id), owner, caller);
}

/*
 * The group step and branch called name in def (false if none is).
 */
static bool
branch_number(SagaDef *def, const char *name, int *stepno, int *branchno)
{
	int			i;
	int			j;

	for (i = 0; i < def->nsteps; i++)
		for (j = 0; j < def->steps[i].nbranches; j++)
			if (strcmp(def->steps[i].branches[j].name, name) == 0)
			{
				*stepno = i + 1;
				*branchno = j + 1;
				return true;
			}
	return false;
}

/* The reply as saga_reply stores it, for the tick to apply. */
static Jsonb *
reply_json(bool completed, Jsonb *body, bool retryable, TimestampTz now)
{
	JsonBuf		reply;

	jb_init(&reply);
	jb_str(&reply, "status", completed ? "completed" : "failed");
	jb_jsonb(&reply, completed ? "result" : "error", body);
	if (!completed)
		jb_bool(&reply, "retryable", retryable);
	jb_time(&reply, "received_at", now);
	return jb_done(&reply);
}

/* 55000: no command of that kind was ever sent for step (or branch) step. */
static void
reply_not_sent(Saga *s, const char *step, const char *command)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("step \"%s\" of saga " INT64_FORMAT " is not waiting for a reply",
					step, s->id),
			 errdetail("No %s command has been sent for it; the saga is %s at step %d.",
					   command, state_names[s->state], s->step),
			 errhint("Reply only to a command the saga sent: its outbox event names the saga, the step and the command.")));
}

/*
 * A reply to the command of branch branchno of group stepno of saga s (read
 * unlocked): the same rules as saga_reply's, on the branch's row, which it
 * locks (waiting for a tick that holds it), and never the saga's: the lock
 * order is the branch row, then the saga row.  The tick that claims the
 * branch (made due at once) applies it.
 */
static bool
branch_reply(Saga *s, int stepno, int branchno, bool completed, Jsonb *body, bool retryable,
			 bool compensation, JsonBuf *detail)
{
	SagaStepDef *st = &s->def->steps[stepno - 1].branches[branchno - 1];
	const char *command = compensation ? "compensation" : "action";
	Datum		values[3];
	Branch		b;
	TimestampTz now;
	bool		waiting;

	values[0] = Int64GetDatum(s->id);
	values[1] = Int32GetDatum(stepno);
	values[2] = Int32GetDatum(branchno);
	if (run_plan(PLAN_BRANCH_LOCK, values, NULL) == 0)
		reply_not_sent(s, st->name, command);
	branch_read(0, &b);
	now = GetCurrentTimestamp();
	waiting = b.awaiting && strcmp(b.state, compensation ? "compensating" : "pending") == 0;
	if (waiting && b.reply == NULL && now <= b.next_run_at)
	{
		b.reply = reply_json(completed, body, retryable, now);
		b.next_run_at = now;
		branch_write(&b);
		saga_event_at(s, "reply_received", st->name, compensation ? b.compensation_attempts : b.attempts,
					  compensation, completed ? NULL : body, jb_done(detail));
		worker_wake_at_commit();
		return true;
	}
	if ((compensation ? b.compensation_attempts : b.attempts) == 0)
		reply_not_sent(s, st->name, command);
	jb_str(detail, "reason", !waiting ? "not_waiting" : b.reply ? "already_replied" : "after_deadline");
	jb_jsonb(detail, completed ? "result" : "error", body);
	saga_event_at(s, "reply_ignored", st->name, compensation ? b.compensation_attempts : b.attempts,
				  compensation, NULL, jb_done(detail));
	return false;
}

/*
 * A reply to an async command.  Accepted (true) only while the step (or
 * branch of a parallel group) waits for it: the command of that step and
 * kind is out, no reply is recorded yet, and its deadline has not passed;
 * the next tick applies it.  A reply to a command that was sent but no
 * longer waits is recorded and ignored (false).  A reply to a step that is
 * not async, or to which no command was ever sent, is an error.
 */
static bool
saga_reply(FunctionCallInfo fcinfo, bool completed, Jsonb *body, bool retryable,
		   bool compensation)
{
	int64		saga_id;
	char	   *step;
	Saga		s;
	int			stepno;
	int			branchno = 0;
	SagaStepDef *st;
	SagaOp	   *op;
	const char *command = compensation ? "compensation" : "action";
	TimestampTz now;
	bool		waiting;
	bool		accepted;
	JsonBuf		detail;
	ResilienceUser save;
	Datum		values[1];

	saga_id = saga_id_arg(fcinfo, completed ? "saga_step_completed" : "saga_step_failed");
	step = text_arg(fcinfo, 1, "step", SAGA_NAME_MAX);

	SPI_connect();
	resilience_become_owner(true, &save);
	/* read first: a branch's reply must not lock the saga's row */
	values[0] = Int64GetDatum(saga_id);
	if (run_plan(PLAN_SAGA_READ, values, NULL) == 0)
		saga_lock(&s, saga_id); /* raises 42704 */
	saga_read(&s);
	if (tenants_enabled())
		saga_check_replier(&s, save.userid);
	stepno = step_number(s.def, step);
	if (stepno == 0 && !branch_number(s.def, step, &stepno, &branchno))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("saga " INT64_FORMAT " (\"%s\" version %d) has no step \"%s\"",
						saga_id, s.def->name, s.def->version, step)));
	if (branchno == 0)
		saga_lock(&s, saga_id);
	st = branchno ? &s.def->steps[stepno - 1].branches[branchno - 1] : &s.def->steps[stepno - 1];
	op = compensation ? &st->compensation : &st->action;
	if (op->kind != OP_ASYNC)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the %s of step \"%s\" of saga " INT64_FORMAT " is not async",
						command, step, saga_id),
				 errdetail(op->kind == OP_SQL ? "It is the function %s." : "The step has no %s.",
						   op->kind == OP_SQL ? op->function : command),
				 errhint("Only async actions and compensations take replies%s.",
						 compensation ? "" : "; a reply to a compensation passes compensation => true")));

	jb_init(&detail);
	jb_str(&detail, "command", command);
	jb_str(&detail, "status", completed ? "completed" : "failed");
	if (!completed)
		jb_bool(&detail, "retryable", retryable);
	if (branchno)
	{
		accepted = branch_reply(&s, stepno, branchno, completed, body, retryable, compensation, &detail);
		resilience_restore_user(&save);
		SPI_finish();
		return accepted;
	}

	now = GetCurrentTimestamp();
	waiting = s.awaiting && s.step == stepno &&
		s.state == (compensation ? SAGA_COMPENSATING : SAGA_RUNNING);
	if (waiting && s.reply == NULL && now <= s.next_run_at)
	{
		s.reply = reply_json(completed, body, retryable, now);
		s.next_run_at = now;
		saga_event(&s, "reply_received", stepno, s.attempt, compensation,
				   completed ? NULL : body, jb_done(&detail));
		saga_write(&s);
		worker_wake_at_commit();
		resilience_restore_user(&save);
		SPI_finish();
		return true;
	}
	else
	{
		char	   *state;
		int			sent = 0;

		if (!step_row_read(&s, stepno, compensation, &state, &sent) || sent == 0)
			reply_not_sent(&s, step, command);
		jb_str(&detail, "reason", !waiting ? "not_waiting" :
			   s.reply ? "already_replied" : "after_deadline");
		jb_jsonb(&detail, completed ? "result" : "error", body);
		saga_event(&s, "reply_ignored", stepno, sent, compensation, NULL, jb_done(&detail));
		resilience_restore_user(&save);
		SPI_finish();
		return false;
	}
}

/* saga_step_completed(saga_id, step, result, compensation) → accepted? */
Datum
saga_step_completed(PG_FUNCTION_ARGS)
{
	Jsonb	   *result = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);

	require_arg(fcinfo, 3, "compensation");
	if (result && !JB_ROOT_IS_OBJECT(result))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("result must be a JSON object, or NULL"),
				 errdetail("It is merged into the saga's context.")));
	PG_RETURN_BOOL(saga_reply(fcinfo, true, result, false, PG_GETARG_BOOL(3)));
}

/* saga_step_failed(saga_id, step, error, retryable, compensation) → accepted? */
Datum
saga_step_failed(PG_FUNCTION_ARGS)
{
	require_arg(fcinfo, 2, "error");
	require_arg(fcinfo, 3, "retryable");
	require_arg(fcinfo, 4, "compensation");
	PG_RETURN_BOOL(saga_reply(fcinfo, false, PG_GETARG_JSONB_P(2), PG_GETARG_BOOL(3),
							  PG_GETARG_BOOL(4)));
}

/*
 * May caller signal saga s, whose await steps of this signal are those of
 * the numbers in steps?  Its definer, the roles that have its privileges,
 * resilience_admin, and the roles those steps name (signalers); else 42501.
 */
static void
check_signaler(Saga *s, List *steps, Oid caller)
{
	ListCell   *lc;
	char	   *definer;

	if (tenant_may_act(caller, s->def->definer))
		return;
	foreach(lc, steps)
	{
		SagaStepDef *st = &s->def->steps[lfirst_int(lc) - 1];
		int			i;

		for (i = 0; i < st->nsignalers; i++)
		{
			Oid			role = get_role_oid(st->signalers[i], true);

			if (OidIsValid(role) && has_privs_of_role(caller, role))
				return;
		}
	}
	definer = GetUserNameFromId(s->def->definer, true);
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to signal saga " INT64_FORMAT, s->id),
			 errdetail("Its definer%s%s, resilience_admin and the roles its await steps name in \"signalers\" may.",
					   definer ? " " : "", definer ? definer : ""),
			 errhint("Be granted one of those roles, or name yours in the step's \"signalers\".")));
}

/*
 * Deliver signal to saga saga_id (inside SPI, as the extension's owner;
 * caller is who sends it).  The signal is kept until an await step of
 * that name consumes it, now or when the saga gets there; the same
 * signal_id again is recorded once (false).  A saga awaiting it right now
 * is made due, and the worker woken at commit.
 */
static bool
signal_deliver(int64 saga_id, const char *signal, Jsonb *payload, const char *signal_id, Oid caller)
{
	Saga		s;
	List	   *steps = NIL;
	int			i;
	Datum		values[6];
	bool		isnull[6] = {0};
	TimestampTz now = GetCurrentTimestamp();
	JsonBuf		detail;
	SagaStepDef *current;

	saga_lock(&s, saga_id);
	for (i = 0; i < s.def->nsteps; i++)
		if (s.def->steps[i].kind == STEP_AWAIT && strcmp(s.def->steps[i].signal, signal) == 0)
			steps = lappend_int(steps, i + 1);
	if (steps == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("saga " INT64_FORMAT " (\"%s\" version %d) awaits no signal \"%s\"",
						saga_id, s.def->name, s.def->version, signal),
				 errhint("A step {\"await\": \"%s\", ...} of its definition would.", signal)));
	check_signaler(&s, steps, caller);
	if (s.state != SAGA_RUNNING && s.state != SAGA_SUSPENDED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("saga " INT64_FORMAT " no longer takes signals", saga_id),
				 errdetail("It is %s; only running (or suspended) sagas take signals.",
						   state_names[s.state])));

	values[0] = Int64GetDatum(saga_id);
	values[1] = CStringGetTextDatum(signal);
	values[2] = signal_id ? CStringGetTextDatum(signal_id) : (Datum) 0;
	isnull[2] = signal_id == NULL;
	values[3] = payload ? JsonbPGetDatum(payload) : (Datum) 0;
	isnull[3] = payload == NULL;
	values[4] = ObjectIdGetDatum(caller);
	values[5] = TimestampTzGetDatum(now);
	if (run_plan(PLAN_SIGNAL_INSERT, values, isnull) == 0)
		return false;			/* that signal_id came before */

	jb_init(&detail);
	jb_str(&detail, "signal", signal);
	jb_str(&detail, "signal_id", signal_id);
	current = s.step > 0 ? &s.def->steps[s.step - 1] : NULL;
	if (s.state == SAGA_RUNNING && s.awaiting && current && current->kind == STEP_AWAIT &&
		strcmp(current->signal, signal) == 0)
	{
		s.next_run_at = now;
		saga_write(&s);
		worker_wake_at_commit();
		jb_bool(&detail, "awaited", true);
	}
	else
		jb_bool(&detail, "awaited", false);
	saga_event(&s, "signal_received", linitial_int(steps), 0, false, NULL, jb_done(&detail));
	return true;
}

/* The signal, payload and signal_id arguments of saga_signal, from argno on. */
static void
signal_args(FunctionCallInfo fcinfo, int argno, char **signal, Jsonb **payload, char **signal_id)
{
	*signal = text_arg(fcinfo, argno, "signal", SAGA_NAME_MAX);
	*payload = PG_ARGISNULL(argno + 1) ? NULL : PG_GETARG_JSONB_P(argno + 1);
	if (*payload && !JB_ROOT_IS_OBJECT(*payload))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload must be a JSON object, or NULL"),
				 errdetail("It is merged into the saga's context, like a step's result.")));
	*signal_id = PG_ARGISNULL(argno + 2) ? NULL : text_arg(fcinfo, argno + 2, "signal_id", KEY_MAX);
}

/* saga_signal(saga_id, signal, payload, signal_id) → recorded (false: a duplicate)? */
Datum
saga_signal(PG_FUNCTION_ARGS)
{
	int64		saga_id = saga_id_arg(fcinfo, "saga_signal");
	char	   *signal;
	Jsonb	   *payload;
	char	   *signal_id;
	ResilienceUser save;
	bool		recorded;

	signal_args(fcinfo, 1, &signal, &payload, &signal_id);
	SPI_connect();
	resilience_become_owner(true, &save);
	recorded = signal_deliver(saga_id, signal, payload, signal_id, save.userid);
	resilience_restore_user(&save);
	SPI_finish();
	PG_RETURN_BOOL(recorded);
}

/* saga_signal_by_key(name, idempotency_key, signal, payload, signal_id): saga_signal to the saga started with that key. */
Datum
saga_signal_by_key(PG_FUNCTION_ARGS)
{
	char	   *name = text_arg(fcinfo, 0, "saga name", SAGA_NAME_MAX);
	char	   *key = text_arg(fcinfo, 1, "idempotency_key", KEY_MAX);
	char	   *signal;
	Jsonb	   *payload;
	char	   *signal_id;
	ResilienceUser save;
	Datum		values[2];
	bool		isnull;
	int64		saga_id;
	bool		recorded;

	signal_args(fcinfo, 2, &signal, &payload, &signal_id);
	SPI_connect();
	resilience_become_owner(true, &save);
	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(key);
	if (run_plan(PLAN_ID_BY_KEY, values, NULL) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no saga \"%s\" was started with idempotency key \"%s\"", name, key),
				 errhint("Finished sagas are removed after resilience.saga_retention.")));
	saga_id = DatumGetInt64(column(0, 1, &isnull));
	not_from_own_step(saga_id, "saga_signal_by_key");
	recorded = signal_deliver(saga_id, signal, payload, signal_id, save.userid);
	resilience_restore_user(&save);
	SPI_finish();
	PG_RETURN_BOOL(recorded);
}

/*
 * saga_retry(saga_id): a parked saga compensates again from where it
 * stopped; a suspended one resumes the work its failed tick was doing, as
 * running, or as compensating if it has an error (only compensation sets
 * one), its step, attempt and awaited reply as they were.
 */
Datum
saga_retry(PG_FUNCTION_ARGS)
{
	int64		saga_id;
	Saga		s;
	bool		suspended;

	saga_id = saga_id_arg(fcinfo, "saga_retry");
	SPI_connect();
	saga_lock(&s, saga_id);
	if (s.state != SAGA_PARKED && s.state != SAGA_SUSPENDED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("saga " INT64_FORMAT " is neither parked nor suspended", saga_id),
				 errdetail("It is %s; saga_retry resumes sagas in compensation_failed or suspended.",
						   state_names[s.state])));
	suspended = s.state == SAGA_SUSPENDED;
	s.state = (!suspended || s.error) ? SAGA_COMPENSATING : SAGA_RUNNING;
	s.next_run_at = GetCurrentTimestamp();
	if (!suspended)
	{
		s.attempt = 0;
		s.awaiting = false;
		s.reply = NULL;
		step_row_state(&s, s.step, "compensating");
		if (s.step > 0 && s.def->steps[s.step - 1].kind == STEP_GROUP)
			(void) group_arm_compensations(&s, &s.def->steps[s.step - 1], "compensation_failed", NULL);
	}
	saga_event(&s, "saga_retried", suspended ? 0 : s.step, 0, !suspended, NULL, NULL);
	saga_write(&s);
	worker_wake_at_commit();
	SPI_finish();
	PG_RETURN_VOID();
}

/*
 * saga_abort(saga_id, reason): a running saga stops and compensates what it
 * completed.  A step whose async command is out is abandoned (its reply will
 * be ignored) and compensated too, since it may have been done; a step
 * waiting to retry a failed SQL attempt did nothing and is marked failed.
 */
Datum
saga_abort(PG_FUNCTION_ARGS)
{
	int64		saga_id;
	char	   *reason;
	Saga		s;
	int			from;
	char	   *state;
	int			attempts;
	JsonBuf		detail;
	JsonBuf		error;

	saga_id = saga_id_arg(fcinfo, "saga_abort");
	reason = text_arg(fcinfo, 1, "reason", REASON_MAX);
	SPI_connect();
	saga_lock(&s, saga_id);
	if (s.state != SAGA_RUNNING && !(s.state == SAGA_SUSPENDED && s.error == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("saga " INT64_FORMAT " is not running", saga_id),
				 errdetail("It is %s; only running sagas (or sagas suspended while running) can be aborted.",
						   state_names[s.state]),
				 s.state == SAGA_PARKED ?
				 errhint("Fix the failing compensation and call resilience.saga_retry(" INT64_FORMAT ").",
						 saga_id) : 0));

	from = s.step - 1;
	if (s.awaiting && s.def->steps[s.step - 1].kind == STEP_GROUP)
	{
		/* branches not started are cancelled; the group compensates its completed ones */
		group_cancel_pending(&s);
		step_row_state(&s, s.step, "compensating");
		from = s.step;
	}
	else if (s.awaiting && s.def->steps[s.step - 1].kind != STEP_ACTION)
		step_row_state(&s, s.step, "failed");	/* a timer or an await: nothing done */
	else if (s.awaiting)
	{
		step_row_state(&s, s.step, "abandoned");
		from = s.step;
	}
	else if (step_row_read(&s, s.step, false, &state, &attempts) && strcmp(state, "retrying") == 0)
		step_row_state(&s, s.step, "failed");
	jb_init(&detail);
	jb_str(&detail, "reason", reason);
	saga_event(&s, "saga_aborted", s.step, s.attempt, false, NULL, jb_done(&detail));
	jb_init(&error);
	jb_str(&error, "step", s.def->steps[s.step - 1].name);
	jb_str(&error, "aborted", reason);
	compensation_begin(&s, from, jb_done(&error));
	saga_write(&s);
	worker_wake_at_commit();
	SPI_finish();
	PG_RETURN_VOID();
}

/*
 * _saga_retention() → resilience.saga_retention: the setting when the
 * library is preloaded, its default otherwise (never a placeholder's value).
 */
Datum
saga_retention(PG_FUNCTION_ARGS)
{
	Interval   *result = palloc0(sizeof(Interval));

	result->time = (int64) resilience_saga_retention_s * USECS_PER_SEC;
	PG_RETURN_INTERVAL_P(result);
}

/*
 * _saga_state_valid(kind, state): the CHECK constraint of the state column
 * of sagas ('saga'), saga_steps ('step') and saga_branches ('branch').  An
 * IN list constraint is rebuilt from its stored text (a text array constant,
 * token by token) for every statement that writes the table, and the
 * orchestrator writes these tables several times per step: that was about
 * a third of its CPU time (docs/benchmarks.md).  A call of this function
 * is a short node to rebuild.
 */
Datum
saga_state_valid(PG_FUNCTION_ARGS)
{
	static const char *const step_states[] = {
		"waiting", "retrying", "completed", "failed", "timed_out", "abandoned",
		"compensating", "compensated", "compensation_failed"
	};
	static const char *const branch_states[] = {
		"pending", "completed", "failed", "timed_out", "cancelled",
		"compensating", "compensated", "compensation_failed"
	};
	char	   *kind = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *state = text_to_cstring(PG_GETARG_TEXT_PP(1));
	const char *const *names;
	int			n;

	if (strcmp(kind, "saga") == 0)
		names = state_names, n = lengthof(state_names);
	else if (strcmp(kind, "step") == 0)
		names = step_states, n = lengthof(step_states);
	else if (strcmp(kind, "branch") == 0)
		names = branch_states, n = lengthof(branch_states);
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown saga state kind \"%s\"", kind),
				 errhint("The kinds are saga, step and branch.")));
	for (int i = 0; i < n; i++)
		if (strcmp(names[i], state) == 0)
			PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(false);
}
