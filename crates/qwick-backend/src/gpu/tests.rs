//! Every GPU kernel against the CPU's reference, on the first adapter wgpu finds (lavapipe in
//! CI). Without one, each test says loudly that it was skipped.

use super::*;
use crate::attention::{paged_attention, AttnArgs, KvLayout, PagedKv};
use crate::check::{assert_close, rand_vec};
use crate::{ops, Ctx, Format, Isa, ThreadPool};

/// The first adapter, opened; `None` (and a loud note) where there is none.
fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIPPED {test}: no GPU to run it on ({e})");
            None
        }
    }
}

/// The weight formats the GPU reads, as the tests make them: floats encoded, the others
/// quantized by the CPU's quantizer.
const FORMATS: [Format; 13] = [
    Format::F32,
    Format::F16,
    Format::BF16,
    Format::Q8_0,
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::IQ4_NL,
    Format::Q4_K,
    Format::Q5_K,
    Format::Q6_K,
    Format::IQ4_XS,
];

fn encode(f: Format, w: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; f.bytes_for(w.len()).unwrap()];
    if f.is_float() {
        f.encode_floats(w, &mut out);
    } else {
        f.quantize(w, &mut out);
    }
    out
}

#[test]
fn every_format_table_entry_has_a_gpu_test() {
    for &f in Format::ALL {
        assert_eq!(supports(f), FORMATS.contains(&f), "{f}: the GPU format table and its tests disagree");
    }
}

/// The adapter's kernels: with subgroup operations where it has them (also with 64 rows a
/// workgroup, more than it has subgroups, as where subgroups come larger than the smallest
/// size), then the portable ones.
fn each_path(test: &str, check: impl Fn(&Gpu, &str)) {
    let Some(mut g) = gpu(test) else { return };
    if g.subgroups() {
        check(&g, "subgroups");
        let rows = g.subgroup_rows;
        g.subgroup_rows = Some(64);
        check(&g, "subgroups, several rows each");
        g.subgroup_rows = rows;
    } else {
        eprintln!("NOT RUN {test} with subgroups: {} has no subgroup operations", g.summary.name);
    }
    g.without_subgroups();
    check(&g, "portable");
    if g.set_f16(true) {
        check(&g, "portable, f16 tiles");
    } else {
        eprintln!("NOT RUN {test} with f16 tiles: {} has no f16 arithmetic", g.summary.name);
    }
}

/// What the products on `g` may be off by, relative to the sum of the magnitudes of a row's
/// products: f32 sums, or for `m` rows from [`TILE_ROWS`] on with f16 tiles, each product's
/// factors and each four's sum rounded to f16 (11 significant bits: at most about 3 · 2⁻¹¹).
fn product_tolerance(g: &Gpu, m: usize) -> f32 {
    if g.f16() && m >= TILE_ROWS {
        2e-3
    } else {
        1e-5
    }
}

#[test]
fn matmul_matches_the_dequantized_reference() {
    each_path("matmul", matmul_check);
}

