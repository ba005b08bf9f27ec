// The products of matmul.wgsl with subgroup operations: each subgroup takes a weight row, its
// invocations its chunks of 32 in turn, and a subgroup sum replaces the workgroup's tree (no
// barrier, no shared memory). A workgroup takes p.tpr rows (64 over the adapter's largest
// subgroup size, so that every row has a subgroup whatever size the subgroups come in).


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
    let chunks = (p.k + 31u) / 32u;
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
