/*
 * fuzz_query: the client query path. The input is one client message.
 * dns_check_query() classifies it; dotp answers a bad one with a header
 * only error (dns_make_error), and for a valid one computes the UDP limit,
 * may answer FORMERR/SERVFAIL with the question, and pads it before it
 * goes upstream (dns_pad_query). Each output is checked to parse, to keep
 * the question, and to stay in its buffer (exact-size mallocs).
 */
#define DOTP_NO_MAIN 1
#include "../../dotp.c"
#include "fuzz.h"

/* The error answer to m: header only (qi NULL) or with the question. */
static void
check_error(const unsigned char *m, size_t len, const struct qinfo *qi,
    int rcode)
{
	unsigned char *out = fz_alloc(DNS_UDP_MIN);
	size_t	 n, opt, qend = qi ? qi->qend : 0;
	unsigned nopt;
	uint16_t f;
	struct qinfo q2;
	int	 has_opt = qi ? qi->has_opt : 0;

	n = dns_make_error(m, len, qend, has_opt, rcode, out, DNS_UDP_MIN);
	if (len < DNS_HEADER_LEN) {
		CHECK(n == 0);
		free(out);
		return;
	}
	CHECK(n >= DNS_HEADER_LEN && n <= DNS_UDP_MIN);
	f = rd16(out + DNS_OFF_FLAGS);
	CHECK(memcmp(out, m, 2) == 0);			/* the client's ID */
	CHECK((f & DNS_FLAG_QR) && (f & 0xf) == rcode);
	CHECK(DNS_OPCODE(f) == DNS_OPCODE(rd16(m + DNS_OFF_FLAGS)));
	CHECK(fz_walk(out, n, &nopt, &opt) == n);
	CHECK(rd16(out + DNS_OFF_ANCOUNT) == 0 && rd16(out + DNS_OFF_NSCOUNT) == 0);
	if (qi == NULL) {
		CHECK(n == DNS_HEADER_LEN && rd16(out + DNS_OFF_QDCOUNT) == 0);
		free(out);
		return;
	}
	CHECK(rd16(out + DNS_OFF_QDCOUNT) == 1);
	CHECK(memcmp(out + DNS_HEADER_LEN, m + DNS_HEADER_LEN,
	    qend - DNS_HEADER_LEN) == 0);
	CHECK(nopt == (unsigned)has_opt);
	/* It answers the query, and with QR cleared dotp reads it as the
	 * same question. */
	CHECK(dns_check_answer(out, n, m, qend) == 1);
	out[DNS_OFF_FLAGS] &= 0x7f;
	CHECK(dns_check_query(out, n, &q2) == QC_OK);
	CHECK(q2.qend == qend && q2.has_opt == has_opt);
	free(out);
}

/* Options of the OPT RDATA [p, end): 1 well-formed and no padding,
 * 0 padding present, -1 malformed (an option runs past the end). */
static int
opt_options(const unsigned char *m, size_t p, size_t end)
{
	size_t	 olen;

	for (; p + 4 <= end; p += 4 + olen) {
		olen = rd16(m + p + 2);
		if (olen > end - p - 4)
			return -1;
		if (rd16(m + p) == DNS_OPT_PADDING)
			return 0;
	}
	return p == end ? 1 : -1;
}

