/*-------------------------------------------------------------------------
 *
 * resilience.c
 *		_PG_init: settings, hooks and the launcher; and two checks every
 *		module may ask (is Citus here, have the synchronous standbys the WAL).
 *
 * Loaded from shared_preload_libraries, the library defines its settings,
 * requests its shared memory and starts the launcher.  Loaded any other way
 * (CREATE EXTENSION alone), it does nothing here: the table-backed features
 * work, and every shared-memory function raises 55000 with a hint.  Under
 * pg_upgrade (binary-upgrade mode) it starts nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"

#include "access/genam.h"
#include "access/tableam.h"
#include "catalog/pg_am.h"
#include "catalog/pg_class.h"
#include "commands/extension.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/varlena.h"

#include <limits.h>

PG_MODULE_MAGIC;

int			resilience_max_keys = 100000;
int			resilience_max_key_length = 128;
int			resilience_when_full = WHEN_FULL_EVICT;
char	   *resilience_database_names = NULL;
int			resilience_max_workers = 8;
int			resilience_worker_naptime_ms = 10000;
int			resilience_reaper_interval_ms = 60000;
int			resilience_max_lock_names = 10000;
int			resilience_reaper_batch_size = 5000;
int			resilience_reaper_max_batches = 20;
int			resilience_max_breakers = 1000;
int			resilience_max_bulkheads = 1000;
int			resilience_max_metric_series = 10000;
double		resilience_breaker_failure_rate_threshold = 50;
double		resilience_breaker_slow_call_rate_threshold = 100;
int			resilience_breaker_slow_call_duration_ms = 60000;
int			resilience_breaker_window_type = WINDOW_COUNT;
int			resilience_breaker_window_size = 100;
int			resilience_breaker_minimum_calls = 100;
int			resilience_breaker_open_timeout_ms = 60000;
int			resilience_breaker_half_open_calls = 10;
int			resilience_breaker_probe_timeout_ms = 60000;
bool		resilience_breaker_defaults_changed = true;
int			resilience_saga_interval_ms = 1000;
int			resilience_saga_workers = 1;
int			resilience_saga_retention_s = 7 * 86400;
int			resilience_schedule_interval_ms = 10000;
int			resilience_schedule_retention_s = 7 * 86400;
int			resilience_schedule_max_parallel = 4;
char	   *resilience_schedule_slot = NULL;
int			resilience_saga_stuck_after_s = 300;
int			resilience_relay_interval_ms = 10000;
int			resilience_outbox_batch_size = 500;
int			resilience_outbox_http_parallelism = 16;
char	   *resilience_outbox_http_allowed_hosts = NULL;
char	   *resilience_outbox_allowed_hosts = NULL;
int			resilience_outbox_retention_s = 0;
int			resilience_outbox_breaker_failures = 5;
int			resilience_outbox_breaker_open_ms = 30000;
bool		resilience_preloaded = false;
char	   *resilience_traceparent = NULL;
char	   *resilience_tracestate = NULL;

static const struct config_enum_entry when_full_options[] = {
	{"evict", WHEN_FULL_EVICT, false},
	{"allow", WHEN_FULL_ALLOW, false},
	{"deny", WHEN_FULL_DENY, false},
	{"error", WHEN_FULL_ERROR, false},
	{NULL, 0, false}
};

static const struct config_enum_entry window_type_options[] = {
	{"count", WINDOW_COUNT, false},
	{"time", WINDOW_TIME, false},
	{NULL, 0, false}
};

void		_PG_init(void);

/* A rate threshold is a percentage in (0, 100]. */
static bool
check_rate_threshold(double *newval, void **extra, GucSource source)
{
	if (*newval > 0 && *newval <= 100)
		return true;
	GUC_check_errdetail("A rate threshold is a percentage greater than 0 and at most 100.");
	return false;
}

/* Breakers re-read their configuration when a default changes (breaker.c). */
static void
assign_breaker_default_real(double newval, void *extra)
{
	resilience_breaker_defaults_changed = true;
}

