/*-------------------------------------------------------------------------
 *
 * tenants.c
 *		Roles isolated from each other: the owner of each consumer name,
 *		inbox consumer, lease, stream and saga, and who may act on it
 *		(docs/operations.md, "Roles and tenants").
 *
 * The rule: the owner role, the roles that have its privileges (members
 * that inherit it) and resilience_admin may act on a thing; any other role
 * gets 42501 and nothing changes.  Superusers have every role's privileges.
 *
 * Where an owner is recorded:
 *	- names that have no row of their own (outbox queue consumers, inbox
 *	  consumers) in resilience.owners, by the first role that uses them;
 *	- leases, streams and sagas in their own row (owner_role), by the role
 *	  that creates the row (lock_acquire of a new name, the first
 *	  append_events, saga_start);
 *	- idempotency keys in their own row too (owner_role, by the role whose
 *	  begin creates or restarts the row; src/idempotency.c, "Owners"): a key
 *	  lives for its ttl, so it has no declared owner and no set_owner;
 *	- an admin declares or transfers an owner with resilience.set_owner; a
 *	  declared lease or stream owner is also kept in resilience.owners, so
 *	  that it outlives the row (a reaped lease) and applies to a name not
 *	  used yet.
 * Rows from 0.1 have no owner: the first role that uses them after the
 * update becomes their owner, exactly as for a new name.  Sagas started
 * before the update take replies from any resilience_user, as in 0.1.
 *
 * Cost on the hot paths: consumer names are looked up once per backend and
 * cached (resilience.owners changes only through set_owner, which sends a
 * relcache invalidation; a claim made by a transaction that aborts empties
 * the cache); leases and streams carry their owner in the row the call
 * reads or writes anyway.  has_privs_of_role keeps its own per-backend
 * cache of role memberships.
 *
 * Without the 0.2 schema (the new library on a 0.1 schema, before ALTER
 * EXTENSION ... UPDATE) there is no resilience.owners and nothing is
 * checked, as in 0.1.
 *
 *-------------------------------------------------------------------------
 */
#include "resilience.h"

#include "tenants.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "funcapi.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/varlena.h"

#define TENANT_NAME_MAX 255
#define OWNER_CACHE_MAX 4096

const char *const tenant_kind_names[NUM_TENANT_KINDS] = {
	[TENANT_OUTBOX_CONSUMER] = "outbox_consumer",
	[TENANT_INBOX_CONSUMER] = "inbox_consumer",
	[TENANT_LEASE] = "lease",
	[TENANT_STREAM] = "stream",
	[TENANT_SAGA] = "saga",
};
StaticAssertDecl(lengthof(tenant_kind_names) == NUM_TENANT_KINDS,
				 "one name per tenant kind");

/* The words the errors use. */
static const char *const kind_labels[NUM_TENANT_KINDS] = {
	[TENANT_OUTBOX_CONSUMER] = "outbox consumer",
	[TENANT_INBOX_CONSUMER] = "inbox consumer",
	[TENANT_LEASE] = "lease",
	[TENANT_STREAM] = "stream",
	[TENANT_SAGA] = "saga",
};

/* Cached owner of a name in resilience.owners. */
typedef struct OwnerCacheKey
{
	int			kind;
	char		name[TENANT_NAME_MAX + 1];
} OwnerCacheKey;

typedef struct OwnerCacheEntry
{
	OwnerCacheKey key;
	Oid			owner;
} OwnerCacheEntry;

static HTAB *owner_cache = NULL;
static bool claimed_in_xact = false;	/* a claim of ours may roll back */
static bool callbacks_registered = false;
static Oid	owners_relid = InvalidOid;
static int	owners_exist = -1;	/* -1: not known yet */
static Oid	admin_role = InvalidOid;

PG_FUNCTION_INFO_V1(tenant_check_sql);
PG_FUNCTION_INFO_V1(set_owner);
PG_FUNCTION_INFO_V1(stream_gate);

/* Forget the cached owners. */
static void
owner_cache_reset(void)
{
	if (owner_cache)
		hash_destroy(owner_cache);
	owner_cache = NULL;
}

