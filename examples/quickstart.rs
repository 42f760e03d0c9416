//! Compress a small KV cache with TurboQuant on the GPU and run attention directly on it.
//!
//! ```sh
//! cargo run --release --example quickstart            # any backend
//! KVPACK_BACKEND=gl cargo run --example quickstart    # OpenGL
//! ```

use kvpack::attention::{
    decode_attention_into, reference_attention, AttentionScratch, AttentionShape, KvPages, Recent,
    ValueStore,
};
use kvpack::codec::gpu::GpuCodec;
use kvpack::codec::{Codec, KvFormat};
use kvpack::gpu::{Gpu, GpuOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new_blocking(&GpuOptions::from_env())?;
    println!("adapter: {} ({})", gpu.report().name, gpu.backend_name());

    // The default model's attention shape: 9 query heads sharing 3 KV heads of dimension 64.
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let (d, tokens) = (shape.head_dim, 1000);
    let format: KvFormat = "k4v2".parse()?; // 4-bit keys, 2-bit values
    let wave = |i: usize, f: f32| ((i as f32) * f).sin() + 0.1 * ((i * 7 % 13) as f32);
    let keys: Vec<f32> = (0..shape.n_kv_heads * tokens * d)
        .map(|i| wave(i, 0.013))
        .collect();
    let values: Vec<f32> = (0..shape.n_kv_heads * tokens * d)
        .map(|i| wave(i, 0.029))
        .collect();
    let query: Vec<f32> = (0..shape.n_heads * d).map(|i| wave(i, 0.07)).collect();

    // Quantize on the GPU: keys and values each get their own rotation seed.
    let kc = GpuCodec::new(&gpu, Codec::with_seed(format.k, d, 1)?);
    let vc = GpuCodec::new(&gpu, Codec::with_seed(format.v, d, 2)?);
    let k_page = pollster::block_on(kc.encode(&gpu, &keys))?;
    let v_page = pollster::block_on(vc.encode(&gpu, &values))?;
    let f16_bytes = 2 * keys.len() * 2;
    let packed_bytes = 4 * (k_page.words.len() + v_page.words.len());
    println!(
        "{format}: {packed_bytes} bytes for {} tokens × 3 heads (f16 would be {f16_bytes}: {:.1}x smaller, {:.2} bits/value)",
        tokens,
        f16_bytes as f64 / packed_bytes as f64,
        format.bits_per_value(d)
    );

    // Attention over the compressed pages, no dequantized copy.
    let heads: Vec<u32> = (0..3)
        .flat_map(|h| [(h * tokens) as u32, tokens as u32])
        .collect();
    let (kp, vp) = (
        gpu.upload("k", &k_page.words),
        gpu.upload("v", &v_page.words),
    );
    let heads_buf = gpu.upload("heads", &heads);
    let kv = KvPages {
        k_codec: &kc,
        v_codec: &vc,
        k_page: &kp,
        v_page: &vp,
        capacity: 3 * tokens,
        heads: &heads_buf,
        max_len: tokens,
        bias: None,
        skip: 0,
        values: ValueStore::Codes,
        ring: 0,
        recent: Recent::All,
        center: None,
        appended: 0,
    };
    let (q, out) = (
        gpu.upload("q", &query),
        gpu.zeros::<f32>("out", query.len()),
    );
    let scratch = AttentionScratch::new(&gpu, shape, 1, tokens);
    let mut batch = gpu.batch("attention");
    decode_attention_into(
        &gpu,
        &mut batch,
        shape,
        std::slice::from_ref(&kv),
        &q,
        1,
        &scratch,
        &out,
    )?;
    batch.submit();
    let got = gpu.read_blocking(&out)?;

    // Compare with exact attention over the uncompressed cache.
    let split = |x: &[f32]| {
        x.chunks(tokens * d)
            .map(<[f32]>::to_vec)
            .collect::<Vec<_>>()
    };
    let exact = reference_attention(shape, &query, 1, &split(&keys), &split(&values), None);
    let err: f32 = got
        .iter()
        .zip(&exact)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = exact.iter().map(|x| x * x).sum::<f32>().sqrt();
    println!(
        "attention output error vs the uncompressed cache: {:.2}% (relative L2)",
        100.0 * err / norm
    );
    Ok(())
}
