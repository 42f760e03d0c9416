//! Attention on the compressed cache (GPU) equals attention over the CPU-decoded cache, for every
//! kind of K/V format pair, GQA, ragged heads, causal chunks, split-K and per-key bias.

mod common;

use common::{gpus, Rng};
use kvpack::attention::{
    decode_attention_into, reference_attention, AttentionScratch, AttentionShape, KvPages, Recent,
    ValueStore,
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

#[allow(clippy::too_many_arguments)]
fn run_case(
    gpu: &kvpack::gpu::Gpu,
    kf: &str,
    vf: &str,
    lens: &[usize],
    n_q: usize,
    with_bias: bool,
    flip_codebook_selects: bool,
    group: usize,
    share_kv_heads: bool,
    prompt_rows: bool,
) {
    let shape = AttentionShape {
        n_heads: 2 * group,
        n_kv_heads: 2,
        head_dim: 64,
    };
    let d = shape.head_dim;
    let mut scratch = AttentionScratch::new(gpu, shape, n_q, *lens.iter().max().unwrap());
    scratch.codebook_selects ^= flip_codebook_selects;
    scratch.share_kv_heads = share_kv_heads;
    scratch.prompt_rows &= prompt_rows;
    let ctx = format!(
        "{} K={kf} V={vf} lens={lens:?} n_q={n_q} bias={with_bias} codebook_selects={} \
         group={group} share_kv_heads={share_kv_heads} prompt_rows={}",
        gpu.backend_name(),
        scratch.codebook_selects,
        scratch.prompt_rows
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
        values: ValueStore::Codes,
        ring: 0,
        recent: Recent::All,
        center: None,
        appended: 0,
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
            run_case(&gpu, kf, vf, &[1, 37], 1, false, false, 2, true, true);
            run_case(&gpu, kf, vf, &[130, 77], 3, true, false, 2, true, true);
            // The other codebook lookup (indexed loads on CPU adapters, selects on GPUs).
            run_case(&gpu, kf, vf, &[130, 77], 3, true, true, 2, true, true);
            // The default model's group of 3 query heads per KV head, shared and one by one.
            run_case(&gpu, kf, vf, &[130, 77], 2, false, false, 3, true, true);
            run_case(&gpu, kf, vf, &[130, 77], 2, false, false, 3, false, true);
        }
        // Split-K across workgroups (more than 512 tokens), ragged heads, bias, causal chunk.
        for (kf, vf) in [
            ("turbo3", "turbo3"),
            ("f16", "q4_0"),
            ("turbo3p", "turbo2.5"),
        ] {
            run_case(&gpu, kf, vf, &[1100, 513], 2, true, false, 3, true, true);
            // A prefill chunk of 64 positions, as the model records it.
            run_case(&gpu, kf, vf, &[600, 300], 64, false, false, 3, true, true);
        }
    }
}

/// The prompt-row kernel of CPU adapters (plain f32/f16 keys and values, tiles bound as uniform
/// buffers) equals the reference, and the split-K kernel it replaces: chunks of 2, 7 and 64
/// positions, ragged heads over several tiles (256 f32 or 512 f16 tokens) that end mid-tile, bias.
#[test]
fn prompt_row_attention_matches_reference() {
    for gpu in gpus() {
        let cpu = gpu.report().device_type == "Cpu";
        let scratch = AttentionScratch::new(&gpu, SHAPE3, 2, 16);
        assert_eq!(
            scratch.prompt_rows, cpu,
            "on by default on CPU adapters only"
        );
        for (kf, vf) in [
            ("f32", "f32"),
            ("f16", "f16"),
            ("f32", "f16"),
            ("f16", "f32"),
        ] {
            for rows in [true, false] {
                run_case(&gpu, kf, vf, &[300, 77], 2, false, false, 3, true, rows);
                run_case(&gpu, kf, vf, &[1100, 513], 7, true, false, 3, true, rows);
                run_case(&gpu, kf, vf, &[600, 1030], 64, true, false, 3, true, rows);
            }
            run_case(&gpu, kf, vf, &[5, 257], 64, false, false, 2, true, true);
            run_case(&gpu, kf, vf, &[513, 40], 3, true, false, 1, true, true);
        }
    }
}

