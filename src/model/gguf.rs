//! GGUF reader, format versions 2 and 3 (little-endian).
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64), the metadata
//! key/value pairs, the tensor info table, padding up to `general.alignment` (default 32), then
//! the tensor data, each tensor at an aligned offset relative to the start of the data section.
//!
//! The header is parsed by one streaming parser over any [`Read`] source: a buffered
//! [`File`] ([`GgufFile::open`], tensor data then read lazily, one tensor at a time) or a byte
//! slice ([`GgufFile::parse`], [`GgufFile::from_bytes`], for the browser where the whole file
//! arrives as one buffer). Every length and count is checked against the bytes that remain
//! before anything is allocated, so a corrupt or hostile file yields an error, never a panic or
//! a giant allocation.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// GGML tensors have at most this many dimensions.
pub const MAX_DIMS: usize = 4;

/// Arrays of arrays deeper than this are rejected (recursion guard; real files nest at most 1).
const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest possible encoding of one metadata pair: key length (8), value type (4), 1-byte value.
const MIN_KV_BYTES: u64 = 13;

/// Smallest possible encoding of one tensor info: name length (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 24;

/// Everything that can go wrong reading a GGUF file or its metadata.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The operating system failed to open or read the file.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file's path (`<memory>` for in-memory input).
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error(
        "not a GGUF file: expected magic bytes 47 47 55 46 (\"GGUF\"), found {} ({:?})",
        hex_bytes(found),
        String::from_utf8_lossy(found)
    )]
    BadMagic {
        /// The four bytes found at the start of the file.
        found: [u8; 4],
    },
    /// A version other than 2 or 3.
    #[error("unsupported GGUF version {version}: this reader supports versions 2 and 3{}", version_hint(*version))]
    UnsupportedVersion {
        /// The version field as read (little-endian).
        version: u32,
    },
    /// The file ends before a field it declares.
    #[error(
        "GGUF file truncated at byte {offset} while reading {what}: {needed} more bytes needed, \
         but the file is {file_size} bytes long"
    )]
    Truncated {
        /// Byte offset where the field starts.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Total input size in bytes.
        file_size: u64,
        /// What was being read.
        what: String,
    },
    /// A count that cannot fit in the remaining bytes (corrupt file or allocation bomb).
    #[error(
        "{what} at byte {offset} declares {count} entries, which cannot fit in the {remaining} \
         bytes left in the file (truncated or corrupt file)"
    )]
    AbsurdCount {
        /// What the count counts.
        what: String,
        /// Byte offset of the count.
        offset: u64,
        /// The declared count.
        count: u64,
        /// Bytes left after the count.
        remaining: u64,
    },
    /// A string that is not UTF-8.
    #[error("invalid UTF-8 in {what} (string starts at byte {offset})")]
    InvalidUtf8 {
        /// What the string is.
        what: String,
        /// Byte offset of the string's length field.
        offset: u64,
    },
    /// A metadata value type id outside 0..=12.
    #[error("unknown metadata value type id {type_id} for key '{key}' at byte {offset}")]
    UnknownValueType {
        /// The key whose value has the bad type.
        key: String,
        /// The type id found.
        type_id: u32,
        /// Byte offset of the type id.
        offset: u64,
    },
    /// Arrays nested deeper than any real file uses.
    #[error("metadata key '{key}' nests arrays more than {MAX_ARRAY_DEPTH} deep")]
    NestingTooDeep {
        /// The key.
        key: String,
    },
    /// The same metadata key appears twice.
    #[error("metadata key '{key}' appears more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// The same tensor name appears twice.
    #[error("tensor name '{name}' appears more than once")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("general.alignment must be a power of two, found {alignment}")]
    BadAlignment {
        /// The value found.
        alignment: u64,
    },
    /// A tensor with more than [`MAX_DIMS`] dimensions.
    #[error("tensor '{name}' has {n_dims} dimensions; GGML tensors have at most {MAX_DIMS}")]
    TooManyDims {
        /// Tensor name.
        name: String,
        /// Declared number of dimensions.
        n_dims: u32,
    },
    /// A ggml type id this reader does not know (a newer or corrupt file).
    #[error("tensor '{name}' has unknown ggml type id {type_id}")]
    UnknownTensorType {
        /// Tensor name.
        name: String,
        /// The type id found.
        type_id: u32,
    },
    /// A shape that does not fit the type's blocks, or whose size overflows.
    #[error("tensor '{name}' of type {ggml_type} has invalid shape {dims:?}: {reason}")]
    BadTensorShape {
        /// Tensor name.
        name: String,
        /// Dimensions, `ne0` first.
        dims: Vec<u64>,
        /// The tensor's type.
        ggml_type: GgmlType,
        /// Why the shape is invalid.
        reason: String,
    },
    /// A tensor offset that is not a multiple of the alignment.
    #[error("tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor whose data would extend past the end of the file.
    #[error(
        "tensor '{name}' (offset {offset} in the data section at byte {data_offset}, {size} bytes) \
         runs past the end of the {file_size}-byte file; the file is truncated or corrupt"
    )]
    TensorOutOfBounds {
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// Byte offset of the data section in the file.
        data_offset: u64,
        /// Tensor size in bytes.
        size: u64,
        /// Total file size in bytes.
        file_size: u64,
    },
    /// A tensor type the engine cannot compute with.
    #[error(
        "unsupported tensor type {ggml_type} for tensor '{name}': kvpack runs F32, F16, Q4_0, Q4_1 \
         and Q8_0 weights; requantize the model to one of those (for example with llama-quantize)"
    )]
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
    },
    /// No tensor with that name.
    #[error("no tensor named '{name}' in the GGUF file")]
    MissingTensor {
        /// The name asked for.
        name: String,
    },
    /// A required metadata key is absent.
    #[error("missing metadata key '{key}'")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata value of another type than asked for.
    #[error("metadata key '{key}' holds {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The type found.
        found: String,
    },
    /// An integer metadata value that does not fit the type asked for.
    #[error("metadata key '{key}' holds {value}, which does not fit in {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value, printed.
        value: String,
        /// The type asked for.
        expected: &'static str,
    },
    /// A caller buffer of the wrong size.
    #[error("buffer for tensor '{name}' holds {got} bytes, the tensor has {expected}")]
    BufferSize {
        /// Tensor name.
        name: String,
        /// Tensor size in bytes.
        expected: u64,
        /// Buffer size in bytes.
        got: usize,
    },
    /// Tensor data requested from a file parsed from a borrowed slice.
    #[error(
        "this GGUF was parsed from a borrowed byte slice and holds no tensor data: use \
         GgufFile::tensor_data_in(bytes, name), GgufFile::from_bytes or GgufFile::open"
    )]
    NoTensorData,
    /// `general.architecture` names a model family the engine does not implement.
    #[error("unsupported model architecture '{found}': kvpack supports {}", supported.join(", "))]
    UnsupportedArchitecture {
        /// The architecture found.
        found: String,
        /// The architectures supported.
        supported: &'static [&'static str],
    },
    /// Hyperparameters that are inconsistent or out of range.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn version_hint(version: u32) -> &'static str {
    if version == 1 {
        " (version 1 is the pre-2023 format: convert the model again with a current llama.cpp)"
    } else if matches!(version.swap_bytes(), 2 | 3) {
        " (this looks like a big-endian GGUF; only little-endian files are supported)"
    } else {
        ""
    }
}

