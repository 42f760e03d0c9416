//! Attention computed directly on compressed KV pages (`shaders/attention/decode.wgsl` and
//! `combine.wgsl`): no dequantized copy of the cache is ever made. Keys are scored against the
//! query rotated once into the key format's domain; values are accumulated in their own domain and
//! rotated back once per output. GQA, causal positions for prompt chunks, split-K over long
//! contexts, ragged heads and an optional per-key bias (Attention Matching's β).

use crate::codec::gpu::{format_constants, scale_base, GpuCodec};
use crate::codec::VecFormat;
use crate::gpu::{grid, Batch, Binding, BufferRange, Gpu, GpuError, GpuVec};

/// Head layout of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (`n_heads` a multiple of it).
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// The compressed K and V of one layer: one page each, vectors addressed by page index; head `h`'s
/// tokens are `heads[2h] .. heads[2h] + heads[2h + 1]`.
pub struct KvPages<'a> {
    /// Key codec (format, rotation, codebook).
    pub k_codec: &'a GpuCodec,
    /// Value codec.
    pub v_codec: &'a GpuCodec,
    /// Key page.
    pub k_page: &'a GpuVec<u32>,
    /// Value page.
    pub v_page: &'a GpuVec<u32>,
    /// Capacity of both pages in vectors.
    pub capacity: usize,
    /// `(first page index, length)` per KV head.
    pub heads: &'a GpuVec<u32>,
    /// Largest head length (sizes the split-K grid).
    pub max_len: usize,
    /// Optional additive bias per page index (compaction's β).
    pub bias: Option<&'a GpuVec<f32>>,
    /// Tokens at the start of every head that this region leaves out (another region, such as
    /// the full-precision attention sinks, holds them).
    pub skip: usize,
    /// How the value page stores its vectors.
    pub values: ValueStore,
    /// 0: token t of a head is at page index `first + t`; else the head's tokens are a ring of
    /// this many slots and token t is at `first + t % ring` (the window of recent tokens).
    pub ring: usize,
    /// Which of the visible tokens (by position) this region holds.
    pub recent: Recent,
    /// The keys were stored centered, `k − μ` with `μ` per KV head (`n_kv_heads × head_dim`
    /// floats): attention adds `⟨q, μ⟩/√d` to every score of the region. Not with `bias` (both
    /// would take the same binding: eight storage buffers is the portable limit).
    pub center: Option<&'a GpuVec<f32>>,
    /// 0, or the tokens appended to the cache since a ragged load put every earlier token in
    /// the pages ([`crate::kv::KvCache::load_ragged`]): a query's window of recent tokens
    /// ([`Recent::Before`], [`Recent::Last`]) then covers at most the appended tokens up to its
    /// own position.
    pub appended: usize,
}

/// How a region's value page stores its vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueStore {
    /// `v_codec`'s codes.
    Codes,
    /// Plain f32 in `v_codec`'s rotated domain ([`GpuCodec::encode_rotated_f32_into`]).
    RotatedF32,
    /// f16 in `v_codec`'s rotated domain ([`GpuCodec::encode_rotated_f16_into`]).
    RotatedF16,
}

