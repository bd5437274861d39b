/*
 * fuzz_cache: upstream answers through the real answer path into the
 * cache and back out. The input is a 2-byte big-endian length L, then L
 * bytes of query (a fixed one replaces a query dns_check_query()
 * refuses), then the upstream's answer, whose ID is set to the query's
 * so that the question check is what decides. The query is put on the
 * wire of a connection as the engine does (Q_SENT), the answer goes to
 * conn_answer(): the question check, q_deliver(), the cache insert.
 * Checked: an answer that fails dns_check_answer() never enters the
 * cache; an entry replays (at any age, fresh or stale) into a message
 * that parses, answers the same question, and has no TTL above the
 * upstream's. The cache lives on across inputs, so evictions, pending
 * markers and replacements are exercised too.
 */
#define DOTP_NO_MAIN 1
#include "../../dotp.c"
#include "fuzz.h"

/* The engine state the answer path needs: a query table, one upstream
 * with one connection, the cache (the minimum budget, so it fills). */
static void
fz_setup(void)
{
	static int done;

	if (done++)
		return;
	log_verbosity = -1;
	G.cfg.max_conns = 1;
	G.cfg.conn_queries = DOTP_CONN_QUERIES;
	G.cfg.timeout_ms = DOTP_TIMEOUT_MS;
	G.cfg.udp_size = DNS_EDNS_UDP_MAX;
	G.cfg.cache_max_ttl = DOTP_CACHE_MAX_TTL;
	G.cfg.cache_neg_ttl = DOTP_CACHE_NEG_TTL;
	G.cfg.serve_stale = 3600;
	G.nup = 1;
	G.up[0].tx = (struct qlist)QLIST_ZERO;
	G.nconn = 1;
	G.conn = calloc(1, sizeof *G.conn);
	if (G.conn == NULL || q_init(64) < 0 ||
	    cache_init(DOTP_CACHE_SIZE_MIN) < 0)
		abort();
	G.conn[0].fd = -1;
	G.conn[0].state = C_READY;
	G.conn[0].fl = G.conn[0].late = (struct qlist)QLIST_ZERO;
}

/* The TTLs of the records of a (answer, authority, additional) into
 * t[], at most max, with opt[i] set for an OPT. Returns how many. */
static unsigned
fz_ttls(const unsigned char *a, size_t len, size_t qend, uint32_t *t,
    int *opt, unsigned max)
{
	unsigned n = (unsigned)rd16(a + DNS_OFF_ANCOUNT) +
	    rd16(a + DNS_OFF_NSCOUNT) + rd16(a + DNS_OFF_ARCOUNT), i, type;
	size_t	 pos = rd16(a + DNS_OFF_QDCOUNT) ? qend : DNS_HEADER_LEN, rr;

	for (i = 0; i < n && i < max; i++) {
		rr = dns_skip_name(a, len, pos);
		CHECK(rr != 0);
		pos = dns_skip_rr(a, len, pos, &type, NULL);
		CHECK(pos != 0);
		t[i] = rd32(a + rr + DNS_RR_TTL);
		opt[i] = type == DNS_TYPE_OPT;
	}
	return i;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const struct client none = { .kind = CK_NONE };
	static unsigned char out[DOTP_CACHE_ANSWER_MAX], copy[DNS_MSG_MAX];
	static int64_t now = 1000000;
	struct conn *c;
	struct qinfo qi;
	struct ckey k;
	struct centry *e;
	const unsigned char *q, *ans;
	unsigned char *a;
	size_t	 ql, al, n;
	uint32_t before[64], after[64];
	int	 isopt[64], isopt2[64];
	unsigned nb, na, j;
	int	 i, ck, good;

	fz_setup();
	c = &G.conn[0];
	now += 997;		/* time moves: entries age, expire, go stale */
	if (size < 2)
		return 0;
	ql = rd16(data);
	if (ql > size - 2)
		ql = size - 2;
	q = data + 2;
	ans = data + 2 + ql;
	al = size - 2 - ql;
	if (al < DNS_HEADER_LEN || al > DNS_MSG_MAX)
		return 0;
	if (dns_check_query(q, ql, &qi) != QC_OK) {
		q = fixed_query;
		ql = sizeof fixed_query;
		CHECK(dns_check_query(q, ql, &qi) == QC_OK);
	}
	if ((ck = cache_key(q, qi.qend, qi.opt, qi.opt_end, &k)) < 0)
		return 0;	/* ECS: bypasses the cache */
	if ((i = q_start(q, ql, &qi, &none, now)) < 0)
		abort();
	/* q_lead without the upstream: a pending marker, then the wire. */
	G.q[i].ck = (uint8_t)ck;
	G.q[i].chash = k.hash;
	G.q[i].lead = 1;
	cache_put(&k, NULL, 0, 0, i, now);
	G.q[i].state = Q_SENT;
	G.q[i].conn = 0;
	G.q[i].gen = c->gen;
	G.q[i].tries = 1;
	qlist_push(&c->fl, i, QL_MAIN);
	a = fz_dup(ans, al);
	wr16(a, G.q[i].up_id);
	good = dns_check_answer(a, al, G.q[i].qbuf, G.q[i].qend);
	memcpy(copy, a, al);
	e = cache_lookup(&k, 0);
	if (e != NULL) {	/* an older entry for the key: set it apart */
		cache_unlink(e);
	}
	conn_answer(c, a, al, now);
	if (G.q[i].state != Q_FREE) {	/* refused: it waits no more */
		CHECK(!good);
		q_unlink(i);
		q_servfail(i, now, CTR_SERVFAIL_DEADLINE);
	}
	e = cache_lookup(&k, 0);
	/* Nothing that failed the question check is ever kept; what
	 * passed it with a lifetime is. */
	CHECK(good || e == NULL);
	CHECK(!good || cache_lifetime(copy, al, qi.qend) == 0 || e != NULL);
	CHECK(cache_lookup(&k, 1) == NULL);	/* the marker went */
	if (e == NULL) {
		free(a);
		return 0;
	}
	/* What is kept replays into a message that parses, answers the
	 * same question, and lowers TTLs, fresh or stale. */
	nb = fz_ttls(ce_answer(e), e->alen, qi.qend, before, isopt, 64);
	for (j = 0; j < 3; j++) {
		int64_t	 at = now + (int64_t)j * 1500000;
		int	 stale = !ce_fresh(e, at);
		unsigned m;

		n = cache_replay(e, qi.qend, at, stale, out);
		CHECK(n == e->alen && n >= DNS_HEADER_LEN);
		CHECK(dns_walk_records(out, n, rd16(out + DNS_OFF_QDCOUNT) ?
		    qi.qend : DNS_HEADER_LEN, &(struct dns_rrs){0}));
		CHECK(dns_check_answer(out, n, q, qi.qend) == 1);
		na = fz_ttls(out, n, qi.qend, after, isopt2, 64);
		CHECK(na == nb);
		for (m = 0; m < na; m++) {
			CHECK(isopt[m] == isopt2[m]);
			if (isopt[m])		/* OPT: as it was */
				CHECK(after[m] == before[m]);
			else if (stale)
				CHECK(after[m] == DOTP_STALE_TTL);
			else
				CHECK(after[m] <= before[m]);
		}
	}
	free(a);
	return 0;
}
