//! The transformer's GPU kernels (`shaders/model/*.wgsl`): matmul on weights in their GGUF
//! blocks, embedding gather, RMSNorm, RoPE, SwiGLU, residual add and argmax.
//!
//! Matmul has two layouts of the same arithmetic ([`MatmulKernel`]): invocations splitting a
//! row's columns for GPUs, and one invocation per row with the input in a uniform buffer for CPU
//! adapters (lavapipe, llvmpipe, SwiftShader), which pay for every storage load.
//!
//! Every `*_into` function records dispatches into a [`Batch`] and submits nothing, so a whole
//! forward pass is one submission. Activations are f32, row-major, one row per token. Next to each
//! kernel is its CPU reference (`*_ref`), which the tests compare it with.
//!
//! ```no_run
//! # fn demo(gpu: &kvpack::gpu::Gpu, w: &kvpack::model::weights::QTensor)
//! #     -> Result<(), kvpack::model::ops::OpsError> {
//! use kvpack::model::ops::matmul_into;
//! let x = gpu.upload("x", &vec![0.5f32; w.cols]);
//! let y = gpu.zeros::<f32>("y", w.rows);
//! let mut batch = gpu.batch("one matmul");
//! matmul_into(gpu, &mut batch, w, &x, 1, &y)?;
//! batch.submit();
//! let y = gpu.read_blocking(&y)?;
//! # let _ = y; Ok(()) }
//! ```

use crate::gpu::{grid, Batch, Binding, Gpu, GpuError, GpuVec};
use crate::model::weights::{QTensor, WeightError};

/// Errors of the model kernels: wrong sizes (a bug in the caller) or a GPU failure.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The GPU layer failed (pipeline creation, readback).
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A weight could not be read.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// A buffer is shorter than the shapes need.
    #[error("{op}: buffer `{what}` holds {got} values, the shapes need {need}")]
    Size {
        /// The operation.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Values needed.
        need: usize,
        /// Values held.
        got: usize,
    },
    /// Shapes the kernel does not take.
    #[error("{op}: {reason}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What is wrong, with the values.
        reason: String,
    },
}

fn check_len(
    op: &'static str,
    what: &'static str,
    got: usize,
    need: usize,
) -> Result<(), OpsError> {
    if got < need {
        return Err(OpsError::Size {
            op,
            what,
            need,
            got,
        });
    }
    Ok(())
}

/// Workgroup size of the elementwise kernels and of the per-row reductions.
const WG_ROW: u32 = 256;

fn elementwise_grid(n: usize) -> [u32; 3] {
    grid((n as u32).div_ceil(WG_ROW))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    rows: u32,
    cols: u32,
    n_tok: u32,
    tok_tiles: u32,
    y_stride: u32,
    y_offset: u32,
    x_first: u32,
    _pad: u32,
}

/// Which matmul kernel runs. Both compute the same sums from the same GGUF blocks; they differ in
/// how the work is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulKernel {
    /// [`MatmulKernel::Rows`] on CPU adapters (lavapipe, llvmpipe, SwiftShader) when the input
    /// row fits a uniform buffer, [`MatmulKernel::Columns`] elsewhere.
    #[default]
    Auto,
    /// `model/matmul`: the invocations of a workgroup split a row's columns and meet in a tree;
    /// X read from its storage buffer. For GPUs: coalesced weight reads.
    Columns,
    /// `model/matmul_cpu`: an invocation owns 2–4 rows and reads each block once with the fewest
    /// loads, X copied into a uniform buffer (one copy per tile of tokens). For CPU adapters,
    /// where every storage load costs and uniform reads are nearly free: on lavapipe about 4×
    /// faster than `Columns` for one token and 15× for a 64-token prompt. Falls back to
    /// `Columns` when one row of X exceeds the 64 KiB uniform tile.
    Rows,
}

/// How a matmul reads its input and writes its output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatmulOptions {
    /// First row (token) of X read; Y's row 0 is X's row `x_first_tok` (e.g. logits of the last
    /// prompt token only).
    pub x_first_tok: usize,
    /// Add the product to Y instead of overwriting it (the residual connection, fused).
    pub accumulate: bool,
    /// The kernel; [`MatmulKernel::Auto`] picks by adapter.
    pub kernel: MatmulKernel,
}

