"""Regenerate tokenizer_vectors.json: ground-truth token ids for SmolLM2-135M-Instruct.

Independent reference: Hugging Face `tokenizers` (Rust BPE behind a Python API), built from
the GGUF's own vocab and merges, with SmolLM2's pre-tokenizer (Digits(individual) then
ByteLevel regex) and the control tokens registered as special added tokens.

    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install gguf tokenizers
    /tmp/tokvenv/bin/python tests/data/make_tokenizer_vectors.py data/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import random
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

path = sys.argv[1] if len(sys.argv) > 1 else "data/SmolLM2-135M-Instruct.Q4_1.gguf"
reader = GGUFReader(path)
tokens = reader.fields["tokenizer.ggml.tokens"].contents()
types = reader.fields["tokenizer.ggml.token_type"].contents()
merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"

tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

named = [
    ("english", "The quick brown fox jumps over the lazy dog."),
    ("digits", "12345"),
    ("digits_mixed", "In 2024, 3.14159 and 1,000,000 people paid $42.50 (or 7%)."),
    ("punctuation", "Hello, world! What's up? I'm fine -- you're OK; they'll see... (yes) [no] {maybe} <tag/>"),
    ("contractions", "she's it'd we've I'LL DON'T y'all 'tis"),
    ("whitespace_runs", "a  b   c    d\t\te \t \t f     "),
    ("leading_spaces", "   leading and trailing   "),
    ("newlines", "line one\nline two\n\nline four\r\n\r\nend\n"),
    ("code", "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n"),
    ("emoji", "I love 🦀 and 🐍! 👨‍👩‍👧‍👦 🇫🇷 ❤️"),
    ("cjk", "你好，世界！日本語のテキスト。한국어 문장입니다."),
    ("accented", "Café crème brûlée, naïve façade, Ångström, Zürich, São Paulo, Œuvre"),
    ("combining", "e\u0301 a\u0308 n\u0303 — decomposed accents"),
    ("cyrillic_greek_arabic", "Привет мир. Γειά σου κόσμε. مرحبا بالعالم. שלום"),
    ("math_symbols", "∑ x² + ½ − ∞ ≤ π × 10⁻³ ≈ Ⅻ"),
    ("chatml", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("specials_adjacent", "<|endoftext|><|im_start|><|im_end|>text<|im_end|><|im_start"),
    ("url_email", "Visit https://example.com/path?q=1&r=two#frag or mail a.b+c@example.org"),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism"),
    ("empty", ""),
    ("single_space", " "),
    ("only_newlines", "\n\n\n"),
    ("control_chars", "tab\there\u000bvt\u000cff\u0000nul\u007fdel"),
    ("nbsp_and_unicode_spaces", "a\u00a0b\u2003c\u3000d \u00a0 e"),
    ("more_spaces", "x\u0085y\u2028z\u001cw\u001fv\u180ew\u200bq\ufeffr"),
    # SmolLM2's vocabulary has no token for bytes 04 06 13 14 16 1d c0 c1 f1 f2 f5..ff: both
    # reference implementations drop them, so these texts do not survive a round trip.
    ("dropped_control_bytes", "a\u0004b\u0006c\u0013\u0014d\u0016e\u001d f"),
    ("dropped_lead_bytes", "x\U00040000y!\U00080001!z \U000BFFFF"),
]

rng = random.Random(20240501)
pools = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r   ",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "éèêëàâäôöûüçñßÅØæœ",
    "你好世界日本語한국어",
    "🦀🐍❤️👍🏽🇫🇷",
    "αβγδεζηθПриветмир",
    "²½Ⅻ٣४",
]
for i in range(30):
    n = rng.randint(1, 60)
    text = "".join(rng.choice(rng.choice(pools)) for _ in range(n))
    named.append((f"random_{i:02}", text))

vectors = []
for name, text in named:
    ids = tok.encode(text, add_special_tokens=False).ids
    if not name.startswith("dropped_"):
        assert tok.decode(ids, skip_special_tokens=False) == text, name
    vectors.append({"name": name, "text": text, "ids": ids})

header = {
    "model": "SmolLM2-135M-Instruct.Q4_1.gguf (sha256 b179c952...)",
    "reference": "huggingface tokenizers: BPE(vocab, merges) + Digits(individual) + ByteLevel; control tokens special",
}
# One vector per line keeps the file small and its diffs readable.
with open("tests/data/tokenizer_vectors.json", "w", encoding="utf-8") as f:
    f.write("{\n")
    for k, v in header.items():
        f.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
    f.write(' "vectors": [\n')
    lines = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in vectors]
    f.write(",\n".join("  " + line for line in lines))
    f.write("\n ]\n}\n")
print(len(vectors), "vectors")
