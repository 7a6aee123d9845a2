/*-------------------------------------------------------------------------
 *
 * sink_http.c
 *		The http sink: POST each event to the route's URL with libcurl's
 *		multi interface.
 *
 * Requests run in parallel (resilience.outbox_http_parallelism), except
 * that the events of one key on one route form a chain: the next is sent
 * only once the one before it succeeded, and a failure leaves the rest of
 * the chain untried (released, not counted as attempts).  The multi handle
 * lives as long as the process, so connections are reused across batches.
 *
 * Each request carries Content-Type: application/json, Idempotency-Key: the
 * event id, the event's headers and the route's headers; the body is the
 * payload.  2xx is delivered; 408, 429, 5xx, timeouts and connection errors
 * are retried (Retry-After is read from the answer); anything else is a
 * dead letter.  Redirects are not followed, only http and https are
 * spoken, TLS certificates and host names are verified.
 *
 * Destinations: resilience.outbox_allowed_hosts (and its older name
 * resilience.outbox_http_allowed_hosts) lists the hosts routes may name
 * (names, *.domain, IP addresses and CIDR ranges); empty means loopback
 * only.  The address actually connected to is checked too, whatever a name
 * resolved to: with an empty list it must be a loopback address; with a
 * list, loopback, link-local and private addresses (127/8, ::1,
 * 169.254/16, fe80::/10, 10/8, 172.16/12, 192.168/16, fc00::/7, 0/8, ::)
 * are refused unless an IP or CIDR entry of the list covers them.  A refused
 * address makes the event a dead letter, naming the address.  Without
 * preloading the list is not read (a session could set the placeholder):
 * loopback only.  The server's environment proxies (http_proxy...) are never
 * used; a route may name its own (option "proxy", a host allowed like a
 * target's), and then it is the proxy's address that is checked.
 *
 * Signatures (Standard Webhooks, https://www.standardwebhooks.com): with
 * the route option signing_secret ("whsec_" + base64 of 24 to 64 bytes, or
 * a list of two while rotating), each request also carries webhook-id (the
 * event id), webhook-timestamp (seconds since the epoch, taken just before
 * the send) and webhook-signature: "v1,<base64 of HMAC-SHA256(key,
 * "id.timestamp.body")>", one per key, space-separated.  The HMAC is
 * OpenSSL's (libcurl's TLS already needs it): PostgreSQL's pg_hmac_* ties
 * its contexts to a resource owner, and the relay sends with no
 * transaction open.  The keys live in the route's options (readable only by
 * resilience_admin) and in the relaying process' memory, nowhere else.
 *
 * Limits per route (options rate, burst, max_in_flight): a request starts
 * only when the route's token bucket has a token and fewer than
 * max_in_flight of its requests are running.  Both are the extension's own
 * shared ones (a token bucket and a bulkhead named
 * outbox:<database oid>:<route id>, under kinds of their own in the shared
 * tables, so no SQL caller of rate_limit or bulkhead_acquire can spend
 * them), and every relaying process of the cluster shares them; without
 * preloading, a process-local bucket and count.  A request that may not start yet waits in this batch (others go
 * on); the relay claims about a second's worth of a rate-limited route per
 * batch.  Retry-After still pauses the destination on top of this.
 *
 * Headers: the event's headers are checked again before each send (a row
 * written before the checks of outbox_publish, or by hand): a header that
 * is not allowed makes the event a dead letter; one the route sets too is
 * dropped (the route's value wins, never both).
 *
 *-------------------------------------------------------------------------
 */
#include "outbox.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "common/base64.h"

#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/varlena.h"

#define BODY_SNIPPET 120
#define POLL_MS 100
#define HOLD_MS 5				/* re-check held-back requests this often */

typedef struct Transfer
{
	OutboxItem *item;
	bool		permit;			/* holds an in-flight permit of its route */
	struct Transfer *next_in_chain;
	CURL	   *easy;
	struct curl_slist *headers;
	char		errbuf[CURL_ERROR_SIZE];
	char		body[BODY_SNIPPET + 1];
	int			body_len;
	int64		retry_after_ms;
	const OutboxAddressPolicy *policy;
	bool		refused;		/* an address was refused: refusal says which */
	char		refusal[160];
} Transfer;

