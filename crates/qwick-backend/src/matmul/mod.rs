//! `y = x · Wᵀ` for f32 activations `x` [m, k] and a stored weight `W` [n, k] (the layout of a
//! PyTorch `Linear` weight) in f32, bf16 or f16. Weights are read in their stored type and
//! widened to f32 in registers; accumulation is in f32.
//!
//! Two paths: a GEMV for few rows of `x` (decode), which streams each weight row once for all
//! rows of `x`, and a tiled GEMM for many (prefill), which converts a panel of `W` to f32 once
//! and reuses it from L1 across all rows. Work is split over threads by output columns.

use crate::ctx::Ctx;
use crate::format::Format;
use crate::isa::Isa;
use crate::isa::Level;
use crate::pool::SendPtr;
use crate::quant;
use int8::ActQ8;

pub use crate::weights::{Layout, WeightView};

/// The kernels products with `w` use (outside the exact mode), in words.
pub fn kernel_path(w: &WeightView) -> &'static str {
    match w.layout {
        Layout::Transposed => "bf16, transposed",
        Layout::Tiles if w.format == Format::BF16 => "bf16, tiles",
        _ if w.format.is_float() => "float",
        Layout::Tiles => "integer, repacked",
        Layout::Rows if quant::has_q8_kernel(w.format) => "integer, file layout",
        Layout::Rows => "slow: dequantized to f32",
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, in parallel over the pool.
pub fn matmul(ctx: Ctx, x: &[f32], m: usize, w: &WeightView, y: &mut [f32]) {
    matmul_batch(ctx, &[MatmulJob::new(x, m, *w, y)]);
}

/// How a job's activations are prepared for its weight's kernels.
enum Prepared {
    /// `x` as it is.
    None,
    /// `x` rounded to bf16, rows padded to an even length (for `Level::Avx512Bf16`).
    Bf16(Vec<u16>),
    /// `x` copied with a padded row stride (see `pad_stride`).
    Padded(Vec<f32>, usize),
    /// `x` with each 32 values reordered as their 16 even then 16 odd ones, in rows of the
    /// given stride, for the AVX-512 GEMV of bf16 weights (see [`split_even_odd`]).
    Split(Vec<f32>, usize),
    /// `x` rounded to bf16 (kept as f32), for the GEMV of bf16 weights in tiles.
    Rounded(Vec<f32>),
    /// `x` quantized to 8-bit blocks, for the integer kernels of quantized weights.
    Q8(ActQ8),
    /// `x` rounded to bf16 in rows padded to a multiple of 16, for AMX tiles.
    #[cfg(target_arch = "x86_64")]
    Amx(amx::ActBf16),
}

/// One product of a [`matmul_batch`]: `y[m, n] = x[m, k] · w[n, k]ᵀ`.
pub struct MatmulJob<'a> {
    x: &'a [f32],
    m: usize,
    w: WeightView<'a>,
    y: SendPtr<'a, f32>,
}

impl<'a> MatmulJob<'a> {
    pub fn new(x: &'a [f32], m: usize, w: WeightView<'a>, y: &'a mut [f32]) -> Self {
        assert!(x.len() >= m * w.cols && y.len() >= m * w.rows, "matmul operand sizes");
        MatmulJob { x, m, w, y: SendPtr::new(y) }
    }
}

/// What a product's activations are converted to (see [`Prepared`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    Bf16,
    Padded,
    Split,
    SplitRounded,
    Rounded,
    Q8,
    Amx,
}

pub use crate::ctx::Bf16Mode;

/// The generation of the bf16 kernels [`calibrate_bf16`] times: cached choices made for an
/// older generation are measured again.
pub const BF16_KERNELS: u32 = 5;

/// What [`calibrate_bf16`] measured of one [`Bf16Mode`], each under the conditions it serves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bf16Timing {
    pub mode: Bf16Mode,
    /// Weight bytes read per second (GB/s) by one-row products (single-sequence decode) over
    /// weights several times the last-level cache, each read once per pass.
    pub decode_gb_s: f64,
    /// The same with 8 activation rows (batched decode).
    pub batched_gb_s: f64,
    /// Multiply-adds per second (G) of 128-row products (prefill) on the 0.6B MLP shape.
    pub prefill_gmacs: f64,
}

/// The weight shape [`calibrate_bf16`] times: the 0.6B MLP's up projection.
const CALIBRATION_SHAPE: (usize, usize) = (3072, 1024);

