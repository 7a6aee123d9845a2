-- make bench, outbox section: routes, the reference table and its drain loop.
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;
-- publish: a paused webhook route (rows are written, nothing drains them)
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, enabled)
VALUES ('bench.pub', 'http', :'receiver' || '/paused', false);
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, enabled)
VALUES ('bench.notify', 'notify', 'bench', false),
       ('bench.http', 'http', :'receiver' || '/bench', false),
       ('bench.lat', 'http', :'receiver' || '/lat', true),
       ('bench.sustained', 'http', :'receiver' || '/sustained', true);

-- The reference: a hand-written outbox table with a bigserial key...
DROP TABLE IF EXISTS bench_outbox;
CREATE TABLE bench_outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
-- ... drained by a DELETE ... FOR UPDATE SKIP LOCKED ... RETURNING loop to NOTIFY.
CREATE OR REPLACE PROCEDURE bench_reference_drain(batch int DEFAULT 500)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    LOOP
        WITH d AS (SELECT id FROM bench_outbox ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED),
             gone AS (DELETE FROM bench_outbox o USING d WHERE o.id = d.id RETURNING o.*)
        SELECT count(pg_notify('bench_ref', json_build_object('id', b.id, 'topic', b.topic, 'key', b.key,
                                                               'payload', b.payload)::text))
          INTO n FROM gone b;
        COMMIT;
        EXIT WHEN n = 0;
    END LOOP;
END
$$;
SELECT count(*) AS routes FROM resilience.outbox_routes;
