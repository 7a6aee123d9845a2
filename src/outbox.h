/*-------------------------------------------------------------------------
 *
 * outbox.h
 *		The transactional outbox: what outbox.c (publishing, routes, claims,
 *		the pull API), relay.c (the relay) and the sinks share.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_OUTBOX_H
#define RESILIENCE_OUTBOX_H

#include "resilience.h"
#include "metrics.h"

#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "storage/condition_variable.h"
#include "storage/itemptr.h"

#define OUTBOX_TOPIC_MAX 255
#define OUTBOX_KEY_MAX 255
#define OUTBOX_ERROR_MAX 300
#define OUTBOX_CLAIM_SLOTS 64		/* consumer names hash to these (a uint64 mask) */
#define OUTBOX_SIGNING_KEYS_MAX 2	/* the new and the old while rotating */

/* What a route accepts as payload (route option "payload"). */
typedef enum OutboxPayloadKind
{
	PAYLOAD_ANY,
	PAYLOAD_OBJECT,
	PAYLOAD_ARRAY,
	PAYLOAD_OBJECT_OR_ARRAY
} OutboxPayloadKind;

struct OutboxSinkOps;
struct JsonbValue;

/* A route with its options parsed (defaults filled in). */
typedef struct OutboxRoute
{
	int32		id;
	const struct OutboxSinkOps *sink;
	bool		enabled;
	char	   *pattern;
	char	   *target;
	char	   *destination;	/* http, amqp: scheme://host:port, the breaker's key */
	OutboxPayloadKind payload;
	int			max_attempts;
	int			timeout_ms;
	int			connect_timeout_ms;
	int			backoff_base_ms;
	int			backoff_max_ms;
	bool		block_on_dead_letter;
	bool		probe_only;		/* relay: half-open breaker, claim one event */
	char	   *partition_by;	/* fair sharing: "key", a JSON path, or NULL */
	double		rate;			/* http: most requests per second (0: no limit) */
	int			burst;			/* http: the rate's token bucket capacity */
	int			max_in_flight;	/* http: most requests at once (0: no limit) */
	List	   *headers;		/* http: "Name: value" strings (may hold secrets) */
	char	   *proxy;			/* http: the proxy to use (NULL: none, whatever
								 * the server's environment says) */
	int			nsigning_keys;	/* http: Standard Webhooks keys (2 while
								 * rotating); secrets: never in views or logs */
	unsigned char *signing_keys[OUTBOX_SIGNING_KEYS_MAX];
	int			signing_key_len[OUTBOX_SIGNING_KEYS_MAX];
	char	   *exchange;		/* amqp: the exchange */
	char	   *routing_key;	/* amqp: a template of {topic} and {key} */
	bool		mandatory;		/* amqp: unroutable messages come back */
	bool		persistent;		/* amqp: delivery mode 2 */
} OutboxRoute;

/* One claimed delivery: an event on one route. */
typedef struct OutboxItem
{
	ItemPointerData ctid;		/* of the claimed row version */
	int64		id;
	int64		seq;
	int32		route_id;
	OutboxRoute *route;
	char	   *topic;
	char	   *key;			/* NULL for none */
	char	   *payload;		/* JSON text */
	char	   *headers;		/* JSON object text */
	TimestampTz published_at;
	int			attempts;		/* before this delivery */

	/* outcome, filled by the sinks */
	int			outcome;		/* OutboxOutcome */
	int			http_status;
	int64		retry_after_ms; /* -1: none given */
	char		error[OUTBOX_ERROR_MAX];
	bool		keep;			/* keep the row after delivery (NOTIFY too large) */
	bool		held;			/* locked by the claim transaction, not claimed */
	bool		destination_ok; /* a retry that is no fault of the destination
								 * (amqp: returned unroutable): not counted
								 * by its breaker */
} OutboxItem;

typedef enum OutboxOutcome
{
	OUTCOME_NOT_TRIED,			/* released without an attempt */
	OUTCOME_DELIVERED,
	OUTCOME_RETRY,				/* failed; retry with backoff */
	OUTCOME_DEAD				/* failed for good: dead letter now */
} OutboxOutcome;

/*
 * Which addresses the sinks that connect out may connect to: loopback only
 * (the allow-list is empty), or any address but the loopback, link-local
 * and private ones that no IP or CIDR entry of the allow-list covers.
 */
typedef struct OutboxAddressRange
{
	int			family;			/* AF_INET or AF_INET6 */
	unsigned char addr[16];
	int			bits;
} OutboxAddressRange;

typedef struct OutboxAddressPolicy
{
	bool		loopback_only;
	int			nranges;
	OutboxAddressRange *ranges; /* the IP and CIDR entries of the allow-list */
} OutboxAddressPolicy;

