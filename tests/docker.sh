#!/bin/sh
# docker.sh - the FROM scratch image (Dockerfile.scratch) under a real
# Docker engine, run the way the README tells users to run it.
#
#   sh tests/docker.sh                     # puts ./dotp in the image
#   DOTP_BIN=/path/to/dotp sh tests/docker.sh
#
# Starts a private dockerd (vfs storage, no iptables, no bridge; data,
# exec root, socket and pid file under build/docker/) inside `unshare -n
# -m`: a network namespace with only loopback, so nothing can reach the
# internet, and a mount namespace with its own /run and /etc/docker, so
# containerd's shim sockets, runc state and dockerd's key.json vanish
# with it. Containers use
# `--network host`, which is that namespace. Then:
#   - builds the image with `docker build` from a directory holding only
#     ./dotp; its size must be <= 300,000 bytes;
#   - runs unbound as a DoT upstream with local data on 127.0.0.1:8853;
#   - runs the image read-only, as uid 65532, with every capability
#     dropped, the CA mounted and the upstream in the environment: it
#     must answer dig from the upstream's data (UDP and TCP), turn
#     `healthy` through the image's HEALTHCHECK, serve /metrics on the
#     image's DOTP_METRICS (9253), log its start line and no line per
#     query, and on `docker stop` drain and exit 0 with its exit lines;
#   - runs a second container whose upstream is unreachable: after
#     queries it must turn `unhealthy`.
# One line per check: `docker: ok ...` or `docker: FAIL ...`; exits 1 on
# any failure. Removes its containers, image, dockerd and directories.
#
# Needs root (skipped otherwise), dockerd (Debian: docker.io, which
# brings containerd and runc), docker, unbound, openssl, dig, curl,
# unshare and ip. DOCKER_KEEP=1 keeps build/docker/ (logs) afterwards.
set -eu
# a relative DOTP_BIN is relative to the caller's directory
case "${DOTP_BIN:-}" in
"" | /*) ;;
*) DOTP_BIN="$(pwd)/$DOTP_BIN" ;;
esac
cd "$(dirname "$0")/.."
PATH=$PATH:/usr/sbin:/sbin
export PATH
: "${DOTP_BIN:=$(pwd)/dotp}"
export DOTP_BIN

MAX=300000
UP=8853          # unbound's DoT port
LISTEN=5399      # the healthy container
METRICS=9253     # the image's DOTP_METRICS
BAD_LISTEN=5398  # the container with an unreachable upstream
BAD_METRICS=9254

# --- outside the namespaces: checks, then re-run inside them --------------
if [ "${DOTP_DOCKER_NS:-}" != 1 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "docker: SKIPPED: needs root (a private dockerd)"
		exit 0
	fi
	miss=
	for c in dockerd containerd runc docker unbound openssl dig curl \
	    unshare ip mount; do
		command -v "$c" >/dev/null 2>&1 || miss="$miss $c"
	done
	if [ -n "$miss" ]; then
		echo "docker: FAIL not installed:$miss" \
		    "(apt-get install docker.io unbound openssl bind9-dnsutils" \
		    "curl iproute2 util-linux, or make test-deps)"
		exit 1
	fi
	[ -x "$DOTP_BIN" ] || {
		echo "docker: FAIL $DOTP_BIN missing: run 'make dotp' first"
		exit 1
	}
	export DOTP_DOCKER_NS=1
	# -m: util-linux unshare makes the new mount namespace private, so
	# the tmpfs on /run below is not seen outside
	exec unshare -n -m sh "$0" "$@"
fi

# --- inside: private loopback and /run -----------------------------------
ip link set lo up || { echo "docker: FAIL cannot bring up lo"; exit 1; }
mount -t tmpfs -o mode=755 tmpfs /run ||
    { echo "docker: FAIL cannot mount a private /run"; exit 1; }
# dockerd 20.10 writes its identity key to /etc/docker/key.json
if [ -d /etc/docker ]; then
	mount -t tmpfs -o mode=755 tmpfs /etc/docker ||
	    { echo "docker: FAIL cannot mount a private /etc/docker"; exit 1; }
fi

top=$(pwd)/build/docker
work=$top/$$                   # this run's directory
D=$work/data E=$work/exec S=$work/docker.sock P=$work/dockerd.pid
tmp=$work/tmp                  # PKI, unbound, build context
mkdir -p "$D" "$E" "$tmp"
DOCKER_HOST=unix://$S
# the classic builder: the daemon's own, no buildx plugin needed
DOCKER_BUILDKIT=0
DOCKER_CONFIG=$work/cli        # no ~/.docker of the caller's
export DOCKER_HOST DOCKER_BUILDKIT DOCKER_CONFIG
IMAGE=dotp-docker-test:$$
OK=dotp-ok-$$ BAD=dotp-bad-$$
dpid='' ub='' fails=0 built=''

ok() { echo "docker: ok $*"; }
bad() { echo "docker: FAIL $*"; fails=$((fails + 1)); }
# indented copy of a file, for a failure's context
show() { [ ! -s "$2" ] || sed "s/^/  $1: /" "$2" | tail -n "${3:-40}"; }
die() { bad "$*"; exit 1; }

# stops what this run started, each by its PID
stop_pid() {	# stop_pid PID TENTHS
	kill -TERM "$1" 2>/dev/null || return 0
	i=0
	while kill -0 "$1" 2>/dev/null && [ $i -lt "$2" ]; do
		sleep 0.1; i=$((i + 1))
	done
	kill -KILL "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

cleanup() {
	st=$?
	trap - EXIT
	set +e
	if [ -n "$dpid" ] && kill -0 "$dpid" 2>/dev/null; then
		docker rm -f "$OK" "$BAD" >/dev/null 2>&1 || true
		[ -z "$built" ] || docker rmi -f "$IMAGE" >/dev/null 2>&1 || true
		stop_pid "$dpid" 150
	fi
	# shims that outlived dockerd: ours are the ones given our socket
	for f in /proc/[0-9]*/cmdline; do
		p=${f#/proc/}; p=${p%/cmdline}
		c=$({ tr '\0' ' ' <"$f"; } 2>/dev/null) || continue
		case $c in
		*containerd-shim*"$E/containerd/"*) stop_pid "$p" 20 ;;
		esac
	done
	[ -z "$ub" ] || stop_pid "$ub" 20
	if [ "${DOCKER_KEEP:-}" = 1 ]; then
		echo "docker: kept $work"
	else
		# dockerd leaves its host netns bind-mounted on exec/netns/
		# default: unmount what is under $work (in our mount namespace
		# only), deepest first, then remove
		awk -v w="$work/" 'index($5, w) == 1 { print $5 }' \
		    /proc/self/mountinfo | sort -r | while read -r m; do
			umount "$m" || umount -l "$m"
		done
		rm -rf "$work" || st=1
		rmdir "$top" 2>/dev/null || true
	fi
	exit "$st"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

