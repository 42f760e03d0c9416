//! The random rotation of TurboQuant: y = H·D·x with D = diag(±1) and H the normalized Walsh–Hadamard
//! matrix, `H[i][j] = (−1)^popcount(i & j) / √d`. H is symmetric and its own inverse, so the inverse
//! rotation is x = D·H·y. The butterfly order is part of the contract (docs/formats.md) so that the GPU
//! kernels round the same way.

/// In-place normalized fast Walsh–Hadamard transform: butterflies `(a, b) → (a + b, a − b)` for strides
/// h = 1, 2, 4, …, d/2, then every element times `f32(1/√d)`.
///
/// # Panics
/// When `x.len()` is not a power of two (callers validate dimensions first).
pub fn fwht_normalized(x: &mut [f32]) {
    let d = x.len();
    assert!(
        d.is_power_of_two(),
        "fwht_normalized: length {d} is not a power of two"
    );
    let mut h = 1;
    while h < d {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let norm = (1.0 / (d as f64).sqrt()) as f32;
    for v in x.iter_mut() {
        *v *= norm;
    }
}

/// `H·D·x`: multiply by the signs, then the normalized Walsh–Hadamard transform.
///
/// # Panics
/// When `signs.len() != x.len()` or the length is not a power of two.
pub fn rotate(signs: &[f32], x: &[f32]) -> Vec<f32> {
    assert_eq!(
        signs.len(),
        x.len(),
        "rotate: {} signs for {} values",
        signs.len(),
        x.len()
    );
    let mut y: Vec<f32> = x.iter().zip(signs).map(|(&v, &s)| v * s).collect();
    fwht_normalized(&mut y);
    y
}

/// `D·H·y`, the inverse of [`rotate`]: the normalized Walsh–Hadamard transform, then the signs.
///
/// # Panics
/// When `signs.len() != y.len()` or the length is not a power of two.
pub fn unrotate(signs: &[f32], y: &[f32]) -> Vec<f32> {
    assert_eq!(
        signs.len(),
        y.len(),
        "unrotate: {} signs for {} values",
        signs.len(),
        y.len()
    );
    let mut x = y.to_vec();
    fwht_normalized(&mut x);
    for (v, &s) in x.iter_mut().zip(signs) {
        *v *= s;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::rng::{rotation_signs, SplitMix64};

    fn gaussian(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_gaussian_pair().0 as f32).collect()
    }

    #[test]
    fn matches_the_explicit_matrix() {
        let mut rng = SplitMix64::new(1);
        for d in [1usize, 2, 4, 32, 64] {
            let x = gaussian(&mut rng, d);
            let mut y = x.clone();
            fwht_normalized(&mut y);
            for (i, &yi) in y.iter().enumerate() {
                let want: f64 = (0..d)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * x[j] as f64
                    })
                    .sum::<f64>()
                    / (d as f64).sqrt();
                assert!(
                    (yi as f64 - want).abs() < 1e-5,
                    "d={d} i={i}: {yi} vs {want}"
                );
            }
        }
    }

    #[test]
    fn is_an_involution_and_preserves_norm() {
        let mut rng = SplitMix64::new(2);
        for d in [32usize, 128, 256] {
            let x = gaussian(&mut rng, d);
            let signs = rotation_signs(9, d);
            let y = rotate(&signs, &x);
            let nx: f32 = x.iter().map(|v| v * v).sum();
            let ny: f32 = y.iter().map(|v| v * v).sum();
            assert!((nx - ny).abs() < 1e-4 * nx);
            let back = unrotate(&signs, &y);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}
