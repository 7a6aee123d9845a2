# Background workers: the launcher, one worker per listed database, the job
# scheduler and the resilience.workers view.
#
# Every scenario runs on its own node with shared_preload_libraries =
# 'resilience' and short intervals.  The view is read from a database called
# "monitor" that has the extension but is never listed in
# resilience.database_names: shared memory is the same for every database, so
# the workers can be watched there while their own databases have no
# extension (or are being dropped).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# A fresh node, started, with the "monitor" database ready.
sub new_node
{
	my ($name, @conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);

	$node->init;
	$node->append_conf(
		'postgresql.conf', join("\n",
			"shared_preload_libraries = 'resilience'",
			"resilience.worker_naptime = '100ms'",
			"resilience.reaper_interval = '200ms'",
			"log_line_prefix = '%m [%p] %b '",
			@conf)
		  . "\n");
	$node->start;
	$node->safe_psql('postgres', 'CREATE DATABASE monitor');
	$node->safe_psql('monitor', 'CREATE EXTENSION resilience');
	return $node;
}

# The reaper row of the worker for $db: {pid, state, runs, failures,
# last_error}, or {} when there is no row.
sub worker_info
{
	my ($node, $db) = @_;
	my $row = $node->safe_psql(
		'monitor', qq{
		SELECT coalesce(pid, 0), state, runs, failures, coalesce(last_error, '')
		FROM resilience.workers WHERE database = '$db' AND job = 'reaper'});
	return {} if $row eq '';
	my %info;
	@info{qw(pid state runs failures last_error)} = split /\|/, $row, 5;
	return \%info;
}

# Poll the view (from "monitor") until $cond holds for $db's reaper row.
sub wait_worker
{
	my ($node, $db, $cond) = @_;
	return $node->poll_query_until(
		'monitor', qq{
		SELECT count(*) > 0 FROM resilience.workers
		WHERE database = '$db' AND job = 'reaper' AND ($cond)});
}

# The pid of the one process of a backend type (connected to $db if given).
sub backend_pid
{
	my ($node, $type, $db) = @_;
	my $where = "backend_type = '$type'";
	$where .= " AND datname = '$db'" if defined $db;
	return $node->safe_psql('monitor',
		"SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE $where");
}

# Lines of the server log written after $offset at ERROR, FATAL or PANIC.
sub log_problems
{
	my ($node, $offset) = @_;
	my $log = slurp_file($node->logfile, $offset);
	return join('', grep { /\b(?:ERROR|FATAL|PANIC):/ } split /^/m, $log);
}

# Stop fast and check that the stop left nothing alarming in the log.
sub stop_cleanly
{
	my ($node, $what) = @_;
	my $offset = -s $node->logfile;
	my $start = time;

	$node->stop('fast');
	cmp_ok(time - $start, '<', 10, "$what: fast stop is prompt");
	my $log = slurp_file($node->logfile, $offset);
	like($log, qr/database system is shut down/, "$what: server shut down");
	# (a client backend of the test's last psql call may not have read the
	# client's goodbye yet: the stop terminates it, as it should)
	is( join('',
			grep { !/client backend FATAL:  terminating connection due to administrator command/ }
			  split /^/m, log_problems($node, $offset)),
		'',
		"$what: no ERROR/FATAL/PANIC during the fast stop");
	unlike($log, qr/terminated by signal|exited with exit code [2-9]/,
		"$what: no process crashed during the fast stop");
}

