#!/bin/sh
# bench/run.sh - dotp against other DNS-over-TLS forwarders (`make bench`).
#
# Inside a private network namespace (loopback only) it
#   1. makes a test CA and an EC P-256 certificate for upstream.bench;
#   2. starts the upstream: unbound answering every name under bench.test.
#      from local data, over DoT on 127.0.0.1:853 and plain DNS on :5300;
#   3. starts the forwarders, each forwarding everything to that upstream
#      over verified TLS (test CA, name checked), caches off or minimal:
#      dotp (--no-cache), stubby, unbound, kresd (knot-resolver), dnsdist;
#   4. drives each with dnsperf (UDP and TCP; unique names that miss every
#      cache, and 10 repeated names), targets alternated within each of
#      BENCH_ROUNDS rounds, plus the upstream's own ceiling (DoT and UDP);
#   5. measures closed-loop latency with one query in flight, and the hop
#      floor: the same through bench/relay.c, a minimal UDP relay;
#   6. finds each target's highest rate with under 1% loss: a resperf
#      ramp (plain UDP; the upstream also over DoT), after all the other
#      runs, targets alternated, BENCH_ROUNDS rounds;
#   7. the cache runs (section 8 below): each forwarder but stubby again,
#      a new process with its answer cache on at equal memory
#      (BENCH_CACHE_SIZE): all hits under load (CPU per query, QPS, loss,
#      what was at its limit), light load with hits against the upstream's
#      plain UDP port, and a Zipf stream for the hit ratio (queries the
#      upstream received, from its control socket); dotp's RSS idle and
#      with the cache full;
#   8. plain forwarding (section 9 below): dotp with a --forward zone to
#      the upstream's plain DNS port (--no-cache) against unbound with a
#      forward-zone for the same zone to the same port, unique names under
#      the zone (every query a miss), CPU per query; beside it dotp's TLS
#      path in the same rounds (the same process, names outside the zone);
#   9. the rate limiter's cost (section 10 below): two new dotp processes
#      with the cache on, one with --rate-limit 1000000:1000000 (far above
#      the load: nothing is limited) and one without, the all-hits load of
#      the cache runs, alternated; CPU per query with and without;
#  10. counts dotp's instructions per query under callgrind
#      (bench/callgrind.sh), the binary and the image size;
#  11. writes results.json and results.md to BENCH_OUT (build/bench; `make
#      bench-publish` copies them to bench/), prints the table and
#      the dotp target verdicts (as measured; the exit status does not
#      depend on them).
#
# Knobs (environment):
#   BENCH_TIME=10        budget in minutes for everything but the resperf
#                        runs; the per-run duration is derived from it (at
#                        least 2 s per load run)
#   BENCH_ROUNDS=3       rounds (medians are taken over them)
#   BENCH_DURATION=      seconds per load run (overrides the derivation)
#   BENCH_LIGHT_TIME=    seconds per light-load run (default 2, 1 when short)
#   BENCH_LIGHT_REPS=3   light-load runs per target per round
#   BENCH_CLIENTS=4      dnsperf -c
#   BENCH_OUTSTANDING=100  dnsperf -q: total queries in flight; keep it at or
#                        under 128 (dotp's --conn-queries) to measure dotp's
#                        single-connection path
#   BENCH_TARGETS="dotp stubby unbound kresd dnsdist"
#   BENCH_CG_QUERIES=2000  queries in the callgrind run (0 skips callgrind)
#   BENCH_IMAGE=1        build the image with tests/image.sh to size it
#   BENCH_KEEP_TMP=1     keep the temp directory (configs, logs)
#   BENCH_QUICKACK=1     turn delayed ACKs off on loopback (route attribute)
#                        to tell Nagle/delayed-ACK stalls from other latency
#   BENCH_RESPERF=1      0 skips the resperf runs (about 5 s per target and
#                        round, upstream UDP and DoT included)
#   BENCH_RESPERF_QPS=150000  resperf -m: the rate the ramp ends at
#   BENCH_RESPERF_RAMP=6 resperf -r: seconds the ramp takes to get there
#   BENCH_CACHE=1        0 skips the cache runs (about 3-4 minutes, on top
#                        of BENCH_TIME)
#   BENCH_CACHE_SIZE=1048576  bytes of answer cache for every forwarder
#   BENCH_CACHE_NAMES=100     names in the all-hits runs
#   BENCH_ZIPF_NAMES=200000   names the Zipf stream draws from
#   BENCH_ZIPF_S=1.0          its exponent
#   BENCH_ZIPF_UNIQUE=10      % of its queries for names never asked before
#   BENCH_ZIPF_WARM=50000     queries that fill the cache first (cold ratio)
#   BENCH_ZIPF_QUERIES=200000 queries the hit ratio is taken over
#   BENCH_FORWARD=1      0 skips the plain forwarding runs (3 runs of the
#                        load-run length per round, on top of BENCH_TIME)
#   BENCH_RATELIMIT=1    0 skips the rate limiter runs (2 runs of the
#                        load-run length per round, on top of BENCH_TIME)
#   BENCH_ONLY=forward   only the plain forwarding runs (no peers, resperf,
#                        cache runs, callgrind or image); results go to
#                        build/bench/forward unless BENCH_OUT says otherwise,
#                        so that `make bench-publish` never sees them
#   BENCH_ONLY=ratelimit only the rate limiter runs (the same way; results
#                        in build/bench/ratelimit)
#   DOTP_BIN=./dotp      the dotp binary measured (e.g. a copy, while ./dotp
#                        is being rebuilt)
#   BENCH_OUT=build/bench  where results.json and results.md are written
#
# Needs root (or unprivileged user namespaces) for `unshare -n`.
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH_DIR")
# DOTP_BIN relative to where the bench was started from
case ${DOTP_BIN:-} in '' | /*) ;; *) DOTP_BIN=$(pwd)/$DOTP_BIN ;; esac
cd "$REPO"
DOTP_BIN=${DOTP_BIN:-$REPO/dotp}
# BENCH_OUT relative to the repository; tracked files are never written.
# BENCH_ONLY=forward|ratelimit: a partial run, kept apart from the full
# one's results
case ${BENCH_ONLY:-} in '' | forward | ratelimit) ;; *)
	echo "bench: BENCH_ONLY must be empty, forward or ratelimit" >&2; exit 1 ;;
esac
case ${BENCH_OUT:-} in
'') BENCH_OUT=$REPO/build/bench${BENCH_ONLY:+/$BENCH_ONLY} ;;
/*) ;;
*) BENCH_OUT=$REPO/$BENCH_OUT ;;
esac
mkdir -p "$BENCH_OUT"
export DOTP_BIN BENCH_OUT

if [ "${BENCH_INNER:-0}" != 1 ]; then
	# --- outside the namespace: check the tools, then re-exec inside -----
	[ -x "$DOTP_BIN" ] || { echo "bench: $DOTP_BIN missing: run 'make dotp'" >&2; exit 1; }
	rp=; [ "${BENCH_RESPERF:-1}" = 0 ] || rp=resperf
	peers="stubby kresd kres-cache-gc dnsdist $rp valgrind"
	# BENCH_ONLY=forward|ratelimit: unbound and dnsperf are all it runs
	[ -z "${BENCH_ONLY:-}" ] || peers=
	for c in unbound unbound-checkconf unbound-control $peers dnsperf \
	    openssl ss ip unshare /usr/bin/python3; do
		command -v "$c" >/dev/null 2>&1 ||
		    { echo "bench: $c is not installed (make bench installs it)" >&2; exit 1; }
	done
	BENCH_T0=$(date +%s)
	BENCH_CMD="${BENCH_CMD:-sh bench/run.sh} (BENCH_TIME=${BENCH_TIME:-10} BENCH_ROUNDS=${BENCH_ROUNDS:-3}${BENCH_DURATION:+ BENCH_DURATION=$BENCH_DURATION}${BENCH_RESPERF:+ BENCH_RESPERF=$BENCH_RESPERF}${BENCH_RESPERF_QPS:+ BENCH_RESPERF_QPS=$BENCH_RESPERF_QPS}${BENCH_RESPERF_RAMP:+ BENCH_RESPERF_RAMP=$BENCH_RESPERF_RAMP}${BENCH_CACHE:+ BENCH_CACHE=$BENCH_CACHE}${BENCH_FORWARD:+ BENCH_FORWARD=$BENCH_FORWARD}${BENCH_RATELIMIT:+ BENCH_RATELIMIT=$BENCH_RATELIMIT}${BENCH_ONLY:+ BENCH_ONLY=$BENCH_ONLY})"
	export BENCH_T0 BENCH_CMD
fi
. "$BENCH_DIR/lib.sh"
enter_netns "$BENCH_DIR/run.sh" "$@"

# --- knobs -------------------------------------------------------------------
: "${BENCH_TIME:=10}" "${BENCH_ROUNDS:=3}" "${BENCH_CLIENTS:=4}"
: "${BENCH_OUTSTANDING:=100}" "${BENCH_CG_QUERIES:=2000}" "${BENCH_IMAGE:=1}"
: "${BENCH_TARGETS:=dotp stubby unbound kresd dnsdist}"
: "${BENCH_RESPERF:=1}" "${BENCH_RESPERF_QPS:=150000}" "${BENCH_RESPERF_RAMP:=6}"
: "${BENCH_CACHE:=1}" "${BENCH_CACHE_SIZE:=1048576}" "${BENCH_CACHE_NAMES:=100}"
: "${BENCH_ZIPF_NAMES:=200000}" "${BENCH_ZIPF_QUERIES:=200000}"
: "${BENCH_ZIPF_WARM:=50000}" "${BENCH_ZIPF_UNIQUE:=10}" "${BENCH_ZIPF_S:=1.0}"
: "${BENCH_FORWARD:=1}" "${BENCH_RATELIMIT:=1}" "${BENCH_ONLY:=}"
case $BENCH_FORWARD in 0 | 1) ;; *) die "BENCH_FORWARD must be 0 or 1" ;; esac
case $BENCH_RATELIMIT in 0 | 1) ;; *) die "BENCH_RATELIMIT must be 0 or 1" ;; esac
# BENCH_ONLY=forward (or ratelimit): the plain forwarding runs (or the rate
# limiter runs) alone. The uncached comparison runs no round (MAIN_ROUNDS
# 0, no targets started), and resperf, the cache runs, callgrind and the
# image are off.
MAIN_ROUNDS=$BENCH_ROUNDS
case $BENCH_ONLY in
forward)
	BENCH_FORWARD=1 BENCH_RATELIMIT=0 BENCH_RESPERF=0 BENCH_CACHE=0
	BENCH_CG_QUERIES=0 BENCH_IMAGE=0 MAIN_ROUNDS=0 ;;
ratelimit)
	BENCH_RATELIMIT=1 BENCH_FORWARD=0 BENCH_RESPERF=0 BENCH_CACHE=0
	BENCH_CG_QUERIES=0 BENCH_IMAGE=0 MAIN_ROUNDS=0 ;;
esac
case $BENCH_CACHE in 0 | 1) ;; *) die "BENCH_CACHE must be 0 or 1" ;; esac
for _v in BENCH_CACHE_SIZE BENCH_CACHE_NAMES BENCH_ZIPF_NAMES BENCH_ZIPF_QUERIES \
    BENCH_ZIPF_WARM; do
	case $(eval echo "\$$_v") in '' | *[!0-9]* | 0) die "$_v must be a whole number >= 1" ;; esac
done
case $BENCH_ZIPF_UNIQUE$BENCH_ZIPF_S in *[!0-9.]*) die "BENCH_ZIPF_UNIQUE and BENCH_ZIPF_S must be numbers" ;; esac
# Equal memory for the cache runs: CACHE_BYTES for each forwarder's answer
# cache where its size is set in bytes (dotp --cache-size, unbound
# msg+rrset caches, kresd cache.size). dnsdist's packet cache is sized in
# entries: DNSDIST_ENTRY_BYTES is what one entry costs (VmRSS growth per
# entry filled with names like the Zipf ones, plus the hash buckets its
# shards reserve at start for every possible entry, ~9 bytes; measured
# with dnsdist 1.7.3: 310-317 + 9 bytes).
CACHE_BYTES=$BENCH_CACHE_SIZE
DNSDIST_ENTRY_BYTES=320
DNSDIST_CACHE_ENTRIES=$((CACHE_BYTES / DNSDIST_ENTRY_BYTES))
case $BENCH_RESPERF in 0 | 1) ;; *) die "BENCH_RESPERF must be 0 or 1" ;; esac
case $BENCH_RESPERF_QPS in '' | *[!0-9]* | 0) die "BENCH_RESPERF_QPS must be a whole number >= 1" ;; esac
case $BENCH_RESPERF_RAMP in '' | *[!0-9]* | 0) die "BENCH_RESPERF_RAMP must be whole seconds >= 1" ;; esac
# resperf's plot interval (s), query timeout (s, as dnsperf -t), how far
# behind schedule it may fall before it stops (queries; its default, 1000,
# is a 20 ms stall at 50k qps), client socket buffers (KiB)
RP_INTERVAL=0.25 RP_TIMEOUT=2 RP_FALL=5000 RP_BUF=4096
case $BENCH_TIME in
'' | *[!0-9.]* | *.*.*) die "BENCH_TIME must be minutes, e.g. 10 or 2.5" ;;
esac
case $BENCH_ROUNDS in
'' | *[!0-9]* | 0) die "BENCH_ROUNDS must be a whole number >= 1" ;;
esac
case ${BENCH_DURATION:-1} in
*[!0-9]* | 0) die "BENCH_DURATION must be whole seconds >= 1" ;;
esac
[ "$BENCH_OUTSTANDING" -le 128 ] ||
    log "warning: BENCH_OUTSTANDING=$BENCH_OUTSTANDING is over dotp's 128 per connection: it will open a second one"
case " $BENCH_TARGETS " in *" dotp "*) ;; *) BENCH_TARGETS="dotp $BENCH_TARGETS" ;; esac
set -- $BENCH_TARGETS
NT=$#
LR=${BENCH_LIGHT_REPS:-3}
case $LR in '' | *[!0-9]* | 0) die "BENCH_LIGHT_REPS must be a whole number >= 1" ;; esac

# Per-run duration from the budget (95% of it, for slack): per round there
# are 4 scenarios x NT targets + 2 upstream ceiling runs of D s, and
# LR x (NT + 2) light runs of L s; about 0.7 s of overhead each (warm-up query, settling,
# parsing) and ~20 s fixed (start-up, callgrind, image, report).
if [ -n "${BENCH_DURATION:-}" ]; then
	D=$BENCH_DURATION
	L=${BENCH_LIGHT_TIME:-2}
else
	set -- $(awk -v b="$BENCH_TIME" -v r="$BENCH_ROUNDS" -v n="$NT" \
	    -v l="${BENCH_LIGHT_TIME:-}" -v lr="$LR" 'BEGIN {
		nl = r * (4 * n + 2); nq = r * lr * (n + 2); o = 0.7
		if (l == "") l = (b * 60 / r < 150) ? 1 : 2
		d = int((b * 60 * 0.95 - 20 - nl * o - nq * (l + o)) / nl)
		if (d < 2) d = 2; if (d > 60) d = 60
		print d, l }')
	D=$1 L=$2
fi
NAMES=$((150000 * D))     # unique names per file: > any rate seen here x D
# BENCH_ONLY=forward|ratelimit: no peers started (the per-run time is
# still derived from the whole list, as in a full run)
[ -z "$BENCH_ONLY" ] || BENCH_TARGETS=

T=$(mktemp -d /tmp/dotp-bench.XXXXXX)
trap 'bench_cleanup' EXIT
trap 'exit 130' INT TERM HUP
mkdir -p "$T/pki"
: >"$T/pids"
RUNS=$T/runs.jsonl META=$T/meta.txt
: >"$RUNS"
: >"$META"
meta() { printf '%s=%s\n' "$1" "$2" >>"$META"; }
caveat() { meta caveats+ "$*"; log "caveat: $*"; }

# dotp's answer cache: the uncached runs use --no-cache (every query goes
# upstream, as before the cache existed); a dotp without one is measured
# as it is and left out of the cache runs.
if "$DOTP_BIN" --help 2>&1 | grep -q -e '--no-cache'; then
	DOTP_NOCACHE=--no-cache DOTP_HAS_CACHE=1
else
	DOTP_NOCACHE= DOTP_HAS_CACHE=0
	caveat "$DOTP_BIN has no answer cache (no --no-cache option): measured as it is, left out of the cache runs"
fi

# dotp's split forwarding (section 9): a dotp without --forward is left
# out of the plain forwarding runs
if "$DOTP_BIN" --help 2>&1 | grep -q -e '--forward'; then
	DOTP_HAS_FORWARD=1
else
	DOTP_HAS_FORWARD=0
	[ "$BENCH_ONLY" != forward ] ||
	    die "BENCH_ONLY=forward: $DOTP_BIN has no --forward option"
	[ "$BENCH_FORWARD" = 0 ] ||
	    caveat "$DOTP_BIN has no --forward option: the plain forwarding runs are skipped"
fi

# dotp's per-client rate limit (section 10): a dotp without --rate-limit
# (or without a cache: the runs are all hits) is left out of those runs
if "$DOTP_BIN" --help 2>&1 | grep -q -e '--rate-limit' && [ "$DOTP_HAS_CACHE" = 1 ]; then
	DOTP_HAS_RATELIMIT=1
else
	DOTP_HAS_RATELIMIT=0
	[ "$BENCH_ONLY" != ratelimit ] ||
	    die "BENCH_ONLY=ratelimit: $DOTP_BIN has no --rate-limit option (or no cache)"
	[ "$BENCH_RATELIMIT" = 0 ] ||
	    caveat "$DOTP_BIN has no --rate-limit option (or no cache): the rate limiter runs are skipped"
fi

log "budget ${BENCH_TIME} min, $BENCH_ROUNDS rounds, ${D} s per load run," \
    "${L} s per light run, dnsperf -c $BENCH_CLIENTS -q $BENCH_OUTSTANDING," \
    "targets: ${BENCH_TARGETS:-none (BENCH_ONLY=$BENCH_ONLY)} (temp dir $T)"

# the binary measured; it is checked again at the end (a rebuild during the
# run would mix two binaries)
DOTP_SUM=$(sha256sum "$DOTP_BIN" | cut -d' ' -f1)
meta binary.sha256 "$DOTP_SUM"
meta binary.path "$DOTP_BIN"

# Other work on the machine skews everything: measure it before starting.
busy=$($BENCH_TOOL busy --seconds 1)
meta machine_busy_before_pct "$busy"
if awk -v b="$busy" 'BEGIN { exit !(b > 10) }'; then
	caveat "other processes were using ${busy}% of the machine's CPU when the benchmark started"
fi

# BENCH_QUICKACK=1: no delayed ACKs on loopback in the namespace (a route
# attribute), to tell a Nagle/delayed-ACK stall from other latency
if [ "${BENCH_QUICKACK:-0}" = 1 ]; then
	ip route replace local 127.0.0.1 dev lo table local proto kernel \
	    scope host src 127.0.0.1 quickack 1 ||
	    die "could not set quickack on the loopback route"
	caveat "BENCH_QUICKACK=1: delayed ACKs off on loopback (not the default TCP behaviour)"
fi
meta settings.quickack "${BENCH_QUICKACK:-0}"

# --- 1. PKI, 2. upstream -----------------------------------------------------
mk_pki "$T/pki"
CA=$T/pki/ca.pem
start_upstream
log "upstream unbound pid $UP_PID: DoT 127.0.0.1:$UP_TLS_PORT, UDP/TCP :$UP_PLAIN_PORT"
UPSTREAM="127.0.0.1:$UP_TLS_PORT#$UP_NAME"

# --- 3. forwarders -----------------------------------------------------------
# Each function writes its configuration and starts it on port $1. With a
# second argument, an instance name (e.g. dotp-cached), it starts the same
# forwarder with its answer cache on, at CACHE_BYTES of memory where that
# can be set (section 8); the uncached runs never see these.
start_dotp() {
	# no -q: only its start and exit lines are logged, and the exit line
	# (queries=, answers=, servfail=, handshakes, cache_*=) goes into the
	# results. The uncached runs use --no-cache (DOTP_NOCACHE).
	if [ -n "${2:-}" ]; then
		start "$2" "$DOTP_BIN" -l "127.0.0.1:$1" -u "$UPSTREAM" --ca-file "$CA" \
		    --cache-size "$CACHE_BYTES"
	else
		start dotp "$DOTP_BIN" -l "127.0.0.1:$1" -u "$UPSTREAM" --ca-file "$CA" \
		    $DOTP_NOCACHE
	fi
}
start_stubby() {
	cat >"$T/stubby.yml" <<-EOF
	resolution_type: GETDNS_RESOLUTION_STUB
	dns_transport_list:
	  - GETDNS_TRANSPORT_TLS
	tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
	tls_ca_file: "$CA"
	tls_query_padding_blocksize: 128
	edns_client_subnet_private: 0
	round_robin_upstreams: 0
	idle_timeout: 30000
	listen_addresses:
	  - 127.0.0.1@$1
	upstream_recursive_servers:
	  - address_data: 127.0.0.1
	    tls_port: $UP_TLS_PORT
	    tls_auth_name: "$UP_NAME"
	EOF
	start stubby stubby -C "$T/stubby.yml"
}
start_unbound() {
	# PORT [INSTANCE [ZONE]]: with an instance name alone, its answer
	# cache is on (section 8); with a ZONE too, the caches are as small as
	# in the uncached runs and ZONE is forwarded to the upstream's plain
	# DNS port, everything else over TLS as always (section 9)
	_d=$T/unbound-fwd _zone=
	_cache=$(printf '%s\n    ' \
	    '# caching cannot be turned off: smallest caches, no prefetch' \
	    'msg-cache-size: 0' 'rrset-cache-size: 0' 'key-cache-size: 0' \
	    'neg-cache-size: 0')
	if [ -n "${3:-}" ]; then
		_d=$T/$2
		_zone=$(printf '%s\n' 'forward-zone:' "    name: \"$3.\"" \
		    "    forward-addr: 127.0.0.1@$UP_PLAIN_PORT")
	elif [ -n "${2:-}" ]; then
		# cache on: CACHE_BYTES split 1:2 between the message and the
		# RRset caches (unbound's own default ratio, 4m:8m); both are
		# needed for an answer
		_d=$T/$2
		_cache=$(printf '%s\n    ' "# the answer cache: $CACHE_BYTES bytes in all" \
		    "msg-cache-size: $((CACHE_BYTES / 3))" \
		    "rrset-cache-size: $((CACHE_BYTES - CACHE_BYTES / 3))")
	fi
	mkdir -p "$_d"
	cat >"$_d/unbound.conf" <<-EOF
	server:
	    interface: 127.0.0.1@$1
	    do-ip6: no
	    username: ""
	    chroot: ""
	    directory: "$_d"
	    pidfile: ""
	    use-syslog: no
	    logfile: ""
	    verbosity: 1
	    do-daemonize: no
	    num-threads: 1
	    module-config: "iterator"
	    # the upstream is on loopback; test. is a default local zone
	    do-not-query-localhost: no
	    local-zone: "test." nodefault
	    tls-cert-bundle: "$CA"
	    $_cache
	    prefetch: no
	    qname-minimisation: no
	    # keep upstream TLS connections (default: 200 queries, 60 s)
	    max-reuse-tcp-queries: 1000000
	    tcp-reuse-timeout: 60000
	    incoming-num-tcp: 100
	remote-control:
	    control-enable: no
	forward-zone:
	    name: "."
	    forward-addr: 127.0.0.1@$UP_TLS_PORT#$UP_NAME
	    forward-tls-upstream: yes
	$_zone
	EOF
	unbound-checkconf "$_d/unbound.conf" >/dev/null || return 1
	start "${2:-unbound}" unbound -d -c "$_d/unbound.conf"
}
start_kresd() {
	# its cache is an LMDB file in its run directory, cache.size the size
	# of the map (the uncached runs: the smallest that works well)
	_d=$T/kresd _size='1 * MB'
	[ -z "${2:-}" ] || _d=$T/$2 _size=$CACHE_BYTES
	mkdir -p "$_d"
	cat >"$_d/config" <<-EOF
	-- kresd as a pure DoT forwarder
	net.ipv6 = false
	net.listen('127.0.0.1', $1, { kind = 'dns' })
	-- no DNSSEC validation: bench.test is unsigned and the upstream refuses
	-- everything else (the root DNSKEY included)
	trust_anchors.remove('.')
	for _, m in ipairs({'detect_time_skew', 'detect_time_jump', 'priming',
	                    'ta_signal_query', 'ta_sentinel'}) do
	    pcall(modules.unload, m)
	end
	-- the cache cannot be turned off (uncached runs: make it small)
	cache.size = $_size
	policy.add(policy.all(policy.TLS_FORWARD({
	    { '127.0.0.1@$UP_TLS_PORT', hostname = '$UP_NAME', ca_file = '$CA' } })))
	EOF
	start "${2:-kresd}" kresd -n -c "$_d/config" "$_d"
}
start_dnsdist() {
	_c=$T/dnsdist.conf _pc='-- no packet cache: none is configured'
	if [ -n "${2:-}" ]; then
		# a packet cache of DNSDIST_CACHE_ENTRIES entries: about
		# CACHE_BYTES of memory (see DNSDIST_ENTRY_BYTES)
		_c=$T/$2.conf
		_pc="pc = newPacketCache($DNSDIST_CACHE_ENTRIES) getPool(''):setCache(pc)"
	fi
	cat >"$_c" <<-EOF
	setLocal('127.0.0.1:$1')
	setACL({'127.0.0.0/8'})
	setSecurityPollSuffix('')
	$_pc
	newServer({address='127.0.0.1:$UP_TLS_PORT', tls='openssl',
	           subjectName='$UP_NAME', caStore='$CA',
	           validateCertificates=true, checkName='bench.test.'})
	EOF
	start "${2:-dnsdist}" dnsdist --supervised --disable-syslog -C "$_c"
}

# Name check: each forwarder, configured as below but told to expect the
# name wrong.bench, must not get an answer through (the certificate says
# upstream.bench). One query each, up to 3 s, all at once.
check_names() (
	T=$T/verify UP_NAME=wrong.bench
	UPSTREAM="127.0.0.1:$UP_TLS_PORT#$UP_NAME"
	mkdir -p "$T"
	: >"$T/pids"
	p=5401
	for t in $BENCH_TARGETS; do
		case $t in dotp | stubby | unbound | kresd | dnsdist) ;; *) continue ;; esac
		start_$t $p >/dev/null 2>&1 || true
		p=$((p + 1))
	done
	p=5401
	for t in $BENCH_TARGETS; do
		case $t in dotp | stubby | unbound | kresd | dnsdist) ;; *) continue ;; esac
		wait_listen $p 10 || true
		( if $BENCH_TOOL wait --once --quiet --port $p --timeout 3; then
			echo "$t ACCEPTED"; else echo "$t rejected"; fi ) >"$T/check.$t" &
		checkers="${checkers:-} $!"
		p=$((p + 1))
	done
	# only the checkers: the forwarders are children of this shell too
	wait $checkers
	for t in $BENCH_TARGETS; do
		[ -f "$T/check.$t" ] && cat "$T/check.$t"
	done
	for _p in $(tac "$T/pids" | cut -d' ' -f1); do stop "$_p" 30; done
)
if [ -n "$BENCH_TARGETS" ]; then
	check_names >"$T/check.txt"
	while read -r t v; do
		meta "name_check.$t" "$v"
		[ "$v" = rejected ] || caveat "$t answered through an upstream whose certificate does not match its configured name"
	done <"$T/check.txt"
	log "name check (wrong.bench expected, upstream.bench presented):" $(tr '\n' ' ' <"$T/check.txt")
fi

port=5301 MEASURED=
for t in $BENCH_TARGETS; do
	case $t in
	dotp | stubby | unbound | kresd | dnsdist) ;;
	*) caveat "unknown target $t skipped"; continue ;;
	esac
	if ! start_$t $port; then
		caveat "$t: configuration rejected, not measured"; continue
	fi
	pid=$LAST_PID
	ok=1
	if wait_listen $port 20; then
		# VmRSS before any query (listening, no upstream connection yet)
		set -- $($BENCH_TOOL rss $pid)
		meta "processes.$t.start_rss_kib" "$1"
		$BENCH_TOOL wait --port $port --timeout 20 &&
		    $BENCH_TOOL wait --mode tcp --port $port --timeout 20 || ok=0
	else
		ok=0
	fi
	if [ $ok = 0 ]; then
		[ "$t" != dotp ] || { cat "$T/dotp.log" >&2; die "dotp did not answer"; }
		caveat "$t did not answer on 127.0.0.1:$port within 20 s; not measured ($(tail -n 2 "$T/$t.log" | tr '\n' ' '))"
		stop $pid
		continue
	fi
	sleep 0.5
	set -- $($BENCH_TOOL rss $pid)
	meta "processes.$t.idle_rss_kib" "$1"
	meta "processes.$t.pid" "$pid"
	meta "processes.$t.port" "$port"
	eval "PID_$t=$pid PORT_$t=$port"
	MEASURED="$MEASURED $t"
	log "$t pid $pid on 127.0.0.1:$port (UDP and TCP answer; idle RSS $1 KiB)"
	port=$((port + 1))
done
MEASURED=${MEASURED# }
meta targets_measured "$MEASURED"
PID_upstream=$UP_PID

# The hop floor for the light-load table: bench/relay.c, a blocking UDP
# relay with no parsing and no TLS, in front of the upstream's plain port.
PORT_relay=5399 PID_relay=
if [ "$MAIN_ROUNDS" = 0 ]; then
	:	# BENCH_ONLY=forward|ratelimit: no light-load runs
elif cc -O2 -o "$T/relay" "$BENCH_DIR/relay.c" 2>"$T/relay-cc.log"; then
	start relay "$T/relay" $PORT_relay $UP_PLAIN_PORT
	PID_relay=$LAST_PID
	$BENCH_TOOL wait --port $PORT_relay --timeout 10 ||
	    { caveat "the UDP relay (bench/relay.c) did not answer: no hop floor"; stop $PID_relay; PID_relay=; }
else
	caveat "could not compile bench/relay.c ($(head -n 1 "$T/relay-cc.log")): no hop floor"
fi

# --- 4. load, 5. light load --------------------------------------------------
printf 'r0.bench.test A\nr1.bench.test A\nr2.bench.test A\nr3.bench.test A\nr4.bench.test A\nr5.bench.test A\nr6.bench.test A\nr7.bench.test A\nr8.bench.test A\nr9.bench.test A\n' >"$T/repeat.txt"

measure() { # TARGET TRANSPORT NAMES PORT DATAFILE LINES ROUND [extra]
	_t=$1 _pid=$(eval echo "\$PID_$1"); shift
	$BENCH_TOOL measure --target "$_t" --transport "$1" --names "$2" \
	    --port "$3" --datafile "$4" --datafile-lines "$5" --round "$6" \
	    --pid "$_pid" --upstream-pid "$UP_PID" --duration "$D" \
	    --clients "$BENCH_CLIENTS" --outstanding "$BENCH_OUTSTANDING" \
	    --tmp "$T" --out "$RUNS" ${7:-} ||
	    caveat "measure $_t $1 $2 round $6 failed"
}

r=1
while [ $r -le "$MAIN_ROUNDS" ]; do
	log "round $r of $BENCH_ROUNDS"
	# fresh unique names for this round: no forwarder ever sees one twice
	$BENCH_TOOL names --out "$T/udp.txt" --digits 9 --count $NAMES \
	    --start $(( (r - 1) * 2 * NAMES ))
	$BENCH_TOOL names --out "$T/tcp.txt" --digits 9 --count $NAMES \
	    --start $(( ((r - 1) * 2 + 1) * NAMES ))
	for scen in udp/unique tcp/unique udp/repeat tcp/repeat; do
		tr=${scen%/*} nm=${scen#*/}
		if [ $nm = unique ]; then f=$T/$tr.txt n=$NAMES; else f=$T/repeat.txt n=10; fi
		for t in $MEASURED; do
			measure $t $tr $nm "$(eval echo "\$PORT_$t")" "$f" $n $r --count-conns
		done
		if [ $scen = udp/unique ]; then
			# the upstream's own ceiling, same dnsperf settings
			measure upstream dot unique $UP_TLS_PORT "$f" $n $r
			measure upstream udp unique $UP_PLAIN_PORT "$f" $n $r
		fi
	done
	# light load: one query in flight; unique names (prefix per run).
	# LR runs per target, each a new client with a new DoT connection to
	# the upstream: the thread and CPU that connection lands on move the
	# paired baseline between two modes (about 60 and 120 us here), so one
	# run per round would be a coin toss.
	k=1
	while [ $k -le "$LR" ]; do
		for t in $MEASURED; do
			$BENCH_TOOL light --target $t --mode udp --port "$(eval echo "\$PORT_$t")" \
			    --pair-port $UP_TLS_PORT --pair-ca "$CA" --tls-name $UP_NAME \
			    --pid "$(eval echo "\$PID_$t")" --upstream-pid "$UP_PID" \
			    --duration "$L" --prefix "l${r}x$k" --round $r --out "$RUNS" ||
			    caveat "light $t round $r run $k: lost or wrong answers"
		done
		[ -z "$PID_relay" ] ||
		    $BENCH_TOOL light --target relay --mode udp --port $PORT_relay \
		    --pair-port $UP_PLAIN_PORT --pair-mode udp \
		    --pid "$PID_relay" --upstream-pid "$UP_PID" \
		    --duration "$L" --prefix "h${r}x$k" --round $r --out "$RUNS" ||
		    caveat "light relay round $r run $k: lost or wrong answers"
		$BENCH_TOOL light --target upstream --mode dot --port $UP_TLS_PORT \
		    --ca "$CA" --tls-name $UP_NAME --duration "$L" --prefix "l${r}x$k" \
		    --upstream-pid "$UP_PID" \
		    --round $r --out "$RUNS" || caveat "light upstream DoT round $r run $k: lost"
		$BENCH_TOOL light --target upstream --mode udp --port $UP_PLAIN_PORT \
		    --upstream-pid "$UP_PID" \
		    --duration "$L" --prefix "m${r}x$k" --round $r --out "$RUNS" ||
		    caveat "light upstream UDP round $r run $k: lost"
		k=$((k + 1))
	done
	rm -f "$T/udp.txt" "$T/tcp.txt"
	r=$((r + 1))
