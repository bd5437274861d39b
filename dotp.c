/*
 * dotp - a DNS to DNS-over-TLS proxy.
 *
 * dotp listens for plain DNS on UDP and TCP and forwards every query over
 * one persistent, verified, pipelined TLS connection (RFC 7858) to an
 * upstream resolver, then returns the answer to the client that asked.
 * It is one C file, one poll() loop, statically linked with musl and
 * BearSSL, with the CA trust anchors compiled in.
 *
 * DATA FLOW
 *
 *   client (UDP datagram or TCP frame)
 *     -> dns_check_query()            validate once, at the boundary
 *     -> q_new()                      copy into a query slot, draw a
 *                                     random upstream ID, start deadline
 *     -> up_enqueue()                 tx list of the chosen upstream
 *     -> up_pump() SENDAPP            every queued frame is injected into
 *                                     the TLS engine, then one flush: the
 *                                     queries ready in one pass travel in
 *                                     one TLS record and one send()
 *     -> upstream answers, any order
 *     -> up_pump() RECVAPP            frames reassembled, q_find(ID)
 *     -> dns_check_answer()           same question as the query
 *     -> q_deliver()                  client ID restored, truncated for
 *                                     UDP if needed, sent; slot freed
 *
 * OBJECTS AND OWNERSHIP
 *
 *   struct query     one per client question in flight; fixed table
 *                    G.q[], free list, never malloc'd per query. A query
 *                    is in exactly one list of one upstream (tx: waiting
 *                    to be injected; fl: committed to the TLS session of
 *                    generation sent_gen), and in the global age list,
 *                    ordered by deadline.
 *   struct upstream  one per -u; owns its socket, BearSSL context and
 *                    buffers, and the frame assembler for its answers.
 *   struct tcpclient one per accepted TCP client; owns its socket, its
 *                    input assembler and a bounded output buffer.
 *   struct listener  one per -l; a UDP socket and a TCP listening socket.
 *
 * INVARIANTS
 *
 *   - Bytes acked into the engine's SENDAPP buffer are committed to that
 *     TLS session. A query is injected whole or not at all, so a query is
 *     either QUEUED (not on the wire) or SENT (on generation sent_gen).
 *   - When a connection ends, every SENT and QUEUED query on it is moved
 *     to another upstream (or the same one after a clean close) or, when
 *     its tries or its deadline are spent, answered SERVFAIL. Every
 *     client query gets exactly one answer, or is dropped only when it
 *     was not DNS at all.
 *   - Upstream IDs are drawn from getrandom() and unique among all live
 *     queries; an answer is accepted only for an ID in flight on the
 *     connection it came from, with the same question.
 *   - Deadlines use CLOCK_MONOTONIC; all queries share one timeout, so
 *     the age list is sorted by deadline and expiry is O(1) per query.
 *   - Every length read off the wire is checked once, where it enters.
 *
 * BUILD AND TEST: `make` (static musl + BearSSL), `make test`.
 */

/* ==== 1. Feature macros and includes ==== */

#define _GNU_SOURCE	/* accept4, SOCK_NONBLOCK, getrandom, MSG_NOSIGNAL */

#include <sys/types.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bearssl.h"

#ifndef DOTP_VERSION
#define DOTP_VERSION "0.1.0"
#endif

/* ==== 2. Tunables ==== */

/*
 * Each limit is a named constant with its reason. They bound memory:
 * every table below is allocated once, in BSS, and pages that are never
 * touched cost no RSS.
 */

/* Largest DNS message (the TCP length prefix is 16 bits). */
#define DNS_MSG_MAX		65535
/* A TCP or TLS frame: 2-byte length plus the message. */
#define DOTP_FRAME_MAX		(2 + DNS_MSG_MAX)
/* Largest query accepted from a client. A question is at most 12 + 255
 * + 4 bytes; an OPT record with cookies, client subnet and padding adds
 * a few hundred. Larger "queries" are not queries: FORMERR. */
#define DOTP_QUERY_MAX		1024
/* Query slots: queries waiting for an answer, all clients together.
 * Over it new queries get SERVFAIL at once (never unbounded memory). */
#define DOTP_MAX_QUERIES	4096
/* ID lookup table: open addressing, load factor at most 1/2. */
#define DOTP_IDTAB_SIZE		(2 * DOTP_MAX_QUERIES)
#define DOTP_MAX_LISTEN		16
#define DOTP_MAX_UPSTREAMS	8
/* Concurrent TCP clients; when full, new connections are closed at once
 * (the client falls back or retries; existing clients are not hurt). */
#define DOTP_MAX_TCP		256
/* Queries one TCP client may have outstanding before dotp stops reading
 * from it (back-pressure, not an error). */
#define DOTP_TCP_PIPELINE	256
/* Answers queued for a TCP client that does not read, before dotp cuts
 * it off: four maximal answers. */
#define DOTP_TCP_OUT_MAX	(4 * DOTP_FRAME_MAX)
/* A TCP client with nothing outstanding is closed after this (RFC 7766
 * 6.2.3 suggests seconds, not minutes). */
#define DOTP_TCP_IDLE_MS	10000
/* Default per-query timeout: below the 5 s of the usual stub resolvers
 * (glibc, musl, dig), so the client gets a definite SERVFAIL before it
 * gives up, and long enough for a fresh TCP + TLS handshake and a retry
 * on a second upstream over a slow path. */
#define DOTP_TIMEOUT_MS		3000
/* A TCP connect plus the TLS handshake must finish within this. */
#define DOTP_HANDSHAKE_MS	2000
/* An upstream connection with nothing in flight is closed after this;
 * public resolvers close idle DoT connections after about 10 s anyway. */
#define DOTP_UP_IDLE_MS		30000
/* Back-off after a failed connection: doubling from 1 s to 60 s. */
#define DOTP_BACKOFF_MIN_MS	1000
#define DOTP_BACKOFF_MAX_MS	60000
/* A query is sent at most this many times (first send plus resends after
 * a connection died under it). */
#define DOTP_MAX_TRIES		3
/* Longest poll() sleep: deadlines are re-checked at least this often. */
#define DOTP_MAX_SLEEP_MS	1000
/* Datagrams read from one UDP socket per wake-up, for fairness. */
#define DOTP_UDP_BATCH		64
/* --ca-file size bound: the whole Mozilla set is about 220 KB. */
#define DOTP_CA_FILE_MAX	(4 * 1024 * 1024)
#define DOTP_MAX_ANCHORS	1024

/* DNS wire format. */
#define DNS_HEADER_LEN		12
#define DNS_OFF_ID		0
#define DNS_OFF_FLAGS		2
#define DNS_OFF_QDCOUNT		4
#define DNS_OFF_ANCOUNT		6
#define DNS_OFF_NSCOUNT		8
#define DNS_OFF_ARCOUNT		10
#define DNS_FLAG_QR		0x8000
#define DNS_FLAG_TC		0x0200
#define DNS_FLAG_RD		0x0100
#define DNS_FLAG_RA		0x0080
#define DNS_OPCODE(f)		(((f) >> 11) & 0xf)
#define DNS_RCODE_FORMERR	1
#define DNS_RCODE_SERVFAIL	2
#define DNS_RCODE_NOTIMP	4
#define DNS_TYPE_OPT		41
#define DNS_NAME_MAX		255
#define DNS_UDP_MIN		512	/* RFC 1035 limit without EDNS(0) */
#define DNS_EDNS_UDP_MAX	1232	/* DNS Flag Day 2020: no fragments */

/* ==== 3. Types ==== */

enum log_level { LOG_ERR, LOG_WARN, LOG_INFO, LOG_DEBUG };

/* Outcome of validating a client query: drop it, forward it, or answer
 * it at once with an RCODE. */
enum qcheck { QC_DROP = -1, QC_OK = 0 };

/* What dns_check_query() learns about a valid query. */
struct qinfo {
	size_t	 qend;		/* offset just past QTYPE/QCLASS */
	int	 has_opt;	/* client sent an OPT record */
	uint16_t udp_size;	/* its advertised payload size */
};

/*
 * A client address: where an answer goes.
 * UDP: the listener's socket and the peer's address.
 * TCP: an index into G.tcp and the generation of that slot; a client
 * that went away (generation moved on) silently loses its answers.
 */
enum client_kind { CK_UDP, CK_TCP };
struct client {
	uint8_t	 kind;		/* enum client_kind */
	uint16_t idx;		/* listener index (UDP) or tcp slot (TCP) */
	uint32_t gen;		/* TCP slot generation */
	socklen_t peerlen;	/* UDP only */
	union {
		struct sockaddr		sa;
		struct sockaddr_in	sin;
		struct sockaddr_in6	sin6;
	} peer;
};

/*
 * struct query: one client question waiting for its answer.
 * Owns: a copy of the client's query, whose ID bytes hold the upstream
 * ID while the slot lives (the client's ID is kept in client_id).
 * Invariants: state Q_FREE slots are only on the free list; a live slot
 * is on the age list and on exactly one list (tx or fl) of upstream up;
 * its up_id is in the ID table.
 */
enum qstate { Q_FREE, Q_QUEUED, Q_SENT };
struct query {
	uint8_t	 state;		/* enum qstate */
	uint8_t	 tries;		/* times injected into a TLS session */
	uint8_t	 up;		/* upstream index */
	uint16_t client_id;	/* ID the client used */
	uint16_t up_id;		/* ID on the wire upstream */
	uint16_t udp_limit;	/* largest answer the client can take */
	uint16_t qlen;		/* bytes in qbuf */
	uint16_t qend;		/* end of the question in qbuf */
	uint8_t	 has_opt;	/* client sent OPT (kept when truncating) */
	uint32_t sent_gen;	/* upstream generation it was sent on */
	int	 prev, next;	/* upstream tx/fl list, or free list */
	int	 aprev, anext;	/* age list (deadline order) */
	int64_t	 deadline;	/* SERVFAIL at this time */
	struct client cl;
	unsigned char qbuf[DOTP_QUERY_MAX];
};

/* A doubly linked list of query slots, by index; -1 ends it. */
struct qlist {
	int	 head, tail;
	unsigned n;
};
#define QLIST_ZERO	{ -1, -1, 0 }

/* Reassembles 2-byte-length-prefixed frames from a byte stream. */
struct frame_rx {
	size_t	 have;		/* bytes in buf */
};

/*
 * struct upstream: one configured resolver and its TLS connection.
 * Owns: fd, the BearSSL client context and its two buffers, the answer
 * assembler rx[], the tx list (queries waiting to be injected) and the
 * fl list (queries on the wire of the current generation).
 *
 *   UP_IDLE       fd == -1; fl is empty.
 *   UP_CONNECTING fd open, connect() in progress; the engine was reset
 *                 and holds the ClientHello; deadline = handshake limit.
 *   UP_HANDSHAKE  connected; the engine has not yet offered SENDAPP.
 *   UP_READY      the handshake completed; frames flow both ways.
 *   UP_BACKOFF    fd == -1 after a failure; fl is empty; deadline is the
 *                 earliest time of the next attempt.
 *
 * generation increments at every connect, so a query's sent_gen tells
 * whether it is on the current session.
 */