/// Result type of this module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// Type ids of metadata values, as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgufValueType {
    /// `u8`.
    U8 = 0,
    /// `i8`.
    I8 = 1,
    /// `u16`.
    U16 = 2,
    /// `i16`.
    I16 = 3,
    /// `u32`.
    U32 = 4,
    /// `i32`.
    I32 = 5,
    /// `f32`.
    F32 = 6,
    /// One byte, 0 or 1.
    Bool = 7,
    /// u64 length, then UTF-8 bytes.
    String = 8,
    /// Element type (u32), count (u64), elements.
    Array = 9,
    /// `u64`.
    U64 = 10,
    /// `i64`.
    I64 = 11,
    /// `f64`.
    F64 = 12,
}

impl GgufValueType {
    /// The type with this id, if any.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Lower-case name used in messages (`u32`, `string`, ...).
    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in the file.
    fn min_encoded_bytes(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array; `elem` is the declared element type (kept for empty arrays).
    Array {
        /// Declared element type.
        elem: GgufValueType,
        /// The elements, each of type `elem`.
        items: Vec<GgufValue>,
    },
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl GgufValue {
    /// The value's type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array { .. } => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Type name for messages: `u32`, `string`, `array<string>`, ...
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array { elem, .. } => format!("array<{elem}>"),
            other => other.value_type().name().to_string(),
        }
    }

    /// The value as a signed 128-bit integer, when it is an integer of any width.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a float, when it is `f32` or `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, when the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, when the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array { items, .. } => Some(items),
            _ => None,
        }
    }
}

/// GGML tensor element types, with the ids used in GGUF files.
///
/// Quantized types store `block_size` elements in `type_size` bytes. All are read; the engine
/// computes with the [`GgmlType::is_supported`] ones.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// IEEE half float.
    F16 = 1,
    /// 32 values: f16 scale, 16 bytes of 4-bit values (offset 8).
    Q4_0 = 2,
    /// 32 values: f16 scale, f16 min, 16 bytes of 4-bit values.
    Q4_1 = 3,
    /// 32 values: f16 scale, 4 bytes of high bits, 16 bytes of low nibbles.
    Q5_0 = 6,
    /// 32 values: f16 scale, f16 min, 4 bytes of high bits, 16 bytes of low nibbles.
    Q5_1 = 7,
    /// 32 values: f16 scale, 32 × i8.
    Q8_0 = 8,
    /// 32 values: f16 scale, f16 sum, 32 × i8.
    Q8_1 = 9,
    /// K-quant, 2 bits, super-blocks of 256.
    Q2_K = 10,
    /// K-quant, 3 bits.
    Q3_K = 11,
    /// K-quant, 4 bits.
    Q4_K = 12,
    /// K-quant, 5 bits.
    Q5_K = 13,
    /// K-quant, 6 bits.
    Q6_K = 14,
    /// K-quant, 8 bits (intermediate type for dot products).
    Q8_K = 15,
    /// i-quant, 2.06 bits.
    IQ2_XXS = 16,
    /// i-quant, 2.31 bits.
    IQ2_XS = 17,
    /// i-quant, 3.06 bits.
    IQ3_XXS = 18,
    /// i-quant, 1.56 bits.
    IQ1_S = 19,
    /// Non-linear 4-bit, blocks of 32.
    IQ4_NL = 20,
    /// i-quant, 3.44 bits.
    IQ3_S = 21,
    /// i-quant, 2.5 bits.
    IQ2_S = 22,
    /// Non-linear 4-bit, super-blocks of 256.
    IQ4_XS = 23,
    /// 8-bit integer.
    I8 = 24,
    /// 16-bit integer.
    I16 = 25,
    /// 32-bit integer.
    I32 = 26,
    /// 64-bit integer.
    I64 = 27,
    /// 64-bit float.
    F64 = 28,
    /// i-quant, 1.75 bits.
    IQ1_M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary, 1.69 bits.
    TQ1_0 = 34,
    /// Ternary, 2.06 bits.
    TQ2_0 = 35,
    /// Microscaling FP4: 32 values, one E8M0 scale byte, 16 bytes of E2M1 nibbles.
    MXFP4 = 39,
}

