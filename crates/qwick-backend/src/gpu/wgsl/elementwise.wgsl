// a[i] = OP(a[i], b[i]) for i < count: SwiGLU's silu(g)·u, or the residual add.
struct P { count: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + t;
    if (i >= p.count) {
        return;
    }
    let g = a[i];
    a[i] = #OP;
}
