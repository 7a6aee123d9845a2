# A Citus cluster for the citus suite (test/citus): a coordinator and two
# workers on 127.0.0.1, each with shared_preload_libraries = 'citus,resilience'
# and both extensions created, the workers added to the coordinator.
#
#   my $c = CitusCluster->new('name', %opts);   # started, extensions created
#   $c->{coord}, @{ $c->{workers} }             # PostgreSQL::Test::Cluster nodes
#   $c->setup;                                  # SELECT resilience.citus_setup()
#   $c->worker_of($table_or_function_key)       # the worker node holding a key
#   $c->effects_table;                          # public.effects, distributed by k
#   $c->queue_route('orders.%', 'c1');          # a queue route for outbox_claim
#   $c->drain_queue('c1');                      # claim + ack all into public.claimed
#   $c->saga_role('agent');                     # a role that may define sagas
#   $c->stop;
#
# %opts: conf => extra postgresql.conf lines for every node, coord_conf =>
# extra lines for the coordinator only (the relay and the orchestrator run
# there: resilience.database_names is set on the coordinator only),
# no_coordinator_host => 1 leaves the coordinator out of Citus's metadata
# (then $c->set_coordinator_host puts it in).
package CitusCluster;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

sub node
{
	my ($name, $conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'citus,resilience'
listen_addresses = '127.0.0.1'
max_connections = 60
max_prepared_transactions = 60
citus.shard_count = 8
fsync = off
$conf
});
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION citus');
	return $node;
}

sub new
{
	my ($class, $name, %opts) = @_;
	my $conf = $opts{conf} // '';
	my $self = bless {}, $class;
	$self->{workers} = [ map { node("${name}_w$_", "resilience.database_names = ''\n$conf") } (1, 2) ];
	$self->{coord} = node("${name}_coord",
		($opts{coord_conf} // "resilience.database_names = 'postgres'\nresilience.worker_naptime = '1s'") . "\n$conf");
	my $c = $self->{coord};
	$self->set_coordinator_host unless $opts{no_coordinator_host};
	$c->safe_psql('postgres', "SELECT citus_add_node('127.0.0.1', " . $_->port . ')')
	  for @{ $self->{workers} };
	# created on the coordinator, propagated to the workers by Citus
	$c->safe_psql('postgres', 'CREATE EXTENSION resilience');
	return $self;
}

# The coordinator in Citus's metadata (group 0): citus_setup() needs it for
# the Citus local tables.
sub set_coordinator_host
{
	my ($self) = @_;
	my $c = $self->{coord};
	$c->safe_psql('postgres', "SELECT citus_set_coordinator_host('127.0.0.1', " . $c->port . ')');
}

sub setup
{
	my ($self) = @_;
	return $self->{coord}->safe_psql('postgres', 'SELECT count(*) FROM resilience.citus_setup()');
}

# The worker node that holds the shard of a text key in the co-location
# group of resilience.fences (every distributed table and function of
# resilience but the inbox is in it).
sub worker_of
{
	my ($self, $key) = @_;
	my $port = $self->{coord}->safe_psql('postgres', qq{
		SELECT nodeport FROM pg_dist_shard_placement
		 WHERE shardid = get_shard_id_for_distribution_column('resilience.fences', '$key')});
	my ($w) = grep { $_->port == $port } @{ $self->{workers} };
	return $w;
}

# What the tests write through the coordinator: public.effects (k, n, src),
# distributed by k (rows on both workers), and the sequence pub_order that
# numbers the transactions of a load in the order they ran.
sub effects_table
{
	my ($self) = @_;
	$self->{coord}->safe_psql('postgres', q{
		CREATE TABLE public.effects (k text NOT NULL, n bigint, src text);
		SELECT create_distributed_table('public.effects', 'k');
		CREATE SEQUENCE public.pub_order;
	});
}

sub queue_route
{
	my ($self, $pattern, $consumer) = @_;
	$self->{coord}->safe_psql('postgres', qq{
		INSERT INTO resilience.outbox_routes (topic_pattern, sink, target)
		VALUES ('$pattern', 'queue', '$consumer')});
}

# Claim and ack every event of a queue route, in claim order, into
# public.claimed (ord, key, n: the payload's n), through the pull API.
sub drain_queue
{
	my ($self, $consumer) = @_;
	$self->{coord}->safe_psql('postgres', qq{
		CREATE TABLE IF NOT EXISTS public.claimed (ord serial, key text, n bigint);
		DO \$\$
		DECLARE got int;
		BEGIN
		  LOOP
		    WITH c AS (SELECT * FROM resilience.outbox_claim('$consumer', 100)),
		         i AS (INSERT INTO public.claimed (key, n)
		               SELECT key, (payload->>'n')::bigint FROM c ORDER BY id RETURNING 1)
		    SELECT count(*) INTO got FROM i;
		    EXIT WHEN got = 0;
		    PERFORM resilience.outbox_ack('$consumer', array_agg(o.id))
		       FROM resilience.outbox o WHERE o.claimed_by IS NOT NULL;
		  END LOOP;
		END \$\$;
	});
}

# A role that may define sagas and schedules and write public.effects.
# LOGIN: Citus connects to the workers as the role a step runs as.
sub saga_role
{
	my ($self, $role) = @_;
	$self->{coord}->safe_psql('postgres', qq{
		CREATE ROLE $role LOGIN IN ROLE resilience_admin;
		GRANT SELECT, INSERT, UPDATE ON public.effects TO $role;
	});
}

sub stop
{
	my ($self) = @_;
	$_->stop('fast') for ($self->{coord}, @{ $self->{workers} });
}

1;
