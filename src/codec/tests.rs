//! Tests of the codec reference against theory and against the layout contract (docs/formats.md).

use half::f16;

use super::pack::{get_half, unpack_index};
use super::*;

fn gaussian(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    rng.gaussians_f32(n)
}

/// n vectors of dimension d, each Gaussian times a random norm-ish factor in [0.1, 10).
fn random_vectors(seed: u64, n: usize, d: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut xs = gaussian(&mut rng, n * d);
    for x in xs.chunks_exact_mut(d) {
        let f = 10f32.powf(rng.next_f64() as f32 * 2.0 - 1.0);
        x.iter_mut().for_each(|v| *v *= f);
    }
    xs
}

/// n uniform unit vectors of dimension d.
fn unit_vectors(seed: u64, n: usize, d: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut xs = gaussian(&mut rng, n * d);
    for x in xs.chunks_exact_mut(d) {
        let nrm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        x.iter_mut().for_each(|v| *v /= nrm);
    }
    xs
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn sq_err(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum()
}

/// Mean of ‖x − x̃‖²/‖x‖² over the vectors.
fn relative_mse(codec: &Codec, xs: &[f32]) -> f64 {
    let d = codec.dim();
    let enc = codec.encode(xs).unwrap();
    let back = codec.decode(&enc);
    let n = xs.len() / d;
    xs.chunks_exact(d)
        .zip(back.chunks_exact(d))
        .map(|(x, y)| sq_err(x, y) / dot(x, x))
        .sum::<f64>()
        / n as f64
}

fn f(s: &str) -> VecFormat {
    s.parse().unwrap()
}

fn codec(s: &str, d: usize, seed: u64) -> Codec {
    Codec::with_seed(f(s), d, seed).unwrap()
}

/// Every format name at least once, with a dimension it takes.
fn all_format_names() -> Vec<&'static str> {
    vec![
        "f32", "f16", "q8_0", "q4_0", "turbo1", "turbo2", "turbo3", "turbo4", "turbo3n", "turbo2u",
        "turbo1p", "turbo2p", "turbo3p", "turbo4p", "turbo1.5", "turbo2.5", "turbo3.5", "turbo4+2",
    ]
}

const PAPER_D_MSE: [f64; 4] = [0.3634, 0.1175, 0.0345, 0.0095];
const PAPER_D_PROD: [f64; 4] = [1.571, 0.571, 0.185, 0.054];

#[test]
fn plain_formats_round_trip_within_their_precision() {
    let d = 96;
    let xs = random_vectors(1, 300, d);
    let c = codec("f32", d, 0);
    assert_eq!(c.decode(&c.encode(&xs).unwrap()), xs);

    let c = codec("f16", d, 0);
    let back = c.decode(&c.encode(&xs).unwrap());
    for (x, y) in xs.iter().zip(&back) {
        assert_eq!(*y, f16::from_f32(*x).to_f32());
        assert!((x - y).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25));
    }

    // q8_0: |x − q·f16(dq)| ≤ dq/2 + 127·|dq − f16(dq)| (the second term is the f16 rounding of dq).
    let c = codec("q8_0", d, 0);
    let enc = c.encode(&xs).unwrap();
    let back = c.decode(&enc);
    for (i, (x, y)) in xs.chunks_exact(d).zip(back.chunks_exact(d)).enumerate() {
        for b in 0..d / 32 {
            let block = &x[b * 32..(b + 1) * 32];
            let dq = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let dq16 = c.scale_of(&enc, i, b);
            assert_eq!(dq16, f16::from_f32(dq).to_f32());
            let bound = dq / 2.0 * (1.0 + 1e-5) + 127.0 * (dq - dq16).abs();
            for j in b * 32..(b + 1) * 32 {
                assert!((x[j] - y[j]).abs() <= bound, "q8_0 vector {i} value {j}");
            }
        }
    }

    // q4_0: rounding to a step |dq| = amax/8, except the clamped extreme (error ≤ |dq|).
    let c = codec("q4_0", d, 0);
    let enc = c.encode(&xs).unwrap();
    let back = c.decode(&enc);
    let mut sum_sq = 0.0;
    let mut sum_step_sq = 0.0;
    for (i, (x, y)) in xs.chunks_exact(d).zip(back.chunks_exact(d)).enumerate() {
        for b in 0..d / 32 {
            let block = &x[b * 32..(b + 1) * 32];
            let dq = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0;
            let dq16 = c.scale_of(&enc, i, b).abs();
            for j in b * 32..(b + 1) * 32 {
                let e = (x[j] - y[j]).abs();
                assert!(
                    e <= dq * (1.0 + 1e-5) + 8.0 * (dq - dq16).abs(),
                    "q4_0 vector {i} value {j}"
                );
                sum_sq += (e as f64).powi(2);
                sum_step_sq += (dq as f64).powi(2);
            }
        }
    }
    // Uniform rounding error: mean square ≈ step²/12.
    let ratio = sum_sq / sum_step_sq;
    assert!(
        (ratio - 1.0 / 12.0).abs() < 0.015,
        "q4_0 error²/step² = {ratio}"
    );
}

