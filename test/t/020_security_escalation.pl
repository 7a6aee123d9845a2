# A database owner must never get code run as a superuser by the workers.
#
# A plain LOGIN role (no SUPERUSER, no CREATEDB) owns "appdb", a database
# listed in resilience.database_names.  It plants, in public and in a schema
# it puts first on the database's search_path (ALTER DATABASE ... SET
# search_path, and ALTER ROLE ... SET search_path for itself), objects named
# like what the workers call: functions, aggregates (count, min, ...),
# operators (=, <, ->>, ...), types and casts.  Each of them, if it ever runs,
# logs "PWNED" with the role it runs as and whether that role is a superuser,
# writes the same to a table, and tries ALTER ROLE ... SUPERUSER.  The
# workers then run every job with work to do (expired keys for the reaper,
# an outbox event for the relay, a saga with a SQL step); nothing planted
# may run as a superuser (or as anyone but the owner itself), and the owner
# stays a plain role.
#
# Also: ALTER DATABASE ... RENAME / DROP DATABASE attempts that PostgreSQL
# refuses (not the owner: 42501; no CREATEDB: 42501; in a transaction block:
# 25001) must not make the database's worker leave or restart.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $node = PostgreSQL::Test::Cluster->new('escalation');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'appdb, otherdb'
resilience.worker_naptime = '100ms'
resilience.reaper_interval = '200ms'
resilience.saga_interval = '200ms'
resilience.relay_interval = '200ms'
log_line_prefix = '%m [%p] %b %u '
log_min_messages = warning
});
$node->start;

$node->safe_psql('postgres', q{
CREATE ROLE dbowner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE appdb OWNER dbowner;
CREATE DATABASE otherdb;
CREATE DATABASE monitor;
});
$node->safe_psql('monitor', 'CREATE EXTENSION resilience');
$node->safe_psql('otherdb', 'CREATE EXTENSION resilience');

# The application: the extension (created by the superuser), a saga defined
# by a role of its own, a notify route.
$node->safe_psql('appdb', q{
CREATE EXTENSION resilience;
CREATE ROLE esc_agent NOLOGIN IN ROLE resilience_admin;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO esc_agent;
CREATE TABLE app.done (saga_id bigint);
GRANT INSERT ON app.done TO esc_agent;
CREATE FUNCTION app.act(saga_id bigint, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO app.done VALUES (saga_id);
    RETURN jsonb_build_object('ok', true);
END $$;
SET ROLE esc_agent;
SELECT resilience.saga_define('esc', '[{"name": "a", "action": "app.act"}]');
RESET ROLE;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options)
VALUES ('esc.%', 'notify', 'esc_channel', '{}');
});

# The owner plants its objects.  Everything here is qualified: the planted
# names shadow the built-in ones for the owner too, once its path is set.
my $plant = q{
CREATE TABLE public.pwned (who name, su boolean, what text);
GRANT INSERT, SELECT ON public.pwned TO PUBLIC;
CREATE FUNCTION public.pwn(what pg_catalog.text) RETURNS pg_catalog.void
LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
DECLARE
    su boolean;
BEGIN
    SELECT r.rolsuper INTO su FROM pg_catalog.pg_roles r
     WHERE r.rolname OPERATOR(pg_catalog.=) current_user;
    RAISE WARNING 'PWNED who=% su=% what=%', current_user, su, what;
    BEGIN
        INSERT INTO public.pwned VALUES (current_user, su, what);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        EXECUTE 'ALTER ROLE dbowner SUPERUSER';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END $f$;
GRANT EXECUTE ON FUNCTION public.pwn(pg_catalog.text) TO PUBLIC;
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO PUBLIC;
};

