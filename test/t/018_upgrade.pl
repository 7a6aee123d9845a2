# Upgrades and DROP EXTENSION.
#  - resilience--0.1.sql is byte for byte the released script
#    (test/released.sha256), and there is an update path from every
#    released version to the default one;
#  - version 0.1 is installed, filled with data and used (with the new
#    library, as after a package upgrade and restart, the worker running);
#    ALTER EXTENSION resilience UPDATE keeps every row, and the updated
#    schema is the same as a fresh install's (objects, definitions,
#    privileges, comments);
#  - afterwards everything works: held leases, fences, replayed keys,
#    pending events, a running saga, policies, breaker configuration,
#    metrics (a lease that expired before the update is not counted as a
#    takeover, one that expires after it is), the new privileges;
#  - DROP EXTENSION, while the worker runs in that database, leaves no
#    object behind (only the empty schema and the two roles), the worker
#    goes back to waiting without an error and runs no job, and CREATE
#    EXTENSION afterwards starts cleanly.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Digest::SHA;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('upgrade');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'upg'
resilience.worker_naptime = '100ms'
resilience.reaper_interval = '200ms'
log_line_prefix = '%m [%p] %b '
});
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE monitor');
$node->safe_psql('monitor', 'CREATE EXTENSION resilience');

# ---- the scripts ----
my $sharedir = $node->safe_psql('postgres', q{SELECT setting FROM pg_config WHERE name = 'SHAREDIR'});
my $testdir = $ENV{TESTDIR} // '.';
my %released = map { my ($sum, $file) = split /\s+/; ($file => $sum) }
  grep { /\S/ } split /\n/, slurp_file("$testdir/test/released.sha256");
ok(scalar(keys %released) >= 1, 'the released scripts are listed');
for my $file (sort keys %released)
{
	is(Digest::SHA->new(256)->addfile("$sharedir/extension/$file")->hexdigest,
		$released{$file}, "$file is the released script, unchanged");
}
my $default = $node->safe_psql('postgres',
	q{SELECT default_version FROM pg_available_extensions WHERE name = 'resilience'});
for my $file (sort keys %released)
{
	my ($v) = $file =~ /^resilience--([0-9.]+)\.sql$/;
	next unless defined $v;
	is( $node->safe_psql(
			'postgres', qq{
		SELECT path IS NOT NULL FROM pg_extension_update_paths('resilience')
		 WHERE source = '$v' AND target = '$default'}),
		't', "an update path from $v to $default");
}

# ---- 0.1, filled and used ----
$node->safe_psql('postgres', 'CREATE DATABASE upg');
$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('upg', q{CREATE EXTENSION resilience VERSION '0.1'});
is($node->safe_psql('upg', q{SELECT extversion FROM pg_extension WHERE extname = 'resilience'}),
	'0.1', 'version 0.1 installed');
$node->safe_psql(
	'upg', q{
	CREATE ROLE upg_agent NOLOGIN IN ROLE resilience_admin;
	CREATE ROLE upg_app NOLOGIN IN ROLE resilience_user;
	CREATE SCHEMA trip AUTHORIZATION upg_agent;
	SET ROLE upg_agent;
	CREATE FUNCTION trip.reserve(saga_id bigint, ctx jsonb) RETURNS jsonb
	LANGUAGE sql AS $$ SELECT '{"reserved": true}'::jsonb $$;
	SELECT resilience.saga_define('checkout', $$[
	  {"name": "reserve", "action": "trip.reserve"},
	  {"name": "charge", "action": "async", "topic": "pay.commands", "timeout": "1 day", "max_attempts": 1}
	]$$);
	RESET ROLE;
	INSERT INTO resilience.rate_limit_policies (name, capacity, refill_per_sec) VALUES ('gold', 3, 0.001);
	INSERT INTO resilience.breaker_config (name, window_size, minimum_calls) VALUES ('payments', 7, 3);
	INSERT INTO resilience.outbox_routes (topic_pattern, sink, target)
	VALUES ('orders.%', 'queue', 'shipping'), ('pay.%', 'queue', 'payments');
	SELECT resilience.outbox_publish('orders.new', jsonb_build_object('n', i), 'o-' || i) FROM generate_series(1, 3) i;
	SELECT outcome FROM resilience.idempotency_begin('api', 'done', '{"a": 1}');
	SELECT resilience.idempotency_complete('api', 'done', '{"id": 42}', 201);
	SELECT resilience.inbox_accept('billing', 'msg-1');
});
my $saga = $node->safe_psql('upg', q{SELECT resilience.saga_start('checkout', '{"cart": 7}', 'cart-7')});
$node->poll_query_until('upg',
	qq{SELECT awaiting FROM resilience.sagas WHERE id = $saga})
  or die 'the worker did not run the saga on 0.1';
