//! The transformer kernels (`shaders/model/`) against their CPU references on fresh random inputs
//! and awkward shapes (one token, odd row counts, a tensor split into many buffers), for every
//! weight type, on every backend; then on the real default model's weights.

mod common;

use common::{gpus, Rng};
use half::f16;
use kvpack::gpu::{Gpu, GpuVec};
use kvpack::model::ops::{self, MatmulKernel, MatmulOptions, OpsError};
use kvpack::model::weights::{dequantize_rows, QTensor, WeightError};
use kvpack::model::{GgmlType, GgufFile};

const WEIGHT_TYPES: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
];

/// Relative error allowed: f32 sums in another order than the f64 references.
const TOL: f64 = 1e-4;

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| (rng.uniform() * 256.0) as u8).collect()
}

fn half_bytes(v: f64) -> [u8; 2] {
    f16::from_f64(v).to_le_bytes()
}

/// GGUF bytes of a random `rows × cols` weight: Gaussian floats, or blocks with random codes and
/// scales (every nibble and byte value occurs).
fn random_weight(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => out.extend(rng.gauss(n).iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(rng.gauss(n).iter().flat_map(|&v| half_bytes(v as f64))),
        _ => {
            for _ in 0..n / 32 {
                let d =
                    (0.005 + 0.05 * rng.uniform()) * if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                out.extend(half_bytes(d));
                match ty {
                    GgmlType::Q4_0 => out.extend(random_bytes(rng, 16)),
                    GgmlType::Q4_1 => {
                        out.extend(half_bytes(rng.gauss(1)[0] as f64 * 0.2));
                        out.extend(random_bytes(rng, 16));
                    }
                    GgmlType::Q8_0 => out.extend(random_bytes(rng, 32)),
                    other => panic!("no generator for {other}"),
                }
            }
        }
    }
    out
}

