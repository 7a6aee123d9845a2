/*-------------------------------------------------------------------------
 *
 * cron.h
 *		Cron expressions and their next time in a time zone (cron.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_CRON_H
#define RESILIENCE_CRON_H

#include "resilience.h"

#include "pgtime.h"

/* A parsed expression: the five fields as bit sets, or a fixed period. */
typedef struct CronSpec
{
	int64		every_usec;		/* @every: the period; 0 for a cron line */
	uint64		minutes;		/* bit n: minute n (0-59) */
	uint32		hours;			/* 0-23 */
	uint32		days;			/* 1-31 */
	uint32		months;			/* 1-12 */
	uint32		weekdays;		/* 0-6, Sunday = 0 */
	bool		days_star;		/* the field begins with '*' (Vixie cron) */
	bool		weekdays_star;
} CronSpec;

extern void cron_parse(const char *text, CronSpec *spec);
extern pg_tz *cron_zone(const char *name);
extern TimestampTz cron_next(const CronSpec *spec, pg_tz *zone, TimestampTz after);

#endif