done

# final_rss KEY PID: records the RSS and peak RSS of PID as KEY.final_*.
final_rss() {
	set -- "$1" $($BENCH_TOOL rss "$2")
	meta "$1.final_rss_kib" "$2"
	meta "$1.final_hwm_kib" "$3"
}

# --- final state of the forwarders, then stop them ---------------------------
for t in $MEASURED; do
	final_rss "processes.$t" "$(eval echo "\$PID_$t")"
done

# --- highest rate with under 1% loss (resperf) -------------------------------
# After everything else: a flood makes forwarders open more upstream
# connections and take more memory, which must not show in the figures
# above. Each run: resperf ramps from 0 to BENCH_RESPERF_QPS over
# BENCH_RESPERF_RAMP s (it stops earlier when it cannot keep up, or with
# 65,536 queries unanswered); the plot's intervals give the peak
# (benchtool.py resperf_peak). Unique names, fresh each round; every target
# of a round gets the same file (each forwarder has its own cache).
if [ "$BENCH_RESPERF" = 1 ]; then
	RP_NAMES=$(( BENCH_RESPERF_QPS * BENCH_RESPERF_RAMP / 2 + 1000 ))
	rresperf() { # TARGET TRANSPORT PORT PID ROUND [extra]
		$BENCH_TOOL resperf --target "$1" --transport "$2" --port "$3" \
		    --pid "$4" --upstream-pid "$UP_PID" --round "$5" \
		    --datafile "$T/resperf.txt" --datafile-lines "$RP_NAMES" \
		    --max-qps "$BENCH_RESPERF_QPS" --ramp "$BENCH_RESPERF_RAMP" \
		    --clients "$BENCH_CLIENTS" --interval $RP_INTERVAL \
		    --query-timeout $RP_TIMEOUT --fall-behind $RP_FALL \
		    --bufsize $RP_BUF --tmp "$T" --out "$RUNS" ${6:-} ||
		    caveat "resperf $1 $2 round $5 failed"
	}
	r=1
	while [ $r -le "$BENCH_ROUNDS" ]; do
		log "resperf round $r of $BENCH_ROUNDS"
		$BENCH_TOOL names --out "$T/resperf.txt" --prefix "s${r}r" \
		    --digits 9 --count $RP_NAMES
		for t in $MEASURED; do
			rresperf $t udp "$(eval echo "\$PORT_$t")" "$(eval echo "\$PID_$t")" \
			    $r --count-conns
		done
		rresperf upstream udp $UP_PLAIN_PORT "$UP_PID" $r
		rresperf upstream dot $UP_TLS_PORT "$UP_PID" $r
		rm -f "$T/resperf.txt"
		r=$((r + 1))
	done
