//! Compaction on the real default model, short contexts: a session loaded from a "compaction"
//! that keeps every token continues exactly like the session that read the context; a compacted
//! session continues at the original position with its biases in the cache and its bytes
//! counted; capture shapes. Needs data/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-model.sh)
//! or KVPACK_MODEL.

mod common;

use kvpack::codec::KvFormat;
use kvpack::compact::{
    compact_context, CompactedContext, ContextShape, FitFor, FitOptions, HeadBudgets,
    HeadCompaction, Job, Method, SavedContext, Selection, StoredContext, BUDGET_FACTORS,
    MIN_HEAD_TOKENS,
};
use kvpack::kv::KvRecipe;
use kvpack::model::llama::{Llama, Logits, Session};
use kvpack::model::{GgufFile, Tokenizer};

#[test]
fn compacted_sessions_continue_from_the_context() {
    let file = GgufFile::open(common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let ids = common::jury_tokens(&tok);
    let (context, next) = ids.split_at(ids.len() - 4);
    let f32_fmt: KvFormat = "f32".parse().unwrap();
    let sha = kvpack::model::fetch::sha256_file(&common::model_path()).unwrap();
    let shared = std::env::temp_dir().join(format!("kvpack-e2e-{}.kvpack", std::process::id()));
    let mut shared_tokens: Vec<(String, Vec<u32>)> = Vec::new();
    for gpu in common::gpus() {
        let model = Llama::load(&gpu, &file, |_, _| {}).unwrap();
        let c = model.config.clone();
        let t = context.len();
        let mut s = Session::new(&gpu, &model, &KvRecipe::plain(f32_fmt, 4), 2 * t + 8).unwrap();
        s.start_capture(&gpu, true);
        pollster::block_on(s.forward(&gpu, context, Logits::Last)).unwrap();
        let cap = s.take_capture().unwrap();
        assert_eq!(cap.tokens, t);
        assert_eq!(cap.q[0].len(), t * c.n_head * c.head_dim);
        assert_eq!(cap.k[c.n_layer - 1].len(), t * c.n_head_kv * c.head_dim);
        let want = pollster::block_on(s.forward(&gpu, next, Logits::All)).unwrap();

        // Every token kept, β = 0: the same logits as the session that read the context.
        let d = c.head_dim;
        let gather = |x: &[f32], h: usize| -> Vec<f32> {
            (0..t)
                .flat_map(|p| &x[(p * c.n_head_kv + h) * d..][..d])
                .copied()
                .collect()
        };
        let all: Vec<usize> = (0..t).collect();
        let full = CompactedContext {
            context_len: t,
            head_dim: d,
            layers: (0..c.n_layer)
                .map(|l| {
                    (0..c.n_head_kv)
                        .map(|h| {
                            let (k, v) = (gather(&cap.k[l], h), gather(&cap.v[l], h));
                            HeadCompaction::keep(&k, &v, d, &all)
                        })
                        .collect()
                })
                .collect(),
        };
        let mut r =
            Session::from_compacted(&gpu, &model, &KvRecipe::plain(f32_fmt, 4), &full, 8).unwrap();
        assert_eq!(r.position(), t);
        let got = pollster::block_on(r.forward(&gpu, next, Logits::All)).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(
            diff < 2e-3,
            "{}: logits differ by {diff}",
            gpu.backend_name()
        );

        // Attention Matching to half the tokens: continues at position t, biases stored.
        let mut s = Session::new(&gpu, &model, &KvRecipe::plain(f32_fmt, 4), 2 * t + 8).unwrap();
        pollster::block_on(s.forward(&gpu, context, Logits::Last)).unwrap();
        s.start_capture(&gpu, false);
        pollster::block_on(s.forward(&gpu, context, Logits::Last)).unwrap();
        let reference = s.take_capture().unwrap();
        let shape = ContextShape {
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: d,
        };
        let budget = t / 2;
        let own_fit = FitOptions {
            value_ridge: 1e6,
            max_bias: 1.0,
            ..FitOptions::default()
        };
        let layer_sizes: Vec<usize> = (0..c.n_layer)
            .map(|l| {
                if l % 2 == 0 {
                    budget / 2
                } else {
                    budget + budget / 2
                }
            })
            .collect();
        // Plain am fitted to the keys as a turbo4 cache stores them (and the values, with
        // `values`).
        let fit_to_turbo4 = |values| Job {
            fit_for: Some(FitFor {
                format: "turbo4".parse().unwrap(),
                edge: None,
                sinks: 4,
                seed: kvpack::kv::DEFAULT_SEED,
                values,
            }),
            ..Job::uniform(Method::Am, budget)
        };
        let jobs = [
            Job::uniform(Method::Am, budget),
            Job::uniform(Method::Streaming, budget),
            Job {
                method: Method::AmMixWindow,
                budget,
                head_budgets: HeadBudgets::Sensitivity,
                selection: Selection::Omp,
                fit_for: None,
                fit: None,
            },
            // β and values fitted to the keys as a turbo4 cache stores them.
            fit_to_turbo4(false),
            // Per-layer budgets (a layer profile's allocation): the even layers keep fewer.
            Job {
                head_budgets: HeadBudgets::PerLayer(layer_sizes.clone().into()),
                ..Job::uniform(Method::AmMixWindow, budget)
            },
            // Its own fit options: the values kept (a large ridge), β capped at 1.
            Job {
                fit: Some(own_fit),
                ..Job::uniform(Method::Am, budget)
            },
            // Fitted to turbo4's stored keys, and the values refitted to turbo4's values.
            fit_to_turbo4(true),
        ];
        let (out, timings) = pollster::block_on(compact_context(
            &gpu,
            shape,
            &cap,
            Some(&reference),
            &jobs,
            usize::MAX,
            &FitOptions::default(),
        ))
        .unwrap();
        assert_eq!(timings.fit_s.len(), 7);
        for (l, heads) in out[4].layers.iter().enumerate() {
            assert!(heads.iter().all(|h| h.len() == layer_sizes[l]), "layer {l}");
        }
        // One size per layer, or the job is refused.
        let short = Job {
            head_budgets: HeadBudgets::PerLayer(layer_sizes[1..].to_vec().into()),
            ..Job::uniform(Method::AmMixWindow, budget)
        };
        let refused = pollster::block_on(compact_context(
            &gpu,
            shape,
            &cap,
            Some(&reference),
            &[short],
            usize::MAX,
            &FitOptions::default(),
        ));
        assert!(refused.is_err());
        let am = &out[0];
        assert_eq!(am.uniform_len(), Some(budget));
        assert!(am
            .layers
            .iter()
            .flatten()
            .any(|h| h.bias.iter().any(|&b| b != 0.0)));
        let turbo: KvFormat = "turbo4".parse().unwrap();
        let mut a =
            Session::from_compacted(&gpu, &model, &KvRecipe::plain(turbo, 4), am, 8).unwrap();
        assert_eq!(a.position(), t);
        let bits = turbo.bits_per_value(d) * 2.0 * d as f64;
        let per_layer = (bits * ((budget - 4) * c.n_head_kv) as f64 / 8.0).ceil() as u64;
        // 4 sink tokens' keys and values, kept in f16 (and not also as codes).
        let sinks = (c.n_layer * c.n_head_kv * 4 * 2 * d * 2) as u64;
        let bias = (c.n_layer * c.n_head_kv * budget * 4) as u64;
        assert_eq!(
            a.cache().bytes(),
            per_layer * c.n_layer as u64 + sinks + bias
        );
        let logits = pollster::block_on(a.forward(&gpu, next, Logits::All)).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
        assert_eq!(a.position(), t + next.len());
        // Saved to a .kvpack file as the turbo4 cache stores it (what `kvpack compact` writes)
        // and loaded back, the same greedy continuation; the first backend's file (its codes)
        // gives the same tokens on every backend; a damaged file and another model's hash are
        // refused.
        let recipe = KvRecipe::plain(turbo, 4);
        let fresh = Session::from_compacted(&gpu, &model, &recipe, am, 1).unwrap();
        let stored = SavedContext::Stored(
            pollster::block_on(StoredContext::store(&gpu, fresh.cache(), am)).unwrap(),
        );
        drop(fresh);
        let header = kvpack::compact::file::FileHeader {
            model_sha256: sha.clone(),
            kv: recipe.explicit(),
            method: "am".into(),
        };
        let own = std::env::temp_dir().join(format!(
            "kvpack-e2e-{}-{}.kvpack",
            std::process::id(),
            gpu.backend_name()
        ));
        kvpack::compact::file::save(&own, &header, &stored).unwrap();
        if !shared.exists() {
            kvpack::compact::file::save(&shared, &header, &stored).unwrap();
        }
        let (h2, loaded) = kvpack::compact::file::load(&own, &sha).unwrap();
        assert_eq!(h2, header);
        std::fs::remove_file(&own).unwrap();
        let (_, first_backends) = kvpack::compact::file::load(&shared, &sha).unwrap();
        let greedy = |saved: &SavedContext| -> Vec<u32> {
            let mut s = Session::from_saved(&gpu, &model, &recipe, saved, 8).unwrap();
            let mut logits = pollster::block_on(s.forward(&gpu, next, Logits::Last)).unwrap();
            let mut out = Vec::new();
            for _ in 0..3 {
                let id = kvpack::model::sampler::Sampler::greedy().sample(&logits);
                out.push(id);
                logits = pollster::block_on(s.forward(&gpu, &[id], Logits::Last)).unwrap();
            }
            out
        };
        assert_eq!(greedy(&loaded), greedy(&SavedContext::F32(am.clone())));
        shared_tokens.push((gpu.backend_name().to_string(), greedy(&first_backends)));
        // Per-head budgets: within the job's total, each head at one of the candidate sizes,
        // and the ragged result runs.
        let sens = &out[2];
        let total: usize = sens.total_tokens();
        assert!(total <= budget * c.n_layer * c.n_head_kv, "{total}");
        assert!(total >= budget * c.n_layer * c.n_head_kv / 2, "{total}");
        let mut sizes: Vec<usize> = BUDGET_FACTORS
            .iter()
            .map(|f| ((budget as f64 * f).round() as usize).clamp(MIN_HEAD_TOKENS, t))
            .collect();
        sizes.dedup();
        assert!(sens
            .layers
            .iter()
            .flatten()
            .all(|h| sizes.contains(&h.len())));
        let mut s =
            Session::from_compacted(&gpu, &model, &KvRecipe::plain(turbo, 4), sens, 8).unwrap();
        assert_eq!(s.cache().stored_tokens(), total);
        let logits = pollster::block_on(s.forward(&gpu, next, Logits::All)).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
        // A window of recent tokens over the ragged cache holds only the tokens that come after
        // it: with f16 pages, which store what the window stores, the logits do not move (beyond
        // the summation order of other kernels: the bound of the full-cache check above).
        let window_logits = |recipe: &str| {
            let recipe: KvRecipe = recipe.parse().unwrap();
            let mut s = Session::from_compacted(&gpu, &model, &recipe, sens, 8).unwrap();
            pollster::block_on(s.forward(&gpu, next, Logits::All)).unwrap()
        };
        let diff = common::max_abs_diff(&window_logits("f16+s4+r2"), &window_logits("f16+s4"));
        assert!(
            diff < 2e-3,
            "{}: the window moved the logits by {diff}",
            gpu.backend_name()
        );
        // Fitted to turbo4's stored keys: the same keys as plain am (the cache quantizes them),
        // other biases and values, and it runs in a turbo4 cache.
        let stored = &out[3];
        for (x, y) in stored
            .layers
            .iter()
            .flatten()
            .zip(am.layers.iter().flatten())
        {
            assert_eq!((&x.positions, &x.keys), (&y.positions, &y.keys));
        }
        let moved = |f: fn(&HeadCompaction) -> &Vec<f32>| {
            (stored.layers.iter().flatten())
                .zip(am.layers.iter().flatten())
                .any(|(x, y)| f(x) != f(y))
        };
        assert!(moved(|h| &h.bias) && moved(|h| &h.values));
        let mut s =
            Session::from_compacted(&gpu, &model, &KvRecipe::plain(turbo, 4), stored, 8).unwrap();
        let logits = pollster::block_on(s.forward(&gpu, next, Logits::All)).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
        // The values refitted to their stored form too: the same keys and biases as the fit to
        // stored keys, other values, and it runs in a turbo4 cache.
        let refit = &out[6];
        for (x, y) in refit
            .layers
            .iter()
            .flatten()
            .zip(stored.layers.iter().flatten())
        {
            assert_eq!((&x.positions, &x.keys), (&y.positions, &y.keys));
            assert_eq!(x.bias, y.bias);
        }
        assert!((refit.layers.iter().flatten())
            .zip(stored.layers.iter().flatten())
            .any(|(x, y)| x.values != y.values));
        let mut s =
            Session::from_compacted(&gpu, &model, &KvRecipe::plain(turbo, 4), refit, 8).unwrap();
        let logits = pollster::block_on(s.forward(&gpu, next, Logits::All)).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
        // A job's own fit options: the same result as a call given those options, the same
        // keys as plain am, other biases and values.
        let (alone, _) = pollster::block_on(compact_context(
            &gpu,
            shape,
            &cap,
            Some(&reference),
            &[Job::uniform(Method::Am, budget)],
            usize::MAX,
            &own_fit,
        ))
        .unwrap();
        assert_eq!(out[5], alone[0]);
        for (x, y) in out[5]
            .layers
            .iter()
            .flatten()
            .zip(am.layers.iter().flatten())
        {
            assert_eq!(x.positions, y.positions);
            assert!(x.bias.iter().all(|&b| b <= 1.0 + 1e-6), "{:?}", x.bias);
        }
        assert!(
            (out[5].layers.iter().flatten())
                .zip(am.layers.iter().flatten())
                .any(|(x, y)| x.values != y.values),
            "the job's own ridge did not change the values"
        );
        // Streaming keeps the sinks and the latest tokens, no biases.
        let st = &out[1];
        assert_eq!(st.layers[0][0].positions[..4], [0, 1, 2, 3]);
        assert_eq!(*st.layers[0][0].positions.last().unwrap() as usize, t - 1);
    }
    for (name, tokens) in &shared_tokens[1..] {
        assert_eq!(
            tokens, &shared_tokens[0].1,
            "the same .kvpack file continues differently on {name} and {}",
            shared_tokens[0].0
        );
    }
    let other = "0".repeat(64);
    assert!(kvpack::compact::file::load(&shared, &other).is_err());
    let mut bytes = std::fs::read(&shared).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&shared, &bytes).unwrap();
    let err = kvpack::compact::file::load(&shared, &sha)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum"), "{err}");
    std::fs::remove_file(&shared).unwrap();
}
