# Failover: a primary and a synchronous standby (synchronous_commit = on,
# synchronous_standby_names naming the standby), both preloading the library
# with workers on.  A mixed load runs against the primary: leases with fenced
# writes, advisory-lock tokens (one session at synchronous_commit = local),
# idempotent requests, outbox events published to a local HTTP receiver,
# sagas.  The primary is stopped with -m immediate while all of it is in
# flight, the standby is promoted, and the load resumes against it, each
# client retrying what it had in flight.  Afterwards:
#  - every token handed out after the promotion exceeds every token handed
#    out before it (the clients log each token as it reaches them);
#  - a lease, an idempotency key part-way through and inbox rows committed on
#    the old primary are there and honoured on the new one;
#  - no idempotent effect was applied twice, none is missing;
#  - every committed outbox event reached the receiver at least once, each
#    delivery with the event id as Idempotency-Key, and nothing arrived that
#    the new primary does not know; the events in flight (claimed, not
#    recorded as delivered) when the primary died went out again with their
#    own ids; an event claimed by the old primary's relay under a pid that is
#    the new relay's own is released at once;
#  - every saga ends completed or compensated, no step applied twice, those
#    unfinished at the failover included;
#  - the standby's workers waited (logged once, no error) and ran no job
#    while in recovery, the relay and the orchestrator refuse to run there,
#    and the jobs start within seconds of the promotion although the
#    standby's worker_naptime is 30 s;
#  - shared-memory state (rate limits, breakers, bulkheads) is the new
#    primary's own: what the old primary had is not carried over.
# Before the failover, with the standby not acknowledging, a token is not
# handed out until it does: not at synchronous_commit = local, and not when
# the wait is cancelled (an error then, never a token).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(time usleep);
use lib 'test/perl';
use OutboxReceiver;

my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);

# --- a primary and a synchronous standby ---
my $primary = PostgreSQL::Test::Cluster->new('ha_primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
resilience.saga_interval = '200ms'
resilience.relay_interval = '1s'
synchronous_commit = on
max_connections = 40
log_line_prefix = '%m [%p] %b '
});
$primary->start;
$primary->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
CREATE ROLE ha_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA ha;
CREATE TABLE ha.fenced_writes (id bigserial, resource int, token bigint);
CREATE TABLE ha.idem_effects (id bigserial, req int);        -- no unique key, on purpose
CREATE TABLE ha.published (m text PRIMARY KEY, id bigint);
CREATE TABLE ha.saga_effects (id bigserial, saga_id bigint, step text, op text);   -- no unique key
GRANT USAGE ON SCHEMA ha TO ha_agent;
GRANT INSERT ON ha.saga_effects TO ha_agent;
GRANT USAGE ON SEQUENCE ha.saga_effects_id_seq TO ha_agent;
CREATE FUNCTION ha.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    INSERT INTO ha.saga_effects (saga_id, step, op) VALUES (saga_id, ctx #>> '{_saga,step}', 'do');
    PERFORM pg_sleep(random() * 0.03);
    IF ctx #>> '{_saga,step}' = 'c' AND (ctx ->> 'n')::int % 4 = 0 THEN
        RAISE EXCEPTION 'no car available';
    END IF;
    RETURN NULL;
END \$\$;
CREATE FUNCTION ha.undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    INSERT INTO ha.saga_effects (saga_id, step, op) VALUES (saga_id, ctx #>> '{_saga,step}', 'undo');
    PERFORM pg_sleep(random() * 0.03);
    RETURN NULL;
END \$\$;
SET ROLE ha_agent;
SELECT resilience.saga_define('trip', '[
  {"name": "a", "action": "ha.act", "compensation": "ha.undo"},
  {"name": "b", "action": "ha.act", "compensation": "ha.undo"},
  {"name": "c", "action": "ha.act", "compensation": "ha.undo", "max_attempts": 1}]');
RESET ROLE;
-- claims of in-flight events expire only after 20 s + 30 s: a relay must
-- release the old primary's claims itself for them to go out in time
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('ha.%', 'http', '@{[ $recv->url('/ha') ]}', '{"timeout_ms": 20000}');
});