impl GgmlType {
    /// Every type this reader knows.
    pub const ALL: [GgmlType; 32] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
            IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64,
            IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4,
        ]
    };

    /// The type with this file id, if known (ids 4, 5, 31–33 and 36–38 were removed from ggml).
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The id stored in GGUF files.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            IQ2_XXS => 66,
            IQ2_XS => 74,
            IQ3_XXS => 98,
            IQ1_S => 50,
            IQ4_NL => 18,
            IQ3_S => 110,
            IQ2_S => 82,
            IQ4_XS => 136,
            IQ1_M => 56,
            TQ1_0 => 54,
            TQ2_0 => 66,
            MXFP4 => 17,
        }
    }

    /// Whether kvpack's kernels compute with this type: F32, F16, Q4_0, Q4_1, Q8_0.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0
        )
    }

    /// Name as ggml prints it (`Q4_1`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// Bytes taken by `n_elements` values, or `None` when `n_elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the tensor info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `ne0` (the contiguous one, a row's length) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section (see [`GgufFile::data_offset`]).
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dims; 1 for a scalar). Saturates on overflow, which a
    /// parsed file never reaches: the reader rejects such shapes.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Size of the data in bytes. Saturates on overflow, like [`TensorInfo::n_elements`].
    pub fn n_bytes(&self) -> u64 {
        self.checked_n_bytes().unwrap_or(u64::MAX)
    }

    fn checked_n_bytes(&self) -> Option<u64> {
        let n = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.ggml_type.bytes_for(n)
    }

    /// Ok when the engine supports this tensor's type, else [`GgufError::UnsupportedTensorType`].
    pub fn check_supported(&self) -> Result<()> {
        if self.ggml_type.is_supported() {
            Ok(())
        } else {
            Err(GgufError::UnsupportedTensorType {
                name: self.name.clone(),
                ggml_type: self.ggml_type,
            })
        }
    }

    fn validate_shape(&self) -> Result<u64> {
        let bad = |reason: String| GgufError::BadTensorShape {
            name: self.name.clone(),
            dims: self.dims.clone(),
            ggml_type: self.ggml_type,
            reason,
        };
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(self.ggml_type.block_size()) {
            return Err(bad(format!(
                "the first dimension {ne0} is not a multiple of the block size {}",
                self.ggml_type.block_size()
            )));
        }
        self.checked_n_bytes()
            .ok_or_else(|| bad("the size in bytes overflows 64 bits".to_string()))
    }
}

/// Where tensor data comes from.
enum Source {
    /// Opened file; reads seek under the lock.
    File { path: PathBuf, file: Mutex<File> },
    /// The whole file, owned.
    Memory(Vec<u8>),
    /// Parsed from a borrowed slice; the caller keeps the bytes.
    Detached,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File { path, .. } => write!(f, "File({})", path.display()),
            Source::Memory(bytes) => write!(f, "Memory({} bytes)", bytes.len()),
            Source::Detached => f.write_str("Detached"),
        }
    }
}

/// A parsed GGUF file: metadata, tensor table, and access to tensor data.
#[derive(Debug)]
pub struct GgufFile {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    file_size: u64,
    source: Source,
}

impl GgufFile {
    /// Opens a GGUF file: streams the header, metadata and tensor table through a buffered
    /// reader; tensor data stays on disk until [`GgufFile::read_tensor_bytes`] asks for it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_size = file.metadata().map_err(io_err)?.len();
        let mut reader = Reader {
            inner: BufReader::with_capacity(1 << 16, &file),
            pos: 0,
            len: file_size,
            path: path.display().to_string(),
        };
        let header = parse_header(&mut reader)?;
        drop(reader);
        Ok(Self::from_header(
            header,
            file_size,
            Source::File {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
        ))
    }

