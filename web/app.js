// The kvpack page: loads a GGUF model (URL or file) into the wasm engine, generates with a chosen
// KV-cache format, and shows the memory the compressed cache takes against an f16 cache.
// The page's state is in document.body.dataset.state (loading, ready, generating, done, error,
// no-webgpu) and the last generation's JSON report in #report, for people and for tests.

const $ = (id) => document.getElementById(id);
const status = $("status");
let engine = null;
let wasm = null;
let cache = null; // the loaded .kvpack file's summary (JSON from engine.load_cache), or null

function setState(state, message, isError = false) {
  document.body.dataset.state = state;
  if (message !== undefined) {
    status.textContent = message;
    status.className = isError ? "error" : "";
  }
}

const mb = (b) => (b / 1e6).toFixed(b < 1e6 ? 3 : 1) + " MB";

function showMemory(kvBytes, f16Bytes, label, f16Label = "f16 KV cache") {
  const max = Math.max(f16Bytes, kvBytes, 1);
  $("bar-f16").style.width = (100 * f16Bytes / max).toFixed(1) + "%";
  $("bar-kv").style.width = (100 * kvBytes / max).toFixed(1) + "%";
  $("bar-f16-label").textContent = `${f16Label}: ${mb(f16Bytes)}`;
  $("bar-kv-label").textContent = `${label}: ${mb(kvBytes)} (${(f16Bytes / Math.max(kvBytes, 1)).toFixed(2)}x smaller)`;
  $("kvbytes").textContent = `${kvBytes.toLocaleString()} bytes vs ${f16Bytes.toLocaleString()} in f16`;
}

async function start() {
  if (!("gpu" in navigator)) {
    setState("no-webgpu", "This browser has no WebGPU. Use a recent Chrome, Edge or Safari (or Firefox with WebGPU enabled); on Linux Chrome needs --enable-unsafe-webgpu.", true);
    return;
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    setState("no-webgpu", "WebGPU is present but no GPU adapter was given to this page (blocklisted driver, or disabled in the browser settings).", true);
    return;
  }
  // kvpack needs WebGPU's default limits; tensors larger than a binding are split.
  const need = { maxStorageBuffersPerShaderStage: 8, maxComputeInvocationsPerWorkgroup: 256, maxComputeWorkgroupStorageSize: 16384, maxStorageBufferBindingSize: 128 << 20 };
  const short = Object.entries(need).filter(([k, v]) => adapter.limits[k] < v);
  if (short.length) {
    setState("error", "This GPU's WebGPU limits are too small for kvpack: " + short.map(([k, v]) => `${k} ${adapter.limits[k]} < ${v}`).join(", "), true);
    return;
  }
  try {
    wasm = await import("./pkg/kvpack_web.js");
    await wasm.default();
  } catch (e) {
    setState("error", "The wasm package is missing or broken (build it with scripts/web.sh): " + e, true);
    return;
  }
  setState("idle", "Pick a model: the default URL serves SmolLM2-135M (Q4_1, 98 MB).");
  const auto = new URLSearchParams(location.search).get("autoload");
  if (auto !== null) loadFromUrl();
}

async function fetchWithProgress(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status} ${resp.statusText}`);
  const total = Number(resp.headers.get("content-length")) || 0;
  const reader = resp.body.getReader();
  const parts = [];
  let got = 0;
  const bar = $("load-progress");
  bar.hidden = false;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    got += value.length;
    if (total) bar.value = got / total;
    $("load-detail").textContent = `downloading ${mb(got)}${total ? " of " + mb(total) : ""}`;
  }
  const bytes = new Uint8Array(got);
  let at = 0;
  for (const p of parts) { bytes.set(p, at); at += p.length; }
  return bytes;
}

function checkGguf(bytes, name) {
  const magic = String.fromCharCode(...bytes.subarray(0, 4));
  if (magic !== "GGUF") throw new Error(`${name} is not a GGUF file (it starts with ${JSON.stringify(magic)}, not "GGUF")`);
}

async function loadBytes(bytes, name) {
  checkGguf(bytes, name);
  setState("loading", `Uploading ${name} to the GPU…`);
  if (engine) { engine.free(); engine = null; }
  forgetCache();
  const bar = $("load-progress");
  // Let the page paint before the upload.
  await new Promise((r) => setTimeout(r, 0));
  engine = await wasm.Engine.load(bytes, name, (done, total) => {
    bar.value = done / total;
    $("load-detail").textContent = `uploading layer ${done} of ${total}`;
  }, false);
  const info = JSON.parse(engine.info());
  bar.hidden = true;
  $("load-detail").textContent = `${info.model}: ${info.n_layer} layers, ${info.n_head_kv} KV heads × ${info.head_dim}`;
  $("weights").textContent = `${mb(info.weights_gpu_bytes)} kept in their GGUF blocks (the file is ${mb(info.file_bytes)})`;
  $("adapter").textContent = `${info.adapter || "WebGPU adapter"} (${info.backend}, ${info.device_type})`;
  $("generate").disabled = false;
  $("cache-file").disabled = false;
  setState("ready", `Loaded ${name}. Write a prompt and press Generate.`);
  updateEstimate();
}

async function loadFromUrl() {
  const url = $("model-url").value.trim();
  if (!url) return setState("error", "Give a model URL or pick a file.", true);
  try {
    setState("loading", `Downloading ${url}…`);
    const bytes = await fetchWithProgress(url);
    await loadBytes(bytes, url.split("/").pop() || url);
  } catch (e) {
    setState("error", "Could not load the model: " + (e.message || e), true);
  }
}

async function loadFromFile(file) {
  try {
    setState("loading", `Reading ${file.name}…`);
    await loadBytes(new Uint8Array(await file.arrayBuffer()), file.name);
  } catch (e) {
    setState("error", "Could not load the model: " + (e.message || e), true);
  }
}

// A .kvpack file: the engine checks it (damaged, another model) and keeps it for the next
// generations, which continue after the compacted context.
async function loadCache(file) {
  try {
    cache = JSON.parse(engine.load_cache(new Uint8Array(await file.arrayBuffer()), file.name));
    $("cache-info").textContent = `${cache.name}: ${cache.context_tokens} context tokens compacted to at most ` +
      `${cache.longest_head} per KV head (${cache.method}), stored as ${cache.kv}; the prompt continues after it.`;
    $("cache-clear").disabled = false;
    // The file's own format is the one used: show it in the (disabled) selector.
    const kv = $("kv");
    kv.querySelector("option[data-cache]")?.remove();
    const o = new Option(`${cache.kv} (the .kvpack file's)`, cache.kv);
    o.dataset.cache = "1";
    kv.dataset.before ??= kv.value;
    kv.add(o, 0);
    kv.value = cache.kv;
    kv.disabled = true;
    setState("ready", `Loaded ${file.name}. The prompt continues after its context.`);
  } catch (e) {
    forgetCache();
    setState("error", "Could not load the compacted context: " + (e.message || e), true);
  }
}

