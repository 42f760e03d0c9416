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
