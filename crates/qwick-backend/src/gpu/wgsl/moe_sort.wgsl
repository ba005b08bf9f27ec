// Sorts a MoE block's (token, expert) pairs by expert for moe_tile.wgsl, in one workgroup:
// sorted[0..pairs] the pairs' indices grouped by expert (in no set order within an expert),
// then start[e] (experts + 1 words: where expert e's pairs begin) and tile_start[e] (experts +
// 1 words: how many tiles of TM pairs the experts before e take).
struct P { pairs: u32, experts: u32, tm: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> route: array<u32>;
@group(0) @binding(2) var<storage, read_write> sorted: array<u32>;

var<workgroup> count: array<atomic<u32>, 1024>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) t: u32) {
    for (var e = t; e < p.experts; e += 64u) {
        atomicStore(&count[e], 0u);
    }
    workgroupBarrier();
    for (var q = t; q < p.pairs; q += 64u) {
        atomicAdd(&count[route[2u * q]], 1u);
    }
    workgroupBarrier();
    if (t == 0u) {
        var s = 0u;
        var tiles = 0u;
        for (var e = 0u; e < p.experts; e++) {
            let c = atomicLoad(&count[e]);
            sorted[p.pairs + e] = s;
            sorted[p.pairs + p.experts + 1u + e] = tiles;
            atomicStore(&count[e], s);
            s += c;
            tiles += (c + p.tm - 1u) / p.tm;
        }
        sorted[p.pairs + p.experts] = s;
        sorted[p.pairs + 2u * p.experts + 1u] = tiles;
    }
    workgroupBarrier();
    for (var q = t; q < p.pairs; q += 64u) {
        sorted[atomicAdd(&count[route[2u * q]], 1u)] = q;
    }
}