/// Times every [`Bf16Mode`] this CPU supports, each on the layout loading gives its weights
/// (file rows for f32, tiles for the others): decode streams a set of weights several times
/// the last-level cache (at least 128 MiB, at most 512 MiB: layers of the 0.6B's shapes, batched
/// as the model batches them, and a head of many rows holding a quarter of the bytes) once per
/// pass with 1 and with 8 activation rows, prefill multiplies 128 rows on one weight; returns
/// every mode's figures (for [`choose_bf16`]).
pub fn calibrate_bf16(isa: Isa, pool: &crate::pool::ThreadPool) -> Vec<Bf16Timing> {
    let (n, k) = CALIBRATION_SHAPE;
    let one: Vec<u8> = (0..n * k)
        .flat_map(|i| crate::format::f32_to_bf16(((i * 7919 % 1000) as f32 - 500.0) / 1000.0).to_le_bytes())
        .collect();
    // The streamed set: copies of one weight. Every bf16 in it is a normal number, so the same
    // bytes serve as rows and as tiles (the products' time does not depend on the values).
    let set_bytes = (4 * last_level_cache_bytes()).clamp(128 << 20, 512 << 20);
    let copies = set_bytes.div_ceil(one.len());
    // Loading converts weights for the bf16 modes into an arena on huge pages; f32 reads the
    // file's pages where they are mapped (small pages).
    let mut arena = crate::alloc::HugeBuf::zeroed(copies * one.len());
    let mut mapped = crate::alloc::HugeBuf::small_pages(copies * one.len());
    for set in [&mut arena, &mut mapped] {
        for c in set.chunks_exact_mut(one.len()) {
            c.copy_from_slice(&one);
        }
    }
    let x: Vec<f32> = (0..128 * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let mut y = vec![0f32; 128 * n];
    let best_of = |runs: usize, f: &mut dyn FnMut()| {
        f();
        (0..runs)
            .map(|_| {
                let t0 = std::time::Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let mut times = Vec::new();
    for mode in Bf16Mode::ALL.into_iter().filter(|m| m.supported()) {
        let ctx = Ctx { isa, pool, exact: false, bf16: Some(mode) };
        let view = |c, rows, cols| match mode {
            Bf16Mode::F32 => WeightView::new(Format::BF16, c, rows, cols),
            _ => WeightView::tiles(Format::BF16, c, rows, cols),
        };
        // As the 0.6B decodes: layers (q, k and v in one batch, o, gate and up in one batch,
        // down), then a head of many rows (a quarter of the bytes, as the 0.6B's).
        let set: &[u8] = if mode == Bf16Mode::F32 { &mapped } else { &arena };
        let (body, head) = set.split_at(set.len() / 4 * 3);
        let shapes = [(2048, 1024), (1024, 1024), (1024, 1024), (1024, 2048), (n, k), (n, k), (k, n)];
        let layer_bytes: usize = shapes.iter().map(|(r, c)| 2 * r * c).sum();
        let layers: Vec<Vec<WeightView>> = body
            .chunks_exact(layer_bytes)
            .map(|mut c| {
                shapes
                    .iter()
                    .map(|&(r, cols)| {
                        let (w, rest) = c.split_at(2 * r * cols);
                        c = rest;
                        view(w, r, cols)
                    })
                    .collect()
            })
            .collect();
        let head = view(head, head.len() / (2 * k), k);
        let mut out: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![0f32; 8 * r]).collect();
        let mut logits = vec![0f32; 8 * head.rows];
        let mut stream = |m: usize| {
            let s = best_of(2, &mut || {
                for l in &layers {
                    let [q, kk, v, o, gate, up, down] = &mut out[..] else { unreachable!("seven shapes") };
                    matmul_batch(
                        ctx,
                        &[
                            MatmulJob::new(&x, m, l[0], q),
                            MatmulJob::new(&x, m, l[1], kk),
                            MatmulJob::new(&x, m, l[2], v),
                        ],
                    );
                    matmul(ctx, q, m, &l[3], o);
                    matmul_batch(ctx, &[MatmulJob::new(o, m, l[4], gate), MatmulJob::new(o, m, l[5], up)]);
                    matmul(ctx, gate, m, &l[6], down);
                }
                matmul(ctx, &x, m, &head, &mut logits);
            });
            (layers.len() * layer_bytes + head.bytes()) as f64 / s / 1e9
        };
        let (decode_gb_s, batched_gb_s) = (stream(1), stream(8));
        let w = view(&set[..one.len()], n, k);
        let s = best_of(3, &mut || matmul(ctx, &x, 128, &w, &mut y));
        times.push(Bf16Timing { mode, decode_gb_s, batched_gb_s, prefill_gmacs: (128 * n * k) as f64 / s / 1e9 });
    }
    times
}

/// The mode to run: among the modes that read bf16 weights in tiles (all but f32, where the
/// CPU has AVX512-BF16), the one that would take least time over a reference workload per
/// parameter: a 512-token prompt, 256 tokens of one sequence and 256 steps of eight; f32 where
/// no such mode runs. Reading the file's rows in f32 decodes one sequence 15–40% slower than
/// the tile GEMVs in whole models (a Xeon: 80% against 95% of the read bound; a Zen 4: 58% of
/// it), more than a calibration short enough to run at start-up tells apart; the tile modes
/// share one layout, so their figures compare kernels alone.
pub fn choose_bf16(times: &[Bf16Timing]) -> Bf16Mode {
    let cost = |t: &Bf16Timing| 512.0 / t.prefill_gmacs + 512.0 / t.decode_gb_s + 512.0 / t.batched_gb_s;
    times
        .iter()
        .filter(|t| t.mode != Bf16Mode::F32 && cost(t).is_finite())
        .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        .map_or(Bf16Mode::F32, |t| t.mode)
}

/// The size of the largest cache the system reports for CPU 0 (32 MiB when it reports none).
fn last_level_cache_bytes() -> usize {
    (0..8)
        .filter_map(|i| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
        .filter_map(|s| {
            let s = s.trim();
            let (num, mul) = match s.strip_suffix('K') {
                Some(v) => (v, 1 << 10),
                None => s.strip_suffix('M').map_or((s, 1), |v| (v, 1 << 20)),
            };
            num.parse::<usize>().ok().map(|v| v * mul)
        })
        .max()
        .unwrap_or(32 << 20)
}

/// Whether products in `ctx` can read a weight of `format` transposed
/// ([`WeightView::transposed`]): bf16 weights on AMX tiles or in bf16 dot products (inputs a
/// multiple of 32), and float weights in the AVX-512 GEMM with f32 activations.
pub fn reads_transposed(ctx: Ctx, format: Format, cols: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && match ctx.bf16_mode() {
            Bf16Mode::Amx | Bf16Mode::Dot | Bf16Mode::Fma => format == Format::BF16 && cols.is_multiple_of(32),
            Bf16Mode::F32 => format.is_float() && ctx.isa.is_avx512(),
        }
}

/// A transposed weight in row layout, for products that cannot read it transposed.
fn untranspose(w: &WeightView) -> Vec<u8> {
    let es = w.format.row_bytes(1);
    let mut out = vec![0u8; w.data.len()];
    for (c, src) in w.data.chunks_exact(w.rows * es).enumerate() {
        for (r, e) in src.chunks_exact(es).enumerate() {
            out[(r * w.cols + c) * es..(r * w.cols + c + 1) * es].copy_from_slice(e);
        }
    }
    out
}

fn kind(ctx: Ctx, m: usize, w: &WeightView) -> Kind {
    if w.layout == Layout::Tiles && w.format == Format::BF16 {
        // In bf16 dot products (a GEMV of the tiles below `TILES_MIN_ROWS`), in FMAs, or on AMX
        // (an FMA GEMV below `TILES_MIN_ROWS`), activations rounded alike; in f32 read back to
        // f32 rows and multiplied exactly.
        return match (ctx.bf16_mode(), m >= TILES_MIN_ROWS) {
            (Bf16Mode::F32, _) => Kind::None,
            (Bf16Mode::Dot, _) => Kind::Bf16,
            (Bf16Mode::Fma, _) => Kind::Rounded,
            (Bf16Mode::Amx, false) => Kind::Rounded,
            (Bf16Mode::Amx, true) => Kind::Amx,
        };
    }
    if w.layout == Layout::Transposed {
        return match ctx.bf16_mode() {
            Bf16Mode::Amx => Kind::Amx,
            Bf16Mode::Dot | Bf16Mode::Fma => Kind::Bf16,
            Bf16Mode::F32 => Kind::None,
        };
    }
    let mode = if w.format == Format::BF16 { ctx.bf16_mode() } else { Bf16Mode::F32 };
    if mode != Bf16Mode::F32 && w.cols.is_multiple_of(32) {
        // Every product rounds activations to bf16, whatever the rows: a row's result does not
        // depend on the rows batched with it (beyond summation order). Few rows take the GEMV.
        match (mode, m >= BF16_MIN_ROWS) {
            (_, false) => Kind::SplitRounded,
            (Bf16Mode::Amx, true) => Kind::Amx,
            _ => Kind::Bf16,
        }
    } else if matches!(mode, Bf16Mode::Dot | Bf16Mode::Fma) {
        Kind::Bf16
    } else if w.format == Format::BF16 && ctx.isa.is_avx512() && m < GEMM_MIN_ROWS && w.cols.is_multiple_of(32) {
        Kind::Split
    } else if w.format.is_float() {
        if pad_stride(ctx.isa, m, w.cols).is_some() {
            Kind::Padded
        } else {
            Kind::None
        }
    } else if !ctx.exact && quant::has_q8_kernel(w.format) {
        if cfg!(target_arch = "x86_64")
            && ctx.isa.level() == Level::Amx
            && m >= AMX_MIN_ROWS
            && w.layout == Layout::Tiles
        {
            Kind::Amx
        } else {
            Kind::Q8
        }
    } else {
        Kind::None
    }
}

/// Converts `x` [m, k] to `kind`.
fn prepare(ctx: Ctx, kind: Kind, x: &[f32], m: usize, k: usize) -> Prepared {
    let x = &x[..m * k];
    match kind {
        Kind::None => Prepared::None,
        Kind::Bf16 => Prepared::Bf16(round_rows_to_bf16(ctx.isa, x, k)),
        Kind::Padded => {
            let ldx = pad_stride(ctx.isa, m, k).expect("padded stride");
            Prepared::Padded(pad_rows(x, k, ldx), ldx)
        }
        Kind::Split | Kind::SplitRounded => {
            let ldx = pad_stride(ctx.isa, m, k).unwrap_or(k);
            Prepared::Split(split_even_odd(x, k, ldx, kind == Kind::SplitRounded), ldx)
        }
        Kind::Rounded => Prepared::Rounded(rounded_to_bf16(ctx.isa, x)),
        Kind::Q8 => Prepared::Q8(ActQ8::quantize(ctx.isa, x, m, k)),
        #[cfg(target_arch = "x86_64")]
        Kind::Amx => Prepared::Amx(amx::ActBf16::new_on(ctx.pool, ctx.isa, x, m, k)),
        #[cfg(not(target_arch = "x86_64"))]
        Kind::Amx => unreachable!("AMX on a CPU without it"),
    }
}

/// Runs several independent products in one parallel region (q/k/v projections, gate and up,
/// the chosen experts of a MoE layer). Columns of all jobs are cut into slices (multiples of
/// 32, about sixteen per thread) that threads take from a shared counter, so a thread slowed by
/// the machine does not hold the others back.
pub fn matmul_batch(ctx: Ctx, jobs: &[MatmulJob]) {
    let threads = ctx.pool.threads();
    let total: usize = jobs.iter().map(|j| j.m * j.w.cols * j.w.rows).sum();
    if total == 0 {
        return;
    }
    // Transposed weights these products cannot read so: in row layout for the call.
    let owned: Vec<Option<Vec<u8>>> = jobs
        .iter()
        .map(|j| {
            (j.w.layout == Layout::Transposed && !reads_transposed(ctx, j.w.format, j.w.cols))
                .then(|| untranspose(&j.w))
        })
        .collect();
    let views: Vec<WeightView> = jobs
        .iter()
        .zip(&owned)
        .map(|(j, o)| o.as_ref().map_or(j.w, |d| WeightView::new(j.w.format, d, j.w.rows, j.w.cols)))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if let ([j], [w]) = (jobs, views.as_slice()) {
        if w.layout == Layout::Transposed && ctx.bf16_mode() == Bf16Mode::Amx && w.cols >= 16 * w.rows && threads > 1 {
            split_inner(ctx, j.x, j.m, w, j.y.ptr());
            return;
        }
    }
    // Convert each distinct activation matrix once (q/k/v and gate/up share theirs).
    let mut keys: Vec<(usize, usize, usize, Kind)> = Vec::new();
    let mut preps: Vec<Prepared> = Vec::new();
    let mut prep_of = Vec::with_capacity(jobs.len());
    for (j, w) in jobs.iter().zip(&views) {
        let key = (j.x.as_ptr() as usize, j.m, w.cols, kind(ctx, j.m, w));
        let i = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
            keys.push(key);
            preps.push(prepare(ctx, key.3, j.x, j.m, w.cols));
            preps.len() - 1
        });
        prep_of.push(i);
    }
    // SAFETY: each job's `y` holds m × rows floats (checked in MatmulJob::new) and lives for the
    // call; every unit covers distinct columns of one job, so no two threads write the same
    // element; the kernels read `x` and the weight within their checked sizes.
    let run_range = |i: usize, cols: std::ops::Range<usize>| unsafe {
        let j = &jobs[i];
        let job = Job { x: j.x, ldx: j.w.cols, m: j.m, w: &views[i], y: j.y.ptr(), ldy: j.w.rows, cols };
        matmul_cols_impl(ctx, &preps[prep_of[i]], &job)
    };
    if threads == 1 || total < 1 << 16 {
        for (i, j) in jobs.iter().enumerate() {
            run_range(i, 0..j.w.rows);
        }
        return;
    }
    let mut units: Vec<(usize, usize, usize)> = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        let share = j.m * j.w.cols * j.w.rows * 16 * threads / total;
        let unit = j.w.rows.div_ceil(share.max(1)).next_multiple_of(32);
        let mut n0 = 0;
        while n0 < j.w.rows {
            let n1 = (n0 + unit).min(j.w.rows);
            units.push((i, n0, n1));
            n0 = n1;
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    ctx.pool.run(&|_| loop {
        let u = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(&(j, n0, n1)) = units.get(u) else { break };
        run_range(j, n0..n1);
    });
}

/// `y = x · wᵀ` for a bf16 weight read transposed on AMX tiles whose inner dimension dwarfs its
/// outputs (the output head's backward: 151,936 inputs, 1,024 outputs): the inner dimension is
/// dealt in passes to [`SPLIT_PARTS`] partial sums, pass `i` to part `i mod SPLIT_PARTS`, and
/// the parts to the threads, so every thread reads whole stored rows in order; the parts are
/// added in order at the end (the result does not depend on the number of threads).
#[cfg(target_arch = "x86_64")]
fn split_inner(ctx: Ctx, x: &[f32], m: usize, w: &WeightView, y: *mut f32) {
    use amx::{matmul_cols_split, ActBf16, KS};
    let (n, k) = (w.rows, w.cols);
    let a = ActBf16::new_on(ctx.pool, ctx.isa, x, m, k);
    let (ksteps, rblocks) = (k / 32, m.div_ceil(16));
    let len = n.div_ceil(32) * rblocks * 512;
    let mut parts = crate::alloc::Aligned::<f32>::zeroed(SPLIT_PARTS * len);
    let pp = SendPtr::new(&mut parts);
    ctx.pool.for_chunks(SPLIT_PARTS, 1, &|mine| {
        for part in mine {
            // SAFETY: each part's scratch belongs to the one chunk holding that part.
            let c = unsafe { pp.slice(part * len, len) };
            for j0 in (part * KS..ksteps).step_by(SPLIT_PARTS * KS) {
                // SAFETY: AMX is usable (the weight is read transposed only then, see
                // `reads_transposed`); `w.cols == a.k`; `c` holds the scratch size asked for.
                unsafe { matmul_cols_split(&a, w, j0, (j0 + KS).min(ksteps), c) };
            }
        }
    });
    for i in 0..m {
        for col in 0..n {
            let at = ((col / 32) * rblocks + i / 16) * 512 + (i % 16) * 32 + col % 32;
            // SAFETY: `y` holds m × n floats (checked in MatmulJob::new).
            unsafe { *y.add(i * n + col) = (0..SPLIT_PARTS).map(|p| parts[p * len + at]).sum() };
        }
    }
}

/// Partial sums of [`split_inner`].
#[cfg(target_arch = "x86_64")]
const SPLIT_PARTS: usize = 4;

/// The row stride the exact AVX-512 GEMV wants for `m` rows of length `k`, when it differs from
/// `k`: with more than 4 rows, rows a multiple of 4 KiB apart would share L1 sets.
fn pad_stride(isa: Isa, m: usize, k: usize) -> Option<usize> {
    let avx512 = isa.is_avx512();
    (avx512 && m > 4 && m < GEMM_MIN_ROWS && k.is_multiple_of(256)).then_some(k + 16)
}

/// `x` [m, k] copied to rows of stride `ldx`.
fn pad_rows(x: &[f32], k: usize, ldx: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / k * ldx];
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(ldx)) {
        dst[..k].copy_from_slice(src);
    }
    out
}

/// `x` [m, k] (k a multiple of 32) in rows of stride `ldx`, each 32 values reordered as the 16
/// at even positions then the 16 at odd ones: a 64-byte load of 32 bf16 weights splits into its
/// even and odd halves with one shift and one mask (a bf16 is the top half of an f32), which
/// then meet these activations in plain FMAs. `round`: values rounded to bf16 (bf16 inference).
fn split_even_odd(x: &[f32], k: usize, ldx: usize, round: bool) -> Vec<f32> {
    let r = |v: f32| if round { crate::format::bf16_to_f32(crate::format::f32_to_bf16(v)) } else { v };
    let mut out = vec![0f32; x.len() / k * ldx];
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(ldx)) {
        for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
            for i in 0..16 {
                d[i] = r(s[2 * i]);
                d[16 + i] = r(s[2 * i + 1]);
            }
        }
    }
    out
}