/// Invocations per matmul workgroup.
const MATMUL_WG: u32 = 64;

/// (invocations per row, tokens per workgroup) for a matmul shape. Lanes: the largest power of
/// two up to 32 that divides the row's 8-value units, so no lane idles (576 columns: 72 units,
/// 8 lanes); tokens: 1 for decode, up to 8 for a prompt.
fn matmul_layout(cols: usize, n_tok: usize) -> (u32, u32) {
    let units = (cols / 8).max(1);
    let lanes = 1usize << units.trailing_zeros().min(5);
    let toks = n_tok.next_power_of_two().min(8);
    (lanes as u32, toks as u32)
}

/// Record `Y = X · Wᵀ`: `Y[t][r] = Σ_c X[t][c] · W[r][c]` for `t < n_tok`, X `n_tok × w.cols`,
/// Y `n_tok × w.rows`, W dequantized from its GGUF blocks inside the kernel.
pub fn matmul_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    w: &QTensor,
    x: &GpuVec<f32>,
    n_tok: usize,
    y: &GpuVec<f32>,
) -> Result<(), OpsError> {
    matmul_with(gpu, batch, w, x, n_tok, y, MatmulOptions::default())
}

/// Record `Y += X · Wᵀ` (see [`matmul_into`]): the output projections write into the residual.
pub fn matmul_add_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    w: &QTensor,
    x: &GpuVec<f32>,
    n_tok: usize,
    y: &GpuVec<f32>,
) -> Result<(), OpsError> {
    let opts = MatmulOptions {
        accumulate: true,
        ..Default::default()
    };
    matmul_with(gpu, batch, w, x, n_tok, y, opts)
}

/// [`matmul_into`] with [`MatmulOptions`]: X rows `[x_first_tok, x_first_tok + n_tok)` are read.
pub fn matmul_with(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    w: &QTensor,
    x: &GpuVec<f32>,
    n_tok: usize,
    y: &GpuVec<f32>,
    opts: MatmulOptions,
) -> Result<(), OpsError> {
    const OP: &str = "matmul";
    if n_tok == 0 {
        return Ok(());
    }
    check_len(OP, "x", x.len(), (opts.x_first_tok + n_tok) * w.cols)?;
    check_len(OP, "y", y.len(), n_tok * w.rows)?;
    if use_rows_kernel(gpu, w, opts.kernel) {
        return matmul_rows(gpu, batch, w, x, n_tok, y, opts);
    }
    let (lanes, toks) = matmul_layout(w.cols, n_tok);
    let kernel = gpu.pipeline(
        "model/matmul",
        "main",
        &[
            ("WTYPE", w.ggml_type.id() as f64),
            ("WG", MATMUL_WG as f64),
            ("LANES", lanes as f64),
            ("TOKS", toks as f64),
            ("ACCUMULATE", if opts.accumulate { 1.0 } else { 0.0 }),
        ],
        &[Binding::Uniform, Binding::READ, Binding::READ, Binding::RW],
    )?;
    let tok_tiles = n_tok.div_ceil(toks as usize) as u32;
    let rows_per_wg = MATMUL_WG / lanes;
    for chunk in &w.chunks {
        let params = MatmulParams {
            rows: chunk.rows as u32,
            cols: w.cols as u32,
            n_tok: n_tok as u32,
            tok_tiles,
            y_stride: w.rows as u32,
            y_offset: chunk.row_start as u32,
            x_first: opts.x_first_tok as u32,
            _pad: 0,
        };
        let ub = gpu.uniform("matmul params", &params);
        let row_tiles = (chunk.rows as u32).div_ceil(rows_per_wg);
        batch.dispatch(
            &kernel,
            &[&ub, chunk.words.buffer(), x.buffer(), y.buffer()],
            grid(row_tiles * tok_tiles),
        );
    }
    Ok(())
}

