/*
 * Unit tests for the pure parts of dotp.c: DNS wire helpers, frame
 * reassembly, the query ID table and the config parsers.
 * The whole of dotp.c is included with main() compiled out, so every
 * static function is reachable. Inputs are copied to the end of a page
 * followed by an unmapped guard page: a read one byte past the input
 * faults even without ASan.
 */
#define DOTP_NO_MAIN
#include "../dotp.c"
/* brssl ta's own table, to check the packed one against it. */
#include "ta-raw.h"

#include <sys/mman.h>
#include <sys/wait.h>

#include "check.h"

/* Copies len bytes so that they end exactly at a guard page. */
static unsigned char *
guard(const void *data, size_t len)
{
	static unsigned char *base;
	static size_t pg;

	if (base == NULL) {
		pg = (size_t)sysconf(_SC_PAGESIZE);
		base = mmap(NULL, 18 * pg, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (base == MAP_FAILED)
			abort();
		mprotect(base + 17 * pg, pg, PROT_NONE);
	}
	if (len > 17 * pg)
		abort();
	memcpy(base + 17 * pg - len, data, len);
	return base + 17 * pg - len;
}

static void
test_skip_name(void)
{
	/* www.example.test at 12, then a pointer to it at 30. */
	unsigned char m[64] = { 0 };
	size_t	 n = 12;

	memcpy(m + n, "\3www\7example\4test\0", 18);
	n += 18;
	m[n++] = 0xc0; m[n++] = 12;
	ok(dns_skip_name(guard(m, n), n, 12) == 30, "plain name");
	ok(dns_skip_name(guard(m, n), n, 30) == 32, "pointer back");
	/* Pointer to itself and forward pointers loop or escape: refused. */
	m[30] = 0xc0; m[31] = 30;
	ok(dns_skip_name(guard(m, 32), 32, 30) == 0, "self pointer");
	m[31] = 31;
	ok(dns_skip_name(guard(m, 32), 32, 30) == 0, "forward pointer");
	/* Truncated: every prefix of a valid name is bad. */
	for (size_t cut = 12; cut < 30; cut++)
		ok(dns_skip_name(guard(m, cut), cut, 12) == 0,
		    "truncated at %zu", cut);
	/* Label types 0x40 and 0x80 are refused. */
	m[12] = 0x41;
	ok(dns_skip_name(guard(m, 30), 30, 12) == 0, "label 0x40");
	m[12] = 0x81;
	ok(dns_skip_name(guard(m, 30), 30, 12) == 0, "label 0x80");
	/* A 256-byte name (4 x 63 + ...) is refused, 255 accepted. */
	{
		unsigned char big[400];
		size_t	 k, p = 0;

		for (k = 0; k < 4; k++) {
			big[p++] = 62;
			memset(big + p, 'a', 62);
			p += 62;
		}
		big[p++] = 0;	/* 4 * 63 + 1 = 253 */
		ok(dns_skip_name(guard(big, p), p, 0) == p, "253-byte name");
		ok(dns_check_qname(guard(big, p), p, 0) == p, "253 qname");
		big[p - 1] = 1; big[p] = 'b'; big[p + 1] = 0;
		ok(dns_skip_name(guard(big, p + 2), p + 2, 0) == p + 2,
		    "255-byte name");
		big[p + 1] = 1; big[p + 2] = 'c'; big[p + 3] = 0;
		ok(dns_skip_name(guard(big, p + 4), p + 4, 0) == 0,
		    "257-byte name refused");
		ok(dns_check_qname(guard(big, p + 4), p + 4, 0) == 0,
		    "257-byte qname refused");
	}
	/* Chains of backward pointers stay bounded by the name length. */
	{
		unsigned char c[212] = { 0 };
		size_t	 k;

		/* "a" at 12, then pointers each to the one before. */
		c[12] = 1; c[13] = 'a'; c[14] = 0;
		for (k = 15; k + 1 < sizeof c; k += 2) {
			c[k] = 0xc0;
			c[k + 1] = (unsigned char)(k - 2 > 14 ? k - 2 : 12);
		}
		ok(dns_skip_name(guard(c, 211), 211, 209) == 211,
		    "pointer chain");
		/* A pointer into the header is refused. */
		c[16] = 4;
		ok(dns_skip_name(guard(c, 17), 17, 15) == 0,
		    "pointer into the header");
	}
}

static void
test_check_query(void)
{
	unsigned char q[DOTP_QUERY_MAX + 8], *g;
	struct qinfo qi;
	size_t	 n;

	n = mkquery(q, 0x1234, "www.example.test", 1, 0, 0);
	ok(dns_check_query(guard(q, n), n, &qi) == QC_OK, "plain query");
	ok(qi.qend == n && !qi.has_opt, "qend %zu", qi.qend);
	ok(dns_udp_limit(&qi, 1232) == 512, "no EDNS: 512");
	n = mkquery(q, 1, "www.example.test", 1, 1, 4096);
	ok(dns_check_query(guard(q, n), n, &qi) == QC_OK, "EDNS query");
	ok(qi.has_opt && qi.udp_size == 4096, "udp size %u", qi.udp_size);
	ok(dns_udp_limit(&qi, 1232) == 1232, "capped to 1232");
	qi.udp_size = 100;
	ok(dns_udp_limit(&qi, 1232) == 512, "raised to 512");
	/* Every truncation of a valid query is refused or dropped. */
	for (size_t cut = 0; cut < n; cut++) {
		int r = dns_check_query(guard(q, cut), cut, &qi);
		ok(r == (cut < 12 ? QC_DROP : DNS_RCODE_FORMERR),
		    "cut %zu -> %d", cut, r);
	}
	/* Responses are dropped. */
	n = mkquery(q, 1, "a.test", 1, 0, 0);
	q[2] |= 0x80;
	ok(dns_check_query(guard(q, n), n, &qi) == QC_DROP, "QR dropped");
	/* Other opcodes: NOTIMP. */
	n = mkquery(q, 1, "a.test", 1, 0, 0);
	q[2] |= 2 << 3;	/* opcode 2 (STATUS) */
	ok(dns_check_query(guard(q, n), n, &qi) == DNS_RCODE_NOTIMP,
	    "STATUS -> NOTIMP");
	/* QDCOUNT 0 and 2: FORMERR. */
	n = mkquery(q, 1, "a.test", 1, 0, 0);
	wr16(q + 4, 0);
	ok(dns_check_query(guard(q, n), n, &qi) == DNS_RCODE_FORMERR, "qd 0");
	wr16(q + 4, 2);
	ok(dns_check_query(guard(q, n), n, &qi) == DNS_RCODE_FORMERR, "qd 2");
	/* Compression in the question: FORMERR. */
	n = mkquery(q, 1, "a.test", 1, 0, 0);
	q[12] = 0xc0; q[13] = 12;
	ok(dns_check_query(guard(q, n), n, &qi) == DNS_RCODE_FORMERR,
	    "compressed qname");
	/* Trailing garbage beyond the counted records is tolerated; a
	 * counted record that runs past the end is not. */
	n = mkquery(q, 1, "a.test", 1, 1, 1232);
	wr16(q + 10, 2);
	ok(dns_check_query(guard(q, n), n, &qi) == DNS_RCODE_FORMERR,
	    "ARCOUNT past end");
	/* Oversized query. */
	memset(q, 0, sizeof q);
	n = mkquery(q, 1, "a.test", 1, 0, 0);
	g = guard(q, DOTP_QUERY_MAX + 1);
	ok(dns_check_query(g, DOTP_QUERY_MAX + 1, &qi) == DNS_RCODE_FORMERR,
	    "oversized");
}

static void
test_answer_and_errors(void)
{
	unsigned char q[300], a[300], out[600];
	struct qinfo qi;
	size_t	 n, m;

	n = mkquery(q, 7, "Www.Example.TEST", 28, 1, 1232);
	dns_check_query(q, n, &qi);
	memcpy(a, q, n);
	wr16(a + 2, 0x8180);
	for (size_t i = 12; i < qi.qend; i++)
		if (a[i] >= 'A' && a[i] <= 'Z')
			a[i] = (unsigned char)(a[i] + 32);
	ok(dns_check_answer(guard(a, n), n, q, qi.qend), "case-insensitive");
	a[qi.qend - 3] = 1;	/* QTYPE A instead of AAAA */
	ok(!dns_check_answer(guard(a, n), n, q, qi.qend), "type differs");
	a[qi.qend - 3] = 28;
	n = mkquery(q, 7, "www.example.test", 65, 1, 1232);	/* HTTPS */
	dns_check_query(q, n, &qi);
	memcpy(a, q, n);
	wr16(a + 2, 0x8180);
	ok(dns_check_answer(guard(a, n), n, q, qi.qend), "type 65");
	a[qi.qend - 3] = 97;	/* 'a': case folds only in the name */
	ok(!dns_check_answer(guard(a, n), n, q, qi.qend), "type 97 != 65");
	a[qi.qend - 3] = 65;
	a[qi.qend - 1] = 3;	/* class CH */
	ok(!dns_check_answer(guard(a, n), n, q, qi.qend), "class differs");
	a[qi.qend - 1] = 1;
	wr16(a + 4, 2);
	ok(!dns_check_answer(guard(a, n), n, q, qi.qend), "two questions");
	wr16(a + 4, 1);
	a[13] = 'x';	/* another name */
	ok(!dns_check_answer(guard(a, n), n, q, qi.qend), "name differs");
	a[13] = q[13];
	wr16(a + 2, 0x0180);
	ok(!dns_check_answer(guard(a, n), n, q, qi.qend), "QR clear");
	wr16(a + 2, 0x8181);
	wr16(a + 4, 0);
	ok(dns_check_answer(guard(a, 12), 12, q, qi.qend),
	    "no question with FORMERR");
	wr16(a + 2, 0x8180);
	ok(!dns_check_answer(guard(a, 12), 12, q, qi.qend),
	    "no question with NOERROR");
	ok(!dns_check_answer(guard(a, 11), 11, q, qi.qend), "short");

	m = dns_make_error(q, n, qi.qend, 1, DNS_RCODE_SERVFAIL, out,
	    sizeof out);
	ok(m == qi.qend + 11, "servfail length %zu", m);
	ok(rd16(out) == 7 && (rd16(out + 2) & 0xf) == 2, "servfail rcode");
	ok(rd16(out + 2) & DNS_FLAG_QR && rd16(out + 2) & DNS_FLAG_RD,
	    "QR and RD");
	ok(rd16(out + 4) == 1 && rd16(out + 10) == 1, "counts");
	ok(memcmp(out + 12, q + 12, qi.qend - 12) == 0, "question echoed");
	m = dns_make_error(q, 12, 0, 0, DNS_RCODE_FORMERR, out, sizeof out);
	ok(m == 12 && rd16(out + 4) == 0, "header-only formerr");
	ok(dns_make_error(q, 11, 0, 0, 1, out, sizeof out) == 0, "no header");
}

/* An answer with many A records, and an OPT at the end. */
static size_t
mkbig(unsigned char *a, int nrr, int opt, const unsigned char *q,
    size_t qend)
{
	size_t	 n = qend;
	int	 k;

	memcpy(a, q, qend);
	wr16(a + 2, 0x8180);
	wr16(a + 6, (uint16_t)nrr);
	wr16(a + 10, opt ? 1 : 0);
	for (k = 0; k < nrr; k++) {
		static const unsigned char rr[16] = {
			0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 192, 0, 2, 0
		};
		memcpy(a + n, rr, sizeof rr);
		a[n + 15] = (unsigned char)k;
		n += sizeof rr;
	}
	if (opt) {
		static const unsigned char o[19] = {
			0, 0, 41, 4, 0xd0, 0, 0, 0x80, 0, 0, 8,
			0, 12, 0, 4, 0, 0, 0, 0		/* padding option */
		};
		memcpy(a + n, o, sizeof o);
		n += sizeof o;
	}
	return n;
}

static void
test_truncate(void)
{
	unsigned char q[300], a[4000], out[1300];
	struct qinfo qi;
	struct dns_rrs rr;
	size_t	 n, an, t;

	n = mkquery(q, 9, "big.example.test", 1, 1, 4096);
	dns_check_query(q, n, &qi);
	an = mkbig(a, 100, 1, q, qi.qend);
	ok(an > 1232, "big answer %zu", an);
	ok(dns_walk_records(a, an, qi.qend, &rr) == an && rr.opt == an - 19 &&
	    rr.nopt == 1 && !rr.opt_bad, "find opt");
	t = dns_truncate(guard(a, an), an, 1, out, 512);
	ok(t <= 512, "fits %zu", t);
	ok(rd16(out + 2) & DNS_FLAG_TC, "TC set");
	ok(rd16(out + 4) == 1 && rd16(out + 6) == 0 && rd16(out + 8) == 0,
	    "counts");
	ok(rd16(out + 10) == 1, "OPT kept");
	ok(t == qi.qend + 19, "OPT with options %zu", t);
	ok(memcmp(out + 12, q + 12, qi.qend - 12) == 0, "question kept");
	t = dns_truncate(guard(a, an), an, 0, out, 512);
	ok(t == qi.qend && rd16(out + 10) == 0, "no OPT when client had none");
	/* The question survives even at the 512 floor with a long name. */
	{
		char	 name[260];
		int	 k;

		for (k = 0; k < 4; k++)
			memset(name + k * 63, 'x', 62), name[k * 63 + 62] = '.';
		name[4 * 63 - 1] = '\0';
		n = mkquery(q, 9, name, 1, 1, 512);
		ok(dns_check_query(q, n, &qi) == QC_OK, "long name query");
		an = mkbig(a, 200, 1, q, qi.qend);
		t = dns_truncate(guard(a, an), an, 1, out, 512);
		ok(t <= 512 && rd16(out + 4) == 1, "long name truncated %zu",
		    t);
	}
}

static void
test_frames(void)
{
	unsigned char s[100];
	size_t	 cut;

	wr16(s, 20);
	memset(s + 2, 0xab, 20);
	wr16(s + 22, 12);
	memset(s + 24, 0xcd, 12);
	for (cut = 0; cut <= 36; cut++) {
		long r = frame_complete(guard(s, cut), cut, 12, 1024);
		ok(r == (cut < 22 ? 0 : 22), "cut %zu -> %ld", cut, r);
	}
	ok(frame_complete(guard(s + 22, 14), 14, 12, 1024) == 14, "second");
	wr16(s, 11);
	ok(frame_complete(guard(s, 2), 2, 12, 1024) == -1, "below 12");
	wr16(s, 1025);
	ok(frame_complete(guard(s, 2), 2, 12, 1024) == -1, "above max");
	wr16(s, 65535);
	ok(frame_complete(guard(s, 2), 2, 12, 65535) == 0, "max waits");
}

static void
test_idtab(void)
{
	static int live[DOTP_MAX_QUERIES];
	int	 n = 0, i, k, round;

	ok(q_init(DOTP_MAX_QUERIES) == 0, "q_init");
	ok(G.idmask + 1 >= 2 * DOTP_MAX_QUERIES, "ID table at most half full");
	/* Fill the table, free a random half, refill: every live ID must
	 * stay findable and unique through backward-shift deletions. */
	for (round = 0; round < 4; round++) {
		while ((i = q_alloc()) >= 0) {
			G.q[i].state = Q_QUEUED;
			G.q[i].cl.kind = CK_UDP;
			live[n++] = i;
		}
		ok(n == DOTP_MAX_QUERIES, "filled %d", n);
		for (k = 0; k < n; ) {
			uint16_t r;
			rand16(&r);
			if (r & 1) {
				q_free(live[k]);
				live[k] = live[--n];
			} else {
				k++;
			}
		}
		for (k = 0; k < n; k++)
			if (q_find(G.q[live[k]].up_id) != live[k])
				break;
		ok(k == n, "all %d live IDs found", n);
	}
	while (n > 0)
		q_free(live[--n]);
	for (k = 0; k <= (int)G.idmask && G.idtab[k] == 0; k++)
		/* nothing */;
	ok(k == (int)G.idmask + 1 && G.qlive == 0 && G.age.n == 0,
	    "table empty after all freed");
}

static void
test_config(void)
{
	struct sockaddr_text a;
	long	 v;

	ok(parse_addr("127.0.0.1", 53, &a) == 0 &&
	    !strcmp(a.text, "127.0.0.1:53"), "v4 default port");
	ok(parse_addr("127.0.0.1:5300", 53, &a) == 0 &&
	    !strcmp(a.text, "127.0.0.1:5300"), "v4 port");
	ok(parse_addr("[::1]:853", 53, &a) == 0 &&
	    !strcmp(a.text, "[::1]:853") && a.u.sa.sa_family == AF_INET6,
	    "v6 bracketed");
	ok(parse_addr("::1", 53, &a) == 0 && !strcmp(a.text, "[::1]:53"),
	    "bare v6");
	ok(parse_addr("[::1]", 853, &a) == 0 && !strcmp(a.text, "[::1]:853"),
	    "v6 no port");
	ok(parse_addr("1.2.3.4.5", 53, &a) < 0, "bad v4");
	ok(parse_addr("127.0.0.1:99999", 53, &a) < 0, "port range");
	ok(parse_addr("127.0.0.1:0", 53, &a) < 0, "port 0");
	ok(parse_addr("127.0.0.1:", 53, &a) < 0, "empty port");
	ok(parse_addr("[::1", 53, &a) < 0, "unclosed bracket");
	ok(parse_addr("[::1]x", 53, &a) < 0, "junk after bracket");
	ok(parse_addr("host.example:853", 53, &a) < 0, "host name");
	ok(parse_addr("", 53, &a) < 0, "empty");
	ok(valid_cert_name("cloudflare-dns.com"), "name ok");
	ok(!valid_cert_name(""), "empty name");
	ok(!valid_cert_name("1.1.1.1"), "IP as name");
	ok(!valid_cert_name("a..b"), "empty label");
	ok(!valid_cert_name("a b"), "space");
	ok(parse_int("3000", 1, 600000, &v) == 0 && v == 3000, "int");
	ok(parse_int("0", 1, 600000, &v) < 0, "int range");
	ok(parse_int("12x", 1, 600000, &v) < 0, "int junk");
	ok(parse_int("-5", 1, 600000, &v) < 0, "int sign");
	ok(parse_int("", 1, 600000, &v) < 0, "int empty");
	ok(parse_int("99999999999999999999", 1, 600000, &v) < 0, "overflow");
}

static void
test_cfg_parse(void)
{
	struct config cfg;
	static char a0[] = "dotp", a1[] = "-l", a2[] = "127.0.0.1:5300",
	    a3[] = "-u", a4[] = "[::1]:8853#dot.test", a5[] = "--timeout",
	    a6[] = "1500", a7[] = "-q";
	char	*argv1[] = { a0, a1, a2, a3, a4, a5, a6, a7, NULL };
	char	*argv0[] = { a0, NULL };

	setenv("DOTP_UPSTREAM", "127.0.0.2#a.test, 127.0.0.3:54#b.test", 1);
	setenv("DOTP_LISTEN", "127.0.0.9:53", 1);
	cfg_parse(&cfg, 8, argv1);
	ok(cfg.nlisten == 1 && !strcmp(cfg.listen[0].text, "127.0.0.1:5300"),
	    "flag listen wins over env");
	ok(cfg.nup == 1 && !strcmp(cfg.up[0].a.text, "[::1]:8853") &&
	    !strcmp(cfg.up[0].name, "dot.test"), "flag upstream");
	ok(cfg.timeout_ms == 1500 && cfg.verbosity == LVL_ERROR, "timeout, -q");
	cfg_parse(&cfg, 1, argv0);
	ok(cfg.nup == 2 && !strcmp(cfg.up[1].a.text, "127.0.0.3:54") &&
	    !strcmp(cfg.up[1].name, "b.test"), "env upstream list");
	ok(cfg.nlisten == 1 && !strcmp(cfg.listen[0].text, "127.0.0.9:53"),
	    "env listen");
	unsetenv("DOTP_UPSTREAM");
	unsetenv("DOTP_LISTEN");
	cfg_parse(&cfg, 1, argv0);
	ok(cfg.nlisten == 2 && !strcmp(cfg.listen[1].text, "[::1]:53"),
	    "default listen");
	ok(cfg.nup == 2 && !strcmp(cfg.up[0].a.text, "1.1.1.1:853") &&
	    !strcmp(cfg.up[0].name, "cloudflare-dns.com"), "default upstream");
	ok(cfg.timeout_ms == DOTP_TIMEOUT_MS, "default timeout");
}

static void
test_tls_errors(void)
{
	char	 b[80];

	ok(!strncmp(tls_strerror(BR_ERR_X509_NOT_TRUSTED, b, sizeof b),
	    "certificate not trusted: ", 25), "62");
	ok(strstr(tls_strerror(BR_ERR_X509_BAD_SERVER_NAME, b, sizeof b),
	    "name mismatch") != NULL, "56");
	ok(strstr(tls_strerror(BR_ERR_X509_EXPIRED, b, sizeof b),
	    "expired") != NULL, "54");
	ok(strstr(tls_strerror(BR_ERR_RECV_FATAL_ALERT + 40, b, sizeof b),
	    "no cipher suite or curve in common") != NULL, "alert 40");
	ok(!strcmp(tls_strerror(BR_ERR_RECV_FATAL_ALERT + 70, b, sizeof b),
	    "server requires TLS 1.3 (dotp speaks TLS 1.2)"), "alert 70");
	ok(!strcmp(tls_strerror(BR_ERR_RECV_FATAL_ALERT + 99, b, sizeof b),
	    "server sent fatal alert 99"), "unknown alert");
	ok(!strcmp(tls_strerror(BR_ERR_SEND_FATAL_ALERT + 50, b, sizeof b),
	    "dotp sent fatal alert 50"), "alert sent");
	ok(!strcmp(tls_strerror(11, b, sizeof b), "TLS error 11"), "unknown");
	tls_fields(BR_ERR_RECV_FATAL_ALERT + 70, b, sizeof b);
	ok(!strcmp(b, "tls_error=326 alert=70"), "fields %s", b);
	tls_fields(BR_ERR_X509_NOT_TRUSTED, b, sizeof b);
	ok(!strcmp(b, "tls_error=62"), "fields %s", b);
#ifndef DOTP_NO_EMBEDDED_TAS
	ok(DOTP_EMBEDDED_TAS_NUM > 100, "embedded anchors %d",
	    DOTP_EMBEDDED_TAS_NUM);
#endif
}

static void
test_padding(void)
{
	unsigned char q[DOTP_QUERY_MAX + DOTP_PAD_ROOM], a[2000];
	struct qinfo qi;
	size_t	 n, m, k, alen;
	enum pad_how how;

	/* Without OPT: one is added, the length is a multiple of 128, and
	 * the result is still a valid query with the same question. */
	n = mkquery(q, 1, "www.example.test", 1, 0, 0);
	dns_check_query(q, n, &qi);
	m = dns_pad_query(q, n, sizeof q, &qi, &how);
	ok(m % DOTP_PAD_BLOCK == 0 && m > n && how == PAD_ADDED_OPT, "added OPT %zu", m);
	ok(dns_check_query(q, m, &qi) == QC_OK && qi.has_opt, "still valid");
	ok(rd16(q + 10) == 1 && rd16(q + qi.opt + 11) == DNS_OPT_PADDING,
	    "padding option");
	/* Padded already: not again. */
	k = dns_pad_query(q, m, sizeof q, &qi, &how);
	ok(k == m && how == PAD_NONE, "not padded twice");
	/* The client's OPT: padding appended, payload size kept. */
	n = mkquery(q, 1, "www.example.test", 28, 1, 4096);
	dns_check_query(q, n, &qi);
	m = dns_pad_query(q, n, sizeof q, &qi, &how);
	ok(m % DOTP_PAD_BLOCK == 0 && how == PAD_OPTION, "client OPT padded %zu", m);
	ok(dns_check_query(q, m, &qi) == QC_OK && qi.udp_size == 4096,
	    "payload size kept");
	/* Every length pads to the next block, never past the buffer. */
	for (k = 0; k < 300; k++) {
		char name[400];
		size_t l = 1 + k % 200;

		memset(name, 'a', l);
		name[l > 63 ? 63 : l] = '\0';
		if (l > 63) {
			memset(name + 64, 'b', l - 63 > 60 ? 60 : l - 63);
			name[63] = '.';
			name[64 + (l - 63 > 60 ? 60 : l - 63)] = '\0';
		}
		n = mkquery(q, 1, name, 1, (int)(k & 1), 1232);
		if (dns_check_query(q, n, &qi) != QC_OK)
			continue;
		m = dns_pad_query(q, n, sizeof q, &qi, &how);
		if (m % DOTP_PAD_BLOCK != 0 || m > sizeof q ||
		    dns_check_query(q, m, &qi) != QC_OK)
			break;
	}
	ok(k == 300, "pads every length (failed at %zu)", k);
	/* OPT not last (a record after it): left alone. */
	n = mkquery(q, 1, "a.test", 1, 1, 1232);
	memcpy(q + n, "\0\0\1\0\1\0\0\0\0\0\0", 11);
	wr16(q + 10, 2);
	dns_check_query(q, n + 11, &qi);
	ok(dns_pad_query(q, n + 11, sizeof q, &qi, &how) == n + 11 && !how,
	    "OPT not last: unchanged");
	/* Two OPTs: FORMERR. */
	memcpy(q + n, q + n - 11, 11);
	ok(dns_check_query(q, n + 11, &qi) == DNS_RCODE_FORMERR, "two OPTs");
	/* Found by fuzzing: OPT RDATA ending in a partial option is left
	 * unpadded; an OPT in the authority section is FORMERR. */
	{
		static const unsigned char partial[] = {
			0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1,
			7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o', 'm',
			0, 0, 1, 0, 1, 0, 0, 41, 4, 0xd0, 0, 0, 0, 0,
			0, 3, 0, 0x0a, 0
		};
		static const unsigned char in_ns[] = {
			0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0,
			1, 'a', 4, 't', 'e', 's', 't', 0, 0, 1, 0, 1,
			0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0
		};

		memcpy(q, partial, sizeof partial);
		ok(dns_check_query(q, sizeof partial, &qi) == QC_OK &&
		    dns_pad_query(q, sizeof partial, sizeof q, &qi, &how) ==
		    sizeof partial && how == 0, "partial option: unpadded");
		ok(dns_check_query(guard(in_ns, sizeof in_ns), sizeof in_ns,
		    &qi) == DNS_RCODE_FORMERR, "OPT in authority: FORMERR");
	}
	/* No room: unchanged. */
	n = mkquery(q, 1, "a.test", 1, 0, 0);
	dns_check_query(q, n, &qi);
	ok(dns_pad_query(q, n, n + 10, &qi, &how) == n && !how, "no room");

	/* Stripping from answers: the OPT, or only its padding. */
	n = mkquery(q, 9, "big.example.test", 1, 1, 4096);
	dns_check_query(q, n, &qi);
	alen = mkbig(a, 3, 1, q, qi.qend);	/* OPT with a padding option */
	m = dns_strip_padding(guard(a, alen), alen);
	ok(m == alen - 8, "padding stripped %zu -> %zu", alen, m);
	alen = mkbig(a, 3, 1, q, qi.qend);
	m = dns_strip_opt(a, alen);
	ok(m == alen - 19 && rd16(a + 10) == 0, "OPT stripped");
	ok(dns_opt_locate(a, m, &k) == 0, "no OPT left");
	ok(dns_strip_opt(a, m) == m && dns_strip_padding(a, m) == m,
	    "nothing to strip");
	for (k = 0; k < alen; k++) {	/* truncated answers: no change */
		alen = mkbig(a, 3, 1, q, qi.qend);
		if (dns_strip_opt(guard(a, k), k) != k)
			break;
	}
	ok(k == alen, "truncated answers left alone (%zu)", k);
}

static void
test_cidr(void)
{
	struct cidr c;
	struct sockaddr_in s4 = { .sin_family = AF_INET };
	struct sockaddr_in6 s6 = { .sin6_family = AF_INET6 };

	ok(parse_cidr("10.0.0.0/8", &c) == 0 && c.bits == 8, "v4 cidr");
	inet_pton(AF_INET, "10.200.3.4", &s4.sin_addr);
	ok(cidr_match(&c, (struct sockaddr *)&s4), "10/8 match");
	inet_pton(AF_INET, "11.0.0.1", &s4.sin_addr);
	ok(!cidr_match(&c, (struct sockaddr *)&s4), "10/8 no match");
	ok(parse_cidr("172.16.0.0/12", &c) == 0, "172.16/12");
	inet_pton(AF_INET, "172.31.255.255", &s4.sin_addr);
	ok(cidr_match(&c, (struct sockaddr *)&s4), "172.31 in /12");
	inet_pton(AF_INET, "172.32.0.0", &s4.sin_addr);
	ok(!cidr_match(&c, (struct sockaddr *)&s4), "172.32 not in /12");
	ok(parse_cidr("127.0.0.0/8", &c) == 0, "127/8");
	inet_pton(AF_INET6, "::ffff:127.0.0.1", &s6.sin6_addr);
	ok(cidr_match(&c, (struct sockaddr *)&s6), "v4-mapped matched as v4");
	ok(parse_cidr("fe80::/10", &c) == 0, "fe80::/10");
	inet_pton(AF_INET6, "febf::1", &s6.sin6_addr);
	ok(cidr_match(&c, (struct sockaddr *)&s6), "febf in fe80::/10");
	inet_pton(AF_INET6, "fec0::1", &s6.sin6_addr);
	ok(!cidr_match(&c, (struct sockaddr *)&s6), "fec0 not in fe80::/10");
	ok(parse_cidr("0.0.0.0/0", &c) == 0, "v4 any");
	inet_pton(AF_INET, "8.8.8.8", &s4.sin_addr);
	ok(cidr_match(&c, (struct sockaddr *)&s4), "any matches");
	ok(!cidr_match(&c, (struct sockaddr *)&s6), "v4 any is not v6");
	ok(parse_cidr("::1", &c) == 0 && c.bits == 128, "bare v6");
	ok(parse_cidr("10.0.0.0/33", &c) < 0, "/33");
	ok(parse_cidr("10.0.0.0/", &c) < 0, "empty bits");
	ok(parse_cidr("10.0.0.0/-1", &c) < 0, "negative bits");
	ok(parse_cidr("10.0.0/8", &c) < 0, "short v4");
	ok(parse_cidr("::/129", &c) < 0, "/129");
	ok(parse_cidr("", &c) < 0 && parse_cidr("/8", &c) < 0, "empty");
}

/* conn_learn: what a server's close says about it; up_idle_ms and
 * conn_has_cap apply it. */
static void
test_learn(void)
{
	static struct conn cs[2];
	struct upstream *u = &G.up[0];
	int	 saved = log_verbosity;

	log_verbosity = LVL_ERROR;	/* the info lines are for users */
	memset(cs, 0, sizeof cs);
	memset(u, 0, sizeof *u);
	G.conn = cs;
	G.nconn = 2;
	G.cfg.max_conns = 2;
	G.cfg.idle_ms = DOTP_IDLE_MS;
	cs[0].fl = cs[0].late = (struct qlist)QLIST_ZERO;
	cs[0].state = C_READY;
	cs[0].answered = 3;
	cs[0].last_answer = 1000;
	cs[0].last_active = 1000;
	cs[0].fl.n = 5;				/* queries it did not answer */
	conn_learn(&cs[0], 1000 + DOTP_CAP_GAP_MS);
	ok(u->cap == 0 && u->cap_seen == 3, "one close after 3: not yet");
	cs[0].answered = 4;
	conn_learn(&cs[0], 1000);
	ok(u->cap == 0 && u->cap_seen == 4, "then 4: still nothing");
	cs[0].answered = 3;
	conn_learn(&cs[0], 1000);
	conn_learn(&cs[0], 1000 + DOTP_CAP_GAP_MS);
	ok(u->cap == 3 && u->idle_ms == 0, "two closes after 3: a count");
	ok(u->learned_at == 1000 + DOTP_CAP_GAP_MS, "learned then");
	cs[0].answered = 7;
	conn_learn(&cs[0], 1000);
	conn_learn(&cs[0], 1000);
	ok(u->cap == 3, "a larger count does not raise it");
	cs[0].answered = 2;
	conn_learn(&cs[0], 1000 + DOTP_CAP_GAP_MS + 1);
	conn_learn(&cs[0], 1000 + DOTP_CAP_GAP_MS + 1);
	ok(u->cap == 3, "a close long after the answer is no count");
	cs[0].sent = 2;
	ok(conn_has_cap(&cs[0]), "2 of 3 sent: room");
	cs[0].sent = 3;
	ok(!conn_has_cap(&cs[0]), "3 of 3 sent: spent");
	cs[0].fl.n = 0;				/* nothing owed, quiet */
	conn_learn(&cs[0], 1000 + DOTP_IDLE_LEARN_MIN_MS - 1);
	conn_learn(&cs[0], 1000 + DOTP_IDLE_LEARN_MIN_MS - 1);
	ok(u->idle_ms == 0, "too short a quiet spell: nothing learned");
	conn_learn(&cs[0], 1000 + 2000);
	ok(u->idle_ms == 0, "one idle close: not yet");
	conn_learn(&cs[0], 1000 + 4000);
	ok(u->idle_ms == 0, "then one at twice the time: still nothing");
	conn_learn(&cs[0], 1000 + 3600);
	ok(u->idle_ms == 3600 && up_idle_ms(u) == 2700,
	    "two idle closes near 3.6 s: dotp closes at 2.7 s");
	conn_learn(&cs[0], 1000 + 2600);
	conn_learn(&cs[0], 1000 + 2600);
	ok(u->idle_ms == 2600, "a shorter one, twice, lowers it");
	conn_learn(&cs[0], 1000 + DOTP_IDLE_MS);
	conn_learn(&cs[0], 1000 + DOTP_IDLE_MS);
	ok(u->idle_ms == 2600, "past dotp's own idle close: ignored");
	up_unlearn(u, u->learned_at + DOTP_LEARN_TTL_MS - 1);
	ok(u->cap == 3 && u->idle_ms == 2600, "kept until the TTL");
	up_unlearn(u, u->learned_at + DOTP_LEARN_TTL_MS);
	ok(u->cap == 0 && u->idle_ms == 0 && u->cap_seen == 0,
	    "forgotten after the TTL, to be learned again");
	u->idle_ms = 0;
	ok(up_idle_ms(u) == DOTP_IDLE_MS, "nothing learned: --idle-timeout");
	memset(u, 0, sizeof *u);
	G.conn = NULL;
	G.nconn = 0;
	log_verbosity = saved;
}

/* conn_acks: which owed ACKs are forced, and when the next is due. */
static void
test_acks(void)
{
	struct conn cs[5];
	int64_t	 now = 1000, next;
	int	 i, few;

	memset(cs, 0, sizeof cs);
	G.conn = cs;
	G.nconn = 5;
	for (i = 0; i < 5; i++) {
		cs[i].fd = -1;	/* setsockopt fails quietly */
		cs[i].state = C_READY;
		cs[i].ack_owed = 1;
		cs[i].ack_at = now + 1;
	}
	cs[0].fl.n = 0;			/* owes no answers */
	cs[1].fl.n = 2;			/* a few: an A and AAAA pair */
	cs[2].fl.n = DOTP_ACK_FEW + 1;	/* pipelined load */
	cs[3].fl.n = 1;
	cs[3].state = C_HANDSHAKE;	/* not ready: nothing to ACK */
	cs[4].fl.n = DOTP_ACK_FEW - 1;	/* the boundary, on two lists */
	cs[4].late.n = 1;
	cs[1].ack_owed = cs[4].ack_owed = 0;
	next = conn_acks(now, 0, &few);
	ok(!few, "owing none, not ready, or many: no ACK before sleeping");
	ok(!cs[0].ack_owed && !cs[3].ack_owed, "nothing owed: dropped");
	ok(cs[2].ack_owed && next == now + 1, "many owed: not forced yet");
	cs[1].ack_owed = cs[4].ack_owed = 1;
	next = conn_acks(now, 0, &few);
	ok(few, "a few owed: ACK before sleeping");
	ok(cs[1].ack_owed && cs[2].ack_owed && cs[4].ack_owed,
	    "busy pass: none forced yet");
	ok(next == now + 1, "next due at ack_at");
	next = conn_acks(now, 1, &few);
	ok(!cs[1].ack_owed && !cs[4].ack_owed,
	    "up to DOTP_ACK_FEW owed: forced when about to sleep");
	ok(cs[2].ack_owed && next == now + 1,
	    "more owed: waits for a query to carry it");
	ok(!few, "only the pipelined one left");
	next = conn_acks(now + 1, 0, &few);
	ok(!cs[2].ack_owed && next == INT64_MAX, "forced once due");
	G.conn = NULL;
	G.nconn = 0;
}

/* One cell of a markdown table row: the text between the k-th and the
 * next '|' (k from 1), into buf. Returns 0, or -1 if there is none. */
static int
md_cell(const char *row, int k, char *buf, size_t len)
{
	const char *p = row, *q;
	size_t	 n;

	while (k-- > 0)
		if ((p = strchr(p, '|')) == NULL)
			return -1;
		else
			p++;
	if ((q = strchr(p, '|')) == NULL)
		return -1;
	n = (size_t)(q - p) < len - 1 ? (size_t)(q - p) : len - 1;
	memcpy(buf, p, n);
	buf[n] = '\0';
	return 0;
}

/* The README's table of options says what opts[] says: every row an
 * option and every option a row, with its short flag, its variable and
 * its default (numbers, and every item of a list's default). */
static void
test_readme_options(void)
{
	FILE	*f = fopen(getenv("DOTP_README") ? getenv("DOTP_README") :
	    "README.md", "r");
	char	 line[2048], flags[512], env[256], def[1024], want[300];
	char	 seen[NOPTS];
	int	 rows = 0, k;

	opts_init();
	ok(f != NULL, "README.md readable (run from the repository root)");
	if (f == NULL)
		return;
	memset(seen, 0, sizeof seen);
	while (fgets(line, sizeof line, f) != NULL) {
		const char *dd;
		char	 name[64];
		size_t	 n;

		if (strncmp(line, "| `-", 4) != 0 ||
		    md_cell(line, 1, flags, sizeof flags) < 0 ||
		    md_cell(line, 2, env, sizeof env) < 0 ||
		    md_cell(line, 3, def, sizeof def) < 0)
			continue;
		rows++;
		if ((dd = strstr(flags, "`--")) == NULL) {
			ok(0, "README row without a long option: %s", flags);
			continue;
		}
		dd += 3;
		n = strspn(dd, "abcdefghijklmnopqrstuvwxyz-");
		snprintf(name, sizeof name, "%.*s", (int)n, dd);
		for (k = 0; k < NOPTS && strcmp(opts[k].name, name); k++)
			;
		ok(k < NOPTS, "README option --%s is not in opts[]", name);
		if (k == NOPTS)
			continue;
		seen[k]++;
		if (opts[k].chr) {
			snprintf(want, sizeof want, "`-%c`", opts[k].chr);
			ok(strstr(flags, want) != NULL, "README: --%s shows %s",
			    name, want);
		}
		ok(opts[k].env == NULL ? strstr(env, "DOTP_") == NULL :
		    strstr(env, opts[k].env) != NULL,
		    "README: --%s has variable %s", name,
		    opts[k].env ? opts[k].env : "(none)");
		if (opts[k].set == opt_num) {
			snprintf(want, sizeof want, "`%ld`", opts[k].def);
			ok(strstr(def, want) != NULL, "README: --%s default %s",
			    name, want);
		} else if (opts[k].dflt != NULL) {
			char	 items[256], *it, *save = NULL;

			snprintf(items, sizeof items, "%s", opts[k].dflt);
			for (it = strtok_r(items, " ", &save); it != NULL;
			    it = strtok_r(NULL, " ", &save)) {
				snprintf(want, sizeof want, "`%s`", it);
				ok(strstr(def, want) != NULL, "README: --%s "
				    "default has %s", name, want);
			}
		}
	}
	fclose(f);
	for (k = 0; k < NOPTS; k++)
		ok(seen[k] == 1, "opts[] --%s has %d README rows, want 1",
		    opts[k].name, seen[k]);
	ok(rows == NOPTS, "README rows %d, options %d", rows, NOPTS);
}

/* The packed embedded anchors (ta_embedded) are brssl ta's, byte for
 * byte: same count, DNs, key types, keys and curves. */
static void
test_embedded_anchors(void)
{
	const br_x509_trust_anchor *a = ta_embedded(), *b = dotp_embedded_tas;
	size_t	 i, bad = 0;

	ok(sizeof dotp_embedded_tas / sizeof dotp_embedded_tas[0] ==
	    DOTP_EMBEDDED_TAS_NUM, "anchor count");
	for (i = 0; i < DOTP_EMBEDDED_TAS_NUM; i++, a++, b++) {
		int	 same = a->dn.len == b->dn.len &&
		    !memcmp(a->dn.data, b->dn.data, a->dn.len) &&
		    a->flags == b->flags &&
		    a->pkey.key_type == b->pkey.key_type;

		if (same && a->pkey.key_type == BR_KEYTYPE_RSA)
			same = a->pkey.key.rsa.nlen == b->pkey.key.rsa.nlen &&
			    a->pkey.key.rsa.elen == b->pkey.key.rsa.elen &&
			    !memcmp(a->pkey.key.rsa.n, b->pkey.key.rsa.n,
			    a->pkey.key.rsa.nlen) &&
			    !memcmp(a->pkey.key.rsa.e, b->pkey.key.rsa.e,
			    a->pkey.key.rsa.elen);
		else if (same)
			same = a->pkey.key.ec.curve == b->pkey.key.ec.curve &&
			    a->pkey.key.ec.qlen == b->pkey.key.ec.qlen &&
			    !memcmp(a->pkey.key.ec.q, b->pkey.key.ec.q,
			    a->pkey.key.ec.qlen);
		bad += !same;
	}
	ok(bad == 0, "%zu embedded anchors differ from brssl ta's", bad);
}

/* An answer to query q (question ending at qend) with rcode: nan A
 * records with TTLs ttl, ttl + 1, ...; then, with soa_ttl, an SOA in the
 * authority section whose MINIMUM is soa_min; then OPT if opt. */
static size_t
mkans(unsigned char *a, const unsigned char *q, size_t qend, int rcode,
    int nan, uint32_t ttl, uint32_t soa_ttl, uint32_t soa_min, int opt)
{
	static const unsigned char soa[] = {
		0xc0, 12, 0, 6, 0, 1, 0, 0, 0, 0, 0, 22,
		0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 0
	};
	size_t	 n = mkbig(a, nan, 0, q, qend);
	int	 k;

	wr16(a + 2, (uint16_t)(0x8180 | rcode));
	for (k = 0; k < nan; k++)
		wr32(a + qend + 16 * (size_t)k + 6, ttl + (uint32_t)k);
	if (soa_ttl) {
		memcpy(a + n, soa, sizeof soa);
		wr32(a + n + 6, soa_ttl);
		wr32(a + n + sizeof soa - 4, soa_min);
		n += sizeof soa;
		wr16(a + 8, 1);
	}
	if (opt) {
		static const unsigned char o[11] = { 0, 0, 41, 4, 0xd0 };

		memcpy(a + n, o, sizeof o);
		n += sizeof o;
		wr16(a + 10, 1);
	}
	return n;
}

/* The TTL of record k (0-based, after the question) of answer a. */
static uint32_t
rr_ttl(const unsigned char *a, size_t len, size_t qend, int k)
{
	size_t	 pos = qend;
	unsigned type;

	while (k-- > 0)
		pos = dns_skip_rr(a, len, pos, &type, NULL);
	return rd32(a + dns_skip_name(a, len, pos) + DNS_RR_TTL);
}

/* The answer cache, with a clock the test sets: lifetimes by the RFC
 * rules, TTLs aged on replay, expiry, the key's parts, and eviction
 * within the budget with a second chance for entries hit. */
static void
test_cache(void)
{
	unsigned char q[300], a[2000], out[DOTP_CACHE_ANSWER_MAX];
	struct qinfo qi;
	struct ckey k, k2;
	struct centry *e;
	size_t	 n, an;
	int	 i, ck, ck2, kept;
	int64_t	 t0 = 1000000;

	memset(&G.cache, 0, sizeof G.cache);
	G.cfg.cache_min_ttl = 0;
	G.cfg.cache_max_ttl = DOTP_CACHE_MAX_TTL;
	G.cfg.cache_neg_ttl = DOTP_CACHE_NEG_TTL;
	G.cfg.serve_stale = 0;
	ok(cache_init(64 * 1024) == 0, "cache_init");
	n = mkquery(q, 7, "www.example.test", 1, 1, 1232);
	dns_check_query(q, n, &qi);

	/* Lifetimes. */
	an = mkans(a, q, qi.qend, 0, 3, 300, 0, 0, 1);
	ok(cache_lifetime(a, an, qi.qend) == 300, "smallest answer TTL");
	an = mkans(a, q, qi.qend, 0, 2, 300, 120, 5000, 0);
	ok(cache_lifetime(a, an, qi.qend) == 120, "authority TTL counts");
	an = mkans(a, q, qi.qend, 0, 1, 0x80000000u, 0, 0, 0);
	ok(cache_lifetime(a, an, qi.qend) == 0, "TTL above 2^31-1 is 0");
	an = mkans(a, q, qi.qend, 3, 0, 0, 300, 2, 0);
	ok(cache_lifetime(a, an, qi.qend) == 2, "NXDOMAIN: SOA MINIMUM");
	an = mkans(a, q, qi.qend, 0, 0, 0, 60, 900, 0);
	ok(cache_lifetime(a, an, qi.qend) == 60, "NODATA: SOA TTL");
	an = mkans(a, q, qi.qend, 3, 0, 0, 0, 0, 0);
	ok(cache_lifetime(a, an, qi.qend) == 0, "NXDOMAIN without SOA");
	an = mkans(a, q, qi.qend, 0, 0, 0, 99999, 99999, 0);
	ok(cache_lifetime(a, an, qi.qend) == DOTP_CACHE_NEG_TTL,
	    "negative cap");
	an = mkans(a, q, qi.qend, 2, 0, 0, 0, 0, 0);
	ok(cache_lifetime(a, an, qi.qend) == DOTP_CACHE_FAIL_HOLD_S,
	    "SERVFAIL held");
	an = mkans(a, q, qi.qend, 0, 1, 300, 0, 0, 0);
	wr16(a + 2, rd16(a + 2) | DNS_FLAG_TC);
	ok(cache_lifetime(a, an, qi.qend) == 0, "TC never");
	an = mkans(a, q, qi.qend, 0, 1, 5, 0, 0, 0);
	G.cfg.cache_min_ttl = 30;
	ok(cache_lifetime(a, an, qi.qend) == 30, "--cache-min-ttl");
	G.cfg.cache_min_ttl = 0;
	G.cfg.cache_max_ttl = 4;
	ok(cache_lifetime(a, an, qi.qend) == 4, "--cache-max-ttl");
	G.cfg.cache_max_ttl = DOTP_CACHE_MAX_TTL;

	/* Keys: case folds; RD, CD, DO and EDNS are apart; ECS bypasses. */
	ck = cache_key(q, qi.qend, qi.opt, qi.opt_end, &k);
	memcpy(out, q, n);
	out[13] = 'W';
	ck2 = cache_key(out, qi.qend, qi.opt, qi.opt_end, &k2);
	ok(ck > 0 && ck == ck2 && k.hash == k2.hash && k.len == k2.len &&
	    !memcmp(k.b, k2.b, k.len), "case folds");
	wr16(out + 2, rd16(out + 2) ^ DNS_FLAG_RD);
	ck2 = cache_key(out, qi.qend, qi.opt, qi.opt_end, &k2);
	ok(ck2 != ck && memcmp(k.b, k2.b, k.len), "RD apart");
	memcpy(out, q, n);
	wr16(out + 2, rd16(out + 2) | DNS_FLAG_CD);
	ok(cache_key(out, qi.qend, qi.opt, qi.opt_end, &k2) != ck, "CD apart");
	memcpy(out, q, n);
	out[qi.opt + DNS_OPT_FLAGS] |= DNS_OPT_FLAG_DO;
	ok(cache_key(out, qi.qend, qi.opt, qi.opt_end, &k2) != ck, "DO apart");
	ok(cache_key(q, qi.qend, 0, 0, &k2) != ck, "EDNS apart");
	memcpy(out, q, n);
	{
		static const unsigned char ecs[] = { 0, 8, 0, 4, 0, 1, 0, 0 };

		memcpy(out + n, ecs, sizeof ecs);
		wr16(out + qi.opt + DNS_OPT_RDLEN, sizeof ecs);
		ok(cache_key(out, qi.qend, qi.opt, n + sizeof ecs, &k2) < 0,
		    "ECS bypasses");
	}

	/* Put, find, replay with aged TTLs, expiry. */
	an = mkans(a, q, qi.qend, 0, 2, 300, 0, 0, 1);
	cache_put(&k, a, an, cache_lifetime(a, an, qi.qend), -1, t0);
	e = cache_lookup(&k, 0);
	ok(e != NULL && ce_fresh(e, t0) && G.cache.entries == 1, "stored");
	ok(cache_lookup(&k, 1) == NULL, "not a pending marker");
	n = cache_replay(e, qi.qend, t0 + 1999, 0, out);
	ok(n == an && rr_ttl(out, n, qi.qend, 0) == 299 &&
	    rr_ttl(out, n, qi.qend, 1) == 300, "TTLs lowered by whole seconds");
	ok(memcmp(out + 12, a + 12, 4) == 0 &&
	    memcmp(out + n - 11, a + an - 11, 11) == 0, "OPT kept as is");
	n = cache_replay(e, qi.qend, t0 + 299999, 0, out);
	ok(rr_ttl(out, n, qi.qend, 0) == 1, "1 s left");
	ok(ce_fresh(e, t0 + 299999) && !ce_fresh(e, t0 + 300000),
	    "expires at its TTL");
	ok(!ce_stale_ok(e, t0 + 300000), "no stale without --serve-stale");
	G.cfg.serve_stale = 60;
	ok(ce_stale_ok(e, t0 + 359999) && !ce_stale_ok(e, t0 + 360000),
	    "stale for --serve-stale more");
	n = cache_replay(e, qi.qend, t0 + 320000, 1, out);
	ok(rr_ttl(out, n, qi.qend, 0) == DOTP_STALE_TTL &&
	    rr_ttl(out, n, qi.qend, 1) == DOTP_STALE_TTL, "stale TTL 30");
	n = cache_replay(e, qi.qend, t0 + 320000, 0, out);
	ok(rr_ttl(out, n, qi.qend, 0) == 0, "never below 0");
	G.cfg.serve_stale = 0;
	/* A pending marker lives beside the answer; an answer ends it. */
	cache_put(&k, NULL, 0, 0, 5, t0);
	ok(cache_lookup(&k, 1) != NULL && cache_lookup(&k, 1)->lead == 5 &&
	    cache_lookup(&k, 0) != NULL, "marker beside the answer");
	cache_put(&k, a, an, 300, -1, t0);
	ok(cache_lookup(&k, 1) == NULL && G.cache.entries == 1,
	    "an answer replaces both");

	/* Eviction: unique names far past the budget; the bytes stay in
	 * the ring, and an entry hit on every round survives (CLOCK). */
	kept = 1;
	for (i = 0; i < 3000; i++) {
		char	 name[40];
		size_t	 m;

		snprintf(name, sizeof name, "n%d.example.test", i);
		m = mkquery(out, 1, name, 1, 0, 0);
		dns_check_query(out, m, &qi);
		cache_key(out, qi.qend, 0, 0, &k2);
		an = mkans(a, out, qi.qend, 0, 4, 300, 0, 0, 0);
		cache_put(&k2, a, an, 300, -1, t0);
		if ((e = cache_lookup(&k, 0)) == NULL)
			kept = 0;
		else
			e->flags |= CE_REF;	/* a hit */
	}
	ok(G.cache.bytes <= G.cache.cap && G.cache.used <= G.cache.cap,
	    "within the ring: %lu bytes", G.cache.bytes);
	ok(G.ctr[CTR_CACHE_EVICTIONS] > 2000, "evicted %lu",
	    G.ctr[CTR_CACHE_EVICTIONS]);
	ok(kept, "an entry hit every round kept its place");
	ok(G.cache.entries > 50 && G.cache.entries < 1000, "%lu entries",
	    G.cache.entries);
	munmap(G.cache.bucket, 64 * 1024);
	memset(&G.cache, 0, sizeof G.cache);
	G.ctr[CTR_CACHE_EVICTIONS] = 0;
}

/* Zone of the query for name under the zones set up from cfg. */
static int
zone_for(const char *name)
{
	unsigned char q[300];
	size_t	 n = mkquery(q, 1, name, 1, 0, 0);

	return zone_of(guard(q, n), n);
}

static void
test_forward(void)
{
	struct config cfg;
	static char a0[] = "dotp", a1[] = "--forward", a2[] =
	    "cluster.local,In-Addr.Arpa.=dns://127.0.0.1:5300,dns://[::1];"
	    " b.example = 127.0.0.2#dot.test ", a3[] = "--forward",
	    a4[] = "a.b.example=dns://127.0.0.3", a5[] = "-u",
	    a6[] = "127.0.0.9#up.test";
	char	*argv1[] = { a0, a1, a2, a3, a4, a5, a6, NULL };
	char	*argv2[] = { a0, NULL };
	static struct dotp saved;
	struct zone z;

	saved = G;
	ok(parse_zone("Example.COM.", &z) == NULL && z.len == 13 &&
	    memcmp(z.name, "\7example\3com", 13) == 0, "zone lower wire");
	ok(parse_zone(".", &z) == NULL && z.len == 1 && z.name[0] == 0,
	    "root zone");
	ok(parse_zone("a..b", &z) != NULL, "empty label");
	ok(parse_zone("", &z) != NULL, "empty zone");
	ok(parse_zone("a b", &z) != NULL && parse_zone("a/b", &z) != NULL,
	    "bad characters");
	ok(parse_zone("a234567890123456789012345678901234567890123456789012"
	    "345678901234", &z) != NULL, "label of 64");
	cfg_parse(&cfg, 7, argv1);
	ok(cfg.nzone == 4 && cfg.nfwd == 4 && cfg.nup == 1, "zones, servers");
	ok(cfg.zone[0].first == 0 && cfg.zone[0].n == 2 &&
	    cfg.zone[1].first == 0 && cfg.zone[1].n == 2 &&
	    cfg.zone[0].plain && cfg.zone[1].plain, "one entry, two zones");
	ok(!strcmp(cfg.fwd[1].a.text, "[::1]:53") && cfg.fwd[1].plain,
	    "plain default port 53");
	ok(cfg.zone[2].first == 2 && cfg.zone[2].n == 1 &&
	    !cfg.zone[2].plain && !strcmp(cfg.fwd[2].a.text, "127.0.0.2:853") &&
	    !strcmp(cfg.fwd[2].name, "dot.test"), "DoT zone, spaces trimmed");
	G.cfg = cfg;
	setup_zones();
	ok(G.nup == 5 && G.nzone == 5 && G.zone[1].first == 1 &&
	    G.up[1].plain && !G.up[0].plain && G.up[4].zone == 4,
	    "runtime zones");
	ok(zone_for("my-svc.default.svc.cluster.local") == 1, "under zone");
	ok(zone_for("MY-SVC.Default.SVC.Cluster.LOCAL") == 1, "any case");
	ok(zone_for("cluster.local") == 1, "the zone itself");
	ok(zone_for("xcluster.local") == 0 && zone_for("local") == 0,
	    "label-wise only");
	ok(zone_for("5.5.96.10.in-addr.arpa") == 2, "reverse zone");
	ok(zone_for("c.a.b.example") == 4 && zone_for("a.b.example") == 4,
	    "longest zone wins");
	ok(zone_for("b.b.example") == 3 && zone_for("b.example") == 3,
	    "shorter zone");
	ok(zone_for("example") == 0 && zone_for("") == 0, "default zone");
	/* up_pick stays within the zone: the DoT zone's one server, and
	 * the reverse zone's two, skipping a tried one. */
	ok(up_pick(3, 0, 1) == 3 && up_pick(0, 0, 1) == 0, "pick in zone");
	ok(up_pick(2, 1u << 1, 0) == 2 && up_pick(2, 3u << 1, 0) == -1,
	    "pick skips tried");
	G.up[1].down = 1;
	ok(up_pick(1, 0, 0) == 2 && !up_other_healthy(2), "down skipped");
	G.up[1].trial = 1;
	ok(up_pick(1, 0, 0) == 1 && up_pick(1, 0, 0) == 2,
	    "trial: picked again, by one query");
	G.up[1].down = G.up[1].trial = 0;
	/* "." by --forward takes the built-in default's place; the env
	 * splits entries at ';' and newlines. */
	setenv("DOTP_FORWARD", ".=dns://127.0.0.4\nlan=dns://127.0.0.5;", 1);
	cfg_parse(&cfg, 1, argv2);
	ok(cfg.nup == 1 && cfg.up[0].plain && cfg.up_by == UP_BY_FORWARD &&
	    cfg.nzone == 1 && !strcmp(cfg.fwd[0].a.text, "127.0.0.5:53"),
	    "env: root and a zone");
	unsetenv("DOTP_FORWARD");
	G = saved;	/* what the other tests set up, tables included */
}

/* Pins: the text form both ways, the SPKI hash of embedded anchors of
 * every key type against what openssl computes (`openssl x509 -pubkey
 * | openssl pkey -pubin -outform der | openssl dgst -sha256`), and the
 * @ items of a server. */
static void
test_pins(void)
{
	static const struct { const char *cn, *pin; } roots[] = {
		{ "ISRG Root X1", "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=" },
		{ "ISRG Root X2", "diGVwiVYbubAI3RW4hB9xU8e/CH2GnkuvVFZE8zmgzI=" },
		{ "Amazon Root CA 3",
		    "NqvDJlas/GRcYbcWE8S/IceH9cq77kg0jVhZeAPXq8k=" },
		{ "GTS Root R4", "mEflZT5enoR1FuXLgYYGqnVEoZvmf9c2bVBpiOjYQ0c=" },
	};
	static const char *const bad[] = {
		"C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M",	/* no '=' */
		"C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M==",
		"C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8N=",	/* pad bits */
		"C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8=",
		"C5-lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=",	/* alphabet */
		"",
	};
	const br_x509_trust_anchor *ta = ta_embedded();
	struct server sv;
	unsigned char pin[32], h[32];
	char	 t[52], v[200];
	size_t	 i, k, found;

	for (i = 0; i < sizeof roots / sizeof roots[0]; i++) {
		ok(pin_parse(roots[i].pin, pin) == 0, "pin %s parses",
		    roots[i].pin);
		pin_text(pin, t);
		ok(strcmp(t + 7, roots[i].pin) == 0, "pin %s prints back",
		    roots[i].pin);
		for (k = 0, found = 0; k < DOTP_EMBEDDED_TAS_NUM; k++) {
			size_t	 n = strlen(roots[i].cn), j;

			for (j = 0; j + n <= ta[k].dn.len; j++)
				if (memcmp(ta[k].dn.data + j, roots[i].cn, n) == 0 &&
				    (j + n == ta[k].dn.len ||
				    ta[k].dn.data[j + n] < ' '))
					break;
			if (j + n > ta[k].dn.len)
				continue;
			found++;
			ok(spki_hash(&ta[k].pkey, h) == 0 &&
			    memcmp(h, pin, 32) == 0, "spki_hash of %s (key "
			    "type %d) is openssl's", roots[i].cn,
			    ta[k].pkey.key_type);
		}
		ok(found == 1, "anchor %s found once (%zu)", roots[i].cn, found);
	}
	for (i = 0; i < sizeof bad / sizeof bad[0]; i++)
		ok(pin_parse(bad[i], pin) < 0, "pin '%s' refused", bad[i]);

	snprintf(v, sizeof v, "10.0.0.1#dns.example@sha256/%s@pin-only",
	    roots[0].pin);
	ok(parse_server(v, 0, &sv) == NULL && sv.npin == 1 && sv.pin_only &&
	    !sv.no_name && strcmp(sv.name, "dns.example") == 0, "pin-only");
	snprintf(v, sizeof v, "10.0.0.1#dns.example@sha256/%s@pin-only"
	    "@no-name-check@sha256/%s", roots[0].pin, roots[1].pin);
	ok(parse_server(v, 0, &sv) == NULL && sv.npin == 2 && sv.no_name,
	    "two pins, no-name-check");
	snprintf(v, sizeof v, "10.0.0.1#dns.example@no-name-check@sha256/%s",
	    roots[0].pin);
	ok(parse_server(v, 0, &sv) != NULL, "no-name-check alone refused");
	ok(parse_server("10.0.0.1#dns.example@pin-only", 0, &sv) != NULL,
	    "pin-only without a pin refused");
	ok(parse_server("10.0.0.1#dns.example@", 0, &sv) != NULL,
	    "empty @ item refused");
	ok(parse_server("10.0.0.1#dns.example@sha1/abc=", 0, &sv) != NULL,
	    "sha1 refused");
	snprintf(v, sizeof v, "dns://10.0.0.1@sha256/%s", roots[0].pin);
	ok(parse_server(v, 1, &sv) != NULL, "pin on dns:// refused");
	ok(parse_server("10.0.0.1#a.example@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=@sha256/"
	    "C5+lpZ7tcVwmwQIMcRtPbsQtWLABXhQzejna0wHFr8M=", 0, &sv) != NULL,
	    "a ninth pin refused");
}

/* The sandbox (sandbox_enter), in a child: what the loop does is
 * allowed; a file, a program or another kind of socket ends the child
 * with SIGSYS. */
enum { SB_EXIT, SB_OPEN, SB_OPENAT, SB_EXEC, SB_UNIX, SB_INET, SB_MMAP_X,
    SB_MPROTECT_X, SB_MMAP, SB_STATUS };

static void
sandbox_child(int what)
{
	char	*argv[] = { (char *)(uintptr_t)"/bin/true", NULL };
	int	 fd;

	if (sandbox_enter() < 0)
		_exit(3);
	switch (what) {
	case SB_OPEN:
		fd = open("/etc/passwd", O_RDONLY);
		break;
	case SB_OPENAT:
		fd = (int)syscall(SYS_openat, AT_FDCWD, "/etc/passwd",
		    O_RDONLY);
		break;
	case SB_EXEC:
		execve(argv[0], argv, argv + 1);
		fd = -1;
		break;
	case SB_UNIX:
		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		break;
	case SB_INET:
		fd = socket(AF_INET6, SOCK_DGRAM, 0);
		_exit(fd >= 0 && close(fd) == 0 ? 0 : 5);
	case SB_MMAP_X:
		fd = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE |
		    MAP_ANONYMOUS, -1, 0) == MAP_FAILED ? -1 : 0;
		break;
	case SB_MPROTECT_X:
	case SB_MMAP: {
		void	*m = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (m == MAP_FAILED)
			_exit(5);
		if (what == SB_MMAP)
			_exit(munmap(m, 4096) == 0 ? 0 : 5);
		fd = mprotect(m, 4096, PROT_READ | PROT_EXEC);
		break;
	}
	default:
		_exit(0);
	}
	_exit(fd >= 0 ? 6 : 7);		/* not killed: the test fails */
}

