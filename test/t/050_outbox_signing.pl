# Standard Webhooks signatures on http routes (option signing_secret),
# verified by a receiver with Python's hmac (test/webhook_verify.py):
#  - one secret: webhook-id = the event id = Idempotency-Key,
#    webhook-timestamp at the send, webhook-signature v1 over
#    "id.timestamp.body";
#  - rotation: two secrets, two signatures, each valid under its secret;
#    then the old secret removed, one signature again;
#  - an unsigned route sends no webhook headers;
#  - the secrets never reach the server log, the status view or metrics.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use OutboxReceiver;

my $new_secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $old_secret = 'whsec_' . 'c2VjcmV0LWtleS1vZi10aGlydHktdHdvLWJ5dGVzISE=';

my $node = PostgreSQL::Test::Cluster->new('signing');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = 'postgres'
resilience.worker_naptime = '200ms'
resilience.relay_interval = '1h'
resilience.reaper_interval = 0
log_statement = 'none'
});
$node->start;
my $dir = $PostgreSQL::Test::Utils::tmp_check;
my $recv = OutboxReceiver->new($dir);
$node->safe_psql('postgres', qq{
CREATE EXTENSION resilience;
INSERT INTO resilience.outbox_routes (topic_pattern, sink, target, options) VALUES
  ('signed.%', 'http', '@{[ $recv->url('/signed') ]}', '{"signing_secret": "$new_secret"}'),
  ('rotating.%', 'http', '@{[ $recv->url('/rotating') ]}', '{"signing_secret": ["$new_secret", "$old_secret"]}'),
  ('plain.%', 'http', '@{[ $recv->url('/plain') ]}', '{}');
});

sub delivered
{
	my ($path, $n) = @_;
	return $recv->wait_for(sub { (grep { $_->{path} eq $path && $_->{status} == 200 } @{ $_[0] }) >= $n }, 60);
}

sub verify
{
	my ($path, @secrets) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'python3', 'test/webhook_verify.py', "$dir/receiver.log", $path, @secrets ],
		'>', \$out, '2>', \$err);
	chomp $out;
	return $out || $err;
}

$node->safe_psql('postgres', q{
SELECT resilience.outbox_publish('signed.e', jsonb_build_object('n', i, 'text', 'caf' || chr(233) || ' "q"'), 'k' || (i % 3))
  FROM generate_series(1, 20) i;
SELECT resilience.outbox_publish('rotating.e', jsonb_build_object('n', i)) FROM generate_series(1, 10) i;
SELECT resilience.outbox_publish('plain.e', '{"n": 1}');
});
ok(delivered('/signed', 20) && delivered('/rotating', 10) && delivered('/plain', 1), 'the events are delivered');
is(verify('/signed', $new_secret), 'verified 20', 'one secret: every request carries a valid signature');
is(verify('/rotating', $new_secret, $old_secret), 'verified 10',
	'two secrets (rotation): two signatures, each valid under its secret');
like(verify('/signed', $old_secret), qr/no valid signature/, 'a signature does not verify under another secret');
my ($plain) = grep { $_->{path} eq '/plain' } $recv->records;
unlike($plain->{x}, qr/webhook-/, 'an unsigned route sends no webhook headers');

# the rotation ends: the old secret goes, one signature again
$node->safe_psql('postgres', qq{
UPDATE resilience.outbox_routes SET options = '{"signing_secret": "$new_secret"}', target = '@{[ $recv->url('/rotated') ]}'
 WHERE topic_pattern = 'rotating.%';
SELECT resilience.outbox_publish('rotating.e', '{"after": true}');
});
ok(delivered('/rotated', 1), 'an event after the rotation is delivered');
is(verify('/rotated', $new_secret), 'verified 1', 'after the rotation: one signature, under the new secret');

# the secrets show nowhere but in the routes table
my $status = $node->safe_psql('postgres', q{SELECT string_agg(row(s.*)::text, ' ') FROM resilience.outbox_status s});
my $metrics = $node->safe_psql('postgres', q{SELECT resilience.metrics()});
my $log = slurp_file($node->logfile);
for my $s ($new_secret, $old_secret)
{
	(my $b64 = $s) =~ s/^whsec_//;
	unlike($status . $metrics . $log, qr/\Q$b64\E/, 'a secret is in no view, metric or log line');
}

$recv->stop;
$node->stop;
done_testing();
