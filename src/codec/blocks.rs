//! CPU reference of the non-rotating formats: f32, f16 and llama.cpp's Q8_0 / Q4_0 block formats
//! (arithmetic of `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref` and their dequantizers, on the word
//! layout of docs/formats.md).
//!
//! Each `encode_*` returns false when the vector cannot be stored (a NaN/±Inf component or an f16 value
//! beyond 65504); the caller then stores the zero vector.

use half::f16;

use super::pack::fits_f16;

/// Values per q8_0 / q4_0 block.
pub const BLOCK: usize = 32;

pub(crate) fn encode_f32(x: &[f32], codes: &mut [u32]) -> bool {
    if !x.iter().all(|v| v.is_finite()) {
        return false;
    }
    for (w, v) in codes.iter_mut().zip(x) {
        *w = v.to_bits();
    }
    true
}

pub(crate) fn decode_f32(codes: &[u32], out: &mut [f32]) {
    for (o, &w) in out.iter_mut().zip(codes) {
        *o = f32::from_bits(w);
    }
}

pub(crate) fn encode_f16(x: &[f32], codes: &mut [u32]) -> bool {
    if !x.iter().all(|&v| fits_f16(v)) {
        return false;
    }
    for (w, pair) in codes.iter_mut().zip(x.chunks_exact(2)) {
        let lo = f16::from_f32(pair[0]).to_bits() as u32;
        let hi = f16::from_f32(pair[1]).to_bits() as u32;
        *w = lo | (hi << 16);
    }
    true
}

pub(crate) fn decode_f16(codes: &[u32], out: &mut [f32]) {
    for (pair, &w) in out.chunks_exact_mut(2).zip(codes) {
        pair[0] = f16::from_bits(w as u16).to_f32();
        pair[1] = f16::from_bits((w >> 16) as u16).to_f32();
    }
}

/// Q8_0: `dq = amax/127`, `id = 1/dq` (0 when dq = 0), `q = roundf(x·id)` (ties away from zero),
/// stored scale f16(dq).
pub(crate) fn encode_q8_0(x: &[f32], codes: &mut [u32], scales: &mut [f16]) -> bool {
    if !x.iter().all(|v| v.is_finite()) {
        return false;
    }
    codes.fill(0);
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        if !fits_f16(d) {
            return false;
        }
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        scales[b] = f16::from_f32(d);
        for (j, &v) in block.iter().enumerate() {
            // `as i8` saturates where C's conversion would be undefined (only reachable when id = inf).
            let q = (v * id).round() as i8;
            let jj = b * BLOCK + j;
            codes[jj / 4] |= (q as u8 as u32) << (8 * (jj % 4));
        }
    }
    true
}

pub(crate) fn decode_q8_0(codes: &[u32], scales: &[f16], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let q = (codes[j / 4] >> (8 * (j % 4))) as u8 as i8;
        *o = q as f32 * scales[j / BLOCK].to_f32();
    }
}

/// Q4_0: `m` = the first value of largest magnitude (signed), `dq = m / −8`, `id = 1/dq` (0 when
/// dq = 0), `q = min(15, trunc(x·id + 8.5))`, stored scale f16(dq); value `(q − 8)·dq`.
pub(crate) fn encode_q4_0(x: &[f32], codes: &mut [u32], scales: &mut [f16]) -> bool {
    if !x.iter().all(|v| v.is_finite()) {
        return false;
    }
    codes.fill(0);
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        if !fits_f16(d) {
            return false;
        }
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        scales[b] = f16::from_f32(d);
        for (j, &v) in block.iter().enumerate() {
            let q = ((v * id + 8.5) as i8).min(15) as u32;
            let jj = b * BLOCK + j;
            codes[jj / 8] |= (q & 0xF) << (4 * (jj % 8));
        }
    }
    true
}

pub(crate) fn decode_q4_0(codes: &[u32], scales: &[f16], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let q = ((codes[j / 8] >> (4 * (j % 8))) & 0xF) as i32;
        *o = (q - 8) as f32 * scales[j / BLOCK].to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_follows_llama_cpp() {
        // amax = 127 → dq = 1 exactly; 2.5 rounds away from zero to 3, −2.5 to −3, 0.49 to 0.
        let mut x = vec![0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49;
        x[4] = -127.0;
        let mut codes = vec![0u32; 8];
        let mut scales = vec![f16::ZERO; 1];
        assert!(encode_q8_0(&x, &mut codes, &mut scales));
        assert_eq!(scales[0].to_f32(), 1.0);
        assert_eq!(codes[0], 127 | (3 << 8) | ((-3i8 as u8 as u32) << 16));
        assert_eq!(codes[1], -127i8 as u8 as u32);
        let mut out = vec![0.0f32; 32];
        decode_q8_0(&codes, &scales, &mut out);
        assert_eq!(&out[..5], &[127.0, 3.0, -3.0, 0.0, -127.0]);
    }

    #[test]
    fn q4_0_follows_llama_cpp() {
        // m = −8 (first of the two largest magnitudes) → dq = 1; q = min(15, trunc(x + 8.5)).
        let mut x = vec![0.0f32; 32];
        x[0] = -8.0;
        x[1] = 8.0; // trunc(16.5) = 16 → clamped to 15 → value 7
        x[2] = 0.5; // trunc(9.0) = 9 → 1
        x[3] = -0.5; // trunc(8.0) = 8 → 0
        x[4] = 2.4; // trunc(10.9) = 10 → 2
        let mut codes = vec![0u32; 4];
        let mut scales = vec![f16::ZERO; 1];
        assert!(encode_q4_0(&x, &mut codes, &mut scales));
        assert_eq!(scales[0].to_f32(), 1.0);
        assert_eq!(
            codes[0] & 0xFFFFF,
            (15 << 4) | (9 << 8) | (8 << 12) | (10 << 16)
        );
        let mut out = vec![0.0f32; 32];
        decode_q4_0(&codes, &scales, &mut out);
        assert_eq!(&out[..5], &[-8.0, 7.0, 1.0, 0.0, 2.0]);
        // A positive extreme gives a negative dq.
        x[0] = 16.0;
        assert!(encode_q4_0(&x, &mut codes, &mut scales));
        assert_eq!(scales[0].to_f32(), -2.0);
        // All zero: dq = 0, every nibble 8.
        assert!(encode_q4_0(&[0.0; 32], &mut codes, &mut scales));
        assert_eq!(codes, vec![0x8888_8888; 4]);
    }

    #[test]
    fn f16_pairs_and_range() {
        let x = [1.0f32, -2.0, 65504.0, 1e-8];
        let mut codes = vec![0u32; 2];
        assert!(encode_f16(&x, &mut codes));
        assert_eq!(codes[0], 0x3C00 | (0xC000 << 16));
        let mut out = [0.0f32; 4];
        decode_f16(&codes, &mut out);
        assert_eq!(&out[..3], &x[..3]);
        assert!(!encode_f16(&[65504.5, 0.0], &mut codes));
        assert!(!encode_f32(&[f32::NAN], &mut codes));
    }
}
