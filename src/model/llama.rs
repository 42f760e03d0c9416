//! The llama-family forward pass (RMSNorm, RoPE on adjacent pairs, GQA, SwiGLU, tied embeddings)
//! over weights kept in their GGUF blocks and a compressed KV cache. One model, any weight or cache
//! format: formats are data here, not code paths.

use super::config::LlamaConfig;
use super::gguf::{GgufError, GgufFile};
use super::ops::{self, MatmulOptions, OpsError};
use super::weights::{load_f32, QTensor, WeightError};
use crate::attention::{decode_attention_into, AttentionScratch, AttentionShape};
use crate::compact::Captured;
use crate::gpu::{Gpu, GpuError, GpuVec};
use crate::kv::{HeadTokens, KvCache, KvConfig, KvError, KvRecipe};

/// Tokens per prefill chunk.
pub const CHUNK: usize = crate::kv::MAX_APPEND;

/// Errors of loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The GGUF file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A weight could not be uploaded.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// A kernel refused its arguments.
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// The KV cache.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The GPU layer.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
}

struct Block {
    attn_norm: GpuVec<f32>,
    ffn_norm: GpuVec<f32>,
    wq: QTensor,
    wk: QTensor,
    wv: QTensor,
    wo: QTensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
}

/// A llama-architecture model on the GPU.
pub struct Llama {
    /// Hyperparameters.
    pub config: LlamaConfig,
    embd: QTensor,
    output: Option<QTensor>,
    out_norm: GpuVec<f32>,
    blocks: Vec<Block>,
}

impl Llama {
    /// Upload every weight of a GGUF file in its own block format. `progress` is called with
    /// (layers done, layers) as loading goes.
    pub fn load(
        gpu: &Gpu,
        file: &GgufFile,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Llama, ModelError> {
        let mut loader = LlamaLoader::new(gpu, file)?;
        while !loader.is_done() {
            loader.next_layer()?;
            progress(loader.layers_done(), loader.layers());
        }
        loader.finish()
    }

    /// GPU bytes of all weights (blocks as stored in the file, norms as f32).
    pub fn weights_gpu_bytes(&self) -> u64 {
        let mut total = self.embd.gpu_bytes() + self.out_norm.bytes();
        total += self.output.as_ref().map_or(0, |o| o.gpu_bytes());
        for b in &self.blocks {
            total += b.attn_norm.bytes() + b.ffn_norm.bytes();
            for w in [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down] {
                total += w.gpu_bytes();
            }
        }
        total
    }

    fn shape(&self) -> AttentionShape {
        AttentionShape {
            n_heads: self.config.n_head,
            n_kv_heads: self.config.n_head_kv,
            head_dim: self.config.head_dim,
        }
    }
}

/// Loads a model one layer per call, so a caller can yield between layers (a browser tab repaints
/// its progress bar; nothing freezes). [`Llama::load`] runs it to the end.
pub struct LlamaLoader<'a> {
    gpu: &'a Gpu,
    file: &'a GgufFile,
    config: LlamaConfig,
    embd: QTensor,
    output: Option<QTensor>,
    out_norm: GpuVec<f32>,
    blocks: Vec<Block>,
}

impl<'a> LlamaLoader<'a> {
    /// Read the hyperparameters and upload the embeddings, output norm and output matrix.
    pub fn new(gpu: &'a Gpu, file: &'a GgufFile) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(file)?;
        let embd = QTensor::load(gpu, file, "token_embd.weight")?;
        let output = if file.tensor_info("output.weight").is_ok() {
            Some(QTensor::load(gpu, file, "output.weight")?)
        } else {
            None
        };
        let out_norm = load_f32(gpu, file, "output_norm.weight")?;
        Ok(LlamaLoader {
            gpu,
            file,
            blocks: Vec::with_capacity(config.n_layer),
            config,
            embd,
            output,
            out_norm,
        })
    }

    /// Layers in the model.
    pub fn layers(&self) -> usize {
        self.config.n_layer
    }

    /// Layers uploaded so far.
    pub fn layers_done(&self) -> usize {
        self.blocks.len()
    }

    /// Whether every layer is uploaded.
    pub fn is_done(&self) -> bool {
        self.blocks.len() == self.config.n_layer
    }

    /// Upload the next layer (no-op when all are done).
    pub fn next_layer(&mut self) -> Result<(), ModelError> {
        if self.is_done() {
            return Ok(());
        }
        let (gpu, file, l) = (self.gpu, self.file, self.blocks.len());
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        let q = |n: &str| QTensor::load(gpu, file, &t(n));
        self.blocks.push(Block {
            attn_norm: load_f32(gpu, file, &t("attn_norm"))?,
            ffn_norm: load_f32(gpu, file, &t("ffn_norm"))?,
            wq: q("attn_q")?,
            wk: q("attn_k")?,
            wv: q("attn_v")?,
            wo: q("attn_output")?,
            gate: q("ffn_gate")?,
            up: q("ffn_up")?,
            down: q("ffn_down")?,
        });
        Ok(())
    }

    /// The loaded model; uploads any layers not yet loaded.
    pub fn finish(mut self) -> Result<Llama, ModelError> {
        while !self.is_done() {
            self.next_layer()?;
        }
        Ok(Llama {
            config: self.config,
            embd: self.embd,
            output: self.output,
            out_norm: self.out_norm,
            blocks: self.blocks,
        })
    }
}

