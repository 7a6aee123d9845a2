\set k random(1, 100000)
SELECT resilience.rate_limit('k' || :k, 1000000, 1000000);
