// a[i] = OP(a[i], b[i]) for i < count: SwiGLU's silu(g)·u, or the residual add.
struct P { count: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn item(i: u32) {
    if (i >= p.count) {
        return;
    }
    let g = a[i];
    a[i] = #OP;
}