enum up_state { UP_IDLE, UP_CONNECTING, UP_HANDSHAKE, UP_READY, UP_BACKOFF };
struct upstream {
	char	 label[64];	/* "ADDR:PORT" for logs */
	char	 name[256];	/* name the certificate must carry (SNI) */
	union {
		struct sockaddr		sa;
		struct sockaddr_in	sin;
		struct sockaddr_in6	sin6;
	} addr;
	socklen_t addrlen;
	int	 fd;
	enum up_state state;
	uint32_t gen;		/* connection generation */
	int64_t	 deadline;	/* handshake, or back-off end */
	int64_t	 last_active;	/* for the idle close */
	int64_t	 failed_at;	/* last failure, for least-recently-failed */
	int	 backoff_ms;	/* current back-off, 0 when healthy */
	int	 down;		/* logged as down; log recovery once */
	struct qlist tx, fl;
	br_ssl_client_context cc;
	br_x509_minimal_context xc;
	unsigned char ibuf[BR_SSL_BUFSIZE_INPUT];
	unsigned char obuf[BR_SSL_BUFSIZE_OUTPUT];
	struct frame_rx rxa;
	unsigned char rx[DOTP_FRAME_MAX];
};

/*
 * struct tcpclient: one accepted TCP client.
 * Owns: fd, its input assembler, and out (malloc'd on first need, at
 * most DOTP_TCP_OUT_MAX bytes, freed when the client goes).
 * Invariant: fd == -1 iff the slot is free; gen moves on at every close.
 */
struct tcpclient {
	int	 fd;
	uint32_t gen;
	int	 eof;		/* client shut its side: close when done */
	unsigned pending;	/* queries not yet answered */
	int64_t	 idle_since;	/* last time pending and out became empty */
	struct frame_rx rxa;
	unsigned char rx[2 + DOTP_QUERY_MAX];
	unsigned char *out;	/* queued answer frames */
	size_t	 out_len, out_off, out_cap;
};

/* struct listener: one -l address; UDP and TCP sockets on it. */
struct listener {
	char	 label[64];
	int	 udp, tcp;
};

/* One parsed socket address with its text form. */
struct sockaddr_text {
	union {
		struct sockaddr		sa;
		struct sockaddr_in	sin;
		struct sockaddr_in6	sin6;
	} u;
	socklen_t len;
	char	 text[64];
};

struct config {
	struct sockaddr_text listen[DOTP_MAX_LISTEN];
	int	 nlisten;
	struct sockaddr_text up[DOTP_MAX_UPSTREAMS];
	char	 up_name[DOTP_MAX_UPSTREAMS][256];
	int	 nup;
	const char *ca_file;
	int	 timeout_ms;
	int	 verbosity;	/* enum log_level: the highest printed */
};

/* The whole process state (kilo's E). */
struct dotp {
	struct config cfg;
	const br_x509_trust_anchor *tas;
	size_t	 ntas;
	int	 nlisten;
	struct listener lst[DOTP_MAX_LISTEN];
	int	 nup;
	struct upstream up[DOTP_MAX_UPSTREAMS];
	struct tcpclient tcp[DOTP_MAX_TCP];
	unsigned ntcp;
	struct query q[DOTP_MAX_QUERIES];
	int	 qfree;		/* free list head */
	unsigned qlive;
	struct qlist age;	/* live queries, oldest first */
	uint16_t idtab[DOTP_IDTAB_SIZE];	/* slot + 1, 0 = empty */
	unsigned char rnd[64];	/* getrandom() pool for IDs */
	size_t	 rnd_left;
	int	 kick;		/* an upstream has work: poll without sleep */
	struct {		/* counters, logged at exit */
		unsigned long queries, answers, servfail, dropped;
		unsigned long stray, udp_send_fail, tcp_refused;
	} st;
};

/* ==== 4. Globals ==== */

static volatile sig_atomic_t got_signal;
static struct dotp G;
static int log_verbosity = LOG_INFO;

/* ==== 5. Prototypes ==== */

static void	log_msg(enum log_level, const char *, ...)
		    __attribute__((format(printf, 2, 3)));
static void	q_retry(int, int);
static void	q_servfail(int);

/* ==== 6. Utilities ==== */

/* Logs one line, "level=X msg=\"...\"", to stderr; keeps errno. */
static void
log_msg(enum log_level lvl, const char *fmt, ...)
{
	static const char *names[] = { "error", "warn", "info", "debug" };
	char	 line[512];
	va_list	 ap;
	int	 n, saved = errno;

	if ((int)lvl > log_verbosity)
		return;
	n = snprintf(line, sizeof line, "level=%s msg=\"", names[lvl]);
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof line - 3)
		n = (int)sizeof line - 3;
	line[n++] = '"';
	line[n++] = '\n';
	(void)!write(2, line, (size_t)n);
	errno = saved;
}

/* Milliseconds of CLOCK_MONOTONIC. */
static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint16_t
rd16(const unsigned char *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void
wr16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
}

