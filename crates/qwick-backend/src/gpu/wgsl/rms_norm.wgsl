// RMSNorm of each d-wide row: x / sqrt(mean(x²) + eps) · weight, one workgroup a row, stored by
// #STORE: into out (declared by #OUT) or back into x (the q/k norms, #OUT empty).
struct P { rows: u32, d: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
#OUT

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    var ss = 0.0;
    for (var i = t; i < p.d; i += 64u) {
        ss += x[base + i] * x[base + i];
    }
    red[t] = ss;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (t < s) {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(red[0] / f32(p.d) + p.eps);
    for (var i = t; i < p.d; i += 64u) {
        #STORE = wt[i] * (x[base + i] * inv);
    }
}
