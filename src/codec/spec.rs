//! Typed format specs: what one stored vector looks like ([`VecFormat`]) and the K/V pair a cache uses
//! ([`KvFormat`]). Strings are parsed once into these; sizes follow docs/formats.md.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::CodecError;

/// The valid format strings, for error messages and `--help`.
pub const FORMAT_HINT: &str = "valid formats: f32, f16, q8_0, q4_0, turbo1..turbo4 (TurboQuant_mse; \
suffix n = norm-restoring scale, u = unbiased scale, e.g. turbo3n), turbo1p..turbo4p (TurboQuant_prod), \
turbo1.5, turbo2.5, turbo3.5 (outlier split); for a K/V pair \"K/V\" (e.g. turbo4/turbo2) or kNvM with \
N, M in 1, 2, 3, 4 (turboN), 8 (q8_0), 16 (f16), 32 (f32), e.g. k4v2, k8v4";

/// How a TurboQuant_mse code stores its scale `s` (decode: x̃ = s·Dᵀ·Hᵀ·ĉ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ScaleMode {
    /// `s = ‖x‖` (the paper; inner products shrink by about 1 − D_mse).
    #[default]
    Paper,
    /// `s = ‖x‖/‖ĉ‖`: the decoded vector has the input's norm (suffix `n`).
    Norm,
    /// `s = ‖x‖/⟨y, ĉ⟩`: ⟨x̃, x⟩ = ‖x‖², undoing the shrinkage of inner products (suffix `u`).
    Unbiased,
}

impl ScaleMode {
    /// The name suffix: "", "n" or "u".
    pub fn suffix(self) -> &'static str {
        match self {
            ScaleMode::Paper => "",
            ScaleMode::Norm => "n",
            ScaleMode::Unbiased => "u",
        }
    }

    /// The code in the GPU aux header: 0 paper, 1 norm, 2 unbiased.
    pub fn code(self) -> u32 {
        match self {
            ScaleMode::Paper => 0,
            ScaleMode::Norm => 1,
            ScaleMode::Unbiased => 2,
        }
    }
}

/// The format of one stored vector (one token, one KV head). Sizes and bit layouts: docs/formats.md.
///
/// Serialized as its name (`"turbo3"`, `"q8_0"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum VecFormat {
    /// Plain f32.
    F32,
    /// f16, two to a word.
    F16,
    /// llama.cpp Q8_0: blocks of 32 i8 with an f16 scale.
    Q8_0,
    /// llama.cpp Q4_0: blocks of 32 nibbles with an f16 scale.
    Q4_0,
    /// TurboQuant_mse, `bits` (1..=4) per value, with a scale mode.
    Turbo {
        /// Codebook index width, 1..=4.
        bits: u8,
        /// How the scale is chosen.
        scale: ScaleMode,
    },
    /// TurboQuant_prod: (bits − 1)-bit MSE code plus 1-bit QJL signs of the residual.
    TurboProd {
        /// Total bits per value, 1..=4.
        bits: u8,
    },
    /// Outlier split: two TurboQuant_mse parts of d/2 channels, the outliers at `hi` bits, the rest at
    /// `lo` bits (`turbo2.5` = 3 + 2, `turbo3.5` = 4 + 3).
    TurboSplit {
        /// Bits of the outlier half, 1..=4.
        hi: u8,
        /// Bits of the other half, 1..=4.
        lo: u8,
    },
}

impl VecFormat {
    /// The TurboQuant_mse format with the paper's scale.
    pub fn turbo(bits: u8) -> Self {
        VecFormat::Turbo {
            bits,
            scale: ScaleMode::Paper,
        }
    }

    /// `u32` words of codes per vector of dimension `d` (assumes [`Self::validate_dim`] passed).
    pub fn code_words(&self, d: usize) -> usize {
        match *self {
            VecFormat::F32 => d,
            VecFormat::F16 => d / 2,
            VecFormat::Q8_0 => d / 4,
            VecFormat::Q4_0 => d / 8,
            VecFormat::Turbo { bits, .. } => bits as usize * d / 32,
            VecFormat::TurboProd { bits } => (bits as usize - 1) * d / 32 + d / 32,
            VecFormat::TurboSplit { hi, lo } => (hi + lo) as usize * (d / 2) / 32,
        }
    }

