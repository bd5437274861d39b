/*
 * fuzz_answer: the answer path. The input is a 2-byte big-endian length
 * L, then L bytes of query (cut to what there is), then the answer.
 * A query that dns_check_query() refuses is replaced by a fixed valid
 * one, so that every input still exercises the answer side:
 * dns_check_answer(), dns_walk_records(), dns_strip_opt() and
 * dns_strip_padding() (on any input), and for an answer that matches,
 * what q_deliver() does: strip what dotp added to the query (nothing,
 * the padding, or the OPT), then dns_truncate() at 512, 1232, 4096 and
 * the query's UDP limits, with and without the OPT.
 */
#define DOTP_NO_MAIN 1
#include "../../dotp.c"
#include "fuzz.h"

/* The OPT record (root name, RFC 6891) that dotp may cut: in the
 * additional section, the last record, nothing after it:
 * its offset (0: none, or the message does not parse up to it) and *end,
 * just past it. */
static size_t
first_ar_opt(const unsigned char *m, size_t len, size_t *end)
{
	size_t	 pos, start, t;
	unsigned n, k, ar;

	if ((pos = dns_skip_questions(m, len)) == 0)
		return 0;
	n = (unsigned)rd16(m + DNS_OFF_ANCOUNT) + rd16(m + DNS_OFF_NSCOUNT);
	ar = rd16(m + DNS_OFF_ARCOUNT);
	for (k = 0; k < n + ar; k++) {
		start = pos;
		if ((pos = dns_skip_rr(m, len, pos, NULL, NULL)) == 0)
			return 0;
		t = dns_skip_name(m, len, start);
		if (k >= n && t == start + 1 && rd16(m + t) == DNS_TYPE_OPT) {
			/* dotp cuts only an OPT that is the last record with
			 * nothing after it (later names may point across). */
			if (k + 1 != n + ar || pos != len)
				return 0;
			*end = pos;
			return start;
		}
	}
	return 0;
}

/* dns_strip_opt() on a copy of a: returns the copy, its length in *sn. */
static unsigned char *
check_strip(const unsigned char *a, size_t alen, size_t *sn)
{
	unsigned char *s = fz_dup(a, alen);
	size_t	 n, fo, foend = 0, end, opt, send;
	unsigned nopt, snopt;

	n = dns_strip_opt(s, alen);
	*sn = n;
	CHECK(n <= alen);
	fo = first_ar_opt(a, alen, &foend);
	if (fo == 0) {		/* nothing to strip: unchanged */
		CHECK(n == alen && memcmp(s, a, alen) == 0);
		return s;
	}
	/* That record removed, ARCOUNT one less, all else in place. */
	CHECK(n == alen - (foend - fo));
	CHECK(memcmp(s, a, DNS_OFF_ARCOUNT) == 0);
	CHECK(rd16(s + DNS_OFF_ARCOUNT) + 1 == rd16(a + DNS_OFF_ARCOUNT));
	CHECK(memcmp(s + DNS_HEADER_LEN, a + DNS_HEADER_LEN,
	    fo - DNS_HEADER_LEN) == 0);
	CHECK(memcmp(s + fo, a + foend, alen - foend) == 0);
	/* A message that parsed still does, one OPT fewer, unless a name
	 * reads what changed (see fz_reads()). */
	if ((end = fz_walk(a, alen, &nopt, &opt)) != 0 &&
	    !fz_reads(a, alen, DNS_OFF_ARCOUNT, DNS_HEADER_LEN) &&
	    !fz_reads(a, alen, fo, alen)) {
		send = fz_walk(s, n, &snopt, &opt);
		CHECK(send == end - (foend - fo) && snopt + 1 == nopt);
	}
	return s;
}

/* dns_strip_padding() on a copy of a: returns the copy, its length in
 * *sn. */
static unsigned char *
check_strip_padding(const unsigned char *a, size_t alen, size_t *sn)
{
	unsigned char *s = fz_dup(a, alen);
	size_t	 n, fo, foend = 0, p, olen = 0, end, opt, send;
	unsigned nopt, snopt;

	n = dns_strip_padding(s, alen);
	*sn = n;
	CHECK(n <= alen);
	/* The first padding option of the OPT, if its options parse up to
	 * there. */
	fo = first_ar_opt(a, alen, &foend);
	p = foend;
	if (fo != 0)
		for (p = fo + 11; p + 4 <= foend; p += 4 + olen) {
			olen = rd16(a + p + 2);
			if (olen > foend - p - 4) {
				p = foend;
				break;
			}
			if (rd16(a + p) == DNS_OPT_PADDING)
				break;
		}
	if (fo == 0 || p + 4 > foend) {	/* none: unchanged */
		CHECK(n == alen && memcmp(s, a, alen) == 0);
		return s;
	}
	/* That option removed, the OPT's RDLENGTH lowered to match. */
	CHECK(n == alen - 4 - olen);
	CHECK(memcmp(s, a, fo + 9) == 0);
	CHECK(rd16(s + fo + 9) == rd16(a + fo + 9) - 4 - olen);
	CHECK(memcmp(s + fo + 11, a + fo + 11, p - fo - 11) == 0);
	CHECK(memcmp(s + p, a + p + 4 + olen, alen - p - 4 - olen) == 0);
	if ((end = fz_walk(a, alen, &nopt, &opt)) != 0 &&
	    !fz_reads(a, alen, fo + 9, fo + 11) && !fz_reads(a, alen, p, alen)) {
		send = fz_walk(s, n, &snopt, &opt);
		CHECK(send == end - 4 - olen && snopt == nopt);
	}
	return s;
}