###########################################################################
note '1. the launcher starts a worker that waits for the extension, then ticks';
{
	my $node = new_node('start');

	ok(wait_worker($node, 'postgres', "state = 'waiting_for_extension'"),
		'worker for postgres waits for the extension');
	my $launcher = backend_pid($node, 'resilience launcher');
	like($launcher, qr/^\d+$/, 'exactly one launcher runs');
	my $w = worker_info($node, 'postgres');
	is($w->{pid}, backend_pid($node, 'resilience worker', 'postgres'),
		'the view shows the pid of the worker connected to postgres');
	is($node->safe_psql('monitor',
			"SELECT count(*) FROM resilience.workers WHERE database <> 'postgres'"),
		'0', 'no worker for databases that are not listed');

	# Several naptimes without the extension: still waiting, nothing run.
	usleep(600_000);
	$w = worker_info($node, 'postgres');
	is($w->{state}, 'waiting_for_extension', 'still waiting after naptimes');
	is($w->{runs}, '0', 'no job ran without the extension');
	is($node->safe_psql('monitor',
			"SELECT last_run IS NULL FROM resilience.workers WHERE database = 'postgres' AND job = 'reaper'"),
		't', 'no last run without the extension');
	my $pid = $w->{pid};

	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs >= 1"),
		'the reaper runs once the extension exists');
	$w = worker_info($node, 'postgres');
	like($w->{state}, qr/^(idle|running)$/, 'worker is idle or running');
	my $runs = $w->{runs};
	ok(wait_worker($node, 'postgres', "runs >= $runs + 3"),
		'the reaper keeps ticking');
	is(worker_info($node, 'postgres')->{pid}, $pid,
		'the same worker process runs the jobs');
	is($node->safe_psql('monitor', q{
		SELECT last_run > now() - interval '5 s' AND failures = 0
		   AND last_error IS NULL AND job_interval = interval '200 ms'
		FROM resilience.workers WHERE database = 'postgres' AND job = 'reaper'}),
		't', 'last run is recent, no failures, interval shown');

	stop_cleanly($node, 'start');
}

###########################################################################
note '2. a worker or launcher that dies is replaced; kill -9 means a crash restart';
{
	my $node = new_node('crash', 'restart_after_crash = on');

	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs >= 2"), 'reaper ticks');
	my $old_worker = worker_info($node, 'postgres')->{pid};
	my $old_launcher = backend_pid($node, 'resilience launcher');
	like($old_launcher, qr/^\d+$/, 'one launcher');

	# A worker that exits (here: terminated) is started again by the
	# launcher, without a crash restart.
	my $runs = worker_info($node, 'postgres')->{runs};
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($old_worker)");
	ok(wait_worker($node, 'postgres',
			"pid <> $old_worker AND runs >= $runs + 2"),
		'a terminated worker is replaced and the job ticks on');
	$old_worker = worker_info($node, 'postgres')->{pid};
	is(backend_pid($node, 'resilience worker'), $old_worker,
		'exactly one worker, the new one');
	is(backend_pid($node, 'resilience launcher'), $old_launcher,
		'the launcher stayed');

	# A terminated launcher is restarted by the postmaster (after its 5 s
	# restart time); the new one replaces the old launcher's workers.
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($old_launcher)");
	ok( $node->poll_query_until(
			'monitor', qq{
			SELECT count(*) = 1 FROM pg_stat_activity
			WHERE backend_type = 'resilience launcher' AND pid <> $old_launcher}),
		'a terminated launcher comes back');
	ok(wait_worker($node, 'postgres',
			"pid <> $old_worker AND runs >= 2 AND state IN ('idle', 'running')"),
		'the new launcher runs its own worker, which ticks');
	$old_worker = worker_info($node, 'postgres')->{pid};
	is(backend_pid($node, 'resilience worker'), $old_worker,
		'exactly one worker after the launcher restart');
	$old_launcher = backend_pid($node, 'resilience launcher');

	my $offset = -s $node->logfile;
	ok(kill('KILL', $old_worker), 'worker killed with SIGKILL');
	$node->wait_for_log(qr/all server processes terminated; reinitializing/,
		$offset);
	ok(wait_worker($node, 'postgres',
			"pid IS NOT NULL AND pid <> $old_worker AND runs >= 2 AND state IN ('idle', 'running')"),
		'a new worker ticks after the crash restart');
	my $new_worker = worker_info($node, 'postgres')->{pid};
	isnt($new_worker, $old_worker, 'the worker has a new pid');
	is(backend_pid($node, 'resilience worker', 'postgres'), $new_worker,
		'the new pid is the worker connected to postgres');
	my $new_launcher = backend_pid($node, 'resilience launcher');
	like($new_launcher, qr/^\d+$/, 'one launcher after the crash');
	isnt($new_launcher, $old_launcher, 'the launcher was restarted');
	$runs = worker_info($node, 'postgres')->{runs};
	ok(wait_worker($node, 'postgres', "runs >= $runs + 2 AND pid = $new_worker"),
		'the job keeps ticking in the new worker');

	stop_cleanly($node, 'crash');
}