#[test]
fn turbo_mse_matches_the_exact_optimum() {
    let d = 128;
    let xs = random_vectors(2, 2000, d);
    for b in 1..=4u8 {
        let want = expected_mse(d, b);
        let got = relative_mse(&Codec::with_seed(VecFormat::turbo(b), d, 5).unwrap(), &xs);
        assert!(
            (got / want - 1.0).abs() < 0.15,
            "turbo{b}: {got} vs exact {want}"
        );
        // Against the paper's (Gaussian-limit) D_mse: within 5%.
        let paper = PAPER_D_MSE[b as usize - 1];
        assert!(
            (got / paper - 1.0).abs() < 0.05,
            "turbo{b}: {got} vs paper {paper}"
        );
    }
}

#[test]
fn scale_modes_follow_theory() {
    let d = 128;
    let xs = random_vectors(3, 2000, d);
    for b in 1..=4u8 {
        let e = expected_mse(d, b);
        // Norm-restoring: x̃ = ‖x‖·ĉ/‖ĉ‖, cos(x, x̃) ≈ √(1 − D): MSE ≈ 2 − 2√(1 − D).
        let norm = Codec::with_seed(
            VecFormat::Turbo {
                bits: b,
                scale: ScaleMode::Norm,
            },
            d,
            5,
        )
        .unwrap();
        let got = relative_mse(&norm, &xs);
        let want = 2.0 - 2.0 * (1.0 - e).sqrt();
        assert!(
            (got / want - 1.0).abs() < 0.15,
            "turbo{b}n: {got} vs {want}"
        );
        let back = norm.decode(&norm.encode(&xs).unwrap());
        for (x, y) in xs.chunks_exact(d).zip(back.chunks_exact(d)) {
            let (nx, ny) = (dot(x, x).sqrt(), dot(y, y).sqrt());
            assert!((nx / ny - 1.0).abs() < 2e-3, "turbo{b}n norms {nx} {ny}");
        }
        // Unbiased: ⟨x̃, x⟩ = ‖x‖², so ‖x̃‖² ≈ ‖x‖²/(1 − D): MSE ≈ D/(1 − D).
        let unb = Codec::with_seed(
            VecFormat::Turbo {
                bits: b,
                scale: ScaleMode::Unbiased,
            },
            d,
            5,
        )
        .unwrap();
        let got = relative_mse(&unb, &xs);
        let want = e / (1.0 - e);
        assert!(
            (got / want - 1.0).abs() < 0.15,
            "turbo{b}u: {got} vs {want}"
        );
        let back = unb.decode(&unb.encode(&xs).unwrap());
        for (x, y) in xs.chunks_exact(d).zip(back.chunks_exact(d)) {
            let r = dot(x, y) / dot(x, x);
            assert!((r - 1.0).abs() < 2e-3, "turbo{b}u ⟨x̃,x⟩/‖x‖² = {r}");
        }
    }
}

