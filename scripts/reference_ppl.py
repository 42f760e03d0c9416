#!/usr/bin/env python3
"""An independent float32 numpy reference for the default model (llama architecture, GGUF), to
check kvpack's f32-cache perplexity against code that shares nothing with it: the gguf package's
dequantization, the HF `tokenizers` BPE built from the GGUF's vocabulary and merges, and a plain
numpy forward pass (RMSNorm, RoPE on adjacent pairs, GQA, SwiGLU, tied embeddings).

  python3 -m pip install gguf numpy tokenizers
  python3 scripts/reference_ppl.py data/brown/ca01.txt --tokens 512      # kvpack eval ppl's protocol
  python3 scripts/reference_ppl.py --sanity                               # greedy "The capital of France is"

Protocol as `kvpack eval ppl --tokens N` (one context, no chunks): the text tokenized without
special tokens, the first N ids, every prediction of token i+1 from position i scored.
Model: --model PATH, or KVPACK_MODEL, or data/SmolLM2-135M-Instruct.Q4_1.gguf.
"""
import argparse
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402


class Model:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.fields = {k: f.contents() for k, f in r.fields.items() if k.startswith(("llama.", "tokenizer.ggml.pre"))}
        self.tokens = r.fields["tokenizer.ggml.tokens"].contents()
        self.merges = r.fields["tokenizer.ggml.merges"].contents()
        self.W = {t.name: np.ascontiguousarray(dequantize(t.data, t.tensor_type).astype(np.float32)) for t in r.tensors}
        f = self.fields
        self.n_layer = int(f["llama.block_count"])
        self.n_head = int(f["llama.attention.head_count"])
        self.n_kv = int(f["llama.attention.head_count_kv"])
        self.hd = int(f["llama.embedding_length"]) // self.n_head
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"])
        self.base = float(f["llama.rope.freq_base"])
        self.out = "output.weight" if "output.weight" in self.W else "token_embd.weight"

    def tokenizer(self):
        pre = self.fields.get("tokenizer.ggml.pre")
        if pre != "smollm":
            raise SystemExit(f"pre-tokenizer {pre!r}: this reference builds only 'smollm'")
        vocab = {t: i for i, t in enumerate(self.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        # SmolLM2's tokenizer.json: digits one by one, then byte-level with the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        # GGUF permutes Q and K: RoPE rotates adjacent pairs (x[2i], x[2i+1]).
        inv = self.base ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        c = np.cos(ang).astype(np.float32)[:, None, :]
        s = np.sin(ang).astype(np.float32)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    def forward(self, ids):
        W, T = self.W, len(ids)
        pos = np.arange(T)
        x = W["token_embd.weight"][np.asarray(ids)]
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        group = self.n_head // self.n_kv
        for layer in range(self.n_layer):
            p = f"blk.{layer}."
            h = self.rms(x, W[p + "attn_norm.weight"])
            q = self.rope((h @ W[p + "attn_q.weight"].T).reshape(T, self.n_head, self.hd), pos)
            k = self.rope((h @ W[p + "attn_k.weight"].T).reshape(T, self.n_kv, self.hd), pos)
            v = (h @ W[p + "attn_v.weight"].T).reshape(T, self.n_kv, self.hd)
            att = np.empty((T, self.n_head, self.hd), dtype=np.float32)
            for hq in range(self.n_head):
                kv = hq // group
                sc = q[:, hq] @ k[:, kv].T / np.float32(math.sqrt(self.hd)) + mask
                e = np.exp(sc - sc.max(axis=-1, keepdims=True))
                att[:, hq] = (e / e.sum(axis=-1, keepdims=True)) @ v[:, kv]
            x = x + att.reshape(T, -1) @ W[p + "attn_output.weight"].T
            h = self.rms(x, W[p + "ffn_norm.weight"])
            g = h @ W[p + "ffn_gate.weight"].T
            u = h @ W[p + "ffn_up.weight"].T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
        return self.rms(x, W["output_norm.weight"]) @ W[self.out].T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="?", help="UTF-8 text file")
    ap.add_argument("--tokens", type=int, default=512, help="tokens in the context (default 512)")
    ap.add_argument("--model", default=os.environ.get("KVPACK_MODEL", "data/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--sanity", action="store_true", help="greedy continuation of 'The capital of France is'")
    a = ap.parse_args()
    if not os.path.exists(a.model):
        raise SystemExit(f"{a.model}: no such model file (scripts/fetch-model.sh fetches the default one)")
    model = Model(a.model)
    tok = model.tokenizer()
    if a.sanity:
        ids = tok.encode("The capital of France is").ids
        out = []
        for _ in range(8):
            out.append(int(np.argmax(model.forward(ids + out)[-1])))
        print("greedy:", repr(tok.decode(out)), out)
        return
    if not a.text:
        ap.error("give a text file, or --sanity")
    with open(a.text, encoding="utf-8", newline="") as f:
        ids = tok.encode(f.read()).ids
    if len(ids) < a.tokens:
        raise SystemExit(f"{a.text} has {len(ids)} tokens; {a.tokens} are needed")
    ids = ids[: a.tokens]
    lg = model.forward(ids)[:-1].astype(np.float64)
    m = lg.max(axis=-1)
    nll = m + np.log(np.exp(lg - m[:, None]).sum(axis=-1)) - lg[np.arange(len(ids) - 1), ids[1:]]
    print(f"{a.text}: {len(ids)} tokens (first ids {ids[:8]}), {len(nll)} predictions, ppl {math.exp(nll.mean()):.4f}")


if __name__ == "__main__":
    main()
