//! kvpack: language models with a compressed KV cache on any GPU wgpu reaches.
//!
//! Layers, bottom-up: [`gpu`] (device, pipelines, buffers), [`codec`] (vector formats: f32, f16,
//! q8_0, q4_0, TurboQuant), [`attention`] (attention computed on the compressed cache), [`kv`]
//! (the cache), [`compact`] (KV-cache compaction: Attention Matching and eviction baselines),
//! [`model`] (GGUF, tokenizer, forward pass).
#![warn(missing_docs)]

pub mod attention;
pub mod codec;
pub mod compact;
pub mod gpu;
pub mod kv;
pub mod model;