my $token = $node->safe_psql('upg', q{SELECT resilience.lock_acquire('leader', '1 day', 'node-a')});
$node->safe_psql('upg', qq{SELECT resilience.fence('ledger', $token)});
# on 0.1: a released lease, and one that expired unreleased (before the update)
my $t2 = $node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-1', '1 min', 'w1')});
$node->safe_psql('upg', qq{SELECT resilience.lock_release('job-1', $t2)});
$node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-2', '100 ms', 'w1')});
$node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-3', '10 s', 'w1')});  # held across the update, even on a slow machine
usleep(200_000);
# the new library on the 0.1 schema: takeover and release still work
my $t3 = $node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-2', '1 min', 'w2')});
ok($t3 > $t2, 'on 0.1, an expired lease is taken over with a higher token');
is($node->safe_psql('upg', qq{SELECT resilience.lock_release('job-2', $t3)}), 't', 'and released');
$node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-2', '100 ms', 'w3')});
usleep(200_000);    # job-2 expired (unreleased) before the update

# Rows of every table, without the columns an update adds.
# (the tables of 0.1: an update may add new, empty ones)
my @tables_01 = split /\n/,
  $node->safe_psql('upg',
	q{SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	   WHERE n.nspname = 'resilience' AND c.relkind = 'r' ORDER BY 1});
sub contents
{
	my ($db) = @_;
	my @tables = @tables_01;
	return join("\n",
		map {
			"$_: "
			  . $node->safe_psql($db,
				qq{SELECT coalesce(string_agg(j, ' | ' ORDER BY j), '')
				     FROM (SELECT (to_jsonb(t) - 'released_at' - 'owner_role' - 'search_path' - 'trace_context')::text AS j FROM resilience.$_ t) x})
		} @tables);
}
my $rows_before = contents('upg');
ok($rows_before =~ /sagas: \S/ && $rows_before =~ /outbox: \S/ && $rows_before =~ /leases: \S/,
	'0.1 holds sagas, events and leases');

# ---- the update ----
my $log_offset = -s $node->logfile;
$node->safe_psql('upg', 'ALTER EXTENSION resilience UPDATE');
is($node->safe_psql('upg', q{SELECT extversion FROM pg_extension WHERE extname = 'resilience'}),
	$default, "updated to $default");
is(contents('upg'), $rows_before, 'every row is still there');
# rows from 0.1 have no owner role: the first role to use them owns them
# (docs/operations.md, "Roles and tenants")
is( $node->safe_psql(
		'upg', q{
	SELECT (SELECT count(*) FROM resilience.leases WHERE owner_role IS NOT NULL)
	     + (SELECT count(*) FROM resilience.sagas WHERE owner_role IS NOT NULL)
	     + (SELECT count(*) FROM resilience.idempotency_keys WHERE owner_role IS NOT NULL)
	     + (SELECT count(*) FROM resilience.owners)}),
	'0', 'rows from 0.1 have no owner after the update');

