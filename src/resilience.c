/*-------------------------------------------------------------------------
 *
 * resilience.c
 *		_PG_init: settings, hooks and the launcher, and nothing else.
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

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

int			resilience_max_keys = 100000;
int			resilience_max_key_length = 128;
int			resilience_when_full = WHEN_FULL_EVICT;
char	   *resilience_database_names = NULL;
int			resilience_max_workers = 8;
int			resilience_worker_naptime_ms = 10000;
int			resilience_reaper_interval_ms = 60000;
int			resilience_max_lock_names = 10000;
int			resilience_saga_interval_ms = 1000;
int			resilience_saga_retention_s = 7 * 86400;
int			resilience_saga_stuck_after_s = 300;
bool		resilience_preloaded = false;

static const struct config_enum_entry when_full_options[] = {
	{"evict", WHEN_FULL_EVICT, false},
	{"allow", WHEN_FULL_ALLOW, false},
	{"deny", WHEN_FULL_DENY, false},
	{"error", WHEN_FULL_ERROR, false},
	{NULL, 0, false}
};

void		_PG_init(void);

void
_PG_init(void)
{
	/*
	 * Every setting so far concerns shared memory or the workers, and
	 * PGC_POSTMASTER ones cannot be defined after startup: without
	 * preloading there is nothing to set.
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
	/* sagas; the views and the reaper read the last two with safe defaults */
	DefineCustomIntVariable("resilience.saga_interval",
							"How often the worker looks for due sagas when nothing wakes it (0 disables the sagas job).",
							"saga_start, replies, saga_retry and saga_abort wake the worker at commit, and it "
							"sleeps only until the next retry or timeout is due; this bounds anything missed.",
							&resilience_saga_interval_ms,
							1000, 0, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.saga_retention",
							"How long completed and compensated sagas are kept before the reaper removes them.",
							"Their idempotency keys are forgotten with them.",
							&resilience_saga_retention_s,
							7 * 86400, 0, 3650 * 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("resilience.saga_stuck_after",
							"How long an unfinished saga may go without progress before resilience.stuck_sagas lists it.",
							NULL,
							&resilience_saga_stuck_after_s,
							300, 0, 3650 * 86400,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("resilience");

	if (IsBinaryUpgrade)
		return;

	resilience_preloaded = true;
	resilience_shmem_hooks();
	worker_utility_hook_init();
	worker_register_launcher();
}
