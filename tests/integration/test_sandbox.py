"""The seccomp sandbox (issue 15, item 4): a running dotp has NoNewPrivs and
a seccomp filter (Seccomp: 2 in /proc/PID/status) unless --no-sandbox or
DOTP_NO_SANDBOX=1; the start line says which. Every other test of the
suite runs dotp sandboxed and its teardown wants exit status 0 after
SIGTERM, so a call missing from the list fails the test that makes it;
here one dotp goes through every kind of work at once, under --user too.
That a forbidden call kills the process is tests/unit.c's test_sandbox."""

import os
import signal
import socket
import urllib.request

import dns.message
import pytest

from harness import NO_SANDBOX, make_query, tcp_exchange, udp_exchange

pytestmark = pytest.mark.skipif(NO_SANDBOX, reason="DOTP_TEST_NO_SANDBOX=1")


def status(pid):
    st = {}
    for line in open("/proc/%d/status" % pid):
        k, _, v = line.partition(":")
        st[k] = v.strip()
    return st


def test_sandbox_on_by_default(dotp_factory, upstream):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port])
    st = status(d.proc.pid)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    assert "sandbox=seccomp" in d.log()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_sandbox(dotp_factory, upstream, how):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--no-sandbox"] if how == "flag" else [],
                     env={"DOTP_NO_SANDBOX": "1"} if how == "env" else None)
    st = status(d.proc.pid)
    assert st["Seccomp"] == "0", st
    assert "sandbox=off" in d.log()
    r = dns.message.from_wire(udp_exchange(d.host, d.port, make_query("mail.example.test", "A")))
    assert r.answer


def scrape(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
        return r.status, r.read().decode()


def test_everything_at_once_sandboxed(dotp_factory, upstream, ports):
    """UDP and TCP clients, a TLS upstream, a plain forward zone over UDP
    and TCP, the cache, /metrics (its RSS and open
    descriptor figures read from /proc), /ready, a refused TCP client, the
    query log and --user: dotp stays alive with Seccomp 2 and exits 0."""
    mport = ports.get()
    extra = ["--forward", "sub.example.test=dns://127.0.0.1:%d" % upstream.plain_port,
             "--metrics", "127.0.0.1:%d" % mport, "--log-queries",
             "--allow", "127.0.0.1/32"]
    if os.geteuid() == 0:
        extra += ["--user", "65534"]
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], extra=extra)
    st = status(d.proc.pid)
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
    for i in range(3):
        a = dns.message.from_wire(udp_exchange(d.host, d.port, make_query("mail.example.test", "A")))
        assert a.answer
        b = dns.message.from_wire(tcp_exchange(d.host, d.port, make_query("www.example.test", "AAAA")))
        assert b.answer
    # the plain forward zone: NXDOMAIN from unbound's plain port, over
    # UDP and TCP
    for ex in (udp_exchange, tcp_exchange):
        r = dns.message.from_wire(ex(d.host, d.port, make_query("x.sub.example.test", "A")))
        assert r.rcode() == 3, r
    code, body = scrape(mport, "/metrics")
    assert code == 200
    rss = [l for l in body.splitlines() if l.startswith("process_resident_memory_bytes ")]
    fds = [l for l in body.splitlines() if l.startswith("process_open_fds ")]
    assert rss and float(rss[0].split()[1]) > 0, rss
    assert fds and float(fds[0].split()[1]) > 3, fds
    assert scrape(mport, "/ready")[0] == 200
    # a TCP client dotp closes at once (outside --allow is not reachable
    # here, so a connection that sends garbage instead)
    s = socket.create_connection((d.host, d.port), timeout=3)
    s.sendall(b"\x00\x02\xff\xff")
    s.settimeout(3)
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
    assert d.proc.poll() is None, d.log()[-2000:]
    assert status(d.proc.pid)["Seccomp"] == "2"
    assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    assert "dotp exiting" in d.log()
