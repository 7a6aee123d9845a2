/*-------------------------------------------------------------------------
 *
 * schedule.c
 *		Durable schedules: cron slots that run exactly once, with retries,
 *		catch-up after downtime and an overlap policy.
 *
 * A schedule is a row of resilience.schedule_definitions; the cron line is
 * evaluated in the schedule's time zone by cron.c.  Its next_slot is the
 * slot to run next and due_at when (the slot's time, or a retry's).  The
 * worker's schedules job (worker.c) calls schedule_worker_job() again and
 * again, each call a transaction of its own; schedule_tick() does one unit
 * by hand.  One unit: take the schedule whose due_at is the oldest
 * past one, locked FOR UPDATE SKIP LOCKED, and either
 *	- skip the slots its catch-up or overlap policy says to skip, or
 *	- run the slot's command in a subtransaction, then write the run row
 *	  (resilience.schedule_runs, primary key (schedule, slot)) and advance
 *	  the schedule, in the same transaction.
 *
 * Exactly once per slot: a SQL command's effects, its run row and the
 * schedule's advance commit together or not at all.  A crash, an immediate
 * shutdown or a failover before the commit leaves the slot due, and it runs
 * again from scratch; after the commit the schedule has moved past it.  Two
 * sessions never run one schedule at once (the row lock, SKIP LOCKED), and
 * the run row's key refuses a slot that has already finished even if that
 * were broken: the insert fails and rolls the command back.  A saga command
 * starts the saga with idempotency key schedule:<name>:<slot>, a publish
 * command publishes through the outbox in the same transaction: both are
 * exactly once too.
 *
 * Missed slots.  A slot is late when the tick comes to it more than its
 * grace after its time (half the gap to the following slot, at most a
 * minute).
 * If the slot's time falls between the start and the end of the schedule's
 * previous run, it came due while that run was running: the overlap policy applies
 * (skip: drop such slots; queue and allow: run each, in order).  Otherwise
 * no one ran the schedule then (the server or worker was down, the database
 * was not listed): the catch-up policy applies (none: drop them; latest:
 * run only the newest; all: run each, in order).  Slots dropped are
 * counted in skipped_slots and get no run row.  The worker runs one slot
 * at a time per database, so runs of a 'skip' or 'queue' schedule never
 * overlap in time.
 *
 * Concurrent runs (overlap 'allow').  The tick does not run the slot: it
 * inserts its run row in state pending (dispatch_at = now) and advances the
 * schedule, in one transaction, and the schedules job then starts an
 * executor, a dynamic background worker (start_executors).  An executor
 * takes one of resilience.schedule_max_parallel places (a session-level
 * advisory lock of its own kind), then takes due runs FOR UPDATE SKIP
 * LOCKED and runs each like run_slot does, setting its final state (or
 * retrying with dispatch_at after the backoff) in the same transaction as
 * the command's effects; it exits when none is left.  Exactly once per
 * slot thus rests on the run row instead of the schedule row.  A run that
 * no executor holds a second after its dispatch_at (no free place, no free
 * worker slot, a retry, an executor that died) is dispatched again by the
 * worker's next look.  The executor holds the schedule FOR KEY SHARE:
 * unschedule (FOR UPDATE) waits for it, the tick (FOR NO KEY UPDATE) and
 * pause/resume do not.
 *
 * Retries: a failed attempt is recorded (the run row in state retrying, the
 * error) and retried after resilience.backoff(attempt, backoff, 16 *
 * backoff, 'equal'); after max_attempts the run is failed, logged at LOG,
 * and the schedule moves on to its next slot.  Later slots wait while a
 * slot is retried, and are then late: the policies above decide.
 *
 * Security: commands run as the role that created the schedule, never a
 * superuser (schedule() refuses one; a run refuses a creator that has
 * become one), within SECURITY_LOCAL_USERID_CHANGE |
 * SECURITY_RESTRICTED_OPERATION and with search_path = pg_catalog, pg_temp
 * (resilience_become, privilege.c), the same protections as saga steps.
 * The tables are written as the extension's owner only.  A role may
 * change, pause or remove only the schedules of roles it has the
 * privileges of (resilience_admin: all), and a tick by hand takes only
 * those.
 *
 *-------------------------------------------------------------------------
 */
#include "cron.h"
#include "metrics.h"

#include "outbox.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define SCHEDULE_NAME_MAX 63
/* The most a slot may be late before it counts as missed. */
#define MAX_GRACE_USEC (60 * USECS_PER_SEC)
/* How soon the worker looks again at a due schedule another session holds. */
#define LOCKED_RETRY_MS 100
/* Looking for the newest due slot after a long outage stops after this many. */
#define MAX_SLOT_WALK 100000
/* An 'allow' run nobody took this long after its dispatch is dispatched again. */
#define REDISPATCH_AFTER_USEC USECS_PER_SEC
/* field4 of the advisory lock tags of executor places (SQL's functions use 1 and 2) */
#define EXECUTOR_LOCK_KIND 3
#define EXECUTOR_LOCK_ID 0x52534348	/* "RSCH" */

/* Executors the schedules job starts once its transaction has committed. */
static int	dispatch_wanted = 0;

PGDLLEXPORT void resilience_schedule_executor_main(Datum main_arg);

PG_FUNCTION_INFO_V1(schedule_create);
PG_FUNCTION_INFO_V1(schedule_drop);
PG_FUNCTION_INFO_V1(schedule_pause);
PG_FUNCTION_INFO_V1(schedule_resume);
PG_FUNCTION_INFO_V1(schedule_tick);

