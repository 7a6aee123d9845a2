SELECT resilience.saga_start('bench3', '{}');