fi
if [ -n "${PID_dotp:-}" ]; then
	stop "$PID_dotp" 50
	meta dotp.exit_status "$STOP_RC"
	meta dotp.exit_line "$(grep -o 'dotp exiting.*' "$T/dotp.log" | tail -n 1)"
	[ "$STOP_RC" = 0 ] || caveat "dotp exited with status $STOP_RC on SIGTERM"
fi
for t in $MEASURED; do
	[ $t = dotp ] || stop "$(eval echo "\$PID_$t")" 50
done
[ -z "$PID_relay" ] || stop "$PID_relay" 10

# --- 8. answer caches ---------------------------------------------------------
# After every uncached run, with the uncached forwarders stopped: each peer
# again, as a new process with its answer cache on at CACHE_BYTES (equal
# memory; stubby has no cache). Names under c.bench.test. (TTL 3600: no
# entry expires during the runs).
#  a. all hits: BENCH_CACHE_NAMES names sent twice (warm), then dnsperf
#     over UDP cycling through them for D s; every target every round;
#     the upstream's query count shows they were hits;
#  b. light load, all hits: one query in flight, the same names cycled,
#     each query alternating with one to the upstream's plain UDP port;
#     dotp LR runs per round, the peers one;
#  c. a Zipf stream (rank k asked with probability ~ 1/k^s over
#     BENCH_ZIPF_NAMES names, BENCH_ZIPF_UNIQUE % of the queries a name
#     never asked before): each target a fresh process, BENCH_ZIPF_WARM
#     queries (a cold cache filling up), then BENCH_ZIPF_QUERIES more (the
#     figure); dnsperf runs through each file once. Hit ratio = 1 - the
#     queries the upstream received (its control socket) / queries sent.
#     Once per target (not per round): the same stream for every target.
if [ "$BENCH_CACHE" = 1 ]; then
	CACHED=
	for t in $MEASURED; do
		case $t in
		stubby) ;;
		dotp) [ "$DOTP_HAS_CACHE" = 0 ] || CACHED="$CACHED $t" ;;
		*) CACHED="$CACHED $t" ;;
		esac
	done
	port=5311 CMEASURED=
	for t in $CACHED; do
		if ! start_$t $port $t-cached; then
			caveat "$t-cached: configuration rejected, not measured"; continue
		fi
		pid=$LAST_PID
		if wait_listen $port 20 && $BENCH_TOOL wait --port $port --timeout 20; then
			sleep 0.5
			set -- $($BENCH_TOOL rss $pid)
			meta "cached.proc.$t.idle_rss_kib" "$1"
			eval "PIDC_$t=$pid PORTC_$t=$port"
			CMEASURED="$CMEASURED $t"
			log "$t-cached pid $pid on 127.0.0.1:$port (idle RSS $1 KiB)"
		else
			caveat "$t-cached did not answer on 127.0.0.1:$port within 20 s; not measured ($(tail -n 2 "$T/$t-cached.log" | tr '\n' ' '))"
			stop $pid
		fi
		port=$((port + 1))
	done
	CMEASURED=${CMEASURED# }
	meta cached.targets "$CMEASURED"
	$BENCH_TOOL names --out "$T/hits.txt" --prefix h --digits 7 \
	    --count "$BENCH_CACHE_NAMES" --zone c.bench.test
	r=1
	while [ $r -le "$BENCH_ROUNDS" ]; do
		log "cache round $r of $BENCH_ROUNDS: all hits ($BENCH_CACHE_NAMES names)"
		for t in $CMEASURED; do
			p=$(eval echo "\$PORTC_$t") pid=$(eval echo "\$PIDC_$t")
			$BENCH_TOOL warm --port "$p" --datafile "$T/hits.txt" ||
			    caveat "cache: warming $t-cached failed in round $r"
			$BENCH_TOOL measure --target "$t-cached" --transport udp --names hits \
			    --port "$p" --datafile "$T/hits.txt" \
			    --datafile-lines "$BENCH_CACHE_NAMES" --round $r --pid "$pid" \
			    --upstream-pid "$UP_PID" --upstream-control "$UP_CONF" \
			    --duration "$D" --clients "$BENCH_CLIENTS" \
			    --outstanding "$BENCH_OUTSTANDING" --tmp "$T" --out "$RUNS" \
			    --count-conns --thread-cpu ||
			    caveat "measure $t-cached udp hits round $r failed"
		done
		k=1
		while [ $k -le "$LR" ]; do
			for t in $CMEASURED; do
				[ $k = 1 ] || [ $t = dotp ] || continue
				$BENCH_TOOL light --target "$t-cached" --mode udp \
				    --port "$(eval echo "\$PORTC_$t")" --pid "$(eval echo "\$PIDC_$t")" \
				    --pair-port $UP_PLAIN_PORT --pair-mode udp \
				    --upstream-pid "$UP_PID" --duration "$L" --prefix k \
				    --zone c.bench.test --cycle "$BENCH_CACHE_NAMES" \
				    --round $r --out "$RUNS" ||
				    caveat "light $t-cached round $r run $k: lost or wrong answers"
			done
			k=$((k + 1))
		done
		r=$((r + 1))
	done
	for t in $CMEASURED; do
		pid=$(eval echo "\$PIDC_$t")
		final_rss "cached.proc.$t" "$pid"
		stop "$pid" 50
		[ $t != dotp ] ||
		    meta cached.proc.dotp.exit_line "$(grep -o 'dotp exiting.*' "$T/dotp-cached.log" | tail -n 1)"
	done

	log "cache: Zipf stream, $BENCH_ZIPF_NAMES names, s $BENCH_ZIPF_S, $BENCH_ZIPF_UNIQUE% unique, $BENCH_ZIPF_WARM + $BENCH_ZIPF_QUERIES queries"
	set -- $($BENCH_TOOL zipf --out "$T/zipf-warm.txt" --names "$BENCH_ZIPF_NAMES" \
	    --s "$BENCH_ZIPF_S" --unique-pct "$BENCH_ZIPF_UNIQUE" \
	    --count "$BENCH_ZIPF_WARM" --seed 1 --save-seen "$T/zipf.seen")
	meta cached.zipf.warm_repeats "$1"
	set -- $($BENCH_TOOL zipf --out "$T/zipf.txt" --names "$BENCH_ZIPF_NAMES" \
	    --s "$BENCH_ZIPF_S" --unique-pct "$BENCH_ZIPF_UNIQUE" \
	    --count "$BENCH_ZIPF_QUERIES" --seed 2 --unique-start "$BENCH_ZIPF_WARM" \
	    --seen "$T/zipf.seen")
	meta cached.zipf.repeats "$1"
	meta cached.zipf.distinct_names "$2"
	meta cached.zipf.unique_queries "$3"
	port=5321
	for t in $CMEASURED; do
		if ! start_$t $port $t-zipf; then
			caveat "$t-zipf: configuration rejected, not measured"; continue
		fi
		pid=$LAST_PID gc=
		if ! { wait_listen $port 20 && $BENCH_TOOL wait --port $port --timeout 20; }; then
			caveat "$t-zipf did not answer on 127.0.0.1:$port within 20 s; not measured"
			stop $pid; port=$((port + 1)); continue
		fi
		if [ $t = kresd ]; then
			# kresd's cache is managed by its garbage collector, a
			# separate process in every packaged setup (kres-cache-gc,
			# -d 1000 as Debian's unit)
			start kres-cache-gc kres-cache-gc -c "$T/kresd-zipf" -d 1000
			gc=$LAST_PID
		fi
		sleep 0.5
		set -- $($BENCH_TOOL rss $pid)
		meta "cached.zipf.$t.rss_start_kib" "$1"
		for seg in zipf-cold zipf; do
			if [ $seg = zipf ]; then f=$T/zipf.txt n=$BENCH_ZIPF_QUERIES
			else f=$T/zipf-warm.txt n=$BENCH_ZIPF_WARM; fi
			$BENCH_TOOL measure --target "$t-cached" --transport udp --names $seg \
			    --port $port --datafile "$f" --datafile-lines "$n" --round 1 \
			    --pid "$pid" --upstream-pid "$UP_PID" --upstream-control "$UP_CONF" \
			    --runs-through 1 --max-time 600 --clients "$BENCH_CLIENTS" \
			    --outstanding "$BENCH_OUTSTANDING" --tmp "$T" --out "$RUNS" ||
			    caveat "measure $t-cached $seg failed"
		done
		set -- $($BENCH_TOOL rss $pid)
		meta "cached.zipf.$t.rss_end_kib" "$1"
		meta "cached.zipf.$t.hwm_kib" "$2"
		if [ -n "$gc" ]; then
			if [ "$(ps -o stat= -p "$gc" 2>/dev/null | cut -c1)" = "" ] ||
			    [ "$(ps -o stat= -p "$gc" 2>/dev/null | cut -c1)" = Z ]; then
				# at this size it can fail (LMDB has no room left for
				# its own deletions); its packaged unit restarts it
				# after 30 s, longer than the stream
				meta cached.zipf.kresd.gc_status "exited during the stream ($(grep . "$T/kres-cache-gc.log" | tail -n 1))"
			else
				meta cached.zipf.kresd.gc_status "ran throughout"
				meta cached.zipf.kresd.gc_cpu_s "$(awk -v hz="$(getconf CLK_TCK)" \
				    '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$gc/stat")"
			fi
			stop "$gc" 30
		fi
		stop "$pid" 50
		[ $t != dotp ] ||
		    meta cached.zipf.dotp.exit_line "$(grep -o 'dotp exiting.*' "$T/dotp-zipf.log" | tail -n 1)"
		port=$((port + 1))
	done
	rm -f "$T/zipf.txt" "$T/zipf-warm.txt" "$T/zipf.seen"
