#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz harnesses into tests/fuzz/corpus/.

Run once (python3 tests/fuzz/mkcorpus.py); the output is committed.
Standard library only. Each seed is one small, named, meaningful input:
valid and malformed queries, answers, frame streams and config strings.
"""
import os
import struct
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def name(n):
    """Wire form of a dotted name ("" is the root)."""
    out = b""
    for label in n.split(".") if n else []:
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def header(qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def opt(udp=1232, options=b"", ttl=0):
    return b"\0" + struct.pack(">HHIH", 41, udp, ttl, len(options)) + options


def option(code, data):
    return struct.pack(">HH", code, len(data)) + data


def rr(owner, rtype, rdata, ttl=300, cls=1):
    return owner + struct.pack(">HHIH", rtype, cls, ttl, len(rdata)) + rdata


def query(qname="example.com", qtype=1, edns=None, flags=0x0100, extra=b"",
          ar=None, qid=0x1234):
    """A query; edns is None or the OPT record bytes (last record)."""
    arc = (1 if edns is not None else 0) if ar is None else ar
    m = header(qid, flags, 1, 0, 0, arc) + name(qname) + struct.pack(">HH", qtype, 1)
    return m + extra + (edns if edns is not None else b"")


def long_name(total):
    """A name whose wire form is exactly total bytes."""
    labels, left = [], total - 1
    while left > 0:
        n = min(63, left - 1)
        if left - (n + 1) == 1:   # never leave a 1-byte hole
            n -= 1
        labels.append("a" * n)
        left -= n + 1
    n = ".".join(labels)
    assert len(name(n)) == total, (len(name(n)), total)
    return n


def write(target, seeds):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    for old in os.listdir(d):
        os.unlink(os.path.join(d, old))
    for k, v in seeds.items():
        with open(os.path.join(d, k), "wb") as f:
            f.write(v)
    print(f"{target}: {len(seeds)} seeds")


def queries():
    s = {}
    s["a"] = query()
    s["aaaa-opt"] = query(qtype=28, edns=opt())
    s["opt-4096"] = query(edns=opt(4096))
    s["opt-100"] = query(edns=opt(100))
    s["opt-do"] = query(qtype=48, edns=opt(1232, ttl=0x8000))
    s["cookie"] = query(edns=opt(1232, option(10, bytes(range(8)))))
    s["ecs"] = query(edns=opt(1232, option(8, b"\0\1\x18\0\xc0\xa8\1")))
    pq = query(edns=opt(1232, option(12, b"")))
    padded = query(edns=opt(1232, option(12, bytes(128 - len(pq) % 128))))
    s["padded"] = padded
    s["padding-not-last"] = query(edns=opt(1232, option(12, b"\0" * 5) +
                                           option(10, bytes(8))))
    s["root"] = query("", qtype=2)
    s["upper"] = query("WwW.ExAmPlE.CoM")
    s["long-name"] = query("a" * 63 + "." + "b" * 63 + ".example")
    s["name-255"] = query(long_name(255), edns=opt())
    s["name-256"] = query("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62)
    tsig = rr(name("key"), 65280, b"\0" * 20, 0, 255)
    s["opt-not-last"] = query(edns=opt(), extra=b"", ar=2) + tsig
    s["two-opt"] = query(edns=opt() + opt(), ar=2)
    s["opt-named"] = query(extra=rr(name("x"), 41, b""), ar=1)
    s["trailing"] = query(edns=opt()) + b"\xde\xad"
    s["trailing-noopt"] = query() + b"\0\0\0"
    s["an-record"] = header(an=1) + name("a.test") + b"\0\1\0\1" + \
        rr(b"\xc0\x0c", 1, b"\1\2\3\4")
    s["opt-bad-option"] = query(edns=opt(1232, b"\0\x0a\0\x20\1\2"))
    s["opt-partial-option"] = query(edns=opt(1232, b"\0\x0a\0"))
    s["arcount-ffff"] = query(ar=0xffff)
    s["opt-in-authority"] = header(ns=1) + name("a.test") + b"\0\1\0\1" + opt()
    s["ptr-into-header"] = header(an=1) + name("a.test") + b"\0\1\0\1" + \
        rr(b"\xc0\x0b", 1, b"\1\2\3\4")
    # Near the 1024-byte limit: one record of filler in the authority.
    base = query(edns=opt(), ar=1)
    for total, withopt in ((1020, True), (1024, True), (1024, False), (1010, False)):
        q0 = header(ns=1, ar=1 if withopt else 0) + name("big.example") + b"\0\1\0\1"
        fill = total - len(q0) - (11 if withopt else 0) - 11
        q0 += rr(b"\0", 65280, b"x" * fill)
        q0 += opt() if withopt else b""
        assert len(q0) == total, len(q0)
        s[f"size-{total}{'-opt' if withopt else ''}"] = q0
    s["size-1025"] = s["size-1024-opt"] + b"\0"
    # Malformed.
    s["short"] = base[:5]
    s["header-only"] = header(qd=0)
    s["cut-question"] = base[:20]
    s["cut-opt"] = base[:-3]
    s["qname-pointer"] = header() + b"\xc0\x0c\0\1\0\1"
    s["label-40"] = header() + b"\x41" + b"a" * 1 + b"\0\0\1\0\1"
    s["label-80"] = header() + b"\x81a\0\0\1\0\1"
    s["qd0"] = header(qd=0, ar=1) + opt()
    s["qd2"] = header(qd=2) + name("a.test") + b"\0\1\0\1" + name("b.test") + b"\0\1\0\1"
    s["qr-set"] = query(flags=0x8180)
    s["opcode-2"] = query(flags=0x1100)
    s["opcode-5"] = query(flags=0x2900, edns=opt())
    s["rdlen-past-end"] = query(edns=b"\0\0\x29\4\xd0\0\0\0\0\0\x40")
    return s


def answers():
    """[2-byte query length][query][answer]."""
    def pair(q, a):
        return struct.pack(">H", len(q)) + q + a

    def answer(q, records=(), ns=(), ar=(), rcode=0, flags=0x8180, qd=True):
        qend = 12 + len(name_of(q)) + 4
        m = header(struct.unpack(">H", q[:2])[0], flags | rcode,
                   1 if qd else 0, len(records), len(ns), len(ar))
        if qd:
            m += q[12:qend]
        return m + b"".join(records) + b"".join(ns) + b"".join(ar)

    def name_of(q):
        p = 12
        while q[p]:
            p += q[p] + 1
        return q[12:p + 1]

    s = {}
    q = query()
    qo = query(edns=opt())
    a1 = rr(b"\xc0\x0c", 1, b"\x5d\xb8\xd8\x22")
    s["a"] = pair(q, answer(q, [a1]))
    s["a-opt"] = pair(qo, answer(qo, [a1], ar=[opt(1232)]))
    s["a-opt-cookie"] = pair(qo, answer(qo, [a1], ar=[opt(1232, option(10, bytes(24)))]))
    s["a-opt-padded"] = pair(qo, answer(qo, [a1], ar=[opt(1232, option(12, bytes(200)))]))
    s["case"] = pair(query("WWW.Example.COM"), answer(query("www.example.com"), [a1]))
    s["compressed-question"] = pair(q, header(flags=0x8180, an=1) + b"\xc0\x0c\0\1\0\1" + a1)
    s["servfail-noquestion"] = pair(q, answer(q, rcode=2, qd=False))
    s["noerror-noquestion"] = pair(q, answer(q, qd=False))
    s["nxdomain-soa"] = pair(q, answer(q, ns=[rr(b"\xc0\x14", 6, name("ns") + name("h") + bytes(20))], rcode=3))
    s["qr-clear"] = pair(q, answer(q, [a1], flags=0x0100))
    s["other-question"] = pair(q, answer(query("example.org"), [a1]))
    s["two-opt"] = pair(qo, answer(qo, [a1], ar=[opt(), opt()]))
    s["opt-in-answer"] = pair(qo, answer(qo, [opt()]))
    s["opt-then-rr"] = pair(qo, answer(qo, [a1], ar=[opt(), rr(b"\xc0\x0c", 1, b"\1\2\3\4")]))
    s["trailing"] = pair(qo, answer(qo, [a1], ar=[opt()]) + b"\0\0\0\0")
    s["bad-rdlen"] = pair(qo, answer(qo, [a1[:-4] + b"\0\x40"], ar=[opt()]))
    s["pointer-loop"] = pair(q, answer(q, [rr(b"\xc0\x30", 1, b"\1\2\3\4")]))
    txt = rr(b"\xc0\x0c", 16, b"\xff" + b"t" * 255)
    for n, label in ((3, "600"), (6, "1500")):
        s[f"big-{label}"] = pair(q, answer(q, [txt] * n))
        s[f"big-{label}-opt"] = pair(qo, answer(qo, [txt] * n, ar=[opt(4096)]))
    # OPT with options too big to keep whole under 512.
    s["big-opt-options"] = pair(qo, answer(qo, [txt] * 2, ar=[opt(1232, option(12, bytes(400)))]))
    s["big-opt-4096"] = pair(query(edns=opt(4096)),
                             answer(query(edns=opt(4096)), [txt] * 5, ar=[opt()]))
    s["big-servfail"] = pair(q, answer(q, qd=False, rcode=2, ar=[rr(b"\0", 16, b"x" * 700)]))
    s["bad-query"] = pair(b"\0\0junk", answer(query(edns=opt()), [a1], ar=[opt()]))
    s["no-query"] = b"\0\0" + answer(query(edns=opt()), [txt] * 3, ar=[opt()])
    s["short"] = pair(q, b"\x12\x34\x81")
    return s


def frames():
    """[k-1 in low nibble][k chunk sizes][stream]."""
    def stream(*msgs):
        return b"".join(struct.pack(">H", len(m)) + m for m in msgs)

    def seed(sizes, st):
        return bytes([len(sizes) - 1]) + bytes(sizes) + st

    q, qo = query(), query(edns=opt())
    s = {}
    s["one-whole"] = seed([0], stream(q))
    s["two-whole"] = seed([0], stream(q, qo))
    s["bytewise"] = seed([1], stream(q, qo))
    s["mixed"] = seed([3, 7, 200, 1], stream(q, qo, q))
    s["partial-end"] = seed([0], stream(q) + b"\0\x30abc")
    s["len-11"] = seed([0], stream(q) + b"\0\x0b" + bytes(11))
    s["len-0"] = seed([5], b"\0\0" + q)
    s["len-12"] = seed([2], stream(bytes(12), bytes(12)))
    s["len-1024"] = seed([0x80 + 31], stream(b"\0" * 1024, q))
    s["len-1025"] = seed([0], stream(b"\1" * 1025, q))
    s["len-65535"] = seed([0xff], b"\xff\xff" + bytes(3000))
    s["len-prefix-split"] = seed([1, 0], stream(q))
    s["many-small"] = seed([13, 0x81], stream(*[bytes(12)] * 40))
    return s


def configs():
    vals = [
        "127.0.0.1:53", "127.0.0.1", "0.0.0.0:5353", "[::1]:853", "::1",
        "[::]:53", "[::ffff:1.2.3.4]:65535", "1.2.3.4:0", "1.2.3.4:65536",
        "1.2.3.4:", "[::1]", "[::1]x", "[", "[]:53", "::1:53",
        "[fe80::1%eth0]:53", "fe80::1%1", "1.2.3", "01.2.3.4", "256.1.1.1",
        "10.0.0.0/8", "fe80::/10", "0.0.0.0/0", "::/0", "192.168.1.1/32",
        "10.0.0.1/8", "172.16.0.0/12", "2001:db8::/129", "10.0.0.0/33",
        "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/0008",
        "::ffff:0:0/96", "::ffff:10.0.0.0/104", "1.2.3.4/8/8",
        "600000", "600001", "0", "007", "-1", "+5", " 5", "\t5", "5 ",
        "99999999999999999999", "0x10",
        "dns.example", "cloudflare-dns.com", "*.example.com", "a..b", ".a",
        "a.", "a_b-c", "a" * 64, ".".join(["a" * 63] * 4), "1.1.1.1",
        "x*y", "", "junk", "\xff\xfe",
    ]
    return {f"c{k:02d}": v.encode("latin-1") for k, v in enumerate(vals)}


def main():
    write("fuzz_query", queries())
    write("fuzz_answer", answers())
    write("fuzz_frames", frames())
    write("fuzz_config", configs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
