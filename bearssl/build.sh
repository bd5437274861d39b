#!/bin/sh
# build.sh OUTDIR [SRCDIR] - build BearSSL 0.6 for dotp.
#
# Produces OUTDIR/libbearssl.a, OUTDIR/inc/*.h (public headers) and
# OUTDIR/brssl (host tool; `brssl ta` turns PEM roots into C).
# Without SRCDIR the source comes from Debian's `bearssl` source package,
# fetched with a private apt configuration under OUTDIR (the system's apt
# setup is only read, never changed). With SRCDIR an unpacked BearSSL tree is
# used instead, for systems that are not Debian.
# Env: CC (default musl-gcc), DOTP_SKIP_DEPS=1 (see deps.sh).
set -eu

die() { echo "bearssl: $*" >&2; exit 1; }

case $# in 1|2) ;; *) die "usage: build.sh OUTDIR [SRCDIR]" ;; esac
here=$(cd "$(dirname "$0")" && pwd)
self=$here/$(basename "$0")
CC=${CC:-musl-gcc}
mkdir -p "$1"
out=$(cd "$1" && pwd)
src=
if [ $# -eq 2 ]; then
	[ -d "$2" ] || die "no such directory: $2"
	src=$(cd "$2" && pwd)
fi

# Up to date: every output is newer than this script, and the stamp says
# they came from the same compiler and source.
stamp="cc=$CC src=${src:-debian}"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
	n=$(cd "$out" && find libbearssl.a brssl inc/bearssl.h .stamp \
		-newer "$self" 2>/dev/null | wc -l)
	[ "$n" -ne 4 ] || exit 0
fi
rm -f "$out/.stamp"
t0=$(date +%s)
t1=$t0
took=

# Tools. musl-gcc comes from musl-tools; nm and ar from binutils.
need="make binutils"
# musl-gcc is a wrapper around gcc, which musl-tools does not pull in
[ "$CC" = musl-gcc ] && need="$need gcc musl-tools"
[ -n "$src" ] || need="$need xz-utils"
# shellcheck disable=SC2086  # a list of package names
sh "$here/deps.sh" $need
command -v "${CC%% *}" >/dev/null 2>&1 || die "compiler not found: $CC"

# Write a deb-src list for the archives the system already uses, to stdout.
# deb822 files (*.sources) win; the one-line sources.list is the fallback.
# Mirror, suites and Signed-By are copied, so no host name lives in the repo.
srclist() {
	set -- /etc/apt/sources.list.d/*.sources
	if [ -f "$1" ]; then
		# Paragraph mode: one stanza per record. Keep the enabled stanzas
		# whose Types include deb or deb-src, and make them deb-src only.
		awk 'BEGIN { RS = ""; FS = "\n" }
		{
			keep = 0; off = 0
			for (i = 1; i <= NF; i++) {
				f = tolower($i)
				if (f ~ /^types:/) keep = (f ~ /[ \t]deb(-src)?([ \t]|$)/)
				if (f ~ /^enabled:[ \t]*no/) off = 1
			}
			if (!keep || off) next
			for (i = 1; i <= NF; i++)
				print (tolower($i) ~ /^types:/ ? "Types: deb-src" : $i)
			print ""
		}' "$@"
		echo .sources
	elif [ -f /etc/apt/sources.list ]; then
		# Only the deb lines: an existing deb-src line for the same archive
		# with other options would make apt fail on the duplicate.
		sed -n 's/^[[:blank:]]*deb[[:blank:]]/deb-src /p' \
			/etc/apt/sources.list | sort -u
		echo .list
	fi
}

fetch() {
	apt=$out/apt
	rm -rf "$apt" "$out/src-dl" "$out/src"
	mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$out/src-dl"
	srclist > "$apt/list.tmp"
	ext=$(tail -n 1 "$apt/list.tmp")
	case $ext in .sources|.list) ;; *) die "no apt sources found in /etc/apt" ;; esac
	sed '$d' "$apt/list.tmp" > "$apt/src$ext"
	rm -f "$apt/list.tmp"
	set -- -o "Dir::Etc::SourceList=$apt/src$ext" \
		-o Dir::Etc::SourceParts=/dev/null \
		-o "Dir::State::Lists=$apt/lists" \
		-o "Dir::Cache=$apt/cache" \
		-o "Dir::Cache::pkgcache=$apt/cache/pkgcache.bin" \
		-o "Dir::Cache::srcpkgcache=$apt/cache/srcpkgcache.bin"
	# As root apt downloads as the _apt user, which cannot reach a
	# build directory under /root (and says so at length): the download
	# runs as root instead. Signed indexes and the SHA-256 check below
	# vouch for what arrives either way.
	[ "$(id -u)" -ne 0 ] || set -- "$@" -o APT::Sandbox::User=root
	log=$out/apt.log
	echo "bearssl: fetching Debian's bearssl source package (log: $log)"
	apt-get -q "$@" update > "$log" 2>&1 ||
		{ tail -n 15 "$log" >&2; die "apt-get update (private lists) failed"; }
	(cd "$out/src-dl" && apt-get -q "$@" source --download-only bearssl) \
		>> "$log" 2>&1 || { tail -n 15 "$log" >&2;
		die "apt-get source --download-only bearssl failed"; }
	rm -rf "$apt/lists" "$apt/cache"    # ~10 MB of indexes, no longer needed

	set -- "$out"/src-dl/*.dsc
	if [ $# -ne 1 ] || [ ! -f "$1" ]; then
		die "expected one .dsc in $out/src-dl"
	fi
	dsc=$1
	# Version pin: upstream part (no epoch, no Debian revision) must be 0.6.
	version=$(sed -n 's/^Version: *//p' "$dsc")
	up=${version#*:}
	up=${up%-*}
	case $up in
	0.6|0.6[+~]*) ;;
	*) die "refusing bearssl version $version (want upstream 0.6)" ;;
	esac

	# Check every file the .dsc lists against its Checksums-Sha256 (apt
	# has checked them too; this does not rely on it).
	awk '/^Checksums-Sha256:/ { on = 1; next } on && /^ / { print $1, $3; next }
		{ on = 0 }' "$dsc" > "$apt/sums"
	orig=
	while read -r sum name; do
		case $name in */*|.*) die "bad file name in .dsc: $name" ;; esac
		f=$out/src-dl/$name
		[ -f "$f" ] || die "missing $name"
		got=$(sha256sum "$f" | cut -d' ' -f1)
		[ "$got" = "$sum" ] || die "SHA-256 mismatch for $name: got $got, .dsc says $sum"
		case $name in *.orig.tar.*) orig=$f ;; esac
	done < "$apt/sums"
	[ -n "$orig" ] || die "no .orig.tar.* in $dsc"

	# Unpack the upstream tarball (one top directory) to OUTDIR/src.
	mkdir "$out/src.tmp"
	tar --no-same-owner -xf "$orig" -C "$out/src.tmp"
	set -- "$out"/src.tmp/*
	if [ $# -ne 1 ] || [ ! -d "$1" ]; then
		die "unexpected layout in $orig"
	fi
	mv "$1" "$out/src"
	rmdir "$out/src.tmp"
	src=$out/src
	desc="$version (Debian source package)"
	t1=$(date +%s)
	took="fetch $((t1 - t0)) s, "
}

if [ -z "$src" ]; then
	fetch
else
	# The tree carries no version string; an upstream tarball's directory
	# name (bearssl-0.6) does.
	case $(basename "$src") in
	bearssl-*) desc="$(basename "$src" | sed 's/^bearssl-//') (source tree $src)" ;;
	*) desc="source tree $src" ;;
	esac
fi
if [ ! -f "$src/inc/bearssl.h" ] || [ ! -f "$src/mk/Rules.mk" ]; then
	die "not a BearSSL source tree: $src"
fi

# Build only the static library and brssl, out of tree, with our flags
# (these override conf/Unix.mk). The T0-generated .c files are shipped, so
# the T0 compiler is never needed. brssl runs on the build host: link it
# statically when the libc is musl.
cflags="-W -Wall -Os -ffunction-sections -fdata-sections"
cflags="$cflags -fno-asynchronous-unwind-tables -fno-unwind-tables"
ldflags=
case $CC in *musl*) ldflags=-static ;; esac
obj=$out/build
rm -rf "$obj"
mkdir -p "$obj/obj"    # make -j would race on creating it
(cd "$src" && make -j2 CC="$CC" CFLAGS="$cflags" LD="$CC" LDFLAGS="$ldflags" \
	BUILD="$obj" lib tools) > "$out/make.log" 2>&1 ||
	die "make failed; see $out/make.log"

# No glibc fortify wrappers may sneak into a library meant for musl.
chk=$(nm "$obj/libbearssl.a" | sed -n 's/.* \(__[A-Za-z0-9_]*_chk\)$/\1/p' |
	sort -u | tr '\n' ' ')
[ -z "$chk" ] || die "libbearssl.a uses fortify symbols: ${chk% }"

rm -rf "$out/inc"
mkdir -p "$out/inc"
cp "$src"/inc/*.h "$out/inc/"
cp "$obj/libbearssl.a" "$out/libbearssl.a"
cp "$obj/brssl" "$out/brssl"
echo "$stamp" > "$out/.stamp"

t2=$(date +%s)
echo "bearssl: $desc built with $CC (${took}build $((t2 - t1)) s):" \
	"$out/libbearssl.a"
