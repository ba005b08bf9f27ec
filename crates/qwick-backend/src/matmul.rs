//! `y = x · Wᵀ` for f32 activations `x` [m, k] and a stored weight `W` [n, k] (the layout of a
//! PyTorch `Linear` weight) in f32, bf16 or f16. Weights are read in their stored type and
//! widened to f32 in registers; accumulation is in f32.
//!
//! Two paths: a GEMV for few rows of `x` (decode), which streams each weight row once for all
//! rows of `x`, and a tiled GEMM for many (prefill), which converts a panel of `W` to f32 once
//! and reuses it from L1 across all rows. Work is split over threads by output columns.

use crate::format::Format;
use crate::pool::SendPtr;
use crate::quant::{self, ActQ8};
use crate::Level;
use crate::{Ctx, Isa};

/// How a weight's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, each a run of the format's blocks: the layout of checkpoint files.
    Rows,
    /// Groups of 16 rows interleaved for the integer kernels (see [`crate::quant::tiles`]), or
    /// bf16 in AMX's tiles ([`crate::quant::tiles::bf16`]).
    Tiles,
    /// A float weight stored transposed: `cols` rows of `rows` values (`y = x · stored`). AMX,
    /// the bf16 dot-product GEMM and the AVX-512 f32 GEMM read it as it is (see
    /// [`reads_transposed`]); other products transpose the weight for the call.
    Transposed,
}

/// A borrowed 2-D weight, `rows` output features by `cols` input features.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub format: Format,
    pub layout: Layout,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> WeightView<'a> {
    /// A weight in the file's layout: `rows` rows, each a run of `format` blocks.
    pub fn new(format: Format, data: &'a [u8], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * format.row_bytes(cols), "weight buffer size does not match its shape");
        WeightView { format, layout: Layout::Rows, data, rows, cols }
    }

    /// A weight converted to tiles by [`crate::quant::repack_into`].
    pub fn tiles(format: Format, data: &'a [u8], rows: usize, cols: usize) -> Self {
        let bytes = match format {
            Format::BF16 => crate::quant::tiles::bf16::bytes(rows, cols),
            _ => crate::quant::tiles::spec(format).expect("tiles of a format without a tile layout").bytes(rows, cols),
        };
        assert_eq!(data.len(), bytes, "tile buffer size does not match its shape");
        WeightView { format, layout: Layout::Tiles, data, rows, cols }
    }

    /// A float weight of `rows` outputs by `cols` inputs given as its transpose (`cols` rows of
    /// `rows` values, e.g. a `Linear` weight read backwards for `dx = dy · W`).
    pub fn transposed(format: Format, data: &'a [u8], rows: usize, cols: usize) -> Self {
        assert!(format.is_float(), "only float weights are read transposed");
        assert_eq!(data.len(), cols * format.row_bytes(rows), "weight buffer size does not match its shape");
        WeightView { format, layout: Layout::Transposed, data, rows, cols }
    }

    pub fn from_f32(data: &'a [f32], rows: usize, cols: usize) -> Self {
        // Any initialised f32 slice is also a valid byte slice of four times the length.
        let bytes = crate::format::f32_bytes(data);
        WeightView::new(Format::F32, bytes, rows, cols)
    }

    /// Bytes of one row in the file's layout.
    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

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

/// Rows of `x` at or above which the tiled GEMM path is used.
pub const GEMM_MIN_ROWS: usize = 48;

/// Rows of `x` at or above which products with quantized weights run on AMX tiles
/// (`Level::Amx`).
pub const AMX_MIN_ROWS: usize = 32;

/// Rows of `x` at or above which products with bf16 weights in tiles ([`Layout::Tiles`]) run on
/// AMX or in bf16 dot products; fewer take a GEMV of the tiles with FMAs (decode is bound by
/// reading the weights).
pub const TILES_MIN_ROWS: usize = 5;

/// Rows of `x` at or above which products with bf16 weights run on AMX tiles or bf16 dot
/// products ([`Bf16Mode`] other than f32); fewer rows take the GEMV, activations rounded to
/// bf16 alike.
pub const BF16_MIN_ROWS: usize = 16;

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
    Amx(quant::amx::ActBf16),
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
#[derive(Clone, Copy, PartialEq, Eq)]
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

/// How products with bf16 weights run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Mode {
    /// f32 activations (exact): the AVX-512 GEMV of even/odd halves, the f32 GEMM.
    F32,
    /// Activations rounded to bf16: `vdpbf16ps` dot products (AVX512-BF16), a GEMV of them
    /// for few rows (weights in tiles: below 5 rows; in rows: below 16, the even/odd GEMV).
    Dot,
    /// Activations rounded to bf16, weights in tiles multiplied in FMAs at every row count (the
    /// FMA GEMV of the tiles, 4 rows at a time against each column pair while it is in cache);
    /// for CPUs whose dot products run at less than twice their FMAs' rate (one dot product does
    /// the work of two FMAs).
    Fma,
    /// Activations rounded to bf16: AMX tiles from 16 rows, the GEMV below.
    Amx,
}

impl Bf16Mode {
    pub const ALL: [Bf16Mode; 4] = [Bf16Mode::F32, Bf16Mode::Dot, Bf16Mode::Fma, Bf16Mode::Amx];

