-- resilience.citus_setup() on a server without Citus: 55000 with a detail
-- and a hint, nothing changed.  (The Citus cases themselves: test/citus.)
\set SHOW_CONTEXT never
SELECT * FROM resilience.citus_setup();
\echo :LAST_ERROR_SQLSTATE
-- only the extension's owner may place its tables
SELECT has_function_privilege('resilience_admin', 'resilience.citus_setup()', 'EXECUTE') AS admin,
       has_function_privilege('resilience_user', 'resilience.citus_setup()', 'EXECUTE') AS "user";
