SELECT resilience.breaker_allow('bench'), resilience.breaker_record('bench', true);