###########################################################################
note '3. a SIGHUP change of resilience.reaper_interval is honoured';
{
	my $node = new_node('sighup', "resilience.reaper_interval = '1h'");

	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs = 1"), 'first run right away');
	my $pid = worker_info($node, 'postgres')->{pid};

	# Proving that nothing happens needs some waiting: at 200 ms there
	# would be about ten runs in this time.
	sleep 2;
	is(worker_info($node, 'postgres')->{runs}, '1',
		'1 h interval: no second run within 2 s');

	$node->safe_psql('postgres',
		"ALTER SYSTEM SET resilience.reaper_interval = '200ms'");
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	my $start = time;
	ok(wait_worker($node, 'postgres', "runs >= 6"),
		'200 ms interval after reload: runs increase');
	cmp_ok(time - $start, '<', 8, 'five more runs took well under 8 s');

	$node->safe_psql('postgres',
		"ALTER SYSTEM SET resilience.reaper_interval = '1h'");
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	# let the worker take the reload (it wakes every 200 ms or sooner)
	sleep 1;
	my $runs = worker_info($node, 'postgres')->{runs};
	sleep 2;
	is(worker_info($node, 'postgres')->{runs}, $runs,
		'back to 1 h after reload: no run within 2 s');
	is(worker_info($node, 'postgres')->{pid}, $pid,
		'reloads did not restart the worker');

	# reaper_interval = 0 disables the job, the worker stays.
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET resilience.reaper_interval = 0");
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	ok(wait_worker($node, 'postgres', "state = 'idle' AND pid = $pid"),
		'interval 0: the worker idles');

	stop_cleanly($node, 'sighup');
}

###########################################################################
note '4. adding and removing a database in resilience.database_names';
{
	my $node = new_node('dbs');

	$node->safe_psql('postgres', 'CREATE DATABASE second');
	$node->safe_psql('second', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "state = 'waiting_for_extension'"),
		'worker for postgres runs');
	my $postgres_pid = worker_info($node, 'postgres')->{pid};
	is_deeply(worker_info($node, 'second'), {}, 'no worker for second yet');

	$node->safe_psql('postgres',
		"ALTER SYSTEM SET resilience.database_names = 'postgres, second'");
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	ok(wait_worker($node, 'second', "runs >= 2"),
		'listing second starts a worker there that runs the reaper');
	my $second_pid = worker_info($node, 'second')->{pid};
	is(backend_pid($node, 'resilience worker', 'second'), $second_pid,
		'the worker for second is connected to second');

	$node->safe_psql('postgres',
		"ALTER SYSTEM SET resilience.database_names = 'postgres'");
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	ok( $node->poll_query_until(
			'monitor',
			"SELECT count(*) = 0 FROM resilience.workers WHERE database = 'second'"),
		'unlisting second removes its row');
	ok( $node->poll_query_until(
			'monitor', "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $second_pid"),
		'the worker for second has exited');
	is(worker_info($node, 'postgres')->{pid}, $postgres_pid,
		'the worker for postgres was left alone');

	stop_cleanly($node, 'dbs');
}

###########################################################################
note '5. DROP EXTENSION while the worker runs';
{
	my $node = new_node('dropext', "resilience.reaper_interval = '10ms'");

	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs >= 5"), 'reaper ticks');
	my $pid = worker_info($node, 'postgres')->{pid};

	my $offset = -s $node->logfile;
	my $start = time;
	$node->safe_psql('postgres', 'DROP EXTENSION resilience');
	cmp_ok(time - $start, '<', 3, 'DROP EXTENSION does not wait for the worker');
	ok(wait_worker($node, 'postgres', "state = 'waiting_for_extension'"),
		'the worker goes back to waiting for the extension');
	my $w = worker_info($node, 'postgres');
	is($w->{pid}, $pid, 'the same worker process waits');
	my $runs = $w->{runs};
	# some naptimes for a late error to show up
	usleep(500_000);
	$w = worker_info($node, 'postgres');
	is($w->{runs}, $runs, 'no job runs without the extension');
	is($w->{failures}, '0', 'no job failed because of the drop');

	# A DROP EXTENSION that has not committed yet holds the extension's lock:
	# the worker skips its jobs instead of queueing behind it (and blocking
	# every later lock request on the extension).
	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs >= $runs + 3"),
		'CREATE EXTENSION again: the reaper ticks again');
	my $bg = $node->background_psql('postgres');
	$bg->query_safe('BEGIN');
	$bg->query_safe('DROP EXTENSION resilience');
	# ~30 job intervals
	usleep(300_000);
	is( $node->safe_psql(
			'monitor', "SELECT count(*) FROM pg_locks WHERE pid = $pid AND NOT granted"),
		'0', 'the worker never queued for a lock');
	$bg->query_safe('COMMIT');
	$bg->quit;
	ok(wait_worker($node, 'postgres', "state = 'waiting_for_extension' AND pid = $pid"),
		'after the commit the worker waits for the extension');

	usleep(300_000);
	is(log_problems($node, $offset), '',
		'no ERROR/FATAL in the log since the DROP EXTENSION');

	stop_cleanly($node, 'dropext');
}

