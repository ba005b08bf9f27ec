//! The ops, as dispatches on a [`Recorder`]: each compiles its WGSL once per device and checks
//! the shapes it is given against the buffers.

use super::formats;
use super::recorder::Recorder;
use super::Buf;
use crate::attention::KvLayout;
use crate::format::Format;

const MATMUL: &str = include_str!("wgsl/matmul.wgsl");
const ACCUMULATE: &str = include_str!("wgsl/accumulate.wgsl");
const MATMUL_IO: &str = include_str!("wgsl/matmul_io.wgsl");
const MATMUL_SG: &str = include_str!("wgsl/matmul_sg.wgsl");
const RMS_NORM: &str = include_str!("wgsl/rms_norm.wgsl");
const ROPE: &str = include_str!("wgsl/rope.wgsl");
const ELEMENTWISE: &str = include_str!("wgsl/elementwise.wgsl");
const KV_WRITE: &str = include_str!("wgsl/kv_write.wgsl");
const ATTENTION: &str = include_str!("wgsl/attention.wgsl");
const ATTENTION_MERGE: &str = include_str!("wgsl/attention_merge.wgsl");
const ATTENTION_TILE: &str = include_str!("wgsl/attention_tile.wgsl");
/// The bindings and K/V row addressing both attention kernels share.
const PAGED: &str = include_str!("wgsl/paged.wgsl");
/// attention.wgsl's last step unsplit: the output.
const FINISH_OUT: &str = "@group(0) @binding(5) var<storage, read_write> out: array<f32>;
fn finish(id: u32, qo: u32, t: u32, m: f32, l: f32, acc: array<f32, 4>) {
    for (var u = 0u; u < 4u; u++) { let j = t + 64u * u; if (j < p.d) { out[qo + j] = acc[u] / l; } }
}";
/// attention.wgsl's last step split: the split's maximum, sum and values, for the merge.
const FINISH_PART: &str = "@group(0) @binding(5) var<storage, read_write> part: array<f32>;
fn finish(id: u32, qo: u32, t: u32, m: f32, l: f32, acc: array<f32, 4>) {
    let o = id * (p.d + 2u);
    if (t == 0u) { part[o] = m; part[o + 1u] = l; }
    for (var u = 0u; u < 4u; u++) { let j = t + 64u * u; if (j < p.d) { part[o + 2u + j] = acc[u]; } }
}";
const ROWS: &str = include_str!("wgsl/rows.wgsl");
const READ: &str = include_str!("wgsl/read.wgsl");
const PER_ITEM: &str = include_str!("wgsl/per_item.wgsl");
const ROUTE: &str = include_str!("wgsl/route.wgsl");
const COMBINE: &str = include_str!("wgsl/combine.wgsl");
const MOE_MATMUL: &str = include_str!("wgsl/moe_matmul.wgsl");
const TILE: &str = include_str!("wgsl/tile.wgsl");
const MATMUL_TILE: &str = include_str!("wgsl/matmul_tile.wgsl");
const MOE_SORT: &str = include_str!("wgsl/moe_sort.wgsl");
const MOE_TILE: &str = include_str!("wgsl/moe_tile.wgsl");
const TOP: &str = include_str!("wgsl/top.wgsl");

/// Entries one workgroup of the top-k kernel ranks (`SEG` in top.wgsl).
const TOP_SEGMENT: usize = 4096;
/// The most entries a row [`Recorder::top`] keeps.
pub const MAX_TOP: usize = 256;

/// Activation rows of a tile of the tiled products (`TM` in tile.wgsl): from this many rows on
/// (a prefill), a product is taken by tiles, each weight read once per this many rows, rather
/// than by the row-at-a-time kernels, which read it once per 8.
pub const TILE_ROWS: usize = 32;

/// A kernel of one item per invocation: [`PER_ITEM`]'s entry point around `src`'s `item`.
fn per_item(src: &str) -> String {
    format!("{src}\n{PER_ITEM}")
}

