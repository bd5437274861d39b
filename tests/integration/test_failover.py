"""Several upstreams: fail-over from a dead, hung or silent first upstream,
recovery after the back-off, round-robin, TLS session resumption, and an
upstream killed under load."""

import pytest
import re
import time

from faultdot import (faultdot_factory, run_load, names, start_dotp, stop_dotp,  # noqa: F401
                      LoadResult, upstream_spec)


def _ctx(d, *servers):
    return "dotp stderr (tail):\n%s\nservers:\n%s" % (
        d.log()[-3000:], "\n".join("  %s tag=%s %s %s" % (s.port, s.tag, s.snapshot(),
                                                          s.conns[-6:])
                                   for s in servers))


def _tags(r):
    """{faultdot tag: number of answers it gave} over a LoadResult's ok answers."""
    out = {}
    for s in r.ok:
        t = LoadResult.answered_by(s.answers[0][1])
        out[t] = out.get(t, 0) + 1
    return out


def _first_query(d, qname, timeout=4.0):
    r = run_load(d.host, d.port, [qname], n_udp=1, n_tcp=0, timeout=timeout, linger=0.05)
    return r


# ---------------------------------------------------------------- (a)

def test_first_upstream_port_closed(dotp_factory, faultdot_factory, ports):
    """First upstream refuses the connection: the first query is answered by
    the second within 500 ms (a refused connect is immediate), and so are
    the ones after it."""
    dead = ports.get()          # nothing listens there
    second = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [dead, second], ["--timeout", "2000"])
    r = _first_query(d, "first.example.test")
    r.check(context=_ctx(d, second))
    lat = r.sent[0].latency()
    assert lat < 0.5, "first answer after %.3f s (bound 0.5 s)\n%s" % (lat, _ctx(d, second))
    assert _tags(r) == {2: 1}
    r = run_load(d.host, d.port, names("after", 40), 3, 1, timeout=3.0)
    r.check(context=_ctx(d, second))
    assert _tags(r) == {2: 40}
    stop_dotp(d)


# ---------------------------------------------------------------- (b)

@pytest.mark.parametrize("extra,lo,hi", [
    (["--handshake-timeout", "500", "--timeout", "3000"], 0.0, 0.9),
    ([], 0.7, 1.1),
], ids=["handshake-timeout-500", "defaults"])
def test_first_upstream_no_handshake(dotp_factory, faultdot_factory, extra, lo, hi):
    """First upstream accepts TCP but never speaks TLS. With
    --handshake-timeout 500 the first query is answered by the second within
    500 ms + 400 ms margin. With the defaults (handshake 2000 ms, attempt
    750 ms before any RTT sample) it does not wait for the handshake
    timeout: it moves to the second after the attempt timeout (0.75 s +
    0.35 s margin), and the hung upstream is marked down then. Either way
    the queries that follow go straight to the second (< 200 ms each), even
    while the hung handshake is still pending."""
    hung = faultdot_factory(["no_handshake"], tag=1)
    second = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [hung, second], extra)
    r = _first_query(d, "first.example.test")
    r.check(context=_ctx(d, hung, second))
    lat = r.sent[0].latency()
    assert lo < lat < hi, "first answer after %.3f s (want %.2f..%.2f s)\n%s" % (
        lat, lo, hi, _ctx(d, hung, second))
    assert hung.accepted >= 1, "dotp never tried the first upstream\n" + _ctx(d, hung, second)
    r = run_load(d.host, d.port, names("after", 20), 2, 1, window=5, timeout=3.0)
    r.check(context=_ctx(d, hung, second))
    slow = [round(s.latency(), 3) for s in r.sent if s.latency() > 0.2]
    assert not slow, "queries after the fail-over not sent straight to the second: %s" % slow
    assert _tags(r) == {2: 20}
    stop_dotp(d)


# ---------------------------------------------------------------- (c)

