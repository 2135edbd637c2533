// With authentication on: the page asks for a token, keeps it for the
// session, names the identity, and says which sections the identity may
// not read. Skipped when the binary has no authentication (`token` subcommand).
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { bin, clients, launch, liveFeed, removeDir, shot, startServer, tempDir, TIMEOUT } from "./helpers.mjs";

const hasAuth = spawnSync(bin, ["token", "new", "--help"], { stdio: "ignore" }).status === 0;
const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

const sha = (t) => createHash("sha256").update(t).digest("hex");

test("the page asks for a token and shows only what the identity may read", { skip: !hasAuth && "this binary has no authentication" }, async () => {
  const dir = tempDir();
  cleanup.push(async () => removeDir(dir));
  const viewer = "shub_viewer-token-for-the-browser-test";
  const publisher = "shub_publisher-token-for-the-browser-test";
  const config = join(dir, "streamhub.toml");
  writeFileSync(
    config,
    `[[auth.tokens]]
identity = "viewer"
sha256 = "${sha(viewer)}"
scopes = ["telemetry:read:*", "chat:join:*"]

[[auth.tokens]]
identity = "publisher"
sha256 = "${sha(publisher)}"
scopes = ["telemetry:publish:*"]
`,
  );
  const server = await startServer({ dataDir: join(dir, "data"), args: ["--config", config] });
  cleanup.push(() => server.stop());
  const grpc = clients(server.addr);
  cleanup.push(async () => grpc.close());
  const feed = liveFeed(grpc, publisher);
  cleanup.push(async () => feed.end());
  feed.send({ serviceName: "guarded", cpuUsage: 31.4, memoryMb: 512 });

  const browser = await launch();
  cleanup.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(server.url);
  const token = page.getByLabel("Token");
  await token.waitFor();
  await shot(page, "auth-token");
  await token.fill("not-a-valid-token");
  await token.press("Enter");
  await page.getByText("The server refused the token").waitFor();
  await token.fill(viewer);
  await token.press("Enter");
  await page.getByText("Signed in as viewer").waitFor();
  await page.getByRole("row", { name: /guarded/ }).getByText("31.4%").waitFor();
  // Kept for the browser session: a reload needs no token.
  await page.reload();
  await page.getByText("Signed in as viewer").waitFor();
  assert.equal(await page.getByLabel("Token").isVisible(), false);

  await page.getByRole("link", { name: "Files" }).click();
  await page.getByText(/may not read/).first().waitFor();
  await page.getByRole("link", { name: "Server" }).click();
  await page.getByText(/may not read/).first().waitFor();
  await shot(page, "auth-denied");
});
