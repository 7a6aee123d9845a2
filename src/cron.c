/*-------------------------------------------------------------------------
 *
 * cron.c
 *		Cron expressions: parsing, and the next time one fires after a given
 *		instant, evaluated in a time zone with PostgreSQL's own zone data.
 *
 * Syntax: five fields (minute 0-59, hour 0-23, day of month 1-31, month
 * 1-12 or jan-dec, day of week 0-7 or sun-sat, 0 and 7 both Sunday), each a
 * comma-separated list of '*', n, n-m, with an optional /step (n/step means
 * n-max/step); @hourly, @daily (@midnight), @weekly, @monthly, @yearly
 * (@annually); @every <interval>.  Every value is range-checked, a step must
 * be positive, a range must not run backwards; an expression that can never
 * fire (0 0 30 2 *) is refused too.  Day of month and day of week follow
 * Vixie cron: if either field begins with '*' a day must match both, else
 * it must match either.
 *
 * Time zones: a line is matched against wall-clock times in the zone
 * (pg_tzset/pg_localtime: the zone data the server uses).  Each matching
 * wall-clock time fires once:
 *	- a time that occurs twice (the hour repeated when summer time ends)
 *	  fires at its first occurrence only, so 01:30 on that day runs once;
 *	- a time that does not exist (the hour skipped when summer time starts)
 *	  fires as PostgreSQL reads such a time, with the offset in force before
 *	  the change: 02:30 in Europe/Berlin on the last Sunday of March fires at
 *	  03:30 CEST, once (an hourly job's 02:30 and 03:30 are the same instant
 *	  that day, so it fires once for both).
 * @every <interval> ignores the zone: it fires at every whole multiple of
 * the interval since 2000-01-01 00:00 UTC; the interval may not contain
 * months (their length varies) and is at most 366 days.
 *
 *-------------------------------------------------------------------------
 */
#include "cron.h"

#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#define CRON_HINT "Five fields (minute hour day-of-month month day-of-week), or @hourly, @daily, @weekly, @monthly, @yearly or @every <interval>."
/* Seconds from 1970-01-01 (pg_time_t) to 2000-01-01 (timestamps). */
#define PG_EPOCH_SECS ((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY)
/* The longest shift of wall-clock time at one change, with room to spare. */
#define MAX_SHIFT_SECS (3 * SECS_PER_HOUR)
/* How far ahead to look: a February 29th that is a Sunday comes every 28 years. */
#define SEARCH_DAYS (28 * 366)

static const char *const month_names[] = {
	"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec", NULL
};
static const char *const weekday_names[] = {
	"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL
};

static const struct
{
	const char *name;
	const char *line;
}			macros[] = {
	{"@yearly", "0 0 1 1 *"},
	{"@annually", "0 0 1 1 *"},
	{"@monthly", "0 0 1 * *"},
	{"@weekly", "0 0 * * 0"},
	{"@daily", "0 0 * * *"},
	{"@midnight", "0 0 * * *"},
	{"@hourly", "0 * * * *"},
};

/* One field of a line: its name, its range and its value names (or NULL). */
typedef struct CronField
{
	const char *what;
	int			min;
	int			max;
	const char *const *names;
	int			name_base;		/* the value of names[0] */
} CronField;

static const CronField fields[5] = {
	{"minute", 0, 59, NULL, 0},
	{"hour", 0, 23, NULL, 0},
	{"day-of-month", 1, 31, NULL, 0},
	{"month", 1, 12, month_names, 1},
	{"day-of-week", 0, 7, weekday_names, 0},
};

static pg_noreturn_compat void
cron_error(const char *expr, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid cron expression \"%s\"", expr),
			 errdetail("%s", detail),
			 errhint(CRON_HINT)));
}

