//! `kvpack eval compaction`: continuation and recall perplexity after a compacted context, per
//! method, compaction ratio and KV format, beside the full cache and no context.

use super::generate::{Loaded, ModelArgs};
use super::GpuArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use kvpack::codec::KvFormat;
use kvpack::compact::{
    compact_context, Captured, CompactTimings, CompactedContext, ContextShape, FitFor, FitOptions,
    HeadBudgets, HeadCompaction, Job, LayerProfile, Method, SavedContext, Selection, StoredContext,
};
use kvpack::gpu::Gpu;
use kvpack::kv::KvRecipe;
use kvpack::model::llama::{Llama, Logits, Session};
use kvpack::model::EncodeOptions;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// The fit's knobs that both `compact` and `eval compaction` take. Each unset knob takes the
/// preset's value ([`Preset`]), or the plain default without `--preset`.
#[derive(Args)]
pub struct FitArgs {
    /// A named setting of Attention Matching's options. `recommended`: method am-ctx-window, 1
    /// exact sink, 0.7 of each head's budget as an exact recent window, the rest heavy hitters
    /// by accumulated attention with β capped at 1 and values shrunk with ridge 100, per-layer
    /// budgets from the shipped SmolLM2 profile (uniform for other models). It beats H2O,
    /// SnapKV and StreamingLLM on both continuation and recall in 39 of 45 measured cells (15
    /// texts × 10x, 20x, 50x; docs/compaction.md). `adaptive`: the same defaults, and for
    /// am-ctx and am-ctx-window two settings tried on the context itself, `recommended` and
    /// `observation` (SnapKV's observation-window selection, values kept, β ≤ 1, recent share
    /// 0.6): each compacts the context less its last 64 tokens, and `observation` compacts the
    /// whole context only if the model's perplexity after it is lower than after `recommended`
    /// both on those 64 tokens and on the first 256 read again (40 of the 45 cells; compaction
    /// then takes about 1.1–2.1x the prefill's time). Options given beside a preset override
    /// its own (with `adaptive`, in both settings).
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// am-window, am-mix-window, am-ctx-window: the share of each head's budget kept as an exact
    /// recent window [default: 0.25; recommended: 0.7].
    #[arg(long, value_parser = parse_fraction)]
    recent_fraction: Option<f64>,
    /// am-window, am-mix-window, am-ctx-window: the first N tokens kept exact as attention sinks
    /// (at most half the budget; the others compete for the budget like any token) [default: 4;
    /// recommended: 1].
    #[arg(long)]
    window_sinks: Option<usize>,
    /// Ridge of the value fit, relative to the mean diagonal of its normal matrix; the values
    /// are shrunk toward the kept tokens' own values (large: keep them, fit only β) [default:
    /// 0.001; recommended: 100].
    #[arg(long, value_parser = parse_ridge)]
    value_ridge: Option<f64>,
    /// am-ctx, am-ctx-window: fit β and the values only on the context's queries at positions
    /// ≥ this share of the context (0: every position). The keys are still picked from every
    /// position's attention; early queries see few keys and inflate the β of the keys they see.
    #[arg(long, default_value_t = FitOptions::default().fit_from, value_parser = parse_fraction)]
    fit_from: f64,
    /// Attention Matching: the largest β a fitted key may take (0 to 10; 10 is the fit's own
    /// limit). β above it is clamped before the values are fitted: a heavy hitter then cannot
    /// take all the attention its dropped neighbours had [default: 10; recommended: 1].
    #[arg(long, value_parser = parse_max_bias)]
    max_bias: Option<f64>,
}

/// `--preset`: named settings of the compaction commands' options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// am-ctx-window, accumulated selection, 1 sink, recent share 0.7, β ≤ 1, ridge 100,
    /// profile budgets (the shipped SmolLM2 profile; uniform for other models).
    Recommended,
    /// `recommended`, or SnapKV's observation-window selection with the values kept (ridge
    /// 1e6), β ≤ 1 and recent share 0.6 where the model's perplexity after it is lower on
    /// both the context's own held-back tail and its re-read head.
    Adaptive,
}

/// One setting `--preset adaptive` tries: a key selection and the fit's knobs.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// The name rows and logs show.
    pub name: &'static str,
    /// How the keys are picked.
    pub selection: Selection,
    /// The fit's knobs.
    pub fit: FitOptions,
}

/// The tokens at the end of the context that `--preset adaptive` holds back to compare its
/// settings on what comes next: 64, or an eighth of a short context.
pub fn adaptive_holdout(context: usize) -> usize {
    (context / 8).min(64)
}

/// The tokens at the start of the context that `--preset adaptive` reads again after each
/// setting's compaction, to compare what it still holds: 256 (as `eval compaction`'s recall),
/// or a quarter of a short context.
pub fn adaptive_reread(context: usize) -> usize {
    (context / 4).min(256)
}

/// The layer profile `--preset recommended` uses for the default model (`kvpack eval layers`
/// on Brown ca04, `profiles/`).
const SHIPPED_PROFILE: &str =
    include_str!("../../profiles/smollm2-135m-instruct.am-mix-window.json");

/// The recommended preset's method, key selection and budgets.
const PRESET_METHOD: &str = "am-ctx-window";
const PRESET_METHODS: &str = "am-ctx-window,h2o,snapkv,streaming";
const PRESET_SELECTION: SelectionArg = SelectionArg::Accumulated;

/// The recommended preset's fit: 1 sink, recent share 0.7, ridge 100, β ≤ 1.
const RECOMMENDED_FIT: FitOptions = FitOptions {
    value_ridge: 100.0,
    recent_fraction: 0.7,
    window_sinks: 1,
    max_bias: 1.0,
    ..FitOptions::DEFAULT
};

/// The adaptive preset's second setting (with observation selection): the values kept (β only),
/// recent share 0.6.
const OBSERVATION_FIT: FitOptions = FitOptions {
    value_ridge: 1e6,
    recent_fraction: 0.6,
    ..RECOMMENDED_FIT
};

/// `--head-budgets`: how Attention Matching shares a job's tokens among heads. `uniform` keeps
/// the same number in every head; `sensitivity` fits each head at 0.5x, 1x, 2x and 3x the
/// budget and gives tokens to the heads whose fit error drops most per token, within the same
/// total; `profile` gives each layer the share that the model's measured loss sensitivity
/// (`--layer-profile FILE`, from `kvpack eval layers`) sets, within the same total. The cache
/// stores heads ragged, so the bytes saved are real.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BudgetArg {
    Uniform,
    Sensitivity,
    Profile,
}

impl BudgetArg {
    /// The head budgets of a job of `budget` tokens per head over a `context`: `profile` needs
    /// the layer profile.
    fn budgets(
        self,
        profile: Option<&LayerProfile>,
        budget: usize,
        context: usize,
    ) -> Result<HeadBudgets> {
        Ok(match self {
            BudgetArg::Uniform => HeadBudgets::Uniform,
            BudgetArg::Sensitivity => HeadBudgets::Sensitivity,
            BudgetArg::Profile => match profile {
                Some(p) => HeadBudgets::PerLayer(p.allocate(budget, context).into()),
                None => bail!(
                    "--head-budgets profile needs --layer-profile FILE (measure one with `kvpack eval layers`)"
                ),
            },
        })
    }
}

/// Read a layer profile (`kvpack eval layers --out`) and check its shape, before any GPU work.
pub fn read_layer_profile(path: &std::path::Path) -> Result<LayerProfile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the layer profile {}", path.display()))?;
    let p: LayerProfile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a layer profile (`kvpack eval layers --out FILE` writes one)",
            path.display()
        )
    })?;
    p.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(p)
}

/// Check that the profile read from `path` was measured on the model at `model_path` with
/// `n_layer` layers.
fn check_profile_model(
    p: &LayerProfile,
    path: &std::path::Path,
    model_path: &std::path::Path,
    n_layer: usize,
) -> Result<()> {
    if p.n_layer() != n_layer {
        bail!(
            "{} profiles {} layers; the model has {n_layer}",
            path.display(),
            p.n_layer()
        );
    }
    let sha = kvpack::model::fetch::sha256_file(model_path)
        .with_context(|| format!("hashing {}", model_path.display()))?;
    if p.model_sha256 != sha {
        bail!(
            "{} was measured on the model with sha256 {}, not on {} ({sha}): measure it again with `kvpack eval layers`",
            path.display(),
            p.model_sha256,
            model_path.display()
        );
    }
    Ok(())
}

/// Reject `--layer-profile` without `profile` budgets and the reverse, before any work.
fn check_profile_args(budgets: &[BudgetArg], profile: Option<&std::path::Path>) -> Result<()> {
    match (budgets.contains(&BudgetArg::Profile), profile) {
        (true, None) => bail!(
            "--head-budgets profile needs --layer-profile FILE (measure one with `kvpack eval layers`)"
        ),
        (false, Some(p)) => bail!(
            "--layer-profile {} is read only with --head-budgets profile",
            p.display()
        ),
        _ => Ok(()),
    }
}

