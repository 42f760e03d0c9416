//! The GPU layer: adapter choice, device, pipeline cache, typed buffers, batched dispatch and
//! asynchronous readback. Everything above this module speaks in [`Gpu`], [`GpuVec`] and [`Batch`].
//!
//! The life of a dispatch, as in wgpu's `hello_compute`:
//! ```no_run
//! # async fn demo() -> Result<(), kvpack::gpu::GpuError> {
//! use kvpack::gpu::{Binding, Gpu, GpuOptions};
//! let gpu = Gpu::new(&GpuOptions::from_env()).await?;
//! let x = gpu.upload("x", &[1.0f32, 2.0, 3.0]);
//! let pipeline = gpu.pipeline("codec/f32_copy", "main", &[], &[Binding::READ, Binding::RW])?;
//! let y = gpu.zeros::<f32>("y", 3);
//! let mut batch = gpu.batch("demo");
//! batch.dispatch(&pipeline, &[x.buffer(), y.buffer()], [1, 1, 1]);
//! batch.submit();
//! let back = gpu.read(&y).await?;
//! # let _ = back; Ok(()) }
//! ```

mod buffer;
mod shaders;
mod timer;

pub use buffer::GpuVec;
pub use shaders::{shader_names, shader_source, SHADER_FILES};
pub use timer::GpuTimer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Errors of the GPU layer.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No adapter matched the request.
    #[error("no GPU adapter found for backend {backend}{hint}")]
    NoAdapter {
        /// The backend that was asked for.
        backend: String,
        /// What to do about it.
        hint: String,
    },
    /// The device could not be created with the limits/features asked for.
    #[error("could not open a device on {adapter}: {source}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        #[source]
        source: wgpu::RequestDeviceError,
    },
    /// A shader name that is not in the registry.
    #[error("unknown shader `{0}` (known: see kvpack::gpu::shader_names())")]
    UnknownShader(String),
    /// A shader that failed to compile or a pipeline that failed validation.
    #[error("shader `{shader}` entry `{entry}`: {message}")]
    Pipeline {
        /// Shader name.
        shader: String,
        /// Entry point.
        entry: String,
        /// The validation message.
        message: String,
    },
    /// Mapping a buffer for reading failed.
    #[error("reading back buffer `{label}` failed: {message}")]
    Readback {
        /// Buffer label.
        label: String,
        /// Why.
        message: String,
    },
    /// A bad argument such as an unknown backend name.
    #[error("{0}")]
    Invalid(String),
}

/// Which wgpu backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Whatever wgpu finds first (honours `WGPU_BACKEND`).
    #[default]
    Auto,
    /// Vulkan (lavapipe on CPU-only machines).
    Vulkan,
    /// OpenGL / GLES (llvmpipe on CPU-only machines).
    Gl,
    /// Apple Metal.
    Metal,
    /// Direct3D 12.
    Dx12,
    /// The browser's WebGPU.
    WebGpu,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            // Native APIs first; OpenGL only as a fallback (see `Gpu::new`).
            BackendChoice::Auto => wgpu::Backends::from_env()
                .unwrap_or(wgpu::Backends::PRIMARY | wgpu::Backends::BROWSER_WEBGPU),
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Gl => wgpu::Backends::GL,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::WebGpu => wgpu::Backends::BROWSER_WEBGPU,
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = GpuError;
    fn from_str(s: &str) -> Result<Self, GpuError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => BackendChoice::Auto,
            "vulkan" | "vk" => BackendChoice::Vulkan,
            "gl" | "gles" | "opengl" => BackendChoice::Gl,
            "metal" | "mtl" => BackendChoice::Metal,
            "dx12" | "d3d12" => BackendChoice::Dx12,
            "webgpu" | "browser" => BackendChoice::WebGpu,
            other => {
                return Err(GpuError::Invalid(format!(
                    "unknown backend `{other}`: use one of auto, vulkan, gl, metal, dx12, webgpu"
                )))
            }
        })
    }
}

/// Power preference when several adapters exist (an integrated GPU is `Low`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    /// Let wgpu decide.
    #[default]
    Default,
    /// Prefer the integrated / low-power adapter.
    Low,
    /// Prefer the discrete / high-performance adapter.
    High,
}

