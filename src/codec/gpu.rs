//! GPU encode and decode of every vector format (`shaders/codec/encode.wgsl`,
//! `shaders/codec/decode.wgsl`), on the page layout of `docs/formats.md`.

use super::{Codec, CodecError, Encoded, VecFormat};
use crate::gpu::{grid, Batch, Binding, Gpu, GpuError, GpuVec};

/// Errors of GPU codec calls.
#[derive(Debug, thiserror::Error)]
pub enum GpuCodecError {
    /// The GPU layer failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The input was refused.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Override constants that specialize the format-reading WGSL (`common/format.wgsl`) for a format.
/// Prefix `""` gives `FMT_KIND`…, prefix `"K_"` gives `K_KIND`… (attention's key format).
pub fn format_constants(prefix: &'static str, format: &VecFormat) -> [(&'static str, f64); 3] {
    let (a, b) = match *format {
        VecFormat::Turbo { bits, .. } => (bits as u32, 0),
        VecFormat::TurboProd { bits } => (bits as u32 - 1, 0),
        VecFormat::TurboSplit { hi, lo } => (hi as u32, lo as u32),
        _ => (0, 0),
    };
    let kind = format.kind() as f64;
    if prefix == "K_" {
        [
            ("K_KIND", kind),
            ("K_BITS_A", a as f64),
            ("K_BITS_B", b as f64),
        ]
    } else {
        [
            ("FMT_KIND", kind),
            ("FMT_BITS_A", a as f64),
            ("FMT_BITS_B", b as f64),
        ]
    }
}

/// Words of a page that holds `capacity` vectors: codes, then scales.
pub fn page_words(format: &VecFormat, d: usize, capacity: usize) -> usize {
    capacity * format.code_words(d) + (capacity * format.scale_halves(d)).div_ceil(2)
}

/// Word offset of a page's scales region.
pub fn scale_base(format: &VecFormat, d: usize, capacity: usize) -> usize {
    capacity * format.code_words(d)
}

/// Half `k` of the f16 region that starts at word `base` (low 16 bits for even `k`).
fn half_at(words: &[u32], base: usize, k: usize) -> u32 {
    (words[base + k / 2] >> (16 * (k % 2))) & 0xffff
}

fn set_half(words: &mut [u32], base: usize, k: usize, h: u32) {
    let w = &mut words[base + k / 2];
    let shift = 16 * (k % 2);
    *w = (*w & !(0xffff << shift)) | (h << shift);
}

/// Vectors `[first, first + n)` of a page that holds `capacity` vectors, as a page of exactly
/// `n` (docs/formats.md: their codes, then their scales), bit for bit.
pub fn page_run(
    page: &[u32],
    format: &VecFormat,
    d: usize,
    capacity: usize,
    first: usize,
    n: usize,
) -> Vec<u32> {
    assert!(first + n <= capacity && page.len() >= page_words(format, d, capacity));
    let (cw, sh) = (format.code_words(d), format.scale_halves(d));
    let mut run = vec![0u32; page_words(format, d, n)];
    run[..n * cw].copy_from_slice(&page[first * cw..(first + n) * cw]);
    let base = scale_base(format, d, capacity);
    for k in 0..n * sh {
        set_half(&mut run, n * cw, k, half_at(page, base, first * sh + k));
    }
    run
}