/// A conversation's state: the compressed KV cache and the scratch of the forward pass.
pub struct Session<'m> {
    model: &'m Llama,
    cache: KvCache,
    scratch: AttentionScratch,
    ids: GpuVec<u32>,
    x: GpuVec<f32>,
    h: GpuVec<f32>,
    q: GpuVec<f32>,
    k: GpuVec<f32>,
    v: GpuVec<f32>,
    attn: GpuVec<f32>,
    gate: GpuVec<f32>,
    up: GpuVec<f32>,
    act: GpuVec<f32>,
    logits_all: GpuVec<f32>,
    logits_last: GpuVec<f32>,
    status: GpuVec<u32>,
    /// Added to cache slots to get RoPE positions: a compacted cache holds fewer slots than the
    /// positions it covers.
    position_offset: usize,
    capture: Option<Capture>,
}

struct Capture {
    kv: bool,
    /// One chunk of every layer: q, then k and v when `kv`.
    buf: GpuVec<f32>,
    data: Captured,
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's, `n × vocab` (perplexity).
    All,
}

impl<'m> Session<'m> {
    /// A session whose cache holds `capacity` tokens as `recipe` says (formats, f16 sinks and
    /// recent window, centered keys).
    pub fn new(
        gpu: &Gpu,
        model: &'m Llama,
        recipe: &KvRecipe,
        capacity: usize,
    ) -> Result<Session<'m>, ModelError> {
        let c = &model.config;
        let cache = KvCache::new(
            gpu,
            KvConfig {
                n_layer: c.n_layer,
                n_kv_heads: c.n_head_kv,
                head_dim: c.head_dim,
                capacity,
                format: recipe.format,
                layer_formats: recipe.layer_formats(c.n_layer),
                seed: crate::kv::DEFAULT_SEED,
                sinks: recipe.sinks,
                recent: recipe.recent,
                center_keys: recipe.center_keys,
            },
        )?;
        let kv_dim = c.n_head_kv * c.head_dim;
        let vocab = model.embd.rows;
        let z = |label: &str, n: usize| gpu.zeros::<f32>(label, CHUNK * n);
        Ok(Session {
            model,
            scratch: AttentionScratch::new(gpu, model.shape(), CHUNK, capacity),
            cache,
            ids: gpu.zeros("ids", CHUNK),
            x: z("x", c.n_embd),
            h: z("h", c.n_embd),
            q: z("q", c.n_head * c.head_dim),
            k: z("k", kv_dim),
            v: z("v", kv_dim),
            attn: z("attn", c.n_head * c.head_dim),
            gate: z("gate", c.n_ff),
            up: z("up", c.n_ff),
            act: z("act", c.n_ff),
            logits_all: z("logits", vocab),
            logits_last: gpu.zeros("logits last", vocab),
            status: gpu.upload("encode status", &[0u32, u32::MAX]),
            position_offset: 0,
            capture: None,
        })
    }

    /// A session whose cache starts as a compacted context: every head's kept keys (with their
    /// RoPE), values and biases, stored as `recipe` says (a format with sinks; no window, no
    /// centering); new tokens continue at position `compacted.context_len`. `extra` tokens of
    /// room follow. Heads may keep different numbers of tokens ([`KvCache::load_ragged`]: no
    /// padding is stored or counted); heads of different lengths each keep at least the sinks.
    pub fn from_compacted(
        gpu: &Gpu,
        model: &'m Llama,
        recipe: &KvRecipe,
        compacted: &crate::compact::CompactedContext,
        extra: usize,
    ) -> Result<Session<'m>, ModelError> {
        let d = compacted.head_dim;
        for (l, heads) in compacted.layers.iter().enumerate() {
            for (h, hc) in heads.iter().enumerate() {
                let t = hc.len();
                if hc.keys.len() != t * d || hc.values.len() != t * d || hc.bias.len() != t {
                    return Err(ModelError::Kv(KvError::Config(format!(
                        "layer {l} head {h} of the compacted context: {t} positions, {} key, {} \
                         value and {} bias floats (head_dim {d})",
                        hc.keys.len(),
                        hc.values.len(),
                        hc.bias.len()
                    ))));
                }
            }
        }
        let tokens: Vec<Vec<HeadTokens<'_>>> = compacted
            .layers
            .iter()
            .map(|heads| {
                heads
                    .iter()
                    .map(|hc| HeadTokens {
                        keys: &hc.keys,
                        values: &hc.values,
                    })
                    .collect()
            })
            .collect();
        let biases = compacted
            .layers
            .iter()
            .map(|heads| heads.iter().map(|h| &h.bias[..]).collect());
        Self::loaded(
            gpu,
            model,
            recipe,
            compacted.head_dim,
            compacted.context_len,
            compacted.max_len(),
            biases.collect(),
            extra,
            |cache, status| cache.load_ragged(gpu, &tokens, status),
        )
    }

    /// A session whose cache starts as a compacted context stored by a cache of `recipe`
    /// ([`crate::compact::StoredContext`], what a `.kvpack` file holds): its codes are written
    /// into the pages as they are, so the cache is the one that stored them, on any adapter.
    /// `recipe` and the rotation seed must be the ones it was stored with; otherwise as
    /// [`Session::from_compacted`].
    pub fn from_stored(
        gpu: &Gpu,
        model: &'m Llama,
        recipe: &KvRecipe,
        stored: &crate::compact::StoredContext,
        extra: usize,
    ) -> Result<Session<'m>, ModelError> {
        if stored.seed != crate::kv::DEFAULT_SEED {
            return Err(ModelError::Kv(KvError::Config(format!(
                "the compacted context was stored with rotation seed {:#x}; this build's caches use {:#x}",
                stored.seed,
                crate::kv::DEFAULT_SEED
            ))));
        }
        for (l, heads) in stored.layers.iter().enumerate() {
            for (h, sc) in heads.iter().enumerate() {
                let t = sc.stored.tokens;
                if sc.positions.len() != t || sc.bias.len() != t {
                    return Err(ModelError::Kv(KvError::Config(format!(
                        "layer {l} head {h} of the compacted context: {t} tokens, {} positions \
                         and {} biases",
                        sc.positions.len(),
                        sc.bias.len()
                    ))));
                }
            }
        }
        let heads: Vec<Vec<&crate::kv::StoredHead>> = stored
            .layers
            .iter()
            .map(|l| l.iter().map(|sc| &sc.stored).collect())
            .collect();
        let biases = stored
            .layers
            .iter()
            .map(|heads| heads.iter().map(|h| &h.bias[..]).collect());
        Self::loaded(
            gpu,
            model,
            recipe,
            stored.head_dim,
            stored.context_len,
            stored.max_len(),
            biases.collect(),
            extra,
            |cache, _| cache.load_stored(gpu, &heads),
        )
    }

    /// [`Session::from_compacted`] or [`Session::from_stored`], for what a `.kvpack` file held.
    pub fn from_saved(
        gpu: &Gpu,
        model: &'m Llama,
        recipe: &KvRecipe,
        saved: &crate::compact::SavedContext,
        extra: usize,
    ) -> Result<Session<'m>, ModelError> {
        match saved {
            crate::compact::SavedContext::F32(c) => {
                Self::from_compacted(gpu, model, recipe, c, extra)
            }
            crate::compact::SavedContext::Stored(c) => {
                Self::from_stored(gpu, model, recipe, c, extra)
            }
        }
    }

    /// A session of `tmax + extra` positions whose empty cache `load` fills with a compacted
    /// context of `context_len` tokens (the longest head keeping `tmax`), then takes its biases
    /// (`biases[l][h]`, one per kept token). Refused first: a context whose layers, KV heads or
    /// head dimension are not the model's, or a recipe with centered keys.
    #[allow(clippy::too_many_arguments)]
    fn loaded(
        gpu: &Gpu,
        model: &'m Llama,
        recipe: &KvRecipe,
        head_dim: usize,
        context_len: usize,
        tmax: usize,
        biases: Vec<Vec<&[f32]>>,
        extra: usize,
        load: impl FnOnce(&mut KvCache, &GpuVec<u32>) -> Result<(), KvError>,
    ) -> Result<Session<'m>, ModelError> {
        let c = &model.config;
        let bad = |what: String| ModelError::Kv(KvError::Config(what));
        if recipe.center_keys {
            return Err(bad(format!(
                "a compacted cache takes a format with sinks and a recent window (such as \
                 turbo4u+s2+r14), not {recipe}: centered keys do not carry compaction's biases yet"
            )));
        }
        if biases.len() != c.n_layer
            || head_dim != c.head_dim
            || biases.iter().any(|l| l.len() != c.n_head_kv)
        {
            return Err(bad(format!(
                "the compacted context has {} layers of head_dim {head_dim}; the model has {} \
                 layers × {} KV heads of head_dim {}",
                biases.len(),
                c.n_layer,
                c.n_head_kv,
                c.head_dim
            )));
        }
        if tmax > context_len {
            return Err(ModelError::Kv(KvError::Config(format!(
                "{tmax} kept tokens in a head for a context of {context_len}"
            ))));
        }
        let mut s = Session::new(gpu, model, recipe, tmax + extra)?;
        load(&mut s.cache, &s.status)?;
        for (l, bias) in biases.iter().enumerate() {
            if bias.iter().any(|b| b.iter().any(|&x| x != 0.0)) {
                s.cache.set_bias(gpu, l, bias)?;
            }
        }
        // The cache's length is the longest head's; every head's next token is at that slot.
        s.position_offset = context_len - tmax;
        Ok(s)
    }

    /// Record every layer's post-RoPE queries (and keys and values when `kv`) of the tokens fed
    /// from now on, until [`Session::take_capture`].
    pub fn start_capture(&mut self, gpu: &Gpu, kv: bool) {
        let c = &self.model.config;
        let per_tok = c.n_head * c.head_dim + if kv { 2 * c.n_head_kv * c.head_dim } else { 0 };
        self.capture = Some(Capture {
            kv,
            buf: gpu.zeros("capture", c.n_layer * CHUNK * per_tok),
            data: Captured {
                tokens: 0,
                q: vec![Vec::new(); c.n_layer],
                k: vec![Vec::new(); if kv { c.n_layer } else { 0 }],
                v: vec![Vec::new(); if kv { c.n_layer } else { 0 }],
            },
        });
    }

    /// Stop recording and return what was recorded (post-RoPE queries, keys and values).
    pub fn take_capture(&mut self) -> Option<Captured> {
        self.capture.take().map(|c| c.data)
    }

    /// RoPE position of the next token.
    pub fn position(&self) -> usize {
        self.cache.len() + self.position_offset
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Tokens seen so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether no token has been fed.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Feed `tokens` (any number; prefilled in chunks of [`CHUNK`]) and return logits.
    pub async fn forward(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        let vocab = self.model.embd.rows;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::BadToken { id, vocab });
        }
        let mut out = Vec::new();
        for chunk in tokens.chunks(CHUNK) {
            self.forward_chunk(gpu, chunk, which)?;
            if let Some(cap) = &mut self.capture {
                let c = &self.model.config;
                let (n, qd, kd) = (chunk.len(), c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
                let all = gpu.read(&cap.buf).await?;
                let per_layer = CHUNK * (qd + if cap.kv { 2 * kd } else { 0 });
                for l in 0..c.n_layer {
                    let base = &all[l * per_layer..];
                    cap.data.q[l].extend_from_slice(&base[..n * qd]);
                    if cap.kv {
                        cap.data.k[l].extend_from_slice(&base[CHUNK * qd..][..n * kd]);
                        cap.data.v[l].extend_from_slice(&base[CHUNK * (qd + kd)..][..n * kd]);
                    }
                }
                cap.data.tokens += n;
            }
            if which == Logits::All {
                let all = gpu.read(&self.logits_all).await?;
                out.extend_from_slice(&all[..chunk.len() * vocab]);
            }
        }
        if which == Logits::Last && !tokens.is_empty() {
            out = gpu.read(&self.logits_last).await?;
        }
        Ok(out)
    }

    /// Record and submit one chunk.
    fn forward_chunk(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        which: Logits,
    ) -> Result<(), ModelError> {
        let m = self.model;
        let c = &m.config;
        let n = tokens.len();
        let (dim, hd) = (c.n_embd, c.head_dim);
        let first = self.cache.begin_tokens(gpu, n)?;
        let pos = first + self.position_offset;
        self.ids.write(gpu, tokens);
        let mut b = gpu.batch("forward");
        ops::embed_into(gpu, &mut b, &m.embd, &self.ids, n, &self.x)?;
        for (l, blk) in m.blocks.iter().enumerate() {
            ops::rmsnorm_into(
                gpu,
                &mut b,
                &self.x,
                &blk.attn_norm,
                n,
                dim,
                c.rms_eps,
                &self.h,
            )?;
            ops::matmul_into(gpu, &mut b, &blk.wq, &self.h, n, &self.q)?;
            ops::matmul_into(gpu, &mut b, &blk.wk, &self.h, n, &self.k)?;
            ops::matmul_into(gpu, &mut b, &blk.wv, &self.h, n, &self.v)?;
            ops::rope_into(gpu, &mut b, &self.q, n, c.n_head, hd, pos, c.rope_base)?;
            ops::rope_into(gpu, &mut b, &self.k, n, c.n_head_kv, hd, pos, c.rope_base)?;
            if let Some(cap) = &self.capture {
                let (qd, kd) = (c.n_head * hd, c.n_head_kv * hd);
                let per_layer = CHUNK * (qd + if cap.kv { 2 * kd } else { 0 });
                let at = |i: usize| ((l * per_layer + i) * 4) as u64;
                b.copy(
                    self.q.buffer(),
                    0,
                    cap.buf.buffer(),
                    at(0),
                    (n * qd * 4) as u64,
                );
                if cap.kv {
                    let bytes = (n * kd * 4) as u64;
                    b.copy(self.k.buffer(), 0, cap.buf.buffer(), at(CHUNK * qd), bytes);
                    b.copy(
                        self.v.buffer(),
                        0,
                        cap.buf.buffer(),
                        at(CHUNK * (qd + kd)),
                        bytes,
                    );
                }
            }
            self.cache
                .append_into(gpu, &mut b, l, first, n, &self.k, &self.v, &self.status)?;
            let pages = self.cache.pages(l);
            decode_attention_into(
                gpu,
                &mut b,
                m.shape(),
                &pages,
                &self.q,
                n,
                &self.scratch,
                &self.attn,
            )?;
            ops::matmul_add_into(gpu, &mut b, &blk.wo, &self.attn, n, &self.x)?;
            ops::rmsnorm_into(
                gpu,
                &mut b,
                &self.x,
                &blk.ffn_norm,
                n,
                dim,
                c.rms_eps,
                &self.h,
            )?;
            ops::matmul_into(gpu, &mut b, &blk.gate, &self.h, n, &self.gate)?;
            ops::matmul_into(gpu, &mut b, &blk.up, &self.h, n, &self.up)?;
            ops::swiglu_into(gpu, &mut b, &self.gate, &self.up, n * c.n_ff, &self.act)?;
            ops::matmul_add_into(gpu, &mut b, &blk.down, &self.act, n, &self.x)?;
        }
        ops::rmsnorm_into(
            gpu,
            &mut b,
            &self.x,
            &m.out_norm,
            n,
            dim,
            c.rms_eps,
            &self.h,
        )?;
        let out_w = m.output.as_ref().unwrap_or(&m.embd);
        match which {
            Logits::All => ops::matmul_into(gpu, &mut b, out_w, &self.h, n, &self.logits_all)?,
            Logits::Last => {
                let opts = MatmulOptions {
                    x_first_tok: n - 1,
                    ..Default::default()
                };
                ops::matmul_with(gpu, &mut b, out_w, &self.h, 1, &self.logits_last, opts)?
            }
        }
        b.submit();
        Ok(())
    }
}
