-- Leases and append_events under a hostile search_path.  Since issue 20
-- neither the lease functions nor append_events set search_path (it cost
-- a tenth of a lease call, docs/benchmarks.md): every statement they run
-- must name its operators by schema.  Here "=" on text and on bigint is
-- always true, and "<=" / ">" on timestamptz always true, in a schema ahead
-- of pg_catalog: had any statement used a bare operator, the bystander
-- lease and stream would be taken, released or appended to as well.
BEGIN;
SELECT plan(3);

CREATE ROLE lev_app IN ROLE resilience_user;
CREATE SCHEMA lev_evil AUTHORIZATION lev_app;

-- the bystanders: a lease held for a while by someone else, and a stream
SELECT resilience.lock_acquire('lev:bystander', '1 hour', 'someone') IS NOT NULL AS held;
SELECT resilience.append_events('lev:bystander', -1, ARRAY['{"type": "Opened"}']::jsonb[]);

SET ROLE lev_app;
CREATE FUNCTION lev_evil.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE FUNCTION lev_evil.always(bigint, bigint) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE FUNCTION lev_evil.always(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR lev_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = lev_evil.always);
CREATE OPERATOR lev_evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = lev_evil.always);
CREATE OPERATOR lev_evil.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = lev_evil.always);
CREATE OPERATOR lev_evil.> (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = lev_evil.always);
CREATE TEMP TABLE evil (step text, result text);
SET search_path = lev_evil, pg_catalog, public;
DO $$
DECLARE
    t bigint;
BEGIN
    t := resilience.lock_acquire('lev:evil', '1 minute', 'me');
    INSERT INTO pg_temp.evil VALUES ('acquire', (t IS NOT NULL)::text);
    INSERT INTO pg_temp.evil VALUES ('check', resilience.lock_check('lev:evil', t)::text);
    INSERT INTO pg_temp.evil VALUES ('check other token', resilience.lock_check('lev:evil', t OPERATOR(pg_catalog.-) 1)::text);
    INSERT INTO pg_temp.evil VALUES ('renew', resilience.lock_renew('lev:evil', t, '2 minutes')::text);
    INSERT INTO pg_temp.evil VALUES ('release', resilience.lock_release('lev:evil', t)::text);
    INSERT INTO pg_temp.evil VALUES ('release again', resilience.lock_release('lev:evil', t)::text);
    INSERT INTO pg_temp.evil VALUES ('append new', resilience.append_events('lev:evil', -1, ARRAY['{"type": "A"}']::jsonb[])::text);
    INSERT INTO pg_temp.evil VALUES ('append any', resilience.append_events('lev:evil', NULL, ARRAY['{"type": "B"}']::jsonb[])::text);
    INSERT INTO pg_temp.evil VALUES ('append at 1', resilience.append_events('lev:evil', 1, ARRAY['{"type": "C"}']::jsonb[])::text);
    BEGIN
        PERFORM resilience.append_events('lev:evil', 0, ARRAY['{"type": "D"}']::jsonb[]);
        INSERT INTO pg_temp.evil VALUES ('append at 0', 'no error');
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO pg_temp.evil VALUES ('append at 0', SQLSTATE);
    END;
END
$$;
RESET search_path;
RESET ROLE;

SELECT is((SELECT string_agg(step || ': ' || result, ', ') FROM evil),
    'acquire: true, check: true, check other token: false, renew: true, release: true, release again: false, '
    'append new: 0, append any: 1, append at 1: 2, append at 0: 40001',
    'with "=", "<=" and ">" hijacked, the lease functions and append_events do exactly what they should');
SELECT is((SELECT owner || ' ' || (released_at IS NULL)::text || ' ' || (expires_at > clock_timestamp())::text
             FROM resilience.leases WHERE name = 'lev:bystander'),
    'someone true true', 'the bystander lease is still held by its holder');
SELECT is((SELECT string_agg(stream || ' ' || version || ' ' || type, ', ' ORDER BY stream, version)
             FROM resilience.stream_events WHERE stream LIKE 'lev:%'),
    'lev:bystander 0 Opened, lev:evil 0 A, lev:evil 1 B, lev:evil 2 C',
    'and no other stream was appended to');

SELECT * FROM finish();
ROLLBACK;
