#!/bin/sh
# Run the dotp integration suite inside a private network namespace: fixed
# test ports never clash with anything on the host and no traffic leaves the
# machine. Extra arguments go to pytest (e.g. -k tls, -x, -v, or test file
# paths; with no path given it runs all of tests/integration).
#
#   tests/run-integration.sh                 # uses ./dotp
#   DOTP_BIN=/path/to/dotp-asan tests/run-integration.sh
#
# Needs root (or unprivileged user namespaces), unbound, dnsdist, named (bind9),
# openssl, dig, kdig,
# and python3-dnspython + python3-pytest for /usr/bin/python3.
set -eu
# a relative DOTP_BIN is relative to the caller's directory
case "${DOTP_BIN:-}" in
    "" | /*) ;;
    *) DOTP_BIN="$(pwd)/$DOTP_BIN" ;;
esac
cd "$(dirname "$0")/.."
# unbound, named and dnsdist live in /usr/sbin, which a normal user's PATH lacks
PATH=$PATH:/usr/sbin:/sbin
export PATH
: "${DOTP_BIN:=$(pwd)/dotp}"
export DOTP_BIN

if [ "$(id -u)" = 0 ]; then
    UNSHARE="unshare -n"
else
    UNSHARE="unshare -r -n"
fi

exec $UNSHARE sh -c '
    ip link set lo up || exit 125
    # a fresh namespace normally has ::1 on lo; make sure IPv6 is not disabled
    sysctl -qw net.ipv6.conf.lo.disable_ipv6=0 2>/dev/null || true
    sysctl -qw net.ipv6.conf.all.disable_ipv6=0 2>/dev/null || true
    i=0
    while ! ip -6 addr show dev lo | grep -q "inet6 ::1/128"; do
        i=$((i + 1))
        [ $i -gt 50 ] && { echo "run-integration: ::1 not available in the namespace" >&2; exit 125; }
        sleep 0.1
    done
    exec /usr/bin/python3 -m pytest -q -p no:cacheprovider -o testpaths=tests/integration "$@"
' sh "$@"
