WITH taken AS (
	INSERT INTO bench.leases AS l (name, owner, token, expires_at)
	VALUES ('hot', 'bench', nextval('bench.tokens'), clock_timestamp() + interval '10 seconds')
	ON CONFLICT (name) DO UPDATE
	   SET owner = excluded.owner, token = excluded.token, expires_at = excluded.expires_at
	 WHERE l.expires_at <= clock_timestamp()
	RETURNING token)
SELECT coalesce((SELECT token FROM taken), 0) AS t \gset
\if :t > 0
UPDATE bench.leases SET expires_at = clock_timestamp() WHERE name = 'hot' AND token = :t;
\endif