/// `y = x · Wᵀ` over rows of `x` (`m` rows of `k` values, `ldx` apart, from element `x_off`) and
/// a weight of `n` rows in its stored `format` at byte `w_off` of `w`, into `y` (`ldy` apart,
/// from element `y_off`).
pub struct Matmul<'a> {
    pub x: &'a Buf,
    pub x_off: usize,
    pub ldx: usize,
    pub m: usize,
    pub w: &'a Buf,
    pub w_off: u64,
    pub format: Format,
    pub n: usize,
    pub k: usize,
    pub y: &'a Buf,
    pub y_off: usize,
    pub ldy: usize,
}

/// Attention of `n` query tokens (`q`: `[n, heads · d]`) over one layer's paged cache (`k`,
/// `v`: `[blocks, kv_heads, block_size, d]` of `format` elements); `meta` holds the tokens' positions, their
/// sequences, each sequence's start in the block tables and the tables ([`Attend::meta`]).
pub struct Attend<'a> {
    pub q: &'a Buf,
    pub k: &'a Buf,
    pub v: &'a Buf,
    pub meta: &'a Buf,
    pub out: &'a Buf,
    pub n: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub block_size: usize,
    pub scale: f32,
    pub seqs: usize,
    /// The cache's elements: f32, f16 or bf16.
    pub format: Format,
    /// The furthest position of the `n` tokens (none may lie past it).
    pub max_pos: usize,
    /// How many workgroups share each (token, head)'s positions ([`Attend::splits`]).
    pub splits: usize,
    /// Prefill tiles ([`Attend::tiles`]) and how many there are: unsplit attention then reads
    /// each key and value once per tile rather than once per token.
    pub tiles: Option<(&'a Buf, usize)>,
}

impl Attend<'_> {
    /// Splits of the positions for `n` tokens of `heads` heads, the furthest at `max_pos`: as
    /// many as bring the workgroups to about 256 (a GPU's cores kept busy when few tokens
    /// decode at depth), each split at least 256 positions.
    pub fn splits(n: usize, heads: usize, max_pos: usize) -> usize {
        256usize.div_ceil(n * heads).min((max_pos + 1).div_ceil(256)).max(1)
    }

    /// Tiles of up to 8 consecutive tokens of one sequence, as (first token, count) pairs, for
    /// tokens of sequences `seq_of_token` (each sequence's tokens consecutive, at consecutive
    /// positions, as a batch lays out its spans); `None` when tiles would hold one token each
    /// on average less than two (decoding), where they gain nothing.
    pub fn tiles(seq_of_token: &[u32]) -> Option<Vec<u32>> {
        let mut out: Vec<u32> = vec![];
        for (i, &s) in seq_of_token.iter().enumerate() {
            let joins = out.len() >= 2 && {
                let (first, count) = (out[out.len() - 2], out[out.len() - 1]);
                count < 8 && seq_of_token[first as usize] == s
            };
            if joins {
                *out.last_mut().unwrap() += 1;
            } else {
                out.extend([i as u32, 1]);
            }
        }
        (out.len() <= seq_of_token.len()).then_some(out)
    }

    /// The `meta` words for tokens at `positions` of sequences `seq_of_token` with these block
    /// tables.
    pub fn meta(positions: &[u32], seq_of_token: &[u32], tables: &[&[u32]]) -> Vec<u32> {
        let mut out =
            Vec::with_capacity(2 * positions.len() + tables.len() + tables.iter().map(|t| t.len()).sum::<usize>());
        out.extend_from_slice(positions);
        out.extend_from_slice(seq_of_token);
        let mut start = 0u32;
        for t in tables {
            out.push(start);
            start += t.len() as u32;
        }
        for t in tables {
            out.extend_from_slice(t);
        }
        out
    }
}

