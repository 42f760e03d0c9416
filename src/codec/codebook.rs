//! Lloyd–Max codebooks for the coordinates of a rotated unit vector, computed rather than typed in.
//!
//! After the random rotation, each coordinate y_j of a unit vector in R^d follows the law of one
//! coordinate of a uniform point on the sphere: density ∝ (1 − t²)^((d−3)/2) on [−1, 1], which tends to
//! N(0, 1/d) as d grows. The optimal scalar quantizer of that law (Lloyd–Max: every centroid is the
//! conditional mean of its cell, every boundary the midpoint of its neighbours) is computed here by Lloyd
//! iteration to a fixed point, with each cell's moments integrated by composite 16-point Gauss–Legendre
//! quadrature. Work is done in the scaled variable z = √d·t (unit variance), in f64; the codebook is then
//! rounded to f32 in t units for the codecs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The law a codebook is optimal for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoordinateLaw {
    /// One coordinate of a uniform random unit vector in R^d: density ∝ (1 − t²)^((d−3)/2) on [−1, 1].
    UnitSphere,
    /// N(0, 1/d), the large-d limit of [`CoordinateLaw::UnitSphere`] (for comparison).
    Gaussian,
}

/// A Lloyd–Max codebook of 2^bits centroids for one law and dimension.
#[derive(Debug, Clone)]
pub struct Codebook {
    law: CoordinateLaw,
    d: usize,
    bits: u8,
    /// Centroids in z = √d·t units, ascending, f64.
    scaled: Vec<f64>,
    /// Centroids in t units, ascending, f32: what the codecs use and the GPU receives.
    centroids: Vec<f32>,
    /// `(c[i] + c[i+1]) * 0.5` in f32, from the f32 centroids.
    boundaries: Vec<f32>,
    expected_mse: f64,
    iterations: usize,
}

impl Codebook {
    /// The law this codebook is optimal for.
    pub fn law(&self) -> CoordinateLaw {
        self.law
    }

    /// The dimension d the law belongs to.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Index width in bits (2^bits centroids).
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Centroids in coordinate units (for a unit vector in R^d), ascending: index 0 is the most negative.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Centroids times √d (unit-variance units), ascending, f64; comparable across d and with the
    /// Gaussian Lloyd–Max tables.
    pub fn scaled_centroids(&self) -> &[f64] {
        &self.scaled
    }

    /// The 2^bits − 1 decision boundaries `(c[i] + c[i+1]) * 0.5`, computed in f32 from [`Self::centroids`].
    pub fn boundaries(&self) -> &[f32] {
        &self.boundaries
    }

    /// d·E[(y − Q(y))²] = E‖u − ũ‖² for a uniform unit vector u, by integration at the optimum.
    pub fn expected_mse(&self) -> f64 {
        self.expected_mse
    }

    /// Lloyd iterations it took to converge.
    pub fn iterations(&self) -> usize {
        self.iterations
    }

    /// Quantization index of `y`: the number of boundaries strictly below `y` (ties go to the lower
    /// index; this is the nearest centroid up to f32 rounding).
    pub fn quantize(&self, y: f32) -> u32 {
        self.boundaries.iter().filter(|&&b| b < y).count() as u32
    }
}

/// Largest index width a codebook can be computed for.
pub const MAX_CODEBOOK_BITS: u8 = 8;

/// The Lloyd–Max codebook of a coordinate of a uniform unit vector in R^d, 2^bits centroids. Cached per
/// (d, bits); the first call for a pair computes it (milliseconds).
///
/// `bits = 0` gives the single centroid 0 (used by `turbo1p`, whose MSE part is empty).
///
/// # Panics
/// When `d < 3` (the law is singular below 3) or `bits > 8`.
pub fn codebook(d: usize, bits: u8) -> Arc<Codebook> {
    cached(CoordinateLaw::UnitSphere, d, bits)
}

/// The Lloyd–Max codebook of N(0, 1/d), 2^bits centroids, cached per (d, bits).
///
/// # Panics
/// When `d == 0` or `bits > 8`.
pub fn gaussian_codebook(d: usize, bits: u8) -> Arc<Codebook> {
    cached(CoordinateLaw::Gaussian, d, bits)
}

