//! A KV cache loaded with ragged heads (each layer and KV head its own token count, as a
//! compaction with per-head budgets leaves it): attention over it equals the CPU reference over
//! each head's own tokens, with per-head biases, through later appends; its byte counts are the
//! heads' own tokens, exactly; what it refuses.

mod common;

use common::{gpus, max_abs_diff, Rng};
use kvpack::attention::{
    decode_attention_into, reference_attention, AttentionScratch, AttentionShape,
};
use kvpack::codec::KvFormat;
use kvpack::kv::{HeadTokens, KvCache, KvConfig};

const SHAPE: AttentionShape = AttentionShape {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 64,
};
const SINKS: usize = 2;
const CAP: usize = 48;
/// Tokens kept per layer and KV head: a head of exactly the sinks, a head of one more, the
/// longest (20) in both layers' different heads.
const LENS: [[usize; 2]; 3] = [[20, 13], [2, 20], [3, 9]];

/// Append `n` tokens (keys `k`, values `v`: n × KV heads × d) to every layer of `cache` and
/// attend with queries `q` in one batch; the status word must stay 0. Returns each layer's
/// output.
fn append_and_attend(
    gpu: &kvpack::gpu::Gpu,
    cache: &mut KvCache,
    n: usize,
    k: &[f32],
    v: &[f32],
    q: &[f32],
) -> Vec<Vec<f32>> {
    let status = gpu.upload("status", &[0u32, u32::MAX]);
    let first = cache.begin_tokens(gpu, n).unwrap();
    let (kb, vb, qb) = (gpu.upload("k", k), gpu.upload("v", v), gpu.upload("q", q));
    let scratch = AttentionScratch::new(gpu, SHAPE, n, CAP);
    let outs: Vec<_> = (0..LENS.len())
        .map(|_| gpu.zeros::<f32>("out", q.len()))
        .collect();
    let mut b = gpu.batch("step");
    for (l, out) in outs.iter().enumerate() {
        cache
            .append_into(gpu, &mut b, l, first, n, &kb, &vb, &status)
            .unwrap();
        let regions = cache.pages(l);
        decode_attention_into(gpu, &mut b, SHAPE, &regions, &qb, n, &scratch, out).unwrap();
    }
    b.submit();
    assert_eq!(gpu.read_blocking(&status).unwrap()[0], 0);
    outs.iter().map(|o| gpu.read_blocking(o).unwrap()).collect()
}

fn config(format: &str) -> KvConfig {
    KvConfig {
        n_layer: LENS.len(),
        n_kv_heads: SHAPE.n_kv_heads,
        head_dim: SHAPE.head_dim,
        capacity: CAP,
        format: format.parse().unwrap(),
        layer_formats: None,
        seed: 5,
        sinks: SINKS,
        recent: 0,
        center_keys: false,
    }
}

fn f16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&y| half::f16::from_f32(y).to_f32()).collect()
}

/// Keys, values and biases per layer and head.
type Heads = Vec<Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>>;

fn ragged_heads(rng: &mut Rng) -> Heads {
    let d = SHAPE.head_dim;
    LENS.iter()
        .map(|layer| {
            layer
                .iter()
                .map(|&t| {
                    let mut k = rng.gauss(t * d);
                    // Large first keys: the sinks matter to every query.
                    k[..d].iter_mut().for_each(|x| *x *= 4.0);
                    let v = rng.gauss(t * d);
                    let b: Vec<f32> = (0..t).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect();
                    (k, v, b)
                })
                .collect()
        })
        .collect()
}

fn load(gpu: &kvpack::gpu::Gpu, cache: &mut KvCache, heads: &Heads, biased: bool) {
    let status = gpu.upload("status", &[0u32, u32::MAX]);
    let tokens: Vec<Vec<HeadTokens>> = heads
        .iter()
        .map(|l| {
            l.iter()
                .map(|(k, v, _)| HeadTokens { keys: k, values: v })
                .collect()
        })
        .collect();
    cache.load_ragged(gpu, &tokens, &status).unwrap();
    if biased {
        for (l, layer) in heads.iter().enumerate() {
            let b: Vec<&[f32]> = layer.iter().map(|(_, _, b)| &b[..]).collect();
            cache.set_bias(gpu, l, &b).unwrap();
        }
    }
    assert_eq!(gpu.read_blocking(&status).unwrap()[0], 0);
}