/// Bytes of the uniform buffer that holds a tile of X for [`MatmulKernel::Rows`] (WebGPU's
/// default `max_uniform_buffer_binding_size`; the WGSL declares exactly this size).
const X_TILE_BYTES: usize = 65536;

/// Largest tile of tokens [`MatmulKernel::Rows`] accumulates at once (registers per invocation).
const ROWS_MAX_TOKS: usize = 16;

fn use_rows_kernel(gpu: &Gpu, w: &QTensor, kernel: MatmulKernel) -> bool {
    let fits = w.cols * 4 <= X_TILE_BYTES
        && gpu.limits().max_uniform_buffer_binding_size >= X_TILE_BYTES as u64;
    match kernel {
        MatmulKernel::Columns => false,
        MatmulKernel::Rows => fits,
        MatmulKernel::Auto => fits && gpu.report().device_type == "Cpu",
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulRowsParams {
    rows: u32,
    cols: u32,
    n_tok: u32,
    y_stride: u32,
    y_offset: u32,
    y_first: u32,
    _pad: [u32; 2],
}

/// [`MatmulKernel::Rows`]: per tile of tokens, copy X's rows into a uniform buffer, then one
/// dispatch per weight chunk.
fn matmul_rows(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    w: &QTensor,
    x: &GpuVec<f32>,
    n_tok: usize,
    y: &GpuVec<f32>,
    opts: MatmulOptions,
) -> Result<(), OpsError> {
    let max_toks = (X_TILE_BYTES / (w.cols * 4)).min(ROWS_MAX_TOKS);
    let toks = n_tok.next_power_of_two().min(max_toks);
    // Rows per invocation: each X value read serves them all; 64 rows per workgroup. Measured on
    // lavapipe (SmolLM2 shapes): 2 is best for one token, 4 for a prompt (3.0 s vs 5.4 s with 1).
    let rows_per_inv: u32 = if toks == 1 { 2 } else { 4 };
    let wg = 64 / rows_per_inv;
    let kernel = gpu.pipeline(
        "model/matmul_cpu",
        "main",
        &[
            ("WTYPE", w.ggml_type.id() as f64),
            ("WG", wg as f64),
            ("ROWS", rows_per_inv as f64),
            ("TOKS", toks as f64),
            ("ACCUMULATE", if opts.accumulate { 1.0 } else { 0.0 }),
        ],
        &[
            Binding::Uniform,
            Binding::READ,
            Binding::Uniform,
            Binding::RW,
        ],
    )?;
    for t0 in (0..n_tok).step_by(toks) {
        let nt = toks.min(n_tok - t0);
        let tile = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("matmul x tile"),
            size: X_TILE_BYTES as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let row_bytes = (w.cols * 4) as u64;
        batch.copy(
            x.buffer(),
            (opts.x_first_tok + t0) as u64 * row_bytes,
            &tile,
            0,
            nt as u64 * row_bytes,
        );
        for chunk in &w.chunks {
            let params = MatmulRowsParams {
                rows: chunk.rows as u32,
                cols: w.cols as u32,
                n_tok: nt as u32,
                y_stride: w.rows as u32,
                y_offset: chunk.row_start as u32,
                y_first: t0 as u32,
                _pad: [0; 2],
            };
            let ub = gpu.uniform("matmul params", &params);
            batch.dispatch(
                &kernel,
                &[&ub, chunk.words.buffer(), &tile, y.buffer()],
                grid((chunk.rows as u32).div_ceil(wg * rows_per_inv)),
            );
        }
    }
    Ok(())
}

/// CPU reference of [`matmul_into`] on dequantized weights `w` (`rows × cols`), accumulated in f64.
pub fn matmul_ref(w: &[f32], rows: usize, cols: usize, x: &[f32], n_tok: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n_tok * rows];
    for t in 0..n_tok {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let s: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            y[t * rows + r] = s as f32;
        }
    }
    y
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n_tok: u32,
    cols: u32,
    row_start: u32,
    rows: u32,
    total_rows: u32,
    _pad: [u32; 3],
}