/// Largest |gpu − reference| / scale over all elements (scale: the size of each element's terms).
fn max_rel_err(got: &[f32], want: &[f32], scale: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .zip(scale)
        .map(|((&g, &w), &s)| {
            let e = (g as f64 - w as f64).abs();
            if g.is_nan() != w.is_nan() {
                f64::INFINITY
            } else {
                e / (s as f64).max(1e-30)
            }
        })
        .fold(0.0, f64::max)
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

fn run<T: bytemuck::Pod>(
    gpu: &Gpu,
    out: &GpuVec<T>,
    record: impl FnOnce(&mut kvpack::gpu::Batch<'_>) -> Result<(), OpsError>,
) -> Vec<T> {
    let mut batch = gpu.batch("test");
    record(&mut batch).unwrap();
    batch.submit();
    gpu.read_blocking(out).unwrap()
}

const KERNELS: [MatmulKernel; 2] = [MatmulKernel::Columns, MatmulKernel::Rows];

/// GPU matmul of `w` on `x`, with each kernel, against the f64 reference; returns the largest
/// relative error.
fn check_matmul(gpu: &Gpu, ctx: &str, w: &QTensor, bytes: &[u8], x: &[f32], n_tok: usize) -> f64 {
    let dense = dequantize_rows(w.ggml_type, bytes, w.rows, w.cols).unwrap();
    let want = ops::matmul_ref(&dense, w.rows, w.cols, x, n_tok);
    let scale = ops::matmul_ref(&abs(&dense), w.rows, w.cols, &abs(x), n_tok);
    let xg = gpu.upload("x", x);
    let mut worst = 0.0f64;
    for kernel in KERNELS {
        // NaN first, so an output nobody writes shows up.
        let y = gpu.upload("y", &vec![f32::NAN; n_tok * w.rows]);
        let opts = MatmulOptions {
            kernel,
            ..Default::default()
        };
        let got = run(gpu, &y, |b| {
            ops::matmul_with(gpu, b, w, &xg, n_tok, &y, opts)
        });
        let err = max_rel_err(&got, &want, &scale);
        assert!(
            err <= TOL,
            "{ctx} {kernel:?}: matmul relative error {err:e}"
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn matmul_matches_reference_for_every_type_and_shape() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        let mut worst = 0.0f64;
        for ty in WEIGHT_TYPES {
            for (rows, cols, n_tok) in [
                (1, 32, 1),
                (5, 32, 3),
                (67, 576, 1),
                (67, 576, 3),
                (37, 576, 64),
                (130, 1536, 1),
                (9, 1536, 5),
                (3, 96, 2),
            ] {
                let ctx = format!("{backend} {ty} rows={rows} cols={cols} n_tok={n_tok}");
                let mut rng = Rng::new((rows * 7919 + cols * 31 + n_tok) as u64 + ty.id() as u64);
                let bytes = random_weight(&mut rng, ty, rows, cols);
                let w = QTensor::upload(&gpu, "w", ty, &[cols as u64, rows as u64], &bytes)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(w.chunks.len(), 1, "{ctx}");
                let x = rng.gauss(n_tok * cols);
                worst = worst.max(check_matmul(&gpu, &ctx, &w, &bytes, &x, n_tok));
            }
        }
        eprintln!("{backend}: matmul worst relative error {worst:.2e}");
    }
}

#[test]
fn matmul_over_a_tensor_split_into_chunks() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for ty in WEIGHT_TYPES {
            let (rows, cols) = (67, 576);
            let mut rng = Rng::new(11 + ty.id() as u64);
            let bytes = random_weight(&mut rng, ty, rows, cols);
            let row_bytes = bytes.len() / rows;
            // 10 rows per chunk: 7 chunks, the last one short.
            let limit = (10 * row_bytes + 8) as u64;
            let w = QTensor::upload_with_chunk_bytes(
                &gpu,
                "split",
                ty,
                &[cols as u64, rows as u64],
                &bytes,
                limit,
            )
            .unwrap();
            assert_eq!(w.chunks.len(), 7, "{backend} {ty}");
            assert_eq!(w.chunks[6].row_start, 60);
            assert_eq!(w.chunks[6].rows, 7);
            for n_tok in [1, 3, 64] {
                let ctx = format!("{backend} {ty} split n_tok={n_tok}");
                let x = rng.gauss(n_tok * cols);
                check_matmul(&gpu, &ctx, &w, &bytes, &x, n_tok);
            }
            let err = QTensor::upload_with_chunk_bytes(
                &gpu,
                "split",
                ty,
                &[cols as u64, rows as u64],
                &bytes,
                row_bytes as u64,
            )
            .err()
            .expect("a row larger than the chunk limit");
            assert!(err.to_string().contains("one row takes"), "{err}");
        }
    }
}

#[test]
fn matmul_accumulates_and_reads_from_a_token_offset() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        let (rows, cols, n_x, first, n_tok) = (45, 576, 7, 4, 3);
        let mut rng = Rng::new(5);
        let bytes = random_weight(&mut rng, GgmlType::Q4_1, rows, cols);
        let w = QTensor::upload(
            &gpu,
            "w",
            GgmlType::Q4_1,
            &[cols as u64, rows as u64],
            &bytes,
        )
        .unwrap();
        let dense = dequantize_rows(GgmlType::Q4_1, &bytes, rows, cols).unwrap();
        let x = rng.gauss(n_x * cols);
        let y0 = rng.gauss(n_tok * rows);
        let xs = &x[first * cols..(first + n_tok) * cols];
        let mut want = ops::matmul_ref(&dense, rows, cols, xs, n_tok);
        ops::add_ref(&mut want, &y0);
        let mut scale = ops::matmul_ref(&abs(&dense), rows, cols, &abs(xs), n_tok);
        ops::add_ref(&mut scale, &abs(&y0));
        let xg = gpu.upload("x", &x);
        for kernel in KERNELS {
            let y = gpu.upload("y", &y0);
            let opts = MatmulOptions {
                x_first_tok: first,
                accumulate: true,
                kernel,
            };
            let got = run(&gpu, &y, |b| {
                ops::matmul_with(&gpu, b, &w, &xg, n_tok, &y, opts)
            });
            let err = max_rel_err(&got, &want, &scale);
            assert!(
                err <= TOL,
                "{backend} {kernel:?}: matmul_add relative error {err:e}"
            );
        }
    }
}

