//! A persistent thread pool for data-parallel kernels.
//!
//! `run(f)` calls `f(t)` once on each of the pool's `n` threads (`t` in `0..n`; the caller is
//! thread 0) and returns when all have finished. Workers spin briefly between jobs (a forward
//! pass issues hundreds of short parallel regions per token) and then sleep on a condvar.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// The current job, valid while a `run` call is in flight.
    job: UnsafeCell<Option<*const Job>>,
    generation: AtomicUsize,
    remaining: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// The raw job pointer is only dereferenced while `run` keeps the closure alive.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
    pinned: bool,
}

const SPIN: Duration = Duration::from_millis(2);

impl ThreadPool {
    /// A pool of `n` threads in all (the calling thread counts as one).
    pub fn new(n: usize) -> ThreadPool {
        let n = n.max(1);
        let shared = Shared::new();
        // Pin thread t to the t-th CPU this process may use, so spinning threads never share a
        // CPU (on a 2-core machine an unpinned pair can sit on one core for a scheduler tick).
        let cpus = allowed_cpus();
        let pin = n <= cpus.len() && std::env::var("QWICK_PIN").map_or(true, |v| v != "0");
        if pin {
            pin_to(cpus[0]);
        } else {
            set_affinity(cpus);
        }
        let workers = (1..n)
            .map(|t| {
                let s = shared.clone();
                let cpu = if pin { Some(cpus[t]) } else { None };
                std::thread::Builder::new()
                    .name(format!("qwick-worker-{t}"))
                    .spawn(move || {
                        if let Some(c) = cpu {
                            pin_to(c);
                        }
                        worker(s, t)
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()), pinned: pin }
    }

    /// A pool of just the calling thread, which it leaves where it runs (no pinning): for
    /// kernels that call pool-taking ops from inside another pool's work items.
    pub fn inline() -> ThreadPool {
        ThreadPool { shared: Shared::new(), workers: vec![], run_lock: Mutex::new(()), pinned: false }
    }

    /// The number of threads available: `QWICK_THREADS` or the machine's parallelism.
    pub fn default_threads() -> usize {
        std::env::var("QWICK_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(t)` for every thread index `t` in `0..threads()`, in parallel.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the closure's lifetime is erased, but it outlives every use: workers only call
        // it between the generation bump below and their `remaining` decrement, and this
        // function waits for `remaining` to reach 0 before returning (and clears the slot).
        // The slot is written only here, under `run_lock`, while no worker reads it.
        let ptr: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        unsafe { *s.job.get() = Some(ptr) };
        s.remaining.store(self.workers.len(), Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        while s.remaining.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: every worker has finished with the job (remaining is 0); no one reads the slot.
        unsafe { *s.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a qwick worker thread panicked");
        }
    }

    /// Splits `0..n` into `threads()` contiguous chunks whose boundaries are multiples of
    /// `align` and calls `f(range)` for each non-empty one in parallel.
    pub fn for_chunks(&self, n: usize, align: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let t = self.threads();
        if t == 1 || n <= align {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        self.run(&|i| {
            let r = chunk(n, align, t, i);
            if !r.is_empty() {
                f(r);
            }
        });
    }
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            job: UnsafeCell::new(None),
            generation: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        })
    }
}

/// Vectors of at least this many bytes are written by all the pool's threads (smaller ones by
/// the caller alone).
const PAR_FILL_MIN_BYTES: usize = 1 << 18;

/// A vector of `n` values built in parallel: `f(range, out)` must write every element of `out`,
/// the values `range` of the vector. Large activation buffers are built this way so that
/// zeroing or copying them does not leave the other threads waiting.
pub(crate) fn par_build<T: Copy + Send>(
    pool: &ThreadPool,
    n: usize,
    f: impl Fn(Range<usize>, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let sp = SendPtr::new(&mut v.spare_capacity_mut()[..n]);
    let run = |r: Range<usize>| {
        // SAFETY: chunks do not overlap and lie within the n spare elements.
        let o = unsafe { sp.slice(r.start, r.len()) };
        f(r, o)
    };
    if n * std::mem::size_of::<T>() < PAR_FILL_MIN_BYTES {
        run(0..n);
    } else {
        pool.for_chunks(n, 16, &run);
    }
    // SAFETY: the chunks cover 0..n and `f` wrote every element of each (a panic in `f` unwinds
    // past this line, dropping `v` with length 0).
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros (see [`par_build`]).
pub fn zeros(pool: &ThreadPool, n: usize) -> Vec<f32> {
    par_build(pool, n, |_, o| o.fill(std::mem::MaybeUninit::new(0.0)))
}

/// A copy of `x` (see [`par_build`]).
pub fn copied(pool: &ThreadPool, x: &[f32]) -> Vec<f32> {
    par_build(pool, x.len(), |r, o| {
        for (d, &s) in o.iter_mut().zip(&x[r]) {
            d.write(s);
        }
    })
}

/// The CPUs this process may run on, read once before any thread is pinned.
fn allowed_cpus() -> &'static [usize] {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    CPUS.get_or_init(|| {
        // SAFETY: cpu_set_t is plain data (all-zero is the empty set); the call writes at most
        // size_of::<cpu_set_t>() bytes into it, and CPU_ISSET reads indexes below CPU_SETSIZE.
        #[cfg(target_os = "linux")]
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                return (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect();
            }
        }
        (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect()
    })
}

/// Binds the calling thread to `cpus` (best effort).
fn set_affinity(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; `cpus` come from allowed_cpus (below CPU_SETSIZE); the
    // call reads size_of::<cpu_set_t>() bytes of it.
    #[cfg(target_os = "linux")]
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpus;
}

fn pin_to(cpu: usize) {
    set_affinity(&[cpu]);
}

/// Chunk `i` of `t` when splitting `0..n` in units of `align`.
pub fn chunk(n: usize, align: usize, t: usize, i: usize) -> Range<usize> {
    let units = n.div_ceil(align);
    let per = units / t;
    let extra = units % t;
    let start = i * per + i.min(extra);
    let end = start + per + usize::from(i < extra);
    (start * align).min(n)..(end * align).min(n)
}

fn worker(s: Arc<Shared>, t: usize) {
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the slot was written before the generation bump this worker saw, and `run`
        // keeps the closure alive until this worker decrements `remaining` below.
        let job = unsafe { (*s.job.get()).expect("job set before generation bump") };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(t) }));
        if r.is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if self.pinned {
            // Give the calling thread its CPUs back.
            set_affinity(allowed_cpus());
        }
    }
}

