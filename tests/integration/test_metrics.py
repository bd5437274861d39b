"""--metrics (Prometheus /metrics, /health, /ready over HTTP), DOTP_METRICS
and `dotp healthcheck` (issue 14, first part; the contract is
spec/metrics.md).

Servers, all on 127.0.0.1 inside the suite's network namespace:
  upstream     the session's real unbound (DoT), where answers matter
  faultdot     scripted DoT servers (delay, silent, stray / mismatched
               answers, recycling, idle closes, TTL = tag)
  PlainServer  test_forward.py's plain DNS server (UDP + TCP), for a
               --forward plain zone (spoofed datagrams, TC answers)
A dead upstream is a port nothing listens on (connect refused at once).

Every test reads the families it cares about before and after the event
that should move them, so that the probe query of the dotp fixture and
anything else that happened before do not matter. Every test is bounded
(seconds) and says what would make it fail.
"""

import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import dns.message
import dns.rcode
import pytest

import harness
from harness import (make_query, udp_exchange, tcp_exchange, rcode, describe, run_dotp,
                     tcp_listening, udp_burst, SANITIZER_MARKERS)
from faultdot import (faultdot_factory, expected_a, sized_query_name,  # noqa: F401
                      upstream_spec)
from test_forward import PlainServer
from faultdot import Reply

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool"
                                        if os.path.exists("/usr/bin/promtool") else None)

HIST_BOUNDS = ["0.001", "0.002", "0.005", "0.010", "0.020", "0.050", "0.100", "0.200",
               "0.500", "1.000", "2.000", "5.000"]

# Every family spec/metrics.md names.
PROCESS_COUNTERS = ["queries", "answers", "servfail", "dropped", "formerr", "notimp",
                    "refused", "stray", "mismatched", "spoofed", "truncated_retries",
                    "table_full", "tcp_refused", "udp_send_failed", "cache_hits",
                    "cache_misses", "cache_coalesced", "cache_prefetches", "cache_stale",
                    "cache_evictions"]