# Functions named like the built-ins the workers' SQL uses, in both schemas.
my @functions = (
	[ 'now',                '',                                   'pg_catalog.timestamptz', 'pg_catalog.now()' ],
	[ 'clock_timestamp',    '',                                   'pg_catalog.timestamptz', 'pg_catalog.clock_timestamp()' ],
	[ 'current_setting',    'pg_catalog.text',                    'pg_catalog.text',        'NULL' ],
	[ 'current_setting',    'pg_catalog.text, pg_catalog.bool',   'pg_catalog.text',        'NULL' ],
	[ 'nextval',            'pg_catalog.regclass',                'pg_catalog.int8',        '0' ],
	[ 'octet_length',       'pg_catalog.text',                    'pg_catalog.int4',        '0' ],
	[ 'date_part',          'pg_catalog.text, pg_catalog.interval', 'pg_catalog.float8',    '0' ],
	[ 'pg_notify',          'pg_catalog.text, pg_catalog.text',   'pg_catalog.void',        'NULL' ],
	[ 'jsonb_build_object', 'VARIADIC pg_catalog.text[]',         'pg_catalog.jsonb',       'NULL' ],
	[ 'jsonb_array_elements', 'pg_catalog.jsonb',                 'SETOF pg_catalog.jsonb', 'NULL' ],
	[ 'jsonb_array_elements_text', 'pg_catalog.jsonb',            'SETOF pg_catalog.text',  'NULL' ],
	[ 'to_jsonb',           'anyelement',                         'pg_catalog.jsonb',       'NULL' ],
	[ 'set_config',         'pg_catalog.text, pg_catalog.text, pg_catalog.bool', 'pg_catalog.text', 'NULL' ],
	[ 'pg_has_role',        'pg_catalog.oid, pg_catalog.oid, pg_catalog.text', 'pg_catalog.bool', 'true' ],
	[ 'current_database',   '',                                   'pg_catalog.name',        'NULL' ],
	[ 'run_reaper',         '',                                   'pg_catalog.int8',        '0' ],
	[ '_saga_worker_tick',  '',                                   'pg_catalog.int8',        '0' ],
	[ 'saga_tick',          '',                                   'pg_catalog.int4',        '0' ],
	[ 'outbox_publish',     'pg_catalog.text, pg_catalog.jsonb, pg_catalog.text, pg_catalog.jsonb, pg_catalog.timestamptz', 'pg_catalog.int8', '0' ],
	[ 'lower',              'pg_catalog.text',                    'pg_catalog.text',        'NULL' ],
	[ 'length',             'pg_catalog.text',                    'pg_catalog.int4',        '0' ],
);
for my $schema ('public', 'evil')
{
	for my $f (@functions)
	{
		my ($name, $args, $ret, $value) = @$f;
		my $retsql = $ret =~ /^SETOF/ ? "RETURN QUERY SELECT $value::@{[ $ret =~ s/^SETOF //r ]}; RETURN;"
		  : $ret eq 'pg_catalog.void' ? 'RETURN;'
		  : "RETURN $value;";
		$plant .= qq{
CREATE FUNCTION $schema.$name($args) RETURNS $ret LANGUAGE plpgsql AS \$f\$
BEGIN PERFORM public.pwn('function $schema.$name'); $retsql END \$f\$;
GRANT EXECUTE ON FUNCTION $schema.$name($args) TO PUBLIC;
};
	}

	# aggregates: count(*), count(any), min, max, sum, string_agg, array_agg
	$plant .= qq{
CREATE FUNCTION $schema.agg_step(s pg_catalog.int8) RETURNS pg_catalog.int8
LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM public.pwn('aggregate in $schema'); RETURN s; END \$f\$;
CREATE FUNCTION $schema.agg_step(s pg_catalog.int8, x anyelement) RETURNS pg_catalog.int8
LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM public.pwn('aggregate in $schema'); RETURN s; END \$f\$;
CREATE FUNCTION $schema.agg_step_ts(s pg_catalog.timestamptz, x pg_catalog.timestamptz) RETURNS pg_catalog.timestamptz
LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM public.pwn('aggregate in $schema'); RETURN x; END \$f\$;
CREATE FUNCTION $schema.agg_step_i8(s pg_catalog.int8, x pg_catalog.int8) RETURNS pg_catalog.int8
LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM public.pwn('aggregate in $schema'); RETURN x; END \$f\$;
CREATE FUNCTION $schema.agg_step_t(s pg_catalog.text, x pg_catalog.text, d pg_catalog.text) RETURNS pg_catalog.text
LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM public.pwn('aggregate in $schema'); RETURN x; END \$f\$;
CREATE AGGREGATE $schema.count(*) (sfunc = $schema.agg_step, stype = pg_catalog.int8, initcond = '0');
CREATE AGGREGATE $schema.count(anyelement) (sfunc = $schema.agg_step, stype = pg_catalog.int8, initcond = '0');
CREATE AGGREGATE $schema.min(pg_catalog.timestamptz) (sfunc = $schema.agg_step_ts, stype = pg_catalog.timestamptz);
CREATE AGGREGATE $schema.max(pg_catalog.timestamptz) (sfunc = $schema.agg_step_ts, stype = pg_catalog.timestamptz);
CREATE AGGREGATE $schema.min(pg_catalog.int8) (sfunc = $schema.agg_step_i8, stype = pg_catalog.int8);
CREATE AGGREGATE $schema.max(pg_catalog.int8) (sfunc = $schema.agg_step_i8, stype = pg_catalog.int8);
CREATE AGGREGATE $schema.sum(pg_catalog.int8) (sfunc = $schema.agg_step_i8, stype = pg_catalog.int8);
CREATE AGGREGATE $schema.string_agg(pg_catalog.text, pg_catalog.text) (sfunc = $schema.agg_step_t, stype = pg_catalog.text);
};

	# operators on the types the workers compare, add and extract
	my %types = (
		i8 => 'pg_catalog.int8', i4 => 'pg_catalog.int4', tx => 'pg_catalog.text',
		ts => 'pg_catalog.timestamptz', jb => 'pg_catalog.jsonb', bo => 'pg_catalog.bool',
		iv => 'pg_catalog.interval', oi => 'pg_catalog.oid');
	my $n = 0;
	for my $op ([ '=',   [qw(i8 i8 bo) ], [qw(i4 i4 bo)], [qw(tx tx bo)], [qw(ts ts bo)], [qw(jb jb bo)], [qw(oi oi bo)], [qw(i8 i4 bo)] ],
				[ '<>',  [qw(i8 i8 bo) ], [qw(tx tx bo)], [qw(i4 i4 bo)] ],
				[ '<',   [qw(i8 i8 bo) ], [qw(ts ts bo)], [qw(i4 i4 bo)] ],
				[ '<=',  [qw(i8 i8 bo) ], [qw(ts ts bo)], [qw(i4 i4 bo)] ],
				[ '>',   [qw(i8 i8 bo) ], [qw(ts ts bo)], [qw(i4 i4 bo)] ],
				[ '>=',  [qw(i8 i8 bo) ], [qw(ts ts bo)], [qw(i4 i4 bo)] ],
				[ '+',   [qw(ts iv ts) ], [qw(i4 i4 i4)], [qw(i8 i8 i8)] ],
				[ '-',   [qw(ts iv ts) ], [qw(ts ts iv)], [qw(i8 i8 i8)] ],
				[ '~~',  [qw(tx tx bo) ] ],
				[ '||',  [qw(tx tx tx) ], [qw(jb jb jb)] ],
				[ '->>', [qw(jb tx tx) ] ],
				[ '->',  [qw(jb tx jb) ] ],
				[ '#>>', [qw(jb tx tx) ] ])
	{
		my ($name, @sigs) = @$op;
		for my $sig (@sigs)
		{
			my ($l, $r, $res) = map { $types{$_} } @$sig;
			$n++;
			my $value = $res eq 'pg_catalog.bool' ? 'false' : 'NULL';
			$plant .= qq{
CREATE FUNCTION $schema.op_$n(a $l, b $r) RETURNS $res LANGUAGE plpgsql AS \$f\$
BEGIN PERFORM public.pwn('operator $schema.$name'); RETURN $value; END \$f\$;
CREATE OPERATOR $schema.$name (LEFTARG = $l, RIGHTARG = $r, FUNCTION = $schema.op_$n);
};
		}
	}

	# types named like built-ins, with casts from text into them
	for my $type (qw(jsonb text timestamptz int8 int4 oid regclass regrole bool name))
	{
		$plant .= qq{
CREATE TYPE $schema.$type AS (x pg_catalog.int4);
CREATE FUNCTION $schema.cast_$type(v pg_catalog.text) RETURNS $schema.$type LANGUAGE plpgsql AS \$f\$
BEGIN PERFORM public.pwn('cast to $schema.$type'); RETURN NULL; END \$f\$;
CREATE CAST (pg_catalog.text AS $schema.$type) WITH FUNCTION $schema.cast_$type(pg_catalog.text) AS IMPLICIT;
};
	}
}
$plant .= q{
ALTER DATABASE appdb SET search_path = evil, public, pg_catalog;
ALTER ROLE dbowner SET search_path = evil, public, pg_catalog;
};

