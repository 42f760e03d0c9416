//! KV-cache compaction: Attention Matching (Zweiger et al., arXiv 2602.16284) and the eviction
//! baselines it is measured against, at the same token budget.
//!
//! For one layer's KV head with keys K and values V (T × d, post-RoPE) and reference queries Q,
//! Attention Matching keeps t ≪ T keys C_k, a bias β per key and fitted values C_v so that
//! softmax(Q C_kᵀ/√d + β) C_v ≈ softmax(Q Kᵀ/√d) V and Σ exp(Q C_kᵀ/√d + β) ≈ Σ exp(Q Kᵀ/√d):
//! - keys: the t keys with the highest RMS attention probability over Q (HighestAttnKeys);
//! - β: with w = exp(β) the mass condition is linear in w: non-negative least squares, each query
//!   row weighted by 1/its mass (relative error), w clamped to [e^−[`BIAS_LIMIT`], e^[`BIAS_LIMIT`]];
//! - values: ridge least squares of the biased attention weights against the original outputs,
//!   shrunk toward the selected tokens' own values.
//!
//! The large score computation runs on the GPU ([`head_scores`]); the t × t solves on the CPU.
//! Baselines keep original tokens with β = 0: StreamingLLM (sinks + most recent), H2O (heavy
//! hitters by accumulated attention + recent window), SnapKV (attention from an observation
//! window at the end of the context, pooled). Compacted keys keep their RoPE positions.

mod budgets;
mod context;
pub mod file;
mod fit;
mod scores;

pub use crate::kv::StoredHead;
pub use budgets::LayerProfile;
pub use context::{compact_context, Captured, CompactTimings, ContextShape};

/// Smallest head a [`HeadBudgets::Sensitivity`] allocation gives: twice the sinks, so a window
/// method keeps its sinks and fits at least as many tokens.
pub const MIN_HEAD_TOKENS: usize = 2 * SINK_TOKENS;

pub use fit::{nnls, nnls_gram, ridge_toward};
pub use scores::{head_scores, head_scores_with, reference_head_scores, HeadScores, ScoresKernel};

use nalgebra::{DMatrix, DVector};

/// Largest |β|: w = exp(β) is clamped to [e^−BIAS_LIMIT, e^BIAS_LIMIT].
pub const BIAS_LIMIT: f64 = 10.0;

/// Errors of compaction.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// A method name that is not known.
    #[error(
        "unknown compaction method {0:?}: use am, am-window, am-mix, am-mix-window, am-ctx, am-ctx-window, h2o, snapkv or streaming"
    )]
    UnknownMethod(String),
    /// Inconsistent inputs.
    #[error("{0}")]
    Invalid(String),
    /// The GPU layer failed.
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

/// How a head's cache is reduced to its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Plain Attention Matching: HighestAttnKeys, NNLS β, least-squares values.
    Am,
    /// Attention Matching that keeps the attention sinks and a recent window exact (β = 0,
    /// original values; counted in the budget) and fits the rest.
    AmWindow,
    /// Attention Matching whose reference queries are the repeat prefill's together with the
    /// context's own (causal) queries: the latter resemble the queries of a continuation.
    AmMix,
    /// `am-window`'s exact sinks and recent window with `am-mix`'s reference queries for the
    /// fitted rest: the recent tokens a continuation leans on stay exact (as in H2O), the older
    /// ones are chosen and fitted for the queries of both a re-read and a continuation.
    AmMixWindow,
    /// Attention Matching whose reference queries are the context's own (causal) queries only:
    /// no repeat prefill, so it compacts in a fraction of the time of the other variants.
    AmCtx,
    /// `am-window`'s exact sinks and recent window with `am-ctx`'s reference queries.
    AmCtxWindow,
    /// H2O: heavy hitters by accumulated attention over the context's own queries + a recent window.
    H2o,
    /// SnapKV: keys the last [`SNAPKV_WINDOW`] positions attend to (max-pooled) + that window
    /// (its last half-budget positions below twice the window).
    SnapKv,
    /// StreamingLLM: the attention sinks + the most recent tokens.
    Streaming,
}

impl std::str::FromStr for Method {
    type Err = CompactError;
    fn from_str(s: &str) -> Result<Method, CompactError> {
        Ok(match s.trim() {
            "am" => Method::Am,
            "am-window" => Method::AmWindow,
            "am-mix" => Method::AmMix,
            "am-mix-window" => Method::AmMixWindow,
            "am-ctx" => Method::AmCtx,
            "am-ctx-window" => Method::AmCtxWindow,
            "h2o" => Method::H2o,
            "snapkv" => Method::SnapKv,
            "streaming" | "streamingllm" => Method::Streaming,
            other => return Err(CompactError::UnknownMethod(other.to_string())),
        })
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Am => "am",
            Method::AmWindow => "am-window",
            Method::AmMix => "am-mix",
            Method::AmMixWindow => "am-mix-window",
            Method::AmCtx => "am-ctx",
            Method::AmCtxWindow => "am-ctx-window",
            Method::H2o => "h2o",
            Method::SnapKv => "snapkv",
            Method::Streaming => "streaming",
        })
    }
}

impl Method {
    /// Whether the method fits β and values (Attention Matching) rather than keeping original
    /// tokens (the eviction baselines).
    pub fn is_attention_matching(self) -> bool {
        matches!(
            self,
            Method::Am
                | Method::AmWindow
                | Method::AmMix
                | Method::AmMixWindow
                | Method::AmCtx
                | Method::AmCtxWindow
        )
    }

    /// Whether the method reads the reference queries of the repeat-the-context prefill.
    pub fn needs_reference_queries(self) -> bool {
        self.is_attention_matching() && !self.fits_context_queries()
    }

    /// Whether the method reads the context's own queries (every position).
    pub fn needs_context_queries(self) -> bool {
        matches!(
            self,
            Method::H2o | Method::AmMix | Method::AmMixWindow | Method::AmCtx | Method::AmCtxWindow
        )
    }

    /// Whether the method's reference set is the repeat prefill's queries and the context's own.
    pub fn mixes_references(self) -> bool {
        matches!(self, Method::AmMix | Method::AmMixWindow)
    }

    /// Whether the method's reference set is the context's own queries alone.
    pub fn fits_context_queries(self) -> bool {
        matches!(self, Method::AmCtx | Method::AmCtxWindow)
    }