$primary->backup('ha_backup');
my $standby = PostgreSQL::Test::Cluster->new('ha_standby');
$standby->init_from_backup($primary, 'ha_backup', has_streaming => 1);
# Once promoted, the standby has no standby of its own: it must not wait for
# one.  Its workers look for the end of recovery on their own schedule, not
# every worker_naptime (30 s here).
$standby->append_conf('postgresql.conf', qq{
synchronous_standby_names = ''
resilience.worker_naptime = '30s'
});
$standby->start;
# Synchronous from now on (named before the standby existed, the setup above
# would have waited for it forever).  The standby's application_name is its
# node name.
$primary->append_conf('postgresql.conf', "synchronous_standby_names = 'ha_standby'\n");
$primary->reload;

ok( $primary->poll_query_until('postgres',
		q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'ha_standby'}),
	'the standby streams as the synchronous standby')
  or BAIL_OUT('the standby never became synchronous');

# --- tokens while the standby does not acknowledge ---
# Name a standby that does not exist: ha_standby still streams, but
# asynchronously, and nothing confirms WAL any more.
$primary->safe_psql('postgres',
	q{ALTER SYSTEM SET synchronous_standby_names = 'nobody'; SELECT pg_reload_conf()});
$primary->poll_query_until('postgres',
	q{SELECT sync_state = 'async' FROM pg_stat_replication WHERE application_name = 'ha_standby'})
  or die 'the standby stayed synchronous';
# The sequence logs 32 values ahead: within 40 tokens one needs a new WAL
# record, which the standby never confirms.
my ($out, $err) = ('', '');
my $t0 = time;
my $ret = $primary->psql('postgres', q{
SET synchronous_commit = local;
SET statement_timeout = '1s';
DO $$
DECLARE
    n int := 0;
BEGIN
    FOR i IN 1 .. 40 LOOP
        PERFORM resilience.advisory_xact_lock('ha:stall');
        n := n + 1;
    END LOOP;
    RAISE NOTICE 'handed out % tokens', n;
END $$;
}, stdout => \$out, stderr => \$err);
isnt($ret, 0, 'at synchronous_commit = local, a token the standby has not confirmed is not handed out');
like($err, qr/no fencing token was handed out: the synchronous standby has not confirmed it/,
	'... the call fails when its wait is cancelled (statement_timeout), with no token');
$ret = $primary->psql('postgres', q{
SET statement_timeout = '1s';
SELECT resilience.advisory_xact_lock('ha:stall');
}, stdout => \$out, stderr => \$err);
isnt($ret, 0, 'at synchronous_commit = on, a cancelled wait for the standby hands out no token either');
is($out, '', '... nothing came back');
like($err, qr/canceling wait for synchronous replication.*no fencing token was handed out/s,
	'... PostgreSQL\'s warning about the cancelled wait, then the error');
cmp_ok(time - $t0, '>=', 1.9, 'both calls waited for the standby until cancelled');
$primary->safe_psql('postgres', q{ALTER SYSTEM RESET synchronous_standby_names; SELECT pg_reload_conf()});
$primary->poll_query_until('postgres',
	q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'ha_standby'})
  or die 'the standby did not become synchronous again';
my $stall_token = $primary->safe_psql('postgres',
	q{SET statement_timeout = '10s'; SELECT resilience.advisory_xact_lock('ha:stall')});
like($stall_token, qr/^\d+$/, 'once the standby acknowledges again, tokens are handed out');

