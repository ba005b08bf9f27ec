//! Products with several activation rows (prefill, batched decode) on Intel AMX tiles, in bf16.
//!
//! A tile multiply (`tdpbf16ps`) takes 16 rows × 32 bf16 of activations and 32 bf16 × 16
//! columns of weights and accumulates a 16 × 16 block of f32 sums. Weights of any
//! integer-kernel format are unpacked from their tiles to bf16 (`s · (u − o) + m`, rounded to
//! nearest even) once per call, 16 rows at a time; bf16 weights in the file's row layout (or
//! stored transposed) are only rearranged into tiles, and bf16 weights converted at load to
//! the tile layout ([`crate::quant::tiles::bf16`]) are loaded where they lie; activations are rounded
//! to bf16. This is bf16 inference: the reference is the f32 product of the bf16-rounded
//! operands.
//!
//! AMX state is per thread and must be granted by the kernel (Linux `arch_prctl`); [`crate::isa`]
//! asks once per process.

use crate::alloc::Aligned;
use crate::matmul::int8::kernel::{Lanes, W512};
use crate::matmul::job::Job;
use crate::quant::tiles::{Spec, ROWS};
use crate::weights::WeightView;
use std::arch::asm;
use std::arch::x86_64::*;

/// The tile configuration: tmm0–3 accumulators (16 × 16 f32), tmm4–5 activations
/// (16 × 32 bf16), tmm6–7 weights (16 pairs × 16 columns).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Activations prepared for the tile kernels: rounded to bf16 and stored tile by tile, each
/// 16 rows × 32 values contiguous (rows padded with zeros to a multiple of 16), so a tile load
/// reads one kilobyte in order.
pub struct ActBf16 {
    pub m: usize,
    pub k: usize,
    x: Aligned<u16>,
}

impl ActBf16 {
    pub fn new(x: &[f32], m: usize, k: usize) -> ActBf16 {
        Self::new_on(&crate::pool::ThreadPool::inline(), crate::isa::Isa::best(), x, m, k)
    }

    /// [`ActBf16::new`] with blocks of 16 rows converted on `pool`'s threads, rounded with
    /// `isa`'s kernels (AVX-512 at most).
    pub fn new_on(pool: &crate::pool::ThreadPool, isa: crate::isa::Isa, x: &[f32], m: usize, k: usize) -> ActBf16 {
        let mut out = Aligned::zeroed_on(pool, m.next_multiple_of(ROWS) * k);
        let op = crate::pool::SendPtr::new(&mut out);
        let isa = isa.at_most(crate::isa::Level::Avx512);
        pool.for_chunks(m.div_ceil(ROWS), 1, &|blocks| {
            let mut row_bf16 = vec![0u16; k];
            // SAFETY: a chunk of row blocks owns those blocks' tiles, a contiguous range.
            let dst = unsafe { op.slice(blocks.start * ROWS * k, blocks.len() * ROWS * k) };
            for i in blocks.start * ROWS..(blocks.end * ROWS).min(m) {
                let r = i % ROWS;
                let base = (i / ROWS - blocks.start) * ROWS * k;
                crate::ops::to_bf16(isa, &x[i * k..(i + 1) * k], &mut row_bf16);
                for (ks, vals) in row_bf16.chunks_exact(32).enumerate() {
                    dst[base + (ks * ROWS + r) * 32..][..32].copy_from_slice(vals);
                }
            }
        });
        ActBf16 { m, k, x: out }
    }

    /// The tile of rows `16·rb..` and values `32·ks..`.
    fn tile(&self, rb: usize, ks: usize) -> *const u16 {
        self.x[(rb * (self.k / 32) + ks) * 512..].as_ptr()
    }

    #[cfg(test)]
    fn get(&self, i: usize, kk: usize) -> u16 {
        self.x[((i / ROWS * (self.k / 32) + kk / 32) * ROWS + i % ROWS) * 32 + kk % 32]
    }
}

