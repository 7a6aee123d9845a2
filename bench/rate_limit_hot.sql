SELECT resilience.rate_limit('hot', 1000000, 1000000);
