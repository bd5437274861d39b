"""File-descriptor exhaustion: dotp's descriptor limit is lowered at run
time (prlimit) and TCP clients use up the rest. New TCP clients must be
accepted and closed at once (not left in the backlog, where they would
wake poll() for ever), an upstream connect that gets EMFILE must wait
rather than retry in a loop, each burst is logged once, and service comes
back when descriptors are free again."""

import os
import socket
import subprocess
import time

from harness import make_query, rcode, udp_exchange, tcp_exchange, zero_id, strip_padding

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def nfds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def set_nofile(pid, n):
    """Sets the soft limit only (raising a lowered hard limit again needs a
    capability the test may not have)."""
    subprocess.run(["prlimit", "--pid", str(pid), "--nofile=%d:" % n], check=True)


def hold_clients(host, port, n):
    """Opens n TCP connections; returns them (some may be shed by dotp)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=2)
        socks.append(s)
    return socks


def closed_by_peer(s, timeout=1.0):
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_emfile_on_accept_sheds_clients_once_and_recovers(dotp_factory, upstream):
    # --no-cache: the answers are compared byte for byte with unbound's,
    # TTLs included; a cached repeat would carry an aged TTL.
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--no-cache"])
    q = make_query("www.example.test", "A", qid=0x7001)
    assert rcode(udp_exchange(d.host, d.port, q, timeout=3)) == 0
    pid = d.proc.pid
    base = nfds(pid)
    set_nofile(pid, base + 5)
    t0 = cpu_seconds(pid)
    socks = hold_clients(d.host, d.port, 40)
    try:
        time.sleep(1.0)
        spent = cpu_seconds(pid) - t0
        shed = [s for s in socks if closed_by_peer(s, timeout=0.2)]
        log = d.log()
        # At most 5 clients fit; the other 35 were taken off the backlog
        # and closed: a clear outcome, not a hang.
        assert len(shed) >= 30, "only %d of 40 clients closed by dotp\n%s" % (len(shed), log)
        assert log.count("out of file descriptors") == 1, log
        assert spent < 0.3, "dotp spun: %.2f s CPU in 1 s of EMFILE" % spent
        # UDP service goes on meanwhile.
        assert rcode(udp_exchange(d.host, d.port, q, timeout=3)) == 0
    finally:
        for s in socks:
            s.close()
    set_nofile(pid, 1024)
    time.sleep(0.2)
    want = upstream.direct(q)
    a = tcp_exchange(d.host, d.port, q, timeout=3)
    assert zero_id(strip_padding(a)) == zero_id(strip_padding(want))
    assert nfds(pid) <= base + 1, "descriptors leaked: %d -> %d" % (base, nfds(pid))


def test_emfile_on_upstream_connect_waits_then_recovers(dotp_factory, upstream):
    # The upstream connection closes when idle, so the next query needs a
    # new socket while none is to be had.
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--idle-timeout", "200", "--timeout", "1000",
                            "--no-cache"])  # repeats must go upstream
    q = make_query("www.example.test", "AAAA", qid=0x7002)
    assert rcode(udp_exchange(d.host, d.port, q, timeout=3)) == 0
    pid = d.proc.pid
    time.sleep(0.5)                         # idle close
    base = nfds(pid)
    set_nofile(pid, base + 3)
    socks = hold_clients(d.host, d.port, 3)  # use up the rest
    try:
        time.sleep(0.2)
        t0 = cpu_seconds(pid)
        started = time.monotonic()
        a = udp_exchange(d.host, d.port, set_q(q, 0x7003), timeout=3)
        took = time.monotonic() - started
        spent = cpu_seconds(pid) - t0
        assert rcode(a) == 2, "no socket for the upstream: SERVFAIL at the deadline"
        assert 0.8 < took < 1.6, "SERVFAIL after %.2f s, want about --timeout 1000" % took
        assert spent < 0.3, "dotp spun: %.2f s CPU while waiting for a descriptor" % spent
        log = d.log()
        assert log.count("no socket for the upstream") == 1, log
    finally:
        for s in socks:
            s.close()
    set_nofile(pid, 1024)
    time.sleep(0.2)
    a = udp_exchange(d.host, d.port, set_q(q, 0x7004), timeout=3)
    assert rcode(a) == 0 and zero_id(strip_padding(a)) == zero_id(strip_padding(upstream.direct(q)))
    # The upstream was never marked down: EMFILE is our problem, not its.
    assert "retry_in_ms" not in d.log(), d.log()


def set_q(wire, qid):
    return bytes([qid >> 8, qid & 0xff]) + wire[2:]
