//! The Qwen3 forward on a GPU: the model's weights uploaded once in their stored formats, a
//! paged KV cache (f32, f16 or bf16) in device memory addressed by the engine's block tables, and an [`Exec`]
//! whose ops record WGSL dispatches ([`qwick_backend::gpu`]) submitted together up to the next
//! read-back, the logits at the end of a call. MoE blocks route their tokens on the device and
//! run the chosen experts' products in one dispatch per projection over the experts' weights
//! stacked; a block whose stack does not fit one binding reads its router's logits back and
//! runs each chosen expert apart.

use crate::batch::Batch;
use crate::exec::Exec;
use crate::linear::Linear;
use crate::names::Role;
use crate::qwen3::{FeedForward, Mlp, Moe, RmsNorm};
use crate::Qwen3;
use anyhow::{anyhow, bail, Context, Result};
use qwick_backend::attention::KvLayout;
use qwick_backend::gpu::{self, Attend, Buf, Gpu, Matmul, MoeMatmul, Recorder};
use qwick_backend::Format;
use std::collections::HashMap;
use std::sync::Arc;

/// Bytes of new activation buffers a call lets recorded dispatches hold before it submits them.
const HOLD_BYTES: u64 = 256 << 20;
/// The most bytes of spare activation buffers a model keeps for reuse ([`Spare`]).
const SPARE_BYTES: u64 = 256 << 20;

/// A model's weights and KV cache on a GPU.
pub struct GpuModel {
    model: Arc<Qwen3>,
    gpu: Gpu,
    /// Each `RmsNorm` of the model, uploaded, by the address of the model's own.
    norms: HashMap<usize, Buf>,
    /// Each `Linear`, by the address of the model's own: runs of its rows, each small enough
    /// for one binding, as (first row, rows, buffer).
    linears: HashMap<usize, Vec<(usize, usize, Buf)>>,
    /// Each `Linear`'s LoRA updates, by the address of the model's own: (adapter, A, B).
    lora: HashMap<usize, Vec<(u16, LowRankOnGpu)>>,
    /// Each MoE block's experts, stacked, by the address of the model's block (blocks whose
    /// stacks do not fit a binding keep their experts one by one in `linears`).
    stacks: HashMap<usize, Stacks>,
    /// Per layer, K and V, of `kv_format` elements.
    kv: Vec<(Buf, Buf)>,
    kv_format: Format,
    /// [`GpuModel::widest_row`] of the model.
    widest_row: usize,
    layout: KvLayout,
    num_blocks: usize,
    spare: Arc<Spare>,
    /// The buffers of a call's [`Input`]s.
    inputs: [Option<Buf>; 4],
}

fn key<T>(w: &T) -> usize {
    w as *const T as usize
}

impl GpuModel {
    /// Uploads `model` to GPU adapter `index` with an f32 cache of `num_blocks` blocks of
    /// `block_size` tokens. Refuses weight formats and shapes the GPU kernels do not run,
    /// naming them.
    pub fn new(model: Arc<Qwen3>, index: usize, num_blocks: usize, block_size: usize) -> Result<GpuModel> {
        GpuModel::on(Gpu::open(index).map_err(|e| anyhow!(e))?, model, (num_blocks, block_size, Format::F32))
    }

