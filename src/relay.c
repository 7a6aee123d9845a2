/*-------------------------------------------------------------------------
 *
 * relay.c
 *		The outbox relay: claim a batch, deliver it, record the outcomes;
 *		retries with backoff and full jitter, a breaker per destination,
 *		dead letters.
 *
 * A batch takes up to three steps, and never keeps a transaction open
 * across network I/O:
 *
 *	1. claim (one transaction): read the routes, claim ready events
 *	   (outbox_claim_rows: per-key order, see outbox.c) for a while long
 *	   enough to deliver them, deliver the NOTIFY ones (NOTIFY is itself
 *	   transactional: it is sent when this transaction commits, together
 *	   with the removal of the rows), commit.  The NOTIFY rows are only
 *	   locked and read (held), never claimed by an UPDATE: nothing outside
 *	   this transaction needs to see them as taken;
 *	2. deliver the HTTP and AMQP ones with no transaction open (sink_http.c,
 *	   sink_amqp.c);
 *	3. record (one transaction): delete the delivered rows (or mark them
 *	   delivered, for resilience.outbox_retention), schedule retries, move
 *	   dead letters, release what was not tried; commit.
 *
 * If the relay dies between 1 and 3 its claims expire (after the route's
 * timeout plus CLAIM_SLACK_MS), and a relay started afterwards releases at
 * once the claims of relay processes that no longer exist (on this server
 * start: a claim names the server start it was made in, so the claims of
 * the old primary's relay are released at once after a failover), so after
 * a crash or a failover in-flight events go out again within seconds: at
 * least once, never lost.  The relay never runs during recovery.
 *
 * The relay runs in the database's worker (relay_worker_job, woken by
 * worker_wake when a publishing transaction commits, and by a slow safety
 * poll, resilience.relay_interval), or by hand: CALL relay_outbox(n), a
 * procedure that commits between the steps (SPI_commit).  Either way the
 * relay's SQL runs as the owner of the outbox tables with search_path
 * pinned, and runs no user code.
 *
 * The breaker
 * -----------
 * Until the shared breaker capability lands, the relay keeps a minimal one
 * per destination (scheme://host:port): resilience.outbox_breaker_failures
 * consecutive failures (timeouts, connection errors, 408, 429, 5xx) open it
 * for resilience.outbox_breaker_open_time; then one probe is let through
 * (half-open): success closes it, failure opens it again.  A Retry-After
 * answer also pauses the destination for that long.  While a destination
 * is open or paused its routes are not claimed at all.  The state and the
 * per-route counters live in shared memory under one LWLock (touched a few
 * times per batch); without preloading, in the relaying process.  Route ids
 * are per database, so the counters are kept per (database, route id); a
 * breaker is per destination, shared by the databases that send there.
 *
 * Errors recorded (last_error of the rows, the dead letters and the
 * counters) may quote an endpoint's answer or a broker's reply, cut
 * anywhere: they are made valid text in the database encoding first
 * (clean_error) and cut at character boundaries.
 *
 *-------------------------------------------------------------------------
 */
#include "outbox.h"
#include "shmem.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define RELAY_TRANCHE "resilience_relay"
#define RELAY_MAX_ROUTES 256
#define RELAY_MAX_DESTS 128
#define DEST_LEN 256
#define STATS_ERROR_LEN 160
#define CLAIM_SLACK_MS 30000
#define MAX_RETRY_AFTER_MS (3600 * 1000)
#define WORKER_MAX_BATCHES 50
#define RATE_WINDOW_US (10 * USECS_PER_SEC)

typedef enum BreakerState
{
	BREAKER_CLOSED,
	BREAKER_OPEN,
	BREAKER_HALF_OPEN
} BreakerState;

static const char *const breaker_names[] = {"closed", "open", "half_open"};

typedef struct RouteStats
{
	Oid			dbid;			/* route ids are per database */
	int32		route_id;		/* 0: free */
	int64		delivered;
	int64		retries;
	TimestampTz window_start;	/* delivered/s: counts of this and the last window */
	int64		window_count;
	int64		last_window_count;
	int64		last_window_us;
	char		last_error[STATS_ERROR_LEN];
} RouteStats;

typedef struct DestState
{
	char		dest[DEST_LEN]; /* "" : free */
	BreakerState state;
	int			failures;		/* consecutive */
	TimestampTz open_until;
	TimestampTz paused_until;	/* Retry-After */
	bool		probing;		/* half-open probe in flight */
} DestState;

