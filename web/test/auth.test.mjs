// With authentication on: the page asks for a token, keeps it for the
// session, names the identity, and says which sections the identity may
// not read. Skipped when the binary has no authentication (`token` subcommand).
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { bin, clients, launch, liveFeed, removeDir, shot, startServer, tempDir, TIMEOUT, upload } from "./helpers.mjs";

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

  // Each section the token lacks a scope for says so, instead of an empty list.
  await page.getByRole("link", { name: "Files" }).click();
  await page.getByText(/^This token cannot read files:/).waitFor();
  await page.getByRole("link", { name: "Server" }).click();
  await page.getByText(/^This token cannot read the server's information:/).waitFor();
  await shot(page, "auth-denied");

  // Signing out takes away what the identity was shown.
  await page.getByRole("link", { name: "Overview" }).click();
  await page.getByRole("row", { name: /guarded/ }).waitFor();
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("status", { name: "Connection" }).getByText("needs token").waitFor();
  await page.getByRole("row", { name: /guarded/ }).waitFor({ state: "detached" });
  await page.getByLabel("Token").waitFor();
});

test("while the page waits for a token it says so, and no view claims to be empty", { skip: !hasAuth && "this binary has no authentication" }, async () => {
  const dir = tempDir();
  cleanup.push(async () => removeDir(dir));
  const chatter = "shub_chatter-token-for-the-browser-test";
  const narrow = "shub_narrow-token-for-the-browser-test";
  const publisher = "shub_publisher-token-for-the-waiting-test";
  const config = join(dir, "streamhub.toml");
  writeFileSync(
    config,
    `[[auth.tokens]]
identity = "chatter"
sha256 = "${sha(chatter)}"
scopes = ["chat:join:*"]

[[auth.tokens]]
identity = "narrow"
sha256 = "${sha(narrow)}"
scopes = ["telemetry:read:nothing-yet-*", "upload:read:nothing-yet-*"]

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
  feed.send({ serviceName: "hidden-from-narrow", cpuUsage: 12.5, memoryMb: 64 });

  const browser = await launch();
  cleanup.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(server.url);
  const indicator = page.getByRole("status", { name: "Connection" });
  await page.getByLabel("Token").waitFor();
  // Not "live": the Watch stream was refused for want of a token.
  await indicator.getByText("needs token").waitFor();
  await page.getByText("Sign in to see the services.").waitFor();
  assert.equal(await page.getByText("No service has reported yet.").count(), 0);
  await page.getByRole("link", { name: "Alerts" }).click();
  await page.getByText("Sign in to see the alerts.").waitFor();
  assert.equal(await page.getByText("No alerts yet.").count(), 0);
  assert.equal(await indicator.textContent(), "needs token");
  await shot(page, "auth-waiting");

  // A token that may not read telemetry: the stream is live, and the views
  // say what the token cannot read instead of an empty list.
  await page.getByLabel("Token").fill(chatter);
  await page.getByLabel("Token").press("Enter");
  await page.getByText("Signed in as chatter").waitFor();
  await indicator.getByText("live", { exact: true }).waitFor();
  await page.getByRole("alert").getByText(/^This token cannot read telemetry/).waitFor();
  assert.equal(await page.getByText("No alerts yet.").count(), 0);
  await page.getByRole("link", { name: "Overview" }).click();
  await page.getByRole("alert").getByText(/^This token cannot read telemetry/).waitFor();
  assert.equal(await page.getByText("No service has reported yet.").count(), 0);
  await page.getByRole("link", { name: "Files" }).click();
  await page.getByText(/^This token cannot read files:/).waitFor();
  await page.getByText(/^This token cannot see uploads in progress:/).waitFor();
  await shot(page, "auth-no-telemetry");

  // A token that may read only some names: the empty list says whose.
  await page.getByRole("button", { name: "Sign out" }).click();
  await indicator.getByText("needs token").waitFor();
  await page.getByLabel("Token").fill(narrow);
  await page.getByLabel("Token").press("Enter");
  await page.getByText("Signed in as narrow").waitFor();
  await page.getByText("No file this token can read is stored.").waitFor();
  await page.getByRole("link", { name: "Overview" }).click();
  await page.getByText("No service this token can read has reported yet.").waitFor();
  assert.equal(await page.getByRole("row", { name: /hidden-from-narrow/ }).count(), 0);
  await shot(page, "auth-narrow");
  // A service view the token cannot read says so, not "no samples".
  await page.goto(`${server.url}#/service/hidden-from-narrow`);
  await page.getByText(/^History: This token cannot read hidden-from-narrow:/).waitFor();
  assert.equal(await page.getByText(/No samples of/).count(), 0);
});

test("with a token, a file downloaded through the page matches the stored bytes", { skip: !hasAuth && "this binary has no authentication" }, async () => {
  const dir = tempDir();
  cleanup.push(async () => removeDir(dir));
  const reader = "shub_reader-token-for-the-download-test";
  const writer = "shub_writer-token-for-the-download-test";
  const config = join(dir, "streamhub.toml");
  writeFileSync(
    config,
    `[[auth.tokens]]
identity = "reader"
sha256 = "${sha(reader)}"
scopes = ["upload:read:shared-*"]

[[auth.tokens]]
identity = "writer"
sha256 = "${sha(writer)}"
scopes = ["upload:write:*"]
`,
  );
  const server = await startServer({ dataDir: join(dir, "data"), args: ["--config", config] });
  cleanup.push(() => server.stop());
  const grpc = clients(server.addr);
  cleanup.push(async () => grpc.close());
  const data = randomBytes(100_000);
  await upload(grpc, "shared-report.bin", data, writer);
  await upload(grpc, "private.bin", randomBytes(10), writer);
  // The route itself refuses a request without the token.
  assert.equal((await fetch(new URL("files/shared-report.bin", server.url))).status, 401);

  const browser = await launch();
  cleanup.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 }, acceptDownloads: true });
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(server.url);
  const token = page.getByLabel("Token");
  await token.waitFor();
  await token.fill(reader);
  await token.press("Enter");
  await page.getByText("Signed in as reader").waitFor();
  await page.getByRole("link", { name: "Files" }).click();
  const link = page.getByRole("link", { name: "shared-report.bin" });
  await link.waitFor();
  // Only the files the identity may read are listed.
  assert.equal(await page.getByRole("link", { name: "private.bin" }).count(), 0);
  const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
  const got = await readFile(await download.path());
  assert.ok(got.equals(data), "downloaded bytes equal the uploaded ones");
  await shot(page, "auth-download");
});
