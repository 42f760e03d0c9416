// Encode n vectors into a page, any format (docs/formats.md), quantize-on-write.
// TurboQuant (arXiv 2504.19874, Alg. 1 and 2): y = H·D·x/‖x‖, idx_j = nearest Lloyd–Max centroid,
// prod adds σ = sign(S·r), γ = ‖r‖ for the residual r = y − c[idx].
//
// One workgroup per *pair* of page slots (2p, 2p+1): scale halves of two neighbouring vectors can
// share a u32, so one invocation writes each scale word, merging with halves outside the range.
//
// The input is f32 (SRC 0), or f16 words (two coordinates a word, coordinate 2i low): plain
// coordinates (SRC 1), or this codec's rotated domain H·D·x per part as kinds 7/8 write it
// (SRC 2; the encode then skips the permutation and the rotation). The KV cache quantizes its
// window of recent tokens from there when tokens leave it.

#include "common/format.wgsl"

struct Params {
    n: u32,            // vectors to encode
    dst_first: u32,    // page index of the first
    scale_base: u32,   // word offset of the page's scales region
    src_offset: u32,   // coordinate offset of the first input vector
    src_stride: u32,   // coordinates between input vectors
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// f32 bits (SRC 0) or f16 pairs (SRC 1, 2)
@group(0) @binding(1) var<storage, read> xs: array<u32>;
@group(0) @binding(2) var<storage, read_write> fmt_page: array<u32>;
@group(0) @binding(3) var<storage, read> fmt_aux: array<u32>;
// [count of non-finite or out-of-range vectors, smallest such input index]
@group(0) @binding(4) var<storage, read_write> status: array<atomic<u32>, 2>;

override WG: u32 = 64u;
// 0 f32, 1 f16, 2 f16 in the rotated domain (see the top)
override SRC: u32 = 0u;

var<workgroup> codes: array<u32, 256>;
var<workgroup> pk: array<atomic<u32>, 64>;
var<workgroup> sc: array<f32, 16>;
var<workgroup> blk: array<f32, 8>;

const F16_MAX: f32 = 65504.0;

fn load_input(e: u32) -> f32 {
    if (SRC == 0u) {
        return bitcast<f32>(xs[e]);
    }
    return half_from_word(xs[e / 2u], e);
}

fn non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

fn round_away(x: f32) -> f32 {
    return sign(x) * floor(abs(x) + 0.5);
}

// Index of the centroid nearest y in a 2^b codebook at aux offset `cb` (ties to the lower index).
fn nearest(y: f32, cb: u32, b: u32) -> u32 {
    var idx = 0u;
    let top = (1u << b) - 1u;
    for (var c = 0u; c < top; c++) {
        let bound = 0.5 * (fmt_aux_f32(cb + c) + fmt_aux_f32(cb + c + 1u));
        if (y > bound) {
            idx = c + 1u;
        }
    }
    return idx;
}

fn put_bits(bit: u32, b: u32, code: u32) {
    let w = bit / 32u;
    let sh = bit & 31u;
    atomicOr(&pk[w], code << sh);
    if (sh + b > 32u) {
        atomicOr(&pk[w + 1u], code >> (32u - sh));
    }
}

// Encode input vector v (page slot i); codes go to the page, scales to sc[slot * 8 + h].
// Returns true when the vector was not representable (stored as zero). Uniform control flow.
fn encode_one(v: u32, i: u32, slot: u32, lid: u32) -> bool {
    let src = params.src_offset + v * params.src_stride;
    let cw = fmt_code_words();
    for (var w = lid; w < 64u; w += WG) {
        atomicStore(&pk[w], 0u);
    }
    // Load (split formats gather the outlier channels first) and check finiteness.
    var bad_local = 0.0;
    for (var j = lid; j < D; j += WG) {
        var ch = j;
        if (SRC != 2u && (FMT_KIND == 6u || (FMT_KIND >= 7u && fmt_aux[0] == 6u))) {
            ch = fmt_aux[fmt_aux[AUX_PERM] + j];
        }
        let x = load_input(src + ch);
        if (non_finite(x) || (FMT_KIND == 1u && abs(x) > F16_MAX)) {
            bad_local = 1.0;
        }
        tw[j] = x;
    }
    var bad = wg_sum(bad_local, lid, WG) > 0.0;

    if (FMT_KIND == 0u) {
        for (var j = lid; j < D; j += WG) {
            fmt_page[i * cw + j] = select(bitcast<u32>(tw[j]), 0u, bad);
        }
    } else if (FMT_KIND == 7u || FMT_KIND == 8u) {
        // y = H·D·x per part (no normalization, no quantization): the TurboQuant codec's domain.
        let aux_kind = fmt_aux[0];
        if (aux_kind >= 4u && SRC != 2u) {
            var n = D;
            if (aux_kind == 6u) {
                n = D / 2u;
            }
            let off_sa = fmt_aux[AUX_SIGNS_A];
            let off_sb = fmt_aux[AUX_SIGNS_B];
            for (var j = lid; j < D; j += WG) {
                if (j < n) {
                    tw[j] = tw[j] * fmt_aux_f32(off_sa + j);
                } else {
                    tw[j] = tw[j] * fmt_aux_f32(off_sb + j - n);
                }
            }
            wht_blocks(lid, WG, n, D);
        }
        if (FMT_KIND == 7u) {
            for (var j = lid; j < D; j += WG) {
                fmt_page[i * cw + j] = select(bitcast<u32>(tw[j]), 0u, bad);
            }
        } else {
            // f16: a rotated coordinate out of f16 range refuses the vector.
            var big = 0.0;
            for (var j = lid; j < D; j += WG) {
                if (abs(tw[j]) > F16_MAX) {
                    big = 1.0;
                }
            }
            // Every invocation reaches the barrier in wg_sum (no short-circuit around it).
            let any_big = wg_sum(big, lid, WG) > 0.0;
            bad = bad || any_big;
            for (var w = lid; w < D / 2u; w += WG) {
                let h = pack2x16float(vec2<f32>(tw[2u * w], tw[2u * w + 1u]));
                fmt_page[i * cw + w] = select(h, 0u, bad);
            }
        }
    } else if (FMT_KIND == 1u) {
        for (var w = lid; w < D / 2u; w += WG) {
            fmt_page[i * cw + w] = select(pack2x16float(vec2<f32>(tw[2u * w], tw[2u * w + 1u])), 0u, bad);
        }
    } else if (FMT_KIND == 2u || FMT_KIND == 3u) {
        // llama.cpp quantize_row_q8_0_ref / quantize_row_q4_0_ref, block by block.
        let nb = D / 32u;
        for (var k = lid; k < nb; k += WG) {
            var amax = 0.0;
            var mx = 0.0;
            for (var t = 0u; t < 32u; t++) {
                let x = tw[k * 32u + t];
                if (abs(x) > amax) {
                    amax = abs(x);
                    mx = x;
                }
            }
            if (FMT_KIND == 2u) {
                blk[k] = amax / 127.0;
            } else {
                blk[k] = mx / -8.0;
            }
        }
        workgroupBarrier();
        var overflow = 0.0;
        for (var k = lid; k < nb; k += WG) {
            if (abs(blk[k]) > F16_MAX) {
                overflow = 1.0;
            }
        }
        let any_overflow = wg_sum(overflow, lid, WG);
        bad = bad || any_overflow > 0.0;
        let per_word = select(8u, 4u, FMT_KIND == 2u);
        for (var w = lid; w < cw; w += WG) {
            var word = 0u;
            for (var t = 0u; t < per_word; t++) {
                let j = w * per_word + t;
                let d = blk[j / 32u];
                var id = 0.0;
                if (d != 0.0) {
                    id = 1.0 / d;
                }
                if (FMT_KIND == 2u) {
                    let q = i32(round_away(tw[j] * id));
                    word = word | ((bitcast<u32>(q) & 255u) << (8u * t));
                } else {
                    let q = min(15u, u32(trunc(tw[j] * id + 8.5)));
                    word = word | (q << (4u * t));
                }
            }
            fmt_page[i * cw + w] = select(word, 0u, bad);
        }
        for (var k = lid; k < nb; k += WG) {
            sc[slot * 8u + k] = select(blk[k], 0.0, bad);
        }
    } else {
        // TurboQuant: part a = whole vector (turbo, prod) or the outlier half (split).
        var n = D;
        if (FMT_KIND == 6u) {
            n = D / 2u;
        }
        var ss_a = 0.0;
        var ss_b = 0.0;
        for (var j = lid; j < D; j += WG) {
            let x2 = tw[j] * tw[j];
            if (j < n) {
                ss_a += x2;
            } else {
                ss_b += x2;
            }
        }
        let norm_a = sqrt(wg_sum(ss_a, lid, WG));
        let norm_b = sqrt(wg_sum(ss_b, lid, WG));
        let off_sa = fmt_aux[AUX_SIGNS_A];
        let off_sb = fmt_aux[AUX_SIGNS_B];
        for (var j = lid; j < D; j += WG) {
            // Rotated input: each part's norm is the same, the rotation is already done.
            var sign_a = 1.0;
            var sign_b = 1.0;
            if (SRC != 2u) {
                if (j < n) {
                    sign_a = fmt_aux_f32(off_sa + j);
                } else {
                    sign_b = fmt_aux_f32(off_sb + j - n);
                }
            }
            if (j < n) {
                tw[j] = select(tw[j] / norm_a, 0.0, norm_a == 0.0) * sign_a;
            } else {
                tw[j] = select(tw[j] / norm_b, 0.0, norm_b == 0.0) * sign_b;
            }
        }
        if (SRC != 2u) {
            wht_blocks(lid, WG, n, D);
        }
        // Quantize each coordinate; tq keeps c[idx] for the scale and residual.
        let cb_a = fmt_aux[AUX_CB_A];
        let cb_b = fmt_aux[AUX_CB_B];
        var cc = 0.0;
        var yc = 0.0;
        for (var j = lid; j < D; j += WG) {
            let y = tw[j];
            var c = 0.0;
            if (j < n) {
                if (FMT_BITS_A > 0u) {
                    let idx = nearest(y, cb_a, FMT_BITS_A);
                    c = fmt_aux_f32(cb_a + idx);
                    if (norm_a > 0.0) {
                        put_bits(j * FMT_BITS_A, FMT_BITS_A, idx);
                    }
                }
            } else {
                let idx = nearest(y, cb_b, FMT_BITS_B);
                c = fmt_aux_f32(cb_b + idx);
                if (norm_b > 0.0) {
                    put_bits(n * FMT_BITS_A + (j - n) * FMT_BITS_B, FMT_BITS_B, idx);
                }
            }
            tq[j] = c;
            cc += c * c;
            yc += y * c;
        }
        let sum_cc = wg_sum(cc, lid, WG);
        let sum_yc = wg_sum(yc, lid, WG);
        var s_a = norm_a;
        let mode = fmt_aux[4];
        if (FMT_KIND == 4u && mode == 1u) {
            s_a = norm_a / sqrt(sum_cc);
        } else if (FMT_KIND == 4u && mode == 2u && sum_yc > 0.0) {
            s_a = norm_a / sum_yc;
        }
        var s_b = norm_b;
        if (FMT_KIND == 5u) {
            // QJL on the residual: γ = ‖r‖, σ_i = sign((S·r)_i).
            var rr = 0.0;
            for (var j = lid; j < D; j += WG) {
                let r = tw[j] - tq[j];
                tr[j] = r;
                rr += r * r;
            }
            workgroupBarrier();
            let off_s = fmt_aux[AUX_S];
            var ok = norm_a > 0.0;
            for (var r = lid; r < D; r += WG) {
                var acc = 0.0;
                for (var j = 0u; j < D; j++) {
                    acc += fmt_aux_f32(off_s + r * D + j) * tr[j];
                }
                if (acc >= 0.0 && ok) {
                    atomicOr(&pk[FMT_BITS_A * D / 32u + r / 32u], 1u << (r % 32u));
                }
            }
            s_b = select(0.0, sqrt(wg_sum(rr, lid, WG)), ok);
        }
        if (s_a > F16_MAX || s_b > F16_MAX) {
            bad = true;
        }
        workgroupBarrier();
        for (var w = lid; w < cw; w += WG) {
            fmt_page[i * cw + w] = select(atomicLoad(&pk[w]), 0u, bad);
        }
        if (lid == 0u) {
            sc[slot * 8u] = select(s_a, 0.0, bad);
            sc[slot * 8u + 1u] = select(s_b, 0.0, bad);
        }
    }
    workgroupBarrier();
    return bad;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let p = params.dst_first / 2u + wid.x + wid.y * nwg.x;
    let end = params.dst_first + params.n;
    if (2u * p >= end) {
        return;
    }
    fmt_scale_base = params.scale_base;
    for (var slot = 0u; slot < 2u; slot++) {
        let i = 2u * p + slot;
        if (i >= params.dst_first && i < end) {
            let v = i - params.dst_first;
            if (encode_one(v, i, slot, lid) && lid == 0u) {
                atomicAdd(&status[0], 1u);
                atomicMin(&status[1], v);
            }
        }
    }
    // Scale words of the pair: halves k in [2p·SH, 2p·SH + 2·SH) = words [p·SH, (p+1)·SH).
    let sh = fmt_scale_halves();
    for (var w = lid; w < sh; w += WG) {
        let word_index = params.scale_base + p * sh + w;
        let old = fmt_page[word_index];
        var halves = unpack2x16float(old);
        for (var t = 0u; t < 2u; t++) {
            let k = 2u * w + t;          // half index within the pair
            let slot = k / sh;
            let i = 2u * p + slot;
            if (i >= params.dst_first && i < end) {
                halves[t] = sc[slot * 8u + (k % sh)];
            }
        }
        // Keep halves outside the range bit-exact (unpack/pack would canonicalize NaNs).
        var word = pack2x16float(halves);
        let lo_in = (2u * p + (2u * w) / sh) >= params.dst_first && (2u * p + (2u * w) / sh) < end;
        let hi_in = (2u * p + (2u * w + 1u) / sh) >= params.dst_first && (2u * p + (2u * w + 1u) / sh) < end;
        if (!lo_in) {
            word = (word & 0xffff0000u) | (old & 0xffffu);
        }
        if (!hi_in) {
            word = (word & 0xffffu) | (old & 0xffff0000u);
        }
        fmt_page[word_index] = word;
    }
}
