SELECT bench.bucket_unlogged('hot', 1000000, 1000000);