fi

# --- 9. plain forwarding (--forward) -------------------------------------------
# Issue 13: forwarding a zone to a plain DNS server costs no more CPU per
# query than forwarding over TLS. Two new processes, after every other run:
#  - dotp --forward FWD_ZONE=dns://127.0.0.1:5300 --no-cache, -u the TLS
#    upstream as in every other run: names under the zone go to the
#    upstream's plain port over UDP (a pool of sockets on random ports), the rest
#    over TLS; no cache, so every query is forwarded;
#  - unbound, configured as in the uncached runs ("." over TLS, caches as
#    small as they go) plus a forward-zone for FWD_ZONE to the same port.
# The same backend for both: the upstream unbound answers every name under
# bench.test. from local data on its plain port too. Each round: dotp and
# unbound with unique names under the zone (fresh per round, the same
# file for both: every query misses), then dotp again with unique names
# outside it (its TLS path: the same process, in the same rounds, the
# figure plain is judged against). UDP from dnsperf, D s per run, CPU per
# query from /proc as everywhere; the upstream's received queries (its
# control socket) show that every query was forwarded.
FWD_ZONE=fwd.bench.test
FWD_SERVER=dns://127.0.0.1:$UP_PLAIN_PORT
FMEASURED=
if [ "$BENCH_FORWARD" = 1 ] && [ "$DOTP_HAS_FORWARD" = 1 ]; then
	for t in dotp unbound; do
		case $t in
		dotp)
			port=5331 inst=dotp-plain-forward
			start $inst "$DOTP_BIN" -l "127.0.0.1:$port" -u "$UPSTREAM" \
			    --ca-file "$CA" --forward "$FWD_ZONE=$FWD_SERVER" $DOTP_NOCACHE ;;
		unbound)
			port=5332 inst=unbound-forward-zone
			if ! start_unbound $port $inst $FWD_ZONE; then
				caveat "$inst: configuration rejected, not measured"; continue
			fi ;;
		esac
		pid=$LAST_PID
		# an answer through the zone (plain) and one outside it (TLS)
		if wait_listen $port 20 &&
		    $BENCH_TOOL wait --port $port --name ready.$FWD_ZONE --timeout 20 &&
		    $BENCH_TOOL wait --port $port --timeout 20; then
			sleep 0.5
			set -- $($BENCH_TOOL rss $pid)
			meta "forward.proc.$t.idle_rss_kib" "$1"
			eval "PIDF_$t=$pid PORTF_$t=$port"
			FMEASURED="$FMEASURED $t"
			log "$inst pid $pid on 127.0.0.1:$port (idle RSS $1 KiB)"
		else
			caveat "$inst did not answer on 127.0.0.1:$port within 20 s; not measured ($(tail -n 2 "$T/$inst.log" | tr '\n' ' '))"
			stop $pid
		fi
	done
	FMEASURED=${FMEASURED# }
	meta forward.targets "$FMEASURED"
	fmeasure() { # TARGET PORT PID DATAFILE ROUND
		$BENCH_TOOL measure --target "$1" --transport udp --names unique \
		    --port "$2" --pid "$3" --datafile "$4" --datafile-lines "$NAMES" \
		    --round "$5" --upstream-pid "$UP_PID" --upstream-control "$UP_CONF" \
		    --duration "$D" --clients "$BENCH_CLIENTS" \
		    --outstanding "$BENCH_OUTSTANDING" --tmp "$T" --out "$RUNS" \
		    --count-conns || caveat "measure $1 udp unique round $5 failed"
	}
	r=1
	while [ -n "$FMEASURED" ] && [ $r -le "$BENCH_ROUNDS" ]; do
		log "forward round $r of $BENCH_ROUNDS: unique names under $FWD_ZONE"
		$BENCH_TOOL names --out "$T/fwd.txt" --prefix f --digits 9 \
		    --count $NAMES --start $(( (r - 1) * NAMES )) --zone $FWD_ZONE
		for t in $FMEASURED; do
			case $t in
			dotp) tn=dotp-plain-forward ;;
			unbound) tn=unbound-forward-zone ;;
			esac
			fmeasure $tn "$(eval echo "\$PORTF_$t")" "$(eval echo "\$PIDF_$t")" \
			    "$T/fwd.txt" $r
		done
		rm -f "$T/fwd.txt"
		case " $FMEASURED " in *" dotp "*)
			# dotp's TLS path in the same process: names outside the zone
			$BENCH_TOOL names --out "$T/fwd-tls.txt" --prefix g --digits 9 \
			    --count $NAMES --start $(( (r - 1) * NAMES ))
			fmeasure dotp-forward-tls "$PORTF_dotp" "$PIDF_dotp" "$T/fwd-tls.txt" $r
			rm -f "$T/fwd-tls.txt" ;;
		esac
		r=$((r + 1))
	done
	for t in $FMEASURED; do
		pid=$(eval echo "\$PIDF_$t")
		final_rss "forward.proc.$t" "$pid"
		stop "$pid" 50
		[ $t = dotp ] || continue
		meta forward.proc.dotp.exit_status "$STOP_RC"
		meta forward.proc.dotp.start_line "$(grep -o 'dotp listening.*' "$T/dotp-plain-forward.log" | head -n 1)"
		meta forward.proc.dotp.exit_line "$(grep -o 'dotp exiting.*' "$T/dotp-plain-forward.log" | tail -n 1)"
		meta forward.proc.dotp.upstream_lines "$(grep -o 'upstream summary.*' "$T/dotp-plain-forward.log" | tr '\n' '|')"
		[ "$STOP_RC" = 0 ] || caveat "dotp-plain-forward exited with status $STOP_RC on SIGTERM"
	done
