#!/usr/bin/env bash
# Find or build Citus for the PostgreSQL 18 build; prints nothing on stdout,
# exits 0 when `CREATE EXTENSION citus` will work with that build.
#
# Usage: tools/citus.sh <pg18 bindir>
#
# An installed Citus (citus.so in the server's pkglibdir, e.g. from Citus's
# own packages) is used as is.  Otherwise the source tarball (CITUS_TARBALL,
# default: the one in ../shared/citus-sources beside the checkout) is built
# once, staged with DESTDIR into a cache directory next to the PostgreSQL 18
# build, keyed by the tarball's checksum:
#   ${RESILIENCE_CACHE:-/var/cache/resilience}/citus-<version>-<sha256:12>
# and its library and extension files are copied into the installation of
# <pg18 bindir> (make test passes its private copy, so the cached PostgreSQL
# stays as built; the Citus build itself happens once, ~4 minutes).
# Citus 14 supports PostgreSQL 16-18, never 15: the caller decides to run it.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

bindir=${1:?usage: tools/citus.sh <pg18 bindir>}
pg_config="$bindir/pg_config"
pkglibdir=$("$pg_config" --pkglibdir)
sharedir=$("$pg_config" --sharedir)
if [ -f "$pkglibdir/citus.so" ] && [ -f "$sharedir/extension/citus.control" ]; then
	exit 0
fi

tarball=${CITUS_TARBALL:-$(ls "$SRC_DIR"/../shared/citus-sources/citus-*.tar.* 2>/dev/null | head -n 1 || true)}
[ -n "$tarball" ] && [ -f "$tarball" ] ||
	die "Citus not found: install it from Citus's packages, or set CITUS_TARBALL to a source tarball"
sum=$(sha256sum "$tarball" | cut -c1-12)
version=$(basename "$tarball" | sed -E 's/^citus-([0-9.]+[0-9])\..*$/\1/')
cache=${RESILIENCE_CACHE:-/var/cache/resilience}
stage="$cache/citus-$version-$sum"

# one build at a time (several make test runs may start together)
mkdir -p "$cache"
exec 9>"$stage.lock"
flock 9
if ! [ -f "$stage/.complete" ]; then
	if [ "$(id -u)" -eq 0 ]; then
		missing=()
		for p in liblz4-dev libzstd-dev libcurl4-openssl-dev; do
			dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
		done
		if [ ${#missing[@]} -gt 0 ]; then
			say "Installing: ${missing[*]}"
			export DEBIAN_FRONTEND=noninteractive
			apt-get update -qq
			apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
		fi
	fi
	say "Building Citus $version from $(basename "$tarball") into $stage (once; a few minutes)"
	t0=$(date +%s)
	rm -rf "$stage" "$stage.build"
	mkdir -p "$stage.build"
	tar -C "$stage.build" -xf "$tarball"
	(
		cd "$stage.build"/citus-*/
		./configure PG_CONFIG="$pg_config" >"$stage.build/configure.log" 2>&1 ||
			{ tail -n 30 "$stage.build/configure.log" >&2; exit 1; }
		make -s -j"$(nproc)" >"$stage.build/make.log" 2>&1 ||
			{ tail -n 30 "$stage.build/make.log" >&2; exit 1; }
		make -s install DESTDIR="$stage" >>"$stage.build/make.log" 2>&1
	) || die "Citus $version build failed (log in $stage.build)"
	rm -rf "$stage.build"
	touch "$stage/.complete"
	say "Citus $version built in $(($(date +%s) - t0)) s"
fi

# Copy the server's part of the stage (whatever absolute paths the build
# used) into this installation: the libraries and the extension files.
lib=$(find "$stage" -name citus.so -print -quit)
ext=$(find "$stage" -name citus.control -print -quit)
[ -n "$lib" ] && [ -n "$ext" ] || die "Citus stage $stage is incomplete (remove it to rebuild)"
cp -a "$(dirname "$lib")/." "$pkglibdir/"
cp -a "$(dirname "$ext")/." "$sharedir/extension/"
