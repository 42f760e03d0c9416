//! Models: the GGUF container, Llama hyperparameters, the byte-level BPE tokenizer (CPU), weights
//! kept in their GGUF blocks on the GPU, the transformer kernels and the llama forward pass. Nothing
//! here depends on a particular KV-cache format: the cache's format is data.

pub mod config;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod ops;
pub mod sampler;
pub mod tokenizer;
mod unicode;
pub mod weights;

pub use config::LlamaConfig;
pub use gguf::{GgmlType, GgufError, GgufFile, GgufValue, TensorInfo};
pub use tokenizer::{EncodeOptions, StreamDecoder, TokenType, Tokenizer, TokenizerError};
