/*-------------------------------------------------------------------------
 *
 * breaker.c
 *		Circuit breakers in shared memory, one per name and database, seen
 *		by every backend: resilience4j's state machine and sliding windows.
 *
 * States and transitions (docs/breakers.md says the same for users)
 * ----------------------
 *	CLOSED		every call is permitted; each recorded outcome enters the
 *				sliding window.  After a record, once the window holds at
 *				least minimum_calls calls (count windows: at least
 *				min(minimum_calls, window_size)), the breaker opens if the
 *				failure rate >= failure_rate_threshold or the slow-call rate
 *				>= slow_call_rate_threshold (a call is slow when its duration
 *				is > slow_call_duration; a slow failure counts in both rates).
 *	OPEN		no call is permitted.  The rates that opened it stay on show.
 *				The first call of any breaker function at or after
 *				open_timeout moves it to HALF_OPEN.
 *	HALF_OPEN	at most half_open_calls probe calls are permitted.  A record
 *				counts as a probe's result only while a probe is in flight
 *				(it completes the oldest one); otherwise it is ignored.  When
 *				half_open_calls results are in, the breaker opens again if a
 *				rate over them reaches its threshold, and closes (with an
 *				empty window) otherwise.  A probe that does not report within
 *				probe_timeout of being permitted frees its slot for another.
 *	FORCED_OPEN, METRICS_ONLY (forced closed, still measuring, never opens),
 *	DISABLED (permits everything, measures nothing): set by the
 *				breaker_force_* functions; breaker_reset forgets the breaker.
 * Records in OPEN, FORCED_OPEN and DISABLED are ignored.  Every transition is
 * logged at LOG with the numbers that caused it.
 *
 * Windows
 * -------
 * A count window keeps the outcomes of the last window_size (<= 1000) calls,
 * two bits each, in a ring.  A time window of window_size (<= 1000) seconds
 * keeps TIME_BUCKETS buckets of ceil(window_size / 60) seconds on the
 * monotonic clock; the window is the current bucket plus the previous
 * ceil(window_size / width) - 1 ones (exactly resilience4j's per-second
 * buckets up to 60 s).  Totals are kept up to date, so a decision is O(1)
 * except when a time window skips over empty buckets (at most 60 steps).
 * Half-open probes are a ring of the times they were permitted (<= 100).
 * Every breaker has the same fixed size, about 1 kB with its key.
 *
 * Configuration
 * -------------
 * Rows of resilience.breaker_config over the resilience.breaker_* defaults.
 * A breaker entry holds the configuration it was last given and the global
 * configuration generation it was read at.  The generation goes up when a
 * transaction that changed breaker_config commits (its statement trigger
 * marks the transaction; an XactCallback increments the generation after the
 * commit is visible) and when a backend sees different defaults after a
 * reload.  A call that finds its entry older than the generation re-reads the
 * row (under the latest snapshot, whatever the caller's isolation level) and
 * stores it unless a newer reading got there first.  So a change applies to
 * every call made after its commit; calls inside the changing transaction
 * keep the configuration in force.  This replaces the per-backend cache and
 * relcache invalidation of rate-limit policies: the configuration has to
 * live in shared memory with the state it shapes.
 *
 * Locking: the partition lock in shared mode and the entry's spinlock for
 * every decision (nothing is called, allocated or raised under the
 * spinlock), except breaker_allow on a breaker that permits everything,
 * which only reads the state under the partition lock; the partition lock
 * exclusively only to create an entry, which reads the configuration first.
 * (last_used is not kept: breakers are never evicted, only swept when idle.)
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"
#include "breaker.h"
#include "metrics.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#define BREAKER_PARTITIONS 16
#define BREAKER_TRANCHE "resilience_breakers"
#define KIND_BREAKER 1
/* A key is the database OID followed by the name. */
#define BREAKER_KEY_LEN ((int) sizeof(Oid) + NAMEDATALEN - 1)

#define MAX_WINDOW 1000
#define TIME_BUCKETS 60
#define MAX_PROBES 100
#define NS_PER_SEC INT64CONST(1000000000)
#define NS_PER_MS INT64CONST(1000000)
#define NO_WAIT (-1)

/* Unlocked reads of an int64 (config_gen) are atomic only on some platforms. */
#ifdef PG_HAVE_8BYTE_SINGLE_COPY_ATOMICITY
#define LOCK_FREE_ALLOW true
#else
#define LOCK_FREE_ALLOW false
#endif

/* Outcome bits of a call in a count window. */
#define OUTCOME_FAILED 1
#define OUTCOME_SLOW 2

typedef enum BreakerState
{
	BS_CLOSED,
	BS_OPEN,
	BS_HALF_OPEN,
	BS_FORCED_OPEN,
	BS_METRICS_ONLY,
	BS_DISABLED
} BreakerState;

static const char *const state_names[] = {
	"closed", "open", "half_open", "forced_open", "metrics_only", "disabled"
};

typedef struct BreakerConfig
{
	double		failure_rate_threshold; /* percent, (0, 100] */
	double		slow_rate_threshold;	/* percent, (0, 100] */
	int64		slow_call_ns;
	int64		open_timeout_ns;
	int64		probe_timeout_ns;
	int32		window_size;
	int32		minimum_calls;
	int32		half_open_calls;
	int32		window_type;	/* ResilienceWindowType */
} BreakerConfig;

typedef struct TimeBucket
{
	int32		calls;
	int32		failures;
	int32		slow;
} TimeBucket;

typedef struct Breaker
{
	BreakerConfig cfg;
	uint64		config_gen;		/* the generation cfg was read at */
	int64		since;			/* clock reading of the last transition */
	uint64		not_permitted;	/* calls refused */
	/* window totals; probe results when half-open; frozen when open */
	int32		calls;
	int32		failures;
	int32		slow;
	int32		state;			/* BreakerState */
	union
	{
		struct
		{
			int32		next;	/* where the next outcome goes */
			int32		filled;
			uint8		outcomes[MAX_WINDOW / 4];
		}			count;
		struct
		{
			int64		width;	/* of a bucket, ns */
			int64		base;	/* newest bucket number (clock / width) */
			int32		nbuckets;
			TimeBucket	buckets[TIME_BUCKETS];	/* bucket n at n % nbuckets */
		}			time;
		struct
		{
			int32		head;	/* oldest probe in flight */
			int32		inflight;
			int32		taken;	/* in flight + reported */
			int64		started[MAX_PROBES];
		}			probes;
	}			u;
} Breaker;

