-- How outbox_publish writes its rows at commit: with the table and index
-- APIs when an INSERT would do nothing more (src/outbox.c,
-- direct_insert_ok), else with an INSERT.  Either way: the same rows,
-- constraints checked, triggers, rules and defaults honoured.
SET client_min_messages = warning;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target)
VALUES ('w.%', 'queue', 'writer'), ('w.both', 'notify', 'w_channel');

-- Many events in one transaction, some of them dropped with their
-- subtransactions: one row per event and route, each key's in publish order.
BEGIN;
SELECT count(resilience.outbox_publish('w.many', jsonb_build_object('n', i), 'k' || (i % 7)))
  FROM generate_series(1, 2000) i;
SAVEPOINT a;
SELECT resilience.outbox_publish('w.many', '{"n": "gone a"}', 'k1') > 0;
SAVEPOINT b;
SELECT resilience.outbox_publish('w.many', '{"n": "gone b"}', 'k1') > 0;
RELEASE SAVEPOINT b;
ROLLBACK TO SAVEPOINT a;
SAVEPOINT c;
SELECT resilience.outbox_publish('w.many', '{"n": "kept c"}', 'k1') > 0;
SAVEPOINT d;
SELECT resilience.outbox_publish('w.many', '{"n": "gone d"}', 'k1') > 0;
ROLLBACK TO SAVEPOINT d;
RELEASE SAVEPOINT c;
SELECT resilience.outbox_publish('w.both', '{"n": "two routes"}', 'k2') > 0;
SELECT count(*) AS rows_before_commit FROM resilience.outbox;
COMMIT;
SELECT count(*) AS rows, count(DISTINCT id) AS events, count(*) FILTER (WHERE payload->>'n' LIKE 'gone%') AS gone,
       count(*) FILTER (WHERE payload->>'n' = 'kept c') AS kept,
       bool_and(attempts = 0 AND claimed_by IS NULL AND delivered_at IS NULL AND headers = '{}') AS fresh
  FROM resilience.outbox;
SELECT r.sink, o.pull FROM resilience.outbox o JOIN resilience.outbox_routes r ON r.id = o.route_id
 WHERE o.payload->>'n' = 'two routes' ORDER BY 1;
-- per key: seq order is publish order (id order, within one transaction)
SELECT count(*) AS keys_out_of_order FROM (
    SELECT key, array_agg(id ORDER BY seq) AS by_seq, array_agg(id ORDER BY id) AS by_id
      FROM resilience.outbox GROUP BY key) k
 WHERE by_seq <> by_id;
TRUNCATE resilience.outbox;

-- A constraint on the table is checked: the commit fails, nothing is written.
\set VERBOSITY terse
ALTER TABLE resilience.outbox ADD CONSTRAINT w_no_forbidden CHECK (topic <> 'w.forbidden');
BEGIN;
SELECT resilience.outbox_publish('w.ok', '{}') > 0;
SELECT resilience.outbox_publish('w.forbidden', '{}') > 0;
COMMIT;
SELECT count(*) AS after_failed_commit FROM resilience.outbox;
ALTER TABLE resilience.outbox DROP CONSTRAINT w_no_forbidden;
\set VERBOSITY default

-- A trigger on the table: the rows go in with an INSERT, which fires it
-- (row and statement triggers alike).
CREATE TABLE w_fired (what text);
CREATE FUNCTION w_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.headers := NEW.headers || '{"X-Seen": "yes"}';
    RETURN NEW;
END
$$;
CREATE FUNCTION w_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.w_fired VALUES (TG_LEVEL);
    RETURN NULL;
END
$$;
CREATE TRIGGER w_row BEFORE INSERT ON resilience.outbox FOR EACH ROW EXECUTE FUNCTION w_row();
CREATE TRIGGER w_statement AFTER INSERT ON resilience.outbox FOR EACH STATEMENT EXECUTE FUNCTION w_statement();
SELECT resilience.outbox_publish('w.trigger', '{}') > 0;
SELECT headers FROM resilience.outbox;
SELECT what, count(*) FROM w_fired GROUP BY what;
DROP TRIGGER w_row ON resilience.outbox;
DROP TRIGGER w_statement ON resilience.outbox;
-- gone: the direct path again
SELECT resilience.outbox_publish('w.after', '{}') > 0;
SELECT topic, headers FROM resilience.outbox ORDER BY seq;
TRUNCATE resilience.outbox;

-- A rule rewrites the INSERT: honoured too.
CREATE TABLE w_diverted (topic text);
CREATE RULE w_divert AS ON INSERT TO resilience.outbox WHERE NEW.topic = 'w.divert'
    DO INSTEAD INSERT INTO public.w_diverted VALUES (NEW.topic);
SELECT resilience.outbox_publish('w.divert', '{}') > 0;
SELECT (SELECT count(*) FROM resilience.outbox) AS in_outbox, (SELECT count(*) FROM w_diverted) AS diverted;
DROP RULE w_divert ON resilience.outbox;

-- A column this file does not know, with a default: the INSERT fills it.
-- Dropped again, the direct path skips the dropped column.
ALTER TABLE resilience.outbox ADD COLUMN w_note text DEFAULT 'by default';
SELECT resilience.outbox_publish('w.note', '{}') > 0;
SELECT topic, w_note FROM resilience.outbox;
ALTER TABLE resilience.outbox DROP COLUMN w_note;
SELECT resilience.outbox_publish('w.dropped', '{"n": 1}', 'k') > 0;
SELECT topic, key, payload, attempts FROM resilience.outbox WHERE topic = 'w.dropped';

DROP TABLE w_fired, w_diverted;
DROP FUNCTION w_row(), w_statement();
TRUNCATE resilience.outbox;
DELETE FROM resilience.outbox_routes;
RESET client_min_messages;
