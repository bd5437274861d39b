#!/usr/bin/env node
// check.js - offline validation of deploy/ (run by tests/deploy.sh).
//
//   node tests/deploy-check/check.js [--self-test] [--dotp PATH]
//
// Environment: DEPLOY_CHECK_MODULES, the node_modules folder that `npm ci`
// filled from tests/deploy-check/package-lock.json (kubernetes-models, yaml).
//
// - Every YAML document under deploy/kubernetes/ is validated against the
//   Kubernetes API schemas with the matching kubernetes-models class's
//   .validate(), and checked for fields the schema does not know (the API
//   server rejects those under kubectl's default strict validation; the
//   generated validators let them through, so the fields a validator reads
//   are recorded through a Proxy, and any other field is an error).
// - dotp's rules on top: every pod meets Pod Security "restricted" (a
//   hostNetwork pod breaks only what the host network forces, listed in
//   HOSTNET_ALLOWED); every dotp container has the restricted securityContext
//   fields itself, readiness and liveness exec probes running `dotp
//   healthcheck` (liveness asking dotp itself, not its upstreams), and
//   DOTP_METRICS on the port of the pod's prometheus.io annotations, which
//   every Deployment and DaemonSet carries; the native sidecar has the
//   classic one's dotp; the NetworkPolicy opens what the DaemonSet needs.
// - deploy/docker-compose.yml: parsed, the keys dotp needs, no unknown
//   service keys.
// - deploy/grafana/*.json: parsed; a datasource variable; every panel's
//   queries name only metrics of README.md's table (Metrics and health).
// - --dotp PATH: the metrics the dashboard uses exist in that dotp's
//   /metrics, and the probe commands of the manifests work against it
//   (on loopback, upstream unreachable: nothing leaves the machine).
// - --self-test: broken copies of the real files (and a few made-up
//   objects) must each be rejected with the expected error.
"use strict";

const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const REPO = path.resolve(__dirname, "..", "..");
const MODULES = process.env.DEPLOY_CHECK_MODULES ||
  path.join(REPO, "build", "deploy-check", "node_modules");
const req = createRequire(path.join(MODULES, "_"));
const YAML = req("yaml");

const METRICS_PORT = "9253";
const SCRAPE = {
  "prometheus.io/scrape": "true",
  "prometheus.io/port": METRICS_PORT,
  "prometheus.io/path": "/metrics",
};

// --- Kubernetes API schemas -----------------------------------------------

// apiVersion + kind -> the kubernetes-models class.
function modelClass(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string")
    return null;
  // "v1" -> kubernetes-models/v1/Kind, "apps/v1" -> kubernetes-models/apps/v1/Kind
  if (!/^[a-z0-9.]+(\/[a-z0-9]+)?$/.test(apiVersion) || !/^[A-Za-z]+$/.test(kind))
    return null;
  try {
    return req(`kubernetes-models/${apiVersion}/${kind}`)[kind] || null;
  } catch (e) {
    return null;
  }
}

// Wraps obj so that every property read is recorded in seen (path -> Set).
function tracked(obj, seen, p, cache) {
  if (obj === null || typeof obj !== "object")
    return obj;
  if (cache.has(obj))
    return cache.get(obj);
  if (!seen.has(p))
    seen.set(p, new Set());
  const keys = seen.get(p);
  const prox = new Proxy(obj, {
    get(t, k, r) {
      if (typeof k === "string")
        keys.add(k);
      const v = Reflect.get(t, k, r);
      return typeof k === "string" && Object.prototype.hasOwnProperty.call(t, k)
        ? tracked(v, seen, p + "/" + k, cache) : v;
    },
  });
  cache.set(obj, prox);
  return prox;
}

// Own fields of obj (at path p) that no validator read.
function unread(obj, seen, p, out) {
  if (obj === null || typeof obj !== "object")
    return out;
  const keys = seen.get(p) || new Set();
  for (const k of Object.keys(obj)) {
    if (!Array.isArray(obj) && !keys.has(k)) {
      out.push(`${p}/${k}: unknown field (not in the Kubernetes API schema)`);
      continue;
    }
    unread(obj[k], seen, p + "/" + k, out);
  }
  return out;
}

function schemaErrors(doc) {
  const Cls = modelClass(doc && doc.apiVersion, doc && doc.kind);
  if (!Cls)
    return [`no Kubernetes API schema for apiVersion ${JSON.stringify(doc && doc.apiVersion)} kind ${JSON.stringify(doc && doc.kind)}`];
  const errs = [];
  try {
    new Cls(doc).validate();
  } catch (e) {
    if (Array.isArray(e.errors) && e.errors.length)
      for (const x of e.errors)
        errs.push(`${x.instancePath || "/"}: ${x.message}${x.params && x.params.allowedValues ? " " + JSON.stringify(x.params.allowedValues) : ""}`);
    else
      errs.push(String(e.message || e));
  }
  // Unknown fields: run the same validator over a recording Proxy.
  const model = new Cls(doc);
  const seen = new Map();
  try {
    tracked(model, seen, "", new Map()).validate();
  } catch (e) { /* reported above */ }
  return errs.concat(unread(JSON.parse(JSON.stringify(model)), seen, "", []));
}

// --- Pod Security "restricted" (Kubernetes Pod Security Standards) -------

const SAFE_SYSCTLS = new Set([
  "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
  "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
  "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
  "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
  "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
]);
const RESTRICTED_VOLUMES = new Set([
  "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
  "persistentVolumeClaim", "projected", "secret",
]);

function allContainers(spec) {
  const out = [];
  for (const k of ["initContainers", "containers", "ephemeralContainers"])
    for (const c of spec[k] || [])
      out.push({ c, where: `${k}/${c.name}` });
  return out;
}