static CURLM *multi = NULL;

/* Without preloading: a route's bucket and in-flight count, in this process. */
typedef struct LocalLimit
{
	Oid			dbid;
	int32		route_id;
	double		tokens;
	int64		stamp;			/* resilience_clock_ns() */
	int			in_flight;
} LocalLimit;

static List *local_limits = NIL;	/* LocalLimit *, in TopMemoryContext */

/*
 * Check an http target: NULL if it may be used (then *destination is
 * scheme://host:port, the breaker's key), else why not.
 */
static const char *
http_check_target(const char *url, char **destination)
{
	CURLU	   *u = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	char	   *port = NULL;
	const char *problem = NULL;

	*destination = NULL;
	if (u == NULL)
		elog(ERROR, "out of memory");
	if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK)
		problem = "malformed URL";
	else if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
			 (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0))
		problem = "only http and https URLs are allowed";
	else if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || host[0] == '\0')
		problem = "the URL has no host";
	else if (curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK)
		problem = "the URL has no usable port";
	else
	{
		*destination = psprintf("%s://%s:%s", scheme, host, port);
		problem = outbox_host_problem(host);
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(u);
	return problem;
}

/* ---- libcurl callbacks (no palloc, no ereport: they run inside libcurl) ---- */

/* Keep the start of the answer's body for the error message; drop the rest. */
static size_t
on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Transfer   *t = userdata;
	size_t		n = size * nmemb;
	size_t		room = BODY_SNIPPET - t->body_len;

	if (room > 0)
	{
		size_t		take = Min(room, n);

		memcpy(t->body + t->body_len, ptr, take);
		t->body_len += take;
		t->body[t->body_len] = '\0';
	}
	return n;
}

/* Read Retry-After (delay-seconds; an HTTP-date is read with curl_getdate). */
static size_t
on_header(char *buffer, size_t size, size_t nitems, void *userdata)
{
	Transfer   *t = userdata;
	size_t		n = size * nitems;
	const char *name = "retry-after:";
	size_t		nlen = strlen(name);

	if (n > nlen && pg_strncasecmp(buffer, name, nlen) == 0)
	{
		char		value[64];
		size_t		vlen = Min(n - nlen, sizeof(value) - 1);
		char	   *v = value;
		char	   *end;
		long		secs;

		memcpy(value, buffer + nlen, vlen);
		value[vlen] = '\0';
		while (*v == ' ' || *v == '\t')
			v++;
		v[strcspn(v, "\r\n")] = '\0';
		secs = strtol(v, &end, 10);
		if (end != v && *end == '\0' && secs >= 0)
			t->retry_after_ms = (int64) secs * 1000;
		else
		{
			time_t		when = curl_getdate(v, NULL);

			if (when > 0)
				t->retry_after_ms = Max((int64) (when - time(NULL)) * 1000, 0);
		}
	}
	return n;
}

/*
 * Refuse to connect to an address the policy does not allow, whatever a name
 * resolved to (checked here, on the address actually connected to).
 */
static curl_socket_t
on_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	Transfer   *t = clientp;

	if (!outbox_address_ok(t->policy, &address->addr, t->refusal, sizeof(t->refusal)))
	{
		t->refused = true;
		return CURL_SOCKET_BAD;
	}
	return socket(address->family, address->socktype, address->protocol);
}

/* ---- signatures ---- */

#define WEBHOOK_SECRET_PREFIX "whsec_"
#define WEBHOOK_KEY_MIN 24
#define WEBHOOK_KEY_MAX 64

/*
 * Decode a signing secret into key (WEBHOOK_KEY_MAX bytes of room): its
 * length, or -1 and *why.  Never quotes the secret.
 */