#[test]
fn embed_gathers_rows_of_every_type_and_chunking() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for ty in WEIGHT_TYPES {
            for (rows, cols, split) in [(50, 576, false), (50, 64, true), (7, 1536, false)] {
                let ctx = format!("{backend} {ty} rows={rows} cols={cols} split={split}");
                let mut rng = Rng::new((rows + cols) as u64 + ty.id() as u64);
                let bytes = random_weight(&mut rng, ty, rows, cols);
                let dims = [cols as u64, rows as u64];
                let w = if split {
                    let limit = (6 * bytes.len() / rows + 8) as u64;
                    QTensor::upload_with_chunk_bytes(&gpu, "e", ty, &dims, &bytes, limit)
                } else {
                    QTensor::upload(&gpu, "e", ty, &dims, &bytes)
                }
                .unwrap();
                assert_eq!(w.chunks.len() > 1, split, "{ctx}");
                let mut ids: Vec<u32> = (0..9)
                    .map(|_| (rng.uniform() * rows as f64) as u32)
                    .collect();
                ids.extend([0, rows as u32 - 1, rows as u32, u32::MAX]);
                let dense = dequantize_rows(ty, &bytes, rows, cols).unwrap();
                let want = ops::embed_ref(&dense, cols, &ids);
                let ids_g = gpu.upload("ids", &ids);
                // Filled with NaN so a row nobody writes shows up.
                let out = gpu.upload("out", &vec![f32::NAN; ids.len() * cols]);
                let got = run(&gpu, &out, |b| {
                    ops::embed_into(&gpu, b, &w, &ids_g, ids.len(), &out)
                });
                let peak = dense.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                // One rounding step of the value's terms (the GPU may fuse nibble·d + m).
                let scale = vec![peak.max(1e-20); want.len()];
                let err = max_rel_err(&got, &want, &scale);
                assert!(err <= 1e-6, "{ctx}: embed error {err:e}");
            }
        }
    }
}

#[test]
fn rmsnorm_matches_reference() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for (n_tok, dim) in [(1, 576), (3, 64), (64, 576), (2, 1000), (1, 1)] {
            let ctx = format!("{backend} rmsnorm n_tok={n_tok} dim={dim}");
            let mut rng = Rng::new((n_tok * dim) as u64);
            let mut x = rng.gauss(n_tok * dim);
            // A zero row and a huge one.
            x[..dim].iter_mut().for_each(|v| *v = 0.0);
            if n_tok > 1 {
                x[dim..2 * dim].iter_mut().for_each(|v| *v *= 1e4);
            }
            let w = rng.gauss(dim);
            let want = ops::rmsnorm_ref(&x, &w, dim, 1e-5);
            let scale: Vec<f32> = want.iter().map(|v| v.abs() + 1e-6).collect();
            let (xg, wg) = (gpu.upload("x", &x), gpu.upload("w", &w));
            let y = gpu.zeros::<f32>("y", n_tok * dim);
            let got = run(&gpu, &y, |b| {
                ops::rmsnorm_into(&gpu, b, &xg, &wg, n_tok, dim, 1e-5, &y)
            });
            let err = max_rel_err(&got, &want, &scale);
            assert!(err <= TOL, "{ctx}: relative error {err:e}");
        }
    }
}