/* Pads a copy of query m in a buffer of cap bytes and checks it. */
static void
check_pad(const unsigned char *m, size_t len, const struct qinfo *qi,
    size_t cap)
{
	unsigned char *buf = fz_alloc(cap), *again;
	size_t	 n, n2, base, opt, h, pad, i, optend = 0;
	unsigned nopt;
	enum pad_how added = PAD_NONE, added2 = PAD_NONE;
	int	 paddable;
	struct qinfo q2;

	memcpy(buf, m, len);
	n = dns_pad_query(buf, len, cap, qi, &added);
	CHECK(n >= len && n <= cap);
	/* What the contract says must be padded, given the room. */
	paddable = qi->end == len;
	if (qi->has_opt) {
		optend = qi->opt + 11 + rd16(m + qi->opt + 9);
		paddable = paddable && optend == len &&
		    opt_options(m, qi->opt + 11, len) == 1;
	} else {
		paddable = paddable && rd16(m + DNS_OFF_ARCOUNT) != 0xffff;
	}
	if (n == len) {
		/* Unchanged: not paddable, or no room for it. */
		CHECK(added == PAD_NONE);
		CHECK(memcmp(buf, m, len) == 0);
		CHECK(!paddable || cap < DOTP_QUERY_MAX + DOTP_PAD_ROOM);
		free(buf);
		return;
	}
	/* Padded: it had to be paddable (well-formed OPT options too). */
	CHECK(paddable);
	CHECK(n % DOTP_PAD_BLOCK == 0);
	CHECK(added == (qi->has_opt ? PAD_OPTION : PAD_ADDED_OPT));
	/* Header (ARCOUNT + added), question and the records before the
	 * OPT are as they were. */
	CHECK(memcmp(buf, m, DNS_OFF_ARCOUNT) == 0);
	CHECK(rd16(buf + DNS_OFF_ARCOUNT) ==
	    rd16(m + DNS_OFF_ARCOUNT) + (added == 2));
	base = qi->has_opt ? qi->opt : len;
	CHECK(memcmp(buf + DNS_HEADER_LEN, m + DNS_HEADER_LEN,
	    base - DNS_HEADER_LEN) == 0);
	/* A name that points into the header or OPT fields dotp rewrote
	 * (bogus compression, a client's own doing) now reads differently:
	 * what follows assumes the message still parses. */
	if (added == 2 ? fz_reads(m, len, DNS_OFF_ARCOUNT, DNS_HEADER_LEN) :
	    fz_reads(m, len, qi->opt + 9, qi->opt + 11)) {
		free(buf);
		return;
	}
	/* One OPT, the last record, ending at n. */
	CHECK(fz_walk(buf, n, &nopt, &opt) == n);
	CHECK(nopt == 1 && opt == base && buf[opt] == 0);
	CHECK((size_t)opt + 11 + rd16(buf + opt + 9) == n);
	if (qi->has_opt) {	/* name, type, class, TTL and options kept */
		CHECK(memcmp(buf + opt, m + opt, 9) == 0);
		CHECK(memcmp(buf + opt + 11, m + opt + 11, len - opt - 11) == 0);
		h = len;
	} else {		/* payload 1232, no flags, only the padding */
		CHECK(rd16(buf + opt + 3) == DNS_EDNS_UDP_MAX);
		CHECK(rd16(buf + opt + 5) == 0 && rd16(buf + opt + 7) == 0);
		h = len + 11;
	}
	/* The padding option: code 12, zeros, less than a block. */
	CHECK(h + 4 <= n && rd16(buf + h) == DNS_OPT_PADDING);
	pad = rd16(buf + h + 2);
	CHECK(h + 4 + pad == n && pad < DOTP_PAD_BLOCK);
	for (i = h + 4; i < n; i++)
		CHECK(buf[i] == 0);
	/* Still one well-formed question, the same one. */
	CHECK(dns_check_qname(buf, n, DNS_HEADER_LEN) + 4 == qi->qend);
	q2.qend = qi->qend;
	q2.end = n;
	q2.has_opt = 1;
	q2.opt = opt;
	q2.opt_end = n;
	q2.udp_size = rd16(buf + opt + 3);
	if (n <= DOTP_QUERY_MAX) {
		CHECK(dns_check_query(buf, n, &q2) == QC_OK);
		CHECK(q2.qend == qi->qend && q2.has_opt && q2.opt == opt &&
		    q2.end == n);
		CHECK(q2.udp_size == (qi->has_opt ? qi->udp_size :
		    DNS_EDNS_UDP_MAX));
	}
	/* Padding twice changes nothing (it has a padding option now). */
	again = fz_dup(buf, cap);
	n2 = dns_pad_query(again, n, cap, &q2, &added2);
	CHECK(n2 == n && added2 == 0 && memcmp(again, buf, n) == 0);
	/* What dotp strips from the answer (the OPT it added, or the
	 * padding option) taken off the query gives it back byte for byte. */
	n2 = added == 2 ? dns_strip_opt(again, n) :
	    dns_strip_padding(again, n);
	CHECK(n2 == len && memcmp(again, m, len) == 0);
	free(again);
	free(buf);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct qinfo qi;
	int	 r;
	uint16_t lim;

	memset(&qi, 0, sizeof qi);
	r = dns_check_query(data, size, &qi);
	if (r == QC_DROP) {
		CHECK(size < DNS_HEADER_LEN ||
		    (rd16(data + DNS_OFF_FLAGS) & DNS_FLAG_QR));
		return 0;
	}
	if (r != QC_OK) {
		CHECK(r == DNS_RCODE_FORMERR || r == DNS_RCODE_NOTIMP);
		check_error(data, size, NULL, r);
		return 0;
	}
	CHECK(size <= DOTP_QUERY_MAX);
	CHECK(qi.qend > DNS_HEADER_LEN + 4 && qi.qend <= qi.end &&
	    qi.end <= size);
	CHECK(qi.qend <= DNS_HEADER_LEN + DNS_NAME_MAX + 4);
	CHECK(!qi.has_opt || (qi.opt >= qi.qend && qi.opt + 11 <= qi.end));
	lim = dns_udp_limit(&qi, DNS_EDNS_UDP_MAX);
	CHECK(lim >= DNS_UDP_MIN && lim <= DNS_EDNS_UDP_MAX);
	CHECK(qi.has_opt || lim == DNS_UDP_MIN);
	check_error(data, size, &qi, DNS_RCODE_FORMERR);
	check_error(data, size, &qi, DNS_RCODE_SERVFAIL);
	/* The buffer dotp pads in, and a tighter one (no room). */
	check_pad(data, size, &qi, DOTP_QUERY_MAX + DOTP_PAD_ROOM);
	check_pad(data, size, &qi, size + data[1] % DOTP_PAD_ROOM);
	return 0;
}
