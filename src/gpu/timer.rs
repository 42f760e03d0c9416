//! GPU timestamps around one compute pass, for benchmarks (adapters with `TIMESTAMP_QUERY`).

use super::{Gpu, GpuError};

/// Two timestamps (start and end of a pass) and the buffers to read them back.
#[derive(Clone)]
pub struct GpuTimer {
    pub(super) set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    period_ns: f64,
}

impl Gpu {
    /// A pass timer, or `None` when the device has no timestamp queries.
    pub fn timer(&self) -> Option<GpuTimer> {
        if !self.has_timestamps() {
            return None;
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("pass timer"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |label, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Some(GpuTimer {
            set,
            resolve: buffer(
                "timestamps",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            staging: buffer(
                "timestamps readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
            period_ns: self.queue.get_timestamp_period() as f64,
        })
    }
}

impl GpuTimer {
    pub(super) fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.set, 0..2, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.staging, 0, Some(16));
    }

    /// Milliseconds between the timed pass's start and end (after its batch was submitted).
    pub async fn elapsed_ms(&self, gpu: &Gpu) -> Result<f64, GpuError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        gpu.wait_idle();
        let err = |m: String| GpuError::Readback {
            label: "timestamps".into(),
            message: m,
        };
        rx.await
            .map_err(|_| err("callback dropped".into()))?
            .map_err(|e| err(e.to_string()))?;
        let ticks: Vec<u64> = {
            let data = self
                .staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| err(e.to_string()))?;
            bytemuck::pod_collect_to_vec(&data[..])
        };
        self.staging.unmap();
        Ok(ticks[1].saturating_sub(ticks[0]) as f64 * self.period_ns / 1e6)
    }
}