    /// [`GpuModel::new`] on an opened GPU, with a cache of `(blocks, block size, element
    /// format)`: f32, f16 or bf16 (as [`crate::KvCache`] stores them).
    pub fn on(gpu: Gpu, model: Arc<Qwen3>, cache: (usize, usize, Format)) -> Result<GpuModel> {
        let (num_blocks, block_size, kv_format) = cache;
        if !crate::KV_FORMATS.contains(&kv_format) {
            bail!("a KV cache cannot hold {kv_format} elements");
        }
        let c = &model.config;
        let (d, heads, kv_heads) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        if 4 * c.vocab_size as u64 > gpu.max_binding() {
            bail!("a row of {} logits is larger than {} allows in one buffer", c.vocab_size, gpu.summary.name);
        }
        if d > 256 || d % 2 == 1 || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("the GPU's attention runs even head sizes up to 256 with whole groups of query heads per KV head (head_dim {d}, {heads} heads, {kv_heads} KV heads)");
        }
        let mut norms = HashMap::new();
        let all_norms = model
            .layers
            .iter()
            .flat_map(|l| [&l.input_layernorm, &l.post_attention_layernorm, &l.attn.q_norm, &l.attn.k_norm]);
        for n in all_norms.chain([&model.norm]) {
            norms.insert(key(n), gpu.upload_f32(&n.weight).map_err(|e| anyhow!(e))?);
        }
        let (mut linears, mut lora, mut stacks) = (HashMap::new(), HashMap::new(), HashMap::new());
        // MoE experts stacked per block where they fit, so that one dispatch runs them all.
        let mut stacked = std::collections::HashSet::new();
        for l in &model.layers {
            let FeedForward::Moe(m) = &l.mlp else { continue };
            let (Some(gate), Some(up), Some(down)) =
                (stack(&gpu, m, |e| &e.gate_proj), stack(&gpu, m, |e| &e.up_proj), stack(&gpu, m, |e| &e.down_proj))
            else {
                continue;
            };
            let upload = |(bytes, f): (Vec<u8>, Format)| {
                gpu.upload(&bytes).map(|b| (b, f)).map_err(|e| anyhow!("a MoE block's experts: {e}"))
            };
            stacks.insert(key(m), Stacks { gate: upload(gate)?, up: upload(up)?, down: upload(down)? });
            stacked.extend(m.experts.iter().flat_map(|e| [key(&e.gate_proj), key(&e.up_proj), key(&e.down_proj)]));
        }
        for (i, w) in model.linears().into_iter().enumerate() {
            if stacked.contains(&key(w)) {
                continue;
            }
            let t = &w.weight;
            if !gpu::reads(t.format, w.in_features()) {
                bail!(
                    "weight {i} ({}×{}, {}) cannot run on the GPU: its kernels read {} (float rows of whole 4-byte words)",
                    w.out_features(),
                    w.in_features(),
                    t.format,
                    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K and IQ4_XS"
                );
            }
            // Rows in runs that fit one binding (a large head or embedding may not).
            let row_bytes = t.format.row_bytes(w.in_features());
            let per = (gpu.max_binding() as usize / row_bytes).max(1);
            let mut parts = Vec::new();
            for r0 in (0..w.out_features()).step_by(per) {
                let rows = per.min(w.out_features() - r0);
                let bytes = &t.bytes()[r0 * row_bytes..(r0 + rows) * row_bytes];
                parts.push((r0, rows, gpu.upload(bytes).map_err(|e| anyhow!("weight {i}: {e}"))?));
            }
            linears.insert(key(w), parts);
            let up = |v: &[f32]| gpu.upload_f32(v).map_err(|e| anyhow!("weight {i}'s LoRA update: {e}"));
            let updates =
                w.lora.iter().map(|(id, l)| Ok((*id, LowRankOnGpu { a: up(&l.a)?, b: up(&l.b)?, r: l.r, s: l.s })));
            lora.insert(key(w), updates.collect::<Result<Vec<_>>>()?);
        }
        let c = &model.config;
        let layout = KvLayout { block_size, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let per = kv_format.row_bytes(num_blocks * block_size * layout.kv_heads * layout.head_dim) as u64;
        let kv = (0..c.num_hidden_layers)
            .map(|_| Ok((gpu.zeros(per)?, gpu.zeros(per)?)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| anyhow!("the KV cache does not fit on {}: {e}", gpu.summary.name))?;
        let widest_row = GpuModel::widest_row(&model);
        let (spare, inputs) = (Arc::new(Spare::default()), Default::default());
        Ok(GpuModel {
            model,
            gpu,
            norms,
            linears,
            lora,
            stacks,
            kv,
            kv_format,
            widest_row,
            layout,
            num_blocks,
            spare,
            inputs,
        })
    }

    pub fn model(&self) -> &Arc<Qwen3> {
        &self.model
    }

    /// The most f32 values a token's row of any activation of `model` holds (the head's
    /// logits are computed as many rows at a time as fit).
    fn widest_row(model: &Qwen3) -> usize {
        let c = &model.config;
        let q = c.num_attention_heads * c.head_dim;
        let ffn = model.layers.iter().map(|l| match &l.mlp {
            FeedForward::Dense(m) => m.gate_proj.out_features(),
            FeedForward::Moe(m) => {
                let k = m.top_k;
                (k * m.experts[0].gate_proj.out_features()).max(k * c.hidden_size).max(m.experts.len())
            }
        });
        ffn.chain([c.hidden_size, q]).max().unwrap_or(0)
    }

    /// Bytes of the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.iter().map(|(k, v)| (k.bytes + v.bytes) as usize).sum()
    }