/* Relcache callback: resilience.owners changed (set_owner), or everything did. */
static void
tenants_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == owners_relid)
	{
		owner_cache_reset();
		owners_exist = -1;
	}
}

/* Syscache callback: roles changed (resilience_admin dropped and created again). */
static void
tenants_role_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	admin_role = InvalidOid;
}

/* A claim this (sub)transaction made is gone with its abort: forget it. */
static void
tenants_xact_callback(XactEvent event, void *arg)
{
	if ((event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT) && claimed_in_xact)
		owner_cache_reset();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		claimed_in_xact = false;
}

/* The same for a rolled-back subtransaction (a savepoint, a plpgsql block). */
static void
tenants_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB && claimed_in_xact)
		owner_cache_reset();
}

/* Register the callbacks once per backend. */
static void
register_callbacks(void)
{
	if (callbacks_registered)
		return;
	CacheRegisterRelcacheCallback(tenants_relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(AUTHNAME, tenants_role_callback, (Datum) 0);
	RegisterXactCallback(tenants_xact_callback, NULL);
	RegisterSubXactCallback(tenants_subxact_callback, NULL);
	callbacks_registered = true;
}

bool
tenants_enabled(void)
{
	if (owners_exist < 0)
	{
		Oid			nsp;

		register_callbacks();
		nsp = get_namespace_oid("resilience", true);
		owners_relid = OidIsValid(nsp) ? get_relname_relid("owners", nsp) : InvalidOid;
		owners_exist = OidIsValid(owners_relid) ? 1 : 0;
	}
	return owners_exist == 1;
}

bool
tenant_may_act(Oid caller, Oid owner)
{
	if (!OidIsValid(owner) || caller == owner || has_privs_of_role(caller, owner))
		return true;
	register_callbacks();
	if (!OidIsValid(admin_role))
		admin_role = get_role_oid("resilience_admin", true);
	return OidIsValid(admin_role) && has_privs_of_role(caller, admin_role);
}

void
tenant_deny(TenantKind kind, const char *name, Oid owner)
{
	char	   *role = GetUserNameFromId(owner, true);

	if (role == NULL)
		role = psprintf("%u", owner);	/* a dropped role */
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied for %s \"%s\"", kind_labels[kind], name),
			 errdetail("The %s belongs to role \"%s\"; only that role, its members and resilience_admin may use it.",
					   kind_labels[kind], role),
			 errhint("Be granted membership in role \"%s\", or ask a member of resilience_admin to declare the owner: SELECT resilience.set_owner('%s', name, role).",
					 role, tenant_kind_names[kind])));
}

void
tenant_check(TenantKind kind, const char *name, Oid owner, Oid caller)
{
	if (!tenant_may_act(caller, owner))
		tenant_deny(kind, name, owner);
}

