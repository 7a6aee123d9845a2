# Owner roles through a Citus coordinator.  Leases, streams and idempotency
# keys belong to the role that made them (src/tenants.c), stored in an
# owner_role column of a distributed table.  A role has its own OID on each
# node (Citus creates it on the workers), so an owner must be compared
# where it was written: an application role that is not a superuser must be
# able to act on what it owns, and another role must be refused (42501).
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('roles');
my $coord = $c->{coord};
$c->setup;
# Roles made on the workers first get other OIDs there than on the coordinator
for my $w (@{ $c->{workers} })
{
	$w->safe_psql('postgres', q{SET citus.enable_ddl_propagation = off; CREATE ROLE pad1; CREATE ROLE pad2;});
}
$coord->safe_psql('postgres', q{
CREATE ROLE app_a LOGIN IN ROLE resilience_user;
CREATE ROLE app_b LOGIN IN ROLE resilience_user;
});
my $oids = join ',', map {
	$_->safe_psql('postgres', q{SELECT oid FROM pg_roles WHERE rolname = 'app_a'})
} ($coord, @{ $c->{workers} });
note("app_a's OIDs on the coordinator and the workers: $oids");

sub as
{
	my ($role, $sql) = @_;
	my ($ret, $out, $err) = $coord->psql('postgres', "SET ROLE $role; $sql",
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	return $ret == 0 ? $out : ($err =~ /ERROR:\s+(\w{5})/ ? $1 : $err);
}

# --- leases ---
my $tok = as('app_a', q{SELECT resilience.lock_acquire('role-lease', '1 minute', 'a')});
like($tok, qr/^\d+$/, 'a role takes a lease through the coordinator');
is(as('app_a', "SELECT resilience.lock_renew('role-lease', $tok, '1 minute')"), 't',
	'and renews it');
is(as('app_b', "SELECT resilience.lock_release('role-lease', $tok)"), '42501',
	'another role may not release it');
is(as('app_a', "SELECT resilience.lock_release('role-lease', $tok)"), 't',
	'its owner releases it');
like(as('app_a', q{SELECT resilience.lock_acquire('role-lease', '1 minute', 'a')}), qr/^\d+$/,
	'and takes it again');

# --- streams ---
# a stream's first event is version 0
is(as('app_a', q{SELECT resilience.append_events('role-stream', -1, ARRAY['{"type": "a"}'::jsonb])}), '0',
	'a role creates a stream');
is(as('app_a', q{SELECT resilience.append_events('role-stream', 0, ARRAY['{"type": "b"}'::jsonb])}), '1',
	'and appends to it at its version');
is(as('app_a', q{SELECT resilience.append_events('role-stream', NULL, ARRAY['{"type": "c"}'::jsonb])}), '2',
	'and without an expected version');
is(as('app_b', q{SELECT resilience.append_events('role-stream', 2, ARRAY['{"type": "x"}'::jsonb])}), '42501',
	'another role may not append to it');
is(as('app_a', q{SELECT string_agg(type, ',' ORDER BY version) || ' @' || resilience.stream_version('role-stream')
	FROM resilience.read_stream('role-stream')}), 'a,b,c @2', 'and reads it and its version');
is(as('app_b', q{SELECT count(*) FROM resilience.read_stream('role-stream')}), '42501',
	'another role may not read it');
is(as('app_b', q{SELECT resilience.stream_version('role-stream')}), '42501',
	'nor its version');

# --- idempotency keys ---
is(as('app_a', q{SELECT outcome FROM resilience.idempotency_begin('role', 'k', '{}')}), 'proceed',
	'a role begins a key');
as('app_a', q{SELECT resilience.idempotency_complete('role', 'k', '{"r": 1}')});
is(as('app_a', q{SELECT outcome || ' ' || response FROM resilience.idempotency_begin('role', 'k', '{}')}),
	'replay {"r": 1}', 'and replays it');
is(as('app_b', q{SELECT outcome FROM resilience.idempotency_begin('role', 'k', '{}')}), '42501',
	'another role may not');

$c->stop;
done_testing();
