#!/bin/sh
# newcomer.sh - the README's first command on a fresh minimal Debian root,
# as root and as a normal user, in a network namespace with no route out.
#
#   1. base: `debootstrap --variant=minbase` of this machine's release,
#      made once and kept as build/newcomer/base.tar (the mirror is read
#      from the system's apt sources, as bearssl/build.sh does).
#   2. archive: the packages the first command installs and Debian's
#      bearssl source package, downloaded once (in a scratch copy of base,
#      with this machine's network) into build/newcomer/archive and indexed
#      with apt-ftparchive. Each fresh root gets it as its only apt source
#      (file:, trusted): a bare machine whose archive happens to be local,
#      so that the runs below need no network at all.
#   3. For root, then for a user: base unpacked afresh, this repository
#      cloned into it (HEAD, as `git clone` gives it), then inside
#      `unshare -n -m` (loopback only) and chroot:
#        root: the README's line above the two commands (apt-get ... make),
#              then `make run`;
#        user: root runs that line; the user runs `make run`, which must
#              stop and print the one command that installs the rest; root
#              runs that command; the user runs `make run` again.
#      Passes when `make run` builds ./dotp and dotp logs its start line.
#      dotp has no route anywhere: its default upstreams are never reached.
#
# Needs root, debootstrap, apt-ftparchive (apt-utils) and git; says so and
# exits 0 (skipped) without them. NEWCOMER_KEEP=1 keeps the roots.
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$repo/build/newcomer
t0=$(date +%s)

say() { echo "newcomer: $*"; }
die() { echo "newcomer: FAIL: $*" >&2; exit 1; }
skip() { say "SKIPPED: $*"; exit 0; }

[ "$(id -u)" -eq 0 ] || skip "needs root (debootstrap and chroot)"
for c in debootstrap apt-ftparchive git unshare chroot ip tar; do
	command -v "$c" >/dev/null 2>&1 || skip "$c is not installed"
done

# The README's line above the two commands: the backquoted command after
# "as root:" on the line that names what the first command cannot install.
prereq=$(sed -n 's/^On a bare machine, first, as root: `\([^`]*\)`.*/\1/p' README.md)
[ -n "$prereq" ] || die "README.md has no 'On a bare machine, first, as root:' line"
first=$(sed -n '/^## The two commands/,/^## /s/^\(make [a-z]*\) .*/\1/p' README.md |
	head -n 1)
[ "$first" = "make run" ] || die "README's first command is '$first', not 'make run'"

mkdir -p "$work"
log=$work/newcomer.log
: > "$log"

# --- 1. the base root ----------------------------------------------------
mirror() {
	set -- /etc/apt/sources.list.d/*.sources
	if [ -f "$1" ]; then
		sed -n 's/^URIs:[[:blank:]]*\([^[:blank:]]*\).*/\1/p' "$@" |
			grep -v security | head -n 1
	else
		sed -n 's/^deb[[:blank:]]\{1,\}\(\[[^]]*\][[:blank:]]\{1,\}\)\{0,1\}\([^[:blank:]]*\).*/\2/p' \
			/etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1
	fi
}
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$suite" ] || skip "no VERSION_CODENAME in /etc/os-release"
if [ ! -f "$work/base.tar" ]; then
	m=$(mirror)
	[ -n "$m" ] || skip "no apt mirror found in /etc/apt"
	say "making a minbase $suite root (once; cached in $work/base.tar)"
	rm -rf "$work/base"
	debootstrap --variant=minbase "$suite" "$work/base" "$m" >> "$log" 2>&1 ||
		skip "debootstrap failed (no access to the archive?); see $log"
	tar -C "$work/base" -cf "$work/base.tar.tmp" . && mv "$work/base.tar.tmp" "$work/base.tar"
	rm -rf "$work/base"
fi

fresh() {	# fresh DIR: base unpacked in DIR
	rm -rf "$1"
	mkdir -p "$1"
	tar -C "$1" -xf "$work/base.tar"
}

