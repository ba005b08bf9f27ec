// y[m0 + r, row] = Σ_k x[m0 + r, k] · W[row, k] for up to MR activation rows per workgroup:
// each weight row is read once per MR rows, 32 weights at a time (accumulate.wgsl, over the
// format's deq32), f32 accumulation. A workgroup's 64 invocations take 64 / tpr weight rows,
// tpr invocations a row (tpr: a power of two, about the row's chunks of 32, so short rows do
// not leave most invocations idle), reduced by a tree.

const WG: u32 = 64u;
var<workgroup> part: array<f32, 512>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = wg.x + wg.y * nwg.x;
    let passes = (p.m + MR - 1u) / MR;
    let rows_per_group = WG / p.tpr;
    if (id >= ((p.n + rows_per_group - 1u) / rows_per_group) * passes) {
        return;
    }
    let row = (id / passes) * rows_per_group + t / p.tpr;
    let lane = t % p.tpr;
    let m0 = (id % passes) * MR;
    let mr = min(MR, p.m - m0);
    var acc: array<f32, 8>;
    let chunks = (p.k + 31u) / 32u;
    if (row < p.n) {
        for (var c = lane; c < chunks; c += p.tpr) {
            accumulate(p.w_off + row * p.row_bytes, c, p.k, p.x_off + m0 * p.ldx, p.ldx, mr, &acc);
        }
    }
    for (var r = 0u; r < MR; r++) {
        part[r * WG + t] = acc[r];
    }
    workgroupBarrier();
    for (var s = p.tpr / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            for (var r = 0u; r < MR; r++) {
                part[r * WG + t] += part[r * WG + t + s];
            }
        }
        workgroupBarrier();
    }
    // The segment's lanes write its row's outputs for the MR activation rows.
    if (row < p.n) {
        for (var r = lane; r < mr; r += p.tpr) {
            y[p.y_off + (m0 + r) * p.ldy + row] = part[r * WG + t - lane];
        }
    }
}
