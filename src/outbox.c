/*-------------------------------------------------------------------------
 *
 * outbox.c
 *		The transactional outbox: publishing, routes, claims, the pull API
 *		(queue routes), dead letters and redrive.
 *
 * Publishing
 * ----------
 * outbox_publish checks its arguments, matches the event against the routes
 * (cached per backend, reloaded when resilience.outbox_routes changes) and
 * takes its id from resilience.outbox_seq, but writes nothing: the event is
 * kept in transaction memory (dropped with a rolled-back subtransaction) and
 * written when the transaction commits, from the pre-commit callback:
 *
 *	1. take a transaction lock on each distinct key of the transaction's
 *	   events, in one global order (by 64-bit hash), so two committing
 *	   transactions never deadlock on them;
 *	2. only then take each event's seq from the same sequence and insert one
 *	   row per matching route (or one unrouted row).
 *
 * The key locks are released after the commit is visible.  So if two
 * transactions publish events with key k, the one that commits first has
 * inserted its rows and become visible before the other can take its seq:
 * for one key, seq order is commit order.  Ids (taken at publish) carry no
 * order; they are what consumers deduplicate on.
 *
 * Event headers are checked at publication (headers_problem: valid names
 * and values, at most HEADERS_MAX headers of HEADERS_TOTAL_MAX bytes, no
 * name the relay, the transport or a matching route sets) and again by the
 * sinks before each send (outbox_item_headers), since a row may have been
 * written before these checks or by hand: a bad one makes its event a dead
 * letter, and a header its route sets too is dropped (the route's wins).
 *
 * Claims: which events may go now
 * -------------------------------
 * The rows of a route are read in seq order, all of them that are not yet
 * delivered (in flight and waiting rows included), so the first row met for
 * a key is that key's oldest undelivered event.  A key's rows are taken
 * while they are ready (not claimed, not_before reached); the first row that
 * is not ready blocks the rest of its key.  Rows without a key are taken
 * when ready.  No cursor or high-water mark is kept between claims: a row
 * whose transaction committed late (with a lower id, or even a lower seq
 * than rows already delivered for other keys) is simply read next time.
 *
 * Concurrent claimers (the worker, relay_outbox by hand, queue consumers)
 * read without locks, then lock the chosen rows FOR UPDATE SKIP LOCKED,
 * which re-checks that each is still unclaimed (rows the relay delivers in
 * that same transaction, NOTIFY, are read by this step and stay only
 * locked: hold_in_claim).  A chosen row that could not
 * be locked (another claimer has it, or it changed) drops every later row of
 * its key from the claim, so a key is never claimed past a row someone else
 * holds.  A row of key k that did not exist when the rows were read
 * committed later, so it has a higher seq than every row of k that was read.
 *
 * The pull API (outbox_claim, outbox_ack, outbox_nack) is SECURITY INVOKER:
 * it checks that the calling role may use the consumer name (src/tenants.c;
 * the first role to use a name owns it), then acts as the tables' owner.
 *
 * Fair sharing (route option partition_by): a partitioned route's rows are
 * read round-robin over the partitions, each partition in seq order; with a
 * JSON path a key may span partitions, so a key's candidates are kept only
 * as an unbroken run from its oldest row (open_partitioned_scan,
 * drop_keys_out_of_order).
 *
 * Long polls: outbox_claim(..., wait) sleeps on the condition variable of
 * its consumer name's slot (relay.c's shared state); a transaction that
 * wrote rows for a queue route broadcasts that slot after its commit is
 * visible (never on abort), and the claim looks again with a new snapshot.
 *
 * Trace context: outbox_publish records traceparent/tracestate (arguments,
 * else the event's headers, else resilience.traceparent/tracestate) as
 * event headers, which every sink sends.
 *
 * Sinks: an operations table (OutboxSinkOps, below); the allow-list the
 * sinks that connect out share lives here too.
 *
 * Routes with on_dead_letter = 'block' also treat a key with a blocking
 * dead letter as blocked; the dead letters are read both before and after
 * the rows, so a dead letter being moved in or redriven out meanwhile is
 * seen in one of the two.
 *
 *-------------------------------------------------------------------------
 */
#include "outbox.h"
#include "tenants.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonpath.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"
#include "utils/varlena.h"

/* locktag field 4 of the key locks; locks.c uses 3, PostgreSQL 1 and 2 */
#define OUTBOX_LOCK_SPACE 4
#define OUTBOX_KEY_SEED UINT64CONST(0x6f7574626f786b79)
#define HEADER_NAME_MAX 128
#define HEADER_VALUE_MAX 4096
#define HEADERS_MAX 64
#define HEADERS_TOTAL_MAX 8192
#define CLAIM_WAIT_MAX_US (INT64CONST(3600) * USECS_PER_SEC)

PG_FUNCTION_INFO_V1(outbox_publish);
PG_FUNCTION_INFO_V1(outbox_route_check);
PG_FUNCTION_INFO_V1(outbox_routes_invalidate);
PG_FUNCTION_INFO_V1(outbox_claim);
PG_FUNCTION_INFO_V1(outbox_ack);
PG_FUNCTION_INFO_V1(outbox_nack);
PG_FUNCTION_INFO_V1(outbox_redrive);
PG_FUNCTION_INFO_V1(outbox_redact);

/* An event published by this transaction, written at commit. */
typedef struct PendingEvent
{
	int64		id;
	SubTransactionId subid;
	text	   *topic;
	text	   *key;			/* NULL for none */
	Jsonb	   *payload;
	Jsonb	   *headers;
	TimestampTz published_at;
	TimestampTz not_before;
	int			nroutes;		/* 0: unrouted */
	int32	   *routes;
	bool	   *pull;			/* per route: a queue route */
} PendingEvent;

/* What a publishing backend remembers of a route. */
typedef struct CachedRoute
{
	int32		id;
	bool		push;			/* delivered by the relay (not queue) */
	bool		enabled;		/* a paused route needs no relay woken */
	int			claim_slot;		/* pulled: its consumer's claim slot */
	OutboxPayloadKind payload;
	text	   *pattern;
	int			nheaders;
	char	  **header_names;	/* the names of the headers it sets */
} CachedRoute;

static List *pending_events = NIL;	/* in TopTransactionContext */
static bool wake_at_commit = false;
static uint64 wake_claimers_at_commit = 0;	/* claim slots with new events */
static bool callbacks_registered = false;

static MemoryContext route_cache_context = NULL;
static CachedRoute *route_cache = NULL;
static int	route_cache_len = 0;
static bool route_cache_valid = false;

static void outbox_xact_callback(XactEvent event, void *arg);
static void outbox_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									SubTransactionId parentSubid, void *arg);
static void wake_relay_at_commit(void);

/*
 * OIDs of our relations.  An invalidation only marks them to
 * be looked up again (vacuum and analyze send them all the time); they are
 * never zeroed, so a use right after lookup_relations() stays valid even if
 * an invalidation arrives in between.
 */
static bool relations_valid = false;
static Oid	cached_outbox_relid = InvalidOid;
static Oid	cached_routes_relid = InvalidOid;
static Oid	cached_seq_relid = InvalidOid;
static SPIPlanPtr insert_plan = NULL;

/* ---- settings, ownership, names ---- */

/*
 * An integer setting, also when the library is not preloaded (then only a
 * placeholder may exist): its value parsed with its unit, or dflt.
 */
int
outbox_setting_int(const char *name, int dflt, int flags)
{
	const char *value = GetConfigOption(name, true, false);
	int			result;

	if (value == NULL || !parse_int(value, &result, flags, NULL))
		return dflt;
	return result;
}

/*
 * Reload the routes when they change; look up our relations again.
 */
static void
outbox_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == cached_routes_relid)
		route_cache_valid = false;
	if (relid == InvalidOid || relid == cached_outbox_relid ||
		relid == cached_routes_relid || relid == cached_seq_relid)
		relations_valid = false;
}

static void
register_relcache_callback(void)
{
	static bool registered = false;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(outbox_relcache_callback, (Datum) 0);
		registered = true;
	}
}

/* Look up the outbox relations (once per backend, again after invalidation). */
static void
lookup_relations(void)
{
	Oid			nsp;
	Oid			outbox_relid;
	Oid			routes_relid;
	Oid			seq_relid;

	register_relcache_callback();
	if (relations_valid)
		return;
	relations_valid = true;		/* an invalidation from here on unsets it */
	nsp = get_namespace_oid("resilience", false);
	outbox_relid = get_relname_relid("outbox", nsp);
	routes_relid = get_relname_relid("outbox_routes", nsp);
	seq_relid = get_relname_relid("outbox_seq", nsp);
	if (!OidIsValid(outbox_relid) || !OidIsValid(routes_relid) || !OidIsValid(seq_relid))
	{
		relations_valid = false;
		elog(ERROR, "the resilience outbox tables do not exist");
	}
	cached_outbox_relid = outbox_relid;
	cached_routes_relid = routes_relid;
	cached_seq_relid = seq_relid;
}

/* Count n events of a route (delivered, retried, dead) when this transaction commits. */
void
outbox_count(ResilienceCounter counter, int32 route_id, uint64 n)
{
	char		label[16];

	snprintf(label, sizeof(label), "%d", route_id);
	metrics_add_at_commit(counter, 0, label, n);
}

/* A target fit for views and logs: no user info, no query string. */
char *
outbox_redact_target(const char *target)
{
	const char *scheme_end = strstr(target, "://");
	const char *host;
	const char *at;
	const char *path_end;
	StringInfoData buf;

	if (scheme_end == NULL)
		return pstrdup(target);
	host = scheme_end + 3;
	initStringInfo(&buf);
	appendBinaryStringInfo(&buf, target, host - target);
	at = strchr(host, '@');
	if (at && at < host + strcspn(host, "/?#"))
		host = at + 1;
	path_end = host + strcspn(host, "?#");
	appendBinaryStringInfo(&buf, host, path_end - host);
	if (*path_end != '\0')
		appendStringInfoString(&buf, "?...");
	return buf.data;
}

/* _outbox_redact(target) → the target without credentials or query string. */
Datum
outbox_redact(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(outbox_redact_target(text_to_cstring(PG_GETARG_TEXT_PP(0)))));
}

/* ---- destinations: the allow-list (http, amqp) ---- */

