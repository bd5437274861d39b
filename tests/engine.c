/*
 * The state-machine test of dotp's upstream engine. The real engine of
 * dotp.c (connections, the query table, upstream health, driven by
 * loop_pass()) talks to an in-process BearSSL server on an abstract
 * unix socket, and its TCP clients are socketpair()s held by the test.
 * The server is scripted per connection: it answers a batch newest
 * first, recycles connections after K answers (close_notify), resets
 * them, cuts a frame in half, stalls, ends the stream in the handshake
 * or trickles every byte. Every case checks that each client query gets
 * exactly one answer, its own, and what the engine counted or learned
 * on the way.
 *
 * Each case runs in a fork()ed child, with a fresh G, under alarm().
 * Run from the repository root (make check), or set ENGINE_DIR to the
 * directory that holds the certificates (default tests/engine); set
 * ENGINE_VERBOSE=1 for dotp's debug log; name cases to run only those.
 */
#define DOTP_NO_MAIN
#include "../dotp.c"

#include <sys/ioctl.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <linux/sockios.h>

#include "check.h"

/* A case that runs longer than this hangs: its child is killed. */
#define CASE_SECONDS	10
/* The engine's timers in every case (the flags of engine_start()):
 * short, so that the stall and failure paths take milliseconds. */
#define T_ATTEMPT_MS	100
#define T_TIMEOUT_MS	1500
/* Slack for "by --timeout at the latest": the test's loop sleeps 1 ms
 * at most, so a deadline is seen within a few. */
#define T_SLACK_MS	50

/* The harness's tables: far above what a case uses; running out counts
 * as a harness error (S.errors), which fails the case. */
#define SRV_MAX_CONNS	64
#define SRV_HELD_MAX	128
#define SRV_OUT_MAX	16384
#define SRV_SEEN_MAX	256
#define T_MAX_CLIENTS	8
#define T_MAX_QUERIES	256
#define T_QMAX		(DNS_HEADER_LEN + DNS_NAME_MAX + 4)

/* ==== The server ==== */

/* How a server connection begins. */
enum srv_hs {
	HS_OK,			/* a normal handshake */
	HS_EOF_ACCEPT,		/* closed right after accept() */
	HS_EOF_HELLO		/* closed once the ClientHello is read */
};

/* What a server connection does after `limit` answers. */
enum srv_end {
	END_NONE,		/* nothing: it answers everything */
	END_NOTIFY,		/* close_notify, then FIN */
	END_FIN,		/* FIN, no close_notify */
	END_RST,		/* stops reading; closes with unread bytes */
	END_HALF,		/* 2-byte length and 5 bytes of the next
				   answer, then FIN */
	END_STALL		/* reads on, never answers again */
};

/* The script of one server connection. */
struct srv_rule {
	enum srv_hs hs;
	int	 batch;		/* hold answers until this many queries
				   wait, then answer them newest first */
	int	 limit;		/* answers before end */
	enum srv_end end;
};

enum srv_phase {
	SP_TLS,			/* the TLS session runs */
	SP_DRAIN,		/* FIN sent: discard until dotp closes */
	SP_DEAF,		/* reads nothing: close once bytes wait */
	SP_DONE			/* closed */
};

/* One connection dotp opened to the server. */
struct sconn {
	int	 fd;
	int	 n;		/* accept order, from 0 */
	enum srv_phase phase;
	const struct srv_rule *rule;
	unsigned cap_at_accept;	/* G.up[0].cap when it was accepted */
	int64_t	 t_accept, t_first_query, t_end;
	int	 received;	/* queries read (answered or not) */
	int	 answered;
	int	 records;	/* application data records read */
	int	 bad_records;	/* ... not holding exactly one whole frame */
	int	 batch_done;
	int	 hello_seen;	/* HS_EOF_HELLO: the ClientHello was read */
	int	 notified;	/* close_notify queued */
	int	 by_peer;	/* dotp ended it (EOF, error, close_notify) */
	int	 unread_at_close;	/* END_RST: bytes left unread */
	enum srv_end ending;	/* set once limit is reached */
	br_ssl_server_context sc;
	unsigned char iobuf[BR_SSL_BUFSIZE_BIDI];
	size_t	 rx_have;
	unsigned char rx[2 + DNS_MSG_MAX];
	int	 nheld;		/* queries read, not answered yet */
	size_t	 held_len[SRV_HELD_MAX];
	unsigned char held[SRV_HELD_MAX][DOTP_QUERY_MAX + DOTP_PAD_ROOM];
	size_t	 out_off, out_len;	/* answer bytes not in the engine */
	unsigned char out[SRV_OUT_MAX];
};

static struct {
	/* The PKI, loaded once by the parent. */
	br_x509_certificate chain[4];
	size_t	 chain_len;
	br_ec_private_key key;
	unsigned char key_x[BR_EC_KBUF_PRIV_MAX_SIZE];
	br_ssl_session_cache_lru cache;
	unsigned char cache_buf[4096];
	/* The case's script. */
	struct srv_rule rules[8];
	int	 nrules;	/* connection n: rules[min(n, nrules - 1)] */
	int	 trickle;	/* one byte per pass each way */
	size_t	 rec_size;	/* answer bytes per record; 0: one frame */
	/* What happened. */
	int	 lfd;
	struct sconn *c[SRV_MAX_CONNS];
	int	 nc;
	int	 errors;	/* the harness's own troubles */
	int	 bad_queries;	/* frames that are no DNS query */
	int	 tls_errors;	/* sessions the server's engine failed */
	unsigned long trickled;	/* bytes sent one at a time */
	int	 nseen;		/* times each question was read */
	struct {
		size_t	 len;
		unsigned char q[T_QMAX];
		int	 n;
	} seen[SRV_SEEN_MAX];
} S;

/* ==== The clients and what the test sees of dotp ==== */

struct tclient {
	int	 fd;		/* the test's end; dotp owns the other */
	int	 eof;
	uint16_t next_id;
	size_t	 rx_have;
	unsigned char rx[2 + DNS_MSG_MAX];
};

struct tquery {
	int	 cl;
	uint16_t id;
	size_t	 len;
	unsigned char m[T_QMAX];
	int	 answers;
	int	 rcode;
	int64_t	 sent_at, answered_at;
};

static struct {
	struct tclient cl[T_MAX_CLIENTS];
	int	 ncl;
	struct tquery q[T_MAX_QUERIES];
	int	 nq;
	int	 want;		/* for answered_want() */
	int	 stray;		/* answers with an ID the client never sent */
	int	 wrong;		/* ... with another question, or no QR */
	int	 dup;		/* second answers to one query */
	int	 closed;	/* clients dotp closed */
	int	 down_seen;	/* G.up[0].down was seen set */
	unsigned long blocked;	/* passes that left dotp's send() short */
	uint32_t small_gen[64];	/* trickle: connection given small buffers */
} T;

static const char *data_dir = "tests/engine";

/* ==== Certificates ==== */

