-- The extension installs into schema resilience, and only there.
CREATE EXTENSION resilience;
SELECT extname, extversion, nspname AS schema, extrelocatable
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE extname = 'resilience';

SELECT DISTINCT n.nspname
  FROM pg_depend d
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'resilience'
  JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
  JOIN pg_namespace n ON n.oid = c.relnamespace
UNION
SELECT DISTINCT n.nspname
  FROM pg_depend d
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'resilience'
  JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
  JOIN pg_namespace n ON n.oid = p.pronamespace;

-- Every function says what it is for.
SELECT p.proname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'resilience' AND obj_description(p.oid, 'pg_proc') IS NULL;

-- The settings exist, with their defaults.
SELECT name, setting, unit, context
  FROM pg_settings WHERE name LIKE 'resilience.%' AND name <> 'resilience.worker_naptime'
 ORDER BY name;

-- A helper for the error tests: the SQLSTATE and message of a statement.
CREATE FUNCTION public.sqlstate_of(sql text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