impl std::str::FromStr for Power {
    type Err = GpuError;
    fn from_str(s: &str) -> Result<Self, GpuError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "default" | "auto" => Power::Default,
            "low" | "integrated" => Power::Low,
            "high" | "discrete" => Power::High,
            other => {
                return Err(GpuError::Invalid(format!(
                    "unknown power preference `{other}`: use low, high or default"
                )))
            }
        })
    }
}

/// How to open the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backend.
    pub backend: BackendChoice,
    /// Power preference.
    pub power: Power,
    /// Request exactly WebGPU's default limits (256 invocations, 16 KiB workgroup memory,
    /// 8 storage buffers per stage, 128 MiB per binding), so native runs prove the kernels fit a
    /// browser. On when `KVPACK_WEBGPU_LIMITS=1`.
    pub webgpu_limits: bool,
}

impl GpuOptions {
    /// Options from the environment: `KVPACK_BACKEND` (or wgpu's `WGPU_BACKEND`),
    /// `KVPACK_POWER`, `KVPACK_WEBGPU_LIMITS`.
    pub fn from_env() -> Self {
        let backend = std::env::var("KVPACK_BACKEND")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        let power = std::env::var("KVPACK_POWER")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        let webgpu_limits = matches!(
            std::env::var("KVPACK_WEBGPU_LIMITS").as_deref(),
            Ok("1") | Ok("true") | Ok("yes")
        );
        GpuOptions {
            backend,
            power,
            webgpu_limits,
        }
    }
}

/// One binding of a kernel, in binding-number order (all in group 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// `var<storage, read>`.
    Storage {
        /// Read-only?
        read_only: bool,
    },
    /// `var<uniform>`.
    Uniform,
}

impl Binding {
    /// A read-only storage buffer.
    pub const READ: Binding = Binding::Storage { read_only: true };
    /// A read-write storage buffer.
    pub const RW: Binding = Binding::Storage { read_only: false };
}

/// A compute pipeline with its bind group layout.
pub struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    name: String,
}

impl Kernel {
    /// `shader:entry`, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    shader: String,
    entry: String,
    constants: Vec<(String, u64)>,
    bindings: Vec<Binding>,
}

/// Facts about the opened adapter, for `kvpack info` and reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterReport {
    /// Adapter name.
    pub name: String,
    /// Backend name (`vulkan`, `gl`, …).
    pub backend: String,
    /// Device type (`Cpu`, `IntegratedGpu`, …).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether timestamp queries are available and enabled.
    pub timestamps: bool,
    /// Whether WebGPU's default limits were forced.
    pub webgpu_limits: bool,
    /// `max_storage_buffer_binding_size` of the device, bytes.
    pub max_binding_bytes: u64,
    /// `max_buffer_size` of the device, bytes.
    pub max_buffer_bytes: u64,
    /// `max_compute_invocations_per_workgroup` of the device.
    pub max_invocations: u32,
    /// `max_compute_workgroup_storage_size` of the device, bytes.
    pub max_workgroup_bytes: u32,
    /// `max_storage_buffers_per_shader_stage` of the device.
    pub max_storage_buffers: u32,
}

/// An opened GPU: device, queue and the pipeline cache.
pub struct Gpu {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// The wgpu queue.
    pub queue: wgpu::Queue,
    /// The adapter (kept for its info and limits).
    pub adapter: wgpu::Adapter,
    report: AdapterReport,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Kernel>>>,
    modules: Mutex<HashMap<String, wgpu::ShaderModule>>,
}

/// Describe an adapter in a line.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{} ({:?}, {:?}, driver {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    )
}

/// All adapters wgpu finds for a backend choice (`Auto` lists OpenGL too).
pub async fn list_adapters(backend: BackendChoice) -> Vec<wgpu::AdapterInfo> {
    let backends = match backend {
        BackendChoice::Auto => backend.backends() | wgpu::Backends::GL,
        other => other.backends(),
    };
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
        .enumerate_adapters(backends)
        .await
        .into_iter()
        .map(|a| a.get_info())
        .collect()
}

