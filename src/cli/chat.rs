//! `kvpack chat`: an interactive conversation (ChatML), the compressed cache kept across turns.

use super::generate::ModelArgs;
use super::GpuArgs;
use anyhow::Result;
use clap::Args;
use kvpack::kv::KvRecipe;
use kvpack::model::generate::generate;
use kvpack::model::llama::Session;
use kvpack::model::sampler::Sampler;
use kvpack::model::EncodeOptions;
use std::io::{BufRead, Write};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// KV cache format (see `kvpack generate --help`).
    #[arg(long, default_value = "turbo4")]
    kv: String,
    /// The first N tokens (attention sinks) are also kept in full precision.
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Each token also reads the N tokens before it from a full-precision (f16) window.
    #[arg(long, default_value_t = 0)]
    recent: usize,
    /// Tokens the conversation can hold.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Longest reply, in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// System prompt.
    #[arg(
        long,
        default_value = kvpack::model::generate::DEFAULT_SYSTEM
    )]
    system: String,
}

pub fn run(gpu_args: &GpuArgs, a: ChatArgs) -> Result<()> {
    let kv = KvRecipe::parse_with(&a.kv, a.sinks, a.recent)?;
    let gpu = gpu_args.open()?;
    let loaded = a.model.load(&gpu, false)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    kv.validate_dim(model.config.head_dim)?;
    let mut session = Session::new(&gpu, model, &kv, a.context)?;
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let special = EncodeOptions {
        parse_special: true,
        add_special: false,
    };
    let mut pending = format!("<|im_start|>system\n{}<|im_end|>\n", a.system);
    eprintln!(
        "kvpack chat: {} on {} ({}), KV cache {kv}. Commands: /stats, /reset, /quit.",
        loaded.name,
        gpu.report().name,
        gpu.backend_name()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/stats" => {
                let c = session.cache();
                eprintln!(
                    "{} tokens; KV {} bytes ({:.2} bits/value), f16 would need {} bytes",
                    c.len(),
                    c.bytes(),
                    c.bits_per_value(),
                    c.bytes_f16()
                );
                continue;
            }
            "/reset" => {
                session = Session::new(&gpu, model, &kv, a.context)?;
                pending = format!("<|im_start|>system\n{}<|im_end|>\n", a.system);
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        // The user's text is not parsed for control tokens: only the template's are.
        let mut ids = tok.encode_with(&pending, special);
        ids.extend(tok.encode_with("<|im_start|>user\n", special));
        ids.extend(tok.encode_with(line, EncodeOptions::default()));
        ids.extend(tok.encode_with("<|im_end|>\n<|im_start|>assistant\n", special));
        pending.clear();
        if session.len() + ids.len() + a.max_tokens > a.context {
            eprintln!(
                "the conversation would exceed --context {} tokens: /reset to start over",
                a.context
            );
            continue;
        }
        let g = pollster::block_on(generate(
            &gpu,
            &mut session,
            tok,
            &ids,
            &mut sampler,
            a.max_tokens,
            |piece| {
                print!("{piece}");
                std::io::stdout().flush().is_ok()
            },
        ))?;
        println!();
        let ended = g.ended;
        // Close the turn in the cache so the next one follows the template.
        pending = if ended {
            "\n".into()
        } else {
            "<|im_end|>\n".into()
        };
    }
    Ok(())
}