static int
webhook_key(const char *secret, int len, unsigned char *key, const char **why)
{
	int			plen = strlen(WEBHOOK_SECRET_PREFIX);
	char		buf[256];
	int			n = -1;

	*why = NULL;
	if (len < plen || strncmp(secret, WEBHOOK_SECRET_PREFIX, plen) != 0)
		*why = "it does not start with whsec_";
	/* pg_b64_decode needs room for what the text could hold */
	else if (pg_b64_dec_len(len - plen) > (int) sizeof(buf) ||
			 (n = pg_b64_decode(secret + plen, len - plen, (void *) buf, sizeof(buf))) < 0)
		*why = "what follows whsec_ is not base64";
	else if (n < WEBHOOK_KEY_MIN || n > WEBHOOK_KEY_MAX)
		*why = psprintf("its key is %d bytes", n);
	else
		memcpy(key, buf, n);
	explicit_bzero(buf, sizeof(buf));
	return *why ? -1 : n;
}

/*
 * The webhook-signature value for content ("id.timestamp.body") under
 * keys: "v1,<base64>" per key, space-separated, into out.
 */
static void
webhook_signature(unsigned char *const *keys, const int *key_len, int nkeys,
				  const char *content, size_t content_len, StringInfo out)
{
	int			i;

	for (i = 0; i < nkeys; i++)
	{
		unsigned char mac[EVP_MAX_MD_SIZE];
		unsigned int mac_len = 0;
		char		b64[128];
		int			n;

		if (HMAC(EVP_sha256(), keys[i], key_len[i], (const unsigned char *) content,
				 content_len, mac, &mac_len) == NULL)
			elog(ERROR, "HMAC-SHA256 failed");
		n = pg_b64_encode((const void *) mac, (int) mac_len, b64, sizeof(b64));
		if (n < 0)
			elog(ERROR, "base64 encoding failed");
		appendStringInfo(out, "%sv1,%.*s", i == 0 ? "" : " ", n, b64);
	}
}

/* The webhook-* headers of an item signed now, appended to headers. */
static struct curl_slist *
sign_item(OutboxItem *item, struct curl_slist *headers)
{
	OutboxRoute *r = item->route;
	int64		now = (int64) time(NULL);
	StringInfoData content;
	StringInfoData sig;

	initStringInfo(&content);
	appendStringInfo(&content, INT64_FORMAT "." INT64_FORMAT ".%s", item->id, now, item->payload);
	initStringInfo(&sig);
	appendStringInfoString(&sig, "webhook-signature: ");
	webhook_signature(r->signing_keys, r->signing_key_len, r->nsigning_keys,
					  content.data, content.len, &sig);
	headers = curl_slist_append(headers, psprintf("webhook-id: " INT64_FORMAT, item->id));
	headers = curl_slist_append(headers, psprintf("webhook-timestamp: " INT64_FORMAT, now));
	return curl_slist_append(headers, sig.data);
}

/*
 * _webhook_sign(secret, id, timestamp, body) → the webhook-signature
 * header value, for checking against the specification's examples and for
 * receivers' tests.
 */
PG_FUNCTION_INFO_V1(webhook_signature_sql);
Datum
webhook_signature_sql(PG_FUNCTION_ARGS)
{
	text	   *secret = PG_GETARG_TEXT_PP(0);
	unsigned char key[WEBHOOK_KEY_MAX];
	unsigned char *keys[1] = {key};
	int			len;
	const char *why;
	StringInfoData content;
	StringInfoData sig;

	len = webhook_key(VARDATA_ANY(secret), VARSIZE_ANY_EXHDR(secret), key, &why);
	if (len < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("secret must be \"whsec_\" followed by the base64 of %d to %d bytes",
						WEBHOOK_KEY_MIN, WEBHOOK_KEY_MAX),
				 errdetail("The secret given is not: %s.", why)));
	initStringInfo(&content);
	appendStringInfo(&content, "%s." INT64_FORMAT ".%s", text_to_cstring(PG_GETARG_TEXT_PP(1)),
					 PG_GETARG_INT64(2), text_to_cstring(PG_GETARG_TEXT_PP(3)));
	initStringInfo(&sig);
	webhook_signature(keys, &len, 1, content.data, content.len, &sig);
	explicit_bzero(key, sizeof(key));
	PG_RETURN_TEXT_P(cstring_to_text(sig.data));
}

/*
 * Option signing_secret: one secret, or a list of at most two (rotation:
 * every request is signed with each).  The error never quotes a secret.
 */