fn make_instance(backend: BackendChoice) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backend.backends();
    wgpu::Instance::new(desc)
}

/// The limits kvpack asks for: WebGPU's defaults, with buffer sizes raised to what the adapter
/// offers (unless WebGPU limits are forced, so a model larger than 128 MiB per binding is split).
pub fn required_limits(adapter: &wgpu::Limits, webgpu: bool) -> wgpu::Limits {
    let mut l = wgpu::Limits::default();
    if !webgpu {
        l.max_storage_buffer_binding_size = adapter.max_storage_buffer_binding_size;
        l.max_buffer_size = adapter.max_buffer_size;
        l.max_storage_buffers_per_shader_stage = adapter
            .max_storage_buffers_per_shader_stage
            .min(l.max_storage_buffers_per_shader_stage.max(8));
    }
    // Never ask for more than the adapter has (GL and mobile adapters are below WebGPU's defaults
    // on some limits that kvpack does not use).
    l.using_minimum_supported_limits_of(adapter)
}

trait LimitsExt {
    fn using_minimum_supported_limits_of(self, adapter: &wgpu::Limits) -> wgpu::Limits;
}

impl LimitsExt for wgpu::Limits {
    fn using_minimum_supported_limits_of(self, a: &wgpu::Limits) -> wgpu::Limits {
        let mut out = self;
        macro_rules! cap {
            ($($f:ident),*) => { $( out.$f = out.$f.min(a.$f); )* };
        }
        cap!(
            max_texture_dimension_1d,
            max_texture_dimension_2d,
            max_texture_dimension_3d,
            max_texture_array_layers,
            max_bind_groups,
            max_bindings_per_bind_group,
            max_dynamic_uniform_buffers_per_pipeline_layout,
            max_dynamic_storage_buffers_per_pipeline_layout,
            max_sampled_textures_per_shader_stage,
            max_samplers_per_shader_stage,
            max_storage_buffers_per_shader_stage,
            max_storage_textures_per_shader_stage,
            max_uniform_buffers_per_shader_stage,
            max_uniform_buffer_binding_size,
            max_storage_buffer_binding_size,
            max_vertex_buffers,
            max_buffer_size,
            max_vertex_attributes,
            max_vertex_buffer_array_stride,
            max_inter_stage_shader_variables,
            max_color_attachments,
            max_color_attachment_bytes_per_sample,
            max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x,
            max_compute_workgroup_size_y,
            max_compute_workgroup_size_z,
            max_compute_workgroups_per_dimension,
            max_immediate_size
        );
        out.min_uniform_buffer_offset_alignment = out
            .min_uniform_buffer_offset_alignment
            .max(a.min_uniform_buffer_offset_alignment);
        out.min_storage_buffer_offset_alignment = out
            .min_storage_buffer_offset_alignment
            .max(a.min_storage_buffer_offset_alignment);
        out
    }
}

impl Gpu {
    /// Open an adapter and device as the options say.
    pub async fn new(opts: &GpuOptions) -> Result<Gpu, GpuError> {
        match Self::open(opts).await {
            Err(GpuError::NoAdapter { .. })
                if opts.backend == BackendChoice::Auto && wgpu::Backends::from_env().is_none() =>
            {
                log::info!("no Vulkan/Metal/DX12 adapter; trying OpenGL");
                let gl = GpuOptions {
                    backend: BackendChoice::Gl,
                    ..opts.clone()
                };
                Self::open(&gl).await
            }
            other => other,
        }
    }

