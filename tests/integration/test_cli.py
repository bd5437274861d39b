"""Command line, environment, logging and signals."""

import re
import signal
import socket
import time

import pytest

from harness import (make_query, udp_exchange, zero_id, strip_padding, rcode,
                     describe, run_dotp, udp_bound, tcp_listening, SANITIZER_MARKERS)


@pytest.fixture
def base(pki, ports):
    """Valid arguments, so that only the argument under test is wrong."""
    return ["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
            "--ca-file", str(pki.ca_pem)]


def no_sanitizer(p):
    found = [m for m in SANITIZER_MARKERS if m in p.stderr]
    assert not found, p.stderr


def usage_error(p, needle, one_line=True):
    no_sanitizer(p)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, "exit status %s (want 2)\nstderr:\n%s" % (p.returncode, p.stderr)
    assert any(needle in l for l in lines), (
        "stderr does not contain %r verbatim:\n%s" % (needle, p.stderr))
    if one_line:
        assert len(lines) == 1, "want ONE line on stderr, got %d:\n%s" % (len(lines), p.stderr)
    return lines


BAD_FLAGS = [
    (["--timeout", "abc"], "abc"),
    (["--timeout", "0"], "0"),
    (["--timeout", "600001"], "600001"),
    (["--timeout", "-5"], "-5"),
    (["--timeout", "12ms"], "12ms"),
    (["-u", "127.0.0.1"], "127.0.0.1"),
    (["-u", "host.example:853#x"], "host.example:853#x"),
    (["-u", "127.0.0.1:70000#dot.test"], "127.0.0.1:70000#dot.test"),
    (["-u", "[::1#dot.test"], "[::1#dot.test"),
    (["-l", "1.2.3.4.5"], "1.2.3.4.5"),
    (["-l", "127.0.0.1:99999"], "127.0.0.1:99999"),
    (["-l", "127.0.0.1:abc"], "127.0.0.1:abc"),
]


@pytest.mark.parametrize("bad,needle", BAD_FLAGS, ids=[" ".join(b) for b, _ in BAD_FLAGS])
def test_bad_flag_value(base, bad, needle):
    p = run_dotp(base + bad, timeout=5)
    (line,) = usage_error(p, needle)
    if bad[0] == "--timeout":
        assert "timeout" in line.lower(), line


def test_upstream_without_name_shows_form(base):
    p = run_dotp(base + ["-u", "127.0.0.1"], timeout=5)
    (line,) = usage_error(p, "127.0.0.1")
    assert "HOST[:PORT]#NAME" in line, "message should show the form HOST[:PORT]#NAME: " + line


BAD_ENV = [
    ({"DOTP_TIMEOUT": "abc"}, "abc"),
    ({"DOTP_TIMEOUT": "0"}, "0"),
    ({"DOTP_UPSTREAM": "127.0.0.1:853"}, "127.0.0.1:853"),
    ({"DOTP_UPSTREAM": "127.0.0.1:853#dot.test,dns.example#x"}, "dns.example#x"),
    ({"DOTP_LISTEN": "1.2.3.4.5"}, "1.2.3.4.5"),
    ({"DOTP_LISTEN": "127.0.0.1:99999"}, "127.0.0.1:99999"),
]


@pytest.mark.parametrize("env,needle", BAD_ENV, ids=["%s=%s" % next(iter(e.items())) for e, _ in BAD_ENV])
def test_bad_env_value(pki, ports, env, needle):
    full = {"DOTP_LISTEN": "127.0.0.1:%d" % ports.get(),
            "DOTP_UPSTREAM": "127.0.0.1:853#dot.test",
            "DOTP_CA_FILE": str(pki.ca_pem)}
    full.update(env)
    p = run_dotp([], env=full, timeout=5)
    (line,) = usage_error(p, needle)
    if "DOTP_TIMEOUT" in env:
        assert "timeout" in line.lower(), line


def test_unknown_flag(base):
    p = run_dotp(base + ["--bogus"], timeout=5)
    usage_error(p, "--bogus", one_line=False)


def test_missing_flag_argument(base):
    p = run_dotp(base + ["--timeout"], timeout=5)
    usage_error(p, "timeout", one_line=False)


def test_ca_file_missing(ports):
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
                  "--ca-file", "/nonexistent/ca.pem"], timeout=5)
    no_sanitizer(p)
    assert p.returncode in (1, 2), p
    assert "/nonexistent/ca.pem" in p.stderr, p.stderr


def test_ca_file_without_certificates(ports, tmp_path):
    f = tmp_path / "empty.pem"
    f.write_text("this is not a certificate\n")
    p = run_dotp(["-l", "127.0.0.1:%d" % ports.get(), "-u", "127.0.0.1:853#dot.test",
                  "--ca-file", str(f)], timeout=5)
    no_sanitizer(p)
    assert p.returncode in (1, 2), p
    assert str(f) in p.stderr, p.stderr


def test_version():
    p = run_dotp(["-V"], timeout=5)
    assert p.returncode == 0, p
    assert re.match(r"^dotp \S+", p.stdout.strip()), p.stdout
    p2 = run_dotp(["--version"], timeout=5)
    assert p2.returncode == 0 and p2.stdout == p.stdout, p2


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag):
    p = run_dotp([flag], timeout=5)
    assert p.returncode == 0, p
    assert "-u" in p.stdout and "-l" in p.stdout and "--ca-file" in p.stdout, p.stdout
    no_sanitizer(p)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_bind_in_use(ports, proto):
    port = ports.get()
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", port))
        s.listen(1)
    try:
        p = run_dotp(["-l", "127.0.0.1:%d" % port, "-u", "127.0.0.1:853#dot.test"],
                     timeout=5)
    finally:
        s.close()
    no_sanitizer(p)
    assert p.returncode == 1, "exit status %s (want 1)\n%s" % (p.returncode, p.stderr)
    assert "cannot bind" in p.stderr, p.stderr


