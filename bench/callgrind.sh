#!/bin/sh
# bench/callgrind.sh - dotp's instructions per query, under callgrind.
#
# Three runs of `valgrind --tool=callgrind ./dotp`, identical but for the
# queries sent (UDP, one in flight at a time, unique names so that each is
# forwarded; the client is bench/benchtool.py light, which waits for each
# answer before sending the next, so batching cannot vary between runs):
#   run 0: no query           start-up, idle, SIGTERM, exit
#   run 1: 1 query            + TLS handshake (full) + 1 query
#   run N: 1 + N queries      + N more queries on the same connection
# Reported (Ir = instructions executed, whole process):
#   ir_per_query        = (Ir(N) - Ir(0)) / N   handshake amortized in it
#   ir_per_query_steady = (Ir(N) - Ir(1)) / N   one query on a warm connection
#   ir_first_query      = Ir(1) - Ir(0)         handshake + first query
# Each run waits for dotp's start line, sends its queries, idles 0.5 s and
# sends SIGTERM; dotp must exit 0 with answers = queries.
#
# Standalone: `sh bench/callgrind.sh` starts its own upstream (unbound with
# a test CA) in a private network namespace. From run.sh: BENCH_UPSTREAM,
# BENCH_CA and BENCH_TMP name the running upstream and the temp directory.
#   BENCH_CG_QUERIES=2000   N
#   BENCH_CG_OUT=FILE       JSON result (default build/bench/callgrind.json)
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
cd "$(dirname "$BENCH_DIR")"
# DOTP_BIN: the binary measured (default ./dotp; run.sh passes its own)
DOTP_BIN=${DOTP_BIN:-./dotp}
[ -x "$DOTP_BIN" ] || { echo "callgrind: $DOTP_BIN missing: run 'make dotp'" >&2; exit 1; }
. "$BENCH_DIR/lib.sh"
[ -n "${BENCH_UPSTREAM:-}" ] || enter_netns "$BENCH_DIR/callgrind.sh" "$@"

N=${BENCH_CG_QUERIES:-2000}
OUT=${BENCH_CG_OUT:-$(dirname "$BENCH_DIR")/build/bench/callgrind.json}
mkdir -p "$(dirname "$OUT")"
PORT=5310

if [ -n "${BENCH_UPSTREAM:-}" ]; then
	T=$(mktemp -d "${BENCH_TMP:-/tmp}/callgrind.XXXXXX")
	CA=$BENCH_CA
	UPSTREAM=$BENCH_UPSTREAM
else
	T=$(mktemp -d /tmp/dotp-callgrind.XXXXXX)
	mkdir -p "$T/pki"
	mk_pki "$T/pki"
	CA=$T/pki/ca.pem
fi
: >"$T/pids"
trap 'bench_cleanup' EXIT
trap 'exit 130' INT TERM HUP
if [ -z "${BENCH_UPSTREAM:-}" ]; then
	start_upstream
	UPSTREAM="127.0.0.1:$UP_TLS_PORT#$UP_NAME"
fi

# one_run NAME COUNT: callgrind dotp, send 1 + COUNT queries (none when
# COUNT is -1), stop; prints Ir and checks the exit line.
one_run() {
	_out=$T/cg.$1.out
	# generous timeouts: under callgrind dotp runs ~50x slower
	start "cg-$1" valgrind --tool=callgrind --callgrind-out-file="$_out" \
	    "$DOTP_BIN" -l "127.0.0.1:$PORT" -u "$UPSTREAM" --ca-file "$CA" \
	    --timeout 30000 --attempt-timeout 15000 --connect-timeout 20000 \
	    --handshake-timeout 20000 --idle-timeout 600000 --drain 10000
	_pid=$LAST_PID _i=0
	while ! grep -q 'msg="dotp listening"' "$T/cg-$1.log" 2>/dev/null; do
		_i=$((_i + 1))
		[ $_i -lt 600 ] && kill -0 "$_pid" 2>/dev/null ||
		    { cat "$T/cg-$1.log" >&2; die "dotp under valgrind did not start"; }
		sleep 0.1
	done
	if [ "$2" -ge 0 ]; then
		# first query: connection and TLS handshake (no warm-up queries)
		$BENCH_TOOL light --port $PORT --count 1 --warmup 0 --prefix "f$1" \
		    --query-timeout 30 --silent --out "$T/cg-$1.json" ||
		    die "callgrind run $1: first query not answered"
	fi
	if [ "$2" -gt 0 ]; then
		$BENCH_TOOL light --port $PORT --count "$2" --warmup 0 \
		    --prefix "c$1" --query-timeout 30 --silent --out "$T/cg-$1.json" ||
		    die "callgrind run $1: queries lost or wrong"
	fi
	sleep 0.5
	stop "$_pid" 600
	[ "$STOP_RC" = 0 ] || { cat "$T/cg-$1.log" >&2; die "dotp under valgrind exited $STOP_RC"; }
	_want=$(( $2 + 1 ))
	grep -q "msg=\"dotp exiting\" queries=$_want answers=$_want servfail=0 " "$T/cg-$1.log" ||
	    { grep 'exiting' "$T/cg-$1.log" >&2; die "run $1: dotp did not answer $_want queries"; }
	IR=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$_out")
	[ -n "$IR" ] || IR=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$_out")
	[ -n "$IR" ] || die "no Ir total in $_out"
	log "callgrind run $1: $_want queries, Ir $IR"
}

t0=$(date +%s)
one_run 0 -1; IR0=$IR
one_run 1 0;  IR1=$IR
one_run n "$N"; IRN=$IR
secs=$(( $(date +%s) - t0 ))

/usr/bin/python3 - "$OUT" "$N" "$IR0" "$IR1" "$IRN" "$secs" <<'EOF'
import json, sys
out, n, ir0, ir1, irn, secs = sys.argv[1], *map(int, sys.argv[2:])
r = {
    "queries": n,
    "ir_0": ir0, "ir_1": ir1, "ir_n": irn,
    "ir_per_query": round((irn - ir0) / n),
    "ir_per_query_steady": round((irn - ir1) / n),
    "ir_first_query": ir1 - ir0,
    "client": "benchtool.py light: UDP, one query in flight, unique names",
    "seconds": secs,
}
with open(out, "w") as f:
    json.dump(r, f, indent=1)
    f.write("\n")
print("callgrind: %d queries: %d instructions per query (handshake amortized), "
      "%d per query in steady state, handshake + first query %d, "
      "start-up + exit %d" % (n, r["ir_per_query"], r["ir_per_query_steady"],
                              r["ir_first_query"], ir0))
EOF
