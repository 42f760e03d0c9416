//! A codec instance — (format, d, seed, channel permutation) — and its CPU reference encode/decode on
//! the storage layout of docs/formats.md, plus the rotated-domain view that attention uses.

use std::fmt;

use half::f16;
use serde::{Deserialize, Serialize};

use super::blocks;
use super::codebook::Codebook;
use super::error::CodecError;
use super::pack::{get_half, set_half};
use super::rng::qjl_matrix;
use super::spec::{ScaleMode, VecFormat};
use super::turbo::{to_half, Prod, TurboPart};

/// Words in the header of [`Codec::aux_words`].
pub const AUX_HEADER_WORDS: usize = 16;
/// f32 slots per codebook in [`Codec::aux_words`] (2^4 centroids, zero-padded).
pub const AUX_CODEBOOK_SLOTS: usize = 16;

/// What defines a codec instance. The split formats take an optional channel permutation (`perm[..d/2]`
/// the outlier channels, `perm[d/2..]` the rest, each half increasing; default: outliers 0..d/2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecParams {
    /// The vector format.
    pub format: VecFormat,
    /// Vector dimension (head_dim).
    pub d: usize,
    /// Instance seed: fixes D (and S for prod; split parts use seed + 1 and seed + 2).
    pub seed: u64,
    /// Channel permutation of a split format.
    pub perm: Option<Vec<u32>>,
}

impl CodecParams {
    /// Parameters without a permutation.
    pub fn new(format: VecFormat, d: usize, seed: u64) -> Self {
        CodecParams {
            format,
            d,
            seed,
            perm: None,
        }
    }

    /// The same parameters with a channel permutation (split formats only).
    pub fn with_perm(mut self, perm: Vec<u32>) -> Self {
        self.perm = Some(perm);
        self
    }
}

/// The permutation of a split format whose outlier half is `outliers` (d/2 distinct channels < d, any
/// order): the outliers in increasing order, then the other channels in increasing order.
pub fn split_perm(d: usize, outliers: &[u32]) -> Result<Vec<u32>, CodecError> {
    let bad = |why: String| CodecError::BadPermutation {
        format: "split".into(),
        dim: d,
        why,
    };
    if outliers.len() != d / 2 {
        return Err(bad(format!(
            "{} outlier channels given, a split needs d/2 = {}",
            outliers.len(),
            d / 2
        )));
    }
    let mut is_outlier = vec![false; d];
    for &c in outliers {
        match is_outlier.get_mut(c as usize) {
            None => return Err(bad(format!("channel {c} is out of range 0..{d}"))),
            Some(true) => return Err(bad(format!("channel {c} is listed twice"))),
            Some(slot) => *slot = true,
        }
    }
    let hi = (0..d as u32).filter(|&c| is_outlier[c as usize]);
    let lo = (0..d as u32).filter(|&c| !is_outlier[c as usize]);
    Ok(hi.chain(lo).collect())
}

/// `n` encoded vectors of dimension `d`: the codes region (`n × code_words` words) followed by the scales
/// region (`ceil(n × scale_halves / 2)` words of packed f16), as in docs/formats.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoded {
    /// Number of vectors.
    pub n: usize,
    /// Vector dimension.
    pub d: usize,
    /// Codes region, then scales region.
    pub words: Vec<u32>,
}

/// A query in a codec's rotated domain: `⟨rotated, decode_rotated(i)⟩ = ⟨q, x̃_i⟩`.
#[derive(Debug, Clone, PartialEq)]
pub struct RotatedQuery {
    /// H·D·q (split formats: each part's rotation of its gathered channels, outlier part first;
    /// non-rotating formats: q itself).
    pub rotated: Vec<f32>,
    /// S·H·D·q for TurboQuant_prod (pairs with the stored QJL signs); empty otherwise.
    pub projected: Vec<f32>,
}