#[test]
fn prod_distortion_matches_the_paper() {
    // For a uniformly random unit query q independent of x, E⟨q, x − x̃⟩² = ‖x − x̃‖²/d, so
    // d·D_prod is the mean of ‖x − x̃‖² over unit x (measured here with little noise), and also the
    // mean of d·⟨q, x − x̃⟩² over random q (measured below with more noise).
    let d = 128;
    let n = 3000;
    let xs = unit_vectors(4, n, d);
    let qs = unit_vectors(40, n, d);
    for b in 1..=4u8 {
        let c = Codec::with_seed(VecFormat::TurboProd { bits: b }, d, 9).unwrap();
        let paper = PAPER_D_PROD[b as usize - 1];
        let got = relative_mse(&c, &xs);
        assert!(
            (got / paper - 1.0).abs() < 0.05,
            "turbo{b}p: d·D_prod {got} vs paper {paper}"
        );
        // Through inner products with random queries.
        let enc = c.encode(&xs).unwrap();
        let back = c.decode(&enc);
        let mut sum = 0.0;
        for i in 0..n {
            let (x, y, q) = (
                &xs[i * d..(i + 1) * d],
                &back[i * d..(i + 1) * d],
                &qs[i * d..(i + 1) * d],
            );
            sum += d as f64 * (dot(q, y) - dot(q, x)).powi(2);
        }
        let via_q = sum / n as f64;
        assert!(
            (via_q / paper - 1.0).abs() < 0.12,
            "turbo{b}p: via queries {via_q} vs {paper}"
        );
    }
}

#[test]
fn prod_is_unbiased_and_mse_shrinks() {
    // q = x: ⟨x, x̃⟩/‖x‖² − 1 has mean 0 for prod, −D_mse for the paper-scaled MSE code.
    let d = 64;
    let n = 4000;
    let xs = random_vectors(6, n, d);
    let stats = |c: &Codec| {
        let back = c.decode(&c.encode(&xs).unwrap());
        let r: Vec<f64> = xs
            .chunks_exact(d)
            .zip(back.chunks_exact(d))
            .map(|(x, y)| dot(x, y) / dot(x, x) - 1.0)
            .collect();
        let mean = r.iter().sum::<f64>() / n as f64;
        let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, (var / n as f64).sqrt())
    };
    for b in 1..=4u8 {
        let (mean, se) = stats(&Codec::with_seed(VecFormat::TurboProd { bits: b }, d, 3).unwrap());
        assert!(mean.abs() < 4.0 * se + 1e-3, "turbo{b}p bias {mean} ± {se}");
        let (mean, se) = stats(&Codec::with_seed(VecFormat::turbo(b), d, 3).unwrap());
        let want = -expected_mse(d, b);
        assert!(
            (mean - want).abs() < 4.0 * se + 0.02 * want.abs(),
            "turbo{b} shrink {mean} vs {want}"
        );
    }
    // With independent queries: mean of ⟨q, x̃⟩ − ⟨q, x⟩ ≈ 0.
    let qs = random_vectors(66, n, d);
    let c = Codec::with_seed(VecFormat::TurboProd { bits: 2 }, d, 3).unwrap();
    let back = c.decode(&c.encode(&xs).unwrap());
    let diffs: Vec<f64> = (0..n)
        .map(|i| {
            let q = &qs[i * d..(i + 1) * d];
            dot(q, &back[i * d..(i + 1) * d]) - dot(q, &xs[i * d..(i + 1) * d])
        })
        .collect();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let se = (diffs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n as f64 * (n - 1) as f64))
        .sqrt();
    assert!(
        mean.abs() < 4.0 * se,
        "prod bias with random q: {mean} ± {se}"
    );
}