    /// Runs one step: writes the batch's K/V into the device cache and returns the logits of
    /// `batch.logits_rows`, row-major `[logits_rows.len(), vocab]`.
    pub fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let c = &model.config;
        batch.validate(c.vocab_size, self.num_blocks, self.layout.block_size).context("invalid batch")?;
        let rows = model.row_adapters(batch)?;
        let n = batch.tokens.len();
        let widest = 4 * n as u64 * self.widest_row as u64;
        if widest > self.gpu.max_binding() {
            bail!(
                "a step of {n} tokens needs activations of {widest} bytes, more than {} allows in one buffer ({} bytes): run fewer tokens a step (--max-num-batched-tokens)",
                self.gpu.summary.name,
                self.gpu.max_binding()
            );
        }
        let rope = model.rope(&batch.positions);
        let half = c.head_dim / 2;
        let mut cs = vec![0f32; 2 * n * half];
        for i in 0..n {
            let (cos, sin) = rope.at(i);
            cs[i * half..(i + 1) * half].copy_from_slice(cos);
            cs[(n + i) * half..(n + i + 1) * half].copy_from_slice(sin);
        }
        let tables: Vec<&[u32]> = batch.block_tables.iter().map(|t| t.as_slice()).collect();
        let words = |v: &[u32]| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        let meta = Attend::meta(&batch.positions, &batch.seq_of_token, &tables);
        let rope = self.input(Input::Rope, qwick_backend::format::f32_bytes(&cs))?;
        let slots = self.input(Input::Slots, &words(&batch.slot_mapping))?;
        let meta = self.input(Input::Meta, &words(&meta))?;
        let tiles = match Attend::tiles(&batch.seq_of_token) {
            Some(t) => Some((self.input(Input::Tiles, &words(&t))?, t.len() / 2)),
            None => None,
        };
        let mut pass = GpuPass {
            rope,
            slots,
            meta,
            tiles,
            seqs: tables.len(),
            max_pos: batch.positions.iter().max().map_or(0, |&p| p as usize),
            n,
            half,
            heads: c.num_attention_heads,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            rows,
            held: 0,
            rec: Recorder::new(&self.gpu),
            m: self,
        };
        let logits = model.run(&mut pass, batch);
        // A step without logits (a prefill chunk) still has its K/V to write.
        pass.flush();
        Ok(logits)
    }
}

/// The inputs of a call besides its tokens' rows, each in a buffer of its own that calls reuse
/// (so that their dispatches bind what the last call's bound).
#[derive(Clone, Copy)]
enum Input {
    Rope,
    Slots,
    Meta,
    Tiles,
}