/* A number or a name at *p; advances *p.  is_name tells which it was. */
static int
parse_value(const char *expr, const CronField *f, const char **p, bool *is_name)
{
	const char *s = *p;
	int			value = 0;
	int			i;

	*is_name = false;
	if (isdigit((unsigned char) *s))
	{
		while (isdigit((unsigned char) *s))
		{
			value = value * 10 + (*s++ - '0');
			if (value > 1000)
				break;
		}
		if (value < f->min || value > f->max)
			cron_error(expr, psprintf("The %s field: %d is out of range %d-%d.",
									  f->what, value, f->min, f->max));
		*p = s;
		return value;
	}
	for (i = 0; f->names && f->names[i]; i++)
		if (pg_strncasecmp(s, f->names[i], 3) == 0 && !isalpha((unsigned char) s[3]))
		{
			*p = s + 3;
			*is_name = true;
			return f->name_base + i;
		}
	cron_error(expr, psprintf("The %s field: \"%s\" is not a value.", f->what, s));
}

/* Parse one field (NUL-terminated) into a bit set. */
static uint64
parse_field(const char *expr, const CronField *f, const char *text)
{
	uint64		bits = 0;
	const char *p = text;

	for (;;)
	{
		int			lo,
					hi,
					step = 1,
					v;
		bool		is_name;

		if (*p == '*')
		{
			lo = f->min;
			hi = f->max;
			p++;
		}
		else
		{
			lo = hi = parse_value(expr, f, &p, &is_name);
			if (*p == '-')
			{
				p++;
				hi = parse_value(expr, f, &p, &is_name);
				/* fri-sun: Sunday closes a range as 7 */
				if (f->names == weekday_names && is_name && hi == 0 && lo > 0)
					hi = 7;
				if (hi < lo)
					cron_error(expr, psprintf("The %s field: the range %d-%d runs backwards.",
											  f->what, lo, hi));
			}
			else if (*p == '/')
				hi = f->max;
		}
		if (*p == '/')
		{
			p++;
			if (!isdigit((unsigned char) *p))
				cron_error(expr, psprintf("The %s field: a step must be a number.", f->what));
			step = 0;
			while (isdigit((unsigned char) *p) && step <= 1000)
				step = step * 10 + (*p++ - '0');
			if (step < 1 || step > f->max)
				cron_error(expr, psprintf("The %s field: the step %d is out of range 1-%d.",
										  f->what, step, f->max));
		}
		if (*p != ',' && *p != '\0')
			cron_error(expr, psprintf("The %s field: unexpected \"%s\".", f->what, p));
		for (v = lo; v <= hi; v += step)
			bits |= UINT64CONST(1) << v;
		if (*p == '\0')
			break;
		p++;
	}
	return bits;
}

/* @every <interval>: the period in microseconds. */
static int64
parse_every(const char *expr, const char *text)
{
	MemoryContext cxt = CurrentMemoryContext;
	Interval   *iv = NULL;
	int128		usec;

	/* interval_in's own errors (22007, 22015) become this function's 22023 */
	PG_TRY();
	{
		iv = DatumGetIntervalP(DirectFunctionCall3(interval_in, CStringGetDatum(text),
												   ObjectIdGetDatum(InvalidOid),
												   Int32GetDatum(-1)));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		cron_error(expr, psprintf("@every: %s", edata->message));
	}
	PG_END_TRY();
	if (iv->month != 0)
		cron_error(expr, "@every: the interval must not contain months or years (their length varies); use a cron line.");
	usec = resilience_interval_usec(iv);
	if (usec <= 0 || usec > RESILIENCE_MAX_INTERVAL_USEC)
		cron_error(expr, "@every: the interval must be positive and at most 366 days.");
	return (int64) usec;
}

/* The longest a month can be (February: 29). */
static int
month_days(int month)
{
	static const int days[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};

	return days[month - 1];
}

