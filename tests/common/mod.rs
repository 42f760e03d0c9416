//! Shared by the GPU integration tests: every test runs on each backend in
//! `KVPACK_TEST_BACKENDS` (default `vulkan,gl`: lavapipe and llvmpipe on a machine without a GPU),
//! with WebGPU's default limits forced. A missing adapter fails the test loudly; nothing skips.
#![allow(dead_code)]

use kvpack::gpu::{BackendChoice, Gpu, GpuOptions};

/// One opened GPU per backend under test.
pub fn gpus() -> Vec<Gpu> {
    let list = std::env::var("KVPACK_TEST_BACKENDS").unwrap_or_else(|_| "vulkan,gl".into());
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|name| {
            let backend: BackendChoice = name.trim().parse().expect("KVPACK_TEST_BACKENDS");
            let opts = GpuOptions {
                backend,
                webgpu_limits: true,
                ..Default::default()
            };
            Gpu::new_blocking(&opts).unwrap_or_else(|e| {
                panic!(
                    "GPU test needs a `{name}` adapter and found none: {e}\n\
                     Install the software drivers with `scripts/test.sh` (mesa-vulkan-drivers for \
                     Vulkan; llvmpipe GL comes with libgl1-mesa-dri), or set KVPACK_TEST_BACKENDS."
                )
            })
        })
        .collect()
}

/// Deterministic test randomness (a different stream per seed).
pub struct Rng(kvpack::codec::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(kvpack::codec::SplitMix64::new(seed))
    }
    pub fn gauss(&mut self, n: usize) -> Vec<f32> {
        self.0.gaussians_f32(n)
    }
    pub fn uniform(&mut self) -> f64 {
        self.0.next_f64()
    }
}

/// The default model (`KVPACK_MODEL` overrides); missing, it fails and says how to fetch it.
pub fn model_path() -> std::path::PathBuf {
    let p = std::env::var("KVPACK_MODEL")
        .map(Into::into)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("data/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh (or set KVPACK_MODEL)",
        p.display()
    );
    p
}

/// The compaction tests' short context: the first sentences of Brown ca01, encoded as the
/// evaluation commands encode a text.
pub fn jury_tokens(tok: &kvpack::model::Tokenizer) -> Vec<u32> {
    let text = "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent \
                primary election produced no evidence that any irregularities took place. The \
                jury further said in term-end presentments that the City Executive Committee, \
                which had over-all charge of the election, deserves the praise and thanks.";
    let opts = kvpack::model::EncodeOptions {
        parse_special: false,
        add_special: true,
    };
    tok.encode_with(text, opts)
}

/// The largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
