//! A persistent pool of spinning worker threads for the short parallel sections of inference.
//!
//! A decode step of a 0.5B model runs ~200 parallel sections (one per matrix multiplication,
//! plus attention), each only 20–500 µs long. Handing each one to rayon costs a wake-up of
//! sleeping workers (futex, scheduler) per section: ~20 µs measured here, which is the whole
//! cost of a small projection and ~10 % of a token. These workers instead spin on an epoch
//! counter for a while after each section (then yield), so the next section starts within a cache-line
//! transfer; only after `SPIN` (200 µs) of idleness do they park (a server between requests burns no
//! CPU).
//!
//! [`for_each`] is the only entry point (`MODU_POOL=rayon` in the environment sends every
//! section to rayon instead, for comparisons). It uses the pool sized to the calling context's thread
//! count (`rayon::current_num_threads()`, so `ThreadPool::install` and `RAYON_NUM_THREADS` keep
//! working) when the pool is free, and falls back to rayon when it is not (a section started
//! from inside another section, or several threads running inference at once): the result is
//! the same either way, since every task writes its own outputs.
//!
//! Protocol: the caller stores the job (a pointer to its closure and the task count), resets the
//! task counter and the count of workers still inside the job, then bumps the epoch. Workers
//! that see a new epoch claim task indices from the shared counter until it runs past the end,
//! then check out. The caller claims tasks too and returns once every worker has checked out, so
//! the job (on the caller's stack) outlives every use of it.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker stays ready (spinning, then yielding) before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// Busy-wait iterations (`pause`, ~10–40 ns each) before a waiting thread starts yielding its
/// core: the gaps between the sections of a decode step are a few microseconds.
const BUSY_SPINS: u32 = 2048;

/// Runs `f(i)` for every `i < n`, on the calling thread and the pool's workers (or rayon's, see
/// the module docs). Returns when all calls have returned; a panic in `f` is re-raised here.
pub fn for_each<F: Fn(usize) + Sync>(n: usize, f: F) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let disabled = *DISABLED.get_or_init(|| std::env::var("MODU_POOL").is_ok_and(|v| v == "rayon"));
    let slot = match if disabled {
        None
    } else {
        Some(POOL.try_lock())
    } {
        None => None,
        Some(r) => match r {
            Ok(slot) => Some(slot),
            // A task panicked in an earlier section: the pool itself is intact.
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        },
    };
    match slot {
        Some(mut slot) => {
            if slot.as_ref().map(|p| p.workers.len() + 1) != Some(threads) {
                // A different thread count than last time (rare: a benchmark sweeping -t).
                *slot = None;
                *slot = Some(Pool::new(threads - 1));
            }
            slot.as_ref().expect("pool just created").run(n, &f);
        }
        None => {
            use rayon::prelude::*;
            #[allow(clippy::redundant_closure)] // `f` is Sync, not Send: rayon needs a reference.
            (0..n).into_par_iter().for_each(|i| f(i));
        }
    }
}

/// Runs `f(i, piece)` for every `chunk`-long piece of `out` (`i`-th piece, the last one possibly
/// shorter), in parallel as [`for_each`] does.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    out: &mut [T],
    chunk: usize,
    f: F,
) {
    let chunk = chunk.max(1);
    let len = out.len();
    let base = SharedSlice(out.as_mut_ptr());
    let base = &base;
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: piece i is `out[start..start + n]`, inside `out` (start < len for i < the
        // piece count), and no two tasks get the same i, so the pieces are disjoint; `out`
        // stays mutably borrowed until `for_each` has returned, i.e. after every task ended.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
        f(i, piece);
    });
}

/// The base pointer of a slice split into disjoint pieces by [`for_each_chunk_mut`].
struct SharedSlice<T>(*mut T);
// SAFETY: the tasks only touch disjoint pieces of the slice, whose elements are `Send`.
unsafe impl<T: Send> Sync for SharedSlice<T> {}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// The job of one parallel section, on the caller's stack.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
}

