"""Upstream TLS verification, unreachable/hung upstreams, fail-over,
reconnection, and IPv6."""

import re
import time

import pytest

from harness import (make_query, udp_exchange, tcp_exchange, zero_id, strip_padding, wire_id,
                     rcode, describe)

SERVFAIL = 2


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return r, time.monotonic() - t


def error_lines(log, phrase):
    return [l for l in log.splitlines()
            if phrase.lower() in l.lower() and re.search(r"\blevel=error\b", l)]


# ---------------------------------------------------------------- good certs

@pytest.mark.parametrize("cert", ["good-rsa", "good-ec"])
def test_good_certificates_accepted(dotp_factory, unbound_factory, cert):
    """RSA-2048 leaf under an EC root, and P-256 leaf under an RSA root."""
    u = unbound_factory(cert)
    d = dotp_factory(["127.0.0.1:%d#dot.test" % u.tls_port])
    q = make_query("www.example.test", "AAAA", qid=321)
    a = udp_exchange(d.host, d.port, q, timeout=3)
    assert rcode(a) == 0, describe(a) + "\nstderr:\n" + d.log()
    assert zero_id(strip_padding(a)) == zero_id(strip_padding(u.direct(q, tcp=False)))


# ---------------------------------------------------------------- bad certs

@pytest.mark.parametrize("cert,phrase", [
    ("untrusted", "certificate not trusted"),
    ("self-signed", "certificate not trusted"),
    ("wrong-name", "certificate name mismatch"),
    ("expired", "certificate expired"),
])
def test_bad_certificate_servfail(dotp_factory, unbound_factory, cert, phrase):
    u = unbound_factory(cert)
    d = dotp_factory(["127.0.0.1:%d#dot.test" % u.tls_port],
                     extra=["--timeout", "2000"], probe=False)
    q = make_query("www.example.test", "A", qid=0x0BAD)
    try:
        a, took = timed(udp_exchange, d.host, d.port, q, timeout=3.0)
    except OSError:
        pytest.fail("no answer within 3 s (want SERVFAIL within --timeout 2000 + 1 s)"
                    "\nstderr:\n" + d.log())
    assert wire_id(a) == 0x0BAD
    assert rcode(a) == SERVFAIL, describe(a)
    assert took < 3.0
    log = d.wait_log(phrase)
    assert log is not None, "no %r in dotp's log:\n%s" % (phrase, d.log())
    assert error_lines(log, phrase), "%r not logged at level=error:\n%s" % (phrase, log)
    # TCP clients get SERVFAIL too
    q2 = make_query("www.example.test", "MX", qid=0x0BAE)
    a2 = tcp_exchange(d.host, d.port, q2, timeout=3.0)
    assert wire_id(a2) == 0x0BAE and rcode(a2) == SERVFAIL, describe(a2)


def test_embedded_anchors_do_not_trust_test_ca(dotp_factory, upstream):
    """Without --ca-file the embedded Mozilla set is used: the test root is
    not in it."""
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], ca=False,
                     extra=["--timeout", "2000"], probe=False)
    a = udp_exchange(d.host, d.port, make_query("www.example.test", "A", qid=9), timeout=3)
    assert rcode(a) == SERVFAIL, describe(a)
    assert d.wait_log("certificate not trusted"), d.log()


def test_name_is_checked_against_hash_name(dotp_factory, upstream):
    """#NAME is what the certificate must carry: '#other.test' must fail on
    the dot.test certificate."""
    d = dotp_factory(["127.0.0.1:%d#other.test" % upstream.tls_port],
                     extra=["--timeout", "2000"], probe=False)
    a = udp_exchange(d.host, d.port, make_query("www.example.test", "A", qid=9), timeout=3)
    assert rcode(a) == SERVFAIL, describe(a)
    assert d.wait_log("certificate name mismatch"), d.log()


# ---------------------------------------------------------------- down / hung

@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_upstream_down_servfail(dotp_factory, ports, transport):
    dead = ports.get()  # nothing listens there
    d = dotp_factory(["127.0.0.1:%d#dot.test" % dead], extra=["--timeout", "2000"],
                     probe=False)
    q = make_query("www.example.test", "A", qid=0xDEAD)
    fn = udp_exchange if transport == "udp" else tcp_exchange
    try:
        a, took = timed(fn, d.host, d.port, q, timeout=2.5)
    except OSError:
        pytest.fail("no SERVFAIL within --timeout 2000 + 0.5 s\nstderr:\n" + d.log())
    assert wire_id(a) == 0xDEAD and rcode(a) == SERVFAIL, describe(a)
    assert d.wait_log("connect"), "no log line mentioning connect:\n" + d.log()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_upstream_hung_servfail_at_timeout(dotp_factory, blackhole_factory, ports,
                                           transport):
    """The upstream accepts TCP but never speaks: SERVFAIL after --timeout."""
    port = ports.get()
    blackhole_factory(("127.0.0.1", port))
    d = dotp_factory(["127.0.0.1:%d#dot.test" % port], extra=["--timeout", "1000"],
                     probe=False)
    q = make_query("www.example.test", "A", qid=0x4040)
    fn = udp_exchange if transport == "udp" else tcp_exchange
    try:
        a, took = timed(fn, d.host, d.port, q, timeout=2.0)
    except OSError:
        pytest.fail("no SERVFAIL within --timeout 1000 + 1 s\nstderr:\n" + d.log())
    assert wire_id(a) == 0x4040 and rcode(a) == SERVFAIL, describe(a)