#[test]
fn split_formats_follow_their_parts() {
    let d = 128;
    let xs = random_vectors(7, 2000, d);
    for (name, hi, lo) in [
        ("turbo2.5", 3u8, 2u8),
        ("turbo3.5", 4, 3),
        ("turbo1.5", 2, 1),
    ] {
        let c = codec(name, d, 11);
        let want = 0.5 * (expected_mse(d / 2, hi) + expected_mse(d / 2, lo));
        let got = relative_mse(&c, &xs);
        assert!((got / want - 1.0).abs() < 0.15, "{name}: {got} vs {want}");
    }
    // Outliers: channels with large magnitude get the hi bits and dominate the error budget.
    let mut rng = SplitMix64::new(8);
    let mut ys = gaussian(&mut rng, 500 * d);
    let outliers: Vec<u32> = (0..d as u32).filter(|c| c % 4 == 1 || c % 4 == 2).collect();
    for y in ys.chunks_exact_mut(d) {
        for &c in &outliers {
            y[c as usize] *= 8.0;
        }
    }
    let perm = split_perm(d, &outliers).unwrap();
    let with = Codec::new(CodecParams::new(f("turbo2.5"), d, 1).with_perm(perm.clone())).unwrap();
    let without = codec("turbo2.5", d, 1);
    let (a, b) = (relative_mse(&with, &ys), relative_mse(&without, &ys));
    assert!(a < 0.8 * b, "outlier perm {a} vs identity {b}");
    // A permuted split is the same as encoding the gathered vector with the identity split.
    let gathered: Vec<f32> = ys
        .chunks_exact(d)
        .flat_map(|y| perm.iter().map(move |&c| y[c as usize]))
        .collect();
    assert_eq!(
        with.encode(&ys).unwrap().words,
        without.encode(&gathered).unwrap().words
    );
}

#[test]
fn bad_permutations_are_refused() {
    let d = 64;
    let bad = |perm: Vec<u32>| {
        Codec::new(CodecParams::new(f("turbo2.5"), d, 0).with_perm(perm)).unwrap_err()
    };
    assert!(matches!(
        bad((0..63).collect()),
        CodecError::BadPermutation { .. }
    ));
    let mut p: Vec<u32> = (0..64).collect();
    p[5] = 6;
    assert!(bad(p).to_string().contains("twice"));
    let p: Vec<u32> = (0..64).rev().collect();
    assert!(bad(p).to_string().contains("increasing"));
    let e =
        Codec::new(CodecParams::new(f("turbo3"), d, 0).with_perm((0..64).collect())).unwrap_err();
    assert!(e.to_string().contains("only the split formats"), "{e}");
    assert!(split_perm(d, &[1, 2, 3]).is_err());
    assert!(split_perm(d, &(0..32).map(|c| c * 3).collect::<Vec<_>>()).is_err());
    let p = split_perm(8, &[7, 1, 2, 5]).unwrap();
    assert_eq!(p, vec![1, 2, 5, 7, 0, 3, 4, 6]);
}

#[test]
fn zero_vectors_decode_to_zero() {
    for name in all_format_names() {
        let d = if name.contains('.') || name.contains('+') {
            64
        } else {
            32
        };
        let c = codec(name, d, 3);
        let mut xs = random_vectors(9, 3, d);
        xs[d..2 * d].fill(0.0);
        let enc = c.encode(&xs).unwrap();
        let back = c.decode(&enc);
        assert!(back[d..2 * d].iter().all(|&v| v == 0.0), "{name}");
        assert!(back[..d].iter().any(|&v| v != 0.0), "{name}");
        if VecFormat::is_turbo(&c.format()) {
            assert!(c.code_words_of(&enc, 1).iter().all(|&w| w == 0), "{name}");
            assert!(
                (0..c.scale_halves()).all(|k| c.scale_of(&enc, 1, k) == 0.0),
                "{name}"
            );
        }
    }
    // A split vector with one part all zero keeps the other part.
    let c = codec("turbo2.5", 64, 0);
    let mut x = random_vectors(10, 1, 64);
    x[32..].fill(0.0);
    let enc = c.encode(&x).unwrap();
    assert_eq!(c.scale_of(&enc, 0, 1), 0.0);
    assert!(c.scale_of(&enc, 0, 0) > 0.0);
    assert!(c.decode(&enc)[32..].iter().all(|&v| v == 0.0));
}

