// Reading one vector format (docs/formats.md). The including kernel declares
//   fmt_page: array<u32> (codes region, then scales region at fmt_scale_base)
//   fmt_aux:  array<u32> (codec parameters: 16-word header, signs, codebooks, perm, S)
// and sets fmt_scale_base before use. Kind and bits are override constants, so each format
// compiles to its own straight-line code.

#include "common/bits.wgsl"
#include "common/hadamard.wgsl"

override D: u32 = 64u;
// 0 f32, 1 f16, 2 q8_0, 3 q4_0, 4 turbo, 5 turbo_prod, 6 turbo_split,
// 7 f32 in the rotated domain of the aux's codec (full-precision tokens beside a TurboQuant page),
// 8 f16 in that rotated domain
override FMT_KIND: u32 = 0u;
// turbo: bits; prod: bits of the MSE part (b - 1); split: bits of the outlier half
override FMT_BITS_A: u32 = 0u;
// split: bits of the other half
override FMT_BITS_B: u32 = 0u;

var<private> fmt_scale_base: u32;
// The format's codebooks (part a at 0, part b at 16), cached by fmt_prepare.
var<workgroup> fcb: array<f32, 32>;

// Cache the codebooks in workgroup memory. Every invocation must call it before fmt_value.
fn fmt_prepare(lid: u32, wg: u32) {
    if (FMT_KIND >= 4u) {
        for (var c = lid; c < 16u; c += wg) {
            if (FMT_BITS_A > 0u && c < (1u << FMT_BITS_A)) {
                fcb[c] = fmt_aux_f32(fmt_aux[AUX_CB_A] + c);
            }
            if (FMT_KIND == 6u && c < (1u << FMT_BITS_B)) {
                fcb[16u + c] = fmt_aux_f32(fmt_aux[AUX_CB_B] + c);
            }
        }
    }
    workgroupBarrier();
}

const AUX_SIGNS_A: u32 = 5u;
const AUX_CB_A: u32 = 6u;
const AUX_SIGNS_B: u32 = 7u;
const AUX_CB_B: u32 = 8u;
const AUX_PERM: u32 = 9u;
const AUX_S: u32 = 10u;

fn fmt_aux_f32(k: u32) -> f32 {
    return bitcast<f32>(fmt_aux[k]);
}

// u32 code words per vector of a format (kind, bits of part a, bits of part b).
fn code_words_of(kind: u32, bits_a: u32, bits_b: u32) -> u32 {
    switch kind {
        case 0u, 7u: { return D; }
        case 1u, 8u: { return D / 2u; }
        case 2u: { return D / 4u; }
        case 3u: { return D / 8u; }
        case 4u: { return bits_a * D / 32u; }
        case 5u: { return bits_a * D / 32u + D / 32u; }
        case 6u: { return (bits_a + bits_b) * D / 64u; }
        default: { return D; }
    }
}

// f16 scales per vector of a format kind.
fn scale_halves_of(kind: u32) -> u32 {
    switch kind {
        case 2u, 3u: { return D / 32u; }
        case 4u: { return 1u; }
        case 5u, 6u: { return 2u; }
        default: { return 0u; }
    }
}

fn fmt_code_words() -> u32 {
    return code_words_of(FMT_KIND, FMT_BITS_A, FMT_BITS_B);
}

fn fmt_scale_halves() -> u32 {
    return scale_halves_of(FMT_KIND);
}

// Scale h of vector i.
fn fmt_scale(i: u32, h: u32) -> f32 {
    let k = i * fmt_scale_halves() + h;
    return half_from_word(fmt_page[fmt_scale_base + k / 2u], k);
}

// The b-bit code at bit offset `bit` of vector i's codes.
fn fmt_code(i: u32, bit: u32, b: u32) -> u32 {
    let base = i * fmt_code_words() + bit / 32u;
    let w0 = fmt_page[base];
    var w1 = 0u;
    if ((bit & 31u) + b > 32u) {
        w1 = fmt_page[base + 1u];
    }
    return code_from_words(w0, w1, bit, b);
}