#[test]
fn ragged_heads_attend_to_their_own_tokens() {
    let d = SHAPE.head_dim;
    let kvh = SHAPE.n_kv_heads;
    for gpu in gpus() {
        let mut rng = Rng::new(31);
        let mut heads = ragged_heads(&mut rng);
        let mut cache = KvCache::new(&gpu, config("f32")).unwrap();
        load(&gpu, &mut cache, &heads, true);
        assert!(cache.is_ragged());
        assert_eq!(cache.len(), 20);
        for (l, layer) in LENS.iter().enumerate() {
            for (h, &t) in layer.iter().enumerate() {
                assert_eq!(cache.head_len(l, h), t);
            }
        }
        // Appends of several tokens (a prompt chunk) and of one (decoding), every head continuing
        // after its own tokens.
        for n in [5usize, 1, 3] {
            let ctx = format!("{} after {} appended", gpu.backend_name(), n);
            let k_new = rng.gauss(n * kvh * d);
            let v_new = rng.gauss(n * kvh * d);
            let q = rng.gauss(n * SHAPE.n_heads * d);
            let outs = append_and_attend(&gpu, &mut cache, n, &k_new, &v_new, &q);
            for (l, out) in outs.iter().enumerate() {
                let layer = &mut heads[l];
                for (h, (k, v, bias)) in layer.iter_mut().enumerate() {
                    for i in 0..n {
                        k.extend_from_slice(&k_new[(i * kvh + h) * d..][..d]);
                        v.extend_from_slice(&v_new[(i * kvh + h) * d..][..d]);
                        bias.push(0.0);
                    }
                }
                // The sinks are read from f16 copies.
                let keys: Vec<Vec<f32>> = layer
                    .iter()
                    .map(|(k, _, _)| [f16_round(&k[..SINKS * d]), k[SINKS * d..].to_vec()].concat())
                    .collect();
                let values: Vec<Vec<f32>> = layer
                    .iter()
                    .map(|(_, v, _)| [f16_round(&v[..SINKS * d]), v[SINKS * d..].to_vec()].concat())
                    .collect();
                let bias: Vec<Vec<f32>> = layer.iter().map(|(_, _, b)| b.clone()).collect();
                let want = reference_attention(SHAPE, &q, n, &keys, &values, Some(&bias));
                for (r, (g, w)) in out.chunks(d).zip(want.chunks(d)).enumerate() {
                    let diff = max_abs_diff(g, w);
                    assert!(diff < 1e-4, "{ctx}: layer {l} row {r} differs by {diff}");
                }
            }
        }
    }
}

#[test]
fn ragged_bytes_count_each_heads_own_tokens() {
    let d = SHAPE.head_dim;
    let gpu = &gpus()[0];
    for format in ["f32", "turbo3", "turbo4/turbo2"] {
        let f: KvFormat = format.parse().unwrap();
        let bits = (f.k.bits_per_value(d) + f.v.bits_per_value(d)) * d as f64;
        let mut rng = Rng::new(8);
        let heads = ragged_heads(&mut rng);
        let mut cache = KvCache::new(gpu, config(format)).unwrap();
        load(gpu, &mut cache, &heads, false);
        // Tokens past the sinks in the pages, per layer; f16 sinks; biases of layer 1 only.
        let bytes = |extra: usize, biased: usize| -> u64 {
            let paged: u64 = LENS
                .iter()
                .map(|layer| {
                    let tokens: usize = layer.iter().map(|&t| t + extra - SINKS).sum();
                    (bits * tokens as f64 / 8.0).ceil() as u64
                })
                .sum();
            let sinks = (LENS.len() * SHAPE.n_kv_heads * SINKS * 2 * d * 2) as u64;
            paged + sinks + 4 * biased as u64
        };
        let own: usize = LENS.iter().flatten().sum();
        assert_eq!(cache.stored_tokens(), own, "{format}");
        assert_eq!(cache.bytes(), bytes(0, 0), "{format}");
        assert_eq!(cache.bias_bytes(), 0);
        assert_eq!(cache.bytes_f16(), (own * 2 * d * 2) as u64, "{format}");
        let b: Vec<&[f32]> = heads[1].iter().map(|(_, _, b)| &b[..]).collect();
        cache.set_bias(gpu, 1, &b).unwrap();
        let biased = LENS[1][0] + LENS[1][1];
        assert_eq!(cache.bias_bytes(), 4 * biased as u64);
        assert_eq!(cache.bytes(), bytes(0, biased), "{format}");
        // Three appended tokens count three more in every head.
        let n = 3;
        let status = gpu.upload("status", &[0u32, u32::MAX]);
        let first = cache.begin_tokens(gpu, n).unwrap();
        let kb = gpu.upload("k", &rng.gauss(n * SHAPE.n_kv_heads * d));
        let vb = gpu.upload("v", &rng.gauss(n * SHAPE.n_kv_heads * d));
        let mut batch = gpu.batch("append");
        for l in 0..LENS.len() {
            cache
                .append_into(gpu, &mut batch, l, first, n, &kb, &vb, &status)
                .unwrap();
        }
        batch.submit();
        let own = own + LENS.len() * SHAPE.n_kv_heads * n;
        assert_eq!(cache.stored_tokens(), own);
        assert_eq!(cache.bytes(), bytes(n, biased), "{format}");
        assert_eq!(cache.bytes_f16(), (own * 2 * d * 2) as u64);
        let bpv = 8.0 * cache.bytes() as f64 / (2 * own * d) as f64;
        assert!((cache.bits_per_value() - bpv).abs() < 1e-12);
        // Cleared, the cache is an ordinary one again.
        cache.clear(gpu);
        assert!(!cache.is_ragged());
        assert_eq!((cache.bytes(), cache.stored_tokens()), (0, 0));
    }
}

