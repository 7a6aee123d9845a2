SELECT resilience.saga_start('bench_fan', '{}');