fi

# --- 10. the rate limiter's cost (--rate-limit) -------------------------------
# Issue 15: what the per-client rate limit costs per query when nothing is
# limited. Two new dotp processes, after every other run, identical but
# for the limit, both with the answer cache on at CACHE_BYTES as in the
# cache runs:
#  - dotp-ratelimit-off: no --rate-limit;
#  - dotp-ratelimit-on:  --rate-limit RL_LIMIT, the spec's maximum QPS and
#    BURST, far above the load: every query takes a token, none is ever
#    short of one (the exit line's ratelimit_truncated/_dropped show it).
# The load is the cache runs' all-hits load (the cheapest path, so the
# limiter's share of it is the largest): BENCH_CACHE_NAMES names under
# c.bench.test. warmed, then dnsperf over UDP cycling through them for D s.
# Each round both, the order alternated from round to round (off then on,
# then on then off) so that drift over the run does not favour one; CPU
# per query from /proc as everywhere. dnsperf sends from 127.0.0.1 only:
# one client, its table entry always the same.
RL_LIMIT=1000000:1000000
RMEASURED=
if [ "$BENCH_RATELIMIT" = 1 ] && [ "$DOTP_HAS_RATELIMIT" = 1 ]; then
	for t in off on; do
		case $t in
		off) port=5341 rl= ;;
		on) port=5342 rl="--rate-limit $RL_LIMIT" ;;
		esac
		start dotp-ratelimit-$t "$DOTP_BIN" -l "127.0.0.1:$port" -u "$UPSTREAM" \
		    --ca-file "$CA" --cache-size "$CACHE_BYTES" $rl
		pid=$LAST_PID
		if wait_listen $port 20 && $BENCH_TOOL wait --port $port --timeout 20; then
			sleep 0.5
			set -- $($BENCH_TOOL rss $pid)
			meta "ratelimit.proc.$t.idle_rss_kib" "$1"
			eval "PIDR_$t=$pid PORTR_$t=$port"
			RMEASURED="$RMEASURED $t"
			log "dotp-ratelimit-$t pid $pid on 127.0.0.1:$port (idle RSS $1 KiB)"
		else
			caveat "dotp-ratelimit-$t did not answer on 127.0.0.1:$port within 20 s; not measured ($(tail -n 2 "$T/dotp-ratelimit-$t.log" | tr '\n' ' '))"
			stop $pid
		fi
	done
	RMEASURED=${RMEASURED# }
	meta ratelimit.targets "$RMEASURED"
	[ "$RMEASURED" = "off on" ] ||
	    caveat "rate limiter runs: only '$RMEASURED' started, no comparison"
	$BENCH_TOOL names --out "$T/rl-hits.txt" --prefix h --digits 7 \
	    --count "$BENCH_CACHE_NAMES" --zone c.bench.test
	r=1
	while [ -n "$RMEASURED" ] && [ $r -le "$BENCH_ROUNDS" ]; do
		if [ $((r % 2)) = 1 ]; then order="off on"; else order="on off"; fi
		log "rate limiter round $r of $BENCH_ROUNDS: all hits ($BENCH_CACHE_NAMES names), $order"
		for t in $order; do
			case " $RMEASURED " in *" $t "*) ;; *) continue ;; esac
			p=$(eval echo "\$PORTR_$t") pid=$(eval echo "\$PIDR_$t")
			$BENCH_TOOL warm --port "$p" --datafile "$T/rl-hits.txt" ||
			    caveat "rate limiter: warming dotp-ratelimit-$t failed in round $r"
			$BENCH_TOOL measure --target "dotp-ratelimit-$t" --transport udp \
			    --names hits --port "$p" --datafile "$T/rl-hits.txt" \
			    --datafile-lines "$BENCH_CACHE_NAMES" --round $r --pid "$pid" \
			    --upstream-pid "$UP_PID" --upstream-control "$UP_CONF" \
			    --duration "$D" --clients "$BENCH_CLIENTS" \
			    --outstanding "$BENCH_OUTSTANDING" --tmp "$T" --out "$RUNS" \
			    --thread-cpu ||
			    caveat "measure dotp-ratelimit-$t udp hits round $r failed"
		done
		r=$((r + 1))
	done
	rm -f "$T/rl-hits.txt"
	for t in $RMEASURED; do
		pid=$(eval echo "\$PIDR_$t")
		final_rss "ratelimit.proc.$t" "$pid"
		stop "$pid" 50
		meta ratelimit.proc.$t.exit_status "$STOP_RC"
		meta ratelimit.proc.$t.exit_line "$(grep -o 'dotp exiting.*' "$T/dotp-ratelimit-$t.log" | tail -n 1)"
		[ "$STOP_RC" = 0 ] || caveat "dotp-ratelimit-$t exited with status $STOP_RC on SIGTERM"
	done
