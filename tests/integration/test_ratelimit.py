"""Per-client rate limit (issue 15, item 2; /work/spec/issue15.md section 2):
--rate-limit QPS[:BURST] / DOTP_RATE_LIMIT, --rate-limit-prefix V4:V6 /
DOTP_RATE_LIMIT_PREFIX.

A client is its source address masked to the prefix (default 32:64). Every
query takes a token from its bucket (BURST deep, refilled at QPS). Over the
limit, UDP gets a minimal TC answer (at most QPS a second, a bucket of its
own, also BURST deep), then nothing; TCP is paused, never dropped or
closed. A table of 8192 clients, fixed memory, least recently seen evicted.

Every 127/8 address is local in the suite's network namespace, so a test
picks its clients' source addresses: one bind() per client, or (for the
100,000-client table test) one socket and an IP_PKTINFO control message per
datagram. Nothing here uses 127.0.0.1 as a limited client (the dotp
fixture's probe query comes from there).

The upstream is the session's unbound; with the cache on, repeats of a name
are cache hits, which the limit covers too. Each test reads the counters
before and after (they start at 0 but the probe query exists), polls
/metrics rather than sleeping, and is bounded (a few seconds; the table
test ~30 s at most)."""

import re
import select
import socket
import struct
import subprocess
import time

import pytest

from harness import (make_query, set_id, wire_id, rcode, tc_bit, describe, run_dotp,
                     tcp_read_msg, SANITIZER_MARKERS)
from test_metrics import mdotp, scrape, wait_for  # noqa: F401  (mdotp: a fixture)

NAME = "www.example.test"           # 2 A records in the test zone
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)   # Python 3.11 lacks the constant
TABLE = 8192                        # clients the table holds (spec)

RL_COUNTERS = ("ratelimit_truncated", "ratelimit_dropped", "ratelimit_tcp_paused",
               "ratelimit_evictions")


# ==========================================================================
# helpers
# ==========================================================================

def rl(s):
    """The rate-limit families of a parsed /metrics (test_metrics.Scrape):
    {name: value} for the four counters and the clients gauge; each must be
    there exactly once."""
    out = {n: s.get("dotp_%s_total" % n) for n in RL_COUNTERS}
    out["clients"] = s.get("dotp_ratelimit_clients")
    return out


def rl_now(d):
    return rl(scrape(d))


def delta(before, after):
    return {k: after[k] - before[k] for k in RL_COUNTERS}


def exit_values(log, keys=RL_COUNTERS):
    """key=N values of dotp's 'dotp exiting' line (None: no such line)."""
    for line in reversed(log.splitlines()):
        if "dotp exiting" in line:
            return {k: int(m.group(1)) for k in keys
                    for m in [re.search(r"\b%s=(\d+)" % k, line)] if m}
    return None


def ctx(d):
    return "\n--- dotp stderr (tail):\n%s" % d.log()[-2500:]