    /// Whether the method keeps the sinks and a recent window exact.
    pub fn keeps_window(self) -> bool {
        matches!(
            self,
            Method::AmWindow | Method::AmMixWindow | Method::AmCtxWindow
        )
    }
}

/// Tokens at the start that StreamingLLM and `am-window` keep (the attention sinks).
pub const SINK_TOKENS: usize = 4;
/// SnapKV's observation window (positions at the end of the context). SnapKV keeps it, or
/// the last half of its budget where that is smaller ([`select_snapkv`]).
pub const SNAPKV_WINDOW: usize = 32;
/// SnapKV's max-pooling kernel over key positions.
pub const SNAPKV_POOL: usize = 7;

/// How a compaction job's tokens are shared among the heads of every layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HeadBudgets {
    /// Every head keeps the job's budget.
    #[default]
    Uniform,
    /// Attention Matching only: each head is fitted at [`BUDGET_FACTORS`] × the budget, and
    /// the sizes are chosen greedily, largest drop of [`fit_error`] per token first, so that
    /// the heads keep the job's budget on average (at most). Heads whose attention a few keys
    /// reproduce give tokens to heads that need more. The cache stores heads ragged, so the
    /// bytes saved are real.
    Sensitivity,
    /// Attention Matching only: the tokens per head of each layer, in layer order (every head
    /// of a layer keeps the same number), as [`LayerProfile::allocate`] shares the job's budget
    /// by the model's measured loss sensitivity. The job's `budget` is their mean.
    PerLayer(std::sync::Arc<[usize]>),
}

impl HeadBudgets {
    /// The name rows and files show: `uniform`, `sensitivity` or `profile`.
    pub fn name(&self) -> &'static str {
        match self {
            HeadBudgets::Uniform => "uniform",
            HeadBudgets::Sensitivity => "sensitivity",
            HeadBudgets::PerLayer(_) => "profile",
        }
    }
}

/// How Attention Matching picks the original keys it keeps (before fitting β and values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// HighestAttnKeys: the keys of highest RMS attention probability over the reference
    /// queries ([`select_highest_attention`]).
    #[default]
    HighestAttention,
    /// Greedy orthogonal matching pursuit on the attention-mass residual, the weights refitted
    /// by NNLS after every pick ([`select_omp`]): slower; picks keys that together cover the
    /// mass rather than keys that each score high.
    Omp,
    /// H2O's criterion on the method's reference queries: the keys of highest attention
    /// probability summed over the rows ([`select_accumulated`]). It favours keys many rows
    /// attend to over keys a few rows attend to strongly.
    Accumulated,
    /// SnapKV's criterion on the method's reference queries: the attention of the last
    /// [`SNAPKV_WINDOW`] positions' rows, summed and max-pooled over [`SNAPKV_POOL`]
    /// neighbouring keys ([`select_observation`]). It keeps the phrases the end of the context
    /// reads, whole. Meant for `am-ctx` and `am-ctx-window`, whose reference rows are the
    /// context's own queries in position order.
    Observation,
}

impl std::str::FromStr for Selection {
    type Err = CompactError;
    fn from_str(s: &str) -> Result<Selection, CompactError> {
        match s.trim() {
            "highest" | "highest-attention" => Ok(Selection::HighestAttention),
            "omp" => Ok(Selection::Omp),
            "accumulated" => Ok(Selection::Accumulated),
            "observation" => Ok(Selection::Observation),
            other => Err(CompactError::Invalid(format!(
                "unknown key selection {other:?}: use highest, omp, accumulated or observation"
            ))),
        }
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Selection::HighestAttention => "highest",
            Selection::Omp => "omp",
            Selection::Accumulated => "accumulated",
            Selection::Observation => "observation",
        })
    }
}

/// The head sizes [`HeadBudgets::Sensitivity`] chooses among, as multiples of the job's budget.
pub const BUDGET_FACTORS: [f64; 4] = [0.5, 1.0, 2.0, 3.0];

/// Knobs of the Attention Matching fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitOptions {
    /// Coordinate-descent sweeps of the NNLS.
    pub nnls_sweeps: usize,
    /// Ridge of the value fit, relative to the mean diagonal of the normal matrix.
    pub value_ridge: f64,
    /// `am-window`, `am-mix-window`: fraction of the budget kept as an exact recent window.
    pub recent_fraction: f64,
    /// `am-window`, `am-mix-window`: the first tokens kept exact (attention sinks), at most
    /// half the budget.
    pub window_sinks: usize,
    /// `am-ctx`, `am-ctx-window`: fit β and the values only on the context's queries at
    /// positions ≥ this share of the context (0: all of them). The selection still reads every
    /// row. An early causal query sees few keys, so the kept keys it sees must carry its whole
    /// mass and their β grow; the queries after the compaction see every kept key, as the late
    /// context rows do.
    pub fit_from: f64,
    /// Largest β of a fitted key (at most [`BIAS_LIMIT`]): after the mass fit each w = exp(β)
    /// is clamped to e^max_bias, and the values are fitted to the clamped weights. A small cap
    /// keeps a heavy hitter from taking over the attention the dropped keys had.
    pub max_bias: f64,
}

/// The cache a compaction is fitted for ([`Job::fit_for`]): Attention Matching then fits β and
/// the values to the keys as that cache will store them (quantized, the sinks in f16), so the
/// biases and values absorb part of the keys' quantization error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FitFor {
    /// The format the compacted tokens will be stored in.
    pub format: crate::codec::KvFormat,
    /// Layers stored in another format ([`crate::kv::KvRecipe::edge`]).
    pub edge: Option<crate::kv::EdgeLayers>,
    /// The cache's sinks: each head's first `sinks` kept tokens are stored in f16.
    pub sinks: usize,
    /// The cache's rotation seed ([`crate::kv::DEFAULT_SEED`] for sessions).
    pub seed: u64,
    /// Also refit the values to their stored form (`--refit-values`): the values are
    /// quantized one token at a time, and the values not yet quantized take up the error
    /// each one leaves in the fitted outputs (GPTQ's error feedback, over tokens).
    pub values: bool,
}

impl FitFor {
    /// Fit for the cache a session builds from `recipe` (its formats and sinks, the sessions'
    /// rotation seed).
    pub fn recipe(recipe: &crate::kv::KvRecipe) -> FitFor {
        FitFor {
            format: recipe.format,
            edge: recipe.edge,
            sinks: recipe.sinks,
            seed: crate::kv::DEFAULT_SEED,
            values: false,
        }
    }

