"""Access control (--allow / DOTP_ALLOW): clients outside the allowed
prefixes get REFUSED over UDP (header + question echoed) and a closed
connection over TCP; the default is loopback and private ranges; v4-mapped
clients of a dual-stack [::] listener are matched as IPv4.

Addresses outside the default list are added to lo inside the test network
namespace (only when lo is the namespace's only interface, as under
tests/run-integration.sh) and client sockets are bound to them."""

import socket
import struct
import subprocess
import time

import pytest

from harness import make_query, run_dotp, rcode, wire_id, describe, SANITIZER_MARKERS
from faultdot import build_answer, faultdot_factory  # noqa: F401

REFUSED = 5

V4_ALLOWED = ["10.1.2.3", "10.255.255.254", "172.16.0.1", "172.31.255.254", "192.168.1.1",
              "169.254.1.1"]
V4_OUTSIDE = ["192.0.2.1", "11.0.0.1", "172.15.255.254", "172.32.0.1", "192.169.0.1",
              "169.255.0.1", "9.255.255.254"]
V6_ALLOWED = ["fd00::1", "fc00::1", "fdff:ffff::1"]
V6_OUTSIDE = ["2001:db8::1", "fe00::1", "fec0::1", "2001:db8::ffff:7f00:1"]


def _in_private_netns():
    """lo is the only interface (/proc/net/dev is per network namespace;
    /sys/class/net may show the host's)."""
    try:
        with open("/proc/net/dev") as f:
            names = [l.split(":", 1)[0].strip() for l in f.readlines()[2:]]
    except OSError:
        return False
    return names == ["lo"]