PROCESS_GAUGES = ["cache_entries", "cache_bytes"]
UPSTREAM_FAMILIES = {
    "dotp_upstream_sent_total": "counter",
    "dotp_upstream_answered_total": "counter",
    "dotp_upstream_failures_total": "counter",
    "dotp_upstream_recycled_total": "counter",
    "dotp_upstream_handshakes_full_total": "counter",
    "dotp_upstream_handshakes_resumed_total": "counter",
    "dotp_upstream_learned_conn_queries": "gauge",
    "dotp_upstream_learned_idle_seconds": "gauge",
    "dotp_upstream_up": "gauge",
    "dotp_upstream_connections": "gauge",
    "dotp_upstream_srtt_seconds": "gauge",
    "dotp_upstream_response_seconds": "histogram",
}
OTHER_FAMILIES = {
    "dotp_queries_by_transport_total": "counter",
    "dotp_responses_total": "counter",
    "dotp_answer_duration_seconds": "histogram",
    "dotp_queries_in_flight": "gauge",
    "dotp_tcp_clients": "gauge",
    "dotp_build_info": "gauge",
    "process_start_time_seconds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}


# ==========================================================================
# HTTP client and the text format
# ==========================================================================

class HttpResult:
    """What came back on one HTTP connection: raw bytes, whether the server
    closed (eof) or reset it, how long until then, and the parsed response
    (status None when no complete head came back)."""

    def __init__(self, raw, eof, reset, elapsed):
        self.raw, self.eof, self.reset, self.elapsed = raw, eof, reset, elapsed
        self.status, self.reason, self.headers, self.body = None, None, {}, b""
        head, sep, body = raw.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            m = re.match(r"^HTTP/1\.[01] (\d{3}) ?(.*)$", lines[0])
            if m:
                self.status, self.reason = int(m.group(1)), m.group(2)
            for l in lines[1:]:
                k, _, v = l.partition(":")
                self.headers[k.strip().lower()] = v.strip()
            self.body = body

    def text(self):
        return self.body.decode("utf-8", errors="replace")

    def __repr__(self):
        return "<HTTP status=%s eof=%s reset=%s after %.3fs, %d bytes: %r>" % (
            self.status, self.eof, self.reset, self.elapsed, len(self.raw), self.raw[:300])


def http_raw(port, data, host="127.0.0.1", timeout=4.0, source=None, send_delay=None):
    """Connect, send `data` (bytes; with send_delay, one byte per send_delay
    seconds), read until the server closes or `timeout` passes. Returns an
    HttpResult (eof False: still open at the timeout)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    t0 = time.monotonic()
    raw, eof, reset = b"", False, False
    try:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        deadline = t0 + timeout
        try:
            if send_delay is None:
                s.sendall(data)
            else:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    end = time.monotonic() + send_delay
                    # keep an eye out for the server's close while trickling
                    while time.monotonic() < end:
                        s.settimeout(max(0.001, end - time.monotonic()))
                        try:
                            chunk = s.recv(65536)
                        except socket.timeout:
                            continue
                        if not chunk:
                            eof = True
                            break
                        raw += chunk
                    if eof or time.monotonic() > deadline:
                        break
        except (BrokenPipeError, ConnectionResetError):
            reset = True
        while not eof and not reset:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                eof = True
                break
            raw += chunk
    finally:
        s.close()
    return HttpResult(raw, eof, reset, time.monotonic() - t0)


def http(port, path, method="GET", host="127.0.0.1", timeout=4.0, version="HTTP/1.1",
         extra=""):
    req = "%s %s %s\r\nHost: %s\r\n%s\r\n" % (method, path, version, host, extra)
    return http_raw(port, req.encode(), host=host, timeout=timeout)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


class Scrape:
    """A parsed /metrics body: samples [(name, {labels}, value)], TYPE and
    HELP lines by family."""

    def __init__(self, text):
        self.text = text
        self.samples = []
        self.types, self.helps = {}, {}
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] == "TYPE":
                    self.types[parts[2]] = parts[3].strip() if len(parts) > 3 else ""
                elif len(parts) >= 3 and parts[1] == "HELP":
                    self.helps[parts[2]] = parts[3] if len(parts) > 3 else ""
                continue
            m = _SAMPLE.match(line)
            assert m, "unparsable sample line in /metrics: %r" % line
            labels = {}
            if m.group(2):
                rest = m.group(2)
                while rest.strip():
                    lm = _LABEL.match(rest)
                    assert lm, "unparsable labels in /metrics: %r" % line
                    labels[lm.group(1)] = lm.group(2)
                    rest = rest[lm.end():]
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def find(self, name, **labels):
        """[(labels, value)] of samples of `name` whose labels include `labels`."""
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(x) for k, x in labels.items())]

    def get(self, name, **labels):
        """The value of the one sample of `name` with (at least) `labels`."""
        got = self.find(name, **labels)
        assert len(got) == 1, "want exactly one sample %s%s in /metrics, found %d: %s\n%s" % (
            name, labels or "", len(got), got[:5], self.excerpt(name))
        return got[0][1]

    def opt(self, name, default=0.0, **labels):
        got = self.find(name, **labels)
        return got[0][1] if len(got) == 1 else default

    def excerpt(self, prefix=None):
        lines = [l for l in self.text.splitlines()
                 if prefix is None or prefix.split("{")[0].rsplit("_", 1)[0] in l]
        return "\n".join(lines[:60])

    def buckets(self, name, **labels):
        """[(le text, float le, count)] of histogram `name`, in text order."""
        out = []
        for l, v in self.find(name + "_bucket", **labels):
            le = l["le"]
            out.append((le, float("inf") if le == "+Inf" else float(le), v))
        return out


def scrape(d, timeout=3.0):
    """GET /metrics on d's metrics port: 200, parsed."""
    r = http(d.mport, "/metrics", timeout=timeout)
    assert r.status == 200, "GET /metrics: %r\n%s" % (r, d.log()[-1500:])
    return Scrape(r.text())


def check_histogram(s, name, **labels):
    """Buckets of histogram `name`: the spec's bounds then +Inf, cumulative
    (never falling), +Inf == _count. Returns _count."""
    b = s.buckets(name, **labels)
    les = [x[0] for x in b]
    assert les == HIST_BOUNDS + ["+Inf"] or [x[1] for x in b] == [
        float(x) for x in HIST_BOUNDS] + [float("inf")], \
        "%s%s buckets: le=%s (want %s and +Inf)" % (name, labels, les, HIST_BOUNDS)
    counts = [x[2] for x in b]
    assert all(a <= c for a, c in zip(counts, counts[1:])), \
        "%s%s buckets are not cumulative: %s" % (name, labels, list(zip(les, counts)))
    count = s.get(name + "_count", **labels)
    assert counts[-1] == count, "%s%s: +Inf bucket %s != _count %s" % (
        name, labels, counts[-1], count)
    s.get(name + "_sum", **labels)
    return count


def wait_for(pred, timeout, step=0.02):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            return v
        time.sleep(step)


# ==========================================================================
# dotp with --metrics
# ==========================================================================

def spec_of(u):
    """-u value for a FaultDoT / Unbound / port (dead) / string."""
    if isinstance(u, str):
        return u
    if isinstance(u, int):
        return upstream_spec(u)
    if hasattr(u, "tls_port"):
        return upstream_spec(u.tls_port)
    return upstream_spec(u.port)


@pytest.fixture
def mdotp(dotp_factory, ports):
    """start(upstreams, extra=(), env=None, probe=True, cache=True,
    metrics='127.0.0.1:<fresh port>') -> a running dotp with --metrics; its
    metrics port in .mport, the value in .metrics. metrics=None: no
    --metrics flag (give it through env instead, with .mport set by the
    caller)."""
    def start(upstreams, extra=(), env=None, probe=True, cache=True, metrics="auto",
              listen=None, mport=None):
        ex = list(extra)
        if metrics == "auto":
            mport = ports.get()
            metrics = "127.0.0.1:%d" % mport
        if metrics is not None:
            ex += ["--metrics", metrics]
        try:
            d = dotp_factory([spec_of(u) for u in upstreams], listen=listen, extra=ex,
                             env=env, probe=probe, cache=cache)
        except AssertionError as e:
            if "exited early with status 2" in str(e):
                pytest.fail("dotp rejected its arguments %s env %s:\n%s"
                            % (ex, env, str(e)[-1500:]), pytrace=False)
            raise
        d.mport, d.metrics = mport, metrics
        if mport is not None:
            assert wait_for(lambda: tcp_listening(mport), 3.0), \
                "nothing listens on the --metrics port %d 3 s after start\n%s" % (
                    mport, d.log()[-2000:])
        return d
    return start


@pytest.fixture
def plain_factory(ports):
    made = []

    def make(**kw):
        s = PlainServer(kw.pop("port", None) or ports.get(), **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def ask(d, name, rdtype="A", tcp=False, qid=0x5151, timeout=3.0, source=None):
    q = make_query(name, rdtype, qid=qid)
    if source:
        return udp_from(source, d.host, d.port, q, timeout)
    if tcp:
        return tcp_exchange(d.host, d.port, q, timeout=timeout)
    return udp_exchange(d.host, d.port, q, timeout=timeout)


def udp_from(source, host, port, wire, timeout=2.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(wire)
        return s.recv(65535)
    finally:
        s.close()


def raw_udp(d, wire, timeout=1.0):
    """Send `wire` over UDP; the answer, or None if none came within timeout."""
    try:
        return udp_exchange(d.host, d.port, wire, timeout=timeout, check_id=False)
    except socket.timeout:
        return None


def header(qid=0x2222, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"

FORMERR_QUERY = header(qd=0)                                   # QDCOUNT 0
NOTIMP_QUERY = header(flags=2 << 11) + QUESTION                # opcode STATUS
DROPPED_MSG = header(flags=0x8100) + QUESTION                  # QR set: a response


def ctx(d, *servers):
    out = "\n--- dotp stderr (tail):\n%s" % d.log()[-2500:]
    for s in servers:
        if hasattr(s, "snapshot"):
            out += "\n--- faultdot :%d %s" % (s.port, s.snapshot())
    return out


def diff(before, after, name, **labels):
    return after.get(name, **labels) - before.get(name, **labels)


# ==========================================================================
# 1. promtool and the families
# ==========================================================================

def mixed_traffic(mdotp, upstream, plain_factory, ports):
    """A dotp that has seen UDP and TCP queries, a cache hit, FORMERR,
    NOTIMP, REFUSED (a client outside --allow 127.0.0.1/32), SERVFAIL from a
    dead upstream (a --forward zone on a closed port) and answers from a
    --forward plain zone. Returns (dotp, plain server, dead port)."""
    plain = plain_factory(addr="10.200.0.1")
    dead = ports.get()
    d = mdotp([upstream], extra=[
        "--allow", "127.0.0.1/32", "--timeout", "1000",
        "--forward", "plain.test=dns://127.0.0.1:%d" % plain.port,
        "--forward", "dead.test=127.0.0.1:%d#dot.test" % dead])
    bad = []

    def want(what, got, rc_want):
        if got is None:
            bad.append("%s: no answer" % what)
        elif rcode(got) != rc_want:
            bad.append("%s: rcode %d, want %d: %s" % (what, rcode(got), rc_want, describe(got)))

    want("UDP www.example.test", ask(d, "www.example.test", qid=1), NOERROR)
    want("UDP www.example.test again (cache hit)", ask(d, "www.example.test", qid=2), NOERROR)
    want("TCP www.example.test MX", ask(d, "example.test", "MX", tcp=True, qid=3), NOERROR)
    want("UDP nx.example.test", ask(d, "nx.example.test", qid=4), NXDOMAIN)
    want("FORMERR (QDCOUNT 0)", raw_udp(d, FORMERR_QUERY), FORMERR)
    want("NOTIMP (opcode STATUS)", raw_udp(d, NOTIMP_QUERY), NOTIMP)
    want("REFUSED from 127.0.0.9", ask(d, "www.example.test", qid=5, source="127.0.0.9"),
         REFUSED)
    try:
        want("SERVFAIL dead.test", ask(d, "x.dead.test", qid=6, timeout=4.0), SERVFAIL)
    except socket.timeout:
        bad.append("x.dead.test: no answer within 4 s (want SERVFAIL within --timeout 1000)")
    want("plain zone UDP", ask(d, "a.plain.test", qid=7), NOERROR)
    want("plain zone TCP", ask(d, "b.plain.test", qid=8, tcp=True), NOERROR)
    assert not bad, "traffic went wrong:\n  %s%s" % ("\n  ".join(bad), ctx(d))
    return d, plain, dead


def test_promtool_accepts_metrics_after_mixed_traffic(mdotp, upstream, plain_factory, ports,
                                                     tmp_path):
    """After mixed traffic (UDP, TCP, a cache hit, FORMERR, NOTIMP,
    REFUSED, SERVFAIL from a dead upstream, a plain --forward zone),
    `promtool check metrics` exits 0 with the /metrics body on stdin. Fails
    on any parse or lint problem promtool reports."""
    if not PROMTOOL:
        pytest.skip("promtool not installed (Debian package prometheus; `make test` "
                    "installs it)")
    d, _, _ = mixed_traffic(mdotp, upstream, plain_factory, ports)
    r = http(d.mport, "/metrics")
    assert r.status == 200, r
    (tmp_path / "metrics.txt").write_bytes(r.body)
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=r.body,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20)
    assert p.returncode == 0, (
        "promtool check metrics exited %d:\n%s\n--- body (%d bytes, kept in %s):\n%s" % (
            p.returncode, p.stdout.decode(errors="replace"), len(r.body),
            tmp_path / "metrics.txt", r.text()[:3000]))


def test_every_family_present_with_its_type(mdotp, upstream, plain_factory, ports):
    """Every family spec/metrics.md names is there with its # TYPE (counter,
    gauge, histogram), one sample per upstream for the upstream families
    (labels upstream="ADDR:PORT", zone, transport tls|plain), responses by
    rcode for NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP and REFUSED
    after the mixed traffic, and the Content-Type of text format 0.0.4."""
    d, plain, dead = mixed_traffic(mdotp, upstream, plain_factory, ports)
    r = http(d.mport, "/metrics")
    assert r.status == 200, r
    ct = r.headers.get("content-type", "")
    assert ct.startswith("text/plain") and "version=0.0.4" in ct, \
        "Content-Type %r (want text/plain; version=0.0.4)" % ct
    s = Scrape(r.text())
    want = {}
    for n in PROCESS_COUNTERS:
        want["dotp_%s_total" % n] = "counter"
    for n in PROCESS_GAUGES:
        want["dotp_%s" % n] = "gauge"
    want.update(OTHER_FAMILIES)
    want.update(UPSTREAM_FAMILIES)
    problems = []
    for fam, typ in sorted(want.items()):
        if s.types.get(fam) != typ:
            problems.append("%s: # TYPE %r, want %r" % (fam, s.types.get(fam), typ))
        sample = fam + ("_count" if typ == "histogram" else "")
        if not s.find(sample):
            problems.append("%s: no sample" % sample)
    ups = {"127.0.0.1:%d" % upstream.tls_port: "tls", "127.0.0.1:%d" % plain.port: "plain",
           "127.0.0.1:%d" % dead: "tls"}
    for fam, typ in UPSTREAM_FAMILIES.items():
        sample = fam + ("_count" if typ == "histogram" else "")
        for label, transport in ups.items():
            got = s.find(sample, upstream=label)
            if len(got) != 1:
                problems.append("%s{upstream=%s}: %d samples (want 1)" % (sample, label, len(got)))
            elif got[0][0].get("transport") != transport or "zone" not in got[0][0]:
                problems.append("%s{upstream=%s}: labels %s (want transport=%s and a zone)"
                                % (sample, label, got[0][0], transport))
    zones = {l.get("zone") for l, _ in s.find("dotp_upstream_sent_total")}
    if not any("plain.test" in (z or "") for z in zones):
        problems.append("no upstream sample with a zone label naming plain.test: %s" % zones)
    for rc in ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"):
        got = s.find("dotp_responses_total", rcode=rc)
        if len(got) != 1 or got[0][1] < 1:
            problems.append("dotp_responses_total{rcode=%s}: %s (want one sample >= 1)"
                            % (rc, got))
    for tr in ("udp", "tcp"):
        got = s.find("dotp_queries_by_transport_total", transport=tr)
        if len(got) != 1 or got[0][1] < 1:
            problems.append("dotp_queries_by_transport_total{transport=%s}: %s" % (tr, got))
    assert not problems, "\n".join(problems) + "\n--- /metrics:\n" + r.text()[:6000]


# ==========================================================================
# 2. each family moves when its event happens
# ==========================================================================

def test_queries_total_and_by_transport(mdotp, upstream):
    """One UDP query: dotp_queries_total +1 and {transport="udp"} +1, tcp
    unchanged; then one TCP query: total +1, tcp +1."""
    d = mdotp([upstream])
    s0 = scrape(d)
    ask(d, "www.example.test", qid=11)
    s1 = scrape(d)
    assert (diff(s0, s1, "dotp_queries_total"),
            diff(s0, s1, "dotp_queries_by_transport_total", transport="udp"),
            diff(s0, s1, "dotp_queries_by_transport_total", transport="tcp")) == (1, 1, 0), \
        "after one UDP query: (queries, udp, tcp) moved by %s, want (1, 1, 0)" % (
            (diff(s0, s1, "dotp_queries_total"),
             diff(s0, s1, "dotp_queries_by_transport_total", transport="udp"),
             diff(s0, s1, "dotp_queries_by_transport_total", transport="tcp")),)
    ask(d, "www.example.test", "AAAA", tcp=True, qid=12)
    s2 = scrape(d)
    got = (diff(s1, s2, "dotp_queries_total"),
           diff(s1, s2, "dotp_queries_by_transport_total", transport="udp"),
           diff(s1, s2, "dotp_queries_by_transport_total", transport="tcp"))
    assert got == (1, 0, 1), "after one TCP query: (queries, udp, tcp) moved by %s, want " \
        "(1, 0, 1)" % (got,)


def test_answers_and_answer_duration_histogram(mdotp, faultdot_factory):
    """Upstream answers after 120 ms (--no-cache): one query moves
    dotp_answers_total by 1 and the histogram's _count by 1, lands in the
    le=0.2 bucket but not le=0.1, and its _sum grows by 0.12..0.6 s.
    Always: _count == dotp_answers_total, buckets cumulative, +Inf ==
    _count. Then 5 more (from the cache-less dotp) keep _count ==
    answers_total."""
    srv = faultdot_factory(["delay:120"])
    d = mdotp([srv], cache=False)
    s0 = scrape(d)
    n0 = check_histogram(s0, "dotp_answer_duration_seconds")
    assert n0 == s0.get("dotp_answers_total"), "before: histogram _count %s != answers %s" % (
        n0, s0.get("dotp_answers_total"))
    a = ask(d, "slow.example.test", qid=21)
    assert rcode(a) == NOERROR, describe(a)
    s1 = scrape(d)
    n1 = check_histogram(s1, "dotp_answer_duration_seconds")
    assert diff(s0, s1, "dotp_answers_total") == 1, "answers_total moved by %s (want 1)" % (
        diff(s0, s1, "dotp_answers_total"))
    assert n1 - n0 == 1 and n1 == s1.get("dotp_answers_total"), \
        "histogram _count %s -> %s, answers_total %s" % (n0, n1, s1.get("dotp_answers_total"))
    b0 = {le: c for le, _, c in s0.buckets("dotp_answer_duration_seconds")}
    b1 = {le: c for le, _, c in s1.buckets("dotp_answer_duration_seconds")}
    le100 = [k for k in b1 if k != "+Inf" and abs(float(k) - 0.1) < 1e-9][0]
    le200 = [k for k in b1 if k != "+Inf" and abs(float(k) - 0.2) < 1e-9][0]
    assert (b1[le100] - b0[le100], b1[le200] - b0[le200]) == (0, 1), \
        "a 120 ms answer moved le=0.1 by %s and le=0.2 by %s (want 0 and 1)" % (
            b1[le100] - b0[le100], b1[le200] - b0[le200])
    ds = diff(s0, s1, "dotp_answer_duration_seconds_sum")
    assert 0.115 <= ds <= 0.6, "a 120 ms answer moved _sum by %.3f s" % ds
    for i in range(5):
        ask(d, "more-%d.example.test" % i, qid=30 + i)
    s2 = scrape(d)
    n2 = check_histogram(s2, "dotp_answer_duration_seconds")
    assert n2 == s2.get("dotp_answers_total") and n2 - n1 == 5, \
        "after 5 more: _count %s, answers_total %s (want equal, +5)" % (
            n2, s2.get("dotp_answers_total"))


def test_answer_histogram_count_equals_answers_with_cache_and_errors(mdotp, upstream):
    """Cache hits, FORMERR and NOTIMP are not upstream answers: after them
    and a few upstream answers, _count == dotp_answers_total still, and
    the hit moved neither."""
    d = mdotp([upstream])
    ask(d, "www.example.test", qid=1)
    s0 = scrape(d)
    ask(d, "www.example.test", qid=2)          # a hit
    raw_udp(d, FORMERR_QUERY)
    raw_udp(d, NOTIMP_QUERY)
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_answers_total") == 0, \
        "a cache hit / FORMERR / NOTIMP moved dotp_answers_total by %s" % (
            diff(s0, s1, "dotp_answers_total"))
    ask(d, "example.test", "MX", qid=3)
    ask(d, "alias.example.test", "A", qid=4, tcp=True)
    s2 = scrape(d)
    n = check_histogram(s2, "dotp_answer_duration_seconds")
    assert n == s2.get("dotp_answers_total"), "_count %s != dotp_answers_total %s" % (
        n, s2.get("dotp_answers_total"))
    assert diff(s1, s2, "dotp_answers_total") == 2


def test_responses_total_by_rcode(mdotp, upstream, ports):
    """Every message sent to a client counts under its RCODE: an upstream
    NOERROR, a cache hit (NOERROR), NXDOMAIN, dotp's own FORMERR, NOTIMP
    and REFUSED (client outside --allow), and SERVFAIL (a zone whose only
    server is dead, --timeout 800); a dropped message (QR set) counts
    nowhere."""
    dead = ports.get()
    d = mdotp([upstream], extra=["--allow", "127.0.0.1/32", "--timeout", "800",
                                 "--forward", "dead.test=127.0.0.1:%d#dot.test" % dead])
    rc = lambda s, r: s.opt("dotp_responses_total", rcode=r)  # noqa: E731
    names = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"]
    steps = [
        ("upstream NOERROR", lambda: ask(d, "www.example.test", qid=1), "NOERROR"),
        ("cache hit", lambda: ask(d, "www.example.test", qid=2), "NOERROR"),
        ("NXDOMAIN", lambda: ask(d, "nx.example.test", qid=3), "NXDOMAIN"),
        ("FORMERR", lambda: raw_udp(d, FORMERR_QUERY), "FORMERR"),
        ("NOTIMP", lambda: raw_udp(d, NOTIMP_QUERY), "NOTIMP"),
        ("REFUSED", lambda: ask(d, "www.example.test", qid=4, source="127.0.0.9"), "REFUSED"),
        ("SERVFAIL", lambda: ask(d, "x.dead.test", qid=5, timeout=4.0), "SERVFAIL"),
        ("dropped", lambda: raw_udp(d, DROPPED_MSG, timeout=0.3), None),
    ]
    bad = []
    for what, act, want in steps:
        s0 = scrape(d)
        act()
        s1 = scrape(d)
        moved = {n: rc(s1, n) - rc(s0, n) for n in names}
        exp = {n: (1 if n == want else 0) for n in names}
        if moved != exp:
            bad.append("%s: moved %s, want %s" % (what, moved, exp))
    assert not bad, "\n".join(bad) + ctx(d)


def test_servfail_failures_and_upstream_up(mdotp, ports):
    """The only upstream is dead (nothing listens): a query gets SERVFAIL
    within --timeout 800 (+ slack); dotp_servfail_total +1,
    dotp_upstream_failures_total +1 or more, dotp_upstream_up 1 -> 0,
    dotp_upstream_connections 0 after."""
    dead = ports.get()
    d = mdotp([dead], extra=["--timeout", "800"], probe=False)
    label = "127.0.0.1:%d" % dead
    s0 = scrape(d)
    assert s0.get("dotp_upstream_up", upstream=label) == 1, "a fresh upstream is not up"
    a = ask(d, "www.example.test", qid=1, timeout=3.0)
    assert rcode(a) == SERVFAIL, describe(a)
    s1 = scrape(d)
    got = (diff(s0, s1, "dotp_servfail_total"),
           diff(s0, s1, "dotp_upstream_failures_total", upstream=label),
           s1.get("dotp_upstream_up", upstream=label),
           s1.get("dotp_upstream_connections", upstream=label))
    assert got[0] == 1 and got[1] >= 1 and got[2] == 0 and got[3] == 0, \
        "(servfail +, failures +, up, connections) = %s, want (1, >=1, 0, 0)%s" % (got, ctx(d))


def test_dropped_formerr_notimp(mdotp, upstream):
    """A message with QR set is dropped (no answer, dotp_dropped_total +1);
    QDCOUNT 0 is FORMERR (+1 formerr); opcode STATUS is NOTIMP (+1
    notimp); each moves only its own counter of the three, and
    dotp_queries_total by 1."""
    d = mdotp([upstream])
    fams = ["dotp_dropped_total", "dotp_formerr_total", "dotp_notimp_total",
            "dotp_queries_total"]
    bad = []
    for what, wire, want_rc, moves in [
            ("QR set", DROPPED_MSG, None, "dotp_dropped_total"),
            ("QDCOUNT 0", FORMERR_QUERY, FORMERR, "dotp_formerr_total"),
            ("opcode STATUS", NOTIMP_QUERY, NOTIMP, "dotp_notimp_total")]:
        s0 = scrape(d)
        a = raw_udp(d, wire, timeout=0.5 if want_rc is None else 2.0)
        if want_rc is None and a is not None:
            bad.append("%s: answered (%s), want dropped" % (what, describe(a)))
        if want_rc is not None and (a is None or rcode(a) != want_rc):
            bad.append("%s: %s, want rcode %d" % (what, a and describe(a), want_rc))
        s1 = scrape(d)
        moved = {f: diff(s0, s1, f) for f in fams}
        exp = {f: 1 if f in (moves, "dotp_queries_total") else 0 for f in fams}
        if moved != exp:
            bad.append("%s: moved %s, want %s" % (what, moved, exp))
    assert not bad, "\n".join(bad) + ctx(d)


def test_refused_total(mdotp, upstream):
    """--allow 127.0.0.1/32: a UDP query from 127.0.0.9 gets REFUSED and
    moves dotp_refused_total by 1; one from 127.0.0.1 does not."""
    d = mdotp([upstream], extra=["--allow", "127.0.0.1/32"])
    s0 = scrape(d)
    a = ask(d, "www.example.test", qid=1, source="127.0.0.9")
    assert rcode(a) == REFUSED, describe(a)
    s1 = scrape(d)
    ask(d, "www.example.test", qid=2)
    s2 = scrape(d)
    assert (diff(s0, s1, "dotp_refused_total"), diff(s1, s2, "dotp_refused_total")) == (1, 0), \
        "refused moved by %s then %s (want 1 then 0)" % (
            diff(s0, s1, "dotp_refused_total"), diff(s1, s2, "dotp_refused_total"))


def test_tcp_refused_and_tcp_clients(mdotp, upstream):
    """--max-tcp 2: two TCP clients that asked a query make
    dotp_tcp_clients 2; a third is closed at accept (dotp_tcp_refused_total
    +1); once the two close, dotp_tcp_clients is 0 again (within 2 s)."""
    d = mdotp([upstream], extra=["--max-tcp", "2"])
    s0 = scrape(d)
    assert s0.get("dotp_tcp_clients") == 0
    conns = []
    try:
        for i in range(2):
            c = socket.create_connection((d.host, d.port), timeout=3)
            q = make_query("www.example.test", "A", qid=100 + i)
            c.sendall(struct.pack("!H", len(q)) + q)
            harness.tcp_read_msg(c, time.monotonic() + 3)
            conns.append(c)
        s1 = scrape(d)
        assert s1.get("dotp_tcp_clients") == 2, "dotp_tcp_clients %s with 2 open (want 2)" % (
            s1.get("dotp_tcp_clients"))
        third = socket.create_connection((d.host, d.port), timeout=3)
        closed = False
        try:
            q = make_query("www.example.test", "A", qid=200)
            try:
                third.sendall(struct.pack("!H", len(q)) + q)
                third.settimeout(2)
                closed = third.recv(100) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        finally:
            third.close()
        assert closed, "a third TCP client over --max-tcp 2 was not closed"
        s2 = scrape(d)
        assert diff(s1, s2, "dotp_tcp_refused_total") == 1, \
            "dotp_tcp_refused_total moved by %s (want 1)" % diff(s1, s2, "dotp_tcp_refused_total")
    finally:
        for c in conns:
            c.close()
    ok = wait_for(lambda: scrape(d).get("dotp_tcp_clients") == 0, 2.0, step=0.05)
    assert ok, "dotp_tcp_clients %s 2 s after both clients closed (want 0)" % (
        scrape(d).get("dotp_tcp_clients"))


def test_stray_total(mdotp, faultdot_factory):
    """The upstream sends an answer with an ID not in flight before each
    real answer: one query moves dotp_stray_total by 1 and is answered
    right."""
    srv = faultdot_factory(["unknown_id"])
    d = mdotp([srv], cache=False)
    s0 = scrape(d)
    a = ask(d, "stray.example.test", qid=1)
    assert rcode(a) == NOERROR, describe(a)
    time.sleep(0.05)
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_stray_total") == 1, "dotp_stray_total moved by %s (want 1)%s" % (
        diff(s0, s1, "dotp_stray_total"), ctx(d, srv))


def test_mismatched_total(mdotp, faultdot_factory):
    """The upstream sends an answer with the query's ID but another name
    first: dotp_mismatched_total +1, the client gets the right answer."""
    srv = faultdot_factory(["wrong_question:name"])
    d = mdotp([srv], cache=False)
    s0 = scrape(d)
    a = ask(d, "mismatch.example.test", qid=1)
    m = dns.message.from_wire(a)
    assert rcode(a) == NOERROR and [r.address for rr in m.answer for r in rr] == [
        expected_a("mismatch.example.test")], describe(a)
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_mismatched_total") == 1, \
        "dotp_mismatched_total moved by %s (want 1)%s" % (
            diff(s0, s1, "dotp_mismatched_total"), ctx(d, srv))


