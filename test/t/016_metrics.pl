# resilience.metrics(): the Prometheus text exposition format, read back by
# the parser of the Prometheus Python client (Debian python3-prometheus-client,
# test/metrics_parse.py), and counters that move when things happen.
#  - every family has HELP and TYPE, the names are the documented ones, and
#    the whole text parses; label values with quotes, backslashes and
#    newlines come back intact;
#  - each counter moves by exactly what was done: rate-limit decisions per
#    policy, breaker calls and transitions, bulkhead outcomes, leases
#    (acquired, waits, takeovers), fences, idempotency outcomes, the inbox,
#    reaped rows, outbox published/delivered/retried/dead-lettered per route,
#    saga events and step retries, the worker's job runs;
#  - gauges show the state: keys in use and max_keys, breaker state, permits
#    in use and waiting, leases held, outbox backlog and oldest age, sagas
#    per state and stuck sagas, the worker's last run;
#  - facts counted at commit are not counted after a rollback, and counters
#    never go down (not across DROP/CREATE EXTENSION either);
#  - metric_samples() returns the same samples as rows;
#  - without shared_preload_libraries the text still parses, the
#    table-backed gauges work, nothing is counted.
# Counting happens in database "app", where no worker runs (every job is
# called by hand); the worker's own metrics are read in "postgres".
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use JSON::PP;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('metrics');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '100ms'
resilience.reaper_interval = '200ms'
resilience.max_keys = 5000
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION resilience');
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->safe_psql('app', 'CREATE EXTENSION resilience');

my $parser = ($ENV{TESTDIR} // '.') . '/test/metrics_parse.py';

# Parse a scrape with the Prometheus client's parser: [families], or dies
# with the parser's error.
sub parse_metrics
{
	my ($text) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ '/usr/bin/python3', $parser ], '<', \$text, '>', \$out, '2>', \$err)
	  or die "the Prometheus parser refused the text: $err";
	return decode_json($out);
}

# "name{k=v,...}" (labels sorted) => value, for every sample of a scrape.
sub samples_of
{
	my ($families) = @_;
	my %s;
	for my $f (@$families)
	{
		for my $sample (@{ $f->{samples} })
		{
			my $l = $sample->{labels};
			my $key = $sample->{name} . '{'
			  . join(',', map { "$_=$l->{$_}" } sort keys %$l) . '}';
			$s{$key} = $sample->{value};
		}
	}
	return \%s;
}

# Scrape $db and parse it: {text, families, samples}.
sub scrape
{
	my ($db) = @_;
	$db //= 'app';
	my $text = $node->safe_psql($db, 'SELECT resilience.metrics()') . "\n";
	my $families = parse_metrics($text);
	return { text => $text, families => $families, samples => samples_of($families) };
}

# The value of one sample (0 when absent: a counter that never moved).
sub val
{
	my ($scrape, $key) = @_;
	return $scrape->{samples}{$key} // 0;
}

# Check that each counter moved by exactly the delta given.
sub moved
{
	my ($before, $after, %deltas) = @_;
	for my $key (sort keys %deltas)
	{
		(my $name = $key) =~ s/\n/\\n/g;
		is(val($after, $key) - val($before, $key), $deltas{$key}, "$name moved by $deltas{$key}");
	}
}

