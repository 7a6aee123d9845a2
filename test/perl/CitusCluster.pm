# A Citus cluster for the citus suite (test/citus): a coordinator and two
# workers on 127.0.0.1, each with shared_preload_libraries = 'citus,resilience'
# and both extensions created, the workers added to the coordinator.
#
#   my $c = CitusCluster->new('name', %opts);   # started, extensions created
#   $c->{coord}, @{ $c->{workers} }             # PostgreSQL::Test::Cluster nodes
#   $c->setup;                                  # SELECT resilience.citus_setup()
#   $c->worker_of($table_or_function_key)       # the worker node holding a key
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

sub stop
{
	my ($self) = @_;
	$_->stop('fast') for ($self->{coord}, @{ $self->{workers} });
}

1;
