//! Paged KV cache storage: per layer, K and V as `[num_blocks, block_size, kv_heads, head_dim]`
//! f32. Which blocks belong to which sequence is the engine's business (block tables).

use qwick_backend::attention::PagedKv;

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    /// Allocates a cache; pages are touched only as blocks are used.
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, kv_heads: usize, head_dim: usize) -> KvCache {
        let per = num_blocks * block_size * kv_heads * head_dim;
        KvCache {
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
            layers: (0..layers).map(|_| (vec![0f32; per], vec![0f32; per])).collect(),
        }
    }

    /// Bytes one token takes in all layers.
    pub fn bytes_per_token(layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        layers * 2 * kv_heads * head_dim * 4
    }

    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.num_blocks * self.block_size * self.kv_heads * self.head_dim * 4
    }

    pub fn layer(&self, l: usize) -> PagedKv<'_> {
        let (k, v) = &self.layers[l];
        PagedKv { k, v, block_size: self.block_size, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }

    pub fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        let (k, v) = &mut self.layers[l];
        (k, v)
    }

    /// Copies the first `tokens` slots of block `src` to block `dst` in every layer
    /// (copy-on-write of a shared, partly filled block).
    pub fn copy_block(&mut self, src: usize, dst: usize, tokens: usize) {
        let row = self.kv_heads * self.head_dim;
        let bs = self.block_size * row;
        for (k, v) in &mut self.layers {
            k.copy_within(src * bs..src * bs + tokens * row, dst * bs);
            v.copy_within(src * bs..src * bs + tokens * row, dst * bs);
        }
    }
}
