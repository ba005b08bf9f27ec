// Writes n tokens' K (or V) rows, [n, kv_heads · d], to their cache slots: cache layout
// [blocks, kv_heads, block_size, d], slot = block · block_size + offset; elements as the cache
// holds them (kernels.rs' kv_elements, prepended): each invocation writes one word, 32 / bits of
// them.
struct P { n: u32, kv_heads: u32, d: u32, block_size: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> slots: array<u32>;
@group(0) @binding(3) var<storage, read_write> cache: array<u32>;

fn item(word: u32) {
    let width = p.kv_heads * p.d;
    let id = word * PER_WORD;
    if (id >= p.n * width) {
        return;
    }
    let tok = id / width;
    let h = (id % width) / p.d;
    let j = id % p.d;
    let slot = slots[tok];
    let block = slot / p.block_size;
    let at = ((block * p.kv_heads + h) * p.block_size + slot % p.block_size) * p.d + j;
    cache[at / PER_WORD] = encode(id);
}