/// WGSL for a KV cache of `f` elements (f32, f16, or bf16 rounded to nearest, ties to even, as
/// the CPU cache stores them): `PER_WORD` elements a 32-bit word, and for the writer
/// `encode(i)`, the word of the source values from index `i` on, or for the readers
/// `element(c, i)`, value `i` of cache `c` (0: K, 1: V) as f32.
fn kv_elements(f: Format, writer: bool) -> String {
    let (per_word, encode, element) = match f {
        Format::F32 => (
            1,
            "fn encode(i: u32) -> u32 { return bitcast<u32>(src[i]); }",
            "fn element(c: u32, i: u32) -> f32 { if (c == 0u) { return bitcast<f32>(kc[i]); } return bitcast<f32>(vc[i]); }",
        ),
        Format::F16 => (
            2,
            "fn encode(i: u32) -> u32 { return pack2x16float(vec2<f32>(src[i], src[i + 1u])); }",
            "fn element(c: u32, i: u32) -> f32 { return unpack2x16float(word(c, i >> 1u))[i & 1u]; }",
        ),
        Format::BF16 => (
            2,
            "fn bf16(x: f32) -> u32 { let b = bitcast<u32>(x); return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u; }
             fn encode(i: u32) -> u32 { return bf16(src[i]) | (bf16(src[i + 1u]) << 16u); }",
            "fn element(c: u32, i: u32) -> f32 {
                 let w = word(c, i >> 1u);
                 return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));
             }",
        ),
        _ => panic!("a KV cache of {f} elements"),
    };
    // One cache read per element (`select` would read both).
    const WORD: &str = "fn word(c: u32, w: u32) -> u32 { if (c == 0u) { return kc[w]; } return vc[w]; }";
    let read = if per_word == 1 { element.to_string() } else { format!("{WORD}\n{element}") };
    format!("const PER_WORD: u32 = {per_word}u;\n{}\n", if writer { encode.to_string() } else { read })
}

fn u(v: usize) -> u32 {
    u32::try_from(v).expect("a GPU kernel index beyond 32 bits")
}

fn fits(what: &str, b: &Buf, elems: usize) {
    assert!(b.len_f32() >= elems, "{what}: {elems} values asked of a buffer of {}", b.len_f32());
}

