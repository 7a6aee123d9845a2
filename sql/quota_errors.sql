-- Bad input gets a specific SQLSTATE and changes nothing.  Every key used
-- below starts with 'bad:'; the last query checks that none was created.
\set VERBOSITY default

-- NULLs (22004)
SELECT sqlstate_of($$SELECT resilience.quota(NULL, 10, 'day')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', NULL::bigint, 'day')$$);
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

-- named policies: the call (22004, 22023, 42704)
INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-tier', 5, 'hour');
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', NULL::text)$$);
SELECT sqlstate_of($$SELECT resilience.quota(NULL, 'bad-tier')$$);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 'bad-tier', NULL::bigint)$$);
SELECT resilience.quota('bad:1', '');
SELECT resilience.quota('bad:1', repeat('p', 64));
SELECT resilience.quota('bad:1', 'no-such-tier');
SELECT resilience.quota('bad:1', 'bad-tier', 6);
SELECT sqlstate_of($$SELECT resilience.quota('bad:1', 'bad-tier', -1)$$);
SELECT sqlstate_of($$SELECT resilience.quota_check('bad:1', 'no-such-tier')$$);
SELECT sqlstate_of($$SELECT resilience.quota_set('bad:1', 'bad-tier', -1)$$);
SELECT sqlstate_of($$SELECT resilience.quota_set('bad:1', 'bad-tier', NULL::bigint)$$);
SELECT sqlstate_of($$SELECT resilience.quota_set('bad:1', 'no-such-tier', 1)$$);
SELECT sqlstate_of($$SELECT resilience.quota_reset('bad:1', NULL)$$);
SELECT sqlstate_of($$SELECT resilience.quota_reset('bad:1', '')$$);

-- named policies: rows are checked on write (22004, 22023), nothing stored
INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', 0, 'day');
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', -5, 'day')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', NULL, 'day')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES (NULL, 5, 'day')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('', 5, 'day')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES (repeat('p', 64), 5, 'day')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', 5, NULL)$$);
INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', 5, 'fortnight');
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', 5, '0 minutes')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', 5, '367 days')$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period) VALUES ('bad-p', 5, repeat('1 day ', 11))$$);
INSERT INTO resilience.quota_policies (name, "limit", period, tz) VALUES ('bad-p', 5, 'day', 'Mars/Olympus_Mons');
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period, tz) VALUES ('bad-p', 5, 'day', NULL)$$);
SELECT sqlstate_of($$INSERT INTO resilience.quota_policies (name, "limit", period, tz) VALUES ('bad-p', 5, 'day', '')$$);
SELECT sqlstate_of($$UPDATE resilience.quota_policies SET period = 'weekly' WHERE name = 'bad-tier'$$);
SELECT sqlstate_of($$UPDATE resilience.quota_policies SET "limit" = 0 WHERE name = 'bad-tier'$$);
SELECT name, "limit", period, tz FROM resilience.quota_policies WHERE name LIKE 'bad%';
DELETE FROM resilience.quota_policies WHERE name = 'bad-tier';

-- nothing was created
SELECT count(*) FROM resilience.quota_usage WHERE key LIKE 'bad:%';