// Violations of "restricted" as {code, where, msg}.
function restrictedViolations(spec) {
  const v = [];
  const add = (code, where, msg) => v.push({ code, where, msg });
  const psc = spec.securityContext || {};
  for (const h of ["hostNetwork", "hostPID", "hostIPC"])
    if (spec[h]) add(h, "spec", `${h}: true`);
  for (const s of psc.sysctls || [])
    if (!SAFE_SYSCTLS.has(s.name)) add("sysctl", "spec", `sysctl ${s.name} is not a safe sysctl`);
  for (const vol of spec.volumes || []) {
    const type = Object.keys(vol).find((k) => k !== "name");
    if (!RESTRICTED_VOLUMES.has(type)) add("volume", `volumes/${vol.name}`, `volume type ${type}`);
  }
  const podSeccomp = psc.seccompProfile && psc.seccompProfile.type;
  for (const { c, where } of allContainers(spec)) {
    const sc = c.securityContext || {};
    if (sc.privileged) add("privileged", where, "privileged: true");
    for (const p of c.ports || [])
      if (p.hostPort) add("hostPort", where, `hostPort ${p.hostPort}`);
    if (sc.allowPrivilegeEscalation !== false)
      add("allowPrivilegeEscalation", where, "allowPrivilegeEscalation must be false");
    const caps = sc.capabilities || {};
    if (!(caps.drop || []).includes("ALL"))
      add("capabilities", where, "capabilities.drop must include ALL");
    for (const cap of caps.add || [])
      if (cap !== "NET_BIND_SERVICE") add("capabilities.add", where, `capability ${cap} added`);
    const nonRoot = sc.runAsNonRoot !== undefined ? sc.runAsNonRoot : psc.runAsNonRoot;
    if (nonRoot !== true) add("runAsNonRoot", where, "runAsNonRoot must be true (container or pod)");
    const uid = sc.runAsUser !== undefined ? sc.runAsUser : psc.runAsUser;
    if (uid === 0) add("runAsUser", where, "runAsUser 0");
    const sec = (sc.seccompProfile && sc.seccompProfile.type) || podSeccomp;
    if (sec !== "RuntimeDefault" && sec !== "Localhost")
      add("seccompProfile", where, "seccompProfile must be RuntimeDefault or Localhost (container or pod)");
    if (sc.procMount && sc.procMount !== "Default") add("procMount", where, `procMount ${sc.procMount}`);
    const aa = sc.appArmorProfile || psc.appArmorProfile;
    if (aa && aa.type === "Unconfined") add("appArmor", where, "appArmorProfile Unconfined");
  }
  return v;
}

// What a hostNetwork pod may break, and nothing else: the host network
// itself, the ports it implies, root for the containers that need a
// capability (a non-root user gets none), NET_BIND_SERVICE for dotp and
// NET_ADMIN for a run-to-completion init container that is not dotp.
function hostNetAllowed(x, spec) {
  if (x.code === "hostNetwork" || x.code === "hostPort")
    return true;
  const m = /^(initContainers|containers)\/(.*)$/.exec(x.where);
  if (!m)
    return false;
  const c = (spec[m[1]] || []).find((k) => k.name === m[2]);
  const add = ((c.securityContext || {}).capabilities || {}).add || [];
  const oneShotInit = m[1] === "initContainers" && c.restartPolicy !== "Always" && !isDotp(c);
  const capsOk = add.length > 0 && add.every((cap) =>
    cap === "NET_BIND_SERVICE" || (cap === "NET_ADMIN" && oneShotInit));
  if (x.code === "runAsNonRoot" || x.code === "runAsUser")
    return capsOk;
  if (x.code === "capabilities.add")
    return capsOk;
  return false;
}

// --- dotp's own rules -----------------------------------------------------

function isDotp(c) {
  return c.name === "dotp" || /(^|\/)dotp(:|@|$)/.test(c.image || "");
}

function envOf(c) {
  const e = {};
  for (const x of c.env || [])
    e[x.name] = x.value;
  return e;
}

function listenArgs(c) {
  const a = c.args || [];
  const out = [];
  for (let i = 0; i < a.length; i++)
    if ((a[i] === "-l" || a[i] === "--listen") && i + 1 < a.length)
      out.push(a[i + 1]);
  return out;
}

function podSpecOf(doc) {
  if (doc.kind === "Pod")
    return { spec: doc.spec || {}, meta: doc.metadata || {} };
  const t = doc.spec && doc.spec.template;
  if (t && ["Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"].includes(doc.kind))
    return { spec: t.spec || {}, meta: t.metadata || {} };
  return null;
}

function probeErrors(c, where) {
  const errs = [];
  for (const kind of ["readinessProbe", "livenessProbe", "startupProbe"]) {
    const p = c[kind];
    if (!p) {
      if (kind !== "startupProbe") errs.push(`${where}: no ${kind}`);
      continue;
    }
    const cmd = p.exec && p.exec.command;
    if (!Array.isArray(cmd) || cmd[0] !== "/dotp" || cmd[1] !== "healthcheck") {
      errs.push(`${where}: ${kind} must be an exec probe running ["/dotp", "healthcheck", ...]`);
      continue;
    }
    if (!(p.timeoutSeconds >= 3))
      errs.push(`${where}: ${kind} timeoutSeconds must be at least 3 (dotp healthcheck takes up to 2 s)`);
    const i = cmd.indexOf("--metrics");
    const dns = i > 0 && cmd[i + 1] === "";
    if (kind === "readinessProbe" && dns)
      errs.push(`${where}: readinessProbe must ask /ready (no --metrics "")`);
    if (kind !== "readinessProbe") {
      // Alive, not ready: an upstream outage must not restart dotp.
      if (!dns)
        errs.push(`${where}: ${kind} must ask dotp itself: ["/dotp", "healthcheck", "--metrics", "", "-l", ADDR]`);
      const l = cmd.indexOf("-l");
      if (l < 0 || !listenArgs(c).includes(cmd[l + 1]))
        errs.push(`${where}: ${kind} must probe one of dotp's -l addresses (${listenArgs(c).join(", ")})`);
    }
  }
  return errs;
}

