-- Objects for the sagas section of `make bench`.
--
-- Three trivial steps (PL/pgSQL, so that a direct call is not inlined away),
-- a 3-step saga over them defined by an unprivileged role, and nothing to
-- compensate: the figures measure the orchestration itself.
\set ON_ERROR_STOP 1

DO $$ BEGIN
	IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_saga') THEN
		CREATE ROLE bench_saga NOLOGIN IN ROLE resilience_admin;
	END IF;
END $$;
GRANT USAGE ON SCHEMA bench TO bench_saga;

CREATE FUNCTION bench.saga_s1(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN RETURN '{"s1": 1}'; END $$;
CREATE FUNCTION bench.saga_s2(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN RETURN '{"s2": 2}'; END $$;
CREATE FUNCTION bench.saga_s3(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN RETURN '{"s3": 3}'; END $$;

SET ROLE bench_saga;
SELECT resilience.saga_define('bench3', '[
	{"name": "s1", "action": "bench.saga_s1"},
	{"name": "s2", "action": "bench.saga_s2"},
	{"name": "s3", "action": "bench.saga_s3"}]');
RESET ROLE;

-- A saga that is one parallel group of the three steps as branches: each
-- branch is claimed and run in a transaction of its own (bench/sagas.sh).
SET ROLE bench_saga;
SELECT resilience.saga_define('bench_fan', '[{"name": "fan", "parallel": [
	{"name": "s1", "action": "bench.saga_s1"},
	{"name": "s2", "action": "bench.saga_s2"},
	{"name": "s3", "action": "bench.saga_s3"}]}]');
RESET ROLE;
