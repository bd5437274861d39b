"""SPKI pins on DoT servers (issue 15, item 1; the contract is section 1 of
the issue 15 interface spec):

    HOST[:PORT]#NAME@sha256/BASE64[@sha256/BASE64...][@pin-only][@no-name-check]

in -u, DOTP_UPSTREAM, --forward and DOTP_FORWARD.

A pin is base64 (standard alphabet, '=' padded, 44 characters) of SHA-256
of the DER SubjectPublicKeyInfo, computed here with the openssl pipeline
the documentation gives (harness.spki_pin) and cross-checked with Python's
cryptography and with kdig's +tls-pin.

  default mode  chain and name verified as without pins, AND a certificate
                of the VERIFIED path (leaf, intermediate, or the trust
                anchor that verified it, which the server does not send)
                must match a pin; certificates the server appends outside
                that path do not count
  @pin-only     no trust anchor needed, but the LEAF must match; the name
                and the validity dates are still checked
  @no-name-check  (only with @pin-only) no name check; NAME is still SNI
  mismatch      a TLS failure: fail-over or SERVFAIL,
                dotp_upstream_failures_tls_total rises, one line (level=error
                as every "upstream down" line, warn for an extra connection)
                "certificate key matches no pin" pins="..." key=sha256/...
  bad values    exit 2 with one line

The DoT servers are the test unbound (harness.Unbound) presenting a PEM
file of the test PKI (leaf, leaf + intermediate, or with an unrelated
certificate appended: PKI.bundle), and for the SNI check a small Python
TLS server. Every test is bounded (seconds); none sleeps where it can poll.
"""

import base64
import hashlib
import re
import ssl
import struct
import subprocess
import threading
import time
import urllib.request

import dns.message
import pytest

import harness
from harness import (make_query, udp_exchange, tcp_exchange, tcp_read_msg, zero_id,
                     strip_padding, describe, rcode, run_dotp, tcp_listening, spki_pin,
                     SANITIZER_MARKERS)

NOERROR, SERVFAIL = 0, 2
MISMATCH = "certificate key matches no pin"
PIN_RE = re.compile(r"^sha256/[A-Za-z0-9+/]{43}=$")


# ==========================================================================
# helpers
# ==========================================================================

class Pins:
    """pins[name] -> 'sha256/<base64>' of a certificate of the session PKI:
    a server cert name (its leaf), an intermediate (int-rsa, int-ec) or a
    root (ca-ec, ca-rsa, rogue-ca). Computed once, with harness.spki_pin."""

    def __init__(self, pki):
        self.pki = pki
        self.cache = {}

    def path(self, name):
        if name in self.pki.cas:
            return self.pki.cas[name][0]
        if name in self.pki.intermediates:
            return self.pki.intermediates[name][0]
        return self.pki.certs[name][0]     # a chain file starts with the leaf

    def __getitem__(self, name):
        if name not in self.cache:
            self.cache[name] = "sha256/" + spki_pin(self.path(name))
        return self.cache[name]


@pytest.fixture(scope="session")
def pins(pki):
    return Pins(pki)


@pytest.fixture(scope="session")
def extra_certs(pki):
    """Certificates only these tests use (made once per session):
      self-signed-other  other.test, self-signed (RSA)
      appended-int       good-rsa (under the EC root) + int-rsa appended
      appended-root      good-rsa + the RSA root (ca-rsa.pem) appended
      appended-rogue     good-rsa + rogue-ca.pem appended
      untrusted-plus-ca  untrusted (under rogue-ca) + rogue-ca.pem appended
      chain-appended-int   chain-rsa (leaf + int-rsa) + int-ec appended
      chain-appended-root  chain-ec (leaf + int-ec) + the RSA root appended
    """
    if "self-signed-other" not in pki.certs:
        pki.leaf("self-signed-other", "rsa", "other.test", issuer=None)
        pki.bundle("appended-int", "good-rsa", pki.intermediates["int-rsa"][0])
        pki.bundle("appended-root", "good-rsa", pki.cas["ca-rsa"][0])
        pki.bundle("appended-rogue", "good-rsa", pki.cas["rogue-ca"][0])
        pki.bundle("untrusted-plus-ca", "untrusted", pki.cas["rogue-ca"][0])
        pki.bundle("chain-appended-int", "chain-rsa", pki.intermediates["int-ec"][0])
        pki.bundle("chain-appended-root", "chain-ec", pki.cas["ca-rsa"][0])
    return pki


def spec(port, *items, name="dot.test"):
    """'127.0.0.1:PORT#NAME@item@item...'"""
    return "127.0.0.1:%d#%s" % (port, name) + "".join("@" + i for i in items)


def start(dotp_factory, upstreams, extra=(), env=None, probe=False, cache=False,
          timeout=2000, metrics_port=None, ca=True):
    """A dotp with these -u values (--timeout `timeout`, no cache by
    default so every query reaches an upstream). Exit status 2 at start
    (the @ syntax not known, or a value rejected) fails the test saying
    so."""
    ex = ["--timeout", str(timeout)] + list(extra)
    if metrics_port:
        ex += ["--metrics", "127.0.0.1:%d" % metrics_port]
    try:
        d = dotp_factory(list(upstreams), extra=ex, env=env, probe=probe, cache=cache, ca=ca)
    except AssertionError as e:
        if "exited early with status 2" in str(e):
            pytest.fail("dotp rejected its arguments -u %s %s env %s:\n%s" % (
                list(upstreams), ex, env, str(e)[-1500:]), pytrace=False)
        raise
    if metrics_port:
        end = time.monotonic() + 3
        while not tcp_listening(metrics_port):
            assert time.monotonic() < end, "nothing listens on --metrics port %d\n%s" % (
                metrics_port, d.log()[-2000:])
            time.sleep(0.02)
        d.mport = metrics_port
    return d