/* A schedule as the tick reads it (locked). */
typedef struct Schedule
{
	char	   *name;
	CronSpec	spec;
	pg_tz	   *zone;
	Jsonb	   *command;
	char	   *overlap;
	char	   *catch_up;
	int			max_attempts;
	int64		backoff_usec;
	Oid			creator;
	TimestampTz next_slot;
	int			attempt;
	bool		has_last_run;
	TimestampTz last_started;
	TimestampTz last_finished;
} Schedule;


/* ---- small helpers ---- */

static void
require(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
}

static void
bad_value(const char *what, const char *value, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid %s \"%s\"", what, value),
			 hint ? errhint("%s", hint) : 0));
}

/* value must be one of the NULL-terminated choices. */
static void
check_choice(const char *what, const char *value, const char *const *choices, const char *hint)
{
	for (; *choices; choices++)
		if (strcmp(value, *choices) == 0)
			return;
	bad_value(what, value, hint);
}

/* A column of the current SPI row. */
static Datum
column(int row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

static char *
column_text(int row, int col)
{
	bool		isnull;
	Datum		d = column(row, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* SPI with arguments; raises on an SPI error. */
static int
run(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls, int expect)
{
	int			ret = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (ret != expect)
		elog(ERROR, "%s failed: %s", sql, SPI_result_code_string(ret));
	return (int) SPI_processed;
}

/* The string value of key in a jsonb object, or NULL (22023 if not a string). */
static char *
json_string(Jsonb *object, const char *key, const char *what)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&object->root, JB_FOBJECT, &k);
	if (v == NULL || v->type == jbvNull)
		return NULL;
	if (v->type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a JSON string", what)));
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* The value of key in a jsonb object as jsonb, or NULL. */
static Jsonb *
json_get(Jsonb *object, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&object->root, JB_FOBJECT, &k);
	if (v == NULL || v->type == jbvNull)
		return NULL;
	return JsonbValueToJsonb(v);
}

static const char *const command_kinds[] = {"sql", "saga", "publish", NULL};

/*
 * The command's kind, checking its shape: an object with exactly one of
 * the keys sql (a string), saga (a name, and an optional object payload),
 * publish (an object with a string topic, a payload, an optional string
 * key).
 */
static const char *
command_kind(Jsonb *command)
{
	const char *kind = NULL;
	int			i;

	if (!JB_ROOT_IS_OBJECT(command) || JB_ROOT_IS_SCALAR(command))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a schedule's command must be a JSON object"),
				 errhint("{\"sql\": \"...\"}, {\"saga\": name, \"payload\": {...}} or {\"publish\": {\"topic\": ..., \"payload\": ..., \"key\": ...}}.")));
	for (i = 0; command_kinds[i]; i++)
		if (json_get(command, command_kinds[i]) != NULL)
		{
			if (kind != NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("a schedule's command must have exactly one kind"),
						 errdetail("It has both \"%s\" and \"%s\".", kind, command_kinds[i])));
			kind = command_kinds[i];
		}
	if (kind == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown command kind"),
				 errdetail("The command has none of the keys \"sql\", \"saga\", \"publish\"."),
				 errhint("{\"sql\": \"...\"}, {\"saga\": name, \"payload\": {...}} or {\"publish\": {\"topic\": ..., \"payload\": ..., \"key\": ...}}.")));
	if (strcmp(kind, "sql") == 0)
	{
		char	   *sql = json_string(command, "sql", "the command's sql");

		if (sql[strspn(sql, " \t\r\n;")] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the command's sql must not be empty")));
	}
	else if (strcmp(kind, "saga") == 0)
	{
		Jsonb	   *payload = json_get(command, "payload");

		(void) json_string(command, "saga", "the saga's name");
		if (payload && (!JB_ROOT_IS_OBJECT(payload) || JB_ROOT_IS_SCALAR(payload)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the saga's payload must be a JSON object")));
	}
	else
	{
		Jsonb	   *publish = json_get(command, "publish");

		if (!JB_ROOT_IS_OBJECT(publish) || JB_ROOT_IS_SCALAR(publish) ||
			json_string(publish, "topic", "publish's topic") == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("publish must be a JSON object with a string topic"),
					 errhint("{\"publish\": {\"topic\": \"t\", \"payload\": {...}, \"key\": \"k\"}}")));
		(void) json_string(publish, "key", "publish's key");
	}
	return kind;
}

/* May the calling role act on a schedule created by creator? */
static bool
may_act(Oid caller, Oid creator)
{
	Oid			admin = get_role_oid("resilience_admin", true);

	return has_privs_of_role(caller, creator) ||
		(OidIsValid(admin) && has_privs_of_role(caller, admin));
}

/* A slot as text, in UTC, whatever the session's TimeZone: 2026-01-02T03:04:05Z. */
static char *
slot_text(TimestampTz slot)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(slot, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	return psprintf("%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year, tm.tm_mon, tm.tm_mday,
					tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* ---- the SQL API ---- */

/*
 * schedule(name, cron, command, timezone, overlap, catch_up, max_attempts,
 * backoff, enabled) → the first slot.  Everything is checked before
 * anything is stored; the caller becomes the role the command runs as.
 */
Datum
schedule_create(PG_FUNCTION_ARGS)
{
	static const char *const overlaps[] = {"skip", "queue", "allow", NULL};
	static const char *const catch_ups[] = {"none", "latest", "all", NULL};
	static const char *const arg_names[] = {"name", "cron", "command", "timezone", "overlap",
	"catch_up", "max_attempts", "backoff", "enabled"};
	Oid			creator = GetUserId();
	char	   *name;
	char	   *cron;
	char	   *zone_name;
	char	   *overlap;
	char	   *catch_up;
	Jsonb	   *command;
	CronSpec	spec;
	pg_tz	   *zone;
	int32		max_attempts;
	TimestampTz first;
	ResilienceUser save;
	Datum		values[11];
	int			i;

	for (i = 0; i < lengthof(arg_names); i++)
		require(fcinfo, i, arg_names[i]);

	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (strlen(name) < 1 || strlen(name) > SCHEDULE_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a schedule's name must be 1 to %d bytes", SCHEDULE_NAME_MAX)));
	for (i = 0; name[i]; i++)
		if ((unsigned char) name[i] < 0x20 || name[i] == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a schedule's name must not contain control characters")));
	cron = text_to_cstring(PG_GETARG_TEXT_PP(1));
	cron_parse(cron, &spec);
	command = PG_GETARG_JSONB_P(2);
	(void) command_kind(command);
	zone_name = text_to_cstring(PG_GETARG_TEXT_PP(3));
	zone = cron_zone(zone_name);
	overlap = text_to_cstring(PG_GETARG_TEXT_PP(4));
	check_choice("overlap", overlap, overlaps, "overlap is 'skip', 'queue' or 'allow'.");
	catch_up = text_to_cstring(PG_GETARG_TEXT_PP(5));
	check_choice("catch_up", catch_up, catch_ups, "catch_up is 'none', 'latest' or 'all'.");
	max_attempts = resilience_arg_positive(fcinfo, 6, "max_attempts");
	(void) resilience_arg_duration(fcinfo, 7, "backoff", true);
	if (superuser_arg(creator))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("a schedule cannot be created by a superuser"),
				 errdetail("Its command runs as the role that creates the schedule, and never as a superuser."),
				 errhint("SET ROLE to a role that has just the privileges the command needs (and is a member of resilience_user), then call schedule.")));
	first = cron_next(&spec, zone, GetCurrentTransactionStartTimestamp());

	SPI_connect();
	resilience_become_owner(true, &save);
	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(cron);
	values[2] = CStringGetTextDatum(zone_name);
	values[3] = JsonbPGetDatum(command);
	values[4] = CStringGetTextDatum(overlap);
	values[5] = CStringGetTextDatum(catch_up);
	values[6] = Int32GetDatum(max_attempts);
	values[7] = PG_GETARG_DATUM(7);
	values[8] = PG_GETARG_DATUM(8);
	values[9] = ObjectIdGetDatum(creator);
	values[10] = TimestampTzGetDatum(first);
	if (run("INSERT INTO resilience.schedule_definitions (name, cron, timezone, command, overlap,"
			" catch_up, max_attempts, backoff, enabled, creator, next_slot, due_at)"
			" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::pg_catalog.regrole, $11, $11)"
			" ON CONFLICT (name) DO NOTHING",
			11, (Oid[]) {TEXTOID, TEXTOID, TEXTOID, JSONBOID, TEXTOID, TEXTOID, INT4OID,
				INTERVALOID, BOOLOID, OIDOID, TIMESTAMPTZOID},
			values, NULL, SPI_OK_INSERT) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("schedule \"%s\" already exists", name),
				 errhint("Choose another name, or unschedule('%s') first.", name)));
	resilience_restore_user(&save);
	SPI_finish();
	worker_wake_at_commit();
	PG_RETURN_TIMESTAMPTZ(first);
}

typedef enum ScheduleChange
{
	CHANGE_DROP,
	CHANGE_PAUSE,
	CHANGE_RESUME
} ScheduleChange;

/*
 * unschedule, schedule_pause, schedule_resume: the schedule locked, the
 * caller checked (42501 unless it may act on the creator's schedules), the
 * change made as the extension's owner.  False if there is no such schedule.
 */
static bool
change_schedule(FunctionCallInfo fcinfo, ScheduleChange change)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Oid			caller = GetUserId();
	Datum		values[2] = {CStringGetTextDatum(name), (Datum) 0};
	ResilienceUser save;
	bool		isnull;
	bool		found;

	SPI_connect();
	resilience_become_owner(true, &save);
	/* FOR UPDATE waits for the 'allow' runs in progress (FOR KEY SHARE) */
	found = run(change == CHANGE_DROP ?
				"SELECT creator::pg_catalog.oid, cron, timezone FROM resilience.schedule_definitions"
				" WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE" :
				"SELECT creator::pg_catalog.oid, cron, timezone FROM resilience.schedule_definitions"
				" WHERE name OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE",
				1, (Oid[]) {TEXTOID}, values, NULL, SPI_OK_SELECT) == 1;
	if (found && !may_act(caller, DatumGetObjectId(column(0, 1, &isnull))))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for schedule \"%s\"", name),
				 errdetail("Only its creator, the roles that have its privileges and resilience_admin may change it.")));
	if (found && change == CHANGE_DROP)
	{
		run("DELETE FROM resilience.schedule_runs WHERE schedule OPERATOR(pg_catalog.=) $1",
			1, (Oid[]) {TEXTOID}, values, NULL, SPI_OK_DELETE);
		run("DELETE FROM resilience.schedule_definitions WHERE name OPERATOR(pg_catalog.=) $1",
			1, (Oid[]) {TEXTOID}, values, NULL, SPI_OK_DELETE);
	}
	else if (found && change == CHANGE_PAUSE)
		run("UPDATE resilience.schedule_definitions SET enabled = false"
			" WHERE name OPERATOR(pg_catalog.=) $1",
			1, (Oid[]) {TEXTOID}, values, NULL, SPI_OK_UPDATE);
	else if (found)
	{
		/* from the next slot after now: the slots of the pause are not caught up */
		CronSpec	spec;

		cron_parse(column_text(0, 2), &spec);
		values[1] = TimestampTzGetDatum(cron_next(&spec, cron_zone(column_text(0, 3)),
												  GetCurrentTransactionStartTimestamp()));
		run("UPDATE resilience.schedule_definitions SET enabled = true,"
			" next_slot = $2, due_at = $2, attempt = 0"
			" WHERE name OPERATOR(pg_catalog.=) $1 AND NOT enabled",
			2, (Oid[]) {TEXTOID, TIMESTAMPTZOID}, values, NULL, SPI_OK_UPDATE);
		worker_wake_at_commit();
	}
	resilience_restore_user(&save);
	SPI_finish();
	return found;
}

