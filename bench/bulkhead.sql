SELECT resilience.bulkhead_acquire('bench', 64);