/// A codec instance: format, dimension, seed, and what they determine (signs, codebooks, S, perm).
#[derive(Clone)]
pub struct Codec {
    params: CodecParams,
    /// Turbo / prod: one part on d channels; split: outlier part then rest, d/2 channels each.
    parts: Vec<TurboPart>,
    /// QJL matrix (prod only), d×d row-major.
    s: Vec<f32>,
    /// Channel permutation (split only; identity by default).
    perm: Vec<u32>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("format", &self.params.format.name())
            .field("d", &self.params.d)
            .field("seed", &self.params.seed)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// Builds an instance: validates the dimension (and permutation), draws the signs and S from the seed,
    /// fetches the codebooks (computed on first use).
    pub fn new(params: CodecParams) -> Result<Self, CodecError> {
        let (format, d, seed) = (params.format, params.d, params.seed);
        format.validate_dim(d)?;
        let bad_perm = |why: String| CodecError::BadPermutation {
            format: format.name(),
            dim: d,
            why,
        };
        let mut parts = Vec::new();
        let mut s = Vec::new();
        let mut perm = Vec::new();
        match format {
            VecFormat::Turbo { bits, .. } => parts.push(TurboPart::new(d, bits, seed)),
            VecFormat::TurboProd { bits } => {
                parts.push(TurboPart::new(d, bits - 1, seed));
                s = qjl_matrix(seed, d);
            }
            VecFormat::TurboSplit { hi, lo } => {
                parts.push(TurboPart::new(d / 2, hi, seed.wrapping_add(1)));
                parts.push(TurboPart::new(d / 2, lo, seed.wrapping_add(2)));
                perm = match &params.perm {
                    None => (0..d as u32).collect(),
                    Some(p) => {
                        check_perm(p, d).map_err(bad_perm)?;
                        p.clone()
                    }
                };
            }
            _ => {}
        }
        if params.perm.is_some() && !matches!(format, VecFormat::TurboSplit { .. }) {
            return Err(bad_perm(
                "only the split formats (turbo2.5, turbo3.5, …) take a permutation".into(),
            ));
        }
        Ok(Codec {
            params,
            parts,
            s,
            perm,
        })
    }

    /// Shorthand for `Codec::new(CodecParams::new(format, d, seed))`.
    pub fn with_seed(format: VecFormat, d: usize, seed: u64) -> Result<Self, CodecError> {
        Self::new(CodecParams::new(format, d, seed))
    }

    /// The parameters it was built from.
    pub fn params(&self) -> &CodecParams {
        &self.params
    }

    /// The vector format.
    pub fn format(&self) -> VecFormat {
        self.params.format
    }

    /// The vector dimension.
    pub fn dim(&self) -> usize {
        self.params.d
    }

    /// Code words per vector.
    pub fn code_words(&self) -> usize {
        self.params.format.code_words(self.params.d)
    }

    /// f16 scales per vector.
    pub fn scale_halves(&self) -> usize {
        self.params.format.scale_halves(self.params.d)
    }

    /// Stored bits per value, everything counted.
    pub fn bits_per_value(&self) -> f64 {
        self.params.format.bits_per_value(self.params.d)
    }

    /// Words that `n` encoded vectors occupy: `n·code_words + ceil(n·scale_halves/2)`.
    pub fn encoded_words(&self, n: usize) -> usize {
        n * self.code_words() + (n * self.scale_halves()).div_ceil(2)
    }

    /// Rotation signs of part `p` (0; split: 0 = outlier part, 1 = the rest); None for non-turbo formats.
    pub fn signs(&self, p: usize) -> Option<&[f32]> {
        self.parts.get(p).map(|t| t.signs.as_slice())
    }

    /// Codebook of part `p` (prod: the (b−1)-bit MSE codebook); None for non-turbo formats.
    pub fn codebook(&self, p: usize) -> Option<&Codebook> {
        self.parts.get(p).map(|t| &*t.codebook)
    }

    /// The QJL matrix S (d×d, row-major) of a prod format.
    pub fn qjl_matrix(&self) -> Option<&[f32]> {
        (!self.s.is_empty()).then_some(self.s.as_slice())
    }

    /// The channel permutation of a split format.
    pub fn perm(&self) -> Option<&[u32]> {
        (!self.perm.is_empty()).then_some(self.perm.as_slice())
    }

