//! `kvpack eval layers` and `--head-budgets profile` end to end, on the real model and the first
//! backend of `KVPACK_TEST_BACKENDS`: a short context's layer profile is measured and written,
//! and `kvpack compact` shares its tokens among the layers as the profile says.

mod common;

use kvpack::compact::LayerProfile;
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

#[test]
fn a_measured_layer_profile_shares_the_tokens_of_a_compaction() {
    let backends = std::env::var("KVPACK_TEST_BACKENDS").unwrap_or_else(|_| "vulkan,gl".into());
    let backend = backends.split(',').next().unwrap().trim().to_string();
    let model = common::model_path();
    let model = model.to_str().unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let text = dir.join("layers-jury.txt");
    std::fs::write(&text, format!("{JURY}\n\n{JURY}\n")).unwrap();
    let text = text.to_str().unwrap();
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
    let want = p.allocate(12, 48);
    assert_eq!(want.iter().sum::<usize>(), 12 * 30);
    for (l, heads) in compacted.layers.iter().enumerate() {
        assert!(heads.iter().all(|h| h.len() == want[l]), "layer {l}");
    }
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&profile_path).unwrap();
}
