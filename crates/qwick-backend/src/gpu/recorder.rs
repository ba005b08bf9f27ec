//! Gathering the dispatches of one forward call into one submission.

use super::{Buf, Gpu};
use std::sync::Arc;

/// Bytes of parameters a kernel takes (16 words, `u32` or `f32` bits).
pub(crate) const PARAM_WORDS: usize = 16;
/// Bytes of the device's parameter buffer, which a submission's parameters use when they fit.
pub(crate) const PARAM_BYTES: u64 = 1 << 20;

/// What a dispatch binds: its pipeline, its parameters' offset in the device's parameter
/// buffer, its buffers.
type Binding = (wgpu::ComputePipeline, u64, Vec<wgpu::Buffer>);

/// The bind groups of the last two submissions through the device's parameter buffer, by
/// what they bind. A decode step binds what the step before it bound (activations come from
/// the model's spares, parameters at the same offsets), so it creates almost none; groups
/// unused for a submission are dropped with the buffers they hold.
#[derive(Default)]
pub(crate) struct BindGroups {
    now: std::collections::HashMap<Binding, wgpu::BindGroup>,
    last: std::collections::HashMap<Binding, wgpu::BindGroup>,
}

struct Op {
    pipeline: Arc<wgpu::ComputePipeline>,
    bufs: Vec<wgpu::Buffer>,
    param_off: u64,
    groups: (u32, u32),
}

/// The dispatches of one call, in order: each reads what the ones before it wrote. Nothing
/// runs until [`Recorder::submit`], which uploads every dispatch's parameters as one buffer and
/// submits one command buffer.
pub struct Recorder<'g> {
    pub(crate) gpu: &'g Gpu,
    params: Vec<u8>,
    ops: Vec<Op>,
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        Recorder { gpu, params: Vec::new(), ops: Vec::new() }
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Dispatches `pipeline` over `workgroups` workgroups (laid out in two dimensions when
    /// there are more than one dimension allows; kernels number them `x + y · count_x`), with
    /// `params` bound at 0 and `bufs` at 1, 2, ….
    pub(crate) fn dispatch(
        &mut self,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &[u32],
        bufs: &[&Buf],
        workgroups: u32,
    ) {
        assert!(params.len() <= PARAM_WORDS, "a kernel takes at most {PARAM_WORDS} parameters");
        if workgroups == 0 {
            return;
        }
        let align = self.gpu.uniform_align.max(4 * PARAM_WORDS as u64);
        let param_off = (self.params.len() as u64).next_multiple_of(align);
        self.params.resize(param_off as usize, 0);
        let mut words = [0u32; PARAM_WORDS];
        words[..params.len()].copy_from_slice(params);
        self.params.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        let x = workgroups.min(65535);
        self.ops.push(Op {
            pipeline,
            bufs: bufs.iter().map(|b| b.buf.clone()).collect(),
            param_off,
            groups: (x, workgroups.div_ceil(x)),
        });
    }

    /// Runs the recorded dispatches (returns once they are queued; reading a buffer back waits
    /// for them).
    pub fn submit(self) {
        if self.ops.is_empty() {
            return;
        }
        let dev = &self.gpu.device;
        // The device's parameter buffer, rewritten for each submission (the queue writes it
        // after the submissions before this one have run), or where the parameters do not fit
        // it, a buffer of their own and bind groups not kept.
        let shared = self.params.len() as u64 <= PARAM_BYTES;
        let params = if shared {
            self.gpu.params.clone()
        } else {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: self.params.len() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        // Held until the submission is queued: one submission at a time writes the parameters.
        let mut groups = self.gpu.groups.lock().unwrap_or_else(|e| e.into_inner());
        let groups = &mut *groups;
        self.gpu.queue.write_buffer(&params, 0, &self.params);
        let mut enc = dev.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for op in &self.ops {
                let make = || {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: op.param_off,
                            size: std::num::NonZeroU64::new(4 * PARAM_WORDS as u64),
                        }),
                    }];
                    for (i, b) in op.bufs.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry { binding: 1 + i as u32, resource: b.as_entire_binding() });
                    }
                    dev.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &op.pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    })
                };
                let group = if shared {
                    let key: Binding = ((*op.pipeline).clone(), op.param_off, op.bufs.clone());
                    let group = match groups.last.remove(&key) {
                        Some(g) => g,
                        None => make(),
                    };
                    groups.now.entry(key).or_insert(group).clone()
                } else {
                    make()
                };
                pass.set_pipeline(&op.pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(op.groups.0, op.groups.1, 1);
            }
        }
        groups.last = std::mem::take(&mut groups.now);
        self.gpu.queue.submit([enc.finish()]);
    }
}
