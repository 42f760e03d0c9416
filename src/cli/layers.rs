//! `kvpack eval layers`: how much each layer's compaction costs the model, measured as the mean
//! KL divergence of the next-token distribution from the full context's when that layer alone is
//! compacted. The result, a layer profile, is what `--head-budgets profile` shares tokens by.

use super::compaction::{compact_tokens, full_context, FitArgs, SelectionArg};
use super::generate::ModelArgs;
use super::GpuArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use kvpack::compact::{CompactedContext, HeadBudgets, Job, LayerProfile, Method};
use kvpack::gpu::Gpu;
use kvpack::kv::KvRecipe;
use kvpack::model::llama::{Llama, Logits, Session};
use kvpack::model::EncodeOptions;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct LayersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text for calibration: its first --context tokens are compacted and the next
    /// --continuation tokens scored. Use a text other than those you evaluate on.
    #[arg(long)]
    text: PathBuf,
    /// Tokens of context that are compacted.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Tokens after the context whose next-token distributions are compared with the full
    /// context's.
    #[arg(long, default_value_t = 128)]
    continuation: usize,
    /// The sizes (tokens per KV head) each layer is compacted to, one measurement per layer and
    /// size: cover the budgets the profile will share (a 1,024-token context at 50x keeps 20,
    /// at 15x 67).
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128")]
    tokens_per_head: Vec<usize>,
    /// The compaction method: am, am-window, am-mix, am-mix-window, am-ctx, am-ctx-window.
    #[arg(long, default_value = "am-mix-window")]
    method: String,
    #[command(flatten)]
    fit: FitArgs,
    /// How Attention Matching picks its keys: highest, omp or accumulated.
    #[arg(long, value_enum, default_value_t = SelectionArg::Highest)]
    selection: SelectionArg,
    /// Reference-query positions per KV head (evenly spaced over the repeat prefill).
    #[arg(long, default_value_t = 1024)]
    reference_positions: usize,
    /// The first N cache slots of the f32 prefill are kept in f16 (as in `eval compaction`).
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Write the profile here (JSON) for `--head-budgets profile --layer-profile FILE`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON (the profile) instead of the table.
    #[arg(long)]
    json: bool,
}

/// Per position of `tokens`, the log-probabilities of the next token after `compacted`.
fn next_token_logprobs(
    gpu: &Gpu,
    model: &Llama,
    recipe: &KvRecipe,
    compacted: &CompactedContext,
    tokens: &[u32],
) -> Result<Vec<Vec<f64>>> {
    let mut s = Session::from_compacted(gpu, model, recipe, compacted, tokens.len())?;
    let logits = pollster::block_on(s.forward(gpu, tokens, Logits::All))?;
    let v = logits.len() / tokens.len();
    Ok(logits.chunks(v).map(super::ppl::log_softmax).collect())
}

