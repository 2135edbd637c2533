// Builds the dashboard into dist/ (index.html, app.js, app.css), or with
// --check rebuilds everything into a temporary directory (the generated
// proto code included) and fails if the committed files differ.
// The output is deterministic: no timestamps, fixed names, content hashes
// only in index.html's query strings (cache busting).
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const here = dirname(fileURLToPath(import.meta.url));
const check = process.argv.includes("--check");
// buf, protoc-gen-es and tsc come from node_modules, also when run without npm.
const bin = join(here, "node_modules/.bin");
const env = { ...process.env, PATH: `${bin}:${process.env.PATH}` };

async function bundle(outdir) {
  mkdirSync(outdir, { recursive: true });
  const result = await build({
    absWorkingDir: here,
    entryPoints: { app: "src/main.ts" },
    bundle: true,
    minify: true,
    format: "iife",
    target: ["es2020", "chrome100", "firefox100", "safari15"],
    outdir,
    write: false,
    legalComments: "eof",
    sourcemap: false,
    charset: "utf8",
    logLevel: "warning",
  });
  const files = {};
  for (const f of result.outputFiles) files[f.path.slice(outdir.length + 1)] = f.contents;
  const hash = (b) => createHash("sha256").update(b).digest("hex").slice(0, 12);
  files["index.html"] = Buffer.from(
    readFileSync(join(here, "index.html"), "utf8")
      .replace("%CSS_HASH%", hash(files["app.css"]))
      .replace("%JS_HASH%", hash(files["app.js"])),
  );
  for (const [name, contents] of Object.entries(files)) writeFileSync(join(outdir, name), contents);
  return files;
}

function report(files) {
  let total = 0;
  for (const [name, contents] of Object.entries(files).sort()) {
    const gz = gzipSync(contents, { level: 9 }).length;
    total += gz;
    console.log(`  ${name.padEnd(12)} ${String(contents.length).padStart(8)} B  ${String(gz).padStart(7)} B gzipped`);
  }
  console.log(`  total ${(total / 1024).toFixed(1)} KiB gzipped`);
}

/** Files under `dir`, relative, sorted. */
function list(dir, prefix = "") {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true })
    .flatMap((e) => (e.isDirectory() ? list(join(dir, e.name), `${prefix}${e.name}/`) : [`${prefix}${e.name}`]))
    .sort();
}

function differences(want, got) {
  const a = list(want);
  const b = list(got);
  const out = [];
  for (const f of new Set([...a, ...b])) {
    if (!a.includes(f)) out.push(`${f}: not committed`);
    else if (!b.includes(f)) out.push(`${f}: committed but no longer built`);
    else if (!readFileSync(join(want, f)).equals(readFileSync(join(got, f)))) out.push(`${f}: differs`);
  }
  return out;
}

if (check) {
  const tmp = mkdtempSync(join(tmpdir(), "streamhub-web-"));
  try {
    // 1. The generated client code matches proto/.
    execFileSync(join(bin, "buf"), ["generate", "--output", tmp], { cwd: here, stdio: "inherit", env });
    const gen = differences(join(tmp, "src/gen"), join(here, "src/gen"));
    // 2. The sources type-check.
    execFileSync(join(bin, "tsc"), ["--noEmit", "-p", "."], { cwd: here, stdio: "inherit", env });
    // 3. The committed bundle is what the sources build.
    const files = await bundle(join(tmp, "dist"));
    const dist = differences(join(tmp, "dist"), join(here, "dist"));
    report(files);
    const stale = [...gen.map((d) => `src/gen/${d}`), ...dist.map((d) => `dist/${d}`)];
    if (stale.length) {
      console.error(`web: the committed build is stale (run \`npm run gen && npm run build\` in web/ and commit):\n  ${stale.join("\n  ")}`);
      process.exit(1);
    }
    console.log("web: committed src/gen and dist are up to date");
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
} else {
  const out = join(here, "dist");
  rmSync(out, { recursive: true, force: true });
  report(await bundle(out));
}