/* unschedule(name) → whether it existed; its runs go with it. */
Datum
schedule_drop(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(change_schedule(fcinfo, CHANGE_DROP));
}

/* schedule_pause(name) → whether it exists. */
Datum
schedule_pause(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(change_schedule(fcinfo, CHANGE_PAUSE));
}

/* schedule_resume(name) → whether it exists; runs again from the next slot after now. */
Datum
schedule_resume(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(change_schedule(fcinfo, CHANGE_RESUME));
}

/* ---- the tick ---- */

/* The grace of a slot: half the gap to the following one, at most a minute. */
static int64
slot_grace(const Schedule *s, TimestampTz slot)
{
	return Min((cron_next(&s->spec, s->zone, slot) - slot) / 2, MAX_GRACE_USEC);
}

/*
 * Take the due schedule with the oldest due_at, locked (caller: only the
 * schedules of creators it has the privileges of; InvalidOid: all).
 */
static Schedule *
pick_due(Oid caller, TimestampTz now)
{
	Datum		values[2] = {TimestampTzGetDatum(now), ObjectIdGetDatum(caller)};
	Schedule   *s;
	bool		isnull;
	Datum		d;

	if (run("SELECT name, cron, timezone, command, overlap, catch_up, max_attempts,"
			" backoff, creator::pg_catalog.oid, next_slot, attempt, last_started, last_finished"
			" FROM resilience.schedule_definitions"
			" WHERE enabled AND due_at OPERATOR(pg_catalog.<=) $1"
			" AND ($2 OPERATOR(pg_catalog.=) 0::pg_catalog.oid"
			"      OR pg_catalog.pg_has_role($2, creator::pg_catalog.oid, 'USAGE'))"
			" ORDER BY due_at LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED",
			2, (Oid[]) {TIMESTAMPTZOID, OIDOID}, values, NULL, SPI_OK_SELECT) == 0)
		return NULL;
	s = palloc0(sizeof(Schedule));
	s->name = column_text(0, 1);
	cron_parse(column_text(0, 2), &s->spec);
	s->zone = cron_zone(column_text(0, 3));
	s->command = DatumGetJsonbPCopy(column(0, 4, &isnull));
	s->overlap = column_text(0, 5);
	s->catch_up = column_text(0, 6);
	s->max_attempts = DatumGetInt32(column(0, 7, &isnull));
	s->backoff_usec = resilience_interval_usec(DatumGetIntervalP(column(0, 8, &isnull)));
	s->creator = DatumGetObjectId(column(0, 9, &isnull));
	s->next_slot = DatumGetTimestampTz(column(0, 10, &isnull));
	s->attempt = DatumGetInt32(column(0, 11, &isnull));
	d = column(0, 12, &isnull);
	s->has_last_run = !isnull;
	if (!isnull)
	{
		s->last_started = DatumGetTimestampTz(d);
		s->last_finished = DatumGetTimestampTz(column(0, 13, &isnull));
	}
	return s;
}