/* Is host one of loopback's names or addresses? */
static bool
host_is_loopback(const char *host)
{
	struct in_addr a4;
	struct in6_addr a6;
	char		bare[INET6_ADDRSTRLEN + 2];
	size_t		len = strlen(host);

	if (pg_strcasecmp(host, "localhost") == 0)
		return true;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (len >= 2 && host[0] == '[' && host[len - 1] == ']' && len - 2 < sizeof(bare))
	{
		memcpy(bare, host + 1, len - 2);
		bare[len - 2] = '\0';
		host = bare;
	}
	return inet_pton(AF_INET6, host, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

/*
 * Parse an IP address or CIDR range ("10.0.0.0/8", "::1", "[fe80::]/10")
 * into r; false if text is neither.
 */
static bool
parse_range(const char *text, OutboxAddressRange *r)
{
	char		buf[INET6_ADDRSTRLEN + 8];
	char	   *slash;
	char	   *addr = buf;
	size_t		len;
	int			max;

	if (strlen(text) >= sizeof(buf))
		return false;
	strcpy(buf, text);
	slash = strchr(buf, '/');
	if (slash)
		*slash = '\0';
	len = strlen(addr);
	if (len >= 2 && addr[0] == '[' && addr[len - 1] == ']')
	{
		addr[len - 1] = '\0';
		addr++;
	}
	memset(r, 0, sizeof(*r));
	if (inet_pton(AF_INET, addr, r->addr) == 1)
		r->family = AF_INET;
	else if (inet_pton(AF_INET6, addr, r->addr) == 1)
		r->family = AF_INET6;
	else
		return false;
	max = r->family == AF_INET ? 32 : 128;
	r->bits = max;
	if (slash)
	{
		char	   *end;
		long		bits = strtol(slash + 1, &end, 10);

		if (end == slash + 1 || *end != '\0' || bits < 0 || bits > max)
			return false;
		r->bits = (int) bits;
	}
	return true;
}

/* Is the address of family (4 or 16 bytes at addr) within r? */
static bool
address_in_range(const OutboxAddressRange *r, int family, const unsigned char *addr)
{
	int			full = r->bits / 8;
	int			rest = r->bits % 8;

	if (r->family != family)
		return false;
	if (memcmp(r->addr, addr, full) != 0)
		return false;
	if (rest == 0)
		return true;
	return ((r->addr[full] ^ addr[full]) & (0xFF << (8 - rest)) & 0xFF) == 0;
}

/* Is host an IP address (bracketed for IPv6 in URLs) within range entry? */
static bool
host_in_range(const char *host, const char *entry)
{
	OutboxAddressRange r;
	OutboxAddressRange h;

	if (!parse_range(entry, &r) || !parse_range(host, &h) || strchr(host, '/') != NULL)
		return false;
	return address_in_range(&r, h.family, h.addr);
}

/*
 * The address policy in force (palloc'd): loopback only, or the IP and CIDR
 * entries of the allow-list.  The sinks make it before connecting, so that
 * checking an address (in libcurl's callback) allocates nothing.
 */
OutboxAddressPolicy *
outbox_address_policy(void)
{
	OutboxAddressPolicy *p = palloc0(sizeof(OutboxAddressPolicy));
	char	   *allow = outbox_allow_list();
	List	   *entries = NIL;
	ListCell   *lc;

	p->loopback_only = allow[0] == '\0';
	if (p->loopback_only || !SplitGUCList(pstrdup(allow), ',', &entries))
		return p;
	p->ranges = palloc0(sizeof(OutboxAddressRange) * Max(list_length(entries), 1));
	foreach(lc, entries)
		if (parse_range(lfirst(lc), &p->ranges[p->nranges]))
			p->nranges++;
	return p;
}

/*
 * The special range addr (family, 4 or 16 bytes) is in: "loopback",
 * "link-local", "private" or "unspecified"; NULL for any other address.
 */
static const char *
special_range(int family, const unsigned char *a)
{
	if (family == AF_INET)
	{
		if (a[0] == 127)
			return "loopback";
		if (a[0] == 169 && a[1] == 254)
			return "link-local";
		if (a[0] == 10 || (a[0] == 172 && (a[1] & 0xF0) == 16) || (a[0] == 192 && a[1] == 168))
			return "private";
		if (a[0] == 0)
			return "unspecified";
		return NULL;
	}
	if (IN6_IS_ADDR_LOOPBACK((const struct in6_addr *) a))
		return "loopback";
	if (IN6_IS_ADDR_UNSPECIFIED((const struct in6_addr *) a))
		return "unspecified";
	if (a[0] == 0xFE && (a[1] & 0xC0) == 0x80)
		return "link-local";
	if ((a[0] & 0xFE) == 0xFC)
		return "private";
	return NULL;
}

/*
 * May a sink connect to addr under policy?  If not, why says so, naming the
 * address.  Allocates nothing and never raises (it runs inside libcurl).
 */
bool
outbox_address_ok(const OutboxAddressPolicy *policy, const struct sockaddr *addr,
				  char *why, size_t len)
{
	unsigned char bytes[16];
	int			family = addr->sa_family;
	char		text[INET6_ADDRSTRLEN];
	const char *range;
	int			i;

	if (family == AF_INET)
		memcpy(bytes, &((const struct sockaddr_in *) addr)->sin_addr, 4);
	else if (family == AF_INET6)
	{
		const struct in6_addr *a6 = &((const struct sockaddr_in6 *) addr)->sin6_addr;

		memcpy(bytes, a6, 16);
		if (IN6_IS_ADDR_V4MAPPED(a6))
		{
			/* ::ffff:a.b.c.d is a.b.c.d */
			family = AF_INET;
			memmove(bytes, bytes + 12, 4);
		}
	}
	else
	{
		snprintf(why, len, "address family %d not allowed", family);
		return false;
	}
	if (inet_ntop(family, bytes, text, sizeof(text)) == NULL)
		strlcpy(text, "?", sizeof(text));
	range = special_range(family, bytes);
	if (policy->loopback_only)
	{
		if (range != NULL && strcmp(range, "loopback") == 0)
			return true;
		snprintf(why, len, "address %s not allowed: not loopback "
				 "(resilience.outbox_allowed_hosts is empty: loopback only)", text);
		return false;
	}
	if (range == NULL)
		return true;
	for (i = 0; i < policy->nranges; i++)
		if (address_in_range(&policy->ranges[i], family, bytes))
			return true;
	snprintf(why, len, "address %s not allowed: %s, and no IP or CIDR entry of "
			 "resilience.outbox_allowed_hosts covers it", text, range);
	return false;
}

/*
 * The allow-list in force for the sinks that connect out (http, amqp): the
 * hosts of resilience.outbox_allowed_hosts and of its older name
 * resilience.outbox_http_allowed_hosts, comma-separated ("" when loopback
 * only).
 */
char *
outbox_allow_list(void)
{
	const char *value;
	const char *old;

	if (!resilience_preloaded)
		return "";
	value = GetConfigOption("resilience.outbox_allowed_hosts", true, false);
	old = GetConfigOption("resilience.outbox_http_allowed_hosts", true, false);
	if (value == NULL || value[0] == '\0')
		return old ? pstrdup(old) : "";
	if (old == NULL || old[0] == '\0')
		return pstrdup(value);
	return psprintf("%s, %s", value, old);
}

/* May a sink that connects out call host, given allow (a comma-separated list)? */
static bool
host_allowed(const char *host, const char *allow)
{
	List	   *entries = NIL;
	char	   *copy = pstrdup(allow);
	ListCell   *lc;

	if (allow[0] == '\0')
		return host_is_loopback(host);
	if (!SplitGUCList(copy, ',', &entries))
		return false;
	foreach(lc, entries)
	{
		const char *entry = lfirst(lc);
		size_t		hlen = strlen(host);
		size_t		elen = strlen(entry);

		if (pg_strcasecmp(entry, host) == 0)
			return true;
		if (host_in_range(host, entry))
			return true;
		/* *.example.com: any subdomain of example.com */
		if (elen > 2 && entry[0] == '*' && entry[1] == '.' && hlen > elen - 1 &&
			pg_strcasecmp(host + hlen - (elen - 1), entry + 1) == 0)
			return true;
	}
	return false;
}

/*
 * May a sink that connects out name host in a target?  NULL if so, else why
 * not (naming the setting).
 */
const char *
outbox_host_problem(const char *host)
{
	char	   *allow = outbox_allow_list();

	if (host_allowed(host, allow))
		return NULL;
	return psprintf("host \"%s\" is not allowed by resilience.outbox_allowed_hosts%s",
					host, allow[0] ? "" : " (empty: loopback only)");
}

/* ---- routes ---- */

/*
 * The sinks: adding one is its file and a line here (and its extern in
 * outbox.h).
 */
static const OutboxSinkOps *const sinks[] = {
	&outbox_sink_notify,
	&outbox_sink_http,
	&outbox_sink_queue,
	&outbox_sink_amqp,
};

/* Every sink, for the relay's dispatch. */
const OutboxSinkOps *const *
outbox_sinks(int *n)
{
	*n = lengthof(sinks);
	return sinks;
}

void
outbox_route_error(const char *msg, const char *detail, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid outbox route: %s", msg),
			 detail ? errdetail_internal("%s", detail) : 0,
			 hint ? errhint("%s", hint) : 0));
}

/* A whole number from a JSON value, or an error naming the option. */
int
outbox_option_int(JsonbValue *v, const char *name, int min, int max)
{
	int64		n;

	if (v->type != jbvNumeric)
		outbox_route_error(psprintf("option \"%s\" must be a number", name), NULL, NULL);
	n = DatumGetInt64(DirectFunctionCall1(numeric_int8, NumericGetDatum(v->val.numeric)));
	if (n < min || n > max)
		outbox_route_error(psprintf("option \"%s\" must be between %d and %d", name, min, max),
					psprintf("It is %lld.", (long long) n), NULL);
	return (int) n;
}

bool
outbox_option_bool(JsonbValue *v, const char *name)
{
	if (v->type != jbvBool)
		outbox_route_error(psprintf("option \"%s\" must be true or false", name), NULL, NULL);
	return v->val.boolean;
}

char *
outbox_option_string(JsonbValue *v, const char *name)
{
	if (v->type != jbvString)
		outbox_route_error(psprintf("option \"%s\" must be a string", name), NULL, NULL);
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* ---- trace context (W3C Trace Context) ---- */

#define TRACEPARENT_MAX 256
#define TRACESTATE_MAX 512
#define TRACESTATE_MEMBERS_MAX 32
#define TRACESTATE_PART_MAX 256

static bool
lower_hex(const char *s, int n)
{
	for (int i = 0; i < n; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	return true;
}

static bool
all_zeros(const char *s, int n)
{
	for (int i = 0; i < n; i++)
		if (s[i] != '0')
			return false;
	return true;
}

/*
 * What is wrong with a traceparent (NULL: nothing): version-traceid-
 * parentid-flags, 2-32-16-2 lowercase hex digits; a later version may
 * append fields after a dash.
 */
static const char *
traceparent_problem(const char *s, int len)
{
	if (len < 55 || len > TRACEPARENT_MAX || !lower_hex(s, 2) || s[2] != '-' ||
		!lower_hex(s + 3, 32) || s[35] != '-' || !lower_hex(s + 36, 16) || s[52] != '-' ||
		!lower_hex(s + 53, 2))
		return "it must be version-traceid-parentid-flags in lowercase hex, as in 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
	if (strncmp(s, "ff", 2) == 0)
		return "version ff is invalid";
	if (strncmp(s, "00", 2) == 0 && len != 55)
		return "a version 00 traceparent is 55 characters long";
	if (len > 55 && s[55] != '-')
		return "fields after the flags must follow a dash";
	if (all_zeros(s + 3, 32))
		return "the trace id is all zeros";
	if (all_zeros(s + 36, 16))
		return "the parent id is all zeros";
	return NULL;
}

/*
 * What is wrong with a tracestate (NULL: nothing): at most 32 comma-
 * separated key=value members, 512 characters in all; keys of lowercase
 * letters, digits and _-*\/ (one @ for multi-tenant keys); values of
 * printable ASCII without comma or equals sign.
 */
static const char *
tracestate_problem(const char *s, int len)
{
	int			members = 0;
	int			i = 0;

	if (len > TRACESTATE_MAX)
		return "it is longer than 512 characters";
	while (i <= len)
	{
		int			end = i;
		int			eq = -1;
		int			a = i;
		int			b;
		int			ats = 0;

		while (end < len && s[end] != ',')
			end++;
		/* trim optional white space around the member */
		while (a < end && (s[a] == ' ' || s[a] == '\t'))
			a++;
		b = end;
		while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t'))
			b--;
		if (a < b)
		{
			if (++members > TRACESTATE_MEMBERS_MAX)
				return "it has more than 32 members";
			for (int j = a; j < b; j++)
				if (s[j] == '=')
				{
					eq = j;
					break;
				}
			if (eq <= a || eq == b - 1 || eq - a > TRACESTATE_PART_MAX || b - eq - 1 > TRACESTATE_PART_MAX)
				return "each member must be key=value";
			if (!((s[a] >= 'a' && s[a] <= 'z') || (s[a] >= '0' && s[a] <= '9')))
				return "a key must start with a lowercase letter or a digit";
			for (int j = a; j < eq; j++)
			{
				char		c = s[j];

				if (c == '@')
					ats++;
				else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || strchr("_-*/", c)))
					return "a key may hold only lowercase letters, digits, _ - * / and one @";
			}
			if (ats > 1)
				return "a key may hold only lowercase letters, digits, _ - * / and one @";
			for (int j = eq + 1; j < b; j++)
				if (s[j] < 0x20 || s[j] > 0x7e || s[j] == ',' || s[j] == '=')
					return "a value may hold only printable ASCII without , and =";
		}
		i = end + 1;
	}
	return NULL;
}

/* Check hook of resilience.traceparent: 22023 for a malformed one. */
bool
outbox_check_traceparent_guc(char **newval, void **extra, GucSource source)
{
	const char *problem;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	problem = traceparent_problem(*newval, strlen(*newval));
	if (problem)
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("%s.", problem);
		return false;
	}
	return true;
}

/* Check hook of resilience.tracestate. */
bool
outbox_check_tracestate_guc(char **newval, void **extra, GucSource source)
{
	const char *problem;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	problem = tracestate_problem(*newval, strlen(*newval));
	if (problem)
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("%s.", problem);
		return false;
	}
	return true;
}

/* Is this a valid HTTP header name (an RFC 9110 token)? */
static bool
header_name_ok(const char *name, int len)
{
	int			i;

	if (len == 0 || len > HEADER_NAME_MAX)
		return false;
	for (i = 0; i < len; i++)
	{
		unsigned char c = name[i];

		if (!(isalnum(c) || strchr("!#$%&'*+-.^_`|~", c)))
			return false;
	}
	return true;
}

/* Header names the relay sets itself. */
static bool
header_reserved(const char *name)
{
	return pg_strcasecmp(name, "Idempotency-Key") == 0 ||
		pg_strcasecmp(name, "Content-Type") == 0 ||
		pg_strcasecmp(name, "Content-Length") == 0 ||
		pg_strcasecmp(name, "Host") == 0 ||
		pg_strcasecmp(name, "Transfer-Encoding") == 0 ||
		pg_strcasecmp(name, "Connection") == 0 ||
		pg_strcasecmp(name, "Expect") == 0 ||
		pg_strncasecmp(name, "webhook-", 8) == 0;
}