/// Unpacks weights `32·j0..32·(j0 + steps)` of a group of a tiled weight to bf16 B tiles: for
/// each 32 weights of the row, 16 rows of 64 bytes, row `p` holding weights `(2p, 2p+1)` of
/// each of the 16 weight rows.
///
/// # Safety
/// The CPU must support AVX-512 BF16; `group` holds the group's weights through step
/// `j0 + steps`; `out` holds `steps × 512` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,f16c,fma")]
unsafe fn unpack_group(spec: &Spec, group: &[u8], j0: usize, steps: usize, out: &mut [u16]) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let per_sb = spec.sb / 32;
        let gp = group.as_ptr();
        // Lane l of a quad's 16 widened values belongs to weight row 4·part + l/4.
        let mut spread = [_mm512_setzero_si512(); 4];
        for (part, sp) in spread.iter_mut().enumerate() {
            let p = 4 * part as i32;
            *sp = _mm512_setr_epi32(
                p,
                p,
                p,
                p,
                p + 1,
                p + 1,
                p + 1,
                p + 1,
                p + 2,
                p + 2,
                p + 2,
                p + 2,
                p + 3,
                p + 3,
                p + 3,
                p + 3,
            );
        }
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let off = _mm512_set1_ps(spec.offset as f32);
        for (jo, j) in (j0..j0 + steps).enumerate() {
            let h = gp.add((j / per_sb) * spec.sb_bytes());
            let jj = j % per_sb;
            let q = super::int8::avx512::block::quads(spec.format, h.add(spec.header + jj * spec.block_bytes()));
            let (s, m) = W512::scales(spec.format, h, 0, jj);
            // w = s·u + (m − s·o), per scale group (quads 0–3 are weights 0–15, quads 4–7 16–31).
            let bias = [_mm512_fnmadd_ps(s[0], off, m[0]), _mm512_fnmadd_ps(s[1], off, m[1])];
            let dst = out.as_mut_ptr().add(jo * 512);
            for (t, qt) in q.iter().enumerate() {
                let g = t / 4;
                let mut f = [_mm512_setzero_ps(); 4];
                for (part, fp) in f.iter_mut().enumerate() {
                    let u = _mm512_cvtepu8_epi32(match part {
                        0 => _mm512_extracti32x4_epi32::<0>(*qt),
                        1 => _mm512_extracti32x4_epi32::<1>(*qt),
                        2 => _mm512_extracti32x4_epi32::<2>(*qt),
                        _ => _mm512_extracti32x4_epi32::<3>(*qt),
                    });
                    let sv = _mm512_permutexvar_ps(spread[part], s[g]);
                    let bv = _mm512_permutexvar_ps(spread[part], bias[g]);
                    *fp = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), sv, bv);
                }
                // Rows 0–7 then 8–15, each row's four weights as two bf16 pairs.
                let lo: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(f[1], f[0]));
                let hi: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(f[3], f[2]));
                _mm512_storeu_si512(dst.add(64 * t) as *mut _, _mm512_permutex2var_epi32(lo, even, hi));
                _mm512_storeu_si512(dst.add(64 * t + 32) as *mut _, _mm512_permutex2var_epi32(lo, odd, hi));
            }
        }
    }
}

/// Output features `16·g..16·g+16`, inputs `32·j0..32·(j0 + steps)` of a bf16 weight stored
/// transposed (`k` rows of `n` values, `y = x · stored`) as B tiles: row `p` of a tile holds,
/// for each of the 16 features, inputs `2p` and `2p+1`: two stored rows interleaved. Features
/// past `n` are zero.
///
/// # Safety
/// The CPU must support AVX-512 BW; `data` holds `32·(j0 + steps)` rows of `n` bf16; `out`
/// holds `steps × 512` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn unpack_bf16_cols(data: &[u8], n: usize, g: usize, j0: usize, steps: usize, out: &mut [u16]) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let live = (n - g * ROWS).min(ROWS);
        let mask: __mmask16 = if live == ROWS { 0xffff } else { ((1u32 << live) - 1) as __mmask16 };
        // Word 2c takes word c of the first row, word 2c+1 word c of the second (index 32 + c).
        let order: [u16; 32] = std::array::from_fn(|i| (i / 2 + 32 * (i % 2)) as u16);
        let idx = _mm512_loadu_si512(order.as_ptr() as *const _);
        let base = data.as_ptr().add(g * ROWS * 2);
        for j in 0..steps {
            let dst = out.as_mut_ptr().add(j * 512);
            for p in 0..16 {
                let row = 32 * (j0 + j) + 2 * p;
                let s0 = _mm256_maskz_loadu_epi16(mask, base.add(row * 2 * n) as *const _);
                let s1 = _mm256_maskz_loadu_epi16(mask, base.add((row + 1) * 2 * n) as *const _);
                let v = _mm512_permutex2var_epi16(_mm512_castsi256_si512(s0), idx, _mm512_castsi256_si512(s1));
                _mm512_storeu_si512(dst.add(32 * p) as *mut _, v);
            }
        }
    }
}