/// `x` rounded to bf16 (nearest even, as [`crate::ops::to_bf16`]), kept as f32.
fn rounded_to_bf16(isa: Isa, x: &[f32]) -> Vec<f32> {
    let mut b = vec![0u16; x.len()];
    crate::ops::to_bf16(isa, x, &mut b);
    b.into_iter().map(crate::format::bf16_to_f32).collect()
}

/// `x` [m, k] rounded to bf16 (nearest even), each row padded with a zero to an even length.
pub fn round_rows_to_bf16(isa: Isa, x: &[f32], k: usize) -> Vec<u16> {
    let kp = k.next_multiple_of(2);
    let mut out = vec![0u16; x.len() / k.max(1) * kp];
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(kp)) {
        crate::ops::to_bf16(isa, src, &mut dst[..k]);
    }
    out
}

/// # Safety
/// `prep` was prepared from `x` for `w` and `ctx`; `w`'s data holds its rows in its format and
/// layout; `y` is valid for writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
unsafe fn matmul_cols_impl(ctx: Ctx, prep: &Prepared, j: &Job<'_, &[f32]>) {
    let (m, w) = (j.m, j.w);
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        if j.cols.is_empty() || m == 0 {
            return;
        }
        match prep {
            Prepared::Q8(a) => int8::matmul_q8(ctx.isa, &j.with(a, w.cols)),
            #[cfg(target_arch = "x86_64")]
            Prepared::Amx(a) => {
                let src = match (w.layout, quant::tiles::spec(w.format)) {
                    (Layout::Tiles, Some(spec)) => amx::Source::Tiles(spec),
                    (Layout::Tiles, None) => amx::Source::Bf16Tiles,
                    (Layout::Transposed, _) => amx::Source::Bf16Cols,
                    _ => amx::Source::Bf16Rows,
                };
                amx::matmul(src, &j.with(a, w.cols))
            }
            Prepared::Bf16(xb) => float_cols(ctx.isa, xb, j),
            Prepared::Padded(xp, ldx) => float_cols(ctx.isa, &[], &j.with(xp, *ldx)),
            #[cfg(target_arch = "x86_64")]
            Prepared::Split(xs, ldx) => float::avx512::gemv_bf16_split(&j.with(xs, *ldx)),
            #[cfg(target_arch = "x86_64")]
            Prepared::Rounded(xr) => float::avx512::gemv_bf16_tiles(&j.with(xr, w.cols)),
            #[cfg(not(target_arch = "x86_64"))]
            Prepared::Rounded(..) => unreachable!("bf16 tiles are read by AMX kernels"),
            #[cfg(not(target_arch = "x86_64"))]
            Prepared::Split(..) => unreachable!("even/odd activations without AVX-512"),
            Prepared::None if w.layout == Layout::Tiles => tiles_dequantized_cols(ctx.isa, j),
            Prepared::None if w.format.is_float() => float_cols(ctx.isa, &[], j),
            Prepared::None => dequantized_cols(ctx.isa, j),
        }
    }
}

