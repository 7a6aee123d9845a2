/*-------------------------------------------------------------------------
 *
 * sink_notify.c
 *		The notify sink: NOTIFY channel (the route's target) with the event.
 *
 * The payload is a JSON envelope:
 *	  {"id": 42, "topic": "orders.created", "key": "o-1", "headers": {...},
 *	   "payload": {...}}
 * NOTIFY payloads must be shorter than 8000 bytes.  A longer envelope is
 * replaced by {"id", "topic", "key", "payload_omitted": true}, and the
 * event is kept in the outbox (delivered) for at least an hour, so that the
 * listener can fetch it with resilience.outbox_event(id).
 *
 * NOTIFY is transactional: the relay calls this in its claim transaction,
 * and the notifications go out when that transaction commits, together with
 * the removal of the events; if it rolls back, neither happens.
 *
 *-------------------------------------------------------------------------
 */
#include "outbox.h"

#include "commands/async.h"
#include "miscadmin.h"
#include "lib/stringinfo.h"
#include "utils/json.h"

/* NOTIFY refuses payloads of 8000 bytes or more (async.c). */
#define NOTIFY_PAYLOAD_LIMIT 7999

/* The envelope of an event, with or without its payload and headers, in buf. */
static void
envelope(StringInfo buf, OutboxItem *item, bool whole)
{
	resetStringInfo(buf);
	appendStringInfo(buf, "{\"id\": " INT64_FORMAT ", \"topic\": ", item->id);
	escape_json(buf, item->topic);
	appendStringInfoString(buf, ", \"key\": ");
	if (item->key)
		escape_json(buf, item->key);
	else
		appendStringInfoString(buf, "null");
	if (whole)
		appendStringInfo(buf, ", \"headers\": %s, \"payload\": %s}", item->headers, item->payload);
	else
		appendStringInfoString(buf, ", \"payload_omitted\": true}");
}

/*
 * Queue a NOTIFY for each item (sent at commit); all count as delivered.
 * One buffer for the batch: Async_Notify copies the payload.
 */
static void
notify_deliver(List *items)
{
	ListCell   *lc;
	StringInfoData buf;

	initStringInfo(&buf);
	foreach(lc, items)
	{
		OutboxItem *item = lfirst(lc);

		envelope(&buf, item, true);
		if (buf.len > NOTIFY_PAYLOAD_LIMIT)
		{
			envelope(&buf, item, false);
			item->keep = true;
		}
		Async_Notify(item->route->target, buf.data);
		item->outcome = OUTCOME_DELIVERED;
	}
	pfree(buf.data);
}

/* A notify target is a channel name. */
static const char *
notify_check_target(const char *target, char **destination)
{
	*destination = NULL;
	if (strlen(target) >= NAMEDATALEN)
		return "a notify target (channel name) must be shorter than 64 bytes";
	return NULL;
}

const OutboxSinkOps outbox_sink_notify = {
	.name = "notify",
	.push = true,
	.in_claim = true,
	.default_payload = PAYLOAD_ANY,
	.check_target = notify_check_target,
	.deliver = notify_deliver,
};