static void
die(const char *what)
{
	fprintf(stderr, "engine: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* One PEM object's DER, collected by the decoder. */
static unsigned char der_buf[8192];
static size_t der_len;
static int der_over;

static void
der_append(void *ctx, const void *data, size_t len)
{
	(void)ctx;
	if (len > sizeof der_buf - der_len) {
		der_over = 1;
		return;
	}
	memcpy(der_buf + der_len, data, len);
	der_len += len;
}

/* Calls fn with the DER of each PEM object called name in file; returns
 * how many there were. Exits on an unreadable or malformed file: the
 * test cannot run without its data. */
static int
pem_each(const char *file, const char *name,
    void (*fn)(const unsigned char *, size_t))
{
	static unsigned char text[65536];
	char	 path[512];
	br_pem_decoder_context pc;
	size_t	 len = 0, off = 0;
	ssize_t	 r;
	int	 fd, in = 0, n = 0;

	snprintf(path, sizeof path, "%s/%s", data_dir, file);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		die(path);
	while ((r = read(fd, text + len, sizeof text - len)) > 0)
		len += (size_t)r;
	close(fd);
	if (r < 0 || len == sizeof text)
		die(path);
	br_pem_decoder_init(&pc);
	while (off < len) {
		off += br_pem_decoder_push(&pc, text + off, len - off);
		switch (br_pem_decoder_event(&pc)) {
		case BR_PEM_BEGIN_OBJ:
			in = strcmp(br_pem_decoder_name(&pc), name) == 0;
			der_len = 0;
			der_over = 0;
			br_pem_decoder_setdest(&pc, in ? der_append : NULL,
			    NULL);
			break;
		case BR_PEM_END_OBJ:
			if (in && !der_over) {
				fn(der_buf, der_len);
				n++;
			}
			in = 0;
			break;
		case BR_PEM_ERROR:
			errno = EINVAL;
			die(path);
			break;
		default:
			break;
		}
	}
	return n;
}

static void
add_cert(const unsigned char *der, size_t len)
{
	unsigned char *p;

	if (S.chain_len == sizeof S.chain / sizeof S.chain[0] ||
	    (p = malloc(len)) == NULL)
		die("server.pem");
	memcpy(p, der, len);
	S.chain[S.chain_len].data = p;
	S.chain[S.chain_len++].data_len = len;
}

static void
add_key(const unsigned char *der, size_t len)
{
	br_skey_decoder_context dc;
	const br_ec_private_key *ek;

	br_skey_decoder_init(&dc);
	br_skey_decoder_push(&dc, der, len);
	if (br_skey_decoder_last_error(&dc) != 0 ||
	    br_skey_decoder_key_type(&dc) != BR_KEYTYPE_EC) {
		errno = EINVAL;
		die("server.key: not an EC key");
	}
	ek = br_skey_decoder_get_ec(&dc);
	memcpy(S.key_x, ek->x, ek->xlen);
	S.key.curve = ek->curve;
	S.key.x = S.key_x;
	S.key.xlen = ek->xlen;
}

/* The server's chain and key (tests/engine/README says how they were
 * made), and its session cache, so that reconnections resume. */
static void
pki_load(void)
{
	errno = EINVAL;
	if (pem_each("server.pem", "CERTIFICATE", add_cert) < 1 ||
	    pem_each("server.key", "PRIVATE KEY", add_key) != 1)
		die("server.pem and server.key: a chain and one key");
	br_ssl_session_cache_lru_init(&S.cache, S.cache_buf,
	    sizeof S.cache_buf);
}

/* ==== Server connections ==== */

/* The smallest socket buffers: every send() and recv() of a trickle
 * meets a full or an empty buffer. */
static void
small_buffers(int fd)
{
	int	 one = 1;

	(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &one, sizeof one);
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &one, sizeof one);
}

/* Listens on an abstract unix socket and points upstream 0 at it: every
 * connection dotp opens comes here. */
static void
srv_listen(void)
{
	struct sockaddr_un sun;
	socklen_t len;
	int	 n;

	memset(&sun, 0, sizeof sun);
	sun.sun_family = AF_UNIX;
	n = snprintf(sun.sun_path + 1, sizeof sun.sun_path - 1,
	    "dotp-engine-%ld", (long)getpid());
	len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
	    (size_t)n);
	if (len > sizeof G.up[0].addr)
		die("abstract socket name too long");
	S.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
	    0);
	if (S.lfd < 0 || bind(S.lfd, (struct sockaddr *)&sun, len) < 0 ||
	    listen(S.lfd, 64) < 0)
		die("server socket");
	memcpy(&G.up[0].addr, &sun, len);
	G.up[0].addrlen = len;
}

static void
srv_close(struct sconn *sc, int64_t now)
{
	if (sc->fd >= 0)
		close(sc->fd);
	sc->fd = -1;
	sc->phase = SP_DONE;
	sc->t_end = now;
}

/* Counts one more reading of question q (header and question). */
static void
srv_seen(const unsigned char *m, size_t len)
{
	struct qinfo qi;
	int	 k;

	if (dns_check_query(m, len, &qi) != QC_OK || qi.qend > T_QMAX)
		return;
	for (k = 0; k < S.nseen; k++)
		if (S.seen[k].len == qi.qend - DNS_HEADER_LEN &&
		    memcmp(S.seen[k].q, m + DNS_HEADER_LEN,
		    S.seen[k].len) == 0) {
			S.seen[k].n++;
			return;
		}
	if (S.nseen == SRV_SEEN_MAX) {
		S.errors++;
		return;
	}
	S.seen[k].len = qi.qend - DNS_HEADER_LEN;
	memcpy(S.seen[k].q, m + DNS_HEADER_LEN, S.seen[k].len);
	S.seen[k].n = 1;
	S.nseen++;
}

/* The most times one question was read, over all connections. */
static int
srv_seen_max(void)
{
	int	 k, max = 0;

	for (k = 0; k < S.nseen; k++)
		if (S.seen[k].n > max)
			max = S.seen[k].n;
	return max;
}

/* Queues the answer to query m (header and question echoed, QR and RA,
 * NOERROR, one A record with TTL 60, so that dotp may cache it, and an
 * OPT when the query had one) as one frame, or only its first keep
 * bytes. */
static void
srv_answer(struct sconn *sc, const unsigned char *m, size_t len, size_t keep)
{
	static const unsigned char rr[16] = {
		0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1
	};
	struct qinfo qi;
	unsigned char a[DNS_UDP_MIN + 16];
	size_t	 n, opt;

	if (dns_check_query(m, len, &qi) != QC_OK ||
	    (n = dns_make_error(m, len, qi.qend, qi.has_opt, 0, a,
	    sizeof a - sizeof rr)) == 0) {
		S.bad_queries++;
		return;
	}
	opt = qi.has_opt ? DNS_OPT_HEADER : 0;	/* dns_make_error's OPT */
	memmove(a + n - opt + sizeof rr, a + n - opt, opt);
	memcpy(a + n - opt, rr, sizeof rr);
	wr16(a + DNS_OFF_ANCOUNT, 1);
	n += sizeof rr;
	if (keep == 0 || keep > 2 + n)
		keep = 2 + n;
	if (sc->out_off > 0) {
		memmove(sc->out, sc->out + sc->out_off,
		    sc->out_len - sc->out_off);
		sc->out_len -= sc->out_off;
		sc->out_off = 0;
	}
	if (keep > sizeof sc->out - sc->out_len) {
		S.errors++;
		return;
	}
	wr16(sc->out + sc->out_len, (uint16_t)n);
	memcpy(sc->out + sc->out_len + 2, a, keep - 2);
	sc->out_len += keep;
}

/* Drops held query k. */
static void
srv_unhold(struct sconn *sc, int k)
{
	memmove(sc->held[k], sc->held[k + 1],
	    (size_t)(sc->nheld - k - 1) * sizeof sc->held[0]);
	memmove(&sc->held_len[k], &sc->held_len[k + 1],
	    (size_t)(sc->nheld - k - 1) * sizeof sc->held_len[0]);
	sc->nheld--;
}

