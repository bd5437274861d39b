"""Self-tests of the harness (no dotp needed): the test PKI is what the
negative tests assume it is, unbound serves DoT with TLS 1.2 and the test
zone, and the relay counts connections."""

import subprocess

import pytest

from harness import make_query, tcp_exchange, rcode, describe

# The cipher suites BearSSL's full client profile offers for TLS 1.2.
BEARSSL_LIKE_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")

# cert -> (s_client verify must succeed, openssl's verification error text)
CERTS = {
    "good-rsa": (True, None),
    "good-ec": (True, None),
    "wrong-name": (False, "hostname mismatch"),
    "expired": (False, "certificate has expired"),
    "self-signed": (False, "self-signed certificate"),
    "untrusted": (False, "unable to get local issuer certificate"),
}


@pytest.mark.parametrize("cert", sorted(CERTS))
def test_pki_and_unbound_tls12(unbound_factory, pki, cert):
    ok, reason = CERTS[cert]
    u = unbound_factory(cert)
    p = subprocess.run(
        ["openssl", "s_client", "-connect", "127.0.0.1:%d" % u.tls_port,
         "-tls1_2", "-cipher", BEARSSL_LIKE_CIPHERS, "-CAfile", str(pki.ca_pem),
         "-verify_hostname", "dot.test", "-verify_return_error", "-servername", "dot.test"],
        input="", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
    if ok:
        assert p.returncode == 0, p.stdout
        assert "Protocol  : TLSv1.2" in p.stdout, p.stdout
    else:
        assert p.returncode != 0, p.stdout
        assert reason in p.stdout, p.stdout

    k = subprocess.run(
        ["kdig", "@127.0.0.1", "-p", str(u.tls_port), "+tls-ca=%s" % pki.ca_pem,
         "+tls-hostname=dot.test", "+timeout=2", "+retry=0", "www.example.test", "A"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
    if ok:
        assert k.returncode == 0 and "status: NOERROR" in k.stdout, k.stdout
        assert "192.0.2.10" in k.stdout, k.stdout
    else:
        assert k.returncode != 0 or "status:" not in k.stdout, k.stdout


def test_zone_contents(upstream):
    big = upstream.direct(make_query("big.example.test", "TXT", edns=True))
    assert len(big) > 1500, describe(big)
    nx = upstream.direct(make_query("nx.example.test", "A"))
    assert rcode(nx) == 3, describe(nx)
    outside = upstream.direct(make_query("www.example.com", "A"))
    assert rcode(outside) == 5, describe(outside)  # REFUSED, never recursion
    for host in ("127.0.0.1", "::1"):
        w = upstream.direct(make_query("www.example.test", "AAAA"), host=host)
        assert "2001:db8::10" in describe(w)


def test_relay_counts_connections(upstream, relay_factory, ports, pki):
    port = ports.get()
    r = relay_factory(("127.0.0.1", port), ("127.0.0.1", upstream.tls_port))
    for _ in range(2):
        k = subprocess.run(
            ["kdig", "@127.0.0.1", "-p", str(port), "+tls-ca=%s" % pki.ca_pem,
             "+tls-hostname=dot.test", "+timeout=2", "+retry=0", "example.test", "MX"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
        assert k.returncode == 0 and "mail.example.test" in k.stdout, k.stdout
    assert r.accepted == 2
    # plain TCP through the relay to the plain port works too
    r2 = relay_factory(("127.0.0.1", ports.get()), ("127.0.0.1", upstream.plain_port))
    w = tcp_exchange("127.0.0.1", r2.ls.getsockname()[1], make_query("www.example.test", "A"))
    assert rcode(w) == 0 and r2.accepted == 1
