\set k random(1, 1000)
SELECT resilience.advisory_xact_lock('k' || :k);