    /// The format of layer `l` of `n_layer`.
    pub fn format_of(&self, l: usize, n_layer: usize) -> crate::codec::KvFormat {
        crate::kv::EdgeLayers::format_of(self.edge, self.format, l, n_layer)
    }
}

/// A head's kept tokens as its cache will store them, for [`compact_head`].
#[derive(Clone, Copy)]
pub struct Stored<'a> {
    /// The key codec of the head's layer ([`crate::kv::layer_codecs`]).
    pub codec: &'a crate::codec::Codec,
    /// The value codec of the head's layer, when the values are refitted to their stored form
    /// ([`FitFor::values`]): each kept value is quantized in turn and the error it leaves in
    /// the fitted attention outputs is taken up by the values not yet quantized
    /// ([`quantize_values_with_feedback`]).
    pub values: Option<&'a crate::codec::Codec>,
    /// Kept tokens stored in f16 first (the cache's sinks).
    pub sinks: usize,
}

impl Stored<'_> {
    /// `keys` (`n × d`, the head's kept tokens in position order) as the cache will read them.
    pub fn seen(&self, keys: &[f32], d: usize) -> Vec<f32> {
        let exact = (self.sinks * d).min(keys.len());
        let mut out: Vec<f32> = keys[..exact]
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        if keys.len() > exact {
            match self.codec.encode_lossy(&keys[exact..]) {
                Ok((enc, _)) => out.extend(self.codec.decode(&enc)),
                Err(_) => out.extend_from_slice(&keys[exact..]),
            }
        }
        out
    }
}

/// One compaction that [`compact_context`] computes: a method, the tokens each head keeps (on
/// average, with [`HeadBudgets::Sensitivity`] and [`HeadBudgets::PerLayer`]) and how they are
/// shared among heads.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// The method.
    pub method: Method,
    /// Tokens per head.
    pub budget: usize,
    /// How the tokens are shared among heads.
    pub head_budgets: HeadBudgets,
    /// How Attention Matching picks the keys it keeps (the baselines ignore it).
    pub selection: Selection,
    /// Attention Matching fits β and values to the keys as this cache stores them (`None`:
    /// to the exact keys). The baselines ignore it.
    pub fit_for: Option<FitFor>,
    /// The fit's knobs for this job (`None`: the options [`compact_context`] is given), so
    /// jobs with different settings share one pass over the scores.
    pub fit: Option<FitOptions>,
}

impl Job {
    /// `budget` tokens in every head.
    pub fn uniform(method: Method, budget: usize) -> Job {
        Job {
            method,
            budget,
            head_budgets: HeadBudgets::Uniform,
            selection: Selection::HighestAttention,
            fit_for: None,
            fit: None,
        }
    }
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions::DEFAULT
    }
}

impl FitOptions {
    /// The defaults (plain Attention Matching's fit), usable in constants.
    pub const DEFAULT: FitOptions = FitOptions {
        nnls_sweeps: 300,
        value_ridge: 1e-3,
        recent_fraction: 0.25,
        window_sinks: SINK_TOKENS,
        fit_from: 0.0,
        max_bias: BIAS_LIMIT,
    };
}

/// How far a compacted head is from the full one on the reference rows `refs` (at most 1,024 of
/// them, evenly spaced): the relative attention-output error Σ‖ŷ_i − y_i‖² / Σ‖y_i‖² plus the
/// mean squared relative mass error (m̂_i / m_i − 1)². `hc` keeps original keys (its positions
/// index `refs`' keys) with fitted β and values, as every method here does.
pub fn fit_error(refs: &HeadScores, hc: &HeadCompaction, d: usize) -> f64 {
    let step = refs.n_q.div_ceil(1024).max(1);
    let w: Vec<f64> = hc.bias.iter().map(|&b| (b as f64).exp()).collect();
    let (mut out_err, mut out_norm, mut mass_err, mut rows) = (0.0, 0.0, 0.0, 0usize);
    let mut yh = vec![0f64; d];
    for i in (0..refs.n_q).step_by(step) {
        let sum = refs.sum[i] as f64;
        if sum <= 0.0 {
            continue;
        }
        let erow = &refs.e[i * refs.n_k..(i + 1) * refs.n_k];
        yh.fill(0.0);
        let mut mass = 0.0;
        for (c, &p) in hc.positions.iter().enumerate() {
            let a = erow[p as usize] as f64 * w[c];
            if a != 0.0 {
                mass += a;
                for (o, &v) in yh.iter_mut().zip(&hc.values[c * d..][..d]) {
                    *o += a * v as f64;
                }
            }
        }
        let y = &refs.y[i * d..][..d];
        for (o, &t) in yh.iter().zip(y) {
            let got = if mass > 0.0 { o / mass } else { 0.0 };
            out_err += (got - t as f64).powi(2);
            out_norm += (t as f64).powi(2);
        }
        mass_err += (mass / sum - 1.0).powi(2);
        rows += 1;
    }
    if rows == 0 {
        return 0.0;
    }
    out_err / out_norm.max(1e-30) + mass_err / rows as f64
}

/// Per head, the candidate sizes' `(tokens, error)`, ascending in tokens: pick one each so that
/// the tokens sum to at most `total`, greedily taking the step with the largest error drop per
/// token. Starts from every head's smallest candidate. Returns the chosen index per head.
pub fn allocate_budgets(candidates: &[Vec<(usize, f64)>], total: usize) -> Vec<usize> {
    let mut pick = vec![0usize; candidates.len()];
    let mut used: usize = candidates
        .iter()
        .map(|c| c.first().map_or(0, |x| x.0))
        .sum();
    loop {
        let mut best: Option<(usize, usize, f64)> = None;
        for (h, c) in candidates.iter().enumerate() {
            let (t0, e0) = c[pick[h]];
            for (k, &(t, e)) in c.iter().enumerate().skip(pick[h] + 1) {
                let dt = t.saturating_sub(t0);
                if dt == 0 || used + dt > total {
                    continue;
                }
                let gain = (e0 - e) / dt as f64;
                if gain > 0.0 && best.is_none_or(|b| gain > b.2) {
                    best = Some((h, k, gain));
                }
            }
        }
        match best {
            Some((h, k, _)) => {
                used += candidates[h][k].0 - candidates[h][pick[h]].0;
                pick[h] = k;
            }
            None => return pick,
        }
    }
}

