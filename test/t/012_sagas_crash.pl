# Sagas survive crashes: 200 sagas run concurrently (the worker plus two
# sessions calling saga_run), while the worker is killed with SIGKILL (three
# times) and the server is shut down in immediate mode (twice), in random
# order at random points of the run.
# Steps fail now and then (a retryable 40001), sleep a little (so that a
# crash often lands inside one), and step c of every fourth saga fails for
# good, so those sagas compensate.  crash.effects has no unique constraint:
# a step whose effect was applied twice would show as two rows.
#
# Afterwards every saga is completed or compensated, each SQL step's effect
# (and each compensation's) was applied exactly once and in order, and
# saga_events tells each saga's full story: every attempt that committed, in
# order, with nothing missing and nothing twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use List::Util qw(shuffle);
use Time::HiRes qw(usleep);

my $SAGAS = 200;

my $node = PostgreSQL::Test::Cluster->new('sagas_crash');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.saga_interval = '200ms'
max_connections = 40
restart_after_crash = on   # the postmaster's own crash recovery, as in production
log_line_prefix = '%m [%p] %b '
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE crash_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA crash;
GRANT USAGE ON SCHEMA crash TO crash_agent;
CREATE SEQUENCE crash.n;
CREATE TABLE crash.effects (id bigserial, saga_id bigint, step text, op text);   -- no unique key, on purpose
GRANT INSERT ON crash.effects TO crash_agent;
GRANT USAGE ON SEQUENCE crash.effects_id_seq TO crash_agent;
CREATE FUNCTION crash.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    this_step text := ctx #>> '{_saga,step}';
BEGIN
    INSERT INTO crash.effects (saga_id, step, op) VALUES (saga_id, this_step, 'do');
    PERFORM pg_sleep(random() * 0.04);
    IF random() < 0.15 THEN
        RAISE EXCEPTION 'transient trouble' USING ERRCODE = '40001';
    END IF;
    IF this_step = 'c' AND (ctx ->> 'n')::int % 4 = 0 THEN
        RAISE EXCEPTION 'no car available';
    END IF;
    RETURN jsonb_build_object(this_step, 'done');
END $$;
CREATE FUNCTION crash.undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO crash.effects (saga_id, step, op) VALUES (saga_id, ctx #>> '{_saga,step}', 'undo');
    PERFORM pg_sleep(random() * 0.04);
    IF random() < 0.15 THEN
        RAISE EXCEPTION 'transient trouble' USING ERRCODE = '40001';
    END IF;
    RETURN NULL;
END $$;
SET ROLE crash_agent;
SELECT resilience.saga_define('crash', '[
  {"name": "a", "action": "crash.act", "compensation": "crash.undo", "max_attempts": 40,
   "backoff": {"base": "5 ms", "cap": "50 ms"}},
  {"name": "b", "action": "crash.act", "compensation": "crash.undo", "max_attempts": 40,
   "backoff": {"base": "5 ms", "cap": "50 ms"}},
  {"name": "c", "action": "crash.act", "compensation": "crash.undo", "max_attempts": 40,
   "backoff": {"base": "5 ms", "cap": "50 ms"}}]');
RESET ROLE;
});

# Two sessions drive sagas besides the worker (each dies with the server).
sub start_tickers
{
	my @handles;
	for (1 .. 2)
	{
		my ($out, $err) = ('', '');
		push @handles, IPC::Run::start(
			[
				$node->installed_command('psql'), '-X', '-q',
				'-d', $node->connstr('postgres') . ' application_name=saga_ticker',
				'-c', 'DO $$ BEGIN LOOP CALL resilience.saga_run(50); COMMIT; PERFORM pg_sleep(0.005); END LOOP; END $$'
			],
			'>', \$out, '2>', \$err);
	}
	return @handles;
}

# End the ticker sessions (ended already if the server went down).
sub stop_tickers
{
	my ($server_up, @handles) = @_;
	$node->safe_psql('postgres',
		q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'saga_ticker'})
	  if $server_up;
	for my $h (@handles)
	{
		eval { $h->finish; 1 } or $h->kill_kill;
	}
}

sub unfinished
{
	return $node->safe_psql('postgres',
		q{SELECT count(*) FROM resilience.sagas WHERE state NOT IN ('completed', 'compensated')});
}

# 200 sagas, started by 8 concurrent clients.
$node->pgbench(
	'-n -c 8 -t ' . ($SAGAS / 8),
	0,
	[qr{processed: $SAGAS/$SAGAS}],
	[qr{^$}],
	"$SAGAS sagas started concurrently",
	{
		'001_start' => q{
SELECT resilience.saga_start('crash', jsonb_build_object('n', n), 'order-' || n) FROM (SELECT nextval('crash.n') AS n) s;
}
	});
my @tickers = start_tickers();

