#!/usr/bin/python3
"""benchtool.py - the measuring half of dotp's benchmark (bench/run.sh).

Plain Python 3 standard library only (no dnspython), so the numbers do not
depend on anything but dnsperf and /proc.

Subcommands:
  wait     send one A query until the answer 192.0.2.1 comes back
           (UDP, TCP or DoT); exit 1 when it does not within --timeout
  names    write a dnsperf query file of unique names
  zipf     write a dnsperf query file drawn from a Zipf distribution over
           a set of names, with some never-repeated names mixed in
  warm     send every name of a query file over UDP and check the answers
           (fills a forwarder's cache before an all-hits run)
  rss      print "VmRSS VmHWM" (KiB) of a process
  measure  one dnsperf load run against one target, sampling the target's
           (and the upstream's) CPU time, RSS and upstream TLS connections;
           appends one JSON record to --out
  resperf  one resperf ramp against one target: the highest answered rate
           before the first interval losing 1% or more of its queries;
           appends one JSON record (with the plot) to --out
  light    closed-loop latency: one query in flight at a time, for a fixed
           time or count; appends one JSON record to --out (or prints it)
  report   turn the JSON records into results.json and results.md,
           with the dotp target verdicts

Everything talks to loopback only; run.sh runs all of it inside a private
network namespace.
"""

import argparse
import json
import os
import random
import re
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time

ANSWER = bytes([192, 0, 2, 1])      # what the upstream's bench.test. gives
CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_PORT = 853


# ---------------------------------------------------------------------------
# DNS wire helpers
# ---------------------------------------------------------------------------

def build_query(name, qid, qtype=1):
    """A plain RD query for NAME/QTYPE IN, no EDNS (like dnsperf without -e)."""
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        b = label.encode()
        q += bytes([len(b)]) + b
    return q + b"\x00" + struct.pack("!HH", qtype, 1)


def answer_ok(msg, qid):
    """NOERROR, at least one answer, ID matches, 192.0.2.1 in it."""
    if len(msg) < 12:
        return False
    rid, flags, _qd, an = struct.unpack("!HHHH", msg[:8])
    return rid == qid and flags & 0x8000 and flags & 0xF == 0 and an > 0 \
        and ANSWER in msg


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


class Client:
    """One DNS client socket: udp, tcp or dot (verified TLS)."""

    def __init__(self, mode, host, port, timeout, ca=None, name=None):
        self.mode = mode
        self.timeout = timeout
        if mode == "udp":
            self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.s.connect((host, port))
        else:
            s = socket.create_connection((host, port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mode == "dot":
                ctx = ssl.create_default_context(cafile=ca)
                s = ctx.wrap_socket(s, server_hostname=name)
            self.s = s
        self.s.settimeout(timeout)

    def query(self, wire):
        """Send WIRE, return the answer with the same ID (None on timeout)."""
        qid = wire[:2]
        if self.mode == "udp":
            self.s.send(wire)
            end = time.monotonic() + self.timeout
            while True:
                try:
                    msg = self.s.recv(4096)
                except socket.timeout:
                    return None
                if msg[:2] == qid:
                    return msg
                if time.monotonic() > end:     # late answers to old queries
                    return None
        self.s.sendall(struct.pack("!H", len(wire)) + wire)
        try:
            while True:
                n = struct.unpack("!H", recv_exact(self.s, 2))[0]
                msg = recv_exact(self.s, n)
                if msg[:2] == qid:
                    return msg
        except socket.timeout:
            return None

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------

def cpu_ticks(pid):
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])    # fields 14 and 15 of stat


def mem_kib(pid):
    """(VmRSS, VmHWM) in KiB."""
    rss = hwm = None
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def sys_ticks():
    """(user+nice+system, steal) of the whole machine, in clock ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2], (v[7] if len(v) > 7 else 0)


def idle_ticks():
    """idle+iowait of the whole machine, in clock ticks (what is left once
    interrupts and softirqs, e.g. loopback traffic, are counted as busy)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4]


def thread_ticks(pid):
    """{tid: utime+stime} of every thread of PID ({} once it is gone)."""
    r = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return r
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        r[tid] = int(fields[11]) + int(fields[12])
    return r


class ThreadCpu(threading.Thread):
    """Samples the threads of some processes every `interval` s: the
    busiest thread of each, in cores (CPU seconds per wall second), tells
    whether a process was held back by one thread at its limit (dnsperf's
    sender, a single-threaded forwarder). A thread's figure covers the
    time between the first and the last sample that saw it."""

    def __init__(self, pids, interval=0.25):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.stop_ev = threading.Event()
        self.first, self.last = {}, {}

    def run(self):
        while True:
            now = time.monotonic()
            for name, pid in self.pids.items():
                for tid, ticks in thread_ticks(pid).items():
                    self.first.setdefault((name, tid), (now, ticks))
                    self.last[(name, tid)] = (now, ticks)
            if self.stop_ev.wait(self.interval):
                break

    def stop(self):
        self.stop_ev.set()
        self.join()
        r = {}
        for key, (t1, k1) in self.last.items():
            t0, k0 = self.first[key]
            if t1 - t0 < 0.5:
                continue
            cores = (k1 - k0) / CLK_TCK / (t1 - t0)
            d = r.setdefault(key[0], {"threads": 0, "max_thread_cores": 0.0})
            d["threads"] += 1
            d["max_thread_cores"] = round(max(d["max_thread_cores"], cores), 2)
        return r


class CpuWatch:
    """How much of the machine's CPU went to processes other than PIDS,
    this script and its children (dnsperf) between start and stop: other
    work on the machine skews every figure of a run."""

    def __init__(self, pids):
        self.pids = sorted(set(p for p in pids if p))
        self.p0 = [cpu_ticks(p) for p in self.pids]
        self.s0, self.st0 = sys_ticks()
        self.me0 = os.times()
        self.w0 = time.monotonic()

    def stop(self):
        p1 = [cpu_ticks(p) for p in self.pids]
        s1, st1 = sys_ticks()
        me1 = os.times()
        ours = sum(b - a for a, b in zip(self.p0, p1))
        ours += ((me1.user + me1.system + me1.children_user + me1.children_system)
                 - (self.me0.user + self.me0.system + self.me0.children_user
                    + self.me0.children_system)) * CLK_TCK
        cap = (time.monotonic() - self.w0) * (os.cpu_count() or 1) * CLK_TCK
        if cap <= 0:
            return {}
        return {
            "machine_busy_pct": round(100.0 * (s1 - self.s0) / cap, 1),
            "foreign_cpu_pct": round(max(0.0, 100.0 * ((s1 - self.s0) - ours)
                                         / cap), 1),
            "steal_pct": round(100.0 * (st1 - self.st0) / cap, 1),
        }