static void
assign_breaker_default_int(int newval, void *extra)
{
	resilience_breaker_defaults_changed = true;
}

/* The breaker defaults: resilience4j's, documented in docs/breakers.md. */
static void
define_breaker_defaults(void)
{
	DefineCustomRealVariable("resilience.breaker_failure_rate_threshold",
							 "Default failure rate (percent) at which a circuit breaker opens.",
							 "Used where resilience.breaker_config leaves failure_rate_threshold null.",
							 &resilience_breaker_failure_rate_threshold,
							 50, 0, 100,
							 PGC_SIGHUP, 0, check_rate_threshold,
							 assign_breaker_default_real, NULL);
	DefineCustomRealVariable("resilience.breaker_slow_call_rate_threshold",
							 "Default slow-call rate (percent) at which a circuit breaker opens.",
							 NULL,
							 &resilience_breaker_slow_call_rate_threshold,
							 100, 0, 100,
							 PGC_SIGHUP, 0, check_rate_threshold,
							 assign_breaker_default_real, NULL);
	DefineCustomIntVariable("resilience.breaker_slow_call_duration",
							"Default duration above which a call recorded by a circuit breaker is slow.",
							NULL,
							&resilience_breaker_slow_call_duration_ms,
							60000, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL,
							assign_breaker_default_int, NULL);
	DefineCustomEnumVariable("resilience.breaker_window_type",
							 "Default sliding window of a circuit breaker: count (last N calls) or time (last N seconds).",
							 NULL,
							 &resilience_breaker_window_type,
							 WINDOW_COUNT, window_type_options,
							 PGC_SIGHUP, 0, NULL,
							 assign_breaker_default_int, NULL);
	DefineCustomIntVariable("resilience.breaker_window_size",
							"Default size of a circuit breaker's sliding window (calls, or seconds).",
							NULL,
							&resilience_breaker_window_size,
							100, 1, 1000,
							PGC_SIGHUP, 0, NULL,
							assign_breaker_default_int, NULL);
	DefineCustomIntVariable("resilience.breaker_minimum_calls",
							"Default number of calls a circuit breaker's window must hold before rates can open it.",
							NULL,
							&resilience_breaker_minimum_calls,
							100, 1, INT_MAX,
							PGC_SIGHUP, 0, NULL,
							assign_breaker_default_int, NULL);
	DefineCustomIntVariable("resilience.breaker_open_timeout",
							"Default time a circuit breaker stays open before it admits probe calls.",
							NULL,
							&resilience_breaker_open_timeout_ms,
							60000, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL,
							assign_breaker_default_int, NULL);
	DefineCustomIntVariable("resilience.breaker_half_open_calls",
							"Default number of probe calls a half-open circuit breaker admits.",
							NULL,
							&resilience_breaker_half_open_calls,
							10, 1, 100,
							PGC_SIGHUP, 0, NULL,
							assign_breaker_default_int, NULL);
	DefineCustomIntVariable("resilience.breaker_probe_timeout",
							"Default time after which a probe call that never reported frees its slot.",
							NULL,
							&resilience_breaker_probe_timeout_ms,
							60000, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL,
							assign_breaker_default_int, NULL);
}