my ($ret, $out, $err) = $node->psql('appdb', $plant,
	extra_params => [ '-U', 'dbowner', '-v', 'ON_ERROR_STOP=1' ]);
is($ret, 0, 'the database owner planted its objects') or diag($err);

# The planted objects are live: a session of the owner runs them (it runs as
# the owner, which is harmless).
($ret, $out, $err) = $node->psql('appdb', 'SELECT count(*) FROM (VALUES (1)) v',
	extra_params => [ '-U', 'dbowner' ]);
like($err, qr/PWNED who=dbowner su=f/, 'the planted count(*) is what an unqualified count(*) calls');

# Restart the workers so that they connect with the new database settings
# (the first ones may have connected before the owner changed them).
$node->restart;

my $log_offset = -s $node->logfile;

# Work for every job: an expired idempotency key and inbox row (reaper), an
# event (relay), a saga (sagas).  All of it as the superuser, qualified, so
# that the test itself runs nothing planted.
$node->safe_psql('appdb', q{
SET search_path = pg_catalog;
SELECT outcome FROM resilience.idempotency_begin('esc', 'k1', '{}'::jsonb, '1 second'::interval);
SELECT resilience.idempotency_complete('esc', 'k1', '{}'::jsonb, 200);
SELECT resilience.inbox_accept('esc', 'm1', '1 second'::interval);
SELECT resilience.outbox_publish('esc.created', '{"n": 1}'::jsonb);
SELECT resilience.saga_start('esc', '{}'::jsonb);
});

