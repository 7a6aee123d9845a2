#!/usr/bin/env bash
# Find or build PostgreSQL 18; prints the directory of its pg_config.
#
# A PGDG-style install (/usr/lib/postgresql/18/bin/pg_config) is used when
# present.  Otherwise the release tarball (PG18_TARBALL, default: the one in
# ../shared/pg-sources beside the checkout) is built once into a cache outside
# the work tree, keyed by the tarball's checksum, so a second run skips it:
#   ${RESILIENCE_CACHE:-/var/cache/resilience}/postgresql-<version>-<sha256:12>
# Progress goes to stderr; only the bindir goes to stdout.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if [ -x /usr/lib/postgresql/18/bin/pg_config ] && [ -d "$(/usr/lib/postgresql/18/bin/pg_config --pgxs | xargs dirname)" ]; then
	echo /usr/lib/postgresql/18/bin
	exit 0
fi

tarball=${PG18_TARBALL:-$(ls "$SRC_DIR"/../shared/pg-sources/postgresql-18*.tar.* 2>/dev/null | head -n 1 || true)}
[ -n "$tarball" ] && [ -f "$tarball" ] ||
	die "PostgreSQL 18 not found: install postgresql-server-dev-18 (PGDG), set PG18_TARBALL to a release tarball, or run with PG=15"
sum=$(sha256sum "$tarball" | cut -c1-12)
version=$(basename "$tarball" | sed -E 's/^postgresql-(18)?_?([0-9.]+[0-9])\..*$/\2/; s/^18_//')
cache=${RESILIENCE_CACHE:-/var/cache/resilience}
prefix="$cache/postgresql-$version-$sum"
if [ -x "$prefix/bin/pg_config" ] && [ -f "$prefix/.complete" ]; then
	echo "$prefix/bin"
	exit 0
fi

[ "$(id -u)" -eq 0 ] || [ -w "$cache" ] || mkdir -p "$cache" 2>/dev/null || die "cannot write $cache (set RESILIENCE_CACHE)"
if [ "$(id -u)" -eq 0 ]; then
	missing=()
	for p in bison flex libreadline-dev zlib1g-dev libicu-dev libssl-dev pkg-config libipc-run-perl; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		say "Installing: ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
fi

# Run from `make test`, MAKELEVEL is 1 in the environment, and PostgreSQL's
# build then skips generating its headers (errcodes.h, ...), which a release
# tarball does not carry: build as a top-level make.
unset MAKELEVEL MAKEFLAGS MFLAGS
say "Building PostgreSQL $version from $(basename "$tarball") into $prefix (once; a few minutes)"
t0=$(date +%s)
rm -rf "$prefix" "$prefix.build"
mkdir -p "$prefix.build"
tar -C "$prefix.build" -xf "$tarball"
(
	cd "$prefix.build"/postgresql-*/
	./configure --prefix="$prefix" --enable-tap-tests --enable-debug --with-openssl \
		--with-icu --with-readline >"$prefix.build/configure.log" 2>&1 ||
		{ tail -n 30 "$prefix.build/configure.log" >&2; exit 1; }
	make -s -j"$(nproc)" >"$prefix.build/make.log" 2>&1 ||
		{ tail -n 30 "$prefix.build/make.log" >&2; exit 1; }
	make -s install >>"$prefix.build/make.log" 2>&1
	# pg_isolation_regress and isolationtester, which PGXS's ISOLATION needs
	make -s -C src/test/isolation install >>"$prefix.build/make.log" 2>&1
) || die "PostgreSQL $version build failed (log in $prefix.build)"
rm -rf "$prefix.build"
touch "$prefix/.complete"
say "PostgreSQL $version built in $(($(date +%s) - t0)) s"
echo "$prefix/bin"