impl Recorder<'_> {
    /// See [`Matmul`]. Rows of the weight start at multiples of 4 bytes ([`formats::reads`]).
    pub fn matmul(&mut self, j: &Matmul) {
        if j.m == 0 || j.n == 0 {
            return;
        }
        assert!(formats::reads(j.format, j.k), "the GPU products do not read {} rows of {} weights", j.format, j.k);
        assert!(j.ldx >= j.k && j.ldy >= j.n, "matmul strides smaller than the rows");
        let row_bytes = j.format.row_bytes(j.k) as u64;
        assert!(j.w_off + row_bytes * j.n as u64 <= j.w.bytes, "a weight past the end of its buffer");
        fits("matmul x", j.x, j.x_off + (j.m.max(1) - 1) * j.ldx + j.k);
        fits("matmul y", j.y, j.y_off + (j.m.max(1) - 1) * j.ldy + j.n);
        let f = j.format;
        let (chunk_bytes, per_block) = formats::chunk_geometry(f);
        let geometry = [
            u(j.m),
            u(j.n),
            u(j.k),
            u(row_bytes as usize),
            u(j.w_off as usize),
            chunk_bytes,
            per_block,
            u(j.x_off),
            u(j.ldx),
            u(j.y_off),
            u(j.ldy),
        ];
        if j.m >= TILE_ROWS {
            let (name, tile) = self.tile_kernel();
            let pipe = self.gpu.pipeline(&format!("matmul_{name}_{f}"), || {
                format!("{tile}\n{}\n{MATMUL_IO}\n{MATMUL_TILE}", formats::wgsl(f))
            });
            let groups = j.n.div_ceil(64) * j.m.div_ceil(TILE_ROWS);
            self.dispatch(pipe, &geometry, &[j.x, j.w, j.y], u(groups));
            return;
        }
        // With subgroups, a subgroup a row and `tpr` rows a workgroup; without, `tpr`
        // invocations a row: about its chunks of 32, a power of two up to 64.
        let (pipe, tpr, rows_per_group) = match self.gpu.subgroup_rows {
            Some(rows) => {
                let src = || format!("{}\n{MATMUL_IO}\n{MATMUL_SG}\n{ACCUMULATE}", formats::wgsl(f));
                (self.gpu.pipeline(&format!("matmul_sg_{f}"), src), rows, rows as usize)
            }
            None => {
                let tpr = j.k.div_ceil(32).next_power_of_two().min(64) as u32;
                (
                    self.gpu.pipeline(&format!("matmul_{f}"), || {
                        format!("{}\n{MATMUL_IO}\n{MATMUL}\n{ACCUMULATE}", formats::wgsl(f))
                    }),
                    tpr,
                    64 / tpr as usize,
                )
            }
        };
        let mut params = geometry.to_vec();
        params.push(tpr);
        let groups = j.n.div_ceil(rows_per_group) * j.m.div_ceil(8);
        self.dispatch(pipe, &params, &[j.x, j.w, j.y], u(groups));
    }

    /// The tiled products' inner kernel ([`TILE`]) taking its products in f16 where the
    /// device takes f16 arithmetic ([`super::Gpu::f16`]), else in f32: its name and source.
    fn tile_kernel(&self) -> (&'static str, String) {
        if self.gpu.f16 {
            ("tile_f16", format!("enable f16;\nalias H = f16;\n{TILE}"))
        } else {
            ("tile", format!("alias H = f32;\n{TILE}"))
        }
    }

    /// RMSNorm of `rows` rows of `d` values of `x` into `out` (`weight`: `d` values).
    pub fn rms_norm(&mut self, x: &Buf, weight: &Buf, out: &Buf, rows: usize, d: usize, eps: f32) {
        fits("rms_norm x", x, rows * d);
        fits("rms_norm out", out, rows * d);
        let pipe = self.gpu.pipeline("rms_norm", || {
            RMS_NORM
                .replace("#OUT", "@group(0) @binding(3) var<storage, read_write> out: array<f32>;")
                .replace("#STORE", "out[base + i]")
        });
        self.dispatch(pipe, &[u(rows), u(d), eps.to_bits()], &[x, weight, out], u(rows));
    }

    /// RMSNorm of `rows` rows of `d` values of `x`, in place (per-head q and k norms).
    pub fn rms_norm_inplace(&mut self, x: &Buf, weight: &Buf, rows: usize, d: usize, eps: f32) {
        fits("rms_norm x", x, rows * d);
        let pipe =
            self.gpu.pipeline("rms_norm_inplace", || RMS_NORM.replace("#OUT", "").replace("#STORE", "x[base + i]"));
        self.dispatch(pipe, &[u(rows), u(d), eps.to_bits()], &[x, weight], u(rows));
    }

    /// Rotates each head (`2 · half` values) of the `n` rows of `width` values of `x` by its
    /// token's angles: `cs` holds `[n, half]` cosines, then `[n, half]` sines.
    pub fn rope(&mut self, x: &Buf, cs: &Buf, n: usize, width: usize, half: usize) {
        assert!(width.is_multiple_of(2 * half), "rope over rows that are not whole heads");
        fits("rope x", x, n * width);
        fits("rope angles", cs, 2 * n * half);
        let pipe = self.gpu.pipeline("rope", || per_item(ROPE));
        self.dispatch(pipe, &[u(n), u(width), u(half)], &[x, cs], u((n * width / 2).div_ceil(64)));
    }

    /// `g = silu(g) · up` over the first `count` values.
    pub fn silu_mul(&mut self, g: &Buf, up: &Buf, count: usize) {
        self.elementwise("silu_mul", "g / (1.0 + exp(-g)) * b[i]", g, up, count);
    }

    /// `x += y` over the first `count` values.
    pub fn add(&mut self, x: &Buf, y: &Buf, count: usize) {
        self.elementwise("add", "g + b[i]", x, y, count);
    }

    fn elementwise(&mut self, name: &str, op: &str, a: &Buf, b: &Buf, count: usize) {
        fits(name, a, count);
        fits(name, b, count);
        let pipe = self.gpu.pipeline(name, || per_item(&ELEMENTWISE.replace("#OP", op)));
        self.dispatch(pipe, &[u(count)], &[a, b], u(count.div_ceil(64)));
    }

    /// Writes `n` rows of `kv_heads · head_dim` values of `src` to the cache slots `slots` of
    /// `cache` (placed as `layout` says, of `format` elements: f32, f16 or bf16).
    pub fn kv_write(&mut self, src: &Buf, slots: &Buf, cache: &Buf, n: usize, layout: KvLayout, format: Format) {
        let KvLayout { block_size, kv_heads, head_dim: d } = layout;
        assert!(d.is_multiple_of(2), "a KV cache of odd head dimensions");
        fits("kv_write src", src, n * kv_heads * d);
        let pipe = self
            .gpu
            .pipeline(&format!("kv_write_{format}"), || per_item(&format!("{}{KV_WRITE}", kv_elements(format, true))));
        let params = [u(n), u(kv_heads), u(d), u(block_size)];
        let words = n * kv_heads * d * format.block_bytes() / 4;
        self.dispatch(pipe, &params, &[src, slots, cache], u(words.div_ceil(64)));
    }

    /// See [`Attend`]. Head dimensions up to 256.
    pub fn attend(&mut self, a: &Attend) {
        assert!(a.d <= 256 && a.heads.is_multiple_of(a.kv_heads), "attention over heads of {} values", a.d);
        fits("attention q", a.q, a.n * a.heads * a.d);
        fits("attention out", a.out, a.n * a.heads * a.d);
        let (f, splits) = (a.format, a.splits.max(1));
        let kernel = |finish: &str| format!("{}{PAGED}\n{finish}\n{ATTENTION}", kv_elements(f, false));
        // Each split a whole number of 64-position windows, together reaching the furthest.
        let span = (a.max_pos + 1).div_ceil(splits).next_multiple_of(64);
        let params = [
            u(a.n),
            u(a.heads),
            u(a.kv_heads),
            u(a.d),
            u(a.block_size),
            a.scale.to_bits(),
            u(a.seqs),
            u(splits),
            u(span),
        ];
        let items = a.n * a.heads;
        if let (Some((tiles, count)), 1) = (a.tiles, splits) {
            let pipe = self.gpu.pipeline(&format!("attention_tile_{f}"), || {
                format!("{}{PAGED}\n{ATTENTION_TILE}", kv_elements(f, false))
            });
            let params =
                [u(a.n), u(a.heads), u(a.kv_heads), u(a.d), u(a.block_size), a.scale.to_bits(), u(a.seqs), u(count)];
            self.dispatch(pipe, &params, &[a.q, a.k, a.v, a.meta, tiles, a.out], u(count * a.heads));
            return;
        }
        if splits == 1 {
            let pipe = self.gpu.pipeline(&format!("attention_{f}"), || kernel(FINISH_OUT));
            self.dispatch(pipe, &params, &[a.q, a.k, a.v, a.meta, a.out], u(items));
            return;
        }
        // The splits' records live until the recorded work has run (the dispatches hold them).
        let part = self.gpu.zeros(4 * (items * splits * (a.d + 2)) as u64).expect("attention's split records");
        let pipe = self.gpu.pipeline(&format!("attention_split_{f}"), || kernel(FINISH_PART));
        self.dispatch(pipe, &params, &[a.q, a.k, a.v, a.meta, &part], u(items * splits));
        let merge = self.gpu.pipeline("attention_merge", || per_item(ATTENTION_MERGE));
        self.dispatch(merge, &[u(items), u(a.d), u(splits)], &[&part, a.out], u((items * a.d).div_ceil(64)));
    }
}

