//! Compaction of a whole context: every layer and KV head, several (method, budget) jobs at once
//! so the scores, the costly part, are computed once per head and shared.

use super::{allocate_budgets, compact_head, fit_error, head_scores, CompactError};
use super::{CompactedContext, FitOptions, HeadBudgets, HeadCompaction, HeadInputs, Job};
use super::{HeadScores, Method, Stored, BUDGET_FACTORS, MIN_HEAD_TOKENS, SNAPKV_WINDOW};

/// Post-RoPE queries, keys and values of every layer, recorded while a model read a text.
#[derive(Clone, Debug, Default)]
pub struct Captured {
    /// Tokens recorded. Compaction reads only the first `tokens` positions of the buffers
    /// (position-major), so a lower value stands for a prefix of the recording, without a copy.
    pub tokens: usize,
    /// Per layer, `tokens × n_head × head_dim` queries (after RoPE).
    pub q: Vec<Vec<f32>>,
    /// Per layer, `tokens × n_kv_heads × head_dim` keys (after RoPE); empty unless recorded.
    pub k: Vec<Vec<f32>>,
    /// Per layer, `tokens × n_kv_heads × head_dim` values; empty unless recorded.
    pub v: Vec<Vec<f32>>,
}

/// Head layout of the model whose context is compacted.
#[derive(Clone, Copy, Debug)]
pub struct ContextShape {
    /// Layers.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// Where the time of [`compact_context`] went, in seconds.
#[derive(Clone, Debug, Default)]
pub struct CompactTimings {
    /// Scores of the context's own queries (H2O, SnapKV), all layers and heads.
    pub context_scores_s: f64,
    /// Scores of the reference queries (Attention Matching), all layers and heads.
    pub reference_scores_s: f64,
    /// Selection and fit of each job, all layers and heads.
    pub fit_s: Vec<f64>,
}

#[cfg(not(target_arch = "wasm32"))]
fn now_s() -> f64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}

#[cfg(target_arch = "wasm32")]
fn now_s() -> f64 {
    0.0
}

/// Rows `(position, query head of the group)` of one KV head, as a contiguous `rows × d` block.
fn gather_queries(q: &[f32], shape: &ContextShape, h: usize, positions: &[usize]) -> Vec<f32> {
    let (d, group) = (shape.head_dim, shape.n_head / shape.n_kv_heads);
    let mut out = Vec::with_capacity(positions.len() * group * d);
    for &p in positions {
        for g in 0..group {
            let hq = h * group + g;
            out.extend_from_slice(&q[(p * shape.n_head + hq) * d..][..d]);
        }
    }
    out
}

/// Evenly spaced `n` of `0..total` (all of them when `n ≥ total`).
fn spread(total: usize, n: usize) -> Vec<usize> {
    if n >= total {
        return (0..total).collect();
    }
    (0..n).map(|i| i * total / n).collect()
}

/// Candidate compactions of one head at several sizes, with their [`fit_error`].
type Candidates = Vec<(usize, f64, HeadCompaction)>;