/* A schedule's command to run for a slot, and its result. */
typedef struct CommandRun
{
	Schedule   *s;
	TimestampTz slot;
	Jsonb	   *result;
} CommandRun;

/* Run the command of cr->slot as the creator (in resilience_run_caught). */
static void
command_call(void *arg)
{
	CommandRun *cr = arg;
	const char *kind = command_kind(cr->s->command);
	ResilienceUser save;
	char	   *res;

	if (superuser_arg(cr->s->creator))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("schedules never run as a superuser"),
				 errdetail("Role %s, which created schedule \"%s\", is a superuser now.",
						   GetUserNameFromId(cr->s->creator, true), cr->s->name),
				 errhint("Revoke SUPERUSER from %s, or create the schedule again as another role.",
						 GetUserNameFromId(cr->s->creator, true))));
	resilience_become(cr->s->creator, true, &save);
	/* the command may read its slot: current_setting('resilience.schedule_slot') */
	(void) set_config_option("resilience.schedule_slot", slot_text(cr->slot),
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	if (strcmp(kind, "sql") == 0)
	{
		int			ret = SPI_execute(json_string(cr->s->command, "sql", "sql"), false, 0);

		if (ret < 0)
			elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(ret));
		res = psprintf("{\"rows\": " UINT64_FORMAT "}", (uint64) SPI_processed);
	}
	else if (strcmp(kind, "saga") == 0)
	{
		Jsonb	   *payload = json_get(cr->s->command, "payload");
		Datum		values[3];
		bool		isnull;

		values[0] = CStringGetTextDatum(json_string(cr->s->command, "saga", "saga"));
		values[1] = payload ? JsonbPGetDatum(payload) :
			DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
		values[2] = CStringGetTextDatum(psprintf("schedule:%s:%s", cr->s->name, slot_text(cr->slot)));
		run("SELECT resilience.saga_start($1, $2, $3)", 3,
			(Oid[]) {TEXTOID, JSONBOID, TEXTOID}, values, NULL, SPI_OK_SELECT);
		res = psprintf("{\"saga_id\": " INT64_FORMAT "}",
					   DatumGetInt64(column(0, 1, &isnull)));
	}
	else
	{
		Jsonb	   *publish = json_get(cr->s->command, "publish");
		Jsonb	   *payload = json_get(publish, "payload");
		char	   *key = json_string(publish, "key", "key");
		Datum		values[3];
		bool		isnull;

		values[0] = CStringGetTextDatum(json_string(publish, "topic", "topic"));
		values[1] = payload ? JsonbPGetDatum(payload) :
			DirectFunctionCall1(jsonb_in, CStringGetDatum("null"));
		values[2] = key ? CStringGetTextDatum(key) : (Datum) 0;
		run("SELECT resilience.outbox_publish($1, $2, $3)", 3,
			(Oid[]) {TEXTOID, JSONBOID, TEXTOID}, values, key ? "   " : "  n",
			SPI_OK_SELECT);
		res = psprintf("{\"event_id\": " INT64_FORMAT "}",
					   DatumGetInt64(column(0, 1, &isnull)));
	}
	resilience_restore_user(&save);
	cr->result = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(res)));
}

