// The k highest-ranked entries of each segment of SEG entries of each row, in the sampler's
// order: higher value first, ties to the lower id, NaN ranked as -inf (and written as -inf).
// A workgroup takes one segment: each invocation holds PER of its entries, and each of k rounds
// picks the best entry ranking after the previous round's pick (a workgroup reduction). The
// input is a row's logits (p.raw = 1; the id is the index) or the (id, value bits) pairs an
// earlier pass wrote; the output, per row and segment, k (id, value bits) pairs, best first
// (id 0xffffffff past the segment's entries). Run again over its own output until one segment
// is left a row, it gives each row's top k.
struct P { rows: u32, len: u32, k: u32, segs: u32, raw: u32, neg_inf: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

const SEG: u32 = 4096u;
const PER: u32 = 16u;
const NONE: u32 = 0xffffffffu;
var<workgroup> wv: array<f32, 256>;
var<workgroup> wi: array<u32, 256>;

// -inf, from the parameters: WGSL may not spell an infinity as a constant.
fn neg_inf() -> f32 {
    return bitcast<f32>(p.neg_inf);
}

// The value an entry ranks by: NaN (tested on the bits) as -inf.
fn rank_value(bits: u32) -> f32 {
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return neg_inf();
    }
    return bitcast<f32>(bits);
}

fn before(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    return va > vb || (va == vb && ia < ib);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    // Every invocation of a workgroup takes the same branch: the barriers below stay uniform.
    let id = wg.x + wg.y * nwg.x;
    if (id >= p.rows * p.segs) {
        return;
    }
    let row = id / p.segs;
    let seg = id % p.segs;
    var v: array<f32, PER>;
    var ix: array<u32, PER>;
    for (var j = 0u; j < PER; j++) {
        let e = seg * SEG + j * 256u + t;
        v[j] = neg_inf();
        ix[j] = NONE;
        if (e < p.len) {
            let at = row * p.len + e;
            if (p.raw == 1u) {
                ix[j] = e;
                v[j] = rank_value(src[at]);
            } else {
                ix[j] = src[2u * at];
                v[j] = rank_value(src[2u * at + 1u]);
            }
        }
    }
    let out = (row * p.segs + seg) * p.k;
    var pv = 0.0;
    var pi = NONE;
    for (var r = 0u; r < p.k; r++) {
        // This invocation's best entry ranking after the previous pick.
        var bv = neg_inf();
        var bi = NONE;
        for (var j = 0u; j < PER; j++) {
            let after = r == 0u || before(pv, pi, v[j], ix[j]);
            if (after && ix[j] != NONE && (bi == NONE || before(v[j], ix[j], bv, bi))) {
                bv = v[j];
                bi = ix[j];
            }
        }
        wv[t] = bv;
        wi[t] = bi;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s >>= 1u) {
            if (t < s) {
                let ov = wv[t + s];
                let oi = wi[t + s];
                if (oi != NONE && (wi[t] == NONE || before(ov, oi, wv[t], wi[t]))) {
                    wv[t] = ov;
                    wi[t] = oi;
                }
            }
            workgroupBarrier();
        }
        pv = wv[0];
        pi = wi[0];
        if (t == 0u) {
            dst[2u * (out + r)] = pi;
            dst[2u * (out + r) + 1u] = bitcast<u32>(pv);
        }
        workgroupBarrier();
    }
}