def ask(d, name="www.example.test", rdtype="A", tcp=False, qid=0x5050, timeout=3.0):
    q = make_query(name, rdtype, qid=qid)
    fn = tcp_exchange if tcp else udp_exchange
    try:
        return fn(d.host, d.port, q, timeout=timeout)
    except OSError as e:
        pytest.fail("no answer to %s %s over %s within %ss (%s)\n--- dotp stderr:\n%s" % (
            name, rdtype, "TCP" if tcp else "UDP", timeout, e, d.log()[-3000:]),
            pytrace=False)


def assert_answers(d, srv, what=""):
    """Through d, a UDP and a TCP query get what srv says directly."""
    for i, (name, typ, tcp) in enumerate([("www.example.test", "A", False),
                                          ("example.test", "MX", True)]):
        q = make_query(name, typ, qid=0x700 + i)
        a = ask(d, name, typ, tcp=tcp, qid=0x700 + i)
        want = srv.direct(q, tcp=tcp)
        assert zero_id(strip_padding(a)) == zero_id(strip_padding(want)), (
            "%s: %s %s over %s through dotp:\n%s\nwant what the server says:\n%s"
            "\n--- dotp stderr:\n%s" % (what, name, typ, "TCP" if tcp else "UDP",
                                        describe(a), describe(want), d.log()[-3000:]))


def assert_servfail(d, what="", tcp=False, qid=0x0BAD):
    a = ask(d, "www.example.test", "A", tcp=tcp, qid=qid)
    assert rcode(a) == SERVFAIL, "%s: want SERVFAIL, got:\n%s\n--- dotp stderr:\n%s" % (
        what, describe(a), d.log()[-3000:])


def mismatch_lines(d):
    return [l for l in d.log().splitlines() if MISMATCH in l]


def wait_mismatch(d, n=1, timeout=2.0):
    """The mismatch lines once there are at least n (polls the log)."""
    end = time.monotonic() + timeout
    while True:
        lines = mismatch_lines(d)
        if len(lines) >= n or time.monotonic() > end:
            return lines
        time.sleep(0.02)


def parse_mismatch(line):
    """(pins list, key) of a mismatch line; asserts the fields' form (its
    level is checked in test_mismatch_servfail_log_and_counter only)."""
    m = re.search(r'\bpins="([^"]*)"', line)
    assert m, 'mismatch line without pins="...": ' + line
    k = re.search(r'\bkey=(sha256/[A-Za-z0-9+/]{43}=)(?=\s|$)', line)
    assert k, "mismatch line without key=sha256/<44 characters>: " + line
    return m.group(1).split(","), k.group(1)


def metric(d, name, upstream):
    """The value of the one sample `name` with label upstream="<upstream>"
    (other labels, e.g. zone and transport, whatever they are) in d's
    /metrics."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % d.mport, timeout=3) as r:
        body = r.read().decode()
    got = []
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if m and m.group(1) == name and \
                re.search(r'(?:^|,)\s*upstream="%s"' % re.escape(upstream), m.group(2) or ""):
            got.append(float(m.group(3)))
    assert len(got) == 1, "want one sample %s{upstream=%r} in /metrics, found %d:\n%s" % (
        name, upstream, len(got), "\n".join(l for l in body.splitlines() if name in l))
    return got[0]


def presented_certs(port, name="dot.test"):
    """The subjects (CN) of the certificates the server on port presents,
    in order (openssl s_client -showcerts)."""
    p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
                        "-servername", name, "-showcerts"], input="",
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=10)
    return re.findall(r"(?m)^ *\d+ s:.*?CN ?= ?([^,\n]+)", p.stdout), p.stdout


def kdig_pin(port, pin_b64, name="www.example.test"):
    """kdig over TLS to 127.0.0.1:port with +tls-pin=pin_b64:
    (exit status, output)."""
    p = subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), "+tls-pin=" + pin_b64,
                        "+timeout=3", "+retry=0", name, "A"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=15)
    return p.returncode, p.stdout


# ==========================================================================
# 0. the harness: pins, and servers presenting what we think they do
# ==========================================================================

@pytest.mark.parametrize("name", ["good-rsa", "good-ec", "chain-rsa", "int-ec", "ca-rsa"])
def test_pin_pipeline_matches_python(pins, name):
    """harness.spki_pin (the documented openssl pipeline) equals base64 of
    SHA-256 of the SPKI DER as Python's cryptography encodes it; for a
    chain file, of its first certificate (the leaf)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import serialization
    pem = pins.path(name).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)      # the first one in the file
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    want = "sha256/" + base64.b64encode(hashlib.sha256(der).digest()).decode()
    assert pins[name] == want
    assert PIN_RE.match(pins[name]), pins[name]


def test_pins_all_differ(pins):
    names = ["good-rsa", "good-ec", "chain-rsa", "chain-ec", "self-signed", "wrong-name",
             "expired", "untrusted", "int-rsa", "int-ec", "ca-ec", "ca-rsa", "rogue-ca"]
    got = {n: pins[n] for n in names}
    assert len(set(got.values())) == len(names), got