/// `--selection`: how Attention Matching picks the keys it keeps. `highest` takes the keys of
/// highest RMS attention over the reference queries (HighestAttnKeys); `omp` picks them one at a
/// time by orthogonal matching pursuit on the attention mass, refitting the biases after each
/// pick (slower; keys that together cover the mass); `accumulated` takes H2O's heavy hitters
/// (attention summed over the reference queries) and fits them; `observation` takes SnapKV's
/// (the attention of the last 32 positions' reference rows, max-pooled over 7 neighbouring
/// keys: whole phrases the end of the context reads; meant for `am-ctx` and `am-ctx-window`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SelectionArg {
    Highest,
    Omp,
    Accumulated,
    Observation,
}

impl From<SelectionArg> for Selection {
    fn from(s: SelectionArg) -> Selection {
        match s {
            SelectionArg::Highest => Selection::HighestAttention,
            SelectionArg::Omp => Selection::Omp,
            SelectionArg::Accumulated => Selection::Accumulated,
            SelectionArg::Observation => Selection::Observation,
        }
    }
}

impl FitArgs {
    /// The fit's options: those given, then the preset's, then the defaults.
    pub(super) fn options(&self) -> FitOptions {
        let base = match self.preset {
            Some(Preset::Recommended | Preset::Adaptive) => RECOMMENDED_FIT,
            None => FitOptions::default(),
        };
        self.over(base)
    }

    /// `base` with the options given on the command line put over it.
    fn over(&self, base: FitOptions) -> FitOptions {
        FitOptions {
            recent_fraction: self.recent_fraction.unwrap_or(base.recent_fraction),
            window_sinks: self.window_sinks.unwrap_or(base.window_sinks),
            value_ridge: self.value_ridge.unwrap_or(base.value_ridge),
            fit_from: self.fit_from,
            max_bias: self.max_bias.unwrap_or(base.max_bias),
            ..base
        }
    }

    /// Whether a preset sets the unset options (both presets share the recommended defaults).
    fn recommended(&self) -> bool {
        self.preset.is_some()
    }

    /// The settings `--preset adaptive` chooses among (none without it); `selection` given on
    /// the command line replaces both settings' own, and so do the fit options given.
    pub(super) fn candidates(&self, selection: Option<SelectionArg>) -> Vec<Candidate> {
        if self.preset != Some(Preset::Adaptive) {
            return Vec::new();
        }
        let pick = |own: SelectionArg| selection.unwrap_or(own).into();
        vec![
            Candidate {
                name: "recommended",
                selection: pick(PRESET_SELECTION),
                fit: self.over(RECOMMENDED_FIT),
            },
            Candidate {
                name: "observation",
                selection: pick(SelectionArg::Observation),
                fit: self.over(OBSERVATION_FIT),
            },
        ]
    }
}

/// Where the head budgets' layer profile comes from.
enum ProfileSource {
    /// `--layer-profile FILE`: a wrong model is an error.
    File(PathBuf),
    /// The shipped profile, for `--preset recommended`: with another model the budgets fall
    /// back to uniform.
    Shipped,
}

/// The layer profile to read (before any GPU work) for `budgets`: `--layer-profile`, or the
/// shipped one when the preset asks for profile budgets. A profile without profile budgets, or
/// profile budgets without a profile, is refused.
fn profile_for(
    budgets: &[BudgetArg],
    path: Option<&std::path::Path>,
    preset_budgets: bool,
) -> Result<Option<(LayerProfile, ProfileSource)>> {
    if let Some(p) = path {
        check_profile_args(budgets, Some(p))?;
        return Ok(Some((
            read_layer_profile(p)?,
            ProfileSource::File(p.into()),
        )));
    }
    if preset_budgets {
        let p: LayerProfile =
            serde_json::from_str(SHIPPED_PROFILE).context("the shipped layer profile")?;
        p.validate()
            .map_err(|e| anyhow::anyhow!("the shipped layer profile: {e}"))?;
        return Ok(Some((p, ProfileSource::Shipped)));
    }
    check_profile_args(budgets, None)?;
    Ok(None)
}

/// Check the profile against the loaded model. A `--layer-profile` for another model is an
/// error; the shipped profile for another model is dropped (uniform budgets), with a note.
fn checked_profile(
    profile: Option<(LayerProfile, ProfileSource)>,
    model_path: &std::path::Path,
    n_layer: usize,
    quiet: bool,
) -> Result<Option<LayerProfile>> {
    match profile {
        None => Ok(None),
        Some((p, ProfileSource::File(path))) => {
            check_profile_model(&p, &path, model_path, n_layer)?;
            Ok(Some(p))
        }
        Some((p, ProfileSource::Shipped)) => {
            match check_profile_model(
                &p,
                std::path::Path::new("the shipped profile"),
                model_path,
                n_layer,
            ) {
                Ok(()) => Ok(Some(p)),
                Err(e) => {
                    if !quiet {
                        eprintln!("--preset recommended: uniform head budgets ({e})");
                    }
                    Ok(None)
                }
            }
        }
    }
}

/// The instruction between the context and its repetition in the reference-query prefill.
pub const REPEAT_PROMPT: &str = "\n\nRepeat the text above, word for word.\n\n";

#[derive(Args)]
pub struct CompactionArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text files (scripts/fetch-data.sh fetches Brown and the KJV into data/), comma
    /// separated: each is evaluated on its own, and with several a table of the mean gaps over
    /// them closes the report (`--json`: `{"texts": [one report per text], "mean_rows": …}`).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "FILE[,FILE…]"
    )]
    text: Vec<PathBuf>,
    /// Tokens of context that are compacted.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Tokens after the context whose perplexity is measured.
    #[arg(long, default_value_t = 256)]
    continuation: usize,
    /// The first N context tokens, fed again after the context for the recall perplexity.
    #[arg(long, default_value_t = 256)]
    recall: usize,
    /// Compaction ratios: tokens per head kept = context / ratio.
    #[arg(long, value_delimiter = ',', default_value = "5,10,20,50")]
    ratios: Vec<f64>,
    /// Methods: am, am-window, am-mix, am-mix-window, am-ctx, am-ctx-window, h2o, snapkv,
    /// streaming [default: am,am-mix,h2o,snapkv,streaming; recommended:
    /// am-ctx-window,h2o,snapkv,streaming].
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// KV formats the compacted cache is stored in: formats (with --sinks) or recipes with sinks,
    /// a window and edge layers, such as `turbo4u+s2+r14+e1` (2 f16 sinks, the 14 tokens before
    /// each new one in f16, the first and last layer in q8_0); not centered keys. The window
    /// holds tokens that come after the compacted context, so it adds no bytes to the rows'.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    kv: Vec<String>,
    /// Reference-query positions per KV head (evenly spaced over the repeat prefill).
    #[arg(long, default_value_t = 1024)]
    reference_positions: usize,
    /// The first N cache slots are also kept in full precision (matters for quantized formats).
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    #[command(flatten)]
    fit: FitArgs,
    /// How Attention Matching shares each job's tokens among heads: `uniform`, `sensitivity`
    /// (by the fit's error), `profile` (by the layers' measured loss sensitivity, from
    /// --layer-profile), or several (`uniform,profile`: a row for each) [default: uniform;
    /// recommended: profile].
    #[arg(long, value_enum, value_delimiter = ',')]
    head_budgets: Option<Vec<BudgetArg>>,
    /// A layer profile of the model (`kvpack eval layers --out FILE`) for `--head-budgets
    /// profile`.
    #[arg(long, value_name = "FILE")]
    layer_profile: Option<PathBuf>,
    /// How Attention Matching picks its keys: `highest` (HighestAttnKeys), `omp` (orthogonal
    /// matching pursuit on the attention mass), `accumulated` (H2O's heavy hitters),
    /// `observation` (SnapKV's: what the last 32 positions attend to, pooled; for am-ctx and
    /// am-ctx-window), or several (`highest,omp`: a row for each) [default: highest;
    /// recommended: accumulated].
    #[arg(long, value_enum, value_delimiter = ',')]
    selection: Option<Vec<SelectionArg>>,
    /// Attention Matching fits β and the values to the keys as each --kv format stores them
    /// (quantized, sinks in f16), so they absorb part of the keys' quantization error: one
    /// compaction per format, each measured in its own format.
    #[arg(long)]
    fit_to_kv: bool,
    /// With --fit-to-kv, also refit the values to the format's value codec: each kept value is
    /// quantized in turn and the values not yet quantized take up the error it leaves in the
    /// fitted attention outputs (GPTQ's error feedback, over tokens).
    #[arg(long, requires = "fit_to_kv")]
    refit_values: bool,
    /// Print JSON. Each row of kvpack's methods with baselines beside it (the same ratio and
    /// --kv) says whether it beats every one on both measures (`beats_baselines`, `lost_to`).
    #[arg(long)]
    json: bool,
}

