// Shared pieces of the browser tests: the real streamhub binary on a
// loopback port, gRPC clients generated at run time from proto/ (the
// contract the page uses too), and headless Chromium driven by playwright-core.
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { once } from "node:events";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, "../..");
export const screenshots = join(here, "screenshots");
// Not STREAMHUB_*: the server reads every STREAMHUB_ variable as configuration.
export const bin = process.env.WEB_TEST_BIN ?? join(repo, "target/debug/streamhub");

/** Fails a wait that takes longer than this (the page's own waits use Playwright's timeouts). */
export const TIMEOUT = 15_000;

export function tempDir() {
  return mkdtempSync(join(tmpdir(), "streamhub-web-test-"));
}

/**
 * Starts `streamhub serve` on `listen` (default an ephemeral loopback port)
 * and resolves once it prints `streamhub listening on ADDR`.
 */
export async function startServer({ dataDir, listen = "127.0.0.1:0", args = [] }) {
  const proc = spawn(bin, ["serve", "--listen", listen, "--data-dir", dataDir, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    // Hermetic: no STREAMHUB_* setting of the caller's environment reaches the server.
    env: {
      ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("STREAMHUB_"))),
      RUST_LOG: process.env.RUST_LOG ?? "warn",
    },
  });
  let stderr = "";
  proc.stderr.on("data", (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  const addr = await new Promise((resolveAddr, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`streamhub did not print its address within ${TIMEOUT} ms:\n${stderr}`)), TIMEOUT);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /streamhub listening on (\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolveAddr(m[1]);
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`streamhub exited with ${code} before listening:\n${stderr}`));
    });
  });
  return {
    addr,
    url: `http://${addr}/`,
    proc,
    /** SIGTERM (graceful shutdown), then waits for the exit. */
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      await once(proc, "exit");
    },
  };
}

const packages = grpc.loadPackageDefinition(
  protoLoader.loadSync(["telemetry.proto", "chat.proto", "fileupload.proto", "server.proto"], {
    includeDirs: [join(repo, "proto")],
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  }),
);

export function clients(addr) {
  const creds = grpc.credentials.createInsecure();
  return {
    telemetry: new packages.telemetry.TelemetryService(addr, creds),
    chat: new packages.chat.ChatService(addr, creds),
    files: new packages.fileupload.FileUploadService(addr, creds),
    close() {
      this.telemetry.close();
      this.chat.close();
      this.files.close();
    },
  };
}

/** A LiveFeed call: `send` publishes a sample, `alerts` collects what comes back. */
export function liveFeed(c, token) {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  const call = c.telemetry.LiveFeed(md);
  const alerts = [];
  call.on("data", (a) => alerts.push(a));
  call.on("error", () => {});
  return {
    alerts,
    send(p) {
      call.write({ timestampMs: Date.now(), requestCount: 0, ...p });
    },
    end() {
      call.end();
    },
  };
}

/**
 * Waits until the server keeps at least `n` samples of `service` (LiveFeed
 * has no acknowledgment), asking GetHistory until it does.
 */
export async function waitForHistory(c, service, n) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const got = await new Promise((ok) =>
      c.telemetry.GetHistory({ serviceName: service }, (err, r) => ok(err ? 0 : r.samples.length)),
    );
    if (got >= n) return;
    if (Date.now() > deadline) throw new Error(`the server kept ${got} samples of ${service}, not ${n}, within ${TIMEOUT} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A Chat member: `received` collects messages, `waitFor` waits for one matching. */
export function chatMember(c, room, name) {
  const md = new grpc.Metadata();
  md.set("chat-room", room);
  md.set("chat-member", name);
  const call = c.chat.Chat(md);
  const received = [];
  const waiters = [];
  call.on("data", (m) => {
    received.push(m);
    for (const w of [...waiters]) if (w.pred(m)) w.done(m);
  });
  call.on("error", () => {});
  return {
    received,
    send(text, key) {
      call.write({ sender: name, message: text, idempotencyKey: key });
    },
    waitFor(pred) {
      const hit = received.find(pred);
      if (hit) return Promise.resolve(hit);
      return new Promise((resolveMsg, reject) => {
        const w = {
          pred,
          done: (m) => {
            clearTimeout(timer);
            waiters.splice(waiters.indexOf(w), 1);
            resolveMsg(m);
          },
        };
        const timer = setTimeout(() => reject(new Error(`no matching chat message within ${TIMEOUT} ms; got ${JSON.stringify(received)}`)), TIMEOUT);
        waiters.push(w);
      });
    },
    end() {
      call.end();
    },
    /** Drops the call, as a client that goes away. */
    cancel() {
      call.cancel();
    },
  };
}

/** Uploads `data` as `filename` in one call (client streaming), with `token` if given. */
export function upload(c, filename, data, token) {
  return new Promise((resolveUp, reject) => {
    const md = new grpc.Metadata();
    if (token) md.set("authorization", `Bearer ${token}`);
    const call = c.files.Upload(md, (err, res) => (err ? reject(err) : resolveUp(res)));
    const chunk = 64 * 1024;
    for (let i = 0, n = 0; i < data.length || n === 0; i += chunk, n++) {
      call.write({ filename, data: data.subarray(i, i + chunk), chunkIndex: n, isLast: i + chunk >= data.length });
    }
    call.end();
  });
}

export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-quic",
];

export function launch() {
  return chromium.launch({
    executablePath: process.env.WEB_TEST_CHROMIUM ?? "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
  });
}

/** Saves a screenshot of what the page shows into test/screenshots/NAME.png. */
export async function shot(page, name) {
  mkdirSync(screenshots, { recursive: true });
  await page.screenshot({ path: join(screenshots, `${name}.png`), fullPage: true });
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
}
