// MoE routing, one invocation per token: the softmax of the token's router logits (max
// subtracted, f32), its top k experts by descending probability (ties to the lower index), their
// weights renormalised over the chosen ones when p.norm; written as (expert, weight bits) pairs.
struct P { n: u32, experts: u32, k: u32, norm: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> route: array<u32>;

fn item(t: u32) {
    if (t >= p.n) {
        return;
    }
    let base = t * p.experts;
    var m = -3.4028235e38;
    for (var e = 0u; e < p.experts; e++) {
        m = max(m, logits[base + e]);
    }
    var s = 0.0;
    for (var e = 0u; e < p.experts; e++) {
        let v = exp(logits[base + e] - m);
        logits[base + e] = v;
        s += v;
    }
    let inv = 1.0 / s;
    for (var e = 0u; e < p.experts; e++) {
        logits[base + e] *= inv;
    }
    // k passes of the largest probability not yet taken (taken ones marked below zero).
    var sum = 0.0;
    for (var j = 0u; j < p.k; j++) {
        var best = 0u;
        var bv = -1.0;
        for (var e = 0u; e < p.experts; e++) {
            let v = logits[base + e];
            if (v > bv) {
                bv = v;
                best = e;
            }
        }
        route[2u * (t * p.k + j)] = best;
        route[2u * (t * p.k + j) + 1u] = bitcast<u32>(bv);
        sum += bv;
        logits[base + best] = -2.0;
    }
    if (p.norm != 0u) {
        for (var j = 0u; j < p.k; j++) {
            let o = 2u * (t * p.k + j) + 1u;
            route[o] = bitcast<u32>(bitcast<f32>(route[o]) / sum);
        }
    }
}
