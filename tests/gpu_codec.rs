//! GPU encode and decode of every format against the CPU reference, on fresh random inputs and
//! awkward shapes (one vector, odd counts, zero vectors, huge and tiny norms), on every backend.

mod common;

use common::{gpus, Rng};
use kvpack::codec::gpu::GpuCodec;
use kvpack::codec::{Codec, CodecError, Encoded, VecFormat};

const FORMATS: &[&str] = &[
    "f32", "f16", "q8_0", "q4_0", "turbo1", "turbo2", "turbo3", "turbo4", "turbo2n", "turbo3u",
    "turbo4u", "turbo1p", "turbo2p", "turbo3p", "turbo4p", "turbo2.5", "turbo3.5",
];

/// n vectors of dimension d with norms spread over six decades, a zero vector at index 1 and a
/// large-norm one at index 2 (when n allows).
fn inputs(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut xs = rng.gauss(n * d);
    for i in 0..n {
        let scale = match i {
            1 => 0.0,
            2 => 2000.0,
            _ => 10f64.powf(rng.uniform() * 6.0 - 3.0) as f32,
        };
        xs[i * d..][..d].iter_mut().for_each(|x| *x *= scale);
    }
    xs
}

fn half(words: &[u32], k: usize) -> f32 {
    let w = words[k / 2];
    half::f16::from_bits(if k.is_multiple_of(2) {
        w as u16
    } else {
        (w >> 16) as u16
    })
    .to_f32()
}

#[test]
fn gpu_encode_and_decode_match_cpu_reference() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for name in FORMATS {
            let format: VecFormat = name.parse().unwrap();
            let (mut words, mut word_mismatch) = (0usize, 0usize);
            for (d, n) in [
                (32, 1),
                (64, 1),
                (64, 2),
                (64, 37),
                (128, 5),
                (256, 3),
                (128, 1500),
            ] {
                if format.validate_dim(d).is_err() {
                    continue;
                }
                let ctx = format!("{backend} {name} d={d} n={n}");
                let mut rng = Rng::new(d as u64 * 1000 + n as u64);
                let codec = Codec::with_seed(format, d, 42).unwrap();
                let gc = GpuCodec::new(&gpu, codec.clone());
                let xs = inputs(&mut rng, n, d);
                let cpu = codec.encode(&xs).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let gpu_enc = pollster::block_on(gc.encode(&gpu, &xs))
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(cpu.words.len(), gpu_enc.words.len(), "{ctx}: page size");
                let code_words = n * format.code_words(d);
                words += code_words;
                word_mismatch += (0..code_words)
                    .filter(|&w| cpu.words[w] != gpu_enc.words[w])
                    .count();
                // Scales: equal up to one f16 rounding step.
                let scales = &cpu.words[code_words..];
                let gscales = &gpu_enc.words[code_words..];
                for k in 0..n * format.scale_halves(d) {
                    let (a, b) = (half(scales, k), half(gscales, k));
                    assert!(
                        (a - b).abs() <= a.abs() * 1.0e-3 + 1e-7,
                        "{ctx}: scale {k}: cpu {a} gpu {b}"
                    );
                }
                // Decode of the same bits: GPU within 1e-5 of the CPU, relative to the vector.
                let dec_cpu = codec.decode(&cpu);
                let dec_gpu = pollster::block_on(gc.decode(&gpu, &cpu)).unwrap();
                for i in 0..n {
                    let c = &dec_cpu[i * d..][..d];
                    let g = &dec_gpu[i * d..][..d];
                    let norm = c.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
                    let err = c
                        .iter()
                        .zip(g)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    assert!(
                        err <= 1e-5 * norm + 1e-30,
                        "{ctx}: vector {i} decodes {err} apart (max {norm})"
                    );
                }
                // The zero vector stays zero.
                if n > 1 {
                    assert!(
                        dec_gpu[d..2 * d].iter().all(|&x| x == 0.0),
                        "{ctx}: zero vector"
                    );
                }
            }
            let agree = 1.0 - word_mismatch as f64 / words as f64;
            assert!(
                agree >= 0.9999,
                "{backend} {name}: GPU and CPU codes agree on {:.5} of words",
                agree
            );
        }
    }
}

#[test]
fn non_finite_and_overflowing_vectors_are_refused_not_garbled() {
    for gpu in gpus() {
        for name in ["f16", "q8_0", "turbo3", "turbo3p", "turbo2.5"] {
            let format: VecFormat = name.parse().unwrap();
            let d = 64;
            let codec = Codec::with_seed(format, d, 3).unwrap();
            let gc = GpuCodec::new(&gpu, codec.clone());
            let mut xs = Rng::new(5).gauss(4 * d);
            xs[d + 7] = f32::NAN;
            xs[3 * d] = f32::INFINITY;
            let err = pollster::block_on(gc.encode(&gpu, &xs)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains('2') && msg.contains('1'), "{name}: {msg}");
            let (enc, refused) = pollster::block_on(gc.encode_lossy(&gpu, &xs)).unwrap();
            assert_eq!(refused, Some((2, 1)), "{name}");
            let dec = codec.decode(&enc);
            assert!(
                dec[d..2 * d].iter().all(|&x| x == 0.0),
                "{name}: refused vector decodes to zero"
            );
            assert!(
                dec[0..d].iter().any(|&x| x != 0.0),
                "{name}: good vector kept"
            );
            assert!(dec.iter().all(|x| x.is_finite()), "{name}: no garbage");
            // The CPU reference refuses the same vectors.
            match codec.encode(&xs) {
                Err(CodecError::NonFinite {
                    count: 2,
                    first_index: 1,
                }) => {}
                other => panic!("{name}: CPU reference gave {other:?}"),
            }
        }
        // A norm beyond f16's range cannot be stored: refused on both sides.
        let codec = Codec::with_seed("turbo4".parse().unwrap(), 64, 1).unwrap();
        let gc = GpuCodec::new(&gpu, codec.clone());
        let xs = vec![1.0e5f32; 64];
        let (_, refused) = pollster::block_on(gc.encode_lossy(&gpu, &xs)).unwrap();
        assert_eq!(refused, Some((1, 0)));
        assert!(codec.encode(&xs).is_err());
    }
}

