// Development only: serves dist/ and answers the page's gRPC-Web calls from
// an in-memory mock of the server (grpc-js, behind a small gRPC-Web to
// gRPC proxy), so the page can be worked on without the Rust server.
//   node dev/mock.mjs [PORT]        MOCK_SERVICES=200 MOCK_TOKEN=secret
// The tests never use this: they run the real binary.
import { createServer } from "node:http";
import net from "node:net";
import http2 from "node:http2";
import { readFileSync, existsSync } from "node:fs";
import { createHash } from "node:crypto";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(here, "../dist");
const protoDir = resolve(here, "../../proto");
// `serve --listen ADDR --data-dir DIR` mimics the binary closely enough for
// a dry run of the browser tests (WEB_TEST_BIN=web/dev/fake-streamhub):
// one port for gRPC and HTTP, no generated data.
if (process.argv[2] === "token") process.exit(0); // `token new --help`: the fake has tokens too
if (process.argv[2] && process.argv[2] !== "serve" && !/^\d+$/.test(process.argv[2])) {
  console.error("usage: node dev/mock.mjs [PORT] | serve --listen ADDR --data-dir DIR [--config FILE]");
  process.exit(2);
}
const fake = process.argv[2] === "serve";
const listenArg = fake ? process.argv[process.argv.indexOf("--listen") + 1] : `127.0.0.1:${process.argv[2] ?? 8080}`;
const nServices = fake ? 0 : Number(process.env.MOCK_SERVICES ?? 6);
const token = process.env.MOCK_TOKEN ?? "";
// In fake mode, `[[auth.tokens]]` entries of --config (identity, sha256, scopes), read roughly.
const tokens = new Map();
const configAt = process.argv.indexOf("--config");
if (configAt > 0) {
  for (const entry of readFileSync(process.argv[configAt + 1], "utf8").split("[[auth.tokens]]").slice(1)) {
    const get = (k) => new RegExp(`${k}\\s*=\\s*(.*)`).exec(entry)?.[1];
    tokens.set(JSON.parse(get("sha256")), { identity: JSON.parse(get("identity")), scopes: JSON.parse(get("scopes")) });
  }
}
function identityOf(call) {
  const h = call.metadata.get("authorization")[0] ?? "";
  return tokens.get(createHash("sha256").update(h.replace(/^Bearer /, "")).digest("hex"));
}
const started = Date.now();

const pkg = grpc.loadPackageDefinition(
  protoLoader.loadSync(["telemetry.proto", "chat.proto", "fileupload.proto", "server.proto"], {
    includeDirs: [protoDir], longs: Number, enums: String, defaults: true, oneofs: true,
  }),
);

function authed(call, cb, scope) {
  if (tokens.size) {
    const id = identityOf(call);
    let err = null;
    if (!id) err = { code: grpc.status.UNAUTHENTICATED, details: "unknown token" };
    else if (scope && !id.scopes.some((s) => s === "*" || s.startsWith(scope))) err = { code: grpc.status.PERMISSION_DENIED, details: `identity "${id.identity}" lacks the scope ${scope}` };
    if (!err) return true;
    if (cb) cb(err);
    else call.destroy(err);
    return false;
  }
  if (!token) return true;
  const h = call.metadata.get("authorization")[0];
  if (h === `Bearer ${token}`) return true;
  const err = { code: grpc.status.UNAUTHENTICATED, details: h ? "the token is not valid" : "a bearer token is required" };
  if (cb) cb(err);
  else call.destroy(err);
  return false;
}

