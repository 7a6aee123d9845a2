# A private RabbitMQ node for the AMQP tests and the bench (Debian's
# rabbitmq-server): its own node name, AMQP port, distribution port, epmd
# port, data directory and Erlang cookie, on loopback, run as the current
# (unprivileged) user.  stop() and start() stop and start it again with the
# same data (durable queues keep their messages).  Everything it started is
# stopped when the object goes away, by node name and pid.
#
# Also starts test/amqp_consumer.py consumers and reads what they logged.
package AmqpBroker;
use strict;
use warnings;
use File::Basename qw(dirname);
use File::Path qw(make_path);
use IO::Socket::INET;
use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(usleep time);

my $RABBIT_BIN = '/usr/lib/rabbitmq/bin';
my $CLIENT = dirname(__FILE__) . '/../amqp_consumer.py';
my @LIVE;

# A free TCP port on loopback, not one of @avoid.
sub free_port
{
	my (@avoid) = @_;
	for (1 .. 200)
	{
		my $port = 20000 + int(rand(30000));
		next if grep { $_ == $port } @avoid;
		my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
			Proto => 'tcp', ReuseAddr => 0, Listen => 1);
		next unless $s;
		close $s;
		return $port;
	}
	die "no free port";
}

# new(dir): start a node whose files all live under dir.
sub new
{
	my ($class, $dir) = @_;
	my $self = bless { dir => $dir }, $class;
	$self->{port} = free_port();
	$self->{dist_port} = free_port($self->{port});
	$self->{epmd_port} = free_port($self->{port}, $self->{dist_port});
	$self->{node} = "resil$$" . int(rand(100000)) . '@localhost';
	make_path("$dir/home", "$dir/log", "$dir/mnesia");
	open(my $fh, '>', "$dir/rabbitmq.conf") or die $!;
	print $fh "listeners.tcp.1 = 127.0.0.1:$self->{port}\n",
	  "loopback_users = none\n",
	  "log.file.level = info\n",
	  "log.console = false\n";
	close $fh;
	open($fh, '>', "$dir/enabled_plugins") or die $!;
	print $fh "[].\n";
	close $fh;
	open($fh, '>', "$dir/rabbitmq-env.conf") or die $!;
	close $fh;
	push @LIVE, $self;
	$self->start;
	return $self;
}

sub port { $_[0]{port} }
sub node { $_[0]{node} }

# The environment every rabbitmq command of this node runs with.
sub env
{
	my ($self) = @_;
	my $d = $self->{dir};
	return (
		HOME => "$d/home",
		RABBITMQ_NODENAME => $self->{node},
		RABBITMQ_NODE_IP_ADDRESS => '127.0.0.1',
		RABBITMQ_NODE_PORT => $self->{port},
		RABBITMQ_DIST_PORT => $self->{dist_port},
		ERL_EPMD_PORT => $self->{epmd_port},
		ERL_EPMD_ADDRESS => '127.0.0.1',
		RABBITMQ_CONFIG_FILE => "$d/rabbitmq.conf",
		RABBITMQ_CONF_ENV_FILE => "$d/rabbitmq-env.conf",
		RABBITMQ_ADVANCED_CONFIG_FILE => "$d/advanced.config",
		RABBITMQ_ENABLED_PLUGINS_FILE => "$d/enabled_plugins",
		RABBITMQ_MNESIA_BASE => "$d/mnesia",
		RABBITMQ_LOG_BASE => "$d/log",
		RABBITMQ_PID_FILE => "$d/rabbitmq.pid",
		RABBITMQ_PLUGINS_EXPAND_DIR => "$d/plugins-expand",
		RABBITMQ_FEATURE_FLAGS_FILE => "$d/feature_flags",
		RABBITMQ_QUORUM_DIR => "$d/quorum",
		RABBITMQ_STREAM_DIR => "$d/stream");
}

# Run a rabbitmq tool (rabbitmqctl ...) against this node; returns its output.
sub ctl
{
	my ($self, $tool, @args) = @_;
	my %env = $self->env;
	local @ENV{ keys %env } = values %env;
	my $out = `$RABBIT_BIN/$tool -n $self->{node} @args 2>&1`;
	return wantarray ? ($?, $out) : $out;
}

