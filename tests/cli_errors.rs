//! Bad input to the commands gets a clear error before any work (no model load, no GPU).

use std::process::Command;

/// Run `kvpack args…`; it must fail, and its stderr is returned.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvpack"))
        .args(args)
        .output()
        .expect("kvpack runs");
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `eval compaction --kv kv` on a text that does not exist: its error.
fn eval_compaction_kv(kv: &str) -> String {
    fails(&[
        "eval",
        "compaction",
        "--text",
        "no-such-file.txt",
        "--kv",
        kv,
    ])
}

#[test]
fn compaction_commands_refuse_recipes_a_compacted_cache_cannot_hold() {
    let refused = "a compacted cache takes sinks, a recent window and edge layers";
    for kv in ["turbo4u+s2+r8+c", "tq4", "turbo3+c"] {
        let e = eval_compaction_kv(kv);
        assert!(e.contains(refused), "{kv}: {e}");
        let e = fails(&[
            "compact",
            "--text",
            "no-such-file.txt",
            "--ratio",
            "10",
            "--kv",
            kv,
            "--out",
            "x.kvpack",
        ]);
        assert!(e.contains(refused), "{kv}: {e}");
    }
    // Recipes a compacted cache takes get past --kv, to the missing text.
    for kv in ["turbo4u+s2+r14", "turbo4u+s2+e1"] {
        let e = eval_compaction_kv(kv);
        assert!(e.contains("no-such-file.txt"), "{kv}: {e}");
    }
    let e = eval_compaction_kv("turbo4u+e1=bogus");
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn eval_compaction_reads_every_text_before_any_work() {
    // The first text exists; the second does not: the error names it, before the model loads.
    let e = fails(&[
        "eval",
        "compaction",
        "--text",
        "Cargo.toml,no-such-file.txt",
        "--model",
        "no-such-model.gguf",
    ]);
    assert!(e.contains("no-such-file.txt"), "{e}");
    assert!(!e.contains("no-such-model"), "{e}");
}

#[test]
fn profile_budgets_need_a_readable_profile_of_the_right_shape() {
    // `compact` and `eval compaction` take the same two flags; each refusal comes before the
    // model loads (the model path does not exist).
    let run = |extra: &[&str], compact: bool| -> String {
        let mut args: Vec<&str> = if compact {
            vec!["compact", "--ratio", "10", "--out", "x.kvpack"]
        } else {
            vec!["eval", "compaction"]
        };
        args.extend(["--text", "Cargo.toml", "--model", "no-such-model.gguf"]);
        args.extend(extra);
        fails(&args)
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let bad_sizes = dir.join("profile-bad-sizes.json");
    std::fs::write(
        &bad_sizes,
        r#"{"model_sha256": "00", "method": "am-mix-window", "context": 1024,
            "continuation": 128, "tokens_per_head": [32, 16], "kl": [[0.1, 0.2]]}"#,
    )
    .unwrap();
    let bad_sizes = bad_sizes.to_str().unwrap();
    for compact in [false, true] {
        let e = run(&["--head-budgets", "profile"], compact);
        assert!(e.contains("needs --layer-profile"), "{e}");
        let e = run(&["--layer-profile", "p.json"], compact);
        assert!(e.contains("only with --head-budgets profile"), "{e}");
        let with = |file: &str| {
            run(
                &["--head-budgets", "profile", "--layer-profile", file],
                compact,
            )
        };
        let e = with("no-such-profile.json");
        assert!(e.contains("no-such-profile.json"), "{e}");
        let e = with("Cargo.toml");
        assert!(e.contains("is not a layer profile"), "{e}");
        let e = with(bad_sizes);
        assert!(e.contains("tokens_per_head must ascend"), "{e}");
        assert!(!e.contains("no-such-model"), "{e}");
    }
}

#[test]
fn eval_layers_refuses_baselines_and_sizes_outside_the_context() {
    let run = |extra: &[&str]| -> String {
        let mut args = vec!["eval", "layers", "--text", "no-such-file.txt"];
        args.extend(extra);
        fails(&args)
    };
    let e = run(&["--method", "h2o"]);
    assert!(e.contains("Attention Matching"), "{e}");
    let e = run(&["--tokens-per-head", "0,16"]);
    assert!(e.contains("at least 1 and below --context"), "{e}");
    let e = run(&["--context", "64", "--tokens-per-head", "16,64"]);
    assert!(e.contains("below --context 64"), "{e}");
    // Good arguments get to the missing text.
    let e = run(&[]);
    assert!(e.contains("no-such-file.txt"), "{e}");
}
