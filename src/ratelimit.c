/*-------------------------------------------------------------------------
 *
 * ratelimit.c
 *		Per-key rate limits in shared memory: token buckets, sliding
 *		windows, named policies, and the rate_limits view.
 *
 * Every key is an entry of one shared keyed table (shmem.c) of
 * resilience.max_keys entries.  A decision takes the key's partition lock in
 * shared mode and the entry's spinlock for a few arithmetic instructions;
 * nothing else is locked, allocated or called on that path.
 *
 * Token bucket: tokens (a double, so fractional refills are kept) and the
 * time they were last brought up to date.  Refills use the monotonic clock;
 * a wall-clock step cannot add tokens.  Concurrent callers may read the clock
 * in a different order than they take the spinlock, so time never runs
 * backwards for a bucket: an older reading refills nothing.
 *
 * Sliding window: WINDOW_SLOTS counters of width window / (WINDOW_SLOTS - 1)
 * on the monotonic clock.  A request is admitted when the counts of every slot
 * that overlaps the last window, plus its cost, stay within max.  Counting the
 * whole oldest slot over-counts, never under-counts, so no window-long
 * interval ever holds more than max admitted requests; the price is that up to
 * 1/(WINDOW_SLOTS - 1) of a window's capacity may be refused near its edge.
 *
 * A full table (resilience.when_full = evict) gives a new key only an entry
 * whose state equals a fresh one (rate_entry_idle): a depleted bucket or a
 * counting window is never evicted, so creating keys cannot reset a limit.
 * When there is no such entry, the new key is refused untracked, as with
 * deny.
 *
 * Named policies are rows of resilience.rate_limit_policies, cached per
 * backend and dropped from the cache by a relcache invalidation that a
 * statement trigger on the table sends at commit.
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"
#include "metrics.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#define WINDOW_SLOTS 16
#define RATELIMIT_PARTITIONS 128
#define RATELIMIT_TRANCHE "resilience_rate_limits"

/* Keys of policies carry the policy name, a NUL, then the caller's key. */
#define KIND_BUCKET 1
#define KIND_WINDOW 2
/*
 * The relay's route buckets (rate_limit_take_internal): a kind no SQL
 * function asks for, so no key a caller passes reaches them.
 */
#define KIND_INTERNAL_BUCKET 3
#define IS_BUCKET(kind) ((kind) != KIND_WINDOW)

/* Slack for floating-point refills: 1e-9 of a token. */
#define TOKEN_EPSILON 1e-9
#define NS_PER_SEC 1e9
#define NS_PER_MS INT64CONST(1000000)
/* Longest window accepted. */
#define MAX_WINDOW_NS (INT64CONST(366) * 86400 * INT64CONST(1000000000))
#define NEVER (-1)

typedef struct RateState
{
	uint64		allowed;
	uint64		denied;
	int32		limit;			/* bucket capacity or window max */
	union
	{
		struct
		{
			double		tokens;
			double		rate;	/* tokens per second */
			int64		stamp;	/* clock reading tokens are up to date with */
		}			bucket;
		struct
		{
			int64		slot_ns;
			int64		base;	/* newest slot number (clock / slot_ns) */
			int32		counts[WINDOW_SLOTS];	/* slot n lives at n % WINDOW_SLOTS */
		}			window;
	}			u;
} RateState;

/* What a decision tells the caller; NEVER for waits that do not end. */
typedef struct RateDecision
{
	bool		allowed;
	int32		remaining;
	int32		limit;
	int64		retry_after_ms;
	int64		reset_after_ms;
} RateDecision;

/* A parsed, validated request. */
typedef struct RateRequest
{
	uint8		kind;
	int32		limit;
	double		rate;			/* buckets */
	int64		window_ns;		/* windows */
	int32		cost;
	pg_atomic_uint64 *counters[2];	/* a policy's decisions; NULL: inline */
	int			keylen;
	char		key[1024 + NAMEDATALEN];
} RateRequest;

typedef struct PolicyCacheEntry
{
	char		name[NAMEDATALEN];
	int32		capacity;
	double		rate;
	int64		window_ns;		/* 0 for token-bucket policies */
	pg_atomic_uint64 *counters[2];	/* its decisions, allowed and denied */
} PolicyCacheEntry;

static ShmTable *rate_table = NULL;
static HTAB *policy_cache = NULL;
static Oid	policy_relid = InvalidOid;

PG_FUNCTION_INFO_V1(rate_limit);
PG_FUNCTION_INFO_V1(rate_limit_check);
PG_FUNCTION_INFO_V1(rate_limit_policy);
PG_FUNCTION_INFO_V1(rate_limit_policy_check);
PG_FUNCTION_INFO_V1(window_limit);
PG_FUNCTION_INFO_V1(window_limit_check);
PG_FUNCTION_INFO_V1(rate_limit_reset);
PG_FUNCTION_INFO_V1(rate_limit_entries);
PG_FUNCTION_INFO_V1(rate_limit_sweep);
PG_FUNCTION_INFO_V1(rate_limit_policies_changed);

