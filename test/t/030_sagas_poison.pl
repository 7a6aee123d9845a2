# No poison saga (issue 16): a saga whose tick fails outside its step is
# suspended by the worker, and the sagas behind it in the queue go on.
#  - one poison saga is started first (its row points past its definition:
#    reading it fails in every tick, and it is the oldest due saga), then
#    50 healthy ones: every healthy one completes within 10 s;
#  - the poison saga is suspended, with the error in saga_events and in
#    stuck_sagas, and saga_retry resumes it once repaired.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = PostgreSQL::Test::Cluster->new('sagas_poison');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.saga_interval = '1h'
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE tap_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA app AUTHORIZATION tap_agent;
SET ROLE tap_agent;
SET search_path = app;
CREATE TABLE done (saga_id bigint, step text);
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO done VALUES (saga_id, ctx #>> '{_saga,step}') RETURNING '{}'::jsonb
$$;
SELECT resilience.saga_define('two', '[{"name": "a", "action": "act"}, {"name": "b", "action": "act"}]');
});

ok( $node->poll_query_until('postgres',
		q{SELECT state IN ('idle', 'running') FROM resilience.workers WHERE job = 'sagas'}),
	'the worker runs the sagas job');

my $poison = $node->safe_psql('postgres', q{
BEGIN;
SELECT resilience.saga_start('two', '{}');
UPDATE resilience.sagas SET step = 99 WHERE id = currval('resilience.saga_ids');
COMMIT;
});
my $t0 = time;
$node->safe_psql('postgres', q{
SELECT resilience.saga_start('two', '{}') FROM generate_series(1, 50);
});
my $healthy = 0;
while (time - $t0 < 10)
{
	$healthy = $node->safe_psql('postgres', qq{
		SELECT count(*) FROM resilience.sagas WHERE id <> $poison AND state = 'completed'});
	last if $healthy == 50;
	usleep(50_000);
}
my $took = time - $t0;
is($healthy, 50, 'all 50 healthy sagas started after the poison one complete');
cmp_ok($took, '<', 10, sprintf('... within 10 s (%.2f s)', $took));
is($node->safe_psql('postgres', q{SELECT count(*) || '/' || count(DISTINCT (saga_id, step)) FROM app.done}),
	'100/100', 'each of their steps ran once');

is($node->safe_psql('postgres', qq{SELECT state FROM resilience.sagas WHERE id = $poison}),
	'suspended', 'the poison saga is suspended');
like($node->safe_psql('postgres', qq{
	SELECT waiting_for || ': ' || (last_error ->> 'message') FROM resilience.stuck_sagas WHERE id = $poison}),
	qr/^saga_retry: saga $poison is at step 99/, 'stuck_sagas shows it, with its error, waiting for saga_retry');
is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM resilience.saga_events WHERE saga_id = $poison AND event = 'saga_suspended'}),
	'1', 'it was suspended once, not retried in a loop');
my $log = slurp_file($node->logfile);
like($log, qr/saga $poison \("two"\) is suspended/, 'the suspension is logged');

$node->safe_psql('postgres', qq{
UPDATE resilience.sagas SET step = 1 WHERE id = $poison;
SELECT resilience.saga_retry($poison);
});
ok( $node->poll_query_until('postgres',
		qq{SELECT state = 'completed' FROM resilience.sagas WHERE id = $poison}),
	'repaired and retried, the worker completes it');

$node->stop;
done_testing();
