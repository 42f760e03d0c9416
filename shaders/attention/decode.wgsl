// Attention computed on the compressed cache (no dequantized copy): split-K decode for one or
// more query positions, GQA, causal, optional per-key bias (Attention Matching's β).
// TurboQuant (arXiv 2504.19874): score_t = s_t·⟨H·D·q, c[idx_t]⟩/√d (+ QJL term) (+ β_t); online
// softmax over t; values accumulated in their rotated domain; the combine kernel applies one
// inverse rotation per output.
//
// One workgroup per (query position, group of GQ query heads sharing a KV head, split): each
// key and value is read and decoded once for the GQ heads (GQA). Tiles of WG tokens: one
// invocation scores one token against the GQ queries; then invocation (r, j) accumulates value
// dimension j over tokens r, r+R, … for each of them.

#include "common/format.wgsl"
#include "common/window.wgsl"

override K_KIND: u32 = 0u;
override K_BITS_A: u32 = 0u;
override K_BITS_B: u32 = 0u;
override HAS_BIAS: bool = false;
// Score keys against a private copy of the prepared queries instead of workgroup memory: on
// drivers that run invocations as SIMD lanes of a CPU a workgroup load is a gather, a private
// array a register file or the stack (1.2x faster f16 decode attention on lavapipe). On GPUs
// the shared-memory broadcast is the right place: set for CPU adapters.
override Q_PRIVATE: bool = false;
// Look codebook entries up by a tree of selects on the code's bits instead of an indexed load.
// On drivers that run invocations as SIMD lanes of a CPU (lavapipe, llvmpipe, SwiftShader) an
// indexed load is a gather and the selects are much cheaper; set for CPU adapters.
override CB_SELECT: bool = false;
// Keys were stored centered (k − μ, μ per KV head): every score gets ⟨q, μ⟩ back.
override HAS_CENTER: bool = false;
// Tile size and workgroup size: a power of two, a multiple of D.
override WG: u32 = 128u;
// Query heads per workgroup: 1, or all the query heads of a KV head (group ≤ 4, GQ·D ≤ 256,
// GQ·WG ≤ 512).
override GQ: u32 = 1u;

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
    appended: u32,     // 0, or tokens appended since a load: the window holds no earlier ones
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

// Query g's prepared coordinates at qk[g·D/4 ..], four to a vec4 (prod: S·q at qs[g·D/4 ..]):
// one workgroup load serves four coordinates. Weights of query g at probs[g·WG ..].
var<workgroup> qk: array<vec4<f32>, 64>;
// Q_PRIVATE: each invocation's copy of qk.
var<private> qp: array<vec4<f32>, 64>;

// Four prepared query coordinates, from wherever Q_PRIVATE keeps them.
fn qvec(k: u32) -> vec4<f32> {
    if (Q_PRIVATE) {
        return qp[k];
    }
    return qk[k];
}
var<workgroup> qs: array<vec4<f32>, 64>;
var<workgroup> kcb: array<f32, 32>;
var<workgroup> probs: array<f32, 1024>;

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

// The codebook values of four consecutive b-bit codes held in the low 4·b bits of `g`.
fn group_values(g: u32, b: u32, cb: array<f32, 16>, cboff: u32) -> vec4<f32> {
    let mask = (1u << b) - 1u;
    return vec4<f32>(
        kcb_at(cb, cboff, g & mask, b),
        kcb_at(cb, cboff, (g >> b) & mask, b),
        kcb_at(cb, cboff, (g >> (2u * b)) & mask, b),
        kcb_at(cb, cboff, (g >> (3u * b)) & mask, b),
    );
}

