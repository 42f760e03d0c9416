//! Seeded randomness of a codec instance: the rotation signs D and the QJL matrix S.
//!
//! Both come from SplitMix64 (Steele, Lea, Flood 2014; the generator of Java's `SplittableRandom`), so a
//! seed fixes them on every platform. S uses its own stream (seed XOR [`QJL_STREAM_XOR`]) so that D and S
//! are independent even though they share the instance seed.

/// XOR-ed into the instance seed to start the stream of the QJL matrix S (D uses the seed itself).
pub const QJL_STREAM_XOR: u64 = 0x5EED_0F5E_ED0F_5EED;

/// SplitMix64: 64-bit state, advanced by the golden-ratio increment, output through a mixing function.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose state starts at `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: `((out >> 11) + 1) · 2⁻⁵³` (never 0, so `ln` is finite).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1): `(out >> 11) · 2⁻⁵³`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent N(0, 1) numbers by Box–Muller from the next two outputs:
    /// `u1 = next_open01`, `u2 = next_f64`, `r = √(−2 ln u1)`, returns `(r cos 2πu2, r sin 2πu2)`.
    pub fn next_gaussian_pair(&mut self) -> (f64, f64) {
        let u1 = self.next_open01();
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }

    /// `n` independent N(0, 1) numbers as f32, from consecutive [`Self::next_gaussian_pair`]s
    /// (the second of the last pair dropped when `n` is odd).
    pub fn gaussians_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n.div_ceil(2))
            .flat_map(|_| {
                let (a, b) = self.next_gaussian_pair();
                [a as f32, b as f32]
            })
            .take(n)
            .collect()
    }
}

/// The diagonal of D: `d` entries of ±1.0; entry j is −1.0 when bit 0 of the j-th SplitMix64 output of
/// `seed` is 1, +1.0 otherwise.
pub fn rotation_signs(seed: u64, d: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..d)
        .map(|_| if rng.next_u64() & 1 == 1 { -1.0 } else { 1.0 })
        .collect()
}

/// The QJL matrix S: d×d entries N(0, 1), row-major (`S[i][j]` at `i·d + j`), from the stream
/// `seed ^ QJL_STREAM_XOR`; entries 2k and 2k+1 are the cosine and sine halves of the k-th Box–Muller
/// pair (computed in f64, rounded to f32).
pub fn qjl_matrix(seed: u64, d: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ QJL_STREAM_XOR);
    let len = d * d;
    let mut s = Vec::with_capacity(len + 1);
    while s.len() < len {
        let (a, b) = rng.next_gaussian_pair();
        s.push(a as f32);
        s.push(b as f32);
    }
    s.truncate(len);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_outputs() {
        // Reference values of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn signs_are_balanced_and_seeded() {
        let a = rotation_signs(7, 4096);
        assert!(a.iter().all(|&s| s == 1.0 || s == -1.0));
        let sum: f32 = a.iter().sum();
        assert!(sum.abs() < 4.0 * 64.0, "sum of 4096 signs = {sum}");
        assert_eq!(a, rotation_signs(7, 4096));
        assert_ne!(a, rotation_signs(8, 4096));
        // A prefix of a longer draw: the j-th sign does not depend on d.
        assert_eq!(&a[..64], &rotation_signs(7, 64)[..]);
    }

    #[test]
    fn qjl_matrix_is_standard_normal() {
        let d = 128;
        let s = qjl_matrix(3, d);
        assert_eq!(s.len(), d * d);
        let n = s.len() as f64;
        let mean = s.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = s.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let m4 = s.iter().map(|&v| (v as f64).powi(4)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "var {var}");
        assert!((m4 - 3.0).abs() < 0.15, "fourth moment {m4}");
        // Independent of the sign stream of the same seed.
        let signs = rotation_signs(3, d);
        let corr: f64 = (0..d).map(|j| signs[j] as f64 * s[j] as f64).sum::<f64>() / d as f64;
        assert!(corr.abs() < 0.4);
    }
}