# Crash number i comes once a random number of sagas, between 30(i-1)+10
# and 30i, have finished, plus up to 100 ms: at random points of the run
# however fast the machine, always with work in flight.
my $offset = -s $node->logfile;
my @crashes = shuffle(('kill -9 of the worker') x 3, ('immediate shutdown') x 2);
for my $i (1 .. @crashes)
{
	my $crash = $crashes[$i - 1];
	my $after = 30 * ($i - 1) + 10 + int(rand(21));
	$node->poll_query_until('postgres',
		qq{SELECT count(*) >= $after FROM resilience.sagas WHERE state IN ('completed', 'compensated')})
	  or die "sagas stopped finishing before crash $i";
	usleep(int(rand(100_000)));
	my $left = unfinished();
	cmp_ok($left, '>', 0, "$crash while $left sagas are unfinished");
	if ($crash eq 'immediate shutdown')
	{
		$node->stop('immediate');
		stop_tickers(0, @tickers);
		$node->start;
	}
	else
	{
		my $pid = $node->safe_psql('postgres',
			q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'resilience worker' AND datname = 'postgres'});
		like($pid, qr/^\d+$/, '... the worker is there to be killed');
		my $before = -s $node->logfile;
		kill 'KILL', $pid;
		# the postmaster ends every backend and recovers; wait until it is back
		$node->wait_for_log(qr/database system is ready to accept connections/, $before) or die "the server did not recover";
		stop_tickers(0, @tickers);
		$node->poll_query_until('postgres', 'SELECT true') or die 'the server did not come back';
	}
	@tickers = start_tickers();
}
my $log = slurp_file($node->logfile, $offset);
like($log, qr/resilience worker.*terminated by signal 9/, 'the worker was killed');
like($log, qr/database system was not properly shut down; automatic recovery in progress/,
	'and the server recovered from crashes');

ok( $node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM resilience.sagas WHERE state NOT IN ('completed', 'compensated')}),
	'after the crashes, every saga ends completed or compensated');
stop_tickers(1, @tickers);

is($node->safe_psql('postgres', q{
	SELECT string_agg(state || ' ' || n, ', ' ORDER BY state) FROM (
	  SELECT state, count(*) AS n FROM resilience.sagas GROUP BY state) s}),
	'compensated 50, completed 150',
	'the 150 sagas that could complete did; the 50 whose step c fails were compensated');

# --- no effect twice, and each saga's effects in order ---
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT saga_id, step, op FROM crash.effects GROUP BY 1, 2, 3 HAVING count(*) > 1) d}),
	'0', 'no step or compensation was applied twice');
is($node->safe_psql('postgres', q{
	SELECT string_agg(format('%s (%s sagas): %s', s.state, count, effects), E'\n' ORDER BY s.state)
	  FROM (SELECT s.state, e.effects, count(*)
	          FROM resilience.sagas s
	          LEFT JOIN (SELECT saga_id, string_agg(step || ' ' || op, ', ' ORDER BY id) AS effects
	                       FROM crash.effects GROUP BY saga_id) e ON e.saga_id = s.id
	         GROUP BY 1, 2) s}),
	"compensated (50 sagas): a do, b do, b undo, a undo\ncompleted (150 sagas): a do, b do, c do",
	'each saga applied exactly its steps (and undid them in reverse), once each');

# --- the story in saga_events ---
# The transitions of each saga, without the failed attempts.
is($node->safe_psql('postgres', q{
	SELECT string_agg(format('%s sagas: %s', count, story), E'\n' ORDER BY story)
	  FROM (SELECT story, count(*) FROM (
	          SELECT saga_id, string_agg(event || coalesce(':' || step, ''), ' ' ORDER BY id) AS story
	            FROM resilience.saga_events
	           WHERE event NOT IN ('step_failed', 'compensation_failed')
	           GROUP BY saga_id) s GROUP BY story) t}),
	"50 sagas: saga_started step_completed:a step_completed:b compensation_started step_compensated:b step_compensated:a saga_compensated\n"
	  . "150 sagas: saga_started step_completed:a step_completed:b step_completed:c saga_completed",
	'every saga\'s transitions are recorded once each, in order');
# Every attempt that committed is there: per saga and step, the attempts of
# the action (and of the compensation) are numbered 1, 2, ... without a gap
# or a repeat, each failed one but the last was retried, and the last one is
# the one that completed (or, for c of a compensated saga, failed for good).
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (
	  SELECT saga_id, step, event IN ('compensation_failed', 'step_compensated') AS undo,
	         array_agg(attempt ORDER BY id) AS attempts,
	         array_agg(event ORDER BY id) AS events,
	         array_agg(detail ? 'retry_at' ORDER BY id) AS retried
	    FROM resilience.saga_events
	   WHERE event IN ('step_failed', 'step_completed', 'compensation_failed', 'step_compensated')
	   GROUP BY 1, 2, 3) a
	 WHERE attempts <> ARRAY(SELECT generate_series(1, cardinality(attempts)))
	    OR events[cardinality(events)] NOT IN ('step_completed', 'step_compensated', 'step_failed')
	    OR NOT (retried[1:cardinality(retried) - 1] <@ ARRAY[true])
	    OR (events[cardinality(events)] = 'step_failed' AND (retried[cardinality(retried)] OR step <> 'c'))}),
	'0', 'each attempt that committed is recorded once, numbered in order, and every failure but the last was retried');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.saga_steps t
	  JOIN LATERAL (SELECT max(attempt) FILTER (WHERE event IN ('step_failed', 'step_completed')) AS actions,
	                       count(*) FILTER (WHERE event IN ('compensation_failed', 'step_compensated')) AS compensations
	                  FROM resilience.saga_events e WHERE e.saga_id = t.saga_id AND e.step = t.name) e ON true
	 WHERE t.attempts <> e.actions OR t.compensation_attempts <> e.compensations}),
	'0', 'saga_steps agrees with the events on every attempt');
cmp_ok($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.saga_events WHERE event = 'step_failed'}),
	'>', 0, 'transient failures were retried along the way');

$node->stop;
done_testing();
