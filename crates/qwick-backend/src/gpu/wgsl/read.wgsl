// Reads every word of `src` once (the bandwidth probe): each invocation sums a strided run of
// vec4 words; the sum is written only when it equals a value zeros cannot give, so the reads
// are not optimised away and nothing is written.
struct P { words4: u32, stride: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let id = gid.x;
    var s = vec4<u32>(0u);
    for (var i = id; i < p.words4; i += p.stride) {
        s += src[i];
    }
    if (s.x + s.y + s.z + s.w == 0xdeadbeefu) {
        out[0] = 1u;
    }
}
