//! `kvpack eval ppl`: perplexity, KL divergence from the f32 cache and top-1 agreement per KV
//! format, on the same tokens.

use super::generate::ModelArgs;
use super::{plot, GpuArgs};
use anyhow::{bail, Result};
use clap::Args;
use kvpack::kv::KvRecipe;
use kvpack::model::llama::{Logits, Session};
use kvpack::model::EncodeOptions;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file (scripts/fetch-data.sh fetches Brown and the KJV into data/).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per evaluated context.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// KV formats, recipes (`k4v2+s4+r16+c`) or presets (`tq3`, `tq4`) to compare; the f32
    /// cache is always run first as the reference.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,q8_0,q4_0,turbo4,turbo3,tq4,tq3"
    )]
    kv: Vec<String>,
    /// Cut the text into C chunks of --tokens tokens and score only the second half of each
    /// chunk (llama.cpp's llama-perplexity protocol). Without it: one context, every token scored.
    #[arg(long)]
    chunks: Option<usize>,
    /// The first N tokens (attention sinks) are also kept in full precision (0: none, the
    /// paper-faithful cache).
    #[arg(long, default_value_t = 0)]
    sinks: usize,
    /// Each token also reads the N tokens before it from a full-precision (f16) window (0: none).
    /// Like --sinks, it applies to plain formats, not to recipes and presets.
    #[arg(long, default_value_t = 0)]
    recent: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also draw quality against bits per value (Δppl % and KL per format) into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    kv: String,
    bits_per_value: f64,
    ppl: f64,
    kl: f64,
    top1_agreement: f64,
    kv_bytes: u64,
}

pub(super) fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

pub fn run(gpu_args: &GpuArgs, a: PplArgs) -> Result<()> {
    let mut formats: Vec<KvRecipe> =
        a.kv.iter()
            .map(|s| KvRecipe::parse_with(s, a.sinks, a.recent))
            .collect::<Result<_, _>>()?;
    // The reference: the f32 cache with nothing else.
    let f32_fmt = KvRecipe::plain("f32".parse()?, 0);
    formats.retain(|f| *f != f32_fmt);
    formats.insert(0, f32_fmt);
    if a.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    let text = super::read_eval_text(&a.text)?;
    let gpu = gpu_args.open()?;
    let loaded = a.model.load(&gpu, a.json)?;
    let ids = loaded.tokenizer.encode_with(
        &text,
        EncodeOptions {
            parse_special: false,
            add_special: true,
        },
    );
    let n_chunks = a.chunks.unwrap_or(1);
    if ids.len() < n_chunks * a.tokens {
        bail!(
            "{} has {} tokens; {} × {} are needed",
            a.text.display(),
            ids.len(),
            n_chunks,
            a.tokens
        );
    }
    for f in &formats {
        f.validate_dim(loaded.model.config.head_dim)?;
    }
    let vocab = loaded.model.config.vocab_size.max(1);
    // Score positions: predictions of token i+1 from position i.
    let first_scored = if a.chunks.is_some() { a.tokens / 2 } else { 0 };
    let mut nll = vec![0f64; formats.len()];
    let mut kl = vec![0f64; formats.len()];
    let mut agree = vec![0usize; formats.len()];
    let mut kv_bytes = vec![0u64; formats.len()];
    let mut bits = vec![0f64; formats.len()];
    let mut count = 0usize;
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((n_chunks * formats.len()) as u64)
    };
    for c in 0..n_chunks {
        let toks = &ids[c * a.tokens..(c + 1) * a.tokens];
        let mut reference: Vec<Vec<f64>> = Vec::new();
        let mut ref_top = Vec::new();
        for (fi, f) in formats.iter().enumerate() {
            bar.set_message(f.to_string());
            let mut session = Session::new(&gpu, &loaded.model, f, a.tokens)?;
            let logits = pollster::block_on(session.forward(&gpu, toks, Logits::All))?;
            let v = logits.len() / toks.len();
            debug_assert!(v >= vocab.min(v));
            for i in first_scored..toks.len() - 1 {
                let row = &logits[i * v..(i + 1) * v];
                let lp = log_softmax(row);
                nll[fi] -= lp[toks[i + 1] as usize];
                let top = argmax(row);
                if fi == 0 {
                    reference.push(lp);
                    ref_top.push(top);
                    agree[0] += 1;
                } else {
                    let r = &reference[i - first_scored];
                    kl[fi] += r
                        .iter()
                        .zip(&lp)
                        .map(|(p, q)| p.exp() * (p - q))
                        .sum::<f64>();
                    agree[fi] += (top == ref_top[i - first_scored]) as usize;
                }
            }
            kv_bytes[fi] = session.cache().bytes();
            bits[fi] = session.cache().bits_per_value();
            bar.inc(1);
        }
        count += toks.len() - 1 - first_scored;
    }
    bar.finish_and_clear();
    let rows: Vec<Row> = formats
        .iter()
        .enumerate()
        .map(|(i, f)| Row {
            kv: f.to_string(),
            bits_per_value: bits[i],
            ppl: (nll[i] / count as f64).exp(),
            kl: kl[i] / count as f64,
            top1_agreement: agree[i] as f64 / count as f64,
            kv_bytes: kv_bytes[i],
        })
        .collect();
    if let Some(path) = &a.plot {
        let base = rows[0].ppl;
        let points = |f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64, String)> {
            rows.iter()
                .map(|r| (r.bits_per_value, f(r), r.kv.clone()))
                .collect()
        };
        let title = format!(
            "{}: {} × {} tokens of {}",
            loaded.name,
            n_chunks,
            a.tokens,
            a.text
                .file_name()
                .map_or("text".into(), |n| n.to_string_lossy())
        );
        plot::write_svg(
            path,
            &title,
            "bits per value (norms and full-precision tokens counted)",
            "perplexity increase over the f32 cache, %",
            &[plot::Series {
                name: "Δppl %".into(),
                points: points(&|r| 100.0 * (r.ppl / base - 1.0)),
                joined: false,
            }],
        )?;
        if !a.json {
            eprintln!("plot: {}", path.display());
        }
    }
    if a.json {
        let j = serde_json::json!({ "backend": gpu.backend_name(), "model": loaded.name,
            "text": a.text.display().to_string(), "tokens": a.tokens, "chunks": n_chunks,
            "scored": count, "rows": rows });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "{} on {} ({}), {} chunk(s) × {} tokens of {}, {count} predictions scored",
            loaded.name,
            gpu.report().name,
            gpu.backend_name(),
            n_chunks,
            a.tokens,
            a.text.display()
        );
        println!(
            "{:<24} {:>7} {:>9} {:>8} {:>9} {:>7} {:>10}",
            "kv", "bits/v", "ppl", "Δppl", "KL", "top-1", "KV bytes"
        );
        let base = rows[0].ppl;
        for r in &rows {
            println!(
                "{:<24} {:>7.3} {:>9.3} {:>+7.2}% {:>9.5} {:>7.3} {:>10}",
                r.kv,
                r.bits_per_value,
                r.ppl,
                100.0 * (r.ppl / base - 1.0),
                r.kl,
                r.top1_agreement,
                r.kv_bytes
            );
        }
    }
    Ok(())
}
