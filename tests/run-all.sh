#!/bin/sh
# run-all.sh - the whole test suite, as `make test` runs it (after the
# Makefile has built ./dotp, build/unit and build/dotp-san).
#   unit               C unit tests attached to dotp.c (ASan + UBSan)
#   engine             dotp's upstream engine against an in-process BearSSL
#                      server over unix sockets (ASan + UBSan)
#   integration        pytest against real unbound over TLS, release binary
#   integration-asan   the same suite with dotp built with ASan + UBSan,
#                      sandboxed (no leak check: see below)
#   leaks-asan         the files that allocate at run time, ASan + LSan,
#                      without the sandbox
#   fuzz               libFuzzer harnesses: corpus replayed, then 6 s each
#   image              the FROM scratch image: built, size, run from its root
#   deploy             deploy/ offline: manifests against the Kubernetes API
#                      schemas (tests/deploy.sh), compose, Grafana dashboard
#   newcomer           the README's first command on a fresh minimal Debian
#                      root, as root and as a user, no network (root only)
#   docker             the image under a private dockerd in a network
#                      namespace, run as the README says (root only)
# Ends with one summary line; exits non-zero if any suite failed.
set -u
cd "$(dirname "$0")/.." || exit 1

pass=0
fail=0
failed=
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0

suite() {
	name=$1
	shift
	echo "=== $name"
	if "$@"; then
		pass=$((pass + 1))
		echo "=== $name: PASS"
	else
		fail=$((fail + 1))
		failed="$failed $name"
		echo "=== $name: FAIL"
	fi
}

suite unit ./build/unit
# The engine test's children exit without freeing what they set up.
suite engine env ASAN_OPTIONS=detect_leaks=0 ./build/engine
suite integration sh tests/run-integration.sh
# Under ASan the sandbox stays on (the sanitizer's runtime needs one more
# call, sigaltstack, allowed in that build only), but LeakSanitizer cannot
# run inside it: at exit it needs ptrace, clone and /proc/self/maps. So the
# whole suite runs sandboxed without the leak check, and the files that
# allocate at run time (TCP clients' output, HTTP responses) run again
# unsandboxed with it.
suite integration-asan env DOTP_BIN="$PWD/build/dotp-san" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 sh tests/run-integration.sh
suite leaks-asan env DOTP_BIN="$PWD/build/dotp-san" DOTP_TEST_NO_SANDBOX=1 \
	sh tests/run-integration.sh tests/integration/test_metrics.py \
	tests/integration/test_limits.py tests/integration/test_edges.py
suite fuzz sh -c 'sh tests/fuzz.sh build && sh tests/fuzz.sh replay &&
	sh tests/fuzz.sh run 6'
suite image sh tests/image.sh test dotp-test:latest
suite deploy sh tests/deploy.sh
suite newcomer sh tests/newcomer.sh
suite docker sh tests/docker.sh

[ -z "$failed" ] || echo "failed suites:$failed"
echo "suites: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
