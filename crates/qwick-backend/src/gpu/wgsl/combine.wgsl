// The MoE block's output: out[t, i] = Σ_j w[t, j] · y[t · k + j, i] over the token's k chosen
// experts (route: (expert, weight bits) pairs), in the order they were chosen.
struct P { n: u32, width: u32, k: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read> route: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn item(id: u32) {
    if (id >= p.n * p.width) {
        return;
    }
    let t = id / p.width;
    let i = id % p.width;
    var s = 0.0;
    for (var j = 0u; j < p.k; j++) {
        s += bitcast<f32>(route[2u * (t * p.k + j) + 1u]) * y[(t * p.k + j) * p.width + i];
    }
    out[id] = s;
}