# --- table-backed state that must survive: a lease held through the
# failover, an idempotency key part-way through its work, inbox rows ---
my $held = $primary->safe_psql('postgres', q{SELECT resilience.lock_acquire('ha:held', '1 hour', 'holder')});
like($held, qr/^\d+$/, 'a lease is held on the old primary');
is($primary->safe_psql('postgres', q{
SELECT outcome FROM resilience.idempotency_begin('ha', 'two-phase', '{"x": 1}', lock_timeout => '1 second');
SELECT resilience.idempotency_checkpoint('ha', 'two-phase', 'charged');}),
	"proceed\n", 'an idempotency key is begun and checkpointed (charged) on the old primary');
is($primary->safe_psql('postgres',
	q{SELECT count(*) FILTER (WHERE resilience.inbox_accept('ha-consumer', 'msg-' || n)) FROM generate_series(1, 20) n}),
	'20', 'a consumer accepts 20 messages on the old primary');

# --- shared-memory state on the old primary, and on the standby ---
$primary->safe_psql('postgres', q{
SELECT resilience.rate_limit('ha:rl', 3, 0.0001) FROM generate_series(1, 3);
SELECT resilience.breaker_force_open('ha:br');
});
is($primary->safe_psql('postgres', q{SELECT resilience.rate_limit('ha:rl', 3, 0.0001)}),
	'f', 'on the old primary, rate limit ha:rl is exhausted');
my $permit = $primary->background_psql('postgres');
$permit->query_safe(q{SELECT resilience.bulkhead_acquire_session('ha:bh', 1)});
is($primary->safe_psql('postgres', q{SELECT resilience.bulkhead_acquire('ha:bh', 1)}),
	'f', '... and the one permit of bulkhead ha:bh is held');
$standby->safe_psql('postgres', q{SELECT resilience.rate_limit('ha:rl-standby', 2, 0.0001) FROM generate_series(1, 2)});
is($standby->safe_psql('postgres', q{SELECT resilience.rate_limit('ha:rl-standby', 2, 0.0001)}),
	'f', 'the standby keeps rate limits of its own (for its read traffic)');

# --- the load ---
my @clients;

# A psql running a DO loop that commits as it goes and RAISEs a NOTICE for
# whatever reached it (a token, a request done); stderr goes to a file, so
# that what a client saw survives the server.
sub start_client
{
	my ($node, $name, $sql) = @_;
	my $log = "$PostgreSQL::Test::Utils::tmp_check/ha_$name.log";
	my $out = '';
	push @clients,
	  IPC::Run::start(
		[
			$node->installed_command('psql'), '-X', '-q',
			'-d', $node->connstr('postgres') . " application_name=ha_client",
			'-c', $sql
		],
		'>', \$out, '2>', $log);
	return $log;
}

# End the clients (already gone if their server went down).
sub stop_clients
{
	my ($node) = @_;
	$node->safe_psql('postgres',
		q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'ha_client'})
	  if $node;
	for my $h (@clients)
	{
		eval { $h->finish; 1 } or $h->kill_kill;
	}
	@clients = ();
}

# What a client logged: the numbers of the NOTICEs "<what> <n>".
sub logged
{
	my ($log, $what) = @_;
	return map { /NOTICE:\s+$what (\d+)/ ? $1 : () } split /\n/, slurp_file($log);
}

sub lease_client
{
	my ($node, $name, $phase) = @_;
	return start_client($node, "$name-$phase", qq{
DO \$\$
DECLARE
    tok bigint;
    r int;
BEGIN
    LOOP
        r := floor(random() * 3)::int;
        tok := resilience.lock_acquire('ha:res' || r, '300 ms', '$name', '100 ms');
        IF tok IS NOT NULL THEN
            RAISE NOTICE 'token %', tok;
            INSERT INTO ha.fenced_writes (resource, token)
            SELECT r, tok WHERE resilience.fence_check('ha:res' || r, tok);
            PERFORM resilience.lock_release('ha:res' || r, tok);
        END IF;
        COMMIT;
    END LOOP;
END \$\$;
});
}