typedef struct BreakerShared
{
	pg_atomic_uint64 config_gen;
	slock_t		mutex;			/* protects defaults */
	BreakerConfig defaults;		/* the defaults last read with */
} BreakerShared;

typedef enum BreakerOp
{
	OP_ALLOW,
	OP_RECORD,
	OP_FORCE_OPEN,
	OP_FORCE_CLOSED,
	OP_DISABLE
} BreakerOp;

/* A transition, copied out of the spinlock to be logged. */
typedef struct Transition
{
	int32		from;
	int32		to;
	int32		calls;
	int32		failures;
	int32		slow;
	int64		held_ns;		/* time spent in `from` */
	BreakerConfig cfg;
} Transition;

/* One operation on a breaker, and what came of it. */
typedef struct BreakerCall
{
	BreakerOp	op;
	bool		success;		/* OP_RECORD */
	int64		duration_ns;	/* OP_RECORD; NO_WAIT when unknown */
	bool		allowed;		/* OP_ALLOW */
	int32		state;			/* after the operation */
	int64		wait_ns;		/* until a probe may pass, or NO_WAIT */
	int			ntransitions;
	Transition	transitions[2]; /* at most one by time, one by the operation */
} BreakerCall;

typedef struct BreakerKey
{
	uint32		hash;
	int			keylen;
	char		key[BREAKER_KEY_LEN];
	char		name[NAMEDATALEN];
} BreakerKey;

static ShmTable *breaker_table = NULL;
static BreakerShared *breaker_shared = NULL;
static SPIPlanPtr config_plan = NULL;
static bool config_changed_in_xact = false;

PG_FUNCTION_INFO_V1(breaker_allow);
PG_FUNCTION_INFO_V1(breaker_record);
PG_FUNCTION_INFO_V1(breaker_guard);
PG_FUNCTION_INFO_V1(breaker_state);
PG_FUNCTION_INFO_V1(breaker_reset);
PG_FUNCTION_INFO_V1(breaker_force_open);
PG_FUNCTION_INFO_V1(breaker_force_closed);
PG_FUNCTION_INFO_V1(breaker_disable);
PG_FUNCTION_INFO_V1(breaker_entries);
PG_FUNCTION_INFO_V1(breaker_sweep);
PG_FUNCTION_INFO_V1(breaker_config_changed);

static void breaker_defaults(BreakerConfig *cfg);

/* ---- shared memory ---- */

/* Shared memory for the breaker table and the configuration generation. */
Size
breaker_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(BreakerShared)),
					shm_table_size(resilience_max_breakers, sizeof(Breaker),
								   BREAKER_KEY_LEN));
}

/* The partition locks of the breaker table. */
void
breaker_shmem_request(void)
{
	shm_table_request_locks(BREAKER_TRANCHE, BREAKER_PARTITIONS);
}

/* Create or attach to the breaker table (AddinShmemInitLock held). */
void
breaker_shmem_init(void)
{
	bool		found;

	breaker_shared = ShmemInitStruct("resilience breakers shared",
									 sizeof(BreakerShared), &found);
	if (!found)
	{
		pg_atomic_init_u64(&breaker_shared->config_gen, 1);
		SpinLockInit(&breaker_shared->mutex);
		breaker_defaults(&breaker_shared->defaults);
	}
	breaker_table = shm_table_init("resilience breakers", resilience_max_breakers,
								   sizeof(Breaker), BREAKER_KEY_LEN,
								   BREAKER_TRANCHE, BREAKER_PARTITIONS);
}

/* ---- the state machine (under the entry spinlock: no errors, no calls) ---- */

/* The outcome bits of call i of a count window. */
static inline int
count_get(Breaker *b, int i)
{
	return (b->u.count.outcomes[i >> 2] >> ((i & 3) * 2)) & 3;
}

/* Store the outcome bits of call i of a count window. */
static inline void
count_set(Breaker *b, int i, int outcome)
{
	uint8	   *byte = &b->u.count.outcomes[i >> 2];
	int			shift = (i & 3) * 2;

	*byte = (uint8) ((*byte & ~(3 << shift)) | (outcome << shift));
}

/* Where bucket n of a time window lives (n may be negative after a restore). */
static inline int
bucket_slot(int64 n, int nbuckets)
{
	int			i = (int) (n % nbuckets);

	return i < 0 ? i + nbuckets : i;
}

/* Empty the window (and the totals), shaped by the configuration. */
static void
window_reset(Breaker *b, int64 now)
{
	b->calls = b->failures = b->slow = 0;
	memset(&b->u, 0, sizeof(b->u));
	if (b->cfg.window_type == WINDOW_TIME)
	{
		int32		width_s = (b->cfg.window_size + TIME_BUCKETS - 1) / TIME_BUCKETS;

		b->u.time.width = width_s * NS_PER_SEC;
		b->u.time.nbuckets = (b->cfg.window_size + width_s - 1) / width_s;
		b->u.time.base = now / b->u.time.width;
	}
}

/* Bring a time window up to now: buckets that fell out leave the totals. */
static void
time_advance(Breaker *b, int64 now)
{
	int64		cur = now / b->u.time.width;
	int			nb = b->u.time.nbuckets;
	int64		n;

	if (cur <= b->u.time.base)
		return;
	for (n = b->u.time.base + 1; n <= cur && n <= b->u.time.base + nb; n++)
	{
		TimeBucket *bucket = &b->u.time.buckets[bucket_slot(n, nb)];

		b->calls -= bucket->calls;
		b->failures -= bucket->failures;
		b->slow -= bucket->slow;
		memset(bucket, 0, sizeof(TimeBucket));
	}
	b->u.time.base = cur;
}

