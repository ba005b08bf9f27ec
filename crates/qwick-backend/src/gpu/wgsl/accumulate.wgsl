// The inner step of every product kernel (prepended to them, after the format's deq32): adds the
// products of chunk c (32 weights) of the weight row at byte wo with up to 8 activation rows
// (mr of them, from element xo, ldx apart) to acc. Its loops run to constant bounds (guarded
// inside), so that once unrolled wv and acc are indexed by constants and stay in registers; a
// float row may end in a partial chunk (k not a multiple of 32).
fn accumulate(wo: u32, c: u32, k: u32, xo: u32, ldx: u32, mr: u32, acc: ptr<function, array<f32, 8>>) {
    var wv: array<f32, 32>;
    deq32(wo + (c / p.chunks_per_block) * p.chunk_bytes, c % p.chunks_per_block, &wv);
    let lim = min(32u, k - c * 32u);
    for (var r = 0u; r < 8u; r++) {
        if (r < mr) {
            let o = xo + r * ldx + c * 32u;
            var s = 0.0;
            for (var j = 0u; j < 32u; j++) {
                s += select(0.0, wv[j] * x[o + min(j, lim - 1u)], j < lim);
            }
            (*acc)[r] += s;
        }
    }
}