/* Answers what the script lets it answer now. */
static void
srv_work(struct sconn *sc)
{
	static unsigned char tmp[sizeof sc->held[0]];
	const struct srv_rule *r = sc->rule;
	size_t	 l;
	int	 j, k;

	while (sc->phase == SP_TLS && sc->ending == END_NONE) {
		if (r->end != END_NONE && sc->answered >= r->limit) {
			if (r->end == END_HALF) {
				if (sc->nheld == 0)
					return;	/* cut the next one */
				srv_answer(sc, sc->held[0], sc->held_len[0],
				    2 + 5);
			}
			sc->ending = r->end;
			return;
		}
		if (sc->nheld == 0)
			return;
		if (r->batch > 0 && !sc->batch_done) {
			if (sc->nheld < r->batch)
				return;
			/* Newest first: reverse the held queries. */
			for (k = 0; k < sc->nheld / 2; k++) {
				j = sc->nheld - 1 - k;
				l = sc->held_len[k];
				memcpy(tmp, sc->held[k], sizeof tmp);
				memcpy(sc->held[k], sc->held[j], sizeof tmp);
				memcpy(sc->held[j], tmp, sizeof tmp);
				sc->held_len[k] = sc->held_len[j];
				sc->held_len[j] = l;
			}
			sc->batch_done = 1;
		}
		srv_answer(sc, sc->held[0], sc->held_len[0], 0);
		sc->answered++;
		srv_unhold(sc, 0);
	}
}

/* One query frame read on sc. */
static void
srv_query(struct sconn *sc, const unsigned char *m, size_t len, int64_t now)
{
	sc->received++;
	if (sc->t_first_query == 0)
		sc->t_first_query = now;
	srv_seen(m, len);
	if (sc->phase != SP_TLS || sc->ending != END_NONE)
		return;		/* closing or stalled: never answered */
	if (sc->nheld == SRV_HELD_MAX || len > sizeof sc->held[0]) {
		S.errors++;
		return;
	}
	memcpy(sc->held[sc->nheld], m, len);
	sc->held_len[sc->nheld++] = len;
	srv_work(sc);
}

/*
 * The plaintext of one record (BearSSL's server engine hands out one
 * record's at a time, and it is acked whole): dotp seals each query in
 * a record of its own, so a record must hold exactly one whole frame,
 * nothing carried over from the last one. The frames are reassembled
 * all the same, so that the server keeps working when that fails.
 */
static void
srv_recvapp(struct sconn *sc, int64_t now)
{
	unsigned char *buf;
	size_t	 len, off = 0;
	long	 fl;

	buf = br_ssl_engine_recvapp_buf(&sc->sc.eng, &len);
	sc->records++;
	if (sc->rx_have != 0 || len < 2 || (size_t)rd16(buf) + 2 != len)
		sc->bad_records++;
	if (len > sizeof sc->rx - sc->rx_have) {
		S.errors++;
		sc->rx_have = 0;
	}
	memcpy(sc->rx + sc->rx_have, buf, len);
	br_ssl_engine_recvapp_ack(&sc->sc.eng, len);
	sc->rx_have += len;
	while ((fl = frame_complete(sc->rx + off, sc->rx_have - off,
	    DNS_HEADER_LEN, DNS_MSG_MAX)) > 0) {
		srv_query(sc, sc->rx + off + 2, (size_t)fl - 2, now);
		off += (size_t)fl;
	}
	if (fl < 0) {
		S.bad_queries++;
		sc->rx_have = 0;
		return;
	}
	memmove(sc->rx, sc->rx + off, sc->rx_have - off);
	sc->rx_have -= off;
}

/* Moves queued answer bytes into the engine: one frame per record, or
 * rec_size bytes per record, which splits frames across records and
 * joins the end of one to the start of the next. */
static void
srv_sendapp(struct sconn *sc)
{
	unsigned char *buf;
	size_t	 avail, n, rem = sc->out_len - sc->out_off;

	buf = br_ssl_engine_sendapp_buf(&sc->sc.eng, &avail);
	if (S.rec_size > 0)
		n = S.rec_size;
	else
		n = rem >= 2 ? 2 + (size_t)rd16(sc->out + sc->out_off) : rem;
	if (n > rem)
		n = rem;	/* END_HALF: the cut frame */
	if (n > avail)
		n = avail;
	memcpy(buf, sc->out + sc->out_off, n);
	br_ssl_engine_sendapp_ack(&sc->sc.eng, n);
	br_ssl_engine_flush(&sc->sc.eng, 0);
	sc->out_off += n;
	if (sc->out_off == sc->out_len)
		sc->out_off = sc->out_len = 0;
}

/* The script's end, once every answer before it is on the wire. */
static void
srv_end(struct sconn *sc)
{
	switch (sc->ending) {
	case END_NOTIFY:
		if (!sc->notified) {
			br_ssl_engine_close(&sc->sc.eng);
			sc->notified = 1;
			return;
		}
		/* FALLTHROUGH */
	case END_FIN:
	case END_HALF:
		/* A FIN, and dotp's later bytes read and dropped: a clean
		 * end, not a reset. */
		(void)shutdown(sc->fd, SHUT_WR);
		sc->phase = SP_DRAIN;
		break;
	case END_RST:
		sc->phase = SP_DEAF;
		break;
	default:
		break;
	}
}

/* SP_DRAIN: dotp's bytes are dropped until it closes. */
static int
srv_drain(struct sconn *sc, int64_t now)
{
	unsigned char junk[4096];
	ssize_t	 n;
	int	 progress = 0;

	while ((n = recv(sc->fd, junk, sizeof junk, 0)) > 0)
		progress = 1;
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK ||
	    errno == EINTR))
		return progress;
	srv_close(sc, now);
	return 1;
}

/*
 * SP_DEAF: once dotp's bytes wait unread, close: a unix socket closed
 * with unread bytes in its receive queue makes the peer's next recv()
 * fail with ECONNRESET, as a TCP RST does.
 */
static int
srv_deaf(struct sconn *sc, int64_t now)
{
	int	 unread = 0;

	if (ioctl(sc->fd, FIONREAD, &unread) < 0 || unread == 0)
		return 0;
	sc->unread_at_close = unread;
	srv_close(sc, now);
	return 1;
}

/* Bytes sent on fd that the peer has not read yet. */
static int
outq(int fd)
{
	int	 n = 0;

	if (ioctl(fd, SIOCOUTQ, &n) < 0)
		return 0;
	return n;
}

/*
 * Runs connection sc until no step makes progress, like dotp's own
 * pump. Trickling, it sends one byte a pass, and only when dotp has
 * read the last one, and reads one byte a pass. Returns 1 on progress.
 */