function forgetCache() {
  if (engine) engine.clear_cache();
  cache = null;
  $("cache-info").textContent = "None: generation starts from an empty cache.";
  $("cache-clear").disabled = true;
  $("cache-file").value = "";
  const kv = $("kv");
  kv.querySelector("option[data-cache]")?.remove();
  if (kv.dataset.before !== undefined) { kv.value = kv.dataset.before; delete kv.dataset.before; }
  kv.disabled = false;
}

function updateEstimate() {
  if (!engine || cache) return;
  const tokens = Number($("max-tokens").value) + 16;
  try {
    const e = JSON.parse(engine.kv_estimate($("kv").value, tokens));
    showMemory(e.kv_bytes, e.kv_bytes_f16, `${e.kv} KV cache (estimate, ${e.bits_per_value.toFixed(2)} bits/value)`);
  } catch (e) {
    setState("error", String(e.message || e), true);
  }
}

async function generate() {
  const out = $("output");
  out.textContent = "";
  const p = document.createElement("span");
  p.className = "prompt";
  p.textContent = $("prompt").value;
  out.append(p);
  const kv = $("kv").value;
  const opts = { kv, max_tokens: Number($("max-tokens").value), chat: $("chat").checked, temperature: 0, sinks: 4, context: 1024, cache: cache !== null };
  const promptTokens = engine.count_tokens($("prompt").value, opts.chat);
  $("generate").disabled = true;
  $("stop").disabled = false;
  setState("generating", cache ? `Generating after ${cache.name}…` : `Generating with a ${kv} KV cache…`);
  let n = 0;
  try {
    const report = JSON.parse(await engine.generate($("prompt").value, JSON.stringify(opts), (piece) => {
      out.append(piece);
      n += 1;
      if (cache) return;
      const e = JSON.parse(engine.kv_estimate(kv, promptTokens + n));
      showMemory(e.kv_bytes, e.kv_bytes_f16, `${kv} KV cache (live estimate)`);
    }));
    $("report").textContent = JSON.stringify(report);
    if (report.kv_bytes_f16_full !== undefined) {
      showMemory(report.kv_bytes, report.kv_bytes_f16_full, `compacted ${report.kv} KV cache`,
        `f16 KV cache of all ${report.context_tokens} context tokens and the new ones`);
    } else {
      showMemory(report.kv_bytes, report.kv_bytes_f16, `${report.kv} KV cache, ${report.bits_per_value.toFixed(2)} bits/value`);
    }
    $("speed").textContent = `prefill ${report.prefill_tok_s.toFixed(2)} tok/s (${report.prompt_tokens} tokens), decode ${report.decode_tok_s.toFixed(2)} tok/s (${report.tokens.length} tokens)`;
    setState("done", report.stopped ? "Stopped." : "Done.");
  } catch (e) {
    setState("error", "Generation failed: " + (e.message || e), true);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

$("load-url").addEventListener("click", loadFromUrl);
$("model-file").addEventListener("change", (ev) => { const f = ev.target.files[0]; if (f) loadFromFile(f); });
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => engine && engine.stop());
$("kv").addEventListener("change", updateEstimate);
$("cache-file").addEventListener("change", (ev) => { const f = ev.target.files[0]; if (f) loadCache(f); });
$("cache-clear").addEventListener("click", () => { forgetCache(); updateEstimate(); setState("ready", "Forgot the compacted context."); });
$("max-tokens").addEventListener("change", updateEstimate);
start();
