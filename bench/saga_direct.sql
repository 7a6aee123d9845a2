BEGIN;
SELECT bench.saga_s1(1, '{}');
SELECT bench.saga_s2(1, '{}');
SELECT bench.saga_s3(1, '{}');
END;
