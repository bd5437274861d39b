"""The answer cache (issue 12; the contract is spec/cache.md). Every test
runs dotp against faultdot (faultdot.py), whose answer hook builds the
answer each test needs (TTLs, SOA, RCODE, sizes, delays, no answer at
all) and which counts what reaches the upstream per name, so "answered
from the cache" is seen where it matters: the upstream was not asked.
Counters come from dotp's exit line (cache_hits= ... cache_bytes=).

Each test says what would make it fail. Nothing leaves the machine: every
dotp gets -u pointing at a faultdot on 127.0.0.1, and none is started
with the harness's probe query (it would put www.example.test in the
cache)."""

import socket
import struct
import threading
import time

import dns.message
import dns.rdatatype
import pytest

from harness import _skip_name, udp_exchange, tcp_exchange, wire_id, describe, run_dotp
from faultdot import (faultdot_factory, start_dotp, stop_dotp, proc_rss_kib,  # noqa: F401
                      parse_question, expected_a, make_answer, a_rr, soa_rr, RR,
                      Reply, name_wire, sized_query_name, run_load, WRONG_A,
                      TYPE_NS, RCODE_NOERROR, RCODE_SERVFAIL, RCODE_NXDOMAIN,
                      RCODE_REFUSED)

CACHE_KEYS = ("cache_hits", "cache_misses", "cache_coalesced", "cache_prefetches",
              "cache_stale", "cache_evictions", "cache_entries", "cache_bytes")

_qid = [0x3000]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def next_id():
    _qid[0] = (_qid[0] + 0x101) & 0xFFFF
    return _qid[0]


def qwire(name, rtype="A", qid=None, rd=True, cd=False, edns=None, do=False,
          options=b""):
    """A query, built byte by byte: the name's letters exactly as given,
    RD/CD as told, an OPT record with payload `edns` (None: no OPT), the
    DO bit and raw `options` (code, length, data already packed)."""
    qid = next_id() if qid is None else qid
    flags = (0x0100 if rd else 0) | (0x0010 if cd else 0)
    t = dns.rdatatype.from_text(rtype) if isinstance(rtype, str) else rtype
    out = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns is not None else 0)
    out += name_wire(name) + struct.pack("!HH", t, 1)
    if edns is not None:
        out += struct.pack("!BHHIH", 0, 41, edns, 0x8000 if do else 0, len(options)) + options
    return out


def ask(d, wire, tcp=False, timeout=3.0):
    """(answer, seconds it took); the answer's ID must be the query's."""
    t = time.monotonic()
    if tcp:
        a = tcp_exchange(d.host, d.port, wire, timeout=timeout)
    else:
        a = udp_exchange(d.host, d.port, wire, timeout=timeout)
    return a, time.monotonic() - t


def walk(wire):
    """(end of the question section, [record dicts]) for an answer:
    section, type, ttl, offset of the TTL field."""
    qd, an, ns, ar = struct.unpack("!HHHH", wire[4:12])
    pos = 12
    for _ in range(qd):
        pos = _skip_name(wire, pos) + 4
    qend = pos
    recs = []
    for i in range(an + ns + ar):
        pos = _skip_name(wire, pos)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", wire[pos:pos + 10])
        sec = "an" if i < an else "ns" if i < an + ns else "ar"
        recs.append(dict(sec=sec, type=rtype, ttl=ttl, ttl_off=pos + 4))
        pos += 10 + rdlen
    assert pos == len(wire), "trailing bytes after the records: %s" % describe(wire)
    return qend, recs


def masked(wire):
    """The answer with its ID and every TTL but OPT's zeroed."""
    b = bytearray(wire)
    b[0:2] = b"\0\0"
    for r in walk(wire)[1]:
        if r["type"] != 41:
            b[r["ttl_off"]:r["ttl_off"] + 4] = b"\0\0\0\0"
    return bytes(b)


def ttls(wire):
    return [r["ttl"] for r in walk(wire)[1] if r["type"] != 41]


def opt_ttl(wire):
    o = [r["ttl"] for r in walk(wire)[1] if r["type"] == 41]
    return o[0] if o else None


def opt_codes(wire):
    """The option codes in the answer's OPT record."""
    for r in walk(wire)[1]:
        if r["type"] == 41:
            p = r["ttl_off"] + 4
            end = p + 2 + struct.unpack("!H", wire[p:p + 2])[0]
            p += 2
            out = []
            while p + 4 <= end:
                code, n = struct.unpack("!HH", wire[p:p + 4])
                out.append(code)
                p += 4 + n
            return out
    return []


def question(wire):
    return wire[12:walk(wire)[0]]


def addrs(wire):
    m = dns.message.from_wire(wire)
    return sorted(r.address for rr in m.answer if rr.rdtype == dns.rdatatype.A for r in rr)


def rc(wire):
    return wire[3] & 0x0F


def tc(wire):
    return bool(wire[2] & 0x02)


def counts(wire):
    return struct.unpack("!HHHH", wire[4:12])


def hook(table):
    """An answer hook for faultdot from {name: fn(query, n)}: n counts the
    queries for that name (1 for the first); names not in the table get
    faultdot's usual answer."""
    seen = {}
    lock = threading.Lock()

    def fn(q):
        name = parse_question(q)[1]
        h = table.get(name)
        if h is None:
            return None
        with lock:
            n = seen[name] = seen.get(name, 0) + 1
        return h(q, n)
    return fn


def cache_counters(d):
    """stop_dotp(d), and every cache counter must be on the exit line."""
    c = stop_dotp(d)
    missing = [k for k in CACHE_KEYS if k not in c]
    assert not missing, "exit line lacks %s: %s\n%s" % (missing, c, d.log()[-1500:])
    return c


def settle():
    """Time for a query dotp might (wrongly) have sent upstream anyway to
    reach the server before the count is read."""
    time.sleep(0.05)


def sleep_until(t):
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _ctx(d, srv):
    return "dotp stderr (tail):\n%s\nserver %s, queries seen: %s" % (
        d.log()[-2500:], srv.snapshot(), [q for _, _, q in srv.qlog][-20:])


# --------------------------------------------------------------------------
# 1. a repeat is a hit
# --------------------------------------------------------------------------

def test_repeat_answered_from_cache(dotp_factory, faultdot_factory):
    """An answer (A TTL 300, NS TTL 600 in authority, glue TTL 600) for an
    OPT-less UDP client; the same query again with another ID: the upstream
    sees the name once, the second answer has the second ID and is byte for
    byte the first but for ID and TTLs, every TTL <= the first's, and the
    exit line says cache_hits=1 cache_misses=1 cache_entries=1. Fails
    without a cache (upstream asked twice, cache_hits missing or 0), with a
    replay that changes bytes, or keeps the first ID."""
    name = "rep.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: make_answer(
        q, answer=[a_rr(300, "198.51.100.7")],
        authority=[RR(TYPE_NS, 600, name_wire("ns1.example.test"), "example.test")],
        additional=[a_rr(600, "198.51.100.53", "ns1.example.test")])}))
    d = start_dotp(dotp_factory, [srv])
    a1, _ = ask(d, qwire(name, qid=0x1111))
    assert rc(a1) == 0 and addrs(a1) == ["198.51.100.7"], describe(a1)
    q2 = qwire(name, qid=0x2222)
    a2, _ = ask(d, q2)
    settle()
    assert srv.queries_for(name) == 1, \
        "the upstream saw %d queries for %s (want 1: the repeat from the cache)\n%s" % (
            srv.queries_for(name), name, _ctx(d, srv))
    assert wire_id(a2) == 0x2222
    assert masked(a2) == masked(a1), "replay differs:\nfirst:\n%s\nsecond:\n%s" % (
        describe(a1), describe(a2))
    assert all(t2 <= t1 for t1, t2 in zip(ttls(a1), ttls(a2))), (ttls(a1), ttls(a2))
    c = cache_counters(d)
    assert (c["cache_hits"], c["cache_misses"], c["cache_entries"]) == (1, 1, 1), c
    assert c["cache_bytes"] > 0, c


# --------------------------------------------------------------------------
# 2. negative caching
# --------------------------------------------------------------------------

NEG = {
    # name: (rcode, authority records, cached?)
    "nx-soattl.example.test": (RCODE_NXDOMAIN, lambda: [soa_rr(300, 2)], True),
    "nx-soamin.example.test": (RCODE_NXDOMAIN, lambda: [soa_rr(2, 300)], True),
    "nd-soattl.example.test": (RCODE_NOERROR, lambda: [soa_rr(300, 2)], True),
    "nd-soamin.example.test": (RCODE_NOERROR, lambda: [soa_rr(2, 300)], True),
    "nx-nosoa.example.test": (RCODE_NXDOMAIN, lambda: [], False),
    "nd-nosoa.example.test": (RCODE_NOERROR, lambda: [], False),
    "nd-nsonly.example.test": (RCODE_NOERROR, lambda: [
        RR(TYPE_NS, 300, name_wire("ns1.example.test"), "example.test")], False),
}


