"""Fixtures for the dotp integration suite.

Run through tests/run-integration.sh, which puts the whole run in a private
network namespace (fixed ports never clash, nothing leaves the machine).
"""

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import PKI, Unbound, Dotp, PortAllocator, Relay, BlackHole  # noqa: E402
from harness import Dnsdist, Named, Tls13Server  # noqa: E402


def pytest_report_header(config):
    return "dotp binary: %s (exists: %s)" % (harness.DOTP_BIN,
                                            os.path.exists(harness.DOTP_BIN))


@pytest.fixture(scope="session")
def ports():
    return PortAllocator()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def _unbound_factory(tmp_path_factory, pki, ports, started):
    def make(cert="good-rsa", ipv6=False, tls_port=None):
        c, k = pki.certs[cert]
        u = Unbound(tmp_path_factory.mktemp("unbound-" + cert), c, k,
                    tls_port or ports.get(), ports.get(), ipv6=ipv6)
        started.append(u)
        return u
    return make


@pytest.fixture
def unbound_factory(tmp_path_factory, pki, ports):
    """make(cert='good-rsa', ipv6=False) -> a running unbound DoT server with
    `cert` (a key of PKI.certs). Stopped at teardown."""
    started = []
    yield _unbound_factory(tmp_path_factory, pki, ports, started)
    for u in started:
        u.stop()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, pki, ports):
    """Session-wide good upstream (RSA leaf, EC root) on 127.0.0.1 and ::1."""
    started = []
    u = _unbound_factory(tmp_path_factory, pki, ports, started)("good-rsa", ipv6=True)
    yield u
    for x in started:
        x.stop()


@pytest.fixture
def dotp_factory(tmp_path, pki, ports):
    """start(upstreams=[...], listen=[...], extra=[...], env={}, ca=True,
    probe=True, cache=True) -> a running Dotp.

    cache=False adds --no-cache, for a test of the forwarding engine that
    must see a repeated query reach the upstream (the cache would answer
    it); the answer cache itself is tested in test_cache.py.

    upstreams: list of "HOST:PORT#NAME" strings; listen: list of
    "ADDR:PORT" strings (default: one fresh 127.0.0.1 port). The instance
    gets .port / .host for its first listen address. At teardown every
    instance still running gets SIGTERM and must exit with status 0 and
    without a sanitizer report."""
    started = []

    def start(upstreams=(), listen=None, extra=(), env=None, ca=True,
              probe=True, wait_ports=None, cache=True):
        if listen is None:
            listen = ["127.0.0.1:%d" % ports.get()]
        args = []
        for l in listen:
            args += ["-l", l]
        for u in upstreams:
            args += ["-u", u]
        if ca:
            args += ["--ca-file", str(pki.ca_pem)]
        if not cache:
            args += ["--no-cache"]
        args += list(extra)
        first = listen[0] if listen else None
        host = port = None
        if first:
            host, _, p = first.rpartition(":")
            host = host.strip("[]")
            port = int(p)
        if wait_ports is None:
            wait_ports = [int(l.rpartition(":")[2]) for l in listen]
        d = Dotp(args, tmp_path, env=env, wait_ports=wait_ports,
                 probe=(host, port) if (probe and first) else None)
        d.host, d.port = host, port
        started.append(d)
        return d

    yield start

    problems = []
    for d in started:
        already = d.returncode is not None
        rc = d.stop(signal.SIGTERM)
        if not already and rc != 0:
            problems.append("dotp %s: exit status %r after SIGTERM (want 0)\nstderr:\n%s"
                            % (d.args, rc, d.log()[-4000:]))
        found = d.sanitizer_report()
        if found:
            problems.append("dotp %s: sanitizer report (%s) in stderr:\n%s"
                            % (d.args, ", ".join(found), d.log()[-8000:]))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def proxy(dotp_factory, upstream):
    """A dotp on 127.0.0.1:<fresh port> forwarding to the session upstream."""
    return dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port])


@pytest.fixture
def relay_factory():
    made = []

    def make(listen, target):
        r = Relay(listen, target)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


@pytest.fixture
def blackhole_factory():
    made = []

    def make(listen):
        b = BlackHole(listen)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


@pytest.fixture
def dot_server_factory(tmp_path_factory, pki, ports):
    """make(kind, cert='chain-rsa', protocols=None) -> a running DoT server
    on 127.0.0.1 with .tls_port, .plain_port, .direct(wire, tcp), .logs():

      unbound  the test unbound (Unbound, many=True)
      dnsdist  dnsdist in front of a test unbound's plain port
      named    BIND 9, forward-only to a test unbound's plain port;
               protocols: its tls block's list, e.g. ["TLSv1.3"]

    All of them answer from the same data: harness.ZONE plus every name
    under harness.MANY_ZONE (A harness.MANY_A). `cert` is a key of
    PKI.certs; the server presents that file (leaf + intermediate for the
    chain-* ones). For dnsdist and named, .backend is their unbound.
    Everything is stopped at teardown."""
    started = []

    def make(kind, cert="chain-rsa", protocols=None):
        c, k = pki.certs[cert]
        u = Unbound(tmp_path_factory.mktemp("unbound-" + cert), c, k,
                    ports.get(), ports.get(), many=True)
        started.append(u)
        if kind == "unbound":
            return u
        d = tmp_path_factory.mktemp("%s-%s" % (kind, cert))
        if kind == "dnsdist":
            srv = Dnsdist(d, c, k, ports.get(), ports.get(), u.plain_port)
        elif kind == "named":
            srv = Named(d, c, k, ports.get(), ports.get(), u.plain_port,
                        protocols=protocols)
        else:
            raise ValueError("unknown DoT server kind %r" % kind)
        srv.backend = u
        started.append(srv)
        return srv

    yield make
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def tls13_server_factory(pki, ports):
    """make(cert='chain-ec') -> a running harness.Tls13Server (TLS 1.3
    only) on 127.0.0.1:<fresh port>, its port in .port. Closed at
    teardown."""
    made = []

    def make(cert="chain-ec"):
        c, k = pki.certs[cert]
        port = ports.get()
        srv = Tls13Server(("127.0.0.1", port), c, k)
        srv.port = port
        made.append(srv)
        return srv
    yield make
    for srv in made:
        srv.close()
