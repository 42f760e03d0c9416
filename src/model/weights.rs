//! Model weights on the GPU, kept in their GGUF block layout: a Q4_1 matrix takes 5 bits per
//! weight in GPU memory as in the file, and the kernels of [`crate::model::ops`] dequantize it
//! where they read it. No f32 copy of a weight is ever made.
//!
//! A tensor larger than one storage binding (`max_storage_buffer_binding_size`, 128 MiB in a
//! browser) is split by whole rows into several buffers, so a multi-gigabyte model loads
//! anywhere; the kernels run once per chunk.
//!
//! [`dequantize_row`] is the CPU reference of the block formats, value for value as llama.cpp's
//! `dequantize_row_*` (ggml-quants.c).

use crate::gpu::{Gpu, GpuVec};
use crate::model::gguf::{GgmlType, GgufError, GgufFile};
use half::f16;

/// Errors of weight upload and dequantization.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The tensor's element type has no kernels.
    #[error(
        "tensor `{name}` has type {ggml_type}, which kvpack cannot compute with (supported: F32, \
         F16, Q4_0, Q4_1, Q8_0); use a GGUF quantized to one of those, e.g. \
         `llama-quantize model.gguf out.gguf Q4_1`"
    )]
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
    },
    /// The dimensions do not describe a matrix the kernels can read.
    #[error("tensor `{name}` of type {ggml_type} with dims {dims:?}: {reason}")]
    BadShape {
        /// Tensor name.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Its dimensions, `ne0` first.
        dims: Vec<u64>,
        /// What is wrong.
        reason: String,
    },
    /// The data is not as long as the shape and type say.
    #[error("tensor `{name}`: got {got} bytes of {ggml_type} data, its shape takes {expected}")]
    BadSize {
        /// Tensor name.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Bytes the shape takes.
        expected: u64,
        /// Bytes given.
        got: usize,
    },
    /// Reading the tensor from the GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// Bytes of one row of `cols` values of a supported type, or `None` when `cols` is not a whole
/// number of blocks.
pub fn row_bytes(ggml_type: GgmlType, cols: usize) -> Option<usize> {
    ggml_type
        .bytes_for(cols as u64)
        .and_then(|b| usize::try_from(b).ok())
}

/// Rows `[row_start, row_start + rows)` of a tensor, in one GPU buffer.
pub struct WeightChunk {
    /// First row held.
    pub row_start: usize,
    /// Rows held.
    pub rows: usize,
    /// The rows' GGUF bytes, back to back from byte 0, padded with zeros to whole words plus one
    /// spare word (kernels read 4 bytes at any even offset).
    pub words: GpuVec<u32>,
}

/// A weight matrix on the GPU in its GGUF block layout, split by rows into [`WeightChunk`]s.
pub struct QTensor {
    /// Tensor name, as in the GGUF file.
    pub name: String,
    /// Element type (F32, F16, Q4_0, Q4_1 or Q8_0).
    pub ggml_type: GgmlType,
    /// Output dimension (`ne1 · ne2 · …`): rows of the matrix.
    pub rows: usize,
    /// Input dimension (`ne0`): values per row.
    pub cols: usize,
    /// The rows, in order, in buffers no larger than one storage binding.
    pub chunks: Vec<WeightChunk>,
}

/// Largest buffer the kernels address (byte offsets are u32 in WGSL).
const MAX_CHUNK_BYTES: u64 = 1 << 31;