typedef struct RelayShared
{
	LWLock	   *lock;
	RouteStats	routes[RELAY_MAX_ROUTES];
	DestState	dests[RELAY_MAX_DESTS];
	/* outbox_claim(..., wait): consumers sleep on their name's slot */
	ConditionVariable claim_cv[OUTBOX_CLAIM_SLOTS];
} RelayShared;

static RelayShared *relay_shared = NULL;	/* shared memory, or process-local */

/* One relay run: how its transactions are started and ended. */
typedef struct RelayRun
{
	bool		procedure;		/* CALL relay_outbox: SPI_commit between steps */
	ResilienceUser save;		/* the relay's user, while in_phase */
	bool		in_phase;		/* a step runs as the owner, search_path pinned */
	MemoryContext batch_cxt;
	int64		delivered;
	TimestampTz next_due;
	bool		more;
} RelayRun;

static uint64 claim_round = 0;
static bool orphans_released = false;

PG_FUNCTION_INFO_V1(relay_outbox);
PG_FUNCTION_INFO_V1(outbox_relay_stats);

/* ---- shared state ---- */

Size
relay_shmem_size(void)
{
	return MAXALIGN(sizeof(RelayShared));
}

void
relay_shmem_request(void)
{
	RequestNamedLWLockTranche(RELAY_TRANCHE, 1);
}

void
relay_shmem_init(void)
{
	bool		found;

	relay_shared = ShmemInitStruct("resilience relay", relay_shmem_size(), &found);
	if (!found)
	{
		memset(relay_shared, 0, relay_shmem_size());
		relay_shared->lock = &(GetNamedLWLockTranche(RELAY_TRANCHE))->lock;
		for (int i = 0; i < OUTBOX_CLAIM_SLOTS; i++)
			ConditionVariableInit(&relay_shared->claim_cv[i]);
	}
}

/*
 * The condition variable consumers of claim slot sleep on in
 * outbox_claim(..., wait); NULL without preloading.
 */
ConditionVariable *
relay_claim_cv(int slot)
{
	if (relay_shared == NULL || relay_shared->lock == NULL)
		return NULL;
	return &relay_shared->claim_cv[slot % OUTBOX_CLAIM_SLOTS];
}

/* Wake the consumers waiting on the claim slots set in slots (at commit). */
void
relay_wake_claimers(uint64 slots)
{
	for (int i = 0; i < OUTBOX_CLAIM_SLOTS; i++)
		if ((slots & (UINT64CONST(1) << i)) && relay_claim_cv(i))
			ConditionVariableBroadcast(relay_claim_cv(i));
}

/* The state, in shared memory or (not preloaded) in this process. */
static RelayShared *
relay_state(void)
{
	if (relay_shared == NULL)
		relay_shared = MemoryContextAllocZero(TopMemoryContext, sizeof(RelayShared));
	return relay_shared;
}

static void
state_lock(RelayShared *rs)
{
	if (rs->lock)
		LWLockAcquire(rs->lock, LW_EXCLUSIVE);
}

static void
state_unlock(RelayShared *rs)
{
	if (rs->lock)
		LWLockRelease(rs->lock);
}

/*
 * The stats slot of a route of this database (taking a free one); NULL if
 * all are used.
 */
static RouteStats *
route_stats(RelayShared *rs, int32 route_id)
{
	int			i;
	RouteStats *free_slot = NULL;

	for (i = 0; i < RELAY_MAX_ROUTES; i++)
	{
		if (rs->routes[i].route_id == route_id && rs->routes[i].dbid == MyDatabaseId)
			return &rs->routes[i];
		if (rs->routes[i].route_id == 0 && free_slot == NULL)
			free_slot = &rs->routes[i];
	}
	if (free_slot)
	{
		memset(free_slot, 0, sizeof(RouteStats));
		free_slot->dbid = MyDatabaseId;
		free_slot->route_id = route_id;
	}
	return free_slot;
}

/* The breaker of a destination (taking a free one); NULL if all are used. */
static DestState *
dest_state(RelayShared *rs, const char *dest)
{
	int			i;
	DestState  *free_slot = NULL;

	for (i = 0; i < RELAY_MAX_DESTS; i++)
	{
		if (strcmp(rs->dests[i].dest, dest) == 0)
			return &rs->dests[i];
		if (rs->dests[i].dest[0] == '\0' && free_slot == NULL)
			free_slot = &rs->dests[i];
	}
	if (free_slot)
	{
		memset(free_slot, 0, sizeof(DestState));
		strlcpy(free_slot->dest, dest, DEST_LEN);
	}
	return free_slot;
}

/*
 * May the relay send to dest now?  Sets *probe when only one request may go
 * (half-open).  An open breaker whose time is up turns half-open here.
 */