/* Fills buf from getrandom(). Returns 0, or -1 with errno set. */
static int
fill_random(void *buf, size_t len)
{
	unsigned char *p = buf;
	ssize_t	 n;

	while (len > 0) {
		n = getrandom(p, len, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void
set_nodelay(int fd)
{
	int	 one = 1;

	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Closes fd if open and sets it to -1; keeps errno. */
static void
fd_close(int *fd)
{
	int	 saved = errno;

	if (*fd >= 0)
		close(*fd);
	*fd = -1;
	errno = saved;
}

/* Copies the string src into dst of size len (len > 0), cutting it. */
static void
str_copy(char *dst, size_t len, const char *src)
{
	size_t	 n = strnlen(src, len - 1);

	memmove(dst, src, n);
	dst[n] = '\0';
}

/* Formats an address as "1.2.3.4:53" or "[::1]:53". */
static void
addr_text(const struct sockaddr *sa, char *buf, size_t len)
{
	char	 host[INET6_ADDRSTRLEN];

	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const void *)sa;
		inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
		snprintf(buf, len, "[%s]:%u", host, ntohs(s6->sin6_port));
	} else {
		const struct sockaddr_in *s4 = (const void *)sa;
		inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
		snprintf(buf, len, "%s:%u", host, ntohs(s4->sin_port));
	}
}

/* ==== 7. DNS wire format ==== */

/*
 * Pure functions over byte buffers: no I/O, no globals. Parsers return
 * the offset just past what they read, or 0 when the input is bad (0 is
 * never a valid offset past the header). This is the fuzz target.
 */

/* Skips a possibly compressed name at pos. Returns the offset after it,
 * or 0. Pointers must point strictly backwards (which also ends loops),
 * labels are 1..63 bytes, the expanded name is at most 255 bytes. */
static size_t
dns_skip_name(const unsigned char *m, size_t len, size_t pos)
{
	size_t	 end = 0, total = 1, p = pos, limit = pos;
	unsigned c;

	for (;;) {
		if (p >= len)
			return 0;
		c = m[p];
		if (c == 0)
			return end ? end : p + 1;
		if ((c & 0xc0) == 0xc0) {
			size_t ptr;

			if (p + 1 >= len)
				return 0;
			ptr = (size_t)(c & 0x3f) << 8 | m[p + 1];
			if (!end)
				end = p + 2;
			if (ptr >= limit)
				return 0;
			limit = ptr;
			p = ptr;
			continue;
		}
		if (c & 0xc0)
			return 0;	/* 0x40 and 0x80: not DNS labels */
		total += c + 1;
		if (total > DNS_NAME_MAX)
			return 0;
		p += c + 1;
	}
}

/* Checks an uncompressed question name at pos (a query has nothing to
 * point back to). Returns the offset after it, or 0. */
static size_t
dns_check_qname(const unsigned char *m, size_t len, size_t pos)
{
	size_t	 total = 1;
	unsigned c;

	for (;;) {
		if (pos >= len)
			return 0;
		c = m[pos];
		if (c == 0)
			return pos + 1;
		if (c & 0xc0)
			return 0;
		total += c + 1;
		if (total > DNS_NAME_MAX)
			return 0;
		pos += c + 1;
	}
}

/* Skips one resource record. Returns the offset after it, or 0. If the
 * record is an OPT, *opt is set to its offset. */
static size_t
dns_skip_rr(const unsigned char *m, size_t len, size_t pos, size_t *opt)
{
	size_t	 start = pos, rdlen;

	pos = dns_skip_name(m, len, pos);
	if (pos == 0 || len - pos < 10)
		return 0;
	rdlen = rd16(m + pos + 8);
	if (rd16(m + pos) == DNS_TYPE_OPT && opt != NULL)
		*opt = start;
	pos += 10;
	if (rdlen > len - pos)
		return 0;
	return pos + rdlen;
}

/* Finds the OPT record of a message whose question ends at qend.
 * Returns its offset, or 0 if there is none or the message is bad. */
static size_t
dns_find_opt(const unsigned char *m, size_t len, size_t qend)
{
	size_t	 pos = qend, opt = 0;
	unsigned n;

	n = (unsigned)rd16(m + DNS_OFF_ANCOUNT) + rd16(m + DNS_OFF_NSCOUNT) +
	    rd16(m + DNS_OFF_ARCOUNT);
	while (n-- > 0) {
		pos = dns_skip_rr(m, len, pos, &opt);
		if (pos == 0)
			return 0;
	}
	return opt;
}

/*
 * Validates a client query, once, where it enters.
 * Returns QC_DROP (not a query: too short, or a response), QC_OK with
 * *qi filled, or an RCODE to answer with (FORMERR: not exactly one
 * well-formed question, or a malformed record; NOTIMP: an opcode other
 * than QUERY, which DoT upstreams would not serve consistently).
 */
static int
dns_check_query(const unsigned char *m, size_t len, struct qinfo *qi)
{
	uint16_t flags;
	size_t	 pos, opt = 0;
	unsigned n;

	if (len < DNS_HEADER_LEN)
		return QC_DROP;
	flags = rd16(m + DNS_OFF_FLAGS);
	if (flags & DNS_FLAG_QR)
		return QC_DROP;
	if (DNS_OPCODE(flags) != 0)
		return DNS_RCODE_NOTIMP;
	if (rd16(m + DNS_OFF_QDCOUNT) != 1 || len > DOTP_QUERY_MAX)
		return DNS_RCODE_FORMERR;
	pos = dns_check_qname(m, len, DNS_HEADER_LEN);
	if (pos == 0 || len - pos < 4)
		return DNS_RCODE_FORMERR;
	qi->qend = pos + 4;
	pos = qi->qend;
	n = (unsigned)rd16(m + DNS_OFF_ANCOUNT) + rd16(m + DNS_OFF_NSCOUNT) +
	    rd16(m + DNS_OFF_ARCOUNT);
	while (n-- > 0) {
		pos = dns_skip_rr(m, len, pos, &opt);
		if (pos == 0)
			return DNS_RCODE_FORMERR;
	}
	qi->has_opt = opt != 0;
	qi->udp_size = 0;
	if (opt) {
		/* OPT's CLASS is the payload size; name is the root. */
		size_t t = dns_skip_name(m, len, opt);
		qi->udp_size = rd16(m + t + 2);
	}
	return QC_OK;
}

/* The largest UDP answer a client may get: 512 without EDNS(0), else
 * what it advertised, capped by cap, and never below 512. */
static uint16_t
dns_udp_limit(const struct qinfo *qi, uint16_t cap)
{
	uint16_t sz;

	if (!qi->has_opt)
		return DNS_UDP_MIN;
	sz = qi->udp_size < cap ? qi->udp_size : cap;
	return sz < DNS_UDP_MIN ? DNS_UDP_MIN : sz;
}

/* Lower-case ASCII only: DNS names compare without locale. */
static unsigned
dns_lower(unsigned c)
{
	return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

/*
 * Checks that an answer is a response to the stored query q[0..qend):
 * QR set, and the same question (name compared without case, type and
 * class equal). An answer with no question is accepted only with an
 * error RCODE (servers may omit it on FORMERR/NOTIMP).
 * Returns 1 if it matches, 0 if not.
 */
static int
dns_check_answer(const unsigned char *a, size_t alen,
    const unsigned char *q, size_t qend)
{
	size_t	 i, qlen = qend - DNS_HEADER_LEN;
	uint16_t flags;

	if (alen < DNS_HEADER_LEN)
		return 0;
	flags = rd16(a + DNS_OFF_FLAGS);
	if (!(flags & DNS_FLAG_QR))
		return 0;
	if (rd16(a + DNS_OFF_QDCOUNT) == 0)
		return (flags & 0xf) != 0;
	if (rd16(a + DNS_OFF_QDCOUNT) != 1 || alen - DNS_HEADER_LEN < qlen)
		return 0;
	/* The query's name is uncompressed and validated; an answer that
	 * compresses its question name differs here, and is refused. */
	for (i = DNS_HEADER_LEN; i < qend; i++)
		if (dns_lower(a[i]) != dns_lower(q[i]))
			return 0;
	return 1;
}

/*
 * Builds an answer with rcode to the query q (len bytes, question ending
 * at qend, or 0 if the question is unusable) into out (outlen >= 512).
 * Keeps the ID, opcode and RD; adds an OPT record if the query had one.
 * Returns its length, or 0 if the query has no header to echo.
 */
static size_t
dns_make_error(const unsigned char *q, size_t len, size_t qend,
    int has_opt, int rcode, unsigned char *out, size_t outlen)
{
	uint16_t flags;
	size_t	 n = DNS_HEADER_LEN;

	if (len < DNS_HEADER_LEN || outlen < DNS_UDP_MIN)
		return 0;
	if (qend > DNS_HEADER_LEN + DNS_NAME_MAX + 4)
		qend = 0;	/* can't happen for a checked query */
	flags = rd16(q + DNS_OFF_FLAGS);
	memcpy(out, q, 2);
	wr16(out + DNS_OFF_FLAGS, (uint16_t)(DNS_FLAG_QR |
	    (flags & (0x7800 | DNS_FLAG_RD)) | DNS_FLAG_RA | (rcode & 0xf)));
	wr16(out + DNS_OFF_QDCOUNT, qend ? 1 : 0);
	wr16(out + DNS_OFF_ANCOUNT, 0);
	wr16(out + DNS_OFF_NSCOUNT, 0);
	wr16(out + DNS_OFF_ARCOUNT, qend && has_opt ? 1 : 0);
	if (qend) {
		memcpy(out + n, q + DNS_HEADER_LEN, qend - DNS_HEADER_LEN);
		n = qend;
		if (has_opt) {
			static const unsigned char opt[11] = {
				0, 0, DNS_TYPE_OPT,
				DNS_EDNS_UDP_MAX >> 8, DNS_EDNS_UDP_MAX & 0xff,
				0, 0, 0, 0, 0, 0
			};
			memcpy(out + n, opt, sizeof opt);
			n += sizeof opt;
		}
	}
	return n;
}

/*
 * Truncates an answer a (alen bytes, already checked) for a UDP client
 * whose limit is smaller than alen: header with TC set, the question,
 * and the answer's OPT record if the client sent one (without its
 * options if they would not fit). Writes into out (outlen >= limit).
 * Returns the new length; at most limit, which is at least 512.
 */
static size_t
dns_truncate(const unsigned char *a, size_t alen, int keep_opt,
    unsigned char *out, size_t limit)
{
	size_t	 qend = DNS_HEADER_LEN, opt = 0, n;

	if (rd16(a + DNS_OFF_QDCOUNT) == 1) {
		qend = dns_skip_name(a, alen, DNS_HEADER_LEN);
		if (qend == 0 || alen - qend < 4)
			qend = DNS_HEADER_LEN;	/* can't happen: checked */
		else
			qend += 4;
	}
	if (qend > limit)	/* can't happen: a question fits in 512 */
		qend = DNS_HEADER_LEN;
	memcpy(out, a, qend);
	wr16(out + DNS_OFF_FLAGS, rd16(a + DNS_OFF_FLAGS) | DNS_FLAG_TC);
	wr16(out + DNS_OFF_QDCOUNT, qend > DNS_HEADER_LEN ? 1 : 0);
	wr16(out + DNS_OFF_ANCOUNT, 0);
	wr16(out + DNS_OFF_NSCOUNT, 0);
	wr16(out + DNS_OFF_ARCOUNT, 0);
	n = qend;
	if (keep_opt && qend > DNS_HEADER_LEN)
		opt = dns_find_opt(a, alen, qend);
	if (opt) {
		size_t t = dns_skip_name(a, alen, opt), end;

		end = t + 10 + rd16(a + t + 8);
		if (end - opt <= limit - n) {
			memcpy(out + n, a + opt, end - opt);
			n += end - opt;
		} else if (t - opt + 10 <= limit - n) {
			memcpy(out + n, a + opt, t - opt + 10);
			wr16(out + n + (t - opt) + 8, 0);	/* no options */
			n += t - opt + 10;
		}
		if (n > qend)
			wr16(out + DNS_OFF_ARCOUNT, 1);
	}
	return n;
}

/*
 * Frame reassembly for 2-byte-length streams (TCP clients and the TLS
 * plaintext from upstreams). buf holds have bytes of which the first
 * may be a complete frame.
 * Returns the frame's total size (2 + length) when complete, 0 when more
 * bytes are needed, -1 when the declared length is below min or above
 * max (the stream is unusable: close it).
 */
static long
frame_complete(const unsigned char *buf, size_t have, size_t min, size_t max)
{
	size_t	 flen;

	if (have < 2)
		return 0;
	flen = rd16(buf);
	if (flen < min || flen > max)
		return -1;
	if (have - 2 < flen)
		return 0;
	return (long)(2 + flen);
}

/* ==== 8. Query table ==== */

/*
 * Query slots live in G.q[]; free ones form a LIFO list so the same few
 * slots (and pages) serve a light load. Upstream IDs map back to slots
 * through G.idtab, an open-addressing table keyed by the ID itself (IDs
 * are random, so the low bits hash well); deletion shifts entries back,
 * so no tombstones build up.
 */

static void
qlist_push(struct qlist *l, int i)
{
	struct query *q = &G.q[i];

	q->prev = l->tail;
	q->next = -1;
	if (l->tail >= 0)
		G.q[l->tail].next = i;
	else
		l->head = i;
	l->tail = i;
	l->n++;
}

static void
qlist_remove(struct qlist *l, int i)
{
	struct query *q = &G.q[i];

	if (q->prev >= 0)
		G.q[q->prev].next = q->next;
	else
		l->head = q->next;
	if (q->next >= 0)
		G.q[q->next].prev = q->prev;
	else
		l->tail = q->prev;
	q->prev = q->next = -1;
	l->n--;
}

/* The age list uses aprev/anext; same shape as above. */
static void
age_push(int i)
{
	struct query *q = &G.q[i];

	q->aprev = G.age.tail;
	q->anext = -1;
	if (G.age.tail >= 0)
		G.q[G.age.tail].anext = i;
	else
		G.age.head = i;
	G.age.tail = i;
	G.age.n++;
}

static void
age_remove(int i)
{
	struct query *q = &G.q[i];

	if (q->aprev >= 0)
		G.q[q->aprev].anext = q->anext;
	else
		G.age.head = q->anext;
	if (q->anext >= 0)
		G.q[q->anext].aprev = q->aprev;
	else
		G.age.tail = q->aprev;
	G.age.n--;
}

static void
q_init(void)
{
	int	 i;

	for (i = 0; i < DOTP_MAX_QUERIES; i++) {
		G.q[i].state = Q_FREE;
		G.q[i].next = i + 1 < DOTP_MAX_QUERIES ? i + 1 : -1;
	}
	G.qfree = 0;
	G.age = (struct qlist)QLIST_ZERO;
}

/* Slot index for upstream ID id, or -1. */
static int
q_find(uint16_t id)
{
	unsigned h = id & (DOTP_IDTAB_SIZE - 1);

	while (G.idtab[h] != 0) {
		int i = G.idtab[h] - 1;
		if (G.q[i].up_id == id)
			return i;
		h = (h + 1) & (DOTP_IDTAB_SIZE - 1);
	}
	return -1;
}

static void
id_insert(int i)
{
	unsigned h = G.q[i].up_id & (DOTP_IDTAB_SIZE - 1);

	while (G.idtab[h] != 0)
		h = (h + 1) & (DOTP_IDTAB_SIZE - 1);
	G.idtab[h] = (uint16_t)(i + 1);
}

/* Removes slot i's ID; shifts later entries of the cluster back so that
 * every entry stays reachable from its home position. */
static void
id_remove(int i)
{
	unsigned mask = DOTP_IDTAB_SIZE - 1, h, j, home;

	h = G.q[i].up_id & mask;
	while (G.idtab[h] != (uint16_t)(i + 1))
		h = (h + 1) & mask;
	G.idtab[h] = 0;
	for (j = (h + 1) & mask; G.idtab[j] != 0; j = (j + 1) & mask) {
		home = G.q[G.idtab[j] - 1].up_id & mask;
		/* Move j to the hole h if home is not in (h, j]. */
		if (((j - home) & mask) >= ((j - h) & mask)) {
			G.idtab[h] = G.idtab[j];
			G.idtab[j] = 0;
			h = j;
		}
	}
}

/* A random 16-bit value from the getrandom() pool. Returns 0 with *v
 * set, or -1 if the kernel gave no randomness. */
static int
rand16(uint16_t *v)
{
	if (G.rnd_left < 2) {
		if (fill_random(G.rnd, sizeof G.rnd) < 0)
			return -1;
		G.rnd_left = sizeof G.rnd;
	}
	G.rnd_left -= 2;
	*v = rd16(G.rnd + G.rnd_left);
	return 0;
}

/* Takes a free slot and gives it a fresh upstream ID unique among live
 * queries. Returns the slot, or -1 when the table is full. */
static int
q_alloc(void)
{
	uint16_t id;
	int	 i = G.qfree;

	if (i < 0)
		return -1;
	do {
		if (rand16(&id) < 0)
			return -1;
	} while (q_find(id) >= 0);
	G.qfree = G.q[i].next;
	G.q[i].up_id = id;
	G.q[i].prev = G.q[i].next = -1;
	id_insert(i);
	age_push(i);
	G.qlive++;
	return i;
}

static void	tcp_done_query(const struct client *);

/* Frees slot i. It MUST already be off its upstream list. */
static void
q_free(int i)
{
	struct query *q = &G.q[i];

	if (q->cl.kind == CK_TCP)
		tcp_done_query(&q->cl);
	id_remove(i);
	age_remove(i);
	q->state = Q_FREE;
	q->next = G.qfree;
	G.qfree = i;
	G.qlive--;
}

/* Takes query i off the list of its upstream it is on. */
static void
q_unlink(int i)
{
	struct query *q = &G.q[i];
	struct upstream *u = &G.up[q->up];

	if (q->state == Q_QUEUED)
		qlist_remove(&u->tx, i);
	else if (q->state == Q_SENT)
		qlist_remove(&u->fl, i);
}

/* ==== 9. TLS setup ==== */

/*
 * Trust anchors: compiled in from ca-bundle/ (build/ta.h, made by
 * `brssl ta`), or read from a PEM file at start with --ca-file.
 * The client profile is trimmed to what public DoT resolvers negotiate:
 * TLS 1.2, ECDHE with ECDSA or RSA, AES-GCM or ChaCha20-Poly1305.
 */

#ifndef DOTP_NO_EMBEDDED_TAS
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wcast-qual"
#include "ta.h"
#pragma GCC diagnostic pop
#endif

/* Appends data to a growing buffer (start-up only; bounded by caller).
 * Returns 0, or -1 on out of memory. */
struct bytes {
	unsigned char *p;
	size_t	 len, cap;
};

static int
bytes_add(struct bytes *b, const void *data, size_t len)
{
	if (len > b->cap - b->len) {
		size_t cap = b->cap ? b->cap : 256;
		unsigned char *np;

		while (cap - b->len < len)
			cap *= 2;
		if ((np = realloc(b->p, cap)) == NULL)
			return -1;
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, len);
	b->len += len;
	return 0;
}

static void
bytes_append_cb(void *ctx, const void *data, size_t len)
{
	struct bytes *b = ctx;

	if (bytes_add(b, data, len) < 0) {
		free(b->p);
		b->p = NULL;
		b->len = b->cap = 0;
		b->cap = (size_t)-1;	/* poisoned: later adds fail */
	}
}

/* Turns one DER certificate into a trust anchor (CA flag set). Memory is
 * allocated once at start and kept for the process lifetime.
 * Returns 0, or -1 if the certificate can't be decoded. */
static int
ta_from_der(const unsigned char *der, size_t len, br_x509_trust_anchor *ta)
{
	br_x509_decoder_context dc;
	struct bytes dn = { NULL, 0, 0 };
	br_x509_pkey *pk;
	unsigned char *copy;

	br_x509_decoder_init(&dc, bytes_append_cb, &dn);
	br_x509_decoder_push(&dc, der, len);
	pk = br_x509_decoder_get_pkey(&dc);
	if (pk == NULL || dn.p == NULL) {
		free(dn.p);
		return -1;
	}
	ta->dn.data = dn.p;
	ta->dn.len = dn.len;
	ta->flags = BR_X509_TA_CA;
	ta->pkey = *pk;
	switch (pk->key_type) {
	case BR_KEYTYPE_RSA:
		copy = malloc(pk->key.rsa.nlen + pk->key.rsa.elen);
		if (copy == NULL)
			return -1;
		memcpy(copy, pk->key.rsa.n, pk->key.rsa.nlen);
		memcpy(copy + pk->key.rsa.nlen, pk->key.rsa.e,
		    pk->key.rsa.elen);
		ta->pkey.key.rsa.n = copy;
		ta->pkey.key.rsa.e = copy + pk->key.rsa.nlen;
		return 0;
	case BR_KEYTYPE_EC:
		copy = malloc(pk->key.ec.qlen);
		if (copy == NULL)
			return -1;
		memcpy(copy, pk->key.ec.q, pk->key.ec.qlen);
		ta->pkey.key.ec.q = copy;
		return 0;
	default:
		return -1;
	}
}

/*
 * Reads every CERTIFICATE of a PEM file as a trust anchor.
 * Returns the number read (> 0), or -1 with *why set.
 */
static int
ta_load_pem(const char *path, br_x509_trust_anchor **out, const char **why)
{
	static br_x509_trust_anchor tas[DOTP_MAX_ANCHORS];
	br_pem_decoder_context pc;
	struct bytes file = { NULL, 0, 0 }, der = { NULL, 0, 0 };
	unsigned char chunk[4096];
	int	 fd, n = 0, in_cert = 0, ret = -1;
	ssize_t	 r;
	size_t	 off;

	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		*why = strerror(errno);
		return -1;
	}
	while ((r = read(fd, chunk, sizeof chunk)) != 0) {
		if (r < 0) {
			if (errno == EINTR)
				continue;
			*why = strerror(errno);
			goto out;
		}
		if (file.len + (size_t)r > DOTP_CA_FILE_MAX) {
			*why = "file too large";
			goto out;
		}
		if (bytes_add(&file, chunk, (size_t)r) < 0) {
			*why = "out of memory";
			goto out;
		}
	}
	br_pem_decoder_init(&pc);
	for (off = 0; off < file.len; ) {
		off += br_pem_decoder_push(&pc, file.p + off, file.len - off);
		switch (br_pem_decoder_event(&pc)) {
		case BR_PEM_BEGIN_OBJ:
			in_cert = strcmp(br_pem_decoder_name(&pc),
			    "CERTIFICATE") == 0;
			der.len = 0;
			br_pem_decoder_setdest(&pc, in_cert ?
			    bytes_append_cb : NULL, &der);
			break;
		case BR_PEM_END_OBJ:
			if (!in_cert)
				break;
			in_cert = 0;
			if (der.p == NULL || n == DOTP_MAX_ANCHORS ||
			    ta_from_der(der.p, der.len, &tas[n]) < 0) {
				*why = n == DOTP_MAX_ANCHORS ?
				    "too many certificates" :
				    "a certificate could not be decoded";
				goto out;
			}
			n++;
			break;
		case BR_PEM_ERROR:
			*why = "not valid PEM";
			goto out;
		default:
			break;
		}
	}
	if (n == 0) {
		*why = "no CERTIFICATE in it";
		goto out;
	}
	*out = tas;
	ret = n;
out:
	close(fd);
	free(file.p);
	free(der.p);
	return ret;
}

/* TLS 1.2 suites public DoT resolvers offer; forward secrecy, AEAD. */
static const uint16_t dotp_suites[] = {
	BR_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	BR_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	BR_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	BR_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
	BR_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	BR_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
};

/* Sets up the BearSSL client of upstream u, once, at start. */
static void
tls_setup(struct upstream *u)
{
	br_ssl_engine_context *eng = &u->cc.eng;

	br_ssl_client_zero(&u->cc);
	br_ssl_engine_set_versions(eng, BR_TLS12, BR_TLS12);
	br_ssl_engine_set_suites(eng, dotp_suites,
	    sizeof dotp_suites / sizeof dotp_suites[0]);
	br_ssl_engine_set_hash(eng, br_sha256_ID, &br_sha256_vtable);
	br_ssl_engine_set_hash(eng, br_sha384_ID, &br_sha384_vtable);
	br_ssl_engine_set_prf_sha256(eng, &br_tls12_sha256_prf);
	br_ssl_engine_set_prf_sha384(eng, &br_tls12_sha384_prf);
	br_ssl_engine_set_default_aes_gcm(eng);
	br_ssl_engine_set_default_chapol(eng);
	br_ssl_engine_set_ec(eng, &br_ec_all_m31);
	br_ssl_engine_set_rsavrfy(eng, &br_rsa_i31_pkcs1_vrfy);
	br_ssl_engine_set_ecdsa(eng, &br_ecdsa_i31_vrfy_asn1);

	br_x509_minimal_init(&u->xc, &br_sha256_vtable, G.tas, G.ntas);
	br_x509_minimal_set_hash(&u->xc, br_sha256_ID, &br_sha256_vtable);
	br_x509_minimal_set_hash(&u->xc, br_sha384_ID, &br_sha384_vtable);
	br_x509_minimal_set_hash(&u->xc, br_sha512_ID, &br_sha512_vtable);
	br_x509_minimal_set_rsa(&u->xc, &br_rsa_i31_pkcs1_vrfy);
	br_x509_minimal_set_ecdsa(&u->xc, &br_ec_all_m31,
	    &br_ecdsa_i31_vrfy_asn1);
	br_ssl_engine_set_x509(eng, &u->xc.vtable);

	/* Two separate buffers: the bidi single-buffer call of 0.6
	 * overlaps them. The input side stays full size (servers send
	 * 16 KB records regardless of Max Fragment Length). */
	br_ssl_engine_set_buffers_bidi(eng, u->ibuf, sizeof u->ibuf,
	    u->obuf, sizeof u->obuf);
	br_ssl_engine_add_flags(eng, BR_OPT_NO_RENEGOTIATION);
}

/* A human reason for a BearSSL error code. */
static const char *
tls_strerror(int err, char *buf, size_t len)
{
	switch (err) {
	case BR_ERR_X509_NOT_TRUSTED:
		return "certificate not trusted";
	case BR_ERR_X509_BAD_SERVER_NAME:
		return "certificate name mismatch";
	case BR_ERR_X509_EXPIRED:
		return "certificate expired or not yet valid";
	case BR_ERR_X509_BAD_SIGNATURE:
		return "certificate signature invalid or unsupported";
	case BR_ERR_X509_UNSUPPORTED:
		return "certificate uses an unsupported algorithm";
	case BR_ERR_TOO_LARGE:
		return "record too large";
	case BR_ERR_IO:
		return "I/O error";
	default:
		break;
	}
	if (err >= BR_ERR_SEND_FATAL_ALERT)
		snprintf(buf, len, "sent fatal alert %d", err -
		    BR_ERR_SEND_FATAL_ALERT);
	else if (err >= BR_ERR_RECV_FATAL_ALERT)
		snprintf(buf, len, "received fatal alert %d%s", err -
		    BR_ERR_RECV_FATAL_ALERT, err - BR_ERR_RECV_FATAL_ALERT == 40 ?
		    " (no common cipher suite or curve)" : "");
	else if (err >= BR_ERR_X509_OK)
		snprintf(buf, len, "certificate invalid (x509 error %d)", err);
	else
		snprintf(buf, len, "TLS error %d", err);
	return buf;
}

/* ==== 10. Upstream connections ==== */

/*
 * The state machine of struct upstream (see its comment), driven from
 * the poll() loop. Nothing here blocks. New work is only queued here;
 * connects and pumps happen in up_kick(), once per loop pass, so failure
 * paths never recurse into connects.
 */

/* Picks the upstream for a query: the first one (in -u order) that is
 * not backing off, skipping `not` (the one that just failed, or -1).
 * If every upstream is backing off, a fresh query (not < 0) still tries
 * the least recently failed one. Returns an index, or -1. */
static int
up_pick(int not)
{
	int	 i, best = -1;

	for (i = 0; i < G.nup; i++)
		if (i != not && G.up[i].state != UP_BACKOFF)
			return i;
	if (not >= 0)
		return -1;
	for (i = 0; i < G.nup; i++)
		if (best < 0 || G.up[i].failed_at < G.up[best].failed_at)
			best = i;
	return best;
}

/* Queues query i on upstream ui. */
static void
up_enqueue(int ui, int i)
{
	struct upstream *u = &G.up[ui];

	G.q[i].up = (uint8_t)ui;
	G.q[i].state = Q_QUEUED;
	qlist_push(&u->tx, i);
	G.kick = 1;
}

/*
 * Ends the connection of u. failed: it broke before or during the
 * handshake, or with a TLS error (back off); otherwise it was a normal
 * close (idle, close_notify, EOF after the handshake).
 * Every query on u's lists is moved on (q_retry).
 */
static void
up_close(struct upstream *u, int failed, int64_t now)
{
	struct qlist moved = QLIST_ZERO;
	int	 i, ui = (int)(u - G.up);

	fd_close(&u->fd);
	if (failed) {
		u->backoff_ms = u->backoff_ms ? u->backoff_ms * 2 :
		    DOTP_BACKOFF_MIN_MS;
		if (u->backoff_ms > DOTP_BACKOFF_MAX_MS)
			u->backoff_ms = DOTP_BACKOFF_MAX_MS;
		u->state = UP_BACKOFF;
		u->deadline = now + u->backoff_ms;
		u->failed_at = now;
	} else {
		u->state = UP_IDLE;
	}
	u->rxa.have = 0;
	/* Detach both lists first: q_retry may queue on another upstream,
	 * or on u itself after a clean close. */
	while ((i = u->fl.head) >= 0) {
		qlist_remove(&u->fl, i);
		qlist_push(&moved, i);
	}
	while ((i = u->tx.head) >= 0) {
		qlist_remove(&u->tx, i);
		qlist_push(&moved, i);
	}
	while ((i = moved.head) >= 0) {
		qlist_remove(&moved, i);
		G.q[i].state = Q_QUEUED;	/* on no list now */
		q_retry(i, failed ? ui : -1);
	}
}

/* Logs a failure of u at error level the first time, at debug while it
 * stays down, then closes it as failed. */
static void
up_fail(struct upstream *u, int64_t now, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
up_fail(struct upstream *u, int64_t now, const char *fmt, ...)
{
	char	 why[160];
	va_list	 ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	log_msg(u->down ? LOG_DEBUG : LOG_ERR, "upstream %s %s name=%s",
	    u->label, why, u->name);
	u->down = 1;
	up_close(u, 1, now);
}

/* Starts a connection: socket, non-blocking connect, engine reset with
 * fresh entropy. The ClientHello then waits in SENDREC. */
static void
up_connect(struct upstream *u, int64_t now)
{
	unsigned char seed[32];
	int	 fd;

	fd = socket(u->addr.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, 0);
	if (fd < 0) {
		up_fail(u, now, "socket failed: %s", strerror(errno));
		return;
	}
	u->fd = fd;
	u->gen++;
	u->state = UP_CONNECTING;
	u->deadline = now + DOTP_HANDSHAKE_MS;
	u->last_active = now;
	u->rxa.have = 0;
	set_nodelay(fd);
	if (fill_random(seed, sizeof seed) < 0) {
		up_fail(u, now, "getrandom failed: %s", strerror(errno));
		return;
	}
	br_ssl_engine_inject_entropy(&u->cc.eng, seed, sizeof seed);
	/* resume = 1: reuse the last session if the server still has it. */
	if (!br_ssl_client_reset(&u->cc, u->name, 1)) {
		up_fail(u, now, "TLS reset failed (error %d)",
		    br_ssl_engine_last_error(&u->cc.eng));
		return;
	}
	if (connect(fd, &u->addr.sa, u->addrlen) < 0 &&
	    errno != EINPROGRESS) {
		up_fail(u, now, "connect failed: %s", strerror(errno));
		return;
	}
	log_msg(LOG_DEBUG, "upstream %s connecting gen=%u", u->label, u->gen);
}

/* Dispatches one answer frame (msg, len) from upstream u. */
static void	q_deliver(int, unsigned char *, size_t);

static void
up_answer(struct upstream *u, unsigned char *msg, size_t len)
{
	int	 i = q_find(rd16(msg + DNS_OFF_ID));
	struct query *q;

	if (i < 0 || (q = &G.q[i])->state != Q_SENT ||
	    &G.up[q->up] != u || q->sent_gen != u->gen ||
	    !dns_check_answer(msg, len, q->qbuf, q->qend)) {
		G.st.stray++;
		log_msg(LOG_DEBUG, "upstream %s stray answer dropped",
		    u->label);
		return;
	}
	qlist_remove(&u->fl, i);
	q_deliver(i, msg, len);
}

/* Injects every queued query that fits into SENDAPP, then flushes so
 * they leave as one record. Returns 1 if anything was injected. */
static int
up_inject(struct upstream *u)
{
	br_ssl_engine_context *eng = &u->cc.eng;
	unsigned char *buf;
	size_t	 avail, need;
	int	 i, did = 0;

	while ((i = u->tx.head) >= 0) {
		struct query *q = &G.q[i];

		buf = br_ssl_engine_sendapp_buf(eng, &avail);
		if (buf == NULL)
			break;
		need = 2 + (size_t)q->qlen;
		if (need > avail)
			break;	/* flushed below; the rest goes next round */
		wr16(buf, q->qlen);
		memcpy(buf + 2, q->qbuf, q->qlen);
		br_ssl_engine_sendapp_ack(eng, need);
		/* Committed: these bytes belong to this session now. */
		qlist_remove(&u->tx, i);
		q->state = Q_SENT;
		q->sent_gen = u->gen;
		q->tries++;
		qlist_push(&u->fl, i);
		did = 1;
	}
	if (did)
		br_ssl_engine_flush(eng, 0);
	return did;
}

/* Moves the decrypted bytes into the frame assembler and dispatches
 * every complete frame. Returns 1 on progress, -1 on a bad frame. */
static int
up_recvapp(struct upstream *u, int64_t now)
{
	br_ssl_engine_context *eng = &u->cc.eng;
	unsigned char *buf;
	size_t	 len, room, off = 0;
	long	 fl;

	buf = br_ssl_engine_recvapp_buf(eng, &len);
	room = sizeof u->rx - u->rxa.have;
	if (len > room)
		len = room;
	if (len == 0)
		return 0;	/* can't happen: a frame always fits */
	memcpy(u->rx + u->rxa.have, buf, len);
	br_ssl_engine_recvapp_ack(eng, len);
	u->rxa.have += len;
	while ((fl = frame_complete(u->rx + off, u->rxa.have - off,
	    DNS_HEADER_LEN, DNS_MSG_MAX)) > 0) {
		up_answer(u, u->rx + off + 2, (size_t)fl - 2);
		off += (size_t)fl;
	}
	if (fl < 0)
		return -1;
	if (off > 0) {
		memmove(u->rx, u->rx + off, u->rxa.have - off);
		u->rxa.have -= off;
	}
	u->last_active = now;
	return 1;
}

/* The engine reported CLOSED: decide between clean and failed. */
static void
up_closed(struct upstream *u, int64_t now)
{
	char	 buf[80];
	int	 err = br_ssl_engine_last_error(&u->cc.eng);

	if (err == BR_ERR_OK && u->state == UP_READY) {
		log_msg(LOG_DEBUG, "upstream %s closed by server", u->label);
		up_close(u, 0, now);
		return;
	}
	up_fail(u, now, "%s", err == BR_ERR_OK ? "closed during handshake" :
	    tls_strerror(err, buf, sizeof buf));
}

/*
 * Runs the engine until no step makes progress (STYLE.md 1.3): SENDREC
 * first, then RECVAPP, RECVREC, then SENDAPP. The state is read afresh
 * every round. Stops at EAGAIN; on any error the connection is closed.
 */
static void
up_pump(struct upstream *u, int64_t now)
{
	br_ssl_engine_context *eng = &u->cc.eng;
	unsigned char *buf;
	unsigned st;
	size_t	 len;
	ssize_t	 n;
	int	 send_blocked = 0, r;

	while (u->fd >= 0) {
		st = br_ssl_engine_current_state(eng);
		if (st & BR_SSL_CLOSED) {
			up_closed(u, now);
			return;
		}
		if (u->state == UP_HANDSHAKE && (st & BR_SSL_SENDAPP)) {
			u->state = UP_READY;
			u->backoff_ms = 0;
			u->last_active = now;
			log_msg(u->down ? LOG_INFO : LOG_DEBUG,
			    "upstream %s ready gen=%u", u->label, u->gen);
			u->down = 0;
		}
		if ((st & BR_SSL_SENDREC) && !send_blocked) {
			buf = br_ssl_engine_sendrec_buf(eng, &len);
			n = send(u->fd, buf, len, MSG_NOSIGNAL);
			if (n > 0) {
				br_ssl_engine_sendrec_ack(eng, (size_t)n);
				continue;
			}
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
				up_fail(u, now, "send failed: %s",
				    strerror(errno));
				return;
			}
			send_blocked = 1;
		}
		if (st & BR_SSL_RECVAPP) {
			if ((r = up_recvapp(u, now)) < 0) {
				up_fail(u, now, "bad frame from upstream");
				return;
			}
			if (r > 0)
				continue;
		}
		if (st & BR_SSL_RECVREC) {
			buf = br_ssl_engine_recvrec_buf(eng, &len);
			n = recv(u->fd, buf, len, 0);
			if (n > 0) {
				br_ssl_engine_recvrec_ack(eng, (size_t)n);
				continue;
			}
			if (n == 0) {
				if (u->state == UP_READY) {
					log_msg(LOG_DEBUG, "upstream %s EOF",
					    u->label);
					up_close(u, 0, now);
				} else {
					up_fail(u, now, "closed the connection"
					    " during the handshake");
				}
				return;
			}
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK) {
				if (u->state == UP_READY && errno == ECONNRESET)
					up_close(u, 0, now);
				else
					up_fail(u, now, "recv failed: %s",
					    strerror(errno));
				return;
			}
		}
		if ((st & BR_SSL_SENDAPP) && u->state == UP_READY &&
		    up_inject(u))
			continue;
		if ((st & BR_SSL_SENDAPP) && u->state == UP_READY &&
		    u->tx.head >= 0 && !send_blocked) {
			/* The next query did not fit in what is left of the
			 * record: seal it so the buffer empties. */
			br_ssl_engine_flush(eng, 0);
			if (br_ssl_engine_current_state(eng) & BR_SSL_SENDREC)
				continue;
		}
		break;
	}
}

/* Called before poll(): interest and deadline for u. */
static void
up_pollset(struct upstream *u, struct pollfd *pfd, int64_t *deadline)
{
	unsigned st;

	pfd->fd = u->fd;
	pfd->events = 0;
	pfd->revents = 0;
	if (u->state == UP_IDLE || u->state == UP_BACKOFF) {
		pfd->fd = -1;
		if (u->state == UP_BACKOFF && u->deadline < *deadline)
			*deadline = u->deadline;
		return;
	}
	if (u->state == UP_CONNECTING) {
		pfd->events = POLLOUT;
	} else {
		st = br_ssl_engine_current_state(&u->cc.eng);
		if (st & BR_SSL_SENDREC)
			pfd->events |= POLLOUT;
		if (st & BR_SSL_RECVREC)
			pfd->events |= POLLIN;
	}
	if (u->state != UP_READY) {
		if (u->deadline < *deadline)
			*deadline = u->deadline;
	} else if (u->fl.n == 0 && u->tx.n == 0) {
		if (u->last_active + DOTP_UP_IDLE_MS < *deadline)
			*deadline = u->last_active + DOTP_UP_IDLE_MS;
	}
}

/* Called after poll() for u's descriptor. */
static void
up_service(struct upstream *u, short revents, int64_t now)
{
	if (revents & (POLLERR | POLLHUP))
		revents |= POLLIN | POLLOUT;	/* let recv/send tell */
	if (u->state == UP_CONNECTING) {
		int	 err = 0;
		socklen_t sl = sizeof err;

		if (!(revents & POLLOUT))
			return;
		if (getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
			err = errno;
		if (err != 0) {
			up_fail(u, now, "connect failed: %s", strerror(err));
			return;
		}
		u->state = UP_HANDSHAKE;
	}
	up_pump(u, now);
}

/* Once per loop pass: connect upstreams that have queued work, pump the
 * ready ones, expire handshakes, back-offs and idle connections. */
static void
up_kick(int64_t now)
{
	int	 i;

	G.kick = 0;
	for (i = 0; i < G.nup; i++) {
		struct upstream *u = &G.up[i];

		if (u->state == UP_BACKOFF && now >= u->deadline)
			u->state = UP_IDLE;
		if ((u->state == UP_CONNECTING || u->state == UP_HANDSHAKE) &&
		    now >= u->deadline) {
			up_fail(u, now, "%s timed out",
			    u->state == UP_CONNECTING ? "connect" : "handshake");
			continue;
		}
		if (u->state == UP_READY && u->fl.n == 0 && u->tx.n == 0 &&
		    now >= u->last_active + DOTP_UP_IDLE_MS) {
			log_msg(LOG_DEBUG, "upstream %s idle, closing",
			    u->label);
			br_ssl_engine_close(&u->cc.eng);
			up_pump(u, now);	/* best effort close_notify */
			if (u->fd >= 0)
				up_close(u, 0, now);
			continue;
		}
		if (u->tx.n == 0)
			continue;
		/* A query picked for a backing-off upstream (all are down)
		 * makes it try now. */
		if (u->state == UP_IDLE || u->state == UP_BACKOFF)
			up_connect(u, now);
		else if (u->state == UP_READY)
			up_pump(u, now);
	}
}

/* ==== 11. Answers and clients ==== */

/* Sends one message to a client. UDP: truncated to the client's limit
 * (limit 0 for error answers that always fit). TCP: framed and queued. */
static void	tcp_send(struct tcpclient *, const unsigned char *, size_t);

static void
client_send(const struct client *cl, const unsigned char *msg, size_t len)
{
	if (cl->kind == CK_UDP) {
		if (sendto(G.lst[cl->idx].udp, msg, len,
		    MSG_DONTWAIT | MSG_NOSIGNAL, &cl->peer.sa,
		    cl->peerlen) < 0)
			G.st.udp_send_fail++;
		return;
	}
	if (G.tcp[cl->idx].fd >= 0 && G.tcp[cl->idx].gen == cl->gen)
		tcp_send(&G.tcp[cl->idx], msg, len);
}

/* Delivers the answer msg (in an upstream's rx buffer, which dotp owns
 * and may patch) to the client of query i, with the client's ID, and
 * frees the slot. The query MUST be off its upstream list. */
static void
q_deliver(int i, unsigned char *msg, size_t len)
{
	struct query *q = &G.q[i];
	unsigned char small[DNS_EDNS_UDP_MAX];

	wr16(msg + DNS_OFF_ID, q->client_id);
	if (q->cl.kind == CK_UDP && len > q->udp_limit) {
		size_t n = dns_truncate(msg, len, q->has_opt, small,
		    q->udp_limit < sizeof small ? q->udp_limit : sizeof small);
		client_send(&q->cl, small, n);
	} else {
		client_send(&q->cl, msg, len);
	}
	G.st.answers++;
	q_free(i);
}

/* Answers query i with SERVFAIL and frees it (off its list already). */
static void
q_servfail(int i)
{
	struct query *q = &G.q[i];
	unsigned char out[DNS_UDP_MIN];
	size_t	 n;

	wr16(q->qbuf + DNS_OFF_ID, q->client_id);
	n = dns_make_error(q->qbuf, q->qlen, q->qend, q->has_opt,
	    DNS_RCODE_SERVFAIL, out, sizeof out);
	if (n > 0)
		client_send(&q->cl, out, n);
	G.st.servfail++;
	q_free(i);
}

/* Query i lost its connection (failed: index of the upstream that
 * failed, or -1 after a clean close). Re-queue it while tries and time
 * remain, else SERVFAIL. */
static void
q_retry(int i, int failed)
{
	struct query *q = &G.q[i];
	int	 ui;

	if (q->tries >= DOTP_MAX_TRIES || now_ms() >= q->deadline) {
		q_servfail(i);
		return;
	}
	ui = failed >= 0 ? up_pick(failed) : q->up;
	if (ui < 0) {
		q_servfail(i);
		return;
	}
	up_enqueue(ui, i);
}

/*
 * Handles one message from a client: validate, answer errors at once,
 * else take a slot and queue it upstream.
 */
static void
client_query(const unsigned char *m, size_t len, const struct client *cl,
    int64_t now)
{
	struct qinfo qi;
	struct query *q;
	unsigned char out[DNS_UDP_MIN];
	size_t	 n;
	int	 r, i, ui;

	G.st.queries++;
	r = dns_check_query(m, len, &qi);
	if (r == QC_DROP) {
		G.st.dropped++;
		return;
	}
	if (r != QC_OK) {
		/* Header only: the question may be what is wrong. */
		n = dns_make_error(m, len, 0, 0, r, out, sizeof out);
		if (n > 0)
			client_send(cl, out, n);
		return;
	}
	ui = up_pick(-1);	/* never -1: there is at least one upstream */
	if ((i = q_alloc()) < 0) {
		log_msg(LOG_DEBUG, "query table full, SERVFAIL");
		n = dns_make_error(m, len, qi.qend, qi.has_opt,
		    DNS_RCODE_SERVFAIL, out, sizeof out);
		if (n > 0)
			client_send(cl, out, n);
		G.st.servfail++;
		return;
	}
	q = &G.q[i];
	memcpy(q->qbuf, m, len);
	q->qlen = (uint16_t)len;
	q->qend = (uint16_t)qi.qend;
	q->has_opt = (uint8_t)qi.has_opt;
	q->udp_limit = dns_udp_limit(&qi, DNS_EDNS_UDP_MAX);
	q->client_id = rd16(m);
	wr16(q->qbuf + DNS_OFF_ID, q->up_id);
	q->tries = 0;
	q->deadline = now + G.cfg.timeout_ms;
	q->cl = *cl;
	if (cl->kind == CK_TCP)
		G.tcp[cl->idx].pending++;
	up_enqueue(ui, i);
}

/* Reads what is waiting on UDP listener li. */
static void
udp_service(int li, int64_t now)
{
	unsigned char buf[DOTP_QUERY_MAX + 1];
	struct client cl;
	ssize_t	 n;
	int	 k;

	for (k = 0; k < DOTP_UDP_BATCH; k++) {
		cl.kind = CK_UDP;
		cl.idx = (uint16_t)li;
		cl.gen = 0;
		cl.peerlen = sizeof cl.peer;
		n = recvfrom(G.lst[li].udp, buf, sizeof buf, MSG_DONTWAIT,
		    &cl.peer.sa, &cl.peerlen);
		if (n < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK &&
			    errno != EINTR)
				log_msg(LOG_DEBUG, "udp recv: %s",
				    strerror(errno));
			return;
		}
		client_query(buf, (size_t)n, &cl, now);
	}
}

/* ==== 12. TCP clients ==== */

/*
 * A TCP client sends 2-byte-length framed queries, any number, and gets
 * answers in the order they arrive from upstream. Output that cannot be
 * written at once is queued, up to DOTP_TCP_OUT_MAX; past that the
 * client is cut off. A client that shuts its side is kept until its
 * answers are written.
 */

static void
tcp_close(struct tcpclient *c)
{
	fd_close(&c->fd);
	free(c->out);
	c->out = NULL;
	c->out_len = c->out_off = c->out_cap = 0;
	c->rxa.have = 0;
	c->pending = 0;
	c->eof = 0;
	c->gen++;
	G.ntcp--;
}

/* A query of TCP client cl was answered or failed. */
static void
tcp_done_query(const struct client *cl)
{
	struct tcpclient *c = &G.tcp[cl->idx];

	if (c->fd >= 0 && c->gen == cl->gen && c->pending > 0)
		c->pending--;
}

/* Writes queued output. Returns -1 if the client is dead. */
static int
tcp_flush(struct tcpclient *c)
{
	ssize_t	 n;

	while (c->out_off < c->out_len) {
		n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
		    MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -1;
		}
		c->out_off += (size_t)n;
	}
	c->out_off = c->out_len = 0;
	return 0;
}