def reset_hwm(pid):
    """Reset VmHWM to the current RSS (proc(5): clear_refs, value 5)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def upstream_conns(pid):
    """Established TCP connections to 127.0.0.1:853 owned by PID (any of its
    threads: they share one descriptor table), as a set of local ports.
    The same thing `ss -tnp state established dst 127.0.0.1:853` shows,
    read from /proc to keep the sampling cheap."""
    inodes = set()
    fddir = "/proc/%d/fd" % pid
    try:
        for fd in os.listdir(fddir):
            try:
                link = os.readlink(os.path.join(fddir, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    want = "0100007F:%04X" % UPSTREAM_PORT
    try:
        with open("/proc/%d/net/tcp" % pid) as f:
            next(f)
            for line in f:
                p = line.split()
                # p[1] local, p[2] remote, p[3] state (01 = ESTABLISHED)
                if p[2] == want and p[3] == "01" and p[9] in inodes:
                    ports.add(int(p[1].split(":")[1], 16))
    except OSError:
        pass
    return ports


def ss_conns(pid):
    """The same count from `ss -tnp state established dst 127.0.0.1:853`."""
    try:
        out = subprocess.run(["ss", "-Htnp", "state", "established", "dst",
                              "127.0.0.1:%d" % UPSTREAM_PORT],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(1 for line in out.splitlines() if "pid=%d," % pid in line)


def upstream_queries(conf):
    """Queries the upstream unbound has received (all transports), from
    `unbound-control stats_noreset` on its control socket; None when it
    cannot tell."""
    if not conf:
        return None
    try:
        out = subprocess.run(["unbound-control", "-c", conf, "stats_noreset"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^total\.num\.queries=(\d+)$", out, re.M)
    return int(m.group(1)) if m else None


class ConnSampler(threading.Thread):
    """Samples upstream_conns(pid) every `interval` s until stopped."""

    def __init__(self, pid, interval=0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_ev = threading.Event()
        self.counts = []
        self.seen = set()
        self.ss_at = 10          # one `ss` cross-check, ~2 s into the run
        self.ss_count = None

    def run(self):
        n = 0
        while not self.stop_ev.is_set():
            c = upstream_conns(self.pid)
            self.counts.append(len(c))
            self.seen |= c
            n += 1
            if n == self.ss_at:
                self.ss_count = ss_conns(self.pid)
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.join()


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def pct(sorted_vals, p):
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1,
                   int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def lat_summary_us(lat_s):
    """Latency statistics in microseconds from a list of seconds."""
    lat = sorted(lat_s)
    if not lat:
        return {}
    us = lambda v: None if v is None else round(v * 1e6, 1)
    return {
        "n": len(lat),
        "avg_us": us(sum(lat) / len(lat)),
        "min_us": us(lat[0]),
        "p50_us": us(pct(lat, 50)),
        "p90_us": us(pct(lat, 90)),
        "p99_us": us(pct(lat, 99)),
        "p999_us": us(pct(lat, 99.9)),
        "max_us": us(lat[-1]),
    }


# ---------------------------------------------------------------------------
# wait
# ---------------------------------------------------------------------------

def do_wait(a):
    end = time.monotonic() + a.timeout
    last = "no attempt"
    tries = 0
    while time.monotonic() < end and not (a.once and tries):
        tries += 1
        c = None
        try:
            c = Client(a.mode, a.host, a.port, a.timeout if a.once else 1.0,
                       a.ca, a.tls_name)
            qid = random.randrange(65536)
            msg = c.query(build_query(a.name, qid))
            if msg is not None and answer_ok(msg, qid):
                return 0
            last = "no or wrong answer"
        except (OSError, ConnectionError, ssl.SSLError) as e:
            last = str(e)
        finally:
            if c:
                c.close()
        if not a.once:
            time.sleep(0.2)
    if not a.quiet:
        print("wait: %s %s:%d gave no answer for %s within %.0f s (%s)"
              % (a.mode, a.host, a.port, a.name, a.timeout, last),
              file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------

def do_names(a):
    fmt = a.prefix + "%0" + str(a.digits) + "d." + a.zone + " A\n"
    with open(a.out, "w") as f:
        step = 100000
        for s in range(a.start, a.start + a.count, step):
            e = min(s + step, a.start + a.count)
            f.write("".join(fmt % i for i in range(s, e)))
    return 0


def do_zipf(a):
    """A query stream for the cache runs: each query is, with probability
    --unique-pct %, a name never used before (u<n>.ZONE: it can only
    miss), else the name of rank k among --names names (z<k>.ZONE),
    drawn with probability proportional to 1/k^s. Same --seed, same
    stream. With --seen/--save-seen, names already drawn by an earlier
    stream count as seen: the report's "any cache" ceiling is the share
    of queries whose name was asked before (what a cache that never
    drops anything would answer)."""
    rng = random.Random(a.seed)
    n = a.names
    cum, acc = [], 0.0
    for k in range(1, n + 1):
        acc += 1.0 / k ** a.s
        cum.append(acc)
    ranks = range(n)
    seen = set()
    if a.seen and os.path.exists(a.seen):
        with open(a.seen) as f:
            seen = set(int(x) for x in f.read().split())
    repeat = 0
    uniq = a.unique_start
    lines = []
    for _ in range(a.count):
        if rng.random() * 100.0 < a.unique_pct:
            lines.append("u%09d.%s A\n" % (uniq, a.zone))
            uniq += 1
            continue
        k = rng.choices(ranks, cum_weights=cum)[0]
        if k in seen:
            repeat += 1
        else:
            seen.add(k)
        lines.append("z%07d.%s A\n" % (k, a.zone))
    with open(a.out, "w") as f:
        f.write("".join(lines))
    if a.save_seen:
        with open(a.save_seen, "w") as f:
            f.write(" ".join(str(k) for k in sorted(seen)))
    # queries whose name was asked before, distinct names, unique names
    print(repeat, len(seen), uniq - a.unique_start)
    return 0


def do_warm(a):
    """Sends every name of a dnsperf query file (NAME TYPE lines) over
    UDP, one at a time, --passes times; exit 1 unless every query got the
    expected answer."""
    names = []
    with open(a.datafile) as f:
        for line in f:
            p = line.split()
            if p:
                names.append(p[0])
    c = Client("udp", "127.0.0.1", a.port, a.timeout)
    bad = 0
    for _ in range(a.passes):
        for i, name in enumerate(names):
            qid = random.randrange(65536)
            msg = c.query(build_query(name, qid))
            if msg is None or not answer_ok(msg, qid):
                bad += 1
    c.close()
    if bad:
        print("warm: %d of %d queries to 127.0.0.1:%d got no or a wrong answer"
              % (bad, len(names) * a.passes, a.port), file=sys.stderr)
    return 1 if bad else 0


# ---------------------------------------------------------------------------
# measure (dnsperf)
# ---------------------------------------------------------------------------

# the statistics lines dnsperf and resperf share
NUM = r"([0-9.]+)"
COMMON_STATS = {
    "sent": r"Queries sent:\s+" + NUM,
    "completed": r"Queries completed:\s+" + NUM,
    "lost": r"Queries lost:\s+" + NUM,
    "run_time_s": r"Run time \(s\):\s+" + NUM,
}


def match_numbers(text, pats, ints):
    """{key: number} for each (key, regex) of pats found in text; keys in
    ints become ints when whole."""
    r = {}
    for k, p in pats.items():
        m = re.search(p, text)
        if m:
            v = float(m.group(1))
            r[k] = int(v) if v.is_integer() and k in ints else v
    return r


def parse_dnsperf(text):
    """The statistics block of dnsperf 2.10 (see `dnsperf -h`)."""
    r = {}
    num = NUM
    pats = dict(COMMON_STATS)
    pats.update({
        "interrupted": r"Queries interrupted:\s+" + num,
        "qps": r"Queries per second:\s+" + num,
        "reconnections": r"Reconnections:\s+" + num,
    })
    r.update(match_numbers(text, pats, ints=("sent", "completed", "lost",
                                             "interrupted", "reconnections")))
    m = re.search(r"Average Latency \(s\):\s+([0-9.]+) \(min ([0-9.]+), "
                  r"max ([0-9.]+)\)", text)
    if m:
        r["dnsperf_avg_us"] = round(float(m.group(1)) * 1e6, 1)
        r["dnsperf_min_us"] = round(float(m.group(2)) * 1e6, 1)
        r["dnsperf_max_us"] = round(float(m.group(3)) * 1e6, 1)
    m = re.search(r"Latency StdDev \(s\):\s+([0-9.]+)", text)
    if m:
        r["dnsperf_stddev_us"] = round(float(m.group(1)) * 1e6, 1)
    m = re.search(r"Response codes:\s+(.*)", text)
    if m:
        r["rcodes"] = {k: int(v) for k, v in
                       re.findall(r"([A-Z]+) (\d+) \(", m.group(1))}
    m = re.search(r"Ran through file: (\d+) times", text)
    if m:
        r["file_passes"] = int(m.group(1))
    return r


def warm_up(a, rec):
    """One warm-up query: the target is up and has its upstream connection."""
    if a.transport != "dot":
        wa = argparse.Namespace(mode="udp", host="127.0.0.1", port=a.port,
                                name="warmup-%d.bench.test" % random.randrange(10**9),
                                timeout=10, ca=None, tls_name=None, quiet=False,
                                once=False)
        rec["warmup_ok"] = do_wait(wa) == 0


def run_measured(a, rec, cmd, tool, timeout):
    """Runs a load tool (cmd) against the target after a settle, recording in
    rec its exit status (TOOL_rc), wall time, the CPU and foreign-load figures
    and, with --count-conns, the upstream TLS connections. Returns (output
    file path, target CPU ticks, upstream CPU ticks, target's peak RSS)."""
    pid, upid = a.pid, a.upstream_pid
    uq0 = upstream_queries(getattr(a, "upstream_control", None))
    time.sleep(a.settle)
    rec["rss_before_kib"], _ = mem_kib(pid)
    rec["hwm_reset"] = reset_hwm(pid)
    sampler = ConnSampler(pid) if a.count_conns else None
    t0u, t0 = cpu_ticks(upid), cpu_ticks(pid)
    watch = CpuWatch([pid, upid])
    if sampler:
        sampler.start()
    w0 = time.monotonic()
    c0 = os.times()
    i0 = idle_ticks()
    out = os.path.join(a.tmp, "%s.%d.out" % (tool, os.getpid()))
    with open(out, "w") as f:
        if getattr(a, "thread_cpu", False):
            # the same as subprocess.run, with the threads of the load
            # generator and of the target sampled meanwhile
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            tc = ThreadCpu({tool: p.pid, "target": pid})
            tc.start()
            try:
                rec[tool + "_rc"] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rec[tool + "_rc"] = "timeout"
            th = tc.stop()
            rec["loadgen_max_thread_cores"] = (th.get(tool) or {}).get("max_thread_cores")
            rec["loadgen_threads"] = (th.get(tool) or {}).get("threads")
            rec["target_max_thread_cores"] = (th.get("target") or {}).get("max_thread_cores")
            rec["target_threads"] = (th.get("target") or {}).get("threads")
        else:
            try:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                   timeout=timeout)
                rec[tool + "_rc"] = p.returncode
            except subprocess.TimeoutExpired:
                rec[tool + "_rc"] = "timeout"
    wall = time.monotonic() - w0
    i1 = idle_ticks()
    rec["wall_s"] = round(wall, 3)
    t1, t1u = cpu_ticks(pid), cpu_ticks(upid)
    c1 = os.times()
    # the load generator's own CPU (the child just waited for), and each
    # process's CPU as cores (CPU seconds per wall second): which of them
    # was near its limit
    gen = (c1.children_user + c1.children_system
           - c0.children_user - c0.children_system)
    rec["loadgen_cpu_s"] = round(gen, 3)
    if wall > 0:
        rec["loadgen_cores"] = round(gen / wall, 2)
        rec["target_cores"] = round((t1 - t0) / CLK_TCK / wall, 2)
        if upid != pid:
            rec["upstream_cores"] = round((t1u - t0u) / CLK_TCK / wall, 2)
        # the machine's CPU not idle, softirqs (loopback) included
        rec["machine_nonidle_pct"] = round(max(0.0, 100.0 - 100.0 * (i1 - i0)
                                               / CLK_TCK / wall
                                               / (os.cpu_count() or 1)), 1)
    if sampler:
        sampler.stop()
        rec["tls_conns_max"] = max(sampler.counts) if sampler.counts else None
        rec["tls_conns_min"] = min(sampler.counts) if sampler.counts else None
        rec["tls_conns_distinct"] = len(sampler.seen)
        rec["tls_conn_samples"] = len(sampler.counts)
        rec["tls_conns_ss_check"] = sampler.ss_count
    rec.update(watch.stop())
    rec["rss_after_kib"], hwm1 = mem_kib(pid)
    rec["peak_rss_kib"] = hwm1 if rec["hwm_reset"] else None
    uq1 = upstream_queries(getattr(a, "upstream_control", None))
    if uq0 is not None and uq1 is not None:
        # everything the upstream received from the settle to the end
        rec["upstream_queries"] = uq1 - uq0
    return out, t1 - t0, t1u - t0u


def do_measure(a):
    rec = {
        "kind": "load", "target": a.target, "transport": a.transport,
        "names": a.names, "round": a.round, "duration_s": a.duration,
        "clients": a.clients, "outstanding": a.outstanding,
    }
    warm_up(a, rec)
    # --runs-through N: the file N times (a stream), else for --duration s
    limit = ["-n", str(a.runs_through)] if a.runs_through else \
        ["-l", str(a.duration)]
    cmd = ["dnsperf", "-m", a.transport, "-s", "127.0.0.1", "-p", str(a.port),
           "-d", a.datafile, "-c", str(a.clients), "-q", str(a.outstanding)] \
        + limit + ["-t", str(a.query_timeout), "-v"]
    rec["command"] = " ".join(cmd)
    if a.runs_through:
        rec["duration_s"] = None
        rec["runs_through"] = a.runs_through
    if a.datafile_lines is None:
        with open(a.datafile) as f:
            a.datafile_lines = sum(1 for _ in f)
    rec["datafile_lines"] = a.datafile_lines

    out, cpu, ucpu = run_measured(a, rec, cmd, "dnsperf",
                                  a.max_time if a.runs_through
                                  else a.duration + a.query_timeout + 30)

    lat, rc_lines, timeouts = [], {}, 0
    summary = []
    with open(out, errors="replace") as f:
        for line in f:
            if line.startswith("> "):
                p = line.split()
                if p[1] == "T":
                    timeouts += 1
                    continue
                rc_lines[p[1]] = rc_lines.get(p[1], 0) + 1
                try:
                    lat.append(float(p[-1]))
                except ValueError:
                    pass
            else:
                summary.append(line)
    os.unlink(out)
    text = "".join(summary)
    rec.update(parse_dnsperf(text))
    rec.update(lat_summary_us(lat))
    # stalls: answers that took over 30 ms (e.g. a 40 ms delayed ACK)
    rec["over_30ms"] = sum(1 for v in lat if v > 0.030)
    rec["timeouts_verbose"] = timeouts
    done = rec.get("completed", 0)
    noerr = rec.get("rcodes", {}).get("NOERROR", 0)
    rec["noerror"] = noerr
    rec["cpu_s"] = round(cpu / CLK_TCK, 3)
    rec["cpu_us_per_query"] = round(cpu / CLK_TCK * 1e6 / done, 2) \
        if done else None
    rec["upstream_cpu_us_per_query"] = round(ucpu / CLK_TCK * 1e6 / done, 2) \
        if done and a.upstream_pid != a.pid else None
    # unique names must not repeat within a run: the file was not wrapped
    if a.names == "unique":
        rec["names_repeated"] = rec.get("sent", 0) > a.datafile_lines
    # cache runs: the share of queries the forwarder answered without
    # asking the upstream (1 - what the upstream received / queries sent)
    if rec.get("upstream_queries") is not None and rec.get("sent"):
        rec["hit_ratio"] = round(1.0 - rec["upstream_queries"] / rec["sent"], 4)
    if rec.get("dnsperf_rc") != 0 or "qps" not in rec:
        rec["error"] = "dnsperf failed: " + text.strip()[-400:]
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    line = ("%-8s %-4s %-7s r%d  %9.0f qps  cpu %7s us/q  avg %8s us  p99 %8s us"
            "  lost %s  rss %s KiB  peak %s KiB  conns %s"
            % (a.target, a.transport, a.names, a.round, rec.get("qps", 0),
               rec["cpu_us_per_query"], rec.get("avg_us"), rec.get("p99_us"),
               rec.get("lost"), rec["rss_before_kib"], rec["peak_rss_kib"],
               rec.get("tls_conns_max", "-")))
    if (rec.get("foreign_cpu_pct") or 0) > 10:
        line += "  (other processes used %s%% of the CPU)" % rec["foreign_cpu_pct"]
    if (rec.get("steal_pct") or 0) > 5:
        line += "  (steal %s%%)" % rec["steal_pct"]
    if rec.get("names_repeated"):
        line += "  (names repeated: file too short)"
    if rec.get("upstream_queries") is not None:
        line += "  upstream got %d (hit ratio %s)" % (rec["upstream_queries"],
                                                     rec.get("hit_ratio"))
    if rec.get("loadgen_cores") is not None:
        line += "  cores: dnsperf %s target %s" % (rec["loadgen_cores"],
                                                   rec.get("target_cores"))
    if noerr != done:
        line += "  (rcodes %s)" % rec.get("rcodes")
    if "error" in rec:
        line += "  ERROR"
    print(line, flush=True)
    return 0


# ---------------------------------------------------------------------------
# resperf: the highest rate answered with under 1% loss
# ---------------------------------------------------------------------------

