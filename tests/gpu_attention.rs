//! Attention on the compressed cache (GPU) equals attention over the CPU-decoded cache, for every
//! kind of K/V format pair, GQA, ragged heads, causal chunks, split-K and per-key bias.

mod common;

use common::{gpus, Rng};
use kvpack::attention::{
    decode_attention_into, reference_attention, AttentionScratch, AttentionShape, KvPages,
};
use kvpack::codec::gpu::GpuCodec;
use kvpack::codec::{Codec, VecFormat};

const PAIRS: &[(&str, &str)] = &[
    ("f32", "f32"),
    ("f16", "f16"),
    ("q8_0", "q4_0"),
    ("q4_0", "q8_0"),
    ("turbo3", "turbo2"),
    ("turbo4n", "turbo3u"),
    ("turbo1", "turbo4"),
    ("turbo3p", "turbo2p"),
    ("turbo2.5", "turbo3.5"),
    ("q8_0", "turbo4"),
];

/// Every output row of `got` within 1e-4 of `want`, relative to the row's largest value.
fn assert_rows_close(ctx: &str, got: &[f32], want: &[f32], d: usize) {
    for (o, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let scale = w.iter().map(|x| x.abs()).fold(0.0f32, f32::max).max(1e-6);
        let err = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            err <= 1e-4 * scale,
            "{ctx}: output {o}: max error {err:e} relative to {scale}"
        );
    }
}

fn run_case(
    gpu: &kvpack::gpu::Gpu,
    kf: &str,
    vf: &str,
    lens: &[usize],
    n_q: usize,
    with_bias: bool,
    flip_codebook_selects: bool,
) {
    let shape = AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
    };
    let d = shape.head_dim;
    let mut scratch = AttentionScratch::new(gpu, shape, n_q, *lens.iter().max().unwrap());
    scratch.codebook_selects ^= flip_codebook_selects;
    let ctx = format!(
        "{} K={kf} V={vf} lens={lens:?} n_q={n_q} bias={with_bias} codebook_selects={}",
        gpu.backend_name(),
        scratch.codebook_selects
    );
    let mut rng = Rng::new(lens.iter().sum::<usize>() as u64 * 31 + n_q as u64);
    let total: usize = lens.iter().sum();
    let kc = Codec::with_seed(kf.parse::<VecFormat>().unwrap(), d, 101).unwrap();
    let vc = Codec::with_seed(vf.parse::<VecFormat>().unwrap(), d, 202).unwrap();
    // Keys with a per-channel offset and spread, like real keys; values plain.
    let mut keys = rng.gauss(total * d);
    for (i, k) in keys.iter_mut().enumerate() {
        *k = *k * (1.0 + (i % d) as f32 / 16.0) + ((i % d) % 5) as f32 * 0.3;
    }
    let values = rng.gauss(total * d);
    let k_enc = kc.encode(&keys).unwrap();
    let v_enc = vc.encode(&values).unwrap();
    let k_dec = kc.decode(&k_enc);
    let v_dec = vc.decode(&v_enc);
    let bias_all: Vec<f32> = (0..total)
        .map(|_| (rng.uniform() * 4.0 - 2.0) as f32)
        .collect();
    let mut heads = Vec::new();
    let (mut kh, mut vh, mut bh) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = 0;
    for &len in lens {
        heads.extend([first as u32, len as u32]);
        kh.push(k_dec[first * d..(first + len) * d].to_vec());
        vh.push(v_dec[first * d..(first + len) * d].to_vec());
        bh.push(bias_all[first..first + len].to_vec());
        first += len;
    }
    let q = rng.gauss(n_q * shape.n_heads * d);
    let want = reference_attention(shape, &q, n_q, &kh, &vh, with_bias.then_some(&bh[..]));

    let kg = GpuCodec::new(gpu, kc);
    let vg = GpuCodec::new(gpu, vc);
    let k_page = gpu.upload("k", &k_enc.words);
    let v_page = gpu.upload("v", &v_enc.words);
    let heads = gpu.upload("heads", &heads);
    let bias = gpu.upload("bias", &bias_all);
    let max_len = *lens.iter().max().unwrap();
    let kv = KvPages {
        k_codec: &kg,
        v_codec: &vg,
        k_page: &k_page,
        v_page: &v_page,
        capacity: total,
        heads: &heads,
        max_len,
        bias: with_bias.then_some(&bias),
        skip: 0,
        v_rotated_f32: false,
    };
    let qb = gpu.upload("q", &q);
    let out = gpu.zeros::<f32>("out", q.len());
    let mut b = gpu.batch("attention");
    decode_attention_into(
        gpu,
        &mut b,
        shape,
        std::slice::from_ref(&kv),
        &qb,
        n_q,
        &scratch,
        &out,
    )
    .unwrap();
    b.submit();
    let got = gpu.read_blocking(&out).unwrap();
    assert_rows_close(&ctx, &got, &want, d);
}

