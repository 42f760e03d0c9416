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

fn run_case(
    gpu: &kvpack::gpu::Gpu,
    kf: &str,
    vf: &str,
    lens: &[usize],
    n_q: usize,
    with_bias: bool,
) {
    let shape = AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
    };
    let d = shape.head_dim;
    let ctx = format!(
        "{} K={kf} V={vf} lens={lens:?} n_q={n_q} bias={with_bias}",
        gpu.backend_name()
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
    };
    let qb = gpu.upload("q", &q);
    let out = gpu.zeros::<f32>("out", q.len());
    let scratch = AttentionScratch::new(gpu, shape, n_q, max_len);
    let mut b = gpu.batch("attention");
    decode_attention_into(gpu, &mut b, shape, &kv, &qb, n_q, &scratch, &out).unwrap();
    b.submit();
    let got = gpu.read_blocking(&out).unwrap();
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

#[test]
fn compressed_domain_attention_equals_attention_over_decoded_cache() {
    for gpu in gpus() {
        for (kf, vf) in PAIRS {
            run_case(&gpu, kf, vf, &[1, 37], 1, false);
            run_case(&gpu, kf, vf, &[130, 77], 3, true);
        }
        // Split-K across workgroups (more than 512 tokens), ragged heads, bias, causal chunk.
        for (kf, vf) in [
            ("turbo3", "turbo3"),
            ("f16", "q4_0"),
            ("turbo3p", "turbo2.5"),
        ] {
            run_case(&gpu, kf, vf, &[1100, 513], 2, true);
        }
    }
}