def parse_resperf(text):
    """resperf 2.10's status lines and statistics block."""
    r = {}
    num = NUM
    pats = dict(COMMON_STATS)
    pats.update({
        "reconnections": r"Reconnection\(s\):\s+" + num,
        # with -L: the highest response rate before the first interval
        # losing more than that (resperf's own rule; failures count as
        # answers there)
        "resperf_max_throughput": r"Maximum throughput:\s+" + num,
        "resperf_lost_at_max_pct": r"Lost at that point:\s+" + num,
    })
    r.update(match_numbers(text, pats, ints=("sent", "completed", "lost",
                                             "reconnections")))
    m = re.search(r"Response codes:\s+(.*)", text)
    if m:
        r["rcodes"] = {k: int(v) for k, v in
                       re.findall(r"([A-Z]+) (\d+) \(", m.group(1))}
    # how the sending phase ended
    m = re.search(r"Fell behind by (\d+) queries, ending test at ([0-9.]+) qps",
                  text)
    if m:
        r["ended"] = "client fell behind"
        r["ended_at_qps"] = round(float(m.group(2)))
    elif re.search(r"Reached \d+ outstanding queries", text):
        r["ended"] = "outstanding limit"
    elif "Waiting for more responses" in text:
        r["ended"] = "ramp done"
    return r


def parse_resperf_plot(path):
    """The -P plot file: time, target qps, actual qps, responses/s,
    failures/s, average latency (s), connections/s, connection latency;
    one row per interval, by the time the queries were sent."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            try:
                rows.append([float(x) for x in line.split()])
            except ValueError:
                continue
    return rows


def resperf_peak(rows, max_loss):
    """Walk the ramp in order. An interval's loss is the share of the
    queries sent in it that got no NOERROR/NXDOMAIN answer within the
    timeout (no answer, or a failure rcode). The peak is the highest
    answered rate (answers/s, failures excluded) over the intervals before
    the first one losing max_loss % or more. Returns (peak, first_loss),
    dicts or None; first_loss None means no interval reached max_loss %:
    the ramp ended first and the peak is a lower bound."""
    peak = first = None
    for row in rows:
        if len(row) < 6:
            continue
        t, target, sent, resp, fail, lat = row[:6]
        if sent <= 0:
            continue            # nothing sent in that interval (a stall)
        ok = max(0.0, resp - fail)
        loss = max(0.0, 100.0 * (sent - ok) / sent)
        point = {"t_s": t, "target_qps": round(target), "sent_qps": round(sent),
                 "answered_qps": round(ok), "loss_pct": round(loss, 2),
                 "latency_us": round(lat * 1e6, 1) if resp else None}
        if loss >= max_loss:
            first = point
            break
        if peak is None or ok > peak["answered_qps"]:
            peak = point
    return peak, first


def do_resperf(a):
    rec = {
        "kind": "resperf", "target": a.target, "transport": a.transport,
        "round": a.round, "max_qps": a.max_qps, "ramp_s": a.ramp,
        "clients": a.clients, "interval_s": a.interval,
        "max_loss_pct": a.max_loss, "datafile_lines": a.datafile_lines,
    }
    warm_up(a, rec)
    plot = os.path.join(a.tmp, "resperf.%d.plot" % os.getpid())
    cmd = ["resperf", "-M", a.transport, "-s", "127.0.0.1", "-p", str(a.port),
           "-d", a.datafile, "-C", str(a.clients), "-m", str(a.max_qps),
           "-r", str(a.ramp), "-i", str(a.interval), "-t", str(a.query_timeout),
           "-L", str(a.max_loss), "-F", str(a.fall_behind),
           "-b", str(a.bufsize), "-P", plot]
    rec["command"] = " ".join(cmd)
    out, cpu, ucpu = run_measured(a, rec, cmd, "resperf",
                                  a.ramp + a.query_timeout + 60)
    with open(out, errors="replace") as f:
        text = f.read()
    os.unlink(out)
    rec.update(parse_resperf(text))
    rows = parse_resperf_plot(plot) if os.path.exists(plot) else []
    if os.path.exists(plot):
        os.unlink(plot)
    peak, first = resperf_peak(rows, a.max_loss)
    rec["peak"] = peak
    rec["first_loss"] = first
    # the very first interval already lost max_loss %: nothing sustained
    rec["peak_qps"] = peak["answered_qps"] if peak else (0 if first else None)
    # no interval lost max_loss % or more: the client stopped first
    rec["lower_bound"] = first is None
    rec["max_answered_qps_any_loss"] = round(max(
        [max(0.0, r[3] - r[4]) for r in rows if len(r) >= 5] or [0]))
    # the plot as "time target sent answers failures latency_us" strings
    rec["plot"] = ["%.3f %.0f %.0f %.0f %.0f %.0f" % (r[0], r[1], r[2], r[3],
                                                    r[4], r[5] * 1e6)
                   for r in rows if len(r) >= 6]
    rec["cpu_s"] = round(cpu / CLK_TCK, 3)
    rec["upstream_cpu_s"] = round(ucpu / CLK_TCK, 3) \
        if a.upstream_pid != a.pid else None
    rec["names_repeated"] = rec.get("sent", 0) > a.datafile_lines
    if rec.get("resperf_rc") != 0 or not rows:
        rec["error"] = "resperf failed: " + text.strip()[-400:]
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    line = ("%-8s %-4s resperf r%d  peak %s%s qps (<%g%% loss)" % (
        a.target, a.transport, a.round,
        ">=" if rec["lower_bound"] else "",
        "-" if peak is None else "%.0f" % peak["answered_qps"], a.max_loss))
    if peak and peak.get("latency_us") is not None:
        line += "  avg %.0f us there" % peak["latency_us"]
    if first:
        line += "  | %.1f%% lost at %.0f qps sent" % (first["loss_pct"],
                                                   first["sent_qps"])
    line += "  | ended: %s%s, %.1f s" % (
        rec.get("ended", "?"), " at %s qps" % rec["ended_at_qps"]
        if rec.get("ended_at_qps") else "", rec["wall_s"])
    if a.count_conns:
        line += "  conns %s" % rec.get("tls_conns_max", "-")
    if (rec.get("foreign_cpu_pct") or 0) > 10:
        line += "  (other processes used %s%% of the CPU)" % rec["foreign_cpu_pct"]
    if (rec.get("steal_pct") or 0) > 5:
        line += "  (steal %s%%)" % rec["steal_pct"]
    if rec["names_repeated"]:
        line += "  (names repeated: file too short)"
    if "error" in rec:
        line += "  ERROR"
    print(line, flush=True)
    return 0


# ---------------------------------------------------------------------------
# light: closed loop, one query in flight
# ---------------------------------------------------------------------------

def do_light(a):
    """Closed loop, one query in flight. With --pair-port, every query to the
    target alternates with one sent straight to the upstream (over DoT, or
    --pair-mode udp), the order flipping each time, so both see the same
    machine state and the difference of their medians is the latency the
    target adds."""
    c = Client(a.mode, "127.0.0.1", a.port, a.query_timeout, a.ca, a.tls_name)
    c2 = None
    if a.pair_port:
        c2 = Client(a.pair_mode, "127.0.0.1", a.pair_port, a.query_timeout,
                    a.pair_ca, a.tls_name)
    fmt = a.prefix + "%07d." + a.zone
    fmt2 = a.prefix + "p%07d." + a.zone
    # --cycle N: the names repeat every N queries (all hits once warm)
    cyc = (lambda i: i % a.cycle) if a.cycle else (lambda i: i)
    # warm-up: connection, caches of the client's own path, CPU frequency;
    # with --cycle, every name once (the forwarder's cache) and more
    for i in range(a.warmup + (a.cycle or 0)):
        j = cyc(i) if a.cycle else 9000000 + i
        c.query(build_query(fmt % j, i & 0xFFFF))
        if c2:
            c2.query(build_query(fmt2 % j, i & 0xFFFF))
    watch = CpuWatch([a.pid, a.upstream_pid])
    lat, lat2 = [], []
    lost = [0, 0]
    bad = [0, 0]
    i = 0
    end = time.monotonic() + a.duration if a.duration else None
    pc = time.perf_counter

    def one(cl, name, k, acc):
        qid = (i * 7919 + 1 + k) & 0xFFFF
        wire = build_query(name, qid)
        t = pc()
        msg = cl.query(wire)
        dt = pc() - t
        if msg is None:
            lost[k] += 1
            return
        if not answer_ok(msg, qid):
            bad[k] += 1
        acc.append(dt)

    while True:
        if a.count and i >= a.count:
            break
        if end and time.monotonic() >= end:
            break
        if c2 and i & 1:
            one(c2, fmt2 % cyc(i), 1, lat2)
            one(c, fmt % cyc(i), 0, lat)
        else:
            one(c, fmt % cyc(i), 0, lat)
            if c2:
                one(c2, fmt2 % cyc(i), 1, lat2)
        i += 1
    c.close()
    if c2:
        c2.close()
    rec = {"kind": "light", "target": a.target, "transport": a.mode,
           "round": a.round, "sent": i, "lost": lost[0], "bad_answers": bad[0],
           "duration_s": a.duration, "client": "benchtool.py light "
           "(Python, closed loop, 1 query in flight)"}
    if a.cycle:
        rec["names"] = "hits"
        rec["cycle"] = a.cycle
        rec["client"] += ", %d names repeated (warmed first)" % a.cycle
    rec.update(lat_summary_us(lat))
    rec.update(watch.stop())
    if c2:
        pr = {"target": "upstream", "transport": a.pair_mode, "sent": i,
              "lost": lost[1], "bad_answers": bad[1]}
        pr.update(lat_summary_us(lat2))
        rec["pair"] = pr
        rec["client"] += (", alternating with %s queries straight to the upstream"
                          % ("DoT" if a.pair_mode == "dot" else "UDP"))
        if rec.get("p50_us") is not None and pr.get("p50_us") is not None:
            rec["added_p50_us"] = round(rec["p50_us"] - pr["p50_us"], 1)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if not a.silent:
        print("%-8s %-4s light   r%d  %6d queries  p50 %7s us  p90 %7s us  "
              "p99 %7s us  lost %d%s%s" % (
                  a.target, a.mode, a.round, i, rec.get("p50_us"),
                  rec.get("p90_us"), rec.get("p99_us"), lost[0],
                  "  bad %d" % bad[0] if bad[0] else "",
                  "  | upstream %s p50 %s us: added %+.1f us" % (
                      "DoT" if a.pair_mode == "dot" else "UDP",
                      rec["pair"].get("p50_us"), rec.get("added_p50_us", 0))
                  if c2 else "") + (
                  "  (other processes used %s%% of the CPU)" % rec["foreign_cpu_pct"]
                  if (rec.get("foreign_cpu_pct") or 0) > 10 else ""),
              flush=True)
    return 0 if not any(lost) and not any(bad) else 1


def do_busy(a):
    """Print the share of the machine's CPU in use over --seconds."""
    w = CpuWatch([])
    time.sleep(a.seconds)
    print(w.stop().get("foreign_cpu_pct", 0))
    return 0


def do_rss(a):
    rss, hwm = mem_kib(a.pid)
    print(rss, hwm)
    return 0


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=0, unit=""):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        s = ("{:,.%df}" % nd).format(v)
        return s + unit
    return str(v)


def load_meta(path):
    """run.sh's meta file: KEY=VALUE lines, dotted keys nest, `caveats+=`
    appends; whole numbers become ints, true/false booleans."""
    meta = {"caveats": []}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" not in line:
                continue
            k, v = line.split("=", 1)
            if k == "caveats+":
                meta["caveats"].append(v)
                continue
            if re.fullmatch(r"-?\d+", v):
                v = int(v)
            elif v in ("true", "false"):
                v = v == "true"
            d = meta
            parts = k.split(".")
            for p in parts[:-1]:
                d = d.setdefault(p, {})
            d[parts[-1]] = v
    meta["targets_measured"] = str(meta.get("targets_measured", "")).split()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    meta["machine"] = {"nproc": os.cpu_count(), "cpu_model": cpu,
                       "kernel": os.uname().release, "mem_mib": mem,
                       "os": _os_release()}
    return meta


def _os_release():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def exit_counters(line):
    """key=value pairs of a dotp exit line, numbers as ints."""
    r = {}
    for k, v in re.findall(r"(\w+)=(\S+)", line or ""):
        r[k] = int(v) if re.fullmatch(r"\d+", v) else v.strip('"')
    return r