    /// Parses the header, metadata and tensor table of an in-memory GGUF. The result holds no
    /// tensor data: get it with [`GgufFile::tensor_data_in`] from the same bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let header = parse_bytes(bytes)?;
        Ok(Self::from_header(
            header,
            bytes.len() as u64,
            Source::Detached,
        ))
    }

    /// Parses an in-memory GGUF and keeps the bytes (no copy), so tensor data can be borrowed
    /// with [`GgufFile::tensor_bytes`] or copied with [`GgufFile::read_tensor_bytes`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let header = parse_bytes(&bytes)?;
        let file_size = bytes.len() as u64;
        Ok(Self::from_header(header, file_size, Source::Memory(bytes)))
    }

    fn from_header(header: Header, file_size: u64, source: Source) -> Self {
        Self {
            version: header.version,
            key_index: header
                .metadata
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect(),
            metadata: header.metadata,
            tensor_index: header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
            file_size,
            source,
        }
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Tensor data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section; a tensor's data starts at `data_offset + offset`.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// All metadata pairs, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.key_index.contains_key(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    fn get_integer<T: TryFrom<i128>>(&self, key: &str, expected: &'static str) -> Result<T> {
        let value = self.require(key)?;
        let n = value.as_integer().ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: value.type_name(),
        })?;
        T::try_from(n).map_err(|_| GgufError::OutOfRange {
            key: key.to_string(),
            value: n.to_string(),
            expected,
        })
    }

    /// Integer value of `key` as u32; any integer type whose value fits is accepted.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.get_integer(key, "u32")
    }

    /// Integer value of `key` as u64; any integer type whose value fits is accepted.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get_integer(key, "u64")
    }

    /// Integer value of `key` as i32; any integer type whose value fits is accepted.
    pub fn get_i32(&self, key: &str) -> Result<i32> {
        self.get_integer(key, "i32")
    }

    /// Integer value of `key` as i64; any integer type whose value fits is accepted.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.get_integer(key, "i64")
    }

    /// Float value of `key` (`f32`, or `f64` rounded to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get_f64(key).map(|v| v as f32)
    }

    /// Float value of `key` (`f32` widened, or `f64`).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let value = self.require(key)?;
        value.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected: "float",
            found: value.type_name(),
        })
    }

    /// Boolean value of `key`.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            other => Err(self.wrong_type(key, "bool", other)),
        }
    }

    /// String value of `key`.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "string", value))
    }

    /// Array value of `key`, elements of any type.
    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "array", value))
    }

    /// Array of strings at `key`.
    pub fn get_array_str(&self, key: &str) -> Result<Vec<&str>> {
        let value = self.require(key)?;
        let wrong = || self.wrong_type(key, "array<string>", value);
        let items = value.as_array().ok_or_else(wrong)?;
        items.iter().map(|v| v.as_str().ok_or_else(wrong)).collect()
    }

    /// Array of integers at `key` as i64 (any integer element type).
    pub fn get_array_i64(&self, key: &str) -> Result<Vec<i64>> {
        let value = self.require(key)?;
        let wrong = || self.wrong_type(key, "array<integer>", value);
        let items = value.as_array().ok_or_else(wrong)?;
        items
            .iter()
            .map(|v| {
                let n = v.as_integer().ok_or_else(wrong)?;
                i64::try_from(n).map_err(|_| GgufError::OutOfRange {
                    key: key.to_string(),
                    value: n.to_string(),
                    expected: "i64",
                })
            })
            .collect()
    }

    /// Array of floats at `key` as f32 (`f32` or `f64` elements).
    pub fn get_array_f32(&self, key: &str) -> Result<Vec<f32>> {
        let value = self.require(key)?;
        let wrong = || self.wrong_type(key, "array<float>", value);
        let items = value.as_array().ok_or_else(wrong)?;
        items
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(wrong))
            .collect()
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &GgufValue) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor called `name`, or [`GgufError::MissingTensor`].
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            name: name.to_string(),
        })
    }

    /// Byte range of the tensor's data within the file (checked against the file size at parse).
    pub fn tensor_range(&self, name: &str) -> Result<Range<u64>> {
        let info = self.tensor_info(name)?;
        let start = self.data_offset + info.offset;
        Ok(start..start + info.n_bytes())
    }

    /// Copies the tensor's data into a new buffer (one tensor, never the whole file).
    pub fn read_tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let range = self.tensor_range(name)?;
        // The range was checked against the file size, so this allocation is bounded by it.
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_range(range, &mut buf)?;
        Ok(buf)
    }

    /// Reads the tensor's data into `buf`, which must be exactly [`TensorInfo::n_bytes`] long.
    pub fn read_tensor_into(&self, name: &str, buf: &mut [u8]) -> Result<()> {
        let range = self.tensor_range(name)?;
        if buf.len() as u64 != range.end - range.start {
            return Err(GgufError::BufferSize {
                name: name.to_string(),
                expected: range.end - range.start,
                got: buf.len(),
            });
        }
        self.read_range(range, buf)
    }

    /// Borrows the tensor's data from a file built with [`GgufFile::from_bytes`].
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let range = self.tensor_range(name)?;
        match &self.source {
            Source::Memory(bytes) => Ok(&bytes[range.start as usize..range.end as usize]),
            _ => Err(GgufError::NoTensorData),
        }
    }

    /// Borrows the tensor's data from `file_bytes`, the same bytes given to [`GgufFile::parse`].
    pub fn tensor_data_in<'a>(&self, file_bytes: &'a [u8], name: &str) -> Result<&'a [u8]> {
        let range = self.tensor_range(name)?;
        file_bytes
            .get(range.start as usize..range.end as usize)
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                name: name.to_string(),
                offset: range.start - self.data_offset,
                data_offset: self.data_offset,
                size: range.end - range.start,
                file_size: file_bytes.len() as u64,
            })
    }

    fn read_range(&self, range: Range<u64>, buf: &mut [u8]) -> Result<()> {
        match &self.source {
            Source::File { path, file } => {
                let io_err = |source| GgufError::Io {
                    path: path.display().to_string(),
                    source,
                };
                // A poisoned lock only means another reader panicked; the file is still usable.
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                file.seek(SeekFrom::Start(range.start)).map_err(io_err)?;
                file.read_exact(buf).map_err(io_err)
            }
            Source::Memory(bytes) => {
                buf.copy_from_slice(&bytes[range.start as usize..range.end as usize]);
                Ok(())
            }
            Source::Detached => Err(GgufError::NoTensorData),
        }
    }
}

/// What the streaming parser produces.
struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

fn parse_bytes(bytes: &[u8]) -> Result<Header> {
    let mut reader = Reader {
        inner: bytes,
        pos: 0,
        len: bytes.len() as u64,
        path: "<memory>".to_string(),
    };
    parse_header(&mut reader)
}

/// Forward-only reader that knows its position and the total length, so every read is checked
/// against what remains before it is attempted.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
    path: String,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, needed: u64, what: &dyn fmt::Display) -> GgufError {
        GgufError::Truncated {
            offset: self.pos,
            needed,
            file_size: self.len,
            what: what.to_string(),
        }
    }

    fn read_into(&mut self, buf: &mut [u8], what: &dyn fmt::Display) -> Result<()> {
        let needed = buf.len() as u64;
        if needed > self.remaining() {
            return Err(self.truncated(needed, what));
        }
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += needed;
                Ok(())
            }
            // The file shrank under us, or its reported size was wrong.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated(needed, what)),
            Err(source) => Err(GgufError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_into(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String> {
        let start = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(self.truncated(len, what));
        }
        let mut bytes = vec![0u8; len as usize];
        self.read_into(&mut bytes, what)?;
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
            offset: start,
        })
    }

    /// Reads a count of items each at least `min_item_bytes` long, rejecting counts that cannot
    /// fit in the rest of the input (so the caller may allocate `count` items).
    fn count(&mut self, min_item_bytes: u64, what: &dyn fmt::Display) -> Result<u64> {
        let offset = self.pos;
        let count = self.u64(what)?;
        if count.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(GgufError::AbsurdCount {
                what: what.to_string(),
                offset,
                count,
                remaining: self.remaining(),
            });
        }
        Ok(count)
    }

    fn value(&mut self, ty: GgufValueType, key: &str, depth: usize) -> Result<GgufValue> {
        let what = &format_args!("value of metadata key '{key}'");
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufValueType::U32 => GgufValue::U32(self.u32(what)?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            // Any non-zero byte reads as true, as in ggml.
            GgufValueType::Bool => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            GgufValueType::String => GgufValue::String(self.string(what)?),
            GgufValueType::U64 => GgufValue::U64(self.u64(what)?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep {
                        key: key.to_string(),
                    });
                }
                let type_offset = self.pos;
                let type_id = self.u32(&format_args!("element type of array '{key}'"))?;
                let elem =
                    GgufValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
                        key: key.to_string(),
                        type_id,
                        offset: type_offset,
                    })?;
                let count = self.count(
                    elem.min_encoded_bytes(),
                    &format_args!("length of array '{key}'"),
                )?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array { elem, items }
            }
        })
    }
}

