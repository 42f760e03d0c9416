//! The real default model end to end on every test backend: greedy tokens agree across backends
//! for the f32, turbo4 and turbo4+e1 (edge layers in q8_0) caches, perplexity of a short text is
//! sane, and the cache's bytes equal the formula. Needs data/SmolLM2-135M-Instruct.Q4_1.gguf
//! (scripts/fetch-model.sh) or KVPACK_MODEL; fails loudly without it.

mod common;

use kvpack::codec::KvFormat;
use kvpack::kv::KvRecipe;
use kvpack::model::llama::{Llama, Logits, Session};
use kvpack::model::sampler::Sampler;
use kvpack::model::{EncodeOptions, GgufFile, Tokenizer};

#[test]
fn greedy_tokens_agree_across_backends_and_bytes_match_the_formula() {
    let file = GgufFile::open(common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let prompt = tok.encode_with(
        "The capital of France is",
        EncodeOptions {
            parse_special: false,
            add_special: true,
        },
    );
    let text =
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary \
                election produced no evidence that any irregularities took place.";
    let text_ids = tok.encode_with(
        text,
        EncodeOptions {
            parse_special: false,
            add_special: true,
        },
    );
    let mut per_backend: Vec<(String, Vec<Vec<u32>>)> = Vec::new();
    for gpu in common::gpus() {
        let model = Llama::load(&gpu, &file, |_, _| {}).unwrap();
        // Weights stay in their GGUF blocks: about the file's size, far from an f32 copy.
        let w = model.weights_gpu_bytes();
        assert!(
            (90_000_000..110_000_000).contains(&w),
            "weights on GPU: {w} bytes"
        );
        let mut runs = Vec::new();
        // turbo4+e1: the first and last layer in q8_0 (per-layer formats).
        for kv in ["f32", "turbo4", "turbo4+e1"] {
            let recipe: KvRecipe = kv.parse().unwrap();
            let mut s = Session::new(&gpu, &model, &recipe, 64).unwrap();
            let mut logits = pollster::block_on(s.forward(&gpu, &prompt, Logits::Last)).unwrap();
            let mut out = Vec::new();
            for _ in 0..6 {
                let id = Sampler::greedy().sample(&logits);
                out.push(id);
                logits = pollster::block_on(s.forward(&gpu, &[id], Logits::Last)).unwrap();
            }
            // Exact bytes: every stored token, K and V, all layers and KV heads.
            let c = &model.config;
            let tokens = prompt.len() + 6;
            let want = (0..c.n_layer)
                .map(|l| {
                    let fmt: KvFormat = recipe.format_of(l, c.n_layer);
                    let bits = fmt.bits_per_value(c.head_dim) * 2.0 * c.head_dim as f64;
                    (bits * (tokens * c.n_head_kv) as f64 / 8.0).ceil() as u64
                })
                .sum::<u64>();
            assert_eq!(s.cache().bytes(), want, "{kv}");
            assert_eq!(
                s.cache().bytes_f16(),
                (2 * c.n_layer * c.n_head_kv * tokens * c.head_dim * 2) as u64
            );
            runs.push(out);
        }
        // "Paris" follows for both caches.
        let first = tok.decode(&runs[0][..2]);
        assert!(
            first.contains("Paris"),
            "{}: f32 cache continued with {first:?}",
            gpu.backend_name()
        );
        // Perplexity of a short news sentence with the f32 cache: a working model is far below
        // the vocabulary-uniform 49152 and the hundreds a broken layer gives.
        let mut s = Session::new(&gpu, &model, &"f32".parse().unwrap(), 64).unwrap();
        let logits = pollster::block_on(s.forward(&gpu, &text_ids, Logits::All)).unwrap();
        let v = logits.len() / text_ids.len();
        let mut nll = 0.0;
        for i in 0..text_ids.len() - 1 {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
            nll += lse - row[text_ids[i + 1] as usize] as f64;
        }
        let ppl = (nll / (text_ids.len() - 1) as f64).exp();
        assert!(
            (5.0..120.0).contains(&ppl),
            "{}: ppl {ppl}",
            gpu.backend_name()
        );
        per_backend.push((gpu.backend_name().to_string(), runs));
    }
    for (name, runs) in &per_backend[1..] {
        assert_eq!(
            runs, &per_backend[0].1,
            "greedy tokens on {name} differ from {}",
            per_backend[0].0
        );
    }
}
