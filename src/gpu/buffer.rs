//! Typed GPU buffers and readback.

use super::{Gpu, GpuError};
use std::marker::PhantomData;
use wgpu::util::DeviceExt;

/// A typed storage buffer of `len` elements of `T`.
pub struct GpuVec<T: bytemuck::Pod> {
    buffer: wgpu::Buffer,
    len: usize,
    label: String,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> GpuVec<T> {
    /// The underlying buffer, for binding.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        (self.len * std::mem::size_of::<T>()) as u64
    }
    /// Overwrite the contents from `data` (same length or shorter, from element 0).
    pub fn write(&self, gpu: &Gpu, data: &[T]) {
        assert!(
            data.len() <= self.len,
            "write of {} elements into {}",
            data.len(),
            self.len
        );
        if !data.is_empty() {
            gpu.queue
                .write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
        }
    }
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Storage buffers may not be zero-sized; and a 4-byte multiple keeps copies legal.
fn padded_bytes(bytes: usize) -> u64 {
    (bytes.max(4) as u64).div_ceil(4) * 4
}

impl Gpu {
    /// Upload `data` into a new storage buffer.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> GpuVec<T> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buffer = if bytes.len() as u64 == padded_bytes(bytes.len()) {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytes,
                    usage: USAGE,
                })
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(padded_bytes(bytes.len()) as usize, 0);
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &padded,
                    usage: USAGE,
                })
        };
        GpuVec {
            buffer,
            len: data.len(),
            label: label.to_string(),
            _t: PhantomData,
        }
    }

    /// A new zero-filled storage buffer of `len` elements.
    pub fn zeros<T: bytemuck::Pod>(&self, label: &str, len: usize) -> GpuVec<T> {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded_bytes(len * std::mem::size_of::<T>()),
            usage: USAGE,
            mapped_at_creation: false,
        });
        GpuVec {
            buffer,
            len,
            label: label.to_string(),
            _t: PhantomData,
        }
    }

    /// A new zero-filled storage buffer whose ranges may also be bound as uniform buffers
    /// (kernels that broadcast a tile of data to every invocation).
    pub fn zeros_uniform<T: bytemuck::Pod>(&self, label: &str, len: usize) -> GpuVec<T> {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded_bytes(len * std::mem::size_of::<T>()),
            usage: USAGE | wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: false,
        });
        GpuVec {
            buffer,
            len,
            label: label.to_string(),
            _t: PhantomData,
        }
    }

    /// Copy a buffer back to the CPU. The same code natively and in the browser: the map callback
    /// completes a channel that this future awaits; natively the device is polled to drive it.
    pub async fn read<T: bytemuck::Pod>(&self, v: &GpuVec<T>) -> Result<Vec<T>, GpuError> {
        if v.len == 0 {
            return Ok(Vec::new());
        }
        let bytes = v.bytes();
        let size = padded_bytes(bytes as usize);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        enc.copy_buffer_to_buffer(&v.buffer, 0, &staging, 0, Some(size));
        self.queue.submit([enc.finish()]);
        let (tx, rx) = tokio::sync::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| GpuError::Readback {
                    label: v.label.clone(),
                    message: e.to_string(),
                })?;
        }
        let mapped = rx.await.map_err(|_| GpuError::Readback {
            label: v.label.clone(),
            message: "the map callback was dropped".into(),
        })?;
        mapped.map_err(|e| GpuError::Readback {
            label: v.label.clone(),
            message: e.to_string(),
        })?;
        let data = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| GpuError::Readback {
                label: v.label.clone(),
                message: e.to_string(),
            })?;
        let out: Vec<T> = bytemuck::pod_collect_to_vec(&data[..bytes as usize]);
        drop(data);
        staging.unmap();
        Ok(out)
    }

    /// [`Gpu::read`], blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_blocking<T: bytemuck::Pod>(&self, v: &GpuVec<T>) -> Result<Vec<T>, GpuError> {
        pollster::block_on(self.read(v))
    }
}
