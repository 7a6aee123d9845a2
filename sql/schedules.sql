-- Schedules: create, refuse bad input (22023, nothing stored), run due
-- slots by hand (schedule_tick), retries, catch-up, pause/resume, the
-- three command kinds, privileges.  The worker is not running in this
-- database: slots are made due by moving next_slot back, as a superuser.
SET timezone = 'UTC';
\set SHOW_CONTEXT never
CREATE ROLE regress_sched_a IN ROLE resilience_user;
CREATE ROLE regress_sched_b IN ROLE resilience_user;
CREATE SCHEMA sched;
CREATE TABLE sched.hits (schedule text, slot timestamptz, at timestamptz DEFAULT clock_timestamp());
GRANT USAGE ON SCHEMA sched TO regress_sched_a, regress_sched_b;
GRANT CREATE ON SCHEMA sched TO regress_sched_b;
GRANT INSERT, SELECT ON sched.hits TO regress_sched_a;

-- A superuser may not create one: its command would run as a superuser.
SELECT resilience.schedule('su', '* * * * *', '{"sql": "SELECT 1"}');

SET ROLE regress_sched_a;
SELECT resilience.schedule('hits', '* * * * *',
    '{"sql": "INSERT INTO sched.hits (schedule, slot) VALUES (''hits'', current_setting(''resilience.schedule_slot'')::timestamptz)"}') > now() AS first_slot_is_ahead;
SELECT name, cron, timezone, overlap, catch_up, max_attempts, backoff, enabled, creator,
       next_slot = resilience.cron_next('* * * * *', created_at) AS next_is_cron_next, state
  FROM resilience.schedules;

-- Bad input: 22023 (22004 for NULL), and nothing stored.
\set VERBOSITY terse
SELECT resilience.schedule('hits', '* * * * *', '{"sql": "SELECT 1"}');        -- duplicate
SELECT resilience.schedule('x', '60 * * * *', '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', '* * * 13 *', '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', '*/0 * * * *', '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', '@every 0 s', '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', '@every -5 min', '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1"}', timezone => 'Nowhere/Atlantis');
SELECT resilience.schedule('x', '* * * * *', '{"shell": "rm -rf /"}');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1", "saga": "s"}');
SELECT resilience.schedule('x', '* * * * *', '[1, 2]');
SELECT resilience.schedule('x', '* * * * *', '{"sql": 42}');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "  ;  "}');
SELECT resilience.schedule('x', '* * * * *', '{"saga": "s", "payload": [1]}');
SELECT resilience.schedule('x', '* * * * *', '{"publish": {"payload": {}}}');
SELECT resilience.schedule('x', '* * * * *', '{"publish": "t"}');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1"}', overlap => 'sometimes');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1"}', catch_up => 'some');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1"}', max_attempts => 0);
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1"}', backoff => '-1 s');
SELECT resilience.schedule('', '* * * * *', '{"sql": "SELECT 1"}');
SELECT resilience.schedule(repeat('n', 64), '* * * * *', '{"sql": "SELECT 1"}');
SELECT resilience.schedule(E'a\nb', '* * * * *', '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', NULL, '{"sql": "SELECT 1"}');
SELECT resilience.schedule('x', '* * * * *', '{"sql": "SELECT 1"}', timezone => NULL);
\set VERBOSITY default
SELECT count(*) AS schedules_stored FROM resilience.schedules;
RESET ROLE;

-- Run a due slot by hand: the command, its run row and the advance commit together.
UPDATE resilience.schedule_definitions
   SET next_slot = date_trunc('minute', now()), due_at = date_trunc('minute', now());
SET ROLE regress_sched_a;
SELECT resilience.schedule_tick() AS ran;  -- not granted: resilience_admin only
RESET ROLE;
GRANT resilience_admin TO regress_sched_a;
SET ROLE regress_sched_a;
SELECT resilience.schedule_tick() AS ran;
SELECT resilience.schedule_tick() AS nothing_left;
SELECT count(*) AS hits, min(slot) = date_trunc('minute', now()) AS command_saw_its_slot,
       current_setting('resilience.schedule_slot') AS slot_setting_after FROM sched.hits;
SELECT schedule, slot = date_trunc('minute', now()) AS slot_is_the_due_one, state, attempt,
       error, result, creator, duration >= '0 s' AS has_duration
  FROM resilience.schedule_runs;
SELECT next_slot = date_trunc('minute', now()) + interval '1 min' AS moved_to_next_slot,
       last_state, last_success IS NOT NULL AS has_last_success, state
  FROM resilience.schedules;
RESET ROLE;

-- Failing commands are retried after a backoff, then failed; the next slot still fires.
SET ROLE regress_sched_a;
SELECT resilience.schedule('broken', '0 * * * *', '{"sql": "SELECT 1/0"}',
    max_attempts => 2, backoff => '1 hour') IS NOT NULL AS created;
RESET ROLE;
UPDATE resilience.schedule_definitions SET next_slot = date_trunc('hour', now()), due_at = date_trunc('hour', now())
 WHERE name = 'broken';
SELECT resilience.schedule_tick() AS attempt_1;
SELECT state, attempt, error FROM resilience.schedule_runs WHERE schedule = 'broken';
SELECT state, failed_attempts, next_due > now() + interval '29 min' AS backs_off,
       next_slot = date_trunc('hour', now()) AS same_slot
  FROM resilience.schedules WHERE name = 'broken';
SELECT resilience.schedule_tick() AS not_due_yet;
UPDATE resilience.schedule_definitions SET due_at = now() - interval '1 s' WHERE name = 'broken';
SELECT resilience.schedule_tick() AS attempt_2;
SELECT state, attempt, error FROM resilience.schedule_runs WHERE schedule = 'broken';
SELECT state, failed_attempts, last_state, next_slot = date_trunc('hour', now()) + interval '1 hour' AS next_slot_fires
  FROM resilience.schedules WHERE name = 'broken';