static bool
breaker_allows(const char *dest, bool *probe, TimestampTz *until)
{
	RelayShared *rs = relay_state();
	TimestampTz now = GetCurrentTimestamp();
	DestState  *d;
	bool		allowed = true;
	bool		half_opened = false;

	*probe = false;
	state_lock(rs);
	d = dest_state(rs, dest);
	if (d)
	{
		if (now < d->paused_until)
			allowed = false;
		else if (d->state == BREAKER_OPEN && now >= d->open_until)
		{
			d->state = BREAKER_HALF_OPEN;
			d->probing = false;
			half_opened = true;
		}
		if (allowed && d->state == BREAKER_OPEN)
			allowed = false;
		if (allowed && d->state == BREAKER_HALF_OPEN)
		{
			allowed = !d->probing;
			*probe = true;
		}
		*until = Max(d->paused_until, d->state == BREAKER_OPEN ? d->open_until : 0);
	}
	state_unlock(rs);
	if (half_opened)
		ereport(LOG,
				(errmsg("resilience outbox: breaker for %s is half-open, sending a probe", dest)));
	return allowed;
}

/* Is item allowed to start now?  Called by the sinks before each request. */
bool
relay_may_start(OutboxItem *item)
{
	RelayShared *rs = relay_state();
	DestState  *d;
	bool		ok = true;

	if (item->route->destination == NULL)
		return true;
	state_lock(rs);
	d = dest_state(rs, item->route->destination);
	if (d)
	{
		if (d->state == BREAKER_OPEN || GetCurrentTimestamp() < d->paused_until)
			ok = false;
		else if (d->state == BREAKER_HALF_OPEN)
		{
			ok = !d->probing;
			d->probing = true;
		}
	}
	state_unlock(rs);
	return ok;
}

/* Feed an attempt's outcome to its destination's breaker. */
void
relay_item_done(OutboxItem *item)
{
	RelayShared *rs = relay_state();
	TimestampTz now = GetCurrentTimestamp();
	int			threshold = outbox_setting_int("resilience.outbox_breaker_failures", 5, 0);
	int			open_ms = outbox_setting_int("resilience.outbox_breaker_open_time", 30000, GUC_UNIT_MS);
	bool		failed = item->outcome == OUTCOME_RETRY && !item->destination_ok;
	DestState  *d;
	const char *transition = NULL;
	int			failures = 0;

	if (item->route->destination == NULL)
		return;
	state_lock(rs);
	d = dest_state(rs, item->route->destination);
	if (d && item->outcome == OUTCOME_NOT_TRIED)
	{
		/* abandoned (shutdown): no verdict, but a probe is over */
		if (d->state == BREAKER_HALF_OPEN)
			d->probing = false;
		d = NULL;
	}
	if (d)
	{
		if (item->retry_after_ms > 0)
			d->paused_until = Max(d->paused_until,
								  now + Min(item->retry_after_ms, MAX_RETRY_AFTER_MS) * 1000);
		if (d->state == BREAKER_HALF_OPEN)
			d->probing = false;
		if (!failed)
		{
			if (d->state != BREAKER_CLOSED)
				transition = "closed";
			d->state = BREAKER_CLOSED;
			d->failures = 0;
		}
		else
		{
			d->failures++;
			failures = d->failures;
			if (d->state == BREAKER_HALF_OPEN ||
				(d->state == BREAKER_CLOSED && d->failures >= threshold))
			{
				transition = "opened";
				d->state = BREAKER_OPEN;
				d->open_until = now + (int64) open_ms * 1000;
			}
		}
	}
	state_unlock(rs);
	if (transition)
		ereport(LOG,
				(errmsg("resilience outbox: breaker for %s %s%s", item->route->destination,
						transition,
						failures ? psprintf(" after %d consecutive failures", failures) : "")));
}

/* Count what a batch did for the status view. */
static void
record_stats(int32 route_id, int delivered, int retries, const char *error)
{
	RelayShared *rs = relay_state();
	TimestampTz now = GetCurrentTimestamp();
	RouteStats *st;
	int			error_len = 0;

	/* cut at a character boundary, before taking the lock */
	if (error)
		error_len = pg_mbcliplen(error, strlen(error), STATS_ERROR_LEN - 1);
	state_lock(rs);
	st = route_stats(rs, route_id);
	if (st)
	{
		st->delivered += delivered;
		st->retries += retries;
		if (st->window_start == 0)
			st->window_start = now;
		if (now - st->window_start >= RATE_WINDOW_US)
		{
			st->last_window_count = st->window_count;
			st->last_window_us = now - st->window_start;
			st->window_count = 0;
			st->window_start = now;
		}
		st->window_count += delivered;
		if (error)
		{
			memcpy(st->last_error, error, error_len);
			st->last_error[error_len] = '\0';
		}
	}
	state_unlock(rs);
}

