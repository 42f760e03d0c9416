//! kvpack embedded in an app: load a GGUF model, keep a compressed KV cache across turns, stream
//! replies. A screenful of code.
//!
//! ```sh
//! cargo run --release --example chat -- path/to/model.gguf    # or no argument: the default model
//! ```

use kvpack::gpu::{Gpu, GpuOptions};
use kvpack::kv::KvRecipe;
use kvpack::model::generate::generate;
use kvpack::model::llama::{Llama, Session};
use kvpack::model::sampler::Sampler;
use kvpack::model::{EncodeOptions, GgufFile, Tokenizer};
use std::io::{BufRead, Write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => kvpack::model::fetch::default_model(|m| eprintln!("{m}"))?,
    };
    let gpu = Gpu::new_blocking(&GpuOptions::from_env())?;
    let file = GgufFile::open(&path)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let model = Llama::load(&gpu, &file, |_, _| {})?;
    // 2048 tokens of context, keys at 4 bits and values at 2 (TurboQuant), first 4 tokens exact.
    let mut session = Session::new(&gpu, &model, &KvRecipe::plain("k4v2".parse()?, 4), 2048)?;
    let mut sampler = Sampler::new(0.7, 0.9, 1);
    let special = EncodeOptions {
        parse_special: true,
        add_special: false,
    };
    let mut ids = tok.encode_with(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        special,
    );

    eprintln!("say something (Ctrl-D to end)");
    for line in std::io::stdin().lock().lines() {
        ids.extend(tok.encode_with("<|im_start|>user\n", special));
        ids.extend(tok.encode_with(&line?, EncodeOptions::default()));
        ids.extend(tok.encode_with("<|im_end|>\n<|im_start|>assistant\n", special));
        let room = 2048usize.saturating_sub(session.len() + ids.len());
        pollster::block_on(generate(
            &gpu,
            &mut session,
            &tok,
            &ids,
            &mut sampler,
            room.min(256),
            |piece| {
                print!("{piece}");
                std::io::stdout().flush().is_ok()
            },
        ))?;
        println!();
        ids = tok.encode_with("\n", special);
        let c = session.cache();
        eprintln!(
            "[{} tokens, KV {} bytes vs {} in f16]",
            c.len(),
            c.bytes(),
            c.bytes_f16()
        );
    }
    Ok(())
}