/// Mean over rows of KL(p ‖ q), both given as log-probabilities.
fn mean_kl(p: &[Vec<f64>], q: &[Vec<f64>]) -> f64 {
    let total: f64 = p
        .iter()
        .zip(q)
        .map(|(lp, lq)| {
            lp.iter()
                .zip(lq)
                .map(|(&a, &b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum();
    (total / p.len().max(1) as f64).max(0.0)
}

pub fn run(gpu_args: &GpuArgs, a: LayersArgs) -> Result<()> {
    let method: Method = a.method.parse()?;
    if !method.is_attention_matching() {
        bail!("--method {method}: a layer profile is measured for one of Attention Matching's methods (am, am-window, am-mix, am-mix-window, am-ctx, am-ctx-window)");
    }
    let mut sizes = a.tokens_per_head.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.first() == Some(&0) || sizes.last().is_some_and(|&s| s >= a.context) {
        bail!(
            "--tokens-per-head {:?}: each size at least 1 and below --context {}",
            a.tokens_per_head,
            a.context
        );
    }
    if a.continuation < 2 {
        bail!("--continuation needs at least 2 tokens");
    }
    let text = super::read_eval_text(&a.text)?;
    let gpu = gpu_args.open()?;
    let loaded = a.model.load(&gpu, a.json)?;
    let (model, c) = (&loaded.model, &loaded.model.config);
    let ids = loaded.tokenizer.encode_with(
        &text,
        EncodeOptions {
            parse_special: false,
            add_special: true,
        },
    );
    if ids.len() < a.context + a.continuation {
        bail!(
            "{} has {} tokens; --context {} + --continuation {} are needed",
            a.text.display(),
            ids.len(),
            a.context,
            a.continuation
        );
    }
    let model_sha256 = kvpack::model::fetch::sha256_file(&loaded.path)
        .with_context(|| format!("hashing {}", loaded.path.display()))?;
    let context = &ids[..a.context];
    let continuation = &ids[a.context..a.context + a.continuation];
    let log = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let t0 = Instant::now();
    let jobs: Vec<Job> = sizes
        .iter()
        .map(|&budget| Job {
            method,
            budget,
            head_budgets: HeadBudgets::Uniform,
            selection: a.selection.into(),
            fit_for: None,
            fit: None,
        })
        .collect();
    let run = compact_tokens(
        &gpu,
        &loaded,
        context,
        &jobs,
        &[],
        a.reference_positions,
        a.sinks,
        &a.fit.options(),
        &log,
    )?;
    let full = full_context(&run.captured, c, a.context);
    let recipe = KvRecipe::plain("f32".parse()?, a.sinks);
    log("measuring: full context");
    let reference = next_token_logprobs(&gpu, model, &recipe, &full, continuation)?;
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((c.n_layer * sizes.len()) as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} layer × size, {elapsed} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        )
    };
    bar.set_message("layers");
    let mut kl = vec![vec![0f64; sizes.len()]; c.n_layer];
    let mut probe = full.clone();
    for (l, row) in kl.iter_mut().enumerate() {
        for (k, compacted) in run.compacted.iter().enumerate() {
            probe.layers[l] = compacted.layers[l].clone();
            let got = next_token_logprobs(&gpu, model, &recipe, &probe, continuation)?;
            row[k] = mean_kl(&reference, &got);
            bar.inc(1);
        }
        probe.layers[l] = full.layers[l].clone();
    }
    bar.finish_and_clear();
    let profile = LayerProfile {
        model_sha256,
        method: method.to_string(),
        context: a.context,
        continuation: a.continuation,
        tokens_per_head: sizes.clone(),
        kl,
    };
    profile.validate().map_err(anyhow::Error::msg)?;
    if let Some(out) = &a.out {
        let json = serde_json::to_string_pretty(&profile)?;
        kvpack::compact::file::write_atomic(out, json.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
        return Ok(());
    }
    println!(
        "{}: {} context tokens, {} continuation tokens, {method}; {:.0} s",
        a.text.display(),
        a.context,
        a.continuation,
        t0.elapsed().as_secs_f64()
    );
    println!("mean KL (nats/token) from the full context, one layer compacted at a time:");
    let mid = sizes[sizes.len() / 2];
    print!("{:>5}", "layer");
    for s in &sizes {
        print!(" {:>9}", format!("{s} tok"));
    }
    println!(
        "  tokens per head by this profile for a mean of {}, {}, {}",
        (mid / 4).max(1),
        (mid / 2).max(1),
        mid
    );
    let shares: Vec<Vec<usize>> = [mid / 4, mid / 2, mid]
        .iter()
        .map(|&m| profile.allocate(m.max(1), a.context))
        .collect();
    for (l, row) in profile.kl.iter().enumerate() {
        print!("{l:>5}");
        for x in row {
            print!(" {x:>9.5}");
        }
        println!(
            "  {:>4} {:>4} {:>4}",
            shares[0][l], shares[1][l], shares[2][l]
        );
    }
    if let Some(out) = &a.out {
        println!(
            "profile written to {}: use it with `--head-budgets profile --layer-profile {}`",
            out.display(),
            out.display()
        );
    }
    Ok(())
}