fn matmul_check(g: &Gpu, path: &str) {
    // k spans many 256-weight blocks and more chunks than a workgroup has threads; m covers
    // a single row, a partial pass of 8 and more than one pass, and (from TILE_ROWS rows on,
    // the tiled kernel) a whole tile and one and a part.
    // Float weights also in rows that end in a partial chunk of 32.
    // Short rows too (a few invocations per row, fewer than the activation rows of a pass).
    let floats = [Format::F32, Format::F16, Format::BF16];
    let shapes = FORMATS.iter().map(|&f| (f, 4096)).chain(floats.map(|f| (f, 1000))).chain([
        (Format::Q8_0, 64),
        (Format::BF16, 32),
        (Format::Q6_K, 256),
    ]);
    let n = 37;
    for (f, k) in shapes {
        let w = rand_vec(n * k, 7);
        let stored = encode(f, &w);
        let mut deq = vec![0f32; n * k];
        f.dequantize(&stored, &mut deq);
        let wb = g.upload(&stored).unwrap();
        for m in [1, 3, 8, 11, TILE_ROWS, TILE_ROWS + 38] {
            let x = rand_vec(m * k, 11 + m as u64);
            let (xb, yb) = (g.upload_f32(&x).unwrap(), g.zeros(4 * (m * n) as u64).unwrap());
            let mut rec = Recorder::new(g);
            rec.matmul(&Matmul {
                x: &xb,
                x_off: 0,
                ldx: k,
                m,
                w: &wb,
                w_off: 0,
                format: f,
                n,
                k,
                y: &yb,
                y_off: 0,
                ldy: n,
            });
            rec.submit();
            let got = g.read_f32(&yb, m * n);
            let mut want = vec![0f32; m * n];
            let mut scale = 0f64;
            for i in 0..m {
                for r in 0..n {
                    let (xr, wr) = (&x[i * k..(i + 1) * k], &deq[r * k..(r + 1) * k]);
                    want[i * n + r] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
                    scale = scale.max(xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>());
                }
            }
            // f32 sums of 4096 products in another order than the f64 reference.
            let tol = product_tolerance(g, m) * scale as f32;
            assert_close(&format!("{f} matmul ({path}), k = {k}, m = {m}"), &got, &want, tol);
        }
    }
}

#[test]
fn matmul_reads_offsets_and_strides() {
    each_path("matmul offsets", offsets_check);
}

fn offsets_check(g: &Gpu, path: &str) {
    // The second of two Q8_0 weights in one buffer (as the experts of a layer are), rows of x
    // and y inside wider rows.
    let (n, k, m, f) = (5, 64, 2, Format::Q8_0);
    let w = rand_vec(2 * n * k, 3);
    let stored = encode(f, &w);
    let mut deq = vec![0f32; 2 * n * k];
    f.dequantize(&stored, &mut deq);
    let (ldx, ldy) = (k + 32, n + 3);
    let x = rand_vec(m * ldx + 7, 5);
    let (xb, wb, yb) =
        (g.upload_f32(&x).unwrap(), g.upload(&stored).unwrap(), g.zeros(4 * (m * ldy + 2) as u64).unwrap());
    let mut rec = Recorder::new(g);
    let w_off = f.row_bytes(k) as u64 * n as u64;
    rec.matmul(&Matmul { x: &xb, x_off: 7, ldx, m, w: &wb, w_off, format: f, n, k, y: &yb, y_off: 2, ldy });
    rec.submit();
    let got = g.read_f32(&yb, m * ldy + 2);
    for i in 0..m {
        for r in 0..n {
            let want: f32 = (0..k).map(|j| x[7 + i * ldx + j] * deq[(n + r) * k + j]).sum();
            let v = got[2 + i * ldy + r];
            assert!((v - want).abs() <= 1e-4 * want.abs().max(1.0), "{path}: row {i}, output {r}: {v} against {want}");
        }
    }
}