#[test]
fn rope_matches_reference() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        let mut worst = 0.0f64;
        for (n_tok, n_heads, head_dim, pos0, base) in [
            (1, 9, 64, 0, 100000.0),
            (3, 3, 64, 17, 100000.0),
            (64, 9, 64, 1000, 100000.0),
            (5, 2, 128, 30000, 10000.0),
            (2, 1, 2, 5, 10000.0),
            (1, 4, 256, 100000, 500000.0),
        ] {
            let ctx = format!("{backend} rope {n_tok}x{n_heads}x{head_dim} pos0={pos0}");
            let mut rng = Rng::new((n_tok * n_heads * head_dim + pos0) as u64);
            let x = rng.gauss(n_tok * n_heads * head_dim);
            let mut want = x.clone();
            ops::rope_ref(&mut want, n_heads, head_dim, pos0, base);
            // Error relative to the pair's length (what a rotation preserves).
            let scale: Vec<f32> = x
                .chunks(2)
                .flat_map(|p| {
                    let n = (p[0] * p[0] + p[1] * p[1]).sqrt();
                    [n, n]
                })
                .collect();
            let xg = gpu.upload("x", &x);
            let got = run(&gpu, &xg, |b| {
                ops::rope_into(&gpu, b, &xg, n_tok, n_heads, head_dim, pos0, base)
            });
            let err = max_rel_err(&got, &want, &scale);
            worst = worst.max(err);
            assert!(err <= TOL, "{ctx}: relative error {err:e}");
        }
        eprintln!("{backend}: rope worst relative error {worst:.2e}");
    }
}

#[test]
fn swiglu_and_add_match_reference() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for n in [1, 257, 3 * 1536, 64 * 576] {
            let mut rng = Rng::new(n as u64);
            let mut gate = rng.gauss(n);
            gate[0] *= 100.0;
            if n > 1 {
                gate[1] = -100.0;
            }
            let up = rng.gauss(n);
            let want = ops::swiglu_ref(&gate, &up);
            let scale: Vec<f32> = want.iter().map(|v| v.abs() + 1e-30).collect();
            let (g, u) = (gpu.upload("gate", &gate), gpu.upload("up", &up));
            let out = gpu.zeros::<f32>("out", n);
            let got = run(&gpu, &out, |b| ops::swiglu_into(&gpu, b, &g, &u, n, &out));
            let err = max_rel_err(&got, &want, &scale);
            assert!(err <= TOL, "{backend} swiglu n={n}: relative error {err:e}");

            let mut want = gate.clone();
            ops::add_ref(&mut want, &up);
            let got = run(&gpu, &g, |b| ops::add_into(&gpu, b, &g, &u, n));
            assert_eq!(got, want, "{backend} add n={n}");
        }
    }
}

#[test]
fn argmax_matches_reference() {
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        for (n_rows, n_cols) in [(1, 49152), (3, 1000), (2, 1), (4, 300)] {
            let mut rng = Rng::new((n_rows * n_cols) as u64);
            let mut x = rng.gauss(n_rows * n_cols);
            if n_cols > 10 {
                // Row 1: a tie between columns 7 and 300 (or the end); row 2: NaNs around.
                if n_rows > 1 {
                    let row = &mut x[n_cols..2 * n_cols];
                    row[7] = 50.0;
                    row[n_cols.min(300) - 1] = 50.0;
                }
                if n_rows > 2 {
                    let row = &mut x[2 * n_cols..3 * n_cols];
                    row[0] = f32::NAN;
                    row[5] = f32::NAN;
                }
            }
            let want = ops::argmax_ref(&x, n_cols);
            let xg = gpu.upload("logits", &x);
            let out = gpu.zeros::<u32>("out", n_rows);
            let got = run(&gpu, &out, |b| {
                ops::argmax_into(&gpu, b, &xg, n_rows, n_cols, &out)
            });
            assert_eq!(got, want, "{backend} argmax {n_rows}x{n_cols}");
        }
    }
}