/*
 * Header names an event may not carry: credentials (a route sets them, and
 * an event's would reach the endpoint first) and AMQP's CC and BCC (which
 * make RabbitMQ copy the message to other queues).
 */
static bool
header_event_reserved(const char *name)
{
	return pg_strcasecmp(name, "Authorization") == 0 ||
		pg_strcasecmp(name, "Proxy-Authorization") == 0 ||
		pg_strcasecmp(name, "Cookie") == 0 ||
		pg_strcasecmp(name, "CC") == 0 ||
		pg_strcasecmp(name, "BCC") == 0;
}

/* Does a route's list of "Name: value" strings set header name? */
static bool
route_sets_header(List *route_headers, const char *name)
{
	ListCell   *lc;
	size_t		len = strlen(name);

	foreach(lc, route_headers)
	{
		const char *h = lfirst(lc);

		if (pg_strncasecmp(h, name, len) == 0 && h[len] == ':')
			return true;
	}
	return false;
}

/*
 * What is wrong with a JSON object of headers (NULL: nothing); sets
 * *detail and *hint.  event: an event's headers (the names of
 * header_event_reserved are refused too).  Never raises: the relay checks
 * claimed events with it again at send.
 */
static const char *
headers_problem(JsonbContainer *container, bool event, char **detail, char **hint)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			count = 0;
	int			total = 0;

	*detail = NULL;
	*hint = NULL;
	if (!JsonContainerIsObject(container))
		return "must be a JSON object of header names and string values";
	it = JsonbIteratorInit(container);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *name;

		if (tok != WJB_KEY)
			continue;
		tok = JsonbIteratorNext(&it, &v, true);
		name = pnstrdup(k.val.string.val, k.val.string.len);
		if (!header_name_ok(name, k.val.string.len))
		{
			*hint = psprintf("Header names are 1 to %d letters, digits and !#$%%&'*+-.^_`|~.",
							 HEADER_NAME_MAX);
			return psprintf("\"%s\" is not a valid header name", name);
		}
		if (header_reserved(name))
		{
			*detail = pstrdup("Idempotency-Key, Content-Type, Content-Length, Host, Transfer-Encoding, Connection, Expect and webhook-* cannot be given.");
			return psprintf("header \"%s\" is set by the relay", name);
		}
		if (event && header_event_reserved(name))
		{
			*detail = pstrdup("Events cannot carry Authorization, Proxy-Authorization, Cookie, CC or BCC.");
			*hint = pg_strcasecmp(name, "CC") == 0 || pg_strcasecmp(name, "BCC") == 0 ?
				pstrdup("CC and BCC make a RabbitMQ broker copy the message to other queues: send it to them with routes.") :
				pstrdup("Credentials for a destination belong in its route's option \"headers\".");
			return psprintf("header \"%s\" is reserved", name);
		}
		if (v.type != jbvString)
			return psprintf("the value of header \"%s\" must be a string", name);
		if (v.val.string.len > HEADER_VALUE_MAX ||
			memchr(v.val.string.val, '\r', v.val.string.len) != NULL ||
			memchr(v.val.string.val, '\n', v.val.string.len) != NULL ||
			memchr(v.val.string.val, '\0', v.val.string.len) != NULL)
		{
			*detail = psprintf("Values are at most %d bytes, without line breaks or NUL.",
							   HEADER_VALUE_MAX);
			return psprintf("the value of header \"%s\" is not allowed", name);
		}
		if (pg_strcasecmp(name, "traceparent") == 0 || pg_strcasecmp(name, "tracestate") == 0)
		{
			bool		parent = pg_strcasecmp(name, "traceparent") == 0;
			const char *bad = parent ?
				traceparent_problem(v.val.string.val, v.val.string.len) :
				tracestate_problem(v.val.string.val, v.val.string.len);

			if (bad)
			{
				*detail = psprintf("%c%s.", pg_toupper(bad[0]), bad + 1);
				return psprintf("header \"%s\" is not a valid W3C %s", name, parent ? "traceparent" : "tracestate");
			}
		}
		count++;
		total += k.val.string.len + v.val.string.len;
	}
	/* the limits bind events; a route's own headers are the admin's choice */
	if (event && (count > HEADERS_MAX || total > HEADERS_TOTAL_MAX))
	{
		*detail = psprintf("There are %d headers of %d bytes (names and values).", count, total);
		return psprintf("at most %d headers of %d bytes in all are allowed",
						HEADERS_MAX, HEADERS_TOTAL_MAX);
	}
	return NULL;
}

/*
 * Check a JSON object of headers and return them as "Name: value" strings;
 * what names the object in messages.  Raises 22023 on anything invalid.
 */
static List *
parse_headers(JsonbContainer *container, const char *what, bool event)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;
	List	   *result = NIL;
	char	   *detail;
	char	   *hint;
	const char *problem;

	if (!JsonContainerIsObject(container))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a JSON object of header names and string values", what)));
	problem = headers_problem(container, event, &detail, &hint);
	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: %s", what, problem),
				 detail ? errdetail("%s", detail) : 0,
				 hint ? errhint("%s", hint) : 0));
	it = JsonbIteratorInit(container);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		if (tok != WJB_KEY)
			continue;
		(void) JsonbIteratorNext(&it, &v, true);
		result = lappend(result, psprintf("%.*s: %.*s", k.val.string.len, k.val.string.val,
										  v.val.string.len, v.val.string.val));
	}
	return result;
}

/* A route option of headers (a JSON object) as "Name: value" strings. */
List *
outbox_parse_headers(JsonbValue *v, const char *what)
{
	if (v->type != jbvBinary)
		outbox_route_error(psprintf("%s must be a JSON object", what), NULL, NULL);
	return parse_headers(v->val.binary.data, what, false);
}

/*
 * The headers of a claimed event, checked again at send (the row may have
 * been written before these checks, or by hand): NULL and *out = its
 * headers as "Name: value" strings, without those its route sets (the
 * route's value wins, never both); or what is wrong with them.
 */
const char *
outbox_item_headers(OutboxItem *item, List **out)
{
	Jsonb	   *headers = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(item->headers)));
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *detail;
	char	   *hint;
	const char *problem = headers_problem(&headers->root, true, &detail, &hint);

	*out = NIL;
	if (problem)
		return psprintf("the event's headers cannot be sent: %s%s%s", problem,
						detail ? ". " : "", detail ? detail : "");
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *name;

		if (tok != WJB_KEY)
			continue;
		(void) JsonbIteratorNext(&it, &v, true);
		name = pnstrdup(k.val.string.val, k.val.string.len);
		if (!route_sets_header(item->route->headers, name))
			*out = lappend(*out, psprintf("%s: %.*s", name, v.val.string.len, v.val.string.val));
	}
	return NULL;
}

/* A queue target is a consumer name. */
static const char *
queue_check_target(const char *target, char **destination)
{
	*destination = NULL;
	if (strlen(target) > OUTBOX_KEY_MAX)
		return "a queue target (consumer name) must be at most 255 bytes";
	return NULL;
}

/* The pull API (outbox_claim...): no relay, no options of its own. */
const OutboxSinkOps outbox_sink_queue = {
	.name = "queue",
	.push = false,
	.default_payload = PAYLOAD_ANY,
	.check_target = queue_check_target,
};

/* The names of the sinks, for errors. */
static char *
sink_list(void)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < lengthof(sinks); i++)
		appendStringInfo(&buf, "%s%s", i == 0 ? "" : ", ", sinks[i]->name);
	return buf.data;
}

/*
 * Option partition_by: "key", or a JSON path into the payload ($) and the
 * headers ($headers); 22023 if it does not parse or names other variables.
 * The error of the path parser is replaced (the transaction ends anyway).
 */
static char *
partition_by_option(JsonbValue *v)
{
	char	   *path = outbox_option_string(v, "partition_by");
	MemoryContext cxt = CurrentMemoryContext;
	bool		quoted = false;
	bool		parsed = true;

	if (strcmp(path, "key") == 0)
		return path;
	if (path[0] != '$' || strlen(path) > 1024)
		outbox_route_error("option \"partition_by\" must be \"key\" or a JSON path such as \"$.tenant\"",
						   NULL, "$ is the payload, $headers the event's headers: \"$headers.\\\"X-Tenant\\\"\".");
	PG_TRY();
	{
		(void) DirectFunctionCall1(jsonpath_in, CStringGetDatum(path));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		parsed = false;
	}
	PG_END_TRY();
	if (!parsed)
		outbox_route_error("option \"partition_by\" is not a valid JSON path", NULL,
						   "For example \"$.tenant\" (the payload) or \"$headers.\\\"X-Tenant\\\"\" (a header).");
	/* the only variable is $headers */
	for (const char *p = path; *p; p++)
	{
		if (*p == '"' && (p == path || p[-1] != '\\'))
			quoted = !quoted;
		else if (!quoted && *p == '$' && (isalnum((unsigned char) p[1]) || p[1] == '_' || p[1] == '"') &&
				 strncmp(p + 1, "headers", 7) != 0)
			outbox_route_error("option \"partition_by\" may use only $ (the payload) and $headers", NULL, NULL);
	}
	return path;
}

/* An option every sink has; false if name is none of them. */
static bool
parse_common_option(OutboxRoute *r, const char *name, JsonbValue *v)
{
	if (strcmp(name, "payload") == 0)
	{
		char	   *s = outbox_option_string(v, name);

		if (strcmp(s, "any") == 0)
			r->payload = PAYLOAD_ANY;
		else if (strcmp(s, "object") == 0)
			r->payload = PAYLOAD_OBJECT;
		else if (strcmp(s, "array") == 0)
			r->payload = PAYLOAD_ARRAY;
		else if (strcmp(s, "object_or_array") == 0)
			r->payload = PAYLOAD_OBJECT_OR_ARRAY;
		else
			outbox_route_error("option \"payload\" must be any, object, array or object_or_array", NULL, NULL);
	}
	else if (strcmp(name, "max_attempts") == 0)
		r->max_attempts = outbox_option_int(v, name, 1, 1000);
	else if (strcmp(name, "on_dead_letter") == 0)
	{
		char	   *s = outbox_option_string(v, name);

		if (strcmp(s, "block") == 0)
			r->block_on_dead_letter = true;
		else if (strcmp(s, "skip") != 0)
			outbox_route_error("option \"on_dead_letter\" must be skip or block", NULL, NULL);
	}
	else if (strcmp(name, "partition_by") == 0)
		r->partition_by = partition_by_option(v);
	/* the timeouts and backoff matter to the sinks that connect out */
	else if (strcmp(name, "timeout_ms") == 0)
		r->timeout_ms = outbox_option_int(v, name, 1, 600000);
	else if (strcmp(name, "connect_timeout_ms") == 0)
		r->connect_timeout_ms = outbox_option_int(v, name, 1, 600000);
	else if (strcmp(name, "backoff_base_ms") == 0)
		r->backoff_base_ms = outbox_option_int(v, name, 1, 3600000);
	else if (strcmp(name, "backoff_max_ms") == 0)
		r->backoff_max_ms = outbox_option_int(v, name, 1, 86400000);
	else
		return false;
	return true;
}

/*
 * Parse (and, when validating, check) a route.  With validate, anything
 * wrong raises 22023 with the reason; without, the row is trusted.
 */
