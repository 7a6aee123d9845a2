# Durable quotas (src/quota.c, docs/quotas.md): every decision a committed
# transaction saw as allowed is still counted after
#  - kill -9 of the postmaster,
#  - an immediate shutdown (with resilience.quota_log_ahead = 0),
#  - promotion of a synchronous standby after the primary died,
# each while 4 clients make decisions on their own keys (new keys among
# them, so rows are being added) and on one shared hot key.  Each client
# logs every answer that reached it (autocommit: an answer is a committed
# decision); afterwards every key's usage is at least the client-side count
# of its allowed decisions, and at most that plus the decisions in flight
# plus the key's reservation (logging ahead: min(quota_log_ahead, limit /
# 64) = 32 here; 0 with quota_log_ahead = 0).  The quota keeps counting
# from there.  Deterministic cases of logging ahead: N decisions write
# about N / 33 records (N with quota_log_ahead = 0, and then a crash loses
# and adds nothing); a key whose reservation predates the last checkpoint
# logs again even when another key's record after the checkpoint put an
# image of the page in the WAL; a decision within another transaction's
# unflushed reservation flushes it before its own commit.  On the standby
# before the promotion, the usage is readable and quota() refuses to run
# (25006).  While the synchronous standby is away, a cancelled wait for it
# fails the COMMIT of a transaction that counted something (57014).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(usleep);

my $CLIENTS = 4;
my $LIMIT = 100000000;
my $AHEAD = 32;    # min(resilience.quota_log_ahead, $LIMIT / 64)

my $primary = PostgreSQL::Test::Cluster->new('quota_primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
resilience.database_names = ''
synchronous_commit = on
restart_after_crash = on
# no WAL flush by the background writer: test (b) below must see ours
bgwriter_lru_maxpages = 0
});
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION resilience');

# One script per client: its own keys (50 of them, the first use of each
# adds a row) alternating with the shared hot key.
my $dir = PostgreSQL::Test::Utils::tempdir();
for my $c (1 .. $CLIENTS)
{
	open(my $fh, '>', "$dir/client$c.sql") or die $!;
	for my $i (1 .. 200000)
	{
		my $key = $i % 2 ? "d:hot" : "d:$c:" . ($i % 100);
		print $fh "SELECT '$key', resilience.quota('$key', $LIMIT, 'month');\n";
	}
	close $fh;
}

# Start the clients against node; returns their handles and output files.
sub start_clients
{
	my ($node, $round) = @_;
	my @runs;
	for my $c (1 .. $CLIENTS)
	{
		my $out = "$dir/out_${round}_$c.txt";
		my $h = IPC::Run::start(
			[ 'psql', '-X', '-At', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
			  '-f', "$dir/client$c.sql" ],
			'>', $out, '2>', "$out.err");
		push @runs, [ $h, $out ];
	}
	return \@runs;
}

# Wait for the clients (they stop at the first error) and count, per key,
# the allowed decisions that reached them.
sub finish_clients
{
	my ($runs, $counts) = @_;
	for my $r (@$runs)
	{
		$r->[0]->finish;
		open(my $fh, '<', $r->[1]) or die $!;
		while (my $line = <$fh>)
		{
			chomp $line;
			my ($key, $allowed) = split /\|/, $line;
			next unless defined $allowed;
			die "a decision was refused below the limit: $line" unless $allowed eq 't';
			$counts->{$key}++;
		}
		close $fh;
	}
}

sub set_ahead
{
	my ($node, $ahead) = @_;
	$node->safe_psql('postgres', "ALTER SYSTEM SET resilience.quota_log_ahead = $ahead");
	$node->reload;
	$node->poll_query_until('postgres', "SELECT current_setting('resilience.quota_log_ahead') = '$ahead'")
	  or die "quota_log_ahead did not become $ahead";
}

