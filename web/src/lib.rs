//! kvpack in the browser: the same engine (GGUF reader, tokenizer, weights in their GGUF blocks,
//! compressed KV cache, WGSL kernels) on WebGPU through WASM. This crate only adapts the engine's
//! async API to JavaScript; nothing here reimplements a kernel or a format.
//!
//! ```js
//! import init, { Engine } from "./pkg/kvpack_web.js";
//! await init();
//! const bytes = new Uint8Array(await (await fetch("model.gguf")).arrayBuffer());
//! const engine = await Engine.load(bytes, "model.gguf", (done, total) => {});
//! const report = JSON.parse(await engine.generate("The capital of France is",
//!     JSON.stringify({ kv: "turbo4", max_tokens: 16 }), (piece) => console.log(piece)));
//! // Continue after a document compacted by `kvpack compact` (a .kvpack file):
//! engine.load_cache(new Uint8Array(await (await fetch("doc.kvpack")).arrayBuffer()), "doc.kvpack");
//! await engine.generate(" The jury", JSON.stringify({ cache: true }), (piece) => {});
//! ```

use kvpack::compact::file::{parse_for_model, sha256_hex, FileHeader};
use kvpack::compact::SavedContext;
use kvpack::gpu::{BackendChoice, Gpu, GpuOptions, Power};
use kvpack::kv::KvRecipe;
use kvpack::model::generate::{chat_prompt, generate, DEFAULT_SYSTEM};
use kvpack::model::llama::{Llama, LlamaLoader, Session};
use kvpack::model::sampler::Sampler;
use kvpack::model::{EncodeOptions, GgufFile, Tokenizer};
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use wasm_bindgen::prelude::*;

/// Set up panic messages and logging to the browser console.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    #[cfg(target_arch = "wasm32")]
    let _ = console_log::init_with_level(log::Level::Warn);
}

/// Options of one generation, as JSON (every field optional).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateOptions {
    /// KV cache format, recipe or preset, e.g. `f32`, `turbo4`, `k4v2`, `tq3`.
    pub kv: String,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Leading tokens also kept in f16 (for a plain format; a recipe or preset sets its own).
    pub sinks: usize,
    /// Tokens before each query read from an f16 window (for a plain format).
    pub recent: usize,
    /// Tokens the cache holds (prompt + generated).
    pub context: usize,
    /// Wrap the prompt in the ChatML template.
    pub chat: bool,
    /// Continue after the compacted context loaded by `load_cache` (its KV format replaces
    /// `kv`; `sinks` and `recent` still apply to a plain format), as `kvpack generate --cache`.
    pub cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            kv: "turbo4".into(),
            max_tokens: 64,
            temperature: 0.0,
            top_p: 0.9,
            seed: 0,
            sinks: 4,
            recent: 0,
            context: 1024,
            chat: false,
            cache: false,
        }
    }
}

struct Inner {
    gpu: Gpu,
    model: Llama,
    tokenizer: Tokenizer,
    name: String,
    file_bytes: u64,
    /// The model file's sha256 (hex): a `.kvpack` file must have been made with it.
    sha256: String,
    /// The compacted context `load_cache` read.
    /// (Shared, so that a generation keeps its own while another file is loaded.)
    compacted: RefCell<Option<Rc<(FileHeader, SavedContext)>>>,
    busy: Cell<bool>,
    stop: Cell<bool>,
}

/// A model loaded on the browser's GPU.
#[wasm_bindgen]
pub struct Engine {
    inner: Rc<Inner>,
}

fn js_err(context: &str, e: impl std::fmt::Display) -> JsError {
    JsError::new(&format!("{context}: {e}"))
}

#[wasm_bindgen]
impl Engine {
    /// Open WebGPU and upload a GGUF model from its bytes. `on_progress(done, total)` is called
    /// per layer. `webgpu_limits` forces WebGPU's default limits (as the native tests do).
    pub async fn load(
        bytes: Vec<u8>,
        name: String,
        on_progress: Option<js_sys::Function>,
        webgpu_limits: Option<bool>,
    ) -> Result<Engine, JsError> {
        let file_bytes = bytes.len() as u64;
        let sha256 = sha256_hex(&bytes);
        let file = GgufFile::from_bytes(bytes)
            .map_err(|e| js_err(&format!("{name} is not a usable GGUF file"), e))?;
        let tokenizer =
            Tokenizer::from_gguf(&file).map_err(|e| js_err("reading the tokenizer", e))?;
        let opts = GpuOptions {
            backend: BackendChoice::Auto,
            power: Power::Default,
            webgpu_limits: webgpu_limits.unwrap_or(false),
        };
        let gpu = Gpu::new(&opts)
            .await
            .map_err(|e| js_err("opening WebGPU", e))?;
        // One layer at a time, yielding to the browser between layers: the page repaints its
        // progress bar and never freezes.
        let mut loader =
            LlamaLoader::new(&gpu, &file).map_err(|e| js_err(&format!("loading {name}"), e))?;
        while !loader.is_done() {
            loader
                .next_layer()
                .map_err(|e| js_err(&format!("loading {name}"), e))?;
            if let Some(f) = &on_progress {
                let done = loader.layers_done() as u32;
                let _ = f.call2(
                    &JsValue::NULL,
                    &done.into(),
                    &(loader.layers() as u32).into(),
                );
            }
            next_task().await;
        }
        let model = loader
            .finish()
            .map_err(|e| js_err(&format!("loading {name}"), e))?;
        Ok(Engine {
            inner: Rc::new(Inner {
                gpu,
                model,
                tokenizer,
                name,
                file_bytes,
                sha256,
                compacted: RefCell::new(None),
                busy: Cell::new(false),
                stop: Cell::new(false),
            }),
        })
    }