/// The exact finite-d optimum d·E[(y − Q(y))²] = E‖u − ũ‖² of b-bit TurboQuant_mse on unit vectors in
/// R^d (the Lloyd–Max distortion of the unit-sphere coordinate law, by integration).
///
/// # Panics
/// As [`codebook`].
pub fn expected_mse(d: usize, bits: u8) -> f64 {
    codebook(d, bits).expected_mse()
}

/// The Gaussian Lloyd–Max distortion E[(z − Q(z))²] for z ~ N(0, 1) (0.3634, 0.1175, 0.0345, 0.0095 at
/// b = 1..4), the d → ∞ limit of [`expected_mse`].
pub fn gaussian_expected_mse(bits: u8) -> f64 {
    gaussian_codebook(1, bits).expected_mse()
}

fn cached(law: CoordinateLaw, d: usize, bits: u8) -> Arc<Codebook> {
    assert!(
        bits <= MAX_CODEBOOK_BITS,
        "codebook: {bits} bits (at most {MAX_CODEBOOK_BITS})"
    );
    match law {
        CoordinateLaw::UnitSphere => assert!(d >= 3, "codebook: dimension {d} (need d ≥ 3)"),
        CoordinateLaw::Gaussian => assert!(d >= 1, "gaussian_codebook: dimension 0"),
    }
    type Cache = Mutex<HashMap<(CoordinateLaw, usize, u8), Arc<Codebook>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // The Gaussian law in z units does not depend on d: compute it once and rescale.
    let key = (
        law,
        if law == CoordinateLaw::Gaussian { 0 } else { d },
        bits,
    );
    let base = {
        let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key)
            .or_insert_with(|| Arc::new(lloyd_max(law, d, bits)))
            .clone()
    };
    if base.d == d {
        return base;
    }
    let mut cb = (*base).clone();
    cb.d = d;
    finish_f32(&mut cb);
    Arc::new(cb)
}

/// Unnormalized density in z = √d·t units.
fn density(law: CoordinateLaw, d: usize, z: f64) -> f64 {
    match law {
        CoordinateLaw::Gaussian => (-0.5 * z * z).exp(),
        CoordinateLaw::UnitSphere => {
            let df = d as f64;
            let q = z * z / df;
            if q >= 1.0 {
                0.0
            } else if d == 3 {
                1.0
            } else {
                (0.5 * (df - 3.0) * (-q).ln_1p()).exp()
            }
        }
    }
}

/// Half-width of the support used for integration, in z units. Beyond 16 standard deviations the mass
/// (< e^−128) cannot move a centroid at the 1e-10 level.
fn support(law: CoordinateLaw, d: usize) -> f64 {
    match law {
        CoordinateLaw::Gaussian => 16.0,
        CoordinateLaw::UnitSphere => (d as f64).sqrt().min(16.0),
    }
}

/// 16-point Gauss–Legendre nodes and weights on [−1, 1], by Newton iteration on P_16.
fn gauss_legendre_16() -> &'static [(f64, f64)] {
    static NODES: OnceLock<Vec<(f64, f64)>> = OnceLock::new();
    NODES.get_or_init(|| {
        let n = 16usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
            let mut dp = 0.0;
            for _ in 0..100 {
                let (mut p0, mut p1) = (1.0, x);
                for k in 2..=n {
                    let kf = k as f64;
                    let p2 = ((2.0 * kf - 1.0) * x * p1 - (kf - 1.0) * p0) / kf;
                    p0 = p1;
                    p1 = p2;
                }
                dp = n as f64 * (x * p1 - p0) / (x * x - 1.0);
                let dx = p1 / dp;
                x -= dx;
                if dx.abs() < 1e-16 {
                    break;
                }
            }
            out.push((x, 2.0 / ((1.0 - x * x) * dp * dp)));
        }
        out
    })
}

/// ∫ z^k f(z) dz over [a, b] for k = 0, 1, 2, by composite Gauss–Legendre on panels of width ≤ 1/4.
fn moments(law: CoordinateLaw, d: usize, a: f64, b: f64) -> [f64; 3] {
    let mut m = [0.0; 3];
    if b <= a {
        return m;
    }
    let panels = ((b - a) / 0.25).ceil().max(1.0) as usize;
    let h = (b - a) / panels as f64;
    for p in 0..panels {
        let (lo, hi) = (a + p as f64 * h, a + (p + 1) as f64 * h);
        let (mid, half) = (0.5 * (lo + hi), 0.5 * (hi - lo));
        for &(x, w) in gauss_legendre_16() {
            let z = mid + half * x;
            let f = w * half * density(law, d, z);
            m[0] += f;
            m[1] += f * z;
            m[2] += f * z * z;
        }
    }
    m
}

