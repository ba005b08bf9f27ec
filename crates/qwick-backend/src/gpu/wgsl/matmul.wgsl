// y[m0 + r, row] = Σ_k x[m0 + r, k] · W[row, k] for up to MR activation rows per workgroup:
// each weight row is read once per MR rows, 32 weights at a time through deq32 (the format's
// dequantization, prepended to this file), f32 accumulation. A workgroup's 64 invocations
// take 64 / tpr weight rows, tpr invocations a row (tpr: a power of two, about the row's
// chunks of 32, so short rows do not leave most invocations idle), reduced by a tree.
struct P { m: u32, n: u32, k: u32, row_bytes: u32, w_off: u32, chunk_bytes: u32, chunks_per_block: u32, x_off: u32, ldx: u32, y_off: u32, ldy: u32, tpr: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
const MR: u32 = 8u;
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
    var wv: array<f32, 32>;
    // A float weight's rows may end in a partial chunk.
    let chunks = (p.k + 31u) / 32u;
    // Loops over constant bounds (guarded inside), so that wv and acc are indexed by constants
    // once unrolled and stay in registers.
    if (row < p.n) {
        for (var c = lane; c < chunks; c += p.tpr) {
            deq32(p.w_off + row * p.row_bytes + (c / p.chunks_per_block) * p.chunk_bytes, c % p.chunks_per_block, &wv);
            let lim = min(32u, p.k - c * 32u);
            for (var r = 0u; r < MR; r++) {
                if (r < mr) {
                    let xo = p.x_off + (m0 + r) * p.ldx + c * 32u;
                    var s = 0.0;
                    for (var j = 0u; j < 32u; j++) {
                        s += select(0.0, wv[j] * x[xo + min(j, lim - 1u)], j < lim);
                    }
                    acc[r] += s;
                }
            }
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