impl QTensor {
    /// Upload a tensor from its raw GGUF bytes (`dims` in GGUF order, `ne0` first), split into
    /// chunks no larger than the device's storage binding and buffer limits.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        ggml_type: GgmlType,
        dims: &[u64],
        bytes: &[u8],
    ) -> Result<QTensor, WeightError> {
        let limits = gpu.limits();
        let max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Self::upload_with_chunk_bytes(gpu, name, ggml_type, dims, bytes, max)
    }

    /// [`QTensor::upload`] with chunks of at most `max_chunk_bytes` bytes (padding included), for
    /// tests of split tensors. Fails when one row does not fit.
    pub fn upload_with_chunk_bytes(
        gpu: &Gpu,
        name: &str,
        ggml_type: GgmlType,
        dims: &[u64],
        bytes: &[u8],
        max_chunk_bytes: u64,
    ) -> Result<QTensor, WeightError> {
        let (rows, cols, row_bytes) = check_layout(name, ggml_type, dims, bytes.len())?;
        // Room for the padding: up to 3 bytes to a whole word, and the spare word.
        let usable = max_chunk_bytes.min(MAX_CHUNK_BYTES).saturating_sub(8);
        let rows_per_chunk = (usable / row_bytes as u64) as usize;
        if rows_per_chunk == 0 {
            return Err(WeightError::BadShape {
                name: name.to_string(),
                ggml_type,
                dims: dims.to_vec(),
                reason: format!(
                    "one row takes {row_bytes} bytes, more than a GPU buffer may hold here \
                     ({max_chunk_bytes} bytes)"
                ),
            });
        }
        let mut chunks = Vec::with_capacity(rows.div_ceil(rows_per_chunk));
        let mut row_start = 0;
        while row_start < rows {
            let n = rows_per_chunk.min(rows - row_start);
            let data = &bytes[row_start * row_bytes..(row_start + n) * row_bytes];
            let label = format!("{name} rows {row_start}..{}", row_start + n);
            chunks.push(WeightChunk {
                row_start,
                rows: n,
                words: gpu.upload(&label, &words_of(data)),
            });
            row_start += n;
        }
        Ok(QTensor {
            name: name.to_string(),
            ggml_type,
            rows,
            cols,
            chunks,
        })
    }

    /// Read tensor `name` from a GGUF file and upload it.
    pub fn load(gpu: &Gpu, file: &GgufFile, name: &str) -> Result<QTensor, WeightError> {
        let info = file.tensor_info(name)?;
        let bytes = file.read_tensor_bytes(name)?;
        Self::upload(gpu, name, info.ggml_type, &info.dims, &bytes)
    }

    /// GPU memory taken by the chunks, bytes.
    pub fn gpu_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.words.bytes()).sum()
    }

    /// Bytes of one row in the GGUF layout.
    pub fn row_bytes(&self) -> usize {
        row_bytes(self.ggml_type, self.cols).expect("checked at upload")
    }
}

/// Read any supported tensor from a GGUF file as f32 values (norm weights) and upload them.
pub fn load_f32(gpu: &Gpu, file: &GgufFile, name: &str) -> Result<GpuVec<f32>, WeightError> {
    let info = file.tensor_info(name)?;
    let bytes = file.read_tensor_bytes(name)?;
    let (rows, cols, _) = check_layout(name, info.ggml_type, &info.dims, bytes.len())?;
    let values = dequantize_rows(info.ggml_type, &bytes, rows, cols)?;
    Ok(gpu.upload(name, &values))
}

/// Rows, columns and bytes per row of a tensor the kernels can read.
fn check_layout(
    name: &str,
    ggml_type: GgmlType,
    dims: &[u64],
    n_bytes: usize,
) -> Result<(usize, usize, usize), WeightError> {
    let bad = |reason: String| WeightError::BadShape {
        name: name.to_string(),
        ggml_type,
        dims: dims.to_vec(),
        reason,
    };
    if !ggml_type.is_supported() {
        return Err(WeightError::UnsupportedType {
            name: name.to_string(),
            ggml_type,
        });
    }
    if dims.is_empty() || dims.contains(&0) {
        return Err(bad("a weight needs at least one row and one column".into()));
    }
    let cols = dims[0];
    let rows = dims[1..]
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("the row count overflows".into()))?;
    // The kernels read rows in units of 8 values.
    if !cols.is_multiple_of(8) || !cols.is_multiple_of(ggml_type.block_size()) {
        return Err(bad(format!(
            "the row length {cols} must be a multiple of 8 and of the block size {}",
            ggml_type.block_size()
        )));
    }
    let row = ggml_type
        .bytes_for(cols)
        .ok_or_else(|| bad("the row size overflows".into()))?;
    let expected = row
        .checked_mul(rows)
        .ok_or_else(|| bad("the size overflows".into()))?;
    if expected != n_bytes as u64 {
        return Err(WeightError::BadSize {
            name: name.to_string(),
            ggml_type,
            expected,
            got: n_bytes,
        });
    }
    let too_big = |_| bad("too large for this platform's address space".into());
    Ok((
        usize::try_from(rows).map_err(too_big)?,
        usize::try_from(cols).map_err(too_big)?,
        usize::try_from(row).map_err(too_big)?,
    ))
}

/// Little-endian words of `bytes`, zero-padded to whole words, plus one spare zero word.
fn words_of(bytes: &[u8]) -> Vec<u32> {
    let mut words = Vec::with_capacity(bytes.len() / 4 + 2);
    let mut it = bytes.chunks_exact(4);
    for w in &mut it {
        words.push(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = it.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 4];
        w[..rest.len()].copy_from_slice(rest);
        words.push(u32::from_le_bytes(w));
    }
    words.push(0);
    words
}

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[i], bytes[i + 1]]).to_f32()
}

