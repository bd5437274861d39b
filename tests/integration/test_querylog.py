"""--log-queries (issue 14): one logfmt line per answer sent to a client,
with client, transport, name, type, rcode, source, latency and size; off
by default (the names people look up are private); at most 1000 lines a
second. Real unbound over DoT is the upstream (the session `upstream`
fixture serves example.test)."""

import re
import socket
import time

import dns.message
import dns.rcode

from harness import udp_exchange, tcp_exchange

MARK = "qlog-marker-7f3a.example.test"
LINE = re.compile(r'^level=info msg="query" time=(?:\d+\.\d{3}) client=(\S+) transport=(udp|tcp) '
                  r'name="([^"]*)" type=(\d+) rcode=([A-Z]+) from=(\S+) '
                  r'latency_us=(\d+) size=(\d+)$')


def q(name, rtype="A", qid=0x5151):
    m = dns.message.make_query(name, rtype)
    m.id = qid
    return m.to_wire()


def lines(d):
    return [LINE.match(l) for l in d.log().splitlines() if 'msg="query"' in l]


def wait_lines(d, n, timeout=3.0):
    end = time.time() + timeout
    while time.time() < end:
        got = lines(d)
        if len(got) >= n:
            return got
        time.sleep(0.05)
    return lines(d)


def test_off_by_default(dotp_factory, upstream):
    """Without the flag no name ever reaches the log, not even at -v."""
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], extra=["-v"])
    udp_exchange(d.host, d.port, q(MARK))
    tcp_exchange(d.host, d.port, q(MARK, "AAAA"))
    time.sleep(0.2)
    assert "qlog-marker" not in d.log(), d.log()[-2000:]
    assert 'msg="query"' not in d.log()


def test_one_line_per_answer_with_its_fields(dotp_factory, upstream):
    """An upstream answer (UDP), a cache hit (UDP), a TCP answer, an NXDOMAIN
    and dotp's own FORMERR: one line each, fields as documented (names the
    harness's start-up probe did not put in the cache)."""
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--log-queries"])
    base = len(lines(d))        # the harness's readiness probe, if any
    a1 = dns.message.from_wire(udp_exchange(d.host, d.port, q("mail.example.test")))
    a2 = dns.message.from_wire(udp_exchange(d.host, d.port, q("mail.example.test")))
    a3 = dns.message.from_wire(tcp_exchange(d.host, d.port, q("www.example.test", "AAAA")))
    a4 = dns.message.from_wire(udp_exchange(d.host, d.port, q("nope.example.test")))
    bad = b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00"   # two questions, none there
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(bad, (d.host, d.port))
    fe = s.recv(512)
    s.close()
    got = wait_lines(d, base + 5)[base:]
    assert len(got) == 5 and all(got), d.log()[-3000:]
    up = "127.0.0.1:%d" % upstream.tls_port
    first, hit, tcp, nx, err = [m.groups() for m in got]
    assert first[1:6] == ("udp", "mail.example.test.", "1", "NOERROR", up), first
    assert first[0].startswith("127.0.0.1:") and int(first[7]) == len(a1.to_wire())
    assert int(first[6]) > 0
    assert hit[1:6] == ("udp", "mail.example.test.", "1", "NOERROR", "cache"), hit
    assert int(hit[6]) < int(first[6]), (hit, first)
    assert tcp[1:6] == ("tcp", "www.example.test.", "28", "NOERROR", up), tcp
    assert tcp[0].startswith("127.0.0.1:")
    assert nx[4:6] == ("NXDOMAIN", up) and nx[2] == "nope.example.test.", nx
    assert err[4:6] == ("FORMERR", "dotp") and int(err[7]) == len(fe), err
    assert a2.rcode() == dns.rcode.NOERROR and a3.rcode() == dns.rcode.NOERROR
    assert a4.rcode() == dns.rcode.NXDOMAIN


def test_rate_bound(dotp_factory, upstream):
    """3000 cache hits within a second: at most 1000 lines in that second,
    and a warn line counts the ones left out."""
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--log-queries"])
    udp_exchange(d.host, d.port, q("www.example.test"))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    wire = q("www.example.test")
    t0 = time.time()
    sent = 0
    while sent < 3000 and time.time() - t0 < 0.8:
        for _ in range(50):
            s.sendto(wire, (d.host, d.port))
        for _ in range(50):
            s.recv(512)
        sent += 50
    s.close()
    time.sleep(1.2)
    udp_exchange(d.host, d.port, q("www.example.test"))   # a new second: the count is logged
    time.sleep(0.2)
    log = d.log()
    n = log.count('msg="query"')
    left = [int(x) for x in re.findall(r'lines over 1000 a second left out" left_out=(\d+)', log)]
    assert sent >= 1500, "could not send fast enough (%d)" % sent
    assert left and n + sum(left) >= sent, (n, left, sent)
    assert n <= 1000 * 3, n