#[test]
fn ragged_loads_refuse_what_they_cannot_hold() {
    let d = SHAPE.head_dim;
    let gpu = &gpus()[0];
    let status = gpu.upload("status", &[0u32, u32::MAX]);
    let x = vec![0.5f32; 60 * d];
    let head = |t: usize| HeadTokens {
        keys: &x[..t * d],
        values: &x[..t * d],
    };
    let tokens = |lens: [[usize; 2]; 3]| -> Vec<Vec<HeadTokens>> {
        lens.iter()
            .map(|l| l.iter().map(|&t| head(t)).collect())
            .collect()
    };
    let err = |lens: [[usize; 2]; 3]| {
        let mut cache = KvCache::new(gpu, config("turbo3")).unwrap();
        cache
            .load_ragged(gpu, &tokens(lens), &status)
            .unwrap_err()
            .to_string()
    };
    // A head with fewer tokens than the sinks, when heads differ.
    let e = err([[5, 1], [5, 5], [5, 5]]);
    assert!(
        e.contains("layer 0 head 1 keeps 1 tokens") && e.contains("2 attention sinks"),
        "{e}"
    );
    // More than the capacity.
    let e = err([[5, 5], [CAP + 1, 5], [5, 5]]);
    assert!(e.contains("holds 48 tokens"), "{e}");
    // A non-empty cache.
    let mut cache = KvCache::new(gpu, config("turbo3")).unwrap();
    cache.begin_tokens(gpu, 1).unwrap();
    let e = cache
        .load_ragged(gpu, &tokens(LENS), &status)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty cache"), "{e}");
    // Fewer layers than the cache has.
    let mut cache = KvCache::new(gpu, config("turbo3")).unwrap();
    let e = cache
        .load_ragged(gpu, &tokens(LENS)[..2], &status)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 layers"), "{e}");
    // Every head as short as the others, below the sinks: an ordinary uniform load.
    let mut cache = KvCache::new(gpu, config("turbo3")).unwrap();
    cache
        .load_ragged(gpu, &tokens([[1, 1], [1, 1], [1, 1]]), &status)
        .unwrap();
    assert!(!cache.is_ragged());
    assert_eq!(cache.len(), 1);
}

/// In a quantized format the ragged cache attends like a uniform cache holding the same vectors
/// (each vector is encoded alone, wherever its slot) where each short head's missing tokens are
/// replaced by filler tokens of bias −30 (no attention weight).
#[test]
fn ragged_heads_match_masked_uniform_heads_in_quantized_formats() {
    let d = SHAPE.head_dim;
    let kvh = SHAPE.n_kv_heads;
    let tmax = 20;
    for gpu in gpus() {
        for format in ["turbo4", "turbo3/turbo2", "q8_0/turbo4"] {
            let ctx = format!("{} {format}", gpu.backend_name());
            let mut rng = Rng::new(12);
            let ragged = ragged_heads(&mut rng);
            // The same tokens, each short head filled up after its sinks.
            let uniform: Heads = ragged
                .iter()
                .map(|layer| {
                    layer
                        .iter()
                        .map(|(k, v, b)| {
                            let fill = tmax - b.len();
                            let filler = rng.gauss(fill * d);
                            let cat =
                                |x: &[f32]| [&x[..SINKS * d], &filler, &x[SINKS * d..]].concat();
                            let bias = [&b[..SINKS], &vec![-30.0; fill], &b[SINKS..]].concat();
                            (cat(k), cat(v), bias)
                        })
                        .collect()
                })
                .collect();
            let mut outs = Vec::new();
            for heads in [&ragged, &uniform] {
                let mut cache = KvCache::new(&gpu, config(format)).unwrap();
                load(&gpu, &mut cache, heads, true);
                let mut rng = Rng::new(99);
                let mut got = Vec::new();
                for n in [4usize, 1] {
                    let k = rng.gauss(n * kvh * d);
                    let v = rng.gauss(n * kvh * d);
                    let q = rng.gauss(n * SHAPE.n_heads * d);
                    got.extend(append_and_attend(&gpu, &mut cache, n, &k, &v, &q));
                }
                outs.push(got);
            }
            for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(diff < 1e-4, "{ctx}: output {i} differs by {diff}");
            }
        }
    }
}

