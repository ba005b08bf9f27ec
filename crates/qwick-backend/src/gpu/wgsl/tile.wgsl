// The tiled product behind matmul_tile.wgsl and moe_tile.wgsl (for many activation rows, as in
// a prefill): a workgroup takes 64 weight rows, one an invocation, and up to TM activation rows.
// For each chunk of 32 along k, the TM × 32 activations are staged in workgroup memory, and each
// invocation dequantizes its row's chunk once (the format's deq32) and takes its products with
// all TM activation rows. Each weight is thus read once per TM activation rows, each activation
// once per 64 weight rows. The including kernel defines xrow(r), the element offset in x of its
// tile's activation row r (r < mr).
const TM: u32 = 32u;
var<workgroup> xs: array<f32, 1024>;

fn tile_products(t: u32, wo: u32, live: bool, mr: u32, acc: ptr<function, array<f32, 32>>) {
    let chunks = (p.k + 31u) / 32u;
    for (var c = 0u; c < chunks; c++) {
        let lim = min(32u, p.k - c * 32u);
        for (var i = t; i < TM * 32u; i += 64u) {
            let r = i / 32u;
            let j = i % 32u;
            var v = 0.0;
            if (r < mr && j < lim) {
                v = x[xrow(r) + c * 32u + j];
            }
            xs[i] = v;
        }
        workgroupBarrier();
        if (live) {
            var wv: array<f32, 32>;
            deq32(wo + (c / p.chunks_per_block) * p.chunk_bytes, c % p.chunks_per_block, &wv);
            // A float row's last chunk may be partial: what deq32 read past it is dropped.
            for (var j = 0u; j < 32u; j++) {
                wv[j] = select(0.0, wv[j], j < lim);
            }
            for (var r = 0u; r < TM; r++) {
                var s = 0.0;
                for (var j = 0u; j < 32u; j++) {
                    s += wv[j] * xs[r * 32u + j];
                }
                (*acc)[r] += s;
            }
        }
        workgroupBarrier();
    }
}