impl GpuModel {
    /// `data` (whole 4-byte words) in the buffer of input `which`, grown when it is too small;
    /// written before the call records a dispatch (the queue writes it after the calls before
    /// have run).
    fn input(&mut self, which: Input, data: &[u8]) -> Result<Buf> {
        let have = &mut self.inputs[which as usize];
        if have.as_ref().is_none_or(|b| b.bytes < data.len() as u64) {
            let bytes = Spare::size_class(data.len() as u64, self.gpu.max_binding());
            *have = Some(self.gpu.zeros(bytes).map_err(|e| anyhow!(e))?);
        }
        let buf = have.clone().expect("an input buffer");
        self.gpu.write(&buf, 0, data);
        Ok(buf)
    }
}

/// A LoRA update on the device: `A` (`[r, in]`) and `B` (`[out, r]`) as f32 weights, and its
/// scale.
struct LowRankOnGpu {
    a: Buf,
    b: Buf,
    r: usize,
    s: f32,
}

/// A MoE block's experts on the device: each projection of every expert one after another.
struct Stacks {
    gate: (Buf, Format),
    up: (Buf, Format),
    down: (Buf, Format),
}

/// The projections `pick` of every expert of `moe`, one after another, with their format;
/// `None` when they differ in format or shape, or do not fit one binding.
fn stack(gpu: &Gpu, moe: &Moe, pick: impl Fn(&Mlp) -> &Linear) -> Option<(Vec<u8>, Format)> {
    let first = &pick(&moe.experts[0]).weight;
    let all: Vec<&Linear> = moe.experts.iter().map(&pick).collect();
    if all.iter().any(|l| l.weight.format != first.format || l.weight.shape != first.shape) {
        return None;
    }
    let bytes: usize = all.iter().map(|l| l.weight.bytes().len()).sum();
    if !gpu::reads(first.format, first.shape[1]) || bytes as u64 > gpu.max_binding() {
        return None;
    }
    Some((all.iter().flat_map(|l| l.weight.bytes()).copied().collect(), first.format))
}

/// Activations on the device: a buffer and how many values of it are in use. Dropped, the
/// buffer goes to the model's spares for a later op to reuse.
struct Dev {
    buf: Buf,
    len: usize,
    spare: Arc<Spare>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.spare.keep(self.buf.clone());
    }
}

/// Activation buffers no longer in use, by size class, up to [`SPARE_BYTES`] in all: creating a
/// buffer costs host time (and the device a clear) on every op of every step, where a step
/// after the first of its shape finds every buffer it needs here. A buffer is reused at once,
/// even while dispatches recorded before it was dropped still read it: the device runs the
/// recorded dispatches in order, each after the ones whose buffers it uses.
#[derive(Default)]
struct Spare(std::sync::Mutex<(HashMap<u64, Vec<Buf>>, u64)>);

impl Spare {
    /// Bytes of the buffer kept for `bytes`: rounded up to an eighth of the power of two at
    /// or above it, so steps of different token counts share buffers, within `max`.
    fn size_class(bytes: u64, max: u64) -> u64 {
        let step = (bytes.next_power_of_two() / 8).max(256);
        bytes.next_multiple_of(step).min(max).max(bytes)
    }

    fn take(&self, bytes: u64) -> Option<Buf> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (bufs, total) = &mut *g;
        let list = bufs.get_mut(&bytes)?;
        let b = list.pop()?;
        if list.is_empty() {
            bufs.remove(&bytes);
        }
        *total -= b.bytes;
        Some(b)
    }

    /// Keeps `b` for reuse, making room by dropping spares of larger sizes (a long prefill's)
    /// first, so that the sizes decode steps use stay; drops `b` where only buffers of its
    /// size or smaller would make room.
    fn keep(&self, b: Buf) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (bufs, total) = &mut *g;
        while *total + b.bytes > SPARE_BYTES {
            let Some(largest) = bufs.keys().copied().max().filter(|&l| l > b.bytes) else { return };
            let list = bufs.get_mut(&largest).expect("a size listed");
            list.pop();
            if list.is_empty() {
                bufs.remove(&largest);
            }
            *total -= largest;
        }
        *total += b.bytes;
        bufs.entry(b.bytes).or_default().push(b);
    }
}