static int
srv_pump(struct sconn *sc, int64_t now)
{
	br_ssl_engine_context *eng = &sc->sc.eng;
	unsigned char *buf;
	unsigned st;
	size_t	 len;
	ssize_t	 n;
	int	 progress = 0, sent = 0, got = 0;

	if (sc->phase == SP_DRAIN)
		return srv_drain(sc, now);
	if (sc->phase == SP_DEAF)
		return srv_deaf(sc, now);
	while (sc->phase == SP_TLS) {
		st = br_ssl_engine_current_state(eng);
		if (st & BR_SSL_CLOSED) {
			/* dotp's close_notify, or a record that failed:
			 * dotp never sends one. */
			if (br_ssl_engine_last_error(eng) != BR_ERR_OK)
				S.tls_errors++;
			if (sc->notified) {
				srv_end(sc);
				return 1;
			}
			sc->by_peer = 1;
			srv_close(sc, now);
			return 1;
		}
		if (sc->rule->hs == HS_EOF_HELLO && (st & BR_SSL_SENDREC)) {
			/* The ClientHello is read and the reply is ready:
			 * end the stream instead. */
			sc->hello_seen = 1;
			srv_close(sc, now);
			return 1;
		}
		if ((st & BR_SSL_SENDREC) && !sent &&
		    (!S.trickle || outq(sc->fd) == 0)) {
			buf = br_ssl_engine_sendrec_buf(eng, &len);
			n = send(sc->fd, buf, S.trickle ? 1 : len,
			    MSG_NOSIGNAL);
			if (n > 0) {
				br_ssl_engine_sendrec_ack(eng, (size_t)n);
				progress = 1;
				if (S.trickle) {
					sent = 1;
					S.trickled++;
				}
				continue;
			}
			if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
			    errno != EINTR) {
				sc->by_peer = 1;
				srv_close(sc, now);
				return 1;
			}
		}
		if (st & BR_SSL_RECVAPP) {
			srv_recvapp(sc, now);
			progress = 1;
			continue;
		}
		if ((st & BR_SSL_RECVREC) && !got) {
			buf = br_ssl_engine_recvrec_buf(eng, &len);
			n = recv(sc->fd, buf, S.trickle ? 1 : len, 0);
			if (n > 0) {
				br_ssl_engine_recvrec_ack(eng, (size_t)n);
				progress = 1;
				got = S.trickle;
				continue;
			}
			if (n == 0 || (errno != EAGAIN &&
			    errno != EWOULDBLOCK && errno != EINTR)) {
				sc->by_peer = 1;
				srv_close(sc, now);
				return 1;
			}
		}
		if ((st & BR_SSL_SENDAPP) && sc->out_off < sc->out_len) {
			srv_sendapp(sc);
			progress = 1;
			continue;
		}
		if (sc->ending != END_NONE && sc->ending != END_STALL &&
		    sc->out_off == sc->out_len && !(st & BR_SSL_SENDREC)) {
			srv_end(sc);
			progress = 1;
			continue;
		}
		break;
	}
	return progress;
}

/* Accepts dotp's new connections and wraps a BearSSL server (TLS 1.2
 * only, as dotp speaks) around each. */
static int
srv_accept(int64_t now)
{
	struct sconn *sc;
	int	 fd, progress = 0;

	while ((fd = accept4(S.lfd, NULL, NULL, SOCK_NONBLOCK |
	    SOCK_CLOEXEC)) >= 0) {
		progress = 1;
		if (S.nc == SRV_MAX_CONNS ||
		    (sc = calloc(1, sizeof *sc)) == NULL) {
			S.errors++;
			close(fd);
			continue;
		}
		sc->fd = fd;
		sc->n = S.nc;
		sc->rule = &S.rules[S.nc < S.nrules ? S.nc : S.nrules - 1];
		sc->cap_at_accept = G.up[0].cap;
		sc->t_accept = now;
		S.c[S.nc++] = sc;
		if (S.trickle)
			small_buffers(fd);
		if (sc->rule->hs == HS_EOF_ACCEPT) {
			srv_close(sc, now);
			continue;
		}
		br_ssl_server_init_full_ec(&sc->sc, S.chain, S.chain_len,
		    BR_KEYTYPE_EC, &S.key);
		br_ssl_engine_set_versions(&sc->sc.eng, BR_TLS12, BR_TLS12);
		br_ssl_engine_set_buffer(&sc->sc.eng, sc->iobuf,
		    sizeof sc->iobuf, 1);
		br_ssl_server_set_cache(&sc->sc, &S.cache.vtable);
		if (!br_ssl_server_reset(&sc->sc)) {
			S.errors++;
			srv_close(sc, now);
		}
	}
	return progress;
}

/* One server pass: accept, then pump every open connection. */
static int
srv_poll(int64_t now)
{
	int	 k, progress = srv_accept(now);

	for (k = 0; k < S.nc; k++)
		if (S.c[k]->phase != SP_DONE)
			progress |= srv_pump(S.c[k], now);
	return progress;
}

static int
srv_sum_bad_records(void)
{
	int	 k, n = 0;

	for (k = 0; k < S.nc; k++)
		n += S.c[k]->bad_records;
	return n;
}

static int
srv_sum_received(void)
{
	int	 k, n = 0;

	for (k = 0; k < S.nc; k++)
		n += S.c[k]->received;
	return n;
}

/* ==== Clients ==== */

/* A new TCP client of dotp: one end of a socketpair, the other adopted
 * by tcp_attach(). */