impl Recorder<'_> {
    /// Row `rows[i]` of `x` (rows of `width` values) into row `i` of `out`.
    pub fn gather(&mut self, x: &Buf, out: &Buf, width: usize, rows: &Buf, n: usize) {
        fits("gather out", out, n * width);
        let pipe = self.gpu.pipeline("gather", || per_item(&ROWS.replace("#BODY", "b[id] = a[idx[i] * p.width + j];")));
        self.dispatch(pipe, &[u(n), u(width)], &[x, out, rows], u((n * width).div_ceil(64)));
    }

    /// `out[t] += w · y[i]` for the `n` pairs `(t, w)` of `pairs` (`t`, then `w`'s f32 bits),
    /// rows of `width` values; no `t` twice.
    pub fn scatter_add(&mut self, out: &Buf, y: &Buf, width: usize, pairs: &Buf, n: usize) {
        fits("scatter_add y", y, n * width);
        let body = "let o = idx[2u * i] * p.width + j; a[o] = a[o] + bitcast<f32>(idx[2u * i + 1u]) * b[id];";
        let pipe = self.gpu.pipeline("scatter_add", || per_item(&ROWS.replace("#BODY", body)));
        self.dispatch(pipe, &[u(n), u(width)], &[out, y, pairs], u((n * width).div_ceil(64)));
    }
}