/// Quantized weights times f32 activations: rows of `w` are dequantized to f32 a few at a time
/// and multiplied by the f32 kernels (the exact path, and the path of formats without integer
/// kernels).
///
/// # Safety
/// `isa` is supported; `x` holds `m` rows of `w.cols` values; `w`'s data holds its rows in its
/// format; `y` is valid for writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
unsafe fn dequantized_cols(isa: Isa, j: &Job<'_, &[f32]>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let rb = w.row_bytes();
        // 32 rows: one panel of the f32 GEMM; a few rows are enough for the GEMV.
        let chunk = if m >= GEMM_MIN_ROWS { 32 } else { 8 };
        let mut buf = vec![0f32; chunk * k];
        let prep = match pad_stride(isa, m, k) {
            Some(ldx) => Prepared::Padded(pad_rows(&x[..m * k], k, ldx), ldx),
            None => Prepared::None,
        };
        let mut n = cols.start;
        while n < cols.end {
            let nr = (cols.end - n).min(chunk);
            w.format.dequantize(&w.data[n * rb..(n + nr) * rb], &mut buf[..nr * k]);
            let wf = WeightView::from_f32(&buf[..nr * k], nr, k);
            match &prep {
                Prepared::Padded(xp, ldx) => {
                    float_cols(isa, &[], &Job { x: xp, ldx: *ldx, m, w: &wf, y: y.add(n), ldy, cols: 0..nr })
                }
                _ => float_cols(isa, &[], &Job { x, ldx: k, m, w: &wf, y: y.add(n), ldy, cols: 0..nr }),
            }
            n += nr;
        }
    }
}