# ---- the format ----
# (the parser is a real check: it refuses what the format does not allow)
ok(!eval { parse_metrics(qq{x_total{a="b} 1\n}); 1 }, 'the parser refuses an unterminated label');
ok(!eval { parse_metrics(qq{x abc\n}); 1 }, 'the parser refuses a malformed sample');
my $s0 = scrape();
my %types = map { $_->{name} => $_->{type} } @{ $s0->{families} };
my @expected = qw(
  resilience_info
  resilience_rate_limit_decisions resilience_rate_limit_keys resilience_rate_limit_max_keys
  resilience_rate_limit_evictions resilience_rate_limit_table_full
  resilience_breaker_calls resilience_breaker_transitions resilience_breaker_state
  resilience_breaker_failure_rate_percent resilience_breaker_slow_call_rate_percent
  resilience_breaker_window_calls
  resilience_bulkhead_acquisitions resilience_bulkhead_permits_in_use resilience_bulkhead_waiting
  resilience_bulkhead_max_concurrent
  resilience_lease_acquisitions resilience_lease_takeovers resilience_lease_waits
  resilience_fence_rejections resilience_leases_held
  resilience_idempotency_begins resilience_idempotency_results resilience_inbox_messages
  resilience_reaper_removed
  resilience_outbox_published resilience_outbox_delivered resilience_outbox_retries
  resilience_outbox_dead_lettered resilience_outbox_backlog resilience_outbox_oldest_pending_age_seconds
  resilience_outbox_in_flight resilience_outbox_retrying resilience_outbox_dead_letters
  resilience_outbox_breaker_state resilience_outbox_route_info
  resilience_saga_events resilience_saga_step_retries resilience_sagas resilience_sagas_stuck
  resilience_stream_events_appended resilience_stream_conflicts
  resilience_schedule_runs resilience_schedule_lag_seconds resilience_schedule_slots_started
  resilience_schedule_last_success_timestamp_seconds resilience_schedule_next_slot_timestamp_seconds
  resilience_quota_decisions
  resilience_worker_job_runs resilience_worker_job_seconds resilience_worker_state
  resilience_worker_job_last_run_timestamp_seconds resilience_worker_job_last_duration_seconds
  resilience_worker_job_last_error_timestamp_seconds resilience_worker_job_last_error_info
  resilience_metric_series resilience_metric_series_max resilience_metric_series_dropped);
is_deeply([ sort keys %types ], [ sort @expected ], 'the families are the documented ones');
is(scalar(grep { $types{$_} ne 'counter' && $types{$_} ne 'gauge' } keys %types),
	0, 'every family is a counter or a gauge');
# (the parser drops the _total suffix of a counter family's name; the text has it)
for my $name (sort keys %types)
{
	my $full = $types{$name} eq 'counter' ? "${name}_total" : $name;
	ok($s0->{text} =~ /^# HELP \Q$full\E \S.*\n# TYPE \Q$full\E $types{$name}\n/m,
		"$full: HELP then TYPE");
}
my @lines = grep { !/^#/ } split /\n/, $s0->{text};
is(scalar(grep { !/^[a-z_]+(\{[a-z_]+="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-z_]+="(?:[^"\\\n]|\\[\\"n])*")*\})? -?[0-9.e+]+$/ } @lines),
	0, 'every sample line is name{labels} value');
is(scalar(@lines), scalar(keys %{ $s0->{samples} }), 'no sample appears twice');
my @type_lines = ($s0->{text} =~ /^# TYPE (\S+) /mg);
my %seen_type;
is(scalar(grep { $seen_type{$_}++ } @type_lines), 0, 'no family appears twice');
is(val($s0, 'resilience_info{shared_preload_libraries=true,version=0.2}'), 1, 'resilience_info');
is(val($s0, 'resilience_rate_limit_max_keys{}'), 5000, 'max_keys is resilience.max_keys');

# every metric the example alert rules of docs/monitoring.md use exists
my $doc = slurp_file(($ENV{TESTDIR} // '.') . '/docs/monitoring.md');
my ($rules) = $doc =~ /^## Example alert rules\n.*?^```yaml\n(.*?)^```/ms;
ok(defined $rules && $rules =~ /alert: /, 'the alert rules are in docs/monitoring.md');
my %in_rules = map { $_ => 1 } ($rules // '') =~ /\b(resilience_[a-z_]+)/g;
my %exposed = map { ($_ => 1, "${_}_total" => 1) } keys %types;
is_deeply([ grep { !$exposed{$_} } sort keys %in_rules ], [], 'the alert rules name only existing metrics');
# ---- rate limits ----
$node->safe_psql('app',
	q{INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('tier-1', 2, 0.001)});
my $before = scrape();
$node->safe_psql('app', q{
	SELECT resilience.rate_limit('user-a', 'tier-1') FROM generate_series(1, 3);
	SELECT resilience.rate_limit('inline-a', 1, 0.001);
	SELECT resilience.rate_limit('inline-a', 1, 0.001);
	SELECT resilience.rate_limit('inline-b', 1, 0.001);
	SELECT resilience.rate_limit_check('inline-b', 1, 0.001, 0);   -- a peek: not a decision
});
my $after = scrape();
moved($before, $after,
	'resilience_rate_limit_decisions_total{decision=allowed,policy=tier-1}' => 2,
	'resilience_rate_limit_decisions_total{decision=denied,policy=tier-1}' => 1,
	'resilience_rate_limit_decisions_total{decision=allowed,policy=}' => 2,
	'resilience_rate_limit_decisions_total{decision=denied,policy=}' => 1,
	'resilience_rate_limit_keys{}' => 3);

# ---- breakers, and label escaping ----
my $odd = qq{pay"ments\\eu\nwest};
(my $odd_sql = $odd) =~ s/'/''/g;
$before = $after;
$node->safe_psql('app', qq{
	SELECT resilience.breaker_record(E'pay"ments\\\\eu\\nwest', true, '1 ms');
	SELECT resilience.breaker_record(E'pay"ments\\\\eu\\nwest', false, '1 ms');
	SELECT resilience.breaker_force_open(E'pay"ments\\\\eu\\nwest');
	SELECT resilience.breaker_allow(E'pay"ments\\\\eu\\nwest');
	SELECT resilience.breaker_allow(E'pay"ments\\\\eu\\nwest');
});
$after = scrape();
is($node->safe_psql('app', q{SELECT count(*) FROM resilience.breakers WHERE name = E'pay"ments\\\\eu\nwest'}),
	1, 'the breaker with an odd name exists');
moved($before, $after,
	"resilience_breaker_calls_total{breaker=$odd,outcome=success}" => 1,
	"resilience_breaker_calls_total{breaker=$odd,outcome=failure}" => 1,
	"resilience_breaker_calls_total{breaker=$odd,outcome=not_permitted}" => 2,
	"resilience_breaker_transitions_total{breaker=$odd,state=forced_open}" => 1);
is(val($after, "resilience_breaker_state{breaker=$odd,state=forced_open}"), 1,
	'breaker state gauge: forced_open is 1 (the name came back through escaping intact)');
is(val($after, "resilience_breaker_state{breaker=$odd,state=closed}"), 0, 'closed is 0');
like($after->{text}, qr/breaker="pay\\"ments\\\\eu\\nwest"/, 'quote, backslash and newline escaped in the text');
$before = $after;
$node->safe_psql('app', qq{SELECT resilience.breaker_reset(E'pay"ments\\\\eu\\nwest')});
$after = scrape();
moved($before, $after, "resilience_breaker_transitions_total{breaker=$odd,state=closed}" => 1);

# ---- bulkheads ----
my $holder = $node->background_psql('app');
$holder->query_safe(q{SELECT resilience.bulkhead_acquire_session('db-pool', 1)});
my $waiter = $node->background_psql('app');
$waiter->query_until(qr/waiting/, qq{\\echo waiting\nSELECT resilience.bulkhead_acquire('db-pool', 1, '30 s');\n});
$node->poll_query_until('app', q{SELECT waiting = 1 FROM resilience.bulkheads WHERE name = 'db-pool'})
  or die 'the waiter never waited';
$before = scrape();
is(val($before, 'resilience_bulkhead_permits_in_use{bulkhead=db-pool}'), 1, 'one permit in use');
is(val($before, 'resilience_bulkhead_waiting{bulkhead=db-pool}'), 1, 'one session waiting');
is(val($before, 'resilience_bulkhead_max_concurrent{bulkhead=db-pool}'), 1, 'max_concurrent');
$node->safe_psql('app', q{
	SELECT resilience.bulkhead_acquire('db-pool', 1);             -- rejected at once
	SELECT resilience.bulkhead_acquire('db-pool', 1, '50 ms');    -- times out
});
$holder->query_safe(q{SELECT resilience.bulkhead_release('db-pool')});
$waiter->quit;
$holder->quit;
$after = scrape();
moved($before, $after,
	'resilience_bulkhead_acquisitions_total{bulkhead=db-pool,outcome=rejected}' => 1,
	'resilience_bulkhead_acquisitions_total{bulkhead=db-pool,outcome=timed_out}' => 1,
	'resilience_bulkhead_acquisitions_total{bulkhead=db-pool,outcome=acquired}' => 1);  # the waiter's
is(val($s0, 'resilience_bulkhead_acquisitions_total{bulkhead=db-pool,outcome=acquired}')
	  + 1, val($before, 'resilience_bulkhead_acquisitions_total{bulkhead=db-pool,outcome=acquired}'),
	"the holder's permit was counted");

# ---- leases and fences ----
$before = $after;
# 'a' holds it for 5 s: room for a slow machine between the calls below
$node->safe_psql('app', q{SELECT resilience.lock_acquire('job', '5 s', 'a')});
is(val(scrape(), 'resilience_leases_held{}'), 1, 'one lease held');
$node->safe_psql('app', q{SELECT resilience.lock_acquire('job', '1 s', 'b')});           # refused
$node->safe_psql('app', q{SELECT resilience.lock_acquire('job', '1 s', 'b', '50 ms')});  # waits, refused
usleep(200_000)
  while $node->safe_psql('app', q{SELECT expires_at > clock_timestamp() FROM resilience.leases WHERE name = 'job'}) eq 't';
# 'a' let it expire: 'c' takes it over; 'c' releases it: 'd' takes it, no takeover
my $token = $node->safe_psql('app', q{SELECT resilience.lock_acquire('job', '1 min', 'c')});
$node->safe_psql('app', qq{SELECT resilience.lock_release('job', $token)});
$node->safe_psql('app', q{SELECT resilience.lock_acquire('job', '1 min', 'd')});
# (tokens that were issued: a fence refuses one never issued)
$node->safe_psql('app', qq{
	SELECT resilience.fence('disk', $token);
	SELECT resilience.fence_check('disk', $token - 1);
	SELECT resilience.fence_check('disk', $token - 2);
	SELECT resilience.fence_check('disk', $token + 1);
});
$after = scrape();
moved($before, $after,
	'resilience_lease_acquisitions_total{outcome=acquired}' => 3,
	'resilience_lease_acquisitions_total{outcome=not_acquired}' => 2,
	'resilience_lease_waits_total{}' => 1,
	'resilience_lease_takeovers_total{}' => 1,
	'resilience_fence_rejections_total{}' => 2,
	'resilience_leases_held{}' => 1);

# ---- idempotency keys and the inbox ----
$before = $after;
$node->safe_psql('app', q{
	SELECT outcome FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 1}');
	SELECT resilience.idempotency_complete('pay', 'k1', '{"ok": true}', 201);
	SELECT outcome FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 1}');   -- replay
	SELECT outcome FROM resilience.idempotency_begin('pay', 'k1', '{"amount": 2}');   -- mismatch
	SELECT outcome FROM resilience.idempotency_begin('pay', 'k2', '{}');
	SELECT resilience.idempotency_fail('pay', 'k2', '{"e": 1}', true);               -- retry
	SELECT outcome FROM resilience.idempotency_begin('pay', 'k3', '{}');
	SELECT resilience.idempotency_fail('pay', 'k3', '{"e": 2}', false);              -- failed
	SELECT resilience.inbox_accept('billing', 'm1');
	SELECT resilience.inbox_accept('billing', 'm1');
	SELECT resilience.inbox_accept('billing', 'm2', '1 ms');
});
usleep(20_000);
$node->safe_psql('app', q{SELECT * FROM resilience.run_reaper()});
$after = scrape();
moved($before, $after,
	'resilience_idempotency_begins_total{outcome=proceed}' => 3,
	'resilience_idempotency_begins_total{outcome=replay}' => 1,
	'resilience_idempotency_begins_total{outcome=mismatch}' => 1,
	'resilience_idempotency_begins_total{outcome=in_progress}' => 0,
	'resilience_idempotency_results_total{result=completed}' => 1,
	'resilience_idempotency_results_total{result=retry}' => 1,
	'resilience_idempotency_results_total{result=failed}' => 1,
	'resilience_inbox_messages_total{result=accepted}' => 2,
	'resilience_inbox_messages_total{result=duplicate}' => 1,
	'resilience_reaper_removed_total{item=inbox}' => 1);

# ---- the outbox ----
$node->safe_psql('app', q{
	INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
	VALUES ('orders.%', 'queue', 'shipping', '{"max_attempts": 2}')});
my $route = $node->safe_psql('app', q{SELECT id FROM resilience.outbox_routes WHERE target = 'shipping'});
$before = scrape();
$node->safe_psql('app', q{
	SELECT resilience.outbox_publish('orders.new', '{"n": 1}', 'o-1');
	SELECT resilience.outbox_publish('orders.new', '{"n": 2}', 'o-2');
	SELECT resilience.outbox_publish('orders.new', '{"n": 3}', 'o-3');
	BEGIN;
	SELECT resilience.outbox_publish('orders.new', '{"n": 4}', 'o-4');   -- never committed
	ROLLBACK;
	SELECT resilience.outbox_publish('nobody.listens', '{}');
});
usleep(50_000);
my $mid = scrape();
is(val($mid, "resilience_outbox_backlog{route_id=$route}"), 3, 'backlog of the route: 3');
is(val($mid, 'resilience_outbox_backlog{route_id=unrouted}'), 1, 'one event no route matched');
ok(val($mid, "resilience_outbox_oldest_pending_age_seconds{route_id=$route}") > 0.04,
	'oldest pending age counts from publication');
is(val($mid, "resilience_outbox_route_info{enabled=true,host=shipping,route_id=$route,sink=queue,topic_pattern=orders.%}"),
	1, 'route info');
$node->safe_psql('app', q{
	SELECT count(*) FROM resilience.outbox_claim('shipping', 10, '1 min');
	SELECT resilience.outbox_ack('shipping', ARRAY(SELECT id FROM resilience.outbox WHERE key = 'o-1'));
	SELECT resilience.outbox_nack('shipping', (SELECT id FROM resilience.outbox WHERE key = 'o-2'), '0 s');
	SELECT resilience.outbox_nack('shipping', (SELECT id FROM resilience.outbox WHERE key = 'o-3'), '0 s');
	SELECT count(*) FROM resilience.outbox_claim('shipping', 10, '1 min');
	SELECT resilience.outbox_nack('shipping', (SELECT id FROM resilience.outbox WHERE key = 'o-3'), '0 s');
});
$after = scrape();
moved($mid, $after,
	"resilience_outbox_delivered_total{route_id=$route}" => 1,
	"resilience_outbox_retries_total{route_id=$route}" => 2,
	"resilience_outbox_dead_lettered_total{route_id=$route}" => 1,
	"resilience_outbox_dead_letters{route_id=$route}" => 1,
	"resilience_outbox_backlog{route_id=$route}" => -2,
	"resilience_outbox_in_flight{route_id=$route}" => 1);
moved($before, $after, 'resilience_outbox_published_total{}' => 4);
# a route's credentials never reach the monitoring system
$node->safe_psql('app', q{
	INSERT INTO resilience.outbox_routes (topic_pattern, sink, target)
	VALUES ('hooks.%', 'http', 'http://bob:s3cret@127.0.0.1:9/hook?token=abc'),
	       ('slack.%', 'http', 'http://127.0.0.1:9/services/T0000/B0000/XoXoSlackToken')});
my $routes = scrape();
is(scalar(grep { /resilience_outbox_route_info\{.*host=127\.0\.0\.1,.*sink=http,/ } keys %{ $routes->{samples} }),
	2, 'http routes are listed by host');
unlike($routes->{text}, qr/s3cret|token=abc/, 'no credentials in the scrape');
unlike($routes->{text}, qr/XoXoSlackToken|services\/T0000/, 'no target path in the scrape (webhook URLs carry tokens there)');
$node->safe_psql('app', q{DELETE FROM resilience.outbox_routes WHERE sink = 'http'});

# ---- sagas ----
$node->safe_psql('app', q{
	CREATE ROLE saga_agent NOLOGIN IN ROLE resilience_admin;
	CREATE SCHEMA trip AUTHORIZATION saga_agent;
	SET ROLE saga_agent;
	CREATE FUNCTION trip.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
	BEGIN
		IF ctx ->> 'fail' = ctx #>> '{_saga,step}'
		   AND (ctx #>> '{_saga,attempt}')::int <= coalesce((ctx ->> 'times')::int, 1000) THEN
			RAISE EXCEPTION 'step % fails', ctx ->> 'fail'
				USING ERRCODE = coalesce(ctx ->> 'sqlstate', 'P0001');
		END IF;
		RETURN '{}';
	END $$;
	CREATE FUNCTION trip.undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
	SELECT resilience.saga_define('trip', '[
		{"name": "flight", "action": "trip.act", "compensation": "trip.undo",
		 "backoff": {"base": "10 ms", "cap": "10 ms"}},
		{"name": "hotel", "action": "trip.act", "compensation": "trip.undo",
		 "backoff": {"base": "10 ms", "cap": "10 ms"}}]');
	SELECT resilience.saga_define('slow', '[
		{"name": "wait", "action": "trip.act", "backoff": {"base": "1 h", "cap": "1 h"}}]');
});
$before = scrape();
$node->safe_psql('app', q{
	SELECT resilience.saga_start('trip', '{}');
	SELECT resilience.saga_start('trip', '{"fail": "hotel", "sqlstate": "40001", "times": 1}');
	SELECT resilience.saga_start('trip', '{"fail": "hotel"}');
	SELECT resilience.saga_start('slow', '{"fail": "wait", "sqlstate": "40001"}');
	BEGIN;
	SELECT resilience.saga_start('trip', '{}');   -- rolled back: never counted
	ROLLBACK;
});
# drive them by hand: no worker runs in "app"
for (1 .. 50)
{
	$node->safe_psql('app', 'CALL resilience.saga_run()');
	last
	  if $node->safe_psql('app',
		q{SELECT count(*) FROM resilience.sagas WHERE name = 'trip' AND finished_at IS NULL}) == 0;
	usleep(20_000);
}
$after = scrape();
moved($before, $after,
	'resilience_saga_events_total{event=saga_started,saga=trip}' => 3,
	'resilience_saga_events_total{event=saga_completed,saga=trip}' => 2,
	'resilience_saga_events_total{event=saga_compensated,saga=trip}' => 1,
	'resilience_saga_events_total{event=step_compensated,saga=trip}' => 1,
	'resilience_saga_events_total{event=step_completed,saga=trip}' => 5,
	'resilience_saga_events_total{event=saga_started,saga=slow}' => 1,
	'resilience_saga_step_retries_total{kind=action,saga=trip}' => 1,
	'resilience_saga_step_retries_total{kind=action,saga=slow}' => 1);
is(val($after, 'resilience_sagas{saga=slow,state=running}'), 1, 'one unfinished saga, waiting for its retry');
is(val($after, 'resilience_sagas{saga=trip,state=running}'), 0, 'finished sagas are not in resilience_sagas');
is(val($after, 'resilience_sagas_stuck{saga=slow,state=running}'), 0, 'not stuck yet');
my $stuck = parse_metrics($node->safe_psql('app',
	q{SET resilience.saga_stuck_after = 0; SELECT resilience.metrics()}) . "\n");
is(samples_of($stuck)->{'resilience_sagas_stuck{saga=slow,state=running}'}, 1,
	'stuck once it has made no progress for saga_stuck_after');

# ---- event streams ----
$before = scrape();
$node->safe_psql('app', q{
	SELECT resilience.append_events('cart-1', -1, ARRAY['{"type": "opened"}', '{"type": "added"}']::jsonb[]);
	SELECT resilience.append_events('cart-1', 1, ARRAY['{"type": "paid"}']::jsonb[]);
	BEGIN;
	SELECT resilience.append_events('cart-2', -1, ARRAY['{"type": "opened"}']::jsonb[]);   -- rolled back
	ROLLBACK;
});
my ($conflict_ret) = $node->psql('app',
	q{SELECT resilience.append_events('cart-1', 0, ARRAY['{"type": "late"}']::jsonb[])});
isnt($conflict_ret, 0, 'an append at a stale version fails');
$after = scrape();
moved($before, $after,
	'resilience_stream_events_appended_total{}' => 3,
	'resilience_stream_conflicts_total{}' => 1);

# ---- rollbacks, monotonic counters, metric_samples ----
$before = scrape();
$node->safe_psql('app', q{
	BEGIN;
	SELECT resilience.inbox_accept('billing', 'm9');   -- a decision: counted now
	SELECT resilience.outbox_publish('orders.new', '{}');   -- a fact: only at commit
	ROLLBACK;
});
$after = scrape();
moved($before, $after,
	'resilience_inbox_messages_total{result=accepted}' => 1,
	'resilience_outbox_published_total{}' => 0);
$node->safe_psql('app', 'DROP EXTENSION resilience');
$node->safe_psql('app', 'CREATE EXTENSION resilience');
my $recreated = scrape();
my @went_down = grep {
	my $k = $_;
	(grep { $k =~ /^$_(?:_total)?\{/ } map { $_->{name} } grep { $_->{type} eq 'counter' } @{ $after->{families} })
	  && val($recreated, $k) < $after->{samples}{$k}
} keys %{ $after->{samples} };
is_deeply(\@went_down, [], 'no counter went down across DROP and CREATE EXTENSION');
is(val($recreated, 'resilience_outbox_published_total{}'), val($after, 'resilience_outbox_published_total{}'),
	'the counters of this database are still there');
is( $node->safe_psql('app', 'SELECT count(*) FROM resilience.metric_samples()'),
	scalar(keys %{ $recreated->{samples} }),
	'metric_samples() has one row per sample of metrics()');
is( $node->safe_psql('app',
		q{SELECT value FROM resilience.metric_samples() WHERE metric = 'resilience_outbox_published_total'}),
	val($recreated, 'resilience_outbox_published_total{}'),
	'and the same values');

# ---- the worker (database "postgres") ----
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM resilience.workers WHERE job = 'reaper' AND runs >= 2})
  or die 'the reaper never ran';
my $w1 = scrape('postgres');
$node->poll_query_until('postgres',
	qq{SELECT runs > } . $node->safe_psql('postgres', q{SELECT runs FROM resilience.workers WHERE job = 'reaper'})
	  . q{ FROM resilience.workers WHERE job = 'reaper'})
  or die 'the reaper did not run again';
my $w2 = scrape('postgres');
ok(val($w2, 'resilience_worker_job_runs_total{job=reaper,result=success}')
	  > val($w1, 'resilience_worker_job_runs_total{job=reaper,result=success}'),
	'reaper runs are counted');
ok(val($w2, 'resilience_worker_job_seconds_total{job=reaper}') > 0, 'and their duration');
is(val($w2, 'resilience_worker_state{state=idle}') + val($w2, 'resilience_worker_state{state=running}'),
	1, 'the worker is idle or running');
ok(val($w2, 'resilience_worker_job_last_run_timestamp_seconds{job=reaper}') > time() - 60,
	'last run of the reaper is recent');
is(val(scrape('app'), 'resilience_worker_job_runs_total{job=reaper,result=success}'), 0,
	'and not in a database it does not serve');

$node->stop;

# ---- without shared_preload_libraries ----
# The table-backed gauges still work, nothing is counted, the text parses.
my $plain = PostgreSQL::Test::Cluster->new('metrics_plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION resilience');
$plain->safe_psql('postgres', q{
	INSERT INTO resilience.outbox_routes (topic_pattern, sink, target) VALUES ('a.%', 'queue', 'c');
	SELECT resilience.outbox_publish('a.b', '{}');
	SELECT resilience.inbox_accept('c', 'm');
	SELECT count(*) FROM resilience.run_reaper();
});
my $ptext = $plain->safe_psql('postgres', 'SELECT resilience.metrics()') . "\n";
my $psamples = samples_of(parse_metrics($ptext));
is($psamples->{'resilience_info{shared_preload_libraries=false,version=0.2}'}, 1,
	'without preloading: resilience_info says so');
is($psamples->{'resilience_outbox_backlog{route_id=1}'}, 1, 'table-backed gauges work');
is($psamples->{'resilience_inbox_messages_total{result=accepted}'}, 0, 'nothing is counted');
ok(!exists $psamples->{'resilience_rate_limit_keys{}'}, 'shared-memory gauges are absent');
$plain->stop;

done_testing();