#[test]
fn runs_of_any_length_pack_the_same() {
    // Encoding n vectors at once equals encoding each alone: codes at i·code_words, scale halves at
    // i·scale_halves of the scales region (odd n leaves the last high half 0).
    for name in all_format_names() {
        let d = 64;
        let c = codec(name, d, 4);
        for n in [0usize, 1, 2, 5] {
            let xs = random_vectors(n as u64 + 20, n, d);
            let enc = c.encode(&xs).unwrap();
            assert_eq!(enc.words.len(), c.encoded_words(n), "{name} n={n}");
            assert_eq!((enc.n, enc.d), (n, d));
            let (cw, sh) = (c.code_words(), c.scale_halves());
            for i in 0..n {
                let one = c.encode(&xs[i * d..(i + 1) * d]).unwrap();
                assert_eq!(
                    c.code_words_of(&enc, i),
                    c.code_words_of(&one, 0),
                    "{name} n={n} i={i}"
                );
                for k in 0..sh {
                    assert_eq!(c.scale_of(&enc, i, k), c.scale_of(&one, 0, k));
                    assert_eq!(
                        get_half(&enc.words[n * cw..], i * sh + k),
                        get_half(&one.words[cw..], k)
                    );
                }
            }
            if (n * sh) % 2 == 1 {
                assert_eq!(
                    enc.words.last().unwrap() >> 16,
                    0,
                    "{name} n={n}: unused high half"
                );
            }
            assert_eq!(c.decode(&enc).len(), n * d);
        }
        // Stored bits per value, counted from the words of an even run.
        let enc = c.encode(&random_vectors(1, 8, d)).unwrap();
        assert_eq!(
            enc.words.len() as f64 * 32.0 / (8 * d) as f64,
            c.bits_per_value(),
            "{name}"
        );
    }
}

#[test]
fn huge_norms_and_non_finite_values_are_counted() {
    let d = 128;
    // Turbo: norm 1e4 is fine, 1e5 overflows the f16 scale.
    let c = codec("turbo3", d, 1);
    let mut xs = unit_vectors(11, 3, d);
    xs[..d].iter_mut().for_each(|v| *v *= 1e4);
    xs[d..2 * d].iter_mut().for_each(|v| *v *= 1e5);
    assert_eq!(
        c.encode(&xs).unwrap_err(),
        CodecError::NonFinite {
            count: 1,
            first_index: 1
        }
    );
    let (enc, count) = c.encode_lossy(&xs).unwrap();
    assert_eq!(count, 1);
    let back = c.decode(&enc);
    assert!(back[d..2 * d].iter().all(|&v| v == 0.0));
    assert!(c.code_words_of(&enc, 1).iter().all(|&w| w == 0));
    let rel = sq_err(&xs[..d], &back[..d]) / dot(&xs[..d], &xs[..d]);
    assert!(rel < 0.1, "norm 1e4: relative error {rel}");
    assert!((c.scale_of(&enc, 0, 0) / 1e4 - 1.0).abs() < 1e-3);
    let msg = c.encode(&xs).unwrap_err().to_string();
    assert!(
        msg.contains("1 vector") && msg.contains("vector 1") && msg.contains("encode_lossy"),
        "{msg}"
    );

    // f16: a value beyond 65504 cannot be stored; q8_0 stores it (dq = 1e5/127) until dq overflows.
    let mut x = unit_vectors(12, 2, d);
    x[5] = 1e5;
    assert_eq!(codec("f16", d, 0).encode_lossy(&x).unwrap().1, 1);
    assert_eq!(codec("q8_0", d, 0).encode_lossy(&x).unwrap().1, 0);
    assert_eq!(codec("q4_0", d, 0).encode_lossy(&x).unwrap().1, 0);
    assert_eq!(codec("f32", d, 0).encode_lossy(&x).unwrap().1, 0);
    x[5] = 1e7;
    assert_eq!(codec("q8_0", d, 0).encode_lossy(&x).unwrap().1, 1);
    assert_eq!(codec("q4_0", d, 0).encode_lossy(&x).unwrap().1, 1);
}

