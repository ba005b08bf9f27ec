// Moving whole rows of `width` values, as #BODY says: the gather copies row idx[i] of a into
// row i of b; the scatter-add adds row i of b, times the weight idx[2i + 1] (f32 bits), to row
// idx[2i] of a (each target row at most once per dispatch).
struct P { rows: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;

fn item(id: u32) {
    if (id >= p.rows * p.width) {
        return;
    }
    let i = id / p.width;
    let j = id % p.width;
    #BODY
}