impl Recorder<'_> {
    /// The `k` highest-ranked values of each of the `rows` rows of `len` values of `x`, in the
    /// sampler's order (higher value first, ties to the lower index, NaN as -inf and written as
    /// -inf), as `[rows, k]` (index, value bits) pairs in the buffer returned; index
    /// `u32::MAX` past a row's last value. Each pass ranks segments of a row apart and keeps
    /// each one's top `k`; passes repeat over their own output until one segment is left.
    pub fn top(&mut self, x: &Buf, rows: usize, len: usize, k: usize) -> Buf {
        assert!((1..=MAX_TOP).contains(&k), "the top {k} of a row");
        fits("top x", x, rows * len);
        let pipe = self.gpu.pipeline("top", || TOP.to_string());
        let (mut src, mut len, mut raw) = (x.clone(), len, 1);
        loop {
            let segs = len.div_ceil(TOP_SEGMENT).max(1);
            let dst = self.gpu.zeros(8 * (rows * segs * k) as u64).expect("the top-k pairs");
            let params = [u(rows), u(len), u(k), u(segs), raw, f32::NEG_INFINITY.to_bits()];
            self.dispatch(pipe.clone(), &params, &[&src, &dst], u(rows * segs));
            if segs == 1 {
                return dst;
            }
            // Each pass leaves at most len / 16 + k entries (k ≤ SEG / 16): fewer each time.
            (src, len, raw) = (dst, segs * k, 0);
        }
    }

    /// Reads every byte of `src` once (see [`super::Gpu::read_bandwidth`]); `out` is written
    /// only in theory.
    pub(crate) fn read_all(&mut self, src: &Buf, out: &Buf) {
        let words4 = u(src.bytes as usize / 16);
        let groups = 1024u32;
        let pipe = self.gpu.pipeline("read", || READ.to_string());
        self.dispatch(pipe, &[words4, groups * 256], &[src, out], groups);
    }
}

/// The experts' products of a MoE block for every (token, chosen expert) pair: `y[q] = x_q ·
/// W_eᵀ`, `e` the pair's expert in `route` ([`Recorder::route`]), `x_q` its token's row of `x`
/// (`per_token`) or its own row; the experts' weights (`n` rows of `k` each, `format`) one after
/// another in `w`. With `sorted` (the pairs sorted by expert, [`Recorder::sort_pairs`]) the
/// products are taken by tiles of each expert's pairs, its weights read once per
/// [`TILE_ROWS`] of them; without, pair by pair.
pub struct MoeMatmul<'a> {
    pub x: &'a Buf,
    pub w: &'a Buf,
    pub route: &'a Buf,
    pub y: &'a Buf,
    pub pairs: usize,
    pub topk: usize,
    pub per_token: bool,
    pub format: Format,
    pub n: usize,
    pub k: usize,
    pub experts: usize,
    pub sorted: Option<&'a Buf>,
}

/// Words of the buffer [`Recorder::sort_pairs`] writes for `pairs` pairs over `experts`
/// experts.
pub fn sorted_pairs_words(pairs: usize, experts: usize) -> usize {
    pairs + 2 * (experts + 1)
}

/// The most experts [`Recorder::sort_pairs`] sorts among (its counts' workgroup array).
pub const SORT_EXPERTS: usize = 1024;