function dotpContainerErrors(c, where, spec, meta) {
  const errs = [];
  const sc = c.securityContext || {};
  if (sc.readOnlyRootFilesystem !== true)
    errs.push(`${where}: securityContext.readOnlyRootFilesystem must be true`);
  if (sc.allowPrivilegeEscalation !== false)
    errs.push(`${where}: securityContext.allowPrivilegeEscalation must be false`);
  if (!((sc.capabilities || {}).drop || []).includes("ALL"))
    errs.push(`${where}: securityContext.capabilities.drop must be ["ALL"]`);
  for (const cap of (sc.capabilities || {}).add || [])
    if (cap !== "NET_BIND_SERVICE")
      errs.push(`${where}: dotp needs no capability but NET_BIND_SERVICE (found ${cap})`);
  if (!sc.seccompProfile || sc.seccompProfile.type !== "RuntimeDefault")
    errs.push(`${where}: securityContext.seccompProfile.type must be RuntimeDefault`);
  if (spec.hostNetwork) {
    if (sc.runAsNonRoot !== true && !((sc.capabilities || {}).add || []).includes("NET_BIND_SERVICE"))
      errs.push(`${where}: on the host network dotp runs as non-root or as root with NET_BIND_SERVICE only`);
  } else if (sc.runAsNonRoot !== true) {
    errs.push(`${where}: securityContext.runAsNonRoot must be true`);
  }
  if (sc.runAsUser === 0 && !spec.hostNetwork)
    errs.push(`${where}: runAsUser 0 without hostNetwork`);
  errs.push(...probeErrors(c, where));
  const env = envOf(c);
  const metrics = env.DOTP_METRICS;
  if (metrics === undefined)
    errs.push(`${where}: set DOTP_METRICS (the scrape annotations point at it)`);
  else if (!new RegExp(`:${METRICS_PORT}$`).test(metrics))
    errs.push(`${where}: DOTP_METRICS ${metrics} is not on port ${METRICS_PORT}, the annotations' port`);
  if (listenArgs(c).length === 0)
    errs.push(`${where}: no -l address in args`);
  if (!c.resources || !c.resources.requests || !c.resources.limits || !c.resources.limits.memory)
    errs.push(`${where}: resources.requests and limits.memory must be set`);
  return errs;
}

function podErrors(doc, file) {
  const ps = podSpecOf(doc);
  if (!ps)
    return [];
  const { spec, meta } = ps;
  const name = `${file}: ${doc.kind} ${doc.metadata && doc.metadata.name}`;
  const errs = [];
  const ann = meta.annotations || {};
  for (const [k, v] of Object.entries(SCRAPE))
    if (ann[k] !== v)
      errs.push(`${name}: pod template annotation ${k} must be "${v}" (found ${JSON.stringify(ann[k])})`);
  const dotps = allContainers(spec).filter(({ c }) => isDotp(c));
  if (dotps.length !== 1)
    errs.push(`${name}: expected one dotp container, found ${dotps.length}`);
  for (const { c, where } of dotps) {
    errs.push(...dotpContainerErrors(c, `${name} ${where}`, spec, meta));
    if (where.startsWith("initContainers/") && c.restartPolicy !== "Always")
      errs.push(`${name} ${where}: an init container dotp must be a native sidecar (restartPolicy: Always)`);
  }
  for (const x of restrictedViolations(spec))
    if (!(spec.hostNetwork && hostNetAllowed(x, spec)))
      errs.push(`${name} ${x.where}: Pod Security restricted: ${x.msg}`);
  return errs;
}

// The native sidecar's pod is the classic one's with dotp moved.
function nativeSidecarErrors(classic, native) {
  const errs = [];
  const a = podSpecOf(classic), b = podSpecOf(native);
  if (!a || !b)
    return ["sidecar.yaml / sidecar-native.yaml: both must be workloads"];
  const dc = a.spec.containers.find(isDotp);
  const dn = (b.spec.initContainers || []).find(isDotp);
  if (!dn || dn.restartPolicy !== "Always")
    return ["sidecar-native.yaml: dotp must be an initContainers entry with restartPolicy: Always"];
  if (!dn.startupProbe)
    errs.push("sidecar-native.yaml: dotp needs a startupProbe (the app starts once it passes)");
  const strip = (c) => {
    const x = JSON.parse(JSON.stringify(c));
    delete x.restartPolicy;
    delete x.startupProbe;
    delete x.livenessProbe.initialDelaySeconds;
    return x;
  };
  const same = (x, y) => JSON.stringify(x) === JSON.stringify(y);
  if (!dc || !same(strip(dc), strip(dn)))
    errs.push("sidecar-native.yaml: its dotp container differs from sidecar.yaml's (beyond restartPolicy and startupProbe)");
  for (const k of ["dnsPolicy", "dnsConfig", "securityContext"])
    if (!same(a.spec[k], b.spec[k]))
      errs.push(`sidecar-native.yaml: spec.${k} differs from sidecar.yaml's`);
  if (!same(a.meta, b.meta))
    errs.push("sidecar-native.yaml: pod template metadata differs from sidecar.yaml's");
  return errs;
}

function networkPolicyErrors(doc, file) {
  if (doc.kind !== "NetworkPolicy")
    return [];
  const errs = [];
  const s = doc.spec || {};
  const has = (rules, proto, port, pred) => (rules || []).some((r) =>
    (pred ? pred(r) : true) && (r.ports || []).some((p) =>
      (p.protocol || "TCP") === proto && String(p.port) === String(port)));
  const fromMonitoring = (r) => (r.from || []).length > 0 && r.from.every((f) => f.namespaceSelector);
  for (const proto of ["UDP", "TCP"])
    if (!has(s.ingress, proto, 53)) errs.push(`${file}: no ingress 53/${proto}`);
  if (!has(s.ingress, "TCP", METRICS_PORT, fromMonitoring))
    errs.push(`${file}: no ingress ${METRICS_PORT}/TCP from a namespaceSelector`);
  if (has(s.ingress, "TCP", METRICS_PORT, (r) => !fromMonitoring(r)))
    errs.push(`${file}: ${METRICS_PORT}/TCP open beyond the monitoring namespace`);
  if (!has(s.egress, "TCP", 853)) errs.push(`${file}: no egress 853/TCP`);
  const toDns = (r) => (r.to || []).some((t) => t.podSelector &&
    JSON.stringify(t.podSelector).includes("kube-dns"));
  for (const proto of ["UDP", "TCP"])
    if (!has(s.egress, proto, 53, toDns)) errs.push(`${file}: no egress 53/${proto} to kube-dns`);
  const pt = s.policyTypes || [];
  if (!pt.includes("Ingress") || !pt.includes("Egress"))
    errs.push(`${file}: policyTypes must be Ingress and Egress`);
  return errs;
}