def test_failover_to_second_upstream(dotp_factory, upstream, unbound_factory, ports):
    """First upstream refuses connections, second has a bad certificate,
    third is good: queries are answered (by the third)."""
    bad = unbound_factory("untrusted")
    d = dotp_factory(["127.0.0.1:%d#dot.test" % ports.get(),
                      "127.0.0.1:%d#dot.test" % bad.tls_port,
                      "127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--timeout", "3000"], probe=False)
    for i, (name, typ) in enumerate([("www.example.test", "A"), ("example.test", "MX"),
                                     ("nx.example.test", "A")]):
        q = make_query(name, typ, qid=100 + i)
        a = udp_exchange(d.host, d.port, q, timeout=3.5)
        assert zero_id(strip_padding(a)) == zero_id(strip_padding(upstream.direct(q, tcp=False))), (
            "query %d (%s %s): %s\nstderr:\n%s" % (i, name, typ, describe(a), d.log()))


def test_reconnects_after_upstream_restart(dotp_factory, unbound_factory):
    """The upstream goes away (closing dotp's connection) and comes back on
    the same port: dotp reconnects and answers again."""
    u = unbound_factory("good-ec")
    # --no-cache: the repeat must reach the (restarted) upstream.
    d = dotp_factory(["127.0.0.1:%d#dot.test" % u.tls_port],
                     extra=["--timeout", "2000", "--no-cache"])
    q = make_query("www.example.test", "A", qid=55)
    assert rcode(udp_exchange(d.host, d.port, q, timeout=3)) == 0
    u.stop()
    time.sleep(0.3)
    a = udp_exchange(d.host, d.port, q, timeout=3)
    assert rcode(a) == SERVFAIL, "upstream is down, want SERVFAIL: " + describe(a)
    u2 = unbound_factory("good-rsa", tls_port=u.tls_port)
    # allow for a reconnect back-off: recovery within 5 s
    deadline = time.monotonic() + 5
    while True:
        a = udp_exchange(d.host, d.port, q, timeout=3)
        if rcode(a) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert rcode(a) == 0, "still no answer 5 s after the upstream came back: %s\nstderr:\n%s" % (
        describe(a), d.log())
    assert zero_id(strip_padding(a)) == zero_id(strip_padding(u2.direct(q, tcp=False)))


# ---------------------------------------------------------------- IPv6

def test_ipv6_listen_and_upstream(dotp_factory, upstream, ports):
    port = ports.get()
    d = dotp_factory(["[::1]:%d#dot.test" % upstream.tls_port],
                     listen=["[::1]:%d" % port])
    assert d.host == "::1"
    # (the big TXT over UDP is the business of test_equivalence; here TCP only)
    for i, (name, typ) in enumerate([("www.example.test", "AAAA"), ("example.test", "MX"),
                                     ("nx.example.test", "A"), ("big.example.test", "TXT")]):
        q = make_query(name, typ, qid=600 + i, edns=True)
        want = upstream.direct(q, tcp=True, host="::1")
        for fn in ((tcp_exchange,) if typ == "TXT" else (udp_exchange, tcp_exchange)):
            a = fn("::1", port, q, timeout=3)
            assert wire_id(a) == 600 + i
            assert zero_id(strip_padding(a)) == zero_id(strip_padding(want)), "%s %s via %s: %s" % (
                name, typ, fn.__name__, describe(a))


def test_dual_stack_listen(dotp_factory, upstream, ports):
    p4, p6 = ports.get(), ports.get()
    dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                 listen=["127.0.0.1:%d" % p4, "[::1]:%d" % p6])
    q = make_query("www.example.test", "A", qid=42)
    want = zero_id(strip_padding(upstream.direct(q, tcp=False)))
    for host, port in (("127.0.0.1", p4), ("::1", p6)):
        for fn in (udp_exchange, tcp_exchange):
            a = fn(host, port, q, timeout=3)
            assert zero_id(strip_padding(a)) == want, "%s %s: %s" % (host, fn.__name__, describe(a))


def test_default_listen_addresses(dotp_factory, upstream):
    """No -l: 127.0.0.1:53 and [::1]:53."""
    dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], listen=[],
                 wait_ports=[53])
    q = make_query("www.example.test", "A", qid=53)
    for host in ("127.0.0.1", "::1"):
        for fn in (udp_exchange, tcp_exchange):
            a = fn(host, 53, q, timeout=3)
            assert rcode(a) == 0, "%s %s: %s" % (host, fn.__name__, describe(a))