# --- 2. the local archive ------------------------------------------------
# Everything the first command installs, for root or a user: the
# prerequisite line's packages and the build's (the Makefile's BUILD_PKGS,
# plus make).
pkgs=$(sed -n 's/^BUILD_PKGS[[:blank:]]*=[[:blank:]]*//p' Makefile)
[ -n "$pkgs" ] || die "no BUILD_PKGS in the Makefile"
stamp="$suite $pkgs $prereq"
if [ ! -f "$work/archive/.stamp" ] || [ "$(cat "$work/archive/.stamp")" != "$stamp" ]; then
	say "downloading the packages for a local archive (once)"
	s=$work/scratch
	fresh "$s"
	sed 'p; s/^deb /deb-src /' "$s/etc/apt/sources.list" > "$s/etc/apt/sources.list.new"
	mv "$s/etc/apt/sources.list.new" "$s/etc/apt/sources.list"
	cp /etc/resolv.conf "$s/etc/resolv.conf" 2>/dev/null || true
	# shellcheck disable=SC2086
	chroot "$s" sh -c "apt-get update -q &&
		apt-get install -q -y --download-only --no-install-recommends make $pkgs &&
		mkdir -p /tmp/src && cd /tmp/src && apt-get source -q --download-only bearssl" \
		>> "$log" 2>&1 || { tail -n 15 "$log" >&2; die "download in the scratch root failed"; }
	rm -rf "$work/archive"
	mkdir -p "$work/archive"
	cp "$s"/var/cache/apt/archives/*.deb "$s"/tmp/src/* "$work/archive/"
	(cd "$work/archive" && apt-ftparchive packages . > Packages &&
		apt-ftparchive sources . > Sources) 2>> "$log" ||
		die "apt-ftparchive failed"
	echo "$stamp" > "$work/archive/.stamp"
	rm -rf "$s"
fi

# A fresh root at $1 with the local archive as its only apt source and
# this repository cloned into $2 (a path inside the root).
prepare() {
	fresh "$1"
	mkdir -p "$1/var/local"
	cp -r "$work/archive" "$1/var/local/dotp-archive"
	rm -f "$1"/etc/apt/sources.list.d/*
	echo "deb [trusted=yes] file:/var/local/dotp-archive ./" > "$1/etc/apt/sources.list"
	rm -rf "$1/var/lib/apt/lists"/*_* 2>/dev/null || true
	git clone -q "$repo" "$1$2"
}

# in_root ROOT USER CMD: CMD in ROOT as USER (root or newcomer), in a new
# network namespace with only loopback, with a login-like environment;
# $session (setsid) makes it a process group of its own.
session=
in_root() {
	r=$1 u=$2
	shift 2
	if [ "$u" = root ]; then spec=0:0 home=/root path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	else spec=1000:1000 home=/home/$u path=/usr/local/bin:/usr/bin:/bin
	fi
	$session unshare -n -m sh -c '
		ip link set lo up
		mount -t proc proc "$1/proc"
		r=$1 spec=$2 home=$3 path=$4
		shift 4
		exec chroot --userspec="$spec" "$r" env -i HOME="$home" PATH="$path" \
			LANG=C.UTF-8 TERM=dumb sh -c "cd \$HOME && $*"
	' sh "$r" "$spec" "$home" "$path" "$@"
}

# stop_group PID: SIGTERM to the process groups led by PID's children
# (make, and dotp under it), then wait for PID.
stop_group() {
	for l in $(pgrep -P "$1"); do
		pkill -TERM -g "$l" || true
	done
	wait "$1" 2>/dev/null || true
}

# make_run ROOT USER OUT: `make run` in ~/dotp until dotp logs its start line
# (then stopped) or make exits. Returns 0 when dotp started.
make_run() {
	r=$1 u=$2 out=$3
	: > "$out"
	session=setsid
	in_root "$r" "$u" "cd dotp && exec $first" > "$out" 2>&1 &
	pid=$!	# a subshell; its child, from setsid on, leads a group
	session=
	n=0
	while kill -0 "$pid" 2>/dev/null; do
		if grep -q 'msg="dotp listening"' "$out"; then
			stop_group "$pid"
			return 0
		fi
		n=$((n + 1))
		[ $n -lt 3000 ] || { stop_group "$pid"; die "$u: make run still running after 300 s"; }
		sleep 0.1
	done
	wait "$pid" 2>/dev/null || true
	grep -q 'msg="dotp listening"' "$out"
}

# --- 3a. as root ---------------------------------------------------------
r=$work/root-run
say "as root: '$prereq', then '$first' in a fresh minbase root, no network"
prepare "$r" /root/dotp
t=$(date +%s)
in_root "$r" root "$prereq" > "$work/root-prereq.log" 2>&1 ||
	{ tail -n 15 "$work/root-prereq.log" >&2; die "root: '$prereq' failed"; }
make_run "$r" root "$work/root-make-run.log" ||
	{ tail -n 25 "$work/root-make-run.log" >&2; die "root: $first did not start dotp"; }
[ -x "$r/root/dotp/dotp" ] || die "root: no ./dotp"
if grep -q "Download is performed unsandboxed" "$work/root-make-run.log"; then
	die "root: apt's sandbox warning reached the terminal"
fi
say "as root: built and started in $(( $(date +%s) - t )) s ($(wc -l < "$work/root-make-run.log") lines of output; $work/root-make-run.log)"

# --- 3b. as a user -------------------------------------------------------
r=$work/user-run
say "as a user: root runs '$prereq'; the user runs '$first'"
prepare "$r" /home/newcomer/dotp
chroot "$r" useradd -u 1000 -U -d /home/newcomer -s /bin/sh newcomer >> "$log" 2>&1 ||
	die "useradd failed"
chown -R 1000:1000 "$r/home/newcomer"
t=$(date +%s)
in_root "$r" root "$prereq" > "$work/user-prereq.log" 2>&1 ||
	{ tail -n 15 "$work/user-prereq.log" >&2; die "user: '$prereq' (as root) failed"; }
if make_run "$r" newcomer "$work/user-make-run-1.log"; then
	die "user: $first started without the build packages?"
fi
# The one command it printed, as root.
how=$(sed -n "s/^deps: install them as root with:  su -c '\(.*\)'$/\1/p" \
	"$work/user-make-run-1.log" | head -n 1)
[ -n "$how" ] || { cat "$work/user-make-run-1.log" >&2; die "user: $first printed no su -c command"; }
case $how in *--no-install-recommends*) ;; *) die "user: '$how' pulls in Recommends" ;; esac
for p in $pkgs; do
	case " $how " in *" $p "*) ;; *) die "user: '$how' misses $p" ;; esac
done
say "as a user: $first stopped with: su -c '$how'"
in_root "$r" root "$how" > "$work/user-install.log" 2>&1 ||
	{ tail -n 15 "$work/user-install.log" >&2; die "user: '$how' failed"; }
make_run "$r" newcomer "$work/user-make-run-2.log" ||
	{ tail -n 25 "$work/user-make-run-2.log" >&2; die "user: $first did not start dotp"; }
[ -x "$r/home/newcomer/dotp/dotp" ] || die "user: no ./dotp"
say "as a user: built and started in $(( $(date +%s) - t )) s ($work/user-make-run-2.log)"

# Nothing the install brought was left enabled or running in the roots.
for r in "$work/root-run" "$work/user-run"; do
	[ -e "$r/usr/sbin/policy-rc.d" ] && die "$r: policy-rc.d left behind"
done
[ "${NEWCOMER_KEEP:-0}" = 1 ] || rm -rf "$work/root-run" "$work/user-run"
say "PASS in $(( $(date +%s) - t0 )) s"
