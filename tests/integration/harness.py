"""Helpers for the dotp integration suite: test PKI, unbound DoT upstream,
dnsdist and BIND 9 (named) DoT servers in front of it, dotp process
control, raw DNS exchanges, a connection-counting TCP relay, a "black hole"
TLS upstream that accepts connections and never answers, and a TLS
1.3-only DoT server.

Everything here is plain Python + the openssl/unbound/dnsdist/named CLIs;
the pytest fixtures that wire it together live in conftest.py.
"""

import os
import re
import select
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

REPO = Path(__file__).resolve().parents[2]
DOTP_BIN = os.environ.get("DOTP_BIN") or str(REPO / "dotp")

# Strings that mean a sanitizer build found a bug; any of them in dotp's
# stderr fails the test.
SANITIZER_MARKERS = (
    "AddressSanitizer",
    "LeakSanitizer",
    "UndefinedBehaviorSanitizer",
    "ThreadSanitizer",
    "MemorySanitizer",
    "runtime error:",
)


def run(cmd, **kw):
    """Run a helper command, raise with its output on failure."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError("command failed (%d): %s\n%s"
                           % (p.returncode, " ".join(map(str, cmd)), p.stdout))
    return p.stdout


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

class PortAllocator:
    """Hands out ports that are free for UDP and TCP on 127.0.0.1 and ::1.
    Never hands the same port out twice in a session."""

    def __init__(self, start=20000):
        self.next = start
        self.lock = threading.Lock()

    @staticmethod
    def _free(port):
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(fam, typ)
                try:
                    s.bind((host, port))
                except OSError:
                    return False
                finally:
                    s.close()
        return True

    def get(self):
        with self.lock:
            while True:
                port = self.next
                self.next += 1
                if self.next > 60000:
                    raise RuntimeError("out of test ports")
                if self._free(port):
                    return port


# --------------------------------------------------------------------------
# Test PKI (openssl CLI)
# --------------------------------------------------------------------------

class PKI:
    """Creates in `d`:
      ca.pem            trust bundle given to dotp (--ca-file): the two test roots
      ca-ec.pem/.key    test root A, EC P-256
      ca-rsa.pem/.key   test root B, RSA-2048
      rogue-ca.*        a CA that is NOT in ca.pem
    and server certs (self.certs[name] = (cert_pem, key_pem)):
      good-rsa     dot.test, RSA-2048 key, signed by the EC root (ecdsa-with-SHA256)
      good-ec      dot.test, P-256 key, signed by the RSA root (sha256WithRSAEncryption)
      wrong-name   other.test, signed by the EC root
      expired      dot.test, signed by the EC root, valid 2020-01-01..2021-01-01
      self-signed  dot.test, self-signed RSA-2048
      untrusted    dot.test, signed by rogue-ca
    and, for servers that present a chain (cert_pem holds the leaf, then the
    intermediate; the root stays out, as real servers do):
      chain-rsa    dot.test, RSA-2048 leaf <- int-rsa (RSA-2048) <- RSA root
      chain-ec     dot.test, P-256 leaf <- int-ec (P-256) <- EC root
    (the leaf alone is in <name>.pem, the chain in <name>-chain.pem, the
    intermediates in int-rsa.pem / int-ec.pem; self.intermediates[name] =
    (cert_pem, key_pem)).
    self.cas[name] = (cert_pem, key_pem) for the roots ca-ec, ca-rsa and
    rogue-ca. For SPKI pins (issue 15): reissue() makes a new certificate
    with a NEW key for a server (same name, same issuer), leaf() makes
    more leaves, bundle() writes the PEM files a server presents, and the
    module-level spki_pin() computes a pin.
    """

    def __init__(self, d):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.certs = {}
        self.intermediates = {}
        self.cas = {}
        self._spec = {}     # name -> (kind, dns_name, issuer (pem, key) or None, chained)
        self._serial = 0x1000
        self._build()

    # -- key / cert primitives ------------------------------------------
    def _key(self, name, kind):
        path = self.dir / (name + ".key")
        if kind == "ec":
            run(["openssl", "genpkey", "-algorithm", "EC",
                 "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path])
        else:
            run(["openssl", "genpkey", "-algorithm", "RSA",
                 "-pkeyopt", "rsa_keygen_bits:2048", "-out", path])
        return path

    def _ca(self, name, kind, cn):
        key = self._key(name, kind)
        pem = self.dir / (name + ".pem")
        run(["openssl", "req", "-x509", "-new", "-key", key, "-sha256",
             "-days", "3650", "-subj", "/CN=" + cn,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash",
             "-out", pem])
        return pem, key

    def _extfile(self, dns_name, kind):
        ku = "digitalSignature,keyEncipherment" if kind == "rsa" else "digitalSignature"
        path = self.dir / ("ext-%s-%s.cnf" % (dns_name, kind))
        path.write_text(
            "[ ext ]\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,%s\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=DNS:%s\n" % (ku, dns_name))
        return path

    def _leaf(self, name, kind, dns_name, ca=None, dates=None):
        key = self._key(name, kind)
        pem = self.dir / (name + ".pem")
        csr = self.dir / (name + ".csr")
        ext = self._extfile(dns_name, kind)
        run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=" + dns_name,
             "-out", csr])
        self._serial += 1
        if ca is None:  # self-signed end-entity certificate
            run(["openssl", "x509", "-req", "-in", csr, "-signkey", key,
                 "-days", "365", "-sha256", "-extfile", ext, "-extensions", "ext",
                 "-out", pem])
        elif dates is None:
            run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0],
                 "-CAkey", ca[1], "-set_serial", str(self._serial),
                 "-days", "365", "-sha256", "-extfile", ext, "-extensions", "ext",
                 "-out", pem])
        else:
            # OpenSSL 3.0's `x509 -req` has no -not_before/-not_after; use
            # `openssl ca`, which accepts fixed -startdate/-enddate.
            db = self.dir / ("cadb-" + name)
            db.mkdir(exist_ok=True)
            (db / "index.txt").write_text("")
            (db / "serial").write_text("%X\n" % self._serial)
            cnf = db / "ca.cnf"
            cnf.write_text(
                "[ ca ]\ndefault_ca = tca\n"
                "[ tca ]\n"
                "database = %s/index.txt\nserial = %s/serial\n"
                "new_certs_dir = %s\ndefault_md = sha256\npolicy = pol\n"
                "unique_subject = no\ncopy_extensions = none\n"
                "[ pol ]\ncommonName = supplied\n" % (db, db, db)
                + ext.read_text())
            run(["openssl", "ca", "-batch", "-config", cnf, "-cert", ca[0],
                 "-keyfile", ca[1], "-in", csr, "-out", pem, "-notext",
                 "-startdate", dates[0], "-enddate", dates[1],
                 "-extensions", "ext"])
        self.certs[name] = (pem, key)
        self._spec[name] = (kind, dns_name, ca, False)
        return pem, key

    def _intermediate(self, name, kind, cn, ca):
        """An intermediate CA (pathlen 0) signed by the root `ca`."""
        key = self._key(name, kind)
        pem = self.dir / (name + ".pem")
        csr = self.dir / (name + ".csr")
        ext = self.dir / ("ext-%s.cnf" % name)
        ext.write_text(
            "[ ext ]\n"
            "basicConstraints=critical,CA:TRUE,pathlen:0\n"
            "keyUsage=critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid:always\n")
        run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=" + cn, "-out", csr])
        self._serial += 1
        run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1],
             "-set_serial", str(self._serial), "-days", "1825", "-sha256",
             "-extfile", ext, "-extensions", "ext", "-out", pem])
        self.intermediates[name] = (pem, key)
        return pem, key

    def _chain(self, name, kind, dns_name, inter):
        """A leaf signed by the intermediate `inter`; self.certs[name] gets
        the chain file (leaf first, then the intermediate)."""
        leaf, key = self._leaf(name, kind, dns_name, ca=inter)
        chain = self.dir / (name + "-chain.pem")
        chain.write_text(leaf.read_text() + inter[0].read_text())
        self.certs[name] = (chain, key)
        self._spec[name] = (kind, dns_name, inter, True)
        return chain, key

    # -- more certificates (tests of SPKI pins) ---------------------------
    def _issuer(self, issuer):
        if issuer is None:
            return None
        if issuer in self.cas:
            return self.cas[issuer]
        return self.intermediates[issuer]

    def leaf(self, name, kind, dns_name, issuer=None):
        """A new server certificate `name` (a fresh key of `kind`, "rsa"
        or "ec", for `dns_name`) signed by `issuer` (a key of self.cas or
        self.intermediates; None: self-signed). Leaves issued by an
        intermediate are stored as a chain (leaf + intermediate), like
        chain-rsa. Returns (cert_pem, key_pem), also in self.certs[name]."""
        if name in self.certs:
            raise ValueError("certificate %r exists" % name)
        if issuer in self.intermediates:
            return self._chain(name, kind, dns_name, self.intermediates[issuer])
        return self._leaf(name, kind, dns_name, ca=self._issuer(issuer))

    def reissue(self, name, new_name=None):
        """A certificate for the server of `name` with a NEW key: same
        key type, same DNS name, same issuer (a chain again if `name` is
        one). The files of `name` stay as they are; the new ones are
        `new_name` (default: <name>-reissued-N). Returns new_name."""
        kind, dns_name, ca, chained = self._spec[name]
        if new_name is None:
            n = 1
            while "%s-reissued-%d" % (name, n) in self.certs:
                n += 1
            new_name = "%s-reissued-%d" % (name, n)
        if new_name in self.certs:
            raise ValueError("certificate %r exists" % new_name)
        if chained:
            self._chain(new_name, kind, dns_name, ca)
        else:
            self._leaf(new_name, kind, dns_name, ca=ca)
        return new_name

    def leaf_pem(self, name):
        """The leaf certificate alone of server cert `name`."""
        return self.dir / (name + ".pem")

    def bundle(self, name, leaf, *extra):
        """A server certificate `name` that presents the PEM file of
        server cert `leaf` (leaf, and its intermediate if it is a chain)
        followed by the PEM files `extra` (paths), with `leaf`'s key.
        Returns (cert_pem, key_pem), also in self.certs[name]."""
        cert, key = self.certs[leaf]
        path = self.dir / (name + "-bundle.pem")
        path.write_text(Path(cert).read_text() + "".join(Path(e).read_text() for e in extra))
        self.certs[name] = (path, key)
        self._spec[name] = self._spec[leaf]
        return path, key

    def _build(self):
        ca_ec = self._ca("ca-ec", "ec", "dotp test root EC")
        ca_rsa = self._ca("ca-rsa", "rsa", "dotp test root RSA")
        rogue = self._ca("rogue-ca", "rsa", "dotp rogue root")
        self.cas.update({"ca-ec": ca_ec, "ca-rsa": ca_rsa, "rogue-ca": rogue})
        self.ca_pem = self.dir / "ca.pem"
        self.ca_pem.write_text(ca_ec[0].read_text() + ca_rsa[0].read_text())
        self.rogue_ca_pem = rogue[0]

        self._leaf("good-rsa", "rsa", "dot.test", ca=ca_ec)
        self._leaf("good-ec", "ec", "dot.test", ca=ca_rsa)
        self._leaf("wrong-name", "ec", "other.test", ca=ca_ec)
        self._leaf("expired", "ec", "dot.test", ca=ca_ec,
                   dates=("20200101000000Z", "20210101000000Z"))
        self._leaf("self-signed", "rsa", "dot.test", ca=None)
        self._leaf("untrusted", "rsa", "dot.test", ca=rogue)

        int_rsa = self._intermediate("int-rsa", "rsa", "dotp test intermediate RSA", ca_rsa)
        int_ec = self._intermediate("int-ec", "ec", "dotp test intermediate EC", ca_ec)
        self._chain("chain-rsa", "rsa", "dot.test", int_rsa)
        self._chain("chain-ec", "ec", "dot.test", int_ec)


def spki_pin(cert_pem):
    """The SPKI pin (base64 of SHA-256 of the DER SubjectPublicKeyInfo,
    44 characters) of the first certificate in `cert_pem`, computed with
    exactly the openssl pipeline the documentation gives:
      openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der |
        openssl dgst -sha256 -binary | openssl enc -base64"""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert_pem), "-pubkey", "-noout"],
                         stdout=subprocess.PIPE, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub,
                         stdout=subprocess.PIPE, check=True).stdout
    dgst = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der,
                          stdout=subprocess.PIPE, check=True).stdout
    b64 = subprocess.run(["openssl", "enc", "-base64"], input=dgst,
                         stdout=subprocess.PIPE, check=True).stdout
    pin = b64.decode().strip()
    if len(pin) != 44:
        raise RuntimeError("pin of %s is not 44 characters: %r" % (cert_pem, pin))
    return pin


# --------------------------------------------------------------------------
# unbound upstream
# --------------------------------------------------------------------------

BIG_TXT_STRINGS = ["%s" % (chr(ord("a") + i) * 255) for i in range(7)]  # RDATA 1792 bytes

ZONE = [
    "example.test. 3600 IN SOA ns.example.test. hostmaster.example.test. 1 3600 900 604800 300",
    "example.test. 3600 IN NS ns.example.test.",
    "ns.example.test. 3600 IN A 192.0.2.53",
    "www.example.test. 300 IN A 192.0.2.10",
    "www.example.test. 300 IN A 192.0.2.11",
    "www.example.test. 300 IN AAAA 2001:db8::10",
    "example.test. 300 IN MX 10 mail.example.test.",
    "example.test. 300 IN MX 20 mx2.example.test.",
    "mail.example.test. 300 IN A 192.0.2.25",
    "alias.example.test. 300 IN CNAME www.example.test.",
    "big.example.test. 300 IN TXT " + " ".join('"%s"' % s for s in BIG_TXT_STRINGS),
]


# With Unbound(..., many=True): every name under MANY_ZONE has one A record,
# MANY_A (a redirect zone), so a burst of distinct names all get NOERROR.
MANY_ZONE = "many.test"
MANY_A = "192.0.2.99"


# (name, type) questions the test zone answers (see Unbound), for
# comparing answers through dotp with the server's own; the big TXT is
# compared over TCP only (over UDP it is truncated)
ZONE_SMALL = [
    ("www.example.test", "A"),
    ("www.example.test", "AAAA"),
    ("example.test", "MX"),
    ("alias.example.test", "CNAME"),
    ("alias.example.test", "A"),
    ("nx.example.test", "A"),  # NXDOMAIN with SOA in authority
]
ZONE_BIG = ("big.example.test", "TXT")

class _PlainDns:
    """What every test DNS server process shares: its plain-DNS port
    (self.plain_port), its process (self.proc) and the file its output
    goes to (self._out)."""

    name = "server"

    def _wait_ready(self, ready_query=("www.example.test", "A"), timeout=15.0):
        """Ready when the plain port answers over UDP and TCP and the TLS
        port listens."""
        q = make_query(ready_query[0], ready_query[1], qid=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s):\n%s" % (
                    self.name, self.proc.returncode, self.logs()))
            try:
                udp_exchange("127.0.0.1", self.plain_port, q, timeout=0.3, check_id=False)
                tcp_exchange("127.0.0.1", self.plain_port, q, timeout=0.5, check_id=False)
                if tcp_listening(self.tls_port):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("%s did not become ready in %ss:\n%s" % (
            self.name, timeout, self.logs()))

    def direct(self, wire, tcp=True, host="127.0.0.1", timeout=2.0):
        """Ask the server's plain-DNS port directly."""
        if tcp:
            return tcp_exchange(host, self.plain_port, wire, timeout=timeout)
        return udp_exchange(host, self.plain_port, wire, timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


def unbound_head(workdir, log, plain_port, ipv6=False):
    """The first lines of an unbound.conf for a test server: foreground,
    one thread, no chroot, logging to `log`, plain DNS on `plain_port`."""
    return [
        "server:",
        "  verbosity: 1",
        "  num-threads: 1",
        '  username: ""',
        '  chroot: ""',
        '  directory: "%s"' % workdir,
        '  pidfile: ""',
        "  do-daemonize: no",
        "  use-syslog: no",
        '  logfile: "%s"' % log,
        "  do-ip4: yes",
        "  do-ip6: %s" % ("yes" if ipv6 else "no"),
        "  do-udp: yes",
        "  do-tcp: yes",
        "  port: %d" % plain_port,
    ]


class Unbound(_PlainDns):
    name = "unbound"

    def __init__(self, workdir, cert, key, tls_port, plain_port, ipv6=False, many=False):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls_port = tls_port
        self.plain_port = plain_port
        self.ipv6 = ipv6
        self.log = self.dir / "unbound.log"
        self.conf = self.dir / "unbound.conf"
        hosts = ["127.0.0.1"] + (["::1"] if ipv6 else [])
        lines = unbound_head(self.dir, self.log, plain_port, ipv6) + [
            "  tls-port: %d" % tls_port,
            '  tls-service-key: "%s"' % key,
            '  tls-service-pem: "%s"' % cert,
            "  incoming-num-tcp: 1000",
            "  tcp-idle-timeout: 300000",
            "  so-reuseport: no",
            '  module-config: "iterator"',
            "  access-control: 127.0.0.0/8 allow",
            "  access-control: ::1/128 allow",
            "  hide-identity: yes",
            "  hide-version: yes",
            "  qname-minimisation: no",
            "  rrset-roundrobin: no",
            "  minimal-responses: yes",
            '  local-zone: "." refuse',
            '  local-zone: "example.test." static',
        ]
        for h in hosts:
            lines.append("  interface: %s@%d" % (h, plain_port))
            lines.append("  interface: %s@%d" % (h, tls_port))
        for rr in ZONE:
            lines.append("  local-data: '%s'" % rr)
        if many:
            lines.append('  local-zone: "%s." redirect' % MANY_ZONE)
            lines.append("  local-data: '%s. 300 IN A %s'" % (MANY_ZONE, MANY_A))
        lines += ["remote-control:", "  control-enable: no", ""]
        self.conf.write_text("\n".join(lines))
        run(["unbound-checkconf", self.conf])
        self._out = open(self.dir / "unbound.stderr", "wb")
        self.proc = subprocess.Popen(["unbound", "-d", "-c", str(self.conf)],
                                     stdout=self._out, stderr=subprocess.STDOUT)
        self._wait_ready()


    def logs(self):
        out = ""
        for f in (self.log, self.dir / "unbound.stderr"):
            if f.exists():
                out += f.read_text(errors="replace")
        return out



# --------------------------------------------------------------------------
# dnsdist and BIND 9 (named) DoT servers in front of the test unbound
# --------------------------------------------------------------------------

class _ServerProcess(_PlainDns):
    """A DNS server process with a plain port (UDP+TCP) and a DoT port on
    127.0.0.1, run in the foreground with stdout+stderr in <dir>/<name>.log.
    Subclasses write the config and set self.cmd before calling _start()."""

    name = "server"

    def _start(self, ready_query=("www.example.test", "A")):
        self.logfile = self.dir / (self.name + ".log")
        self._out = open(self.logfile, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(ready_query)
        except BaseException:
            self.stop()
            raise

    def logs(self):
        try:
            return self.logfile.read_text(errors="replace")
        except (AttributeError, FileNotFoundError):
            return ""


class Dnsdist(_ServerProcess):
    """dnsdist (1.7 in Debian 12) with a DoT frontend (addTLSLocal, its
    defaults otherwise: OpenSSL provider, TLS 1.2 and 1.3, session tickets)
    and a plain frontend, both on 127.0.0.1, forwarding everything to one
    backend, 127.0.0.1:backend_port (the test unbound's plain port).
    Foreground, --supervised (no console), no syslog, no security polling
    (setSecurityPollSuffix("") - it would query a public name), no control
    socket, no carbon. The backend's health check asks www.example.test."""

    name = "dnsdist"

    def __init__(self, workdir, cert, key, tls_port, plain_port, backend_port):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.plain_port = tls_port, plain_port
        self.backend_port = backend_port
        self.conf = self.dir / "dnsdist.conf"
        self.conf.write_text("\n".join([
            'setSecurityPollSuffix("")',
            'setLocal("127.0.0.1:%d")' % plain_port,
            'addTLSLocal("127.0.0.1:%d", "%s", "%s")' % (tls_port, cert, key),
            'newServer{address="127.0.0.1:%d", checkName="www.example.test."}'
            % backend_port,
            "",
        ]))
        run(["dnsdist", "--check-config", "-C", self.conf])
        self.cmd = ["dnsdist", "--supervised", "--disable-syslog", "-C", str(self.conf)]
        self._start()


class Named(_ServerProcess):
    """BIND 9 (named, 9.18 in Debian 12) with a `tls` block and a DoT
    listener (`listen-on port P tls dot`), plus a plain listener, both on
    127.0.0.1 only (no IPv6, no port 53, no rndc control channel). A
    forward-only resolver: every query goes to 127.0.0.1:forward_port (the
    test unbound's plain port), no DNSSEC validation, so it answers from
    the same data as the test unbound and never talks to a root server.
    `rrset-order { order none; }`: records in a fixed order (the default,
    cyclic, rotates them from one answer to the next).
    protocols: the tls block's `protocols` list (e.g. ["TLSv1.3"]), None
    for BIND's default. Foreground (-g: logs to stderr), as the current
    user (root in the test namespace needs no -u)."""

    name = "named"

    def __init__(self, workdir, cert, key, tls_port, plain_port, forward_port,
                 protocols=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.plain_port = tls_port, plain_port
        self.forward_port = forward_port
        self.conf = self.dir / "named.conf"
        tls = ['tls dot {',
               '    cert-file "%s";' % cert,
               '    key-file "%s";' % key]
        if protocols:
            tls.append("    protocols { %s; };" % "; ".join(protocols))
        tls.append("};")
        self.conf.write_text("\n".join(tls + [
            "options {",
            '    directory "%s";' % self.dir,
            "    pid-file none;",
            '    session-keyfile "%s/session.key";' % self.dir,
            '    managed-keys-directory "%s";' % self.dir,
            "    listen-on port %d { 127.0.0.1; };" % plain_port,
            "    listen-on port %d tls dot { 127.0.0.1; };" % tls_port,
            "    listen-on-v6 { none; };",
            "    recursion yes;",
            "    allow-query { 127.0.0.1; };",
            "    allow-recursion { 127.0.0.1; };",
            "    forward only;",
            "    forwarders { 127.0.0.1 port %d; };" % forward_port,
            "    dnssec-validation no;",
            "    minimal-responses yes;",
            "    rrset-order { order none; };",
            "    max-cache-size 32m;",
            "    notify no;",
            "    querylog no;",
            "};",
            "controls { };",
            "",
        ]))
        run(["named-checkconf", self.conf])
        self.cmd = ["named", "-g", "-c", str(self.conf)]
        self._start()


# --------------------------------------------------------------------------
# socket state helpers (/proc/net is per network namespace)
# --------------------------------------------------------------------------

def _proc_net_ports(files, want_state=None):
    ports = set()
    for f in files:
        try:
            with open(f) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    local, state = parts[1], parts[3]
                    if want_state and state != want_state:
                        continue
                    ports.add(int(local.rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return ports


def tcp_listening(port):
    return port in _proc_net_ports(["/proc/net/tcp", "/proc/net/tcp6"], "0A")


def udp_bound(port):
    return port in _proc_net_ports(["/proc/net/udp", "/proc/net/udp6"])


# --------------------------------------------------------------------------
# DNS wire helpers
# --------------------------------------------------------------------------

def make_query(name, rdtype, qid=0x1234, edns=False, payload=1232):
    """Wire-format query with RD set. edns=False -> no OPT record."""
    if edns:
        m = dns.message.make_query(name, rdtype, use_edns=0, payload=payload)
    else:
        m = dns.message.make_query(name, rdtype, use_edns=False)
    m.id = qid
    return m.to_wire()


def zero_id(wire):
    return b"\x00\x00" + wire[2:]


EDNS_OPT_PADDING = 12   # RFC 7830


def _skip_name(wire, pos):
    """Position after the (possibly compressed) name at pos."""
    while True:
        n = wire[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2
        if n & 0xC0:
            raise ValueError("bad label type 0x%02x at %d" % (n, pos))
        pos += 1 + n


def strip_padding(wire):
    """`wire` with every EDNS(0) Padding option (code 12) removed from its
    OPT record(s), the OPT RDLEN adjusted; everything else byte for byte.
    dotp pads its queries over TLS (RFC 8467) and a resolver then pads its
    answers (RFC 7830), so answers through dotp equal the upstream's direct
    answers "after the ID and any padding": compare
    zero_id(strip_padding(a)) == zero_id(strip_padding(b)). A message it
    cannot walk (e.g. a truncated one) comes back unchanged."""
    try:
        qd, an, ns, ar = struct.unpack("!HHHH", wire[4:12])
        pos = 12
        for _ in range(qd):
            pos = _skip_name(wire, pos) + 4
        out = bytearray(wire[:pos])
        for i in range(an + ns + ar):
            start = pos
            pos = _skip_name(wire, pos)
            rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", wire[pos:pos + 10])
            rd_start = pos + 10
            rd_end = rd_start + rdlen
            if rd_end > len(wire):
                return wire
            if rtype != 41 or i < an + ns:
                out += wire[start:rd_end]
            else:
                opts = b""
                p = rd_start
                while p + 4 <= rd_end:
                    code, olen = struct.unpack("!HH", wire[p:p + 4])
                    if code != EDNS_OPT_PADDING:
                        opts += wire[p:p + 4 + olen]
                    p += 4 + olen
                opts += wire[p:rd_end]      # a malformed tail stays as it is
                out += wire[start:pos + 8] + struct.pack("!H", len(opts)) + opts
            pos = rd_end
        out += wire[pos:]
        return bytes(out)
    except (IndexError, struct.error, ValueError):
        return wire


def set_id(wire, qid):
    return struct.pack("!H", qid) + wire[2:]


def wire_id(wire):
    return struct.unpack("!H", wire[:2])[0]


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_id(answer, query, transport):
    if answer[:2] != query[:2]:
        raise AssertionError("%s answer has ID %d, the query had ID %d: %s" % (
            transport, wire_id(answer), wire_id(query), describe(answer)))


def udp_exchange(host, port, wire, timeout=2.0, check_id=True):
    """Send one UDP query from a fresh connected socket and return the first
    datagram that comes back (raises socket.timeout if none). With check_id
    an answer whose ID differs from the query's is an AssertionError."""
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(wire)
        data = s.recv(65535)
    finally:
        s.close()
    if check_id:
        _check_id(data, wire, "UDP")
    return data


def recv_exact(s, n, deadline):
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out reading %d bytes (got %d)" % (n, len(buf)))
        s.settimeout(left)
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def tcp_read_msg(s, deadline):
    (n,) = struct.unpack("!H", recv_exact(s, 2, deadline))
    return recv_exact(s, n, deadline)


def tcp_exchange(host, port, wire, timeout=2.0, check_id=True):
    deadline = time.monotonic() + timeout
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        data = tcp_read_msg(s, deadline)
    finally:
        s.close()
    if check_id:
        _check_id(data, wire, "TCP")
    return data


def rcode(wire):
    return wire[3] & 0x0F


def tc_bit(wire):
    return bool(wire[2] & 0x02)


def describe(wire):
    try:
        return str(dns.message.from_wire(wire))
    except Exception as e:  # truncated messages etc.
        return "<%d bytes, unparsable: %s> %r" % (len(wire), e, wire[:64])


# --------------------------------------------------------------------------
# dotp process
# --------------------------------------------------------------------------

# DOTP_TEST_NO_SANDBOX=1 runs every dotp with DOTP_NO_SANDBOX=1: only for
# the leak pass under ASan, whose LeakSanitizer needs ptrace, clone and
# /proc/self/maps at exit, which the sandbox forbids by design.
NO_SANDBOX = os.environ.get("DOTP_TEST_NO_SANDBOX") == "1"


def dotp_cmd(args, env=None):
    """The command line and environment to run dotp with: the caller's
    environment without any DOTP_* setting but DOTP_BIN, plus env."""
    if not os.path.exists(DOTP_BIN):
        raise RuntimeError("dotp binary not found: %s (set DOTP_BIN)" % DOTP_BIN)
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("DOTP_") or k == "DOTP_BIN"}
    if NO_SANDBOX:
        full_env["DOTP_NO_SANDBOX"] = "1"
    full_env.update(env or {})
    return [DOTP_BIN] + [str(a) for a in args], full_env


class Dotp:
    """A running dotp. stderr goes to a file (self.logfile)."""

    def __init__(self, args, workdir, env=None, wait_ports=(), probe=None):
        self.args, full_env = dotp_cmd(args, env)
        self.logfile = Path(workdir) / ("dotp-%d.stderr" % time.monotonic_ns())
        self._err = open(self.logfile, "wb")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=self._err, env=full_env)
        self.returncode = None
        self._wait_ready(wait_ports, probe)

    def _wait_ready(self, ports, probe, timeout=10.0):
        """Ready when every listen port is bound for UDP and listening for
        TCP (seen in /proc/net, so no query is sent), then optionally when a
        probe query (host, port) gets any answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("dotp exited early with status %s: %s\nstderr:\n%s"
                                     % (self.proc.returncode, self.args, self.log()))
            if all(udp_bound(p) and tcp_listening(p) for p in ports):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("dotp did not bind %s within %ss\nstderr:\n%s"
                                 % (ports, timeout, self.log()))
        if probe:
            q = make_query("www.example.test", "A", qid=0x0dd)
            while time.monotonic() < deadline:
                try:
                    udp_exchange(probe[0], probe[1], q, timeout=0.5, check_id=False)
                    return
                except OSError:
                    if self.proc.poll() is not None:
                        break
            raise AssertionError("dotp did not answer a probe query on %s\nstderr:\n%s"
                                 % (probe, self.log()))

    def log(self):
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle, timeout=2.0):
        """Wait until `needle` (str, case-insensitive) shows up in stderr."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if needle.lower() in text.lower():
                return text
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Send `sig`, wait for exit, return the exit status (negative = killed
        by a signal, 'hung' if it did not exit in time)."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.returncode = "hung"
        if self.returncode is None:
            self.returncode = self.proc.returncode
        self._err.close()
        return self.returncode

    def sanitizer_report(self):
        text = self.log()
        return [m for m in SANITIZER_MARKERS if m in text]


def run_dotp(args, env=None, timeout=10.0):
    """Run dotp to completion (CLI tests). Returns CompletedProcess."""
    cmd, full_env = dotp_cmd(args, env)
    try:
        return subprocess.run(cmd, env=full_env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr or b""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        raise AssertionError("%s (env %s) did not exit within %ss (it should have "
                             "exited at once)\nstderr:\n%s" % (
                                 cmd, env, timeout, err))


# --------------------------------------------------------------------------
# TCP relay that counts connections, and a black-hole listener
# --------------------------------------------------------------------------

class _TcpServer:
    """A listening TCP socket whose accepted connections go to
    self._accepted(conn) on a thread; close() stops it and closes every
    socket it collected in self.socks."""

    def __init__(self, listen):
        self.ls = socket.socket(_family(listen[0]), socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(listen)
        self.ls.listen(128)
        self.closed = False
        self.socks = []
        self.t = threading.Thread(target=self._accept_loop, daemon=True)
        self.t.start()

    def _accept_loop(self):
        while not self.closed:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            self._accepted(c)

    def close(self):
        self.closed = True
        try:
            self.ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ls.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


class Relay(_TcpServer):
    """Plain TCP relay (TLS passes through untouched) that counts accepted
    connections. One thread per direction per connection."""

    def __init__(self, listen, target):
        self.target = target
        self.accepted = 0
        self.lock = threading.Lock()
        super().__init__(listen)

    def _accepted(self, c):
        with self.lock:
            self.accepted += 1
        try:
            u = socket.create_connection(self.target, timeout=5)
            u.settimeout(None)
        except OSError:
            c.close()
            return
        self.socks += [c, u]
        threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
        threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class BlackHole(_TcpServer):
    """Accepts TCP connections and never sends a byte (a hung upstream)."""

    def _accepted(self, c):
        self.socks.append(c)


class Tls13Server(_TcpServer):
    """A minimal DoT server that speaks TLS 1.3 only (Python's ssl, i.e.
    OpenSSL, with minimum_version = TLSv1_3): a TLS 1.2 client's handshake
    fails (OpenSSL sends a protocol_version alert, 70, and closes). A
    TLS 1.3 client gets an empty NOERROR answer to each query (so kdig can
    show the server works). self.failed lists the handshake errors seen,
    self.handshakes counts the handshakes that succeeded."""

    def __init__(self, listen, cert, key):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(str(cert), str(key))
        self.failed = []
        self.handshakes = 0
        self.lock = threading.Lock()
        super().__init__(listen)

    def _accepted(self, c):
        self.socks.append(c)
        threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(5)
            t = self.ctx.wrap_socket(c, server_side=True)
        except (OSError, ssl.SSLError) as e:
            with self.lock:
                self.failed.append(str(e))
            c.close()
            return
        with self.lock:
            self.handshakes += 1
        self.socks.append(t)
        try:
            deadline = time.monotonic() + 5
            while True:
                q = tcp_read_msg(t, deadline)
                a = dns.message.make_response(dns.message.from_wire(q)).to_wire()
                t.sendall(struct.pack("!H", len(a)) + a)
        except (OSError, ConnectionError, ssl.SSLError, dns.exception.DNSException):
            pass
        finally:
            t.close()


def udp_burst(host, port, queries, n_socks=5, timeout=5.0):
    """Send `queries` (list of wire messages) spread over n_socks UDP sockets
    as fast as possible (query i goes out on socket i % n_socks), then
    collect answers for up to `timeout` seconds. Returns (pending, answers,
    missing): pending and answers map (sock_index, qid) -> query / first
    answer wire, missing lists the keys that got no answer."""
    socks = []
    for _ in range(n_socks):
        s = socket.socket(_family(host), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.connect((host, port))
        s.setblocking(False)
        socks.append(s)
    pending = {}
    try:
        for i, q in enumerate(queries):
            si = i % n_socks
            key = (si, wire_id(q))
            assert key not in pending, "duplicate (socket, id) in burst"
            pending[key] = q
            socks[si].send(q)
        answers = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(pending) and time.monotonic() < deadline:
            r, _, _ = select.select(socks, [], [], max(0, deadline - time.monotonic()))
            for s in r:
                si = socks.index(s)
                while True:
                    try:
                        data = s.recv(65535)
                    except BlockingIOError:
                        break
                    answers.setdefault((si, wire_id(data)), data)
        missing = [k for k in pending if k not in answers]
        return pending, answers, missing
    finally:
        for s in socks:
            s.close()


def dig_output(tool, host, port, name, rdtype, tcp, mask_ttl=False):
    """dig's or kdig's answer text for one query, with the ID and the Padding
    option masked (dig "; PAD: (N bytes)", kdig ";; PADDING: N B"), and with
    mask_ttl every record's TTL (a caching server counts TTLs down between
    two queries)."""
    if tool == "dig":
        cmd = ["dig", "@" + host, "-p", str(port), "+nocookie", "+qid=4660",
               "+noall", "+comments", "+answer", "+authority", "+additional",
               "+time=3", "+tries=1"]
    else:
        cmd = ["kdig", "@" + host, "-p", str(port), "+noall", "+header", "+comments",
               "+opt", "+answer", "+authority", "+additional", "+timeout=3", "+retry=0"]
    if tcp:
        cmd.append("+tcp")
    cmd += [name, rdtype]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=15)
    assert p.returncode == 0, "%s failed: %s\n%s" % (tool, " ".join(cmd), p.stdout)
    out = re.sub(r"\bid: \d+", "id: X", p.stdout)
    out = re.sub(r"(?m)^;+ (PAD: \(\d+ bytes\)|PADDING: \d+ B)\n", "", out)
    if mask_ttl:
        out = re.sub(r"(?m)^([^;\s]\S*\s+)\d+(\s+IN\s)", r"\1TTL\2", out)
    assert "HEADER" in out, out
    return out
