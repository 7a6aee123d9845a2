#!/usr/bin/perl
# Start a private RabbitMQ node (test/perl/AmqpBroker.pm) under DIR, write
# "port seconds-to-start pid-of-this-script" to PORT_FILE, and keep it until SIGTERM or SIGINT,
# then stop it (and its epmd).  For scripts that are not Perl (make bench).
use strict;
use warnings;
use File::Basename qw(dirname);
use lib dirname(__FILE__) . '/perl';
use AmqpBroker;

my ($dir, $port_file) = @ARGV;
die "usage: amqp_broker.pl DIR PORT_FILE\n" unless $port_file;
my $stop = 0;
$SIG{TERM} = $SIG{INT} = sub { $stop = 1 };
my $broker = AmqpBroker->new($dir);
open(my $fh, '>', "$port_file.tmp") or die $!;
printf $fh "%d %.1f %d\n", $broker->port, $broker->startup_seconds, $$;
close $fh;
rename("$port_file.tmp", $port_file) or die $!;
sleep 1 until $stop;
$broker->shutdown;
