// The entry point of the kernels that give each invocation one item: item(id) for id counted
// over all workgroups of 64 (laid out in two dimensions, x + y · count_x).
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    item((wg.x + wg.y * nwg.x) * 64u + t);
}
