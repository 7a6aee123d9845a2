# Bulkhead permits always come back, and waiters are served in FIFO order.
#  - three waiters are woken one by one, in the order they started waiting;
#  - a holder that ends its session, is terminated, or is killed with kill -9
#    (crash: shared memory is reinitialised) gives its permits back;
#  - a waiter that is terminated, cancelled, or hits statement_timeout leaves
#    the queue, and the permit reaches the next waiter;
#  - a full table (resilience.max_bulkheads) raises 53200 and changes nothing.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('bulkheads');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.reaper_interval = 0
resilience.database_names = ''
resilience.max_bulkheads = 16
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION resilience');

# "in_use/waiting" of a bulkhead
sub counts
{
	my $name = shift;
	return $node->safe_psql('postgres',
		qq{SELECT in_use || '/' || waiting FROM resilience.bulkheads WHERE name = '$name'});
}

# Wait until a bulkhead shows "in_use/waiting"; false if it never does.
sub await_counts
{
	my ($name, $want) = @_;
	return $node->poll_query_until('postgres',
		qq{SELECT in_use || '/' || waiting FROM resilience.bulkheads WHERE name = '$name'},
		$want);
}

sub try_acquire
{
	my ($name, $max) = @_;
	return $node->safe_psql('postgres',
		qq{SELECT resilience.bulkhead_acquire('$name', $max)});
}

# Start a wait in session $s (inside a transaction, so a permit it gets is
# kept) whose result line will be "$tag:t" or "$tag:f".
sub start_wait
{
	my ($s, $name, $tag, $wait) = @_;
	$s->query_until(qr/$tag-sent/,
		"\\echo $tag-sent\nBEGIN;\nSELECT '$tag:' || resilience.bulkhead_acquire('$name', 1, '$wait');\n");
}

# Wait for session $s to print $pattern.
sub await_output
{
	my ($s, $pattern) = @_;
	my $ok = pump_until($s->{run}, $s->{timeout}, \$s->{stdout}, $pattern);
	$s->{stdout} = '';
	return $ok;
}

# --- FIFO: a release wakes the longest waiter ---
my %s = map { $_ => $node->background_psql('postgres') } qw(a b c d);
$s{a}->query_safe(q{BEGIN; SELECT resilience.bulkhead_acquire('fifo', 1)});
my $waiting = 0;
for my $tag (qw(b c d))
{
	start_wait($s{$tag}, 'fifo', $tag, '5 min');
	$waiting++;
	await_counts('fifo', "1/$waiting") or die "waiter $tag never waited";
}
$s{a}->query_safe('COMMIT');
ok(await_output($s{b}, qr/b:t/), 'the first waiter gets the permit released by a commit');
is(counts('fifo'), '1/2', '... and only it: the others still wait');
$s{$_}->{run}->pump_nb for qw(c d);
is($s{c}->{stdout} . $s{d}->{stdout}, '', '... and have no answer yet');
$s{b}->query_safe('ROLLBACK');
ok(await_output($s{c}, qr/c:t/), 'the second waiter is next (woken by a rollback)');
is(counts('fifo'), '1/1', '... and the third still waits');
$s{c}->query_safe('COMMIT');
ok(await_output($s{d}, qr/d:t/), 'the third waiter is last');
$s{d}->query_safe('COMMIT');
is(counts('fifo'), '0/0', 'every permit is back, nobody waits');

# --- holders that go away ---
$s{a}->query_safe(q{SELECT resilience.bulkhead_acquire_session('exit:quit', 1)});
is(try_acquire('exit:quit', 1), 'f', 'a session permit is held');
$s{a}->quit;
ok(await_counts('exit:quit', '0/0'), 'a session that disconnects gives its session permit back');

my $holder = $node->background_psql('postgres', on_error_stop => 0);
my $holder_pid = $holder->query_safe('SELECT pg_backend_pid()');
$holder->query_safe(q{SELECT resilience.bulkhead_acquire_session('exit:term', 1)});
$holder->query_safe(q{BEGIN; SELECT resilience.bulkhead_acquire('exit:term-xact', 1)});
is(counts('exit:term') . ' ' . counts('exit:term-xact'), '1/0 1/0', 'session and transaction permits held');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($holder_pid)");
ok(await_counts('exit:term', '0/0'), 'pg_terminate_backend of a holder gives back its session permit');
ok(await_counts('exit:term-xact', '0/0'), '... and its transaction permit');
$holder->{run}->kill_kill;

