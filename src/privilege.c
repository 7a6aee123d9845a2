/*-------------------------------------------------------------------------
 *
 * privilege.c
 *		The one way the extension acts as another role: the owner of its
 *		tables (callers need no privilege on them), or a saga's definer.
 *
 * resilience_become(role, pin_path, &save) switches to role with
 * SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION, on top of
 * the caller's context, and (pin_path) with search_path = pg_catalog,
 * pg_temp in a GUC nest level of its own; resilience_restore_user(&save)
 * reverts every setting changed meanwhile and switches back.  So:
 *
 *	- nothing run meanwhile resolves a name through the caller's (or the
 *	  database owner's) search_path: the SQL run under a switch qualifies
 *	  every name and operator anyway (pg_catalog.*, OPERATOR(pg_catalog.=)),
 *	  and the pinned path is the second line of defence;
 *	- nothing run meanwhile can leave state behind in the session (a
 *	  security-restricted operation cannot create temporary objects, SET
 *	  ROLE, LISTEN, PREPARE or open cursors WITH HOLD), and every setting it
 *	  changes is reverted.
 *
 * pin_path = false is for documented hot paths only (idempotency.c, where
 * pinning measured about 20% of a key's write; the leases of locks.c and
 * append_events in events.c); their SQL is fully qualified and runs no
 * user code.
 *
 * An error between become and restore needs no cleanup: the abort of the
 * (sub)transaction restores the user, the security context and the
 * settings as they were when it started.  Become and restore must both
 * happen inside one transaction (StartTransaction asserts that no
 * security-restricted context is active).
 *
 * resilience_owner() is the owner of the extension's tables (the role that
 * ran CREATE EXTENSION, like pg_cron's CronExtensionOwner()), looked up once
 * per backend and again after a relcache invalidation of the table it was
 * read from (ALTER TABLE ... OWNER, REASSIGN OWNED, DROP EXTENSION).  The
 * cached value is never cleared, only marked stale, so a value just looked
 * up stays usable if an invalidation arrives before it is used.
 *
 *-------------------------------------------------------------------------
 */
#include "resilience.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/syscache.h"

/* The table whose owner is the extension's owner. */
#define OWNER_ANCHOR_TABLE "outbox"

static bool owner_valid = false;
static Oid	owner_anchor_relid = InvalidOid;
static Oid	cached_owner = InvalidOid;

/* The anchor table changed (or every relation did): look the owner up again. */
static void
owner_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == owner_anchor_relid)
		owner_valid = false;
}

/* OID of resilience.<name> (a table, index or sequence); 42P01 if missing. */
Oid
resilience_relid(const char *name)
{
	Oid			relid = get_relname_relid(name, get_namespace_oid("resilience", false));

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"resilience.%s\" does not exist", name),
				 errhint("Reinstall the extension: DROP EXTENSION resilience; CREATE EXTENSION resilience.")));
	return relid;
}

/* The owner of the extension's tables (cached; see the header). */
Oid
resilience_owner(void)
{
	static bool registered = false;
	HeapTuple	tuple;
	Oid			relid;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(owner_relcache_callback, (Datum) 0);
		registered = true;
	}
	if (owner_valid)
		return cached_owner;
	owner_valid = true;			/* an invalidation from here on unsets it */
	relid = resilience_relid(OWNER_ANCHOR_TABLE);
	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tuple))
	{
		owner_valid = false;
		elog(ERROR, "cache lookup failed for relation %u", relid);
	}
	cached_owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);
	owner_anchor_relid = relid;
	return cached_owner;
}

/*
 * Act as role, in a security-restricted operation, with search_path pinned
 * unless pin_path is false, until resilience_restore_user(save).
 */
void
resilience_become(Oid role, bool pin_path, ResilienceUser *save)
{
	GetUserIdAndSecContext(&save->userid, &save->sec_context);
	SetUserIdAndSecContext(role, save->sec_context |
						   SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	save->guc_level = 0;
	if (pin_path)
	{
		save->guc_level = NewGUCNestLevel();
		(void) set_config_option("search_path", RESILIENCE_SEARCH_PATH,
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
								 true, 0, false);
	}
}

/* Act as the owner of the extension's tables (resilience_become). */
void
resilience_become_owner(bool pin_path, ResilienceUser *save)
{
	resilience_become(resilience_owner(), pin_path, save);
}

/* Revert the settings changed since resilience_become and switch back. */
void
resilience_restore_user(const ResilienceUser *save)
{
	if (save->guc_level > 0)
		AtEOXact_GUC(false, save->guc_level);
	SetUserIdAndSecContext(save->userid, save->sec_context);
}

/*
 * Run fn(arg) in a subtransaction of the current transaction: NULL if it
 * returned (its work stays, committed into the caller's transaction), else
 * the error it raised, copied into the caller's memory context, with the
 * subtransaction rolled back and the user and security context as they
 * were on entry (fn may have switched with resilience_become).  What to do
 * with the error is the caller's: a cancel is usually raised again.  So
 * one step, command or schedule that fails never aborts the work around
 * it.
 */
ErrorData *
resilience_run_caught(void (*fn) (void *arg), void *arg)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;
	Oid			userid;
	int			sec_context;

	GetUserIdAndSecContext(&userid, &sec_context);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		SetUserIdAndSecContext(userid, sec_context);
	}
	PG_END_TRY();
	return edata;
}