@pytest.mark.parametrize("cert,want", [
    ("good-rsa", ["dot.test"]),
    ("chain-rsa", ["dot.test", "dotp test intermediate RSA"]),
    ("appended-int", ["dot.test", "dotp test intermediate RSA"]),
    ("appended-root", ["dot.test", "dotp test root RSA"]),
    ("untrusted-plus-ca", ["dot.test", "dotp rogue root"]),
    ("chain-appended-int", ["dot.test", "dotp test intermediate RSA",
                            "dotp test intermediate EC"]),
    ("chain-appended-root", ["dot.test", "dotp test intermediate EC", "dotp test root RSA"]),
])
def test_servers_present_what_the_tests_assume(extra_certs, unbound_factory, cert, want):
    """The premises: chain servers send leaf + intermediate but not the
    root; the 'appended' servers send a certificate outside the path."""
    u = unbound_factory(cert)
    got, out = presented_certs(u.tls_port)
    assert got == want, "server with %s presents %s, want %s\n%s" % (cert, got, want, out)


@pytest.mark.parametrize("cert", ["good-rsa", "good-ec", "chain-ec", "self-signed"])
def test_kdig_accepts_the_same_pin(pins, unbound_factory, cert):
    """The documented spelling is kdig's: kdig +tls-pin=<the base64 part of
    our pin> answers NOERROR from the server, and fails with another
    certificate's pin (so kdig really checked it)."""
    u = unbound_factory(cert)
    b64 = pins[cert][len("sha256/"):]
    rc, out = kdig_pin(u.tls_port, b64)
    assert rc == 0 and "NOERROR" in out, "kdig +tls-pin=%s (exit %d):\n%s" % (b64, rc, out)
    other = pins["ca-ec"][len("sha256/"):]
    rc2, out2 = kdig_pin(u.tls_port, other)
    assert rc2 != 0 or "NOERROR" not in out2, \
        "kdig accepted a wrong pin, the check proves nothing:\n" + out2


def test_reissue_gives_new_key_same_name_and_issuer(pki, pins, unbound_factory):
    new = pki.reissue("chain-rsa")
    assert pins[new] != pins["chain-rsa"]
    u = unbound_factory(new)
    got, out = presented_certs(u.tls_port)
    assert got == ["dot.test", "dotp test intermediate RSA"], out
    rc, _ = kdig_pin(u.tls_port, pins[new][7:])
    assert rc == 0


# ==========================================================================
# 1. leaf pins
# ==========================================================================

@pytest.mark.parametrize("cert", ["good-rsa", "good-ec"])
def test_leaf_pin_accepted(dotp_factory, unbound_factory, pins, cert):
    """RSA leaf (EC root) and P-256 leaf (RSA root): the leaf's pin answers
    over UDP and TCP as the server does."""
    u = unbound_factory(cert)
    d = start(dotp_factory, [spec(u.tls_port, pins[cert])])
    assert_answers(d, u, "leaf pin of %s" % cert)
    assert not mismatch_lines(d), d.log()


def test_eight_pins_last_matches(dotp_factory, unbound_factory, pins):
    """8 pins (the maximum), only the 8th matches: accepted."""
    u = unbound_factory("good-ec")
    wrong = [pins[n] for n in ("good-rsa", "chain-rsa", "chain-ec", "int-rsa", "int-ec",
                               "ca-ec", "rogue-ca")]
    d = start(dotp_factory, [spec(u.tls_port, *(wrong + [pins["good-ec"]]))])
    assert_answers(d, u, "8th of 8 pins")


def test_leaf_pin_over_ipv6(dotp_factory, upstream, pins, ports):
    """[::1]:PORT#dot.test@pin: the session upstream over IPv6."""
    port = ports.get()
    d = dotp_factory(["[::1]:%d#dot.test@%s" % (upstream.tls_port, pins["good-rsa"])],
                     listen=["127.0.0.1:%d" % port], extra=["--no-cache"])
    assert_answers(d, upstream, "IPv6 upstream with a leaf pin")


def test_pin_holds_across_resumed_sessions(dotp_factory, unbound_factory, pins, ports):
    """A pinned upstream whose connections dotp closes when idle (300 ms):
    the next connections resume the TLS session (no certificate is sent
    then) and still answer; the counters say so."""
    u = unbound_factory("chain-ec")
    d = start(dotp_factory, [spec(u.tls_port, pins["int-ec"])],
              extra=["--idle-timeout", "300"], metrics_port=ports.get())
    label = "127.0.0.1:%d" % u.tls_port
    for i in range(3):
        assert_answers(d, u, "round %d" % i)
        end = time.monotonic() + 3       # poll until dotp has closed it idle
        while metric(d, "dotp_upstream_connections", label) != 0:
            assert time.monotonic() < end, "connection not closed 3 s after --idle-timeout 300"
            time.sleep(0.05)
    full = metric(d, "dotp_upstream_handshakes_full_total", label)
    resumed = metric(d, "dotp_upstream_handshakes_resumed_total", label)
    assert full >= 1 and resumed >= 1 and full + resumed == 3, (full, resumed, d.log())
    assert not mismatch_lines(d), d.log()


def test_healthcheck_parses_pins(dotp_factory, unbound_factory, pins, ports):
    """`dotp healthcheck` with the daemon's own arguments (pins included)
    exits 0: the same parser accepts them there."""
    u = unbound_factory("good-ec")
    d = start(dotp_factory, [spec(u.tls_port, pins["ca-rsa"])], metrics_port=ports.get())
    assert_answers(d, u)
    p = run_dotp(["healthcheck"] + d.args[1:], timeout=8)
    assert p.returncode == 0, "dotp healthcheck %s: exit %s\n%s%s" % (
        d.args[1:], p.returncode, p.stdout, p.stderr)


