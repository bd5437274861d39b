"""faultdot: a scriptable, fault-injecting DNS-over-TLS server that runs in
threads inside the pytest process, plus the client-side load driver and
process probes the fault/fail-over/shutdown tests share.

Server
------
    srv = FaultDoT(cert, key, port, behaviours=["close_after:5", "normal"])
    ...
    srv.set_behaviours(["silent"])     # applies to connections accepted later
    srv.stop(); srv.start()            # port closed (connect refused) / open again
    srv.close()                        # at teardown: listener, connections, threads

TLS 1.2 only (what dotp's BearSSL speaks; it also makes resumption use the
session-ID cache, which `session_reused` reports), no session tickets.
The TLS record layer runs over memory BIOs, so the server decides byte by
byte what reaches the socket: half an answer frame, a close_notify alert,
a bare FIN or an RST.

Every A query (any name) is answered with one A record derived from the
qname (expected_a(qname)), TTL = the server's `tag`, question and ID echoed,
so a client can tell the right answer, and which server gave it. Other
types get NOERROR/NODATA. Frames are read pipelined (2-byte length).

Connection i (0-based, in accept order) uses behaviours[i]; the last one
repeats for all later connections. Behaviours:

    normal               answer each query at once
    reorder:N            collect N queries, answer them in reverse order;
                         a partial batch is flushed 50 ms after its first query
    delay:MS             answer each query MS ms after it arrived
    close_after:K        answer K queries, then close_notify + FIN (queries
                         beyond the K-th are read and ignored); K=0: close at
                         the first query
    fin_after:K          the same without close_notify (bare TCP FIN)
    reset_after:K        the same with an RST (SO_LINGER 0)
    mid_frame:K          answer K queries, then write the first half of the
                         next answer's frame and close (FIN, no close_notify)
    no_handshake         accept TCP, never speak TLS, keep it open
    silent               handshake, read queries, never answer
    unknown_id           before each real answer send a well-formed answer
                         (same question) with a random ID not in flight
    idle_close_notify:MS nothing in flight for MS ms -> close_notify + FIN
    random               per query, with an RNG seeded from (seed, conn
                         index): normal / delay 0-100 ms / unknown_id /
                         close (close_notify) after 1-3 more answers / RST /
                         half a frame then FIN  (weights: RANDOM_WEIGHTS)
    wrong_question:KIND  before each real answer send an answer with the
                         query's ID (in flight) whose question is not the
                         query's (wrong_answer()); it carries one A record
                         WRONG_A, TTL WRONG_TTL, so that one delivered to a
                         client is seen. KIND:
                           name        another name of the same length
                                       (one letter changed, not its case)
                           type        QTYPE AAAA (A if the query was AAAA)
                           class       QCLASS CH (IN if the query was CH)
                           none        QDCOUNT 0, RCODE NOERROR (the A
                                       record then spells its owner out)
                           two         QDCOUNT 2: the query's question,
                                       then another (the 'name' one)
                           compressed  the query's labels, but ending in a
                                       compression pointer 0xC008 instead
                                       of the root byte: offset 8 is the
                                       high byte of NSCOUNT, always 0, so
                                       the pointer (backwards, as RFC 1035
                                       wants) names the root and the name
                                       decodes to exactly the asked one;
                                       still not the query's question bytes
                           type65      QTYPE with bit 0x20 flipped: a
                                       query of type 65 (HTTPS, low byte
                                       'A') gets 97 (low byte 'a'); only
                                       the name may compare without case
                           case        NOT wrong: the real answer itself,
                                       alone, with the question name's
                                       letters in the other case (0x20
                                       bit flipped); it must be accepted
                         Each wrong answer counts in wrong_sent /
                         ConnLog.wrong (case sends none).

Resumption caveat: OpenSSL drops a session from the server cache when the
connection ends without the server having sent close_notify, so after
fin_after / reset_after / mid_frame / no_handshake / a client that just
goes away, the next handshake is necessarily full; after close_after,
idle_close_notify or a client close_notify it can be resumed.

Counters (read them directly; they only grow): accepted, handshakes,
resumed, queries, answers, strays_sent, wrong_sent, plus self.conns
(ConnLog per connection; its closed_by says which side began the close)
and self.qlog (every query received: (time, conn, qname)).
self.rawq records every query exactly as it arrived: (conn, wire), the
DNS message without the 2-byte TCP length (its size is len(wire)).

Options (off by default, existing behaviour unchanged):
    edns=True    an answer carries an OPT record (payload 1232, DO bit
                 copied from the query, no options) when the query had one
    sized=True   a TXT query for a name whose first label is "size-N" is
                 answered NOERROR with one TXT record padded so that the
                 answer is exactly N bytes WITHOUT the OPT record (+11 with
                 it, see edns), N from qend + 13 to 65000; sized_query_name(N)
    answer=fn    a per-test answer builder, called once per parsed query as
                 it arrives (in the connection's thread): fn(query_wire)
                 returns None (the answer the behaviour would give anyway),
                 the answer's wire (bytes; its ID should be the query's), or
                 Reply(wire=None, delay_ms=0, drop=False): wire as above
                 (None: the usual answer), delay_ms added to when the
                 behaviour would answer (normal, delay, unknown_id,
                 wrong_question), drop=True: never answer this query. The
                 behaviour still decides everything else (strays, wrong
                 answers before the real one, closes). make_answer() and
                 RR build answers with any RCODE, TTLs and sections.
                 queries_for(name) counts the queries received for a name.
"""

import heapq
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
import zlib

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

TYPE_A = 1
CLASS_IN = 1

# Per query. A connection dies (close/reset/mid_frame) about once per 330
# queries, taking everything in flight on it along.
RANDOM_WEIGHTS = (
    ("normal", 88.7),
    ("delay", 10),
    ("unknown_id", 1),
    ("close", 0.1),
    ("reset", 0.1),
    ("mid_frame", 0.1),
)


def norm_name(name):
    return str(name).lower().rstrip(".")


def expected_a(name):
    """The A record faultdot gives for `name`: an address in 198.18.0.0/15
    (17 bits of a CRC of the lower-cased name)."""
    h = zlib.crc32(norm_name(name).encode("latin-1"))
    return "198.%d.%d.%d" % (18 + ((h >> 16) & 1), (h >> 8) & 255, h & 255)


def _a_bytes(name):
    return socket.inet_aton(expected_a(name))


