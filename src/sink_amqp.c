/*-------------------------------------------------------------------------
 *
 * sink_amqp.c
 *		The amqp sink: publish each event to a RabbitMQ (AMQP 0-9-1) broker
 *		with librabbitmq, with publisher confirms.
 *
 * Target: amqp://user:password@host:port/vhost (percent-encoded; no path
 * means vhost "/", written %2f when given).  Route options: exchange
 * (default amq.topic), routing_key (a template of {topic} and {key},
 * default {topic}), mandatory and persistent (default true).
 *
 * Each message: body = the payload, content_type application/json,
 * message_id = the event id, type = the topic, timestamp = published_at,
 * app_id resilience, delivery_mode 2 (persistent) unless the route says
 * otherwise, headers = the event's headers.
 *
 * Delivery: an event counts as delivered only when the broker confirms it
 * (basic.ack on a channel in confirm mode).  A basic.nack, a message
 * returned as unroutable (mandatory), a channel or connection closed by the
 * broker, a lost connection or no confirm within the route's timeout_ms are
 * retried (with the route's backoff; dead letter after max_attempts).  An
 * exchange that does not exist is a dead letter at once: the relay checks
 * each exchange with a passive exchange.declare on a channel of its own the
 * first time a connection uses it.
 *
 * Order: as in the http sink, the events of one key on one route form a
 * chain: the next is published only once the one before it is confirmed,
 * and a failure leaves the rest of the chain untried.  Events without a key,
 * and the heads of different keys, are published back to back (pipelined)
 * and confirmed as they come.
 *
 * Connections: one per target (so per credentials), kept by the relaying
 * process across batches and reused; one channel in confirm mode publishes,
 * another checks exchanges.  Before a kept connection is used, anything the
 * broker sent meanwhile is read: a connection.close (the broker is shutting
 * down) or a closed socket means a new connection, without counting an
 * attempt.  A connection that fails to open fails its events one by one,
 * each fed to the destination's breaker, until the breaker opens; the
 * breaker (open for resilience.outbox_breaker_open_time, then one probe)
 * and each event's backoff pace reconnection after a broker restart.
 * Connections idle for IDLE_CLOSE_SECS are closed.
 *
 * Timeouts: connect_timeout_ms bounds the TCP connect and the AMQP
 * handshake; timeout_ms each RPC, the wait for a confirm, and the wait
 * for room in the socket before each publish.  The broker's
 * connection.blocked notice (a resource alarm) is honoured: nothing more is
 * published on that connection until it is unblocked.
 *
 * Destinations: the same allow-list and address policy as the http sink
 * (resilience.outbox_allowed_hosts, see sink_http.c): the host name is
 * resolved here, each address checked (loopback only when the list is
 * empty; otherwise no loopback, link-local or private address that no IP or
 * CIDR entry covers), and librabbitmq is given the allowed addresses as
 * numbers, so it does not resolve the name again.  A host whose every
 * address is refused makes its events dead letters, naming the address.
 * Event headers are checked again before publishing (CC and BCC, which
 * would make the broker copy the message elsewhere, are refused at
 * publication and here).  Credentials never leave the route: errors, logs
 * and the status view name the destination as amqp://host:port.
 *
 * No palloc or ereport happens inside librabbitmq; librabbitmq allocates
 * with malloc, freed with the connection.
 *
 *-------------------------------------------------------------------------
 */
#include "outbox.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#define PUBLISH_CHANNEL 1
#define CHECK_CHANNEL 2
#define FRAME_MAX 131072
#define WAIT_SLICE_MS 100
#define IDLE_CLOSE_SECS 300
#define MAX_CONNECTIONS 16
#define SHORTSTR_MAX 255

/* A connection kept across batches (TopMemoryContext). */
typedef struct AmqpConn
{
	char	   *target;			/* the route's target: the cache key (secret) */
	char	   *destination;	/* amqp://host:port: the breaker's key */
	amqp_connection_state_t state;	/* NULL: not connected */
	bool		publish_open;	/* channel 1 open, in confirm mode */
	bool		check_open;		/* channel 2 open */
	bool		blocked;		/* connection.blocked received */
	bool		refused;		/* the last login was refused (403, 530) */
	bool		address_refused;	/* the policy refused every address of the host */
	uint64		last_tag;		/* delivery tag of the last publish on channel 1 */
	List	   *exchanges;		/* names known to exist on this connection */
	TimestampTz last_used;
} AmqpConn;

/* One item on its way. */
typedef struct Publication
{
	OutboxItem *item;
	struct Publication *next_in_chain;
	uint64		tag;			/* 0: not published */
	TimestampTz deadline;
	bool		returned;
	bool		chained;		/* waits for an earlier one of its chain */
	char	   *routing_key;
} Publication;

static List *connections = NIL;
static bool exit_callback_registered = false;

static void conn_close(AmqpConn *c, bool graceful);

/* ---- targets ---- */

/* A parsed target (palloc'd copies). */
typedef struct AmqpTarget
{
	char	   *user;
	char	   *password;
	char	   *host;
	char	   *vhost;
	int			port;
} AmqpTarget;

/*
 * Parse and check an amqp target: NULL if it may be used (then *parsed and
 * *destination are set), else why not.  Never quotes the target.
 */