/// One forward call on the GPU.
struct GpuPass<'a> {
    m: &'a GpuModel,
    rec: Recorder<'a>,
    /// The tokens' cos rows, then their sin rows.
    rope: Buf,
    slots: Buf,
    meta: Buf,
    /// Prefill tiles ([`Attend::tiles`]) and their count, when the step has them.
    tiles: Option<(Buf, usize)>,
    seqs: usize,
    /// The furthest position of the step's tokens.
    max_pos: usize,
    /// Bytes of activations allocated since the last submission.
    held: u64,
    /// Each token's LoRA adapter (empty: none).
    rows: Vec<u16>,
    n: usize,
    half: usize,
    heads: usize,
    scale: f32,
}

impl GpuPass<'_> {
    fn norm_weight(&self, n: &RmsNorm) -> &Buf {
        self.m.norms.get(&key(n)).expect("every norm of the model was uploaded")
    }

    /// Room for `len` values: a spare buffer (its contents left over), or a new one.
    fn alloc(&mut self, len: usize) -> Dev {
        match self.m.spare.take(self.bytes_for(len)) {
            Some(buf) => Dev { buf, len, spare: self.m.spare.clone() },
            None => self.fresh(len),
        }
    }

    /// Bytes of the buffer for `len` values: their size class ([`Spare::size_class`]).
    fn bytes_for(&self, len: usize) -> u64 {
        Spare::size_class(4 * len as u64, self.m.gpu.max_binding())
    }

    /// A new zeroed buffer for `len` values.
    fn fresh(&mut self, len: usize) -> Dev {
        let bytes = self.bytes_for(len);
        // What the recorded dispatches hold stays allocated until they run: past a budget of
        // new buffers, they run now, so a long prefill does not hold every layer's at once.
        if self.held + bytes > HOLD_BYTES {
            self.flush();
        }
        self.held += bytes;
        // Each activation fits one binding ([`GpuModel::forward`] checks the step's widest).
        let buf = self.m.gpu.zeros(bytes).expect("an activation within the adapter's limits");
        Dev { buf, len, spare: self.m.spare.clone() }
    }

    /// Runs what was recorded so far.
    fn flush(&mut self) {
        self.held = 0;
        std::mem::replace(&mut self.rec, Recorder::new(&self.m.gpu)).submit();
    }

    fn product(&mut self, x: &Dev, w: &Linear) -> Dev {
        let (k, n) = (w.in_features(), w.out_features());
        let m = x.len / k;
        let y = self.alloc(m * n);
        let parts = self.m.linears.get(&key(w)).expect("every weight of the model was uploaded");
        for (r0, rows, wb) in parts {
            let f = w.weight.format;
            let job = Matmul {
                x: &x.buf,
                x_off: 0,
                ldx: k,
                m,
                w: wb,
                w_off: 0,
                format: f,
                n: *rows,
                k,
                y: &y.buf,
                y_off: *r0,
                ldy: n,
            };
            self.rec.matmul(&job);
        }
        y
    }
}