// Σ_j qk[g·D + qoff + j]·kcb[cboff + code_j] for each query g < GQ over `count` b-bit codes
// starting at word `wbase` (count a multiple of 32: each group of 32 codes fills exactly b
// words; qoff a multiple of 4); each code is decoded once, four codes meet four query
// coordinates in one dot. Shifts only by amounts that are the same in every invocation, and no
// dynamic vector indexing: both are slow on SIMD-over-invocations drivers such as lavapipe.
fn turbo_dot(wbase: u32, count: u32, b: u32, qoff: u32, cboff: u32) -> array<f32, 4> {
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var cb: array<f32, 16>;
    if (CB_SELECT) {
        for (var c = 0u; c < 16u; c++) {
            cb[c] = kcb[cboff + c];
        }
    }
    if (b == 3u) {
        // 32 codes in 3 words; groups of 4 codes are 12 bits: groups 0, 1 in w0, 2 straddles
        // w0/w1, 3, 4 in w1, 5 straddles w1/w2, 6, 7 in w2.
        for (var blk = 0u; blk < count / 32u; blk++) {
            let wb = wbase + 3u * blk;
            let w0 = k_page[wb];
            let w1 = k_page[wb + 1u];
            let w2 = k_page[wb + 2u];
            let groups = array<u32, 8>(
                w0,
                w0 >> 12u,
                (w0 >> 24u) | (w1 << 8u),
                w1 >> 4u,
                w1 >> 16u,
                (w1 >> 28u) | (w2 << 4u),
                w2 >> 8u,
                w2 >> 20u,
            );
            let q4 = (qoff + 32u * blk) / 4u;
            for (var m = 0u; m < 8u; m++) {
                let c = group_values(groups[m], 3u, cb, cboff);
                for (var h = 0u; h < GQ; h++) {
                    acc[h] += dot(qvec(h * D / 4u + q4 + m), c);
                }
            }
        }
        return acc;
    }
    // b = 1, 2, 4: 32 / b codes a word, 8 / b groups of four.
    let per_word = 8u / b;
    for (var w = 0u; w < count * b / 32u; w++) {
        let word = k_page[wbase + w];
        let q4 = qoff / 4u + w * per_word;
        for (var m = 0u; m < per_word; m++) {
            let c = group_values(word >> (4u * b * m), b, cb, cboff);
            for (var h = 0u; h < GQ; h++) {
                acc[h] += dot(qvec(h * D / 4u + q4 + m), c);
            }
        }
    }
    return acc;
}

// ⟨prepared query g, key i⟩ for each g < GQ, read straight from the compressed page: each
// coordinate is decoded once for the GQ queries.
fn key_dot(i: u32) -> array<f32, 4> {
    let base = i * k_code_words();
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    switch K_KIND {
        case 0u: {
            for (var j4 = 0u; j4 < D / 4u; j4++) {
                let x = vec4<f32>(
                    bitcast<f32>(k_page[base + 4u * j4]),
                    bitcast<f32>(k_page[base + 4u * j4 + 1u]),
                    bitcast<f32>(k_page[base + 4u * j4 + 2u]),
                    bitcast<f32>(k_page[base + 4u * j4 + 3u]),
                );
                for (var h = 0u; h < GQ; h++) {
                    acc[h] += dot(qvec(h * D / 4u + j4), x);
                }
            }
        }
        case 1u: {
            for (var j4 = 0u; j4 < D / 4u; j4++) {
                let x = vec4<f32>(
                    unpack2x16float(k_page[base + 2u * j4]),
                    unpack2x16float(k_page[base + 2u * j4 + 1u]),
                );
                for (var h = 0u; h < GQ; h++) {
                    acc[h] += dot(qvec(h * D / 4u + j4), x);
                }
            }
        }
        case 2u, 3u: {
            // q8_0: 4 values a word; q4_0: 8.
            let per_word = select(8u, 4u, K_KIND == 2u);
            let words = 32u / per_word;
            for (var k = 0u; k < D / 32u; k++) {
                var inner = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
                for (var w = 0u; w < words; w++) {
                    let word = k_page[base + k * words + w];
                    for (var t4 = 0u; t4 < per_word / 4u; t4++) {
                        var x: vec4<f32>;
                        if (K_KIND == 2u) {
                            x = vec4<f32>(
                                i8_from_word(word, 0u),
                                i8_from_word(word, 1u),
                                i8_from_word(word, 2u),
                                i8_from_word(word, 3u),
                            );
                        } else {
                            x = vec4<f32>(
                                f32(u4_from_word(word, 4u * t4)),
                                f32(u4_from_word(word, 4u * t4 + 1u)),
                                f32(u4_from_word(word, 4u * t4 + 2u)),
                                f32(u4_from_word(word, 4u * t4 + 3u)),
                            ) - vec4<f32>(8.0);
                        }
                        let q4 = (k * 32u + w * per_word) / 4u + t4;
                        for (var h = 0u; h < GQ; h++) {
                            inner[h] += dot(qvec(h * D / 4u + q4), x);
                        }
                    }
                }
                let sk = k_scale(i, k);
                for (var h = 0u; h < GQ; h++) {
                    acc[h] += sk * inner[h];
                }
            }
        }
        case 4u: {
            let dots = turbo_dot(base, D, K_BITS_A, 0u, 0u);
            let sk = k_scale(i, 0u);
            for (var h = 0u; h < GQ; h++) {
                acc[h] = sk * dots[h];
            }
        }
        case 5u: {
            var mse = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
            if (K_BITS_A > 0u) {
                mse = turbo_dot(base, D, K_BITS_A, 0u, 0u);
            }
            var qjl = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
            let sbase = base + K_BITS_A * D / 32u;
            for (var w = 0u; w < D / 32u; w++) {
                let word = k_page[sbase + w];
                for (var t4 = 0u; t4 < 8u; t4++) {
                    let bits = word >> (4u * t4);
                    let sigma = vec4<f32>(
                        select(-1.0, 1.0, (bits & 1u) == 1u),
                        select(-1.0, 1.0, (bits & 2u) == 2u),
                        select(-1.0, 1.0, (bits & 4u) == 4u),
                        select(-1.0, 1.0, (bits & 8u) == 8u),
                    );
                    for (var h = 0u; h < GQ; h++) {
                        qjl[h] += dot(qs[h * D / 4u + w * 8u + t4], sigma);
                    }
                }
            }
            let k = sqrt(3.14159265358979 / 2.0) / f32(D);
            let s0 = k_scale(i, 0u);
            let s1 = k_scale(i, 1u);
            for (var h = 0u; h < GQ; h++) {
                acc[h] = s0 * (mse[h] + s1 * k * qjl[h]);
            }
        }
        case 6u: {
            let n = D / 2u;
            let a = turbo_dot(base, n, K_BITS_A, 0u, 0u);
            let b = turbo_dot(base + n * K_BITS_A / 32u, n, K_BITS_B, n, 16u);
            let s0 = k_scale(i, 0u);
            let s1 = k_scale(i, 1u);
            for (var h = 0u; h < GQ; h++) {
                acc[h] = s0 * a[h] + s1 * b[h];
            }
        }
        default: {}
    }
    return acc;
}