# ==========================================================================
# 2. CA pins
# ==========================================================================

@pytest.mark.parametrize("cert,ca", [
    ("chain-rsa", "int-rsa"), ("chain-ec", "int-ec"),           # intermediate
    ("chain-rsa", "ca-rsa"), ("chain-ec", "ca-ec"),             # root above an intermediate
    ("good-ec", "ca-rsa"), ("good-rsa", "ca-ec"),               # root right above the leaf
])
def test_ca_pin_accepted(dotp_factory, unbound_factory, pins, cert, ca):
    """A pin of a CA of the verified path works, the root included although
    the server never sends it (see test_servers_present_what_the_tests_assume)."""
    u = unbound_factory(cert)
    d = start(dotp_factory, [spec(u.tls_port, pins[ca])])
    assert_answers(d, u, "%s pinned by %s" % (cert, ca))


@pytest.mark.parametrize("cert,other", [
    ("chain-rsa", "ca-ec"),      # the other trusted root
    ("chain-rsa", "int-ec"),     # the other chain's intermediate
    ("good-rsa", "ca-rsa"),      # trusted root that did not verify this leaf
])
def test_ca_pin_outside_path_refused(dotp_factory, unbound_factory, pins, cert, other):
    """A trust anchor (or intermediate) that is not on this server's
    verified path does not satisfy the pin: a pin check over every anchor
    in --ca-file would wrongly accept."""
    u = unbound_factory(cert)
    d = start(dotp_factory, [spec(u.tls_port, pins[other])])
    assert_servfail(d, "%s pinned by %s (not on its path)" % (cert, other))
    lines = wait_mismatch(d)
    assert lines, "no %r line:\n%s" % (MISMATCH, d.log())
    assert parse_mismatch(lines[0]) == ([pins[other]], pins[cert]), lines[0]


def test_ca_pin_survives_leaf_rekey(dotp_factory, unbound_factory, pki, pins):
    """The server's leaf is re-issued with a NEW key (same name, same
    intermediate) and the server restarted on the same port: the dotps
    pinning the intermediate and the root answer again, the one pinning the
    old leaf gets SERVFAIL and logs the new key."""
    u = unbound_factory("chain-rsa")
    port = u.tls_port
    by_int = start(dotp_factory, [spec(port, pins["int-rsa"])])
    by_root = start(dotp_factory, [spec(port, pins["ca-rsa"])])
    by_leaf = start(dotp_factory, [spec(port, pins["chain-rsa"])])
    for d, what in ((by_int, "int pin"), (by_root, "root pin"), (by_leaf, "leaf pin")):
        assert_answers(d, u, what + ", before the re-key")

    new = pki.reissue("chain-rsa")
    assert pins[new] != pins["chain-rsa"]
    u.stop()
    u2 = unbound_factory(new, tls_port=port)
    for d, what in ((by_int, "int pin"), (by_root, "root pin")):
        # the first query may meet the connection the old server closed
        end = time.monotonic() + 5
        while True:
            a = ask(d, qid=0x0100)
            if rcode(a) == NOERROR or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert rcode(a) == NOERROR, "%s after the re-key: %s\n%s" % (what, describe(a),
                                                                      d.log()[-3000:])
        assert_answers(d, u2, what + ", after the re-key")
    # the old leaf's pin: never an answer again; ask until a handshake with
    # the new server has been refused on the pin (the first query may only
    # meet the connection the old server closed, or a back-off)
    assert not mismatch_lines(by_leaf), by_leaf.log()
    end = time.monotonic() + 5
    while True:
        assert_servfail(by_leaf, "old leaf pin after the re-key")
        lines = wait_mismatch(by_leaf, 1, timeout=0.3)
        if lines or time.monotonic() > end:
            break
    assert lines, "no %r line within 5 s of the re-key:\n%s" % (MISMATCH, by_leaf.log())
    assert all(parse_mismatch(l) == ([pins["chain-rsa"]], pins[new]) for l in lines), lines
    # a fresh dotp with the old leaf pin is refused too (no state carried over)
    fresh = start(dotp_factory, [spec(port, pins["chain-rsa"])])
    assert_servfail(fresh, "fresh dotp, old leaf pin")


# ==========================================================================
# 3. mismatch: SERVFAIL, the log line, the counter, fail-over
# ==========================================================================

def test_mismatch_servfail_log_and_counter(dotp_factory, unbound_factory, pins, ports):
    """chain-rsa pinned by two certificates not on its path: SERVFAIL (UDP
    and TCP); after the first query one warn line with pins="<both, in
    order>" and key=<the LEAF's pin, not the intermediate's>, and
    dotp_upstream_failures_tls_total up by one."""
    u = unbound_factory("chain-rsa")
    wrong = [pins["int-ec"], pins["ca-ec"]]
    d = start(dotp_factory, [spec(u.tls_port, *wrong)], metrics_port=ports.get())
    label = "127.0.0.1:%d" % u.tls_port
    f0 = metric(d, "dotp_upstream_failures_tls_total", label)
    assert_servfail(d, "mismatch, UDP")
    lines = wait_mismatch(d)
    assert len(lines) == 1, "want one %r line after one query, got %d:\n%s" % (
        MISMATCH, len(lines), d.log())
    assert parse_mismatch(lines[0]) == (wrong, pins["chain-rsa"]), lines[0]
    assert re.search(r"\blevel=error\b", lines[0]) and "upstream down" in lines[0], \
        "mismatch line not an upstream-down line at level=error: " + lines[0]
    f1 = metric(d, "dotp_upstream_failures_tls_total", label)
    assert f1 - f0 == len(lines), "failures_tls rose by %s, mismatch lines: %d\n%s" % (
        f1 - f0, len(lines), d.log())
    # TCP client too (the upstream is marked down now: SERVFAIL either way;
    # a retry that fails again is counted, but dotp logs only the change
    # to down, so lines <= failures)
    assert_servfail(d, "mismatch, TCP", tcp=True, qid=0x0BAE)
    f2 = metric(d, "dotp_upstream_failures_tls_total", label)
    assert f2 >= f1 and 1 <= len(mismatch_lines(d)) <= f2 - f0, (f0, f1, f2, d.log())
    # never a success counted
    assert metric(d, "dotp_upstream_answered_total", label) == 0