def test_spoofed_total_plain(mdotp, upstream, plain_factory):
    """A plain --forward server sends a datagram with a wrong ID, then the
    real answer: dotp_spoofed_total +1, the answer is delivered, and the
    plain upstream's answered_total +1 (transport="plain")."""
    def hook(srv, sock, wire, src):
        m = dns.message.from_wire(wire)
        good = srv.answer(m, "udp").to_wire()
        sock.sendto(struct.pack("!H", (m.id + 1) & 0xFFFF) + good[2:], src)
        time.sleep(0.01)
        sock.sendto(good, src)

    plain = plain_factory(udp_hook=hook)
    d = mdotp([upstream], cache=False,
              extra=["--forward", "plain.test=dns://127.0.0.1:%d" % plain.port])
    label = "127.0.0.1:%d" % plain.port
    s0 = scrape(d)
    a = ask(d, "x.plain.test", qid=1)
    assert rcode(a) == NOERROR, describe(a)
    s1 = scrape(d)
    got = (diff(s0, s1, "dotp_spoofed_total"),
           diff(s0, s1, "dotp_upstream_answered_total", upstream=label, transport="plain"),
           diff(s0, s1, "dotp_upstream_sent_total", upstream=label, transport="plain"))
    assert got == (1, 1, 1), "(spoofed, plain answered, plain sent) moved by %s, want " \
        "(1, 1, 1)%s" % (got, ctx(d))