// Value codebook entry c: part a's by selects from `vcb` on CPU adapters, else from fcb
// (part b of a split format at 16).
fn vcb_at(vcb: array<f32, 16>, part_b: bool, c: u32, bits: u32) -> f32 {
    if (CB_SELECT && !part_b) {
        return cb_select(vcb, c, bits);
    }
    return fcb[select(0u, 16u, part_b) + c];
}

// Value coordinates 4·j4 .. 4·j4 + 3 of vector i in the value format's domain (TurboQuant: the
// codebook entries without the scale, which the weights carry; prod's and split's parts with
// theirs). Four coordinates per invocation: one code or word load serves them.
fn value4(i: u32, j4: u32, vcb: array<f32, 16>) -> vec4<f32> {
    let base = i * fmt_code_words();
    switch FMT_KIND {
        case 0u, 7u: {
            return vec4<f32>(
                bitcast<f32>(fmt_page[base + 4u * j4]),
                bitcast<f32>(fmt_page[base + 4u * j4 + 1u]),
                bitcast<f32>(fmt_page[base + 4u * j4 + 2u]),
                bitcast<f32>(fmt_page[base + 4u * j4 + 3u]),
            );
        }
        case 1u, 8u: {
            return vec4<f32>(
                unpack2x16float(fmt_page[base + 2u * j4]),
                unpack2x16float(fmt_page[base + 2u * j4 + 1u]),
            );
        }
        case 2u: {
            let w = fmt_page[base + j4];
            return fmt_scale(i, j4 / 8u) * vec4<f32>(
                i8_from_word(w, 0u),
                i8_from_word(w, 1u),
                i8_from_word(w, 2u),
                i8_from_word(w, 3u),
            );
        }
        case 3u: {
            let w = fmt_page[base + j4 / 2u] >> (16u * (j4 & 1u));
            return fmt_scale(i, j4 / 8u) * (vec4<f32>(
                f32(w & 15u),
                f32((w >> 4u) & 15u),
                f32((w >> 8u) & 15u),
                f32((w >> 12u) & 15u),
            ) - vec4<f32>(8.0));
        }
        case 4u, 5u, 6u: {
            var bits = FMT_BITS_A;
            var bit = 4u * j4 * FMT_BITS_A;
            var part_b = false;
            var sc = 1.0;
            if (FMT_KIND == 6u) {
                part_b = j4 >= D / 8u;
                if (part_b) {
                    bits = FMT_BITS_B;
                    bit = (D / 2u) * FMT_BITS_A + 4u * (j4 - D / 8u) * FMT_BITS_B;
                }
                sc = fmt_scale(i, select(0u, 1u, part_b));
            } else if (FMT_KIND == 5u) {
                if (FMT_BITS_A == 0u) {
                    return vec4<f32>(0.0);
                }
                sc = fmt_scale(i, 0u);
            }
            let g = fmt_code(i, bit, 4u * bits);
            let mask = (1u << bits) - 1u;
            return sc * vec4<f32>(
                vcb_at(vcb, part_b, g & mask, bits),
                vcb_at(vcb, part_b, (g >> bits) & mask, bits),
                vcb_at(vcb, part_b, (g >> (2u * bits)) & mask, bits),
                vcb_at(vcb, part_b, (g >> (3u * bits)) & mask, bits),
            );
        }
        default: {
            return vec4<f32>(0.0);
        }
    }
}

