\set k random(1, 100000)
SELECT resilience.quota('q' || :k, 1000000000, 'month');
