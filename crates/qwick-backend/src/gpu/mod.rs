//! The GPU backend, over wgpu (Vulkan on Linux and Windows, Metal on macOS, DX12 on Windows):
//! the same ops as the CPU kernels, as WGSL compute shaders.
//!
//! Weights live on the device in their stored block formats and are dequantized inside the
//! products ([`formats`]); activations stay in device buffers between ops; a [`Recorder`]
//! gathers the dispatches of a forward call and submits them at once; only what the caller
//! reads back ([`Gpu::read_f32`]) crosses to the host. Every kernel is tested against the CPU
//! reference (`gpu/tests.rs`), on lavapipe (Mesa's Vulkan device on the CPU) where there is no
//! GPU.

mod formats;
mod kernels;
mod recorder;
#[cfg(test)]
mod tests;

pub use formats::{reads, supports};
pub use kernels::{sorted_pairs_words, Attend, Matmul, MoeMatmul, MAX_TOP, SORT_EXPERTS, TILE_ROWS};
pub use recorder::Recorder;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// A GPU adapter as [`adapters`] lists it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    /// Vulkan, Metal or DX12.
    pub backend: String,
    /// Discrete, integrated, virtual or CPU (lavapipe).
    pub kind: String,
    pub driver: String,
    /// The largest buffer the adapter allows, in bytes (wgpu does not report memory sizes).
    pub max_buffer: u64,
    /// The optional shader features the kernels can use: `subgroups`, `shader-f16`.
    pub features: Vec<&'static str>,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let feats = if self.features.is_empty() { "none".to_string() } else { self.features.join(", ") };
        write!(
            f,
            "gpu:{}  {} ({}, {}; driver {}; largest buffer {:.1} GiB; features: {})",
            self.index,
            self.name,
            self.backend,
            self.kind,
            if self.driver.is_empty() { "?" } else { &self.driver },
            self.max_buffer as f64 / (1u64 << 30) as f64,
            feats
        )
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    // Vulkan, Metal, DX12: the GL backend lacks compute features the kernels need.
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc)
}

fn list() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY))
}

fn optional_features(f: wgpu::Features) -> Vec<&'static str> {
    let mut out = Vec::new();
    if f.contains(wgpu::Features::SUBGROUP) {
        out.push("subgroups");
    }
    if f.contains(wgpu::Features::SHADER_F16) {
        out.push("shader-f16");
    }
    out
}

/// The GPU adapters wgpu finds (Vulkan, Metal or DX12), in the order `gpu:N` counts them.
pub fn adapters() -> Vec<AdapterSummary> {
    list().iter().enumerate().map(|(index, a)| summarize(index, a)).collect()
}

/// What [`adapters`] says of adapter `index`.
fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let driver =
        [info.driver, info.driver_info].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(" ");
    AdapterSummary {
        index,
        name: info.name,
        backend: format!("{:?}", info.backend),
        kind: format!("{:?}", info.device_type),
        driver,
        max_buffer: a.limits().max_buffer_size,
        features: optional_features(a.features()),
    }
}

/// Whether `QWICK_GPU_F16` asks for f16 tiles ([`Gpu::set_f16`]): `1` yes, where the adapter
/// `name` has f16 arithmetic (else an error); `0` or unset no (f16 products move logits by
/// about 1e-3 of the largest, so they are not the default).
fn f16_asked(name: &str, has_f16: bool) -> Result<bool, String> {
    match std::env::var("QWICK_GPU_F16").as_deref() {
        Err(_) | Ok("") | Ok("0") => Ok(false),
        Ok("1") if has_f16 => Ok(true),
        Ok("1") => Err(format!("QWICK_GPU_F16=1: {name} has no f16 arithmetic (shader-f16)")),
        Ok(v) => Err(format!("QWICK_GPU_F16={v}: expected 0 or 1")),
    }
}

/// A buffer on the device.
#[derive(Clone, Debug)]
pub struct Buf {
    pub(crate) buf: wgpu::Buffer,
    /// Bytes the caller asked for (the buffer may be padded to 4).
    pub bytes: u64,
}

impl Buf {
    /// f32 elements the buffer holds.
    pub fn len_f32(&self) -> usize {
        (self.bytes / 4) as usize
    }
}

