#!/usr/bin/perl
# A local HTTP receiver for the outbox tests and bench: loopback only, one
# process, keep-alive, many connections at once (select loop).
#
#   receiver.pl --port-file FILE [--port N] [--log FILE]
#
# Every POST is answered (200 unless told otherwise) and, with --log, recorded
# as one tab-separated line:
#   epoch-ms  status  idempotency-key  path  content-type  x-headers  body
# (x-headers: the request's X-*, webhook-*, Authorization, Cookie,
# Proxy-Authorization, traceparent and tracestate headers as name=value
# joined by '&'; a repeated header's values joined by '|').
#
# It is told what to do by GET /_control?... (answered 200 "ok"):
#   mode=ok                         answer 200 again
#   mode=fail&status=500            answer status (default 500) ...
#   mode=timeout                    never answer (hold the connection) ...
#   mode=down                       close every socket and refuse connections ...
#   ... &for=SECONDS or &count=N    ... for that long / that many requests
#   retry_after=S                   with mode=fail: send Retry-After: S
#   body_hex=HEX                    with mode=fail: answer these bytes as the body
#   match=TEXT                      with mode=fail: only requests whose body
#                                   contains TEXT fail
#   delay_ms=D                      answer every request D ms late (any mode)
# GET /_stats answers "requests=N failed=N".  It exits on SIGTERM, SIGINT, or
# after --max-seconds (default 3600) so that it never outlives a test.
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use Socket qw(SOL_SOCKET SO_REUSEADDR IPPROTO_TCP TCP_NODELAY);
use Time::HiRes qw(time);
use Getopt::Long;

my ($port, $port_file, $log_file, $max_seconds) = (0, undef, undef, 3600);
GetOptions('port=i' => \$port, 'port-file=s' => \$port_file, 'log=s' => \$log_file,
	'max-seconds=i' => \$max_seconds)
  or die "usage: receiver.pl --port-file FILE [--port N] [--log FILE]\n";

my $started = time;
my %mode = (mode => 'ok');
my ($requests, $failed) = (0, 0);
my $log;
if ($log_file)
{
	open($log, '>>', $log_file) or die "cannot open $log_file: $!";
	$log->autoflush(1);
}

my $listener;
my $sel = IO::Select->new;
my %conn;       # fileno => { sock, in, out, held }
my @delayed;    # [ due, fileno, response ]

sub listen_now
{
	$listener = IO::Socket::INET->new(
		LocalAddr => '127.0.0.1',
		LocalPort => $port,
		Listen => 128,
		ReuseAddr => 1,
		Blocking => 0) or die "cannot listen on 127.0.0.1:$port: $!";
	$port = $listener->sockport;
	$sel->add($listener);
}

sub close_conn
{
	my ($fd) = @_;
	my $c = delete $conn{$fd} or return;
	$sel->remove($c->{sock});
	close $c->{sock};
}

sub go_down
{
	for my $fd (keys %conn) { close_conn($fd); }
	@delayed = ();
	$sel->remove($listener);
	close $listener;
	$listener = undef;
}

listen_now();
if ($port_file)
{
	open(my $pf, '>', "$port_file.tmp") or die $!;
	print $pf "$port\n";
	close $pf;
	rename("$port_file.tmp", $port_file) or die $!;
}

my $stop = 0;
$SIG{TERM} = $SIG{INT} = sub { $stop = 1 };

# Is the current failure mode over?
sub mode_expired
{
	return 0 if $mode{mode} eq 'ok';
	return 1 if defined $mode{until} && time >= $mode{until};
	return 1 if defined $mode{count} && $mode{count} <= 0;
	return 0;
}

sub response
{
	my ($status, $body, @headers) = @_;
	my $reason = { 200 => 'OK', 400 => 'Bad Request', 404 => 'Not Found', 408 => 'Request Timeout',
		429 => 'Too Many Requests', 500 => 'Internal Server Error', 503 => 'Service Unavailable' }->{$status}
	  || 'Status';
	return "HTTP/1.1 $status $reason\r\nContent-Length: " . length($body)
	  . "\r\nContent-Type: text/plain\r\n" . join('', map { "$_\r\n" } @headers) . "\r\n$body";
}

