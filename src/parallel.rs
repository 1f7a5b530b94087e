//! Where the kernels' parallel pieces run.
//!
//! * **OpenMP** (the Python extension's default): libtorch's own intra-op thread pool, through
//!   the GNU OpenMP ABI (`GOMP_parallel`). torch's wheels ship `libgomp.so.1` and load it
//!   before this extension, so the dynamic loader binds our calls to *that* runtime: the same
//!   threads, already hot, sized by `torch.set_num_threads`. This matters because after every
//!   torch op its OpenMP workers keep spinning for a few milliseconds; a second pool (rayon)
//!   started then competes with them for the cores. Measured on the 2-core CI machine: the
//!   optimizer step right after a torch op took 1.3–1.6x longer on a rayon pool.
//! * **rayon**: the pure-Rust build (`cargo test`, no libtorch; rayon's global pool, sized by
//!   `RAYON_NUM_THREADS` or the core count), or when the environment variable
//!   `CAST_RS_THREADING=rayon` is set (then a pool of our own, rebuilt whenever
//!   `torch.get_num_threads()` changes, so it follows `torch.set_num_threads` too).
//!
//! Either way a panic inside a piece is caught on the worker and re-raised on the caller, so
//! it never unwinds through C frames.
//!
//! **After `fork`** (DataLoader workers, multiprocessing) a child inherits neither OpenMP's nor
//! rayon's worker threads, and both runtimes would wait for them forever. The process id is
//! recorded when the extension is loaded ([`record_parent`]); a call from any other process
//! runs its pieces sequentially on the calling thread instead.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Rayon,
    #[cfg(feature = "python")]
    OpenMp,
}

/// The backend in use (decided once per process).
pub fn backend() -> Backend {
    #[cfg(feature = "python")]
    {
        use std::sync::OnceLock;
        static B: OnceLock<Backend> = OnceLock::new();
        *B.get_or_init(|| match std::env::var("CAST_RS_THREADING").as_deref() {
            Ok("rayon") => Backend::Rayon,
            _ => Backend::OpenMp,
        })
    }
    #[cfg(not(feature = "python"))]
    {
        Backend::Rayon
    }
}

static PARENT_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Records the current process as the one whose thread pools may be used (call at load).
pub fn record_parent() {
    let _ = PARENT_PID.get_or_init(std::process::id);
}

/// True in a process forked after [`record_parent`]: thread pools are not usable there.
pub fn in_forked_child() -> bool {
    PARENT_PID
        .get()
        .is_some_and(|&pid| pid != std::process::id())
}

/// Number of threads a parallel region uses now.
pub fn num_threads() -> usize {
    if in_forked_child() {
        return 1;
    }
    match backend() {
        #[cfg(not(feature = "python"))]
        Backend::Rayon => rayon::current_num_threads(),
        // The pool is sized like torch's (see `torch_sized_pool`).
        #[cfg(feature = "python")]
        Backend::Rayon | Backend::OpenMp => omp::max_threads(),
    }
}

/// The extension's rayon pool, with as many threads as torch uses now
/// (`omp_get_max_threads`, which `torch.set_num_threads` sets). Rebuilt when that changes;
/// `None` if the OS refuses to start threads (the caller then runs sequentially).
#[cfg(feature = "python")]
fn torch_sized_pool() -> Option<std::sync::Arc<rayon::ThreadPool>> {
    use std::sync::Arc;
    static POOL: Mutex<Option<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let want = omp::max_threads();
    let mut cached = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((n, pool)) = cached.as_ref() {
        if *n == want {
            return Some(pool.clone());
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(want)
        .thread_name(|i| format!("cast-rs-{i}"))
        .build()
        .ok()
        .map(Arc::new)?;
    // A replaced pool's threads exit once calls still running on it finish (Arc).
    *cached = Some((want, pool.clone()));
    Some(pool)
}

/// Calls `f` once for every piece, in parallel; pieces are handed out dynamically.
pub fn for_each<T: Send, F: Fn(T) + Sync>(pieces: Vec<T>, f: F) {
    if pieces.len() <= 1 || in_forked_child() {
        pieces.into_iter().for_each(f);
        return;
    }
    match backend() {
        Backend::Rayon => {
            use rayon::prelude::*;
            let f = &f;
            #[cfg(feature = "python")]
            {
                match torch_sized_pool() {
                    Some(pool) => pool.install(|| pieces.into_par_iter().for_each(f)),
                    None => pieces.into_iter().for_each(f),
                }
            }
            #[cfg(not(feature = "python"))]
            pieces.into_par_iter().for_each(f)
        }
        #[cfg(feature = "python")]
        Backend::OpenMp => omp::for_each(pieces, f),
    }
}

/// Shared by the OpenMP workers: a queue of pieces and the first panic, if any.
#[allow(dead_code)]
struct Work<T, F> {
    slots: Vec<Mutex<Option<T>>>,
    next: std::sync::atomic::AtomicUsize,
    f: F,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

#[allow(dead_code)]
impl<T, F: Fn(T)> Work<T, F> {
    fn run_worker(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.slots.get(i) else {
                return;
            };
            let item = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(item) = item {
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.f)(item))) {
                    self.panic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(p);
                }
            }
        }
    }
}

#[cfg(feature = "python")]
mod omp {
    use super::*;
    use std::ffi::{c_int, c_uint, c_void};
    use std::panic::resume_unwind;

    // GNU OpenMP runtime ABI (what GCC emits for `#pragma omp parallel`). `libgomp` is linked
    // by torch-sys; at run time the soname resolves to the copy torch already loaded.
    extern "C" {
        fn GOMP_parallel(
            f: extern "C" fn(*mut c_void),
            data: *mut c_void,
            num_threads: c_uint,
            flags: c_uint,
        );
        fn omp_get_max_threads() -> c_int;
    }

    pub fn max_threads() -> usize {
        // SAFETY: a plain query of the runtime's ICVs, no preconditions.
        (unsafe { omp_get_max_threads() }).max(1) as usize
    }

    extern "C" fn worker<T, F: Fn(T)>(data: *mut c_void) {
        // SAFETY: `data` is the `&Work<T, F>` passed by `for_each` below, which outlives the
        // parallel region (GOMP_parallel returns only after every worker has finished).
        let work = unsafe { &*(data as *const Work<T, F>) };
        work.run_worker();
    }

    pub fn for_each<T: Send, F: Fn(T) + Sync>(pieces: Vec<T>, f: F) {
        let n = pieces.len();
        let work = Work {
            slots: pieces.into_iter().map(|p| Mutex::new(Some(p))).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
            f,
            panic: Mutex::new(None),
        };
        // No more threads than pieces; 0 would mean "the runtime's default".
        let threads = max_threads().min(n) as c_uint;
        // SAFETY: `worker::<T, F>` matches the callback ABI and only reads `work` through a
        // shared reference; `T: Send` and `F: Sync` make that sound from other threads; the
        // region is joined before `work` is dropped. Panics are caught inside `run_worker`.
        unsafe {
            GOMP_parallel(
                worker::<T, F>,
                &work as *const Work<T, F> as *mut c_void,
                threads,
                0,
            )
        };
        if let Some(p) = work.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            resume_unwind(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_piece_runs_once() {
        let count = AtomicUsize::new(0);
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for_each((0..1000).collect(), |i: usize| {
            seen[i].fetch_add(1, Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 1000);
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn worker_panic_reaches_the_caller() {
        let r = catch_unwind(|| for_each(vec![1, 2, 3], |i: i32| assert_ne!(i, 2, "boom")));
        assert!(r.is_err());
    }
}
