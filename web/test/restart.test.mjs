// The server stopped and started again on the same port and data dir: the
// page goes to "reconnecting", back to "live", and what was published while
// it was away is back-filled.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { chatMember, clients, launch, liveFeed, removeDir, shot, startServer, tempDir, waitForHistory, TIMEOUT } from "./helpers.mjs";

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

test("the page reconnects after a server restart and back-fills the gap", async () => {
  const dir = tempDir();
  cleanup.push(async () => removeDir(dir));
  let server = await startServer({ dataDir: dir });
  cleanup.push(() => server.stop());
  const browser = await launch();
  cleanup.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  page.setDefaultTimeout(TIMEOUT);

  let grpc = clients(server.addr);
  let feed = liveFeed(grpc);
  feed.send({ serviceName: "restart-svc", cpuUsage: 11.1, memoryMb: 100, timestampMs: Date.now() - 1000 });
  feed.send({ serviceName: "restart-svc", cpuUsage: 22.2, memoryMb: 100 });
  await waitForHistory(grpc, "restart-svc", 2);
  await page.goto(`${server.url}#/service/restart-svc`);
  const indicator = page.getByRole("status", { name: "Connection" });
  await page.getByText(/, 2 samples kept/).waitFor();
  assert.equal(await indicator.textContent(), "live");

  // A second tab in a chat room, to see it resume after the last seq.
  const chatPage = await browser.newPage({ viewport: { width: 900, height: 700 } });
  chatPage.setDefaultTimeout(TIMEOUT);
  await chatPage.goto(`${server.url}#/chat`);
  await chatPage.getByLabel("Room").fill("resume");
  await chatPage.getByLabel("Room").press("Enter");
  await chatPage.getByText("In room resume").waitFor();
  let bot = chatMember(grpc, "resume", "bot");
  bot.send("before the restart", "bot-1");
  const log = chatPage.getByRole("log");
  await log.getByText("before the restart").waitFor();

  // A third tab on the alert feed.
  const alertPage = await browser.newPage({ viewport: { width: 900, height: 700 } });
  alertPage.setDefaultTimeout(TIMEOUT);
  await alertPage.goto(`${server.url}#/alerts`);
  const raised = alertPage.getByRole("listitem").filter({ hasText: "CPU_HIGH" }).filter({ hasText: "restart-alert" });
  feed.send({ serviceName: "restart-alert", cpuUsage: 95, memoryMb: 10, timestampMs: Date.now() - 2000 });
  await raised.first().waitFor();

  feed.end();
  bot.end();
  grpc.close();
  await server.stop();
  await indicator.getByText("reconnecting").waitFor();
  await shot(page, "restart-reconnecting");
  // Typed while the server is away: sent once it is back, under the same key.
  await chatPage.getByText(/reconnecting/).first().waitFor();
  await chatPage.getByLabel("Message").fill("typed while away");
  await chatPage.getByLabel("Message").press("Enter");

  server = await startServer({ dataDir: dir, listen: server.addr });
  grpc = clients(server.addr);
  feed = liveFeed(grpc);
  // Published while the page may still be waiting to reconnect: the Watch
  // backfill (or GetHistory) brings them in either way.
  feed.send({ serviceName: "restart-svc", cpuUsage: 33.3, memoryMb: 100, timestampMs: Date.now() - 500 });
  feed.send({ serviceName: "restart-svc", cpuUsage: 44.4, memoryMb: 100 });
  await indicator.getByText("live", { exact: true }).waitFor();
  await page.getByText(/CPU 44\.4%/).waitFor();
  // Before the restart and after it, each sample once.
  await page.getByText(/, 4 samples kept/).waitFor();
  await shot(page, "restart-live");

  // An alert raised by the restarted server reaches the feed; the one from
  // before the restart stays; neither shows twice.
  feed.send({ serviceName: "restart-alert", cpuUsage: 96, memoryMb: 10 });
  await raised.nth(1).waitFor();
  await alertPage.getByRole("status", { name: "Connection" }).getByText("live", { exact: true }).waitFor();
  assert.equal(await raised.count(), 2);
  await shot(alertPage, "restart-alerts");

  // The chat tab resumed after the last seq it saw: the line typed while
  // away is stored, a new line arrives, and nothing shows twice.
  bot = chatMember(grpc, "resume", "bot");
  bot.send("after the restart", "bot-2");
  await log.getByText("after the restart").waitFor();
  await log.getByText("typed while away").waitFor();
  await chatPage.getByText("(sending…)").waitFor({ state: "detached" });
  assert.equal(await log.getByText("before the restart").count(), 1);
  assert.equal(await log.getByText("typed while away").count(), 1);
  assert.equal(await log.getByText("after the restart").count(), 1);
  await shot(chatPage, "restart-chat");
  bot.end();
  feed.end();
  grpc.close();
});