def test_negative_caching(dotp_factory, faultdot_factory):
    """NXDOMAIN and NODATA (NOERROR, no answer record) with an SOA in the
    authority section are cached for min(SOA TTL, SOA MINIMUM) = 2 s (once
    TTL 300 / MINIMUM 2, once TTL 2 / MINIMUM 300): asked again at once and
    after 1 s they are hits (the upstream saw one query each), asked after
    2.2 s they go upstream again. Without an SOA (nothing, or only an NS,
    in authority) they are not cached: every repeat goes upstream. Fails
    if negative answers are not cached, cached for the SOA TTL or MINIMUM
    alone (300 s), cached without an SOA, or with a lifetime off by a
    second or more."""
    table = {n: (lambda rcode_, auth: lambda q, k: make_answer(q, rcode=rcode_,
                                                                 authority=auth()))(r, a)
             for n, (r, a, _) in NEG.items()}
    srv = faultdot_factory(answer=hook(table))
    d = start_dotp(dotp_factory, [srv])
    first = {}
    t_first = None
    for n, (r, _, _) in NEG.items():
        a, _ = ask(d, qwire(n))
        assert rc(a) == r, "%s: %s" % (n, describe(a))
        first[n] = a
        t_first = t_first or time.monotonic()
    t_last = time.monotonic()

    def check(when, want_cached, stage):
        bad = []
        for n, (_, _, cached) in NEG.items():
            a, _ = ask(d, qwire(n))
            if masked(a) != masked(first[n]):
                bad.append("%s: answer differs from the first:\n%s" % (n, describe(a)))
        settle()
        for n, (_, _, cached) in NEG.items():
            want = want_cached(cached)
            got = srv.queries_for(n)
            if got != want:
                bad.append("%s (%s): upstream saw %d queries, want %d" % (
                    n, "SOA" if cached else "no SOA", got, want))
        assert not bad, "%s:\n%s\n%s" % (stage, "\n".join(bad), _ctx(d, srv))

    check(0, lambda cached: 1 if cached else 2, "asked again at once")
    sleep_until(t_last + 1.0)
    check(1, lambda cached: 1 if cached else 3, "asked again after 1.0 s (lifetime 2 s)")
    sleep_until(t_first + 2.2)
    check(2, lambda cached: 2 if cached else 4, "asked again after 2.2 s (lifetime 2 s)")
    c = cache_counters(d)
    assert c["cache_hits"] == 8, c


# --------------------------------------------------------------------------
# 3. DO, CD, RD, EDNS are in the key
# --------------------------------------------------------------------------

VARIANTS = {
    "base (EDNS, RD)": dict(edns=1232),
    "DO": dict(edns=1232, do=True),
    "CD": dict(edns=1232, cd=True),
    "no RD": dict(edns=1232, rd=False),
    "no EDNS": dict(edns=None),
}


def test_flags_in_key(dotp_factory, faultdot_factory):
    """One name asked five ways: EDNS with RD, then the same with DO, with
    CD, without RD, and without an OPT record. Each goes upstream once
    (5 queries: none answered from another's entry), and a repeat of each
    is a hit (still 5) whose answer is its own first answer (the upstream
    gave each query another address, and echoes RD, CD and DO), not
    another variant's. Fails if any of the four is left out of the key
    (fewer than 5 upstream queries, or a repeat with another variant's
    address, flags or OPT), or if repeats are not hits."""
    name = "variants.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: make_answer(
        q, answer=[a_rr(300, "198.51.100.%d" % n)])}))
    d = start_dotp(dotp_factory, [srv])
    first = {}
    for v, kw in VARIANTS.items():
        first[v], _ = ask(d, qwire(name, **kw))
    settle()
    assert srv.queries_for(name) == 5, (
        "5 variants, the upstream saw %d queries (want 5, one each)\n%s"
        % (srv.queries_for(name), _ctx(d, srv)))
    assert len({tuple(addrs(a)) for a in first.values()}) == 5
    bad = []
    for v, kw in VARIANTS.items():
        a, _ = ask(d, qwire(name, **kw))
        if masked(a) != masked(first[v]):
            bad.append("%s: repeat is not its first answer:\nfirst:\n%s\nrepeat:\n%s"
                       % (v, describe(first[v]), describe(a)))
    settle()
    assert not bad, "\n".join(bad)
    assert srv.queries_for(name) == 5, "repeats went upstream\n" + _ctx(d, srv)
    c = cache_counters(d)
    assert c["cache_hits"] == 5 and c["cache_misses"] == 5, c


def test_cookie_and_payload_not_in_key_ecs_bypasses(dotp_factory, faultdot_factory):
    """(spec: key) EDNS cookies, padding and the advertised payload are not
    in the key: an EDNS query with payload 1232 is cached, and the same
    with payload 4096, with a client cookie option, or already padded, is
    a hit. A query with an EDNS Client Subnet option (code 8) bypasses the
    cache: it goes upstream although the entry is there (no lookup), and
    the plain query after it still gets the first answer (no insert: the
    upstream gave the ECS query another address). Fails if cookies,
    padding or payload split the key, or ECS queries use the cache."""
    name = "opts.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: make_answer(
        q, answer=[a_rr(300, "198.51.100.%d" % n)])}))
    d = start_dotp(dotp_factory, [srv])
    a1, _ = ask(d, qwire(name, edns=1232))
    cookie = struct.pack("!HH", 10, 8) + b"\x01\x02\x03\x04\x05\x06\x07\x08"
    padding = struct.pack("!HH", 12, 20) + b"\0" * 20
    for label, kw in (("payload 4096", dict(edns=4096)),
                      ("client cookie", dict(edns=1232, options=cookie)),
                      ("padded", dict(edns=1232, options=padding))):
        a, _ = ask(d, qwire(name, **kw))
        settle()
        assert srv.queries_for(name) == 1, "%s: went upstream (not a hit)\n%s" % (
            label, _ctx(d, srv))
        assert addrs(a) == addrs(a1), (label, describe(a))
    ecs = struct.pack("!HHHBB", 8, 7, 1, 24, 0) + bytes([192, 0, 2])
    a, _ = ask(d, qwire(name, edns=1232, options=ecs))
    settle()
    assert srv.queries_for(name) == 2, "the ECS query did not go upstream\n" + _ctx(d, srv)
    assert addrs(a) == ["198.51.100.2"], describe(a)
    a, _ = ask(d, qwire(name, edns=1232))
    assert addrs(a) == ["198.51.100.1"], "the ECS answer replaced the entry:\n" + describe(a)
    a, _ = ask(d, qwire(name, edns=1232, options=ecs))
    settle()
    assert srv.queries_for(name) == 3, "ECS query answered from the cache\n" + _ctx(d, srv)
    c = cache_counters(d)
    assert c["cache_hits"] == 4, c


def test_key_type_exact(dotp_factory, faultdot_factory):
    """(spec: key) Only the name compares without case, not QTYPE: type 65
    (HTTPS, low byte 0x41 'A') and type 97 (0x61 'a') are different keys.
    A NODATA with an SOA (cacheable) to a type-97 query, then an HTTPS
    query for the same name: it goes upstream and gets the HTTPS record;
    and the other way round for a second name. Fails if the key folds the
    case of the QTYPE bytes (one client's type-97 NODATA would then answer
    everyone's HTTPS queries, question rewritten)."""
    https = RR(65, 300, b"\x00\x01\x00")        # priority 1, target "."

    def answer(q, n):
        if parse_question(q)[2] == 65:
            return make_answer(q, answer=[https])
        return make_answer(q, authority=[soa_rr(300, 300)])
    n1, n2 = "svc1.example.test", "svc2.example.test"
    srv = faultdot_factory(answer=hook({n1: answer, n2: answer}))
    d = start_dotp(dotp_factory, [srv])
    problems = []
    for name, order in ((n1, (97, 65)), (n2, (65, 97))):
        for t in order:
            a, _ = ask(d, qwire(name, t))
            m = dns.message.from_wire(a)
            got = [rr.rdtype for rr in m.answer]
            want = [65] if t == 65 else []
            if m.question[0].rdtype != t or got != want:
                problems.append("%s type %d (after type %d): answer records of types %s, "
                                "want %s\n%s" % (name, t, order[0], got, want, describe(a)))
    settle()
    for name in (n1, n2):
        if srv.queries_for(name) != 2:
            problems.append("%s: the upstream saw %d queries (want 2: types 65 and 97 "
                            "are different keys)" % (name, srv.queries_for(name)))
    assert not problems, "\n".join(problems)
    cache_counters(d)