/* Add a call's outcome to the window and its totals. */
static void
window_record(Breaker *b, int outcome, int64 now)
{
	if (b->cfg.window_type == WINDOW_COUNT)
	{
		int			i = b->u.count.next;

		if (b->u.count.filled == b->cfg.window_size)
		{
			int			old = count_get(b, i);

			b->calls--;
			b->failures -= (old & OUTCOME_FAILED) != 0;
			b->slow -= (old & OUTCOME_SLOW) != 0;
		}
		else
			b->u.count.filled++;
		count_set(b, i, outcome);
		b->u.count.next = (i + 1) % b->cfg.window_size;
	}
	else
	{
		TimeBucket *bucket;

		time_advance(b, now);
		bucket = &b->u.time.buckets[bucket_slot(b->u.time.base, b->u.time.nbuckets)];
		bucket->calls++;
		bucket->failures += (outcome & OUTCOME_FAILED) != 0;
		bucket->slow += (outcome & OUTCOME_SLOW) != 0;
	}
	b->calls++;
	b->failures += (outcome & OUTCOME_FAILED) != 0;
	b->slow += (outcome & OUTCOME_SLOW) != 0;
}

/* Does a rate over the counted calls reach its threshold? */
static inline bool
rates_exceed(Breaker *b)
{
	return b->calls > 0 &&
		((double) b->failures * 100.0 >= b->cfg.failure_rate_threshold * b->calls ||
		 (double) b->slow * 100.0 >= b->cfg.slow_rate_threshold * b->calls);
}

/* Move to another state, noting the transition for the log. */
static void
transition(Breaker *b, int32 to, int64 now, BreakerCall *call)
{
	int32		from = b->state;

	if (call->ntransitions < lengthof(call->transitions))
	{
		Transition *t = &call->transitions[call->ntransitions++];

		t->from = from;
		t->to = to;
		t->calls = b->calls;
		t->failures = b->failures;
		t->slow = b->slow;
		t->held_ns = now - b->since;
		t->cfg = b->cfg;
	}

	b->state = to;
	b->since = now;
	if (to == BS_HALF_OPEN || to == BS_DISABLED)
	{
		b->calls = b->failures = b->slow = 0;
		memset(&b->u.probes, 0, sizeof(b->u.probes));
	}
	else if ((to == BS_CLOSED || to == BS_METRICS_ONLY) &&
			 from != BS_CLOSED && from != BS_METRICS_ONLY)
		window_reset(b, now);
	/* OPEN, FORCED_OPEN: the counts stay as they were, frozen */
}

/* Does the state permit every call, with no side effect? */
static inline bool
permits_everything(int32 state)
{
	return state == BS_CLOSED || state == BS_METRICS_ONLY || state == BS_DISABLED;
}

/* Free the slots of probes that did not report within probe_timeout. */
static void
probes_expire(Breaker *b, int64 now)
{
	while (b->u.probes.inflight > 0 &&
		   now - b->u.probes.started[b->u.probes.head] >= b->cfg.probe_timeout_ns)
	{
		b->u.probes.head = (b->u.probes.head + 1) % MAX_PROBES;
		b->u.probes.inflight--;
		b->u.probes.taken--;
	}
}

/*
 * What happens by the passing of time alone: OPEN becomes HALF_OPEN after
 * open_timeout, stale probes free their slots, a time window slides, and a
 * half-open breaker with all its results in decides.
 */
static void
breaker_settle(Breaker *b, int64 now, BreakerCall *call)
{
	if (b->state == BS_OPEN && now - b->since >= b->cfg.open_timeout_ns)
		transition(b, BS_HALF_OPEN, now, call);
	if (b->state == BS_HALF_OPEN)
	{
		probes_expire(b, now);
		if (b->calls >= b->cfg.half_open_calls)
			transition(b, rates_exceed(b) ? BS_OPEN : BS_CLOSED, now, call);
	}
	if ((b->state == BS_CLOSED || b->state == BS_METRICS_ONLY) &&
		b->cfg.window_type == WINDOW_TIME)
		time_advance(b, now);
}

/* When may the next probe be permitted (NO_WAIT: not by time alone)? */
static int64
breaker_wait(Breaker *b, int64 now)
{
	if (b->state == BS_OPEN)
		return b->since + b->cfg.open_timeout_ns - now;
	if (b->state == BS_HALF_OPEN && b->u.probes.taken >= b->cfg.half_open_calls)
		return b->u.probes.inflight > 0 ?
			b->u.probes.started[b->u.probes.head] + b->cfg.probe_timeout_ns - now : 0;
	return NO_WAIT;
}

/* breaker_allow: is a call permitted (taking a probe slot if half-open)? */
static void
breaker_admit(Breaker *b, int64 now, BreakerCall *call)
{
	switch (b->state)
	{
		case BS_CLOSED:
		case BS_METRICS_ONLY:
		case BS_DISABLED:
			call->allowed = true;
			break;
		case BS_HALF_OPEN:
			if (b->u.probes.taken < b->cfg.half_open_calls)
			{
				int			slot = (b->u.probes.head + b->u.probes.inflight) % MAX_PROBES;

				b->u.probes.started[slot] = now;
				b->u.probes.inflight++;
				b->u.probes.taken++;
				call->allowed = true;
			}
			break;
		default:				/* OPEN, FORCED_OPEN */
			break;
	}
	if (!call->allowed)
		b->not_permitted++;
}

/* breaker_record: count an outcome where the state says to, and decide. */
static void
breaker_outcome(Breaker *b, int64 now, BreakerCall *call)
{
	int			outcome = (call->success ? 0 : OUTCOME_FAILED) |
		(call->duration_ns > b->cfg.slow_call_ns ? OUTCOME_SLOW : 0);

	switch (b->state)
	{
		case BS_CLOSED:
			window_record(b, outcome, now);
			if (b->calls >= (b->cfg.window_type == WINDOW_COUNT ?
							 Min(b->cfg.minimum_calls, b->cfg.window_size) :
							 b->cfg.minimum_calls) &&
				rates_exceed(b))
				transition(b, BS_OPEN, now, call);
			break;
		case BS_METRICS_ONLY:
			window_record(b, outcome, now);
			break;
		case BS_HALF_OPEN:
			if (b->u.probes.inflight == 0)
				break;			/* not a probe's result */
			b->u.probes.head = (b->u.probes.head + 1) % MAX_PROBES;
			b->u.probes.inflight--;
			b->calls++;
			b->failures += (outcome & OUTCOME_FAILED) != 0;
			b->slow += (outcome & OUTCOME_SLOW) != 0;
			if (b->calls >= b->cfg.half_open_calls)
				transition(b, rates_exceed(b) ? BS_OPEN : BS_CLOSED, now, call);
			break;
		default:				/* OPEN, FORCED_OPEN, DISABLED */
			break;
	}
}