const LLOYD_TOL: f64 = 1e-10;
const LLOYD_MAX_ITERS: usize = 200_000;

fn lloyd_max(law: CoordinateLaw, d: usize, bits: u8) -> Codebook {
    let k = 1usize << bits;
    let l = support(law, d);
    // Start evenly spaced over ±2 standard deviations; Lloyd moves them to the optimum.
    let mut c: Vec<f64> = (0..k)
        .map(|i| (i as f64 + 0.5 - k as f64 / 2.0) * (4.0 / k as f64))
        .collect();
    let mut iterations = 0;
    for it in 1..=LLOYD_MAX_ITERS {
        iterations = it;
        let mut next = vec![0.0; k];
        for (i, n) in next.iter_mut().enumerate() {
            let a = if i == 0 { -l } else { 0.5 * (c[i - 1] + c[i]) };
            let b = if i + 1 == k {
                l
            } else {
                0.5 * (c[i] + c[i + 1])
            };
            let m = moments(law, d, a, b);
            *n = if m[0] > 0.0 { m[1] / m[0] } else { c[i] };
        }
        // The law is symmetric: keep the codebook exactly antisymmetric.
        for i in 0..k / 2 {
            let v = 0.5 * (next[k - 1 - i] - next[i]);
            next[i] = -v;
            next[k - 1 - i] = v;
        }
        if k == 1 {
            next[0] = 0.0;
        }
        let delta = c
            .iter()
            .zip(&next)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        c = next;
        if delta < LLOYD_TOL {
            break;
        }
    }
    let total = moments(law, d, -l, l)[0];
    let mut err = 0.0;
    for i in 0..k {
        let a = if i == 0 { -l } else { 0.5 * (c[i - 1] + c[i]) };
        let b = if i + 1 == k {
            l
        } else {
            0.5 * (c[i] + c[i + 1])
        };
        let m = moments(law, d, a, b);
        err += m[2] - 2.0 * c[i] * m[1] + c[i] * c[i] * m[0];
    }
    let mut cb = Codebook {
        law,
        d,
        bits,
        scaled: c,
        centroids: Vec::new(),
        boundaries: Vec::new(),
        expected_mse: err / total,
        iterations,
    };
    finish_f32(&mut cb);
    cb
}