def parse_question(wire):
    """(qid, qname, qtype, qclass, question_end) or None when the message is
    not a single-question query faultdot understands."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    if struct.unpack("!H", wire[4:6])[0] != 1:
        return None
    pos = 12
    labels = []
    while True:
        if pos >= len(wire):
            return None
        n = wire[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 or pos + 1 + n > len(wire):
            return None
        labels.append(wire[pos + 1:pos + 1 + n].decode("latin-1"))
        pos += 1 + n
    if pos + 4 > len(wire):
        return None
    qtype, qclass = struct.unpack("!HH", wire[pos:pos + 4])
    qid = struct.unpack("!H", wire[:2])[0]
    return qid, ".".join(labels).lower(), qtype, qclass, pos + 4


TYPE_TXT = 16
TYPE_OPT = 41


def query_opt(wire):
    """(payload, ttl field) of the query's OPT record, or None. Walks the
    question and the records after it (uncompressed or compressed names)."""
    p = parse_question(wire)
    if p is None:
        return None
    pos = p[4]
    n = sum(struct.unpack("!HHH", wire[6:12]))
    try:
        for _ in range(n):
            while True:
                b = wire[pos]
                if b == 0:
                    pos += 1
                    break
                if b & 0xC0 == 0xC0:
                    pos += 2
                    break
                pos += 1 + b
            rtype, cls, ttl, rdlen = struct.unpack("!HHIH", wire[pos:pos + 10])
            if rtype == TYPE_OPT:
                return cls, ttl
            pos += 10 + rdlen
    except (IndexError, struct.error):
        return None
    return None


def sized_target(qname):
    """N for a name whose first label is size-N, else None."""
    first = qname.split(".", 1)[0]
    if first.startswith("size-") and first[5:].isdigit():
        return int(first[5:])
    return None


def _txt_rdata(n):
    """TXT RDATA of exactly n >= 1 bytes (strings of up to 255 'x')."""
    out = b""
    while n >= 256:
        out += b"\xff" + b"x" * 255
        n -= 256
    if n:
        out += bytes([n - 1]) + b"x" * (n - 1)
    return out


def build_answer(query, tag, qid=None, edns=False, sized=False):
    """Answer wire for `query` (see module doc). qid overrides the ID."""
    p = parse_question(query)
    if p is None:
        return None
    pid, qname, qtype, qclass, qend = p
    if qid is None:
        qid = pid
    opt = query_opt(query) if edns else None
    target = sized_target(qname) if (sized and qtype == TYPE_TXT) else None
    if target is not None and not (qend + 13 <= target <= 65000):
        target = None
    an = 1 if ((qtype == TYPE_A and qclass == CLASS_IN) or target is not None) else 0
    hdr = struct.pack("!HBBHHHH", qid, 0x80 | (query[2] & 0x79), 0x80, 1, an, 0,
                      1 if opt else 0)
    out = hdr + query[12:qend]
    if target is not None:
        rd = _txt_rdata(target - len(out) - 12)
        out += struct.pack("!HHHIH", 0xC00C, TYPE_TXT, qclass, tag, len(rd)) + rd
    elif an:
        out += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, tag, 4) + _a_bytes(qname)
    if opt:
        # root name, OPT, payload 1232, ext-rcode 0, version 0, DO copied
        out += struct.pack("!BHHIH", 0, TYPE_OPT, 1232, opt[1] & 0x8000, 0)
    return out


TYPE_AAAA = 28
CLASS_CH = 3
WRONG_A = "192.0.2.66"      # the A record of every wrong_question answer
WRONG_TTL = 6666
WRONG_KINDS = ("name", "type", "class", "none", "two", "compressed", "type65")


def _other_letter(name_wire):
    """name_wire with its first letter replaced by another letter (not the
    same letter in the other case): same length, another name."""
    b = bytearray(name_wire)
    pos = 0
    while b[pos]:
        for i in range(pos + 1, pos + 1 + b[pos]):
            c = b[i]
            if chr(c).isalpha():
                lo = c | 0x20
                repl = ord("x") if lo != ord("x") else ord("y")
                b[i] = repl & ~0x20 if c & 0x20 == 0 else repl
                return bytes(b)
        pos += 1 + b[pos]
    # no letter at all: change the first label's first byte
    b[1] = ord("x") if b[1] != ord("x") else ord("y")
    return bytes(b)


def _swap_case(name_wire):
    """name_wire with every ASCII letter's case changed (length bytes kept)."""
    b = bytearray(name_wire)
    pos = 0
    while b[pos]:
        for i in range(pos + 1, pos + 1 + b[pos]):
            if chr(b[i]).isalpha():
                b[i] ^= 0x20
        pos += 1 + b[pos]
    return bytes(b)


def wrong_answer(query, kind):
    """The wrong_question:KIND answer to `query` (see the module doc): ID
    and flags as build_answer gives them, a question that is not the
    query's, and one A record WRONG_A with TTL WRONG_TTL. None for 'case'
    (case_answer() is the real answer then) or a query faultdot does not
    parse."""
    p = parse_question(query)
    if p is None or kind == "case":
        return None
    qid, qname, qtype, qclass, qend = p
    qname_wire = query[12:qend - 4]
    flags = struct.pack("!BB", 0x80 | (query[2] & 0x79), 0x80)
    a_rr = struct.pack("!HHIH", TYPE_A, CLASS_IN, WRONG_TTL, 4) + \
        socket.inet_aton(WRONG_A)
    ptr = struct.pack("!H", 0xC00C)
    if kind == "name":
        qs = [_other_letter(qname_wire) + struct.pack("!HH", qtype, qclass)]
        owner = ptr
    elif kind == "type":
        qs = [qname_wire + struct.pack("!HH", TYPE_AAAA if qtype != TYPE_AAAA
                                       else TYPE_A, qclass)]
        owner = ptr
    elif kind == "class":
        qs = [qname_wire + struct.pack("!HH", qtype, CLASS_CH if qclass != CLASS_CH
                                       else CLASS_IN)]
        owner = ptr
    elif kind == "none":
        qs = []
        owner = qname_wire
    elif kind == "two":
        qs = [query[12:qend],
              _other_letter(qname_wire) + struct.pack("!HH", qtype, qclass)]
        owner = ptr
    elif kind == "compressed":
        # labels as asked, then a pointer to offset 8 (NSCOUNT's high
        # byte, 0: the root) where the root byte would be
        qs = [qname_wire[:-1] + struct.pack("!H", 0xC008) +
              struct.pack("!HH", qtype, qclass)]
        owner = ptr
    elif kind == "type65":
        qs = [qname_wire + struct.pack("!HH", qtype ^ 0x0020, qclass)]
        owner = ptr
    else:
        raise ValueError("unknown wrong_question kind %r" % kind)
    hdr = struct.pack("!H", qid) + flags + struct.pack("!HHHH", len(qs), 1, 0, 0)
    return hdr + b"".join(qs) + owner + a_rr