/// One KV head after compaction: its kept tokens in position order.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadCompaction {
    /// Original positions of the kept keys (their RoPE is that of these positions).
    pub positions: Vec<u32>,
    /// `t × d` keys (post-RoPE).
    pub keys: Vec<f32>,
    /// `t × d` values.
    pub values: Vec<f32>,
    /// `t` additive biases β on the attention scores.
    pub bias: Vec<f32>,
}

impl HeadCompaction {
    /// Kept tokens.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Original tokens `idx` (ascending) with β = 0.
    pub fn keep(keys: &[f32], values: &[f32], d: usize, idx: &[usize]) -> HeadCompaction {
        HeadCompaction {
            positions: idx.iter().map(|&i| i as u32).collect(),
            keys: idx
                .iter()
                .flat_map(|&i| &keys[i * d..][..d])
                .copied()
                .collect(),
            values: idx
                .iter()
                .flat_map(|&i| &values[i * d..][..d])
                .copied()
                .collect(),
            bias: vec![0.0; idx.len()],
        }
    }
}

/// A compacted context: per layer, per KV head.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactedContext {
    /// Tokens of the original context; new tokens continue at this position.
    pub context_len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// `layers[l][h]`.
    pub layers: Vec<Vec<HeadCompaction>>,
}

impl CompactedContext {
    /// Tokens kept per head, when every head keeps the same number.
    pub fn uniform_len(&self) -> Option<usize> {
        let first = self.layers.first()?.first()?.len();
        self.layers
            .iter()
            .flatten()
            .all(|h| h.len() == first)
            .then_some(first)
    }

    /// Tokens kept by the longest head (0 when nothing is kept). A session loaded from the
    /// context holds this many positions per head; shorter heads are not padded.
    pub fn max_len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|h| h.len())
            .max()
            .unwrap_or(0)
    }

    /// Kept tokens summed over layers and heads.
    pub fn total_tokens(&self) -> usize {
        self.layers.iter().flatten().map(|h| h.len()).sum()
    }

    /// Tokens a cache without compaction would hold where a session loaded from this context
    /// holds `cache_len` positions (the longest head's): the whole original context plus the
    /// tokens that came after it. The f16 bytes of that many tokens are what the compaction
    /// saves against.
    pub fn uncompacted_tokens(&self, cache_len: usize) -> usize {
        self.context_len + cache_len.saturating_sub(self.max_len())
    }
}

/// One KV head of a compacted context as a cache stores it: its kept tokens' original
/// positions, their biases β and their codes ([`StoredHead`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCompaction {
    /// Original positions of the kept tokens.
    pub positions: Vec<u32>,
    /// β per kept token.
    pub bias: Vec<f32>,
    /// The tokens' keys and values as the cache stores them.
    pub stored: StoredHead,
}

impl StoredCompaction {
    /// Tokens kept.
    pub fn len(&self) -> usize {
        self.stored.tokens
    }

    /// Whether the head keeps no token.
    pub fn is_empty(&self) -> bool {
        self.stored.tokens == 0
    }
}

/// A compacted context as a cache of one recipe stores it: what a `.kvpack` file holds, loaded
/// by [`crate::model::llama::Session::from_stored`] into the same cache without encoding anything
/// again (the same codes on every adapter). [`StoredContext::store`] reads it from a cache.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredContext {
    /// Tokens of the original context; new tokens continue at this position.
    pub context_len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// The rotation seed of the cache that stored it; the codes read back only with it.
    pub seed: u64,
    /// `layers[l][h]`.
    pub layers: Vec<Vec<StoredCompaction>>,
}

impl StoredContext {
    /// `c` as `cache` stores it: `cache` is a session's cache just loaded with `c`
    /// ([`crate::model::llama::Session::from_compacted`]), read back ([`crate::kv::KvCache::read_stored`]).
    pub async fn store(
        gpu: &crate::gpu::Gpu,
        cache: &crate::kv::KvCache,
        c: &CompactedContext,
    ) -> Result<StoredContext, crate::kv::KvError> {
        let heads = cache.read_stored(gpu).await?;
        let layers = c
            .layers
            .iter()
            .zip(heads)
            .map(|(hcs, stored)| {
                hcs.iter()
                    .zip(stored)
                    .map(|(hc, stored)| StoredCompaction {
                        positions: hc.positions.clone(),
                        bias: hc.bias.clone(),
                        stored,
                    })
                    .collect()
            })
            .collect();
        Ok(StoredContext {
            context_len: c.context_len,
            head_dim: c.head_dim,
            seed: cache.config().seed,
            layers,
        })
    }

    /// Tokens kept by the longest head.
    pub fn max_len(&self) -> usize {
        let lens = self.layers.iter().flatten().map(|h| h.stored.tokens);
        lens.max().unwrap_or(0)
    }
}

/// What a `.kvpack` file holds: the compacted tokens in f32 (version 1; the KV format applies
/// when loaded) or as a cache stores them (version 2).
#[derive(Clone, Debug, PartialEq)]
pub enum SavedContext {
    /// Keys, values and biases in f32.
    F32(CompactedContext),
    /// Codes as the cache of the file's recipe stores them.
    Stored(StoredContext),
}

impl SavedContext {
    /// Tokens of the original context.
    pub fn context_len(&self) -> usize {
        match self {
            SavedContext::F32(c) => c.context_len,
            SavedContext::Stored(c) => c.context_len,
        }
    }

    /// Tokens kept by the longest head.
    pub fn max_len(&self) -> usize {
        match self {
            SavedContext::F32(c) => c.max_len(),
            SavedContext::Stored(c) => c.max_len(),
        }
    }

    /// Kept tokens summed over layers and heads.
    pub fn total_tokens(&self) -> usize {
        match self {
            SavedContext::F32(c) => c.total_tokens(),
            SavedContext::Stored(c) => c.layers.iter().flatten().map(|h| h.stored.tokens).sum(),
        }
    }

    /// [`CompactedContext::uncompacted_tokens`].
    pub fn uncompacted_tokens(&self, cache_len: usize) -> usize {
        self.context_len() + cache_len.saturating_sub(self.max_len())
    }
}

