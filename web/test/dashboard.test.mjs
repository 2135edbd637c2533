// The dashboard used as a person would, in headless Chromium, against the
// real streamhub binary: services, charts, alerts, chat, files, server
// info. Every wait is for something the page shows.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { bin, chatMember, clients, launch, liveFeed, removeDir, shot, startServer, tempDir, upload, waitForHistory, TIMEOUT } from "./helpers.mjs";
import { execFileSync } from "node:child_process";

/** Presses Tab until `target` has the focus (at most `max` times), as a keyboard user reaches it. */
async function tabTo(page, target, max = 40, key = "Tab") {
  for (let i = 0; i < max; i++) {
    await page.keyboard.press(key);
    if (await target.evaluate((el) => el === document.activeElement)) return;
  }
  throw new Error(`Tab did not reach ${target} within ${max} presses`);
}

/** What the CLI prints for a service's latest sample (`streamhub snapshot`). */
function cliSnapshot(addr, name) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("STREAMHUB_") && k !== "RUST_BACKTRACE"));
  return execFileSync(bin, ["--server", `http://${addr}`, "snapshot", name], { env, encoding: "utf8" });
}

/** The page is no wider than the viewport (no sideways scrolling of the whole page). */
async function fitsWidth(page) {
  const [scroll, inner] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  assert.ok(scroll <= inner, `page is ${scroll} px wide in a ${inner} px viewport`);
}