#[test]
fn nan_and_inf_are_stored_as_zero() {
    for name in all_format_names() {
        let d = 64;
        let c = codec(name, d, 2);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut xs = random_vectors(13, 4, d);
            xs[2 * d + 3] = bad;
            xs[3 * d + 63] = bad;
            assert_eq!(
                c.encode(&xs).unwrap_err(),
                CodecError::NonFinite {
                    count: 2,
                    first_index: 2
                },
                "{name}"
            );
            let (enc, count) = c.encode_lossy(&xs).unwrap();
            assert_eq!(count, 2);
            let back = c.decode(&enc);
            assert!(back[2 * d..].iter().all(|&v| v == 0.0), "{name}");
            assert!(back[..2 * d].iter().all(|v| v.is_finite()), "{name}");
            for i in [2, 3] {
                assert!(c.code_words_of(&enc, i).iter().all(|&w| w == 0), "{name}");
                assert!(
                    (0..c.scale_halves()).all(|k| c.scale_of(&enc, i, k) == 0.0),
                    "{name}"
                );
            }
            // The good vectors are untouched by the bad ones.
            assert_eq!(
                c.code_words_of(&enc, 1),
                c.code_words_of(&c.encode(&xs[d..2 * d]).unwrap(), 0)
            );
        }
    }
}

#[test]
fn shape_errors_are_typed() {
    let c = codec("turbo3", 64, 0);
    let e = c.encode(&[0.0; 65]).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::LengthMismatch {
                got: 65,
                expected: 128,
                ..
            }
        ),
        "{e}"
    );
    let enc = c.encode(&[0.0; 128]).unwrap();
    assert!(codec("turbo3", 128, 0).check_encoded(&enc).is_err());
    assert!(codec("turbo4", 64, 0).check_encoded(&enc).is_err());
    assert!(c.check_encoded(&enc).is_ok());
    assert!(matches!(
        Codec::with_seed(f("turbo3"), 48, 0),
        Err(CodecError::BadDim { dim: 48, .. })
    ));
}

#[test]
fn turbo_layout_follows_the_contract() {
    // Rebuild a turbo3 code from the recipe in docs/formats.md with the public pieces.
    let d = 64;
    let seed = 77;
    let c = codec("turbo3", d, seed);
    let x = random_vectors(14, 1, d);
    let enc = c.encode(&x).unwrap();
    let norm = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
    let u: Vec<f32> = x.iter().map(|v| v / norm).collect();
    let y = rotate(&rotation_signs(seed, d), &u);
    let cb = codebook(d, 3);
    for (j, &yj) in y.iter().enumerate() {
        let idx = unpack_index(c.code_words_of(&enc, 0), 3, j);
        assert_eq!(
            idx,
            cb.boundaries().iter().filter(|&&b| b < yj).count() as u32
        );
    }
    assert_eq!(
        enc.words[c.code_words()] & 0xFFFF,
        f16::from_f32(norm).to_bits() as u32
    );
    assert_eq!(enc.words[c.code_words()] >> 16, 0);

    // turbo2p: 1-bit MSE indices, then the sign of (S·r)_i at bit i of the sign words; scales ‖x‖, γ.
    let c = codec("turbo2p", d, seed);
    let enc = c.encode(&x).unwrap();
    let cb = codebook(d, 1);
    let codes = c.code_words_of(&enc, 0);
    let r: Vec<f32> = y
        .iter()
        .enumerate()
        .map(|(j, &yj)| {
            let idx = unpack_index(codes, 1, j);
            assert_eq!(idx, cb.quantize(yj));
            yj - cb.centroids()[idx as usize]
        })
        .collect();
    let s = qjl_matrix(seed, d);
    for i in 0..d {
        let p = dot(&s[i * d..(i + 1) * d], &r);
        let bit = (codes[d / 32 + i / 32] >> (i % 32)) & 1;
        assert_eq!(bit == 1, p >= 0.0, "sign {i}");
    }
    let gamma = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
    assert_eq!(c.scale_of(&enc, 0, 0), f16::from_f32(norm).to_f32());
    assert_eq!(c.scale_of(&enc, 0, 1), f16::from_f32(gamma).to_f32());

    // Split: part hi (channels perm[..d/2]) with seed + 1 at hi bits first, then part lo with seed + 2.
    let c = codec("turbo3.5", d, seed);
    let enc = c.encode(&x).unwrap();
    let hi = codec("turbo4", d / 2, seed + 1)
        .encode(&x[..d / 2])
        .unwrap();
    let lo = codec("turbo3", d / 2, seed + 2)
        .encode(&x[d / 2..])
        .unwrap();
    let codes = c.code_words_of(&enc, 0);
    assert_eq!(&codes[..4], &hi.words[..4]);
    assert_eq!(&codes[4..], &lo.words[..3]);
    assert_eq!(enc.words[7], (hi.words[4] & 0xFFFF) | (lo.words[3] << 16));
}