/*
 * Run the command of slot as the creator, in a subtransaction: NULL and
 * *result on success, else the error message (the subtransaction rolled
 * back).  A cancel is raised again.
 */
static char *
run_command(Schedule *s, TimestampTz slot, Jsonb **result)
{
	CommandRun	run = {s, slot, NULL};
	ErrorData  *edata = resilience_run_caught(command_call, &run);

	*result = run.result;
	if (edata == NULL)
		return NULL;
	if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
		ReThrowError(edata);
	return psprintf("%s: %s", unpack_sql_state(edata->sqlerrcode), edata->message);
}

/*
 * Record the schedule's advance past its current slot to next: after a run
 * that ended in state (started at started, ended at now), or, state NULL,
 * dropping skipped slots.
 */
static void
advance(Schedule *s, TimestampTz next, const char *state, TimestampTz started,
		TimestampTz now, int64 skipped)
{
	Datum		values[7];
	char		nulls[7] = "       ";

	values[0] = CStringGetTextDatum(s->name);
	values[1] = TimestampTzGetDatum(next);
	values[2] = TimestampTzGetDatum(now);
	values[3] = state ? CStringGetTextDatum(state) : (Datum) 0;
	if (!state)
		nulls[3] = 'n';
	values[4] = TimestampTzGetDatum(s->next_slot);
	values[5] = Int64GetDatum(skipped);
	values[6] = TimestampTzGetDatum(started);
	run("UPDATE resilience.schedule_definitions SET next_slot = $2, due_at = $2, attempt = 0,"
		" skipped_slots = skipped_slots OPERATOR(pg_catalog.+) $6,"
		" last_slot = CASE WHEN $4 IS NULL THEN last_slot ELSE $5 END,"
		" last_state = COALESCE($4, last_state),"
		" last_started = CASE WHEN $4 IS NULL THEN last_started ELSE $7 END,"
		" last_finished = CASE WHEN $4 IS NULL THEN last_finished ELSE $3 END,"
		" last_success = CASE WHEN $4 OPERATOR(pg_catalog.=) 'succeeded' THEN $3 ELSE last_success END"
		" WHERE name OPERATOR(pg_catalog.=) $1",
		7, (Oid[]) {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID, TIMESTAMPTZOID, INT8OID,
			TIMESTAMPTZOID},
		values, nulls, SPI_OK_UPDATE);
}

/*
 * Keep the runs for resilience.schedule_retention; unfinished 'allow' runs
 * (dispatch_at set) stay whatever their age.
 */
static void
prune_runs(Schedule *s, TimestampTz now)
{
	Datum		v[2] = {CStringGetTextDatum(s->name),
	TimestampTzGetDatum(now - (int64) resilience_schedule_retention_s * USECS_PER_SEC)};

	run("DELETE FROM resilience.schedule_runs WHERE schedule OPERATOR(pg_catalog.=) $1"
		" AND slot OPERATOR(pg_catalog.<) $2 AND dispatch_at IS NULL",
		2, (Oid[]) {TEXTOID, TIMESTAMPTZOID}, v, NULL, SPI_OK_DELETE);
}

/* Count attempt s->attempt + 1 of slot s->next_slot, started at started. */
static void
count_attempt(Schedule *s, bool failed, TimestampTz started)
{
	metrics_add_at_commit(RC_SCHEDULE_RUNS, !failed ? RV_SCHEDULE_SUCCEEDED :
						  s->attempt + 1 < s->max_attempts ? RV_SCHEDULE_RETRYING :
						  RV_SCHEDULE_FAILED, s->name, 1);
	if (s->attempt == 0)
	{
		metrics_add_at_commit(RC_SCHEDULE_STARTS, 0, s->name, 1);
		metrics_add_at_commit(RC_SCHEDULE_LAG, 0, s->name, (uint64) Max(started - s->next_slot, 0));
	}
}

/* Log slot s->next_slot's last attempt, which failed with error. */
static void
log_failed(Schedule *s, const char *error)
{
	int			attempt = s->attempt + 1;

	ereport(LOG,
			(errmsg("schedule \"%s\": slot %s failed after %d attempt%s: %s",
					s->name, slot_text(s->next_slot), attempt, attempt == 1 ? "" : "s", error)));
}