/* ---- transactions ---- */

/* Start a step's transaction; false if the extension is being dropped. */
static bool
phase_begin(RelayRun *run, const char *activity)
{
	if (!run->procedure)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
	}
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
	/* the worker must not wait for, nor trip over, DROP EXTENSION */
	run->in_phase = run->procedure || worker_lock_extension();
	if (!run->in_phase)
		return false;
	resilience_become_owner(true, &run->save);
	return true;
}

/* Commit a step's transaction. */
static void
phase_end(RelayRun *run)
{
	if (run->in_phase)
		resilience_restore_user(&run->save);
	PopActiveSnapshot();
	run->in_phase = false;
	if (!run->procedure)
	{
		SPI_finish();
		CommitTransactionCommand();
	}
	else
		resilience_spi_commit_compat();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * A claim names the relay process that made it and the server it ran on:
 * relay:<pid>:<postmaster start time>:<round>.  After a failover the claims
 * of the old primary's relay are in the table; its pid may well be in use on
 * the new primary (by the new relay itself, even), but its start time is not.
 */
static char *
claimer_name(void)
{
	return psprintf("relay:%d:" INT64_FORMAT ":" UINT64_FORMAT,
					MyProcPid, (int64) PgStartTime, ++claim_round);
}

/*
 * Is the relay that made a claim still running: a process of this server
 * start (not one before a restart, nor one on another server)?
 */
static bool
claimer_running(const char *claimer, int *pid)
{
	char	   *end;
	int64		started;

	*pid = (int) strtol(claimer + strlen("relay:"), &end, 10);
	if (*end != ':')
		return false;
	started = strtoi64(end + 1, &end, 10);
	if (*end != ':' || started != (int64) PgStartTime)
		return false;
	return *pid == MyProcPid || BackendPidGetProc(*pid) != NULL;
}

/*
 * Release claims left by relay processes that no longer exist (a crash, a
 * kill, a failover): their events go out again now rather than when the
 * claims expire.
 */
static void
release_orphaned_claims(void)
{
	uint64		i;
	int			ret;
	SPITupleTable *tt;
	uint64		n;

	ret = SPI_execute("SELECT DISTINCT o.claimed_by FROM resilience.outbox o"
					  " JOIN resilience.outbox_routes r ON r.id OPERATOR(pg_catalog.=) o.route_id"
					  " AND r.sink OPERATOR(pg_catalog.<>) 'queue'"
					  " WHERE o.claimed_by OPERATOR(pg_catalog.~~) 'relay:%' AND o.delivered_at IS NULL", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "looking for orphaned claims failed: %s", SPI_result_code_string(ret));
	tt = SPI_tuptable;
	n = SPI_processed;
	for (i = 0; i < n; i++)
	{
		char	   *claimer = SPI_getvalue(tt->vals[i], tt->tupdesc, 1);
		int			pid;
		Datum		arg = CStringGetTextDatum(claimer);
		Oid			type = TEXTOID;

		if (claimer_running(claimer, &pid))
			continue;
		ret = SPI_execute_with_args("UPDATE resilience.outbox SET claimed_by = NULL, claim_until = NULL"
									" WHERE claimed_by OPERATOR(pg_catalog.=) $1 AND delivered_at IS NULL",
									1, &type, &arg, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "releasing orphaned claims failed: %s", SPI_result_code_string(ret));
		if (SPI_processed > 0)
			ereport(LOG,
					(errmsg("resilience outbox: released %llu events claimed by relay process %d, which is gone",
							(unsigned long long) SPI_processed, pid)));
	}
}

/* ---- outcomes ---- */

/* Full jitter: a uniform delay in [0, min(cap, base * 2^(attempt-1))] ms. */
static int64
backoff_ms(OutboxRoute *route, int attempt)
{
	double		ceiling = route->backoff_base_ms;
	int			i;

	for (i = 1; i < attempt && ceiling < route->backoff_max_ms; i++)
		ceiling *= 2;
	ceiling = Min(ceiling, route->backoff_max_ms);
	return (int64) (resilience_random_compat() * ceiling);
}

static Datum
text_or_null(const char *s, char *null)
{
	*null = s ? ' ' : 'n';
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

/* An array of the items' ctids, and one of their ids. */
static void
item_arrays(List *items, Datum *tids, Datum *ids)
{
	Datum	   *t = palloc(sizeof(Datum) * Max(list_length(items), 1));
	Datum	   *i = palloc(sizeof(Datum) * Max(list_length(items), 1));
	ListCell   *lc;
	int			n = 0;

	foreach(lc, items)
	{
		OutboxItem *item = lfirst(lc);

		t[n] = PointerGetDatum(&item->ctid);
		i[n] = Int64GetDatum(item->id);
		n++;
	}
	*tids = PointerGetDatum(construct_array(t, n, TIDOID, sizeof(ItemPointerData), false, TYPALIGN_SHORT));
	*ids = PointerGetDatum(construct_array(i, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * Delivered rows still claimed by claimer: deleted (keep_secs < 0), or kept
 * that long, marked delivered.  The id is checked along with the ctid.
 * claimer NULL: rows this transaction has held locked since it read them
 * (held items), so their ctids are theirs: nothing else is checked.
 */
static void
finish_rows(List *items, const char *claimer, int keep_secs)
{
	static SPIPlanPtr plans[2][2];	/* [held][kept] */
	static const char *const where[2] = {
		" WHERE ctid OPERATOR(pg_catalog.=) ANY($1) AND id OPERATOR(pg_catalog.=) ANY($2)"
		" AND claimed_by OPERATOR(pg_catalog.=) $3",
		" WHERE ctid OPERATOR(pg_catalog.=) ANY($1)"
	};
	bool		held = claimer == NULL;
	bool		kept = keep_secs >= 0;
	Datum		args[4];
	Oid			types[4] = {TIDARRAYOID, INT8ARRAYOID, TEXTOID, INT4OID};
	char		nulls[4] = {' ', ' ', ' ', ' '};
	int			ret;

	if (items == NIL)
		return;
	item_arrays(items, &args[0], &args[1]);
	args[2] = text_or_null(claimer, &nulls[2]);
	args[3] = Int32GetDatum(keep_secs);
	if (plans[held][kept] == NULL)
		(void) outbox_plan(&plans[held][kept],
						   psprintf("%s%s", kept ?
									"UPDATE resilience.outbox SET delivered_at = pg_catalog.now(),"
									" not_before = pg_catalog.now() OPERATOR(pg_catalog.+)"
									" pg_catalog.make_interval(secs => $4),"
									" claimed_by = NULL, claim_until = NULL"
									: "DELETE FROM resilience.outbox",
									where[held]),
						   4, types);
	ret = SPI_execute_plan(plans[held][kept], args, nulls, false, 0);
	if (ret < 0)
		elog(ERROR, "recording delivered events failed: %s", SPI_result_code_string(ret));
}

/*
 * Make an item's error (which may quote an endpoint's answer or a broker's
 * reply, cut anywhere) valid text in the database encoding: a character cut
 * off at the end is dropped, bytes that belong to no valid character become
 * '?', control characters spaces.
 */
static void
clean_error(char *s)
{
	int			enc = GetDatabaseEncoding();
	int			len = strlen(s);
	int			i = 0;

	while (i < len)
	{
		int			n = pg_encoding_verifymbchar(enc, s + i, len - i);

		if (n <= 0 && pg_encoding_mblen(enc, s + i) > len - i)
		{
			s[i] = '\0';		/* a character cut short at the end: drop it */
			break;
		}
		if (n <= 0)
		{
			s[i] = '?';
			n = 1;
		}
		else if (n == 1 && (unsigned char) s[i] < 0x20)
			s[i] = ' ';
		i += n;
	}
}

/* Keep the earliest time something falls due (0: nothing known). */
static void
due_at(TimestampTz *next_due, TimestampTz t)
{
	if (t > 0 && (*next_due == 0 || t < *next_due))
		*next_due = t;
}

/*
 * Write what happened to a batch's items (in the record transaction);
 * retries scheduled make *next_due earlier.
 */
static void
record_outcomes(List *items, const char *claimed_by, TimestampTz *next_due)
{
	/* a list is all held (in_claim sinks) or all claimed (relay_batch) */
	const char *claimer = (items != NIL && ((OutboxItem *) linitial(items))->held) ? NULL : claimed_by;
	int			retention = outbox_setting_int("resilience.outbox_retention", 0, GUC_UNIT_S);
	TimestampTz now = GetCurrentTimestamp();
	List	   *done = NIL;
	List	   *release = NIL;
	ListCell   *lc;
	Datum		args[5];
	Oid			types[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	int			ret;

	foreach(lc, items)
	{
		OutboxItem *item = lfirst(lc);
		int			attempt = item->attempts + 1;

		clean_error(item->error);
		switch (item->outcome)
		{
			case OUTCOME_DELIVERED:
				done = lappend(done, item);
				record_stats(item->route_id, 1, 0, NULL);
				outbox_count(RC_OUTBOX_DELIVERED, item->route_id, 1);
				break;
			case OUTCOME_NOT_TRIED:
				release = lappend(release, item);
				due_at(next_due, now);	/* look again at once */
				break;
			case OUTCOME_RETRY:
				if (attempt < item->route->max_attempts)
				{
					int64		delay = backoff_ms(item->route, attempt);

					if (item->retry_after_ms > 0)
						delay = Max(delay, Min(item->retry_after_ms, MAX_RETRY_AFTER_MS));
					due_at(next_due, now + delay * 1000);
					args[0] = PointerGetDatum(&item->ctid);
					args[1] = text_or_null(claimer, &nulls[1]);
					args[2] = TimestampTzGetDatum(now + delay * 1000);
					args[3] = text_or_null(item->error, &nulls[3]);
					types[0] = TIDOID;
					types[1] = TEXTOID;
					types[2] = TIMESTAMPTZOID;
					types[3] = TEXTOID;
					ret = SPI_execute_with_args("UPDATE resilience.outbox SET attempts = attempts OPERATOR(pg_catalog.+) 1,"
												" not_before = $3, last_error = $4,"
												" claimed_by = NULL, claim_until = NULL"
												" WHERE ctid OPERATOR(pg_catalog.=) $1"
												" AND ($2::pg_catalog.text IS NULL OR claimed_by OPERATOR(pg_catalog.=) $2)",
												4, types, args, nulls, false, 0);
					if (ret != SPI_OK_UPDATE)
						elog(ERROR, "scheduling a retry failed: %s", SPI_result_code_string(ret));
					nulls[3] = ' ';
					record_stats(item->route_id, 0, 1, item->error);
					outbox_count(RC_OUTBOX_RETRIES, item->route_id, 1);
					break;
				}
				/* out of attempts */
				/* FALLTHROUGH */
			case OUTCOME_DEAD:
				outbox_dead_letter(item, item->error[0] ? item->error : "failed", 1, claimer);
				record_stats(item->route_id, 0, 0, item->error);
				break;
		}
	}

	if (done != NIL)
	{
		List	   *kept = NIL;
		List	   *gone = NIL;
		List	   *fetchable = NIL;

		/* rows to keep: for the retention, or an hour for outbox_event */
		foreach(lc, done)
		{
			OutboxItem *item = lfirst(lc);

			if (item->keep)
				fetchable = lappend(fetchable, item);
			else if (retention > 0)
				kept = lappend(kept, item);
			else
				gone = lappend(gone, item);
		}
		finish_rows(gone, claimer, -1);
		finish_rows(kept, claimer, retention);
		finish_rows(fetchable, claimer, Max(retention, 3600));
	}
	/* held rows need no release: their locks go with the transaction */
	if (release != NIL && claimer != NULL)
	{
		item_arrays(release, &args[0], &args[1]);
		args[2] = CStringGetTextDatum(claimer);
		types[0] = TIDARRAYOID;
		types[1] = INT8ARRAYOID;
		types[2] = TEXTOID;
		ret = SPI_execute_with_args("UPDATE resilience.outbox SET claimed_by = NULL, claim_until = NULL"
									" WHERE ctid OPERATOR(pg_catalog.=) ANY($1) AND id OPERATOR(pg_catalog.=) ANY($2)"
									" AND claimed_by OPERATOR(pg_catalog.=) $3",
									3, types, args, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "releasing claims failed: %s", SPI_result_code_string(ret));
	}
}

/* ---- a batch ---- */

/*
 * Hand items to their sinks' deliver, one call per sink (in_claim: the
 * sinks that deliver inside the claim transaction, else the others).
 */
static void
deliver_by_sink(List *items, bool in_claim)
{
	int			nsinks;
	const OutboxSinkOps *const *sinks = outbox_sinks(&nsinks);
	int			i;

	for (i = 0; i < nsinks; i++)
	{
		List	   *mine = NIL;
		ListCell   *lc;

		if (sinks[i]->deliver == NULL || sinks[i]->in_claim != in_claim)
			continue;
		foreach(lc, items)
			if (((OutboxItem *) lfirst(lc))->route->sink == sinks[i])
				mine = lappend(mine, lfirst(lc));
		if (mine != NIL)
			sinks[i]->deliver(mine);
	}
}

/*
 * One batch: claim, deliver, record.  Returns the number delivered; sets
 * run->more when there may be more ready now, run->next_due otherwise.
 */
static int
relay_batch(RelayRun *run)
{
	OutboxClaim claim;
	List	   *routes;
	List	   *claimable = NIL;
	List	   *in_claim = NIL;
	List	   *pushed = NIL;
	ListCell   *lc;
	TimestampTz next_due = 0;
	MemoryContext old;
	char	   *claimer;
	int			visibility = 0;
	int			delivered = 0;

	/* the events are the primary's: a standby must not deliver them */
	PreventCommandDuringRecovery("relay_outbox()");
	MemoryContextReset(run->batch_cxt);
	run->more = false;
	if (!phase_begin(run, "resilience relay: claiming"))
	{
		phase_end(run);
		return 0;
	}
	old = MemoryContextSwitchTo(run->batch_cxt);
	routes = outbox_load_routes(true, NULL);
	if (!orphans_released || run->procedure)
	{
		release_orphaned_claims();
		orphans_released = true;
		MemoryContextSwitchTo(run->batch_cxt);	/* SPI left its own current */
	}
	foreach(lc, routes)
	{
		OutboxRoute *r = lfirst(lc);
		bool		probe = false;
		TimestampTz until = 0;

		if (r->destination != NULL && !breaker_allows(r->destination, &probe, &until))
		{
			due_at(&next_due, until);
			continue;
		}
		r->probe_only = probe;
		visibility = Max(visibility, r->timeout_ms);
		claimable = lappend(claimable, r);
	}
	claimer = claimer_name();
	memset(&claim, 0, sizeof(claim));
	claim.routes = claimable;
	claim.limit = outbox_setting_int("resilience.outbox_batch_size", 500, 0);
	claim.runs = true;
	claim.count_attempt = false;
	claim.claimer = claimer;
	claim.visibility_ms = visibility + CLAIM_SLACK_MS;
	claim.now = GetCurrentTimestamp();
	claim.result_cxt = run->batch_cxt;
	claim.hold_in_claim = true;
	outbox_claim_rows(&claim);
	/* the lists must outlive this transaction (and SPI's memory) */
	foreach(lc, claim.items)
	{
		OutboxItem *item = lfirst(lc);

		if (item->route->sink->in_claim)
			in_claim = lappend(in_claim, item);
		else
			pushed = lappend(pushed, item);
	}
	MemoryContextSwitchTo(old);
	if (in_claim != NIL)
	{
		deliver_by_sink(in_claim, true);
		record_outcomes(in_claim, claimer, &next_due);
		delivered += list_length(in_claim);
	}
	phase_end(run);

	if (pushed != NIL)
	{
		pgstat_report_activity(STATE_RUNNING, "resilience relay: delivering (no transaction open)");
		old = MemoryContextSwitchTo(run->batch_cxt);
		deliver_by_sink(pushed, false);
		MemoryContextSwitchTo(old);
		pgstat_report_activity(STATE_IDLE, NULL);

		if (phase_begin(run, "resilience relay: recording"))
			record_outcomes(pushed, claimer, &next_due);
		phase_end(run);
		foreach(lc, pushed)
			if (((OutboxItem *) lfirst(lc))->outcome == OUTCOME_DELIVERED)
				delivered++;
	}
	run->more = !claim.exhausted;
	due_at(&next_due, claim.next_due);
	run->next_due = next_due;
	run->delivered += delivered;
	return delivered;
}

/* Set up a run's memory. */
static void
run_init(RelayRun *run, bool procedure)
{
	memset(run, 0, sizeof(RelayRun));
	run->procedure = procedure;
	run->batch_cxt = AllocSetContextCreate(TopMemoryContext, "resilience relay batch",
										   ALLOCSET_DEFAULT_SIZES);
}

/*
 * The worker's relay job, called with no transaction open: batches until
 * nothing is ready (or WORKER_MAX_BATCHES, to let other jobs run).  Returns
 * ms until it wants to run again: 0 if more is ready, else when the next
 * retry or deliver_after falls due (-1: no idea, the safety poll).
 */
long
relay_worker_job(void)
{
	RelayRun	run;
	int			i;
	long		wish = -1;

	run_init(&run, false);
	PG_TRY();
	{
		for (i = 0; i < WORKER_MAX_BATCHES && !worker_stop_requested(); i++)
		{
			(void) relay_batch(&run);
			if (!run.more)
				break;
		}
	}
	PG_FINALLY();
	{
		MemoryContextDelete(run.batch_cxt);
	}
	PG_END_TRY();
	if (run.more)
		wish = 0;
	else if (run.next_due > 0)
		wish = Max((run.next_due - GetCurrentTimestamp()) / 1000 + 1, 0);
	return wish;
}

/*
 * CALL relay_outbox(max_batches) → delivered: the relay by hand.  A
 * procedure, so that it can commit between claiming and recording: no
 * transaction stays open while it waits for endpoints.
 */
Datum
relay_outbox(PG_FUNCTION_ARGS)
{
	CallContext *cc = (CallContext *) fcinfo->context;
	RelayRun	run;
	int			max_batches;
	int			i;
	TupleDesc	tupdesc;
	Datum		value;
	bool		isnull = false;

	if (PG_ARGISNULL(0) || PG_GETARG_INT32(0) <= 0)
		ereport(ERROR,
				(errcode(PG_ARGISNULL(0) ? ERRCODE_NULL_VALUE_NOT_ALLOWED : ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_batches must be a positive number")));
	max_batches = PG_GETARG_INT32(0);
	if (cc == NULL || !IsA(cc, CallContext) || cc->atomic)
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("relay_outbox cannot run inside a transaction block"),
				 errdetail("It commits after claiming each batch, so that no transaction stays open while events are delivered."),
				 errhint("CALL resilience.relay_outbox() on its own, outside BEGIN ... COMMIT and functions.")));

	SPI_connect_ext(SPI_OPT_NONATOMIC);
	run_init(&run, true);
	for (i = 0; i < max_batches; i++)
	{
		CHECK_FOR_INTERRUPTS();
		(void) relay_batch(&run);
		if (!run.more)
			break;
	}
	MemoryContextDelete(run.batch_cxt);
	SPI_finish();

	value = Int64GetDatum(run.delivered);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) == TYPEFUNC_COMPOSITE)
	{
		tupdesc = BlessTupleDesc(tupdesc);
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, &value, &isnull)));
	}
	PG_RETURN_DATUM(value);
}

/* ---- the status view ---- */

/*
 * _outbox_relay_stats() → per route: destination, delivered, retries,
 * delivered/s, breaker state, last error.  Empty without preloading.
 */
Datum
outbox_relay_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	RelayShared *copy;
	List	   *routes;
	ListCell   *lc;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, 0);
	if (!resilience_preloaded || relay_shared == NULL || relay_shared->lock == NULL)
		return (Datum) 0;
	copy = palloc(sizeof(RelayShared));
	LWLockAcquire(relay_shared->lock, LW_SHARED);
	memcpy(copy, relay_shared, sizeof(RelayShared));
	LWLockRelease(relay_shared->lock);

	SPI_connect();
	routes = outbox_load_routes(false, NULL);
	foreach(lc, routes)
	{
		OutboxRoute *r = lfirst(lc);
		RouteStats *st = NULL;
		DestState  *d = NULL;
		Datum		values[8];
		bool		nulls[8] = {0};
		int			i;

		for (i = 0; i < RELAY_MAX_ROUTES; i++)
			if (copy->routes[i].route_id == r->id && copy->routes[i].dbid == MyDatabaseId)
				st = &copy->routes[i];
		if (r->destination)
			for (i = 0; i < RELAY_MAX_DESTS; i++)
				if (strcmp(copy->dests[i].dest, r->destination) == 0)
					d = &copy->dests[i];
		values[0] = Int32GetDatum(r->id);
		values[1] = r->destination ? CStringGetTextDatum(r->destination) : (Datum) 0;
		nulls[1] = r->destination == NULL;
		values[2] = Int64GetDatum(st ? st->delivered : 0);
		values[3] = Int64GetDatum(st ? st->retries : 0);
		nulls[4] = st == NULL;
		if (st)
		{
			/* the current window if it is long enough, else the last one */
			int64		span = now - st->window_start;

			if (span >= USECS_PER_SEC || st->last_window_us == 0)
				values[4] = Float8GetDatum(span > 0 ? st->window_count * 1e6 / span : 0);
			else
				values[4] = Float8GetDatum(st->last_window_count * 1e6 / st->last_window_us);
			if (now - st->window_start > 2 * RATE_WINDOW_US)
				values[4] = Float8GetDatum(0);
		}
		values[5] = CStringGetTextDatum(d ? (d->state == BREAKER_CLOSED && now < d->paused_until ?
											 "paused" : breaker_names[d->state]) : "closed");
		values[6] = TimestampTzGetDatum(d ? (d->state == BREAKER_OPEN ? d->open_until : d->paused_until) : 0);
		nulls[6] = d == NULL || (d->state != BREAKER_OPEN && now >= d->paused_until);
		values[7] = st && st->last_error[0] ? CStringGetTextDatum(st->last_error) : (Datum) 0;
		nulls[7] = !(st && st->last_error[0]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}
