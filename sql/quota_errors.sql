-- Bad input gets a specific SQLSTATE and changes nothing.  Every key used
-- below starts with 'bad:'; the last query checks that none was created.
\set VERBOSITY default

-- NULLs (22004)
SELECT sqlstate_of($$SELECT resilience.quota(NULL, 10, 'day')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', NULL, 'day')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, NULL)$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, 'day', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, 'day', tz => NULL)$$);
SELECT sqlstate_of($$SELECT resilience.quota_check(NULL, 10, 'day')$$);
SELECT sqlstate_of($$SELECT resilience.quota_set(NULL, 1)$$);
SELECT sqlstate_of($$SELECT resilience.quota_set('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.quota_reset(NULL)$$);

-- keys: empty, too long (22023)
SELECT resilience.quota('', 10, 'day');
SELECT resilience.quota('bad:' || repeat('x', 125), 10, 'day');
SELECT sqlstate_of($$SELECT resilience.quota_set('', 1, 'day')$$);

-- limit must be positive, cost between 0 and limit (22023)
SELECT resilience.quota('bad:1', 0, 'day');
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', -1, 'day')$$);
SELECT resilience.quota('bad:1', 10, 'day', -1);
SELECT resilience.quota('bad:1', 10, 'day', 11);

-- unknown periods and time zones (22023)
SELECT resilience.quota('bad:1', 10, 'fortnight');
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, '')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, '0 minutes')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, '-1 day')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, '367 days')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, 'infinity')$$);
SELECT resilience.quota('bad:1', 10, 'day', tz => 'Mars/Olympus_Mons');
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 10, '1 hour', tz => '')$$);
SELECT sqlstate_of($$SELECT resilience.quota_set('bad:1', 1, 'weekly')$$);

-- quota_set: negative usage, a new key without a period (22023)
SELECT resilience.quota_set('bad:1', -1, 'day');
SELECT resilience.quota_set('bad:1', 5);

-- nothing was created
SELECT count(*) FROM resilience.quota_usage WHERE key LIKE 'bad:%';