/* Parse expr into spec; 22023 with the reason if it is not valid. */
void
cron_parse(const char *expr, CronSpec *spec)
{
	char	   *copy;
	char	   *field[5];
	char	   *save = NULL;
	char	   *tok;
	int			n = 0;
	int			i;
	uint64		bits[5];

	memset(spec, 0, sizeof(CronSpec));
	while (*expr == ' ' || *expr == '\t')
		expr++;
	if (pg_strncasecmp(expr, "@every", 6) == 0 && (expr[6] == ' ' || expr[6] == '\t'))
	{
		spec->every_usec = parse_every(expr, expr + 7);
		return;
	}
	copy = pstrdup(expr);
	if (copy[0] == '@')
	{
		char	   *end = copy + strlen(copy);

		while (end > copy && (end[-1] == ' ' || end[-1] == '\t'))
			*--end = '\0';
		for (i = 0; i < lengthof(macros); i++)
			if (pg_strcasecmp(copy, macros[i].name) == 0)
				break;
		if (i == lengthof(macros))
			cron_error(expr, pg_strcasecmp(copy, "@every") == 0 ?
					   "@every needs an interval, such as @every 5 minutes." :
					   psprintf("Unknown macro %s.", copy));
		copy = pstrdup(macros[i].line);
	}
	for (tok = strtok_r(copy, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save))
	{
		if (n == 5)
			cron_error(expr, "It has more than five fields.");
		field[n++] = tok;
	}
	if (n != 5)
		cron_error(expr, psprintf("It has %d field%s, not five.", n, n == 1 ? "" : "s"));
	for (i = 0; i < 5; i++)
		bits[i] = parse_field(expr, &fields[i], field[i]);
	spec->minutes = bits[0];
	spec->hours = (uint32) bits[1];
	spec->days = (uint32) bits[2];
	spec->months = (uint32) bits[3];
	/* 7 is Sunday too */
	spec->weekdays = (uint32) ((bits[4] | (bits[4] >> 7)) & 0x7F);
	spec->days_star = field[2][0] == '*';
	spec->weekdays_star = field[4][0] == '*';

	/* a day of month that no chosen month has, with nothing to OR it with */
	if (spec->days_star || spec->weekdays_star)
	{
		bool		possible = false;
		int			m;

		for (m = 1; m <= 12 && !possible; m++)
			if (spec->months & (1U << m))
				possible = (spec->days & ((UINT64CONST(2) << month_days(m)) - 2)) != 0;
		if (!possible)
			cron_error(expr, "No chosen month has the chosen day of month: it would never fire.");
	}
}

/* The zone named name; 22023 if PostgreSQL knows no such zone. */
pg_tz *
cron_zone(const char *name)
{
	pg_tz	   *zone = pg_tzset(name);

	if (zone == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("time zone \"%s\" is not recognized", name),
				 errhint("Use a name from pg_timezone_names, such as 'Europe/Berlin' or 'UTC'.")));
	return zone;
}