fn finish_f32(cb: &mut Codebook) {
    let inv = 1.0 / (cb.d as f64).sqrt();
    cb.centroids = cb.scaled.iter().map(|&z| (z * inv) as f32).collect();
    cb.boundaries = cb
        .centroids
        .windows(2)
        .map(|w| (w[0] + w[1]) * 0.5)
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian Lloyd–Max centroids (positive half) from DESIGN.md.
    const GAUSS: [&[f64]; 4] = [
        &[0.7979],
        &[0.4528, 1.5104],
        &[0.2451, 0.7560, 1.3439, 2.1519],
        &[
            0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326,
        ],
    ];

    fn positive_half(cb: &Codebook) -> Vec<f64> {
        let s = cb.scaled_centroids();
        s[s.len() / 2..].to_vec()
    }

    #[test]
    fn gaussian_codebook_matches_the_table() {
        for b in 1..=4u8 {
            let cb = gaussian_codebook(64, b);
            for (got, want) in positive_half(&cb).iter().zip(GAUSS[b as usize - 1]) {
                assert!((got - want).abs() < 1.5e-4, "b={b}: {got} vs {want}");
            }
            // In coordinate units the centroids are divided by √d.
            assert!((cb.centroids()[0] as f64 * 8.0 - cb.scaled_centroids()[0]).abs() < 1e-6);
        }
        let want = [0.3634, 0.1175, 0.03454, 0.009497];
        for b in 1..=4u8 {
            let got = gaussian_expected_mse(b);
            assert!((got - want[b as usize - 1]).abs() < 2e-4, "b={b}: {got}");
        }
    }

    #[test]
    fn sphere_codebook_tends_to_the_gaussian_at_large_d() {
        // The finite-d law is narrower by O(1/d) (E z⁴ = 3d/(d+2)): at d = 4096 the outer 4-bit centroid
        // sits 5e-4 (relative) inside the Gaussian one; at d = 65536 the gap is 16 times smaller.
        for b in 1..=4u8 {
            let cb = codebook(4096, b);
            for (got, want) in positive_half(&cb).iter().zip(GAUSS[b as usize - 1]) {
                assert!(
                    (got - want).abs() < 1e-3 * want.max(1.0),
                    "b={b}: {got} vs {want}"
                );
            }
            let far = codebook(65536, b);
            let gauss = gaussian_codebook(65536, b);
            for (got, want) in positive_half(&far).iter().zip(positive_half(&gauss)) {
                assert!((got - want).abs() < 1.5e-4, "b={b}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn finite_d_distortion_near_the_paper_values() {
        let paper = [0.3634, 0.1175, 0.0345, 0.0095];
        for b in 1..=4u8 {
            let got = expected_mse(128, b);
            let want = paper[b as usize - 1];
            assert!((got / want - 1.0).abs() < 0.03, "b={b}: {got} vs {want}");
            // Finite d is a slightly narrower law: a little lower distortion than the Gaussian.
            assert!(got < gaussian_expected_mse(b));
        }
        // More bits, less distortion; never below the Shannon lower bound 4^−b.
        for b in 1..=4u8 {
            for d in [32usize, 64, 256] {
                let e = expected_mse(d, b);
                assert!(e > 4f64.powi(-(b as i32)));
                if b > 1 {
                    assert!(e < expected_mse(d, b - 1));
                }
            }
        }
    }

    #[test]
    fn codebooks_are_fixed_points() {
        for (d, b) in [(32usize, 1u8), (32, 4), (128, 3), (256, 2)] {
            let cb = codebook(d, b);
            let c = cb.scaled_centroids();
            let k = c.len();
            assert_eq!(k, 1 << b);
            let l = support(CoordinateLaw::UnitSphere, d);
            for i in 0..k {
                assert!(i == 0 || c[i] > c[i - 1]);
                assert_eq!(c[i], -c[k - 1 - i]);
                let a = if i == 0 { -l } else { 0.5 * (c[i - 1] + c[i]) };
                let e = if i + 1 == k {
                    l
                } else {
                    0.5 * (c[i] + c[i + 1])
                };
                let m = moments(CoordinateLaw::UnitSphere, d, a, e);
                assert!((m[1] / m[0] - c[i]).abs() < 1e-9, "d={d} b={b} i={i}");
            }
            assert!(cb.iterations() < LLOYD_MAX_ITERS);
        }
        let zero = codebook(64, 0);
        assert_eq!(zero.centroids(), &[0.0]);
        assert!((zero.expected_mse() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn quadrature_integrates_the_law() {
        // E z² = 1 exactly for both laws (d·E t² = 1 on the sphere).
        for (law, d) in [
            (CoordinateLaw::UnitSphere, 3usize),
            (CoordinateLaw::UnitSphere, 32),
            (CoordinateLaw::UnitSphere, 256),
            (CoordinateLaw::Gaussian, 1),
        ] {
            let l = support(law, d);
            let m = moments(law, d, -l, l);
            assert!(
                (m[2] / m[0] - 1.0).abs() < 1e-12,
                "{law:?} d={d}: {}",
                m[2] / m[0]
            );
        }
    }

    #[test]
    fn quantize_picks_the_nearest_centroid() {
        let cb = codebook(128, 3);
        let c = cb.centroids();
        for i in 0..2000 {
            let y = (i as f32 - 1000.0) / 2000.0 * 0.6;
            let idx = cb.quantize(y) as usize;
            let best = (0..c.len())
                .min_by(|&a, &b| (y - c[a]).abs().total_cmp(&(y - c[b]).abs()))
                .unwrap();
            assert!(idx == best || ((y - c[idx]).abs() - (y - c[best]).abs()).abs() < 1e-7);
        }
        // Exactly on a boundary: the lower index.
        let b0 = cb.boundaries()[3];
        assert_eq!(cb.quantize(b0), 3);
    }
}