/// [`unpack_bf16_cols`] for the pair of groups `g`, `g + 1` at once (`live` of their 32
/// features present, the rest zero): each stored row's 64 bytes for the pair are read in one
/// load and split into the two groups' tiles.
///
/// # Safety
/// As [`unpack_bf16_cols`]; `16·g + live <= n`; `out0` and `out1` hold `steps × 512` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn unpack_bf16_cols_pair(
    data: &[u8],
    n: usize,
    g: usize,
    live: usize,
    j0: usize,
    steps: usize,
    out0: &mut [u16],
    out1: &mut [u16],
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let mask: __mmask32 = if live >= 32 { u32::MAX } else { (1u32 << live) - 1 };
        // Word 2c of the first group's row takes word c of the first stored row, word 2c+1 word c
        // of the second (index 32 + c); the second group's, words 16 + c.
        let lo: [u16; 32] = std::array::from_fn(|i| (i / 2 + 32 * (i % 2)) as u16);
        let hi: [u16; 32] = std::array::from_fn(|i| (16 + i / 2 + 32 * (i % 2)) as u16);
        let (lo, hi) = (_mm512_loadu_si512(lo.as_ptr() as *const _), _mm512_loadu_si512(hi.as_ptr() as *const _));
        let base = data.as_ptr().add(g * ROWS * 2);
        for j in 0..steps {
            let (d0, d1) = (out0.as_mut_ptr().add(j * 512), out1.as_mut_ptr().add(j * 512));
            for p in 0..16 {
                let row = 32 * (j0 + j) + 2 * p;
                let s0 = _mm512_maskz_loadu_epi16(mask, base.add(row * 2 * n) as *const _);
                let s1 = _mm512_maskz_loadu_epi16(mask, base.add((row + 1) * 2 * n) as *const _);
                _mm512_storeu_si512(d0.add(32 * p) as *mut _, _mm512_permutex2var_epi16(s0, lo, s1));
                _mm512_storeu_si512(d1.add(32 * p) as *mut _, _mm512_permutex2var_epi16(s0, hi, s1));
            }
        }
    }
}

/// Where the weights of a `matmul` come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// A weight in tiles of this integer format.
    Tiles(&'a Spec),
    /// A bf16 weight in row layout.
    Bf16Rows,
    /// A bf16 weight stored transposed ([`crate::weights::Layout::Transposed`]).
    Bf16Cols,
    /// A bf16 weight in tiles ([`crate::quant::tiles::bf16`]): B tiles read where they lie.
    Bf16Tiles,
}

/// Depth of a pass, in 32-value steps: the B tiles of a column pair over a pass (2 × `KC`
/// KiB) stay in L1 while every row block passes by.
const KC: usize = 8;

/// Column pairs per chunk: a pass's A tiles (every row block, `KC` steps) stay in L2 while the
/// chunk's column pairs take them in turn.
const CHUNK_PAIRS: usize = 8;