    async fn open(opts: &GpuOptions) -> Result<Gpu, GpuError> {
        let instance = make_instance(opts.backend);
        let power_preference = match opts.power {
            Power::Default => wgpu::PowerPreference::from_env().unwrap_or_default(),
            Power::Low => wgpu::PowerPreference::LowPower,
            Power::High => wgpu::PowerPreference::HighPerformance,
        };
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| GpuError::NoAdapter {
                backend: format!("{:?}", opts.backend).to_lowercase(),
                hint: format!(
                    " ({e}). On a machine without a GPU install a software driver: \
                     `apt-get install mesa-vulkan-drivers libvulkan1` (Vulkan via lavapipe) \
                     or use `--backend gl` (llvmpipe)."
                ),
            })?;
        let info = adapter.get_info();
        let adapter_limits = adapter.limits();
        let limits = required_limits(&adapter_limits, opts.webgpu_limits);
        let mut features = wgpu::Features::empty();
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        if timestamps {
            features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("kvpack"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|source| GpuError::RequestDevice {
                adapter: describe_adapter(&info),
                source,
            })?;
        let report = AdapterReport {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend).to_lowercase(),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            timestamps,
            webgpu_limits: opts.webgpu_limits,
            max_binding_bytes: limits.max_storage_buffer_binding_size as u64,
            max_buffer_bytes: limits.max_buffer_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroup_bytes: limits.max_compute_workgroup_storage_size,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
        };
        log::info!("kvpack GPU: {}", describe_adapter(&info));
        Ok(Gpu {
            device,
            queue,
            adapter,
            report,
            pipelines: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Open the GPU and block until it is ready (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(opts: &GpuOptions) -> Result<Gpu, GpuError> {
        pollster_block_on(Gpu::new(opts))
    }

    /// Facts about the adapter and device.
    pub fn report(&self) -> &AdapterReport {
        &self.report
    }

    /// Backend name (`vulkan`, `gl`, `metal`, `dx12`, `browserwebgpu`).
    pub fn backend_name(&self) -> &str {
        &self.report.backend
    }

    /// The device's limits.
    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// Whether timestamp queries are enabled on this device.
    pub fn has_timestamps(&self) -> bool {
        self.report.timestamps
    }

    fn module(&self, shader: &str) -> Result<wgpu::ShaderModule, GpuError> {
        let mut modules = self.modules.lock().expect("shader module cache poisoned");
        if let Some(m) = modules.get(shader) {
            return Ok(m.clone());
        }
        let source = shader_source(shader)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(shader),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        if let Some(err) = block_on_scope(scope.pop()) {
            return Err(GpuError::Pipeline {
                shader: shader.to_string(),
                entry: String::new(),
                message: err.to_string(),
            });
        }
        modules.insert(shader.to_string(), module.clone());
        Ok(module)
    }

    /// The pipeline for `shader`'s `entry` with these override constants and bindings; built once
    /// and cached.
    pub fn pipeline(
        &self,
        shader: &str,
        entry: &str,
        constants: &[(&str, f64)],
        bindings: &[Binding],
    ) -> Result<Arc<Kernel>, GpuError> {
        let key = PipelineKey {
            shader: shader.to_string(),
            entry: entry.to_string(),
            constants: constants
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_bits()))
                .collect(),
            bindings: bindings.to_vec(),
        };
        if let Some(k) = self.pipelines.lock().expect("poisoned").get(&key) {
            return Ok(k.clone());
        }
        let module = self.module(shader)?;
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b {
                        Binding::Storage { read_only } => wgpu::BufferBindingType::Storage {
                            read_only: *read_only,
                        },
                        Binding::Uniform => wgpu::BufferBindingType::Uniform,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(shader),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(shader),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(shader),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(err) = block_on_scope(scope.pop()) {
            return Err(GpuError::Pipeline {
                shader: shader.to_string(),
                entry: entry.to_string(),
                message: err.to_string(),
            });
        }
        let kernel = Arc::new(Kernel {
            pipeline,
            layout,
            name: format!("{shader}:{entry}"),
        });
        self.pipelines
            .lock()
            .expect("poisoned")
            .insert(key, kernel.clone());
        Ok(kernel)
    }

    /// A small uniform buffer holding `value`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::bytes_of(value),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// Start recording a batch of dispatches (submitted together).
    pub fn batch(&self, label: &str) -> Batch<'_> {
        Batch {
            gpu: self,
            encoder: self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) }),
            pending: Vec::new(),
            timer: None,
        }
    }

    /// Wait for all submitted work (native); a no-op in the browser, where readback awaits.
    pub fn wait_idle(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        }
    }
}

/// A bound range of a buffer: `size` bytes from `offset` (`None`: to the end).
#[derive(Clone, Copy)]
pub struct BufferRange<'a> {
    /// The buffer.
    pub buffer: &'a wgpu::Buffer,
    /// First byte (uniform bindings: a multiple of `min_uniform_buffer_offset_alignment`).
    pub offset: u64,
    /// Bytes, or the rest of the buffer.
    pub size: Option<u64>,
}