def test_mismatch_line_lists_all_eight_pins(dotp_factory, unbound_factory, pins):
    """With the most pins (8, none matching) the line still carries every
    pin, in order, and the leaf's key whole: nothing cut off."""
    u = unbound_factory("good-rsa")
    wrong = [pins[n] for n in ("good-ec", "chain-rsa", "chain-ec", "int-rsa", "int-ec",
                               "ca-rsa", "rogue-ca", "self-signed")]
    d = start(dotp_factory, [spec(u.tls_port, *wrong)])
    assert_servfail(d, "8 wrong pins")
    lines = wait_mismatch(d)
    assert lines, d.log()
    assert parse_mismatch(lines[0]) == (wrong, pins["good-rsa"]), lines[0]


def test_mismatch_fails_over_to_next_upstream(dotp_factory, unbound_factory, pins, ports):
    """Two upstreams: the first's pin does not match, the second's does.
    Every query is answered NOERROR, all by the second (answered_total),
    none by the first, whose failures_tls_total rises."""
    first = unbound_factory("good-rsa")
    second = unbound_factory("good-ec")
    d = start(dotp_factory, [spec(first.tls_port, pins["good-ec"]),
                             spec(second.tls_port, pins["good-ec"])],
              metrics_port=ports.get(), timeout=3000)
    l1, l2 = "127.0.0.1:%d" % first.tls_port, "127.0.0.1:%d" % second.tls_port
    n = 5
    for i in range(n):
        q = make_query("www.example.test", "A", qid=0x900 + i)
        a = ask(d, qid=0x900 + i)
        assert zero_id(strip_padding(a)) == zero_id(strip_padding(second.direct(q, tcp=False))), \
            "query %d: %s\n%s" % (i, describe(a), d.log()[-3000:])
    got = (metric(d, "dotp_upstream_answered_total", l1),
           metric(d, "dotp_upstream_answered_total", l2),
           metric(d, "dotp_upstream_failures_tls_total", l1) >= 1,
           metric(d, "dotp_upstream_failures_tls_total", l2))
    assert got == (0, n, True, 0), \
        "(first answered, second answered, first failures_tls >= 1, second failures_tls) " \
        "= %s, want (0, %d, True, 0)\n%s" % (got, n, d.log()[-3000:])
    lines = mismatch_lines(d)
    assert lines and all(parse_mismatch(l) == ([pins["good-ec"]], pins["good-rsa"])
                         for l in lines), lines


# ==========================================================================
# 4. appended certificates outside the verified path do not count
# ==========================================================================

@pytest.mark.parametrize("cert,pinned,leaf", [
    ("appended-int", "int-rsa", "good-rsa"),    # a trusted intermediate of the other root
    ("appended-root", "ca-rsa", "good-rsa"),    # a trusted root that did not verify the leaf
    ("appended-rogue", "rogue-ca", "good-rsa"),  # an untrusted CA
    ("chain-appended-int", "int-ec", "chain-rsa"),     # after a real intermediate
    ("chain-appended-root", "ca-rsa", "chain-ec"),
])
def test_appended_certificate_does_not_count(extra_certs, dotp_factory, unbound_factory,
                                             pins, cert, pinned, leaf):
    """The server's chain (good-rsa -> EC root, or leaf -> intermediate ->
    root) verifies; it appends a CA certificate that is not on that path,
    and that CA's key is the only pin: refused. Anyone can append a public
    certificate, so counting it would defeat the pin. The same server with
    its leaf pinned answers (the refusal is the pin's doing)."""
    u = unbound_factory(cert)
    bad = start(dotp_factory, [spec(u.tls_port, pins[pinned])])
    assert_servfail(bad, "%s with only %s pinned" % (cert, pinned))
    lines = wait_mismatch(bad)
    assert lines, "no %r line:\n%s" % (MISMATCH, bad.log())
    assert parse_mismatch(lines[0]) == ([pins[pinned]], pins[leaf]), lines[0]
    good = start(dotp_factory, [spec(u.tls_port, pins[leaf])])
    assert_answers(good, u, "%s with its leaf pinned" % cert)


@pytest.mark.parametrize("cert,pinned", [
    ("chain-rsa", "int-rsa"),             # the server's own intermediate
    ("untrusted-plus-ca", "rogue-ca"),    # the CA that signed the leaf, sent along
])
def test_pin_only_counts_the_leaf_only(extra_certs, dotp_factory, unbound_factory, pins,
                                       cert, pinned):
    """@pin-only: only the LEAF's key counts; a pinned CA sent along (even
    the leaf's real issuer) does not. The leaf's pin answers."""
    u = unbound_factory(cert)
    bad = start(dotp_factory, [spec(u.tls_port, "pin-only", pins[pinned])])
    assert_servfail(bad, "%s, @pin-only with the CA %s pinned" % (cert, pinned))
    assert wait_mismatch(bad), bad.log()
    leaf = "untrusted" if cert == "untrusted-plus-ca" else cert
    good = start(dotp_factory, [spec(u.tls_port, "pin-only", pins[leaf])])
    assert_answers(good, u, "%s, @pin-only with its leaf pinned" % cert)