const SHAPE3: AttentionShape = AttentionShape {
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
};

/// The KV cache with f16 sinks, an f16 window of recent tokens (a ring that wraps) and centered
/// keys: tokens appended chunk by chunk, attention over all regions under one softmax equals, for
/// every query, attention over a cache whose sinks and last `recent` tokens before the query are
/// the stored f16 copies and whose other tokens are decoded from the pages (keys un-centered with
/// the stored means, which equal the CPU means of the first append past the sinks).
#[test]
fn cache_with_sinks_window_and_centered_keys_matches_reference() {
    use kvpack::codec::{unrotate, Encoded, KvFormat};
    use kvpack::kv::{KvCache, KvConfig, MAX_APPEND};
    let shape = AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
    };
    let (d, kvh, cap) = (64, 2, 96);
    // (sinks, recent, centered keys)
    let configs = [(4, 0, false), (4, 5, true), (0, 3, true), (2, 70, false)];
    for gpu in gpus() {
        for fmt in ["turbo3/turbo2", "q8_0/turbo4", "turbo3p/f16", "f32/f16"] {
            for &(sinks, recent, center_keys) in &configs {
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
                        recent,
                        center_keys,
                    },
                )
                .unwrap();
                let ring = recent + MAX_APPEND;
                let mut rng = Rng::new(77);
                let total = 80;
                let mut keys = rng.gauss(total * kvh * d);
                let mut values = rng.gauss(total * kvh * d);
                // Token 0 looks like an attention sink: large keys and values; every key has an
                // offset that centering removes.
                keys[..kvh * d].iter_mut().for_each(|x| *x *= 30.0);
                values[..kvh * d].iter_mut().for_each(|x| *x *= 30.0);
                for (i, x) in keys.iter_mut().enumerate() {
                    *x += ((i % d) as f32 * 0.37).sin() * 3.0;
                }
                let status = gpu.upload("status", &[0u32, u32::MAX]);
                let mut done = 0;
                for n in [3usize, 6, 3, 60, 1, 7] {
                    let ctx = format!(
                        "{} {fmt} sinks {sinks} recent {recent} centered {center_keys} after {} tokens",
                        gpu.backend_name(),
                        done + n
                    );
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
                    assert_eq!(gpu.read_blocking(&status).unwrap()[0], 0, "{ctx}");

                    // The stored means equal the CPU means of the first append past the sinks.
                    let mean = match cache.key_mean(0) {
                        Some(m) => gpu.read_blocking(m).unwrap(),
                        None => vec![0.0; kvh * d],
                    };
                    if center_keys && done > sinks {
                        let (from, to) = if sinks < 3 { (sinks, 3) } else { (4, 9) };
                        for (g, m) in mean.iter().enumerate() {
                            let want: f32 = (from..to).map(|t| keys[t * kvh * d + g]).sum::<f32>()
                                / (to - from) as f32;
                            assert!(
                                (m - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{ctx}: mean {g}"
                            );
                        }
                    }
                    // Pages as the GPU stored them, decoded on the CPU.
                    let decode = |codec: &Codec, page: &kvpack::gpu::GpuVec<u32>, n: usize| {
                        let words = gpu.read_blocking(page).unwrap();
                        codec.decode(&Encoded { n, d, words })
                    };
                    let main = &regions[0];
                    let kd = decode(main.k_codec.codec(), main.k_page, kvh * cap);
                    let vd = decode(main.v_codec.codec(), main.v_page, kvh * cap);
                    let f16 = Codec::with_seed(VecFormat::F16, d, 0).unwrap();
                    let v_signs = main.v_codec.codec().signs(0).map(|s| s.to_vec());
                    // An exact region's tokens: f16 keys; f16 values in the value codec's rotated
                    // domain, rotated back.
                    let exact = |r: Option<&KvPages>, slots: usize| match r {
                        None => (Vec::new(), Vec::new()),
                        Some(r) => {
                            assert_eq!(r.values, ValueStore::RotatedF16);
                            let k = decode(&f16, r.k_page, slots);
                            let mut v = decode(&f16, r.v_page, slots);
                            if let Some(signs) = &v_signs {
                                for y in v.chunks_mut(d) {
                                    let x = unrotate(signs, y);
                                    y.copy_from_slice(&x);
                                }
                            }
                            (k, v)
                        }
                    };
                    // The pages hold what the cache was given, once each token past the sinks
                    // has entered them: quantized on write or, with a window, from the window's
                    // f16 copy as it left (keys as stored there, values in the rotated domain).
                    let paged = sinks + cache.paged_len();
                    assert_eq!(
                        paged,
                        (first + n).saturating_sub(recent).max(sinks),
                        "{ctx}: tokens in the pages"
                    );
                    let round = |x: Vec<f32>| -> Vec<f32> {
                        x.iter().map(|&y| half::f16::from_f32(y).to_f32()).collect()
                    };
                    let (mut words, mut mismatched) = (0usize, 0usize);
                    for (codec, page, xs, centered) in [
                        (main.k_codec.codec(), main.k_page, &keys, true),
                        (main.v_codec.codec(), main.v_page, &values, false),
                    ] {
                        let stored = Encoded {
                            n: kvh * cap,
                            d,
                            words: gpu.read_blocking(page).unwrap(),
                        };
                        let cw = codec.code_words();
                        for h in 0..kvh {
                            for t in sinks..paged {
                                let mut x = xs[(t * kvh + h) * d..][..d].to_vec();
                                if centered {
                                    for (x, m) in x.iter_mut().zip(&mean[h * d..(h + 1) * d]) {
                                        *x -= m;
                                    }
                                }
                                if recent > 0 {
                                    x = if centered {
                                        round(x)
                                    } else {
                                        codec.unrotate_output(&round(codec.to_rotated(&x)))
                                    };
                                }
                                let want = codec.encode(&x).unwrap();
                                let slot = h * cap + t;
                                words += cw;
                                mismatched += (0..cw)
                                    .filter(|&w| stored.words[slot * cw + w] != want.words[w])
                                    .count();
                                for k in 0..codec.scale_halves() {
                                    let (g, c) = (
                                        codec.scale_of(&stored, slot, k),
                                        codec.scale_of(&want, 0, k),
                                    );
                                    assert!(
                                        (g - c).abs() <= 1e-3 * c.abs() + 1e-7,
                                        "{ctx}: position {t} head {h} scale {k}: {g} vs {c}"
                                    );
                                }
                            }
                        }
                    }
                    assert!(
                        mismatched * 1000 <= words,
                        "{ctx}: {mismatched} of {words} page code words differ from the CPU encode"
                    );
                    let sink_r = regions
                        .iter()
                        .find(|r| r.ring == 0 && r.skip == 0 && sinks > 0);
                    let win_r = regions.iter().find(|r| r.ring > 0);
                    let (sk, sv) = exact(sink_r, kvh * sinks);
                    let (wk, wv) = exact(win_r, kvh * ring);
                    for qi in 0..n {
                        let pos = first + qi;
                        let (mut kh, mut vh) = (vec![Vec::new(); kvh], vec![Vec::new(); kvh]);
                        for h in 0..kvh {
                            for t in 0..=pos {
                                let (k, v) = if t < sinks {
                                    let at = (h * sinks + t) * d;
                                    (sk[at..at + d].to_vec(), sv[at..at + d].to_vec())
                                } else if recent > 0 && t + recent >= pos {
                                    // The window keeps keys as the pages do: centered or not.
                                    let at = (h * ring + t % ring) * d;
                                    let k: Vec<f32> = wk[at..at + d]
                                        .iter()
                                        .zip(&mean[h * d..(h + 1) * d])
                                        .map(|(x, m)| x + m)
                                        .collect();
                                    (k, wv[at..at + d].to_vec())
                                } else {
                                    let at = (h * cap + t) * d;
                                    let k: Vec<f32> = kd[at..at + d]
                                        .iter()
                                        .zip(&mean[h * d..(h + 1) * d])
                                        .map(|(x, m)| x + m)
                                        .collect();
                                    (k, vd[at..at + d].to_vec())
                                };
                                kh[h].extend(k);
                                vh[h].extend(v);
                            }
                        }
                        let qrow = &q[qi * shape.n_heads * d..(qi + 1) * shape.n_heads * d];
                        let want = reference_attention(shape, qrow, 1, &kh, &vh, None);
                        let grow = &got[qi * shape.n_heads * d..(qi + 1) * shape.n_heads * d];
                        assert_rows_close(&format!("{ctx} query {pos}"), grow, &want, d);
                    }
                }
            }
        }
    }
}