# Wait (bounded) until the workers have done it all.
my $q = q{
SET search_path = pg_catalog;
SELECT (SELECT pg_catalog.count(*) FROM resilience.idempotency_keys)
    || ' ' || (SELECT pg_catalog.count(*) FROM resilience.inbox)
    || ' ' || (SELECT pg_catalog.count(*) FROM resilience.sagas WHERE state OPERATOR(pg_catalog.=) 'completed')
    || ' ' || (SELECT pg_catalog.count(*) FROM resilience.outbox WHERE delivered_at IS NULL)
};
my $o = '';
my $t0 = time;
while (time - $t0 < 60)
{
	(undef, $o) = $node->psql('appdb', $q);
	last if $o eq '0 0 1 0';
	usleep(100_000);
}
is($o, '0 0 1 0',
	'the workers reaped the expired key and inbox row, ran the saga and relayed the event');

# Some more rounds of every job, then read what happened.
sleep 1;
my $runs = $node->safe_psql('monitor', q{
SELECT string_agg(job || ':' || (runs > 0) || ':' || failures, ' ' ORDER BY job)
  FROM resilience.workers WHERE database = 'appdb'});
like($runs, qr/^reaper:true:\d+ relay:true:\d+ sagas:true:\d+ schedules:true:\d+$/, "every job of appdb's worker ran ($runs)");