# ==========================================================================
# 5. @pin-only and @no-name-check
# ==========================================================================

def test_pin_only_self_signed(dotp_factory, unbound_factory, pins):
    """A self-signed dot.test certificate (not under --ca-file): @pin-only
    with its pin answers, wherever the keyword stands; the plain pin (default
    mode) is not trusted; @pin-only with another key's pin is refused."""
    u = unbound_factory("self-signed")
    p = pins["self-signed"]
    for items in (("pin-only", p), (p, "pin-only"), (pins["good-rsa"], "pin-only", p)):
        d = start(dotp_factory, [spec(u.tls_port, *items)])
        assert_answers(d, u, "@" + "@".join(items))
    plain = start(dotp_factory, [spec(u.tls_port, p)])
    assert_servfail(plain, "self-signed, its pin without @pin-only")
    assert plain.wait_log("certificate not trusted"), plain.log()
    assert not mismatch_lines(plain), "not trusted, yet blamed on the pin:\n" + plain.log()
    wrong = start(dotp_factory, [spec(u.tls_port, "pin-only", pins["good-rsa"])])
    assert_servfail(wrong, "self-signed, @pin-only with a wrong pin")
    lines = wait_mismatch(wrong)
    assert lines and parse_mismatch(lines[0]) == ([pins["good-rsa"]], p), wrong.log()


def test_pin_only_needs_no_ca_file(dotp_factory, unbound_factory, pins):
    """@pin-only with the embedded anchors only (no --ca-file): the
    self-signed server answers; its pin in default mode does not."""
    u = unbound_factory("self-signed")
    d = start(dotp_factory, [spec(u.tls_port, "pin-only", pins["self-signed"])], ca=False)
    assert_answers(d, u, "@pin-only, no --ca-file")
    d2 = start(dotp_factory, [spec(u.tls_port, pins["self-signed"])], ca=False)
    assert_servfail(d2, "default mode, no --ca-file")


@pytest.mark.parametrize("cert", ["wrong-name", "self-signed-other"])
def test_pin_only_checks_name_unless_no_name_check(extra_certs, dotp_factory,
                                                   unbound_factory, pins, cert):
    """An other.test certificate (CA-signed, or self-signed) with its pin:
    #dot.test@pin-only is refused (name mismatch); #other.test@pin-only
    answers; #dot.test@pin-only@no-name-check answers."""
    u = unbound_factory(cert)
    p = pins[cert]
    bad = start(dotp_factory, [spec(u.tls_port, "pin-only", p)])
    assert_servfail(bad, "%s as dot.test, @pin-only" % cert)
    assert bad.wait_log("certificate name mismatch"), bad.log()
    right = start(dotp_factory, [spec(u.tls_port, "pin-only", p, name="other.test")])
    assert_answers(right, u, "%s as other.test, @pin-only" % cert)
    for items in (("pin-only", p, "no-name-check"), ("no-name-check", "pin-only", p)):
        d = start(dotp_factory, [spec(u.tls_port, *items)])
        assert_answers(d, u, "%s as dot.test, @%s" % (cert, "@".join(items)))


def test_pin_only_still_checks_dates(dotp_factory, unbound_factory, pins):
    """@pin-only with the expired certificate's own pin: refused, expired."""
    u = unbound_factory("expired")
    d = start(dotp_factory, [spec(u.tls_port, "pin-only", pins["expired"])])
    assert_servfail(d, "expired, @pin-only with its pin")
    assert d.wait_log("certificate expired"), d.log()
    d2 = start(dotp_factory, [spec(u.tls_port, "pin-only", "no-name-check", pins["expired"])])
    assert_servfail(d2, "expired, @pin-only@no-name-check with its pin")


@pytest.mark.parametrize("cert,pinned,phrase", [
    ("untrusted", "untrusted", "certificate not trusted"),
    ("wrong-name", "wrong-name", "certificate name mismatch"),
    ("expired", "expired", "certificate expired"),
])
def test_default_mode_still_verifies(dotp_factory, unbound_factory, pins, cert, pinned,
                                     phrase):
    """Without @pin-only a matching pin does not excuse an untrusted chain,
    a wrong name or an expired certificate."""
    u = unbound_factory(cert)
    d = start(dotp_factory, [spec(u.tls_port, pins[pinned])])
    assert_servfail(d, "%s with its own pin, default mode" % cert)
    assert d.wait_log(phrase), "no %r in the log:\n%s" % (phrase, d.log())


class SniDot(harness._TcpServer):
    """A TLS 1.2/1.3 DoT server (Python ssl) presenting cert/key that
    records the SNI of each handshake (self.snis) and answers every query
    with an empty NOERROR."""

    def __init__(self, listen, cert, key):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.snis = []
        self.ctx.sni_callback = lambda sock, name, ctx: self.snis.append(name)
        super().__init__(listen)

    def _accepted(self, c):
        self.socks.append(c)
        threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(5)
            t = self.ctx.wrap_socket(c, server_side=True)
        except (OSError, ssl.SSLError):
            c.close()
            return
        self.socks.append(t)
        try:
            deadline = time.monotonic() + 5
            while True:
                q = tcp_read_msg(t, deadline)
                a = dns.message.make_response(dns.message.from_wire(q)).to_wire()
                t.sendall(struct.pack("!H", len(a)) + a)
        except Exception:
            pass
        finally:
            t.close()