static const char *
parse_target(const char *target, AmqpTarget *parsed, char **destination)
{
	struct amqp_connection_info info;
	char	   *copy;

	*destination = NULL;
	if (pg_strncasecmp(target, "amqps://", 8) == 0)
		return "amqps (TLS) targets are not supported; use amqp:// (on a trusted network or through a TLS tunnel)";
	if (strncmp(target, "amqp://", 7) != 0)
		return "an amqp target must start with amqp://";
	if (strpbrk(target, "?#") != NULL)
		return "an amqp target takes no query parameters or fragment";
	/* librabbitmq would take an empty host for localhost: refuse it here */
	{
		const char *authority = target + 7;
		size_t		alen = strcspn(authority, "/");
		const char *at = memchr(authority, '@', alen);
		const char *host = at ? at + 1 : authority;

		if (host == authority + alen || *host == ':' || *host == '/')
			return "the AMQP URI has no host";
	}
	copy = pstrdup(target);
	amqp_default_connection_info(&info);
	if (amqp_parse_url(copy, &info) != AMQP_STATUS_OK)
		return "malformed AMQP URI (expected amqp://user:password@host:port/vhost)";
	if (info.host == NULL || info.host[0] == '\0')
		return "the AMQP URI has no host";
	if (info.port <= 0 || info.port > 65535)
		return "the AMQP URI has no usable port";
	if (info.vhost == NULL || info.vhost[0] == '\0')
		return "the AMQP URI names an empty virtual host (amqp://host/ means vhost \"\"; "
			"write amqp://host or amqp://host/%2f for the default vhost \"/\")";
	if (strlen(info.user) > SHORTSTR_MAX || strlen(info.vhost) > SHORTSTR_MAX ||
		strlen(info.host) > 253)
		return "the AMQP URI has a user, host or virtual host that is too long";
	parsed->user = pstrdup(info.user);
	parsed->password = pstrdup(info.password);
	parsed->host = pstrdup(info.host);
	parsed->vhost = pstrdup(info.vhost);
	parsed->port = info.port;
	*destination = psprintf("amqp://%s:%d", info.host, info.port);
	return outbox_host_problem(info.host);
}

/* Check an amqp target for a route: NULL if fine, else why not. */
static const char *
amqp_check_target(const char *target, char **destination)
{
	AmqpTarget	parsed;
	const char *problem = parse_target(target, &parsed, destination);

	if (*destination == NULL)
		*destination = pstrdup("amqp://?");	/* a row that no longer parses */
	return problem;
}

/* Check a routing key template: NULL if fine, else why not. */
static const char *
amqp_routing_key_problem(const char *template)
{
	const char *p;
	size_t		literal = 0;

	for (p = template; *p; p++)
	{
		if (*p == '{')
		{
			if (p[1] == '{')
				p++;
			else if (strncmp(p, "{topic}", 7) == 0)
			{
				p += 6;
				continue;
			}
			else if (strncmp(p, "{key}", 5) == 0)
			{
				p += 4;
				continue;
			}
			else
				return "option \"routing_key\" may use only {topic} and {key} ({{ and }} for braces)";
		}
		else if (*p == '}')
		{
			if (p[1] != '}')
				return "option \"routing_key\": a lone } (write }} for a brace)";
			p++;
		}
		literal++;
	}
	if (literal > SHORTSTR_MAX)
		return "option \"routing_key\" must be at most 255 bytes";
	return NULL;
}

/* The routing key of an item: its route's template filled in. */
static char *
routing_key(OutboxItem *item)
{
	const char *p;
	StringInfoData buf;

	initStringInfo(&buf);
	for (p = item->route->routing_key; *p; p++)
	{
		if (strncmp(p, "{topic}", 7) == 0)
		{
			appendStringInfoString(&buf, item->topic);
			p += 6;
		}
		else if (strncmp(p, "{key}", 5) == 0)
		{
			if (item->key)
				appendStringInfoString(&buf, item->key);
			p += 4;
		}
		else
		{
			if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}'))
				p++;
			appendStringInfoChar(&buf, *p);
		}
	}
	return buf.data;
}

/* ---- errors ---- */

/* Why an RPC failed, as text (no credentials ever appear in it). */
static void
reply_text(amqp_rpc_reply_t r, const char *what, char *buf, size_t len)
{
	switch (r.reply_type)
	{
		case AMQP_RESPONSE_NORMAL:
			snprintf(buf, len, "%s: ok", what);
			break;
		case AMQP_RESPONSE_NONE:
			snprintf(buf, len, "%s: no reply", what);
			break;
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			snprintf(buf, len, "%s: %s", what, amqp_error_string2(r.library_error));
			break;
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
			{
				amqp_connection_close_t *m = r.reply.decoded;

				snprintf(buf, len, "%s: connection closed by the broker: %u %.*s", what,
						 m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes);
			}
			else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
			{
				amqp_channel_close_t *m = r.reply.decoded;

				snprintf(buf, len, "%s: channel closed by the broker: %u %.*s", what,
						 m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes);
			}
			else
				snprintf(buf, len, "%s: unexpected method 0x%08X from the broker", what, r.reply.id);
			break;
	}
}

/* ---- connections ---- */

/* Close every connection (process exit). */
static void
close_all(int code, Datum arg)
{
	ListCell   *lc;

	foreach(lc, connections)
		conn_close(lfirst(lc), true);
}