// Coordinate j of vector i in the format's own domain: the plain value for f32/f16/q8_0/q4_0,
// s·c[idx_j] in the rotated domain for TurboQuant (without prod's QJL term, see fmt_qjl).
fn fmt_value(i: u32, j: u32) -> f32 {
    let base = i * fmt_code_words();
    switch FMT_KIND {
        case 0u, 7u: {
            return bitcast<f32>(fmt_page[base + j]);
        }
        case 1u, 8u: {
            return half_from_word(fmt_page[base + j / 2u], j);
        }
        case 2u: {
            return fmt_scale(i, j / 32u) * i8_from_word(fmt_page[base + j / 4u], j % 4u);
        }
        case 3u: {
            return fmt_scale(i, j / 32u) * (f32(u4_from_word(fmt_page[base + j / 8u], j % 8u)) - 8.0);
        }
        case 4u: {
            let c = fmt_code(i, j * FMT_BITS_A, FMT_BITS_A);
            return fmt_scale(i, 0u) * fcb[c];
        }
        case 5u: {
            if (FMT_BITS_A == 0u) {
                return 0.0;
            }
            let c = fmt_code(i, j * FMT_BITS_A, FMT_BITS_A);
            return fmt_scale(i, 0u) * fcb[c];
        }
        case 6u: {
            let half_d = D / 2u;
            if (j < half_d) {
                let c = fmt_code(i, j * FMT_BITS_A, FMT_BITS_A);
                return fmt_scale(i, 0u) * fcb[c];
            }
            let c = fmt_code(i, half_d * FMT_BITS_A + (j - half_d) * FMT_BITS_B, FMT_BITS_B);
            return fmt_scale(i, 1u) * fcb[16u + c];
        }
        default: {
            return 0.0;
        }
    }
}

// TurboQuant_prod only: s·γ·σ_j, the QJL sign term of vector i before S^T and √(π/2)/d.
fn fmt_qjl(i: u32, j: u32) -> f32 {
    let w = fmt_page[i * fmt_code_words() + FMT_BITS_A * D / 32u + j / 32u];
    let sigma = select(-1.0, 1.0, ((w >> (j % 32u)) & 1u) == 1u);
    return fmt_scale(i, 0u) * fmt_scale(i, 1u) * sigma;
}

var<workgroup> tq: array<f32, 256>;
var<workgroup> tout: array<f32, 256>;

// From the format's domain to plain coordinates: reads tw (domain values) and, for prod, tq (QJL
// sign accumulators); writes tout in channel order. Every invocation must call it.
fn fmt_finish(lid: u32, wg: u32) {
    workgroupBarrier();
    if (FMT_KIND == 5u) {
        // x = D·H·(c + √(π/2)/d · Sᵀσ)
        let off_s = fmt_aux[AUX_S];
        let k = sqrt(3.14159265358979 / 2.0) / f32(D);
        for (var j = lid; j < D; j += wg) {
            var acc = 0.0;
            for (var r = 0u; r < D; r++) {
                acc += fmt_aux_f32(off_s + r * D + j) * tq[r];
            }
            tr[j] = tw[j] + k * acc;
        }
        workgroupBarrier();
        for (var j = lid; j < D; j += wg) {
            tw[j] = tr[j];
        }
    }
    if (FMT_KIND >= 4u) {
        var n = D;
        if (FMT_KIND == 6u) {
            n = D / 2u;
        }
        wht_blocks(lid, wg, n, D);
        let off_signs_a = fmt_aux[AUX_SIGNS_A];
        let off_signs_b = fmt_aux[AUX_SIGNS_B];
        for (var j = lid; j < D; j += wg) {
            if (FMT_KIND == 6u) {
                var sgn = 0.0;
                if (j < n) {
                    sgn = fmt_aux_f32(off_signs_a + j);
                } else {
                    sgn = fmt_aux_f32(off_signs_b + j - n);
                }
                tout[fmt_aux[fmt_aux[AUX_PERM] + j]] = tw[j] * sgn;
            } else {
                tout[j] = tw[j] * fmt_aux_f32(off_signs_a + j);
            }
        }
    } else {
        for (var j = lid; j < D; j += wg) {
            tout[j] = tw[j];
        }
    }
    workgroupBarrier();
}