impl<'a> BufferRange<'a> {
    /// The whole buffer.
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        BufferRange {
            buffer,
            offset: 0,
            size: None,
        }
    }
}

/// Dispatches recorded into one command buffer and one compute pass.
pub struct Batch<'a> {
    gpu: &'a Gpu,
    encoder: wgpu::CommandEncoder,
    pending: Vec<(Arc<Kernel>, wgpu::BindGroup, [u32; 3])>,
    timer: Option<GpuTimer>,
}

impl Batch<'_> {
    /// Record one dispatch; `buffers` are bound at bindings 0, 1, … of group 0.
    pub fn dispatch(
        &mut self,
        kernel: &Arc<Kernel>,
        buffers: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) {
        let ranges: Vec<BufferRange> = buffers.iter().map(|b| BufferRange::whole(b)).collect();
        self.dispatch_ranges(kernel, &ranges, workgroups);
    }

    /// [`Batch::dispatch`] with buffer ranges: for uniform bindings of part of a buffer.
    pub fn dispatch_ranges(
        &mut self,
        kernel: &Arc<Kernel>,
        buffers: &[BufferRange<'_>],
        workgroups: [u32; 3],
    ) {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: r.buffer,
                    offset: r.offset,
                    size: r.size.and_then(wgpu::BufferSize::new),
                }),
            })
            .collect();
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&kernel.name),
                layout: &kernel.layout,
                entries: &entries,
            });
        self.pending.push((kernel.clone(), bind_group, workgroups));
    }

    /// Record a buffer-to-buffer copy (flushes the dispatches recorded so far first).
    pub fn copy(
        &mut self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        bytes: u64,
    ) {
        self.flush_pass();
        self.encoder
            .copy_buffer_to_buffer(src, src_offset, dst, dst_offset, Some(bytes));
    }

    /// Write a timestamp (only when the device has timestamp queries).
    pub fn timestamp(&mut self, set: &wgpu::QuerySet, index: u32) {
        self.flush_pass();
        self.encoder.write_timestamp(set, index);
    }

    /// Time the batch's compute pass with GPU timestamps (read with [`GpuTimer::elapsed_ms`]
    /// after [`Batch::submit`]). The batch should hold one pass: dispatches only, no copies.
    pub fn timed(mut self, timer: &GpuTimer) -> Self {
        self.timer = Some(timer.clone());
        self
    }

    fn flush_pass(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let timestamp_writes = self
            .timer
            .as_ref()
            .map(|t| wgpu::ComputePassTimestampWrites {
                query_set: &t.set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            });
        let mut pass = self
            .encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes,
            });
        for (kernel, bind_group, [x, y, z]) in self.pending.drain(..) {
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
    }

    /// The encoder, for callers that record something this type does not cover.
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.flush_pass();
        &mut self.encoder
    }

    /// Submit everything recorded.
    pub fn submit(mut self) -> wgpu::SubmissionIndex {
        self.flush_pass();
        if let Some(t) = &self.timer {
            t.resolve(&mut self.encoder);
        }
        self.gpu.queue.submit([self.encoder.finish()])
    }
}

/// Grid for `n` workgroups, folded into two dimensions when `n` exceeds the per-dimension limit.
/// Kernels recover the flat index as `wg.x + wg.y * num_workgroups.x`.
pub fn grid(n: u32) -> [u32; 3] {
    const MAX: u32 = 65535;
    if n <= MAX {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(MAX);
        [n.div_ceil(y), y, 1]
    }
}

fn block_on_scope<F: std::future::Future<Output = Option<wgpu::Error>>>(
    f: F,
) -> Option<wgpu::Error> {
    // Error scopes resolve immediately on native backends; in the browser the future is pending
    // until the next task, so errors surface there through the uncaptured-error handler instead.
    #[cfg(not(target_arch = "wasm32"))]
    {
        pollster_block_on(f)
    }
    #[cfg(target_arch = "wasm32")]
    {
        drop(f);
        None
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn pollster_block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}
