# pg_upgrade from PostgreSQL 15 to the version under test (make test's
# upgrade suite: OLD_INSTALL is the 15 installation with resilience built for
# it; the new one is the PostgreSQL this file runs with).
#
# The 15 cluster has the extension in use: a held lease and a fence, an
# outbox backlog for an http route, a completed and an in-progress
# idempotency key, a saga waiting for an async reply, a rate-limit policy and
# a breaker's configuration.  Its worker is off while that state is built
# (nothing is delivered or driven before the upgrade), then both clusters'
# configurations list the database, so a worker that ran under pg_upgrade
# would deliver the backlog to the receiver.  After the upgrade:
#  - nothing ran during pg_upgrade (the receiver saw no request, the retained
#    server logs of pg_upgrade name no resilience worker);
#  - the lease is still held with its token; tokens keep increasing; the
#    fence still refuses an older token;
#  - the completed key replays its response, the in-progress key is still in
#    progress;
#  - the backlog is delivered, in order, each event once;
#  - the saga completes when its reply arrives;
#  - the policy and the breaker configuration are in force;
#  - a quota's usage is carried over and counted on.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Find;
use lib 'test/perl';
use OutboxReceiver;

my $old_install = $ENV{OLD_INSTALL}
  or BAIL_OUT('OLD_INSTALL (the PostgreSQL 15 installation) is not set: run this through make test');

my $recv = OutboxReceiver->new($PostgreSQL::Test::Utils::tmp_check);

my $old = PostgreSQL::Test::Cluster->new('old', install_path => $old_install);
$old->init;
$old->append_conf('postgresql.conf', q{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
});
$old->start;
like($old->safe_psql('postgres', 'SHOW server_version_num'), qr/^15/, 'the old cluster runs PostgreSQL 15');

$old->safe_psql('postgres', q{
CREATE EXTENSION resilience;
CREATE ROLE upg_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO upg_agent;
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql
  AS $$ SELECT jsonb_build_object('a', 'done') $$;
CREATE FUNCTION app.undo(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql
  AS $$ SELECT NULL::jsonb $$;
SET ROLE upg_agent;  -- sagas run as their definer, never a superuser
SELECT resilience.saga_define('upgrade', '[
  {"name": "a", "action": "app.act", "compensation": "app.undo"},
  {"name": "remote", "action": "async", "topic": "remote.commands", "timeout": "1 hour"}]');
RESET ROLE;
INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('tier', 3, 0.001);
INSERT INTO resilience.breaker_config (name, window_type, window_size, minimum_calls, failure_rate_threshold)
  VALUES ('payments', 'count', 4, 4, 50);
});
$old->safe_psql('postgres', "INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('upg.%', 'http', '" . $recv->url('/upg') . "', '{}')");

my $token = $old->safe_psql('postgres', q{SELECT resilience.lock_acquire('upg-lease', '1 hour', 'old-holder')});
like($token, qr/^\d+$/, "a lease is held on 15 (token $token)");
my $fenced = $old->safe_psql('postgres', q{SELECT resilience.lock_acquire('upg-other', '1 hour', 'old-holder')});
cmp_ok($fenced, '>', $token, 'a second lease gets a greater token');
$old->safe_psql('postgres', "SELECT resilience.fence('upg-resource', $fenced)");
$old->safe_psql('postgres', q{
SELECT outcome FROM resilience.idempotency_begin('upg', 'done', '{"n": 1}');
SELECT resilience.idempotency_complete('upg', 'done', '{"paid": true}', 201);
SELECT outcome FROM resilience.idempotency_begin('upg', 'open', '{"n": 2}', lock_timeout => '1 hour');
SELECT resilience.outbox_publish('upg.event', jsonb_build_object('n', i), 'k') FROM generate_series(1, 5) i;
});
my $saga = $old->safe_psql('postgres', q{SELECT resilience.saga_start('upgrade', '{}')});
# Drive the saga by hand (no worker here) until it waits for its reply.
$old->safe_psql('postgres', 'SET ROLE upg_agent; SELECT resilience.saga_tick()') for 1 .. 3;
is($old->safe_psql('postgres', "SELECT state FROM resilience.sagas WHERE id = $saga"),
	'running', 'the saga waits for its async reply on 15');
is($old->safe_psql('postgres', q{SELECT count(*) FROM resilience.outbox WHERE topic = 'upg.event'}),
	'5', 'five events wait in the outbox on 15');
is($old->safe_psql('postgres', q{SELECT resilience.rate_limit('u1', 'tier')}), 't', 'the policy admits on 15');
# a quota (rows changed in place, frozen): 3 of 5 used on 15, one of them by
# a new key's row added to a page that already holds rows
is($old->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE resilience.quota('upg:q' || (i % 2), 5, 'month')) FROM generate_series(1, 5) i}),
	'5', 'quotas count on 15');
$old->stop;

# Both clusters list the database from now on: a worker that started under
# pg_upgrade would relay the backlog.
$old->append_conf('postgresql.conf', q{resilience.database_names = 'postgres'});

