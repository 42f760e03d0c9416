//! Attention of reference queries over one KV head (`shaders/compact/scores.wgsl`) and its CPU
//! reference: the row-shifted weights, per-row max and mass, and the attention outputs that
//! every selection and fit in this module reads.

use crate::gpu::{grid, Binding, Gpu, GpuError};

/// Attention of `n_q` query rows over `n_k` keys of one head.
#[derive(Clone, Debug, Default)]
pub struct HeadScores {
    /// Query rows.
    pub n_q: usize,
    /// Keys.
    pub n_k: usize,
    /// `n_q × n_k` row-shifted weights exp(s_ij − m_i); 0 for keys a row does not see.
    pub e: Vec<f32>,
    /// Per row, the largest score m_i.
    pub max: Vec<f32>,
    /// Per row, Σ_j e_ij: the row's attention mass is exp(m_i) · sum_i.
    pub sum: Vec<f32>,
    /// `n_q × d` attention outputs Σ_j p_ij v_j.
    pub y: Vec<f32>,
}

impl HeadScores {
    /// Attention probability of key `j` for row `i`.
    pub fn prob(&self, i: usize, j: usize) -> f32 {
        let l = self.sum[i];
        if l > 0.0 {
            self.e[i * self.n_k + j] / l
        } else {
            0.0
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_q: u32,
    n_k: u32,
    scale: f32,
    _pad: u32,
}

fn check(q: &[f32], lens: &[u32], k: &[f32], v: &[f32], d: usize) -> Result<(), GpuError> {
    if d == 0
        || d > 256
        || !q.len().is_multiple_of(d)
        || !k.len().is_multiple_of(d)
        || k.len() != v.len()
    {
        return Err(GpuError::Invalid(format!(
            "scores need d in 1..=256 and whole vectors: d {d}, {} query, {} key, {} value floats",
            q.len(),
            k.len(),
            v.len()
        )));
    }
    if lens.len() != q.len() / d {
        return Err(GpuError::Invalid(format!(
            "{} visible lengths for {} query rows",
            lens.len(),
            q.len() / d
        )));
    }
    Ok(())
}

/// How [`head_scores_with`] lays out its work. Both kernels compute the same sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScoresKernel {
    /// [`ScoresKernel::Rows`] on CPU adapters (lavapipe, llvmpipe, SwiftShader),
    /// [`ScoresKernel::Workgroup`] elsewhere.
    #[default]
    Auto,
    /// `compact/scores`: one workgroup per query row, its invocations splitting the keys and
    /// meeting in tree reductions. For GPUs.
    Workgroup,
    /// `compact/scores_rows`: one invocation per query row, every invocation reading the same key
    /// at once, so a CPU adapter's SIMD lanes need no reductions across invocations (on
    /// lavapipe the reference scores of a 1,024-token context, 3,072 rows over 1,024 keys in
    /// each of 90 heads, took 50 s instead of 110 s). Head dimensions that are not a multiple of
    /// 4 fall back to `Workgroup`.
    Rows,
}

/// Score query rows `q` (`n_q × d`) against keys `k` and values `v` (`n_k × d`); row `i` sees the
/// first `lens[i]` keys. Rows are processed in slices whose weights fit one storage binding.
pub async fn head_scores(
    gpu: &Gpu,
    q: &[f32],
    lens: &[u32],
    k: &[f32],
    v: &[f32],
    d: usize,
) -> Result<HeadScores, GpuError> {
    head_scores_with(gpu, ScoresKernel::Auto, q, lens, k, v, d).await
}

/// [`head_scores`] with a chosen kernel layout.
pub async fn head_scores_with(
    gpu: &Gpu,
    kernel: ScoresKernel,
    q: &[f32],
    lens: &[u32],
    k: &[f32],
    v: &[f32],
    d: usize,
) -> Result<HeadScores, GpuError> {
    check(q, lens, k, v, d)?;
    let (n_q, n_k) = (q.len() / d, k.len() / d);
    let mut out = HeadScores {
        n_q,
        n_k,
        ..Default::default()
    };
    if n_q == 0 {
        return Ok(out);
    }
    let rows_layout = match kernel {
        ScoresKernel::Auto => gpu.report().device_type == "Cpu",
        ScoresKernel::Workgroup => false,
        ScoresKernel::Rows => true,
    } && d.is_multiple_of(4);
    let wg = 64usize;
    let (shader, per_group) = if rows_layout {
        ("compact/scores_rows", wg)
    } else {
        ("compact/scores", 1)
    };
    let kernel = gpu.pipeline(
        shader,
        "main",
        &[("D", d as f64), ("WG", wg as f64)],
        &[
            Binding::Uniform,
            Binding::READ,
            Binding::READ,
            Binding::READ,
            Binding::READ,
            Binding::RW,
            Binding::RW,
            Binding::RW,
        ],
    )?;
    let max_binding = gpu.limits().max_storage_buffer_binding_size as usize;
    let rows_per_slice = (max_binding / 4 / n_k.max(1)).clamp(1, 4096).min(n_q);
    let kb = gpu.upload("compact keys", &pad(k));
    let vb = gpu.upload("compact values", &pad(v));
    out.e.reserve(n_q * n_k);
    for first in (0..n_q).step_by(rows_per_slice) {
        let rows = rows_per_slice.min(n_q - first);
        let qb = gpu.upload("compact queries", &q[first * d..(first + rows) * d]);
        let lb = gpu.upload("compact lens", &lens[first..first + rows]);
        let eb = gpu.zeros::<f32>("compact weights", (rows * n_k).max(1));
        let sb = gpu.zeros::<f32>("compact stats", 2 * rows);
        let yb = gpu.zeros::<f32>("compact outputs", rows * d);
        let ub = gpu.uniform(
            "compact params",
            &Params {
                n_q: rows as u32,
                n_k: n_k as u32,
                scale: 1.0 / (d as f32).sqrt(),
                _pad: 0,
            },
        );
        let mut b = gpu.batch("compact scores");
        b.dispatch(
            &kernel,
            &[
                &ub,
                qb.buffer(),
                kb.buffer(),
                vb.buffer(),
                lb.buffer(),
                eb.buffer(),
                sb.buffer(),
                yb.buffer(),
            ],
            grid(rows.div_ceil(per_group) as u32),
        );
        b.submit();
        let e = gpu.read(&eb).await?;
        out.e.extend_from_slice(&e[..rows * n_k]);
        let s = gpu.read(&sb).await?;
        for r in 0..rows {
            out.max.push(s[2 * r]);
            out.sum.push(s[2 * r + 1]);
        }
        out.y.extend(gpu.read(&yb).await?);
    }
    Ok(out)
}

/// An empty key set still needs a non-empty buffer (one vec4).
fn pad(x: &[f32]) -> Vec<f32> {
    if x.is_empty() {
        vec![0.0; 4]
    } else {
        x.to_vec()
    }
}

/// CPU reference of [`head_scores`], in f64.
pub fn reference_head_scores(
    q: &[f32],
    lens: &[u32],
    k: &[f32],
    v: &[f32],
    d: usize,
) -> Result<HeadScores, GpuError> {
    check(q, lens, k, v, d)?;
    let (n_q, n_k) = (q.len() / d, k.len() / d);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = HeadScores {
        n_q,
        n_k,
        e: vec![0.0; n_q * n_k],
        max: vec![0.0; n_q],
        sum: vec![0.0; n_q],
        y: vec![0.0; n_q * d],
    };
    for i in 0..n_q {
        let len = (lens[i] as usize).min(n_k);
        if len == 0 {
            continue;
        }
        let qi = &q[i * d..][..d];
        let s: Vec<f64> = (0..len)
            .map(|j| {
                let kj = &k[j * d..][..d];
                qi.iter()
                    .zip(kj)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        for (o, &wj) in out.e[i * n_k..i * n_k + len].iter_mut().zip(&w) {
            *o = wj as f32;
        }
        out.max[i] = m as f32;
        out.sum[i] = l as f32;
        for c in 0..d {
            let acc: f64 = (0..len).map(|j| w[j] * v[j * d + c] as f64).sum();
            out.y[i * d + c] = (acc / l) as f32;
        }
    }
    Ok(out)
}
