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

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    /// Offers the full blocks `blocks` holding `tokens` (block `k` holds `tokens[k * BS..]`) as a
    /// sequence computing them would; returns the hash of the whole prefix.
    fn offer_all(kv: &mut KvManager, tokens: &[u32], blocks: &[u32]) -> u64 {
        let mut h = ROOT_HASH;
        for (chunk, &b) in tokens.chunks_exact(BS).zip(blocks) {
            h = kv.offer(h, chunk, b);
        }
        h
    }

    /// Allocates `n` blocks.
    fn alloc(kv: &mut KvManager, n: usize) -> Vec<u32> {
        (0..n).map(|_| kv.allocate().unwrap()).collect()
    }

    #[test]
    fn allocates_and_frees_blocks_with_reference_counts() {
        let mut kv = KvManager::new(4);
        assert_eq!((kv.num_blocks(), kv.num_free(), kv.num_used()), (4, 4, 0));
        let b = alloc(&mut kv, 4);
        assert_eq!(b, [0, 1, 2, 3]);
        assert_eq!(kv.allocate(), None, "out of blocks");
        assert_eq!((kv.num_free(), kv.num_used()), (0, 4));
        kv.retain(2);
        assert_eq!(kv.ref_count(2), 2);
        kv.release(2);
        assert_eq!((kv.ref_count(2), kv.num_free()), (1, 0), "still held once");
        kv.release(2);
        kv.release(0);
        assert_eq!((kv.ref_count(2), kv.num_free(), kv.num_used()), (0, 2, 2));
        assert_eq!(kv.check(vec![0, 1, 0, 1]), Ok(()));
        // Freed blocks are handed out again, the last freed first.
        assert_eq!(kv.allocate(), Some(0));
        assert_eq!(kv.allocate(), Some(2));
        assert_eq!(kv.allocate(), None);
        for b in 0..4 {
            kv.release(b);
        }
        assert_eq!((kv.num_free(), kv.num_used()), (4, 0));
        assert_eq!(kv.check(vec![0; 4]), Ok(()));
    }

    #[test]
    #[should_panic(expected = "release of free block 1")]
    fn releasing_a_free_block_panics() {
        let mut kv = KvManager::new(2);
        kv.release(1);
    }

    #[test]
    fn a_second_sequence_with_the_same_prefix_reuses_its_blocks() {
        let mut kv = KvManager::new(8);
        let a: Vec<u32> = (0..10).collect();
        let blocks = alloc(&mut kv, 3);
        // Only full blocks are offered: two of a's 10 tokens.
        let h = offer_all(&mut kv, &a, &blocks);
        assert_eq!(kv.cached_blocks(), 2);
        assert_eq!((kv.ref_count(0), kv.ref_count(1), kv.ref_count(2)), (2, 2, 1));
        assert_eq!(kv.evictable(), 0, "the sequence still holds them");

        // The same 8 tokens, then others: both blocks.
        let mut b: Vec<u32> = (0..8).collect();
        b.extend([50, 51, 52, 53, 54]);
        assert_eq!(kv.lookup(&b, BS, 3, ROOT_HASH), (vec![0, 1], h));
        // Capped by max_blocks.
        assert_eq!(kv.lookup(&b, BS, 1, ROOT_HASH).0, vec![0]);
        // The first block only: the second differs in its last token.
        let mut c = b.clone();
        c[7] = 99;
        assert_eq!(kv.lookup(&c, BS, 3, ROOT_HASH).0, vec![0]);
        // A block is shared only after the same prefix: block 1's tokens after other ones miss.
        let d: Vec<u32> = [9, 9, 9, 9].into_iter().chain(4..8).collect();
        assert!(kv.lookup(&d, BS, 2, ROOT_HASH).0.is_empty());
        // Nor under another root (another adapter).
        assert!(kv.lookup(&b, BS, 3, ROOT_HASH ^ 1).0.is_empty());
        // Shorter than a block: nothing.
        assert!(kv.lookup(&b[..3], BS, 3, ROOT_HASH).0.is_empty());
        // A lookup takes no reference; the caller retains what it uses.
        assert_eq!((kv.ref_count(0), kv.ref_count(1)), (2, 2));
        assert_eq!(kv.check(vec![1, 1, 1, 0, 0, 0, 0, 0]), Ok(()));
    }

    #[test]
    fn the_same_prefix_offered_twice_is_kept_once() {
        let mut kv = KvManager::new(4);
        let t = [1, 2, 3, 4];
        let (x, y) = (kv.allocate().unwrap(), kv.allocate().unwrap());
        let hx = kv.offer(ROOT_HASH, &t, x);
        let hy = kv.offer(ROOT_HASH, &t, y);
        assert_eq!(hx, hy, "the chain goes on from the same hash");
        assert_eq!((kv.ref_count(x), kv.ref_count(y), kv.cached_blocks()), (2, 1, 1));
        assert_eq!(kv.lookup(&t, BS, 1, ROOT_HASH).0, vec![x]);
        kv.release(y);
        assert_eq!(kv.num_free(), 3);
        assert_eq!(kv.check(vec![1, 0, 0, 0]), Ok(()));
    }

    #[test]
    fn eviction_frees_the_least_recently_used_unreferenced_blocks_first() {
        let mut kv = KvManager::new(6);
        // Three one-block prefixes, offered in the order p, q, r.
        let (p, q, r) = ([1u32, 1, 1, 1], [2u32, 2, 2, 2], [3u32, 3, 3, 3]);
        let blocks = alloc(&mut kv, 3);
        for (t, &b) in [p, q, r].iter().zip(&blocks) {
            kv.offer(ROOT_HASH, t, b);
        }
        // The sequences end: only the cache holds the blocks.
        for &b in &blocks {
            kv.release(b);
        }
        assert_eq!((kv.num_free(), kv.evictable(), kv.cached_blocks()), (3, 3, 3));
        // p is used again (a lookup hit), and a sequence holds q.
        assert_eq!(kv.lookup(&p, BS, 1, ROOT_HASH).0, vec![blocks[0]]);
        let q_block = kv.lookup(&q, BS, 1, ROOT_HASH).0[0];
        kv.retain(q_block);
        assert_eq!(kv.evictable(), 2);
        // r is the oldest unreferenced entry, then p; q is held.
        assert!(kv.evict_one());
        assert_eq!((kv.ref_count(blocks[2]), kv.num_free()), (0, 4));
        assert!(kv.lookup(&r, BS, 1, ROOT_HASH).0.is_empty());
        assert!(kv.evict_one());
        assert_eq!((kv.ref_count(blocks[0]), kv.num_free()), (0, 5));
        assert!(!kv.evict_one(), "the only cached block left is in use");
        assert_eq!((kv.cached_blocks(), kv.evictable(), kv.ref_count(q_block)), (1, 0, 2));
        assert_eq!(kv.check(vec![0, 1, 0, 0, 0, 0]), Ok(()));
        // Once released, it goes too, and the cache is empty.
        kv.release(q_block);
        assert!(kv.evict_one());
        assert!(!kv.evict_one());
        assert_eq!((kv.num_free(), kv.cached_blocks()), (6, 0));
        assert_eq!(kv.check(vec![0; 6]), Ok(()));
    }

    #[test]
    fn a_lookup_hit_renews_a_whole_chain() {
        let mut kv = KvManager::new(4);
        let long: Vec<u32> = (0..8).collect();
        let other = [7u32, 7, 7, 7];
        let chain = alloc(&mut kv, 2);
        offer_all(&mut kv, &long, &chain);
        let o = kv.allocate().unwrap();
        kv.offer(ROOT_HASH, &other, o);
        for b in [chain[0], chain[1], o] {
            kv.release(b);
        }
        // The chain was offered first, but its lookup makes `other` the oldest.
        assert_eq!(kv.lookup(&long, BS, 2, ROOT_HASH).0, chain);
        assert!(kv.evict_one());
        assert_eq!(kv.ref_count(o), 0);
        assert_eq!(kv.lookup(&long, BS, 2, ROOT_HASH).0, chain);
        // Then the chain's head (touched first), which leaves its tail unreachable.
        assert!(kv.evict_one());
        assert_eq!(kv.ref_count(chain[0]), 0);
        assert!(kv.lookup(&long, BS, 2, ROOT_HASH).0.is_empty());
        assert_eq!(kv.cached_blocks(), 1);
        assert_eq!(kv.check(vec![0; 4]), Ok(()));
    }

    #[test]
    fn check_finds_wrong_counts() {
        let mut kv = KvManager::new(3);
        let b = kv.allocate().unwrap();
        kv.offer(ROOT_HASH, &[1, 2, 3, 4], b);
        assert_eq!(kv.check(vec![1, 0, 0]), Ok(()));
        // A sequence said to hold it twice, or not at all.
        assert_eq!(kv.check(vec![2, 0, 0]), Err("block 0 has 2 references, but 3 holders".into()));
        assert_eq!(kv.check(vec![0, 0, 0]), Err("block 0 has 2 references, but 1 holders".into()));
        assert_eq!(kv.check(vec![1, 1, 0]), Err("block 1 has 0 references, but 1 holders".into()));
    }
}
