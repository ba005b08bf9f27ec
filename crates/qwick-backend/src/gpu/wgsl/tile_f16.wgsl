// tile.wgsl for adapters with shader-f16: the same tiles, with the activations staged in
// workgroup memory as f16 (half the memory, so more workgroups a core) and each chunk's
// products taken four at a time in f16 (the weight chunk rounded to f16 once), every group of
// four summed in f32. Values round to f16 (11 significant bits; activations beyond ±65504
// would not fit, which those of Qwen3's projections do not reach); sums stay in f32.
const TM: u32 = 32u;
var<workgroup> xs: array<vec4<f16>, 256>;

fn tile_products(t: u32, wo: u32, live: bool, mr: u32, acc: ptr<function, array<f32, 32>>) {
    let chunks = (p.k + 31u) / 32u;
    for (var c = 0u; c < chunks; c++) {
        let lim = min(32u, p.k - c * 32u);
        for (var i = t; i < TM * 8u; i += 64u) {
            let r = i / 8u;
            let j = (i % 8u) * 4u;
            var v = vec4<f32>(0.0);
            if (r < mr) {
                let o = xrow(r) + c * 32u + j;
                for (var e = 0u; e < 4u; e++) {
                    if (j + e < lim) {
                        v[e] = x[o + e];
                    }
                }
            }
            xs[i] = vec4<f16>(v);
        }
        workgroupBarrier();
        if (live) {
            var wv: array<f32, 32>;
            deq32(wo + (c / p.chunks_per_block) * p.chunk_bytes, c % p.chunks_per_block, &wv);
            // A float row's last chunk may be partial: what deq32 read past it is dropped.
            var wh: array<vec4<f16>, 8>;
            for (var q = 0u; q < 8u; q++) {
                var w4 = vec4<f32>(0.0);
                for (var e = 0u; e < 4u; e++) {
                    w4[e] = select(0.0, wv[4u * q + e], 4u * q + e < lim);
                }
                wh[q] = vec4<f16>(w4);
            }
            for (var r = 0u; r < TM; r++) {
                var s = 0.0;
                for (var q = 0u; q < 8u; q++) {
                    s += f32(dot(wh[q], xs[r * 8u + q]));
                }
                (*acc)[r] += s;
            }
        }
        workgroupBarrier();
    }
}
