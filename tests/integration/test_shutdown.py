"""Graceful shutdown: SIGTERM/SIGINT drain in-flight queries within --drain,
a second signal exits at once, no new queries are taken while draining;
and SIGPIPE from TCP clients that hang up never kills dotp."""

import signal
import socket
import struct
import threading
import time

import pytest

from faultdot import (faultdot_factory, run_load, names, start_dotp, exit_counters,  # noqa: F401
                      make_a_query)
from harness import tcp_read_msg


def _ctx(d, *servers):
    return "dotp stderr (tail):\n%s\nservers:\n%s" % (
        d.log()[-3000:], "\n".join("  %s %s %s" % (s.port, s.snapshot(), s.conns[-4:])
                                   for s in servers))


class ExitWatch:
    """Records when the dotp process exits."""

    def __init__(self, d):
        self.d = d
        self.t_exit = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        self.d.proc.wait()
        self.t_exit = time.monotonic()

    def wait(self, timeout):
        self.t.join(timeout)
        return self.t_exit


def _finish(d, rc_want, watch, deadline_s):
    """Wait for the exit (the test sent the signals), check its status, mark
    it stopped for the fixture, return the exit counters."""
    t = watch.wait(deadline_s)
    if t is None:
        d.proc.kill()
        d.proc.wait(5)
        d.returncode = "hung"
        d._err.close()
        pytest.fail("dotp still running %.1f s after the signal\n%s" % (
            deadline_s, d.log()[-3000:]), pytrace=False)
    d.returncode = d.proc.returncode
    d._err.close()
    assert d.returncode == rc_want, "exit status %r, want %r\n%s" % (
        d.returncode, rc_want, d.log()[-3000:])
    return exit_counters(d.log())


def _signal_after(d, delay, sig=signal.SIGTERM, when=None):
    def fire():
        time.sleep(delay)
        if when is not None:
            when.append(time.monotonic())
        d.send_signal(sig)
    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return t


def test_sigterm_drains_inflight(dotp_factory, faultdot_factory):
    """200 queries in flight (4 UDP sockets + 2 pipelined TCP connections)
    against an upstream that answers after 500 ms; SIGTERM 150 ms after
    they went out: all 200 get their real answer (no SERVFAIL), exit status
    0, the process gone within --drain (2000 default) + 1 s of the signal."""
    srv = faultdot_factory(["delay:500"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "3000"])
    watch = ExitWatch(d)
    fired = []
    started = []

    def progress(n_sent, n_answered):
        if n_sent == 200 and not started:
            started.append(_signal_after(d, 0.15, when=fired))

    r = run_load(d.host, d.port, names("drain", 200), 4, 2, timeout=3.0, linger=0.2,
                 on_progress=progress)
    c = _finish(d, 0, watch, 3.5)
    assert fired, "signal not sent"
    r.check(allow_servfail=False, context="SIGTERM while 200 in flight\n" + _ctx(d, srv))
    took = watch.t_exit - fired[0]
    assert took < 3.0, "exit %.2f s after SIGTERM (bound: drain 2 s + 1 s)" % took
    assert c and c["answers"] == 200 and c["servfail"] == 0, c


def test_sigterm_drain_expires_servfail(dotp_factory, faultdot_factory):
    """Silent upstream, --drain 1000: SIGTERM with 50 queries pending; they
    get SERVFAIL when the drain time is up (not before 0.8 s, not after
    1.5 s), exit status 0 within 1.5 s of the signal."""
    srv = faultdot_factory(["silent"])
    d = start_dotp(dotp_factory, [srv], ["--drain", "1000", "--timeout", "5000"])
    watch = ExitWatch(d)
    fired = []
    started = []

    def progress(n_sent, n_answered):
        if n_sent == 50 and not started:
            started.append(_signal_after(d, 0.1, when=fired))

    r = run_load(d.host, d.port, names("expire", 50), 4, 2, timeout=3.0, linger=0.2,
                 on_progress=progress)
    c = _finish(d, 0, watch, 2.0)
    r.check(allow_servfail=True, context=_ctx(d, srv))
    assert len(r.servfail) == 50, r.summary()
    rel = sorted(s.answers[0][0] - fired[0] for s in r.sent)
    assert rel[0] > 0.8 and rel[-1] < 1.5, \
        "SERVFAIL %.3f..%.3f s after SIGTERM, want in (0.8, 1.5)" % (rel[0], rel[-1])
    assert watch.t_exit - fired[0] < 1.5, "exit %.2f s after SIGTERM" % (watch.t_exit - fired[0])
    assert c and c["servfail"] == 50, c


def _sigterm_under_load(d, prefix, n, timeout, before, after):
    """Starts n queries in a thread, sends SIGTERM `before` s later, and
    checks `after` s on that dotp is still draining. Returns the thread and
    the list that receives run_load's result."""
    holder = []
    t = threading.Thread(target=lambda: holder.append(
        run_load(d.host, d.port, names(prefix, n), 2, 1, timeout=timeout, linger=0.1)),
        daemon=True)
    t.start()
    time.sleep(before)
    d.send_signal(signal.SIGTERM)
    time.sleep(after)
    assert d.proc.poll() is None, ("dotp exited at SIGTERM with %d queries in flight "
                                   "(want: drain)\n%s" % (n, d.log()[-2000:]))
    return t, holder