fi

# --- 6. callgrind, binary, image ---------------------------------------------
if [ "$BENCH_CG_QUERIES" -gt 0 ]; then
	log "callgrind: $BENCH_CG_QUERIES queries"
	BENCH_CG_OUT=$T/callgrind.json BENCH_CA=$CA BENCH_UPSTREAM=$UPSTREAM \
	    BENCH_TMP=$T sh "$BENCH_DIR/callgrind.sh" ||
	    caveat "callgrind.sh failed"
fi
meta binary.size "$(stat -c %s "$DOTP_BIN")"
[ "$(sha256sum "$DOTP_BIN" | cut -d' ' -f1)" = "$DOTP_SUM" ] ||
    caveat "$DOTP_BIN changed during the run (rebuilt?): the load runs measured the binary that was there at the start; size, image and callgrind may be of the new one"
if readelf -S "$DOTP_BIN" 2>/dev/null | grep -q '\.symtab'; then
	meta binary.stripped false
else
	meta binary.stripped true
fi
if [ "$BENCH_IMAGE" = 1 ]; then
	if img=$(DOTP_IMAGE_BIN=$DOTP_BIN sh tests/image.sh build dotp-bench:latest 2>&1); then
		sz=$(printf '%s\n' "$img" | sed -n 's/^image: .*: \([0-9]*\) bytes uncompressed.*/\1/p')
		gz=$(printf '%s\n' "$img" | sed -n 's/.* \([0-9]*\) bytes compressed.*/\1/p')
		[ -z "$sz" ] || meta image.uncompressed "$sz"
		[ -z "$gz" ] || meta image.compressed "$gz"
		meta image.line "$(printf '%s' "$img" | tr '\n' ' ')"
		# drop the tag again (buildah's vfs storage keeps full copies)
		buildah --storage-driver vfs rmi dotp-bench:latest >/dev/null 2>&1 || true
	else
		meta image.error "tests/image.sh build failed: $(printf '%s' "$img" | tail -n 1)"
		caveat "image not sized: $(printf '%s' "$img" | tail -n 1)"
	fi
