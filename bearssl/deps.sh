#!/bin/sh
# deps.sh PKG... - make sure the named Debian packages are installed.
#
# Silent when they all are. As root, installs the missing ones with apt-get
# (no Recommends): one line on the terminal, apt's output in build/apt.log
# (DOTP_APT_LOG), its tail on failure. The machine is left as it was apart
# from the packages: services they bring are not started (a policy-rc.d is
# in place while apt runs, unless the machine has one) and not left enabled
# (every unit or rc link the install added is removed, and named on the
# terminal). Not root: prints the one command that installs them all on
# this machine (sudo when there is one, else su -c) and fails.
# DOTP_SKIP_DEPS=1 skips every check (for systems that are not Debian).
set -eu

[ "${DOTP_SKIP_DEPS:-0}" = 1 ] && exit 0
[ $# -gt 0 ] || exit 0

if ! command -v dpkg-query >/dev/null 2>&1; then
	echo "deps: not a Debian system; needed packages (or equivalents): $*;" \
		"set DOTP_SKIP_DEPS=1 to skip this check" >&2
	exit 1
fi

missing=
for p in "$@"; do
	case " $missing " in *" $p "*) continue ;; esac
	st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || st=
	[ "$st" = "install ok installed" ] || missing="$missing $p"
done
missing=${missing# }
[ -n "$missing" ] || exit 0

cmd="apt-get install -y --no-install-recommends $missing"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "deps: missing packages: $missing" >&2
	if command -v sudo >/dev/null 2>&1; then
		echo "deps: install them with:  sudo $cmd" >&2
	else
		echo "deps: install them as root with:  su -c '$cmd'" >&2
	fi
	echo "deps: (then run the same make command again)" >&2
	exit 1
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
log=${DOTP_APT_LOG:-$repo/build/apt.log}
mkdir -p "$(dirname "$log")"
echo "deps: installing $missing (apt's output: $log)"

# Unit and rc links now, to tell which ones the install adds.
links() {
	find /etc/systemd/system /etc/rc0.d /etc/rc1.d /etc/rc2.d /etc/rc3.d \
		/etc/rc4.d /etc/rc5.d /etc/rc6.d /etc/rcS.d -type l 2>/dev/null |
		sort
}
tmp=$(mktemp -d)
links > "$tmp/before"
policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
	# 101: "action not allowed": invoke-rc.d and deb-systemd-invoke start
	# nothing while it is there.
	printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	policy=1
fi
cleanup() {
	[ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

fail() {
	echo "deps: $1; the end of $log:" >&2
	tail -n 15 "$log" >&2
	exit 1
}
# Refresh the package lists once, and only when they are needed: when apt
# does not know a package yet, or when installing from the current lists
# fails (stale lists point at files the mirror no longer has).
apt_install() {
	# shellcheck disable=SC2086  # word splitting of the package list is wanted
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends $missing >> "$log" 2>&1
}
# shellcheck disable=SC2086
if ! { apt-cache show $missing >/dev/null 2>&1 && apt_install; }; then
	echo "deps: refreshing the package lists (apt-get update)"
	apt-get update -q >> "$log" 2>&1 || fail "apt-get update failed"
	apt_install || fail "apt-get install failed"
fi

# Disable what the install enabled: systemctl disable works without a
# running systemd; any link left (an rc link, no systemctl) is removed.
links | comm -13 "$tmp/before" - > "$tmp/added"
[ -s "$tmp/added" ] || exit 0
units=$(sed -n 's|^/etc/systemd/system/[^/]*\.wants/||p' "$tmp/added" | sort -u |
	tr '\n' ' ')
if [ -n "$units" ] && command -v systemctl >/dev/null 2>&1; then
	# shellcheck disable=SC2086
	systemctl disable --quiet $units >> "$log" 2>&1 || true
fi
while read -r l; do
	[ -L "$l" ] && rm -f "$l"
done < "$tmp/added"
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >> "$log" 2>&1 || true
fi
echo "deps: left disabled, as they were installed only for dotp's tests and" \
	"benchmark: ${units:-$(tr '\n' ' ' < "$tmp/added")}"