/// `y[:, cols] = x · wᵀ` on AMX tiles, `cols.start` a multiple of 16.
///
/// Columns go in chunks of [`CHUNK_PAIRS`] pairs of weight groups (32 columns), and each chunk
/// in passes of up to [`KC`] steps: for each column pair the pass's tiles are unpacked to bf16,
/// then every pair of 16-row blocks accumulates over the pass in four tiles, kept between
/// passes in a scratch (the last pass of whole blocks stores to `y` directly).
///
/// # Safety
/// [`usable`] must have returned true; `w` is laid out as `src` says (for
/// [`Source::Bf16Tiles`], `cols.start` a multiple of 32); `y` is valid for `a.m` rows of `ldy`
/// floats and no other thread writes these columns.
pub(crate) unsafe fn matmul(src: Source, j: &Job<'_, &ActBf16>) {
    let Job { x: a, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = a.k;
        // The B tiles of groups `g` and `g + 1` (zero when `width` leaves it out) for steps `j0..`.
        let unpack = |g: usize, width: usize, j0: usize, steps: usize, o0: &mut [u16], o1: &mut [u16]| {
            let each = |o0: &mut [u16], o1: &mut [u16], one: &dyn Fn(usize, &mut [u16])| {
                one(g, o0);
                if width > ROWS {
                    one(g + 1, o1)
                } else {
                    o1.fill(0)
                }
            };
            match src {
                Source::Tiles(spec) => {
                    let gb = spec.group_bytes(k);
                    each(o0, o1, &|g, out| unpack_group(spec, &w.data[g * gb..(g + 1) * gb], j0, steps, out))
                }
                Source::Bf16Rows => each(o0, o1, &|g, out| {
                    crate::quant::tiles::unpack_bf16_rows(
                        w.data,
                        w.rows,
                        g,
                        k,
                        j0,
                        steps,
                        out.as_mut_ptr() as *mut u8,
                        1024,
                    )
                }),
                Source::Bf16Tiles => unreachable!("bf16 tiles are read in place"),
                Source::Bf16Cols => unpack_bf16_cols_pair(w.data, w.rows, g, width, j0, steps, o0, o1),
            }
        };
        let ksteps = k / 32;
        let rblocks = a.m.div_ceil(ROWS);
        // Tiles read in place are not unpacked; with at most two row blocks nothing reuses a pass's
        // weight tiles, so one pass covers every input and the sums stay in tiles throughout.
        let in_place = matches!(src, Source::Bf16Tiles);
        assert!(
            !in_place
                || (cols.start.is_multiple_of(2 * ROWS) && w.data.len() >= crate::quant::tiles::bf16::bytes(w.rows, k))
        );
        let kc = if in_place && rblocks <= 2 { ksteps } else { KC.min(ksteps) };
        let mut b = Aligned::<u16>::zeroed(if in_place { 0 } else { 2 * kc * 512 });
        // Sums of the chunk's column pairs: 16 × 32 floats (128-byte rows) per row block and pair.
        let pair_floats = rblocks * ROWS * 32;
        let mut c = Aligned::<f32>::zeroed(cols.len().div_ceil(2 * ROWS).min(CHUNK_PAIRS) * pair_floats);
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        let mut n0 = cols.start;
        while n0 < cols.end {
            let n1 = (n0 + CHUNK_PAIRS * 2 * ROWS).min(cols.end);
            // Blocks `rb..end` whose sums go straight to `y` (whole 16 × 32 tiles); the ragged
            // ones at the edges stay in the scratch and are copied at the end.
            let whole = |width: usize, end: usize| width == 2 * ROWS && end * ROWS <= a.m;
            let mut k0 = 0;
            while k0 < ksteps {
                let steps = (ksteps - k0).min(kc);
                let mut n = n0;
                while n < n1 {
                    let g = n / ROWS;
                    let width = (n1 - n).min(2 * ROWS);
                    let (b0, b1, bs) = if in_place {
                        // The pair of groups `g` (even) and `g + 1`: their tiles alternate.
                        let b0 = (w.data.as_ptr() as *const u16).add((g / 2 * ksteps + k0) * 1024);
                        (b0, b0.add(512), 2048)
                    } else {
                        let (b0s, b1s) = b.split_at_mut(kc * 512);
                        unpack(g, width, k0, steps, &mut b0s[..steps * 512], &mut b1s[..steps * 512]);
                        (b.as_ptr(), b.as_ptr().add(kc * 512), 1024)
                    };
                    let cp = c.as_mut_ptr().add((n - n0) / (2 * ROWS) * pair_floats);
                    let mut rb = 0;
                    while rb < rblocks {
                        let two = rb + 1 < rblocks;
                        let c0 = cp.add(rb * ROWS * 32);
                        let c1 = c0.add(ROWS * 32);
                        let end = if two { rb + 2 } else { rb + 1 };
                        let (d0, d1, ds) = if k0 + steps == ksteps && whole(width, end) {
                            let d0 = y.add(rb * ROWS * ldy + n);
                            (d0, d0.add(ROWS * ldy), 4 * ldy)
                        } else {
                            (c0, c1, 128)
                        };
                        let from = (k0 > 0).then_some(c0 as *const f32);
                        let (a0, a1) = (a.tile(rb, k0), if two { a.tile(rb + 1, k0) } else { std::ptr::null() });
                        block_pass(two, from, a0, a1, b0, b1, bs, steps, d0, d1, ds);
                        rb = end;
                    }
                    n += width;
                }
                k0 += steps;
            }
            let mut n = n0;
            while n < n1 {
                let width = (n1 - n).min(2 * ROWS);
                let cp = c.as_ptr().add((n - n0) / (2 * ROWS) * pair_floats);
                let mut rb = 0;
                while rb < rblocks {
                    let end = if rb + 1 < rblocks { rb + 2 } else { rb + 1 };
                    if !whole(width, end) {
                        for i in rb * ROWS..(end * ROWS).min(a.m) {
                            std::ptr::copy_nonoverlapping(cp.add(i * 32), y.add(i * ldy + n), width);
                        }
                    }
                    rb = end;
                }
                n += width;
            }
            n0 = n1;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// One pass of one or two (`two`) 16-row blocks against a column pair: the four sum tiles start
/// at zero (`from` None) or from the sums at `from` (the second block's 512 floats further,
/// 128-byte rows), take `steps` products of A tiles from `a0` (and `a1`, 1 KiB apart) with B
/// tiles from `b0` and `b1` (`bs` bytes apart), and are stored to `d0` (and `d1`) with rows
/// `ds` bytes apart.
///
/// # Safety
/// The tile configuration is loaded; every pointer is valid for what it names over `steps`
/// tiles (`a1`, `d1` and the second block at `from` only when `two`).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn block_pass(
    two: bool,
    from: Option<*const f32>,
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    bs: usize,
    steps: usize,
    d0: *mut f32,
    d1: *mut f32,
    ds: usize,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match from {
            None => asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem)),
            Some(c0) => {
                asm!(
                    "tileloadd tmm0, [{c0} + {cs} * 1]",
                    "tileloadd tmm1, [{c0} + {cs} * 1 + 64]",
                    c0 = in(reg) c0,
                    cs = in(reg) 128usize,
                    options(nostack, readonly)
                );
                if two {
                    asm!(
                        "tileloadd tmm2, [{c1} + {cs} * 1]",
                        "tileloadd tmm3, [{c1} + {cs} * 1 + 64]",
                        c1 = in(reg) c0.add(512),
                        cs = in(reg) 128usize,
                        options(nostack, readonly)
                    );
                }
            }
        }
        if two {
            asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {s} * 1]",
                "tileloadd tmm6, [{b0} + {s} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s} * 1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 1024",
                "add {a1}, 1024",
                "add {b0}, {bs}",
                "add {b1}, {bs}",
                "dec {n}",
                "jnz 2b",
                "tilestored [{d0} + {ds} * 1], tmm0",
                "tilestored [{d0} + {ds} * 1 + 64], tmm1",
                "tilestored [{d1} + {ds} * 1], tmm2",
                "tilestored [{d1} + {ds} * 1 + 64], tmm3",
                a0 = inout(reg) a0 => _,
                a1 = inout(reg) a1 => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                bs = in(reg) bs,
                n = inout(reg) steps => _,
                d0 = in(reg) d0,
                d1 = in(reg) d1,
                s = in(reg) 64usize,
                ds = in(reg) ds,
                options(nostack)
            );
        } else {
            // One row block (decode of up to 16 sequences): the weight tiles stream from memory,
            // so the 2 KiB two steps ahead of `b0` are fetched meanwhile (the pair's next tiles
            // when read in place; harmless otherwise).
            asm!(
                "2:",
                "prefetcht0 [{b0} + 4096]",
                "prefetcht0 [{b0} + 4160]",
                "prefetcht0 [{b0} + 4224]",
                "prefetcht0 [{b0} + 4288]",
                "prefetcht0 [{b0} + 4352]",
                "prefetcht0 [{b0} + 4416]",
                "prefetcht0 [{b0} + 4480]",
                "prefetcht0 [{b0} + 4544]",
                "prefetcht0 [{b0} + 4608]",
                "prefetcht0 [{b0} + 4672]",
                "prefetcht0 [{b0} + 4736]",
                "prefetcht0 [{b0} + 4800]",
                "prefetcht0 [{b0} + 4864]",
                "prefetcht0 [{b0} + 4928]",
                "prefetcht0 [{b0} + 4992]",
                "prefetcht0 [{b0} + 5056]",
                "prefetcht0 [{b0} + 5120]",
                "prefetcht0 [{b0} + 5184]",
                "prefetcht0 [{b0} + 5248]",
                "prefetcht0 [{b0} + 5312]",
                "prefetcht0 [{b0} + 5376]",
                "prefetcht0 [{b0} + 5440]",
                "prefetcht0 [{b0} + 5504]",
                "prefetcht0 [{b0} + 5568]",
                "prefetcht0 [{b0} + 5632]",
                "prefetcht0 [{b0} + 5696]",
                "prefetcht0 [{b0} + 5760]",
                "prefetcht0 [{b0} + 5824]",
                "prefetcht0 [{b0} + 5888]",
                "prefetcht0 [{b0} + 5952]",
                "prefetcht0 [{b0} + 6016]",
                "prefetcht0 [{b0} + 6080]",
                "tileloadd tmm4, [{a0} + {s} * 1]",
                "tileloadd tmm6, [{b0} + {s} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "add {a0}, 1024",
                "add {b0}, {bs}",
                "add {b1}, {bs}",
                "dec {n}",
                "jnz 2b",
                "tilestored [{d0} + {ds} * 1], tmm0",
                "tilestored [{d0} + {ds} * 1 + 64], tmm1",
                a0 = inout(reg) a0 => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                bs = in(reg) bs,
                n = inout(reg) steps => _,
                d0 = in(reg) d0,
                s = in(reg) 64usize,
                ds = in(reg) ds,
                options(nostack)
            );
        }
    }
}