def case_answer(query, tag, edns=False, sized=False):
    """build_answer() with the question name's letters in the other case."""
    a = build_answer(query, tag, edns=edns, sized=sized)
    p = parse_question(query)
    if a is None or p is None:
        return a
    qend = p[4]
    return a[:12] + _swap_case(a[12:qend - 4]) + a[qend - 4:]


def sized_query_name(n, zone="example.test", tag=""):
    """A name faultdot (sized=True) answers, for TXT, with exactly n bytes
    (without OPT)."""
    return "size-%d.%s%s" % (n, tag + "." if tag else "", zone)


# --------------------------------------------------------------------------
# answers built by a test (FaultDoT's answer= hook)
# --------------------------------------------------------------------------

class Reply:
    """What an answer hook may return: the answer's wire (None: the one the
    behaviour gives), an extra delay in ms, or drop=True (never answered)."""
    __slots__ = ("wire", "delay_ms", "drop")

    def __init__(self, wire=None, delay_ms=0, drop=False):
        self.wire, self.delay_ms, self.drop = wire, delay_ms, drop

    def __repr__(self):
        return "Reply(%s, delay_ms=%s, drop=%s)" % (
            None if self.wire is None else "<%d bytes>" % len(self.wire),
            self.delay_ms, self.drop)


_NO_REPLY = Reply()

TYPE_NS = 2
TYPE_SOA = 6
RCODE_NOERROR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 2, 3, 5


def name_wire(name):
    """A name in wire form, letters as given (no compression)."""
    out = b""
    for label in str(name).rstrip(".").split("."):
        if label:
            b = label.encode("latin-1")
            out += bytes([len(b)]) + b
    return out + b"\x00"


class RR:
    """One resource record for make_answer(): owner None means the
    question's name (a compression pointer to offset 12), else a name
    (str, written uncompressed, letters as given) or raw wire (bytes)."""
    __slots__ = ("rtype", "ttl", "rdata", "owner", "rclass")

    def __init__(self, rtype, ttl, rdata, owner=None, rclass=CLASS_IN):
        self.rtype, self.ttl, self.rdata = rtype, ttl, rdata
        self.owner, self.rclass = owner, rclass

    def wire(self):
        if self.owner is None:
            own = struct.pack("!H", 0xC00C)
        elif isinstance(self.owner, bytes):
            own = self.owner
        else:
            own = name_wire(self.owner)
        return own + struct.pack("!HHIH", self.rtype, self.rclass, self.ttl,
                                 len(self.rdata)) + self.rdata


def a_rr(ttl, addr, owner=None):
    return RR(TYPE_A, ttl, socket.inet_aton(addr), owner)


def txt_rr(ttl, n, owner=None):
    """A TXT record whose RDATA is exactly n >= 1 bytes."""
    return RR(TYPE_TXT, ttl, _txt_rdata(n), owner)


def soa_rr(ttl, minimum, owner="example.test", serial=1, refresh=3600, retry=600,
           expire=86400):
    rd = (name_wire("ns.example.test") + name_wire("hostmaster.example.test")
          + struct.pack("!IIIII", serial, refresh, retry, expire, minimum))
    return RR(TYPE_SOA, ttl, rd, owner)


def make_answer(query, rcode=RCODE_NOERROR, answer=(), authority=(), additional=(),
                aa=True, opt="echo", tc=False):
    """An answer to `query` (its ID, RD and CD copied, QR set, RA set, AA
    as told), its question copied byte for byte, then the given RRs. opt:
    'echo' adds an OPT record (payload 1232, DO copied, no options) when
    the query has one; None never; or raw OPT RDATA bytes to send (when
    the query has an OPT)."""
    p = parse_question(query)
    if p is None:
        raise ValueError("make_answer: unparsable query %r" % query[:32])
    qid, _qname, _qtype, _qclass, qend = p
    qopt = query_opt(query)
    opt_wire = b""
    if qopt is not None and opt is not None:
        rd = b"" if opt == "echo" else opt
        opt_wire = struct.pack("!BHHIH", 0, TYPE_OPT, 1232, qopt[1] & 0x8000,
                               len(rd)) + rd
    f1 = 0x80 | (query[2] & 0x01) | (0x04 if aa else 0) | (0x02 if tc else 0)
    f2 = 0x80 | (query[3] & 0x10) | (rcode & 0x0F)
    hdr = struct.pack("!HBBHHHH", qid, f1, f2, 1, len(answer), len(authority),
                      len(additional) + (1 if opt_wire else 0))
    return (hdr + query[12:qend] + b"".join(r.wire() for r in answer)
            + b"".join(r.wire() for r in authority)
            + b"".join(r.wire() for r in additional) + opt_wire)


class ConnLog:
    """What happened on one accepted connection."""

    def __init__(self, index, behaviour, peer):
        self.index = index
        self.behaviour = behaviour
        self.peer = peer
        self.t_accept = time.monotonic()
        self.t_handshake = None     # monotonic time the handshake completed
        self.resumed = None
        self.cipher = None
        self.version = None
        self.queries = 0
        self.answers = 0
        self.strays = 0
        self.wrong = 0              # wrong_question answers sent
        self.max_inflight = 0       # most queries received and not yet answered
        self.t_first_query = None
        self.recv_order = []        # query IDs in the order they arrived
        self.send_order = []        # query IDs in the order they were answered
        self.end = None             # why it ended
        self.t_end = None
        self.closed_by = None       # who began the close: 'server' | 'client'
        self.t_close = None         # monotonic time the close began
        self.t_last = None          # last activity (handshake done, query
                                    # received, answer sent); kept at the close

    def __repr__(self):
        return ("<conn %d %s hs=%s resumed=%s q=%d a=%d max_inflight=%d strays=%d "
                "wrong=%d end=%s by=%s>"
                % (self.index, self.behaviour, self.t_handshake is not None,
                   self.resumed, self.queries, self.answers, self.max_inflight,
                   self.strays, self.wrong, self.end, self.closed_by))


