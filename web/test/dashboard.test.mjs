// The dashboard used as a person would, in headless Chromium, against the
// real streamhub binary: services, charts, alerts, chat, files, server
// info. Every wait is for something the page shows.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { chatMember, clients, launch, liveFeed, removeDir, shot, startServer, tempDir, upload, waitForHistory, TIMEOUT } from "./helpers.mjs";

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
    // The server's own host sampler appears too.
    await page.getByRole("row", { name: /^streamhub\b/ }).waitFor();

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
    bot.end();
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
    await shot(page, "files");
  });

  test("the server view shows version, connections and open streams", async () => {
    await page.getByRole("link", { name: "Server" }).click();
    await page.getByRole("heading", { name: "Server" }).waitFor();
    await page.getByText(/^\d+\.\d+\.\d+/).first().waitFor();
    // The page's own Watch stream is open.
    await page.getByRole("row", { name: /telemetry\.TelemetryService\/Watch/ }).waitFor();
    await shot(page, "server");
  });

  test("phone width: the overview is usable in one column", async () => {
    await page.setViewportSize({ width: 390, height: 800 });
    await page.getByRole("link", { name: "Overview" }).click();
    await page.getByRole("row", { name: /checkout/ }).waitFor();
    await page.getByLabel("Theme").selectOption("dark");
    await shot(page, "phone-dark");
    await page.getByLabel("Theme").selectOption("auto");
    await page.setViewportSize({ width: 1100, height: 800 });
  });
});