/* Queues one framed answer for c and tries to write it. */
static void
tcp_send(struct tcpclient *c, const unsigned char *msg, size_t len)
{
	unsigned char hdr[2];
	size_t	 need = 2 + len;

	if (c->out_len + need > DOTP_TCP_OUT_MAX) {
		log_msg(LOG_DEBUG, "tcp client not reading, closed");
		tcp_close(c);
		return;
	}
	if (c->out_cap - c->out_len < need) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		unsigned char *np;

		while (cap - c->out_len < need)
			cap *= 2;
		if (cap > DOTP_TCP_OUT_MAX)
			cap = DOTP_TCP_OUT_MAX;
		if ((np = realloc(c->out, cap)) == NULL) {
			log_msg(LOG_WARN, "tcp client: out of memory");
			tcp_close(c);
			return;
		}
		c->out = np;
		c->out_cap = cap;
	}
	wr16(hdr, (uint16_t)len);
	memcpy(c->out + c->out_len, hdr, 2);
	memcpy(c->out + c->out_len + 2, msg, len);
	c->out_len += need;
	if (tcp_flush(c) < 0)
		tcp_close(c);
}

/* Accepts what waits on TCP listener li. */
static void
tcp_accept(int li, int64_t now)
{
	int	 fd, k, j;

	for (k = 0; k < DOTP_UDP_BATCH; k++) {
		fd = accept4(G.lst[li].tcp, NULL, NULL,
		    SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE)
				log_msg(LOG_WARN, "accept: %s",
				    strerror(errno));
			return;
		}
		for (j = 0; j < DOTP_MAX_TCP && G.tcp[j].fd >= 0; j++)
			/* nothing */;
		if (j == DOTP_MAX_TCP) {
			G.st.tcp_refused++;
			close(fd);
			continue;
		}
		set_nodelay(fd);
		G.tcp[j].fd = fd;
		G.tcp[j].idle_since = now;
		G.ntcp++;
	}
}

