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
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}