function loadYamlDocs(text, file) {
  const docs = YAML.parseAllDocuments(text, { prettyErrors: true });
  const errs = [];
  const out = [];
  docs.forEach((d, i) => {
    for (const e of d.errors)
      errs.push(`${file} document ${i + 1}: YAML: ${e.message.split("\n")[0]}`);
    const v = d.toJS();
    if (v !== null && v !== undefined)
      out.push(v);
  });
  return { docs: out, errs };
}

// All of deploy/kubernetes: files name -> text (the self-test passes copies).
function checkKubernetes(files) {
  const errs = [];
  let n = 0;
  const byFile = {};
  for (const [file, text] of Object.entries(files)) {
    const { docs, errs: yerr } = loadYamlDocs(text, file);
    errs.push(...yerr);
    byFile[file] = docs;
    if (docs.length === 0)
      errs.push(`${file}: no document`);
    docs.forEach((doc, i) => {
      n++;
      const where = `${file}: ${doc.kind} ${doc.metadata && doc.metadata.name} (document ${i + 1})`;
      for (const e of schemaErrors(doc))
        errs.push(`${where}: schema: ${e}`);
      errs.push(...podErrors(doc, file));
      errs.push(...networkPolicyErrors(doc, file));
    });
  }
  const c = byFile["deploy/kubernetes/sidecar.yaml"], nt = byFile["deploy/kubernetes/sidecar-native.yaml"];
  if (!c || c.length !== 1)
    errs.push("deploy/kubernetes/sidecar.yaml: must be one document (tests/integration/test_forward.py reads it)");
  if (!nt)
    errs.push("deploy/kubernetes/sidecar-native.yaml: missing");
  if (c && nt && c.length && nt.length)
    errs.push(...nativeSidecarErrors(c[0], nt[0]));
  const kinds = Object.values(byFile).flat().map((d) => d.kind);
  for (const k of ["Deployment", "DaemonSet", "ServiceAccount", "NetworkPolicy"])
    if (!kinds.includes(k))
      errs.push(`deploy/kubernetes: no ${k}`);
  return { errs, n };
}

// --- docker-compose.yml ---------------------------------------------------

// The Compose specification's service keys.
const COMPOSE_SERVICE_KEYS = new Set(("annotations attach blkio_config build cap_add cap_drop " +
  "cgroup cgroup_parent command configs container_name cpu_count cpu_percent cpu_period " +
  "cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec " +
  "depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search " +
  "domainname entrypoint env_file environment expose extends external_links extra_hosts " +
  "gpus group_add healthcheck hostname image init ipc isolation labels links logging " +
  "mac_address mem_limit mem_reservation mem_swappiness memswap_limit network_mode " +
  "networks oom_kill_disable oom_score_adj pid pids_limit platform ports privileged " +
  "profiles pull_policy read_only restart runtime scale secrets security_opt shm_size " +
  "stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits user " +
  "userns_mode uts volumes volumes_from working_dir").split(" "));

function checkCompose(text, file) {
  const { docs, errs } = loadYamlDocs(text, file);
  if (errs.length)
    return errs;
  const doc = docs[0] || {};
  const s = doc.services && doc.services.dotp;
  if (!s)
    return [`${file}: no services.dotp`];
  for (const k of Object.keys(s))
    if (!COMPOSE_SERVICE_KEYS.has(k))
      errs.push(`${file}: services.dotp.${k}: not a Compose service key`);
  if (typeof s.image !== "string" || !/dotp/.test(s.image))
    errs.push(`${file}: services.dotp.image must be the dotp image`);
  const ports = (s.ports || []).map((p) => typeof p === "object"
    ? `${p.target}/${p.protocol || "tcp"}` : String(p).replace(/^.*:/, "").replace(/^(\d+)$/, "$1/tcp"));
  for (const want of ["53/udp", "53/tcp", `${METRICS_PORT}/tcp`])
    if (!ports.includes(want))
      errs.push(`${file}: services.dotp.ports must publish ${want}`);
  const env = Array.isArray(s.environment)
    ? Object.fromEntries(s.environment.map((x) => x.split(/=(.*)/s).slice(0, 2)))
    : (s.environment || {});
  if (!env.DOTP_UPSTREAM)
    errs.push(`${file}: services.dotp.environment must set DOTP_UPSTREAM`);
  if (!env.DOTP_METRICS || !new RegExp(`:${METRICS_PORT}$`).test(env.DOTP_METRICS))
    errs.push(`${file}: services.dotp.environment DOTP_METRICS must be on port ${METRICS_PORT}`);
  if (s.read_only !== true)
    errs.push(`${file}: services.dotp.read_only must be true`);
  if (!Array.isArray(s.cap_drop) || !s.cap_drop.includes("ALL"))
    errs.push(`${file}: services.dotp.cap_drop must be [ALL]`);
  if (s.cap_add && s.cap_add.length)
    errs.push(`${file}: services.dotp.cap_add: dotp needs no capability`);
  if (!/^65532(:65532)?$/.test(String(s.user)))
    errs.push(`${file}: services.dotp.user must be 65532`);
  const hc = s.healthcheck || {};
  if (JSON.stringify(hc.test) !== JSON.stringify(["CMD", "/dotp", "healthcheck"]))
    errs.push(`${file}: services.dotp.healthcheck.test must be ["CMD", "/dotp", "healthcheck"]`);
  for (const k of ["interval", "timeout"])
    if (hc[k] !== undefined && !/^\d+(\.\d+)?(ms|s|m|h)$/.test(String(hc[k])))
      errs.push(`${file}: services.dotp.healthcheck.${k}: not a duration`);
  return errs;
}