@pytest.fixture(scope="module")
def lo_addrs():
    """Adds the test source addresses to lo (private namespace only)."""
    if not _in_private_netns():
        pytest.skip("needs the private network namespace of tests/run-integration.sh "
                    "(adds addresses to lo)")
    added = []
    for a in V4_ALLOWED + V4_OUTSIDE:
        cmd = ["ip", "addr", "add", a + "/32", "dev", "lo"]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert p.returncode == 0 or "File exists" in p.stdout, p.stdout
        added.append(a + "/32")
    for a in V6_ALLOWED + V6_OUTSIDE:
        cmd = ["ip", "-6", "addr", "add", a + "/128", "dev", "lo", "nodad"]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert p.returncode == 0 or "File exists" in p.stdout, p.stdout
        added.append(a + "/128")
    yield
    for a in added:
        subprocess.run(["ip", "addr", "del", a, "dev", "lo"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def start(dotp_factory, srv, listen=None, allow=(), env=None):
    extra = []
    for a in allow:
        extra += ["--allow", a]
    try:
        return dotp_factory(["127.0.0.1:%d#dot.test" % srv.port], listen=listen, extra=extra,
                            env=env)
    except AssertionError as e:
        if "exited early with status 2" in str(e):
            pytest.fail("dotp rejected %s env %s (option not implemented yet?):\n%s"
                        % (extra, env, str(e)[-1500:]), pytrace=False)
        raise


def _fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_from(src, host, port, wire, timeout=2.0):
    s = socket.socket(_fam(host), socket.SOCK_DGRAM)
    try:
        if src:
            s.bind((src, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(wire)
        return s.recv(65535)
    finally:
        s.close()


def tcp_from(src, host, port, wire, timeout=2.0):
    """(answer or None, closed_without_answer)."""
    s = socket.socket(_fam(host), socket.SOCK_STREAM)
    try:
        if src:
            s.bind((src, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        try:
            s.sendall(struct.pack("!H", len(wire)) + wire)
        except (BrokenPipeError, ConnectionResetError):
            return None, True
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            if len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                n = struct.unpack("!H", buf[:2])[0]
                return buf[2:2 + n], False
            left = deadline - time.monotonic()
            if left <= 0:
                return None, False
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return None, False
            except ConnectionResetError:
                return None, True
            if not chunk:
                return None, True
            buf += chunk
    finally:
        s.close()


def expect_served(srv, src, host, port, label):
    problems = []
    q = make_query("ok-%s.example.test" % label, "A", qid=0x6A01)
    want = build_answer(q, srv.tag)
    try:
        a = udp_from(src, host, port, q)
        if a != want:
            problems.append("UDP from %s: %s" % (src, describe(a)))
    except OSError as e:
        problems.append("UDP from %s: %r" % (src, e))
    try:
        a, closed = tcp_from(src, host, port, q)
        if a != want:
            problems.append("TCP from %s: closed=%s answer=%s" % (
                src, closed, describe(a) if a else None))
    except OSError as e:
        problems.append("TCP from %s: %r" % (src, e))
    return problems


def expect_refused(srv, src, host, port, label):
    """UDP: REFUSED, ID and question echoed, header + question only (the
    query has no OPT); TCP: closed without an answer; nothing upstream."""
    problems = []
    name = "no-%s.example.test" % label
    q = make_query(name, "A", qid=0x6B01)
    before = srv.queries
    try:
        a = udp_from(src, host, port, q)
        qend = len(q)           # no OPT: the question ends the query
        if rcode(a) != REFUSED or wire_id(a) != 0x6B01 or not a[2] & 0x80:
            problems.append("UDP from %s: want REFUSED with ID and QR: %s" % (src, describe(a)))
        elif a[4:12] != b"\x00\x01\x00\x00\x00\x00\x00\x00" or a[12:] != q[12:qend]:
            problems.append("UDP from %s: want header + question only, got %d bytes %r"
                            % (src, len(a), a))
        elif (a[2] >> 3) & 0xF != 0:
            problems.append("UDP from %s: opcode not echoed" % src)
    except OSError as e:
        problems.append("UDP from %s: no REFUSED (%r)" % (src, e))
    try:
        a, closed = tcp_from(src, host, port, q)
        if a is not None or not closed:
            problems.append("TCP from %s: want the connection closed without an answer, got "
                            "%s" % (src, describe(a) if a else "no close within 2 s"))
    except OSError as e:
        problems.append("TCP from %s: %r" % (src, e))
    time.sleep(0.05)
    if srv.queries != before:
        problems.append("a refused client's query went upstream (%d)" % (srv.queries - before))
    return problems


@pytest.fixture
def srv(faultdot_factory):
    return faultdot_factory(["normal"])


def test_allow_replaces_default_refuses_loopback(dotp_factory, srv):
    d = start(dotp_factory, srv, allow=["10.0.0.0/8"])
    p = expect_refused(srv, None, "127.0.0.1", d.port, "lo")
    assert not p, "\n".join(p)


def test_refused_keeps_the_clients_opt_question(dotp_factory, srv):
    """REFUSED to an EDNS client: rcode 5, ID and question echoed."""
    d = start(dotp_factory, srv, allow=["10.0.0.0/8"])
    q = make_query("edns-refused.example.test", "A", qid=0x6C01, edns=True)
    a = udp_from(None, "127.0.0.1", d.port, q)
    import dns.message
    m = dns.message.from_wire(a)
    assert rcode(a) == REFUSED and m.id == 0x6C01, describe(a)
    assert m.question == dns.message.from_wire(q).question, describe(a)


@pytest.mark.parametrize("allow", [["127.0.0.1/32"], ["10.0.0.0/8", "127.0.0.0/8"],
                                   ["127.0.0.0/8", "::1/128"], ["0.0.0.0/0"]],
                         ids=["host", "repeated", "both-families", "all-v4"])
def test_allow_loopback_served(dotp_factory, srv, allow):
    d = start(dotp_factory, srv, allow=allow)
    p = expect_served(srv, None, "127.0.0.1", d.port, "lo")
    assert not p, "\n".join(p)


@pytest.mark.parametrize("value,served", [
    ("10.0.0.0/8, 192.168.0.0/16", False),
    ("10.0.0.0/8 127.0.0.0/8", True),
    ("10.0.0.0/8,127.0.0.1/32", True),
], ids=["comma-space-refused", "space-served", "comma-served"])
def test_allow_from_env(dotp_factory, srv, value, served):
    d = start(dotp_factory, srv, env={"DOTP_ALLOW": value})
    fn = expect_served if served else expect_refused
    p = fn(srv, None, "127.0.0.1", d.port, "env")
    assert not p, "DOTP_ALLOW=%r:\n%s" % (value, "\n".join(p))


def test_allow_flag_wins_over_env(dotp_factory, srv):
    d = start(dotp_factory, srv, allow=["10.0.0.0/8"], env={"DOTP_ALLOW": "127.0.0.0/8"})
    p = expect_refused(srv, None, "127.0.0.1", d.port, "flagwins")
    assert not p, "\n".join(p)


def test_default_list(dotp_factory, srv, ports, lo_addrs):
    """No --allow: loopback and private ranges served, everything else
    refused (both families)."""
    port = ports.get()
    d = start(dotp_factory, srv, listen=["127.0.0.1:%d" % port, "[::1]:%d" % port])
    problems = []
    for src in ["127.0.0.1", "127.1.2.3"] + V4_ALLOWED:
        problems += expect_served(srv, None if src == "127.0.0.1" else src, "127.0.0.1", port,
                                  src.replace(".", "-"))
    for src in ["::1"] + V6_ALLOWED:
        problems += expect_served(srv, src, "::1", port, src.replace(":", "-"))
    for src in V4_OUTSIDE:
        problems += expect_refused(srv, src, "127.0.0.1", port, src.replace(".", "-"))
    for src in V6_OUTSIDE:
        problems += expect_refused(srv, src, "::1", port, src.replace(":", "-"))
    assert not problems, "default allow list:\n  " + "\n  ".join(problems) + "\n" + d.log()


def test_open_to_all(dotp_factory, srv, ports, lo_addrs):
    port = ports.get()
    start(dotp_factory, srv, listen=["127.0.0.1:%d" % port, "[::1]:%d" % port],
          allow=["0.0.0.0/0", "::/0"])
    problems = []
    for src in V4_OUTSIDE[:3]:
        problems += expect_served(srv, src, "127.0.0.1", port, src.replace(".", "-"))
    for src in V6_OUTSIDE[:2]:
        problems += expect_served(srv, src, "::1", port, src.replace(":", "-"))
    assert not problems, "--allow 0.0.0.0/0 --allow ::/0:\n  " + "\n  ".join(problems)


def test_narrow_prefixes(dotp_factory, srv, ports, lo_addrs):
    """Prefix lengths are honoured: 192.0.2.0/31 has 192.0.2.1 but not
    192.0.2.x outside it; 2001:db8::/127 has 2001:db8::1."""
    port = ports.get()
    start(dotp_factory, srv, listen=["127.0.0.1:%d" % port, "[::1]:%d" % port],
          allow=["192.0.2.0/31", "2001:db8::/127", "172.16.0.0/32"])
    problems = expect_served(srv, "192.0.2.1", "127.0.0.1", port, "n1")
    problems += expect_served(srv, "2001:db8::1", "::1", port, "n2")
    problems += expect_refused(srv, "172.16.0.1", "127.0.0.1", port, "n3")
    problems += expect_refused(srv, None, "127.0.0.1", port, "n4")
    problems += expect_refused(srv, "fd00::1", "::1", port, "n5")
    assert not problems, "\n  ".join(problems)


@pytest.mark.parametrize("allow,served,refused", [
    (["127.0.0.0/8"], ["127.0.0.1"], ["::1"]),
    (["::/0"], ["::1"], ["127.0.0.1"]),
    (["192.0.2.0/24"], ["192.0.2.1"], ["127.0.0.1", "::1"]),
], ids=["v4-rule-serves-mapped", "v6-rule-not-for-mapped", "v4-outside-addr-mapped"])
def test_v4_mapped_matched_as_ipv4(dotp_factory, srv, ports, lo_addrs, allow, served, refused):
    """-l [::]:P (dual stack): an IPv4 client arrives as ::ffff:a.b.c.d and
    is matched against the IPv4 prefixes only. Each client asks its own
    address (a wildcard listener's answer source is the subject of
    test_wildcard_udp_answer_source*, not of this test)."""
    port = ports.get()
    start(dotp_factory, srv, listen=["[::]:%d" % port], allow=allow)
    problems = []
    for src in served:
        problems += expect_served(srv, src, src, port,
                                  "m" + src.replace(".", "-").replace(":", "-"))
    for src in refused:
        problems += expect_refused(srv, src, src, port,
                                   "r" + src.replace(".", "-").replace(":", "-"))
    assert not problems, "--allow %s on [::]:\n  %s" % (allow, "\n  ".join(problems))


BAD_CIDR = ["10.0.0.0/33", "::/129", "300.1.2.3/8", "10.0.0.0/", "/8", "abc",
            "10.0.0.0/8x", "fe80::/1x", "10.0.0.0/-1"]


@pytest.mark.parametrize("value", BAD_CIDR)
def test_bad_cidr_flag(pki, ports, value):
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
                  "--ca-file", str(pki.ca_pem), "--allow", "10.0.0.0/8", "--allow", value],
                 timeout=5)
    _usage_error(p, value)


def test_bad_cidr_env(pki, ports):
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
                  "--ca-file", str(pki.ca_pem)],
                 env={"DOTP_ALLOW": "10.0.0.0/8, bogus/8"}, timeout=5)
    _usage_error(p, "bogus/8")


def _usage_error(p, needle):
    found = [m for m in SANITIZER_MARKERS if m in p.stderr]
    assert not found, p.stderr
    assert p.returncode == 2, "--allow %r: exit status %s (want 2)\nstderr:\n%s" % (
        needle, p.returncode, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, "want ONE line on stderr, got:\n" + p.stderr
    assert needle in lines[0], "the message does not name %r: %s" % (needle, lines[0])


# --------------------------------------------------------------------------
# Not access control, but it needs the extra addresses: a UDP answer from a
# wildcard listener must come from the address the client asked (else a
# connected client socket, and any resolver checking the source, drops it).
# The IPv4 variants are in test_edges.py (127.0.0.2 needs no setup).

def test_wildcard_udp_answer_source_v6(dotp_factory, srv, ports, lo_addrs):
    port = ports.get()
    start(dotp_factory, srv, listen=["[::]:%d" % port], allow=["::/0", "0.0.0.0/0"])
    q = make_query("src6.example.test", "A", qid=0x6D01)
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.bind(("::1", 0))
        s.settimeout(2)
        s.sendto(q, ("2001:db8::1", port))
        try:
            a, peer = s.recvfrom(65535)
        except socket.timeout:
            pytest.fail("no answer")
    finally:
        s.close()
    assert a == build_answer(q, srv.tag), describe(a)
    assert peer[:2] == ("2001:db8::1", port), (
        "asked [2001:db8::1]:%d from ::1, the answer came from %s" % (port, peer[:2]))