/* Drop c's broker connection (politely if asked and possible). */
static void
conn_close(AmqpConn *c, bool graceful)
{
	if (c->state)
	{
		if (graceful)
		{
			struct timeval tv = {1, 0};

			amqp_set_rpc_timeout(c->state, &tv);
			(void) amqp_connection_close(c->state, AMQP_REPLY_SUCCESS);
		}
		amqp_destroy_connection(c->state);
	}
	c->state = NULL;
	c->publish_open = false;
	c->check_open = false;
	c->blocked = false;
	c->last_tag = 0;
	list_free_deep(c->exchanges);
	c->exchanges = NIL;
}

/* The kept connection for target (created unconnected if new). */
static AmqpConn *
conn_for(const char *target, const char *destination)
{
	ListCell   *lc;
	AmqpConn   *c;
	AmqpConn   *oldest = NULL;
	MemoryContext old;

	foreach(lc, connections)
	{
		c = lfirst(lc);
		if (strcmp(c->target, target) == 0)
			return c;
		if (oldest == NULL || c->last_used < oldest->last_used)
			oldest = c;
	}
	if (list_length(connections) >= MAX_CONNECTIONS && oldest)
	{
		conn_close(oldest, true);
		connections = list_delete_ptr(connections, oldest);
		pfree(oldest->target);
		pfree(oldest->destination);
		pfree(oldest);
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	c = palloc0(sizeof(AmqpConn));
	c->target = pstrdup(target);
	c->destination = pstrdup(destination);
	connections = lappend(connections, c);
	MemoryContextSwitchTo(old);
	if (!exit_callback_registered)
	{
		on_proc_exit(close_all, (Datum) 0);
		exit_callback_registered = true;
	}
	return c;
}

/* Close connections nobody used for a while. */
static void
close_idle(TimestampTz now)
{
	ListCell   *lc;

	foreach(lc, connections)
	{
		AmqpConn   *c = lfirst(lc);

		if (c->state && now - c->last_used > (int64) IDLE_CLOSE_SECS * USECS_PER_SEC)
			conn_close(c, true);
	}
}

static struct timeval
ms_timeval(int ms)
{
	struct timeval tv;

	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	return tv;
}

/*
 * The addresses to try, as numeric strings (so that librabbitmq does not
 * resolve the name again): those the host resolves to that the address
 * policy allows (NIL: none; *why says why, and *refused is set when it is
 * the policy that refused them).
 */
static List *
connect_addresses(const char *host, const OutboxAddressPolicy *policy, char *why, size_t len,
				  bool *refused)
{
	struct addrinfo hints;
	struct addrinfo *res = NULL;
	struct addrinfo *a;
	List	   *result = NIL;
	char		bare[256];
	int			rc;

	*refused = false;
	strlcpy(bare, host, sizeof(bare));
	if (bare[0] == '[' && bare[strlen(bare) - 1] == ']')
	{
		memmove(bare, bare + 1, strlen(bare));
		bare[strlen(bare) - 1] = '\0';
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	rc = getaddrinfo(bare, NULL, &hints, &res);
	if (rc != 0)
	{
		snprintf(why, len, "could not resolve the broker's host: %s", gai_strerror(rc));
		return NIL;
	}
	for (a = res; a; a = a->ai_next)
	{
		char		addr[INET6_ADDRSTRLEN];
		const void *bytes;

		if (a->ai_family != AF_INET && a->ai_family != AF_INET6)
			continue;
		if (!outbox_address_ok(policy, a->ai_addr, why, len))
			continue;
		bytes = a->ai_family == AF_INET ?
			(const void *) &((struct sockaddr_in *) a->ai_addr)->sin_addr :
			(const void *) &((struct sockaddr_in6 *) a->ai_addr)->sin6_addr;
		if (inet_ntop(a->ai_family, bytes, addr, sizeof(addr)) != NULL)
			result = lappend(result, pstrdup(addr));
	}
	freeaddrinfo(res);
	if (result == NIL)
		*refused = true;		/* why names the last address refused */
	return result;
}

/* Open a channel (and confirm mode on the publishing one); false on failure. */
static bool
open_channel(AmqpConn *c, amqp_channel_t channel, char *why, size_t len)
{
	amqp_rpc_reply_t r;

	amqp_channel_open(c->state, channel);
	r = amqp_get_rpc_reply(c->state);
	if (r.reply_type != AMQP_RESPONSE_NORMAL)
	{
		reply_text(r, "opening a channel", why, len);
		return false;
	}
	if (channel == PUBLISH_CHANNEL)
	{
		amqp_confirm_select(c->state, channel);
		r = amqp_get_rpc_reply(c->state);
		if (r.reply_type != AMQP_RESPONSE_NORMAL)
		{
			reply_text(r, "selecting publisher confirms", why, len);
			return false;
		}
		c->last_tag = 0;
		c->publish_open = true;
	}
	else
		c->check_open = true;
	return true;
}

/*
 * Read, without waiting, what the broker sent to an idle kept connection;
 * false if it is no longer usable (closed by the broker, or the socket).
 */
static bool
conn_still_usable(AmqpConn *c)
{
	for (;;)
	{
		struct pollfd pfd;
		amqp_frame_t frame;
		struct timeval zero = {0, 0};
		int			rc;

		if (!amqp_frames_enqueued(c->state) && !amqp_data_in_buffer(c->state))
		{
			pfd.fd = amqp_get_sockfd(c->state);
			pfd.events = POLLIN;
			pfd.revents = 0;
			if (poll(&pfd, 1, 0) <= 0)
				return true;	/* nothing waiting */
		}
		rc = amqp_simple_wait_frame_noblock(c->state, &frame, &zero);
		if (rc == AMQP_STATUS_TIMEOUT)
			return true;
		if (rc != AMQP_STATUS_OK)
			return false;
		if (frame.frame_type != AMQP_FRAME_METHOD)
			continue;
		switch (frame.payload.method.id)
		{
			case AMQP_CONNECTION_BLOCKED_METHOD:
				c->blocked = true;
				break;
			case AMQP_CONNECTION_UNBLOCKED_METHOD:
				c->blocked = false;
				break;
			case AMQP_CONNECTION_CLOSE_METHOD:
				return false;
			case AMQP_CHANNEL_CLOSE_METHOD:
				{
					amqp_channel_close_ok_t ok;

					(void) amqp_send_method(c->state, frame.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
					if (frame.channel == PUBLISH_CHANNEL)
						c->publish_open = false;
					else
						c->check_open = false;
					break;
				}
			default:
				break;
		}
		amqp_maybe_release_buffers(c->state);
	}
}

/*
 * Make c usable for route r: reuse it, or connect, log in and open the
 * publishing channel.  false (with why) if that failed.
 */
static bool
conn_ensure(AmqpConn *c, OutboxRoute *r, const OutboxAddressPolicy *policy, char *why, size_t len)
{
	AmqpTarget	t;
	char	   *destination;
	const char *problem;
	amqp_socket_t *sock;
	struct timeval connect_tv = ms_timeval(r->connect_timeout_ms);
	struct timeval rpc_tv = ms_timeval(r->timeout_ms);
	amqp_rpc_reply_t reply;
	amqp_table_entry_t caps[2];
	amqp_table_entry_t props[3];
	amqp_table_t props_table;
	List	   *addresses;
	ListCell   *lc;
	char	   *name;
	int			rc;

	if (c->state && !conn_still_usable(c))
		conn_close(c, false);
	if (c->state)
	{
		amqp_set_rpc_timeout(c->state, &rpc_tv);
		if (!c->publish_open && !open_channel(c, PUBLISH_CHANNEL, why, len))
		{
			conn_close(c, false);
			return false;
		}
		return true;
	}

	problem = parse_target(r->target, &t, &destination);
	if (problem)
	{
		strlcpy(why, problem, len);
		return false;
	}
	addresses = connect_addresses(t.host, policy, why, len, &c->address_refused);
	if (addresses == NIL)
		return false;

	c->state = amqp_new_connection();
	if (c->state == NULL)
		elog(ERROR, "out of memory in librabbitmq");
	sock = amqp_tcp_socket_new(c->state);
	if (sock == NULL)
	{
		conn_close(c, false);
		elog(ERROR, "out of memory in librabbitmq");
	}
	(void) amqp_set_handshake_timeout(c->state, &connect_tv);
	(void) amqp_set_rpc_timeout(c->state, &rpc_tv);
	rc = AMQP_STATUS_SOCKET_ERROR;
	foreach(lc, addresses)
	{
		rc = amqp_socket_open_noblock(sock, lfirst(lc), t.port, &connect_tv);
		if (rc == AMQP_STATUS_OK)
			break;
	}
	if (rc != AMQP_STATUS_OK)
	{
		snprintf(why, len, "could not connect to %s: %s", c->destination, amqp_error_string2(rc));
		conn_close(c, false);
		return false;
	}

	/* capabilities: we understand connection.blocked; a name for the broker's UI */
	caps[0].key = amqp_cstring_bytes("connection.blocked");
	caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	caps[0].value.value.boolean = 1;
	caps[1].key = amqp_cstring_bytes("authentication_failure_close");
	caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	caps[1].value.value.boolean = 1;
	name = psprintf("resilience outbox relay (pid %d)", MyProcPid);
	props[0].key = amqp_cstring_bytes("capabilities");
	props[0].value.kind = AMQP_FIELD_KIND_TABLE;
	props[0].value.value.table.num_entries = 2;
	props[0].value.value.table.entries = caps;
	props[1].key = amqp_cstring_bytes("connection_name");
	props[1].value.kind = AMQP_FIELD_KIND_UTF8;
	props[1].value.value.bytes = amqp_cstring_bytes(name);
	props[2].key = amqp_cstring_bytes("product");
	props[2].value.kind = AMQP_FIELD_KIND_UTF8;
	props[2].value.value.bytes = amqp_cstring_bytes("resilience");
	props_table.num_entries = 3;
	props_table.entries = props;
	reply = amqp_login_with_properties(c->state, t.vhost, 0, FRAME_MAX, 0, &props_table,
									  AMQP_SASL_METHOD_PLAIN, t.user, t.password);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		reply_text(reply, psprintf("logging in to %s", c->destination), why, len);
		/* a broker that answers "wrong credentials" or "no such vhost" is up */
		if (reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
			reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
		{
			amqp_connection_close_t *m = reply.reply.decoded;

			if (m->reply_code == AMQP_ACCESS_REFUSED || m->reply_code == AMQP_NOT_ALLOWED)
				c->refused = true;
		}
		conn_close(c, false);
		return false;
	}
	if (!open_channel(c, PUBLISH_CHANNEL, why, len))
	{
		conn_close(c, false);
		return false;
	}
	return true;
}

/*
 * Does exchange exist on c's vhost?  1 yes, 0 no (why says so), -1 the
 * check failed (connection trouble; why says so).  Checked once per
 * connection, on a channel of its own (a missing exchange closes it).
 */
static int
exchange_exists(AmqpConn *c, const char *exchange, char *why, size_t len)
{
	ListCell   *lc;
	amqp_rpc_reply_t r;
	MemoryContext old;

	if (exchange[0] == '\0')
		return 1;				/* the default exchange always exists */
	foreach(lc, c->exchanges)
		if (strcmp(lfirst(lc), exchange) == 0)
			return 1;
	if (!c->check_open && !open_channel(c, CHECK_CHANNEL, why, len))
		return -1;
	(void) amqp_exchange_declare(c->state, CHECK_CHANNEL, amqp_cstring_bytes(exchange),
								 amqp_empty_bytes, 1, 0, 0, 0, amqp_empty_table);
	r = amqp_get_rpc_reply(c->state);
	if (r.reply_type == AMQP_RESPONSE_NORMAL)
	{
		old = MemoryContextSwitchTo(TopMemoryContext);
		c->exchanges = lappend(c->exchanges, pstrdup(exchange));
		MemoryContextSwitchTo(old);
		return 1;
	}
	if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
	{
		amqp_channel_close_t *m = r.reply.decoded;
		amqp_channel_close_ok_t ok;
		int			code = m->reply_code;

		reply_text(r, psprintf("checking exchange \"%s\"", exchange), why, len);
		(void) amqp_send_method(c->state, CHECK_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		c->check_open = false;
		if (code == AMQP_NOT_FOUND)
		{
			snprintf(why, len, "exchange \"%s\" does not exist on %s (checked with a passive exchange.declare)",
					 exchange, c->destination);
			return 0;
		}
		return -1;
	}
	reply_text(r, psprintf("checking exchange \"%s\"", exchange), why, len);
	return -1;
}

/* ---- publishing ---- */

/* Mark a chain not tried. */
static void
skip_chain(Publication *p)
{
	for (; p; p = p->next_in_chain)
		p->item->outcome = OUTCOME_NOT_TRIED;
}

/* An item's outcome, fed to its destination's breaker. */
static void
settle(Publication *p, int outcome, const char *error)
{
	p->item->outcome = outcome;
	if (error)
		strlcpy(p->item->error, error, OUTBOX_ERROR_MAX);
	p->tag = 0;
	relay_item_done(p->item);
}

/*
 * Publish one item on c's channel 1 (waiting up to its deadline for room in
 * the socket).  Returns false (with why) if the connection failed.
 */
static bool
publish(AmqpConn *c, Publication *p, char *why, size_t len)
{
	OutboxItem *item = p->item;
	OutboxRoute *r = item->route;
	amqp_basic_properties_t props;
	amqp_table_entry_t *entries;
	int			nentries = 0;
	Jsonb	   *headers;
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;
	struct pollfd pfd;
	char	   *message_id = psprintf(INT64_FORMAT, item->id);
	int			rc;

	headers = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(item->headers)));
	entries = palloc(sizeof(amqp_table_entry_t) * Max(JB_ROOT_COUNT(headers), 1));
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		if (tok != WJB_KEY)
			continue;
		(void) JsonbIteratorNext(&it, &v, true);
		if (v.type != jbvString)
			continue;
		entries[nentries].key.bytes = k.val.string.val;
		entries[nentries].key.len = k.val.string.len;
		entries[nentries].value.kind = AMQP_FIELD_KIND_UTF8;
		entries[nentries].value.value.bytes.bytes = v.val.string.val;
		entries[nentries].value.value.bytes.len = v.val.string.len;
		nentries++;
	}

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG |
		AMQP_BASIC_TYPE_FLAG | AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_APP_ID_FLAG |
		AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.message_id = amqp_cstring_bytes(message_id);
	props.type = amqp_cstring_bytes(item->topic);
	props.timestamp = (uint64_t) timestamptz_to_time_t(item->published_at);
	props.app_id = amqp_cstring_bytes("resilience");
	props.delivery_mode = r->persistent ? 2 : 1;
	props.headers.num_entries = nentries;
	props.headers.entries = entries;

	/* never block in librabbitmq's send: wait here for room, up to the deadline */
	pfd.fd = amqp_get_sockfd(c->state);
	pfd.events = POLLOUT;
	for (;;)
	{
		long		wait_ms = (long) ((p->deadline - GetCurrentTimestamp()) / 1000);

		pfd.revents = 0;
		rc = poll(&pfd, 1, (int) Min(Max(wait_ms, 0), WAIT_SLICE_MS));
		if (rc > 0)
			break;
		if (rc < 0 && errno != EINTR)
		{
			snprintf(why, len, "connection to %s failed: %m", c->destination);
			return false;
		}
		if (wait_ms <= 0)
		{
			snprintf(why, len, "%s did not read what was sent within %d ms", c->destination,
					 r->timeout_ms);
			return false;
		}
		CHECK_FOR_INTERRUPTS();
	}
	rc = amqp_basic_publish(c->state, PUBLISH_CHANNEL, amqp_cstring_bytes(r->exchange),
							amqp_cstring_bytes(p->routing_key), r->mandatory ? 1 : 0, 0, &props,
							amqp_cstring_bytes(item->payload));
	if (rc != AMQP_STATUS_OK)
	{
		snprintf(why, len, "publishing to %s failed: %s", c->destination, amqp_error_string2(rc));
		return false;
	}
	p->tag = ++c->last_tag;
	return true;
}

/*
 * Read a returned message's header and body frames; returns its message id
 * (palloc'd, "" if none), or NULL if the connection failed.
 */
static char *
read_returned(AmqpConn *c, TimestampTz deadline)
{
	amqp_frame_t frame;
	struct timeval tv;
	uint64		body_size = 0;
	uint64		got = 0;
	char	   *message_id = NULL;
	int			rc;

	for (;;)
	{
		long		ms = Max((deadline - GetCurrentTimestamp()) / 1000, 1);

		tv = ms_timeval((int) Min(ms, INT_MAX));
		rc = amqp_simple_wait_frame_noblock(c->state, &frame, &tv);
		if (rc != AMQP_STATUS_OK)
			return NULL;
		if (frame.channel != PUBLISH_CHANNEL)
			continue;
		if (frame.frame_type == AMQP_FRAME_HEADER)
		{
			amqp_basic_properties_t *props = frame.payload.properties.decoded;

			body_size = frame.payload.properties.body_size;
			if (props && (props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG))
				message_id = pnstrdup(props->message_id.bytes, props->message_id.len);
			else
				message_id = pstrdup("");
		}
		else if (frame.frame_type == AMQP_FRAME_BODY)
			got += frame.payload.body_fragment.len;
		else
			return NULL;		/* a method in the middle of a message */
		if (message_id && got >= body_size)
			return message_id;
	}
}

/*
 * Deliver pubs (n, one connection's share of a batch) on c: publish what is
 * ready, read confirms, follow the chains.  Every publication ends with an
 * outcome.
 */
static void
deliver_on(AmqpConn *c, Publication *pubs, int n, const OutboxAddressPolicy *policy)
{
	Publication **ready = palloc(sizeof(Publication *) * n);
	Publication **in_flight = palloc(sizeof(Publication *) * n);
	int			nready = 0;
	int			next_ready = 0;
	int			nflight = 0;
	char		why[OUTBOX_ERROR_MAX];
	bool		broken = false;
	int			i;

	for (i = 0; i < n; i++)
		if (!pubs[i].chained)
			ready[nready++] = &pubs[i];

	/*
	 * connect; if that fails, fail items one by one until the breaker opens
	 * (a refused login is no fault of the broker: it does not count, so that
	 * one route with wrong credentials cannot open the breaker that the
	 * broker's other routes share)
	 */
	c->refused = false;
	c->address_refused = false;
	if (!conn_ensure(c, pubs[0].item->route, policy, why, sizeof(why)))
	{
		for (i = 0; i < nready; i++)
		{
			if (!relay_may_start(ready[i]->item))
			{
				skip_chain(ready[i]);
				continue;
			}
			ready[i]->item->destination_ok = c->refused;
			/* an address the policy refuses: no fault of the broker, a dead letter */
			settle(ready[i], c->address_refused ? OUTCOME_DEAD : OUTCOME_RETRY, why);
			skip_chain(ready[i]->next_in_chain);
		}
		return;
	}
	c->last_used = GetCurrentTimestamp();

	while (!broken)
	{
		amqp_frame_t frame;
		struct timeval tv = ms_timeval(WAIT_SLICE_MS);
		TimestampTz now;
		int			rc;

		/* publish what may go */
		while (next_ready < nready && !c->blocked && !worker_stop_requested())
		{
			Publication *p = ready[next_ready++];
			int			exists;

			if (!relay_may_start(p->item))
			{
				skip_chain(p);
				continue;
			}
			p->routing_key = routing_key(p->item);
			if (strlen(p->routing_key) > SHORTSTR_MAX)
			{
				settle(p, OUTCOME_DEAD, "the routing key is longer than 255 bytes");
				skip_chain(p->next_in_chain);
				continue;
			}
			exists = exchange_exists(c, p->item->route->exchange, why, sizeof(why));
			if (exists == 0)
			{
				settle(p, OUTCOME_DEAD, why);
				skip_chain(p->next_in_chain);
				continue;
			}
			p->deadline = GetCurrentTimestamp() + (int64) p->item->route->timeout_ms * 1000;
			if (exists < 0 || !publish(c, p, why, sizeof(why)))
			{
				settle(p, OUTCOME_RETRY, why);
				skip_chain(p->next_in_chain);
				broken = true;
				break;
			}
			in_flight[nflight++] = p;
		}
		if (broken)
			break;
		if (c->blocked && next_ready < nready)
		{
			/* a resource alarm: the rest waits (with backoff) */
			while (next_ready < nready)
			{
				Publication *p = ready[next_ready++];

				if (!relay_may_start(p->item))
				{
					skip_chain(p);
					continue;
				}
				settle(p, OUTCOME_RETRY, psprintf("%s blocked publishing (a resource alarm)",
												  c->destination));
				skip_chain(p->next_in_chain);
			}
		}
		if (nflight == 0)
			break;
		if (worker_stop_requested())
		{
			broken = true;
			strlcpy(why, "the relay is stopping", sizeof(why));
			break;
		}

		/* wait for confirms, returns, and whatever else comes */
		rc = amqp_simple_wait_frame_noblock(c->state, &frame, &tv);
		now = GetCurrentTimestamp();
		if (rc == AMQP_STATUS_TIMEOUT)
		{
			CHECK_FOR_INTERRUPTS();
			for (i = 0; i < nflight; i++)
				if (now > in_flight[i]->deadline)
				{
					snprintf(why, sizeof(why), "no publisher confirm from %s within %d ms",
							 c->destination, in_flight[i]->item->route->timeout_ms);
					broken = true;
				}
			continue;
		}
		if (rc != AMQP_STATUS_OK)
		{
			snprintf(why, sizeof(why), "connection to %s lost: %s", c->destination,
					 amqp_error_string2(rc));
			broken = true;
			break;
		}
		if (frame.frame_type != AMQP_FRAME_METHOD)
			continue;
		switch (frame.payload.method.id)
		{
			case AMQP_BASIC_ACK_METHOD:
			case AMQP_BASIC_NACK_METHOD:
				{
					bool		ack = frame.payload.method.id == AMQP_BASIC_ACK_METHOD;
					uint64		tag;
					bool		multiple;
					int			kept = 0;

					if (ack)
					{
						amqp_basic_ack_t *m = frame.payload.method.decoded;

						tag = m->delivery_tag;
						multiple = m->multiple;
					}
					else
					{
						amqp_basic_nack_t *m = frame.payload.method.decoded;

						tag = m->delivery_tag;
						multiple = m->multiple;
					}
					for (i = 0; i < nflight; i++)
					{
						Publication *p = in_flight[i];

						if (p->tag == tag || (multiple && p->tag < tag))
						{
							if (ack && !p->returned)
							{
								settle(p, OUTCOME_DELIVERED, NULL);
								if (p->next_in_chain)
									ready[nready++] = p->next_in_chain;
							}
							else
							{
								if (!ack)
									snprintf(p->item->error, OUTBOX_ERROR_MAX,
											 "%s refused the message (basic.nack)", c->destination);

								/*
								 * Returned or nacked (a full queue that
								 * rejects publishes, say): the broker
								 * answered, and one route's queue must not
								 * open the breaker its other routes share.
								 */
								p->item->destination_ok = true;
								settle(p, OUTCOME_RETRY, NULL);
								skip_chain(p->next_in_chain);
							}
						}
						else
							in_flight[kept++] = p;
					}
					nflight = kept;
					break;
				}
			case AMQP_BASIC_RETURN_METHOD:
				{
					amqp_basic_return_t *m = frame.payload.method.decoded;
					char	   *exchange = pnstrdup(m->exchange.bytes, m->exchange.len);
					char	   *key = pnstrdup(m->routing_key.bytes, m->routing_key.len);
					char	   *text = psprintf("returned by %s as unroutable: %u %.*s (exchange \"%s\", routing key \"%s\")",
											   c->destination, m->reply_code, (int) m->reply_text.len,
											   (char *) m->reply_text.bytes, exchange, key);
					char	   *message_id = read_returned(c, now + USECS_PER_SEC);

					if (message_id == NULL)
					{
						snprintf(why, sizeof(why), "connection to %s lost while reading a returned message",
								 c->destination);
						broken = true;
						break;
					}
					for (i = 0; i < nflight; i++)
					{
						Publication *p = in_flight[i];

						if (strcmp(psprintf(INT64_FORMAT, p->item->id), message_id) == 0 &&
							strcmp(p->item->route->exchange, exchange) == 0 &&
							strcmp(p->routing_key, key) == 0)
						{
							p->returned = true;
							strlcpy(p->item->error, text, OUTBOX_ERROR_MAX);
						}
					}
					break;
				}
			case AMQP_CHANNEL_CLOSE_METHOD:
			case AMQP_CONNECTION_CLOSE_METHOD:
				{
					amqp_rpc_reply_t r;

					r.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION;
					r.reply = frame.payload.method;
					r.library_error = 0;
					reply_text(r, "publishing", why, sizeof(why));
					if (frame.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD)
					{
						amqp_channel_close_ok_t ok;

						(void) amqp_send_method(c->state, frame.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
						if (frame.channel == CHECK_CHANNEL)
						{
							c->check_open = false;
							break;
						}
						c->publish_open = false;
						list_free_deep(c->exchanges);	/* one may have gone */
						c->exchanges = NIL;
					}
					else
					{
						amqp_connection_close_ok_t ok;

						(void) amqp_send_method(c->state, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
					}
					broken = true;
					break;
				}
			case AMQP_CONNECTION_BLOCKED_METHOD:
				c->blocked = true;
				break;
			case AMQP_CONNECTION_UNBLOCKED_METHOD:
				c->blocked = false;
				break;
			default:
				break;
		}
		amqp_maybe_release_buffers(c->state);
	}

	if (broken)
	{
		bool		stopping = worker_stop_requested();

		/* what is in flight may or may not have arrived: again later */
		for (i = 0; i < nflight; i++)
		{
			settle(in_flight[i], stopping ? OUTCOME_NOT_TRIED : OUTCOME_RETRY, why);
			skip_chain(in_flight[i]->next_in_chain);
		}
		while (next_ready < nready)
			skip_chain(ready[next_ready++]);
		conn_close(c, false);
	}
}

/* deliver_on, dropping the connection if it is interrupted by an error. */
static void
deliver_guarded(AmqpConn *c, Publication *share, int nshare, const OutboxAddressPolicy *policy)
{
	PG_TRY();
	{
		deliver_on(c, share, nshare, policy);
	}
	PG_CATCH();
	{
		int			j;

		/* the connection's state is unknown; end any probe */
		for (j = 0; j < nshare; j++)
			if (share[j].tag != 0)
			{
				share[j].item->outcome = OUTCOME_NOT_TRIED;
				relay_item_done(share[j].item);
			}
		conn_close(c, false);
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/*
 * Deliver items (route sink amqp, in seq order per route) with no
 * transaction open; sets each item's outcome.
 */
static void
amqp_deliver(List *items)
{
	int			n = list_length(items);
	OutboxItem **all = palloc(sizeof(OutboxItem *) * Max(n, 1));
	bool	   *done = palloc0(sizeof(bool) * Max(n, 1));
	OutboxAddressPolicy *policy = outbox_address_policy();
	ListCell   *lc;
	int			i;

	close_idle(GetCurrentTimestamp());
	i = 0;
	foreach(lc, items)
	{
		OutboxItem *item = lfirst(lc);

		all[i++] = item;
		item->outcome = OUTCOME_NOT_TRIED;
	}

	/*
	 * headers checked again at send: a bad one makes its event a dead letter
	 * and leaves the rest of its key for the next batch (as the http sink)
	 */
	for (i = 0; i < n; i++)
	{
		List	   *unused;
		const char *problem;
		int			j;

		if (done[i])
			continue;
		problem = outbox_item_headers(all[i], &unused);
		if (problem == NULL)
			continue;
		all[i]->outcome = OUTCOME_DEAD;
		strlcpy(all[i]->error, problem, OUTBOX_ERROR_MAX);
		done[i] = true;
		for (j = i + 1; j < n && all[i]->key; j++)
			if (all[j]->route_id == all[i]->route_id && all[j]->key &&
				strcmp(all[j]->key, all[i]->key) == 0)
				done[j] = true; /* not tried */
	}

	/* one connection (target) at a time */
	for (i = 0; i < n; i++)
	{
		AmqpConn   *c;
		Publication *share;
		int			nshare = 0;
		int			j;

		if (done[i])
			continue;
		share = palloc0(sizeof(Publication) * (n - i));
		for (j = i; j < n; j++)
			if (!done[j] && strcmp(all[j]->route->target, all[i]->route->target) == 0)
			{
				share[nshare++].item = all[j];
				done[j] = true;
			}
		/* chains: each item waits for the one before it with the same route and key */
		for (j = 0; j < nshare; j++)
		{
			int			k;

			if (share[j].item->key == NULL)
				continue;
			for (k = j + 1; k < nshare; k++)
				if (share[k].item->route_id == share[j].item->route_id && share[k].item->key &&
					strcmp(share[k].item->key, share[j].item->key) == 0)
				{
					share[j].next_in_chain = &share[k];
					share[k].chained = true;
					break;
				}
		}
		c = conn_for(share[0].item->route->target, share[0].item->route->destination);
		if (worker_stop_requested())
			continue;			/* left not tried */
		deliver_guarded(c, share, nshare, policy);
	}
}

/* ---- route options ---- */

static void
amqp_init_options(OutboxRoute *r)
{
	r->exchange = "amq.topic";
	r->routing_key = "{topic}";
	r->mandatory = true;
	r->persistent = true;
}

static bool
amqp_parse_option(OutboxRoute *r, const char *name, JsonbValue *v, bool validate)
{
	if (strcmp(name, "exchange") == 0)
	{
		r->exchange = outbox_option_string(v, name);
		if (strlen(r->exchange) > 255 || (int) strlen(r->exchange) != v->val.string.len)
			outbox_route_error("option \"exchange\" must be at most 255 bytes, without NUL", NULL, NULL);
	}
	else if (strcmp(name, "routing_key") == 0)
	{
		const char *problem;

		r->routing_key = outbox_option_string(v, name);
		problem = amqp_routing_key_problem(r->routing_key);
		if (problem || (int) strlen(r->routing_key) != v->val.string.len)
			outbox_route_error(problem ? problem : "option \"routing_key\" must not contain NUL", NULL,
							   "For example \"orders.{key}\"; the default is \"{topic}\".");
	}
	else if (strcmp(name, "mandatory") == 0)
		r->mandatory = outbox_option_bool(v, name);
	else if (strcmp(name, "persistent") == 0)
		r->persistent = outbox_option_bool(v, name);
	else
		return false;
	return true;
}

const OutboxSinkOps outbox_sink_amqp = {
	.name = "amqp",
	.push = true,
	.default_payload = PAYLOAD_ANY,
	.check_target = amqp_check_target,
	.target_hint = "Targets are amqp://user:password@host:port/vhost (percent-encoded; "
	"vhost \"/\" is %2f or no path); hosts other than loopback must be "
	"listed in resilience.outbox_allowed_hosts.",
	.init_options = amqp_init_options,
	.parse_option = amqp_parse_option,
	.options_hint = "exchange, routing_key, mandatory, persistent",
	.deliver = amqp_deliver,
};