// TurboQuant_prod only: s·γ·σ for coordinates 4·j4 .. 4·j4 + 3 (see fmt_qjl).
fn qjl4(i: u32, j4: u32) -> vec4<f32> {
    let w = fmt_page[i * fmt_code_words() + FMT_BITS_A * D / 32u + j4 / 8u] >> (4u * (j4 % 8u));
    let sigma = vec4<f32>(
        select(-1.0, 1.0, (w & 1u) == 1u),
        select(-1.0, 1.0, (w & 2u) == 2u),
        select(-1.0, 1.0, (w & 4u) == 4u),
        select(-1.0, 1.0, (w & 8u) == 8u),
    );
    return fmt_scale(i, 0u) * fmt_scale(i, 1u) * sigma;
}

// Page index of token t of a head whose tokens start at `first` (a ring wraps around).
fn slot(first: u32, t: u32) -> u32 {
    if (params.ring > 0u) {
        return first + t % params.ring;
    }
    return first + t;
}

// qk[g·D/4 ..] = query g in K's domain (·scale); for prod also qs[g·D/4 ..] = S·qk. Uniform
// control flow.
fn prepare_query(qbase: u32, lid: u32, g: u32) {
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
    for (var j4 = lid; j4 < D / 4u; j4 += WG) {
        qk[g * D / 4u + j4] = vec4<f32>(tw[4u * j4], tw[4u * j4 + 1u], tw[4u * j4 + 2u], tw[4u * j4 + 3u]);
    }
    if (K_KIND == 5u) {
        let off_s = k_aux[AUX_S];
        for (var r4 = lid; r4 < D / 4u; r4 += WG) {
            var acc = vec4<f32>(0.0);
            for (var j = 0u; j < D; j++) {
                let row = off_s + 4u * r4 * D + j;
                acc += tw[j] * vec4<f32>(
                    k_aux_f32(row),
                    k_aux_f32(row + D),
                    k_aux_f32(row + 2u * D),
                    k_aux_f32(row + 3u * D),
                );
            }
            qs[g * D / 4u + r4] = acc;
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = wid.x + wid.y * nwg.x;
    let n_groups = params.n_heads / GQ;
    let split = flat % params.n_splits;
    let hq0 = ((flat / params.n_splits) % n_groups) * GQ;
    let qi = flat / (params.n_splits * n_groups);
    if (qi >= params.n_q) {
        return;
    }
    fmt_scale_base = params.v_scale_base;
    let h = hq0 / params.group;
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
    let w = window_len(params.recent, params.appended, params.n_q, qi);
    if (params.recent_mode == 1u) {
        hi = select(0u, visible - w, visible >= w);
    } else if (params.recent_mode == 2u && visible >= w) {
        lo = max(lo, visible - w);
    }
    let start = lo + split * params.split_len;
    let end = min(hi, start + params.split_len);

    var q_center = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var g = 0u; g < GQ; g++) {
        let qbase = (qi * params.n_heads + hq0 + g) * D;
        prepare_query(qbase, lid, g);
        if (HAS_CENTER) {
            var qc = 0.0;
            for (var c = 0u; c < D; c++) {
                qc += q[qbase + c] * bias[h * D + c];
            }
            q_center[g] = qc * params.scale;
        }
    }
    fmt_prepare(lid, WG);
    if (Q_PRIVATE) {
        for (var k = 0u; k < GQ * D / 4u; k++) {
            qp[k] = qk[k];
        }
    }

    // The value codebook in registers, for lookups by selects.
    var vcb: array<f32, 16>;
    if (CB_SELECT) {
        for (var c = 0u; c < 16u; c++) {
            vcb[c] = fcb[c];
        }
    }
    // Values: invocation (r, j4) accumulates coordinates 4·j4 .. 4·j4 + 3 over tokens r, r+R, …
    let lanes = D / 4u;
    let rows = WG / lanes;
    let r = lid / lanes;
    let j4 = lid % lanes;
    var m = array<f32, 4>(NEG_BIG, NEG_BIG, NEG_BIG, NEG_BIG);
    var l = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var acc = array<vec4<f32>, 4>();
    var acc_qjl = array<vec4<f32>, 4>();
    for (var base = start; base < end; base += WG) {
        let t = base + lid;
        var s = array<f32, 4>(NEG_BIG, NEG_BIG, NEG_BIG, NEG_BIG);
        // TurboQuant values: fold the token's scale into its weight once, not once per dimension.
        var v_scale = 1.0;
        if (t < end) {
            let i = slot(first, t);
            let dots = key_dot(i);
            var b = 0.0;
            if (HAS_BIAS) {
                b = bias[i];
            }
            for (var g = 0u; g < GQ; g++) {
                s[g] = dots[g] + q_center[g] + b;
            }
            if (FMT_KIND == 4u) {
                v_scale = fmt_scale(i, 0u);
            }
        }
        for (var g = 0u; g < GQ; g++) {
            let m_new = max(m[g], wg_max(s[g], lid, WG));
            var p = 0.0;
            if (t < end) {
                p = exp(s[g] - m_new);
            }
            probs[g * WG + lid] = p * v_scale;
            let alpha = exp(m[g] - m_new);
            // Each invocation sums its own tokens' weights; one reduction at the end.
            l[g] = l[g] * alpha + p;
            m[g] = m_new;
            acc[g] *= alpha;
            acc_qjl[g] *= alpha;
        }
        workgroupBarrier();
        for (var tt = r; tt < WG; tt += rows) {
            if (base + tt < end) {
                let i = slot(first, base + tt);
                let x = value4(i, j4, vcb);
                var xq = vec4<f32>(0.0);
                if (FMT_KIND == 5u) {
                    xq = qjl4(i, j4);
                }
                for (var g = 0u; g < GQ; g++) {
                    let pt = probs[g * WG + tt];
                    acc[g] += pt * x;
                    if (FMT_KIND == 5u) {
                        acc_qjl[g] += pt * xq;
                    }
                }
            }
        }
    }
    // Reduce the R partial accumulators of each dimension, query by query.
    for (var g = 0u; g < GQ; g++) {
        let l_total = wg_sum(l[g], lid, WG);
        let out = ((qi * params.n_heads + hq0 + g) * params.split_stride + params.split_base + split) * (2u + 2u * D);
        // Row r's coordinates 4·j4 .. at probs[r·D + 4·j4 ..] (rows·D = 4·WG floats).
        for (var part = 0u; part < 2u; part++) {
            workgroupBarrier();
            var v = acc[g];
            if (part == 1u) {
                v = acc_qjl[g];
            }
            if (part == 0u || FMT_KIND == 5u) {
                let at = r * D + 4u * j4;
                probs[at] = v.x;
                probs[at + 1u] = v.y;
                probs[at + 2u] = v.z;
                probs[at + 3u] = v.w;
            }
            workgroupBarrier();
            if (lid < D) {
                var a = 0.0;
                if (part == 0u || FMT_KIND == 5u) {
                    for (var k = 0u; k < rows; k++) {
                        a += probs[k * D + lid];
                    }
                }
                partials[out + 2u + part * D + lid] = a;
            }
        }
        if (lid == 0u) {
            partials[out] = m[g];
            partials[out + 1u] = l_total;
        }
    }
}