static OutboxRoute *
parse_route(int32 id, const char *pattern, const char *sink, const char *target,
			Jsonb *options, bool enabled, bool validate)
{
	OutboxRoute *r = palloc0(sizeof(OutboxRoute));
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;
	const char *problem;
	int			i;

	r->id = id;
	r->enabled = enabled;
	r->pattern = pstrdup(pattern);
	r->target = pstrdup(target);
	for (i = 0; i < lengthof(sinks); i++)
		if (strcmp(sink, sinks[i]->name) == 0)
			r->sink = sinks[i];
	if (r->sink == NULL)
		outbox_route_error(psprintf("unknown sink \"%s\"", sink), NULL,
						   psprintf("The sinks are %s.", sink_list()));
	if (validate)
	{
		if (pattern[0] == '\0' || strlen(pattern) > OUTBOX_TOPIC_MAX)
			outbox_route_error("topic_pattern must be 1 to 255 bytes", NULL,
							   "It is a LIKE pattern: orders.% matches every topic starting with \"orders.\".");
		if (target[0] == '\0')
			outbox_route_error("target must not be empty", NULL, NULL);
	}
	problem = r->sink->check_target(target, &r->destination);
	if (problem && validate)
		outbox_route_error(problem, psprintf("The target is %s.", outbox_redact_target(target)),
						   r->sink->target_hint);

	/* defaults */
	r->payload = r->sink->default_payload;
	r->max_attempts = 10;
	r->timeout_ms = 10000;
	r->connect_timeout_ms = 2000;
	r->backoff_base_ms = 500;
	r->backoff_max_ms = 300000;
	if (r->sink->init_options)
		r->sink->init_options(r);

	if (!JB_ROOT_IS_OBJECT(options))
		outbox_route_error("options must be a JSON object", NULL, NULL);
	it = JsonbIteratorInit(&options->root);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *name;

		if (tok != WJB_KEY)
			continue;
		(void) JsonbIteratorNext(&it, &v, true);
		name = pnstrdup(k.val.string.val, k.val.string.len);
		if (parse_common_option(r, name, &v))
			continue;
		if (r->sink->parse_option && r->sink->parse_option(r, name, &v, validate))
			continue;
		outbox_route_error(psprintf("unknown option \"%s\" for sink %s", name, r->sink->name),
						   NULL,
						   psprintf("Options are payload, max_attempts, on_dead_letter, timeout_ms, "
									"connect_timeout_ms, backoff_base_ms, backoff_max_ms%s%s.",
									r->sink->options_hint ? "; for this sink " : "",
									r->sink->options_hint ? r->sink->options_hint : ""));
	}
	if (r->sink->check_options)
		r->sink->check_options(r);
	if (validate && r->connect_timeout_ms > r->timeout_ms)
		outbox_route_error("connect_timeout_ms must not exceed timeout_ms", NULL, NULL);
	if (validate && r->backoff_max_ms < r->backoff_base_ms)
		outbox_route_error("backoff_max_ms must not be less than backoff_base_ms", NULL, NULL);
	return r;
}

/* Trigger: check a route before it is written. */
Datum
outbox_route_check(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	HeapTuple	tuple;
	TupleDesc	desc;
	Datum		values[6];
	bool		isnull[6];
	const char *cols[6] = {"id", "topic_pattern", "sink", "target", "options", "enabled"};
	int			i;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "outbox_route_check must be called as a trigger");
	tuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ? trigdata->tg_newtuple : trigdata->tg_trigtuple;
	desc = RelationGetDescr(trigdata->tg_relation);
	for (i = 0; i < 6; i++)
	{
		int			attno = SPI_fnumber(desc, cols[i]);

		if (attno <= 0)
			elog(ERROR, "column %s of outbox_routes is missing", cols[i]);
		values[i] = heap_getattr(tuple, attno, desc, &isnull[i]);
		if (isnull[i])
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("%s of an outbox route must not be null", cols[i])));
	}
	(void) parse_route(DatumGetInt32(values[0]), TextDatumGetCString(values[1]),
					   TextDatumGetCString(values[2]), TextDatumGetCString(values[3]),
					   DatumGetJsonbP(values[4]), DatumGetBool(values[5]), true);
	return PointerGetDatum(tuple);
}

/* _outbox_routes_invalidate(): every backend reloads routes after commit. */
Datum
outbox_routes_invalidate(PG_FUNCTION_ARGS)
{
	lookup_relations();
	CacheInvalidateRelcacheByRelid(cached_routes_relid);
	wake_relay_at_commit();		/* an enabled or new route may have work */
	PG_RETURN_VOID();
}

/*
 * The routes, parsed (caller is connected to SPI, in a transaction):
 * push_only gives the enabled notify and http routes; otherwise the enabled
 * queue routes of queue_consumer, or every route when it is NULL.
 */
List *
outbox_load_routes(bool push_only, const char *queue_consumer)
{
	static SPIPlanPtr plan = NULL;
	MemoryContext caller = CurrentMemoryContext;
	List	   *routes = NIL;
	uint64		i;
	int			ret;

	ret = SPI_execute_plan(outbox_plan(&plan, "SELECT id, topic_pattern, sink, target, options, enabled"
									   " FROM resilience.outbox_routes ORDER BY id", 0, NULL),
						   NULL, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading resilience.outbox_routes failed: %s", SPI_result_code_string(ret));
	/* SPI leaves its own context current: the routes go where the caller was */
	MemoryContextSwitchTo(caller);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;
		OutboxRoute *r;

		r = parse_route(DatumGetInt32(SPI_getbinval(t, d, 1, &isnull)),
						SPI_getvalue(t, d, 2), SPI_getvalue(t, d, 3), SPI_getvalue(t, d, 4),
						DatumGetJsonbP(SPI_getbinval(t, d, 5, &isnull)),
						DatumGetBool(SPI_getbinval(t, d, 6, &isnull)), false);
		if (queue_consumer == NULL && !push_only)
			routes = lappend(routes, r);
		else if (!r->enabled)
			continue;
		else if (push_only && r->sink->push)
			routes = lappend(routes, r);
		else if (!push_only && !r->sink->push && strcmp(r->target, queue_consumer) == 0)
			routes = lappend(routes, r);
	}
	return routes;
}

/* Reload the routes a publishing backend matches topics against. */
static void
load_route_cache(void)
{
	List	   *routes;
	ListCell   *lc;
	ListCell   *lc2;
	volatile int n = 0;
	ResilienceUser save;

	if (route_cache_valid)
		return;
	route_cache_valid = true;	/* an invalidation while loading unsets it */
	if (route_cache_context == NULL)
		route_cache_context = AllocSetContextCreate(CacheMemoryContext, "resilience outbox routes",
													ALLOCSET_SMALL_SIZES);
	MemoryContextReset(route_cache_context);
	route_cache = NULL;
	route_cache_len = 0;

	resilience_become_owner(true, &save);
	PG_TRY();
	{
		SPI_connect();
		routes = outbox_load_routes(false, NULL);
		route_cache = MemoryContextAlloc(route_cache_context,
										 sizeof(CachedRoute) * Max(list_length(routes), 1));
		foreach(lc, routes)
		{
			OutboxRoute *r = lfirst(lc);
			CachedRoute *c = &route_cache[n++];

			c->id = r->id;
			c->push = r->sink->push;
			c->enabled = r->enabled;
			c->claim_slot = outbox_claim_slot(r->target);
			c->payload = r->payload;
			c->pattern = MemoryContextAlloc(route_cache_context, VARHDRSZ + strlen(r->pattern));
			SET_VARSIZE(c->pattern, VARHDRSZ + strlen(r->pattern));
			memcpy(VARDATA(c->pattern), r->pattern, strlen(r->pattern));
			c->nheaders = 0;
			c->header_names = MemoryContextAlloc(route_cache_context,
												 sizeof(char *) * Max(list_length(r->headers), 1));
			foreach(lc2, r->headers)
			{
				const char *h = lfirst(lc2);

				c->header_names[c->nheaders++] =
					MemoryContextStrdup(route_cache_context, pnstrdup(h, strcspn(h, ":")));
			}
		}
		SPI_finish();
	}
	PG_CATCH();
	{
		route_cache_valid = false;	/* never match against half a list */
		PG_RE_THROW();
	}
	PG_END_TRY();
	resilience_restore_user(&save);
	route_cache_len = n;
}

/* ---- publishing ---- */

static const char *
payload_kind_name(OutboxPayloadKind kind)
{
	switch (kind)
	{
		case PAYLOAD_OBJECT:
			return "a JSON object";
		case PAYLOAD_ARRAY:
			return "a JSON array";
		case PAYLOAD_OBJECT_OR_ARRAY:
			return "a JSON object or array";
		default:
			return "any JSON value";
	}
}

static bool
payload_fits(Jsonb *payload, OutboxPayloadKind kind)
{
	bool		object = JB_ROOT_IS_OBJECT(payload);
	bool		array = JB_ROOT_IS_ARRAY(payload) && !JB_ROOT_IS_SCALAR(payload);

	switch (kind)
	{
		case PAYLOAD_OBJECT:
			return object;
		case PAYLOAD_ARRAY:
			return array;
		case PAYLOAD_OBJECT_OR_ARRAY:
			return object || array;
		default:
			return true;
	}
}

/* A text argument: not NULL, 1..max bytes. */
static text *
name_arg(FunctionCallInfo fcinfo, int argno, const char *what, int max, bool nullable)
{
	text	   *t;
	int			len;

	if (PG_ARGISNULL(argno))
	{
		if (nullable)
			return NULL;
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	}
	t = PG_GETARG_TEXT_PP(argno);
	len = VARSIZE_ANY_EXHDR(t);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what),
				 nullable ? errhint("Pass NULL for none.") : 0));
	if (len > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", what),
				 errdetail("It is %d bytes; at most %d are allowed.", len, max),
				 errhint("Hash long values, e.g. with md5().")));
	return t;
}

/* An interval argument in microseconds; NULL means none (0). */
static int64
delay_arg(FunctionCallInfo fcinfo, int argno, const char *what, bool zero_ok)
{
	if (PG_ARGISNULL(argno))
		return 0;
	return resilience_arg_duration(fcinfo, argno, what, zero_ok);
}

/* The transaction and subtransaction callbacks, once per backend. */
static void
register_callbacks(void)
{
	if (!callbacks_registered)
	{
		RegisterXactCallback(outbox_xact_callback, NULL);
		RegisterSubXactCallback(outbox_subxact_callback, NULL);
		callbacks_registered = true;
	}
}

/* Wake this database's relay when the transaction commits. */
static void
wake_relay_at_commit(void)
{
	register_callbacks();
	wake_at_commit = true;
}

/* Refuse an event header that route r sets itself (22023). */
static void
event_header_collision(Jsonb *headers, CachedRoute *r)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbIteratorToken tok;
	int			i;

	if (r->nheaders == 0)
		return;
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		if (tok != WJB_KEY)
			continue;
		for (i = 0; i < r->nheaders; i++)
			if (strlen(r->header_names[i]) == k.val.string.len &&
				pg_strncasecmp(r->header_names[i], k.val.string.val, k.val.string.len) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("headers: header \"%s\" is set by route %d", r->header_names[i], r->id),
						 errdetail("The route's value is sent; an event cannot replace it or add another."),
						 errhint("Leave the header out of the event, or change the route's option \"headers\".")));
	}
}

/* Does a JSON object of headers have one named name (any case)? */
static bool
has_header(Jsonb *headers, const char *name)
{
	JsonbIterator *it = JsonbIteratorInit(&headers->root);
	JsonbValue	k;
	JsonbIteratorToken tok;

	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
		if (tok == WJB_KEY && strlen(name) == k.val.string.len &&
			pg_strncasecmp(name, k.val.string.val, k.val.string.len) == 0)
			return true;
	return false;
}

/* A trace context argument, checked (22023 naming it). */
static char *
trace_arg(FunctionCallInfo fcinfo, int argno, const char *what)
{
	text	   *t;
	char	   *s;
	const char *problem;

	if (PG_NARGS() <= argno || PG_ARGISNULL(argno))
		return NULL;
	t = PG_GETARG_TEXT_PP(argno);
	s = text_to_cstring(t);
	problem = argno == 5 ? traceparent_problem(s, strlen(s)) : tracestate_problem(s, strlen(s));
	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is not a valid W3C %s", what, what),
				 errdetail("%c%s.", pg_toupper(problem[0]), problem + 1),
				 errhint("Pass what the tracing library's propagator writes (OpenTelemetry: TraceContextTextMapPropagator), or NULL.")));
	return s;
}

/*
 * The event's headers with its trace context added: the arguments
 * traceparent and tracestate, else the traceparent and tracestate headers
 * the caller gave, else the settings resilience.traceparent and
 * resilience.tracestate.  Each is checked (22023).
 */
static Jsonb *
with_trace_context(FunctionCallInfo fcinfo, Jsonb *headers)
{
	char	   *parent = trace_arg(fcinfo, 5, "traceparent");
	char	   *state = trace_arg(fcinfo, 6, "tracestate");
	bool		given = headers && (has_header(headers, "traceparent") ||
									has_header(headers, "tracestate"));
	StringInfoData buf;
	Jsonb	   *added;

	if (state && !parent)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tracestate needs a traceparent"),
				 errdetail("A tracestate means nothing without the traceparent it goes with.")));
	if (parent && given)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("traceparent is given both as an argument and in headers"),
				 errhint("Give the trace context once.")));
	if (parent == NULL && !given && resilience_traceparent && resilience_traceparent[0])
	{
		/* the settings' check hooks have checked them */
		parent = resilience_traceparent;
		if (resilience_tracestate && resilience_tracestate[0])
			state = resilience_tracestate;
	}
	if (parent == NULL)
		return headers;
	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"traceparent\": ");
	escape_json(&buf, parent);
	if (state)
	{
		appendStringInfoString(&buf, ", \"tracestate\": ");
		escape_json(&buf, state);
	}
	appendStringInfoChar(&buf, '}');
	added = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
	if (headers == NULL)
		return added;
	headers = DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(headers),
												 JsonbPGetDatum(added)));
	/* the limits on count and size hold for the whole */
	(void) parse_headers(&headers->root, "headers", true);
	return headers;
}