# --------------------------------------------------------------------------
# 4. case
# --------------------------------------------------------------------------

def test_question_case_preserved(dotp_factory, faultdot_factory):
    """Cached by 'www.example.test', asked as 'WwW.ExAmPlE.tEsT': a hit
    (the upstream saw one query), and the answer's question section is
    byte for byte the client's (its exact case); the rest equals the first
    answer but for TTLs. Asked again in lower case: the question is lower
    case again (the entry did not take the second client's case). Fails
    if the name is compared with case (a miss), or the replay carries the
    cached question's case."""
    srv = faultdot_factory(tag=300)
    d = start_dotp(dotp_factory, [srv])
    a1, _ = ask(d, qwire("www.example.test"))
    q2 = qwire("WwW.ExAmPlE.tEsT")
    a2, _ = ask(d, q2)
    settle()
    assert srv.queries_for("www.example.test") == 1, \
        "the mixed-case query went upstream\n" + _ctx(d, srv)
    assert question(a2) == question(q2), "question %r, the client asked %r" % (
        question(a2), question(q2))
    qe1, qe2 = walk(a1)[0], walk(a2)[0]
    assert masked(a2)[qe2:] == masked(a1)[qe1:] and masked(a2)[:12] == masked(a1)[:12], \
        "first:\n%s\nsecond:\n%s" % (describe(a1), describe(a2))
    q3 = qwire("www.example.test")
    a3, _ = ask(d, q3)
    assert question(a3) == question(q3), question(a3)
    c = cache_counters(d)
    assert c["cache_hits"] == 2, c


# --------------------------------------------------------------------------
# 5. size limits on replay
# --------------------------------------------------------------------------

def test_large_answer_truncated_to_client_limit(dotp_factory, faultdot_factory):
    """A 3000-byte TXT answer (3011 with OPT) and a 1500-byte one, dotp with
    --udp-size 2048. Cached over TCP by an OPT-less client (the whole 3000
    bytes), then asked over UDP without EDNS: TC set, at most 512 bytes,
    the client's question, no records (spec: truncated to TC, question,
    OPT), a hit. Over TCP again: the whole answer, equal to the first but
    for ID and TTLs. Cached over TCP with EDNS 4096, then UDP with EDNS
    1232: TC, <= 1232, question and OPT kept; UDP with EDNS 4096: TC and
    <= 2048 (the client's size capped by --udp-size). The 1500-byte answer
    fits a 4096 EDNS client's 2048 cap: whole over UDP from the cache, and
    truncated for 1232. None of these repeats goes upstream. Fails if a
    replay ignores the client's limit (too big, no TC), loses the
    question, or is not a hit."""
    srv = faultdot_factory(tag=300, edns=True, sized=True)
    d = start_dotp(dotp_factory, [srv], ["--udp-size", "2048"])
    big, mid = sized_query_name(3000), sized_query_name(1500)
    problems = []

    def expect_tc(label, q, limit, with_opt):
        a, _ = ask(d, q)
        an, ns, ar = counts(a)[1:]
        if not tc(a) or len(a) > limit or question(a) != question(q) \
                or (an, ns) != (0, 0) or ar != (1 if with_opt else 0) \
                or (opt_ttl(a) is not None) != with_opt:
            problems.append("%s: want TC, <= %d bytes, the question, %s; got %d bytes:\n%s"
                            % (label, limit, "an OPT" if with_opt else "no OPT", len(a),
                               describe(a)))

    a1, _ = ask(d, qwire(big, "TXT"), tcp=True)
    assert len(a1) == 3000 and not tc(a1), "%d bytes over TCP:\n%s" % (len(a1), describe(a1))
    expect_tc("UDP without EDNS", qwire(big, "TXT"), 512, False)
    a, _ = ask(d, qwire(big, "TXT"), tcp=True)
    if masked(a) != masked(a1):
        problems.append("TCP repeat differs from the first:\n%s" % describe(a))
    settle()
    assert srv.queries_for(big) == 1, "OPT-less repeats went upstream\n" + _ctx(d, srv)
    a4, _ = ask(d, qwire(big, "TXT", edns=4096), tcp=True)
    assert len(a4) == 3011 and not tc(a4), describe(a4)
    expect_tc("UDP EDNS 1232", qwire(big, "TXT", edns=1232), 1232, True)
    expect_tc("UDP EDNS 4096 (--udp-size 2048)", qwire(big, "TXT", edns=4096), 2048, True)
    a, _ = ask(d, qwire(big, "TXT", edns=1232), tcp=True)
    if masked(a) != masked(a4):
        problems.append("TCP EDNS repeat differs from the first:\n%s" % describe(a))
    m1, _ = ask(d, qwire(mid, "TXT", edns=4096), tcp=True)
    m2, _ = ask(d, qwire(mid, "TXT", edns=4096))
    if len(m2) != 1511 or tc(m2) or masked(m2) != masked(m1):
        problems.append("1511-byte answer for a UDP EDNS 4096 client (cap 2048): want it "
                        "whole, got %d bytes:\n%s" % (len(m2), describe(m2)))
    expect_tc("1511 bytes, UDP EDNS 1232", qwire(mid, "TXT", edns=1232), 1232, True)
    settle()
    assert not problems, "\n".join(problems)
    assert srv.queries_for(big) == 2 and srv.queries_for(mid) == 1, \
        "repeats went upstream\n" + _ctx(d, srv)
    c = cache_counters(d)
    assert c["cache_hits"] == 7, c


# --------------------------------------------------------------------------
# 6. eviction and memory
# --------------------------------------------------------------------------

EVICT_NAMES = 3000
EVICT_SIZE = 500      # <= 512: OPT-less UDP clients get it whole
BUDGET = 256 * 1024


def test_eviction_bounds_memory(dotp_factory, faultdot_factory):
    """--cache-size 256k, -v: 3000 unique names, each a 500-byte TXT
    answer (1.5 MB in all, almost six times the budget), 64 outstanding
    from 4 UDP sockets and a TCP connection. Every query answered (500 bytes,
    NOERROR); dotp's VmRSS, sampled every 10 ms during the stream and after
    it, stays within its idle VmRSS (after one query) + 256 KiB + 1 MiB;
    the exit line has cache_evictions > 0, cache_bytes <= 256 KiB; the
    last name is still cached (a hit), the first was evicted (goes
    upstream); at most one log line mentions eviction (-v logs them at
    most once per 10 s, never per query). Fails if the cache grows past
    its budget, never evicts, evicts the newest, or logs per eviction.
    Bounded: the stream must end within 20 s."""
    srv = faultdot_factory(tag=300, sized=True)
    d = start_dotp(dotp_factory, [srv], ["--cache-size", "256k"], verbose=True)
    pid = d.proc.pid
    ask(d, qwire(sized_query_name(EVICT_SIZE, tag="warm"), "TXT"))
    time.sleep(0.2)
    idle = proc_rss_kib(pid)
    limit = idle + BUDGET // 1024 + 1024
    peak = [idle]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], proc_rss_kib(pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.01)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    qnames = [sized_query_name(EVICT_SIZE, tag="e%d" % i) for i in range(EVICT_NAMES)]
    t0 = time.monotonic()
    try:
        r = run_load(d.host, d.port, qnames, n_udp=4, n_tcp=1, window=64, timeout=3.0,
                     linger=0.1, qtype="TXT")
    finally:
        stop.set()
        th.join(2)
    took = time.monotonic() - t0
    bad = [s for s in r.sent if len(s.answers) != 1 or len(s.answers[0][1]) != EVICT_SIZE
           or rc(s.answers[0][1]) != 0]
    assert not bad, "%d of %d queries not answered right, e.g. %s %s" % (
        len(bad), len(r.sent), bad[0].qname,
        [describe(a[1])[:300] for a in bad[0].answers])
    assert took < 20, "the stream took %.1f s" % took
    after = proc_rss_kib(pid)
    peak[0] = max(peak[0], after)
    assert peak[0] <= limit, ("VmRSS %d KiB (idle %d KiB, after the stream %d KiB), over "
                              "idle + 256 KiB budget + 1 MiB = %d KiB"
                              % (peak[0], idle, after, limit))
    before_last, before_first = srv.queries_for(qnames[-1]), srv.queries_for(qnames[0])
    ask(d, qwire(qnames[-1], "TXT"))
    ask(d, qwire(qnames[0], "TXT"))
    settle()
    assert srv.queries_for(qnames[-1]) == before_last, "the newest entry was evicted"
    assert srv.queries_for(qnames[0]) == before_first + 1, \
        "the oldest entry is still cached (256 KiB cannot hold 3000 x 500 bytes)"
    c = cache_counters(d)
    print("stream of %d in %.2f s; VmRSS idle %d KiB, peak %d KiB; exit %s"
          % (EVICT_NAMES, took, idle, peak[0], c))
    assert c["cache_evictions"] > 0, c
    assert 0 < c["cache_bytes"] <= BUDGET, c
    assert 0 < c["cache_entries"] < EVICT_NAMES, c
    ev_lines = [l for l in d.log().splitlines()
                if "evict" in l.lower() and "dotp exiting" not in l
                and "summary" not in l.lower()]
    assert len(ev_lines) <= 1, "%d log lines about evictions (want at most 1 per 10 s):\n%s" % (
        len(ev_lines), "\n".join(ev_lines[:5]))


