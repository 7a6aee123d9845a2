# Start, steer and read test/receiver.pl from TAP tests and the bench.
package OutboxReceiver;
use strict;
use warnings;
use IO::Socket::INET;
use Time::HiRes qw(usleep time);
use File::Basename qw(dirname);

my $script = dirname(__FILE__) . '/../receiver.pl';

# new(dir): a receiver on a free loopback port, logging to dir/receiver.log.
sub new
{
	my ($class, $dir) = @_;
	my $self = bless { dir => $dir, log => "$dir/receiver.log", port_file => "$dir/receiver.port" }, $class;
	unlink $self->{port_file}, $self->{log};
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		exec($^X, $script, '--port-file', $self->{port_file}, '--log', $self->{log},
			'--max-seconds', 3600)
		  or die "exec: $!";
	}
	$self->{pid} = $pid;
	for (1 .. 100)
	{
		last if -s $self->{port_file};
		usleep(50_000);
	}
	open(my $fh, '<', $self->{port_file}) or die "the receiver did not start";
	chomp($self->{port} = <$fh>);
	close $fh;
	return $self;
}

sub port { $_[0]{port} }
sub url { "http://127.0.0.1:$_[0]{port}$_[1]" }

# One GET to the receiver, e.g. control('mode=fail&status=500&count=2').
sub control
{
	my ($self, $query) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->{port}, Timeout => 5)
	  or die "cannot reach the receiver: $!";
	print $s "GET /_control?$query HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	local $/;
	my $answer = <$s>;
	close $s;
	die "the receiver refused /_control?$query" unless $answer =~ /^HTTP\/1.1 200/;
}

# Every request recorded so far: { t, status, key, path, type, x, body }.
sub records
{
	my ($self) = @_;
	my @r;
	open(my $fh, '<', $self->{log}) or return ();
	while (my $line = <$fh>)
	{
		chomp $line;
		my @f = split /\t/, $line, 7;
		next unless @f == 7;
		push @r, { t => $f[0], status => $f[1], key => $f[2], path => $f[3], type => $f[4],
			x => $f[5], body => $f[6] };
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
		usleep(50_000);
	}
	return 0;
}

sub stop
{
	my ($self) = @_;
	return unless $self->{pid};
	kill 'TERM', $self->{pid};
	waitpid($self->{pid}, 0);
	$self->{pid} = undef;
}

sub DESTROY { $_[0]->stop }

1;