/* Carry out one operation on a breaker. */
static void
breaker_apply(Breaker *b, int64 now, BreakerCall *call)
{
	now = Max(now, b->since);	/* another backend may have read later */
	call->allowed = false;
	call->ntransitions = 0;
	breaker_settle(b, now, call);
	switch (call->op)
	{
		case OP_ALLOW:
			breaker_admit(b, now, call);
			break;
		case OP_RECORD:
			breaker_outcome(b, now, call);
			break;
		case OP_FORCE_OPEN:
			if (b->state != BS_FORCED_OPEN)
				transition(b, BS_FORCED_OPEN, now, call);
			break;
		case OP_FORCE_CLOSED:
			if (b->state != BS_METRICS_ONLY)
				transition(b, BS_METRICS_ONLY, now, call);
			break;
		case OP_DISABLE:
			if (b->state != BS_DISABLED)
				transition(b, BS_DISABLED, now, call);
			break;
	}
	call->state = b->state;
	call->wait_ns = breaker_wait(b, now);
}

/* Give a breaker a configuration read at generation gen. */
static void
breaker_configure(Breaker *b, const BreakerConfig *cfg, uint64 gen, int64 now)
{
	bool		reshaped = cfg->window_type != b->cfg.window_type ||
		cfg->window_size != b->cfg.window_size;

	b->cfg = *cfg;
	b->config_gen = gen;
	if (reshaped && (b->state == BS_CLOSED || b->state == BS_METRICS_ONLY))
		window_reset(b, now);
}

/* ---- configuration ---- */

/* The configuration the resilience.breaker_* settings give. */
static void
breaker_defaults(BreakerConfig *cfg)
{
	memset(cfg, 0, sizeof(BreakerConfig));
	cfg->failure_rate_threshold = resilience_breaker_failure_rate_threshold;
	cfg->slow_rate_threshold = resilience_breaker_slow_call_rate_threshold;
	cfg->slow_call_ns = resilience_breaker_slow_call_duration_ms * NS_PER_MS;
	cfg->open_timeout_ns = resilience_breaker_open_timeout_ms * NS_PER_MS;
	cfg->probe_timeout_ns = resilience_breaker_probe_timeout_ms * NS_PER_MS;
	cfg->window_type = resilience_breaker_window_type;
	cfg->window_size = resilience_breaker_window_size;
	cfg->minimum_calls = resilience_breaker_minimum_calls;
	cfg->half_open_calls = resilience_breaker_half_open_calls;
}

/*
 * After a reload changed this backend's defaults, make every breaker re-read
 * its configuration (unless another backend already did so for the same
 * defaults).
 */
static void
breaker_check_defaults(void)
{
	BreakerConfig mine;
	bool		changed;

	if (!resilience_breaker_defaults_changed)
		return;
	resilience_breaker_defaults_changed = false;
	breaker_defaults(&mine);
	SpinLockAcquire(&breaker_shared->mutex);
	changed = memcmp(&mine, &breaker_shared->defaults, sizeof(BreakerConfig)) != 0;
	if (changed)
		breaker_shared->defaults = mine;
	SpinLockRelease(&breaker_shared->mutex);
	if (changed)
		pg_atomic_fetch_add_u64(&breaker_shared->config_gen, 1);
}

/* Column col of the configuration row into *d; false if it is NULL. */
static bool
config_column(int col, Datum *d)
{
	bool		isnull;

	*d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, &isnull);
	return !isnull;
}

/*
 * A breaker's configuration: its row of resilience.breaker_config as last
 * committed (the table's CHECK constraints validated it), NULL columns and
 * missing rows taking the defaults.  The row is read as the table's owner
 * (privilege.c), so callers need no privilege on it, with every name in the
 * query qualified and search_path pinned.
 */
static void
breaker_load_config(const char *name, BreakerConfig *cfg)
{
	ResilienceUser save;
	Datum		values[1];
	Datum		d;
	int			ret;

	breaker_defaults(cfg);
	values[0] = CStringGetTextDatum(name);
	resilience_become_owner(true, &save);
	SPI_connect();
	if (config_plan == NULL)
	{
		Oid			argtypes[1] = {TEXTOID};
		SPIPlanPtr	plan;

		plan = SPI_prepare("SELECT failure_rate_threshold, slow_call_rate_threshold,"
						   " slow_call_duration, window_type, window_size, minimum_calls,"
						   " open_timeout, half_open_calls, probe_timeout"
						   " FROM resilience.breaker_config"
						   " WHERE name OPERATOR(pg_catalog.=) $1",
						   1, argtypes);
		if (plan == NULL)
			elog(ERROR, "could not prepare the query of resilience.breaker_config: %s",
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		config_plan = plan;
	}
	ret = SPI_execute_snapshot(config_plan, values, NULL, GetLatestSnapshot(),
							   InvalidSnapshot, true, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read resilience.breaker_config: %s",
			 SPI_result_code_string(ret));
	if (SPI_processed > 0)
	{
		if (config_column(1, &d))
			cfg->failure_rate_threshold = DatumGetFloat8(d);
		if (config_column(2, &d))
			cfg->slow_rate_threshold = DatumGetFloat8(d);
		if (config_column(3, &d))
			cfg->slow_call_ns = resilience_interval_usec(DatumGetIntervalP(d)) * 1000;
		if (config_column(4, &d))
			cfg->window_type = strcmp(TextDatumGetCString(d), "time") == 0 ?
				WINDOW_TIME : WINDOW_COUNT;
		if (config_column(5, &d))
			cfg->window_size = DatumGetInt32(d);
		if (config_column(6, &d))
			cfg->minimum_calls = DatumGetInt32(d);
		if (config_column(7, &d))
			cfg->open_timeout_ns = resilience_interval_usec(DatumGetIntervalP(d)) * 1000;
		if (config_column(8, &d))
			cfg->half_open_calls = DatumGetInt32(d);
		if (config_column(9, &d))
			cfg->probe_timeout_ns = resilience_interval_usec(DatumGetIntervalP(d)) * 1000;
	}
	SPI_finish();
	resilience_restore_user(&save);
}

/* At commit of a change to breaker_config, every breaker re-reads its row. */
static void
breaker_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_PREPARE:
			if (config_changed_in_xact)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that changed resilience.breaker_config"),
						 errdetail("Breakers learn of a change when the session that made it commits."),
						 errhint("Change breaker_config in an ordinary transaction.")));
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (config_changed_in_xact && breaker_shared != NULL)
				pg_atomic_fetch_add_u64(&breaker_shared->config_gen, 1);
			config_changed_in_xact = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			config_changed_in_xact = false;
			break;
		default:
			break;
	}
}