def udp_socket(source, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    s.bind((source, 0))
    s.setblocking(False)
    return s


def drain(s, into, now=None):
    """Read every datagram waiting on non-blocking `s` into `into`
    {qid: (wire, arrival)} (first answer per ID kept; a second one for an
    ID is recorded under ('dup', qid))."""
    while True:
        try:
            data = s.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        t = time.monotonic()
        if len(data) < 2:
            continue
        k = wire_id(data)
        if k in into:
            into[("dup", k)] = (data, t)
        else:
            into[k] = (data, t)


def collect(socks, until, quiet=0.4, want=None):
    """Read answers on `socks` (list of (sock, dict)) until `until`
    (monotonic), or until nothing came for `quiet` s once `want()` is true
    (or at all, when want is None)."""
    last = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= until:
            return
        if now - last >= quiet and (want is None or want()):
            return
        r, _, _ = select.select([s for s, _ in socks], [], [], min(0.05, until - now))
        for s, into in socks:
            if s in r:
                n0 = len(into)
                drain(s, into)
                if len(into) != n0:
                    last = time.monotonic()


def normal(a):
    """An ordinary answer to a query for NAME: NOERROR, not TC, with the
    test zone's two A records."""
    return (not tc_bit(a)) and rcode(a) == 0 and struct.unpack("!H", a[6:8])[0] >= 1


def question_of(q):
    """The question section's bytes of a query with one question."""
    pos = 12
    while q[pos] != 0:
        pos += 1 + q[pos]
    return q[12:pos + 5]


def tc_problems(a, q):
    """What is wrong with `a` as the spec's minimal TC answer to `q`
    (empty: nothing)."""
    bad = []
    if len(a) < 12:
        return ["shorter than a header: %r" % a]
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", a[:12])
    qflags = struct.unpack("!H", q[2:4])[0]
    if qid != wire_id(q):
        bad.append("ID %d, the query's is %d" % (qid, wire_id(q)))
    if not flags & 0x8000:
        bad.append("QR not set")
    if (flags >> 11) & 0xF != 0:
        bad.append("opcode %d" % ((flags >> 11) & 0xF))
    if not flags & 0x0200:
        bad.append("TC not set")
    if bool(flags & 0x0100) != bool(qflags & 0x0100):
        bad.append("RD %d, the query's %d" % (bool(flags & 0x0100), bool(qflags & 0x0100)))
    if flags & 0xF:
        bad.append("RCODE %d (want NOERROR)" % (flags & 0xF))
    if (qd, an, ns, ar) != (1, 0, 0, 0):
        bad.append("counts QD/AN/NS/AR %d/%d/%d/%d (want 1/0/0/0: the question "
                   "only, no OPT)" % (qd, an, ns, ar))
    qq = question_of(q)
    if a[12:] != qq:
        bad.append("body %r is not the question echoed (%r)" % (a[12:], qq))
    if len(a) > len(q):
        bad.append("%d bytes, more than the query's %d" % (len(a), len(q)))
    return bad


def blast(d, source, n, qid0, edns=False, name=NAME):
    """n UDP queries for `name` from `source`, back to back on one socket.
    Returns (sock, queries {qid: wire}, answers {} to be filled by collect,
    send start, send end)."""
    s = udp_socket(source)
    tmpl = make_query(name, "A", qid=qid0, edns=edns)
    qs = {qid0 + i: set_id(tmpl, qid0 + i) for i in range(n)}
    t0 = time.monotonic()
    for q in qs.values():
        while True:
            try:
                s.sendto(q, (d.host, d.port))
                break
            except BlockingIOError:
                select.select([], [s], [], 0.1)
    return s, qs, {}, t0, time.monotonic()


def last_arrival(answers, default):
    return max([t for _, t in answers.values()] + [default])


# ==========================================================================
# 1. UDP over the limit: BURST normal, then TC (at most QPS/s), then drops;
#    another client under the limit is untouched; the counters
# ==========================================================================

def test_udp_over_limit_tc_then_drop_other_client_untouched(mdotp, upstream):
    QPS, BURST, N = 20, 10, 200
    d = mdotp([upstream], extra=["--rate-limit", "%d:%d" % (QPS, BURST)])
    before = rl_now(d)
    assert before["clients"] <= TABLE, before

    # A: 200 queries back to back (with EDNS: the TC answer must drop the OPT)
    sa, qa, ansa, t0, t_sent = blast(d, "127.0.0.2", N, 0x1000, edns=True)
    # B: one query every 80 ms (12.5 qps, under 20) from right after A's
    # burst, while dotp works through it, for 1.2 s
    sb = udp_socket("127.0.0.3")
    ansb, qb = {}, {}
    try:
        for i in range(15):
            q = make_query(NAME, "A", qid=0x2000 + i)
            qb[0x2000 + i] = q
            sb.sendto(q, (d.host, d.port))
            collect([(sa, ansa), (sb, ansb)], time.monotonic() + 0.08, quiet=1e9)
        collect([(sa, ansa), (sb, ansb)], time.monotonic() + 2.0, quiet=0.5,
                want=lambda: len(ansb) >= len(qb))
    finally:
        sa.close()
        sb.close()

    # --- B: every query answered normally (its own bucket) ---------------
    bad_b = ["id %#x: %s" % (k, "no answer" if k not in ansb else describe(ansb[k][0]))
             for k in qb if k not in ansb or not normal(ansb[k][0])]
    assert not bad_b, ("client B (127.0.0.3, 12.5 qps, under --rate-limit %d:%d) must "
                       "get every answer normally while A floods; %d of %d not:\n%s%s"
                       % (QPS, BURST, len(bad_b), len(qb), "\n".join(bad_b[:5]), ctx(d)))

    # --- A: the shape of what came back ----------------------------------
    dups = [k for k in ansa if isinstance(k, tuple)]
    assert not dups, "two answers for one query: %s" % dups[:5]
    span = last_arrival(ansa, t_sent) - t0        # dotp worked within this
    cap = BURST + QPS * span + 1                  # tokens a bucket can give
    order = sorted(qa)
    kinds = []
    for k in order:
        a = ansa.get(k)
        if a is None:
            kinds.append("-")
        elif normal(a[0]):
            kinds.append("A")
        elif tc_bit(a[0]):
            kinds.append("T")
        else:
            kinds.append("?")
    shape = "".join(kinds)
    n_norm, n_tc, n_none = shape.count("A"), shape.count("T"), shape.count("-")
    info = ("client A's %d queries (A normal, T truncated, - none, ? other) in %.2f s: "
            "%s\n(normal %d, TC %d, none %d; a bucket gives at most %.1f in that "
            "time)%s" % (N, span, shape, n_norm, n_tc, n_none, cap, ctx(d)))
    assert "?" not in shape, "answers that are neither normal nor TC: " + info
    for k in order:
        if k in ansa and tc_bit(ansa[k][0]):
            p = tc_problems(ansa[k][0], qa[k])
            assert not p, "TC answer to id %#x is not the minimal one: %s\nquery %r\n" \
                "answer %r\n%s" % (k, "; ".join(p), qa[k], ansa[k][0], info)
    assert shape[:BURST] == "A" * BURST, \
        "the first BURST (%d) queries must be answered normally: %s" % (BURST, info)
    assert "-" not in shape[:2 * BURST], \
        "the %d queries after the first BURST must get an answer (normal or TC: the " \
        "TC bucket is BURST deep): %s" % (BURST, info)
    assert BURST <= n_norm <= cap, "normal answers out of bounds: " + info
    assert BURST <= n_tc <= cap, "TC answers out of bounds (the TC bucket is " \
        "BURST deep too): " + info
    # TC only once the normal bucket is empty; drops only once both are:
    # after the first drop, at most what refilled meanwhile is answered
    first_drop = shape.find("-")
    assert first_drop > 0, "nothing dropped out of %d queries at %d qps: %s" % (
        N, QPS, info)
    assert shape.find("T") >= BURST, "a TC answer before the bucket was empty: " + info
    late = len(shape[first_drop:]) - shape[first_drop:].count("-")
    assert late <= 2 * (QPS * span + 1), "answered after the first drop: %d: %s" % (
        late, info)
    assert n_none >= N - 2 * cap, "too few dropped: " + info

    # --- the counters: exactly what A saw (B was never limited) -----------
    want = {"ratelimit_truncated": n_tc, "ratelimit_dropped": n_none}
    got = {}

    def settled():
        got.update(delta(before, rl_now(d)))
        return all(got[k] == v for k, v in want.items())
    wait_for(settled, 2.0, step=0.1)
    assert got["ratelimit_truncated"] == n_tc and got["ratelimit_dropped"] == n_none, (
        "/metrics moved by %s; client A got %d TC answers and %d queries went "
        "unanswered (want dotp_ratelimit_truncated_total +%d, "
        "dotp_ratelimit_dropped_total +%d)\n%s" % (got, n_tc, n_none, n_tc, n_none, info))
    assert got["ratelimit_tcp_paused"] == 0, got
    after = rl_now(d)
    assert 2 <= after["clients"] <= TABLE, \
        "dotp_ratelimit_clients %s: A and B at least (and the probe's 127.0.0.1)" % after

    # --- the exit line says the same --------------------------------------
    rc = d.stop()
    assert rc == 0, "exit status %s%s" % (rc, ctx(d))
    ex = exit_values(d.log())
    assert ex is not None, "no 'dotp exiting' line" + ctx(d)
    for k in RL_COUNTERS:   # `after` is the last scrape; no query since
        assert k in ex, "exit line has no %s=%s" % (k, ctx(d))
        assert ex[k] == after[k], "exit line %s=%d, /metrics said %d%s" % (
            k, ex[k], after[k], ctx(d))


def test_burst_defaults_to_qps(mdotp, upstream):
    """--rate-limit 8 (no BURST): 8 normal answers, then TC, then drops."""
    QPS = 8
    d = mdotp([upstream], extra=["--rate-limit", str(QPS)])
    s, qs, ans, t0, t_sent = blast(d, "127.0.0.6", 60, 0x3000)
    try:
        collect([(s, ans)], time.monotonic() + 1.5, quiet=0.4)
    finally:
        s.close()
    span = last_arrival(ans, t_sent) - t0
    shape = "".join("-" if k not in ans else "A" if normal(ans[k][0])
                    else "T" if tc_bit(ans[k][0]) else "?" for k in sorted(qs))
    cap = QPS + QPS * span + 1
    info = "60 queries in %.2f s, --rate-limit %d: %s%s" % (span, QPS, shape, ctx(d))
    assert shape[:QPS] == "A" * QPS, "BURST defaults to QPS (%d): %s" % (QPS, info)
    assert QPS <= shape.count("A") <= cap and QPS - 1 <= shape.count("T") <= cap, info
    assert shape.count("-") >= 60 - 2 * cap, info


# ==========================================================================
# 2. a client that got TC retries over TCP and gets its answer (dig)
# ==========================================================================

def test_tc_answer_makes_dig_retry_over_tcp(mdotp, upstream):
    BURST = 5
    d = mdotp([upstream], extra=["--rate-limit", "1:%d" % BURST])
    before = rl_now(d)
    # use up 127.0.0.2's bucket (refill: one token a second)
    s, qs, ans, _, _ = blast(d, "127.0.0.2", BURST, 0x4000)
    try:
        collect([(s, ans)], time.monotonic() + 2.0, quiet=0.3,
                want=lambda: len(ans) >= BURST)
    finally:
        s.close()
    assert len(ans) == BURST and all(normal(a) for a, _ in ans.values()), \
        "the first BURST queries are answered normally: %d of %d%s" % (
            sum(1 for a, _ in ans.values() if normal(a)), BURST, ctx(d))
    cmd = ["dig", "-b", "127.0.0.2", "@%s" % d.host, "-p", str(d.port), "+nocookie",
           "+time=5", "+tries=1", NAME, "A"]
    t = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=20)
    took = time.monotonic() - t
    out = p.stdout
    assert p.returncode == 0, "%s: exit %d\n%s%s" % (" ".join(cmd), p.returncode, out, ctx(d))
    assert "Truncated, retrying in TCP mode" in out, \
        "dig over UDP after the bucket was used up should get TC and retry over TCP:\n" \
        "%s%s" % (out, ctx(d))
    assert "status: NOERROR" in out and "192.0.2.10" in out and "192.0.2.11" in out, \
        "the TCP retry should get the whole answer:\n" + out
    assert re.search(r"flags: qr[^;]*;", out) and not re.search(r"flags:[^;]* tc[ ;]", out), \
        "the final (TCP) answer must not be truncated:\n" + out
    assert took < 4.0, "dig took %.1f s (TCP waits at most ~1 s for a token)" % took
    dl = delta(before, rl_now(d))
    assert dl["ratelimit_truncated"] == 1 and dl["ratelimit_dropped"] == 0, dl