sub advisory_client
{
	my ($node, $phase) = @_;
	return start_client($node, "advisory-$phase", q{
SET synchronous_commit = local;
DO $$
BEGIN
    LOOP
        RAISE NOTICE 'token %', resilience.advisory_xact_lock('ha:adv');
        COMMIT;
        PERFORM pg_sleep(0.002);
    END LOOP;
END $$;
});
}

# Requests from $from on: idempotent(...) with key req-<n>; "done" only once
# the commit has returned.
sub idempotent_client
{
	my ($node, $phase, $from) = @_;
	return start_client($node, "idem-$phase", qq{
DO \$\$
BEGIN
    FOR n IN $from .. 1000000 LOOP
        RAISE NOTICE 'req %', n;
        PERFORM resilience.idempotent('ha', 'req-' || n, jsonb_build_object('n', n),
            format('INSERT INTO ha.idem_effects (req) VALUES (%s) RETURNING jsonb_build_object(''id'', id)', n));
        COMMIT;
        RAISE NOTICE 'done %', n;
        PERFORM pg_sleep(0.005);
    END LOOP;
END \$\$;
});
}

sub publish_client
{
	my ($node, $phase) = @_;
	return start_client($node, "pub-$phase", qq{
DO \$\$
BEGIN
    FOR n IN 1 .. 1000000 LOOP
        INSERT INTO ha.published
        SELECT '$phase-' || n, resilience.outbox_publish('ha.ev', jsonb_build_object('m', '$phase-' || n), 'k' || n % 5);
        COMMIT;
        RAISE NOTICE 'published %', n;
        PERFORM pg_sleep(0.01);
    END LOOP;
END \$\$;
});
}

sub saga_client
{
	my ($node, $phase, $from) = @_;
	return start_client($node, "saga-$phase", qq{
DO \$\$
BEGIN
    FOR n IN $from .. 1000000 LOOP
        RAISE NOTICE 'start %', n;
        PERFORM resilience.saga_start('trip', jsonb_build_object('n', n), 'trip-' || n);
        COMMIT;
        RAISE NOTICE 'started %', n;
        PERFORM pg_sleep(0.02);
    END LOOP;
END \$\$;
});
}

$recv->control('mode=ok&delay_ms=100');    # deliveries are in flight most of the time
my %logs_a = (
	lease1 => lease_client($primary, 'c1', 'a'),
	lease2 => lease_client($primary, 'c2', 'a'),
	advisory => advisory_client($primary, 'a'),
	idem => idempotent_client($primary, 'a', 1),
	pub => publish_client($primary, 'a'),
	saga => saga_client($primary, 'a', 1));

# --- the standby meanwhile ---
# An event claimed by the old primary's relay under the pid that the
# standby's worker has (pids of two servers are unrelated): the relay that
# the worker becomes must not take the claim for its own.  The claim is
# copied from a real one, only the pid changed; it expires in 10 minutes.
$primary->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM resilience.outbox WHERE claimed_by LIKE 'relay:%'})
  or die 'the relay never claimed anything';
my $standby_worker = $standby->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'resilience worker'});
like($standby_worker, qr/^\d+$/, 'the standby runs a worker');
$primary->safe_psql('postgres',
	q{SELECT resilience.outbox_publish('ha.ev', '{"m": "same-pid"}', deliver_after => '1 hour')});
# (Claims come and go: try until one is there to copy.)
$primary->safe_psql('postgres', qq{
DO \$\$
BEGIN
    LOOP
        UPDATE resilience.outbox o
           SET claimed_by = regexp_replace(c.claimed_by, '^relay:[0-9]+:', 'relay:$standby_worker:'),
               claim_until = now() + interval '10 minutes', not_before = now()
          FROM (SELECT claimed_by FROM resilience.outbox
                 WHERE claimed_by LIKE 'relay:%' AND delivered_at IS NULL LIMIT 1) c
         WHERE o.payload ->> 'm' = 'same-pid';
        EXIT WHEN FOUND;
        PERFORM pg_sleep(0.01);
    END LOOP;
END \$\$});
is( $primary->safe_psql('postgres',
		qq{SELECT count(*) FROM resilience.outbox WHERE claimed_by LIKE 'relay:$standby_worker:%'}),
	'1', 'an event is claimed by the old primary under the pid of the standby\'s worker');

