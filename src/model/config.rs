//! Llama-family hyperparameters read from GGUF metadata (`llama.*` keys).

use super::gguf::{GgufError, GgufFile, Result};

/// Values of `general.architecture` that [`LlamaConfig::from_gguf`] accepts.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Shape and constants of a Llama-architecture transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks (`llama.block_count`).
    pub n_layer: usize,
    /// Model width (`llama.embedding_length`).
    pub n_embd: usize,
    /// Query heads (`llama.attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`llama.attention.head_count_kv`, default `n_head`).
    pub n_head_kv: usize,
    /// Hidden width of the SwiGLU feed-forward (`llama.feed_forward_length`).
    pub n_ff: usize,
    /// Width of one attention head (`llama.attention.key_length`, default `n_embd / n_head`).
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (`llama.rope.dimension_count`, default `head_dim`).
    pub rope_dim: usize,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// RoPE frequency base (`llama.rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// Training context length in tokens (`llama.context_length`).
    pub context_length: usize,
    /// Vocabulary size (`llama.vocab_size`, else the length of `tokenizer.ggml.tokens`).
    pub vocab_size: usize,
    /// Whether the output projection reuses `token_embd.weight` (no `output.weight` tensor).
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    /// Reads the configuration, checking that the architecture is supported and the shapes agree.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture")?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(GgufError::UnsupportedArchitecture {
                found: arch.to_string(),
                supported: SUPPORTED_ARCHITECTURES,
            });
        }
        let usize_of = |key: &str| file.get_u32(key).map(|v| v as usize);
        let usize_or = |key: &str, default: usize| {
            if file.contains_key(key) {
                usize_of(key)
            } else {
                Ok(default)
            }
        };

        let n_embd = usize_of("llama.embedding_length")?;
        let n_head = usize_of("llama.attention.head_count")?;
        if n_head == 0 {
            return Err(GgufError::InvalidConfig(
                "llama.attention.head_count is 0".into(),
            ));
        }
        if !file.contains_key("llama.attention.key_length") && !n_embd.is_multiple_of(n_head) {
            return Err(GgufError::InvalidConfig(format!(
                "embedding length {n_embd} is not a multiple of the head count {n_head}"
            )));
        }
        let head_dim = usize_or("llama.attention.key_length", n_embd / n_head)?;
        let vocab_size = if file.contains_key("llama.vocab_size") {
            usize_of("llama.vocab_size")?
        } else {
            file.get_array("tokenizer.ggml.tokens")?.len()
        };
        let rope_base = if file.contains_key("llama.rope.freq_base") {
            file.get_f32("llama.rope.freq_base")?
        } else {
            10000.0
        };

        let config = Self {
            n_layer: usize_of("llama.block_count")?,
            n_embd,
            n_head,
            n_head_kv: usize_or("llama.attention.head_count_kv", n_head)?,
            n_ff: usize_of("llama.feed_forward_length")?,
            head_dim,
            rope_dim: usize_or("llama.rope.dimension_count", head_dim)?,
            rms_eps: file.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_base,
            context_length: usize_of("llama.context_length")?,
            vocab_size,
            tied_embeddings: file.tensor("output.weight").is_none(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(GgufError::InvalidConfig(msg));
        for (name, value) in [
            ("block_count", self.n_layer),
            ("embedding_length", self.n_embd),
            ("attention.head_count_kv", self.n_head_kv),
            ("feed_forward_length", self.n_ff),
            ("head dimension", self.head_dim),
            ("context_length", self.context_length),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return fail(format!("llama.{name} is 0"));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return fail(format!(
                "head count {} is not a multiple of the KV head count {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return fail(format!(
                "RoPE dimension count {} must be even and at most the head dimension {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return fail(format!("RMSNorm epsilon {} must be positive", self.rms_eps));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return fail(format!("RoPE base {} must be positive", self.rope_base));
        }
        Ok(())
    }

    /// Query heads per KV head (grouped-query attention factor).
    pub fn n_gqa(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Width of the K (or V) projection: `n_head_kv * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Bytes of an f16 KV cache holding `tokens` tokens: keys and values of every layer and KV
    /// head, 2 bytes each.
    pub fn kv_bytes_f16(&self, tokens: usize) -> u64 {
        (2 * self.n_layer * self.kv_dim() * tokens * 2) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::test_writer::Writer;
    use crate::model::gguf::GgufValue;

    fn smollm_like() -> Writer {
        Writer::new(3)
            .kv("general.architecture", GgufValue::String("llama".into()))
            .kv("llama.block_count", GgufValue::U32(30))
            .kv("llama.context_length", GgufValue::U32(8192))
            .kv("llama.embedding_length", GgufValue::U32(576))
            .kv("llama.feed_forward_length", GgufValue::U32(1536))
            .kv("llama.attention.head_count", GgufValue::U32(9))
            .kv("llama.attention.head_count_kv", GgufValue::U32(3))
            .kv("llama.rope.freq_base", GgufValue::F32(100000.0))
            .kv(
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F32(1e-5),
            )
            .kv("llama.vocab_size", GgufValue::U32(49152))
    }

    #[test]
    fn reads_smollm_shape() {
        let f = GgufFile::parse(&smollm_like().to_bytes()).unwrap();
        let c = LlamaConfig::from_gguf(&f).unwrap();
        assert_eq!(
            c,
            LlamaConfig {
                n_layer: 30,
                n_embd: 576,
                n_head: 9,
                n_head_kv: 3,
                n_ff: 1536,
                head_dim: 64,
                rope_dim: 64,
                rms_eps: 1e-5,
                rope_base: 100000.0,
                context_length: 8192,
                vocab_size: 49152,
                tied_embeddings: true,
            }
        );
        assert_eq!((c.n_gqa(), c.kv_dim()), (3, 192));
        // 1,024 tokens: the 23,592,960 bytes the compaction benchmarks compare with.
        assert_eq!(c.kv_bytes_f16(1024), 23_592_960);
    }

    #[test]
    fn defaults_and_fallbacks() {
        let mut w = smollm_like();
        w.metadata.retain(|(k, _)| {
            !matches!(
                k.as_str(),
                "llama.rope.freq_base" | "llama.attention.head_count_kv" | "llama.vocab_size"
            )
        });
        let w = w.kv(
            "tokenizer.ggml.tokens",
            Writer::string_array(&["a", "b", "c"]),
        );
        let c = LlamaConfig::from_gguf(&GgufFile::parse(&w.to_bytes()).unwrap()).unwrap();
        assert_eq!((c.rope_base, c.n_head_kv, c.vocab_size), (10000.0, 9, 3));
    }

    #[test]
    fn rejects_other_architectures_and_bad_shapes() {
        let mut w = smollm_like();
        w.metadata[0].1 = GgufValue::String("qwen2".into());
        let e = LlamaConfig::from_gguf(&GgufFile::parse(&w.to_bytes()).unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported model architecture 'qwen2': kvpack supports llama"
        );

        let mut w = smollm_like();
        w.metadata[6].1 = GgufValue::U32(4);
        let e = LlamaConfig::from_gguf(&GgufFile::parse(&w.to_bytes()).unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a multiple of the KV head count"),
            "{e}"
        );

        let mut w = smollm_like();
        w.metadata.retain(|(k, _)| k != "llama.block_count");
        let e = LlamaConfig::from_gguf(&GgufFile::parse(&w.to_bytes()).unwrap()).unwrap_err();
        assert!(matches!(e, GgufError::MissingKey { key } if key == "llama.block_count"));
    }
}
