/*-------------------------------------------------------------------------
 *
 * backoff.c
 *		Retry helpers: exponential backoff with jitter, the classification
 *		of retryable SQLSTATEs, and the retry procedure.
 *
 * backoff follows the AWS Architecture Blog's "Exponential Backoff And
 * Jitter": with t = min(cap, base * 2^attempt),
 *	none			t
 *	full			uniform on [0, t]
 *	equal			t/2 + uniform on [0, t/2]
 *	decorrelated	min(cap, uniform on [base, 3 * previous]), previous = base
 *					at first
 * in whole microseconds.  The random numbers come from the generator behind
 * random(), so setseed() makes a sequence of delays reproducible.
 *
 * retry runs a statement in its own transaction per attempt (a subtransaction
 * catches the error, the attempt's transaction is then rolled back), sleeps
 * the backoff between attempts on its latch, and retries only errors that
 * is_retryable accepts, re-raising the last one when it gives up.  Errors
 * raised at COMMIT (serialization failures of SERIALIZABLE transactions,
 * deferred constraints) are caught too, from PostgreSQL 15 on.  With a
 * breaker, each attempt asks it first (an open breaker ends the retries at
 * once: RS002 is not retryable) and reports its outcome to it.
 *
 *-------------------------------------------------------------------------
 */
#include "resilience.h"
#include "breaker.h"

#include <limits.h>
#include <math.h>

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

typedef ResilienceJitter Jitter;

static const char *const jitter_names[] = {"none", "full", "equal", "decorrelated"};

PG_FUNCTION_INFO_V1(backoff);
PG_FUNCTION_INFO_V1(is_retryable);
PG_FUNCTION_INFO_V1(retry);

/* ---- backoff ---- */

/* The jitter argument: none, full, equal or decorrelated (22004, 22023). */
static Jitter
jitter_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *s = text_to_cstring(resilience_arg_text(fcinfo, argno, "jitter"));
	int			i;

	for (i = 0; i < lengthof(jitter_names); i++)
		if (strcmp(s, jitter_names[i]) == 0)
			return (Jitter) i;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown jitter \"%s\"", s),
			 errhint("Use one of none, full, equal or decorrelated.")));
	return JITTER_NONE;			/* keep the compiler quiet */
}

/* base and cap: positive, cap >= base (22023). */
static void
check_base_cap(int64 base, int64 cap)
{
	if (cap < base)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cap must not be less than base"),
				 errdetail("base is %s and cap is %s.",
						   resilience_interval_text(base), resilience_interval_text(cap))));
}

/* A uniform integer on [lo, hi], from random()'s generator. */
static int64
uniform_between(int64 lo, int64 hi)
{
	LOCAL_FCINFO(random_fcinfo, 0);
	double		r;
	int64		v;

	InitFunctionCallInfoData(*random_fcinfo, NULL, 0, InvalidOid, NULL, NULL);
	r = DatumGetFloat8(drandom(random_fcinfo)); /* [0, 1) */
	v = lo + (int64) floor(r * ((double) (hi - lo) + 1.0));
	return Min(v, hi);			/* in case rounding reached hi + 1 */
}

/*
 * The delay before retry number attempt (0 first), in microseconds (also
 * the sagas' backoff between attempts of a step).
 */
int64
resilience_backoff_usec(int attempt, int64 base, int64 cap, Jitter jitter, int64 previous)
{
	int64		t;

	if (attempt >= 62 || base > (cap >> attempt))
		t = cap;
	else
		t = Min(cap, base << attempt);

	switch (jitter)
	{
		case JITTER_NONE:
			return t;
		case JITTER_FULL:
			return uniform_between(0, t);
		case JITTER_EQUAL:
			return t / 2 + uniform_between(0, t - t / 2);
		case JITTER_DECORRELATED:
			{
				int64		upper = previous > cap / 3 ? cap : Min(cap, previous * 3);

				return uniform_between(base, Max(upper, base));
			}
	}
	return t;					/* keep the compiler quiet */
}

