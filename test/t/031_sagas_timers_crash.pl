# Durable timers (issue 16) across immediate shutdowns: 40 sagas of
#   a (SQL) -> sleep 400 ms -> b (SQL) -> until <their own time> -> c (SQL)
# are started, and the server is shut down in immediate mode three times
# while their timers run.  Then every saga completes, no SQL step was
# applied twice, every timer fired exactly once and never before it was due
# (a timer due while the server was down fires, late, once it is back).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = PostgreSQL::Test::Cluster->new('sagas_timers');
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
CREATE TABLE applied (saga_id bigint, step text, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO applied (saga_id, step) VALUES (saga_id, ctx #>> '{_saga,step}') RETURNING '{}'::jsonb
$$;
SELECT resilience.saga_define('timed', '[
  {"name": "a", "action": "act"},
  {"name": "nap", "sleep": "400 ms"},
  {"name": "b", "action": "act"},
  {"name": "wake", "until": "wake_at"},
  {"name": "c", "action": "act"}]');
});
ok( $node->poll_query_until('postgres',
		q{SELECT state IN ('idle', 'running') FROM resilience.workers WHERE job = 'sagas'}),
	'the worker runs the sagas job');

# wake_at spread over the next 3 s: timers fall due before, during and
# after the shutdowns
$node->safe_psql('postgres', q{
SELECT resilience.saga_start('timed',
    jsonb_build_object('wake_at', clock_timestamp() + (i * 75) * interval '1 ms'))
  FROM generate_series(1, 40) i;
});

for my $round (1 .. 3)
{
	usleep(250_000 + int(rand(500_000)));
	$node->stop('immediate');
	usleep(200_000);
	$node->start;
}

my $t0 = time;
my $left;
while (time - $t0 < 60)
{
	$left = $node->safe_psql('postgres', q{SELECT count(*) FROM resilience.sagas WHERE state <> 'completed'});
	last if $left == 0;
	usleep(100_000);
}
is($left, 0, 'every saga completed after three immediate shutdowns');
is($node->safe_psql('postgres', q{
	SELECT count(*) || ' ' || count(DISTINCT (saga_id, step)) FROM app.applied}),
	'120 120', 'each SQL step was applied exactly once (40 sagas x 3 steps)');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (
	    SELECT saga_id, step FROM resilience.saga_events WHERE event = 'timer_fired'
	     GROUP BY saga_id, step HAVING count(*) <> 1) x}),
	'0', 'every timer fired once');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.saga_events WHERE event = 'timer_fired'}),
	'80', '... all 80 of them');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.saga_events f
	  JOIN resilience.sagas s ON s.id = f.saga_id
	 WHERE f.event = 'timer_fired'
	   AND f.at < CASE f.step WHEN 'wake' THEN (s.context ->> 'wake_at')::timestamptz
	                          ELSE (SELECT (t.detail ->> 'due')::timestamptz FROM resilience.saga_events t
	                                 WHERE t.saga_id = f.saga_id AND t.step = f.step
	                                   AND t.event = 'timer_started') END}),
	'0', 'no timer fired before it was due');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas s
	 WHERE (SELECT a.at FROM app.applied a WHERE a.saga_id = s.id AND a.step = 'c')
	       < (s.context ->> 'wake_at')::timestamptz}),
	'0', 'no step after a timer ran before the timer was due');

$node->stop;
done_testing();