# Start (or start again) and wait until it accepts AMQP connections.
sub start
{
	my ($self) = @_;
	my $t0 = time;
	my %env = $self->env;
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		@ENV{ keys %env } = values %env;
		open(STDIN, '<', '/dev/null');
		open(STDOUT, '>>', "$self->{dir}/server.out");
		open(STDERR, '>&', \*STDOUT);
		exec("$RABBIT_BIN/rabbitmq-server") or POSIX::_exit(127);
	}
	$self->{pid} = $pid;
	my ($rc, $out) = $self->ctl('rabbitmqctl', "--timeout 120 wait $self->{dir}/rabbitmq.pid");
	if ($rc != 0)
	{
		my $log = `tail -n 40 $self->{dir}/server.out`;
		$self->stop;
		die "rabbitmq-server did not start: $out\n$log";
	}
	$self->{startup_seconds} = time - $t0;
	return $self->{startup_seconds};
}

sub startup_seconds { $_[0]{startup_seconds} }

# Stop the node (rabbitmqctl stop, then by pid if it lingers) and wait for it.
sub stop
{
	my ($self) = @_;
	return unless $self->{pid};
	$self->ctl('rabbitmqctl', 'stop');
	my $deadline = time + 30;
	while (time < $deadline)
	{
		last if waitpid($self->{pid}, WNOHANG) != 0;
		usleep(100_000);
	}
	if (kill(0, $self->{pid}))
	{
		kill 'TERM', $self->{pid};
		sleep 2;
		kill 'KILL', $self->{pid} if kill(0, $self->{pid});
		waitpid($self->{pid}, 0);
	}
	$self->{pid} = undef;
}

# Stop the node and the epmd daemon it started on its private port.
sub shutdown
{
	my ($self) = @_;
	$_->stop for @{ $self->{consumers} || [] };
	$self->stop;
	if (!$self->{epmd_killed})
	{
		local $ENV{ERL_EPMD_PORT} = $self->{epmd_port};
		system("epmd -port $self->{epmd_port} -kill >/dev/null 2>&1");
		$self->{epmd_killed} = 1;
	}
}

# Run the client: declare, delete-exchange, count (returns its output).
sub client
{
	my ($self, @args) = @_;
	my $out = `/usr/bin/python3 $CLIENT --port $self->{port} @args 2>&1`;
	die "amqp_consumer.py @args failed: $out" if $?;
	chomp $out;
	return $out;
}

# A consumer of queue logging to dir/name.jsonl; returns an object with
# records(), wait_for(), stop().
sub consumer
{
	my ($self, $queue, $name) = @_;
	my $c = AmqpBroker::Consumer->new($self, $queue, "$self->{dir}/$name.jsonl");
	push @{ $self->{consumers} }, $c;
	return $c;
}

sub DESTROY { $_[0]->shutdown }

END { $_->shutdown for @LIVE; }

package AmqpBroker::Consumer;
use POSIX qw(WNOHANG);
use JSON::PP;
use Time::HiRes qw(usleep time);

sub new
{
	my ($class, $broker, $queue, $log) = @_;
	my $self = bless { log => $log }, $class;
	unlink $log;
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		exec('/usr/bin/python3', $CLIENT, '--port', $broker->port, '--log', $log,
			'--max-seconds', 1800, 'consume', $queue)
		  or POSIX::_exit(127);
	}
	$self->{pid} = $pid;
	return $self;
}

# Every message received so far, in arrival order.
sub records
{
	my ($self) = @_;
	my @r;
	open(my $fh, '<', $self->{log}) or return ();
	while (my $line = <$fh>)
	{
		next unless $line =~ /\n$/;
		push @r, decode_json($line);
	}
	close $fh;
	return @r;
}

# Wait until cond->(records) is true or timeout seconds pass; returns it.
sub wait_for
{
	my ($self, $cond, $timeout) = @_;
	my $deadline = time + ($timeout // 60);
	while (time < $deadline)
	{
		my @r = $self->records;
		return 1 if $cond->(\@r);
		usleep(200_000);
	}
	return 0;
}

sub stop
{
	my ($self) = @_;
	return unless $self->{pid};
	kill 'TERM', $self->{pid};
	my $deadline = time + 10;
	while (time < $deadline && waitpid($self->{pid}, WNOHANG) == 0)
	{
		usleep(100_000);
	}
	if (kill(0, $self->{pid}))
	{
		kill 'KILL', $self->{pid};
		waitpid($self->{pid}, 0);
	}
	$self->{pid} = undef;
}

sub DESTROY { $_[0]->stop }

1;