/// What a row of `eval compaction` measured: the job and the format.
#[derive(Clone, Serialize)]
struct RowKey {
    method: String,
    head_budgets: String,
    selection: String,
    fitted_to_kv: bool,
    /// `--refit-values`: the values were refitted to their stored form too.
    refit_values: bool,
    ratio: f64,
    kv: String,
    tokens_per_head: usize,
}

#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    key: RowKey,
    tokens_kept: usize,
    ppl: f64,
    gap_recovered: f64,
    recall_ppl: f64,
    recall_gap_recovered: f64,
    kv_bytes: u64,
    kv_bytes_f16_full: u64,
    seconds: f64,
    prefill_seconds: f64,
    /// `--preset adaptive`: what the choice measured and kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    adaptive: Option<Choice>,
    /// One of kvpack's methods: whether it keeps more than every baseline row (H2O, SnapKV,
    /// StreamingLLM) at the same ratio and cache format on both measures ([`judge_rows`]);
    /// absent for the baselines and where no baseline ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    beats_baselines: Option<bool>,
    /// The baselines that keep at least as much of a measure, as "h2o: recall".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    lost_to: Vec<String>,
}

/// Whether a row is one of the eviction baselines (H2O, SnapKV, StreamingLLM).
fn is_baseline(key: &RowKey) -> bool {
    key.method
        .parse::<Method>()
        .is_ok_and(|m| !m.is_attention_matching())
}

/// Judge each of kvpack's rows against the baseline rows of the same text at the same ratio and
/// cache format: it beats them where its gap is higher than each baseline's on the continuation
/// and on the recall; a tie is a loss. Rows with no baseline beside them are not judged.
fn judge_rows(rows: &mut [Row]) {
    for i in 0..rows.len() {
        if is_baseline(&rows[i].key) {
            continue;
        }
        let (key, gap, recall) = (
            &rows[i].key,
            rows[i].gap_recovered,
            rows[i].recall_gap_recovered,
        );
        let peers: Vec<&Row> = rows
            .iter()
            .filter(|b| is_baseline(&b.key) && b.key.ratio == key.ratio && b.key.kv == key.kv)
            .collect();
        if peers.is_empty() {
            continue;
        }
        let mut lost_to = Vec::new();
        for b in peers {
            if b.gap_recovered >= gap {
                lost_to.push(format!("{}: continuation", b.key.method));
            }
            if b.recall_gap_recovered >= recall {
                lost_to.push(format!("{}: recall", b.key.method));
            }
        }
        rows[i].beats_baselines = Some(lost_to.is_empty());
        rows[i].lost_to = lost_to;
    }
}

/// What [`compact_tokens`] produced.
pub struct CompactionRun {
    /// The context's keys, values and queries.
    pub captured: Captured,
    /// One compacted context per job.
    pub compacted: Vec<CompactedContext>,
    /// Where the compaction time went.
    pub timings: CompactTimings,
    /// Seconds of the context's prefill.
    pub prefill_s: f64,
    /// Seconds of the reference-query prefill (0 without Attention Matching).
    pub repeat_s: f64,
    /// Per job, what `--preset adaptive` measured and kept (`None`: the job's own setting).
    pub choices: Vec<Option<Choice>>,
}

/// What `--preset adaptive` measured for one job, on the context itself: each setting's
/// perplexities on the held-back tail and on the re-read head, and the one kept.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    /// The setting kept.
    pub chosen: &'static str,
    /// Tokens held back at the end.
    pub holdout: usize,
    /// Tokens read again from the start.
    pub reread: usize,
    /// One per setting, in the order tried.
    pub trials: Vec<Trial>,
    /// Seconds the choice took: the shared scores, the settings' fits and their measurements.
    pub seconds: f64,
}

/// One setting's perplexities after it compacted the context less its held-back tail: of that
/// tail (`ppl`: what comes next) and of the context's head read again (`recall_ppl`: what it
/// still holds).
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub setting: &'static str,
    pub ppl: f64,
    pub recall_ppl: f64,
}

impl Choice {
    /// `chosen (…: setting ppl/recall ppl, …)` for logs.
    pub fn summary(&self) -> String {
        let trials: Vec<String> = self
            .trials
            .iter()
            .map(|t| format!("{} {:.3}/{:.3}", t.setting, t.ppl, t.recall_ppl))
            .collect();
        format!(
            "{} (perplexity of the last {} context tokens / of the first {} read again: {}; {:.1} s)",
            self.chosen,
            self.holdout,
            self.reread,
            trials.join(", "),
            self.seconds,
        )
    }
}

/// Read `context` with an f32 cache, recording keys, values and queries; when a job needs them,
/// read the repeat prompt and the context again for the reference queries; then compact for
/// every job `(method, tokens per head)`. With `candidates` (`--preset adaptive`), each job
/// that fits the context's own queries takes the setting [`choose_settings`] picks.
#[allow(clippy::too_many_arguments)]
pub fn compact_tokens(
    gpu: &Gpu,
    loaded: &Loaded,
    context: &[u32],
    jobs: &[Job],
    candidates: &[Candidate],
    reference_positions: usize,
    sinks: usize,
    fit: &FitOptions,
    log: &dyn Fn(&str),
) -> Result<CompactionRun> {
    let model = &loaded.model;
    let c = &model.config;
    let repeat: Vec<u32> = loaded
        .tokenizer
        .encode_with(
            REPEAT_PROMPT,
            EncodeOptions {
                parse_special: false,
                add_special: false,
            },
        )
        .into_iter()
        .chain(context.iter().copied())
        .collect();
    log(&format!("prefill of {} context tokens", context.len()));
    let t = Instant::now();
    let f32_fmt: KvFormat = "f32".parse()?;
    let mut session = Session::new(
        gpu,
        model,
        &KvRecipe::plain(f32_fmt, sinks),
        context.len() + repeat.len(),
    )?;
    session.start_capture(gpu, true);
    pollster::block_on(session.forward(gpu, context, Logits::Last))?;
    let mut captured = session.take_capture().expect("capture started");
    let prefill_s = t.elapsed().as_secs_f64();
    let needs_ref = jobs.iter().any(|j| j.method.needs_reference_queries());
    let mut repeat_s = 0.0;
    let reference = if needs_ref {
        log("reference queries: repeat-the-context prefill");
        let t = Instant::now();
        session.start_capture(gpu, false);
        pollster::block_on(session.forward(gpu, &repeat, Logits::Last))?;
        repeat_s = t.elapsed().as_secs_f64();
        session.take_capture()
    } else {
        None
    };
    drop(session);
    let shape = ContextShape {
        n_layer: c.n_layer,
        n_head: c.n_head,
        n_kv_heads: c.n_head_kv,
        head_dim: c.head_dim,
    };
    let choices = choose_settings(
        gpu,
        model,
        shape,
        &mut captured,
        context,
        jobs,
        candidates,
        sinks,
    )?;
    let mut jobs = jobs.to_vec();
    for (job, choice) in jobs.iter_mut().zip(&choices) {
        if let Some(ch) = choice {
            let c = candidates
                .iter()
                .find(|c| c.name == ch.chosen)
                .expect("a tried setting");
            (job.selection, job.fit) = (c.selection, Some(c.fit));
            log(&format!(
                "{} {} per head: {}",
                job.method,
                job.budget,
                ch.summary()
            ));
        }
    }
    log(&format!("compacting: {} jobs", jobs.len()));
    let (compacted, timings) = pollster::block_on(compact_context(
        gpu,
        shape,
        &captured,
        reference.as_ref(),
        &jobs,
        reference_positions,
        fit,
    ))?;
    Ok(CompactionRun {
        captured,
        compacted,
        timings,
        prefill_s,
        repeat_s,
        choices,
    })
}