# ==========================================================================
# 3. TCP over the limit: paused, not closed, not dropped
# ==========================================================================

def test_tcp_over_limit_is_paced_not_closed(mdotp, upstream):
    QPS, BURST, N = 10, 5, 25
    # --timeout 10 s: answers late because of the pacing (2 s) are not
    # SERVFAILs at a deadline
    d = mdotp([upstream], extra=["--rate-limit", "%d:%d" % (QPS, BURST),
                                 "--timeout", "10000"])
    before = rl_now(d)
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.bind(("127.0.0.4", 0))
    c.settimeout(3)
    c.connect((d.host, d.port))
    try:
        qs = {0x5000 + i: make_query(NAME, "A", qid=0x5000 + i) for i in range(N)}
        t0 = time.monotonic()
        c.sendall(b"".join(struct.pack("!H", len(q)) + q for q in qs.values()))
        got = []                       # (arrival - t0, answer)
        deadline = t0 + 8.0
        try:
            while len(got) < N:
                a = tcp_read_msg(c, deadline)
                got.append((time.monotonic() - t0, a))
        except (OSError, ConnectionError) as e:
            pytest.fail("TCP client at %d qps over --rate-limit %d:%d: %d of %d answers, "
                        "then %s: %s%s" % (N, QPS, BURST, len(got), N, type(e).__name__, e,
                                           ctx(d)), pytrace=False)
        times = ["%.2f" % t for t, _ in got]
        info = "answers at %s s%s" % (", ".join(times), ctx(d))
        ids = sorted(wire_id(a) for _, a in got)
        assert ids == sorted(qs), "IDs answered %s, want %s" % (ids, sorted(qs))
        bad = [describe(a) for _, a in got if not normal(a)]
        assert not bad, "every paced TCP answer must be a normal one:\n%s\n%s" % (
            bad[0], info)
        # the first BURST at once, the rest one per 1/QPS s: answer k (0-based)
        # needs k+1 tokens, BURST + QPS*t of them by time t
        assert got[BURST - 1][0] < 0.5, "the first %d answers should come at once: %s" % (
            BURST, info)
        for k in range(BURST, N):
            earliest = (k + 1 - BURST) / QPS - 0.15
            assert got[k][0] >= earliest, \
                "answer %d came at %.2f s, before %.2f s: not paced: %s" % (
                    k + 1, got[k][0], earliest, info)
        total = got[-1][0]
        assert (N - BURST) / QPS - 0.25 <= total < 4.0, \
            "%d answers took %.2f s; paced at %d qps after %d: about %.1f s: %s" % (
                N, total, QPS, BURST, (N - BURST) / QPS, info)
        # still open and still served: one more query on the same connection
        q = make_query(NAME, "A", qid=0x5100)
        c.sendall(struct.pack("!H", len(q)) + q)
        a = tcp_read_msg(c, time.monotonic() + 2.0)
        assert wire_id(a) == 0x5100 and normal(a), describe(a)
    finally:
        c.close()
    dl = delta(before, rl_now(d))
    assert dl["ratelimit_tcp_paused"] > 0, \
        "dotp_ratelimit_tcp_paused_total did not move: %s" % dl
    assert dl["ratelimit_truncated"] == 0 and dl["ratelimit_dropped"] == 0, \
        "TCP is never truncated or dropped: %s" % dl


