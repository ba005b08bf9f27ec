// Causal attention over a paged KV cache (kernels.rs prepends its element reader and
// paged.wgsl's bindings and row addressing), one workgroup per (query token, head, split of the positions): the token at position pos
// attends to its sequence's keys 0..=pos, those of its split (p.span positions from s · span)
// 64 at a time with a running maximum and sum (softmax in f32), each thread keeping up to 4 of
// the head's output values. Unsplit, the workgroup writes the output; split (long contexts and
// few tokens, so that many workgroups share a row's positions), it writes its maximum, sum and
// unnormalised values to part, which attention_merge.wgsl merges. finish() is one or the other
// (prepended by kernels.rs).
struct P { n: u32, heads: u32, kv_heads: u32, d: u32, block_size: u32, scale: f32, seqs: u32, splits: u32, span: u32 }
@group(0) @binding(0) var<uniform> p: P;

var<workgroup> qs: array<f32, 256>;
var<workgroup> sc: array<f32, 64>;
var<workgroup> wpos: u32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = wg.x + wg.y * nwg.x;
    if (id >= p.n * p.heads * p.splits) {
        return;
    }
    let item = id / p.splits;
    let split = id % p.splits;
    let tok = item / p.heads;
    let h = item % p.heads;
    let kvh = h / (p.heads / p.kv_heads);
    if (t == 0u) {
        wpos = info[tok];
    }
    // The position, as a value every invocation agrees on (the loop below has barriers).
    let pos = workgroupUniformLoad(&wpos);
    let table = table_of(tok);
    let qo = (tok * p.heads + h) * p.d;
    for (var j = t; j < p.d; j += 64u) {
        qs[j] = q[qo + j];
    }
    workgroupBarrier();
    var m = -3.4028235e38;
    var l = 0.0;
    var acc: array<f32, 4>;
    let first = split * p.span;
    let last = min(pos, first + p.span - 1u);
    for (var p0 = first; p0 <= last; p0 += 64u) {
        let pp = p0 + t;
        var score = -3.4028235e38;
        if (pp <= last) {
            let kr = key_row(table, kvh, pp);
            var s = 0.0;
            for (var j = 0u; j < p.d; j++) {
                s += qs[j] * element(0u, kr + j);
            }
            score = s * p.scale;
        }
        sc[t] = score;
        workgroupBarrier();
        let count = min(64u, last + 1u - p0);
        var cm = m;
        for (var i = 0u; i < count; i++) {
            cm = max(cm, sc[i]);
        }
        let corr = exp(m - cm);
        l *= corr;
        for (var u = 0u; u < 4u; u++) {
            acc[u] *= corr;
        }
        for (var i = 0u; i < count; i++) {
            let e = exp(sc[i] - cm);
            l += e;
            let vr = key_row(table, kvh, p0 + i);
            for (var u = 0u; u < 4u; u++) {
                let j = t + 64u * u;
                if (j < p.d) {
                    acc[u] += e * element(1u, vr + j);
                }
            }
        }
        m = cm;
        workgroupBarrier();
    }
    finish(id, qo, t, m, l, acc);
}