def test_eviction_second_chance(dotp_factory, faultdot_factory):
    """(spec: memory, CLOCK) --cache-size 128k. A 500-byte answer H is
    cached and hit once; a cold one C is cached right after it; then
    unique 500-byte answers worth 1.5 x the budget stream through (more
    than one lap of the ring, less than two). C, the oldest never hit,
    was dropped (asked again: it goes upstream); H, hit since it was
    written, got its second chance and is still a hit. Fails with plain
    FIFO eviction (H dropped) or no eviction (C kept)."""
    srv = faultdot_factory(tag=300, sized=True)
    d = start_dotp(dotp_factory, [srv], ["--cache-size", "128k"])
    hot = sized_query_name(EVICT_SIZE, tag="hot")
    cold = sized_query_name(EVICT_SIZE, tag="cold")
    ask(d, qwire(hot, "TXT"))
    ask(d, qwire(hot, "TXT"))
    ask(d, qwire(cold, "TXT"))
    n = int(1.5 * 128 * 1024 / EVICT_SIZE)
    r = run_load(d.host, d.port, [sized_query_name(EVICT_SIZE, tag="s%d" % i)
                                  for i in range(n)],
                 n_udp=2, n_tcp=0, window=32, timeout=3.0, linger=0.05, qtype="TXT")
    assert all(len(s.answers) == 1 for s in r.sent), r.summary()
    ask(d, qwire(cold, "TXT"))
    ask(d, qwire(hot, "TXT"))
    settle()
    assert srv.queries_for(cold) == 2, "the cold entry survived 1.5 budgets of new answers"
    assert srv.queries_for(hot) == 1, \
        "the entry hit since it was written was dropped (no second chance)"
    c = cache_counters(d)
    assert c["cache_evictions"] > 0 and c["cache_hits"] == 2, c


def test_idle_rss_independent_of_cache_size(dotp_factory, faultdot_factory):
    """(spec: memory) The block is mapped at start but its pages are touched
    only when used: after one query each, a dotp with --cache-size 1024m
    has a VmRSS within 1 MiB of one with --cache-size 64k. Fails if the
    cache (index or ring) is written through at start."""
    srv = faultdot_factory(tag=300)
    rss = {}
    for size in ("64k", "1024m"):
        d = start_dotp(dotp_factory, [srv], ["--cache-size", size])
        ask(d, qwire("rss-%s.example.test" % size))
        time.sleep(0.2)
        rss[size] = proc_rss_kib(d.proc.pid)
        cache_counters(d)
    assert rss["1024m"] - rss["64k"] < 1024, "VmRSS %s KiB" % rss


# --------------------------------------------------------------------------
# 7. coalescing
# --------------------------------------------------------------------------

def _case_variant(name, i):
    """name with letter j upper-cased when bit j of i is set."""
    out, j = [], 0
    for ch in name:
        if ch.isalpha():
            out.append(ch.upper() if (i >> (j % 12)) & 1 else ch)
            j += 1
        else:
            out.append(ch)
    return "".join(out)


def _burst(d, wires, timeout=3.0):
    """Each query from its own UDP socket, all sent before any answer is
    read. Returns [(answer or None, latency)]."""
    socks = []
    for _ in wires:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((d.host, d.port))
        socks.append(s)
    try:
        t0 = time.monotonic()
        for s, w in zip(socks, wires):
            s.send(w)
        out = []
        for s in socks:
            s.settimeout(max(0.01, t0 + timeout - time.monotonic()))
            try:
                a = s.recv(65535)
                out.append((a, time.monotonic() - t0))
            except socket.timeout:
                out.append((None, None))
        return out
    finally:
        for s in socks:
            s.close()


def test_coalescing(dotp_factory, faultdot_factory):
    """The upstream answers 300 ms late (delay:300). 20 identical queries
    (one name, each in another letter case, 20 IDs) from 20 UDP sockets
    at once: the upstream receives exactly one; all 20 get the right
    address with their own ID and their own question case; the exit line
    says cache_coalesced=19. A 21st query afterwards is a hit. Fails
    without coalescing (20 upstream queries, cache_coalesced=0), or if a
    waiting query gets the leader's ID or case."""
    name = "coalesce.example.test"
    srv = faultdot_factory(["delay:300"], tag=300)
    d = start_dotp(dotp_factory, [srv])
    wires = [qwire(_case_variant(name, i), qid=0x4000 + i) for i in range(20)]
    res = _burst(d, wires)
    bad = []
    for w, (a, lat) in zip(wires, res):
        if a is None:
            bad.append("%s: no answer" % question(w))
        elif wire_id(a) != wire_id(w) or question(a) != question(w) \
                or addrs(a) != [expected_a(name)]:
            bad.append("%r id %d: got\n%s" % (question(w), wire_id(w), describe(a)))
    assert not bad, "\n".join(bad)
    settle()
    assert srv.queries_for(name) == 1, \
        "the upstream saw %d queries (want 1)\n%s" % (srv.queries_for(name), _ctx(d, srv))
    ask(d, qwire(name))
    settle()
    assert srv.queries_for(name) == 1
    c = cache_counters(d)
    assert c["cache_coalesced"] == 19, c
    assert c["cache_hits"] == 1, c


def test_coalesced_follower_gets_its_own_limit(dotp_factory, faultdot_factory):
    """(spec: coalescing) The upstream answers 300 ms late. An OPT-less TCP
    client asks for a 3000-byte TXT answer, and 50 ms later an OPT-less UDP
    client asks the same (it waits for the TCP client's query): the TCP
    client gets all 3000 bytes, the UDP client TC, at most 512 bytes, its
    own ID and question; the upstream saw one query; cache_coalesced=1.
    Fails if a waiting query gets the leader's size limit or ID."""
    srv = faultdot_factory(["delay:300"], tag=300, edns=True, sized=True)
    d = start_dotp(dotp_factory, [srv])
    name = sized_query_name(3000, tag="co")
    out = {}

    def tcp_client():
        out["tcp"] = ask(d, qwire(name, "TXT", qid=0x0101), tcp=True)

    th = threading.Thread(target=tcp_client)
    th.start()
    time.sleep(0.05)
    qu = qwire(name, "TXT", qid=0x0202)
    au, _ = ask(d, qu)
    th.join(5)
    at, _ = out["tcp"]
    assert len(at) == 3000 and not tc(at) and wire_id(at) == 0x0101, describe(at)
    assert tc(au) and len(au) <= 512 and wire_id(au) == 0x0202 \
        and question(au) == question(qu), "UDP follower: %d bytes\n%s" % (len(au), describe(au))
    settle()
    assert srv.queries_for(name) == 1, _ctx(d, srv)
    c = cache_counters(d)
    assert c["cache_coalesced"] == 1, c