###########################################################################
note '6. DROP and RENAME DATABASE of a database with a running worker';
{
	my $node = new_node('dropdb',
		"resilience.database_names = 'postgres, dropme, renameme'");

	$node->safe_psql('postgres', 'CREATE DATABASE dropme');
	$node->safe_psql('dropme', 'CREATE EXTENSION resilience');
	$node->safe_psql('postgres', 'CREATE DATABASE renameme');
	ok(wait_worker($node, 'dropme', "runs >= 2"), 'worker for dropme ticks');
	ok(wait_worker($node, 'renameme', "state = 'waiting_for_extension'"),
		'worker for renameme waits');
	ok(wait_worker($node, 'postgres', "state = 'waiting_for_extension'"),
		'worker for postgres waits');
	my $postgres_pid = worker_info($node, 'postgres')->{pid};
	my $dropme_pid = worker_info($node, 'dropme')->{pid};
	my $renameme_pid = worker_info($node, 'renameme')->{pid};
	my ($ret, $stdout, $stderr);

	# Someone who may not drop the database cannot stop its worker by trying.
	$node->safe_psql('postgres', 'CREATE ROLE nobody LOGIN');
	$ret = $node->psql('postgres', 'DROP DATABASE dropme',
		stdout => \$stdout, stderr => \$stderr,
		extra_params => [ '-U', 'nobody' ]);
	like($stderr, qr/must be owner of database dropme/,
		'DROP DATABASE by a non-owner fails');
	usleep(300_000);
	is(worker_info($node, 'dropme')->{pid}, $dropme_pid,
		'and it did not stop the worker');

	# Renames rolled back: each worker left, and each comes back.
	$ret = $node->psql(
		'postgres', q{
		BEGIN;
		ALTER DATABASE dropme RENAME TO dropme_x;
		ALTER DATABASE renameme RENAME TO renameme_x;
		ROLLBACK},
		stdout => \$stdout, stderr => \$stderr);
	is($stderr, '', 'two renames in one transaction, rolled back');
	ok(wait_worker($node, 'dropme', "pid <> $dropme_pid AND runs >= 1"),
		'rolled-back rename: the worker for dropme is back');
	ok(wait_worker($node, 'renameme', "pid <> $renameme_pid"),
		'rolled-back rename: the worker for renameme is back');

	my $offset = -s $node->logfile;
	my $start = time;
	$ret = $node->psql('postgres', 'DROP DATABASE dropme',
		stdout => \$stdout, stderr => \$stderr);
	my $elapsed = time - $start;
	is($ret, 0, 'DROP DATABASE (without FORCE) succeeds');
	is($stderr, '', 'DROP DATABASE reports nothing');
	# the server gives other sessions 5 s to leave before it fails the drop
	cmp_ok($elapsed, '<', 3, 'DROP DATABASE is prompt');

	$node->wait_for_log(
		qr/database "dropme" listed in resilience.database_names does not exist/,
		$offset);
	ok( $node->poll_query_until(
			'monitor',
			"SELECT count(*) = 0 FROM resilience.workers WHERE database = 'dropme'"),
		'no row for the dropped database');

	$start = time;
	$ret = $node->psql('postgres', 'ALTER DATABASE renameme RENAME TO renamed',
		stdout => \$stdout, stderr => \$stderr);
	$elapsed = time - $start;
	is($ret, 0, 'RENAME DATABASE succeeds');
	is($stderr, '', 'RENAME DATABASE reports nothing');
	cmp_ok($elapsed, '<', 3, 'RENAME DATABASE is prompt');
	$node->wait_for_log(
		qr/database "renameme" listed in resilience.database_names does not exist/,
		$offset);
	ok( $node->poll_query_until(
			'monitor',
			"SELECT count(*) = 0 FROM resilience.workers WHERE database IN ('renameme', 'renamed')"),
		'no worker for the renamed database');
	is( $node->safe_psql(
			'monitor',
			"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'resilience worker'"),
		'1', 'only the worker for postgres is left');

	# The name comes back: so does its worker.
	$node->safe_psql('postgres', 'CREATE DATABASE dropme');
	ok(wait_worker($node, 'dropme', "state = 'waiting_for_extension'"),
		'a database created again under a listed name gets a worker');
	is(worker_info($node, 'postgres')->{pid}, $postgres_pid,
		'the worker for postgres was left alone');

	usleep(300_000);
	is(log_problems($node, $offset), '',
		'no ERROR/FATAL in the log since the DROP DATABASE');

	stop_cleanly($node, 'dropdb');
}

