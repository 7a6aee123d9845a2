-- W3C trace context: outbox_publish records traceparent/tracestate as event
-- headers, from its arguments or from resilience.traceparent/tracestate.
SET client_min_messages = warning;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('trace.%', 'queue', 'tracer');

-- from the arguments
SELECT resilience.outbox_publish('trace.arg', '{}', headers => '{"X-A": "1"}',
    traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
    tracestate => 'rojo=00f067aa0ba902b7,congo=t61rcWkgMzE') IS NOT NULL AS published;
-- from the settings, as an instrumented application sets them
BEGIN;
SET LOCAL resilience.traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
SET LOCAL resilience.tracestate = 'vendor@tenant=x';
SELECT resilience.outbox_publish('trace.setting', '{}') IS NOT NULL AS published;
-- the argument wins over the setting; headers the caller gave are kept as they are
SELECT resilience.outbox_publish('trace.both', '{}',
    traceparent => '00-11111111111111111111111111111111-2222222222222222-00') IS NOT NULL AS published;
SELECT resilience.outbox_publish('trace.header', '{}',
    headers => '{"traceparent": "00-33333333333333333333333333333333-4444444444444444-01"}') IS NOT NULL AS published;
COMMIT;
SHOW resilience.traceparent;
SELECT resilience.outbox_publish('trace.none', '{}') IS NOT NULL AS published;
SELECT topic, headers FROM resilience.outbox_claim('tracer', 10) ORDER BY id;

-- malformed: 22023, naming what is wrong; nothing published
SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-00000000000000000000000000000000-00f067aa0ba902b7-01');
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-00000000000000000000000000000000-00f067aa0ba902b7-01')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => 'ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => 'not a traceparent')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', tracestate => 'Upper=1')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', tracestate => 'novalue')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', tracestate => 'a=1')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', headers => '{"traceparent": "00-33333333333333333333333333333333-4444444444444444-01"}', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', headers => '{"Traceparent": "00-xyz"}')$$);
SELECT sqlstate_of($$SELECT resilience.outbox_publish('trace.x', '{}', headers => '{"tracestate": "a=1,,b=2,=3"}')$$);
SELECT sqlstate_of($$SET resilience.traceparent = '00-abc'$$);
SELECT sqlstate_of($$SET resilience.tracestate = 'x=a,b'$$);
SHOW resilience.traceparent;
SELECT count(*) AS nothing_more FROM resilience.outbox;

DELETE FROM resilience.outbox_routes;
RESET client_min_messages;
