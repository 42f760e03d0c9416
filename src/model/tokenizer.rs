//! Byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
//!
//! Encoding runs in three steps, as in llama.cpp and Hugging Face `tokenizers`:
//! 1. special tokens (control, user-defined) are cut out of the text, leftmost-longest first;
//! 2. each remaining span is split into words by the pre-tokenizer: the GPT-2 pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, hand-written
//!    below, and for `smollm` every `\p{N}` code point is first isolated (digits split one by one);
//! 3. each word's UTF-8 bytes start as one token per byte and are merged by BPE, always the
//!    pair with the lowest merge rank first, the leftmost one on ties.
//!
//! Vocabulary strings are in the GPT-2 byte-to-unicode alphabet (space is `Ġ`, newline `Ċ`);
//! decoding maps them back to bytes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::gguf::{GgufError, GgufFile};
use super::unicode::is_letter;

/// Everything that can go wrong building a tokenizer from GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key is missing or has the wrong type.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` is not byte-level BPE.
    #[error(
        "unsupported tokenizer model '{found}': kvpack implements byte-level BPE \
         (tokenizer.ggml.model = \"gpt2\")"
    )]
    UnsupportedModel {
        /// The model found.
        found: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer not implemented here.
    #[error("unsupported pre-tokenizer '{found}': kvpack implements {}", PreTokenizer::NAMES.join(", "))]
    UnsupportedPreTokenizer {
        /// The name found.
        found: String,
    },
    /// The vocabulary is empty.
    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocabulary,
    /// `tokenizer.ggml.token_type` does not have one entry per token.
    #[error("tokenizer.ggml.token_type has {found} entries for {expected} tokens")]
    TokenTypeCount {
        /// Number of tokens.
        expected: usize,
        /// Number of token types.
        found: usize,
    },
    /// A merge rule that is not two tokens separated by a space.
    #[error("merge rule {index} '{rule}' is not two tokens separated by a space")]
    BadMerge {
        /// Rank of the rule.
        index: usize,
        /// The rule.
        rule: String,
    },
    /// A special token id outside the vocabulary.
    #[error("{key} is {id}, outside the vocabulary of {vocab_size} tokens")]
    BadSpecialId {
        /// The metadata key.
        key: &'static str,
        /// The id found.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
}

/// Token kinds of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 0, or any value this reader does not know; treated like [`TokenType::Normal`].
    Undefined,
    /// 1: ordinary text token.
    Normal,
    /// 2: the unknown-token placeholder.
    Unknown,
    /// 3: control token such as `<|im_start|>`; recognized in text only with `parse_special`.
    Control,
    /// 4: user-defined token, always recognized in text.
    UserDefined,
    /// 5: unused slot.
    Unused,
    /// 6: raw byte token.
    Byte,
}

impl TokenType {
    /// The type for a `token_type` value.
    pub fn from_id(id: i64) -> Self {
        match id {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// Whether tokens of this type are matched as whole strings in the input, not BPE-encoded.
    fn is_special(self) -> bool {
        matches!(
            self,
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown
        )
    }
}

/// How text is split into words before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The GPT-2 pattern (`tokenizer.ggml.pre = "gpt2"`).
    Gpt2,
    /// Every `\p{N}` code point isolated, then the GPT-2 pattern (`"smollm"`).
    Smollm,
}

impl PreTokenizer {
    /// Names accepted in `tokenizer.ggml.pre`.
    pub const NAMES: &'static [&'static str] = &["gpt2", "smollm"];

    /// The pre-tokenizer called `name` in `tokenizer.ggml.pre`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" => Some(PreTokenizer::Gpt2),
            "smollm" => Some(PreTokenizer::Smollm),
            _ => None,
        }
    }

    /// Splits `text` (containing no special tokens) into the words BPE encodes separately.
    pub fn split<'t>(self, text: &'t str, words: &mut Vec<&'t str>) {
        match self {
            PreTokenizer::Gpt2 => split_gpt2(text, words),
            PreTokenizer::Smollm => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        if start < i {
                            split_gpt2(&text[start..i], words);
                        }
                        let end = i + c.len_utf8();
                        words.push(&text[i..end]);
                        start = end;
                    }
                }
                if start < text.len() {
                    split_gpt2(&text[start..], words);
                }
            }
        }
    }
}

