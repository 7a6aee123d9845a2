# Sagas with parallel groups driven by saga_tick() called by hand through a
# Citus coordinator (no orchestrator: resilience.database_names is empty),
# with steps that write a distributed table.  A tick by hand claims a
# branch with a query whose correlated subquery checks the caller's
# privileges on the saga's definer (src/saga.c): over the Citus local
# tables it must take each branch once, and a role without the definer's
# privileges none.
use strict;
use warnings;
use lib 'test/perl';
use PostgreSQL::Test::Utils;
use Test::More;
use CitusCluster;

my $c = CitusCluster->new('byhand', coord_conf => "resilience.database_names = ''");
my $coord = $c->{coord};
$c->setup;
$c->effects_table;
$c->saga_role('agent');
$coord->safe_psql('postgres', q{
CREATE ROLE stranger LOGIN IN ROLE resilience_admin;
CREATE FUNCTION public.bstep(saga_id bigint, ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO public.effects VALUES ('fan-' || saga_id || '-' || (ctx #>> '{_saga,step}'), saga_id, 'fan')
    RETURNING '{}'::jsonb
$$;
SET ROLE agent;
SELECT resilience.saga_define('fan', '[
  {"name": "g", "parallel": [
     {"name": "x", "action": "public.bstep"},
     {"name": "y", "action": "public.bstep"},
     {"name": "w", "action": "public.bstep"}]},
  {"name": "z", "action": "public.bstep"}]');
SELECT resilience.saga_start('fan', '{}', 'fan' || i) FROM generate_series(1, 3) i;
RESET ROLE;
});

# A role without the definer's privileges (saga_tick is granted to
# resilience_admin) advances nothing
is($coord->safe_psql('postgres', q{SET ROLE stranger; SELECT resilience.saga_tick()}), '0',
	"a tick by a role without the definer's privileges finds nothing due");
is($coord->safe_psql('postgres', q{
	SELECT count(*) FROM resilience.sagas WHERE name = 'fan' AND updated_at <> created_at}),
	'0', 'and changed no saga');

# The definer ticks, one unit per call and transaction, until nothing is due
my $ticks = 0;
for my $i (1 .. 200)
{
	my $n = $coord->safe_psql('postgres', q{SET ROLE agent; SELECT resilience.saga_tick()});
	last if $n eq '0';
	$ticks++;
}
# 3 sagas x (enter the group, 3 branches, join, step z)
is($ticks, 18, 'one unit of work per tick');
is($coord->safe_psql('postgres', q{
	SELECT string_agg(state, ',' ORDER BY id) FROM resilience.sagas WHERE name = 'fan'}),
	'completed,completed,completed', 'every saga with a parallel group completed by ticks run by hand');
is($coord->safe_psql('postgres', q{
	SELECT count(*) || ' rows, ' || count(DISTINCT k) || ' keys' FROM effects WHERE src = 'fan'}),
	'12 rows, 12 keys', 'each branch and step wrote its distributed row once');
is($coord->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE b.state = 'completed') || '/' || count(*)
	  FROM resilience.saga_branches b JOIN resilience.sagas s ON s.id = b.saga_id WHERE s.name = 'fan'}),
	'9/9', 'every branch row is completed');

$c->stop;
done_testing();
