/*
 * The check macro of the C tests (tests/unit.c, tests/engine.c), after
 * dotp.c is included: ok(cond, fmt, ...) counts a pass, or prints FAIL
 * with the place and the message and counts a failure. The test's main
 * reports t_pass and t_fail and exits non-zero on any failure.
 */
#ifndef DOTP_CHECK_H
#define DOTP_CHECK_H

static int t_pass, t_fail;

#define ok(cond, ...) do {						\
	if (cond) {							\
		t_pass++;						\
	} else {							\
		t_fail++;						\
		printf("FAIL %s:%d: ", __FILE__, __LINE__);		\
		printf(__VA_ARGS__);					\
		printf("\n");						\
	}								\
} while (0)

#endif
