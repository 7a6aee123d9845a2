-- Durable quotas (docs/quotas.md): exact admission per period, calendar
-- periods in a time zone, rolling periods, peeks, quota_set and
-- quota_reset, the view, and rows that only the functions may change.

-- Three per day: three pass, then none.
SELECT resilience.quota('q:a', 3, 'day') FROM generate_series(1, 5);

-- cost counts against the limit; a refused request takes nothing.
SELECT resilience.quota('q:b', 10, 'day', 4) FROM generate_series(1, 3);
SELECT allowed, used, remaining FROM resilience.quota_check('q:b', 10, 'day', 2);
SELECT allowed, used, remaining FROM resilience.quota_check('q:b', 10, 'day', 1);

-- A peek (cost 0) answers for a cost-1 request and changes nothing.
SELECT allowed, used, remaining FROM resilience.quota_check('q:b', 10, 'day', 0);
SELECT allowed, used, remaining FROM resilience.quota_check('q:a', 3, 'day', 0);
-- A peek at an unknown key does not create it.
SELECT allowed, used, remaining, resets_at FROM resilience.quota_check('q:never', 3, 'day', 0);
SELECT count(*) FROM resilience.quota_usage WHERE key = 'q:never';

-- A larger limit applies at once to the usage already counted.
SELECT resilience.quota('q:a', 4, 'day');
SELECT resilience.quota('q:a', 4, 'day');

-- Calendar periods are aligned in the time zone: a day in Tokyo starts at
-- Tokyo's midnight, a week on Monday, a month on the 1st.
SELECT resilience.quota('q:tokyo', 5, 'day', tz => 'Asia/Tokyo');
SELECT period_start = (date_trunc('day', now() AT TIME ZONE 'Asia/Tokyo')) AT TIME ZONE 'Asia/Tokyo' AS day_start,
       resets_at = (date_trunc('day', now() AT TIME ZONE 'Asia/Tokyo') + interval '1 day') AT TIME ZONE 'Asia/Tokyo' AS day_end
  FROM resilience.quotas WHERE key = 'q:tokyo';
SELECT resilience.quota('q:week', 5, 'week', tz => 'America/New_York');
SELECT extract(isodow FROM period_start AT TIME ZONE 'America/New_York') AS dow,
       (period_start AT TIME ZONE 'America/New_York')::time AS at,
       resets_at - period_start BETWEEN interval '167 hours' AND interval '169 hours' AS about_a_week
  FROM resilience.quotas WHERE key = 'q:week';
SELECT resilience.quota('q:month', 5, 'MONTH', tz => 'Europe/Berlin');
SELECT to_char(period_start AT TIME ZONE 'Europe/Berlin', 'DD HH24:MI') AS starts,
       to_char(resets_at AT TIME ZONE 'Europe/Berlin', 'DD HH24:MI') AS ends
  FROM resilience.quotas WHERE key = 'q:month';
SELECT resilience.quota('q:hour', 5, 'hour');
SELECT resets_at - period_start AS span, date_trunc('hour', period_start) = period_start AS aligned
  FROM resilience.quotas WHERE key = 'q:hour';
SELECT resilience.quota('q:year', 5, 'year', tz => 'UTC');
SELECT to_char(period_start AT TIME ZONE 'UTC', 'MM-DD HH24:MI') FROM resilience.quotas WHERE key = 'q:year';

-- A rolling period starts at the first counted call.
SELECT resilience.quota('q:roll', 2, '15 minutes');
SELECT resets_at - period_start AS span, period_start <= now() + interval '1 second' AS started
  FROM resilience.quotas WHERE key = 'q:roll';
SELECT resilience.quota('q:iso', 2, 'PT1H');
SELECT resets_at - period_start AS span FROM resilience.quotas WHERE key = 'q:iso';

-- quota_set (migrations, refunds) and quota_reset.
SELECT resilience.quota_set('q:a', 1);
SELECT allowed, used, remaining FROM resilience.quota_check('q:a', 4, 'day');
SELECT resilience.quota_set('q:new', 7, 'month', 'UTC');
SELECT used, "limit", remaining FROM resilience.quotas WHERE key = 'q:new';
SELECT allowed, used, remaining FROM resilience.quota_check('q:new', 8, 'month');
SELECT resilience.quota('q:new', 8, 'month');
SELECT resilience.quota_reset('q:new');
SELECT resilience.quota('q:new', 8, 'month');
SELECT resilience.quota_reset('q:nothing');

-- A period that has ended starts over.
SELECT resilience.quota('q:short', 1, '1 second');
SELECT resilience.quota('q:short', 1, '1 second');
SELECT pg_sleep(1.1);
SELECT used FROM resilience.quotas WHERE key = 'q:short';
SELECT resilience.quota('q:short', 1, '1 second');

-- Rows change only through the functions.
UPDATE resilience.quota_usage SET used = 0 WHERE key = 'q:a';
DELETE FROM resilience.quota_usage WHERE key = 'q:a';
SELECT key, used, "limit", remaining FROM resilience.quotas WHERE key LIKE 'q:%' ORDER BY key;

-- Named policies: limit, period and time zone live in a table.
INSERT INTO resilience.quota_policies (name, "limit", period, tz, description)
VALUES ('free', 2, 'day', 'Asia/Tokyo', 'free tier'), ('roll', 3, '10 minutes', 'UTC', NULL);
SELECT resilience.quota('q:p', 'free'), resilience.quota('q:p', 'free'), resilience.quota('q:p', 'free');
SELECT allowed, used, remaining, resets_at = date_trunc('day', now() AT TIME ZONE 'Asia/Tokyo') AT TIME ZONE 'Asia/Tokyo' + interval '1 day' AS tokyo_midnight
  FROM resilience.quota_check('q:p', 'free', 0);
-- a key under a policy is not the same key without one
SELECT resilience.quota('q:p', 2, 'day');
SELECT key, policy, used, "limit" FROM resilience.quotas WHERE key = 'q:p' ORDER BY policy;
SELECT allowed, used, remaining FROM resilience.quota_check('q:p', 'roll', 2);
-- a change of the policy is seen by the next call (the cache is dropped at commit)
UPDATE resilience.quota_policies SET "limit" = 4 WHERE name = 'free';
SELECT resilience.quota('q:p', 'free', 2);
SELECT used, "limit" FROM resilience.quotas WHERE key = 'q:p' AND policy = 'free';
SELECT resilience.quota_set('q:p', 'free', 1);
SELECT resilience.quota_set('q:p2', 'free', 3);
SELECT used, "limit" FROM resilience.quotas WHERE key = 'q:p2' AND policy = 'free';
SELECT resilience.quota_reset('q:p', 'free'), resilience.quota_reset('q:p', 'nosuch');
SELECT used FROM resilience.quotas WHERE key = 'q:p' AND policy = 'free';
DELETE FROM resilience.quota_policies WHERE name = 'roll';
SELECT sqlstate_of($$SELECT resilience.quota('q:p', 'roll')$$);

-- Decisions are counted.
SELECT resilience.metrics() ~ 'resilience_quota_decisions_total\{[^}]*decision="allowed"' AS counted;