// --- telemetry ---
const services = new Map();
const alerts = [];
const watchers = new Set();
const names = ["api-gateway", "checkout", "payments", "search", "inventory", "auth"];
for (let i = 0; i < nServices; i++) services.set(i < names.length ? names[i] : `svc-${String(i).padStart(3, "0")}`, []);
function record(s) {
  const hist = services.get(s.serviceName) ?? [];
  services.set(s.serviceName, hist);
  if (hist.length && hist[hist.length - 1].timestampMs >= s.timestampMs) return;
  hist.push(s);
  if (hist.length > 900) hist.shift();
  for (const w of watchers) w({ sample: s });
}
function raise(name, a) {
  alerts.push({ serviceName: name, alert: a });
  for (const w of watchers) w({ alert: { serviceName: name, alert: a } });
}
if (fake) setInterval(() => record({ serviceName: "streamhub", cpuUsage: 1.5, memoryMb: 64, requestCount: 0, timestampMs: Date.now() }), 1000);
function tick() {
  const now = Date.now();
  let k = 0;
  for (const [name, hist] of services) {
    if (name === "search" && now - started > 20000) continue; // goes silent
    const prev = hist[hist.length - 1];
    const cpu = Math.max(0, Math.min(100, (prev?.cpuUsage ?? 30 + (k++ * 7) % 50) + (Math.random() - 0.5) * 12 + (Math.random() < 0.02 ? 60 : 0)));
    const s = { serviceName: name, cpuUsage: cpu, memoryMb: 400 + (k * 137) % 3000 + Math.random() * 20, requestCount: (prev?.requestCount ?? 0) + Math.floor(Math.random() * 40), timestampMs: now };
    hist.push(s);
    if (hist.length > 900) hist.shift();
    if (prev && (prev.cpuUsage > 90) !== (cpu > 90)) {
      raise(name, { alertType: cpu > 90 ? "CPU_HIGH" : "CPU_HIGH_RESOLVED", message: `${name}: CPU at ${cpu.toFixed(1)}%`, value: cpu, timestampMs: now });
    }
    for (const w of watchers) w({ sample: s });
  }
}
// History before the page opens.
for (let t = nServices ? 300 : 0; t > 0; t--) {
  const now = Date.now() - t * 1000;
  for (const [name, hist] of services) hist.push({ serviceName: name, cpuUsage: 20 + 15 * Math.sin(t / 20 + name.length), memoryMb: 500 + name.length * 100, requestCount: (300 - t) * 20, timestampMs: now });
}
if (nServices) setInterval(tick, 1000);

const telemetry = {
  Watch(call) {
    if (!authed(call)) return;
    const r = call.request;
    for (const [name, hist] of services) call.write({ backfill: { serviceName: name, samples: hist.slice(-r.backfillSamples) } });
    for (const a of alerts.slice(-r.backfillAlerts)) call.write({ alert: a });
    call.write({ live: { timestampMs: Date.now() } });
    const w = (ev) => call.write(ev);
    watchers.add(w);
    call.on("cancelled", () => watchers.delete(w));
  },
  GetHistory(call, cb) {
    if (!authed(call, cb)) return;
    const hist = services.get(call.request.serviceName);
    if (!hist) return cb({ code: grpc.status.NOT_FOUND, details: "no such service" });
    cb(null, { serviceName: call.request.serviceName, samples: call.request.limit ? hist.slice(-call.request.limit) : hist });
  },
  LiveFeed(call) {
    if (!authed(call)) return;
    const high = new Map();
    call.on("data", (p) => {
      const s = { serviceName: p.serviceName, cpuUsage: p.cpuUsage, memoryMb: p.memoryMb, requestCount: p.requestCount, timestampMs: p.timestampMs || Date.now() };
      record(s);
      const above = s.cpuUsage > 90;
      if (above !== (high.get(s.serviceName) ?? false)) {
        high.set(s.serviceName, above);
        const a = { alertType: above ? "CPU_HIGH" : "CPU_HIGH_RESOLVED", message: `${s.serviceName}: CPU at ${s.cpuUsage.toFixed(1)}%`, value: s.cpuUsage, timestampMs: s.timestampMs };
        call.write(a);
        raise(s.serviceName, a);
      }
    });
    call.on("end", () => call.end());
  },
  ListServices(call, cb) {
    cb(null, { services: [...services].map(([n, h]) => ({ serviceName: n, latest: h[h.length - 1] })) });
  },
};