def test_truncated_retries_total(mdotp, upstream, plain_factory):
    """A plain --forward server answers TC over UDP: the query is asked
    again over TCP, dotp_truncated_retries_total +1, the client gets the
    answer."""
    plain = plain_factory(tc_udp=True, big_n=3)
    d = mdotp([upstream], cache=False,
              extra=["--forward", "plain.test=dns://127.0.0.1:%d" % plain.port])
    s0 = scrape(d)
    a = ask(d, "x.plain.test", qid=1, tcp=True)
    assert rcode(a) == NOERROR, describe(a)
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_truncated_retries_total") == 1, \
        "dotp_truncated_retries_total moved by %s (want 1); plain server saw %s%s" % (
            diff(s0, s1, "dotp_truncated_retries_total"),
            [(e["transport"], e["name"]) for e in plain.log], ctx(d))


def test_table_full_and_queries_in_flight(mdotp, faultdot_factory):
    """--max-queries 2, a silent upstream, --timeout 2000: two queries wait
    (dotp_queries_in_flight 2), a third gets SERVFAIL at once
    (dotp_table_full_total +1, dotp_servfail_total +1); after the two time
    out, dotp_queries_in_flight is 0."""
    srv = faultdot_factory(["silent"])
    d = mdotp([srv], extra=["--max-queries", "2", "--timeout", "2000"], probe=False,
              cache=False)
    s0 = scrape(d)
    assert s0.get("dotp_queries_in_flight") == 0
    socks = []
    try:
        for i in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect((d.host, d.port))
            s.send(make_query("wait-%d.example.test" % i, "A", qid=10 + i))
            socks.append(s)
        ok = wait_for(lambda: scrape(d).get("dotp_queries_in_flight") == 2, 1.0)
        assert ok, "dotp_queries_in_flight %s with 2 queries at a silent upstream (want 2)" % (
            scrape(d).get("dotp_queries_in_flight"))
        s1 = scrape(d)
        t = time.monotonic()
        a = ask(d, "third.example.test", qid=20, timeout=1.5)
        took = time.monotonic() - t
        assert rcode(a) == SERVFAIL and took < 0.5, "third query: %s after %.3f s" % (
            describe(a), took)
        s2 = scrape(d)
        got = (diff(s1, s2, "dotp_table_full_total"), diff(s1, s2, "dotp_servfail_total"))
        assert got == (1, 1), "(table_full, servfail) moved by %s, want (1, 1)" % (got,)
        for s in socks:
            s.settimeout(3.0)
            rc_ = rcode(s.recv(4096))
            assert rc_ == SERVFAIL, "a waiting query got rcode %d (want SERVFAIL)" % rc_
    finally:
        for s in socks:
            s.close()
    ok = wait_for(lambda: scrape(d).get("dotp_queries_in_flight") == 0, 1.0)
    assert ok, "dotp_queries_in_flight %s after the queries timed out (want 0)" % (
        scrape(d).get("dotp_queries_in_flight"))


def test_cache_hits_misses_entries_bytes(mdotp, faultdot_factory):
    """A new name: cache_misses +1, cache_entries +1, cache_bytes grows; the
    same again: cache_hits +1, the rest unchanged, no upstream query."""
    srv = faultdot_factory(tag=300)
    d = mdotp([srv])
    s0 = scrape(d)
    ask(d, "cached.example.test", qid=1)
    s1 = scrape(d)
    ask(d, "cached.example.test", qid=2)
    s2 = scrape(d)
    first = (diff(s0, s1, "dotp_cache_misses_total"), diff(s0, s1, "dotp_cache_hits_total"),
             diff(s0, s1, "dotp_cache_entries"), diff(s0, s1, "dotp_cache_bytes") > 0)
    second = (diff(s1, s2, "dotp_cache_misses_total"), diff(s1, s2, "dotp_cache_hits_total"),
              diff(s1, s2, "dotp_cache_entries"), diff(s1, s2, "dotp_cache_bytes"))
    assert first == (1, 0, 1, True), \
        "first query: (misses, hits, entries, bytes grew) = %s, want (1, 0, 1, True)" % (first,)
    assert second == (0, 1, 0, 0), \
        "repeat: (misses, hits, entries, bytes) moved by %s, want (0, 1, 0, 0)" % (second,)
    assert srv.queries_for("cached.example.test") == 1


def test_cache_coalesced_total(mdotp, faultdot_factory):
    """The upstream answers after 300 ms; two clients ask the same name at
    once: one query goes upstream, dotp_cache_coalesced_total +1."""
    srv = faultdot_factory(["delay:300"], tag=300)
    d = mdotp([srv])
    s0 = scrape(d)
    qs = [make_query("same.example.test", "A", qid=40 + i) for i in range(2)]
    _, answers, missing = udp_burst(d.host, d.port, qs, n_socks=2, timeout=3.0)
    assert not missing, "no answer for %s" % missing
    s1 = scrape(d)
    assert srv.queries_for("same.example.test") == 1, "%d upstream queries" % (
        srv.queries_for("same.example.test"))
    assert diff(s0, s1, "dotp_cache_coalesced_total") == 1, \
        "dotp_cache_coalesced_total moved by %s (want 1)" % diff(s0, s1, "dotp_cache_coalesced_total")


def test_cache_prefetches_total(mdotp, faultdot_factory):
    """An answer with TTL 5; asked again at ~4.6 s (its last tenth): a
    refresh goes upstream before the 5 s expiry and
    dotp_cache_prefetches_total moves by 1 (read by 5.3 s)."""
    srv = faultdot_factory(tag=5)
    d = mdotp([srv])
    s0 = scrape(d)
    ask(d, "pre.example.test", qid=1)
    t1 = time.monotonic()
    time.sleep(max(0, t1 + 4.6 - time.monotonic()))
    ask(d, "pre.example.test", qid=2)
    ok = wait_for(lambda: srv.queries_for("pre.example.test") >= 2, max(0, t1 + 5.2 -
                                                                          time.monotonic()))
    s1 = scrape(d)
    assert ok, "no refresh reached the upstream before expiry%s" % ctx(d, srv)
    assert diff(s0, s1, "dotp_cache_prefetches_total") == 1, \
        "dotp_cache_prefetches_total moved by %s (want 1)" % diff(s0, s1,
                                                                  "dotp_cache_prefetches_total")


def test_cache_stale_total(mdotp, faultdot_factory):
    """--serve-stale 60: an answer with TTL 1, the upstream goes away, at
    1.3 s the name is answered from the stale entry and
    dotp_cache_stale_total moves by 1."""
    srv = faultdot_factory(tag=1)
    d = mdotp([srv], extra=["--serve-stale", "60", "--timeout", "2000"])
    ask(d, "stale.example.test", qid=1)
    t1 = time.monotonic()
    srv.stop()
    s0 = scrape(d)
    time.sleep(max(0, t1 + 1.3 - time.monotonic()))
    a = ask(d, "stale.example.test", qid=2, timeout=4.0)
    m = dns.message.from_wire(a)
    assert rcode(a) == NOERROR and m.answer, "want the stale answer: %s" % describe(a)
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_cache_stale_total") == 1, \
        "dotp_cache_stale_total moved by %s (want 1)%s" % (
            diff(s0, s1, "dotp_cache_stale_total"), ctx(d, srv))