/// `--preset adaptive`: for every job whose method fits the context's own queries (am-ctx,
/// am-ctx-window), compact the context less its last [`adaptive_holdout`] tokens with each
/// candidate setting (the job's budgets scaled to the shorter context; one pass over the
/// scores for all), then measure, after each result, the perplexity of the held-back tokens
/// (what comes next) and of the context's first [`adaptive_reread`] tokens read again (what
/// it still holds), and keep the setting [`pick_setting`] picks. Only the context is read:
/// nothing after it. The settings are compared with each other, so no reference read (no
/// context, the whole shorter context) is needed.
#[allow(clippy::too_many_arguments)]
fn choose_settings(
    gpu: &Gpu,
    model: &Llama,
    shape: ContextShape,
    captured: &mut Captured,
    context: &[u32],
    jobs: &[Job],
    candidates: &[Candidate],
    sinks: usize,
) -> Result<Vec<Option<Choice>>> {
    let t = captured.tokens;
    let (holdout, reread) = (adaptive_holdout(t), adaptive_reread(t));
    let open: Vec<usize> = (0..jobs.len())
        .filter(|&j| {
            let m = jobs[j].method;
            m.fits_context_queries() && !m.needs_reference_queries()
        })
        .collect();
    let mut choices = vec![None; jobs.len()];
    if candidates.is_empty() || open.is_empty() {
        return Ok(choices);
    }
    if holdout < 2 {
        bail!("--preset adaptive needs a context of at least 16 tokens, got {t}");
    }
    let tp = t - holdout;
    let scale = |b: usize| ((b as f64 * tp as f64 / t as f64).round() as usize).clamp(1, tp);
    let trial_jobs: Vec<Job> = open
        .iter()
        .flat_map(|&j| {
            candidates.iter().map(move |c| Job {
                budget: scale(jobs[j].budget),
                head_budgets: match &jobs[j].head_budgets {
                    HeadBudgets::PerLayer(b) => {
                        HeadBudgets::PerLayer(b.iter().map(|&x| scale(x)).collect())
                    }
                    h => h.clone(),
                },
                selection: c.selection,
                fit: Some(c.fit),
                ..jobs[j].clone()
            })
        })
        .collect();
    // The prefix is the recording's first `tp` positions: the same buffers, no copy.
    captured.tokens = tp;
    let trials = pollster::block_on(compact_context(
        gpu,
        shape,
        captured,
        None,
        &trial_jobs,
        0,
        &FitOptions::default(),
    ));
    captured.tokens = t;
    let (trials, timings) = trials?;
    let (tail, head) = (&context[tp..t], &context[..reread]);
    let recipe = KvRecipe::plain("f32".parse()?, sinks);
    for (i, &j) in open.iter().enumerate() {
        let clock = Instant::now();
        let mut tried = Vec::with_capacity(candidates.len());
        for (k, c) in candidates.iter().enumerate() {
            let m = measure(
                gpu,
                model,
                &recipe,
                Some(&trials[i * candidates.len() + k]),
                tail,
                head,
            )?;
            tried.push(Trial {
                setting: c.name,
                ppl: m.ppl,
                recall_ppl: m.recall,
            });
        }
        let best = pick_setting(&tried);
        let fits: f64 = timings.fit_s[i * candidates.len()..(i + 1) * candidates.len()]
            .iter()
            .sum();
        choices[j] = Some(Choice {
            chosen: candidates[best].name,
            holdout,
            reread,
            trials: tried,
            seconds: timings.context_scores_s + fits + clock.elapsed().as_secs_f64(),
        });
    }
    Ok(choices)
}

/// The setting `--preset adaptive` keeps: the first (the default) unless another gives a lower
/// perplexity on both, the held-back tokens' and the re-read's; of several that do, the one
/// with the lower product of the two. A setting better on one measure and worse on the other
/// does not replace the default: the prefix's measures are estimates, and the default is the
/// measured one.
fn pick_setting(tried: &[Trial]) -> usize {
    let score = |t: &Trial| t.ppl.ln() + t.recall_ppl.ln();
    (1..tried.len())
        .filter(|&k| tried[k].ppl < tried[0].ppl && tried[k].recall_ppl < tried[0].recall_ppl)
        .min_by(|&a, &b| {
            score(&tried[a])
                .total_cmp(&score(&tried[b]))
                .then(a.cmp(&b))
        })
        .unwrap_or(0)
}

/// The share of the perplexity gap between no context (`none`) and the whole context (`full`)
/// that `x` recovers: 1 is the whole context's, 0 no context's (0 when the two are equal).
fn gap_recovered(none: f64, full: f64, x: f64) -> f64 {
    if none != full {
        (none - x) / (none - full)
    } else {
        0.0
    }
}

/// Perplexity of `tokens[1..]` given `tokens[..n-1]`, fed into `session`.
fn ppl(gpu: &Gpu, session: &mut Session<'_>, tokens: &[u32]) -> Result<f64> {
    let logits = pollster::block_on(session.forward(gpu, tokens, Logits::All))?;
    let v = logits.len() / tokens.len();
    let mut nll = 0.0;
    for i in 0..tokens.len() - 1 {
        let row = &logits[i * v..(i + 1) * v];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        nll += lse - row[tokens[i + 1] as usize] as f64;
    }
    Ok((nll / (tokens.len() - 1) as f64).exp())
}

#[derive(Clone, Copy)]
struct Measured {
    ppl: f64,
    recall: f64,
    kv_bytes: u64,
}

/// Continuation and recall perplexity after `compacted` stored in `kv` (two fresh sessions: the
/// cache cannot be rewound).
fn measure(
    gpu: &Gpu,
    model: &Llama,
    recipe: &KvRecipe,
    compacted: Option<&CompactedContext>,
    continuation: &[u32],
    recall: &[u32],
) -> Result<Measured> {
    let extra = continuation.len().max(recall.len());
    let open = || -> Result<Session<'_>> {
        Ok(match compacted {
            Some(c) => Session::from_compacted(gpu, model, recipe, c, extra)?,
            None => Session::new(gpu, model, recipe, extra)?,
        })
    };
    let mut s = open()?;
    let kv_bytes = s.cache().bytes();
    let p = ppl(gpu, &mut s, continuation)?;
    drop(s);
    let mut s = open()?;
    let r = ppl(gpu, &mut s, recall)?;
    Ok(Measured {
        ppl: p,
        recall: r,
        kv_bytes,
    })
}

/// One job of `eval compaction` with the formats its result is measured in: (job, ratio,
/// (label, recipe) per format).
type EvalJob = (Job, f64, Vec<(String, KvRecipe)>);

impl CompactionArgs {
    /// --methods, or the preset's, or the default list.
    fn methods(&self) -> Result<Vec<Method>> {
        let names: Vec<String> = match (&self.methods, self.fit.recommended()) {
            (Some(m), _) => m.clone(),
            (None, true) => PRESET_METHODS.split(',').map(String::from).collect(),
            (None, false) => "am,am-mix,h2o,snapkv,streaming"
                .split(',')
                .map(String::from)
                .collect(),
        };
        Ok(names.iter().map(|s| s.parse()).collect::<Result<_, _>>()?)
    }

    /// --head-budgets, or the preset's (profile; uniform when `have_profile` is false: the
    /// shipped profile is for another model), or uniform.
    fn head_budgets(&self, have_profile: bool) -> Vec<BudgetArg> {
        match (&self.head_budgets, self.fit.recommended()) {
            (Some(b), _) => b.clone(),
            (None, true) if have_profile => vec![BudgetArg::Profile],
            _ => vec![BudgetArg::Uniform],
        }
    }

    /// --selection, or the preset's, or highest.
    fn selections(&self) -> Vec<SelectionArg> {
        match (&self.selection, self.fit.recommended()) {
            (Some(s), _) => s.clone(),
            (None, true) => vec![PRESET_SELECTION],
            (None, false) => vec![SelectionArg::Highest],
        }
    }
}