impl Recorder<'_> {
    /// Routes `n` tokens: softmax of their router `logits` (`[n, experts]`, overwritten), the
    /// top `k` experts and their weights (renormalised when `norm`) into `route` as (expert,
    /// weight bits) pairs, `[n, k]`.
    pub fn route(&mut self, logits: &Buf, route: &Buf, n: usize, experts: usize, k: usize, norm: bool) {
        fits("route logits", logits, n * experts);
        fits("route", route, 2 * n * k);
        let pipe = self.gpu.pipeline("route", || per_item(ROUTE));
        self.dispatch(pipe, &[u(n), u(experts), u(k), norm as u32], &[logits, route], u(n.div_ceil(64)));
    }

    /// Sorts the `pairs` (token, expert) pairs of `route` by expert into `sorted` (of
    /// [`sorted_pairs_words`] words) for the tiled [`MoeMatmul`]; at most [`SORT_EXPERTS`]
    /// experts.
    pub fn sort_pairs(&mut self, route: &Buf, sorted: &Buf, pairs: usize, experts: usize) {
        assert!(experts <= SORT_EXPERTS, "sorting pairs among {experts} experts");
        fits("moe route", route, 2 * pairs);
        fits("sorted pairs", sorted, sorted_pairs_words(pairs, experts));
        let pipe = self.gpu.pipeline("moe_sort", || MOE_SORT.to_string());
        self.dispatch(pipe, &[u(pairs), u(experts), u(TILE_ROWS)], &[route, sorted], 1);
    }

    /// See [`MoeMatmul`].
    pub fn moe_matmul(&mut self, j: &MoeMatmul) {
        assert!(formats::reads(j.format, j.k), "the GPU products do not read {} rows of {} weights", j.format, j.k);
        let row_bytes = j.format.row_bytes(j.k);
        let expert_bytes = row_bytes * j.n;
        assert!(j.w.bytes as usize >= expert_bytes * j.experts, "a stack of fewer experts than routed among");
        fits("moe y", j.y, j.pairs * j.n);
        fits("moe route", j.route, 2 * j.pairs);
        let f = j.format;
        let (chunk_bytes, per_block) = formats::chunk_geometry(f);
        let mut params = vec![
            u(j.pairs),
            u(j.n),
            u(j.k),
            u(row_bytes),
            u(expert_bytes),
            chunk_bytes,
            per_block,
            u(j.topk),
            j.per_token as u32,
        ];
        if let Some(sorted) = j.sorted {
            fits("sorted pairs", sorted, sorted_pairs_words(j.pairs, j.experts));
            // Each expert's pairs take whole tiles: at most one partial tile an expert.
            let slots = j.pairs.div_ceil(TILE_ROWS) + j.experts;
            let (name, tile) = self.tile_kernel();
            let pipe =
                self.gpu.pipeline(&format!("moe_{name}_{f}"), || format!("{tile}\n{}\n{MOE_TILE}", formats::wgsl(f)));
            params.extend([u(j.experts), u(slots)]);
            self.dispatch(pipe, &params, &[j.x, j.w, j.y, sorted], u(slots * j.n.div_ceil(64)));
            return;
        }
        let tpr = j.k.div_ceil(32).next_power_of_two().min(64) as u32;
        let pipe = self
            .gpu
            .pipeline(&format!("moe_matmul_{f}"), || format!("{}\n{MOE_MATMUL}\n{ACCUMULATE}", formats::wgsl(f)));
        params.push(tpr);
        let groups = j.n.div_ceil(64 / tpr as usize) * j.pairs;
        self.dispatch(pipe, &params, &[j.x, j.w, j.y, j.route], u(groups));
    }

    /// `out[t] = Σ_j w_tj · y[t · k + j]` over rows of `width` values, the weights in `route`.
    pub fn combine(&mut self, y: &Buf, route: &Buf, out: &Buf, n: usize, width: usize, k: usize) {
        fits("combine y", y, n * k * width);
        fits("combine out", out, n * width);
        let pipe = self.gpu.pipeline("combine", || per_item(COMBINE));
        self.dispatch(pipe, &[u(n), u(width), u(k)], &[y, route, out], u((n * width).div_ceil(64)));
    }
}