def limited_by(x, ncpu):
    """What held an all-hits run back, from the CPU each process used
    (cores = CPU seconds per wall second over the run; busiest thread:
    the same for its busiest thread). Returns (verdict, figures)."""
    lg, tc = x.get("loadgen_cores"), x.get("target_cores")
    lgt, tct = x.get("loadgen_max_thread_cores"), x.get("target_max_thread_cores")
    uc, busy = x.get("upstream_cores"), x.get("machine_nonidle_pct")
    if lg is None or tc is None:
        return None, "-"
    use = ("dnsperf %.2f cores (busiest of %s threads %s), target %.2f (busiest "
           "of %s threads %s), upstream %.2f; machine %s%% not idle, other "
           "processes %s%%" % (
               lg, fmt(x.get("loadgen_threads")), fmt(lgt, 2), tc,
               fmt(x.get("target_threads")), fmt(tct, 2), uc or 0.0, fmt(busy),
               fmt(x.get("foreign_cpu_pct"))))
    hot = []
    if lgt is not None and lgt >= 0.85:
        hot.append("dnsperf (a thread at %.2f cores)" % lgt)
    if tct is not None and tct >= 0.85:
        hot.append("the target (a thread at %.2f cores)" % tct)
    other = x.get("foreign_cpu_pct") or 0
    if busy is not None and busy >= 80:
        return ("the machine's %d cores (%s%% not idle%s); %s" % (
            ncpu, fmt(busy), ", %s%% of it other processes" % fmt(other)
            if other > 10 else "",
            "at its limit: " + ", ".join(hot) if hot else
            "biggest user: %s (%.2f cores vs %.2f)" % (
                ("dnsperf", lg, tc) if lg >= tc else ("the target", tc, lg))),
            use)
    if hot:
        return ", ".join(hot), use
    return "no thread and not the machine: round trips (queries in flight)", use


def cache_report(meta, agg, light_agg, runs, verdict):
    """The cache runs (run.sh section 8): all hits, light load with hits,
    the Zipf stream; adds dotp's cache verdicts. {} when there were none."""
    c = meta.get("cached") or {}
    if not c.get("enabled"):
        return {}
    ts = str(c.get("targets") or "").split()
    ncpu = (meta.get("machine") or {}).get("nproc") or os.cpu_count()
    budget = c.get("budget_bytes")
    procs = c.get("proc") or {}
    z = c.get("zipf") or {}
    out = {"targets": ts, "budget_bytes": budget,
           "config": c.get("config") or {}, "hits": {}, "light": {},
           "zipf": {}}
    for t in ts:
        x = dict((agg.get(t + "-cached") or {}).get("udp/hits") or {})
        if x:
            x["limited_by"], x["cpu_use"] = limited_by(x, ncpu)
            x["idle_rss_kib"] = (procs.get(t) or {}).get("idle_rss_kib")
            out["hits"][t] = x
        li = light_agg.get(t + "-cached/udp")
        if li:
            out["light"][t] = li
        zr = {}
        for seg in ("zipf-cold", "zipf"):
            y = (agg.get(t + "-cached") or {}).get("udp/" + seg)
            if y:
                zr[seg] = y
        if zr:
            zt = z.get(t) or {}
            zr["rss_start_kib"] = zt.get("rss_start_kib")
            zr["rss_end_kib"] = zt.get("rss_end_kib")
            zr["hwm_kib"] = zt.get("hwm_kib")
            if zt.get("exit_line"):
                zr["counters"] = exit_counters(zt["exit_line"])
            for k in ("gc_cpu_s", "gc_status"):
                if zt.get(k) not in (None, ""):
                    zr[k] = zt[k]
            out["zipf"][t] = zr
    if (procs.get("dotp") or {}).get("exit_line"):
        out["hits_dotp_counters"] = exit_counters(procs["dotp"]["exit_line"])
    if z.get("queries") and z.get("repeats") is not None:
        # what a cache that never dropped anything would answer
        out["zipf_ceiling"] = round(z["repeats"] / z["queries"], 4)

    # --- verdicts ---------------------------------------------------------
    d = out["hits"].get("dotp")
    peers = {t: x["cpu_us_per_query"] for t, x in out["hits"].items()
             if t != "dotp" and x.get("cpu_us_per_query")}
    tgt = "cached UDP, all hits: CPU per query <= 1/3 of the leanest cached peer, 0 lost"
    if d and d.get("cpu_us_per_query") is not None and peers:
        lean = min(peers, key=peers.get)
        verdict("cache_cpu", d["cpu_us_per_query"] <= peers[lean] / 3.0
                and d.get("lost_total") == 0,
                "dotp %.2f us/query vs leanest cached peer %s %.2f us/query "
                "(ratio %.2f); dotp %s qps, lost %s; limited by %s"
                % (d["cpu_us_per_query"], lean, peers[lean],
                   d["cpu_us_per_query"] / peers[lean], fmt(d.get("qps")),
                   fmt(d.get("lost_total")), d.get("limited_by")), tgt)
    else:
        verdict("cache_cpu", None, "not measured", tgt)
    li = out["light"].get("dotp") or {}
    tgt = "light load, all hits: dotp p50 <= the upstream's plain UDP p50 (same run)"
    if li.get("added_p50_us") is not None:
        verdict("cache_latency", li["added_p50_us"] <= 0,
                "dotp p50 %.1f us, upstream plain UDP p50 %.1f us (queries "
                "alternated): difference %+.1f us (median over %d runs)"
                % (li["p50_us"], li["paired_p50_us"], li["added_p50_us"],
                   li.get("rounds", 0)), tgt)
    else:
        verdict("cache_latency", None, "not measured", tgt)
    idle = (procs.get("dotp") or {}).get("idle_rss_kib")
    tgt = "idle RSS with the cache on <= 512 KiB"
    if idle is not None:
        verdict("cache_idle_rss", idle <= 512,
                "%d KiB (--cache-size %s, VmRSS after the first query)"
                % (idle, fmt(budget)), tgt)
    else:
        verdict("cache_idle_rss", None, "not measured", tgt)
    zd = out["zipf"].get("dotp") or {}
    lim = (budget or 0) // 1024 + 1024
    tgt = "RSS with the cache full <= budget + 1 MiB (%s KiB)" % fmt(lim)
    peaks = [v for v in [zd.get("hwm_kib"), zd.get("rss_end_kib")]
             + [(zd.get(s) or {}).get("peak_rss_kib_max")
                for s in ("zipf-cold", "zipf")] if v]
    if peaks and budget:
        ev = (zd.get("counters") or {}).get("cache_evictions")
        full = ev is not None and ev > 0
        verdict("cache_full_rss", (max(peaks) <= lim) if full else None,
                "%d KiB (VmHWM over the Zipf stream; VmRSS at its end %s KiB); "
                "cache %s" % (max(peaks), fmt(zd.get("rss_end_kib")),
                              "full: %d evictions, %s entries, %s bytes held"
                              % (ev, fmt((zd.get("counters") or {}).get("cache_entries")),
                                 fmt((zd.get("counters") or {}).get("cache_bytes")))
                              if full else "NOT shown full (no cache_evictions "
                              "on the exit line): not judged"), tgt)
    else:
        verdict("cache_full_rss", None, "not measured", tgt)
    return out


def cache_markdown(cache, meta):
    c = meta.get("cached") or {}
    z = c.get("zipf") or {}
    s = meta.get("settings") or {}
    L = []
    budget = cache.get("budget_bytes")
    L.append("## Answer caches on (equal memory: %s bytes)\n" % fmt(budget))
    L.append("After every uncached run, each forwarder again as a new process "
             "with its answer cache on; stubby has none (n/a). Names under "
             "c.bench.test. (TTL 3600 s: nothing expires during these runs). "
             "The upstream's received queries come from its control socket "
             "(unbound-control stats_noreset) before and after each run.\n")
    L.append("| target | cache setting |")
    L.append("|---|---|")
    for t, v in (cache.get("config") or {}).items():
        L.append("| %s | %s |" % (t, v))
    L.append("")
    if cache["hits"]:
        L.append("### All hits (UDP, %s names, warmed first)\n" % fmt(c.get("hit_names")))
        L.append("dnsperf `-c %s -q %s -l %s` cycling through the names, every "
                 "target every round, median over rounds. Upstream queries: "
                 "what the upstream received during the runs (0: every answer "
                 "came from the cache; dnsdist's health checks add one a "
                 "second). Cores: CPU seconds per wall second over the run (busiest "
                 "thread: the same for the process's busiest thread, sampled "
                 "every 0.25 s); machine not idle: 100%% - idle, interrupts and "
                 "softirqs (the loopback's packet work) included. Limited by: "
                 "the machine when 80%% of it or more was not idle (with its "
                 "biggest user, or a thread at 0.85 core or more), else such a "
                 "thread.\n"
                 % (s.get("clients"), s.get("outstanding"), s.get("duration_s")))
        L.append("| target | QPS | CPU µs/query | avg µs | p99 µs | lost | "
                 "upstream queries | dnsperf cores (busiest thread) | target "
                 "cores (busiest thread) | machine not idle | limited by | "
                 "idle RSS KiB | peak RSS KiB |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for t, x in cache["hits"].items():
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s (%s) | %s (%s) | %s | %s | %s | %s |" % (
                t, fmt(x.get("qps")), fmt(x.get("cpu_us_per_query"), 2),
                fmt(x.get("avg_us")), fmt(x.get("p99_us")), fmt(x.get("lost_total")),
                fmt(x.get("upstream_queries_total")), fmt(x.get("loadgen_cores"), 2),
                fmt(x.get("loadgen_max_thread_cores"), 2),
                fmt(x.get("target_cores"), 2), fmt(x.get("target_max_thread_cores"), 2),
                fmt(x.get("machine_nonidle_pct"), 0, "%"),
                x.get("limited_by") or "-", fmt(x.get("idle_rss_kib")),
                fmt(x.get("peak_rss_kib_max"))))
        hc = cache.get("hits_dotp_counters")
        if hc:
            L.append("\ndotp's exit line after these runs: " + ", ".join(
                "%s=%s" % (k, v) for k, v in hc.items() if k.startswith("cache_")
                or k in ("queries", "answers")) + ".")
        L.append("")
    if cache["light"]:
        L.append("### Light load, all hits (1 query in flight)\n")
        L.append("The same client as the light-load runs above, cycling through "
                 "%s warmed names; each query to the forwarder alternates with "
                 "one to the upstream's plain UDP port (local data from memory), "
                 "same run. Difference: forwarder p50 - upstream UDP p50, median "
                 "over runs (dotp %s runs per round, the peers one).\n"
                 % (fmt(c.get("hit_names")), s.get("light_reps", 1)))
        L.append("| target | queries | p50 µs | p90 µs | p99 µs | lost | "
                 "upstream UDP p50 µs (paired) | difference µs | runs |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t, x in cache["light"].items():
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                t, fmt(x["queries"]), fmt(x["p50_us"], 1), fmt(x["p90_us"], 1),
                fmt(x["p99_us"], 1), fmt(x["lost_total"]),
                fmt(x.get("paired_p50_us"), 1),
                "-" if x.get("added_p50_us") is None else "%+.1f" % x["added_p50_us"],
                x["rounds"]))
        L.append("")
    if cache["zipf"]:
        L.append("### Hit ratio: a Zipf stream\n")
        L.append("Names drawn with probability ~ 1/rank^%s over %s names, %s%% "
                 "of the queries a name never asked before; each target a fresh "
                 "process: %s queries (cold: the cache filling) then %s more "
                 "(the figure), dnsperf `-n 1 -c %s -q %s` through each file. "
                 "Hit ratio = 1 - queries the upstream received / queries sent. "
                 "A cache that never dropped anything would answer %s of the "
                 "second part (its queries for names asked before). RSS: VmRSS "
                 "of the process at start and after the stream.\n" % (
                     z.get("s"), fmt(z.get("names")), z.get("unique_pct"),
                     fmt(z.get("warm_queries")), fmt(z.get("queries")),
                     s.get("clients"), s.get("outstanding"),
                     "-" if cache.get("zipf_ceiling") is None
                     else "%.1f%%" % (100 * cache["zipf_ceiling"])))
        L.append("| target | hit ratio | cold hit ratio | queries sent | "
                 "upstream received | QPS | CPU µs/query | lost | RSS start → "
                 "end KiB | notes |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
        pc = lambda v: "-" if v is None else "%.1f%%" % (100 * v)
        for t, x in cache["zipf"].items():
            w, cd = x.get("zipf") or {}, x.get("zipf-cold") or {}
            notes = []
            k = x.get("counters")
            if k:
                notes.append("exit line: " + ", ".join(
                    "%s=%s" % (kk, v) for kk, v in k.items()
                    if kk.startswith("cache_")))
            if x.get("gc_status"):
                notes.append("kres-cache-gc: %s%s" % (
                    x["gc_status"], "" if x.get("gc_cpu_s") in (None, "")
                    else ", %s s CPU (not counted)" % x["gc_cpu_s"]))
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s → %s | %s |" % (
                t, pc(w.get("hit_ratio")), pc(cd.get("hit_ratio")),
                fmt(w.get("sent_total")), fmt(w.get("upstream_queries_total")),
                fmt(w.get("qps")), fmt(w.get("cpu_us_per_query"), 2),
                fmt(w.get("lost_total")), fmt(x.get("rss_start_kib")),
                fmt(x.get("rss_end_kib")), "; ".join(notes) or "-"))
        L.append("")
    return L


