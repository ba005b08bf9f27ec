// The experts' products of moe_matmul.wgsl for many pairs: the pairs sorted by expert
// (moe_sort.wgsl), each expert's pairs cut into tiles of TM, and each tile's products with 64
// rows of its expert's weight taken as a dense tile (tile.wgsl), so an expert's weights are read
// once per TM of its pairs. Workgroups are numbered (row group, tile slot): slots past the
// tiles the experts take return at once.
struct P { pairs: u32, n: u32, k: u32, row_bytes: u32, expert_bytes: u32, chunk_bytes: u32, chunks_per_block: u32, topk: u32, per_token: u32, experts: u32, slots: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> sorted: array<u32>;

var<private> base: u32;

fn xrow(r: u32) -> u32 {
    let q = sorted[base + r];
    return select(q, q / p.topk, p.per_token == 1u) * p.k;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = wg.x + wg.y * nwg.x;
    let slot = id % p.slots;
    let tile_start = p.pairs + p.experts + 1u;
    if (id >= p.slots * ((p.n + 63u) / 64u) || slot >= sorted[tile_start + p.experts]) {
        return;
    }
    // The expert whose tiles hold this slot: the last e with tile_start[e] <= slot.
    var lo = 0u;
    var hi = p.experts;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (sorted[tile_start + mid] <= slot) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let e = lo;
    base = sorted[p.pairs + e] + (slot - sorted[tile_start + e]) * TM;
    let mr = min(TM, sorted[p.pairs + e + 1u] - base);
    let row = (id / p.slots) * 64u + t;
    var acc: array<f32, 32>;
    tile_products(t, e * p.expert_bytes + row * p.row_bytes, row < p.n, mr, &acc);
    if (row < p.n) {
        for (var r = 0u; r < mr; r++) {
            y[sorted[base + r] * p.n + row] = acc[r];
        }
    }
}