# --- dockerd ----------------------------------------------------------------
echo '{}' >"$work/daemon.json"   # not /etc/docker/daemon.json
t0=$(date +%s)
dockerd --config-file "$work/daemon.json" --storage-driver vfs \
    --iptables=false --ip6tables=false --bridge=none \
    --data-root "$D" --exec-root "$E" -H "unix://$S" --pidfile "$P" \
    >"$work/dockerd.log" 2>&1 &
dpid=$!
i=0
until docker version >/dev/null 2>&1; do
	if ! kill -0 "$dpid" 2>/dev/null || [ $i -ge 300 ]; then
		show dockerd "$work/dockerd.log"
		die "dockerd did not start (log above)"
	fi
	sleep 0.1; i=$((i + 1))
done
ok "private dockerd $(docker version -f '{{.Server.Version}}') up in" \
    "$(( $(date +%s) - t0 )) s (pid $dpid, socket $S)"

# --- the image ------------------------------------------------------------
mkdir "$tmp/ctx"
cp "$DOTP_BIN" "$tmp/ctx/dotp"
if docker build -q -f Dockerfile.scratch -t "$IMAGE" "$tmp/ctx" \
    >"$tmp/build.log" 2>&1; then
	built=1
	size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
	if [ "$size" -le $MAX ]; then
		ok "image built: $size bytes (limit $MAX; binary" \
		    "$(wc -c <"$DOTP_BIN") bytes)"
	else
		bad "image is $size bytes, over $MAX"
	fi
else
	show build "$tmp/build.log"
	die "docker build failed"
fi

