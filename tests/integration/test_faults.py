"""dotp against a fault-injecting DoT upstream (faultdot.py): whatever the
upstream does, every client query gets exactly one answer, the right one
where an upstream could give it, else SERVFAIL; and a 10,000-query soak
with random faults leaks neither file descriptors nor memory."""

import time

import pytest

from faultdot import (faultdot_factory, run_load, names, start_dotp, stop_dotp,  # noqa: F401
                      fd_breakdown, proc_rss_kib)

N_UDP, N_TCP = 4, 2


def _ctx(d, *servers):
    return "dotp stderr (tail):\n%s\nservers:\n%s" % (
        d.log()[-3000:], "\n".join("  %s %s %s" % (s.port, s.snapshot(), s.conns[-6:])
                                   for s in servers))


# --------------------------------------------------------------------------
# one faulty upstream, existing options only
# --------------------------------------------------------------------------

# (behaviours, burst may see SERVFAIL). None may: a query a closing
# connection left unanswered is re-sent free when that connection answered
# others (test_recycling.py), and one that answered nothing is followed by
# a healthy one.
SINGLE = [
    (["normal"], False),
    (["delay:150"], False),
    (["close_after:7"], False),
    (["fin_after:7"], False),
    (["reset_after:7"], False),
    (["mid_frame:7"], False),
    # the first connection dies at its first query, later ones are fine
    (["close_after:0", "normal"], False),
    (["fin_after:0", "normal"], False),
    (["reset_after:0", "normal"], False),
    (["mid_frame:0", "normal"], False),
]


@pytest.mark.parametrize("behaviours,burst_servfail", SINGLE,
                         ids=["+".join(b) for b, _ in SINGLE])
def test_single_upstream_exactly_one_answer(dotp_factory, faultdot_factory,
                                            behaviours, burst_servfail):
    """Paced phase (at most 4 queries outstanding, fewer than the 7 answers
    a connection gives before it dies): every query can be answered on a
    fresh connection within its 3 sends, so all must be answered right.
    Burst phase (150 at once over 4 UDP sockets and 2 pipelined TCP
    connections): exactly one answer each, the right one, also where
    connections die every 7 answers: the queries such a close leaves
    unanswered are re-sent without using up their tries (the connection
    answered others), within --timeout."""
    srv = faultdot_factory(behaviours)
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    delay = 0.15 if behaviours[0].startswith("delay") else 0.0
    window = 20 if delay else 4
    r = run_load(d.host, d.port, names("paced", 60), N_UDP, N_TCP, window=window,
                 timeout=3.0)
    r.check(allow_servfail=False, context="paced phase\n" + _ctx(d, srv))
    # a re-send needs one reconnect + handshake (a few ms here); anything
    # near dotp's attempt timeout (>= 200 ms) means a query sat unsent
    slow = sorted(((round(s.latency(), 3), s.qname) for s in r.sent
                   if s.latency() > delay + 0.15), reverse=True)
    assert not slow, ("paced queries answered later than %d ms: %s\n%s"
                      % ((delay + 0.15) * 1000, slow[:8], _ctx(d, srv)))
    r = run_load(d.host, d.port, names("burst", 150), N_UDP, N_TCP, timeout=3.0,
                 linger=0.4)
    r.check(allow_servfail=burst_servfail, context="burst phase\n" + _ctx(d, srv))
    if behaviours[0] != "normal" and behaviours[0] != "delay:150":
        assert srv.accepted >= 2, "the fault never made dotp reconnect?\n" + _ctx(d, srv)
    c = stop_dotp(d)
    assert c["queries"] == 210, c
    assert c["answers"] + c["servfail"] == 210, c


