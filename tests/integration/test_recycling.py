"""Connection recycling loses nothing (issue "works with every real DoT
server"). Real DoT servers close connections whenever they like: after N
answers (cleanly with close_notify, with a bare FIN, with an RST, or in
the middle of an answer frame) or after T ms idle. A query a server left
unanswered because it closed a connection that answered others is re-sent
without using up its tries, within its deadline; a connection that
answered nothing still costs a try (the guard against a server that
accepts and closes forever). dotp learns each upstream's N and T: later
connections carry at most N queries each, a burst is spread over parallel
connections (within --max-conns), and idle connections are closed by dotp
before the server's T. All against faultdot (faultdot.py), default
--timeout (3000 ms) and --max-conns (4)."""

import threading
import time

import pytest

from faultdot import (faultdot_factory, run_load, names, start_dotp, stop_dotp,  # noqa: F401
                      proc_fds, settled_fds, log_values)

BURST = 500         # queries per burst
WINDOW = 50         # outstanding at once
CLIENTS = 5         # UDP sockets, or pipelined TCP connections
TIMEOUT_S = 3.0     # dotp's default --timeout
MAX_CONNS = 4       # dotp's default --max-conns


def _ctx(d, srv, n=8):
    return "dotp stderr (tail):\n%s\nserver %s %s\nlast connections:\n  %s" % (
        d.log()[-3000:], srv.port, srv.snapshot(),
        "\n  ".join(repr(c) for c in srv.conns[-n:]))


def _peak_busy(conns):
    """Most connections certainly open at once, as the server saw them:
    each from its accept to its last activity (handshake, query or answer:
    dotp cannot have closed it before), so never more than were open."""
    ev = []
    for c in conns:
        if c.t_last is None:
            continue
        ev += [(c.t_accept, 1), (c.t_last, -1)]
    peak = cur = 0
    for _, d in sorted(ev, key=lambda e: (e[0], e[1])):
        cur += d
        peak = max(peak, cur)
    return peak


# --------------------------------------------------------------------------
# every query of a burst answered right
# --------------------------------------------------------------------------

RECYCLE = ["close_after:3", "fin_after:3", "reset_after:3", "mid_frame:3", "mid_frame:5"]
TRANSPORTS = {"udp": (CLIENTS, 0), "tcp": (0, CLIENTS)}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("behaviour", RECYCLE)
def test_burst_every_query_answered(dotp_factory, faultdot_factory, behaviour, transport):
    """The only upstream closes every connection after a few answers
    (close_notify, FIN, RST, or half of the next answer frame and FIN).
    A burst of 500 queries, 50 outstanding at once, from 5 UDP sockets or
    5 pipelined TCP connections: every query gets exactly one answer, the
    right one, no SERVFAIL, within the default --timeout (3 s): the
    queries a close leaves unanswered are re-sent free, since each of
    those connections answered others. Afterwards dotp's descriptors are
    what they were before the burst, apart from at most --max-conns (4)
    upstream connections; its exit line says servfail=0 and recycled>0
    (queries re-sent free). All problems are listed together."""
    srv = faultdot_factory([behaviour])
    d = start_dotp(dotp_factory, [srv])
    pid, up_ports = d.proc.pid, {srv.port}
    fd0, up0 = settled_fds(pid, up_ports)
    n_udp, n_tcp = TRANSPORTS[transport]
    t0 = time.monotonic()
    r = run_load(d.host, d.port, names("recycle", BURST), n_udp, n_tcp, window=WINDOW,
                 timeout=TIMEOUT_S + 1.0, linger=0.3)
    took = time.monotonic() - t0
    problems = []
    try:
        r.check(allow_servfail=False)
    except AssertionError as e:
        problems.append("burst: %s" % e)
    late = sorted((round(s.latency(), 3) for s in r.sent if s.answers
                   and s.latency() > TIMEOUT_S), reverse=True)
    if late:
        problems.append("%d answers later than --timeout %d ms: %s"
                        % (len(late), TIMEOUT_S * 1000, late[:5]))
    fd1, up1 = settled_fds(pid, up_ports, want_other=fd0 - up0)
    if fd1 - up1 != fd0 - up0 or up1 > MAX_CONNS:
        problems.append("fds %d (%d upstream) before the burst, %d (%d upstream) after "
                        "(want the same non-upstream count and <= %d upstream)"
                        % (fd0, up0, fd1, up1, MAX_CONNS))
    c = stop_dotp(d)
    print("%s in %.2f s; %d connections; fds %d (%d upstream) -> %d (%d upstream); exit %s"
          % (r.summary(), took, len(srv.conns), fd0, up0, fd1, up1, c))
    if c.get("servfail") != 0:
        problems.append("exit line servfail=%s, want 0" % c.get("servfail"))
    if "recycled" not in c:
        problems.append("exit line has no recycled= counter: %s" % c)
    elif c["recycled"] <= 0:
        problems.append("exit line recycled=%d, want > 0 (the server closed %d "
                        "connections under load)" % (c["recycled"], len(srv.conns)))
    if c.get("queries") != BURST:
        problems.append("exit line queries=%s, want %d" % (c.get("queries"), BURST))
    assert srv.accepted >= 10, "the closes did not bite?\n" + _ctx(d, srv)
    assert took < 20, "burst took %.1f s" % took
    assert not problems, "%s (%.2f s)\n%s\n%s" % (
        r.summary(), took, "\n".join(problems), _ctx(d, srv))