/* Reads frames from client j and hands each query on. */
static void
tcp_read(int j, int64_t now)
{
	struct tcpclient *c = &G.tcp[j];
	struct client cl;
	ssize_t	 n;
	size_t	 off;
	long	 fl;

	while (c->fd >= 0 && !c->eof && c->pending < DOTP_TCP_PIPELINE) {
		n = recv(c->fd, c->rx + c->rxa.have,
		    sizeof c->rx - c->rxa.have, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				tcp_close(c);
			return;
		}
		if (n == 0) {
			c->eof = 1;
			return;
		}
		c->rxa.have += (size_t)n;
		off = 0;
		while ((fl = frame_complete(c->rx + off, c->rxa.have - off,
		    DNS_HEADER_LEN, DOTP_QUERY_MAX)) > 0) {
			cl.kind = CK_TCP;
			cl.idx = (uint16_t)j;
			cl.gen = c->gen;
			cl.peerlen = 0;
			client_query(c->rx + off + 2, (size_t)fl - 2, &cl, now);
			off += (size_t)fl;
			if (c->fd < 0)
				return;	/* closed while answering */
		}
		if (fl < 0) {
			G.st.dropped++;
			tcp_close(c);
			return;
		}
		memmove(c->rx, c->rx + off, c->rxa.have - off);
		c->rxa.have -= off;
	}
}

