"""Split forwarding: --forward ZONE[,ZONE...]=SERVER[,SERVER...] and
DOTP_FORWARD (issue 13; the contract is spec/forward.md).

Servers (everything on 127.0.0.1 inside the suite's network namespace):
  ZoneUnbound  a real unbound with local zones, plain DNS and optionally
               DoT, started with log-queries, so what reached it is counted
               from its log (.seen()):
                 cluster  plain, cluster.local + 10.in-addr.arpa +
                          d.f.ip6.arpa (the Kubernetes shape: my-svc A
                          10.96.5.5 and its PTR records, a name with 100 A
                          records that never fits one UDP answer)
                 corp     DoT, corp.example
                 external DoT, external.test (default upstream of the
                          pod-shaped test)
  PlainServer  a plain DNS server in Python threads (UDP and TCP on one
               port) that records every query (transport, source port, ID,
               name, raw wire), counts accepted TCP connections and the
               most queries in flight on one, and can be told to stay
               silent, to answer TC over UDP, or to send spoofed datagrams
               first.
  faultdot     the default DoT upstream where counting matters (queries_for).
The session `upstream` fixture is the default DoT upstream where answers
are compared with the servers' own.

Every test is bounded (seconds) and says what would make it fail.
"""

import re
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.reversename
import pytest

import harness
from harness import (make_query, udp_exchange, tcp_exchange, tcp_read_msg, zero_id,
                     strip_padding, describe, rcode, tc_bit, run_dotp, run,
                     SANITIZER_MARKERS)
from faultdot import faultdot_factory, expected_a  # noqa: F401

NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5
OPT_PADDING = 12