/// An opened GPU: its device and queue, and the kernels compiled for it so far.
pub struct Gpu {
    pub summary: AdapterSummary,
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Uniform buffer offsets are multiples of this.
    uniform_align: u64,
    /// With subgroup operations: the weight rows a workgroup of the products takes (64 over
    /// the smallest subgroup size); `None` without them (the portable kernels).
    subgroup_rows: Option<u32>,
    max_binding: u64,
    /// The kernels' parameters, rewritten by each submission ([`recorder::PARAM_BYTES`]).
    params: wgpu::Buffer,
    /// Bind groups kept from one submission to the next.
    groups: Mutex<recorder::BindGroups>,
    /// Whether the adapter has f16 arithmetic (`shader-f16`, then enabled on the device).
    has_f16: bool,
    /// Whether the tiled products (prefill) take their products in f16 ([`Gpu::set_f16`]).
    f16: bool,
}

impl Gpu {
    /// Opens adapter `index` of [`adapters`], with the adapter's own limits (large weights need
    /// buffers beyond WebGPU's defaults).
    pub fn open(index: usize) -> Result<Gpu, String> {
        let all = list();
        let n = all.len();
        let adapter = all.into_iter().nth(index).ok_or_else(|| {
            if n == 0 {
                "no GPU adapter found (wgpu sees no Vulkan, Metal or DX12 device; on Linux, install a Vulkan driver such as Mesa's mesa-vulkan-drivers)".to_string()
            } else {
                format!("gpu:{index} does not exist: {n} adapter(s) found (see `qwick devices`)")
            }
        })?;
        let summary = summarize(index, &adapter);
        let limits = adapter.limits();
        let subgroups = adapter.features().contains(wgpu::Features::SUBGROUP);
        let has_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        let f16 = f16_asked(&summary.name, has_f16)?;
        let mut features = wgpu::Features::empty();
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        if has_f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("qwick"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| format!("gpu:{index} ({}): cannot open the device: {e}", summary.name))?;
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: recorder::PARAM_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            params,
            groups: Mutex::default(),
            summary,
            device,
            queue,
            pipelines: Mutex::new(HashMap::new()),
            uniform_align: limits.min_uniform_buffer_offset_alignment as u64,
            subgroup_rows: subgroups.then(|| (64 / adapter.get_info().subgroup_min_size.max(1)).clamp(1, 64)),
            // The kernels address bytes in 32 bits, and buffers are padded to whole words.
            max_binding: limits.max_storage_buffer_binding_size.min((1 << 32) - 4) / 4 * 4,
            has_f16,
            f16,
        })
    }

    /// The largest buffer one kernel binding may hold, in bytes.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// Whether the kernels use subgroup operations (where the adapter has them).
    pub fn subgroups(&self) -> bool {
        self.subgroup_rows.is_some()
    }

    /// Runs the portable kernels even where the adapter has subgroup operations (the tests
    /// check both).
    pub fn without_subgroups(&mut self) {
        self.subgroup_rows = None;
    }

    /// Whether the tiled products take their products in f16 (see [`Gpu::set_f16`]).
    pub fn f16(&self) -> bool {
        self.f16
    }

    /// Takes the tiled products (prefills) in f16 where the adapter has f16 arithmetic, or
    /// in f32 (the default; `QWICK_GPU_F16=1` turns f16 on when a device opens). f16 halves
    /// the activations' workgroup memory and, on GPUs with packed f16 arithmetic, doubles
    /// the products' rate; values round to 11 significant bits, which moves logits by about
    /// 1e-3 of the largest. Returns whether f16 is in use.
    pub fn set_f16(&mut self, on: bool) -> bool {
        self.f16 = on && self.has_f16;
        self.f16
    }

    /// Holds buffers to at most `bytes` (a multiple of 4) per binding, below what the adapter
    /// allows: large weights are then split into more runs of rows, and logits computed fewer
    /// rows at a time.
    pub fn limit_bindings(&mut self, bytes: u64) {
        self.max_binding = self.max_binding.min(bytes / 4 * 4);
    }

    /// A zeroed buffer of `bytes` bytes.
    pub fn zeros(&self, bytes: u64) -> Result<Buf, String> {
        if bytes > self.max_binding {
            return Err(format!(
                "a {bytes}-byte buffer is larger than {} allows ({} bytes per binding)",
                self.summary.name, self.max_binding
            ));
        }
        // Running out of device memory is an error to report, not the device's panic.
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        match pollster::block_on(scope.pop()) {
            None => Ok(Buf { buf, bytes }),
            Some(e) => Err(format!("{} has no room for {bytes} more bytes: {e}", self.summary.name)),
        }
    }

    /// `data` copied to a new buffer (padded with zeros to a multiple of 4 bytes).
    pub fn upload(&self, data: &[u8]) -> Result<Buf, String> {
        let b = self.zeros(data.len() as u64)?;
        self.write(&b, 0, data);
        Ok(b)
    }

    pub fn upload_f32(&self, data: &[f32]) -> Result<Buf, String> {
        self.upload(crate::format::f32_bytes(data))
    }

    pub fn upload_u32(&self, data: &[u32]) -> Result<Buf, String> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(&bytes)
    }

    /// Writes `data` at byte `offset` of `b` (before the next submission's work).
    pub fn write(&self, b: &Buf, offset: u64, data: &[u8]) {
        assert!(offset + data.len() as u64 <= b.bytes, "a write past the end of a device buffer");
        let whole = data.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(&b.buf, offset, &data[..whole]);
        }
        if whole < data.len() {
            let mut tail = [0u8; 4];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.queue.write_buffer(&b.buf, offset + whole as u64, &tail);
        }
    }

    /// The first `n` f32 values of `b`, read back once the work submitted so far is done.
    pub fn read_f32(&self, b: &Buf, n: usize) -> Vec<f32> {
        let bytes = self.read(b, 4 * n as u64);
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// The first `n` bytes of `b` (`n` a multiple of 4).
    pub fn read(&self, b: &Buf, n: u64) -> Vec<u8> {
        self.read_ranges(&[(b, 0, n)])
    }

    /// The byte ranges `(buffer, offset, length)` (multiples of 4), one after another, read
    /// back together once the work submitted so far is done.
    pub fn read_ranges(&self, ranges: &[(&Buf, u64, u64)]) -> Vec<u8> {
        for &(b, off, n) in ranges {
            assert!(off + n <= b.bytes && (off | n).is_multiple_of(4), "a read past the end of a device buffer");
        }
        let total: u64 = ranges.iter().map(|r| r.2).sum();
        if total == 0 {
            return Vec::new();
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        let mut at = 0;
        for &(b, off, n) in ranges {
            if n > 0 {
                enc.copy_buffer_to_buffer(&b.buf, off, &staging, at, n);
            }
            at += n;
        }
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).expect("the GPU device was lost");
        rx.recv().expect("the map callback ran").expect("a device buffer could not be read back");
        let out = staging.slice(..).get_mapped_range().expect("a mapped buffer").to_vec();
        staging.unmap();
        out
    }

    /// The device's read bandwidth in bytes per second: the best of `reps` timed passes of a
    /// kernel that reads a buffer of `bytes` bytes once (what a decode step's weight reads are
    /// held against).
    pub fn read_bandwidth(&self, bytes: u64, reps: usize) -> Result<f64, String> {
        let bytes = bytes.min(self.max_binding) / 16 * 16;
        let (src, out) = (self.zeros(bytes)?, self.zeros(4)?);
        let pass = || -> Result<f64, String> {
            let t = std::time::Instant::now();
            let mut rec = Recorder::new(self);
            rec.read_all(&src, &out);
            rec.submit();
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| format!("the GPU device was lost: {e}"))?;
            Ok(t.elapsed().as_secs_f64())
        };
        // A first pass compiles the kernel and touches the buffer: not counted.
        pass()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            best = best.min(pass()?);
        }
        Ok(bytes as f64 / best)
    }

    /// The compute pipeline of the WGSL `source` (entry point `main`), compiled once per name.
    fn pipeline(&self, name: &str, source: impl FnOnce() -> String) -> Arc<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(name) {
            return p.clone();
        }
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source().into()),
        });
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        }));
        cache.insert(name.to_string(), p.clone());
        p
    }
}