#[test]
fn refusals_are_typed_errors() {
    let gpu = gpus().remove(0);
    let err = QTensor::upload(
        &gpu,
        "blk.0.ffn_up.weight",
        GgmlType::Q4_K,
        &[256, 2],
        &[0; 288],
    )
    .err()
    .unwrap();
    assert!(matches!(err, WeightError::UnsupportedType { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("Q4_K") && msg.contains("blk.0.ffn_up.weight"),
        "{msg}"
    );
    let err = QTensor::upload(&gpu, "w", GgmlType::Q4_1, &[576, 2], &[0; 100])
        .err()
        .unwrap();
    assert!(matches!(err, WeightError::BadSize { .. }), "{err}");
    let err = QTensor::upload(&gpu, "w", GgmlType::F32, &[5, 2], &[0; 40])
        .err()
        .unwrap();
    assert!(err.to_string().contains("multiple of 8"), "{err}");

    let w = QTensor::upload(&gpu, "w", GgmlType::Q8_0, &[32, 4], &[0; 136]).unwrap();
    let x = gpu.zeros::<f32>("x", 32);
    let y = gpu.zeros::<f32>("y", 4);
    let mut batch = gpu.batch("refusals");
    let err = ops::matmul_into(&gpu, &mut batch, &w, &x, 2, &y).unwrap_err();
    assert!(
        matches!(
            err,
            OpsError::Size {
                what: "x",
                need: 64,
                got: 32,
                ..
            }
        ),
        "{err}"
    );
    let err = ops::rope_into(&gpu, &mut batch, &x, 1, 1, 31, 0, 1e4).unwrap_err();
    assert!(err.to_string().contains("31"), "{err}");
    let err = ops::argmax_into(&gpu, &mut batch, &x, 1, 0, &gpu.zeros("o", 1)).unwrap_err();
    assert!(matches!(err, OpsError::Shape { .. }), "{err}");
}

/// The default model: `KVPACK_MODEL` or `data/SmolLM2-135M-Instruct.Q4_1.gguf`.
fn model_file() -> GgufFile {
    let path = std::env::var("KVPACK_MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .into()
    });
    if !std::path::Path::new(&path).exists() {
        panic!("the default model is missing at {path}: fetch it with `scripts/fetch-model.sh`");
    }
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn real_model_weights_on_the_gpu() {
    let file = model_file();
    for gpu in gpus() {
        let backend = gpu.backend_name().to_string();
        let mut rng = Rng::new(2024);
        for (name, ty, n_tok) in [
            ("blk.0.ffn_gate.weight", GgmlType::Q4_1, 1),
            ("blk.0.ffn_gate.weight", GgmlType::Q4_1, 5),
            ("token_embd.weight", GgmlType::Q8_0, 1),
        ] {
            let info = file.tensor_info(name).unwrap();
            assert_eq!(info.ggml_type, ty, "{name}");
            let bytes = file.read_tensor_bytes(name).unwrap();
            let w = QTensor::load(&gpu, &file, name).unwrap();
            assert_eq!((w.cols, w.rows), (576, info.dims[1] as usize), "{name}");
            let x = rng.gauss(n_tok * w.cols);
            let err = check_matmul(&gpu, &format!("{backend} {name}"), &w, &bytes, &x, n_tok);
            eprintln!("{backend} {name} n_tok={n_tok}: relative error {err:.2e}");
        }

        // Every tensor uploaded in its own layout: GPU bytes ≈ the file's tensor data.
        let (mut gpu_bytes, mut data_bytes) = (0u64, 0u64);
        for info in file.tensors() {
            let w = QTensor::load(&gpu, &file, &info.name).unwrap();
            gpu_bytes += w.gpu_bytes();
            data_bytes += info.n_bytes();
        }
        let n = file.tensors().len() as u64;
        assert!(
            gpu_bytes >= data_bytes && gpu_bytes <= data_bytes + 8 * n,
            "{backend}: {gpu_bytes} GPU bytes for {data_bytes} bytes of tensors"
        );
        let file_size = file.file_size();
        assert!(
            gpu_bytes <= file_size && gpu_bytes as f64 >= 0.95 * file_size as f64,
            "{backend}: {gpu_bytes} GPU bytes for a {file_size}-byte file"
        );
        eprintln!("{backend}: {n} tensors, {gpu_bytes} GPU bytes, file {file_size} bytes");
    }
}