/// One row of `cols` values of a GGUF tensor, dequantized to f32 exactly as llama.cpp does:
/// Q4_0 `(nibble − 8) · d`, Q4_1 `nibble · d + m`, Q8_0 `q · d`, where byte `i` of a Q4 block's
/// 16 packed bytes holds value `i` (low nibble) and value `i + 16` (high nibble).
pub fn dequantize_row(
    ggml_type: GgmlType,
    bytes: &[u8],
    cols: usize,
) -> Result<Vec<f32>, WeightError> {
    let bad_size = |expected: u64| WeightError::BadSize {
        name: "(row)".into(),
        ggml_type,
        expected,
        got: bytes.len(),
    };
    if !ggml_type.is_supported() {
        return Err(WeightError::UnsupportedType {
            name: "(row)".into(),
            ggml_type,
        });
    }
    let need = ggml_type
        .bytes_for(cols as u64)
        .ok_or_else(|| bad_size(0))?;
    if bytes.len() as u64 != need {
        return Err(bad_size(need));
    }
    let mut out = Vec::with_capacity(cols);
    match ggml_type {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|b| f16_at(b, 0))),
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let q4_1 = ggml_type == GgmlType::Q4_1;
            for blk in bytes.chunks_exact(ggml_type.type_size() as usize) {
                let d = f16_at(blk, 0);
                let (m, qs) = if q4_1 {
                    (f16_at(blk, 2), &blk[4..20])
                } else {
                    (0.0, &blk[2..18])
                };
                let value = |nib: u8| {
                    if q4_1 {
                        nib as f32 * d + m
                    } else {
                        (nib as i32 - 8) as f32 * d
                    }
                };
                out.extend(qs.iter().map(|&b| value(b & 15)));
                out.extend(qs.iter().map(|&b| value(b >> 4)));
            }
        }
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        _ => unreachable!("checked by is_supported"),
    }
    Ok(out)
}

/// `rows` rows of `cols` values, dequantized with [`dequantize_row`], row after row.
pub fn dequantize_rows(
    ggml_type: GgmlType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, WeightError> {
    let rb = row_bytes(ggml_type, cols).unwrap_or(0);
    if rb == 0 || bytes.len() != rb * rows {
        return Err(WeightError::BadSize {
            name: "(rows)".into(),
            ggml_type,
            expected: (rb * rows) as u64,
            got: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(rows * cols);
    for r in bytes.chunks_exact(rb) {
        out.extend(dequantize_row(ggml_type, r, cols)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_nibble_order_and_offset() {
        let mut blk = h(0.5).to_vec();
        // byte i: low nibble = i, high nibble = 15 - i
        blk.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize_row(GgmlType::Q4_0, &blk, 32).unwrap();
        for i in 0..16 {
            assert_eq!(v[i], (i as f32 - 8.0) * 0.5);
            assert_eq!(v[i + 16], ((15 - i) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_and_q8_0_blocks() {
        let mut blk = h(0.25).to_vec();
        blk.extend(h(-1.0));
        blk.extend((0..16u8).map(|i| i | (3 << 4)));
        let v = dequantize_row(GgmlType::Q4_1, &blk, 32).unwrap();
        assert_eq!(v[5], 5.0 * 0.25 - 1.0);
        assert_eq!(v[21], 3.0 * 0.25 - 1.0);

        let mut blk = h(2.0).to_vec();
        blk.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize_row(GgmlType::Q8_0, &blk, 32).unwrap();
        assert_eq!(v[0], -32.0);
        assert_eq!(v[31], 30.0);
    }

    #[test]
    fn f16_f32_rows_and_errors() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            dequantize_row(GgmlType::F32, &bytes, 2).unwrap(),
            [1.5, -2.0]
        );
        let bytes: Vec<u8> = [h(1.5), h(-0.125)].concat();
        assert_eq!(
            dequantize_row(GgmlType::F16, &bytes, 2).unwrap(),
            [1.5, -0.125]
        );
        let err = dequantize_row(GgmlType::Q4_K, &[0; 144], 256).unwrap_err();
        assert!(err.to_string().contains("Q4_K"), "{err}");
        assert!(dequantize_row(GgmlType::Q8_0, &[0; 33], 32).is_err());
        let err = check_layout("w", GgmlType::Q4_1, &[576, 2], 10).unwrap_err();
        assert!(err.to_string().contains("takes 720"), "{err}");
        let err = check_layout("w", GgmlType::Q5_K, &[256, 2], 352).unwrap_err();
        assert!(err.to_string().contains("`w`") && err.to_string().contains("Q5_K"));
    }

    #[test]
    fn words_pad_and_spare() {
        assert_eq!(words_of(&[1, 0, 0, 0, 2, 3]), [1, 0x0302, 0]);
        assert_eq!(words_of(&[1, 0, 0, 0]), [1, 0]);
    }
}