/// Top `n` of `score` among `candidates` (ties to the earlier position).
fn top_n(score: &[f64], candidates: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
    let mut c: Vec<usize> = candidates.collect();
    c.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    c.truncate(n);
    c
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

/// StreamingLLM: the first [`SINK_TOKENS`] and the most recent tokens, `budget` in all.
pub fn select_streaming(n_k: usize, budget: usize) -> Vec<usize> {
    let budget = budget.min(n_k);
    let sinks = SINK_TOKENS.min(budget);
    sorted((0..sinks).chain(n_k - (budget - sinks)..n_k).collect())
}

/// H2O: half the budget the most recent tokens, half the keys of highest attention accumulated
/// over the context's own (causal) queries `ctx`.
pub fn select_h2o(ctx: &HeadScores, budget: usize) -> Vec<usize> {
    let n_k = ctx.n_k;
    let budget = budget.min(n_k);
    let recent = budget / 2;
    let acc = accumulated_attention(ctx);
    let heavy = top_n(&acc, 0..n_k - recent, budget - recent);
    sorted(heavy.into_iter().chain(n_k - recent..n_k).collect())
}

/// SnapKV: the last `obs_rows` rows of `ctx` are the observation window's queries (covering
/// [`SNAPKV_WINDOW`] positions); their attention, summed and max-pooled over
/// [`SNAPKV_POOL`] neighbouring keys, picks the keys before the window; the window is kept.
/// Below twice [`SNAPKV_WINDOW`] tokens the kept window is half the budget (as H2O's recent
/// half), so the pooled attention still picks the other half: a window filling the whole budget
/// would drop the first tokens, which every later query attends to, and the model with them.
pub fn select_snapkv(ctx: &HeadScores, obs_rows: usize, budget: usize) -> Vec<usize> {
    let n_k = ctx.n_k;
    let budget = budget.min(n_k);
    let window = SNAPKV_WINDOW.min(budget / 2).min(n_k);
    let prefix = n_k - window;
    let pooled = observation_scores(ctx, obs_rows, prefix);
    let picked = top_n(&pooled, 0..prefix, budget - window);
    sorted(picked.into_iter().chain(prefix..n_k).collect())
}

/// SnapKV's score of the keys before `prefix`: the attention of the last `obs_rows` rows of
/// `refs`, summed, then max-pooled over [`SNAPKV_POOL`] neighbouring keys (keys at and after
/// `prefix` score 0 and do not pool into the ones before).
fn observation_scores(refs: &HeadScores, obs_rows: usize, prefix: usize) -> Vec<f64> {
    let n_k = refs.n_k;
    let prefix = prefix.min(n_k);
    let mut acc = vec![0f64; n_k];
    for i in refs.n_q.saturating_sub(obs_rows)..refs.n_q {
        for (j, a) in acc.iter_mut().enumerate().take(prefix) {
            *a += refs.prob(i, j) as f64;
        }
    }
    let half = SNAPKV_POOL / 2;
    (0..n_k)
        .map(|j| {
            let lo = j.saturating_sub(half);
            let hi = (j + half + 1).min(prefix.max(lo + 1));
            acc[lo..hi].iter().cloned().fold(0.0, f64::max)
        })
        .collect()
}

/// SnapKV's criterion for Attention Matching: the keys before the last [`SNAPKV_WINDOW`]
/// positions of highest pooled attention from the last `obs_rows` rows of `refs`
/// ([`observation_scores`]), `budget` in all, always including `fixed`. With the last
/// [`SNAPKV_WINDOW`] positions fixed (a budget of at least twice that) these are
/// [`select_snapkv`]'s tokens.
pub fn select_observation(
    refs: &HeadScores,
    obs_rows: usize,
    budget: usize,
    fixed: &[usize],
) -> Vec<usize> {
    let prefix = refs.n_k.saturating_sub(SNAPKV_WINDOW);
    select_top(&observation_scores(refs, obs_rows, prefix), budget, fixed)
}

/// Per key, the mean square of its attention probability over the rows of `refs`.
fn mean_square_attention(refs: &HeadScores) -> Vec<f64> {
    let mut ms = vec![0f64; refs.n_k];
    for i in 0..refs.n_q {
        for (j, m) in ms.iter_mut().enumerate() {
            let p = refs.prob(i, j) as f64;
            *m += p * p;
        }
    }
    ms
}

/// HighestAttnKeys: the keys of highest RMS attention probability over the reference queries,
/// `budget` in all, always including `fixed`.
pub fn select_highest_attention(refs: &HeadScores, budget: usize, fixed: &[usize]) -> Vec<usize> {
    select_top(&mean_square_attention(refs), budget, fixed)
}

/// H2O's heavy hitters over the reference queries: the keys of highest attention probability
/// summed over the rows, `budget` in all, always including `fixed`. On the context's own causal
/// queries, with the recent half fixed, these are [`select_h2o`]'s tokens.
pub fn select_accumulated(refs: &HeadScores, budget: usize, fixed: &[usize]) -> Vec<usize> {
    select_top(&accumulated_attention(refs), budget, fixed)
}

/// Per key, its attention probability summed over the rows of `refs` (H2O's score).
fn accumulated_attention(refs: &HeadScores) -> Vec<f64> {
    let n_k = refs.n_k;
    let mut acc = vec![0f64; n_k];
    for i in 0..refs.n_q {
        let l = refs.sum[i] as f64;
        if l > 0.0 {
            for (a, &e) in acc.iter_mut().zip(&refs.e[i * n_k..(i + 1) * n_k]) {
                *a += e as f64 / l;
            }
        }
    }
    acc
}

/// The `budget` keys of highest `score`, always including `fixed`.
fn select_top(score: &[f64], budget: usize, fixed: &[usize]) -> Vec<usize> {
    let n_k = score.len();
    let budget = budget.min(n_k);
    let mut is_fixed = vec![false; n_k];
    for &f in fixed {
        is_fixed[f] = true;
    }
    let free = budget.saturating_sub(fixed.len());
    let picked = top_n(score, (0..n_k).filter(|&j| !is_fixed[j]), free);
    sorted(picked.into_iter().chain(fixed.iter().copied()).collect())
}

/// Orthogonal matching pursuit on the attention mass, `budget` keys in all, always including
/// `fixed`. With a_ij = e_ij / Σ_k e_ik (row i's attention probabilities) and the target
/// b_i = 1 − Σ_{j fixed} a_ij, each step picks the key whose column correlates best with the
/// residual r = b − A_S w (correlation over the column's norm, positive only, since w ≥ 0),
/// then refits w ≥ 0 on the picked set by NNLS (`sweeps` coordinate-descent sweeps, warm
/// started). When no key correlates positively any more (the mass is matched), the rest of
/// the budget goes by highest RMS attention. Cost per step: one pass over the n × T scores.
pub fn select_omp(refs: &HeadScores, budget: usize, fixed: &[usize], sweeps: usize) -> Vec<usize> {
    let n_k = refs.n_k;
    let budget = budget.min(n_k);
    let mut chosen = vec![false; n_k];
    for &f in fixed {
        chosen[f] = true;
    }
    let free = budget.saturating_sub(fixed.len());
    let rows: Vec<usize> = (0..refs.n_q).filter(|&i| refs.sum[i] > 0.0).collect();
    let row = |i: usize| &refs.e[i * n_k..(i + 1) * n_k];
    let inv: Vec<f64> = rows.iter().map(|&i| 1.0 / refs.sum[i] as f64).collect();
    let b: Vec<f64> = rows
        .iter()
        .zip(&inv)
        .map(|(&i, &s)| 1.0 - fixed.iter().map(|&f| row(i)[f] as f64).sum::<f64>() * s)
        .collect();
    let mut norm2 = vec![0f64; n_k];
    for (&i, &s) in rows.iter().zip(&inv) {
        for (n, &e) in norm2.iter_mut().zip(row(i)) {
            let a = e as f64 * s;
            *n += a * a;
        }
    }
    let mut picked: Vec<usize> = Vec::with_capacity(free);
    let mut gram = DMatrix::<f64>::zeros(0, 0);
    let mut c = DVector::<f64>::zeros(0);
    let mut w = DVector::<f64>::zeros(0);
    let mut resid = b.clone();
    let mut corr = vec![0f64; n_k];
    while picked.len() < free {
        corr.fill(0.0);
        for ((&i, &s), &r) in rows.iter().zip(&inv).zip(&resid) {
            let rs = r * s;
            if rs != 0.0 {
                for (cj, &e) in corr.iter_mut().zip(row(i)) {
                    *cj += rs * e as f64;
                }
            }
        }
        let best = (0..n_k)
            .filter(|&j| !chosen[j] && norm2[j] > 0.0 && corr[j] > 0.0)
            .max_by(|&x, &y| {
                (corr[x] / norm2[x].sqrt())
                    .total_cmp(&(corr[y] / norm2[y].sqrt()))
                    .then(y.cmp(&x))
            });
        let Some(j) = best else { break };
        // Grow the normal equations by key j's column.
        let t = picked.len();
        let mut cross = vec![0f64; t];
        let mut cj = 0.0;
        for ((&i, &s), &bi) in rows.iter().zip(&inv).zip(&b) {
            let e = row(i);
            let aj = e[j] as f64 * s;
            if aj != 0.0 {
                cj += aj * bi;
                for (x, &p) in cross.iter_mut().zip(&picked) {
                    *x += aj * e[p] as f64 * s;
                }
            }
        }
        gram = gram.resize(t + 1, t + 1, 0.0);
        for (k, &x) in cross.iter().enumerate() {
            gram[(k, t)] = x;
            gram[(t, k)] = x;
        }
        gram[(t, t)] = norm2[j];
        c = c.push(cj);
        w = w.push((corr[j] / norm2[j]).max(0.0));
        picked.push(j);
        chosen[j] = true;
        nnls_gram(gram.clone(), &c, &mut w, sweeps, 1e-6);
        for ((&i, &s), (r, &bi)) in rows.iter().zip(&inv).zip(resid.iter_mut().zip(&b)) {
            let e = row(i);
            *r = bi
                - picked
                    .iter()
                    .zip(w.iter())
                    .map(|(&p, &wp)| e[p] as f64 * s * wp)
                    .sum::<f64>();
        }
    }
    if picked.len() < free {
        let ms = mean_square_attention(refs);
        let rest = top_n(&ms, (0..n_k).filter(|&j| !chosen[j]), free - picked.len());
        picked.extend(rest);
    }
    sorted(picked.into_iter().chain(fixed.iter().copied()).collect())
}

/// Attention Matching's fit for one head: given the kept positions `idx` (ascending) and which of
/// them are `fixed` (kept exact: β = 0, original value), fit β and the values of the others so
/// the reference queries' attention mass and outputs match the full head's. With `stored`
/// (the reference queries, `refs.n_q × d`, and how the cache stores keys), the kept keys' scores
/// are recomputed from the keys as stored, so β and the values compensate their error. Only
/// the rows from `first_row` on are fitted ([`FitOptions::fit_from`]; 0: every row).
#[allow(clippy::too_many_arguments)]
pub fn fit_head(
    refs: &HeadScores,
    first_row: usize,
    keys: &[f32],
    values: &[f32],
    d: usize,
    idx: &[usize],
    fixed: &[bool],
    opts: &FitOptions,
    stored: Option<(&[f32], Stored<'_>)>,
) -> HeadCompaction {
    let mut out = HeadCompaction::keep(keys, values, d, idx);
    let free: Vec<usize> = (0..idx.len()).filter(|&c| !fixed[c]).collect();
    let rows: Vec<usize> = (first_row.min(refs.n_q)..refs.n_q)
        .filter(|&i| refs.sum[i] > 0.0)
        .collect();
    if free.is_empty() || rows.is_empty() {
        return out;
    }
    let n = rows.len();
    // Per row, the kept keys' weights exp(s_ij − m_i): from the scores, or from the keys as
    // the cache will store them.
    let t = idx.len();
    let kept_e: Vec<f32> = match stored {
        Some((q, sk)) if q.len() == refs.n_q * d => {
            let seen = sk.seen(&out.keys, d);
            let scale = 1.0 / (d as f64).sqrt();
            let mut ke = vec![0f32; refs.n_q * t];
            for &i in &rows {
                let qi = &q[i * d..][..d];
                for (c, &j) in idx.iter().enumerate() {
                    // A key the row does not see (causal rows) stays unseen.
                    if refs.e[i * refs.n_k + j] == 0.0 {
                        continue;
                    }
                    let s: f64 = qi
                        .iter()
                        .zip(&seen[c * d..][..d])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    ke[i * t + c] = (s * scale - refs.max[i] as f64).exp() as f32;
                }
            }
            ke
        }
        _ => {
            let mut ke = vec![0f32; refs.n_q * t];
            for &i in &rows {
                for (c, &j) in idx.iter().enumerate() {
                    ke[i * t + c] = refs.e[i * refs.n_k + j];
                }
            }
            ke
        }
    };
    let kept = |i: usize| &kept_e[i * t..(i + 1) * t];
    // Mass: Σ_j e_ij w_j ≈ sum_i, each row divided by sum_i; fixed keys contribute w = 1.
    let mut a = DMatrix::<f64>::zeros(n, free.len());
    let mut b = DVector::<f64>::zeros(n);
    for (r, &i) in rows.iter().enumerate() {
        let inv = 1.0 / refs.sum[i] as f64;
        let erow = kept(i);
        let mut fixed_mass = 0.0;
        for c in 0..t {
            if fixed[c] {
                fixed_mass += erow[c] as f64;
            }
        }
        b[r] = 1.0 - fixed_mass * inv;
        for (f, &c) in free.iter().enumerate() {
            a[(r, f)] = erow[c] as f64 * inv;
        }
    }
    // Start from the best common weight.
    let a1 = a.column_sum();
    let w0 = (a1.dot(&b) / a1.dot(&a1).max(1e-300)).max(1e-3);
    let mut w = DVector::from_element(free.len(), w0);
    nnls(&a, &b, &mut w, opts.nnls_sweeps, 1e-6);
    let (lo, hi) = ((-BIAS_LIMIT).exp(), opts.max_bias.min(BIAS_LIMIT).exp());
    w.apply(|x| *x = x.clamp(lo, hi));
    let mut w_all = vec![1.0f64; idx.len()];
    for (f, &c) in free.iter().enumerate() {
        w_all[c] = w[f];
        out.bias[c] = w[f].ln() as f32;
    }
    // Values: p'_ij = e_ij w_j / Σ_k e_ik w_k; p'_free · X ≈ y_i − p'_fixed · v_fixed.
    let mut p_all = DMatrix::<f64>::zeros(n, t);
    let mut y = DMatrix::<f64>::zeros(n, d);
    for (r, &i) in rows.iter().enumerate() {
        let erow = kept(i);
        let den: f64 = erow.iter().zip(&w_all).map(|(&e, &wj)| e as f64 * wj).sum();
        if den <= 0.0 {
            continue;
        }
        for c in 0..d {
            y[(r, c)] = refs.y[i * d + c] as f64;
        }
        for (c, &j) in idx.iter().enumerate() {
            let pj = erow[c] as f64 * w_all[c] / den;
            p_all[(r, c)] = pj;
            if fixed[c] {
                for k in 0..d {
                    y[(r, k)] -= pj * values[j * d + k] as f64;
                }
            }
        }
    }
    let p = p_all.select_columns(&free);
    let prior = DMatrix::from_fn(free.len(), d, |f, k| values[idx[free[f]] * d + k] as f64);
    let x = ridge_toward(&p, &y, &prior, opts.value_ridge);
    for (f, &c) in free.iter().enumerate() {
        for k in 0..d {
            out.values[c * d + k] = x[(f, k)] as f32;
        }
    }
    if let Some((
        _,
        Stored {
            values: Some(codec),
            sinks,
            ..
        },
    )) = stored
    {
        // The cache's sinks are stored in f16: exact enough to need no feedback.
        let quantized: Vec<bool> = (0..t).map(|c| c >= sinks).collect();
        quantize_values_with_feedback(&p_all, &mut out.values, d, fixed, &quantized, codec);
    }
    out
}

/// GPTQ's relative damping: the Hessian's diagonal gets this share of its mean.
const FEEDBACK_DAMPING: f64 = 0.01;

/// Refits a head's kept values `values` (`t × d`) to the form the cache stores them in, so
/// that the attention outputs P·V over the rows of `p` (`n × t`, the fit's attention weights)
/// stay as the fit left them. Rows `c` with `quantized[c]` are encoded by `codec`; the others
/// are stored exactly (f16 sinks). Fixed rows keep their values; their quantization error is
/// taken up by the free rows at once. Then the free rows are quantized one at a time, the
/// largest diagonal of H = PᵀP first (GPTQ's order), and each one's error is taken up by the
/// free rows not yet quantized: with H⁻¹ over those rows, row k moves by −H⁻¹_kj/H⁻¹_jj times
/// row j's error, the least-squares correction (Frantar et al., GPTQ, arXiv 2210.17323, with
/// tokens in the place of weight columns). Each row stays in f32, as it was before its own
/// quantization, so the cache encodes it to the code this pass chose.
pub fn quantize_values_with_feedback(
    p: &DMatrix<f64>,
    values: &mut [f32],
    d: usize,
    fixed: &[bool],
    quantized: &[bool],
    codec: &crate::codec::Codec,
) {
    let t = p.ncols();
    if t == 0 || d == 0 {
        return;
    }
    let mut h = p.tr_mul(p);
    let damp = FEEDBACK_DAMPING * h.diagonal().sum() / t as f64 + 1e-12;
    for j in 0..t {
        h[(j, j)] += damp;
    }
    // One value as the codec stores it (the same encode and decode as the keys').
    let as_stored = Stored {
        codec,
        values: None,
        sinks: 0,
    };
    let seen = |row: &[f32]| as_stored.seen(row, d);
    let mut x = DMatrix::<f64>::from_fn(t, d, |c, k| values[c * d + k] as f64);
    let free: Vec<usize> = (0..t).filter(|&c| !fixed[c]).collect();
    if free.is_empty() {
        return;
    }
    // The fixed rows' errors, taken up by every free row: Δ_U = −H_UU⁻¹ H_UF E_F.
    let fixed_q: Vec<usize> = (0..t).filter(|&c| fixed[c] && quantized[c]).collect();
    if !fixed_q.is_empty() {
        let mut e = DMatrix::<f64>::zeros(fixed_q.len(), d);
        for (r, &c) in fixed_q.iter().enumerate() {
            let q = seen(&values[c * d..][..d]);
            for k in 0..d {
                e[(r, k)] = q[k] as f64 - x[(c, k)];
            }
        }
        let h_uu = h.select_rows(&free).select_columns(&free);
        let h_uf = h.select_rows(&free).select_columns(&fixed_q);
        if let Some(ch) = h_uu.cholesky() {
            let delta = ch.solve(&(h_uf * e));
            for (r, &c) in free.iter().enumerate() {
                for k in 0..d {
                    x[(c, k)] -= delta[(r, k)];
                }
            }
        }
    }
    // The free rows, one at a time.
    let Some(mut hinv) = h.select_rows(&free).select_columns(&free).try_inverse() else {
        return;
    };
    let mut live: Vec<bool> = vec![true; free.len()];
    let mut order: Vec<usize> = (0..free.len()).filter(|&f| quantized[free[f]]).collect();
    order.sort_by(|&a, &b| h[(free[b], free[b])].total_cmp(&h[(free[a], free[a])]));
    for &f in &order {
        let c = free[f];
        let row: Vec<f32> = (0..d).map(|k| x[(c, k)] as f32).collect();
        let q = seen(&row);
        let pivot = hinv[(f, f)];
        if pivot <= 0.0 {
            continue;
        }
        live[f] = false;
        for g in (0..free.len()).filter(|&g| live[g]) {
            let s = hinv[(g, f)] / pivot;
            if s == 0.0 {
                continue;
            }
            for k in 0..d {
                x[(free[g], k)] -= s * (row[k] as f64 - q[k] as f64);
            }
        }
        // Drop row f from the inverse: H⁻¹ ← H⁻¹ − H⁻¹_{:f} H⁻¹_{f:} / H⁻¹_ff.
        let col = hinv.column(f).clone_owned();
        hinv.ger(-1.0 / pivot, &col, &col, 1.0);
    }
    for &c in &free {
        for k in 0..d {
            values[c * d + k] = x[(c, k)] as f32;
        }
    }
}

/// The scores one head's compaction reads.
pub struct HeadInputs<'a> {
    /// `n_k × d` keys (post-RoPE).
    pub keys: &'a [f32],
    /// `n_k × d` values.
    pub values: &'a [f32],
    /// Head dimension.
    pub d: usize,
    /// The context's own queries (causal), rows ordered by position: H2O and SnapKV.
    pub context: Option<&'a HeadScores>,
    /// Query rows per position in `context` (query heads sharing this KV head).
    pub rows_per_position: usize,
    /// Reference queries (Attention Matching; for `am-mix` and `am-mix-window`, the mixed set;
    /// for `am-ctx` and `am-ctx-window`, the context's own queries).
    pub reference: Option<&'a HeadScores>,
    /// The queries of `reference`'s rows (`n_q × d`), for a fit to stored keys ([`FitFor`]).
    pub reference_queries: Option<&'a [f32]>,
}

impl HeadScores {
    /// The rows of `self` followed by those of `other` (same keys).
    pub fn concat(&self, other: &HeadScores) -> HeadScores {
        let cat = |a: &[f32], b: &[f32]| [a, b].concat();
        HeadScores {
            n_q: self.n_q + other.n_q,
            n_k: self.n_k,
            e: cat(&self.e, &other.e),
            max: cat(&self.max, &other.max),
            sum: cat(&self.sum, &other.sum),
            y: cat(&self.y, &other.y),
        }
    }
}

fn scores_for<'a>(
    s: Option<&'a HeadScores>,
    n_k: usize,
    method: Method,
    what: &str,
) -> Result<&'a HeadScores, CompactError> {
    s.filter(|s| s.n_k == n_k).ok_or_else(|| {
        CompactError::Invalid(format!(
            "{method} needs the {what} queries' scores over the head's {n_k} keys"
        ))
    })
}