def test_cache_evictions_total(mdotp, faultdot_factory):
    """--cache-size 64k: 300 answers of 500 bytes (150 KB) evict:
    dotp_cache_evictions_total > 0 and dotp_cache_bytes <= 64 KiB."""
    srv = faultdot_factory(tag=300, sized=True)
    d = mdotp([srv], extra=["--cache-size", "64k"])
    s0 = scrape(d)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((d.host, d.port))
    sock.settimeout(2.0)
    try:
        for i in range(300):
            sock.send(make_query(sized_query_name(500, tag="ev%d" % i), "TXT", qid=i + 1))
            sock.recv(4096)
    finally:
        sock.close()
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_cache_evictions_total") > 0, "no eviction counted"
    assert s1.get("dotp_cache_bytes") <= 64 * 1024, "dotp_cache_bytes %s over 64 KiB" % (
        s1.get("dotp_cache_bytes"))


def test_upstream_sent_answered_and_histogram(mdotp, faultdot_factory):
    """TLS only, --no-cache, two upstreams round-robin: 20 queries move
    the upstreams' sent_total and answered_total by 20 in all, each
    upstream's dotp_upstream_response_seconds _count equals its
    answered_total, its buckets are cumulative and +Inf == _count."""
    a = faultdot_factory(tag=1)
    b = faultdot_factory(tag=2)
    d = mdotp([a, b], extra=["--policy", "round-robin"], cache=False)
    labels = ["127.0.0.1:%d" % a.port, "127.0.0.1:%d" % b.port]
    s0 = scrape(d)
    for i in range(20):
        r = ask(d, "n%d.example.test" % i, qid=i + 1)
        assert rcode(r) == NOERROR, describe(r)
    s1 = scrape(d)
    sent = sum(diff(s0, s1, "dotp_upstream_sent_total", upstream=l) for l in labels)
    ans = sum(diff(s0, s1, "dotp_upstream_answered_total", upstream=l) for l in labels)
    assert (sent, ans) == (20, 20), "(sent, answered) moved by %s in all, want (20, 20)%s" % (
        (sent, ans), ctx(d, a, b))
    for l in labels:
        n = check_histogram(s1, "dotp_upstream_response_seconds", upstream=l)
        assert n == s1.get("dotp_upstream_answered_total", upstream=l), \
            "upstream %s: histogram _count %s != answered_total %s" % (
                l, n, s1.get("dotp_upstream_answered_total", upstream=l))
        assert s1.get("dotp_upstream_up", upstream=l) == 1
        assert s1.get("dotp_upstream_connections", upstream=l) >= 1, \
            "upstream %s: dotp_upstream_connections %s after answers (want >= 1)" % (
                l, s1.get("dotp_upstream_connections", upstream=l))


def test_upstream_failures_other_stays_up(mdotp, faultdot_factory, ports):
    """Upstreams [dead, good]: a query is answered by the good one; the
    dead one's failures_total >= 1 and up 0, the good one's failures 0 and
    up 1; /ready stays 200 (one default upstream is up)."""
    dead = ports.get()
    good = faultdot_factory()
    d = mdotp([dead, good], probe=False)
    a = ask(d, "x.example.test", qid=1)
    assert rcode(a) == NOERROR, describe(a)
    s = scrape(d)
    dl, gl = "127.0.0.1:%d" % dead, "127.0.0.1:%d" % good.port
    got = (s.get("dotp_upstream_failures_total", upstream=dl) >= 1,
           s.get("dotp_upstream_up", upstream=dl),
           s.get("dotp_upstream_failures_total", upstream=gl),
           s.get("dotp_upstream_up", upstream=gl))
    assert got == (True, 0, 0, 1), "(dead failed, dead up, good failures, good up) = %s" % (got,)
    r = http(d.mport, "/ready")
    assert (r.status, r.text().strip()) == (200, "ready"), r


def test_upstream_handshakes_full_and_resumed(mdotp, faultdot_factory):
    """The upstream closes cleanly (close_notify) after each answer:
    sequential queries open a new connection each; the first handshake is
    full, later ones resume (faultdot keeps the session after a clean
    close): handshakes_full_total >= 1 and handshakes_resumed_total >= 1,
    their sum moves by at least 3 for 3 queries, agreeing with the
    server's own counts."""
    srv = faultdot_factory(["close_after:1"])
    d = mdotp([srv], cache=False, probe=False)
    label = "127.0.0.1:%d" % srv.port
    s0 = scrape(d)
    for i in range(3):
        a = ask(d, "hs%d.example.test" % i, qid=i + 1)
        assert rcode(a) == NOERROR, describe(a)
        time.sleep(0.1)
    s1 = scrape(d)
    full = diff(s0, s1, "dotp_upstream_handshakes_full_total", upstream=label)
    res = diff(s0, s1, "dotp_upstream_handshakes_resumed_total", upstream=label)
    wait_for(lambda: srv.snapshot()["handshakes"] == full + res, 1.0)
    snap = srv.snapshot()
    assert full >= 1 and res >= 1 and full + res >= 3, \
        "(full, resumed) moved by %s, want >= 1 each and >= 3 in all; server: %s%s" % (
            (full, res), snap, ctx(d, srv))
    assert (full + res, res) == (snap["handshakes"], snap["resumed"]), \
        "dotp counted %d handshakes (%d resumed), the server %d (%d resumed)" % (
            full + res, res, snap["handshakes"], snap["resumed"])


def test_upstream_recycled_total(mdotp, faultdot_factory):
    """--max-conns 1; the upstream answers 3 queries per connection, then
    closes cleanly ignoring the rest: a burst of 8 queries leaves some in
    flight at the close, re-sent without using a try:
    dotp_upstream_recycled_total >= 1, every query answered."""
    srv = faultdot_factory(["close_after:3"])
    d = mdotp([srv], extra=["--max-conns", "1"], cache=False, probe=False)
    label = "127.0.0.1:%d" % srv.port
    ask(d, "warm.example.test", qid=999)     # the connection is up before the burst
    s0 = scrape(d)
    qs = [make_query("rc%d.example.test" % i, "A", qid=i + 1) for i in range(8)]
    _, answers, missing = udp_burst(d.host, d.port, qs, n_socks=1, timeout=4.0)
    assert not missing, "unanswered: %s%s" % (missing, ctx(d, srv))
    s1 = scrape(d)
    assert diff(s0, s1, "dotp_upstream_recycled_total", upstream=label) >= 1, \
        "dotp_upstream_recycled_total moved by %s (want >= 1)%s" % (
            diff(s0, s1, "dotp_upstream_recycled_total", upstream=label), ctx(d, srv))


def test_upstream_learned_conn_queries(mdotp, faultdot_factory):
    """The upstream closes right after its 2nd answer on every connection:
    after two such closes dotp_upstream_learned_conn_queries goes from 0 to
    2."""
    srv = faultdot_factory(["close_after:2"])
    d = mdotp([srv], extra=["--max-conns", "1"], cache=False, probe=False)
    label = "127.0.0.1:%d" % srv.port
    s0 = scrape(d)
    assert s0.get("dotp_upstream_learned_conn_queries", upstream=label) == 0
    for i in range(7):
        a = ask(d, "lc%d.example.test" % i, qid=i + 1)
        assert rcode(a) == NOERROR, describe(a)
    ok = wait_for(lambda: scrape(d).get("dotp_upstream_learned_conn_queries",
                                        upstream=label) == 2, 1.0)
    assert ok, "dotp_upstream_learned_conn_queries %s after 3 closes at 2 answers (want 2)%s" % (
        scrape(d).get("dotp_upstream_learned_conn_queries", upstream=label), ctx(d, srv))


def test_upstream_learned_idle_seconds(mdotp, faultdot_factory):
    """The upstream closes connections idle for 800 ms: after two such
    closes dotp_upstream_learned_idle_seconds goes from 0 to 0.6..1.0."""
    srv = faultdot_factory(["idle_close_notify:800"])
    d = mdotp([srv], cache=False, probe=False)
    label = "127.0.0.1:%d" % srv.port
    s0 = scrape(d)
    assert s0.get("dotp_upstream_learned_idle_seconds", upstream=label) == 0
    for k in range(2):
        n0 = len(srv.conns)
        a = ask(d, "idle%d.example.test" % k, qid=k + 1)
        assert rcode(a) == NOERROR, describe(a)
        assert wait_for(lambda: len(srv.conns) > n0 and all(c.closed_by for c in srv.conns[n0:]),
                        2.5), "the server did not close the idle connection%s" % ctx(d, srv)
    v = wait_for(lambda: scrape(d).get("dotp_upstream_learned_idle_seconds", upstream=label),
                 1.0)
    assert v and 0.6 <= v <= 1.0, \
        "dotp_upstream_learned_idle_seconds %s after two idle closes at 800 ms " \
        "(want 0.6..1.0)%s" % (v, ctx(d, srv))


def test_upstream_srtt_seconds(mdotp, faultdot_factory):
    """The upstream answers after 60 ms: dotp_upstream_srtt_seconds is 0
    before any answer and 0.05..0.3 after a few."""
    srv = faultdot_factory(["delay:60"])
    d = mdotp([srv], cache=False, probe=False)
    label = "127.0.0.1:%d" % srv.port
    assert scrape(d).get("dotp_upstream_srtt_seconds", upstream=label) == 0
    for i in range(4):
        ask(d, "rtt%d.example.test" % i, qid=i + 1)
    v = scrape(d).get("dotp_upstream_srtt_seconds", upstream=label)
    assert 0.05 <= v <= 0.3, "dotp_upstream_srtt_seconds %s with 60 ms answers" % v