-- Catch-up after 6 hourly slots were missed (no run of the schedule ran
-- then): none drops them, latest runs the newest, all runs each.  The
-- minute is half an hour from now's, so the newest due slot is late too.
SET ROLE regress_sched_a;
SELECT resilience.schedule('c_' || p,
           format('%s * * * *', (extract(minute FROM now())::int + 30) % 60),
           format('{"sql": "INSERT INTO sched.hits (schedule) VALUES (''c_%s'')"}', p)::jsonb,
           catch_up => p) IS NOT NULL AS created
  FROM unnest(ARRAY['none', 'latest', 'all']) p;
RESET ROLE;
UPDATE resilience.schedule_definitions
   SET next_slot = resilience.cron_next(cron, now() - interval '6 hours'),
       due_at = resilience.cron_next(cron, now() - interval '6 hours')
 WHERE name LIKE 'c\_%';
-- tick until nothing is due (at most 20)
DO $$ BEGIN FOR i IN 1..20 LOOP EXIT WHEN resilience.schedule_tick() = 0; END LOOP; END $$;
SELECT s.name, count(h.*) AS runs, s.skipped_slots, s.next_slot > now() AS caught_up
  FROM resilience.schedules s LEFT JOIN sched.hits h ON h.schedule = s.name
 WHERE s.name LIKE 'c\_%' GROUP BY s.name, s.skipped_slots, s.next_slot ORDER BY 1;
SELECT schedule, count(*) AS run_rows FROM resilience.schedule_runs
 WHERE schedule LIKE 'c\_%' GROUP BY 1 ORDER BY 1;

-- Pause and resume: the slots of the pause are not caught up.
SET ROLE regress_sched_a;
SELECT resilience.schedule_pause('hits') AS paused, resilience.schedule_pause('nope') AS no_such;
SELECT state, next_slot FROM resilience.schedules WHERE name = 'hits';
SELECT resilience.schedule_resume('hits') AS resumed;
SELECT state, next_slot = resilience.cron_next('* * * * *', now()) AS from_now
  FROM resilience.schedules WHERE name = 'hits';
RESET ROLE;

-- Another role sees none of them and may not change them.
SET ROLE regress_sched_b;
SELECT count(*) AS visible_schedules FROM resilience.schedules;
SELECT count(*) AS visible_runs FROM resilience.schedule_runs;
SELECT resilience.schedule_pause('hits');
SELECT resilience.unschedule('hits');
SELECT * FROM resilience.schedule_definitions;
RESET ROLE;

-- A publish command goes through the outbox; a saga command starts a saga
-- keyed schedule:<name>:<slot>.
GRANT resilience_admin TO regress_sched_b;
SET ROLE regress_sched_b;
CREATE FUNCTION sched.step(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb';
SELECT resilience.saga_define('sched_saga', '[{"name": "one", "action": "sched.step"}]');
SELECT resilience.schedule('pub', '@daily', '{"publish": {"topic": "sched.tick", "payload": {"n": 1}, "key": "k"}}') IS NOT NULL AS created;
SELECT resilience.schedule('saga', '@daily', '{"saga": "sched_saga", "payload": {"n": 2}}') IS NOT NULL AS created;
RESET ROLE;
UPDATE resilience.schedule_definitions
   SET next_slot = date_trunc('day', now()) - interval '1 day', due_at = date_trunc('day', now()) - interval '1 day'
 WHERE name IN ('pub', 'saga');
SELECT resilience.schedule_tick() + resilience.schedule_tick() AS ran_two;
SELECT schedule, state, result ? 'event_id' AS has_event_id, result ? 'saga_id' AS has_saga_id
  FROM resilience.schedule_runs WHERE schedule IN ('pub', 'saga') ORDER BY 1;
SELECT topic, payload, key FROM resilience.outbox WHERE topic = 'sched.tick';
SELECT name, idempotency_key = 'schedule:saga:'
           || to_char(date_trunc('day', now()), 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS keyed_by_slot, payload
  FROM resilience.sagas WHERE name = 'sched_saga';

-- unschedule removes the schedule and its runs.
SET ROLE regress_sched_a;
SELECT resilience.unschedule('hits') AS removed, resilience.unschedule('hits') AS again;
RESET ROLE;
SELECT count(*) AS runs_left FROM resilience.schedule_runs WHERE schedule = 'hits';

-- overlap => 'allow': a tick only dispatches the slot (a pending run row,
-- the schedule advanced); an executor runs it (test/t/044_schedule_allow.pl).
SET ROLE regress_sched_b;
SELECT resilience.schedule('par', '@hourly', '{"sql": "SELECT 1"}', overlap => 'allow') IS NOT NULL AS created;
RESET ROLE;
UPDATE resilience.schedule_definitions
   SET next_slot = date_trunc('hour', now()), due_at = date_trunc('hour', now()) WHERE name = 'par';
SELECT resilience.schedule_tick() AS dispatched;
SELECT state, attempt, started_at IS NULL AS not_started, duration IS NULL AS no_duration,
       dispatch_at IS NOT NULL AS dispatched
  FROM resilience.schedule_runs WHERE schedule = 'par';
SELECT next_slot = date_trunc('hour', now()) + interval '1 hour' AS advanced, last_slot IS NULL AS no_last_run
  FROM resilience.schedules WHERE name = 'par';

-- clean up
SELECT resilience.unschedule(name) FROM resilience.schedule_definitions ORDER BY name;
DROP SCHEMA sched CASCADE;
DROP OWNED BY regress_sched_a, regress_sched_b;
DROP ROLE regress_sched_a, regress_sched_b;