###########################################################################
note '7. a clean stop, and a start after it';
{
	# 10 ms: the worker is often inside a job when the stop arrives
	my $node = new_node('stop', "resilience.reaper_interval = '10ms'",
		"resilience.database_names = 'postgres, waiting'");

	$node->safe_psql('postgres', 'CREATE DATABASE waiting');
	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs >= 20"), 'reaper ticks fast');
	ok(wait_worker($node, 'waiting', "state = 'waiting_for_extension'"),
		'a second worker waits for the extension');

	stop_cleanly($node, 'stop');

	$node->start;
	ok(wait_worker($node, 'postgres', "runs >= 5"),
		'after a restart the worker ticks again');
	stop_cleanly($node, 'stop after restart');
}

###########################################################################
note '8. a failing job is recorded, and the worker goes on';
{
	my $node = new_node('joberr');

	$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
	ok(wait_worker($node, 'postgres', "runs >= 1"), 'reaper ticks');
	my $pid = worker_info($node, 'postgres')->{pid};

	my $offset = -s $node->logfile;
	$node->safe_psql(
		'postgres', q{
		CREATE OR REPLACE FUNCTION resilience.run_reaper(OUT item text, OUT removed bigint)
		RETURNS SETOF record LANGUAGE plpgsql
		AS $$ BEGIN RAISE EXCEPTION 'reaper broken on purpose'; END $$});
	ok(wait_worker($node, 'postgres', "failures >= 1"), 'the failure is counted');
	my $w = worker_info($node, 'postgres');
	my ($runs, $failures) = ($w->{runs}, $w->{failures});
	ok(wait_worker($node, 'postgres', "failures >= $failures + 3"),
		'the failing job is retried on its interval');
	$w = worker_info($node, 'postgres');
	is($w->{last_error}, 'reaper broken on purpose', 'last_error holds the message');
	is($w->{runs}, $runs, 'failed runs are not counted as runs');
	is($w->{pid}, $pid, 'the worker kept its pid');
	like($w->{state}, qr/^(idle|running)$/, 'the worker is idle or running');
	is($node->safe_psql('monitor', q{
		SELECT last_error_at > now() - interval '5 s'
		FROM resilience.workers WHERE database = 'postgres' AND job = 'reaper'}),
		't', 'last_error_at is recent');
	like(slurp_file($node->logfile, $offset),
		qr/LOG:  resilience job "reaper" failed in database "postgres": reaper broken on purpose/,
		'the failure is logged at LOG');
	is(log_problems($node, $offset), '', 'nothing at ERROR/FATAL for it');

	# restore the job
	$node->safe_psql(
		'postgres', q{
		CREATE OR REPLACE FUNCTION resilience.run_reaper(OUT item text, OUT removed bigint)
		RETURNS SETOF record LANGUAGE sql VOLATILE PARALLEL UNSAFE
		AS $$ SELECT 'rate_limit_keys', resilience._rate_limit_sweep() $$});
	ok(wait_worker($node, 'postgres', "runs >= $runs + 2"),
		'restored job runs again');
	is(worker_info($node, 'postgres')->{pid}, $pid, 'still the same worker');

	stop_cleanly($node, 'joberr');
}

done_testing();
