//! The KV cache: one compressed page per layer for keys and one for values, every KV head's tokens
//! contiguous in its page, a format per layer (K and V may differ), quantize-on-write through the
//! codec kernels and exact byte accounting.
//!
//! Head `h` of a layer owns page slots `[h·capacity, h·capacity + capacity)`; the heads table
//! `(first slot, length)` that attention reads is shared by all layers, every head holding the
//! cache's `len` tokens at slots `[h·capacity, h·capacity + len)`.
//!
//! Ragged heads ([`KvCache::load_ragged`], a compacted context whose layers and heads keep
//! different numbers of tokens): with `tmax` the longest head, head `h` of layer `l` keeping
//! `t_lh` tokens is right-aligned, its token `i` at slot `h·capacity + o_lh + i` with offset
//! `o_lh = tmax − t_lh`, and the layer's own heads table says `(h·capacity + o_lh, len − o_lh)`.
//! Every head's last kept token then sits at slot `h·capacity + tmax − 1`, so later tokens are
//! appended at slot `h·capacity + position` like in any cache, and every head stays contiguous.
//! The offset slots are never written, read or counted: the byte counts are of each head's own
//! tokens. (The attention kernel needs no change: it reads `first + j` for a head's token `j`.)
//!
//! Beside the compressed pages a cache may keep in f16 (values in the value codec's rotated
//! domain): the first `sinks` tokens (attention sinks), and a window of the `recent` tokens
//! before each query, a ring of `recent + MAX_APPEND` slots per head. Each token is stored once:
//! a sink only in the sink pages; past the sinks, without a window, quantized on write into the
//! compressed pages; with a window, in the window's ring, and quantized from there (f16) into the
//! pages as it leaves the window. Attention reads each token from exactly one place, chosen per
//! query by position, so chunked prefill sees what token-by-token decoding sees. Keys may be
//! stored centered (`k − μ`, see `shaders/kv/center.wgsl`), in the pages and in the window.

mod recipe;

pub use recipe::{EdgeLayers, KvRecipe};

use crate::attention::{KvPages, Recent, ValueStore, SPLIT_TOKENS};
use crate::codec::gpu::{page_run, page_words, put_page_run, EncodeArgs, GpuCodec, Input};
use crate::codec::{Codec, CodecError, KvFormat, VecFormat};
use crate::gpu::{grid, Batch, Binding, Gpu, GpuError, GpuVec};

/// Most tokens one append may add when the cache keeps a window of recent tokens (the ring holds
/// the window plus one append).
pub const MAX_APPEND: usize = 64;

/// One KV head's tokens for [`KvCache::load_ragged`], in position order: `t × head_dim` keys (as
/// attention reads them, post-RoPE) and `t × head_dim` values.
#[derive(Clone, Copy, Debug)]
pub struct HeadTokens<'a> {
    /// Keys, token-major.
    pub keys: &'a [f32],
    /// Values, token-major.
    pub values: &'a [f32],
}

/// One KV head of a compacted context as a cache stores it ([`KvCache::read_stored`],
/// [`KvCache::load_stored`]): its tokens' codes and scales, bit for bit, in the layout of
/// docs/formats.md (a run of exactly as many vectors as it holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredHead {
    /// Tokens the head keeps, its sinks included.
    pub tokens: usize,
    /// Keys of the tokens past the sinks, in the layer's key format.
    pub keys: Vec<u32>,
    /// Values of the tokens past the sinks, in the layer's value format.
    pub values: Vec<u32>,
    /// Keys of the first `min(tokens, sinks)` tokens, f16.
    pub sink_keys: Vec<u32>,
    /// Values of the sinks, f16 in the value codec's rotated domain.
    pub sink_values: Vec<u32>,
}

/// Errors of the KV cache.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A format that does not fit the head dimension.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The GPU layer failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// More tokens than the cache holds.
    #[error("the KV cache holds {capacity} tokens and {len} are stored: {more} more do not fit (raise the context size)")]
    Full {
        /// Capacity in tokens.
        capacity: usize,
        /// Tokens stored.
        len: usize,
        /// Tokens asked for.
        more: usize,
    },
    /// A configuration error.
    #[error("{0}")]
    Config(String),
}

/// Shape and formats of a cache.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens per head the cache can hold.
    pub capacity: usize,
    /// Format of every layer, unless `layer_formats` says otherwise.
    pub format: KvFormat,
    /// Per-layer formats (length `n_layer`), e.g. q8_0 for the first and last layers.
    pub layer_formats: Option<Vec<KvFormat>>,
    /// Seed of the rotations; each layer's keys and values get their own stream.
    pub seed: u64,
    /// The first `sinks` tokens (attention sinks) are also kept in full precision (f16), and
    /// attention reads them from there: quantizing them can derail a small model.
    pub sinks: usize,
    /// Each query reads the `recent` tokens before it (and itself) from a full-precision (f16)
    /// window instead of the compressed pages. At most `SPLIT_TOKENS − 1`.
    pub recent: usize,
    /// Store keys centered by a per-channel mean per layer and KV head, estimated from the
    /// first append's tokens past the sinks; attention adds `⟨q, μ⟩` back.
    pub center_keys: bool,
}

/// The rotation seed sessions give their caches ([`KvConfig::seed`]).
pub const DEFAULT_SEED: u64 = 0x6b76_7061_636b;

