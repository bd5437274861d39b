#!/bin/sh
# bench/hits-cpu.sh - where dotp's CPU goes on cache hits: user against
# system time per query, and (STRACE=1) the system calls per loop pass.
#
# In a private network namespace: the bench's upstream (lib.sh), dotp with
# its cache on, 100 names asked twice to warm it, then dnsperf -c 4 -q 100
# on them for HITS_SECONDS (5); utime and stime of dotp from /proc before
# and after. A one-off look behind the cache_cpu figure of `make bench`:
# its figure is their sum, this says which side it is on.
#   DOTP_BIN=./dotp  HITS_SECONDS=5  STRACE=1 (strace -c attached to dotp)
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH_DIR")
DOTP_BIN=${DOTP_BIN:-$REPO/dotp}
. "$BENCH_DIR/lib.sh"
[ -n "${BENCH_INNER:-}" ] || exec unshare -n env BENCH_INNER=1 sh "$0" "$@"
ip link set lo up
T=$(mktemp -d /tmp/dotp-hits.XXXXXX)
: > "$T/pids"
trap 'bench_cleanup' EXIT
mkdir -p "$T/pki"
mk_pki "$T/pki"
start_upstream
start dotp "$DOTP_BIN" -l 127.0.0.1:5301 -u "127.0.0.1:$UP_TLS_PORT#$UP_NAME" \
    --ca-file "$T/pki/ca.pem" -q
P=$LAST_PID
wait_listen 5301 || die "dotp did not start"
i=0
while [ $i -lt 100 ]; do echo "h$i.c.bench.test A"; i=$((i + 1)); done > "$T/names"
dnsperf -s 127.0.0.1 -p 5301 -d "$T/names" -n 2 -q 10 > /dev/null 2>&1 || true
set -- $(awk '{ print $14, $15 }' "/proc/$P/stat")
u0=$1 s0=$2
if [ -n "${STRACE:-}" ]; then
	strace -c -p "$P" -o "$T/strace" 2>/dev/null &
	SP=$!
	sleep 0.3
fi
dnsperf -s 127.0.0.1 -p 5301 -d "$T/names" -l "${HITS_SECONDS:-5}" -c 4 -q 100 \
    > "$T/perf" 2>&1 || true
set -- $(awk '{ print $14, $15 }' "/proc/$P/stat")
u1=$1 s1=$2
if [ -n "${STRACE:-}" ]; then
	kill -INT "$SP"
	sleep 0.5
	head -12 "$T/strace"
fi
q=$(sed -n 's/.*Queries completed: *\([0-9]*\).*/\1/p' "$T/perf")
hz=$(getconf CLK_TCK)
awk -v q="$q" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" 'BEGIN {
	printf "hits-cpu: %d queries: user %.2f us/query, system %.2f us/query\n",
	    q, u * 1e6 / hz / q, s * 1e6 / hz / q }'
grep -E 'Queries per second|Queries lost' "$T/perf"
