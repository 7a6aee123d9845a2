# Which SQL functions docs/*.md documents, for test/t/019_docs.pl.
#
# A function is documented when a page gives its signature: a line that
# starts (after spaces) with
#
#     resilience.NAME(arg type [DEFAULT value], ...) → return type
#     CALL resilience.NAME(arg type [DEFAULT value], ...)        (procedures)
#     `NAME(arg type [DEFAULT value], ...) → return type` ...    (in prose)
#     | `NAME(arg type [DEFAULT value], ...)` | ...              (a table row)
#
# (the resilience. prefix optional in the last two) with the arguments in
# the form pg_get_function_arguments prints ("= value" for a default is
# accepted too; OUT arguments may be listed, and are ignored).  The signature documents the overload whose input
# arguments have exactly those names, in that order, with a DEFAULT on
# exactly the arguments that have one.  A call in an example
# (resilience.rate_limit('k', 10, 1)) is not a signature: its arguments are
# not "name type", and a function call without "→" after it is not one either.
package DocsCheck;

use strict;
use warnings;

# Split an argument list at its top-level commas (quotes and brackets kept).
sub split_args
{
	my ($s) = @_;
	my (@parts, $cur, $depth, $quote);
	($cur, $depth, $quote) = ('', 0, '');
	for my $c (split //, $s)
	{
		if ($quote)
		{
			$quote = '' if $c eq $quote;
		}
		elsif ($c eq "'" || $c eq '"')
		{
			$quote = $c;
		}
		elsif ($c eq '(' || $c eq '[')
		{
			$depth++;
		}
		elsif ($c eq ')' || $c eq ']')
		{
			$depth--;
		}
		elsif ($c eq ',' && $depth == 0)
		{
			push @parts, $cur;
			$cur = '';
			next;
		}
		$cur .= $c;
	}
	push @parts, $cur if $cur =~ /\S/;
	return @parts;
}

# Parse "[IN|OUT|INOUT|VARIADIC] name type [DEFAULT expr]" into
# { mode, name, default }, or undef when it is not a declaration.
sub parse_arg
{
	my ($e) = @_;
	$e =~ s/^\s+|\s+$//g;
	my $mode = 'IN';
	$mode = uc $1 if $e =~ s/^(IN|OUT|INOUT|VARIADIC)\s+//i;
	return undef if $e =~ /=>|:=/;
	return undef unless $e =~ /^("[^"]+"|[A-Za-z_][A-Za-z0-9_]*)\s+([A-Za-z_"].*)$/s;
	my ($name, $rest) = ($1, $2);
	$name =~ s/"//g;
	return { mode => $mode, name => $name,
		default => ($rest =~ /\bDEFAULT\b|\s=\s/i ? 1 : 0) };
}

# The input arguments of an argument list, as "name" or "name=" (with a
# default), joined by commas; undef when the list does not parse.
sub input_key
{
	my ($list) = @_;
	my @in;
	for my $e (split_args($list))
	{
		my $a = parse_arg($e);
		return undef unless $a;
		next if $a->{mode} eq 'OUT';
		push @in, $a->{name} . ($a->{default} ? '=' : '');
	}
	return join(',', @in);
}

# The text between the "(" at $pos - 1 and its matching ")"; undef if none.
sub balanced
{
	my ($text, $pos) = @_;
	my ($depth, $quote, $i) = (1, '', $pos);
	for (; $i < length $text; $i++)
	{
		my $c = substr($text, $i, 1);
		if ($quote) { $quote = '' if $c eq $quote; next; }
		if ($c eq "'" || $c eq '"') { $quote = $c; next; }
		$depth++ if $c eq '(';
		if ($c eq ')' && --$depth == 0)
		{
			return (substr($text, $pos, $i - $pos), $i + 1);
		}
	}
	return;
}

# Every signature in the given files: a list of { name, key, where }.
sub signatures
{
	my @files = @_;
	my @sigs;
	for my $file (@files)
	{
		open my $fh, '<', $file or die "$file: $!";
		my $text = do { local $/; <$fh> };
		close $fh;
		while ($text =~ /^(?:[ \t]*(CALL[ \t]+)?resilience\.|(\|[ \t]*`(?:CALL[ \t]+)?(?:resilience\.)?)|`(?:resilience\.)?)([a-z_][a-z0-9_]*)\(/mg)
		{
			my ($call, $row, $name, $start) = ($1, $2, $3, pos($text));
			my ($args, $end) = balanced($text, $start);
			next unless defined $args;
			my $after = substr($text, $end, 40);
			my $arrow = $after =~ /^\s*(→|->)/;
			$arrow = 1 if $row && $after =~ /^[^`\n]*`/;    # a table row: `name(args)`
			next unless $call || $arrow;
			my $key = input_key($args);
			next unless defined $key;
			next if !$arrow && $key eq '';    # CALL x() in an example
			my $line = 1 + (substr($text, 0, $start) =~ tr/\n//);
			push @sigs, { name => $name, key => $key, where => "$file:$line" };
			pos($text) = $end;
		}
	}
	return @sigs;
}

1;