# The updated schema is the one a fresh install makes.
$node->safe_psql('fresh', 'CREATE EXTENSION resilience');
my $schema_sql = q{
	SELECT string_agg(d, E'\n' ORDER BY d) FROM (
	  SELECT format('function %s %s %s strict=%s %s secdef=%s config=%s acl=%s returns=%s src=%s bin=%s comment=%s',
	                p.oid::regprocedure, p.prokind, p.provolatile, p.proisstrict, p.proparallel, p.prosecdef,
	                p.proconfig, p.proacl, pg_get_function_result(p.oid), md5(p.prosrc), p.probin,
	                obj_description(p.oid, 'pg_proc')) AS d
	    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'resilience'
	  UNION ALL
	  SELECT format('relation %s %s acl=%s options=%s comment=%s', c.relname, c.relkind, c.relacl, c.reloptions,
	                obj_description(c.oid, 'pg_class'))
	    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'resilience'
	  UNION ALL
	  SELECT format('column %s.%s %s notnull=%s default=%s comment=%s', c.relname, a.attname,
	                format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid),
	                col_description(c.oid, a.attnum))
	    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
	    LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
	   WHERE n.nspname = 'resilience' AND a.attnum > 0 AND NOT a.attisdropped
	  UNION ALL
	  SELECT 'index ' || pg_get_indexdef(i.indexrelid)
	    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
	   WHERE n.nspname = 'resilience'
	  UNION ALL
	  SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid)
	    FROM pg_constraint WHERE connamespace = 'resilience'::regnamespace
	  UNION ALL
	  SELECT 'trigger ' || pg_get_triggerdef(t.oid)
	    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
	   WHERE n.nspname = 'resilience' AND NOT t.tgisinternal
	  UNION ALL
	  SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid)
	    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'resilience' AND c.relkind = 'v'
	  UNION ALL
	  SELECT 'config ' || string_agg(x::regclass::text || '=' || coalesce(f, ''), ', ' ORDER BY x::regclass::text)
	    FROM pg_extension e, unnest(e.extconfig, e.extcondition) u(x, f) WHERE e.extname = 'resilience'
	  UNION ALL
	  SELECT 'schema acl=' || nspacl::text FROM pg_namespace WHERE nspname = 'resilience'
	) s};
my $upgraded_schema = $node->safe_psql('upg', $schema_sql);
my $fresh_schema = $node->safe_psql('fresh', $schema_sql);
ok(length($fresh_schema) > 1000, 'the schema description is not empty');
is($upgraded_schema, $fresh_schema, 'the updated schema is the same as a fresh install');

# ---- everything works after the update ----
sub scrape
{
	my $text = $node->safe_psql('upg', 'SELECT resilience.metrics()');
	my %v = map { /^(\S+) (\S+)$/ ? ($1 => $2) : () } split /\n/, $text;
	return \%v;
}
my $m0 = scrape();
is($node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-2', '1 min', 'w4') IS NOT NULL}), 't',
	'a lease that expired before the update is taken');
my $m1 = scrape();
is($m1->{resilience_lease_takeovers_total} - $m0->{resilience_lease_takeovers_total}, 0,
	'and not counted as a takeover (it may have been released)');
usleep(200_000) while $node->safe_psql('upg', q{SELECT expires_at > now() FROM resilience.leases WHERE name = 'job-3'}) eq 't';
is($node->safe_psql('upg', q{SELECT resilience.lock_acquire('job-3', '1 min', 'w4') IS NOT NULL}), 't',
	'a lease held across the update, then expired, is taken');
is(scrape()->{resilience_lease_takeovers_total} - $m1->{resilience_lease_takeovers_total}, 1,
	'and counted as a takeover');
is($node->safe_psql('upg', qq{SELECT resilience.lock_check('leader', $token)}), 't', 'the held lease is valid');
is($node->safe_psql('upg', qq{SET ROLE upg_app; SELECT resilience.lock_renew('leader', $token, '1 day')}), 't',
	'a lease from 0.1 is renewed by the first role that uses it');
is($node->safe_psql('upg', q{SELECT owner_role FROM resilience.leases WHERE name = 'leader'}), 'upg_app',
	'which owns it from then on');