class _Closed(Exception):
    pass


class FaultDoT:
    def __init__(self, cert, key, port, behaviours=("normal",), host="127.0.0.1",
                 tag=None, seed=1, start=True, edns=False, sized=False, answer=None):
        self.cert, self.key = str(cert), str(key)
        self.edns, self.sized = edns, sized
        self.answer_fn = answer
        self.host, self.port = host, port
        self.tag = tag if tag is not None else port
        self.seed = seed
        self.lock = threading.Lock()
        self.behaviours = list(behaviours)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.options |= ssl.OP_NO_TICKET     # session-ID resumption only
        self.ctx.load_cert_chain(self.cert, self.key)
        # counters
        self.accepted = 0
        self.handshakes = 0
        self.resumed = 0
        self.queries = 0
        self.answers = 0
        self.strays_sent = 0
        self.wrong_sent = 0         # wrong_question answers sent
        self.conns = []
        self.qlog = []
        self.rawq = []              # (conn index, query wire as received)
        self.errors = []            # unexpected exceptions in server threads
        self._ls = None
        self._running = False
        self._accept_t = None
        self._threads = []
        self._live = set()
        if start:
            self.start()

    # ---------------------------------------------------------- control
    def set_behaviours(self, behaviours):
        with self.lock:
            self.behaviours = list(behaviours)

    def _behaviour_for(self, index):
        with self.lock:
            b = self.behaviours
            return b[index] if index < len(b) else b[-1]

    def start(self):
        if self._running:
            return
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        ls = socket.socket(fam, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.host, self.port))
        ls.listen(256)
        self._ls = ls
        self._running = True
        self._accept_t = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="faultdot-accept-%d" % self.port)
        self._accept_t.start()

    def stop(self, how="fin"):
        """The server goes down: the port is closed (connects are refused)
        and every open connection is closed (how = 'fin' or 'rst')."""
        if not self._running:
            return
        self._running = False
        self._stop_how = how
        try:
            self._ls.close()
        except OSError:
            pass
        self._accept_t.join(5)
        for t in list(self._threads):
            t.join(5)
        self._threads = [t for t in self._threads if t.is_alive()]

    def close(self):
        self.stop()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def open_connections(self):
        with self.lock:
            return len(self._live)

    def snapshot(self):
        with self.lock:
            return dict(accepted=self.accepted, handshakes=self.handshakes,
                        resumed=self.resumed, queries=self.queries,
                        answers=self.answers, strays_sent=self.strays_sent,
                        wrong_sent=self.wrong_sent)

    def reset_counters(self):
        with self.lock:
            self.handshakes = self.resumed = self.queries = 0
            self.answers = self.strays_sent = self.wrong_sent = 0
            self.qlog = []
            self.rawq = []

    def queries_for(self, name):
        """How many queries for `name` (any case, any type) arrived so far."""
        n = norm_name(name)
        with self.lock:
            return sum(1 for _, _, q in self.qlog if q == n)

    def query_times(self, name):
        """The monotonic times the queries for `name` arrived."""
        n = norm_name(name)
        with self.lock:
            return [t for t, _, q in self.qlog if q == n]

    def _custom(self, q):
        """What the answer hook says for query q: a Reply."""
        if self.answer_fn is None:
            return _NO_REPLY
        r = self.answer_fn(q)
        if r is None:
            return _NO_REPLY
        if isinstance(r, (bytes, bytearray)):
            return Reply(bytes(r))
        if isinstance(r, Reply):
            return r
        raise TypeError("answer hook returned %r (want None, bytes or Reply)" % (r,))

    # ---------------------------------------------------------- threads
    def _accept_loop(self):
        ls = self._ls
        while self._running:
            try:
                r, _, _ = select.select([ls], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not r:
                continue
            try:
                c, peer = ls.accept()
            except OSError:
                continue
            with self.lock:
                idx = self.accepted
                self.accepted += 1
            log = ConnLog(idx, self._behaviour_for(idx), peer)
            with self.lock:
                self.conns.append(log)
            t = threading.Thread(target=self._conn_main, args=(c, log), daemon=True,
                                 name="faultdot-%d-conn-%d" % (self.port, idx))
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _conn_main(self, sock, log):
        with self.lock:
            self._live.add(log.index)
        try:
            _Conn(self, sock, log).run()
        except _Closed:
            pass
        except OSError as e:
            log.end = log.end or "socket error: %r" % (e,)
        except Exception as e:  # noqa: BLE001 - reported via self.errors
            log.end = log.end or "error: %r" % (e,)
            with self.lock:
                self.errors.append((log.index, repr(e)))
        finally:
            log.t_end = time.monotonic()
            try:
                if not self._running and getattr(self, "_stop_how", "fin") == "rst":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass
            with self.lock:
                self._live.discard(log.index)


class _Conn:
    TICK = 0.02

    def __init__(self, srv, sock, log):
        self.srv = srv
        self.sock = sock
        self.log = log
        sock.settimeout(5.0)
        spec = log.behaviour
        name, _, arg = spec.partition(":")
        self.mode = name
        self.warg = None
        if name == "wrong_question":
            if arg not in WRONG_KINDS + ("case",):
                raise ValueError("unknown behaviour %r" % spec)
            self.warg, arg = arg, ""
        self.arg = int(arg) if arg else None
        self.rng = random.Random(srv.seed * 1000003 + log.index)
        self.inbuf = b""
        self.heap = []          # (due, seq, kind, query_wire)
        self.seq = 0
        self.planned = 0        # answers scheduled
        self.inflight = set()   # IDs received, not yet answered
        self.pre = {}           # ID -> answer wire from the answer hook
        self.batch = []
        self.batch_t = None
        self.last_activity = time.monotonic()
        self.close_at = None    # answers after which to close (close_notify)
        self.close_kind = None  # 'notify' | 'fin' | 'rst'
        self.closing = False

    # ---------------------------------------------------------- socket I/O
    def _flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _began_close(self, by):
        """Record who began the close (the first call wins)."""
        if self.log.closed_by is None:
            self.log.closed_by = by
            self.log.t_close = time.monotonic()

    def _recv(self, timeout):
        """Raw bytes from the socket, b'' on EOF, None on timeout."""
        if not self.srv._running:
            self._began_close("server")
            raise _Closed()
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return None
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""
        except socket.timeout:
            return None

    def _end(self, why):
        self.log.end = why
        raise _Closed()

    def _close_notify_fin(self):
        self._began_close("server")
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        try:
            self._flush()
        except OSError:
            pass
        self._fin_and_drain("close_notify+fin")

    def _fin_and_drain(self, why):
        self._began_close("server")
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # read (and ignore) until the peer closes too, so close() sends no RST
        end = time.monotonic() + 1.0
        while time.monotonic() < end and self.srv._running:
            try:
                r, _, _ = select.select([self.sock], [], [], self.TICK)
                if r and not self.sock.recv(65536):
                    break
            except OSError:
                break
        self._end(why)

    def _rst(self):
        self._began_close("server")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._end("rst")

    # ---------------------------------------------------------- main
    def run(self):
        if self.mode == "no_handshake":
            while True:
                d = self._recv(0.05)
                if d == b"":
                    self._began_close("client")
                    self._end("peer closed (no handshake)")
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = self.srv.ctx.wrap_bio(self.inc, self.out, server_side=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                self._flush()
                self._end("handshake failed: %s" % e)
            self._flush()
            if time.monotonic() > deadline:
                self._end("handshake timeout")
            d = self._recv(self.TICK)
            if d == b"":
                self._began_close("client")
                self._end("peer closed during handshake")
            if d:
                self.inc.write(d)
        self._flush()
        self.log.t_handshake = time.monotonic()
        self.log.resumed = bool(self.obj.session_reused)
        self.log.cipher = self.obj.cipher()
        self.log.version = self.obj.version()
        with self.srv.lock:
            self.srv.handshakes += 1
            if self.log.resumed:
                self.srv.resumed += 1
        self.last_activity = time.monotonic()
        self.log.t_last = self.last_activity
        # After an abbreviated (resumed) handshake the client's Finished and
        # its first queries can arrive in one segment: they are already in
        # the incoming BIO, and no more socket data may ever come for them.
        self._read_plain()
        while True:
            now = time.monotonic()
            self._send_due(now)
            self._check_timers(now)
            d = self._recv(self._next_timeout(time.monotonic()))
            if d is None:
                continue
            if d == b"":
                self._began_close("client")
                self._end("peer FIN")
            self.inc.write(d)
            self._read_plain()

    def _next_timeout(self, now):
        t = self.TICK
        if self.heap:
            t = min(t, self.heap[0][0] - now)
        return max(0.0, t)

    def _read_plain(self):
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                # the peer's close_notify: answer in kind and go
                self._began_close("client")
                self._close_notify_fin()
            except ssl.SSLError as e:
                self._end("TLS error: %s" % e)
            if not chunk:
                # SSLObject.read() returns b'' for the peer's close_notify
                self._began_close("client")
                self._close_notify_fin()
            self.inbuf += chunk
        self._flush()   # e.g. alerts
        while len(self.inbuf) >= 2:
            n = struct.unpack("!H", self.inbuf[:2])[0]
            if len(self.inbuf) < 2 + n:
                break
            q = self.inbuf[2:2 + n]
            self.inbuf = self.inbuf[2 + n:]
            self._on_query(q)

    # ---------------------------------------------------------- behaviours
    def _schedule(self, due, kind, q):
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, kind, q))
        self.planned += 1

    def _on_query(self, q):
        now = time.monotonic()
        self.last_activity = now
        self.log.t_last = self.last_activity
        p = parse_question(q)
        qid = struct.unpack("!H", q[:2])[0] if len(q) >= 2 else -1
        self.log.queries += 1
        if self.log.t_first_query is None:
            self.log.t_first_query = now
        self.log.recv_order.append(qid)
        with self.srv.lock:
            self.srv.queries += 1
            self.srv.qlog.append((now, self.log.index, p[1] if p else None))
            self.srv.rawq.append((self.log.index, bytes(q)))
        if p is None:
            return
        self.inflight.add(qid)
        self.log.max_inflight = max(self.log.max_inflight, len(self.inflight))
        m, a = self.mode, self.arg
        if self.closing:
            return
        custom = self.srv._custom(q)
        if custom.drop:
            return
        if custom.wire is not None:
            self.pre[qid] = custom.wire
        later = now + custom.delay_ms / 1000.0
        if m == "normal" or m == "idle_close_notify":
            self._schedule(later, "answer", q)
        elif m == "delay":
            self._schedule(later + a / 1000.0, "answer", q)
        elif m == "unknown_id":
            self._schedule(later, "stray+answer", q)
        elif m == "wrong_question":
            self._schedule(later, "case_answer" if self.warg == "case" else "wrong+answer", q)
        elif m == "reorder":
            if not self.batch:
                self.batch_t = now
            self.batch.append(q)
            if len(self.batch) >= a:
                self._flush_batch(now)
        elif m in ("close_after", "fin_after", "reset_after"):
            if self.planned < a:
                self._schedule(now, "answer", q)
            elif a == 0:
                self._do_close({"close_after": "notify", "fin_after": "fin",
                                "reset_after": "rst"}[m])
        elif m == "mid_frame":
            if self.planned < a:
                self._schedule(now, "answer", q)
            elif self.planned == a:
                self._schedule(now, "half", q)
        elif m == "silent":
            pass
        elif m == "random":
            self._random(now, q)
        else:
            raise ValueError("unknown behaviour %r" % self.log.behaviour)

    def _random(self, now, q):
        if self.close_at is not None:
            if self.planned < self.close_at:
                self._schedule(now, "answer", q)
            return
        r = self.rng.uniform(0, sum(w for _, w in RANDOM_WEIGHTS))
        for act, w in RANDOM_WEIGHTS:
            r -= w
            if r <= 0:
                break
        if act == "normal":
            self._schedule(now, "answer", q)
        elif act == "delay":
            self._schedule(now + self.rng.uniform(0, 0.1), "answer", q)
        elif act == "unknown_id":
            self._schedule(now, "stray+answer", q)
        elif act == "close":
            self._schedule(now, "answer", q)
            self.close_at = self.planned + self.rng.randint(0, 2)
            self.close_kind = "notify"
        elif act == "reset":
            self._do_close("rst")
        elif act == "mid_frame":
            self._write_half(q)

    def _flush_batch(self, now):
        for q in reversed(self.batch):
            self._schedule(now, "answer", q)
        self.batch = []
        self.batch_t = None

    def _check_timers(self, now):
        if self.batch and now - self.batch_t >= 0.05:
            self._flush_batch(now)
            self._send_due(now)
        if (self.mode == "idle_close_notify" and not self.heap and not self.inflight
                and now - self.last_activity >= self.arg / 1000.0):
            self._close_notify_fin()

    def _do_close(self, kind):
        self.closing = True
        if kind == "notify":
            self._close_notify_fin()
        elif kind == "fin":
            self._fin_and_drain("fin")
        else:
            self._rst()

    def _write_half(self, q):
        a = self.pre.pop(struct.unpack("!H", q[:2])[0], None) or \
            build_answer(q, self.srv.tag, edns=self.srv.edns, sized=self.srv.sized)
        frame = struct.pack("!H", len(a)) + a
        self.obj.write(frame[:len(frame) // 2])
        self._flush()
        self.closing = True
        self._fin_and_drain("mid_frame")

    def _send_due(self, now):
        wrote = False
        while self.heap and self.heap[0][0] <= now:
            _, _, kind, q = heapq.heappop(self.heap)
            if kind == "half":
                if wrote:
                    self._flush()
                self._write_half(q)
            qid = struct.unpack("!H", q[:2])[0]
            if kind == "stray+answer":
                sid = qid
                while sid == qid or sid in self.inflight:
                    sid = self.rng.randrange(65536)
                stray = build_answer(q, self.srv.tag, qid=sid, edns=self.srv.edns,
                                     sized=self.srv.sized)
                self.obj.write(struct.pack("!H", len(stray)) + stray)
                self.log.strays += 1
                with self.srv.lock:
                    self.srv.strays_sent += 1
            if kind == "wrong+answer":
                bad = wrong_answer(q, self.warg)
                self.obj.write(struct.pack("!H", len(bad)) + bad)
                self.log.wrong += 1
                with self.srv.lock:
                    self.srv.wrong_sent += 1
            a = self.pre.pop(qid, None)
            if a is not None:
                if kind == "case_answer":
                    a = a[:12] + _swap_case(a[12:])     # the question name comes first
            elif kind == "case_answer":
                a = case_answer(q, self.srv.tag, edns=self.srv.edns, sized=self.srv.sized)
            else:
                a = build_answer(q, self.srv.tag, edns=self.srv.edns, sized=self.srv.sized)
            self.obj.write(struct.pack("!H", len(a)) + a)
            wrote = True
            self.inflight.discard(qid)
            self.log.answers += 1
            self.log.send_order.append(qid)
            self.last_activity = now
            self.log.t_last = self.last_activity
            with self.srv.lock:
                self.srv.answers += 1
            if self.mode in ("close_after", "fin_after", "reset_after") \
                    and self.log.answers >= self.arg:
                self._flush()
                self._do_close({"close_after": "notify", "fin_after": "fin",
                                "reset_after": "rst"}[self.mode])
            if self.close_at is not None and self.log.answers >= self.close_at:
                self._flush()
                self._do_close(self.close_kind)
        if wrote:
            self._flush()


# ==========================================================================
# client side: load driver
# ==========================================================================

class Sent:
    __slots__ = ("client", "kind", "qid", "qname", "wire", "t_sent", "answers", "qtype")

    def __init__(self, client, kind, qid, qname, wire, t, qtype="A"):
        self.client, self.kind, self.qid, self.qname = client, kind, qid, qname
        self.wire, self.t_sent = wire, t
        self.qtype = qtype
        self.answers = []       # [(t, wire, arrival_seq)]

    def latency(self):
        return self.answers[0][0] - self.t_sent if self.answers else None


def make_a_query(qname, qid, qtype="A"):
    m = dns.message.make_query(qname, qtype, use_edns=False)
    m.id = qid
    return m.to_wire()


def faultdot_expect(qname):
    return {expected_a(qname)}


class LoadResult:
    def __init__(self, sent, unknown, tcp_closed, expect, elapsed):
        self.sent = sent                # list of Sent
        self.unknown = unknown          # [(client, kind, wire)] answers to IDs never asked
        self.tcp_closed = tcp_closed    # {client: time} TCP connections dotp closed
        self.expect = expect
        self.elapsed = elapsed
        self.ok, self.servfail, self.wrong = [], [], []
        self.missing = [s for s in sent if not s.answers]
        self.duplicates = [s for s in sent if len(s.answers) > 1]
        for s in sent:
            if not s.answers:
                continue
            verdict = self._judge(s, s.answers[0][1])
            if verdict == "ok":
                self.ok.append(s)
            elif verdict == "servfail":
                self.servfail.append(s)
            else:
                self.wrong.append((s, verdict))

    def _judge(self, s, wire):
        try:
            m = dns.message.from_wire(wire)
        except Exception as e:  # noqa: BLE001
            return "unparsable answer: %s" % e
        if m.id != s.qid:
            return "ID %d != %d" % (m.id, s.qid)
        if not (m.flags & dns.flags.QR):
            return "QR not set"
        qtype = dns.rdatatype.from_text(s.qtype)
        if len(m.question) != 1 or norm_name(m.question[0].name) != norm_name(s.qname) \
                or m.question[0].rdtype != qtype \
                or m.question[0].rdclass != dns.rdataclass.IN:
            return "question %s != %s %s" % ([str(x) for x in m.question], s.qname, s.qtype)
        rc = m.rcode()
        if rc == dns.rcode.SERVFAIL:
            return "servfail"
        if rc != dns.rcode.NOERROR:
            return "rcode %s" % dns.rcode.to_text(rc)
        got = set()
        for rr in m.answer:
            if rr.rdtype == dns.rdatatype.A and norm_name(rr.name) == norm_name(s.qname):
                got |= {r.address for r in rr}
        # faultdot answers A queries with expect(qname), others with NODATA
        want = self.expect(s.qname) if qtype == dns.rdatatype.A else set()
        if qtype != dns.rdatatype.A and m.answer:
            return "records %s, want none" % [str(x) for x in m.answer]
        if got != want:
            return "A %s, want %s" % (sorted(got), sorted(want))
        return "ok"

    @staticmethod
    def answered_by(wire):
        """TTL of the first answer record (faultdot's tag), or None."""
        m = dns.message.from_wire(wire)
        return m.answer[0].ttl if m.answer else None

    def summary(self):
        return ("%d queries in %.2fs: ok=%d servfail=%d wrong=%d missing=%d duplicate=%d "
                "unknown-id=%d tcp-closed=%d"
                % (len(self.sent), self.elapsed, len(self.ok), len(self.servfail),
                   len(self.wrong), len(self.missing), len(self.duplicates),
                   len(self.unknown), len(self.tcp_closed)))

    def problems(self, allow_servfail):
        p = []
        for s in self.missing[:10]:
            p.append("no answer: %s %s id=%d %s" % (s.kind, s.client, s.qid, s.qname))
        for s in self.duplicates[:10]:
            p.append("%d answers: %s %s id=%d %s" % (len(s.answers), s.kind, s.client,
                                                     s.qid, s.qname))
        for s, why in self.wrong[:10]:
            p.append("wrong answer: %s %s id=%d %s: %s" % (s.kind, s.client, s.qid,
                                                           s.qname, why))
        for c, k, w in self.unknown[:10]:
            p.append("answer for an ID never asked: %s %s %r" % (k, c, w[:16]))
        if not allow_servfail:
            for s in self.servfail[:10]:
                p.append("SERVFAIL: %s %s id=%d %s" % (s.kind, s.client, s.qid, s.qname))
        return p

    def check(self, allow_servfail=False, context=""):
        """AssertionError unless every query got exactly one answer, the
        right one (or SERVFAIL, if allowed)."""
        p = self.problems(allow_servfail)
        if (self.missing or self.duplicates or self.wrong or self.unknown
                or (self.servfail and not allow_servfail)):
            raise AssertionError("%s\n  %s\n%s" % (self.summary(), "\n  ".join(p),
                                                   context))


def run_load(host, port, qnames, n_udp=4, n_tcp=2, window=0, timeout=5.0, linger=0.3,
             expect=faultdot_expect, on_progress=None, tcp_first=False, rate=0,
             qtype="A"):
    """Send one query of `qtype` (A unless told; faultdot answers other
    types NODATA, and that is then what is expected) per name in `qnames`
    through dotp at host:port, spread round-robin over n_udp UDP sockets
    and n_tcp TCP connections (pipelined), keeping at most `window` queries unanswered (0: all at
    once) and, with rate > 0, sending at most `rate` queries a second. Collects every datagram/frame that comes back, until all are
    answered and `linger` more seconds passed (to catch second answers), or
    `timeout` seconds after the last query was sent. on_progress(n_sent,
    n_answered) is called as queries go out (the caller can act mid-load).
    Returns a LoadResult."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    clients = []  # (kind, sock)
    order = ["tcp"] * n_tcp + ["udp"] * n_udp if tcp_first else \
        ["udp"] * n_udp + ["tcp"] * n_tcp
    for kind in order:
        if kind == "udp":
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            s.connect((host, port))
            s.setblocking(False)
        else:
            s = socket.create_connection((host, port), timeout=5)
            s.setblocking(False)
        clients.append((kind, s))
    nc = len(clients)
    rng = random.Random(len(qnames) * 7919 + port)
    next_id = [rng.randrange(65536) for _ in range(nc)]
    inflight = {}   # (client, qid) -> Sent
    by_key = {}
    sent = []
    unknown = []
    tcp_closed = {}
    tcp_in = [b""] * nc
    tcp_out = [b""] * nc
    answered = 0
    t0 = time.monotonic()
    i = 0
    all_answered_at = None
    last_send = t0
    arrival = [0]   # global arrival sequence number of answers

    def take(ci, wire, t):
        nonlocal answered
        if len(wire) < 2:
            unknown.append((ci, clients[ci][0], wire))
            return
        qid = struct.unpack("!H", wire[:2])[0]
        s = by_key.get((ci, qid))
        if s is None:
            unknown.append((ci, clients[ci][0], wire))
            return
        if not s.answers:
            answered += 1
            inflight.pop((ci, qid), None)
        arrival[0] += 1
        s.answers.append((t, wire, arrival[0]))

    try:
        while True:
            now = time.monotonic()
            # send as the window allows
            while i < len(qnames) and (window <= 0 or len(inflight) < window) \
                    and (rate <= 0 or time.monotonic() - t0 >= i / rate):
                ci = i % nc
                kind, s = clients[ci]
                if kind == "tcp" and ci in tcp_closed:
                    # that TCP connection is gone: give the query to a UDP socket
                    ci = next((c for c in range(nc) if clients[c][0] == "udp"), ci)
                    kind, s = clients[ci]
                qid = next_id[ci]
                while (ci, qid) in by_key:
                    qid = (qid + 1) & 0xFFFF
                next_id[ci] = (qid + 1) & 0xFFFF
                w = make_a_query(qnames[i], qid, qtype)
                rec = Sent(ci, kind, qid, qnames[i], w, time.monotonic(), qtype)
                by_key[(ci, qid)] = rec
                inflight[(ci, qid)] = rec
                sent.append(rec)
                if kind == "udp":
                    try:
                        s.send(w)
                    except OSError:
                        pass    # counted missing
                else:
                    tcp_out[ci] += struct.pack("!H", len(w)) + w
                i += 1
                last_send = time.monotonic()
                if on_progress:
                    on_progress(i, answered)
            # write pending TCP output
            wl = [s for ci, (k, s) in enumerate(clients)
                  if k == "tcp" and tcp_out[ci] and ci not in tcp_closed]
            now = time.monotonic()
            if i >= len(qnames) and answered == len(sent):
                if all_answered_at is None:
                    all_answered_at = now
                if now - all_answered_at >= linger:
                    break
            if i >= len(qnames) and now - last_send > timeout:
                break
            rl = [s for ci, (k, s) in enumerate(clients) if ci not in tcp_closed]
            r, w_ok, _ = select.select(rl, wl, [], 0.01)
            for s in w_ok:
                ci = next(c for c in range(nc) if clients[c][1] is s)
                try:
                    n = s.send(tcp_out[ci])
                    tcp_out[ci] = tcp_out[ci][n:]
                except BlockingIOError:
                    pass
                except OSError:
                    tcp_closed[ci] = time.monotonic()
            for s in r:
                ci = next(c for c in range(nc) if clients[c][1] is s)
                kind = clients[ci][0]
                while True:
                    try:
                        data = s.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        data = b""
                        if kind == "udp":
                            break
                    t = time.monotonic()
                    if kind == "udp":
                        take(ci, data, t)
                        continue
                    if not data:
                        tcp_closed[ci] = t
                        break
                    tcp_in[ci] += data
                    while len(tcp_in[ci]) >= 2:
                        n = struct.unpack("!H", tcp_in[ci][:2])[0]
                        if len(tcp_in[ci]) < 2 + n:
                            break
                        take(ci, tcp_in[ci][2:2 + n], t)
                        tcp_in[ci] = tcp_in[ci][2 + n:]
    finally:
        for _, s in clients:
            s.close()
    return LoadResult(sent, unknown, tcp_closed, expect, time.monotonic() - t0)


def names(prefix, n, zone="example.test"):
    return ["%s-%d.%s" % (prefix, i, zone) for i in range(n)]


# ==========================================================================
# dotp process probes
# ==========================================================================

EXIT_COUNTERS = ("queries", "answers", "servfail", "dropped", "stray",
                 "handshakes_full", "handshakes_resumed", "table_full",
                 "tcp_refused", "udp_send_failed",
                 # answers with an ID in flight but another question, dropped
                 "mismatched",
                 # queries re-sent without using up a try, after the server
                 # closed a connection that had answered others
                 "recycled",
                 # what dotp learned of an upstream (when the exit line has it)
                 "learned_conn_queries", "learned_idle_ms",
                 # the answer cache (spec/cache.md)
                 "cache_hits", "cache_misses", "cache_coalesced", "cache_prefetches",
                 "cache_stale", "cache_evictions", "cache_entries", "cache_bytes")


def exit_counters(log):
    """The counters of dotp's 'dotp exiting ...' line, as a dict (only the
    ones present), or None when there is no such line."""
    for line in reversed(log.splitlines()):
        if "dotp exiting" in line:
            out = {}
            for tok in line.replace('"', " ").split():
                k, eq, v = tok.partition("=")
                if eq and k in EXIT_COUNTERS and v.isdigit():
                    out[k] = int(v)
            return out
    return None


def log_values(text, key):
    """Every integer value of `key=` in text (dotp's log), in order:
    log_values(log, 'learned_conn_queries') -> [3, 3]."""
    out = []
    for line in text.splitlines():
        for tok in line.replace('"', " ").split():
            k, eq, v = tok.partition("=")
            if eq and k == key and v.isdigit():
                out.append(int(v))
    return out


def proc_fds(pid):
    return os.listdir("/proc/%d/fd" % pid)


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


def _sock_inodes_to_remote_ports():
    out = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(f) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    remote, state, inode = parts[2], parts[3], parts[9]
                    out[inode] = (int(remote.rsplit(":", 1)[1], 16), state)
        except FileNotFoundError:
            pass
    return out


def fd_breakdown(pid, upstream_ports):
    """(total fds, fds that are TCP sockets to one of upstream_ports)."""
    fds = proc_fds(pid)
    inodes = _sock_inodes_to_remote_ports()
    up = 0
    for fd in fds:
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            ino = link[8:-1]
            rp = inodes.get(ino)
            if rp and rp[0] in upstream_ports:
                up += 1
    return len(fds), up


def settled_fds(pid, upstream_ports, want_other=None, settle=3.0):
    """fd_breakdown(pid, upstream_ports) once dotp is quiet: when the count
    of fds that are not upstream connections equals want_other (if given)
    and both counts stayed the same for 100 ms, or after `settle` seconds
    (then the last sample)."""
    end = time.monotonic() + settle
    prev = None
    while True:
        cur = fd_breakdown(pid, upstream_ports)
        if cur == prev and (want_other is None or cur[0] - cur[1] == want_other):
            return cur
        if time.monotonic() > end:
            return cur
        prev = cur
        time.sleep(0.1)


def dotp_args(**opts):
    """--key value flags from keyword args (attempt_timeout=300 ->
    ['--attempt-timeout', '300'])."""
    out = []
    for k, v in opts.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def start_dotp(dotp_factory, upstreams, extra=(), verbose=False, probe=False, env=None):
    """dotp_factory(...) with upstreams given as FaultDoT / Unbound objects,
    ports or spec strings. A dotp that rejects an option (exit status 2:
    not implemented yet) fails the test with a message saying so."""
    specs = []
    for u in upstreams:
        if isinstance(u, str):
            specs.append(u)
        elif hasattr(u, "tls_port"):
            specs.append(upstream_spec(u.tls_port))
        else:
            specs.append(upstream_spec(u))
    extra = list(extra) + (["-v"] if verbose else [])
    try:
        return dotp_factory(specs, extra=extra, probe=probe, env=env)
    except AssertionError as e:
        if "exited early with status 2" in str(e):
            import pytest
            pytest.fail("dotp rejected its arguments %s (option not implemented "
                        "yet?):\n%s" % (extra, str(e)[-1500:]), pytrace=False)
        raise


def stop_dotp(d, sig=None, timeout=5.0):
    """SIGTERM dotp, require exit status 0, return its exit counters."""
    import signal as _signal
    rc = d.stop(sig or _signal.SIGTERM, timeout=timeout)
    log = d.log()
    assert rc == 0, "dotp exit status %r after SIGTERM (want 0)\n%s" % (rc, log[-3000:])
    c = exit_counters(log)
    assert c is not None, "no 'dotp exiting' line in dotp's log:\n" + log[-3000:]
    return c


def upstream_spec(srv_or_port, name="dot.test", host="127.0.0.1"):
    port = srv_or_port if isinstance(srv_or_port, int) else srv_or_port.port
    return "%s:%d#%s" % (host, port, name)


try:
    import pytest

    @pytest.fixture
    def faultdot_factory(pki, ports):
        """make(behaviours=['normal'], tag=None, port=None, seed=1, edns=False,
        sized=False, answer=None) -> a running FaultDoT with the good-rsa dot.test cert; closed at teardown, and the
        test fails if a server thread hit an unexpected exception."""
        made = []

        def make(behaviours=("normal",), tag=None, port=None, seed=1, host="127.0.0.1",
                 edns=False, sized=False, answer=None):
            cert, key = pki.certs["good-rsa"]
            s = FaultDoT(cert, key, port or ports.get(), behaviours=behaviours,
                         host=host, tag=tag, seed=seed, edns=edns, sized=sized,
                         answer=answer)
            made.append(s)
            return s
        yield make
        errs = []
        for s in made:
            s.close()
            errs += s.errors
        assert not errs, "faultdot server thread errors: %s" % errs[:5]
except ImportError:  # standalone use without pytest
    pass
