//! CPU reference of TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, arXiv 2504.19874), Algorithms 1–2:
//!
//! ```text
//! TurboQuant_mse:  y = Π·x,  idx_j = argmin_k |y_j − c_k|,       x̃ = Πᵀ·c[idx]
//! TurboQuant_prod: idx = Q_mse^(b−1)(x),  r = x − x̃_mse,  σ = sign(S·r),  γ = ‖r‖₂,
//!                  x̃ = x̃_mse + √(π/2)/d · γ · Sᵀ·σ        (E⟨q, x̃⟩ = ⟨q, x⟩)
//! ```
//!
//! with Π = H·D (normalized Walsh–Hadamard times random signs) applied to u = x/‖x‖ and ‖x‖ stored as
//! an f16 scale; see docs/formats.md for the stored layout and the scale modes.

use std::sync::Arc;

use half::f16;

use super::codebook::{codebook, Codebook};
use super::hadamard::{rotate, unrotate};
use super::pack::{fits_f16, pack_bits, unpack_index};
use super::rng::rotation_signs;
use super::spec::ScaleMode;

/// √(π/2), the QJL dequantization constant (divided by d at use).
const SQRT_HALF_PI: f64 = 1.253_314_137_315_500_3;

/// One TurboQuant_mse instance on `d` channels: its signs D and its codebook.
#[derive(Debug, Clone)]
pub(crate) struct TurboPart {
    pub d: usize,
    pub bits: u8,
    pub signs: Vec<f32>,
    pub codebook: Arc<Codebook>,
}

/// ‖x‖ computed in f64 and rounded to f32.
pub(crate) fn norm_f32(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The result of rotating and quantizing one nonzero vector.
struct Quantized {
    norm: f32,
    y: Vec<f32>,
    idx: Vec<u32>,
}

impl TurboPart {
    pub fn new(d: usize, bits: u8, seed: u64) -> Self {
        TurboPart {
            d,
            bits,
            signs: rotation_signs(seed, d),
            codebook: codebook(d, bits),
        }
    }

    /// Code words of this part's indices.
    pub fn index_words(&self) -> usize {
        self.bits as usize * self.d / 32
    }

    /// ‖x‖, y = H·D·(x/‖x‖) and the indices; None for the zero vector (x must be finite).
    fn quantize(&self, x: &[f32]) -> Option<Quantized> {
        let norm = norm_f32(x);
        if norm == 0.0 {
            return None;
        }
        let u: Vec<f32> = x.iter().map(|&v| v / norm).collect();
        let y = rotate(&self.signs, &u);
        let idx = y.iter().map(|&v| self.codebook.quantize(v)).collect();
        Some(Quantized { norm, y, idx })
    }

    fn centroids_of(&self, idx: &[u32]) -> Vec<f32> {
        let c = self.codebook.centroids();
        idx.iter().map(|&i| c[i as usize]).collect()
    }

    /// TurboQuant_mse of a finite vector: writes `index_words` code words, returns the scale, or None when
    /// the scale does not fit f16.
    pub fn encode_mse(&self, x: &[f32], mode: ScaleMode, codes: &mut [u32]) -> Option<f32> {
        let words = &mut codes[..self.index_words()];
        let Some(q) = self.quantize(x) else {
            words.fill(0);
            return Some(0.0);
        };
        pack_bits(&q.idx, self.bits as u32, words);
        let c = self.centroids_of(&q.idx);
        let s = match mode {
            ScaleMode::Paper => q.norm,
            ScaleMode::Norm => (q.norm as f64 / dot_f64(&c, &c).sqrt()) as f32,
            ScaleMode::Unbiased => {
                // ⟨y, ĉ⟩ > 0 whenever y ≠ 0 (y_j and its centroid share a sign); the guard only keeps
                // a degenerate input from producing an infinite or negative scale.
                let yc = dot_f64(&q.y, &c);
                if yc > 0.0 {
                    (q.norm as f64 / yc) as f32
                } else {
                    q.norm
                }
            }
        };
        fits_f16(s).then_some(s)
    }

    /// s·ĉ: the decoded vector in the rotated domain.
    pub fn decode_mse_rotated(&self, codes: &[u32], s: f32) -> Vec<f32> {
        let c = self.codebook.centroids();
        (0..self.d)
            .map(|j| s * c[unpack_index(codes, self.bits as u32, j) as usize])
            .collect()
    }

    /// s·⟨rq, ĉ⟩, computed on the codes.
    pub fn score_mse(&self, rq: &[f32], codes: &[u32], s: f32) -> f32 {
        let c = self.codebook.centroids();
        let dot: f64 = (0..self.d)
            .map(|j| rq[j] as f64 * c[unpack_index(codes, self.bits as u32, j) as usize] as f64)
            .sum();
        (s as f64 * dot) as f32
    }

    pub fn unrotate(&self, y: &[f32]) -> Vec<f32> {
        unrotate(&self.signs, y)
    }

    pub fn rotate(&self, x: &[f32]) -> Vec<f32> {
        rotate(&self.signs, x)
    }
}

/// TurboQuant_prod on `d` channels: a (bits − 1)-bit MSE part (its codebook has 2^(bits−1) centroids; a
/// single 0 for bits = 1) plus the QJL matrix S (d×d, row-major).
pub(crate) struct Prod<'a> {
    pub mse: &'a TurboPart,
    pub s: &'a [f32],
}