/* The cache entry of kind `name` (created if enter), or NULL. */
static OwnerCacheEntry *
owner_cache_entry(TenantKind kind, const char *name, int len, bool enter)
{
	OwnerCacheKey key;
	bool		found;

	if (len > TENANT_NAME_MAX)
		return NULL;			/* longer than a key: never cached */
	if (owner_cache == NULL)
	{
		HASHCTL		ctl;

		if (!enter)
			return NULL;
		ctl.keysize = sizeof(OwnerCacheKey);
		ctl.entrysize = sizeof(OwnerCacheEntry);
		ctl.hcxt = CacheMemoryContext;
		owner_cache = hash_create("resilience owners", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	else if (enter && hash_get_num_entries(owner_cache) >= OWNER_CACHE_MAX)
		return NULL;			/* full: look the rest up each time */
	memset(&key, 0, sizeof(key));
	key.kind = kind;
	memcpy(key.name, name, len);
	return hash_search(owner_cache, &key, enter ? HASH_ENTER : HASH_FIND, &found);
}

/* Run one statement on resilience.owners (SPI connected); the owner found, or InvalidOid. */
static Oid
owners_statement(SPIPlanPtr *plan, const char *sql, int nargs, TenantKind kind,
				 const char *name, int len, Oid role)
{
	Oid			argtypes[3] = {TEXTOID, TEXTOID, OIDOID};
	Datum		values[3];
	bool		isnull;
	int			ret;

	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, argtypes);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	values[0] = CStringGetTextDatum(tenant_kind_names[kind]);
	values[1] = PointerGetDatum(cstring_to_text_with_len(name, len));
	values[2] = ObjectIdGetDatum(role);
	ret = SPI_execute_plan(*plan, values, NULL, false, 1);
	if (ret < 0)
		elog(ERROR, "reading resilience.owners failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return InvalidOid;
	return DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

static SPIPlanPtr lookup_plan = NULL;
static SPIPlanPtr claim_plan = NULL;

/* The owner of kind `name` in resilience.owners (cached), or InvalidOid. */
static Oid
owners_lookup(TenantKind kind, const char *name, int len)
{
	OwnerCacheEntry *e = owner_cache_entry(kind, name, len, false);
	Oid			owner;

	if (e)
		return e->owner;
	owner = owners_statement(&lookup_plan,
							 "SELECT owner::pg_catalog.oid FROM resilience.owners"
							 " WHERE kind OPERATOR(pg_catalog.=) $1 AND name OPERATOR(pg_catalog.=) $2",
							 2, kind, name, len, InvalidOid);
	if (OidIsValid(owner) && (e = owner_cache_entry(kind, name, len, true)) != NULL)
		e->owner = owner;
	return owner;
}

Oid
tenant_declared_owner(TenantKind kind, const char *name, int len)
{
	if (!tenants_enabled())
		return InvalidOid;
	return owners_lookup(kind, name, len);
}

void
tenant_claim(TenantKind kind, const char *name, int len, Oid caller)
{
	Oid			owner;
	OwnerCacheEntry *e;

	if (!tenants_enabled())
		return;
	owner = owners_lookup(kind, name, len);
	if (!OidIsValid(owner))
	{
		/* nobody owns it yet: the caller does from now on */
		owner = owners_statement(&claim_plan,
								 "INSERT INTO resilience.owners (kind, name, owner) VALUES ($1, $2, $3)"
								 " ON CONFLICT (kind, name) DO NOTHING RETURNING owner::pg_catalog.oid",
								 3, kind, name, len, caller);
		if (!OidIsValid(owner))
		{
			/* a concurrent transaction claimed it first: see its row */
			CommandCounterIncrement();
			owner = owners_lookup(kind, name, len);
			if (!OidIsValid(owner))
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg("could not record the owner of %s \"%s\"",
								kind_labels[kind], pnstrdup(name, len)),
						 errdetail("A concurrent transaction recorded it, and this transaction's snapshot cannot see it."),
						 errhint("Retry the transaction.")));
		}
		else
		{
			claimed_in_xact = true;
			if ((e = owner_cache_entry(kind, name, len, true)) != NULL)
				e->owner = owner;
		}
	}
	if (!tenant_may_act(caller, owner))
		tenant_deny(kind, pnstrdup(name, len), owner);
}

/*
 * _tenant_check(kind, name, owner, caller): raise 42501 unless caller may
 * act on kind `name` owned by owner (for the stream functions in SQL).
 */
Datum
tenant_check_sql(PG_FUNCTION_ARGS)
{
	char	   *kind = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int			k;

	for (k = 0; k < NUM_TENANT_KINDS; k++)
		if (strcmp(kind, tenant_kind_names[k]) == 0)
			break;
	if (k == NUM_TENANT_KINDS)
		elog(ERROR, "unknown kind \"%s\"", kind);
	if (!PG_ARGISNULL(2))
		tenant_check(k, text_to_cstring(PG_GETARG_TEXT_PP(1)), PG_GETARG_OID(2), PG_GETARG_OID(3));
	PG_RETURN_VOID();
}

/* Run sql (SPI connected) with args; returns SPI_processed. */
static uint64
run_sql(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls)
{
	int			ret = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (ret < 0)
		elog(ERROR, "set_owner failed: %s", SPI_result_code_string(ret));
	return SPI_processed;
}

/*
 * set_owner(kind, name, owner) — resilience_admin declares (or transfers)
 * the owner of a consumer name, inbox consumer, lease, stream or saga (by
 * id); owner NULL forgets it (the next role to use the name owns it).
 */
Datum
set_owner(PG_FUNCTION_ARGS)
{
	char	   *kind;
	text	   *name;
	int			len;
	int			k;
	Oid			types[3] = {TEXTOID, TEXTOID, OIDOID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	ResilienceUser save;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", PG_ARGISNULL(0) ? "kind" : "name")));
	kind = text_to_cstring(PG_GETARG_TEXT_PP(0));
	for (k = 0; k < NUM_TENANT_KINDS; k++)
		if (strcmp(kind, tenant_kind_names[k]) == 0)
			break;
	if (k == NUM_TENANT_KINDS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown kind \"%s\"", kind),
				 errhint("The kinds are outbox_consumer, inbox_consumer, lease, stream and saga.")));
	name = PG_GETARG_TEXT_PP(1);
	len = VARSIZE_ANY_EXHDR(name);
	if (len < 1 || len > TENANT_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("name must be 1 to %d bytes", TENANT_NAME_MAX),
				 errdetail("It is %d bytes.", len)));

	/* a 0.1 schema: ALTER EXTENSION resilience UPDATE adds resilience.owners */
	if (!tenants_enabled())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("owners cannot be declared before the extension is updated"),
				 errhint("Run ALTER EXTENSION resilience UPDATE.")));

	values[0] = CStringGetTextDatum(kind);
	values[1] = PointerGetDatum(name);
	values[2] = PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2);
	nulls[2] = PG_ARGISNULL(2) ? 'n' : ' ';

	SPI_connect();
	resilience_become_owner(true, &save);
	if (k == TENANT_SAGA)
	{
		char	   *str = text_to_cstring(name);
		char	   *end;
		int64		id;

		errno = 0;
		id = strtoi64(str, &end, 10);
		if (errno != 0 || *end != '\0' || end == str || id <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a saga is named by its id"),
					 errdetail("\"%s\" is not a saga id.", text_to_cstring(name))));
		if (run_sql("UPDATE resilience.sagas SET owner_role = $3"
					" WHERE id OPERATOR(pg_catalog.=) $2::pg_catalog.int8",
					3, types, values, nulls) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("saga %s does not exist", text_to_cstring(name))));
	}
	else
	{
		if (PG_ARGISNULL(2))
			run_sql("DELETE FROM resilience.owners"
					" WHERE kind OPERATOR(pg_catalog.=) $1 AND name OPERATOR(pg_catalog.=) $2",
					2, types, values, nulls);
		else
			run_sql("INSERT INTO resilience.owners AS o (kind, name, owner, declared) VALUES ($1, $2, $3, true)"
					" ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner, declared = true,"
					" since = pg_catalog.now()",
					3, types, values, nulls);
		if (k == TENANT_LEASE)
			run_sql("UPDATE resilience.leases SET owner_role = $3 WHERE name OPERATOR(pg_catalog.=) $2",
					3, types, values, nulls);
		else if (k == TENANT_STREAM)
			run_sql("UPDATE resilience.streams SET owner_role = $3 WHERE stream OPERATOR(pg_catalog.=) $2",
					3, types, values, nulls);
	}
	resilience_restore_user(&save);
	SPI_finish();
	/* every backend forgets its cached owners when this commits */
	CacheInvalidateRelcacheByRelid(owners_relid);
	PG_RETURN_VOID();
}