def test_process_families(mdotp, upstream):
    """dotp_build_info{version} 1 with the version `dotp -V` prints;
    process_start_time_seconds within 5 s of the start;
    process_resident_memory_bytes within 25% of /proc/PID/status VmRSS;
    process_open_fds equal to /proc/PID/fd's count give or take 2, and up
    by 3 with three more TCP clients."""
    t_start = time.time()
    d = mdotp([upstream])
    pid = d.proc.pid
    v = run_dotp(["-V"], timeout=5)
    version = v.stdout.split()[1] if v.stdout.split()[1:] else None
    s = scrape(d)
    bi = s.find("dotp_build_info")
    assert len(bi) == 1 and bi[0][1] == 1 and bi[0][0].get("version") == version, \
        "dotp_build_info %s, `dotp -V` says %r" % (bi, v.stdout)
    st = s.get("process_start_time_seconds")
    assert t_start - 5 <= st <= time.time() + 1, "process_start_time_seconds %s, started " \
        "at %.0f" % (st, t_start)
    with open("/proc/%d/status" % pid) as f:
        rss = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:")][0]
    got = s.get("process_resident_memory_bytes")
    assert 0.75 * rss <= got <= 1.25 * rss, "process_resident_memory_bytes %d, VmRSS %d" % (
        got, rss)
    fds = len(os.listdir("/proc/%d/fd" % pid))
    got = s.get("process_open_fds")
    assert abs(got - fds) <= 2, "process_open_fds %d, /proc/%d/fd has %d" % (got, pid, fds)
    conns = [socket.create_connection((d.host, d.port), timeout=2) for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            q = make_query("www.example.test", "A", qid=300 + i)
            c.sendall(struct.pack("!H", len(q)) + q)
            harness.tcp_read_msg(c, time.monotonic() + 3)
        got2 = scrape(d).get("process_open_fds")
    finally:
        for c in conns:
            c.close()
    assert got2 - got == 3, "process_open_fds %d -> %d with 3 more TCP clients (want +3)" % (
        got, got2)


# ==========================================================================
# 3. HTTP: /health, /ready, errors, limits
# ==========================================================================

def test_health_ok(mdotp, upstream):
    """GET /health: 200, body "ok" (a newline allowed), Content-Length the
    body's length, Connection: close, and dotp closes the connection."""
    d = mdotp([upstream])
    r = http(d.mport, "/health")
    assert r.status == 200 and r.text().strip() == "ok", r
    assert r.headers.get("content-length") == str(len(r.body)), r
    assert r.headers.get("connection", "").lower() == "close", r
    assert r.eof and r.elapsed < 1.0, "connection not closed after the response: %r" % r


def test_ready_ok_with_healthy_upstream(mdotp, upstream):
    """GET /ready with a working default upstream (after an answer): 200
    "ready"."""
    d = mdotp([upstream])
    ask(d, "www.example.test", qid=1)
    r = http(d.mport, "/ready")
    assert (r.status, r.text().strip()) == (200, "ready"), r


def test_ready_503_when_default_upstream_down(mdotp, ports):
    """The only default upstream is dead: after a query marked it down,
    GET /ready is 503 with body "every upstream of the default zone is
    down"; /health stays 200."""
    dead = ports.get()
    d = mdotp([dead], extra=["--timeout", "800"], probe=False)
    a = ask(d, "www.example.test", qid=1, timeout=3.0)
    assert rcode(a) == SERVFAIL, describe(a)
    r = http(d.mport, "/ready")
    assert (r.status, r.text().strip()) == (503, "every upstream of the default zone is down"), r
    h = http(d.mport, "/health")
    assert h.status == 200, h


def test_ready_not_affected_by_forward_zone_down(mdotp, upstream, ports):
    """A --forward zone's only server is dead and marked down, the default
    upstream works: /ready stays 200 (only the default zone counts)."""
    dead = ports.get()
    d = mdotp([upstream], extra=["--timeout", "800",
                                 "--forward", "dead.test=127.0.0.1:%d#dot.test" % dead])
    a = ask(d, "x.dead.test", qid=1, timeout=3.0)
    assert rcode(a) == SERVFAIL, describe(a)
    assert scrape(d).get("dotp_upstream_up", upstream="127.0.0.1:%d" % dead) == 0
    r = http(d.mport, "/ready")
    assert (r.status, r.text().strip()) == (200, "ready"), r


def test_ready_503_while_draining(mdotp, faultdot_factory):
    """A query waits at a silent upstream; SIGTERM with --drain 3000: while
    dotp drains, GET /ready is 503 "draining: shutting down"; dotp then
    exits 0."""
    srv = faultdot_factory(["silent"])
    d = mdotp([srv], extra=["--drain", "3000", "--timeout", "2500"], probe=False, cache=False)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((d.host, d.port))
        s.send(make_query("drain.example.test", "A", qid=7))
        assert wait_for(lambda: scrape(d).get("dotp_queries_in_flight") == 1, 1.0)
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait_log("draining", timeout=1.0), "no draining log line:\n" + d.log()[-1500:]
        r = http(d.mport, "/ready", timeout=2.0)
        assert (r.status, r.text().strip()) == (503, "draining: shutting down"), r
    finally:
        s.close()
    try:
        d.proc.wait(6)
    except subprocess.TimeoutExpired:
        pass
    rc_ = d.stop()
    assert rc_ == 0, "exit status %r after the drain%s" % (rc_, ctx(d))


def test_not_found(mdotp, upstream):
    """GET /nope, /metricsx and / are 404."""
    d = mdotp([upstream])
    for p in ("/nope", "/metricsx", "/", "/health/x"):
        r = http(d.mport, p)
        assert r.status == 404, "GET %s: %r" % (p, r)


def test_query_string_ignored(mdotp, upstream):
    """GET /health?x=1 is /health (200)."""
    d = mdotp([upstream])
    r = http(d.mport, "/health?x=1")
    assert r.status == 200, r


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_method_not_allowed(mdotp, upstream, method):
    """Methods other than GET and HEAD: 405 with Allow: GET, HEAD."""
    d = mdotp([upstream])
    r = http(d.mport, "/metrics", method=method, extra="Content-Length: 0\r\n")
    assert r.status == 405, r
    allow = r.headers.get("allow", "")
    assert sorted(x.strip() for x in allow.split(",")) == ["GET", "HEAD"], \
        "Allow: %r (want GET, HEAD)" % allow


@pytest.mark.parametrize("line", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /health\r\n\r\n",
    b"GET /health FOO/1.1\r\n\r\n",
    b"GET /health HTTP/2.0\r\n\r\n",
    b"\r\n\r\n",
], ids=["garbage", "no-path", "no-version", "bad-protocol", "http2", "empty"])
def test_bad_request(mdotp, upstream, line):
    """A malformed request line: 400, and the connection is closed."""
    d = mdotp([upstream])
    r = http_raw(d.mport, line)
    assert r.status == 400 and r.eof, r


def test_head_too_long(mdotp, upstream):
    """A head of 5000 bytes without its end: 431 (without waiting for the
    2 s limit), connection closed (a FIN or, since the head's tail is left
    unread, an RST after the response)."""
    d = mdotp([upstream])
    data = b"GET /metrics HTTP/1.1\r\nX-Fill: " + b"a" * 5000
    r = http_raw(d.mport, data, timeout=4.0)
    assert r.status == 431 and (r.eof or r.reset) and r.elapsed < 1.5, r


def test_head_request(mdotp, upstream):
    """HEAD /health: 200, no body, Content-Length the GET body's length.
    HEAD /metrics: 200, no body, a Content-Length within 10% of the GET
    body's length (counters move between the two)."""
    d = mdotp([upstream])
    g = http(d.mport, "/health")
    h = http(d.mport, "/health", method="HEAD")
    assert h.status == 200 and h.eof and h.body == b"", "HEAD /health: %r" % h
    assert h.headers.get("content-length") == str(len(g.body)), \
        "HEAD Content-Length %r, GET body %d bytes" % (h.headers.get("content-length"), len(g.body))
    g = http(d.mport, "/metrics")
    h = http(d.mport, "/metrics", method="HEAD")
    assert h.status == 200 and h.eof and h.body == b"", "HEAD /metrics: %r" % h
    cl = int(h.headers.get("content-length", "-1"))
    assert abs(cl - len(g.body)) <= 0.1 * len(g.body), \
        "HEAD /metrics Content-Length %d, GET body %d bytes" % (cl, len(g.body))


def test_slow_client_closed(mdotp, upstream):
    """A client that sends half a request line and then nothing is closed
    by ~2 s (1.5..3.0 s); so is one sending a byte every 0.3 s. DNS is
    answered quickly meanwhile."""
    d = mdotp([upstream])
    res = {}

    def silent():
        res["silent"] = http_raw(d.mport, b"GET /hea", timeout=5.0)

    def trickle():
        res["trickle"] = http_raw(d.mport, b"GET /health HTTP/1.1\r\nX-A: b\r\n\r\n",
                                  timeout=5.0, send_delay=0.3)

    ts = [threading.Thread(target=silent), threading.Thread(target=trickle)]
    for t in ts:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    a = ask(d, "www.example.test", qid=1)
    took = time.monotonic() - t0
    for t in ts:
        t.join(8)
    assert rcode(a) == NOERROR and took < 0.5, "DNS during slow HTTP clients: %.3f s" % took
    for k, r in res.items():
        assert r.eof or r.reset, "%s client still open after %.1f s: %r" % (k, r.elapsed, r)
        assert 1.5 <= r.elapsed <= 3.0, "%s client closed after %.2f s (want ~2 s): %r" % (
            k, r.elapsed, r)
        assert r.status is None, "%s client got a response: %r" % (k, r)


def test_fifth_connection_closed_at_once(mdotp, upstream):
    """Four connections that send nothing hold every slot: a fifth is
    closed at once (< 0.5 s) without a response; after the four are
    closed, GET /health works again."""
    d = mdotp([upstream])
    held = []
    try:
        for _ in range(4):
            held.append(socket.create_connection(("127.0.0.1", d.mport), timeout=2))
        time.sleep(0.2)
        r = http(d.mport, "/health", timeout=3.0)
        assert r.status is None and (r.eof or r.reset) and r.elapsed < 0.5, \
            "a fifth connection with 4 held: %r (want closed at once, no response)" % r
    finally:
        for s in held:
            s.close()
    ok = wait_for(lambda: http(d.mport, "/health", timeout=2.0).status == 200, 2.0, step=0.1)
    assert ok, "GET /health failed after the 4 held connections closed"