# ==========================================================================
# 4. the table: 100,000 clients, 8192 kept, fixed memory
# ==========================================================================

def _pktinfo(src):
    return [(socket.IPPROTO_IP, IP_PKTINFO,
             struct.pack("=I4s4s", 0, socket.inet_aton(src), b"\0" * 4))]


def pktinfo_works():
    """Whether a datagram sent with IP_PKTINFO's ipi_spec_dst leaves from
    that address (checked against a local socket)."""
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        r.bind(("127.0.0.1", 0))
        r.settimeout(1)
        s.bind(("0.0.0.0", 0))
        s.sendmsg([b"x"], _pktinfo("127.9.8.7"), 0, r.getsockname())
        _, addr = r.recvfrom(16)
        return addr[0] == "127.9.8.7"
    except OSError:
        return False
    finally:
        r.close()
        s.close()


def client_addr(i):
    """The i-th sprayed client: 127.1.0.0 onwards (127.0.0.x is left to the
    other tests)."""
    return "127.%d.%d.%d" % (1 + (i >> 16), (i >> 8) & 255, i & 255)


class Sprayer:
    """One query per source address, `window` in flight at most; an
    answer not back within `lost_after` s counts as lost. IP_PKTINFO on one
    socket, or (fallback) a socket bound to each source."""

    def __init__(self, host, port, query, use_pktinfo, window=256, lost_after=0.5,
                 addr=client_addr):
        self.addr = addr
        self.dst = (host, port)
        self.query = query
        self.window, self.lost_after = window, lost_after
        self.use_pktinfo = use_pktinfo
        self.sent = self.answered = self.lost = self.not_normal = 0
        self.examples = []
        self.pending = {}      # fallback: sock -> send time
        if use_pktinfo:
            self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            self.s.bind(("0.0.0.0", 0))
            self.s.setblocking(False)

    def _check(self, a):
        self.answered += 1
        if not normal(a):
            self.not_normal += 1
            if len(self.examples) < 3:
                self.examples.append(describe(a))

    def send_one(self, i):
        q = set_id(self.query, i & 0xFFFF)
        if self.use_pktinfo:
            while True:
                try:
                    self.s.sendmsg([q], _pktinfo(self.addr(i)), 0, self.dst)
                    break
                except BlockingIOError:
                    select.select([], [self.s], [], 0.05)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((self.addr(i), 0))
            s.setblocking(False)
            s.sendto(q, self.dst)
            self.pending[s] = time.monotonic()
        self.sent += 1

    def outstanding(self):
        return self.sent - self.answered - self.lost

    def poll(self, timeout):
        if self.use_pktinfo:
            r, _, _ = select.select([self.s], [], [], timeout)
            if r:
                while True:
                    try:
                        self._check(self.s.recv(65535))
                    except (BlockingIOError, InterruptedError):
                        break
                self.last_progress = time.monotonic()
            elif time.monotonic() - self.last_progress > self.lost_after:
                self.lost += self.outstanding()
                self.last_progress = time.monotonic()
        else:
            r, _, _ = select.select(list(self.pending), [], [], timeout)
            for s in r:
                try:
                    self._check(s.recv(65535))
                except (BlockingIOError, InterruptedError):
                    continue
                del self.pending[s]
                s.close()
            now = time.monotonic()
            for s, t in list(self.pending.items()):
                if now - t > self.lost_after:
                    del self.pending[s]
                    s.close()
                    self.lost += 1

    def run(self, n, deadline, on_tick=None, tick=0.5):
        self.last_progress = time.monotonic()
        next_tick = time.monotonic()
        i = 0
        while (i < n or self.outstanding() > 0) and time.monotonic() < deadline:
            while i < n and self.outstanding() < self.window:
                self.send_one(i)
                i += 1
            self.poll(0.02)
            if on_tick and time.monotonic() >= next_tick:
                on_tick()
                next_tick = time.monotonic() + tick
        return i

    def close(self):
        if self.use_pktinfo:
            self.s.close()
        for s in self.pending:
            s.close()


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def test_table_is_bounded_100k_clients(mdotp, upstream):
    N = 100000
    use_pktinfo = pktinfo_works()
    # --rate-limit 1:2: one query from each client leaves its bucket short of
    # full for a second, so a client is still "in use" when it is evicted
    # (a design that reclaimed full buckets silently would count fewer
    # evictions; see the message below)
    d = mdotp([upstream], extra=["--rate-limit", "1:2"])
    q = make_query(NAME, "A", qid=1)
    # the answer is cached before the spray (every sprayed query a hit)
    s0 = udp_socket("127.0.0.7")
    try:
        s0.sendto(q, (d.host, d.port))
        got = {}
        collect([(s0, got)], time.monotonic() + 3.0, quiet=0.2, want=lambda: got)
        assert got and normal(next(iter(got.values()))[0]), "no answer to the warm-up"
    finally:
        s0.close()
    pid = d.proc.pid
    before = rl_now(d)
    rss0 = vm_rss_kib(pid)
    samples = [before["clients"]]
    rss_max = [rss0]

    def tick():
        samples.append(rl_now(d)["clients"])
        rss_max[0] = max(rss_max[0], vm_rss_kib(pid))

    sp = Sprayer(d.host, d.port, q, use_pktinfo)
    t0 = time.monotonic()
    try:
        sent = sp.run(N, t0 + 30.0, on_tick=tick)
    finally:
        sp.close()
    took = time.monotonic() - t0
    how = "IP_PKTINFO" if use_pktinfo else "a socket bound per source"
    info = ("%d of %d clients sent in %.1f s (%s): %d answered, %d not normal (%s), "
            "%d lost; dotp_ratelimit_clients samples %s%s" % (
                sent, N, took, how, sp.answered, sp.not_normal, sp.examples[:1],
                sp.lost, samples[::max(1, len(samples) // 20)], ctx(d)))
    assert d.proc.poll() is None, "dotp exited during the spray: " + info
    assert sent == N, "the spray did not finish within 30 s: " + info
    # every client's single query is within its burst: answered normally
    assert sp.not_normal == 0, "a client's first query must not be limited: " + info
    assert sp.answered >= N * 0.99, "dotp stopped answering: " + info
    # dotp still serves: a control client
    c = udp_socket("127.0.0.8")
    try:
        c.sendto(set_id(q, 0x6006), (d.host, d.port))
        got = {}
        collect([(c, got)], time.monotonic() + 3.0, quiet=0.2, want=lambda: got)
        assert 0x6006 in got and normal(got[0x6006][0]), "control client: no answer " + info
    finally:
        c.close()
    after = rl_now(d)
    samples.append(after["clients"])
    rss1 = vm_rss_kib(pid)
    rss_max[0] = max(rss_max[0], rss1)
    assert max(samples) <= TABLE, "dotp_ratelimit_clients above %d: %s" % (TABLE, info)
    # 100,000 clients over 2048 sets of 4: ~49 a set, every set full
    assert after["clients"] >= TABLE * 0.95, \
        ("after %d distinct clients the table should be full (%d), gauge %d: the "
         "hash puts the clients in few sets? %s" % (N, TABLE, after["clients"], info))
    ev = after["ratelimit_evictions"] - before["ratelimit_evictions"]
    slack = sp.lost + 64
    assert ev >= N - TABLE - slack, \
        ("dotp_ratelimit_evictions_total +%d, want >= %d (%d clients, %d fit): %s"
         % (ev, N - TABLE - slack, N, TABLE, info))
    assert ev <= N + 2, "more evictions (%d) than clients (%d)" % (ev, N)
    grew = rss_max[0] - rss0
    assert grew < 1536, ("VmRSS grew by %d KiB (%d -> max %d KiB) over %d clients: the "
                         "table is fixed memory: %s" % (grew, rss0, rss_max[0], N, info))
    dl = delta(before, after)
    assert dl["ratelimit_truncated"] == 0 and dl["ratelimit_dropped"] == 0, dl


def test_flooder_not_forgotten_when_others_come(mdotp, upstream):
    """A client over its limit stays over it while 200 other clients (its
    /16, one query each) come and go: 200 new clients over 2048 sets of 4
    ways almost never fill the flooder's set, so it is not evicted (an
    eviction forgets its empty bucket: it would get BURST fresh tokens)."""
    BURST = 5
    d = mdotp([upstream], extra=["--rate-limit", "1:%d" % BURST])
    flooder = "127.3.0.2"
    s, qs, ans, t0, _ = blast(d, flooder, 2 * BURST, 0xA000)
    try:
        collect([(s, ans)], time.monotonic() + 1.0, quiet=0.15,
                want=lambda: len(ans) >= 2 * BURST)
        first = "".join("-" if k not in ans else "A" if normal(ans[k][0])
                        else "T" if tc_bit(ans[k][0]) else "?" for k in sorted(qs))
        assert first == "A" * BURST + "T" * BURST, "the flooder's first %d: %s%s" % (
            2 * BURST, first, ctx(d))
        before = rl_now(d)
        q = make_query(NAME, "A", qid=1)
        sp = Sprayer(d.host, d.port, q, pktinfo_works(),
                     addr=lambda i: "127.3.%d.%d" % (1 + i // 250, 1 + i % 250))
        try:
            sp.run(200, time.monotonic() + 5.0)
        finally:
            sp.close()
        assert sp.answered == 200 and sp.not_normal == 0, \
            "200 new clients, one query each: %d answered, %d not normal" % (
                sp.answered, sp.not_normal)
        mid = rl_now(d)
        more = {}
        for i in range(BURST):
            q = make_query(NAME, "A", qid=0xA100 + i)
            s.sendto(q, (d.host, d.port))
        collect([(s, more)], time.monotonic() + 1.0, quiet=0.3)
        took = time.monotonic() - t0
        again = "".join("-" if 0xA100 + i not in more else "A"
                        if normal(more[0xA100 + i][0]) else "T"
                        for i in range(BURST))
    finally:
        s.close()
    ev = mid["ratelimit_evictions"] - before["ratelimit_evictions"]
    assert again.count("A") <= 1 + int(took), \
        ("the flooder (%s, --rate-limit 1:%d, bucket empty) sent %d more after 200 "
         "other clients of %s/16 came: %s (A normal, T TC, - none) in %.2f s since "
         "its first query; the 200 made %d evictions and the table holds %d clients: "
         "it was evicted and forgotten, its bucket full again%s"
         % (flooder, BURST, BURST, "127.3.0.0", again, took, ev, mid["clients"], ctx(d)))


# ==========================================================================
# 5. --rate-limit-prefix: clients are addresses masked to the prefix
# ==========================================================================

def _flood_then(d, flooder, others, n_flood=30, family=socket.AF_INET, dst=None):
    """n_flood queries from `flooder` back to back, then (at once) 3 from
    each of `others`; returns {source: kinds string}."""
    dst = dst or (d.host, d.port)
    socks = {}
    res = {}
    try:
        for src in [flooder] + list(others):
            socks[src] = udp_socket(src, family)
        for i in range(n_flood):
            socks[flooder].sendto(make_query(NAME, "A", qid=0x7000 + i), dst)
        # give dotp the flood first (all of it taken off its socket)
        ans = {src: {} for src in socks}
        collect([(socks[flooder], ans[flooder])], time.monotonic() + 1.0, quiet=0.15)
        for src in others:
            for i in range(3):
                socks[src].sendto(make_query(NAME, "A", qid=0x7100 + i), dst)
        collect([(socks[s], ans[s]) for s in socks], time.monotonic() + 1.5, quiet=0.4)
        for src in socks:
            base = 0x7000 if src == flooder else 0x7100
            n = n_flood if src == flooder else 3
            res[src] = "".join(
                "-" if base + i not in ans[src] else "A" if normal(ans[src][base + i][0])
                else "T" if tc_bit(ans[src][base + i][0]) else "?" for i in range(n))
    finally:
        for s in socks.values():
            s.close()
    return res


@pytest.mark.parametrize("prefix", [None, "32:64", "24:64"])
def test_prefix_v4(mdotp, upstream, prefix):
    extra = ["--rate-limit", "1:10"]          # refill one a second: none during the test
    if prefix:
        extra += ["--rate-limit-prefix", prefix]
    d = mdotp([upstream], extra=extra)
    # 127.0.5.0/24: no other query comes from it (the probe is 127.0.0.1's)
    a, b, other = "127.0.5.2", "127.0.5.3", "127.0.6.3"
    res = _flood_then(d, a, [b, other])
    info = "--rate-limit 1:10%s: %s (A normal, T TC, - none)%s" % (
        "" if not prefix else " --rate-limit-prefix " + prefix, res, ctx(d))
    assert res[a][:10] == "A" * 10 and "-" in res[a], info
    # another /24: never limited by the flooder
    assert res[other] == "AAA", info
    if prefix == "24:64":
        assert "A" not in res[b], \
            "%s is the same /24 client as %s, whose bucket is empty: %s" % (b, a, info)
    else:
        assert res[b] == "AAA", "/32: %s is a client of its own: %s" % (b, info)


def test_prefix_v4_on_dual_stack_listener(mdotp, upstream, ports):
    """A [::] listener alone takes IPv4 clients too, as ::ffff:a.b.c.d: they
    are still cut to the V4 prefix (/32), not to /64 (which would make all
    IPv4 clients one)."""
    port = ports.get()
    d = mdotp([upstream], extra=["--rate-limit", "1:10"], listen=["[::]:%d" % port])
    a, b = "127.0.5.2", "127.0.5.3"
    res = _flood_then(d, a, [b], dst=("127.0.0.1", port))
    info = "--rate-limit 1:10 on [::]:%d: %s%s" % (port, res, ctx(d))
    assert res[a][:10] == "A" * 10 and "-" in res[a], info
    assert res[b] == "AAA", "%s is a client of its own on a dual-stack listener: %s" % (
        b, info)


@pytest.fixture
def v6_addrs():
    """ULA addresses (inside the default --allow fc00::/7) on lo: two in
    fd15::/64, one in fd15:0:0:1::/64. Removed afterwards."""
    addrs = ["fd15::2", "fd15::3", "fd15:0:0:1::2"]
    added = []
    try:
        for a in addrs:
            p = subprocess.run(["ip", "-6", "addr", "add", a + "/128", "dev", "lo", "nodad"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if p.returncode != 0:
                pytest.skip("cannot add %s to lo: %s" % (a, p.stdout.strip()))
            added.append(a)
        yield addrs
    finally:
        for a in added:
            subprocess.run(["ip", "-6", "addr", "del", a + "/128", "dev", "lo"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("prefix", [None, "32:128"])
def test_prefix_v6(mdotp, upstream, ports, v6_addrs, prefix):
    port6 = ports.get()
    extra = ["--rate-limit", "1:10"]
    if prefix:
        extra += ["--rate-limit-prefix", prefix]
    d = mdotp([upstream], extra=extra,
              listen=["127.0.0.1:%d" % ports.get(), "[::1]:%d" % port6])
    a, b, other = v6_addrs
    res = _flood_then(d, a, [b, other], family=socket.AF_INET6, dst=("::1", port6))
    info = "--rate-limit 1:10%s over IPv6: %s%s" % (
        "" if not prefix else " --rate-limit-prefix " + prefix, res, ctx(d))
    assert res[a][:10] == "A" * 10 and "-" in res[a], info
    assert res[other] == "AAA", "another /64 is another client: " + info
    if prefix is None:
        assert "A" not in res[b], "default V6 prefix 64: %s and %s are one client: %s" % (
            a, b, info)
    else:
        assert res[b] == "AAA", "/128: %s is a client of its own: %s" % (b, info)


# ==========================================================================
# 6. bad values: exit 2, one line
# ==========================================================================

@pytest.fixture
def base(pki, ports):
    return ["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
            "--ca-file", str(pki.ca_pem)]


def usage_error(p, needle):
    found = [m for m in SANITIZER_MARKERS if m in p.stderr]
    assert not found, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, "exit status %s (want 2)\nstderr:\n%s" % (p.returncode, p.stderr)
    assert len(lines) == 1, "want ONE line on stderr, got %d:\n%s" % (len(lines), p.stderr)
    assert needle in lines[0], "stderr does not contain %r verbatim:\n%s" % (needle, p.stderr)
    assert "rate" in lines[0].lower(), "the line should name the option: " + lines[0]
    return lines[0]


BAD_RATE = ["0", "abc", "10:0", "10:", ":5", "2000000", "1000001", "10:1000001", "-5",
            "10:5:3", "1.5", ""]
BAD_PREFIX = ["33:64", "0:64", "24:129", "24:0", "24", "24:", ":64", "a:b", "24:64:1"]


@pytest.mark.parametrize("v", BAD_RATE, ids=["rate=%r" % v for v in BAD_RATE])
def test_bad_rate_limit(base, v):
    usage_error(run_dotp(base + ["--rate-limit", v], timeout=5), v)


@pytest.mark.parametrize("v", BAD_PREFIX, ids=["prefix=%r" % v for v in BAD_PREFIX])
def test_bad_rate_limit_prefix(base, v):
    usage_error(run_dotp(base + ["--rate-limit", "10", "--rate-limit-prefix", v],
                         timeout=5), v)


BAD_ENV = [("DOTP_RATE_LIMIT", "0"), ("DOTP_RATE_LIMIT", "10:"),
           ("DOTP_RATE_LIMIT", "2000000"), ("DOTP_RATE_LIMIT_PREFIX", "33:64"),
           ("DOTP_RATE_LIMIT_PREFIX", "24")]


@pytest.mark.parametrize("var,v", BAD_ENV, ids=["%s=%s" % e for e in BAD_ENV])
def test_bad_rate_limit_env(base, var, v):
    env = {var: v}
    if var == "DOTP_RATE_LIMIT_PREFIX":
        env["DOTP_RATE_LIMIT"] = "10"
    usage_error(run_dotp(base, env=env, timeout=5), v)


@pytest.mark.parametrize("extra,env", [
    (["--rate-limit", "1000000:1000000", "--rate-limit-prefix", "1:1"], None),
    (["--rate-limit", "1", "--rate-limit-prefix", "32:128"], None),
    ([], {"DOTP_RATE_LIMIT": "5:7", "DOTP_RATE_LIMIT_PREFIX": "16:48"}),
], ids=["max-and-min", "min-and-max", "env"])
def test_limits_of_the_ranges_accepted(mdotp, upstream, extra, env):
    d = mdotp([upstream], extra=extra, env=env)
    assert rl_now(d)["clients"] >= 1, "the probe query's client is in the table" + ctx(d)


def test_env_limit_applies_and_flag_wins(mdotp, upstream):
    """DOTP_RATE_LIMIT=1:3 limits; a --rate-limit flag beside it wins."""
    d = mdotp([upstream], env={"DOTP_RATE_LIMIT": "1:3"})
    s, qs, ans, _, _ = blast(d, "127.0.0.9", 10, 0x8000)
    try:
        collect([(s, ans)], time.monotonic() + 1.5, quiet=0.3)
    finally:
        s.close()
    n = sum(1 for a, _ in ans.values() if normal(a))
    assert n == 3, "DOTP_RATE_LIMIT=1:3, 10 queries: %d normal answers (want 3)%s" % (
        n, ctx(d))
    d2 = mdotp([upstream], env={"DOTP_RATE_LIMIT": "1:3"},
               extra=["--rate-limit", "1:6"])
    s, qs, ans, _, _ = blast(d2, "127.0.0.9", 10, 0x8100)
    try:
        collect([(s, ans)], time.monotonic() + 1.5, quiet=0.3)
    finally:
        s.close()
    n = sum(1 for a, _ in ans.values() if normal(a))
    assert n == 6, "--rate-limit 1:6 over DOTP_RATE_LIMIT=1:3: %d normal (want 6)%s" % (
        n, ctx(d2))


# ==========================================================================
# 7. off by default
# ==========================================================================

def test_off_by_default(mdotp, upstream):
    d = mdotp([upstream])
    before = rl_now(d)   # the families exist (rows of the counter table), at 0
    assert all(before[k] == 0 for k in RL_COUNTERS) and before["clients"] == 0, \
        "without --rate-limit every rate-limit family is 0: %s" % before
    N = 300
    s, qs, ans, _, _ = blast(d, "127.0.0.5", N, 0x9000)
    try:
        collect([(s, ans)], time.monotonic() + 3.0, quiet=0.3,
                want=lambda: len(ans) >= N)
    finally:
        s.close()
    bad = [k for k in qs if k not in ans or not normal(ans[k][0])]
    assert not bad, "without --rate-limit all %d answered normally; %d not (first: " \
        "%s)%s" % (N, len(bad), "no answer" if bad[0] not in ans
                   else describe(ans[bad[0]][0]), ctx(d))
    after = rl_now(d)
    assert all(after[k] == 0 for k in RL_COUNTERS) and after["clients"] == 0, after
    rc = d.stop()
    assert rc == 0
    ex = exit_values(d.log())
    assert ex is not None and all(v == 0 for v in ex.values()), ex
