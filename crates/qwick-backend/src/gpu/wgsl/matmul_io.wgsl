// What both product kernels (matmul.wgsl, matmul_sg.wgsl) take: y[m0 + r, row] for activation
// rows x (m of them, ldx apart, from x_off) and a weight of n rows of k in its stored format at
// byte w_off of w, up to MR activation rows a pass.
struct P { m: u32, n: u32, k: u32, row_bytes: u32, w_off: u32, chunk_bytes: u32, chunks_per_block: u32, x_off: u32, ldx: u32, y_off: u32, ldy: u32, tpr: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const MR: u32 = 8u;