/* ---- shared memory ---- */

Size
ratelimit_shmem_size(void)
{
	return shm_table_size(resilience_max_keys, sizeof(RateState),
						  resilience_max_key_length);
}

void
ratelimit_shmem_request(void)
{
	shm_table_request_locks(RATELIMIT_TRANCHE, RATELIMIT_PARTITIONS);
}

void
ratelimit_shmem_init(void)
{
	rate_table = shm_table_init("resilience rate limits", resilience_max_keys,
								sizeof(RateState), resilience_max_key_length,
								RATELIMIT_TRANCHE, RATELIMIT_PARTITIONS);
}

/* ---- the arithmetic (runs under the entry spinlock: no errors, no calls) ---- */

/* Milliseconds to wait for `need` more tokens at `rate`, rounded up. */
static inline int64
wait_ms(double need, double rate)
{
	double		ms;

	if (need <= TOKEN_EPSILON)
		return 0;
	if (rate <= 0)
		return NEVER;
	ms = ceil(need / rate * 1000.0 - 1e-6);
	return ms > 1e15 ? NEVER : (int64) ms;
}

static inline double
bucket_level(RateState *s, int64 now)
{
	double		tokens = s->u.bucket.tokens;

	if (now > s->u.bucket.stamp)
		tokens += (double) (now - s->u.bucket.stamp) * s->u.bucket.rate / NS_PER_SEC;
	return Min(tokens, (double) s->limit);
}

static void
bucket_decide(RateState *s, bool fresh, const RateRequest *req, int64 now,
			  RateDecision *d)
{
	double		tokens;
	int32		need = Max(req->cost, 1);

	if (fresh)
		tokens = req->limit;
	else
		tokens = Min(bucket_level(s, now), (double) req->limit);
	s->u.bucket.stamp = Max(now, s->u.bucket.stamp);
	s->u.bucket.rate = req->rate;
	s->limit = req->limit;

	d->allowed = tokens + TOKEN_EPSILON >= need;
	if (req->cost > 0)
	{
		if (d->allowed)
		{
			tokens = Max(tokens - req->cost, 0.0);
			s->allowed++;
		}
		else
			s->denied++;
	}
	s->u.bucket.tokens = tokens;

	d->limit = req->limit;
	d->remaining = (int32) floor(tokens + TOKEN_EPSILON);
	d->retry_after_ms = d->allowed ? 0 : wait_ms(need - tokens, req->rate);
	d->reset_after_ms = wait_ms(req->limit - tokens, req->rate);
}

static inline int
slot_index(int64 n)
{
	int			i = (int) (n % WINDOW_SLOTS);

	return i < 0 ? i + WINDOW_SLOTS : i;
}

/* Bring the ring up to slot `cur`, zeroing the slots that fell out. */
static void
window_advance(RateState *s, int64 cur)
{
	int64		n;

	if (cur <= s->u.window.base)
		return;
	for (n = s->u.window.base + 1; n <= cur && n <= s->u.window.base + WINDOW_SLOTS; n++)
		s->u.window.counts[slot_index(n)] = 0;
	s->u.window.base = cur;
}

static inline int64
window_slot_ns(int64 window_ns)
{
	return (window_ns + WINDOW_SLOTS - 2) / (WINDOW_SLOTS - 1);
}

