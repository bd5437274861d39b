# dotp - DNS to DNS-over-TLS proxy.
#
#   make            ./dotp: static, stripped, musl + BearSSL, Mozilla roots
#   make run        run it on 127.0.0.1:5353 and [::1]:5353 (no root needed)
#   make check      unit and engine tests: seconds, no root, no network
#   make test       everything: check, integration (also under ASan), fuzz,
#                   image, newcomer (installs what it needs with apt-get)
#   make image      the FROM scratch container image (buildah or docker)
#   make fuzz       libFuzzer harnesses, FUZZ_TIME seconds each
#   make bench      dotp against stubby, unbound, kresd and dnsdist (about 12 min;
#                   BENCH_TIME=MINUTES BENCH_ROUNDS=N), build/bench/results.md
#   make bench-publish  copy the latest bench results to bench/ (to commit)
#   make clean
#
# BEARSSL_SRC=DIR builds BearSSL from an unpacked source tree instead of
# Debian's source package. Local overrides go in config.mak.

.POSIX:
.SUFFIXES:

# gcc with musl's specs, rewritten for a static PIE (see below).
CC	= gcc -specs $(SPECS)
HOSTCC	= cc
CFLAGS	= -Os
LDFLAGS	=
BUILD	= build
BEARSSL_SRC =
IMAGE	= dotp:latest
VERSION	= 0.1.0
FUZZ_TIME = 60

-include config.mak

BR	= $(BUILD)/bearssl
# What building needs besides make: musl-gcc drives gcc (musl-tools does
# not pull it in), binutils for readelf, xz for the BearSSL tarball.
BUILD_PKGS = gcc musl-tools binutils xz-utils
SPECS	= $(BUILD)/musl-static-pie.specs
WARN	= -std=c11 -Wall -Wextra -Wshadow -Wmissing-prototypes -Wpedantic \
	  -Wwrite-strings -Wimplicit-fallthrough -Wcast-qual -Wformat=2
# Size: sections collected, no unwind tables. Safety: stack protector,
# RELRO, static PIE (ASLR). musl has no _FORTIFY_SOURCE.
HARDEN	= -fstack-protector-strong -fPIE
SIZE	= -ffunction-sections -fdata-sections -fno-asynchronous-unwind-tables \
	  -fno-unwind-tables
ALL_CFLAGS  = $(WARN) $(HARDEN) $(SIZE) -I$(BR)/inc -I$(BUILD) \
	  -DDOTP_VERSION='"$(VERSION)"' $(CFLAGS)
ALL_LDFLAGS = -static-pie -Wl,--gc-sections -Wl,-z,relro,-z,now \
	  -Wl,-z,noseparate-code -s $(LDFLAGS)
# Sanitizer builds (host compiler, glibc) link the same libbearssl.a:
# BearSSL calls almost nothing from libc.
SAN	= -fsanitize=address,undefined -fno-sanitize-recover=all -g -O1 \
	  -fno-omit-frame-pointer

all: dotp

$(BR)/libbearssl.a: bearssl/build.sh bearssl/deps.sh
	sh bearssl/build.sh $(BR) $(BEARSSL_SRC)

# The roots as brssl ta writes them (a table of pointers), then packed
# into a blob and an index without pointers (ca-bundle/tapack.c): in a
# static PIE every pointer costs a relocation, 10 KB of the binary.
$(BUILD)/ta-raw.h: ca-bundle/mozilla-roots.pem ca-bundle/mkta.sh $(BR)/libbearssl.a
	sh ca-bundle/mkta.sh $(BR)/brssl ca-bundle/mozilla-roots.pem $@

# tapack is built like dotp (musl, static): a bare machine has no glibc
# headers for the host compiler (tests/newcomer.sh).
$(BUILD)/ta.h: $(BUILD)/ta-raw.h ca-bundle/tapack.c $(SPECS)
	$(CC) -I$(BR)/inc -include $(BUILD)/ta-raw.h -o $(BUILD)/tapack \
	  ca-bundle/tapack.c -static-pie
	./$(BUILD)/tapack > $@.tmp && mv $@.tmp $@

# Debian's musl-gcc links dynamically even when asked for -static-pie
# (its specs always name a dynamic linker), and such a binary cannot run
# FROM scratch. Its specs are rewritten for a static PIE: rcrt1.o, no
# dynamic linker. The result is checked: no PT_INTERP, no NEEDED.
$(SPECS): bearssl/deps.sh
	sh bearssl/deps.sh $(BUILD_PKGS)
	mkdir -p $(BUILD)
	spec=$$(sed -n 's/.*-specs "\(.*\)".*/\1/p' "$$(command -v musl-gcc)") && \
	sed -e 's/Scrt1\.o/rcrt1.o/' \
	    -e 's/^-dynamic-linker [^ ]* /-static -pie --no-dynamic-linker -z text /' \
	    "$$spec" > $@.tmp && grep -q rcrt1.o $@.tmp && \
	grep -q -- '--no-dynamic-linker' $@.tmp && mv $@.tmp $@