pub fn run(gpu_args: &GpuArgs, a: CompactionArgs) -> Result<()> {
    let methods = a.methods()?;
    let formats: Vec<(String, KvRecipe)> =
        a.kv.iter()
            .map(|s| compacted_recipe(s, a.sinks))
            .collect::<Result<_, _>>()?;
    if a.ratios.iter().any(|&r| r.is_nan() || r < 1.0) {
        bail!("--ratios must be at least 1, got {:?}", a.ratios);
    }
    if a.continuation < 2 || a.recall < 2 || a.recall > a.context {
        bail!("--continuation and --recall need at least 2 tokens, and --recall at most --context");
    }
    let requested = a.head_budgets(true);
    let profile = profile_for(
        &requested,
        a.layer_profile.as_deref(),
        a.fit.recommended() && requested.contains(&BudgetArg::Profile),
    )?;
    // Every text read before any work: a missing file fails now, not after an hour.
    let texts: Vec<String> = a
        .text
        .iter()
        .map(|p| super::read_eval_text(p))
        .collect::<Result<_>>()?;
    let gpu = gpu_args.open()?;
    let loaded = a.model.load(&gpu, a.json)?;
    let c = &loaded.model.config;
    for (_, f) in &formats {
        f.validate_dim(c.head_dim)?;
    }
    let profile = checked_profile(profile, &loaded.path, c.n_layer, a.json)?;
    let opts = EncodeOptions {
        parse_special: false,
        add_special: true,
    };
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| loaded.tokenizer.encode_with(t, opts))
        .collect();
    for (path, ids) in a.text.iter().zip(&ids) {
        if ids.len() < a.context + a.continuation {
            bail!(
                "{} has {} tokens; --context {} + --continuation {} are needed",
                path.display(),
                ids.len(),
                a.context,
                a.continuation
            );
        }
    }
    let jobs = eval_jobs(&a, &methods, &formats, profile.as_ref())?;
    for (job, r, _) in &jobs {
        if let (HeadBudgets::PerLayer(b), false) = (&job.head_budgets, a.json) {
            eprintln!(
                "{} {r}x, tokens per head by layer (profile): {b:?}",
                job.method
            );
        }
    }
    let mut reports = Vec::new();
    for (path, ids) in a.text.iter().zip(&ids) {
        let report = evaluate_text(&gpu, &loaded, &a, &jobs, path, ids)?;
        if !a.json {
            print_report(&gpu, &loaded, &a, &report);
        }
        reports.push(report);
    }
    let means = (reports.len() > 1).then(|| mean_rows(&reports));
    if a.json {
        let mut objects: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| report_json(&gpu, &loaded, &a, r))
            .collect();
        let j = match means {
            // One text: the report alone, as scripts have always read it.
            None => objects.remove(0),
            Some(means) => serde_json::json!({ "texts": objects, "mean_rows": means }),
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else if let Some(means) = means {
        let w = means
            .iter()
            .map(|r| r.key.kv.len())
            .max()
            .unwrap_or(0)
            .max(8);
        println!();
        println!(
            "mean over {} texts (gap recovered; lowest of the texts in brackets)",
            reports.len()
        );
        println!(
            "{:<14} {:<11} {:<11} {:>6} {:<w$} {:>15} {:>15} {:>10}  texts where it beats every baseline on both",
            "method", "heads", "keys", "ratio", "kv", "gap", "recall gap", "KV bytes"
        );
        for r in &means {
            let won = r
                .texts_beating_baselines
                .map_or(String::new(), |n| format!("{n} of {}", r.texts));
            println!(
                "{:<14} {:<11} {:<11} {:>6} {:<w$} {:>6.3} ({:>6.3}) {:>6.3} ({:>6.3}) {:>10}  {won}",
                r.key.method,
                r.key.head_budgets,
                r.key.selection,
                r.key.ratio,
                r.key.kv,
                r.gap_recovered,
                r.min_gap_recovered,
                r.recall_gap_recovered,
                r.min_recall_gap_recovered,
                r.kv_bytes
            );
        }
    }
    Ok(())
}

/// The compaction jobs of `eval compaction`: every method, ratio, head-budget mode and key
/// selection; with --fit-to-kv one job per format for Attention Matching.
fn eval_jobs(
    a: &CompactionArgs,
    methods: &[Method],
    formats: &[(String, KvRecipe)],
    profile: Option<&LayerProfile>,
) -> Result<Vec<EvalJob>> {
    let mut jobs = Vec::new();
    let head_budgets = a.head_budgets(profile.is_some());
    let selections = a.selections();
    for &m in methods {
        for &r in &a.ratios {
            let budget = ((a.context as f64 / r).round() as usize).max(1);
            // The baselines keep the same tokens in every head and pick them their own way:
            // one uniform row each, whatever --head-budgets lists.
            let budget_args = if m.is_attention_matching() {
                &head_budgets[..]
            } else {
                &[BudgetArg::Uniform][..]
            };
            for &hb in budget_args {
                let selections = if m.is_attention_matching() {
                    &selections[..]
                } else {
                    &[SelectionArg::Highest][..]
                };
                for &sel in selections {
                    let job = Job {
                        method: m,
                        budget,
                        head_budgets: hb.budgets(profile, budget, a.context)?,
                        selection: sel.into(),
                        fit_for: None,
                        fit: None,
                    };
                    if a.fit_to_kv && m.is_attention_matching() {
                        for f in formats {
                            let fit_for = Some(FitFor {
                                values: a.refit_values,
                                ..FitFor::recipe(&f.1)
                            });
                            let job = Job {
                                fit_for,
                                ..job.clone()
                            };
                            jobs.push((job, r, vec![f.clone()]));
                        }
                    } else {
                        jobs.push((job, r, formats.to_vec()));
                    }
                }
            }
        }
    }
    Ok(jobs)
}

/// The first `n` tokens of `captured` kept as they are, every layer and KV head: the full-context
/// reference as a [`CompactedContext`].
pub fn full_context(
    captured: &Captured,
    c: &kvpack::model::LlamaConfig,
    n: usize,
) -> CompactedContext {
    let idx: Vec<usize> = (0..n).collect();
    let layers = (0..c.n_layer)
        .map(|l| {
            (0..c.n_head_kv)
                .map(|h| {
                    let gather = |x: &[f32]| -> Vec<f32> {
                        (0..n)
                            .flat_map(|p| &x[(p * c.n_head_kv + h) * c.head_dim..][..c.head_dim])
                            .copied()
                            .collect()
                    };
                    let (k, v) = (gather(&captured.k[l]), gather(&captured.v[l]));
                    HeadCompaction::keep(&k, &v, c.head_dim, &idx)
                })
                .collect()
        })
        .collect();
    CompactedContext {
        context_len: n,
        head_dim: c.head_dim,
        layers,
    }
}

/// What `eval compaction` measured on one text.
struct TextReport {
    text: String,
    full: Measured,
    none: Measured,
    prefill_s: f64,
    repeat_s: f64,
    timings: CompactTimings,
    rows: Vec<Row>,
}

/// Prefill, compact and measure one text (`ids`, at least context + continuation tokens).
fn evaluate_text(
    gpu: &Gpu,
    loaded: &Loaded,
    a: &CompactionArgs,
    jobs: &[EvalJob],
    path: &std::path::Path,
    ids: &[u32],
) -> Result<TextReport> {
    let model = &loaded.model;
    let c = &model.config;
    let context = &ids[..a.context];
    let continuation = &ids[a.context..a.context + a.continuation];
    let recall = &ids[..a.recall];
    let log = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    log(&format!("{}:", path.display()));
    let f32_fmt: KvFormat = "f32".parse()?;
    let job_list: Vec<Job> = jobs.iter().map(|(j, _, _)| j.clone()).collect();
    let fit = a.fit.options();
    let candidates = a
        .fit
        .candidates(a.selection.as_ref().and_then(|s| s.first().copied()));
    let run = compact_tokens(
        gpu,
        loaded,
        context,
        &job_list,
        &candidates,
        a.reference_positions,
        a.sinks,
        &fit,
        &log,
    )?;
    let (captured, compacted, timings) = (&run.captured, &run.compacted, &run.timings);
    let (prefill_s, repeat_s) = (run.prefill_s, run.repeat_s);

    // References: the whole context kept, and no context at all.
    let full = full_context(captured, c, a.context);
    let f32_recipe = KvRecipe::plain(f32_fmt, a.sinks);
    log("measuring: full context");
    let m_full = measure(gpu, model, &f32_recipe, Some(&full), continuation, recall)?;
    log("measuring: no context");
    let m_none = measure(gpu, model, &f32_recipe, None, continuation, recall)?;
    let kv_bytes_f16_full = c.kv_bytes_f16(a.context);
    let mut rows = Vec::new();
    for (j, (job, r, measured)) in jobs.iter().enumerate() {
        let r = *r;
        let (m, budget) = (job.method, job.budget);
        let scores_s = match m {
            m if m.mixes_references() => {
                repeat_s + timings.reference_scores_s + timings.context_scores_s
            }
            m if m.needs_reference_queries() => repeat_s + timings.reference_scores_s,
            Method::Streaming => 0.0,
            // With H2O in the same run, SnapKV's scores are H2O's, over every position.
            _ => timings.context_scores_s,
        };
        for (label, f) in measured {
            log(&format!("measuring: {m} {r}x {label}"));
            let got = measure(gpu, model, f, Some(&compacted[j]), continuation, recall)?;
            let choice = &run.choices[j];
            rows.push(Row {
                key: RowKey {
                    method: m.to_string(),
                    head_budgets: job.head_budgets.name().into(),
                    selection: match choice {
                        Some(_) => "adaptive".into(),
                        None if m.is_attention_matching() => job.selection.to_string(),
                        None => "-".into(),
                    },
                    fitted_to_kv: job.fit_for.is_some(),
                    refit_values: job.fit_for.is_some_and(|f| f.values),
                    ratio: r,
                    kv: label.clone(),
                    tokens_per_head: budget,
                },
                tokens_kept: compacted[j].total_tokens(),
                ppl: got.ppl,
                gap_recovered: gap_recovered(m_none.ppl, m_full.ppl, got.ppl),
                recall_ppl: got.recall,
                recall_gap_recovered: gap_recovered(m_none.recall, m_full.recall, got.recall),
                kv_bytes: got.kv_bytes,
                kv_bytes_f16_full,
                seconds: scores_s + timings.fit_s[j] + choice.as_ref().map_or(0.0, |c| c.seconds),
                prefill_seconds: prefill_s,
                adaptive: choice.clone(),
                beats_baselines: None,
                lost_to: Vec::new(),
            });
        }
    }
    judge_rows(&mut rows);
    Ok(TextReport {
        text: path.display().to_string(),
        full: m_full,
        none: m_none,
        prefill_s,
        repeat_s,
        timings: run.timings,
        rows,
    })
}