/*
 * outbox_publish(topic, payload, key, headers, deliver_after, traceparent,
 * tracestate) → event id.
 * Checks everything now; the rows are written when the transaction commits.
 */
Datum
outbox_publish(PG_FUNCTION_ARGS)
{
	text	   *topic = name_arg(fcinfo, 0, "topic", OUTBOX_TOPIC_MAX, false);
	text	   *key = name_arg(fcinfo, 2, "key", OUTBOX_KEY_MAX, true);
	Jsonb	   *payload;
	Jsonb	   *headers = NULL;
	int64		delay = delay_arg(fcinfo, 4, "deliver_after", true);
	MemoryContext old;
	PendingEvent *ev;
	int32	   *matched;
	bool	   *pull;
	int			nmatched = 0;
	int			i;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("payload must not be null"),
				 errhint("Publish a JSON null as 'null'::jsonb if that is what you mean.")));
	payload = PG_GETARG_JSONB_P(1);
	if (!PG_ARGISNULL(3))
	{
		headers = PG_GETARG_JSONB_P(3);
		(void) parse_headers(&headers->root, "headers", true);
	}
	headers = with_trace_context(fcinfo, headers);
	PreventCommandIfReadOnly("outbox_publish()");

	lookup_relations();
	load_route_cache();
	matched = palloc(sizeof(int32) * Max(route_cache_len, 1));
	pull = palloc(sizeof(bool) * Max(route_cache_len, 1));
	for (i = 0; i < route_cache_len; i++)
	{
		CachedRoute *r = &route_cache[i];

		if (!DatumGetBool(DirectFunctionCall2Coll(textlike, C_COLLATION_OID,
												  PointerGetDatum(topic),
												  PointerGetDatum(r->pattern))))
			continue;
		if (!payload_fits(payload, r->payload))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("payload must be %s", payload_kind_name(r->payload)),
					 errdetail("Topic \"%s\" goes to route %d, which accepts %s.",
							   text_to_cstring(topic), r->id, payload_kind_name(r->payload)),
					 errhint("Change the payload, or the route's option \"payload\".")));
		if (headers)
			event_header_collision(headers, r);
		pull[nmatched] = !r->push;
		matched[nmatched++] = r->id;
		if (r->push && r->enabled)
			wake_relay_at_commit();
		else if (!r->push)
			wake_claimers_at_commit |= UINT64CONST(1) << r->claim_slot;
	}
	register_callbacks();

	old = MemoryContextSwitchTo(TopTransactionContext);
	ev = palloc(sizeof(PendingEvent));
	ev->id = nextval_internal(cached_seq_relid, false);
	ev->subid = GetCurrentSubTransactionId();
	ev->topic = (text *) PG_DETOAST_DATUM_COPY(PointerGetDatum(topic));
	ev->key = key ? (text *) PG_DETOAST_DATUM_COPY(PointerGetDatum(key)) : NULL;
	ev->payload = (Jsonb *) PG_DETOAST_DATUM_COPY(JsonbPGetDatum(payload));
	ev->headers = headers ? (Jsonb *) PG_DETOAST_DATUM_COPY(JsonbPGetDatum(headers)) : NULL;
	ev->published_at = GetCurrentTimestamp();
	ev->not_before = ev->published_at + delay;
	ev->nroutes = nmatched;
	ev->routes = palloc(sizeof(int32) * Max(nmatched, 1));
	memcpy(ev->routes, matched, sizeof(int32) * nmatched);
	ev->pull = palloc(sizeof(bool) * Max(nmatched, 1));
	memcpy(ev->pull, pull, sizeof(bool) * nmatched);
	pending_events = lappend(pending_events, ev);
	MemoryContextSwitchTo(old);
	metrics_add_at_commit(RC_OUTBOX_PUBLISHED, 0, NULL, 1);

	PG_RETURN_INT64(ev->id);
}

/* '{}'::jsonb, made once. */
static Jsonb *
empty_headers(void)
{
	static Jsonb *empty = NULL;

	if (empty == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		empty = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
		MemoryContextSwitchTo(old);
	}
	return empty;
}

static int
compare_uint64(const void *a, const void *b)
{
	uint64		x = *(const uint64 *) a;
	uint64		y = *(const uint64 *) b;

	return x < y ? -1 : (x > y ? 1 : 0);
}

static uint64
key_hash(text *key)
{
	return hash_bytes_extended((const unsigned char *) VARDATA_ANY(key),
							   VARSIZE_ANY_EXHDR(key), OUTBOX_KEY_SEED);
}

/*
 * The columns the pre-commit writes, in the order of the INSERT's
 * parameters; the direct path also writes attempts (the column's default).
 * Every other column of resilience.outbox is left NULL.
 */
typedef enum OutboxColumn
{
	OC_ID,
	OC_SEQ,
	OC_ROUTE_ID,
	OC_TOPIC,
	OC_KEY,
	OC_PAYLOAD,
	OC_HEADERS,
	OC_PUBLISHED_AT,
	OC_NOT_BEFORE,
	OC_PULL,
	OC_ATTEMPTS,
	OC_COUNT
} OutboxColumn;

#define OC_PARAMS OC_ATTEMPTS	/* the INSERT's parameters: all but attempts */

static const char *const outbox_column_names[OC_COUNT] = {
	"id", "seq", "route_id", "topic", "key", "payload", "headers",
	"published_at", "not_before", "pull", "attempts"
};
static const Oid outbox_column_types[OC_COUNT] = {
	INT8OID, INT8OID, INT4OID, TEXTOID, TEXTOID, JSONBOID, JSONBOID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, BOOLOID, INT4OID
};

/*
 * May the rows go into rel with the table and index APIs, meaning exactly
 * what the INSERT would?  Only into a plain table with no trigger (foreign
 * keys are triggers too), no rule, no row-level security, whose columns
 * are ours (attnums[c]: the attribute number of column c) and whose other
 * columns are nullable without a default.  Then the INSERT would only check
 * the constraints, store the tuple and insert the index entries, which is
 * what ExecSimpleRelationInsert does.  Anything else takes the INSERT.
 */
static bool
direct_insert_ok(Relation rel, int *attnums)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			c;

	/*
	 * Citus handles INSERTs into its tables in its planner and executor
	 * hooks; a direct insert would leave the rows in the coordinator's
	 * local shell table.
	 */
	if (citus_present() || rel->rd_rel->relkind != RELKIND_RELATION ||
		rel->trigdesc != NULL || rel->rd_rules != NULL || rel->rd_rel->relrowsecurity)
		return false;
	for (c = 0; c < OC_COUNT; c++)
		attnums[c] = 0;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		known = false;

		if (att->attisdropped)
			continue;
		for (c = 0; c < OC_COUNT && !known; c++)
		{
			if (strcmp(NameStr(att->attname), outbox_column_names[c]) != 0)
				continue;
			if (att->atttypid != outbox_column_types[c])
				return false;
			attnums[c] = att->attnum;
			known = true;
		}
		if (!known && (att->atthasdef || att->attnotnull || att->attgenerated))
			return false;
	}
	for (c = 0; c < OC_COUNT; c++)
		if (attnums[c] == 0)
			return false;
	return true;
}

/* The row of event ev for its i-th route, as the INSERT's parameters. */
static void
event_row(PendingEvent *ev, int i, int64 seq, Datum *values, bool *nulls)
{
	values[OC_ID] = Int64GetDatum(ev->id);
	values[OC_SEQ] = Int64GetDatum(seq);
	values[OC_ROUTE_ID] = Int32GetDatum(ev->nroutes ? ev->routes[i] : 0);
	values[OC_TOPIC] = PointerGetDatum(ev->topic);
	values[OC_KEY] = PointerGetDatum(ev->key);
	values[OC_PAYLOAD] = JsonbPGetDatum(ev->payload);
	values[OC_HEADERS] = JsonbPGetDatum(ev->headers ? ev->headers : empty_headers());
	values[OC_PUBLISHED_AT] = TimestampTzGetDatum(ev->published_at);
	values[OC_NOT_BEFORE] = TimestampTzGetDatum(ev->not_before);
	values[OC_PULL] = BoolGetDatum(ev->nroutes ? ev->pull[i] : false);
	values[OC_ATTEMPTS] = Int32GetDatum(0);
	for (int c = 0; c < OC_COUNT; c++)
		nulls[c] = false;
	nulls[OC_ROUTE_ID] = ev->nroutes == 0;
	nulls[OC_KEY] = ev->key == NULL;
}

/*
 * Write the pending events' rows with the table and index APIs: one
 * executor state for the whole transaction, no plan, no parse, no SQL.
 */
static void
insert_rows_directly(Relation rel, const int *attnums)
{
	EState	   *estate = CreateExecutorState();
	ResultRelInfo *rri = makeNode(ResultRelInfo);
	TupleTableSlot *slot;
	ListCell   *lc;

	InitResultRelInfo(rri, rel, 0, NULL, 0);
	ExecOpenIndices(rri, false);
	estate->es_output_cid = GetCurrentCommandId(true);
	slot = table_slot_create(rel, NULL);
	foreach(lc, pending_events)
	{
		PendingEvent *ev = lfirst(lc);
		int64		seq = nextval_internal(cached_seq_relid, false);

		for (int i = 0; i < Max(ev->nroutes, 1); i++)
		{
			Datum		values[OC_COUNT];
			bool		nulls[OC_COUNT];

			event_row(ev, i, seq, values, nulls);
			ExecClearTuple(slot);
			memset(slot->tts_isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);
			for (int c = 0; c < OC_COUNT; c++)
			{
				slot->tts_values[attnums[c] - 1] = values[c];
				slot->tts_isnull[attnums[c] - 1] = nulls[c];
			}
			ExecStoreVirtualTuple(slot);
			ExecSimpleRelationInsert(rri, estate, slot);
			ResetPerTupleExprContext(estate);
		}
	}
	ExecDropSingleTupleTableSlot(slot);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	CommandCounterIncrement();
}

/* Write the pending events' rows with an INSERT, through SPI. */
static void
insert_rows_with_spi(void)
{
	ListCell   *lc;
	Oid			argtypes[OC_PARAMS];

	SPI_connect();
	if (insert_plan == NULL)
	{
		SPIPlanPtr	plan;

		memcpy(argtypes, outbox_column_types, sizeof(argtypes));
		plan = SPI_prepare("INSERT INTO resilience.outbox (id, seq, route_id, topic,"
						   " key, payload, headers, published_at, not_before, pull)"
						   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
						   OC_PARAMS, argtypes);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		insert_plan = plan;
	}
	foreach(lc, pending_events)
	{
		PendingEvent *ev = lfirst(lc);
		int64		seq = nextval_internal(cached_seq_relid, false);

		for (int i = 0; i < Max(ev->nroutes, 1); i++)
		{
			Datum		values[OC_COUNT];
			bool		nulls[OC_COUNT];
			char		spi_nulls[OC_PARAMS];
			int			ret;

			event_row(ev, i, seq, values, nulls);
			for (int c = 0; c < OC_PARAMS; c++)
				spi_nulls[c] = nulls[c] ? 'n' : ' ';
			ret = SPI_execute_plan(insert_plan, values, spi_nulls, false, 0);
			if (ret != SPI_OK_INSERT)
				elog(ERROR, "writing an outbox event failed: %s", SPI_result_code_string(ret));
		}
	}
	SPI_finish();
}

/*
 * Pre-commit: lock the keys in hash order, then take each event's seq and
 * write its rows.  See the top of the file for why this gives commit order.
 * The rows go in with the table and index APIs when that means exactly what
 * an INSERT would (direct_insert_ok), else with an INSERT.
 */
static void
flush_pending_events(void)
{
	uint64	   *hashes;
	int			nhashes = 0;
	ListCell   *lc;
	int			i;
	ResilienceUser save;
	Relation	rel;
	int			attnums[OC_COUNT];
	bool		direct;

	hashes = palloc(sizeof(uint64) * list_length(pending_events));
	foreach(lc, pending_events)
	{
		PendingEvent *ev = lfirst(lc);

		if (ev->key)
			hashes[nhashes++] = key_hash(ev->key);
	}
	qsort(hashes, nhashes, sizeof(uint64), compare_uint64);
	for (i = 0; i < nhashes; i++)
	{
		LOCKTAG		tag;

		if (i > 0 && hashes[i] == hashes[i - 1])
			continue;
		SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (hashes[i] >> 32),
							 (uint32) hashes[i], OUTBOX_LOCK_SPACE);
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	}

	lookup_relations();
	rel = table_open(cached_outbox_relid, RowExclusiveLock);
	direct = direct_insert_ok(rel, attnums);
	/* no SQL is parsed on the direct path: no search_path to pin */
	resilience_become_owner(!direct, &save);
	PushActiveSnapshot(GetTransactionSnapshot());
	if (direct)
		insert_rows_directly(rel, attnums);
	else
		insert_rows_with_spi();
	PopActiveSnapshot();
	resilience_restore_user(&save);
	table_close(rel, NoLock);
	pending_events = NIL;
}