impl Prod<'_> {
    fn d(&self) -> usize {
        self.mse.d
    }

    /// Words of the MSE indices; the d/32 sign words follow.
    fn mse_words(&self) -> usize {
        self.mse.index_words()
    }

    /// √(π/2)/d · γ in f32.
    fn qjl_coef(&self, gamma: f32) -> f32 {
        (SQRT_HALF_PI / self.d() as f64) as f32 * gamma
    }

    /// Encodes a finite vector; returns (s = ‖x‖, γ = ‖r‖) or None when s does not fit f16.
    pub fn encode(&self, x: &[f32], codes: &mut [u32]) -> Option<(f32, f32)> {
        let d = self.d();
        let Some(q) = self.mse.quantize(x) else {
            codes.fill(0);
            return Some((0.0, 0.0));
        };
        if !fits_f16(q.norm) {
            return None;
        }
        let (mse_codes, sign_codes) = codes.split_at_mut(self.mse_words());
        pack_bits(&q.idx, self.mse.bits as u32, mse_codes);
        let c = self.mse.centroids_of(&q.idx);
        let r: Vec<f32> = q.y.iter().zip(&c).map(|(&y, &c)| y - c).collect();
        let gamma = norm_f32(&r);
        sign_codes.fill(0);
        for (i, row) in self.s.chunks_exact(d).enumerate() {
            if dot_f64(row, &r) >= 0.0 {
                sign_codes[i / 32] |= 1 << (i % 32);
            }
        }
        Some((q.norm, gamma))
    }

    fn sign(codes: &[u32], i: usize) -> f32 {
        if (codes[i / 32] >> (i % 32)) & 1 == 1 {
            1.0
        } else {
            -1.0
        }
    }

    /// s·(ĉ + √(π/2)/d·γ·Sᵀσ): the decoded vector in the rotated domain.
    pub fn decode_rotated(&self, codes: &[u32], s: f32, gamma: f32) -> Vec<f32> {
        let d = self.d();
        let (mse_codes, sign_codes) = codes.split_at(self.mse_words());
        let c = self.mse.codebook.centroids();
        let coef = self.qjl_coef(gamma);
        let mut st_sigma = vec![0.0f64; d];
        for (i, row) in self.s.chunks_exact(d).enumerate() {
            let sigma = Self::sign(sign_codes, i) as f64;
            for (acc, &v) in st_sigma.iter_mut().zip(row) {
                *acc += sigma * v as f64;
            }
        }
        (0..d)
            .map(|j| {
                let chat = c[unpack_index(mse_codes, self.mse.bits as u32, j) as usize];
                s * (chat + coef * st_sigma[j] as f32)
            })
            .collect()
    }

    /// S·rq, the query's QJL projection (once per query).
    pub fn project(&self, rq: &[f32]) -> Vec<f32> {
        self.s
            .chunks_exact(self.d())
            .map(|row| dot_f64(row, rq) as f32)
            .collect()
    }

    /// s·(⟨rq, ĉ⟩ + √(π/2)/d·γ·⟨S·rq, σ⟩), computed on the codes.
    pub fn score(&self, rq: &[f32], projected: &[f32], codes: &[u32], s: f32, gamma: f32) -> f32 {
        let (mse_codes, sign_codes) = codes.split_at(self.mse_words());
        let c = self.mse.codebook.centroids();
        let mse: f64 = (0..self.d())
            .map(|j| {
                rq[j] as f64 * c[unpack_index(mse_codes, self.mse.bits as u32, j) as usize] as f64
            })
            .sum();
        let qjl: f64 = projected
            .iter()
            .enumerate()
            .map(|(i, &p)| p as f64 * Self::sign(sign_codes, i) as f64)
            .sum();
        (s as f64 * (mse + self.qjl_coef(gamma) as f64 * qjl)) as f32
    }
}

/// Rounds a scale to the stored f16 (callers checked the range).
pub(crate) fn to_half(v: f32) -> f16 {
    f16::from_f32(v)
}