static void
window_decide(RateState *s, bool fresh, const RateRequest *req, int64 now,
			  RateDecision *d)
{
	int64		slot_ns = window_slot_ns(req->window_ns);
	int64		cur = now / slot_ns;
	int64		sum = 0;
	int32		need = Max(req->cost, 1);
	int64		n;

	if (fresh)
	{
		memset(s->u.window.counts, 0, sizeof(s->u.window.counts));
		s->u.window.slot_ns = slot_ns;
		s->u.window.base = cur;
	}
	else if (s->u.window.slot_ns != slot_ns)
	{
		/*
		 * The key's window changed: carry every request still counted into
		 * the newest slot of the new ring, as if just made.  That over-counts,
		 * so the new window is never exceeded.
		 */
		window_advance(s, now / s->u.window.slot_ns);
		for (n = 0; n < WINDOW_SLOTS; n++)
			sum += s->u.window.counts[n];
		memset(s->u.window.counts, 0, sizeof(s->u.window.counts));
		s->u.window.counts[slot_index(cur)] = (int32) Min(sum, PG_INT32_MAX);
		s->u.window.slot_ns = slot_ns;
		s->u.window.base = cur;
		sum = 0;
	}
	window_advance(s, cur);
	s->limit = req->limit;
	for (n = 0; n < WINDOW_SLOTS; n++)
		sum += s->u.window.counts[n];

	d->allowed = sum + need <= req->limit;
	if (req->cost > 0)
	{
		if (d->allowed)
		{
			s->u.window.counts[slot_index(s->u.window.base)] += req->cost;
			sum += req->cost;
			s->allowed++;
		}
		else
			s->denied++;
	}

	d->limit = req->limit;
	d->remaining = (int32) Max(req->limit - sum, 0);
	d->retry_after_ms = 0;
	d->reset_after_ms = 0;

	/* Slot n stops counting when the clock reaches slot n + WINDOW_SLOTS. */
	{
		int64		oldest = s->u.window.base - WINDOW_SLOTS + 1;
		int64		excess = sum + need - req->limit;
		bool		retry_found = d->allowed;

		for (n = oldest; n <= s->u.window.base; n++)
		{
			int32		c = s->u.window.counts[slot_index(n)];
			int64		gone_at = (n + WINDOW_SLOTS) * slot_ns;

			if (c == 0)
				continue;
			excess -= c;
			if (!retry_found && excess <= 0)
			{
				d->retry_after_ms = (gone_at - now + NS_PER_MS - 1) / NS_PER_MS;
				retry_found = true;
			}
			d->reset_after_ms = (gone_at - now + NS_PER_MS - 1) / NS_PER_MS;
		}
	}
}

/*
 * The table's eviction callback (shmem.c): may this entry be dropped, for a
 * new key or by the reaper?  Only when its state is the state a fresh entry
 * would have now: a bucket full at this moment (it has refilled by now), a
 * window that counts nothing within its last window.  Anything else, a
 * depleted bucket above all, stays, so nobody resets a limit by creating
 * keys.  Runs under the entry's spinlock: arithmetic only, at most
 * WINDOW_SLOTS steps.
 */
static bool
rate_entry_idle(ShmEntry *entry, void *payload, int64 now)
{
	RateState  *s = (RateState *) payload;

	if (IS_BUCKET(entry->kind))
		return bucket_level(s, now) + TOKEN_EPSILON >= s->limit;
	else
	{
		int64		cur;
		int64		n;

		if (s->u.window.slot_ns <= 0)
			return true;		/* never decided on: zeroed as when new */
		cur = now / s->u.window.slot_ns;
		/* slot n counts until the clock reaches slot n + WINDOW_SLOTS */
		for (n = Max(s->u.window.base, cur) - WINDOW_SLOTS + 1; n <= s->u.window.base; n++)
			if (s->u.window.counts[slot_index(n)] != 0)
				return false;
		return true;
	}
}

/* ---- argument checking (before any shared state is touched) ---- */

/* Store the key (prefixed with the policy name, if any) into req. */
static void
request_key(RateRequest *req, text *key, const char *policy)
{
	int			len = VARSIZE_ANY_EXHDR(key);
	int			prefix = policy ? strlen(policy) + 1 : 0;

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rate-limit key must not be empty")));
	if (len + prefix > resilience_max_key_length)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rate-limit key is too long"),
				 errdetail("The key takes %d bytes%s; at most %d are allowed.",
						   len + prefix,
						   policy ? " including the policy name and a separator" : "",
						   resilience_max_key_length),
				 errhint("Hash long keys, or raise resilience.max_key_length (server restart).")));
	if (policy)
		memcpy(req->key, policy, prefix);	/* includes the NUL */
	memcpy(req->key + prefix, VARDATA_ANY(key), len);
	req->keylen = len + prefix;
}

static void
check_cost(int32 cost, int32 limit, const char *limit_name)
{
	if (cost < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must not be negative"),
				 errdetail("cost is %d.", cost),
				 errhint("Use cost => 0 to look at a limit without consuming from it.")));
	if (cost > limit)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must not exceed %s", limit_name),
				 errdetail("cost is %d and %s is %d, so the request could never be admitted.",
						   cost, limit_name, limit)));
}

static void
check_capacity(int32 capacity, const char *what)
{
	if (capacity <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be positive", what),
				 errdetail("%s is %d.", what, capacity)));
}

static void
check_rate(double rate)
{
	if (isnan(rate) || isinf(rate) || rate < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refill_per_sec must be a finite number >= 0"),
				 errdetail("refill_per_sec is %g.", rate),
				 errhint("Use 0 for a bucket that never refills.")));
}

static int64
window_ns_from_interval(Interval *window)
{
	int128		usec;

	usec = resilience_interval_usec(window);
	if (usec <= 0 || usec * 1000 > MAX_WINDOW_NS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("window must be positive and at most 366 days"),
				 errdetail("window is %s.",
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(window))))));
	return (int64) usec * 1000;
}

/* ---- policies ---- */