    /// The model, the adapter and its limits, as JSON.
    pub fn info(&self) -> String {
        let i = &self.inner;
        let r = i.gpu.report();
        let c = &i.model.config;
        serde_json::json!({
            "model": i.name, "file_bytes": i.file_bytes,
            "weights_gpu_bytes": i.model.weights_gpu_bytes(),
            "n_layer": c.n_layer, "n_head": c.n_head, "n_head_kv": c.n_head_kv,
            "head_dim": c.head_dim, "n_embd": c.n_embd,
            "adapter": r.name, "backend": r.backend, "device_type": r.device_type,
            "max_binding_bytes": r.max_binding_bytes, "max_buffer_bytes": r.max_buffer_bytes,
            "max_invocations": r.max_invocations, "webgpu_limits": r.webgpu_limits,
        })
        .to_string()
    }

    /// KV bytes and bits per value a format takes for `tokens` tokens of this model, with the
    /// f16 bytes it replaces, as JSON (for the memory bar before generating).
    pub fn kv_estimate(&self, kv: &str, tokens: usize) -> Result<String, JsError> {
        let f = KvRecipe::parse_with(kv, 0, 0)
            .map_err(|e| js_err("KV format", e))?
            .format;
        let c = &self.inner.model.config;
        let bpv = f.bits_per_value(c.head_dim);
        let values = (c.n_layer * c.n_head_kv * c.head_dim * 2 * tokens) as f64;
        Ok(serde_json::json!({
            "kv": f.to_string(), "bits_per_value": bpv,
            "kv_bytes": (values * bpv / 8.0).round(), "kv_bytes_f16": values * 2.0,
        })
        .to_string())
    }

    /// Read a compacted context (a `.kvpack` file from `kvpack compact`) for generations with
    /// `cache: true`. A damaged file, or one made with another model, is refused with the
    /// reason. Returns JSON: the original context's tokens, the tokens kept (all heads, and the
    /// longest head), the file's KV format and method.
    pub fn load_cache(&self, bytes: Vec<u8>, name: String) -> Result<String, JsError> {
        let (header, compacted) = parse_for_model(&bytes, &name, &self.inner.sha256)
            .map_err(|e| JsError::new(&e.to_string()))?;
        let kv = KvRecipe::parse_with(&header.kv, 4, 0)
            .map_err(|e| js_err(&format!("{name}: its KV format"), e))?;
        kv.validate_dim(self.inner.model.config.head_dim)
            .map_err(|e| js_err(&format!("{name}: its KV format"), e))?;
        let info = serde_json::json!({
            "name": name, "context_tokens": compacted.context_len(),
            "tokens_kept": compacted.total_tokens(), "longest_head": compacted.max_len(),
            "kv": header.kv, "method": header.method,
        })
        .to_string();
        self.inner
            .compacted
            .replace(Some(Rc::new((header, compacted))));
        Ok(info)
    }

    /// Forget the compacted context: generations start from an empty cache again.
    pub fn clear_cache(&self) {
        self.inner.compacted.replace(None);
    }

    /// How many tokens `text` encodes to (with the ChatML template when `chat`).
    pub fn count_tokens(&self, text: &str, chat: bool) -> usize {
        prompt_ids(&self.inner.tokenizer, text, chat).len()
    }

    /// Ask a running generation to stop after its current token.
    pub fn stop(&self) {
        self.inner.stop.set(true);
    }