def test_no_name_check_still_sends_sni(extra_certs, dotp_factory, pki, pins, ports):
    """@no-name-check drops the check, not the SNI: the server is asked for
    NAME (dot.test) although its certificate says other.test."""
    cert, key = pki.certs["self-signed-other"]
    port = ports.get()
    srv = SniDot(("127.0.0.1", port), cert, key)
    try:
        d = start(dotp_factory, [spec(port, "pin-only", "no-name-check",
                                      pins["self-signed-other"])])
        a = ask(d, qid=0x5111)
        assert rcode(a) == NOERROR, describe(a) + "\n" + d.log()[-3000:]
        assert srv.snis and set(srv.snis) == {"dot.test"}, srv.snis
    finally:
        srv.close()


# ==========================================================================
# 6. pins through DOTP_UPSTREAM, --forward and DOTP_FORWARD
# ==========================================================================

def test_pins_in_dotp_upstream(dotp_factory, unbound_factory, pins):
    """DOTP_UPSTREAM: a CA pin answers, a wrong pin SERVFAILs, @pin-only
    against a self-signed server answers; a wrong first and a right second
    server in one value (space separated) fail over."""
    u = unbound_factory("chain-ec")
    s = unbound_factory("self-signed")
    d = start(dotp_factory, [], env={"DOTP_UPSTREAM": spec(u.tls_port, pins["int-ec"])})
    assert_answers(d, u, "DOTP_UPSTREAM, int pin")
    d2 = start(dotp_factory, [], env={"DOTP_UPSTREAM": spec(u.tls_port, pins["int-rsa"])})
    assert_servfail(d2, "DOTP_UPSTREAM, wrong pin")
    assert wait_mismatch(d2), d2.log()
    d3 = start(dotp_factory, [], env={
        "DOTP_UPSTREAM": spec(s.tls_port, "pin-only", pins["self-signed"])})
    assert_answers(d3, s, "DOTP_UPSTREAM, @pin-only")
    d4 = start(dotp_factory, [], env={"DOTP_UPSTREAM": "%s  %s" % (
        spec(u.tls_port, pins["int-rsa"]), spec(s.tls_port, "pin-only", pins["self-signed"]))})
    assert_answers(d4, s, "DOTP_UPSTREAM, wrong then pin-only")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_pins_in_forward_zone(dotp_factory, unbound_factory, pins, ports, how):
    """A DoT forward zone example.test with pins (the default -u is a dead
    port): a right pin answers, a wrong one SERVFAILs, @pin-only works, and
    'WRONG,RIGHT' in one entry fails over to the right one."""
    u = unbound_factory("chain-rsa")
    s = unbound_factory("self-signed")
    dead = "127.0.0.1:%d#dot.test" % ports.get()

    def run(value):
        entry = "example.test=" + value
        if how == "flag":
            return start(dotp_factory, [dead], extra=["--forward", entry])
        return start(dotp_factory, [dead], env={"DOTP_FORWARD": entry})

    assert_answers(run(spec(u.tls_port, pins["ca-rsa"])), u, "forward, root pin")
    bad = run(spec(u.tls_port, pins["ca-ec"]))
    assert_servfail(bad, "forward, wrong pin")
    assert wait_mismatch(bad), bad.log()
    assert_answers(run(spec(s.tls_port, "pin-only", pins["self-signed"])), s,
                   "forward, @pin-only")
    both = run("%s,%s" % (spec(u.tls_port, pins["ca-ec"]),
                          spec(s.tls_port, "pin-only", pins["self-signed"])))
    assert_answers(both, s, "forward, wrong pin then pin-only")


# ==========================================================================
# 7. bad values: exit 2, one line
# ==========================================================================

def b64(n, byte=0x5A):
    return base64.b64encode(bytes([byte]) * n).decode()


GOOD = "sha256/" + b64(32)                       # well formed, matches nothing
URLSAFE = "sha256/" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()
assert "-" in URLSAFE or "_" in URLSAFE
BASE = "127.0.0.1:853#dot.test"

# (id, -u value, the bad item the line may name instead of the whole value)
BAD_PINS = [
    ("bad base64 char", BASE + "@sha256/" + "!" * 43 + "=", "!" * 43),
    ("bad base64 url-safe", BASE + "@" + URLSAFE, URLSAFE),
    ("base64 unpadded 43", BASE + "@" + GOOD[:-1], GOOD[:-1]),
    ("31 bytes", BASE + "@sha256/" + b64(31), b64(31)),
    ("33 bytes", BASE + "@sha256/" + b64(33), b64(33)),
    ("48 bytes", BASE + "@sha256/" + b64(48), b64(48)),
    ("empty pin", BASE + "@sha256/", "sha256/"),
    ("prefix sha1", BASE + "@sha1/" + b64(20), "sha1/"),
    ("prefix sha384", BASE + "@sha384/" + b64(48), "sha384/"),
    ("no prefix", BASE + "@" + b64(32), b64(32)),
    ("unknown keyword", BASE + "@" + GOOD + "@pinonly", "pinonly"),
    ("unknown keyword 2", BASE + "@pin-only@" + GOOD + "@no-name-checks", "no-name-checks"),
    ("no-name-check without pin-only", BASE + "@" + GOOD + "@no-name-check", "no-name-check"),
    ("pin-only without pin", BASE + "@pin-only", "pin-only"),
    ("pin-only no-name-check without pin", BASE + "@pin-only@no-name-check", "pin-only"),
    ("9 pins", BASE + "".join("@sha256/" + b64(32, i) for i in range(9)), BASE),
    ("empty item last", BASE + "@" + GOOD + "@", BASE),
    ("empty item middle", BASE + "@@" + GOOD, BASE),
    ("empty item alone", BASE + "@", BASE),
    ("pin without #NAME", "127.0.0.1:853@" + GOOD, "127.0.0.1:853"),
]


