\set k random(1, 1000)
SELECT pg_advisory_xact_lock(hashtext('k' || :k)), nextval('bench.tokens');
