# Several saga orchestrators per database (issue 16): with
# resilience.saga_workers = 4 the worker starts 3 saga helpers; they share
# 300 three-step sagas (SKIP LOCKED) without ever running one step twice,
# and the steps really run in several processes.  A helper killed with
# SIGKILL takes the server through crash recovery, after which every saga
# completes, still once per step.  Lowering the setting stops helpers, and
# DROP DATABASE does not wait for them.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = PostgreSQL::Test::Cluster->new('sagas_orchestrators');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres, other'
resilience.worker_naptime = '100ms'
resilience.saga_interval = '1h'
resilience.saga_workers = 4
max_worker_processes = 16
restart_after_crash = on   # the postmaster's own crash recovery, as in production
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE tap_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA app AUTHORIZATION tap_agent;
SET ROLE tap_agent;
SET search_path = app;
CREATE TABLE applied (saga_id bigint, step text, pid int);
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO applied VALUES (saga_id, ctx #>> '{_saga,step}', pg_backend_pid()) RETURNING '{}'::jsonb
$$;
SELECT resilience.saga_define('three', '[{"name": "a", "action": "act"},
                                         {"name": "b", "action": "act"},
                                         {"name": "c", "action": "act"}]');
});

sub helpers
{
	my ($db) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'resilience saga helper' AND datname = '$db'});
}
ok($node->poll_query_until('postgres', q{SELECT count(*) = 3 FROM pg_stat_activity
	WHERE backend_type = 'resilience saga helper' AND datname = 'postgres'}),
	'the worker starts 3 saga helpers (saga_workers = 4)');

sub wait_all
{
	my ($n, $limit) = @_;
	my $t0 = time;
	my $done = 0;
	while (time - $t0 < $limit)
	{
		$done = $node->safe_psql('postgres', q{SELECT count(*) FROM resilience.sagas WHERE state = 'completed'});
		last if $done == $n;
		usleep(100_000);
	}
	return $done;
}

$node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{}') FROM generate_series(1, 300)});
is(wait_all(300, 60), 300, '300 sagas completed');
is($node->safe_psql('postgres', q{SELECT count(*) || ' ' || count(DISTINCT (saga_id, step)) FROM app.applied}),
	'900 900', 'each of their 900 steps ran exactly once');
cmp_ok($node->safe_psql('postgres', q{SELECT count(DISTINCT pid) FROM app.applied}), '>', 1,
	'the steps ran in more than one orchestrator');

# kill -9 a helper while sagas run: crash recovery, then everything resumes
$node->safe_psql('postgres', q{SELECT resilience.saga_start('three', '{}') FROM generate_series(1, 300)});
my $victim = $node->safe_psql('postgres', q{
	SELECT pid FROM pg_stat_activity WHERE backend_type = 'resilience saga helper' LIMIT 1});
my $log_offset = -s $node->logfile;
kill 'KILL', $victim if $victim;
ok($victim, "killed saga helper $victim with SIGKILL");
# the postmaster logs the death when it reaps the child, which a first
# connection can beat: wait for the line (dies after the default timeout)
ok($node->wait_for_log(qr/resilience saga helper.*terminated by signal 9/, $log_offset),
	'the postmaster saw the helper\'s SIGKILL');
ok($node->poll_query_until('postgres', 'SELECT true'), 'the server is back after crash recovery');
is(wait_all(600, 90), 600, 'all 600 sagas completed after the crash');
is($node->safe_psql('postgres', q{SELECT count(*) || ' ' || count(DISTINCT (saga_id, step)) FROM app.applied}),
	'1800 1800', 'each step ran exactly once, across the crash');
ok($node->poll_query_until('postgres', q{SELECT count(*) = 3 FROM pg_stat_activity
	WHERE backend_type = 'resilience saga helper' AND datname = 'postgres'}),
	'the helpers are back');

# fewer orchestrators on reload
$node->append_conf('postgresql.conf', 'resilience.saga_workers = 2');
$node->reload;
ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
	WHERE backend_type = 'resilience saga helper' AND datname = 'postgres'}),
	'saga_workers = 2 on reload: one helper is left');

# DROP DATABASE of a database with helpers does not wait for them
$node->safe_psql('postgres', 'CREATE DATABASE other');
$node->safe_psql('other', 'CREATE EXTENSION resilience');
ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
	WHERE backend_type = 'resilience saga helper' AND datname = 'other'}),
	'the worker of database other has its helper');
my ($ret, $stdout, $stderr) = $node->psql('postgres', 'DROP DATABASE other');
is($ret, 0, 'DROP DATABASE other succeeds while its worker and helper run') or diag($stderr);
is(helpers('other'), '0', '... and they are gone');

$node->stop;
done_testing();
