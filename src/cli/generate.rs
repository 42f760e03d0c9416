//! `kvpack generate`: text from a GGUF model with a compressed KV cache.

use super::GpuArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use kvpack::gpu::Gpu;
use kvpack::kv::KvRecipe;
use kvpack::model::generate::{chat_prompt, generate, DEFAULT_SYSTEM};
use kvpack::model::llama::{Llama, Session};
use kvpack::model::sampler::Sampler;
use kvpack::model::{EncodeOptions, GgufFile, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

/// Model selection, shared by the commands that run a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A llama-architecture GGUF file (F32, F16, Q4_0, Q4_1, Q8_0 tensors). Without it the
    /// default model, SmolLM2-135M-Instruct Q4_1, is fetched on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// A model loaded on the GPU with its tokenizer.
pub struct Loaded {
    pub model: Llama,
    pub path: PathBuf,
    pub tokenizer: Tokenizer,
    pub name: String,
}

impl ModelArgs {
    pub fn load(&self, gpu: &Gpu, quiet: bool) -> Result<Loaded> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => kvpack::model::fetch::default_model(|m| eprintln!("{m}"))?,
        };
        let file = GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&file).context("reading the tokenizer")?;
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "loading {msg} [{bar:30}] {pos}/{len} layers",
                )
                .expect("template")
                .progress_chars("=> "),
            )
        };
        let name = path
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned());
        bar.set_message(name.clone());
        let model = Llama::load(gpu, &file, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .with_context(|| format!("loading {}", path.display()))?;
        bar.finish_and_clear();
        Ok(Loaded {
            model,
            path,
            tokenizer,
            name,
        })
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// KV cache format: f32, f16, q8_0, q4_0, turbo1..4 (+n/u), turbo2p.., turbo2.5, turbo3.5, or a
    /// K/V pair such as k4v2 or turbo4/turbo2.
    #[arg(long, default_value = "turbo4")]
    kv: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the model's ChatML template (system + user turn).
    #[arg(long)]
    chat: bool,
    /// The first N tokens (attention sinks) are also kept in full precision (0: none).
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Each token also reads the N tokens before it from a full-precision (f16) window (0: none).
    #[arg(long, default_value_t = 0)]
    recent: usize,
    /// Tokens the cache can hold (prompt + generated).
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Start from a compacted context saved by `kvpack compact`; the prompt continues after it.
    /// The file's KV recipe replaces --kv, --sinks and --recent: its codes were stored with
    /// them (a version 1 file, f32 tokens with a bare format, takes --sinks and --recent).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(gpu_args: &GpuArgs, a: GenerateArgs) -> Result<()> {
    let mut kv = KvRecipe::parse_with(&a.kv, a.sinks, a.recent)?;
    if a.prompt.is_empty() {
        bail!("--prompt is empty: give the text to continue");
    }
    let gpu = gpu_args.open()?;
    let loaded = a.model.load(&gpu, a.json)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    kv.validate_dim(model.config.head_dim)?;
    let text = if a.chat {
        chat_prompt(DEFAULT_SYSTEM, &a.prompt)
    } else {
        a.prompt.clone()
    };
    let prompt_ids = tok.encode_with(
        &text,
        EncodeOptions {
            parse_special: a.chat,
            add_special: true,
        },
    );
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    if prompt_ids.len() + a.max_tokens > a.context {
        bail!(
            "prompt ({} tokens) + --max-tokens {} exceed --context {}: raise --context",
            prompt_ids.len(),
            a.max_tokens,
            a.context
        );
    }
    // With --cache: the compacted context (to report what it saves).
    let mut compacted_from: Option<kvpack::compact::SavedContext> = None;
    let mut session = match &a.cache {
        Some(path) => {
            let sha = kvpack::model::fetch::sha256_file(&loaded.path)
                .with_context(|| format!("hashing {}", loaded.path.display()))?;
            let (header, compacted) = kvpack::compact::file::load(path, &sha)?;
            kv = KvRecipe::parse_with(&header.kv, a.sinks, a.recent)?;
            kv.validate_dim(model.config.head_dim)?;
            let session = Session::from_saved(&gpu, model, &kv, &compacted, a.context)?;
            compacted_from = Some(compacted);
            session
        }
        None => Session::new(&gpu, model, &kv, a.context)?,
    };
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);

    let stdout = std::io::stdout();
    if !a.json {
        print!("{}", a.prompt);
        stdout.lock().flush().ok();
    }
    let g = pollster::block_on(generate(
        &gpu,
        &mut session,
        tok,
        &prompt_ids,
        &mut sampler,
        a.max_tokens,
        |piece| {
            if !a.json {
                print!("{piece}");
                stdout.lock().flush().ok();
            }
            true
        },
    ))?;
    let cache = session.cache();
    let (prefill_tok_s, decode_tok_s) = (g.prefill_tok_s(), g.decode_tok_s());
    // A compacted context against the f16 cache of its whole original context plus the new
    // tokens: what the compaction saves.
    let full = compacted_from.map(|c| {
        let tokens = c.uncompacted_tokens(cache.len());
        (c.context_len(), tokens, model.config.kv_bytes_f16(tokens))
    });
    if a.json {
        let mut j = serde_json::json!({
            "text": g.text, "tokens": g.ids, "kv": kv.to_string(),
            "kv_bytes": cache.bytes(), "kv_bytes_f16": cache.bytes_f16(),
            "weights_gpu_bytes": model.weights_gpu_bytes(),
            "bits_per_value": cache.bits_per_value(),
            "prompt_tokens": prompt_ids.len(),
            "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
            "backend": gpu.backend_name(), "model": loaded.name,
        });
        if let Some((context_len, _, bytes)) = full {
            j["context_tokens"] = context_len.into();
            j["kv_bytes_f16_full"] = bytes.into();
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!();
        eprintln!(
            "--- {} on {} ({})",
            loaded.name,
            gpu.report().name,
            gpu.backend_name()
        );
        eprintln!(
            "weights on GPU:  {:.1} MB (kept in their GGUF blocks)",
            model.weights_gpu_bytes() as f64 / 1e6
        );
        eprintln!(
            "KV cache:        {} bytes for {} tokens in {kv} ({:.2} bits/value); an f16 cache needs {} bytes (f16 / this = {:.2}x)",
            cache.bytes(), cache.len(), cache.bits_per_value(), cache.bytes_f16(),
            cache.bytes_f16() as f64 / cache.bytes().max(1) as f64
        );
        if let Some((context_len, tokens, bytes)) = full {
            eprintln!(
                "compacted:       {context_len} context tokens; the f16 cache of all {tokens} tokens needs {bytes} bytes (that / this = {:.2}x)",
                bytes as f64 / cache.bytes().max(1) as f64
            );
        }
        eprintln!("speed:           prefill {prefill_tok_s:.1} tok/s ({} tokens), decode {decode_tok_s:.2} tok/s ({} tokens)",
            prompt_ids.len(), g.ids.len());
    }
    Ok(())
}
