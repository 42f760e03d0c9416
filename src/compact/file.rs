//! `.kvpack` files: a compacted context saved to disk and loaded back bit for bit.
//!
//! Layout, little-endian:
//! ```text
//! magic "KVPACK\r\n" | version u32 | model sha256 (32 bytes) | kv format: u32 length + UTF-8
//! | method: u32 length + UTF-8 | context_len u32 | head_dim u32 | n_layer u32 | n_kv_heads u32
//! version 1 (f32 tokens):
//! | per layer, per KV head: t u32 | positions t × u32 | keys t·d × f32 | values t·d × f32
//! | bias t × f32
//! version 2 (stored tokens):
//! | rotation seed u64
//! | per layer, per KV head: t u32 | positions t × u32 | bias t × f32
//! | for the keys, the values, the sink keys and the sink values: n u32 | n words × u32
//! | sha256 of everything before (32 bytes)
//! ```
//! Version 1 holds keys, values and biases in f32, and the KV format recorded in the header is
//! the one a session stores them in when it loads them. Version 2 (what `kvpack compact` writes)
//! holds each head's tokens as the cache of the recorded recipe stores them: the codes and
//! scales of docs/formats.md, bit for bit ([`crate::kv::StoredHead`]), so a loaded cache is the
//! one saved on every adapter, and the file is about the size of the cache. Writes go to a
//! temporary file that is renamed over the target, so a crash never leaves a half-written file
//! under its name.

use super::{
    CompactedContext, HeadCompaction, SavedContext, StoredCompaction, StoredContext, StoredHead,
};
use sha2::{Digest, Sha256};
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

const MAGIC: &[u8; 8] = b"KVPACK\r\n";
/// The version [`to_bytes`] writes for stored tokens; version 1 (f32 tokens) is still written
/// for [`SavedContext::F32`] and read.
const VERSION: u32 = 2;

/// Errors of reading or writing a `.kvpack` file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file system.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not a `.kvpack` file, or damaged.
    #[error("{path} is not a valid .kvpack file: {why}")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// Made with another model.
    #[error("{path} was made with the model of sha256 {file}, not this one ({model}): compact the text again with this model")]
    WrongModel {
        /// The file.
        path: String,
        /// The sha256 in the file.
        file: String,
        /// The sha256 of the model in use.
        model: String,
    },
}

/// What a `.kvpack` file holds besides the compacted context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// sha256 of the GGUF model file that produced the context, hex.
    pub model_sha256: String,
    /// KV format the session stores the tokens in (e.g. `"turbo3"`).
    pub kv: String,
    /// Compaction method, for the record.
    pub method: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Serialize to bytes (checksum included): version 1 for f32 tokens, 2 for stored ones.
pub fn to_bytes(header: &FileHeader, c: &SavedContext) -> Result<Vec<u8>, String> {
    let sha = unhex(&header.model_sha256).ok_or_else(|| {
        format!(
            "model sha256 {:?} is not 64 hex digits",
            header.model_sha256
        )
    })?;
    let (version, context_len, head_dim, shape) = match c {
        SavedContext::F32(c) => (1, c.context_len, c.head_dim, heads_of(&c.layers)),
        SavedContext::Stored(c) => (VERSION, c.context_len, c.head_dim, heads_of(&c.layers)),
    };
    let n_kv = shape.first().copied().unwrap_or(0);
    if shape.iter().any(|&h| h != n_kv) {
        return Err("layers hold different numbers of heads".into());
    }
    let mut b = Vec::new();
    let u32le = |b: &mut Vec<u8>, x: usize| b.extend_from_slice(&(x as u32).to_le_bytes());
    b.extend_from_slice(MAGIC);
    u32le(&mut b, version as usize);
    b.extend_from_slice(&sha);
    for s in [&header.kv, &header.method] {
        u32le(&mut b, s.len());
        b.extend_from_slice(s.as_bytes());
    }
    for x in [context_len, head_dim, shape.len(), n_kv] {
        u32le(&mut b, x);
    }
    let f32s = |b: &mut Vec<u8>, xs: &[f32]| xs.iter().for_each(|x| b.extend(x.to_le_bytes()));
    let positions = |b: &mut Vec<u8>, ps: &[u32]| ps.iter().for_each(|p| b.extend(p.to_le_bytes()));
    match c {
        SavedContext::F32(c) => {
            for h in c.layers.iter().flatten() {
                let t = h.len();
                if h.keys.len() != t * c.head_dim
                    || h.values.len() != t * c.head_dim
                    || h.bias.len() != t
                {
                    return Err("a head's keys, values and biases disagree in length".into());
                }
                u32le(&mut b, t);
                positions(&mut b, &h.positions);
                for xs in [&h.keys, &h.values, &h.bias] {
                    f32s(&mut b, xs);
                }
            }
        }
        SavedContext::Stored(c) => {
            b.extend_from_slice(&c.seed.to_le_bytes());
            for h in c.layers.iter().flatten() {
                let t = h.stored.tokens;
                if h.positions.len() != t || h.bias.len() != t {
                    return Err("a head's positions and biases disagree in length".into());
                }
                u32le(&mut b, t);
                positions(&mut b, &h.positions);
                f32s(&mut b, &h.bias);
                let s = &h.stored;
                for words in [&s.keys, &s.values, &s.sink_keys, &s.sink_values] {
                    u32le(&mut b, words.len());
                    words.iter().for_each(|w| b.extend(w.to_le_bytes()));
                }
            }
        }
    }
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    Ok(b)
}