describe("dashboard", () => {
  let dir, server, grpc, browser, context, page, feed;

  before(async () => {
    dir = tempDir();
    server = await startServer({ dataDir: dir });
    grpc = clients(server.addr);
    feed = liveFeed(grpc);
    browser = await launch();
    context = await browser.newContext({ viewport: { width: 1100, height: 800 }, acceptDownloads: true });
    context.setDefaultTimeout(TIMEOUT);
    page = await context.newPage();
  });

  after(async () => {
    await shot(page, "last").catch(() => {});
    feed?.end();
    grpc?.close();
    await browser?.close();
    await server?.stop();
    removeDir(dir);
  });

  test("a service published over gRPC appears with its value, rate and age", async () => {
    const now = Date.now();
    feed.send({ serviceName: "checkout", cpuUsage: 12.0, memoryMb: 900, requestCount: 100, timestampMs: now - 1000 });
    feed.send({ serviceName: "checkout", cpuUsage: 42.4, memoryMb: 1536.4, requestCount: 150, timestampMs: now });
    await waitForHistory(grpc, "checkout", 2);
    await page.goto(server.url);
    await page.getByText("live", { exact: true }).waitFor();
    const row = page.getByRole("row", { name: /checkout/ });
    // Formatted as the CLI prints them: CPU with one decimal, memory in whole MB.
    await row.getByText("42.4%").waitFor();
    await row.getByText("1536 MB").waitFor();
    // 50 requests in one second, from the request_count delta.
    await row.getByText("50/s").waitFor();
    await row.getByText(/ago/).waitFor();
    // Its sparkline is drawn (the canvas is not blank).
    await page.waitForFunction(() => {
      const c = document.querySelector('tr[data-service="checkout"] canvas');
      return c && c.getContext("2d").getImageData(0, 0, c.width, c.height).data.some((v) => v !== 0);
    });
    // The server's own host sampler appears too.
    await page.getByRole("row", { name: /^streamhub\b/ }).waitFor();

    // Rounded as the CLI rounds (Rust's `{:.1}`/`{:.0}`: ties to even), so
    // the page and `streamhub snapshot` print the same figures.
    feed.send({ serviceName: "rounding", cpuUsage: 12.25, memoryMb: 1536.5 });
    await waitForHistory(grpc, "rounding", 1);
    const cli = cliSnapshot(server.addr, "rounding");
    const [, cliCpu] = /CPU\s+(\S+%)/.exec(cli);
    const [, cliMem] = /memory\s+(\d+ MB)/.exec(cli);
    assert.deepEqual([cliCpu, cliMem], ["12.2%", "1536 MB"], cli);
    const rounding = page.getByRole("row", { name: /rounding/ });
    await rounding.getByText(cliCpu, { exact: true }).waitFor();
    await rounding.getByText(cliMem, { exact: true }).waitFor();

    // A service that appears later shows up without a reload.
    feed.send({ serviceName: "payments", cpuUsage: 7.5, memoryMb: 256 });
    await page.getByRole("row", { name: /payments/ }).getByText("7.5%").waitFor();

    // A service whose last report is a minute old is marked silent.
    feed.send({ serviceName: "quiet", cpuUsage: 3.3, memoryMb: 10, timestampMs: Date.now() - 60_000 });
    await page.getByRole("row", { name: /quiet/ }).getByText(/silent/).waitFor();

    const filter = page.getByLabel("Filter services");
    await filter.fill("pay");
    await page.getByRole("row", { name: /checkout/ }).waitFor({ state: "hidden" });
    await shot(page, "overview-filtered");
    await filter.fill("no-such-service");
    await page.getByText("No service matches “no-such-service”.").waitFor();
    assert.equal(await page.getByText("No service has reported yet.").count(), 0);
    await filter.fill("");
    await page.getByRole("row", { name: /checkout/ }).waitFor();
    await shot(page, "overview");
  });

  test("a service's chart is back-filled and gains points live", async () => {
    await page.getByRole("link", { name: "checkout", exact: true }).click();
    await page.getByRole("heading", { name: "checkout" }).waitFor();
    const status = page.getByText(/samples shown/);
    await status.waitFor();
    const count = async () => Number(/(\d+) samples shown/.exec(await status.textContent())[1]);
    await page.waitForFunction(() => /([2-9]|\d\d+) samples shown/.test(document.body.innerText));
    const before = await count();
    assert.ok(before >= 2, `back-filled with both samples, got ${before}`);
    feed.send({ serviceName: "checkout", cpuUsage: 55.5, memoryMb: 1600, requestCount: 200 });
    await page.getByText(/CPU 55\.5%/).waitFor();
    await page.waitForFunction((n) => {
      const m = /(\d+) samples shown/.exec(document.body.innerText);
      return m && Number(m[1]) > n;
    }, before);
    // Three charts (uPlot canvases), one per metric.
    assert.equal(await page.locator("figure.chart canvas").count(), 3);
    // Window presets and pause/resume are buttons a keyboard reaches.
    await page.getByRole("button", { name: "5 min", exact: true }).click();
    assert.equal(await page.getByRole("button", { name: "5 min", exact: true }).getAttribute("aria-pressed"), "true");
    await page.getByRole("button", { name: "Pause" }).click();
    await page.getByRole("button", { name: "Resume" }).click();
    await page.getByRole("button", { name: "Pause" }).waitFor();
    // Hovering one chart moves the cursor of all three: each legend shows its value there.
    const over = page.locator("figure.chart").first().locator(".u-over");
    const box = await over.boundingBox();
    // Near the right edge, where the newest samples are.
    await over.hover({ position: { x: box.width - 3, y: box.height / 2 } });
    for (const unit of [/%$/, / MB$/, /\/s$|—/]) {
      await page.locator("figure.chart .u-legend .u-series:nth-child(2) .u-value").filter({ hasText: unit }).first().waitFor();
    }
    const values = await page.locator("figure.chart .u-legend .u-series:nth-child(2) .u-value").allTextContents();
    assert.match(values[0], /^\d+\.\d%$/, `CPU at the cursor: ${values}`);
    assert.match(values[1], /^\d+ MB$/, `memory at the cursor: ${values}`);
    // Zooming pauses until Reset zoom.
    await page.getByRole("button", { name: "Zoom in" }).click();
    await page.getByRole("button", { name: "Resume" }).waitFor();
    await page.getByRole("button", { name: "Reset zoom" }).click();
    await page.getByRole("button", { name: "Pause" }).waitFor();
    assert.equal(await page.getByRole("button", { name: "Reset zoom" }).isDisabled(), true);
    await shot(page, "service");
  });

  test("an alert raised by a LiveFeed appears in the alert feed", async () => {
    await page.getByRole("link", { name: "Alerts" }).click();
    await page.getByRole("heading", { name: "Alerts" }).waitFor();
    feed.send({ serviceName: "checkout", cpuUsage: 97.0, memoryMb: 1600, requestCount: 300 });
    const item = page.getByRole("listitem").filter({ hasText: "CPU_HIGH" }).filter({ hasText: "checkout" });
    await item.first().waitFor();
    feed.send({ serviceName: "checkout", cpuUsage: 20.0, memoryMb: 1600, requestCount: 400 });
    await page.getByRole("listitem").filter({ hasText: "CPU_HIGH_RESOLVED" }).first().waitFor();
    // Newest first.
    const first = await page.getByRole("list", { name: /Alerts/ }).getByRole("listitem").first().textContent();
    assert.match(first, /CPU_HIGH_RESOLVED/);
    await shot(page, "alerts");
    // A page opened later finds them back-filled, each once.
    const late = await context.newPage();
    await late.goto(`${server.url}#/alerts`);
    await late.getByRole("listitem").filter({ hasText: "CPU_HIGH_RESOLVED" }).filter({ hasText: "checkout" }).waitFor();
    assert.equal(await late.getByRole("listitem").filter({ hasText: "CPU_HIGH_RESOLVED" }).filter({ hasText: "checkout" }).count(), 1);
    await late.close();
  });

  test("chat lines go both ways between the page and a gRPC Chat client", async () => {
    await page.getByRole("link", { name: "Chat" }).click();
    await page.getByLabel("Room").fill("e2e");
    await page.getByLabel("Room").press("Enter");
    await page.getByText("In room e2e").waitFor();
    const bot = chatMember(grpc, "e2e", "bot");
    await page.getByRole("log").getByText("bot joined").waitFor();

    await page.getByLabel("Message").fill("hello from the page");
    await page.getByLabel("Message").press("Enter");
    const got = await bot.waitFor((m) => m.message === "hello from the page");
    assert.ok(Number(got.seq) > 0);
    await page.getByRole("log").getByText("hello from the page").waitFor();
    await page.getByText("(sending…)").waitFor({ state: "detached" });

    bot.send("hello from grpc", "bot-1");
    await page.getByRole("log").getByText("hello from grpc").waitFor();
    // Each stored message once.
    assert.equal(await page.getByRole("log").getByText("hello from the page").count(), 1);
    assert.equal(await page.getByRole("log").getByText("hello from grpc").count(), 1);
    await shot(page, "chat");
    // The member goes away (its call is dropped): the page shows the leave.
    bot.cancel();
    await page.getByRole("log").getByText("bot left").waitFor();
    // Someone opening the room later reads its recent history.
    const late = await context.newPage();
    await late.goto(`${server.url}#/chat`);
    await late.getByLabel("Room").fill("e2e");
    await late.getByLabel("Room").press("Enter");
    await late.getByRole("log").getByText("hello from grpc").waitFor();
    await late.getByRole("log").getByText("hello from the page").waitFor();
    await late.close();
  });

  test("a file downloaded through the page matches the stored bytes", async () => {
    const data = randomBytes(200_000);
    const sha = createHash("sha256").update(data).digest("hex");
    await upload(grpc, "e2e.bin", data);
    await page.getByRole("link", { name: "Files" }).click();
    const link = page.getByRole("link", { name: "e2e.bin" });
    await link.waitFor();
    await page.getByText(sha).waitFor();
    await page.getByText("195.31 KiB").waitFor();
    const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
    const got = await readFile(await download.path());
    assert.equal(got.length, data.length);
    assert.ok(got.equals(data), "downloaded bytes equal the uploaded ones");

    // An upload left open shows under "Uploads in progress" with the bytes the server holds.
    const call = grpc.files.Upload((_err) => {});
    call.write({ filename: "half.bin", data: randomBytes(100_000), chunkIndex: 0, isLast: false });
    const row = page.getByRole("table", { name: "Uploads in progress" }).getByRole("row", { name: /half\.bin/ });
    await row.getByText("97.66 KiB").waitFor();
    await row.getByText("yes").waitFor();
    await shot(page, "files");
    call.cancel();
  });

  test("the server view shows version, connections and open streams", async () => {
    await page.getByRole("link", { name: "Server" }).click();
    await page.getByRole("heading", { name: "Server" }).waitFor();
    await page.getByText(/^\d+\.\d+\.\d+/).first().waitFor();
    // The page's own Watch stream is open, one per page.
    const watch = page.getByRole("row", { name: /telemetry\.TelemetryService\/Watch/ });
    await watch.getByRole("cell", { name: "1", exact: true }).waitFor();
    // A second page opens a second Watch stream, and a chat room a WatchRoom.
    const other = await context.newPage();
    await other.goto(`${server.url}#/chat`);
    await other.getByText(/^In room /).waitFor();
    await watch.getByRole("cell", { name: "2", exact: true }).waitFor();
    await page.getByRole("row", { name: /chat\.ChatService\/WatchRoom/ }).getByRole("cell", { name: "1", exact: true }).waitFor();
    await other.close();
    await watch.getByRole("cell", { name: "1", exact: true }).waitFor();
    await page.getByRole("row", { name: /chat\.ChatService\/WatchRoom/ }).getByRole("cell", { name: "1", exact: true }).waitFor({ state: "detached" });
    await page.getByText(/^\d+ (s|min \d+ s)$/).first().waitFor();
    await shot(page, "server");
  });

  test("phone width: every view fits the screen and its controls are reachable", async () => {
    await page.setViewportSize({ width: 390, height: 800 });
    await page.getByRole("link", { name: "Overview" }).click();
    await page.getByRole("row", { name: /checkout/ }).waitFor();
    await fitsWidth(page);
    await page.getByRole("link", { name: "checkout", exact: true }).click();
    await page.getByText(/samples shown/).waitFor();
    await fitsWidth(page);
    await page.getByRole("button", { name: "15 min" }).click();
    await page.getByRole("link", { name: "Alerts" }).click();
    await page.getByRole("listitem").filter({ hasText: "CPU_HIGH" }).first().waitFor();
    await fitsWidth(page);
    await page.getByRole("link", { name: "Files" }).click();
    await page.getByRole("link", { name: "e2e.bin" }).waitFor();
    await fitsWidth(page);
    await page.getByRole("link", { name: "Chat" }).click();
    await page.getByLabel("Message").waitFor();
    await fitsWidth(page);
    await page.getByRole("link", { name: "Server" }).click();
    await page.getByRole("row", { name: /TelemetryService\/Watch/ }).waitFor();
    await fitsWidth(page);
    await shot(page, "phone");
    await page.setViewportSize({ width: 1100, height: 800 });
  });

  test("themes: light, dark and the system's, remembered", async () => {
    const background = () => page.evaluate(() => getComputedStyle(document.documentElement).backgroundColor);
    await page.getByRole("link", { name: "Overview" }).click();
    await page.emulateMedia({ colorScheme: "light" });
    await page.getByLabel("Theme").selectOption("dark");
    const dark = await background();
    await page.getByLabel("Theme").selectOption("light");
    const light = await background();
    assert.notEqual(dark, light);
    // Auto follows the system's preference.
    await page.getByLabel("Theme").selectOption("auto");
    assert.equal(await background(), light);
    await page.emulateMedia({ colorScheme: "dark" });
    assert.equal(await background(), dark);
    // A chosen theme outlives a reload.
    await page.emulateMedia({ colorScheme: "light" });
    await page.getByLabel("Theme").selectOption("dark");
    await page.reload();
    await page.getByRole("row", { name: /checkout/ }).waitFor();
    assert.equal(await page.getByLabel("Theme").inputValue(), "dark");
    assert.equal(await background(), dark);
    await shot(page, "theme-dark");
    await page.getByLabel("Theme").selectOption("auto");
    await page.emulateMedia({ colorScheme: null });
  });

  test("keyboard: every section is reachable and usable without a mouse", async () => {
    await page.goto(server.url);
    await page.getByRole("row", { name: /checkout/ }).waitFor();
    // The first Tab reaches "Skip to content", which moves the focus past the header.
    await page.keyboard.press("Tab");
    const skip = page.getByRole("link", { name: "Skip to content" });
    assert.equal(await skip.evaluate((el) => el === document.activeElement), true);
    await page.keyboard.press("Enter");
    const filter = page.getByLabel("Filter services");
    await tabTo(page, filter);
    await page.keyboard.type("checkout");
    await page.getByRole("row", { name: /payments/ }).waitFor({ state: "hidden" });
    await tabTo(page, page.getByRole("link", { name: "checkout", exact: true }));
    await page.keyboard.press("Enter");
    await page.getByRole("heading", { name: "checkout" }).waitFor();
    const five = page.getByRole("button", { name: "5 min", exact: true });
    await tabTo(page, five);
    await page.keyboard.press("Enter");
    assert.equal(await five.getAttribute("aria-pressed"), "true");
    const pause = page.getByRole("button", { name: "Pause" });
    await tabTo(page, pause);
    await page.keyboard.press("Space");
    await page.getByRole("button", { name: "Resume" }).waitFor();
    await page.keyboard.press("Space");
    await page.getByRole("button", { name: "Pause" }).waitFor();
    // Chat: the room by keyboard, a line sent with Enter.
    await tabTo(page, page.getByRole("link", { name: "Chat" }), 40, "Shift+Tab");
    await page.keyboard.press("Enter");
    const message = page.getByLabel("Message");
    await page.waitForFunction(() => document.activeElement?.id === "message");
    await tabTo(page, page.getByLabel("Room"), 20, "Shift+Tab");
    await page.keyboard.press("Control+a");
    await page.keyboard.type("keys");
    await page.keyboard.press("Enter");
    await page.getByText("In room keys").waitFor();
    await tabTo(page, message, 20);
    await page.keyboard.type("typed without a mouse");
    await page.keyboard.press("Enter");
    await page.getByRole("log").getByText("typed without a mouse").waitFor();
    await page.getByText("(sending…)").waitFor({ state: "detached" });
    // The theme too.
    const theme = page.getByLabel("Theme");
    await tabTo(page, theme, 40, "Shift+Tab");
    await page.keyboard.press("ArrowDown");
    assert.equal(await theme.inputValue(), "light");
    await shot(page, "keyboard");
    await theme.selectOption("auto");
  });
});
