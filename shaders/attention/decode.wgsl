// Attention computed on the compressed cache (no dequantized copy): split-K decode for one or
// more query positions, GQA, causal, optional per-key bias (Attention Matching's β).
// TurboQuant (arXiv 2504.19874): score_t = s_t·⟨H·D·q, c[idx_t]⟩/√d (+ QJL term) (+ β_t); online
// softmax over t; values accumulated in their rotated domain; the combine kernel applies one
// inverse rotation per output.
//
// One workgroup per (query position, query head, split). Tiles of WG tokens: one invocation
// scores one token; then invocation (r, j) accumulates value dimension j over tokens r, r+R, …

#include "common/format.wgsl"

override K_KIND: u32 = 0u;
override K_BITS_A: u32 = 0u;
override K_BITS_B: u32 = 0u;
override HAS_BIAS: bool = false;
// Look codebook entries up by a tree of selects on the code's bits instead of an indexed load.
// On drivers that run invocations as SIMD lanes of a CPU (lavapipe, llvmpipe, SwiftShader) an
// indexed load is a gather and the selects are much cheaper; set for CPU adapters.
override CB_SELECT: bool = false;
// Keys were stored centered (k − μ, μ per KV head): every score gets ⟨q, μ⟩ back.
override HAS_CENTER: bool = false;
// Tile size and workgroup size: a power of two, a multiple of D.
override WG: u32 = 128u;

