// The experts' products of a MoE block in one dispatch: for each (token, chosen expert) pair q,
// y[q, row] = Σ_k x[xrow, k] · W_e[row, k] with e the pair's expert (route: (expert, weight
// bits) pairs) and xrow the pair's token (p.per_token = 1: the block's input) or the pair itself
// (the experts' own activations). The weights of all experts lie one after another, p.expert_bytes
// apart, in their stored format (deq32 prepended). A workgroup takes one pair and 64 / p.tpr
// weight rows, p.tpr invocations a row, reduced by a tree.
struct P { pairs: u32, n: u32, k: u32, row_bytes: u32, expert_bytes: u32, chunk_bytes: u32, chunks_per_block: u32, topk: u32, per_token: u32, tpr: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> route: array<u32>;

const WG: u32 = 64u;
var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = wg.x + wg.y * nwg.x;
    let rows_per_group = WG / p.tpr;
    let row_groups = (p.n + rows_per_group - 1u) / rows_per_group;
    if (id >= row_groups * p.pairs) {
        return;
    }
    let q = id % p.pairs;
    let row = (id / p.pairs) * rows_per_group + t / p.tpr;
    let lane = t % p.tpr;
    let e = route[2u * q];
    let xo = select(q, q / p.topk, p.per_token == 1u) * p.k;
    var acc: array<f32, 8>;
    let chunks = (p.k + 31u) / 32u;
    if (row < p.n) {
        for (var c = lane; c < chunks; c += p.tpr) {
            accumulate(e * p.expert_bytes + row * p.row_bytes, c, p.k, xo, 0u, 1u, &acc);
        }
    }
    part[t] = acc[0];
    workgroupBarrier();
    for (var s = p.tpr / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            part[t] += part[t + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.n) {
        y[q * p.n + row] = part[t];
    }
}