# the plain forwarding runs (run.sh section 9): target names in the runs
FWD_TARGETS = (
    ("dotp-plain-forward", "dotp, --forward zone", "plain UDP"),
    ("unbound-forward-zone", "unbound, forward-zone", "plain UDP"),
    ("dotp-forward-tls", "dotp, same process, names outside the zone", "TLS"),
)


def forward_report(meta, agg, verdict):
    """The plain forwarding runs (run.sh section 9): dotp with a --forward
    zone to a plain DNS server against unbound with a forward-zone to the
    same server, and dotp's TLS path in the same rounds (the same process,
    names outside the zone); adds dotp's forward_cpu verdict: plain costs
    no more CPU per query than TLS. {} when the runs did not happen."""
    f = meta.get("forward") or {}
    if not f.get("enabled"):
        return {}
    out = {"zone": f.get("zone"), "server": f.get("server"),
           "config": f.get("config") or {}, "runs": {}}
    for t, _, _ in FWD_TARGETS:
        x = (agg.get(t) or {}).get("udp/unique")
        if x:
            out["runs"][t] = x
    main = (agg.get("dotp") or {}).get("udp/unique")
    if main:
        out["dotp_tls_uncached"] = main
    procs = f.get("proc") or {}
    out["procs"] = procs
    pd = procs.get("dotp") or {}
    if pd.get("exit_line"):
        out["dotp_counters"] = exit_counters(pd["exit_line"])
    if pd.get("upstream_lines"):
        out["dotp_upstreams"] = [exit_counters(s) for s in
                                 str(pd["upstream_lines"]).split("|") if s]
    cpu = lambda x: (x or {}).get("cpu_us_per_query")
    d = cpu(out["runs"].get("dotp-plain-forward"))
    u = cpu(out["runs"].get("unbound-forward-zone"))
    tl = cpu(out["runs"].get("dotp-forward-tls"))
    tm = cpu(main)
    ratio = lambda a, b: round(a / b, 3) if a is not None and b else None
    out["ratio_dotp_unbound"] = ratio(d, u)
    out["ratio_plain_tls"] = ratio(d, tl)
    out["ratio_plain_tls_uncached"] = ratio(d, tm)
    tgt = ("plain forward zone: CPU per query <= over TLS (the same dotp, "
           "same rounds)")
    if d is not None and tl is not None:
        lost = (out["runs"]["dotp-plain-forward"].get("lost_total"))
        verdict("forward_cpu", d <= tl,
                "dotp plain-forward %.2f us/query vs unbound forward-zone %s "
                "us/query (ratio %s); dotp over TLS %.2f us/query in the same "
                "rounds (plain/TLS %.2f)%s; plain lost %s"
                % (d, fmt(u, 2), fmt(out["ratio_dotp_unbound"], 2), tl, d / tl,
                   "" if tm is None else ", %.2f us/query in the uncached runs "
                   "(plain/TLS %.2f)" % (tm, d / tm), fmt(lost)), tgt)
    else:
        verdict("forward_cpu", None, "not measured", tgt)
    return out


def forward_markdown(fwd, meta):
    s = meta.get("settings") or {}
    L = ["## Plain forwarding (--forward to a plain DNS server)\n"]
    L.append("dotp with `--forward %s=%s --no-cache` (every query under the "
             "zone forwarded over plain UDP from a pool of sockets on random ports; `-u` "
             "the TLS upstream as everywhere) against unbound with a "
             "forward-zone for the same zone to the same server (otherwise "
             "the uncached runs' unbound: \".\" over TLS, caches as small as "
             "they go). The server is the upstream unbound's plain port: the "
             "same local data as over DoT. Both are new processes after every "
             "other run. dnsperf `-c %s -q %s -l %s` over UDP, unique names "
             "under the zone (fresh each round, the same file for both: "
             "every query misses; upstream received ≈ sent shows each one "
             "was forwarded); dotp over TLS: the same dotp process with "
             "unique names outside the zone, in the same rounds. Medians over "
             "rounds; CPU µs/query: utime+stime of the process (all threads) over "
             "the run / answered queries.\n" % (fwd.get("zone"), fwd.get("server"),
                              s.get("clients"), s.get("outstanding"),
                              s.get("duration_s")))
    L.append("| target | to the server | QPS | CPU µs/query | upstream CPU µs/q | "
             "avg µs | p50 µs | p99 µs | lost | upstream received / sent | "
             "TLS conns max | peak RSS KiB | rounds |")
    L.append("|---|---|" + "---:|" * 11)
    rows = [(t, label, path, fwd["runs"].get(t)) for t, label, path in FWD_TARGETS]
    if fwd.get("dotp_tls_uncached"):
        rows.append(("dotp", "the uncached runs above", "TLS",
                     fwd["dotp_tls_uncached"]))
    for t, label, path, x in rows:
        if not x:
            continue
        rcv = x.get("upstream_queries_total")
        L.append("| %s (%s) | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            t, label, path, fmt(x.get("qps")), fmt(x.get("cpu_us_per_query"), 2),
            fmt(x.get("upstream_cpu_us_per_query"), 2), fmt(x.get("avg_us")),
            fmt(x.get("p50_us")), fmt(x.get("p99_us")), fmt(x.get("lost_total")),
            "-" if rcv is None else "%s / %s" % (fmt(rcv), fmt(x.get("sent_total"))),
            fmt(x.get("tls_conns_max")), fmt(x.get("peak_rss_kib_max")),
            "%d%s" % (x["rounds"], " (%d failed)" % x["rounds_failed"]
                      if x["rounds_failed"] else "")))
    cpu = lambda t: (fwd["runs"].get(t) or {}).get("cpu_us_per_query")
    d, u, tl = cpu("dotp-plain-forward"), cpu("unbound-forward-zone"), \
        cpu("dotp-forward-tls")
    tm = (fwd.get("dotp_tls_uncached") or {}).get("cpu_us_per_query")
    if d is not None:
        L.append("\n**CPU per query, plain forward zone**: dotp %s µs, unbound "
                 "forward-zone %s µs (dotp/unbound %s); dotp over TLS %s µs in "
                 "the same rounds (plain/TLS %s)%s.\n" % (
                     fmt(d, 2), fmt(u, 2), fmt(fwd.get("ratio_dotp_unbound"), 2),
                     fmt(tl, 2), fmt(fwd.get("ratio_plain_tls"), 2),
                     "" if tm is None else ", %s µs in the uncached runs above "
                     "(plain/TLS %s)" % (fmt(tm, 2),
                                         fmt(fwd.get("ratio_plain_tls_uncached"), 2))))
    else:
        L.append("")
    ups = fwd.get("dotp_upstreams")
    if ups or fwd.get("dotp_counters"):
        parts = []
        for x in ups or []:
            parts.append("%s: %s" % (x.get("upstream", "?"), ", ".join(
                "%s=%s" % kv for kv in x.items() if kv[0] != "upstream")))
        if fwd.get("dotp_counters"):
            parts.append("process: " + ", ".join(
                "%s=%s" % kv for kv in fwd["dotp_counters"].items()))
        L.append("dotp's exit lines after these runs: " + "; ".join(parts) + ".\n")
    return L


# the rate limiter runs (run.sh section 10): target names in the runs
RL_TARGETS = (("off", "dotp-ratelimit-off"), ("on", "dotp-ratelimit-on"))
RL_MAX_ADDED_PCT = 5.0


def ratelimit_report(meta, agg, runs, verdict):
    """The rate limiter runs (run.sh section 10): two dotp processes with
    the cache on, one with --rate-limit far above the load, the all-hits
    load alternated round by round. CPU per query with and without, the
    difference of the medians and the median of the per-round differences
    (the two measured back to back); adds the ratelimit_cpu verdict. {}
    when the runs did not happen."""
    rlm = meta.get("ratelimit") or {}
    if not rlm.get("enabled"):
        return {}
    procs = rlm.get("proc") or {}
    out = {"limit": rlm.get("limit"), "config": rlm.get("config") or {},
           "runs": {}, "procs": procs, "counters": {}}
    for k, t in RL_TARGETS:
        x = (agg.get(t) or {}).get("udp/hits")
        if x:
            out["runs"][k] = dict(x, idle_rss_kib=(procs.get(k) or {}).get("idle_rss_kib"))
        if (procs.get(k) or {}).get("exit_line"):
            out["counters"][k] = exit_counters(procs[k]["exit_line"])
    per = {}
    names = dict((t, k) for k, t in RL_TARGETS)
    for r in runs:
        if r.get("kind") == "load" and r.get("target") in names and "error" not in r \
                and r.get("cpu_us_per_query"):
            per.setdefault(r["round"], {})[names[r["target"]]] = r["cpu_us_per_query"]
    out["rounds"] = []
    for rnd in sorted(per):
        v = per[rnd]
        if "on" in v and "off" in v:
            out["rounds"].append({"round": rnd, "off": v["off"], "on": v["on"],
                                  "diff_us": round(v["on"] - v["off"], 2),
                                  "diff_pct": round(100.0 * (v["on"] - v["off"])
                                                    / v["off"], 1)})
    cpu = lambda k: (out["runs"].get(k) or {}).get("cpu_us_per_query")
    off, on = cpu("off"), cpu("on")
    out["cpu_off"], out["cpu_on"] = off, on
    if off and on is not None:
        out["diff_us"] = round(on - off, 2)
        out["diff_pct"] = round(100.0 * (on - off) / off, 1)
    if out["rounds"]:
        out["paired_diff_us"] = med([x["diff_us"] for x in out["rounds"]])
        out["paired_diff_pct"] = med([x["diff_pct"] for x in out["rounds"]])
    c = out["counters"].get("on") or {}
    limited = None
    if "ratelimit_truncated" in c or "ratelimit_dropped" in c:
        limited = c.get("ratelimit_truncated", 0) + c.get("ratelimit_dropped", 0)
    out["limited_queries"] = limited
    tgt = ("rate limiter: CPU per query with --rate-limit %s (nothing limited) <= "
           "%.0f%% more than without (all hits, same rounds)"
           % (out["limit"], RL_MAX_ADDED_PCT))
    if out.get("paired_diff_pct") is not None and off and on is not None:
        lost = sum((out["runs"].get(k) or {}).get("lost_total") or 0 for k in ("off", "on"))
        verdict("ratelimit_cpu",
                out["paired_diff_pct"] <= RL_MAX_ADDED_PCT and not limited and lost == 0,
                "dotp %.2f us/query with the limit, %.2f without: %+.2f us (%+.1f%%); "
                "median of the per-round differences %+.2f us (%+.1f%%), %d round(s); "
                "%s queries limited (exit line ratelimit_truncated + "
                "_dropped), lost %d"
                % (on, off, out["diff_us"], out["diff_pct"], out["paired_diff_us"],
                   out["paired_diff_pct"], len(out["rounds"]),
                   "?" if limited is None else limited, lost), tgt)
    else:
        verdict("ratelimit_cpu", None, "not measured", tgt)
    return out