/* ==== 13. Event loop ==== */

static void
on_signal(int sig)
{
	got_signal = sig;
}

/* Expires queries past their deadline (age list head first) and idle
 * TCP clients. One active pass per loop iteration. */
static void
expire(int64_t now)
{
	int	 i, j;

	while ((i = G.age.head) >= 0 && G.q[i].deadline <= now) {
		q_unlink(i);
		q_servfail(i);
	}
	for (j = 0; j < DOTP_MAX_TCP; j++) {
		struct tcpclient *c = &G.tcp[j];

		if (c->fd < 0)
			continue;
		if (c->pending > 0 || c->out_len > 0) {
			c->idle_since = now;
			continue;
		}
		if (c->eof || now - c->idle_since >= DOTP_TCP_IDLE_MS)
			tcp_close(c);
	}
}

/*
 * The loop: build the pollfd array afresh, sleep until the nearest
 * deadline, service upstreams first (answers free slots), then clients,
 * then listeners; then expire; then connect/pump upstreams with new work
 * so all queries of one pass share one TLS record.
 */
static void
loop_run(void)
{
	static struct pollfd pfd[2 * DOTP_MAX_LISTEN + DOTP_MAX_UPSTREAMS +
	    DOTP_MAX_TCP];
	static int tcp_at[DOTP_MAX_TCP];
	int64_t	 now, deadline;
	int	 n, i, j, r, timeout;

	while (!got_signal) {
		now = now_ms();
		deadline = now + DOTP_MAX_SLEEP_MS;
		n = 0;
		for (i = 0; i < G.nup; i++)
			up_pollset(&G.up[i], &pfd[n++], &deadline);
		for (j = 0; j < DOTP_MAX_TCP; j++) {
			struct tcpclient *c = &G.tcp[j];

			tcp_at[j] = -1;
			if (c->fd < 0)
				continue;
			tcp_at[j] = n;
			pfd[n].fd = c->fd;
			pfd[n].events = 0;
			pfd[n].revents = 0;
			if (!c->eof && c->pending < DOTP_TCP_PIPELINE)
				pfd[n].events |= POLLIN;
			if (c->out_len > 0)
				pfd[n].events |= POLLOUT;
			n++;
			if (c->idle_since + DOTP_TCP_IDLE_MS < deadline)
				deadline = c->idle_since + DOTP_TCP_IDLE_MS;
		}
		for (i = 0; i < G.nlisten; i++) {
			pfd[n].fd = G.lst[i].udp;
			pfd[n].events = POLLIN;
			pfd[n++].revents = 0;
			pfd[n].fd = G.lst[i].tcp;
			pfd[n].events = POLLIN;
			pfd[n++].revents = 0;
		}
		if (G.age.head >= 0 && G.q[G.age.head].deadline < deadline)
			deadline = G.q[G.age.head].deadline;
		timeout = G.kick ? 0 : deadline <= now ? 0 :
		    (int)(deadline - now + 1);
		r = poll(pfd, (nfds_t)n, timeout);
		if (r < 0) {
			if (errno != EINTR)
				log_msg(LOG_WARN, "poll: %s", strerror(errno));
			continue;
		}
		now = now_ms();
		n = 0;
		for (i = 0; i < G.nup; i++, n++)
			if (pfd[n].revents && pfd[n].fd >= 0 &&
			    pfd[n].fd == G.up[i].fd)
				up_service(&G.up[i], pfd[n].revents, now);
		for (j = 0; j < DOTP_MAX_TCP; j++) {
			struct tcpclient *c = &G.tcp[j];
			short	 rev;

			if (tcp_at[j] < 0)
				continue;
			rev = pfd[tcp_at[j]].revents;
			n++;
			if (c->fd != pfd[tcp_at[j]].fd || rev == 0)
				continue;
			if (rev & (POLLOUT | POLLERR | POLLHUP)) {
				if (tcp_flush(c) < 0) {
					tcp_close(c);
					continue;
				}
			}
			if (rev & (POLLIN | POLLERR | POLLHUP))
				tcp_read(j, now);
		}
		for (i = 0; i < G.nlisten; i++, n += 2) {
			if (pfd[n].revents)
				udp_service(i, now);
			if (pfd[n + 1].revents)
				tcp_accept(i, now);
		}
		expire(now);
		up_kick(now);
	}
}

