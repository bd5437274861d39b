/*
 * Shared by the fuzz harnesses (tests/fuzz/fuzz_*.c), included after
 * dotp.c: the CHECK() macro and, under DOTP_FUZZ_STANDALONE, a main()
 * that replays files (or every file in a directory) through
 * LLVMFuzzerTestOneInput, each copied into an exact-size malloc so that
 * a read past the end is caught by ASan without libFuzzer.
 */
#ifndef DOTP_FUZZ_H
#define DOTP_FUZZ_H

#include <dirent.h>

/* The file being replayed (standalone builds), named when it fails. */
static const char *fz_current;

/* A property the harness checks: abort (a crash for libFuzzer), never
 * assert() (NDEBUG would drop it). */
#define CHECK(cond) do {						\
	if (!(cond)) {							\
		fprintf(stderr, "%s:%d: CHECK failed: %s%s%s\n",	\
		    __FILE__, __LINE__, #cond,				\
		    fz_current ? " input: " : "",			\
		    fz_current ? fz_current : "");			\
		abort();						\
	}								\
} while (0)

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

/* A valid query for harnesses that need one when the input's is not:
 * example.com A IN, RD, with an OPT (payload 1232). */
static const unsigned char fixed_query[] = {
	0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1,
	7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o', 'm', 0, 0, 1, 0, 1,
	0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0
};

/* An exact-size buffer of n bytes (never NULL, even for n == 0), so
 * that ASan catches the first byte past it. */
static unsigned char *
fz_alloc(size_t n)
{
	unsigned char *c = malloc(n ? n : 1);

	if (c == NULL)
		abort();
	return c;
}

/* An exact-size copy of n bytes. */
static unsigned char *
fz_dup(const void *p, size_t n)
{
	unsigned char *c = fz_alloc(n);

	if (n)
		memcpy(c, p, n);
	return c;
}

/*
 * Walks a whole message: QDCOUNT questions (names may be compressed),
 * then every counted record. Returns the offset just past the last, or 0
 * if it does not parse. *nopt counts the OPT records, *opt is the offset
 * of the last one (0: none).
 */
static size_t
fz_walk(const unsigned char *m, size_t len, unsigned *nopt, size_t *opt)
{
	size_t	 pos = DNS_HEADER_LEN, o;
	unsigned n, type;

	*nopt = 0;
	*opt = 0;
	if ((pos = dns_skip_questions(m, len)) == 0)
		return 0;
	n = (unsigned)rd16(m + DNS_OFF_ANCOUNT) + rd16(m + DNS_OFF_NSCOUNT) +
	    rd16(m + DNS_OFF_ARCOUNT);
	while (n-- > 0) {
		o = pos;
		pos = dns_skip_rr(m, len, pos, &type, NULL);
		if (pos == 0)
			return 0;
		if (type == DNS_TYPE_OPT) {
			(*nopt)++;
			*opt = o;
		}
	}
	return pos;
}

/* Does the name at pos (one that dns_skip_name() accepts), once it has
 * followed a compression pointer, read a byte in [from, to)? */
static int
fz_name_reads(const unsigned char *m, size_t pos, size_t from, size_t to)
{
	size_t	 p = pos, n;
	int	 jumped = 0, ptr;

	for (;;) {
		ptr = (m[p] & 0xc0) == 0xc0;
		n = ptr ? 2 : m[p] + 1u;
		if (jumped && p < to && p + n > from)
			return 1;
		if (m[p] == 0)
			return 0;
		if (ptr) {
			p = (size_t)(m[p] & 0x3f) << 8 | m[p + 1];
			jumped = 1;
		} else {
			p += n;
		}
	}
}

/*
 * Does an owner name of message m (one that fz_walk() parses) read a
 * byte in [from, to) through a compression pointer? The rewrites of
 * dotp (padding, strip) change or move bytes without fixing pointers,
 * which is right for real messages (pointers go back to earlier names)
 * but changes what such a name says: checks on the result skip those.
 */
static int
fz_reads(const unsigned char *m, size_t len, size_t from, size_t to)
{
	size_t	 pos = DNS_HEADER_LEN;
	unsigned n;

	for (n = rd16(m + DNS_OFF_QDCOUNT); n > 0; n--) {
		if (fz_name_reads(m, pos, from, to))
			return 1;
		pos = dns_skip_name(m, len, pos) + 4;
	}
	n = (unsigned)rd16(m + DNS_OFF_ANCOUNT) + rd16(m + DNS_OFF_NSCOUNT) +
	    rd16(m + DNS_OFF_ARCOUNT);
	while (n-- > 0) {
		if (fz_name_reads(m, pos, from, to))
			return 1;
		pos = dns_skip_rr(m, len, pos, NULL, NULL);
	}
	return 0;
}

#ifdef DOTP_FUZZ_STANDALONE
/* Replays one file. Returns 1 if it was replayed, 0 if skipped. */
static int
fz_replay_file(const char *path)
{
	FILE	*f = fopen(path, "rb");
	unsigned char *buf = NULL, *in;
	size_t	 len = 0, cap = 0, r;

	if (f == NULL) {
		perror(path);
		exit(1);
	}
	do {
		if (cap - len < 4096) {
			cap = cap ? 2 * cap : 65536;
			if ((buf = realloc(buf, cap)) == NULL)
				abort();
		}
		r = fread(buf + len, 1, cap - len, f);
		len += r;
	} while (r > 0);
	fclose(f);
	in = fz_dup(buf, len);
	free(buf);
	fz_current = path;
	LLVMFuzzerTestOneInput(in, len);
	fz_current = NULL;
	free(in);
	return 1;
}

/* Replays a file, or the files in a directory (not recursively). */
static int
fz_replay(const char *path)
{
	DIR	*d = opendir(path);
	struct dirent *e;
	char	 sub[4096];
	int	 n = 0;

	if (d == NULL)
		return fz_replay_file(path);
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
		n += fz_replay_file(sub);
	}
	closedir(d);
	return n;
}

/* In the sanitizer runtimes; weak, so a build without them links. */
void __sanitizer_set_death_callback(void (*)(void)) __attribute__((weak));

/* After a sanitizer report: which input it was. */
static void
fz_death(void)
{
	if (fz_current != NULL)
		fprintf(stderr, "input: %s\n", fz_current);
}

int
main(int argc, char *argv[])
{
	int	 i, n = 0;

	if (__sanitizer_set_death_callback != NULL)
		__sanitizer_set_death_callback(fz_death);
	for (i = 1; i < argc; i++)
		n += fz_replay(argv[i]);
	printf("%d inputs replayed\n", n);
	return 0;
}
#endif /* DOTP_FUZZ_STANDALONE */
#endif /* DOTP_FUZZ_H */
