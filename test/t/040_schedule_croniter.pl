# cron_next against an independent implementation: Debian's python3-croniter
# (installed by tools/cluster.sh), run here, computes the next time of every
# expression below from every start instant in every zone; cron_next must
# give the same instant.  croniter matches the fields on wall-clock times, and
# Python's zoneinfo turns them into instants by the rule docs/schedules.md
# states (a repeated time at its first occurrence, a skipped one read with
# the offset before the change: PEP 495's fold=0).  croniter 1.3.5's own
# zone handling is not used: it gets the offset wrong across a change, with
# pytz or zoneinfo alike (0 0 1 1 * in New York from July came out at 01:00
# EST).  The starts include the hours around both changes of summer time in
# each zone that has them (Berlin, New York, Sydney, and Lord Howe's
# half-hour shift).
#
# Left out on purpose, where croniter 1.3.5 is known to differ: a day list
# with a day some month lacks (1,11,21,31 skips March 1st after February
# 28th), and a '*/n' or full range in the day-of-month or day-of-week field
# next to a restricted other one (croniter ORs them; Vixie cron, pg_cron and
# this extension AND them, as sql/schedules_cron.sql shows).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Temp qw(tempfile);

my $python = '/usr/bin/python3';
my $probe = `$python -c 'import croniter' 2>&1`;
BAIL_OUT("python3-croniter is missing (apt-get install python3-croniter): $probe") if $?;

my @exprs = (
	'* * * * *', '*/5 * * * *', '*/7 * * * *', '0 * * * *', '30 * * * *', '15,45 * * * *',
	'0 */2 * * *', '0 */3 * * *', '10 2 * * *', '30 2 * * *', '0 3 * * *', '30 1 * * *',
	'45 23 * * *', '0 0 * * *', '59 23 31 12 *', '0 12 * * mon-fri', '0 9 * * 1-5',
	'0 0 * * sun', '0 0 * * 0', '0 0 * * 7', '30 6 * * sat,sun', '0 8-18/2 * * *',
	'0 9-17 * * *', '5-10 * * * *', '0 0 1 * *', '0 0 15 * *', '0 0 31 * *', '0 0 29 2 *',
	'0 0 1 1 *', '0 0 1 jan,apr,jul,oct *', '0 0 L * *', '0 12 13 * fri', '0 0 1,15 * mon',
	'20 4 * mar-oct *', '0 0 * feb *', '0 2 * * 6', '*/20 1-3 * * *', '0 1-4 * * *',
	'0 0 10-20 * *', '0 22 * * 1-5', '@hourly', '@daily', '@weekly', '@monthly', '@yearly',
	'1 2 3 4 *', '0 0 28-31 * *', '0 3 * 3,10 sun', '45 1,2,3 * * *', '0 0 2/10 * *',
);
# 'L' is croniter's extension, not cron's: drop it
@exprs = grep { $_ ne '0 0 L * *' } @exprs;

my %starts = (
	'UTC' => ['2026-03-29 01:10', '2026-06-30 23:59'],
	'Asia/Kolkata' => ['2026-03-29 01:10', '2026-06-30 23:59'],
	'Europe/Berlin' => ['2026-03-29 01:10', '2026-03-28 23:55', '2026-10-25 01:10',
		'2026-10-24 23:50', '2026-10-25 03:05', '2026-03-29 03:00'],
	'America/New_York' => ['2026-03-08 01:10', '2026-03-07 23:55', '2026-11-01 00:10',
		'2026-10-31 23:50', '2026-11-01 02:05'],
	'Australia/Sydney' => ['2026-04-05 01:10', '2026-04-04 23:50', '2026-10-04 01:10',
		'2026-10-03 23:50'],
	'Australia/Lord_Howe' => ['2026-04-05 01:10', '2026-10-04 01:10', '2026-10-04 02:40'],
);
my @common = ('2026-01-15 10:07', '2026-07-15 23:59', '2026-12-31 23:30', '2028-02-28 12:00');

# The cases: expression | zone | local start (read as its first occurrence)
my ($fh, $cases) = tempfile(UNLINK => 1);
my $ncases = 0;
for my $zone (sort keys %starts)
{
	for my $start (@common, @{ $starts{$zone} })
	{
		for my $expr (@exprs)
		{
			print $fh "$expr|$zone|$start\n";
			$ncases++;
		}
	}
}
close $fh;

