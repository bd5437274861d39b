"""--user (issue 15, privilege drop): started as root (the suite runs as
root in its network namespace), dotp binds port 53-style sockets and loads
its anchors, then runs as the given uid and gid with that gid its only
group, and still serves; bad values exit 2; as root without --user it
warns once."""

import os

import dns.message
import pytest

from harness import udp_exchange, tcp_exchange, run_dotp, make_query


def ids(pid):
    """(uid line, gid line, groups) of /proc/PID/status, as lists of ints."""
    st = {}
    for line in open("/proc/%d/status" % pid):
        k, _, v = line.partition(":")
        st[k] = v.split()
    return ([int(x) for x in st["Uid"]], [int(x) for x in st["Gid"]],
            [int(x) for x in st.get("Groups", [])])


def answers(d):
    a = dns.message.from_wire(udp_exchange(d.host, d.port,
                                           make_query("mail.example.test", "A", qid=77)))
    b = dns.message.from_wire(tcp_exchange(d.host, d.port,
                                           make_query("www.example.test", "AAAA", qid=78)))
    return a, b


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root (the suite's namespace gives it)")


def test_numeric_user_drops_and_serves(root_only, dotp_factory, upstream):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--user", "65534"], probe=False)
    uid, gid, groups = ids(d.proc.pid)
    assert uid == [65534] * 4 and gid == [65534] * 4 and groups == [65534], (uid, gid, groups)
    a, b = answers(d)           # the first upstream connection opens after the drop
    assert [r.to_text() for r in a.answer] and b.answer, (a, b)
    assert 'msg="privileges dropped" uid=65534 gid=65534' in d.log()
    assert "running as root" not in d.log()


def test_named_user_with_gid(root_only, dotp_factory, upstream):
    """A name from /etc/passwd (Debian's nobody is 65534) and a GID."""
    pw = [l.split(":") for l in open("/etc/passwd") if l.startswith("nobody:")]
    if not pw:
        pytest.skip("no nobody in /etc/passwd")
    want_uid = int(pw[0][2])
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port],
                     extra=["--user", "nobody:65533"], probe=False)
    uid, gid, groups = ids(d.proc.pid)
    assert uid == [want_uid] * 4 and gid == [65533] * 4 and groups == [65533]
    a, _ = answers(d)
    assert a.answer


def test_root_without_user_warns(root_only, dotp_factory, upstream):
    d = dotp_factory(["127.0.0.1:%d#dot.test" % upstream.tls_port], probe=False)
    assert d.log().count("running as root: --user would drop privileges") == 1, d.log()
    assert ids(d.proc.pid)[0] == [0] * 4


@pytest.mark.parametrize("value", ["no-such-user-x", "0", "root", "12:abc", "99999999999"])
def test_bad_user_exits_2(value):
    p = run_dotp(["--user", value, "-l", "127.0.0.1:1"])
    assert p.returncode == 2, (value, p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad --user value '%s'" % value in lines[0], p.stderr
