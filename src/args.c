/*-------------------------------------------------------------------------
 *
 * args.c
 *		Argument checking shared by the SQL functions: every capability
 *		rejects NULLs with 22004 and bad values with 22023, before it
 *		touches any shared state.
 *
 *-------------------------------------------------------------------------
 */
#include "resilience.h"

#include "utils/builtins.h"
#include "utils/timestamp.h"

/* A text argument that must not be NULL (22004). */
text *
resilience_arg_text(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	return PG_GETARG_TEXT_PP(argno);
}

/* An integer argument that must not be NULL (22004). */
int32
resilience_arg_int(FunctionCallInfo fcinfo, int argno, const char *what)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	return PG_GETARG_INT32(argno);
}

/* An integer argument that must be positive (22004, 22023). */
int32
resilience_arg_positive(FunctionCallInfo fcinfo, int argno, const char *what)
{
	int32		value = resilience_arg_int(fcinfo, argno, what);

	if (value <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be positive", what),
				 errdetail("%s is %d.", what, value)));
	return value;
}

/*
 * A name of a breaker or bulkhead: not NULL, 1 to NAMEDATALEN - 1 bytes.
 * Copies it NUL-terminated into name (NAMEDATALEN bytes) and returns its
 * length.
 */
int
resilience_arg_name(FunctionCallInfo fcinfo, int argno, const char *what,
					char *name)
{
	text	   *arg = resilience_arg_text(fcinfo, argno, what);
	int			len = VARSIZE_ANY_EXHDR(arg);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (len >= NAMEDATALEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", what),
				 errdetail("It takes %d bytes; at most %d are allowed.",
						   len, NAMEDATALEN - 1)));
	memcpy(name, VARDATA_ANY(arg), len);
	name[len] = '\0';
	return len;
}

/*
 * A duration (interval) argument in microseconds: not NULL, not negative
 * (zero only if allow_zero), at most 366 days.
 */
int64
resilience_arg_duration(FunctionCallInfo fcinfo, int argno, const char *what,
						bool allow_zero)
{
	Interval   *interval;
	int128		usec;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	interval = PG_GETARG_INTERVAL_P(argno);
	usec = resilience_interval_usec(interval);
	if (usec < 0 || (usec == 0 && !allow_zero) || usec > RESILIENCE_MAX_INTERVAL_USEC)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be %s and at most 366 days", what,
						allow_zero ? "zero or positive" : "positive"),
				 errdetail("%s is %s.", what,
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(interval))))));
	return (int64) usec;
}

/* A duration in microseconds as readable text ("1.500 s", "250 ms"). */
char *
resilience_interval_text(int64 usec)
{
	if (usec < 1000000)
		return psprintf("%.3f ms", usec / 1000.0);
	return psprintf("%.3f s", usec / 1000000.0);
}
