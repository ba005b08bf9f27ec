// Merges the splits of attention.wgsl: value j of (token, head) `row` is
// Σ_s e^(m_s − M) · acc_s[j] / Σ_s e^(m_s − M) · l_s over its splits' maximum m_s, sum l_s and
// unnormalised values acc_s (part: splits records of d + 2 values a row), M the largest m_s.
// A split without positions has m_s = −3.4e38 and l_s = 0 (its weight is 0); the first split
// always has positions.
struct P { rows: u32, d: u32, splits: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn item(i: u32) {
    if (i >= p.rows * p.d) {
        return;
    }
    let row = i / p.d;
    let j = i % p.d;
    let rec = p.d + 2u;
    let base = row * p.splits * rec;
    var big = -3.4028235e38;
    for (var s = 0u; s < p.splits; s++) {
        big = max(big, part[base + s * rec]);
    }
    var l = 0.0;
    var v = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let o = base + s * rec;
        let e = exp(part[o] - big);
        l += e * part[o + 1u];
        v += e * part[o + 2u + j];
    }
    out[i] = v / l;
}