void
_PG_init(void)
{
	/*
	 * The reaper's batch settings serve table-backed features, which work
	 * without preloading (run_reaper() by hand, or from pg_cron): define them
	 * whenever the library is loaded.  They are read in C by the reaper
	 * functions, so the library is loaded whenever they matter, and a value
	 * from postgresql.conf is picked up here even when it was loaded late.
	 */
	DefineCustomIntVariable("resilience.reaper_batch_size",
							"Rows the reaper deletes per batch (per table).",
							"Each batch is one short statement that skips locked rows.",
							&resilience_reaper_batch_size,
							5000, 1, 1000000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.reaper_max_batches",
							"Most batches one reaper run deletes per table.",
							"Bounds the length of one run's transaction; the rest waits for the next run.",
							&resilience_reaper_max_batches,
							20, 1, 1000000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	/* set while a schedule's command runs, by schedule_tick too (schedule.c) */
	DefineCustomStringVariable("resilience.schedule_slot",
							   "The slot (UTC, ISO 8601) of the schedule whose command is running; empty otherwise.",
							   "Set by the extension while a schedule's command runs; read it with current_setting.",
							   &resilience_schedule_slot,
							   "",
							   PGC_USERSET, GUC_NOT_IN_SAMPLE | GUC_DISALLOW_IN_FILE,
							   NULL, NULL, NULL);

	/* what outbox_publish records as an event's trace context */
	DefineCustomStringVariable("resilience.traceparent",
							   "W3C traceparent recorded with the events this session publishes.",
							   "An instrumented application sets it with SET LOCAL; an argument of outbox_publish wins over it.",
							   &resilience_traceparent,
							   "",
							   PGC_USERSET, 0, outbox_check_traceparent_guc, NULL, NULL);
	DefineCustomStringVariable("resilience.tracestate",
							   "W3C tracestate recorded with resilience.traceparent.",
							   NULL,
							   &resilience_tracestate,
							   "",
							   PGC_USERSET, 0, outbox_check_tracestate_guc, NULL, NULL);

	/*
	 * The other settings concern shared memory or the workers, and
	 * PGC_POSTMASTER ones cannot be defined after startup: without
	 * preloading there is nothing more to set.
	 */
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomIntVariable("resilience.max_keys",
							"Number of rate-limit keys kept in shared memory.",
							"Each key costs about 130 bytes plus resilience.max_key_length.",
							&resilience_max_keys,
							100000, 16, 50000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.max_key_length",
							"Longest rate-limit key, in bytes.",
							NULL,
							&resilience_max_key_length,
							128, 16, 1024,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("resilience.when_full",
							 "What a rate limit does with a new key when resilience.max_keys are in use.",
							 "evict drops an idle key (least recently used first); allow and deny answer "
							 "without tracking the key; error raises 53200.",
							 &resilience_when_full,
							 WHEN_FULL_EVICT, when_full_options,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("resilience.database_names",
							   "Databases in which a resilience worker runs the background jobs.",
							   "A comma-separated list of database names.",
							   &resilience_database_names,
							   "postgres",
							   PGC_SIGHUP, GUC_LIST_INPUT, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.max_workers",
							"Most resilience workers running at once (one per database).",
							"Each also takes a slot of max_worker_processes.",
							&resilience_max_workers,
							8, 1, 128,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.worker_naptime",
							"How often an idle worker checks for the extension, and the launcher for changes.",
							NULL,
							&resilience_worker_naptime_ms,
							10000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.reaper_interval",
							"How often the reaper job runs (0 disables it).",
							NULL,
							&resilience_reaper_interval_ms,
							60000, 0, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.max_lock_names",
							"Advisory-lock names remembered for the resilience.locks view.",
							"Each costs about 300 bytes; the least recently used are forgotten first.",
							&resilience_max_lock_names,
							10000, 16, 10000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.max_breakers",
							"Number of circuit breakers kept in shared memory.",
							"Each breaker costs about 1 kB.",
							&resilience_max_breakers,
							1000, 16, 1000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.max_bulkheads",
							"Number of bulkheads kept in shared memory.",
							"Each bulkhead costs about 150 bytes.",
							&resilience_max_bulkheads,
							1000, 16, 1000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.max_metric_series",
							"Number of counter series (counter, labels, database) kept in shared memory for resilience.metrics().",
							"Each costs about 130 bytes; increments of new series beyond it are counted as dropped.",
							&resilience_max_metric_series,
							10000, 100, 1000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	define_breaker_defaults();
	quota_define_settings();
	/* sagas; the views and the reaper read the last two with safe defaults */
	DefineCustomIntVariable("resilience.saga_interval",
							"How often the worker looks for due sagas when nothing wakes it (0 disables the sagas job).",
							"saga_start, replies, saga_retry and saga_abort wake the worker at commit, and it "
							"sleeps only until the next retry or timeout is due; this bounds anything missed.",
							&resilience_saga_interval_ms,
							1000, 0, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.saga_workers",
							"Saga orchestrators per database: the worker and this many minus one saga helpers.",
							"They share the due sagas (SKIP LOCKED); each helper takes a slot of max_worker_processes.",
							&resilience_saga_workers,
							1, 1, RESILIENCE_MAX_SAGA_WORKERS,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.saga_retention",
							"How long completed and compensated sagas are kept before the reaper removes them.",
							"Their idempotency keys are forgotten with them.",
							&resilience_saga_retention_s,
							7 * 86400, 0, 3650 * 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.saga_stuck_after",
							"How long an unfinished saga may go without progress before resilience.stuck_sagas lists it.",
							NULL,
							&resilience_saga_stuck_after_s,
							300, 0, 3650 * 86400,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	/* schedules (schedule.c) */
	DefineCustomIntVariable("resilience.schedule_interval",
							"The longest the worker sleeps between looks at the schedules (0 disables the schedules job).",
							"The worker sleeps until the next slot or retry is due, and schedule() and "
							"schedule_resume() wake it at commit; this bounds anything missed.",
							&resilience_schedule_interval_ms,
							10000, 0, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.schedule_retention",
							"How long the runs of a schedule are kept in resilience.schedule_runs.",
							NULL,
							&resilience_schedule_retention_s,
							7 * 86400, 0, 3650 * 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.schedule_max_parallel",
							"Most runs of overlap => 'allow' schedules executing at once per database.",
							"Each is a background worker of its own and takes a slot of max_worker_processes.",
							&resilience_schedule_max_parallel,
							4, 1, 64,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	/* the outbox relay; read with GetConfigOption where preloading is optional */
	DefineCustomIntVariable("resilience.relay_interval",
							"Safety poll of the outbox relay (0 disables the relay in the worker).",
							"The relay is woken when a publishing transaction commits; this only "
							"bounds how long an event can wait if a wake-up is missed.",
							&resilience_relay_interval_ms,
							10000, 0, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.outbox_batch_size",
							"Most events the relay claims at once.",
							NULL,
							&resilience_outbox_batch_size,
							500, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.outbox_http_parallelism",
							"Most HTTP requests the relay has in flight at once.",
							NULL,
							&resilience_outbox_http_parallelism,
							16, 1, 256,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("resilience.outbox_allowed_hosts",
							   "Hosts the outbox http and amqp sinks may reach; empty means loopback only.",
							   "A comma-separated list of host names or addresses; *.example.com "
							   "allows the subdomains of example.com.  The hosts of "
							   "resilience.outbox_http_allowed_hosts are allowed too.",
							   &resilience_outbox_allowed_hosts,
							   "",
							   PGC_SIGHUP, GUC_LIST_INPUT, NULL, NULL, NULL);
	DefineCustomStringVariable("resilience.outbox_http_allowed_hosts",
							   "Older name of resilience.outbox_allowed_hosts: its hosts are allowed too.",
							   "Kept for compatibility; applies to every sink that connects out.",
							   &resilience_outbox_http_allowed_hosts,
							   "",
							   PGC_SIGHUP, GUC_LIST_INPUT, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.outbox_retention",
							"How long delivered outbox events are kept (0: deleted at once).",
							NULL,
							&resilience_outbox_retention_s,
							0, 0, 366 * 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.outbox_breaker_failures",
							"Consecutive failures after which the relay stops calling a destination.",
							NULL,
							&resilience_outbox_breaker_failures,
							5, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.outbox_breaker_open_time",
							"How long an open breaker keeps the relay away from a destination before a probe.",
							NULL,
							&resilience_outbox_breaker_open_ms,
							30000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	MarkGUCPrefixReserved("resilience");

	if (IsBinaryUpgrade)
		return;

	resilience_preloaded = true;
	resilience_shmem_hooks();
	worker_utility_hook_init();
	worker_register_launcher();
}

/*
 * Is the extension citus installed in this database?  Then resilience's
 * tables may be distributed (issue 21): their rows are on the workers, not
 * in the local heap, and every read or write must go through the executor
 * (SPI), which Citus plans.  Citus works only when preloaded, so a server
 * that does not preload it (the setting cannot change while it runs)
 * answers at once, and the catalog is read only when it does.  Any direct
 * heap or index path in the extension asks this first.
 */
bool
citus_present(void)
{
	static int	preloaded = -1;

	if (preloaded < 0)
	{
		char	   *libs = pstrdup(shared_preload_libraries_string ?
								   shared_preload_libraries_string : "");
		List	   *names;
		ListCell   *lc;

		preloaded = 0;
		if (SplitDirectoriesString(libs, ',', &names))
			foreach(lc, names)
			{
				const char *path = lfirst(lc);
				const char *base = last_dir_separator(path);

				base = base ? base + 1 : path;
				if (strcmp(base, "citus") == 0 || strcmp(base, "citus.so") == 0)
					preloaded = 1;
			}
	}
	return preloaded == 1 && OidIsValid(get_extension_oid("citus", true));
}

/*
 * Is WAL up to lsn safe from a failover: flushed by the synchronous standbys,
 * or none are configured (then commits do not wait for a standby either)?
 * Fencing tokens (locks.c) and quota decisions (quota.c) ask before they are
 * handed out.
 */
bool
sync_standbys_flushed(XLogRecPtr lsn)
{
	bool		flushed;

	LWLockAcquire(SyncRepLock, LW_SHARED);
	flushed = !sync_standbys_defined_compat() ||
		lsn <= WalSndCtl->lsn[SYNC_REP_WAIT_FLUSH];
	LWLockRelease(SyncRepLock);
	return flushed;
}

/* ---- rows updated without the executor (locks.c, events.c) ---- */

/*
 * May a direct path (a primary-key probe and table_tuple_update, no
 * executor) write rel, as it is now?  Only a plain table with the ncols
 * named columns of these types (their numbers into attnums), no triggers
 * (foreign keys included), rules, row security, check constraints or
 * generated columns, and a one-column unique btree primary key on column
 * key_col: anything else would need what the executor does.  Returns the
 * primary key's oid, or InvalidOid.
 */
Oid
direct_update_layout(Relation rel, int ncols, const char *const *names, const Oid *types,
					 AttrNumber *attnums, int key_col)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Oid			pkey;
	Relation	idx;
	bool		ok;

	for (int c = 0; c < ncols; c++)
	{
		attnums[c] = get_attnum(RelationGetRelid(rel), names[c]);
		if (attnums[c] <= 0 || TupleDescAttr(desc, attnums[c] - 1)->atttypid != types[c])
			return InvalidOid;
	}
	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->trigdesc != NULL ||
		rel->rd_rules != NULL || rel->rd_rel->relrowsecurity ||
		(desc->constr != NULL &&
		 (desc->constr->num_check > 0 || desc->constr->has_generated_stored)))
		return InvalidOid;
	list_free(RelationGetIndexList(rel));	/* sets rd_pkindex */
	pkey = rel->rd_pkindex;
	if (!OidIsValid(pkey))
		return InvalidOid;
	idx = index_open(pkey, AccessShareLock);
	ok = idx->rd_rel->relam == BTREE_AM_OID &&
		idx->rd_index->indnkeyatts == 1 && idx->rd_index->indisunique &&
		idx->rd_index->indkey.values[0] == attnums[key_col];
	index_close(idx, AccessShareLock);
	return ok ? pkey : InvalidOid;
}

/* After table_tuple_update of slot: the index entries of a version that is not HOT. */
void
direct_update_indexes(Relation rel, TupleTableSlot *slot, int update_indexes)
{
	EState	   *estate;
	ResultRelInfo *rri;

	if (update_indexes_none_compat((UpdateIndexes_compat) update_indexes))
		return;
	estate = CreateExecutorState();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 0, NULL, 0);
	ExecOpenIndices(rri, false);
	(void) ExecUpdateIndexTuples_compat(rri, slot, estate, (UpdateIndexes_compat) update_indexes);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
}