sleep 4;
is( $standby->safe_psql('postgres',
		q{SELECT string_agg(DISTINCT state || ' runs=' || runs || ' failures=' || failures, ', ')
		    FROM resilience.workers WHERE database = 'postgres'}),
	'in_recovery runs=0 failures=0', 'on the standby the worker waits in recovery and has run no job');
is($standby->safe_psql('postgres', q{SELECT pg_is_in_recovery()}), 't', '... while the standby is in recovery');
cmp_ok($standby->safe_psql('postgres', q{SELECT count(*) FROM resilience.sagas}),
	'>', 0, 'sagas reach the standby');
($ret, $out, $err) = $standby->psql('postgres', 'CALL resilience.relay_outbox(10)');
like($err, qr/cannot execute relay_outbox\(\) during recovery/, 'the relay refuses to run on the standby');
($ret, $out, $err) = $standby->psql('postgres', 'SELECT resilience.saga_tick()');
like($err, qr/cannot execute saga_tick\(\) during recovery/, 'so does the orchestrator');

# --- the failover, with everything in flight ---
cmp_ok(scalar(logged($logs_a{saga}, 'started')), '>', 10, 'sagas were started on the old primary');
# Deliveries answered 2 s late: the primary dies with requests in flight.
$recv->control('mode=ok&delay_ms=2000');
my $in_flight_sql = q{
SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM resilience.outbox
 WHERE claimed_by LIKE 'relay:%' AND delivered_at IS NULL AND payload ->> 'm' <> 'same-pid'};
$standby->poll_query_until('postgres', qq{
SELECT ($in_flight_sql) <> ''
   AND (SELECT count(*) > 0 FROM resilience.sagas WHERE state NOT IN ('completed', 'compensated'))})
  or die 'nothing in flight';
$primary->stop('immediate');
my $killed_at = time;
$permit->{run}->kill_kill;
stop_clients(undef);
$recv->control('mode=ok&delay_ms=0');
# What the standby has when the primary is gone: all the new primary starts from.
my @in_flight = split /,/, $standby->safe_psql('postgres', $in_flight_sql);
my $unfinished = $standby->safe_psql('postgres',
	q{SELECT count(*) FROM resilience.sagas WHERE state NOT IN ('completed', 'compensated')});
cmp_ok(scalar(@in_flight), '>', 0, scalar(@in_flight) . ' outbox events were in flight at the failover');
cmp_ok($unfinished, '>', 0, "$unfinished sagas were unfinished");
$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()') or die 'no promotion';
my $promoted_at = time;
my $new = $standby;

ok( $new->poll_query_until('postgres',
		q{SELECT count(*) = 3 FROM resilience.workers
		   WHERE database = 'postgres' AND job IN ('reaper', 'sagas', 'relay') AND runs > 0}),
	'the jobs run on the new primary');
my $jobs_after = time - $promoted_at;
cmp_ok($jobs_after, '<', 10,
	sprintf('... within seconds of the promotion (%.1f s; the worker_naptime is 30 s)', $jobs_after));
my $standby_log = slurp_file($new->logfile);
my ($in_recovery_log) = split /recovery has ended/, $standby_log, 2;
is(scalar(() = $in_recovery_log =~ /resilience worker for database "postgres" is waiting for recovery to end/g),
	1, 'in recovery, the standby\'s log shows the worker waiting, once');
unlike($in_recovery_log, qr/resilience (worker|launcher) (ERROR|FATAL|WARNING|PANIC):|resilience job "/,
	'... and no error from the launcher or the worker, no job run');
like($standby_log, qr/resilience worker for database "postgres": recovery has ended/,
	'after the promotion it says recovery has ended');