fn parse_header<R: Read>(r: &mut Reader<R>) -> Result<Header> {
    let magic: [u8; 4] = r.array(&"magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = r.u32(&"version")?;
    if !matches!(version, 2 | 3) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let n_tensors = r.u64(&"tensor count")?;
    let n_kv = r.count(MIN_KV_BYTES, &"metadata count")?;

    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv as usize);
    let mut seen_keys = std::collections::HashSet::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r.string(&format_args!("key of metadata pair {i}"))?;
        let type_offset = r.pos;
        let type_id = r.u32(&format_args!("value type of metadata key '{key}'"))?;
        let ty = GgufValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            type_id,
            offset: type_offset,
        })?;
        let value = r.value(ty, &key, 0)?;
        if !seen_keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey { key });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((key, value)) => {
            let n = value.as_integer().ok_or_else(|| GgufError::WrongType {
                key: key.clone(),
                expected: "u32",
                found: value.type_name(),
            })?;
            match u64::try_from(n) {
                Ok(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::BadAlignment {
                        alignment: n.clamp(0, u64::MAX.into()) as u64,
                    })
                }
            }
        }
    };

    // The tensor table follows the metadata: checked here, so the table fits in what remains.
    if n_tensors.saturating_mul(MIN_TENSOR_INFO_BYTES) > r.remaining() {
        return Err(GgufError::AbsurdCount {
            what: "tensor count".to_string(),
            offset: 8,
            count: n_tensors,
            remaining: r.remaining(),
        });
    }
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut seen_tensors = std::collections::HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format_args!("name of tensor {i}"))?;
        let n_dims = r.u32(&format_args!("dimension count of tensor '{name}'"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&format_args!("dimension {d} of tensor '{name}'"))?);
        }
        let type_id = r.u32(&format_args!("type of tensor '{name}'"))?;
        let offset = r.u64(&format_args!("data offset of tensor '{name}'"))?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownTensorType { name, type_id });
        };
        if !seen_tensors.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor { name });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    // The data section starts at the next multiple of the alignment after the table.
    let data_offset = r
        .pos
        .checked_next_multiple_of(alignment)
        .unwrap_or(u64::MAX);
    for t in &tensors {
        let size = t.validate_shape()?;
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                name: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(size));
        if end.is_none_or(|end| end > r.len) {
            return Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                offset: t.offset,
                data_offset,
                size,
                file_size: r.len,
            });
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// A minimal GGUF writer for tests: builds files with any metadata and tensor table, including
/// deliberately broken ones (raw type ids, chosen offsets).
#[cfg(test)]
pub(crate) mod test_writer {
    use super::{GgufValue, GgufValueType};

    /// One tensor to write: raw type id so tests can write unknown types.
    pub(crate) struct RawTensor {
        pub name: String,
        pub dims: Vec<u64>,
        pub type_id: u32,
        /// Offset in the data section; `None` places it after the previous tensor, aligned.
        pub offset: Option<u64>,
        pub data: Vec<u8>,
    }

    /// Builder for a GGUF byte image.
    pub(crate) struct Writer {
        pub version: u32,
        pub alignment: u64,
        pub metadata: Vec<(String, GgufValue)>,
        pub tensors: Vec<RawTensor>,
    }

    impl Writer {
        pub fn new(version: u32) -> Self {
            Self {
                version,
                alignment: super::DEFAULT_ALIGNMENT,
                metadata: Vec::new(),
                tensors: Vec::new(),
            }
        }

        pub fn kv(mut self, key: &str, value: GgufValue) -> Self {
            self.metadata.push((key.to_string(), value));
            self
        }

        /// Sets the alignment and writes the `general.alignment` key for it.
        pub fn alignment(mut self, alignment: u32) -> Self {
            self.alignment = alignment.into();
            self.kv("general.alignment", GgufValue::U32(alignment))
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
            self.tensors.push(RawTensor {
                name: name.to_string(),
                dims: dims.to_vec(),
                type_id,
                offset: None,
                data,
            });
            self
        }

        pub fn string_array(items: &[&str]) -> GgufValue {
            GgufValue::Array {
                elem: GgufValueType::String,
                items: items
                    .iter()
                    .map(|s| GgufValue::String(s.to_string()))
                    .collect(),
            }
        }

        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }

        fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
            match v {
                GgufValue::U8(x) => out.push(*x),
                GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::Bool(x) => out.push(u8::from(*x)),
                GgufValue::String(s) => Self::put_str(out, s),
                GgufValue::Array { elem, items } => {
                    out.extend_from_slice(&(*elem as u32).to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for item in items {
                        Self::put_value(out, item);
                    }
                }
                GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
                GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            }
        }