#[test]
fn norms_rope_and_elementwise_match_the_cpu() {
    let Some(g) = gpu("norms, rope, elementwise") else { return };
    let (n, heads, d) = (5, 3, 128);
    let width = heads * d;
    let x = rand_vec(n * width, 1);
    let w = rand_vec(width, 2);
    let hw = rand_vec(d, 3);
    let (xb, wb, hwb, ob) = (
        g.upload_f32(&x).unwrap(),
        g.upload_f32(&w).unwrap(),
        g.upload_f32(&hw).unwrap(),
        g.zeros(4 * (n * width) as u64).unwrap(),
    );
    let half = d / 2;
    let cos: Vec<f32> = (0..n * half).map(|i| (i as f32 * 0.37).cos()).collect();
    let sin: Vec<f32> = (0..n * half).map(|i| (i as f32 * 0.37).sin()).collect();
    let csb = g.upload_f32(&[cos.clone(), sin.clone()].concat()).unwrap();
    let up = rand_vec(n * width, 4);
    let upb = g.upload_f32(&up).unwrap();

    let mut rec = Recorder::new(&g);
    rec.rms_norm(&xb, &wb, &ob, n, width, 1e-6);
    rec.rms_norm_inplace(&xb, &hwb, n * heads, d, 1e-6);
    rec.rope(&xb, &csb, n, width, half);
    rec.silu_mul(&ob, &upb, n * width);
    rec.add(&xb, &ob, n * width);
    rec.submit();

    let isa = Isa::SCALAR;
    let mut o = vec![0f32; n * width];
    ops::rms_norm(isa, &x, &w, 1e-6, &mut o);
    let mut xc = x.clone();
    ops::rms_norm_inplace(isa, &mut xc, &hw, 1e-6);
    for (i, row) in xc.chunks_exact_mut(width).enumerate() {
        ops::rope_inplace(isa, row, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
    }
    ops::silu_mul(isa, &mut o, &up);
    ops::add_inplace(isa, &mut xc, &o);
    assert_close("norm, silu·up", &g.read_f32(&ob, n * width), &o, 1e-5);
    assert_close("q/k norm, rope, residual add", &g.read_f32(&xb, n * width), &xc, 1e-5);
}

#[test]
fn paged_attention_matches_the_cpu() {
    let Some(g) = gpu("paged attention") else { return };
    // Two sequences with scattered blocks: one prefilling 70 tokens (more than a workgroup's
    // 64 positions), one computing its 129th to 131st tokens after a cached prefix; GQA of 4
    // query heads per KV head.
    let (heads, kv_heads, d, bs, blocks) = (8, 2, 128, 16, 24);
    let layout = KvLayout { block_size: bs, kv_heads, head_dim: d };
    let tables: [Vec<u32>; 2] = [(0..5).map(|b| 2 * b + 1).collect(), (0..9).map(|b| 22 - 2 * b).collect()];
    let mut positions: Vec<u32> = (0..70).collect();
    let mut seq_of_token = vec![0u32; 70];
    positions.extend([128, 129, 130]);
    seq_of_token.extend([1, 1, 1]);
    let n = positions.len();
    // Every cached row random (earlier tokens of sequence 1 included), then this step's K/V
    // written over their slots by both sides.
    let size = blocks * kv_heads * bs * d;
    let (mut kc, mut vc) = (rand_vec(size, 8), rand_vec(size, 9));
    let initial = (kc.clone(), vc.clone());
    let (k, v, q) = (rand_vec(n * kv_heads * d, 10), rand_vec(n * kv_heads * d, 11), rand_vec(n * heads * d, 12));
    let slots: Vec<u32> = (0..n)
        .map(|i| {
            let (t, p) = (&tables[seq_of_token[i] as usize], positions[i] as usize);
            t[p / bs] * bs as u32 + (p % bs) as u32
        })
        .collect();
    for (i, &s) in slots.iter().enumerate() {
        for h in 0..kv_heads {
            let at = layout.row(s as usize / bs, h, s as usize % bs);
            kc[at..at + d].copy_from_slice(&k[(i * kv_heads + h) * d..][..d]);
            vc[at..at + d].copy_from_slice(&v[(i * kv_heads + h) * d..][..d]);
        }
    }
    let tabs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
    let (kb, vb, qb, sb) = (
        g.upload_f32(&k).unwrap(),
        g.upload_f32(&v).unwrap(),
        g.upload_f32(&q).unwrap(),
        g.upload_u32(&slots).unwrap(),
    );
    let meta = g.upload_u32(&Attend::meta(&positions, &seq_of_token, &tabs)).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let pool = ThreadPool::new(1);
    let args =
        AttnArgs { n_heads: heads, scale, positions: &positions, seq_of_token: &seq_of_token, block_tables: &tabs };
    for format in [Format::F32, Format::F16, Format::BF16] {
        let encode = |x: &[f32]| {
            let mut out = vec![0u8; format.row_bytes(x.len())];
            format.encode_floats(x, &mut out);
            out
        };
        // Both caches start as the random rows before the write (the GPU's) or after it (the
        // CPU's, written on the host as the CPU cache does).
        let (kcb, vcb) = (g.upload(&encode(&initial.0)).unwrap(), g.upload(&encode(&initial.1)).unwrap());
        let ob = g.zeros(4 * (n * heads * d) as u64).unwrap();
        let mut rec = Recorder::new(&g);
        rec.kv_write(&kb, &sb, &kcb, n, layout, format);
        rec.kv_write(&vb, &sb, &vcb, n, layout, format);
        let attend = Attend {
            q: &qb,
            k: &kcb,
            v: &vcb,
            meta: &meta,
            out: &ob,
            n,
            heads,
            kv_heads,
            d,
            block_size: bs,
            scale,
            seqs: 2,
            format,
            max_pos: 130,
            splits: 1,
            tiles: None,
        };
        rec.attend(&attend);
        // The same split in three (64 positions each, the last two empty for the prefill's
        // first 64 tokens) and merged.
        let split_out = g.zeros(4 * (n * heads * d) as u64).unwrap();
        rec.attend(&Attend { splits: 3, out: &split_out, ..attend });
        // And as prefill tiles: 8 tokens of the first sequence at a time (6 in the last), the
        // second's 3 in one.
        let tiles = Attend::tiles(&seq_of_token).expect("tokens enough for tiles");
        assert_eq!(tiles.len(), 2 * 10);
        assert_eq!(tiles[16..], [64, 6, 70, 3]);
        let tiles_buf = g.upload_u32(&tiles).unwrap();
        let tile_out = g.zeros(4 * (n * heads * d) as u64).unwrap();
        rec.attend(&Attend { tiles: Some((&tiles_buf, tiles.len() / 2)), out: &tile_out, ..attend });
        rec.submit();
        let (kw, vw) = (encode(&kc), encode(&vc));
        let bytes = kw.len() as u64;
        assert!(g.read(&kcb, bytes) == kw, "{format} K cache after the write: not the CPU's bytes");
        assert!(g.read(&vcb, bytes) == vw, "{format} V cache after the write: not the CPU's bytes");
        let mut want = vec![0f32; n * heads * d];
        let kv = PagedKv { k: &kw, v: &vw, format, block_size: bs, kv_heads, head_dim: d };
        paged_attention(Ctx::new(Isa::SCALAR, &pool), &q, kv, &args, &mut want);
        assert_close(&format!("attention over a {format} cache"), &g.read_f32(&ob, n * heads * d), &want, 1e-5);
        let got = g.read_f32(&split_out, n * heads * d);
        assert_close(&format!("attention over a {format} cache, in splits"), &got, &want, 1e-5);
        let got = g.read_f32(&tile_out, n * heads * d);
        assert_close(&format!("attention over a {format} cache, in tiles"), &got, &want, 1e-5);
    }
}

/// The `k` best of `row` in the sampler's order (higher first, ties to the lower index, NaN as
/// -inf), as (index, value) pairs.
fn top_reference(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    ids.sort_by(|&a, &b| key(row[b as usize]).partial_cmp(&key(row[a as usize])).expect("no NaN").then(a.cmp(&b)));
    ids.truncate(k);
    ids.into_iter().map(|i| (i, key(row[i as usize]))).collect()
}

#[test]
fn top_k_of_each_row_matches_the_samplers_order() {
    let Some(g) = gpu("top-k") else { return };
    // Rows of Qwen3's vocabulary (38 segments of 4096: with k = 256 a third pass), a row
    // shorter than k, ties (values rounded to 1/64), NaN, -inf and +inf.
    for (rows, len, ks) in
        [(3usize, 151_936usize, &[1usize, 20, 64, 256][..]), (2, 100, &[1, 7, 256]), (1, 8192, &[40])]
    {
        let mut x: Vec<f32> = rand_vec(rows * len, 11).iter().map(|v| (v * 64.0).round() / 64.0).collect();
        for (i, v) in [(5, f32::NAN), (len / 2, f32::NEG_INFINITY), (len - 1, f32::INFINITY), (len + 3, f32::NAN)] {
            if i < x.len() {
                x[i] = v;
            }
        }
        let xb = g.upload_f32(&x).unwrap();
        for &k in ks {
            let mut rec = Recorder::new(&g);
            let out = rec.top(&xb, rows, len, k);
            rec.submit();
            let got = g.read(&out, 8 * (rows * k) as u64);
            let words: Vec<u32> = got.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            for r in 0..rows {
                let want = top_reference(&x[r * len..(r + 1) * len], k);
                for j in 0..k {
                    let (id, bits) = (words[2 * (r * k + j)], words[2 * (r * k + j) + 1]);
                    match want.get(j) {
                        Some(&(wi, wv)) => assert!(
                            id == wi && f32::from_bits(bits) == wv,
                            "top {k} of row {r} of {len}, place {j}: ({id}, {}) against ({wi}, {wv})",
                            f32::from_bits(bits)
                        ),
                        None => assert_eq!(id, u32::MAX, "top {k} of row {r} of {len}, place {j}: past the row"),
                    }
                }
            }
        }
    }
}

/// Submissions binding the same buffers at the same parameter offsets reuse bind groups and
/// still read their own parameters; a submission whose parameters exceed the device's
/// parameter buffer runs from a buffer of its own.
#[test]
fn submissions_read_their_own_parameters() {
    let Some(g) = gpu("parameters between submissions") else { return };
    let (x, one) = (g.upload_f32(&[0.0; 4]).unwrap(), g.upload_f32(&[1.0; 4]).unwrap());
    for count in [2, 4, 1, 3] {
        let mut rec = Recorder::new(&g);
        rec.add(&x, &one, count);
        rec.submit();
    }
    assert_eq!(g.read_f32(&x, 4), [4.0, 3.0, 2.0, 1.0]);
    // More dispatches than the parameter buffer holds, then a small submission again.
    let per = g.uniform_align.max(4 * recorder::PARAM_WORDS as u64);
    let many = (recorder::PARAM_BYTES / per) as usize + 5;
    let y = g.upload_f32(&[0.0; 4]).unwrap();
    let mut rec = Recorder::new(&g);
    for i in 0..many {
        rec.add(&y, &one, 1 + i % 4);
    }
    rec.submit();
    let mut rec = Recorder::new(&g);
    rec.add(&y, &one, 2);
    rec.submit();
    let want = |j: usize| (0..many).filter(|i| j < 1 + i % 4).count() as f32 + if j < 2 { 1.0 } else { 0.0 };
    assert_eq!(g.read_f32(&y, 4), (0..4).map(want).collect::<Vec<_>>());
}

#[test]
fn bandwidth_probe_reads_the_buffer() {
    let Some(g) = gpu("bandwidth probe") else { return };
    let bw = g.read_bandwidth(64 << 20, 2).unwrap();
    assert!(bw.is_finite() && bw > 1e8, "{bw} bytes/s");
}

#[test]
fn moe_routing_expert_products_and_combine_match_the_cpu() {
    let Some(mut g) = gpu("MoE kernels") else { return };
    // A few tokens (some experts chosen by none), and enough for several tiles an expert; the
    // products pair by pair and by tiles of pairs sorted by expert (in f32, then in f16 where
    // the adapter has it).
    for n in [5, 200] {
        for tiled in [false, true] {
            moe_check(&g, n, tiled);
        }
    }
    if g.set_f16(true) {
        moe_check(&g, 200, true);
    }
}

fn moe_check(g: &Gpu, n: usize, tiled: bool) {
    let (ne, k, h, inter, f) = (16, 4, 64, 96, Format::Q8_0);
    let what = format!("{n} tokens, {}", if tiled { "tiled" } else { "pair by pair" });
    // Products of h values of at most 1 in magnitude.
    let tol = if tiled { (product_tolerance(g, TILE_ROWS) * h as f32).max(1e-4) } else { 1e-4 };
    let logits = rand_vec(n * ne, 21);
    // The reference routing: softmax, top k by descending probability (lower index on ties),
    // renormalised.
    let mut want_route = Vec::new();
    for row in logits.chunks(ne) {
        let mut p = row.to_vec();
        ops::softmax_inplace(Isa::SCALAR, &mut p);
        let mut idx: Vec<usize> = (0..ne).collect();
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let sum: f32 = idx[..k].iter().map(|&e| p[e]).sum();
        want_route.extend(idx[..k].iter().map(|&e| (e, p[e] / sum)));
    }
    let gate = rand_vec(ne * inter * h, 22);
    let (stored, x) = (encode(f, &gate), rand_vec(n * h, 23));
    let mut deq = vec![0f32; gate.len()];
    f.dequantize(&stored, &mut deq);
    let (lb, rb, wb, xb) = (
        g.upload_f32(&logits).unwrap(),
        g.zeros(8 * (n * k) as u64).unwrap(),
        g.upload(&stored).unwrap(),
        g.upload_f32(&x).unwrap(),
    );
    let (yb, ob) = (g.zeros(4 * (n * k * inter) as u64).unwrap(), g.zeros(4 * (n * inter) as u64).unwrap());
    let sb = g.zeros(4 * sorted_pairs_words(n * k, ne) as u64).unwrap();
    let mut rec = Recorder::new(g);
    rec.route(&lb, &rb, n, ne, k, true);
    if tiled {
        rec.sort_pairs(&rb, &sb, n * k, ne);
    }
    rec.moe_matmul(&MoeMatmul {
        x: &xb,
        w: &wb,
        route: &rb,
        y: &yb,
        pairs: n * k,
        topk: k,
        per_token: true,
        format: f,
        n: inter,
        k: h,
        experts: ne,
        sorted: tiled.then_some(&sb),
    });
    rec.combine(&yb, &rb, &ob, n, inter, k);
    rec.submit();
    let route = g.read(&rb, 8 * (n * k) as u64);
    let words: Vec<u32> = route.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let got_route: Vec<(usize, f32)> = words.chunks_exact(2).map(|p| (p[0] as usize, f32::from_bits(p[1]))).collect();
    for (i, (got, want)) in got_route.iter().zip(&want_route).enumerate() {
        assert_eq!(got.0, want.0, "{what}: pair {i}: expert");
        assert!((got.1 - want.1).abs() <= 1e-6, "{what}: pair {i}: weight {} against {}", got.1, want.1);
    }
    let mut want_y = vec![0f32; n * k * inter];
    let mut want_out = vec![0f32; n * inter];
    for (q, &(e, w)) in want_route.iter().enumerate() {
        let t = q / k;
        for r in 0..inter {
            let row = &deq[(e * inter + r) * h..][..h];
            let v: f32 = row.iter().zip(&x[t * h..(t + 1) * h]).map(|(a, b)| a * b).sum();
            want_y[q * inter + r] = v;
            want_out[t * inter + r] += w * v;
        }
    }
    assert_close(&format!("experts' products, {what}"), &g.read_f32(&yb, n * k * inter), &want_y, tol);
    assert_close(&format!("combined, {what}"), &g.read_f32(&ob, n * inter), &want_out, tol);
    if tiled {
        // Every pair once, grouped by expert, and the experts' starts and tile counts.
        let sorted = g.read(&sb, 4 * sorted_pairs_words(n * k, ne) as u64);
        let sorted: Vec<usize> =
            sorted.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize).collect();
        let (order, start, tiles) = (&sorted[..n * k], &sorted[n * k..][..ne + 1], &sorted[n * k + ne + 1..]);
        let mut seen = order.to_vec();
        seen.sort();
        assert_eq!(seen, (0..n * k).collect::<Vec<_>>(), "{what}: the sorted pairs");
        let mut tile_sum = 0;
        for e in 0..ne {
            assert_eq!(tiles[e], tile_sum, "{what}: tiles before expert {e}");
            let mine = &order[start[e]..start[e + 1]];
            assert!(mine.iter().all(|&q| want_route[q].0 == e), "{what}: expert {e}'s pairs");
            tile_sum += mine.len().div_ceil(TILE_ROWS);
        }
        assert_eq!((start[ne], tiles[ne]), (n * k, tile_sum), "{what}: the totals");
    }
}