# --- what was committed on the old primary is there and honoured ---
is($new->safe_psql('postgres', qq{SELECT resilience.lock_check('ha:held', $held)}),
	't', 'the lease held on the old primary still holds with its token');
is($new->safe_psql('postgres', q{SELECT resilience.lock_acquire('ha:held', '1 hour', 'other') IS NULL}),
	't', '... nobody else can take it');
is($new->safe_psql('postgres', qq{SELECT resilience.lock_release('ha:held', $held)}),
	't', '... and its holder releases it there');
# (the key's 1 s lock expired long ago: its holder died with the old primary)
is($new->safe_psql('postgres',
	q{SELECT outcome || ' from ' || recovery_point FROM resilience.idempotency_begin('ha', 'two-phase', '{"x": 1}')}),
	'proceed from charged', 'the idempotency key resumes from its checkpoint');
is($new->safe_psql('postgres',
	q{SELECT count(*) FILTER (WHERE resilience.inbox_accept('ha-consumer', 'msg-' || n)) FROM generate_series(1, 21) n}),
	'1', 'the inbox rejects the 20 messages accepted on the old primary, accepts a new one');

# --- the load resumes against the new primary, retrying what was in flight ---
my @idem_a = logged($logs_a{idem}, 'req');
my @saga_a = logged($logs_a{saga}, 'start');
my %logs_b = (
	lease1 => lease_client($new, 'c1', 'b'),
	lease2 => lease_client($new, 'c2', 'b'),
	advisory => advisory_client($new, 'b'),
	idem => idempotent_client($new, 'b', $idem_a[-1] - 2),    # two replays, then the one in flight
	pub => publish_client($new, 'b'),
	saga => saga_client($new, 'b', $saga_a[-1] - 1));
sleep 6;
stop_clients($new);

# --- fencing tokens ---
my @before = ((map { logged($logs_a{$_}, 'token') } qw(lease1 lease2 advisory)), $stall_token, $held);
my @after = map { logged($logs_b{$_}, 'token') } qw(lease1 lease2 advisory);
my ($max_before) = sort { $b <=> $a } @before;
my ($min_after) = sort { $a <=> $b } @after;
cmp_ok(scalar(@before), '>', 50, scalar(@before) . ' tokens handed out before the failover');
cmp_ok(scalar(@after), '>', 50, scalar(@after) . ' after it');
cmp_ok($min_after, '>', $max_before,
	"every token after the promotion exceeds every token before it ($min_after > $max_before)");
is( $new->safe_psql('postgres', q{
SELECT count(*) FROM (
  SELECT token, lag(token) OVER (PARTITION BY resource ORDER BY id) AS prev FROM ha.fenced_writes) s
 WHERE token <= prev}),
	'0', 'per resource, the fenced writes that committed carry strictly increasing tokens, across the failover');

# --- idempotent requests ---
my @idem_done = (logged($logs_a{idem}, 'done'), logged($logs_b{idem}, 'done'));
my ($last_done) = sort { $b <=> $a } @idem_done;
is($new->safe_psql('postgres', q{SELECT count(*) FROM (SELECT req FROM ha.idem_effects GROUP BY req HAVING count(*) > 1) d}),
	'0', 'no idempotent effect was applied twice');
is($new->safe_psql('postgres', qq{SELECT count(DISTINCT req) FROM ha.idem_effects WHERE req <= $last_done}),
	$last_done, "every request that completed ($last_done, the one in flight at the failover retried) has its effect");
cmp_ok(scalar(logged($logs_a{idem}, 'done')), '>', 10, '... requests completed on the old primary');

# --- outbox ---
my %published = map { split /\|/ } split /\n/, $new->safe_psql('postgres', q{SELECT m || '|' || id FROM ha.published});
my @pub_a = logged($logs_a{pub}, 'published');
is(scalar(grep { !exists $published{"a-$_"} } @pub_a), 0,
	'every publish committed on the old primary (' . scalar(@pub_a) . ') is on the new one');
