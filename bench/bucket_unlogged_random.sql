\set k random(1, 100000)
SELECT bench.bucket_unlogged('k' || :k, 1000000, 1000000);