fn heads_of<T>(layers: &[Vec<T>]) -> Vec<usize> {
    layers.iter().map(|l| l.len()).collect()
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>, String> {
        let bytes = self.take(n.checked_mul(4).ok_or("length overflow")?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>, String> {
        let bytes = self.take(n.checked_mul(4).ok_or("length overflow")?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".into())
    }
}

/// Parse bytes written by [`to_bytes`] (either version): checksum first, then every length
/// against the file. (The stored words' counts are checked against the recipe when a session
/// loads them.)
pub fn from_bytes(b: &[u8]) -> Result<(FileHeader, SavedContext), String> {
    if b.len() < MAGIC.len() + 4 + 32 || &b[..8] != MAGIC {
        return Err("no kvpack header".into());
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("checksum mismatch (the file is damaged or truncated)".into());
    }
    let mut r = Reader { b: body, at: 8 };
    let version = r.u32()?;
    if version != 1 && version != VERSION as usize {
        return Err(format!(
            "version {version}; this kvpack reads versions 1 and {VERSION}"
        ));
    }
    let model_sha256 = hex(r.take(32)?);
    let kv = r.string()?;
    let method = r.string()?;
    let (context_len, head_dim, n_layer, n_kv) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
    let seed = if version == 1 {
        0
    } else {
        u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"))
    };
    let positions = |r: &mut Reader<'_>, t: usize| -> Result<Vec<u32>, String> {
        let ps = r.u32s(t)?;
        if ps.iter().any(|&p| p as usize >= context_len) {
            return Err(format!("a position lies past the context of {context_len}"));
        }
        Ok(ps)
    };
    let mut f32_layers = Vec::new();
    let mut stored_layers = Vec::new();
    for _ in 0..n_layer {
        let mut f32_heads = Vec::new();
        let mut stored_heads = Vec::new();
        for _ in 0..n_kv {
            let t = r.u32()?;
            let positions = positions(&mut r, t)?;
            if version == 1 {
                let td = t.checked_mul(head_dim).ok_or("length overflow")?;
                f32_heads.push(HeadCompaction {
                    positions,
                    keys: r.f32s(td)?,
                    values: r.f32s(td)?,
                    bias: r.f32s(t)?,
                });
            } else {
                let bias = r.f32s(t)?;
                let mut words = || -> Result<Vec<u32>, String> {
                    let n = r.u32()?;
                    r.u32s(n)
                };
                let stored = StoredHead {
                    tokens: t,
                    keys: words()?,
                    values: words()?,
                    sink_keys: words()?,
                    sink_values: words()?,
                };
                stored_heads.push(StoredCompaction {
                    positions,
                    bias,
                    stored,
                });
            }
        }
        f32_layers.push(f32_heads);
        stored_layers.push(stored_heads);
    }
    if r.at != body.len() {
        return Err(format!("{} bytes left over", body.len() - r.at));
    }
    let header = FileHeader {
        model_sha256,
        kv,
        method,
    };
    let saved = if version == 1 {
        SavedContext::F32(CompactedContext {
            context_len,
            head_dim,
            layers: f32_layers,
        })
    } else {
        SavedContext::Stored(StoredContext {
            context_len,
            head_dim,
            seed,
            layers: stored_layers,
        })
    };
    Ok((header, saved))
}

/// Write `bytes` to `path` atomically: a temporary file beside it, then a rename, so a crash
/// never leaves a half-written file under its name (the temporary file is removed if the rename
/// fails).
#[cfg(not(target_arch = "wasm32"))]
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Write atomically ([`write_atomic`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn save(path: &Path, header: &FileHeader, c: &SavedContext) -> Result<(), FileError> {
    let p = path.display().to_string();
    let bytes = to_bytes(header, c).map_err(|why| FileError::Damaged {
        path: p.clone(),
        why,
    })?;
    write_atomic(path, &bytes).map_err(|source| FileError::Io { path: p, source })
}

/// Read a file and check it was made with the model whose sha256 is `model_sha256` (hex).
#[cfg(not(target_arch = "wasm32"))]
pub fn load(path: &Path, model_sha256: &str) -> Result<(FileHeader, SavedContext), FileError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| FileError::Io {
        path: p.clone(),
        source,
    })?;
    parse_for_model(&bytes, &p, model_sha256)
}

/// Parse a file's bytes (`name` in messages: the path, or the name a browser gave) and check it
/// was made with the model whose sha256 is `model_sha256` (hex).
pub fn parse_for_model(
    bytes: &[u8],
    name: &str,
    model_sha256: &str,
) -> Result<(FileHeader, SavedContext), FileError> {
    let (h, c) = from_bytes(bytes).map_err(|why| FileError::Damaged {
        path: name.to_string(),
        why,
    })?;
    if !h.model_sha256.eq_ignore_ascii_case(model_sha256) {
        return Err(FileError::WrongModel {
            path: name.to_string(),
            file: h.model_sha256,
            model: model_sha256.to_string(),
        });
    }
    Ok((h, c))
}

/// The hex sha256 of a model held in memory, as a file's header records it (the browser has
/// the model's bytes, not a path).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (FileHeader, SavedContext) {
        let (h, c) = sample_f32();
        (h, SavedContext::F32(c))
    }

    /// A context as a cache stores it: word runs of made-up lengths (the file does not check
    /// them against the recipe; a session does).
    fn sample_stored() -> (FileHeader, SavedContext) {
        let (mut h, c) = sample_f32();
        h.kv = "turbo3+s2".into();
        let layers = c
            .layers
            .iter()
            .enumerate()
            .map(|(l, heads)| {
                heads
                    .iter()
                    .enumerate()
                    .map(|(k, hc)| {
                        let words =
                            |n: usize, s: u32| (0..n as u32).map(|i| i * 7919 + s).collect();
                        StoredCompaction {
                            positions: hc.positions.clone(),
                            bias: hc.bias.clone(),
                            stored: StoredHead {
                                tokens: hc.len(),
                                keys: words(3 + l, 1),
                                values: words(2 + k, 2),
                                sink_keys: words(4, 3),
                                sink_values: words(l * k, 4),
                            },
                        }
                    })
                    .collect()
            })
            .collect();
        let stored = StoredContext {
            context_len: c.context_len,
            head_dim: c.head_dim,
            seed: 0x1234_5678_9abc_def0,
            layers,
        };
        (h, SavedContext::Stored(stored))
    }

    fn sample_f32() -> (FileHeader, CompactedContext) {
        let head = |t: usize, s: f32| HeadCompaction {
            positions: (0..t as u32).map(|p| p * 3).collect(),
            keys: (0..t * 4).map(|i| i as f32 * s).collect(),
            values: (0..t * 4).map(|i| -(i as f32) * s).collect(),
            bias: (0..t).map(|i| i as f32 * 0.5 - 1.0).collect(),
        };
        (
            FileHeader {
                model_sha256: "ab".repeat(32),
                kv: "turbo3".into(),
                method: "am".into(),
            },
            CompactedContext {
                context_len: 30,
                head_dim: 4,
                layers: vec![
                    vec![head(5, 1.0), head(5, 2.0)],
                    vec![head(5, 3.0), head(5, 0.25)],
                ],
            },
        )
    }

    #[test]
    fn save_then_load_gives_back_the_same_context() {
        for (h, c) in [sample(), sample_stored()] {
            save_then_load(h, c);
        }
    }

    fn save_then_load(h: FileHeader, c: SavedContext) {
        let dir = std::env::temp_dir().join(format!("kvpack-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.kvpack");
        save(&path, &h, &c).unwrap();
        let (h2, c2) = load(&path, &h.model_sha256).unwrap();
        assert_eq!((h2, c2), (h.clone(), c.clone()));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // Another model's sha256 is refused with both hashes named.
        let err = load(&path, &"cd".repeat(32)).unwrap_err().to_string();
        assert!(
            err.contains(&"ab".repeat(32)) && err.contains(&"cd".repeat(32)),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bytes_in_memory_are_checked_as_files_are() {
        let (h, c) = sample_stored();
        let bytes = to_bytes(&h, &c).unwrap();
        let got = parse_for_model(&bytes, "page.kvpack", &"AB".repeat(32)).unwrap();
        assert_eq!(got, (h.clone(), c.clone()));
        let err = parse_for_model(&bytes, "page.kvpack", &"cd".repeat(32)).unwrap_err();
        assert!(matches!(err, FileError::WrongModel { .. }), "{err}");
        assert!(err.to_string().starts_with("page.kvpack was made"), "{err}");
        let err = parse_for_model(&bytes[1..], "page.kvpack", &h.model_sha256).unwrap_err();
        assert!(matches!(err, FileError::Damaged { .. }), "{err}");
        // FIPS 180-2's "abc".
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn ragged_contexts_round_trip_exactly() {
        let (h, mut c) = sample_f32();
        // Heads of different lengths, one of them empty, positions not contiguous.
        let head = |positions: &[u32], s: f32| HeadCompaction {
            positions: positions.to_vec(),
            keys: (0..positions.len() * 4)
                .map(|i| (i as f32 * s).sin())
                .collect(),
            values: (0..positions.len() * 4)
                .map(|i| (i as f32 * s).cos())
                .collect(),
            bias: (0..positions.len()).map(|i| -(i as f32) * s).collect(),
        };
        c.layers = vec![
            vec![
                head(&[0, 1, 2, 3, 9, 17, 29], 0.3),
                head(&[0, 1, 2, 3], 1.7),
            ],
            vec![head(&[], 1.0), head(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 28], -0.9)],
        ];
        assert_eq!(c.uniform_len(), None);
        assert_eq!(c.max_len(), 10);
        let c = SavedContext::F32(c);
        let bytes = to_bytes(&h, &c).unwrap();
        // Exactly the header, each head's own tokens and the checksum: nothing padded.
        let header = 8 + 4 + 32 + (4 + h.kv.len()) + (4 + h.method.len()) + 4 * 4;
        let tokens = c.total_tokens();
        assert_eq!(tokens, 21);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
        let per_token = 4 + 4 * (2 * 4 + 1);
        assert_eq!(bytes.len(), header + 4 * 4 + tokens * per_token + 32);
        let (h2, c2) = from_bytes(&bytes).unwrap();
        assert_eq!((h2, c2), (h, c));
    }

    #[test]
    fn stored_contexts_round_trip_exactly_and_take_only_their_words() {
        let (h, c) = sample_stored();
        let bytes = to_bytes(&h, &c).unwrap();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        let SavedContext::Stored(s) = &c else {
            unreachable!()
        };
        let header = 8 + 4 + 32 + (4 + h.kv.len()) + (4 + h.method.len()) + 4 * 4 + 8;
        let heads: usize = s
            .layers
            .iter()
            .flatten()
            .map(|sc| {
                let w = &sc.stored;
                let words = w.keys.len() + w.values.len() + w.sink_keys.len() + w.sink_values.len();
                4 + 8 * sc.stored.tokens + 4 * (4 + words)
            })
            .sum();
        assert_eq!(bytes.len(), header + heads + 32);
        assert_eq!(from_bytes(&bytes).unwrap(), (h, c));
    }

    #[test]
    fn damaged_and_truncated_files_are_refused() {
        for (h, c) in [sample(), sample_stored()] {
            damaged_and_truncated_are_refused(&h, &c);
        }
    }

    fn damaged_and_truncated_are_refused(h: &FileHeader, c: &SavedContext) {
        let good = to_bytes(h, c).unwrap();
        for at in [0, 9, 60, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                from_bytes(&bad).is_err(),
                "a flipped byte at {at} was accepted"
            );
        }
        for len in [0, 7, 40, good.len() - 1] {
            assert!(from_bytes(&good[..len]).is_err(), "{len} bytes accepted");
        }
        assert!(from_bytes(&good).is_ok());
    }
}