def test_coalesced_failure_shared_and_not_cached(dotp_factory, faultdot_factory):
    """(spec: coalescing) The upstream never answers one name; --timeout
    1000. 5 identical queries at once: all 5 get SERVFAIL (about 1 s),
    cache_coalesced=4, and the upstream saw fewer than 5 queries for it
    (only the leader's tries). Then the upstream answers it: the next
    query goes upstream and gets the address (dotp's own SERVFAIL is never
    cached). Fails if waiting queries hang or each go upstream, or a
    timeout's SERVFAIL is cached."""
    name = "fails.example.test"
    answering = threading.Event()
    srv = faultdot_factory(tag=300, answer=hook({name: lambda q, n: None
                                                  if answering.is_set() else
                                                  Reply(drop=True)}))
    d = start_dotp(dotp_factory, [srv], ["--timeout", "1000"])
    ask(d, qwire("warm.example.test"))      # a connection and an RTT sample
    wires = [qwire(name, qid=0x5000 + i) for i in range(5)]
    res = _burst(d, wires, timeout=2.5)
    assert all(a is not None and rc(a) == RCODE_SERVFAIL and wire_id(a) == wire_id(w)
               for w, (a, _) in zip(wires, res)), \
        [describe(a) if a else None for a, _ in res]
    assert all(lat < 1.6 for _, lat in res), [lat for _, lat in res]
    assert srv.queries_for(name) < 5, \
        "the upstream saw %d queries (want only the leader's)\n%s" % (
            srv.queries_for(name), _ctx(d, srv))
    before = srv.queries_for(name)
    answering.set()
    a, _ = ask(d, qwire(name))
    assert rc(a) == 0 and addrs(a) == [expected_a(name)], describe(a)
    assert srv.queries_for(name) == before + 1
    c = cache_counters(d)
    assert c["cache_coalesced"] == 4, c


# --------------------------------------------------------------------------
# 8. prefetch
# --------------------------------------------------------------------------

def test_prefetch(dotp_factory, faultdot_factory):
    """An answer with TTL 5 (198.51.100.1), cached. Asked at 1 s: a hit, no
    prefetch (not in the last tenth). Asked at ~4.6 s (within the last
    tenth): answered at once (< 100 ms; later answers from the upstream
    come 150 ms late) with the cached address and TTL 0 or 1, and the
    upstream sees a second query before the 5 s expiry (and not before
    4.5 s); asked again at ~4.65 s: answered at once, no third upstream
    query (one refresh per entry). At ~5.3 s a query is a hit on the
    refreshed entry (198.51.100.2). Beside it, an entry with TTL 4 asked
    in its last tenth (3.7 s) starts no refresh (lifetime < 5 s). Exit:
    cache_prefetches=1. Fails without prefetch (no second query before
    expiry, a miss at 5.3 s), with a prefetch that makes the client wait,
    or with more than one refresh."""
    name, short = "prefetch.example.test", "short.example.test"
    srv = faultdot_factory(answer=hook({
        name: lambda q, n: Reply(make_answer(q, answer=[a_rr(5, "198.51.100.%d" % n)]),
                                 delay_ms=0 if n == 1 else 150),
        short: lambda q, n: make_answer(q, answer=[a_rr(4, "198.51.100.%d" % (10 + n))]),
    }))
    d = start_dotp(dotp_factory, [srv])
    ask(d, qwire(name))
    t1 = time.monotonic()
    ask(d, qwire(short))
    sleep_until(t1 + 1.0)
    a, _ = ask(d, qwire(name))
    settle()
    assert srv.queries_for(name) == 1, "a hit at 1 s of 5 started a refresh\n" + _ctx(d, srv)
    sleep_until(t1 + 3.7)
    ask(d, qwire(short))
    sleep_until(t1 + 4.6)
    a, lat = ask(d, qwire(name))
    assert lat < 0.1 and addrs(a) == ["198.51.100.1"] and ttls(a)[0] in (0, 1), \
        "at 4.6 s of 5: %.3f s, want the cached answer at once:\n%s" % (lat, describe(a))
    sleep_until(t1 + 4.65)
    a, lat = ask(d, qwire(name))
    assert lat < 0.1 and addrs(a) in (["198.51.100.1"], ["198.51.100.2"]), \
        "%.3f s\n%s" % (lat, describe(a))
    sleep_until(t1 + 5.3)
    times = srv.query_times(name)
    assert len(times) == 2, ("the upstream saw %d queries for %s (want 2: the first and "
                             "one refresh)\n%s" % (len(times), name, _ctx(d, srv)))
    assert t1 + 4.45 <= times[1] < t1 + 5.0, \
        "refresh query at %.3f s (want in the last tenth, before expiry at 5 s)" % (
            times[1] - t1)
    a, lat = ask(d, qwire(name))
    settle()
    assert addrs(a) == ["198.51.100.2"] and srv.queries_for(name) == 2, \
        "at 5.3 s: want a hit on the refreshed entry:\n%s\n%s" % (describe(a), _ctx(d, srv))
    assert srv.queries_for(short) == 1, "an entry with TTL 4 was refreshed"
    c = cache_counters(d)
    assert c["cache_prefetches"] == 1, c


# --------------------------------------------------------------------------
# 9. serve-stale
# --------------------------------------------------------------------------

def _stale_answer(q, n, later=None):
    """First: A 198.51.100.1 TTL 1 with an NS TTL 1 in authority; later
    ones: `later` (None: the same with .2 and TTL 300)."""
    if n == 1:
        return make_answer(q, answer=[a_rr(1, "198.51.100.1")], authority=[
            RR(TYPE_NS, 1, name_wire("ns1.example.test"), "example.test")])
    if later is not None:
        return later(q, n)
    return make_answer(q, answer=[a_rr(300, "198.51.100.2")])


def test_serve_stale_upstream_down(dotp_factory, faultdot_factory):
    """--serve-stale 60. An answer with TTL 1 cached, for an OPT-less and
    for an EDNS DO client; 1.3 s later the upstream is stopped
    (connections refused): each query gets its old answer (198.51.100.1)
    with every TTL set to 30 (the OPT's TTL field, DO, kept), at once
    (every upstream failed: < 0.5 s, not the 3 s timeout); cache_stale=2.
    Fails without serve-stale (SERVFAIL), with stale TTLs not 30 (or OPT
    touched), or a client left waiting for a timer although every upstream
    failed."""
    name = "stale-down.example.test"
    # both first queries (two keys) get the TTL 1 answer
    srv = faultdot_factory(answer=hook({name: lambda q, n: _stale_answer(q, max(1, n - 1))}))
    d = start_dotp(dotp_factory, [srv], ["--serve-stale", "60"])
    a1, _ = ask(d, qwire(name))
    t1 = time.monotonic()
    e1, _ = ask(d, qwire(name, edns=1232, do=True))
    sleep_until(t1 + 1.3)
    srv.stop()
    a, lat = ask(d, qwire(name), timeout=4)
    assert rc(a) == 0 and addrs(a) == ["198.51.100.1"] and ttls(a) == [30, 30], \
        "stale answer wanted (TTLs 30), got in %.3f s:\n%s\n%s" % (lat, describe(a),
                                                                  d.log()[-2000:])
    assert masked(a) == masked(a1)
    assert lat < 0.5, "stale answer after %.3f s (every upstream failed: want at once)" % lat
    e, lat = ask(d, qwire(name, edns=1232, do=True), timeout=4)
    assert ttls(e) == [30, 30] and opt_ttl(e) == 0x8000 and masked(e) == masked(e1), \
        "EDNS DO client, after %.3f s:\n%s" % (lat, describe(e))
    assert lat < 0.5, lat
    c = cache_counters(d)
    assert c["cache_stale"] == 2, c


def test_serve_stale_slow_upstream_then_refresh(dotp_factory, faultdot_factory):
    """--serve-stale 60 --timeout 6000 --attempt-timeout 2500. An answer
    with TTL 1 cached; at 1.3 s three clients ask the same query at once:
    it goes upstream once (the others wait for it), and the upstream
    answers 2.2 s late: all three get the old answer with TTLs 30 after
    the 1800 ms client-response timer (1.6..2.2 s), and when the
    upstream's answer (198.51.100.2) comes it refreshes the entry: a query
    after it is a hit with the new address. Exit: cache_stale=3,
    cache_coalesced=2. Fails if stale is served at once (the upstream was
    not given 1.8 s), not at all (the clients wait 2.2 s), not to the
    waiting ones, or the background answer is thrown away."""
    name = "stale-slow.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: _stale_answer(
        q, n, later=lambda q, n: Reply(make_answer(q, answer=[a_rr(300, "198.51.100.2")]),
                                       delay_ms=2200))}))
    d = start_dotp(dotp_factory, [srv], ["--serve-stale", "60", "--timeout", "6000",
                                         "--attempt-timeout", "2500"])
    ask(d, qwire(name))
    t1 = time.monotonic()
    sleep_until(t1 + 1.3)
    for a, lat in _burst(d, [qwire(name, qid=0x7000 + i) for i in range(3)], timeout=5):
        assert a is not None, "no answer within 5 s"
        assert addrs(a) == ["198.51.100.1"] and ttls(a) == [30, 30], \
            "want the stale answer (TTLs 30), got after %.3f s:\n%s" % (lat, describe(a))
        assert 1.6 <= lat <= 2.2, "stale answer after %.3f s (want ~1.8 s)" % lat
    assert srv.queries_for(name) == 2
    sleep_until(srv.query_times(name)[1] + 2.2 + 0.3)
    a, lat = ask(d, qwire(name))
    settle()
    assert addrs(a) == ["198.51.100.2"] and srv.queries_for(name) == 2 and lat < 0.1, \
        "want a hit on the refreshed entry:\n%s\n%s" % (describe(a), _ctx(d, srv))
    c = cache_counters(d)
    assert c["cache_stale"] == 3 and c["cache_coalesced"] == 2, c