def test_second_signal_exits_at_once(dotp_factory, faultdot_factory):
    """During the drain (silent upstream, default --drain 2000) a second
    signal ends dotp at once (< 300 ms) with status 1."""
    srv = faultdot_factory(["silent"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "5000"])
    watch = ExitWatch(d)
    t, _ = _sigterm_under_load(d, "twice", 20, 1.5, before=0.2, after=0.3)
    t2 = time.monotonic()
    d.send_signal(signal.SIGINT)
    _finish(d, 1, watch, 2.0)
    assert watch.t_exit - t2 < 0.3, "exit %.3f s after the second signal" % (watch.t_exit - t2)
    t.join(5)


def test_no_new_queries_while_draining(dotp_factory, faultdot_factory):
    """Upstream answers after 800 ms; 5 queries in flight, SIGTERM. While
    dotp drains them, a new UDP query gets no answer, and a new TCP
    connection is refused or closed without an answer; the 5 in flight are
    answered right."""
    srv = faultdot_factory(["delay:800"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "3000"])
    watch = ExitWatch(d)
    t, holder = _sigterm_under_load(d, "old", 5, 2.0, before=0.15, after=0.1)
    # UDP: no answer
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((d.host, d.port))
    u.send(make_a_query("new-udp.example.test", 4242))
    u.settimeout(0.4)
    try:
        got = u.recv(4096)
        pytest.fail("a UDP query sent after SIGTERM was answered: %r" % got[:32])
    except (socket.timeout, ConnectionRefusedError):
        pass
    finally:
        u.close()
    # TCP: refused, or closed without an answer, while dotp is still draining
    verdict = None
    try:
        s = socket.create_connection((d.host, d.port), timeout=0.5)
    except ConnectionRefusedError:
        verdict = "refused"
    else:
        try:
            q = make_a_query("new-tcp.example.test", 4343)
            try:
                s.sendall(struct.pack("!H", len(q)) + q)
            except OSError:
                verdict = "closed"
            if verdict is None:
                try:
                    a = tcp_read_msg(s, time.monotonic() + 0.2)
                    pytest.fail("a TCP query after SIGTERM was answered: %r" % a[:32])
                except ConnectionError:
                    verdict = "closed"
                except socket.timeout:
                    verdict = "hanging"
        finally:
            s.close()
    still_draining = d.proc.poll() is None
    t.join(3)
    _finish(d, 0, watch, 3.0)
    assert verdict in ("refused", "closed"), \
        "new TCP connection after SIGTERM: %s (want refused or closed)" % verdict
    assert still_draining, "dotp no longer draining when the TCP check ran (test too slow?)"
    assert holder, "load thread did not finish"
    holder[0].check(allow_servfail=False, context=_ctx(d, srv))


def test_sigpipe_tcp_clients_hang_up(dotp_factory, faultdot_factory):
    """30 TCP clients send 5 queries each and go away before the answers come
    (half close, full close, RST): dotp writes into dead sockets and must
    survive (no SIGPIPE death), then answer a fresh client."""
    srv = faultdot_factory(["delay:200"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "3000"])
    for k in range(30):
        s = socket.create_connection((d.host, d.port), timeout=2)
        buf = b""
        for j in range(5):
            q = make_a_query("gone%d-%d.example.test" % (k, j), k * 10 + j)
            buf += struct.pack("!H", len(q)) + q
        s.sendall(buf)
        if k % 3 == 0:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif k % 3 == 1:
            s.shutdown(socket.SHUT_RDWR)
        s.close()
    time.sleep(0.6)   # the answers come back and are written to closed sockets
    assert d.proc.poll() is None, "dotp died (status %s)\n%s" % (d.proc.returncode, d.log()[-2000:])
    r = run_load(d.host, d.port, names("alive", 10), 1, 1, timeout=2.0)
    r.check(allow_servfail=False, context=_ctx(d, srv))
    rc = d.stop(signal.SIGTERM)
    assert rc == 0, "exit status %r\n%s" % (rc, d.log()[-2000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_when_idle_exits_promptly(dotp_factory, faultdot_factory, sig):
    """Nothing in flight: the signal ends dotp at once (< 500 ms), status 0,
    with the exit line and its counters."""
    srv = faultdot_factory(["normal"])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    r = run_load(d.host, d.port, names("idle", 10), 1, 1, timeout=2.0)
    r.check(context=_ctx(d, srv))
    watch = ExitWatch(d)
    t = time.monotonic()
    d.send_signal(sig)
    c = _finish(d, 0, watch, 2.0)
    assert watch.t_exit - t < 0.5, "exit %.3f s after the signal" % (watch.t_exit - t)
    assert c is not None, "no exit line\n" + d.log()[-2000:]
    assert c["queries"] == 10 and c["answers"] == 10 and c["servfail"] == 0, c
    assert "stray" in c and "dropped" in c, c