/// Compact one head to `budget` tokens with `method`, Attention Matching picking its keys by
/// `selection`.
pub fn compact_head(
    method: Method,
    selection: Selection,
    inputs: &HeadInputs<'_>,
    budget: usize,
    opts: &FitOptions,
    stored: Option<Stored<'_>>,
) -> Result<HeadCompaction, CompactError> {
    let d = inputs.d;
    let n_k = inputs.keys.len() / d.max(1);
    let budget = budget.clamp(1, n_k.max(1));
    let need = |s, what| scores_for(s, n_k, method, what);
    let keep = |idx: Vec<usize>| HeadCompaction::keep(inputs.keys, inputs.values, d, &idx);
    // SnapKV's observation window: its positions' query rows (all heads sharing the KV head).
    let obs_rows = SNAPKV_WINDOW * inputs.rows_per_position.max(1);
    Ok(match method {
        Method::Streaming => keep(select_streaming(n_k, budget)),
        Method::H2o => keep(select_h2o(need(inputs.context, "context")?, budget)),
        Method::SnapKv => keep(select_snapkv(
            need(inputs.context, "context")?,
            obs_rows,
            budget,
        )),
        Method::Am
        | Method::AmWindow
        | Method::AmMix
        | Method::AmMixWindow
        | Method::AmCtx
        | Method::AmCtxWindow => {
            let refs = need(inputs.reference, "reference")?;
            let fixed_idx: Vec<usize> = if method.keeps_window() {
                let sinks = opts.window_sinks.min(budget / 2);
                let recent = ((budget as f64 * opts.recent_fraction) as usize)
                    .min(budget - sinks)
                    .min(n_k - sinks);
                sorted((0..sinks).chain(n_k - recent..n_k).collect())
            } else {
                Vec::new()
            };
            let idx = match selection {
                Selection::HighestAttention => select_highest_attention(refs, budget, &fixed_idx),
                Selection::Omp => select_omp(refs, budget, &fixed_idx, opts.nnls_sweeps),
                Selection::Accumulated => select_accumulated(refs, budget, &fixed_idx),
                Selection::Observation => select_observation(refs, obs_rows, budget, &fixed_idx),
            };
            let fixed: Vec<bool> = idx.iter().map(|j| fixed_idx.contains(j)).collect();
            // The rows the fit reads: the late context rows only, with `fit_from`.
            let first_row = if method.fits_context_queries() && opts.fit_from > 0.0 {
                let per = inputs.rows_per_position.max(1);
                let positions = refs.n_q / per;
                ((positions as f64 * opts.fit_from.min(1.0)) as usize)
                    .min(positions.saturating_sub(1))
                    * per
            } else {
                0
            };
            let stored = match (stored, inputs.reference_queries) {
                (Some(sk), Some(q)) if q.len() == refs.n_q * d => Some((q, sk)),
                (Some(_), _) => {
                    return Err(CompactError::Invalid(format!(
                        "a fit to stored keys needs the {} reference queries of the head",
                        refs.n_q
                    )))
                }
                _ => None,
            };
            fit_head(
                refs,
                first_row,
                inputs.keys,
                inputs.values,
                d,
                &idx,
                &fixed,
                opts,
                stored,
            )
        }
    })
}

#[cfg(test)]
mod tests;
