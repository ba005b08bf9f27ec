//! Paged KV cache storage: per layer, K and V as `[num_blocks, kv_heads, block_size, head_dim]`
//! in a float format (f32, bf16 or f16). Which blocks belong to which sequence is the engine's
//! business (block tables).

use qwick_backend::attention::{KvLayout, PagedKv};
use qwick_backend::pool::SendPtr;
use qwick_backend::{Ctx, Format};

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The element format of K and V.
    pub format: Format,
    layers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The formats a KV cache can hold.
pub const KV_FORMATS: [Format; 3] = [Format::F32, Format::BF16, Format::F16];

impl KvCache {
    /// Allocates a cache of f32 elements; pages are touched only as blocks are used.
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, kv_heads: usize, head_dim: usize) -> KvCache {
        Self::with_format(Format::F32, layers, num_blocks, block_size, kv_heads, head_dim)
    }

    /// A cache of `format` elements (one of [`KV_FORMATS`]).
    pub fn with_format(
        format: Format,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> KvCache {
        assert!(KV_FORMATS.contains(&format), "KV cache elements cannot be {format}");
        let per = num_blocks * block_size * kv_heads * head_dim * format.row_bytes(1);
        KvCache {
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
            format,
            layers: (0..layers).map(|_| (vec![0u8; per], vec![0u8; per])).collect(),
        }
    }

    /// Bytes one token takes in all layers.
    pub fn bytes_per_token(format: Format, layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        layers * 2 * kv_heads * head_dim * format.row_bytes(1)
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    pub fn layer(&self, l: usize) -> PagedKv<'_> {
        let (k, v) = &self.layers[l];
        PagedKv {
            k,
            v,
            format: self.format,
            block_size: self.block_size,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Layer `l`'s K and V bytes (placed as [`KvCache::layout`] says, in [`KvCache::format`]).
    pub fn layer_mut(&mut self, l: usize) -> (&mut [u8], &mut [u8]) {
        let (k, v) = &mut self.layers[l];
        (k, v)
    }

    /// Writes the K and V rows of `slots.len()` tokens (`[tokens, kv_heads · head_dim]` each) of
    /// layer `l` to their cache slots (`slots[i]`: block × block_size + offset), encoded in the
    /// cache's format, each KV head's values to that head's rows of the block. From 8 tokens on,
    /// the KV heads are spread over the threads.
    pub fn write(&mut self, ctx: Ctx, l: usize, k: &[f32], v: &[f32], slots: &[u32]) {
        let (fmt, layout) = (self.format, self.layout());
        let (es, bs, d, heads) = (fmt.row_bytes(1), self.block_size, self.head_dim, self.kv_heads);
        let (n, width) = (slots.len(), heads * d);
        assert!(k.len() >= n * width && v.len() >= n * width, "K/V rows for every slot");
        assert!(slots.iter().all(|&s| (s as usize) < self.num_blocks * bs), "a KV slot outside the cache");
        let (kc, vc) = self.layer_mut(l);
        let (kp, vp) = (SendPtr::new(kc), SendPtr::new(vc));
        ctx.pool.for_chunks(heads, if n >= 8 { 1 } else { heads }, &|hs| {
            for (i, &slot) in slots.iter().enumerate() {
                let slot = slot as usize;
                for h in hs.clone() {
                    let (at, src) = (layout.row(slot / bs, h, slot % bs) * es, i * width + h * d);
                    // SAFETY: the slot is inside the cache (asserted above), so row (slot, h) is
                    // inside this layer's buffers; each chunk of heads writes only its heads'
                    // rows, so no two threads write the same bytes.
                    unsafe {
                        fmt.encode_floats(&k[src..src + d], kp.slice(at, d * es));
                        fmt.encode_floats(&v[src..src + d], vp.slice(at, d * es));
                    }
                }
            }
        });
    }

    /// Where values live in each layer's K and V buffers.
    pub fn layout(&self) -> KvLayout {
        KvLayout { block_size: self.block_size, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }
}
