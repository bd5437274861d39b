/*
 * dotp - a DNS to DNS-over-TLS proxy.
 *
 * dotp listens for plain DNS on UDP and TCP and forwards every query over
 * one persistent, verified, pipelined TLS connection (RFC 7858) to an
 * upstream resolver, then returns the answer to the client that asked.
 * Zones given with --forward go to their own servers, over TLS or, when
 * so mapped, plain DNS. --metrics serves Prometheus metrics and health.
 * It is one C file, one poll() loop, statically linked with musl and
 * BearSSL, with the CA trust anchors compiled in.
 *
 * DATA FLOW
 *
 *   client (UDP datagram or TCP frame)
 *     -> dns_check_query()            validate once, at the boundary
 *     -> client_cached()              a fresh answer in the cache is
 *                                     replayed (cache_hit); a query
 *                                     whose key is already upstream
 *                                     waits for it (coalesced)
 *     -> q_start(), q_lead()          copy into a query slot, draw a
 *                                     random upstream ID, start deadline,
 *                                     find its zone (zone_of: the longest
 *                                     --forward zone, else "."), leave a
 *                                     pending marker in the cache
 *     -> up_pick(), up_enqueue()      a server of its zone (policy: first
 *                                     healthy, or round-robin): its tx
 *                                     list; to a plain DNS server, a
 *                                     datagram from a socket of its own
 *                                     (dgram_send; answer: dgram_answer;
 *                                     truncated: on to tx, over TCP)
 *     -> conn_inject() (SENDAPP)      queued frames go to a ready
 *                                     connection with room, each query
 *                                     its own TLS record; the records
 *                                     of one pass leave in one send()
 *     -> upstream answers, any order
 *     -> conn_take_answers() (RECVAPP) frames reassembled, q_find(ID)
 *     -> conn_answer()                sent on this connection, same
 *                                     question (dns_check_answer)
 *     -> q_deliver()                  kept in the cache; to the client
 *                                     and its followers, each with its
 *                                     ID and question case, truncated
 *                                     for UDP if needed; slots freed
 *
 * OBJECTS AND OWNERSHIP
 *
 *   struct query     one per client question in flight; fixed table
 *                    G.q[], free list, never malloc'd per query. A query
 *                    is on exactly one list: its upstream's tx (waiting
 *                    for room on a connection), or a connection's fl
 *                    (on the wire) or late list, or its plain server's
 *                    ul or ulate (a datagram out); and on the global
 *                    age list, ordered by deadline.
 *   struct zone      "." (-u) and each --forward zone: a range of
 *                    G.up, DoT or plain DNS.
 *   struct upstream  one per server of a zone: health (down, back-off,
 *                    probe), RTT estimate, the last TLS session for
 *                    resumption, the tx list, and up to --max-conns
 *                    connections; a plain one, its UDP exchanges.
 *   struct conn      one TCP + TLS session to an upstream (or plain TCP
 *                    to a plain DNS server): socket, BearSSL context
 *                    and buffers, answer assembler.
 *   struct tcpclient one per accepted TCP client; owns its socket, its
 *                    input assembler and a bounded output buffer.
 *   struct listener  one per -l; a UDP socket and a TCP listening socket.
 *   struct dsock     a socket for plain DNS over UDP, on a random port;
 *                    a few, each retired after 64 queries.
 *   struct httpconn  one per --metrics client: its request head, then its
 *                    response; closed after one exchange.
 *   struct cache     the answer cache: one block of --cache-size bytes,
 *                    an index and a ring of entries (answers, and
 *                    pending markers naming the query that is upstream).
 *
 * INVARIANTS
 *
 *   - Bytes acked into the engine's SENDAPP buffer are committed to that
 *     TLS session. A query is injected whole or not at all, so it is
 *     either waiting (not on the wire) or sent on one (conn, gen).
 *   - When a connection ends, every query on it is sent again (after a
 *     close by the server, to a healthy upstream it has not tried, else
 *     the same one; after a failure, to another) or, when its tries or
 *     deadline are spent, answered SERVFAIL. A re-send after a server
 *     recycled a connection that answered others uses no try (at most
 *     DOTP_MAX_RECYCLES times). Every client
 *     query gets exactly one answer, or is dropped only when it was not
 *     DNS at all. A query hedged to a second upstream after its attempt
 *     timeout takes the first of the two answers; the other is stray.
 *   - Upstream IDs are drawn from getrandom() and unique among all live
 *     queries; an answer is accepted only for an ID in flight on the
 *     connection it came from, with the same question.
 *   - Deadlines use CLOCK_MONOTONIC; all queries share one timeout, so
 *     the age list is sorted by deadline and expiry is O(1) per query.
 *   - Every length read off the wire is checked once, where it enters.
 *
 * SECTIONS (each opens with what it owns, calls and is called by;
 * each uses only the ones above it)
 *
 *    1 Includes and tunables      9 Upstreams: zones, health, RTT,
 *    2 Types and the global state   picking, learned limits
 *    3 Utilities                 10 What happens to a query (the table)
 *    4 DNS wire format           11 Plain DNS over UDP
 *    5 Client output             12 Upstream connections
 *    6 Answer cache              13 Client input
 *    7 Query table               14 Metrics and health over HTTP
 *    8 TLS                       15 Event loop
 *                                16 Options
 *                                17 Setup, shutdown and main
 *
 * WHERE TO CHANGE WHAT
 *
 *   a new option          a field in struct config and a row of DOTP_OPTS
 *                         (16); the README's table (a test compares)
 *   a new counter         a row of DOTP_STATS or DOTP_UP_STATS (2), and
 *                         G.ctr[CTR_X]++ where it happens; the exit line
 *                         and /metrics (14) follow the table
 *   a new descriptor      a value of enum fd_kind (2), a _pollset and a
 *     kind                _service function, a row of fd_kinds[] (15)
 *   a new rule for a      the table of section 10 and the function there
 *     query (re-send,     that applies it (q_retry, conn_end,
 *     hedge, SERVFAIL)    conn_timers, up_tx_timer)
 *   a connection timer    conn_due (12): polling and acting both use it
 *   a zone rule, or how   zone_of, up_pick (9); plain DNS over UDP:
 *     plain DNS is done   section 11; over TCP: the plain row of
 *                         conn_ways (12)
 *   a limit               a named constant with its reason (1)
 *   a DNS wire rule       section 4; the fuzz harnesses (tests/fuzz)
 *   what is cached, for   cache_lifetime (6); the key: cache_key (6);
 *     how long            replay: cache_replay (6)
 *
 * BUILD AND TEST: `make` (static musl + BearSSL), `make check` (unit
 * and engine tests, seconds), `make test` (everything).
 */

/* ==== 1. Includes and tunables ==== */

/*
 * Every fixed limit, as a named constant with its reason. Nothing here
 * is code; everything below may use it.
 */

#define _GNU_SOURCE	/* accept4, SOCK_NONBLOCK, getrandom, MSG_NOSIGNAL */

#include <sys/types.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <grp.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
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

/* A parameter a function of a table row may ignore. */
#define UNUSED	__attribute__((unused))

#ifndef DOTP_VERSION
#define DOTP_VERSION "0.1.0"
#endif

/*
 * Each limit is a named constant with its reason. They bound memory:
 * every table is sized once at start (BSS, or calloc from the options),
 * and pages that are never touched cost no RSS.
 */

/* Largest DNS message (the TCP length prefix is 16 bits). */
#define DNS_MSG_MAX		65535
/* A TCP or TLS frame: 2-byte length plus the message. */
#define DOTP_FRAME_MAX		(2 + DNS_MSG_MAX)
/* Largest query accepted from a client. A question is at most 12 + 255
 * + 4 bytes; an OPT record with cookies, client subnet and padding adds
 * a few hundred. Larger "queries" are not queries: FORMERR. */
#define DOTP_QUERY_MAX		1024
/* Query slots (--max-queries): queries waiting for an answer, all
 * clients together. Over it new queries get SERVFAIL at once. The upper
 * bound keeps the ID table (twice as large) within 16-bit IDs. */
#define DOTP_MAX_QUERIES	4096
#define DOTP_MAX_QUERIES_CAP	16384
#define DOTP_MAX_LISTEN		16
/* Servers of one zone (-u, or one --forward entry): more than 8 to fail
 * over between buys nothing. */
#define DOTP_MAX_ZONE_SERVERS	8
/* Servers in all: a query remembers the ones it was sent to in a 32-bit
 * mask; the default zone's 8 and 24 for --forward. */
#define DOTP_MAX_UPSTREAMS	32
#define DOTP_MAX_FWD_SERVERS	(DOTP_MAX_UPSTREAMS - DOTP_MAX_ZONE_SERVERS)
/* --forward zones (besides the default "."): each query's name is
 * matched against all of them, so they are few; split DNS needs a
 * handful (a cluster domain and two reverse trees). */
#define DOTP_MAX_ZONES		32
/*
 * Plain DNS over UDP (RFC 5452 9.2): queries leave from a few sockets,
 * each bound by the kernel to a random port at its first send and
 * retired after DOTP_DGRAM_USES queries. A spoofed answer must hit the
 * random port of an open socket and the random ID of a query on it:
 * the (port, ID) pairs that would be taken are the queries in flight,
 * as many as with a socket per query, which costs a socket() and a
 * close() per query (2.3x the CPU of forwarding over TLS, measured).
 * SOCKS: open at once, the current one of each family and retired ones
 * still owed answers; past it the current one serves on. BATCH: the
 * datagrams of one sendmmsg() or recvmmsg(); READS: recvmmsg() calls per
 * wake, so that a flood on one socket cannot hold the loop. A datagram
 * over BUF bytes is cut by the kernel and asked again over TCP.
 */
#define DOTP_DGRAM_SOCKS	16
#define DOTP_DGRAM_USES		64
#define DOTP_DGRAM_BATCH	32
#define DOTP_DGRAM_READS	4
#define DOTP_DGRAM_BUF		4096
/*
 * --metrics: HTTP connections at once (Prometheus, a probe, a person
 * with curl; more are closed at accept), the request head's size, and
 * the time a whole exchange may take (a client sending a byte a second
 * is closed then). A response is at most METRICS_MAX bytes: 32 servers
 * with every family and histogram take about a third of it.
 */
#define DOTP_HTTP_MAX		4
#define DOTP_HTTP_HEAD_MAX	4096
#define DOTP_HTTP_MS		2000
#define DOTP_METRICS_MAX	(256 * 1024)

/*
 * --rate-limit: the clients remembered, DOTP_RL_SETS sets of
 * DOTP_RL_WAYS. 8192 clients in 256 KiB: a node's pods many times over,
 * and small enough to allocate whole at start; a flood from more
 * addresses than that evicts the least recently seen (see rl_find).
 */
#define DOTP_RL_SETS		2048	/* 2^11: rl_find takes 11 bits */
#define DOTP_RL_WAYS		4
#define DOTP_RL_MAX		1000000	/* QPS and BURST at most */

/* SPKI pins of one server: a key and its backup, for the leaf and for
 * a CA, with room to rotate. */
#define DOTP_MAX_PINS		8
#define DOTP_METRICS_PORT	9253	/* NodeLocal DNSCache's */
/* `dotp healthcheck` gives up after this. */
#define DOTP_HEALTH_MS		2000
/* --log-queries writes at most this many lines a second: a flood cannot
 * fill a disk (about 200 bytes a line: 200 KB/s at most). */
#define DOTP_QLOG_PER_S		1000
/* Latency histogram buckets, in milliseconds (the clock's resolution):
 * from loopback to a slow resolver across the world. */
#define DOTP_HIST_BOUNDS	{ 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, \
	2000, 5000 }
#define DOTP_HIST_N		12
#define DOTP_HIST_LE		{ "0.001", "0.002", "0.005", "0.010", \
	"0.020", "0.050", "0.100", "0.200", "0.500", "1.000", "2.000", \
	"5.000", "+Inf" }

/* The longest log line: the start line, with every zone and each of its
 * servers (a DoT server's text is up to 64 + 1 + 255 bytes). */
#define DOTP_LOG_MAX		((1 + DOTP_MAX_ZONES) * (DNS_NAME_MAX + 32 + \
	DOTP_MAX_ZONE_SERVERS * 340) + 1024)
/* Connections per upstream (--max-conns) and in-flight queries per
 * connection before another one opens (--conn-queries). unbound serves
 * 100+ pipelined queries per connection by default; public resolvers
 * shed far above that. */
#define DOTP_MAX_CONNS		4
#define DOTP_MAX_CONNS_CAP	16
#define DOTP_CONN_QUERIES	128
/* Concurrent TCP clients (--max-tcp); when full, new connections are
 * closed at once (the client falls back or retries; existing clients are
 * not hurt). dotp raises its descriptor limit to fit. */
#define DOTP_MAX_TCP		1024
#define DOTP_MAX_TCP_CAP	65536
/* --allow entries. */
#define DOTP_MAX_ALLOW		64
/* Malformed input is logged (counts only) at most this often. */
#define DOTP_MALFORMED_LOG_MS	10000
/* Queries one TCP client may have outstanding before dotp stops reading
 * from it (back-pressure, not an error). */
#define DOTP_TCP_PIPELINE	256
/* Answers queued for a TCP client that does not read, before dotp cuts
 * it off: four maximal answers. */
#define DOTP_TCP_OUT_MAX	(4 * DOTP_FRAME_MAX)
/* A TCP client with nothing outstanding is closed after this (RFC 7766
 * 6.2.3 suggests seconds, not minutes). */
#define DOTP_TCP_IDLE_MS	10000
/* A TCP client idle this long is dormant: while dotp is busy it is
 * polled only on a sweep, every DOTP_SWEEP_MS, so that a thousand idle
 * connections do not make every poll() of a UDP load cost a thousand
 * descriptors. Its next query waits at most a sweep, and only under
 * load: when dotp would sleep, every descriptor is polled. */
#define DOTP_TCP_DORMANT_MS	100
#define DOTP_SWEEP_MS		10
/* Forced ACKs (conn_ack): a connection owing up to DOTP_ACK_FEW answers
 * ACKs before dotp sleeps, so a pair of answers is never held; one owing
 * more waits up to DOTP_ACK_DELAY_MS for a query to carry the ACK, so
 * that under load the server sends many answers per segment (one forced
 * ACK per read doubled dotp's CPU per query). */
#define DOTP_ACK_FEW		8
#define DOTP_ACK_DELAY_MS	1
/* Default per-query timeout: below the 5 s of the usual stub resolvers
 * (glibc, musl, dig), so the client gets a definite SERVFAIL before it
 * gives up, and long enough for a fresh TCP + TLS handshake and a retry
 * on a second upstream over a slow path. */
#define DOTP_TIMEOUT_MS		3000
/* TCP connect, then the TLS handshake, each within its own limit. */
#define DOTP_CONNECT_MS		1000
#define DOTP_HANDSHAKE_MS	2000
/* A connection with nothing in flight is closed after this. Cloudflare
 * is reported to close idle DoT connections after about 10 s; 8 s
 * leaves room for a round trip and timer slack, so that dotp closes
 * first (a close it makes costs nothing; a server's reset can race a
 * query). Servers that close sooner are learned (DOTP_LEARN_*). */
#define DOTP_IDLE_MS		8000
/* Learned per-upstream limits (struct upstream). A server that closes
 * a connection within DOTP_CAP_GAP_MS of its last answer closes at a
 * query count: later connections carry at most that many queries. One
 * that closes after at least DOTP_IDLE_LEARN_MIN_MS with nothing owed
 * closes idle connections: dotp closes its own at 3/4 of that time.
 * Either is taken only when two closes in a row agree (a count equal, a
 * time within a quarter), so that one reset or restart teaches nothing,
 * and is forgotten after DOTP_LEARN_TTL_MS and learned again, so that a
 * wrong or outdated one does not last. A connection that used up a
 * learned count and is still open after DOTP_CAP_FORGET_MS shows the
 * count was wrong: it is forgotten at once. */
#define DOTP_CAP_GAP_MS		100
#define DOTP_IDLE_LEARN_MIN_MS	500
#define DOTP_CAP_FORGET_MS	1000
#define DOTP_LEARN_TTL_MS	300000
/* Times one query may be re-sent without using a try, after a server
 * closed or cut a connection that answered other queries (recycling).
 * With a learned count one or two suffice; the bound stops a query
 * that makes every server connection die from cycling until its
 * deadline. */
#define DOTP_MAX_RECYCLES	8
/* UDP listeners' receive buffer (--udp-rcvbuf): a burst waits there
 * while dotp works. The kernel's default (about 208 KiB, counted with
 * per-packet overhead) holds only a few hundred small datagrams;
 * 4 MiB holds about as many as the query table (--max-queries), as
 * unbound's so-rcvbuf advice suggests. Pages are taken only when
 * datagrams wait. */
#define DOTP_UDP_RCVBUF		(4 * 1024 * 1024)
#define DOTP_UDP_RCVBUF_MAX	(256 * 1024 * 1024)
/* SIGTERM: in-flight queries get this long to finish. */
#define DOTP_DRAIN_MS		2000
/* Attempt timeout (RFC 6298 style RTO from the upstream's smoothed
 * RTT): SRTT + 4 * RTTVAR, within [MIN, MAX], never above --timeout/2;
 * INIT until the first sample. A query unanswered that long is re-sent
 * to the next upstream. */
#define DOTP_ATTEMPT_INIT_MS	750
#define DOTP_ATTEMPT_MIN_MS	200
#define DOTP_ATTEMPT_MAX_MS	1500
/* Back-off after a failure: doubling from 1 s to 60 s. */
#define DOTP_BACKOFF_MIN_MS	1000
#define DOTP_BACKOFF_MAX_MS	60000
/* A query is sent at most this many times (first send, re-sends after
 * a connection died under it, and a hedge to the next upstream). */
#define DOTP_MAX_TRIES		3
/* Read-ahead buffer per upstream connection: a full TLS record. */
#define DOTP_NET_BUF		BR_SSL_BUFSIZE_INPUT
/* Write buffer per upstream connection: each query is its own TLS
 * record (dnsdist 1.7 answers only the first queries of a record that
 * holds many, then stalls), and the records of one pass are gathered
 * here to leave in one send(). A padded query's record is 128 to 1,200
 * bytes, so this holds a hundred or more. */
#define DOTP_OUT_BUF		16384
/* After EMFILE on connect, wait this long before the next socket(). */
#define DOTP_FD_WAIT_MS		100
/* Longest poll() sleep: deadlines are re-checked at least this often. */
#define DOTP_MAX_SLEEP_MS	1000
/* Datagrams read from one UDP socket per wake-up, for fairness. */
#define DOTP_UDP_BATCH		64
/* --ca-file size bound: the whole Mozilla set is about 220 KB. */
#define DOTP_CA_FILE_MAX	(4 * 1024 * 1024)
#define DOTP_MAX_ANCHORS	1024

/* Answer cache (--cache-size): 4 MiB by default, unbound's msg-cache
 * size; a sidecar's working set (its own services, a database, some
 * telemetry endpoints) is a few hundred names, and 4 MiB holds about
 * ten thousand typical answers. The block is mapped at start and costs
 * no RSS until answers fill it. */
#define DOTP_CACHE_SIZE		(4 * 1024 * 1024)
#define DOTP_CACHE_SIZE_MIN	(64 * 1024)
#define DOTP_CACHE_SIZE_MAX	(1024 * 1024 * 1024)
/* One index bucket per this many bytes of budget: an answer takes 100
 * to 500 bytes, so chains stay one or two entries long. */
#define DOTP_CACHE_BUCKET_BYTES	256
/* Larger answers are not kept (a DNSKEY set or a big TXT fits). */
#define DOTP_CACHE_ANSWER_MAX	8192
/* Lifetimes in seconds: --cache-max-ttl (a day, as unbound), the cap
 * of NXDOMAIN and NODATA (--cache-neg-ttl: an hour, RFC 2308 5's "one
 * to three hours" at its low end), and the hold of an upstream's
 * SERVFAIL or REFUSED (RFC 9520 3.2: at least 1 s; longer would keep a
 * transient failure in front of clients). */
#define DOTP_CACHE_MAX_TTL	86400
#define DOTP_CACHE_NEG_TTL	3600
#define DOTP_CACHE_FAIL_HOLD_S	1
/* Prefetch: a hit in the last tenth of an entry's lifetime, when that is
 * at least this long, refreshes it once in the background. */
#define DOTP_PREFETCH_MIN_TTL	5
/* Serve-stale (RFC 8767): the client-response timer, and the TTL of a
 * stale answer (its section 4 suggests 30 s). */
#define DOTP_STALE_WAIT_MS	1800
#define DOTP_STALE_TTL		30
/* Evictions are logged (-v) at most this often. */
#define DOTP_EVICT_LOG_MS	10000

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
#define DNS_FLAG_CD		0x0010
#define DNS_OPCODE(f)		(((f) >> 11) & 0xf)
#define DNS_RCODE_FORMERR	1
#define DNS_RCODE_SERVFAIL	2
#define DNS_RCODE_NOTIMP	4
#define DNS_TYPE_OPT		41
#define DNS_TYPE_SOA		6
#define DNS_RCODE_NXDOMAIN	3
#define DNS_NAME_MAX		255
#define DNS_RCODE_REFUSED	5
#define DNS_OPT_PADDING		12	/* EDNS(0) option code, RFC 7830 */
/* A resource record after its owner name: TYPE, CLASS, TTL, RDLENGTH,
 * then RDATA. */
#define DNS_RR_TYPE		0
#define DNS_RR_CLASS		2
#define DNS_RR_TTL		4
#define DNS_RR_RDLEN		8
#define DNS_RR_FIXED		10
/* An OPT record (RFC 6891) is owned by the root, a 1-byte name; its
 * CLASS is the UDP payload size; its RDATA, options, starts at 11. */
#define DNS_OPT_UDPSIZE		(1 + DNS_RR_CLASS)
#define DNS_OPT_RDLEN		(1 + DNS_RR_RDLEN)
/* Its TTL is the extended RCODE, the version and 16 bits of flags, of
 * which the first is DO (RFC 3225). */
#define DNS_OPT_FLAGS		(1 + DNS_RR_TTL + 2)
#define DNS_OPT_FLAG_DO		0x80
#define DNS_OPT_HEADER		(1 + DNS_RR_FIXED)
/* An EDNS option: CODE, LENGTH, then its data. */
#define DNS_OPTION_LEN		2
#define DNS_OPTION_HEADER	4
#define DNS_OPT_ECS		8	/* EDNS Client Subnet, RFC 7871 */
#define DNS_UDP_MIN		512	/* RFC 1035 limit without EDNS(0) */
#define DNS_EDNS_UDP_MAX	1232	/* DNS Flag Day 2020: no fragments */
/* --udp-size range: 4096 is the largest size resolvers commonly offer. */
#define DOTP_UDP_SIZE_MAX	4096
/* Queries over TLS are padded to a multiple of this (RFC 8467 4.1). */
#define DOTP_PAD_BLOCK		128
/* Room padding may add to a query: an OPT record (11), the option
 * header (4) and up to a block less one of zeros. */
#define DOTP_PAD_ROOM		(11 + 4 + DOTP_PAD_BLOCK - 1)

/* ==== 2. Types and the global state ==== */

/*
 * The objects, from the leaves up (a client address, a query, a
 * connection, an upstream, a TCP client, a listener), each with what it
 * owns and what is true of it; then the option values (struct config)
 * and the one global, G, grouped by what uses it. Also the counter rows
 * (DOTP_STATS) and the descriptor kinds of the loop (enum fd_kind).
 */

/* Log levels; --verbose prints all, --quiet errors only. */
enum log_level { LVL_ERROR, LVL_WARN, LVL_INFO, LVL_DEBUG };

/*
 * The kinds of descriptor in the poll set. Each has a _pollset function,
 * which appends its objects' descriptors (loop_add) and lowers the
 * deadline, and a _service function, called after poll() with an
 * object's index: their table is fd_kinds[] (section 15). Enum order is
 * service order: upstream answers free query slots before clients bring
 * new queries, and listeners come last.
 */
enum fd_kind { FK_CONN, FK_DGRAM, FK_TCP, FK_UDP, FK_ACCEPT, FK_HTTP,
	FK_HTTP_LISTEN, FK_N };

/* Outcome of validating a client query: drop it, forward it, or answer
 * it at once with an RCODE. */
enum qcheck { QC_DROP = -1, QC_OK = 0 };

/* What dns_walk_records() finds among a message's records. */
struct dns_rrs {
	size_t	 end;		/* offset just past the last record */
	size_t	 opt;		/* the root's first OPT in the additional
				   section, 0: none */
	size_t	 opt_end;	/* offset just past it */
	unsigned nopt;		/* OPT records anywhere */
	int	 opt_bad;	/* an OPT elsewhere, or not owned by the root */
};

/* What dns_check_query() learns about a valid query. */
struct qinfo {
	size_t	 qend;		/* offset just past QTYPE/QCLASS */
	size_t	 end;		/* offset just past the last counted record */
	int	 has_opt;	/* client sent an OPT record */
	size_t	 opt;		/* its offset */
	size_t	 opt_end;	/* offset just past it */
	uint16_t udp_size;	/* its advertised payload size */
};

/* What dns_pad_query() did to a query, undone in its answer. */
enum pad_how { PAD_NONE, PAD_OPTION, PAD_ADDED_OPT };

/*
 * A client address: where an answer goes.
 * UDP: the listener's socket and the peer's address.
 * TCP: an index into G.tcp and the generation of that slot; a client
 * that went away (generation moved on) silently loses its answers.
 */
enum client_kind { CK_UDP, CK_TCP, CK_NONE };	/* NONE: a refresh */
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
	/* UDP on a wildcard listener: the address the client sent to, so
	 * the answer leaves from it (0: let the kernel choose). */
	uint8_t	 dst_family;
	union {
		struct in_addr	v4;
		struct in6_addr	v6;
	} dst;
};

/* A doubly linked list of query slots, by index; -1 ends it. A slot has
 * one pair of links for each kind of list it can be on at once. */
struct qlist {
	int	 head, tail;
	unsigned n;
};
#define QLIST_ZERO	{ -1, -1, 0 }
enum qlink_kind {
	QL_MAIN,	/* tx, fl, late, fol; or the free list (next) */
	QL_AGE,		/* the age list: every live slot, deadline order */
	QL_STALE,	/* the stale list: slots with q->stale, same order */
	QL_N
};
struct qlink {
	int	 prev, next;
};

/*
 * struct query: one client question waiting for its answer.
 * Owns: a copy of the client's query, whose ID bytes hold the upstream
 * ID while the slot lives (the client's ID is kept in client_id).
 * Invariants: a live slot is on the age list and, by state, on exactly
 * one list: Q_QUEUED on its upstream's tx, Q_SENT on its connection's fl,
 * Q_LATE on its connection's late list, Q_DGRAM on its upstream's ul (in
 * send order) and Q_DGRAM_LATE on its ulate (tries spent: it waits for
 * that answer until its deadline), both with usock >= 0, the socket it
 * left from (else usock == -1); Q_FOLLOW on the fol list of the query
 * with the same cache key that went upstream (its leader, whose pending
 * marker in the cache names it; Q_LOOSE only inside a function that is
 * moving it). A leader's followers are answered, or fail, with it; their
 * deadlines are later than its. Its up_id is in the ID table. An answer
 * is taken from (conn, gen) of the current send or from (pconn, pgen), an
 * earlier send that was hedged to another upstream and may still answer
 * first.
 */
enum qstate { Q_FREE, Q_LOOSE, Q_QUEUED, Q_SENT, Q_LATE, Q_DGRAM,
	Q_DGRAM_LATE, Q_FOLLOW };
struct query {
	uint8_t	 state;		/* enum qstate */
	uint8_t	 tries;		/* times sent: into a session, or a datagram */
	uint8_t	 up;		/* upstream of the current attempt */
	uint8_t	 zone;		/* the zone its name falls in (G.zone) */
	uint8_t	 tcp;		/* plain DNS: UDP answer truncated, use TCP */
	int	 usock;		/* Q_DGRAM*: its socket, G.dsock[usock]; -1 */
	uint32_t tried;		/* bitmask of upstreams it was sent to */
	uint8_t	 has_opt;	/* client sent OPT (kept when truncating) */
	uint8_t	 recycles;	/* re-sends that used no try (q_retry) */
	uint16_t client_id;	/* ID the client used */
	uint16_t up_id;		/* ID on the wire upstream */
	uint16_t udp_limit;	/* largest answer the client can take */
	uint16_t qlen;		/* bytes in qbuf */
	uint16_t qend;		/* end of the question in qbuf */
	int	 conn;		/* connection of the current send, or -1 */
	uint32_t gen;		/* its generation */
	int	 pconn;		/* connection of a hedged earlier send, or -1 */
	uint32_t pgen;		/* its generation */
	struct qlink lk[QL_N];	/* its links (enum qlink_kind) */
	int64_t	 sent_at;	/* when the current send was injected */
	int64_t	 deadline;	/* SERVFAIL at this time */
	struct client cl;
	uint8_t	 padded;	/* enum pad_how: undone in the answer */
	uint8_t	 ck;		/* its cache key's flag byte | CK_ON; 0:
				   it bypasses the cache */
	uint32_t chash;		/* its cache key's hash */
	int64_t	 t0_us;		/* --log-queries: when it came (us) */
	uint8_t	 lead;		/* it has a pending marker in the cache */
	uint8_t	 stale;		/* a stale answer may be served for it */
	int	 leader;	/* Q_FOLLOW: the query it waits for */
	struct qlist fol;	/* its followers (their QL_MAIN links) */
	unsigned char qbuf[DOTP_QUERY_MAX + DOTP_PAD_ROOM];
};

/*
 * struct pinx509: the X.509 engine of a connection to an upstream with
 * pins (section 8). It passes every certificate to the minimal engine
 * xc and to a decoder, whose key it hashes (spki_hash). Invariant: past
 * is set once xc has found its trust anchor: later certificates are
 * not of the verified path and are not hashed.
 */
struct pinx509 {
	const br_x509_class *vtable;
	br_x509_minimal_context *xc;	/* the wrapped engine */
	const struct server *sv;	/* the pins and the mode */
	br_x509_decoder_context dc;	/* the current certificate's key */
	int	 ncert;		/* certificates seen */
	int	 past;		/* the rest are past the verified path */
	int	 match;		/* a key of the path matches a pin */
	int	 have_leaf;
	unsigned char leaf[32];	/* the leaf's key hash, for the log */
};

/*
 * struct conn: one TCP + TLS connection to an upstream, or, to a plain
 * DNS server, one TCP connection (the engine unused: frames go straight
 * through out[] and net[]; its row of conn_ways, section 12).
 * Owns: fd, the BearSSL client context and its two buffers, the answer
 * assembler rx[], and the queries on the wire (fl in send order, each
 * with an attempt deadline; late: past it, with nowhere else to go).
 *
 *   C_FREE        fd == -1; fl and late are empty; so are its buffers
 *                 (rx, net, out), and its session counts are zero
 *                 (conn_end clears them, calloc at start).
 *   C_CONNECTING  fd open, connect() in progress; the engine was reset
 *                 and holds the ClientHello; deadline = connect limit.
 *   C_HANDSHAKE   connected; the engine has not yet offered SENDAPP;
 *                 deadline = handshake limit. (Plain DNS: never.)
 *   C_READY       the handshake completed; frames flow both ways.
 *
 * gen increments at every connect, so (conn, gen) names one session.
 * A connection with no query at all is a probe of its upstream's health.
 */
enum conn_state { C_FREE, C_CONNECTING, C_HANDSHAKE, C_READY };
/* Which deadline of a connection comes next (conn_due). */
enum conn_timer { CT_NONE, CT_OPEN, CT_FORGET, CT_IDLE, CT_FLIGHT };
struct conn {
	int	 up;		/* owning upstream */
	int	 fd;
	enum conn_state state;
	uint32_t gen;
	int64_t	 deadline;	/* connect or handshake limit */
	int64_t	 last_active;	/* last send or answer, for the idle close */
	int64_t	 owe_since;	/* owes answers and got none since; 0: owes none */
	int	 readable;	/* poll() said POLLIN, no short read since */
	int	 closing;	/* dotp closes it: nothing to learn, retry */
	uint8_t	 fail_kind;	/* enum fail_kind of the failure ending it */
	int	 ack_owed;	/* read data since our last send (see conn_ack) */
	int64_t	 ack_at;	/* force that ACK then (conn_acks) */
	unsigned sent;		/* queries injected into this session */
	unsigned answered;	/* answers taken from this session */
	int64_t	 last_answer;	/* when the last one came */
	struct qlist fl, late;
	unsigned char sid[32];	/* session ID offered (resumption check) */
	size_t	 sid_len;
	br_ssl_client_context cc;
	br_x509_minimal_context xc;
	struct pinx509 px;	/* wraps xc when the upstream has pins */
	unsigned char ibuf[BR_SSL_BUFSIZE_INPUT];
	unsigned char obuf[BR_SSL_BUFSIZE_OUTPUT];
	/* Socket bytes read ahead of the engine: BearSSL takes only what
	 * the current record needs (5 bytes of header, then the rest), so
	 * reading it directly costs two recv() per record; one recv() here
	 * takes many records at once. net[net_off..net_len) is unread. */
	size_t	 net_off, net_len;
	unsigned char net[DOTP_NET_BUF];
	/* Sealed records waiting for send(): out[out_off..out_len). */
	size_t	 out_off, out_len;
	unsigned char out[DOTP_OUT_BUF];
	size_t	 rx_have;	/* bytes in rx */
	unsigned char rx[DOTP_FRAME_MAX];
};

/*
 * Counters: one row each, in one list per scope, and the list drives
 * everything else: the enum, the table of names and help texts, the
 * exit line (stats_log) and, later, the metrics endpoint. A new counter
 * is one row here and one `G.ctr[CTR_X]++` where it happens.
 * Kinds: STAT_COUNTER only rises; STAT_TOTAL is an upstream counter
 * whose sum over the upstreams also goes on the exit line; STAT_GAUGE is
 * a level read through the row's function when reported.
 */
enum stat_kind { STAT_COUNTER, STAT_TOTAL, STAT_GAUGE };

/* X(ID, name, kind, help): the whole process. */
#define DOTP_STATS(X) \
	X(CTR_QUERIES, "queries", STAT_COUNTER, \
	    "messages received from clients") \
	X(CTR_ANSWERS, "answers", STAT_COUNTER, \
	    "upstream answers delivered to clients") \
	X(CTR_SERVFAIL, "servfail", STAT_COUNTER, \
	    "queries answered SERVFAIL: the sum of the three below and " \
	    "table_full") \
	X(CTR_SERVFAIL_DEADLINE, "servfail_deadline", STAT_COUNTER, \
	    "SERVFAIL: no answer within --timeout") \
	X(CTR_SERVFAIL_TRIES, "servfail_tries", STAT_COUNTER, \
	    "SERVFAIL: every try spent, or no server of the zone left") \
	X(CTR_SERVFAIL_EXIT, "servfail_exit", STAT_COUNTER, \
	    "SERVFAIL: still waiting when dotp exited") \
	X(CTR_DROPPED, "dropped", STAT_COUNTER, \
	    "client messages dropped: not DNS queries") \
	X(CTR_FORMERR, "formerr", STAT_COUNTER, \
	    "malformed queries answered FORMERR") \
	X(CTR_NOTIMP, "notimp", STAT_COUNTER, \
	    "queries of an opcode other than QUERY, answered NOTIMP") \
	X(CTR_REFUSED, "refused", STAT_COUNTER, \
	    "queries from clients outside --allow, answered REFUSED") \
	X(CTR_STRAY, "stray", STAT_COUNTER, \
	    "upstream answers for no query in flight on their connection") \
	X(CTR_MISMATCHED, "mismatched", STAT_COUNTER, \
	    "upstream answers with an ID in flight but another question") \
	X(CTR_SPOOFED, "spoofed", STAT_COUNTER, \
	    "plain DNS datagrams dropped: not the answer to a query in " \
	    "flight on their socket (another address, port, ID or question, " \
	    "or late)") \
	X(CTR_TRUNCATED_RETRIES, "truncated_retries", STAT_COUNTER, \
	    "plain DNS answers truncated over UDP, asked again over TCP") \
	X(CTR_TABLE_FULL, "table_full", STAT_COUNTER, \
	    "queries answered SERVFAIL because the query table was full") \
	X(CTR_TCP_REFUSED, "tcp_refused", STAT_COUNTER, \
	    "TCP clients closed at accept: over --max-tcp or outside --allow") \
	X(CTR_UDP_SEND_FAILED, "udp_send_failed", STAT_COUNTER, \
	    "UDP answers the kernel did not send (socket buffer full)") \
	X(CTR_CACHE_HITS, "cache_hits", STAT_COUNTER, \
	    "queries answered from the cache") \
	X(CTR_CACHE_MISSES, "cache_misses", STAT_COUNTER, \
	    "cacheable queries without a fresh answer in the cache") \
	X(CTR_CACHE_COALESCED, "cache_coalesced", STAT_COUNTER, \
	    "queries that waited for the same query already upstream") \
	X(CTR_CACHE_PREFETCHES, "cache_prefetches", STAT_COUNTER, \
	    "background refreshes of popular answers about to expire") \
	X(CTR_CACHE_STALE, "cache_stale", STAT_COUNTER, \
	    "stale answers served (--serve-stale)") \
	X(CTR_CACHE_EVICTIONS, "cache_evictions", STAT_COUNTER, \
	    "unexpired answers dropped to make room") \
	X(CTR_CACHE_ENTRIES, "cache_entries", STAT_GAUGE, \
	    "answers in the cache") \
	X(CTR_CACHE_BYTES, "cache_bytes", STAT_GAUGE, \
	    "bytes the cache's answers take") \
	X(CTR_RL_TRUNCATED, "ratelimit_truncated", STAT_COUNTER, \
	    "UDP queries over --rate-limit answered truncated (TC)") \
	X(CTR_RL_DROPPED, "ratelimit_dropped", STAT_COUNTER, \
	    "UDP queries over --rate-limit dropped") \
	X(CTR_RL_TCP_PAUSED, "ratelimit_tcp_paused", STAT_COUNTER, \
	    "times a TCP client over --rate-limit was left unread") \
	X(CTR_RL_EVICTIONS, "ratelimit_evictions", STAT_COUNTER, \
	    "clients forgotten to make room for others") \
	X(CTR_RL_CLIENTS, "ratelimit_clients", STAT_GAUGE, \
	    "clients --rate-limit remembers")

/* X(ID, name, kind, help): one upstream. */
#define DOTP_UP_STATS(X) \
	X(UCTR_SENT, "sent", STAT_COUNTER, \
	    "queries sent to the upstream (re-sends and hedges included)") \
	X(UCTR_ANSWERED, "answered", STAT_COUNTER, \
	    "answers taken from the upstream") \
	X(UCTR_FAILURES, "failures", STAT_COUNTER, \
	    "failures that marked it down, the sum of the four below") \
	X(UCTR_FAIL_CONNECT, "failures_connect", STAT_COUNTER, \
	    "failures to connect: refused, unreachable, timed out") \
	X(UCTR_FAIL_TLS, "failures_tls", STAT_COUNTER, \
	    "TLS failures: handshake, certificate, alert, closed in the " \
	    "handshake") \
	X(UCTR_FAIL_SILENT, "failures_silent", STAT_COUNTER, \
	    "no answer, or no connection ready, within the attempt timeout") \
	X(UCTR_FAIL_PROTOCOL, "failures_protocol", STAT_COUNTER, \
	    "frames shorter than a DNS header") \
	X(UCTR_RECYCLED, "recycled", STAT_TOTAL, \
	    "queries re-sent without using a try after the server recycled " \
	    "a connection") \
	X(UCTR_HANDSHAKES_FULL, "handshakes_full", STAT_TOTAL, \
	    "full TLS handshakes") \
	X(UCTR_HANDSHAKES_RESUMED, "handshakes_resumed", STAT_TOTAL, \
	    "TLS handshakes that resumed a session") \
	X(UCTR_LEARNED_CONN_QUERIES, "learned_conn_queries", STAT_GAUGE, \
	    "queries per connection the server was seen to allow (0: none)") \
	X(UCTR_LEARNED_IDLE_MS, "learned_idle_ms", STAT_GAUGE, \
	    "idle time after which the server was seen to close (0: none)")

/* Why an upstream failed, in the order of its UCTR_FAIL_* rows. */
enum fail_kind { FAIL_CONNECT, FAIL_TLS, FAIL_SILENT, FAIL_PROTOCOL };

#define STAT_ENUM(id, name, kind, help)	id,
enum ctr { DOTP_STATS(STAT_ENUM) CTR_N };
enum up_ctr { DOTP_UP_STATS(STAT_ENUM) UCTR_N };

/* A latency histogram: counts by DOTP_HIST_BOUNDS (the last: above
 * them all), and the sum of the samples in milliseconds. */
struct hist {
	unsigned long n[DOTP_HIST_N + 1];
	unsigned long sum_ms;
};

/*
 * struct upstream: one configured resolver, a server of one zone.
 * Owns: its connections G.conn[up * max_conns ...], the tx list of
 * queries waiting for room on one of them, its health and RTT estimate,
 * and the last TLS session (shared by its connections for resumption).
 * A plain DNS server (plain) also owns the UDP exchanges of ul and
 * ulate; its tx holds only queries going over TCP.
 * Healthy (down == 0) or down until retry_at, when a probe connection
 * tests it (a plain one: trial, the next query goes to it); down
 * upstreams are picked only when all of the zone's are down.
 * Learned from how the server ends connections (conn_learn): cap > 0,
 * the most queries one connection carries; idle_ms > 0, how long the
 * server lets a connection sit idle.
 */
struct upstream {
	char	 label[64];	/* "ADDR:PORT" for logs */
	char	 name[256];	/* name the certificate must carry (SNI) */
	union {
		struct sockaddr		sa;
		struct sockaddr_in	sin;
		struct sockaddr_in6	sin6;
	} addr;
	socklen_t addrlen;
	int	 zone;		/* a zone it serves: G.zone[zone] holds the
				   range of its fellow servers */
	int	 plain;		/* plain DNS (dns://), not TLS */
	const struct server *sv;	/* as given: its pins (G.cfg) */
	struct qlist tx;
	struct qlist ul, ulate;	/* plain: Q_DGRAM, Q_DGRAM_LATE queries */
	int	 down;
	int	 trial;		/* plain and down: back-off over, next query
				   tries it */
	int	 backoff_ms;	/* current back-off, 0 when healthy */
	int64_t	 retry_at;	/* end of back-off: probe then */
	int64_t	 failed_at;	/* last failure, for least-recently-failed */
	int	 have_rtt;
	int	 srtt, rttvar;	/* milliseconds, RFC 6298 */
	br_ssl_session_parameters sess;
	int	 have_sess;
	unsigned cap;		/* learned queries per connection, 0: none */
	int	 idle_ms;	/* learned idle close, 0: none */
	unsigned cap_seen;	/* the last count seen, to be confirmed */
	int	 idle_seen;	/* the last idle close seen, likewise */
	int64_t	 learned_at;	/* cap and idle_ms are forgotten later */
	int64_t	 alone_until;	/* an extra connection failed: until then
				   no other opens while one is ready */
	unsigned long ctr[UCTR_N];	/* the counters of up_stat_defs */
	struct hist rtt;	/* answer times (--metrics) */
};

/* struct tcpclient: one accepted TCP client.
 * Owns: fd, its input assembler, and out (malloc'd on first need, at
 * most DOTP_TCP_OUT_MAX bytes, freed when the client goes).
 * Invariant: fd == -1 iff the slot is free; gen moves on at every close.
 */
struct tcpclient {
	int	 fd;
	uint32_t gen;
	int	 eof;		/* client shut its side: close when done */
	unsigned pending;	/* queries not yet answered */
	int64_t	 idle_since;	/* last query read, answer queued or written */
	int64_t	 rl_until;	/* --rate-limit: not read until then; 0: read */
	uint64_t rl_key[2];	/* --rate-limit: its network (rl_key) */
	size_t	 rx_have;
	int	 live_pos;	/* index in G.tcp_live */
	unsigned char *rx;	/* G.tcprx + slot: 2 + DOTP_QUERY_MAX bytes */
	unsigned char *out;	/* queued answer frames */
	size_t	 out_len, out_off, out_cap;
};

/* A client of --rate-limit (section 13): its token buckets. */
struct rlent {
	uint64_t key[2];	/* the client's network (rl_key) */
	int64_t	 seen;		/* its last query, ms; 0: a free way */
	int32_t	 tokens;	/* queries it may send, x1000 */
	int32_t	 tc_tokens;	/* truncated answers over its limit, x1000 */
};

/* struct listener: one -l address; UDP and TCP sockets on it. */
struct listener {
	char	 label[64];
	int	 udp, tcp;
	int	 wildcard;	/* 0.0.0.0 or [::]: answers need PKTINFO */
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

enum policy { POLICY_FIRST, POLICY_RR };

/* What set the default zone's servers: --forward . and -u exclude each
 * other, and either replaces the built-in default. */
enum up_by { UP_BY_NONE, UP_BY_DEFAULT, UP_BY_FLAG, UP_BY_FORWARD };

/* One server as given: -u, or a SERVER of --forward. */
struct server {
	struct sockaddr_text a;
	char	 name[256];	/* certificate name; "" for plain DNS */
	int	 plain;		/* dns://HOST[:PORT]: plain DNS */
	uint8_t	 npin;		/* @sha256/...: SPKI pins (struct pinx509) */
	uint8_t	 pin_only;	/* @pin-only: the leaf's pin, no anchor */
	uint8_t	 no_name;	/* @no-name-check: with pin_only */
	unsigned char pin[DOTP_MAX_PINS][32];
};

/*
 * A zone: the names at or under it go to its servers. G.zone[0] is the
 * default, "." (-u); the others are --forward zones, matched longest
 * first (zone_of). Zones of one --forward entry share its servers.
 */
struct zone {
	unsigned char name[DNS_NAME_MAX];	/* wire form, lower case */
	size_t	 len;		/* bytes of name, the root label included */
	char	 text[DNS_NAME_MAX + 1];	/* as given, for logs */
	int	 first, n;	/* its servers: G.up[first .. first + n);
				   in struct config, cfg->fwd[...] */
	int	 plain;		/* its servers speak plain DNS */
	int	 rr;		/* round-robin cursor */
};

/* An --allow entry: an address prefix of either family. */
struct cidr {
	int	 family;	/* AF_INET or AF_INET6 */
	unsigned char addr[16];	/* network byte order, host bits zero */
	int	 bits;
};

struct config {
	struct sockaddr_text listen[DOTP_MAX_LISTEN];
	int	 nlisten;
	struct server up[DOTP_MAX_ZONE_SERVERS];	/* the zone "." */
	int	 nup;
	int	 up_by;		/* what set them (enum up_by) */
	int	 nfwd, nzone;	/* of fwd[] and zone[], at the end */
	const char *ca_file;
	int	 verbosity;	/* enum log_level: the highest printed */
	int	 policy;	/* enum policy */
	int	 timeout_ms, attempt_ms, connect_ms, handshake_ms, idle_ms;
	int	 drain_ms, conn_queries, max_conns, max_queries;
	int	 udp_size, tcp_idle_ms, max_tcp, udp_rcvbuf;
	int	 no_pad;	/* --no-pad: do not pad queries (RFC 8467) */
	int	 verbose, quiet;	/* -v, -q: make verbosity */
	struct sockaddr_text metrics;	/* --metrics, if have_metrics */
	int	 have_metrics;
	int	 no_cache, cache_size, cache_min_ttl, cache_max_ttl;
	int	 cache_neg_ttl, serve_stale;
	int	 log_queries;	/* --log-queries */
	int	 no_sandbox;	/* --no-sandbox: no seccomp filter */
	int	 rl_qps, rl_burst;	/* --rate-limit; 0: off */
	int	 rl_v4, rl_v6;	/* --rate-limit-prefix */
	int	 have_user;	/* --user: drop to uid:gid after start-up */
	uid_t	 uid;
	gid_t	 gid;
	struct cidr allow[DOTP_MAX_ALLOW];
	int	 nallow;
	/* Last, and not cleared by cfg_parse (their counts are): 27 KB that
	 * an idle dotp without --forward never touches. */
	struct server fwd[DOTP_MAX_FWD_SERVERS];	/* --forward's */
	struct zone zone[DOTP_MAX_ZONES];	/* --forward's, given order */
};

/*
 * struct cache: the answer cache (section 6). One mapped block: bucket
 * heads (offset + 1 of the newest entry of each chain; 0: none), then
 * the ring. Invariants: live entries sit in [head, tail) when not
 * wrapped, else in [head, wrap_at) and [0, tail); every live entry is
 * on the chain of its hash; used counts the ring bytes between head and
 * tail, dead entries included.
 */
struct cache {
	uint32_t *bucket;
	uint32_t mask;		/* buckets - 1 */
	uint32_t seed;		/* hash basis, from getrandom() */
	unsigned char *ring;	/* NULL: --no-cache */
	uint32_t cap, head, tail, wrap_at, used;
	int	 wrapped;
	unsigned long entries, bytes;	/* live answers, their bytes */
	unsigned long evict_logged;	/* evictions at the last -v line */
	int64_t	 evict_log_at;
};

/* One HTTP connection to --metrics: it reads a request head into req,
 * then writes the response out[out_off..out_len) and closes. fd == -1:
 * a free slot; out != NULL: writing. */
struct httpconn {
	int	 fd;
	int64_t	 deadline;	/* the whole exchange ends by then */
	size_t	 have;		/* bytes in req */
	char	 req[DOTP_HTTP_HEAD_MAX];
	char	*out;		/* malloc'd, at most DOTP_METRICS_MAX + head */
	size_t	 out_len, out_off;
};

/* A socket for plain DNS over UDP; fd == -1: a free slot. A socket
 * other than its family's current one is retired: it closes once no
 * query waits on it. */
struct dsock {
	int	 fd;
	unsigned uses;		/* queries sent from it */
	unsigned inflight;	/* Q_DGRAM* queries whose usock it is */
};

/* The whole process state (kilo's E). */
struct dotp {
	struct config cfg;
	const br_x509_trust_anchor *tas;
	size_t	 ntas;
	int	 nlisten;
	struct listener lst[DOTP_MAX_LISTEN];
	int	 nup;
	struct upstream up[DOTP_MAX_UPSTREAMS];	/* by zone: "." first */
	int	 nzone;
	struct zone zone[1 + DOTP_MAX_ZONES];	/* "." first */
	/* Plain DNS over UDP (section 11): the sockets, the current one of
	 * each family (0: IPv4, 1: IPv6; -1: none), and the queries whose
	 * datagrams leave at the end of the pass, all from socket dout_sock
	 * (dgram_flush). */
	struct dsock dsock[DOTP_DGRAM_SOCKS];
	int	 dcur[2];
	int	 dout_q[DOTP_DGRAM_BATCH];
	int	 dout_n, dout_sock;
	struct conn *conn;	/* nup * max_conns, calloc'd at start */
	int	 nconn;
	/* TCP clients: max_tcp slots and input buffers, calloc'd at start
	 * and touched only when used; live ones are listed in tcp_live (so
	 * loops cost what is connected, not what is allowed); freed slots
	 * are reused from tcp_free, then slots from tcp_high on. */
	struct tcpclient *tcp;
	unsigned char *tcprx;
	int	*tcp_live, *tcp_free;
	int	 ntcp, ntcp_free, tcp_high;
	/* The poll set, rebuilt every pass: beside each pollfd, the kind
	 * of its object and the object's index (loop_add). */
	struct pollfd *pfd;
	uint8_t	*pkind;		/* enum fd_kind */
	int	*pidx;
	int	 npfd;
	struct query *q;	/* max_queries slots, calloc'd at start */
	int	 nq;
	int	 qfree;		/* free list head (slots used before) */
	int	 qhigh;		/* slots at and past it were never used */
	unsigned qlive;
	struct qlist age;	/* live queries, oldest first */
	uint16_t *idtab;	/* slot + 1, 0 = empty; 2 * nq rounded up */
	unsigned idmask;
	unsigned char rnd[512];	/* getrandom() pool for IDs */
	size_t	 rnd_left;
	int	 kick;		/* an upstream has work: poll without sleep */
	int	 draining;	/* SIGTERM seen: no new queries */
	int64_t	 drain_until;
	int64_t	 fd_wait_until;	/* after EMFILE on socket() */
	int64_t	 tx_timer;	/* next up_tx_timer() check, from up_kick() */
	int	 connect_burst;	/* EMFILE on socket() logged, until one works */
	int	 accept_burst;	/* EMFILE on accept() logged, until one works */
	int	 spare_fd;	/* closed to accept() and drop under EMFILE */
	unsigned long ctr[CTR_N];	/* the counters of stat_defs */
	/* For --metrics: queries by transport (enum client_kind), what
	 * clients were answered by RCODE, the time from a query to its
	 * upstream answer, the start time and the HTTP side. */
	unsigned long queries_by[2], rcodes[16];
	struct hist answer_time;
	int64_t	 started_at;	/* CLOCK_REALTIME seconds */
	int	 http_fd;	/* the --metrics listener, or -1 */
	int	 statm_fd, fddir_fd;	/* /proc/self/statm, /proc/self/fd:
					   opened before the sandbox */
	struct rlent *rl;	/* --rate-limit's table, or NULL */
	uint64_t rl_seed[2];	/* its hash key, random */
	unsigned long rl_used;	/* clients in it */
	int64_t	 rl_wake;	/* the next paused TCP client's turn; 0: none */
	struct httpconn http[DOTP_HTTP_MAX];
	struct cache cache;
	struct qlist stale;	/* queries with q->stale, arrival order */
	int64_t	 malformed_logged;	/* last "malformed input" line */
	int64_t	 tcp_scan_at;	/* next look for idle TCP clients to close */
	int64_t	 sweep_at;	/* next poll() of dormant TCP clients */
	int	 poll_all;	/* the last poll() timed out: poll everyone */
};

static volatile sig_atomic_t got_signal;
static struct dotp G;
static int log_verbosity = LVL_INFO;

/* ==== 3. Utilities ==== */

/*
 * Logging (one logfmt family and fatal()), time, bytes, descriptors,
 * addresses and prefixes, the counter tables, and the poll-set append.
 * Calls only libc. Called by everything below.
 */

/* Appends the string src to line (len bytes, *at used), with '"' and
 * '\\' escaped when esc (a logfmt quoted value); cuts at len - 1. */
static void
log_put(char *line, size_t len, size_t *at, const char *src, int esc)
{
	for (; *src && *at + 2 < len; src++) {
		if (esc && (*src == '"' || *src == '\\'))
			line[(*at)++] = '\\';
		line[(*at)++] = *src;
	}
	line[*at] = '\0';
}

/*
 * Logs one logfmt line to stderr: level=L msg="TEXT" FIELDS, plus
 * error="..." for errno err when err is not 0. fmt gives the text, then
 * optionally a tab and key=value fields (a value with spaces is quoted
 * by the caller). Keeps errno.
 */
static void
log_v(enum log_level lvl, int err, const char *fmt, va_list ap)
{
	static const char *names[] = { "error", "warn", "info", "debug" };
	static char text[DOTP_LOG_MAX], line[DOTP_LOG_MAX + 256];
	char	*tab;
	size_t	 at = 0;
	int	 saved = errno;

	if ((int)lvl > log_verbosity)
		return;
	(void)vsnprintf(text, sizeof text, fmt, ap);
	if ((tab = strchr(text, '\t')) != NULL)
		*tab++ = '\0';
	log_put(line, sizeof line - 1, &at, "level=", 0);
	log_put(line, sizeof line - 1, &at, names[lvl], 0);
	log_put(line, sizeof line - 1, &at, " msg=\"", 0);
	log_put(line, sizeof line - 1, &at, text, 1);
	log_put(line, sizeof line - 1, &at, "\"", 0);
	if (tab != NULL && *tab != '\0') {
		log_put(line, sizeof line - 1, &at, " ", 0);
		log_put(line, sizeof line - 1, &at, tab, 0);
	}
	if (err != 0) {
		log_put(line, sizeof line - 1, &at, " error=\"", 0);
		log_put(line, sizeof line - 1, &at, strerror(err), 1);
		log_put(line, sizeof line - 1, &at, "\"", 0);
	}
	line[at++] = '\n';
	(void)!write(2, line, at);
	errno = saved;
}

static void	log_msg(enum log_level, const char *, ...)
		    __attribute__((format(printf, 2, 3)));
static void	log_errno(enum log_level, const char *, ...)
		    __attribute__((format(printf, 2, 3)));
static void	fatal(int, const char *, ...)
		    __attribute__((format(printf, 2, 3), noreturn));

/* Logs a line (log_v). */
static void
log_msg(enum log_level lvl, const char *fmt, ...)
{
	va_list	 ap;

	va_start(ap, fmt);
	log_v(lvl, 0, fmt, ap);
	va_end(ap);
}

/* Logs a line with error="strerror(errno)" (log_v). */
static void
log_errno(enum log_level lvl, const char *fmt, ...)
{
	va_list	 ap;
	int	 err = errno;

	va_start(ap, fmt);
	log_v(lvl, err, fmt, ap);
	va_end(ap);
}

/* A start-up error: one error line, then exit(status), 2 for a bad
 * option or value (the user's to fix), 1 for what the system refused. */
static void
fatal(int status, const char *fmt, ...)
{
	va_list	 ap;

	va_start(ap, fmt);
	log_v(LVL_ERROR, 0, fmt, ap);
	va_end(ap);
	exit(status);
}

/* Microseconds of CLOCK_MONOTONIC (the query log's latency). */
static int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Milliseconds of CLOCK_MONOTONIC. */
static int64_t
now_ms(void)
{
	return now_us() / 1000;
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

/* Lowers the deadline *d to t. */
static void
dl_min(int64_t *d, int64_t t)
{
	if (t < *d)
		*d = t;
}

/* Appends descriptor fd of object idx of kind k to the poll set (sized
 * at start for every object there can be). */
static void
loop_add(enum fd_kind k, int idx, int fd, short events)
{
	struct pollfd *p = &G.pfd[G.npfd];

	p->fd = fd;
	p->events = events;
	p->revents = 0;
	G.pkind[G.npfd] = (uint8_t)k;
	G.pidx[G.npfd++] = idx;
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

/*
 * The rows of DOTP_STATS and then DOTP_UP_STATS as data: their names
 * and help texts as one block of strings, and their kinds, unpacked into
 * stat_defs at start (stat_defs_init). A table of pointers would cost a
 * relocation of 24 bytes per string in the static PIE binary.
 */
struct stat_def {
	const char *name, *help;
	enum stat_kind kind;
};
#define STAT_TEXT(id, name, kind, help)	name "\0" help "\0"
#define STAT_KIND(id, name, kind, help)	kind,
static const char stat_text[] = DOTP_STATS(STAT_TEXT)
	DOTP_UP_STATS(STAT_TEXT);
static const uint8_t stat_kinds[CTR_N + UCTR_N] = {
	DOTP_STATS(STAT_KIND) DOTP_UP_STATS(STAT_KIND)
};
static struct stat_def stat_defs[CTR_N + UCTR_N];
#define up_stat_defs	(stat_defs + CTR_N)

static void
stat_defs_init(void)
{
	const char *t = stat_text;
	int	 k;

	for (k = 0; k < CTR_N + UCTR_N; k++) {
		stat_defs[k].name = t;
		t += strlen(t) + 1;
		stat_defs[k].help = t;
		t += strlen(t) + 1;
		stat_defs[k].kind = stat_kinds[k];
	}
}

/* The value of upstream stat k of u: its counter, or the level a gauge
 * reports, read from where the engine keeps it. */
static unsigned long
up_stat(const struct upstream *u, int k)
{
	switch (k) {
	case UCTR_LEARNED_CONN_QUERIES:
		return u->cap;
	case UCTR_LEARNED_IDLE_MS:
		return (unsigned long)u->idle_ms;
	default:
		return u->ctr[k];
	}
}

/* The value of process stat k: its counter, or a gauge's level. */
static unsigned long
stat_value(int k)
{
	switch (k) {
	case CTR_CACHE_ENTRIES:
		return G.cache.entries;
	case CTR_CACHE_BYTES:
		return G.cache.bytes;
	case CTR_RL_CLIENTS:
		return G.rl_used;
	default:
		return G.ctr[k];
	}
}

/* Appends " name=value" to buf (len bytes, *at used), cutting at len. */
static void
stat_append(char *buf, size_t len, size_t *at, const char *name,
    unsigned long v)
{
	int	 n;

	if (*at >= len)
		return;
	n = snprintf(buf + *at, len - *at, " %s=%lu", name, v);
	*at += n > 0 ? (size_t)n : 0;
}

/* Adds a sample of ms milliseconds to histogram h. */
static void
hist_add(struct hist *h, int64_t ms)
{
	static const int bound[DOTP_HIST_N] = DOTP_HIST_BOUNDS;
	int	 k;

	for (k = 0; k < DOTP_HIST_N && ms > bound[k]; k++)
		;
	h->n[k]++;
	h->sum_ms += ms > 0 ? (unsigned long)ms : 0;
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

/*
 * Parses "ADDR/BITS" or a bare address (all bits) into c, host bits
 * cleared. Returns 0, or -1 if s is not of that form.
 */
static int
parse_cidr(const char *s, struct cidr *c)
{
	char	 host[INET6_ADDRSTRLEN + 1];
	const char *slash = strchr(s, '/');
	size_t	 hl = slash ? (size_t)(slash - s) : strlen(s), i;
	long	 bits;

	memset(c, 0, sizeof *c);
	if (hl == 0 || hl >= sizeof host)
		return -1;
	memcpy(host, s, hl);
	host[hl] = '\0';
	if (inet_pton(AF_INET, host, c->addr) == 1)
		c->family = AF_INET;
	else if (inet_pton(AF_INET6, host, c->addr) == 1)
		c->family = AF_INET6;
	else
		return -1;
	bits = c->family == AF_INET ? 32 : 128;
	if (slash) {
		const char *b = slash + 1;
		size_t	 bl = strlen(b);

		if (bl == 0 || bl > 3 || strspn(b, "0123456789") != bl ||
		    strtol(b, NULL, 10) > bits)
			return -1;
		bits = strtol(b, NULL, 10);
	}
	c->bits = (int)bits;
	for (i = 0; i < 16; i++) {
		long keep = bits - 8 * (long)i;

		if (keep <= 0)
			c->addr[i] = 0;
		else if (keep < 8)
			c->addr[i] &= (unsigned char)(0xff << (8 - keep));
	}
	return 0;
}

/* Does address sa fall in c? A v4-mapped IPv6 address (::ffff:a.b.c.d,
 * a client of a dual-stack [::] listener) is matched as IPv4. */
static int
cidr_match(const struct cidr *c, const struct sockaddr *sa)
{
	static const unsigned char mapped[12] = {
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff
	};
	const unsigned char *a;
	int	 fam = sa->sa_family, i, bits = c->bits;

	if (fam == AF_INET) {
		a = (const unsigned char *)
		    &((const struct sockaddr_in *)(const void *)sa)->sin_addr;
	} else if (fam == AF_INET6) {
		a = ((const struct sockaddr_in6 *)(const void *)sa)->
		    sin6_addr.s6_addr;
		if (memcmp(a, mapped, sizeof mapped) == 0) {
			a += 12;
			fam = AF_INET;
		}
	} else {
		return 0;
	}
	if (fam != c->family)
		return 0;
	for (i = 0; bits > 0; i++, bits -= 8) {
		unsigned mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;

		if ((a[i] & mask) != c->addr[i])
			return 0;
	}
	return 1;
}

/* ==== 4. DNS wire format ==== */

/*
 * Pure functions over byte buffers: no I/O, no globals. Parsers return
 * the offset just past what they read, or 0 when the input is bad (0 is
 * never a valid offset past the header). This is the fuzz target.
 * Owns nothing. Calls only the byte accessors. Called by client input
 * (check, pad), query delivery (strip, truncate), the connections
 * (check answers) and the TCP framing on both sides.
 */

/* Skips a possibly compressed name at pos. Returns the offset after it,
 * or 0. Pointers must point strictly backwards (which also ends loops),
 * labels are 1..63 bytes, the expanded name is at most 255 bytes, and
 * no pointer lands in the header. */
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
			if (ptr >= limit || ptr < DNS_HEADER_LEN)
				return 0;	/* forwards, or into the header */
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

/* Skips one resource record. Returns the offset after it, or 0. Sets
 * *type (if not NULL) to its TYPE and *fixed (if not NULL) to the offset
 * of its fixed part, just past the owner name (DNS_RR_*). */
static size_t
dns_skip_rr(const unsigned char *m, size_t len, size_t pos, unsigned *type,
    size_t *fixed)
{
	size_t	 rdlen;

	pos = dns_skip_name(m, len, pos);
	if (pos == 0 || len - pos < DNS_RR_FIXED)
		return 0;
	rdlen = rd16(m + pos + DNS_RR_RDLEN);
	if (type != NULL)
		*type = rd16(m + pos + DNS_RR_TYPE);
	if (fixed != NULL)
		*fixed = pos;
	pos += DNS_RR_FIXED;
	if (rdlen > len - pos)
		return 0;
	return pos + rdlen;
}

/*
 * Walks the answer, authority and additional records of message m from
 * pos, just past its question: the one way dotp finds an OPT record.
 * Returns the offset past the last record (r->end), or 0 if a record is
 * malformed.
 */
static size_t
dns_walk_records(const unsigned char *m, size_t len, size_t pos,
    struct dns_rrs *r)
{
	unsigned n, k, i, type;
	size_t	 start;

	memset(r, 0, sizeof *r);
	n = (unsigned)rd16(m + DNS_OFF_ANCOUNT) + rd16(m + DNS_OFF_NSCOUNT);
	k = n + rd16(m + DNS_OFF_ARCOUNT);
	for (i = 0; i < k; i++) {
		start = pos;
		if ((pos = dns_skip_rr(m, len, pos, &type, NULL)) == 0)
			return 0;
		if (type != DNS_TYPE_OPT)
			continue;
		if (r->nopt++ > 0 && r->opt != 0)
			continue;	/* the first is the one */
		if (i < n || m[start] != 0) {
			r->opt_bad = 1;
			continue;
		}
		r->opt = start;
		r->opt_end = pos;
	}
	return r->end = pos;
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
	struct dns_rrs r;
	uint16_t flags;
	size_t	 pos;

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
	/* RFC 6891 6.1.1: one OPT at most, owned by the root, in the
	 * additional section. */
	if (dns_walk_records(m, len, qi->qend, &r) == 0 || r.nopt > 1 ||
	    r.opt_bad)
		return DNS_RCODE_FORMERR;
	qi->has_opt = r.opt != 0;
	qi->opt = r.opt;
	qi->opt_end = r.opt_end;
	qi->end = r.end;
	qi->udp_size = r.opt ? rd16(m + r.opt + DNS_OPT_UDPSIZE) : 0;
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

/*
 * Pads a checked query m (len bytes, buffer of cap) in place to a
 * multiple of DOTP_PAD_BLOCK bytes with an EDNS(0) Padding option (RFC
 * 7830; the block policy of RFC 8467). Without OPT, dotp adds one
 * (payload 1232, no flags, only the padding): *how = PAD_ADDED_OPT;
 * when it pads an OPT of the client's, PAD_OPTION. The query is left as
 * it is (PAD_NONE) when it already has a padding option, when its OPT
 * is not the last record (a TSIG after it would break), when bytes
 * follow the records, or when there is no room.
 * Returns the new length, at most cap.
 */
static size_t
dns_pad_query(unsigned char *m, size_t len, size_t cap,
    const struct qinfo *qi, enum pad_how *how)
{
	size_t	 n, pad, rdlen, p, olen, rd;

	*how = PAD_NONE;
	if (qi->end != len)
		return len;
	if (!qi->has_opt) {
		static const unsigned char opt[DNS_OPT_HEADER] = {
			0, 0, DNS_TYPE_OPT,
			DNS_EDNS_UDP_MAX >> 8, DNS_EDNS_UDP_MAX & 0xff,
			0, 0, 0, 0, 0, 0
		};

		n = len + sizeof opt + DNS_OPTION_HEADER;
		pad = (DOTP_PAD_BLOCK - n % DOTP_PAD_BLOCK) % DOTP_PAD_BLOCK;
		if (n + pad > cap || rd16(m + DNS_OFF_ARCOUNT) == 0xffff)
			return len;
		memcpy(m + len, opt, sizeof opt);
		wr16(m + len + DNS_OPT_RDLEN,
		    (uint16_t)(DNS_OPTION_HEADER + pad));
		wr16(m + DNS_OFF_ARCOUNT, rd16(m + DNS_OFF_ARCOUNT) + 1);
		*how = PAD_ADDED_OPT;
	} else {
		if (qi->opt_end != len)
			return len;	/* not the last record */
		rd = qi->opt + DNS_OPT_HEADER;
		rdlen = rd16(m + qi->opt + DNS_OPT_RDLEN);
		for (p = rd; p + DNS_OPTION_HEADER <= len;
		    p += DNS_OPTION_HEADER + olen) {
			olen = rd16(m + p + DNS_OPTION_LEN);
			if (rd16(m + p) == DNS_OPT_PADDING ||
			    olen > len - p - DNS_OPTION_HEADER)
				return len;	/* padded already, or bad */
		}
		if (p != len)
			return len;	/* options do not fill the RDATA */
		n = len + DNS_OPTION_HEADER;
		pad = (DOTP_PAD_BLOCK - n % DOTP_PAD_BLOCK) % DOTP_PAD_BLOCK;
		if (n + pad > cap || rdlen + DNS_OPTION_HEADER + pad > 0xffff)
			return len;
		wr16(m + qi->opt + DNS_OPT_RDLEN,
		    (uint16_t)(rdlen + DNS_OPTION_HEADER + pad));
		*how = PAD_OPTION;
	}
	wr16(m + n - DNS_OPTION_HEADER, DNS_OPT_PADDING);
	wr16(m + n - DNS_OPTION_HEADER + DNS_OPTION_LEN, (uint16_t)pad);
	memset(m + n, 0, pad);
	return n + pad;
}

/* Skips the header and question section of a message. Returns the
 * offset of its first record, or 0 if it is malformed. */
static size_t
dns_skip_questions(const unsigned char *m, size_t len)
{
	size_t	 pos = DNS_HEADER_LEN;
	unsigned n;

	if (len < DNS_HEADER_LEN)
		return 0;
	for (n = rd16(m + DNS_OFF_QDCOUNT); n > 0; n--) {
		pos = dns_skip_name(m, len, pos);
		if (pos == 0 || len - pos < 4)
			return 0;
		pos += 4;
	}
	return pos;
}

/*
 * Finds the OPT record in the additional section of a message, when it
 * is the last record and nothing follows it: only then can bytes be cut
 * from it without breaking compression pointers of later names. Returns
 * its offset and sets *end past it (= len), or returns 0.
 */
static size_t
dns_opt_locate(const unsigned char *m, size_t len, size_t *end)
{
	struct dns_rrs r;
	size_t	 pos;

	if ((pos = dns_skip_questions(m, len)) == 0 ||
	    dns_walk_records(m, len, pos, &r) == 0 || r.opt == 0 ||
	    r.opt_end != len)
		return 0;
	*end = len;
	return r.opt;
}

/* Removes the OPT record of a message (an answer to a query whose OPT
 * dotp added) and lowers ARCOUNT. Returns the new length (len if there
 * was none). */
static size_t
dns_strip_opt(unsigned char *m, size_t len)
{
	size_t	 end, opt = dns_opt_locate(m, len, &end);

	if (opt == 0)
		return len;
	memmove(m + opt, m + end, len - end);
	wr16(m + DNS_OFF_ARCOUNT, rd16(m + DNS_OFF_ARCOUNT) - 1);
	return len - (end - opt);
}

/* Removes the Padding option from the OPT record of a message (an
 * answer to a query that dotp padded: the client did not ask for it, and
 * it has no use on the cleartext hop). Returns the new length. */
static size_t
dns_strip_padding(unsigned char *m, size_t len)
{
	size_t	 end, opt = dns_opt_locate(m, len, &end), p, olen, cut;

	if (opt == 0)
		return len;
	for (p = opt + DNS_OPT_HEADER; p + DNS_OPTION_HEADER <= end;
	    p += DNS_OPTION_HEADER + olen) {
		olen = rd16(m + p + DNS_OPTION_LEN);
		if (olen > end - p - DNS_OPTION_HEADER)
			return len;
		if (rd16(m + p) != DNS_OPT_PADDING)
			continue;
		cut = DNS_OPTION_HEADER + olen;
		memmove(m + p, m + p + cut, len - (p + cut));
		wr16(m + opt + DNS_OPT_RDLEN,
		    (uint16_t)(rd16(m + opt + DNS_OPT_RDLEN) - cut));
		return len - cut;
	}
	return len;
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

	if (alen < DNS_HEADER_LEN || qend < DNS_HEADER_LEN + 5)
		return 0;	/* can't happen: qend is validated */
	flags = rd16(a + DNS_OFF_FLAGS);
	if (!(flags & DNS_FLAG_QR))
		return 0;
	if (rd16(a + DNS_OFF_QDCOUNT) == 0)
		return (flags & 0xf) != 0;
	if (rd16(a + DNS_OFF_QDCOUNT) != 1 || alen - DNS_HEADER_LEN < qlen)
		return 0;
	/* The query's name is uncompressed and validated; an answer that
	 * compresses its question name differs here, and is refused. Case
	 * folds only in the name: QTYPE 65 is not QTYPE 97. */
	for (i = DNS_HEADER_LEN; i < qend - 4; i++)
		if (dns_lower(a[i]) != dns_lower(q[i]))
			return 0;
	return memcmp(a + qend - 4, q + qend - 4, 4) == 0;
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
			static const unsigned char opt[DNS_OPT_HEADER] = {
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
	struct dns_rrs r;
	size_t	 qend = DNS_HEADER_LEN, n;

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
	if (keep_opt && qend > DNS_HEADER_LEN &&
	    dns_walk_records(a, alen, qend, &r) && r.opt) {
		if (r.opt_end - r.opt <= limit - n) {
			memcpy(out + n, a + r.opt, r.opt_end - r.opt);
			n += r.opt_end - r.opt;
		} else if (DNS_OPT_HEADER <= limit - n) {
			memcpy(out + n, a + r.opt, DNS_OPT_HEADER);
			wr16(out + n + DNS_OPT_RDLEN, 0);	/* no options */
			n += DNS_OPT_HEADER;
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

/* ==== 5. Client output ==== */

/*
 * Sending to clients: UDP answers batched per loop pass (one
 * sendmmsg()), TCP answers framed into a bounded per-client queue
 * (DOTP_TCP_OUT_MAX, then the client is cut off), and the TCP client
 * slot's life (close, idle). Owns udp_out and struct tcpclient's output.
 * Called by query delivery (client_send), the loop (udp_flush) and TCP
 * input.
 */

/* Control-message room for one IP_PKTINFO or IPV6_PKTINFO. */
#define UDP_CTL_LEN	(CMSG_SPACE(sizeof(struct in6_pktinfo)) + \
			    CMSG_SPACE(sizeof(struct in_pktinfo)))

/* Fills mh (with iov and control room ctl) to send msg to UDP client
 * cl: from the address it sent to when that is known (a wildcard
 * listener), so a client that asked 127.0.0.2 is not answered from
 * 127.0.0.1. */
static void
udp_msg(struct msghdr *mh, struct iovec *iov, unsigned char *ctl,
    const struct client *cl, const unsigned char *msg, size_t len)
{
	union {
		struct in_pktinfo v4;
		struct in6_pktinfo v6;
	} pi;
	struct cmsghdr *cm;
	size_t	 pilen;
	int	 level, type;

	memset(mh, 0, sizeof *mh);
	iov->iov_base = (void *)(uintptr_t)msg;
	iov->iov_len = len;
	mh->msg_name = (void *)(uintptr_t)&cl->peer;
	mh->msg_namelen = cl->peerlen;
	mh->msg_iov = iov;
	mh->msg_iovlen = 1;
	if (cl->dst_family == 0)
		return;
	memset(ctl, 0, UDP_CTL_LEN);
	mh->msg_control = ctl;
	mh->msg_controllen = UDP_CTL_LEN;
	memset(&pi, 0, sizeof pi);
	if (cl->dst_family == AF_INET) {
		pi.v4.ipi_spec_dst = cl->dst.v4;
		level = IPPROTO_IP;
		type = IP_PKTINFO;
		pilen = sizeof pi.v4;
	} else {
		pi.v6.ipi6_addr = cl->dst.v6;
		level = IPPROTO_IPV6;
		type = IPV6_PKTINFO;
		pilen = sizeof pi.v6;
	}
	cm = CMSG_FIRSTHDR(mh);
	cm->cmsg_level = level;
	cm->cmsg_type = type;
	cm->cmsg_len = CMSG_LEN(pilen);
	memcpy(CMSG_DATA(cm), &pi, pilen);
	mh->msg_controllen = CMSG_SPACE(pilen);
}

/*
 * UDP answers of one loop pass are collected here and leave together:
 * one sendmmsg() on Linux (one sendmsg() each elsewhere). The arena
 * holds copies of the messages; a full batch, or an answer for another
 * listener, flushes first.
 */
static struct {
	int	 li;			/* listener of every entry */
	int	 n;
	size_t	 used;			/* bytes of arena in use */
	struct client cl[DOTP_UDP_BATCH];
	size_t	 off[DOTP_UDP_BATCH], len[DOTP_UDP_BATCH];
	unsigned char arena[DOTP_UDP_BATCH * DNS_UDP_MIN];
} udp_out;

/* One sendmmsg() of n datagrams on fd. Returns how many left, or -1
 * (errno). */
static int
send_batch(int fd, struct mmsghdr *mm, unsigned n)
{
#if defined(__linux__) && defined(SYS_sendmmsg)
	/* The system call itself: musl's sendmmsg() is a loop of sendmsg()
	 * on 64-bit targets, because its msghdr and cmsghdr have socklen_t
	 * fields plus padding where the kernel has size_t. Callers zero
	 * every header and control buffer before filling them, so the
	 * padding is 0 and the kernel reads the same values. */
	return (int)syscall(SYS_sendmmsg, fd, mm, n, MSG_DONTWAIT |
	    MSG_NOSIGNAL);
#else
	(void)n;
	return sendmsg(fd, &mm->msg_hdr, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 ?
	    -1 : 1;
#endif
}

/* Sends what udp_out holds. */
static void
udp_flush(void)
{
	static struct mmsghdr mm[DOTP_UDP_BATCH];
	static struct iovec iov[DOTP_UDP_BATCH];
	static unsigned char ctl[DOTP_UDP_BATCH][UDP_CTL_LEN];
	int	 fd, i, sent = 0, r;

	if (udp_out.n == 0)
		return;
	fd = G.lst[udp_out.li].udp;
	for (i = 0; i < udp_out.n; i++)
		udp_msg(&mm[i].msg_hdr, &iov[i], ctl[i], &udp_out.cl[i],
		    udp_out.arena + udp_out.off[i], udp_out.len[i]);
	while (sent < udp_out.n) {
		r = send_batch(fd, mm + sent, (unsigned)(udp_out.n - sent));
		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			/* Full socket buffer: UDP may drop; the client
			 * retries. Skip the one that failed. */
			G.ctr[CTR_UDP_SEND_FAILED]++;
			r = 1;
		}
		sent += r;
	}
	udp_out.n = 0;
	udp_out.used = 0;
}

/* Queues one datagram for client cl (listener cl->idx). */
static void
udp_queue(const struct client *cl, const unsigned char *msg, size_t len)
{
	if (udp_out.n == DOTP_UDP_BATCH || len > sizeof udp_out.arena -
	    udp_out.used || (udp_out.n > 0 && udp_out.li != cl->idx))
		udp_flush();
	if (len > sizeof udp_out.arena) {	/* can't happen: <= 4096 */
		G.ctr[CTR_UDP_SEND_FAILED]++;
		return;
	}
	udp_out.li = cl->idx;
	udp_out.cl[udp_out.n] = *cl;
	udp_out.off[udp_out.n] = udp_out.used;
	udp_out.len[udp_out.n] = len;
	memcpy(udp_out.arena + udp_out.used, msg, len);
	udp_out.used += len;
	udp_out.n++;
}

static void
tcp_close(struct tcpclient *c)
{
	int	 j = (int)(c - G.tcp), last;

	fd_close(&c->fd);
	free(c->out);
	c->out = NULL;
	c->out_len = c->out_off = c->out_cap = 0;
	c->rx_have = 0;
	c->pending = 0;
	c->eof = 0;
	c->gen++;
	/* Off the live list (the last one takes its place), onto free. */
	last = G.tcp_live[--G.ntcp];
	G.tcp_live[c->live_pos] = last;
	G.tcp[last].live_pos = c->live_pos;
	G.tcp_free[G.ntcp_free++] = j;
}

/* Client c has nothing outstanding now: its idle time starts, and if it
 * shut its side, the next expire() closes it. */
static void
tcp_became_idle(struct tcpclient *c)
{
	if (c->pending > 0 || c->out_len > 0)
		return;
	c->idle_since = now_ms();
	if (c->eof)
		G.tcp_scan_at = 0;
}

/* A query of TCP client cl was answered or failed. */
static void
tcp_done_query(const struct client *cl)
{
	struct tcpclient *c = &G.tcp[cl->idx];

	if (c->fd >= 0 && c->gen == cl->gen && c->pending > 0 &&
	    --c->pending == 0)
		tcp_became_idle(c);
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
	if (c->out_len > 0) {
		c->out_off = c->out_len = 0;
		tcp_became_idle(c);
	}
	return 0;
}

/* Queues one framed answer for c and tries to write it. */
static void
tcp_send(struct tcpclient *c, const unsigned char *msg, size_t len)
{
	unsigned char hdr[2];
	size_t	 need = 2 + len;

	if (c->out_len + need > DOTP_TCP_OUT_MAX) {
		log_msg(LVL_DEBUG, "tcp client not reading, closed");
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
			log_msg(LVL_WARN, "tcp client: out of memory");
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

/* RCODE mnemonics (RFC 6895), for the query log and the metrics; an
 * array of arrays, not of pointers (see stat_text). */
static const char rcode_name[16][10] = { "NOERROR", "FORMERR",
	"SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
	"NXRRSET", "NOTAUTH", "NOTZONE", "DSOTYPENI", "RCODE12", "RCODE13",
	"RCODE14", "RCODE15" };

/* Where the answers sent next come from, for the query log: a source
 * ("cache", "stale", an upstream; "dotp" by default: its own errors)
 * and when their query came (us). Set by who answers (qlog_from). */
static const char *qlog_src = "dotp";
static int64_t qlog_t0;

static void
qlog_from(const char *src, int64_t t0)
{
	qlog_src = src;
	qlog_t0 = t0;
}

/* The text of the question name of msg (a name dotp checked or an
 * answer's echo of it), dig-style escapes, into buf (>= 4 * 255). */
static void
qlog_name(const unsigned char *msg, size_t len, char *buf)
{
	size_t	 p = DNS_HEADER_LEN, at = 0, k;

	for (; p < len && msg[p] != 0 && msg[p] < 64 && p + msg[p] < len;
	    p += 1 + msg[p])
		for (k = 1; k <= msg[p]; k++) {
			unsigned char c = msg[p + k];

			at += (size_t)sprintf(buf + at, c > ' ' && c < 127 &&
			    c != '.' && c != '\\' ? "%c" : "\\%03u", c);
			if (k == msg[p])
				buf[at++] = '.';
		}
	if (at == 0)
		buf[at++] = '.';
	buf[at] = '\0';
}

/*
 * --log-queries: one line for message msg to client cl. At most
 * DOTP_QLOG_PER_S lines a second; the lines over it are counted, and
 * the count is logged when the second is over.
 */
static void
qlog(const struct client *cl, const unsigned char *msg, size_t len)
{
	static int64_t second;
	static unsigned long lines, over;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	char	 who[64] = "?", name[4 * DNS_NAME_MAX + 2];
	struct timespec ts;
	int64_t	 t = now_us();
	size_t	 q;

	if (t / 1000000 != second) {
		if (over > 0)
			log_msg(LVL_WARN, "query log: lines over %d a second "
			    "left out\tleft_out=%lu", DOTP_QLOG_PER_S, over);
		second = t / 1000000;
		lines = over = 0;
	}
	if (++lines > DOTP_QLOG_PER_S) {
		over++;
		return;
	}
	if (cl->kind == CK_UDP)
		addr_text(&cl->peer.sa, who, sizeof who);
	else if (getpeername(G.tcp[cl->idx].fd, (struct sockaddr *)&ss,
	    &sl) == 0)
		addr_text((struct sockaddr *)&ss, who, sizeof who);
	qlog_name(msg, len, name);
	q = dns_skip_name(msg, len, DNS_HEADER_LEN);
	clock_gettime(CLOCK_REALTIME, &ts);
	log_msg(LVL_INFO, "query\ttime=%lld.%03ld client=%s transport=%s "
	    "name=\"%s\" type=%u rcode=%s from=%s latency_us=%lld size=%zu",
	    (long long)ts.tv_sec, ts.tv_nsec / 1000000, who,
	    cl->kind == CK_UDP ? "udp" : "tcp", name, q && q + 2 <= len ?
	    rd16(msg + q) : 0, rcode_name[msg[DNS_OFF_FLAGS + 1] & 0xf], qlog_src,
	    (long long)(qlog_t0 ? t - qlog_t0 : 0), len);
	qlog_from("dotp", 0);	/* each answer says where it is from */
}

/* Sends one message to a client. UDP: as is (callers truncate). TCP:
 * framed and queued, if the client is still the same one. */
static void
client_send(const struct client *cl, const unsigned char *msg, size_t len)
{
	if (cl->kind == CK_NONE)
		return;		/* a refresh: nobody waits */
	if (len < DNS_HEADER_LEN)
		return;		/* can't happen: callers build answers */
	G.rcodes[msg[DNS_OFF_FLAGS + 1] & 0xf]++;
	if (G.cfg.log_queries)
		qlog(cl, msg, len);
	if (cl->kind == CK_UDP) {
		udp_queue(cl, msg, len);
		return;
	}
	if (G.tcp[cl->idx].fd >= 0 && G.tcp[cl->idx].gen == cl->gen)
		tcp_send(&G.tcp[cl->idx], msg, len);
}

/*
 * Sends answer msg (dotp's own copy: it is patched) to client cl, who
 * asked query m (question ending at qend) with ID id: its ID and the
 * exact case of its question name (clients that randomise case check
 * it), then, over UDP, truncated to its limit (keep_opt: it sent OPT).
 */
static void
client_answer(const struct client *cl, const unsigned char *m, size_t qend,
    uint16_t id, uint16_t limit, int keep_opt, unsigned char *msg,
    size_t len)
{
	unsigned char small[DOTP_UDP_SIZE_MAX];
	size_t	 n;

	wr16(msg + DNS_OFF_ID, id);
	if (rd16(msg + DNS_OFF_QDCOUNT) == 1)	/* checked: same length */
		memcpy(msg + DNS_HEADER_LEN, m + DNS_HEADER_LEN,
		    qend - DNS_HEADER_LEN);
	if (cl->kind != CK_UDP || len <= limit) {
		client_send(cl, msg, len);
		return;
	}
	n = dns_truncate(msg, len, keep_opt, small,
	    limit < sizeof small ? limit : sizeof small);
	client_send(cl, small, n);
}

/* ==== 6. Answer cache ==== */

/*
 * Answers kept for replay, in one block of --cache-size bytes mapped at
 * start (pages are touched only when used): a bucket index, then a ring
 * of entries, each a header, its key and the upstream's answer. New
 * entries go at the tail; room is made at the head, the oldest. An
 * entry hit since it was written gets one second chance there: it is
 * copied to the tail instead of dropped (CLOCK over a ring: a scan of
 * unique names cannot push out what clients keep asking for, with no
 * per-entry list to maintain and no fragmentation). Lookup is a bucket
 * and a short chain: O(1).
 * The key is the question (name without case, type, class) and the bits
 * of the query that change an answer: RD, CD, DO, EDNS or not.
 * Besides answers the ring holds pending markers: a key on its way
 * upstream, and the query slot that carries it (coalescing).
 * Owns G.cache. Calls DNS wire. Called by the query table (insert,
 * pending) and client input (lookup, replay).
 */

/* The key of a query: lowercased question, then the flag byte. */
struct ckey {
	size_t	 len;
	uint32_t hash;
	unsigned char b[DNS_NAME_MAX + 4 + 1];
};

/* Flag-byte bits of a key; CK_ON marks a query that uses the cache. */
#define CK_ON		0x80
#define CK_RD		0x01
#define CK_CD		0x02
#define CK_DO		0x04
#define CK_EDNS		0x08

/* struct centry flags. */
#define CE_LIVE		0x01	/* on its bucket's chain */
#define CE_REF		0x02	/* hit since it was written */
#define CE_PREFETCHED	0x04	/* a refresh was started */

/*
 * One entry in the ring, followed by its key and its answer (alen 0: a
 * pending marker). Sizes are multiples of 8, so headers stay aligned.
 * A dead entry (not CE_LIVE) only waits for the head to pass it.
 */
struct centry {
	uint32_t next;		/* next on the chain: offset + 1; 0 ends it */
	uint32_t hash;
	uint32_t size;		/* bytes in the ring, header included */
	uint32_t ttl;		/* seconds it is fresh */
	int64_t	 stored;	/* when it was written (ms) */
	int32_t	 lead;		/* pending marker: the query slot upstream */
	uint16_t alen;		/* answer bytes; 0: a pending marker */
	uint8_t	 klen;
	uint8_t	 flags;		/* CE_* */
};

/* Rounds n up to a multiple of 8. */
static size_t
align8(size_t n)
{
	return (n + 7) & ~(size_t)7;
}

static uint32_t
rd32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	    (uint32_t)p[2] << 8 | p[3];
}

static void
wr32(unsigned char *p, uint32_t v)
{
	wr16(p, (uint16_t)(v >> 16));
	wr16(p + 2, (uint16_t)v);
}

static struct centry *
ce_at(uint32_t off)
{
	return (struct centry *)(void *)(G.cache.ring + off);
}

static unsigned char *
ce_key(struct centry *e)
{
	return (unsigned char *)(e + 1);
}

static unsigned char *
ce_answer(struct centry *e)
{
	return ce_key(e) + e->klen;
}

/* Maps the cache: buckets (one per DOTP_CACHE_BUCKET_BYTES of budget)
 * and the ring. Returns 0, or -1 (errno) when the system refuses. */
static int
cache_init(size_t budget)
{
	struct cache *c = &G.cache;
	size_t	 nb = 1, idx;
	void	*p;

	while (nb * 2 * DOTP_CACHE_BUCKET_BYTES <= budget)
		nb *= 2;
	idx = align8(nb * sizeof *c->bucket);
	p = mmap(NULL, budget, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return -1;
	c->bucket = p;
	c->mask = (uint32_t)nb - 1;
	c->ring = (unsigned char *)p + idx;
	c->cap = budget - idx;
	c->wrap_at = c->cap;
	if (fill_random(&c->seed, sizeof c->seed) < 0)
		return -1;
	return 0;
}

/* The key bytes of a query m whose question ends at qend, with flag
 * byte f: the question with the name lowercased (type and class as they
 * are: type 65 is not type 97), then f. */
static void
cache_key_bytes(const unsigned char *m, size_t qend, unsigned f,
    struct ckey *k)
{
	size_t	 i;

	k->len = qend - DNS_HEADER_LEN + 1;
	for (i = 0; i + 5 < k->len; i++)	/* the name folds, */
		k->b[i] = (unsigned char)dns_lower(m[DNS_HEADER_LEN + i]);
	memcpy(k->b + i, m + DNS_HEADER_LEN + i, 4);	/* type, class not */
	k->b[i + 4] = (unsigned char)f;
}

/* The key of query m (cache_key_bytes) and its hash. */
static void
cache_key_of(const unsigned char *m, size_t qend, unsigned f,
    struct ckey *k)
{
	uint32_t h = G.cache.seed;
	size_t	 i;

	cache_key_bytes(m, qend, f, k);
	/* FNV-1a from a random basis, then a finalizer (murmur3's): the
	 * chains cannot be aimed at without the seed. */
	for (i = 0; i < k->len; i++)
		h = (h ^ k->b[i]) * 16777619u;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	k->hash = h;
}

/*
 * The key of query m (checked; question ending at qend; its OPT from
 * opt to optend, opt 0: none). Returns its flag byte | CK_ON, or -1 when
 * the query must bypass the cache: it carries an EDNS Client Subnet
 * option (its answer is for that subnet only).
 */
static int
cache_key(const unsigned char *m, size_t qend, size_t opt, size_t optend,
    struct ckey *k)
{
	uint16_t flags = rd16(m + DNS_OFF_FLAGS);
	size_t	 p, olen;
	unsigned f = CK_ON;

	if (flags & DNS_FLAG_RD)
		f |= CK_RD;
	if (flags & DNS_FLAG_CD)
		f |= CK_CD;
	if (opt != 0) {
		f |= CK_EDNS;
		if (m[opt + DNS_OPT_FLAGS] & DNS_OPT_FLAG_DO)
			f |= CK_DO;
		for (p = opt + DNS_OPT_HEADER; p + DNS_OPTION_HEADER <= optend;
		    p += DNS_OPTION_HEADER + olen) {
			olen = rd16(m + p + DNS_OPTION_LEN);
			if (rd16(m + p) == DNS_OPT_ECS)
				return -1;
		}
	}
	cache_key_of(m, qend, f, k);
	return f;
}

/* Takes entry e off its bucket's chain: it is dead. */
static void
cache_unlink(struct centry *e)
{
	struct cache *c = &G.cache;
	uint32_t *pp = &c->bucket[e->hash & c->mask];
	uint32_t off = (uint32_t)((unsigned char *)e - c->ring);

	while (*pp != 0 && *pp != off + 1)
		pp = &ce_at(*pp - 1)->next;
	if (*pp != 0)
		*pp = e->next;
	e->flags &= (uint8_t)~CE_LIVE;
	if (e->alen > 0) {
		c->entries--;
		c->bytes -= e->size;
	}
}

/* Puts entry e (at its place in the ring) at the head of its chain. */
static void
cache_link(struct centry *e)
{
	struct cache *c = &G.cache;
	uint32_t *b = &c->bucket[e->hash & c->mask];

	e->next = *b;
	*b = (uint32_t)((unsigned char *)e - c->ring) + 1;
	e->flags |= CE_LIVE;
	if (e->alen > 0) {
		c->entries++;
		c->bytes += e->size;
	}
}

/* The live entry for key k: an answer (pending = 0) or a pending marker
 * (pending = 1), or NULL. */
static struct centry *
cache_lookup(const struct ckey *k, int pending)
{
	struct cache *c = &G.cache;
	uint32_t o;

	if (c->ring == NULL)
		return NULL;
	for (o = c->bucket[k->hash & c->mask]; o != 0; o = ce_at(o - 1)->next) {
		struct centry *e = ce_at(o - 1);

		if (e->hash == k->hash && e->klen == k->len &&
		    (e->alen == 0) == pending &&
		    memcmp(ce_key(e), k->b, k->len) == 0)
			return e;
	}
	return NULL;
}

/* Ends the pending marker of query slot lead, whose key has hash h, if
 * it is still there. */
static void
cache_unmark(uint32_t h, int lead)
{
	struct cache *c = &G.cache;
	uint32_t o;

	for (o = c->bucket[h & c->mask]; o != 0; o = ce_at(o - 1)->next) {
		struct centry *e = ce_at(o - 1);

		if (e->alen == 0 && e->lead == lead && e->hash == h) {
			cache_unlink(e);
			return;
		}
	}
}

/* Is entry e fresh at now; or usable stale (--serve-stale)? */
static int
ce_fresh(const struct centry *e, int64_t now)
{
	return now < e->stored + (int64_t)e->ttl * 1000;
}

static int
ce_stale_ok(const struct centry *e, int64_t now)
{
	return now < e->stored + ((int64_t)e->ttl + G.cfg.serve_stale) * 1000;
}

/*
 * Frees the entry at the head of the ring: a dead one is passed over; a
 * live one hit since written and still usable is copied to the tail
 * when there is room there (its second chance), else dropped.
 */
static void
cache_reclaim(int64_t now)
{
	struct cache *c = &G.cache;
	struct centry *e = ce_at(c->head), *n;
	uint32_t size = e->size;

	if (e->flags & CE_LIVE) {
		cache_unlink(e);
		if (e->alen > 0 && (e->flags & CE_REF) && ce_stale_ok(e, now) &&
		    c->wrapped) {
			/* The free bytes [tail, head) and e are one run: e
			 * slides down to the tail (the runs may overlap). */
			n = ce_at(c->tail);
			memmove(n, e, size);
			n->flags &= (uint8_t)~CE_REF;
			cache_link(n);
			c->tail += size;
			c->used += size;
		} else if (e->alen > 0 && ce_stale_ok(e, now)) {
			G.ctr[CTR_CACHE_EVICTIONS]++;
		}
	}
	c->head += size;
	c->used -= size;
	if (c->head == c->wrap_at) {
		c->head = 0;
		c->wrapped = 0;
		c->wrap_at = c->cap;
	}
	if (c->used == 0) {
		c->head = c->tail = 0;
		c->wrapped = 0;
		c->wrap_at = c->cap;
	}
}

/* Makes size contiguous bytes free at the tail (size <= cap / 4).
 * Returns the offset. */
static uint32_t
cache_room(uint32_t size, int64_t now)
{
	struct cache *c = &G.cache;
	uint32_t off;

	for (;;) {
		if (!c->wrapped) {
			if (c->cap - c->tail >= size)
				break;
			/* The end [tail, cap) stays unused this lap. */
			c->wrap_at = c->tail;
			c->wrapped = 1;
			c->tail = 0;
			if (c->head == c->wrap_at) {	/* it was empty */
				c->head = 0;
				c->wrapped = 0;
				c->wrap_at = c->cap;
			}
			continue;
		}
		if (c->head - c->tail >= size)
			break;
		cache_reclaim(now);
	}
	off = c->tail;
	c->tail += size;
	c->used += size;
	return off;
}

/* Logs (-v) how many answers were evicted since the last such line, at
 * most once per DOTP_EVICT_LOG_MS: never a line per query. */
static void
cache_log_evictions(int64_t now)
{
	struct cache *c = &G.cache;
	unsigned long n = G.ctr[CTR_CACHE_EVICTIONS];

	if (n == c->evict_logged || now - c->evict_log_at < DOTP_EVICT_LOG_MS)
		return;
	log_msg(LVL_DEBUG, "cache full: answers evicted to make room (raise "
	    "--cache-size if they are asked again)	evicted=%lu entries=%lu "
	    "bytes=%lu", n - c->evict_logged, c->entries, c->bytes);
	c->evict_logged = n;
	c->evict_log_at = now;
}

/* Writes an entry for key k: answer a (alen bytes; 0 for a pending
 * marker of query slot lead) fresh for ttl seconds. An entry of the same
 * kind for k is replaced; an answer also ends k's pending marker. */
static void
cache_put(const struct ckey *k, const unsigned char *a, size_t alen,
    uint32_t ttl, int lead, int64_t now)
{
	struct centry *e;
	uint32_t size = (uint32_t)align8(sizeof *e + k->len + alen);

	if (G.cache.ring == NULL || size > G.cache.cap / 4)
		return;
	if ((e = cache_lookup(k, alen == 0)) != NULL)
		cache_unlink(e);
	if (alen > 0 && (e = cache_lookup(k, 1)) != NULL)
		cache_unlink(e);
	e = ce_at(cache_room(size, now));
	cache_log_evictions(now);
	memset(e, 0, sizeof *e);
	e->hash = k->hash;
	e->size = size;
	e->ttl = ttl;
	e->stored = now;
	e->lead = lead;
	e->alen = (uint16_t)alen;
	e->klen = (uint8_t)k->len;
	memcpy(ce_key(e), k->b, k->len);
	if (alen > 0)
		memcpy(ce_answer(e), a, alen);
	cache_link(e);
}

/* Do a and b (same length len) hold the same name at pos, read through
 * their compression pointers? Both were checked by dns_skip_name(). */
static int
dns_name_same(const unsigned char *a, const unsigned char *b, size_t len,
    size_t pos)
{
	size_t	 pa = pos, pb = pos;
	unsigned hops;

	for (hops = 0; hops < DNS_NAME_MAX; hops++) {
		if (pa >= len || pb >= len || a[pa] != b[pb])
			return 0;
		if ((a[pa] & 0xc0) == 0xc0) {
			if (pa + 1 >= len || pb + 1 >= len)
				return 0;
			pa = (size_t)(a[pa] & 0x3f) << 8 | a[pa + 1];
			pb = (size_t)(b[pb] & 0x3f) << 8 | b[pb + 1];
			continue;
		}
		if (a[pa] == 0)
			return 1;
		if (a[pa] > len - pa - 1 || b[pb] > len - pb - 1 ||
		    memcmp(a + pa + 1, b + pb + 1, a[pa]) != 0)
			return 0;
		pa += 1 + a[pa];
		pb += 1 + b[pb];
	}
	return 0;
}

/*
 * The common case of dns_ttls_apart(), without a copy: the owner name
 * at pos of answer a (parsed; question ending at qend) is the root or a
 * pointer to a label of the question's name, which is uncompressed and
 * ends before the first record: it cannot read a TTL.
 */
static int
dns_owner_plain(const unsigned char *a, size_t pos, size_t qend)
{
	size_t	 ptr, l;

	if (a[pos] == 0)
		return 1;
	if ((a[pos] & 0xc0) != 0xc0)
		return 0;
	ptr = (size_t)(a[pos] & 0x3f) << 8 | a[pos + 1];
	for (l = DNS_HEADER_LEN; l < ptr && a[l] != 0; l += 1 + a[l])
		;
	return l == ptr && l < qend - 4;
}

/*
 * Can the TTLs of answer a (alen bytes, records from qend, parsed) be
 * rewritten without changing anything else? Not when a name reads bytes
 * of a TTL field through its compression pointers (an upstream's bogus
 * compression): that name would read differently. A copy with every TTL
 * inverted must hold the same records and the same owner names.
 */
static int
dns_ttls_apart(const unsigned char *a, size_t alen, size_t qend)
{
	static unsigned char t[DOTP_CACHE_ANSWER_MAX];
	unsigned n, i, type;
	size_t	 pos, rr, k;

	if (alen > sizeof t)
		return 0;
	memcpy(t, a, alen);
	n = (unsigned)rd16(a + DNS_OFF_ANCOUNT) + rd16(a + DNS_OFF_NSCOUNT) +
	    rd16(a + DNS_OFF_ARCOUNT);
	for (i = 0, pos = qend; i < n; i++) {
		if ((pos = dns_skip_rr(a, alen, pos, &type, &rr)) == 0)
			return 0;
		for (k = 0; k < 4 && type != DNS_TYPE_OPT; k++)
			t[rr + DNS_RR_TTL + k] ^= 0xff;
	}
	for (i = 0, pos = qend; i < n; i++) {
		rr = dns_skip_name(t, alen, pos);
		if (rr != dns_skip_name(a, alen, pos) ||
		    !dns_name_same(a, t, alen, pos) ||
		    memcmp(a + rr, t + rr, DNS_RR_TTL) != 0 ||
		    (pos = dns_skip_rr(a, alen, pos, &type, NULL)) == 0)
			return 0;
	}
	return 1;
}

/*
 * How long upstream answer a (alen bytes, checked: one question ending
 * at qend) may be kept, in seconds, by the rules of RFC 1035, 2181 and
 * 2308 and the --cache-* options; 0: not at all (TC; a record that does
 * not parse; TTLs that cannot be rewritten alone, dns_ttls_apart; a
 * negative answer without an SOA; a lifetime of 0). Failures (SERVFAIL,
 * REFUSED, ...) are held DOTP_CACHE_FAIL_HOLD_S. One walk of the records.
 */
static uint32_t
cache_lifetime(const unsigned char *a, size_t alen, size_t qend)
{
	uint16_t flags = rd16(a + DNS_OFF_FLAGS);
	unsigned an = rd16(a + DNS_OFF_ANCOUNT), n, i, type;
	int	 rcode = flags & 0xf, neg, plain = 1;
	uint32_t t, m, min = UINT32_MAX, soa = UINT32_MAX;
	size_t	 pos = qend, rr, end;
	struct dns_rrs r;

	if ((flags & DNS_FLAG_TC) || alen > DOTP_CACHE_ANSWER_MAX)
		return 0;
	if (rd16(a + DNS_OFF_QDCOUNT) == 0)	/* an error may omit it */
		return rcode != 0 && rcode != DNS_RCODE_NXDOMAIN && an == 0 &&
		    rd16(a + DNS_OFF_NSCOUNT) == 0 &&
		    dns_walk_records(a, alen, DNS_HEADER_LEN, &r) ?
		    DOTP_CACHE_FAIL_HOLD_S : 0;
	if (rd16(a + DNS_OFF_QDCOUNT) != 1)
		return 0;
	neg = rcode == DNS_RCODE_NXDOMAIN || an == 0;
	n = an + rd16(a + DNS_OFF_NSCOUNT);
	for (i = 0; i < n + rd16(a + DNS_OFF_ARCOUNT); i++, pos = end) {
		if ((end = dns_skip_rr(a, alen, pos, &type, &rr)) == 0)
			return 0;
		plain = plain && dns_owner_plain(a, pos, qend);
		if (i >= n)
			continue;	/* additional: parsed, not counted */
		t = rd32(a + rr + DNS_RR_TTL);
		if (t > 0x7fffffff)	/* RFC 2181 8: counts as 0 */
			t = 0;
		if (t < min)
			min = t;
		if (!neg || i < an || type != DNS_TYPE_SOA ||
		    end - rr - DNS_RR_FIXED < 22)	/* two names + 20 */
			continue;
		m = rd32(a + end - 4);	/* MINIMUM, a TTL too */
		soa = m > 0x7fffffff ? 0 : t < m ? t : m;
	}
	if (!plain && !dns_ttls_apart(a, alen, qend))
		return 0;
	if (rcode != 0 && rcode != DNS_RCODE_NXDOMAIN)
		return DOTP_CACHE_FAIL_HOLD_S;
	if (neg) {
		if (soa == UINT32_MAX)
			return 0;	/* RFC 2308 5: no SOA, no caching */
		min = soa < (uint32_t)G.cfg.cache_neg_ttl ? soa :
		    (uint32_t)G.cfg.cache_neg_ttl;
	}
	if (min < (uint32_t)G.cfg.cache_min_ttl)
		min = (uint32_t)G.cfg.cache_min_ttl;
	if (min > (uint32_t)G.cfg.cache_max_ttl)
		min = (uint32_t)G.cfg.cache_max_ttl;
	return min;
}

/*
 * Copies entry e's answer (question ending at qend) into out
 * (DOTP_CACHE_ANSWER_MAX bytes) with every TTL but OPT's lowered by the
 * whole seconds e has been kept (never below 0), or set to
 * DOTP_STALE_TTL for a stale answer. ID and question case are the
 * client's business (client_answer). Returns its length.
 */
static size_t
cache_replay(struct centry *e, size_t qend, int64_t now, int stale,
    unsigned char *out)
{
	uint32_t age = (uint32_t)((now - e->stored) / 1000), t;
	unsigned n, i, type;
	size_t	 pos, rr, end;

	memcpy(out, ce_answer(e), e->alen);
	pos = rd16(out + DNS_OFF_QDCOUNT) ? qend : DNS_HEADER_LEN;
	n = (unsigned)rd16(out + DNS_OFF_ANCOUNT) + rd16(out + DNS_OFF_NSCOUNT) +
	    rd16(out + DNS_OFF_ARCOUNT);
	for (i = 0; i < n; i++, pos = end) {	/* dns_ttls_apart() */
		if ((end = dns_skip_rr(out, e->alen, pos, &type, &rr)) == 0)
			break;		/* can't happen */
		if (type == DNS_TYPE_OPT)
			continue;
		t = rd32(out + rr + DNS_RR_TTL);
		t = stale ? DOTP_STALE_TTL : t > 0x7fffffff || t <= age ? 0 :
		    t - age;
		wr32(out + rr + DNS_RR_TTL, t);
	}
	return e->alen;
}

/* ==== 7. Query table ==== */

/*
 * Query slots live in G.q[] (G.nq of them, --max-queries). Slots from
 * G.qhigh on were never used and are not touched (their pages cost no
 * RSS); freed ones form a LIFO list, taken first, so the same few slots
 * serve a light load.
 * Upstream IDs map back to slots through G.idtab, an open-addressing
 * table keyed by the ID itself (IDs are random, so the low bits hash
 * well), at most half full; deletion shifts entries back, so no
 * tombstones build up.
 * Owns G.q, G.idtab and the age list. Calls client output (answers,
 * SERVFAIL). Called by client input (alloc), the connections (find,
 * deliver) and the fate rules (unlink, SERVFAIL).
 */

/* Appends slot i to list l, by its links of kind w. */
static void
qlist_push(struct qlist *l, int i, enum qlink_kind w)
{
	struct qlink *k = &G.q[i].lk[w];

	k->prev = l->tail;
	k->next = -1;
	if (l->tail >= 0)
		G.q[l->tail].lk[w].next = i;
	else
		l->head = i;
	l->tail = i;
	l->n++;
}

/* Takes slot i off list l, by its links of kind w. */
static void
qlist_remove(struct qlist *l, int i, enum qlink_kind w)
{
	struct qlink *k = &G.q[i].lk[w];

	if (k->prev >= 0)
		G.q[k->prev].lk[w].next = k->next;
	else
		l->head = k->next;
	if (k->next >= 0)
		G.q[k->next].lk[w].prev = k->prev;
	else
		l->tail = k->prev;
	k->prev = k->next = -1;
	l->n--;
}



/* Sizes and links the tables for n slots. Returns 0, or -1 when out of
 * memory (start-up only). */
static int
q_init(int n)
{
	unsigned size = 1;

	while (size < 2 * (unsigned)n)
		size *= 2;
	free(G.q);
	free(G.idtab);
	G.q = calloc((size_t)n, sizeof *G.q);
	G.idtab = calloc(size, sizeof *G.idtab);
	if (G.q == NULL || G.idtab == NULL)
		return -1;
	G.nq = n;
	G.idmask = size - 1;
	G.qfree = -1;
	G.qhigh = 0;
	G.qlive = 0;
	G.age = (struct qlist)QLIST_ZERO;
	G.stale = (struct qlist)QLIST_ZERO;
	return 0;
}

/* Slot index for upstream ID id, or -1. */
static int
q_find(uint16_t id)
{
	unsigned h = id & G.idmask;

	while (G.idtab[h] != 0) {
		int i = G.idtab[h] - 1;
		if (G.q[i].up_id == id)
			return i;
		h = (h + 1) & G.idmask;
	}
	return -1;
}

static void
id_insert(int i)
{
	unsigned h = G.q[i].up_id & G.idmask;

	while (G.idtab[h] != 0)
		h = (h + 1) & G.idmask;
	G.idtab[h] = (uint16_t)(i + 1);
}

/* Removes slot i's ID; shifts later entries of the cluster back so that
 * every entry stays reachable from its home position. */
static void
id_remove(int i)
{
	unsigned mask = G.idmask, h, j, home;

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
 * queries. Returns the slot (state Q_LOOSE), or -1 when the table is
 * full. */
static int
q_alloc(void)
{
	uint16_t id;
	int	 i = G.qfree >= 0 ? G.qfree : G.qhigh < G.nq ? G.qhigh : -1;

	if (i < 0)
		return -1;
	do {
		if (rand16(&id) < 0)
			return -1;
	} while (q_find(id) >= 0);
	if (i == G.qfree)
		G.qfree = G.q[i].lk[QL_MAIN].next;
	else
		G.qhigh++;
	G.q[i].up_id = id;
	G.q[i].state = Q_LOOSE;
	G.q[i].lk[QL_MAIN].prev = G.q[i].lk[QL_MAIN].next = -1;
	G.q[i].conn = G.q[i].pconn = -1;
	G.q[i].tries = G.q[i].tried = G.q[i].recycles = 0;
	G.q[i].ck = G.q[i].lead = G.q[i].stale = G.q[i].tcp = 0;
	G.q[i].usock = -1;
	G.q[i].fol = (struct qlist)QLIST_ZERO;
	id_insert(i);
	qlist_push(&G.age, i, QL_AGE);
	G.qlive++;
	return i;
}

/* Gives live query i a fresh upstream ID, unique among live queries
 * (a datagram sent again). Without randomness it keeps its own. */
static void
q_new_id(int i)
{
	uint16_t id;

	do {
		if (rand16(&id) < 0)
			return;
	} while (q_find(id) >= 0);
	id_remove(i);
	G.q[i].up_id = id;
	wr16(G.q[i].qbuf + DNS_OFF_ID, id);
	id_insert(i);
}

/* The cache key of live query i (it uses the cache: q->ck != 0); its
 * hash was made once, when the query came. */
static void
q_key(int i, struct ckey *k)
{
	const struct query *q = &G.q[i];

	cache_key_bytes(q->qbuf, q->qend, q->ck, k);
	k->hash = q->chash;
}

/* Frees slot i. It MUST be Q_LOOSE (off every upstream list) and have
 * no followers. Its pending marker in the cache goes with it. */
static void
q_free(int i)
{
	struct query *q = &G.q[i];

	if (q->cl.kind == CK_TCP)
		tcp_done_query(&q->cl);
	if (q->lead) {
		cache_unmark(q->chash, i);
		q->lead = 0;
	}
	if (q->stale) {
		qlist_remove(&G.stale, i, QL_STALE);
		q->stale = 0;
	}
	id_remove(i);
	qlist_remove(&G.age, i, QL_AGE);
	q->state = Q_FREE;
	q->lk[QL_MAIN].next = G.qfree;
	G.qfree = i;
	G.qlive--;
}

/* Takes query i off whichever list its state puts it on: Q_LOOSE. A
 * connection left with nothing in flight owes no answers; a socket of
 * plain DNS over UDP owes one less. */
static void
q_unlink(int i)
{
	struct query *q = &G.q[i];
	struct conn *c = q->conn >= 0 ? &G.conn[q->conn] : NULL;

	if (q->usock >= 0) {
		G.dsock[q->usock].inflight--;
		q->usock = -1;
	}
	switch (q->state) {
	case Q_QUEUED:
		qlist_remove(&G.up[q->up].tx, i, QL_MAIN);
		break;
	case Q_DGRAM:
		qlist_remove(&G.up[q->up].ul, i, QL_MAIN);
		break;
	case Q_DGRAM_LATE:
		qlist_remove(&G.up[q->up].ulate, i, QL_MAIN);
		break;
	case Q_SENT:
		qlist_remove(&c->fl, i, QL_MAIN);
		break;
	case Q_LATE:
		qlist_remove(&c->late, i, QL_MAIN);
		break;
	case Q_FOLLOW:
		qlist_remove(&G.q[q->leader].fol, i, QL_MAIN);
		break;
	default:
		break;
	}
	if ((q->state == Q_SENT || q->state == Q_LATE) &&
	    c->fl.n + c->late.n == 0)
		c->owe_since = 0;
	q->state = Q_LOOSE;
}

/* When query i came: all share one timeout. */
static int64_t
q_arrival(int i)
{
	return G.q[i].deadline - G.cfg.timeout_ms;
}

/* Answers query i (Q_LOOSE) with msg from src (the query log's
 * from=), and frees it. */
static void
q_reply(int i, unsigned char *msg, size_t len, const char *src)
{
	struct query *q = &G.q[i];

	qlog_from(src, q->t0_us);
	client_answer(&q->cl, q->qbuf, q->qend, q->client_id, q->udp_limit,
	    q->has_opt, msg, len);
	q_free(i);
}

/* Keeps upstream answer msg (as clients of query i's key get it) in the
 * cache, for as long as cache_lifetime() says. */
static void
q_cache_store(int i, const unsigned char *msg, size_t len, int64_t now)
{
	struct centry *e;
	struct ckey k;
	uint32_t ttl;
	int	 rcode = rd16(msg + DNS_OFF_FLAGS) & 0xf;

	if ((ttl = cache_lifetime(msg, len, G.q[i].qend)) == 0)
		return;
	q_key(i, &k);
	/* A failed refresh (prefetch, serve-stale) keeps what was there:
	 * a usable answer beats a held SERVFAIL (RFC 8767 4). */
	if (rcode != 0 && rcode != DNS_RCODE_NXDOMAIN &&
	    (e = cache_lookup(&k, 0)) != NULL && ce_stale_ok(e, now))
		return;
	cache_put(&k, msg, len, ttl, -1, now);
}

/*
 * Delivers the answer msg (in a connection's rx buffer, which dotp owns
 * and may patch) to the client of query i and to its followers: what
 * dotp added to the query is undone, the answer is kept in the cache,
 * and each client gets its own ID, question case and size. Frees them.
 * Query i MUST be Q_LOOSE.
 */
static void
q_deliver(int i, unsigned char *msg, size_t len, int64_t now)
{
	struct query *q = &G.q[i];
	int	 f;

	/* Undo what dotp added: the client gets what it asked for. */
	if (q->padded == PAD_ADDED_OPT)
		len = dns_strip_opt(msg, len);
	else if (q->padded == PAD_OPTION)
		len = dns_strip_padding(msg, len);
	if (q->ck)
		q_cache_store(i, msg, len, now);
	while ((f = q->fol.head) >= 0) {
		q_unlink(f);
		G.ctr[CTR_ANSWERS]++;
		hist_add(&G.answer_time, now - q_arrival(f));
		q_reply(f, msg, len, G.up[q->up].label);
	}
	if (q->cl.kind != CK_NONE) {	/* not a refresh nobody waits for */
		G.ctr[CTR_ANSWERS]++;
		hist_add(&G.answer_time, now - q_arrival(i));
	}
	q_reply(i, msg, len, G.up[q->up].label);
}

/*
 * Answers query i (Q_LOOSE) and its followers with the answer the cache
 * holds for their key, if it is still usable (stale: up to
 * --serve-stale past expiry, with TTL 30), and frees the followers.
 * Query i is freed too, unless keep: then its client is answered and
 * it goes on upstream as a refresh. Returns 1 if it served one.
 */
static int
q_serve_stale(int i, int64_t now, int keep)
{
	static unsigned char out[DOTP_CACHE_ANSWER_MAX];
	struct query *q = &G.q[i];
	struct centry *e;
	struct ckey k;
	size_t	 n;
	int	 f;

	q_key(i, &k);
	if ((e = cache_lookup(&k, 0)) == NULL || !ce_stale_ok(e, now))
		return 0;
	n = cache_replay(e, q->qend, now, !ce_fresh(e, now), out);
	while ((f = q->fol.head) >= 0) {
		q_unlink(f);
		G.ctr[CTR_CACHE_STALE]++;
		q_reply(f, out, n, "stale");
	}
	if (q->cl.kind != CK_NONE)
		G.ctr[CTR_CACHE_STALE]++;
	if (q->stale) {
		qlist_remove(&G.stale, i, QL_STALE);
		q->stale = 0;
	}
	if (!keep) {
		q_reply(i, out, n, "stale");
		return 1;
	}
	qlog_from("stale", q->t0_us);
	client_answer(&q->cl, q->qbuf, q->qend, q->client_id, q->udp_limit,
	    q->has_opt, out, n);
	if (q->cl.kind == CK_TCP)
		tcp_done_query(&q->cl);
	q->cl.kind = CK_NONE;
	return 1;
}

/* Answers query i (Q_LOOSE) with SERVFAIL, or with a stale answer when
 * --serve-stale keeps one for its key (every upstream failed, or its
 * time is up); its followers the same. Frees them. */
static void
q_servfail(int i, int64_t now, enum ctr why)
{
	struct query *q = &G.q[i];
	unsigned char out[DNS_UDP_MIN];
	size_t	 n;
	int	 f;

	if (q->ck && G.cfg.serve_stale > 0 && (q->cl.kind != CK_NONE ||
	    q->fol.head >= 0) && q_serve_stale(i, now, 0))
		return;
	while ((f = q->fol.head) >= 0) {
		q_unlink(f);
		q_servfail(f, now, why);
	}
	wr16(q->qbuf + DNS_OFF_ID, q->client_id);
	n = dns_make_error(q->qbuf, q->qlen, q->qend, q->has_opt,
	    DNS_RCODE_SERVFAIL, out, sizeof out);
	qlog_from("dotp", q->t0_us);
	if (n > 0)
		client_send(&q->cl, out, n);
	G.ctr[CTR_SERVFAIL]++;
	G.ctr[why]++;
	q_free(i);
}

/* ==== 8. TLS ==== */

/*
 * Trust anchors: compiled in from ca-bundle/ (build/ta.h, made by
 * `brssl ta`), or read from a PEM file at start with --ca-file.
 * The client profile is trimmed to what public DoT resolvers negotiate:
 * TLS 1.2, ECDHE with ECDSA or RSA, AES-GCM or ChaCha20-Poly1305.
 * Owns the trust anchors. Calls BearSSL. Called by setup (anchors, one
 * context per connection) and the connections (errors in words).
 */

#ifndef DOTP_NO_EMBEDDED_TAS
/* One embedded anchor in dotp_ta_blob (build/ta.h, made by
 * ca-bundle/tapack.c): its DN, then the RSA modulus and exponent (a, b)
 * or the EC point (a). */
struct ta_index {
	uint32_t off;
	uint16_t dn_len, a_len, b_len;
	uint8_t	 type, curve;
};
#include "ta.h"

/* The embedded anchors as BearSSL takes them, pointing into the blob. */
static const br_x509_trust_anchor *
ta_embedded(void)
{
	static br_x509_trust_anchor tas[DOTP_EMBEDDED_TAS_NUM];
	size_t	 i;

	for (i = 0; i < DOTP_EMBEDDED_TAS_NUM; i++) {
		const struct ta_index *x = &dotp_ta_index[i];
		unsigned char *p = (unsigned char *)(uintptr_t)(dotp_ta_blob +
		    x->off);

		tas[i].dn.data = p;
		tas[i].dn.len = x->dn_len;
		tas[i].flags = BR_X509_TA_CA;
		tas[i].pkey.key_type = x->type;
		p += x->dn_len;
		if (x->type == BR_KEYTYPE_RSA) {
			tas[i].pkey.key.rsa.n = p;
			tas[i].pkey.key.rsa.nlen = x->a_len;
			tas[i].pkey.key.rsa.e = p + x->a_len;
			tas[i].pkey.key.rsa.elen = x->b_len;
		} else {
			tas[i].pkey.key.ec.curve = x->curve;
			tas[i].pkey.key.ec.q = p;
			tas[i].pkey.key.ec.qlen = x->a_len;
		}
	}
	return tas;
}
#endif

/* A growing buffer (start-up only; its size is bounded by the caller).
 * After a failed add it is poisoned: p is NULL and every later add
 * fails, so a decoder callback that cannot return an error loses
 * nothing silently. */
struct bytes {
	unsigned char *p;
	size_t	 len, cap;
	int	 failed;
};

/* Appends data to b. Returns 0, or -1 when out of memory (poisoned). */
static int
bytes_add(struct bytes *b, const void *data, size_t len)
{
	if (b->failed)
		return -1;
	if (len > b->cap - b->len) {
		size_t cap = b->cap ? b->cap : 256;
		unsigned char *np;

		while (cap - b->len < len)
			cap *= 2;
		if ((np = realloc(b->p, cap)) == NULL) {
			free(b->p);
			b->p = NULL;
			b->len = b->cap = 0;
			b->failed = 1;
			return -1;
		}
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, len);
	b->len += len;
	return 0;
}

/* bytes_add as a BearSSL decoder callback; a failure poisons b. */
static void
bytes_append_cb(void *ctx, const void *data, size_t len)
{
	(void)bytes_add(ctx, data, len);
}

/* Turns one DER certificate into a trust anchor (CA flag set). Memory is
 * allocated once at start and kept for the process lifetime.
 * Returns 0, or -1 if the certificate can't be decoded. */
static int
ta_from_der(const unsigned char *der, size_t len, br_x509_trust_anchor *ta)
{
	br_x509_decoder_context dc;
	struct bytes dn = { NULL, 0, 0, 0 };
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
	struct bytes file = { NULL, 0, 0, 0 }, der = { NULL, 0, 0, 0 };
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

/*
 * TLS 1.2 suites public DoT resolvers offer: forward secrecy, AEAD.
 * Servers usually pick by their own preference, and many (unbound, for
 * one) prefer ChaCha20 when offered. With AES-NI and PCLMULQDQ, AES-GCM
 * costs a fraction of ChaCha20-Poly1305 in software, so then only
 * AES-GCM is offered (every public DoT resolver has it); without them,
 * ChaCha20 comes first and AES-GCM (constant-time, slow) after.
 */
static const uint16_t dotp_suites_aesni[] = {
	BR_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	BR_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	BR_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	BR_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
};
static const uint16_t dotp_suites_soft[] = {
	BR_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	BR_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
	BR_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	BR_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	BR_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	BR_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
};

/* Does this CPU run BearSSL's AES-NI and PCLMULQDQ code? */
static int
tls_have_aesni(void)
{
	return br_aes_x86ni_ctr_get_vtable() != NULL &&
	    br_ghash_pclmul_get() != 0;
}

/*
 * SPKI pins (@sha256/BASE64 after a server's #NAME, RFC 7469's form):
 * the SHA-256 of a certificate's DER SubjectPublicKeyInfo. BearSSL
 * decodes keys but keeps no DER, so spki_hash writes the DER again from
 * the key, as `openssl pkey -pubin -outform der` does: RSA with NULL
 * parameters, EC on a named curve. struct pinx509 checks them: by
 * default the chain and name are verified as without pins and a key of
 * the verified path (leaf, intermediates, or the anchor that verified
 * it) must match; with @pin-only, the leaf's key must match and a chain
 * that reaches no anchor is forgiven (BR_ERR_X509_NOT_TRUSTED alone).
 */
#define DOTP_ERR_PIN	(BR_ERR_X509_OK + 31)	/* unused by BearSSL */
static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Writes a DER tag and length len at p. Returns the bytes written. */
static size_t
der_head(unsigned char *p, unsigned tag, size_t len)
{
	size_t	 n = 0;

	p[n++] = (unsigned char)tag;
	if (len >= 128)
		p[n++] = len >= 256 ? 0x82 : 0x81;
	if (len >= 256)
		p[n++] = (unsigned char)(len >> 8);
	p[n++] = (unsigned char)len;
	return n;
}

/* Writes the DER INTEGER of unsigned big-endian v (len bytes) at p. */
static size_t
der_int(unsigned char *p, const unsigned char *v, size_t len)
{
	size_t	 n, pad;

	while (len > 1 && *v == 0) {
		v++;
		len--;
	}
	pad = len > 0 && (*v & 0x80);
	n = der_head(p, 0x02, len + pad);
	p[n] = 0;
	memcpy(p + n + pad, v, len);
	return n + pad + len;
}

/* The pin of key pk into out. Returns 0, or -1 for a curve that
 * certificates do not use. */
static int
spki_hash(const br_x509_pkey *pk, unsigned char out[32])
{
	static const unsigned char rsa[] = { 0x30, 0x0d, 0x06, 0x09, 0x2a,
	    0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00 };
	static const unsigned char ec[] = {	/* P-256, P-384, P-521 */
	    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
	    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
	    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
	    0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22,
	    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
	    0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23 };
	unsigned char b[2 * BR_X509_BUFSIZE_KEY + 16], h1[4], h2[5];
	const unsigned char *alg = rsa;
	size_t	 alen = sizeof rsa, bl, il, n1, n2;
	br_sha256_context sc;
	int	 c = pk->key.ec.curve;

	if (pk->key_type == BR_KEYTYPE_RSA) {	/* SEQUENCE { n, e } */
		il = der_int(b + 4, pk->key.rsa.n, pk->key.rsa.nlen);
		il += der_int(b + 4 + il, pk->key.rsa.e, pk->key.rsa.elen);
		n1 = der_head(h1, 0x30, il);
		memmove(b + n1, b + 4, il);
		memcpy(b, h1, n1);
		bl = n1 + il;
	} else if (c >= BR_EC_secp256r1 && c <= BR_EC_secp521r1) {
		alg = ec + (c == BR_EC_secp256r1 ? 0 : c == BR_EC_secp384r1 ?
		    21 : 39);
		alen = c == BR_EC_secp256r1 ? 21 : 18;
		memcpy(b, pk->key.ec.q, pk->key.ec.qlen);
		bl = pk->key.ec.qlen;
	} else {
		return -1;
	}
	n2 = der_head(h2, 0x03, bl + 1);	/* BIT STRING, 0 bits unused */
	h2[n2++] = 0;
	n1 = der_head(h1, 0x30, alen + n2 + bl);
	br_sha256_init(&sc);
	br_sha256_update(&sc, h1, n1);
	br_sha256_update(&sc, alg, alen);
	br_sha256_update(&sc, h2, n2);
	br_sha256_update(&sc, b, bl);
	br_sha256_out(&sc, out);
	return 0;
}

/* Does hash h match a pin of sv? */
static int
pin_find(const struct server *sv, const unsigned char *h)
{
	int	 k;

	for (k = 0; k < sv->npin; k++)
		if (memcmp(sv->pin[k], h, 32) == 0)
			return 1;
	return 0;
}

/* The verified path ended at a trust anchor the server did not send:
 * does the anchor's key match? It is an anchor whose subject is the
 * issuer xc hashed last (saved_dn_hash, SHA-256 as set in tls_setup);
 * if several anchors have that subject, each must match. */
static int
pin_anchor(const struct pinx509 *p)
{
	unsigned char dn[32], h[32];
	br_sha256_context sc;
	size_t	 k;
	int	 match = 0;

	for (k = 0; k < G.ntas; k++) {
		const br_x509_trust_anchor *ta = &G.tas[k];

		if (!(ta->flags & BR_X509_TA_CA))
			continue;
		br_sha256_init(&sc);
		br_sha256_update(&sc, ta->dn.data, ta->dn.len);
		br_sha256_out(&sc, dn);
		if (memcmp(dn, p->xc->saved_dn_hash, sizeof dn) != 0)
			continue;
		/* Anchors sharing a subject (a CA re-keyed under its name):
		 * which one verified is not known, so all must match. */
		if (spki_hash(&ta->pkey, h) < 0 || !pin_find(p->sv, h))
			return 0;
		match = 1;
	}
	return match;
}

static void
px_ignore_dn(UNUSED void *ctx, UNUSED const void *buf, UNUSED size_t len)
{
}

static void
px_start_chain(const br_x509_class **ctx, const char *server_name)
{
	struct pinx509 *p = (struct pinx509 *)(void *)ctx;

	p->ncert = p->past = p->match = p->have_leaf = 0;
	p->xc->vtable->start_chain(&p->xc->vtable, p->sv->no_name ? NULL :
	    server_name);
}

static void
px_start_cert(const br_x509_class **ctx, uint32_t length)
{
	struct pinx509 *p = (struct pinx509 *)(void *)ctx;

	p->past |= p->xc->err == BR_ERR_X509_OK;
	br_x509_decoder_init(&p->dc, px_ignore_dn, NULL);
	p->xc->vtable->start_cert(&p->xc->vtable, length);
}

static void
px_append(const br_x509_class **ctx, const unsigned char *buf, size_t len)
{
	struct pinx509 *p = (struct pinx509 *)(void *)ctx;

	p->xc->vtable->append(&p->xc->vtable, buf, len);
	if (!p->past && p->dc.err == 0)	/* it must not run on after */
		br_x509_decoder_push(&p->dc, buf, len);	/* an error */
}

/* A certificate of the path: hash its key; the leaf's is kept. */
static void
px_end_cert(const br_x509_class **ctx)
{
	struct pinx509 *p = (struct pinx509 *)(void *)ctx;
	const br_x509_pkey *pk = br_x509_decoder_get_pkey(&p->dc);
	unsigned char h[32];

	p->xc->vtable->end_cert(&p->xc->vtable);
	if (!p->past && pk != NULL && spki_hash(pk, h) == 0 &&
	    (p->ncert == 0 || !p->sv->pin_only)) {
		if (p->ncert == 0) {
			memcpy(p->leaf, h, sizeof h);
			p->have_leaf = 1;
		}
		p->match |= pin_find(p->sv, h);
	}
	p->ncert++;
}

static unsigned
px_end_chain(const br_x509_class **ctx)
{
	struct pinx509 *p = (struct pinx509 *)(void *)ctx;
	unsigned err = p->xc->vtable->end_chain(&p->xc->vtable);

	if (p->sv->pin_only && err == BR_ERR_X509_NOT_TRUSTED)
		err = 0;
	if (err != 0 || p->match || (!p->sv->pin_only && pin_anchor(p)))
		return err;
	return DOTP_ERR_PIN;
}

static const br_x509_pkey *
px_get_pkey(const br_x509_class *const *ctx, unsigned *usages)
{
	const struct pinx509 *p = (const struct pinx509 *)(const void *)ctx;

	return p->xc->vtable->get_pkey(&p->xc->vtable, usages);
}

static const br_x509_class px_vtable = {
	sizeof(struct pinx509), px_start_chain, px_start_cert, px_append,
	px_end_cert, px_end_chain, px_get_pkey
};

/* Writes pin h as text, sha256/ and 44 characters of base64. */
static void
pin_text(const unsigned char *h, char out[52])
{
	uint32_t acc = 0;
	int	 bits = 0, k, o = 7;

	memcpy(out, "sha256/", 7);
	for (k = 0; k < 32; k++) {
		acc = acc << 8 | h[k];
		for (bits += 8; bits >= 6; bits -= 6)
			out[o++] = b64_alphabet[(acc >> (bits - 6)) & 63];
	}
	out[o++] = b64_alphabet[(acc << (6 - bits)) & 63];
	out[o++] = '=';
	out[o] = '\0';
}

/* The fields of a pin failure of c: the pins expected, the key seen. */
static void
pin_fields(const struct conn *c, char *buf, size_t len)
{
	const struct server *sv = G.up[c->up].sv;
	char	 t[52];
	size_t	 at;
	int	 k;

	at = (size_t)snprintf(buf, len, "tls_error=%d pins=\"", DOTP_ERR_PIN);
	for (k = 0; k < sv->npin && at < len; k++) {
		pin_text(sv->pin[k], t);
		at += (size_t)snprintf(buf + at, len - at, "%s%s", k ? "," : "",
		    t);
	}
	if (c->px.have_leaf)
		pin_text(c->px.leaf, t);
	if (at < len)
		snprintf(buf + at, len - at, "\" key=%s", c->px.have_leaf ? t :
		    "none");
}

/* Sets up the BearSSL client of connection c, once, at start. */
static void
tls_setup(struct conn *c)
{
	br_ssl_engine_context *eng = &c->cc.eng;

	br_ssl_client_zero(&c->cc);
	/* tls_attach injects getrandom() bytes before every reset: BearSSL
	 * must not seed from the system too (RDRAND, or else an open() of
	 * /dev/urandom, which the sandbox forbids). */
	c->cc.eng.rng_os_rand_done = 1;
	br_ssl_engine_set_versions(eng, BR_TLS12, BR_TLS12);
	if (tls_have_aesni())
		br_ssl_engine_set_suites(eng, dotp_suites_aesni,
		    sizeof dotp_suites_aesni / sizeof dotp_suites_aesni[0]);
	else
		br_ssl_engine_set_suites(eng, dotp_suites_soft,
		    sizeof dotp_suites_soft / sizeof dotp_suites_soft[0]);
	br_ssl_engine_set_hash(eng, br_sha256_ID, &br_sha256_vtable);
	br_ssl_engine_set_hash(eng, br_sha384_ID, &br_sha384_vtable);
	br_ssl_engine_set_prf_sha256(eng, &br_tls12_sha256_prf);
	br_ssl_engine_set_prf_sha384(eng, &br_tls12_sha384_prf);
	br_ssl_engine_set_default_aes_gcm(eng);
#if defined(__x86_64__)
	/* SSE2 and 64x64->128 multiplies are x86-64's baseline: the
	 * portable ChaCha20 and Poly1305 that the default setter keeps as
	 * fallbacks would be 3 KB of dead code. setup_anchors() checks
	 * that BearSSL was built with these two. */
	br_ssl_engine_set_chapol(eng, &br_sslrec_in_chapol_vtable,
	    &br_sslrec_out_chapol_vtable);
	br_ssl_engine_set_chacha20(eng, br_chacha20_sse2_get());
	br_ssl_engine_set_poly1305(eng, br_poly1305_ctmulq_get());
#else
	br_ssl_engine_set_default_chapol(eng);
#endif
	br_ssl_engine_set_ec(eng, &br_ec_all_m31);
	br_ssl_engine_set_rsavrfy(eng, &br_rsa_i31_pkcs1_vrfy);
	br_ssl_engine_set_ecdsa(eng, &br_ecdsa_i31_vrfy_asn1);

	br_x509_minimal_init(&c->xc, &br_sha256_vtable, G.tas, G.ntas);
	br_x509_minimal_set_hash(&c->xc, br_sha256_ID, &br_sha256_vtable);
	br_x509_minimal_set_hash(&c->xc, br_sha384_ID, &br_sha384_vtable);
	br_x509_minimal_set_hash(&c->xc, br_sha512_ID, &br_sha512_vtable);
	br_x509_minimal_set_rsa(&c->xc, &br_rsa_i31_pkcs1_vrfy);
	br_x509_minimal_set_ecdsa(&c->xc, &br_ec_all_m31,
	    &br_ecdsa_i31_vrfy_asn1);
	br_ssl_engine_set_x509(eng, &c->xc.vtable);
	if (G.up[c->up].sv->npin > 0) {	/* pins: xc behind struct pinx509 */
		c->px.vtable = &px_vtable;
		c->px.xc = &c->xc;
		c->px.sv = G.up[c->up].sv;
		br_ssl_engine_set_x509(eng, &c->px.vtable);
	}

	/* Two separate buffers: the bidi single-buffer call of 0.6
	 * overlaps them. The input side stays full size (servers send
	 * 16 KB records regardless of Max Fragment Length). */
	br_ssl_engine_set_buffers_bidi(eng, c->ibuf, sizeof c->ibuf,
	    c->obuf, sizeof c->obuf);
	br_ssl_engine_add_flags(eng, BR_OPT_NO_RENEGOTIATION);
}

/*
 * What BearSSL's error codes mean for the user: the engine's own codes,
 * the certificate checks, and the alerts a server sends (BearSSL adds
 * BR_ERR_RECV_FATAL_ALERT to their number). The text is the log's
 * message; the code is kept as a field (tls_fields). Codes and texts
 * are two tables without pointers (see stat_text).
 */
#define TLS_WHYS(X) \
	X(BR_ERR_UNSUPPORTED_VERSION, "server chose a TLS version dotp does " \
	    "not speak (dotp speaks TLS 1.2)") \
	X(BR_ERR_BAD_VERSION, "server changed TLS version mid-session") \
	X(BR_ERR_BAD_LENGTH, "server sent a malformed record: is it a DoT " \
	    "server?") \
	X(BR_ERR_TOO_LARGE, "server sent a record too large") \
	X(BR_ERR_BAD_MAC, "record failed authentication: corrupted or " \
	    "tampered with in transit") \
	X(BR_ERR_UNKNOWN_TYPE, "server sent a record of unknown type: is it " \
	    "a DoT server?") \
	X(BR_ERR_UNEXPECTED, "server sent an unexpected handshake message") \
	X(BR_ERR_BAD_HANDSHAKE, "server sent a malformed handshake message") \
	X(BR_ERR_BAD_CIPHER_SUITE, "server chose a cipher suite dotp did " \
	    "not offer") \
	X(BR_ERR_BAD_SNI, "server sent a malformed name extension") \
	X(BR_ERR_LIMIT_EXCEEDED, "server's handshake exceeds dotp's limits") \
	X(BR_ERR_BAD_FINISHED, "handshake integrity check failed") \
	X(BR_ERR_RESUME_MISMATCH, "server resumed a session with other " \
	    "parameters") \
	X(BR_ERR_INVALID_ALGORITHM, "server signed with an algorithm dotp " \
	    "did not offer") \
	X(BR_ERR_BAD_SIGNATURE, "server's handshake signature is invalid") \
	X(BR_ERR_WRONG_KEY_USAGE, "server's certificate key may not be used " \
	    "that way") \
	X(BR_ERR_X509_EMPTY_CHAIN, "server sent no certificate") \
	X(BR_ERR_X509_UNSUPPORTED, "certificate uses an unsupported " \
	    "algorithm") \
	X(BR_ERR_X509_WRONG_KEY_TYPE, "certificate key type does not match " \
	    "the cipher suite") \
	X(BR_ERR_X509_BAD_SIGNATURE, "certificate signature invalid or " \
	    "unsupported") \
	X(BR_ERR_X509_TIME_UNKNOWN, "certificate validity not checkable: no " \
	    "clock") \
	X(BR_ERR_X509_EXPIRED, "certificate expired or not yet valid") \
	X(BR_ERR_X509_DN_MISMATCH, "certificate chain out of order") \
	X(BR_ERR_X509_BAD_SERVER_NAME, "certificate name mismatch: the name " \
	    "after # is not in the server's certificate") \
	X(BR_ERR_X509_CRITICAL_EXTENSION, "certificate has an unsupported " \
	    "critical extension") \
	X(BR_ERR_X509_NOT_CA, "certificate chain has a non-CA issuer") \
	X(BR_ERR_X509_FORBIDDEN_KEY_USAGE, "certificate key usage forbids " \
	    "TLS server use") \
	X(BR_ERR_X509_WEAK_PUBLIC_KEY, "certificate key too weak") \
	X(BR_ERR_X509_NOT_TRUSTED, "certificate not trusted: no known CA " \
	    "(see --ca-file)") \
	X(DOTP_ERR_PIN, "certificate key matches no pin of this upstream " \
	    "(@sha256/...)") \
	X(BR_ERR_RECV_FATAL_ALERT + 0, "server closed with close_notify " \
	    "during the handshake") \
	X(BR_ERR_RECV_FATAL_ALERT + 10, "server received an unexpected " \
	    "message") \
	X(BR_ERR_RECV_FATAL_ALERT + 20, "server saw a record fail " \
	    "authentication") \
	X(BR_ERR_RECV_FATAL_ALERT + 40, "no cipher suite or curve in common " \
	    "with the server") \
	X(BR_ERR_RECV_FATAL_ALERT + 42, "server requires a client " \
	    "certificate") \
	X(BR_ERR_RECV_FATAL_ALERT + 47, "server rejected a handshake " \
	    "parameter") \
	X(BR_ERR_RECV_FATAL_ALERT + 49, "server denied access") \
	X(BR_ERR_RECV_FATAL_ALERT + 50, "server could not decode dotp's " \
	    "handshake") \
	X(BR_ERR_RECV_FATAL_ALERT + 51, "server failed to verify the " \
	    "handshake") \
	X(BR_ERR_RECV_FATAL_ALERT + 70, "server requires TLS 1.3 (dotp " \
	    "speaks TLS 1.2)") \
	X(BR_ERR_RECV_FATAL_ALERT + 71, "server requires stronger security " \
	    "than dotp offers") \
	X(BR_ERR_RECV_FATAL_ALERT + 80, "server had an internal error") \
	X(BR_ERR_RECV_FATAL_ALERT + 86, "server refused a fallback") \
	X(BR_ERR_RECV_FATAL_ALERT + 90, "server cancelled the handshake") \
	X(BR_ERR_RECV_FATAL_ALERT + 109, "server requires a TLS 1.3 " \
	    "extension: it may require TLS 1.3") \
	X(BR_ERR_RECV_FATAL_ALERT + 112, "server does not serve the name " \
	    "after # (SNI)") \
	X(BR_ERR_RECV_FATAL_ALERT + 116, "server requires a client " \
	    "certificate") \
	X(BR_ERR_RECV_FATAL_ALERT + 120, "server requires an ALPN protocol " \
	    "dotp does not offer")
#define WHY_CODE(code, text)	code,
#define WHY_TEXT(code, text)	text "\0"
static const uint16_t tls_why_code[] = { TLS_WHYS(WHY_CODE) };
static const char tls_why_text[] = TLS_WHYS(WHY_TEXT);

/* The user's words for BearSSL error err; buf (len bytes) holds the
 * text for a code not in TLS_WHYS. */
static const char *
tls_strerror(int err, char *buf, size_t len)
{
	const char *t = tls_why_text;
	size_t	 k;

	for (k = 0; k < sizeof tls_why_code / sizeof tls_why_code[0]; k++) {
		if (tls_why_code[k] == err)
			return t;
		t += strlen(t) + 1;
	}
	if (err >= BR_ERR_SEND_FATAL_ALERT)
		snprintf(buf, len, "dotp sent fatal alert %d",
		    err - BR_ERR_SEND_FATAL_ALERT);
	else if (err >= BR_ERR_RECV_FATAL_ALERT)
		snprintf(buf, len, "server sent fatal alert %d",
		    err - BR_ERR_RECV_FATAL_ALERT);
	else if (err >= BR_ERR_X509_OK)
		snprintf(buf, len, "certificate invalid (x509 error %d)", err);
	else
		snprintf(buf, len, "TLS error %d", err);
	return buf;
}

/* The code of err as log fields: "tls_error=N", plus "alert=A" for an
 * alert the server sent or "alert_sent=A" for one dotp sent. */
static void
tls_fields(int err, char *buf, size_t len)
{
	if (err >= BR_ERR_SEND_FATAL_ALERT)
		snprintf(buf, len, "tls_error=%d alert_sent=%d", err,
		    err - BR_ERR_SEND_FATAL_ALERT);
	else if (err >= BR_ERR_RECV_FATAL_ALERT)
		snprintf(buf, len, "tls_error=%d alert=%d", err,
		    err - BR_ERR_RECV_FATAL_ALERT);
	else
		snprintf(buf, len, "tls_error=%d", err);
}

/* ==== 9. Upstreams: zones, health, RTT, picking, learned limits ==== */

/*
 * The policy side of struct upstream: the zone a query's name falls in
 * (zone_of), its servers' health (down, back-off), RTT and attempt
 * timeout, picking one of them for a query (--policy), queueing a query
 * on it (or, to a plain DNS server, its datagram: dgram_send), and what
 * it learns from how its server ends connections (conn_learn: queries
 * per connection, idle time). Nothing here does I/O but dgram_send.
 * Owns struct upstream's health and learned fields, and G.zone.
 * Calls the query table. Called by the fate rules, the connections and
 * client input (up_pick, up_enqueue).
 */

static struct conn *
conn_of(int ui, int k)
{
	return &G.conn[ui * G.cfg.max_conns + k];
}

static unsigned
conn_inflight(const struct conn *c)
{
	return c->fl.n + c->late.n;
}

/* Connection c's number within its upstream, for logs: with the
 * generation it tells one session from another. */
static int
conn_slot(const struct conn *c)
{
	return (int)(c - G.conn) % G.cfg.max_conns;
}

/* The log fields naming connection c. */
#define CONN_FMT	"upstream=%s conn=%d gen=%u"
#define CONN_ARGS(c)	G.up[(c)->up].label, conn_slot(c), (c)->gen

/* The attempt timeout of u, in milliseconds (see DOTP_ATTEMPT_*). */
static int
up_attempt_ms(const struct upstream *u)
{
	int	 t;

	if (G.cfg.attempt_ms > 0)
		t = G.cfg.attempt_ms;
	else if (!u->have_rtt)
		t = DOTP_ATTEMPT_INIT_MS;
	else {
		t = u->srtt + 4 * u->rttvar;
		if (t < DOTP_ATTEMPT_MIN_MS)
			t = DOTP_ATTEMPT_MIN_MS;
		if (t > DOTP_ATTEMPT_MAX_MS)
			t = DOTP_ATTEMPT_MAX_MS;
	}
	if (t > G.cfg.timeout_ms / 2)
		t = G.cfg.timeout_ms / 2;
	return t > 0 ? t : 1;
}

/* Folds one round-trip sample into u's estimate (RFC 6298 2.2-2.3). */
static void
up_rtt_sample(struct upstream *u, int64_t rtt)
{
	int	 r = rtt > 60000 ? 60000 : (int)rtt, d;

	if (!u->have_rtt) {
		u->srtt = r;
		u->rttvar = r / 2;
		u->have_rtt = 1;
		return;
	}
	d = u->srtt > r ? u->srtt - r : r - u->srtt;
	u->rttvar = (3 * u->rttvar + d) / 4;
	u->srtt = (7 * u->srtt + r) / 8;
}

/*
 * The zone that query m's name (its question ends at qend) falls in:
 * the longest --forward zone it is at or under, label by label and
 * without regard to case, else 0, the default ".". Suffixes are tried
 * from the whole name down, so the first match is the longest. The name
 * was validated and is uncompressed (dns_check_query).
 */
static int
zone_of(const unsigned char *m, size_t qend)
{
	const unsigned char *name = m + DNS_HEADER_LEN;
	size_t	 nlen = qend - 4 - DNS_HEADER_LEN, p, k;
	int	 zi;

	if (G.nzone == 1)
		return 0;
	for (p = 0; p < nlen && name[p] != 0; p += 1 + (size_t)name[p])
		for (zi = 1; zi < G.nzone; zi++) {
			const struct zone *z = &G.zone[zi];

			if (z->len != nlen - p)
				continue;
			for (k = 0; k < z->len && dns_lower(name[p + k]) ==
			    z->name[k]; k++)
				;
			if (k == z->len)
				return zi;
		}
	return 0;
}

/* An answer, or a completed handshake, showed that u works. */
static void
up_alive(struct upstream *u)
{
	if (u->down)
		log_msg(LVL_INFO, "upstream is up again\tupstream=%s",
		    u->label);
	u->down = u->trial = 0;
	u->backoff_ms = 0;
}

/* Is there a server of ui's zone other than ui that is healthy? */
static int
up_other_healthy(int ui)
{
	const struct zone *z = &G.zone[G.up[ui].zone];
	int	 i;

	for (i = z->first; i < z->first + z->n; i++)
		if (i != ui && !G.up[i].down)
			return 1;
	return 0;
}

/*
 * Picks the server of zone zi for a send: by policy (first healthy in
 * the order given, or round-robin over the healthy ones), skipping
 * those in the bitmask skip; a plain server on trial counts as healthy
 * for one query.
 * If none is and allow_down, the least recently failed of the others.
 * Returns an index into G.up, or -1.
 */
static int
up_pick(int zi, uint32_t skip, int allow_down)
{
	struct zone *z = &G.zone[zi];
	int	 i, k, best = -1;

	for (k = 0; k < z->n; k++) {
		i = z->first + (G.cfg.policy == POLICY_RR ?
		    (z->rr + k) % z->n : k);
		if (!(skip & 1u << i) && (!G.up[i].down || G.up[i].trial)) {
			G.up[i].trial = 0;	/* one query tries it */
			if (G.cfg.policy == POLICY_RR)
				z->rr = (i - z->first + 1) % z->n;
			return i;
		}
	}
	if (!allow_down)
		return -1;
	for (i = z->first; i < z->first + z->n; i++)
		if (!(skip & 1u << i) &&
		    (best < 0 || G.up[i].failed_at < G.up[best].failed_at))
			best = i;
	return best;
}

/*
 * The socket for the next datagram to a server of family af: its
 * family's current one, or a new one when that has carried
 * DOTP_DGRAM_USES queries (the old one stays open for the answers it is
 * owed). The kernel binds a new socket to a random port at its first
 * send. Returns a slot of G.dsock, or -1 when none can be had.
 */
static int
dsock_get(int af)
{
	int	 f = af == AF_INET6, s = G.dcur[f], k, fd;

	if (s >= 0 && G.dsock[s].uses < DOTP_DGRAM_USES)
		return s;
	for (k = 0; k < DOTP_DGRAM_SOCKS && G.dsock[k].fd >= 0; k++)
		;
	if (k == DOTP_DGRAM_SOCKS || (fd = socket(af, SOCK_DGRAM |
	    SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0)
		return s;	/* the current one serves on, if any */
	G.dsock[k].fd = fd;
	G.dsock[k].uses = G.dsock[k].inflight = 0;
	G.dcur[f] = k;
	return k;
}

/*
 * Sends the datagrams of the pass, one sendmmsg() for them all (they
 * share a socket). One the kernel refuses is lost like a dropped
 * packet: its attempt timeout sends it again.
 */
static void
dgram_flush(void)
{
	static struct mmsghdr mm[DOTP_DGRAM_BATCH];
	static struct iovec iov[DOTP_DGRAM_BATCH];
	int	 n = 0, k, r, s = G.dout_sock;

	for (k = 0; k < G.dout_n; k++) {
		struct query *q = &G.q[G.dout_q[k]];
		struct upstream *u = &G.up[q->up];

		if (q->state != Q_DGRAM || q->usock != s)
			continue;	/* answered or moved on: can't happen */
		iov[n].iov_base = q->qbuf;
		iov[n].iov_len = q->qlen;
		memset(&mm[n], 0, sizeof mm[n]);
		mm[n].msg_hdr.msg_name = &u->addr;
		mm[n].msg_hdr.msg_namelen = u->addrlen;
		mm[n].msg_hdr.msg_iov = &iov[n];
		mm[n].msg_hdr.msg_iovlen = 1;
		n++;
	}
	G.dout_n = 0;
	for (k = 0; k < n; k += r)
		if ((r = send_batch(G.dsock[s].fd, mm + k, (unsigned)(n - k))) <=
		    0) {
			if (r < 0 && errno == EINTR) {
				r = 0;
				continue;
			}
			log_errno(LVL_DEBUG, "datagrams to plain DNS servers "
			    "not sent; they go again after the attempt "
			    "timeout\tdatagrams=%d", n - k);
			return;
		}
}

/*
 * Sends Q_LOOSE query i to plain DNS server ui over UDP: from a socket
 * of the pool (dsock_get), at the end of the pass (dgram_flush); a
 * datagram sent again gets a new ID. Q_DGRAM on ui's ul. Returns 0, or
 * -1 when no socket can be had: the query then goes over TCP.
 */
static int
dgram_send(int ui, int i, int64_t now)
{
	struct upstream *u = &G.up[ui];
	struct query *q = &G.q[i];
	int	 s = dsock_get(u->addr.sa.sa_family);

	if (s < 0)
		return -1;
	if (q->tries > 0) {
		q_new_id(i);
		q->pconn = -1;	/* no answer can match it there now */
	}
	if (G.dout_n == DOTP_DGRAM_BATCH || (G.dout_n > 0 &&
	    G.dout_sock != s))
		dgram_flush();
	G.dout_sock = s;
	G.dout_q[G.dout_n++] = i;
	G.dsock[s].uses++;
	G.dsock[s].inflight++;
	q->usock = s;
	q->state = Q_DGRAM;
	q->sent_at = now;
	q->tries++;
	qlist_push(&u->ul, i, QL_MAIN);
	u->ctr[UCTR_SENT]++;
	return 0;
}

/* Queues Q_LOOSE query i on upstream ui's tx, for a connection; sent_at
 * holds the queueing time until the query is injected. A query for a
 * plain DNS server leaves over UDP at once instead (dgram_send), unless
 * its answer was truncated or no socket is to be had. */
static void
up_enqueue(int ui, int i, int64_t now)
{
	struct query *q = &G.q[i];

	q->up = (uint8_t)ui;
	q->tried |= 1u << ui;
	if (G.up[ui].plain && !q->tcp && dgram_send(ui, i, now) == 0)
		return;
	q->sent_at = now;
	q->state = Q_QUEUED;
	qlist_push(&G.up[ui].tx, i, QL_MAIN);
	G.kick = 1;
}

/* How long a connection of u may sit idle before dotp closes it:
 * --idle-timeout, or less when the server was seen to close sooner. */
static int
up_idle_ms(const struct upstream *u)
{
	int	 t = u->idle_ms / 4 * 3;

	return u->idle_ms > 0 && t < G.cfg.idle_ms ? t : G.cfg.idle_ms;
}

/* Does connection c still take queries under u's learned count? */
static int
conn_has_cap(const struct conn *c)
{
	const struct upstream *u = &G.up[c->up];

	return u->cap == 0 || c->sent < u->cap;
}

/* The queries connection c (open, or being opened) can still take:
 * under --conn-queries in flight and under the learned count. */
static unsigned
conn_room(const struct conn *c)
{
	const struct upstream *u = &G.up[c->up];
	unsigned lim = (unsigned)G.cfg.conn_queries, n = conn_inflight(c);

	if (!conn_has_cap(c) || n >= lim)
		return 0;
	lim -= n;
	return u->cap > 0 && u->cap - c->sent < lim ? u->cap - c->sent : lim;
}

/* Does upstream ui have a connection that completed its handshake and
 * still takes queries (not spent under a learned count)? */
static int
up_has_ready(int ui)
{
	int	 k;

	for (k = 0; k < G.cfg.max_conns; k++)
		if (conn_of(ui, k)->state == C_READY &&
		    conn_has_cap(conn_of(ui, k)))
			return 1;
	return 0;
}

/*
 * Marks u down for a back-off; logged at error when it was up. why says
 * what failed, fields are key=value pairs naming the connection and the
 * code. Connections that fail together (opened in parallel) double the
 * back-off once.
 */
static void
up_down(struct upstream *u, int64_t now, enum fail_kind kind, const char *why,
    const char *fields)
{
	int	 was_down = u->down;

	if (!u->down || now - u->failed_at >= DOTP_BACKOFF_MIN_MS)
		u->backoff_ms = u->backoff_ms ? 2 * u->backoff_ms :
		    DOTP_BACKOFF_MIN_MS;
	if (u->backoff_ms > DOTP_BACKOFF_MAX_MS)
		u->backoff_ms = DOTP_BACKOFF_MAX_MS;
	u->retry_at = now + u->backoff_ms;
	u->failed_at = now;
	u->ctr[UCTR_FAILURES]++;
	u->ctr[UCTR_FAIL_CONNECT + kind]++;
	log_msg(was_down ? LVL_DEBUG : LVL_ERROR, "upstream down: %s; %s\t"
	    "upstream=%s name=%s %s%sretry_in_ms=%d", why, up_other_healthy(
	    (int)(u - G.up)) ? "queries go to other upstreams until it "
	    "answers again" : "no other upstream is healthy: queries wait "
	    "for it, or get SERVFAIL", u->label, u->name, fields,
	    *fields ? " " : "", u->backoff_ms);
	u->down = 1;
	u->trial = 0;
}

/*
 * The server ended ready connection c (close_notify, FIN, RST or a cut
 * frame). Learns what that says about the server: a close right after
 * an answer is a count of queries per connection; a close after a quiet
 * spell with nothing owed is an idle timeout. Each is taken when the
 * previous close said the same (DOTP_CAP_GAP_MS and the rest), and
 * logged when it changes.
 */
static void
conn_learn(struct conn *c, int64_t now)
{
	struct upstream *u = &G.up[c->up];
	int64_t	 quiet = now - c->last_active;
	unsigned n = c->answered;

	if (n > 0 && now - c->last_answer <= DOTP_CAP_GAP_MS) {
		if (u->cap_seen != n) {
			u->cap_seen = n;	/* once: wait for a second */
			return;
		}
		if (u->cap != 0 && n >= u->cap)
			return;
		u->cap = n;
		u->learned_at = now;
		log_msg(LVL_INFO, "upstream closes connections after %u "
		    "answers; later connections carry at most that many "
		    "queries\t" CONN_FMT " learned_conn_queries=%u", n,
		    CONN_ARGS(c), n);
		return;
	}
	if (conn_inflight(c) > 0 || quiet < DOTP_IDLE_LEARN_MIN_MS ||
	    quiet >= up_idle_ms(u))
		return;
	if (quiet > u->idle_seen + u->idle_seen / 4 ||
	    quiet < u->idle_seen - u->idle_seen / 4) {
		u->idle_seen = (int)quiet;	/* once: wait for a second */
		return;
	}
	u->idle_ms = (int)(quiet < u->idle_seen ? quiet : u->idle_seen);
	u->learned_at = now;
	log_msg(LVL_INFO, "upstream closes idle connections after about %d "
	    "ms; dotp now closes its own idle ones after %d ms\t" CONN_FMT
	    " learned_idle_ms=%d", u->idle_ms, up_idle_ms(u), CONN_ARGS(c),
	    u->idle_ms);
}

/* Forgets what was learned of u after DOTP_LEARN_TTL_MS: it is learned
 * again if it still holds. */
static void
up_unlearn(struct upstream *u, int64_t now)
{
	if ((u->cap == 0 && u->idle_ms == 0) ||
	    now - u->learned_at < DOTP_LEARN_TTL_MS)
		return;
	log_msg(LVL_DEBUG, "upstream limits forgotten, to be learned again\t"
	    "upstream=%s learned_conn_queries=%u learned_idle_ms=%d",
	    u->label, u->cap, u->idle_ms);
	u->cap = u->cap_seen = 0;
	u->idle_ms = u->idle_seen = 0;
}

/* ==== 10. What happens to a query ==== */

/*
 * The rules for a query once it is sent, in one place. Each event below
 * happens to a connection (or an upstream, or a query); the table says
 * what becomes of the upstream and of the queries on it. "Re-sent"
 * means q_retry: to a healthy upstream the query was not queued on yet,
 * else (after a close) the same one on a new connection; every re-send
 * is bounded by DOTP_MAX_TRIES and the query's deadline, past which the
 * client gets SERVFAIL. A try is used by every injection into a TLS
 * session, except that a re-send after a server recycled a connection
 * that answered others gives the try back (at most DOTP_MAX_RECYCLES
 * times per query).
 *
 *   event                         upstream        queries on it     try
 *   ----------------------------  --------------  ----------------  ----
 *   answer, same question         RTT sample (a   delivered; a      -
 *     (conn_answer)               first try only) hedge twin stray
 *   answer, other question        -               dropped, counted  -
 *                                                 (mismatched); the
 *                                                 query waits on
 *   clean close (FIN)  } after    learn count or  re-sent           back
 *   close_notify       } >= 1     idle time
 *   RST                } answer   (conn_learn)
 *   half frame, then the close    as its close    re-sent           back
 *   any of these, no answer yet   as above        re-sent           used
 *   frame < a DNS header          down            re-sent elsewhere used
 *   stall: owes answers, none     down            re-sent elsewhere used
 *     for an attempt timeout                      or, alone, same
 *     (2x with no other healthy)                  upstream anew
 *   attempt timeout of a query    -               hedged: also sent used
 *     (conn_timers)                               to the next healthy
 *                                                 untried upstream,
 *                                                 first answer wins;
 *                                                 nowhere: waits late
 *   connect, handshake, verify    down, back-off  re-sent elsewhere used
 *     failure or timeout, alert   (not down if    and its waiting
 *     (conn_fail)                 another conn    ones move too; no
 *                                 is ready: 1 s   upstream left:
 *                                 alone instead)  SERVFAIL
 *   no connection ready within    down            waiting ones move -
 *     an attempt timeout                          on (nothing sent)
 *     (up_tx_timer)
 *   deadline, --timeout (expire)  -               SERVFAIL          -
 *   dotp closes (idle, count      -               none in flight    -
 *     spent, exit)                                (exit: SERVFAIL)
 *
 * Owns the moves of a query between upstreams. Calls the policy and the
 * query table. Called by the connections (conn_end, conn_fail,
 * conn_timers) and the loop (up_tx_timer through up_kick).
 */

/*
 * Query i (Q_LOOSE) lost its send. failed: the upstream that failed, or
 * -1 after a close by the server. It goes to a healthy upstream it was
 * not queued on yet: a server that closes busy connections is shedding
 * load, and one that keeps failing must not eat every try. After a close
 * with no such upstream it goes back to the same one, on a new
 * connection; after a failure only a stall (a silent connection, not a
 * refusal) may do so. Tries and the deadline bound it all; past them, or
 * with nowhere to go, the client gets SERVFAIL.
 */
static void
q_retry(int i, int failed, int stall, int64_t now)
{
	struct query *q = &G.q[i];
	int	 ui;

	if (q->tries >= DOTP_MAX_TRIES || now >= q->deadline) {
		q_servfail(i, now, now >= q->deadline ? CTR_SERVFAIL_DEADLINE :
		    CTR_SERVFAIL_TRIES);
		return;
	}
	if (failed < 0) {
		if ((ui = up_pick(q->zone, q->tried, 0)) < 0)
			ui = q->up;
	} else if ((ui = up_pick(q->zone, q->tried | 1u << failed, 1)) < 0 &&
	    stall) {
		ui = failed;
	}
	if (ui < 0) {
		q_servfail(i, now, CTR_SERVFAIL_TRIES);
		return;
	}
	up_enqueue(ui, i, now);
}

/*
 * Ends connection c. failed: what failed (see the section comment), or
 * NULL for a close; fields: log fields of the failure. Every query on
 * it is sent again or answered (q_retry); after a failure the queries
 * waiting on its upstream move on too, since it is now down. When the
 * server ended a connection that answered (it recycles connections),
 * the queries it left unanswered are re-sent without using a try, up
 * to DOTP_MAX_RECYCLES times each: the guard against a server that
 * answers nothing is that a connection which answered nothing still
 * costs its queries a try.
 */
static void
conn_end(struct conn *c, const char *failed, const char *fields,
    int64_t now)
{
	struct upstream *u = &G.up[c->up];
	struct qlist moved = QLIST_ZERO;
	struct qlist *from[3] = { &c->fl, &c->late, &u->tx };
	char	 f[DOTP_MAX_PINS * 53 + 120];	/* conn=, gen=, pin_fields */
	int	 i, k, stall = failed && c->state == C_READY, recycled;

	if (failed && c->state != C_READY && up_has_ready(c->up)) {
		/* An extra connection failed while another one serves (a
		 * server limiting connections per client): the upstream is
		 * not down, but no more open beside the ready ones for a
		 * while. Nothing was sent on this one. */
		log_msg(u->alone_until ? LVL_DEBUG : LVL_WARN, "extra "
		    "connection to the upstream failed: %s; using the open "
		    "ones\t" CONN_FMT "%s%s", failed, CONN_ARGS(c),
		    *fields ? " " : "", fields);
		u->alone_until = now + DOTP_BACKOFF_MIN_MS;
		failed = NULL;
	}
	recycled = !failed && !c->closing && c->state == C_READY &&
	    c->answered > 0;
	if (!failed && !c->closing && c->state == C_READY)
		conn_learn(c, now);
	fd_close(&c->fd);
	c->state = C_FREE;
	c->rx_have = c->net_off = c->net_len = c->out_off = c->out_len = 0;
	c->owe_since = 0;
	c->readable = c->ack_owed = c->closing = 0;
	c->sent = c->answered = 0;
	if (failed) {
		snprintf(f, sizeof f, "conn=%d gen=%u%s%s", conn_slot(c),
		    c->gen, *fields ? " " : "", fields);
		up_down(u, now, c->fail_kind, failed, f);
	}
	for (k = 0; k < (failed ? 3 : 2); k++)
		while ((i = from[k]->head) >= 0) {
			q_unlink(i);
			qlist_push(&moved, i, QL_MAIN);
		}
	while ((i = moved.head) >= 0) {
		struct query *q = &G.q[i];

		qlist_remove(&moved, i, QL_MAIN);
		if (recycled && q->recycles < DOTP_MAX_RECYCLES &&
		    q->tries > 0) {
			q->tries--;
			q->recycles++;
			u->ctr[UCTR_RECYCLED]++;
		}
		q_retry(i, failed ? c->up : -1, stall, now);
	}
}

/* Fails c for a reason of kind kind: why is formatted, fields are the
 * failure's log fields. */
static void
conn_fail(struct conn *c, int64_t now, enum fail_kind kind,
    const char *fields, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void
conn_fail(struct conn *c, int64_t now, enum fail_kind kind,
    const char *fields, const char *fmt, ...)
{
	char	 why[200];
	va_list	 ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	c->fail_kind = (uint8_t)kind;
	conn_end(c, why, fields, now);
}

/*
 * The timers of a ready connection with queries in flight:
 *   - it owes answers and sent none for an attempt timeout (twice that
 *     when no other upstream is healthy): dead; it fails, and its
 *     queries go elsewhere (or to a new connection, see q_retry);
 *   - the oldest query passed its attempt timeout: it is sent to the
 *     next untried healthy upstream too (a hedge; either answer wins),
 *     or, with nowhere to go, waits on the late list.
 */
static void
conn_timers(struct conn *c, int64_t now)
{
	struct upstream *u = &G.up[c->up];
	int	 at = up_attempt_ms(u), i, ui;

	if (conn_inflight(c) > 0 && now - c->owe_since >=
	    (int64_t)at * (up_other_healthy(c->up) ? 1 : 2)) {
		conn_fail(c, now, FAIL_SILENT, "", "answered nothing for %lld ms with %u "
		    "queries waiting", (long long)(now - c->owe_since),
		    conn_inflight(c));
		return;
	}
	while ((i = c->fl.head) >= 0 && now - G.q[i].sent_at >= at) {
		struct query *q = &G.q[i];

		ui = q->tries < DOTP_MAX_TRIES ? up_pick(q->zone, q->tried, 0) :
		    -1;
		if (ui < 0) {	/* nowhere else: it waits on, still owed */
			qlist_remove(&c->fl, i, QL_MAIN);
			q->state = Q_LATE;
			qlist_push(&c->late, i, QL_MAIN);
			continue;
		}
		q_unlink(i);
		log_msg(LVL_DEBUG, "upstream slow, query also sent to %s\t"
		    CONN_FMT, G.up[ui].label, CONN_ARGS(c));
		q->pconn = q->conn;
		q->pgen = q->gen;
		up_enqueue(ui, i, now);
	}
}

/*
 * Queries that waited an attempt timeout on ui without any connection
 * of it being ready (a slow connect or handshake: nothing was sent, so
 * this is a move, not a duplicate) go to the next healthy upstream they
 * were not queued on, and ui is marked down, so that new queries do not
 * wait on it too; a handshake that completes later marks it up again.
 * Returns the time of the next such check, or INT64_MAX.
 */
static int64_t
up_tx_timer(int ui, int64_t now)
{
	struct upstream *u = &G.up[ui];
	int	 at = up_attempt_ms(u), i, to;

	if (u->tx.head < 0 || up_has_ready(ui))
		return INT64_MAX;
	while ((i = u->tx.head) >= 0 && now - G.q[i].sent_at >= at) {
		if ((to = up_pick(G.q[i].zone, G.q[i].tried, 0)) < 0)
			return INT64_MAX;	/* nowhere better: wait */
		if (!u->down)
			up_down(u, now, FAIL_SILENT, "no connection ready within the "
			    "attempt timeout", "");
		log_msg(LVL_DEBUG, "upstream not ready, query moved to %s\t"
		    "upstream=%s", G.up[to].label, u->label);
		q_unlink(i);
		up_enqueue(to, i, now);
	}
	return i >= 0 ? G.q[i].sent_at + at : INT64_MAX;
}

/* ==== 11. Plain DNS over UDP ==== */

/*
 * The UDP exchanges with plain DNS servers (--forward ZONE=dns://...,
 * RFC 5452): queries leave from a pool of sockets on random ports, each
 * with its random ID (dgram_send and dgram_flush, section 9); an answer
 * is taken only for a query in flight on the socket it came to, from
 * that query's server's address and port, with its ID and question;
 * anything else is dropped and counted (spoofed). A truncated answer
 * sends the query to the same server over TCP (a plain connection,
 * section 12).
 * No answer within the attempt timeout: the server is down for a
 * back-off, and the query goes again from a new port to the zone's next
 * server (q_retry), or to the same one when it has no other; with its
 * tries spent it waits for the last one until its deadline. A down
 * server is tried again by one query after its back-off (trial).
 * Owns closing the retired sockets (dgram_pollset). Calls the fate
 * rules, the policy and the query table.
 * Called by the loop (dgram_pollset, dgram_service) and up_kick
 * (dgram_timers).
 */

/* Did the datagram from sa (len bytes) come from u's address and port? */
static int
dgram_from(const struct upstream *u, const struct sockaddr_storage *sa,
    socklen_t len)
{
	const struct sockaddr_in *a4 = (const struct sockaddr_in *)sa;
	const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)sa;

	if (len != u->addrlen || sa->ss_family != u->addr.sa.sa_family)
		return 0;
	if (sa->ss_family == AF_INET)
		return a4->sin_port == u->addr.sin.sin_port &&
		    a4->sin_addr.s_addr == u->addr.sin.sin_addr.s_addr;
	return a6->sin6_port == u->addr.sin6.sin6_port &&
	    memcmp(&a6->sin6_addr, &u->addr.sin6.sin6_addr,
	    sizeof a6->sin6_addr) == 0;
}

/*
 * Datagram m (len bytes, from sa; cut: the kernel cut it to fit) came to
 * socket s. It is an answer only for a query in flight on s, from that
 * query's server's address and port, with its ID and its question (one
 * without a question is refused: it would take a guess less to spoof).
 * A truncated answer sends the query on over TCP with the same try.
 */
static void
dgram_answer(int s, unsigned char *m, size_t len,
    const struct sockaddr_storage *sa, socklen_t salen, int cut, int64_t now)
{
	int	 i = len >= DNS_HEADER_LEN ? q_find(rd16(m + DNS_OFF_ID)) : -1;
	struct query *q = &G.q[i < 0 ? 0 : i];
	struct upstream *u = &G.up[q->up];

	if (i < 0 || q->usock != s || !dgram_from(u, sa, salen) ||
	    rd16(m + DNS_OFF_QDCOUNT) != 1 ||
	    !dns_check_answer(m, len, q->qbuf, q->qend)) {
		G.ctr[CTR_SPOOFED]++;
		log_msg(LVL_DEBUG, "datagram dropped: not the answer to a "
		    "query in flight on its socket\tbytes=%zu", len);
		return;
	}
	if (q->state == Q_DGRAM && q->tries == 1)	/* Karn, as for TLS */
		up_rtt_sample(u, now - q->sent_at);
	hist_add(&u->rtt, now - q->sent_at);
	up_alive(u);
	u->ctr[UCTR_ANSWERED]++;
	q_unlink(i);
	if (cut || (rd16(m + DNS_OFF_FLAGS) & DNS_FLAG_TC)) {
		G.ctr[CTR_TRUNCATED_RETRIES]++;
		q->tcp = 1;
		q->tries--;	/* the same try, carried on over TCP */
		up_enqueue(q->up, i, now);
		return;
	}
	q_deliver(i, m, len, now);
}

/* Before poll(): every socket (a retired one that is owed nothing is
 * closed instead), and the attempt timeout of each server's oldest
 * datagram. */
static void
dgram_pollset(UNUSED int64_t now, int64_t *deadline)
{
	int	 s, ui;

	for (s = 0; s < DOTP_DGRAM_SOCKS; s++) {
		struct dsock *d = &G.dsock[s];

		if (d->fd < 0)
			continue;
		if (d->inflight == 0 && s != G.dcur[0] && s != G.dcur[1])
			fd_close(&d->fd);
		else
			loop_add(FK_DGRAM, s, d->fd, POLLIN);
	}
	for (ui = 0; ui < G.nup; ui++)
		if (G.up[ui].ul.head >= 0)
			dl_min(deadline, G.q[G.up[ui].ul.head].sent_at +
			    up_attempt_ms(&G.up[ui]));
}

/* After poll(), for socket s: up to DOTP_DGRAM_READS recvmmsg() calls,
 * each datagram to dgram_answer. */
static void
dgram_service(int s, int fd, UNUSED short revents, int64_t now)
{
	static unsigned char buf[DOTP_DGRAM_BATCH][DOTP_DGRAM_BUF];
	static struct sockaddr_storage sa[DOTP_DGRAM_BATCH];
	static struct mmsghdr mm[DOTP_DGRAM_BATCH];
	static struct iovec iov[DOTP_DGRAM_BATCH];
	int	 r, k, n = DOTP_DGRAM_BATCH;

	for (r = 0; r < DOTP_DGRAM_READS && n == DOTP_DGRAM_BATCH; r++) {
		if (G.dsock[s].fd != fd)
			return;		/* closed since the poll set */
		for (k = 0; k < DOTP_DGRAM_BATCH; k++) {
			iov[k].iov_base = buf[k];
			iov[k].iov_len = sizeof buf[k];
			memset(&mm[k], 0, sizeof mm[k]);
			mm[k].msg_hdr.msg_name = &sa[k];
			mm[k].msg_hdr.msg_namelen = sizeof sa[k];
			mm[k].msg_hdr.msg_iov = &iov[k];
			mm[k].msg_hdr.msg_iovlen = 1;
		}
		if ((n = recvmmsg(fd, mm, DOTP_DGRAM_BATCH, MSG_DONTWAIT,
		    NULL)) <= 0)
			return;
		for (k = 0; k < n; k++)
			dgram_answer(s, buf[k], mm[k].msg_len, &sa[k],
			    mm[k].msg_hdr.msg_namelen,
			    (mm[k].msg_hdr.msg_flags & MSG_TRUNC) != 0, now);
	}
}

/*
 * Once per loop pass, for plain server ui: its back-off over, a down
 * one goes on trial; exchanges past the attempt timeout go again
 * elsewhere, or wait on once their tries are spent. The first to time
 * out marks the server down, and so does one sent to it since (a trial:
 * the back-off doubles); the others sent before say nothing new.
 */
static void
dgram_timers(int ui, int64_t now)
{
	struct upstream *u = &G.up[ui];
	int	 at = up_attempt_ms(u), i;

	if (u->down && !u->trial && now >= u->retry_at)
		u->trial = 1;
	while ((i = u->ul.head) >= 0 && now - G.q[i].sent_at >= at) {
		struct query *q = &G.q[i];

		if (!u->down || q->sent_at >= u->failed_at)
			up_down(u, now, FAIL_SILENT, "no answer over UDP within the "
			    "attempt timeout", "");
		if (q->tries >= DOTP_MAX_TRIES) {
			qlist_remove(&u->ul, i, QL_MAIN);
			q->state = Q_DGRAM_LATE;
			qlist_push(&u->ulate, i, QL_MAIN);
			continue;
		}
		q_unlink(i);
		q_retry(i, ui, 1, now);
	}
}

/* ==== 12. Upstream connections ==== */

/*
 * The state machine of struct conn (see its comment), driven from the
 * poll() loop: open and attach, the handshake, the pump (a list of small
 * steps, STYLE.md 1.3), answers, ends, and the timers of one formula
 * (conn_due) for polling and for acting. Nothing here blocks. New work
 * is only queued; connections are opened and fed in up_kick(), once per
 * loop pass, so failure paths never recurse into connects. Owns struct
 * conn. Calls TLS, the fate rules and the query table. Called by the
 * loop (conn_pollset, conn_service, up_kick) and shutdown.
 */

/*
 * TLS: an engine reset with fresh entropy that offers the upstream's
 * last session, so that the ClientHello waits in SENDREC. Returns 0, or
 * -1 when c failed (conn_fail: its fd is closed).
 */
static int
tls_attach(struct conn *c, int64_t now)
{
	struct upstream *u = &G.up[c->up];
	unsigned char seed[32];

	c->sid_len = 0;
	if (fill_random(seed, sizeof seed) < 0) {
		conn_fail(c, now, FAIL_TLS, "", "getrandom failed: %s", strerror(errno));
		return -1;
	}
	br_ssl_engine_inject_entropy(&c->cc.eng, seed, sizeof seed);
	if (u->have_sess) {
		br_ssl_engine_set_session_parameters(&c->cc.eng, &u->sess);
		c->sid_len = u->sess.session_id_len;
		memcpy(c->sid, u->sess.session_id, c->sid_len);
	}
	if (!br_ssl_client_reset(&c->cc, u->name, u->have_sess)) {
		conn_fail(c, now, FAIL_TLS, "", "TLS reset failed (error %d)",
		    br_ssl_engine_last_error(&c->cc.eng));
		return -1;
	}
	return 0;
}

/* Plain DNS: nothing to prepare. */
static int
plain_attach(UNUSED struct conn *c, UNUSED int64_t now)
{
	return 0;
}

/* The handshake of c completed: record the session, tell resumed from
 * full (the server echoed the session ID we offered), mark u healthy. */
static void
conn_ready(struct conn *c, int64_t now)
{
	struct upstream *u = &G.up[c->up];
	int	 resumed;

	c->state = C_READY;
	c->last_active = now;
	br_ssl_engine_get_session_parameters(&c->cc.eng, &u->sess);
	resumed = c->sid_len > 0 && u->sess.session_id_len == c->sid_len &&
	    memcmp(u->sess.session_id, c->sid, c->sid_len) == 0;
	u->have_sess = u->sess.session_id_len > 0;
	if (resumed)
		u->ctr[UCTR_HANDSHAKES_RESUMED]++;
	else
		u->ctr[UCTR_HANDSHAKES_FULL]++;
	log_msg(LVL_DEBUG, "upstream ready\t" CONN_FMT " suite=0x%04x "
	    "handshake=%s", CONN_ARGS(c), u->sess.cipher_suite,
	    resumed ? "resumed" : "full");
	up_alive(u);
}

/* Dispatches one answer frame (msg, len) that arrived on c. An answer
 * is taken only for a query in flight on this session with the same
 * question (RFC 7858 3.3); others are counted and dropped. */
static void
conn_answer(struct conn *c, unsigned char *msg, size_t len, int64_t now)
{
	int	 ci = (int)(c - G.conn), i = q_find(rd16(msg + DNS_OFF_ID));
	int	 cur, prev;
	struct query *q;

	if (i < 0) {
		G.ctr[CTR_STRAY]++;
		log_msg(LVL_DEBUG, "answer for an unknown ID dropped\t"
		    CONN_FMT, CONN_ARGS(c));
		return;
	}
	q = &G.q[i];
	cur = (q->state == Q_SENT || q->state == Q_LATE) && q->conn == ci &&
	    q->gen == c->gen;
	prev = q->pconn == ci && q->pgen == c->gen;
	if (!cur && !prev) {
		G.ctr[CTR_STRAY]++;
		log_msg(LVL_DEBUG, "answer for an ID not in flight on this "
		    "connection dropped\t" CONN_FMT, CONN_ARGS(c));
		return;
	}
	if (!dns_check_answer(msg, len, q->qbuf, q->qend)) {
		G.ctr[CTR_MISMATCHED]++;
		log_msg(LVL_DEBUG, "answer to another question dropped\t"
		    CONN_FMT " id=%u", CONN_ARGS(c), q->up_id);
		return;
	}
	if (cur && q->tries == 1)	/* Karn: only unambiguous samples */
		up_rtt_sample(&G.up[c->up], now - q->sent_at);
	if (cur)
		hist_add(&G.up[c->up].rtt, now - q->sent_at);
	if (G.up[c->up].plain)	/* TLS: the handshake told (conn_ready) */
		up_alive(&G.up[c->up]);
	G.up[c->up].ctr[UCTR_ANSWERED]++;
	c->answered++;
	c->last_answer = now;
	q_unlink(i);
	c->owe_since = conn_inflight(c) > 0 ? now : 0;
	c->last_active = now;
	q_deliver(i, msg, len, now);
}

/* The next query waiting on c's upstream, if c has room for it under
 * --conn-queries and the learned count; else -1. */
static int
conn_next(const struct conn *c)
{
	if (conn_inflight(c) >= (unsigned)G.cfg.conn_queries ||
	    !conn_has_cap(c))
		return -1;
	return G.up[c->up].tx.head;
}

/* Query i went on the wire of c (its frame is committed to the
 * session): Q_SENT on c's fl, a try used. */
static void
conn_sent(struct conn *c, int i, int64_t now)
{
	struct upstream *u = &G.up[c->up];
	struct query *q = &G.q[i];

	q_unlink(i);
	q->state = Q_SENT;
	q->conn = (int)(c - G.conn);
	q->gen = c->gen;
	q->sent_at = now;
	q->tries++;
	qlist_push(&c->fl, i, QL_MAIN);
	if (c->owe_since == 0)
		c->owe_since = now;
	c->sent++;
	c->last_active = now;
	u->ctr[UCTR_SENT]++;
}

/* TLS: injects the next query into SENDAPP and seals it as a record of
 * its own. Returns 1 if it injected one. */
static int
tls_inject(struct conn *c, int64_t now)
{
	br_ssl_engine_context *eng = &c->cc.eng;
	struct query *q;
	unsigned char *buf;
	size_t	 avail, need;
	int	 i = conn_next(c);

	if (i < 0)
		return 0;
	q = &G.q[i];
	need = 2 + (size_t)q->qlen;
	buf = br_ssl_engine_sendapp_buf(eng, &avail);
	if (buf == NULL || need > avail)
		return 0;	/* can't happen: a record holds any query */
	wr16(buf, q->qlen);
	memcpy(buf + 2, q->qbuf, q->qlen);
	br_ssl_engine_sendapp_ack(eng, need);
	br_ssl_engine_flush(eng, 0);
	conn_sent(c, i, now);	/* committed to this session */
	return 1;
}

/* Room for len more bytes at the end of c's out[], moving what is
 * unsent to the front when that makes room. Returns the room. */
static size_t
conn_out_room(struct conn *c, size_t len)
{
	if (c->out_off > 0 && sizeof c->out - c->out_len < len) {
		memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
		c->out_len -= c->out_off;
		c->out_off = 0;
	}
	return sizeof c->out - c->out_len;
}

/* Plain DNS: puts the next query's frame in out[]. Returns 1 if it put
 * one. */
static int
plain_inject(struct conn *c, int64_t now)
{
	struct query *q;
	int	 i = conn_next(c);

	if (i < 0)
		return 0;
	q = &G.q[i];
	if (conn_out_room(c, 2 + (size_t)q->qlen) < 2 + (size_t)q->qlen)
		return 0;	/* out[] is full: the socket is */
	wr16(c->out + c->out_len, q->qlen);
	memcpy(c->out + c->out_len + 2, q->qbuf, q->qlen);
	c->out_len += 2 + (size_t)q->qlen;
	conn_sent(c, i, now);
	return 1;
}

/* Copies up to len bytes of the stream (buf) into c's frame assembler.
 * Returns how many it took: 0 only when len is. */
static size_t
conn_rx_take(struct conn *c, const unsigned char *buf, size_t len)
{
	size_t	 room = sizeof c->rx - c->rx_have;

	if (len > room)
		len = room;	/* room > 0: a frame always fits */
	memcpy(c->rx + c->rx_have, buf, len);
	c->rx_have += len;
	return len;
}

/* Dispatches every complete frame in c's assembler. Returns 1, or -1
 * when a bad frame ended c. */
static int
conn_frames(struct conn *c, int64_t now)
{
	size_t	 off = 0;
	long	 fl;

	while ((fl = frame_complete(c->rx + off, c->rx_have - off,
	    DNS_HEADER_LEN, DNS_MSG_MAX)) > 0) {
		conn_answer(c, c->rx + off + 2, (size_t)fl - 2, now);
		off += (size_t)fl;
	}
	if (fl < 0) {
		conn_fail(c, now, FAIL_PROTOCOL, "", "server sent a frame shorter than a DNS "
		    "header");
		return -1;
	}
	if (off > 0) {
		memmove(c->rx, c->rx + off, c->rx_have - off);
		c->rx_have -= off;
	}
	return 1;
}

/* TLS pump step: the decrypted bytes into the frame assembler, and the
 * frames out. Returns 1 on progress, -1 when a bad frame ended c. */
static int
tls_take_answers(struct conn *c, int64_t now)
{
	br_ssl_engine_context *eng = &c->cc.eng;
	unsigned char *buf;
	size_t	 len;

	buf = br_ssl_engine_recvapp_buf(eng, &len);
	if ((len = conn_rx_take(c, buf, len)) == 0)
		return 0;
	br_ssl_engine_recvapp_ack(eng, len);
	return conn_frames(c, now);
}

/* Plain pump step: the bytes read ahead into the frame assembler, and
 * the frames out. Returns 1 on progress, -1 when a bad frame ended c. */
static int
plain_take_answers(struct conn *c, int64_t now)
{
	c->net_off += conn_rx_take(c, c->net + c->net_off,
	    c->net_len - c->net_off);
	return conn_frames(c, now);
}

/*
 * Delayed ACKs against the server's Nagle. A server that writes small
 * answers without TCP_NODELAY (unbound's DoT does) holds its next answer
 * while its last small segment is unacknowledged; the kernel delays our
 * ACK (up to 40 ms on Linux) hoping to put it on data, and when dotp has
 * no query to send, the answer stalls that long. Any record dotp sends
 * carries the ACK, and the hold is what lets the server coalesce answers
 * into few segments under load; so dotp forces an ACK only when it owes
 * one and no query is coming to carry it (conn_acks decides when).
 * TCP_QUICKACK 2 sends a pending ACK now and goes back to delayed-ACK
 * mode (1 would stay out of it, and every later read would cost an ACK
 * packet). Linux goes back only when an ACK was pending; if the kernel
 * already sent it, 2 acts as 1 until dotp next sends a record.
 */
static void
conn_ack(struct conn *c)
{
#ifdef TCP_QUICKACK
	int	 two = 2;

	(void)setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &two, sizeof two);
#endif
	c->ack_owed = 0;
}

/*
 * Sends the forced ACKs that are due (conn_ack). A connection that owes
 * no answers needs none: the server holds nothing. One that owes a few
 * (interactive use: an A and AAAA pair) ACKs when dotp is about to sleep
 * (sleeping = 1); one that owes many (pipelined load, where queries keep
 * coming) waits up to DOTP_ACK_DELAY_MS for a query to carry it. *few
 * tells whether one owing a few is still waiting (for sleeping = 1).
 * Returns when the next one is due, or INT64_MAX.
 */
static int64_t
conn_acks(int64_t now, int sleeping, int *few)
{
	int64_t	 next = INT64_MAX;
	int	 i;

	*few = 0;
	for (i = 0; i < G.nconn; i++) {
		struct conn *c = &G.conn[i];
		unsigned n;

		if (!c->ack_owed)
			continue;
		n = c->state == C_READY ? conn_inflight(c) : 0;
		if (n == 0)
			c->ack_owed = 0;
		else if (now >= c->ack_at || (sleeping && n <= DOTP_ACK_FEW))
			conn_ack(c);
		else {
			if (n <= DOTP_ACK_FEW)
				*few = 1;
			if (c->ack_at < next)
				next = c->ack_at;
		}
	}
	return next;
}

/* The engine reported CLOSED: a clean close (close_notify) once ready,
 * or a failure, in the user's words with the code as fields. */
static void
conn_closed(struct conn *c, int64_t now)
{
	char	 buf[80], f[DOTP_MAX_PINS * 53 + 80];
	int	 err = br_ssl_engine_last_error(&c->cc.eng);

	if (err == BR_ERR_OK && c->state == C_READY) {
		log_msg(LVL_DEBUG, "upstream closed the connection "
		    "(close_notify)\t" CONN_FMT " answered=%u", CONN_ARGS(c),
		    c->answered);
		conn_end(c, NULL, "", now);
		return;
	}
	if (err == BR_ERR_OK)
		err = BR_ERR_RECV_FATAL_ALERT;	/* close_notify: alert 0 */
	G.up[c->up].have_sess = 0;	/* don't offer a session that failed */
	if (err == DOTP_ERR_PIN)
		pin_fields(c, f, sizeof f);
	else
		tls_fields(err, f, sizeof f);
	conn_fail(c, now, FAIL_TLS, f, "%s%s", c->state == C_READY ? "" :
	    "handshake failed: ", tls_strerror(err, buf, sizeof buf));
}

/* The socket ended (EOF, or error e) or a send failed: a recycle once
 * ready; a failure during the handshake, where a server that wants
 * what dotp does not offer (TLS 1.3, a client certificate) just closes. */
static void
conn_lost(struct conn *c, int e, const char *what, int64_t now)
{
	char	 f[80];

	if (c->state == C_READY) {
		log_msg(LVL_DEBUG, "upstream %s\t" CONN_FMT " answered=%u "
		    "error=\"%s\"", what, CONN_ARGS(c), c->answered,
		    e ? strerror(e) : "EOF");
		conn_end(c, NULL, "", now);
		return;
	}
	snprintf(f, sizeof f, "error=\"%s\"", e ? strerror(e) : "EOF");
	G.up[c->up].have_sess = 0;	/* don't offer a session that failed */
	if (e != 0 && e != ECONNRESET) {
		conn_fail(c, now, FAIL_TLS, f, "connection failed during the handshake");
		return;
	}
	conn_fail(c, now, FAIL_TLS, f, "server %s during the handshake: it may "
	    "require TLS 1.3 or a client certificate", e ? "reset the connection" :
	    "closed");
}

/* Pump step: moves sealed record bytes from SENDREC into out[], where
 * the records of a pass gather for one send(). Returns 1 if it moved
 * any. */
static int
conn_take_records(struct conn *c)
{
	unsigned char *buf;
	size_t	 len, room;

	buf = br_ssl_engine_sendrec_buf(&c->cc.eng, &len);
	if (buf == NULL)
		return 0;
	if ((room = conn_out_room(c, len)) == 0)
		return 0;
	if (len > room)
		len = room;
	memcpy(c->out + c->out_len, buf, len);
	c->out_len += len;
	br_ssl_engine_sendrec_ack(&c->cc.eng, len);
	return 1;
}

/* Writes out[] with one send(). Returns 1 on progress, 0 when there is
 * nothing to send or the socket is full, -1 on an error (errno). */
static int
conn_write(struct conn *c)
{
	ssize_t	 n;

	if (c->out_off == c->out_len)
		return 0;
	n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
	    MSG_NOSIGNAL);
	if (n > 0) {
		c->out_off += (size_t)n;
		if (c->out_off == c->out_len)
			c->out_off = c->out_len = 0;
		c->ack_owed = 0;	/* this segment ACKs */
		return 1;
	}
	if (n < 0 && errno == EINTR)
		return 1;
	if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
		return -1;
	return 0;
}

/* Pump step: sends out[]. Returns 1 on progress, 0 when there is
 * nothing to send or the socket is full, -1 when a failed send ended c. */
static int
conn_send(struct conn *c, int64_t now)
{
	int	 r = conn_write(c);

	if (r < 0)
		conn_lost(c, errno, "send failed", now);
	return r;
}

/* Refills c's empty read-ahead buffer with one recv() of all there is
 * (up to DOTP_NET_BUF). Returns 1 on progress, 0 when the socket is
 * empty, -1 when EOF or an error ended c (conn_lost). */
static int
conn_recv(struct conn *c, int64_t now)
{
	ssize_t	 n;

	if (!c->readable)
		return 0;	/* poll() tells when there is more */
	n = recv(c->fd, c->net, sizeof c->net, 0);
	if (n > 0) {
		c->net_off = 0;
		c->net_len = (size_t)n;
		/* A short read emptied the socket: don't ask again just to
		 * hear EAGAIN. */
		c->readable = (size_t)n == sizeof c->net;
		if (!c->ack_owed)
			c->ack_at = now + DOTP_ACK_DELAY_MS;
		c->ack_owed = 1;
		return 1;
	}
	if (n < 0 && errno == EINTR)
		return 1;
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
		c->readable = 0;
		return 0;
	}
	conn_lost(c, n == 0 ? 0 : errno, "ended the connection", now);
	return -1;
}

/* TLS pump step: feeds RECVREC from the read-ahead buffer, refilled by
 * one recv() of many records when empty. Returns as conn_recv. */
static int
tls_feed(struct conn *c, int64_t now)
{
	unsigned char *buf;
	size_t	 len;

	if (c->net_off == c->net_len)
		return conn_recv(c, now);
	buf = br_ssl_engine_recvrec_buf(&c->cc.eng, &len);
	if (len > c->net_len - c->net_off)
		len = c->net_len - c->net_off;
	memcpy(buf, c->net + c->net_off, len);
	c->net_off += len;
	br_ssl_engine_recvrec_ack(&c->cc.eng, len);
	return 1;
}

/*
 * One step of the TLS pump: the first of these that makes progress, in
 * BearSSL's order (STYLE.md 1.3), with the engine state read afresh:
 *   end of stream   CLOSED: a last send, then conn_closed (ends c);
 *   send records    SENDREC: sealed records into out[];
 *   take answers    RECVAPP: plaintext into rx[], frames dispatched;
 *   feed the engine RECVREC: from the read-ahead buffer, or one recv();
 *   inject a query  SENDAPP (ready): one query, one record;
 *   send            out[] to the socket, one send() for the pass.
 * Returns 1 on progress, 0 when nothing moved (the socket would
 * block), -1 when c ended (each step ends it where the error arises).
 */
static int
tls_step(struct conn *c, int64_t now)
{
	unsigned st = br_ssl_engine_current_state(&c->cc.eng);
	int	 r;

	if (st & BR_SSL_CLOSED) {
		(void)conn_write(c);	/* a last close_notify */
		conn_closed(c, now);
		return -1;
	}
	if (c->state == C_HANDSHAKE && (st & BR_SSL_SENDAPP))
		conn_ready(c, now);
	if ((st & BR_SSL_SENDREC) && conn_take_records(c))
		return 1;
	if ((st & BR_SSL_RECVAPP) && (r = tls_take_answers(c, now)) != 0)
		return r;
	if ((st & BR_SSL_RECVREC) && (r = tls_feed(c, now)) != 0)
		return r;
	if ((st & BR_SSL_SENDAPP) && c->state == C_READY &&
	    tls_inject(c, now))
		return 1;
	return conn_send(c, now);
}

/*
 * One step of a plain DNS connection (RFC 7766), in the same order
 * without the engine: take answers from the bytes read ahead; read; put
 * the next query in out[]; send. Returns as tls_step.
 */
static int
plain_step(struct conn *c, int64_t now)
{
	int	 r;

	if (c->net_off < c->net_len)
		return plain_take_answers(c, now);
	if ((r = conn_recv(c, now)) != 0)
		return r;
	if (plain_inject(c, now))
		return 1;
	return conn_send(c, now);
}

/* TLS: the poll interest of open connection c: what the engine wants
 * (STYLE.md 1.4), and POLLOUT while sealed records wait in out[]. */
static short
tls_events(const struct conn *c)
{
	unsigned st = br_ssl_engine_current_state(&c->cc.eng);
	short	 ev = 0;

	if ((st & BR_SSL_SENDREC) || c->out_off < c->out_len)
		ev |= POLLOUT;
	if (st & BR_SSL_RECVREC)
		ev |= POLLIN;
	return ev;
}

/* Plain DNS: always reading (answers, or the server's close), and
 * POLLOUT while frames wait in out[]. */
static short
plain_events(const struct conn *c)
{
	return (short)(POLLIN | (c->out_off < c->out_len ? POLLOUT : 0));
}

/* TLS: connected, on to the handshake. */
static void
tls_connected(struct conn *c, int64_t now)
{
	c->state = C_HANDSHAKE;
	c->deadline = now + G.cfg.handshake_ms;
}

/* Plain DNS: connected is ready. The server's health is told by its
 * answers (conn_answer), not by a connect. */
static void
plain_connected(struct conn *c, int64_t now)
{
	c->state = C_READY;
	c->last_active = now;
	log_msg(LVL_DEBUG, "upstream ready (plain DNS over TCP)\t" CONN_FMT,
	    CONN_ARGS(c));
}

/*
 * The ways a connection carries DNS frames, by upstream kind (index:
 * struct upstream's plain): through the TLS engine (RFC 7858), or
 * straight over TCP to a plain DNS server (RFC 7766). Each row: what
 * to prepare when a socket is attached, what connected means, one pump
 * step, and the poll interest once connected.
 */
static const struct conn_way {
	int	(*attach)(struct conn *, int64_t);
	void	(*connected)(struct conn *, int64_t);
	int	(*step)(struct conn *, int64_t);
	short	(*events)(const struct conn *);
} conn_ways[2] = {
	{ tls_attach, tls_connected, tls_step, tls_events },
	{ plain_attach, plain_connected, plain_step, plain_events },
};

/* The row of conn_ways for c. */
static const struct conn_way *
conn_way(const struct conn *c)
{
	return &conn_ways[G.up[c->up].plain ? 1 : 0];
}

/*
 * Attaches descriptor fd, a stream socket being connected (or already
 * connected) to upstream ui, to free connection c: a new generation,
 * the connect limit, and what its way prepares (TLS: the ClientHello).
 * Returns 0, or -1 when c failed (conn_fail: fd is closed).
 */
static int
conn_attach(struct conn *c, int ui, int fd, int64_t now)
{
	c->up = ui;
	c->fd = fd;
	c->gen++;
	c->state = C_CONNECTING;
	c->deadline = now + G.cfg.connect_ms;
	c->last_active = now;
	set_nodelay(fd);
	return conn_way(c)->attach(c, now);
}

/*
 * Opens connection c to upstream ui: a non-blocking socket, attached
 * (conn_attach), then connect(). Returns 0 (c may have failed at once:
 * it is free again and ui is down), or -1 if no socket could be had
 * (EMFILE: not the upstream's fault; the next try waits
 * DOTP_FD_WAIT_MS).
 */
static int
conn_open(int ui, struct conn *c, int64_t now)
{
	struct upstream *u = &G.up[ui];
	int	 fd;

	fd = socket(u->addr.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, 0);
	if (fd < 0) {
		if (!G.connect_burst)
			log_errno(LVL_WARN, "no socket for the upstream; "
			    "retrying every %d ms\tupstream=%s",
			    DOTP_FD_WAIT_MS, u->label);
		G.connect_burst = 1;
		G.fd_wait_until = now + DOTP_FD_WAIT_MS;
		return -1;
	}
	G.connect_burst = 0;
	if (conn_attach(c, ui, fd, now) < 0)
		return 0;
	if (connect(fd, &u->addr.sa, u->addrlen) < 0 &&
	    errno != EINPROGRESS) {
		conn_fail(c, now, FAIL_CONNECT, "", "connect failed: %s", strerror(errno));
		return 0;
	}
	log_msg(LVL_DEBUG, "upstream connecting%s\t" CONN_FMT,
	    conn_inflight(c) || u->tx.n ? "" : " (probe)", CONN_ARGS(c));
	return 0;
}

/* Runs c until a step makes no progress or c ends. */
static void
conn_pump(struct conn *c, int64_t now)
{
	const struct conn_way *w = conn_way(c);

	while (c->fd >= 0 && c->state != C_CONNECTING && w->step(c, now) > 0)
		;
}

/*
 * The one formula for connection c's next deadline: conn_pollset sleeps
 * until it, conn_kick acts when it has passed. *what says which:
 *   CT_OPEN    connecting or in the handshake: its limit;
 *   CT_FORGET  ready, nothing in flight, its learned count spent: when
 *              the count is forgotten (DOTP_CAP_FORGET_MS), if sooner
 *              than the idle close;
 *   CT_IDLE    ready, nothing in flight: the idle close (up_idle_ms);
 *   CT_FLIGHT  queries in flight: the stall limit (owes answers and got
 *              none for an attempt timeout, twice that when no other
 *              upstream is healthy), or sooner the attempt timeout of
 *              the oldest query (a hedge); conn_timers tells which.
 * Returns INT64_MAX for a free connection.
 */
static int64_t
conn_due(const struct conn *c, enum conn_timer *what)
{
	const struct upstream *u = &G.up[c->up];
	int64_t	 t, h;
	int	 at;

	*what = CT_NONE;
	if (c->state == C_FREE)
		return INT64_MAX;
	if (c->state != C_READY) {
		*what = CT_OPEN;
		return c->deadline;
	}
	if (conn_inflight(c) == 0) {
		*what = CT_IDLE;
		t = c->last_active + up_idle_ms(u);
		if (!conn_has_cap(c) && c->last_active + DOTP_CAP_FORGET_MS <= t) {
			*what = CT_FORGET;
			t = c->last_active + DOTP_CAP_FORGET_MS;
		}
		return t;
	}
	*what = CT_FLIGHT;
	at = up_attempt_ms(u);
	t = c->owe_since + (int64_t)at * (up_other_healthy(c->up) ? 1 : 2);
	if (c->fl.head >= 0 && (h = G.q[c->fl.head].sent_at + at) < t)
		t = h;
	return t;
}

/* The poll interest of open connection c: POLLOUT while connecting,
 * then its way's. */
static short
conn_events(const struct conn *c)
{
	return c->state == C_CONNECTING ? POLLOUT : conn_way(c)->events(c);
}

/* Before poll(): every open connection, with its deadline. */
static void
conn_pollset(UNUSED int64_t now, int64_t *deadline)
{
	enum conn_timer what;
	int	 i;

	for (i = 0; i < G.nconn; i++) {
		const struct conn *c = &G.conn[i];

		if (c->fd < 0)
			continue;
		loop_add(FK_CONN, i, c->fd, conn_events(c));
		dl_min(deadline, conn_due(c, &what));
	}
}

/* The connect of c finished (POLLOUT): on to the handshake (plain DNS:
 * ready), or fail it. Returns 0, or -1 when c failed. */
static int
conn_connected(struct conn *c, int64_t now)
{
	int	 err = 0;
	socklen_t sl = sizeof err;

	if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
		err = errno;
	if (err != 0) {
		conn_fail(c, now, FAIL_CONNECT, "", "connect failed: %s%s", strerror(err),
		    err == ECONNREFUSED ? " (nothing listens there: wrong "
		    "address or port?)" : "");
		return -1;
	}
	conn_way(c)->connected(c, now);
	return 0;
}

/* After poll(), for connection ci's descriptor fd. */
static void
conn_service(int ci, int fd, short revents, int64_t now)
{
	struct conn *c = &G.conn[ci];

	if (c->fd != fd)
		return;		/* ended since the poll set was built */
	if (revents & (POLLERR | POLLHUP))
		revents |= POLLIN | POLLOUT;	/* let recv/send tell */
	if (revents & POLLIN)
		c->readable = 1;
	if (c->state == C_CONNECTING &&
	    (!(revents & POLLOUT) || conn_connected(c, now) < 0))
		return;
	conn_pump(c, now);
}

/* Closes ready connection c on dotp's side (TLS: close_notify). */
static void
conn_close(struct conn *c, const char *why, int64_t now)
{
	log_msg(LVL_DEBUG, "closing upstream connection: %s\t" CONN_FMT
	    " sent=%u answered=%u", why, CONN_ARGS(c), c->sent, c->answered);
	c->closing = 1;
	if (!G.up[c->up].plain)
		br_ssl_engine_close(&c->cc.eng);
	conn_pump(c, now);
	if (c->fd >= 0)
		conn_end(c, NULL, "", now);
}

/* A spent learned count stayed open past DOTP_CAP_FORGET_MS: the server
 * was not closing at that count, so it is forgotten. */
static void
conn_forget_cap(struct conn *c)
{
	struct upstream *u = &G.up[c->up];

	log_msg(LVL_INFO, "upstream kept a connection open past %u queries; "
	    "that count is forgotten\t" CONN_FMT " learned_conn_queries=0",
	    u->cap, CONN_ARGS(c));
	u->cap = 0;
}

/*
 * Once per loop pass, for a connection that is not free: a ready one
 * that used up its upstream's learned count and owes nothing is closed
 * when queries wait for its slot; then whatever conn_due says has come
 * is done (fail an open that took too long, forget a count, close when
 * idle, stall and hedge timers); then it is fed. Returns the queries it
 * can still take (0 when it is gone).
 */
static unsigned
conn_kick(struct conn *c, int64_t now)
{
	struct upstream *u = &G.up[c->up];
	enum conn_timer what;

	if (c->state == C_READY && conn_inflight(c) == 0 &&
	    !conn_has_cap(c) && u->tx.n > 0) {
		conn_close(c, "it carried the learned count", now);
		return 0;
	}
	while (conn_due(c, &what) <= now) {
		if (what == CT_OPEN) {
			conn_fail(c, now, c->state == C_CONNECTING ?
			    FAIL_CONNECT : FAIL_TLS, "", "%s",
			    c->state == C_CONNECTING ?
			    "connect timed out" : "TLS handshake timed out: "
			    "is it a DoT server?");
			return 0;
		}
		if (what == CT_FORGET) {
			conn_forget_cap(c);
			continue;	/* the idle close may be due too */
		}
		if (what == CT_IDLE && u->tx.n == 0) {
			conn_close(c, "idle", now);
			return 0;
		}
		if (what == CT_FLIGHT)
			conn_timers(c, now);
		break;
	}
	if (c->state == C_CONNECTING || c->state == C_HANDSHAKE)
		return conn_room(c);
	if (c->state == C_READY && u->tx.n > 0)
		conn_pump(c, now);
	return c->state == C_READY ? conn_room(c) : 0;
}

/* Opens connections of upstream ui for the queries that its open ones
 * (open, of which opening are not ready; room for more queries) cannot
 * take: as many at once as they need when ui is healthy and completed
 * a handshake before (a burst spreads over --max-conns when the server
 * takes few queries per connection), else one handshake at a time; and
 * a probe of a down one after its back-off. */
static void
up_open(int ui, int open, int opening, unsigned room, int64_t now)
{
	struct upstream *u = &G.up[ui];
	int	 k, parallel;

	parallel = !u->down && u->ctr[UCTR_HANDSHAKES_FULL] +
	    u->ctr[UCTR_HANDSHAKES_RESUMED] > 0 && now >= u->alone_until;
	for (k = 0; k < G.cfg.max_conns; k++) {
		struct conn *c = conn_of(ui, k);

		if (c->state != C_FREE)
			continue;
		if (u->tx.n > room && (parallel || opening == 0) &&
		    (now >= u->alone_until || open == 0)) {
			/* queries wait: all full or none ready */
		} else if (!(u->down && !u->plain && open == 0 &&
		    opening == 0 && !G.draining && now >= u->retry_at)) {
			return;	/* nor is a probe due (plain: a trial) */
		}
		if (conn_open(ui, c, now) < 0 || c->state == C_FREE)
			return;	/* no socket, or failed at once: down */
		opening++;
		open++;
		room += conn_room(c);
	}
}

/*
 * Once per loop pass, for every upstream: the timers of its UDP
 * exchanges (dgram_timers), kick its connections
 * (conn_kick), move queries that wait in vain (up_tx_timer), forget old
 * learned limits, and open connections for what waits (up_open).
 */
static void
up_kick(int64_t now)
{
	int	 ui, k;

	G.kick = 0;
	G.tx_timer = INT64_MAX;
	for (ui = 0; ui < G.nup; ui++) {
		unsigned room = 0;
		int	 open = 0, opening = 0;

		if (G.up[ui].plain)
			dgram_timers(ui, now);
		for (k = 0; k < G.cfg.max_conns; k++) {
			struct conn *c = conn_of(ui, k);

			if (c->state == C_FREE)
				continue;
			room += conn_kick(c, now);
			if (c->state == C_CONNECTING ||
			    c->state == C_HANDSHAKE)
				opening++;
			if (c->state != C_FREE)
				open++;
		}
		dl_min(&G.tx_timer, up_tx_timer(ui, now));
		if (now < G.fd_wait_until)
			continue;
		up_unlearn(&G.up[ui], now);
		up_open(ui, open, opening, room, now);
	}
}

/* ==== 13. Client input ==== */

/*
 * What clients send: the ACL, one query checked and queued
 * (client_query), UDP reads (recvmmsg), TCP accept and frame reads, and
 * the _pollset/_service pairs of UDP listeners, TCP listeners and TCP
 * clients. A TCP client sends 2-byte-length framed queries, any number,
 * and gets answers in the order they arrive from upstream; one that
 * shuts its side is kept until its answers are written. Owns
 * struct listener's reading and struct tcpclient's input. Calls DNS
 * wire, the query table, the policy (up_pick, up_enqueue) and client
 * output. Called by the loop.
 */

/* Is a client at sa allowed (--allow, or the private default)? */
static int
acl_allows(const struct sockaddr *sa)
{
	int	 i;

	for (i = 0; i < G.cfg.nallow; i++)
		if (cidr_match(&G.cfg.allow[i], sa))
			return 1;
	return 0;
}

/* Logs the malformed-input counters, at most once per
 * DOTP_MALFORMED_LOG_MS; never a byte of what the client sent. */
static void
log_malformed(int64_t now)
{
	if (G.malformed_logged && now - G.malformed_logged <
	    DOTP_MALFORMED_LOG_MS)
		return;
	G.malformed_logged = now;
	log_msg(LVL_WARN, "malformed input from clients (not DNS, or queries "
	    "dotp does not forward)\tdropped=%lu formerr=%lu notimp=%lu",
	    G.ctr[CTR_DROPPED], G.ctr[CTR_FORMERR],
	    G.ctr[CTR_NOTIMP]);
}

/* Answers a client outside --allow: REFUSED, with the question if the
 * message is a well-formed query; nothing if it is not a query at all. */
static void
client_refuse(const unsigned char *m, size_t len, const struct client *cl)
{
	struct qinfo qi;
	unsigned char out[DNS_UDP_MIN];
	size_t	 n;
	int	 r = dns_check_query(m, len, &qi);

	G.ctr[CTR_REFUSED]++;
	if (r == QC_DROP)
		return;
	n = dns_make_error(m, len, r == QC_OK ? qi.qend : 0, 0,
	    DNS_RCODE_REFUSED, out, sizeof out);
	if (n > 0)
		client_send(cl, out, n);
}

/*
 * Takes a slot for checked query m (len bytes, qi) of client cl: a copy
 * with a fresh upstream ID, padded, with its deadline; Q_LOOSE. Returns
 * the slot, or -1 when the table is full (the client got SERVFAIL).
 */
static int
q_start(const unsigned char *m, size_t len, const struct qinfo *qi,
    const struct client *cl, int64_t now)
{
	struct query *q;
	unsigned char out[DNS_UDP_MIN];
	size_t	 n;
	int	 i;

	if ((i = q_alloc()) < 0) {
		if (G.ctr[CTR_TABLE_FULL]++ == 0)
			log_msg(LVL_WARN, "query table full: new queries get "
			    "SERVFAIL (raise --max-queries)\tmax_queries=%d",
			    G.nq);
		n = dns_make_error(m, len, qi->qend, qi->has_opt,
		    DNS_RCODE_SERVFAIL, out, sizeof out);
		if (n > 0)
			client_send(cl, out, n);
		G.ctr[CTR_SERVFAIL]++;
		return -1;
	}
	q = &G.q[i];
	memcpy(q->qbuf, m, len);
	q->qlen = (uint16_t)len;
	q->qend = (uint16_t)qi->qend;
	q->has_opt = (uint8_t)qi->has_opt;
	q->udp_limit = dns_udp_limit(qi, (uint16_t)G.cfg.udp_size);
	q->client_id = rd16(m);
	wr16(q->qbuf + DNS_OFF_ID, q->up_id);
	q->padded = PAD_NONE;
	q->zone = (uint8_t)zone_of(m, qi->qend);
	if (!G.cfg.no_pad && !G.zone[q->zone].plain) {	/* RFC 8467: TLS */
		enum pad_how how;

		q->qlen = (uint16_t)dns_pad_query(q->qbuf, len, sizeof q->qbuf,
		    qi, &how);
		q->padded = (uint8_t)how;
	}
	q->deadline = now + G.cfg.timeout_ms;
	q->t0_us = qlog_t0;	/* set by client_query with --log-queries */
	q->cl = *cl;
	if (cl->kind == CK_TCP)
		G.tcp[cl->idx].pending++;
	return i;
}

/* Sends query i upstream; with ck (its key k's flag byte) it leads for
 * its key: a pending marker lets identical queries wait for it, and
 * stale says a stale answer may stand in for the upstream's. */
static void
q_lead(int i, int ck, const struct ckey *k, int stale, int64_t now)
{
	struct query *q = &G.q[i];

	if (ck > 0) {
		q->ck = (uint8_t)ck;
		q->chash = k->hash;
		q->lead = 1;
		cache_put(k, NULL, 0, 0, i, now);
		if (stale) {
			q->stale = 1;
			qlist_push(&G.stale, i, QL_STALE);
		}
	}
	/* Never -1: with every upstream down, the least recently failed. */
	up_enqueue(up_pick(q->zone, 0, 1), i, now);
}

/*
 * Answers query m from fresh entry e (a hit). A hit in the last tenth of
 * the entry's lifetime starts one refresh in the background (prefetch),
 * unless one is on its way.
 */
static void
cache_hit(struct centry *e, const unsigned char *m, size_t len,
    const struct qinfo *qi, const struct ckey *k, int ck,
    const struct client *cl, int64_t now)
{
	static unsigned char out[DOTP_CACHE_ANSWER_MAX];
	static const struct client refresh = { .kind = CK_NONE };
	int64_t	 left = e->stored + (int64_t)e->ttl * 1000 - now;
	size_t	 n = cache_replay(e, qi->qend, now, 0, out);
	int	 i;

	G.ctr[CTR_CACHE_HITS]++;
	e->flags |= CE_REF;
	qlog_from("cache", qlog_t0);
	client_answer(cl, m, qi->qend, rd16(m), dns_udp_limit(qi,
	    (uint16_t)G.cfg.udp_size), qi->has_opt, out, n);
	if ((e->flags & CE_PREFETCHED) || e->ttl < DOTP_PREFETCH_MIN_TTL ||
	    left * 10 > (int64_t)e->ttl * 1000 || cache_lookup(k, 1) != NULL)
		return;
	e->flags |= CE_PREFETCHED;
	if ((i = q_start(m, len, qi, &refresh, now)) < 0)
		return;
	G.ctr[CTR_CACHE_PREFETCHES]++;
	q_lead(i, ck, k, 0, now);
}

/*
 * The cache's part of query m: a fresh answer is replayed (a hit); with
 * its key already on its way upstream the query waits for that answer
 * (coalesced). Returns 1 when it is dealt with, 0 when it must go
 * upstream, *stale telling whether a stale answer may stand in.
 */
static int
client_cached(const unsigned char *m, size_t len, const struct qinfo *qi,
    const struct ckey *k, int ck, const struct client *cl, int64_t now,
    int *stale)
{
	struct centry *e = cache_lookup(k, 0), *p;
	int	 i, lead;

	if (e != NULL && ce_fresh(e, now)) {
		cache_hit(e, m, len, qi, k, ck, cl, now);
		return 1;
	}
	G.ctr[CTR_CACHE_MISSES]++;
	*stale = e != NULL && G.cfg.serve_stale > 0 && ce_stale_ok(e, now);
	if ((p = cache_lookup(k, 1)) == NULL)
		return 0;
	lead = p->lead;
	if (G.q[lead].state == Q_FREE || !G.q[lead].lead)
		return 0;	/* can't happen: q_free drops the marker */
	if ((i = q_start(m, len, qi, cl, now)) < 0)
		return 1;
	G.q[i].state = Q_FOLLOW;
	G.q[i].leader = lead;
	G.q[i].ck = (uint8_t)ck;
	G.q[i].chash = k->hash;
	qlist_push(&G.q[lead].fol, i, QL_MAIN);
	if (*stale) {	/* its own client-response timer */
		G.q[i].stale = 1;
		qlist_push(&G.stale, i, QL_STALE);
	}
	G.ctr[CTR_CACHE_COALESCED]++;
	return 1;
}

/*
 * Handles one message from a client: validate, answer errors at once,
 * then the cache (a hit, or a wait for the same query upstream), else
 * take a slot and queue it upstream.
 */
static void
client_query(const unsigned char *m, size_t len, const struct client *cl,
    int64_t now)
{
	struct qinfo qi;
	struct ckey k;
	unsigned char out[DNS_UDP_MIN];
	size_t	 n;
	int	 r, i, ck = 0, stale = 0;

	G.ctr[CTR_QUERIES]++;
	G.queries_by[cl->kind == CK_TCP]++;
	if (G.cfg.log_queries)
		qlog_from("dotp", now_us());
	r = dns_check_query(m, len, &qi);
	if (r != QC_OK) {
		if (r == QC_DROP)
			G.ctr[CTR_DROPPED]++;
		else if (r == DNS_RCODE_NOTIMP)
			G.ctr[CTR_NOTIMP]++;
		else
			G.ctr[CTR_FORMERR]++;
		log_malformed(now);
		if (r == QC_DROP)
			return;
		/* Header only: the question may be what is wrong. */
		n = dns_make_error(m, len, 0, 0, r, out, sizeof out);
		if (n > 0)
			client_send(cl, out, n);
		return;
	}
	if (G.cache.ring != NULL &&
	    (ck = cache_key(m, qi.qend, qi.opt, qi.opt_end, &k)) > 0 &&
	    client_cached(m, len, &qi, &k, ck, cl, now, &stale))
		return;
	if ((i = q_start(m, len, &qi, cl, now)) >= 0)
		q_lead(i, ck, &k, stale, now);
}

/*
 * --rate-limit QPS[:BURST]: a token bucket per client network, the
 * address cut to --rate-limit-prefix (/32 and /64 by default). Every
 * query takes a token, cache hits too; BURST tokens at most, refilled at
 * QPS a second. Over the limit, a UDP query gets a truncated answer, the
 * question only (no larger than the query: nothing to amplify), so a
 * real client retries over TCP, at most QPS a second (a second bucket);
 * then nothing. A TCP client over the limit is not read until a token
 * is due (rl_resume). The clients live in G.rl, DOTP_RL_SETS sets of
 * DOTP_RL_WAYS picked by a hash keyed at random, so no sender can aim
 * at another's set; tokens are kept in thousandths of a query.
 */

/* The network of the client at sa, as --rate-limit counts clients:
 * an IPv4 address as IPv4-mapped IPv6, cut to its prefix (V4 bits of
 * an IPv4 address, mapped or not; V6 bits of another). */
static void
rl_key(const struct sockaddr *sa, uint64_t key[2])
{
	static const unsigned char v4map[12] = {
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff
	};
	unsigned char a[16];
	int	 bits, k;

	memset(a, 0, sizeof a);
	if (sa->sa_family == AF_INET) {
		a[10] = a[11] = 0xff;
		memcpy(a + 12, &((const struct sockaddr_in *)(const void *)
		    sa)->sin_addr, 4);
	} else {
		memcpy(a, &((const struct sockaddr_in6 *)(const void *)
		    sa)->sin6_addr, 16);
	}
	/* IPv4, also mapped (a client of a dual-stack [::] listener) */
	bits = memcmp(a, v4map, sizeof v4map) == 0 ? 96 + G.cfg.rl_v4 :
	    G.cfg.rl_v6;
	for (k = 0; k < 16; k++, bits -= 8)
		a[k] &= bits >= 8 ? 0xff : bits <= 0 ? 0 :
		    (unsigned char)(0xff << (8 - bits));
	memcpy(key, a, 16);
}

/* Adds the tokens due since *seen to a bucket of cap. */
static int32_t
rl_refill(int32_t tokens, int64_t ms, int32_t cap)
{
	int64_t	 t = tokens + (ms > 0 ? ms : 0) * G.cfg.rl_qps;

	return t > cap ? cap : (int32_t)t;
}

/* The bucket of client key, refilled to now: found, or made in a free
 * way of its set, or in place of the set's least recently seen. */
static struct rlent *
rl_find(const uint64_t key[2], int64_t now)
{
	uint64_t h = key[0] ^ G.rl_seed[0];
	struct rlent *set, *e, *old;
	int32_t	 cap = G.cfg.rl_burst * 1000;
	int	 k;

	for (k = 0; k < 2; k++) {	/* splitmix64's finalizer, twice */
		h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
		h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
		h ^= (h >> 31) ^ (k == 0 ? key[1] ^ G.rl_seed[1] : 0);
	}
	set = G.rl + (h >> 53) * DOTP_RL_WAYS;	/* 2^11 sets */
	for (k = 0, old = set; k < DOTP_RL_WAYS; k++) {
		e = set + k;
		if (e->seen != 0 && e->key[0] == key[0] &&
		    e->key[1] == key[1]) {
			e->tokens = rl_refill(e->tokens, now - e->seen, cap);
			e->tc_tokens = rl_refill(e->tc_tokens, now - e->seen,
			    cap);
			e->seen = now;
			return e;
		}
		if (e->seen < old->seen)
			old = e;
	}
	if (old->seen != 0)
		G.ctr[CTR_RL_EVICTIONS]++;
	else
		G.rl_used++;
	old->key[0] = key[0];
	old->key[1] = key[1];
	old->seen = now;
	old->tokens = old->tc_tokens = cap;
	return old;
}

/* Takes a token of client key. Returns 0, or the milliseconds until
 * one is due. */
static int64_t
rl_take(const uint64_t key[2], int64_t now)
{
	struct rlent *e = rl_find(key, now);

	if (e->tokens >= 1000) {
		e->tokens -= 1000;
		return 0;
	}
	return (1000 - e->tokens + G.cfg.rl_qps - 1) / G.cfg.rl_qps;
}

/* UDP query m (len bytes) of client cl within its limit? If not, it
 * got a truncated answer or nothing. */
static int
rl_udp(const unsigned char *m, size_t len, const struct client *cl,
    int64_t now)
{
	unsigned char out[DNS_UDP_MIN];
	struct qinfo qi;
	struct rlent *e;
	uint64_t key[2];
	size_t	 n;

	rl_key(&cl->peer.sa, key);
	if (rl_take(key, now) == 0)
		return 1;
	e = rl_find(key, now);
	if (e->tc_tokens < 1000 || dns_check_query(m, len, &qi) != QC_OK ||
	    (n = dns_make_error(m, len, qi.qend, 0, 0, out, sizeof out)) == 0) {
		G.ctr[CTR_RL_DROPPED]++;
		return 0;
	}
	e->tc_tokens -= 1000;
	wr16(out + DNS_OFF_FLAGS, rd16(out + DNS_OFF_FLAGS) | DNS_FLAG_TC);
	client_send(cl, out, n);
	G.ctr[CTR_RL_TRUNCATED]++;
	return 0;
}

/* Takes the destination address a wildcard listener's datagram was
 * sent to from its control messages (IP_PKTINFO, IPV6_PKTINFO). */
static void
udp_dst(struct msghdr *mh, struct client *cl)
{
	struct cmsghdr *cm;

	cl->dst_family = 0;
	for (cm = CMSG_FIRSTHDR(mh); cm != NULL; cm = CMSG_NXTHDR(mh, cm)) {
		if (cm->cmsg_level == IPPROTO_IP &&
		    cm->cmsg_type == IP_PKTINFO) {
			struct in_pktinfo pi;

			memcpy(&pi, CMSG_DATA(cm), sizeof pi);
			cl->dst_family = AF_INET;
			cl->dst.v4 = pi.ipi_addr;
		} else if (cm->cmsg_level == IPPROTO_IPV6 &&
		    cm->cmsg_type == IPV6_PKTINFO) {
			struct in6_pktinfo pi;

			memcpy(&pi, CMSG_DATA(cm), sizeof pi);
			cl->dst_family = AF_INET6;
			cl->dst.v6 = pi.ipi6_addr;
		}
	}
}

/*
 * Reads what is waiting on UDP listener li, DOTP_UDP_BATCH datagrams
 * at most (then the other sockets get their turn): one recvmmsg() on
 * Linux, one recvmsg() a datagram elsewhere.
 */
static void
udp_read(int li, int64_t now)
{
	static struct mmsghdr mm[DOTP_UDP_BATCH];
	static struct iovec iov[DOTP_UDP_BATCH];
	static struct client cl[DOTP_UDP_BATCH];
	static unsigned char ctl[DOTP_UDP_BATCH][UDP_CTL_LEN];
	static unsigned char buf[DOTP_UDP_BATCH][DOTP_QUERY_MAX + 1];
	const struct listener *l = &G.lst[li];
	int	 i, n;

	for (i = 0; i < DOTP_UDP_BATCH; i++) {
		struct msghdr *mh = &mm[i].msg_hdr;

		memset(mh, 0, sizeof *mh);
		iov[i].iov_base = buf[i];
		iov[i].iov_len = sizeof buf[i];
		mh->msg_name = &cl[i].peer;
		mh->msg_namelen = sizeof cl[i].peer;
		mh->msg_iov = &iov[i];
		mh->msg_iovlen = 1;
		if (l->wildcard) {
			mh->msg_control = ctl[i];
			mh->msg_controllen = UDP_CTL_LEN;
		}
	}
#ifdef __linux__
	n = recvmmsg(l->udp, mm, DOTP_UDP_BATCH, MSG_DONTWAIT, NULL);
#else
	n = 0;
	while (n < DOTP_UDP_BATCH) {
		ssize_t r = recvmsg(l->udp, &mm[n].msg_hdr, MSG_DONTWAIT);

		if (r < 0)
			break;
		mm[n++].msg_len = (unsigned)r;
	}
	if (n == 0)
		n = -1;
#endif
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			log_errno(LVL_DEBUG, "udp recv failed");
		return;
	}
	for (i = 0; i < n; i++) {
		cl[i].kind = CK_UDP;
		cl[i].idx = (uint16_t)li;
		cl[i].gen = 0;
		cl[i].peerlen = mm[i].msg_hdr.msg_namelen;
		cl[i].dst_family = 0;
		if (l->wildcard)
			udp_dst(&mm[i].msg_hdr, &cl[i]);
		if (!acl_allows(&cl[i].peer.sa))
			client_refuse(buf[i], mm[i].msg_len, &cl[i]);
		else if (G.rl == NULL ||
		    rl_udp(buf[i], mm[i].msg_len, &cl[i], now))
			client_query(buf[i], mm[i].msg_len, &cl[i], now);
	}
}

/* Before poll(): the UDP listeners, unless draining (then their sockets
 * only carry answers). */
static void
udp_pollset(UNUSED int64_t now, UNUSED int64_t *deadline)
{
	int	 i;

	for (i = 0; i < G.nlisten && !G.draining; i++)
		loop_add(FK_UDP, i, G.lst[i].udp, POLLIN);
}

/* After poll(), for UDP listener li. */
static void
udp_service(int li, UNUSED int fd, UNUSED short revents, int64_t now)
{
	udp_read(li, now);
}

/*
 * Out of descriptors, a pending connection would wake poll() for ever:
 * give up the spare descriptor, accept the client and close it at once
 * (a clear outcome for it), then take the spare again. Logged once per
 * burst. Returns 0 if one client was taken off the backlog, -1 if not.
 */
static int
tcp_shed(int lfd)
{
	int	 fd;

	if (!G.accept_burst)
		log_errno(LVL_WARN, "out of file descriptors: closing new TCP "
		    "clients until some are free");
	G.accept_burst = 1;
	if (G.spare_fd < 0)
		return -1;
	close(G.spare_fd);
	fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd >= 0)
		close(fd);
	G.spare_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	return fd >= 0 ? 0 : -1;
}

/* Adopts connected, non-blocking socket fd of the client at sa as a
 * TCP client. Returns its slot, or -1 when --max-tcp clients are
 * connected (fd is left open). */
static int
tcp_attach(int fd, const struct sockaddr *sa, int64_t now)
{
	int	 j;

	if (G.ntcp == G.cfg.max_tcp)
		return -1;
	j = G.ntcp_free > 0 ? G.tcp_free[--G.ntcp_free] : G.tcp_high++;
	set_nodelay(fd);
	G.tcp[j].fd = fd;
	G.tcp[j].rx = G.tcprx + (size_t)j * (2 + DOTP_QUERY_MAX);
	G.tcp[j].rx_have = 0;
	G.tcp[j].idle_since = now;
	G.tcp[j].rl_until = 0;
	if (G.rl != NULL)
		rl_key(sa, G.tcp[j].rl_key);
	G.tcp[j].live_pos = G.ntcp;
	G.tcp_live[G.ntcp++] = j;
	return j;
}

/* Accepts what waits on TCP listener li, DOTP_UDP_BATCH at most. */
static void
tcp_accept(int li, int64_t now)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	int	 fd, k;

	for (k = 0; k < DOTP_UDP_BATCH; k++) {
		sl = sizeof ss;
		fd = accept4(G.lst[li].tcp, (struct sockaddr *)&ss, &sl,
		    SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if ((errno == EMFILE || errno == ENFILE) &&
			    tcp_shed(G.lst[li].tcp) == 0)
				continue;
			return;
		}
		G.accept_burst = 0;
		if (!acl_allows((struct sockaddr *)&ss) ||
		    tcp_attach(fd, (struct sockaddr *)&ss, now) < 0) {
			G.ctr[CTR_TCP_REFUSED]++;
			close(fd);
		}
	}
}

/* Before poll(): the TCP listeners (closed once draining). */
static void
accept_pollset(UNUSED int64_t now, UNUSED int64_t *deadline)
{
	int	 i;

	for (i = 0; i < G.nlisten; i++)
		if (G.lst[i].tcp >= 0)
			loop_add(FK_ACCEPT, i, G.lst[i].tcp, POLLIN);
}

/* After poll(), for TCP listener li. */
static void
accept_service(int li, int fd, UNUSED short revents, int64_t now)
{
	if (G.lst[li].tcp == fd)
		tcp_accept(li, now);
}

/* rl_resume() is due at t, or sooner. */
static void
rl_wake_at(int64_t t)
{
	if (G.rl_wake == 0 || t < G.rl_wake)
		G.rl_wake = t;
}

/*
 * Hands client j's complete frames on, each query within its
 * --rate-limit; over it, the client is paused (rl_until) with the rest
 * kept. Returns 0, or -1 when the client was closed.
 */
static int
tcp_frames(int j, int64_t now)
{
	struct tcpclient *c = &G.tcp[j];
	struct client cl;
	size_t	 off = 0;
	int64_t	 wait;
	long	 fl;

	while ((fl = frame_complete(c->rx + off, c->rx_have - off,
	    DNS_HEADER_LEN, DOTP_QUERY_MAX)) > 0) {
		if (G.rl != NULL && (wait = rl_take(c->rl_key, now)) > 0) {
			c->rl_until = now + wait;
			rl_wake_at(c->rl_until);
			G.ctr[CTR_RL_TCP_PAUSED]++;
			break;
		}
		cl.kind = CK_TCP;
		cl.idx = (uint16_t)j;
		cl.gen = c->gen;
		cl.peerlen = 0;
		client_query(c->rx + off + 2, (size_t)fl - 2, &cl, now);
		off += (size_t)fl;
		if (c->fd < 0)
			return -1;	/* closed while answering */
	}
	if (fl < 0) {
		G.ctr[CTR_DROPPED]++;
		log_malformed(now);
		tcp_close(c);
		return -1;
	}
	memmove(c->rx, c->rx + off, c->rx_have - off);
	c->rx_have -= off;
	return 0;
}

/* Reads frames from client j and hands each query on. */
static void
tcp_read(int j, int64_t now)
{
	struct tcpclient *c = &G.tcp[j];
	ssize_t	 n;

	while (c->fd >= 0 && !c->eof && c->pending < DOTP_TCP_PIPELINE &&
	    c->rl_until == 0) {
		n = recv(c->fd, c->rx + c->rx_have,
		    2 + DOTP_QUERY_MAX - c->rx_have, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				tcp_close(c);
			return;
		}
		if (n == 0) {
			c->eof = 1;
			tcp_became_idle(c);
			return;
		}
		c->idle_since = now;
		c->rx_have += (size_t)n;
		if (tcp_frames(j, now) < 0)
			return;
	}
}

/* The TCP clients paused by --rate-limit whose token is due: their
 * kept frames, then reading again. Backwards, as tcp_close() moves the
 * last live client into a closed one's place. */
static void
rl_resume(int64_t now)
{
	int	 j;

	if (G.draining)		/* no new queries: the paused wait */
		G.rl_wake = 0;
	if (G.rl_wake == 0 || now < G.rl_wake)
		return;
	G.rl_wake = 0;
	for (j = G.ntcp - 1; j >= 0; j--) {
		int	 k = G.tcp_live[j];
		struct tcpclient *c = &G.tcp[k];

		if (c->rl_until == 0)
			continue;
		if (now < c->rl_until) {
			rl_wake_at(c->rl_until);
			continue;
		}
		c->rl_until = 0;
		c->idle_since = now;
		if (tcp_frames(k, now) == 0 && c->rl_until == 0)
			tcp_read(k, now);	/* what came meanwhile */
	}
}

/*
 * Before poll(): the TCP clients. A dormant one (nothing outstanding,
 * idle DOTP_TCP_DORMANT_MS) is left out except on a sweep, every
 * DOTP_SWEEP_MS or when the last poll() timed out, so that a thousand
 * idle clients do not weigh on every poll() of a busy loop.
 */
static void
tcp_pollset(int64_t now, int64_t *deadline)
{
	int	 all = G.poll_all || now >= G.sweep_at, j;

	if (all)
		G.sweep_at = now + DOTP_SWEEP_MS;
	else if (G.ntcp > 0)
		dl_min(deadline, G.sweep_at);
	if (G.ntcp > 0)
		dl_min(deadline, G.tcp_scan_at);
	if (G.rl_wake != 0)
		dl_min(deadline, G.rl_wake);
	for (j = 0; j < G.ntcp; j++) {
		const struct tcpclient *c = &G.tcp[G.tcp_live[j]];
		short	 ev = 0;

		if (!all && c->pending == 0 && c->out_len == 0 &&
		    now - c->idle_since >= DOTP_TCP_DORMANT_MS)
			continue;
		if (!c->eof && !G.draining && c->pending < DOTP_TCP_PIPELINE &&
		    c->rl_until == 0)
			ev |= POLLIN;
		if (c->out_len > 0)
			ev |= POLLOUT;
		if (ev != 0)	/* else poll() would report a reset forever */
			loop_add(FK_TCP, G.tcp_live[j], c->fd, ev);
	}
}

/* After poll(), for TCP client j: write what waits, then read. */
static void
tcp_service(int j, int fd, short revents, int64_t now)
{
	struct tcpclient *c = &G.tcp[j];

	if (c->fd != fd)
		return;		/* closed since the poll set was built */
	if ((revents & (POLLOUT | POLLERR | POLLHUP)) && tcp_flush(c) < 0) {
		tcp_close(c);
		return;
	}
	if ((revents & (POLLIN | POLLERR | POLLHUP)) && !G.draining)
		tcp_read(j, now);
}

/* ==== 14. Metrics and health over HTTP ==== */

/*
 * --metrics ADDR[:PORT]: a small HTTP/1.1 server in the loop, one
 * request per connection (Connection: close). GET or HEAD of
 *   /metrics  the Prometheus text format (0.0.4), from the counter
 *             tables (DOTP_STATS, DOTP_UP_STATS) and a few levels;
 *   /health   200 while the loop runs (liveness);
 *   /ready    200 while a server of the default zone is not marked
 *             down and dotp is not draining, else 503 and the reason.
 * Anything else gets 400, 404, 405 or 431. Bounded: DOTP_HTTP_MAX
 * connections (more are closed at accept), a head of DOTP_HTTP_HEAD_MAX
 * bytes, DOTP_HTTP_MS for the whole exchange. Its clients must pass
 * --allow like DNS clients: one list to get right, and the metrics of a
 * dotp on a public address are not public either. Nothing here touches
 * a query. Owns the listener and struct httpconn. Calls the counter
 * tables. Called by the loop (http_pollset, http_service,
 * hlisten_pollset, hlisten_service).
 */

/* A response being built: at most cap bytes; over: it did not fit. */
struct wbuf {
	char	*p;
	size_t	 len, cap;
	int	 over;
};

/* Appends formatted text to b. */
static void
wb_printf(struct wbuf *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void
wb_printf(struct wbuf *b, const char *fmt, ...)
{
	va_list	 ap;
	int	 n;

	if (b->over)
		return;
	va_start(ap, fmt);
	n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= b->cap - b->len)
		b->over = 1;
	else
		b->len += (size_t)n;
}

/*
 * The samples are put together from pieces: printf costs a microsecond
 * a line, and a scrape's 300 lines would hold the loop (and DNS) that
 * much longer.
 */

/* Appends the strings of the NULL-ended list to b. */
static void
wb_put(struct wbuf *b, ...)
{
	const char *s;
	size_t	 n;
	va_list	 ap;

	va_start(ap, b);
	while ((s = va_arg(ap, const char *)) != NULL) {
		n = strlen(s);
		if (b->over || n > b->cap - b->len) {
			b->over = 1;
			break;
		}
		memcpy(b->p + b->len, s, n);
		b->len += n;
	}
	va_end(ap);
}

/* Appends " V\n": v in decimal, or, if ms, v/1000 with 3 decimals. */
static void
wb_value(struct wbuf *b, unsigned long v, int ms)
{
	char	 d[32];
	int	 i = sizeof d - 1;

	d[i] = '\0';
	d[--i] = '\n';
	do {
		d[--i] = (char)('0' + v % 10);
		v /= 10;
		if (ms && i == (int)sizeof d - 5)
			d[--i] = '.';
	} while (v > 0 || (ms && i > (int)sizeof d - 7));
	d[--i] = ' ';
	wb_put(b, d + i, NULL);
}

/* One sample: dotp_NAME{LAB} V (no braces when lab is ""). */
static void
wb_sample(struct wbuf *b, const char *name, const char *lab,
    unsigned long v, int ms)
{
	wb_put(b, "dotp_", name, *lab ? "{" : "", lab, *lab ? "}" : "", NULL);
	wb_value(b, v, ms);
}

/* "# HELP" and "# TYPE" of family dotp_NAME (or NAME when it has its
 * own prefix, "process_..."). */
static void
wb_family(struct wbuf *b, const char *name, const char *type,
    const char *help)
{
	const char *pre = strncmp(name, "process_", 8) ? "dotp_" : "";

	wb_put(b, "# HELP ", pre, name, " ", help, "\n# TYPE ", pre, name, " ",
	    type, "\n", NULL);
}

/* The samples of histogram h of family dotp_NAME, labels lab ("" or
 * "k=\"v\",..."), in seconds. */
static void
wb_hist(struct wbuf *b, const char *name, const char *lab,
    const struct hist *h)
{
	static const char le[DOTP_HIST_N + 1][8] = DOTP_HIST_LE;
	unsigned long n = 0;
	int	 k;

	for (k = 0; k <= DOTP_HIST_N; k++) {
		n += h->n[k];
		wb_put(b, "dotp_", name, "_bucket{", lab, *lab ? "," : "",
		    "le=\"", le[k], "\"}", NULL);
		wb_value(b, n, 0);
	}
	wb_put(b, "dotp_", name, "_sum", *lab ? "{" : "", lab, *lab ? "}" : "",
	    NULL);
	wb_value(b, h->sum_ms, 1);
	wb_put(b, "dotp_", name, "_count", *lab ? "{" : "", lab, *lab ? "}" :
	    "", NULL);
	wb_value(b, n, 0);
}

/* The process's resident set (/proc/self/statm) and open descriptors
 * (/proc/self/fd), read again at each scrape from the descriptors that
 * setup_metrics opened (the sandbox allows no open); -1 when /proc was
 * not there. */
static void
proc_figures(long *rss, long *fds)
{
	char	 buf[1024], *sp;
	ssize_t	 n;
	long	 off;

	*rss = *fds = -1;
	if (G.statm_fd >= 0) {
		n = pread(G.statm_fd, buf, sizeof buf - 1, 0);
		buf[n > 0 ? n : 0] = '\0';
		if ((sp = strchr(buf, ' ')) != NULL)	/* size, then resident */
			*rss = strtol(sp + 1, NULL, 10) * sysconf(_SC_PAGESIZE);
	}
	if (G.fddir_fd < 0 || lseek(G.fddir_fd, 0, SEEK_SET) < 0)
		return;
	*fds = -2;	/* "." and ".." */
	while ((n = syscall(SYS_getdents64, G.fddir_fd, buf, sizeof buf)) > 0)
		for (off = 0; off < n; (*fds)++)	/* d_reclen at 16 */
			off += (long)(uint16_t)((buf[off + 16] & 0xff) |
			    (buf[off + 17] & 0xff) << 8);
}

/* The process families: the counter table's rows, then the levels. */
static void
metrics_process(struct wbuf *b)
{
	long	 rss, fds;
	int	 k;

	char	 name[64];

	for (k = 0; k < CTR_N; k++) {
		int	 gauge = stat_defs[k].kind == STAT_GAUGE;

		snprintf(name, sizeof name, "%s%s", stat_defs[k].name,
		    gauge ? "" : "_total");
		wb_family(b, name, gauge ? "gauge" : "counter",
		    stat_defs[k].help);
		wb_sample(b, name, "", stat_value(k), 0);
	}
	wb_family(b, "queries_by_transport_total", "counter", "messages "
	    "received from clients, by transport");
	wb_sample(b, "queries_by_transport_total", "transport=\"udp\"",
	    G.queries_by[0], 0);
	wb_sample(b, "queries_by_transport_total", "transport=\"tcp\"",
	    G.queries_by[1], 0);
	wb_family(b, "responses_total", "counter", "messages sent to clients, "
	    "by RCODE (upstream, cache and dotp's own)");
	for (k = 0; k < 16; k++) {
		if (G.rcodes[k] == 0 && k > DNS_RCODE_REFUSED)
			continue;
		wb_put(b, "dotp_responses_total{rcode=\"", rcode_name[k], "\"}",
		    NULL);
		wb_value(b, G.rcodes[k], 0);
	}
	wb_family(b, "answer_duration_seconds", "histogram", "time from a "
	    "query to its upstream answer, for each answer counted in "
	    "dotp_answers_total");
	wb_hist(b, "answer_duration_seconds", "", &G.answer_time);
	wb_family(b, "queries_in_flight", "gauge", "queries waiting for an "
	    "upstream answer");
	wb_sample(b, "queries_in_flight", "", G.qlive, 0);
	wb_family(b, "tcp_clients", "gauge", "TCP clients connected");
	wb_sample(b, "tcp_clients", "", (unsigned long)G.ntcp, 0);
	wb_family(b, "build_info", "gauge", "the version running");
	wb_printf(b, "dotp_build_info{version=\"%s\"} 1\n", DOTP_VERSION);
	wb_family(b, "process_start_time_seconds", "gauge", "start time of "
	    "the process since the epoch");
	wb_printf(b, "process_start_time_seconds %lld\n",
	    (long long)G.started_at);
	proc_figures(&rss, &fds);
	if (rss >= 0) {
		wb_family(b, "process_resident_memory_bytes", "gauge",
		    "resident memory");
		wb_printf(b, "process_resident_memory_bytes %ld\n", rss);
	}
	if (fds >= 0) {
		wb_family(b, "process_open_fds", "gauge", "open descriptors");
		wb_printf(b, "process_open_fds %ld\n", fds);
	}
}

/* The labels of upstream u: its address, its zone and how it is
 * reached (a server given twice in a zone is refused, so they differ). */
static void
up_labels(const struct upstream *u, char *lab, size_t len)
{
	snprintf(lab, len, "upstream=\"%s\",zone=\"%s\",transport=\"%s\"",
	    u->label, G.zone[u->zone].text, u->plain ? "plain" : "tls");
}

/* Level f of upstream ui (f: 0 up, 1 connections, 2 SRTT in ms). */
static long
up_level(int ui, int f)
{
	const struct upstream *u = &G.up[ui];
	int	 c, open = 0;

	if (f == 0)
		return !u->down;
	if (f == 2)
		return u->srtt;
	for (c = 0; c < G.cfg.max_conns; c++)
		open += conn_of(ui, c)->state != C_FREE;
	return open;
}

/* The upstream families, one sample per server: its table's rows (a
 * gauge in milliseconds is reported in seconds), then health,
 * connections, SRTT and the answer-time histogram. */
static void
metrics_upstreams(struct wbuf *b)
{
	static const char level[3][2][48] = {
		{ "upstream_up", "1 while the server is not marked down" },
		{ "upstream_connections", "connections open or opening" },
		{ "upstream_srtt_seconds", "smoothed round-trip time, 0 before "
		    "a sample" } };
	char	 lab[400], name[64];
	int	 k, ui, f;
	long	 v;

	for (k = 0; k < UCTR_N; k++) {
		const struct stat_def *d = &up_stat_defs[k];
		size_t	 nl = strlen(d->name);
		int	 ms = nl > 3 && !strcmp(d->name + nl - 3, "_ms");

		snprintf(name, sizeof name, "upstream_%.*s%s", (int)nl -
		    (ms ? 3 : 0), d->name, d->kind == STAT_GAUGE ? (ms ?
		    "_seconds" : "") : "_total");
		wb_family(b, name, d->kind == STAT_GAUGE ? "gauge" : "counter",
		    d->help);
		for (ui = 0; ui < G.nup; ui++) {
			unsigned long x = up_stat(&G.up[ui], k);

			up_labels(&G.up[ui], lab, sizeof lab);
			wb_sample(b, name, lab, x, ms);
		}
	}
	for (f = 0; f < 3; f++) {
		wb_family(b, level[f][0], "gauge", level[f][1]);
		for (ui = 0; ui < G.nup; ui++) {
			up_labels(&G.up[ui], lab, sizeof lab);
			v = up_level(ui, f);
			wb_sample(b, level[f][0], lab, (unsigned long)v, f == 2);
		}
	}
	wb_family(b, "upstream_response_seconds", "histogram", "time from a "
	    "query's send to its answer");
	for (ui = 0; ui < G.nup; ui++) {
		up_labels(&G.up[ui], lab, sizeof lab);
		wb_hist(b, "upstream_response_seconds", lab, &G.up[ui].rtt);
	}
}

/* Is dotp ready for queries? Returns NULL, or why not. */
static const char *
http_unready(void)
{
	int	 i;

	if (G.draining)
		return "draining: shutting down";
	for (i = 0; i < G.zone[0].n; i++)
		if (!G.up[G.zone[0].first + i].down)
			return NULL;
	return "every upstream of the default zone is down";
}

/* Frees HTTP connection h's slot. What the client sent and dotp did not
 * read is read first (a few reads at most): closing over unread bytes
 * would send a reset that can destroy the response still in flight. */
static void
http_close(struct httpconn *h)
{
	int	 k;

	for (k = 0; k < 4 && h->fd >= 0 && recv(h->fd, h->req,
	    sizeof h->req, MSG_DONTWAIT) > 0; k++)
		;
	fd_close(&h->fd);
	free(h->out);
	h->out = NULL;
	h->have = h->out_len = h->out_off = 0;
}

/* Sets h's response: status, extra header lines (each ending in CRLF),
 * and body b (its head room, DOTP_HTTP_HEAD_ROOM bytes, takes the head);
 * no body for HEAD. */
#define DOTP_HTTP_HEAD_ROOM	256
static void
http_reply(struct httpconn *h, int status, const char *extra,
    struct wbuf *b, int head_only)
{
	static const struct { int code; char text[32]; } reason[] = {
		{ 200, "OK" }, { 400, "Bad Request" }, { 404, "Not Found" },
		{ 405, "Method Not Allowed" }, { 431, "Request Header Fields "
		"Too Large" }, { 500, "Internal Server Error" },
		{ 503, "Service Unavailable" } };
	char	 head[DOTP_HTTP_HEAD_ROOM];
	size_t	 body = b->len - DOTP_HTTP_HEAD_ROOM, k, n;

	for (k = 0; reason[k].code != status; k++)
		;
	n = (size_t)snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\n"
	    "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
	    "Content-Length: %zu\r\nConnection: close\r\n%s\r\n", status,
	    reason[k].text, body, extra);
	memcpy(b->p + DOTP_HTTP_HEAD_ROOM - n, head, n);
	h->out_len = n + (head_only ? 0 : body);
	if ((h->out = malloc(h->out_len)) == NULL) {
		http_close(h);
		return;
	}
	memcpy(h->out, b->p + DOTP_HTTP_HEAD_ROOM - n, h->out_len);
	h->out_off = 0;
}

/*
 * Answers the request head in h->req (complete: it ends in an empty
 * line, or it filled the buffer: 431). The request line is METHOD SP
 * PATH SP HTTP/1.x; the rest of the head is not read.
 */
static void
http_answer(struct httpconn *h, int complete)
{
	/* Built here, then copied out at its size: the scratch stays
	 * mapped, so a scrape costs no mmap() and no page faults. */
	static char scratch[DOTP_HTTP_HEAD_ROOM + DOTP_METRICS_MAX];
	struct wbuf b = { scratch, DOTP_HTTP_HEAD_ROOM, sizeof scratch, 0 };
	char	*path = strchr(h->req, ' '), *end = NULL;
	const char *why, *extra = "";
	int	 status = 200, head = 0;

	if (path != NULL && (end = strchr(++path, ' ')) != NULL) {
		*end = '\0';	/* PATH[?QUERY], then " HTTP/1.x" */
		path[strcspn(path, "?")] = '\0';
	}
	if (!complete)
		status = 431;
	else if (end == NULL || strncmp(end + 1, "HTTP/1.", 7) != 0 ||
	    !strchr("01", end[8]) || !strchr("\r\n", end[9]) || end[8] == 0)
		status = 400;
	else if (strncmp(h->req, "GET ", 4) != 0 &&
	    !(head = strncmp(h->req, "HEAD ", 5) == 0)) {
		status = 405;
		extra = "Allow: GET, HEAD\r\n";
	} else if (strcmp(path, "/metrics") == 0) {
		metrics_process(&b);
		metrics_upstreams(&b);
	} else if (strcmp(path, "/health") == 0)
		wb_printf(&b, "ok\n");
	else if (strcmp(path, "/ready") == 0) {
		why = http_unready();
		status = why ? 503 : 200;
		wb_printf(&b, "%s\n", why ? why : "ready");
	} else
		status = 404;
	if (b.over) {		/* can't happen: see DOTP_METRICS_MAX */
		status = 500;
		b.len = DOTP_HTTP_HEAD_ROOM;
		b.over = 0;
	}
	if (status >= 400 && status != 503)
		wb_printf(&b, "%d\n", status);
	http_reply(h, status, extra, &b, head);
}

/* Where the body after the head in req (len bytes) starts: past its
 * empty line. 0: the head does not end within len. */
static size_t
http_head_ends(const char *req, size_t len)
{
	size_t	 i;

	for (i = 1; i < len; i++)
		if (req[i] == '\n' && (req[i - 1] == '\n' || (i >= 3 &&
		    req[i - 1] == '\r' && req[i - 2] == '\n')))
			return i + 1;
	return 0;
}

/* Reads what h sent; answers once the head is complete or too long, or
 * closes it on EOF or an error. */
static void
http_read(struct httpconn *h)
{
	ssize_t	 n = recv(h->fd, h->req + h->have, sizeof h->req - 1 - h->have,
	    MSG_DONTWAIT);

	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK ||
	    errno == EINTR))
		return;
	if (n <= 0) {
		http_close(h);
		return;
	}
	h->have += (size_t)n;
	h->req[h->have] = '\0';
	if (http_head_ends(h->req, h->have) > 0)
		http_answer(h, 1);
	else if (h->have == sizeof h->req - 1)
		http_answer(h, 0);
}

/* Writes h's response; closes it when all is sent or on an error. */
static void
http_write(struct httpconn *h)
{
	ssize_t	 n = send(h->fd, h->out + h->out_off, h->out_len - h->out_off,
	    MSG_DONTWAIT | MSG_NOSIGNAL);

	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK ||
	    errno == EINTR))
		return;
	if (n > 0 && (h->out_off += (size_t)n) < h->out_len)
		return;
	http_close(h);
}

/* Before poll(): each HTTP connection, closed when its time is up. */
static void
http_pollset(int64_t now, int64_t *deadline)
{
	int	 k;

	if (!G.cfg.have_metrics)
		return;		/* G.http is not even set up */
	for (k = 0; k < DOTP_HTTP_MAX; k++) {
		struct httpconn *h = &G.http[k];

		if (h->fd < 0)
			continue;
		if (now >= h->deadline) {
			http_close(h);
			continue;
		}
		loop_add(FK_HTTP, k, h->fd, h->out ? POLLOUT : POLLIN);
		dl_min(deadline, h->deadline);
	}
}

/* After poll(), for HTTP connection k. */
static void
http_service(int k, int fd, UNUSED short revents, UNUSED int64_t now)
{
	struct httpconn *h = &G.http[k];

	if (h->fd != fd)
		return;
	if (h->out)
		http_write(h);
	else
		http_read(h);
}

/* Before poll(): the --metrics listener. */
static void
hlisten_pollset(UNUSED int64_t now, UNUSED int64_t *deadline)
{
	if (G.http_fd >= 0)
		loop_add(FK_HTTP_LISTEN, 0, G.http_fd, POLLIN);
}

/* After poll(): takes new HTTP clients into free slots; over
 * DOTP_HTTP_MAX, or outside --allow, they are closed. */
static void
hlisten_service(UNUSED int idx, int fd, UNUSED short revents, int64_t now)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	int	 c, k;

	while ((c = accept4(fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK |
	    SOCK_CLOEXEC)) >= 0) {
		sl = sizeof ss;
		for (k = 0; k < DOTP_HTTP_MAX && G.http[k].fd >= 0; k++)
			;
		if (k == DOTP_HTTP_MAX || !acl_allows((struct sockaddr *)&ss)) {
			close(c);
			continue;
		}
		G.http[k].fd = c;
		G.http[k].deadline = now + DOTP_HTTP_MS;
	}
}

/* ==== 15. Event loop ==== */

/*
 * One poll() loop, table-driven: each pass rebuilds the poll set from
 * the _pollset functions of fd_kinds[], sleeps until the nearest
 * deadline (loop_deadline and the _pollset functions fold them), calls
 * the _service function of each descriptor with events, then expires
 * queries and TCP clients, feeds the upstreams and sends the pass's UDP
 * answers. Signals start a drain. Owns the poll set and the drain.
 * Calls every _pollset/_service pair. Called by main.
 */

/* SIGTERM, SIGINT: the first starts the drain (the loop sees the flag
 * when poll() returns EINTR); a second one ends the process at once. */
static void
on_signal(int sig)
{
	static const char msg[] =
	    "level=warn msg=\"second signal, exiting now\"\n";

	if (got_signal) {
		(void)!write(2, msg, sizeof msg - 1);
		_exit(1);
	}
	got_signal = sig;
}

/* Expires queries past their deadline (age list head first), serves
 * stale answers due, and closes idle TCP clients. One active pass per
 * loop iteration. */
static void
expire(int64_t now)
{
	int	 i, j;

	/* Serve-stale: a query that found only a stale answer and waited
	 * the client-response timer gets it, and goes on as a refresh. All
	 * wait the same time, so the list's head is the next due. */
	while ((i = G.stale.head) >= 0 && G.q[i].deadline -
	    G.cfg.timeout_ms + DOTP_STALE_WAIT_MS <= now) {
		int	 follows = G.q[i].state == Q_FOLLOW;

		if (follows)	/* answered now, it waits no more */
			q_unlink(i);
		if (q_serve_stale(i, now, !follows))
			continue;
		qlist_remove(&G.stale, i, QL_STALE);
		G.q[i].stale = 0;
		if (follows) {	/* its entry was evicted: it waits on */
			G.q[i].state = Q_FOLLOW;
			qlist_push(&G.q[G.q[i].leader].fol, i, QL_MAIN);
		}
	}
	while ((i = G.age.head) >= 0 && G.q[i].deadline <= now) {
		q_unlink(i);
		q_servfail(i, now, CTR_SERVFAIL_DEADLINE);
	}
	if (now < G.tcp_scan_at)
		return;
	/* Close idle clients (and those that shut their side, once
	 * answered); find when the next one is due. Backwards: tcp_close()
	 * moves the last live client into the closed one's place, and that
	 * one was seen already. */
	G.tcp_scan_at = now + G.cfg.tcp_idle_ms;
	for (j = G.ntcp - 1; j >= 0; j--) {
		struct tcpclient *c = &G.tcp[G.tcp_live[j]];
		int64_t	 due = c->idle_since + G.cfg.tcp_idle_ms;

		if (c->pending > 0 || c->out_len > 0 || c->rl_until != 0)
			continue;
		if (c->eof || now >= due)
			tcp_close(c);
		else if (due < G.tcp_scan_at)
			G.tcp_scan_at = due;
	}
}

/* The first signal: take no more queries. TCP listeners close (new
 * clients are refused); UDP sockets stay open to carry the answers but
 * are no longer read. Queries in flight get --drain to finish. */
static void
drain_start(int64_t now)
{
	int	 i;

	G.draining = 1;
	G.drain_until = now + G.cfg.drain_ms;
	for (i = 0; i < G.nlisten; i++)
		fd_close(&G.lst[i].tcp);
	log_msg(LVL_INFO, "signal, draining\tsignal=%d queries=%u drain_ms=%d",
	    (int)got_signal, G.qlive, G.cfg.drain_ms);
}

/* The drain is over: time is up, or nothing is left to answer or to
 * write. */
static int
drain_done(int64_t now)
{
	int	 j;

	if (now >= G.drain_until)
		return 1;
	if (G.qlive > 0)
		return 0;
	for (j = 0; j < G.ntcp; j++)
		if (G.tcp[G.tcp_live[j]].out_len > 0)
			return 0;
	return 1;
}

/*
 * The descriptor kinds of the poll set (enum fd_kind): a new kind of
 * descriptor is a value there and a row here.
 */
static const struct fd_ops {
	void	(*pollset)(int64_t now, int64_t *deadline);
	void	(*service)(int idx, int fd, short revents, int64_t now);
} fd_kinds[FK_N] = {
	[FK_CONN] = { conn_pollset, conn_service },
	[FK_DGRAM] = { dgram_pollset, dgram_service },
	[FK_TCP] = { tcp_pollset, tcp_service },
	[FK_UDP] = { udp_pollset, udp_service },
	[FK_ACCEPT] = { accept_pollset, accept_service },
	[FK_HTTP] = { http_pollset, http_service },
	[FK_HTTP_LISTEN] = { hlisten_pollset, hlisten_service },
};

/* The deadlines that belong to no descriptor, folded: the longest
 * sleep, the drain, the oldest query, queries waiting for a connection,
 * the forced ACKs (*few: some are owed before sleeping), connects after
 * EMFILE. Descriptors add theirs in their _pollset. */
static int64_t
loop_deadline(int64_t now, int64_t max_sleep, int *few)
{
	int64_t	 d = now + max_sleep;

	if (G.draining)
		dl_min(&d, G.drain_until);
	if (G.age.head >= 0)
		dl_min(&d, G.q[G.age.head].deadline);
	if (G.stale.head >= 0)
		dl_min(&d, G.q[G.stale.head].deadline - G.cfg.timeout_ms +
		    DOTP_STALE_WAIT_MS);
	dl_min(&d, G.tx_timer);
	dl_min(&d, conn_acks(now, 0, few));
	if (G.fd_wait_until > now)
		dl_min(&d, G.fd_wait_until);
	return d;
}

/* poll() for at most timeout ms. About to sleep owing a few ACKs, a
 * look without sleeping comes first, and they are sent if nothing
 * came. Returns what poll() returned. */
static int
loop_poll(int64_t now, int timeout, int few)
{
	nfds_t	 n = (nfds_t)G.npfd;
	int	 r = 0;

	if (timeout > 0 && few && (r = poll(G.pfd, n, 0)) == 0)
		(void)conn_acks(now, 1, &few);
	if (r == 0)
		r = poll(G.pfd, n, timeout);
	G.poll_all = r == 0;	/* quiet: next time, sleep on all */
	if (r < 0 && errno != EINTR)
		log_errno(LVL_WARN, "poll failed");
	return r;
}

/*
 * One pass of the loop, sleeping at most max_sleep ms: build the poll
 * set, sleep until the nearest deadline, service each descriptor that
 * has events by its kind (fd_kinds), then expire, then feed upstreams
 * (so the queries of one pass leave in one send()), then send the
 * pass's datagrams to plain DNS servers and its UDP answers.
 */
static void
loop_pass(int64_t max_sleep)
{
	int64_t	 now = now_ms(), deadline;
	int	 i, k, few, timeout;

	deadline = loop_deadline(now, max_sleep, &few);
	G.npfd = 0;
	for (k = 0; k < FK_N; k++)
		fd_kinds[k].pollset(now, &deadline);
	timeout = G.kick || deadline <= now ? 0 :
	    (int)(deadline - now + 1);	/* +1: never wake early */
	if (loop_poll(now, timeout, few) < 0)
		return;
	now = now_ms();
	for (i = 0; i < G.npfd; i++)
		if (G.pfd[i].revents)
			fd_kinds[G.pkind[i]].service(G.pidx[i], G.pfd[i].fd,
			    G.pfd[i].revents, now);
	expire(now);
	rl_resume(now);
	up_kick(now);
	dgram_flush();
	udp_flush();
}

/* The loop: passes until a signal's drain is done. */
static void
loop_run(void)
{
	int64_t	 now;

	for (;;) {
		now = now_ms();
		if (got_signal && !G.draining)
			drain_start(now);
		if (G.draining && drain_done(now))
			return;
		loop_pass(DOTP_MAX_SLEEP_MS);
	}
}

/* ==== 16. Options ==== */

/*
 * Every option is one row of DOTP_OPTS: short and long name, environment
 * variable, argument, the function that sets it, range and default, and
 * the help text. The table drives the flags (cfg_parse), the environment
 * fallback (a flag wins over its variable), the defaults and --help;
 * the README's table of options is checked against it (tests/unit.c).
 * A new option is a field in struct config, a row here, and, for a new
 * kind of value, an opt_ function. Values are checked here, once: a bad
 * one ends dotp with one line naming the flag or variable (fatal, 2).
 * Owns: struct config. Calls: the parsers below, parse_cidr. Called by:
 * main, before anything else.
 */

/* Parses a decimal integer in [min, max]. Returns 0, or -1. */
static int
parse_int(const char *s, long min, long max, long *out)
{
	char	*end;
	long	 v;

	if (*s < '0' || *s > '9')	/* no sign, no white space */
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

struct optdef;
/* Sets option o from value v; what names the flag or variable. */
typedef void opt_set_fn(struct config *, const struct optdef *,
    const char *v, const char *what);

/* How an option reads its environment variable. */
enum opt_kind {
	OPT_VALUE,	/* the value as is */
	OPT_LIST,	/* items split by commas and spaces; repeatable flag */
	OPT_SWITCH,	/* a boolean: 1, yes, true; 0, no, false, empty */
	OPT_ACTION	/* -h, -V: no variable */
};

struct optdef {
	char	 chr;		/* short option, or 0 */
	uint8_t	 kind;		/* enum opt_kind */
	const char *name;	/* long option */
	const char *env;	/* environment variable, or NULL */
	const char *arg;	/* the value's name in --help; NULL: none */
	const char *unit;	/* numbers: what the value counts, for errors */
	opt_set_fn *set;
	long	 min, max;	/* numbers: the accepted range */
	long	 def;		/* numbers: the default */
	size_t	 off;		/* offsetof(struct config, the field) */
	const char *dflt;	/* others: the default, as flag values */
	const char *help;
};

/* The int field of cfg that option o sets. */
static int *
opt_int(struct config *cfg, const struct optdef *o)
{
	return (int *)(void *)((char *)cfg + o->off);
}

/* A number in [min, max]. */
static void
opt_num(struct config *cfg, const struct optdef *o, const char *v,
    const char *what)
{
	long	 t;

	if (parse_int(v, o->min, o->max, &t) < 0)
		fatal(2, "bad %s value '%s': expected %s %ld..%ld", what, v,
		    o->unit, o->min, o->max);
	*opt_int(cfg, o) = (int)t;
}

/* A size in bytes, with an optional k or m suffix (x1024, x1048576),
 * in [min, max]. */
static void
opt_size(struct config *cfg, const struct optdef *o, const char *v,
    const char *what)
{
	char	 num[24];
	size_t	 n = strlen(v);
	long	 t, mul = 1;

	if (n > 0 && (v[n - 1] == 'k' || v[n - 1] == 'K'))
		mul = 1024;
	else if (n > 0 && (v[n - 1] == 'm' || v[n - 1] == 'M'))
		mul = 1024 * 1024;
	if (mul > 1)
		n--;
	if (n == 0 || n >= sizeof num)
		fatal(2, "bad %s value '%s': expected bytes, e.g. 4m or 512k",
		    what, v);
	memcpy(num, v, n);
	num[n] = '\0';
	if (parse_int(num, 0, o->max / mul, &t) < 0 || t * mul < o->min)
		fatal(2, "bad %s value '%s': expected %s %ldk..%ldm (k, m: "
		    "x1024, x1048576)", what, v, o->unit, o->min / 1024,
		    o->max / (1024 * 1024));
	*opt_int(cfg, o) = (int)(t * mul);
}

/* A switch that is on. */
static void
opt_on(struct config *cfg, const struct optdef *o, UNUSED const char *v,
    UNUSED const char *what)
{
	*opt_int(cfg, o) = 1;
}

/* One -l value. */
static void
opt_listen(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	if (cfg->nlisten == DOTP_MAX_LISTEN)
		fatal(2, "too many %s addresses (at most %d)", what,
		    DOTP_MAX_LISTEN);
	if (parse_addr(v, 53, &cfg->listen[cfg->nlisten]) < 0)
		fatal(2, "bad %s value '%s': expected ADDR[:PORT], e.g. "
		    "127.0.0.1:53 or [::1]:53", what, v);
	cfg->nlisten++;
}

/* The forms of a server and of a --forward entry, for error lines. */
#define DOT_FORM	"HOST[:PORT]#NAME, e.g. 1.1.1.1:853#cloudflare-dns.com"
#define FWD_FORM	"ZONE[,ZONE...]=SERVER[,SERVER...] with SERVER " \
	"HOST[:PORT]#NAME (DNS over TLS) or dns://HOST[:PORT] (plain DNS), " \
	"e.g. cluster.local=dns://10.96.0.10"

/* Decodes pin text s (44 characters of base64, the last '=') into
 * out. Returns 0, or -1. */
static int
pin_parse(const char *s, unsigned char out[32])
{
	const char *d;
	uint32_t acc = 0;
	int	 k, o = 0;

	for (k = 0; k < 43; k++) {
		if (s[k] == '\0' || (d = strchr(b64_alphabet, s[k])) == NULL)
			return -1;
		acc = acc << 6 | (uint32_t)(d - b64_alphabet);
		if (k % 4 != 0)		/* 8 bits are complete */
			out[o++] = (unsigned char)(acc >> (6 - 2 * (k % 4)));
	}
	return s[43] == '=' && s[44] == '\0' && (acc & 3) == 0 ? 0 : -1;
}

/* Parses the @ items after a server's #NAME, at s. Returns NULL, or
 * what is wrong. */
static const char *
parse_pins(const char *s, struct server *sv)
{
	char	 item[64];
	size_t	 n;

	while (*s++ == '@') {
		n = strcspn(s, "@");
		str_copy(item, n < sizeof item ? n + 1 : sizeof item, s);
		s += n;
		if (strcmp(item, "pin-only") == 0)
			sv->pin_only = 1;
		else if (strcmp(item, "no-name-check") == 0)
			sv->no_name = 1;
		else if (strncmp(item, "sha256/", 7) != 0)
			return "after @ comes a pin, sha256/BASE64, or "
			    "pin-only or no-name-check";
		else if (sv->npin == DOTP_MAX_PINS)
			return "more than 8 pins";
		else if (n >= sizeof item || pin_parse(item + 7,
		    sv->pin[sv->npin++]) < 0)
			return "a pin is sha256/ then 44 characters of base64, "
			    "the SHA-256 of a SubjectPublicKeyInfo (see the "
			    "README for the openssl command)";
	}
	if (sv->no_name && !sv->pin_only)
		return "@no-name-check goes only with @pin-only";
	if (sv->pin_only && sv->npin == 0)
		return "@pin-only needs a pin";
	return NULL;
}

/*
 * Parses server v: DNS over TLS as HOST[:PORT]#NAME[@PIN...] (port
 * 853), or, when plain_ok, plain DNS as dns://HOST[:PORT] (port 53).
 * Returns NULL, or what is wrong, in the user's words.
 */
static const char *
parse_server(const char *v, int plain_ok, struct server *sv)
{
	char	 addr[80];
	const char *hash = strchr(v, '#');
	size_t	 al, nl;

	memset(sv, 0, sizeof *sv);
	if (strncmp(v, "dns://", 6) == 0) {
		sv->plain = 1;
		if (!plain_ok)
			return "-u takes DNS-over-TLS servers; plain DNS "
			    "servers go in --forward ZONE=dns://HOST[:PORT]";
		if (strchr(v, '@') != NULL)
			return "pins (@) are for DNS-over-TLS servers";
		if (parse_addr(v + 6, 53, &sv->a) < 0)
			return "the HOST of dns://HOST[:PORT] must be an IPv4 "
			    "or [IPv6] address";
		return NULL;
	}
	if (hash == NULL)
		return plain_ok ? "a server is DNS over TLS (with #NAME) or "
		    "plain DNS (with dns://): plain DNS is never assumed" :
		    "the certificate name is missing; expected " DOT_FORM;
	al = (size_t)(hash - v);
	if (al >= sizeof addr)
		al = sizeof addr - 1;
	memcpy(addr, v, al);
	addr[al] = '\0';
	if (parse_addr(addr, 853, &sv->a) < 0)
		return "expected HOST[:PORT]#NAME with HOST an IPv4 or [IPv6] "
		    "address";
	nl = strcspn(hash + 1, "@");
	str_copy(sv->name, nl < sizeof sv->name ? nl + 1 : sizeof sv->name,
	    hash + 1);
	if (nl >= sizeof sv->name || !valid_cert_name(sv->name))
		return "the name after # is not a DNS name to check the "
		    "certificate against";
	return parse_pins(hash + 1 + nl, sv);
}

/* Is server sv[n] one of sv[0..n) (the same address and port)? */
static int
server_dup(const struct server *sv, int n)
{
	int	 i;

	for (i = 0; i < n; i++)
		if (strcmp(sv[i].a.text, sv[n].a.text) == 0)
			return 1;
	return 0;
}

/* One -u value. The built-in default gives way to --forward . */
static void
opt_upstream(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	const char *why;
	int	 by = strcmp(what, "default") ? UP_BY_FLAG : UP_BY_DEFAULT;

	if (cfg->up_by == UP_BY_FORWARD && by == UP_BY_DEFAULT)
		return;
	if (cfg->up_by == UP_BY_FORWARD)
		fatal(2, "bad %s value '%s': the zone \".\" is set by "
		    "--forward too; use one of them", what, v);
	if (cfg->nup == DOTP_MAX_ZONE_SERVERS)
		fatal(2, "too many %s values (at most %d)", what,
		    DOTP_MAX_ZONE_SERVERS);
	if ((why = parse_server(v, 0, &cfg->up[cfg->nup])) != NULL)
		fatal(2, "bad %s value '%s': %s", what, v, why);
	if (server_dup(cfg->up, cfg->nup))
		fatal(2, "bad %s value '%s': that server is given twice", what,
		    v);
	cfg->up_by = by;
	cfg->nup++;
}

/* The next item of list *s, split at sep, with the white space around
 * it trimmed; *s moves past it. NULL when the list is done. */
static char *
list_next(char **s, const char *sep)
{
	char	*item = *s, *end;
	size_t	 n;

	if (item == NULL)
		return NULL;
	n = strcspn(item, sep);
	*s = item[n] ? item + n + 1 : NULL;
	item[n] = '\0';
	item += strspn(item, " \t\r");
	for (end = item + strlen(item); end > item && strchr(" \t\r", end[-1]);)
		*--end = '\0';
	return item;
}

/*
 * Parses zone name v into z (wire form, lower case, and the text): a
 * DNS name of letters, digits, '-' and '_', a trailing dot optional;
 * "." is the root. Returns NULL, or what is wrong.
 */
static const char *
parse_zone(const char *v, struct zone *z)
{
	size_t	 n, at = 0, k;

	memset(z, 0, sizeof *z);
	if (*v == '\0')
		return "the zone is empty";
	str_copy(z->text, sizeof z->text, v);
	if (strcmp(v, ".") != 0)
		for (; *v; v += n + (v[n] == '.')) {
			n = strspn(v, "abcdefghijklmnopqrstuvwxyz"
			    "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_");
			if (v[n] != '\0' && v[n] != '.')
				return "a zone is a DNS name of letters, "
				    "digits, '-' and '_'";
			if (n == 0 || n > 63)
				return "a label of the zone is empty or longer "
				    "than 63 bytes";
			if (at + 1 + n + 1 > DNS_NAME_MAX)
				return "the zone is longer than 255 bytes";
			z->name[at++] = (unsigned char)n;
			for (k = 0; k < n; k++)
				z->name[at++] = dns_lower((unsigned char)v[k]);
		}
	z->name[at++] = 0;
	z->len = at;
	return NULL;
}

/* Ends dotp for a bad --forward entry e: why (formatted), and the
 * expected form. */
static void
fwd_fatal(const char *what, const char *e, const char *fmt, ...)
	__attribute__((noreturn, format(printf, 3, 4)));

static void
fwd_fatal(const char *what, const char *e, const char *fmt, ...)
{
	char	 why[200];
	va_list	 ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	fatal(2, "bad %s value '%s': %s; expected " FWD_FORM, what, e, why);
}

/* The servers of --forward entry e (text after '=') into sv; all of one
 * kind. Returns how many. */
static int
fwd_servers(const char *what, const char *e, char *list, struct server *sv)
{
	const char *why;
	char	*item;
	int	 n = 0;

	while ((item = list_next(&list, ",")) != NULL) {
		if (*item == '\0')
			fwd_fatal(what, e, "%s", list || n ? "a server is empty" :
			    "the zone is mapped to no server");
		if (n == DOTP_MAX_ZONE_SERVERS)
			fwd_fatal(what, e, "more than %d servers for a zone",
			    DOTP_MAX_ZONE_SERVERS);
		if ((why = parse_server(item, 1, &sv[n])) != NULL)
			fwd_fatal(what, e, "%s", why);
		if (server_dup(sv, n))
			fwd_fatal(what, e, "server %s is given twice",
			    sv[n].a.text);
		if (sv[n].plain != sv[0].plain)
			fwd_fatal(what, e, "a zone's servers are all DNS over "
			    "TLS or all plain DNS: plain DNS is never a "
			    "fallback");
		n++;
	}
	return n;
}

/* Is zone z given already (a --forward zone, or "." by --forward)? */
static int
fwd_seen(const struct config *cfg, const struct zone *z)
{
	int	 i;

	if (z->len == 1)
		return cfg->up_by == UP_BY_FORWARD;
	for (i = 0; i < cfg->nzone; i++)
		if (cfg->zone[i].len == z->len &&
		    memcmp(cfg->zone[i].name, z->name, z->len) == 0)
			return 1;
	return 0;
}

/* Sets zone z's servers sv[0..n): "." takes the place of -u's. */
static void
fwd_add(struct config *cfg, const char *what, const char *e, struct zone *z,
    const struct server *sv, int n)
{
	if (z->len == 1) {
		if (cfg->up_by == UP_BY_FLAG)
			fwd_fatal(what, e, "the zone \".\" is set by -u too; "
			    "use one of them");
		memcpy(cfg->up, sv, (size_t)n * sizeof *sv);
		cfg->nup = n;
		cfg->up_by = UP_BY_FORWARD;
		return;
	}
	if (cfg->nzone == DOTP_MAX_ZONES)
		fwd_fatal(what, e, "more than %d zones", DOTP_MAX_ZONES);
	z->first = cfg->nfwd;
	z->n = n;
	z->plain = sv[0].plain;
	cfg->zone[cfg->nzone++] = *z;
}

/* One --forward entry e: ZONE[,ZONE...]=SERVER[,SERVER...]. */
static void
fwd_entry(struct config *cfg, const char *what, char *e)
{
	struct server sv[DOTP_MAX_ZONE_SERVERS];
	struct zone z;
	char	 shown[512], *eq = strchr(e, '='), *zones = e, *item;
	const char *why;
	int	 n, fwd = 0;

	str_copy(shown, sizeof shown, e);
	if (eq == NULL)
		fwd_fatal(what, shown, "no '=': the zone is mapped to nothing");
	*eq = '\0';
	n = fwd_servers(what, shown, eq + 1, sv);
	while ((item = list_next(&zones, ",")) != NULL) {
		if ((why = parse_zone(item, &z)) != NULL)
			fwd_fatal(what, shown, "%s", why);
		if (fwd_seen(cfg, &z))
			fwd_fatal(what, shown, "this zone is given twice");
		fwd_add(cfg, what, shown, &z, sv, n);
		fwd += z.len > 1;
	}
	if (fwd == 0)
		return;
	if (cfg->nfwd + n > DOTP_MAX_FWD_SERVERS)
		fwd_fatal(what, shown, "more than %d --forward servers in all",
		    DOTP_MAX_FWD_SERVERS);
	memcpy(cfg->fwd + cfg->nfwd, sv, (size_t)n * sizeof *sv);
	cfg->nfwd += n;
}

/* One --forward value: entries separated by ';' or newlines. */
static void
opt_forward(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	char	 list[4096], *s = list, *e;
	int	 n = 0;

	if (strlen(v) >= sizeof list)
		fatal(2, "bad %s value: longer than %zu bytes", what,
		    sizeof list - 1);
	str_copy(list, sizeof list, v);
	while ((e = list_next(&s, ";\n")) != NULL)
		if (*e != '\0') {
			fwd_entry(cfg, what, e);
			n++;
		}
	if (n == 0)
		fwd_fatal(what, v, "no entry");
}

/* One --allow prefix. */
static void
opt_allow(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	struct cidr *c = &cfg->allow[cfg->nallow];

	if (cfg->nallow == DOTP_MAX_ALLOW)
		fatal(2, "too many %s values (at most %d)", what,
		    DOTP_MAX_ALLOW);
	if (parse_cidr(v, c) < 0)
		fatal(2, "bad %s value '%s': expected an address prefix like "
		    "10.0.0.0/8 or fd00::/8", what, v);
	/* v4-mapped clients are matched as IPv4: such a prefix would
	 * silently match nothing. */
	if (c->family == AF_INET6 && c->bits >= 96 &&
	    memcmp(c->addr, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0)
		fatal(2, "bad %s value '%s': write v4-mapped prefixes as IPv4 "
		    "(e.g. 10.0.0.0/8)", what, v);
	cfg->nallow++;
}

/*
 * The uid and gid of user name in /etc/passwd (read once, at most
 * DOTP_PASSWD_MAX bytes: names are looked up only at start). Returns 0,
 * or -1 when the file or the name is not there.
 */
#define DOTP_PASSWD_MAX	(256 * 1024)
static int
passwd_ids(const char *name, uid_t *uid, gid_t *gid)
{
	static char buf[DOTP_PASSWD_MAX + 1];
	char	*line, *next, *f[4];
	ssize_t	 n;
	size_t	 have = 0, nl = strlen(name);
	int	 fd, k;

	if ((fd = open("/etc/passwd", O_RDONLY | O_CLOEXEC)) < 0)
		return -1;
	while (have < DOTP_PASSWD_MAX && (n = read(fd, buf + have,
	    DOTP_PASSWD_MAX - have)) > 0)
		have += (size_t)n;
	close(fd);
	buf[have] = '\0';
	for (line = buf; line != NULL && *line; line = next) {
		if ((next = strchr(line, '\n')) != NULL)
			*next++ = '\0';
		if (strncmp(line, name, nl) != 0 || line[nl] != ':')
			continue;
		for (k = 0, f[0] = line; k < 3 && (f[k + 1] = strchr(f[k],
		    ':')) != NULL; k++)
			*f[k + 1]++ = '\0';	/* name, password, uid, gid */
		if (k < 3)
			return -1;
		*uid = (uid_t)strtoul(f[2], NULL, 10);
		*gid = (gid_t)strtoul(f[3], NULL, 10);
		return 0;
	}
	return -1;
}

/* --user USER|UID[:GID]: a number needs no /etc/passwd (scratch); the
 * group defaults to the user's (a name) or to the uid (a number). */
static void
opt_user(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	char	 name[64], *colon;
	long	 id, g;

	if (*v == '\0')
		return;
	str_copy(name, sizeof name, v);
	if ((colon = strchr(name, ':')) != NULL)
		*colon++ = '\0';
	if (parse_int(name, 0, 65534 * 65536L, &id) == 0) {
		cfg->uid = (uid_t)id;
		cfg->gid = (gid_t)id;
	} else if (passwd_ids(name, &cfg->uid, &cfg->gid) < 0)
		fatal(2, "bad %s value '%s': no such user in /etc/passwd; give "
		    "a number (UID or UID:GID), e.g. 65534", what, v);
	if (colon != NULL) {
		if (parse_int(colon, 0, 65534 * 65536L, &g) < 0)
			fatal(2, "bad %s value '%s': expected USER|UID[:GID] with "
			    "GID a number", what, v);
		cfg->gid = (gid_t)g;
	}
	if (cfg->uid == 0)
		fatal(2, "bad %s value '%s': that is root; give an unprivileged "
		    "user", what, v);
	cfg->have_user = 1;
}

/* --metrics. */
static void
opt_metrics(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	if (*v == '\0')
		return;
	if (parse_addr(v, DOTP_METRICS_PORT, &cfg->metrics) < 0)
		fatal(2, "bad %s value '%s': expected ADDR[:PORT], e.g. "
		    "127.0.0.1:9253 or [::]:9253", what, v);
	cfg->have_metrics = 1;
}

/* --ca-file. */
static void
opt_ca_file(struct config *cfg, UNUSED const struct optdef *o,
    const char *v, UNUSED const char *what)
{
	if (*v != '\0')
		cfg->ca_file = v;
}

/* --rate-limit QPS[:BURST]; BURST is QPS when left out. */
static void
opt_rate_limit(struct config *cfg, UNUSED const struct optdef *o,
    const char *v, const char *what)
{
	char	 qps[16];
	const char *colon = strchr(v, ':');
	size_t	 n = colon ? (size_t)(colon - v) : strlen(v);
	long	 q, b;

	str_copy(qps, n < sizeof qps ? n + 1 : sizeof qps, v);
	if (n >= sizeof qps || parse_int(qps, 1, DOTP_RL_MAX, &q) < 0 ||
	    parse_int(colon ? colon + 1 : qps, 1, DOTP_RL_MAX, &b) < 0)
		fatal(2, "bad %s value '%s': expected QPS[:BURST], queries a "
		    "second and a burst, each 1..%d", what, v, DOTP_RL_MAX);
	cfg->rl_qps = (int)q;
	cfg->rl_burst = (int)b;
}

/* --rate-limit-prefix V4:V6. */
static void
opt_rl_prefix(struct config *cfg, UNUSED const struct optdef *o,
    const char *v, const char *what)
{
	char	 v4[4] = "";
	const char *colon = strchr(v, ':');
	long	 a = 0, b = 0;

	if (colon != NULL && colon - v < (long)sizeof v4)
		str_copy(v4, (size_t)(colon - v) + 1, v);
	if (colon == NULL || parse_int(v4, 1, 32, &a) < 0 ||
	    parse_int(colon + 1, 1, 128, &b) < 0)
		fatal(2, "bad %s value '%s': expected V4:V6, prefix lengths "
		    "1..32 and 1..128 (e.g. 32:64)", what, v);
	cfg->rl_v4 = (int)a;
	cfg->rl_v6 = (int)b;
}

/* --policy. */
static void
opt_policy(struct config *cfg, UNUSED const struct optdef *o, const char *v,
    const char *what)
{
	if (strcmp(v, "first") == 0)
		cfg->policy = POLICY_FIRST;
	else if (strcmp(v, "round-robin") == 0)
		cfg->policy = POLICY_RR;
	else
		fatal(2, "bad %s value '%s': expected first or round-robin",
		    what, v);
}

/* --help reads opts[], whose -h row calls it: the one cycle here. */
static void	usage(void);

/* -h. */
static void
opt_help(UNUSED struct config *cfg, UNUSED const struct optdef *o,
    UNUSED const char *v, UNUSED const char *what)
{
	usage();
	exit(0);
}

/* -V. */
static void
opt_version(UNUSED struct config *cfg, UNUSED const struct optdef *o,
    UNUSED const char *v, UNUSED const char *what)
{
	printf("dotp %s (BearSSL 0.6, %s trust anchors)\n", DOTP_VERSION,
#ifndef DOTP_NO_EMBEDDED_TAS
	    "embedded Mozilla"
#else
	    "no embedded"
#endif
	    );
	exit(0);
}

#define CFG(f)	offsetof(struct config, f)
#define MS	"MS", "milliseconds"
#define COUNT	"N", "a count"
#define BYTES	"BYTES", "bytes"
#define SECONDS	"S", "seconds"
/*
 * A row of a number, a size, a switch, or another value: each is an
 * OPT(chr, kind, name, env, arg, unit, set, min, max, def, off, dflt,
 * help) with the fields of struct optdef, "" for a text it lacks.
 */
#define NUM(name, env, arg_unit, min, max, def, f, help) \
	OPT(0, OPT_VALUE, name, env, arg_unit, opt_num, min, max, def, \
	    CFG(f), "", help)
#define SIZE(name, env, arg_unit, min, max, def, f, help) \
	OPT(0, OPT_VALUE, name, env, arg_unit, opt_size, min, max, def, \
	    CFG(f), "", help)
#define SWITCH(chr, name, env, f, help) \
	OPT(chr, OPT_SWITCH, name, env, "", "", opt_on, 0, 0, 0, CFG(f), \
	    "", help)
#define VALUE(chr, kind, name, env, arg, set, dflt, help) \
	OPT(chr, kind, name, env, arg, "", set, 0, 0, 0, 0, dflt, help)

/* The private ranges: the default --allow. */
#define DOTP_ALLOW_DEFAULT "127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 " \
	"192.168.0.0/16 169.254.0.0/16 fc00::/7 fe80::/10"

/* The options, one row each, in --help's order. */
#define DOTP_OPTS \
	VALUE('l', OPT_LIST, "listen", "DOTP_LISTEN", "ADDR[:PORT]", \
	    opt_listen, "127.0.0.1:53 [::1]:53", \
	    "serve DNS on UDP and TCP there (repeatable; IPv6 as [::1]:53)") \
	VALUE('u', OPT_LIST, "upstream", "DOTP_UPSTREAM", "HOST[:PORT]#NAME", \
	    opt_upstream, "1.1.1.1#cloudflare-dns.com " \
	    "1.0.0.1#cloudflare-dns.com", \
	    "DoT resolver: IP literal, port (853), and the name its " \
	    "certificate must carry (repeatable); then @sha256/BASE64 pins " \
	    "a key, @pin-only trusts the pin alone (see the README)") \
	VALUE(0, OPT_VALUE, "forward", "DOTP_FORWARD", \
	    "ZONE[,ZONE...]=SERVER[,SERVER...]", opt_forward, "", \
	    "names at or under ZONE go to these servers: DoT as for -u, or " \
	    "plain DNS as dns://HOST[:PORT] (repeatable; ';' separates " \
	    "entries)") \
	VALUE(0, OPT_VALUE, "ca-file", "DOTP_CA_FILE", "PEM", opt_ca_file, \
	    "", "trust these CAs instead of the embedded Mozilla roots") \
	NUM("timeout", "DOTP_TIMEOUT", MS, 1, 600000, DOTP_TIMEOUT_MS, \
	    timeout_ms, "answer SERVFAIL to a query unanswered that long") \
	VALUE(0, OPT_VALUE, "policy", "DOTP_POLICY", "first|round-robin", \
	    opt_policy, "first", "first healthy upstream in -u order, or " \
	    "round-robin over the healthy ones") \
	NUM("attempt-timeout", "DOTP_ATTEMPT_TIMEOUT", MS, 0, 600000, 0, \
	    attempt_ms, "also send to the next upstream after that long " \
	    "(0: from the upstream's RTT)") \
	NUM("connect-timeout", "DOTP_CONNECT_TIMEOUT", MS, 1, 600000, \
	    DOTP_CONNECT_MS, connect_ms, "TCP connect limit") \
	NUM("handshake-timeout", "DOTP_HANDSHAKE_TIMEOUT", MS, 1, 600000, \
	    DOTP_HANDSHAKE_MS, handshake_ms, "TLS handshake limit") \
	NUM("idle-timeout", "DOTP_IDLE_TIMEOUT", MS, 1, 86400000, \
	    DOTP_IDLE_MS, idle_ms, "close an upstream connection idle that " \
	    "long (less for a server seen to close sooner)") \
	NUM("conn-queries", "DOTP_CONN_QUERIES", COUNT, 1, 65535, \
	    DOTP_CONN_QUERIES, conn_queries, "queries in flight on one " \
	    "connection before another one opens") \
	NUM("max-conns", "DOTP_MAX_CONNS", COUNT, 1, DOTP_MAX_CONNS_CAP, \
	    DOTP_MAX_CONNS, max_conns, "connections per upstream") \
	NUM("max-queries", "DOTP_MAX_QUERIES", COUNT, 1, \
	    DOTP_MAX_QUERIES_CAP, DOTP_MAX_QUERIES, max_queries, \
	    "queries waiting at once; over it, SERVFAIL") \
	NUM("drain", "DOTP_DRAIN", MS, 0, 600000, DOTP_DRAIN_MS, drain_ms, \
	    "on SIGTERM, time given to queries in flight") \
	NUM("udp-size", "DOTP_UDP_SIZE", BYTES, DNS_UDP_MIN, \
	    DOTP_UDP_SIZE_MAX, DNS_EDNS_UDP_MAX, udp_size, \
	    "largest UDP answer to an EDNS client") \
	NUM("udp-rcvbuf", "DOTP_UDP_RCVBUF", BYTES, 4096, \
	    DOTP_UDP_RCVBUF_MAX, DOTP_UDP_RCVBUF, udp_rcvbuf, \
	    "UDP receive buffer asked for, for bursts") \
	SWITCH(0, "no-pad", "DOTP_NO_PAD", no_pad, \
	    "do not pad queries to 128-byte blocks (RFC 8467)") \
	SIZE("cache-size", "DOTP_CACHE_SIZE", BYTES, DOTP_CACHE_SIZE_MIN, \
	    DOTP_CACHE_SIZE_MAX, DOTP_CACHE_SIZE, cache_size, \
	    "memory for the answer cache, all of it " \
	    "reserved at start (k, m suffixes)") \
	SWITCH(0, "no-cache", "DOTP_NO_CACHE", no_cache, \
	    "no answer cache: every query goes upstream") \
	NUM("cache-min-ttl", "DOTP_CACHE_MIN_TTL", SECONDS, 0, 86400, 0, \
	    cache_min_ttl, "keep answers at least that long") \
	NUM("cache-max-ttl", "DOTP_CACHE_MAX_TTL", SECONDS, 1, 604800, \
	    DOTP_CACHE_MAX_TTL, cache_max_ttl, "keep answers at most that long") \
	NUM("cache-neg-ttl", "DOTP_CACHE_NEG_TTL", SECONDS, 1, 86400, \
	    DOTP_CACHE_NEG_TTL, cache_neg_ttl, "keep NXDOMAIN and NODATA at " \
	    "most that long") \
	NUM("serve-stale", "DOTP_SERVE_STALE", SECONDS, 0, 604800, 0, \
	    serve_stale, "keep expired answers that much longer, served when " \
	    "upstreams fail or are slow (0: off)") \
	VALUE(0, OPT_VALUE, "metrics", "DOTP_METRICS", "ADDR[:PORT]", \
	    opt_metrics, "", "serve /metrics (Prometheus), /health and " \
	    "/ready over HTTP there (port 9253); off unless set") \
	VALUE(0, OPT_LIST, "allow", "DOTP_ALLOW", "CIDR", opt_allow, \
	    DOTP_ALLOW_DEFAULT, "clients allowed (repeatable); others get " \
	    "REFUSED") \
	VALUE(0, OPT_VALUE, "rate-limit", "DOTP_RATE_LIMIT", "QPS[:BURST]", \
	    opt_rate_limit, "", "queries a second per client network, and a " \
	    "burst (QPS); over it: UDP gets TC, then nothing; TCP waits") \
	VALUE(0, OPT_VALUE, "rate-limit-prefix", "DOTP_RATE_LIMIT_PREFIX", \
	    "V4:V6", opt_rl_prefix, "32:64", "--rate-limit's client network: " \
	    "the address cut to that prefix") \
	NUM("tcp-idle-timeout", "DOTP_TCP_IDLE_TIMEOUT", MS, 1, 86400000, \
	    DOTP_TCP_IDLE_MS, tcp_idle_ms, "close a TCP client idle that long") \
	NUM("max-tcp", "DOTP_MAX_TCP", COUNT, 1, DOTP_MAX_TCP_CAP, \
	    DOTP_MAX_TCP, max_tcp, "TCP clients at once; over it, closed") \
	VALUE(0, OPT_VALUE, "user", "DOTP_USER", "USER|UID[:GID]", opt_user, \
	    "", "after start-up (sockets bound, anchors loaded) run as this " \
	    "user; numbers need no /etc/passwd") \
	SWITCH(0, "no-sandbox", "DOTP_NO_SANDBOX", no_sandbox, \
	    "no seccomp filter after start-up (for debugging)") \
	SWITCH(0, "log-queries", "DOTP_LOG_QUERIES", log_queries, \
	    "one log line per answer: client, name, type, rcode, source, " \
	    "latency (off: privacy)") \
	SWITCH('v', "verbose", "DOTP_VERBOSE", verbose, "debug logs") \
	SWITCH('q', "quiet", "DOTP_QUIET", quiet, "errors only") \
	VALUE('h', OPT_ACTION, "help", "", "", opt_help, "", \
	    "this text") \
	VALUE('V', OPT_ACTION, "version", "", "", opt_version, "", \
	    "print the version") \

/*
 * The rows as data: their texts as one block of strings, the rest as a
 * table, unpacked into opts[] at start (opts_init). A table of pointers
 * to strings would cost a relocation of 24 bytes per string in the
 * static PIE binary (see stat_text).
 */
#define OPT(chr, kind, name, env, arg, unit, set, min, max, def, off, \
    dflt, help) name "\0" env "\0" arg "\0" unit "\0" dflt "\0" help "\0"
static const char opt_text[] = DOTP_OPTS;
#undef OPT
/* The functions that set options, named in rows by index. */
#define OPT_SETTERS(X) X(opt_num) X(opt_size) X(opt_on) X(opt_listen) \
	X(opt_upstream) X(opt_forward) X(opt_allow) X(opt_user) \
	X(opt_metrics) X(opt_ca_file) X(opt_policy) X(opt_help) \
	X(opt_version) X(opt_rate_limit) X(opt_rl_prefix)
#define SETTER_ENUM(f)	OS_##f,
#define SETTER_FN(f)	f,
enum opt_setter { OPT_SETTERS(SETTER_ENUM) };
static opt_set_fn *const opt_sets[] = { OPT_SETTERS(SETTER_FN) };
struct optrow {
	char	 chr;
	uint8_t	 kind;
	uint8_t	 set;		/* enum opt_setter */
	uint16_t off;		/* in struct config, before fwd[] */
	int32_t	 min, max, def;
};
#define OPT(chr, kind, name, env, arg, unit, set, min, max, def, off, \
    dflt, help) { chr, kind, OS_##set, off, min, max, def },
static const struct optrow opt_rows[] = { DOTP_OPTS };
#undef OPT
#define NOPTS	(int)(sizeof opt_rows / sizeof opt_rows[0])
static struct optdef opts[NOPTS];

/* The next string of opt_text at *t, or NULL if it is empty. */
static const char *
opt_text_next(const char **t)
{
	const char *s = *t;

	*t += strlen(s) + 1;
	return *s ? s : NULL;
}

/* Fills opts[] from opt_rows and opt_text, once. */
static void
opts_init(void)
{
	const char *t = opt_text;
	int	 k;

	if (opts[0].name != NULL)
		return;
	for (k = 0; k < NOPTS; k++) {
		opts[k].chr = opt_rows[k].chr;
		opts[k].kind = opt_rows[k].kind;
		opts[k].set = opt_sets[opt_rows[k].set];
		opts[k].min = opt_rows[k].min;
		opts[k].max = opt_rows[k].max;
		opts[k].def = opt_rows[k].def;
		opts[k].off = opt_rows[k].off;
		opts[k].name = opt_text_next(&t);
		opts[k].env = opt_text_next(&t);
		opts[k].arg = opt_text_next(&t);
		opts[k].unit = opt_text_next(&t);
		opts[k].dflt = opt_text_next(&t);
		opts[k].help = opt_text_next(&t);
	}
}


/* --help, from opts[]. */
static void
usage(void)
{
	const struct optdef *o;
	char	 flag[64];

	printf("usage: dotp [-l ADDR[:PORT]]... [-u HOST[:PORT]#NAME]... "
	    "[options]\n       dotp healthcheck [the same options]: exit 0 "
	    "when that instance is ready\n\n");
	for (o = opts; o < opts + NOPTS; o++) {
		snprintf(flag, sizeof flag, "%c%c%s--%s%s%s", o->chr ? '-' : ' ',
		    o->chr ? o->chr : ' ', o->chr ? ", " : "  ", o->name,
		    o->arg ? " " : "", o->arg ? o->arg : "");
		printf("  %-33s%s\n      %s\n", flag, o->env ? o->env : "",
		    o->help);
		if (o->set == opt_num || o->set == opt_size)
			printf("      default: %ld\n", o->def);
		else if (o->dflt != NULL)
			printf("      default: %s\n", o->dflt);
	}
	printf("\nEvery option also reads from the environment variable "
	    "beside it; lists are split\nby commas or spaces, switches take "
	    "1 or 0. A flag wins over its variable.\n");
}

/* Applies option o's environment variable, if set. Returns the number
 * of values it set. */
static int
opt_env(struct config *cfg, const struct optdef *o)
{
	const char *s = o->env ? getenv(o->env) : NULL;
	char	 item[512];
	size_t	 n;
	int	 set = 0;

	if (s == NULL || (*s == '\0' && o->kind != OPT_SWITCH))
		return 0;
	if (o->kind == OPT_SWITCH) {
		int	 on = !strcmp(s, "1") || !strcmp(s, "yes") ||
		    !strcmp(s, "true");

		if (!on && strcmp(s, "") && strcmp(s, "0") && strcmp(s, "no") &&
		    strcmp(s, "false"))
			fatal(2, "bad %s value '%s': expected 1 or 0", o->env,
			    s);
		if (on)
			o->set(cfg, o, s, o->env);
		return 1;
	}
	if (o->kind != OPT_LIST) {
		o->set(cfg, o, s, o->env);
		return 1;
	}
	for (; *s; s += strspn(s, ", \t")) {
		if ((n = strcspn(s, ", \t")) >= sizeof item)
			fatal(2, "bad %s value: item too long", o->env);
		memcpy(item, s, n);
		item[n] = '\0';
		if (n > 0) {
			o->set(cfg, o, item, o->env);
			set++;
		}
		s += n;
	}
	return set;
}

/* Applies option o's default: a number, or a list of flag values. */
static void
opt_default(struct config *cfg, const struct optdef *o)
{
	char	 list[256], *item, *save = NULL;

	if (o->set == opt_num || o->set == opt_size) {
		*opt_int(cfg, o) = (int)o->def;
		return;
	}
	if (o->dflt == NULL)
		return;
	str_copy(list, sizeof list, o->dflt);
	for (item = strtok_r(list, " ", &save); item != NULL;
	    item = strtok_r(NULL, " ", &save))
		o->set(cfg, o, item, "default");
}

/* The row of option name (n bytes long), or of short option chr when
 * n is 0; -1 if none. */
static int
opt_find(const char *name, size_t n, int chr)
{
	int	 k;

	if (n == 0 && chr == 0)		/* "--=..." */
		return -1;
	for (k = 0; k < NOPTS; k++)
		if (n ? strlen(opts[k].name) == n &&
		    memcmp(opts[k].name, name, n) == 0 : opts[k].chr == chr)
			return k;
	return -1;
}

/* Sets option k from flag value v (NULL for a switch). */
static void
opt_flag(struct config *cfg, int k, const char *v, int *given)
{
	char	 flag[40];

	snprintf(flag, sizeof flag, "--%s", opts[k].name);
	opts[k].set(cfg, &opts[k], v, flag);
	given[k] = 1;
}

/*
 * Parses the flags, then fills what they left unset from the
 * environment, then from the defaults. Exits 2 on a bad value, 0 after
 * -h or -V.
 */
static void
cfg_parse(struct config *cfg, int argc, char *argv[])
{
	const char *a, *v, *eq;
	int	 i, k = 0, given[NOPTS];

	opts_init();
	memset(cfg, 0, offsetof(struct config, fwd));
	memset(given, 0, sizeof given);
	for (k = 0; k < NOPTS; k++)
		if (opts[k].set == opt_num || opts[k].set == opt_size)
			opt_default(cfg, &opts[k]);
	/* -x, -xVALUE, -x VALUE, -vq; --name, --name=VALUE, --name VALUE;
	 * -- ends them. */
	for (i = 1; i < argc && (a = argv[i])[0] == '-' && a[1] != '\0'; i++) {
		if (strcmp(a, "--") == 0) {
			i++;
			break;
		}
		v = NULL;
		if (a[1] == '-') {
			eq = strchr(a, '=');
			k = opt_find(a + 2, eq ? (size_t)(eq - a - 2) :
			    strlen(a + 2), 0);
			if (k >= 0 && eq != NULL && opts[k].arg == NULL)
				fatal(2, "option '--%s' takes no value; see dotp "
				    "--help", opts[k].name);
			v = eq ? eq + 1 : NULL;
		} else {
			while (*++a && (k = opt_find(NULL, 0, *a)) >= 0 &&
			    opts[k].arg == NULL)
				opt_flag(cfg, k, NULL, given);
			if (*a == '\0')
				continue;
			v = a[1] ? a + 1 : NULL;
		}
		if (k < 0)
			fatal(2, "unknown option '%s'; see dotp --help", argv[i]);
		if (opts[k].arg != NULL && v == NULL && ++i == argc)
			fatal(2, "option '%s' needs a value; see dotp --help",
			    argv[i - 1]);
		opt_flag(cfg, k, opts[k].arg && v == NULL ? argv[i] : v, given);
	}
	if (i < argc)
		fatal(2, "unexpected argument '%s'; see dotp --help", argv[i]);
	for (k = 0; k < NOPTS; k++)
		if (!given[k] && opt_env(cfg, &opts[k]) == 0 &&
		    opts[k].set != opt_num && opts[k].set != opt_size)
			opt_default(cfg, &opts[k]);
	cfg->verbosity = cfg->verbose ? LVL_DEBUG : cfg->quiet ? LVL_ERROR :
	    LVL_INFO;
}

/* ==== 17. Setup, shutdown and main ==== */

/*
 * Start-up (trust anchors, tables, listeners; errors through fatal()),
 * the start line, the clean end after a drain with the exit lines of
 * the counter tables, and main. Calls everything above.
 */

/*
 * Asks for --udp-rcvbuf bytes of receive buffer on UDP socket fd: the
 * privileged SO_RCVBUFFORCE first (root or CAP_NET_ADMIN may pass
 * net.core.rmem_max), else SO_RCVBUF, which the kernel caps. Linux
 * reports twice what it grants (the overhead it counts), so half the
 * value read back is compared. Less than asked is logged, not fatal.
 */
static void
udp_rcvbuf(int fd, const char *where)
{
	int	 want = G.cfg.udp_rcvbuf, got = 0;
	socklen_t sl = sizeof got;

#ifdef SO_RCVBUFFORCE
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &want, sizeof want) < 0)
#endif
		(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &want, sizeof want);
	if (getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &got, &sl) == 0 &&
	    got / 2 < want)
		log_msg(LVL_INFO, "UDP receive buffer smaller than asked: a "
		    "burst may overflow it (raise net.core.rmem_max, or run "
		    "with CAP_NET_ADMIN)\tlisten=%s asked=%d got=%d", where,
		    want, got / 2);
}

/* IPV6_V6ONLY for listen address a: off for the IPv6 wildcard [::] when
 * no IPv4 wildcard shares its port (then [::] serves IPv4 clients too,
 * as v4-mapped addresses); on otherwise, so both can be bound. */
static int
listen_v6only(const struct sockaddr_text *a)
{
	int	 i;

	if (a->u.sa.sa_family != AF_INET6 ||
	    !IN6_IS_ADDR_UNSPECIFIED(&a->u.sin6.sin6_addr))
		return 1;
	for (i = 0; i < G.cfg.nlisten; i++) {
		const struct sockaddr_text *b = &G.cfg.listen[i];

		if (b->u.sa.sa_family == AF_INET &&
		    b->u.sin.sin_addr.s_addr == htonl(INADDR_ANY) &&
		    b->u.sin.sin_port == a->u.sin6.sin6_port)
			return 1;
	}
	return 0;
}

/* Opens the UDP and TCP sockets of one listen address. Returns 0, or
 * -1 with errno set and *what naming the failed step. */
static int
listen_open(const struct sockaddr_text *a, struct listener *l,
    const char **what)
{
	int	 one = 1, type, v6only = listen_v6only(a);

	l->udp = l->tcp = -1;
	l->wildcard = a->u.sa.sa_family == AF_INET6 ?
	    IN6_IS_ADDR_UNSPECIFIED(&a->u.sin6.sin6_addr) :
	    a->u.sin.sin_addr.s_addr == htonl(INADDR_ANY);
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
			(void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY,
			    &v6only, sizeof v6only);
		if (!type && l->wildcard) {
			(void)setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one,
			    sizeof one);
			if (a->u.sa.sa_family == AF_INET6)
				(void)setsockopt(fd, IPPROTO_IPV6,
				    IPV6_RECVPKTINFO, &one, sizeof one);
		}
		*what = "bind";
		if (bind(fd, &a->u.sa, a->len) < 0)
			goto fail;
		*what = "listen";
		if (type && listen(fd, 128) < 0)
			goto fail;
		if (!type)
			udp_rcvbuf(fd, a->text);
	}
	return 0;
fail:
	fd_close(&l->udp);
	fd_close(&l->tcp);
	return -1;
}

/* Raises the soft descriptor limit to want (at most the hard limit), so
 * that --max-tcp clients fit; a lower limit is logged, not fatal (EMFILE
 * is handled). */
static void
fd_limit_raise(int want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= (rlim_t)want)
		return;
	rl.rlim_cur = rl.rlim_max != RLIM_INFINITY &&
	    rl.rlim_max < (rlim_t)want ? rl.rlim_max : (rlim_t)want;
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur < (rlim_t)want)
		log_msg(LVL_WARN, "descriptor limit is below what --max-tcp "
		    "needs\tlimit=%lu want=%d", (unsigned long)rl.rlim_cur,
		    want);
}

/* The trust anchors: --ca-file, or the embedded roots. */
static void
setup_anchors(void)
{
	br_x509_trust_anchor *tas;
	const char *why = NULL;
	int	 n;

#if defined(__x86_64__)
	if (br_chacha20_sse2_get() == 0 || br_poly1305_ctmulq_get() == 0)
		fatal(1, "BearSSL was built without SSE2 ChaCha20 or 64-bit "
		    "Poly1305 (see tls_setup)");
#endif
	if (G.cfg.ca_file == NULL) {
#ifndef DOTP_NO_EMBEDDED_TAS
		G.tas = ta_embedded();
		G.ntas = DOTP_EMBEDDED_TAS_NUM;
		return;
#else
		fatal(2, "built without embedded trust anchors; use --ca-file");
#endif
	}
	if ((n = ta_load_pem(G.cfg.ca_file, &tas, &why)) < 0)
		fatal(2, "cannot use --ca-file '%s': %s", G.cfg.ca_file, why);
	G.tas = tas;
	G.ntas = (size_t)n;
}

/* Upstream u, a server of zone zi, as given by sv. */
static void
setup_upstream(struct upstream *u, const struct server *sv, int zi)
{
	u->tx = u->ul = u->ulate = (struct qlist)QLIST_ZERO;
	memcpy(&u->addr, &sv->a.u, sizeof u->addr);
	u->addrlen = sv->a.len;
	str_copy(u->label, sizeof u->label, sv->a.text);
	str_copy(u->name, sizeof u->name, sv->name);
	u->plain = sv->plain;
	u->sv = sv;
	u->zone = zi;
}

/* The zones and their servers: "." and -u's (or --forward .'s) first,
 * then each --forward zone, whose servers follow. Zones of one entry
 * share its servers. */
static void
setup_zones(void)
{
	struct config *cfg = &G.cfg;
	struct zone *z = &G.zone[0];
	int	 i, k;

	z->len = 1;		/* name[0] == 0: the root */
	str_copy(z->text, sizeof z->text, ".");
	z->n = cfg->nup;
	z->plain = cfg->up[0].plain;
	for (i = 0; i < cfg->nup; i++)
		setup_upstream(&G.up[i], &cfg->up[i], 0);
	for (k = 0; k < cfg->nzone; k++) {
		z = &G.zone[1 + k];
		*z = cfg->zone[k];
		z->first += cfg->nup;
		for (i = z->first; i < z->first + z->n; i++)
			setup_upstream(&G.up[i], &cfg->fwd[i - cfg->nup], 1 + k);
	}
	G.nzone = 1 + cfg->nzone;
	G.nup = cfg->nup + cfg->nfwd;
}

/* The tables, sized once from the options: queries, connections (each
 * with its TLS context), TCP client slots, the poll set; and the
 * upstreams. Exits when out of memory. */
static void
setup_tables(void)
{
	struct config *cfg = &G.cfg;
	size_t	 npfd;
	int	 i;

	setup_zones();
	stat_defs_init();
	for (i = 0; i < DOTP_DGRAM_SOCKS; i++)
		G.dsock[i].fd = -1;
	for (i = 0; cfg->have_metrics && i < DOTP_HTTP_MAX; i++)
		G.http[i].fd = -1;	/* 16 KB: touched only with --metrics */
	G.http_fd = G.statm_fd = G.fddir_fd = -1;
	if (cfg->rl_qps > 0) {	/* zero pages until clients come */
		G.rl = calloc(DOTP_RL_SETS * DOTP_RL_WAYS, sizeof *G.rl);
		if (G.rl == NULL || fill_random(G.rl_seed,
		    sizeof G.rl_seed) < 0)
			fatal(1, "cannot set up --rate-limit: %s",
			    strerror(errno));
	}
	G.dcur[0] = G.dcur[1] = -1;
	G.nconn = G.nup * cfg->max_conns;
	npfd = (size_t)(G.nconn + DOTP_DGRAM_SOCKS + cfg->max_tcp +
	    2 * cfg->nlisten + 1 + DOTP_HTTP_MAX);
	G.conn = calloc((size_t)G.nconn, sizeof *G.conn);
	G.tcp = calloc((size_t)cfg->max_tcp, sizeof *G.tcp);
	G.tcprx = calloc((size_t)cfg->max_tcp, 2 + DOTP_QUERY_MAX);
	G.tcp_live = calloc((size_t)cfg->max_tcp, sizeof *G.tcp_live);
	G.tcp_free = calloc((size_t)cfg->max_tcp, sizeof *G.tcp_free);
	G.pfd = calloc(npfd, sizeof *G.pfd);
	G.pkind = calloc(npfd, sizeof *G.pkind);
	G.pidx = calloc(npfd, sizeof *G.pidx);
	if (q_init(cfg->max_queries) < 0 || G.conn == NULL || G.tcp == NULL ||
	    G.tcprx == NULL || G.tcp_live == NULL || G.tcp_free == NULL ||
	    G.pfd == NULL || G.pkind == NULL || G.pidx == NULL)
		fatal(1, "out of memory for %d queries, %d connections and %d "
		    "TCP clients", cfg->max_queries, G.nconn, cfg->max_tcp);
	for (i = 0; i < G.nconn; i++) {
		struct conn *c = &G.conn[i];

		c->up = i / cfg->max_conns;
		c->fd = -1;
		c->fl = (struct qlist)QLIST_ZERO;
		c->late = (struct qlist)QLIST_ZERO;
		tls_setup(c);
		if (br_ssl_engine_last_error(&c->cc.eng) != BR_ERR_OK)
			fatal(1, "TLS setup failed\ttls_error=%d",
			    br_ssl_engine_last_error(&c->cc.eng));
	}
}

/* The engine without its listeners: trust anchors, tables and the
 * answer cache. The engine test (tests/engine.c) starts here. */
static void
setup_core(void)
{
	setup_anchors();
	setup_tables();
	if (!G.cfg.no_cache && cache_init((size_t)G.cfg.cache_size) < 0)
		fatal(1, "cannot reserve %d bytes for the answer cache: %s "
		    "(lower --cache-size, or --no-cache)", G.cfg.cache_size,
		    strerror(errno));
}

/* Why a listen address could not be opened, in the user's words. */
static const char *
listen_hint(int err)
{
	if (err == EACCES)
		return " (ports below 1024 need root or CAP_NET_BIND_SERVICE; "
		    "or listen on a high port, e.g. -l 127.0.0.1:5353)";
	if (err == EADDRINUSE)
		return " (another DNS server is running there; stop it or "
		    "choose another -l address)";
	return "";
}

/* The listeners; an IPv6 address is skipped on a machine without IPv6
 * when there are others. Exits when one cannot be opened. */
static void
setup_listeners(void)
{
	const char *what;
	int	 i;

	for (i = 0; i < G.cfg.nlisten; i++) {
		const struct sockaddr_text *a = &G.cfg.listen[i];

		if (listen_open(a, &G.lst[G.nlisten], &what) == 0) {
			G.nlisten++;
			continue;
		}
		if (a->u.sa.sa_family == AF_INET6 && (errno == EAFNOSUPPORT ||
		    errno == EADDRNOTAVAIL) && G.cfg.nlisten > 1) {
			log_errno(LVL_WARN, "IPv6 is not available here, "
			    "skipping that listen address\tlisten=%s",
			    a->text);
			continue;
		}
		fatal(1, "cannot %s %s: %s%s", what, a->text, strerror(errno),
		    listen_hint(errno));
	}
	if (G.nlisten == 0)
		fatal(1, "cannot open any listen address");
}

/* The --metrics listener, if set. Exits when it cannot be opened. */
static void
setup_metrics(void)
{
	const struct sockaddr_text *a = &G.cfg.metrics;
	int	 one = 1, v6only = listen_v6only(a);

	G.statm_fd = G.fddir_fd = -1;
	if (!G.cfg.have_metrics)
		return;
	G.statm_fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
	G.fddir_fd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	G.http_fd = socket(a->u.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, 0);
	if (G.http_fd < 0)
		fatal(1, "cannot open --metrics %s: %s", a->text,
		    strerror(errno));
	(void)setsockopt(G.http_fd, SOL_SOCKET, SO_REUSEADDR, &one,
	    sizeof one);
	if (a->u.sa.sa_family == AF_INET6)
		(void)setsockopt(G.http_fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only,
		    sizeof v6only);
	if (bind(G.http_fd, &a->u.sa, a->len) < 0 ||
	    listen(G.http_fd, 16) < 0)
		fatal(1, "cannot listen on --metrics %s: %s%s", a->text,
		    strerror(errno), listen_hint(errno));
}

/* Sets up everything from the options; exits on a start-up error. */
static void
setup(void)
{
	G.started_at = (int64_t)time(NULL);
	setup_core();
	fd_limit_raise(G.nconn + DOTP_DGRAM_SOCKS + DOTP_HTTP_MAX +
	    G.cfg.max_tcp + 2 * G.cfg.nlisten + 16);
	/* Held in reserve for accept() under EMFILE (tcp_shed). */
	G.spare_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	setup_listeners();
	setup_metrics();
}

/* Appends zone z's servers to buf (at *at), as given: "," between. */
static void
log_servers(char *buf, size_t len, size_t *at, const struct zone *z)
{
	int	 i;

	for (i = z->first; i < z->first + z->n && *at < len; i++)
		*at += (size_t)snprintf(buf + *at, len - *at, "%s%s%s%s%s",
		    i > z->first ? "," : "", G.up[i].plain ? "dns://" : "",
		    G.up[i].label, G.up[i].plain ? "" : "#", G.up[i].name);
}

/*
 * --user: after everything that needs privilege (port 53, the trust
 * anchors, the cache's memory), dotp becomes uid:gid with gid its only
 * group, and checks that it cannot become root again. As root without
 * --user, one warning. Exits 1 when a step fails.
 */
static void
setup_user(void)
{
	const struct config *cfg = &G.cfg;

	if (!cfg->have_user) {
		if (geteuid() == 0)
			log_msg(LVL_WARN, "running as root: --user would drop "
			    "privileges once the sockets are bound");
		return;
	}
	if (setgroups(1, &cfg->gid) < 0 || setgid(cfg->gid) < 0 ||
	    setuid(cfg->uid) < 0)
		fatal(1, "cannot become uid %u gid %u: %s (--user needs root, "
		    "or CAP_SETUID and CAP_SETGID)", (unsigned)cfg->uid,
		    (unsigned)cfg->gid, strerror(errno));
	if (getuid() != cfg->uid || geteuid() != cfg->uid ||
	    getgid() != cfg->gid || getegid() != cfg->gid || setuid(0) == 0)
		fatal(1, "dropping privileges did not hold: uid %u gid %u",
		    (unsigned)geteuid(), (unsigned)getegid());
	log_msg(LVL_INFO, "privileges dropped\tuid=%u gid=%u",
	    (unsigned)cfg->uid, (unsigned)cfg->gid);
}

/*
 * The sandbox: once started (sockets bound, anchors loaded, --user
 * applied), dotp needs no file, no program and no new kind of socket.
 * PR_SET_NO_NEW_PRIVS, then a seccomp filter that allows the system
 * calls below and kills the process on any other (SIGSYS), so a bug
 * that slipped past the fuzzers cannot open a file, run a program or
 * reach anything but the network. The list is the loop's: every call
 * made after sandbox_enter(), with why. Three are held further by their
 * arguments: socket() to AF_INET and AF_INET6, mmap() and mprotect() to
 * memory that is not executable. The filter checks the architecture
 * first (a call of a 32-bit ABI is killed), and x32 calls carry numbers
 * that match none of these.
 */
static const uint16_t sandbox_calls[] = {
#ifdef __NR_poll
	__NR_poll,		/* the loop's wait (x86-64) */
#endif
	__NR_ppoll,		/* the loop's wait (poll() on aarch64) */
	__NR_read,		/* TCP clients, HTTP requests */
	__NR_write,		/* log lines; TCP answers; HTTP responses */
	__NR_writev,		/* log lines (stdio) */
	__NR_recvfrom,		/* TLS and plain TCP upstreams, UDP clients */
	__NR_sendto,		/* the same, outbound */
	__NR_recvmsg,		/* UDP clients (address and interface) */
	__NR_sendmsg,		/* UDP answers from the address asked */
	__NR_recvmmsg,		/* plain DNS answers, a batch per call */
	__NR_sendmmsg,		/* UDP answers and plain queries, batched */
	__NR_socket,		/* upstream connections, plain DNS sockets
				   (and see sandbox_enter) */
	__NR_connect,		/* upstream connections */
	__NR_accept4,		/* TCP clients, --metrics clients */
	__NR_getsockopt,	/* SO_ERROR of a connect */
	__NR_setsockopt,	/* TCP_NODELAY, buffers, on new sockets */
	__NR_getpeername,	/* a TCP client's address (--allow) */
	__NR_getsockname,	/* the address a socket got */
	__NR_shutdown,		/* an HTTP response's end */
	__NR_fcntl,		/* O_NONBLOCK on accepted sockets */
	__NR_close,		/* every descriptor's end */
	__NR_getrandom,		/* TLS seeds, query IDs, ports */
	__NR_clock_gettime,	/* the clock, when the vDSO is not used */
	__NR_gettimeofday,	/* the same */
	__NR_pread64,		/* /proc/self/statm, opened before */
	__NR_lseek,		/* /proc/self/fd, opened before, rewound */
	__NR_getdents64,	/* /proc/self/fd: process_open_fds */
	__NR_brk,		/* malloc */
	__NR_mmap,		/* malloc (and see sandbox_enter) */
	__NR_mprotect,		/* malloc, when brk cannot grow (likewise) */
	__NR_munmap,		/* free */
	__NR_mremap,		/* realloc */
	__NR_madvise,		/* free */
	__NR_rt_sigreturn,	/* the end of the SIGTERM handler */
	__NR_restart_syscall,	/* poll() resumed after SIGSTOP/SIGCONT */
	__NR_rt_sigprocmask,	/* libc around signals */
	__NR_exit_group,	/* exit */
	__NR_exit,		/* the same */
#ifdef __SANITIZE_ADDRESS__	/* the test build: AddressSanitizer's own */
	__NR_sigaltstack,	/* its _exit() and its fault handler */
#endif
};

/* seccomp and BPF, as the kernel ABI fixes them (musl ships no
 * <linux/seccomp.h>): struct seccomp_data has nr at 0, arch at 4 and
 * the arguments from 16. */
#define SB_LD_W		0x20	/* BPF_LD | BPF_W | BPF_ABS */
#define SB_JEQ		0x15	/* BPF_JMP | BPF_JEQ | BPF_K */
#define SB_JSET		0x45	/* BPF_JMP | BPF_JSET | BPF_K */
#define SB_RET		0x06	/* BPF_RET | BPF_K */
#define SB_ALLOW	0x7fff0000U	/* SECCOMP_RET_ALLOW */
#define SB_KILL		0x80000000U	/* SECCOMP_RET_KILL_PROCESS */
#if defined(__x86_64__)
#define SB_ARCH		0xc000003eU	/* AUDIT_ARCH_X86_64 */
#elif defined(__aarch64__)
#define SB_ARCH		0xc00000b7U	/* AUDIT_ARCH_AARCH64 */
#endif
#define SB_NCALLS	(sizeof sandbox_calls / sizeof sandbox_calls[0])
#define SB_MAX		(2 * SB_NCALLS + 16)
#define SB_ARG(k)	(16 + 8 * (k))	/* its low half (little-endian) */
_Static_assert(2 * SB_NCALLS + 6 < 256, "BPF jumps are 8 bits");

struct sb_insn {
	uint16_t code;
	uint8_t	 jt, jf;
	uint32_t k;
};

/* Appends one instruction to p (*n used). */
static void
sb_put(struct sb_insn *p, size_t *n, uint16_t code, uint8_t jt, uint8_t jf,
    uint32_t k)
{
	p[*n].code = code;
	p[*n].jt = jt;
	p[*n].jf = jf;
	p[*n].k = k;
	(*n)++;
}

/*
 * Enters the sandbox. Returns 0, or -1 with errno (no seccomp in this
 * kernel, or an architecture without a list here).
 */
static int
sandbox_enter(void)
{
#ifdef SB_ARCH
	struct sb_insn p[SB_MAX];
	struct { unsigned short len; struct sb_insn *filter; } prog;
	size_t	 n = 0, k;

	/* 0: the architecture; 3: the number, to the argument checks
	 * or the list (2N, in pairs); past it: kill. */
	sb_put(p, &n, SB_LD_W, 0, 0, 4);
	sb_put(p, &n, SB_JEQ, 1, 0, SB_ARCH);
	sb_put(p, &n, SB_RET, 0, 0, SB_KILL);
	sb_put(p, &n, SB_LD_W, 0, 0, 0);
	sb_put(p, &n, SB_JEQ, 2 * SB_NCALLS + 3, 0, __NR_socket);	/* S */
	sb_put(p, &n, SB_JEQ, 2 * SB_NCALLS + 6, 0, __NR_mmap);	/* X */
	sb_put(p, &n, SB_JEQ, 2 * SB_NCALLS + 5, 0, __NR_mprotect);	/* X */
	for (k = 0; k < SB_NCALLS; k++) {
		sb_put(p, &n, SB_JEQ, 0, 1, sandbox_calls[k]);
		sb_put(p, &n, SB_RET, 0, 0, SB_ALLOW);
	}
	sb_put(p, &n, SB_RET, 0, 0, SB_KILL);
	sb_put(p, &n, SB_LD_W, 0, 0, SB_ARG(0));	/* S: socket(domain) */
	sb_put(p, &n, SB_JEQ, 5, 0, AF_INET);		/* to A */
	sb_put(p, &n, SB_JEQ, 4, 0, AF_INET6);		/* to A */
	sb_put(p, &n, SB_RET, 0, 0, SB_KILL);
	sb_put(p, &n, SB_LD_W, 0, 0, SB_ARG(2));	/* X: prot */
	sb_put(p, &n, SB_JSET, 0, 1, PROT_EXEC);
	sb_put(p, &n, SB_RET, 0, 0, SB_KILL);
	sb_put(p, &n, SB_RET, 0, 0, SB_ALLOW);		/* A */
	prog.len = (unsigned short)n;
	prog.filter = p;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return -1;
	return prctl(PR_SET_SECCOMP, 2, &prog, 0, 0);	/* MODE_FILTER */
#else
	errno = ENOSYS;
	return -1;
#endif
}

/* The sandbox, unless --no-sandbox; exits 1 when it cannot be had. */
static void
setup_sandbox(void)
{
	if (G.cfg.no_sandbox)
		return;
	if (sandbox_enter() < 0)
		fatal(1, "cannot enter the seccomp sandbox: %s (a kernel "
		    "without seccomp, or an architecture dotp has no list "
		    "for: run with --no-sandbox)", strerror(errno));
}

/* The start line: what runs, where, trusting what; every zone with its
 * servers, and whether they are reached encrypted. */
static void
log_start(void)
{
	static char ls[DOTP_MAX_LISTEN * 50], us[DOTP_MAX_ZONE_SERVERS * 330];
	static char zs[(1 + DOTP_MAX_ZONES) * 300 + DOTP_MAX_UPSTREAMS * 330];
	size_t	 a = 0, b = 0, c = 0;
	int	 i, k;

	ls[0] = zs[0] = '\0';
	for (i = 0; i < G.nlisten; i++)
		a += (size_t)snprintf(ls + a, sizeof ls - a, "%s%s",
		    i ? "," : "", G.lst[i].label);
	log_servers(us, sizeof us, &b, &G.zone[0]);
	for (k = 1; k <= G.nzone && c < sizeof zs; k++) {
		const struct zone *z = &G.zone[k % G.nzone];	/* "." last */

		c += (size_t)snprintf(zs + c, sizeof zs - c, "%s%s=",
		    k > 1 ? "; " : "", z->text);
		log_servers(zs, sizeof zs, &c, z);
		if (c < sizeof zs)
			c += (size_t)snprintf(zs + c, sizeof zs - c, " (%s)",
			    z->plain ? "plain, unencrypted" : "tls");
	}
	log_msg(LVL_INFO, "dotp listening\tversion=%s listen=%s upstreams=%s "
	    "zones=\"%s\" anchors=%zu source=%s timeout_ms=%d sandbox=%s",
	    DOTP_VERSION, ls, us, zs, G.ntas, G.cfg.ca_file ? G.cfg.ca_file :
	    "embedded", G.cfg.timeout_ms, G.cfg.no_sandbox ? "off" :
	    "seccomp");
}

/* The exit lines: one per upstream with its stats, then the process's
 * counters with the sums of the upstreams' STAT_TOTAL ones. */
static void
stats_log(void)
{
	char	 line[640];
	unsigned long sum[UCTR_N];
	size_t	 at;
	int	 i, k;

	memset(sum, 0, sizeof sum);
	for (i = 0; i < G.nup; i++) {
		at = 0;
		line[0] = '\0';
		for (k = 0; k < UCTR_N; k++) {
			sum[k] += up_stat(&G.up[i], k);
			stat_append(line, sizeof line, &at, up_stat_defs[k].name,
			    up_stat(&G.up[i], k));
		}
		log_msg(LVL_INFO, "upstream summary\tupstream=%s%s",
		    G.up[i].label, line);
	}
	at = 0;
	line[0] = '\0';
	for (k = 0; k < CTR_N; k++)
		stat_append(line, sizeof line, &at, stat_defs[k].name,
		    stat_value(k));
	for (k = 0; k < UCTR_N; k++)
		if (up_stat_defs[k].kind == STAT_TOTAL)
			stat_append(line, sizeof line, &at,
			    up_stat_defs[k].name, sum[k]);
	log_msg(LVL_INFO, "dotp exiting\t%s", line + 1);
}

/* Ends cleanly after the drain: SERVFAIL to what is still waiting,
 * close_notify to ready connections, answers written, sockets closed. */
static void
shutdown_all(void)
{
	int64_t	 now = now_ms();
	int	 i;

	while ((i = G.age.head) >= 0) {
		q_unlink(i);
		q_servfail(i, now, CTR_SERVFAIL_EXIT);
	}
	for (i = 0; i < G.nconn; i++) {
		struct conn *c = &G.conn[i];

		if (c->state == C_READY)	/* best effort close_notify */
			conn_close(c, "exiting", now);
		fd_close(&c->fd);
	}
	udp_flush();
	while (G.ntcp > 0) {
		struct tcpclient *c = &G.tcp[G.tcp_live[0]];

		(void)tcp_flush(c);
		tcp_close(c);
	}
	for (i = 0; i < G.nlisten; i++) {
		fd_close(&G.lst[i].udp);
		fd_close(&G.lst[i].tcp);
	}
	stats_log();
}

#ifndef DOTP_NO_MAIN
/*
 * `dotp healthcheck [options]`: for HEALTHCHECK and exec probes in a
 * scratch image, with the daemon's options and environment. It asks the
 * instance they describe: GET /ready on --metrics when set; else a DNS
 * query of opcode STATUS to the first listen address, which dotp
 * answers itself (NOTIMP) without sending anything upstream: alive, the
 * most it can tell without metrics. Exits 0 or 1, with one line, within
 * DOTP_HEALTH_MS.
 */

/* A wildcard address becomes loopback: the probe stays on this host. */
static void
health_addr(struct sockaddr_text *a)
{
	if (a->u.sa.sa_family == AF_INET6 &&
	    IN6_IS_ADDR_UNSPECIFIED(&a->u.sin6.sin6_addr))
		a->u.sin6.sin6_addr = in6addr_loopback;
	else if (a->u.sa.sa_family == AF_INET &&
	    a->u.sin.sin_addr.s_addr == htonl(INADDR_ANY))
		a->u.sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
}

/* Waits until fd has event ev, or until (ms). Returns 1, or 0. */
static int
health_wait(int fd, short ev, int64_t until)
{
	struct pollfd p;
	int64_t	 left;

	p.fd = fd;
	p.events = ev;
	while ((left = until - now_ms()) > 0)
		if (poll(&p, 1, (int)left) > 0)
			return (p.revents & ev) != 0;
	return 0;
}

/* GET /ready from --metrics a. Returns NULL when ready, else why (in
 * why, len bytes). */
static const char *
health_http(const struct sockaddr_text *a, int64_t until, char *why,
    size_t len)
{
	static const char req[] = "GET /ready HTTP/1.0\r\n\r\n";
	char	 buf[512], *body;
	size_t	 have = 0;
	ssize_t	 n;
	int	 fd, code = 0, err = 0;
	socklen_t sl = sizeof err;

	fd = socket(a->u.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, 0);
	if (fd < 0 || (connect(fd, &a->u.sa, a->len) < 0 &&
	    errno != EINPROGRESS) || !health_wait(fd, POLLOUT, until) ||
	    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0 || err ||
	    send(fd, req, sizeof req - 1, MSG_NOSIGNAL) < 0) {
		snprintf(why, len, "cannot reach --metrics: %s", strerror(err ?
		    err : errno ? errno : ETIMEDOUT));
		goto out;
	}
	while (have < sizeof buf - 1 && health_wait(fd, POLLIN, until) &&
	    (n = recv(fd, buf + have, sizeof buf - 1 - have, 0)) > 0)
		have += (size_t)n;
	buf[have] = '\0';
	if (have < 12 || strncmp(buf, "HTTP/1.", 7) != 0) {
		snprintf(why, len, "no answer from --metrics within %d ms",
		    DOTP_HEALTH_MS);
		goto out;
	}
	code = (int)strtol(buf + 9, NULL, 10);
	body = http_head_ends(buf, have) ? buf + http_head_ends(buf, have) :
	    buf + have;		/* no end of the head: no body */
	body[strcspn(body, "\r\n")] = '\0';
	snprintf(why, len, "%.200s", body);
out:
	if (fd >= 0)
		close(fd);
	return code == 200 ? NULL : why;
}

/* A STATUS query to listen address a. Returns NULL when dotp answered,
 * else why. */
static const char *
health_dns(const struct sockaddr_text *a, int64_t until, char *why,
    size_t len)
{
	unsigned char q[DNS_HEADER_LEN + 5], r[DNS_UDP_MIN];
	ssize_t	 n = 0;
	int	 fd;

	memset(q, 0, sizeof q);
	if (fill_random(q, 2) < 0)
		q[0] = 1;
	q[DNS_OFF_FLAGS] = 2 << 3;	/* opcode STATUS */
	wr16(q + DNS_OFF_QDCOUNT, 1);
	wr16(q + DNS_HEADER_LEN + 1, 1);	/* ". A IN" */
	wr16(q + DNS_HEADER_LEN + 3, 1);
	fd = socket(a->u.sa.sa_family, SOCK_DGRAM | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, 0);
	if (fd >= 0 && sendto(fd, q, sizeof q, 0, &a->u.sa, a->len) ==
	    (ssize_t)sizeof q && health_wait(fd, POLLIN, until))
		n = recv(fd, r, sizeof r, 0);
	if (fd >= 0)
		close(fd);
	if (n >= DNS_HEADER_LEN && memcmp(r, q, 2) == 0)
		return NULL;
	snprintf(why, len, "no answer from dotp on %s within %d ms", a->text,
	    DOTP_HEALTH_MS);
	return why;
}

static int
healthcheck(int argc, char *argv[])
{
	struct sockaddr_text a;
	char	 why[300];
	const char *w;
	int64_t	 until = now_ms() + DOTP_HEALTH_MS;

	cfg_parse(&G.cfg, argc, argv);
	log_verbosity = G.cfg.verbosity;
	a = G.cfg.have_metrics ? G.cfg.metrics : G.cfg.listen[0];
	health_addr(&a);
	addr_text(&a.u.sa, a.text, sizeof a.text);
	w = G.cfg.have_metrics ? health_http(&a, until, why, sizeof why) :
	    health_dns(&a, until, why, sizeof why);
	if (w != NULL) {
		log_msg(LVL_ERROR, "not ready: %s\tprobe=%s", w, a.text);
		return 1;
	}
	log_msg(LVL_INFO, "%s\tprobe=%s", G.cfg.have_metrics ? "ready" :
	    "alive: dotp answers there (without --metrics, readiness is "
	    "not known)", a.text);
	return 0;
}

int
main(int argc, char *argv[])
{
	struct sigaction sa;

	if (argc > 1 && strcmp(argv[1], "healthcheck") == 0)
		return healthcheck(argc - 1, argv + 1);
	cfg_parse(&G.cfg, argc, argv);
	log_verbosity = G.cfg.verbosity;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	setup();
	setup_user();
	log_start();
	setup_sandbox();
	loop_run();
	shutdown_all();
	return 0;
}
#endif /* DOTP_NO_MAIN */