// --- Grafana --------------------------------------------------------------

// Metric names from README.md's table under "## Metrics and health".
function readmeMetrics(readme) {
  const sec = readme.split(/^## /m).find((s) => s.startsWith("Metrics and health"));
  if (!sec)
    throw new Error("README.md: no section \"## Metrics and health\"");
  const names = new Set();
  for (const line of sec.split("\n")) {
    const cells = line.split("|").map((c) => c.trim());
    if (cells.length < 4 || !cells[1].startsWith("`"))
      continue;
    const type = cells[2];
    for (const m of cells[1].matchAll(/`([a-zA-Z_:][a-zA-Z0-9_:]*)`/g)) {
      names.add(m[1]);
      if (type === "histogram")
        for (const suf of ["_bucket", "_sum", "_count"])
          names.add(m[1] + suf);
    }
  }
  if (names.size < 10)
    throw new Error(`README.md: only ${names.size} metric names found in the Metrics table`);
  return names;
}

const PROMQL_FUNCS = new Set(("abs absent absent_over_time avg avg_over_time bottomk ceil " +
  "changes clamp clamp_max clamp_min count count_over_time count_values delta deriv exp " +
  "floor group histogram_quantile holt_winters idelta increase irate label_join " +
  "label_replace last_over_time ln log10 log2 max max_over_time min min_over_time " +
  "predict_linear quantile quantile_over_time rate resets round scalar sgn sort sort_desc " +
  "sqrt stddev stddev_over_time stdvar sum sum_over_time time timestamp topk vector").split(" "));
const PROMQL_WORDS = new Set(["by", "without", "on", "ignoring", "group_left",
  "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"]);

// Metric names in a PromQL expression (Grafana variables allowed).
function promqlMetrics(expr) {
  let depth = 0;
  for (const ch of expr) {
    if ("({[".includes(ch)) depth++;
    if (")}]".includes(ch)) depth--;
    if (depth < 0) break;
  }
  if (depth !== 0)
    throw new Error("unbalanced brackets");
  let s = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, " ")
    .replace(/\[[^\]]*\]/g, " ")
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ")
    .replace(/\$\{?[A-Za-z_][A-Za-z0-9_]*\}?/g, " ")
    .replace(/\b\d+(\.\d+)?(e[+-]?\d+)?\b/gi, " ");
  const out = [];
  const re = /[a-zA-Z_:][a-zA-Z0-9_:]*/g;
  let m;
  while ((m = re.exec(s)) !== null) {
    const tok = m[0];
    const next = s.slice(re.lastIndex).trimStart()[0];
    if (next === "(") {
      if (!PROMQL_FUNCS.has(tok))
        throw new Error(`unknown PromQL function ${tok}`);
      continue;
    }
    if (PROMQL_WORDS.has(tok.toLowerCase()))
      continue;
    out.push(tok);
  }
  return out;
}

