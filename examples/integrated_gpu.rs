//! Running on an integrated GPU: ask for the low-power adapter, respect WebGPU's default limits,
//! and pick the richest KV format whose cache fits a memory budget. Prints every choice.
//!
//! ```sh
//! cargo run --release --example integrated_gpu -- 24    # KV budget in MB (default 24)
//! ```

use kvpack::codec::KvFormat;
use kvpack::gpu::{Gpu, GpuOptions, Power};
use kvpack::kv::KvRecipe;
use kvpack::model::generate::generate;
use kvpack::model::llama::{Llama, Session};
use kvpack::model::sampler::Sampler;
use kvpack::model::{EncodeOptions, GgufFile, Tokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let budget_mb: f64 = std::env::args().nth(1).map_or(Ok(24.0), |s| s.parse())?;
    let opts = GpuOptions {
        power: Power::Low,
        webgpu_limits: true,
        ..GpuOptions::from_env()
    };
    let gpu = Gpu::new_blocking(&opts)?;
    let r = gpu.report();
    println!(
        "adapter: {} [{}; {}], {} MiB per binding",
        r.name,
        r.backend,
        r.device_type,
        r.max_binding_bytes >> 20
    );

    let path = kvpack::model::fetch::default_model(|m| eprintln!("{m}"))?;
    let file = GgufFile::open(&path)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let model = Llama::load(&gpu, &file, |_, _| {})?;
    let c = &model.config;
    println!(
        "weights: {:.1} MB on the GPU",
        model.weights_gpu_bytes() as f64 / 1e6
    );

    // Richest format whose full context fits the budget (KV bytes = layers × KV heads × tokens ×
    // 2 × head_dim × bits / 8).
    let context = 4096;
    let per_bit = (c.n_layer * c.n_head_kv * context * 2 * c.head_dim) as f64 / 8.0;
    let candidates = ["f16", "q8_0", "k8v4", "turbo4", "k4v2", "turbo3", "turbo2"];
    let kv: KvFormat = candidates
        .iter()
        .map(|f| f.parse::<KvFormat>().expect("known format"))
        .find(|f| per_bit * f.bits_per_value(c.head_dim) <= budget_mb * 1e6)
        .ok_or("no format fits that budget: raise it")?;
    println!("KV budget {budget_mb} MB for {context} tokens: {kv} ({:.2} bits/value, {:.1} MB at full context)",
        kv.bits_per_value(c.head_dim), per_bit * kv.bits_per_value(c.head_dim) / 1e6);

    let mut session = Session::new(&gpu, &model, &KvRecipe::plain(kv, 4), context)?;
    let prompt = tok.encode_with(
        "Integrated GPUs are useful because",
        EncodeOptions::default(),
    );
    print!("Integrated GPUs are useful because");
    let g = pollster::block_on(generate(
        &gpu,
        &mut session,
        &tok,
        &prompt,
        &mut Sampler::greedy(),
        24,
        |piece| {
            print!("{piece}");
            true
        },
    ))?;
    println!();
    println!(
        "decode {:.2} tok/s, KV {} bytes",
        g.decode_tok_s(),
        session.cache().bytes()
    );
    Ok(())
}