/* Statement trigger on breaker_config: breakers re-read it at commit. */
Datum
breaker_config_changed(PG_FUNCTION_ARGS)
{
	static bool registered = false;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "breaker_config_changed must be called as a trigger");
	if (!registered)
	{
		RegisterXactCallback(breaker_xact_callback, NULL);
		registered = true;
	}
	config_changed_in_xact = true;
	return PointerGetDatum(NULL);
}

/* ---- operations ---- */

/* The table key of a breaker of this database (name already checked). */
static void
breaker_key_of(const char *name, BreakerKey *k)
{
	int			len = strlen(name);

	Assert(len > 0 && len < NAMEDATALEN);
	memcpy(k->name, name, len + 1);
	memcpy(k->key, &MyDatabaseId, sizeof(Oid));
	memcpy(k->key + sizeof(Oid), name, len);
	k->keylen = sizeof(Oid) + len;
	k->hash = shm_table_hash(KIND_BREAKER, k->key, k->keylen);
}

/* The breaker named by argument argno (22004, 22023 for bad names). */
static void
breaker_key_arg(FunctionCallInfo fcinfo, int argno, BreakerKey *k)
{
	char		name[NAMEDATALEN];

	resilience_arg_name(fcinfo, argno, "circuit breaker name", name);
	breaker_key_of(name, k);
}

/* Log a transition at LOG with the numbers that caused it. */
static void
breaker_log(const char *name, Transition *t)
{
	double		fr = t->calls > 0 ? t->failures * 100.0 / t->calls : 0;
	double		sr = t->calls > 0 ? t->slow * 100.0 / t->calls : 0;

	if (t->to == BS_OPEN && t->from == BS_CLOSED)
		ereport(LOG,
				(errmsg("circuit breaker \"%s\" opened: failure rate %.1f%% (%d of %d calls), slow-call rate %.1f%% (%d of %d); thresholds %g%% and %g%%",
						name, fr, t->failures, t->calls, sr, t->slow, t->calls,
						t->cfg.failure_rate_threshold, t->cfg.slow_rate_threshold)));
	else if (t->to == BS_OPEN)
		ereport(LOG,
				(errmsg("circuit breaker \"%s\" opened again: failure rate %.1f%% (%d of %d probe calls), slow-call rate %.1f%% (%d of %d); thresholds %g%% and %g%%",
						name, fr, t->failures, t->calls, sr, t->slow, t->calls,
						t->cfg.failure_rate_threshold, t->cfg.slow_rate_threshold)));
	else if (t->to == BS_HALF_OPEN)
		ereport(LOG,
				(errmsg("circuit breaker \"%s\" is half-open after %s open: up to %d probe calls are permitted",
						name, resilience_interval_text(t->held_ns / 1000),
						t->cfg.half_open_calls)));
	else if (t->to == BS_CLOSED)
		ereport(LOG,
				(errmsg("circuit breaker \"%s\" closed: failure rate %.1f%% (%d of %d probe calls), slow-call rate %.1f%% (%d of %d); thresholds %g%% and %g%%",
						name, fr, t->failures, t->calls, sr, t->slow, t->calls,
						t->cfg.failure_rate_threshold, t->cfg.slow_rate_threshold)));
	else
		ereport(LOG,
				(errmsg("circuit breaker \"%s\" is now %s (was %s)",
						name, state_names[t->to], state_names[t->from])));
}

/*
 * Carry out call on the breaker, creating it (53200 when max_breakers are in
 * use) and (re)reading its configuration first when needed.
 */