# --- the upstream: unbound over DoT with local data ---------------------
(
	cd "$tmp" &&
	set -- -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes &&
	openssl req -x509 "$@" -keyout ca.key -out ca.pem -days 2 \
	    -subj /CN=dotp-docker-test-ca \
	    -addext basicConstraints=critical,CA:TRUE \
	    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
	openssl req -new "$@" -keyout server.key -out server.csr \
	    -subj /CN=dot.test 2>/dev/null &&
	printf 'subjectAltName=DNS:dot.test\nextendedKeyUsage=serverAuth\n' >ext &&
	openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key \
	    -set_serial 2 -days 2 -extfile ext -out server.pem 2>/dev/null &&
	chmod 644 ca.pem	# read by uid 65532 in the container
) || die "openssl could not make the test certificates"
cat >"$tmp/unbound.conf" <<EOF
server:
    interface: 127.0.0.1@$UP
    tls-port: $UP
    tls-service-key: "$tmp/server.key"
    tls-service-pem: "$tmp/server.pem"
    do-ip6: no
    username: ""
    chroot: ""
    directory: "$tmp"
    pidfile: ""
    use-syslog: no
    logfile: ""
    do-daemonize: no
    num-threads: 1
    module-config: "iterator"
    local-zone: "example.test." static
    local-data: "www.example.test. 300 IN A 192.0.2.1"
    local-data: "mail.example.test. 300 IN A 192.0.2.25"
remote-control:
    control-enable: no
EOF
unbound -d -c "$tmp/unbound.conf" >"$tmp/unbound.log" 2>&1 &
ub=$!

# --- the container, as a user would run it ------------------------------
HEALTH="--health-interval 1s --health-timeout 3s --health-start-period 1s"
# shellcheck disable=SC2086 # $HEALTH is a word list
docker run -d --name "$OK" --network host --read-only --cap-drop ALL \
    --user 65532 $HEALTH --health-retries 3 \
    -v "$tmp/ca.pem:/ca.pem:ro" -e DOTP_CA_FILE=/ca.pem \
    -e "DOTP_UPSTREAM=127.0.0.1:$UP#dot.test" \
    "$IMAGE" -l "127.0.0.1:$LISTEN" >"$tmp/run.log" 2>&1 || {
	show run "$tmp/run.log"
	die "docker run failed"
}
ok "container started: --network host --read-only --cap-drop ALL" \
    "--user 65532, upstream 127.0.0.1:$UP#dot.test"

# dig, then the container's logs if it did not answer
q="dig @127.0.0.1 -p $LISTEN +short +time=1 +tries=1"
i=0 a=''
while [ $i -lt 50 ]; do
	a=$($q www.example.test 2>&1) || true
	[ "$a" = 192.0.2.1 ] && break
	[ "$(docker inspect -f '{{.State.Running}}' "$OK")" = true ] || break
	sleep 0.2; i=$((i + 1))
done
t=$($q +tcp mail.example.test 2>&1) || true
if [ "$a" = 192.0.2.1 ] && [ "$t" = 192.0.2.25 ]; then
	ok "dig @127.0.0.1 -p $LISTEN: www.example.test A 192.0.2.1 (udp)," \
	    "mail.example.test A 192.0.2.25 (tcp), from the upstream's data"
else
	docker logs "$OK" >"$tmp/ok.log" 2>&1 || true
	show dotp "$tmp/ok.log"
	show unbound "$tmp/unbound.log"
	bad "dig via the container: udp '${a:-nothing}', tcp '${t:-nothing}'"
fi

# health: the image's HEALTHCHECK (/dotp healthcheck -> GET /ready)
health() { docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null; }
i=0 h=''
while [ $i -lt 30 ]; do
	h=$(health "$OK") || true
	[ "$h" = healthy ] && break
	sleep 1; i=$((i + 1))
done
if [ "$h" = healthy ]; then
	ok "health: healthy after ${i} s (image HEALTHCHECK, /dotp healthcheck)"
else
	docker inspect -f '{{json .State.Health}}' "$OK" 2>&1 | head -c 2000
	echo
	bad "health: '${h:-none}' after 30 s, not healthy"
fi

m=$(curl -sS --max-time 3 "http://127.0.0.1:$METRICS/metrics" 2>&1) || true
if printf '%s\n' "$m" | grep -q '^dotp_queries_total'; then
	ok "metrics on the image's DOTP_METRICS (:$METRICS):" \
	    "$(printf '%s\n' "$m" | grep '^dotp_queries_total' | head -n 1)"