sub handle_control
{
	my ($query) = @_;
	my %q = map { my ($k, $v) = split /=/, $_, 2; ($k => $v // '') } split /&/, ($query // '');
	my %new = (mode => $q{mode} || 'ok');
	$new{status} = $q{status} || 500;
	$new{retry_after} = $q{retry_after} if defined $q{retry_after};
	$new{match} = $q{match} if defined $q{match};
	$new{body} = pack('H*', $q{body_hex}) if defined $q{body_hex};
	$new{until} = time + $q{for} if defined $q{for};
	$new{count} = $q{count} if defined $q{count};
	$new{delay_ms} = $q{delay_ms} // $mode{delay_ms} // 0;
	%mode = %new;
	return response(200, "ok\n");
}

# One complete request: returns the response (undef: hold it, never answer).
sub handle_request
{
	my ($method, $target, $headers, $body) = @_;
	my ($path, $query) = split /\?/, $target, 2;
	return handle_control($query) if $path eq '/_control';
	return response(200, "requests=$requests failed=$failed\n") if $path eq '/_stats';
	%mode = (mode => 'ok', delay_ms => $mode{delay_ms} // 0) if mode_expired();
	my $status = 200;
	my @extra;
	if ($mode{mode} eq 'fail' && (!defined $mode{match} || index($body, $mode{match}) >= 0))
	{
		$status = $mode{status};
		push @extra, "Retry-After: $mode{retry_after}" if defined $mode{retry_after};
	}
	elsif ($mode{mode} eq 'timeout')
	{
		$status = 0;
	}
	$mode{count}-- if defined $mode{count} && $mode{mode} ne 'ok';
	$requests++;
	$failed++ if $status != 200;
	if ($log)
	{
		my $x = join('&', map { "$_=$headers->{$_}" } sort grep { /^(x|webhook)-/ || /^(authorization|cookie|proxy-authorization|traceparent|tracestate)$/ } keys %$headers);
		(my $flat = $body) =~ s/[\t\n]/ /g;
		printf $log "%.3f\t%d\t%s\t%s\t%s\t%s\t%s\n", time * 1000, $status,
		  $headers->{'idempotency-key'} // '', $path, $headers->{'content-type'} // '', $x, $flat;
	}
	return undef if $status == 0;
	return response($status, $status == 200 ? "delivered\n" : $mode{body} // "failing on purpose\n", @extra);
}

sub queue_response
{
	my ($fd, $resp) = @_;
	my $delay = $mode{delay_ms} // 0;
	if ($delay > 0)
	{
		push @delayed, [ time + $delay / 1000, $fd, $resp ];
	}
	else
	{
		$conn{$fd}{out} .= $resp;
	}
}

# Parse as many complete requests as the buffer holds.
sub process_input
{
	my ($fd) = @_;
	my $c = $conn{$fd};
	while (!$c->{held})
	{
		my $end = index($c->{in}, "\r\n\r\n");
		return if $end < 0;
		my $head = substr($c->{in}, 0, $end);
		my ($line, @lines) = split /\r\n/, $head;
		my ($method, $target) = split / /, $line;
		my %h;
		for (@lines)
		{
			my ($k, $v) = split /:\s*/, $_, 2;
			# a repeated header keeps every value, joined by '|'
			$h{ lc $k } = exists $h{ lc $k } ? "$h{ lc $k }|$v" : $v;
		}
		my $len = $h{'content-length'} // 0;
		return if length($c->{in}) < $end + 4 + $len;
		my $body = substr($c->{in}, $end + 4, $len);
		substr($c->{in}, 0, $end + 4 + $len) = '';
		my $resp = handle_request($method, $target, \%h, $body);
		$c->{close} = 1 if lc($h{connection} // '') eq 'close';
		if (defined $resp) { queue_response($fd, $resp); }
		else { $c->{held} = 1; }
		if ($mode{mode} eq 'down' && $listener)
		{
			# answer /_control first, then refuse everything at once
			$c->{sock}->blocking(1);
			syswrite($c->{sock}, $c->{out});
			go_down();
			return;
		}
	}
}

while (!$stop && time - $started < $max_seconds)
{
	if (!$listener && ($mode{mode} ne 'down' || mode_expired()))
	{
		%mode = (mode => 'ok', delay_ms => $mode{delay_ms} // 0);
		listen_now();
	}
	if ($listener && $mode{mode} eq 'down' && !mode_expired())
	{
		go_down();
	}
	# timeouts end: release held connections by closing them
	if ($mode{mode} ne 'timeout' || mode_expired())
	{
		for my $fd (grep { $conn{$_}{held} } keys %conn) { close_conn($fd); }
	}
	my $now = time;
	my @due = grep { $_->[0] <= $now } @delayed;
	@delayed = grep { $_->[0] > $now } @delayed;
	for my $d (@due) { $conn{ $d->[1] }{out} .= $d->[2] if $conn{ $d->[1] }; }

	my $wait = 0.1;
	for my $d (@delayed) { my $w = $d->[0] - $now; $wait = $w if $w < $wait; }
	$wait = 0 if $wait < 0;
	my @w = map { $conn{$_}{sock} } grep { length $conn{$_}{out} } keys %conn;
	my ($r, $wr) = IO::Select::select($sel, @w ? IO::Select->new(@w) : undef, undef, $wait);
	for my $s (@{ $wr || [] })
	{
		my $fd = fileno($s);
		my $c = $conn{$fd} or next;
		my $n = syswrite($s, $c->{out});
		if (!defined $n) { close_conn($fd); next; }
		substr($c->{out}, 0, $n) = '';
		close_conn($fd) if $c->{close} && !length $c->{out};
	}
	for my $s (@{ $r || [] })
	{
		if ($listener && $s == $listener)
		{
			while (my $client = $listener->accept)
			{
				$client->blocking(0);
				setsockopt($client, IPPROTO_TCP, TCP_NODELAY, 1);
				$conn{ fileno($client) } = { sock => $client, in => '', out => '', held => 0 };
				$sel->add($client);
			}
			next;
		}
		my $fd = fileno($s);
		next unless defined $fd && $conn{$fd};
		my $n = sysread($s, my $buf, 65536);
		if (!$n) { close_conn($fd); next; }
		$conn{$fd}{in} .= $buf;
		process_input($fd);
	}
}