    /// Everything a GPU kernel needs besides the codes, as one `u32` array (f32 stored as bits):
    /// a 16-word header `[kind, d, bits_a, bits_b, scale_mode, off_signs_a, off_cb_a, off_signs_b,
    /// off_cb_b, off_perm, off_s, 0, 0, 0, 0, 0]` then the arrays at those word offsets (0 = absent):
    /// signs (±1.0, d or d/2 per part), codebooks (16 f32 slots, ascending, zero-padded), perm (d u32),
    /// S (d×d f32, row-major). See docs/formats.md for bits_a / bits_b per kind.
    pub fn aux_words(&self) -> Vec<u32> {
        let format = self.params.format;
        let d = self.params.d;
        let mut h = [0u32; AUX_HEADER_WORDS];
        h[0] = format.kind();
        h[1] = d as u32;
        let mut body: Vec<u32> = Vec::new();
        let push = |body: &mut Vec<u32>, data: &[u32]| -> u32 {
            let off = (AUX_HEADER_WORDS + body.len()) as u32;
            body.extend_from_slice(data);
            off
        };
        let f32_words = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let cb_words = |t: &TurboPart| {
            let mut slots = [0u32; AUX_CODEBOOK_SLOTS];
            for (s, c) in slots.iter_mut().zip(t.codebook.centroids()) {
                *s = c.to_bits();
            }
            slots
        };
        match format {
            VecFormat::F32 => h[2] = 32,
            VecFormat::F16 => h[2] = 16,
            VecFormat::Q8_0 => h[2] = 8,
            VecFormat::Q4_0 => h[2] = 4,
            VecFormat::Turbo { .. }
            | VecFormat::TurboProd { .. }
            | VecFormat::TurboSplit { .. } => {
                let a = &self.parts[0];
                h[2] = a.bits as u32;
                h[4] = match format {
                    VecFormat::Turbo { scale, .. } => scale.code(),
                    _ => ScaleMode::Paper.code(),
                };
                h[5] = push(&mut body, &f32_words(&a.signs));
                h[6] = push(&mut body, &cb_words(a));
                if let Some(b) = self.parts.get(1) {
                    h[3] = b.bits as u32;
                    h[7] = push(&mut body, &f32_words(&b.signs));
                    h[8] = push(&mut body, &cb_words(b));
                    h[9] = push(&mut body, &self.perm);
                }
                if matches!(format, VecFormat::TurboProd { .. }) {
                    h[10] = push(&mut body, &f32_words(&self.s));
                }
            }
        }
        let mut out = h.to_vec();
        out.extend(body);
        out
    }

    /// Encodes one vector (`d` values) into `codes` (`code_words`) and `scales` (`scale_halves`).
    /// Returns false, and stores the zero vector (all words and scales 0), when it has a NaN/±Inf
    /// component or a value to be stored as f16 would exceed 65504.
    ///
    /// # Panics
    /// When a slice has the wrong length.
    pub fn encode_vector(&self, x: &[f32], codes: &mut [u32], scales: &mut [f16]) -> bool {
        let d = self.params.d;
        assert_eq!(
            x.len(),
            d,
            "encode_vector: {} values for dimension {d}",
            x.len()
        );
        assert_eq!(
            codes.len(),
            self.code_words(),
            "encode_vector: code slice length"
        );
        assert_eq!(
            scales.len(),
            self.scale_halves(),
            "encode_vector: scale slice length"
        );
        let ok = x.iter().all(|v| v.is_finite()) && self.encode_finite(x, codes, scales);
        if !ok {
            codes.fill(0);
            scales.fill(f16::ZERO);
        }
        ok
    }