impl GpuPass<'_> {
    /// Adds each token's adapter update of `w` for the inputs `x` to `y`, as PEFT does:
    /// `y += s · (x · Aᵀ) · Bᵀ` over the rows of that adapter (gathered, then scattered back).
    fn add_lora(&mut self, w: &Linear, x: &Dev, y: &mut Dev) {
        let Some(updates) = self.m.lora.get(&key(w)).filter(|u| !u.is_empty()) else { return };
        let (k, n) = (w.in_features(), w.out_features());
        for (id, l) in updates {
            let mine: Vec<usize> = (0..self.n).filter(|&i| self.rows.get(i) == Some(id)).collect();
            if mine.is_empty() {
                continue;
            }
            let m = mine.len();
            let xs = self.gather(x, k, &mine);
            let t = self.alloc(m * l.r);
            let a = Matmul {
                x: &xs.buf,
                x_off: 0,
                ldx: k,
                m,
                w: &l.a,
                w_off: 0,
                format: Format::F32,
                n: l.r,
                k,
                y: &t.buf,
                y_off: 0,
                ldy: l.r,
            };
            self.rec.matmul(&a);
            let u = self.alloc(m * n);
            let b = Matmul {
                x: &t.buf,
                x_off: 0,
                ldx: l.r,
                m,
                w: &l.b,
                w_off: 0,
                format: Format::F32,
                n,
                k: l.r,
                y: &u.buf,
                y_off: 0,
                ldy: n,
            };
            self.rec.matmul(&b);
            let scaled: Vec<(usize, f32)> = mine.iter().map(|&i| (i, l.s)).collect();
            self.scatter_add(y, &u, n, &scaled);
        }
    }
}

