// Bit and half-precision helpers shared by the codec and attention kernels.

// Half k of a run of f16 values packed two per u32 (even k in the low 16 bits).
fn half_from_word(word: u32, k: u32) -> f32 {
    return unpack2x16float(word)[k & 1u];
}

// The b-bit code starting at bit `bit` of a stream whose words are w0 (holding the bit) and w1
// (the next word, used only when the code straddles the boundary).
fn code_from_words(w0: u32, w1: u32, bit: u32, b: u32) -> u32 {
    let sh = bit & 31u;
    var v = w0 >> sh;
    if (sh + b > 32u) {
        v = v | (w1 << (32u - sh));
    }
    return v & ((1u << b) - 1u);
}

// Signed byte k (0..3) of a little-endian word.
fn i8_from_word(word: u32, k: u32) -> f32 {
    return f32(extractBits(bitcast<i32>(word), 8u * k, 8u));
}

// Nibble k (0..7) of a word.
fn u4_from_word(word: u32, k: u32) -> u32 {
    return (word >> (4u * k)) & 15u;
}