# --- waiters that go away ---
$s{b}->query_safe(q{BEGIN; SELECT resilience.bulkhead_acquire('leave', 1)});
my $w1 = $node->background_psql('postgres', on_error_stop => 0);
my $w1_pid = $w1->query_safe('SELECT pg_backend_pid()');
my $w2 = $node->background_psql('postgres', on_error_stop => 0);
my $w2_pid = $w2->query_safe('SELECT pg_backend_pid()');
start_wait($w1, 'leave', 'w1', '5 min');
await_counts('leave', '1/1') or die 'the first waiter never waited';
start_wait($w2, 'leave', 'w2', '5 min');
await_counts('leave', '1/2') or die 'the second waiter never waited';
$node->safe_psql('postgres', "SELECT pg_cancel_backend($w1_pid)");
ok(pump_until($w1->{run}, $w1->{timeout}, \$w1->{stderr}, qr/canceling statement due to user request/),
	'a cancelled waiter gets the cancel error');
ok(await_counts('leave', '1/1'), '... and leaves the queue');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($w2_pid)");
ok(await_counts('leave', '1/0'), 'a terminated waiter leaves the queue');
$w2->{run}->kill_kill;
$w1->{stderr} = '';
$w1->query_safe('ROLLBACK');

# statement_timeout while waiting; the permit then reaches the next waiter
$w1->query_safe(q{SET statement_timeout = '300ms'});
start_wait($w1, 'leave', 'w1', '5 min');
await_counts('leave', '1/1') or die 'the first waiter never waited';
start_wait($s{c}, 'leave', 'c', '5 min');
ok(pump_until($w1->{run}, $w1->{timeout}, \$w1->{stderr}, qr/canceling statement due to statement timeout/),
	'statement_timeout ends a wait');
ok(await_counts('leave', '1/1'), '... and the waiter leaves the queue');
$s{b}->query_safe('COMMIT');
ok(await_output($s{c}, qr/c:t/), 'the permit goes to the waiter that remains');
$s{c}->query_safe('COMMIT');
is(counts('leave'), '0/0', 'nothing is left held or waiting');
$w1->quit;

# --- a full table ---
# idle bulkheads go at the second run_reaper (the first clears "used" marks)
$node->safe_psql('postgres', 'SELECT count(*) FROM resilience.run_reaper()') for 1 .. 2;
my $n = $node->safe_psql('postgres', 'SELECT count(*) FROM resilience.bulkheads');
$s{b}->query_safe(
	"SELECT bool_and(resilience.bulkhead_acquire_session('full:' || i, 1)) FROM generate_series(1, 16 - $n) i");
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.bulkheads'), '16', 'the table is full');
my ($ret, $out, $err) = $node->psql('postgres', q{\set VERBOSITY verbose
SELECT resilience.bulkhead_acquire('full:one-more', 1)});
like($err, qr/53200.*bulkhead table is full/s, 'a new bulkhead in a full table: 53200');
like($err, qr/HINT:.*resilience.max_bulkheads/, '... with a hint');
is($node->safe_psql('postgres', q{SELECT count(*) FROM resilience.bulkheads WHERE name = 'full:one-more'}),
	'0', '... and nothing created');
is(try_acquire('full:1', 2), 't', 'bulkheads already in the table keep working');
$s{b}->quit;
ok(await_counts('full:16', '0/0'), 'permits are back when their session quits');
$node->safe_psql('postgres', 'SELECT count(*) FROM resilience.run_reaper()') for 1 .. 2;
is($node->safe_psql('postgres', 'SELECT count(*) FROM resilience.bulkheads'), '0',
	'run_reaper removes bulkheads nobody holds');

# --- kill -9 of a holder: crash recovery reinitialises shared memory ---
$holder = $node->background_psql('postgres', on_error_stop => 0);
$holder_pid = $holder->query_safe('SELECT pg_backend_pid()');
$holder->query_safe(q{SELECT resilience.bulkhead_acquire_session('k9:session', 1)});
$holder->query_safe(q{BEGIN; SELECT resilience.bulkhead_acquire('k9:xact', 1)});
is(try_acquire('k9:session', 1) . try_acquire('k9:xact', 1), 'ff', 'the permits are held');
kill 'KILL', $holder_pid;
$holder->{run}->kill_kill;
$node->poll_query_until('postgres', 'SELECT 1', '1')
  or die 'the server did not come back after kill -9';
ok($node->log_contains(qr/\(PID \d+\) was terminated by signal 9/), 'the kill was seen as a crash');
is(try_acquire('k9:session', 1), 't', 'after kill -9 of the holder its session permit is back');
is(try_acquire('k9:xact', 1), 't', 'after kill -9 of the holder its transaction permit is back');
is($node->safe_psql('postgres', 'SELECT coalesce(sum(in_use + waiting), 0) FROM resilience.bulkheads'),
	'0', 'nothing is held or waited for after the crash');

$s{c}->quit;
$s{d}->quit;
$node->stop;
done_testing();
