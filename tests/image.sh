#!/bin/sh
# image.sh - the FROM scratch container image (Dockerfile.scratch).
#
#   sh tests/image.sh build IMAGE   build it from ./dotp, print its size,
#                                   fail over 1,000,000 bytes
#   sh tests/image.sh test IMAGE    build, then run /dotp from the image's
#                                   root filesystem against a local DoT
#                                   unbound and resolve through it
#
# Uses buildah (vfs storage, chroot isolation: no daemon, works as root in
# CI and inside `unshare -n`); falls back to docker. The test needs root,
# unbound, openssl, dig, setsid, ss and pgrep, and only loopback networking.
# DOTP_IMAGE_BIN=PATH puts another binary in the image instead of ./dotp.
set -eu
cd "$(dirname "$0")/.."
# unbound lives in /usr/sbin, which a normal user's PATH lacks
PATH=$PATH:/usr/sbin:/sbin
export PATH

MAX=1000000
cmd=${1:-}
IMAGE=${2:-dotp:latest}
tmp=$(mktemp -d)
ctr='' pg='' ub=''

fail() { echo "image: FAIL: $*"; exit 1; }

cleanup() {
	# dotp runs as buildah-run -> chroot-runtime -> chroot-exec -> dotp,
	# all in the process group started by setsid: stop the whole group
	if [ -n "$pg" ]; then
		kill -TERM "-$pg" 2>/dev/null || true
		i=0
		while kill -0 "-$pg" 2>/dev/null && [ $i -lt 30 ]; do
			sleep 0.1; i=$((i + 1))
		done
		kill -KILL "-$pg" 2>/dev/null || true
	fi
	[ -z "$ub" ] || { kill "$ub" 2>/dev/null || true; wait "$ub" 2>/dev/null || true; }
	if [ -n "$ctr" ]; then
		if [ -n "${B:-}" ]; then $B rm "$ctr" >/dev/null 2>&1 || true
		else docker rm -f "$ctr" >/dev/null 2>&1 || true; fi
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

if command -v buildah >/dev/null 2>&1; then
	B="buildah --storage-driver vfs"
elif command -v docker >/dev/null 2>&1; then
	B=
else
	fail "neither buildah nor docker is installed"
fi

build() {
	ctx=. bin=${DOTP_IMAGE_BIN:-dotp}
	[ -x "$bin" ] || fail "$bin missing: run 'make dotp' first"
	if [ -n "${DOTP_IMAGE_BIN:-}" ]; then
		ctx=$tmp/ctx; mkdir "$ctx"; cp "$bin" "$ctx/dotp"
	fi
	# FROM scratch has no /lib/ld-musl-*.so.1: the binary must be static
	if command -v readelf >/dev/null 2>&1 &&
	    readelf -l "$bin" | grep -q 'program interpreter'; then
		fail "$bin is dynamically linked ($(readelf -l "$bin" |
		    sed -n 's/.*interpreter: \(.*\)]/\1/p')); it cannot run FROM scratch"
	fi
	if [ -n "$B" ]; then
		old=$($B images -q "$IMAGE" 2>/dev/null || true)
		$B bud -q -f "$PWD/Dockerfile.scratch" -t "$IMAGE" "$ctx" >/dev/null ||
		    fail "buildah bud failed"
		new=$($B images -q "$IMAGE")
		# drop the image this tag pointed to before (vfs keeps full copies)
		[ -z "$old" ] || [ "$old" = "$new" ] ||
		    $B rmi "$old" >/dev/null 2>&1 || true
		# uncompressed: config + layer tars, as listed in the manifest
		size=$($B inspect --type image --format '{{.Manifest}}' "$IMAGE" |
		    grep -o '"size":[0-9]*' | awk -F: '{s += $2} END {print s}')
		# compressed: manifest + config + gzip layers, as a registry holds it
		$B push -q "$IMAGE" "oci:$tmp/oci" >/dev/null 2>&1 &&
		    gz=$(cat "$tmp"/oci/blobs/sha256/* | wc -c) || gz=
	else
		docker build -q -f Dockerfile.scratch -t "$IMAGE" "$ctx" >/dev/null ||
		    fail "docker build failed"
		size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
		gz=$(docker save "$IMAGE" | gzip -c | wc -c)
	fi
	[ -n "$size" ] || fail "cannot read the size of $IMAGE"
	echo "image: $IMAGE: $size bytes uncompressed${gz:+, $gz bytes compressed}" \
	    "(binary $(wc -c <"$bin") bytes, limit $MAX)"
	[ "$size" -le $MAX ] || fail "image is $size bytes, over $MAX"
}

# Test PKI in $tmp: a CA and a server certificate for dot.test.
mkpki() (
	cd "$tmp" &&
	set -- -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes &&
	openssl req -x509 "$@" -keyout ca.key -out ca.pem -days 2 \
	    -subj /CN=dotp-image-test-ca \
	    -addext basicConstraints=critical,CA:TRUE \
	    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
	openssl req -new "$@" -keyout server.key -out server.csr \
	    -subj /CN=dot.test 2>/dev/null &&
	printf 'subjectAltName=DNS:dot.test\nextendedKeyUsage=serverAuth\n' >ext &&
	openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key \
	    -set_serial 2 -days 2 -extfile ext -out server.pem 2>/dev/null &&
	chmod 644 ca.pem   # read by dotp as uid 65532
)

run_test() {
	build
	for p in unbound openssl dig setsid ss pgrep; do
		command -v $p >/dev/null 2>&1 || fail "$p is not installed"
	done
	# two free loopback ports, starting from one derived from the PID
	port=$((20000 + $$ % 10000 * 2))
	while ss -Htuan | grep -Eq ":($port|$((port + 1)))[[:space:]]"; do
		port=$((port + 2))
	done
	up=$((port + 1))
	mkpki || fail "openssl could not make the test certificates"

	# upstream: unbound answering a static zone over DoT on 127.0.0.1:$up
	cat >"$tmp/unbound.conf" <<-EOF
	server:
	    interface: 127.0.0.1@$up
	    tls-port: $up
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
	remote-control:
	    control-enable: no
	EOF
	unbound -d -c "$tmp/unbound.conf" >"$tmp/unbound.log" 2>&1 &
	ub=$!

	if [ -n "$B" ]; then
		ctr=$($B from "$IMAGE")
		# chroot isolation: the image's rootfs, the caller's network
		# namespace (so loopback is shared), uid 65532 from the image
		run="$B run --isolation chroot -v $tmp/ca.pem:/ca.pem:ro $ctr --"
		v=$($run /dotp -V 2>&1) || true
		case $v in dotp\ *) ;; *) fail "/dotp -V in the image: $v" ;; esac
		# shellcheck disable=SC2086 # $run is a word list
		setsid $run /dotp -l "127.0.0.1:$port" \
		    -u "127.0.0.1:$up#dot.test" --ca-file /ca.pem \
		    >"$tmp/dotp.log" 2>&1 &
		pg=$!   # setsid made it a process group leader
	else
		v=$(docker run --rm "$IMAGE" -V 2>&1) || true
		case $v in dotp\ *) ;; *) fail "/dotp -V in the image: $v" ;; esac
		# --network host: only meaningful in the daemon's own namespace
		ctr=$(docker run -d --network host -v "$tmp/ca.pem:/ca.pem:ro" \
		    "$IMAGE" -l "127.0.0.1:$port" -u "127.0.0.1:$up#dot.test" \
		    --ca-file /ca.pem)
	fi

	# resolve through the image's dotp, over UDP and TCP (~5 s to start)
	q="dig @127.0.0.1 -p $port www.example.test +short +time=1 +tries=1"
	i=0 a='' t=''
	while [ $i -lt 25 ]; do
		a=$($q 2>&1) || true
		[ "$a" = 192.0.2.1 ] && break
		if [ -n "$pg" ] && ! kill -0 "$pg" 2>/dev/null; then break; fi
		sleep 0.2; i=$((i + 1))
	done
	[ "$a" != 192.0.2.1 ] || t=$($q +tcp 2>&1) || true
	if [ "$a" != 192.0.2.1 ] || [ "$t" != 192.0.2.1 ]; then
		[ -n "$B" ] || docker logs "$ctr" >"$tmp/dotp.log" 2>&1 || true
		sed 's/^/  dotp: /' "$tmp/dotp.log" 2>/dev/null || true
		sed 's/^/  unbound: /' "$tmp/unbound.log"
		fail "no 192.0.2.1 for www.example.test via 127.0.0.1:$port" \
		    "(udp: ${a:-nothing}; tcp: ${t:-not tried})"
	fi
	echo "image: /dotp from $IMAGE answered www.example.test A 192.0.2.1 (udp, tcp)"
	[ -n "$B" ] || return 0
	grep -q 'msg="dotp listening" version=' "$tmp/dotp.log" ||
	    fail "dotp did not log its start line"
	# SIGTERM to dotp itself: buildah run passes on its exit status, 0
	d=$(pgrep -g "$pg" -x dotp) || fail "no dotp process under buildah run"
	kill -TERM "$d"
	st=0; wait "$pg" || st=$?
	pg=''
	[ $st -eq 0 ] || fail "dotp exited with status $st on SIGTERM"
}

case $cmd in
build) build ;;
test) run_test; echo "image: PASS" ;;
*) echo "usage: $0 build|test [IMAGE]" >&2; exit 2 ;;
esac