def ratelimit_markdown(rl, meta):
    s = meta.get("settings") or {}
    c = meta.get("ratelimit") or {}
    L = ["## Rate limiter cost (--rate-limit %s, nothing limited)\n" % rl.get("limit")]
    L.append("Two new dotp processes with the answer cache on (%s bytes), identical "
             "but for `--rate-limit %s` (the spec's maximum QPS and BURST, far above "
             "the load: every query takes a token, none is ever short of one). The "
             "cache runs' all-hits load: %s names under c.bench.test. warmed, then "
             "dnsperf `-c %s -q %s -l %s` over UDP cycling through them; each round "
             "both, the order alternated from round to round. Medians over rounds; "
             "CPU µs/query: utime+stime of the process over the run / answered "
             "queries. dnsperf's queries all come from 127.0.0.1: one client.\n"
             % (fmt(c.get("cache_bytes")), rl.get("limit"),
                fmt(c.get("hit_names") or "?"), s.get("clients"), s.get("outstanding"),
                s.get("duration_s")))
    L.append("| target | QPS | CPU µs/query | avg µs | p50 µs | p99 µs | lost | "
             "upstream received | idle RSS KiB | peak RSS KiB | rounds |")
    L.append("|---|" + "---:|" * 10)
    for k, t in RL_TARGETS:
        x = rl["runs"].get(k)
        if not x:
            continue
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            t, fmt(x.get("qps")), fmt(x.get("cpu_us_per_query"), 2),
            fmt(x.get("avg_us")), fmt(x.get("p50_us")), fmt(x.get("p99_us")),
            fmt(x.get("lost_total")), fmt(x.get("upstream_queries_total")),
            fmt(x.get("idle_rss_kib")), fmt(x.get("peak_rss_kib_max")),
            "%d%s" % (x["rounds"], " (%d failed)" % x["rounds_failed"]
                      if x["rounds_failed"] else "")))
    if rl.get("diff_us") is not None:
        L.append("\n**CPU per query, rate limiter**: %s µs with, %s µs without: "
                 "%+.2f µs (%+.1f%%); per round (on - off, back to back): %s; "
                 "median %+.2f µs (%+.1f%%).\n" % (
                     fmt(rl["cpu_on"], 2), fmt(rl["cpu_off"], 2), rl["diff_us"],
                     rl["diff_pct"], ", ".join("r%d %+.2f µs (%+.1f%%)" % (
                         x["round"], x["diff_us"], x["diff_pct"]) for x in rl["rounds"])
                     or "-", rl.get("paired_diff_us") or 0.0,
                     rl.get("paired_diff_pct") or 0.0))
    else:
        L.append("")
    on = rl["counters"].get("on")
    if on:
        L.append("dotp-ratelimit-on's exit line: " + ", ".join(
            "%s=%s" % kv for kv in on.items() if kv[0].startswith("ratelimit")
            or kv[0] in ("queries", "answers", "cache_hits")) + ".\n")
    return L