/// [`dequantized_cols`] for a weight in tiles: rows are read back to f32, 16 at a time.
///
/// # Safety
/// `isa` is supported; `x` holds `m` rows of `w.cols` values; `w` is in tiles of its format; `y` is
/// valid for writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
unsafe fn tiles_dequantized_cols(isa: Isa, j: &Job<'_, &[f32]>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let mut buf = vec![0f32; quant::tiles::ROWS * k];
        let mut n = cols.start;
        while n < cols.end {
            let nr = (cols.end - n).min(quant::tiles::ROWS);
            for (r, row) in buf[..nr * k].chunks_exact_mut(k).enumerate() {
                quant::row_to_f32(w, n + r, row);
            }
            let wf = WeightView::from_f32(&buf[..nr * k], nr, k);
            float_cols(isa, &[], &Job { x, ldx: k, m, w: &wf, y: y.add(n), ldy, cols: 0..nr });
            n += nr;
        }
    }
}

/// Float weights (f32, bf16, f16): `x` with row stride `ldx`; `xb` the bf16-rounded rows when
/// the bf16 dot-product kernels run.
///
/// # Safety
/// `isa` is supported; `x` holds `m` rows of `w.cols` values at stride `ldx` (or `xb` the same rows
/// rounded to bf16, when not empty); `w` holds f32 or bf16 rows; `y` is valid for writes of `m`
/// rows of `ldy` floats at columns `cols` (within `w.rows`).
unsafe fn float_cols(isa: Isa, xb: &[u16], j: &Job<'_, &[f32]>) {
    let w = j.w;
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match isa.level() {
            // Activations rounded for the dot-product kernels (Bf16Mode::Dot, on any ISA).
            #[cfg(target_arch = "x86_64")]
            _ if w.format == Format::BF16 && !xb.is_empty() => float::avx512bf16::matmul(&j.with(xb, w.cols)),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Vnni | Level::Avx512Bf16 | Level::Amx => match w.format {
                Format::F32 => float::avx512::matmul::<0>(j),
                Format::BF16 => float::avx512::matmul::<1>(j),
                _ => float::avx512::matmul::<2>(j),
            },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => match w.format {
                Format::F32 => float::avx2::matmul::<0>(j),
                Format::BF16 => float::avx2::matmul::<1>(j),
                _ => float::avx2::matmul::<2>(j),
            },
            _ => scalar(j),
        }
    }
}