/// Which tokens of a region a query sees, besides causality: counted in positions back from the
/// query's own (the query's own position is the first of its last `n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recent {
    /// Every visible token.
    All,
    /// All but the query's last `n` positions (a compressed region beside a window of recent
    /// tokens).
    Before(usize),
    /// Only the query's last `n` positions (the window of recent tokens).
    Last(usize),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DecodeParams {
    n_q: u32,
    n_heads: u32,
    group: u32,
    n_splits: u32,
    split_len: u32,
    k_scale_base: u32,
    v_scale_base: u32,
    scale: f32,
    total_len: u32,
    skip: u32,
    split_base: u32,
    split_stride: u32,
    ring: u32,
    recent: u32,
    recent_mode: u32,
    appended: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CombineParams {
    n_q: u32,
    n_heads: u32,
    n_splits: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TilesParams {
    n_kv: u32,
    n_tiles: u32,
    tile: u32,
    k_words: u32,
    v_words: u32,
    skip: u32,
    block_base: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowsParams {
    n_q: u32,
    n_heads: u32,
    group: u32,
    head: u32,
    tile: u32,
    tile_len: u32,
    total_len: u32,
    skip: u32,
    split_base: u32,
    split_stride: u32,
    recent: u32,
    recent_mode: u32,
    scale: f32,
    appended: u32,
    _pad: [u32; 2],
}

/// Tokens per split-K workgroup: long contexts spread over many workgroups, short ones use one.
pub const SPLIT_TOKENS: usize = 512;

/// Words of one tile of the prompt-row kernel: 64 KiB, WebGPU's default
/// `max_uniform_buffer_binding_size` (and the tile's alignment in the scratch).
const TILE_WORDS: usize = 16384;

/// Scratch for split-K partials, and the kernel variant; reuse it across calls of the same or
/// smaller size.
pub struct AttentionScratch {
    partials: GpuVec<f32>,
    /// Look TurboQuant codebook entries up by selects on the code's bits rather than by an
    /// indexed load. On by default on CPU adapters (lavapipe, llvmpipe, SwiftShader), where an
    /// indexed load is a SIMD gather: 1.4x faster 3-bit decode attention on lavapipe.
    pub codebook_selects: bool,
    /// One workgroup serves all the query heads of a KV head (GQA), reading and decoding each
    /// key and value once for them, where the group fits (at most 4 heads, group × head_dim ≤
    /// 256); otherwise one workgroup per query head. On by default.
    pub share_kv_heads: bool,
    /// Each invocation scores keys against its own copy of the queries rather than reading
    /// them from workgroup memory, which CPU adapters turn into gathers. On by default on CPU
    /// adapters (1.2x faster f16 decode attention on lavapipe); a register hog on GPUs.
    pub private_queries: bool,
    /// Prompt chunks (n_q ≥ 2) over plain f32/f16 keys and values use
    /// `shaders/attention/prompt_rows.wgsl`: one invocation per query row, each tile of keys
    /// and values bound as a uniform buffer (a broadcast on CPU adapters, where storage and
    /// workgroup loads are per-lane gathers). On by default on CPU adapters; regions it does not
    /// cover (codebook formats, the ring of recent tokens, centered keys) keep the split-K
    /// kernel.
    pub prompt_rows: bool,
    /// The prompt-row kernel's tiles: per region, KV head and tile, 64 KiB of keys, then 64 KiB
    /// of values.
    tiles: GpuVec<u32>,
}

impl AttentionScratch {
    /// Scratch for `n_q` positions over contexts up to `max_len` tokens.
    /// Room is left for two extra regions of up to [`SPLIT_TOKENS`] tokens each beside the main
    /// one (attention sinks, the window of recent tokens).
    /// On CPU adapters, room for the prompt-row kernel's splits (tiles of 16384 / head_dim
    /// tokens at the smallest, f32) and tiles too.
    pub fn new(gpu: &Gpu, shape: AttentionShape, n_q: usize, max_len: usize) -> Self {
        let cpu = gpu.report().device_type == "Cpu";
        let d = shape.head_dim;
        let rows = cpu && n_q >= 2 && rows_head_dim(d);
        let split_tokens = if rows {
            (TILE_WORDS / d).min(SPLIT_TOKENS)
        } else {
            SPLIT_TOKENS
        };
        let n_splits = max_len.div_ceil(split_tokens).max(1) + 2;
        let floats = n_q * shape.n_heads * n_splits * (2 + 2 * d);
        let tile_words = if rows {
            2 * shape.n_kv_heads * n_splits * TILE_WORDS
        } else {
            4
        };
        AttentionScratch {
            partials: gpu.zeros("attention partials", floats),
            codebook_selects: cpu,
            share_kv_heads: true,
            private_queries: cpu,
            prompt_rows: cpu,
            tiles: gpu.zeros_uniform("attention tiles", tile_words),
        }
    }
}

/// Head dimensions the prompt-row kernel handles (its private arrays hold 128 floats; f16 keys
/// are read eight at a time).
fn rows_head_dim(d: usize) -> bool {
    d.is_multiple_of(8) && d <= 128
}

/// Words per vector of a plain (codebook-free) format, whose domain is the identity.
fn plain_words(format: &VecFormat, d: usize) -> Option<usize> {
    match format {
        VecFormat::F32 => Some(d),
        VecFormat::F16 => Some(d / 2),
        _ => None,
    }
}

/// `(tokens per tile, key words, value words)` of the prompt-row kernel for this region, when it
/// applies: plain f32/f16 keys and values (values in the main region's domain count too: the
/// kernel only sums them), no ring, no centered keys, no window-only region.
fn rows_plan(kv: &KvPages<'_>, d: usize, n_q: usize) -> Option<(usize, usize, usize)> {
    if n_q < 2
        || !rows_head_dim(d)
        || kv.ring != 0
        || kv.center.is_some()
        || matches!(kv.recent, Recent::Last(_))
    {
        return None;
    }
    let k_words = plain_words(&kv.k_codec.codec().format(), d)?;
    let v_words = match kv.values {
        ValueStore::Codes => plain_words(&kv.v_codec.codec().format(), d)?,
        ValueStore::RotatedF32 => d,
        ValueStore::RotatedF16 => d / 2,
    };
    Some((TILE_WORDS / k_words.max(v_words), k_words, v_words))
}

fn region_splits(kv: &KvPages<'_>, tile: Option<usize>) -> usize {
    let tokens = match kv.recent {
        Recent::Last(n) => n.min(kv.max_len.saturating_sub(kv.skip)),
        _ => kv.max_len.saturating_sub(kv.skip),
    };
    tokens.div_ceil(tile.unwrap_or(SPLIT_TOKENS)).max(1)
}

/// Record attention of `n_q` query positions (`q`: n_q × n_heads × head_dim, the last `n_q` tokens
/// of the cache, causal) over one or more regions of compressed pages, writing `out` (same shape
/// as `q`). `regions[0]` is the main cache, whose `max_len` is the cache's length; further regions
/// (the full-precision attention sinks) hold tokens the main one skips, with values in the main
/// region's value domain. The softmax spans all regions: each writes split-K partials that one
/// combine merges, with one inverse rotation per output.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_into(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    shape: AttentionShape,
    regions: &[KvPages<'_>],
    q: &GpuVec<f32>,
    n_q: usize,
    scratch: &AttentionScratch,
    out: &GpuVec<f32>,
) -> Result<(), GpuError> {
    let d = shape.head_dim;
    let main = regions
        .first()
        .ok_or_else(|| GpuError::Invalid("attention needs at least one KV region".into()))?;
    let mut plans: Vec<Option<(usize, usize, usize)>> = regions
        .iter()
        .map(|kv| {
            if scratch.prompt_rows {
                rows_plan(kv, d, n_q)
            } else {
                None
            }
        })
        .collect();
    let splits = |plans: &[Option<(usize, usize, usize)>]| -> Vec<usize> {
        regions
            .iter()
            .zip(plans)
            .map(|(kv, p)| region_splits(kv, p.map(|p| p.0)))
            .collect()
    };
    let mut n_splits = splits(&plans);
    let tile_blocks: usize = n_splits
        .iter()
        .zip(&plans)
        .filter(|(_, p)| p.is_some())
        .map(|(n, _)| 2 * shape.n_kv_heads * n)
        .sum();
    let rows_need = n_q * shape.n_heads * n_splits.iter().sum::<usize>() * (2 + 2 * d);
    if tile_blocks * TILE_WORDS > scratch.tiles.len() || rows_need > scratch.partials.len() {
        // Scratch made for another adapter or size: the split-K kernel everywhere.
        plans.iter_mut().for_each(|p| *p = None);
        n_splits = splits(&plans);
    }
    let stride: usize = n_splits.iter().sum();
    let need = n_q * shape.n_heads * stride * (2 + 2 * d);
    if scratch.partials.len() < need {
        return Err(GpuError::Invalid(format!(
            "attention scratch holds {} floats, {need} needed: make it for max_len {}",
            scratch.partials.len(),
            main.max_len
        )));
    }
    let wg = d.max(128);
    let group = shape.n_heads / shape.n_kv_heads;
    // Query heads per workgroup: the kernel's private arrays hold 4, its qk array 256 floats
    // and its weights 512.
    let gq = if scratch.share_kv_heads && group <= 4 && group * d <= 256 && group * wg <= 512 {
        group
    } else {
        1
    };
    let mut split_base = 0;
    let mut block_base = 0;
    for ((kv, &n_splits), plan) in regions.iter().zip(&n_splits).zip(&plans) {
        let total_len = if std::ptr::eq(kv, main) {
            0
        } else {
            main.max_len as u32
        };
        if let Some((tile, k_words, v_words)) = *plan {
            prompt_rows(
                gpu,
                batch,
                shape,
                kv,
                q,
                n_q,
                scratch,
                RowsRegion {
                    tile,
                    k_words,
                    v_words,
                    n_tiles: n_splits,
                    total_len,
                    split_base,
                    split_stride: stride,
                    block_base,
                },
            )?;
            split_base += n_splits;
            block_base += 2 * shape.n_kv_heads * n_splits;
            continue;
        }
        let mut constants = vec![
            ("D", d as f64),
            ("WG", wg as f64),
            ("HAS_BIAS", if kv.bias.is_some() { 1.0 } else { 0.0 }),
            (
                "CB_SELECT",
                if scratch.codebook_selects { 1.0 } else { 0.0 },
            ),
            ("HAS_CENTER", if kv.center.is_some() { 1.0 } else { 0.0 }),
            ("GQ", gq as f64),
            ("Q_PRIVATE", if scratch.private_queries { 1.0 } else { 0.0 }),
        ];
        let k_format = kv.k_codec.codec().format();
        let v_format = kv.v_codec.codec().format();
        constants.extend(format_constants("K_", &k_format));
        match kv.values {
            ValueStore::Codes => constants.extend(format_constants("", &v_format)),
            ValueStore::RotatedF32 | ValueStore::RotatedF16 => {
                let kind = if kv.values == ValueStore::RotatedF32 {
                    7.0
                } else {
                    8.0
                };
                constants.extend([("FMT_KIND", kind), ("FMT_BITS_A", 0.0), ("FMT_BITS_B", 0.0)]);
            }
        }
        let kernel = gpu.pipeline(
            "attention/decode",
            "main",
            &constants,
            &[
                Binding::Uniform,
                Binding::READ,
                Binding::READ,
                Binding::READ,
                Binding::READ,
                Binding::READ,
                Binding::READ,
                Binding::READ,
                Binding::RW,
            ],
        )?;
        let (recent_mode, recent) = match kv.recent {
            Recent::All => (0, 0),
            Recent::Before(n) => (1, n),
            Recent::Last(n) => (2, n),
        };
        let params = DecodeParams {
            n_q: n_q as u32,
            n_heads: shape.n_heads as u32,
            group: group as u32,
            n_splits: n_splits as u32,
            split_len: SPLIT_TOKENS as u32,
            k_scale_base: scale_base(&k_format, d, kv.capacity) as u32,
            v_scale_base: scale_base(&v_format, d, kv.capacity) as u32,
            scale: 1.0 / (d as f32).sqrt(),
            // The main region's queries are the last n_q tokens of each (possibly ragged) head;
            // a prefix region (sinks) places them after the main region's length.
            total_len,
            skip: kv.skip as u32,
            split_base: split_base as u32,
            split_stride: stride as u32,
            ring: kv.ring as u32,
            recent: recent as u32,
            recent_mode,
            appended: kv.appended as u32,
        };
        split_base += n_splits;
        let ub = gpu.uniform("attention params", &params);
        // Bias or key means share binding 7; it must be bound even when unused (the page is a
        // harmless stand-in).
        let bias = match (kv.bias, kv.center) {
            (Some(_), Some(_)) => {
                return Err(GpuError::Invalid(
                    "a KV region cannot have both a per-key bias and centered keys".into(),
                ))
            }
            (Some(b), None) | (None, Some(b)) => b.buffer(),
            (None, None) => kv.k_page.buffer(),
        };
        batch.dispatch(
            &kernel,
            &[
                &ub,
                q.buffer(),
                kv.k_page.buffer(),
                kv.k_codec.aux().buffer(),
                kv.v_page.buffer(),
                kv.v_codec.aux().buffer(),
                kv.heads.buffer(),
                bias,
                scratch.partials.buffer(),
            ],
            grid((n_q * (shape.n_heads / gq) * n_splits) as u32),
        );
    }
    let v_format = main.v_codec.codec().format();
    let mut cconst = vec![("D", d as f64), ("WG", d.clamp(32, 256) as f64)];
    cconst.extend(format_constants("", &v_format));
    let combine = gpu.pipeline(
        "attention/combine",
        "main",
        &cconst,
        &[
            Binding::Uniform,
            Binding::READ,
            Binding::READ,
            Binding::READ,
            Binding::RW,
        ],
    )?;
    let cp = CombineParams {
        n_q: n_q as u32,
        n_heads: shape.n_heads as u32,
        n_splits: stride as u32,
        _pad: 0,
    };
    let cub = gpu.uniform("combine params", &cp);
    batch.dispatch(
        &combine,
        &[
            &cub,
            scratch.partials.buffer(),
            main.v_page.buffer(),
            main.v_codec.aux().buffer(),
            out.buffer(),
        ],
        grid((n_q * shape.n_heads) as u32),
    );
    Ok(())
}

/// Where one region's prompt-row dispatches read and write.
struct RowsRegion {
    tile: usize,
    k_words: usize,
    v_words: usize,
    n_tiles: usize,
    total_len: u32,
    split_base: usize,
    split_stride: usize,
    block_base: usize,
}

/// Record the prompt-row kernel over one region: gather its tiles, then one dispatch per (KV
/// head, tile) with that tile's keys and values bound as uniform buffers.
#[allow(clippy::too_many_arguments)]
fn prompt_rows(
    gpu: &Gpu,
    batch: &mut Batch<'_>,
    shape: AttentionShape,
    kv: &KvPages<'_>,
    q: &GpuVec<f32>,
    n_q: usize,
    scratch: &AttentionScratch,
    r: RowsRegion,
) -> Result<(), GpuError> {
    let d = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let gather = gpu.pipeline(
        "attention/prompt_tiles",
        "main",
        &[],
        &[
            Binding::Uniform,
            Binding::READ,
            Binding::READ,
            Binding::READ,
            Binding::RW,
        ],
    )?;
    let tp = TilesParams {
        n_kv: shape.n_kv_heads as u32,
        n_tiles: r.n_tiles as u32,
        tile: r.tile as u32,
        k_words: r.k_words as u32,
        v_words: r.v_words as u32,
        skip: kv.skip as u32,
        block_base: r.block_base as u32,
        _pad: 0,
    };
    let tub = gpu.uniform("prompt tiles params", &tp);
    batch.dispatch(
        &gather,
        &[
            &tub,
            kv.heads.buffer(),
            kv.k_page.buffer(),
            kv.v_page.buffer(),
            scratch.tiles.buffer(),
        ],
        grid((shape.n_kv_heads * r.n_tiles * TILE_WORDS / 4).div_ceil(256) as u32),
    );
    let k_f16 = r.k_words < d;
    let v_f16 = r.v_words < d;
    let wg = 32;
    let kernel = gpu.pipeline(
        "attention/prompt_rows",
        "main",
        &[
            ("D", d as f64),
            ("K_F16", if k_f16 { 1.0 } else { 0.0 }),
            ("V_F16", if v_f16 { 1.0 } else { 0.0 }),
            ("HAS_BIAS", if kv.bias.is_some() { 1.0 } else { 0.0 }),
            ("WG", wg as f64),
        ],
        &[
            Binding::Uniform,
            Binding::READ,
            Binding::Uniform,
            Binding::Uniform,
            Binding::READ,
            Binding::READ,
            Binding::RW,
        ],
    )?;
    let (recent_mode, recent) = match kv.recent {
        Recent::Before(n) => (1, n),
        _ => (0, 0),
    };
    let bias = kv.bias.unwrap_or(q).buffer();
    let tile_bytes = (TILE_WORDS * 4) as u64;
    for h in 0..shape.n_kv_heads {
        for t in 0..r.n_tiles {
            let params = RowsParams {
                n_q: n_q as u32,
                n_heads: shape.n_heads as u32,
                group: group as u32,
                head: h as u32,
                tile: t as u32,
                tile_len: r.tile as u32,
                total_len: r.total_len,
                skip: kv.skip as u32,
                split_base: r.split_base as u32,
                split_stride: r.split_stride as u32,
                recent: recent as u32,
                recent_mode,
                scale: 1.0 / (d as f32).sqrt(),
                appended: kv.appended as u32,
                _pad: [0; 2],
            };
            let ub = gpu.uniform("prompt rows params", &params);
            let block = (r.block_base + 2 * (h * r.n_tiles + t)) as u64;
            let tile_range = |b: u64| BufferRange {
                buffer: scratch.tiles.buffer(),
                offset: b * tile_bytes,
                size: Some(tile_bytes),
            };
            batch.dispatch_ranges(
                &kernel,
                &[
                    BufferRange::whole(&ub),
                    BufferRange::whole(q.buffer()),
                    tile_range(block),
                    tile_range(block + 1),
                    BufferRange::whole(kv.heads.buffer()),
                    BufferRange::whole(bias),
                    BufferRange::whole(scratch.partials.buffer()),
                ],
                grid((n_q * group).div_ceil(wg) as u32),
            );
        }
    }
    Ok(())
}

/// CPU reference: causal GQA attention in f64 over plain keys and values.
/// `keys[h]` / `values[h]` hold head h's tokens (len × d); `q` is n_q × n_heads × d and its
/// positions are the last n_q tokens of every head; `bias[h]` optionally adds β per token.
pub fn reference_attention(
    shape: AttentionShape,
    q: &[f32],
    n_q: usize,
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    bias: Option<&[Vec<f32>]>,
) -> Vec<f32> {
    let d = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; n_q * shape.n_heads * d];
    for qi in 0..n_q {
        for hq in 0..shape.n_heads {
            let h = hq / group;
            let len = keys[h].len() / d;
            let visible = (len + qi + 1).saturating_sub(n_q);
            let qv = &q[(qi * shape.n_heads + hq) * d..][..d];
            let scores: Vec<f64> = (0..visible)
                .map(|t| {
                    let k = &keys[h][t * d..][..d];
                    let dot: f64 = qv.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                    dot * scale + bias.map_or(0.0, |b| b[h][t] as f64)
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = w.iter().sum();
            let o = &mut out[(qi * shape.n_heads + hq) * d..][..d];
            if l > 0.0 {
                for (j, oj) in o.iter_mut().enumerate() {
                    let acc: f64 = (0..visible)
                        .map(|t| w[t] * values[h][t * d + j] as f64)
                        .sum();
                    *oj = (acc / l) as f32;
                }
            }
        }
    }
    out
}
