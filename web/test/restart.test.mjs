// The server stopped and started again on the same port and data dir: the
// page goes to "reconnecting", back to "live", and what was published while
// it was away is back-filled.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { clients, launch, liveFeed, removeDir, shot, startServer, tempDir, waitForHistory, TIMEOUT } from "./helpers.mjs";

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

  feed.end();
  grpc.close();
  await server.stop();
  await indicator.getByText("reconnecting").waitFor();
  await shot(page, "restart-reconnecting");

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
  feed.end();
  grpc.close();
});
