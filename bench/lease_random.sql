\set k random(1, 1000)
SELECT coalesce(resilience.lock_acquire('k' || :k, '10 seconds', 'bench'), 0) AS t \gset
\if :t > 0
SELECT resilience.lock_release('k' || :k, :t);
\endif
