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
 * Headers: the event's headers are checked again before each send (a row
 * written before the checks of outbox_publish, or by hand): a header that
 * is not allowed makes the event a dead letter; one the route sets too is
 * dropped (the route's value wins, never both).
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
	const OutboxAddressPolicy *policy;
	bool		refused;		/* an address was refused: refusal says which */
	char		refusal[160];
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
	const char *problem = outbox_destination_allowed(r->target, &dest);
	List	   *event_headers = NIL;
	ListCell   *lc;

	if (problem == NULL && r->proxy != NULL)
	{
		problem = outbox_destination_allowed(r->proxy, &dest);
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

			while (running < parallelism && next_ready < nready && !worker_stop_requested())
			{
				Transfer   *t = ready[next_ready++];

				if (!relay_may_start(t->item))
				{
					skip_chain(t);
					continue;
				}
				if (start_transfer(t, policy))
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