static void
test_sandbox(void)
{
	static const char *const names[] = { "exit", "open", "openat",
	    "execve", "socket(AF_UNIX)", "socket(AF_INET6)",
	    "mmap(PROT_EXEC)", "mprotect(PROT_EXEC)", "mmap, munmap" };
	int	 what, status;
	pid_t	 pid;

	for (what = SB_EXIT; what < SB_STATUS; what++) {
		int	 allowed = what == SB_EXIT || what == SB_INET ||
		    what == SB_MMAP;

		if ((pid = fork()) == 0)
			sandbox_child(what);
		ok(pid > 0 && waitpid(pid, &status, 0) == pid, "fork, wait");
		if (allowed)
			ok(WIFEXITED(status) && WEXITSTATUS(status) == 0,
			    "sandbox allows %s (status %#x)", names[what],
			    status);
		else
			ok(WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS,
			    "sandbox kills %s with SIGSYS (status %#x)",
			    names[what], status);
	}
}

int
main(void)
{
	log_verbosity = -1;	/* quiet */
	test_skip_name();
	test_check_query();
	test_answer_and_errors();
	test_truncate();
	test_frames();
	test_idtab();
	test_config();
	test_cfg_parse();
	test_forward();
	test_tls_errors();
	test_learn();
	test_padding();
	test_cidr();
	test_acks();
	test_readme_options();
	test_embedded_anchors();
	test_cache();
	test_pins();
	test_sandbox();
	printf("unit: %d passed, %d failed\n", t_pass, t_fail);
	return t_fail != 0;
}