/* ==== 14. Config and command line ==== */

static void
usage(FILE *f)
{
	fprintf(f,
"usage: dotp [-l ADDR[:PORT]]... [-u HOST[:PORT]#NAME]... [--ca-file PEM]\n"
"            [--timeout MS] [-v] [-q] [-h|--help] [-V|--version]\n"
"\n"
"  -l, --listen ADDR[:PORT]  serve DNS on UDP and TCP there (repeatable;\n"
"                            IPv6 as [::1]:53); default 127.0.0.1:53 [::1]:53\n"
"  -u, --upstream HOST[:PORT]#NAME\n"
"                            DoT resolver: IP literal, port (853), and the\n"
"                            name its certificate must carry (repeatable);\n"
"                            default 1.1.1.1#cloudflare-dns.com and\n"
"                            1.0.0.1#cloudflare-dns.com\n"
"      --ca-file PEM         trust these CAs instead of the embedded roots\n"
"      --timeout MS          answer SERVFAIL after MS milliseconds (%d)\n"
"  -v, --verbose             debug logs\n"
"  -q, --quiet               errors only\n"
"  -h, --help                this text\n"
"  -V, --version             print the version\n"
"\n"
"Environment: DOTP_LISTEN, DOTP_UPSTREAM (lists split by commas or spaces),\n"
"DOTP_CA_FILE, DOTP_TIMEOUT, DOTP_VERBOSE=1, DOTP_QUIET=1. Flags win.\n",
	    DOTP_TIMEOUT_MS);
}

/* Prints one line about a bad value and exits 2. */
static void
cfg_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void
cfg_die(const char *fmt, ...)
{
	va_list	 ap;

	fputs("dotp: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\n", stderr);
	exit(2);
}

/* Parses a decimal integer in [min, max]. Returns 0, or -1. */
static int
parse_int(const char *s, long min, long max, long *out)
{
	char	*end;
	long	 v;

	if (*s == '\0' || *s == '-' || *s == '+' || *s == ' ')
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

/*
 * Parses "ADDR[:PORT]": an IPv4 literal, or an IPv6 literal in brackets
 * (a bare IPv6 literal without port is accepted too).
 * Returns 0, or -1 if s is not of that form.
 */
static int
parse_addr(const char *s, uint16_t defport, struct sockaddr_text *out)
{
	char	 host[INET6_ADDRSTRLEN + 1];
	const char *port = NULL, *close;
	size_t	 hl;
	long	 p = defport;

	memset(out, 0, sizeof *out);
	if (s[0] == '[') {
		if ((close = strchr(s, ']')) == NULL)
			return -1;
		hl = (size_t)(close - s - 1);
		if (close[1] == ':')
			port = close + 2;
		else if (close[1] != '\0')
			return -1;
		s++;
	} else if (strchr(s, ':') != strrchr(s, ':')) {
		hl = strlen(s);		/* bare IPv6, no port */
	} else {
		const char *c = strchr(s, ':');

		hl = c ? (size_t)(c - s) : strlen(s);
		if (c)
			port = c + 1;
	}
	if (hl == 0 || hl >= sizeof host)
		return -1;
	memcpy(host, s, hl);
	host[hl] = '\0';
	if (port && parse_int(port, 1, 65535, &p) < 0)
		return -1;
	if (inet_pton(AF_INET, host, &out->u.sin.sin_addr) == 1) {
		out->u.sin.sin_family = AF_INET;
		out->u.sin.sin_port = htons((uint16_t)p);
		out->len = sizeof out->u.sin;
	} else if (inet_pton(AF_INET6, host, &out->u.sin6.sin6_addr) == 1) {
		out->u.sin6.sin6_family = AF_INET6;
		out->u.sin6.sin6_port = htons((uint16_t)p);
		out->len = sizeof out->u.sin6;
	} else {
		return -1;
	}
	addr_text(&out->u.sa, out->text, sizeof out->text);
	return 0;
}

/* A certificate name: letters, digits, '-', '_', '.', labels of 1..63,
 * at most 253 in all, not an IP address (BearSSL matches DNS names
 * only). Returns 1 if valid. */
static int
valid_cert_name(const char *s)
{
	size_t	 n = strlen(s), lab = 0, i;
	struct in6_addr a6;
	struct in_addr a4;

	if (n == 0 || n > 253 || inet_pton(AF_INET, s, &a4) == 1 ||
	    inet_pton(AF_INET6, s, &a6) == 1)
		return 0;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '.') {
			if (lab == 0)
				return 0;
			lab = 0;
			continue;
		}
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '-' || c == '_' ||
		    (c == '*' && i == 0)))
			return 0;
		if (++lab > 63)
			return 0;
	}
	return 1;
}

/* Adds one -l value (from flag or env: what tells the user where). */
static void
cfg_listen(struct config *cfg, const char *v, const char *what)
{
	if (cfg->nlisten == DOTP_MAX_LISTEN)
		cfg_die("too many %s addresses (at most %d)", what,
		    DOTP_MAX_LISTEN);
	if (parse_addr(v, 53, &cfg->listen[cfg->nlisten]) < 0)
		cfg_die("bad %s value '%s': expected ADDR[:PORT], e.g. "
		    "127.0.0.1:53 or [::1]:53", what, v);
	cfg->nlisten++;
}

/* Adds one -u value. */
static void
cfg_upstream(struct config *cfg, const char *v, const char *what)
{
	char	 addr[80];
	const char *hash = strchr(v, '#');
	size_t	 al;

	if (cfg->nup == DOTP_MAX_UPSTREAMS)
		cfg_die("too many %s values (at most %d)", what,
		    DOTP_MAX_UPSTREAMS);
	if (hash == NULL)
		cfg_die("bad %s value '%s': the certificate name is missing; "
		    "expected HOST[:PORT]#NAME, e.g. 1.1.1.1:853#"
		    "cloudflare-dns.com", what, v);
	al = (size_t)(hash - v);
	if (al >= sizeof addr)
		al = sizeof addr - 1;
	memcpy(addr, v, al);
	addr[al] = '\0';
	if (parse_addr(addr, 853, &cfg->up[cfg->nup]) < 0)
		cfg_die("bad %s value '%s': expected HOST[:PORT]#NAME with HOST "
		    "an IPv4 or [IPv6] address", what, v);
	if (!valid_cert_name(hash + 1))
		cfg_die("bad %s value '%s': '%s' is not a DNS name to check "
		    "the certificate against", what, v, hash + 1);
	str_copy(cfg->up_name[cfg->nup], sizeof cfg->up_name[0], hash + 1);
	cfg->nup++;
}

/* Splits an env list on commas and spaces, calling add for each item. */
static void
cfg_env_list(struct config *cfg, const char *env,
    void (*add)(struct config *, const char *, const char *))
{
	const char *s = getenv(env);
	char	 item[512];
	size_t	 n;

	if (s == NULL)
		return;
	while (*s) {
		n = strcspn(s, ", \t");
		if (n > 0) {
			if (n >= sizeof item)
				cfg_die("bad %s value: item too long", env);
			memcpy(item, s, n);
			item[n] = '\0';
			add(cfg, item, env);
		}
		s += n;
		s += strspn(s, ", \t");
	}
}

