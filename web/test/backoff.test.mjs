// The server goes away and stays away: the page retries with backoff (a
// few attempts, further and further apart, not a tight loop), says
// "offline" after eight failed attempts, keeps retrying, and is live again
// once the server is back. The page's clock is Playwright's: it moves only
// when the test moves it, so attempts are counted per span of page time
// without any sleep or wall-clock measurement.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { launch, removeDir, shot, startServer, tempDir, TIMEOUT } from "./helpers.mjs";

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

test("while the server is away the page retries with backoff, goes offline, and comes back", async () => {
  const dir = tempDir();
  cleanup.push(async () => removeDir(dir));
  let server = await startServer({ dataDir: dir });
  cleanup.push(() => server.stop());
  const browser = await launch();
  cleanup.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  page.setDefaultTimeout(TIMEOUT);

  // Watch calls the page starts, and those still open.
  let started = 0;
  const open = new Set();
  let settled = () => {};
  const isWatch = (r) => r.url().endsWith("/telemetry.TelemetryService/Watch");
  page.on("request", (r) => {
    if (!isWatch(r)) return;
    started++;
    open.add(r);
  });
  const done = (r) => {
    if (open.delete(r)) settled();
  };
  page.on("requestfailed", done);
  page.on("requestfinished", done);
  /** Waits until no Watch call is open (with the server down, each fails at once). */
  const allFailed = () =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${started} Watch calls started, ${open.size} still open`)), TIMEOUT);
      settled = () => {
        if (open.size === 0) {
          clearTimeout(timer);
          settled = () => {};
          resolve();
        }
      };
      settled();
    });

  await page.clock.install();
  await page.goto(server.url);
  const indicator = page.getByRole("status", { name: "Connection" });
  await indicator.getByText("live", { exact: true }).waitFor();
  const live = started;

  await server.stop();
  await indicator.getByText("reconnecting").waitFor();
  // From here on the page's timers fire only when the test moves its clock.
  // pauseAt needs a time still ahead of the page's clock, which runs on
  // until then: on a loaded machine a small margin can already be past
  // (CI saw "Cannot fast-forward to the past"), so widen it and retry.
  for (let margin = 50; ; margin *= 2) {
    try {
      await page.clock.pauseAt(await page.evaluate((m) => Date.now() + m, margin));
      break;
    } catch (err) {
      if (!String(err).includes("fast-forward to the past") || margin > 10_000) throw err;
    }
  }
  await allFailed();
  const before = started;
  /** Moves the page's clock `ms` forward in 100 ms steps, letting each attempt fail. */
  const advance = async (ms) => {
    for (let t = 0; t < ms; t += 100) {
      await page.clock.runFor(100);
      await allFailed();
    }
  };
  // 250 ms doubling (±25 %): at most 5 attempts in 3 s (fewer if some
  // failed before the clock was paused); a fixed 250 ms retry would make
  // 12, a tight loop one per step.
  await advance(3000);
  const early = started - before;
  assert.ok(early >= 1 && early <= 5, `${early} attempts in the first 3 s of page time`);
  // Capped at 5 s: after 8 failed attempts in all the indicator says offline.
  await advance(29_000);
  await indicator.getByText("offline").waitFor();
  const total = started - before;
  assert.ok(total <= 11, `${total} attempts in 32 s of page time`);
  assert.ok(started - live >= 8, `offline after ${started - live} attempts`);
  await shot(page, "backoff-offline");

  // Still retrying: back to live once the server is.
  server = await startServer({ dataDir: dir, listen: server.addr });
  await page.clock.resume();
  await indicator.getByText("live", { exact: true }).waitFor({ timeout: 3 * TIMEOUT });
  await shot(page, "backoff-live");
});