static void
breaker_run(BreakerKey *k, BreakerCall *call)
{
	LWLock	   *lock = shm_table_lock(breaker_table, k->hash);
	ShmEntry   *entry;
	BreakerConfig cfg;
	uint64		gen;
	bool		found;
	bool		done = false;

	breaker_check_defaults();
	gen = pg_atomic_read_u64(&breaker_shared->config_gen);

	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(breaker_table, k->hash, KIND_BREAKER, k->key, k->keylen);
	if (entry)
	{
		Breaker	   *b = shm_entry_payload(breaker_table, entry);
		bool		current;

		/*
		 * Asking a breaker that permits everything (closed, metrics_only,
		 * disabled) changes nothing: unlocked reads of its state and
		 * generation answer, ordered before or after any transition racing
		 * with them.  Everything else takes the spinlock.
		 */
		current = b->config_gen >= gen || config_changed_in_xact;
		if (LOCK_FREE_ALLOW && call->op == OP_ALLOW && current &&
			permits_everything(((volatile Breaker *) b)->state))
		{
			call->allowed = true;
			call->state = ((volatile Breaker *) b)->state;
			call->wait_ns = NO_WAIT;
			call->ntransitions = 0;
			done = true;
		}
		else
		{
			int64		now = resilience_clock_ns();

			SpinLockAcquire(&entry->mutex);
			if (b->config_gen >= gen || config_changed_in_xact)
			{
				breaker_apply(b, now, call);
				if (!entry->referenced)
					entry->referenced = true;
				done = true;
			}
			SpinLockRelease(&entry->mutex);
		}
	}
	LWLockRelease(lock);

	if (!done)
	{
		int64		now;

		/*
		 * Read the configuration before locking anything.  Inside a
		 * transaction that changed it, the row read may never commit: such
		 * a new entry takes generation 0, so the next call reads it again.
		 */
		breaker_load_config(k->name, &cfg);
		if (config_changed_in_xact)
			gen = 0;
		entry = shm_table_enter(breaker_table, k->hash, KIND_BREAKER, k->key,
								k->keylen, false, NULL, &found);
		if (entry == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("circuit breaker table is full"),
					 errdetail("All %d breakers (resilience.max_breakers) are in use; breaker \"%s\" cannot be created.",
							   resilience_max_breakers, k->name),
					 errhint("Raise resilience.max_breakers (server restart), or forget unused breakers with breaker_reset().")));
		now = resilience_clock_ns();
		SpinLockAcquire(&entry->mutex);
		{
			Breaker	   *b = shm_entry_payload(breaker_table, entry);

			if (!found)
			{
				b->cfg = cfg;
				b->config_gen = gen;
				b->state = BS_CLOSED;
				b->since = now;
				window_reset(b, now);
			}
			else if (gen > b->config_gen)
				breaker_configure(b, &cfg, gen, now);
			breaker_apply(b, now, call);
			entry->referenced = true;
		}
		SpinLockRelease(&entry->mutex);
		LWLockRelease(lock);
	}

	for (int i = 0; i < call->ntransitions; i++)
	{
		breaker_log(k->name, &call->transitions[i]);
		metrics_add(RC_BREAKER_TRANSITIONS, call->transitions[i].to, k->name, 1);
	}
	if (call->op == OP_RECORD)
		metrics_add(RC_BREAKER_CALLS, call->success ? RV_SUCCESS : RV_FAILURE, k->name, 1);
	else if (call->op == OP_ALLOW && !call->allowed)
		metrics_add(RC_BREAKER_CALLS, RV_NOT_PERMITTED, k->name, 1);
}

/* Refuse a call: RS002, with the time until the next probe. */
static void
breaker_refuse(const char *name, BreakerCall *call)
{
	if (call->state == BS_FORCED_OPEN)
		ereport(ERROR,
				(errcode(ERRCODE_CIRCUIT_BREAKER_OPEN),
				 errmsg("circuit breaker \"%s\" is forced open", name),
				 errdetail("No call is permitted until breaker_reset() or breaker_force_closed() is called for it."),
				 errhint("Fail fast: do not call the dependency, and do not retry.")));
	if (call->state == BS_HALF_OPEN)
		ereport(ERROR,
				(errcode(ERRCODE_CIRCUIT_BREAKER_OPEN),
				 errmsg("circuit breaker \"%s\" is half-open and all its probe calls are taken", name),
				 errdetail("A probe call is permitted when one reports, or in %s at the latest.",
						   resilience_interval_text(call->wait_ns / 1000)),
				 errhint("Fail fast: do not call the dependency, and do not retry until then.")));
	ereport(ERROR,
			(errcode(ERRCODE_CIRCUIT_BREAKER_OPEN),
			 errmsg("circuit breaker \"%s\" is open", name),
			 errdetail("The next probe call is permitted in %s.",
					   resilience_interval_text(call->wait_ns / 1000)),
			 errhint("Fail fast: do not call the dependency, and do not retry until then.")));
}

/* Ask for a call (a probe slot if half-open); RS002 if refused and raise. */
static bool
breaker_ask(BreakerKey *k, bool raise)
{
	BreakerCall call = {OP_ALLOW};

	breaker_run(k, &call);
	if (!call.allowed && raise)
		breaker_refuse(k->name, &call);
	return call.allowed;
}

/* Report an outcome; duration_ns is NO_WAIT when unknown. */
static void
breaker_report(BreakerKey *k, bool success, int64 duration_ns)
{
	BreakerCall call = {OP_RECORD};

	call.success = success;
	call.duration_ns = duration_ns;
	breaker_run(k, &call);
}

/* breaker_guard for C callers (the retry procedure). */
void
breaker_guard_name(const char *name)
{
	BreakerKey	k;

	resilience_require_preload("breaker_guard");
	breaker_key_of(name, &k);
	breaker_ask(&k, true);
}

/* breaker_record for C callers (the retry procedure). */
void
breaker_record_name(const char *name, bool success, int64 duration_usec)
{
	BreakerKey	k;

	resilience_require_preload("breaker_record");
	breaker_key_of(name, &k);
	breaker_report(&k, success, duration_usec < 0 ? NO_WAIT : duration_usec * 1000);
}

/* breaker_allow(name) → may a call be made now? (Takes a probe slot.) */
Datum
breaker_allow(PG_FUNCTION_ARGS)
{
	BreakerKey	k;

	resilience_require_preload("breaker_allow");
	breaker_key_arg(fcinfo, 0, &k);
	PG_RETURN_BOOL(breaker_ask(&k, false));
}

/* breaker_guard(name): like breaker_allow, but raises RS002 when refused. */
Datum
breaker_guard(PG_FUNCTION_ARGS)
{
	BreakerKey	k;

	resilience_require_preload("breaker_guard");
	breaker_key_arg(fcinfo, 0, &k);
	breaker_ask(&k, true);
	PG_RETURN_VOID();
}

/* breaker_record(name, success, duration): report a call's outcome. */
Datum
breaker_record(PG_FUNCTION_ARGS)
{
	BreakerKey	k;

	resilience_require_preload("breaker_record");
	breaker_key_arg(fcinfo, 0, &k);
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("success must not be null"),
				 errhint("Pass true for a call that succeeded, false for one that failed.")));
	breaker_report(&k, PG_GETARG_BOOL(1), PG_ARGISNULL(2) ? NO_WAIT :
				   resilience_arg_duration(fcinfo, 2, "duration", true) * 1000);
	PG_RETURN_VOID();
}

