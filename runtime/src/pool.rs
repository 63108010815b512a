//! A pool of spinning worker threads for kernel launches. Decode runs hundreds
//! of short kernels per token, each split over the threads; waking a parked
//! thread costs microseconds (more in a VM), so workers spin on a launch
//! counter between launches and park only after a quiet spell.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN_BEFORE_PARK: Duration = Duration::from_millis(2);

/// A task body: called with the task's index.
type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    /// `launch number << 16 | tasks`: read in one load, so a worker never pairs
    /// one launch's number with another's task count.
    launch: AtomicU64,
    /// The current launch's body, lifetime erased. Written only while no
    /// worker of the previous launch still runs (see `run`).
    task: UnsafeCell<Option<*const Task<'static>>>,
    /// Workers of the current launch that have not finished.
    pending: AtomicUsize,
    /// A task panicked.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

// SAFETY: `task` is written by the launching thread only while `pending` is 0
// (no worker reads it), and read by workers only between a launch's publication
// (Release/Acquire on `launch`) and their decrement of `pending`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// `threads - 1` workers; the launching thread runs task 0 itself.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// `run` is not reentrant: launches from several threads at once would mix.
    busy: Mutex<()>,
}

impl SpinPool {
    pub fn new(threads: usize) -> std::io::Result<SpinPool> {
        let threads = threads.clamp(1, 1 << 15);
        let shared = Arc::new(Shared {
            launch: AtomicU64::new(0),
            task: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for w in 1..threads {
            let s = shared.clone();
            workers.push(std::thread::Builder::new().name(format!("sparsec-worker-{w}")).spawn(move || worker(&s, w))?);
        }
        Ok(SpinPool { shared, workers, threads, busy: Mutex::new(()) })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0)`, …, `f(tasks - 1)` concurrently (task 0 on the calling
    /// thread, task `t` on worker `t`) and returns when all are done. `tasks`
    /// is capped at the pool's threads. Returns false if a task panicked.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let tasks = tasks.min(self.threads);
        if tasks <= 1 {
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0))).is_ok();
        }
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the previous launch finished (`pending` reached 0 before its
        // `run` returned, and `busy` orders launches), so no worker reads `task`.
        // The erased lifetime is sound because this function does not return
        // until every worker of this launch has decremented `pending`, after
        // which none touches `f` again.
        unsafe {
            let f: *const Task<'_> = f;
            *s.task.get() = Some(std::mem::transmute::<*const Task<'_>, *const Task<'static>>(f));
        }
        s.panicked.store(false, Ordering::Relaxed);
        s.pending.store(tasks - 1, Ordering::Relaxed);
        let next = ((s.launch.load(Ordering::Relaxed) >> 16) + 1) << 16 | tasks as u64;
        s.launch.store(next, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0))).is_ok();
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        mine && !s.panicked.load(Ordering::Relaxed)
    }
}

fn worker(s: &Shared, id: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let launch = loop {
            let l = s.launch.load(Ordering::Acquire);
            if l != seen || s.stop.load(Ordering::Relaxed) {
                break l;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN_BEFORE_PARK {
                park(s, seen);
            }
        };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = launch;
        let tasks = (launch & 0xffff) as usize;
        if id >= tasks {
            continue;
        }
        // SAFETY: this launch counts us in `pending`, so the launcher keeps the
        // task alive and unchanged until we decrement it below.
        let f = unsafe { (*s.task.get()).map(|p| &*p) };
        if let Some(f) = f {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(id))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Sleeps until a launch other than `seen` is published (or the pool stops).
fn park(s: &Shared, seen: u64) {
    let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    while s.launch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
        g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    s.sleepers.fetch_sub(1, Ordering::SeqCst);
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_launch() {
        let pool = SpinPool::new(4).unwrap();
        let hits: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..2000 {
            let tasks = 1 + round % 4;
            assert!(pool.run(tasks, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            }));
        }
        // Task t runs in every launch with more than t tasks: 2000 launches cycle 1..=4 tasks.
        let got: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        assert_eq!(got, vec![2000, 1500, 1000, 500]);
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = SpinPool::new(2).unwrap();
        std::thread::sleep(SPIN_BEFORE_PARK * 3);
        let n = AtomicUsize::new(0);
        assert!(pool.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_panicking_task_is_reported_not_propagated() {
        let pool = SpinPool::new(2).unwrap();
        assert!(!pool.run(2, &|t| assert_ne!(t, 1, "task 1 fails")));
        assert!(pool.run(2, &|_| {}));
    }
}