def test_twenty_concurrent_connections(mdotp, upstream):
    """20 clients GET /metrics at once: each gets a complete 200 or is
    closed without a response, all within 4 s; at least one gets 200;
    DNS answers during the burst within 0.5 s; /health works after."""
    d = mdotp([upstream])
    results = [None] * 20
    start = threading.Event()

    def client(i):
        start.wait(2)
        try:
            results[i] = http(d.mport, "/metrics", timeout=4.0)
        except OSError as e:
            results[i] = e

    ts = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    t0 = time.monotonic()
    start.set()
    a = ask(d, "www.example.test", qid=1)
    dns_took = time.monotonic() - t0
    for t in ts:
        t.join(6)
    took = time.monotonic() - t0
    bad = []
    for i, r in enumerate(results):
        if isinstance(r, OSError):
            if not isinstance(r, (ConnectionResetError, ConnectionRefusedError)):
                bad.append("client %d: %r" % (i, r))
        elif r is None:
            bad.append("client %d: never finished" % i)
        elif r.status == 200:
            if int(r.headers.get("content-length", -1)) != len(r.body) or not r.eof:
                bad.append("client %d: incomplete 200: %r" % (i, r))
        elif r.status is not None or not (r.eof or r.reset):
            bad.append("client %d: %r" % (i, r))
    ok = sum(1 for r in results if isinstance(r, HttpResult) and r.status == 200)
    assert not bad, "\n".join(bad)
    assert ok >= 1, "no client got a 200"
    assert took < 5.0, "the 20 clients took %.1f s" % took
    assert rcode(a) == NOERROR and dns_took < 0.5, "DNS during the burst: %.3f s" % dns_took
    assert http(d.mport, "/health").status == 200


def test_metrics_clients_must_pass_allow(mdotp, upstream):
    """--allow 10.0.0.0/8: a metrics client on 127.0.0.1 is closed without
    a response (quickly, not at the 2 s limit)."""
    d = mdotp([upstream], extra=["--allow", "10.0.0.0/8"])
    r = http(d.mport, "/metrics", timeout=3.0)
    assert r.status is None and r.raw == b"" and (r.eof or r.reset) and r.elapsed < 1.0, \
        "a client outside --allow: %r (want closed without a response)" % r


def test_metrics_allowed_client(mdotp, upstream):
    """--allow 127.0.0.2/32: a client from 127.0.0.2 gets 200, one from
    127.0.0.1 is closed without a response."""
    d = mdotp([upstream], extra=["--allow", "127.0.0.2/32"])
    r = http_raw(d.mport, b"GET /health HTTP/1.1\r\n\r\n", source="127.0.0.2")
    assert r.status == 200, "from 127.0.0.2: %r" % r
    r = http_raw(d.mport, b"GET /health HTTP/1.1\r\n\r\n", source="127.0.0.1")
    assert r.status is None and r.raw == b"", "from 127.0.0.1: %r" % r


# ==========================================================================
# 4. DNS latency under a scrape flood
# ==========================================================================

SCRAPER = r"""
import os, socket, sys, time
port, stop = int(sys.argv[1]), sys.argv[2]
n = 0
print("start", flush=True)
end = time.monotonic() + 30
while not os.path.exists(stop) and time.monotonic() < end:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        got += c
    s.close()
    if got.startswith(b"HTTP/1.1 200"):
        n += 1
print(n, flush=True)
"""


