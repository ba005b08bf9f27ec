// The tiled product behind matmul_tile.wgsl and moe_tile.wgsl (for many activation rows, as in
// a prefill): a workgroup takes 64 weight rows, one an invocation, and up to TM activation rows.
// For each chunk of 32 along k, the TM × 32 activations are staged in workgroup memory, and each
// invocation dequantizes its row's chunk once (the format's deq32) and takes its products with
// all TM activation rows, four at a time, each four's sum added in f32. Each weight is thus read
// once per TM activation rows, each activation once per 64 weight rows. The including kernel
// defines xrow(r), the element offset in x of its tile's activation row r (r < mr), and the
// type H the products are taken in: f32, or f16 where the adapter has f16 arithmetic (the
// staged activations then take half the memory, and the chunk's weights and activations round
// to 11 significant bits).
const TM: u32 = 32u;
var<workgroup> xs: array<vec4<H>, 256>;

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
            xs[i] = vec4<H>(v);
        }
        workgroupBarrier();
        if (live) {
            var wv: array<f32, 32>;
            deq32(wo + (c / p.chunks_per_block) * p.chunk_bytes, c % p.chunks_per_block, &wv);
            // A float row's last chunk may be partial: what deq32 read past it is dropped.
            var wh: array<vec4<H>, 8>;
            for (var q = 0u; q < 8u; q++) {
                var w4 = vec4<f32>(0.0);
                for (var e = 0u; e < 4u; e++) {
                    w4[e] = select(0.0, wv[4u * q + e], 4u * q + e < lim);
                }
                wh[q] = vec4<H>(w4);
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
