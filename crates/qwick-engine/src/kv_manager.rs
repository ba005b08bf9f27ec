//! The KV manager: which cache blocks are free and who holds each (reference counts), and the
//! prefix cache of full blocks keyed by the hash of their token prefix, with LRU eviction. The
//! runner allocates from it as sequences grow; the scheduler asks it for cached prefixes, offers
//! it full blocks, and evicts from it to make room.

use crate::blocks::BlockAllocator;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// The hash of the empty prefix.
pub const ROOT_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

struct CachedBlock {
    block: u32,
    parent: u64,
    tokens: Vec<u32>,
    stamp: u64,
}

/// Full KV blocks keyed by the hash of their token prefix, with LRU eviction.
#[derive(Default)]
struct PrefixCache {
    map: HashMap<u64, CachedBlock>,
    /// (stamp, hash) of every entry, oldest first.
    lru: BTreeSet<(u64, u64)>,
    clock: u64,
}

fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    fn touch(&mut self, hash: u64) {
        self.clock += 1;
        if let Some(e) = self.map.get_mut(&hash) {
            self.lru.remove(&(e.stamp, hash));
            e.stamp = self.clock;
            self.lru.insert((e.stamp, hash));
        }
    }

    /// Cached blocks of the longest prefix of `tokens` made of whole blocks, at most `max_blocks`;
    /// and the hash of that prefix.
    fn lookup(&mut self, tokens: &[u32], bs: usize, max_blocks: usize, root: u64) -> (Vec<u32>, u64) {
        let mut blocks = vec![];
        let mut parent = root;
        for chunk in tokens.chunks_exact(bs).take(max_blocks) {
            let h = chain_hash(parent, chunk);
            match self.map.get(&h) {
                Some(e) if e.parent == parent && e.tokens == chunk => blocks.push(e.block),
                _ => break,
            }
            self.touch(h);
            parent = h;
        }
        (blocks, parent)
    }

    /// Registers `block` holding `tokens` after the prefix `parent`; returns its hash and whether
    /// the cache took it (false when that prefix is cached already, in another block).
    fn insert(&mut self, parent: u64, tokens: &[u32], block: u32) -> (u64, bool) {
        let h = chain_hash(parent, tokens);
        if self.map.contains_key(&h) {
            return (h, false);
        }
        self.clock += 1;
        self.map.insert(h, CachedBlock { block, parent, tokens: tokens.to_vec(), stamp: self.clock });
        self.lru.insert((self.clock, h));
        (h, true)
    }

    /// Removes the least recently used entry whose block nobody else references; returns its block.
    fn evict(&mut self, blocks: &BlockAllocator) -> Option<u32> {
        let (stamp, h) = *self.lru.iter().find(|(_, h)| blocks.ref_count(self.map[h].block) == 1)?;
        self.lru.remove(&(stamp, h));
        self.map.remove(&h).map(|e| e.block)
    }

    fn evictable(&self, blocks: &BlockAllocator) -> usize {
        self.map.values().filter(|e| blocks.ref_count(e.block) == 1).count()
    }
}

/// The block allocator and the prefix cache, together.
pub struct KvManager {
    blocks: BlockAllocator,
    prefix: PrefixCache,
}

impl KvManager {
    pub fn new(num_blocks: usize) -> KvManager {
        KvManager { blocks: BlockAllocator::new(num_blocks), prefix: PrefixCache::default() }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.num_blocks()
    }

    pub fn num_free(&self) -> usize {
        self.blocks.num_free()
    }

    /// Blocks with a reference (sequences' or the prefix cache's).
    pub fn num_used(&self) -> usize {
        self.blocks.num_used()
    }

    /// A free block with one reference, or `None` when none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        self.blocks.allocate()
    }

    pub fn retain(&mut self, b: u32) {
        self.blocks.retain(b);
    }

    pub fn release(&mut self, b: u32) {
        self.blocks.release(b);
    }

    pub fn ref_count(&self, b: u32) -> u32 {
        self.blocks.ref_count(b)
    }

    /// Cached blocks of the longest prefix of `tokens` made of whole blocks of `bs` tokens, at
    /// most `max_blocks`, hashed from `root` (prefixes of different roots are never shared);
    /// and the hash of that prefix.
    pub fn lookup(&mut self, tokens: &[u32], bs: usize, max_blocks: usize, root: u64) -> (Vec<u32>, u64) {
        self.prefix.lookup(tokens, bs, max_blocks, root)
    }

    /// Offers the full block `block` holding `tokens` after the prefix `parent` to the prefix
    /// cache, which keeps a reference if it takes it; returns the hash of the longer prefix.
    pub fn offer(&mut self, parent: u64, tokens: &[u32], block: u32) -> u64 {
        let (h, taken) = self.prefix.insert(parent, tokens, block);
        if taken {
            self.blocks.retain(block);
        }
        h
    }

    /// Frees the least recently used cached block no sequence holds; false when there is none.
    pub fn evict_one(&mut self) -> bool {
        match self.prefix.evict(&self.blocks) {
            Some(b) => {
                self.blocks.release(b);
                true
            }
            None => false,
        }
    }

    /// Blocks the prefix cache keeps.
    pub fn cached_blocks(&self) -> usize {
        self.prefix.map.len()
    }

    /// Cached blocks that only the prefix cache holds (free to evict).
    pub fn evictable(&self) -> usize {
        self.prefix.evictable(&self.blocks)
    }

    /// Checks the bookkeeping against `held`, the references sequences hold on each block: every
    /// block's count is those plus one if the prefix cache keeps it; the free list holds exactly
    /// the blocks with none; the prefix cache's entries and LRU order agree.
    pub fn check(&self, mut held: Vec<u32>) -> Result<(), String> {
        for (h, e) in &self.prefix.map {
            let Some(r) = held.get_mut(e.block as usize) else {
                return Err(format!("the prefix cache names block {}, past the cache", e.block));
            };
            *r += 1;
            if !self.prefix.lru.contains(&(e.stamp, *h)) {
                return Err(format!("prefix cache entry of block {} is not in the LRU order", e.block));
            }
        }
        if self.prefix.lru.len() != self.prefix.map.len() {
            return Err("the prefix cache's LRU order and entries differ".into());
        }
        for (block, &w) in held.iter().enumerate() {
            let have = self.blocks.ref_count(block as u32);
            if have != w {
                return Err(format!("block {block} has {have} references, but {w} holders"));
            }
        }
        if !self.blocks.free_list_consistent() {
            return Err("the free list does not match the blocks without references".into());
        }
        Ok(())
    }
}