    /// f16 scale values per vector of dimension `d` (one per 32-block for q8_0/q4_0, so this takes d).
    pub fn scale_halves(&self, d: usize) -> usize {
        match *self {
            VecFormat::F32 | VecFormat::F16 => 0,
            VecFormat::Q8_0 | VecFormat::Q4_0 => d / 32,
            VecFormat::Turbo { .. } => 1,
            VecFormat::TurboProd { .. } | VecFormat::TurboSplit { .. } => 2,
        }
    }

    /// Stored bits per value with everything counted: `(32·code_words + 16·scale_halves) / d`.
    pub fn bits_per_value(&self, d: usize) -> f64 {
        (32 * self.code_words(d) + 16 * self.scale_halves(d)) as f64 / d as f64
    }

    /// The format's name, as parsed by [`FromStr`]: "f32", "q8_0", "turbo3", "turbo3n", "turbo3u",
    /// "turbo3p", "turbo2.5", … (a split whose halves differ by other than one bit: "turbo4+2").
    pub fn name(&self) -> String {
        match *self {
            VecFormat::F32 => "f32".into(),
            VecFormat::F16 => "f16".into(),
            VecFormat::Q8_0 => "q8_0".into(),
            VecFormat::Q4_0 => "q4_0".into(),
            VecFormat::Turbo { bits, scale } => format!("turbo{bits}{}", scale.suffix()),
            VecFormat::TurboProd { bits } => format!("turbo{bits}p"),
            VecFormat::TurboSplit { hi, lo } if hi == lo + 1 => format!("turbo{lo}.5"),
            VecFormat::TurboSplit { hi, lo } => format!("turbo{hi}+{lo}"),
        }
    }

    /// The format kind code of the GPU aux header: 0 f32, 1 f16, 2 q8_0, 3 q4_0, 4 turbo, 5 turbo prod,
    /// 6 turbo split.
    pub fn kind(&self) -> u32 {
        match self {
            VecFormat::F32 => 0,
            VecFormat::F16 => 1,
            VecFormat::Q8_0 => 2,
            VecFormat::Q4_0 => 3,
            VecFormat::Turbo { .. } => 4,
            VecFormat::TurboProd { .. } => 5,
            VecFormat::TurboSplit { .. } => 6,
        }
    }

    /// Whether the format rotates vectors (the TurboQuant family) and so has a rotated domain.
    pub fn is_turbo(&self) -> bool {
        self.kind() >= 4
    }