static void
parse_signing_secret(OutboxRoute *r, JsonbValue *v)
{
	const char *bad = "option \"signing_secret\" must be \"whsec_\" followed by the base64 of 24 to 64 bytes, or a list of one or two of them";
	JsonbValue	elems[OUTBOX_SIGNING_KEYS_MAX];
	int			n = 0;

	if (v->type == jbvString)
		elems[n++] = *v;
	else if (v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data))
	{
		JsonbIterator *it = JsonbIteratorInit(v->val.binary.data);
		JsonbValue	e;
		JsonbIteratorToken tok;

		while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM)
				continue;
			if (n == OUTBOX_SIGNING_KEYS_MAX || e.type != jbvString)
				outbox_route_error(bad, NULL, "While rotating, list the new secret and the old one.");
			elems[n++] = e;
		}
	}
	if (n == 0)
		outbox_route_error(bad, NULL, NULL);
	r->nsigning_keys = 0;
	for (int i = 0; i < n; i++)
	{
		unsigned char *key = palloc(WEBHOOK_KEY_MAX);
		const char *why;
		int			len = webhook_key(elems[i].val.string.val, elems[i].val.string.len, key, &why);

		if (len < 0)
			outbox_route_error(bad, psprintf("Secret %d of %d is not: %s.", i + 1, n, why),
							   "Generate one with: SELECT 'whsec_' || encode(gen_random_bytes(32), 'base64') (pgcrypto).");
		r->signing_keys[i] = key;
		r->signing_key_len[i] = len;
		r->nsigning_keys++;
	}
}

/* ---- per-route limits: rate and max_in_flight ---- */

#define LIMIT_NAME_LEN 32

/* The name of a route's bucket and bulkhead (in the relay's own kinds). */
static const char *
limit_name(OutboxRoute *r, char *buf)
{
	snprintf(buf, LIMIT_NAME_LEN, "outbox:%u:%d", MyDatabaseId, r->id);
	return buf;
}

