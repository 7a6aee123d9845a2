SELECT bench.bucket_logged('hot', 1000000, 1000000);