struct Shared {
    /// Bumped once per section; workers compare it with the last one they served.
    epoch: AtomicU64,
    /// The current section's job (valid while `active > 0` or the caller is inside `run`).
    job: UnsafeCell<*const Job<'static>>,
    /// Next task index to claim.
    next: AtomicUsize,
    /// Workers that have not yet finished the current section.
    active: AtomicUsize,
    /// Workers parked (or about to park); the caller unparks them all when non-zero.
    parked: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the caller that holds the pool (the `POOL` mutex) before it
// publishes the epoch (a SeqCst read-modify-write, so the write happens-before any worker's
// Acquire load of the new epoch), and read by workers only after they saw that epoch and before
// they decrement `active`, which the caller waits for before it writes `job` again.
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`; the raw pointer is only a handle to the caller's job.
unsafe impl Send for Shared {}

struct Worker {
    thread: thread::Thread,
    handle: Option<JoinHandle<()>>,
}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
}

impl Pool {
    fn new(n_workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(std::ptr::null()),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let workers = (0..n_workers)
            .map(|i| {
                let s = Arc::clone(&shared);
                let handle = thread::Builder::new()
                    .name(format!("modu-spin-{i}"))
                    .spawn(move || worker_loop(&s))
                    .expect("spawn a pool worker thread");
                Worker {
                    thread: handle.thread().clone(),
                    handle: Some(handle),
                }
            })
            .collect();
        Pool { shared, workers }
    }

    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        let job = Job { f, n };
        // SAFETY: no worker reads `job` now: all checked out of the previous section (`active`
        // was 0 when it returned) and none reads it before seeing the epoch bumped below. The
        // 'static is a lie confined to this call: we wait for every worker before returning.
        unsafe { *s.job.get() = std::mem::transmute::<*const Job<'_>, *const Job<'static>>(&job) };
        s.next.store(0, Ordering::Relaxed);
        s.active.store(self.workers.len(), Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim(s, &job)));
        let mut spins = 0u32;
        while s.active.load(Ordering::Acquire) != 0 {
            spins = spins.saturating_add(1);
            if spins < BUSY_SPINS {
                std::hint::spin_loop();
            } else {
                // A worker was descheduled: let it run.
                thread::yield_now();
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a task of a parallel section panicked on a pool worker");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for w in &mut self.workers {
            w.thread.unpark();
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Claims and runs tasks until none are left.
fn claim(s: &Shared, job: &Job<'_>) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            return;
        }
        (job.f)(i);
    }
}

fn worker_loop(s: &Shared) {
    // The epoch the pool was created with (not the current one: a section may have been
    // published before this thread got to run).
    let mut seen = 0;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spins = spins.saturating_add(1);
            if spins < BUSY_SPINS {
                std::hint::spin_loop();
                continue;
            }
            if idle_since.elapsed() < SPIN {
                // Still ready for the next section, but giving the core to any other runnable
                // thread (on a loaded machine a busy spin would slow everyone else down).
                thread::yield_now();
                continue;
            }
            // Idle for a while: park until the next section (Dekker-style with the caller's
            // epoch bump then `parked` check, both SeqCst, so a wake-up is never missed; the
            // timeout is a second line of defence).
            s.parked.fetch_add(1, Ordering::SeqCst);
            if s.epoch.load(Ordering::SeqCst) == seen {
                thread::park_timeout(Duration::from_millis(50));
            }
            s.parked.fetch_sub(1, Ordering::SeqCst);
            idle_since = Instant::now();
            spins = 0;
        };
        seen = epoch;
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: the epoch we saw was published after `job` was written, and the caller keeps
        // the job alive until we decrement `active` below.
        let job = unsafe { &**s.job.get() };
        if catch_unwind(AssertUnwindSafe(|| claim(s, job))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.active.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in [1, 2, 3] {
            in_pool(threads, || {
                for n in [0usize, 1, 2, 7, 100, 1000] {
                    let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                    for_each(n, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
                }
            });
        }
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        in_pool(2, || {
            for (len, chunk) in [(0usize, 3usize), (10, 3), (12, 4), (5, 9)] {
                let mut v = vec![0usize; len];
                for_each_chunk_mut(&mut v, chunk, |i, piece| {
                    for (j, x) in piece.iter_mut().enumerate() {
                        *x += i * chunk + j + 1;
                    }
                });
                assert_eq!(v, (1..=len).collect::<Vec<_>>(), "len {len} chunk {chunk}");
            }
        });
    }

    #[test]
    fn nested_sections_and_parked_workers() {
        in_pool(2, || {
            let total = AtomicUsize::new(0);
            // The inner sections find the pool busy and use rayon.
            for_each(4, |_| {
                for_each(8, |j| {
                    total.fetch_add(j, Ordering::Relaxed);
                });
            });
            assert_eq!(total.load(Ordering::Relaxed), 4 * 28);
            // After the workers parked, a section still completes.
            thread::sleep(SPIN * 4);
            let total = AtomicUsize::new(0);
            for_each(64, |j| {
                total.fetch_add(j, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), 64 * 63 / 2);
        });
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_survives() {
        in_pool(2, || {
            let r = catch_unwind(|| {
                for_each(16, |i| {
                    if i == 9 {
                        panic!("task 9");
                    }
                })
            });
            assert!(r.is_err());
            let total = AtomicUsize::new(0);
            for_each(10, |j| {
                total.fetch_add(j, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), 45);
        });
    }
}
