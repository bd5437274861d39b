"""Answers through dotp must equal the upstream's own answers (apart from
the message ID, which dotp must restore to the client's, and any EDNS(0)
Padding option: dotp pads its queries over TLS, and unbound then pads its
answers there, not on its plain-DNS port)."""


import dns.message
import pytest

from harness import (ZONE_SMALL, ZONE_BIG, dig_output, make_query, udp_exchange,
                     tcp_exchange, zero_id, wire_id, tc_bit, rcode, describe,
                     strip_padding)

# (name, type) answered from the static zone (harness.ZONE_SMALL, ZONE_BIG)
SMALL, BIG = ZONE_SMALL, ZONE_BIG


def ids(case):
    return "%s-%s" % case


def via(host, port, wire, transport):
    if transport == "udp":
        return udp_exchange(host, port, wire, timeout=3)
    return tcp_exchange(host, port, wire, timeout=3)


def assert_same(got, want, query):
    assert wire_id(got) == wire_id(query), "answer ID %d != query ID %d" % (
        wire_id(got), wire_id(query))
    assert zero_id(strip_padding(got)) == zero_id(strip_padding(want)), (
        "answer through dotp differs from the upstream's\n--- via dotp (%d bytes):\n%s\n"
        "--- direct (%d bytes):\n%s" % (len(got), describe(got), len(want), describe(want)))


# ---------------------------------------------------------------- dnspython

@pytest.mark.parametrize("edns", [False, True], ids=["noedns", "edns"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("case", SMALL, ids=ids)
def test_wire_equal(proxy, upstream, case, transport, edns):
    q = make_query(case[0], case[1], qid=0xBEEF, edns=edns)
    got = via(proxy.host, proxy.port, q, transport)
    want = upstream.direct(make_query(case[0], case[1], qid=7, edns=edns),
                           tcp=(transport == "tcp"))
    assert_same(got, want, q)


@pytest.mark.parametrize("edns", [False, True], ids=["noedns", "edns"])
def test_big_txt_tcp_wire_equal(proxy, upstream, edns):
    q = make_query(*BIG, qid=0x4242, edns=edns)
    got = tcp_exchange(proxy.host, proxy.port, q, timeout=3)
    want = upstream.direct(q, tcp=True)
    assert len(want) > 1500
    assert_same(got, want, q)


def test_big_txt_udp_edns4096_capped_then_whole_over_tcp(proxy, upstream):
    """The client advertised 4096 bytes, but dotp caps UDP answers at 1232
    (DNS Flag Day 2020: no IP fragments), so the ~1850-byte answer comes back
    truncated (TC=1, question and OPT kept); the client's retry over TCP
    gets it whole and equal to unbound's answer."""
    q = make_query(*BIG, qid=0x1001, edns=True, payload=4096)
    got = udp_exchange(proxy.host, proxy.port, q, timeout=3)
    assert len(got) <= 1232, "UDP answer of %d bytes over the 1232 cap" % len(got)
    assert tc_bit(got), "1850 bytes sent over UDP without TC: %s" % describe(got)
    m = dns.message.from_wire(got)
    assert m.question == dns.message.from_wire(q).question
    assert m.edns == 0, "the client sent OPT, the truncated answer must keep one"
    assert not m.answer and rcode(got) == 0
    full = tcp_exchange(proxy.host, proxy.port, q, timeout=3)
    assert not tc_bit(full)
    assert_same(full, upstream.direct(q, tcp=True), q)


@pytest.mark.parametrize("edns,limit", [(False, 512), (True, 1232), (True, 1400)],
                         ids=["noedns-512", "edns-1232", "edns-1400"])
def test_big_txt_udp_truncated_to_client_limit(proxy, edns, limit):
    """dotp must never send a UDP answer larger than the client's limit
    (512 bytes without EDNS, else the advertised size): a truncated answer
    with TC=1, same ID and question, and a non-error rcode."""
    q = make_query(*BIG, qid=0x2002, edns=edns, payload=limit)
    got = udp_exchange(proxy.host, proxy.port, q, timeout=3)
    assert len(got) <= limit, "UDP answer of %d bytes exceeds the client's limit %d" % (
        len(got), limit)
    assert wire_id(got) == 0x2002
    assert tc_bit(got), "TC not set on a truncated answer: %s" % describe(got)
    assert rcode(got) == 0, "truncation must not be an error: %s" % describe(got)
    m = dns.message.from_wire(got)
    assert m.question == dns.message.from_wire(q).question


# ---------------------------------------------------------------- dig / kdig

def _dig(tool, host, port, name, rdtype, tcp):
    return dig_output(tool, host, port, name, rdtype, tcp)


# the big TXT is compared over TCP only (over UDP it is truncated)
DIG_CASES = [(c, t) for c in SMALL for t in ("udp", "tcp")] + [(BIG, "tcp")]


@pytest.mark.parametrize("tool", ["dig", "kdig"])
@pytest.mark.parametrize("case,transport", DIG_CASES,
                         ids=["%s-%s-%s" % (c[0], c[1], t) for c, t in DIG_CASES])
def test_dig_kdig_equal(proxy, upstream, tool, transport, case):
    tcp = transport == "tcp"
    got = _dig(tool, proxy.host, proxy.port, case[0], case[1], tcp)
    want = _dig(tool, "127.0.0.1", upstream.plain_port, case[0], case[1], tcp)
    assert got == want, "%s through dotp:\n%s\ndirect:\n%s" % (tool, got, want)