fn report_json(
    gpu: &Gpu,
    loaded: &Loaded,
    a: &CompactionArgs,
    r: &TextReport,
) -> serde_json::Value {
    serde_json::json!({
        "backend": gpu.backend_name(), "model": loaded.name,
        "text": r.text,
        "context": a.context, "continuation": a.continuation, "recall": a.recall,
        "ppl_full": r.full.ppl, "ppl_none": r.none.ppl,
        "recall_ppl_full": r.full.recall, "recall_ppl_none": r.none.recall,
        "kv_bytes_full_f32": r.full.kv_bytes,
        "prefill_seconds": r.prefill_s,
        "repeat_prefill_seconds": r.repeat_s,
        "reference_scores_seconds": r.timings.reference_scores_s,
        "context_scores_seconds": r.timings.context_scores_s,
        "fit_seconds": r.timings.fit_s,
        "rows": r.rows,
    })
}

fn print_report(gpu: &Gpu, loaded: &Loaded, a: &CompactionArgs, r: &TextReport) {
    let timings = &r.timings;
    println!(
        "{} on {} ({}): {} context tokens of {}, {} continuation, {} recall",
        loaded.name,
        gpu.report().name,
        gpu.backend_name(),
        a.context,
        r.text,
        a.continuation,
        a.recall
    );
    println!(
        "full context: ppl {:.3}, recall ppl {:.3}; no context: ppl {:.3}, recall ppl {:.3}; prefill {:.1} s",
        r.full.ppl, r.full.recall, r.none.ppl, r.none.recall, r.prefill_s
    );
    println!(
        "compaction time: repeat prefill {:.1} s, reference scores {:.1} s, context scores {:.1} s, fits {} s",
        r.repeat_s,
        timings.reference_scores_s,
        timings.context_scores_s,
        timings
            .fit_s
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join("/")
    );
    let w = r
        .rows
        .iter()
        .map(|r| r.key.kv.len())
        .max()
        .unwrap_or(0)
        .max(8);
    println!(
        "{:<14} {:<11} {:<11} {:>6} {:<w$} {:>9} {:>6} {:>9} {:>6} {:>10} {:>8}  against the baselines",
        "method",
        "heads",
        "keys",
        "ratio",
        "kv",
        "ppl",
        "gap",
        "recall",
        "gap",
        "KV bytes",
        "seconds"
    );
    for r in &r.rows {
        let verdict = match r.beats_baselines {
            Some(true) => "beats every one on both".to_string(),
            Some(false) => format!("as good or better: {}", r.lost_to.join(", ")),
            None => String::new(),
        };
        println!(
            "{:<14} {:<11} {:<11} {:>6} {:<w$} {:>9.3} {:>6.3} {:>9.3} {:>6.3} {:>10} {:>8.1}  {verdict}",
            r.key.method,
            r.key.head_budgets,
            r.key.selection,
            r.key.ratio,
            r.key.kv,
            r.ppl,
            r.gap_recovered,
            r.recall_ppl,
            r.recall_gap_recovered,
            r.kv_bytes,
            r.seconds
        );
    }
    for r in &r.rows {
        if let Some(c) = &r.adaptive {
            println!(
                "{} {}x adaptive: {}",
                r.key.method,
                r.key.ratio,
                c.summary()
            );
        }
    }
}

/// One row of the mean over texts: the rows at the same place in every text's report (the same
/// job and format), their gaps averaged, the lowest beside them.
#[derive(Serialize)]
struct MeanRow {
    #[serde(flatten)]
    key: RowKey,
    gap_recovered: f64,
    min_gap_recovered: f64,
    recall_gap_recovered: f64,
    min_recall_gap_recovered: f64,
    kv_bytes: u64,
    kv_bytes_f16_full: u64,
    texts: usize,
    /// One of kvpack's methods judged in every text: in how many it beats every baseline on
    /// both measures ([`judge_rows`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    texts_beating_baselines: Option<usize>,
}

fn mean_rows(reports: &[TextReport]) -> Vec<MeanRow> {
    let n = reports.len() as f64;
    (0..reports[0].rows.len())
        .map(|i| {
            let rows: Vec<&Row> = reports.iter().map(|r| &r.rows[i]).collect();
            let mean = |f: fn(&Row) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / n;
            let min = |f: fn(&Row) -> f64| rows.iter().map(|r| f(r)).fold(f64::INFINITY, f64::min);
            let r0 = rows[0];
            MeanRow {
                key: r0.key.clone(),
                gap_recovered: mean(|r| r.gap_recovered),
                min_gap_recovered: min(|r| r.gap_recovered),
                recall_gap_recovered: mean(|r| r.recall_gap_recovered),
                min_recall_gap_recovered: min(|r| r.recall_gap_recovered),
                kv_bytes: rows.iter().map(|r| r.kv_bytes).max().unwrap_or(0),
                kv_bytes_f16_full: r0.kv_bytes_f16_full,
                texts: rows.len(),
                texts_beating_baselines: rows
                    .iter()
                    .map(|r| r.beats_baselines.map(usize::from))
                    .sum::<Option<usize>>(),
            }
        })
        .collect()
}

#[derive(Args)]
pub struct CompactArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file whose first --context tokens are compacted.
    #[arg(long)]
    text: PathBuf,
    /// Tokens of the text to compact (fewer when the text is shorter).
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Compaction ratio: tokens per head kept = context / ratio.
    #[arg(long)]
    ratio: f64,
    /// Method: am, am-window, am-mix, am-mix-window, am-ctx, am-ctx-window, h2o, snapkv,
    /// streaming [default: am; recommended: am-ctx-window].
    #[arg(long)]
    method: Option<String>,
    #[command(flatten)]
    fit: FitArgs,
    /// How Attention Matching shares the tokens among heads: uniform, sensitivity (by the fit's
    /// error) or profile (by the layers' measured loss sensitivity, from --layer-profile)
    /// [default: uniform; recommended: profile].
    #[arg(long, value_enum)]
    head_budgets: Option<BudgetArg>,
    /// A layer profile of the model (`kvpack eval layers --out FILE`) for `--head-budgets
    /// profile`.
    #[arg(long, value_name = "FILE")]
    layer_profile: Option<PathBuf>,
    /// How Attention Matching picks its keys: highest (HighestAttnKeys), omp (orthogonal
    /// matching pursuit on the attention mass; slower), accumulated (H2O's heavy hitters) or
    /// observation (SnapKV's: what the last 32 positions attend to, pooled; for am-ctx and
    /// am-ctx-window) [default: highest; recommended: accumulated].
    #[arg(long, value_enum)]
    selection: Option<SelectionArg>,
    /// Attention Matching fits β and the values to the keys as --kv stores them (quantized;
    /// its f16 sinks in f16), as the file holds them.
    #[arg(long)]
    fit_to_kv: bool,
    /// With --fit-to-kv, also refit the values to --kv's value codec: each kept value is
    /// quantized in turn and the values not yet quantized take up the error it leaves in the
    /// fitted attention outputs (GPTQ's error feedback, over tokens). The file stores the
    /// refitted values as --kv's codes.
    #[arg(long, requires = "fit_to_kv")]
    refit_values: bool,
    /// KV format of the compacted tokens: a format (with 4 f16 sinks), or a recipe with sinks,
    /// a window and edge layers such as `turbo4u+s2+r14+e1` (not centered keys). The file holds
    /// the tokens as this cache stores them (its codes and scales), so it is about the size of
    /// the cache, and `generate --cache` loads the same codes on every backend.
    #[arg(long, default_value = "f32")]
    kv: String,
    /// Reference-query positions per KV head (Attention Matching).
    #[arg(long, default_value_t = 1024)]
    reference_positions: usize,
    /// The output file (.kvpack).
    #[arg(long)]
    out: PathBuf,
}