#[test]
fn rotated_domain_matches_decoding() {
    for name in all_format_names() {
        let d = 64;
        let c = codec(name, d, 21);
        let xs = random_vectors(15, 6, d);
        let q = random_vectors(16, 1, d);
        let enc = c.encode(&xs).unwrap();
        let back = c.decode(&enc);
        let rq = c.rotate_query(&q);
        assert_eq!(
            rq.projected.is_empty(),
            !matches!(c.format(), VecFormat::TurboProd { .. })
        );
        for i in 0..6 {
            let x = &back[i * d..(i + 1) * d];
            let want = dot(&q, x);
            let rot = c.decode_rotated(&enc, i);
            let scale = dot(&q, &q).sqrt() * dot(x, x).sqrt();
            let tol = 1e-5 * scale + 1e-6;
            assert!((dot(&rq.rotated, &rot) - want).abs() < tol, "{name} {i}");
            assert!(
                (c.score(&rq, &enc, i) as f64 - want).abs() < tol,
                "{name} {i}"
            );
            let un = c.unrotate_output(&rot);
            assert!(sq_err(&un, x) < 1e-10 * dot(x, x), "{name} {i}");
        }
        // The rotation is orthogonal.
        let r = c.to_rotated(&q);
        assert!((dot(&r, &r) / dot(&q, &q) - 1.0).abs() < 1e-5);
        let back_q = c.unrotate_output(&r);
        assert!(sq_err(&back_q, &q) < 1e-10 * dot(&q, &q));
    }
}