/// Steps (of 32 inputs) per pass of [`matmul_cols_split`]: the pass's tiles of every column
/// group (`groups × KS` KiB) stay in L2.
pub const KS: usize = 16;

/// `c += x[:, 32·j0..32·j1] · stored[32·j0..32·j1, :]` for a bf16 weight stored transposed
/// (`w.cols` rows of `w.rows` values): a share of the inner dimension for every output column,
/// for products whose inner dimension dwarfs their outputs (the vocabulary of the output head).
/// Each pass unpacks its stored rows, read in order, for all column groups, then every pair of
/// 16-row blocks accumulates over the pass in tiles kept in `c` between passes. `c` holds, per
/// pair of column groups, 32-float rows for every row of `a` padded to a whole block.
///
/// # Safety
/// AMX must be usable (`Level::Amx` supported); `w.cols == a.k`; `c` holds
/// `w.rows.div_ceil(32) · a.m.div_ceil(16) · 512` floats.
pub unsafe fn matmul_cols_split(a: &ActBf16, w: &WeightView, j0: usize, j1: usize, c: &mut [f32]) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let n = w.rows;
        let (groups, pairs, rblocks) = (n.div_ceil(ROWS), n.div_ceil(2 * ROWS), a.m.div_ceil(ROWS));
        assert!(c.len() >= pairs * rblocks * 512 && w.cols == a.k && j1 <= a.k / 32);
        let mut b = Aligned::<u16>::zeroed(2 * pairs * KS * 512);
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        let mut k0 = j0;
        while k0 < j1 {
            let steps = (j1 - k0).min(KS);
            for g in 0..2 * pairs {
                let out = &mut b[g * KS * 512..][..steps * 512];
                if g < groups {
                    unpack_bf16_cols(w.data, n, g, k0, steps, out);
                } else {
                    out.fill(0);
                }
            }
            for pair in 0..pairs {
                let b0 = b.as_ptr().add(2 * pair * KS * 512);
                let b1 = b0.add(KS * 512);
                let mut rb = 0;
                while rb < rblocks {
                    let two = rb + 1 < rblocks;
                    let c0 = c.as_mut_ptr().add((pair * rblocks + rb) * 512);
                    let c1 = c0.add(512);
                    let a1 = if two { a.tile(rb + 1, k0) } else { std::ptr::null() };
                    block_pass(two, Some(c0), a.tile(rb, k0), a1, b0, b1, 1024, steps, c0, c1, 128);
                    rb += if two { 2 } else { 1 };
                }
            }
            k0 += steps;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(test)]
