//! Allocator settings for a process that runs forward passes.
//!
//! Each step allocates activation and logit buffers of a few MB. glibc serves allocations over
//! its mmap threshold (128 KiB at first) with fresh mappings, so every step would page-fault
//! and zero them again, and it returns freed heap tops to the kernel. Raising both thresholds
//! keeps freed buffers in the heap for the next step.

use std::sync::Once;

/// Applies the settings once per process (no-op on non-glibc targets).
pub fn tune_allocator() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes glibc's allocator thresholds; it is called once, before
        // the runner's threads allocate, with valid parameter constants.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// Drops the resident pages of a read-only file mapping that lie wholly inside `b`: they leave
/// the process's memory (and its RSS) and are read again from the file if touched later.
pub fn release_mapped(b: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        let page = 4096;
        let start = (b.as_ptr() as usize).next_multiple_of(page);
        let end = (b.as_ptr() as usize + b.len()) / page * page;
        if end > start {
            // Safety: the range lies inside `b`, part of a read-only mapping of an unchanging
            // file; dropped pages read back the same bytes, so `b` keeps its contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// A zeroed buffer in its own anonymous mapping, asked to be backed by transparent huge pages.
pub struct HugeBuf {
    map: memmap2::MmapMut,
    len: usize,
}

impl HugeBuf {
    pub fn zeroed(len: usize) -> HugeBuf {
        let map = memmap2::MmapMut::map_anon(len.max(1)).expect("anonymous mapping for weights");
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        HugeBuf { map, len }
    }
}

impl std::ops::Deref for HugeBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl std::ops::DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}