// --- chat ---
const rooms = new Map();
function room(name) {
  if (!rooms.has(name)) rooms.set(name, { msgs: [], members: new Set(), keys: new Map() });
  return rooms.get(name);
}
function post(rname, m) {
  const r = room(rname);
  const stored = { ...m, seq: r.msgs.length + 1, epoch: 1, timestamp: Math.floor(Date.now() / 1000), timestampMs: Date.now() };
  r.msgs.push(stored);
  for (const w of r.members) w(stored);
  return stored;
}
const chat = {
  Chat(call) {
    const name = call.metadata.get("chat-room")[0] || "lobby";
    const member = call.metadata.get("chat-member")[0];
    const r = room(name);
    const w = (m) => call.write(m);
    r.members.add(w);
    if (member) post(name, { sender: member, message: "", kind: "KIND_JOINED" });
    call.on("data", (m) => {
      const k = `${m.sender}\0${m.idempotencyKey}`;
      if (m.idempotencyKey && r.keys.has(k)) return call.write(r.keys.get(k));
      const stored = post(name, { sender: m.sender, message: m.message, idempotencyKey: m.idempotencyKey, kind: "KIND_MEMBER" });
      if (m.idempotencyKey) r.keys.set(k, stored);
    });
    const leave = () => {
      if (!r.members.delete(w)) return;
      if (member) post(name, { sender: member, message: "", kind: "KIND_LEFT" });
    };
    call.on("end", () => { leave(); call.end(); });
    call.on("cancelled", leave);
  },
  WatchRoom(call) {
    if (!authed(call)) return;
    const q = call.request;
    const name = q.room || "lobby";
    const r = room(name);
    const from = q._afterSeq ? r.msgs.filter((m) => m.seq > q.afterSeq) : r.msgs.slice(-q.history || r.msgs.length);
    for (const m of q._afterSeq || q.history ? from : []) call.write(m);
    const w = (m) => call.write(m);
    r.members.add(w);
    if (q.member) post(name, { sender: q.member, message: "", kind: "KIND_JOINED" });
    call.on("cancelled", () => {
      r.members.delete(w);
      if (q.member) post(name, { sender: q.member, message: "", kind: "KIND_LEFT" });
    });
  },
  Send(call, cb) {
    if (!authed(call, cb)) return;
    const name = call.request.room || "lobby";
    const m = call.request.message;
    const r = room(name);
    const k = `${m.sender}\0${m.idempotencyKey}`;
    if (m.idempotencyKey && r.keys.has(k)) return cb(null, r.keys.get(k));
    const stored = post(name, { sender: m.sender, message: m.message, idempotencyKey: m.idempotencyKey, kind: "KIND_MEMBER" });
    if (m.idempotencyKey) r.keys.set(k, stored);
    cb(null, stored);
  },
};
if (!fake) setInterval(() => post("lobby", { sender: "mock-bot", message: `the time is ${new Date().toISOString()}`, kind: "KIND_MEMBER" }), 15000);

// --- files ---
const fileData = fake ? {} : { "hello.txt": Buffer.from("hello, streamhub\n"), "backup.tar": Buffer.alloc(3 * 1024 * 1024 + 123, 7) };
const files = {
  Upload(call, cb) {
    const parts = [];
    let name = "";
    call.on("data", (c) => {
      name = c.filename;
      parts.push(c.data);
      if (c.isLast) {
        fileData[name] = Buffer.concat(parts);
        const sha = createHash("sha256").update(fileData[name]).digest();
        cb(null, { filename: name, totalBytes: fileData[name].length, totalChunks: parts.length, success: true, sha256: sha });
      }
    });
  },
  ListFiles(call, cb) {
    if (!authed(call, cb, "upload:read")) return;
    cb(null, { files: Object.entries(fileData).map(([n, d]) => ({ filename: n, size: d.length, sha256: createHash("sha256").update(d).digest(), modifiedMs: started })) });
  },
  ListUploads(call, cb) {
    if (!authed(call, cb, "upload:write")) return;
    cb(null, { uploads: fake ? [] : [{ filename: "monday.tar", heldBytes: 641728512, inProgress: true, expiresAtMs: started + 86400000 }] });
  },
};

