//! The generation loop shared by the CLI, the examples and the browser: prefill a prompt, then
//! sample one token at a time, streaming text pieces as they become valid UTF-8. Async, so the
//! same code blocks natively (`pollster`) and yields to the event loop in a browser tab.

use super::llama::{Logits, ModelError, Session};
use super::sampler::Sampler;
use super::tokenizer::{StreamDecoder, Tokenizer};
use crate::gpu::Gpu;
use web_time::Instant;

/// The ChatML prompt the SmolLM2 instruct models were trained on: a system turn, a user turn,
/// and the opening of the assistant's turn.
pub fn chat_prompt(system: &str, user: &str) -> String {
    format!(
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

/// SmolLM2's default system prompt.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// What one generation produced, with its timings.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The generated token ids (the end-of-generation token excluded).
    pub ids: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Seconds spent on the prompt (prefill, first logits read back).
    pub prefill_seconds: f64,
    /// Seconds spent on the generated tokens.
    pub decode_seconds: f64,
    /// Whether the model produced its end-of-generation token (fed to the cache, not in `ids`).
    pub ended: bool,
    /// Whether `on_piece` asked to stop before `max_tokens` or the end of generation.
    pub stopped: bool,
}

impl Generated {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Generated tokens per second.
    pub fn decode_tok_s(&self) -> f64 {
        self.ids.len() as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Feed `prompt` to `session`, then generate up to `max_tokens` tokens with `sampler`, calling
/// `on_piece(text)` for each piece of text as it completes; `on_piece` returns `false` to stop.
/// Ends early at the model's end-of-generation token. The cache keeps everything fed, so a
/// conversation continues by calling this again with the next turn.
pub async fn generate(
    gpu: &Gpu,
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_tokens: usize,
    mut on_piece: impl FnMut(&str) -> bool,
) -> Result<Generated, ModelError> {
    let mut g = Generated {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    if prompt.is_empty() || max_tokens == 0 {
        return Ok(g);
    }
    let t0 = Instant::now();
    let mut logits = session.forward(gpu, prompt, Logits::Last).await?;
    g.prefill_seconds = t0.elapsed().as_secs_f64();
    let mut stream = StreamDecoder::new();
    let t1 = Instant::now();
    for _ in 0..max_tokens {
        let id = sampler.sample(&logits);
        // Every sampled token is fed, so the cache holds the whole exchange and a
        // conversation continues from it.
        logits = session.forward(gpu, &[id], Logits::Last).await?;
        if tokenizer.is_end_of_generation(id) {
            g.ended = true;
            break;
        }
        g.ids.push(id);
        let piece = stream.push(tokenizer, id);
        g.text.push_str(&piece);
        if !piece.is_empty() && !on_piece(&piece) {
            g.stopped = true;
            break;
        }
    }
    let tail = stream.finish();
    if !tail.is_empty() {
        g.text.push_str(&tail);
        on_piece(&tail);
    }
    g.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(g)
}