dotp: dotp.c $(BR)/libbearssl.a $(BUILD)/ta.h $(SPECS)
	$(CC) $(ALL_CFLAGS) -o $@ dotp.c $(BR)/libbearssl.a $(ALL_LDFLAGS)
	@if readelf -ld $@ | grep -q -e INTERP -e NEEDED; then \
	  echo "dotp: not a static binary" >&2; rm -f $@; exit 1; fi
	@echo "dotp: $$(stat -c %s $@) bytes, static-pie, stripped"

# Unprivileged run with the defaults otherwise (Cloudflare upstreams).
run: dotp
	./dotp -l 127.0.0.1:5353 -l '[::1]:5353'

# --- tests ------------------------------------------------------------------

# libc6-dev: the unit and sanitizer builds use the host compiler and glibc;
# debootstrap and apt-utils: the newcomer test's fresh Debian root; nodejs:
# tests/deploy.sh (which installs npm when node came without it).
TEST_PKGS = unbound bind9-dnsutils knot-dnsutils python3 python3-dnspython python3-yaml prometheus \
	  python3-pytest openssl iproute2 util-linux buildah clang \
	  libclang-rt-14-dev procps bind9 bind9-utils dnsdist libc6-dev \
	  debootstrap apt-utils git docker.io curl nodejs

$(BUILD)/unit: tests/unit.c tests/check.h dotp.c $(BR)/libbearssl.a $(BUILD)/ta.h
	$(HOSTCC) $(WARN) -Wno-cast-qual -Wno-unused-function $(SAN) -I$(BR)/inc -I$(BUILD) \
	  -o $@ tests/unit.c $(BR)/libbearssl.a

# The upstream engine's state machine against an in-process BearSSL
# server over unix sockets (tests/engine.c, certificates in tests/engine).
$(BUILD)/engine: tests/engine.c tests/check.h dotp.c $(BR)/libbearssl.a $(BUILD)/ta.h
	$(HOSTCC) $(WARN) -Wno-cast-qual -Wno-unused-function $(SAN) -I$(BR)/inc -I$(BUILD) \
	  -o $@ tests/engine.c $(BR)/libbearssl.a

# Seconds, no root, no network, no apt: the unit tests and the engine
# test. The unit tests keep what they set up reachable from G, so leaks
# are reported as in make test; the engine's forked cases exit without
# freeing theirs.
check: dotp $(BUILD)/unit $(BUILD)/engine
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ASAN_OPTIONS=detect_leaks=1 ./$(BUILD)/unit
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ASAN_OPTIONS=detect_leaks=0 ./$(BUILD)/engine

# dotp built with ASan + UBSan, for the integration suite.
$(BUILD)/dotp-san: dotp.c $(BR)/libbearssl.a $(BUILD)/ta.h
	$(HOSTCC) $(WARN) $(SAN) -I$(BR)/inc -I$(BUILD) -o $@ dotp.c \
	  $(BR)/libbearssl.a

# Build and test packages together: without root, one command lists them all.
test-deps:
	sh bearssl/deps.sh $(BUILD_PKGS) $(TEST_PKGS)

test: test-deps dotp $(BUILD)/unit $(BUILD)/engine $(BUILD)/dotp-san
	sh tests/run-all.sh

image: dotp
	sh tests/image.sh build $(IMAGE)

fuzz: test-deps dotp
	sh tests/fuzz.sh build
	sh tests/fuzz.sh run $(FUZZ_TIME)

# --- benchmark --------------------------------------------------------------

# Everything in a private network namespace on loopback: see bench/run.sh.
BENCH_PKGS = unbound stubby dnsdist knot-resolver dnsperf valgrind openssl \
	  iproute2 util-linux procps python3 binutils gcc libc6-dev

bench-deps:
	sh bearssl/deps.sh $(BUILD_PKGS) $(BENCH_PKGS)

# Results go to build/bench/; bench-publish copies the latest run to bench/
# (the figures the README quotes): committing them is a deliberate step.
bench: bench-deps dotp
	BENCH_TIME='$(BENCH_TIME)' BENCH_ROUNDS='$(BENCH_ROUNDS)' \
	BENCH_CMD='make bench' sh bench/run.sh

bench-publish:
	@test -f $(BUILD)/bench/results.json || \
	  { echo "bench-publish: no $(BUILD)/bench/results.json: run make bench" >&2; exit 1; }
	cp $(BUILD)/bench/results.json $(BUILD)/bench/results.md bench/

clean:
	rm -f dotp
	rm -rf $(BUILD)/unit $(BUILD)/engine $(BUILD)/dotp-san $(BUILD)/ta.h \
	  $(BUILD)/ta-raw.h $(BUILD)/tapack \
	  $(BUILD)/fuzz

distclean:
	rm -rf dotp $(BUILD)

.PHONY: all run test test-deps check image fuzz bench bench-deps \
	bench-publish clean distclean