/// Options for [`Tokenizer::encode_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Recognize control tokens such as `<|im_start|>` written in the text (chat templates).
    /// Off for untrusted text, so a user cannot inject them. User-defined tokens are always
    /// recognized.
    pub parse_special: bool,
    /// Add BOS/EOS around the text when the model asks for them
    /// (`tokenizer.ggml.add_bos_token`, `tokenizer.ggml.add_eos_token`).
    pub add_special: bool,
}

/// Texts of control tokens that end a model's turn, besides the declared EOS/EOT ids.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// A byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    token_types: Vec<TokenType>,
    /// Decoded bytes of every token, concatenated; token `i` is `piece_bytes[piece_starts[i]..piece_starts[i + 1]]`.
    piece_bytes: Vec<u8>,
    piece_starts: Vec<usize>,
    token_ids: HashMap<String, u32>,
    /// Token of each single byte; `None` where the vocabulary lacks it (the byte is dropped,
    /// as Hugging Face and llama.cpp do).
    byte_tokens: [Option<u32>; 256],
    /// (left, right) → (rank, merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens by the first byte of their text, longest first.
    specials_by_first_byte: Vec<Vec<u32>>,
    pre: PreTokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    end_of_generation: Vec<u32>,
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                found: model.to_string(),
            });
        }
        let pre = if file.contains_key("tokenizer.ggml.pre") {
            let name = file.get_str("tokenizer.ggml.pre")?;
            PreTokenizer::from_name(name).ok_or_else(|| {
                TokenizerError::UnsupportedPreTokenizer {
                    found: name.to_string(),
                }
            })?
        } else {
            log::warn!("GGUF has no tokenizer.ggml.pre; using the GPT-2 pre-tokenizer");
            PreTokenizer::Gpt2
        };
        let tokens: Vec<String> = file
            .get_array_str("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let token_types = if file.contains_key("tokenizer.ggml.token_type") {
            let types = file.get_array_i64("tokenizer.ggml.token_type")?;
            if types.len() != tokens.len() {
                return Err(TokenizerError::TokenTypeCount {
                    expected: tokens.len(),
                    found: types.len(),
                });
            }
            types.into_iter().map(TokenType::from_id).collect()
        } else {
            vec![TokenType::Normal; tokens.len()]
        };
        let merges = if file.contains_key("tokenizer.ggml.merges") {
            file.get_array_str("tokenizer.ggml.merges")?
        } else {
            Vec::new()
        };
        let optional_id = |key: &str| -> Result<Option<u32>, GgufError> {
            if file.contains_key(key) {
                file.get_u32(key).map(Some)
            } else {
                Ok(None)
            }
        };
        let optional_flag = |key: &str| -> Result<bool, GgufError> {
            if file.contains_key(key) {
                file.get_bool(key)
            } else {
                Ok(false)
            }
        };
        let ids = SpecialIds {
            bos: optional_id("tokenizer.ggml.bos_token_id")?,
            eos: optional_id("tokenizer.ggml.eos_token_id")?,
            eot: optional_id("tokenizer.ggml.eot_token_id")?,
            eom: optional_id("tokenizer.ggml.eom_token_id")?,
            add_bos: optional_flag("tokenizer.ggml.add_bos_token")?,
            add_eos: optional_flag("tokenizer.ggml.add_eos_token")?,
        };
        Self::new(tokens, token_types, &merges, pre, ids)
    }

    fn new(
        tokens: Vec<String>,
        token_types: Vec<TokenType>,
        merges: &[&str],
        pre: PreTokenizer,
        ids: SpecialIds,
    ) -> Result<Self, TokenizerError> {
        if tokens.is_empty() {
            return Err(TokenizerError::EmptyVocabulary);
        }
        let vocab_size = tokens.len();
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", ids.bos),
            ("tokenizer.ggml.eos_token_id", ids.eos),
            ("tokenizer.ggml.eot_token_id", ids.eot),
            ("tokenizer.ggml.eom_token_id", ids.eom),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= vocab_size) {
                return Err(TokenizerError::BadSpecialId {
                    key,
                    id,
                    vocab_size,
                });
            }
        }

        // Later duplicates win, as in llama.cpp and Hugging Face.
        let token_ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        let mut byte_tokens = [None; 256];
        for (byte, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_ids.get(&BYTE_TO_CHAR[byte].to_string()).copied();
        }
        let missing: Vec<String> = (0..256)
            .filter(|&b| byte_tokens[b].is_none())
            .map(|b| format!("{b:02x}"))
            .collect();
        if !missing.is_empty() {
            // SmolLM2 lacks 21 (rare control characters, and lead bytes of unassigned planes).
            log::debug!(
                "no token for bytes {}: they are dropped when encoding",
                missing.join(" ")
            );
        }

        let mut merge_map = HashMap::with_capacity(merges.len());
        let mut skipped = 0usize;
        for (rank, rule) in merges.iter().enumerate() {
            // The separator is the first space after the first character (a token is never
            // empty, and in this alphabet a token holds no raw space).
            let split = rule
                .char_indices()
                .nth(1)
                .and_then(|(first, _)| rule[first..].find(' ').map(|p| first + p));
            let Some(split) = split else {
                return Err(TokenizerError::BadMerge {
                    index: rank,
                    rule: rule.to_string(),
                });
            };
            let (left, right) = (&rule[..split], &rule[split + 1..]);
            let merged = format!("{left}{right}");
            match (
                token_ids.get(left),
                token_ids.get(right),
                token_ids.get(&merged),
            ) {
                (Some(&l), Some(&r), Some(&m)) => {
                    merge_map.entry((l, r)).or_insert((rank as u32, m));
                }
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            log::warn!(
                "{skipped} BPE merge rules name tokens missing from the vocabulary; ignored"
            );
        }

        let mut piece_bytes = Vec::new();
        let mut piece_starts = Vec::with_capacity(vocab_size + 1);
        for (text, ty) in tokens.iter().zip(&token_types) {
            piece_starts.push(piece_bytes.len());
            if ty.is_special() {
                piece_bytes.extend_from_slice(text.as_bytes());
            } else {
                for c in text.chars() {
                    match char_to_byte(c) {
                        Some(b) => piece_bytes.push(b),
                        // Not in the byte alphabet: keep the character itself.
                        None => {
                            piece_bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes())
                        }
                    }
                }
            }
        }
        piece_starts.push(piece_bytes.len());

        let mut specials_by_first_byte = vec![Vec::new(); 256];
        for (id, (text, ty)) in tokens.iter().zip(&token_types).enumerate() {
            if ty.is_special() && !text.is_empty() {
                specials_by_first_byte[text.as_bytes()[0] as usize].push(id as u32);
            }
        }
        for list in &mut specials_by_first_byte {
            list.sort_by_key(|&id| (Reverse(tokens[id as usize].len()), id));
        }

        let mut end_of_generation: Vec<u32> =
            [ids.eos, ids.eot, ids.eom].into_iter().flatten().collect();
        for (id, (text, ty)) in tokens.iter().zip(&token_types).enumerate() {
            if *ty == TokenType::Control && END_OF_GENERATION_TEXTS.contains(&text.as_str()) {
                end_of_generation.push(id as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        Ok(Self {
            tokens,
            token_types,
            piece_bytes,
            piece_starts,
            token_ids,
            byte_tokens,
            merges: merge_map,
            specials_by_first_byte,
            pre,
            bos: ids.bos,
            eos: ids.eos,
            add_bos: ids.add_bos,
            add_eos: ids.add_eos,
            end_of_generation,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Beginning-of-sequence token, if the model declares one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token, if the model declares one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model wants BOS prepended (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether generation should stop at `id` (EOS, EOT, or a control token such as `<|im_end|>`).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The vocabulary string of `id`, in the byte-to-unicode alphabet (`Ġthe`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the vocabulary string `text` (byte-to-unicode alphabet).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_ids.get(text).copied()
    }

    /// The type of token `id`.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.token_types.get(id as usize).copied()
    }

    /// The bytes token `id` stands for (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if i >= self.tokens.len() {
            return None;
        }
        Some(&self.piece_bytes[self.piece_starts[i]..self.piece_starts[i + 1]])
    }

    /// Encodes plain text: special-token strings in it are encoded as ordinary text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, EncodeOptions::default())
    }

    /// Encodes text with the given options.
    pub fn encode_with(&self, text: &str, options: EncodeOptions) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if options.add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut words = Vec::new();
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        let bytes = text.as_bytes();
        let mut span_start = 0;
        let mut i = 0;
        while i < bytes.len() {
            match self.special_at(&bytes[i..], options.parse_special) {
                // Specials start with a UTF-8 leading byte, so `i` is a char boundary here.
                Some((id, len)) => {
                    self.encode_span(&text[span_start..i], &mut words, &mut cache, &mut out);
                    out.push(id);
                    i += len;
                    span_start = i;
                }
                None => i += 1,
            }
        }
        self.encode_span(&text[span_start..], &mut words, &mut cache, &mut out);
        if options.add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// The special token starting `rest`, longest first, with its length in bytes.
    fn special_at(&self, rest: &[u8], parse_special: bool) -> Option<(u32, usize)> {
        self.specials_by_first_byte[rest[0] as usize]
            .iter()
            .filter(|&&id| parse_special || self.token_types[id as usize] == TokenType::UserDefined)
            .map(|&id| (id, self.tokens[id as usize].as_bytes()))
            .find(|(_, t)| rest.starts_with(t))
            .map(|(id, t)| (id, t.len()))
    }

    fn encode_span<'t>(
        &self,
        span: &'t str,
        words: &mut Vec<&'t str>,
        cache: &mut HashMap<&'t str, Vec<u32>>,
        out: &mut Vec<u32>,
    ) {
        if span.is_empty() {
            return;
        }
        words.clear();
        self.pre.split(span, words);
        for &word in words.iter() {
            let ids = cache
                .entry(word)
                .or_insert_with(|| self.bpe(word.as_bytes()));
            out.extend_from_slice(ids);
        }
    }

    /// Merges one word's bytes: lowest rank first, leftmost on ties.
    fn bpe(&self, word: &[u8]) -> Vec<u32> {
        const DEAD: u32 = u32::MAX;
        let mut ids: Vec<u32> = word
            .iter()
            .filter_map(|&b| self.byte_tokens[b as usize])
            .collect();
        let n = ids.len();
        if n < 2 {
            return ids;
        }
        // Doubly linked list over the symbols; `n` ends `next`, `usize::MAX` ends `prev`.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        // Candidates: (rank, left position, left id, right id, merged id); entries made stale by
        // earlier merges are recognized by their ids no longer matching.
        let mut heap = BinaryHeap::with_capacity(n);
        let push = |heap: &mut BinaryHeap<_>, ids: &[u32], left: usize, right: usize| {
            if let Some(&(rank, merged)) = self.merges.get(&(ids[left], ids[right])) {
                heap.push(Reverse((rank, left, ids[left], ids[right], merged)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &ids, i, i + 1);
        }
        while let Some(Reverse((_, left, left_id, right_id, merged))) = heap.pop() {
            let right = next[left];
            if right >= n || ids[left] != left_id || ids[right] != right_id {
                continue;
            }
            ids[left] = merged;
            ids[right] = DEAD;
            next[left] = next[right];
            if next[left] < n {
                prev[next[left]] = left;
                push(&mut heap, &ids, left, next[left]);
            }
            if prev[left] != usize::MAX {
                push(&mut heap, &ids, prev[left], left);
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            out.push(ids[i]);
            i = next[i];
        }
        out
    }

    /// Decodes ids to text; special tokens appear as their text. Bytes that are not valid
    /// UTF-8 (a sequence cut off by the end of `ids`) become U+FFFD, and so does an id outside
    /// the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id).unwrap_or(REPLACEMENT));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The vocabulary itself is too long to print.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// UTF-8 of U+FFFD.
const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// Decodes a stream of tokens into text, emitting only complete UTF-8 characters: bytes of a
/// character split across tokens wait for the rest.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds token `id` and returns the text it completes (possibly empty). Invalid bytes become
    /// U+FFFD as soon as they are known to be invalid.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(tokenizer.token_bytes(id).unwrap_or(REPLACEMENT));
        let mut text = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    text.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = consumed + e.valid_up_to();
                    // The prefix up to `valid` was just checked, so this cannot fail.
                    text.push_str(
                        std::str::from_utf8(&self.pending[consumed..valid]).unwrap_or(""),
                    );
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            consumed = valid;
                            break;
                        }
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            consumed = valid + bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        text
    }

    /// Ends the stream: returns what is left, an incomplete character as U+FFFD.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// GPT-2's byte-to-unicode alphabet: printable Latin-1 bytes map to themselves, the other 68
/// bytes to U+0100.. in byte order, so every token is printable text.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    let mut b = 0usize;
    while b < 256 {
        table[b] = if is_printable_byte(b as u8) {
            b as u8 as char
        } else {
            let c = match char::from_u32(0x100 + next_extra) {
                Some(c) => c,
                None => '\0',
            };
            next_extra += 1;
            c
        };
        b += 1;
    }
    table
};

const fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Inverse of [`BYTE_TO_CHAR`].
fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    if c < 0x100 {
        return is_printable_byte(c as u8).then_some(c as u8);
    }
    // The n-th non-printable byte maps to U+0100 + n.
    let n = c - 0x100;
    (0u8..=255)
        .filter(|&b| !is_printable_byte(b))
        .nth(n as usize)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

fn classify(c: char) -> CharClass {
    if c.is_ascii() {
        match c {
            'a'..='z' | 'A'..='Z' => CharClass::Letter,
            '0'..='9' => CharClass::Number,
            ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' => CharClass::Space,
            _ => CharClass::Other,
        }
    } else if c.is_whitespace() {
        CharClass::Space
    } else if c.is_numeric() {
        CharClass::Number
    } else if is_letter(c) {
        CharClass::Letter
    } else {
        CharClass::Other
    }
}

/// The GPT-2 pattern, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// as a hand-written scanner (the structure of llama.cpp's `unicode_regex_split_custom_gpt2`).
fn split_gpt2<'t>(text: &'t str, words: &mut Vec<&'t str>) {
    let chars: Vec<(usize, char, CharClass)> = text
        .char_indices()
        .map(|(i, c)| (i, c, classify(c)))
        .collect();
    let n = chars.len();
    let class_at = |k: usize| chars.get(k).map(|&(_, _, class)| class);
    let byte_at = |k: usize| chars.get(k).map_or(text.len(), |&(i, _, _)| i);
    let mut pos = 0;
    while pos < n {
        let start = pos;
        pos = gpt2_word_end(&chars, pos, class_at);
        words.push(&text[byte_at(start)..byte_at(pos)]);
    }
}

