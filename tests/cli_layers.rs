//! `kvpack eval layers` and `--head-budgets profile` end to end, on the real model and the first
//! backend of `KVPACK_TEST_BACKENDS`: a short context's layer profile is measured and written,
//! and `kvpack compact` shares its tokens among the layers as the profile says.

mod common;

use kvpack::compact::{LayerProfile, SavedContext};
use std::process::Command;

const JURY: &str = "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent \
    primary election produced no evidence that any irregularities took place. The jury further \
    said in term-end presentments that the City Executive Committee, which had over-all charge \
    of the election, deserves the praise and thanks of the City of Atlanta for the manner in \
    which the election was conducted.";

fn kvpack(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvpack"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("kvpack runs");
    assert!(
        out.status.success(),
        "kvpack {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The first backend of `KVPACK_TEST_BACKENDS`, the model's path, the tests' temporary folder
/// and a text file `{name}-jury.txt` in it (the jury paragraph twice).
fn setup(name: &str) -> (String, String, &'static std::path::Path, String) {
    let backends = std::env::var("KVPACK_TEST_BACKENDS").unwrap_or_else(|_| "vulkan,gl".into());
    let backend = backends.split(',').next().unwrap().trim().to_string();
    let model = common::model_path().to_str().unwrap().to_string();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let text = dir.join(format!("{name}-jury.txt"));
    std::fs::write(&text, format!("{JURY}\n\n{JURY}\n")).unwrap();
    (backend, model, dir, text.to_str().unwrap().to_string())
}

#[test]
fn a_measured_layer_profile_shares_the_tokens_of_a_compaction() {
    let (backend, model, dir, text) = setup("layers");
    let (model, text) = (model.as_str(), text.as_str());
    let profile_path = dir.join(format!("layers-profile-{}.json", std::process::id()));
    let profile_arg = profile_path.to_str().unwrap();
    // `kvpack --backend B SUBCOMMAND… --model M --text T --context 48 REST…`
    let on_model = |sub: &[&str], rest: &[&str]| -> String {
        let common = ["--model", model, "--text", text, "--context", "48"];
        kvpack(&[&["--backend", backend.as_str()][..], sub, &common, rest].concat())
    };
    let stdout = on_model(
        &["eval", "layers"],
        &[
            "--continuation",
            "8",
            "--tokens-per-head",
            "8,16",
            "--out",
            profile_arg,
            "--json",
        ],
    );
    let printed: LayerProfile = serde_json::from_str(&stdout).expect("--json prints the profile");
    let written: LayerProfile =
        serde_json::from_str(&std::fs::read_to_string(&profile_path).unwrap()).unwrap();
    assert_eq!(printed, written);
    let p = written;
    p.validate().unwrap();
    assert_eq!(p.n_layer(), 30);
    assert_eq!(p.tokens_per_head, vec![8, 16]);
    assert_eq!((p.context, p.continuation), (48, 8));
    assert_eq!(p.model_sha256.len(), 64);
    // Compacting a layer moves the distribution; most layers move it less with more tokens.
    assert!(p.kl.iter().flatten().any(|&x| x > 1e-4), "{:?}", p.kl);
    let better = p.kl.iter().filter(|r| r[1] <= r[0]).count();
    assert!(better >= 20, "{better} of 30 layers: {:?}", p.kl);

    // `compact --head-budgets profile`: 48 / 4 = 12 tokens per head on average, per layer as
    // the profile allocates them.
    let out = dir.join(format!("layers-{}.kvpack", std::process::id()));
    on_model(
        &["compact"],
        &[
            "--ratio",
            "4",
            "--method",
            "am-mix-window",
            "--head-budgets",
            "profile",
            "--layer-profile",
            profile_arg,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let (_, compacted) = kvpack::compact::file::load(&out, &p.model_sha256).unwrap();
    let SavedContext::Stored(compacted) = compacted else {
        panic!("compact writes the tokens as the cache stores them (version 2)")
    };
    let want = p.allocate(12, 48);
    assert_eq!(want.iter().sum::<usize>(), 12 * 30);
    for (l, heads) in compacted.layers.iter().enumerate() {
        assert!(heads.iter().all(|h| h.len() == want[l]), "layer {l}");
    }
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&profile_path).unwrap();
}

#[test]
fn the_recommended_preset_compacts_with_the_shipped_profile_and_generate_continues() {
    let (backend, model, dir, text) = setup("preset");
    let (model, text) = (model.as_str(), text.as_str());
    let out = dir.join(format!("preset-{}.kvpack", std::process::id()));
    let out_arg = out.to_str().unwrap();
    let b = ["--backend", backend.as_str()];
    kvpack(
        &[
            &b[..],
            &["compact", "--model", model, "--text", text],
            &["--context", "96", "--ratio", "4", "--preset", "recommended"],
            &["--out", out_arg],
        ]
        .concat(),
    );
    // The shipped profile shares 96 / 4 = 24 tokens per head among the layers; one exact sink
    // and the recent 0.7 of each head's budget end every head.
    let shipped: LayerProfile = serde_json::from_str(include_str!(
        "../profiles/smollm2-135m-instruct.am-mix-window.json"
    ))
    .unwrap();
    let sha = kvpack::model::fetch::sha256_file(std::path::Path::new(model)).unwrap();
    assert_eq!(
        shipped.model_sha256, sha,
        "the shipped profile is the default model's"
    );
    let (header, compacted) = kvpack::compact::file::load(&out, &sha).unwrap();
    assert_eq!(header.method, "am-ctx-window");
    // The recipe written out in full (compact's default format and sinks), as the file's codes
    // need it.
    assert_eq!(header.kv, "f32+s4");
    let SavedContext::Stored(compacted) = compacted else {
        panic!("compact writes the tokens as the cache stores them (version 2)")
    };
    let want = shipped.allocate(24, 96);
    assert!(
        want.iter().any(|&n| n != want[0]),
        "profile budgets differ by layer: {want:?}"
    );
    for (l, heads) in compacted.layers.iter().enumerate() {
        for h in heads {
            assert_eq!(h.len(), want[l], "layer {l}");
            let recent = ((want[l] as f64 * 0.7) as usize).min(want[l] - 1);
            assert_eq!(h.positions[0], 0, "layer {l}: the sink");
            let tail: Vec<u32> = (96 - recent as u32..96).collect();
            assert_eq!(h.positions[want[l] - recent..], tail[..], "layer {l}");
        }
    }
    // `generate --cache` continues after it and reports against the whole context's f16 cache.
    let j: serde_json::Value = serde_json::from_str(&kvpack(
        &[
            &b[..],
            &["generate", "--model", model, "--cache", out_arg],
            &["--prompt", " The jury", "--max-tokens", "3", "--json"],
        ]
        .concat(),
    ))
    .unwrap();
    assert_eq!(j["context_tokens"], 96);
    let (kv_bytes, f16_full) = (
        j["kv_bytes"].as_u64().unwrap(),
        j["kv_bytes_f16_full"].as_u64().unwrap(),
    );
    // 96 context tokens plus the prompt and the generated tokens in the cache, f16, every head.
    let new = f16_full / (2 * 2 * 64 * 3 * 30) - 96;
    assert_eq!(f16_full % (2 * 2 * 64 * 3 * 30), 0);
    assert!((3..=6).contains(&new), "{new} new tokens");
    assert!(f16_full > j["kv_bytes_f16"].as_u64().unwrap(), "{j}");
    assert!(kv_bytes > 0);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn the_adaptive_preset_keeps_the_setting_that_does_better_on_the_context_itself() {
    let (backend, model, _, text) = setup("adaptive");
    let (model, text) = (model.as_str(), text.as_str());
    let eval = |preset: &[&str]| -> serde_json::Value {
        let out = kvpack(
            &[
                &["--backend", backend.as_str(), "eval", "compaction"][..],
                &["--model", model, "--text", text, "--context", "96"],
                &["--continuation", "8", "--recall", "8", "--ratios", "4"],
                &["--methods", "am-ctx-window", "--json"],
                preset,
            ]
            .concat(),
        );
        serde_json::from_str(&out).unwrap()
    };
    let j = eval(&["--preset", "adaptive"]);
    let row = &j["rows"][0];
    assert_eq!(row["selection"], "adaptive", "{row}");
    let choice = &row["adaptive"];
    // An eighth of the 96-token context held back, a quarter read again, both settings
    // tried; observation kept only if its perplexity is lower on both.
    assert_eq!(
        (&choice["holdout"], &choice["reread"]),
        (&12.into(), &24.into())
    );
    let trials = choice["trials"].as_array().unwrap();
    let names: Vec<&str> = trials
        .iter()
        .map(|t| t["setting"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["recommended", "observation"]);
    let measure = |k: usize, m: &str| trials[k][m].as_f64().unwrap();
    let better = ["ppl", "recall_ppl"]
        .iter()
        .all(|m| measure(1, m) < measure(0, m));
    let best = usize::from(better);
    assert_eq!(choice["chosen"], names[best], "{choice}");
    let (seconds, choice_s) = (
        row["seconds"].as_f64().unwrap(),
        choice["seconds"].as_f64().unwrap(),
    );
    assert!(choice_s > 0.0 && seconds > choice_s, "{seconds} {choice_s}");
    // The whole context is then compacted exactly as the kept setting alone compacts it.
    let alone = if best == 0 {
        eval(&["--preset", "recommended"])
    } else {
        eval(&[
            "--preset",
            "recommended",
            "--selection",
            "observation",
            "--value-ridge",
            "1e6",
            "--recent-fraction",
            "0.6",
        ])
    };
    for key in ["ppl", "recall_ppl", "tokens_kept", "kv_bytes"] {
        assert_eq!(row[key], alone["rows"][0][key], "{key}");
    }
}