/// Record `out[t] = W[ids[t]]` for `t < n_tok`, rows dequantized to f32 (`out`: `n_tok × w.cols`).
/// An id ≥ `w.rows` gives a zero row.
pub fn embed_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    w: &QTensor,
    ids: &GpuVec<u32>,
    n_tok: usize,
    out: &GpuVec<f32>,
) -> Result<(), OpsError> {
    const OP: &str = "embed";
    if n_tok == 0 {
        return Ok(());
    }
    check_len(OP, "ids", ids.len(), n_tok)?;
    check_len(OP, "out", out.len(), n_tok * w.cols)?;
    let kernel = gpu.pipeline(
        "model/embed",
        "main",
        &[("WTYPE", w.ggml_type.id() as f64), ("WG", 64.0)],
        &[Binding::Uniform, Binding::READ, Binding::READ, Binding::RW],
    )?;
    for chunk in &w.chunks {
        let params = EmbedParams {
            n_tok: n_tok as u32,
            cols: w.cols as u32,
            row_start: chunk.row_start as u32,
            rows: chunk.rows as u32,
            total_rows: w.rows as u32,
            _pad: [0; 3],
        };
        let ub = gpu.uniform("embed params", &params);
        batch.dispatch(
            &kernel,
            &[&ub, chunk.words.buffer(), ids.buffer(), out.buffer()],
            grid(n_tok as u32),
        );
    }
    Ok(())
}

/// CPU reference of [`embed_into`] on dequantized weights `w` (rows of `cols`).
pub fn embed_ref(w: &[f32], cols: usize, ids: &[u32]) -> Vec<f32> {
    let rows = w.len() / cols;
    ids.iter()
        .flat_map(|&id| {
            let id = id as usize;
            if id < rows {
                w[id * cols..(id + 1) * cols].to_vec()
            } else {
                vec![0.0; cols]
            }
        })
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    n_rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

/// Record RMSNorm of `n_tok` rows of `dim`: `y = x · w / sqrt(mean(x²) + eps)` (`w`: `dim` f32).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    x: &GpuVec<f32>,
    w: &GpuVec<f32>,
    n_tok: usize,
    dim: usize,
    eps: f32,
    y: &GpuVec<f32>,
) -> Result<(), OpsError> {
    const OP: &str = "rmsnorm";
    if n_tok == 0 {
        return Ok(());
    }
    check_len(OP, "x", x.len(), n_tok * dim)?;
    check_len(OP, "w", w.len(), dim)?;
    check_len(OP, "y", y.len(), n_tok * dim)?;
    let kernel = gpu.pipeline(
        "model/rmsnorm",
        "main",
        &[("WG", WG_ROW as f64)],
        &[Binding::Uniform, Binding::READ, Binding::READ, Binding::RW],
    )?;
    let params = NormParams {
        n_rows: n_tok as u32,
        dim: dim as u32,
        eps,
        _pad: 0,
    };
    let ub = gpu.uniform("rmsnorm params", &params);
    batch.dispatch(
        &kernel,
        &[&ub, x.buffer(), w.buffer(), y.buffer()],
        grid(n_tok as u32),
    );
    Ok(())
}

/// CPU reference of [`rmsnorm_into`] (rows of `dim`; sums in f64).
pub fn rmsnorm_ref(x: &[f32], w: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let scale = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(w)
                .map(move |(&v, &g)| (v as f64 * scale * g as f64) as f32)
        })
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    n_tok: u32,
    n_heads: u32,
    head_dim: u32,
    pos0: u32,
    inv_freq: [[f32; 4]; 32],
}

/// Largest head dimension [`rope_into`] takes.
pub const ROPE_MAX_HEAD_DIM: usize = 256;

