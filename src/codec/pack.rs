//! Bit-level packing shared by all formats (docs/formats.md): b-bit indices stream-packed into
//! little-endian `u32` words, and f16 halves two to a word (low half first).

use half::f16;

/// Writes `indices[j]` (b bits each, b in 1..=32) at bits `[j·b, j·b + b)` of the little-endian bit
/// stream formed by `words`; indices straddle word boundaries when 32 is not a multiple of b. Bits above
/// b of an index are ignored. The touched words are cleared first (ORed into zeroed space).
///
/// # Panics
/// When `words` is shorter than `ceil(indices.len()·b / 32)`.
pub fn pack_bits(indices: &[u32], bits: u32, words: &mut [u32]) {
    if bits == 0 {
        return;
    }
    let total = indices.len() * bits as usize;
    let n_words = total.div_ceil(32);
    words[..n_words].fill(0);
    let mask = if bits == 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    for (j, &idx) in indices.iter().enumerate() {
        let v = idx & mask;
        let bit = j * bits as usize;
        let (w, off) = (bit / 32, (bit % 32) as u32);
        words[w] |= v << off;
        if off + bits > 32 {
            words[w + 1] |= v >> (32 - off);
        }
    }
}

/// Reads index `j` (b bits, b in 1..=32) from a stream written by [`pack_bits`].
pub fn unpack_index(words: &[u32], bits: u32, j: usize) -> u32 {
    if bits == 0 {
        return 0;
    }
    let mask = if bits == 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let bit = j * bits as usize;
    let (w, off) = (bit / 32, (bit % 32) as u32);
    let mut v = words[w] >> off;
    if off + bits > 32 {
        v |= words[w + 1] << (32 - off);
    }
    v & mask
}

/// Reads `count` indices of b bits from a stream written by [`pack_bits`].
pub fn unpack_bits(words: &[u32], bits: u32, count: usize) -> Vec<u32> {
    (0..count).map(|j| unpack_index(words, bits, j)).collect()
}

/// Half `k` of a packed f16 array: word k/2, low 16 bits when k is even, high 16 bits when odd.
pub fn get_half(words: &[u32], k: usize) -> f16 {
    f16::from_bits((words[k / 2] >> (16 * (k % 2))) as u16)
}

/// Stores half `k` of a packed f16 array, leaving the other half of its word unchanged.
pub fn set_half(words: &mut [u32], k: usize, v: f16) {
    let shift = 16 * (k % 2);
    let w = &mut words[k / 2];
    *w = (*w & !(0xFFFF << shift)) | ((v.to_bits() as u32) << shift);
}

/// Largest finite f16; a value to be stored as f16 with a larger magnitude is out of range
/// (rejected, even when round-to-nearest would land on 65504).
pub const F16_MAX: f32 = 65504.0;

/// Whether `v` can be stored as f16 under the contract's range rule: finite and `|v| ≤ 65504`.
pub fn fits_f16(v: f32) -> bool {
    v.is_finite() && v.abs() <= F16_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_stream_round_trip_with_straddling() {
        for bits in 1..=8u32 {
            let n = 96usize;
            let idx: Vec<u32> = (0..n as u32)
                .map(|j| j.wrapping_mul(2654435761) >> (32 - bits))
                .collect();
            let mut words = vec![0xFFFF_FFFFu32; (n * bits as usize).div_ceil(32)];
            pack_bits(&idx, bits, &mut words);
            assert_eq!(unpack_bits(&words, bits, n), idx, "bits={bits}");
        }
    }

    #[test]
    fn bit_stream_layout_is_little_endian() {
        // 3-bit indices 0..=7 repeated: index 10 straddles words 0 and 1 (bits 30..33).
        let idx: Vec<u32> = (0..32).map(|j| j % 8).collect();
        let mut words = vec![0u32; 3];
        pack_bits(&idx, 3, &mut words);
        assert_eq!(words[0] & 0b111, 0);
        assert_eq!((words[0] >> 3) & 0b111, 1);
        // index 10 = 2 = 0b010: bits 30, 31 of word 0 hold 0b10, bit 0 of word 1 holds 0.
        assert_eq!(words[0] >> 30, 0b10);
        assert_eq!(words[1] & 1, 0);
        // index 11 = 3 at bits 33..36 = word 1 bits 1..4.
        assert_eq!((words[1] >> 1) & 0b111, 3);
    }

    #[test]
    fn halves() {
        let mut w = vec![0u32; 2];
        set_half(&mut w, 0, f16::from_f32(1.0));
        set_half(&mut w, 1, f16::from_f32(-2.0));
        set_half(&mut w, 2, f16::from_f32(0.5));
        assert_eq!(w[0], 0x3C00 | (0xC000 << 16));
        assert_eq!(w[1], 0x3800);
        assert_eq!(get_half(&w, 1).to_f32(), -2.0);
        set_half(&mut w, 0, f16::from_f32(0.0));
        assert_eq!(w[0], 0xC000 << 16);
        assert!(fits_f16(65504.0) && !fits_f16(65504.5) && !fits_f16(f32::NAN));
    }
}