static void
outbox_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			if (pending_events != NIL)
				flush_pending_events();
			break;
		case XACT_EVENT_COMMIT:
			if (wake_at_commit)
				worker_wake(MyDatabaseId);
			/* visible now: consumers waiting in outbox_claim may have them */
			if (wake_claimers_at_commit)
				relay_wake_claimers(wake_claimers_at_commit);
			pending_events = NIL;
			wake_at_commit = false;
			wake_claimers_at_commit = 0;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction's events wait for the safety poll */
			pending_events = NIL;	/* freed with TopTransactionContext */
			wake_at_commit = false;
			wake_claimers_at_commit = 0;
			break;
		default:
			break;
	}
}

/* A rolled-back subtransaction takes its events with it. */
static void
outbox_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		foreach(lc, pending_events)
		{
			PendingEvent *ev = lfirst(lc);

			if (ev->subid == mySubid)
				pending_events = foreach_delete_current(pending_events, lc);
		}
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		foreach(lc, pending_events)
		{
			PendingEvent *ev = lfirst(lc);

			if (ev->subid == mySubid)
				ev->subid = parentSubid;
		}
	}
}

/* ---- claims ---- */

typedef struct KeyEntry
{
	char		key[OUTBOX_KEY_MAX + 1];
} KeyEntry;

typedef struct Candidate
{
	ItemPointerData ctid;
	int64		seq;
	char	   *key;
	bool		dead;			/* queue head out of attempts */
	bool		keep;
	uint64		row;			/* its row in the result of the lock step */
} Candidate;

static HTAB *
key_set(const char *name)
{
	HASHCTL		ctl;

	ctl.keysize = OUTBOX_KEY_MAX + 1;
	ctl.entrysize = sizeof(KeyEntry);
	ctl.hcxt = CurrentMemoryContext;
	return hash_create(name, 64, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
}

static bool
key_in(HTAB *set, const char *key)
{
	return hash_search(set, key, HASH_FIND, NULL) != NULL;
}

static void
key_add(HTAB *set, const char *key)
{
	(void) hash_search(set, key, HASH_ENTER, NULL);
}

/* Add the keys of route's blocking dead letters to set. */
static void
load_blocked_keys(int32 route_id, HTAB *set)
{
	Datum		arg = Int32GetDatum(route_id);
	Oid			argtype = INT4OID;
	uint64		i;
	int			ret;

	ret = SPI_execute_with_args("SELECT key FROM resilience.outbox_dead_letters"
								" WHERE route_id OPERATOR(pg_catalog.=) $1 AND blocking AND key IS NOT NULL",
								1, &argtype, &arg, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading dead letters failed: %s", SPI_result_code_string(ret));
	for (i = 0; i < SPI_processed; i++)
		key_add(set, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
}

static Datum
tid_array(List *candidates)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(list_length(candidates), 1));
	ListCell   *lc;
	int			n = 0;

	foreach(lc, candidates)
		elems[n++] = PointerGetDatum(&((Candidate *) lfirst(lc))->ctid);
	return PointerGetDatum(construct_array(elems, n, TIDOID, sizeof(ItemPointerData), false,
										   TYPALIGN_SHORT));
}

static int
compare_tids(const void *a, const void *b)
{
	return ItemPointerCompare((ItemPointer) a, (ItemPointer) b);
}

static int
compare_items(const ListCell *a, const ListCell *b)
{
	OutboxItem *x = lfirst(a);
	OutboxItem *y = lfirst(b);

	return x->seq < y->seq ? -1 : (x->seq > y->seq ? 1 : 0);
}

/*
 * Fair sharing (route option partition_by): the route's undelivered rows
 * round-robin over the partitions -- the first row of every partition (in
 * seq order), then the second of every one... -- at most limit of each.
 * Each partition's rows stay in seq order, so with partition_by "key" (one
 * key, one partition) per-key order is kept as without it; for a path,
 * drop_keys_out_of_order keeps it.  The price: each claim reads the
 * route's whole backlog (a window function over it).
 */
static Portal
open_partitioned_scan(OutboxRoute *route, int limit, TimestampTz now)
{
	static SPIPlanPtr by_key = NULL;
	static SPIPlanPtr by_path = NULL;
	bool		key = strcmp(route->partition_by, "key") == 0;
	SPIPlanPtr *plan = key ? &by_key : &by_path;
	Datum		args[4];
	Oid			types[4] = {INT4OID, INT4OID, TIMESTAMPTZOID, TEXTOID};

	if (*plan == NULL)
	{
		const char *part = key ? "key" :
			"pg_catalog.jsonb_path_query_first(payload, $4::pg_catalog.jsonpath,"
			" pg_catalog.jsonb_build_object('headers', headers), true) OPERATOR(pg_catalog.#>>) '{}'";

		/*
		 * rn: how many ready rows of its partition come before a row and
		 * itself (rows claimed or waiting stay in, at their place, for
		 * they block their keys); rows in (rn, seq) order keep each
		 * partition's seq order.
		 */
		SPIPlanPtr	p = SPI_prepare(psprintf("SELECT ctid, key, not_before, claim_until, attempts, seq FROM"
											 " (SELECT ctid, key, not_before, claim_until, attempts, seq,"
											 "   pg_catalog.count(*) FILTER (WHERE (claim_until IS NULL"
											 "     OR claim_until OPERATOR(pg_catalog.<=) $3) AND not_before OPERATOR(pg_catalog.<=) $3)"
											 "   OVER (PARTITION BY %s ORDER BY seq) AS rn"
											 "  FROM resilience.outbox"
											 "  WHERE route_id OPERATOR(pg_catalog.=) $1 AND delivered_at IS NULL) s"
											 " WHERE rn OPERATOR(pg_catalog.<=) $2 ORDER BY rn, seq", part),
										key ? 3 : 4, types);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	args[0] = Int32GetDatum(route->id);
	args[1] = Int32GetDatum(limit);
	args[2] = TimestampTzGetDatum(now);
	args[3] = CStringGetTextDatum(route->partition_by);
	return SPI_cursor_open(NULL, *plan, args, NULL, true);
}

/*
 * With partitions by a path, the rows of one key may be in several
 * partitions, and so not be read in seq order.  Keep of a key's candidates
 * only those that are its oldest undelivered rows, in an unbroken run from
 * the oldest (the key's head is always kept if it is a candidate); the
 * others wait for a later claim.  One more read of the route's backlog.
 */
typedef struct KeyRun
{
	char		key[OUTBOX_KEY_MAX + 1];
	List	   *seqs;			/* of its candidates (int64 *, any order) */
	int64		maxseq;			/* of its candidates */
	int64		valid_max;		/* candidates up to this seq are in order */
} KeyRun;

static int
compare_int64p(const ListCell *a, const ListCell *b)
{
	int64		x = *(int64 *) lfirst(a);
	int64		y = *(int64 *) lfirst(b);

	return x < y ? -1 : (x > y ? 1 : 0);
}

static void
drop_keys_out_of_order(OutboxRoute *route, List **cands)
{
	HASHCTL		ctl;
	HTAB	   *runs;
	HASH_SEQ_STATUS status;
	KeyRun	   *kr;
	ListCell   *lc;
	Datum	   *keys;
	Datum	   *maxseqs;
	Datum		args[3];
	Oid			types[3] = {INT4OID, TEXTARRAYOID, INT8ARRAYOID};
	int			nkeys = 0;
	int			ret;

	ctl.keysize = OUTBOX_KEY_MAX + 1;
	ctl.entrysize = sizeof(KeyRun);
	ctl.hcxt = CurrentMemoryContext;
	runs = hash_create("outbox key runs", 64, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	foreach(lc, *cands)
	{
		Candidate  *c = lfirst(lc);
		bool		found;

		if (c->key == NULL)
			continue;
		kr = hash_search(runs, c->key, HASH_ENTER, &found);
		if (!found)
		{
			kr->seqs = NIL;
			kr->maxseq = c->seq;
			kr->valid_max = -1;
			nkeys++;
		}
		kr->seqs = lappend(kr->seqs, &c->seq);
		kr->maxseq = Max(kr->maxseq, c->seq);
	}
	if (nkeys == 0)
		return;
	keys = palloc(sizeof(Datum) * nkeys);
	maxseqs = palloc(sizeof(Datum) * nkeys);
	nkeys = 0;
	hash_seq_init(&status, runs);
	while ((kr = hash_seq_search(&status)) != NULL)
	{
		keys[nkeys] = CStringGetTextDatum(kr->key);
		maxseqs[nkeys++] = Int64GetDatum(kr->maxseq);
	}
	args[0] = Int32GetDatum(route->id);
	args[1] = PointerGetDatum(construct_array(keys, nkeys, TEXTOID, -1, false, TYPALIGN_INT));
	args[2] = PointerGetDatum(construct_array(maxseqs, nkeys, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	/* each key's undelivered seqs up to its last candidate's */
	ret = SPI_execute_with_args("SELECT c.key, pg_catalog.array_agg(o.seq ORDER BY o.seq)"
								" FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]),"
								"   pg_catalog.unnest($3::pg_catalog.int8[])) AS c(key, maxseq)"
								" JOIN resilience.outbox o ON o.key OPERATOR(pg_catalog.=) c.key"
								"  AND o.seq OPERATOR(pg_catalog.<=) c.maxseq"
								" WHERE o.route_id OPERATOR(pg_catalog.=) $1 AND o.delivered_at IS NULL"
								" GROUP BY c.key",
								3, types, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "checking key order failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		char	   *key = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		ArrayType  *pending = DatumGetArrayTypeP(SPI_getbinval(SPI_tuptable->vals[i],
															   SPI_tuptable->tupdesc, 2, &isnull));
		Datum	   *p;
		int			np;
		int			n = 0;

		kr = hash_search(runs, key, HASH_FIND, NULL);
		if (kr == NULL)
			continue;
		deconstruct_array(pending, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &p, NULL, &np);
		list_sort(kr->seqs, compare_int64p);
		/* the longest run of candidates that are the key's oldest rows */
		foreach(lc, kr->seqs)
		{
			int64		seq = *(int64 *) lfirst(lc);

			if (n >= np || DatumGetInt64(p[n]) != seq)
				break;
			kr->valid_max = seq;
			n++;
		}
	}
	foreach(lc, *cands)
	{
		Candidate  *c = lfirst(lc);

		if (c->key && c->seq > ((KeyRun *) hash_search(runs, c->key, HASH_FIND, NULL))->valid_max)
			*cands = foreach_delete_current(*cands, lc);
	}
}

/* The columns an item is built from (item_from_row), and the lock step. */
#define ITEM_COLUMNS "ctid, id, seq, key, topic, payload::pg_catalog.text," \
	" headers::pg_catalog.text, published_at, attempts"
#define LOCK_STEP " FROM resilience.outbox" \
	" WHERE ctid OPERATOR(pg_catalog.=) ANY($1) AND delivered_at IS NULL" \
	" AND (claim_until IS NULL OR claim_until OPERATOR(pg_catalog.<=) $2)" \
	" AND not_before OPERATOR(pg_catalog.<=) $2" \
	" FOR UPDATE SKIP LOCKED"

/* A row the lock step locked, and where it is in its result. */
typedef struct LockedRow
{
	ItemPointerData ctid;		/* first: compare_tids */
	uint64		row;
} LockedRow;

/* A text column as a C string (NULL for NULL), without an output function. */
static char *
text_or_null_column(HeapTuple t, TupleDesc d, int col)
{
	bool		isnull;
	Datum		v = SPI_getbinval(t, d, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(v);
}

/* An item from a row of ITEM_COLUMNS (in the current memory context). */
static OutboxItem *
item_from_row(HeapTuple t, TupleDesc d, OutboxRoute *route, bool held)
{
	OutboxItem *item = palloc0(sizeof(OutboxItem));
	bool		isnull;

	ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(t, d, 1, &isnull)), &item->ctid);
	item->id = DatumGetInt64(SPI_getbinval(t, d, 2, &isnull));
	item->seq = DatumGetInt64(SPI_getbinval(t, d, 3, &isnull));
	item->key = text_or_null_column(t, d, 4);
	item->topic = text_or_null_column(t, d, 5);
	item->payload = text_or_null_column(t, d, 6);
	item->headers = text_or_null_column(t, d, 7);
	item->published_at = DatumGetTimestampTz(SPI_getbinval(t, d, 8, &isnull));
	item->attempts = DatumGetInt32(SPI_getbinval(t, d, 9, &isnull));
	item->route_id = route->id;
	item->route = route;
	item->retry_after_ms = -1;
	item->held = held;
	return item;
}

/*
 * A statement prepared once per backend with a generic plan: the relay's
 * statements take arrays of a batch's ctids, and planning them each time
 * (selectivity of "ctid = ANY(array)" over 500 elements) cost more than
 * running them.
 */
SPIPlanPtr
outbox_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, types, CURSOR_OPT_GENERIC_PLAN);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}