static LocalLimit *
local_limit(OutboxRoute *r)
{
	ListCell   *lc;
	LocalLimit *l;
	MemoryContext old;

	foreach(lc, local_limits)
	{
		l = lfirst(lc);
		if (l->dbid == MyDatabaseId && l->route_id == r->id)
			return l;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	l = palloc0(sizeof(LocalLimit));
	l->dbid = MyDatabaseId;
	l->route_id = r->id;
	l->tokens = r->burst;
	l->stamp = resilience_clock_ns();
	local_limits = lappend(local_limits, l);
	MemoryContextSwitchTo(old);
	return l;
}

/* Take one token of the route's bucket; false if there is none now. */
static bool
take_token(OutboxRoute *r)
{
	LocalLimit *l;
	int64		now;
	char		name[LIMIT_NAME_LEN];

	if (r->rate <= 0)
		return true;
	if (resilience_preloaded)
	{
		limit_name(r, name);
		return rate_limit_take_internal(name, strlen(name), r->burst, r->rate);
	}
	l = local_limit(r);
	now = resilience_clock_ns();
	l->tokens = Min(l->tokens + (now - l->stamp) * r->rate / 1e9, (double) r->burst);
	l->stamp = now;
	if (l->tokens < 1)
		return false;
	l->tokens -= 1;
	return true;
}

/* Take an in-flight permit of the item's route; false if all are taken. */
static bool
take_permit(Transfer *t)
{
	OutboxRoute *r = t->item->route;
	bool		ok;
	char		name[LIMIT_NAME_LEN];

	if (r->max_in_flight <= 0)
		return true;
	if (resilience_preloaded)
		ok = bulkhead_try_acquire_internal(limit_name(r, name), r->max_in_flight);
	else
	{
		LocalLimit *l = local_limit(r);

		ok = l->in_flight < r->max_in_flight;
		if (ok)
			l->in_flight++;
	}
	t->permit = ok;
	return ok;
}

static void
give_permit(Transfer *t)
{
	char		name[LIMIT_NAME_LEN];

	if (!t->permit)
		return;
	t->permit = false;
	if (resilience_preloaded)
		bulkhead_release_internal(limit_name(t->item->route, name));
	else
		local_limit(t->item->route)->in_flight--;
}

/*
 * May t start now as far as its route's limits go?  A token is taken only
 * once the permit is held, so a request that waits for a permit does not
 * spend the route's rate.
 */
static bool
route_limits_allow(Transfer *t)
{
	if (!take_permit(t))
		return false;
	if (!take_token(t->item->route))
	{
		give_permit(t);
		return false;
	}
	return true;
}

/* ---- requests ---- */

static void
set_error(OutboxItem *item, const char *fmt, const char *a, const char *b)
{
	snprintf(item->error, OUTBOX_ERROR_MAX, fmt, a, b);
}

/* Prepare a transfer's easy handle; false (item dead) if it may not go. */
static bool
start_transfer(Transfer *t, const OutboxAddressPolicy *policy)
{
	OutboxItem *item = t->item;
	OutboxRoute *r = item->route;
	char	   *dest;
	const char *problem = http_check_target(r->target, &dest);
	List	   *event_headers = NIL;
	ListCell   *lc;

	if (problem == NULL && r->proxy != NULL)
	{
		problem = http_check_target(r->proxy, &dest);
		if (problem)
			problem = psprintf("option \"proxy\": %s", problem);
	}
	if (problem == NULL)
		problem = outbox_item_headers(item, &event_headers);
	if (problem)
	{
		item->outcome = OUTCOME_DEAD;
		set_error(item, "%s", problem, NULL);
		return false;
	}
	t->policy = policy;
	t->refused = false;
	t->refusal[0] = '\0';
	t->retry_after_ms = -1;
	t->headers = curl_slist_append(NULL, "Content-Type: application/json");
	t->headers = curl_slist_append(t->headers, psprintf("Idempotency-Key: " INT64_FORMAT, item->id));
	t->headers = curl_slist_append(t->headers, "Expect:");
	foreach(lc, event_headers)
		t->headers = curl_slist_append(t->headers, (char *) lfirst(lc));
	foreach(lc, r->headers)
		t->headers = curl_slist_append(t->headers, (char *) lfirst(lc));
	if (r->nsigning_keys > 0)
		t->headers = sign_item(item, t->headers);

	if (t->easy == NULL)
		t->easy = curl_easy_init();
	if (t->easy == NULL || t->headers == NULL)
		elog(ERROR, "out of memory in libcurl");
	curl_easy_setopt(t->easy, CURLOPT_URL, r->target);
	curl_easy_setopt(t->easy, CURLOPT_POST, 1L);
	curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, item->payload);
	curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, (long) strlen(item->payload));
	curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, (long) r->timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) r->connect_timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(t->easy, CURLOPT_FOLLOWLOCATION, 0L);
	/* "": never the proxies of the server's environment (http_proxy...) */
	curl_easy_setopt(t->easy, CURLOPT_PROXY, r->proxy ? r->proxy : "");
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYHOST, 2L);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(t->easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(t->easy, CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	curl_easy_setopt(t->easy, CURLOPT_USERAGENT, "resilience-outbox/0.1");
	curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
	curl_easy_setopt(t->easy, CURLOPT_OPENSOCKETDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
	t->errbuf[0] = '\0';
	t->body[0] = '\0';
	t->body_len = 0;
	if (curl_multi_add_handle(multi, t->easy) != CURLM_OK)
		elog(ERROR, "curl_multi_add_handle failed");
	return true;
}

/* Turn a finished transfer into its item's outcome. */
static void
finish_transfer(Transfer *t, CURLcode result)
{
	OutboxItem *item = t->item;
	long		status = 0;

	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
	item->http_status = (int) status;
	item->retry_after_ms = t->retry_after_ms;
	if (result != CURLE_OK && t->refused)
	{
		/* every address was refused: no fault of the destination, a dead letter */
		item->outcome = OUTCOME_DEAD;
		set_error(item, "%s", t->refusal, NULL);
	}
	else if (result != CURLE_OK)
	{
		item->outcome = OUTCOME_RETRY;
		set_error(item, "%s", t->errbuf[0] ? t->errbuf : curl_easy_strerror(result), NULL);
	}
	else if (status >= 200 && status < 300)
		item->outcome = OUTCOME_DELIVERED;
	else
	{
		char		code[16];

		snprintf(code, sizeof(code), "HTTP %ld", status);
		item->outcome = (status == 408 || status == 429 || status >= 500) ? OUTCOME_RETRY : OUTCOME_DEAD;
		set_error(item, t->body_len > 0 ? "%s: %s" : "%s", code, t->body);
	}
	curl_multi_remove_handle(multi, t->easy);
	curl_slist_free_all(t->headers);
	t->headers = NULL;
	give_permit(t);
}

/* Mark the rest of a chain not tried. */
static void
skip_chain(Transfer *t)
{
	for (; t; t = t->next_in_chain)
		t->item->outcome = OUTCOME_NOT_TRIED;
}

/* Remove every running transfer (interrupt or error): not tried. */
static void
abandon(Transfer *transfers, int n)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		Transfer   *t = &transfers[i];

		if (t->headers)
		{
			curl_multi_remove_handle(multi, t->easy);
			curl_slist_free_all(t->headers);
			t->headers = NULL;
			t->item->outcome = OUTCOME_NOT_TRIED;
			relay_item_done(t->item);
		}
		give_permit(t);
		if (t->easy)
			curl_easy_cleanup(t->easy);
		t->easy = NULL;
	}
}