@pytest.mark.parametrize("extra", [[], ["--attempt-timeout", "1500"]],
                         ids=["default", "attempt-1500"])
def test_serve_stale_silent_upstream_counted_once(dotp_factory, faultdot_factory, extra):
    """--serve-stale 60, default timeouts, or --attempt-timeout 1500 (the
    silent connection is then not given up before the stale answer is
    due). An answer with TTL 1 cached; at
    1.3 s the upstream stops answering that name (queries read, never
    answered): the client gets the stale answer (TTLs 30) within 1.8 s +
    0.4 s, and exactly one datagram even after the background query has
    given up (--timeout 3 s); the exit line says cache_stale=1 (one stale
    answer served). Fails if the client waits for the timeout, gets a
    second answer, or the background query's failure counts as another
    stale answer served."""
    name = "stale-silent.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: _stale_answer(
        q, n, later=lambda q, n: Reply(drop=True))}))
    d = start_dotp(dotp_factory, [srv], ["--serve-stale", "60"] + extra)
    ask(d, qwire(name))
    t1 = time.monotonic()
    sleep_until(t1 + 1.3)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((d.host, d.port))
    try:
        q = qwire(name)
        t = time.monotonic()
        s.send(q)
        s.settimeout(3.0)
        a = s.recv(65535)
        lat = time.monotonic() - t
        assert wire_id(a) == wire_id(q) and addrs(a) == ["198.51.100.1"] \
            and ttls(a) == [30, 30], describe(a)
        assert lat <= 2.2, "stale answer after %.3f s (want within 1.8 s + 0.4 s)" % lat
        s.settimeout(max(0.1, t + 3.5 - time.monotonic()))
        try:
            extra = s.recv(65535)
        except socket.timeout:
            extra = None
        assert extra is None, "a second answer after the stale one:\n" + describe(extra)
    finally:
        s.close()
    c = cache_counters(d)
    assert c["cache_stale"] == 1, "one stale answer served, exit line says %s" % c


def test_serve_stale_late_follower_gets_stale_in_time(dotp_factory, faultdot_factory):
    """--serve-stale 60 --timeout 9000 --attempt-timeout 4500. An answer
    with TTL 1 cached; at 1.3 s client A asks, the query goes upstream,
    which answers 4.5 s late; A gets the stale answer at ~1.8 s. At ~3.2 s
    client B asks the same: it too finds only a stale entry, and waits for
    the query already upstream (coalescing: the upstream sees no third
    query), but its own 1800 ms client-response timer still holds: B gets
    the stale answer (TTLs 30) within 1.8 s + 0.4 s, not when the upstream
    answers (3 s after B asked). Fails if a query that joins a refresh
    after the stale answer was served waits for the upstream for as long
    as it takes (up to --timeout)."""
    name = "stale-late.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: _stale_answer(
        q, n, later=lambda q, n: Reply(make_answer(q, answer=[a_rr(300, "198.51.100.2")]),
                                       delay_ms=4500))}))
    d = start_dotp(dotp_factory, [srv], ["--serve-stale", "60", "--timeout", "9000",
                                         "--attempt-timeout", "4500"])
    ask(d, qwire(name))
    t1 = time.monotonic()
    sleep_until(t1 + 1.3)
    a, lat = ask(d, qwire(name), timeout=5)
    assert ttls(a) == [30, 30] and 1.6 <= lat <= 2.2, "A: %.3f s\n%s" % (lat, describe(a))
    sleep_until(t1 + 3.2)
    b, lat = ask(d, qwire(name), timeout=5)
    assert addrs(b) == ["198.51.100.1"] and ttls(b) == [30, 30] and lat <= 2.2, \
        "B (asked 1.9 s after the refresh went upstream): got after %.3f s (want the stale " \
        "answer within its 1800 ms timer):\n%s" % (lat, describe(b))
    settle()
    assert srv.queries_for(name) == 2, _ctx(d, srv)
    c = cache_counters(d)
    assert c["cache_stale"] == 2, c


def test_serve_stale_never_replaces_an_answer(dotp_factory, faultdot_factory):
    """--serve-stale 60. An answer with TTL 1 cached; at 1.3 s the upstream
    answers the same query SERVFAIL (at once): the client gets that
    SERVFAIL, not the stale answer (spec: an answer from the upstream, any
    RCODE, is never replaced by stale); cache_stale=0. Fails if stale
    replaces an upstream answer."""
    name = "stale-sf.example.test"
    srv = faultdot_factory(answer=hook({name: lambda q, n: _stale_answer(
        q, n, later=lambda q, n: make_answer(q, rcode=RCODE_SERVFAIL))}))
    d = start_dotp(dotp_factory, [srv], ["--serve-stale", "60"])
    ask(d, qwire(name))
    t1 = time.monotonic()
    sleep_until(t1 + 1.3)
    a, lat = ask(d, qwire(name), timeout=4)
    assert rc(a) == RCODE_SERVFAIL and not addrs(a), describe(a)
    c = cache_counters(d)
    assert c["cache_stale"] == 0, c


@pytest.mark.parametrize("mode", ["off", "window-passed"])
def test_no_stale_without_option_or_after_window(dotp_factory, faultdot_factory, mode):
    """An answer with TTL 1 cached, the upstream stopped after it expired:
    without --serve-stale (asked at 1.3 s), or with --serve-stale 1 asked at
    2.3 s (expired 1.3 s ago, past the window), the query gets SERVFAIL as
    without a cache, well within --timeout; cache_stale=0. Fails if an
    expired entry is served without the option or after its window."""
    name = "nostale.example.test"
    srv = faultdot_factory(answer=hook({name: _stale_answer}))
    extra, wait = ([], 1.3) if mode == "off" else (["--serve-stale", "1"], 2.3)
    d = start_dotp(dotp_factory, [srv], extra)
    ask(d, qwire(name))
    t1 = time.monotonic()
    sleep_until(t1 + wait)
    srv.stop()
    a, lat = ask(d, qwire(name), timeout=4)
    assert rc(a) == RCODE_SERVFAIL and not addrs(a), describe(a)
    assert lat < 3.0, lat
    c = cache_counters(d)
    assert c["cache_stale"] == 0, c


# --------------------------------------------------------------------------
# 10. --no-cache
# --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_cache(dotp_factory, faultdot_factory, how):
    """--no-cache (or DOTP_NO_CACHE=1), upstream 100 ms late: one query
    asked 3 times in a row goes upstream 3 times; 5 identical queries at
    once go upstream 5 times (no coalescing); every answer right; exit:
    cache_hits=0 cache_coalesced=0 cache_entries=0. Fails if the switch
    is ignored (1 + 1 upstream queries) or rejected."""
    name = "nocache.example.test"
    srv = faultdot_factory(["delay:100"], tag=300)
    if how == "flag":
        d = start_dotp(dotp_factory, [srv], ["--no-cache"])
    else:
        d = start_dotp(dotp_factory, [srv], env={"DOTP_NO_CACHE": "1"})
    for _ in range(3):
        a, _ = ask(d, qwire(name))
        assert addrs(a) == [expected_a(name)], describe(a)
    assert srv.queries_for(name) == 3, _ctx(d, srv)
    res = _burst(d, [qwire(name, qid=0x6000 + i) for i in range(5)])
    assert all(a is not None and addrs(a) == [expected_a(name)] for a, _ in res)
    settle()
    assert srv.queries_for(name) == 8, _ctx(d, srv)
    c = cache_counters(d)
    assert (c["cache_hits"], c["cache_coalesced"], c["cache_entries"]) == (0, 0, 0), c


# --------------------------------------------------------------------------
# 11. wrong question
# --------------------------------------------------------------------------