my $new = PostgreSQL::Test::Cluster->new('new');
# 18's initdb enables data checksums by default; 15's did not, and
# pg_upgrade needs both alike.
my @initdb_extra = $new->pg_version >= 18 ? ('--no-data-checksums') : ();
$new->init(extra => [@initdb_extra]);
$new->append_conf('postgresql.conf', q{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
});

my $newbindir = $new->config_data('--bindir');
my $oldbindir = $old->config_data('--bindir');
command_ok(
	[
		'pg_upgrade', '--no-sync', '--retain',
		'-d', $old->data_dir, '-D', $new->data_dir,
		'-b', $oldbindir, '-B', $newbindir,
		'-s', $new->host, '-p', $old->port, '-P', $new->port
	],
	'pg_upgrade from 15 succeeds');

my @during = $recv->records;
is(scalar @during, 0, 'nothing was delivered while pg_upgrade ran');
my @upgrade_logs;
find(sub { push @upgrade_logs, $File::Find::name if /^pg_upgrade_server\.log$/ }, $new->data_dir);
ok(@upgrade_logs, 'pg_upgrade kept its server logs');
# the postmaster logs every background worker's exit: a launcher or worker
# that had started would show at pg_upgrade's shutdowns
unlike(join('', map { slurp_file($_) } @upgrade_logs), qr/background worker "resilience/,
	'no resilience worker started under binary upgrade');

$new->start;
my $major = $new->safe_psql('postgres', q{SELECT current_setting('server_version_num')::int / 10000});
cmp_ok($major, '>', 15, "the new cluster runs PostgreSQL $major");
$new->safe_psql('postgres', 'ALTER EXTENSION resilience UPDATE');

# leases and tokens
is($new->safe_psql('postgres', "SELECT resilience.lock_check('upg-lease', $token)"), 't',
	'the lease taken on 15 is still held with its token');
is($new->safe_psql('postgres', q{SELECT resilience.lock_acquire('upg-lease', '1 minute', 'other', wait => '0')} ), '',
	'and nobody else gets it');
is($new->safe_psql('postgres', "SELECT resilience.lock_release('upg-lease', $token)"), 't', 'its holder releases it');
my $token2 = $new->safe_psql('postgres', q{SELECT resilience.lock_acquire('upg-lease', '1 minute', 'new-holder')});
cmp_ok($token2, '>', $token, "tokens keep increasing ($token, then $token2)");
my ($rc, $out, $err) = $new->psql('postgres', "\\set VERBOSITY verbose\nSELECT resilience.fence('upg-resource', $token)");
like($err, qr/ERROR:  RS001/, "the fence still refuses token $token: it saw $fenced on 15");
is($new->safe_psql('postgres', "SELECT resilience.fence_check('upg-resource', $token2)"), 't',
	'and accepts the new one');

# idempotency keys
is($new->safe_psql('postgres', q{
	SELECT outcome || ' ' || response::text || ' ' || status_code
	  FROM resilience.idempotency_begin('upg', 'done', '{"n": 1}')}),
	'replay {"paid": true} 201', 'the key completed on 15 replays its response');
is($new->safe_psql('postgres', q{SELECT outcome FROM resilience.idempotency_begin('upg', 'open', '{"n": 2}')}),
	'in_progress', 'the key begun on 15 is still in progress');

# the outbox backlog
ok($recv->wait_for(sub { (grep { $_->{path} eq '/upg' && $_->{status} == 200 } @{ $_[0] }) >= 5 }, 60),
	'the backlog is delivered after the upgrade');
my @got = map { $_->{body} =~ /"n": (\d+)/ ? $1 : '?' } grep { $_->{path} eq '/upg' } $recv->records;
is("@got", '1 2 3 4 5', 'each event once, in order');

# the saga
$new->safe_psql('postgres', "SELECT resilience.saga_step_completed($saga, 'remote', '{\"ok\": true}')");
ok( $new->poll_query_until('postgres', "SELECT state = 'completed' FROM resilience.sagas WHERE id = $saga"),
	'the saga started on 15 completes on the new version');

# policies and breaker configuration
is($new->safe_psql('postgres', q{
	SELECT string_agg(resilience.rate_limit('u2', 'tier')::text, ',') FROM generate_series(1, 4)}),
	'true,true,true,false', 'the rate-limit policy is in force');
$new->safe_psql('postgres', q{SELECT resilience.breaker_record('payments', false) FROM generate_series(1, 4)});
is($new->safe_psql('postgres', q{SELECT resilience.breaker_state('payments')}), 'open',
	'the breaker configuration is in force (4 calls, 50%: open)');

# quotas: the usage carried over, and counted on from there
is($new->safe_psql('postgres', q{
	SELECT string_agg(resilience.quota('upg:q1', 5, 'month')::text, ',') FROM generate_series(1, 3)}),
	'true,true,false', 'a quota counts on from the usage it had on 15');
is($new->safe_psql('postgres', q{SELECT count(*) FROM resilience.quota_usage}), '2',
	'the quota rows were carried over, none added');

$new->stop;
$recv->stop;
done_testing();