/// The bytes of a preset's cache are the formula of docs/formats.md: codes and scales of every
/// token, f16 keys and values of the sinks and of the recent window, f32 key means.
#[test]
fn preset_cache_bytes_equal_formula() {
    use kvpack::kv::{KvCache, KvConfig, KvRecipe};
    let (n_layer, kvh, d, cap) = (2, 3, 64, 200);
    for gpu in gpus() {
        for name in ["tq3", "tq4"] {
            let r: KvRecipe = name.parse().unwrap();
            let mut cache = KvCache::new(
                &gpu,
                KvConfig {
                    n_layer,
                    n_kv_heads: kvh,
                    head_dim: d,
                    capacity: cap,
                    format: r.format,
                    layer_formats: None,
                    seed: 1,
                    sinks: r.sinks,
                    recent: r.recent,
                    center_keys: r.center_keys,
                },
            )
            .unwrap();
            assert_eq!(cache.bytes(), 0);
            // turbo{b} (any scale mode): b·d/8 bytes of codes and one f16 scale per vector.
            let vector_bytes = |f: kvpack::codec::VecFormat| match f {
                kvpack::codec::VecFormat::Turbo { bits, .. } => bits as usize * d / 8 + 2,
                other => panic!("{name}: add {other} to the formula"),
            };
            let per_token = vector_bytes(r.format.k) + vector_bytes(r.format.v);
            let mut rng = Rng::new(5);
            let status = gpu.upload("status", &[0u32, u32::MAX]);
            let mut len = 0;
            for n in [1usize, 2, 64, 40] {
                let first = cache.begin_tokens(&gpu, n).unwrap();
                let k = gpu.upload("k", &rng.gauss(n * kvh * d));
                let v = gpu.upload("v", &rng.gauss(n * kvh * d));
                let mut b = gpu.batch("append");
                for l in 0..n_layer {
                    cache
                        .append_into(&gpu, &mut b, l, first, n, &k, &v, &status)
                        .unwrap();
                }
                b.submit();
                len += n;
                // Each token once: sinks and the window's `recent` newest in f16, the rest in
                // the pages (a token enters them as it leaves the window).
                let exact_tokens = len.min(r.sinks) + r.recent.min(len.saturating_sub(r.sinks));
                let paged_tokens = len - exact_tokens;
                assert_eq!(cache.paged_len(), paged_tokens, "{name} after {len} tokens");
                let means = if r.center_keys && len > r.sinks {
                    kvh * d * 4
                } else {
                    0
                };
                let want = n_layer
                    * (kvh * paged_tokens * per_token + kvh * exact_tokens * 2 * d * 2 + means);
                assert_eq!(cache.bytes(), want as u64, "{name} after {len} tokens");
                let values = 2 * n_layer * kvh * len * d;
                assert_eq!(cache.bits_per_value(), 8.0 * want as f64 / values as f64);
            }
        }
    }
}
