SELECT coalesce(resilience.lock_acquire('hot', '10 seconds', 'bench'), 0) AS t \gset
\if :t > 0
SELECT resilience.lock_release('hot', :t);
\endif