/* Truncates the checked answer a for limit and checks the result. */
static void
check_truncate(const unsigned char *a, size_t alen, int keep_opt,
    size_t limit, const unsigned char *q, const struct qinfo *qi)
{
	unsigned char *out = fz_alloc(limit);
	size_t	 n, opt, aqend;
	unsigned nopt;
	uint16_t ar, qd = rd16(a + DNS_OFF_QDCOUNT);

	n = dns_truncate(a, alen, keep_opt, out, limit);
	CHECK(n >= DNS_HEADER_LEN && n <= limit);
	CHECK(memcmp(out, a, 2) == 0);
	CHECK(rd16(out + DNS_OFF_FLAGS) ==
	    (rd16(a + DNS_OFF_FLAGS) | DNS_FLAG_TC));
	CHECK(rd16(out + DNS_OFF_QDCOUNT) == qd);
	CHECK(rd16(out + DNS_OFF_ANCOUNT) == 0);
	CHECK(rd16(out + DNS_OFF_NSCOUNT) == 0);
	ar = rd16(out + DNS_OFF_ARCOUNT);
	/* It parses to its last byte, question first, at most the OPT. */
	CHECK(fz_walk(out, n, &nopt, &opt) == n);
	CHECK(nopt == ar && ar <= 1);
	CHECK(ar == 0 || keep_opt);
	/* The answer's OPT is kept when asked (it always fits 512). */
	aqend = qd ? dns_skip_name(a, alen, DNS_HEADER_LEN) + 4 :
	    DNS_HEADER_LEN;
	if (keep_opt && qd) {
		struct dns_rrs r;

		if (dns_walk_records(a, alen, aqend, &r) && r.opt)
			CHECK(ar == 1);
	}
	/* The client still gets an answer to its question. */
	CHECK(dns_check_answer(out, n, q, qi->qend) == 1);
	free(out);
}

/* Every truncation dotp may do of the checked answer a. */
static void
truncations(const unsigned char *a, size_t alen, const unsigned char *q,
    const struct qinfo *qi)
{
	/* The fixed limits, and the client's under --udp-size 1232 (the
	 * default) and 4096 (the largest). */
	size_t	 limits[5] = { DNS_UDP_MIN, DNS_EDNS_UDP_MAX,
	    DOTP_UDP_SIZE_MAX, 0, 0 };
	int	 i, keep;

	limits[3] = dns_udp_limit(qi, DNS_EDNS_UDP_MAX);
	limits[4] = dns_udp_limit(qi, DOTP_UDP_SIZE_MAX);
	for (i = 0; i < 5; i++)
		for (keep = 0; keep <= 1; keep++)
			if (alen > limits[i])
				check_truncate(a, alen, keep, limits[i], q, qi);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	unsigned char *q, *a, *s;
	size_t	 qlen, alen, sn, aqend, t, opt, lastopt, end;
	struct qinfo qi;
	unsigned nopt;
	int	 ok;

	if (size < 2)
		return 0;
	qlen = rd16(data);
	if (qlen > size - 2)
		qlen = size - 2;
	alen = size - 2 - qlen;
	q = fz_dup(data + 2, qlen);
	a = fz_dup(data + 2 + qlen, alen);
	if (dns_check_query(q, qlen, &qi) != QC_OK) {
		free(q);
		qlen = sizeof fixed_query;
		q = fz_dup(fixed_query, qlen);
		CHECK(dns_check_query(q, qlen, &qi) == QC_OK);
	}

	ok = dns_check_answer(a, alen, q, qi.qend);
	if (ok) {
		CHECK(alen >= DNS_HEADER_LEN);
		CHECK(rd16(a + DNS_OFF_FLAGS) & DNS_FLAG_QR);
		CHECK(rd16(a + DNS_OFF_QDCOUNT) == 1 ?
		    alen >= qi.qend : (rd16(a + DNS_OFF_FLAGS) & 0xf) != 0);
	}

	/* The OPT lookup, past the answer's question, as dns_truncate()
	 * does it: the last OPT of a message that parses, else 0. */
	if (alen >= DNS_HEADER_LEN && rd16(a + DNS_OFF_QDCOUNT) <= 1) {
		aqend = DNS_HEADER_LEN;
		if (rd16(a + DNS_OFF_QDCOUNT) == 1) {
			t = dns_skip_name(a, alen, DNS_HEADER_LEN);
			aqend = t && alen - t >= 4 ? t + 4 : 0;
		}
		if (aqend) {
			struct dns_rrs r;

			opt = dns_walk_records(a, alen, aqend, &r) ? r.opt : 0;
			end = fz_walk(a, alen, &nopt, &lastopt);
			CHECK((r.end != 0) == (end != 0));
			CHECK(end == 0 || r.nopt == nopt);
			/* The root's OPT in the additional section, if any. */
			CHECK(opt == 0 || (opt >= aqend && opt + 11 <= alen &&
			    a[opt] == 0 && rd16(a + opt + 1) == DNS_TYPE_OPT));
			CHECK(opt == 0 || opt == lastopt || r.nopt > 1);
		}
	}

	/* q_deliver(): as is, without the OPT dotp added, or without the
	 * padding it added to the client's OPT; then truncated. */
	if (ok)
		truncations(a, alen, q, &qi);
	s = check_strip(a, alen, &sn);
	if (ok) {
		CHECK(dns_check_answer(s, sn, q, qi.qend) == 1);
		truncations(s, sn, q, &qi);
	}
	free(s);
	s = check_strip_padding(a, alen, &sn);
	if (ok) {
		CHECK(dns_check_answer(s, sn, q, qi.qend) == 1);
		truncations(s, sn, q, &qi);
	}
	free(s);
	free(a);
	free(q);
	return 0;
}