/* The zone's offset from UTC in seconds at unix time t. */
static int64
zone_offset(pg_tz *zone, pg_time_t t)
{
	struct pg_tm *tm = pg_localtime(&t, zone);

	if (tm == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	return tm->tm_gmtoff;
}

/*
 * The instant (unix seconds) of wall-clock time wall (unix seconds as if the
 * zone were UTC): its first occurrence, or, if it does not exist, read with
 * the offset in force before the change (*skipped set).
 */
static pg_time_t
wall_instant(pg_tz *zone, pg_time_t wall, bool *skipped)
{
	int64		before = zone_offset(zone, wall - SECS_PER_DAY);
	int64		after = zone_offset(zone, wall + SECS_PER_DAY);
	int64		first = Max(before, after); /* the larger offset: earlier */
	int64		second = Min(before, after);

	*skipped = false;
	if (zone_offset(zone, wall - first) == first)
		return wall - first;
	if (zone_offset(zone, wall - second) == second)
		return wall - second;
	*skipped = true;
	return wall - before;
}

static int64
floor_div(int64 a, int64 b)
{
	return a / b - (a % b != 0 && (a < 0) != (b < 0));
}

/* Does the day (Julian day number jd) match the spec's day fields? */
static bool
day_matches(const CronSpec *spec, int jd)
{
	int			year,
				month,
				day;
	bool		dom,
				dow;

	j2date(jd, &year, &month, &day);
	if (!(spec->months & (1U << month)))
		return false;
	dom = (spec->days & (1U << day)) != 0;
	dow = (spec->weekdays & (1U << j2day(jd))) != 0;
	return (spec->days_star || spec->weekdays_star) ? (dom && dow) : (dom || dow);
}

/*
 * The first instant after `after` at which spec fires in zone.  Walks the
 * matching wall-clock times from just before after's own, and keeps the
 * earliest instant later than after; a time in a skipped hour maps to a
 * later instant than its neighbours, so the walk goes on a little past it.
 */
TimestampTz
cron_next(const CronSpec *spec, pg_tz *zone, TimestampTz after)
{
	pg_time_t	after_s;
	pg_time_t	wall_after;
	pg_time_t	lowest;
	pg_time_t	best = 0;
	pg_time_t	best_wall = 0;
	bool		found = false;
	int64		day0,
				day;

	if (TIMESTAMP_NOT_FINITE(after))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the time to start from must be finite")));
	if (spec->every_usec > 0)
	{
		int64		k = floor_div(after, spec->every_usec) + 1;

		if (k > PG_INT64_MAX / spec->every_usec)
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("timestamp out of range")));
		return k * spec->every_usec;
	}

	after_s = floor_div(after, USECS_PER_SEC) + PG_EPOCH_SECS;
	wall_after = after_s + zone_offset(zone, after_s);
	/* a skipped time just before after's wall time may fire after it */
	lowest = zone_offset(zone, after_s - MAX_SHIFT_SECS) == zone_offset(zone, after_s) ?
		wall_after : wall_after - MAX_SHIFT_SECS;
	day0 = floor_div(lowest, SECS_PER_DAY);
	for (day = day0; day < day0 + SEARCH_DAYS; day++)
	{
		int			jd = (int) (day + UNIX_EPOCH_JDATE);
		int			h,
					m;

		if (found && day * SECS_PER_DAY > best_wall + MAX_SHIFT_SECS)
			break;
		if (!day_matches(spec, jd))
			continue;
		for (h = 0; h < 24; h++)
		{
			if (!(spec->hours & (1U << h)))
				continue;
			for (m = 0; m < 60; m++)
			{
				pg_time_t	wall = day * SECS_PER_DAY + h * SECS_PER_HOUR + m * SECS_PER_MINUTE;
				pg_time_t	instant;
				bool		skipped;

				if (!(spec->minutes & (UINT64CONST(1) << m)) || wall < lowest)
					continue;
				if (found && wall > best_wall + MAX_SHIFT_SECS)
					goto done;
				instant = wall_instant(zone, wall, &skipped);
				if (instant <= after_s || (found && instant >= best))
					continue;
				best = instant;
				if (!found)
					best_wall = wall;
				found = true;
				/* a time that exists: no later one can come earlier */
				if (!skipped)
					goto done;
			}
		}
	}
done:
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("the cron expression does not fire within %d years", SEARCH_DAYS / 366)));
	return (TimestampTz) (best - PG_EPOCH_SECS) * USECS_PER_SEC;
}

PG_FUNCTION_INFO_V1(cron_next_sql);

/* cron_next(cron, after, timezone) → the first time cron fires after after. */
Datum
cron_next_sql(PG_FUNCTION_ARGS)
{
	CronSpec	spec;

	cron_parse(text_to_cstring(PG_GETARG_TEXT_PP(0)), &spec);
	PG_RETURN_TIMESTAMPTZ(cron_next(&spec, cron_zone(text_to_cstring(PG_GETARG_TEXT_PP(2))),
									PG_GETARG_TIMESTAMPTZ(1)));
}