#[test]
fn compressed_domain_attention_equals_attention_over_decoded_cache() {
    for gpu in gpus() {
        for (kf, vf) in PAIRS {
            run_case(&gpu, kf, vf, &[1, 37], 1, false, false);
            run_case(&gpu, kf, vf, &[130, 77], 3, true, false);
            // The other codebook lookup (indexed loads on CPU adapters, selects on GPUs).
            run_case(&gpu, kf, vf, &[130, 77], 3, true, true);
        }
        // Split-K across workgroups (more than 512 tokens), ragged heads, bias, causal chunk.
        for (kf, vf) in [
            ("turbo3", "turbo3"),
            ("f16", "q4_0"),
            ("turbo3p", "turbo2.5"),
        ] {
            run_case(&gpu, kf, vf, &[1100, 513], 2, true, false);
        }
    }
}

/// The KV cache with full-precision sinks: tokens appended chunk by chunk, attention over the
/// compressed region plus the exact sink region equals attention over a cache whose first tokens
/// are exact and the rest decoded from the pages.
#[test]
fn cache_with_full_precision_sinks_matches_reference() {
    use kvpack::codec::{Encoded, KvFormat};
    use kvpack::kv::{KvCache, KvConfig};
    for gpu in gpus() {
        for fmt in ["turbo3/turbo2", "q8_0/turbo4", "turbo3p/turbo2.5", "f16"] {
            let shape = AttentionShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 64,
            };
            let (d, kvh, sinks, cap) = (64, 2, 4, 40);
            let format: KvFormat = fmt.parse().unwrap();
            let mut cache = KvCache::new(
                &gpu,
                KvConfig {
                    n_layer: 1,
                    n_kv_heads: kvh,
                    head_dim: d,
                    capacity: cap,
                    format,
                    layer_formats: None,
                    seed: 9,
                    sinks,
                },
            )
            .unwrap();
            let mut rng = Rng::new(77);
            let total = 12;
            let mut keys = rng.gauss(total * kvh * d);
            let mut values = rng.gauss(total * kvh * d);
            // Token 0 looks like an attention sink: large keys and values.
            keys[..kvh * d].iter_mut().for_each(|x| *x *= 30.0);
            values[..kvh * d].iter_mut().for_each(|x| *x *= 30.0);
            let status = gpu.upload("status", &[0u32, u32::MAX]);
            let mut done = 0;
            for n in [3usize, 6, 3] {
                let ctx = format!("{} {fmt} after {} tokens", gpu.backend_name(), done + n);
                let first = cache.begin_tokens(&gpu, n).unwrap();
                let kb = gpu.upload("k", &keys[first * kvh * d..(first + n) * kvh * d]);
                let vb = gpu.upload("v", &values[first * kvh * d..(first + n) * kvh * d]);
                let q = rng.gauss(n * shape.n_heads * d);
                let qb = gpu.upload("q", &q);
                let out = gpu.zeros::<f32>("out", q.len());
                let scratch = AttentionScratch::new(&gpu, shape, n, cap);
                let mut b = gpu.batch("step");
                cache
                    .append_into(&gpu, &mut b, 0, first, n, &kb, &vb, &status)
                    .unwrap();
                let regions = cache.pages(0);
                decode_attention_into(&gpu, &mut b, shape, &regions, &qb, n, &scratch, &out)
                    .unwrap();
                b.submit();
                let got = gpu.read_blocking(&out).unwrap();
                done += n;
                // Reference: exact sinks, the rest decoded from what the GPU stored.
                let main = &regions[0];
                let decode = |codec: &kvpack::codec::gpu::GpuCodec, page| {
                    let words = gpu.read_blocking(page).unwrap();
                    codec.codec().decode(&Encoded {
                        n: kvh * cap,
                        d,
                        words,
                    })
                };
                let kd = decode(main.k_codec, main.k_page);
                let vd = decode(main.v_codec, main.v_page);
                let (mut kh, mut vh) = (vec![Vec::new(); kvh], vec![Vec::new(); kvh]);
                for h in 0..kvh {
                    for t in 0..done {
                        let exact = |src: &[f32]| src[(t * kvh + h) * d..][..d].to_vec();
                        let dec = |src: &[f32]| src[(h * cap + t) * d..][..d].to_vec();
                        kh[h].extend(if t < sinks { exact(&keys) } else { dec(&kd) });
                        vh[h].extend(if t < sinks { exact(&values) } else { dec(&vd) });
                    }
                }
                let want = reference_attention(shape, &q, n, &kh, &vh, None);
                assert_rows_close(&ctx, &got, &want, d);
            }
        }
    }
}