is($node->safe_psql('upg', q{SELECT resilience.fence_check('ledger', } . ($token - 1) . ')'), 'f',
	'the fence refuses an older token');
is($node->safe_psql('upg', q{SELECT outcome || ' ' || response::text
	FROM resilience.idempotency_begin('api', 'done', '{"a": 1}')}),
	'replay {"id": 42}', 'a completed key replays');
is($node->safe_psql('upg', q{SET ROLE upg_app; SELECT outcome || ' ' || response::text
	FROM resilience.idempotency_begin('api', 'done', '{"a": 1}')}),
	'replay {"id": 42}', 'a key from 0.1 has no owner: another role replays it too');
is($node->safe_psql('upg', q{SELECT string_agg(payload->>'n', ',' ORDER BY payload->>'n')
	FROM resilience.outbox_claim('shipping', 10, '1 minute')}), '1,2,3', 'pending events are claimed');
is($node->safe_psql('upg', qq{SELECT resilience.saga_step_completed($saga, 'charge', '{}')}), 't',
	'the running saga takes its reply');
$node->poll_query_until('upg', qq{SELECT state = 'completed' FROM resilience.sagas WHERE id = $saga})
  or die 'the saga did not complete';
pass('and the worker completes it');
is($node->safe_psql('upg', q{SELECT string_agg(CASE WHEN r THEN 't' ELSE 'f' END, '') FROM (
	SELECT resilience.rate_limit('u1', 'gold') r FROM generate_series(1, 4)) x}), 'tttf', 'the policy limits');
$node->safe_psql('upg', q{SELECT resilience.breaker_allow('payments')});
is($node->safe_psql('upg', q{SELECT window_size FROM resilience.breakers WHERE name = 'payments'}), 7,
	'the breaker follows its configuration');
is($node->safe_psql('upg', q{SET ROLE upg_app; SELECT resilience.rate_limit('u2', 1, 1)}), 't',
	'resilience_user calls the API');
my ($ret, $out, $err) = $node->psql('upg', q{SET ROLE upg_app; SELECT resilience.rate_limit_reset('u2')});
like($err, qr/permission denied for function rate_limit_reset/, 'and not an admin function, after the update');
is($node->safe_psql('upg', q{SET ROLE upg_app;
	SELECT resilience.append_events('s-1', -1, ARRAY['{"type": "created"}']::jsonb[])}), 0,
	'event streams, new in 0.2, work for resilience_user');
is( $node->safe_psql('monitor',
		q{SELECT sum(failures) FROM resilience.workers WHERE database = 'upg'}),
	0, 'no job of the worker failed, before or after the update');

# ---- DROP EXTENSION while the worker runs ----
$node->poll_query_until('monitor',
	q{SELECT state IN ('idle', 'running') FROM resilience.workers WHERE database = 'upg' AND job = 'reaper'})
  or die 'the worker is not running its jobs';
$log_offset = -s $node->logfile;
$node->safe_psql('upg', 'DROP EXTENSION resilience');
is( $node->safe_psql(
		'upg', q{
	SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = 'resilience'::regnamespace)
	     + (SELECT count(*) FROM pg_proc WHERE pronamespace = 'resilience'::regnamespace)
	     + (SELECT count(*) FROM pg_type WHERE typnamespace = 'resilience'::regnamespace)
	     + (SELECT count(*) FROM pg_operator WHERE oprnamespace = 'resilience'::regnamespace)
	     + (SELECT count(*) FROM pg_extension WHERE extname = 'resilience')
	     + (SELECT count(*) FROM pg_event_trigger WHERE evtfoid IN (SELECT oid FROM pg_proc WHERE proname LIKE '%resilience%'))
	     + (SELECT count(*) FROM pg_init_privs i WHERE i.classoid = 'pg_proc'::regclass
	          AND NOT EXISTS (SELECT FROM pg_proc p WHERE p.oid = i.objoid))}),
	0, 'DROP EXTENSION leaves no object behind');
is($node->safe_psql('upg', q{SELECT count(*) FROM pg_namespace WHERE nspname = 'resilience'}), 1,
	'(the schema CREATE EXTENSION made stays, empty)');
$node->poll_query_until('monitor',
	q{SELECT state = 'waiting_for_extension' FROM resilience.workers WHERE database = 'upg' AND job = 'reaper'})
  or die 'the worker did not go back to waiting';
pass('the worker goes back to waiting for the extension');
my $runs = $node->safe_psql('monitor',
	q{SELECT sum(runs) || '/' || sum(failures) FROM resilience.workers WHERE database = 'upg'});
usleep(1_000_000);    # five reaper intervals
is($node->safe_psql('monitor',
		q{SELECT sum(runs) || '/' || sum(failures) FROM resilience.workers WHERE database = 'upg'}),
	$runs, 'and runs no job, and fails none, while the extension is gone');
is(join('', grep { /\b(?:ERROR|FATAL|PANIC):/ } split /^/m, slurp_file($node->logfile, $log_offset)),
	'', 'no error logged after the drop');

# ---- and CREATE EXTENSION again ----
$node->safe_psql('upg', 'CREATE EXTENSION resilience');
$node->poll_query_until('monitor',
	qq{SELECT sum(runs) > split_part('$runs', '/', 1)::bigint FROM resilience.workers WHERE database = 'upg'})
  or die 'the worker did not start its jobs again';
pass('after CREATE EXTENSION the worker runs its jobs again');
is($node->safe_psql('upg', q{SELECT count(*) FROM resilience.leases}), 0, 'on empty tables');
is($node->safe_psql('monitor', q{SELECT sum(failures) FROM resilience.workers WHERE database = 'upg'}), 0,
	'without a failure');

$node->stop;
done_testing();
