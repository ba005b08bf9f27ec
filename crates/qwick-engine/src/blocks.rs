//! The KV block allocator: a free list of fixed-size blocks with reference counts, so that
//! blocks can later be shared between sequences (prefix caching).

#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    refs: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> BlockAllocator {
        // Pop from the end: hand out low block ids first.
        BlockAllocator { free: (0..num_blocks as u32).rev().collect(), refs: vec![0; num_blocks] }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// A free block with reference count 1, or None when the cache is full.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Adds a reference to a block in use.
    pub fn retain(&mut self, b: u32) {
        assert!(self.refs[b as usize] > 0, "retain of free block {b}");
        self.refs[b as usize] += 1;
    }

    /// Drops a reference; the block returns to the free list at zero.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "release of free block {b}");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    pub fn ref_count(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }

    /// Whether the free list holds exactly the blocks with no reference, each once.
    pub fn free_list_consistent(&self) -> bool {
        let mut seen = vec![false; self.refs.len()];
        for &b in &self.free {
            if self.refs[b as usize] != 0 || std::mem::replace(&mut seen[b as usize], true) {
                return false;
            }
        }
        self.free.len() == self.refs.iter().filter(|&&r| r == 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_share() {
        let mut a = BlockAllocator::new(3);
        let (x, y, z) = (a.allocate().unwrap(), a.allocate().unwrap(), a.allocate().unwrap());
        assert_eq!((x, y, z), (0, 1, 2));
        assert!(a.allocate().is_none());
        a.retain(y);
        a.release(y);
        assert_eq!(a.num_free(), 0);
        a.release(y);
        assert_eq!(a.num_free(), 1);
        assert_eq!(a.allocate(), Some(1));
        for b in [x, y, z] {
            a.release(b);
        }
        assert_eq!(a.num_used(), 0);
    }
}
