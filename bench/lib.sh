# lib.sh - shared by bench/run.sh and bench/callgrind.sh (sourced, POSIX sh).
#
# Needs: BENCH_DIR (the bench/ directory) and T (a private temp directory).
# Every process started here is recorded by PID in $T/pids and stopped by
# PID in bench_cleanup; nothing is ever killed by name.

BENCH_TOOL="/usr/bin/python3 $BENCH_DIR/benchtool.py"
UP_NAME=upstream.bench          # the name in the upstream's certificate
UP_TLS_PORT=853                 # the upstream's DoT port
UP_PLAIN_PORT=5300              # the upstream's plain DNS port

log() { printf '%s bench: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# A private network namespace: run.sh and callgrind.sh re-exec themselves in
# one (`unshare -n`, loopback only) unless BENCH_INNER=1 says they are in it.
enter_netns() {
	[ "${BENCH_INNER:-0}" = 1 ] && return 0
	command -v unshare >/dev/null 2>&1 || die "unshare (util-linux) missing"
	if [ "$(id -u)" = 0 ]; then u="unshare -n"; else u="unshare -r -n"; fi
	export BENCH_INNER=1
	exec $u sh -c 'ip link set lo up || exit 125
		exec sh "$0" "$@"' "$@"
}

# start NAME CMD...: run CMD in the background, stdout+stderr to
# $T/NAME.log, stdin from /dev/null; the PID goes to $T/pids and is left
# in $LAST_PID.
start() {
	_n=$1; shift
	"$@" </dev/null >"$T/$_n.log" 2>&1 &
	LAST_PID=$!
	echo "$LAST_PID $_n" >>"$T/pids"
}

# stop PID [TENTHS]: SIGTERM, wait up to TENTHS/10 s (default 50), then
# SIGKILL. Sets STOP_RC to the exit status when PID was our child.
stop() {
	_p=$1 _w=${2:-50} _i=0
	STOP_RC=
	kill -0 "$_p" 2>/dev/null || { wait "$_p" 2>/dev/null && STOP_RC=0 || STOP_RC=$?; return 0; }
	kill -TERM "$_p" 2>/dev/null || true
	while kill -0 "$_p" 2>/dev/null && [ "$(ps -o stat= -p "$_p" 2>/dev/null | cut -c1)" != Z ] &&
	    [ $_i -lt "$_w" ]; do
		sleep 0.1; _i=$((_i + 1))
	done
	if kill -0 "$_p" 2>/dev/null && [ "$(ps -o stat= -p "$_p" 2>/dev/null | cut -c1)" != Z ]; then
		log "pid $_p did not stop on SIGTERM, SIGKILL"
		kill -KILL "$_p" 2>/dev/null || true
	fi
	wait "$_p" 2>/dev/null && STOP_RC=0 || STOP_RC=$?
	# mark it stopped so that cleanup does not signal a recycled PID
	[ ! -f "$T/pids" ] || sed -i "/^$_p /d" "$T/pids"
}

# Stop everything still listed in $T/pids (newest first), remove $T.
bench_cleanup() {
	if [ -n "${T:-}" ] && [ -f "$T/pids" ]; then
		for _p in $(cat "$T"/*/pids 2>/dev/null | tac | cut -d' ' -f1) \
		    $(tac "$T/pids" | cut -d' ' -f1); do
			stop "$_p" 30
		done
	fi
	if [ -n "${T:-}" ] && [ "${BENCH_KEEP_TMP:-0}" != 1 ]; then
		rm -rf "$T"
	fi
}

# wait_listen PORT [SECONDS]: a TCP listener on 127.0.0.1:PORT
wait_listen() {
	_i=0 _m=$(( ${2:-20} * 10 ))
	while ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; do
		_i=$((_i + 1)); [ $_i -lt $_m ] || return 1
		sleep 0.1
	done
}

# Test PKI in DIR: ca.pem (+ key), server.pem/server.key for $UP_NAME,
# both EC P-256.
mk_pki() {
	(
	cd "$1" || exit 1
	set -- -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes
	openssl req -x509 "$@" -keyout ca.key -out ca.pem -days 7 \
	    -subj /CN=dotp-bench-ca \
	    -addext basicConstraints=critical,CA:TRUE \
	    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
	openssl req -new "$@" -keyout server.key -out server.csr \
	    -subj "/CN=$UP_NAME" 2>/dev/null &&
	printf '%s\n' "subjectAltName=DNS:$UP_NAME" \
	    'extendedKeyUsage=serverAuth' 'basicConstraints=critical,CA:FALSE' \
	    'keyUsage=critical,digitalSignature' >server.ext &&
	openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key \
	    -set_serial 2 -days 7 -extfile server.ext -out server.pem 2>/dev/null
	) || die "openssl could not make the test certificates"
}

# The upstream: unbound with DoT on 127.0.0.1:853 and plain DNS on :5300,
# answering every name under bench.test. with 192.0.2.1 from local data
# (redirect zone) and refusing everything else, so it never recurses.
# Names under c.bench.test. (the cache runs) get the same address with a
# TTL of 3600 s instead of 60, so that no cached answer expires during a
# run. Two threads (the machine has 2 cores), many TCP clients, a long
# idle timeout so forwarders keep their connections between runs. Its
# control socket ($T/upstream/control.sock, no TLS, nothing listens on
# the network for it) gives the queries it received (benchtool.py
# measure --upstream-control "$UP_CONF").
start_upstream() {
	mkdir -p "$T/upstream"
	cat >"$T/upstream/unbound.conf" <<-EOF
	server:
	    interface: 127.0.0.1@$UP_TLS_PORT
	    interface: 127.0.0.1@$UP_PLAIN_PORT
	    tls-port: $UP_TLS_PORT
	    tls-service-key: "$T/pki/server.key"
	    tls-service-pem: "$T/pki/server.pem"
	    do-ip6: no
	    username: ""
	    chroot: ""
	    directory: "$T/upstream"
	    pidfile: ""
	    use-syslog: no
	    logfile: ""
	    verbosity: 1
	    do-daemonize: no
	    num-threads: 2
	    so-reuseport: yes
	    incoming-num-tcp: 1024
	    tcp-idle-timeout: 300000
	    ratelimit: 0
	    ip-ratelimit: 0
	    module-config: "iterator"
	    local-zone: "." refuse
	    local-zone: "bench.test." redirect
	    local-data: "bench.test. 60 IN A 192.0.2.1"
	    local-zone: "c.bench.test." redirect
	    local-data: "c.bench.test. 3600 IN A 192.0.2.1"
	remote-control:
	    control-enable: yes
	    control-interface: "$T/upstream/control.sock"
	    control-use-cert: no
	EOF
	unbound-checkconf "$T/upstream/unbound.conf" >/dev/null ||
	    die "upstream unbound.conf rejected"
	start upstream unbound -d -c "$T/upstream/unbound.conf"
	UP_PID=$LAST_PID
	$BENCH_TOOL wait --port $UP_PLAIN_PORT --timeout 20 ||
	    { cat "$T/upstream.log" >&2; die "the upstream unbound does not answer"; }
	$BENCH_TOOL wait --mode dot --port $UP_TLS_PORT --ca "$T/pki/ca.pem" \
	    --tls-name $UP_NAME --timeout 20 ||
	    { cat "$T/upstream.log" >&2; die "the upstream does not answer over DoT"; }
	UP_CONF=$T/upstream/unbound.conf
}