# --------------------------------------------------------------------------
# what dotp learns
# --------------------------------------------------------------------------

def test_learns_conn_queries(dotp_factory, faultdot_factory):
    """The upstream closes cleanly after 3 answers on every connection.
    After two such closes in a row dotp knows it (one close alone could be
    a reset or a restart): -v logs a line with learned_conn_queries=3
    (never a larger value), every connection accepted after the second
    one ended carries at most 3 queries, the
    burst (500, 50 outstanding) is spread over 2 to --max-conns (4)
    connections open at once (at least 2 busy at once as the server saw
    them, or as dotp's sockets sampled during the burst; never more than
    4 sockets sampled), every query is answered right, and what
    dotp logs on exit (the exit line or its summary) says
    learned_conn_queries=3 again."""
    srv = faultdot_factory(["close_after:3"])
    d = start_dotp(dotp_factory, [srv], verbose=True)
    pid = d.proc.pid
    fd0, up0 = settled_fds(pid, {srv.port})
    # dotp's upstream sockets during the burst, every 2 ms: its fds minus
    # the others (listeners etc.; constant with UDP clients only), cheap
    # enough not to slow the load down (fd_breakdown reads /proc/net/tcp)
    samples = [0]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                samples.append(len(proc_fds(pid)) - (fd0 - up0))
            except OSError:
                return
            time.sleep(0.002)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        r = run_load(d.host, d.port, names("learn", BURST), CLIENTS, 0, window=WINDOW,
                     timeout=TIMEOUT_S + 1.0, linger=0.3)
    finally:
        stop.set()
        th.join(2)
    problems = []
    try:
        r.check(allow_servfail=False)
    except AssertionError as e:
        problems.append("burst: %s" % e)
    text = d.log()
    learned = log_values(text, "learned_conn_queries")
    if 3 not in learned or max(learned) > 3:
        problems.append("learned_conn_queries values logged: %s (want 3, none above)"
                        % learned[:10])
    closed = [c for c in srv.conns if c.closed_by == "server" and c.answers == 3]
    if not closed:
        problems.append("no connection closed by the server after 3 answers")
    else:
        ends = sorted(c.t_end for c in closed if c.t_end)
        t_learn = ends[1] if len(ends) > 1 else ends[0]
        later = [c for c in srv.conns if c.t_accept > t_learn and c.t_handshake]
        over = [c for c in later if c.queries > 3]
        if len(later) < 10:
            problems.append("only %d connections after the second close" % len(later))
        if over:
            problems.append("%d of %d later connections carried more than 3 queries: %s"
                            % (len(over), len(later), over[:4]))
    # at least 2 open at once (the server's view, or dotp's sockets), never
    # more than --max-conns sockets in dotp
    busy, most = _peak_busy(srv.conns), max(samples)
    print("%s; %d connections; at once: %d busy (server), up to %d sockets (dotp, %d "
          "samples); learned_conn_queries logged: %s"
          % (r.summary(), len(srv.conns), busy, most, len(samples), learned[:5]))
    if max(busy, most) < 2:
        problems.append("never 2 connections open at once (%d busy at the server, up to "
                        "%d sockets in dotp): the burst was not spread" % (busy, most))
    if most > MAX_CONNS:
        problems.append("dotp had %d upstream sockets at once (--max-conns %d)"
                        % (most, MAX_CONNS))
    n = len(d.log())
    stop_dotp(d)
    tail = d.log()[n:]
    if 3 not in log_values(tail, "learned_conn_queries"):
        problems.append("nothing logged on exit says learned_conn_queries=3:\n" + tail[-1500:])
    assert not problems, "%s\n%s\n%s" % (r.summary(), "\n".join(problems), _ctx(d, srv))