/// The reference: one f32 dot product per output, summed in order.
///
/// # Safety
/// `x` holds `m` rows of `w.cols` values; `w`'s data holds its rows in its format; `y` is valid for
/// writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
unsafe fn scalar(j: &Job<'_, &[f32]>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let rbytes = w.row_bytes();
        let mut row = vec![0f32; k];
        for n in cols {
            w.format.dequantize(&w.data[n * rbytes..(n + 1) * rbytes], &mut row);
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                let mut s = 0f32;
                for kk in 0..k {
                    s += xr[kk] * row[kk];
                }
                *y.add(i * ldy + n) = s;
            }
        }
    }
}

mod job;
pub(crate) use job::Job;
pub use job::{AMX_MIN_ROWS, BF16_MIN_ROWS, GEMM_MIN_ROWS, TILES_MIN_ROWS};

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
mod float;
pub mod int8;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::check::rand_vec;
    use crate::pool::ThreadPool;

    /// The plan: which kernel family a product takes, for each weight format and layout, ISA,
    /// bf16 mode and row count (levels this CPU lacks are left out, and said so).
    #[test]
    fn plan_picks_the_kernel_for_format_isa_mode_and_rows() {
        let pool = ThreadPool::new(1);
        let (n, k) = (64, 512);
        let q4 = vec![0u8; crate::quant::tiles::spec(Format::Q4_K).unwrap().bytes(n, k)];
        let q4_rows = vec![0u8; n * Format::Q4_K.row_bytes(k)];
        let bf16_tiles = vec![0u8; crate::quant::tiles::bf16::bytes(n, k)];
        let bf16 = vec![0u8; n * Format::BF16.row_bytes(k)];
        let f32s = vec![0u8; n * Format::F32.row_bytes(k)];
        let q4t = WeightView::tiles(Format::Q4_K, &q4, n, k);
        let q4r = WeightView::new(Format::Q4_K, &q4_rows, n, k);
        let bt = WeightView::tiles(Format::BF16, &bf16_tiles, n, k);
        let br = WeightView::new(Format::BF16, &bf16, n, k);
        let bcols = WeightView::transposed(Format::BF16, &bf16, n, k);
        let fr = WeightView::new(Format::F32, &f32s, n, k);
        use Kind as K;
        use Level as L;
        // (level, bf16 mode, exact, weight, rows, kernel)
        type Row<'a> = (Level, Option<Bf16Mode>, bool, &'a WeightView<'a>, usize, Kind);
        let table: &[Row] = &[
            (L::Scalar, None, false, &q4t, 1, K::Q8),
            (L::Scalar, None, true, &q4t, 1, K::None),
            (L::Avx2, None, false, &q4r, 7, K::Q8),
            (L::Avx512Vnni, None, false, &q4t, 512, K::Q8),
            (L::Amx, None, false, &q4t, 31, K::Q8),
            (L::Amx, None, false, &q4t, 32, K::Amx),
            (L::Amx, None, false, &q4r, 512, K::Q8),
            (L::Amx, None, true, &q4t, 512, K::None),
            (L::Scalar, None, false, &fr, 1, K::None),
            (L::Avx512, None, false, &fr, 5, K::Padded),
            (L::Avx512, None, false, &fr, GEMM_MIN_ROWS, K::None),
            (L::Avx2, None, false, &fr, 5, K::None),
            (L::Avx512, None, false, &br, GEMM_MIN_ROWS - 1, K::Split),
            (L::Avx512, None, false, &br, GEMM_MIN_ROWS, K::None),
            (L::Avx2, None, false, &br, 1, K::None),
            (L::Avx512Bf16, Some(Bf16Mode::F32), false, &bt, 1, K::None),
            (L::Avx512Bf16, Some(Bf16Mode::Dot), false, &bt, 1, K::Bf16),
            (L::Avx512Bf16, Some(Bf16Mode::Dot), false, &bt, 512, K::Bf16),
            (L::Avx512Bf16, Some(Bf16Mode::Fma), false, &bt, 512, K::Rounded),
            (L::Avx512Bf16, Some(Bf16Mode::Dot), true, &bt, 1, K::None),
            (L::Avx512Bf16, Some(Bf16Mode::Dot), false, &br, BF16_MIN_ROWS - 1, K::SplitRounded),
            (L::Avx512Bf16, Some(Bf16Mode::Dot), false, &br, BF16_MIN_ROWS, K::Bf16),
            (L::Avx512Bf16, Some(Bf16Mode::Dot), false, &bcols, 1, K::Bf16),
            (L::Amx, Some(Bf16Mode::Amx), false, &bt, TILES_MIN_ROWS - 1, K::Rounded),
            (L::Amx, Some(Bf16Mode::Amx), false, &bt, TILES_MIN_ROWS, K::Amx),
            (L::Amx, Some(Bf16Mode::Amx), false, &br, BF16_MIN_ROWS, K::Amx),
            (L::Amx, Some(Bf16Mode::Amx), false, &bcols, 1, K::Amx),
        ];
        let mut skipped = std::collections::BTreeSet::new();
        for &(level, bf16, exact, w, m, want) in table {
            let Some(isa) = Isa::new(level) else {
                skipped.insert(level.name());
                continue;
            };
            if bf16.is_some_and(|b| !b.supported()) {
                skipped.insert(level.name());
                continue;
            }
            let ctx = Ctx { exact, bf16, ..Ctx::new(isa, &pool) };
            let got = kind(ctx, m, w);
            assert_eq!(got, want, "{level} {bf16:?} exact {exact} {} {:?} m{m}", w.format, w.layout);
        }
        if !skipped.is_empty() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "plan test: rows for {skipped:?} not checked on this CPU");
        }
    }

    /// Every value within 1e-4 · √k of the reference, relative (NaN fails).
    fn assert_near(got: &[f32], want: &[f32], k: usize, what: &str) {
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()) * (k as f32).sqrt(), "{what} at {i}: {g} vs {e}");
        }
    }

    fn encode(v: &[f32], dt: Format) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * dt.row_bytes(1));
        for &x in v {
            match dt {
                Format::F32 => out.extend_from_slice(&x.to_le_bytes()),
                Format::BF16 => out.extend_from_slice(&crate::format::f32_to_bf16(x).to_le_bytes()),
                _ => out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
            }
        }
        out
    }

    /// Products with a weight read transposed equal the products with the weight in row layout:
    /// on AMX tiles and in bf16 dot products (bf16 read as it is; on AMX against the f32 product
    /// of rounded activations), in the AVX-512 GEMM with f32 activations (every float format read
    /// as it is) and in every other context (transposed for the call), over shapes
    /// with ragged tiles in both directions and inner dimensions of several passes.
    #[test]
    fn transposed_weights_equal_row_layout() {
        let pool = ThreadPool::new(2);
        let amx = Bf16Mode::Amx.supported().then(|| Ctx { bf16: Some(Bf16Mode::Amx), ..Ctx::new(Isa::best(), &pool) });
        for &(m, n, k) in
            &[(1, 16, 32), (5, 40, 96), (16, 33, 64), (37, 70, 2112), (64, 1024, 4160), (100, 17, 512), (40, 50, 1600)]
        {
            let x = rand_vec(m * k, 3 + m as u64);
            let wf = rand_vec(n * k, 5 + n as u64);
            let mut wt = vec![0f32; n * k];
            for r in 0..n {
                for c in 0..k {
                    wt[c * n + r] = wf[r * k + c];
                }
            }
            let close =
                |got: &[f32], want: &[f32], what: &str| assert_near(got, want, k, &format!("{what} m{m} n{n} k{k}"));
            for dt in [Format::BF16, Format::F32, Format::F16] {
                let (wb, wtb) = (encode(&wf, dt), encode(&wt, dt));
                let (rows, trans) = (WeightView::new(dt, &wb, n, k), WeightView::transposed(dt, &wtb, n, k));
                let dot = [Bf16Mode::Dot, Bf16Mode::Fma]
                    .into_iter()
                    .filter(|m| m.supported())
                    .map(|mode| Ctx { bf16: Some(mode), ..Ctx::new(Isa::best(), &pool) });
                let exact = Ctx { exact: true, ..Ctx::new(Isa::SCALAR, &pool) };
                // f32 activations on AVX-512 (read transposed by the GEMM's panels, exact or
                // not) and on AVX2 (transposed for the call).
                let f32_modes = [Level::Avx512, Level::Avx2].into_iter().filter_map(Isa::new).flat_map(|isa| {
                    [true, false].map(|exact| Ctx { exact, bf16: Some(Bf16Mode::F32), ..Ctx::new(isa, &pool) })
                });
                for ctx in [exact, Ctx::new(Isa::best(), &pool)].into_iter().chain(dot).chain(f32_modes) {
                    let (mut want, mut got) = (vec![0f32; m * n], vec![f32::NAN; m * n]);
                    matmul(ctx, &x, m, &rows, &mut want);
                    matmul(ctx, &x, m, &trans, &mut got);
                    close(&got, &want, &format!("{dt} {}", ctx.isa));
                }
                if let (Some(ctx), Format::BF16) = (amx, dt) {
                    let xr = rounded_to_bf16(Isa::SCALAR, &x);
                    let mut want = vec![0f32; m * n];
                    matmul(Ctx::new(Isa::SCALAR, &pool), &xr, m, &rows, &mut want);
                    for w in [trans, rows] {
                        let mut got = vec![f32::NAN; m * n];
                        matmul(ctx, &x, m, &w, &mut got);
                        close(&got, &want, &format!("amx {:?}", w.layout));
                    }
                }
            }
        }
    }

    /// Products with bf16 weights in tiles: on AMX and in bf16 dot products (the tile GEMV for
    /// few rows, AMX or `vdpbf16ps` for more) the f32 product of the rounded activations; in
    /// every other context the exact product. Shapes with ragged row blocks and column groups
    /// (fewer than 16 columns in the last group too), a group count made even by padding,
    /// several passes over the inputs (one partial) and several column chunks, split over
    /// threads.
    #[test]
    fn bf16_tiles_equal_row_layout() {
        let pool = ThreadPool::new(2);
        let shapes = [
            (1, 40, 64),
            (2, 64, 1024),
            (3, 70, 320),
            (4, 33, 96),
            (5, 300, 1024),
            (16, 33, 4160),
            (17, 64, 96),
            (40, 50, 1600),
            (100, 96, 288),
            (61, 40, 1056),
            (8, 70, 320),
            (9, 64, 1024),
            (17, 40, 320),
        ];
        for &(m, n, k) in &shapes {
            let x = rand_vec(m * k, 13 + m as u64);
            let wb = encode(&rand_vec(n * k, 17 + n as u64), Format::BF16);
            let rows = WeightView::new(Format::BF16, &wb, n, k);
            let mut tiled = vec![0u8; quant::packed_bytes(&rows, true).expect("bf16 tiles")];
            quant::repack_into(&rows, &mut tiled);
            let tiles = WeightView::tiles(Format::BF16, &tiled, n, k);
            let mut ctxs = vec![Ctx { exact: true, ..Ctx::new(Isa::SCALAR, &pool) }, Ctx::new(Isa::best(), &pool)];
            ctxs.extend(
                Bf16Mode::ALL
                    .into_iter()
                    .filter(|m| m.supported())
                    .map(|mode| Ctx { bf16: Some(mode), ..Ctx::new(Isa::best(), &pool) }),
            );
            for ctx in ctxs {
                let mut got = vec![f32::NAN; m * n];
                matmul(ctx, &x, m, &tiles, &mut got);
                let mut want = vec![0f32; m * n];
                if ctx.bf16_mode() != Bf16Mode::F32 {
                    let xr = rounded_to_bf16(Isa::SCALAR, &x);
                    matmul(Ctx::new(Isa::SCALAR, &pool), &xr, m, &rows, &mut want);
                } else {
                    // Read back to f32 and multiplied exactly.
                    matmul(Ctx::new(Isa::SCALAR, &pool), &x, m, &rows, &mut want);
                }
                assert_near(&got, &want, k, &format!("{} {:?} m{m} n{n} k{k}", ctx.isa, ctx.bf16_mode()));
            }
        }
    }

    /// The bf16 mode chosen from the calibration's figures: the tile mode that takes least time
    /// over the reference workload; f32 only where no tile mode runs; NaN figures never win.
    #[test]
    fn bf16_choice_weighs_prefill_and_decode() {
        let t = |mode, decode_gb_s, batched_gb_s, prefill_gmacs| Bf16Timing {
            mode,
            decode_gb_s,
            batched_gb_s,
            prefill_gmacs,
        };
        // A Zen 4 as reported: dot products twice the FMAs' rate.
        let zen4 = [
            t(Bf16Mode::F32, 20.0, 20.0, 60.0),
            t(Bf16Mode::Dot, 30.0, 28.0, 130.0),
            t(Bf16Mode::Fma, 30.0, 20.0, 70.0),
        ];
        assert_eq!(choose_bf16(&zen4), Bf16Mode::Dot);
        // This Xeon without AMX: dot products slow, FMAs win batched decode and prefill.
        let xeon = [
            t(Bf16Mode::F32, 28.0, 22.0, 120.0),
            t(Bf16Mode::Dot, 30.0, 9.0, 100.0),
            t(Bf16Mode::Fma, 30.0, 18.5, 125.0),
        ];
        assert_eq!(choose_bf16(&xeon), Bf16Mode::Fma);
        // AMX's prefill outweighs a slightly slower decode.
        let amx = [t(Bf16Mode::Fma, 14.0, 8.3, 45.0), t(Bf16Mode::Amx, 13.2, 8.2, 475.0)];
        assert_eq!(choose_bf16(&amx), Bf16Mode::Amx);
        // Without AVX512-BF16 only f32 is measured; NaN figures never win.
        assert_eq!(choose_bf16(&[t(Bf16Mode::F32, 20.0, 20.0, 60.0)]), Bf16Mode::F32);
        let nan = [t(Bf16Mode::Dot, f64::NAN, 9.0, 100.0), t(Bf16Mode::Fma, 20.0, 10.0, 60.0)];
        assert_eq!(choose_bf16(&nan), Bf16Mode::Fma);
    }

    #[test]
    fn every_isa_matches_scalar() {
        let pool = ThreadPool::new(2);
        let shapes = [
            (1, 1, 1),
            (1, 17, 33),
            (3, 40, 31),
            (5, 64, 16),
            (8, 33, 100),
            (13, 70, 300),
            (29, 129, 257),
            (64, 96, 64),
            (1, 70, 256),
            (2, 9, 96),
            (6, 50, 512),
            (11, 33, 2048),
            (47, 20, 1024),
            (16, 40, 96),
            (33, 17, 512),
        ];
        for dt in [Format::F32, Format::BF16, Format::F16] {
            for &(m, n, k) in &shapes {
                let x = rand_vec(m * k, 1 + m as u64);
                let wb = encode(&rand_vec(n * k, 7 + n as u64), dt);
                let w = WeightView::new(dt, &wb, n, k);
                let mut want = vec![0f32; m * n];
                matmul(Ctx::new(Isa::SCALAR, &pool), &x, m, &w, &mut want);
                // A batch of two products splits columns across threads the same way.
                let (mut y1, mut y2) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_batch(
                    Ctx::new(Isa::SCALAR, &pool),
                    &[MatmulJob::new(&x, m, w, &mut y1), MatmulJob::new(&x, m, w, &mut y2)],
                );
                assert_eq!(y1, want);
                assert_eq!(y2, want);
                // The bf16-dot path equals the reference on bf16-rounded activations.
                let xr = rounded_to_bf16(Isa::SCALAR, &x);
                let mut want_r = vec![0f32; m * n];
                matmul(Ctx::new(Isa::SCALAR, &pool), &xr, m, &w, &mut want_r);
                let amx = Isa::new(Level::Amx);
                for isa in Isa::all_supported().into_iter().chain(amx) {
                    let mut got = vec![f32::NAN; m * n];
                    matmul(Ctx::new(isa, &pool), &x, m, &w, &mut got);
                    // bf16 weights on AMX (k a multiple of 32) round activations too.
                    let tiles = isa.level() == Level::Amx && k % 32 == 0;
                    let rounded = dt == Format::BF16 && (isa.rounds_activations() || tiles);
                    let want = if rounded { &want_r } else { &want };
                    assert_near(&got, want, k, &format!("{isa} {dt} m{m} n{n} k{k}"));
                }
                // Every bf16 mode this CPU has, chosen in the context (as calibration does).
                for mode in Bf16Mode::ALL.into_iter().filter(|m| m.supported()) {
                    let ctx = Ctx { bf16: Some(mode), ..Ctx::new(Isa::best(), &pool) };
                    let mut got = vec![f32::NAN; m * n];
                    matmul(ctx, &x, m, &w, &mut got);
                    let rounded = dt == Format::BF16
                        && (matches!(mode, Bf16Mode::Dot | Bf16Mode::Fma) || (mode == Bf16Mode::Amx && k % 32 == 0));
                    let want = if rounded { &want_r } else { &want };
                    assert_near(&got, want, k, &format!("{mode:?} {dt} m{m} n{n} k{k}"));
                }
            }
        }
    }
}
