SELECT resilience.quota('qhot', 1000000000, 'month');