const serverSvc = {
  WhoAmI(call, cb) {
    if (!authed(call, cb)) return;
    const id = identityOf(call);
    if (id) return cb(null, { identity: id.identity, scopes: id.scopes, authEnabled: true, method: "token" });
    cb(null, { identity: token ? "ops" : "anonymous", scopes: ["*"], authEnabled: !!token, method: token ? "token" : "none" });
  },
  GetServerInfo(call, cb) {
    if (!authed(call, cb, "server:read")) return;
    cb(null, { version: "0.0.0-mock", startedAtMs: started, openConnections: 2, node: "mock", authEnabled: !!token, streams: [{ method: "/chat.ChatService/WatchRoom", open: 1 }, { method: "/telemetry.TelemetryService/Watch", open: watchers.size }] });
  },
};

const g = new grpc.Server();
g.addService(pkg.telemetry.TelemetryService.service, telemetry);
g.addService(pkg.chat.ChatService.service, chat);
g.addService(pkg.fileupload.FileUploadService.service, files);
g.addService(pkg.streamhub.ServerService.service, serverSvc);
const grpcPort = await new Promise((ok, no) => g.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? no(e) : ok(p))));
const h2 = http2.connect(`http://127.0.0.1:${grpcPort}`);

function trailerFrame(status, message) {
  const text = Buffer.from(`grpc-status:${status}\r\ngrpc-message:${encodeURIComponent(message ?? "")}\r\n`);
  const head = Buffer.alloc(5);
  head[0] = 0x80;
  head.writeUInt32BE(text.length, 1);
  return Buffer.concat([head, text]);
}

const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css" };
const web = createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (req.method === "POST" && (req.headers["content-type"] ?? "").startsWith("application/grpc-web")) {
    const headers = { ":method": "POST", ":path": url.pathname, "content-type": "application/grpc", te: "trailers" };
    if (req.headers.authorization) headers.authorization = req.headers.authorization;
    const s = h2.request(headers);
    req.pipe(s);
    let status = null;
    let message = "";
    s.on("response", (h) => {
      res.writeHead(200, { "content-type": "application/grpc-web+proto" });
      if (h["grpc-status"] !== undefined) [status, message] = [h["grpc-status"], decodeURIComponent(h["grpc-message"] ?? "")];
    });
    s.on("data", (d) => res.write(d));
    s.on("trailers", (t) => ([status, message] = [t["grpc-status"], decodeURIComponent(t["grpc-message"] ?? "")]));
    s.on("end", () => res.end(trailerFrame(status ?? 2, message)));
    s.on("error", () => res.destroy());
    res.on("close", () => s.close());
    return;
  }
  if (url.pathname.startsWith("/files/")) {
    const d = fileData[decodeURIComponent(url.pathname.slice(7))];
    if (!d) return res.writeHead(404).end("not found");
    return res.writeHead(200, { "content-length": d.length, "content-type": "application/octet-stream" }).end(d);
  }
  const path = join(dist, url.pathname === "/" ? "index.html" : url.pathname.slice(1));
  if (!path.startsWith(dist) || !existsSync(path)) return res.writeHead(404).end("not found");
  res.writeHead(200, { "content-type": types[path.slice(path.lastIndexOf("."))] ?? "application/octet-stream" }).end(readFileSync(path));
});
// One port for both, as the real server: HTTP/2 (native gRPC) goes to grpc-js, HTTP/1.1 to the page's server.
const front = net.createServer((sock) => {
  sock.once("data", (first) => {
    sock.pause();
    if (first.subarray(0, 3).toString() === "PRI") {
      const up = net.connect(grpcPort, "127.0.0.1", () => {
        up.write(first);
        sock.pipe(up).pipe(sock);
        sock.resume();
      });
      up.on("error", () => sock.destroy());
      sock.on("error", () => up.destroy());
    } else {
      sock.unshift(first);
      web.emit("connection", sock);
      sock.resume();
    }
  });
});
const [host, portText] = [listenArg.slice(0, listenArg.lastIndexOf(":")), listenArg.slice(listenArg.lastIndexOf(":") + 1)];
front.listen(Number(portText), host, () => {
  const addr = `${host}:${front.address().port}`;
  console.log(fake ? `streamhub listening on ${addr}` : `mock dashboard on http://${addr}/`);
});
process.on("SIGTERM", () => {
  for (const w of watchers) watchers.delete(w);
  process.exit(0);
});