/// A mutable slice shared with pool threads that each write a disjoint part of it: it keeps
/// the borrow it came from (so it cannot outlive the slice) and the slice's length (so parts
/// are bounds-checked); only the disjointness is the caller's to promise.
pub struct SendPtr<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a `SendPtr` is a `&mut [T]` whose parts threads take one each (`slice` demands the
// parts be disjoint), which is sound to move or share across threads exactly when `&mut [T]`
// is: when `T: Send`.
unsafe impl<T: Send> Send for SendPtr<'_, T> {}
// SAFETY: as for `Send`: shared, it only hands out disjoint `&mut` parts.
unsafe impl<T: Send> Sync for SendPtr<'_, T> {}

impl<T> Clone for SendPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<'_, T> {}

impl<'a, T> SendPtr<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        SendPtr { ptr: s.as_mut_ptr(), len: s.len(), _borrow: std::marker::PhantomData }
    }

    /// The first element, for kernels that take raw pointers (writing through it is
    /// `unsafe` as with any raw pointer; its extent is [`SendPtr::len`]).
    pub fn ptr(&self) -> *mut T {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `off..off + len` (panics when out of bounds).
    ///
    /// # Safety
    /// No other thread reads or writes these elements while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &'a mut [T] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len), "part {off}+{len} of {} elements", self.len);
        // SAFETY: in bounds of the borrowed slice (checked above), which lives for 'a; the
        // caller promises no other thread touches this part meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn parallel_zeros_and_copies_fill_every_value() {
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            for n in [0, 5, PAR_FILL_MIN_BYTES / 4 - 1, PAR_FILL_MIN_BYTES / 4, PAR_FILL_MIN_BYTES + 17] {
                assert!(zeros(&pool, n).iter().all(|&v| v == 0.0) && zeros(&pool, n).len() == n);
                let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
                assert_eq!(copied(&pool, &x), x);
            }
        }
    }

    #[test]
    fn every_thread_runs_once_per_job() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let sum = AtomicU64::new(0);
            pool.run(&|t| {
                sum.fetch_add(1 << (8 * t), Ordering::SeqCst);
            });
            assert_eq!(sum.load(Ordering::SeqCst), 0x010101);
        }
        std::thread::sleep(Duration::from_millis(10)); // let workers fall asleep
        let sum = AtomicU64::new(0);
        pool.run(&|_| {
            sum.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(sum.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn chunks_cover_range_aligned() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            for t in 1..5 {
                let mut next = 0;
                for i in 0..t {
                    let r = chunk(n, 16, t, i);
                    assert_eq!(r.start, next.min(n));
                    assert!(r.start.is_multiple_of(16) || r.start == n);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