function checkDashboard(text, file, known) {
  let d;
  try {
    d = JSON.parse(text);
  } catch (e) {
    return { errs: [`${file}: JSON: ${e.message}`], used: new Set() };
  }
  const errs = [];
  const used = new Set();
  const vars = ((d.templating || {}).list || []);
  const dsVar = vars.find((v) => v.type === "datasource" && v.query === "prometheus");
  if (!dsVar)
    errs.push(`${file}: no datasource variable (type datasource, query prometheus)`);
  const dsRef = dsVar ? [`\${${dsVar.name}}`, `$${dsVar.name}`] : [];
  const checkExpr = (expr, where) => {
    try {
      const ms = promqlMetrics(expr);
      if (ms.length === 0)
        errs.push(`${where}: no metric in ${JSON.stringify(expr)}`);
      for (const m of ms) {
        used.add(m);
        if (!known.has(m))
          errs.push(`${where}: metric ${m} is not in README.md's Metrics table`);
      }
    } catch (e) {
      errs.push(`${where}: ${e.message} in ${JSON.stringify(expr)}`);
    }
  };
  for (const v of vars) {
    if (v.type !== "query")
      continue;
    const q = typeof v.query === "string" ? v.query : (v.query || {}).query;
    const m = /^label_values\(\s*(.+?)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)$/.exec(q || "");
    if (!m)
      errs.push(`${file}: variable ${v.name}: expected label_values(METRIC, LABEL), found ${JSON.stringify(q)}`);
    else
      checkExpr(m[1], `${file}: variable ${v.name}`);
    if (!v.datasource || !dsRef.includes(v.datasource.uid))
      errs.push(`${file}: variable ${v.name}: datasource must be the datasource variable`);
  }
  const panels = [];
  const walk = (ps) => {
    for (const p of ps || []) {
      panels.push(p);
      walk(p.panels);
    }
  };
  walk(d.panels);
  const ids = new Set();
  let queries = 0;
  for (const p of panels) {
    const where = `${file}: panel ${p.id} "${p.title}"`;
    if (ids.has(p.id))
      errs.push(`${where}: id used twice`);
    ids.add(p.id);
    if (p.type === "row")
      continue;
    if (!p.targets || p.targets.length === 0)
      errs.push(`${where}: no query`);
    if (!p.datasource || !dsRef.includes(p.datasource.uid))
      errs.push(`${where}: datasource must be the datasource variable`);
    for (const t of p.targets || []) {
      if (typeof t.expr !== "string" || !t.expr.trim()) {
        errs.push(`${where} ${t.refId}: no expr`);
        continue;
      }
      queries++;
      checkExpr(t.expr, `${where} ${t.refId}`);
    }
  }
  // What the dashboard must show.
  const exprs = panels.flatMap((p) => (p.targets || []).map((t) => t.expr || ""));
  const want = [
    [/sum by \(rcode\) \(rate\(dotp_responses_total\b/, "queries per second by RCODE (rate of dotp_responses_total by rcode)"],
    [/histogram_quantile\(0\.5, [^]*dotp_answer_duration_seconds_bucket/, "p50 of dotp_answer_duration_seconds_bucket"],
    [/histogram_quantile\(0\.9, [^]*dotp_answer_duration_seconds_bucket/, "p90 of dotp_answer_duration_seconds_bucket"],
    [/histogram_quantile\(0\.99, [^]*dotp_answer_duration_seconds_bucket/, "p99 of dotp_answer_duration_seconds_bucket"],
    [/dotp_cache_hits_total[^]*dotp_cache_misses_total/, "the cache hit ratio"],
    [/dotp_upstream_up\b/, "dotp_upstream_up"],
    [/rate\(dotp_upstream_handshakes_full_total\b/, "the rate of full handshakes"],
    [/rate\(dotp_upstream_handshakes_resumed_total\b/, "the rate of resumed handshakes"],
  ];
  for (const [re, what] of want)
    if (!exprs.some((e) => re.test(e)))
      errs.push(`${file}: no panel shows ${what}`);
  return { errs, used, queries };
}

// --- a live dotp (optional) -----------------------------------------------

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

function httpGet(port, p) {
  const http = require("http");
  return new Promise((resolve, reject) => {
    const r = http.get({ host: "127.0.0.1", port, path: p, timeout: 2000 }, (res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    r.on("error", reject);
    r.on("timeout", () => r.destroy(new Error("timeout")));
  });
}

function run(bin, args, env) {
  const cp = require("child_process");
  const r = cp.spawnSync(bin, args, { env, encoding: "utf8", timeout: 10000 });
  return { status: r.status, out: (r.stdout || "") + (r.stderr || "") };
}

// One probe command (its address already the test dotp's): it must pass
// against the running dotp, by the path it is meant to take (the HTTP
// /ready, or with --metrics "" a DNS query to dotp itself), and fail where
// nothing listens.
function probeRun(bin, args, env, dns, mport) {
  const errs = [];
  const i = args.indexOf("--metrics");
  const alive = i > 0 && args[i + 1] === "";
  const r = run(bin, args, env);
  if (r.status !== 0)
    errs.push(`failed against a running dotp: ${r.out.trim()}`);
  else if (alive ? !/msg="alive/.test(r.out) || !r.out.includes(`probe=127.0.0.1:${dns}`)
    : !/msg="ready"/.test(r.out) || !r.out.includes(`probe=127.0.0.1:${mport}`))
    errs.push(`did not take the ${alive ? "DNS" : "/ready"} path: ${r.out.trim()}`);
  const dead = run(bin, args.map((a) => a === `127.0.0.1:${dns}` ? `127.0.0.1:${dns + 2}` : a),
    { PATH: process.env.PATH, DOTP_METRICS: `127.0.0.1:${mport + 2}` });
  if (dead.status !== 1)
    errs.push(`passed where no dotp listens: ${dead.out.trim()}`);
  return errs;
}

// The manifests' probe commands, with their addresses moved to the test
// dotp's: alive and ready against it, not alive where nothing listens.
async function checkLive(bin, used, k8sFiles) {
  const cp = require("child_process");
  const errs = [];
  let proc = null, dns = 0, mport = 0;
  for (let attempt = 0; attempt < 5 && !proc; attempt++) {
    dns = 20000 + Math.floor(Math.random() * 20000);
    mport = dns + 1;
    const p = cp.spawn(bin, ["-l", `127.0.0.1:${dns}`, "--metrics", `127.0.0.1:${mport}`,
      "-u", "127.0.0.1:1#upstream.invalid", "-q"], {
      env: { PATH: process.env.PATH }, stdio: ["ignore", "ignore", "pipe"],
    });
    let exited = false;
    p.on("exit", () => (exited = true));
    for (let i = 0; i < 50 && !exited; i++) {
      try {
        if ((await httpGet(mport, "/health")).status === 200) {
          proc = p;
          break;
        }
      } catch (e) { /* not yet */ }
      await sleep(100);
    }
    if (!proc && !exited)
      p.kill("SIGKILL");
  }
  if (!proc)
    return [`live: could not start ${bin} on loopback`];
  try {
    const m = await httpGet(mport, "/metrics");
    const have = new Set();
    for (const line of m.body.split("\n")) {
      const x = /^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/.exec(line);
      if (x) have.add(x[1]);
    }
    for (const name of used)
      if (!have.has(name))
        errs.push(`live: the dashboard's metric ${name} is not in ${bin}'s /metrics`);
    // Every probe of every dotp container, addresses replaced.
    const env = { PATH: process.env.PATH, DOTP_METRICS: `127.0.0.1:${mport}` };
    let probes = 0;
    const tried = new Map();
    for (const [file, text] of Object.entries(k8sFiles)) {
      for (const doc of loadYamlDocs(text, file).docs) {
        const ps = podSpecOf(doc);
        if (!ps) continue;
        for (const { c, where } of allContainers(ps.spec).filter(({ c }) => isDotp(c))) {
          for (const kind of ["startupProbe", "readinessProbe", "livenessProbe"]) {
            const cmd = c[kind] && c[kind].exec && c[kind].exec.command;
            if (!cmd) continue;
            const args = cmd.slice(1).map((a) => listenArgs(c).includes(a) ? `127.0.0.1:${dns}` : a);
            probes++;
            const key = JSON.stringify(args);
            if (!tried.has(key))
              tried.set(key, probeRun(bin, args, env, dns, mport));
            for (const e of tried.get(key))
              errs.push(`live: ${file} ${where} ${kind} ${JSON.stringify(cmd)}: ${e}`);
          }
        }
      }
    }
    if (probes === 0)
      errs.push("live: no probe found");
  } catch (e) {
    errs.push(`live: ${e.message}`);
  } finally {
    proc.kill("SIGTERM");
  }
  return errs;
}

// --- the files ------------------------------------------------------------

function readDeploy() {
  const rd = (p) => fs.readFileSync(path.join(REPO, p), "utf8");
  const k8s = {};
  const dir = "deploy/kubernetes";
  for (const f of fs.readdirSync(path.join(REPO, dir)).sort())
    if (/\.ya?ml$/.test(f))
      k8s[`${dir}/${f}`] = rd(`${dir}/${f}`);
  const grafana = {};
  for (const f of fs.readdirSync(path.join(REPO, "deploy/grafana")).sort())
    if (f.endsWith(".json"))
      grafana[`deploy/grafana/${f}`] = rd(`deploy/grafana/${f}`);
  return {
    k8s, grafana,
    compose: rd("deploy/docker-compose.yml"),
    known: readmeMetrics(rd("README.md")),
  };
}

function checkAll(f) {
  const out = { errs: [], summary: [], used: new Set() };
  const k = checkKubernetes(f.k8s);
  out.errs.push(...k.errs);
  out.summary.push(`${k.n} Kubernetes objects in ${Object.keys(f.k8s).length} files`);
  out.errs.push(...checkCompose(f.compose, "deploy/docker-compose.yml"));
  out.summary.push("docker-compose.yml");
  for (const [file, text] of Object.entries(f.grafana)) {
    const g = checkDashboard(text, file, f.known);
    out.errs.push(...g.errs);
    g.used.forEach((m) => out.used.add(m));
    out.summary.push(`${file}: ${g.queries} queries over ${g.used.size} metrics`);
  }
  if (Object.keys(f.grafana).length === 0)
    out.errs.push("deploy/grafana: no dashboard");
  return out;
}

// --- self-test: validation must fail on broken input -----------------------

function selfTest(f) {
  const clone = (x) => JSON.parse(JSON.stringify(x));
  const firstDoc = (file) => loadYamlDocs(f.k8s[file], file).docs;
  const dump = (docs) => docs.map((d) => YAML.stringify(d)).join("---\n");
  const SIDE = "deploy/kubernetes/sidecar.yaml";
  const NATIVE = "deploy/kubernetes/sidecar-native.yaml";
  const DS = "deploy/kubernetes/daemonset.yaml";
  const NP = "deploy/kubernetes/networkpolicy.yaml";
  // Each case: a name, the expected error (regex), and a change to a copy.
  const k8sCase = (file, mut) => () => {
    const docs = clone(firstDoc(file));
    mut(docs);
    return checkKubernetes({ ...f.k8s, [file]: dump(docs) }).errs;
  };
  const dotpOf = (docs) => {
    const d = docs.find((x) => podSpecOf(x));
    const s = podSpecOf(d).spec;
    return s.containers.concat(s.initContainers || []).find(isDotp);
  };
  const dsSpec = (docs) => docs.find((x) => x.kind === "DaemonSet").spec.template.spec;
  const cases = [
    ["schema: a port that is not an integer", /containerPort: must be integer/,
      k8sCase(SIDE, (d) => { dotpOf(d).ports[0].containerPort = "9253"; })],
    ["schema: a field the API does not have", /imagePullPolicyy: unknown field/,
      k8sCase(SIDE, (d) => { dotpOf(d).imagePullPolicyy = "Always"; })],
    ["schema: a misspelt pod field", /spec\/template\/spec\/hostNetwrok: unknown field/,
      k8sCase(DS, (d) => { dsSpec(d).hostNetwrok = true; })],
    ["schema: a required field missing", /spec: must have required property selector/,
      k8sCase(DS, (d) => { delete d.find((x) => x.kind === "DaemonSet").spec.selector; })],
    ["schema: a wrong type deep down", /livenessProbe\/periodSeconds: must be integer/,
      k8sCase(SIDE, (d) => { dotpOf(d).livenessProbe.periodSeconds = "20s"; })],
    ["schema: an unknown kind", /no Kubernetes API schema for apiVersion "apps\/v1" kind "Deploymnet"/,
      k8sCase(SIDE, (d) => { d[0].kind = "Deploymnet"; })],
    ["restricted: readOnlyRootFilesystem dropped", /readOnlyRootFilesystem must be true/,
      k8sCase(SIDE, (d) => { delete dotpOf(d).securityContext.readOnlyRootFilesystem; })],
    ["restricted: privilege escalation allowed", /allowPrivilegeEscalation must be false/,
      k8sCase(NATIVE, (d) => { dotpOf(d).securityContext.allowPrivilegeEscalation = true; })],
    ["restricted: the app container keeps its capabilities", /containers\/app: Pod Security restricted: capabilities.drop must include ALL/,
      k8sCase(SIDE, (d) => { delete podSpecOf(d[0]).spec.containers[0].securityContext.capabilities; })],
    ["restricted: root in the sidecar", /runAsNonRoot must be true/,
      k8sCase(SIDE, (d) => { dotpOf(d).securityContext.runAsNonRoot = false; delete podSpecOf(d[0]).spec.securityContext.runAsNonRoot; })],
    ["restricted: no seccomp profile", /seccompProfile.type must be RuntimeDefault/,
      k8sCase(DS, (d) => { delete dotpOf(d).securityContext.seccompProfile; })],
    ["hostNetwork: a capability beyond what it needs", /capability SYS_ADMIN added/,
      k8sCase(DS, (d) => { dsSpec(d).initContainers[0].securityContext.capabilities.add.push("SYS_ADMIN"); })],
    ["hostNetwork: hostPID is not forced by the host network", /Pod Security restricted: hostPID: true/,
      k8sCase(DS, (d) => { dsSpec(d).hostPID = true; })],
    ["probe: liveness over HTTP instead of dotp healthcheck", /livenessProbe must be an exec probe running \["\/dotp", "healthcheck"/,
      k8sCase(SIDE, (d) => { dotpOf(d).livenessProbe = { httpGet: { path: "/health", port: 9253 }, timeoutSeconds: 3 }; })],
    ["probe: liveness asking /ready (an upstream outage would restart dotp)", /livenessProbe must ask dotp itself/,
      k8sCase(DS, (d) => { dotpOf(d).livenessProbe.exec.command = ["/dotp", "healthcheck"]; })],
    ["probe: no readiness probe", /no readinessProbe/,
      k8sCase(NATIVE, (d) => { delete dotpOf(d).readinessProbe; })],
    ["probe: the 1 s default timeout", /timeoutSeconds must be at least 3/,
      k8sCase(SIDE, (d) => { delete dotpOf(d).readinessProbe.timeoutSeconds; })],
    ["annotations: no scrape annotation", /prometheus.io\/scrape must be "true"/,
      k8sCase(DS, (d) => { delete d.find((x) => x.kind === "DaemonSet").spec.template.metadata.annotations["prometheus.io/scrape"]; })],
    ["annotations: metrics on another port", /DOTP_METRICS 0.0.0.0:9999 is not on port 9253/,
      k8sCase(SIDE, (d) => { dotpOf(d).env.find((e) => e.name === "DOTP_METRICS").value = "0.0.0.0:9999"; })],
    ["native sidecar: restartPolicy missing", /restartPolicy: Always/,
      k8sCase(NATIVE, (d) => { delete dotpOf(d).restartPolicy; })],
    ["native sidecar: drifted from the classic one", /differs from sidecar.yaml's/,
      k8sCase(NATIVE, (d) => { dotpOf(d).env[0].value = "9.9.9.9#dns.quad9.net"; })],
    ["networkpolicy: metrics open to every namespace", /9253\/TCP open beyond the monitoring namespace/,
      k8sCase(NP, (d) => { d[0].spec.ingress.push({ ports: [{ protocol: "TCP", port: 9253 }] }); })],
    ["networkpolicy: no DoT egress", /no egress 853\/TCP/,
      k8sCase(NP, (d) => { d[0].spec.egress.shift(); })],
    ["compose: no healthcheck", /healthcheck.test must be/,
      () => { const c = YAML.parse(f.compose); delete c.services.dotp.healthcheck; return checkCompose(YAML.stringify(c), "compose"); }],
    ["compose: capabilities kept", /cap_drop must be \[ALL\]/,
      () => { const c = YAML.parse(f.compose); delete c.services.dotp.cap_drop; return checkCompose(YAML.stringify(c), "compose"); }],
    ["compose: a misspelt key", /readonly: not a Compose service key/,
      () => { const c = YAML.parse(f.compose); c.services.dotp.readonly = true; return checkCompose(YAML.stringify(c), "compose"); }],
    ["compose: not YAML", /YAML/,
      () => checkCompose("services:\n  dotp: [\n", "compose")],
    ["grafana: a metric dotp does not have", /metric dotp_cache_hit_total is not in README.md's Metrics table/,
      () => {
        const [file, text] = Object.entries(f.grafana)[0];
        return checkDashboard(text.split("dotp_cache_hits_total").join("dotp_cache_hit_total"), file, f.known).errs;
      }],
    ["grafana: a histogram queried as a counter (_total)", /dotp_answer_duration_seconds_total is not in README/,
      () => {
        const [file, text] = Object.entries(f.grafana)[0];
        return checkDashboard(text.split("dotp_answer_duration_seconds_bucket").join("dotp_answer_duration_seconds_total"), file, f.known).errs;
      }],
    ["grafana: unbalanced PromQL", /unbalanced brackets/,
      () => {
        const [file, text] = Object.entries(f.grafana)[0];
        const d = JSON.parse(text);
        d.panels.find((p) => p.targets).targets[0].expr = "sum(rate(dotp_queries_total[5m])";
        return checkDashboard(JSON.stringify(d), file, f.known).errs;
      }],
    ["grafana: no datasource variable", /no datasource variable/,
      () => {
        const [file, text] = Object.entries(f.grafana)[0];
        const d = JSON.parse(text);
        d.templating.list = d.templating.list.filter((v) => v.type !== "datasource");
        return checkDashboard(JSON.stringify(d), file, f.known).errs;
      }],
    ["grafana: not JSON", /JSON/,
      () => checkDashboard("{\"panels\": [", "dashboard.json", f.known).errs],
  ];
  let pass = 0;
  const errs = [];
  for (const [name, re, fn] of cases) {
    const got = fn();
    const hit = got.find((e) => re.test(e));
    if (hit) {
      pass++;
      console.log(`  ok    ${name}\n        rejected: ${hit}`);
    } else {
      errs.push(`self-test: "${name}" was not rejected as expected (${re});` +
        ` got: ${got.length ? got.join(" | ") : "no error"}`);
      console.log(`  FAIL  ${name}`);
    }
  }
  return { pass, errs, n: cases.length };
}

async function main() {
  const argv = process.argv.slice(2);
  const self = argv.includes("--self-test");
  const di = argv.indexOf("--dotp");
  const bin = di >= 0 ? argv[di + 1] : null;
  const f = readDeploy();
  let failed = 0, passed = 0;
  const report = (title, errs) => {
    if (errs.length) {
      failed++;
      console.log(`FAIL ${title}`);
      for (const e of errs)
        console.log(`  ${e}`);
    } else {
      passed++;
      console.log(`ok   ${title}`);
    }
  };
  const all = checkAll(f);
  report(`deploy/: ${all.summary.join("; ")}`, all.errs);
  if (bin) {
    if (fs.existsSync(bin))
      report(`live ${bin}: dashboard metrics in /metrics, probe commands`, await checkLive(bin, all.used, f.k8s));
    else
      console.log(`skip live checks: no ${bin} (make dotp)`);
  }
  if (self) {
    console.log("self-test: broken copies must be rejected");
    const st = selfTest(f);
    report(`self-test: ${st.pass} of ${st.n} broken inputs rejected`, st.errs);
  }
  console.log(`deploy: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e && e.stack || e);
  process.exit(1);
});