MY_SVC = "my-svc.default.svc.cluster.local"
MY_SVC_A = "10.96.5.5"
MY_SVC_V6 = "my-svc-v6.default.svc.cluster.local"
MY_SVC_AAAA = "fd00:10:96::5"
MANY = "many.default.svc.cluster.local"
MANY_N = 100                       # 100 A records: ~1650 bytes, never one UDP answer
MANY_ADDRS = ["10.97.%d.%d" % (i // 250, 1 + i % 250) for i in range(MANY_N)]
PTR_V4 = dns.reversename.from_address(MY_SVC_A).to_text().rstrip(".")   # 5.5.96.10.in-addr.arpa
PTR_V6 = dns.reversename.from_address(MY_SVC_AAAA).to_text().rstrip(".")

CLUSTER_ZONES = ["cluster.local", "10.in-addr.arpa", "d.f.ip6.arpa"]
CLUSTER_DATA = [
    "cluster.local. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30",
    "cluster.local. 30 IN NS ns.dns.cluster.local.",
    "ns.dns.cluster.local. 30 IN A 10.96.0.10",
    "%s. 30 IN A %s" % (MY_SVC, MY_SVC_A),
    "%s. 30 IN AAAA %s" % (MY_SVC_V6, MY_SVC_AAAA),
    "kube-dns.kube-system.svc.cluster.local. 30 IN A 10.96.0.10",
    "10.in-addr.arpa. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30",
    "%s. 30 IN PTR %s." % (PTR_V4, MY_SVC),
    "d.f.ip6.arpa. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30",
    "%s. 30 IN PTR %s." % (PTR_V6, MY_SVC_V6),
] + ["%s. 30 IN A %s" % (MANY, a) for a in MANY_ADDRS]

CORP_ZONES = ["corp.example"]
CORP_A = "10.1.0.1"
CORP_DATA = [
    "corp.example. 300 IN SOA ns.corp.example. hostmaster.corp.example. 1 3600 900 604800 300",
    "corp.example. 300 IN NS ns.corp.example.",
    "ns.corp.example. 300 IN A 10.1.0.53",
    "www.corp.example. 300 IN A %s" % CORP_A,
    "corp.example. 300 IN MX 10 mail.corp.example.",
    "mail.corp.example. 300 IN A 10.1.0.25",
]

EXTERNAL_ZONES = ["external.test"]
EXTERNAL_A = "192.0.2.80"
EXTERNAL_DATA = [
    "external.test. 300 IN SOA ns.external.test. hostmaster.external.test. 1 3600 900 604800 300",
    "www.external.test. 300 IN A %s" % EXTERNAL_A,
]


# ==========================================================================
# servers
# ==========================================================================

class ZoneUnbound(harness._PlainDns):
    """unbound answering `data` (RR strings) for the static local zones
    `zones`, refusing everything else, on 127.0.0.1: plain DNS on
    plain_port and, with tls=(cert, key), DoT on tls_port. log-queries:
    every query that reaches it is a line of its log; seen() lists them
    (lower-cased name, type) since the last mark()."""

    name = "unbound"

    def __init__(self, workdir, plain_port, zones, data, tls=None, tls_port=None,
                 ready_name=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plain_port = plain_port
        self.tls_port = tls_port if tls else plain_port
        self.log = self.dir / "unbound.log"
        self.conf = self.dir / "unbound.conf"
        lines = harness.unbound_head(self.dir, self.log, plain_port) + [
            "  log-queries: yes",
            "  interface: 127.0.0.1@%d" % plain_port,
            "  incoming-num-tcp: 100",
            "  max-udp-size: 1232",
            "  edns-buffer-size: 1232",
            "  tcp-idle-timeout: 300000",
            "  so-reuseport: no",
            '  module-config: "iterator"',
            "  access-control: 127.0.0.0/8 allow",
            "  hide-identity: yes",
            "  hide-version: yes",
            "  qname-minimisation: no",
            "  rrset-roundrobin: no",
            "  minimal-responses: yes",
            '  local-zone: "." refuse',
        ]
        if tls:
            lines += ["  tls-port: %d" % tls_port,
                      "  interface: 127.0.0.1@%d" % tls_port,
                      '  tls-service-key: "%s"' % tls[1],
                      '  tls-service-pem: "%s"' % tls[0]]
        for z in zones:
            lines.append('  local-zone: "%s." static' % z)
        for rr in data:
            lines.append("  local-data: '%s'" % rr)
        lines += ["remote-control:", "  control-enable: no", ""]
        self.conf.write_text("\n".join(lines))
        run(["unbound-checkconf", self.conf])
        self._out = open(self.dir / "unbound.stderr", "wb")
        self.proc = subprocess.Popen(["unbound", "-d", "-c", str(self.conf)],
                                     stdout=self._out, stderr=subprocess.STDOUT)
        self._wait_ready((ready_name or zones[0], "SOA"))
        self.mark()

    def logs(self):
        out = ""
        for f in (self.log, self.dir / "unbound.stderr"):
            if f.exists():
                out += f.read_text(errors="replace")
        return out

    _QLINE = re.compile(r"info: (\S+) (\S+) (\S+) (\S+)\s*$")

    def _all(self):
        out = []
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            m = self._QLINE.search(line)
            if m:
                out.append((m.group(2).lower().rstrip("."), m.group(3).upper()))
        return out

    def mark(self):
        time.sleep(0.05)
        self._mark = len(self._all())

    def seen(self, settle=0.15):
        """[(name, type)] that reached the server since mark() (waits
        `settle` first so a query on its way is in the log)."""
        time.sleep(settle)
        return self._all()[self._mark:]

    def names(self, settle=0.15):
        return [n for n, _ in self.seen(settle)]


class PlainServer:
    """A plain DNS server (UDP and TCP on host:port) in threads.

    Every query is recorded in self.log as a dict: transport ('udp' /
    'tcp'), src (addr, port), id, name (lower-case, no trailing dot),
    qtype (text), wire, conn (TCP connection index), t (monotonic).
    Answers (answer(q_msg) -> dns.message or None): an A query gets
    A self.addr (TTL self.ttl), other types NOERROR/NODATA.

    Modes: silent=True records and never answers; tc_udp=True answers every
    UDP query with an empty TC answer and TCP queries with `big_n` A
    records; tcp_delay seconds before each TCP answer (answers go out from
    timers, so queries pipelined on one connection are in flight
    together; self.max_inflight is the most seen on one connection);
    udp_hook(srv, sock, wire, src) sends whatever it likes itself.
    self.accepted counts accepted TCP connections."""

    def __init__(self, port, host="127.0.0.1", addr="10.200.0.1", ttl=60,
                 silent=False, tc_udp=False, big_n=60, tcp_delay=0.0, udp_hook=None):
        self.host, self.port = host, port
        self.addr, self.ttl = addr, ttl
        self.silent, self.tc_udp, self.big_n = silent, tc_udp, big_n
        self.tcp_delay, self.udp_hook = tcp_delay, udp_hook
        self.lock = threading.Lock()
        self.log = []
        self.accepted = 0
        self.max_inflight = 0
        self.errors = []
        self.closed = False
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.us = socket.socket(fam, socket.SOCK_DGRAM)
        self.us.bind((host, port))
        self.ls = socket.socket(fam, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind((host, port))
        self.ls.listen(64)
        self.conns = []
        self.threads = [threading.Thread(target=self._udp_loop, daemon=True),
                        threading.Thread(target=self._accept_loop, daemon=True)]
        for t in self.threads:
            t.start()

    # ----------------------------------------------------------- records
    def _record(self, transport, src, wire, conn=None):
        try:
            m = dns.message.from_wire(wire)
            q = m.question[0]
            name = q.name.to_text().lower().rstrip(".")
            qtype = dns.rdatatype.to_text(q.rdtype)
        except Exception:
            m, name, qtype = None, None, None
        with self.lock:
            self.log.append(dict(transport=transport, src=src, id=struct.unpack("!H", wire[:2])[0],
                                 name=name, qtype=qtype, wire=wire, conn=conn,
                                 t=time.monotonic()))
        return m

    def queries(self, transport=None, name=None):
        with self.lock:
            return [e for e in self.log
                    if (transport is None or e["transport"] == transport)
                    and (name is None or e["name"] == name.lower().rstrip("."))]

    def names(self, transport=None):
        return [e["name"] for e in self.queries(transport)]

    # ----------------------------------------------------------- answers
    def answer(self, m, transport):
        r = dns.message.make_response(m)
        r.flags |= dns.flags.AA | dns.flags.RA
        q = m.question[0]
        if self.tc_udp and transport == "udp":
            r.flags |= dns.flags.TC
            return r
        if q.rdtype == dns.rdatatype.A:
            if self.tc_udp:
                addrs = ["10.201.%d.%d" % (i // 250, 1 + i % 250) for i in range(self.big_n)]
            else:
                addrs = [self.addr]
            r.answer.append(dns.rrset.from_text(q.name, self.ttl, "IN", "A", *addrs))
        return r

    def _udp_loop(self):
        while not self.closed:
            try:
                r, _, _ = select.select([self.us], [], [], 0.05)
                if not r:
                    continue
                wire, src = self.us.recvfrom(65535)
            except (OSError, ValueError):
                return
            m = self._record("udp", src, wire)
            if self.silent or m is None:
                continue
            try:
                if self.udp_hook is not None:
                    self.udp_hook(self, self.us, wire, src)
                    continue
                self.us.sendto(self.answer(m, "udp").to_wire(max_size=65535), src)
            except Exception as e:     # noqa: BLE001
                self.errors.append(repr(e))

    def _accept_loop(self):
        while not self.closed:
            try:
                r, _, _ = select.select([self.ls], [], [], 0.05)
                if not r:
                    continue
                c, _ = self.ls.accept()
            except (OSError, ValueError):
                return
            with self.lock:
                idx = self.accepted
                self.accepted += 1
                self.conns.append(c)
            threading.Thread(target=self._serve_tcp, args=(c, idx), daemon=True).start()

    def _serve_tcp(self, c, idx):
        send_lock = threading.Lock()
        inflight = [0]

        def send(resp):
            try:
                w = resp.to_wire(max_size=65535)
                with send_lock:
                    c.sendall(struct.pack("!H", len(w)) + w)
            except OSError:
                pass
            with self.lock:
                inflight[0] -= 1

        try:
            while not self.closed:
                try:
                    wire = tcp_read_msg(c, time.monotonic() + 30)
                except (OSError, ConnectionError):
                    return
                m = self._record("tcp", c.getpeername(), wire, conn=idx)
                if self.silent or m is None:
                    continue
                with self.lock:
                    inflight[0] += 1
                    self.max_inflight = max(self.max_inflight, inflight[0])
                resp = self.answer(m, "tcp")
                if self.tcp_delay:
                    threading.Timer(self.tcp_delay, send, args=(resp,)).start()
                else:
                    send(resp)
        finally:
            pass

    def close(self):
        self.closed = True
        for s in [self.us, self.ls] + self.conns:
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(2)


# ==========================================================================
# fixtures
# ==========================================================================

@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ports):
    """Plain-DNS unbound serving cluster.local and the reverse zones."""
    u = ZoneUnbound(tmp_path_factory.mktemp("unbound-cluster"), ports.get(),
                    CLUSTER_ZONES, CLUSTER_DATA)
    yield u
    u.stop()


@pytest.fixture(scope="module")
def corp(tmp_path_factory, ports, pki):
    """DoT (and plain) unbound serving corp.example, certificate dot.test."""
    u = ZoneUnbound(tmp_path_factory.mktemp("unbound-corp"), ports.get(),
                    CORP_ZONES, CORP_DATA, tls=pki.certs["good-rsa"], tls_port=ports.get())
    yield u
    u.stop()


@pytest.fixture
def plain_factory(ports):
    made = []

    def make(**kw):
        port = kw.pop("port", None) or ports.get()
        s = PlainServer(port, **kw)
        made.append(s)
        return s
    yield make
    errs = []
    for s in made:
        s.close()
        errs += s.errors
    assert not errs, "plain server errors: %s" % errs[:5]


@pytest.fixture(autouse=True)
def _fresh_marks(request):
    """Counting on the module-wide unbounds starts at each test."""
    for name in ("cluster", "corp"):
        if name in request.fixturenames:
            request.getfixturevalue(name).mark()


# ==========================================================================
# helpers
# ==========================================================================

def dns_spec(srv):
    port = srv.plain_port if hasattr(srv, "plain_port") else srv.port
    return "dns://127.0.0.1:%d" % port


def dot_spec(srv):
    port = srv.tls_port if hasattr(srv, "tls_port") else srv.port
    return "127.0.0.1:%d#dot.test" % port


def fwd(*entries):
    """['--forward', e1, '--forward', e2, ...]"""
    out = []
    for e in entries:
        out += ["--forward", e]
    return out


def start(dotp_factory, default, forwards, extra=(), cache=False, listen=None, env=None,
          probe=False):
    """A dotp with -u `default` (a spec string, a server object or None for
    no -u) and the --forward values `forwards`. Exit status 2 at start
    (option not known / value rejected) fails the test saying so."""
    ups = []
    if default is not None:
        ups = [default if isinstance(default, str) else dot_spec(default)]
    try:
        return dotp_factory(ups, listen=listen, extra=fwd(*forwards) + list(extra),
                            cache=cache, env=env, probe=probe)
    except AssertionError as e:
        if "exited early with status 2" in str(e):
            pytest.fail("dotp rejected its arguments %s:\n%s" % (
                fwd(*forwards) + list(extra), str(e)[-1500:]), pytrace=False)
        raise


def ask(d, name, rdtype="A", tcp=False, qid=0x4242, edns=False, payload=1232,
        timeout=3.0):
    q = make_query(name, rdtype, qid=qid, edns=edns, payload=payload)
    if tcp:
        return tcp_exchange(d.host, d.port, q, timeout=timeout)
    return udp_exchange(d.host, d.port, q, timeout=timeout)


def rdata(wire, rdtype=None):
    """Sorted text of the answer section's records (of rdtype, if given)."""
    m = dns.message.from_wire(wire)
    out = []
    for rr in m.answer:
        if rdtype is None or rr.rdtype == dns.rdatatype.from_text(rdtype):
            out += [r.to_text() for r in rr]
    return sorted(out)


def exit_info(d):
    """SIGTERM dotp (exit status 0 required): (process counters of the
    'dotp exiting' line, {upstream label: its 'upstream summary' fields})."""
    rc = d.stop()
    log = d.log()
    assert rc == 0, "dotp exit status %r after SIGTERM (want 0)\n%s" % (rc, log[-3000:])
    proc, ups = None, {}
    for line in log.splitlines():
        fields = {}
        for tok in line.replace('"', " ").split():
            k, eq, v = tok.partition("=")
            if eq:
                fields[k] = int(v) if v.isdigit() else v
        if "dotp exiting" in line:
            proc = fields
        elif "upstream summary" in line and "upstream" in fields:
            ups[fields["upstream"]] = fields
    assert proc is not None, "no 'dotp exiting' line:\n" + log[-3000:]
    return proc, ups


def ctx(d, *servers):
    out = "\n--- dotp stderr (tail):\n%s" % d.log()[-2500:]
    for s in servers:
        if isinstance(s, PlainServer):
            out += "\n--- plain :%d accepted=%d queries=%s" % (
                s.port, s.accepted, [(e["transport"], e["name"], e["qtype"], e["src"][1], e["id"])
                                     for e in s.log][-20:])
        elif isinstance(s, ZoneUnbound):
            out += "\n--- unbound :%d seen=%s" % (s.plain_port, s._all()[s._mark:][-20:])
        else:
            out += "\n--- faultdot :%d %s qlog=%s" % (s.port, s.snapshot(),
                                                     [q for _, _, q in s.qlog][-20:])
    return out


def fd_names(srv):
    """Lower-case names faultdot received, probe-free (in order)."""
    return [q for _, _, q in srv.qlog]


def opt_codes(wire):
    """Option codes of the message's OPT record (None without one)."""
    m = dns.message.from_wire(wire)
    if m.edns < 0:
        return None
    return [int(o.otype) for o in m.options]


# ==========================================================================
# 1. routing: each zone's queries reach only its own server
# ==========================================================================

def test_routing_each_zone_to_its_own_server(dotp_factory, faultdot_factory, plain_factory,
                                             cluster, corp):
    """cluster.local + in-addr/ip6 reverse zones -> plain unbound; corp.example
    -> DoT unbound; b.example and a.b.example -> two Python plain servers;
    everything else -> the default (faultdot). Each query is sent once
    (no cache) and must reach exactly its server, once, and no other:
    longest match (a.b.example, host.a.b.example -> a.b server;
    xa.b.example, b.example -> b server), question case ignored
    (MY-SVC.Default.SVC.Cluster.LOCAL -> cluster), label-wise match
    (xcluster.local, xcorp.example, local -> default), reverse zones (PTR
    of 10.96.5.5, and of fd00:10:96::5 under ip6.arpa)."""
    default = faultdot_factory(["normal"])
    b = plain_factory(addr="10.2.0.2")
    ab = plain_factory(addr="10.3.0.3")
    d = start(dotp_factory, default, [
        "cluster.local,in-addr.arpa,ip6.arpa=" + dns_spec(cluster),
        "corp.example=" + dot_spec(corp),
        "b.example=" + dns_spec(b),
        "a.b.example=" + dns_spec(ab),
    ])
    c = lambda: ctx(d, cluster, corp, b, ab, default)   # noqa: E731
    bad = []

    def check(name, rdtype, rc_want, want, tcp=False):
        try:
            a = ask(d, name, rdtype, tcp=tcp)
        except OSError as e:
            bad.append("%s %s: no answer (%s)" % (name, rdtype, e))
            return
        got = (rcode(a), rdata(a))
        if got != (rc_want, want):
            bad.append("%s %s: got rcode %d %s, want rcode %d %s" % (
                name, rdtype, got[0], got[1], rc_want, want))

    check(MY_SVC, "A", NOERROR, [MY_SVC_A])
    check("MY-SVC.Default.SVC.Cluster.LOCAL", "A", NOERROR, [MY_SVC_A])
    check("kube-dns.kube-system.svc.cluster.local", "A", NOERROR, ["10.96.0.10"], tcp=True)
    check("nope.cluster.local", "A", NXDOMAIN, [])
    check(PTR_V4, "PTR", NOERROR, [MY_SVC + "."])
    check(PTR_V6, "PTR", NOERROR, [MY_SVC_V6 + "."])
    check("www.corp.example", "A", NOERROR, [CORP_A])
    check("WWW.Corp.Example", "A", NOERROR, [CORP_A], tcp=True)
    check("b.example", "A", NOERROR, ["10.2.0.2"])
    check("host.b.example", "A", NOERROR, ["10.2.0.2"])
    check("xa.b.example", "A", NOERROR, ["10.2.0.2"])
    check("a.b.example", "A", NOERROR, ["10.3.0.3"])
    check("host.a.b.example", "A", NOERROR, ["10.3.0.3"])
    check("Deep.Host.A.B.Example", "A", NOERROR, ["10.3.0.3"])
    for n in ("xcluster.local", "local", "xcorp.example", "www.example.test", "example"):
        check(n, "A", NOERROR, [expected_a(n)])
    assert not bad, "wrong answers:\n  %s%s" % ("\n  ".join(bad), c())

    # counted at the servers
    want = {
        "cluster": sorted([MY_SVC, MY_SVC, "kube-dns.kube-system.svc.cluster.local",
                           "nope.cluster.local", PTR_V4, PTR_V6]),
        "corp": ["www.corp.example", "www.corp.example"],
        "b": sorted(["b.example", "host.b.example", "xa.b.example"]),
        "ab": sorted(["a.b.example", "host.a.b.example", "deep.host.a.b.example"]),
        "default": sorted(["xcluster.local", "local", "xcorp.example", "www.example.test",
                           "example"]),
    }
    got = {
        "cluster": sorted(cluster.names()),
        "corp": sorted(corp.names(settle=0)),
        "b": sorted(b.names()),
        "ab": sorted(ab.names()),
        "default": sorted(fd_names(default)),
    }
    wrong = ["%s: got %s, want %s" % (k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not wrong, "queries reached the wrong servers:\n  %s%s" % ("\n  ".join(wrong), c())
    proc, ups = exit_info(d)
    # per-upstream exit lines exist for forward servers too (label ADDR:PORT)
    for label, n in (("127.0.0.1:%d" % cluster.plain_port, 6),
                     ("127.0.0.1:%d" % corp.tls_port, 2),
                     ("127.0.0.1:%d" % b.port, 3), ("127.0.0.1:%d" % ab.port, 3),
                     ("127.0.0.1:%d" % default.port, 5)):
        assert label in ups, "no 'upstream summary' exit line for %s: %s\n%s" % (
            label, sorted(ups), d.log()[-3000:])
        assert ups[label].get("answered") == n, "upstream %s: %s (want answered=%d)" % (
            label, ups[label], n)


def test_real_servers_answer_as_directly(dotp_factory, upstream, cluster, corp):
    """With the session DoT upstream as -u, the plain cluster unbound and
    the DoT corp unbound as forward zones: every answer through dotp (UDP
    and TCP) equals the answering server's own (after the ID and any
    padding): cluster.local names, PTRs, corp.example MX, example.test
    names from the default."""
    d = start(dotp_factory, upstream, [
        "cluster.local,in-addr.arpa,ip6.arpa=" + dns_spec(cluster),
        "corp.example=" + dot_spec(corp)], cache=True)
    cases = [(MY_SVC, "A", cluster), (MY_SVC_V6, "AAAA", cluster), (PTR_V4, "PTR", cluster),
             (PTR_V6, "PTR", cluster), ("nope.default.svc.cluster.local", "A", cluster),
             ("corp.example", "MX", corp), ("www.corp.example", "A", corp),
             ("www.example.test", "A", upstream), ("example.test", "MX", upstream),
             ("alias.example.test", "A", upstream)]
    bad = []
    for i, (name, rdtype, srv) in enumerate(cases):
        for tcp in (False, True):
            q = make_query(name, rdtype, qid=100 + i, edns=True)
            want = zero_id(strip_padding(srv.direct(q, tcp=tcp)))
            try:
                a = (tcp_exchange if tcp else udp_exchange)(d.host, d.port, q, timeout=3)
            except OSError as e:
                bad.append("%s %s tcp=%s: no answer (%s)" % (name, rdtype, tcp, e))
                continue
            # TTLs of the cache may count down; compare with TTLs masked
            got = dns.message.from_wire(a)
            exp = dns.message.from_wire(want)
            for m in (got, exp):
                m.id = 0
                for sec in (m.answer, m.authority, m.additional):
                    for rr in sec:
                        rr.ttl = 0
            if got.to_text() != exp.to_text():
                bad.append("%s %s tcp=%s:\n got %s\n want %s" % (
                    name, rdtype, tcp, got.to_text(), exp.to_text()))
    assert not bad, "\n".join(bad) + ctx(d, cluster, corp)


def test_zone_in_config_case_and_trailing_dot(dotp_factory, faultdot_factory, plain_factory):
    """ZONE is case-insensitive with an optional trailing dot:
    'Cluster.Local.' catches my-svc.default.svc.cluster.local (and not
    xcluster.local, which goes to the default)."""
    default = faultdot_factory(["normal"])
    p = plain_factory(addr="10.96.5.5")
    d = start(dotp_factory, default, ["Cluster.Local.=" + dns_spec(p)])
    a = ask(d, MY_SVC)
    assert rdata(a) == ["10.96.5.5"], describe(a) + ctx(d, p, default)
    a = ask(d, "xcluster.local")
    assert rdata(a) == [expected_a("xcluster.local")], describe(a) + ctx(d, p, default)
    assert p.names() == [MY_SVC], ctx(d, p, default)
    assert fd_names(default) == ["xcluster.local"], ctx(d, p, default)


def test_forward_dot_zone_is_default(dotp_factory, upstream):
    """--forward .=SERVER without -u: '.' is the default zone."""
    d = start(dotp_factory, None, [".=" + dot_spec(upstream)])
    q = make_query("www.example.test", "A", qid=7)
    a = udp_exchange(d.host, d.port, q, timeout=3)
    assert zero_id(strip_padding(a)) == zero_id(strip_padding(upstream.direct(q, tcp=False))), \
        describe(a) + d.log()[-2000:]


def test_env_forward_entries(dotp_factory, faultdot_factory, plain_factory):
    """DOTP_FORWARD: entries separated by ';' and by newlines, white space
    around them ignored, several zones per entry; the routes work as with
    --forward."""
    default = faultdot_factory(["normal"])
    p1 = plain_factory(addr="10.4.0.1")
    p2 = plain_factory(addr="10.4.0.2")
    p3 = plain_factory(addr="10.4.0.3")
    env = {"DOTP_FORWARD": "  one.test=%s ;\n two.test,dos.test=%s\n\t;three.test=%s  \n" % (
        dns_spec(p1), dns_spec(p2), dns_spec(p3))}
    d = start(dotp_factory, default, [], env=env)
    for name, want in (("a.one.test", "10.4.0.1"), ("two.test", "10.4.0.2"),
                       ("x.dos.test", "10.4.0.2"), ("three.test", "10.4.0.3"),
                       ("four.test", expected_a("four.test"))):
        a = ask(d, name)
        assert rdata(a) == [want], "%s: %s%s" % (name, describe(a), ctx(d, p1, p2, p3, default))
    assert p1.names() == ["a.one.test"] and p3.names() == ["three.test"], ctx(d, p1, p2, p3)
    assert sorted(p2.names()) == ["two.test", "x.dos.test"], ctx(d, p1, p2, p3)
    assert fd_names(default) == ["four.test"], ctx(d, default)


def test_several_entries_in_one_value(dotp_factory, faultdot_factory, plain_factory):
    """One --forward value may hold several ';'-separated entries."""
    default = faultdot_factory(["normal"])
    p1 = plain_factory(addr="10.5.0.1")
    p2 = plain_factory(addr="10.5.0.2")
    d = start(dotp_factory, default, ["one.test=%s;two.test=%s" % (dns_spec(p1), dns_spec(p2))])
    assert rdata(ask(d, "x.one.test")) == ["10.5.0.1"], ctx(d, p1, p2)
    assert rdata(ask(d, "x.two.test")) == ["10.5.0.2"], ctx(d, p1, p2)
    assert p1.names() == ["x.one.test"] and p2.names() == ["x.two.test"], ctx(d, p1, p2)


def test_ipv6_plain_server(dotp_factory, faultdot_factory, plain_factory):
    """dns://[::1]:PORT: a plain server on IPv6 loopback."""
    default = faultdot_factory(["normal"])
    p = plain_factory(host="::1", addr="10.6.0.6")
    d = start(dotp_factory, default, ["six.test=dns://[::1]:%d" % p.port])
    a = ask(d, "v6.six.test")
    assert rdata(a) == ["10.6.0.6"], describe(a) + ctx(d, p)
    assert p.names() == ["v6.six.test"], ctx(d, p)


def test_forward_answers_cached(dotp_factory, faultdot_factory, plain_factory):
    """Forward zones use the same cache: a repeat is not asked again."""
    default = faultdot_factory(["normal"])
    p = plain_factory(addr="10.7.0.7", ttl=300)
    d = start(dotp_factory, default, ["cached.test=" + dns_spec(p)], cache=True)
    for i in range(3):
        a = ask(d, "x.cached.test", qid=0x100 + i)
        assert rdata(a) == ["10.7.0.7"], describe(a) + ctx(d, p)
    assert len(p.queries()) == 1, "a cached answer was asked again" + ctx(d, p)


# ==========================================================================
# plain UDP: fresh port and random ID per query, no padding
# ==========================================================================

def test_plain_fresh_port_random_id_no_padding(dotp_factory, faultdot_factory, plain_factory):
    """150 queries (client ID always 0x4242, with EDNS) leave for the plain
    server over UDP each with its own random ID (not the client's), from a
    pool of sockets on random ports where a socket carries at most 64
    queries (DOTP_DGRAM_USES) before a new one, on a new random port, takes
    over; none carries an EDNS Padding option (queries to plain servers are
    not padded)."""
    default = faultdot_factory(["normal"])
    p = plain_factory(addr="10.8.0.8")
    d = start(dotp_factory, default, ["rand.test=" + dns_spec(p)])
    n = 150
    for i in range(n):
        a = ask(d, "n%d.rand.test" % i, qid=0x4242, edns=True)
        assert rdata(a, "A") == ["10.8.0.8"], describe(a) + ctx(d, p)
    qs = p.queries("udp")
    assert len(qs) == n, ctx(d, p)
    ports = [e["src"][1] for e in qs]
    per_port = {x: ports.count(x) for x in set(ports)}
    ids = [e["id"] for e in qs]
    assert len(per_port) >= 3 and max(per_port.values()) <= 64, (
        "a source port carried more than 64 queries: %s" % per_port)
    distinct = sorted(per_port)
    gaps = {(b - a) for a, b in zip(distinct, distinct[1:])}
    assert len(gaps) > 1, "ports in a sequence: %s" % distinct
    assert len(set(ids)) >= n - 3 and ids.count(0x4242) <= 1, "IDs not random: %s" % ids
    steps = {(ids[i + 1] - ids[i]) & 0xFFFF for i in range(len(ids) - 1)}
    assert len(steps) > 3, "IDs follow a sequence: %s" % ids
    padded = [e["name"] for e in qs if OPT_PADDING in (opt_codes(e["wire"]) or [])]
    assert not padded, "queries to a plain server carry EDNS padding: %s" % padded


# ==========================================================================
# 2. truncation: TC over UDP -> TCP retry
# ==========================================================================

def test_tc_retry_real_unbound(dotp_factory, faultdot_factory, cluster):
    """many.default.svc.cluster.local has 100 A records (~1650 bytes): the
    cluster unbound answers it TC over UDP (checked directly first). Through
    dotp (no cache) a TCP client without EDNS, and a UDP client with EDNS
    payload 4096 (dotp --udp-size 4096), each get all 100 records, TC
    clear; exit line: truncated_retries=2."""
    direct = cluster.direct(make_query(MANY, "A", qid=9, edns=True, payload=4096), tcp=False)
    assert tc_bit(direct), "set-up: unbound did not truncate over UDP: " + describe(direct)
    cluster.mark()
    default = faultdot_factory(["normal"])
    d = start(dotp_factory, default, ["cluster.local=" + dns_spec(cluster)],
              extra=["--udp-size", "4096"])
    a = ask(d, MANY, tcp=True, qid=21)
    assert not tc_bit(a) and rdata(a, "A") == sorted(MANY_ADDRS), (
        "TCP client: %d records, TC=%s%s" % (len(rdata(a)), tc_bit(a), ctx(d, cluster)))
    a = ask(d, MANY, tcp=False, qid=22, edns=True, payload=4096)
    assert not tc_bit(a) and rdata(a, "A") == sorted(MANY_ADDRS), (
        "UDP client (payload 4096): %d records, TC=%s%s" % (len(rdata(a)), tc_bit(a),
                                                            ctx(d, cluster)))
    assert cluster.names() == [MANY] * 4, "want 2 x (UDP, then TCP)" + ctx(d, cluster)
    proc, _ = exit_info(d)
    assert proc.get("truncated_retries") == 2, "exit line: %s" % proc


def test_tc_retry_reuses_one_tcp_connection(dotp_factory, faultdot_factory, plain_factory):
    """A Python server answers every UDP query TC (empty) and over TCP
    with 60 A records, 150 ms late. 6 distinct queries sent at once (UDP,
    EDNS 4096, dotp --udp-size 4096, no cache): each gets the whole 60
    records; each went once over UDP and once over TCP; the 6 TCP retries
    share ONE accepted connection, pipelined (more than one in flight at
    once); exit line truncated_retries=6."""
    default = faultdot_factory(["normal"])
    p = plain_factory(tc_udp=True, big_n=60, tcp_delay=0.15)
    d = start(dotp_factory, default, ["tc.test=" + dns_spec(p)], extra=["--udp-size", "4096"])
    names = ["q%d.tc.test" % i for i in range(6)]
    socks = []
    for i, n in enumerate(names):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((d.host, d.port))
        s.send(make_query(n, "A", qid=0x500 + i, edns=True, payload=4096))
        socks.append(s)
    bad = []
    for i, s in enumerate(socks):
        try:
            a = s.recv(65535)
            if tc_bit(a) or len(rdata(a, "A")) != 60:
                bad.append("%s: TC=%s, %d records" % (names[i], tc_bit(a), len(rdata(a, "A"))))
        except OSError as e:
            bad.append("%s: no answer (%s)" % (names[i], e))
        s.close()
    assert not bad, "\n".join(bad) + ctx(d, p)
    assert sorted(p.names("udp")) == sorted(names), ctx(d, p)
    assert sorted(p.names("tcp")) == sorted(names), ctx(d, p)
    assert p.accepted == 1, "%d TCP connections for 6 truncated queries (want 1)%s" % (
        p.accepted, ctx(d, p))
    assert p.max_inflight >= 2, "TCP queries not pipelined (max in flight %d)%s" % (
        p.max_inflight, ctx(d, p))
    # a later truncated query reuses the connection as well
    a = ask(d, "later.tc.test", edns=True, payload=4096)
    assert len(rdata(a, "A")) == 60, describe(a)
    assert p.accepted == 1, "the later retry opened another connection%s" % ctx(d, p)
    proc, _ = exit_info(d)
    assert proc.get("truncated_retries") == 7, "exit line: %s" % proc


# ==========================================================================
# 3. spoofing
# ==========================================================================

SPOOF_OK = "10.9.9.9"


def _spoof_hook(srv, sock, wire, src):
    """For one query: from ANOTHER port a well-formed answer with the
    right ID and question; from the right port one with a wrong ID; then
    one with the right ID for another question; then the right answer.
    Each wrong one carries an A record of its own (10.66.0.x)."""
    q = dns.message.from_wire(wire)

    def ans(addr, name=None, qid=None):
        m = dns.message.make_query(name or q.question[0].name, "A", use_edns=q.edns >= 0)
        m.id = q.id if qid is None else qid
        r = dns.message.make_response(m)
        r.flags |= dns.flags.AA
        r.answer.append(dns.rrset.from_text(r.question[0].name, 60, "IN", "A", addr))
        return r.to_wire()

    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    wrong_name = dns.name.from_text("x" + q.question[0].name.to_text())

    def go():
        try:
            other.sendto(ans("10.66.0.1"), src)
            time.sleep(0.03)
            sock.sendto(ans("10.66.0.2", qid=(q.id + 0x1111) & 0xFFFF), src)
            time.sleep(0.03)
            sock.sendto(ans("10.66.0.3", name=wrong_name), src)
            time.sleep(0.03)
            sock.sendto(ans(SPOOF_OK), src)
        except OSError as e:
            srv.errors.append(repr(e))
        finally:
            other.close()
    threading.Thread(target=go, daemon=True).start()


def test_spoofed_datagrams_dropped_and_counted(dotp_factory, faultdot_factory, plain_factory):
    """A plain server that, before the right answer, sends an answer from
    another port, one with a wrong ID and one for another question: the
    client gets the right answer (A 10.9.9.9, within the attempt timeout:
    the query was sent once), and the exit line says spoofed=3."""
    default = faultdot_factory(["normal"])
    p = plain_factory(udp_hook=_spoof_hook)
    d = start(dotp_factory, default, ["spoof.test=" + dns_spec(p)])
    t = time.monotonic()
    a = ask(d, "www.spoof.test", qid=0x3131)
    took = time.monotonic() - t
    assert rcode(a) == NOERROR and rdata(a) == [SPOOF_OK], describe(a) + ctx(d, p)
    assert took < 0.7, "answered after %.2f s" % took
    assert len(p.queries()) == 1, "the query was re-sent%s" % ctx(d, p)
    proc, _ = exit_info(d)
    assert proc.get("spoofed") == 3, "exit line: %s (want spoofed=3)" % proc


def test_spoofed_from_other_address_same_port(dotp_factory, faultdot_factory, plain_factory):
    """An answer from the server's port on ANOTHER address (127.0.0.2),
    right ID and question, sent before the real one: dropped (the client
    gets the real answer), spoofed=1 on exit."""
    def hook(srv, sock, wire, src):
        q = dns.message.from_wire(wire)

        def ans(addr):
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", addr))
            return r.to_wire()

        def go():
            o = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                o.bind(("127.0.0.2", srv.port))
                o.sendto(ans("10.66.0.9"), src)
                time.sleep(0.05)
                sock.sendto(ans(SPOOF_OK), src)
            except OSError as e:
                srv.errors.append(repr(e))
            finally:
                o.close()
        threading.Thread(target=go, daemon=True).start()

    default = faultdot_factory(["normal"])
    p = plain_factory(udp_hook=hook)
    d = start(dotp_factory, default, ["spoof2.test=" + dns_spec(p)])
    a = ask(d, "www.spoof2.test")
    assert rdata(a) == [SPOOF_OK], describe(a) + ctx(d, p)
    assert len(p.queries()) == 1, "the query was re-sent%s" % ctx(d, p)
    proc, _ = exit_info(d)
    assert proc.get("spoofed") == 1, "exit line: %s (want spoofed=1)" % proc


# ==========================================================================
# 4. failover between two plain servers
# ==========================================================================

def test_failover_silent_first_plain_server(dotp_factory, faultdot_factory, plain_factory):
    """Zone with two plain servers, the first silent (binds UDP and TCP,
    never answers). --attempt-timeout 300: the first query reaches the
    silent one, is re-sent to the second (from another port, with another
    ID) and answered within 0.3 + 0.3 s; the following 10 queries (well
    inside the 1 s back-off) go straight to the second (< 200 ms each,
    none reaches the silent one)."""
    default = faultdot_factory(["normal"])
    silent = plain_factory(silent=True)
    second = plain_factory(addr="10.10.0.2")
    d = start(dotp_factory, default, ["fo.test=%s,%s" % (dns_spec(silent), dns_spec(second))],
              extra=["--attempt-timeout", "300", "--timeout", "3000"])
    c = lambda: ctx(d, silent, second)   # noqa: E731
    t = time.monotonic()
    a = ask(d, "first.fo.test")
    took = time.monotonic() - t
    assert rdata(a) == ["10.10.0.2"], describe(a) + c()
    assert took < 0.6, "first answer after %.3f s (bound 0.6 s)%s" % (took, c())
    s1, s2 = silent.queries(name="first.fo.test"), second.queries(name="first.fo.test")
    assert len(s1) >= 1, "the silent (first) server never got the query" + c()
    assert len(s2) == 1, c()
    before = len(silent.queries())
    slow = []
    for i in range(10):
        t = time.monotonic()
        a = ask(d, "after%d.fo.test" % i)
        took = time.monotonic() - t
        assert rdata(a) == ["10.10.0.2"], describe(a) + c()
        if took > 0.2:
            slow.append(round(took, 3))
    assert not slow, "queries not sent straight to the second: %s%s" % (slow, c())
    assert len(silent.queries()) == before, "queries went to the server marked down" + c()


def test_failover_resend_new_id(dotp_factory, faultdot_factory, plain_factory):
    """The re-send after the attempt timeout (RFC 5452): the query the
    second server gets carries another random ID than the one the silent
    first server got."""
    default = faultdot_factory(["normal"])
    silent = plain_factory(silent=True)
    second = plain_factory(addr="10.12.0.2")
    d = start(dotp_factory, default, ["fo3.test=%s,%s" % (dns_spec(silent), dns_spec(second))],
              extra=["--attempt-timeout", "300", "--timeout", "3000"])
    a = ask(d, "first.fo3.test")
    assert rdata(a) == ["10.12.0.2"], describe(a) + ctx(d, silent, second)
    s1, s2 = silent.queries(name="first.fo3.test"), second.queries(name="first.fo3.test")
    assert len(s1) == 1 and len(s2) == 1, ctx(d, silent, second)
    # The port may be the same (a socket of the pool carries up to 64
    # queries); the ID must not be.
    assert s2[0]["id"] != s1[0]["id"], (
        "re-send with the same ID %d (first server got ID %d, second ID %d)%s" % (
            s2[0]["id"], s1[0]["id"], s2[0]["id"], ctx(d, silent, second)))


def test_failover_default_attempt_timeout_and_retry_after_backoff(
        dotp_factory, faultdot_factory, plain_factory):
    """No --attempt-timeout: the first query moves on from the silent
    first server after the initial 750 ms (answered in 0.6..1.2 s). After
    the back-off (1 s) the silent server is tried again (it gets a query),
    and the query is still answered by the second."""
    default = faultdot_factory(["normal"])
    silent = plain_factory(silent=True)
    second = plain_factory(addr="10.11.0.2")
    d = start(dotp_factory, default, ["fo2.test=%s,%s" % (dns_spec(silent), dns_spec(second))],
              extra=["--timeout", "4000"])
    c = lambda: ctx(d, silent, second)   # noqa: E731
    t = time.monotonic()
    a = ask(d, "first.fo2.test", timeout=4)
    took = time.monotonic() - t
    assert rdata(a) == ["10.11.0.2"], describe(a) + c()
    assert 0.6 < took < 1.2, "first answer after %.3f s (want 0.6..1.2 s)%s" % (took, c())
    time.sleep(1.3)      # past the 1 s back-off
    before = len(silent.queries())
    a = ask(d, "again.fo2.test", timeout=4)
    assert rdata(a) == ["10.11.0.2"], describe(a) + c()
    assert len(silent.queries()) > before, "silent server not tried again after its back-off" + c()


def test_all_plain_servers_silent_servfail(dotp_factory, faultdot_factory, plain_factory):
    """Both servers of a zone silent: SERVFAIL within --timeout (1500 ms)
    + margin; the default zone is unaffected."""
    default = faultdot_factory(["normal"])
    s1 = plain_factory(silent=True)
    s2 = plain_factory(silent=True)
    d = start(dotp_factory, default, ["dead.test=%s,%s" % (dns_spec(s1), dns_spec(s2))],
              extra=["--timeout", "1500", "--attempt-timeout", "300"])
    t = time.monotonic()
    a = ask(d, "x.dead.test", timeout=4)
    took = time.monotonic() - t
    assert rcode(a) == SERVFAIL, describe(a)
    assert took < 2.0, "SERVFAIL after %.2f s" % took
    assert s1.queries() and s2.queries(), ctx(d, s1, s2)
    n = len(s1.queries()) + len(s2.queries())
    assert n == 3, "%d sends for one query (want its 3 tries)%s" % (n, ctx(d, s1, s2))
    a = ask(d, "ok.example.test")
    assert rdata(a) == [expected_a("ok.example.test")], describe(a)


# ==========================================================================
# 5. the start line
# ==========================================================================

def _start_line(d):
    text = d.wait_log("dotp listening", timeout=2) or ""
    lines = [l for l in text.splitlines() if "dotp listening" in l]
    assert lines, "no start line:\n" + d.log()
    return lines[0]


def test_start_line_zones_field(dotp_factory, ports):
    """The start line carries zones="...": forward zones in the order
    given, each 'ZONE=SERVERS (plain, unencrypted)' or '(tls)', servers of
    a zone joined by ',', then '.'."""
    pc, pc2, pt, pd = ports.get(), ports.get(), ports.get(), ports.get()
    d = start(dotp_factory, "127.0.0.1:%d#dot.test" % pd, [
        "cluster.local=dns://127.0.0.1:%d,dns://127.0.0.1:%d" % (pc, pc2),
        "corp.example=127.0.0.1:%d#dot.test" % pt])
    line = _start_line(d)
    want = ('zones="cluster.local=dns://127.0.0.1:%d,dns://127.0.0.1:%d (plain, unencrypted); '
            'corp.example=127.0.0.1:%d#dot.test (tls); .=127.0.0.1:%d#dot.test (tls)"'
            % (pc, pc2, pt, pd))
    assert want in line, "start line:\n%s\nwant the field:\n%s" % (line, want)
    assert "level=info" in line, line


def test_start_line_zones_spec_example(dotp_factory, ports):
    """The spec's example, ports aside; a forward zone listed before '.'
    also when '.' comes from -u given first."""
    p1, p2, p3 = ports.get(), ports.get(), ports.get()
    d = start(dotp_factory, "127.0.0.1:%d#dot.test" % p3, [
        "cluster.local=dns://127.0.0.1:%d" % p1, "corp.example=127.0.0.1:%d#dot.test" % p2])
    line = _start_line(d)
    want = ('zones="cluster.local=dns://127.0.0.1:%d (plain, unencrypted); '
            'corp.example=127.0.0.1:%d#dot.test (tls); .=127.0.0.1:%d#dot.test (tls)"'
            % (p1, p2, p3))
    assert want in line, "start line:\n%s\nwant the field:\n%s" % (line, want)


# ==========================================================================
# 6. bad values exit 2 with one line naming the value
# ==========================================================================

LONG_LABEL = "a" * 64 + ".example"
LONG_NAME = ".".join(["b" * 63] * 4)          # 255 characters

BAD_VALUES = [
    ("empty zone", ["=dns://127.0.0.1"], "=dns://127.0.0.1"),
    ("empty label", ["a..b=dns://127.0.0.1"], "a..b=dns://127.0.0.1"),
    ("label > 63", [LONG_LABEL + "=dns://127.0.0.1"], LONG_LABEL + "=dns://127.0.0.1"),
    ("name > 253", [LONG_NAME + "=dns://127.0.0.1"], LONG_NAME + "=dns://127.0.0.1"),
    ("bad char !", ["a!b.example=dns://127.0.0.1"], "a!b.example=dns://127.0.0.1"),
    ("bad char *", ["*.example=dns://127.0.0.1"], "*.example=dns://127.0.0.1"),
    ("bad char /", ["a/b.example=dns://127.0.0.1"], "a/b.example=dns://127.0.0.1"),
    ("bad char space", ["a b.example=dns://127.0.0.1"], "a b.example=dns://127.0.0.1"),
    ("mapped to nothing", ["a.example="], "a.example="),
    ("no =", ["a.example"], "a.example"),
    ("bare address", ["a.example=127.0.0.1"], "a.example=127.0.0.1"),
    ("bare address with port", ["a.example=127.0.0.1:53"], "a.example=127.0.0.1:53"),
    ("bad address", ["a.example=dns://nothost"], "a.example=dns://nothost"),
    ("bad port", ["a.example=dns://127.0.0.1:70000"], "a.example=dns://127.0.0.1:70000"),
    ("empty dns://", ["a.example=dns://"], "a.example=dns://"),
    ("mixed kinds", ["a.example=dns://127.0.0.1,127.0.0.1:853#dot.test"],
     "a.example=dns://127.0.0.1,127.0.0.1:853#dot.test"),
    ("mixed kinds tls first", ["a.example=127.0.0.1:853#dot.test,dns://127.0.0.1"],
     "a.example=127.0.0.1:853#dot.test,dns://127.0.0.1"),
    ("same zone twice", ["a.example=dns://127.0.0.1", "a.example=dns://127.0.0.2"],
     "a.example=dns://127.0.0.2"),
    ("same zone, case and dot", ["a.example=dns://127.0.0.1", "A.Example.=dns://127.0.0.2"],
     "A.Example.=dns://127.0.0.2"),
    ("same zone in one entry", ["a.example,a.example=dns://127.0.0.1"],
     "a.example,a.example=dns://127.0.0.1"),
    ("same zone across entries of one value", ["a.example=dns://127.0.0.1;A.EXAMPLE=dns://127.0.0.2"],
     "A.EXAMPLE=dns://127.0.0.2"),
    ("too many servers", ["a.example=" + ",".join("dns://127.0.0.%d" % i for i in range(1, 10))],
     "a.example=" + ",".join("dns://127.0.0.%d" % i for i in range(1, 10))),
    ("too many zones", [",".join("z%d.example" % i for i in range(32)) + "=dns://127.0.0.1",
                        "z32.example=dns://127.0.0.2"], "z32.example=dns://127.0.0.2"),
    ("too many forward servers", [
        "s%d.example=%s" % (z, ",".join("dns://127.0.0.%d" % (i + 1) for i in range(8)))
        for z in range(3)] + ["s3.example=dns://127.0.0.9"], "s3.example=dns://127.0.0.9"),
]


def _one_error_line(p, flag, needle):
    found = [m for m in SANITIZER_MARKERS if m in p.stderr]
    assert not found, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, "exit status %s (want 2)\nstderr:\n%s" % (p.returncode, p.stderr)
    assert len(lines) == 1, "want ONE line on stderr, got %d:\n%s" % (len(lines), p.stderr)
    line = lines[0]
    assert line.startswith('level=error msg="bad %s value \'' % flag), (
        "want level=error msg=\"bad %s value '...': ...; expected ...\", got:\n%s" % (flag, line))
    m = re.match(r'level=error msg="bad %s value \'(.*)\': (.+); expected .+"' % re.escape(flag),
                 line)
    assert m, "line not of the form level=error msg=\"bad %s value 'VALUE': WHY; expected ...\":\n%s" % (
        flag, line)
    assert needle in m.group(1), "the value named (%r) is not the bad one (%r):\n%s" % (
        m.group(1), needle, line)
    return line


@pytest.mark.parametrize("case,values,needle", BAD_VALUES, ids=[c for c, _, _ in BAD_VALUES])
def test_bad_forward_value(pki, ports, case, values, needle):
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
                  "--ca-file", str(pki.ca_pem)] + fwd(*values), timeout=5)
    _one_error_line(p, "--forward", needle)


@pytest.mark.parametrize("case,values,needle", BAD_VALUES, ids=[c for c, _, _ in BAD_VALUES])
def test_bad_env_forward_value(pki, ports, case, values, needle):
    p = run_dotp([], env={"DOTP_LISTEN": "127.0.0.1:%d" % ports.get(),
                          "DOTP_UPSTREAM": "127.0.0.1:853#dot.test",
                          "DOTP_CA_FILE": str(pki.ca_pem),
                          "DOTP_FORWARD": ";".join(values)}, timeout=5)
    _one_error_line(p, "DOTP_FORWARD", needle)


def test_u_and_forward_dot_exit_2(pki, ports):
    """-u and --forward .=... both set the default zone: exit 2, one line."""
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
                  "--ca-file", str(pki.ca_pem), "--forward", ".=127.0.0.1:8853#dot.test"],
                 timeout=5)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, "exit status %s (want 2)\n%s" % (p.returncode, p.stderr)
    assert len(lines) == 1 and "level=error" in lines[0], p.stderr


def _bounds_entries(real_port):
    """32 zones, 24 forward servers: two entries of 8 servers, and one
    entry of 30 zones sharing 8 (the first of them a real server on
    real_port, the others addresses where nothing listens)."""
    entries = ["s%d.example=%s" % (z, ",".join("dns://127.0.%d.%d:53" % (z, i + 1)
                                               for i in range(8)))
               for z in range(2)]
    many = ["z.example"] + ["z%d.example" % i for i in range(29)]
    servers = ["dns://127.0.0.1:%d" % real_port] + \
        ["dns://127.0.9.%d:53" % (i + 1) for i in range(7)]
    entries.append("%s=%s" % (",".join(many), ",".join(servers)))
    return entries, ["s0.example", "s1.example"] + many


def test_bounds_accepted(dotp_factory, faultdot_factory, plain_factory):
    """At the bounds dotp starts and routes: 32 zones (DOTP_MAX_ZONES), 8
    servers in a zone, 24 forward servers in all; a query for the 30th
    zone of the shared entry reaches its (first) server."""
    default = faultdot_factory(["normal"])
    p = plain_factory(addr="10.13.0.1")
    entries, _ = _bounds_entries(p.port)
    d = start(dotp_factory, default, entries)
    a = ask(d, "x.z28.example")
    assert rdata(a) == ["10.13.0.1"], describe(a) + ctx(d, p, default)
    assert p.names() == ["x.z28.example"], ctx(d, p, default)


def test_start_line_lists_every_zone_at_bounds(dotp_factory, ports):
    """With 32 zones and 24 servers the start line still lists every
    zone (in order, then '.'), the field closed, and the fields after it."""
    entries, zones = _bounds_entries(ports.get())
    pd = ports.get()
    d = start(dotp_factory, "127.0.0.1:%d#dot.test" % pd, entries)
    line = _start_line(d)
    m = re.search(r'zones="([^"]*)"', line)
    assert m, "no complete zones=\"...\" field (%d bytes line):\n%s" % (len(line), line)
    got = [e.split("=", 1)[0].strip() for e in m.group(1).split(";")]
    assert got == zones + ["."], "zones listed: %s\nwant: %s" % (got, zones + ["."])
    assert "timeout_ms=" in line, "fields after zones= lost:\n" + line


# ==========================================================================
# 7. pod-shaped: glibc resolver, ndots:5, Kubernetes search list
# ==========================================================================

POD_RESOLV = ("nameserver 127.0.0.1\n"
              "search default.svc.cluster.local svc.cluster.local cluster.local\n"
              "options ndots:5\n")


def _can_unshare_mount():
    try:
        p = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && true"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "unshare -m failed: %s" % e
    if p.returncode != 0:
        return "unshare -m impossible here (exit %d): %s" % (p.returncode, p.stdout.strip())
    return None


def _getent_in_pod(tmp_path, name, resolv=POD_RESOLV):
    """getent ahosts NAME with a private resolv.conf (and, if /etc's hosts
    line lacks dns, a private nsswitch.conf) bound in a mount namespace."""
    rc = tmp_path / "resolv.conf"
    rc.write_text(resolv)
    script = "mount --make-rprivate / && mount --bind %s /etc/resolv.conf" % rc
    nss = Path("/etc/nsswitch.conf").read_text() if Path("/etc/nsswitch.conf").exists() else ""
    hosts = [l for l in nss.splitlines() if l.strip().startswith("hosts:")]
    if not hosts or "dns" not in hosts[0].split():
        ns = tmp_path / "nsswitch.conf"
        ns.write_text("hosts: files dns\n")
        script += " && mount --bind %s /etc/nsswitch.conf" % ns
    script += " && exec getent ahosts %s" % name
    return subprocess.run(["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=20)


def test_pod_shaped_glibc_resolver(dotp_factory, tmp_path_factory, tmp_path, ports, pki, cluster):
    """dotp on 127.0.0.1:53: cluster.local (and the reverse zones) to the
    plain cluster unbound, '.' to a DoT unbound serving external.test.
    In a mount namespace with the pod's resolv.conf (ndots:5, Kubernetes
    search list), `getent ahosts my-svc` gives 10.96.5.5 (found as
    my-svc.default.svc.cluster.local at the cluster server) and `getent
    ahosts www.external.test` gives 192.0.2.80: its search-list
    expansions (NXDOMAIN) were asked at the cluster server, the name
    itself at the default upstream, which saw no cluster.local name."""
    why = _can_unshare_mount()
    if why:
        pytest.skip(why)
    shutil.which("getent") or pytest.skip("no getent")
    ext = ZoneUnbound(tmp_path_factory.mktemp("unbound-external"), ports.get(),
                      EXTERNAL_ZONES, EXTERNAL_DATA, tls=pki.certs["good-rsa"],
                      tls_port=ports.get())
    try:
        d = start(dotp_factory, ext, ["cluster.local,in-addr.arpa,ip6.arpa=" + dns_spec(cluster)],
                  listen=["127.0.0.1:53"], cache=True)
        p = _getent_in_pod(tmp_path, "my-svc")
        assert p.returncode == 0 and MY_SVC_A in p.stdout.split(), (
            "getent ahosts my-svc: exit %d\n%s%s" % (p.returncode, p.stdout, ctx(d, cluster, ext)))
        assert MY_SVC in p.stdout, p.stdout
        assert MY_SVC in cluster.names(), ctx(d, cluster, ext)

        p = _getent_in_pod(tmp_path, "www.external.test")
        assert p.returncode == 0 and EXTERNAL_A in p.stdout.split(), (
            "getent ahosts www.external.test: exit %d\n%s%s" % (p.returncode, p.stdout,
                                                               ctx(d, cluster, ext)))
        cl = cluster.names()
        for sfx in ("default.svc.cluster.local", "svc.cluster.local", "cluster.local"):
            assert "www.external.test." + sfx in cl, "search expansion %s not at the cluster " \
                "server: %s" % (sfx, cl)
        ex = ext.names(settle=0)
        assert "www.external.test" in ex, ex
        leaked = [n for n in ex if n == "cluster.local" or n.endswith(".cluster.local")]
        assert not leaked, "cluster.local names reached the default upstream: %s" % leaked
    finally:
        ext.stop()


SIDECAR_YAML = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "sidecar.yaml"


def test_deploy_sidecar_manifest(dotp_factory, tmp_path_factory, tmp_path, ports, pki, cluster):
    """The sidecar of deploy/kubernetes/sidecar.yaml (the README's example),
    as a pod would run it: the pod's resolv.conf from its dnsConfig
    (nameservers, searches with the namespace set to default, ndots), dotp
    with the container's args and its DOTP_FORWARD, where only the cluster
    DNS address is replaced by the test's plain cluster server (and
    DOTP_UPSTREAM by a DoT test server: nothing may reach Cloudflare).
    glibc's resolver then finds the short service name and an outside
    name."""
    import yaml
    why = _can_unshare_mount()
    if why:
        pytest.skip(why)
    spec = yaml.safe_load(SIDECAR_YAML.read_text())["spec"]["template"]["spec"]
    dc = spec["dnsConfig"]
    assert spec["dnsPolicy"] == "None" and dc["nameservers"] == ["127.0.0.1"]
    opts = " ".join("%s:%s" % (o["name"], o["value"]) for o in dc["options"])
    resolv = "nameserver 127.0.0.1\nsearch %s\noptions %s\n" % (
        " ".join(dc["searches"]).replace("my-ns.", "default."), opts)
    assert "ndots:5" in resolv and "default.svc.cluster.local" in resolv, resolv
    side = [c for c in spec["containers"] if c["name"] == "dotp"][0]
    env = {e["name"]: e["value"] for e in side["env"]}
    assert "dns://10.96.0.10" in env["DOTP_FORWARD"], env
    fwd_value = env["DOTP_FORWARD"].replace("dns://10.96.0.10", dns_spec(cluster))
    args = side["args"]
    listen = [args[i + 1] for i, a in enumerate(args) if a == "-l"]
    assert "127.0.0.1:53" in listen, args
    ext = ZoneUnbound(tmp_path_factory.mktemp("unbound-external"), ports.get(),
                      EXTERNAL_ZONES, EXTERNAL_DATA, tls=pki.certs["good-rsa"],
                      tls_port=ports.get())
    try:
        d = dotp_factory([], listen=listen, cache=True,
                         env={"DOTP_FORWARD": fwd_value,
                              "DOTP_UPSTREAM": dot_spec(ext)})
        p = _getent_in_pod(tmp_path, "my-svc", resolv)
        assert p.returncode == 0 and MY_SVC_A in p.stdout.split(), (
            "getent ahosts my-svc: exit %d\n%s%s" % (p.returncode, p.stdout, ctx(d, cluster, ext)))
        p = _getent_in_pod(tmp_path, "www.external.test", resolv)
        assert p.returncode == 0 and EXTERNAL_A in p.stdout.split(), (
            "getent ahosts www.external.test: exit %d\n%s%s" % (p.returncode, p.stdout,
                                                               ctx(d, cluster, ext)))
        assert "www.external.test" in ext.names(settle=0)
    finally:
        ext.stop()