/// RoPE frequencies `base^(−2i/head_dim)` for `i < head_dim / 2`, computed in f64, stored as f32.
pub fn rope_inv_freq(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (base as f64).powf(-2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

/// Record RoPE in place on `x` (`n_tok × n_heads × head_dim`), adjacent pairs `(x[2i], x[2i+1])`
/// of each head rotated by `θ = pos · base^(−2i/head_dim)`, `pos = pos0 + t`. The angle is
/// `f32(pos) · f32(frequency)` as in llama.cpp; positions up to 2^17 keep it accurate.
#[allow(clippy::too_many_arguments)]
pub fn rope_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    x: &GpuVec<f32>,
    n_tok: usize,
    n_heads: usize,
    head_dim: usize,
    pos0: usize,
    base: f32,
) -> Result<(), OpsError> {
    const OP: &str = "rope";
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > ROPE_MAX_HEAD_DIM {
        return Err(OpsError::Shape {
            op: OP,
            reason: format!("head_dim {head_dim} must be even and at most {ROPE_MAX_HEAD_DIM}"),
        });
    }
    if n_tok == 0 || n_heads == 0 {
        return Ok(());
    }
    check_len(OP, "x", x.len(), n_tok * n_heads * head_dim)?;
    let kernel = gpu.pipeline(
        "model/rope",
        "main",
        &[("WG", WG_ROW as f64)],
        &[Binding::Uniform, Binding::RW],
    )?;
    let mut inv_freq = [[0.0f32; 4]; 32];
    for (i, f) in rope_inv_freq(head_dim, base).into_iter().enumerate() {
        inv_freq[i / 4][i % 4] = f;
    }
    let params = RopeParams {
        n_tok: n_tok as u32,
        n_heads: n_heads as u32,
        head_dim: head_dim as u32,
        pos0: pos0 as u32,
        inv_freq,
    };
    let ub = gpu.uniform("rope params", &params);
    batch.dispatch(
        &kernel,
        &[&ub, x.buffer()],
        elementwise_grid(n_tok * n_heads * head_dim / 2),
    );
    Ok(())
}

/// CPU reference of [`rope_into`], in place (the angle rounded to f32 as the kernel does, its
/// cosine and sine in f64).
pub fn rope_ref(x: &mut [f32], n_heads: usize, head_dim: usize, pos0: usize, base: f32) {
    let inv_freq = rope_inv_freq(head_dim, base);
    for (t, tok) in x.chunks_mut(n_heads * head_dim).enumerate() {
        let pos = (pos0 + t) as f32;
        for head in tok.chunks_mut(head_dim) {
            for (i, pair) in head.chunks_mut(2).enumerate() {
                let theta = (pos * inv_freq[i]) as f64;
                let (s, c) = theta.sin_cos();
                let (x0, x1) = (pair[0] as f64, pair[1] as f64);
                pair[0] = (x0 * c - x1 * s) as f32;
                pair[1] = (x0 * s + x1 * c) as f32;
            }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LenParams {
    n: u32,
    _pad: [u32; 3],
}

/// Record an elementwise kernel over `n` values: a `LenParams` uniform at binding 0, then
/// `buffers` with the given bindings.
fn elementwise(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    shader: &str,
    bindings: &[Binding],
    buffers: &[&wgpu::Buffer],
    n: usize,
) -> Result<(), OpsError> {
    let mut layout = vec![Binding::Uniform];
    layout.extend_from_slice(bindings);
    let kernel = gpu.pipeline(shader, "main", &[("WG", WG_ROW as f64)], &layout)?;
    let ub = gpu.uniform(
        shader,
        &LenParams {
            n: n as u32,
            _pad: [0; 3],
        },
    );
    let mut all = vec![&ub];
    all.extend_from_slice(buffers);
    batch.dispatch(&kernel, &all, elementwise_grid(n));
    Ok(())
}

/// Record `out = silu(gate) · up` over `n` values, `silu(g) = g / (1 + e^−g)`.
pub fn swiglu_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    gate: &GpuVec<f32>,
    up: &GpuVec<f32>,
    n: usize,
    out: &GpuVec<f32>,
) -> Result<(), OpsError> {
    const OP: &str = "swiglu";
    if n == 0 {
        return Ok(());
    }
    check_len(OP, "gate", gate.len(), n)?;
    check_len(OP, "up", up.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    elementwise(
        gpu,
        batch,
        "model/swiglu",
        &[Binding::READ, Binding::READ, Binding::RW],
        &[gate.buffer(), up.buffer(), out.buffer()],
        n,
    )
}

/// CPU reference of [`swiglu_into`].
pub fn swiglu_ref(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

/// Record `x += y` over `n` values.
pub fn add_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    x: &GpuVec<f32>,
    y: &GpuVec<f32>,
    n: usize,
) -> Result<(), OpsError> {
    const OP: &str = "add";
    if n == 0 {
        return Ok(());
    }
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "y", y.len(), n)?;
    elementwise(
        gpu,
        batch,
        "model/add",
        &[Binding::RW, Binding::READ],
        &[x.buffer(), y.buffer()],
        n,
    )
}

/// CPU reference of [`add_into`], in place.
pub fn add_ref(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ArgmaxParams {
    n_rows: u32,
    n_cols: u32,
    _pad: [u32; 2],
}

/// Record `out[r] = argmax_c x[r][c]` for `n_rows` rows of `n_cols` (greedy decoding without
/// reading the logits back). Ties go to the smallest index; NaN never wins over a number.
pub fn argmax_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    x: &GpuVec<f32>,
    n_rows: usize,
    n_cols: usize,
    out: &GpuVec<u32>,
) -> Result<(), OpsError> {
    const OP: &str = "argmax";
    if n_rows == 0 {
        return Ok(());
    }
    if n_cols == 0 {
        return Err(OpsError::Shape {
            op: OP,
            reason: "rows of 0 values have no largest value".into(),
        });
    }
    check_len(OP, "x", x.len(), n_rows * n_cols)?;
    check_len(OP, "out", out.len(), n_rows)?;
    let kernel = gpu.pipeline(
        "model/argmax",
        "main",
        &[("WG", WG_ROW as f64)],
        &[Binding::Uniform, Binding::READ, Binding::RW],
    )?;
    let ub = gpu.uniform(
        "argmax params",
        &ArgmaxParams {
            n_rows: n_rows as u32,
            n_cols: n_cols as u32,
            _pad: [0; 2],
        },
    );
    batch.dispatch(
        &kernel,
        &[&ub, x.buffer(), out.buffer()],
        grid(n_rows as u32),
    );
    Ok(())
}

/// CPU reference of [`argmax_into`] (rows of `n_cols`).
pub fn argmax_ref(x: &[f32], n_cols: usize) -> Vec<u32> {
    x.chunks(n_cols)
        .map(|row| {
            let mut best: Option<(f32, usize)> = None;
            for (c, &v) in row.iter().enumerate() {
                let wins = match best {
                    None => true,
                    Some((b, _)) => v > b || (b.is_nan() && !v.is_nan()),
                };
                if wins {
                    best = Some((v, c));
                }
            }
            best.map_or(u32::MAX, |(_, c)| c as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fill_every_lane() {
        assert_eq!(matmul_layout(576, 1), (8, 1));
        assert_eq!(matmul_layout(1536, 1), (32, 1));
        assert_eq!(matmul_layout(32, 3), (4, 4));
        assert_eq!(matmul_layout(576, 64), (8, 8));
    }

    #[test]
    fn references_on_small_cases() {
        assert_eq!(argmax_ref(&[1.0, 3.0, 3.0, f32::NAN, 0.0, -1.0], 3), [1, 1]);
        assert_eq!(argmax_ref(&[f32::NAN, 2.0], 2), [1]);
        let y = rmsnorm_ref(&[3.0, 4.0], &[1.0, 2.0], 2, 0.0);
        let s = (12.5f64).sqrt();
        assert!((y[0] as f64 - 3.0 / s).abs() < 1e-6 && (y[1] as f64 - 8.0 / s).abs() < 1e-6);
        let mut x = [1.0f32, 0.0, 1.0, 0.0];
        rope_ref(&mut x, 1, 4, 1, 10000.0);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!((x[2] - 0.01f32.cos()).abs() < 1e-6 && (x[3] - 0.01f32.sin()).abs() < 1e-6);
        assert_eq!(
            matmul_ref(&[1.0, 2.0, 3.0, 4.0], 2, 2, &[1.0, 1.0], 1),
            [3.0, 7.0]
        );
    }
}
