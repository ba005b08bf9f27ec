// The products of matmul.wgsl with subgroup operations: a subgroup takes a weight row, its
// invocations its chunks of 32 in turn, and a subgroup sum replaces the workgroup's tree (no
// barrier, no shared memory). A workgroup takes p.tpr rows (64 over the adapter's smallest
// subgroup size); where its subgroups come larger, and so fewer, each takes every
// num_subgroups-th of them in turn.

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sgs: u32) {
    let id = wg.x + wg.y * nwg.x;
    let passes = (p.m + MR - 1u) / MR;
    let rows_per_group = p.tpr;
    if (id >= ((p.n + rows_per_group - 1u) / rows_per_group) * passes) {
        return;
    }
    let m0 = (id % passes) * MR;
    let mr = min(MR, p.m - m0);
    let chunks = (p.k + 31u) / 32u;
    for (var turn = 0u; turn < (rows_per_group + nsg - 1u) / nsg; turn++) {
        let r_in_group = sg + turn * nsg;
        let row = (id / passes) * rows_per_group + r_in_group;
        let live = r_in_group < rows_per_group && row < p.n;
        var acc: array<f32, 8>;
        if (live) {
            for (var c = lane; c < chunks; c += sgs) {
                accumulate(p.w_off + row * p.row_bytes, c, p.k, p.x_off + m0 * p.ldx, p.ldx, mr, &acc);
            }
        }
        for (var r = 0u; r < MR; r++) {
            let total = subgroupAdd(acc[r]);
            if (live && lane == 0u && r < mr) {
                y[p.y_off + (m0 + r) * p.ldy + row] = total;
            }
        }
    }
}
