// Measures (does not assert) the dashboard's CPU in Chromium with 200
// services updating at 1 Hz: the browser's own TaskDuration (CDP
// Performance.getMetrics) over a window, as a share of one core.
//   node web/test/perf.mjs                 (starts target/debug/streamhub)
//   PERF_SECONDS=60 PERF_SERVICES=200 node web/test/perf.mjs
//   PERF_URL=http://127.0.0.1:8091/ node web/test/perf.mjs   (a running server that has its own data)
// Under `node --test web/test/` this file does nothing.
import { clients, launch, liveFeed, removeDir, startServer, tempDir } from "./helpers.mjs";

if (process.env.NODE_TEST_CONTEXT) process.exit(0);

const seconds = Number(process.env.PERF_SECONDS ?? 30);
const count = Number(process.env.PERF_SERVICES ?? 200);
let server = null;
let dir = null;
let grpc = null;
let timer = null;
let url = process.env.PERF_URL;

if (!url) {
  dir = tempDir();
  server = await startServer({ dataDir: dir });
  url = server.url;
  grpc = clients(server.addr);
  const feed = liveFeed(grpc);
  let n = 0;
  const publish = () => {
    n++;
    for (let i = 0; i < count; i++) {
      feed.send({
        serviceName: `svc-${String(i).padStart(3, "0")}`,
        cpuUsage: 20 + 30 * Math.abs(Math.sin(n / 10 + i)),
        memoryMb: 500 + i,
        requestCount: n * (i + 1),
      });
    }
  };
  publish();
  timer = setInterval(publish, 1000);
}

const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const cdp = await page.context().newCDPSession(page);
await cdp.send("Performance.enable", { timeDomain: "timeTicks" });

async function measure(label) {
  const read = async () => {
    const { metrics } = await cdp.send("Performance.getMetrics");
    return Object.fromEntries(metrics.map((m) => [m.name, m.value]));
  };
  const a = await read();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const b = await read();
  const task = b.TaskDuration - a.TaskDuration;
  const script = b.ScriptDuration - a.ScriptDuration;
  const layout = b.LayoutDuration - a.LayoutDuration + (b.RecalcStyleDuration - a.RecalcStyleDuration);
  const wall = b.Timestamp - a.Timestamp;
  console.log(
    `${label}: ${((100 * task) / wall).toFixed(1)}% of one core ` +
      `(TaskDuration ${task.toFixed(2)} s over ${wall.toFixed(1)} s; script ${script.toFixed(2)} s, style+layout ${layout.toFixed(2)} s)`,
  );
}

await page.goto(url);
await page.getByText("live", { exact: true }).waitFor({ timeout: 30_000 });
await page.waitForFunction((n) => document.querySelectorAll("tbody tr").length >= n, Math.min(count, 200), { timeout: 30_000 });
console.log(`page: ${url}, ${count} services at 1 Hz, ${seconds} s per view`);
await measure("overview");
const first = page.locator("tbody tr a").first();
await first.click();
await page.getByText(/samples shown/).waitFor();
await measure("service view");

await browser.close();
clearInterval(timer);
grpc?.close();
await server?.stop();
if (dir) removeDir(dir);