/* The breaker_force_* functions: put the named breaker in a forced state. */
static Datum
breaker_force(FunctionCallInfo fcinfo, BreakerOp op, const char *fn)
{
	BreakerKey	k;
	BreakerCall call = {op};

	resilience_require_preload(fn);
	breaker_key_arg(fcinfo, 0, &k);
	breaker_run(&k, &call);
	PG_RETURN_VOID();
}

/* breaker_force_open(name): refuse every call until reset or forced closed. */
Datum
breaker_force_open(PG_FUNCTION_ARGS)
{
	return breaker_force(fcinfo, OP_FORCE_OPEN, "breaker_force_open");
}

/* breaker_force_closed(name): permit every call, keep measuring, never open. */
Datum
breaker_force_closed(PG_FUNCTION_ARGS)
{
	return breaker_force(fcinfo, OP_FORCE_CLOSED, "breaker_force_closed");
}

/* breaker_disable(name): permit every call and measure nothing. */
Datum
breaker_disable(PG_FUNCTION_ARGS)
{
	return breaker_force(fcinfo, OP_DISABLE, "breaker_disable");
}

/*
 * A copy of a breaker's state as the next call would see it (the passage of
 * time applied, nothing logged or stored); false if it does not exist.
 */
static bool
breaker_peek(BreakerKey *k, Breaker *copy, int64 *now)
{
	LWLock	   *lock = shm_table_lock(breaker_table, k->hash);
	ShmEntry   *entry;
	BreakerCall ignored = {0};

	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(breaker_table, k->hash, KIND_BREAKER, k->key, k->keylen);
	if (entry)
	{
		SpinLockAcquire(&entry->mutex);
		memcpy(copy, shm_entry_payload(breaker_table, entry), sizeof(Breaker));
		SpinLockRelease(&entry->mutex);
	}
	LWLockRelease(lock);
	if (entry == NULL)
		return false;
	*now = Max(resilience_clock_ns(), copy->since);
	breaker_settle(copy, *now, &ignored);
	return true;
}

/* breaker_state(name) → its state; 'closed' for a breaker never used. */
Datum
breaker_state(PG_FUNCTION_ARGS)
{
	BreakerKey	k;
	Breaker		copy;
	int64		now;

	resilience_require_preload("breaker_state");
	breaker_key_arg(fcinfo, 0, &k);
	if (!breaker_peek(&k, &copy, &now))
		PG_RETURN_TEXT_P(cstring_to_text(state_names[BS_CLOSED]));
	PG_RETURN_TEXT_P(cstring_to_text(state_names[copy.state]));
}

/* breaker_reset(name) → forget the breaker; true if it existed. */
Datum
breaker_reset(PG_FUNCTION_ARGS)
{
	BreakerKey	k;
	Breaker		copy;
	int64		now;
	bool		existed;

	resilience_require_preload("breaker_reset");
	breaker_key_arg(fcinfo, 0, &k);
	existed = breaker_peek(&k, &copy, &now);
	if (existed &&
		shm_table_remove(breaker_table, k.hash, KIND_BREAKER, k.key, k.keylen) &&
		copy.state != BS_CLOSED)
	{
		ereport(LOG,
				(errmsg("circuit breaker \"%s\" was reset (was %s)",
						k.name, state_names[copy.state])));
		metrics_add(RC_BREAKER_TRANSITIONS, BS_CLOSED, k.name, 1);
	}
	PG_RETURN_BOOL(existed);
}

/* ---- the view ---- */

typedef struct BreakerCopy
{
	char		name[NAMEDATALEN];
	Breaker		b;
} BreakerCopy;

/* shm_table_visit callback: copy the breakers of this database. */
static void
copy_breaker(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	List	  **list = (List **) arg;
	BreakerCopy *copy;
	Oid			dbid;

	memcpy(&dbid, key, sizeof(Oid));
	if (dbid != MyDatabaseId)
		return;
	copy = palloc(sizeof(BreakerCopy));
	memcpy(copy->name, key + sizeof(Oid), entry->keylen - sizeof(Oid));
	copy->name[entry->keylen - sizeof(Oid)] = '\0';
	SpinLockAcquire(&entry->mutex);
	memcpy(&copy->b, payload, sizeof(Breaker));
	SpinLockRelease(&entry->mutex);
	*list = lappend(*list, copy);
}

/*
 * breaker_entries() → the rows of the breakers view: the breakers of this
 * database as the next call would see them.
 */
