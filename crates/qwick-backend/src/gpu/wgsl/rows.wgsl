// Moving whole rows of `width` values: GATHER copies row idx[i] of a into row i of b;
// otherwise (scatter-add) row i of b, times the weight idx[2i + 1] (f32 bits), is added to row
// idx[2i] of a (each target row at most once per dispatch).
struct P { rows: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = (wg.x + wg.y * nwg.x) * 64u + t;
    if (id >= p.rows * p.width) {
        return;
    }
    let i = id / p.width;
    let j = id % p.width;
    #BODY
}