# Records of the quota resource manager between two LSNs.
sub quota_records
{
	my ($node, $from, $to) = @_;
	my ($dump, $err) = ('', '');
	IPC::Run::run([ 'pg_waldump', '--rmgr=custom187', '-s', $from, '-e', $to,
		'-p', $node->data_dir . '/pg_wal' ], '>', \$dump, '2>', \$err);
	return scalar(() = $dump =~ /^rmgr: custom187 /mg);
}

# Usage of one key.
sub used_of
{
	my ($node, $key) = @_;
	return $node->safe_psql('postgres', "SELECT used FROM resilience.quota_usage WHERE key = '$key'");
}

# Usage per key as the node has it now.
sub usage
{
	my ($node) = @_;
	my %used = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres', q{SELECT key, used FROM resilience.quota_usage WHERE key LIKE 'd:%'});
	return \%used;
}

# Every committed allowed decision counted; per key no more on top than the
# decisions in flight (one per client using the key) and the reservation
# ($ahead), per failure: what an earlier failure added stays counted (the
# rounds add up), so it is carried forward.
my %carried;

sub check_counted
{
	my ($node, $counts, $what, $ahead) = @_;
	my $used = usage($node);
	my @forgotten = grep { ($used->{$_} // 0) < $counts->{$_} } sort keys %$counts;
	is(scalar(@forgotten), 0, "$what: no committed allowed decision forgotten")
	  or diag(join(', ', map { "$_: used " . ($used->{$_} // 'none') . " < $counts->{$_}" } @forgotten[0 .. 4]));
	my @over = grep {
		($used->{$_} // 0) > $counts->{$_} + ($carried{$_} // 0) + $ahead + ($_ eq 'd:hot' ? $CLIENTS : 1)
	} sort keys %$counts;
	my $most = 0;
	for (keys %$counts)
	{
		my $extra = ($used->{$_} // 0) - $counts->{$_} - ($carried{$_} // 0);
		$most = $extra if $extra > $most;
	}
	is(scalar(@over), 0,
		"$what: no key counts more than its decisions in flight and $ahead reserved (most: $most)")
	  or diag(join(', ', map { "$_: used $used->{$_}, acknowledged $counts->{$_}, carried " . ($carried{$_} // 0) } @over[0 .. 4]));
	$carried{$_} = ($used->{$_} // 0) - $counts->{$_} for keys %$counts;
	ok($counts->{'d:hot'} > 200, "$what: the clients made decisions before the failure ($counts->{'d:hot'} on the hot key)");
	my $rows = $node->safe_psql('postgres',
		q{SELECT count(*) = count(DISTINCT key) FROM resilience.quota_usage});
	is($rows, 't', "$what: one row per key");
}

my %counts;

# --- kill -9 of the postmaster ---
# Recovery replays from this checkpoint: the decisions' records (custom
# resource manager 187, src/quota.c), the first after it on each page with
# a full-page image, the others applied by quota_redo.
$primary->safe_psql('postgres', 'CHECKPOINT');
my $wal_start = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
my $runs = start_clients($primary, 'kill9');
sleep 3;
my $wal_end = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
# pg_waldump cannot decode them (it does not load the library): it shows
# them as resource manager custom187, and can count them
my ($dump, $dump_err) = ('', '');
IPC::Run::run([ 'pg_waldump', '--rmgr=custom187', '-s', $wal_start, '-e', $wal_end,
	'-p', $primary->data_dir . '/pg_wal' ], '>', \$dump, '2>', \$dump_err);
my $records = () = $dump =~ /^rmgr: custom187 /mg;
my $fpis = () = $dump =~ /^rmgr: custom187 .*FPW/mg;
cmp_ok($records - $fpis, '>', 50,
	"the decisions were logged by the custom resource manager ($records records, $fpis with a full-page image)")
  or diag($dump_err);
$primary->kill9;
finish_clients($runs, \%counts);
# its children notice the postmaster's death and leave; start once they have
my $started = 0;
for (1 .. 60)
{
	last if ($started = $primary->start(fail_ok => 1));
	$primary->{_pid} = undef;    # the failed start read the dead postmaster's pid file
	sleep 1;
}
ok($started, 'the server starts again after kill -9 of the postmaster');
check_counted($primary, \%counts, 'kill -9 of the postmaster', $AHEAD);

# --- immediate shutdown, every decision logged ---
set_ahead($primary, 0);
$runs = start_clients($primary, 'immediate');
sleep 3;
$primary->stop('immediate');
finish_clients($runs, \%counts);
$primary->start;
check_counted($primary, \%counts, 'immediate shutdown, quota_log_ahead = 0', 0);
set_ahead($primary, $AHEAD);

# The counters are exact again: count on from what was kept.
my $before = usage($primary)->{'d:hot'};
$primary->safe_psql('postgres', q{SELECT resilience.quota('d:hot', 100000000, 'month') FROM generate_series(1, 10)});
is(usage($primary)->{'d:hot'}, $before + 10, 'after recovery the hot key counts on from its usage');
$counts{'d:hot'} += 10;

# --- logging ahead, case by case ---
my $N = 3300;
for my $ahead ($AHEAD, 0)
{
	set_ahead($primary, $ahead);
	my $key = "n:$ahead";
	$primary->safe_psql('postgres', "SELECT resilience.quota('$key', $LIMIT, 'month')");
	my $from = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
	$primary->safe_psql('postgres',
		"SELECT count(*) FROM generate_series(1, $N) WHERE resilience.quota('$key', $LIMIT, 'month')");
	my $to = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
	my $n = quota_records($primary, $from, $to);
	my $expect = int($N / ($ahead + 1));
	ok($n >= $expect && $n <= $expect + 2,
		"$N decisions on one key, quota_log_ahead = $ahead: $n records (about $expect)");
	is(used_of($primary, $key), $N + 1, "quota_log_ahead = $ahead: the page holds the true usage");
	$primary->stop('immediate');
	$primary->start;
	my $used = used_of($primary, $key);
	if ($ahead == 0)
	{
		is($used, $N + 1, 'quota_log_ahead = 0: after a crash the usage is exact');
	}
	else
	{
		ok($used >= $N + 1 && $used <= $N + 1 + $ahead,
			"quota_log_ahead = $ahead: after a crash $used counted for " . ($N + 1) . ' made (at most the reservation more)');
	}
}
set_ahead($primary, $AHEAD);

# (a) Two keys on one page; b's reservation is older than the checkpoint,
# then a's record puts an image of the page (b at its true usage) in the
# WAL.  b's next decisions must log (its reservation would not be
# replayed), not change the page in place.
$primary->safe_psql('postgres', qq{SELECT resilience.quota('p:' || i, $LIMIT, 'month') FROM generate_series(1, 3) i});
my ($ka, $kb) = split /\|/, $primary->safe_psql('postgres', q{
	SELECT min(key), max(key) FROM resilience.quota_usage WHERE key LIKE 'p:%'
	 GROUP BY (ctid::text::point)[0] HAVING count(*) >= 2 LIMIT 1});
ok(defined $kb, "two keys on one page ($ka, $kb)");
$primary->safe_psql('postgres', 'CHECKPOINT');
$primary->safe_psql('postgres', qq{SELECT resilience.quota('$ka', $LIMIT, 'month')});
$primary->safe_psql('postgres', qq{SELECT resilience.quota('$kb', $LIMIT, 'month')}) for 1 .. 10;
$primary->stop('immediate');
$primary->start;
cmp_ok(used_of($primary, $kb), '>=', 11,
	"a reservation older than the checkpoint is renewed after it (${kb}'s 11 decisions kept)");

# (b) A decision within a reservation that another, still open transaction
# logged must flush that record before its own commit.
$primary->safe_psql('postgres', q{SELECT resilience.quota('f:x', 100000000, 'month')});
$primary->safe_psql('postgres', 'CHECKPOINT');
my $open = $primary->background_psql('postgres');
$open->query_safe(q{BEGIN; SELECT resilience.quota('f:x', 100000000, 'month')});
$primary->safe_psql('postgres', q{SELECT resilience.quota('f:x', 100000000, 'month')});
$primary->stop('immediate');
eval { $open->quit };
$primary->start;
cmp_ok(used_of($primary, 'f:x'), '>=', 2,
	'a committed decision within an uncommitted reservation survives a crash');

# the crashes above may have charged the clients' keys their reservations
my $now_used = usage($primary);
$carried{$_} = $now_used->{$_} - $counts{$_} for keys %counts;

# --- a synchronous standby, promoted after the primary dies ---
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('quota_standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;
$primary->append_conf('postgresql.conf', "synchronous_standby_names = 'quota_standby'");
$primary->reload;
$primary->poll_query_until('postgres',
	q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'quota_standby'})
  or die 'the standby did not become synchronous';

my ($ret, $stdout, $stderr) = $standby->psql('postgres',
	q{SELECT resilience.quota('d:hot', 100000000, 'month')});
like($stderr, qr/cannot execute quota\(\) during recovery/, 'a standby refuses to count');
$standby->poll_query_until('postgres',
	qq{SELECT used >= $counts{'d:hot'} FROM resilience.quotas WHERE key = 'd:hot'})
  or die 'the standby does not show the usage';
pass('a hot standby reads the usage');

# With the synchronous standby away, a transaction that counted something
# does not commit: cancelling its wait for the standby fails the COMMIT
# (57014) instead of returning it with a warning.  The decision stays
# counted, as a rolled-back one does.
$standby->stop;
my ($out, $err) = ('', '');
my $h = IPC::Run::start(
	[ 'psql', '-X', '-At', '-d', $primary->connstr('postgres'),
	  '-c', q{SELECT resilience.quota('u:unconfirmed', 10, 'day')} ],
	'>', \$out, '2>', \$err);
$primary->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM pg_stat_activity
	 WHERE wait_event = 'SyncRep' AND query LIKE '%u:unconfirmed%'})
  or die 'the decision did not wait for the standby';
$primary->safe_psql('postgres', q{
	SELECT pg_cancel_backend(pid) FROM pg_stat_activity
	 WHERE wait_event = 'SyncRep' AND query LIKE '%u:unconfirmed%'});
$h->finish;
like($err, qr/not committed: the synchronous standby has not confirmed its quota decisions/,
	'a cancelled wait for the synchronous standby fails the commit');
is($out, '', 'no answer reached the client');
is($primary->safe_psql('postgres', q{SELECT used FROM resilience.quotas WHERE key = 'u:unconfirmed'}),
	'1', 'the unconfirmed decision stays counted');
$standby->start;
$primary->poll_query_until('postgres',
	q{SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = 'quota_standby'})
  or die 'the standby did not become synchronous again';

$runs = start_clients($primary, 'failover');
sleep 3;
$primary->stop('immediate');
finish_clients($runs, \%counts);
$standby->promote;
check_counted($standby, \%counts, 'promotion of the synchronous standby', $AHEAD);

$before = usage($standby)->{'d:hot'};
$standby->safe_psql('postgres', q{SELECT resilience.quota('d:hot', 100000000, 'month') FROM generate_series(1, 10)});
is(usage($standby)->{'d:hot'}, $before + 10, 'the promoted standby counts on');

# A small limit on the new primary is still exact.
is($standby->safe_psql('postgres',
	q{SELECT count(*) FILTER (WHERE resilience.quota('d:small', 3, 'day')) FROM generate_series(1, 10)}),
	'3', 'the promoted standby admits exactly the limit');

$standby->stop;
done_testing();
