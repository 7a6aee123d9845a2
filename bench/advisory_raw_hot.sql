SELECT pg_advisory_xact_lock(hashtext('hot')), nextval('bench.tokens');
