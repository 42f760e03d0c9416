//! Model files: the GGUF container, Llama hyperparameters and the byte-level BPE tokenizer.
//!
//! Everything here runs on the CPU and knows nothing of GPUs or of a particular KV-cache codec.

pub mod config;
pub mod gguf;
pub mod ops;
pub mod tokenizer;
pub mod weights;
mod unicode;

pub use config::LlamaConfig;
pub use gguf::{GgmlType, GgufError, GgufFile, GgufValue, TensorInfo};
pub use tokenizer::{EncodeOptions, StreamDecoder, TokenType, Tokenizer, TokenizerError};