/// The CPU reference codecs `(keys, values)` of layer `l` of a cache with rotation seed `seed`
/// and format `format` for that layer: the cache encodes with the same rotations and codebooks,
/// so these reproduce what it stores (compaction fits to the keys as they will be stored).
pub fn layer_codecs(
    format: KvFormat,
    head_dim: usize,
    seed: u64,
    l: usize,
) -> Result<(Codec, Codec), CodecError> {
    let seed = seed.wrapping_add(2 * l as u64 * 0x9E37_79B9);
    Ok((
        Codec::with_seed(format.k, head_dim, seed)?,
        Codec::with_seed(format.v, head_dim, seed + 1)?,
    ))
}

impl KvConfig {
    /// The format of layer `l`.
    pub fn format_of(&self, l: usize) -> KvFormat {
        self.layer_formats
            .as_ref()
            .map(|f| f[l])
            .unwrap_or(self.format)
    }
}

struct LayerCache {
    k: GpuCodec,
    v: GpuCodec,
    k_page: GpuVec<u32>,
    v_page: GpuVec<u32>,
    sink_k_page: GpuVec<u32>,
    sink_v_page: GpuVec<u32>,
    win_k_page: GpuVec<u32>,
    win_v_page: GpuVec<u32>,
    k_mean: GpuVec<f32>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CenterParams {
    n: u32,
    first: u32,
    width: u32,
    _pad: u32,
}

/// Per-key additive biases of one layer (compaction's β): the main pages' slots and the sinks'.
struct LayerBias {
    main: GpuVec<f32>,
    sinks: GpuVec<f32>,
}

/// The runs of a ring of `ring` slots that positions `range` occupy (position p at slot
/// p mod ring): `(tokens before the run, tokens in it, first slot)`, at most two.
fn ring_runs(
    range: std::ops::Range<usize>,
    ring: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let n = range.len();
    debug_assert!(n <= ring, "{n} positions in a ring of {ring}");
    let at = range.start % ring;
    let run = n.min(ring - at);
    [(0, run, at), (run, n - run, 0)]
        .into_iter()
        .filter(|&(_, count, _)| count > 0)
}

/// A compressed KV cache on the GPU.
pub struct KvCache {
    config: KvConfig,
    layers: Vec<LayerCache>,
    heads: GpuVec<u32>,
    exact_k: GpuCodec,
    sink_heads: GpuVec<u32>,
    win_heads: GpuVec<u32>,
    centered: GpuVec<f32>,
    len: usize,
    /// Positions `[sinks, paged)` are in the compressed pages (`paged ≥ sinks` once past them).
    paged: usize,
    /// Positions that the current append puts into the pages: its own tokens past the sinks
    /// without a window; with one, the tokens leaving the window (quantized from the ring).
    entering: std::ops::Range<usize>,
    /// First position of the append that estimates the key means (once it has begun).
    mean_append: Option<usize>,
    /// Tokens per head of the last [`KvCache::load_ragged`] (in the longest head): with a
    /// window of recent tokens, they are all in the pages, and the window holds only tokens
    /// appended since.
    loaded: Option<usize>,
    /// Ragged heads: per layer and KV head, the slots before the head's first token
    /// (`tmax − t_lh`); `None` when every head starts at its first slot.
    offsets: Option<Vec<Vec<usize>>>,
    /// Per-layer heads tables, read instead of `heads` while `offsets` is set (allocated on the
    /// first ragged load).
    layer_heads: Vec<GpuVec<u32>>,
    bias: Option<Vec<LayerBias>>,
    /// Biased tokens per layer and KV head.
    bias_lens: Vec<Vec<usize>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new(gpu: &Gpu, config: KvConfig) -> Result<KvCache, KvError> {
        if let Some(f) = &config.layer_formats {
            if f.len() != config.n_layer {
                return Err(KvError::Config(format!(
                    "{} layer formats given for {} layers",
                    f.len(),
                    config.n_layer
                )));
            }
        }
        if config.recent >= SPLIT_TOKENS {
            return Err(KvError::Config(format!(
                "a window of {} recent tokens is too long: at most {}",
                config.recent,
                SPLIT_TOKENS - 1
            )));
        }
        let d = config.head_dim;
        let slots = config.n_kv_heads * config.capacity;
        let ring = config.recent + MAX_APPEND;
        let mut layers = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let f = config.format_of(l);
            f.validate_dim(d)?;
            let (k, v) = layer_codecs(f, d, config.seed, l)?;
            let (k, v) = (GpuCodec::new(gpu, k), GpuCodec::new(gpu, v));
            // f16: d / 2 words per vector.
            let sink_words = (config.n_kv_heads * config.sinks * d / 2).max(1);
            let win_words = if config.recent > 0 {
                config.n_kv_heads * ring * d / 2
            } else {
                1
            };
            let mean_floats = if config.center_keys {
                config.n_kv_heads * d
            } else {
                1
            };
            layers.push(LayerCache {
                k_page: gpu.zeros(&format!("k page {l}"), page_words(&f.k, d, slots)),
                v_page: gpu.zeros(&format!("v page {l}"), page_words(&f.v, d, slots)),
                sink_k_page: gpu.zeros(&format!("sink k page {l}"), sink_words),
                sink_v_page: gpu.zeros(&format!("sink v page {l}"), sink_words),
                win_k_page: gpu.zeros(&format!("window k page {l}"), win_words),
                win_v_page: gpu.zeros(&format!("window v page {l}"), win_words),
                k_mean: gpu.zeros(&format!("k mean {l}"), mean_floats),
                k,
                v,
            });
        }
        let heads = gpu.zeros("kv heads", 2 * config.n_kv_heads);
        let sink_heads = gpu.zeros("kv sink heads", 2 * config.n_kv_heads);
        let win_heads = gpu.zeros("kv window heads", 2 * config.n_kv_heads);
        let exact_k = GpuCodec::new(gpu, Codec::with_seed(VecFormat::F16, d, 0)?);
        let centered = gpu.zeros(
            "centered keys",
            if config.center_keys {
                MAX_APPEND * config.n_kv_heads * d
            } else {
                1
            },
        );
        let cache = KvCache {
            config,
            layers,
            heads,
            exact_k,
            sink_heads,
            win_heads,
            centered,
            len: 0,
            paged: 0,
            entering: 0..0,
            mean_append: None,
            loaded: None,
            offsets: None,
            layer_heads: Vec::new(),
            bias: None,
            bias_lens: Vec::new(),
        };
        cache.write_heads(gpu, 0);
        Ok(cache)
    }

