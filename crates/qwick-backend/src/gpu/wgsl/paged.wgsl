// Shared by attention.wgsl and attention_tile.wgsl (prepended by kernels.rs, after the cache's
// element reader): the queries, the paged K and V caches, the step's info (positions[n],
// seq_of_token[n], table_start[seqs], then the block tables) and where a position's K/V row
// lies. Each kernel declares its own `p`, with at least n, kv_heads, d, block_size and seqs.
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<u32>;
@group(0) @binding(3) var<storage, read> vc: array<u32>;
@group(0) @binding(4) var<storage, read> info: array<u32>;

// Where the block table of token `tok`'s sequence starts in info.
fn table_of(tok: u32) -> u32 {
    return 2u * p.n + p.seqs + info[2u * p.n + info[p.n + tok]];
}

// The first element of K/V head `kvh`'s row at position `pos`, by the block table at `table`.
fn key_row(table: u32, kvh: u32, pos: u32) -> u32 {
    let block = info[table + pos / p.block_size];
    return ((block * p.kv_heads + kvh) * p.block_size + pos % p.block_size) * p.d;
}