static void
cfg_timeout(struct config *cfg, const char *v, const char *what)
{
	long	 t;

	if (parse_int(v, 1, 600000, &t) < 0)
		cfg_die("bad %s value '%s': expected milliseconds 1..600000",
		    what, v);
	cfg->timeout_ms = (int)t;
}

/* A boolean env switch: "1"/"yes"/"true" on, "0"/"no"/"false"/"" off. */
static int
cfg_env_bool(const char *env)
{
	const char *s = getenv(env);

	if (s == NULL || !strcmp(s, "") || !strcmp(s, "0") ||
	    !strcmp(s, "no") || !strcmp(s, "false"))
		return 0;
	if (!strcmp(s, "1") || !strcmp(s, "yes") || !strcmp(s, "true"))
		return 1;
	cfg_die("bad %s value '%s': expected 1 or 0", env, s);
}

/*
 * Parses flags, then fills what they left unset from the environment,
 * then from the defaults. Exits 2 on a bad value, 0 after -h or -V.
 */
static void
cfg_parse(struct config *cfg, int argc, char *argv[])
{
	static const struct option longopts[] = {
		{ "listen",	required_argument, NULL, 'l' },
		{ "upstream",	required_argument, NULL, 'u' },
		{ "ca-file",	required_argument, NULL, 'C' },
		{ "timeout",	required_argument, NULL, 'T' },
		{ "verbose",	no_argument,	   NULL, 'v' },
		{ "quiet",	no_argument,	   NULL, 'q' },
		{ "help",	no_argument,	   NULL, 'h' },
		{ "version",	no_argument,	   NULL, 'V' },
		{ NULL, 0, NULL, 0 }
	};
	int	 c, verbose = -1, quiet = -1, have_timeout = 0;

	memset(cfg, 0, sizeof *cfg);
	cfg->timeout_ms = DOTP_TIMEOUT_MS;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":l:u:vqhV", longopts,
	    NULL)) != -1) {
		switch (c) {
		case 'l':
			cfg_listen(cfg, optarg, "--listen");
			break;
		case 'u':
			cfg_upstream(cfg, optarg, "--upstream");
			break;
		case 'C':
			cfg->ca_file = optarg;
			break;
		case 'T':
			cfg_timeout(cfg, optarg, "--timeout");
			have_timeout = 1;
			break;
		case 'v':
			verbose = 1;
			break;
		case 'q':
			quiet = 1;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case 'V':
			printf("dotp %s (BearSSL 0.6, %s trust anchors)\n",
			    DOTP_VERSION,
#ifndef DOTP_NO_EMBEDDED_TAS
			    "embedded Mozilla"
#else
			    "no embedded"
#endif
			    );
			exit(0);
		case ':':
			cfg_die("option '%s' needs a value; see dotp --help",
			    argv[optind - 1]);
		default:
			cfg_die("unknown option '%s'; see dotp --help",
			    argv[optind - 1]);
		}
	}
	if (optind < argc)
		cfg_die("unexpected argument '%s'; see dotp --help",
		    argv[optind]);
	if (cfg->nlisten == 0)
		cfg_env_list(cfg, "DOTP_LISTEN", cfg_listen);
	if (cfg->nup == 0)
		cfg_env_list(cfg, "DOTP_UPSTREAM", cfg_upstream);
	if (cfg->ca_file == NULL && getenv("DOTP_CA_FILE") &&
	    *getenv("DOTP_CA_FILE"))
		cfg->ca_file = getenv("DOTP_CA_FILE");
	if (!have_timeout && getenv("DOTP_TIMEOUT"))
		cfg_timeout(cfg, getenv("DOTP_TIMEOUT"), "DOTP_TIMEOUT");
	if (verbose < 0)
		verbose = cfg_env_bool("DOTP_VERBOSE");
	if (quiet < 0)
		quiet = cfg_env_bool("DOTP_QUIET");
	cfg->verbosity = verbose > 0 ? LOG_DEBUG : quiet > 0 ? LOG_ERR :
	    LOG_INFO;
	if (cfg->nlisten == 0) {
		cfg_listen(cfg, "127.0.0.1:53", "default listen");
		cfg_listen(cfg, "[::1]:53", "default listen");
	}
	if (cfg->nup == 0) {
		cfg_upstream(cfg, "1.1.1.1#cloudflare-dns.com", "default");
		cfg_upstream(cfg, "1.0.0.1#cloudflare-dns.com", "default");
	}
}

/* ==== 15. main ==== */

/* Opens the UDP and TCP sockets of one listen address. Returns 0, or
 * -1 with errno set and *what naming the failed step. */
static int
listen_open(const struct sockaddr_text *a, struct listener *l,
    const char **what)
{
	int	 one = 1, type;

	l->udp = l->tcp = -1;
	str_copy(l->label, sizeof l->label, a->text);
	for (type = 0; type < 2; type++) {
		int fd = socket(a->u.sa.sa_family, (type ? SOCK_STREAM :
		    SOCK_DGRAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

		*what = "socket";
		if (fd < 0)
			goto fail;
		if (type)
			l->tcp = fd;
		else
			l->udp = fd;
		(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
		    sizeof one);
		if (a->u.sa.sa_family == AF_INET6)
			(void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one,
			    sizeof one);
		*what = "bind";
		if (bind(fd, &a->u.sa, a->len) < 0)
			goto fail;
		*what = "listen";
		if (type && listen(fd, 128) < 0)
			goto fail;
	}
	return 0;
fail:
	fd_close(&l->udp);
	fd_close(&l->tcp);
	return -1;
}

/* Sets up everything from the config; exits on a start-up error. */
static void
setup(void)
{
	struct config *cfg = &G.cfg;
	const char *what, *why = NULL;
	br_x509_trust_anchor *tas;
	int	 i, n;

	if (cfg->ca_file) {
		if ((n = ta_load_pem(cfg->ca_file, &tas, &why)) < 0) {
			fprintf(stderr, "dotp: cannot use --ca-file '%s': %s\n",
			    cfg->ca_file, why);
			exit(2);
		}
		G.tas = tas;
		G.ntas = (size_t)n;
	} else {
#ifndef DOTP_NO_EMBEDDED_TAS
		G.tas = dotp_embedded_tas;
		G.ntas = DOTP_EMBEDDED_TAS_NUM;
#else
		fprintf(stderr, "dotp: built without embedded trust anchors; "
		    "use --ca-file\n");
		exit(2);
#endif
	}
	q_init();
	for (i = 0; i < DOTP_MAX_TCP; i++)
		G.tcp[i].fd = -1;
	for (i = 0; i < cfg->nup; i++) {
		struct upstream *u = &G.up[i];

		u->fd = -1;
		u->tx = (struct qlist)QLIST_ZERO;
		u->fl = (struct qlist)QLIST_ZERO;
		memcpy(&u->addr, &cfg->up[i].u, sizeof u->addr);
		u->addrlen = cfg->up[i].len;
		str_copy(u->label, sizeof u->label, cfg->up[i].text);
		str_copy(u->name, sizeof u->name, cfg->up_name[i]);
		tls_setup(u);
		if (br_ssl_engine_last_error(&u->cc.eng) != BR_ERR_OK) {
			fprintf(stderr, "dotp: TLS setup failed (error %d)\n",
			    br_ssl_engine_last_error(&u->cc.eng));
			exit(1);
		}
	}
	G.nup = cfg->nup;
	for (i = 0; i < cfg->nlisten; i++) {
		const struct sockaddr_text *a = &cfg->listen[i];

		if (listen_open(a, &G.lst[G.nlisten], &what) == 0) {
			G.nlisten++;
			continue;
		}
		/* A machine without IPv6 still serves its IPv4 addresses. */
		if (a->u.sa.sa_family == AF_INET6 && (errno == EAFNOSUPPORT ||
		    errno == EADDRNOTAVAIL) && cfg->nlisten > 1) {
			log_msg(LOG_WARN, "cannot bind %s: %s; IPv6 is not "
			    "available here, skipping it", a->text,
			    strerror(errno));
			continue;
		}
		fprintf(stderr, "dotp: cannot %s %s: %s%s\n",
		    strcmp(what, "bind") == 0 ? "bind" : what, a->text,
		    strerror(errno), errno == EACCES ?
		    " (ports below 1024 need root or CAP_NET_BIND_SERVICE; "
		    "or listen on a high port, e.g. -l 127.0.0.1:5353)" :
		    errno == EADDRINUSE ? " (another DNS server is running "
		    "there; stop it or choose another -l address)" : "");
		if (strcmp(what, "bind") != 0)
			fprintf(stderr, "dotp: cannot bind %s\n", a->text);
		exit(1);
	}
	if (G.nlisten == 0) {
		fprintf(stderr, "dotp: cannot bind any listen address\n");
		exit(1);
	}
}

/* The start line: what runs, where, trusting what. */
static void
log_start(void)
{
	char	 ls[DOTP_MAX_LISTEN * 50], us[DOTP_MAX_UPSTREAMS * 330];
	size_t	 a = 0, b = 0;
	int	 i;

	ls[0] = us[0] = '\0';
	for (i = 0; i < G.nlisten; i++)
		a += (size_t)snprintf(ls + a, sizeof ls - a, "%s%s",
		    i ? "," : "", G.lst[i].label);
	for (i = 0; i < G.nup; i++)
		b += (size_t)snprintf(us + b, sizeof us - b, "%s%s#%s",
		    i ? "," : "", G.up[i].label, G.up[i].name);
	log_msg(LOG_INFO, "dotp %s listening listen=%s upstreams=%s "
	    "anchors=%zu source=%s timeout_ms=%d", DOTP_VERSION, ls, us,
	    G.ntas, G.cfg.ca_file ? G.cfg.ca_file : "embedded",
	    G.cfg.timeout_ms);
}

/* Ends cleanly: close_notify to ready upstreams, SERVFAIL to what is
 * still waiting, sockets closed. */
static void
shutdown_all(void)
{
	int64_t	 now = now_ms();
	int	 i;

	while ((i = G.age.head) >= 0) {
		q_unlink(i);
		q_servfail(i);
	}
	for (i = 0; i < G.nup; i++) {
		struct upstream *u = &G.up[i];

		if (u->state == UP_READY) {
			br_ssl_engine_close(&u->cc.eng);
			up_pump(u, now);
		}
		fd_close(&u->fd);
	}
	for (i = 0; i < DOTP_MAX_TCP; i++)
		if (G.tcp[i].fd >= 0) {
			tcp_flush(&G.tcp[i]);
			tcp_close(&G.tcp[i]);
		}
	for (i = 0; i < G.nlisten; i++) {
		fd_close(&G.lst[i].udp);
		fd_close(&G.lst[i].tcp);
	}
	log_msg(LOG_INFO, "dotp exiting queries=%lu answers=%lu servfail=%lu "
	    "dropped=%lu stray=%lu", G.st.queries, G.st.answers,
	    G.st.servfail, G.st.dropped, G.st.stray);
}

#ifndef DOTP_NO_MAIN
int
main(int argc, char *argv[])
{
	struct sigaction sa;

	cfg_parse(&G.cfg, argc, argv);
	log_verbosity = G.cfg.verbosity;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	setup();
	log_start();
	loop_run();
	log_msg(LOG_INFO, "signal %d, shutting down", (int)got_signal);
	shutdown_all();
	return 0;
}
#endif /* DOTP_NO_MAIN */
