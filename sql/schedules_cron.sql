-- Cron expressions: the syntax, the next time in a time zone (DST both
-- ways), and every malformed expression refused with 22023.
-- (test/t/040_schedule_croniter.pl checks many more against croniter.)
SET timezone = 'UTC';
\set SHOW_CONTEXT never

-- Lists, ranges, steps, names, the macros and @every.
SELECT c, resilience.cron_next(c, '2026-01-15 10:07:30+00') AS next
  FROM unnest(ARRAY[
    '* * * * *', '*/15 * * * *', '5,35 */6 * * *', '0 9-17/4 * * mon-fri',
    '0 0 1 jan,jul *', '30 2 * * SUN', '0 0 * * 7', '10/20 * * * *', '0 12 * * fri-sun',
    '@hourly', '@daily', '@midnight', '@weekly', '@monthly', '@yearly', '@annually',
    '@every 90 seconds', '@every 1 day', '  0   0   *   *   *  '
  ]) AS c;

-- Day of month and day of week: either matches when both are restricted,
-- both must match when one begins with '*' (Vixie cron).
SELECT resilience.cron_next('0 0 13 * fri', '2026-01-01 00:00+00') AS the_13th_or_a_friday,
       resilience.cron_next('0 0 */2 * fri', '2026-01-01 00:00+00') AS an_odd_day_that_is_a_friday,
       resilience.cron_next('0 0 29 2 *', '2026-01-01 00:00+00') AS next_february_29th;

-- Strictly after: a slot equal to the start is not returned.
SELECT resilience.cron_next('0 * * * *', '2026-01-15 10:00:00+00') AS after_exactly,
       resilience.cron_next('@every 1 hour', '2026-01-15 10:00:00+00') AS every_after_exactly;

-- Time zones: 02:00 in Berlin is 01:00 UTC in winter, 00:00 UTC in summer.
SELECT resilience.cron_next('0 2 * * *', '2026-01-15 00:00+00', 'Europe/Berlin') AS winter,
       resilience.cron_next('0 2 * * *', '2026-07-15 00:00+00', 'Europe/Berlin') AS summer,
       resilience.cron_next('0 9 * * *', '2026-07-15 00:00+00', 'America/New_York') AS new_york;

-- Spring forward (Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST): 02:30
-- does not exist that day; it fires once, at 03:30 CEST (01:30 UTC), as
-- PostgreSQL reads '2026-03-29 02:30' there; the next day at 02:30 CEST.
SELECT resilience.cron_next('30 2 * * *', '2026-03-28 12:00+00', 'Europe/Berlin') AS spring_day,
       resilience.cron_next('30 2 * * *', '2026-03-29 01:30+00', 'Europe/Berlin') AS day_after,
       '2026-03-29 02:30 Europe/Berlin'::timestamptz AS postgres_reads_it;
-- An hourly job at :30 fires at 00:30, 01:30 (CET) and 03:30 (CEST): once
-- for the skipped 02:30 and the real 03:30, which are the same instant.
WITH RECURSIVE s(n, t) AS (
    SELECT 1, resilience.cron_next('30 * * * *', '2026-03-28 23:00+00', 'Europe/Berlin')
    UNION ALL
    SELECT n + 1, resilience.cron_next('30 * * * *', t, 'Europe/Berlin') FROM s WHERE n < 4)
SELECT n, t, t AT TIME ZONE 'Europe/Berlin' AS berlin FROM s;

-- Fall back (Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET): 02:30
-- happens twice; it fires at the first, once.
WITH RECURSIVE s(n, t) AS (
    SELECT 1, resilience.cron_next('30 2 * * *', '2026-10-24 12:00+00', 'Europe/Berlin')
    UNION ALL
    SELECT n + 1, resilience.cron_next('30 2 * * *', t, 'Europe/Berlin') FROM s WHERE n < 3)
SELECT n, t, t AT TIME ZONE 'Europe/Berlin' AS berlin FROM s;
-- New York, 2026-11-01: 01:30 happens twice, fires once (EDT).
SELECT resilience.cron_next('30 1 * * *', '2026-11-01 00:00-04', 'America/New_York') AS first,
       resilience.cron_next('30 1 * * *', '2026-11-01 05:30+00', 'America/New_York') AS next_day;

-- Malformed expressions: 22023, with the field and the reason.
\set VERBOSITY default
DO $$
DECLARE
    c text;
    msg text;
    detail text;
BEGIN
    FOREACH c IN ARRAY ARRAY[
        '', '* * * *', '* * * * * *', '60 * * * *', '* 24 * * *', '* * 0 * *', '* * 32 * *',
        '* * * 13 *', '* * * 0 *', '* * * * 8', '*/0 * * * *', '*/61 * * * *', '5-1 * * * *',
        'a * * * *', '* * * foo *', '1,,2 * * * *', '1- * * * *', '-1 * * * *', '* * * * mon-',
        '0 0 30 2 *', '0 0 31 4,6,9,11 *', '@often', '@every', '@every 0 seconds',
        '@every -1 minute', '@every 1 month', '@every 400 days', '@every soon', '*/5x * * * *'
    ] LOOP
        BEGIN
            PERFORM resilience.cron_next(c, '2026-01-01');
            RAISE NOTICE '% accepted!', quote_literal(c);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
            RAISE NOTICE '% % (%)', SQLSTATE, msg, detail;
        END;
    END LOOP;
END $$;

-- An unknown time zone, and infinity.
SELECT resilience.cron_next('* * * * *', now(), 'Mars/Olympus_Mons');
SELECT resilience.cron_next('* * * * *', 'infinity');
