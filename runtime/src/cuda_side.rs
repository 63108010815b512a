//! Side-by-side launches on CUDA: runs of consecutive kernel steps that touch
//! disjoint memory (GPT-2's q, k and v projections, Llama's gate and up
//! projections) go out on forked streams and join before the step after
//! them, so that launches of a fraction of a wave each fill the device
//! together. Sessions do so in calls of several rows (prefill); a decode
//! step's small kernels gain more from launching each as a programmatic
//! dependent of the one before on one stream (`cuda_session.rs`).

use cudarc::driver::{CudaEvent, CudaStream, DriverError};
use std::ops::Range;
use std::sync::Arc;

/// The most steps of one run: the session's stream and three side streams.
pub(crate) const MOST: usize = 4;

/// The device memory one kernel step reads and writes (byte ranges).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Access {
    pub reads: Vec<Range<u64>>,
    pub writes: Vec<Range<u64>>,
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl Access {
    /// Whether `self` may run at the same time as `earlier`: neither writes
    /// memory the other reads or writes.
    fn independent_of(&self, earlier: &Access) -> bool {
        let hits = |w: &[Range<u64>], other: &[Range<u64>]| w.iter().any(|a| other.iter().any(|b| overlap(a, b)));
        !hits(&self.writes, &earlier.writes) && !hits(&self.writes, &earlier.reads) && !hits(&earlier.writes, &self.reads)
    }
}

/// The runs (ranges of indices into `steps`) of two to `MOST` consecutive
/// steps that may run side by side, each step independent of every earlier
/// one of its run, taken greedily from the first step on. A step that is
/// `None` (a KV append, a host append) never joins a run.
pub(crate) fn runs(steps: &[Option<Access>]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < steps.len() {
        let mut end = start + 1;
        if steps[start].is_some() {
            while end < steps.len() && end - start < MOST {
                let Some(next) = &steps[end] else { break };
                if !steps[start..end].iter().flatten().all(|e| next.independent_of(e)) {
                    break;
                }
                end += 1;
            }
        }
        if end - start >= 2 {
            out.push(start..end);
        }
        start = end;
    }
    out
}

/// A session's side streams and the events that fork them from its stream
/// and join them back (also inside a stream capture, where they become a
/// graph's parallel branches).
pub(crate) struct SideStreams {
    streams: Vec<Arc<CudaStream>>,
    fork: CudaEvent,
    joins: Vec<CudaEvent>,
}

impl SideStreams {
    /// `n` side streams of `main`'s context (at most `MOST - 1` are used).
    pub(crate) fn new(main: &CudaStream, n: usize) -> Result<SideStreams, DriverError> {
        let ctx = main.context();
        let streams = (0..n).map(|_| ctx.new_stream()).collect::<Result<Vec<_>, _>>()?;
        let joins = (0..n).map(|_| ctx.new_event(None)).collect::<Result<Vec<_>, _>>()?;
        Ok(SideStreams { streams, fork: ctx.new_event(None)?, joins })
    }

    /// Side stream `lane` (1-based: lane 0 is the session's stream).
    pub(crate) fn stream(&self, lane: usize) -> Option<&Arc<CudaStream>> {
        lane.checked_sub(1).and_then(|i| self.streams.get(i))
    }

    /// The first `n` side streams wait for what `main` holds so far.
    pub(crate) fn fork(&self, main: &CudaStream, n: usize) -> Result<(), DriverError> {
        self.fork.record(main)?;
        for s in self.streams.iter().take(n) {
            s.wait(&self.fork)?;
        }
        Ok(())
    }

    /// `main` waits for what the first `n` side streams hold.
    pub(crate) fn join(&self, main: &CudaStream, n: usize) -> Result<(), DriverError> {
        for (s, e) in self.streams.iter().zip(&self.joins).take(n) {
            e.record(s)?;
            main.wait(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // byte ranges, one per buffer
mod tests {
    use super::*;

    fn step(reads: &[Range<u64>], writes: &[Range<u64>]) -> Option<Access> {
        Some(Access { reads: reads.to_vec(), writes: writes.to_vec() })
    }

    #[test]
    fn q_k_v_after_a_norm_form_one_run() {
        // norm x → n; q, k, v read n; an append; attention reads q, k, v.
        let steps = [
            step(&[0..10], &[10..20]),
            step(&[10..20, 100..200], &[20..30]),
            step(&[10..20, 200..300], &[30..40]),
            step(&[10..20, 300..400], &[40..50]),
            None,
            step(&[20..50], &[50..60]),
        ];
        assert_eq!(runs(&steps), vec![1..4]);
    }

    #[test]
    fn shared_memory_keeps_steps_apart() {
        // The second writes what the first reads (a temp slot reused).
        assert!(runs(&[step(&[0..10], &[10..20]), step(&[30..40], &[5..15])]).is_empty());
        // The second reads what the first writes.
        assert!(runs(&[step(&[0..10], &[10..20]), step(&[19..25], &[30..40])]).is_empty());
        // Both write one scratch.
        assert!(runs(&[step(&[0..10], &[10..20, 90..99]), step(&[0..10], &[30..40, 95..96])]).is_empty());
        // Touching ends do not overlap.
        assert_eq!(runs(&[step(&[0..10], &[10..20]), step(&[0..10], &[20..30])]), vec![0..2]);
    }

    #[test]
    fn runs_stop_at_most_and_at_appends() {
        let free = |i: u64| step(&[0..10], &[100 * (i + 1)..100 * (i + 1) + 10]);
        let steps: Vec<Option<Access>> = (0..6).map(free).collect();
        assert_eq!(runs(&steps), vec![0..4, 4..6]);
        let steps = [free(0), None, free(1), free(2)];
        assert_eq!(runs(&steps), vec![2..4]);
    }
}