/* An interval of usec microseconds. */
static Interval *
interval_from_usec(int64 usec)
{
	Interval   *result = palloc0(sizeof(Interval));

	result->time = usec;
	return result;
}

/*
 * backoff(attempt, base, cap, jitter default 'full', previous default null)
 * → interval: how long to wait before retry number attempt (0 first).
 */
Datum
backoff(PG_FUNCTION_ARGS)
{
	int32		attempt = resilience_arg_int(fcinfo, 0, "attempt");
	int64		base = resilience_arg_duration(fcinfo, 1, "base", false);
	int64		cap = resilience_arg_duration(fcinfo, 2, "cap", false);
	Jitter		jitter = jitter_arg(fcinfo, 3);
	int64		previous = base;

	if (attempt < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("attempt must not be negative"),
				 errdetail("attempt is %d; the first retry is attempt 0.", attempt)));
	check_base_cap(base, cap);
	if (!PG_ARGISNULL(4))
		previous = resilience_arg_duration(fcinfo, 4, "previous", true);
	PG_RETURN_INTERVAL_P(interval_from_usec(resilience_backoff_usec(attempt, base, cap, jitter,
																	previous)));
}

/* ---- is_retryable ---- */

/*
 * Errors worth retrying as they are: transient conflicts and lost or
 * refused connections (see docs/bulkheads-and-retries.md for the table).
 */
static bool
sqlstate_retryable(int code)
{
	switch (code)
	{
		case ERRCODE_T_R_SERIALIZATION_FAILURE:
		case ERRCODE_T_R_DEADLOCK_DETECTED:
		case ERRCODE_LOCK_NOT_AVAILABLE:
		case ERRCODE_ADMIN_SHUTDOWN:
		case ERRCODE_CRASH_SHUTDOWN:
		case ERRCODE_CANNOT_CONNECT_NOW:
		case ERRCODE_IDLE_SESSION_TIMEOUT:
		case ERRCODE_TOO_MANY_CONNECTIONS:
		case MAKE_SQLSTATE('7', '2', '0', '0', '0'):	/* snapshot_too_old */
			return true;
		case ERRCODE_PROTOCOL_VIOLATION:
			return false;
		default:
			return ERRCODE_TO_CATEGORY(code) == ERRCODE_CONNECTION_EXCEPTION;
	}
}

/* is_retryable(sqlstate) → is an error with this SQLSTATE worth retrying? */
Datum
is_retryable(PG_FUNCTION_ARGS)
{
	text	   *arg = resilience_arg_text(fcinfo, 0, "sqlstate");
	char	   *s = text_to_cstring(arg);
	int			i;

	if (strlen(s) != 5)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is not a SQLSTATE", s),
				 errdetail("A SQLSTATE is five characters, digits and upper-case letters.")));
	for (i = 0; i < 5; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'A' && s[i] <= 'Z')))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("\"%s\" is not a SQLSTATE", s),
					 errdetail("A SQLSTATE is five characters, digits and upper-case letters.")));
	PG_RETURN_BOOL(sqlstate_retryable(MAKE_SQLSTATE(s[0], s[1], s[2], s[3], s[4])));
}

/* ---- retry ---- */

