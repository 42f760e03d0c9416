//! The compaction score kernels (GPU) equal their CPU reference on fresh random inputs: several
//! shapes, including one key, lengths not a multiple of the workgroup, rows that see no key,
//! zero vectors, causal visible lengths, and keys over several 64 KiB tiles (the rows kernel).

mod common;

use common::{gpus, Rng};
use kvpack::compact::{head_scores_with, reference_head_scores, ScoresKernel};

fn close(ctx: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{ctx}: element {i}: GPU {g} vs CPU {w}"
        );
    }
}

#[test]
fn scores_match_the_cpu_reference() {
    for gpu in gpus() {
        let mut rng = Rng::new(77);
        // (queries, keys, d, causal)
        for &(n_q, n_k, d, causal) in &[
            (1, 1, 64, false),
            (5, 70, 64, false),
            (33, 129, 64, true),
            (17, 300, 128, false),
            (9, 64, 32, true),
            (150, 200, 64, true),
            (70, 600, 64, true),
        ] {
            let mut q = rng.gauss(n_q * d);
            let mut k = rng.gauss(n_k * d);
            let v = rng.gauss(n_k * d);
            // A zero query and a zero key.
            q[..d].fill(0.0);
            k[(n_k - 1) * d..].fill(0.0);
            let lens: Vec<u32> = (0..n_q)
                .map(|i| {
                    if causal {
                        // Row 1 sees nothing; others a growing prefix.
                        if i == 1 {
                            0
                        } else {
                            ((i * n_k) / n_q + 1) as u32
                        }
                    } else {
                        n_k as u32
                    }
                })
                .collect();
            let want = reference_head_scores(&q, &lens, &k, &v, d).unwrap();
            for kernel in [ScoresKernel::Workgroup, ScoresKernel::Rows] {
                let got = pollster::block_on(head_scores_with(&gpu, kernel, &q, &lens, &k, &v, d))
                    .unwrap();
                let ctx = format!(
                    "{} {kernel:?} n_q {n_q} n_k {n_k} d {d}",
                    gpu.backend_name()
                );
                close(&format!("{ctx} e"), &got.e, &want.e, 1e-4);
                close(&format!("{ctx} max"), &got.max, &want.max, 1e-4);
                close(&format!("{ctx} sum"), &got.sum, &want.sum, 1e-4);
                close(&format!("{ctx} y"), &got.y, &want.y, 1e-4);
            }
        }
    }
}