IDLE_T = 1.5    # the server closes connections idle this long (s)


def _wait(pred, timeout):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_learns_idle_close(dotp_factory, faultdot_factory):
    """The upstream closes (close_notify + FIN) every connection idle for
    1500 ms; dotp's own --idle-timeout is 10000. Round 1, twice: a few
    queries, then the server closes the idle connection; after the second
    such close (one alone could be a restart) dotp logs a line with
    learned_idle_ms=. Round 2: a few queries again, right answers; now
    dotp closes its idle connections itself before 1500 ms: the server's
    log shows every later connection closed by the client first."""
    srv = faultdot_factory(["idle_close_notify:%d" % (IDLE_T * 1000)])
    d = start_dotp(dotp_factory, [srv], ["--idle-timeout", "10000"], verbose=True)
    for k in range(2):
        n0 = len(srv.conns)
        r = run_load(d.host, d.port, names("idle-a%d" % k, 6), 2, 1, timeout=3.0,
                     linger=0.05)
        r.check(allow_servfail=False, context="round 1\n" + _ctx(d, srv))
        assert _wait(lambda: len(srv.conns) > n0 and all(c.closed_by for c in srv.conns[n0:]),
                     IDLE_T + 1.0), "round 1: a connection was not closed\n" + _ctx(d, srv)
        closers = [c.closed_by for c in srv.conns[n0:]]
        assert "server" in closers, "round 1: %s (want the server's idle close)\n%s" % (
            srv.conns[n0:], _ctx(d, srv))
    problems = []
    if d.wait_log("learned_idle_ms=", timeout=1.0) is None:
        problems.append("no line with learned_idle_ms= after the server's idle close")
    n_before = len(srv.conns)
    r = run_load(d.host, d.port, names("idle-b", 6), 2, 1, timeout=3.0, linger=0.05)
    r.check(allow_servfail=False, context="round 2\n" + _ctx(d, srv))

    def later():
        return [c for c in srv.conns[n_before:] if c.t_handshake]

    _wait(lambda: later() and all(c.closed_by for c in later()), IDLE_T + 1.0)
    conns = later()
    if not conns:
        problems.append("round 2 used no new connection")
    for c in conns:
        idle = (c.t_close - c.t_last) if c.t_close and c.t_last else None
        if c.closed_by != "client" or idle is None or idle >= IDLE_T:
            problems.append("round 2 connection closed by %s after %s s idle (want dotp "
                            "to close it before %.1f s): %r"
                            % (c.closed_by, idle and round(idle, 3), IDLE_T, c))
    stop_dotp(d)
    assert not problems, "\n".join(problems) + "\n" + _ctx(d, srv)


# --------------------------------------------------------------------------
# the guard
# --------------------------------------------------------------------------

def test_connection_answering_nothing_costs_a_try(dotp_factory, faultdot_factory):
    """Every connection is closed cleanly at its first query, before any
    answer: that is a failed try, not a free re-send, so 20 queries end in
    SERVFAIL within --timeout 1500 (+0.5 s), exactly one answer each,
    with a bounded number of connections (3 tries each at most), and no
    query counted as recycled (when dotp has that counter)."""
    srv = faultdot_factory(["close_after:0"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "1500"])
    r = run_load(d.host, d.port, names("guard", 20), 3, 1, timeout=3.0, linger=0.5)
    r.check(allow_servfail=True, context=_ctx(d, srv))
    assert len(r.servfail) == 20, r.summary() + "\n" + _ctx(d, srv)
    slow = [(s.qname, round(s.latency(), 3)) for s in r.sent if s.latency() > 2.0]
    assert not slow, "SERVFAIL later than --timeout 1500 + 0.5 s: %s" % slow[:5]
    assert srv.accepted <= 3 * 20, "%d connections for 20 queries\n%s" % (
        srv.accepted, _ctx(d, srv))
    c = stop_dotp(d)
    assert c.get("recycled", 0) == 0, c
    assert c["servfail"] == 20, c