def test_wrong_question_never_cached(dotp_factory, faultdot_factory):
    """The upstream (wrong_question:name) sends, before the real answer to
    wq.example.test, one with the query's ID but question xq.example.test
    carrying A 192.0.2.66. The client gets the real answer. Then the
    upstream is stopped: wq.example.test again gets the real answer, from
    the cache (never 192.0.2.66), and xq.example.test (the wrong answer's
    question) is not answered from the cache: SERVFAIL. Exit: mismatched =
    the wrong answers sent, cache_hits=1.
    Without dotp's question check the wrong answer, first to arrive with
    the ID, would be delivered (the first assertion: 192.0.2.66) and
    cached, under the query's key (the repeat gives 192.0.2.66) or under
    its own question (xq.example.test answered 192.0.2.66 instead of
    SERVFAIL); a cache that stores what arrives before the check would
    fail the same two ways."""
    srv = faultdot_factory(["wrong_question:name"], tag=300)
    d = start_dotp(dotp_factory, [srv])
    name, other = "wq.example.test", "xq.example.test"
    a, _ = ask(d, qwire(name))
    assert addrs(a) == [expected_a(name)], describe(a)
    assert srv.wrong_sent == 1
    assert parse_question(srv.rawq[0][1])[1] == name
    srv.stop()
    a, _ = ask(d, qwire(name))
    assert rc(a) == 0 and addrs(a) == [expected_a(name)] and WRONG_A not in addrs(a), \
        describe(a)
    a, _ = ask(d, qwire(other), timeout=4)
    assert rc(a) == RCODE_SERVFAIL and not addrs(a), \
        "the wrong answer's question was answered:\n%s" % describe(a)
    c = cache_counters(d)
    assert c["mismatched"] == srv.wrong_sent, c
    assert c["cache_hits"] == 1, c


# --------------------------------------------------------------------------
# 12. upstream errors held 1 s
# --------------------------------------------------------------------------

def test_upstream_error_held_one_second(dotp_factory, faultdot_factory):
    """The upstream answers one name SERVFAIL and another REFUSED (every
    time). Asked again at ~0.3 s and ~0.8 s: the same RCODE, the upstream
    not asked again; asked at ~1.2 s: it goes upstream again. Fails if
    such answers are not held (upstream asked each time) or held longer
    than 1 s (or cached by their TTL-less lifetime for ever)."""
    names = {"sf.example.test": RCODE_SERVFAIL, "refused.example.test": RCODE_REFUSED}
    srv = faultdot_factory(answer=hook({n: (lambda r: lambda q, k: make_answer(q, rcode=r))(r)
                                        for n, r in names.items()}))
    d = start_dotp(dotp_factory, [srv])
    first = {}
    for n, r in names.items():
        a, _ = ask(d, qwire(n))
        assert rc(a) == r, describe(a)
        first[n] = srv.queries_for(n)
    t1 = time.monotonic()
    for when in (0.3, 0.8):
        sleep_until(t1 + when)
        for n, r in names.items():
            a, _ = ask(d, qwire(n))
            assert rc(a) == r, describe(a)
        settle()
        for n in names:
            assert srv.queries_for(n) == first[n], \
                "%s went upstream again at %.1f s (held 1 s)\n%s" % (n, when, _ctx(d, srv))
    sleep_until(t1 + 1.2)
    for n, r in names.items():
        a, _ = ask(d, qwire(n))
        assert rc(a) == r
    settle()
    for n in names:
        assert srv.queries_for(n) > first[n], "%s not asked again after 1.2 s" % n
    c = cache_counters(d)
    assert c["cache_hits"] == 4, c


def test_questionless_error_held_one_second(dotp_factory, faultdot_factory):
    """(spec: lifetimes, "SERVFAIL, REFUSED and other RCODEs from the
    upstream: held 1 s") Some servers answer errors with no question
    section (QDCOUNT 0), which dotp's question check accepts for errors:
    a REFUSED without a question, delivered to the client, is held 1 s
    like any other: asked again at once it does not go upstream. Fails if
    an error answer is held only when it repeats the question."""
    name = "noq.example.test"

    def refused_no_question(q, n):
        return struct.pack("!HBBHHHH", wire_id(q), 0x80 | (q[2] & 0x01), 0x80 | RCODE_REFUSED,
                           0, 0, 0, 0)
    srv = faultdot_factory(answer=hook({name: refused_no_question}))
    d = start_dotp(dotp_factory, [srv])
    a, _ = ask(d, qwire(name))
    assert rc(a) == RCODE_REFUSED, describe(a)
    a, _ = ask(d, qwire(name))
    assert rc(a) == RCODE_REFUSED, describe(a)
    settle()
    assert srv.queries_for(name) == 1, \
        "a question-less REFUSED was not held: the upstream saw %d queries within 1 s" % (
            srv.queries_for(name))
    cache_counters(d)


# --------------------------------------------------------------------------
# 13. TTLs above 2^31-1
# --------------------------------------------------------------------------

def test_ttl_above_2_31_not_cached(dotp_factory, faultdot_factory):
    """Answers with TTL 2^31 (one record), and with TTLs 300 and 2^32-1 (two
    records: the smallest counts, and 2^32-1 counts as 0) are not cached:
    the repeat goes upstream; nor is one with TTL 0 (a lifetime of 0). An
    answer with TTL 2^31-1 is cached (a hit) and replayed with TTL 2^31-1
    (nothing stored a whole second). Fails if a TTL above 2^31-1 is taken
    as a long lifetime (or TTL 0 as a lifetime)."""
    srv = faultdot_factory(answer=hook({
        "zero.example.test": lambda q, n: make_answer(q, answer=[a_rr(0, "198.51.100.1")]),
        "big.example.test": lambda q, n: make_answer(q, answer=[a_rr(2 ** 31, "198.51.100.1")]),
        "mixed.example.test": lambda q, n: make_answer(q, answer=[
            a_rr(300, "198.51.100.1"), a_rr(2 ** 32 - 1, "198.51.100.2")]),
        "max.example.test": lambda q, n: make_answer(q, answer=[
            a_rr(2 ** 31 - 1, "198.51.100.1")]),
    }))
    d = start_dotp(dotp_factory, [srv])
    kinds = ("big", "mixed", "zero", "max")
    for n in kinds:
        ask(d, qwire(n + ".example.test"))
    got = {}
    for n in kinds:
        got[n], _ = ask(d, qwire(n + ".example.test"))
    settle()
    seen = {n: srv.queries_for(n + ".example.test") for n in kinds}
    assert seen == {"big": 2, "mixed": 2, "zero": 2, "max": 1}, \
        "upstream queries per name: %s" % seen
    assert ttls(got["max"]) == [2 ** 31 - 1], describe(got["max"])
    c = cache_counters(d)
    assert c["cache_hits"] == 1, c


# --------------------------------------------------------------------------
# 14. TTLs count down
# --------------------------------------------------------------------------

def test_ttl_decrement(dotp_factory, faultdot_factory):
    """An EDNS DO query; the answer has A records TTL 300 and 300, an NS
    TTL 200 in authority, glue TTL 100, and an OPT with DO and the response
    padding (RFC 7830) the upstream adds because dotp padded the query.
    Asked again after ~1.1 s: a hit, every TTL lowered by 1 (299 299 199
    99; 2 allowed for a slow machine), never above the original, the OPT's
    TTL field (DO bit, extended RCODE, version) unchanged, no padding
    (removed as on the uncached path); the rest byte for byte. Fails if
    TTLs are replayed as stored, lowered too much, the OPT's TTL field is
    treated as a TTL, or the upstream's padding is replayed."""
    name = "ttl.example.test"
    pad = struct.pack("!HH", 12, 40) + b"\0" * 40
    srv = faultdot_factory(answer=hook({name: lambda q, n: make_answer(
        q, answer=[a_rr(300, "198.51.100.1"), a_rr(300, "198.51.100.2")],
        authority=[RR(TYPE_NS, 200, name_wire("ns1.example.test"), "example.test")],
        additional=[a_rr(100, "198.51.100.53", "ns1.example.test")], opt=pad)}))
    d = start_dotp(dotp_factory, [srv])
    a1, _ = ask(d, qwire(name, edns=1232, do=True))
    t1 = time.monotonic()
    assert ttls(a1) == [300, 300, 200, 100] and opt_ttl(a1) == 0x8000, describe(a1)
    sleep_until(t1 + 1.1)
    a2, _ = ask(d, qwire(name, edns=1232, do=True))
    settle()
    assert srv.queries_for(name) == 1, _ctx(d, srv)
    got = ttls(a2)
    assert all(t - 2 <= g <= t - 1 for t, g in zip([300, 300, 200, 100], got)), \
        "TTLs after 1.1 s: %s (want 299 299 199 99)" % got
    assert opt_ttl(a2) == 0x8000, "OPT TTL field %#x" % opt_ttl(a2)
    assert 12 not in opt_codes(a1) and 12 not in opt_codes(a2), describe(a2)
    assert masked(a2) == masked(a1)
    cache_counters(d)