#[test]
fn encode_appends_into_a_page_without_touching_neighbours() {
    // Token-by-token appends share scale words between neighbours: writing slot 5 must keep 4.
    for gpu in gpus() {
        let d = 64;
        let format: VecFormat = "turbo3".parse().unwrap();
        let codec = Codec::with_seed(format, d, 9).unwrap();
        let gc = GpuCodec::new(&gpu, codec.clone());
        let xs = Rng::new(11).gauss(8 * d);
        let whole = codec.encode(&xs).unwrap();
        let page = gpu.zeros::<u32>("page", whole.words.len());
        let input = gpu.upload("xs", &xs);
        let status = gpu.upload("status", &[0u32, u32::MAX]);
        for (first, n) in [(0, 3), (3, 1), (4, 1), (5, 3)] {
            let mut b = gpu.batch("append");
            gc.encode_into(
                &gpu,
                &mut b,
                &kvpack::codec::gpu::EncodeArgs {
                    xs: kvpack::codec::gpu::Input::F32(&input),
                    src_offset: first * d,
                    src_stride: d,
                    n,
                    page: &page,
                    capacity: 8,
                    dst_first: first,
                    status: &status,
                },
            )
            .unwrap();
            b.submit();
        }
        let words = gpu.read_blocking(&page).unwrap();
        let got = codec.decode(&Encoded { n: 8, d, words });
        let want = codec.decode(&whole);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs().max(1e-3),
                "{}: element {i}: {a} vs {b}",
                gpu.backend_name()
            );
        }
    }
}

/// f16 words of `xs` (two coordinates a word, coordinate 2i low), and `xs` rounded to f16.
fn f16_words(xs: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let h: Vec<half::f16> = xs.iter().map(|&x| half::f16::from_f32(x)).collect();
    let words = h
        .chunks(2)
        .map(|p| p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16)
        .collect();
    (words, h.iter().map(|x| x.to_f32()).collect())
}

/// The encoder reads f16 input too: plain coordinates, or the codec's rotated domain (the KV
/// cache's window of recent tokens, quantized as tokens leave it). Its codes are the CPU
/// encode's of the same f16 vectors (rotated ones rotated back).
#[test]
fn gpu_encode_from_f16_and_rotated_f16_input_matches_cpu_reference() {
    use kvpack::codec::gpu::{EncodeArgs, Input};
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for name in FORMATS {
            let format: VecFormat = name.parse().unwrap();
            let (d, n) = (64, 301);
            let codec = Codec::with_seed(format, d, 7).unwrap();
            let gc = GpuCodec::new(&gpu, codec.clone());
            let mut rng = Rng::new(91);
            let mut xs = inputs(&mut rng, n, d);
            // Norms within f16 range after rotation.
            xs.iter_mut().for_each(|x| *x = x.clamp(-6e4, 6e4));
            let status = gpu.upload("status", &[0u32, u32::MAX]);
            for rotated in [false, true] {
                let ctx = format!("{backend} {name} rotated input {rotated}");
                let (words, want_input) = if rotated {
                    let rot: Vec<f32> = xs.chunks(d).flat_map(|x| codec.to_rotated(x)).collect();
                    let (w, r) = f16_words(&rot);
                    let back: Vec<f32> =
                        r.chunks(d).flat_map(|y| codec.unrotate_output(y)).collect();
                    (w, back)
                } else {
                    f16_words(&xs)
                };
                let cpu = codec
                    .encode(&want_input)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let input = gpu.upload("f16 input", &words);
                let page = gpu.zeros::<u32>("page", cpu.words.len());
                let mut b = gpu.batch("encode");
                gc.encode_into(
                    &gpu,
                    &mut b,
                    &EncodeArgs::packed(
                        if rotated {
                            Input::RotatedF16(&input)
                        } else {
                            Input::F16(&input)
                        },
                        d,
                        n,
                        &page,
                        &status,
                    ),
                )
                .unwrap();
                b.submit();
                let got = Encoded {
                    n,
                    d,
                    words: gpu.read_blocking(&page).unwrap(),
                };
                assert_eq!(gpu.read_blocking(&status).unwrap()[0], 0, "{ctx}: refused");
                let code_words = n * format.code_words(d);
                let mismatched = (0..code_words)
                    .filter(|&w| cpu.words[w] != got.words[w])
                    .count();
                assert!(
                    mismatched * 10_000 <= code_words,
                    "{ctx}: {mismatched} of {code_words} code words differ"
                );
                for i in 0..n {
                    for k in 0..format.scale_halves(d) {
                        let (a, g) = (codec.scale_of(&cpu, i, k), codec.scale_of(&got, i, k));
                        assert!(
                            (a - g).abs() <= a.abs() * 1.0e-3 + 1e-7,
                            "{ctx}: vector {i} scale {k}: cpu {a} gpu {g}"
                        );
                    }
                }
            }
        }
    }
}
