//! Weights copied into anonymous memory on 2 MB pages (transparent huge pages,
//! asked for with `madvise`), read from the artifact's weights: a GEMV streaming a
//! weight then walks the page table once per 2 MB instead of once per 4 KB.

use crate::artifact::Artifact;
use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::BufferKind;
use std::path::PathBuf;

const HUGE_PAGE: usize = 2 << 20;
/// Each weight starts on a cache line.
const ALIGN: usize = 64;

pub struct ResidentWeights {
    /// The mapping (`mapped` bytes from `map`); weights start at `base`, a
    /// huge-page boundary inside it.
    map: *mut libc::c_void,
    mapped: usize,
    base: *mut u8,
    /// Per plan buffer: a weight's offset from `base` and its bytes.
    at: Vec<Option<(usize, usize)>>,
    /// The weights file they were read from.
    source: PathBuf,
}

// SAFETY: the memory is written only in `load`; afterwards every user only reads it.
unsafe impl Send for ResidentWeights {}
unsafe impl Sync for ResidentWeights {}

impl ResidentWeights {
    /// Reads every weight buffer of `art`'s plan (`BufferSpec::bytes(0)` bytes of
    /// its tensor) into one fresh huge-page-backed mapping.
    pub fn load(art: &Artifact) -> RuntimeResult<ResidentWeights> {
        let store = &art.weights;
        let io = |error| RuntimeError::Io { path: store.path().into(), error };
        let mut at = vec![None; art.manifest.execution.buffers.len()];
        let mut ranges = Vec::new();
        let mut total = 0usize;
        for (i, b) in art.manifest.execution.buffers.iter().enumerate() {
            if b.kind != BufferKind::Weight {
                continue;
            }
            let range = art.weight_range(b)?;
            let need = range.len();
            at[i] = Some((total, need));
            ranges.push((total, range.start, need));
            total += need.div_ceil(ALIGN) * ALIGN;
        }
        let mapped = total.div_ceil(HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; no address hint.
        let map = unsafe {
            libc::mmap(std::ptr::null_mut(), mapped, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if map == libc::MAP_FAILED {
            return Err(io(std::io::Error::last_os_error()));
        }
        let base_addr = (map as usize).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let base = base_addr as *mut u8;
        // Advice only: without transparent huge pages the memory works on 4 KB pages.
        // SAFETY: `base..base + total` lies inside the mapping (one spare huge page
        // covers the alignment).
        unsafe { libc::madvise(base as *mut libc::c_void, mapped - (base_addr - map as usize), libc::MADV_HUGEPAGE) };
        let weights = ResidentWeights { map, mapped, base, at, source: store.path().into() };
        for (off, file_off, len) in ranges {
            // SAFETY: `off + len <= total`, inside the mapping, and nothing else
            // refers to the memory yet.
            let dst = unsafe { std::slice::from_raw_parts_mut(weights.base.add(off), len) };
            store.read_into(file_off..file_off + len, dst).map_err(io)?;
        }
        Ok(weights)
    }

    /// Whether these are `art`'s weights.
    pub fn serves(&self, art: &Artifact) -> bool {
        self.source == art.weights.path() && self.at.len() == art.manifest.execution.buffers.len()
    }

    /// Plan buffer `i`'s weight: its address and bytes.
    pub fn get(&self, i: usize) -> Option<(*const u8, usize)> {
        // SAFETY: offsets were laid out inside the mapping in `load`.
        self.at.get(i).copied().flatten().map(|(off, len)| (unsafe { self.base.add(off) } as *const u8, len))
    }
}

impl Drop for ResidentWeights {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `load`, unmapped once.
        unsafe { libc::munmap(self.map, self.mapped) };
    }
}
