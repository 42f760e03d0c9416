// Browser test: serve the page and the default model on 127.0.0.1, open it in headless Chromium
// (WebGPU on SwiftShader), generate greedy tokens with f32, turbo4 and tq3 caches through the page's
// own controls, and require them to equal the native engine's tokens (Vulkan) for the same prompt
// and format. Then load a .kvpack file that the native `kvpack compact` wrote, continue after it,
// and require the native `generate --cache` tokens and bytes; a damaged file must be refused.
// Checks the memory figures, prints tokens/s, saves a screenshot.
// Run through `scripts/web.sh test` (which builds web/pkg and target/debug/kvpack first).
import { chromium } from "playwright-core";
import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const model = path.join(root, "data", "SmolLM2-135M-Instruct.Q4_1.gguf");
const targetDir = path.resolve(root, process.env.KVPACK_TARGET_DIR ?? "target");
const kvpack = path.join(targetDir, process.env.KVPACK_PROFILE ?? "debug", "kvpack");
const outDir = path.join(root, "target", "web-test");
const PROMPT = "The capital of France is";
const MAX_TOKENS = 8;
const FORMATS = ["f32", "turbo4", "tq3"];
const SINKS = 4, CONTEXT = 1024;

let failures = 0;
function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures += 1;
}

function native(kv) {
  const out = execFileSync(kvpack, ["generate", "--backend", "vulkan", "--model", model, "--prompt", PROMPT,
    "--kv", kv, "--max-tokens", String(MAX_TOKENS), "--sinks", String(SINKS), "--context", String(CONTEXT), "--json"],
    { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? "/tmp" } });
  return JSON.parse(out);
}

// A short document compacted natively (the recommended preset: ragged heads, fitted β), and the
// native continuation after it.
const JURY = "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary " +
  "election produced no evidence that any irregularities took place. The jury further said in " +
  "term-end presentments that the City Executive Committee, which had over-all charge of the " +
  "election, deserves the praise and thanks of the City of Atlanta for the manner in which the " +
  "election was conducted.";
const CACHE_PROMPT = " The jury";
function nativeCompacted(dir) {
  const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? "/tmp" };
  const text = path.join(dir, "jury.txt"), file = path.join(dir, "jury.kvpack");
  fs.writeFileSync(text, JURY + "\n\n" + JURY + "\n");
  execFileSync(kvpack, ["compact", "--backend", "vulkan", "--model", model, "--text", text, "--context", "64",
    "--ratio", "4", "--preset", "recommended", "--kv", "turbo4", "--out", file], { stdio: ["ignore", "inherit", "inherit"], env });
  const out = execFileSync(kvpack, ["generate", "--backend", "vulkan", "--model", model, "--cache", file,
    "--prompt", CACHE_PROMPT, "--max-tokens", String(MAX_TOKENS), "--sinks", String(SINKS), "--context", String(CONTEXT), "--json"],
    { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], env });
  return { file, ref: JSON.parse(out) };
}

async function serve() {
  const child = spawn(process.execPath, [path.join(root, "web", "serve.mjs"), "--port", "0", "--model", model], { stdio: ["ignore", "pipe", "inherit"] });
  const url = await new Promise((resolve, reject) => {
    child.stdout.once("data", (d) => { const m = /serving (\S+)/.exec(String(d)); m ? resolve(m[1]) : reject(new Error("server: " + d)); });
    child.once("exit", (c) => reject(new Error(`server exited with ${c}`)));
  });
  return { child, url };
}

const refs = {};
for (const kv of FORMATS) {
  refs[kv] = native(kv);
  console.log(`native ${kv}: ${JSON.stringify(refs[kv].tokens)} ${JSON.stringify(refs[kv].text)} (${refs[kv].backend})`);
}