Datum
breaker_entries(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	List	   *list = NIL;
	ListCell   *lc;
	TimestampTz wall_now = GetCurrentTimestamp();

	resilience_require_preload("breakers");
	InitMaterializedSRF(fcinfo, 0);
	shm_table_visit(breaker_table, copy_breaker, &list);

	foreach(lc, list)
	{
		BreakerCopy *c = lfirst(lc);
		Breaker	   *b = &c->b;
		int64		now = Max(resilience_clock_ns(), b->since);
		BreakerCall ignored = {0};
		int64		wait;
		Datum		values[13];
		bool		nulls[13] = {0};

		breaker_settle(b, now, &ignored);
		wait = breaker_wait(b, now);
		values[0] = CStringGetTextDatum(c->name);
		values[1] = CStringGetTextDatum(state_names[b->state]);
		values[2] = Float8GetDatum(b->calls > 0 ? b->failures * 100.0 / b->calls : 0);
		nulls[2] = b->calls == 0;
		values[3] = Float8GetDatum(b->calls > 0 ? b->slow * 100.0 / b->calls : 0);
		nulls[3] = nulls[2];
		values[4] = Int32GetDatum(b->calls);
		values[5] = Int32GetDatum(b->failures);
		values[6] = Int32GetDatum(b->slow);
		values[7] = Int64GetDatum((int64) b->not_permitted);
		values[8] = Int32GetDatum(b->state == BS_HALF_OPEN ? b->u.probes.inflight : 0);
		values[9] = CStringGetTextDatum(b->cfg.window_type == WINDOW_TIME ? "time" : "count");
		values[10] = Int32GetDatum(b->cfg.window_size);
		values[11] = TimestampTzGetDatum(wall_now - (now - b->since) / 1000);
		values[12] = TimestampTzGetDatum(wall_now + wait / 1000);
		nulls[12] = wait == NO_WAIT;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* A closed breaker with an empty window holds nothing worth keeping. */
static bool
breaker_idle(ShmEntry *entry, void *payload, int64 now)
{
	Breaker	   *b = (Breaker *) payload;

	if (b->state == BS_CLOSED && b->cfg.window_type == WINDOW_TIME)
		time_advance(b, Max(now, b->since));
	return b->state == BS_CLOSED && b->calls == 0;
}

/*
 * breaker_sweep() → breakers forgotten: closed ones with an empty window
 * not used since the previous sweep.  Part of run_reaper(); 0 without
 * preloading.
 */
Datum
breaker_sweep(PG_FUNCTION_ARGS)
{
	if (!resilience_preloaded || breaker_table == NULL)
		PG_RETURN_INT64(0);
	PG_RETURN_INT64(shm_table_sweep(breaker_table, breaker_idle));
}

/* ---- the state file (called in the postmaster, single process) ---- */

/*
 * A breaker as saved: its state with clock readings turned into ages, a time
 * window's buckets oldest first, probes in flight dropped (their backends are
 * gone).  The configuration is read again from breaker_config at first use.
 */
typedef struct BreakerSaved
{
	uint16		keylen;
	int64		since_age;
	Breaker		b;
} BreakerSaved;

/* shm_table_visit callback: count a breaker, or write it to the state file. */
static void
save_breaker(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	StateSaveContext *ctx = (StateSaveContext *) arg;
	BreakerSaved rec;
	Breaker	   *b = &rec.b;

	memset(&rec, 0, sizeof(rec));
	memcpy(b, payload, sizeof(Breaker));
	rec.keylen = entry->keylen;
	rec.since_age = Max(ctx->now - b->since, 0);
	if ((b->state == BS_CLOSED || b->state == BS_METRICS_ONLY) &&
		b->cfg.window_type == WINDOW_TIME)
	{
		TimeBucket	ordered[TIME_BUCKETS];
		int			nb = b->u.time.nbuckets;
		int			i;

		time_advance(b, Max(ctx->now, b->since));
		for (i = 0; i < nb; i++)
			ordered[i] = b->u.time.buckets[bucket_slot(b->u.time.base - nb + 1 + i, nb)];
		memcpy(b->u.time.buckets, ordered, sizeof(TimeBucket) * nb);
	}
	if (ctx->file)
		ctx->ok = ctx->ok && state_write(ctx->file, &rec, sizeof(rec)) &&
			state_write(ctx->file, key, entry->keylen);
	ctx->count++;
}

/* Write the breaker section of the state file. */
bool
breaker_state_save(FILE *file)
{
	return state_save_table(file, STATE_SECTION_BREAKER, breaker_table, save_breaker);
}

/* Is a saved breaker something this version could have written? */
static bool
breaker_saved_valid(BreakerSaved *rec)
{
	Breaker	   *b = &rec->b;

	return rec->keylen > sizeof(Oid) && rec->keylen <= BREAKER_KEY_LEN &&
		b->state >= BS_CLOSED && b->state <= BS_DISABLED &&
		(b->cfg.window_type == WINDOW_COUNT || b->cfg.window_type == WINDOW_TIME) &&
		b->cfg.window_size >= 1 && b->cfg.window_size <= MAX_WINDOW &&
		b->cfg.half_open_calls >= 1 && b->cfg.half_open_calls <= MAX_PROBES &&
		b->calls >= 0 && b->failures >= 0 && b->slow >= 0 &&
		b->failures <= b->calls && b->slow <= b->calls &&
		rec->since_age >= 0 &&
		((b->state != BS_CLOSED && b->state != BS_METRICS_ONLY) ||
		 b->cfg.window_type != WINDOW_COUNT ||
		 (b->u.count.next >= 0 && b->u.count.next < b->cfg.window_size &&
		  b->u.count.filled >= 0 && b->u.count.filled <= b->cfg.window_size)) &&
		((b->state != BS_CLOSED && b->state != BS_METRICS_ONLY) ||
		 b->cfg.window_type != WINDOW_TIME ||
		 (b->u.time.nbuckets >= 1 && b->u.time.nbuckets <= TIME_BUCKETS &&
		  b->u.time.width > 0));
}

/* Restore saved breakers; downtime does not count towards open_timeout. */
bool
breaker_state_load(FILE *file, uint32 nrecords)
{
	char		key[BREAKER_KEY_LEN];
	int64		now = resilience_clock_ns();
	uint32		i;

	for (i = 0; i < nrecords; i++)
	{
		BreakerSaved rec;
		ShmEntry   *entry;
		Breaker	   *b;
		bool		found;

		if (!state_read(file, &rec, sizeof(rec)) ||
			!breaker_saved_valid(&rec) ||
			!state_read(file, key, rec.keylen))
			return false;

		entry = shm_table_enter(breaker_table,
								shm_table_hash(KIND_BREAKER, key, rec.keylen),
								KIND_BREAKER, key, rec.keylen, false, NULL, &found);
		if (entry == NULL)
			continue;			/* max_breakers was lowered: keep what fits */
		b = shm_entry_payload(breaker_table, entry);
		memcpy(b, &rec.b, sizeof(Breaker));
		b->config_gen = 0;
		b->since = now - rec.since_age;
		if (b->state == BS_HALF_OPEN)
		{
			b->u.probes.head = 0;
			b->u.probes.inflight = 0;
			b->u.probes.taken = b->calls;
		}
		else if ((b->state == BS_CLOSED || b->state == BS_METRICS_ONLY) &&
				 b->cfg.window_type == WINDOW_TIME)
		{
			TimeBucket	ordered[TIME_BUCKETS];
			int			nb = b->u.time.nbuckets;
			int			j;

			memcpy(ordered, b->u.time.buckets, sizeof(TimeBucket) * nb);
			b->u.time.base = now / b->u.time.width;
			for (j = 0; j < nb; j++)
				b->u.time.buckets[bucket_slot(b->u.time.base - nb + 1 + j, nb)] = ordered[j];
		}
		entry->last_used = now;
		entry->referenced = false;
		LWLockRelease(shm_table_lock(breaker_table, entry->hash));
	}
	return true;
}
