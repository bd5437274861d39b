#!/bin/sh
# deps.sh PKG... - make sure the named Debian packages are installed.
# Silent when they all are. Installs the missing ones when run as root with
# apt-get, otherwise says how to install them and fails.
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
	st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || st=
	[ "$st" = "install ok installed" ] || missing="$missing $p"
done
missing=${missing# }
[ -n "$missing" ] || exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "deps: missing packages: $missing; install them with:" \
		"sudo apt-get install -y $missing" >&2
	exit 1
fi

echo "deps: installing $missing"
# Refresh the package lists once, and only when they are needed: when apt does
# not know a package yet, or when installing from the current lists fails
# (stale lists point at files the mirror no longer has).
# shellcheck disable=SC2086  # word splitting of the package list is wanted
apt_install() {
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends $missing
}
# shellcheck disable=SC2086
if apt-cache show $missing >/dev/null 2>&1 && apt_install; then
	exit 0
fi
apt-get update -qq
apt_install
