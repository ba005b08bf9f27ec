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

    /// A zeroed anonymous mapping on small pages only, as a file's mapped pages are (for
    /// timing reads of such weights).
    pub fn small_pages(len: usize) -> HugeBuf {
        let map = memmap2::MmapMut::map_anon(len.max(1)).expect("anonymous mapping");
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::NoHugePage);
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

/// One cache line, the unit of [`Aligned`] buffers.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Element types of [`Aligned`]: valid for every bit pattern (so zeroed bytes are values) and
/// aligned to at most 64 bytes.
pub trait Plain: Copy + sealed::Sealed {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for f32 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for f32 {}
}

/// A zeroed buffer of `len` values starting on a cache-line boundary. The allocator promises
/// only 16 bytes, and a 64-byte vector load or AMX tile row that straddles two lines runs at
/// up to half speed: the kernels' packed panels and tiles live in these.
pub struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    pub fn zeroed(len: usize) -> Aligned<T> {
        let lines = vec![Line([0; 64]); (len * std::mem::size_of::<T>()).div_ceil(64)];
        Aligned { lines, len, _t: std::marker::PhantomData }
    }

    /// [`Aligned::zeroed`] with the zeros written by `pool`'s threads.
    pub fn zeroed_on(pool: &crate::pool::ThreadPool, len: usize) -> Aligned<T> {
        let n = (len * std::mem::size_of::<T>()).div_ceil(64);
        let lines = crate::pool::par_build(pool, n, |_, o| o.fill(std::mem::MaybeUninit::new(Line([0; 64]))));
        Aligned { lines, len, _t: std::marker::PhantomData }
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds at least `len · size_of::<T>()` initialised bytes on a 64-byte
        // boundary (at least T's alignment), and every bit pattern is a valid T (`Plain`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes the slice the only access.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::Aligned;

    #[test]
    fn aligned_buffers_start_on_a_line_and_are_zeroed() {
        for len in [0, 1, 17, 4096 + 3] {
            let mut b = Aligned::<f32>::zeroed(len);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            b.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32));
            assert_eq!(Aligned::<u16>::zeroed(len).as_ptr() as usize % 64, 0);
            let pool = crate::pool::ThreadPool::new(2);
            let big = Aligned::<u16>::zeroed_on(&pool, len * 100);
            assert!(
                (big.as_ptr() as usize).is_multiple_of(64) && big.len() == len * 100 && big.iter().all(|&v| v == 0)
            );
        }
    }
}
