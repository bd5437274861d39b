#!/bin/sh
# fuzz.sh - the libFuzzer harnesses of tests/fuzz/ (one per fuzz_*.c).
#   sh tests/fuzz.sh build        clang + libFuzzer + ASan + UBSan into
#                                 build/fuzz/TARGET, and gcc standalone
#                                 replayers into build/fuzz/replay-TARGET
#   sh tests/fuzz.sh run SECONDS  fuzz each target SECONDS on a copy of its
#                                 seed corpus (build/fuzz/work/TARGET); one
#                                 summary line per target; fails on a crash
#   sh tests/fuzz.sh replay       the replayers over tests/fuzz/corpus (fast)
#   sh tests/fuzz.sh merge        minimise build/fuzz/work/* back into
#                                 tests/fuzz/corpus (new coverage only)
# Needs build/bearssl and build/ta.h (make dotp). CC/FUZZ_CC override gcc
# and clang, FUZZ_CORPUS the seed corpus directory.
set -eu
cd "$(dirname "$0")/.."

B=build/fuzz
CORPUS=${FUZZ_CORPUS:-tests/fuzz/corpus}
INC="-Ibuild/bearssl/inc -Ibuild"
LIB=build/bearssl/libbearssl.a
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -g -O1 -fno-omit-frame-pointer"
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

targets() {
	for f in tests/fuzz/fuzz_*.c; do
		basename "$f" .c
	done
}

build() {
	[ -f "$LIB" ] && [ -f build/ta.h ] || {
		echo "fuzz: build/bearssl or build/ta.h missing: run make dotp" >&2
		exit 1
	}
	mkdir -p "$B"
	for t in $(targets); do
		${FUZZ_CC:-clang} $SAN -fsanitize=fuzzer $INC \
		    -o "$B/$t" "tests/fuzz/$t.c" "$LIB"
		${CC:-gcc} $SAN -Wall -Wextra -Wno-unused-function \
		    -DDOTP_FUZZ_STANDALONE $INC \
		    -o "$B/replay-$t" "tests/fuzz/$t.c" "$LIB"
		echo "fuzz: built $B/$t $B/replay-$t"
	done
}

# The last number after "NAME: " in a libFuzzer log (cov, ft, corp, and
# the final stats' stat::number_of_executed_units).
field() {
	sed -n "s/^\(.*[ 	]\)\{0,1\}$1: *\([0-9][0-9]*\).*/\2/p" "$2" |
	    tail -n 1
}

run() {
	secs=$1
	fail=0
	for t in $(targets); do
		[ -x "$B/$t" ] || build
		work=$B/work/$t
		mkdir -p "$work" "$B/crash/$t"
		cp "$CORPUS/$t"/* "$work"/ 2>/dev/null || true
		log=$B/$t.log
		# Crash files go to build/fuzz/crash/TARGET/ (the path is in
		# the log's "Test unit written to" line).
		if "$B/$t" -max_total_time="$secs" -max_len=4096 -timeout=5 \
		    -print_final_stats=1 -artifact_prefix="$B/crash/$t/" \
		    "$work" >"$log" 2>&1; then
			st=ok
		else
			st=CRASH
			fail=1
		fi
		echo "fuzz: $t execs=$(field stat::number_of_executed_units "$log")" \
		    "cov=$(field cov "$log") ft=$(field ft "$log")" \
		    "corpus=$(field corp "$log") $st"
		if [ "$st" = CRASH ]; then
			# The report: sanitizer or CHECK line, stack, file.
			grep -E '^(==[0-9]+==|SUMMARY|.*CHECK failed|.*runtime error|    #[0-9]|artifact_prefix|Test unit written)' \
			    "$log" | sed 's/ (BuildId: [0-9a-f]*)//' | head -n 40
			echo "fuzz: $t: full log in $log"
		fi
	done
	return $fail
}

replay() {
	fail=0
	for t in $(targets); do
		[ -x "$B/replay-$t" ] || build
		if out=$("$B/replay-$t" "$CORPUS/$t" 2>&1); then
			echo "fuzz: replay $t: $out"
		else
			# The report names the input (CHECK line or "input:").
			echo "fuzz: replay $t: FAIL"
			printf '%s\n' "$out"
			fail=1
		fi
	done
	return $fail
}

# Adds to the repository corpus only the inputs that bring new coverage
# (libFuzzer -merge=1 keeps the existing seeds and picks among the new).
merge() {
	for t in $(targets); do
		[ -d "$B/work/$t" ] || continue
		[ -x "$B/$t" ] || build
		before=$(ls "$CORPUS/$t" | wc -l)
		"$B/$t" -merge=1 -max_len=4096 "$CORPUS/$t" "$B/work/$t" \
		    >"$B/$t.merge.log" 2>&1
		echo "fuzz: merge $t: $before -> $(ls "$CORPUS/$t" | wc -l) seeds"
	done
}

case "${1:-}" in
build)	build ;;
run)	[ $# -eq 2 ] || { echo "usage: $0 run SECONDS" >&2; exit 2; }
	run "$2" ;;
replay)	replay ;;
merge)	merge ;;
*)	echo "usage: $0 build | run SECONDS | replay | merge" >&2
	exit 2 ;;
esac
