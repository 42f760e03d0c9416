//! Attention of reference queries over one KV head (`shaders/compact/scores.wgsl`) and its CPU
//! reference: the row-shifted weights, per-row max and mass, and the attention outputs that
//! every selection and fit in this module reads.

use crate::gpu::{grid, Binding, BufferRange, Gpu, GpuError, GpuVec};

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
    /// `compact/scores_rows`: one invocation per query row, the keys and values in 64 KiB tiles
    /// bound as uniform buffers that every invocation reads at the same index: CPU adapters
    /// broadcast uniform reads for free where every storage read costs. Head dimensions that
    /// are not a multiple of 4 fall back to `Workgroup`.
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
    let max_binding = gpu.limits().max_storage_buffer_binding_size as usize;
    let rows_per_slice = (max_binding / 4 / n_k.max(1)).clamp(1, 4096).min(n_q);
    if rows_layout {
        return scores_rows(gpu, out, q, lens, k, v, d, rows_per_slice).await;
    }
    let kernel = gpu.pipeline(
        "compact/scores",
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
    let kb = gpu.upload("compact keys", &pad(k));
    let vb = gpu.upload("compact values", &pad(v));
    out.e.reserve(n_q * n_k);
    for first in (0..n_q).step_by(rows_per_slice) {
        let rows = rows_per_slice.min(n_q - first);
        let Slice { qb, lb, eb, sb, yb } = Slice::new(gpu, q, lens, first, rows, n_k, d);
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
            grid(rows as u32),
        );
        b.submit();
        read_slice(gpu, &mut out, rows, &eb, &sb, &yb).await?;
    }
    Ok(out)
}

/// One slice of query rows: their queries and visible lengths, and the weights, stats and
/// outputs the kernel writes.
struct Slice {
    qb: GpuVec<f32>,
    lb: GpuVec<u32>,
    eb: GpuVec<f32>,
    sb: GpuVec<f32>,
    yb: GpuVec<f32>,
}

impl Slice {
    fn new(
        gpu: &Gpu,
        q: &[f32],
        lens: &[u32],
        first: usize,
        rows: usize,
        n_k: usize,
        d: usize,
    ) -> Slice {
        Slice {
            qb: gpu.upload("compact queries", &q[first * d..(first + rows) * d]),
            lb: gpu.upload("compact lens", &lens[first..first + rows]),
            eb: gpu.zeros("compact weights", (rows * n_k).max(1)),
            sb: gpu.zeros("compact stats", 2 * rows),
            yb: gpu.zeros("compact outputs", rows * d),
        }
    }
}

/// Append one slice's weights, maxima, sums and outputs to `out`.
async fn read_slice(
    gpu: &Gpu,
    out: &mut HeadScores,
    rows: usize,
    eb: &GpuVec<f32>,
    sb: &GpuVec<f32>,
    yb: &GpuVec<f32>,
) -> Result<(), GpuError> {
    let e = gpu.read(eb).await?;
    out.e.extend_from_slice(&e[..rows * out.n_k]);
    let s = gpu.read(sb).await?;
    for r in 0..rows {
        out.max.push(s[2 * r]);
        out.sum.push(s[2 * r + 1]);
    }
    out.y.extend(gpu.read(yb).await?);
    Ok(())
}

/// Floats in one key or value tile of `compact/scores_rows`: a 64 KiB uniform buffer
/// (WebGPU's default `max_uniform_buffer_binding_size`; the WGSL declares exactly this size).
const TILE_FLOATS: usize = 16384;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TileParams {
    n_q: u32,
    n_k: u32,
    scale: f32,
    tile_first: u32,
    tile_len: u32,
    phase: u32,
    first: u32,
    last: u32,
}

/// [`ScoresKernel::Rows`]: keys and values in 64 KiB tiles bound as uniform ranges, one dispatch
/// per (pass, tile).
#[allow(clippy::too_many_arguments)]
async fn scores_rows(
    gpu: &Gpu,
    mut out: HeadScores,
    q: &[f32],
    lens: &[u32],
    k: &[f32],
    v: &[f32],
    d: usize,
    rows_per_slice: usize,
) -> Result<HeadScores, GpuError> {
    let (n_q, n_k) = (out.n_q, out.n_k);
    let wg = 64usize;
    let kernel = gpu.pipeline(
        "compact/scores_rows",
        "main",
        &[("D", d as f64), ("WG", wg as f64)],
        &[
            Binding::Uniform,
            Binding::READ,
            Binding::Uniform,
            Binding::READ,
            Binding::RW,
            Binding::RW,
            Binding::RW,
        ],
    )?;
    let tile_tokens = TILE_FLOATS / d;
    let n_tiles = n_k.div_ceil(tile_tokens).max(1);
    let tiles = |label: &str, x: &[f32]| -> GpuVec<f32> {
        let b = gpu.zeros_uniform::<f32>(label, n_tiles * TILE_FLOATS);
        b.write(gpu, x);
        b
    };
    let kb = tiles("compact key tiles", k);
    let vb = tiles("compact value tiles", v);
    out.e.reserve(n_q * n_k);
    for first in (0..n_q).step_by(rows_per_slice) {
        let rows = rows_per_slice.min(n_q - first);
        let Slice { qb, lb, eb, sb, yb } = Slice::new(gpu, q, lens, first, rows, n_k, d);
        let mut b = gpu.batch("compact scores");
        for pass in 0..2u32 {
            let page = if pass == 0 { &kb } else { &vb };
            for t in 0..n_tiles {
                let tile_first = t * tile_tokens;
                let ub = gpu.uniform(
                    "compact params",
                    &TileParams {
                        n_q: rows as u32,
                        n_k: n_k as u32,
                        scale: 1.0 / (d as f32).sqrt(),
                        tile_first: tile_first as u32,
                        tile_len: tile_tokens.min(n_k.saturating_sub(tile_first)) as u32,
                        phase: pass,
                        first: (t == 0) as u32,
                        last: (t + 1 == n_tiles) as u32,
                    },
                );
                b.dispatch_ranges(
                    &kernel,
                    &[
                        BufferRange::whole(&ub),
                        BufferRange::whole(qb.buffer()),
                        BufferRange {
                            buffer: page.buffer(),
                            offset: (t * TILE_FLOATS * 4) as u64,
                            size: Some((TILE_FLOATS * 4) as u64),
                        },
                        BufferRange::whole(lb.buffer()),
                        BufferRange::whole(eb.buffer()),
                        BufferRange::whole(sb.buffer()),
                        BufferRange::whole(yb.buffer()),
                    ],
                    grid(rows.div_ceil(wg) as u32),
                );
            }
        }
        b.submit();
        read_slice(gpu, &mut out, rows, &eb, &sb, &yb).await?;
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
