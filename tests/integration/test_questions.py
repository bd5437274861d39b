"""The question check (RFC 7858 3.3: a DoT client matches an answer to
its query by ID and question). Before each real answer the upstream sends
an answer carrying the query's ID, in flight, but another question
(faultdot's wrong_question:KIND, see faultdot.py): another name, type or
class, no question at all (NOERROR), two questions, the name compressed,
or a QTYPE differing only in the ASCII case bit (65 'A' vs 97 'a': only
the name compares without case). Each one must be dropped, never
delivered, and counted in the exit line as mismatched=N, N = the wrong
answers the server sent; the client still gets its real answer. A name
that differs only in letter case (wrong_question:case, sent alone as the
real answer) is the same question and must be delivered.

Delivery and the counter are separate tests, so that each shows on its
own."""

import pytest

from faultdot import (faultdot_factory, run_load, names, start_dotp, stop_dotp,  # noqa: F401
                      WRONG_KINDS)

KINDS = list(WRONG_KINDS) + ["case"]
TRANSPORTS = {"udp": (4, 0), "tcp": (0, 2)}
N = 40


def _qtype(kind):
    # type65: HTTPS queries (type 65); the wrong answer's question says 97
    return "HTTPS" if kind == "type65" else "A"


def _ctx(d, srv):
    return "dotp stderr (tail):\n%s\nserver %s %s\n  %s" % (
        d.log()[-3000:], srv.port, srv.snapshot(),
        "\n  ".join(repr(c) for c in srv.conns[-4:]))


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("kind", KINDS)
def test_wrong_question_never_delivered(dotp_factory, faultdot_factory, kind, transport):
    """40 queries from UDP sockets or pipelined TCP connections; before
    each real answer the upstream sends one with the same ID and a wrong
    question (for 'case' only the real answer, its name in the other
    case). Every client gets exactly one answer, the real one (right
    question and data, no SERVFAIL: the real answer follows at once), and
    never the wrong one (which would show as a wrong question, or as the
    A record 192.0.2.66)."""
    srv = faultdot_factory(["wrong_question:" + kind])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    n_udp, n_tcp = TRANSPORTS[transport]
    r = run_load(d.host, d.port, names("wq-" + kind, N), n_udp, n_tcp, timeout=3.0,
                 linger=0.4, qtype=_qtype(kind))
    r.check(allow_servfail=False, context=_ctx(d, srv))
    if kind == "case":
        assert srv.wrong_sent == 0
    else:
        assert srv.wrong_sent >= N, "the server sent %d wrong answers" % srv.wrong_sent
    c = stop_dotp(d)
    assert c["answers"] == N and c["servfail"] == 0, c


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_question_counted(dotp_factory, faultdot_factory, kind):
    """The same upstream, 30 queries from 2 UDP sockets and a TCP
    connection: dotp's exit line has mismatched=N with N the number of
    wrong answers the server sent (0 for 'case', whose answer is the real
    one). Only the counter is checked here."""
    srv = faultdot_factory(["wrong_question:" + kind])
    d = start_dotp(dotp_factory, [srv], ["--timeout", "2000"])
    run_load(d.host, d.port, names("wqc-" + kind, 30), 2, 1, timeout=3.0, linger=0.4,
             qtype=_qtype(kind))
    c = stop_dotp(d)
    sent = srv.wrong_sent
    assert (sent == 0) == (kind == "case"), "the server sent %d wrong answers" % sent
    assert "mismatched" in c, "exit line has no mismatched= counter: %s" % c
    assert c["mismatched"] == sent, \
        "the server sent %d wrong answers, exit line mismatched=%d: %s" % (
            sent, c["mismatched"], c)