/// Compact the context recorded in `context` (its keys, values and own queries) for every job
/// ([`Job`]). With [`HeadBudgets::Sensitivity`], Attention Matching
/// jobs keep that many tokens per head on average, shared among heads by measured error. `reference` holds the reference queries (Attention
/// Matching's "repeat the context" prefill), of which at most `max_reference_positions`
/// evenly spaced positions are used per KV head (all query heads of its group at each).
pub async fn compact_context(
    gpu: &crate::gpu::Gpu,
    shape: ContextShape,
    context: &Captured,
    reference: Option<&Captured>,
    jobs: &[Job],
    max_reference_positions: usize,
    opts: &FitOptions,
) -> Result<(Vec<CompactedContext>, CompactTimings), CompactError> {
    let (d, nkv, t_ctx) = (shape.head_dim, shape.n_kv_heads, context.tokens);
    let group = shape.n_head / nkv.max(1);
    if context.k.len() != shape.n_layer || context.v.len() != shape.n_layer {
        return Err(CompactError::Invalid(format!(
            "the capture holds keys of {} layers and values of {}; the model has {}",
            context.k.len(),
            context.v.len(),
            shape.n_layer
        )));
    }
    for job in jobs {
        if let HeadBudgets::PerLayer(b) = &job.head_budgets {
            if b.len() != shape.n_layer || b.contains(&0) {
                return Err(CompactError::Invalid(format!(
                    "per-layer budgets {b:?}: one size ≥ 1 per layer expected, {} layers",
                    shape.n_layer
                )));
            }
        }
    }
    let needs_ref = jobs.iter().any(|j| j.method.needs_reference_queries());
    let needs_h2o = jobs.iter().any(|j| j.method.needs_context_queries());
    let needs_mix = jobs.iter().any(|j| j.method.mixes_references());
    let needs_snap = jobs.iter().any(|j| j.method == Method::SnapKv);
    let reference = match (needs_ref, reference) {
        (true, None) => {
            return Err(CompactError::Invalid(
                "Attention Matching needs reference queries".into(),
            ))
        }
        (_, r) => r,
    };
    // Context rows: every position for H2O, the observation window for SnapKV alone.
    let ctx_positions: Vec<usize> = if needs_h2o {
        (0..t_ctx).collect()
    } else if needs_snap {
        (t_ctx.saturating_sub(SNAPKV_WINDOW)..t_ctx).collect()
    } else {
        Vec::new()
    };
    let ctx_lens: Vec<u32> = ctx_positions
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p as u32 + 1, group))
        .collect();
    let ref_positions = reference
        .map(|r| spread(r.tokens, max_reference_positions))
        .unwrap_or_default();
    let ref_lens = vec![t_ctx as u32; ref_positions.len() * group];
    let mut timings = CompactTimings {
        fit_s: vec![0.0; jobs.len()],
        ..Default::default()
    };
    // Per job with sensitivity budgets, every head's candidates, layer-major.
    let mut candidates: Vec<Option<Vec<Candidates>>> = jobs
        .iter()
        .map(|job| {
            (job.head_budgets == HeadBudgets::Sensitivity && job.method.is_attention_matching())
                .then(Vec::new)
        })
        .collect();
    let mut out: Vec<CompactedContext> = jobs
        .iter()
        .map(|_| CompactedContext {
            context_len: t_ctx,
            head_dim: d,
            layers: Vec::with_capacity(shape.n_layer),
        })
        .collect();
    for l in 0..shape.n_layer {
        for o in out.iter_mut() {
            o.layers.push(Vec::with_capacity(nkv));
        }
        // Per job fitted to a cache's stored tokens, this layer's key codec (and value codec,
        // when the values are refitted to their stored form).
        type LayerCodecs = (crate::codec::Codec, Option<crate::codec::Codec>, usize);
        let stored_codecs: Vec<Option<LayerCodecs>> = jobs
            .iter()
            .map(|job| match job.fit_for {
                Some(f) if job.method.is_attention_matching() => {
                    crate::kv::layer_codecs(f.format_of(l, shape.n_layer), d, f.seed, l)
                        .map(|(k, v)| Some((k, f.values.then_some(v), f.sinks)))
                        .map_err(|e| CompactError::Invalid(format!("layer {l}: {e}")))
                }
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let needs_queries = stored_codecs.iter().any(Option::is_some);
        for h in 0..nkv {
            let gather_kv = |x: &[f32]| -> Vec<f32> {
                (0..t_ctx)
                    .flat_map(|p| &x[(p * nkv + h) * d..][..d])
                    .copied()
                    .collect()
            };
            let keys = gather_kv(&context.k[l]);
            let values = gather_kv(&context.v[l]);
            let t0 = now_s();
            let ctx_q = (!ctx_positions.is_empty())
                .then(|| gather_queries(&context.q[l], &shape, h, &ctx_positions));
            let ctx_scores: Option<HeadScores> = match &ctx_q {
                Some(q) => Some(head_scores(gpu, q, &ctx_lens, &keys, &values, d).await?),
                None => None,
            };
            let t1 = now_s();
            let ref_q = match reference {
                Some(r) if needs_ref => Some(gather_queries(&r.q[l], &shape, h, &ref_positions)),
                _ => None,
            };
            let ref_scores: Option<HeadScores> = match &ref_q {
                Some(q) => Some(head_scores(gpu, q, &ref_lens, &keys, &values, d).await?),
                None => None,
            };
            let t2 = now_s();
            timings.context_scores_s += t1 - t0;
            timings.reference_scores_s += t2 - t1;
            let mixed = match (&ref_scores, &ctx_scores) {
                (Some(r), Some(c)) if needs_mix => Some(r.concat(c)),
                _ => None,
            };
            let mixed_q = match (&ref_q, &ctx_q) {
                (Some(r), Some(c)) if needs_mix && needs_queries => Some([&r[..], c].concat()),
                _ => None,
            };
            let inputs = HeadInputs {
                keys: &keys,
                values: &values,
                d,
                context: ctx_scores.as_ref(),
                rows_per_position: group,
                reference: ref_scores.as_ref(),
                reference_queries: ref_q.as_deref(),
            };
            let mixed_inputs = HeadInputs {
                reference: mixed.as_ref(),
                reference_queries: mixed_q.as_deref(),
                ..inputs
            };
            let context_inputs = HeadInputs {
                reference: ctx_scores.as_ref(),
                reference_queries: ctx_q.as_deref(),
                ..inputs
            };
            for (j, job) in jobs.iter().enumerate() {
                let (method, selection) = (job.method, job.selection);
                let opts = job.fit.as_ref().unwrap_or(opts);
                let budget = match &job.head_budgets {
                    HeadBudgets::PerLayer(b) if method.is_attention_matching() => b[l],
                    _ => job.budget,
                };
                let stored = stored_codecs[j]
                    .as_ref()
                    .map(|(codec, values, sinks)| Stored {
                        codec,
                        values: values.as_ref(),
                        sinks: *sinks,
                    });
                let s = now_s();
                let which = if method.mixes_references() {
                    &mixed_inputs
                } else if method.fits_context_queries() {
                    &context_inputs
                } else {
                    &inputs
                };
                if let (Some(per_head), Some(refs)) = (&mut candidates[j], which.reference) {
                    let mut sizes: Vec<usize> = BUDGET_FACTORS
                        .iter()
                        .map(|f| {
                            ((budget as f64 * f).round() as usize)
                                .clamp(MIN_HEAD_TOKENS.min(t_ctx), t_ctx)
                        })
                        .collect();
                    sizes.dedup();
                    let mut c: Candidates = Vec::with_capacity(sizes.len());
                    for t in sizes {
                        let hc = compact_head(method, selection, which, t, opts, stored)?;
                        c.push((hc.len(), fit_error(refs, &hc, d), hc));
                    }
                    per_head.push(c);
                } else {
                    let hc = compact_head(method, selection, which, budget, opts, stored)?;
                    out[j].layers[l].push(hc);
                }
                timings.fit_s[j] += now_s() - s;
            }
        }
    }
    for (j, c) in candidates.into_iter().enumerate() {
        let Some(per_head) = c else { continue };
        let s = now_s();
        let sizes: Vec<Vec<(usize, f64)>> = per_head
            .iter()
            .map(|c| c.iter().map(|(t, e, _)| (*t, *e)).collect())
            .collect();
        let total = jobs[j].budget.min(t_ctx) * per_head.len();
        let pick = allocate_budgets(&sizes, total);
        for (i, (mut c, k)) in per_head.into_iter().zip(pick).enumerate() {
            out[j].layers[i / nkv].push(c.swap_remove(k).2);
        }
        timings.fit_s[j] += now_s() - s;
    }
    Ok((out, timings))
}