/// The reference of [`matmul`]: the f32 product of bf16-rounded weights and activations, in
/// order.
pub fn reference(spec: &Spec, a: &ActBf16, w: &WeightView, y: &mut [f32], ldy: usize) {
    let k = a.k;
    let gb = spec.group_bytes(k);
    for c in 0..w.rows {
        let group = &w.data[(c / ROWS) * gb..(c / ROWS + 1) * gb];
        let mut row = vec![0f32; k];
        for (j, blk) in row.chunks_exact_mut(32).enumerate() {
            let up = crate::quant::tiles::unpack(spec, group, j, c % ROWS);
            for (i, v) in blk.iter_mut().enumerate() {
                let g = if spec.g16 { i / 16 } else { 0 };
                let wv = (up.u[i] as f32).mul_add(up.s[g], (-up.s[g]).mul_add(spec.offset as f32, up.m[g]));
                *v = crate::format::bf16_to_f32(crate::format::f32_to_bf16(wv));
            }
        }
        for i in 0..a.m {
            y[i * ldy + c] =
                row.iter().enumerate().map(|(kk, &wv)| crate::format::bf16_to_f32(a.get(i, kk)) * wv).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rand_vec;
    use crate::format::Format;
    use crate::quant::dequant::random_blocks;
    use crate::quant::{has_q8_kernel, packed_bytes, repack_into, tiles};

    /// The AMX kernel equals the f32 product of the bf16-rounded operands (up to summation
    /// order), for every format, on shapes with partial tiles in both directions and inner
    /// dimensions of several passes.
    #[test]
    fn amx_kernel_matches_its_reference() {
        if !crate::isa::Level::Amx.supported() {
            eprintln!("no AMX here (or QWICK_MAX_ISA caps it): skipped");
            return;
        }
        for &f in Format::ALL.iter().filter(|f| has_q8_kernel(**f)) {
            let spec = tiles::spec(f).unwrap();
            // The last three shapes take several passes of the kernel (8 steps of 32 each, the
            // last partial); the last has two chunks of columns (8 pairs, then a ragged one).
            for &(m, n, k) in
                &[(32, 16, 256), (37, 40, 512), (50, 33, 768), (16, 16, 4352), (40, 20, 4352), (33, 300, 768)]
            {
                let src = random_blocks(f, n * k / f.block(), (m + n * k) as u64);
                let rows = WeightView::new(f, &src, n, k);
                let mut tiled = vec![0u8; packed_bytes(&rows, false).unwrap()];
                repack_into(&rows, &mut tiled);
                let w = WeightView::tiles(f, &tiled, n, k);
                let x = rand_vec(m * k, 11 + m as u64);
                let a = ActBf16::new(&x, m, k);
                let mut want = vec![0f32; m * n];
                reference(spec, &a, &w, &mut want, n);
                let mut got = vec![f32::NAN; m * n];
                // SAFETY: AMX is usable (checked above); `w` is in tiles; `got` holds m × n.
                unsafe {
                    matmul(
                        Source::Tiles(spec),
                        &Job { x: &a, ldx: k, m, w: &w, y: got.as_mut_ptr(), ldy: n, cols: 0..n },
                    )
                };
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt(),
                        "{f} m{m} n{n} k{k} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