fi

# --- 7. versions, settings, report -------------------------------------------
meta versions.dotp "$("$DOTP_BIN" -V 2>&1 | sed -n '1s/^dotp //p')"
meta versions.unbound "$(unbound -V 2>/dev/null | sed -n 's/^Version //p')"
meta versions.stubby "$(stubby -V 2>&1 | sed -n '1s/^Stubby //p') (Debian stubby $(dpkg-query -W -f='${Version}' stubby 2>/dev/null), getdns $(dpkg-query -W -f='${Version}' libgetdns10 2>/dev/null))"
meta versions.kresd "$(kresd --version 2>&1 | sed -n 's/.*version //p')"
meta versions.dnsdist "$(dnsdist --version 2>&1 | sed -n '1s/^dnsdist \([^ ]*\).*/\1/p')"
meta versions.dnsperf "$(dnsperf -h 2>&1 | sed -n 's/^Version //p')"
meta versions.valgrind "$(valgrind --version 2>&1 | sed 's/^valgrind-//')"
meta versions.openssl "$(openssl version | cut -d' ' -f2)"
meta settings.duration_s "$D"
meta settings.light_s "$L"
meta settings.light_reps "$LR"
meta settings.rounds "$BENCH_ROUNDS"
meta settings.budget_min "$BENCH_TIME"
meta settings.clients "$BENCH_CLIENTS"
meta settings.outstanding "$BENCH_OUTSTANDING"
meta settings.unique_names_per_file "$NAMES"
meta settings.dnsperf "dnsperf -m udp|tcp|dot -c $BENCH_CLIENTS -q $BENCH_OUTSTANDING -l $D -t 2 -v (per-query latencies from -v)"
_order=
[ "$MAIN_ROUNDS" = 0 ] || _order="each round: for scenario in udp/unique tcp/unique udp/repeat tcp/repeat: for target in $MEASURED (+ upstream DoT and UDP after udp/unique); then light load$([ "$BENCH_RESPERF" = 0 ] || echo "; after all rounds, resperf rounds: $MEASURED, upstream UDP, upstream DoT")$([ "$BENCH_CACHE" = 0 ] || echo "; then the cache runs (forwarders restarted with caches on): each round all-hits load then light load over ${CMEASURED:-none}; then one Zipf stream per target, each a fresh process")"
[ -z "$FMEASURED" ] || _order="${_order:+$_order; then }${BENCH_ONLY:+BENCH_ONLY=$BENCH_ONLY: }the plain forwarding runs (two new processes): each round, UDP, unique names under $FWD_ZONE to $(echo " $FMEASURED" | sed -e 's/ dotp/ dotp-plain-forward/' -e 's/ unbound/ unbound-forward-zone/' -e 's/^ //'), then unique names outside the zone to the same dotp (dotp-forward-tls)"
[ -z "$RMEASURED" ] || _order="${_order:+$_order; then }${BENCH_ONLY:+BENCH_ONLY=$BENCH_ONLY: }the rate limiter runs (two new dotp processes, cache on): each round, UDP, all hits ($BENCH_CACHE_NAMES warmed names) to dotp-ratelimit-off and dotp-ratelimit-on (--rate-limit $RL_LIMIT), the order alternated from round to round"
meta settings.order "$_order"
meta settings.only "$BENCH_ONLY"
meta settings.resperf.enabled "$([ "$BENCH_RESPERF" = 1 ] && echo true || echo false)"
if [ "$BENCH_RESPERF" = 1 ]; then
	meta settings.resperf.command "resperf -M udp|dot -C $BENCH_CLIENTS -m $BENCH_RESPERF_QPS -r $BENCH_RESPERF_RAMP -i $RP_INTERVAL -t $RP_TIMEOUT -L 1 -F $RP_FALL -b $RP_BUF"
	meta settings.resperf.max_qps "$BENCH_RESPERF_QPS"
	meta settings.resperf.ramp_s "$BENCH_RESPERF_RAMP"
	meta settings.resperf.interval_s $RP_INTERVAL
	meta settings.resperf.timeout_s $RP_TIMEOUT
	meta settings.resperf.fall_behind $RP_FALL
	meta settings.resperf.client_buffer_kib $RP_BUF
	meta settings.resperf.max_loss_pct 1
	meta settings.resperf.names_per_round "$RP_NAMES"
	meta versions.resperf "$(resperf -h 2>&1 | sed -n 's/^Version //p')"
	caveat "resperf busy-waits between sends: it keeps one of the 2 cores busy for the whole run, so its peak rates are lower than the dnsperf QPS; it sends open loop (no limit on queries in flight), so dotp opens more than one upstream connection there (--conn-queries 128 per connection, up to --max-conns)"
	caveat "resperf's client sockets get $RP_BUF KiB buffers (-b $RP_BUF, as far as net.core.rmem_max allows) so that the client drops no answers; each forwarder keeps its own default UDP receive buffer"