static void
policy_cache_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == policy_relid)
	{
		if (policy_cache)
			hash_destroy(policy_cache);
		policy_cache = NULL;
		policy_relid = InvalidOid;
	}
}

/* Look a policy up: the backend cache first, the table on a miss. */
static PolicyCacheEntry *
policy_lookup(text *name_text)
{
	static bool callback_registered = false;
	char		name[NAMEDATALEN];
	int			len = VARSIZE_ANY_EXHDR(name_text);
	PolicyCacheEntry *entry;
	bool		found;

	if (len == 0 || len >= NAMEDATALEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("policy name must be 1 to %d bytes long", NAMEDATALEN - 1)));
	memcpy(name, VARDATA_ANY(name_text), len);
	name[len] = '\0';

	if (policy_cache)
	{
		entry = hash_search(policy_cache, name, HASH_FIND, NULL);
		if (entry)
			return entry;
	}
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(policy_cache_invalidate, (Datum) 0);
		callback_registered = true;
	}

	/*
	 * Read the row, then cache it.  A change committed after our snapshot
	 * sends an invalidation that we process later and that empties the cache
	 * again, so a stale row cannot stay.
	 */
	{
		Oid			argtypes[1] = {TEXTOID};
		Datum		values[1] = {PointerGetDatum(name_text)};
		PolicyCacheEntry fetched;
		bool		isnull;
		int			ret;

		SPI_connect();
		ret = SPI_execute_with_args("SELECT capacity, refill_per_sec, \"window\" "
									"FROM resilience.rate_limit_policies WHERE name = $1",
									1, argtypes, values, NULL, true, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not read resilience.rate_limit_policies: %s",
				 SPI_result_code_string(ret));
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("rate-limit policy \"%s\" does not exist", name),
					 errhint("Policies are rows of resilience.rate_limit_policies.")));
		fetched.capacity = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1, &isnull));
		fetched.rate = DatumGetFloat8(SPI_getbinval(SPI_tuptable->vals[0],
													SPI_tuptable->tupdesc, 2, &isnull));
		if (isnull)
			fetched.rate = 0;
		{
			Datum		window = SPI_getbinval(SPI_tuptable->vals[0],
											   SPI_tuptable->tupdesc, 3, &isnull);

			fetched.window_ns = isnull ? 0 :
				window_ns_from_interval(DatumGetIntervalP(window));
		}
		SPI_finish();

		fetched.counters[RV_ALLOWED] = metrics_counter(RC_RATE_LIMIT_DECISIONS, RV_ALLOWED, name);
		fetched.counters[RV_DENIED] = metrics_counter(RC_RATE_LIMIT_DECISIONS, RV_DENIED, name);

		/*
		 * Only now: an invalidation processed during the query (at its lock
		 * acquisition) resets policy_relid, and later ones must still match.
		 */
		policy_relid = get_relname_relid("rate_limit_policies",
										 get_namespace_oid("resilience", false));

		if (policy_cache == NULL)
		{
			HASHCTL		ctl;

			ctl.keysize = NAMEDATALEN;
			ctl.entrysize = sizeof(PolicyCacheEntry);
			ctl.hcxt = CacheMemoryContext;
			policy_cache = hash_create("resilience rate-limit policies", 16, &ctl,
									   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
		}
		entry = hash_search(policy_cache, name, HASH_ENTER, &found);
		entry->capacity = fetched.capacity;
		entry->rate = fetched.rate;
		entry->window_ns = fetched.window_ns;
		entry->counters[0] = fetched.counters[0];
		entry->counters[1] = fetched.counters[1];
	}
	return entry;
}

/* Statement trigger on the policy table: every backend drops its cache at commit. */
Datum
rate_limit_policies_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "rate_limit_policies_changed must be called as a trigger");
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}

/* ---- decisions ---- */

/* Count a decision that consumed (a peek is not one). */
static inline void
count_decision(RateRequest *req, bool allowed)
{
	int			v = allowed ? RV_ALLOWED : RV_DENIED;

	if (req->cost == 0 || req->kind == KIND_INTERNAL_BUCKET)
		return;					/* a peek, or the relay's (not a caller's) */
	if (req->counters[v])
		metrics_inc(req->counters[v]);
	else
		metrics_add(RC_RATE_LIMIT_DECISIONS, v, NULL, 1);
}