def do_report(a):
    cg = None
    if a.from_json:
        # re-render an earlier results.json (e.g. after changing this report)
        with open(a.from_json) as f:
            old = json.load(f)
        meta, runs, cg = old["meta"], old["runs"], old.get("callgrind")
    else:
        if not (a.meta and a.runs):
            print("report: --meta and --runs, or --from-json", file=sys.stderr)
            return 2
        meta = load_meta(a.meta)
        runs = []
        with open(a.runs) as f:
            for line in f:
                line = line.strip()
                if line:
                    runs.append(json.loads(line))
    auto = []       # caveats found in the data, kept apart from run.sh's
    if a.callgrind and os.path.exists(a.callgrind):
        try:
            with open(a.callgrind) as f:
                cg = json.load(f)
        except ValueError:
            cg = {"error": "unreadable callgrind result"}

    targets = meta["targets_measured"]
    order = targets + ["upstream"]

    # --- medians per (target, transport, names) over rounds -------------
    summary = {}
    for r in runs:
        if r["kind"] != "load":
            continue
        key = "%s/%s" % (r["transport"], r["names"])
        summary.setdefault(r["target"], {}).setdefault(key, []).append(r)
    agg = {}
    for t, scen in summary.items():
        for key, rs in scen.items():
            ok = [x for x in rs if "error" not in x]
            agg.setdefault(t, {})[key] = {
                "rounds": len(rs),
                "rounds_failed": len(rs) - len(ok),
                "qps": med([x.get("qps") for x in ok]),
                "cpu_us_per_query": med([x.get("cpu_us_per_query") for x in ok]),
                "upstream_cpu_us_per_query":
                    med([x.get("upstream_cpu_us_per_query") for x in ok]),
                "avg_us": med([x.get("avg_us") for x in ok]),
                "p50_us": med([x.get("p50_us") for x in ok]),
                "p90_us": med([x.get("p90_us") for x in ok]),
                "p99_us": med([x.get("p99_us") for x in ok]),
                "dnsperf_avg_us": med([x.get("dnsperf_avg_us") for x in ok]),
                "dnsperf_stddev_us": med([x.get("dnsperf_stddev_us") for x in ok]),
                "lost_median": med([x.get("lost") for x in ok]),
                "over_30ms_pct": med([100.0 * x.get("over_30ms", 0) / x["n"]
                                      for x in ok if x.get("n")]),
                "lost_total": sum(x.get("lost", 0) or 0 for x in ok),
                "non_noerror_total": sum((x.get("completed", 0) or 0)
                                         - (x.get("noerror", 0) or 0) for x in ok),
                "peak_rss_kib_max": max([x["peak_rss_kib"] for x in ok
                                         if x.get("peak_rss_kib")] or [None]
                                        , key=lambda v: v or 0),
                "tls_conns_max": max([x["tls_conns_max"] for x in ok
                                      if x.get("tls_conns_max") is not None]
                                     or [None], key=lambda v: v or 0),
                "tls_conns_distinct_max": max(
                    [x["tls_conns_distinct"] for x in ok
                     if x.get("tls_conns_distinct") is not None] or [None],
                    key=lambda v: v or 0),
                "names_repeated": any(x.get("names_repeated") for x in ok),
                # who used the CPU (cores = CPU s per wall s), and for the
                # cache runs what reached the upstream
                "loadgen_cores": med([x.get("loadgen_cores") for x in ok]),
                "target_cores": med([x.get("target_cores") for x in ok]),
                "upstream_cores": med([x.get("upstream_cores") for x in ok]),
                "machine_busy_pct": med([x.get("machine_busy_pct") for x in ok]),
                "machine_nonidle_pct": med([x.get("machine_nonidle_pct") for x in ok]),
                "foreign_cpu_pct": med([x.get("foreign_cpu_pct") for x in ok]),
                "loadgen_max_thread_cores":
                    med([x.get("loadgen_max_thread_cores") for x in ok]),
                "loadgen_threads": med([x.get("loadgen_threads") for x in ok]),
                "target_max_thread_cores":
                    med([x.get("target_max_thread_cores") for x in ok]),
                "target_threads": med([x.get("target_threads") for x in ok]),
                "sent_total": sum(x.get("sent", 0) or 0 for x in ok),
                "upstream_queries_total": sum(x["upstream_queries"] for x in ok)
                if ok and all(x.get("upstream_queries") is not None for x in ok)
                else None,
                "hit_ratio": med([x.get("hit_ratio") for x in ok]),
            }
    light = {}
    for r in runs:
        if r["kind"] == "light":
            light.setdefault("%s/%s" % (r["target"], r["transport"]), []).append(r)
    light_agg = {}
    for k, rs in light.items():
        light_agg[k] = {
            "rounds": len(rs),
            "p50_us": med([x.get("p50_us") for x in rs]),
            "p90_us": med([x.get("p90_us") for x in rs]),
            "p99_us": med([x.get("p99_us") for x in rs]),
            "avg_us": med([x.get("avg_us") for x in rs]),
            "queries": sum(x.get("sent", 0) for x in rs),
            "lost_total": sum(x.get("lost", 0) for x in rs),
        }
        prs = [x["pair"] for x in rs if x.get("pair")]
        if prs:
            light_agg[k]["paired_transport"] = prs[0].get("transport", "dot")
            light_agg[k]["paired_p50_us"] = \
                med([x.get("p50_us") for x in prs])
            light_agg[k]["paired_p99_us"] = \
                med([x.get("p99_us") for x in prs])
            light_agg[k]["added_p50_us"] = \
                med([x.get("added_p50_us") for x in rs])

    # --- resperf: highest rate with under 1% loss, medians over rounds ----
    rsp = {}
    for r in runs:
        if r["kind"] == "resperf":
            rsp.setdefault("%s/%s" % (r["target"], r["transport"]), []).append(r)
    resperf_agg = {}
    for k, rs in rsp.items():
        ok = [x for x in rs if "error" not in x and x.get("peak_qps") is not None]
        lb = sum(1 for x in ok if x.get("lower_bound"))
        ended = {}
        for x in ok:
            e = x.get("ended", "?")
            ended[e] = ended.get(e, 0) + 1
        resperf_agg[k] = {
            "rounds": len(rs),
            "rounds_failed": len(rs) - len(ok),
            "peak_qps": med([x["peak_qps"] for x in ok]),
            "peak_qps_rounds": [x["peak_qps"] for x in ok],
            "lower_bound_rounds": lb,
            # most rounds ended before any interval lost 1%: the median is
            # what the client reached, not where the target started losing
            "lower_bound": bool(ok) and 2 * lb > len(ok),
            "latency_at_peak_us": med([(x.get("peak") or {}).get("latency_us")
                                       for x in ok]),
            "first_loss_sent_qps": med([(x.get("first_loss") or {}).get("sent_qps")
                                        for x in ok]),
            "max_answered_qps_any_loss": med([x.get("max_answered_qps_any_loss")
                                              for x in ok]),
            "resperf_max_throughput": med([x.get("resperf_max_throughput")
                                           for x in ok]),
            "ended": ended,
            "tls_conns_max": max([x["tls_conns_max"] for x in ok
                                  if x.get("tls_conns_max") is not None]
                                 or [None], key=lambda v: v or 0),
            "peak_rss_kib_max": max([x["peak_rss_kib"] for x in ok
                                     if x.get("peak_rss_kib")] or [None],
                                    key=lambda v: v or 0),
            "names_repeated": any(x.get("names_repeated") for x in rs),
        }

    # --- per-target memory and connections over the whole run -----------
    procs = meta.get("processes", {})
    per_target = {}
    for t in targets:
        rs = [r for r in runs if r["target"] == t and r["kind"] == "load"
              and "error" not in r]
        peaks = [r["peak_rss_kib"] for r in rs if r.get("peak_rss_kib")]
        conns = [r["tls_conns_max"] for r in rs
                 if r.get("tls_conns_max") is not None]
        per_target[t] = {
            "idle_rss_kib": procs.get(t, {}).get("idle_rss_kib"),
            "start_rss_kib": procs.get(t, {}).get("start_rss_kib"),
            "peak_rss_kib": max(peaks + [procs.get(t, {}).get("final_hwm_kib")
                                         or 0]) or None,
            "final_hwm_kib": procs.get(t, {}).get("final_hwm_kib"),
            "tls_conns_max": max(conns) if conns else None,
            "tls_conns_min_during_load": min(
                [r["tls_conns_min"] for r in rs
                 if r.get("tls_conns_min") is not None] or [None],
                key=lambda v: v if v is not None else 1 << 30),
        }

    # --- verdicts (measured, not asserted) -------------------------------
    V = []

    def verdict(name, ok, measured, target):
        V.append({"name": name, "ok": ok, "measured": measured,
                  "target": target})

    g = lambda t, k, f: (agg.get(t, {}).get(k) or {}).get(f)
    d_cpu = g("dotp", "udp/unique", "cpu_us_per_query")
    peers = [t for t in targets if t != "dotp"]
    peer_cpu = {t: g(t, "udp/unique", "cpu_us_per_query") for t in peers}
    peer_cpu = {t: v for t, v in peer_cpu.items() if v}
    if d_cpu is not None and peer_cpu:
        lean = min(peer_cpu, key=peer_cpu.get)
        verdict("cpu", d_cpu <= peer_cpu[lean] / 3.0,
                "dotp %.2f us/query vs leanest peer %s %.2f us/query "
                "(ratio %.2f)" % (d_cpu, lean, peer_cpu[lean],
                                  d_cpu / peer_cpu[lean]),
                "uncached UDP CPU per query <= 1/3 of the leanest peer")
    else:
        verdict("cpu", None, "not measured", "uncached UDP CPU per query "
                "<= 1/3 of the leanest peer")
    d_qps = g("dotp", "udp/unique", "qps")
    ceil = g("upstream", "dot/unique", "qps")
    d_lost = g("dotp", "udp/unique", "lost_total")
    if d_qps and ceil:
        verdict("throughput", d_qps >= 0.9 * ceil and d_lost == 0,
                "dotp %.0f qps = %.1f%% of the upstream DoT ceiling %.0f qps, "
                "lost %d" % (d_qps, 100.0 * d_qps / ceil, ceil, d_lost),
                "UDP unique throughput >= 90% of the upstream DoT ceiling, 0 lost")
    else:
        verdict("throughput", None, "not measured", ">= 90% of DoT ceiling")
    ld = light_agg.get("dotp/udp") or {}
    lp = ld.get("p50_us")
    lu = ld.get("paired_p50_us")
    if lu is None:
        lu = (light_agg.get("upstream/dot") or {}).get("p50_us")
    added = ld.get("added_p50_us")
    if added is None and lp is not None and lu is not None:
        added = lp - lu
    if added is not None:
        verdict("latency", added <= 50,
                "dotp UDP p50 %.1f us, upstream DoT p50 %.1f us (queries "
                "alternated): added %+.1f us (median over %d runs)%s"
                % (lp, lu, added, ld.get("rounds", 0),
                   "" if (light_agg.get("relay/udp") or {}).get("added_p50_us") is None
                   else "; hop floor: a minimal UDP relay adds %+.1f us over "
                   "direct UDP" % light_agg["relay/udp"]["added_p50_us"]),
                "light-load p50 added latency <= 50 us")
    else:
        verdict("latency", None, "not measured", "added p50 <= 50 us")
    dt = per_target.get("dotp", {})
    if dt.get("idle_rss_kib") is not None:
        verdict("idle_rss", dt["idle_rss_kib"] <= 512,
                "%d KiB (VmRSS after the first query, before load; %s KiB "
                "before any query)" % (dt["idle_rss_kib"], dt.get("start_rss_kib")),
                "idle RSS <= 512 KiB")
    pk = max([v for v in (dt.get("peak_rss_kib"), dt.get("final_hwm_kib"))
              if v] or [0]) or None
    if pk:
        verdict("peak_rss", pk <= 2048, "%d KiB (VmHWM)" % pk,
                "peak RSS <= 2 MiB")
    b = meta.get("binary", {})
    if b.get("size") is not None:
        verdict("binary", b["size"] <= 262144 and b.get("stripped", False),
                "%d bytes (%s)" % (b["size"], "stripped" if b.get("stripped")
                                   else "NOT stripped"),
                "stripped binary <= 256 KiB (262,144 bytes)")
    im = meta.get("image", {})
    if im.get("uncompressed") is not None:
        verdict("image", im["uncompressed"] <= 300000,
                "%d bytes uncompressed" % im["uncompressed"],
                "image <= 300 KB (300,000 bytes)")
    else:
        verdict("image", None, im.get("error", "not measured"),
                "image <= 300 KB (300,000 bytes)")
    if dt.get("tls_conns_max") is not None:
        verdict("tls_conns", dt["tls_conns_max"] == 1
                and dt.get("tls_conns_min_during_load") == 1,
                "max %s, min %s during dotp's load runs (sampled every 0.2 s)"
                % (dt["tls_conns_max"], dt.get("tls_conns_min_during_load")),
                "exactly 1 TLS connection to the upstream")

    cache = cache_report(meta, agg, light_agg, runs, verdict)
    forward = forward_report(meta, agg, verdict)
    ratelimit = ratelimit_report(meta, agg, runs, verdict)

    for kind in ("load", "light", "resperf"):
        stolen = [r for r in runs if r["kind"] == kind
                  and (r.get("steal_pct") or 0) > 5]
        if stolen:
            auto.append(
                "%d of %d %s runs lost more than 5%% of the machine's CPU to "
                "the hypervisor (steal, max %.0f%%): those runs are slower and "
                "their latencies higher, for every target in them"
                % (len(stolen), sum(1 for r in runs if r["kind"] == kind),
                   kind, max(r["steal_pct"] for r in stolen)))
        busy = [r for r in runs if r["kind"] == kind
                and (r.get("foreign_cpu_pct") or 0) > 10]
        if busy:
            auto.append(
                "%d of %d %s runs had more than 10%% of the machine's CPU used "
                "by other processes (max %.0f%%): other work on this machine "
                "skewed them" % (len(busy), sum(1 for r in runs
                                                if r["kind"] == kind),
                                 kind, max(r["foreign_cpu_pct"] for r in busy)))
    for t, scen in agg.items():
        for key, x in scen.items():
            if x["names_repeated"]:
                auto.append("%s %s: the unique-name file wrapped "
                                       "(names repeated within a run)" % (t, key))
            if x["rounds_failed"]:
                auto.append("%s %s: %d round(s) failed (see runs)"
                                       % (t, key, x["rounds_failed"]))
            if x["non_noerror_total"]:
                auto.append("%s %s: %d answers were not NOERROR"
                                       % (t, key, x["non_noerror_total"]))
    for k, x in resperf_agg.items():
        if x["rounds_failed"]:
            auto.append("resperf %s: %d round(s) failed (see runs)"
                        % (k, x["rounds_failed"]))
        if x["names_repeated"]:
            auto.append("resperf %s: the query file wrapped (names repeated)" % k)
    result = {"meta": meta, "summary": agg, "light": light_agg,
              "cache": cache,
              "forward": forward,
              "ratelimit": ratelimit,
              "resperf": resperf_agg,
              "per_target": per_target, "callgrind": cg, "verdicts": V,
              "caveats_from_data": auto, "runs": runs}
    with open(a.out_json, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")

    # --- markdown --------------------------------------------------------
    L = []
    s = meta["settings"]
    L.append("# dotp benchmark results\n")
    L.append("- date: %s; command: `%s`; wall time %s s" %
             (meta["date"], meta["command"], meta.get("elapsed_s", "?")))
    m = meta["machine"]
    L.append("- machine: %s cores, %s, kernel %s, %s MiB RAM" %
             (m["nproc"], m["cpu_model"], m["kernel"], m.get("mem_mib")))
    L.append("- load: dnsperf %s, `-c %d -q %d` (%d queries in flight at most, "
             "under dotp's --conn-queries 128: its single-connection path), "
             "%s s per run, %d rounds, targets alternated each round; "
             "median over rounds" %
             (meta["versions"].get("dnsperf", "?"), s["clients"],
              s["outstanding"], s["outstanding"], s["duration_s"], s["rounds"]))
    if meta.get("name_check"):
        L.append("- name check (each forwarder told to expect wrong.bench, "
                 "upstream presents upstream.bench; no answer must come "
                 "through): " + ", ".join("%s %s" % kv for kv in
                                          meta["name_check"].items()))
    L.append("- versions: " + ", ".join("%s %s" % (k, v) for k, v in
                                        meta["versions"].items()))
    L.append("")
    def light_cell(x):
        if not x:
            return "-"
        if x.get("added_p50_us") is None:
            return fmt(x.get("p50_us"), 1)
        return "%s (%+.1f)" % (fmt(x.get("p50_us"), 1), x["added_p50_us"])

    main_at = len(L)       # the uncached comparison's tables start here
    L.append("## Summary (UDP, unique names: every query misses every cache)\n")
    def resperf_cell(x):
        if not x or x.get("peak_qps") is None:
            return "-"
        return ("≥" if x.get("lower_bound") else "") + fmt(x["peak_qps"])

    L.append("| target | QPS | CPU µs/query | avg µs | p50 µs | p99 µs | lost | "
             "resperf peak QPS (<1% loss) | "
             "TCP QPS | TCP CPU µs/q | UDP repeat QPS | idle RSS KiB | "
             "peak RSS KiB | TLS conns | light p50 µs (added) | cache |")
    L.append("|---|" + "---:|" * 14 + "---|")
    for t in order:
        u = agg.get(t, {}).get("udp/unique" if t != "upstream" else "dot/unique", {})
        tcp = agg.get(t, {}).get("tcp/unique", {})
        rep = agg.get(t, {}).get("udp/repeat", {})
        pt = per_target.get(t, {})
        lk = "upstream/dot" if t == "upstream" else t + "/udp"
        name = t if t != "upstream" else "upstream direct (DoT)"
        rk = "upstream/dot" if t == "upstream" else t + "/udp"
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            name, fmt(u.get("qps")), fmt(u.get("cpu_us_per_query"), 2),
            fmt(u.get("avg_us")), fmt(u.get("p50_us")), fmt(u.get("p99_us")),
            fmt(u.get("lost_total")), resperf_cell(resperf_agg.get(rk)),
            fmt(tcp.get("qps")),
            fmt(tcp.get("cpu_us_per_query"), 2), fmt(rep.get("qps")),
            fmt(pt.get("idle_rss_kib")), fmt(pt.get("peak_rss_kib")),
            fmt(pt.get("tls_conns_max")),
            light_cell(light_agg.get(lk)),
            meta.get("cache", {}).get(t, "-")))
    up_udp = agg.get("upstream", {}).get("udp/unique", {})
    if up_udp:
        L.append("| upstream direct (plain UDP) | %s | %s | %s | %s | %s | %s | %s | | | | | | | %s | none (local data) |" % (
            fmt(up_udp.get("qps")), fmt(up_udp.get("cpu_us_per_query"), 2),
            fmt(up_udp.get("avg_us")), fmt(up_udp.get("p50_us")),
            fmt(up_udp.get("p99_us")), fmt(up_udp.get("lost_total")),
            resperf_cell(resperf_agg.get("upstream/udp")),
            fmt((light_agg.get("upstream/udp") or {}).get("p50_us"), 1)))
    L.append("")
    L.append("CPU µs/query: utime+stime of the forwarder process (all threads) "
             "over the run / answered queries; for the upstream rows, of the "
             "upstream unbound. TLS conns: most established connections to "
             "127.0.0.1:853 held at once by the process during its load runs. "
             "Light p50: one query in flight at a time (own closed-loop "
             "client), UDP to the forwarder, or DoT / UDP straight to the "
             "upstream; (added): minus the upstream's DoT p50 measured "
             "alternately in the same run.%s\n" % (
                 " resperf peak: the highest rate answered before the first "
                 "interval of resperf's ramp that lost 1% or more of its "
                 "queries (see below); ≥: the ramp ended before any interval "
                 "lost 1% (the client's limit, a lower bound)."
                 if resperf_agg else ""))
    L.append("## Every scenario (medians over rounds)\n")
    L.append("| target | transport | names | QPS | CPU µs/q | upstream CPU µs/q | "
             "avg µs | p50 µs | p90 µs | p99 µs | > 30 ms | lost | non-NOERROR | "
             "peak RSS KiB | TLS conns max | conns opened max | rounds |")
    L.append("|---|---|---|" + "---:|" * 14)
    for t in order:
        for key in ("udp/unique", "tcp/unique", "udp/repeat", "tcp/repeat",
                    "dot/unique"):
            x = agg.get(t, {}).get(key)
            if not x:
                continue
            tr, nm = key.split("/")
            L.append("| %s | %s | %s%s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                t, tr, nm, " (WRAPPED)" if x["names_repeated"] else "",
                fmt(x["qps"]), fmt(x["cpu_us_per_query"], 2),
                fmt(x["upstream_cpu_us_per_query"], 2), fmt(x["avg_us"]),
                fmt(x["p50_us"]), fmt(x["p90_us"]), fmt(x["p99_us"]),
                fmt(x["over_30ms_pct"], 2, "%"), fmt(x["lost_total"]), fmt(x["non_noerror_total"]),
                fmt(x["peak_rss_kib_max"]), fmt(x["tls_conns_max"]),
                fmt(x["tls_conns_distinct_max"]),
                "%d%s" % (x["rounds"], " (%d failed)" % x["rounds_failed"]
                          if x["rounds_failed"] else "")))
    L.append("")
    if resperf_agg:
        rs_set = s.get("resperf") or {}
        L.append("## Peak rate with under 1% loss (resperf)\n")
        L.append("`%s` (unique names, fresh each round; plain UDP to each "
                 "forwarder and to the upstream, DoT to the upstream): the rate "
                 "ramps up linearly; every %s s interval of the ramp is judged "
                 "by the queries sent in it: lost = no NOERROR or NXDOMAIN answer within "
                 "%s s (no answer, or a failure rcode). Peak = the highest "
                 "answered rate over the intervals before the first one that "
                 "lost 1%% or more; median over rounds. resperf busy-waits: it "
                 "takes about one of the 2 cores for the whole run, so the "
                 "forwarder and the upstream share what is left (lower than the "
                 "dnsperf QPS above). Over DoT (TCP) nothing is dropped: "
                 "queries wait in the connection, so that row is mostly how "
                 "fast resperf itself could send. Runs come after all the other "
                 "load and light runs, so the extra upstream connections and "
                 "memory a flood brings do not show in the figures above.\n" % (
                     rs_set.get("command", "resperf"),
                     rs_set.get("interval_s", "?"),
                     rs_set.get("timeout_s", "?")))
        L.append("| target | transport | peak QPS (<1% loss) | per round | "
                 "avg µs at peak | sent QPS at first ≥1% loss | most answered "
                 "QPS (any loss) | resperf -L figure | ramp ended by | "
                 "TLS conns max | peak RSS KiB |")
        L.append("|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|")
        for t in order:
            for tr in ("udp", "dot"):
                x = resperf_agg.get("%s/%s" % (t, tr))
                if not x:
                    continue
                L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    t, tr, resperf_cell(x),
                    ", ".join(fmt(v) for v in x["peak_qps_rounds"]) or "-",
                    fmt(x["latency_at_peak_us"]),
                    fmt(x["first_loss_sent_qps"]),
                    fmt(x["max_answered_qps_any_loss"]),
                    fmt(x["resperf_max_throughput"]),
                    ", ".join("%s (%d)" % kv for kv in sorted(x["ended"].items()))
                    or "-",
                    fmt(x["tls_conns_max"]) if t != "upstream" else "-",
                    fmt(x["peak_rss_kib_max"]) if t != "upstream" else "-"))
        L.append("")
        L.append("Ramp ended by: client fell behind = resperf could not send "
                 "on schedule (it stops when %s queries behind); outstanding "
                 "limit = 65,536 queries unanswered at once; ramp done = it "
                 "reached the maximum rate. resperf -L figure: resperf's own "
                 "report with -L 1 (the same rule, but failure rcodes count as "
                 "answers and an interval must lose more than 1%% to stop it). "
                 "peak RSS: VmHWM over a resperf run (reset before it).\n"
                 % rs_set.get("fall_behind", "?"))
    L.append("## Light load (1 query in flight, closed loop)\n")
    L.append("Each forwarder's UDP queries alternate with DoT queries sent "
             "straight to the upstream by the same client (one in flight); "
             "added = forwarder p50 - upstream DoT p50 of the same run "
             "(median over runs: %s per target per round, each a new client "
             "and so a new DoT connection). The upstream rows are runs of their "
             "own.\n" % s.get("light_reps", 1))
    L.append("| target | transport | queries | p50 µs | p90 µs | p99 µs | avg µs | "
             "lost | upstream DoT p50 µs (paired) | added p50 µs |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in order:
        for tr in ("udp", "dot"):
            x = light_agg.get("%s/%s" % (t, tr))
            if x:
                L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    t, tr, fmt(x["queries"]), fmt(x["p50_us"], 1),
                    fmt(x["p90_us"], 1), fmt(x["p99_us"], 1),
                    fmt(x["avg_us"], 1), fmt(x["lost_total"]),
                    fmt(x.get("paired_p50_us"), 1),
                    "-" if x.get("added_p50_us") is None
                    else "%+.1f" % x["added_p50_us"]))
    rl = light_agg.get("relay/udp")
    if rl:
        L.append("\n**Hop floor.** `bench/relay.c` is a blocking UDP relay with one "
                 "query in flight, no parsing and no TLS; it sits in front of the "
                 "upstream's plain UDP port and its queries alternate with plain UDP "
                 "queries straight to that port. What it adds is what any extra "
                 "process on the path costs on this machine (two more sends and two "
                 "more wake-ups per query), not work: relay p50 %s µs, direct UDP "
                 "p50 %s µs (paired), added %s µs (median over %d runs).\n" % (
                     fmt(rl["p50_us"], 1), fmt(rl.get("paired_p50_us"), 1),
                     "-" if rl.get("added_p50_us") is None
                     else "%+.1f" % rl["added_p50_us"], rl["rounds"]))
    if added is not None:
        lu2 = (light_agg.get("upstream/udp") or {}).get("p50_us")
        L.append("\ndotp added p50 latency: %+.1f µs over the upstream via "
                 "DoT directly%s.\n" % (added, "" if lu2 is None else
                                        " (dotp p50 %+.1f µs over plain UDP "
                                        "straight to the upstream, separate runs)"
                                        % (lp - lu2)))
    if not targets:
        # BENCH_ONLY=forward|ratelimit: no uncached comparison ran, no
        # empty tables
        only = s.get("only") or "forward"
        del L[main_at:]
        L.append("Only the %s runs (BENCH_ONLY=%s): no comparison with the "
                 "other forwarders, no resperf, cache or light-load runs.\n"
                 % ({"forward": "plain forwarding",
                     "ratelimit": "rate limiter"}.get(only, only), only))
    if cache:
        L.extend(cache_markdown(cache, meta))
    if forward:
        L.extend(forward_markdown(forward, meta))
    if ratelimit:
        L.extend(ratelimit_markdown(ratelimit, meta))
    if cg:
        L.append("## Instructions (callgrind)\n")
        if "error" in cg:
            L.append("callgrind: %s\n" % cg["error"])
        else:
            L.append("- %s queries, one in flight: **%s instructions per "
                     "query** ((Ir(N queries) - Ir(0 queries)) / N, handshake "
                     "included); %s per query in steady state ((Ir(1+N) - "
                     "Ir(1)) / N, handshake excluded); TLS handshake and first "
                     "query ≈ %s instructions; start-up and exit %s." % (
                         fmt(cg["queries"]), fmt(cg.get("ir_per_query")),
                         fmt(cg.get("ir_per_query_steady")),
                         fmt(cg.get("ir_first_query")), fmt(cg.get("ir_0"))))
            L.append("")
    L.append("## dotp targets (as measured)\n")
    L.append("| check | target | measured | verdict |")
    L.append("|---|---|---|---|")
    for v in V:
        L.append("| %s | %s | %s | %s |" % (
            v["name"], v["target"], v["measured"],
            "n/a" if v["ok"] is None else ("met" if v["ok"] else "MISSED")))
    L.append("")
    if meta.get("caveats") or auto:
        L.append("## Caveats\n")
        for c in meta.get("caveats", []) + auto:
            L.append("- " + c)
        L.append("")
    md = "\n".join(L) + "\n"
    with open(a.out_md, "w") as f:
        f.write(md)
    sys.stdout.write(md)
    return 0


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("wait")
    w.add_argument("--mode", choices=("udp", "tcp", "dot"), default="udp")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--name", default="ready.bench.test")
    w.add_argument("--timeout", type=float, default=20)
    w.add_argument("--ca")
    w.add_argument("--tls-name", default="upstream.bench")
    w.add_argument("--quiet", action="store_true")
    w.add_argument("--once", action="store_true",
                   help="one query, waiting up to --timeout for its answer")

    n = sub.add_parser("names")
    n.add_argument("--out", required=True)
    n.add_argument("--prefix", default="q")
    n.add_argument("--start", type=int, default=0)
    n.add_argument("--count", type=int, required=True)
    n.add_argument("--digits", type=int, default=8)
    n.add_argument("--zone", default="bench.test")

    z = sub.add_parser("zipf")
    z.add_argument("--out", required=True)
    z.add_argument("--names", type=int, default=200000)
    z.add_argument("--s", type=float, default=1.0)
    z.add_argument("--unique-pct", type=float, default=10.0)
    z.add_argument("--unique-start", type=int, default=0)
    z.add_argument("--count", type=int, required=True)
    z.add_argument("--seed", type=int, default=1)
    z.add_argument("--zone", default="c.bench.test")
    z.add_argument("--seen", help="names drawn by an earlier stream")
    z.add_argument("--save-seen", help="write the names drawn so far here")

    wa = sub.add_parser("warm")
    wa.add_argument("--port", type=int, required=True)
    wa.add_argument("--datafile", required=True)
    wa.add_argument("--passes", type=int, default=2)
    wa.add_argument("--timeout", type=float, default=2)

    b = sub.add_parser("busy")
    b.add_argument("--seconds", type=float, default=1.0)

    r = sub.add_parser("rss")
    r.add_argument("pid", type=int)

    m = sub.add_parser("measure")
    m.add_argument("--target", required=True)
    m.add_argument("--transport", choices=("udp", "tcp", "dot"), required=True)
    m.add_argument("--names", choices=("unique", "repeat", "hits", "zipf",
                                       "zipf-cold"), required=True)
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--datafile", required=True)
    m.add_argument("--datafile-lines", type=int)
    m.add_argument("--pid", type=int, required=True)
    m.add_argument("--upstream-pid", type=int, required=True)
    m.add_argument("--count-conns", action="store_true")
    m.add_argument("--duration", type=int, default=10)
    m.add_argument("--runs-through", type=int, default=0,
                   help="dnsperf -n: the file this many times (no -l)")
    m.add_argument("--max-time", type=int, default=600,
                   help="with --runs-through: give up after this long")
    m.add_argument("--thread-cpu", action="store_true",
                   help="sample the threads of dnsperf and the target: the "
                   "busiest thread of each (what held the run back)")
    m.add_argument("--upstream-control",
                   help="the upstream's unbound.conf: count the queries it "
                   "receives during the run (unbound-control)")
    m.add_argument("--clients", type=int, default=4)
    m.add_argument("--outstanding", type=int, default=100)
    m.add_argument("--query-timeout", type=int, default=2)
    m.add_argument("--settle", type=float, default=0.3)
    m.add_argument("--round", type=int, default=1)
    m.add_argument("--tmp", default="/tmp")
    m.add_argument("--out", required=True)

    rs = sub.add_parser("resperf")
    rs.add_argument("--target", required=True)
    rs.add_argument("--transport", choices=("udp", "tcp", "dot"), default="udp")
    rs.add_argument("--port", type=int, required=True)
    rs.add_argument("--datafile", required=True)
    rs.add_argument("--datafile-lines", type=int, required=True)
    rs.add_argument("--pid", type=int, required=True)
    rs.add_argument("--upstream-pid", type=int, required=True)
    rs.add_argument("--count-conns", action="store_true")
    rs.add_argument("--max-qps", type=int, default=150000)
    rs.add_argument("--ramp", type=int, default=6, help="ramp-up seconds")
    rs.add_argument("--clients", type=int, default=4)
    rs.add_argument("--interval", type=float, default=0.25,
                    help="plot interval, seconds")
    rs.add_argument("--max-loss", type=float, default=1.0, help="percent")
    rs.add_argument("--query-timeout", type=int, default=2)
    rs.add_argument("--fall-behind", type=int, default=5000)
    rs.add_argument("--bufsize", type=int, default=4096,
                    help="client socket buffers, KiB")
    rs.add_argument("--settle", type=float, default=1.0)
    rs.add_argument("--round", type=int, default=1)
    rs.add_argument("--tmp", default="/tmp")
    rs.add_argument("--out", required=True)

    li = sub.add_parser("light")
    li.add_argument("--target", default="?")
    li.add_argument("--mode", choices=("udp", "tcp", "dot"), default="udp")
    li.add_argument("--port", type=int, required=True)
    li.add_argument("--ca")
    li.add_argument("--tls-name", default="upstream.bench")
    li.add_argument("--duration", type=float, default=0)
    li.add_argument("--count", type=int, default=0)
    li.add_argument("--warmup", type=int, default=50)
    li.add_argument("--prefix", default="l")
    li.add_argument("--zone", default="bench.test")
    li.add_argument("--cycle", type=int, default=0,
                    help="repeat N names (warmed first): all hits")
    li.add_argument("--query-timeout", type=float, default=2)
    li.add_argument("--round", type=int, default=1)
    li.add_argument("--pair-port", type=int,
                    help="alternate with DoT queries to the upstream here")
    li.add_argument("--pair-ca")
    li.add_argument("--pair-mode", choices=("dot", "udp"), default="dot")
    li.add_argument("--pid", type=int, help="the target's PID (CPU accounting)")
    li.add_argument("--upstream-pid", type=int)
    li.add_argument("--out")
    li.add_argument("--silent", action="store_true")

    rp = sub.add_parser("report")
    rp.add_argument("--runs")
    rp.add_argument("--meta")
    rp.add_argument("--from-json", help="re-render an earlier results.json")
    rp.add_argument("--callgrind")
    rp.add_argument("--out-json", required=True)
    rp.add_argument("--out-md", required=True)

    a = ap.parse_args()
    return {"wait": do_wait, "names": do_names, "zipf": do_zipf,
            "warm": do_warm, "rss": do_rss, "busy": do_busy,
            "measure": do_measure, "resperf": do_resperf, "light": do_light,
            "report": do_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
