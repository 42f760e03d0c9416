//! Errors of the codec layer.

/// What can go wrong when parsing a format, building a codec or encoding vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A format string that names no format.
    #[error("unknown KV format {input:?}; {hint}")]
    UnknownFormat {
        /// The string as given.
        input: String,
        /// The valid formats, with examples.
        hint: String,
    },
    /// A format that cannot store vectors of this dimension.
    #[error("format {format} cannot store vectors of dimension {dim}: {why}")]
    BadDim {
        /// The format's name.
        format: String,
        /// The dimension asked for.
        dim: usize,
        /// What the format needs.
        why: String,
    },
    /// A TurboQuant format with an unsupported bit width (built directly, not parsed).
    #[error("format {format} has {bits} bits per index; TurboQuant formats take 1 to 4 bits")]
    BadBits {
        /// The format's name.
        format: String,
        /// The offending width.
        bits: u8,
    },
    /// Vectors with NaN/±Inf components, or whose stored f16 values would exceed 65504, were stored as
    /// zero vectors.
    #[error(
        "{count} vector(s) had NaN/Inf components or values too large for f16 (> 65504; first: vector \
         {first_index}) and were stored as zero vectors; check the input, or scale it down, or use \
         encode_lossy to accept this"
    )]
    NonFinite {
        /// How many vectors were zeroed.
        count: usize,
        /// Index of the first zeroed vector.
        first_index: usize,
    },
    /// An input whose length does not fit the shape it should have.
    #[error("{what}: got {got}, expected {expected}")]
    LengthMismatch {
        /// Which input, and the shape it should have.
        what: String,
        /// Its length (or the mismatched quantity).
        got: usize,
        /// What it needs (for n×d inputs: the next multiple of d).
        expected: usize,
    },
    /// A channel permutation for a split format that is not valid.
    #[error("bad channel permutation for {format} at dimension {dim}: {why}")]
    BadPermutation {
        /// The format's name.
        format: String,
        /// The dimension.
        dim: usize,
        /// What is wrong with it.
        why: String,
    },
}
