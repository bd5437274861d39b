"""Many queries: TCP pipelining on one client connection, UDP bursts over a
single upstream TLS connection, and TCP clients that misbehave."""

import os
import socket
import struct
import time

import dns.message
import pytest

from harness import (make_query, tcp_read_msg, tcp_exchange, udp_exchange, udp_burst, zero_id,
                     strip_padding, wire_id, describe, rcode)

MIX = [
    ("www.example.test", "A"),
    ("www.example.test", "AAAA"),
    ("example.test", "MX"),
    ("alias.example.test", "CNAME"),
    ("alias.example.test", "A"),
    ("nx.example.test", "A"),
    ("ns.example.test", "A"),
    ("big.example.test", "TXT"),
]


def expected_answers(upstream, cases, edns):
    """(name, type) -> the upstream's answer with ID zeroed."""
    return {c: zero_id(strip_padding(upstream.direct(make_query(c[0], c[1], qid=1, edns=edns))))
            for c in cases}


def test_tcp_pipelining_200(proxy, upstream):
    expected = expected_answers(upstream, MIX, edns=True)
    queries = {}  # id -> (case, wire)
    buf = b""
    for i in range(200):
        qid = 1000 + i * 7
        case = MIX[i % len(MIX)]
        q = make_query(case[0], case[1], qid=qid, edns=True)
        queries[qid] = (case, q)
        buf += struct.pack("!H", len(q)) + q
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    try:
        s.sendall(buf)  # all 200 queries before reading anything
        deadline = time.monotonic() + 15
        got = {}
        while len(got) < len(queries):
            try:
                a = tcp_read_msg(s, deadline)
            except (OSError, ConnectionError) as e:
                pytest.fail("after %d of %d answers: %s" % (len(got), len(queries), e))
            qid = wire_id(a)
            assert qid in queries, "answer with unknown ID %d: %s" % (qid, describe(a))
            assert qid not in got, "second answer for ID %d" % qid
            got[qid] = a
    finally:
        s.close()
    bad = []
    for qid, (case, q) in queries.items():
        a = got[qid]
        if dns.message.from_wire(a).question != dns.message.from_wire(q).question:
            bad.append("ID %d: question %s != %s" % (qid, describe(a), case))
        elif zero_id(strip_padding(a)) != expected[case]:
            bad.append("ID %d %s: wrong answer:\n%s" % (qid, case, describe(a)))
    assert not bad, "%d bad answers, first: %s" % (len(bad), bad[0])