static void
decide(RateRequest *req, RateDecision *d)
{
	int64		now = resilience_clock_ns();
	uint32		hash = shm_table_hash(req->kind, req->key, req->keylen);
	LWLock	   *lock = shm_table_lock(rate_table, hash);
	ShmEntry   *entry;
	bool		fresh = false;
	bool		found;

	LWLockAcquire(lock, LW_SHARED);
	entry = shm_table_find(rate_table, hash, req->kind, req->key, req->keylen);
	if (entry == NULL)
	{
		LWLockRelease(lock);
		entry = shm_table_enter(rate_table, hash, req->kind, req->key, req->keylen,
								resilience_when_full == WHEN_FULL_EVICT,
								rate_entry_idle, &found);
		fresh = !found;
		if (entry == NULL)
		{
			/*
			 * Table full, resilience.when_full decides.  evict found no entry
			 * whose state equals a fresh one: it refuses, like deny (failing
			 * open here would hand a flood of new keys what it wants).
			 */
			if (resilience_when_full != WHEN_FULL_ERROR)
			{
				d->allowed = (resilience_when_full == WHEN_FULL_ALLOW);
				d->limit = req->limit;
				d->remaining = d->allowed ? req->limit - req->cost : 0;
				d->retry_after_ms = d->allowed ? 0 : NEVER;
				d->reset_after_ms = NEVER;
				count_decision(req, d->allowed);
				return;
			}
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("rate-limit table is full"),
					 errdetail("All %d entries (resilience.max_keys) are in use.",
							   resilience_max_keys),
					 errhint("Raise resilience.max_keys (server restart), or set resilience.when_full to evict, allow or deny.")));
		}
	}

	SpinLockAcquire(&entry->mutex);
	if (IS_BUCKET(req->kind))
		bucket_decide(shm_entry_payload(rate_table, entry), fresh, req, now, d);
	else
		window_decide(shm_entry_payload(rate_table, entry), fresh, req, now, d);
	entry->referenced = true;
	entry->last_used = Max(entry->last_used, now);
	SpinLockRelease(&entry->mutex);
	LWLockRelease(lock);
	count_decision(req, d->allowed);
}

static void
parse_bucket(FunctionCallInfo fcinfo, RateRequest *req)
{
	text	   *key = resilience_arg_text(fcinfo, 0, "key");

	req->kind = KIND_BUCKET;
	req->counters[0] = req->counters[1] = NULL;
	req->limit = resilience_arg_int(fcinfo, 1, "capacity");
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("refill_per_sec must not be null")));
	req->rate = PG_GETARG_FLOAT8(2);
	req->cost = resilience_arg_int(fcinfo, 3, "cost");
	check_capacity(req->limit, "capacity");
	check_rate(req->rate);
	check_cost(req->cost, req->limit, "capacity");
	request_key(req, key, NULL);
}

static void
parse_window(FunctionCallInfo fcinfo, RateRequest *req)
{
	text	   *key = resilience_arg_text(fcinfo, 0, "key");

	req->kind = KIND_WINDOW;
	req->counters[0] = req->counters[1] = NULL;
	req->limit = resilience_arg_int(fcinfo, 1, "max");
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("window must not be null")));
	req->window_ns = window_ns_from_interval(PG_GETARG_INTERVAL_P(2));
	req->cost = resilience_arg_int(fcinfo, 3, "cost");
	check_capacity(req->limit, "max");
	check_cost(req->cost, req->limit, "max");
	request_key(req, key, NULL);
}

static void
parse_policy(FunctionCallInfo fcinfo, RateRequest *req)
{
	text	   *key = resilience_arg_text(fcinfo, 0, "key");
	text	   *policy_name = resilience_arg_text(fcinfo, 1, "policy");
	PolicyCacheEntry *policy;

	req->cost = resilience_arg_int(fcinfo, 2, "cost");
	policy = policy_lookup(policy_name);
	req->limit = policy->capacity;
	req->rate = policy->rate;
	req->window_ns = policy->window_ns;
	req->kind = policy->window_ns > 0 ? KIND_WINDOW : KIND_BUCKET;
	req->counters[0] = policy->counters[0];
	req->counters[1] = policy->counters[1];
	check_cost(req->cost, req->limit, "the policy's capacity");
	request_key(req, key, policy->name);
}

/* Cached, blessed tuple descriptor of the *_check functions' result. */
static Datum
decision_datum(FunctionCallInfo fcinfo, RateDecision *d)
{
	TupleDesc	tupdesc = (TupleDesc) fcinfo->flinfo->fn_extra;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};

	if (tupdesc == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);

		if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "return type must be a row type");
		tupdesc = BlessTupleDesc(CreateTupleDescCopy(tupdesc));
		fcinfo->flinfo->fn_extra = tupdesc;
		MemoryContextSwitchTo(old);
	}
	values[0] = BoolGetDatum(d->allowed);
	values[1] = Int32GetDatum(d->remaining);
	values[2] = Int32GetDatum(d->limit);
	values[3] = Int64GetDatum(d->retry_after_ms);
	nulls[3] = d->retry_after_ms == NEVER;
	values[4] = Int64GetDatum(d->reset_after_ms);
	nulls[4] = d->reset_after_ms == NEVER;
	return HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));
}