    /// The configuration.
    pub fn config(&self) -> &KvConfig {
        &self.config
    }

    /// Tokens stored per head; with ragged heads, in the longest head (every head's tokens end
    /// at this position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots before head `head`'s first token in layer `layer` (0 unless heads are ragged).
    fn offset(&self, layer: usize, head: usize) -> usize {
        self.offsets.as_ref().map_or(0, |o| o[layer][head])
    }

    /// Tokens that head `head` of layer `layer` holds: [`KvCache::len`] less the tokens it did
    /// not keep when it was loaded ragged.
    pub fn head_len(&self, layer: usize, head: usize) -> usize {
        self.len.saturating_sub(self.offset(layer, head))
    }

    /// Whether some layer's heads hold different numbers of tokens ([`KvCache::load_ragged`]).
    pub fn is_ragged(&self) -> bool {
        self.offsets.is_some()
    }

    /// Tokens held, summed over layers and KV heads.
    pub fn stored_tokens(&self) -> usize {
        let c = &self.config;
        (0..c.n_layer)
            .flat_map(|l| (0..c.n_kv_heads).map(move |h| (l, h)))
            .map(|(l, h)| self.head_len(l, h))
            .sum()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn write_heads(&self, gpu: &Gpu, len: usize) {
        let table: Vec<u32> = (0..self.config.n_kv_heads)
            .flat_map(|h| [(h * self.config.capacity) as u32, len as u32])
            .collect();
        self.heads.write(gpu, &table);
        if let Some(offsets) = &self.offsets {
            for (lh, o) in self.layer_heads.iter().zip(offsets) {
                let table: Vec<u32> = o
                    .iter()
                    .enumerate()
                    .flat_map(|(h, &o)| {
                        [
                            (h * self.config.capacity + o) as u32,
                            len.saturating_sub(o) as u32,
                        ]
                    })
                    .collect();
                lh.write(gpu, &table);
            }
        }
        let sinks: Vec<u32> = (0..self.config.n_kv_heads)
            .flat_map(|h| {
                [
                    (h * self.config.sinks) as u32,
                    len.min(self.config.sinks) as u32,
                ]
            })
            .collect();
        self.sink_heads.write(gpu, &sinks);
        let ring = self.ring_slots();
        let window: Vec<u32> = (0..self.config.n_kv_heads)
            .flat_map(|h| [(h * ring) as u32, len as u32])
            .collect();
        self.win_heads.write(gpu, &window);
    }

    fn ring_slots(&self) -> usize {
        self.config.recent + MAX_APPEND
    }

    /// Tokens stored in the compressed pages per head (positions `[sinks, paged)`); with ragged
    /// heads, in the longest head.
    pub fn paged_len(&self) -> usize {
        self.paged.saturating_sub(self.config.sinks)
    }

    /// Make room for `n` more tokens: the heads table already counts them (attention recorded
    /// after this sees them), and [`KvCache::append_into`] writes them at positions `len..len + n`.
    pub fn begin_tokens(&mut self, gpu: &Gpu, n: usize) -> Result<usize, KvError> {
        self.begin(gpu, n, false)
    }

    /// [`KvCache::begin_tokens`]; `load`: the tokens all go to the pages and the sinks (a
    /// ragged load), none to the window, however many.
    fn begin(&mut self, gpu: &Gpu, n: usize, load: bool) -> Result<usize, KvError> {
        if self.len + n > self.config.capacity {
            return Err(KvError::Full {
                capacity: self.config.capacity,
                len: self.len,
                more: n,
            });
        }
        if (self.config.recent > 0 || self.config.center_keys) && n > MAX_APPEND && !load {
            return Err(KvError::Config(format!(
                "{n} tokens appended at once: a cache with a recent window or centered keys takes at most {MAX_APPEND}"
            )));
        }
        let first = self.len;
        if self.config.center_keys && self.mean_append.is_none() && first + n > self.config.sinks {
            self.mean_append = Some(first);
        }
        self.len += n;
        // Tokens past the sinks enter the pages: on write without a window; with one, when the
        // next query no longer reads them from it (older than its `recent` tokens before it).
        let from = self.paged.max(self.config.sinks.min(self.len));
        let recent = if load { 0 } else { self.config.recent };
        let to = self.len.saturating_sub(recent).max(from);
        self.entering = from..to;
        self.paged = to;
        self.write_heads(gpu, self.len);
        Ok(first)
    }

    /// Record the quantized write of `n` tokens' keys and values of `layer` at position `first`
    /// (from [`KvCache::begin_tokens`]). `k` and `v` are `n × n_kv_heads × head_dim` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn append_into(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        layer: usize,
        first: usize,
        n: usize,
        k: &GpuVec<f32>,
        v: &GpuVec<f32>,
        status: &GpuVec<u32>,
    ) -> Result<(), KvError> {
        let c = &self.config;
        let lc = &self.layers[layer];
        let slots = c.n_kv_heads * c.capacity;
        let width = c.n_kv_heads * c.head_dim;
        let k_main = if c.center_keys {
            if self.mean_append == Some(first) {
                let skip = c.sinks.saturating_sub(first);
                self.center(gpu, batch, true, k, n, skip, &lc.k_mean)?;
            }
            self.center(gpu, batch, false, k, n, 0, &lc.k_mean)?;
            &self.centered
        } else {
            k
        };
        for h in 0..c.n_kv_heads {
            // Without a window: this append's tokens past the sinks go to the pages now.
            let direct = self.entering.clone();
            if c.recent == 0 && !direct.is_empty() {
                let skip = direct.start - first;
                for (codec, xs, page) in [(&lc.k, k_main, &lc.k_page), (&lc.v, v, &lc.v_page)] {
                    codec.encode_into(
                        gpu,
                        batch,
                        &EncodeArgs {
                            xs: Input::F32(xs),
                            src_offset: h * c.head_dim + skip * width,
                            src_stride: width,
                            n: direct.len(),
                            page,
                            capacity: slots,
                            dst_first: h * c.capacity + direct.start,
                            status,
                        },
                    )?;
                }
            }
            // Tokens among the first `sinks` go to the full-precision pages only: keys plain,
            // values in the value codec's rotated domain (attention sums them with the page's).
            let n_sink = c.sinks.min(first + n).saturating_sub(first);
            if n_sink > 0 {
                let args = |xs, page| EncodeArgs {
                    xs: Input::F32(xs),
                    src_offset: h * c.head_dim,
                    src_stride: width,
                    n: n_sink,
                    page,
                    capacity: c.n_kv_heads * c.sinks,
                    dst_first: h * c.sinks + first,
                    status,
                };
                self.exact_k
                    .encode_into(gpu, batch, &args(k, &lc.sink_k_page))?;
                lc.v.encode_rotated_f16_into(gpu, batch, &args(v, &lc.sink_v_page))?;
            }
            // The window ring: position p at slot p mod ring, in at most two runs; keys as the
            // pages store them (centered or not).
            if c.recent > 0 {
                let ring = self.ring_slots();
                for (skip, count, slot) in ring_runs(first..first + n, ring) {
                    let args = |xs, page| EncodeArgs {
                        xs: Input::F32(xs),
                        src_offset: h * c.head_dim + skip * width,
                        src_stride: width,
                        n: count,
                        page,
                        capacity: c.n_kv_heads * ring,
                        dst_first: h * ring + slot,
                        status,
                    };
                    self.exact_k
                        .encode_into(gpu, batch, &args(k_main, &lc.win_k_page))?;
                    lc.v.encode_rotated_f16_into(gpu, batch, &args(v, &lc.win_v_page))?;
                }
                // Tokens leaving the window: from the ring (written above, ring ≥ recent + n
                // keeps them) into the pages.
                let leaving = self.entering.clone();
                for (skip, count, slot) in ring_runs(leaving.clone(), ring) {
                    let dst_first = h * c.capacity + leaving.start + skip;
                    let src_offset = (h * ring + slot) * c.head_dim;
                    let args = |xs, page| EncodeArgs {
                        xs,
                        src_offset,
                        src_stride: c.head_dim,
                        n: count,
                        page,
                        capacity: slots,
                        dst_first,
                        status,
                    };
                    lc.k.encode_into(gpu, batch, &args(Input::F16(&lc.win_k_page), &lc.k_page))?;
                    lc.v.encode_into(
                        gpu,
                        batch,
                        &args(Input::RotatedF16(&lc.win_v_page), &lc.v_page),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Refuse a load into this cache unless it is empty, has no centered keys, and `heads` (KV
    /// heads per layer) matches its layers and heads.
    fn check_shape(&self, heads: Vec<usize>) -> Result<(), KvError> {
        let c = &self.config;
        let bad = |what: String| Err(KvError::Config(what));
        if self.len > 0 {
            return bad(format!(
                "a ragged load needs an empty cache; this one holds {} tokens",
                self.len
            ));
        }
        if c.center_keys {
            return bad("a ragged load takes a cache without centered keys".into());
        }
        if heads.len() != c.n_layer || heads.iter().any(|&h| h != c.n_kv_heads) {
            return bad(format!(
                "{} layers of {heads:?} heads given for a cache of {} layers × {} KV heads",
                heads.len(),
                c.n_layer,
                c.n_kv_heads
            ));
        }
        Ok(())
    }

    /// The common part of a ragged load of `lens[l][h]` tokens per layer and head: check they
    /// fit, set the heads' offsets and tables, and count the tokens as stored (in the pages and
    /// the sinks, none in the window). Returns the longest head's length.
    fn prepare_load(&mut self, gpu: &Gpu, lens: &[Vec<usize>]) -> Result<usize, KvError> {
        let c = self.config.clone();
        let tmax = lens.iter().flatten().copied().max().unwrap_or(0);
        if tmax > c.capacity {
            return Err(KvError::Full {
                capacity: c.capacity,
                len: 0,
                more: tmax,
            });
        }
        let ragged = lens.iter().flatten().any(|&t| t != tmax);
        if ragged {
            for (l, layer) in lens.iter().enumerate() {
                if let Some((h, &t)) = layer.iter().enumerate().find(|&(_, &t)| t < c.sinks) {
                    return Err(KvError::Config(format!(
                        "layer {l} head {h} keeps {t} tokens, fewer than the {} attention sinks: \
                         when heads keep different numbers of tokens, every head keeps at least \
                         the sinks (keep more tokens, or use fewer sinks)",
                        c.sinks
                    )));
                }
            }
            if self.layer_heads.is_empty() {
                self.layer_heads = (0..c.n_layer)
                    .map(|l| gpu.zeros(&format!("kv heads {l}"), 2 * c.n_kv_heads))
                    .collect();
            }
            self.offsets = Some(
                lens.iter()
                    .map(|layer| layer.iter().map(|&t| tmax - t).collect())
                    .collect(),
            );
        } else {
            self.offsets = None;
        }
        let first = self.begin(gpu, tmax, true)?;
        debug_assert_eq!(first, 0);
        self.loaded = Some(tmax);
        Ok(tmax)
    }

    /// Where head `h` of layer `l` of a freshly loaded cache keeps its tokens: `(tokens, first
    /// page slot of those past the sinks, how many of those, sink tokens)`.
    fn loaded_head(&self, l: usize, h: usize) -> (usize, usize, usize, usize) {
        let c = &self.config;
        let t = self.head_len(l, h);
        let n_sink = c.sinks.min(t);
        (
            t,
            h * c.capacity + self.offset(l, h) + c.sinks,
            t - n_sink,
            n_sink,
        )
    }

    /// Every head of a cache just loaded by [`KvCache::load_ragged`] or
    /// [`KvCache::load_stored`] (nothing appended since), read back as stored: `[layer][head]`,
    /// each head's codes and scales bit for bit ([`StoredHead`]). Loading them into another
    /// cache of the same recipe and rotation seed with [`KvCache::load_stored`] gives this one,
    /// whatever its capacity or adapter: nothing is encoded again.
    pub async fn read_stored(&self, gpu: &Gpu) -> Result<Vec<Vec<StoredHead>>, KvError> {
        let c = &self.config;
        if self.loaded != Some(self.len) {
            return Err(KvError::Config(
                "only a cache just loaded with a compacted context reads back as stored \
                 (tokens were appended since, or none were loaded)"
                    .into(),
            ));
        }
        let d = c.head_dim;
        let (slots, sink_slots) = (c.n_kv_heads * c.capacity, c.n_kv_heads * c.sinks);
        let mut out = Vec::with_capacity(c.n_layer);
        for (l, lc) in self.layers.iter().enumerate() {
            let f = c.format_of(l);
            let (kp, vp) = (gpu.read(&lc.k_page).await?, gpu.read(&lc.v_page).await?);
            let (skp, svp) = if c.sinks > 0 {
                (
                    gpu.read(&lc.sink_k_page).await?,
                    gpu.read(&lc.sink_v_page).await?,
                )
            } else {
                (Vec::new(), Vec::new())
            };
            let heads = (0..c.n_kv_heads)
                .map(|h| {
                    let (tokens, first, n, n_sink) = self.loaded_head(l, h);
                    let sink = |page: &[u32]| {
                        page_run(page, &VecFormat::F16, d, sink_slots, h * c.sinks, n_sink)
                    };
                    StoredHead {
                        tokens,
                        keys: page_run(&kp, &f.k, d, slots, first, n),
                        values: page_run(&vp, &f.v, d, slots, first, n),
                        sink_keys: if n_sink > 0 { sink(&skp) } else { Vec::new() },
                        sink_values: if n_sink > 0 { sink(&svp) } else { Vec::new() },
                    }
                })
                .collect();
            out.push(heads);
        }
        Ok(out)
    }

    /// Load an empty cache with a compacted context as another cache of the same recipe and
    /// rotation seed stored it ([`KvCache::read_stored`]): every head's codes and scales are
    /// written into this cache's pages as they are, so the cache holds exactly what the other
    /// held. The heads are placed as [`KvCache::load_ragged`] places them; runs of the wrong
    /// length for this cache's formats are refused.
    pub fn load_stored<H: std::borrow::Borrow<StoredHead>>(
        &mut self,
        gpu: &Gpu,
        heads: &[Vec<H>],
    ) -> Result<(), KvError> {
        self.check_shape(heads.iter().map(|l| l.len()).collect())?;
        let c = self.config.clone();
        let d = c.head_dim;
        let lens: Vec<Vec<usize>> = heads
            .iter()
            .map(|l| l.iter().map(|s| s.borrow().tokens).collect())
            .collect();
        // Check every run before anything is counted as stored.
        for (l, layer) in heads.iter().enumerate() {
            let f = c.format_of(l);
            for (h, s) in layer.iter().enumerate() {
                let s = s.borrow();
                let n_sink = c.sinks.min(s.tokens);
                let n = s.tokens - n_sink;
                let want = [
                    (&s.keys, page_words(&f.k, d, n), "keys"),
                    (&s.values, page_words(&f.v, d, n), "values"),
                    (&s.sink_keys, n_sink * d / 2, "sink keys"),
                    (&s.sink_values, n_sink * d / 2, "sink values"),
                ];
                if let Some((got, w, what)) = want.iter().find(|(got, w, _)| got.len() != *w) {
                    return Err(KvError::Config(format!(
                        "layer {l} head {h}: {} words of {what} for {} tokens stored as {f} \
                         with {} sinks (head_dim {d}), which take {w}",
                        got.len(),
                        s.tokens,
                        c.sinks
                    )));
                }
            }
        }
        self.prepare_load(gpu, &lens)?;
        let (slots, sink_slots) = (c.n_kv_heads * c.capacity, c.n_kv_heads * c.sinks);
        let put = |page: &mut Vec<u32>, f: &VecFormat, cap, first, n, run: &[u32]| {
            put_page_run(page, f, d, cap, first, n, run).map_err(KvError::Config)
        };
        for (l, layer) in heads.iter().enumerate() {
            let f = c.format_of(l);
            let lc = &self.layers[l];
            let mut kp = vec![0u32; page_words(&f.k, d, slots)];
            let mut vp = vec![0u32; page_words(&f.v, d, slots)];
            let mut skp = vec![0u32; lc.sink_k_page.len()];
            let mut svp = vec![0u32; lc.sink_v_page.len()];
            for (h, s) in layer.iter().enumerate() {
                let s = s.borrow();
                let (_, first, n, n_sink) = self.loaded_head(l, h);
                put(&mut kp, &f.k, slots, first, n, &s.keys)?;
                put(&mut vp, &f.v, slots, first, n, &s.values)?;
                if n_sink > 0 {
                    let at = h * c.sinks;
                    put(
                        &mut skp,
                        &VecFormat::F16,
                        sink_slots,
                        at,
                        n_sink,
                        &s.sink_keys,
                    )?;
                    put(
                        &mut svp,
                        &VecFormat::F16,
                        sink_slots,
                        at,
                        n_sink,
                        &s.sink_values,
                    )?;
                }
            }
            lc.k_page.write(gpu, &kp);
            lc.v_page.write(gpu, &vp);
            lc.sink_k_page.write(gpu, &skp);
            lc.sink_v_page.write(gpu, &svp);
        }
        Ok(())
    }

    /// Load an empty cache with a compacted context whose heads may keep different numbers of
    /// tokens: `tokens[l][h]` are head `h` of layer `l`'s tokens in position order. With `tmax`
    /// the longest head, the cache's length becomes `tmax` and every head is right-aligned (see
    /// the module docs), so the next token is appended at position `tmax` in every head. Each
    /// head's first `sinks` tokens go to the f16 sink pages, the rest are quantized into the
    /// pages. Heads of different lengths must each keep at least the `sinks` tokens; the cache
    /// may not have centered keys. With a window of recent tokens, every loaded token is in the
    /// pages (or the sinks), and the window fills with the tokens appended after the load: a
    /// query's window reaches back only as far as those.
    pub fn load_ragged(
        &mut self,
        gpu: &Gpu,
        tokens: &[Vec<HeadTokens<'_>>],
        status: &GpuVec<u32>,
    ) -> Result<(), KvError> {
        let c = self.config.clone();
        let d = c.head_dim;
        let bad = |what: String| Err(KvError::Config(what));
        self.check_shape(tokens.iter().map(|l| l.len()).collect())?;
        let mut lens = vec![vec![0usize; c.n_kv_heads]; c.n_layer];
        for (l, layer) in tokens.iter().enumerate() {
            for (h, ht) in layer.iter().enumerate() {
                if ht.keys.len() % d != 0 || ht.values.len() != ht.keys.len() {
                    return bad(format!(
                        "layer {l} head {h}: {} key and {} value floats are not the same whole \
                         number of {d}-vectors",
                        ht.keys.len(),
                        ht.values.len()
                    ));
                }
                lens[l][h] = ht.keys.len() / d;
            }
        }
        let tmax = self.prepare_load(gpu, &lens)?;
        let slots = c.n_kv_heads * c.capacity;
        for (l, layer) in tokens.iter().enumerate() {
            // Head-major: head h's tokens from vector `at[h]` on.
            let k: Vec<f32> = layer.iter().flat_map(|ht| ht.keys).copied().collect();
            let v: Vec<f32> = layer.iter().flat_map(|ht| ht.values).copied().collect();
            if k.is_empty() {
                continue;
            }
            let kb = gpu.upload("ragged keys", &k);
            let vb = gpu.upload("ragged values", &v);
            let lc = &self.layers[l];
            let mut batch = gpu.batch("load ragged");
            let mut at = 0;
            for (h, &t) in lens[l].iter().enumerate() {
                let o = tmax - t;
                let n_main = t.saturating_sub(c.sinks);
                if n_main > 0 {
                    for (codec, xs, page) in [(&lc.k, &kb, &lc.k_page), (&lc.v, &vb, &lc.v_page)] {
                        codec.encode_into(
                            gpu,
                            &mut batch,
                            &EncodeArgs {
                                xs: Input::F32(xs),
                                src_offset: (at + c.sinks) * d,
                                src_stride: d,
                                n: n_main,
                                page,
                                capacity: slots,
                                dst_first: h * c.capacity + o + c.sinks,
                                status,
                            },
                        )?;
                    }
                }
                let n_sink = c.sinks.min(t);
                if n_sink > 0 {
                    let args = |xs, page| EncodeArgs {
                        xs: Input::F32(xs),
                        src_offset: at * d,
                        src_stride: d,
                        n: n_sink,
                        page,
                        capacity: c.n_kv_heads * c.sinks,
                        dst_first: h * c.sinks,
                        status,
                    };
                    self.exact_k
                        .encode_into(gpu, &mut batch, &args(&kb, &lc.sink_k_page))?;
                    lc.v.encode_rotated_f16_into(gpu, &mut batch, &args(&vb, &lc.sink_v_page))?;
                }
                at += t;
            }
            batch.submit();
        }
        Ok(())
    }

    /// Record `shaders/kv/center.wgsl`: the means of tokens `skip..n` of `k` into `mean`, or
    /// `k − mean` for tokens `0..n` into the centered scratch.
    #[allow(clippy::too_many_arguments)]
    fn center(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        estimate: bool,
        k: &GpuVec<f32>,
        n: usize,
        skip: usize,
        mean: &GpuVec<f32>,
    ) -> Result<(), KvError> {
        let width = self.config.n_kv_heads * self.config.head_dim;
        let kernel = gpu.pipeline(
            "kv/center",
            "main",
            &[("MEAN", if estimate { 1.0 } else { 0.0 }), ("WG", 64.0)],
            &[Binding::Uniform, Binding::READ, Binding::RW, Binding::RW],
        )?;
        let params = CenterParams {
            n: n as u32,
            first: skip as u32,
            width: width as u32,
            _pad: 0,
        };
        let ub = gpu.uniform("center params", &params);
        let count = if estimate { width } else { n * width };
        batch.dispatch(
            &kernel,
            &[&ub, k.buffer(), mean.buffer(), self.centered.buffer()],
            grid(count.div_ceil(64) as u32),
        );
        Ok(())
    }

    /// Layer `layer`'s key means (`n_kv_heads × head_dim` floats, zero until estimated), when
    /// keys are stored centered.
    pub fn key_mean(&self, layer: usize) -> Option<&GpuVec<f32>> {
        self.config
            .center_keys
            .then_some(&self.layers[layer].k_mean)
    }

    /// Layer `layer`'s regions, for attention: the compressed pages (past the sinks and before
    /// the window), then the full-precision sinks and the window when the cache keeps them.
    pub fn pages(&self, layer: usize) -> Vec<KvPages<'_>> {
        let lc = &self.layers[layer];
        let c = &self.config;
        let appended = self.loaded.map_or(0, |t| self.len - t);
        let mut regions = vec![KvPages {
            k_codec: &lc.k,
            v_codec: &lc.v,
            k_page: &lc.k_page,
            v_page: &lc.v_page,
            capacity: c.n_kv_heads * c.capacity,
            heads: if self.offsets.is_some() {
                &self.layer_heads[layer]
            } else {
                &self.heads
            },
            max_len: self.len,
            bias: self.bias.as_ref().map(|b| &b[layer].main),
            skip: c.sinks,
            values: ValueStore::Codes,
            ring: 0,
            recent: if c.recent > 0 {
                Recent::Before(c.recent + 1)
            } else {
                Recent::All
            },
            center: self.key_mean(layer),
            appended,
        }];
        if c.sinks > 0 {
            regions.push(KvPages {
                k_codec: &self.exact_k,
                v_codec: &lc.v,
                k_page: &lc.sink_k_page,
                v_page: &lc.sink_v_page,
                capacity: c.n_kv_heads * c.sinks,
                heads: &self.sink_heads,
                max_len: self.len.min(c.sinks),
                bias: self.bias.as_ref().map(|b| &b[layer].sinks),
                skip: 0,
                values: ValueStore::RotatedF16,
                ring: 0,
                recent: Recent::All,
                center: None,
                appended,
            });
        }
        if c.recent > 0 {
            regions.push(KvPages {
                k_codec: &self.exact_k,
                v_codec: &lc.v,
                k_page: &lc.win_k_page,
                v_page: &lc.win_v_page,
                capacity: c.n_kv_heads * self.ring_slots(),
                heads: &self.win_heads,
                max_len: self.len,
                bias: None,
                skip: c.sinks,
                values: ValueStore::RotatedF16,
                ring: self.ring_slots(),
                recent: Recent::Last(c.recent + 1),
                center: self.key_mean(layer),
                appended,
            });
        }
        regions
    }

    /// Exact bytes that the stored tokens occupy, each token counted once, where the next query
    /// reads it: codes plus scales of every vector in the compressed pages, in every layer, for
    /// keys and values (the pages' unused capacity is not counted), f16 keys and values of the
    /// sinks and of the window's tokens not yet in the pages, the key means (f32) and the
    /// compaction biases. Ragged heads count their own tokens only, never the slots before them.
    pub fn bytes(&self) -> u64 {
        let d = self.config.head_dim;
        (0..self.config.n_layer)
            .map(|l| {
                let f = self.config.format_of(l);
                let bits = (f.k.bits_per_value(d) + f.v.bits_per_value(d)) * d as f64;
                let tokens: usize = (0..self.config.n_kv_heads)
                    .map(|h| self.paged_len().saturating_sub(self.offset(l, h)))
                    .sum();
                (bits * tokens as f64 / 8.0).ceil() as u64
            })
            .sum::<u64>()
            + self.sink_bytes()
            + self.window_bytes()
            + self.mean_bytes()
            + self.bias_bytes()
    }

    /// Set the additive attention bias (compaction's β) of `layer`: `bias[h]` for the first
    /// `bias[h].len()` tokens of KV head `h` (of a ragged head, its own first tokens, at its own
    /// slots). Tokens without a bias (later ones) get 0. The bias is stored as f32 and counted in
    /// [`KvCache::bytes`], per layer and head as given.
    pub fn set_bias(&mut self, gpu: &Gpu, layer: usize, bias: &[&[f32]]) -> Result<(), KvError> {
        let c = &self.config;
        let fits = layer < c.n_layer
            && bias.len() == c.n_kv_heads
            && (bias.iter().enumerate())
                .all(|(h, b)| self.offset(layer, h) + b.len() <= c.capacity);
        if !fits {
            return Err(KvError::Config(format!(
                "biases of {:?} tokens per head for layer {layer}: {} layers, {} heads, capacity {}",
                bias.iter().map(|b| b.len()).collect::<Vec<_>>(),
                c.n_layer,
                c.n_kv_heads,
                c.capacity
            )));
        }
        if self.bias.is_none() {
            let slots = c.n_kv_heads * c.capacity;
            let sink_slots = (c.n_kv_heads * c.sinks).max(1);
            self.bias = Some(
                (0..c.n_layer)
                    .map(|l| LayerBias {
                        main: gpu.zeros(&format!("bias {l}"), slots),
                        sinks: gpu.zeros(&format!("sink bias {l}"), sink_slots),
                    })
                    .collect(),
            );
            self.bias_lens = vec![vec![0; c.n_kv_heads]; c.n_layer];
        }
        let lb = &self.bias.as_ref().expect("allocated above")[layer];
        let mut main = vec![0f32; c.n_kv_heads * c.capacity];
        let mut sinks = vec![0f32; (c.n_kv_heads * c.sinks).max(1)];
        for (h, src) in bias.iter().enumerate() {
            let at = h * c.capacity + self.offset(layer, h);
            main[at..at + src.len()].copy_from_slice(src);
            let n_sink = c.sinks.min(src.len());
            sinks[h * c.sinks..h * c.sinks + n_sink].copy_from_slice(&src[..n_sink]);
        }
        lb.main.write(gpu, &main);
        lb.sinks.write(gpu, &sinks);
        self.bias_lens[layer] = bias.iter().map(|b| b.len()).collect();
        Ok(())
    }

    /// Bytes of the compaction biases (one f32 per biased token, head and layer).
    pub fn bias_bytes(&self) -> u64 {
        if self.bias.is_none() {
            return 0;
        }
        4 * self.bias_lens.iter().flatten().sum::<usize>() as u64
    }

    /// Bytes of the full-precision sink copies (f16 keys and values).
    pub fn sink_bytes(&self) -> u64 {
        let c = &self.config;
        let tokens: usize = (0..c.n_layer)
            .flat_map(|l| (0..c.n_kv_heads).map(move |h| (l, h)))
            .map(|(l, h)| self.head_len(l, h).min(c.sinks))
            .sum();
        (tokens * 2 * c.head_dim * 2) as u64
    }

    /// Bytes of the window of recent tokens (f16 keys and values): the tokens past the sinks not
    /// yet in the pages, at most `recent`, which the next query reads from it. (Its ring has room
    /// for one more append and keeps tokens already quantized until they are overwritten: that
    /// is capacity, like the pages' unused slots, not stored tokens.)
    pub fn window_bytes(&self) -> u64 {
        let c = &self.config;
        let tokens = self.len - self.len.min(c.sinks) - self.paged_len();
        (c.n_layer * c.n_kv_heads * tokens * 2 * c.head_dim * 2) as u64
    }

    /// Bytes of the key means (f32), once estimated.
    pub fn mean_bytes(&self) -> u64 {
        let c = &self.config;
        if self.mean_append.is_some() {
            (c.n_layer * c.n_kv_heads * c.head_dim * 4) as u64
        } else {
            0
        }
    }

    /// Bytes an f16 cache would need for the same tokens (keys and values of every head's own
    /// tokens, [`KvCache::stored_tokens`]).
    pub fn bytes_f16(&self) -> u64 {
        (2 * self.stored_tokens() * self.config.head_dim * 2) as u64
    }

    /// Stored bits per value: [`KvCache::bytes`] over every key and value of the stored tokens,
    /// everything counted. An empty cache gives the formats' average.
    pub fn bits_per_value(&self) -> f64 {
        let c = &self.config;
        if self.len > 0 {
            let values = 2 * self.stored_tokens() * c.head_dim;
            return 8.0 * self.bytes() as f64 / values as f64;
        }
        let d = self.config.head_dim;
        (0..self.config.n_layer)
            .map(|l| self.config.format_of(l).bits_per_value(d))
            .sum::<f64>()
            / self.config.n_layer as f64
    }

    /// Forget every token (the pages keep their memory).
    pub fn clear(&mut self, gpu: &Gpu) {
        self.len = 0;
        self.paged = 0;
        self.entering = 0..0;
        self.mean_append = None;
        self.loaded = None;
        self.offsets = None;
        self.bias = None;
        self.bias_lens.clear();
        self.write_heads(gpu, 0);
    }
}