/* A stream function's statement, prepared once per backend. */
typedef struct GatePlan
{
	Oid			fn;				/* the public function */
	SPIPlanPtr	plan;			/* SELECT resilience._<name>($1, ..., caller) */
	bool		retset;
	Oid			rettype;
	int			nargs;			/* of the public function */
} GatePlan;

#define MAX_GATES 8
static GatePlan gates[MAX_GATES];
static int	ngates = 0;

/* The prepared statement of stream function fn (SPI connected). */
static GatePlan *
gate_plan(Oid fn)
{
	GatePlan   *g;
	Oid		   *argtypes;
	Oid			types[FUNC_MAX_ARGS];
	StringInfoData sql;
	int			i;

	for (i = 0; i < ngates; i++)
		if (gates[i].fn == fn)
			return &gates[i];
	if (ngates == MAX_GATES)
		elog(ERROR, "too many stream functions");
	g = &gates[ngates];
	g->retset = get_func_retset(fn);
	g->rettype = get_func_signature(fn, &argtypes, &g->nargs);
	if (g->nargs + 1 > FUNC_MAX_ARGS)
		elog(ERROR, "too many arguments");
	initStringInfo(&sql);
	appendStringInfo(&sql, "SELECT %sresilience.%s(", g->retset ? "* FROM " : "",
					 quote_identifier(psprintf("_%s", get_func_name(fn))));
	for (i = 0; i < g->nargs; i++)
	{
		types[i] = argtypes[i];
		appendStringInfo(&sql, "$%d, ", i + 1);
	}
	types[g->nargs] = OIDOID;
	appendStringInfo(&sql, "$%d)", g->nargs + 1);
	g->plan = SPI_prepare(sql.data, g->nargs + 1, types);
	if (g->plan == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql.data, SPI_result_code_string(SPI_result));
	SPI_keepplan(g->plan);
	g->fn = fn;
	ngates++;
	return g;
}