/*
 * Deliver items (route sink http, in seq order per route) with no
 * transaction open; sets each item's outcome.
 */
static void
http_deliver(List *items)
{
	int			n = list_length(items);
	Transfer   *transfers = palloc0(sizeof(Transfer) * n);
	Transfer  **ready = palloc(sizeof(Transfer *) * n);
	Transfer  **held = palloc(sizeof(Transfer *) * n);
	int			nheld = 0;
	int			nheld_now;
	int			nready = 0;
	int			next_ready = 0;
	int			running = 0;
	int			parallelism = outbox_setting_int("resilience.outbox_http_parallelism", 16, 0);
	OutboxAddressPolicy *policy = outbox_address_policy();
	ListCell   *lc;
	int			i;

	if (multi == NULL)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			elog(ERROR, "curl_global_init failed");
		multi = curl_multi_init();
		if (multi == NULL)
			elog(ERROR, "curl_multi_init failed");
	}
	curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) parallelism);
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) parallelism * 2);

	/* chains: each item waits for the one before it with the same route and key */
	i = 0;
	foreach(lc, items)
	{
		OutboxItem *item = lfirst(lc);
		Transfer   *t = &transfers[i++];
		int			j;
		bool		chained = false;

		t->item = item;
		item->outcome = OUTCOME_NOT_TRIED;
		if (item->key)
			for (j = i - 2; j >= 0; j--)
			{
				Transfer   *prev = &transfers[j];

				if (prev->item->route_id == item->route_id && prev->item->key &&
					strcmp(prev->item->key, item->key) == 0)
				{
					prev->next_in_chain = t;
					chained = true;
					break;
				}
			}
		if (!chained)
			ready[nready++] = t;
	}

	PG_TRY();
	{
		for (;;)
		{
			int			still;
			CURLMsg    *msg;
			int			left;

			/* requests held back by their route's limits go first */
			nheld_now = nheld;
			nheld = 0;
			for (i = 0; i < nheld_now; i++)
			{
				Transfer   *t = held[i];

				if (running < parallelism && route_limits_allow(t))
				{
					if (start_transfer(t, policy))
						running++;
					else
					{
						give_permit(t);
						relay_item_done(t->item);
						skip_chain(t->next_in_chain);
					}
				}
				else
					held[nheld++] = t;
			}
			while (running < parallelism && next_ready < nready && !worker_stop_requested())
			{
				Transfer   *t = ready[next_ready++];

				if (!relay_may_start(t->item))
				{
					skip_chain(t);
					continue;
				}
				if (!route_limits_allow(t))
				{
					held[nheld++] = t;
					continue;
				}
				if (start_transfer(t, policy))
					running++;
				else
				{
					give_permit(t);
					relay_item_done(t->item);
					skip_chain(t->next_in_chain);
				}
			}
			if (running == 0 && nheld == 0)
				break;
			if (running == 0)
			{
				/* only held-back requests: wait a little for a token or permit */
				if (worker_stop_requested())
				{
					for (i = 0; i < nheld; i++)
						skip_chain(held[i]);
					break;
				}
				(void) curl_multi_poll(multi, NULL, 0, HOLD_MS, NULL);
				CHECK_FOR_INTERRUPTS();
				continue;
			}
			curl_multi_perform(multi, &still);
			while ((msg = curl_multi_info_read(multi, &left)) != NULL)
			{
				Transfer   *t;

				if (msg->msg != CURLMSG_DONE)
					continue;
				curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
				finish_transfer(t, msg->data.result);
				running--;
				relay_item_done(t->item);
				if (t->item->outcome == OUTCOME_DELIVERED && t->next_in_chain)
					ready[nready++] = t->next_in_chain;
				else
					skip_chain(t->next_in_chain);
			}
			if (worker_stop_requested())
			{
				abandon(transfers, n);
				running = 0;
				break;
			}
			if (running > 0)
				curl_multi_poll(multi, NULL, 0, nheld > 0 ? HOLD_MS : POLL_MS, NULL);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_CATCH();
	{
		abandon(transfers, n);
		PG_RE_THROW();
	}
	PG_END_TRY();
	abandon(transfers, n);
}

/* ---- route options ---- */

static bool
http_parse_option(OutboxRoute *r, const char *name, JsonbValue *v, bool validate)
{
	if (strcmp(name, "headers") == 0)
		r->headers = outbox_parse_headers(v, "option \"headers\"");
	else if (strcmp(name, "signing_secret") == 0)
		parse_signing_secret(r, v);
	else if (strcmp(name, "rate") == 0)
	{
		if (v->type != jbvNumeric)
			outbox_route_error("option \"rate\" must be a number (requests per second)", NULL, NULL);
		r->rate = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(v->val.numeric)));
		if (!(r->rate > 0 && r->rate <= 1000000))
			outbox_route_error("option \"rate\" must be greater than 0 and at most 1000000 (requests per second)",
							   NULL, "Leave it out for no limit.");
		if (r->burst == 0)
			r->burst = Max((int) ceil(r->rate), 1);
	}
	else if (strcmp(name, "burst") == 0)
		r->burst = outbox_option_int(v, name, 1, 1000000);
	else if (strcmp(name, "max_in_flight") == 0)
	{
		r->max_in_flight = outbox_option_int(v, name, 1, 10000);
		if (validate &&
			!DatumGetBool(DirectFunctionCall2(numeric_eq, NumericGetDatum(v->val.numeric),
											  DirectFunctionCall1(int4_numeric, Int32GetDatum(r->max_in_flight)))))
			outbox_route_error("option \"max_in_flight\" must be a whole number", NULL, NULL);
	}
	else if (strcmp(name, "proxy") == 0)
	{
		char	   *dest;
		const char *problem;

		r->proxy = outbox_option_string(v, name);
		problem = http_check_target(r->proxy, &dest);
		if (problem && validate)
			outbox_route_error(psprintf("option \"proxy\": %s", problem),
							   psprintf("The proxy is %s.", outbox_redact_target(r->proxy)),
							   "A proxy is an http:// or https:// URL; its host must be allowed like a target's.");
	}
	else
		return false;
	return true;
}

static void
http_check_options(OutboxRoute *r)
{
	if (r->burst > 0 && r->rate == 0)
		outbox_route_error("option \"burst\" needs option \"rate\"", NULL,
						   "For example {\"rate\": 50, \"burst\": 10}: 50 requests per second, at most 10 at once after a pause.");
}

const OutboxSinkOps outbox_sink_http = {
	.name = "http",
	.push = true,
	.default_payload = PAYLOAD_OBJECT_OR_ARRAY,
	.check_target = http_check_target,
	.target_hint = "Targets are http:// or https:// URLs; hosts other than loopback must be "
	"listed in resilience.outbox_allowed_hosts.",
	.parse_option = http_parse_option,
	.options_hint = "headers, proxy, signing_secret, rate, burst, max_in_flight",
	.check_options = http_check_options,
	.deliver = http_deliver,
};
