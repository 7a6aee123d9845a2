# The documentation covers the extension (issue 9):
#  - every public function and procedure of the extension (every overload;
#    names starting with "_" are internal) has its signature in docs/*.md,
#    with the same argument names in the same order and DEFAULT on the same
#    arguments (the rules are in test/perl/DocsCheck.pm);
#  - every signature in docs/*.md is one of the extension's: no function
#    documented that does not exist, no stale argument list;
#  - every table and view of the schema is named in docs/*.md;
#  - every setting (pg_settings) is a row of the table "Every setting" of
#    docs/operations.md with its default (as SHOW prints it) and context, and
#    every row of that table is a setting;
#  - README.md links to every page of docs/, and every relative link of
#    README.md and docs/*.md leads to a file that exists, and to a heading
#    that exists when it names one.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use DocsCheck;

my @pages = sort glob('docs/*.md');
ok(@pages >= 8, 'docs/ has its pages') or diag('run from the source tree');

my $node = PostgreSQL::Test::Cluster->new('docs');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'resilience'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION resilience');

# The extension's functions, one line per overload: name|kind|arguments.
my @procs = split /\n/, $node->safe_psql('postgres', q{
	SELECT p.proname || '|' || p.prokind::text || '|' || pg_get_function_arguments(p.oid)
	  FROM pg_proc p
	  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'resilience'
	 ORDER BY 1});
ok(@procs > 50, 'the extension has its functions');

# Nothing in the schema that the extension does not own.
is($node->safe_psql('postgres', q{
	SELECT string_agg(p.oid::regprocedure::text, ', ')
	  FROM pg_proc p
	 WHERE p.pronamespace = 'resilience'::regnamespace
	   AND NOT EXISTS (SELECT FROM pg_depend d
	                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')}),
	'', 'every function of schema resilience belongs to the extension');

my @sigs = DocsCheck::signatures(@pages);
my %documented;
$documented{"$_->{name}($_->{key})"} = 1 for @sigs;

my %exists;
for my $line (@procs)
{
	my ($name, $kind, $args) = split /\|/, $line, 3;
	my $key = DocsCheck::input_key($args);
	ok(defined $key, "the arguments of $name parse") or next;
	$exists{"$name($key)"} = 1;
	next if $name =~ /^_/;
	my $what = ($kind eq 'p' ? 'procedure' : 'function') . " resilience.$name($args)";
	ok($documented{"$name($key)"}, "$what is documented")
	  or diag("$what: give its signature on its page in docs/ (see test/perl/DocsCheck.pm); "
		  . 'documented signatures of it: '
		  . join('; ', map { "$_->{where} ($_->{key})" } grep { $_->{name} eq $name } @sigs));
}

for my $s (@sigs)
{
	ok($exists{"$s->{name}($s->{key})"},
		"$s->{where}: resilience.$s->{name}($s->{key}) exists")
	  or diag("no such function or argument list in the extension; its overloads: "
		  . join('; ', grep { /^\Q$s->{name}\E\(/ } sort keys %exists));
}

# Tables and views: named as resilience.name, or `name`, somewhere in docs/.
my $alltext = '';
for my $file (@pages)
{
	open my $fh, '<', $file or die "$file: $!";
	local $/;
	$alltext .= <$fh>;
	close $fh;
}
for my $rel (split /\n/, $node->safe_psql('postgres', q{
	SELECT c.relname FROM pg_class c
	 WHERE c.relnamespace = 'resilience'::regnamespace AND c.relkind IN ('r', 'v', 'p')
	 ORDER BY 1}))
{
	ok($alltext =~ /resilience\.\Q$rel\E\b|`\Q$rel\E`/, "table or view resilience.$rel is named in docs/");
}

# Settings: docs/operations.md has a row "| `name` | `default` | context |".
my %rows;
open my $ops, '<', 'docs/operations.md' or die "docs/operations.md: $!";
while (my $l = <$ops>)
{
	$rows{$1} = [ $2, $3 ] if $l =~ /^\|\s*`(resilience\.[a-z_]+)`\s*\|\s*`([^`]*)`\s*\|\s*([a-z]+)\s*\|/;
}
close $ops;
my %settings;
for my $line (split /\n/, $node->safe_psql('postgres', q{
	SELECT name || '|' || current_setting(name) || '|' || context
	  FROM pg_settings WHERE name LIKE 'resilience.%' ORDER BY 1}))
{
	my ($name, $value, $context) = split /\|/, $line, 3;
	$settings{$name} = 1;
	$value = "''" if $value eq '';
	my $row = $rows{$name};
	ok($row, "setting $name has a row in docs/operations.md") or next;
	is($row->[0], $value, "docs/operations.md: the default of $name");
	is($row->[1], $context, "docs/operations.md: the context of $name");
}
ok(keys %settings >= 30, 'the library defines its settings');
ok($settings{$_}, "docs/operations.md: $_ is a setting") for sort keys %rows;

# Links.
sub slug
{
	my ($heading) = @_;
	$heading = lc $heading;
	$heading =~ s/[^\w\- ]//g;
	$heading =~ s/ /-/g;
	return $heading;
}
my %anchors;
sub anchors_of
{
	my ($file) = @_;
	return $anchors{$file} if $anchors{$file};
	my %a;
	open my $fh, '<', $file or die "$file: $!";
	my $fence = 0;
	while (my $l = <$fh>)
	{
		$fence = !$fence if $l =~ /^```/;
		next if $fence;
		$a{ slug($1) } = 1 if $l =~ /^#+\s+(.*?)\s*$/;
	}
	close $fh;
	return $anchors{$file} = \%a;
}
my %readme_links;
for my $file ('README.md', @pages)
{
	open my $fh, '<', $file or die "$file: $!";
	my $text = do { local $/; <$fh> };
	close $fh;
	$text =~ s/^```.*?^```//msg;    # code blocks
	my $dir = $file =~ m{/} ? 'docs/' : '';
	while ($text =~ /\]\(([^)\s]+)\)/g)
	{
		my $link = $1;
		next if $link =~ m{^[a-z]+:};    # http:, https:, mailto:
		my ($path, $anchor) = split /#/, $link, 2;
		my $target = $path eq '' ? $file : $dir . $path;
		1 while $target =~ s{[^/]+/\.\./}{};
		$readme_links{$target} = 1 if $file eq 'README.md';
		ok(-e $target, "$file: link $link leads to a file") or next;
		next unless defined $anchor && $target =~ /\.md$/;
		ok(anchors_of($target)->{$anchor}, "$file: link $link leads to a heading")
		  or diag("headings of $target: " . join(' ', sort keys %{ anchors_of($target) }));
	}
}
ok($readme_links{$_}, "README.md links to $_") for @pages;

$node->stop;
done_testing();