/* Claim up to limit rows of one route into claim->items. */
static int
claim_route(OutboxClaim *claim, OutboxRoute *route, int limit)
{
	static SPIPlanPtr scan_plan = NULL;
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr hold_plan = NULL;
	static SPIPlanPtr claim_plan = NULL;
	bool		hold;
	HTAB	   *blocked = key_set("outbox blocked keys");
	HTAB	   *open = key_set("outbox open keys");
	List	   *cands = NIL;
	List	   *valid = NIL;
	Portal		portal;
	Datum		args[4];
	Oid			types[4] = {INT4OID, TIMESTAMPTZOID, TEXTOID, TIMESTAMPTZOID};
	bool		done = false;
	ListCell   *lc;
	uint64		i;
	int			ret;
	int			nvalid = 0;
	int			fetch = Min(Max(limit * 2, 64), 4096);
	MemoryContext old_context = CurrentMemoryContext;

	if (route->probe_only)
		limit = Min(limit, 1);
	/* a rate-limited route: about a second's worth, so a batch stays short */
	if (route->rate > 0)
		limit = Min(limit, route->burst + (int) ceil(route->rate));
	if (route->block_on_dead_letter)
		load_blocked_keys(route->id, blocked);

	/*
	 * Planned for a cursor's first rows: planned for reading the whole
	 * backlog, a backlog from right after a TRUNCATE (no statistics) got a
	 * seq scan and a sort of every pending row in each batch instead of
	 * the ordered index scan that stops after a batch's worth.
	 */
	if (scan_plan == NULL)
	{
		Oid			t = INT4OID;
		SPIPlanPtr	plan = SPI_prepare_cursor("SELECT ctid, key, not_before, claim_until, attempts, seq"
											  " FROM resilience.outbox"
											  " WHERE route_id OPERATOR(pg_catalog.=) $1 AND delivered_at IS NULL"
											  " ORDER BY route_id, seq", 1, &t, CURSOR_OPT_FAST_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		scan_plan = plan;
	}
	args[0] = Int32GetDatum(route->id);
	if (route->partition_by)
		portal = open_partitioned_scan(route, limit, claim->now);
	else
		portal = SPI_cursor_open(NULL, scan_plan, args, NULL, true);
	while (!done)
	{
		/* the first fetch: what a batch takes when no key is in the way */
		SPI_cursor_fetch(portal, true, cands == NIL ? Min(Max(limit, 64), fetch) : fetch);
		if (SPI_processed == 0)
			break;
		for (i = 0; i < SPI_processed && !done; i++)
		{
			HeapTuple	t = SPI_tuptable->vals[i];
			TupleDesc	d = SPI_tuptable->tupdesc;
			bool		n_key,
						n_claim,
						isnull;
			ItemPointer ctid = (ItemPointer) DatumGetPointer(SPI_getbinval(t, d, 1, &isnull));
			char	   *key = text_or_null_column(t, d, 2);
			TimestampTz not_before = DatumGetTimestampTz(SPI_getbinval(t, d, 3, &isnull));
			TimestampTz claim_until = DatumGetTimestampTz(SPI_getbinval(t, d, 4, &n_claim));
			int			attempts = DatumGetInt32(SPI_getbinval(t, d, 5, &isnull));
			bool		ready = (n_claim || claim_until <= claim->now) && not_before <= claim->now;
			Candidate  *c;

			n_key = key == NULL;
			if (!ready)
			{
				TimestampTz due = n_claim ? not_before : Max(not_before, claim_until);

				if (claim->next_due == 0 || due < claim->next_due)
					claim->next_due = due;
				if (!n_key)
					key_add(blocked, key);
				continue;
			}
			if (!n_key && key_in(blocked, key))
				continue;
			if (!n_key && key_in(open, key) && !claim->runs)
				continue;
			c = palloc0(sizeof(Candidate));
			ItemPointerCopy(ctid, &c->ctid);
			c->seq = DatumGetInt64(SPI_getbinval(t, d, 6, &isnull));
			c->key = key;
			if (claim->count_attempt && attempts >= route->max_attempts)
				c->dead = true;
			cands = lappend(cands, c);
			if (!n_key)
			{
				if (c->dead)
					key_add(blocked, key);
				else if (claim->runs)
					key_add(open, key);
				else
					key_add(blocked, key);	/* heads only */
			}
			if (list_length(cands) >= limit)
			{
				done = true;
				claim->exhausted = false;
			}
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
	if (cands == NIL)
		return 0;

	/* a dead letter moved in meanwhile blocks its key too */
	if (route->block_on_dead_letter)
	{
		HTAB	   *late = key_set("outbox late blocked keys");

		load_blocked_keys(route->id, late);
		foreach(lc, cands)
		{
			Candidate  *c = lfirst(lc);

			if (c->key && key_in(late, c->key))
				cands = foreach_delete_current(cands, lc);
		}
		if (cands == NIL)
			return 0;
	}

	/* partitions by a path: a key's rows may be in several, keep its order */
	if (route->partition_by && strcmp(route->partition_by, "key") != 0)
	{
		drop_keys_out_of_order(route, &cands);
		if (cands == NIL)
			return 0;
	}

	/*
	 * Lock what is still unclaimed; skip what another claimer holds.  Rows
	 * held in the claim transaction (hold) are read whole by this step.
	 */
	hold = claim->hold_in_claim && route->sink->in_claim;
	args[0] = tid_array(cands);
	args[1] = TimestampTzGetDatum(claim->now);
	types[0] = TIDARRAYOID;
	ret = SPI_execute_plan(hold ? outbox_plan(&hold_plan, "SELECT " ITEM_COLUMNS LOCK_STEP, 2, types)
						   : outbox_plan(&lock_plan, "SELECT ctid" LOCK_STEP, 2, types),
						   args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "locking outbox rows failed: %s", SPI_result_code_string(ret));
	{
		HTAB	   *broken = key_set("outbox broken keys");
		LockedRow  *locked = palloc(sizeof(LockedRow) * Max(SPI_processed, 1));
		uint64		nlocked = SPI_processed;

		for (i = 0; i < nlocked; i++)
		{
			bool		isnull;

			ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[i],
																		SPI_tuptable->tupdesc, 1,
																		&isnull)),
							&locked[i].ctid);
			locked[i].row = i;
		}
		qsort(locked, nlocked, sizeof(LockedRow), compare_tids);
		foreach(lc, cands)
		{
			Candidate  *c = lfirst(lc);
			LockedRow  *got = bsearch(&c->ctid, locked, nlocked, sizeof(LockedRow),
									  compare_tids);

			if (c->key && key_in(broken, c->key))
				continue;
			if (!got)
			{
				if (c->key)
					key_add(broken, c->key);
				continue;
			}
			if (c->dead)
			{
				OutboxItem *item = MemoryContextAllocZero(old_context, sizeof(OutboxItem));

				ItemPointerCopy(&c->ctid, &item->ctid);
				item->route_id = route->id;
				item->route = route;
				item->key = c->key;
				claim->dead = lappend(claim->dead, item);
				continue;
			}
			c->row = got->row;
			valid = lappend(valid, c);
		}
	}
	if (valid == NIL)
		return 0;

	/* claim them (held rows: the lock step read them, nothing to write) */
	{
		List	   *got = NIL;
		MemoryContext old;

		if (!hold)
		{
			args[0] = tid_array(valid);
			args[1] = CStringGetTextDatum(claim->claimer);
			args[2] = TimestampTzGetDatum(claim->now + claim->visibility_ms * 1000);
			args[3] = Int32GetDatum(claim->count_attempt ? 1 : 0);
			types[0] = TIDARRAYOID;
			types[1] = TEXTOID;
			types[2] = TIMESTAMPTZOID;
			types[3] = INT4OID;
			ret = SPI_execute_plan(outbox_plan(&claim_plan,
											   "UPDATE resilience.outbox"
											   " SET claimed_by = $2, claim_until = $3,"
											   " attempts = attempts OPERATOR(pg_catalog.+) $4"
											   " WHERE ctid OPERATOR(pg_catalog.=) ANY($1)"
											   " RETURNING " ITEM_COLUMNS, 4, types),
								   args, NULL, false, 0);
			if (ret != SPI_OK_UPDATE_RETURNING)
				elog(ERROR, "claiming outbox rows failed: %s", SPI_result_code_string(ret));
		}
		old = MemoryContextSwitchTo(claim->result_cxt ? claim->result_cxt : old_context);
		if (hold)
		{
			foreach(lc, valid)
			{
				Candidate  *c = lfirst(lc);

				got = lappend(got, item_from_row(SPI_tuptable->vals[c->row], SPI_tuptable->tupdesc,
												 route, true));
			}
		}
		else
		{
			for (i = 0; i < SPI_processed; i++)
				got = lappend(got, item_from_row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
												 route, false));
		}
		nvalid = list_length(got);
		list_sort(got, compare_items);
		claim->items = list_concat(claim->items, got);
		MemoryContextSwitchTo(old);
	}
	return nvalid;
}

/*
 * Claim up to claim->limit items from claim->routes, for claim->visibility_ms
 * (caller: connected to SPI, in a transaction with a snapshot).  Routes are
 * visited from a rotating start so that none starves when batches fill up.
 */
void
outbox_claim_rows(OutboxClaim *claim)
{
	MemoryContext caller = CurrentMemoryContext;
	static uint32 rotation = 0;
	int			nroutes = list_length(claim->routes);
	int			remaining = claim->limit;
	int			i;

	claim->items = NIL;
	claim->dead = NIL;
	claim->exhausted = true;
	claim->next_due = 0;
	if (nroutes == 0)
		return;
	rotation++;
	for (i = 0; i < nroutes && remaining > 0; i++)
	{
		OutboxRoute *route = list_nth(claim->routes, (rotation + i) % nroutes);

		CHECK_FOR_INTERRUPTS();
		remaining -= claim_route(claim, route, remaining);
		MemoryContextSwitchTo(caller);	/* SPI calls leave theirs current */
	}
	if (remaining <= 0)
		claim->exhausted = false;
}

/* ---- dead letters and outcomes ---- */

/*
 * Move a claimed row to the dead letters (caller holds its claim), with
 * error as its last error (NULL: keep the row's), and log it.
 */
void
outbox_dead_letter(OutboxItem *item, const char *error, int add_attempts, const char *claimer)
{
	Datum		args[6];
	Oid			types[6] = {TIDOID, INT4OID, TEXTOID, BOOLOID, INT4OID, TEXTOID};
	char		nulls[6] = {' ', ' ', error ? ' ' : 'n', ' ', ' ', claimer ? ' ' : 'n'};
	int			ret;

	args[0] = PointerGetDatum(&item->ctid);
	args[1] = Int32GetDatum(item->route_id);
	args[2] = error ? CStringGetTextDatum(error) : (Datum) 0;
	args[3] = BoolGetDatum(item->route->block_on_dead_letter && item->key != NULL);
	args[4] = Int32GetDatum(add_attempts);
	args[5] = claimer ? CStringGetTextDatum(claimer) : (Datum) 0;
	ret = SPI_execute_with_args("WITH d AS (DELETE FROM resilience.outbox"
								"   WHERE ctid OPERATOR(pg_catalog.=) $1 AND route_id OPERATOR(pg_catalog.=) $2"
								"     AND ($6::pg_catalog.text IS NULL OR claimed_by OPERATOR(pg_catalog.=) $6)"
								" RETURNING *)"
								" INSERT INTO resilience.outbox_dead_letters AS x"
								" (id, seq, route_id, topic, key, payload, headers, published_at,"
								"  attempts, last_error, blocking)"
								" SELECT id, seq, route_id, topic, key, payload, headers, published_at,"
								"  attempts OPERATOR(pg_catalog.+) $5, coalesce($3, last_error, 'max_attempts reached'), $4 FROM d"
								" ON CONFLICT (route_id, id) DO UPDATE SET attempts = excluded.attempts,"
								"  last_error = excluded.last_error, dead_at = pg_catalog.now(), blocking = excluded.blocking"
								" RETURNING id, topic, attempts",
								6, types, args, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "moving an event to the dead letters failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
		outbox_count(RC_OUTBOX_DEAD_LETTERS, item->route_id, 1);
	if (SPI_processed == 1)
		ereport(LOG,
				(errmsg("resilience outbox: event %s (topic \"%s\") of route %d is a dead letter after %s attempts: %s",
						SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1),
						SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2),
						item->route_id,
						SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3),
						error ? error : "max_attempts reached")));
}