/// End (exclusive, in chars) of the GPT-2 pattern match starting at `pos`.
fn gpt2_word_end(
    chars: &[(usize, char, CharClass)],
    pos: usize,
    class_at: impl Fn(usize) -> Option<CharClass>,
) -> usize {
    let n = chars.len();
    let ch = |k: usize| chars.get(k).map(|&(_, c, _)| c);
    let c = chars[pos].1;

    // 's 't 're 've 'm 'll 'd (lower case only, as in the pattern)
    if c == '\'' {
        match (ch(pos + 1), ch(pos + 2)) {
            (Some('s' | 't' | 'm' | 'd'), _) => return pos + 2,
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => {
                return pos + 3
            }
            _ => {}
        }
    }

    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional single space, then a run.
    let (run_start, run_class) = if c == ' ' {
        (pos + 1, class_at(pos + 1))
    } else {
        (pos, class_at(pos))
    };
    if let Some(class @ (CharClass::Letter | CharClass::Number | CharClass::Other)) = run_class {
        let mut end = run_start;
        while class_at(end) == Some(class) {
            end += 1;
        }
        return end;
    }

    // `\s+(?!\S)`: a whitespace run followed by a non-space leaves its last character to
    // start the next word (as ` word`); `\s+`: a run at the end is taken whole.
    let mut end = pos;
    while class_at(end) == Some(CharClass::Space) {
        end += 1;
    }
    if end - pos > 1 && end < n {
        return end - 1;
    }
    end.max(pos + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::test_writer::Writer;
    use crate::model::gguf::{GgufValue, GgufValueType};
    use rand::{Rng, SeedableRng};

    fn byte_level(s: &str) -> String {
        s.bytes().map(|b| BYTE_TO_CHAR[b as usize]).collect()
    }

    /// A GGUF with the 256 byte tokens, `extra` tokens and `merges` (both in plain text; they are
    /// converted to the byte-level alphabet), and ChatML-style specials.
    fn tiny_gguf(extra: &[&str], merges: &[&str], pre: &str) -> Writer {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
            "<user>".into(),
        ];
        let mut types = vec![3, 3, 3, 4];
        tokens.extend((0..=255u8).map(|b| BYTE_TO_CHAR[b as usize].to_string()));
        types.extend([1; 256]);
        for e in extra {
            tokens.push(byte_level(e));
            types.push(1);
        }
        let merges: Vec<String> = merges
            .iter()
            .map(|m| {
                let (l, r) = m.split_once('|').unwrap();
                format!("{} {}", byte_level(l), byte_level(r))
            })
            .collect();
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let merge_refs: Vec<&str> = merges.iter().map(String::as_str).collect();
        Writer::new(3)
            .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", GgufValue::String(pre.into()))
            .kv("tokenizer.ggml.tokens", Writer::string_array(&token_refs))
            .kv(
                "tokenizer.ggml.token_type",
                GgufValue::Array {
                    elem: GgufValueType::I32,
                    items: types.into_iter().map(GgufValue::I32).collect(),
                },
            )
            .kv("tokenizer.ggml.merges", Writer::string_array(&merge_refs))
            .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
            .kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(false))
    }

    fn tiny(extra: &[&str], merges: &[&str]) -> Tokenizer {
        let file = GgufFile::parse(&tiny_gguf(extra, merges, "smollm").to_bytes()).unwrap();
        Tokenizer::from_gguf(&file).unwrap()
    }

    /// Token texts of `ids`, decoded to plain text, for readable assertions.
    fn pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| String::from_utf8_lossy(t.token_bytes(id).unwrap()).into_owned())
            .collect()
    }

    fn split(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let mut words = Vec::new();
        pre.split(text, &mut words);
        words
    }

    #[test]
    fn byte_alphabet_is_a_bijection() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[0], 'Ā');
        assert_eq!(BYTE_TO_CHAR[0xAD], 'Ń');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[b as usize];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn gpt2_split() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(split(g, "Hello world"), ["Hello", " world"]);
        assert_eq!(split(g, "  a"), [" ", " a"]);
        assert_eq!(split(g, "a  "), ["a", "  "]);
        assert_eq!(split(g, "a \n b"), ["a", " \n", " b"]);
        assert_eq!(split(g, "a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(
            split(g, "I'm don't we'll 'S"),
            ["I", "'m", " don", "'t", " we", "'ll", " '", "S"]
        );
        assert_eq!(split(g, "hi!!! there?"), ["hi", "!!!", " there", "?"]);
        assert_eq!(split(g, " 12345 x"), [" 12345", " x"]);
        assert_eq!(split(g, "café naïve"), ["café", " naïve"]);
        assert_eq!(split(g, "e\u{301}"), ["e", "\u{301}"]);
        assert_eq!(split(g, "你好，世界"), ["你好", "，", "世界"]);
        assert_eq!(split(g, "a\u{a0}b"), ["a", "\u{a0}", "b"]);
        assert_eq!(split(g, " "), [" "]);
        assert_eq!(split(g, "'"), ["'"]);
        assert_eq!(split(g, "x'"), ["x", "'"]);
        assert!(split(g, "").is_empty());
    }

    #[test]
    fn smollm_split_isolates_digits() {
        let s = PreTokenizer::Smollm;
        assert_eq!(split(s, "12345"), ["1", "2", "3", "4", "5"]);
        assert_eq!(split(s, "in 2024,"), ["in", " ", "2", "0", "2", "4", ","]);
        assert_eq!(split(s, "x²½"), ["x", "²", "½"]);
        assert_eq!(split(s, "abc"), ["abc"]);
    }

    #[test]
    fn split_pieces_concatenate_to_the_input() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pool: Vec<char> = "aZé中1² \t\n\r\u{a0}'s!?.-🦀\u{301}".chars().collect();
        for _ in 0..500 {
            let len = rng.random_range(0..30);
            let text: String = (0..len)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect();
            for pre in [PreTokenizer::Gpt2, PreTokenizer::Smollm] {
                let words = split(pre, &text);
                assert_eq!(words.concat(), text);
                assert!(words.iter().all(|w| !w.is_empty()));
            }
        }
    }

    #[test]
    fn bpe_merges_by_rank_then_leftmost() {
        let t = tiny(
            &["ll", "he", "hell", "hello", "aa", "bc", "ab"],
            &["l|l", "h|e", "he|ll", "hell|o", "a|a", "b|c", "a|b"],
        );
        assert_eq!(pieces(&t, &t.encode("hello")), ["hello"]);
        assert_eq!(pieces(&t, &t.encode("aaa")), ["aa", "a"]);
        assert_eq!(pieces(&t, &t.encode("aaaa")), ["aa", "aa"]);
        // "b c" outranks "a b".
        assert_eq!(pieces(&t, &t.encode("abc")), ["a", "bc"]);
        assert_eq!(pieces(&t, &t.encode("ab")), ["ab"]);
        // Words are merged separately: no merge across the space.
        assert_eq!(pieces(&t, &t.encode("he llo")), ["he", " ", "ll", "o"]);
    }

    #[test]
    fn merges_with_missing_tokens_are_ignored() {
        // "x y" produces "xy", which is not in the vocabulary.
        let t = tiny(&[], &["x|y"]);
        assert_eq!(pieces(&t, &t.encode("xy")), ["x", "y"]);
    }

    #[test]
    fn special_tokens() {
        let t = tiny(&[], &[]);
        let chat = "<|im_start|>user\nhi<|im_end|>";
        let special = EncodeOptions {
            parse_special: true,
            add_special: false,
        };
        let ids = t.encode_with(chat, special);
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().unwrap(), 2);
        assert_eq!(ids.len(), 2 + "user\nhi".len());
        // Without parse_special, control tokens are plain text...
        let plain = t.encode(chat);
        assert!(!plain.contains(&1) && !plain.contains(&2));
        assert_eq!(plain.len(), chat.len());
        // ...but user-defined tokens are always recognized.
        assert_eq!(
            t.encode("a<user>b"),
            [t.encode("a")[0], 3, t.encode("b")[0]]
        );
        // Both decode back to the text.
        assert_eq!(t.decode(&ids), chat);
        assert_eq!(t.decode(&plain), chat);
        // Partial special: plain text.
        assert_eq!(
            t.encode_with("<|im_start", special).len(),
            "<|im_start".len()
        );
        assert!(t.is_end_of_generation(2));
        assert!(t.is_end_of_generation(0));
        assert!(!t.is_end_of_generation(1));
    }

    #[test]
    fn add_special_follows_metadata() {
        let w = tiny_gguf(&[], &[], "smollm");
        let mut w2 = Writer::new(3);
        for (k, v) in w.metadata {
            if k != "tokenizer.ggml.add_bos_token" {
                w2 = w2.kv(&k, v);
            }
        }
        let w2 = w2
            .kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(true))
            .kv("tokenizer.ggml.add_eos_token", GgufValue::Bool(true));
        let t = Tokenizer::from_gguf(&GgufFile::parse(&w2.to_bytes()).unwrap()).unwrap();
        let opts = EncodeOptions {
            parse_special: false,
            add_special: true,
        };
        let ids = t.encode_with("x", opts);
        assert_eq!((ids[0], ids[2], ids.len()), (1, 2, 3));
        assert_eq!(t.encode("x").len(), 1);
    }

    #[test]
    fn round_trip_random_utf8() {
        let t = tiny(&["ll", "he"], &["l|l", "h|e"]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..300 {
            let len = rng.random_range(0..40);
            let text: String = (0..len)
                .map(|_| loop {
                    let cp = match rng.random_range(0..4) {
                        0 => rng.random_range(0..0x80),
                        1 => rng.random_range(0x80..0x800),
                        2 => rng.random_range(0x800..0x10000),
                        _ => rng.random_range(0x10000..0x110000),
                    };
                    if let Some(c) = char::from_u32(cp) {
                        break c;
                    }
                })
                .collect();
            assert_eq!(t.decode(&t.encode(&text)), text);
        }
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let t = tiny(&[], &[]);
        let ids = t.encode("é🦀a");
        assert_eq!(ids.len(), 2 + 4 + 1);
        let mut d = StreamDecoder::new();
        let out: Vec<String> = ids.iter().map(|&id| d.push(&t, id)).collect();
        assert_eq!(out, ["", "é", "", "", "", "🦀", "a"]);
        assert_eq!(d.finish(), "");

        // An invalid byte is replaced at once; an unfinished character at the end on finish.
        let ff = t.token_id(&BYTE_TO_CHAR[0xFF].to_string()).unwrap();
        let e0 = t.token_id(&BYTE_TO_CHAR[0xE0].to_string()).unwrap();
        let a = t.encode("a")[0];
        assert_eq!(d.push(&t, a), "a");
        assert_eq!(d.push(&t, ff), "\u{FFFD}");
        assert_eq!(d.push(&t, e0), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        // Out-of-vocabulary ids decode to U+FFFD rather than failing.
        assert_eq!(d.push(&t, u32::MAX), "\u{FFFD}");
        assert_eq!(t.decode(&[a, u32::MAX]), "a\u{FFFD}");
        // Specials decode to their text.
        assert_eq!(d.push(&t, 1), "<|im_start|>");
    }

    #[test]
    fn long_text_is_fast_enough() {
        let t = tiny(&["th", "the", "he"], &["t|h", "th|e", "h|e"]);
        let text = "the quick brown fox, 1234 times. ".repeat(800);
        let start = std::time::Instant::now();
        let ids = t.encode(&text);
        assert_eq!(t.decode(&ids), text);
        // A long word is merged in O(n log n), not O(n²).
        let word = "ab".repeat(20_000);
        assert_eq!(t.decode(&t.encode(&word)), word);
        assert!(
            start.elapsed().as_secs_f64() < 10.0,
            "{:?}",
            start.elapsed()
        );
    }

    fn error_for(w: Writer) -> TokenizerError {
        Tokenizer::from_gguf(&GgufFile::parse(&w.to_bytes()).unwrap()).unwrap_err()
    }

    fn replace(w: Writer, key: &str, value: Option<GgufValue>) -> Writer {
        let mut out = Writer::new(3);
        for (k, v) in w.metadata {
            if k == key {
                if let Some(v) = value.clone() {
                    out = out.kv(&k, v);
                }
            } else {
                out = out.kv(&k, v);
            }
        }
        out
    }

    #[test]
    fn metadata_errors() {
        let e = error_for(replace(
            tiny_gguf(&[], &[], "smollm"),
            "tokenizer.ggml.model",
            Some(GgufValue::String("llama".into())),
        ));
        assert!(
            e.to_string()
                .starts_with("unsupported tokenizer model 'llama'"),
            "{e}"
        );

        let e = error_for(tiny_gguf(&[], &[], "qwen2"));
        assert_eq!(
            e.to_string(),
            "unsupported pre-tokenizer 'qwen2': kvpack implements gpt2, smollm"
        );

        let e = error_for(replace(
            tiny_gguf(&[], &[], "smollm"),
            "tokenizer.ggml.tokens",
            None,
        ));
        assert!(
            matches!(e, TokenizerError::Gguf(GgufError::MissingKey { .. })),
            "{e:?}"
        );

        let e = error_for(replace(
            tiny_gguf(&[], &[], "smollm"),
            "tokenizer.ggml.token_type",
            Some(GgufValue::Array {
                elem: GgufValueType::I32,
                items: vec![GgufValue::I32(1)],
            }),
        ));
        assert!(
            matches!(e, TokenizerError::TokenTypeCount { found: 1, .. }),
            "{e:?}"
        );

        let e = error_for(replace(
            tiny_gguf(&[], &[], "smollm"),
            "tokenizer.ggml.eos_token_id",
            Some(GgufValue::U32(100_000)),
        ));
        assert!(
            matches!(e, TokenizerError::BadSpecialId { id: 100_000, .. }),
            "{e:?}"
        );

        let e = error_for(replace(
            tiny_gguf(&[], &[], "smollm"),
            "tokenizer.ggml.merges",
            Some(Writer::string_array(&["nospace"])),
        ));
        assert!(
            matches!(e, TokenizerError::BadMerge { index: 0, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn bytes_missing_from_the_vocabulary_are_dropped() {
        let w = replace(
            replace(
                tiny_gguf(&[], &[], "smollm"),
                "tokenizer.ggml.token_type",
                None,
            ),
            "tokenizer.ggml.tokens",
            Some(Writer::string_array(&["a", "b", "ab", "Ġ"])),
        );
        let w = replace(
            w,
            "tokenizer.ggml.merges",
            Some(Writer::string_array(&["a b"])),
        );
        let t = Tokenizer::from_gguf(&GgufFile::parse(&w.to_bytes()).unwrap()).unwrap();
        assert_eq!(t.encode("ab"), [2]);
        // "\u{4}" splits into its own word and vanishes; "é" is two missing bytes.
        assert_eq!(t.encode("a\u{4}b é"), [0, 1, 3]);
        assert_eq!(t.decode(&t.encode("a\u{4}b é")), "ab ");
    }
}