/* rate_limit(key, capacity, refill_per_sec, cost) → boolean */
Datum
rate_limit(PG_FUNCTION_ARGS)
{
	RateRequest req;
	RateDecision d;

	resilience_require_preload("rate_limit");
	parse_bucket(fcinfo, &req);
	decide(&req, &d);
	PG_RETURN_BOOL(d.allowed);
}

/*
 * One token of a bucket of the relay's own (a route's rate, sink_http.c):
 * true if taken.  Its entry is of a kind no SQL function reaches, and the
 * rate_limits view does not list it.  Needs preloading.
 */
bool
rate_limit_take_internal(const char *key, int keylen, int32 capacity, double rate)
{
	RateRequest req;
	RateDecision d;

	Assert(keylen > 0 && keylen <= resilience_max_key_length);
	req.kind = KIND_INTERNAL_BUCKET;
	req.counters[0] = req.counters[1] = NULL;
	req.limit = capacity;
	req.rate = rate;
	req.cost = 1;
	req.keylen = keylen;
	memcpy(req.key, key, keylen);
	decide(&req, &d);
	return d.allowed;
}

/* rate_limit_check(key, capacity, refill_per_sec, cost) → decision record */
Datum
rate_limit_check(PG_FUNCTION_ARGS)
{
	RateRequest req;
	RateDecision d;

	resilience_require_preload("rate_limit_check");
	parse_bucket(fcinfo, &req);
	decide(&req, &d);
	return decision_datum(fcinfo, &d);
}

/* window_limit(key, max, window, cost) → boolean */
Datum
window_limit(PG_FUNCTION_ARGS)
{
	RateRequest req;
	RateDecision d;

	resilience_require_preload("window_limit");
	parse_window(fcinfo, &req);
	decide(&req, &d);
	PG_RETURN_BOOL(d.allowed);
}

/* window_limit_check(key, max, window, cost) → decision record */
Datum
window_limit_check(PG_FUNCTION_ARGS)
{
	RateRequest req;
	RateDecision d;

	resilience_require_preload("window_limit_check");
	parse_window(fcinfo, &req);
	decide(&req, &d);
	return decision_datum(fcinfo, &d);
}

/* rate_limit(key, policy, cost) → boolean */
Datum
rate_limit_policy(PG_FUNCTION_ARGS)
{
	RateRequest req;
	RateDecision d;

	resilience_require_preload("rate_limit");
	parse_policy(fcinfo, &req);
	decide(&req, &d);
	PG_RETURN_BOOL(d.allowed);
}

/* rate_limit_check(key, policy, cost) → decision record */
Datum
rate_limit_policy_check(PG_FUNCTION_ARGS)
{
	RateRequest req;
	RateDecision d;

	resilience_require_preload("rate_limit_check");
	parse_policy(fcinfo, &req);
	decide(&req, &d);
	return decision_datum(fcinfo, &d);
}

/*
 * rate_limit_reset(key, policy default null) → boolean: forget a key (its
 * bucket and its window; or its entry under a policy).  True if it existed.
 */
Datum
rate_limit_reset(PG_FUNCTION_ARGS)
{
	text	   *key = resilience_arg_text(fcinfo, 0, "key");
	RateRequest req;
	bool		removed = false;

	resilience_require_preload("rate_limit_reset");
	if (PG_ARGISNULL(1))
	{
		request_key(&req, key, NULL);
		removed |= shm_table_remove(rate_table,
									shm_table_hash(KIND_BUCKET, req.key, req.keylen),
									KIND_BUCKET, req.key, req.keylen);
		removed |= shm_table_remove(rate_table,
									shm_table_hash(KIND_WINDOW, req.key, req.keylen),
									KIND_WINDOW, req.key, req.keylen);
	}
	else
	{
		PolicyCacheEntry *policy = policy_lookup(PG_GETARG_TEXT_PP(1));
		uint8		kind = policy->window_ns > 0 ? KIND_WINDOW : KIND_BUCKET;

		request_key(&req, key, policy->name);
		removed = shm_table_remove(rate_table,
								   shm_table_hash(kind, req.key, req.keylen),
								   kind, req.key, req.keylen);
	}
	PG_RETURN_BOOL(removed);
}

/* ---- the view ---- */

typedef struct EntryCopy
{
	uint8		kind;
	int			keylen;
	int64		last_used;
	RateState	state;
	char	   *key;
} EntryCopy;

typedef struct EntryList
{
	List	   *entries;
} EntryList;

static void
copy_entry(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	EntryList  *list = (EntryList *) arg;
	EntryCopy  *copy;

	if (entry->kind == KIND_INTERNAL_BUCKET)
		return;					/* the relay's: not a key of anybody's */
	copy = palloc(sizeof(EntryCopy));
	copy->kind = entry->kind;
	copy->keylen = entry->keylen;
	copy->key = palloc(entry->keylen + 1);
	SpinLockAcquire(&entry->mutex);
	copy->last_used = entry->last_used;
	memcpy(&copy->state, payload, sizeof(RateState));
	SpinLockRelease(&entry->mutex);
	memcpy(copy->key, key, copy->keylen);
	copy->key[copy->keylen] = '\0';
	list->entries = lappend(list->entries, copy);
}