impl Exec for GpuPass<'_> {
    type T = Dev;

    fn tokens(&self) -> usize {
        self.n
    }

    fn rows_at_once(&self, width: usize) -> usize {
        self.m.gpu.max_binding() as usize / (4 * width)
    }

    fn put(&mut self, x: Vec<f32>) -> Dev {
        // The queue writes `x` ahead of the dispatches recorded since the last submission: a
        // spare is taken only when there are none (none could read its new contents early).
        let d = if self.rec.is_empty() { self.alloc(x.len()) } else { self.fresh(x.len()) };
        self.m.gpu.write(&d.buf, 0, qwick_backend::format::f32_bytes(&x));
        d
    }

    fn keep(&mut self, x: &Dev) -> Vec<f32> {
        self.flush();
        self.m.gpu.read_f32(&x.buf, x.len)
    }

    fn take(&mut self, x: Dev) -> Vec<f32> {
        self.keep(&x)
    }

    fn take_logits(&mut self, l: Dev, vocab: usize, top: &[u32]) -> Vec<f32> {
        let rows = l.len / vocab;
        // Rows that need every logit: no count, or more than the kernel keeps.
        let whole = |r: usize| top.get(r).is_none_or(|&k| k == 0 || k as usize > gpu::MAX_TOP);
        let k = (0..rows).filter(|&r| !whole(r)).map(|r| top[r] as usize).max().unwrap_or(0);
        // Pairs of half a row or more bring back no less than the row.
        if k == 0 || 2 * k >= vocab {
            return self.take(l);
        }
        // The top k of every row ((id, value) pairs), and the rows needed whole, read back at once.
        let pairs = self.rec.top(&l.buf, rows, vocab, k);
        self.flush();
        let full: Vec<usize> = (0..rows).filter(|&r| whole(r)).collect();
        let row_bytes = 4 * vocab as u64;
        let mut ranges = vec![(&pairs, 0, 8 * (rows * k) as u64)];
        ranges.extend(full.iter().map(|&r| (&l.buf, r as u64 * row_bytes, row_bytes)));
        let bytes = self.m.gpu.read_ranges(&ranges);
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let mut out = vec![f32::NEG_INFINITY; rows * vocab];
        for r in (0..rows).filter(|&r| !whole(r)) {
            for j in 0..k {
                let (id, v) = (word(2 * (r * k + j)), f32::from_bits(word(2 * (r * k + j) + 1)));
                if (id as usize) < vocab {
                    out[r * vocab + id as usize] = v;
                }
            }
        }
        let at = 2 * rows * k;
        for (i, &r) in full.iter().enumerate() {
            for (j, o) in out[r * vocab..(r + 1) * vocab].iter_mut().enumerate() {
                *o = f32::from_bits(word(at + i * vocab + j));
            }
        }
        out
    }

    fn zeros(&mut self, len: usize) -> Dev {
        // Zeros are asked for: a new buffer (a spare holds what was left in it).
        self.fresh(len)
    }

    fn norm(&mut self, n: &RmsNorm, x: &Dev) -> Dev {
        let d = n.weight.len();
        let out = self.alloc(x.len);
        let w = self.norm_weight(n).clone();
        self.rec.rms_norm(&x.buf, &w, &out.buf, x.len / d, d, n.eps);
        out
    }

    fn norm_rows(&mut self, n: &RmsNorm, x: &mut Dev) {
        let d = n.weight.len();
        let w = self.norm_weight(n).clone();
        self.rec.rms_norm_inplace(&x.buf, &w, x.len / d, d, n.eps);
    }

    fn rotate(&mut self, x: &mut Dev, width: usize) {
        self.rec.rope(&x.buf, &self.rope, self.n, width, self.half);
    }

    fn project(&mut self, _: usize, x: &Dev, ws: &[(Role, &Linear)]) -> Vec<Dev> {
        ws.iter()
            .map(|(_, w)| {
                let mut y = self.product(x, w);
                self.add_lora(w, x, &mut y);
                y
            })
            .collect()
    }

    fn products(&mut self, ps: &[(&Dev, &Linear)]) -> Vec<Dev> {
        ps.iter().map(|(x, w)| self.product(x, w)).collect()
    }

    fn attend(&mut self, l: usize, q: &Dev, k: &Dev, v: &Dev) -> (Dev, Vec<f32>) {
        let (kc, vc) = &self.m.kv[l];
        let layout = self.m.layout;
        let format = self.m.kv_format;
        self.rec.kv_write(&k.buf, &self.slots, kc, self.n, layout, format);
        self.rec.kv_write(&v.buf, &self.slots, vc, self.n, layout, format);
        let out = self.alloc(q.len);
        self.rec.attend(&Attend {
            q: &q.buf,
            k: kc,
            v: vc,
            meta: &self.meta,
            out: &out.buf,
            n: self.n,
            heads: self.heads,
            kv_heads: layout.kv_heads,
            d: layout.head_dim,
            block_size: layout.block_size,
            scale: self.scale,
            seqs: self.seqs,
            format,
            max_pos: self.max_pos,
            splits: Attend::splits(self.n, self.heads, self.max_pos),
            tiles: self.tiles.as_ref().map(|(b, n)| (b, *n)),
        });
        (out, Vec::new())
    }

    fn silu_mul(&mut self, g: &mut Dev, u: &Dev, _: usize) {
        self.rec.silu_mul(&g.buf, &u.buf, g.len);
    }

    fn add(&mut self, x: &mut Dev, y: &Dev, _: usize) {
        self.rec.add(&x.buf, &y.buf, x.len);
    }

    fn gather(&mut self, x: &Dev, width: usize, rows: &[usize]) -> Dev {
        let out = self.alloc(rows.len() * width);
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = self.m.gpu.upload_u32(&idx).expect("a row index buffer");
        self.rec.gather(&x.buf, &out.buf, width, &idx, rows.len());
        out
    }

    fn scatter_add(&mut self, out: &mut Dev, y: &Dev, width: usize, rows: &[(usize, f32)]) {
        let pairs: Vec<u32> = rows.iter().flat_map(|&(t, w)| [t as u32, w.to_bits()]).collect();
        let pairs = self.m.gpu.upload_u32(&pairs).expect("a row index buffer");
        self.rec.scatter_add(&out.buf, &y.buf, width, &pairs, rows.len());
    }

    fn moe(&mut self, moe: &Moe, x: &Dev) -> Option<Dev> {
        let st = self.m.stacks.get(&key(moe))?;
        let (n, k, ne) = (self.n, moe.top_k, moe.experts.len());
        let (h, inter) = (moe.router.in_features(), moe.experts[0].gate_proj.out_features());
        let logits = self.product(x, &moe.router);
        let route = self.alloc(2 * n * k);
        self.rec.route(&logits.buf, &route.buf, n, ne, k, moe.norm_topk_prob);
        let (g, u, y, out) =
            (self.alloc(n * k * inter), self.alloc(n * k * inter), self.alloc(n * k * h), self.alloc(n * h));
        let pairs = n * k;
        // Enough pairs for tiles (a prefill): sorted by expert, each expert's weights read once
        // per tile of its pairs rather than once a pair.
        let sorted = (pairs >= gpu::TILE_ROWS && ne <= gpu::SORT_EXPERTS).then(|| {
            let s = self.alloc(gpu::sorted_pairs_words(pairs, ne));
            self.rec.sort_pairs(&route.buf, &s.buf, pairs, ne);
            s
        });
        let sorted = sorted.as_ref().map(|s| &s.buf);
        for ((w, f), dst) in [(&st.gate, &g), (&st.up, &u)] {
            let job = MoeMatmul {
                x: &x.buf,
                w,
                route: &route.buf,
                y: &dst.buf,
                pairs,
                topk: k,
                per_token: true,
                format: *f,
                n: inter,
                k: h,
                experts: ne,
                sorted,
            };
            self.rec.moe_matmul(&job);
        }
        self.rec.silu_mul(&g.buf, &u.buf, pairs * inter);
        let (w, f) = &st.down;
        let job = MoeMatmul {
            x: &g.buf,
            w,
            route: &route.buf,
            y: &y.buf,
            pairs,
            topk: k,
            per_token: false,
            format: *f,
            n: h,
            k: inter,
            experts: ne,
            sorted,
        };
        self.rec.moe_matmul(&job);
        self.rec.combine(&y.buf, &route.buf, &out.buf, n, h, k);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{Spare, SPARE_BYTES};
    use qwick_backend::gpu::Gpu;

    #[test]
    fn spares_make_room_by_dropping_the_largest() {
        let Ok(g) = Gpu::open(0) else {
            eprintln!("SKIPPED spares_make_room_by_dropping_the_largest: no GPU adapter");
            return;
        };
        let (mib, spare) = (1u64 << 20, Spare::default());
        let buf = |bytes: u64| g.zeros(bytes).unwrap();
        assert_eq!(SPARE_BYTES, 256 * mib);
        for size in [128, 96, 32] {
            spare.keep(buf(size * mib));
        }
        // Full: a small buffer takes the room of the largest.
        spare.keep(buf(mib));
        assert!(spare.take(128 * mib).is_none());
        assert_eq!(spare.take(mib).map(|b| b.bytes), Some(mib));
        // Room without dropping any; then one that only smaller ones would make room for.
        spare.keep(buf(96 * mib));
        spare.keep(buf(128 * mib));
        assert!(spare.take(128 * mib).is_none(), "kept past the limit");
        assert!(spare.take(96 * mib).is_some() && spare.take(96 * mib).is_some());
        assert!(spare.take(32 * mib).is_some());
        assert_eq!(spare.0.lock().unwrap().1, 0);
    }

    #[test]
    fn spare_sizes_come_in_classes_within_the_binding() {
        // Within an eighth of a power of two (256 bytes at least), never below what is asked.
        assert_eq!(Spare::size_class(4, 1 << 30), 256);
        assert_eq!(Spare::size_class(1000, 1 << 30), 1024);
        assert_eq!(Spare::size_class(4096 * 100, 1 << 30), 458_752);
        for b in [4u64, 260, 9_999, 1 << 20, (1 << 20) + 4, 123_456_788] {
            let c = Spare::size_class(b, 1 << 30);
            assert!(c >= b && c <= b + b / 4 + 256, "{b} → {c}");
        }
        // Near the binding's limit, the limit (or what is asked, if that is more).
        assert_eq!(Spare::size_class(1000, 1010), 1010);
        assert_eq!(Spare::size_class(1000, 900), 1000);
    }
}