def test_unknown_id_answers_dropped_and_counted(dotp_factory, faultdot_factory):
    """Before every real answer the upstream sends a well-formed answer (same
    question) with an ID not in flight: dotp drops each one, counts it as
    stray, and still gives every client its real answer exactly once. The
    server draws the ID outside what it has read and not answered; now and
    then that is the ID of a query dotp has sent and the server not yet
    read, and dotp, seeing an ID in flight on the connection with another
    question, counts that one as mismatched: still dropped."""
    srv = faultdot_factory(["unknown_id"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    r = run_load(d.host, d.port, names("stray", 150), N_UDP, N_TCP, timeout=3.0,
                 linger=0.4)
    r.check(allow_servfail=False, context=_ctx(d, srv))
    sent = srv.strays_sent
    c = stop_dotp(d)
    assert sent >= 150
    assert c.get("stray", 0) > 0, c
    assert c["stray"] + c["mismatched"] >= sent, \
        "upstream sent %d stray answers, dotp counted %s" % (sent, c)
    assert c["answers"] == 150 and c["servfail"] == 0, c


def test_reorder_answers_matched(dotp_factory, faultdot_factory):
    """The upstream answers each batch of 8 in reverse order: out-of-order
    answers reach the clients matched to the right query."""
    srv = faultdot_factory(["reorder:8"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    r = run_load(d.host, d.port, names("reorder", 160), 2, 2, timeout=3.0, tcp_first=True)
    r.check(allow_servfail=False, context=_ctx(d, srv))
    # the server really answered out of order...
    inversions = 0
    for cl in srv.conns:
        pos = {q: i for i, q in enumerate(cl.recv_order)}
        order = [pos[q] for q in cl.send_order if q in pos]
        inversions += sum(1 for a, b in zip(order, order[1:]) if b < a)
    assert inversions >= 10, "faultdot did not reorder? %s" % srv.conns
    # ...and the pipelined TCP clients saw answers in another order than
    # they asked (dotp passes them on as they come), each one still right
    client_inv = 0
    for ci in {s.client for s in r.sent if s.kind == "tcp"}:
        mine = [s for s in r.sent if s.client == ci]
        arrival = [s.answers[0][2] for s in mine]
        client_inv += sum(1 for a, b in zip(arrival, arrival[1:]) if b < a)
    assert client_inv > 0, "TCP clients got every answer in query order"
    stop_dotp(d)


def test_idle_close_notify_by_server(dotp_factory, faultdot_factory):
    """The upstream closes every connection (close_notify + FIN) after 150 ms
    idle. Rounds of queries 400 ms apart: each round finds its connection
    closed by the server and must be answered right all the same."""
    srv = faultdot_factory(["idle_close_notify:150"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    for rnd in range(5):
        r = run_load(d.host, d.port, names("idle%d" % rnd, 20), 2, 1, timeout=3.0,
                     linger=0.05)
        r.check(allow_servfail=False, context="round %d\n%s" % (rnd, _ctx(d, srv)))
        time.sleep(0.4)
    assert srv.accepted >= 5, _ctx(d, srv)
    assert sum(1 for c in srv.conns if c.end == "close_notify+fin") >= 4, _ctx(d, srv)
    stop_dotp(d)


@pytest.mark.parametrize("behaviour", ["no_handshake", "silent"])
def test_unresponsive_only_upstream_servfail(dotp_factory, faultdot_factory, behaviour):
    """The only upstream accepts TCP but never completes TLS, or completes
    it and never answers: SERVFAIL within --timeout 1500 (+0.5 s), once."""
    srv = faultdot_factory([behaviour])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "1500"])
    r = run_load(d.host, d.port, names(behaviour, 20), 3, 1, timeout=3.0, linger=0.5)
    r.check(allow_servfail=True, context=_ctx(d, srv))
    assert len(r.servfail) == 20, r.summary()
    slow = [(s.qname, round(s.latency(), 3)) for s in r.sent if s.latency() > 2.0]
    assert not slow, "SERVFAIL later than --timeout 1500 + 0.5 s: %s" % slow[:5]
    stop_dotp(d)


# --------------------------------------------------------------------------
# two upstreams (new engine: several -u, --attempt-timeout)
# --------------------------------------------------------------------------

def test_slow_first_upstream_resent_first_answer_wins(dotp_factory, faultdot_factory):
    """First upstream answers only after 600 ms; with --attempt-timeout 200
    every query is re-sent to the second one: each client gets exactly one
    answer (the first; the late one is never passed on), within 200 ms +
    margin."""
    slow = faultdot_factory(["delay:600"], tag=1)
    fast = faultdot_factory(["normal"], tag=2)
    d = start_dotp(dotp_factory, [slow, fast],
                   ["--attempt-timeout", "200", "--timeout", "2000"])
    r = run_load(d.host, d.port, names("hedge", 60), N_UDP, N_TCP, timeout=3.0,
                 linger=1.0)
    r.check(allow_servfail=False, context=_ctx(d, slow, fast))
    late = [(s.qname, round(s.latency(), 3)) for s in r.sent if s.latency() > 0.55]
    assert not late, "answers slower than attempt-timeout 200 ms + 350 ms: %s\n%s" % (
        late[:5], _ctx(d, slow, fast))
    assert fast.queries >= 1, _ctx(d, slow, fast)
    stop_dotp(d)


# --------------------------------------------------------------------------
# limits: --max-queries, --conn-queries / --max-conns
# --------------------------------------------------------------------------

def test_max_queries_overflow_servfail_at_once(dotp_factory, faultdot_factory):
    """--max-queries 50 with a silent upstream: of 120 queries, the ones over
    the bound get SERVFAIL at once (< 200 ms), the 50 pending ones SERVFAIL
    at --timeout 1000; exactly one answer each."""
    srv = faultdot_factory(["silent"])
    d = start_dotp(dotp_factory, [srv], ["--max-queries", "50", "--timeout", "1000"])
    r = run_load(d.host, d.port, names("over", 120), 3, 1, timeout=2.5, linger=0.3)
    r.check(allow_servfail=True, context=_ctx(d, srv))
    fast = [s for s in r.servfail if s.latency() < 0.2]
    slow = [s for s in r.servfail if s.latency() >= 0.8]
    assert len(r.servfail) == 120, r.summary()
    assert len(fast) >= 60 and len(slow) >= 40 and len(slow) <= 50, \
        "SERVFAIL at once: %d, at the deadline: %d (want 70 / 50)\n%s" % (
            len(fast), len(slow), _ctx(d, srv))
    c = stop_dotp(d)
    assert len(fast) <= c.get("table_full", -1) <= 120 - len(slow), \
        "exit line table_full=%s, want the SERVFAILs at once (%d to %d)" % (
            c.get("table_full"), len(fast), 120 - len(slow))


def test_connection_pool_bounds(dotp_factory, faultdot_factory):
    """--conn-queries 10 --max-conns 3, upstream answering after 300 ms: a
    burst of 100 queries opens more than one connection but never more than
    3 at once, never has more than 10 in flight on one, and all are
    answered right (the rest wait in dotp: 4 rounds of 300 ms)."""
    srv = faultdot_factory(["delay:300"])
    d = start_dotp(dotp_factory, [srv], ["--conn-queries", "10", "--max-conns", "3",
                                         "--timeout", "3000", "--attempt-timeout", "1400"])
    peak = [0]

    def progress(n_sent, n_answered):
        peak[0] = max(peak[0], srv.open_connections())

    r = run_load(d.host, d.port, names("pool", 100), 3, 1, timeout=4.0,
                 on_progress=progress)
    peak[0] = max(peak[0], srv.open_connections())
    r.check(allow_servfail=False, context=_ctx(d, srv))
    assert srv.accepted >= 2, "one connection for 100 in flight (--conn-queries 10)\n" + _ctx(d, srv)
    assert peak[0] <= 3, "%d connections open at once (want <= 3)\n%s" % (peak[0], _ctx(d, srv))
    over = [c for c in srv.conns if c.max_inflight > 10]
    assert not over, "more than --conn-queries 10 in flight on a connection: %s" % over
    stop_dotp(d)


# --------------------------------------------------------------------------
# soak
# --------------------------------------------------------------------------

SOAK_WARMUP = 1000
SOAK_TOTAL = 10000
SOAK_WINDOW = 100
SOAK_RATE = 2000    # queries/s: ~5 s, long enough for back-off/probe cycles
MAX_CONNS = 4   # dotp's --max-conns default


def _quiet_sample(pid, up_ports, settle=2.0):
    """(fds, upstream conns, rss KiB) once the fd count is stable for 100 ms."""
    end = time.monotonic() + settle
    prev = None
    while True:
        cur = fd_breakdown(pid, up_ports)
        if cur == prev or time.monotonic() > end:
            return cur[0], cur[1], proc_rss_kib(pid)
        prev = cur
        time.sleep(0.1)


def test_soak_random_faults_no_leaks(dotp_factory, faultdot_factory):
    """10,000 queries (4 UDP sockets + 2 pipelined TCP connections, at most
    100 outstanding, 2,000/s) through dotp whose first upstream injects random faults
    (delays up to 100 ms, stray IDs, and about once per 330 queries a
    close_notify, RST or half frame that takes all in flight on that
    connection along) and whose second is normal. Every query: exactly one
    answer, and the right one: no SERVFAIL, since a healthy upstream is
    there for every re-send. Bounded: the load phase
    must finish within 30 s.

    Leaks, after a 1,000-query warm-up vs at the end (dotp idle, fd count
    stable for 100 ms): fds that are not upstream connections equal; upstream
    connections at most 2 x --max-conns (4) = 8 at each point; VmRSS grows
    by less than 1 MiB."""
    rnd = faultdot_factory(["random"], tag=1, seed=7)
    good = faultdot_factory(["normal"], tag=2)
    # --no-cache: the soak's repeated names must all reach the upstreams.
    d = start_dotp(dotp_factory, [rnd, good], ["--timeout", "2000", "--no-cache"])
    pid = d.proc.pid
    up_ports = {rnd.port, good.port}
    t0 = time.monotonic()
    r1 = run_load(d.host, d.port, names("warm", SOAK_WARMUP), N_UDP, N_TCP, window=SOAK_WINDOW,
                  rate=SOAK_RATE, timeout=3.0, linger=0.3)
    r1.check(allow_servfail=True, context="warm-up\n" + _ctx(d, rnd, good))
    fd1, up1, rss1 = _quiet_sample(pid, up_ports)
    r2 = run_load(d.host, d.port, names("soak", SOAK_TOTAL - SOAK_WARMUP), N_UDP, N_TCP,
                  window=SOAK_WINDOW, rate=SOAK_RATE, timeout=3.0, linger=0.5)
    took = time.monotonic() - t0
    r2.check(allow_servfail=True, context="soak\n" + _ctx(d, rnd, good))
    fd2, up2, rss2 = _quiet_sample(pid, up_ports)
    sf = len(r1.servfail) + len(r2.servfail)
    info = ("warm-up: %s\nsoak: %s\nfds %d (%d upstream) -> %d (%d upstream); "
            "VmRSS %d -> %d KiB; faulty upstream: %s, %d connections"
            % (r1.summary(), r2.summary(), fd1, up1, fd2, up2, rss1, rss2,
               rnd.snapshot(), len(rnd.conns)))
    print(info)
    assert took < 30, "soak took %.1f s (bound 30 s)\n%s" % (took, info)
    # The second upstream is healthy: every query the faulty one drops
    # must be re-sent there, none may end in SERVFAIL.
    assert sf == 0, "SERVFAIL although a healthy upstream was there\n" + info
    assert rnd.queries >= 1000 and len(rnd.conns) >= 3 and rnd.strays_sent >= 10, \
        "the random faults did not bite?\n" + info
    assert up1 <= 2 * MAX_CONNS and up2 <= 2 * MAX_CONNS, info
    assert fd2 - up2 == fd1 - up1, "non-upstream fds changed\n" + info
    assert rss2 - rss1 < 1024, "VmRSS grew by %d KiB\n%s" % (rss2 - rss1, info)
    c = stop_dotp(d)
    assert c["queries"] == SOAK_TOTAL, c
    assert c["answers"] + c["servfail"] == SOAK_TOTAL, c