/* Run slot s->next_slot once (attempt s->attempt + 1) and record it. */
static void
run_slot(Schedule *s, TimestampTz started)
{
	int			attempt = s->attempt + 1;
	Jsonb	   *result;
	char	   *error = run_command(s, s->next_slot, &result);
	TimestampTz now = GetCurrentTimestamp();
	const char *state = error == NULL ? "succeeded" :
		attempt < s->max_attempts ? "retrying" : "failed";
	Datum		values[9];
	char		nulls[9] = "         ";

	values[0] = CStringGetTextDatum(s->name);
	values[1] = TimestampTzGetDatum(s->next_slot);
	values[2] = CStringGetTextDatum(state);
	values[3] = Int32GetDatum(attempt);
	values[4] = TimestampTzGetDatum(started);
	values[5] = TimestampTzGetDatum(now);
	values[6] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[6] = error ? ' ' : 'n';
	values[7] = result ? JsonbPGetDatum(result) : (Datum) 0;
	nulls[7] = result ? ' ' : 'n';
	values[8] = ObjectIdGetDatum(s->creator);
	/* the slot is the key: a slot that already finished refuses this run */
	if (run("INSERT INTO resilience.schedule_runs AS r (schedule, slot, state, attempt,"
			" started_at, finished_at, error, result, creator)"
			" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::pg_catalog.regrole)"
			" ON CONFLICT (schedule, slot) DO UPDATE SET state = excluded.state,"
			" attempt = excluded.attempt, started_at = excluded.started_at,"
			" finished_at = excluded.finished_at, error = excluded.error, result = excluded.result"
			" WHERE r.state OPERATOR(pg_catalog.=) 'retrying'",
			9, (Oid[]) {TEXTOID, TIMESTAMPTZOID, TEXTOID, INT4OID, TIMESTAMPTZOID,
				TIMESTAMPTZOID, TEXTOID, JSONBOID, OIDOID},
			values, nulls, SPI_OK_INSERT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("a slot of schedule \"%s\" has already run", s->name),
				 errdetail("Slot %s has a finished run; the command was rolled back.",
						   slot_text(s->next_slot))));

	count_attempt(s, error != NULL, started);

	if (error != NULL && attempt < s->max_attempts)
	{
		/* retry the same slot after a backoff */
		int64		delay = resilience_backoff_usec(attempt, s->backoff_usec,
												   s->backoff_usec * 16, JITTER_EQUAL,
												   0);
		Datum		v[5] = {CStringGetTextDatum(s->name), Int32GetDatum(attempt),
			TimestampTzGetDatum(now + delay), TimestampTzGetDatum(now),
		TimestampTzGetDatum(started)};

		run("UPDATE resilience.schedule_definitions SET attempt = $2, due_at = $3,"
			" last_started = $5, last_finished = $4, last_state = 'retrying'"
			" WHERE name OPERATOR(pg_catalog.=) $1",
			5, (Oid[]) {TEXTOID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID}, v,
			NULL, SPI_OK_UPDATE);
		return;
	}
	if (error != NULL)
		log_failed(s, error);
	advance(s, cron_next(&s->spec, s->zone, s->next_slot), state, started, now, 0);
	prune_runs(s, now);
}

/*
 * overlap => 'allow': record slot s->next_slot as a pending run and
 * advance the schedule, in this transaction; an executor runs it after the
 * commit (see "Concurrent runs" in the header).
 */
static void
dispatch_slot(Schedule *s, TimestampTz now)
{
	Datum		values[4] = {CStringGetTextDatum(s->name), TimestampTzGetDatum(s->next_slot),
		ObjectIdGetDatum(s->creator), TimestampTzGetDatum(now)};

	if (run("INSERT INTO resilience.schedule_runs (schedule, slot, state, attempt, creator,"
			" dispatch_at) VALUES ($1, $2, 'pending', 0, $3::pg_catalog.regrole, $4)"
			" ON CONFLICT (schedule, slot) DO NOTHING",
			4, (Oid[]) {TEXTOID, TIMESTAMPTZOID, OIDOID, TIMESTAMPTZOID},
			values, NULL, SPI_OK_INSERT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("a slot of schedule \"%s\" has already run", s->name),
				 errdetail("Slot %s already has a run row.", slot_text(s->next_slot))));
	advance(s, cron_next(&s->spec, s->zone, s->next_slot), NULL, 0, now, 0);
	prune_runs(s, now);
	dispatch_wanted++;
	worker_wake_at_commit();	/* a tick by hand: the worker starts the executor */
}

/*
 * One unit of work on the oldest due schedule (see the header): true if
 * there was one.  SPI connected, as the owner.
 */
static bool
tick_once(Oid caller)
{
	TimestampTz now = GetCurrentTimestamp();
	Schedule   *s = pick_due(caller, now);
	TimestampTz slot;

	if (s == NULL)
		return false;
	slot = s->next_slot;
	if (s->attempt == 0 && now > slot + slot_grace(s, slot))
	{
		/* late: came due while a run of it was running, or while no one ran it */
		bool		overlapped = s->has_last_run && s->last_started <= slot &&
			s->last_finished > slot;
		const char *policy = overlapped ? s->overlap : s->catch_up;
		bool		drop_all = strcmp(policy, "skip") == 0 || strcmp(policy, "none") == 0;

		if (drop_all || strcmp(policy, "latest") == 0)
		{
			/* the newest slot that is due, and how many come before it */
			TimestampTz newest = slot;
			int64		before = 0;
			TimestampTz next;

			while (before < MAX_SLOT_WALK &&
				   (next = cron_next(&s->spec, s->zone, newest)) <= now)
			{
				newest = next;
				before++;
				CHECK_FOR_INTERRUPTS();
			}
			if (drop_all && now > newest + slot_grace(s, newest))
			{
				/* every due slot is late: drop them all */
				advance(s, cron_next(&s->spec, s->zone, Max(newest, now)), NULL, 0, now, before + 1);
				metrics_add_at_commit(RC_SCHEDULE_RUNS, RV_SCHEDULE_SKIPPED, s->name, before + 1);
				return true;
			}
			if (before > 0)
			{
				/* run the newest only */
				advance(s, newest, NULL, 0, now, before);
				metrics_add_at_commit(RC_SCHEDULE_RUNS, RV_SCHEDULE_SKIPPED, s->name, before);
				s->next_slot = newest;
			}
		}
	}
	if (strcmp(s->overlap, "allow") == 0)
		dispatch_slot(s, now);
	else
		run_slot(s, now);
	return true;
}

