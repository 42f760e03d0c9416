// Reading llama.cpp weight rows in their own GGUF block layout (ggml-common.h), straight from the
// file's bytes stored as u32 words. The including kernel declares
//   wq: array<u32>   (rows back to back, padded to whole words plus one spare word)
// Every block and every row starts at an even byte (blocks are 18, 20 or 34 bytes; F16/F32 rows
// are whole 16-byte units), so any 4 bytes are one word or two half-words.
//
// A row is read in units of 8 values (w_unit), or in whole blocks of 32 (w_block: the fewest word
// loads, for adapters that pay per load such as CPU rasterizers): unit u of a Q4 block is nibble byte-word u & 3, which holds
// values 4q..4q+3 (low nibbles) and 16+4q..16+4q+3 (high nibbles); of a Q8_0 block, bytes 8q..8q+7;
// of F32/F16 rows, values 8u..8u+7.

#include "common/bits.wgsl"

// GGML type id: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0.
override WTYPE: u32 = 3u;

// Eight dequantized values and the columns of their two halves.
struct WUnit {
    lo: vec4<f32>,
    hi: vec4<f32>,
    lo_col: u32,
    hi_col: u32,
}

// Bytes of a row of `cols` values.
fn w_row_bytes(cols: u32) -> u32 {
    switch WTYPE {
        case 0u: { return cols * 4u; }
        case 1u: { return cols * 2u; }
        case 2u: { return (cols / 32u) * 18u; }
        case 3u: { return (cols / 32u) * 20u; }
        default: { return (cols / 32u) * 34u; }
    }
}

// The 4 bytes starting at even byte `b`.
fn w_word(b: u32) -> u32 {
    let i = b >> 2u;
    let lo = wq[i];
    if ((b & 2u) == 0u) {
        return lo;
    }
    return (lo >> 16u) | (wq[i + 1u] << 16u);
}

// The f16 at even byte `b`.
fn w_half(b: u32) -> f32 {
    return half_from_word(wq[b >> 2u], b >> 1u);
}

// The four bytes of a word as signed values.
fn w_i8x4(word: u32) -> vec4<f32> {
    let v = vec4<u32>(word << 24u, word << 16u, word << 8u, word);
    return vec4<f32>(bitcast<vec4<i32>>(v) >> vec4<u32>(24u));
}

// Unit `u` (8 values) of the row starting at byte `rb`.
fn w_unit(rb: u32, u: u32) -> WUnit {
    var o: WUnit;
    if (WTYPE == 0u) {
        let i = (rb >> 2u) + u * 8u;
        o.lo = bitcast<vec4<f32>>(vec4<u32>(wq[i], wq[i + 1u], wq[i + 2u], wq[i + 3u]));
        o.hi = bitcast<vec4<f32>>(vec4<u32>(wq[i + 4u], wq[i + 5u], wq[i + 6u], wq[i + 7u]));
        o.lo_col = u * 8u;
        o.hi_col = u * 8u + 4u;
    } else if (WTYPE == 1u) {
        let i = (rb >> 2u) + u * 4u;
        o.lo = vec4<f32>(unpack2x16float(wq[i]), unpack2x16float(wq[i + 1u]));
        o.hi = vec4<f32>(unpack2x16float(wq[i + 2u]), unpack2x16float(wq[i + 3u]));
        o.lo_col = u * 8u;
        o.hi_col = u * 8u + 4u;
    } else if (WTYPE == 2u || WTYPE == 3u) {
        let blk = u >> 2u;
        let q = u & 3u;
        var b = rb + blk * 18u;
        if (WTYPE == 3u) {
            b = rb + blk * 20u;
        }
        let d = w_half(b);
        let qs = w_word(b + select(2u, 4u, WTYPE == 3u) + 4u * q);
        let bytes = vec4<u32>(qs, qs >> 8u, qs >> 16u, qs >> 24u);
        let nl = vec4<f32>(bytes & vec4<u32>(15u));
        let nh = vec4<f32>((bytes >> vec4<u32>(4u)) & vec4<u32>(15u));
        if (WTYPE == 2u) {
            o.lo = (nl - 8.0) * d;
            o.hi = (nh - 8.0) * d;
        } else {
            let m = w_half(b + 2u);
            o.lo = nl * d + m;
            o.hi = nh * d + m;
        }
        o.lo_col = blk * 32u + 4u * q;
        o.hi_col = blk * 32u + 16u + 4u * q;
    } else {
        let blk = u >> 2u;
        let q = u & 3u;
        let b = rb + blk * 34u;
        let d = w_half(b);
        o.lo = w_i8x4(w_word(b + 2u + 8u * q)) * d;
        o.hi = w_i8x4(w_word(b + 6u + 8u * q)) * d;
        o.lo_col = blk * 32u + 8u * q;
        o.hi_col = blk * 32u + 8u * q + 4u;
    }
    return o;
}

// (lo >> 16) | (hi << 16): the word that starts 2 bytes into `lo`.
fn w_funnel(lo: u32, hi: u32) -> u32 {
    return (lo >> 16u) | (hi << 16u);
}

// Block (32 values, in column order) of a Q4_0, Q4_1 or Q8_0 row starting at even byte `b`, read
// with one load per word it touches.
fn w_block(b: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let i = b >> 2u;
    let odd = (b & 2u) != 0u;
    if (WTYPE == 8u) {
        // 34 bytes: f16 d, 32 × i8; 9 words either way.
        var r: array<u32, 9>;
        for (var j = 0u; j < 9u; j++) {
            r[j] = wq[i + j];
        }
        let d = half_from_word(r[0], b >> 1u);
        for (var j = 0u; j < 8u; j++) {
            o[j] = w_i8x4(select(w_funnel(r[j], r[j + 1u]), r[j + 1u], odd)) * d;
        }
    } else if (WTYPE == 2u) {
        // 18 bytes: f16 d, 16 nibble bytes; 5 words either way. Value (nibble − 8) · d.
        var r: array<u32, 5>;
        for (var j = 0u; j < 5u; j++) {
            r[j] = wq[i + j];
        }
        let d = half_from_word(r[0], b >> 1u);
        for (var j = 0u; j < 4u; j++) {
            let q = select(w_funnel(r[j], r[j + 1u]), r[j + 1u], odd);
            let bytes = vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u);
            o[j] = (vec4<f32>(bytes & vec4<u32>(15u)) - 8.0) * d;
            o[j + 4u] = (vec4<f32>((bytes >> vec4<u32>(4u)) & vec4<u32>(15u)) - 8.0) * d;
        }
    } else {
        // Q4_1, 20 bytes: f16 d, f16 m, 16 nibble bytes. Rows and blocks are multiples of 20
        // bytes, so a block starts on a word: 5 words. Value nibble · d + m.
        let dm = unpack2x16float(wq[i]);
        for (var j = 0u; j < 4u; j++) {
            let q = wq[i + 1u + j];
            let bytes = vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u);
            o[j] = vec4<f32>(bytes & vec4<u32>(15u)) * dm.x + dm.y;
            o[j + 4u] = vec4<f32>((bytes >> vec4<u32>(4u)) & vec4<u32>(15u)) * dm.x + dm.y;
        }
    }
    return o;
}