/// `kvpack compact`: compact a text's context and save it as a `.kvpack` file.
pub fn run_compact(gpu_args: &GpuArgs, a: CompactArgs) -> Result<()> {
    let recommended = a.fit.recommended();
    let method: Method = match &a.method {
        Some(m) => m.parse()?,
        None if recommended => PRESET_METHOD.parse()?,
        None => Method::Am,
    };
    let head_budgets = |have_profile: bool| match a.head_budgets {
        Some(b) => b,
        None if recommended && have_profile => BudgetArg::Profile,
        None => BudgetArg::Uniform,
    };
    let selection = a.selection.unwrap_or(if recommended {
        PRESET_SELECTION
    } else {
        SelectionArg::Highest
    });
    let (kv_label, kv) = compacted_recipe(&a.kv, 4)?;
    if a.ratio.is_nan() || a.ratio < 1.0 {
        bail!("--ratio must be at least 1, got {}", a.ratio);
    }
    let requested = head_budgets(true);
    let profile = profile_for(
        &[requested],
        a.layer_profile.as_deref(),
        recommended && requested == BudgetArg::Profile,
    )?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let gpu = gpu_args.open()?;
    let loaded = a.model.load(&gpu, false)?;
    kv.validate_dim(loaded.model.config.head_dim)?;
    let profile = checked_profile(profile, &loaded.path, loaded.model.config.n_layer, false)?;
    let ids = loaded.tokenizer.encode_with(
        &text,
        EncodeOptions {
            parse_special: false,
            add_special: true,
        },
    );
    let context = &ids[..a.context.min(ids.len())];
    if context.is_empty() {
        bail!("{} encodes to no tokens", a.text.display());
    }
    let budget = ((context.len() as f64 / a.ratio).round() as usize).max(1);
    let t = Instant::now();
    let candidates = a.fit.candidates(a.selection);
    let run = compact_tokens(
        &gpu,
        &loaded,
        context,
        &[Job {
            method,
            budget,
            head_budgets: head_budgets(profile.is_some()).budgets(
                profile.as_ref(),
                budget,
                context.len(),
            )?,
            selection: selection.into(),
            fit_for: a.fit_to_kv.then_some(FitFor {
                values: a.refit_values,
                ..FitFor::recipe(&kv)
            }),
            fit: None,
        }],
        &candidates,
        a.reference_positions,
        4,
        &a.fit.options(),
        &|m| eprintln!("{m}"),
    )?;
    let sha = kvpack::model::fetch::sha256_file(&loaded.path)
        .with_context(|| format!("hashing {}", loaded.path.display()))?;
    // The file holds the tokens as this recipe's cache stores them: load them into a session's
    // cache (the same encode as any session's), read the codes back.
    let compacted = &run.compacted[0];
    let session = Session::from_compacted(&gpu, &loaded.model, &kv, compacted, 1)?;
    let stored = pollster::block_on(StoredContext::store(&gpu, session.cache(), compacted))?;
    let header = kvpack::compact::file::FileHeader {
        model_sha256: sha,
        kv: kv.explicit(),
        method: method.to_string(),
    };
    kvpack::compact::file::save(&a.out, &header, &SavedContext::Stored(stored))?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    let kv_bytes = session.cache().bytes();
    let f16_bytes = loaded.model.config.kv_bytes_f16(context.len());
    let setting = match &run.choices[0] {
        Some(c) => format!(", setting {}", c.chosen),
        None => String::new(),
    };
    println!(
        "{}: {} context tokens → {budget} per KV head ({method}{setting}, {:.1}x); prefill {:.1} s, compaction {:.1} s; KV cache {kv_bytes} bytes in {kv_label} against {f16_bytes} for the f16 cache of the whole context ({:.1}x fewer); file {bytes} bytes",
        a.out.display(),
        context.len(),
        context.len() as f64 / budget as f64,
        run.prefill_s,
        t.elapsed().as_secs_f64() - run.prefill_s,
        f16_bytes as f64 / kv_bytes.max(1) as f64,
    );
    Ok(())
}

/// `--kv` of the compaction commands: a format (with `sinks` f16 sinks) or a recipe, refused
/// before any work when it has a part a compacted cache cannot take. With its label: a plain
/// format stays plain (`generate --cache` applies its own --sinks to a file's plain format), a
/// recipe is written out in full.
fn compacted_recipe(s: &str, sinks: usize) -> Result<(String, KvRecipe)> {
    let r = KvRecipe::parse_with(s, sinks, 0)?;
    if r.center_keys {
        bail!(
            "--kv {s}: a compacted cache takes sinks, a recent window and edge layers (such as turbo4u+s2+r14+e1), not centered keys (+c)"
        );
    }
    let label = if s.contains('+') {
        r.to_string()
    } else {
        r.format.to_string()
    };
    Ok((label, r))
}

/// A finite ridge ≥ 0.
fn parse_ridge(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("{x} is not a finite number ≥ 0"))
    }
}

/// `--max-bias`: a number in [0, BIAS_LIMIT].
fn parse_max_bias(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    let limit = kvpack::compact::BIAS_LIMIT;
    if (0.0..=limit).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{x} is not between 0 and {limit}"))
    }
}

/// A fraction in [0, 1].
fn parse_fraction(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{x} is not between 0 and 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kv: &str, gap: f64, recall_gap: f64) -> Row {
        Row {
            key: RowKey {
                method: "h2o".into(),
                head_budgets: "uniform".into(),
                selection: "-".into(),
                fitted_to_kv: false,
                refit_values: false,
                ratio: 10.0,
                kv: kv.into(),
                tokens_per_head: 102,
            },
            tokens_kept: 9180,
            ppl: 20.0,
            gap_recovered: gap,
            recall_ppl: 30.0,
            recall_gap_recovered: recall_gap,
            kv_bytes: 1000,
            kv_bytes_f16_full: 10_000,
            seconds: 1.0,
            prefill_seconds: 2.0,
            adaptive: None,
            beats_baselines: None,
            lost_to: Vec::new(),
        }
    }

    fn judged(method: &str, ratio: f64, gap: f64, recall_gap: f64) -> Row {
        let mut r = row("f32", gap, recall_gap);
        r.key.method = method.into();
        r.key.ratio = ratio;
        r
    }

    #[test]
    fn kvpack_rows_are_judged_against_the_baselines_at_their_ratio_and_format() {
        let mut rows = vec![
            judged("am-ctx-window", 10.0, 0.80, 0.50),
            judged("am-ctx-window", 20.0, 0.70, 0.30),
            judged("am-ctx-window", 50.0, 0.60, 0.20),
            judged("h2o", 10.0, 0.79, 0.49),
            judged("snapkv", 10.0, 0.70, 0.10),
            judged("streaming", 10.0, 0.75, 0.05),
            judged("h2o", 20.0, 0.65, 0.30),
            judged("streaming", 20.0, 0.71, 0.10),
        ];
        // The same ratio in another cache format is not a peer.
        let mut other = judged("h2o", 10.0, 0.99, 0.99);
        other.key.kv = "turbo4".into();
        rows.push(other);
        judge_rows(&mut rows);
        assert_eq!(rows[0].beats_baselines, Some(true));
        assert!(rows[0].lost_to.is_empty());
        // A tie is a loss, and every measure lost is named.
        assert_eq!(rows[1].beats_baselines, Some(false));
        assert_eq!(rows[1].lost_to, ["h2o: recall", "streaming: continuation"]);
        // No baseline at 50x: not judged; baselines are never judged.
        assert_eq!(rows[2].beats_baselines, None);
        assert!(rows[3..].iter().all(|r| r.beats_baselines.is_none()));

        let json = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!(json["beats_baselines"], false);
        assert_eq!(json["lost_to"][1], "streaming: continuation");
        assert!(serde_json::to_value(&rows[3])
            .unwrap()
            .get("beats_baselines")
            .is_none());
    }

    #[test]
    fn mean_rows_count_the_texts_where_a_method_beats_every_baseline() {
        let text = |gap: f64| {
            let mut rows = vec![
                judged("am-ctx-window", 10.0, gap, 0.5),
                judged("h2o", 10.0, 0.7, 0.4),
            ];
            judge_rows(&mut rows);
            report(rows)
        };
        let means = mean_rows(&[text(0.8), text(0.6), text(0.9)]);
        assert_eq!(means[0].texts_beating_baselines, Some(2));
        assert_eq!(means[1].texts_beating_baselines, None);
    }

    fn report(rows: Vec<Row>) -> TextReport {
        let m = Measured {
            ppl: 1.0,
            recall: 1.0,
            kv_bytes: 1,
        };
        TextReport {
            text: "t".into(),
            full: m,
            none: m,
            prefill_s: 0.0,
            repeat_s: 0.0,
            timings: CompactTimings::default(),
            rows,
        }
    }

    #[test]
    fn mean_rows_average_each_row_over_the_texts_and_keep_the_lowest() {
        let reports = [
            report(vec![row("f32", 0.8, 0.4), row("turbo4", 0.6, -0.2)]),
            report(vec![row("f32", 0.6, 0.5), row("turbo4", 0.7, 0.1)]),
        ];
        let means = mean_rows(&reports);
        assert_eq!(means.len(), 2);
        assert_eq!(means[1].key.kv, "turbo4");
        assert!((means[0].gap_recovered - 0.7).abs() < 1e-12);
        assert!((means[0].min_gap_recovered - 0.6).abs() < 1e-12);
        assert!((means[0].recall_gap_recovered - 0.45).abs() < 1e-12);
        assert!((means[1].recall_gap_recovered + 0.05).abs() < 1e-12);
        assert!((means[1].min_recall_gap_recovered + 0.2).abs() < 1e-12);
        assert_eq!(means[1].texts, 2);
    }
}

