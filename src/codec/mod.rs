//! KV-vector formats: typed specs, exact layouts (docs/formats.md) and the CPU reference every GPU
//! kernel is tested against.
//!
//! A format is a value: `"turbo3".parse::<VecFormat>()`, `"k4v2".parse::<KvFormat>()`. A [`Codec`] is
//! one instance of a format — (format, d, seed[, channel permutation]) — holding what the seed fixes
//! (rotation signs, QJL matrix) and the computed Lloyd–Max codebooks; [`Codec::aux_words`] hands the same
//! to the GPU.
//!
//! ```
//! use kvpack::codec::{Codec, VecFormat};
//!
//! let codec = Codec::with_seed("turbo3".parse::<VecFormat>()?, 64, 7)?;
//! let xs: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let enc = codec.encode(&xs)?;
//! assert_eq!(enc.words.len(), 2 * 6 + 1); // 2 × (3·64/32) code words + two f16 norms
//! let back = codec.decode(&enc);
//! assert_eq!(back.len(), xs.len());
//! # Ok::<(), kvpack::codec::CodecError>(())
//! ```

mod blocks;
pub mod codebook;
mod error;
pub mod gpu;
pub mod hadamard;
pub mod pack;
mod reference;
pub mod rng;
mod spec;
mod turbo;

#[cfg(test)]
mod tests;

pub use codebook::{
    codebook, expected_mse, gaussian_codebook, gaussian_expected_mse, Codebook, CoordinateLaw,
};
pub use error::CodecError;
pub use hadamard::{fwht_normalized, rotate, unrotate};
pub use reference::{
    split_perm, Codec, CodecParams, Encoded, RotatedQuery, AUX_CODEBOOK_SLOTS, AUX_HEADER_WORDS,
};
pub use rng::{qjl_matrix, rotation_signs, SplitMix64, QJL_STREAM_XOR};
pub use spec::{KvFormat, ScaleMode, VecFormat, FORMAT_HINT};