/* schedule_tick() → 1 if it ran, retried or skipped a slot, else 0. */
Datum
schedule_tick(PG_FUNCTION_ARGS)
{
	bool		did;

	SPI_connect();
	/* the role of the session, not the owner this SECURITY DEFINER runs as */
	did = tick_once(GetOuterUserId());
	SPI_finish();
	PG_RETURN_INT32(did ? 1 : 0);
}

/*
 * One unit of work for the worker, then ms until it should run again: 0
 * after a unit of work (there may be more), else until the next schedule is
 * due, or -1 if none is.  SPI connected, as the owner.
 */
static long
worker_tick(void)
{
	bool		isnull;
	Datum		next;
	int64		wish;

	TimestampTz now = GetCurrentTimestamp();
	Datum		before = TimestampTzGetDatum(now - REDISPATCH_AFTER_USEC);
	int64		ready;

	if (tick_once(InvalidOid))
		return 0;

	/*
	 * 'allow' runs that are due and that no executor holds: a dispatch that
	 * found no free place, a retry whose backoff has passed, the run of an
	 * executor that died.  Start executors for them.
	 */
	run("SELECT pg_catalog.count(*) FROM (SELECT 1 FROM resilience.schedule_runs"
		" WHERE dispatch_at OPERATOR(pg_catalog.<=) $1 FOR KEY SHARE SKIP LOCKED) r",
		1, (Oid[]) {TIMESTAMPTZOID}, &before, NULL, SPI_OK_SELECT);
	ready = DatumGetInt64(column(0, 1, &isnull));
	dispatch_wanted += (int) Min(ready, (int64) resilience_schedule_max_parallel);

	run("SELECT pg_catalog.min(t) FROM (SELECT pg_catalog.min(due_at) AS t"
		" FROM resilience.schedule_definitions WHERE enabled"
		" UNION ALL SELECT pg_catalog.min(dispatch_at) OPERATOR(pg_catalog.+) '1 second'"
		" FROM resilience.schedule_runs WHERE dispatch_at OPERATOR(pg_catalog.>) $1) n",
		1, (Oid[]) {TIMESTAMPTZOID}, &before, NULL, SPI_OK_SELECT);
	next = column(0, 1, &isnull);
	if (isnull)
		return -1;
	/* due now but locked by another transaction: look again soon */
	wish = (DatumGetTimestampTz(next) - now + 999) / 1000;
	return wish <= 0 ? LOCKED_RETRY_MS : (long) Min(wish, (int64) INT_MAX);
}

/* Start the executors this unit of work asked for (after its commit). */
static void
start_executors(void)
{
	int			n = Min(dispatch_wanted, resilience_schedule_max_parallel);
	char		name[BGW_MAXLEN];

	dispatch_wanted = 0;
	snprintf(name, BGW_MAXLEN, "resilience schedule executor %u", MyDatabaseId);
	while (n-- > 0)
	{
		if (!worker_start_dynamic("resilience_schedule_executor_main", "resilience schedule executor",
								  name, true, ObjectIdGetDatum(MyDatabaseId), NULL, 0, NULL))
		{
			/* the runs stay pending: the next look dispatches them again */
			ereport(LOG,
					(errmsg("resilience could not start a schedule executor: no free background worker slot"),
					 errhint("Raise max_worker_processes, or lower resilience.schedule_max_parallel.")));
			break;
		}
	}
}

/*
 * The worker's schedules job (worker.c), called with no transaction open:
 * one unit of work in a transaction of its own, as the extension's owner.
 * Skipped while DROP EXTENSION holds the extension, and when the extension
 * has no schedules (a version before 0.2, not updated yet).
 */
long
schedule_worker_job(void)
{
	long		wish = -1;
	Oid			nsp;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "resilience schedules job");
	nsp = get_namespace_oid("resilience", true);
	if (worker_lock_extension() && OidIsValid(nsp) &&
		OidIsValid(get_relname_relid("schedule_definitions", nsp)))
	{
		ResilienceUser save;

		resilience_become_owner(true, &save);
		wish = worker_tick();
		resilience_restore_user(&save);
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	start_executors();
	return wish;
}

/* ---- executors of 'allow' runs ---- */

/*
 * Run one due 'allow' run that no one holds, and record it, in this
 * transaction: true if there was one.  SPI connected, as the owner.
 */