static int
client_new(void)
{
	struct sockaddr_in lo = { .sin_family = AF_INET };
	int	 sv[2], k = T.ncl;

	lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (k == T_MAX_CLIENTS || socketpair(AF_UNIX, SOCK_STREAM |
	    SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		die("client socketpair");
	T.cl[k].fd = sv[0];
	T.cl[k].next_id = 0x100;
	ok(tcp_attach(sv[1], (struct sockaddr *)&lo, now_ms()) >= 0, "tcp_attach takes client %d",
	    k);
	T.ncl++;
	return k;
}

/*
 * Client cl sends one query for qname, or (NULL) for a name no other
 * query of the case asks for, so that an answer delivered to the wrong
 * query shows in its question; IDs repeat across clients on purpose.
 */
static void
ask_as(int cl, const char *qname)
{
	unsigned char frame[2 + T_QMAX];
	char	 name[64];
	ssize_t	 w;
	struct tquery *q = &T.q[T.nq];

	if (T.nq == T_MAX_QUERIES)
		die("too many queries");
	q->cl = cl;
	q->id = T.cl[cl].next_id++;
	if (qname != NULL)
		snprintf(name, sizeof name, "%s", qname);
	else
		snprintf(name, sizeof name, "q%d.c%d.engine.test", T.nq, cl);
	q->len = mkquery(q->m, q->id, name, 1, 0, 0);
	q->sent_at = now_ms();
	wr16(frame, (uint16_t)q->len);
	memcpy(frame + 2, q->m, q->len);
	w = send(T.cl[cl].fd, frame, 2 + q->len, MSG_NOSIGNAL);
	if (w != (ssize_t)(2 + q->len))
		die("client send");
	T.nq++;
}

/* Client cl asks n queries for names of their own (ask_as). */
static void
ask(int cl, int n)
{
	while (n-- > 0)
		ask_as(cl, NULL);
}

/* One answer frame that reached client cl. */
static void
tc_answer(int cl, const unsigned char *a, size_t len, int64_t now)
{
	struct tquery *q = NULL;
	size_t	 qlen;
	int	 k;

	for (k = 0; k < T.nq; k++)
		if (T.q[k].cl == cl && T.q[k].id == rd16(a))
			q = &T.q[k];
	if (q == NULL) {
		T.stray++;
		return;
	}
	qlen = q->len - DNS_HEADER_LEN;
	if (!(rd16(a + DNS_OFF_FLAGS) & DNS_FLAG_QR) ||
	    rd16(a + DNS_OFF_QDCOUNT) != 1 || len < q->len ||
	    memcmp(a + DNS_HEADER_LEN, q->m + DNS_HEADER_LEN, qlen) != 0) {
		T.wrong++;
		return;
	}
	if (q->answers++ > 0) {
		T.dup++;
		return;
	}
	q->rcode = rd16(a + DNS_OFF_FLAGS) & 0xf;
	q->answered_at = now;
}

/* Reads what dotp wrote to the clients. Returns 1 on progress. */
static int
clients_read(int64_t now)
{
	int	 k, progress = 0;
	ssize_t	 n;
	size_t	 off;
	long	 fl;

	for (k = 0; k < T.ncl; k++) {
		struct tclient *c = &T.cl[k];

		while (!c->eof && (n = recv(c->fd, c->rx + c->rx_have,
		    sizeof c->rx - c->rx_have, 0)) != -1) {
			progress = 1;
			if (n == 0) {
				c->eof = 1;
				T.closed++;
				break;
			}
			c->rx_have += (size_t)n;
			off = 0;
			while ((fl = frame_complete(c->rx + off,
			    c->rx_have - off, DNS_HEADER_LEN,
			    DNS_MSG_MAX)) > 0) {
				tc_answer(k, c->rx + off + 2,
				    (size_t)fl - 2, now);
				off += (size_t)fl;
			}
			if (fl < 0) {
				T.wrong++;
				c->rx_have = off = 0;
			}
			memmove(c->rx, c->rx + off, c->rx_have - off);
			c->rx_have -= off;
		}
	}
	return progress;
}

/* ==== Driving dotp ==== */

/* What the test looks at in dotp between passes: whether upstream 0
 * went down, whether a send() of dotp's was left short (the socket
 * was full), and, trickling, each new connection gets small buffers. */
static void
watch(void)
{
	int	 i;

	if (G.up[0].down)
		T.down_seen = 1;
	for (i = 0; i < G.nconn && i < 64; i++) {
		struct conn *c = &G.conn[i];

		if (c->fd < 0)
			continue;
		if (S.trickle && T.small_gen[i] != c->gen) {
			small_buffers(c->fd);
			T.small_gen[i] = c->gen;
		}
		if (c->out_off < c->out_len)
			T.blocked++;
	}
}

/*
 * Runs dotp's loop, the server and the clients in turn until done()
 * holds (NULL: never) or limit_ms pass. The test's descriptors are not
 * in dotp's poll set, so a pass sleeps 1 ms at most, and not at all
 * after the server or a client made progress. Returns done()'s last
 * value (1 for NULL).
 */
static int
run_until(int (*done)(void), int64_t limit_ms)
{
	int64_t	 end = now_ms() + limit_ms, now;
	int	 busy = 1;

	for (;;) {
		loop_pass(busy ? 0 : 1);
		now = now_ms();
		busy = srv_poll(now);
		busy |= clients_read(now);
		watch();
		if (done != NULL && done())
			return 1;
		if (now >= end)
			return done == NULL;
	}
}

static int
answered_count(void)
{
	int	 k, n = 0;

	for (k = 0; k < T.nq; k++)
		n += T.q[k].answers > 0;
	return n;
}

static int
all_answered(void)
{
	return answered_count() == T.nq;
}

static int
answered_want(void)
{
	return answered_count() >= T.want;
}

static int
count_rcode(int rcode)
{
	int	 k, n = 0;

	for (k = 0; k < T.nq; k++)
		n += T.q[k].answers > 0 && T.q[k].rcode == rcode;
	return n;
}

/* The longest a query waited for its answer. */
static int64_t
max_wait(void)
{
	int64_t	 w = 0;
	int	 k;

	for (k = 0; k < T.nq; k++)
		if (T.q[k].answers > 0 && T.q[k].answered_at -
		    T.q[k].sent_at > w)
			w = T.q[k].answered_at - T.q[k].sent_at;
	return w;
}

/*
 * The checks of every case: each query answered exactly once, with its
 * own ID and question; no stray or second answer; nothing left in
 * flight; every record the server read held one whole query and
 * decrypted; dotp took no stray or mismatched answer (the server
 * answers only what was sent on that connection). Runs on a little
 * first: a duplicate comes late.
 */
static void
check_once(const char *name)
{
	int	 k, once = 0;

	(void)run_until(NULL, 30);
	for (k = 0; k < T.nq; k++)
		once += T.q[k].answers == 1;
	ok(once == T.nq, "%s: %d of %d queries answered exactly once", name,
	    once, T.nq);
	ok(T.dup == 0, "%s: %d second answers", name, T.dup);
	ok(T.stray == 0 && T.wrong == 0, "%s: %d answers to IDs the client "
	    "did not send, %d to another question", name, T.stray, T.wrong);
	ok(T.closed == 0, "%s: dotp closed %d clients", name, T.closed);
	ok(G.qlive == 0, "%s: %u queries still in flight", name, G.qlive);
	ok(srv_sum_bad_records() == 0, "%s: %d records that were not one "
	    "whole query frame", name, srv_sum_bad_records());
	ok(G.ctr[CTR_STRAY] == 0 && G.ctr[CTR_MISMATCHED] == 0, "%s: dotp "
	    "counted %lu stray and %lu mismatched answers", name,
	    G.ctr[CTR_STRAY], G.ctr[CTR_MISMATCHED]);
	ok(S.bad_queries == 0 && S.tls_errors == 0 && S.errors == 0, "%s: "
	    "server saw %d bad queries, %d TLS errors, %d harness errors",
	    name, S.bad_queries, S.tls_errors, S.errors);
}

/*
 * dotp's real option parser and set-up, then upstream 0 pointed at the
 * server. The options every case shares come first; extra (NULL-ended)
 * adds to or overrides them (the last value of a flag wins).
 */
static void
engine_start(const char *const *extra)
{
	static char ca[512], at[16], to[16];
	const char *base[] = {
		"dotp", "-u", "127.0.0.1:853#dot.test", "--ca-file", ca,
		"--attempt-timeout", at, "--timeout", to,
		"--connect-timeout", "500", "--handshake-timeout", "500", "-q"
	};
	char	*argv[64];
	int	 argc = 0;
	size_t	 k;

	snprintf(ca, sizeof ca, "%s/ca.pem", data_dir);
	snprintf(at, sizeof at, "%d", T_ATTEMPT_MS);
	snprintf(to, sizeof to, "%d", T_TIMEOUT_MS);
	for (k = 0; k < sizeof base / sizeof base[0]; k++)
		argv[argc++] = (char *)base[k];
	while (extra != NULL && *extra != NULL && argc < 63)
		argv[argc++] = (char *)*extra++;
	argv[argc] = NULL;
	cfg_parse(&G.cfg, argc, argv);
	log_verbosity = G.cfg.verbosity;	/* a set-up error is shown */
	setup_core();
	srv_listen();
	S.nrules = 1;
	/* The cases provoke failures that dotp logs as errors: silence,
	 * unless asked. */
	log_verbosity = getenv("ENGINE_VERBOSE") ? LVL_DEBUG : -1;
}

/* ==== The cases ==== */

/*
 * 1. Out of order: the server holds a pipelined batch of 20 queries
 * from four clients, whose IDs repeat across clients, and answers it
 * newest first. Every client must get its own answers. Fails if dotp
 * matches answers by order, or by the client's ID, or sends one
 * client's answer to another.
 */
static void
case_reverse(void)
{
	static const char *const opt[] = { "--max-conns", "1", NULL };
	int	 c;

	engine_start(opt);
	S.rules[0].batch = 20;
	for (c = 0; c < 4; c++)
		client_new();
	for (c = 0; c < 4; c++)
		ask(c, 5);
	ok(run_until(all_answered, 2000), "reverse: %d of %d answered",
	    answered_count(), T.nq);
	ok(S.nc == 1 && S.c[0]->batch_done, "reverse: the batch of 20 was "
	    "held on one connection (%d connections)", S.nc);
	ok(count_rcode(0) == T.nq, "reverse: %d NOERROR of %d",
	    count_rcode(0), T.nq);
	check_once("reverse");
}

/*
 * 2. One record per query: bursts of 60 and then 30 queries from three
 * clients, each read by dotp in one pass. Every TLS record the server
 * reads must hold exactly one whole DNS frame (check_once): servers
 * such as dnsdist answer only the first query of a record that holds
 * many. Fails if dotp seals several queries into one record, or
 * splits one over two.
 */
static void
case_records(void)
{
	int	 c, k, records = 0;

	engine_start(NULL);
	for (c = 0; c < 3; c++)
		client_new();
	for (c = 0; c < 3; c++)
		ask(c, 20);
	ok(run_until(all_answered, 2000), "records: first burst, %d of %d "
	    "answered", answered_count(), T.nq);
	for (c = 0; c < 3; c++)
		ask(c, 10);
	ok(run_until(all_answered, 2000), "records: second burst, %d of %d "
	    "answered", answered_count(), T.nq);
	for (k = 0; k < S.nc; k++)
		records += S.c[k]->records;
	ok(records == T.nq && srv_sum_received() == T.nq, "records: %d "
	    "queries came in %d records", srv_sum_received(), records);
	ok(count_rcode(0) == T.nq, "records: %d NOERROR of %d",
	    count_rcode(0), T.nq);
	check_once("records");
}

/*
 * 3. Close after K answers: every connection sends close_notify after
 * K = 3 answers. All 10 queries of a burst are answered, none SERVFAIL
 * (the rest are re-sent on new connections each time); after two
 * closes at the same count dotp learns the limit (G.up[0].cap == K),
 * and every connection opened since carries at most K queries, so a
 * second burst of 9 is spread over new connections. Fails if dotp
 * loses or fails the queries a close leaves, learns nothing or the
 * wrong count, or overfills a connection past what it learned.
 */
static void
case_close_after_k(void)
{
	enum { K = 3 };
	int	 k, over = 0, later = 0;

	engine_start(NULL);
	S.rules[0].limit = K;
	S.rules[0].end = END_NOTIFY;
	client_new();
	client_new();
	ask(0, 5);
	ask(1, 5);
	ok(run_until(all_answered, 3000), "close-k: first burst, %d of %d "
	    "answered", answered_count(), T.nq);
	ok(G.up[0].cap == K, "close-k: learned %u queries per connection, "
	    "want %d", G.up[0].cap, K);
	ask(0, 5);
	ask(1, 4);
	ok(run_until(all_answered, 3000), "close-k: second burst, %d of %d "
	    "answered", answered_count(), T.nq);
	for (k = 0; k < S.nc; k++) {
		if (S.c[k]->cap_at_accept != K)
			continue;
		later++;
		if (S.c[k]->received > K)
			over++;
	}
	ok(later >= 3 && over == 0, "close-k: %d of %d connections opened "
	    "after learning carried more than %d queries", over, later, K);
	ok(count_rcode(0) == T.nq, "close-k: %d NOERROR of %d, %d SERVFAIL",
	    count_rcode(0), T.nq, count_rcode(DNS_RCODE_SERVFAIL));
	ok(G.up[0].ctr[UCTR_HANDSHAKES_RESUMED] > 0, "close-k: no "
	    "reconnection resumed the TLS session");
	check_once("close-k");
}

/*
 * 4. close_notify with queries outstanding, again and again: the
 * first four connections close after 1, 2, 1 and 2 answers (counts
 * that differ, so no limit is learned), the fifth answers all. The
 * last queries are sent five times, more than DOTP_MAX_TRIES: they
 * are answered only if a re-send after a recycle uses no try. Every
 * send is then answered or recycled (sent == answered + recycled).
 * Fails if a recycle costs a try (SERVFAIL), or if recycles are not
 * counted, or counted twice.
 */
static void
case_recycle(void)
{
	static const char *const opt[] = { "--max-conns", "1", NULL };
	static const int limits[] = { 1, 2, 1, 2 };
	const unsigned long *u = G.up[0].ctr;
	int	 k;

	engine_start(opt);
	for (k = 0; k < 4; k++) {
		S.rules[k].limit = limits[k];
		S.rules[k].end = END_NOTIFY;
	}
	S.nrules = 5;
	client_new();
	client_new();
	ask(0, 4);
	ask(1, 4);
	ok(run_until(all_answered, 3000), "recycle: %d of %d answered",
	    answered_count(), T.nq);
	ok(count_rcode(0) == T.nq, "recycle: %d NOERROR of %d, %d SERVFAIL",
	    count_rcode(0), T.nq, count_rcode(DNS_RCODE_SERVFAIL));
	ok(S.nc == 5 && srv_seen_max() > DOTP_MAX_TRIES, "recycle: %d "
	    "connections, a query sent at most %d times: the script did not "
	    "run", S.nc, srv_seen_max());
	ok(u[UCTR_RECYCLED] > 0 && u[UCTR_SENT] == u[UCTR_ANSWERED] +
	    u[UCTR_RECYCLED], "recycle: sent %lu, answered %lu, recycled %lu",
	    u[UCTR_SENT], u[UCTR_ANSWERED], u[UCTR_RECYCLED]);
	ok(u[UCTR_ANSWERED] == (unsigned long)T.nq && u[UCTR_FAILURES] == 0,
	    "recycle: answered %lu, failures %lu", u[UCTR_ANSWERED],
	    u[UCTR_FAILURES]);
	ok(G.up[0].cap == 0, "recycle: learned a count (%u) from closes "
	    "that differ", G.up[0].cap);
	check_once("recycle");
}

/*
 * 5. A reset: the server answers 2 of 4 queries and stops reading;
 * the client sends 3 more, which dotp writes on the same connection,
 * and the server closes with them unread, so dotp's recv() fails with
 * ECONNRESET. The 5 unanswered queries are re-sent on a new connection
 * and answered, without a try (the connection answered others). Fails
 * if a reset loses, fails or duplicates the queries on it.
 */
static void
case_reset(void)
{
	static const char *const opt[] = { "--max-conns", "1", NULL };
	const unsigned long *u = G.up[0].ctr;
	unsigned char b = 0;
	int	 sv[2], e;

	/* The kernel's part, which the case relies on. */
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		die("socketpair");
	(void)!write(sv[0], "x", 1);
	close(sv[1]);
	e = recv(sv[0], &b, 1, MSG_DONTWAIT) < 0 ? errno : 0;
	close(sv[0]);
	ok(e == ECONNRESET, "reset: a unix socket closed with unread bytes "
	    "gave its peer %s, not ECONNRESET", strerror(e));

	engine_start(opt);
	S.rules[0].limit = 2;
	S.rules[0].end = END_RST;
	S.nrules = 2;
	client_new();
	ask(0, 4);
	T.want = 2;
	ok(run_until(answered_want, 2000), "reset: %d of 2 answered first",
	    answered_count());
	ask(0, 3);
	ok(run_until(all_answered, 3000), "reset: %d of %d answered",
	    answered_count(), T.nq);
	ok(S.nc == 2 && S.c[0]->unread_at_close > 0, "reset: the first "
	    "connection did not close with unread bytes (%d connections)",
	    S.nc);
	ok(count_rcode(0) == T.nq, "reset: %d NOERROR of %d, %d SERVFAIL",
	    count_rcode(0), T.nq, count_rcode(DNS_RCODE_SERVFAIL));
	ok(u[UCTR_RECYCLED] == 5 && u[UCTR_SENT] == u[UCTR_ANSWERED] +
	    u[UCTR_RECYCLED], "reset: sent %lu, answered %lu, recycled %lu, "
	    "want 5 recycled", u[UCTR_SENT], u[UCTR_ANSWERED],
	    u[UCTR_RECYCLED]);
	check_once("reset");
}

/*
 * 6. A half frame: the server answers 1 of 3 queries, sends the
 * 2-byte length and 5 bytes of the next answer, and ends the stream
 * (FIN, no close_notify). The cut query and the third are re-sent on
 * a new connection and answered. Fails if dotp delivers the fragment,
 * waits for the rest for ever, or keeps the 7 bytes and misreads the
 * next connection's answers with them.
 */
static void
case_half_frame(void)
{
	static const char *const opt[] = { "--max-conns", "1", NULL };
	const unsigned long *u = G.up[0].ctr;

	engine_start(opt);
	S.rules[0].limit = 1;
	S.rules[0].end = END_HALF;
	S.nrules = 2;
	client_new();
	ask(0, 3);
	ok(run_until(all_answered, 2000), "half: %d of %d answered",
	    answered_count(), T.nq);
	ok(S.nc == 2 && S.c[0]->answered == 1 && S.c[0]->ending == END_HALF,
	    "half: the script did not run (%d connections)", S.nc);
	ok(count_rcode(0) == T.nq, "half: %d NOERROR of %d, %d SERVFAIL",
	    count_rcode(0), T.nq, count_rcode(DNS_RCODE_SERVFAIL));
	ok(u[UCTR_RECYCLED] == 2, "half: recycled %lu, want 2",
	    u[UCTR_RECYCLED]);
	check_once("half");
}

/*
 * 7a. A stall: every connection reads the query and never answers.
 * With one upstream, dotp gives up on a connection after twice the
 * attempt timeout (no other upstream is healthy), marks the upstream
 * down, and sends the query again on a new connection, DOTP_MAX_TRIES
 * times in all; then the client gets SERVFAIL, by --timeout at the
 * latest. One query on purpose: past its attempt timeout, with nowhere
 * to hedge, the only query on the connection moves to its late list,
 * which must not reset the time the connection has owed answers since.
 * Fails if dotp waits on a silent connection for ever, gives up after
 * one attempt timeout, sends the query more than its tries, or leaves
 * the client without an answer.
 */
static void
case_stall(void)
{
	int64_t	 gave_up;

	engine_start(NULL);
	S.rules[0].limit = 0;
	S.rules[0].end = END_STALL;
	client_new();
	ask(0, 1);
	ok(run_until(all_answered, T_TIMEOUT_MS + 500), "stall: no answer "
	    "by --timeout");
	ok(count_rcode(DNS_RCODE_SERVFAIL) == 1, "stall: not SERVFAIL");
	ok(max_wait() <= T_TIMEOUT_MS + T_SLACK_MS, "stall: SERVFAIL after "
	    "%lld ms, --timeout is %d", (long long)max_wait(), T_TIMEOUT_MS);
	ok(T.down_seen && G.up[0].ctr[UCTR_FAILURES] >= 1, "stall: upstream "
	    "not marked down (failures %lu)", G.up[0].ctr[UCTR_FAILURES]);
	ok(S.nc >= 1 && S.c[0]->by_peer && S.c[0]->t_first_query > 0,
	    "stall: dotp did not close the silent connection");
	gave_up = S.nc >= 1 ? S.c[0]->t_end - S.c[0]->t_first_query : 0;
	ok(gave_up >= 2 * T_ATTEMPT_MS - 10 && gave_up < 3 * T_ATTEMPT_MS,
	    "stall: gave up after %lld ms, want twice the attempt timeout "
	    "(%d ms)", (long long)gave_up, 2 * T_ATTEMPT_MS);
	ok(srv_sum_received() == DOTP_MAX_TRIES, "stall: the query was sent "
	    "%d times, want %d", srv_sum_received(), DOTP_MAX_TRIES);
	check_once("stall");
}

/*
 * 7b. A stall, then an answer: the first connection reads the queries
 * and never answers, the second answers. dotp gives up on the first
 * after twice the attempt timeout, marks the upstream down, re-sends
 * on a new connection, whose handshake marks it up again, and the
 * client gets the real answers. Fails if a stalled connection's
 * queries are failed instead of re-sent, or if the upstream stays down.
 */
static void
case_stall_answer(void)
{
	engine_start(NULL);
	S.rules[0].limit = 0;
	S.rules[0].end = END_STALL;
	S.nrules = 2;
	client_new();
	ask(0, 2);
	ok(run_until(all_answered, T_TIMEOUT_MS + 500), "stall-answer: %d "
	    "of %d answered", answered_count(), T.nq);
	ok(count_rcode(0) == T.nq, "stall-answer: %d NOERROR of %d",
	    count_rcode(0), T.nq);
	ok(S.nc == 2 && S.c[0]->received == 2 && S.c[1]->answered == 2,
	    "stall-answer: the script did not run (%d connections)", S.nc);
	ok(T.down_seen && G.up[0].ctr[UCTR_FAILURES] == 1 && !G.up[0].down,
	    "stall-answer: down seen %d, failures %lu, down now %d",
	    T.down_seen, G.up[0].ctr[UCTR_FAILURES], G.up[0].down);
	ok(max_wait() >= 2 * T_ATTEMPT_MS - 10, "stall-answer: answered "
	    "after %lld ms, before the stall could be seen",
	    (long long)max_wait());
	check_once("stall-answer");
}

/*
 * 8. End of stream in the handshake: the server closes right after
 * accept() (8a) or once it has read the ClientHello (8b). The upstream
 * is marked down (G.up[0].down), and with no other upstream the
 * clients get SERVFAIL, not silence, within --timeout. Fails if a
 * handshake failure is taken for a recycle (no failure counted, or
 * the query waits out its deadline in a loop of reconnections) or if
 * a query is dropped without an answer.
 */
static void
hs_eof(const char *name, enum srv_hs hs)
{
	engine_start(NULL);
	S.rules[0].hs = hs;
	client_new();
	client_new();
	ask(0, 1);
	ask(1, 1);
	ok(run_until(all_answered, T_TIMEOUT_MS + 500), "%s: %d of %d "
	    "answered by --timeout", name, answered_count(), T.nq);
	ok(count_rcode(DNS_RCODE_SERVFAIL) == T.nq, "%s: %d SERVFAIL of %d",
	    name, count_rcode(DNS_RCODE_SERVFAIL), T.nq);
	ok(max_wait() <= T_TIMEOUT_MS + T_SLACK_MS, "%s: SERVFAIL after "
	    "%lld ms", name, (long long)max_wait());
	ok(G.up[0].down && G.up[0].ctr[UCTR_FAILURES] >= 1, "%s: upstream "
	    "down %d, failures %lu", name, G.up[0].down,
	    G.up[0].ctr[UCTR_FAILURES]);
	ok(G.up[0].ctr[UCTR_HANDSHAKES_FULL] == 0 && G.up[0].ctr[UCTR_SENT] ==
	    0, "%s: handshakes %lu, sent %lu", name,
	    G.up[0].ctr[UCTR_HANDSHAKES_FULL], G.up[0].ctr[UCTR_SENT]);
	if (hs == HS_EOF_HELLO)
		ok(S.nc >= 1 && S.c[0]->hello_seen, "%s: the server never "
		    "read a ClientHello", name);
	check_once(name);
}

static void
case_hs_eof_accept(void)
{
	hs_eof("hs-eof-accept", HS_EOF_ACCEPT);
}

static void
case_hs_eof_hello(void)
{
	hs_eof("hs-eof-hello", HS_EOF_HELLO);
}

/*
 * 9. A would-block at every step: the server reads one byte per pass
 * and sends one byte per pass, the next only when dotp has read the
 * last, with the smallest socket buffers on both ends, and seals its
 * answers in records of 7 bytes, so frames are split across records
 * and records carry the end of one frame and the start of the next.
 * So dotp's reads find one byte at a time and its send() of the
 * queries fills the socket. Everything must still be answered exactly
 * once, on one connection, with no failure. Fails if the pump loses
 * bytes or state on a short read or write, stops when it should wait
 * for poll(), or reassembles frames only within a record.
 */
static void
case_trickle(void)
{
	static const char *const opt[] = { "--attempt-timeout", "3000",
	    "--timeout", "8000", "--handshake-timeout", "5000", NULL };
	int	 c;

	engine_start(opt);
	S.trickle = 1;
	S.rec_size = 7;
	for (c = 0; c < 4; c++)
		client_new();
	for (c = 0; c < 4; c++)
		ask(c, 10);
	ok(run_until(all_answered, 7000), "trickle: %d of %d answered",
	    answered_count(), T.nq);
	ok(count_rcode(0) == T.nq, "trickle: %d NOERROR of %d",
	    count_rcode(0), T.nq);
	ok(S.nc == 1 && G.up[0].ctr[UCTR_FAILURES] == 0, "trickle: %d "
	    "connections, %lu failures", S.nc, G.up[0].ctr[UCTR_FAILURES]);
	ok(S.trickled > 2000 && T.blocked > 0, "trickle: %lu bytes "
	    "trickled, dotp's send() left short in %lu passes", S.trickled,
	    T.blocked);
	check_once("trickle");
}

/* ==== Running the cases ==== */

/*
 * cache: the real engine with the answer cache. Four clients ask one
 * name in four letter cases before dotp reads any: one query reaches the
 * server and the others wait for its answer (coalesced), each client
 * getting its own ID and its own case (tc_answer compares the question
 * byte for byte). A fifth client then asks, and is answered from the
 * cache: the server sees nothing more. Fails without coalescing (four
 * queries at the server), with a key that does not fold case (four too,
 * or a miss), or with a replay that keeps the first client's ID or case.
 */
static void
case_cache(void)
{
	static const char *const names[] = {
		"Cache.Engine.Test", "cACHE.engine.test", "cache.ENGINE.test",
		"cache.engine.TEST", "CACHE.ENGINE.TEST"
	};
	int	 c;

	engine_start(NULL);
	for (c = 0; c < 5; c++)
		client_new();
	for (c = 0; c < 4; c++)
		ask_as(c, names[c]);
	ok(run_until(all_answered, 2000), "cache: %d of %d answered",
	    answered_count(), T.nq);
	ok(srv_sum_received() == 1 && G.ctr[CTR_CACHE_COALESCED] == 3,
	    "cache: the server saw %d queries (want 1), %lu coalesced "
	    "(want 3)", srv_sum_received(), G.ctr[CTR_CACHE_COALESCED]);
	ask_as(4, names[4]);
	ok(run_until(all_answered, 2000), "cache: the repeat unanswered");
	ok(srv_sum_received() == 1 && G.ctr[CTR_CACHE_HITS] == 1, "cache: "
	    "the server saw %d queries (want 1), %lu hits (want 1)",
	    srv_sum_received(), G.ctr[CTR_CACHE_HITS]);
	ok(count_rcode(0) == T.nq, "cache: %d NOERROR of %d",
	    count_rcode(0), T.nq);
	check_once("cache");
}


static const struct {
	const char *name;
	void	(*fn)(void);
} cases[] = {
	{ "reverse", case_reverse },
	{ "cache", case_cache },
	{ "records", case_records },
	{ "close-k", case_close_after_k },
	{ "recycle", case_recycle },
	{ "reset", case_reset },
	{ "half", case_half_frame },
	{ "stall", case_stall },
	{ "stall-answer", case_stall_answer },
	{ "hs-eof-accept", case_hs_eof_accept },
	{ "hs-eof-hello", case_hs_eof_hello },
	{ "trickle", case_trickle },
};

/* dotp reads DOTP_* variables for options not given as flags: the
 * test's engine must not depend on the caller's environment. */
static void
clear_dotp_env(void)
{
	extern char **environ;
	char	 name[128];
	char	**e;
	size_t	 l;

	for (;;) {
		for (e = environ; *e != NULL; e++)
			if (strncmp(*e, "DOTP_", 5) == 0)
				break;
		if (*e == NULL)
			return;
		l = strcspn(*e, "=");
		if (l >= sizeof name)
			l = sizeof name - 1;
		memcpy(name, *e, l);
		name[l] = '\0';
		if (unsetenv(name) < 0)
			return;
	}
}

/* Which cases to run: all, or those named on the command line. */
static int
wanted(int argc, char *argv[], const char *name)
{
	int	 k;

	if (argc < 2)
		return 1;
	for (k = 1; k < argc; k++)
		if (strcmp(argv[k], name) == 0)
			return 1;
	return 0;
}

/*
 * Runs one case in a child: a fresh G and server, an alarm against a
 * hang. The child sends its counts up a pipe; a child that dies, hangs
 * or exits otherwise counts as one failure.
 */
static void
run_case(int k, int *pass, int *fail)
{
	int	 p[2], counts[2], status;
	int64_t	 t0 = now_ms();
	ssize_t	 n;
	pid_t	 pid;

	fflush(stdout);
	if (pipe(p) < 0 || (pid = fork()) < 0)
		die("fork");
	if (pid == 0) {
		close(p[0]);
		alarm(CASE_SECONDS);
		cases[k].fn();
		fflush(stdout);
		counts[0] = t_pass;
		counts[1] = t_fail;
		(void)!write(p[1], counts, sizeof counts);
		_exit(0);	/* no leak report: the child frees nothing */
	}
	close(p[1]);
	n = read(p[0], counts, sizeof counts);
	close(p[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (n != (ssize_t)sizeof counts || !WIFEXITED(status) ||
	    WEXITSTATUS(status) != 0) {
		if (WIFSIGNALED(status))
			printf("FAIL %s: killed by signal %d%s\n",
			    cases[k].name, WTERMSIG(status),
			    WTERMSIG(status) == SIGALRM ? " (hung)" : "");
		else
			printf("FAIL %s: exit status %d\n", cases[k].name,
			    WEXITSTATUS(status));
		(*fail)++;
		return;
	}
	*pass += counts[0];
	*fail += counts[1];
	printf("engine: %-14s %s, %lld ms\n", cases[k].name,
	    counts[1] ? "FAIL" : "ok", (long long)(now_ms() - t0));
}

int
main(int argc, char *argv[])
{
	struct sigaction sa;
	int	 k, pass = 0, fail = 0;

	if (getenv("ENGINE_DIR") != NULL)
		data_dir = getenv("ENGINE_DIR");
	clear_dotp_env();
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	pki_load();
	for (k = 0; k < (int)(sizeof cases / sizeof cases[0]); k++)
		if (wanted(argc, argv, cases[k].name))
			run_case(k, &pass, &fail);
	printf("engine: %d passed, %d failed\n", pass, fail);
	return fail != 0;
}