def test_lifetime_from_answer_and_authority(dotp_factory, faultdot_factory):
    """(spec: lifetimes) A NOERROR answer lives for the smallest TTL of its
    answer and authority records, not the additional ones: A TTL 300 with
    an NS TTL 1 in authority goes upstream again at 1.3 s; A TTL 300 with
    glue TTL 1 in additional is still a hit at 1.3 s, the glue replayed
    with TTL 0 (never below 0, never wrapped). Fails if authority TTLs
    are ignored or additional ones counted."""
    ns = lambda ttl: RR(TYPE_NS, ttl, name_wire("ns1.example.test"), "example.test")  # noqa: E731
    srv = faultdot_factory(answer=hook({
        "authmin.example.test": lambda q, n: make_answer(
            q, answer=[a_rr(300, "198.51.100.1")], authority=[ns(1)]),
        "addmin.example.test": lambda q, n: make_answer(
            q, answer=[a_rr(300, "198.51.100.1")], authority=[ns(300)],
            additional=[a_rr(1, "198.51.100.53", "ns1.example.test")]),
    }))
    d = start_dotp(dotp_factory, [srv])
    ask(d, qwire("authmin.example.test"))
    ask(d, qwire("addmin.example.test"))
    t1 = time.monotonic()
    sleep_until(t1 + 1.3)
    ask(d, qwire("authmin.example.test"))
    a, _ = ask(d, qwire("addmin.example.test"))
    settle()
    assert srv.queries_for("authmin.example.test") == 2, "authority TTL 1 not counted"
    assert srv.queries_for("addmin.example.test") == 1, "additional TTL 1 counted"
    assert ttls(a) == [299, 299, 0], describe(a)
    cache_counters(d)


def test_not_cached_tc_and_over_8192(dotp_factory, faultdot_factory):
    """(spec: never cached) An upstream answer with TC set, and one of 8193
    bytes (a TXT answer to an OPT-less TCP client), are not cached: each
    repeat goes upstream; an 8192-byte one is (a hit, replayed whole).
    Fails if TC answers or answers over 8192 bytes are cached, or 8192 is
    refused."""
    tcname = "tc.example.test"
    srv = faultdot_factory(tag=300, edns=True, sized=True, answer=hook({
        tcname: lambda q, n: make_answer(q, tc=True)}))
    d = start_dotp(dotp_factory, [srv])
    ok, over = sized_query_name(8192), sized_query_name(8193)
    for _ in range(2):
        a, _ = ask(d, qwire(tcname))
        assert tc(a), describe(a)
        a, _ = ask(d, qwire(ok, "TXT"), tcp=True)
        assert len(a) == 8192, len(a)
        a, _ = ask(d, qwire(over, "TXT"), tcp=True)
        assert len(a) == 8193, len(a)
    settle()
    seen = {n: srv.queries_for(n) for n in (tcname, ok, over)}
    assert seen == {tcname: 2, ok: 1, over: 2}, "upstream queries: %s" % seen
    c = cache_counters(d)
    assert c["cache_hits"] == 1, c


def test_ttl_clamps(dotp_factory, faultdot_factory):
    """(spec: lifetimes) One dotp with --cache-max-ttl 1 --cache-neg-ttl 1: an
    answer with TTL 300 and an NXDOMAIN with SOA TTL/MINIMUM 300 are hits
    at 0.3 s and go upstream again at 1.3 s. Another with --cache-min-ttl 3:
    an answer with TTL 1 is still a hit at 2.2 s, replayed with TTL 0
    (never below 0, never wrapped). Fails if the clamps are ignored or a
    TTL goes negative."""
    srv = faultdot_factory(answer=hook({
        "long.example.test": lambda q, n: make_answer(q, answer=[a_rr(300, "198.51.100.1")]),
        "neg.example.test": lambda q, n: make_answer(q, rcode=RCODE_NXDOMAIN,
                                                     authority=[soa_rr(300, 300)]),
        "tiny.example.test": lambda q, n: make_answer(q, answer=[a_rr(1, "198.51.100.3")]),
    }))
    dmax = start_dotp(dotp_factory, [srv], ["--cache-max-ttl", "1", "--cache-neg-ttl", "1"])
    dmin = start_dotp(dotp_factory, [srv], ["--cache-min-ttl", "3"])
    ask(dmax, qwire("long.example.test"))
    ask(dmax, qwire("neg.example.test"))
    ask(dmin, qwire("tiny.example.test"))
    t1 = time.monotonic()
    sleep_until(t1 + 0.3)
    ask(dmax, qwire("long.example.test"))
    ask(dmax, qwire("neg.example.test"))
    settle()
    assert srv.queries_for("long.example.test") == 1
    assert srv.queries_for("neg.example.test") == 1
    sleep_until(t1 + 1.3)
    ask(dmax, qwire("long.example.test"))
    ask(dmax, qwire("neg.example.test"))
    settle()
    assert srv.queries_for("long.example.test") == 2, "--cache-max-ttl 1 ignored"
    assert srv.queries_for("neg.example.test") == 2, "--cache-neg-ttl 1 ignored"
    sleep_until(t1 + 2.2)
    a, _ = ask(dmin, qwire("tiny.example.test"))
    settle()
    assert srv.queries_for("tiny.example.test") == 1, "--cache-min-ttl 3 ignored"
    assert ttls(a) == [0], describe(a)
    cache_counters(dmax)
    cache_counters(dmin)


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------

BAD_CACHE_OPTS = [
    (["--cache-size", "63k"], "63k"),
    (["--cache-size", "1025m"], "1025m"),
    (["--cache-size", "12x"], "12x"),
    (["--cache-min-ttl", "86401"], "86401"),
    (["--cache-max-ttl", "0"], "0"),
    (["--cache-max-ttl", "604801"], "604801"),
    (["--cache-neg-ttl", "0"], "0"),
    (["--cache-neg-ttl", "86401"], "86401"),
    (["--serve-stale", "604801"], "604801"),
    (["--serve-stale", "-1"], "-1"),
]


@pytest.mark.parametrize("bad,needle", BAD_CACHE_OPTS,
                         ids=["%s=%s" % (b[0], b[1]) for b, _ in BAD_CACHE_OPTS])
def test_cache_option_out_of_range(pki, ports, bad, needle):
    """(spec: options) A cache option outside its range exits 2 at once with
    a line naming the value. Fails if it is accepted."""
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:9#dot.test",
                  "--ca-file", str(pki.ca_pem)] + bad)
    assert p.returncode == 2, "exit %s for %s\n%s" % (p.returncode, bad, p.stderr)
    assert needle in p.stderr and bad[0] in p.stderr, p.stderr


BAD_CACHE_ENV = [
    ("DOTP_CACHE_SIZE", "2048m"),
    ("DOTP_CACHE_MIN_TTL", "86401"),
    ("DOTP_CACHE_MAX_TTL", "0"),
    ("DOTP_CACHE_NEG_TTL", "0"),
    ("DOTP_SERVE_STALE", "604801"),
]


@pytest.mark.parametrize("var,value", BAD_CACHE_ENV, ids=[v for v, _ in BAD_CACHE_ENV])
def test_cache_env_out_of_range(pki, ports, var, value):
    """(spec: options, env fallback) Each cache option is read from its
    environment variable: a value out of range there exits 2 naming it.
    Fails if the variable is ignored (dotp would start)."""
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:9#dot.test",
                  "--ca-file", str(pki.ca_pem)], env={var: value}, timeout=3)
    assert p.returncode == 2, "exit %s for %s=%s\n%s" % (p.returncode, var, value, p.stderr)
    assert value in p.stderr, p.stderr


def test_cache_size_env_and_bounds_accepted(dotp_factory, faultdot_factory):
    """--cache-size 64k and 1m (and DOTP_CACHE_SIZE=65536, bytes without a
    suffix) are accepted and work: a repeat is a hit. Fails if a value in
    range is rejected."""
    srv = faultdot_factory(tag=300)
    for extra, env in ((["--cache-size", "64k"], None), (["--cache-size", "1m"], None),
                       ([], {"DOTP_CACHE_SIZE": "65536"})):
        d = start_dotp(dotp_factory, [srv], extra, env=env)
        name = "size-ok-%d.example.test" % d.port
        ask(d, qwire(name))
        ask(d, qwire(name))
        c = cache_counters(d)
        assert c["cache_hits"] == 1, (extra, env, c)