fs.mkdirSync(outDir, { recursive: true });
const compacted = nativeCompacted(outDir);
console.log(`native after ${path.basename(compacted.file)}: ${JSON.stringify(compacted.ref.tokens)} ${JSON.stringify(compacted.ref.text)}`);
const damaged = path.join(outDir, "damaged.kvpack");
const bytes = fs.readFileSync(compacted.file);
bytes[bytes.length >> 1] ^= 1;
fs.writeFileSync(damaged, bytes);
const { child: server, url } = await serve();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--no-first-run", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 1000 } });
  page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") console.log(`[page ${m.type()}] ${m.text()}`); });
  page.on("pageerror", (e) => console.log(`[page error] ${e}`));
  await page.goto(url + "?autoload");
  await page.waitForFunction(() => ["ready", "error", "no-webgpu"].includes(document.body.dataset.state), null, { timeout: 600_000 });
  const state = await page.evaluate(() => document.body.dataset.state);
  if (state !== "ready") throw new Error(`the page did not load the model: ${state}: ${await page.textContent("#status")}`);
  console.log(`page ready (${await page.textContent("#adapter")})`);

  for (const kv of FORMATS) {
    await page.selectOption("#kv", kv);
    await page.fill("#prompt", PROMPT);
    await page.fill("#max-tokens", String(MAX_TOKENS));
    await page.click("#generate");
    await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 900_000 });
    if (await page.evaluate(() => document.body.dataset.state) !== "done") {
      throw new Error(`generation with ${kv} failed: ${await page.textContent("#status")}`);
    }
    const r = JSON.parse(await page.textContent("#report"));
    const ref = refs[kv];
    console.log(`browser ${kv}: ${JSON.stringify(r.tokens)} ${JSON.stringify(r.text)} on ${r.adapter} (${r.backend}); ` +
      `prefill ${r.prefill_tok_s.toFixed(2)} tok/s, decode ${r.decode_tok_s.toFixed(2)} tok/s`);
    check(JSON.stringify(r.tokens) === JSON.stringify(ref.tokens), `${kv}: greedy tokens equal the native engine's (${r.tokens.length} tokens)`);
    check(r.kv_bytes === ref.kv_bytes && r.kv_bytes_f16 === ref.kv_bytes_f16, `${kv}: KV bytes ${r.kv_bytes} (f16 ${r.kv_bytes_f16}) equal native ${ref.kv_bytes} (f16 ${ref.kv_bytes_f16})`);
    check(r.weights_gpu_bytes === ref.weights_gpu_bytes, `${kv}: weights on GPU ${r.weights_gpu_bytes} bytes equal native`);
    const bar = await page.evaluate(() => parseFloat(document.querySelector("#bar-kv").style.width));
    const expect = 100 * Math.min(1, r.kv_bytes / Math.max(r.kv_bytes, r.kv_bytes_f16));
    check(Math.abs(bar - expect) < 0.2, `${kv}: memory bar at ${bar}% of the larger of (f16, actual) (expected ${expect.toFixed(1)}%)`);
    fs.writeFileSync(path.join(outDir, `browser-${kv}.json`), JSON.stringify(r, null, 2));
  }
  // A damaged .kvpack is refused with the reason; the page stays usable.
  await page.setInputFiles("#cache-file", damaged);
  await page.waitForFunction(() => document.body.dataset.state === "error", null, { timeout: 60_000 });
  const why = await page.textContent("#status");
  check(why.includes("checksum"), `a damaged .kvpack file is refused: ${why}`);
  // The natively compacted document: the page continues after it exactly as the native engine.
  await page.setInputFiles("#cache-file", compacted.file);
  await page.waitForFunction(() => document.body.dataset.state === "ready", null, { timeout: 60_000 });
  console.log(`page: ${await page.textContent("#cache-info")}`);
  const selector = await page.evaluate(() => ({ value: document.querySelector("#kv").value, disabled: document.querySelector("#kv").disabled }));
  check(selector.value === "turbo4+s4" && selector.disabled, `.kvpack: the KV selector shows the file's format, fixed (${JSON.stringify(selector)})`);
  await page.fill("#prompt", CACHE_PROMPT);
  await page.fill("#max-tokens", String(MAX_TOKENS));
  await page.click("#generate");
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 900_000 });
  if (await page.evaluate(() => document.body.dataset.state) !== "done") {
    throw new Error(`generation after the .kvpack file failed: ${await page.textContent("#status")}`);
  }
  const r = JSON.parse(await page.textContent("#report"));
  const ref = compacted.ref;
  console.log(`browser after ${path.basename(compacted.file)}: ${JSON.stringify(r.tokens)} ${JSON.stringify(r.text)}`);
  check(JSON.stringify(r.tokens) === JSON.stringify(ref.tokens), `.kvpack: greedy tokens equal native generate --cache (${r.tokens.length} tokens)`);
  check(r.kv === ref.kv && r.kv_bytes === ref.kv_bytes, `.kvpack: ${r.kv} cache of ${r.kv_bytes} bytes equals native ${ref.kv} ${ref.kv_bytes}`);
  check(r.context_tokens === ref.context_tokens && r.kv_bytes_f16_full === ref.kv_bytes_f16_full,
    `.kvpack: ${r.context_tokens} context tokens, f16 cache of them all ${r.kv_bytes_f16_full} bytes, as native`);
  fs.writeFileSync(path.join(outDir, "browser-kvpack.json"), JSON.stringify(r, null, 2));
  await page.screenshot({ path: path.join(outDir, "page.png"), fullPage: true });
  console.log(`screenshot: ${path.relative(root, path.join(outDir, "page.png"))}`);
} finally {
  await browser.close();
  server.kill();
}
if (failures) {
  console.log(`${failures} browser check(s) failed`);
  process.exit(1);
}
console.log("browser test passed");