def test_udp_1000_over_one_tls_connection(dotp_factory, upstream, relay_factory, ports):
    """10 bursts of 100 UDP queries from 5 sockets whose query IDs overlap
    (different clients may use the same ID at the same time). All answered
    correctly; the upstream saw exactly ONE TLS connection over the run."""
    relay_port = ports.get()
    relay = relay_factory(("127.0.0.1", relay_port), ("127.0.0.1", upstream.tls_port))
    d = dotp_factory(["127.0.0.1:%d#dot.test" % relay_port])
    cases = [c for c in MIX if c[1] != "TXT"]
    expected = expected_answers(upstream, cases, edns=False)
    n_socks = 5
    for burst in range(10):
        queries, case_of = [], {}
        for i in range(100):
            # IDs 0..19 on every socket: they collide across sockets
            qid = (i // n_socks) + burst * 20
            case = cases[(i + burst) % len(cases)]
            q = make_query(case[0], case[1], qid=qid)
            queries.append(q)
            case_of[(i % n_socks, qid)] = (case, q)
        pending, answers, missing = udp_burst(d.host, d.port, queries, n_socks=n_socks,
                                              timeout=5)
        assert not missing, "burst %d: %d of 100 queries unanswered, e.g. %s" % (
            burst, len(missing), missing[:5])
        for key, (case, q) in case_of.items():
            a = answers[key]
            assert zero_id(strip_padding(a)) == expected[case], (
                "burst %d socket %d ID %d %s: wrong answer (mixed up with another "
                "client's?):\n%s" % (burst, key[0], key[1], case, describe(a)))
    assert relay.accepted == 1, (
        "upstream saw %d TLS connections from dotp, want exactly 1" % relay.accepted)


def test_tcp_query_in_pieces(proxy, upstream):
    """A TCP query that arrives in several segments (length split from the
    body, body split in two) is answered."""
    q = make_query("www.example.test", "A", qid=0x5151, edns=True)
    framed = struct.pack("!H", len(q)) + q
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for part in (framed[:1], framed[1:2], framed[2:10], framed[10:]):
            s.sendall(part)
            time.sleep(0.1)
        a = tcp_read_msg(s, time.monotonic() + 5)
    finally:
        s.close()
    assert zero_id(strip_padding(a)) == zero_id(strip_padding(upstream.direct(q))), describe(a)
    assert wire_id(a) == 0x5151


def test_tcp_clients_that_vanish(proxy, upstream):
    """Clients that close before the answer, or send garbage / a truncated
    frame, must not disturb dotp (teardown also checks it exits cleanly)."""
    q = make_query("www.example.test", "A", qid=77, edns=True)
    for _ in range(20):
        s = socket.create_connection((proxy.host, proxy.port), timeout=5)
        s.sendall(struct.pack("!H", len(q)) + q)
        s.close()  # before the answer arrives
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    s.sendall(struct.pack("!H", 300) + b"\x00" * 10)  # truncated frame, then close
    s.close()
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(struct.pack("!H", len(q)) + q)
    s.close()  # RST
    time.sleep(0.3)
    assert proxy.proc.poll() is None, "dotp died:\n" + proxy.log()
    a = tcp_exchange(proxy.host, proxy.port, q, timeout=3)
    assert rcode(a) == 0 and zero_id(strip_padding(a)) == \
        zero_id(strip_padding(upstream.direct(q))), describe(a)


def test_garbage_datagrams_do_not_hurt(proxy, upstream):
    """Junk over UDP and TCP (empty, short, a response, two questions,
    random bytes, a bad name) must not crash dotp or stop it answering.
    What it answers to junk, if anything, is not checked here."""
    good = make_query("www.example.test", "A", qid=1, edns=True)
    two_q = bytearray(good)
    two_q[4:6] = b"\x00\x02"  # QDCOUNT=2 but only one question present
    response = bytearray(good)
    response[2] |= 0x80  # QR set
    bad_label = good[:12] + b"\x3fabc\x00\x00\x01\x00\x01"  # label length past the end
    junk = [b"", b"\x00", b"\x12\x34\x01", good[:12], bytes(response), bytes(two_q),
            bad_label, os.urandom(40), os.urandom(600), b"\xff" * 512]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for j in junk:
        s.sendto(j, (proxy.host, proxy.port))
    s.close()
    for j in junk:
        if not j:
            continue
        t = socket.create_connection((proxy.host, proxy.port), timeout=3)
        t.sendall(struct.pack("!H", len(j)) + j)
        t.close()
    time.sleep(0.3)
    assert proxy.proc.poll() is None, "dotp died:\n" + proxy.log()
    for fn in (udp_exchange, tcp_exchange):
        a = fn(proxy.host, proxy.port, good, timeout=3)
        assert zero_id(strip_padding(a)) == \
            zero_id(strip_padding(upstream.direct(good))), describe(a)


# --- delayed ACKs against the server's Nagle --------------------------------
# unbound writes each DoT answer on its own without TCP_NODELAY: while its
# last small segment is unacknowledged, Nagle holds the next one until the
# ACK comes. A forwarder that lets the kernel delay that ACK (up to 40 ms
# on Linux) when it has no query to send stalls the second answer of a
# pair, and a burst by one hold per round. Bounds are a tenth to a half of
# that stall, on medians of many rounds.

def _pair_rounds(proxy, rounds, size):
    """Send `size` queries at once on one UDP socket, `rounds` times;
    returns the seconds each round took to get every answer."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((proxy.host, proxy.port))
    s.settimeout(2)
    took = []
    try:
        for r in range(rounds):
            want = set()
            t0 = time.monotonic()
            for k in range(size):
                qid = (r * size + k) % 65536
                kind = "A" if k % 2 == 0 else "AAAA"
                s.send(make_query("www.example.test", kind, qid=qid))
                want.add(qid)
            while want:
                a = s.recv(65535)
                want.discard(wire_id(a))
            took.append(time.monotonic() - t0)
    finally:
        s.close()
    return took


def test_answer_pair_not_held_by_nagle(proxy):
    """A and AAAA sent together (what getaddrinfo does): the second answer
    must not wait for a delayed ACK."""
    _pair_rounds(proxy, 3, 2)  # connection up, RTT known
    took = sorted(_pair_rounds(proxy, 31, 2))
    assert took[15] < 0.010, "median pair %.1f ms (rounds: %s)" % (
        took[15] * 1e3, ", ".join("%.1f" % (t * 1e3) for t in took))


def test_burst_not_held_by_nagle(proxy):
    """40 queries in flight at once (over DOTP_ACK_FEW): the ACK may wait
    for a query to carry it, but not for the kernel's delayed-ACK timer."""
    _pair_rounds(proxy, 3, 2)
    took = sorted(_pair_rounds(proxy, 15, 40))
    assert took[7] < 0.020, "median burst %.1f ms (rounds: %s)" % (
        took[7] * 1e3, ", ".join("%.1f" % (t * 1e3) for t in took))