def _latencies(d, n, name="www.example.test"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((d.host, d.port))
    s.settimeout(2.0)
    out = []
    try:
        for i in range(n):
            q = make_query(name, "A", qid=(i % 60000) + 1)
            t = time.perf_counter()
            s.send(q)
            a = s.recv(4096)
            out.append(time.perf_counter() - t)
            assert a[:2] == q[:2]
    finally:
        s.close()
    return out


def test_dns_latency_under_scrape_flood(mdotp, upstream, tmp_path):
    """Cache hits over UDP (upstream: the real unbound): the median of 400
    sequential queries while another process scrapes /metrics in a loop
    is within 2x the median of idle runs (400 before and 400 after). The
    flood must reach at least 100 scrapes for the round to count. Best of
    two rounds (so one noisy moment on the machine does not fail it). The
    scraper runs at nice 10: on a 2-core machine this client and dotp take
    one core between them and the scraper the other, so what is measured
    is dotp serving scrapes in its loop, not the scheduler."""
    d = mdotp([upstream])
    _latencies(d, 200)        # warm-up: the entry is cached, paths are hot
    rounds = []
    for rnd in range(2):
        idle = _latencies(d, 400)
        stop = tmp_path / ("stop%d" % rnd)
        p = subprocess.Popen([sys.executable, "-c", SCRAPER, str(d.mport), str(stop)],
                             stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: os.nice(10))
        try:
            assert p.stdout.readline().strip() == "start"
            time.sleep(0.2)
            flood = _latencies(d, 400)
        finally:
            stop.write_text("x")
            try:
                out, _ = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
        scrapes = int(out.strip() or 0)
        idle += _latencies(d, 400)
        mi, mf = statistics.median(idle), statistics.median(flood)
        rounds.append((mf / mi, mi, mf, scrapes))
        if scrapes >= 100 and mf <= 2 * mi:
            break
    desc = "; ".join("round %d: idle median %.1f us, flood median %.1f us (x%.2f), %d scrapes"
                     % (i, mi * 1e6, mf * 1e6, ratio, n)
                     for i, (ratio, mi, mf, n) in enumerate(rounds))
    print(desc)
    good = [r for r in rounds if r[3] >= 100]
    assert good, "the scraper never reached 100 scrapes in a round: " + desc
    assert min(r[0] for r in good) <= 2.0, "DNS latency under a /metrics flood over 2x " \
        "idle: " + desc


# ==========================================================================
# 5. dotp healthcheck
# ==========================================================================

_LOGFMT = re.compile(r'^level=(info|error) msg="((?:[^"\\]|\\.)*)" probe=(\S+)$')


def healthcheck(args, env=None, limit=3.0):
    """Run `dotp healthcheck ARGS`: (exit status, its one output line,
    (level, msg, probe), seconds). Fails unless it ends within `limit`
    seconds with exactly one non-empty line (stdout and stderr together)
    in logfmt and no sanitizer report."""
    t = time.monotonic()
    p = run_dotp(["healthcheck"] + list(args), env=env, timeout=limit + 5)
    took = time.monotonic() - t
    out = p.stdout + p.stderr
    found = [m for m in SANITIZER_MARKERS if m in out]
    assert not found, out
    lines = [l for l in out.splitlines() if l.strip()]
    assert took <= limit, "dotp healthcheck %s took %.2f s (bound %.1f s)" % (args, took, limit)
    assert len(lines) == 1, "dotp healthcheck %s (env %s): want one line, got %d:\n%s" % (
        args, env, len(lines), out)
    m = _LOGFMT.match(lines[0])
    assert m, "not a logfmt line level=... msg=\"...\" probe=...: %r" % lines[0]
    return p.returncode, lines[0], m.groups(), took


def daemon_args(d):
    return d.args[1:]


def test_healthcheck_ready(mdotp, upstream):
    """With a working upstream: `dotp healthcheck` + the daemon's own
    arguments exits 0 with level=info msg="ready" probe=127.0.0.1:PORT."""
    d = mdotp([upstream])
    ask(d, "www.example.test", qid=1)
    rc_, line, (lvl, msg, probe), _ = healthcheck(daemon_args(d))
    assert (rc_, lvl, msg, probe) == (0, "info", "ready", "127.0.0.1:%d" % d.mport), line


def test_healthcheck_not_ready_when_default_down(mdotp, ports):
    """The only default upstream is dead and marked down: exit 1 with
    level=error msg="not ready: every upstream of the default zone is
    down"."""
    dead = ports.get()
    d = mdotp([dead], extra=["--timeout", "800"], probe=False)
    ask(d, "www.example.test", qid=1, timeout=3.0)
    rc_, line, (lvl, msg, probe), _ = healthcheck(daemon_args(d))
    assert (rc_, lvl, msg) == (1, "error", "not ready: every upstream of the default zone is "
                               "down"), line
    assert probe == "127.0.0.1:%d" % d.mport, line


def test_healthcheck_nothing_listens(pki, ports):
    """--metrics on a port nothing listens on: exit 1, level=error
    msg="not ready: ...", within 3 s."""
    mport = ports.get()
    args = ["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
            "--ca-file", str(pki.ca_pem), "--metrics", "127.0.0.1:%d" % mport]
    rc_, line, (lvl, msg, probe), took = healthcheck(args, limit=3.0)
    assert (rc_, lvl) == (1, "error") and msg.startswith("not ready: "), line
    assert probe == "127.0.0.1:%d" % mport, line


def test_healthcheck_metrics_never_answers(pki, ports, blackhole_factory):
    """--metrics on a port that accepts and never answers: exit 1 with
    level=error msg="not ready: ...", within 3 s (its bound is ~2 s)."""
    mport = ports.get()
    blackhole_factory(("127.0.0.1", mport))
    args = ["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
            "--ca-file", str(pki.ca_pem), "--metrics", "127.0.0.1:%d" % mport]
    rc_, line, (lvl, msg, _), took = healthcheck(args, limit=3.0)
    assert (rc_, lvl) == (1, "error") and msg.startswith("not ready: "), line
    assert took >= 1.5, "gave up after %.2f s, before its 2 s bound?" % took


def test_healthcheck_dns_probe_alive(mdotp, faultdot_factory):
    """Without --metrics: a STATUS query to the first -l address; exit 0,
    level=info msg="alive: ..." probe=127.0.0.1:PORT; nothing reaches the
    upstream."""
    srv = faultdot_factory()
    d = mdotp([srv], metrics=None)
    before = srv.snapshot()["queries"]
    rc_, line, (lvl, msg, probe), _ = healthcheck(daemon_args(d))
    assert (rc_, lvl, probe) == (0, "info", "127.0.0.1:%d" % d.port), line
    assert msg.startswith("alive"), line
    time.sleep(0.1)
    assert srv.snapshot()["queries"] == before, "the probe went upstream"


def test_healthcheck_dns_probe_nothing_listens(pki, ports):
    """Without --metrics and nothing on the -l address: exit 1 with
    msg="not ready: no answer from dotp on 127.0.0.1:PORT within 2000 ms",
    within 3 s."""
    port = ports.get()
    args = ["-l", "127.0.0.1:%d" % port, "-u", "127.0.0.1:853#dot.test",
            "--ca-file", str(pki.ca_pem)]
    rc_, line, (lvl, msg, probe), _ = healthcheck(args, limit=3.0)
    assert (rc_, lvl, msg) == (1, "error", "not ready: no answer from dotp on 127.0.0.1:%d "
                               "within 2000 ms" % port), line


def test_healthcheck_via_env(mdotp, upstream, ports):
    """DOTP_METRICS=127.0.0.1:P for the daemon and for `dotp healthcheck`
    (with the daemon's arguments, no --metrics): exit 0 msg="ready" (the
    HTTP probe, not the DNS one) on that port."""
    mport = ports.get()
    env = {"DOTP_METRICS": "127.0.0.1:%d" % mport}
    d = mdotp([upstream], metrics=None, env=env, mport=mport)
    ask(d, "www.example.test", qid=1)
    rc_, line, (lvl, msg, probe), _ = healthcheck(daemon_args(d), env=env)
    assert (rc_, lvl, msg, probe) == (0, "info", "ready", "127.0.0.1:%d" % mport), line


def test_healthcheck_via_env_not_ready(mdotp, ports):
    """DOTP_METRICS for both, the default upstream dead and marked down:
    exit 1, msg="not ready: every upstream of the default zone is down"."""
    mport, dead = ports.get(), ports.get()
    env = {"DOTP_METRICS": "127.0.0.1:%d" % mport}
    d = mdotp([dead], metrics=None, env=env, mport=mport, probe=False,
              extra=["--timeout", "800"])
    ask(d, "www.example.test", qid=1, timeout=3.0)
    rc_, line, (lvl, msg, _), _ = healthcheck(daemon_args(d), env=env)
    assert (rc_, msg) == (1, "not ready: every upstream of the default zone is down"), line


def test_healthcheck_wildcard_metrics(mdotp, upstream, ports):
    """--metrics 0.0.0.0:P: the healthcheck reaches the instance (exit 0,
    msg="ready"). (On Linux a connect to 0.0.0.0 reaches loopback anyway,
    so this cannot tell whether dotp rewrote the address; the next test
    looks at what it says it probed.)"""
    mport = ports.get()
    d = mdotp([upstream], metrics="0.0.0.0:%d" % mport, mport=mport)
    rc_, line, (lvl, msg, probe), _ = healthcheck(daemon_args(d))
    assert (rc_, msg) == (0, "ready"), line


def test_healthcheck_wildcard_probe_names_loopback(mdotp, upstream, ports):
    """--metrics 0.0.0.0:P: the wildcard becomes loopback, and the line
    names the address actually asked: probe=127.0.0.1:P (as README's
    example for the image, DOTP_METRICS=0.0.0.0:9253, shows:
    probe=127.0.0.1:9253)."""
    mport = ports.get()
    d = mdotp([upstream], metrics="0.0.0.0:%d" % mport, mport=mport)
    rc_, line, (lvl, msg, probe), _ = healthcheck(daemon_args(d))
    assert (rc_, msg, probe) == (0, "ready", "127.0.0.1:%d" % mport), line


# ==========================================================================
# 6. option errors, default port, off by default
# ==========================================================================

BAD_METRICS = ["not-an-address", "127.0.0.1:99999", "127.0.0.1:abc", "[::1", "1.2.3.4.5",
               "host.example:9253"]


@pytest.fixture
def base(pki, ports):
    return ["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
            "--ca-file", str(pki.ca_pem)]


def one_error_line(p, status, needle):
    out = p.stdout + p.stderr
    lines = [l for l in out.splitlines() if l.strip()]
    assert p.returncode == status, "exit status %s (want %d)\n%s" % (p.returncode, status, out)
    assert len(lines) == 1, "want one line, got %d:\n%s" % (len(lines), out)
    assert needle in lines[0], "%r not in %r" % (needle, lines[0])
    assert lines[0].startswith("level=error "), lines[0]


@pytest.mark.parametrize("value", BAD_METRICS)
def test_metrics_bad_value(base, value):
    """--metrics with a bad value: exit 2, one line naming the value."""
    p = run_dotp(base + ["--metrics", value], timeout=5)
    one_error_line(p, 2, value)


def test_metrics_bad_value_env(base):
    """DOTP_METRICS with a bad value: exit 2, one line naming it."""
    p = run_dotp(base, env={"DOTP_METRICS": "127.0.0.1:70000"}, timeout=5)
    one_error_line(p, 2, "127.0.0.1:70000")


def test_metrics_port_in_use(base, ports):
    """--metrics on a port another socket listens on: exit 1, one error
    line naming the address."""
    mport = ports.get()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", mport))
        s.listen(1)
        p = run_dotp(base + ["--metrics", "127.0.0.1:%d" % mport], timeout=5)
    finally:
        s.close()
    out = p.stdout + p.stderr
    assert p.returncode == 1, "exit status %s (want 1)\n%s" % (p.returncode, out)
    errs = [l for l in out.splitlines() if l.startswith("level=error ")]
    assert len(errs) == 1 and "127.0.0.1:%d" % mport in errs[0], \
        "want one error line naming 127.0.0.1:%d:\n%s" % (mport, out)


def test_metrics_default_port(mdotp, upstream):
    """--metrics 127.0.0.1 (no port): HTTP on port 9253."""
    if tcp_listening(9253):
        pytest.skip("port 9253 is taken in this namespace")
    mdotp([upstream], metrics="127.0.0.1", mport=9253)
    r = http(9253, "/health")
    assert r.status == 200, r


def test_metrics_off_unless_set(mdotp, upstream):
    """Without --metrics or DOTP_METRICS, dotp opens no TCP listener but
    its DNS port (so no HTTP on 9253 or anywhere)."""
    d = mdotp([upstream], metrics=None)
    pid = d.proc.pid
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if t.startswith("socket:["):
            inodes.add(t[8:-1])
    listening = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(f) as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    listening.append(int(parts[1].rsplit(":", 1)[1], 16))
    assert sorted(set(listening)) == [d.port], "dotp listens on TCP %s (want only %d)" % (
        listening, d.port)


# ==========================================================================
# failures and SERVFAIL by reason
# ==========================================================================

REASONS = ("connect", "tls", "silent", "protocol")


def failures(s, label):
    """(total, {reason: n}) of upstream `label`'s failure counters."""
    return (s.get("dotp_upstream_failures_total", upstream=label),
            {r: s.get("dotp_upstream_failures_%s_total" % r, upstream=label) for r in REASONS})


def servfails(s):
    parts = {r: s.get("dotp_servfail_%s_total" % r) for r in ("deadline", "tries", "exit")}
    return s.get("dotp_servfail_total"), parts, s.get("dotp_table_full_total")


def test_failures_by_reason_connect_tls_silent(mdotp, upstream, plain_factory, ports):
    """Each reason moves on its own event and the total is their sum:
    connect (nothing listens on the default upstream's port), tls (the
    server at a --forward DoT zone speaks plain DNS: unbound's plain port),
    silent (a plain DNS server of another zone never answers)."""
    dead = ports.get()
    silent = plain_factory(silent=True)
    plain_tls = "127.0.0.1:%d#dot.test" % upstream.plain_port
    d = mdotp([dead], extra=["--forward", "tls.test=" + plain_tls,
                             "--forward", "quiet.test=dns://127.0.0.1:%d" % silent.port,
                             "--timeout", "1500", "--attempt-timeout", "200"],
              probe=False)
    ask(d, "a.example.test", timeout=3.0)
    ask(d, "a.tls.test", timeout=3.0)
    ask(d, "a.quiet.test", timeout=3.0)
    s = scrape(d)
    want = {"127.0.0.1:%d" % dead: "connect",
            "127.0.0.1:%d" % upstream.plain_port: "tls",
            "127.0.0.1:%d" % silent.port: "silent"}
    for label, reason in want.items():
        total, by = failures(s, label)
        assert by[reason] >= 1, "%s: %s failures %s%s" % (label, reason, by, ctx(d))
        assert total == sum(by.values()), "%s: total %s != sum %s" % (label, total, by)
        others = {r: n for r, n in by.items() if r != reason}
        assert not any(others.values()), "%s: other reasons moved: %s" % (label, by)


def test_failures_protocol(mdotp, faultdot_factory):
    """A frame shorter than a DNS header (the answer hook sends 5 bytes):
    failures_protocol, and nothing else."""
    srv = faultdot_factory(["normal"], answer=lambda q: Reply(wire=b"\x00\x01\x02\x03\x04"))
    d = mdotp([srv], extra=["--timeout", "1500"], probe=False)
    ask(d, "www.example.test", timeout=3.0)
    s = scrape(d)
    total, by = failures(s, "127.0.0.1:%d" % srv.port)
    assert by["protocol"] >= 1 and total == sum(by.values()), (by, total, ctx(d))


def test_servfail_by_reason(mdotp, faultdot_factory, ports):
    """tries: the only upstream refuses connections (no server left);
    deadline: a silent upstream and --timeout 600; exit: a query still
    waiting at SIGTERM with --drain 0 (the exit line). The total is always
    the sum of the reasons and table_full."""
    dead = ports.get()
    d = mdotp([dead], extra=["--timeout", "1500"], probe=False)
    ask(d, "www.example.test", timeout=3.0)
    total, parts, tf = servfails(scrape(d))
    assert parts["tries"] == 1 and total == sum(parts.values()) + tf, (total, parts, ctx(d))

    srv = faultdot_factory(["silent"])
    d = mdotp([srv], extra=["--timeout", "600", "--drain", "0"], probe=False)
    a = ask(d, "www.example.test", timeout=3.0)
    assert rcode(a) == SERVFAIL
    total, parts, tf = servfails(scrape(d))
    assert parts["deadline"] == 1 and total == sum(parts.values()) + tf, (total, parts)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(make_query("w2.example.test", "A", qid=7), (d.host, d.port))
    time.sleep(0.2)
    d.stop(signal.SIGTERM)
    s.close()
    exit_line = [l for l in d.log().splitlines() if 'msg="dotp exiting"' in l]
    assert exit_line and "servfail_exit=1" in exit_line[-1], d.log()[-1500:]