    /// What an ISA implies: AMX on `Level::Amx`, dot products on `Level::Avx512Bf16`, else f32.
    pub fn for_isa(isa: Isa) -> Bf16Mode {
        match isa.level() {
            Level::Amx => Bf16Mode::Amx,
            Level::Avx512Bf16 => Bf16Mode::Dot,
            _ => Bf16Mode::F32,
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Bf16Mode::F32 => true,
            Bf16Mode::Dot | Bf16Mode::Fma => Level::Avx512Bf16.supported(),
            Bf16Mode::Amx => Level::Amx.supported(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Mode::F32 => "f32",
            Bf16Mode::Dot => "bf16-dot",
            Bf16Mode::Fma => "bf16-fma",
            Bf16Mode::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Bf16Mode> {
        Bf16Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

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
pub fn calibrate_bf16(isa: Isa, pool: &crate::ThreadPool) -> Vec<Bf16Timing> {
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
        Kind::Amx => Prepared::Amx(quant::amx::ActBf16::new_on(ctx.pool, x, m, k)),
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
        matmul_cols_impl(ctx, j.x, &preps[prep_of[i]], j.m, &views[i], j.y.ptr(), j.w.rows, cols)
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
    use quant::amx::{matmul_cols_split, ActBf16, KS};
    let (n, k) = (w.rows, w.cols);
    let a = ActBf16::new_on(ctx.pool, x, m, k);
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
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_cols_impl(
    ctx: Ctx,
    x: &[f32],
    prep: &Prepared,
    m: usize,
    w: &WeightView,
    y: *mut f32,
    ldy: usize,
    cols: std::ops::Range<usize>,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        if cols.is_empty() || m == 0 {
            return;
        }
        match prep {
            Prepared::Q8(a) => quant::matmul_q8(ctx.isa, a, w, y, ldy, cols),
            #[cfg(target_arch = "x86_64")]
            Prepared::Amx(a) => {
                let src = match (w.layout, quant::tiles::spec(w.format)) {
                    (Layout::Tiles, Some(spec)) => quant::amx::Source::Tiles(spec),
                    (Layout::Tiles, None) => quant::amx::Source::Bf16Tiles,
                    (Layout::Transposed, _) => quant::amx::Source::Bf16Cols,
                    _ => quant::amx::Source::Bf16Rows,
                };
                quant::amx::matmul(src, a, w, y, ldy, cols)
            }
            Prepared::Bf16(xb) => float_cols(ctx.isa, x, w.cols, xb, m, w, y, ldy, cols),
            Prepared::Padded(xp, ldx) => float_cols(ctx.isa, xp, *ldx, &[], m, w, y, ldy, cols),
            #[cfg(target_arch = "x86_64")]
            Prepared::Split(xs, ldx) => x86::avx512::gemv_bf16_split(xs, *ldx, m, w, y, ldy, cols),
            #[cfg(target_arch = "x86_64")]
            Prepared::Rounded(xr) => x86::avx512::gemv_bf16_tiles(xr, m, w, y, ldy, cols),
            #[cfg(not(target_arch = "x86_64"))]
            Prepared::Rounded(..) => unreachable!("bf16 tiles are read by AMX kernels"),
            #[cfg(not(target_arch = "x86_64"))]
            Prepared::Split(..) => unreachable!("even/odd activations without AVX-512"),
            Prepared::None if w.layout == Layout::Tiles => tiles_dequantized_cols(ctx.isa, x, m, w, y, ldy, cols),
            Prepared::None if w.format.is_float() => float_cols(ctx.isa, x, w.cols, &[], m, w, y, ldy, cols),
            Prepared::None => dequantized_cols(ctx.isa, x, m, w, y, ldy, cols),
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
#[allow(clippy::too_many_arguments)]
unsafe fn dequantized_cols(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &WeightView,
    y: *mut f32,
    ldy: usize,
    cols: std::ops::Range<usize>,
) {
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
                Prepared::Padded(xp, ldx) => float_cols(isa, xp, *ldx, &[], m, &wf, y.add(n), ldy, 0..nr),
                _ => float_cols(isa, x, k, &[], m, &wf, y.add(n), ldy, 0..nr),
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
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_dequantized_cols(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &WeightView,
    y: *mut f32,
    ldy: usize,
    cols: std::ops::Range<usize>,
) {
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
            float_cols(isa, x, k, &[], m, &wf, y.add(n), ldy, 0..nr);
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
#[allow(clippy::too_many_arguments)]
unsafe fn float_cols(
    isa: Isa,
    x: &[f32],
    ldx: usize,
    xb: &[u16],
    m: usize,
    w: &WeightView,
    y: *mut f32,
    ldy: usize,
    cols: std::ops::Range<usize>,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match isa.level() {
            // Activations rounded for the dot-product kernels (Bf16Mode::Dot, on any ISA).
            #[cfg(target_arch = "x86_64")]
            _ if w.format == Format::BF16 && !xb.is_empty() => x86::avx512bf16::matmul(xb, m, w, y, ldy, cols),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Vnni | Level::Avx512Bf16 | Level::Amx => match w.format {
                Format::F32 => x86::avx512::matmul::<0>(x, ldx, m, w, y, ldy, cols),
                Format::BF16 => x86::avx512::matmul::<1>(x, ldx, m, w, y, ldy, cols),
                _ => x86::avx512::matmul::<2>(x, ldx, m, w, y, ldy, cols),
            },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => match w.format {
                Format::F32 => x86::avx2::matmul::<0>(x, m, w, y, ldy, cols),
                Format::BF16 => x86::avx2::matmul::<1>(x, m, w, y, ldy, cols),
                _ => x86::avx2::matmul::<2>(x, m, w, y, ldy, cols),
            },
            _ => scalar(x, m, w, y, ldy, cols),
        }
    }
}

/// The reference: one f32 dot product per output, summed in order.
///
/// # Safety
/// `x` holds `m` rows of `w.cols` values; `w`'s data holds its rows in its format; `y` is valid for
/// writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
unsafe fn scalar(x: &[f32], m: usize, w: &WeightView, y: *mut f32, ldy: usize, cols: std::ops::Range<usize>) {
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

/// The GEMV kernels' blocking: up to 4 rows of x meet 4 weight rows at a time (1 at the
/// ragged end); more rows of x go 8 at a time against `wide_rows` weight rows, so each weight
/// vector is loaded once for 8 rows. Calls `f(n, nr, i, mr)` for weight rows `n..n + nr` and
/// rows of x `i..i + mr`.
#[inline(always)]
#[cfg(target_arch = "x86_64")]
fn gemv_blocks(
    m: usize,
    cols: std::ops::Range<usize>,
    wide_rows: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let wide = m > 4;
    let mut n = cols.start;
    while n < cols.end {
        let nr = if wide {
            (cols.end - n).min(wide_rows)
        } else if cols.end - n >= 4 {
            4
        } else {
            1
        };
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(if wide { 8 } else { 4 });
            f(n, nr, i, mr);
            i += mr;
        }
        n += nr;
    }
}

/// Calls a GEMV block kernel monomorphised for `nr` weight rows (4, 3, 2 or 1) and `mr`
/// activation rows (1..=8).
#[cfg(target_arch = "x86_64")]
macro_rules! gemv_dispatch {
    ($nr:expr, $mr:expr, |$r:ident, $m:ident| $call:expr) => {
        match ($nr, $mr) {
            (4, 1) => gemv_dispatch!(@ 4, 1, $r, $m, $call),
            (4, 2) => gemv_dispatch!(@ 4, 2, $r, $m, $call),
            (4, 3) => gemv_dispatch!(@ 4, 3, $r, $m, $call),
            (4, _) => gemv_dispatch!(@ 4, 4, $r, $m, $call),
            (3, 1) => gemv_dispatch!(@ 3, 1, $r, $m, $call),
            (3, 2) => gemv_dispatch!(@ 3, 2, $r, $m, $call),
            (3, 3) => gemv_dispatch!(@ 3, 3, $r, $m, $call),
            (3, 4) => gemv_dispatch!(@ 3, 4, $r, $m, $call),
            (3, 5) => gemv_dispatch!(@ 3, 5, $r, $m, $call),
            (3, 6) => gemv_dispatch!(@ 3, 6, $r, $m, $call),
            (3, 7) => gemv_dispatch!(@ 3, 7, $r, $m, $call),
            (3, _) => gemv_dispatch!(@ 3, 8, $r, $m, $call),
            (2, 1) => gemv_dispatch!(@ 2, 1, $r, $m, $call),
            (2, 2) => gemv_dispatch!(@ 2, 2, $r, $m, $call),
            (2, 3) => gemv_dispatch!(@ 2, 3, $r, $m, $call),
            (2, 4) => gemv_dispatch!(@ 2, 4, $r, $m, $call),
            (2, 5) => gemv_dispatch!(@ 2, 5, $r, $m, $call),
            (2, 6) => gemv_dispatch!(@ 2, 6, $r, $m, $call),
            (2, 7) => gemv_dispatch!(@ 2, 7, $r, $m, $call),
            (2, _) => gemv_dispatch!(@ 2, 8, $r, $m, $call),
            (_, 1) => gemv_dispatch!(@ 1, 1, $r, $m, $call),
            (_, 2) => gemv_dispatch!(@ 1, 2, $r, $m, $call),
            (_, 3) => gemv_dispatch!(@ 1, 3, $r, $m, $call),
            (_, 4) => gemv_dispatch!(@ 1, 4, $r, $m, $call),
            (_, 5) => gemv_dispatch!(@ 1, 5, $r, $m, $call),
            (_, 6) => gemv_dispatch!(@ 1, 6, $r, $m, $call),
            (_, 7) => gemv_dispatch!(@ 1, 7, $r, $m, $call),
            (_, _) => gemv_dispatch!(@ 1, 8, $r, $m, $call),
        }
    };
    (@ $nv:literal, $mv:literal, $r:ident, $m:ident, $call:expr) => {{
        const $r: usize = $nv;
        const $m: usize = $mv;
        $call
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// Element types by number: 0 = f32, 1 = bf16, 2 = f16.
    pub const F32: u8 = 0;
    pub const BF16: u8 = 1;

    pub mod avx512 {
        use super::*;
        use crate::matmul::{gemv_blocks, Layout, WeightView, GEMM_MIN_ROWS};
        use std::arch::x86_64::*;

        const NR: usize = 32;
        const MR: usize = 12;
        const KC: usize = 256;

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `p` is readable for 16 values of format `D`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn load16<const D: u8>(p: *const u8) -> __m512 {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                match D {
                    F32 => _mm512_loadu_ps(p as *const f32),
                    BF16 => _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
                        16,
                    )),
                    _ => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `p` is readable for the values of format `D` in
        /// the lanes of `mask`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn load16_mask<const D: u8>(p: *const u8, mask: __mmask16) -> __m512 {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                match D {
                    F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
                    BF16 => _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
                        16,
                    )),
                    _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `m` rows of `w.cols` values at stride
        /// `ldx`; `w` holds rows of format `D`; `y` is valid for writes of `m` rows of `ldy` floats
        /// at columns `cols` (within `w.rows`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn matmul<const D: u8>(
            x: &[f32],
            ldx: usize,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                if m >= GEMM_MIN_ROWS || w.layout == Layout::Transposed {
                    gemm::<D>(x.as_ptr(), m, w, y, ldy, cols)
                } else {
                    gemv::<D>(x.as_ptr(), ldx, m, w, y, ldy, cols)
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `m` activation rows of `w.cols` values
        /// (at stride `ldx` where given; bf16 pairs for the bf16 kernels); `w` holds rows in the
        /// layout this kernel reads; `y` is valid for writes of `m` rows of `ldy` floats at columns
        /// `cols` (within `w.rows`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn gemv<const D: u8>(
            x: *const f32,
            ldx: usize,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let rb = k * w.format.row_bytes(1);
                let wp = w.data.as_ptr();
                // Up to 4 rows of x: 4 weight rows at a time; more: 3 weight rows against up to 8.
                gemv_blocks(m, cols, 3, |n, nr, i, mr| {
                    let (xp, yp, wpn) = (x.add(i * ldx), y.add(i * ldy + n), wp.add(n * rb));
                    gemv_dispatch!(nr, mr, |R, M| gemv_block::<D, R, M>(xp, ldx, k, wpn, rb, yp, ldy));
                });
            }
        }

        /// GEMV of bf16 weights (row layout, k a multiple of 32) with activations reordered by
        /// [`crate::matmul::split_even_odd`]: per 64 bytes of a weight row, one load, a shift
        /// (even values) and a mask (odd values) give two f32 vectors for two FMAs.
        ///
        /// # Safety
        /// The CPU must have AVX-512F/BW/VL; `xs` holds `m` rows of stride `ldx` ≥ `w.cols`
        /// (a multiple of 32); `y` is valid for `m` rows of `ldy` floats at columns `cols`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        pub unsafe fn gemv_bf16_split(
            xs: &[f32],
            ldx: usize,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let rb = 2 * k;
                let (x, wp) = (xs.as_ptr(), w.data.as_ptr());
                // Up to 4 rows of x: 4 weight rows at a time; more: 3 weight rows against up to 8.
                gemv_blocks(m, cols, 3, |n, nr, i, mr| {
                    let (xp, yp, wpn) = (x.add(i * ldx), y.add(i * ldy + n), wp.add(n * rb));
                    gemv_dispatch!(nr, mr, |R, M| split_block::<R, M>(xp, ldx, k, wpn, rb, yp, ldy));
                });
            }
        }

        /// GEMV of bf16 weights in AMX's tiles ([`crate::quant::tiles::bf16`], `cols.start` a
        /// multiple of 32) with activations `x` (`m` rows of `w.cols`): a tile row holds one
        /// pair of inputs for 16 weight rows, so a shift (even inputs) and a mask (odd ones)
        /// give two vectors of 16 outputs' weights that meet broadcast activations in FMAs, with
        /// no sums across lanes.
        ///
        /// # Safety
        /// The CPU must have AVX-512F/BW/VL; `w` is in bf16 tiles; `y` is valid for `m` rows of
        /// `ldy` floats at columns `cols`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        pub unsafe fn gemv_bf16_tiles(
            x: &[f32],
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                assert!(cols.start.is_multiple_of(32) && x.len() >= m * w.cols);
                assert!(w.data.len() >= crate::quant::tiles::bf16::bytes(w.rows, w.cols) && cols.end <= w.rows);
                // A column pair's weights (2 KiB per 32 inputs) meet every 4 rows in turn while
                // they are in cache: read from memory once, whatever the rows.
                for n in cols.clone().step_by(32) {
                    let mut i = 0;
                    while i < m {
                        let (xp, yp) = (x.as_ptr().add(i * w.cols), y.add(i * ldy));
                        i += match m - i {
                            1 => tiles_block::<1>(xp, w, yp, ldy, n, cols.end),
                            2 => tiles_block::<2>(xp, w, yp, ldy, n, cols.end),
                            3 => tiles_block::<3>(xp, w, yp, ldy, n, cols.end),
                            _ => tiles_block::<4>(xp, w, yp, ldy, n, cols.end),
                        };
                    }
                }
            }
        }

        /// Stores a column pair's sums (`acc[i][h]`: activation row `i`, columns `n + 16h` on)
        /// into the rows of `y`, columns below `end` only.
        ///
        /// # Safety
        /// The CPU must have AVX-512F; `y` is valid for `M` rows of `ldy` floats up to `end`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn store_pair<const M: usize>(
            acc: &[[__m512; 2]; M],
            y: *mut f32,
            ldy: usize,
            n: usize,
            end: usize,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                for (i, a) in acc.iter().enumerate() {
                    for (h, s) in a.iter().enumerate() {
                        let c = n + 16 * h;
                        if c < end {
                            let mask = ((1u32 << (end - c).min(16)) - 1) as __mmask16;
                            _mm512_mask_storeu_ps(y.add(i * ldy + c), mask, *s);
                        }
                    }
                }
            }
        }

        /// [`gemv_bf16_tiles`] for `M` activation rows and the column pair from `n` (columns
        /// below `end`); returns `M`. Each output sums each 32
        /// inputs' products (even inputs and odd ones apart, in order, then the two) and adds
        /// these sums in input order, as a tile product does: short chains of roundings.
        ///
        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `M` activation rows of `w.cols`
        /// values; `w` is in bf16 tiles; `y` is valid for writes of `M` rows of `ldy` floats at the
        /// columns of the block written (from the given column to the end given, within `w.rows`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn tiles_block<const M: usize>(
            x: *const f32,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            n: usize,
            end: usize,
        ) -> usize {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let (k, ksteps) = (w.cols, w.cols / 32);
                let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
                // The pair of 16-row groups holding columns n..n + 32: 2 KiB per 32 inputs.
                let base = w.data.as_ptr().add(n / 32 * ksteps * 2048);
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                for j in 0..ksteps {
                    let t = base.add(j * 2048);
                    let mut part = [[[_mm512_setzero_ps(); 2]; 2]; M];
                    for p in 0..16 {
                        // The next step's lines, and a stretch further on into the L3 cache
                        // (harmless past the end).
                        _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(2048 + 128 * p) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(2048 + 128 * p + 64) as *const i8);
                        _mm_prefetch::<_MM_HINT_T2>(t.wrapping_add(16384 + 128 * p) as *const i8);
                        _mm_prefetch::<_MM_HINT_T2>(t.wrapping_add(16384 + 128 * p + 64) as *const i8);
                        let v = [
                            _mm512_loadu_si512(t.add(64 * p) as *const _),
                            _mm512_loadu_si512(t.add(1024 + 64 * p) as *const _),
                        ];
                        let we = v.map(|v| _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
                        let wo = v.map(|v| _mm512_castsi512_ps(_mm512_and_si512(v, high)));
                        for (i, q) in part.iter_mut().enumerate() {
                            let xe = _mm512_set1_ps(*x.add(i * k + 32 * j + 2 * p));
                            let xo = _mm512_set1_ps(*x.add(i * k + 32 * j + 2 * p + 1));
                            for h in 0..2 {
                                q[h][0] = _mm512_fmadd_ps(xe, we[h], q[h][0]);
                                q[h][1] = _mm512_fmadd_ps(xo, wo[h], q[h][1]);
                            }
                        }
                    }
                    for (a, q) in acc.iter_mut().zip(&part) {
                        for h in 0..2 {
                            a[h] = _mm512_add_ps(a[h], _mm512_add_ps(q[h][0], q[h][1]));
                        }
                    }
                }
                store_pair(&acc, y, ldy, n, end);
                M
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `M` rows of `k` values at stride
        /// `ldx`; `w` points at `R` weight rows of `rb` bytes each; `y` is valid for writes of `M`
        /// rows of `ldy` floats, `R` columns from its start.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn split_block<const R: usize, const M: usize>(
            x: *const f32,
            ldx: usize,
            k: usize,
            w: *const u8,
            rb: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
                // One sum per output, even then odd products: the same order whatever R and M are,
                // so a row's result does not depend on the rows batched with it.
                let mut acc = [[_mm512_setzero_ps(); R]; M];
                let mut kk = 0;
                while kk < k {
                    let mut we = [_mm512_setzero_ps(); R];
                    let mut wo = [_mm512_setzero_ps(); R];
                    for j in 0..R {
                        // The same line of the next block of rows (harmless past the end).
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + R) * rb + 2 * kk) as *const i8);
                        let v = _mm512_loadu_si512(w.add(j * rb + 2 * kk) as *const _);
                        we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                        wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xe = _mm512_loadu_ps(x.add(i * ldx + kk));
                        let xo = _mm512_loadu_ps(x.add(i * ldx + kk + 16));
                        for j in 0..R {
                            a[j] = _mm512_fmadd_ps(xo, wo[j], _mm512_fmadd_ps(xe, we[j], a[j]));
                        }
                    }
                    kk += 32;
                }
                for (i, a) in acc.iter().enumerate() {
                    for (j, v) in a.iter().enumerate() {
                        *y.add(i * ldy + j) = _mm512_reduce_add_ps(*v);
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `M` rows of `k` values at stride
        /// `ldx`; `w` points at `R` weight rows of format `D`, `rb` bytes each; `y` is valid for
        /// writes of `M` rows of `ldy` floats, `R` columns from its start.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn gemv_block<const D: u8, const R: usize, const M: usize>(
            x: *const f32,
            ldx: usize,
            k: usize,
            w: *const u8,
            rb: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let es = if D == F32 { 4 } else { 2 };
                let mut acc = [[_mm512_setzero_ps(); R]; M];
                let mut kk = 0;
                while kk + 16 <= k {
                    let mut wv = [_mm512_setzero_ps(); R];
                    for (j, v) in wv.iter_mut().enumerate() {
                        // Prefetch the same line of the next block of rows (harmless past the end).
                        if (kk * es) % 64 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + 2 * R) * rb + kk * es) as *const i8);
                        }
                        *v = load16::<D>(w.add(j * rb + kk * es));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(x.add(i * ldx + kk));
                        for j in 0..R {
                            a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                        }
                    }
                    kk += 16;
                }
                if kk < k {
                    let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as __mmask16;
                    let mut wv = [_mm512_setzero_ps(); R];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = load16_mask::<D>(w.add(j * rb + kk * es), mask);
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_maskz_loadu_ps(mask, x.add(i * ldx + kk));
                        for j in 0..R {
                            a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    for (j, v) in a.iter().enumerate() {
                        *y.add(i * ldy + j) = _mm512_reduce_add_ps(*v);
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `m` activation rows of `w.cols` values
        /// (bf16 pairs for the bf16 kernels); `w` holds rows in the layout this kernel reads; `y`
        /// is valid for writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        unsafe fn gemm<const D: u8>(
            x: *const f32,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let es = w.format.row_bytes(1);
                let rb = k * es;
                let wp = w.data.as_ptr();
                let mut panel = crate::alloc::Aligned::<f32>::zeroed(KC * NR);
                let mut np = cols.start;
                while np < cols.end {
                    let nr = (cols.end - np).min(NR);
                    let m0: __mmask16 = if nr >= 16 { 0xffff } else { ((1u32 << nr) - 1) as __mmask16 };
                    let m1: __mmask16 = if nr >= 32 {
                        0xffff
                    } else if nr > 16 {
                        ((1u32 << (nr - 16)) - 1) as __mmask16
                    } else {
                        0
                    };
                    let mut kc = 0;
                    while kc < k {
                        let kb = (k - kc).min(KC);
                        // Pack W[np..np+nr, kc..kc+kb] transposed to f32: panel[kk * NR + j].
                        if w.layout == Layout::Transposed {
                            // Stored row kc + kk holds W[.., kc + kk]: its values np.. are the row.
                            for kk in 0..kb {
                                let row = wp.add(((kc + kk) * w.rows + np) * es);
                                let dst = panel.as_mut_ptr().add(kk * NR);
                                _mm512_storeu_ps(dst, load16_mask::<D>(row, m0));
                                _mm512_storeu_ps(dst.add(16), load16_mask::<D>(row.wrapping_add(16 * es), m1));
                            }
                        } else {
                            for j in 0..NR {
                                if j < nr {
                                    let row = wp.add((np + j) * rb + kc * es);
                                    let mut kk = 0;
                                    while kk + 16 <= kb {
                                        let v = load16::<D>(row.add(kk * es));
                                        let mut tmp = [0f32; 16];
                                        _mm512_storeu_ps(tmp.as_mut_ptr(), v);
                                        for (t, &val) in tmp.iter().enumerate() {
                                            *panel.get_unchecked_mut((kk + t) * NR + j) = val;
                                        }
                                        kk += 16;
                                    }
                                    if kk < kb {
                                        let mask = ((1u32 << (kb - kk)) - 1) as __mmask16;
                                        let v = load16_mask::<D>(row.add(kk * es), mask);
                                        let mut tmp = [0f32; 16];
                                        _mm512_storeu_ps(tmp.as_mut_ptr(), v);
                                        for (t, &val) in tmp.iter().enumerate().take(kb - kk) {
                                            *panel.get_unchecked_mut((kk + t) * NR + j) = val;
                                        }
                                    }
                                } else {
                                    for kk in 0..kb {
                                        *panel.get_unchecked_mut(kk * NR + j) = 0.0;
                                    }
                                }
                            }
                        }
                        let first = kc == 0;
                        let mut i = 0;
                        while i < m {
                            let mr = (m - i).min(MR);
                            let a = x.add(i * k + kc);
                            let c = y.add(i * ldy + np);
                            let p = panel.as_ptr();
                            match mr {
                                12 => micro::<12>(a, k, p, kb, c, ldy, first, m0, m1),
                                11 => micro::<11>(a, k, p, kb, c, ldy, first, m0, m1),
                                10 => micro::<10>(a, k, p, kb, c, ldy, first, m0, m1),
                                9 => micro::<9>(a, k, p, kb, c, ldy, first, m0, m1),
                                8 => micro::<8>(a, k, p, kb, c, ldy, first, m0, m1),
                                7 => micro::<7>(a, k, p, kb, c, ldy, first, m0, m1),
                                6 => micro::<6>(a, k, p, kb, c, ldy, first, m0, m1),
                                5 => micro::<5>(a, k, p, kb, c, ldy, first, m0, m1),
                                4 => micro::<4>(a, k, p, kb, c, ldy, first, m0, m1),
                                3 => micro::<3>(a, k, p, kb, c, ldy, first, m0, m1),
                                2 => micro::<2>(a, k, p, kb, c, ldy, first, m0, m1),
                                _ => micro::<1>(a, k, p, kb, c, ldy, first, m0, m1),
                            }
                            i += mr;
                        }
                        kc += kb;
                    }
                    np += nr;
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,fma,f16c`); `a` holds `M` rows of the panel's depth at
        /// stride `lda`; the panel holds its depth of 32 packed columns; `c` is valid for reads and
        /// writes of `M` rows of `ldc` floats in the columns the masks select.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn micro<const M: usize>(
            a: *const f32,
            lda: usize,
            panel: *const f32,
            kb: usize,
            c: *mut f32,
            ldc: usize,
            first: bool,
            m0: __mmask16,
            m1: __mmask16,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                if !first {
                    for (i, r) in acc.iter_mut().enumerate() {
                        r[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                        r[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
                    }
                }
                for kk in 0..kb {
                    let b0 = _mm512_loadu_ps(panel.add(kk * NR));
                    let b1 = _mm512_loadu_ps(panel.add(kk * NR + 16));
                    for (i, r) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*a.add(i * lda + kk));
                        r[0] = _mm512_fmadd_ps(av, b0, r[0]);
                        r[1] = _mm512_fmadd_ps(av, b1, r[1]);
                    }
                }
                for (i, r) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(c.add(i * ldc), m0, r[0]);
                    _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, r[1]);
                }
            }
        }
    }

    /// AVX512-BF16: bf16 activations × bf16 weights with `vdpbf16ps` (pairs of products
    /// accumulated into f32 lanes). Same two paths as the exact kernels.
    pub mod avx512bf16 {
        use crate::matmul::{gemv_blocks, Layout, WeightView, GEMM_MIN_ROWS, TILES_MIN_ROWS};
        use std::arch::x86_64::*;

        const NR: usize = 32;
        const MR: usize = 12;
        /// k-pairs per packed panel.
        const KC2: usize = 256;

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `p` is readable for the bf16 values in the
        /// lanes of `mask`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn load32(p: *const u16, mask: __mmask32) -> __m512bh {
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16)) }
        }

        /// # Safety
        /// `xb` holds `m` rows of `k` rounded up to even bf16 values (see `prepare`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        pub unsafe fn matmul(
            xb: &[u16],
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                if w.layout == Layout::Tiles && m < TILES_MIN_ROWS {
                    gemv_tiles(xb.as_ptr(), m, w, y, ldy, cols)
                } else if w.layout == Layout::Tiles {
                    gemm_tiles(xb.as_ptr(), m, w, y, ldy, cols)
                } else if m >= GEMM_MIN_ROWS || w.layout == Layout::Transposed {
                    gemm(xb.as_ptr(), m, w, y, ldy, cols)
                } else {
                    gemv(xb.as_ptr(), m, w, y, ldy, cols)
                }
            }
        }

        /// GEMV of bf16 weights in tiles (`quant::tiles::bf16`, `cols.start` a multiple of 32)
        /// with `m` (< [`TILES_MIN_ROWS`]) rows of activations rounded to bf16 (stride `w.cols`):
        /// a 64-byte line of a tile holds one pair of inputs for 16 columns, which one
        /// `vdpbf16ps` multiplies by the broadcast activation pair, with no sums across lanes.
        ///
        /// Per 64 bytes of weights and activation row: one load, one prefetch and one
        /// `vdpbf16ps` (the broadcast pair shared by both halves of a column pair), summed in one
        /// chain per output as the GEMM of the tiles sums (so a row's result does not depend on
        /// the rows batched with it). `llvm-mca` (LLVM 19) of the one-row loop over a 2 KiB step
        /// (32 loads, 32 prefetches, 16 broadcasts, 32 `vdpbf16ps` in two chains): 64 cycles on
        /// `znver4`, half resources, half the chains' latency (its model gives a zmm
        /// `vdpbf16ps` a reciprocal throughput of 3 on the FP2/FP3 pipes); 160 on
        /// `sapphirerapids`, the chains' latency. Four chains per output (sums per 32 inputs)
        /// would take 100 and 64 cycles; the FMA GEMV of the same tiles
        /// ([`super::avx512::gemv_bf16_tiles`]: a shift, a mask and two FMAs per line) 96 on
        /// either. At 3.5 GHz these read 45–110 GB/s per core where a core's share of DRAM is
        /// 15–20 GB/s: one row waits on memory. With more rows the dot product does the work of
        /// two FMAs: [`crate::matmul::Bf16Mode`]'s calibration picks per CPU.
        ///
        /// # Safety
        /// The CPU must have AVX512-BF16; `w` is in bf16 tiles; `x` holds `m` rows of `w.cols`
        /// bf16 values; `y` is valid for `m` rows of `ldy` floats at columns `cols`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn gemv_tiles(
            x: *const u16,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                assert!(cols.start.is_multiple_of(32) && w.cols.is_multiple_of(32));
                assert!(w.data.len() >= crate::quant::tiles::bf16::bytes(w.rows, w.cols) && cols.end <= w.rows);
                assert!(m <= 4, "the GEMV of bf16 tiles takes at most 4 rows");
                match m {
                    1 => tiles_block::<1>(x, w, y, ldy, cols),
                    2 => tiles_block::<2>(x, w, y, ldy, cols),
                    3 => tiles_block::<3>(x, w, y, ldy, cols),
                    _ => tiles_block::<4>(x, w, y, ldy, cols),
                };
            }
        }

        /// [`gemv_tiles`] for `M` activation rows; returns `M`.
        ///
        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `M` activation rows of `w.cols`
        /// values; `w` is in bf16 tiles; `y` is valid for writes of `M` rows of `ldy` floats at the
        /// columns of the block written (from the given column to the end given, within `w.rows`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn tiles_block<const M: usize>(
            x: *const u16,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) -> usize {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let (k, ksteps) = (w.cols, w.cols / 32);
                let mut n = cols.start;
                while n < cols.end {
                    // The pair of 16-column groups holding columns n..n + 32: 2 KiB per 32 inputs.
                    let base = w.data.as_ptr().add(n / 32 * ksteps * 2048);
                    // One chain of dot products per output, input pairs in order: as the GEMM of
                    // the tiles sums, so a row's result does not depend on the rows batched with
                    // it.
                    let mut acc = [[_mm512_setzero_ps(); 2]; M];
                    for j in 0..ksteps {
                        let t = base.add(j * 2048);
                        for p in 0..16 {
                            // The lines a stretch further on in the stream (harmless past the end).
                            _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(PREFETCH + 64 * p) as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(PREFETCH + 1024 + 64 * p) as *const i8);
                            let v = [
                                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(t.add(64 * p) as *const _)),
                                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                                    t.add(1024 + 64 * p) as *const _
                                )),
                            ];
                            for (i, a) in acc.iter_mut().enumerate() {
                                let xa = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                                    (x.add(i * k + 32 * j + 2 * p) as *const i32).read_unaligned(),
                                ));
                                for h in 0..2 {
                                    a[h] = _mm512_dpbf16_ps(a[h], xa, v[h]);
                                }
                            }
                        }
                    }
                    super::avx512::store_pair(&acc, y, ldy, n, cols.end);
                    n += 32;
                }
                M
            }
        }

        /// How far ahead [`tiles_block`] prefetches its stream, in bytes.
        const PREFETCH: usize = 4096;

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `m` activation rows of `w.cols`
        /// values (at stride `ldx` where given; bf16 pairs for the bf16 kernels); `w` holds rows in
        /// the layout this kernel reads; `y` is valid for writes of `m` rows of `ldy` floats at
        /// columns `cols` (within `w.rows`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn gemv(x: *const u16, m: usize, w: &WeightView, y: *mut f32, ldy: usize, cols: std::ops::Range<usize>) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let kp = k.next_multiple_of(2);
                let wp = w.data.as_ptr() as *const u16;
                // Up to 4 rows of x: 4 weight rows at a time; more: 2 weight rows against up to 8.
                gemv_blocks(m, cols, 2, |n, nr, i, mr| {
                    let (xp, yp, wpn) = (x.add(i * kp), y.add(i * ldy + n), wp.add(n * k));
                    gemv_dispatch!(nr, mr, |R, M| block::<R, M>(xp, kp, k, wpn, yp, ldy));
                });
            }
        }

        /// `R` weight rows (stride `k`) against `M` activation rows (stride `kp`).
        ///
        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `M` rows of `kp` bf16 values
        /// (`k` used); `w` points at `R` rows of `k` bf16 weights; `y` is valid for writes of `M`
        /// rows of `ldy` floats, `R` columns from its start.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn block<const R: usize, const M: usize>(
            x: *const u16,
            kp: usize,
            k: usize,
            w: *const u16,
            y: *mut f32,
            ldy: usize,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); R]; M];
                let mut kk = 0;
                while kk < k {
                    let mask: __mmask32 = if k - kk >= 32 { u32::MAX } else { (1u32 << (k - kk)) - 1 };
                    let mut wv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); R];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = load32(w.add(j * k + kk), mask);
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = load32(x.add(i * kp + kk), mask);
                        for j in 0..R {
                            a[j] = _mm512_dpbf16_ps(a[j], xv, wv[j]);
                        }
                    }
                    kk += 32;
                }
                for (i, a) in acc.iter().enumerate() {
                    for (j, v) in a.iter().enumerate() {
                        *y.add(i * ldy + j) = _mm512_reduce_add_ps(*v);
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `m` activation rows of `w.cols`
        /// values (bf16 pairs for the bf16 kernels); `w` holds rows in the layout this kernel
        /// reads; `y` is valid for writes of `m` rows of `ldy` floats at columns `cols` (within
        /// `w.rows`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn gemm(x: *const u16, m: usize, w: &WeightView, y: *mut f32, ldy: usize, cols: std::ops::Range<usize>) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let kp = k.next_multiple_of(2);
                let wp = w.data.as_ptr() as *const u16;
                // panel[p * NR + j] = weights (2p, 2p+1) of column j, as one u32.
                let mut panel = crate::alloc::Aligned::<u32>::zeroed(KC2 * NR);
                let mut np = cols.start;
                while np < cols.end {
                    let nr = (cols.end - np).min(NR);
                    let m0: __mmask16 = if nr >= 16 { 0xffff } else { ((1u32 << nr) - 1) as __mmask16 };
                    let m1: __mmask16 = if nr >= 32 {
                        0xffff
                    } else if nr > 16 {
                        ((1u32 << (nr - 16)) - 1) as __mmask16
                    } else {
                        0
                    };
                    let mut kc = 0;
                    while kc < k {
                        let kb = (k - kc).min(2 * KC2);
                        let kb2 = kb.div_ceil(2);
                        if w.layout == Layout::Transposed {
                            // Stored rows kc + 2p and kc + 2p + 1 (w.rows values each), interleaved.
                            let n = w.rows;
                            for p in 0..kb2 {
                                let r0 = wp.add((kc + 2 * p) * n + np);
                                let r1 = wp.add((kc + 2 * p + 1) * n + np);
                                let odd = 2 * p + 1 == kb;
                                for j in 0..NR {
                                    *panel.get_unchecked_mut(p * NR + j) = if j >= nr {
                                        0
                                    } else if odd {
                                        *r0.add(j) as u32
                                    } else {
                                        *r0.add(j) as u32 | (*r1.add(j) as u32) << 16
                                    };
                                }
                            }
                        } else {
                            for j in 0..NR {
                                if j < nr {
                                    let row = wp.add((np + j) * k + kc);
                                    for p in 0..kb / 2 {
                                        *panel.get_unchecked_mut(p * NR + j) =
                                            (row.add(2 * p) as *const u32).read_unaligned();
                                    }
                                    if kb % 2 == 1 {
                                        *panel.get_unchecked_mut((kb2 - 1) * NR + j) = *row.add(kb - 1) as u32;
                                    }
                                } else {
                                    for p in 0..kb2 {
                                        *panel.get_unchecked_mut(p * NR + j) = 0;
                                    }
                                }
                            }
                        }
                        let first = kc == 0;
                        let mut i = 0;
                        while i < m {
                            let mr = (m - i).min(MR);
                            let a = x.add(i * kp + kc) as *const u32;
                            let c = y.add(i * ldy + np);
                            let p = panel.as_ptr();
                            let lda = kp / 2;
                            micro_rows::<false>(mr, a, lda, p, kb2, c, ldy, first, m0, m1);
                            i += mr;
                        }
                        kc += kb;
                    }
                    np += nr;
                }
            }
        }

        /// Input steps of 32 (2 KiB of weights for 32 columns in tiles) per pass of
        /// [`gemm_tiles`] over the rows: 16 KiB of weights, kept in L1 while every 12 rows of
        /// activations meet them.
        const TILE_STEPS: usize = 8;

        /// [`gemm`] for bf16 weights in tiles (`quant::tiles::bf16`): for 32 columns and 32
        /// inputs, the 16 pairs of inputs of columns 0–15 (64 bytes each: one bf16 pair per
        /// column) then those of columns 16–31, which is the micro kernel's panel as stored, so
        /// the weights are read in place. `cols.start` is a multiple of 32.
        ///
        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `m` rows of `w.cols` bf16
        /// values; `w` is in bf16 tiles; `y` is valid for writes of `m` rows of `ldy` floats at
        /// columns `cols` (`cols.start` a multiple of 32, within `w.rows`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        unsafe fn gemm_tiles(
            x: *const u16,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                debug_assert!(cols.start.is_multiple_of(NR) && w.cols.is_multiple_of(32));
                let ksteps = w.cols / 32;
                let lda = w.cols / 2;
                let wp = w.data.as_ptr() as *const u32;
                for np in (cols.start..cols.end).step_by(NR) {
                    let nr = (cols.end - np).min(NR);
                    let m0: __mmask16 = if nr >= 16 { 0xffff } else { ((1u32 << nr) - 1) as __mmask16 };
                    let m1: __mmask16 = if nr > 16 { ((1u64 << (nr - 16)) - 1) as __mmask16 } else { 0 };
                    // 512 u32 (2 KiB) per input step of these 32 columns.
                    let block = wp.add(np / NR * ksteps * 512);
                    for s0 in (0..ksteps).step_by(TILE_STEPS) {
                        let steps = (ksteps - s0).min(TILE_STEPS);
                        let mut i = 0;
                        while i < m {
                            let mr = (m - i).min(MR);
                            let a = x.add(i * 2 * lda + s0 * 32) as *const u32;
                            let c = y.add(i * ldy + np);
                            micro_rows::<true>(mr, a, lda, block.add(s0 * 512), steps * 16, c, ldy, s0 == 0, m0, m1);
                            i += mr;
                        }
                    }
                }
            }
        }

        /// [`micro`] for `mr` (1 to [`MR`]) rows.
        ///
        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); as [`micro`] with `mr` (≤ 4) rows.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn micro_rows<const TILES: bool>(
            mr: usize,
            a: *const u32,
            lda: usize,
            p: *const u32,
            kb2: usize,
            c: *mut f32,
            ldy: usize,
            first: bool,
            m0: __mmask16,
            m1: __mmask16,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                match mr {
                    12 => micro::<12, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    11 => micro::<11, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    10 => micro::<10, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    9 => micro::<9, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    8 => micro::<8, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    7 => micro::<7, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    6 => micro::<6, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    5 => micro::<5, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    4 => micro::<4, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    3 => micro::<3, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    2 => micro::<2, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                    _ => micro::<1, TILES>(a, lda, p, kb2, c, ldy, first, m0, m1),
                }
            }
        }

        /// `a`: activation pairs (u32 = two bf16), row stride `lda` pairs. `panel`: for pair
        /// `p`, the pairs of columns 0–15 then 16–31, either packed ([`NR`] u32 per pair) or in
        /// tiles (`TILES`: 16 u32 per pair, columns 16–31 a tile of 256 u32 further, 16 pairs
        /// per input step of 512 u32; `kb2` a multiple of 16).
        ///
        /// # Safety
        /// The CPU must support the features this function enables
        /// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `a` holds `M` rows of the panel's depth at
        /// stride `lda`; the panel holds its depth of 32 packed columns; `c` is valid for reads and
        /// writes of `M` rows of `ldc` floats in the columns the masks select.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn micro<const M: usize, const TILES: bool>(
            a: *const u32,
            lda: usize,
            panel: *const u32,
            kb2: usize,
            c: *mut f32,
            ldc: usize,
            first: bool,
            m0: __mmask16,
            m1: __mmask16,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                if !first {
                    for (i, r) in acc.iter_mut().enumerate() {
                        r[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                        r[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
                    }
                }
                for p in 0..kb2 {
                    let (b0, b1) = if TILES {
                        let b = panel.add(p / 16 * 512 + p % 16 * 16);
                        (b, b.add(256))
                    } else {
                        (panel.add(p * NR), panel.add(p * NR + 16))
                    };
                    let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b0 as *const _));
                    let b1 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b1 as *const _));
                    for (i, r) in acc.iter_mut().enumerate() {
                        let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                            a.add(i * lda + p).read_unaligned() as i32,
                        ));
                        r[0] = _mm512_dpbf16_ps(r[0], av, b0);
                        r[1] = _mm512_dpbf16_ps(r[1], av, b1);
                    }
                }
                for (i, r) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(c.add(i * ldc), m0, r[0]);
                    _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, r[1]);
                }
            }
        }
    }

    pub mod avx2 {
        use super::*;
        use crate::matmul::{WeightView, GEMM_MIN_ROWS};
        use std::arch::x86_64::*;

        const NR: usize = 16;
        const MR: usize = 6;
        const KC: usize = 256;

        /// # Safety
        /// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is
        /// readable for 8 values of format `D`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8<const D: u8>(p: *const u8) -> __m256 {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                match D {
                    F32 => _mm256_loadu_ps(p as *const f32),
                    BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                        16,
                    )),
                    _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                }
            }
        }

        /// # Safety
        /// The CPU must support what the caller checked; value `i` of `p` (format `D`) is readable.
        #[inline]
        unsafe fn get<const D: u8>(p: *const u8, i: usize) -> f32 {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                match D {
                    F32 => *(p as *const f32).add(i),
                    BF16 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
                    _ => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
                }
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        /// # Safety
        /// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `m`
        /// rows of `w.cols` values at stride `ldx`; `w` holds rows of format `D`; `y` is valid for
        /// writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn matmul<const D: u8>(
            x: &[f32],
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                if m >= GEMM_MIN_ROWS {
                    gemm::<D>(x.as_ptr(), m, w, y, ldy, cols)
                } else {
                    gemv::<D>(x.as_ptr(), m, w, y, ldy, cols)
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `m`
        /// activation rows of `w.cols` values (at stride `ldx` where given; bf16 pairs for the bf16
        /// kernels); `w` holds rows in the layout this kernel reads; `y` is valid for writes of `m`
        /// rows of `ldy` floats at columns `cols` (within `w.rows`).
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn gemv<const D: u8>(
            x: *const f32,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let rb = k * w.format.row_bytes(1);
                let wp = w.data.as_ptr();
                let mut n = cols.start;
                while n < cols.end {
                    let nr = if cols.end - n >= 4 { 4 } else { 1 };
                    let mut i = 0;
                    while i < m {
                        let mr = (m - i).min(2);
                        let (xp, yp, wpn) = (x.add(i * k), y.add(i * ldy + n), wp.add(n * rb));
                        match (nr, mr) {
                            (4, 1) => gemv_block::<D, 4, 1>(xp, k, wpn, rb, yp, ldy),
                            (4, _) => gemv_block::<D, 4, 2>(xp, k, wpn, rb, yp, ldy),
                            (_, 1) => gemv_block::<D, 1, 1>(xp, k, wpn, rb, yp, ldy),
                            (_, _) => gemv_block::<D, 1, 2>(xp, k, wpn, rb, yp, ldy),
                        }
                        i += mr;
                    }
                    n += nr;
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `M`
        /// rows of `k` values at stride `ldx`; `w` points at `R` weight rows of format `D`, `rb`
        /// bytes each; `y` is valid for writes of `M` rows of `ldy` floats, `R` columns from its
        /// start.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn gemv_block<const D: u8, const R: usize, const M: usize>(
            x: *const f32,
            k: usize,
            w: *const u8,
            rb: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let es = if D == F32 { 4 } else { 2 };
                let mut acc = [[_mm256_setzero_ps(); R]; M];
                let mut kk = 0;
                while kk + 8 <= k {
                    let mut wv = [_mm256_setzero_ps(); R];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = load8::<D>(w.add(j * rb + kk * es));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(i * k + kk));
                        for j in 0..R {
                            a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
                        }
                    }
                    kk += 8;
                }
                for (i, a) in acc.iter().enumerate() {
                    for (j, v) in a.iter().enumerate() {
                        let mut s = hsum(*v);
                        for t in kk..k {
                            s += *x.add(i * k + t) * get::<D>(w.add(j * rb), t);
                        }
                        *y.add(i * ldy + j) = s;
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `m`
        /// activation rows of `w.cols` values (bf16 pairs for the bf16 kernels); `w` holds rows in
        /// the layout this kernel reads; `y` is valid for writes of `m` rows of `ldy` floats at
        /// columns `cols` (within `w.rows`).
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn gemm<const D: u8>(
            x: *const f32,
            m: usize,
            w: &WeightView,
            y: *mut f32,
            ldy: usize,
            cols: std::ops::Range<usize>,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let k = w.cols;
                let es = w.format.row_bytes(1);
                let rb = k * es;
                let wp = w.data.as_ptr();
                let mut panel = crate::alloc::Aligned::<f32>::zeroed(KC * NR);
                let mut tile = [0f32; MR * NR];
                let mut np = cols.start;
                while np < cols.end {
                    let nr = (cols.end - np).min(NR);
                    let mut kc = 0;
                    while kc < k {
                        let kb = (k - kc).min(KC);
                        for j in 0..NR {
                            if j < nr {
                                let row = wp.add((np + j) * rb + kc * es);
                                for kk in 0..kb {
                                    *panel.get_unchecked_mut(kk * NR + j) = get::<D>(row, kk);
                                }
                            } else {
                                for kk in 0..kb {
                                    *panel.get_unchecked_mut(kk * NR + j) = 0.0;
                                }
                            }
                        }
                        let first = kc == 0;
                        let mut i = 0;
                        while i < m {
                            let mr = (m - i).min(MR);
                            let a = x.add(i * k + kc);
                            // Full-width tiles write straight into y; a ragged right edge goes through `tile`.
                            let (c, ldc) = if nr == NR { (y.add(i * ldy + np), ldy) } else { (tile.as_mut_ptr(), NR) };
                            if nr != NR && !first {
                                for r in 0..mr {
                                    for j in 0..nr {
                                        tile[r * NR + j] = *y.add((i + r) * ldy + np + j);
                                    }
                                }
                            }
                            let p = panel.as_ptr();
                            match mr {
                                6 => micro::<6>(a, k, p, kb, c, ldc, first),
                                5 => micro::<5>(a, k, p, kb, c, ldc, first),
                                4 => micro::<4>(a, k, p, kb, c, ldc, first),
                                3 => micro::<3>(a, k, p, kb, c, ldc, first),
                                2 => micro::<2>(a, k, p, kb, c, ldc, first),
                                _ => micro::<1>(a, k, p, kb, c, ldc, first),
                            }
                            if nr != NR {
                                for r in 0..mr {
                                    for j in 0..nr {
                                        *y.add((i + r) * ldy + np + j) = tile[r * NR + j];
                                    }
                                }
                            }
                            i += mr;
                        }
                        kc += kb;
                    }
                    np += nr;
                }
            }
        }

        /// # Safety
        /// The CPU must support the features this function enables (`avx2,fma`); `a` holds `M` rows
        /// of the panel's depth at stride `lda`; the panel holds its depth of 32 packed columns;
        /// `c` is valid for reads and writes of `M` rows of `ldc` floats in the columns the masks
        /// select.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn micro<const M: usize>(
            a: *const f32,
            lda: usize,
            panel: *const f32,
            kb: usize,
            c: *mut f32,
            ldc: usize,
            first: bool,
        ) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                if !first {
                    for (i, r) in acc.iter_mut().enumerate() {
                        r[0] = _mm256_loadu_ps(c.add(i * ldc));
                        r[1] = _mm256_loadu_ps(c.add(i * ldc + 8));
                    }
                }
                for kk in 0..kb {
                    let b0 = _mm256_loadu_ps(panel.add(kk * NR));
                    let b1 = _mm256_loadu_ps(panel.add(kk * NR + 8));
                    for (i, r) in acc.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                        r[0] = _mm256_fmadd_ps(av, b0, r[0]);
                        r[1] = _mm256_fmadd_ps(av, b1, r[1]);
                    }
                }
                for (i, r) in acc.iter().enumerate() {
                    _mm256_storeu_ps(c.add(i * ldc), r[0]);
                    _mm256_storeu_ps(c.add(i * ldc + 8), r[1]);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ThreadPool;

    pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
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