#[cfg(test)]
mod job_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: CompactionArgs,
    }

    #[test]
    fn profile_budgets_apply_to_attention_matching_and_baselines_keep_one_uniform_row() {
        let cli = Cli::try_parse_from([
            "t",
            "--text",
            "x.txt",
            "--methods",
            "am-mix-window,h2o",
            "--ratios",
            "10,50",
            "--head-budgets",
            "profile",
            "--layer-profile",
            "p.json",
        ])
        .unwrap();
        let mut kl = vec![vec![0.01, 0.005, 0.002]; 4];
        kl[2] = vec![0.1, 0.05, 0.02];
        let profile = LayerProfile {
            model_sha256: "x".into(),
            method: "am-mix-window".into(),
            context: 1024,
            continuation: 64,
            tokens_per_head: vec![16, 32, 64],
            kl,
        };
        let formats = vec![compacted_recipe("f32", 4).unwrap()];
        let methods = [Method::AmMixWindow, Method::H2o];
        let jobs = eval_jobs(&cli.a, &methods, &formats, Some(&profile)).unwrap();
        let shapes: Vec<(Method, usize, &str)> = jobs
            .iter()
            .map(|(j, _, _)| (j.method, j.budget, j.head_budgets.name()))
            .collect();
        assert_eq!(
            shapes,
            vec![
                (Method::AmMixWindow, 102, "profile"),
                (Method::AmMixWindow, 20, "profile"),
                (Method::H2o, 102, "uniform"),
                (Method::H2o, 20, "uniform"),
            ]
        );
        let HeadBudgets::PerLayer(b) = &jobs[0].0.head_budgets else {
            unreachable!()
        };
        assert_eq!(b.iter().sum::<usize>(), 4 * 102);
        assert!(b[2] > b[0], "{b:?}");
        // Without the profile, `profile` budgets are an error, not a silent uniform row.
        assert!(eval_jobs(&cli.a, &methods, &formats, None).is_err());
    }

    #[test]
    fn fit_flags_reach_the_fit_options_and_bad_values_are_refused() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["t", "--text", "x.txt"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let o = parse(&[]).unwrap().a.fit.options();
        assert_eq!((o.fit_from, o.max_bias), (0.0, kvpack::compact::BIAS_LIMIT));
        let o = parse(&["--fit-from", "0.5", "--max-bias", "1"])
            .unwrap()
            .a
            .fit
            .options();
        assert_eq!((o.fit_from, o.max_bias), (0.5, 1.0));
        for (bad, flag) in [
            ("--fit-from=1.5", "--fit-from"),
            ("--fit-from=x", "--fit-from"),
            ("--max-bias=-1", "--max-bias"),
            ("--max-bias=11", "--max-bias"),
        ] {
            let e = parse(&[bad]).err().expect("refused").to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    /// `eval compaction --text x.txt --preset PRESET EXTRA…`, parsed.
    fn with_preset(preset: &str, extra: &[&str]) -> CompactionArgs {
        let mut args = vec!["t", "--text", "x.txt", "--preset", preset];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).unwrap().a
    }

    #[test]
    fn the_recommended_preset_sets_unset_options_and_explicit_ones_win() {
        let parse = |extra: &[&str]| with_preset("recommended", extra);
        let a = parse(&[]);
        let o = a.fit.options();
        assert_eq!(
            (o.recent_fraction, o.window_sinks, o.value_ridge, o.max_bias),
            (0.7, 1, 100.0, 1.0)
        );
        assert_eq!(
            a.methods().unwrap(),
            [
                Method::AmCtxWindow,
                Method::H2o,
                Method::SnapKv,
                Method::Streaming
            ]
        );
        assert_eq!(a.selections(), [SelectionArg::Accumulated]);
        assert_eq!(a.head_budgets(true), [BudgetArg::Profile]);
        // The shipped profile is for another model: uniform budgets, not an error.
        assert_eq!(a.head_budgets(false), [BudgetArg::Uniform]);
        // The shipped profile parses, is valid and is what the preset reads.
        let Some((shipped, ProfileSource::Shipped)) =
            profile_for(&a.head_budgets(true), None, true).unwrap()
        else {
            panic!("the preset reads the shipped profile")
        };
        assert_eq!(shipped.n_layer(), 30);
        let formats = vec![compacted_recipe("f32", 4).unwrap()];
        let jobs = eval_jobs(&a, &a.methods().unwrap(), &formats, Some(&shipped)).unwrap();
        assert_eq!(jobs[0].0.head_budgets.name(), "profile");
        assert_eq!(jobs[0].0.selection, Selection::Accumulated);
        // Explicit options override the preset's.
        let a = parse(&[
            "--recent-fraction",
            "0.5",
            "--value-ridge",
            "1",
            "--methods",
            "am-mix-window",
            "--selection",
            "highest",
            "--head-budgets",
            "uniform",
        ]);
        let o = a.fit.options();
        assert_eq!(
            (o.recent_fraction, o.window_sinks, o.value_ridge, o.max_bias),
            (0.5, 1, 1.0, 1.0)
        );
        assert_eq!(a.methods().unwrap(), [Method::AmMixWindow]);
        assert_eq!(a.selections(), [SelectionArg::Highest]);
        assert_eq!(a.head_budgets(true), [BudgetArg::Uniform]);
        // Without the preset, the plain defaults.
        let a = Cli::try_parse_from(["t", "--text", "x.txt"]).unwrap().a;
        let (o, d) = (a.fit.options(), FitOptions::default());
        assert_eq!(
            (o.recent_fraction, o.window_sinks, o.value_ridge, o.max_bias),
            (d.recent_fraction, d.window_sinks, d.value_ridge, d.max_bias)
        );
        assert_eq!(a.selections(), [SelectionArg::Highest]);
        assert_eq!(a.head_budgets(true), [BudgetArg::Uniform]);
        assert!(Cli::try_parse_from(["t", "--text", "x.txt", "--preset", "best"]).is_err());
    }

    #[test]
    fn the_adaptive_preset_tries_two_settings_and_explicit_options_reach_both() {
        let parse = |extra: &[&str]| with_preset("adaptive", extra);
        let a = parse(&[]);
        // The recommended defaults for everything else.
        assert_eq!(a.fit.options(), RECOMMENDED_FIT);
        assert_eq!(a.selections(), [SelectionArg::Accumulated]);
        assert_eq!(a.head_budgets(true), [BudgetArg::Profile]);
        let c = a.fit.candidates(None);
        let names: Vec<&str> = c.iter().map(|c| c.name).collect();
        assert_eq!(names, ["recommended", "observation"]);
        assert_eq!(
            (c[0].selection, c[0].fit),
            (Selection::Accumulated, RECOMMENDED_FIT)
        );
        assert_eq!(c[1].selection, Selection::Observation);
        let o = c[1].fit;
        assert_eq!(
            (o.recent_fraction, o.window_sinks, o.value_ridge, o.max_bias),
            (0.6, 1, 1e6, 1.0)
        );
        // Options given apply to both settings.
        let a = parse(&["--max-bias", "2", "--window-sinks", "4"]);
        for c in a.fit.candidates(Some(SelectionArg::Highest)) {
            assert_eq!((c.fit.max_bias, c.fit.window_sinks), (2.0, 4), "{}", c.name);
            assert_eq!(c.selection, Selection::HighestAttention, "{}", c.name);
        }
        // Only the adaptive preset tries settings.
        assert!(with_preset("recommended", &[])
            .fit
            .candidates(None)
            .is_empty());
        assert_eq!((adaptive_holdout(1024), adaptive_holdout(96)), (64, 12));
        assert_eq!((adaptive_reread(1024), adaptive_reread(96)), (256, 24));
    }

    #[test]
    fn another_setting_replaces_the_default_only_when_better_on_both_measures() {
        let t = |ppl: f64, recall_ppl: f64| Trial {
            setting: "x",
            ppl,
            recall_ppl,
        };
        // Better on one, worse on the other (a lower product, even): the default stays.
        assert_eq!(pick_setting(&[t(20.0, 2.0), t(15.0, 2.1)]), 0);
        assert_eq!(pick_setting(&[t(20.0, 2.0), t(21.0, 1.2)]), 0);
        // A tie on one measure is not better.
        assert_eq!(pick_setting(&[t(20.0, 2.0), t(15.0, 2.0)]), 0);
        assert_eq!(pick_setting(&[t(20.0, 2.0), t(19.9, 1.99)]), 1);
        // Of several that are better on both, the lower product; the earlier on a tie.
        assert_eq!(
            pick_setting(&[t(20.0, 2.0), t(18.0, 1.9), t(16.0, 1.5), t(10.0, 3.0)]),
            2
        );
        assert_eq!(pick_setting(&[t(20.0, 2.0), t(16.0, 1.5), t(12.0, 2.0)]), 1);
        assert_eq!(pick_setting(&[t(20.0, 2.0), t(16.0, 1.5), t(16.0, 1.5)]), 1);
        assert_eq!(pick_setting(&[t(20.0, 2.0)]), 0);
    }
}