def one_error_line(p, value, item, about_pins=True):
    """Exit 2, one level=error line naming the value (or the bad item);
    with about_pins, the reason given after the value speaks of pins or @
    (a parser that does not know pins fails on the name instead)."""
    found = [m for m in SANITIZER_MARKERS if m in p.stderr]
    assert not found, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, "exit status %s (want 2)\nstderr:\n%s" % (p.returncode, p.stderr)
    assert len(lines) == 1, "want ONE line on stderr, got %d:\n%s" % (len(lines), p.stderr)
    line = lines[0]
    assert "level=error" in line, line
    assert value in line or item in line, (
        "the line names neither the value %r nor the bad item %r:\n%s" % (value, item, line))
    if about_pins:
        reason = line.split(value, 1)[1] if value in line else line.split(item, 1)[1]
        assert re.search(r"pin|@", reason), \
            "the reason given is not about the @ part (pins, keywords): " + line
    return line


@pytest.mark.parametrize("case,value,item", BAD_PINS, ids=[c for c, _, _ in BAD_PINS])
def test_bad_pin_flag(pki, ports, case, value, item):
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", value,
                  "--ca-file", str(pki.ca_pem)], timeout=5)
    one_error_line(p, value, item, about_pins=case != "pin without #NAME")


@pytest.mark.parametrize("case,value,item", BAD_PINS, ids=[c for c, _, _ in BAD_PINS])
def test_bad_pin_env(pki, ports, case, value, item):
    p = run_dotp([], env={"DOTP_LISTEN": "127.0.0.1:%d" % ports.get(),
                          "DOTP_UPSTREAM": value, "DOTP_CA_FILE": str(pki.ca_pem)},
                 timeout=5)
    one_error_line(p, value, item, about_pins=case != "pin without #NAME")


BAD_FORWARD = [
    ("pin on dns://", "a.test=dns://127.0.0.1@" + GOOD, "dns://127.0.0.1@" + GOOD),
    ("pin on dns:// with port", "a.test=dns://127.0.0.1:53@" + GOOD, "dns://127.0.0.1:53@"),
    ("pin-only on dns://", "a.test=dns://127.0.0.1@pin-only@" + GOOD, "dns://127.0.0.1@"),
    ("bad pin in second DoT server", "a.test=%s@%s,%s@sha256/%s" % (BASE, GOOD, BASE, b64(31)),
     b64(31)),
    ("unknown keyword", "a.test=%s@%s@pinonly" % (BASE, GOOD), "pinonly"),
    ("pin-only without pin", "a.test=%s@pin-only" % BASE, "pin-only"),
]


@pytest.mark.parametrize("case,value,item", BAD_FORWARD, ids=[c for c, _, _ in BAD_FORWARD])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_bad_pin_forward(pki, ports, how, case, value, item):
    args = ["-l", "127.0.0.1:%d" % ports.get(), "-u", BASE, "--ca-file", str(pki.ca_pem)]
    if how == "flag":
        p = run_dotp(args + ["--forward", value], timeout=5)
    else:
        p = run_dotp(args, env={"DOTP_FORWARD": value}, timeout=5)
    one_error_line(p, value, item)


def test_good_pin_values_accepted_at_start(pki, ports):
    """The well-formed values of the spec start: dotp listens, and exits 0
    on SIGTERM (no server is contacted)."""
    ok = [
        BASE + "@" + GOOD,
        BASE + "".join("@sha256/" + b64(32, i) for i in range(8)),
        BASE + "@pin-only@" + GOOD,
        BASE + "@" + GOOD + "@pin-only@no-name-check",
        BASE + "@no-name-check@" + GOOD + "@pin-only",
        "[::1]:853#dot.test@" + GOOD,
        "127.0.0.1#dot.test@" + GOOD,
        BASE + "@sha256/" + base64.b64encode(b"\xfb\xff" * 16).decode(),   # '+' and '/'
    ]
    bad = []
    for v in ok:
        for how in ("flag", "env"):
            port = ports.get()
            if how == "flag":
                cmd, env = harness.dotp_cmd(["-l", "127.0.0.1:%d" % port, "-u", v,
                                             "--ca-file", str(pki.ca_pem)])
            else:
                cmd, env = harness.dotp_cmd([], {"DOTP_LISTEN": "127.0.0.1:%d" % port,
                                                 "DOTP_UPSTREAM": v,
                                                 "DOTP_CA_FILE": str(pki.ca_pem)})
            err = _start_stop(cmd, env, port)
            if err:
                bad.append("%s (%s): %s" % (v, how, err))
    assert not bad, "\n\n".join(bad)


def _start_stop(cmd, env, port, timeout=5.0):
    """None if dotp listens on port within timeout and exits 0 on SIGTERM,
    else what went wrong."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if proc.poll() is not None:
                return "exited %s at start: %s" % (proc.returncode, proc.stderr.read())
            if tcp_listening(port):
                proc.terminate()
                _, err = proc.communicate(timeout=5)
                if proc.returncode != 0:
                    return "exit %s after SIGTERM: %s" % (proc.returncode, err)
                return None
            time.sleep(0.02)
        return "did not listen within %ss" % timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