/* Sleep on the latch for usec, answering interrupts. */
static void
retry_sleep(int64 usec)
{
	int64		deadline = resilience_clock_ns() + usec * 1000;

	for (;;)
	{
		int64		left_ms = (deadline - resilience_clock_ns() + 999999) / 1000000;

		if (left_ms <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(left_ms, INT_MAX), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * One attempt: the statement in a subtransaction, then COMMIT.  Returns NULL
 * on success, else the error (copied into mcxt), the attempt rolled back.
 */
static ErrorData *
retry_attempt(const char *sql, MemoryContext mcxt)
{
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(mcxt);
	PG_TRY();
	{
		int			ret = SPI_execute(sql, false, 0);

		if (ret < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("resilience.retry could not run sql: %s",
							SPI_result_code_string(ret)),
					 errhint("Each attempt runs in a transaction of its own: sql must not control transactions.")));
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(mcxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(mcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(mcxt);
		CurrentResourceOwner = owner;
	}
	PG_END_TRY();

	if (edata)
		SPI_rollback_compat();
	else if (!RESILIENCE_COMMIT_ERRORS_CATCHABLE)
		SPI_commit_compat();
	else
	{
		PG_TRY();
		{
			SPI_commit_compat();
		}
		PG_CATCH();
		{
			/* SPI_commit aborted the transaction and started the next one */
			MemoryContextSwitchTo(mcxt);
			edata = CopyErrorData();
			FlushErrorState();
		}
		PG_END_TRY();
	}
	return edata;
}

/*
 * CALL retry(sql, max_attempts default 5, base default '10 ms', cap default
 * '1 s', jitter default 'full', breaker default null): run sql, one
 * transaction per attempt, retrying errors is_retryable accepts.
 */
Datum
retry(PG_FUNCTION_ARGS)
{
	char	   *sql;
	int32		max_attempts;
	int64		base;
	int64		cap;
	Jitter		jitter;
	char		breaker[NAMEDATALEN];
	bool		use_breaker = !PG_ARGISNULL(5);
	int64		previous;
	MemoryContext mcxt;
	int			attempt;

	if (fcinfo->context == NULL || !IsA(fcinfo->context, CallContext) ||
		((CallContext *) fcinfo->context)->atomic)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_TERMINATION),
				 errmsg("resilience.retry must be called with CALL outside a transaction block"),
				 errdetail("It commits or rolls back each attempt in a transaction of its own."),
				 errhint("Run CALL resilience.retry(...) in autocommit mode, not inside BEGIN ... COMMIT or a function.")));
	sql = text_to_cstring(resilience_arg_text(fcinfo, 0, "sql"));
	if (sql[strspn(sql, " \t\r\n;")] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sql must not be empty")));
	max_attempts = resilience_arg_positive(fcinfo, 1, "max_attempts");
	base = resilience_arg_duration(fcinfo, 2, "base", false);
	cap = resilience_arg_duration(fcinfo, 3, "cap", false);
	check_base_cap(base, cap);
	jitter = jitter_arg(fcinfo, 4);
	if (use_breaker)
		resilience_arg_name(fcinfo, 5, "circuit breaker name", breaker);

	SPI_connect_ext(SPI_OPT_NONATOMIC);
	mcxt = CurrentMemoryContext;	/* SPI's: lives across commits */
	previous = base;
	for (attempt = 1;; attempt++)
	{
		ErrorData  *edata;
		int64		started = resilience_clock_ns();

		if (use_breaker)
			breaker_guard_name(breaker);
		edata = retry_attempt(sql, mcxt);
		if (use_breaker)
			breaker_record_name(breaker, edata == NULL,
								(resilience_clock_ns() - started) / 1000);
		if (edata == NULL)
			break;
		if (!sqlstate_retryable(edata->sqlerrcode) || attempt >= max_attempts)
		{
			char	   *note = psprintf("resilience.retry gave up after %d attempt%s%s",
										attempt, attempt == 1 ? "" : "s",
										sqlstate_retryable(edata->sqlerrcode) ?
										"" : " (the error is not retryable)");

			edata->context = edata->context ?
				psprintf("%s\n%s", edata->context, note) : note;
			/* ReThrowError copies edata; the abort pops our SPI level */
			ReThrowError(edata);
		}
		previous = resilience_backoff_usec(attempt - 1, base, cap, jitter, previous);
		ereport(DEBUG1,
				(errmsg_internal("resilience.retry: attempt %d failed with SQLSTATE %s; retrying in %s",
								 attempt, unpack_sql_state(edata->sqlerrcode),
								 resilience_interval_text(previous))));
		FreeErrorData(edata);
		retry_sleep(previous);
	}
	SPI_finish();
	PG_RETURN_VOID();
}