def test_first_upstream_silent(dotp_factory, faultdot_factory):
    """First upstream completes TLS and never answers: with
    --attempt-timeout 300 the first query is re-sent to the second and
    answered within 300 ms + 300 ms margin; the connection answered nothing
    since, so the upstream is marked down and the following queries go
    straight to the second (none reaches the silent one, each < 200 ms)."""
    silent = faultdot_factory(["silent"], tag=1)
    second = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [silent, second],
                   ["--attempt-timeout", "300", "--timeout", "3000"])
    r = _first_query(d, "first.example.test")
    r.check(context=_ctx(d, silent, second))
    lat = r.sent[0].latency()
    assert lat < 0.6, "first answer after %.3f s (bound 0.6 s)\n%s" % (lat, _ctx(d, silent, second))
    assert silent.queries >= 1, "the silent upstream never got the query\n" + _ctx(d, silent, second)
    before = silent.queries
    # well within the 1 s back-off
    r = run_load(d.host, d.port, names("after", 20), 2, 1, window=5, timeout=3.0)
    r.check(context=_ctx(d, silent, second))
    slow = [round(s.latency(), 3) for s in r.sent if s.latency() > 0.2]
    assert not slow, "queries not sent straight to the second: %s\n%s" % (slow, _ctx(d, silent, second))
    assert silent.queries == before, "queries went to the upstream marked down\n" + _ctx(d, silent, second)
    assert _tags(r) == {2: 20}
    stop_dotp(d)


def test_default_attempt_timeout_before_samples(dotp_factory, faultdot_factory):
    """No --attempt-timeout and no RTT sample yet: the attempt timeout is
    750 ms (never above --timeout/2), so a query stuck on a silent first
    upstream is answered by the second within 750 ms + 350 ms margin."""
    silent = faultdot_factory(["silent"], tag=1)
    second = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [silent, second], ["--timeout", "3000"])
    r = _first_query(d, "first.example.test")
    r.check(context=_ctx(d, silent, second))
    lat = r.sent[0].latency()
    assert lat < 1.1, "first answer after %.3f s (want 750 ms + margin)\n%s" % (
        lat, _ctx(d, silent, second))
    assert _tags(r) == {2: 1}
    stop_dotp(d)


# ---------------------------------------------------------------- (d)

def test_recovery_after_backoff(dotp_factory, faultdot_factory):
    """First upstream down (port closed): queries go to the second. The first
    comes back; after the 1 s back-off dotp probes it in the background (a
    handshake with no query) and, policy first, uses it again."""
    first = faultdot_factory(["normal"], tag=1)
    first.stop()
    second = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [first, second], ["--timeout", "2000"])
    r = run_load(d.host, d.port, names("down", 10), 2, 0, window=2, timeout=3.0)
    r.check(context=_ctx(d, first, second))
    assert _tags(r) == {2: 10}
    first.start()
    t = time.monotonic()
    deadline = t + 4.0
    while first.handshakes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.handshakes >= 1, ("no probe of the first upstream within 4 s of its "
                                   "return\n" + _ctx(d, first, second))
    assert first.queries == 0, "the probe carried queries?\n" + _ctx(d, first, second)
    time.sleep(0.05)
    r = run_load(d.host, d.port, names("back", 20), 2, 1, window=5, timeout=3.0)
    r.check(context=_ctx(d, first, second))
    assert _tags(r) == {1: 20}, "after recovery, answers by tag: %s\n%s" % (
        _tags(r), _ctx(d, first, second))
    stop_dotp(d)


# ---------------------------------------------------------------- (e)

def test_round_robin_spreads(dotp_factory, faultdot_factory):
    a = faultdot_factory(["normal"], tag=1)
    b = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [a, b], ["--policy", "round-robin", "--timeout", "2000"])
    r = run_load(d.host, d.port, names("rr", 100), 3, 1, window=10, timeout=3.0)
    r.check(context=_ctx(d, a, b))
    tags = _tags(r)
    assert tags.get(1, 0) >= 30 and tags.get(2, 0) >= 30, \
        "round-robin split %s\n%s" % (tags, _ctx(d, a, b))
    stop_dotp(d)


def test_policy_first_uses_only_first(dotp_factory, faultdot_factory):
    """Default policy: everything to the first healthy upstream (existing
    behaviour; the counterpart of round-robin)."""
    a = faultdot_factory(["normal"], tag=1)
    b = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [a, b], ["--timeout", "2000"])
    r = run_load(d.host, d.port, names("first", 100), 3, 1, window=10, timeout=3.0)
    r.check(context=_ctx(d, a, b))
    assert _tags(r) == {1: 100}, _tags(r)
    assert b.queries == 0
    stop_dotp(d)