/*
 * The stream functions (append_events, read_stream, stream_version): run
 * resilience._<name>(args..., caller) as the extension's owner, where caller
 * is the role calling, which the SQL body checks against the stream's
 * owner.  A SECURITY DEFINER function cannot see who called it; this one is
 * SECURITY INVOKER and switches itself.
 */
Datum
stream_gate(PG_FUNCTION_ARGS)
{
	GatePlan   *g;
	Datum		values[FUNC_MAX_ARGS];
	char		nulls[FUNC_MAX_ARGS];
	ResilienceUser save;
	int			ret;
	Datum		result = (Datum) 0;
	bool		isnull = true;
	MemoryContext caller_cxt = CurrentMemoryContext;

	SPI_connect();
	g = gate_plan(fcinfo->flinfo->fn_oid);
	for (int i = 0; i < g->nargs; i++)
	{
		values[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
	values[g->nargs] = ObjectIdGetDatum(GetUserId());
	nulls[g->nargs] = ' ';
	if (g->retset)
	{
		MemoryContext spi_cxt = MemoryContextSwitchTo(caller_cxt);

		InitMaterializedSRF(fcinfo, 0);
		MemoryContextSwitchTo(spi_cxt);
	}
	/*
	 * search_path is not pinned here: the statement names everything by
	 * schema and type oid, and the internal functions pin it themselves
	 * (SET search_path), so pinning it here too would only add a second
	 * GUC save and restore to every call.
	 */
	resilience_become_owner(false, &save);
	ret = SPI_execute_plan(g->plan, values, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "resilience stream function failed: %s", SPI_result_code_string(ret));
	if (g->retset)
	{
		ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
		int			natts = rsinfo->setDesc->natts;
		Datum	   *v = palloc(sizeof(Datum) * natts);
		bool	   *n = palloc(sizeof(bool) * natts);

		for (uint64 r = 0; r < SPI_processed; r++)
		{
			for (int c = 0; c < natts; c++)
				v[c] = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, c + 1, &n[c]);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
		}
	}
	else if (SPI_processed == 1)
	{
		result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull)
		{
			int16		typlen;
			bool		typbyval;

			get_typlenbyval(g->rettype, &typlen, &typbyval);
			result = SPI_datumTransfer(result, typbyval, typlen);
		}
	}
	resilience_restore_user(&save);
	SPI_finish();
	if (g->retset)
		return (Datum) 0;
	if (isnull)
		PG_RETURN_NULL();
	return result;
}

/*
 * The oid of the role regrole's output names (an identifier, quoted if need
 * be; digits for a role that was dropped), or OID_MAX for a role that does
 * not exist here (nobody's but superusers' and resilience_admin's): never
 * InvalidOid, which would be no owner at all.  Owners read by name: with
 * Citus a row lives on a worker, where the same role has another oid.
 */
Oid
tenant_role_by_name(const char *s)
{
	char	   *raw = pstrdup(s);
	List	   *names;
	Oid			role = InvalidOid;

	/* digits are a dropped role's oid, not a role named so */
	if (strspn(s, "0123456789") != strlen(s) &&
		SplitIdentifierString(raw, '.', &names) && list_length(names) == 1)
		role = get_role_oid(linitial(names), true);
	return OidIsValid(role) ? role : OID_MAX;
}
