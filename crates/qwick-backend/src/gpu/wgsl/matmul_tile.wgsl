// The products of matmul.wgsl for many activation rows: tiles of 64 weight rows by TM
// activation rows (tile.wgsl).

var<private> m0: u32;

fn xrow(r: u32) -> u32 {
    return p.x_off + (m0 + r) * p.ldx;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let id = wg.x + wg.y * nwg.x;
    let mtiles = (p.m + TM - 1u) / TM;
    if (id >= mtiles * ((p.n + 63u) / 64u)) {
        return;
    }
    m0 = (id % mtiles) * TM;
    let row = (id / mtiles) * 64u + t;
    let mr = min(TM, p.m - m0);
    var acc: array<f32, 32>;
    tile_products(t, p.w_off + row * p.row_bytes, row < p.n, mr, &acc);
    if (row < p.n) {
        for (var r = 0u; r < mr; r++) {
            y[p.y_off + (m0 + r) * p.ldy + row] = acc[r];
        }
    }
}