/* ---- the pull API ---- */

/*
 * Act as the owner of the outbox tables for the pull API (SPI connected),
 * once the calling role is known to own consumer, its member or
 * resilience_admin (42501 otherwise; the first role to use a name owns it).
 */
static void
consumer_become_owner(text *consumer, ResilienceUser *save)
{
	Oid			caller = GetUserId();

	resilience_become_owner(true, save);
	tenant_claim(TENANT_OUTBOX_CONSUMER, VARDATA_ANY(consumer), VARSIZE_ANY_EXHDR(consumer), caller);
}

/* The claim slot of a consumer name (waiters sleep on it). */
int
outbox_claim_slot(const char *consumer)
{
	return hash_bytes((const unsigned char *) consumer, strlen(consumer)) % OUTBOX_CLAIM_SLOTS;
}

/* Wake consumers of slots (all: ~0) when this transaction commits. */
static void
wake_claimers_at_commit_of(uint64 slots)
{
	register_callbacks();
	wake_claimers_at_commit |= slots;
}

/*
 * outbox_claim(consumer, batch, visibility, wait) → the claimed events.
 * With wait, a claim that finds nothing sleeps on the consumer's claim slot
 * until a transaction that published for it commits (or an event falls
 * due, or wait is over), then claims again: a long poll, not a poll loop.
 * Each claim reads with a new snapshot (READ COMMITTED).
 */
Datum
outbox_claim(PG_FUNCTION_ARGS)
{
	text	   *consumer = name_arg(fcinfo, 0, "consumer", OUTBOX_KEY_MAX, false);
	int			batch;
	int64		visibility;
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	OutboxClaim claim;
	ListCell   *lc;
	ResilienceUser save;
	int64		wait = 0;
	TimestampTz deadline;
	ConditionVariable *cv = NULL;
	static uint32 wait_event = 0;

	if (PG_ARGISNULL(1) || PG_GETARG_INT32(1) <= 0 || PG_GETARG_INT32(1) > 10000)
		ereport(ERROR,
				(errcode(PG_ARGISNULL(1) ? ERRCODE_NULL_VALUE_NOT_ALLOWED : ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("batch must be between 1 and 10000")));
	batch = PG_GETARG_INT32(1);
	visibility = resilience_arg_duration(fcinfo, 2, "visibility", false);
	if (PG_NARGS() > 3 && !PG_ARGISNULL(3))
		wait = resilience_arg_duration(fcinfo, 3, "wait", true);
	if (wait > CLAIM_WAIT_MAX_US)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("wait must be at most 1 hour")));
	if (wait > 0)
	{
		resilience_require_preload("outbox_claim with wait");
		if (IsolationUsesXactSnapshot())
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("outbox_claim can wait only in a READ COMMITTED transaction"),
					 errdetail("Under REPEATABLE READ or SERIALIZABLE it would never see the events that commit while it waits."),
					 errhint("Call it in autocommit, or pass wait => NULL.")));
		cv = relay_claim_cv(outbox_claim_slot(text_to_cstring(consumer)));
	}

	InitMaterializedSRF(fcinfo, 0);
	memset(&claim, 0, sizeof(claim));
	SPI_connect();
	consumer_become_owner(consumer, &save);
	claim.routes = outbox_load_routes(false, text_to_cstring(consumer));
	claim.limit = batch;
	claim.runs = false;
	claim.count_attempt = true;
	claim.claimer = text_to_cstring(consumer);
	claim.visibility_ms = visibility / 1000;
	deadline = GetCurrentTimestamp() + wait;
	/* on the wait list before the first look: a commit in between wakes us */
	if (cv)
		ConditionVariablePrepareToSleep(cv);
	for (;;)
	{
		long		sleep_ms;

		claim.now = GetCurrentTimestamp();
		if (cv)
			PushActiveSnapshot(GetTransactionSnapshot());
		outbox_claim_rows(&claim);
		foreach(lc, claim.dead)
			outbox_dead_letter(lfirst(lc), NULL, 0, NULL);
		if (cv)
			PopActiveSnapshot();
		if (cv == NULL || claim.items != NIL || claim.now >= deadline)
			break;
		sleep_ms = (deadline - claim.now + 999) / 1000;
		if (claim.next_due > 0)
			sleep_ms = Min(sleep_ms, Max((claim.next_due - claim.now + 999) / 1000, 1));
		if (wait_event == 0)
			wait_event = resilience_wait_event_compat("ResilienceOutboxClaim");
		(void) ConditionVariableTimedSleep(cv, sleep_ms, wait_event);
	}
	if (cv)
		ConditionVariableCancelSleep();
	foreach(lc, claim.items)
	{
		OutboxItem *item = lfirst(lc);
		Datum		values[7];
		bool		nulls[7] = {0};

		values[0] = Int64GetDatum(item->id);
		values[1] = CStringGetTextDatum(item->topic);
		values[2] = item->key ? CStringGetTextDatum(item->key) : (Datum) 0;
		nulls[2] = item->key == NULL;
		values[3] = DirectFunctionCall1(jsonb_in, CStringGetDatum(item->payload));
		values[4] = DirectFunctionCall1(jsonb_in, CStringGetDatum(item->headers));
		values[5] = TimestampTzGetDatum(item->published_at);
		values[6] = Int32GetDatum(item->attempts);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	resilience_restore_user(&save);
	SPI_finish();
	return (Datum) 0;
}

/* outbox_ack(consumer, ids) → how many of them consumer still had claimed. */
Datum
outbox_ack(PG_FUNCTION_ARGS)
{
	text	   *consumer = name_arg(fcinfo, 0, "consumer", OUTBOX_KEY_MAX, false);
	int			retention = outbox_setting_int("resilience.outbox_retention", 0, GUC_UNIT_S);
	Datum		args[3];
	Oid			types[3] = {TEXTOID, INT8ARRAYOID, INTERVALOID};
	int			ret;
	ResilienceUser save;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("ids must not be null")));
	args[0] = PointerGetDatum(consumer);
	args[1] = PG_GETARG_DATUM(1);
	args[2] = DirectFunctionCall7(make_interval, Int32GetDatum(0), Int32GetDatum(0),
								  Int32GetDatum(0), Int32GetDatum(0), Int32GetDatum(0),
								  Int32GetDatum(0), Float8GetDatum((double) retention));
	SPI_connect();
	consumer_become_owner(consumer, &save);
	if (retention > 0)
		ret = SPI_execute_with_args("UPDATE resilience.outbox SET delivered_at = pg_catalog.now(),"
									" not_before = pg_catalog.now() OPERATOR(pg_catalog.+) $3,"
									" claimed_by = NULL, claim_until = NULL"
									" WHERE id OPERATOR(pg_catalog.=) ANY($2) AND pull AND claimed_by OPERATOR(pg_catalog.=) $1"
									" AND delivered_at IS NULL"
									" RETURNING route_id",
									3, types, args, NULL, false, 0);
	else
		ret = SPI_execute_with_args("DELETE FROM resilience.outbox"
									" WHERE id OPERATOR(pg_catalog.=) ANY($2) AND pull AND claimed_by OPERATOR(pg_catalog.=) $1"
									" AND delivered_at IS NULL"
									" RETURNING route_id",
									2, types, args, NULL, false, 0);
	if (ret < 0)
		elog(ERROR, "acknowledging outbox events failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		outbox_count(RC_OUTBOX_DELIVERED,
					 DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull)),
					 1);
	}
	ret = (int) SPI_processed;
	resilience_restore_user(&save);
	SPI_finish();
	PG_RETURN_INT32(ret);
}

/* outbox_nack(consumer, id, delay) → false if consumer did not hold it. */
Datum
outbox_nack(PG_FUNCTION_ARGS)
{
	text	   *consumer = name_arg(fcinfo, 0, "consumer", OUTBOX_KEY_MAX, false);
	int64		delay;
	Datum		args[3];
	Oid			types[3] = {TEXTOID, INT8OID, TIMESTAMPTZOID};
	bool		found;
	uint64		i;
	int			ret;
	ResilienceUser save;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("id must not be null")));
	delay = delay_arg(fcinfo, 2, "delay", true);
	args[0] = PointerGetDatum(consumer);
	args[1] = PG_GETARG_DATUM(1);
	args[2] = TimestampTzGetDatum(GetCurrentTimestamp() + delay);
	SPI_connect();
	consumer_become_owner(consumer, &save);
	ret = SPI_execute_with_args("UPDATE resilience.outbox SET claimed_by = NULL, claim_until = NULL,"
								" not_before = $3, last_error = 'nacked by ' OPERATOR(pg_catalog.||) $1"
								" WHERE id OPERATOR(pg_catalog.=) $2 AND pull AND claimed_by OPERATOR(pg_catalog.=) $1"
								" AND delivered_at IS NULL"
								" RETURNING ctid, route_id, key, attempts",
								3, types, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "giving back an outbox event failed: %s", SPI_result_code_string(ret));
	found = SPI_processed > 0;
	if (found)
	{
		SPITupleTable *tt = SPI_tuptable;
		uint64		n = SPI_processed;
		List	   *routes = outbox_load_routes(false, NULL);

		wake_claimers_at_commit_of(UINT64CONST(1) << outbox_claim_slot(text_to_cstring(consumer)));

		for (i = 0; i < n; i++)
		{
			bool		isnull;
			int32		route_id = DatumGetInt32(SPI_getbinval(tt->vals[i], tt->tupdesc, 2, &isnull));
			int			attempts = DatumGetInt32(SPI_getbinval(tt->vals[i], tt->tupdesc, 4, &isnull));
			bool		dead = false;
			ListCell   *lc;

			foreach(lc, routes)
			{
				OutboxRoute *r = lfirst(lc);

				if (r->id == route_id && attempts >= r->max_attempts)
				{
					OutboxItem	item;

					memset(&item, 0, sizeof(item));
					ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(tt->vals[i], tt->tupdesc, 1, &isnull)),
									&item.ctid);
					item.route_id = route_id;
					item.route = r;
					item.key = SPI_getvalue(tt->vals[i], tt->tupdesc, 3);
					outbox_dead_letter(&item, psprintf("nacked by %s after %d attempts",
													   text_to_cstring(consumer), attempts), 0, NULL);
					dead = true;
				}
			}
			if (!dead)
				outbox_count(RC_OUTBOX_RETRIES, route_id, 1);
		}
	}
	resilience_restore_user(&save);
	SPI_finish();
	PG_RETURN_BOOL(found);
}

/* outbox_redrive(ids, topic_pattern, route_id) → dead letters put back. */
Datum
outbox_redrive(PG_FUNCTION_ARGS)
{
	Datum		args[3];
	Oid			types[3] = {INT8ARRAYOID, TEXTOID, INT4OID};
	char		nulls[3];
	int			ret;
	int			i;

	if (PG_ARGISNULL(0) && PG_ARGISNULL(1) && PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("outbox_redrive needs ids, a topic_pattern or a route_id"),
				 errhint("To redrive every dead letter, pass topic_pattern => '%%'.")));
	for (i = 0; i < 3; i++)
	{
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
		args[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
	}
	SPI_connect();
	ret = SPI_execute_with_args("WITH d AS (DELETE FROM resilience.outbox_dead_letters x"
								"  WHERE ($1 IS NULL OR x.id OPERATOR(pg_catalog.=) ANY($1))"
								"    AND ($2 IS NULL OR x.topic OPERATOR(pg_catalog.~~) $2 COLLATE pg_catalog.\"C\")"
								"    AND ($3 IS NULL OR x.route_id OPERATOR(pg_catalog.=) $3)"
								"    AND EXISTS (SELECT FROM resilience.outbox_routes r"
								" WHERE r.id OPERATOR(pg_catalog.=) x.route_id)"
								"  RETURNING *)"
								" INSERT INTO resilience.outbox (id, seq, route_id, topic, key, payload,"
								"  headers, published_at, not_before, last_error, pull)"
								" SELECT id, seq, route_id, topic, key, payload, headers, published_at,"
								"  pg_catalog.now(), 'redriven after: ' OPERATOR(pg_catalog.||) last_error,"
								"  (SELECT r.sink OPERATOR(pg_catalog.=) 'queue' FROM resilience.outbox_routes r"
								" WHERE r.id OPERATOR(pg_catalog.=) d.route_id)"
								" FROM d",
								3, types, args, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "redriving dead letters failed: %s", SPI_result_code_string(ret));
	ret = (int) SPI_processed;
	SPI_finish();
	if (ret > 0)
	{
		wake_relay_at_commit();
		wake_claimers_at_commit_of(~UINT64CONST(0));
	}
	PG_RETURN_INT32(ret);
}