my $all = $recv->wait_for(
	sub {
		my %ok = map { ($_->{body} =~ /"m": "([^"]+)"/)[0] => 1 } grep { $_->{status} == 200 } @{ $_[0] };
		$ok{'same-pid'} && !grep { !$ok{$_} } keys %published;
	},
	30);
ok($all, 'every committed event reached the receiver (' . scalar(keys %published) . ')');
ok(scalar(grep { $_->{body} =~ /"m": "same-pid"/ } $recv->records),
	'... the one claimed under the new relay\'s own pid too, long before its claim would expire');
my ($bad_key, $unknown, %count) = (0, 0);
for my $r ($recv->records)
{
	my ($m) = $r->{body} =~ /"m": "([^"]+)"/;
	next unless defined $m && $m ne 'same-pid';
	$count{$m}++;
	if (!exists $published{$m}) { $unknown++; }
	elsif ($r->{key} ne $published{$m}) { $bad_key++; }
}
my $dups = grep { $count{$_} > 1 } keys %count;
is($bad_key, 0, "every delivery carries the event id as Idempotency-Key ($dups events delivered more than once)");
# The receiver logs a request when it arrives: after $killed_at, only the
# new primary was sending.
my %redelivered = map { $_->{key} => 1 } grep { $_->{status} == 200 && $_->{t} > $killed_at * 1000 } $recv->records;
is(join(',', grep { !$redelivered{$_} } @in_flight), '',
	'each event in flight at the failover was sent again by the new primary, with its own id as Idempotency-Key');
is($unknown, 0, 'nothing arrived that the new primary does not know (no event of a lost transaction)');

# --- sagas ---
ok( $new->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM resilience.sagas WHERE state NOT IN ('completed', 'compensated')}),
	"every saga ends completed or compensated ($unfinished unfinished at the failover)");
my @saga_started = (logged($logs_a{saga}, 'started'), logged($logs_b{saga}, 'started'));
my ($last_started) = sort { $b <=> $a } @saga_started;
is( $new->safe_psql('postgres',
		qq{SELECT count(*) FROM resilience.sagas WHERE idempotency_key IN (SELECT 'trip-' || n FROM generate_series(1, $last_started) n)}),
	$last_started, "every saga started ($last_started) exists once");
is($new->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT saga_id, step, op FROM ha.saga_effects GROUP BY 1, 2, 3 HAVING count(*) > 1) d}),
	'0', 'no saga step or compensation was applied twice');
is($new->safe_psql('postgres', q{
	SELECT string_agg(DISTINCT format('%s: %s', s.state, e.effects), E'\n')
	  FROM resilience.sagas s
	  JOIN (SELECT saga_id, string_agg(step || ' ' || op, ', ' ORDER BY id) AS effects
	          FROM ha.saga_effects GROUP BY saga_id) e ON e.saga_id = s.id}),
	"compensated: a do, b do, b undo, a undo\ncompleted: a do, b do, c do",
	'each saga applied exactly its steps, or undid them in reverse');

# --- shared memory: the new primary's own ---
is($new->safe_psql('postgres', q{SELECT resilience.rate_limit('ha:rl', 3, 0.0001)}),
	't', 'rate limit ha:rl starts full on the new primary (not carried over)');
is($new->safe_psql('postgres', q{SELECT resilience.breaker_state('ha:br')}),
	'closed', 'breaker ha:br is closed there (its forced opening stayed on the old primary)');
is($new->safe_psql('postgres', q{SELECT resilience.bulkhead_acquire('ha:bh', 1)}),
	't', 'the bulkhead permit held on the old primary is free (its holder died with it)');
is($new->safe_psql('postgres', q{SELECT resilience.rate_limit('ha:rl-standby', 2, 0.0001)}),
	'f', 'what the standby itself used is still there: promotion does not reset shared memory');

$recv->stop;
$new->stop;
done_testing();