    /// Generate from `prompt` with `options` (JSON, see [`GenerateOptions`]); `on_piece(text)`
    /// receives the text as it streams. Resolves to a JSON report: text, token ids, KV bytes, the
    /// f16 bytes they replace, weights on the GPU, tokens per second.
    pub fn generate(
        &self,
        prompt: String,
        options: String,
        on_piece: js_sys::Function,
    ) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            if inner.busy.replace(true) {
                return Err(JsError::new("a generation is already running: stop it first").into());
            }
            let result = run_generate(&inner, &prompt, &options, &on_piece).await;
            inner.busy.set(false);
            inner.stop.set(false);
            result.map(JsValue::from).map_err(JsValue::from)
        })
    }
}

async fn run_generate(
    inner: &Inner,
    prompt: &str,
    options: &str,
    on_piece: &js_sys::Function,
) -> Result<String, JsError> {
    let o: GenerateOptions = if options.trim().is_empty() {
        GenerateOptions::default()
    } else {
        serde_json::from_str(options).map_err(|e| js_err("generation options", e))?
    };
    // With `cache`, the compacted context's own format, as `kvpack generate --cache`.
    let loaded = inner.compacted.borrow().clone();
    let from = match (o.cache, loaded.as_deref()) {
        (true, None) => {
            return Err(JsError::new(
                "cache: true, but no compacted context is loaded (load a .kvpack file first)",
            ))
        }
        (true, Some((h, c))) => Some((h, c)),
        (false, _) => None,
    };
    let kv_name = from.map_or(o.kv.as_str(), |(h, _)| h.kv.as_str());
    let kv =
        KvRecipe::parse_with(kv_name, o.sinks, o.recent).map_err(|e| js_err("KV format", e))?;
    let (gpu, model, tok) = (&inner.gpu, &inner.model, &inner.tokenizer);
    kv.format
        .validate_dim(model.config.head_dim)
        .map_err(|e| js_err("KV format", e))?;
    if prompt.is_empty() {
        return Err(JsError::new("the prompt is empty"));
    }
    let ids = prompt_ids(tok, prompt, o.chat);
    if ids.len() + o.max_tokens > o.context {
        return Err(JsError::new(&format!(
            "prompt ({} tokens) + max_tokens {} exceed the context of {} tokens",
            ids.len(),
            o.max_tokens,
            o.context
        )));
    }
    let mut session = match from {
        Some((_, c)) => Session::from_saved(gpu, model, &kv, c, o.context),
        None => Session::new(gpu, model, &kv, o.context),
    }
    .map_err(|e| js_err("creating the KV cache", e))?;
    let mut sampler = Sampler::new(o.temperature, o.top_p, o.seed);
    let g = generate(
        gpu,
        &mut session,
        tok,
        &ids,
        &mut sampler,
        o.max_tokens,
        |piece| {
            let _ = on_piece.call1(&JsValue::NULL, &JsValue::from_str(piece));
            !inner.stop.get()
        },
    )
    .await
    .map_err(|e| js_err("generation", e))?;
    let cache = session.cache();
    let mut j = serde_json::json!({
        "text": g.text, "tokens": g.ids, "kv": kv.to_string(),
        "kv_bytes": cache.bytes(), "kv_bytes_f16": cache.bytes_f16(),
        "bits_per_value": cache.bits_per_value(), "cache_tokens": cache.len(),
        "weights_gpu_bytes": model.weights_gpu_bytes(),
        "prompt_tokens": g.prompt_tokens, "prefill_tok_s": g.prefill_tok_s(),
        "decode_tok_s": g.decode_tok_s(), "stopped": g.stopped,
        "backend": gpu.backend_name(), "adapter": gpu.report().name,
    });
    // As `kvpack generate --cache --json`: the compacted context's length and the f16 cache of
    // it all plus the new tokens.
    if let Some((_, c)) = from {
        j["context_tokens"] = c.context_len().into();
        j["kv_bytes_f16_full"] = model
            .config
            .kv_bytes_f16(c.uncompacted_tokens(cache.len()))
            .into();
    }
    Ok(j.to_string())
}

/// The prompt's token ids, as `kvpack generate` makes them.
fn prompt_ids(tok: &Tokenizer, prompt: &str, chat: bool) -> Vec<u32> {
    let text = if chat {
        chat_prompt(DEFAULT_SYSTEM, prompt)
    } else {
        prompt.to_string()
    };
    tok.encode_with(
        &text,
        EncodeOptions {
            parse_special: chat,
            add_special: true,
        },
    )
}

/// Resolves on the event loop's next task (`setTimeout(0)`), so the browser can paint.
async fn next_task() {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        if let Ok(f) = js_sys::Reflect::get(&global, &JsValue::from_str("setTimeout")) {
            if let Ok(f) = f.dyn_into::<js_sys::Function>() {
                let _ = f.call2(&global, &resolve, &JsValue::from(0));
                return;
            }
        }
        let _ = resolve.call0(&JsValue::NULL);
    });
    let _ = wasm_bindgen_futures::JsFuture::from(p).await;
}