struct sockaddr;

/*
 * A sink: what the shared code needs to know of it.  Each sink is one file
 * that defines its OutboxSinkOps, plus one line in outbox.c's table (and
 * one extern below).  Route options common to every sink (payload,
 * max_attempts, on_dead_letter, timeouts, backoff) are parsed by outbox.c;
 * the rest by the sink's parse_option.
 */
typedef struct OutboxSinkOps
{
	const char *name;			/* outbox_routes.sink */
	bool		push;			/* delivered by the relay (else pulled) */
	bool		in_claim;		/* delivered inside the claim transaction */
	OutboxPayloadKind default_payload;

	/*
	 * Check a target: NULL if it may be used, else why not.  Sets
	 * *destination (the breaker's key) when the sink has destinations,
	 * also for a target refused only by the allow-list.
	 */
	const char *(*check_target) (const char *target, char **destination);
	const char *target_hint;	/* for a refused target */

	/* Fill in the defaults of the sink's own options. */
	void		(*init_options) (OutboxRoute *r);

	/*
	 * Parse one option: false if the sink has no option of that name; a bad
	 * value raises 22023 naming it (validate: also checks that need the
	 * settings in force, such as the allow-list).
	 */
	bool		(*parse_option) (OutboxRoute *r, const char *name,
								 struct JsonbValue *v, bool validate);
	const char *options_hint;	/* the sink's own options, for errors */

	/* After every option: check how they go together (22023). */
	void		(*check_options) (OutboxRoute *r);

	/* Deliver claimed items (in seq order per route); sets their outcomes. */
	void		(*deliver) (List *items);
} OutboxSinkOps;

extern const OutboxSinkOps outbox_sink_notify;
extern const OutboxSinkOps outbox_sink_http;
extern const OutboxSinkOps outbox_sink_amqp;
extern const OutboxSinkOps outbox_sink_queue;

/* What a claim asks for. */
typedef struct OutboxClaim
{
	List	   *routes;			/* OutboxRoute *, to claim from */
	int			limit;			/* at most this many items */
	bool		runs;			/* may take several events of one key, in order */
	bool		count_attempt;	/* queue: a claim counts as an attempt */
	const char *claimer;
	int64		visibility_ms;
	TimestampTz now;
	MemoryContext result_cxt;	/* where items are built (NULL: current) */
	bool		hold_in_claim;	/* rows of in_claim sinks: locked, not claimed */
	/* results */
	List	   *items;			/* OutboxItem *, in seq order per route */
	List	   *dead;			/* OutboxItem *: queue heads out of attempts */
	bool		exhausted;		/* every pending row was looked at */
	TimestampTz next_due;		/* earliest time a blocked row becomes ready */
} OutboxClaim;

/* outbox.c */
extern struct _SPI_plan *outbox_plan(struct _SPI_plan **plan, const char *sql, int nargs,
									 Oid *types);
extern List *outbox_load_routes(bool push_only, const char *queue_consumer);
extern void outbox_claim_rows(OutboxClaim *claim);
extern void outbox_dead_letter(OutboxItem *item, const char *error, int add_attempts,
							   const char *claimer);
extern char *outbox_redact_target(const char *target);
extern int	outbox_setting_int(const char *name, int dflt, int flags);
extern const char *outbox_item_headers(OutboxItem *item, List **out);
extern void outbox_count(ResilienceCounter counter, int32 route_id, uint64 n);
extern const OutboxSinkOps *const *outbox_sinks(int *n);
extern int	outbox_claim_slot(const char *consumer);

/* outbox.c: for the sinks' option parsing (22023 naming the option) */
extern void outbox_route_error(const char *msg, const char *detail, const char *hint);
extern int	outbox_option_int(struct JsonbValue *v, const char *name, int min, int max);
extern bool outbox_option_bool(struct JsonbValue *v, const char *name);
extern char *outbox_option_string(struct JsonbValue *v, const char *name);
extern List *outbox_parse_headers(struct JsonbValue *v, const char *what);

/* outbox.c: destinations (the allow-list) */
extern char *outbox_allow_list(void);
extern const char *outbox_host_problem(const char *host);
extern OutboxAddressPolicy *outbox_address_policy(void);
extern bool outbox_address_ok(const OutboxAddressPolicy *policy, const struct sockaddr *addr,
							  char *why, size_t len);

/* relay.c */
extern ConditionVariable *relay_claim_cv(int slot);
extern void relay_wake_claimers(uint64 slots);
extern bool relay_may_start(OutboxItem *item);
extern void relay_item_done(OutboxItem *item);
extern long relay_worker_job(void);

/* worker.c */
extern bool worker_lock_extension(void);

#endif							/* RESILIENCE_OUTBOX_H */
