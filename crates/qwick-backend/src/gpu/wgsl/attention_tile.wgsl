// Causal attention of prefill tiles over a paged KV cache (kernels.rs prepends its element
// reader and paged.wgsl's bindings and row addressing): one workgroup per (tile, head), a tile being up to 8 consecutive
// query tokens of one sequence (tiles[2 i] its first token, tiles[2 i + 1] its count). Each
// key and value the tile needs is read once for all its tokens: 64 positions at a time, thread
// t scores position t against every token of the tile, then each token's running maximum and
// sum are updated (softmax in f32, as attention.wgsl) and each thread accumulates up to 4 of the
// head's output values of every token. Token r (at position pos_r) attends to positions 0..=pos_r.
struct P { n: u32, heads: u32, kv_heads: u32, d: u32, block_size: u32, scale: f32, seqs: u32, tiles: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(5) var<storage, read> tiles: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

const TQ: u32 = 8u;
var<workgroup> qs: array<f32, 2048>;
var<workgroup> sc: array<f32, 512>;
var<workgroup> wlast: u32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = wg.x + wg.y * nwg.x;
    if (id >= p.tiles * p.heads) {
        return;
    }
    let tile = id / p.heads;
    let h = id % p.heads;
    let kvh = h / (p.heads / p.kv_heads);
    let first = tiles[2u * tile];
    let count = tiles[2u * tile + 1u];
    if (t == 0u) {
        wlast = info[first + count - 1u];
    }
    // The tile's last position, as a value every invocation agrees on (barriers below).
    let last = workgroupUniformLoad(&wlast);
    let pos0 = info[first];
    let table = table_of(first);
    for (var r = 0u; r < count; r++) {
        let qo = ((first + r) * p.heads + h) * p.d;
        for (var j = t; j < p.d; j += 64u) {
            qs[r * 256u + j] = q[qo + j];
        }
    }
    workgroupBarrier();
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    var acc: array<array<f32, 4>, 8>;
    for (var r = 0u; r < TQ; r++) {
        m[r] = -3.4028235e38;
    }
    for (var p0 = 0u; p0 <= last; p0 += 64u) {
        let pp = p0 + t;
        var s: array<f32, 8>;
        if (pp <= last) {
            let kr = key_row(table, kvh, pp);
            for (var j = 0u; j < p.d; j++) {
                let kj = element(0u, kr + j);
                for (var r = 0u; r < count; r++) {
                    s[r] += qs[r * 256u + j] * kj;
                }
            }
        }
        for (var r = 0u; r < count; r++) {
            sc[r * 64u + t] = s[r] * p.scale;
        }
        workgroupBarrier();
        let keys = min(64u, last + 1u - p0);
        // Token r sees the first `seen` of these positions (its own and those before it).
        for (var r = 0u; r < count; r++) {
            let seen = min(keys, (pos0 + r + 1u) - min(pos0 + r + 1u, p0));
            var cm = m[r];
            for (var i = 0u; i < seen; i++) {
                cm = max(cm, sc[r * 64u + i]);
            }
            let corr = exp(m[r] - cm);
            l[r] *= corr;
            for (var u = 0u; u < 4u; u++) {
                acc[r][u] *= corr;
            }
            m[r] = cm;
        }
        for (var i = 0u; i < keys; i++) {
            let vr = key_row(table, kvh, p0 + i);
            var v: array<f32, 4>;
            for (var u = 0u; u < 4u; u++) {
                let j = t + 64u * u;
                if (j < p.d) {
                    v[u] = element(1u, vr + j);
                }
            }
            for (var r = 0u; r < count; r++) {
                if (p0 + i <= pos0 + r) {
                    let e = exp(sc[r * 64u + i] - m[r]);
                    l[r] += e;
                    for (var u = 0u; u < 4u; u++) {
                        acc[r][u] += e * v[u];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < count; r++) {
        let qo = ((first + r) * p.heads + h) * p.d;
        for (var u = 0u; u < 4u; u++) {
            let j = t + 64u * u;
            if (j < p.d) {
                out[qo + j] = acc[r][u] / l[r];
            }
        }
    }
}