fi
if [ "$DOTP_HAS_CACHE" = 1 ]; then
	meta cache.dotp "off (--no-cache; cache runs below)"
else
	meta cache.dotp "none (this dotp has no cache)"
fi
meta cache.stubby "none (stubby has no cache)"
meta cache.unbound "cannot be disabled: msg-cache-size 0, rrset-cache-size 0, key/neg-cache-size 0, prefetch off (unique names miss it; repeated names hit it)"
meta cache.kresd "cannot be disabled: cache.size = 1 MB (unique names miss it; repeated names hit it)"
meta cache.dnsdist "none (no packet cache configured)"
meta cache.upstream "none (local data)"
meta cached.enabled "$([ "$BENCH_CACHE" = 1 ] && echo true || echo false)"
if [ "$BENCH_CACHE" = 1 ]; then
	meta cached.budget_bytes "$CACHE_BYTES"
	meta cached.hit_names "$BENCH_CACHE_NAMES"
	meta cached.zipf.names "$BENCH_ZIPF_NAMES"
	meta cached.zipf.s "$BENCH_ZIPF_S"
	meta cached.zipf.unique_pct "$BENCH_ZIPF_UNIQUE"
	meta cached.zipf.warm_queries "$BENCH_ZIPF_WARM"
	meta cached.zipf.queries "$BENCH_ZIPF_QUERIES"
	meta cached.config.dotp "--cache-size $CACHE_BYTES (the whole block: index and entries)"
	meta cached.config.stubby "n/a: stubby has no cache"
	meta cached.config.unbound "msg-cache-size $((CACHE_BYTES / 3)) + rrset-cache-size $((CACHE_BYTES - CACHE_BYTES / 3)) (unbound's own accounting), prefetch off"
	meta cached.config.kresd "cache.size = $CACHE_BYTES (the LMDB map); Zipf run with kres-cache-gc -d 1000 beside it"
	meta cached.config.dnsdist "newPacketCache($DNSDIST_CACHE_ENTRIES): $DNSDIST_ENTRY_BYTES bytes per entry measured (dnsdist 1.7.3), so about $CACHE_BYTES bytes"
	caveat "cache runs: every cached forwarder is a new process started after the uncached runs (equal memory: $CACHE_BYTES bytes where the size is in bytes; dnsdist's packet cache is sized in entries, $DNSDIST_CACHE_ENTRIES x ~$DNSDIST_ENTRY_BYTES bytes); names under c.bench.test., TTL 3600, so nothing expires during them"
	caveat "cache runs: the queries the upstream received are read from its control socket (unbound-control stats_noreset, total.num.queries) before and after each run; they include dnsdist's health checks (one a second, checkName bench.test.), so dnsdist's hit ratios are low by about 1/QPS"
fi
meta forward.enabled "$([ -n "$FMEASURED" ] && echo true || echo false)"
if [ -n "$FMEASURED" ]; then
	meta forward.zone "$FWD_ZONE"
	meta forward.server "$FWD_SERVER"
	meta forward.config.dotp-plain-forward "-u $UPSTREAM --forward $FWD_ZONE=$FWD_SERVER $DOTP_NOCACHE (names under the zone over plain UDP from a pool of sockets on random ports)"
	meta forward.config.unbound-forward-zone "as the uncached unbound (forward-zone \".\" over TLS, msg/rrset/key/neg-cache-size 0, prefetch off) plus forward-zone \"$FWD_ZONE.\" forward-addr 127.0.0.1@$UP_PLAIN_PORT (plain)"
	meta forward.config.dotp-forward-tls "the same dotp process, unique names outside $FWD_ZONE (its default zone: TLS to $UPSTREAM)"
	caveat "plain forwarding runs: new processes after every other run (dotp-plain-forward on 127.0.0.1:5331, unbound-forward-zone on :5332), both forwarding $FWD_ZONE to the upstream unbound's plain port $UP_PLAIN_PORT (the same local data as over DoT); unique names, the same file for both in a round; dotp-forward-tls is the same dotp with names outside the zone (its TLS path), measured in the same rounds"
fi
meta ratelimit.enabled "$([ -n "$RMEASURED" ] && echo true || echo false)"
if [ -n "$RMEASURED" ]; then
	meta ratelimit.limit "$RL_LIMIT"
	meta ratelimit.cache_bytes "$CACHE_BYTES"
	meta ratelimit.hit_names "$BENCH_CACHE_NAMES"
	meta ratelimit.config.dotp-ratelimit-off "-u $UPSTREAM --cache-size $CACHE_BYTES (no --rate-limit)"
	meta ratelimit.config.dotp-ratelimit-on "-u $UPSTREAM --cache-size $CACHE_BYTES --rate-limit $RL_LIMIT"
	caveat "rate limiter runs: two new dotp processes after every other run (dotp-ratelimit-off on 127.0.0.1:5341, dotp-ratelimit-on on :5342 with --rate-limit $RL_LIMIT, far above the load: nothing is limited), cache on ($CACHE_BYTES bytes), the all-hits load of the cache runs, the order alternated each round; dnsperf's queries all come from 127.0.0.1, one client: the table lookup always finds the same entry (the cost with thousands of clients, whose entries miss the CPU caches, is not measured)"
fi
caveat "2 cores shared by dnsperf, the forwarder under test and the upstream unbound (2 threads): every figure is for this contended setup, not a forwarder alone"
caveat "forwarders run their default threading: dotp, stubby, kresd and unbound (num-threads 1) one thread each for queries; dnsdist uses its own threads (CPU/query counts all threads)"
caveat "dnsperf -m dot does not verify the upstream certificate; every forwarder does (test CA, name upstream.bench)"
caveat "dnsperf -q $BENCH_OUTSTANDING over -c $BENCH_CLIENTS clients: at most $BENCH_OUTSTANDING queries in flight, under dotp's --conn-queries 128, so dotp stays on one upstream connection"
caveat "padding: dotp, stubby (128-byte blocks), unbound (pad-queries default) and kresd pad queries to the upstream; dnsdist forwards them as they are"
caveat "repeated names: unbound and kresd answer them from their caches (cannot be disabled); dotp, stubby and dnsdist forward every one"
caveat "latency percentiles come from dnsperf -v per-query latencies (dnsperf 2.10 has no histogram option), which costs dnsperf some throughput; the same for every target"
caveat "light load uses bench/benchtool.py (Python, one query in flight): dnsperf -c 1 -q 1 paces itself with long sleeps (tens of qps) and is not a latency tool; the Python client adds the same few microseconds to every target"
caveat "unbound forwarder: max-reuse-tcp-queries 1000000 and tcp-reuse-timeout 60 s so that it keeps its upstream connection like the others (its defaults: 200 queries, 60 s); kresd: DNSSEC validation and the priming/time-skew/trust-anchor-signal modules off (nothing but bench.test. resolves upstream)"
caveat "dnsdist health-checks the upstream once a second (checkName bench.test.) over its own short-lived DoT connections; they are counted among its connections"
caveat "light-load latencies on a virtual machine are mostly wake-up costs and move between rounds (up to 3-4x when the hypervisor steals CPU); alternating each forwarder's queries with direct DoT queries cancels the drift in the baseline, but the added figure still scales with the machine's wake-up cost"
caveat "CPU time from /proc/PID/stat has 10 ms resolution; runs of a few seconds keep the error under ~1%"
meta elapsed_s "$(( $(date +%s) - BENCH_T0 ))"
meta date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
meta command "$BENCH_CMD"

$BENCH_TOOL report --runs "$RUNS" --meta "$META" --callgrind "$T/callgrind.json" \
    --out-json "$BENCH_OUT/results.json" --out-md "$BENCH_OUT/results.md"
log "done in $(( $(date +%s) - BENCH_T0 )) s: $BENCH_OUT/results.md, $BENCH_OUT/results.json" \
    "$([ "$BENCH_OUT" != "$REPO/build/bench" ] || echo "('make bench-publish' copies them to bench/)")"