my $log = slurp_file($node->logfile, $log_offset);
my @pwned = $log =~ /(PWNED who=\S+ su=\S+ what=[^\n]*)/g;
my @as_super = grep { /su=t/ } @pwned;
my @as_other = grep { !/who=dbowner / } @pwned;
is(scalar(@as_super), 0, 'nothing planted ran as a superuser')
  or diag(join("\n", @as_super[0 .. ($#as_super < 9 ? $#as_super : 9)]));
is(scalar(@as_other), 0, 'nothing planted ran as any role but the owner itself')
  or diag(join("\n", @as_other[0 .. ($#as_other < 9 ? $#as_other : 9)]));
is($node->safe_psql('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'dbowner'}),
	'f', 'the database owner is not a superuser');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_roles WHERE rolsuper}),
	'1', 'the bootstrap superuser is still the only superuser');
is($node->safe_psql('appdb',
		q{SET search_path = pg_catalog; SELECT pg_catalog.count(*) FROM public.pwned WHERE su OR who OPERATOR(pg_catalog.<>) 'dbowner'}),
	'0', 'the evidence table holds nothing from another role');

# --- callers: functions that act as the tables' owner, called from the
# owner's planted search_path ---
#
# A plain application role calls every function that writes the extension's
# tables as their owner (leases and fences, idempotency keys, the inbox,
# streams, the outbox, sagas, schedules, quotas, the shared-memory limiters).
# Its session has the database's search_path, evil first and pg_catalog
# last; nothing planted may run as anyone but the caller or the owner.
$node->safe_psql('appdb', q{
CREATE ROLE app_user LOGIN IN ROLE resilience_user;
});
$log_offset = -s $node->logfile;

# The planted objects are live for the caller's own statements.
($ret, $out, $err) = $node->psql('appdb', 'SELECT count(*) FROM (VALUES (1)) v',
	extra_params => [ '-U', 'app_user' ]);
like($err, qr/PWNED who=app_user su=f/, "the caller's unqualified count(*) is the planted one");

($ret, $out, $err) = $node->psql('appdb', q{
SELECT resilience.lock_acquire('evil-lease', '30 seconds'::pg_catalog.interval) AS token \gset
SELECT resilience.lock_check('evil-lease', :token);
SELECT resilience.lock_renew('evil-lease', :token, '1 minute'::pg_catalog.interval);
SELECT resilience.fence('evil-resource', :token);
SELECT resilience.fence_check('evil-resource', :token);
SELECT resilience.lock_release('evil-lease', :token);
SELECT (resilience.idempotency_begin('evil', 'k1', '{"a": 1}'::pg_catalog.jsonb)).outcome;
SELECT resilience.idempotency_checkpoint('evil', 'k1', 'charged');
SELECT resilience.idempotency_complete('evil', 'k1', '{"ok": true}'::pg_catalog.jsonb, 200);
SELECT (resilience.idempotency_begin('evil', 'k1', '{"a": 1}'::pg_catalog.jsonb)).outcome;
SELECT (resilience.idempotency_begin('evil', 'k2', '{"a": 1}'::pg_catalog.jsonb)).outcome;
SELECT resilience.idempotency_fail('evil', 'k2', '{"e": 1}'::pg_catalog.jsonb, false);
SELECT resilience.inbox_accept('evil', 'm1');
SELECT resilience.append_events('evil-stream', -1, ARRAY['{"type": "a"}'::pg_catalog.jsonb]);
SELECT resilience.append_events('evil-stream', NULL, ARRAY['{"type": "b"}'::pg_catalog.jsonb]) AS version \gset
SELECT resilience.append_events('evil-stream', :version, ARRAY['{"type": "c"}'::pg_catalog.jsonb]);
SELECT resilience.outbox_publish('evil.created', '{"n": 1}'::pg_catalog.jsonb, 'k');
SELECT resilience.saga_start('esc', '{}'::pg_catalog.jsonb, 'evil-1');
SELECT resilience.rate_limit('evil', 10, 1.0::pg_catalog.float8);
SELECT resilience.bulkhead_acquire('evil', 2);
SELECT resilience.breaker_allow('evil');
SELECT resilience.quota('evil', 10::pg_catalog.int8, 'day');
SELECT (resilience.quota_check('evil', 10::pg_catalog.int8, 'day')).allowed;
}, extra_params => [ '-U', 'app_user', '-v', 'ON_ERROR_STOP=1' ]);
is($ret, 0, 'the caller ran every call') or diag($err);

$log = slurp_file($node->logfile, $log_offset);
@pwned = $log =~ /(PWNED who=\S+ su=\S+ what=[^\n]*)/g;
my @escalated = grep { /su=t/ || !/who=(app_user|dbowner) / } @pwned;
is(scalar(@escalated), 0, "nothing planted ran as the tables' owner (or any role but the caller)")
  or diag(join("\n", @escalated[0 .. ($#escalated < 9 ? $#escalated : 9)]));

# --- refused RENAME / DROP DATABASE do not release the worker ---

# pid and start time of the reaper row of $db's worker
sub worker_of
{
	my ($db) = @_;
	return $node->safe_psql('monitor',
		q{SELECT coalesce(pid, 0) || '/' || coalesce(started_at::text, '') FROM resilience.workers}
		  . " WHERE database = '$db' AND job = 'reaper'");
}

sub wait_worker_running
{
	my ($db) = @_;
	return $node->poll_query_until('monitor',
		"SELECT pid IS NOT NULL AND state IN ('idle', 'running') FROM resilience.workers"
		  . " WHERE database = '$db' AND job = 'reaper'");
}

ok(wait_worker_running('appdb') && wait_worker_running('otherdb'), 'both workers run');

# Run $sql as dbowner from database "postgres"; returns (sqlstate, stderr).
sub as_owner
{
	my ($sql) = @_;
	my ($r, $o, $e) = $node->psql('postgres', $sql,
		extra_params => [ '-U', 'dbowner', '-v', 'VERBOSITY=verbose' ]);
	my ($state) = $e =~ /ERROR:\s+([0-9A-Z]{5}):/;
	return ($state // '', $e);
}

my @refused = (
	[ 'otherdb', 'ALTER DATABASE otherdb RENAME TO stolen',      '42501', 'rename of a database it does not own' ],
	[ 'otherdb', 'DROP DATABASE otherdb',                         '42501', 'drop of a database it does not own' ],
	[ 'appdb',   'ALTER DATABASE appdb RENAME TO appdb2',         '42501', 'rename of its own database without CREATEDB' ],
	[ 'appdb',   "ALTER DATABASE appdb RENAME TO otherdb",        '42P04', 'rename of its own database to a name in use (with CREATEDB)' ],
	[ 'appdb',   "BEGIN;\nDROP DATABASE appdb;\nCOMMIT;",         '25001', 'drop of its own database in a transaction block' ],
);
for my $case (@refused)
{
	my ($db, $sql, $want, $what) = @$case;
	my $before = worker_of($db);
	my $createdb = $what =~ /with CREATEDB/;
	$node->safe_psql('postgres', 'ALTER ROLE dbowner CREATEDB') if $createdb;
	my ($state, $e) = as_owner($sql);
	$node->safe_psql('postgres', 'ALTER ROLE dbowner NOCREATEDB') if $createdb;
	is($state, $want, "$what fails with $want") or diag($e);
	# the launcher restarts a released worker after the command's
	# transaction; give it time to show
	usleep(500_000);
	wait_worker_running($db);
	is(worker_of($db), $before, "... and the worker of $db was neither released nor restarted");
}

# The real thing still works: a superuser renames and drops; the worker leaves.
$node->safe_psql('postgres', 'ALTER DATABASE otherdb RENAME TO otherdb2');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_database WHERE datname = 'otherdb2'}),
	'1', 'a rename the server allows still goes through (the worker left)');
$node->safe_psql('postgres', 'DROP DATABASE otherdb2');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_database WHERE datname LIKE 'otherdb%'}),
	'0', 'a drop the server allows still goes through');

$node->stop;
done_testing();
