/*
 * What the C tests (tests/unit.c, tests/engine.c) share, included after
 * dotp.c: ok(cond, fmt, ...) counts a pass, or prints FAIL with the
 * place and the message and counts a failure (the test's main reports
 * t_pass and t_fail and exits non-zero on any failure); mkquery() builds
 * a query.
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


/* Builds a query for name (dotted, "" for the root) into buf: RD, one
 * question of type type, class IN; with edns, an OPT offering udp. */
static size_t
mkquery(unsigned char *buf, uint16_t id, const char *name, uint16_t type,
    int edns, uint16_t udp)
{
	size_t	 n = DNS_HEADER_LEN;
	const char *p = name;

	memset(buf, 0, DNS_HEADER_LEN);
	wr16(buf, id);
	wr16(buf + DNS_OFF_FLAGS, DNS_FLAG_RD);
	wr16(buf + DNS_OFF_QDCOUNT, 1);
	while (*p) {
		size_t l = strcspn(p, ".");
		buf[n++] = (unsigned char)l;
		memcpy(buf + n, p, l);
		n += l;
		p += l;
		if (*p == '.')
			p++;
	}
	buf[n++] = 0;
	wr16(buf + n, type);
	wr16(buf + n + 2, 1);
	n += 4;
	if (edns) {
		static const unsigned char opt[11] = { 0, 0, 41 };
		memcpy(buf + n, opt, sizeof opt);
		wr16(buf + n + 3, udp);
		wr16(buf + DNS_OFF_ARCOUNT, 1);
		n += sizeof opt;
	}
	return n;
}

#endif