#[test]
fn aux_words_carry_the_instance() {
    let d = 64;
    let seed = 5;
    let fw = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let cb_slots = |d: usize, b: u8| {
        let mut s = fw(codebook(d, b).centroids());
        s.resize(AUX_CODEBOOK_SLOTS, 0);
        s
    };

    let a = codec("q8_0", d, seed).aux_words();
    assert_eq!(a, [&[2u32, 64, 8][..], &[0; 13]].concat());

    let a = codec("turbo3u", d, seed).aux_words();
    assert_eq!(&a[..11], &[4, 64, 3, 0, 2, 16, 80, 0, 0, 0, 0]);
    assert_eq!(a.len(), 16 + 64 + 16);
    assert_eq!(&a[16..80], &fw(&rotation_signs(seed, d))[..]);
    assert_eq!(&a[80..96], &cb_slots(d, 3)[..]);

    let a = codec("turbo3p", d, seed).aux_words();
    assert_eq!(&a[..11], &[5, 64, 2, 0, 0, 16, 80, 0, 0, 0, 96]);
    assert_eq!(&a[80..96], &cb_slots(d, 2)[..]);
    assert_eq!(&a[96..], &fw(&qjl_matrix(seed, d))[..]);
    let a = codec("turbo1p", d, seed).aux_words();
    assert_eq!(&a[..11], &[5, 64, 0, 0, 0, 16, 80, 0, 0, 0, 96]);
    assert!(a[80..96].iter().all(|&w| w == 0));

    let perm = split_perm(d, &(0..32).map(|c| 2 * c + 1).collect::<Vec<u32>>()).unwrap();
    let c = Codec::new(CodecParams::new(f("turbo2.5"), d, seed).with_perm(perm.clone())).unwrap();
    let a = c.aux_words();
    assert_eq!(&a[..11], &[6, 64, 3, 2, 0, 16, 48, 64, 96, 112, 0]);
    assert_eq!(&a[16..48], &fw(&rotation_signs(seed + 1, 32))[..]);
    assert_eq!(&a[48..64], &cb_slots(32, 3)[..]);
    assert_eq!(&a[64..96], &fw(&rotation_signs(seed + 2, 32))[..]);
    assert_eq!(&a[96..112], &cb_slots(32, 2)[..]);
    assert_eq!(&a[112..], &perm[..]);
}

#[test]
fn seeds_fix_the_instance() {
    let d = 64;
    let xs = random_vectors(17, 4, d);
    let a = codec("turbo3", d, 1).encode(&xs).unwrap();
    assert_eq!(a, codec("turbo3", d, 1).encode(&xs).unwrap());
    assert_ne!(a, codec("turbo3", d, 2).encode(&xs).unwrap());
}

/// A run of vectors cut out of a page ([`gpu::page_run`]) is those vectors encoded alone, and
/// written into a page of another capacity ([`gpu::put_page_run`]) it reads back the same, the
/// page's other vectors untouched: the layout a `.kvpack` file stores a cache's codes in.
#[test]
fn page_runs_are_the_vectors_encoded_alone_and_move_between_capacities() {
    let d = 64;
    for (i, name) in [
        "f16", "q8_0", "q4_0", "turbo3", "turbo2u", "turbo3p", "turbo2.5",
    ]
    .into_iter()
    .enumerate()
    {
        let format = f(name);
        let codec = Codec::with_seed(format, d, 7 + i as u64).unwrap();
        let (m, first, n) = (13, 3, 7);
        let xs = random_vectors(100 + i as u64, m, d);
        let page = codec.encode(&xs).unwrap().words;
        let run = gpu::page_run(&page, &format, d, m, first, n);
        let alone = codec.encode(&xs[first * d..(first + n) * d]).unwrap().words;
        assert_eq!(run, alone, "{name}: a run is its vectors encoded alone");

        // Into a larger page at an odd slot, over a page of other codes.
        let cap = 20;
        let other = codec.encode(&random_vectors(200, cap, d)).unwrap().words;
        let mut big = other.clone();
        gpu::put_page_run(&mut big, &format, d, cap, 5, n, &run).unwrap();
        assert_eq!(gpu::page_run(&big, &format, d, cap, 5, n), run, "{name}");
        for j in (0..cap).filter(|j| !(5..5 + n).contains(j)) {
            assert_eq!(
                gpu::page_run(&big, &format, d, cap, j, 1),
                gpu::page_run(&other, &format, d, cap, j, 1),
                "{name}: vector {j} is not in the run and must not change"
            );
        }
        let back = codec.decode(&Encoded {
            n,
            d,
            words: gpu::page_run(&big, &format, d, cap, 5, n),
        });
        assert_eq!(back, codec.decode(&Encoded { n, d, words: alone }));

        // Wrong lengths and places are refused.
        assert!(gpu::put_page_run(&mut big, &format, d, cap, 5, n + 1, &run).is_err());
        assert!(gpu::put_page_run(&mut big, &format, d, cap, cap - 2, n, &run).is_err());
    }
}