    fn encode_finite(&self, x: &[f32], codes: &mut [u32], scales: &mut [f16]) -> bool {
        match self.params.format {
            VecFormat::F32 => blocks::encode_f32(x, codes),
            VecFormat::F16 => blocks::encode_f16(x, codes),
            VecFormat::Q8_0 => blocks::encode_q8_0(x, codes, scales),
            VecFormat::Q4_0 => blocks::encode_q4_0(x, codes, scales),
            VecFormat::Turbo { scale, .. } => match self.parts[0].encode_mse(x, scale, codes) {
                Some(s) => {
                    scales[0] = to_half(s);
                    true
                }
                None => false,
            },
            VecFormat::TurboProd { .. } => match self.prod().encode(x, codes) {
                Some((s, gamma)) => {
                    scales[0] = to_half(s);
                    scales[1] = to_half(gamma);
                    true
                }
                None => false,
            },
            VecFormat::TurboSplit { .. } => {
                let (hi, lo) = self.gather(x);
                let (codes_hi, codes_lo) = codes.split_at_mut(self.parts[0].index_words());
                let s_hi = self.parts[0].encode_mse(&hi, ScaleMode::Paper, codes_hi);
                let s_lo = self.parts[1].encode_mse(&lo, ScaleMode::Paper, codes_lo);
                match (s_hi, s_lo) {
                    (Some(a), Some(b)) => {
                        scales[0] = to_half(a);
                        scales[1] = to_half(b);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// Decodes one vector from its code words and scales into `out` (`d` values).
    ///
    /// # Panics
    /// When a slice has the wrong length.
    pub fn decode_vector(&self, codes: &[u32], scales: &[f16], out: &mut [f32]) {
        assert_eq!(out.len(), self.params.d, "decode_vector: output length");
        assert_eq!(
            codes.len(),
            self.code_words(),
            "decode_vector: code slice length"
        );
        assert_eq!(
            scales.len(),
            self.scale_halves(),
            "decode_vector: scale slice length"
        );
        match self.params.format {
            VecFormat::F32 => blocks::decode_f32(codes, out),
            VecFormat::F16 => blocks::decode_f16(codes, out),
            VecFormat::Q8_0 => blocks::decode_q8_0(codes, scales, out),
            VecFormat::Q4_0 => blocks::decode_q4_0(codes, scales, out),
            _ => out.copy_from_slice(&self.unrotate_output(&self.rotated_vector(codes, scales))),
        }
    }

    /// The decoded vector in the rotated domain (turbo formats): s·ĉ, prod adds its QJL term, split
    /// concatenates the parts (outlier part first).
    fn rotated_vector(&self, codes: &[u32], scales: &[f16]) -> Vec<f32> {
        let s0 = scales.first().map_or(0.0, |s| s.to_f32());
        match self.params.format {
            VecFormat::Turbo { .. } => self.parts[0].decode_mse_rotated(codes, s0),
            VecFormat::TurboProd { .. } => {
                self.prod().decode_rotated(codes, s0, scales[1].to_f32())
            }
            VecFormat::TurboSplit { .. } => {
                let (codes_hi, codes_lo) = codes.split_at(self.parts[0].index_words());
                let mut v = self.parts[0].decode_mse_rotated(codes_hi, s0);
                v.extend(self.parts[1].decode_mse_rotated(codes_lo, scales[1].to_f32()));
                v
            }
            _ => {
                let mut out = vec![0.0; self.params.d];
                self.decode_vector(codes, scales, &mut out);
                out
            }
        }
    }

    /// Encodes `xs` (n×d, row-major). Vectors that cannot be stored (NaN/±Inf, or beyond f16's range)
    /// make this an error; use [`Self::encode_lossy`] to store them as zero vectors and go on.
    pub fn encode(&self, xs: &[f32]) -> Result<Encoded, CodecError> {
        let (enc, zeroed) = self.encode_impl(xs)?;
        match zeroed.first() {
            None => Ok(enc),
            Some(&first_index) => Err(CodecError::NonFinite {
                count: zeroed.len(),
                first_index,
            }),
        }
    }

    /// Encodes `xs` (n×d, row-major), storing vectors that cannot be stored as zero vectors; returns the
    /// encoding and how many vectors were zeroed. Errors only on a length that is not a multiple of d.
    pub fn encode_lossy(&self, xs: &[f32]) -> Result<(Encoded, usize), CodecError> {
        let (enc, zeroed) = self.encode_impl(xs)?;
        Ok((enc, zeroed.len()))
    }

    fn encode_impl(&self, xs: &[f32]) -> Result<(Encoded, Vec<usize>), CodecError> {
        let d = self.params.d;
        if !xs.len().is_multiple_of(d) {
            return Err(CodecError::LengthMismatch {
                what: format!(
                    "{} input of n vectors × d = {d} values (row-major)",
                    self.params.format
                ),
                got: xs.len(),
                expected: xs.len().div_ceil(d) * d,
            });
        }
        let n = xs.len() / d;
        let (cw, sh) = (self.code_words(), self.scale_halves());
        let mut words = vec![0u32; self.encoded_words(n)];
        let mut scales = vec![f16::ZERO; sh];
        let mut zeroed = Vec::new();
        for (i, x) in xs.chunks_exact(d).enumerate() {
            let (codes_region, scale_region) = words.split_at_mut(n * cw);
            if !self.encode_vector(x, &mut codes_region[i * cw..(i + 1) * cw], &mut scales) {
                zeroed.push(i);
            }
            for (k, &s) in scales.iter().enumerate() {
                set_half(scale_region, i * sh + k, s);
            }
        }
        Ok((Encoded { n, d, words }, zeroed))
    }

    /// Checks that `enc` has this codec's dimension and the word count its `n` implies (for encodings
    /// read from files).
    pub fn check_encoded(&self, enc: &Encoded) -> Result<(), CodecError> {
        if enc.d != self.params.d {
            return Err(CodecError::LengthMismatch {
                what: format!("dimension of an encoding decoded by a d = {} codec (decode with the codec that encoded it)", self.params.d),
                got: enc.d,
                expected: self.params.d,
            });
        }
        if enc.words.len() != self.encoded_words(enc.n) {
            return Err(CodecError::LengthMismatch {
                what: format!("words of {} encoded {} vectors", enc.n, self.params.format),
                got: enc.words.len(),
                expected: self.encoded_words(enc.n),
            });
        }
        Ok(())
    }

    fn checked(&self, enc: &Encoded) {
        if let Err(e) = self.check_encoded(enc) {
            panic!("{e}");
        }
    }

    /// Decodes all vectors (n×d, row-major).
    ///
    /// # Panics
    /// When `enc` does not fit this codec ([`Self::check_encoded`] says why; call it first on untrusted
    /// data).
    pub fn decode(&self, enc: &Encoded) -> Vec<f32> {
        self.checked(enc);
        let d = self.params.d;
        let mut out = vec![0.0f32; enc.n * d];
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            self.decode_vector(self.code_words_of(enc, i), &self.scales_of(enc, i), o);
        }
        out
    }

    /// The code words of vector `i`.
    pub fn code_words_of<'a>(&self, enc: &'a Encoded, i: usize) -> &'a [u32] {
        let cw = self.code_words();
        &enc.words[i * cw..(i + 1) * cw]
    }

    /// Scale `k` (0..scale_halves) of vector `i`, as f32 (exact: it is stored as f16).
    pub fn scale_of(&self, enc: &Encoded, i: usize, k: usize) -> f32 {
        let sh = self.scale_halves();
        assert!(k < sh, "scale_of: scale {k} of a format with {sh}");
        get_half(&enc.words[enc.n * self.code_words()..], i * sh + k).to_f32()
    }

    fn scales_of(&self, enc: &Encoded, i: usize) -> Vec<f16> {
        let sh = self.scale_halves();
        let region = &enc.words[enc.n * self.code_words()..];
        (0..sh).map(|k| get_half(region, i * sh + k)).collect()
    }

    /// Vector `i` decoded but left in the rotated domain: s·ĉ (prod: s·(ĉ + √(π/2)/d·γ·Sᵀσ); split: the
    /// two parts concatenated, outlier part first; non-rotating formats: the decoded vector), so that
    /// `⟨rotate_query(q).rotated, decode_rotated(enc, i)⟩ = ⟨q, x̃_i⟩` and
    /// `unrotate_output(decode_rotated(enc, i)) = x̃_i`.
    pub fn decode_rotated(&self, enc: &Encoded, i: usize) -> Vec<f32> {
        self.checked(enc);
        self.rotated_vector(self.code_words_of(enc, i), &self.scales_of(enc, i))
    }

    /// The channels of x gathered by the split permutation: (outlier part, rest).
    fn gather(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.params.d / 2;
        let hi = self.perm[..half].iter().map(|&c| x[c as usize]).collect();
        let lo = self.perm[half..].iter().map(|&c| x[c as usize]).collect();
        (hi, lo)
    }

    /// Rotates a vector into this codec's rotated domain: H·D·x (split: per part after the gather;
    /// non-rotating formats: x itself).
    ///
    /// # Panics
    /// When `x.len() != d`.
    pub fn to_rotated(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(
            x.len(),
            self.params.d,
            "to_rotated: {} values for dimension {}",
            x.len(),
            self.params.d
        );
        match self.params.format {
            VecFormat::Turbo { .. } | VecFormat::TurboProd { .. } => self.parts[0].rotate(x),
            VecFormat::TurboSplit { .. } => {
                let (hi, lo) = self.gather(x);
                let mut v = self.parts[0].rotate(&hi);
                v.extend(self.parts[1].rotate(&lo));
                v
            }
            _ => x.to_vec(),
        }
    }

    /// Rotates a query once per step for attention on codes ([`Self::score`]): H·D·q, plus S·H·D·q for
    /// TurboQuant_prod.
    ///
    /// # Panics
    /// When `q.len() != d`.
    pub fn rotate_query(&self, q: &[f32]) -> RotatedQuery {
        let rotated = self.to_rotated(q);
        let projected = match self.params.format {
            VecFormat::TurboProd { .. } => self.prod().project(&rotated),
            _ => Vec::new(),
        };
        RotatedQuery { rotated, projected }
    }

    /// ⟨q, x̃_i⟩ computed directly on the codes of vector `i` from the rotated query: s·⟨H·D·q, ĉ⟩
    /// (+ s·γ·√(π/2)/d·⟨S·H·D·q, σ⟩ for prod; split: the sum over parts).
    pub fn score(&self, rq: &RotatedQuery, enc: &Encoded, i: usize) -> f32 {
        self.checked(enc);
        let codes = self.code_words_of(enc, i);
        let scales = self.scales_of(enc, i);
        let rqv = &rq.rotated;
        match self.params.format {
            VecFormat::Turbo { .. } => self.parts[0].score_mse(rqv, codes, scales[0].to_f32()),
            VecFormat::TurboProd { .. } => self.prod().score(
                rqv,
                &rq.projected,
                codes,
                scales[0].to_f32(),
                scales[1].to_f32(),
            ),
            VecFormat::TurboSplit { .. } => {
                let half = self.params.d / 2;
                let (codes_hi, codes_lo) = codes.split_at(self.parts[0].index_words());
                self.parts[0].score_mse(&rqv[..half], codes_hi, scales[0].to_f32())
                    + self.parts[1].score_mse(&rqv[half..], codes_lo, scales[1].to_f32())
            }
            _ => {
                let x = self.rotated_vector(codes, &scales);
                rqv.iter()
                    .zip(&x)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>() as f32
            }
        }
    }

    /// Maps a rotated-domain vector (e.g. an attention output accumulated from [`Self::decode_rotated`]
    /// values) back: D·H·y (split: per part, then scattered through the permutation; non-rotating
    /// formats: y itself).
    ///
    /// # Panics
    /// When `y.len() != d`.
    pub fn unrotate_output(&self, y: &[f32]) -> Vec<f32> {
        let d = self.params.d;
        assert_eq!(
            y.len(),
            d,
            "unrotate_output: {} values for dimension {d}",
            y.len()
        );
        match self.params.format {
            VecFormat::Turbo { .. } | VecFormat::TurboProd { .. } => self.parts[0].unrotate(y),
            VecFormat::TurboSplit { .. } => {
                let half = d / 2;
                let hi = self.parts[0].unrotate(&y[..half]);
                let lo = self.parts[1].unrotate(&y[half..]);
                let mut out = vec![0.0; d];
                for (k, &c) in self.perm.iter().enumerate() {
                    out[c as usize] = if k < half { hi[k] } else { lo[k - half] };
                }
                out
            }
            _ => y.to_vec(),
        }
    }

    fn prod(&self) -> Prod<'_> {
        Prod {
            mse: &self.parts[0],
            s: &self.s,
        }
    }
}

fn check_perm(p: &[u32], d: usize) -> Result<(), String> {
    if p.len() != d {
        return Err(format!("{} entries, need d = {d}", p.len()));
    }
    let mut seen = vec![false; d];
    for &c in p {
        match seen.get_mut(c as usize) {
            None => return Err(format!("channel {c} is out of range 0..{d}")),
            Some(true) => return Err(format!("channel {c} appears twice")),
            Some(s) => *s = true,
        }
    }
    let half = d / 2;
    if !p[..half].windows(2).all(|w| w[0] < w[1]) || !p[half..].windows(2).all(|w| w[0] < w[1]) {
        return Err("each half must be in increasing order (use split_perm to build one)".into());
    }
    Ok(())
}