my $script = <<'PY';
import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo
from croniter import croniter
# croniter matches the fields on naive wall-clock times (its zone handling
# is not used: 1.3.5 gets the offset wrong across a change); zoneinfo maps
# each wall time to its instant with fold=0: the first occurrence of a
# repeated time, the offset before the change for a skipped one (PEP 495).
for line in open(sys.argv[1]):
    expr, zone, start = line.rstrip('\n').split('|')
    tz = ZoneInfo(zone)
    local = datetime.strptime(start, '%Y-%m-%d %H:%M').replace(tzinfo=tz)
    it = croniter(expr, local.replace(tzinfo=None) - timedelta(hours=3))
    best, first_wall, tag = None, None, 'plain'
    while True:
        wall = it.get_next(datetime)
        if first_wall is not None and wall > first_wall + timedelta(hours=3):
            break
        instant = wall.replace(tzinfo=tz).astimezone(timezone.utc)
        if instant <= local:
            continue
        back = instant.astimezone(tz).replace(tzinfo=None)
        skipped = back != wall
        repeated = wall.replace(tzinfo=tz, fold=1).utcoffset() != wall.replace(tzinfo=tz).utcoffset() and not skipped
        if best is None or instant < best:
            best, tag = instant, 'skipped' if skipped else 'repeated' if repeated else 'plain'
        if first_wall is None:
            first_wall = wall
        if not skipped:
            break
    print('|'.join([expr, zone, local.astimezone(timezone.utc).isoformat(), best.isoformat(), tag]))
PY
my ($pf, $pyfile) = tempfile(SUFFIX => '.py', UNLINK => 1);
print $pf $script;
close $pf;
my @expected = split /\n/, `$python $pyfile $cases`;
is($?, 0, 'croniter ran');
is(scalar @expected, $ncases, "croniter computed all $ncases cases");
cmp_ok($ncases, '>=', 40 * 8, 'at least 40 expressions x starts x zones');

my $node = PostgreSQL::Test::Cluster->new('croniter');
$node->init;
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION resilience');

# One query: each case's cron_next in UTC, in the same order.
my @values;
for my $row (@expected)
{
	my ($expr, $zone, $start) = split /\|/, $row;
	push @values, sprintf("(%d, '%s', '%s'::timestamptz, '%s')", scalar @values, $expr, $start, $zone);
}
my $got = $node->safe_psql('postgres', qq{
SET timezone = 'UTC';
SELECT pg_catalog.to_char(resilience.cron_next(e, s, z), 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')
  FROM (VALUES @{[ join(",\n", @values) ]}) AS c(i, e, s, z) ORDER BY i});
my @got = split /\n/, $got;
is(scalar @got, $ncases, 'cron_next computed all cases');

my $mismatches = 0;
my %tags;
for my $i (0 .. $#expected)
{
	my ($expr, $zone, $start, $want, $tag) = split /\|/, $expected[$i];
	$tags{$tag}++;
	next if defined $got[$i] && $got[$i] eq $want;
	$mismatches++;
	diag("'$expr' in $zone after $start: croniter $want, cron_next " . ($got[$i] // 'nothing'))
	  if $mismatches <= 30;
}
is($mismatches, 0, "cron_next agrees with croniter on all $ncases cases");
note("next times that fall in a skipped hour: " . ($tags{skipped} // 0)
	  . ", in a repeated hour: " . ($tags{repeated} // 0));
cmp_ok($tags{skipped} // 0, '>', 0, 'some next times fall in a skipped hour');
cmp_ok($tags{repeated} // 0, '>', 0, 'some next times fall in a repeated hour');

# Both changes of summer time are in the table: a 02:30 job runs once on
# each of Berlin's change days.
is( $node->safe_psql('postgres', q{
SET timezone = 'UTC';
WITH RECURSIVE s(t) AS (
    SELECT resilience.cron_next('30 2 * * *', '2026-03-28 00:00+00', 'Europe/Berlin')
    UNION ALL
    SELECT resilience.cron_next('30 2 * * *', t, 'Europe/Berlin') FROM s
     WHERE t < '2026-10-27 00:00+00')
SELECT count(*) FILTER (WHERE (t AT TIME ZONE 'Europe/Berlin')::date = '2026-03-29'),
       count(*) FILTER (WHERE (t AT TIME ZONE 'Europe/Berlin')::date = '2026-10-25')
  FROM s}), '1|1', 'a 02:30 job fires once on each change day');

$node->stop;
done_testing();
