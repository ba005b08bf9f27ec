// The products of matmul.wgsl with subgroup operations: each subgroup takes a weight row, its
// invocations its chunks of 32 in turn, and a subgroup sum replaces the workgroup's tree (no
// barrier, no shared memory). A workgroup takes p.tpr rows (64 over the adapter's largest
// subgroup size, so that every row has a subgroup whatever size the subgroups come in).
struct P { m: u32, n: u32, k: u32, row_bytes: u32, w_off: u32, chunk_bytes: u32, chunks_per_block: u32, x_off: u32, ldx: u32, y_off: u32, ldy: u32, tpr: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const MR: u32 = 8u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
        @builtin(subgroup_size) sgs: u32) {
    let id = wg.x + wg.y * nwg.x;
    let passes = (p.m + MR - 1u) / MR;
    let rows_per_group = p.tpr;
    if (id >= ((p.n + rows_per_group - 1u) / rows_per_group) * passes) {
        return;
    }
    let row = (id / passes) * rows_per_group + sg;
    let live = sg < rows_per_group && row < p.n;
    let m0 = (id % passes) * MR;
    let mr = min(MR, p.m - m0);
    var acc: array<f32, 8>;
    var wv: array<f32, 32>;
    let chunks = (p.k + 31u) / 32u;
    if (live) {
        for (var c = lane; c < chunks; c += sgs) {
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
        let total = subgroupAdd(acc[r]);
        if (live && lane == 0u && r < mr) {
            y[p.y_off + (m0 + r) * p.ldy + row] = total;
        }
    }
}