# ---------------------------------------------------------------- (f)

# logfmt: msg="upstream ready" then key=value fields; other fields (e.g.
# suite=) may stand around gen= and handshake=.
HS_RE = re.compile(r'msg="upstream ready"(?: \w+=\S+)*? gen=(\d+)(?: \w+=\S+)*? '
                   r'handshake=(full|resumed)\b')


def _handshakes(log):
    return [m.group(2) for m in HS_RE.finditer(log)]


def test_resumption_faultdot(dotp_factory, faultdot_factory):
    """The upstream closes (close_notify) after every answer, so every query
    needs a new connection: the server sees resumed handshakes
    (session_reused), dotp logs handshake=full then handshake=resumed, and
    counts them at exit."""
    srv = faultdot_factory(["close_after:1"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"], verbose=True)
    for i in range(4):
        r = _first_query(d, "resume%d.example.test" % i)
        r.check(context=_ctx(d, srv))
        time.sleep(0.1)
    assert srv.handshakes >= 4, _ctx(d, srv)
    assert srv.resumed >= 1, "dotp never resumed a TLS session\n" + _ctx(d, srv)
    hs = _handshakes(d.log())
    assert hs[:1] == ["full"] and "resumed" in hs[1:], \
        "handshake log lines: %s\n%s" % (hs, _ctx(d, srv))
    c = stop_dotp(d)
    assert c.get("handshakes_resumed", 0) >= 1 and c.get("handshakes_full", 0) >= 1, c
    assert c["handshakes_resumed"] + c["handshakes_full"] == srv.handshakes, (c, srv.snapshot())


def test_resumption_unbound(dotp_factory, unbound_factory):
    """Against unbound (OpenSSL): dotp closes idle connections after 200 ms
    (close_notify), queries 400 ms apart reconnect, and the reconnects
    resume the session."""
    u = unbound_factory()
    # --no-cache: each repeat must reach unbound to make a connection.
    d = start_dotp(dotp_factory, [upstream_spec(u.tls_port)],
                   ["--idle-timeout", "200", "--timeout", "2000", "--no-cache"],
                   verbose=True)
    from harness import make_query, udp_exchange, rcode
    for i in range(4):
        a = udp_exchange(d.host, d.port, make_query("www.example.test", "A", qid=100 + i),
                         timeout=3)
        assert rcode(a) == 0
        time.sleep(0.4)
    hs = _handshakes(d.log())
    assert len(hs) >= 3, "want >= 3 handshakes (idle closes), got %s\n%s" % (hs, d.log()[-3000:])
    assert hs[0] == "full" and "resumed" in hs[1:], \
        "handshake log lines: %s\n%s" % (hs, d.log()[-3000:])
    stop_dotp(d)


# ---------------------------------------------------------------- (g)

UNBOUND_A = {
    "www.example.test": {"192.0.2.10", "192.0.2.11"},
    "mail.example.test": {"192.0.2.25"},
    "ns.example.test": {"192.0.2.53"},
}


def test_upstream_killed_under_load(dotp_factory, unbound_factory):
    """Two unbound upstreams; 2,000 queries at 400/s from 4 UDP clients; the
    first unbound is SIGKILLed after 800 queries. No query is lost and none
    gets SERVFAIL (dotp re-sends what was in flight on the dead one): every
    one is answered once, NOERROR, with the zone's data."""
    u1 = unbound_factory()
    u2 = unbound_factory()
    d = start_dotp(dotp_factory, [upstream_spec(u1.tls_port), upstream_spec(u2.tls_port)])
    qn = [list(UNBOUND_A)[i % 3] for i in range(2000)]
    killed = []

    def progress(n_sent, n_answered):
        if n_sent == 800 and not killed:
            u1.proc.kill()
            killed.append(time.monotonic())

    r = run_load(d.host, d.port, qn, n_udp=4, n_tcp=0, rate=400, timeout=4.0,
                 expect=lambda name: UNBOUND_A[name], on_progress=progress)
    assert killed
    r.check(allow_servfail=False,
            context="first unbound killed after 800 queries\n" + d.log()[-3000:])
    assert r.elapsed < 12, r.summary()
    after = [s for s in r.sent if s.t_sent > killed[0]]
    assert len(after) >= 1000
    stop_dotp(d)
