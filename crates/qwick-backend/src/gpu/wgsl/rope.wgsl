// Rotary embedding in place, rotate-half layout: each head's halves (x1, x2) become
// (x1·cos − x2·sin, x2·cos + x1·sin); cs holds the tokens' cos rows, then their sin rows.
struct P { n: u32, width: u32, half: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<f32>;

fn item(id: u32) {
    let per_token = p.width / 2u;
    if (id >= p.n * per_token) {
        return;
    }
    let tok = id / per_token;
    let r = id % per_token;
    let head = r / p.half;
    let j = r % p.half;
    let a = tok * p.width + head * 2u * p.half + j;
    let c = cs[tok * p.half + j];
    let s = cs[(p.n + tok) * p.half + j];
    let x1 = x[a];
    let x2 = x[a + p.half];
    x[a] = x1 * c - x2 * s;
    x[a + p.half] = x2 * c + x1 * s;
}