    /// Checks the bit widths (for formats built directly rather than parsed).
    pub fn validate_bits(&self) -> Result<(), CodecError> {
        let bad = |bits: u8| CodecError::BadBits {
            format: self.name(),
            bits,
        };
        match *self {
            VecFormat::Turbo { bits, .. } | VecFormat::TurboProd { bits }
                if !(1..=4).contains(&bits) =>
            {
                return Err(bad(bits));
            }
            VecFormat::TurboSplit { hi, lo } => {
                for b in [hi, lo] {
                    if !(1..=4).contains(&b) {
                        return Err(bad(b));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether vectors of dimension `d` can be stored: f16 needs even d; q8_0/q4_0 a multiple of 32;
    /// the TurboQuant formats a power of two in 32..=256 (split formats: d/2 in that range, so d in
    /// 64..=512). Also checks the bit widths.
    pub fn validate_dim(&self, d: usize) -> Result<(), CodecError> {
        self.validate_bits()?;
        let why = match *self {
            VecFormat::F32 if d == 0 => Some("the dimension must be at least 1"),
            VecFormat::F16 if d == 0 || !d.is_multiple_of(2) => Some("f16 packs two values per word: use an even dimension"),
            VecFormat::Q8_0 | VecFormat::Q4_0 if d == 0 || !d.is_multiple_of(32) => {
                Some("block formats need a multiple of 32 (blocks of 32 values)")
            }
            VecFormat::Turbo { .. } | VecFormat::TurboProd { .. } if !turbo_dim_ok(d) => Some(
                "TurboQuant needs a power-of-two dimension from 32 to 256 (Walsh–Hadamard rotation in one \
                 workgroup); use f16 or q8_0 for this head size",
            ),
            VecFormat::TurboSplit { .. } if !d.is_multiple_of(2) || !turbo_dim_ok(d / 2) => Some(
                "split formats need d/2 to be a power of two from 32 to 256 (d = 64, 128, 256 or 512); \
                 use a whole-bit turbo format for this head size",
            ),
            _ => None,
        };
        match why {
            None => Ok(()),
            Some(why) => Err(CodecError::BadDim {
                format: self.name(),
                dim: d,
                why: why.into(),
            }),
        }
    }
}

fn turbo_dim_ok(d: usize) -> bool {
    d.is_power_of_two() && (32..=256).contains(&d)
}

fn unknown(input: &str) -> CodecError {
    CodecError::UnknownFormat {
        input: input.to_string(),
        hint: FORMAT_HINT.to_string(),
    }
}

fn parse_bits(s: &str) -> Option<u8> {
    match s {
        "1" => Some(1),
        "2" => Some(2),
        "3" => Some(3),
        "4" => Some(4),
        _ => None,
    }
}

impl FromStr for VecFormat {
    type Err = CodecError;

    fn from_str(input: &str) -> Result<Self, CodecError> {
        let s = input.trim().to_ascii_lowercase();
        let f = match s.as_str() {
            "f32" => Some(VecFormat::F32),
            "f16" => Some(VecFormat::F16),
            "q8_0" => Some(VecFormat::Q8_0),
            "q4_0" => Some(VecFormat::Q4_0),
            _ => s.strip_prefix("turbo").and_then(parse_turbo),
        };
        f.ok_or_else(|| unknown(input))
    }
}

fn parse_turbo(rest: &str) -> Option<VecFormat> {
    if let Some(lo) = rest.strip_suffix(".5") {
        let lo = parse_bits(lo)?;
        return (lo < 4).then_some(VecFormat::TurboSplit { hi: lo + 1, lo });
    }
    if let Some((hi, lo)) = rest.split_once('+') {
        return Some(VecFormat::TurboSplit {
            hi: parse_bits(hi)?,
            lo: parse_bits(lo)?,
        });
    }
    let (num, suffix) = match rest.char_indices().nth(1) {
        Some((i, _)) => rest.split_at(i),
        None => (rest, ""),
    };
    let bits = parse_bits(num)?;
    match suffix {
        "" => Some(VecFormat::Turbo {
            bits,
            scale: ScaleMode::Paper,
        }),
        "n" => Some(VecFormat::Turbo {
            bits,
            scale: ScaleMode::Norm,
        }),
        "u" => Some(VecFormat::Turbo {
            bits,
            scale: ScaleMode::Unbiased,
        }),
        "p" => Some(VecFormat::TurboProd { bits }),
        _ => None,
    }
}

impl fmt::Display for VecFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl From<VecFormat> for String {
    fn from(f: VecFormat) -> String {
        f.name()
    }
}

impl TryFrom<String> for VecFormat {
    type Error = CodecError;

    fn try_from(s: String) -> Result<Self, CodecError> {
        s.parse()
    }
}

/// The formats of a KV cache's keys and values.
///
/// Parsed from `"turbo3"` (both), `"turbo4/turbo2"` (K/V) or `"kNvM"` with N, M in 1..=4 (turboN, paper
/// scale), 8 (q8_0), 16 (f16), 32 (f32): `"k4v2"`, `"k8v4"`. Displayed as `"turbo3"` when K and V agree,
/// `"K/V"` otherwise. Serialized as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct KvFormat {
    /// Format of the keys.
    pub k: VecFormat,
    /// Format of the values.
    pub v: VecFormat,
}

impl KvFormat {
    /// Keys and values in the same format.
    pub fn uniform(f: VecFormat) -> Self {
        KvFormat { k: f, v: f }
    }

    /// Stored bits per value averaged over K and V, everything counted.
    pub fn bits_per_value(&self, d: usize) -> f64 {
        0.5 * (self.k.bits_per_value(d) + self.v.bits_per_value(d))
    }

    /// Checks both formats against the head dimension.
    pub fn validate_dim(&self, d: usize) -> Result<(), CodecError> {
        self.k.validate_dim(d)?;
        self.v.validate_dim(d)
    }
}

fn shorthand(n: &str) -> Option<VecFormat> {
    match n {
        "8" => Some(VecFormat::Q8_0),
        "16" => Some(VecFormat::F16),
        "32" => Some(VecFormat::F32),
        _ => parse_bits(n).map(VecFormat::turbo),
    }
}

impl FromStr for KvFormat {
    type Err = CodecError;

    fn from_str(input: &str) -> Result<Self, CodecError> {
        let s = input.trim().to_ascii_lowercase();
        if let Some((k, v)) = s.split_once('/') {
            let k = k.parse::<VecFormat>().map_err(|_| unknown(input))?;
            let v = v.parse::<VecFormat>().map_err(|_| unknown(input))?;
            return Ok(KvFormat { k, v });
        }
        if let Some((k, v)) = s.strip_prefix('k').and_then(|r| r.split_once('v')) {
            return match (shorthand(k), shorthand(v)) {
                (Some(k), Some(v)) => Ok(KvFormat { k, v }),
                _ => Err(unknown(input)),
            };
        }
        s.parse::<VecFormat>()
            .map(KvFormat::uniform)
            .map_err(|_| unknown(input))
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.k == self.v {
            write!(f, "{}", self.k)
        } else {
            write!(f, "{}/{}", self.k, self.v)
        }
    }
}

impl From<KvFormat> for String {
    fn from(f: KvFormat) -> String {
        f.to_string()
    }
}

impl TryFrom<String> for KvFormat {
    type Error = CodecError;

    fn try_from(s: String) -> Result<Self, CodecError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_formats() -> Vec<VecFormat> {
        let mut v = vec![
            VecFormat::F32,
            VecFormat::F16,
            VecFormat::Q8_0,
            VecFormat::Q4_0,
        ];
        for bits in 1..=4 {
            for scale in [ScaleMode::Paper, ScaleMode::Norm, ScaleMode::Unbiased] {
                v.push(VecFormat::Turbo { bits, scale });
            }
            v.push(VecFormat::TurboProd { bits });
            for lo in 1..=4 {
                v.push(VecFormat::TurboSplit { hi: bits, lo });
            }
        }
        v
    }

    #[test]
    fn names_round_trip() {
        for f in all_formats() {
            assert_eq!(f.name().parse::<VecFormat>().unwrap(), f, "{}", f.name());
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
            assert_eq!(serde_json::from_str::<VecFormat>(&json).unwrap(), f);
        }
        let named = [
            ("f32", VecFormat::F32),
            ("f16", VecFormat::F16),
            ("q8_0", VecFormat::Q8_0),
            ("q4_0", VecFormat::Q4_0),
            (
                "turbo3",
                VecFormat::Turbo {
                    bits: 3,
                    scale: ScaleMode::Paper,
                },
            ),
            (
                "turbo3n",
                VecFormat::Turbo {
                    bits: 3,
                    scale: ScaleMode::Norm,
                },
            ),
            (
                "turbo3u",
                VecFormat::Turbo {
                    bits: 3,
                    scale: ScaleMode::Unbiased,
                },
            ),
            ("turbo3p", VecFormat::TurboProd { bits: 3 }),
            ("turbo2.5", VecFormat::TurboSplit { hi: 3, lo: 2 }),
            ("turbo3.5", VecFormat::TurboSplit { hi: 4, lo: 3 }),
        ];
        for (s, f) in named {
            assert_eq!(s.parse::<VecFormat>().unwrap(), f);
            assert_eq!(f.name(), s);
        }
        assert_eq!(" Q8_0 ".parse::<VecFormat>().unwrap(), VecFormat::Q8_0);
    }

    #[test]
    fn bad_names_say_what_is_valid() {
        for s in [
            "", "turbo", "turbo5", "turbo0", "turbo3x", "turbo4.5", "q8", "k5v2", "k4v", "turbo3/",
            "bf16", "turboé", "k4vé",
        ] {
            let e = s.parse::<KvFormat>().unwrap_err();
            match &e {
                CodecError::UnknownFormat { input, hint } => {
                    assert_eq!(input, s);
                    assert!(hint.contains("k4v2") && hint.contains("turbo2.5"));
                }
                other => panic!("{s}: {other:?}"),
            }
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{s:?}")) && msg.contains("q8_0"),
                "{msg}"
            );
        }
    }

    #[test]
    fn kv_formats() {
        let t = |b| VecFormat::turbo(b);
        assert_eq!(
            "turbo3".parse::<KvFormat>().unwrap(),
            KvFormat::uniform(t(3))
        );
        assert_eq!(
            "turbo4/turbo2".parse::<KvFormat>().unwrap(),
            KvFormat { k: t(4), v: t(2) }
        );
        assert_eq!(
            "k4v2".parse::<KvFormat>().unwrap(),
            KvFormat { k: t(4), v: t(2) }
        );
        assert_eq!(
            "k8v4".parse::<KvFormat>().unwrap(),
            KvFormat {
                k: VecFormat::Q8_0,
                v: t(4)
            }
        );
        assert_eq!(
            "k16v32".parse::<KvFormat>().unwrap(),
            KvFormat {
                k: VecFormat::F16,
                v: VecFormat::F32
            }
        );
        assert_eq!("K3V3".parse::<KvFormat>().unwrap(), KvFormat::uniform(t(3)));
        for s in [
            "turbo3",
            "turbo4/turbo2",
            "q8_0/turbo3p",
            "turbo2.5/turbo3u",
        ] {
            let f: KvFormat = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
            assert_eq!(f.to_string().parse::<KvFormat>().unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(serde_json::from_str::<KvFormat>(&json).unwrap(), f);
        }
        let k8v4: KvFormat = "k8v4".parse().unwrap();
        assert_eq!(k8v4.bits_per_value(64), 0.5 * (8.5 + 4.25));
    }

    #[test]
    fn bits_per_value_counts_everything() {
        let bpv = |s: &str, d| s.parse::<VecFormat>().unwrap().bits_per_value(d);
        assert_eq!(bpv("turbo4", 64), 4.25);
        assert_eq!(bpv("turbo3p", 64), 3.5);
        assert_eq!(bpv("q8_0", 64), 8.5);
        assert_eq!(bpv("q4_0", 128), 4.5);
        assert_eq!(bpv("turbo2.5", 128), 2.75);
        assert_eq!(bpv("turbo3.5", 64), 3.5 + 32.0 / 64.0);
        assert_eq!(bpv("f16", 64), 16.0);
        assert_eq!(bpv("f32", 64), 32.0);
        assert_eq!(bpv("turbo1p", 128), 1.0 + 32.0 / 128.0);
        assert_eq!(bpv("turbo3u", 128), 3.125);
    }

    #[test]
    fn dimensions() {
        let ok = |s: &str, d| s.parse::<VecFormat>().unwrap().validate_dim(d).is_ok();
        assert!(ok("turbo3", 64) && ok("turbo3", 32) && ok("turbo3", 256));
        assert!(!ok("turbo3", 16) && !ok("turbo3", 96) && !ok("turbo3", 512));
        assert!(
            ok("turbo2.5", 64) && ok("turbo2.5", 512) && !ok("turbo2.5", 32) && !ok("turbo2.5", 96)
        );
        assert!(ok("q8_0", 96) && !ok("q8_0", 48) && !ok("q4_0", 0));
        assert!(ok("f16", 6) && !ok("f16", 7) && ok("f32", 7) && !ok("f32", 0));
        let e = VecFormat::turbo(3).validate_dim(80).unwrap_err();
        assert!(
            e.to_string().contains("80") && e.to_string().contains("power-of-two"),
            "{e}"
        );
        let e = VecFormat::Turbo {
            bits: 5,
            scale: ScaleMode::Paper,
        }
        .validate_dim(64)
        .unwrap_err();
        assert_eq!(
            e,
            CodecError::BadBits {
                format: "turbo5".into(),
                bits: 5
            }
        );
    }
}