static bool
execute_one(void)
{
	TimestampTz now = GetCurrentTimestamp();
	Datum		arg = TimestampTzGetDatum(now);
	Schedule	s = {0};
	Jsonb	   *result;
	char	   *error;
	int			attempt;
	const char *state;
	TimestampTz finished;
	TimestampTz retry_at = 0;
	bool		isnull;
	Datum		values[9];
	char		nulls[9] = "         ";

	/* KEY SHARE of the schedule: unschedule waits for the run, the tick does not */
	if (run("SELECT r.schedule, r.slot, r.attempt, d.command, d.max_attempts, d.backoff,"
			" d.creator::pg_catalog.oid"
			" FROM resilience.schedule_runs r JOIN resilience.schedule_definitions d"
			"   ON d.name OPERATOR(pg_catalog.=) r.schedule"
			" WHERE r.dispatch_at OPERATOR(pg_catalog.<=) $1"
			" ORDER BY r.dispatch_at LIMIT 1"
			" FOR UPDATE OF r SKIP LOCKED FOR KEY SHARE OF d SKIP LOCKED",
			1, (Oid[]) {TIMESTAMPTZOID}, &arg, NULL, SPI_OK_SELECT) == 0)
		return false;
	s.name = column_text(0, 1);
	s.next_slot = DatumGetTimestampTz(column(0, 2, &isnull));
	s.attempt = DatumGetInt32(column(0, 3, &isnull));
	s.command = DatumGetJsonbPCopy(column(0, 4, &isnull));
	s.max_attempts = DatumGetInt32(column(0, 5, &isnull));
	s.backoff_usec = resilience_interval_usec(DatumGetIntervalP(column(0, 6, &isnull)));
	s.creator = DatumGetObjectId(column(0, 7, &isnull));

	error = run_command(&s, s.next_slot, &result);
	finished = GetCurrentTimestamp();
	attempt = s.attempt + 1;
	state = error == NULL ? "succeeded" : attempt < s.max_attempts ? "retrying" : "failed";
	if (strcmp(state, "retrying") == 0)
		retry_at = finished + resilience_backoff_usec(attempt, s.backoff_usec,
													  s.backoff_usec * 16, JITTER_EQUAL, 0);

	values[0] = CStringGetTextDatum(s.name);
	values[1] = TimestampTzGetDatum(s.next_slot);
	values[2] = CStringGetTextDatum(state);
	values[3] = Int32GetDatum(attempt);
	values[4] = TimestampTzGetDatum(now);
	values[5] = TimestampTzGetDatum(finished);
	values[6] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[6] = error ? ' ' : 'n';
	values[7] = result ? JsonbPGetDatum(result) : (Datum) 0;
	nulls[7] = result ? ' ' : 'n';
	values[8] = TimestampTzGetDatum(retry_at);
	nulls[8] = retry_at ? ' ' : 'n';
	run("UPDATE resilience.schedule_runs SET state = $3, attempt = $4, started_at = $5,"
		" finished_at = $6, error = $7, result = $8, dispatch_at = $9"
		" WHERE schedule OPERATOR(pg_catalog.=) $1 AND slot OPERATOR(pg_catalog.=) $2",
		9, (Oid[]) {TEXTOID, TIMESTAMPTZOID, TEXTOID, INT4OID, TIMESTAMPTZOID,
			TIMESTAMPTZOID, TEXTOID, JSONBOID, TIMESTAMPTZOID},
		values, nulls, SPI_OK_UPDATE);
	/* the schedule's last run: the newest slot's latest news */
	run("UPDATE resilience.schedule_definitions SET last_slot = $2, last_state = $3,"
		" last_started = $5, last_finished = $6,"
		" last_success = CASE WHEN $3 OPERATOR(pg_catalog.=) 'succeeded' THEN $6 ELSE last_success END"
		" WHERE name OPERATOR(pg_catalog.=) $1"
		" AND (last_slot IS NULL OR last_slot OPERATOR(pg_catalog.<=) $2)",
		6, (Oid[]) {TEXTOID, TIMESTAMPTZOID, TEXTOID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID},
		values, NULL, SPI_OK_UPDATE);

	count_attempt(&s, error != NULL, now);
	if (retry_at)
		worker_wake_at_commit();	/* to dispatch the retry when it is due */
	else if (error != NULL)
		log_failed(&s, error);
	return true;
}

/* One execute_one in a transaction of its own, as the extension's owner. */
static bool
execute_one_xact(void)
{
	bool		did = false;
	Oid			nsp;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "resilience schedule executor");
	nsp = get_namespace_oid("resilience", true);
	if (worker_lock_extension() && OidIsValid(nsp) &&
		OidIsValid(get_relname_relid("schedule_runs", nsp)))
	{
		ResilienceUser save;

		resilience_become_owner(true, &save);
		did = execute_one();
		resilience_restore_user(&save);
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	return did;
}

/*
 * An executor of 'allow' runs (started by start_executors): takes one of
 * the database's resilience.schedule_max_parallel places (a session-level
 * lock, released by its exit, even by a crash), runs due runs until there
 * are none, and exits.  With no free place it exits at once: the runs
 * stay for the executors that hold the places, or the next dispatch.
 */
void
resilience_schedule_executor_main(Datum main_arg)
{
	bool		placed = false;
	int			i;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(main_arg), InvalidOid, 0);
	/* as the worker does, for the same reasons (see worker.c) */
	SetConfigOption("search_path", RESILIENCE_SEARCH_PATH, PGC_SUSET, PGC_S_CLIENT);

	StartTransactionCommand();
	for (i = 0; i < resilience_schedule_max_parallel && !placed; i++)
	{
		LOCKTAG		tag;

		SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, EXECUTOR_LOCK_ID, i, EXECUTOR_LOCK_KIND);
		placed = LockAcquire(&tag, ExclusiveLock, true, true) != LOCKACQUIRE_NOT_AVAIL;
	}
	CommitTransactionCommand();
	if (!placed)
		proc_exit(0);
	while (!RecoveryInProgress() && execute_one_xact())
		CHECK_FOR_INTERRUPTS();
	proc_exit(0);
}