else
	printf '%s\n' "$m" | sed 's/^/  metrics: /' | head -n 20
	bad "no dotp_queries_total from http://127.0.0.1:$METRICS/metrics"
fi

docker logs "$OK" >"$tmp/ok.log" 2>&1 || true
if grep -q 'msg="dotp listening"' "$tmp/ok.log"; then
	ok "docker logs: start line ($(grep -o 'msg="dotp listening" version=[^ ]*' \
	    "$tmp/ok.log" | head -n 1))"
else
	show dotp "$tmp/ok.log"
	bad "docker logs: no msg=\"dotp listening\" line"
fi
if grep -qi 'example\.test' "$tmp/ok.log"; then
	grep -i 'example\.test' "$tmp/ok.log" | sed 's/^/  dotp: /' | head -n 5
	bad "docker logs: lines about single queries (without --log-queries)"
else
	ok "docker logs: no per-query lines ($(wc -l <"$tmp/ok.log") lines in all)"
fi

# docker stop: SIGTERM, the drain (2 s by default), exit 0, exit lines
docker stop "$OK" >/dev/null 2>&1 || bad "docker stop $OK failed"
code=$(docker inspect -f '{{.State.ExitCode}}' "$OK" 2>&1) || true
docker logs "$OK" >"$tmp/ok.log" 2>&1 || true
if [ "$code" = 0 ]; then
	ok "docker stop: exit code 0"
else
	bad "docker stop: exit code '$code', not 0"
fi
if grep -q 'msg="signal, draining"' "$tmp/ok.log" &&
    grep -q 'msg="upstream summary"' "$tmp/ok.log" &&
    grep -q 'msg="dotp exiting"' "$tmp/ok.log"; then
	ok "docker logs after stop: drain, upstream summary and exit lines"
else
	show dotp "$tmp/ok.log"
	bad "docker logs after stop: no drain/exit lines"
fi

# --- a container whose upstream cannot be reached -----------------------
# shellcheck disable=SC2086 # $HEALTH is a word list
docker run -d --name "$BAD" --network host --read-only --cap-drop ALL \
    --user 65532 $HEALTH --health-retries 1 \
    -e DOTP_UPSTREAM=127.0.0.1:1#x -e "DOTP_METRICS=127.0.0.1:$BAD_METRICS" \
    "$IMAGE" -l "127.0.0.1:$BAD_LISTEN" >"$tmp/run.log" 2>&1 || {
	show run "$tmp/run.log"
	die "docker run (unreachable upstream) failed"
}
i=0 h='' r=''
while [ $i -lt 30 ]; do
	# a query makes dotp try the upstream and find it down
	r=$(dig @127.0.0.1 -p $BAD_LISTEN +time=1 +tries=1 www.example.test \
	    2>&1 | sed -n 's/.*status: \([A-Z]*\).*/\1/p') || true
	h=$(health "$BAD") || true
	[ "$h" = unhealthy ] && break
	sleep 1; i=$((i + 1))
done
if [ "$h" = unhealthy ]; then
	ok "unreachable upstream 127.0.0.1:1: answers ${r:-nothing}," \
	    "health unhealthy after ${i} s ($(docker inspect -f \
	    '{{with .State.Health}}{{range .Log}}{{.Output}}{{end}}{{end}}' \
	    "$BAD" 2>/dev/null | sed -n 's/.*msg="\(not ready: [^"]*\)".*/\1/p' |
	    tail -n 1))"
else
	docker logs "$BAD" 2>&1 | sed 's/^/  dotp: /' | tail -n 20
	docker inspect -f '{{json .State.Health}}' "$BAD" 2>&1 | head -c 2000
	echo
	bad "unreachable upstream: health '${h:-none}' after 30 s, not unhealthy"
fi

# --- cleanup is checked too ---------------------------------------------
docker rm -f "$OK" "$BAD" >/dev/null 2>&1 || bad "docker rm of the containers"
if docker rmi "$IMAGE" >/dev/null 2>&1; then built=; else bad "docker rmi $IMAGE"; fi
left=$(docker ps -aq; docker images -q)
[ -z "$left" ] || bad "containers or images left: $left"
stop_pid "$dpid" 150
dpid=''
ok "cleaned up: containers, image, dockerd stopped" \
    "($(( $(date +%s) - t0 )) s in all)"

[ $fails -eq 0 ] || { echo "docker: $fails check(s) failed"; exit 1; }
echo "docker: PASS"
