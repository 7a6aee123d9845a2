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
 * resilience.outbox_http_allowed_hosts) lists the hosts routes may name;
 * empty means loopback only, and then the address actually connected to must be a loopback address too (a name that resolves
 * elsewhere is refused).  Without preloading the list is not read (a session
 * could set the placeholder): loopback only.
 *
 *-------------------------------------------------------------------------
 */
#include "outbox.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <curl/curl.h>

#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/varlena.h"

#define BODY_SNIPPET 120
#define POLL_MS 100

typedef struct Transfer
{
	OutboxItem *item;
	struct Transfer *next_in_chain;
	CURL	   *easy;
	struct curl_slist *headers;
	char		errbuf[CURL_ERROR_SIZE];
	char		body[BODY_SNIPPET + 1];
	int			body_len;
	int64		retry_after_ms;
	bool		loopback_only;
} Transfer;

static CURLM *multi = NULL;

/* ---- destinations ---- */

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

/* Loopback only (the allow-list is empty or not read)? */
bool
outbox_loopback_only(void)
{
	return outbox_allow_list()[0] == '\0';
}

/* May the http sink call host, given allow (a comma-separated list)? */
bool
http_host_allowed(const char *host, const char *allow)
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
		/* *.example.com: any subdomain of example.com */
		if (elen > 2 && entry[0] == '*' && entry[1] == '.' && hlen > elen - 1 &&
			pg_strcasecmp(host + hlen - (elen - 1), entry + 1) == 0)
			return true;
	}
	return false;
}

/*
 * Check an http target: NULL if it may be used (then *destination is
 * scheme://host:port, the breaker's key), else why not.
 */
const char *
outbox_destination_allowed(const char *url, char **destination)
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
		if (!http_host_allowed(host, outbox_allow_list()))
			problem = psprintf("host \"%s\" is not allowed by resilience.outbox_allowed_hosts%s",
							   host, outbox_allow_list()[0] ? "" : " (empty: loopback only)");
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

/* Loopback only: refuse to connect anywhere else, whatever a name resolved to. */
static curl_socket_t
on_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	Transfer   *t = clientp;

	if (t->loopback_only)
	{
		bool		ok = false;

		if (address->family == AF_INET)
			ok = (ntohl(((struct sockaddr_in *) &address->addr)->sin_addr.s_addr) >> 24) == 127;
		else if (address->family == AF_INET6)
			ok = IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *) &address->addr)->sin6_addr);
		if (!ok)
		{
			snprintf(t->errbuf, CURL_ERROR_SIZE, "address not allowed: not loopback");
			return CURL_SOCKET_BAD;
		}
	}
	return socket(address->family, address->socktype, address->protocol);
}

/* ---- requests ---- */

static void
set_error(OutboxItem *item, const char *fmt, const char *a, const char *b)
{
	snprintf(item->error, OUTBOX_ERROR_MAX, fmt, a, b);
}

/* Prepare a transfer's easy handle; false (item dead) if it may not go. */
static bool
start_transfer(Transfer *t, bool loopback_only, const char *allow)
{
	OutboxItem *item = t->item;
	OutboxRoute *r = item->route;
	char	   *dest;
	const char *problem = outbox_destination_allowed(r->target, &dest);
	Jsonb	   *headers;
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;
	ListCell   *lc;

	(void) allow;
	if (problem)
	{
		item->outcome = OUTCOME_DEAD;
		set_error(item, "%s", problem, NULL);
		return false;
	}
	t->loopback_only = loopback_only;
	t->retry_after_ms = -1;
	t->headers = curl_slist_append(NULL, "Content-Type: application/json");
	t->headers = curl_slist_append(t->headers, psprintf("Idempotency-Key: " INT64_FORMAT, item->id));
	t->headers = curl_slist_append(t->headers, "Expect:");
	headers = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(item->headers)));
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		if (tok != WJB_KEY)
			continue;
		(void) JsonbIteratorNext(&it, &v, true);
		if (v.type == jbvString)
			t->headers = curl_slist_append(t->headers,
										   psprintf("%.*s: %.*s", k.val.string.len, k.val.string.val,
													v.val.string.len, v.val.string.val));
	}
	foreach(lc, r->headers)
		t->headers = curl_slist_append(t->headers, (char *) lfirst(lc));

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
	if (result != CURLE_OK)
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
		if (t->easy)
			curl_easy_cleanup(t->easy);
		t->easy = NULL;
	}
}

/*
 * Deliver items (route sink http, in seq order per route) with no
 * transaction open; sets each item's outcome.
 */
void
http_deliver(List *items)
{
	int			n = list_length(items);
	Transfer   *transfers = palloc0(sizeof(Transfer) * n);
	Transfer  **ready = palloc(sizeof(Transfer *) * n);
	int			nready = 0;
	int			next_ready = 0;
	int			running = 0;
	int			parallelism = outbox_setting_int("resilience.outbox_http_parallelism", 16, 0);
	bool		loopback_only = outbox_loopback_only();
	char	   *allow = outbox_allow_list();
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

			while (running < parallelism && next_ready < nready && !worker_stop_requested())
			{
				Transfer   *t = ready[next_ready++];

				if (!relay_may_start(t->item))
				{
					skip_chain(t);
					continue;
				}
				if (start_transfer(t, loopback_only, allow))
					running++;
				else
				{
					relay_item_done(t->item);
					skip_chain(t->next_in_chain);
				}
			}
			if (running == 0)
				break;
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
				curl_multi_poll(multi, NULL, 0, POLL_MS, NULL);
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