        pub fn to_bytes(&self) -> Vec<u8> {
            let align = |n: u64| n.next_multiple_of(self.alignment);
            let mut out = Vec::new();
            out.extend_from_slice(b"GGUF");
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
            for (k, v) in &self.metadata {
                Self::put_str(&mut out, k);
                out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
                Self::put_value(&mut out, v);
            }
            let mut offsets = Vec::new();
            let mut next = 0u64;
            for t in &self.tensors {
                let offset = t.offset.unwrap_or(next);
                offsets.push(offset);
                next = align(offset + t.data.len() as u64);
                Self::put_str(&mut out, &t.name);
                out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
                for d in &t.dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&t.type_id.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            let data_start = align(out.len() as u64) as usize;
            out.resize(data_start, 0);
            for (t, offset) in self.tensors.iter().zip(offsets) {
                // Tensors without data let tests declare offsets far past the end.
                if t.data.is_empty() {
                    continue;
                }
                let at = data_start + offset as usize;
                if out.len() < at + t.data.len() {
                    out.resize(at + t.data.len(), 0);
                }
                out[at..at + t.data.len()].copy_from_slice(&t.data);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_writer::Writer;
    use super::*;

    fn all_value_types() -> Vec<(&'static str, GgufValue)> {
        vec![
            ("t.u8", GgufValue::U8(200)),
            ("t.i8", GgufValue::I8(-100)),
            ("t.u16", GgufValue::U16(60000)),
            ("t.i16", GgufValue::I16(-30000)),
            ("t.u32", GgufValue::U32(4_000_000_000)),
            ("t.i32", GgufValue::I32(-2_000_000_000)),
            ("t.f32", GgufValue::F32(1.5e-5)),
            ("t.bool", GgufValue::Bool(true)),
            ("t.string", GgufValue::String("héllo, wörld 🦀".to_string())),
            ("t.u64", GgufValue::U64(u64::MAX)),
            ("t.i64", GgufValue::I64(i64::MIN)),
            ("t.f64", GgufValue::F64(-2.25)),
            ("t.empty_string", GgufValue::String(String::new())),
            (
                "t.array_i32",
                GgufValue::Array {
                    elem: GgufValueType::I32,
                    items: vec![GgufValue::I32(-1), GgufValue::I32(7)],
                },
            ),
            ("t.array_str", Writer::string_array(&["a", "", "ç"])),
            (
                "t.array_empty",
                GgufValue::Array {
                    elem: GgufValueType::F64,
                    items: vec![],
                },
            ),
            (
                "t.array_nested",
                GgufValue::Array {
                    elem: GgufValueType::Array,
                    items: vec![
                        GgufValue::Array {
                            elem: GgufValueType::U8,
                            items: vec![GgufValue::U8(1), GgufValue::U8(2)],
                        },
                        GgufValue::Array {
                            elem: GgufValueType::U8,
                            items: vec![],
                        },
                    ],
                },
            ),
            (
                "t.array_f32",
                GgufValue::Array {
                    elem: GgufValueType::F32,
                    items: vec![GgufValue::F32(0.5), GgufValue::F32(-4.0)],
                },
            ),
            (
                "t.array_bool",
                GgufValue::Array {
                    elem: GgufValueType::Bool,
                    items: vec![GgufValue::Bool(false), GgufValue::Bool(true)],
                },
            ),
        ]
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A small valid file with every value type and tensors of several types.
    fn sample(version: u32, alignment: Option<u32>) -> (Writer, Vec<(&'static str, Vec<u8>)>) {
        let mut w = Writer::new(version);
        if let Some(a) = alignment {
            w = w.alignment(a);
        }
        for (k, v) in all_value_types() {
            w = w.kv(k, v);
        }
        let tensors: Vec<(&str, Vec<u64>, GgmlType)> = vec![
            ("f32.weight", vec![3, 2], GgmlType::F32),
            ("f16.weight", vec![5], GgmlType::F16),
            ("q4_0.weight", vec![64, 2], GgmlType::Q4_0),
            ("q4_1.weight", vec![32, 1, 3], GgmlType::Q4_1),
            ("q8_0.weight", vec![32], GgmlType::Q8_0),
            ("q6_k.weight", vec![256, 1, 1, 2], GgmlType::Q6_K),
            ("scalar", vec![], GgmlType::F32),
        ];
        let mut datas = Vec::new();
        for (i, (name, dims, ty)) in tensors.into_iter().enumerate() {
            let n: u64 = dims.iter().product();
            let data = pattern(ty.bytes_for(n).unwrap() as usize, i as u8);
            w = w.tensor(name, &dims, ty.id(), data.clone());
            datas.push((name, data));
        }
        (w, datas)
    }

    #[test]
    fn reads_v2_and_v3_with_every_value_type_and_alignment() {
        for version in [2, 3] {
            for alignment in [None, Some(32), Some(64), Some(1)] {
                let (w, datas) = sample(version, alignment);
                let bytes = w.to_bytes();
                let f = GgufFile::from_bytes(bytes.clone()).unwrap();
                assert_eq!(f.version(), version);
                let expect_align = alignment.map_or(32, u64::from);
                assert_eq!(f.alignment(), expect_align);
                assert_eq!(f.data_offset() % expect_align, 0);
                for (k, v) in all_value_types() {
                    assert_eq!(f.get(k), Some(&v), "{k}");
                }
                assert_eq!(f.get_u32("t.u32").unwrap(), 4_000_000_000);
                assert_eq!(f.get_u32("t.u8").unwrap(), 200);
                assert_eq!(f.get_i32("t.i16").unwrap(), -30000);
                assert_eq!(f.get_i64("t.i64").unwrap(), i64::MIN);
                assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX);
                assert_eq!(f.get_f32("t.f32").unwrap(), 1.5e-5);
                assert_eq!(f.get_f64("t.f64").unwrap(), -2.25);
                assert!(f.get_bool("t.bool").unwrap());
                assert_eq!(f.get_str("t.string").unwrap(), "héllo, wörld 🦀");
                assert_eq!(f.get_array_str("t.array_str").unwrap(), ["a", "", "ç"]);
                assert_eq!(f.get_array_i64("t.array_i32").unwrap(), [-1, 7]);
                assert_eq!(f.get_array_f32("t.array_f32").unwrap(), [0.5, -4.0]);
                assert_eq!(f.get_array("t.array_nested").unwrap().len(), 2);
                assert_eq!(
                    f.metadata().count(),
                    all_value_types().len() + usize::from(alignment.is_some())
                );

                assert_eq!(f.tensors().len(), datas.len());
                for (name, data) in &datas {
                    let info = f.tensor_info(name).unwrap();
                    assert_eq!(info.n_bytes(), data.len() as u64, "{name}");
                    assert_eq!(info.offset % expect_align, 0);
                    assert_eq!(&f.read_tensor_bytes(name).unwrap(), data, "{name}");
                    assert_eq!(f.tensor_bytes(name).unwrap(), &data[..]);
                    let mut buf = vec![0; data.len()];
                    f.read_tensor_into(name, &mut buf).unwrap();
                    assert_eq!(&buf, data);
                }
                let q41 = f.tensor("q4_1.weight").unwrap();
                assert_eq!(q41.dims, [32, 1, 3]);
                assert_eq!(q41.ggml_type, GgmlType::Q4_1);
                assert_eq!(q41.n_elements(), 96);
                assert_eq!(q41.n_bytes(), 3 * 20);
                assert_eq!(f.tensor("scalar").unwrap().n_bytes(), 4);

                // The borrowed-slice parse sees the same table and borrows the same data.
                let detached = GgufFile::parse(&bytes).unwrap();
                assert_eq!(detached.tensors(), f.tensors());
                for (name, data) in &datas {
                    assert_eq!(detached.tensor_data_in(&bytes, name).unwrap(), &data[..]);
                }
                assert!(matches!(
                    detached.read_tensor_bytes("f32.weight"),
                    Err(GgufError::NoTensorData)
                ));
            }
        }
    }

    #[test]
    fn open_reads_from_disk_lazily() {
        let (w, datas) = sample(3, Some(64));
        let path =
            std::env::temp_dir().join(format!("kvpack-gguf-test-{}.gguf", std::process::id()));
        std::fs::write(&path, w.to_bytes()).unwrap();
        let f = GgufFile::open(&path);
        let result = (|| -> Result<()> {
            let f = f?;
            assert_eq!(f.alignment(), 64);
            for (name, data) in &datas {
                assert_eq!(&f.read_tensor_bytes(name)?, data);
            }
            let mut small = [0u8; 3];
            assert!(matches!(
                f.read_tensor_into("f32.weight", &mut small),
                Err(GgufError::BufferSize {
                    expected: 24,
                    got: 3,
                    ..
                })
            ));
            Ok(())
        })();
        std::fs::remove_file(&path).unwrap();
        result.unwrap();

        let missing = GgufFile::open("/nonexistent/kvpack/model.gguf").unwrap_err();
        assert!(matches!(missing, GgufError::Io { .. }));
        assert!(missing
            .to_string()
            .contains("/nonexistent/kvpack/model.gguf"));
    }

    #[test]
    fn typed_getter_errors() {
        let f = GgufFile::parse(&sample(3, None).0.to_bytes()).unwrap();
        match f.get_u32("llama.block_count") {
            Err(GgufError::MissingKey { key }) => assert_eq!(key, "llama.block_count"),
            other => panic!("{other:?}"),
        }
        match f.get_u32("t.string") {
            Err(GgufError::WrongType {
                key,
                expected,
                found,
            }) => {
                assert_eq!(
                    (key.as_str(), expected, found.as_str()),
                    ("t.string", "u32", "string")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            f.get_u32("t.i8"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(matches!(
            f.get_u32("t.u64"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(matches!(
            f.get_str("t.u8"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_bool("t.u8"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_f32("t.u8"),
            Err(GgufError::WrongType { .. })
        ));
        let e = f.get_array_str("t.array_i32").unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata key 't.array_i32' holds array<i32>, expected array<string>"
        );
        assert!(matches!(
            f.tensor_info("nope"),
            Err(GgufError::MissingTensor { .. })
        ));
    }

    #[test]
    fn bad_magic_shows_bytes() {
        let mut bytes = sample(3, None).0.to_bytes();
        bytes[..4].copy_from_slice(b"GGML");
        let e = GgufFile::parse(&bytes).unwrap_err();
        assert!(matches!(e, GgufError::BadMagic { found } if &found == b"GGML"));
        let msg = e.to_string();
        assert!(msg.contains("47 47 4d 4c") && msg.contains("GGML"), "{msg}");
    }

    #[test]
    fn unsupported_versions() {
        for (version, hint) in [(1, "version 1"), (4, ""), (0x0300_0000, "big-endian")] {
            let mut bytes = sample(3, None).0.to_bytes();
            bytes[4..8].copy_from_slice(&u32::to_le_bytes(version));
            let e = GgufFile::parse(&bytes).unwrap_err();
            assert!(matches!(e, GgufError::UnsupportedVersion { version: v } if v == version));
            assert!(e.to_string().contains(hint), "{e}");
        }
    }

    #[test]
    fn every_truncated_prefix_is_an_error() {
        for version in [2, 3] {
            let bytes = sample(version, Some(64)).0.to_bytes();
            for len in 0..bytes.len() {
                match GgufFile::parse(&bytes[..len]) {
                    Err(GgufError::Truncated {
                        offset, file_size, ..
                    }) => {
                        assert_eq!(file_size, len as u64);
                        assert!(offset <= len as u64);
                    }
                    Err(GgufError::TensorOutOfBounds { .. } | GgufError::AbsurdCount { .. }) => {}
                    other => panic!("prefix of {len} bytes: {other:?}"),
                }
            }
        }
        let bytes = sample(3, None).0.to_bytes();
        let cut = GgufFile::parse(&bytes).unwrap().data_offset() as usize - 40;
        let e = GgufFile::parse(&bytes[..cut]).unwrap_err();
        assert!(
            e.to_string().starts_with("GGUF file truncated at byte"),
            "{e}"
        );
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        // Flip each byte of the header region in turn; any outcome but a panic is fine.
        let bytes = sample(3, None).0.to_bytes();
        let header_len = GgufFile::parse(&bytes).unwrap().data_offset() as usize;
        for i in 0..header_len {
            for flip in [0xFFu8, 0x80, 0x01] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = GgufFile::parse(&b);
            }
        }
    }

    #[test]
    fn tensor_out_of_bounds() {
        // Declared at 1 MiB into the data section, but no data written.
        let mut w = Writer::new(3).tensor("a", &[8], GgmlType::F32.id(), vec![]);
        w.tensors[0].offset = Some(1 << 20);
        let bytes = w.to_bytes();
        let e = GgufFile::parse(&bytes).unwrap_err();
        match &e {
            GgufError::TensorOutOfBounds {
                name,
                offset,
                size,
                file_size,
                ..
            } => {
                assert_eq!((name.as_str(), *offset, *size), ("a", 1 << 20, 32));
                assert_eq!(*file_size, bytes.len() as u64);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("runs past the end"));

        // Offsets near u64::MAX must not overflow.
        let mut w = Writer::new(3).tensor("b", &[8], GgmlType::F32.id(), vec![]);
        w.tensors[0].offset = Some(u64::MAX - 31);
        let e = GgufFile::parse(&w.to_bytes()).unwrap_err();
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e:?}");
    }

    #[test]
    fn misaligned_tensor() {
        let mut w = Writer::new(3).tensor("a", &[2], GgmlType::F32.id(), vec![0; 8]);
        w.tensors[0].offset = Some(4);
        let e = GgufFile::parse(&w.to_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                GgufError::MisalignedTensor {
                    offset: 4,
                    alignment: 32,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_and_unsupported_tensor_types() {
        let w = Writer::new(3).tensor("x", &[32], 4, vec![0; 32]);
        let e = GgufFile::parse(&w.to_bytes()).unwrap_err();
        assert!(
            matches!(e, GgufError::UnknownTensorType { type_id: 4, .. }),
            "{e:?}"
        );

        let w = Writer::new(3).tensor(
            "blk.0.ffn_down.weight",
            &[256],
            GgmlType::Q5_K.id(),
            vec![0; 176],
        );
        let f = GgufFile::parse(&w.to_bytes()).unwrap();
        let info = f.tensor_info("blk.0.ffn_down.weight").unwrap();
        let e = info.check_supported().unwrap_err();
        assert_eq!(
            e.to_string().split(':').next().unwrap(),
            "unsupported tensor type Q5_K for tensor 'blk.0.ffn_down.weight'"
        );
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
        ] {
            assert!(ty.is_supported());
        }
        assert_eq!(GgmlType::ALL.iter().filter(|t| t.is_supported()).count(), 5);
    }

    #[test]
    fn ggml_type_table() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 40, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None);
        }
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q8_0.bytes_for(32), Some(34));
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::BF16.bytes_for(3), Some(6));
    }

    #[test]
    fn bad_shapes() {
        let w = Writer::new(3).tensor("x", &[33], GgmlType::Q8_0.id(), vec![0; 34]);
        let e = GgufFile::parse(&w.to_bytes()).unwrap_err();
        assert!(matches!(e, GgufError::BadTensorShape { .. }), "{e:?}");
        let w = Writer::new(3).tensor("x", &[1 << 40, 1 << 40], GgmlType::F32.id(), vec![]);
        let e = GgufFile::parse(&w.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        let w = Writer::new(3).tensor("x", &[1, 1, 1, 1, 1], GgmlType::F32.id(), vec![0; 4]);
        let e = GgufFile::parse(&w.to_bytes()).unwrap_err();
        assert!(
            matches!(e, GgufError::TooManyDims { n_dims: 5, .. }),
            "{e:?}"
        );
    }

    /// Patches the u64 at `at` in a written file.
    fn patch_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        // Array length: header (24) + key len (8) + "k" (1) + type (4) + elem type (4) = 41.
        let w = Writer::new(3).kv("k", Writer::string_array(&["a", "b"]));
        let mut bytes = w.to_bytes();
        patch_u64(&mut bytes, 41, u64::MAX / 2);
        let e = GgufFile::parse(&bytes).unwrap_err();
        assert!(
            matches!(e, GgufError::AbsurdCount { offset: 41, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("length of array 'k'"), "{e}");

        // String length.
        let w = Writer::new(3).kv("k", GgufValue::String("abc".into()));
        let mut bytes = w.to_bytes();
        patch_u64(&mut bytes, 37, u64::MAX);
        let e = GgufFile::parse(&bytes).unwrap_err();
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    needed: u64::MAX,
                    ..
                }
            ),
            "{e:?}"
        );

        // Key length.
        let mut bytes = w.to_bytes();
        patch_u64(&mut bytes, 24, 1 << 62);
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::Truncated { .. })
        ));

        // Tensor count and metadata count.
        let mut bytes = w.to_bytes();
        patch_u64(&mut bytes, 8, u64::MAX);
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::AbsurdCount { .. })
        ));
        let mut bytes = w.to_bytes();
        patch_u64(&mut bytes, 16, 1 << 40);
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::AbsurdCount { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let mut v = GgufValue::U8(1);
        for _ in 0..20 {
            v = GgufValue::Array {
                elem: v.value_type(),
                items: vec![v],
            };
        }
        let e = GgufFile::parse(&Writer::new(3).kv("deep", v).to_bytes()).unwrap_err();
        assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e:?}");
    }

    #[test]
    fn other_metadata_errors() {
        let bytes = Writer::new(3)
            .kv("a", GgufValue::U8(1))
            .kv("a", GgufValue::U8(2))
            .to_bytes();
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::DuplicateKey { .. })
        ));

        let bytes = Writer::new(3)
            .tensor("t", &[1], 0, vec![0; 4])
            .tensor("t", &[1], 0, vec![0; 4])
            .to_bytes();
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::DuplicateTensor { .. })
        ));

        let bytes = Writer::new(3)
            .kv("general.alignment", GgufValue::U32(48))
            .to_bytes();
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::BadAlignment { alignment: 48 })
        ));
        let bytes = Writer::new(3)
            .kv("general.alignment", GgufValue::U32(0))
            .to_bytes();
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::BadAlignment { alignment: 0 })
        ));

        // Unknown value type id 13 at the value type position (24 + 8 + 1).
        let mut bytes = Writer::new(3).kv("k", GgufValue::U8(1)).to_bytes();
        bytes[33..37].copy_from_slice(&13u32.to_le_bytes());
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::UnknownValueType {
                type_id: 13,
                offset: 33,
                ..
            })
        ));

        // Invalid UTF-8 in a key.
        let mut bytes = Writer::new(3).kv("k", GgufValue::U8(1)).to_bytes();
        bytes[32] = 0xFF;
        assert!(matches!(
            GgufFile::parse(&bytes),
            Err(GgufError::InvalidUtf8 { offset: 24, .. })
        ));
    }

    #[test]
    fn empty_file_and_no_tensors() {
        let f = GgufFile::parse(&Writer::new(2).to_bytes()).unwrap();
        assert_eq!(f.tensors().len(), 0);
        assert_eq!(f.metadata().count(), 0);
        assert!(matches!(
            GgufFile::parse(&[]),
            Err(GgufError::Truncated { offset: 0, .. })
        ));
    }
}