/// Write `run`, a page of exactly `n` vectors ([`page_run`]), into vectors `[first, first + n)`
/// of `page`, a page that holds `capacity` vectors; the page's other vectors are untouched.
/// Refused when `run` is not `n` vectors of `format` or they do not fit.
pub fn put_page_run(
    page: &mut [u32],
    format: &VecFormat,
    d: usize,
    capacity: usize,
    first: usize,
    n: usize,
    run: &[u32],
) -> Result<(), String> {
    if run.len() != page_words(format, d, n) {
        return Err(format!(
            "{} words for {n} vectors of {format} (d = {d}), which take {}",
            run.len(),
            page_words(format, d, n)
        ));
    }
    if first + n > capacity || page.len() < page_words(format, d, capacity) {
        return Err(format!(
            "vectors {first}..{} in a page of {capacity}",
            first + n
        ));
    }
    let (cw, sh) = (format.code_words(d), format.scale_halves(d));
    page[first * cw..(first + n) * cw].copy_from_slice(&run[..n * cw]);
    let base = scale_base(format, d, capacity);
    for k in 0..n * sh {
        set_half(page, base, first * sh + k, half_at(run, n * cw, k));
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EncodeParams {
    n: u32,
    dst_first: u32,
    scale_base: u32,
    src_offset: u32,
    src_stride: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DecodeParams {
    n: u32,
    first: u32,
    scale_base: u32,
    _pad: u32,
}

/// A codec instance with its parameters (signs, codebooks, permutation, S) on the GPU.
pub struct GpuCodec {
    codec: Codec,
    aux: GpuVec<u32>,
}

/// The input vectors of an encode.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// f32 coordinates.
    F32(&'a GpuVec<f32>),
    /// f16 coordinates, two a word (coordinate 2i in the low half), as the f16 format stores them.
    F16(&'a GpuVec<u32>),
    /// f16 coordinates in this codec's rotated domain (H·D·x per part), as
    /// [`GpuCodec::encode_rotated_f16_into`] writes them: the encode skips the rotation.
    RotatedF16(&'a GpuVec<u32>),
}

impl Input<'_> {
    fn buffer(&self) -> &wgpu::Buffer {
        match self {
            Input::F32(x) => x.buffer(),
            Input::F16(x) | Input::RotatedF16(x) => x.buffer(),
        }
    }

    fn kind(&self) -> f64 {
        match self {
            Input::F32(_) => 0.0,
            Input::F16(_) => 1.0,
            Input::RotatedF16(_) => 2.0,
        }
    }
}

impl<'a> From<&'a GpuVec<f32>> for Input<'a> {
    fn from(x: &'a GpuVec<f32>) -> Self {
        Input::F32(x)
    }
}

/// Where an encode writes and where it reads from.
pub struct EncodeArgs<'a> {
    /// Input vectors.
    pub xs: Input<'a>,
    /// Coordinate offset of the first input vector.
    pub src_offset: usize,
    /// Coordinates between consecutive input vectors (`d` when packed).
    pub src_stride: usize,
    /// Number of vectors.
    pub n: usize,
    /// The page.
    pub page: &'a GpuVec<u32>,
    /// The page's capacity in vectors (fixes where its scales region starts).
    pub capacity: usize,
    /// Page index of the first vector written.
    pub dst_first: usize,
    /// Two u32: count of refused vectors, smallest refused input index (initialize to [0, u32::MAX]).
    pub status: &'a GpuVec<u32>,
}

impl<'a> EncodeArgs<'a> {
    /// `n` packed vectors (`d` coordinates apart, from the start of `xs`) into the first `n`
    /// slots of a page that holds exactly `n`.
    pub fn packed(
        xs: Input<'a>,
        d: usize,
        n: usize,
        page: &'a GpuVec<u32>,
        status: &'a GpuVec<u32>,
    ) -> Self {
        EncodeArgs {
            xs,
            src_offset: 0,
            src_stride: d,
            n,
            page,
            capacity: n,
            dst_first: 0,
            status,
        }
    }
}

impl GpuCodec {
    /// Upload a codec instance's parameters.
    pub fn new(gpu: &Gpu, codec: Codec) -> Self {
        let aux = gpu.upload("codec aux", &codec.aux_words());
        GpuCodec { codec, aux }
    }

    /// The CPU instance (format, dimension, seed, parameters).
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The parameters buffer bound as `fmt_aux` / `k_aux`.
    pub fn aux(&self) -> &GpuVec<u32> {
        &self.aux
    }

    fn d(&self) -> usize {
        self.codec.dim()
    }

    fn constants(&self, wg: usize) -> Vec<(&'static str, f64)> {
        let mut c = vec![("D", self.d() as f64), ("WG", wg as f64)];
        c.extend(format_constants("", &self.codec.format()));
        c
    }

    /// Workgroup size for per-vector kernels: one invocation per coordinate, at least 32.
    fn wg(&self) -> usize {
        self.d().clamp(32, 256)
    }

    /// Record an encode into `batch`.
    pub fn encode_into(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        a: &EncodeArgs<'_>,
    ) -> Result<(), GpuError> {
        let scales = scale_base(&self.codec.format(), self.d(), a.capacity);
        self.dispatch_encode(gpu, batch, &self.constants(self.wg()), scales, a)
    }

    /// Record the write of `a.n` vectors as plain f32 in this codec's rotated domain (H·D·x per
    /// part; identity for non-TurboQuant formats) into a page of `d` words per vector: the
    /// full-precision tokens (attention sinks) that attention combines with this codec's page.
    pub fn encode_rotated_f32_into(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        a: &EncodeArgs<'_>,
    ) -> Result<(), GpuError> {
        self.encode_rotated(gpu, batch, a, 7)
    }

    /// [`GpuCodec::encode_rotated_f32_into`] with f16 coordinates: `d / 2` words per vector, each
    /// word two coordinates (`pack2x16float`, coordinate 2i in the low half). A vector with a
    /// rotated coordinate beyond the f16 range is stored as zero and counted in `status`.
    pub fn encode_rotated_f16_into(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        a: &EncodeArgs<'_>,
    ) -> Result<(), GpuError> {
        self.encode_rotated(gpu, batch, a, 8)
    }

    fn encode_rotated(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        a: &EncodeArgs<'_>,
        kind: u32,
    ) -> Result<(), GpuError> {
        let mut constants = self.constants(self.wg());
        // Kinds 7 and 8 keep the format's bits (which tell a split format) and its aux (signs, perm).
        constants.retain(|(k, _)| *k != "FMT_KIND");
        constants.push(("FMT_KIND", kind as f64));
        let words = if kind == 8 { self.d() / 2 } else { self.d() };
        self.dispatch_encode(gpu, batch, &constants, a.capacity * words, a)
    }

    fn dispatch_encode(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        constants: &[(&str, f64)],
        scale_base_words: usize,
        a: &EncodeArgs<'_>,
    ) -> Result<(), GpuError> {
        if a.n == 0 {
            return Ok(());
        }
        let mut constants = constants.to_vec();
        constants.push(("SRC", a.xs.kind()));
        let kernel = gpu.pipeline(
            "codec/encode",
            "main",
            &constants,
            &[
                Binding::Uniform,
                Binding::READ,
                Binding::RW,
                Binding::READ,
                Binding::RW,
            ],
        )?;
        let params = EncodeParams {
            n: a.n as u32,
            dst_first: a.dst_first as u32,
            scale_base: scale_base_words as u32,
            src_offset: a.src_offset as u32,
            src_stride: a.src_stride as u32,
            _pad: [0; 3],
        };
        let ub = gpu.uniform("encode params", &params);
        let first_pair = a.dst_first / 2;
        let last_pair = (a.dst_first + a.n - 1) / 2;
        batch.dispatch(
            &kernel,
            &[
                &ub,
                a.xs.buffer(),
                a.page.buffer(),
                self.aux.buffer(),
                a.status.buffer(),
            ],
            grid((last_pair - first_pair + 1) as u32),
        );
        Ok(())
    }

    /// Record a decode of page vectors `[first, first + n)` into `out` (n × d floats).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_into(
        &self,
        gpu: &Gpu,
        batch: &mut Batch<'_>,
        page: &GpuVec<u32>,
        capacity: usize,
        first: usize,
        n: usize,
        out: &GpuVec<f32>,
    ) -> Result<(), GpuError> {
        if n == 0 {
            return Ok(());
        }
        let format = self.codec.format();
        let kernel = gpu.pipeline(
            "codec/decode",
            "main",
            &self.constants(self.wg()),
            &[Binding::Uniform, Binding::READ, Binding::READ, Binding::RW],
        )?;
        let params = DecodeParams {
            n: n as u32,
            first: first as u32,
            scale_base: scale_base(&format, self.d(), capacity) as u32,
            _pad: 0,
        };
        let ub = gpu.uniform("decode params", &params);
        batch.dispatch(
            &kernel,
            &[&ub, page.buffer(), self.aux.buffer(), out.buffer()],
            grid(n as u32),
        );
        Ok(())
    }

    /// Encode `xs` (n × d) on the GPU and read the page back; vectors that are not finite, or whose
    /// scale overflows f16, are stored as zero and reported as [`CodecError::NonFinite`].
    pub async fn encode(&self, gpu: &Gpu, xs: &[f32]) -> Result<Encoded, GpuCodecError> {
        let (enc, refused) = self.encode_lossy(gpu, xs).await?;
        if let Some((count, first_index)) = refused {
            return Err(CodecError::NonFinite { count, first_index }.into());
        }
        Ok(enc)
    }

    /// [`GpuCodec::encode`], returning the page even when some vectors were refused, with
    /// `(count, first refused index)`.
    pub async fn encode_lossy(
        &self,
        gpu: &Gpu,
        xs: &[f32],
    ) -> Result<(Encoded, Option<(usize, usize)>), GpuCodecError> {
        let d = self.d();
        if !xs.len().is_multiple_of(d) {
            return Err(CodecError::LengthMismatch {
                what: format!("input vectors (a multiple of d = {d} floats)"),
                got: xs.len(),
                expected: xs.len().div_ceil(d) * d,
            }
            .into());
        }
        let n = xs.len() / d;
        let format = self.codec.format();
        let input = gpu.upload("encode input", xs);
        let page = gpu.zeros::<u32>("page", page_words(&format, d, n));
        let status = gpu.upload("encode status", &[0u32, u32::MAX]);
        let mut batch = gpu.batch("encode");
        self.encode_into(
            gpu,
            &mut batch,
            &EncodeArgs::packed(Input::F32(&input), d, n, &page, &status),
        )?;
        batch.submit();
        let words = gpu.read(&page).await?;
        let st = gpu.read(&status).await?;
        let refused = (st[0] > 0).then_some((st[0] as usize, st[1] as usize));
        Ok((Encoded { n, d, words }, refused))
    }

    /// Decode an encoded run on the GPU.
    pub async fn decode(&self, gpu: &Gpu, enc: &Encoded) -> Result<Vec<f32>, GpuCodecError> {
        let page = gpu.upload("decode page", &enc.words);
        let out = gpu.zeros::<f32>("decoded", enc.n * enc.d);
        let mut batch = gpu.batch("decode");
        self.decode_into(gpu, &mut batch, &page, enc.n, 0, enc.n, &out)?;
        batch.submit();
        Ok(gpu.read(&out).await?)
    }
}