# ---------------------------------------------------------------- environment

def test_env_alone_gives_working_proxy(dotp_factory, upstream, pki, ports):
    p4, p6 = ports.get(), ports.get()
    dead = ports.get()
    env = {
        # lists separated by a comma and by spaces
        "DOTP_LISTEN": "127.0.0.1:%d, [::1]:%d" % (p4, p6),
        "DOTP_UPSTREAM": "127.0.0.1:%d#dot.test  127.0.0.1:%d#dot.test" % (
            dead, upstream.tls_port),
        "DOTP_CA_FILE": str(pki.ca_pem),
    }
    dotp_factory(listen=[], ca=False, env=env, wait_ports=[p4, p6], probe=False)
    q = make_query("example.test", "MX", qid=3)
    want = zero_id(strip_padding(upstream.direct(q, tcp=False)))
    for host, port in (("127.0.0.1", p4), ("::1", p6)):
        a = udp_exchange(host, port, q, timeout=3.5)
        assert zero_id(strip_padding(a)) == want, describe(a)


def test_flags_override_env(dotp_factory, upstream, pki, ports):
    env_port, flag_port, dead = ports.get(), ports.get(), ports.get()
    env = {
        "DOTP_LISTEN": "127.0.0.1:%d" % env_port,
        "DOTP_UPSTREAM": "127.0.0.1:%d#dot.test" % dead,
        "DOTP_CA_FILE": str(pki.rogue_ca_pem),
        "DOTP_TIMEOUT": "600000",
    }
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     listen=["127.0.0.1:%d" % flag_port], env=env,
                     extra=["--timeout", "1500"])
    q = make_query("www.example.test", "A", qid=4)
    a = udp_exchange(d.host, flag_port, q, timeout=3)
    assert zero_id(strip_padding(a)) == \
        zero_id(strip_padding(upstream.direct(q, tcp=False))), describe(a) + d.log()
    assert not udp_bound(env_port) and not tcp_listening(env_port), (
        "-l given, but DOTP_LISTEN's port is bound as well")


def test_env_timeout(dotp_factory, blackhole_factory, ports):
    port = ports.get()
    blackhole_factory(("127.0.0.1", port))
    d = dotp_factory(["127.0.0.1:%d#dot.test" % port], env={"DOTP_TIMEOUT": "700"},
                     probe=False)
    t = time.monotonic()
    a = udp_exchange(d.host, d.port, make_query("www.example.test", "A", qid=5),
                     timeout=2.5)
    assert rcode(a) == 2, describe(a)
    assert time.monotonic() - t < 1.7, "DOTP_TIMEOUT=700 not honoured"


# ---------------------------------------------------------------- logging

LOG_LINE = re.compile(r'\blevel=(debug|info|warn|warning|error)\b')


def test_log_format_and_quiet(dotp_factory, upstream):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port])
    udp_exchange(d.host, d.port, make_query("www.example.test", "A", qid=6), timeout=3)
    log = d.log()
    lines = [l for l in log.splitlines() if l.strip()]
    assert lines, "nothing logged at start"
    assert any("level=info" in l and "listening" in l for l in lines), log
    bad = [l for l in lines if not LOG_LINE.search(l)]
    assert not bad, "log lines without level=...: %s" % bad

    q = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], extra=["-q"])
    udp_exchange(q.host, q.port, make_query("www.example.test", "A", qid=7), timeout=3)
    time.sleep(0.1)
    noisy = [l for l in q.log().splitlines() if re.search(r"level=(info|debug)", l)]
    assert not noisy, "-q must log errors only: %s" % noisy


def test_verbose_logs_debug(dotp_factory, upstream):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], extra=["-v"])
    udp_exchange(d.host, d.port, make_query("www.example.test", "A", qid=8), timeout=3)
    assert d.wait_log("level=debug"), "-v: no level=debug line:\n" + d.log()


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_idle_exit_0(dotp_factory, upstream, sig):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port])
    t = time.monotonic()
    rc = d.stop(sig)
    assert rc == 0, "exit status %r after %s\n%s" % (rc, sig.name, d.log())
    assert time.monotonic() - t < 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_with_query_waiting_exit_0(dotp_factory, blackhole_factory, ports, sig):
    """A UDP and a TCP query are waiting on a hung upstream (timeout 20 s)."""
    port = ports.get()
    blackhole_factory(("127.0.0.1", port))
    d = dotp_factory(["127.0.0.1:%d#dot.test" % port], extra=["--timeout", "20000"],
                     probe=False)
    q = make_query("www.example.test", "A", qid=11)
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    us.sendto(q, (d.host, d.port))
    ts = socket.create_connection((d.host, d.port), timeout=3)
    ts.sendall(len(q).to_bytes(2, "big") + q)
    time.sleep(0.5)
    t = time.monotonic()
    rc = d.stop(sig)
    took = time.monotonic() - t
    us.close()
    ts.close()
    assert rc == 0, "exit status %r after %s with queries waiting\n%s" % (rc, sig.name, d.log())
    assert took < 3, "took %.1fs to exit" % took
