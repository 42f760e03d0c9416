//! A cache recipe: formats plus the full-precision sinks and recent window and key centering,
//! parsed from one string. The named presets `tq3` and `tq4` are recipes measured with
//! `kvpack eval ppl` (docs/benchmarks.md).

use crate::codec::{CodecError, KvFormat, VecFormat};
use std::fmt;
use std::str::FromStr;

/// What a cache stores and how: `FORMAT[+sN][+rN][+c][+eN[=FORMAT]]`, e.g. `k4v2+s4+r16+c` (k4v2
/// codes, the first 4 tokens and the 16 before each query in f16, keys centered) or
/// `turbo4u+s2+e1` (turbo4u codes, 2 f16 sinks, the first and last layer in q8_0), or a preset
/// name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvRecipe {
    /// The preset's name, when the recipe is one.
    pub preset: Option<&'static str>,
    /// Format of the compressed pages (keys and values).
    pub format: KvFormat,
    /// Attention sinks kept in f16 (the first tokens).
    pub sinks: usize,
    /// Tokens before each query read from the f16 window.
    pub recent: usize,
    /// Keys stored centered by their per-channel mean.
    pub center_keys: bool,
    /// The first and last layers stored in another format (`+eN[=FORMAT]`).
    pub edge: Option<EdgeLayers>,
}

/// The first `n` and the last `n` layers of a cache stored in `format` instead of the recipe's:
/// quantization error hurts most in the first layers, and a layer costs 1/30 of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLayers {
    /// Layers at each end.
    pub n: usize,
    /// Their format (q8_0 unless the recipe names one).
    pub format: KvFormat,
}

impl EdgeLayers {
    /// Whether layer `l` of `n_layer` is an edge layer.
    pub fn holds(&self, l: usize, n_layer: usize) -> bool {
        l < self.n || l + self.n >= n_layer
    }

    /// The format of layer `l` of `n_layer` in a cache of `base` with these edge layers.
    pub fn format_of(
        edge: Option<EdgeLayers>,
        base: KvFormat,
        l: usize,
        n_layer: usize,
    ) -> KvFormat {
        match edge {
            Some(e) if e.holds(l, n_layer) => e.format,
            _ => base,
        }
    }
}

/// The named presets: (name, recipe). Of the recipes measured (docs/benchmarks.md), the one with
/// the lowest KL divergence from the f32 cache at ≤ 3.5 bits per value (`tq3`, on llama.cpp's
/// protocol: 10 chunks of 512 tokens of Brown news, second halves scored) and at ≤ 4.25 (`tq4`,
/// Brown ca01 at 512 tokens), everything counted at 512 tokens, each token once. Both use the
/// unbiased scale (`u`: ⟨x̃, x⟩ = ‖x‖²) for keys and values, which beat the paper's scale and
/// the norm-restoring one at equal bits.
pub const PRESETS: &[(&str, &str)] = &[
    ("tq3", "turbo4u/turbo2u+s2+r4+c"),
    ("tq4", "turbo4u/turbo3u+s4+r14+c"),
];

impl KvRecipe {
    /// A plain format with `sinks` f16 sinks, no window, keys not centered.
    pub fn plain(format: KvFormat, sinks: usize) -> Self {
        KvRecipe {
            preset: None,
            format,
            sinks,
            recent: 0,
            center_keys: false,
            edge: None,
        }
    }

    /// The recipe written out so that it parses back to itself whatever the defaults of
    /// [`KvRecipe::parse_with`]: as it prints, with `+s0` added when it would print as a plain
    /// format (which would take the caller's sinks and window).
    pub fn explicit(&self) -> String {
        let s = self.to_string();
        if s.contains('+') || self.preset.is_some() {
            s
        } else {
            format!("{s}+s0")
        }
    }

    /// The format of layer `l` of an `n_layer`-layer cache.
    pub fn format_of(&self, l: usize, n_layer: usize) -> KvFormat {
        EdgeLayers::format_of(self.edge, self.format, l, n_layer)
    }

    /// The per-layer formats of an `n_layer`-layer cache, when the layers differ.
    pub fn layer_formats(&self, n_layer: usize) -> Option<Vec<KvFormat>> {
        self.edge
            .map(|_| (0..n_layer).map(|l| self.format_of(l, n_layer)).collect())
    }

    /// Check that every format of the recipe fits vectors of `head_dim`.
    pub fn validate_dim(&self, head_dim: usize) -> Result<(), CodecError> {
        self.format.validate_dim(head_dim)?;
        if let Some(e) = self.edge {
            e.format.validate_dim(head_dim)?;
        }
        Ok(())
    }