struct Params {
    n_q: u32,          // query positions in this call (the last n_q tokens of each head)
    n_heads: u32,      // query heads
    group: u32,        // query heads per KV head
    n_splits: u32,
    split_len: u32,    // tokens per split
    k_scale_base: u32, // word offset of the K page's scales region
    v_scale_base: u32,
    scale: f32,        // softmax scale, 1/√d
    total_len: u32,    // 0: query qi is token len − n_q + qi of each head (the main region);
                       // else it sits at total_len − n_q + qi (a prefix region such as sinks)
    skip: u32,         // tokens at the start of every head that this region leaves out
    split_base: u32,   // this dispatch's first split slot in `partials`
    split_stride: u32, // split slots per (position, head) in `partials`
    ring: u32,         // 0: token t at page index first + t; else at first + t % ring
    recent: u32,       // with recent_mode: a number of trailing positions of each query
    recent_mode: u32,  // 0 all visible tokens; 1 all but the last `recent`; 2 only the last `recent`
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_page: array<u32>;
@group(0) @binding(3) var<storage, read> k_aux: array<u32>;
@group(0) @binding(4) var<storage, read> fmt_page: array<u32>;
@group(0) @binding(5) var<storage, read> fmt_aux: array<u32>;
// (first page index, length) per KV head: heads are ragged, nothing is padded.
@group(0) @binding(6) var<storage, read> heads: array<u32>;
// HAS_BIAS: β per page index. HAS_CENTER (never with HAS_BIAS: eight storage buffers is the
// portable limit): μ per KV head, D floats each.
@group(0) @binding(7) var<storage, read> bias: array<f32>;
// Per (position, head, split): m, l, acc[D], acc_qjl[D].
@group(0) @binding(8) var<storage, read_write> partials: array<f32>;

var<workgroup> qk: array<f32, 256>;
var<workgroup> qs: array<f32, 256>;
var<workgroup> kcb: array<f32, 32>;
var<workgroup> probs: array<f32, 256>;

const NEG_BIG: f32 = -3.0e38;

fn k_aux_f32(k: u32) -> f32 {
    return bitcast<f32>(k_aux[k]);
}

fn k_code_words() -> u32 {
    return code_words_of(K_KIND, K_BITS_A, K_BITS_B);
}

fn k_scale_halves() -> u32 {
    return scale_halves_of(K_KIND);
}

fn k_scale(i: u32, h: u32) -> f32 {
    let k = i * k_scale_halves() + h;
    return half_from_word(k_page[params.k_scale_base + k / 2u], k);
}

// cb[c] for a code of `bits` ≤ 4 bits by a tree of selects (no indexed load).
fn cb_select(cb: array<f32, 16>, c: u32, bits: u32) -> f32 {
    let b0 = (c & 1u) != 0u;
    let b1 = (c & 2u) != 0u;
    let b2 = (c & 4u) != 0u;
    if (bits == 1u) {
        return select(cb[0], cb[1], b0);
    }
    let p0 = select(cb[0], cb[1], b0);
    let p1 = select(cb[2], cb[3], b0);
    let q0 = select(p0, p1, b1);
    if (bits == 2u) {
        return q0;
    }
    let p2 = select(cb[4], cb[5], b0);
    let p3 = select(cb[6], cb[7], b0);
    let r0 = select(q0, select(p2, p3, b1), b2);
    if (bits == 3u) {
        return r0;
    }
    let p4 = select(cb[8], cb[9], b0);
    let p5 = select(cb[10], cb[11], b0);
    let p6 = select(cb[12], cb[13], b0);
    let p7 = select(cb[14], cb[15], b0);
    let r1 = select(select(p4, p5, b1), select(p6, p7, b1), b2);
    return select(r0, r1, (c & 8u) != 0u);
}

// Codebook entry `c` of the key codebook at `cboff`: by selects on CPU adapters.
fn kcb_at(cb: array<f32, 16>, cboff: u32, c: u32, bits: u32) -> f32 {
    if (CB_SELECT) {
        return cb_select(cb, c, bits);
    }
    return kcb[cboff + c];
}

// Σ_j qk[qoff + j]·kcb[cboff + code_j] over `count` b-bit codes starting at word `wbase`
// (count a multiple of 32: each group of 32 codes fills exactly b words). Shifts only by
// amounts that are the same in every invocation, and no dynamic vector indexing: both are slow
// on SIMD-over-invocations drivers such as lavapipe.
fn turbo_dot(wbase: u32, count: u32, b: u32, qoff: u32, cboff: u32) -> f32 {
    var acc = 0.0;
    let mask = (1u << b) - 1u;
    var cb: array<f32, 16>;
    if (CB_SELECT) {
        for (var c = 0u; c < 16u; c++) {
            cb[c] = kcb[cboff + c];
        }
    }
    if (b == 3u) {
        // 32 codes in 3 words: codes 0-9 in w0, 10 straddles w0/w1, 11-20 in w1, 21 straddles
        // w1/w2, 22-31 in w2.
        for (var g = 0u; g < count / 32u; g++) {
            let wb = wbase + 3u * g;
            let w0 = k_page[wb];
            let w1 = k_page[wb + 1u];
            let w2 = k_page[wb + 2u];
            let q0 = qoff + 32u * g;
            for (var t = 0u; t < 10u; t++) {
                acc += qk[q0 + t] * kcb_at(cb, cboff, (w0 >> (3u * t)) & 7u, 3u);
                acc += qk[q0 + 11u + t] * kcb_at(cb, cboff, (w1 >> (3u * t + 1u)) & 7u, 3u);
                acc += qk[q0 + 22u + t] * kcb_at(cb, cboff, (w2 >> (3u * t + 2u)) & 7u, 3u);
            }
            acc += qk[q0 + 10u] * kcb_at(cb, cboff, (w0 >> 30u) | ((w1 & 1u) << 2u), 3u);
            acc += qk[q0 + 21u] * kcb_at(cb, cboff, (w1 >> 31u) | ((w2 & 3u) << 1u), 3u);
        }
        return acc;
    }
    let per_word = 32u / b;
    for (var w = 0u; w < count * b / 32u; w++) {
        let word = k_page[wbase + w];
        let q0 = qoff + w * per_word;
        for (var t = 0u; t < per_word; t++) {
            acc += qk[q0 + t] * kcb_at(cb, cboff, (word >> (t * b)) & mask, b);
        }
    }
    return acc;
}

// ⟨prepared query, key i⟩ read straight from the compressed page.
fn key_dot(i: u32) -> f32 {
    let base = i * k_code_words();
    var acc = 0.0;
    switch K_KIND {
        case 0u: {
            for (var j = 0u; j < D; j++) {
                acc += qk[j] * bitcast<f32>(k_page[base + j]);
            }
        }
        case 1u: {
            for (var w = 0u; w < D / 2u; w++) {
                let h = unpack2x16float(k_page[base + w]);
                acc += qk[2u * w] * h.x + qk[2u * w + 1u] * h.y;
            }
        }
        case 2u: {
            for (var k = 0u; k < D / 32u; k++) {
                var inner = 0.0;
                for (var w = 0u; w < 8u; w++) {
                    let word = k_page[base + k * 8u + w];
                    for (var t = 0u; t < 4u; t++) {
                        inner += qk[k * 32u + w * 4u + t] * i8_from_word(word, t);
                    }
                }
                acc += k_scale(i, k) * inner;
            }
        }
        case 3u: {
            for (var k = 0u; k < D / 32u; k++) {
                var inner = 0.0;
                for (var w = 0u; w < 4u; w++) {
                    let word = k_page[base + k * 4u + w];
                    for (var t = 0u; t < 8u; t++) {
                        inner += qk[k * 32u + w * 8u + t] * (f32(u4_from_word(word, t)) - 8.0);
                    }
                }
                acc += k_scale(i, k) * inner;
            }
        }
        case 4u: {
            acc = k_scale(i, 0u) * turbo_dot(base, D, K_BITS_A, 0u, 0u);
        }
        case 5u: {
            var mse = 0.0;
            if (K_BITS_A > 0u) {
                mse = turbo_dot(base, D, K_BITS_A, 0u, 0u);
            }
            var qjl = 0.0;
            let sbase = base + K_BITS_A * D / 32u;
            for (var w = 0u; w < D / 32u; w++) {
                let word = k_page[sbase + w];
                for (var t = 0u; t < 32u; t++) {
                    let v = qs[w * 32u + t];
                    qjl += select(-v, v, ((word >> t) & 1u) == 1u);
                }
            }
            let k = sqrt(3.14159265358979 / 2.0) / f32(D);
            acc = k_scale(i, 0u) * (mse + k_scale(i, 1u) * k * qjl);
        }
        case 6u: {
            let n = D / 2u;
            let a = turbo_dot(base, n, K_BITS_A, 0u, 0u);
            let b = turbo_dot(base + n * K_BITS_A / 32u, n, K_BITS_B, n, 16u);
            acc = k_scale(i, 0u) * a + k_scale(i, 1u) * b;
        }
        default: {}
    }
    return acc;
}

// Page index of token t of a head whose tokens start at `first` (a ring wraps around).
fn slot(first: u32, t: u32) -> u32 {
    if (params.ring > 0u) {
        return first + t % params.ring;
    }
    return first + t;
}

// qk = the query in K's domain (·scale); for prod also qs = S·qk. Uniform control flow.
fn prepare_query(qbase: u32, lid: u32) {
    for (var j = lid; j < D; j += WG) {
        var ch = j;
        if (K_KIND == 6u) {
            ch = k_aux[k_aux[AUX_PERM] + j];
        }
        tw[j] = q[qbase + ch] * params.scale;
    }
    if (K_KIND >= 4u) {
        var n = D;
        if (K_KIND == 6u) {
            n = D / 2u;
        }
        let off_sa = k_aux[AUX_SIGNS_A];
        let off_sb = k_aux[AUX_SIGNS_B];
        for (var j = lid; j < D; j += WG) {
            if (j < n) {
                tw[j] = tw[j] * k_aux_f32(off_sa + j);
            } else {
                tw[j] = tw[j] * k_aux_f32(off_sb + j - n);
            }
        }
        wht_blocks(lid, WG, n, D);
        for (var c = lid; c < 16u; c += WG) {
            let bits_a = K_BITS_A;
            if (bits_a > 0u && c < (1u << bits_a)) {
                kcb[c] = k_aux_f32(k_aux[AUX_CB_A] + c);
            }
            if (K_KIND == 6u && c < (1u << K_BITS_B)) {
                kcb[16u + c] = k_aux_f32(k_aux[AUX_CB_B] + c);
            }
        }
    }
    workgroupBarrier();
    for (var j = lid; j < D; j += WG) {
        qk[j] = tw[j];
    }
    workgroupBarrier();
    if (K_KIND == 5u) {
        let off_s = k_aux[AUX_S];
        for (var r = lid; r < D; r += WG) {
            var acc = 0.0;
            for (var j = 0u; j < D; j++) {
                acc += k_aux_f32(off_s + r * D + j) * qk[j];
            }
            qs[r] = acc;
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = wid.x + wid.y * nwg.x;
    let split = flat % params.n_splits;
    let hq = (flat / params.n_splits) % params.n_heads;
    let qi = flat / (params.n_splits * params.n_heads);
    if (qi >= params.n_q) {
        return;
    }
    fmt_scale_base = params.v_scale_base;
    let h = hq / params.group;
    let first = heads[2u * h];
    let len = heads[2u * h + 1u];
    // Query qi is the token at index len − n_q + qi of its head and sees everything up to it.
    // Causal: tokens at positions up to the query's own, within this region's `len`.
    let own = select(len, params.total_len, params.total_len > 0u) + qi + 1u;
    let visible = min(len, select(0u, own - params.n_q, own >= params.n_q));
    // The full-precision window of recent tokens: the main region stops before it, the window
    // region holds nothing else.
    var lo = params.skip;
    var hi = visible;
    if (params.recent_mode == 1u) {
        hi = select(0u, visible - params.recent, visible >= params.recent);
    } else if (params.recent_mode == 2u && visible >= params.recent) {
        lo = max(lo, visible - params.recent);
    }
    let start = lo + split * params.split_len;
    let end = min(hi, start + params.split_len);

    prepare_query((qi * params.n_heads + hq) * D, lid);
    fmt_prepare(lid, WG);
    var q_center = 0.0;
    if (HAS_CENTER) {
        let qbase = (qi * params.n_heads + hq) * D;
        for (var c = 0u; c < D; c++) {
            q_center += q[qbase + c] * bias[h * D + c];
        }
        q_center *= params.scale;
    }

    // The value codebook in registers, for lookups by selects.
    var vcb: array<f32, 16>;
    if (CB_SELECT) {
        for (var c = 0u; c < 16u; c++) {
            vcb[c] = fcb[c];
        }
    }
    let groups = WG / D;
    let r = lid / D;
    let j = lid % D;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = 0.0;
    var acc_qjl = 0.0;
    for (var base = start; base < end; base += WG) {
        let t = base + lid;
        var s = NEG_BIG;
        if (t < end) {
            s = key_dot(slot(first, t)) + q_center;
            if (HAS_BIAS) {
                s += bias[slot(first, t)];
            }
        }
        let m_new = max(m, wg_max(s, lid, WG));
        var p = 0.0;
        if (t < end) {
            p = exp(s - m_new);
        }
        // TurboQuant values: fold the token's scale into its weight once, not once per dimension.
        if (FMT_KIND == 4u && t < end) {
            probs[lid] = p * fmt_scale(slot(first, t), 0u);
        } else {
            probs[lid] = p;
        }
        let alpha = exp(m - m_new);
        l = l * alpha + wg_sum(p, lid, WG);
        m = m_new;
        acc *= alpha;
        acc_qjl *= alpha;
        for (var tt = r; tt < WG; tt += groups) {
            if (base + tt < end) {
                let pt = probs[tt];
                let i = slot(first, base + tt);
                if (FMT_KIND == 4u) {
                    let c = fmt_code(i, j * FMT_BITS_A, FMT_BITS_A);
                    if (CB_SELECT) {
                        acc += pt * cb_select(vcb, c, FMT_BITS_A);
                    } else {
                        acc += pt * fcb[c];
                    }
                } else {
                    acc += pt * fmt_value(i, j);
                }
                if (FMT_KIND == 5u) {
                    acc_qjl += pt * fmt_qjl(i, j);
                }
            }
        }
    }
    // Reduce the R partial accumulators of each dimension.
    let out = ((qi * params.n_heads + hq) * params.split_stride + params.split_base + split) * (2u + 2u * D);
    workgroupBarrier();
    tr[lid] = acc;
    probs[lid] = acc_qjl;
    workgroupBarrier();
    if (lid < D) {
        var a = 0.0;
        var b = 0.0;
        for (var g = 0u; g < groups; g++) {
            a += tr[g * D + lid];
            b += probs[g * D + lid];
        }
        partials[out + 2u + lid] = a;
        partials[out + 2u + D + lid] = b;
    }
    if (lid == 0u) {
        partials[out] = m;
        partials[out + 1u] = l;
    }
}
