/*-------------------------------------------------------------------------
 *
 * breaker.h
 *		Circuit breakers, as the retry procedure (backoff.c) uses them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_BREAKER_H
#define RESILIENCE_BREAKER_H

#include "resilience.h"

#include "utils/elog.h"

/* breaker_guard's error: the breaker does not permit a call now. */
#define ERRCODE_CIRCUIT_BREAKER_OPEN MAKE_SQLSTATE('R', 'S', '0', '0', '2')

/* Raise ERRCODE_CIRCUIT_BREAKER_OPEN unless the breaker permits a call. */
extern void breaker_guard_name(const char *name);

/* Record a call's outcome; duration_usec < 0 when unknown. */
extern void breaker_record_name(const char *name, bool success, int64 duration_usec);

#endif							/* RESILIENCE_BREAKER_H */