/// Tokens appended in one step: count, keys, values, queries.
type Step = (usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// Random keys, values and queries for appends of `ns` tokens each.
fn random_steps(rng: &mut Rng, ns: &[usize]) -> Vec<Step> {
    let (d, kvh) = (SHAPE.head_dim, SHAPE.n_kv_heads);
    ns.iter()
        .map(|&n| {
            let k = rng.gauss(n * kvh * d);
            let v = rng.gauss(n * kvh * d);
            let q = rng.gauss(n * SHAPE.n_heads * d);
            (n, k, v, q)
        })
        .collect()
}

/// Per-layer formats (`KvConfig::layer_formats`, a recipe's edge layers): each layer stores,
/// attends and counts its bytes exactly as a cache of that layer's format does.
#[test]
fn per_layer_formats_attend_and_count_as_their_own_format() {
    let d = SHAPE.head_dim;
    let formats = ["q8_0", "turbo4u", "turbo3/turbo2"];
    for gpu in gpus() {
        let mut rng = Rng::new(21);
        let heads = ragged_heads(&mut rng);
        let steps = random_steps(&mut rng, &[4, 1]);
        let run = |config: KvConfig| {
            let mut cache = KvCache::new(&gpu, config).unwrap();
            load(&gpu, &mut cache, &heads, true);
            let outs: Vec<Vec<Vec<f32>>> = steps
                .iter()
                .map(|(n, k, v, q)| append_and_attend(&gpu, &mut cache, *n, k, v, q))
                .collect();
            (outs, cache.bytes())
        };
        let mixed = run(KvConfig {
            layer_formats: Some(formats.iter().map(|f| f.parse().unwrap()).collect()),
            ..config("turbo2")
        });
        // Paged bytes of `layer`'s heads (5 tokens appended to each) in `f`.
        let paged = |f: &str, layer: &[usize; 2]| {
            let f: KvFormat = f.parse().unwrap();
            let bits = (f.k.bits_per_value(d) + f.v.bits_per_value(d)) * d as f64;
            let tokens: usize = layer.iter().map(|&t| t + 5 - SINKS).sum();
            (bits * tokens as f64 / 8.0).ceil() as u64
        };
        let (mut pages, mut rest) = (0, None);
        for (l, f) in formats.iter().enumerate() {
            let (own, own_bytes) = run(config(f));
            for (step, (m, o)) in mixed.0.iter().zip(&own).enumerate() {
                assert_eq!(
                    m[l],
                    o[l],
                    "{}: layer {l} ({f}), step {step}",
                    gpu.backend_name()
                );
            }
            // Sinks and biases: the same bytes in every format.
            let r = own_bytes - LENS.iter().map(|layer| paged(f, layer)).sum::<u64>();
            assert_eq!(*rest.get_or_insert(r), r, "{f}");
            pages += paged(f, &LENS[l]);
        }
        assert_eq!(mixed.1, rest.unwrap() + pages);
    }
}

/// A window of recent tokens after a ragged load holds only the tokens appended since (every
/// loaded token is in the pages): with f16 pages, which store what the window stores, attention
/// and bytes equal a cache without a window, through appends that move tokens out of it.
#[test]
fn a_window_after_a_ragged_load_holds_only_the_appended_tokens() {
    let d = SHAPE.head_dim;
    let kvh = SHAPE.n_kv_heads;
    for gpu in gpus() {
        let mut rng = Rng::new(44);
        let heads = ragged_heads(&mut rng);
        let steps = random_steps(&mut rng, &[3, 1, 5, 1, 2]);
        let run = |recent: usize| {
            let mut cache = KvCache::new(
                &gpu,
                KvConfig {
                    recent,
                    ..config("f16")
                },
            )
            .unwrap();
            load(&gpu, &mut cache, &heads, true);
            assert_eq!(cache.window_bytes(), 0);
            let mut out = Vec::new();
            let mut bytes = Vec::new();
            for (n, k, v, q) in &steps {
                out.push(append_and_attend(&gpu, &mut cache, *n, k, v, q));
                bytes.push(cache.bytes());
            }
            (out, bytes, cache.window_bytes())
        };
        let (plain, plain_bytes, _) = run(0);
        let (windowed, windowed_bytes, window) = run(4);
        // After 12 appended tokens the window holds the last 4.
        assert_eq!(window, (LENS.len() * kvh * 4 * 2 * d * 2) as u64);
        assert_eq!(windowed_bytes, plain_bytes);
        for (s, (a, b)) in windowed.iter().zip(&plain).enumerate() {
            for (l, (x, y)) in a.iter().zip(b).enumerate() {
                let diff = max_abs_diff(x, y);
                assert!(
                    diff < 1e-4,
                    "{}: step {s} layer {l} differs by {diff}",
                    gpu.backend_name()
                );
            }
        }
    }
}