/*
 * rate_limit_entries() → the rows of the rate_limits view: key, policy, kind,
 * tokens (or requests) available now, limit, rate, window, last use, and the
 * decisions allowed and denied on the key.
 */
Datum
rate_limit_entries(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EntryList	list = {NIL};
	int64		now;
	TimestampTz wall_now = GetCurrentTimestamp();
	ListCell   *lc;

	resilience_require_preload("rate_limits");
	InitMaterializedSRF(fcinfo, 0);
	shm_table_visit(rate_table, copy_entry, &list);
	now = resilience_clock_ns();

	foreach(lc, list.entries)
	{
		EntryCopy  *c = lfirst(lc);
		RateState  *s = &c->state;
		Datum		values[10];
		bool		nulls[10] = {0};
		char	   *sep = memchr(c->key, '\0', c->keylen);

		if (sep)
		{
			values[0] = PointerGetDatum(cstring_to_text(sep + 1));
			values[1] = PointerGetDatum(cstring_to_text(c->key));
		}
		else
		{
			values[0] = PointerGetDatum(cstring_to_text_with_len(c->key, c->keylen));
			nulls[1] = true;
		}
		values[2] = PointerGetDatum(cstring_to_text(c->kind == KIND_BUCKET ? "token_bucket" : "sliding_window"));
		values[4] = Int32GetDatum(s->limit);
		if (c->kind == KIND_BUCKET)
		{
			values[3] = Float8GetDatum(bucket_level(s, now));
			values[5] = Float8GetDatum(s->u.bucket.rate);
			nulls[6] = true;
		}
		else
		{
			int64		sum = 0;
			int			i;
			Interval   *window = palloc0(sizeof(Interval));

			window_advance(s, now / s->u.window.slot_ns);
			for (i = 0; i < WINDOW_SLOTS; i++)
				sum += s->u.window.counts[i];
			values[3] = Float8GetDatum((double) (s->limit - sum));
			nulls[5] = true;
			window->time = s->u.window.slot_ns * (WINDOW_SLOTS - 1) / 1000;
			window->day = window->time / USECS_PER_DAY;
			window->time -= window->day * USECS_PER_DAY;
			values[6] = IntervalPGetDatum(window);
		}
		values[7] = TimestampTzGetDatum(wall_now - (now - c->last_used) / 1000);
		values[8] = Int64GetDatum((int64) s->allowed);
		values[9] = Int64GetDatum((int64) s->denied);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * rate_limit_sweep() → number of entries dropped: entries whose state is
 * worth nothing (full bucket, empty window) and that were not used since the
 * previous sweep.  Part of run_reaper(); 0 without preloading.
 */
Datum
rate_limit_sweep(PG_FUNCTION_ARGS)
{
	if (!resilience_preloaded || rate_table == NULL)
		PG_RETURN_INT64(0);
	PG_RETURN_INT64(shm_table_sweep(rate_table, rate_entry_idle));
}

/* The rate-limit table's size and counters (metrics); false without preloading. */
bool
ratelimit_table_stats(ShmTableStats *stats)
{
	if (!resilience_preloaded || rate_table == NULL)
		return false;
	shm_table_stats(rate_table, stats);
	return true;
}

/* ---- the state file (called in the postmaster, single process) ---- */

typedef struct RateSaved
{
	uint8		kind;
	uint16		keylen;
	int32		limit;
	uint64		allowed;
	uint64		denied;
	double		tokens;			/* level at save time */
	double		rate;
	int64		slot_ns;
	int32		counts[WINDOW_SLOTS];	/* oldest slot first */
	int64		idle_ns;		/* time since last use */
} RateSaved;

static void
save_entry(ShmEntry *entry, void *payload, const char *key, void *arg)
{
	StateSaveContext *ctx = (StateSaveContext *) arg;
	RateState	copy = *(RateState *) payload;
	RateState  *s = &copy;
	RateSaved	rec;
	int			i;

	memset(&rec, 0, sizeof(rec));
	rec.kind = entry->kind;
	rec.keylen = entry->keylen;
	rec.limit = s->limit;
	rec.allowed = s->allowed;
	rec.denied = s->denied;
	rec.idle_ns = Max(ctx->now - entry->last_used, 0);
	if (IS_BUCKET(entry->kind))
	{
		rec.tokens = bucket_level(s, ctx->now);
		rec.rate = s->u.bucket.rate;
	}
	else
	{
		window_advance(s, ctx->now / s->u.window.slot_ns);
		rec.slot_ns = s->u.window.slot_ns;
		for (i = 0; i < WINDOW_SLOTS; i++)
			rec.counts[i] = s->u.window.counts[slot_index(s->u.window.base - WINDOW_SLOTS + 1 + i)];
	}
	if (ctx->file)
		ctx->ok = ctx->ok && state_write(ctx->file, &rec, sizeof(rec)) &&
			state_write(ctx->file, key, entry->keylen);
	ctx->count++;
}

bool
ratelimit_state_save(FILE *file)
{
	return state_save_table(file, STATE_SECTION_RATELIMIT, rate_table, save_entry);
}

/*
 * Why a saved entry cannot be restored, or NULL if it can: only what
 * save_entry writes passes (a limit >= 1; a finite refill rate >= 0 and a
 * finite level within [0, limit]; a slot width of a window we accept, and
 * counts >= 0 that add up to at most PG_INT32_MAX; a last use not in the
 * future).
 */
static const char *
rate_saved_invalid(const RateSaved *rec)
{
	int64		sum = 0;
	int			i;

	if (rec->kind != KIND_BUCKET && rec->kind != KIND_WINDOW &&
		rec->kind != KIND_INTERNAL_BUCKET)
		return "an unknown kind";
	if (rec->keylen == 0)
		return "an empty key";
	if (rec->limit <= 0)
		return "a limit below 1";
	if (rec->idle_ns < 0)
		return "a last use in the future";
	if (IS_BUCKET(rec->kind))
	{
		if (isnan(rec->rate) || isinf(rec->rate) || rec->rate < 0)
			return "a refill rate that is not a finite number >= 0";
		if (isnan(rec->tokens) || rec->tokens < 0 || rec->tokens > rec->limit)
			return "a token count outside [0, limit]";
		return NULL;
	}
	if (rec->slot_ns <= 0 || rec->slot_ns > window_slot_ns(MAX_WINDOW_NS))
		return "a window slot width out of range";
	for (i = 0; i < WINDOW_SLOTS; i++)
	{
		if (rec->counts[i] < 0)
			return "a negative window count";
		sum += rec->counts[i];
	}
	if (sum > PG_INT32_MAX)
		return "window counts that overflow";
	return NULL;
}

/*
 * Restore saved entries.  Downtime is not credited: a bucket resumes at the
 * level it had at shutdown, a window's counts at its newest slot.  Entries
 * that fail rate_saved_invalid are skipped (one LOG line for all of them);
 * false only when the file ends early.
 */
bool
ratelimit_state_load(FILE *file, uint32 nrecords)
{
	char	   *key = palloc(PG_UINT16_MAX);
	int64		now = resilience_clock_ns();
	uint32		nskipped = 0;
	const char *first_problem = NULL;
	bool		ok = true;
	uint32		i;

	for (i = 0; i < nrecords; i++)
	{
		RateSaved	rec;
		ShmEntry   *entry;
		RateState  *s;
		bool		found;
		const char *problem;
		int			j;

		if (!state_read(file, &rec, sizeof(rec)) ||
			!state_read(file, key, rec.keylen))
		{
			ok = false;
			break;
		}
		problem = rate_saved_invalid(&rec);
		if (problem)
		{
			if (nskipped++ == 0)
				first_problem = problem;
			continue;
		}

		if (rec.keylen > resilience_max_key_length)
			continue;			/* max_key_length was lowered: drop this key */
		entry = shm_table_enter(rate_table, shm_table_hash(rec.kind, key, rec.keylen),
								rec.kind, key, rec.keylen, false, rate_entry_idle,
								&found);
		if (entry == NULL)
			continue;			/* max_keys was lowered: keep what fits */
		s = shm_entry_payload(rate_table, entry);
		s->limit = rec.limit;
		s->allowed = rec.allowed;
		s->denied = rec.denied;
		if (IS_BUCKET(rec.kind))
		{
			s->u.bucket.tokens = rec.tokens;
			s->u.bucket.rate = rec.rate;
			s->u.bucket.stamp = now;
		}
		else
		{
			s->u.window.slot_ns = rec.slot_ns;
			s->u.window.base = now / rec.slot_ns;
			for (j = 0; j < WINDOW_SLOTS; j++)
				s->u.window.counts[slot_index(s->u.window.base - WINDOW_SLOTS + 1 + j)] = rec.counts[j];
		}
		entry->last_used = now - rec.idle_ns;
		entry->referenced = false;
		LWLockRelease(shm_table_lock(rate_table, entry->hash));
	}
	pfree(key);
	if (nskipped > 0)
		ereport(LOG,
				(errmsg("resilience state file: skipped %u of %u saved rate-limit keys whose state is invalid",
						nskipped, nrecords),
				 errdetail("The first one skipped had %s.", first_problem),
				 errhint("The other keys were restored; skipped keys start afresh.")));
	return ok;
}