    /// Parse `input`; a plain format (no `+` options) takes `sinks` and `recent` from the caller
    /// (the command line's `--sinks` and `--recent`), a preset or a recipe with options ignores them.
    pub fn parse_with(input: &str, sinks: usize, recent: usize) -> Result<Self, CodecError> {
        let s = input.trim().to_ascii_lowercase();
        if let Some(&(name, recipe)) = PRESETS.iter().find(|(n, _)| *n == s) {
            let mut r: KvRecipe = recipe.parse()?;
            r.preset = Some(name);
            return Ok(r);
        }
        let mut parts = s.split('+');
        let format: KvFormat = parts.next().unwrap_or_default().parse()?;
        let mut r = KvRecipe {
            preset: None,
            format,
            sinks,
            recent,
            center_keys: false,
            edge: None,
        };
        let bad = || {
            CodecError::UnknownFormat {
            input: input.to_string(),
            hint: format!(
                "a recipe is FORMAT[+sN][+rN][+c][+eN[=FORMAT]] (sN: N sink tokens, rN: N recent tokens in f16, c: centered keys, eN: the first and last N layers in q8_0 or in FORMAT), or a preset: {}",
                PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        }
        };
        if s.contains('+') {
            r.sinks = 0;
            r.recent = 0;
        }
        for p in parts {
            if p == "c" {
                r.center_keys = true;
            } else if let Some(n) = p.strip_prefix('s') {
                r.sinks = n.parse().map_err(|_| bad())?;
            } else if let Some(n) = p.strip_prefix('r') {
                r.recent = n.parse().map_err(|_| bad())?;
            } else if let Some(e) = p.strip_prefix('e') {
                let (n, format) = match e.split_once('=') {
                    Some((n, f)) => (n, f.parse()?),
                    None => (e, KvFormat::uniform(VecFormat::Q8_0)),
                };
                let n = n.parse().map_err(|_| bad())?;
                if n == 0 {
                    return Err(bad());
                }
                r.edge = Some(EdgeLayers { n, format });
            } else {
                return Err(bad());
            }
        }
        Ok(r)
    }
}

impl FromStr for KvRecipe {
    type Err = CodecError;

    /// Parse a recipe or preset; a plain format gets no sinks and no window.
    fn from_str(input: &str) -> Result<Self, CodecError> {
        KvRecipe::parse_with(input, 0, 0)
    }
}

impl fmt::Display for KvRecipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.preset {
            return write!(f, "{p}");
        }
        write!(f, "{}", self.format)?;
        if self.sinks > 0 {
            write!(f, "+s{}", self.sinks)?;
        }
        if self.recent > 0 {
            write!(f, "+r{}", self.recent)?;
        }
        if self.center_keys {
            write!(f, "+c")?;
        }
        if let Some(e) = self.edge {
            write!(f, "+e{}", e.n)?;
            if e.format != KvFormat::uniform(VecFormat::Q8_0) {
                write!(f, "={}", e.format)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_parse_and_print() {
        let r: KvRecipe = "k4v2+s4+r16+c".parse().unwrap();
        assert_eq!(r.format, "k4v2".parse().unwrap());
        assert_eq!((r.sinks, r.recent, r.center_keys), (4, 16, true));
        assert_eq!(r.to_string(), "turbo4/turbo2+s4+r16+c");
        let p = KvRecipe::parse_with("tq3", 0, 8).unwrap();
        assert_eq!(p.to_string(), "tq3");
        assert!(p.center_keys);
        let plain = KvRecipe::parse_with("turbo3", 4, 8).unwrap();
        assert_eq!(
            (plain.sinks, plain.recent, plain.center_keys),
            (4, 8, false)
        );
        assert!("turbo3+x".parse::<KvRecipe>().is_err());
        assert!("turbo3+s".parse::<KvRecipe>().is_err());
        let e: KvRecipe = "turbo4u+s2+e1".parse().unwrap();
        assert_eq!(e.to_string(), "turbo4u+s2+e1");
        let q8: KvFormat = "q8_0".parse().unwrap();
        let t4: KvFormat = "turbo4u".parse().unwrap();
        let layers: Vec<KvFormat> = e.layer_formats(5).unwrap();
        assert_eq!(layers, vec![q8, t4, t4, t4, q8]);
        assert_eq!(e.format_of(4, 5), q8);
        let e2: KvRecipe = "turbo3+e2=q8_0/turbo4".parse().unwrap();
        assert_eq!(e2.to_string(), "turbo3+e2=q8_0/turbo4");
        assert_eq!(e2.to_string().parse::<KvRecipe>().unwrap(), e2);
        assert_eq!(e2.layer_formats(6).unwrap()[2], "turbo3".parse().unwrap());
        assert_eq!(
            e2.layer_formats(6).unwrap()[4],
            "q8_0/turbo4".parse().unwrap()
        );
        assert!(plain.layer_formats(30).is_none());
        // Written out explicitly, a recipe parses back to itself whatever the caller's defaults.
        for r in [
            KvRecipe::parse_with("turbo3", 0, 0).unwrap(),
            plain,
            e2.clone(),
            p.clone(),
        ] {
            assert_eq!(
                KvRecipe::parse_with(&r.explicit(), 4, 14).unwrap(),
                r,
                "{r}"
            );
        }
        assert_eq!(
            KvRecipe::parse_with("turbo3", 0, 0).unwrap().explicit(),
            "turbo3+s0"
        );
        for bad in ["turbo3+e0", "turbo3+e", "turbo3+ex", "turbo3+e1=bogus"] {
            assert!(bad.parse::<KvRecipe>().is_err(), "{bad}");
        }
        for (name, _) in PRESETS {
            assert!(name.parse::<KvRecipe>().is_ok(), "{name}");
        }
    }
}
