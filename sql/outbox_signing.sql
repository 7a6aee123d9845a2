-- Standard Webhooks signatures (route option signing_secret).
SET client_min_messages = warning;
DELETE FROM resilience.outbox_routes;
TRUNCATE resilience.outbox;

-- the specification's example (standard-webhooks, spec/standard-webhooks.md)
SELECT resilience._webhook_sign('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
    'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{"test": 2432232314}')
  = 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=' AS spec_example;
SELECT resilience._webhook_sign('whsec_c2hvcnQ=', 'id', 1, 'body');

-- a secret, and two while rotating
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('signed.%', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}'),
  ('rotating.%', 'http', 'http://127.0.0.1:9/h',
   '{"signing_secret": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]}');
SELECT count(*) AS signed_routes FROM resilience.outbox_routes;

-- bad secrets: 22023 naming the option, never quoting the secret, nothing written
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": "whsec_not base64!"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": "whsec_c2hvcnQ="}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": "whsec_"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2hvcnQ="]}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": []}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"signing_secret": 42}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'amqp', 'amqp://127.0.0.1', '{"signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}');
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('x', 'http', 'http://127.0.0.1:9/h', '{"headers": {"webhook-signature": "v1,forged"}}');
SELECT resilience.outbox_publish('signed.x', '{}', 'k', '{"Webhook-Id": "forged"}');
SELECT count(*) AS signed_routes FROM resilience.outbox_routes;

-- the secret is in no view; only resilience_admin may compute signatures
SELECT count(*) AS views_with_secret FROM resilience.outbox_status WHERE row(outbox_status.*)::text LIKE '%whsec%';
SELECT has_function_privilege('resilience_user', 'resilience._webhook_sign(text, text, bigint, text)', 'EXECUTE') AS user_may_sign,
       has_function_privilege('resilience_admin', 'resilience._webhook_sign(text, text, bigint, text)', 'EXECUTE') AS admin_may_sign,
       has_table_privilege('resilience_user', 'resilience.outbox_routes', 'SELECT') AS user_reads_routes;

DELETE FROM resilience.outbox_routes;
RESET client_min_messages;
