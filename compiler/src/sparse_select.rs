//! The specialization dial per sparse matmul: the level the plan asks for, or
//! for `auto` the one the cost model picks, with the reason the manifest records.
//!
//! The cost model is memory traffic, which is what GEMV (decode) is bound by:
//! a sparse format pays when its packed bytes (values, indices, pointers) fall
//! below `SPARSE_PAYS` of the dense f32 bytes; otherwise the dense kernel over
//! the pruned weight is at least as fast and needs no index decoding.

use crate::error::CompileResult;
use sparsec_ir::sparse::{PrunedWeight, SparseStorage};
use sparsec_ir::{Pattern, Specialize};

/// A sparse format is picked when it moves less than this share of the dense bytes.
pub const SPARSE_PAYS: f64 = 0.75;

/// `auto` bakes the indices of matrices with at most this many stored values:
/// the code stays small (a few instructions per value) and compiles fast.
pub const AUTO_BAKE_MAX_VALUES: u64 = 4096;

/// What one sparse matmul compiles to.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseChoice {
    /// `dense`, `generic`, `indices` or `full` (never `auto`).
    pub level: Specialize,
    /// The packed storage of the weight; `None` for `dense`.
    pub storage: Option<SparseStorage>,
    /// Why (for `auto`: the cost model's figures).
    pub reason: String,
    /// The weight buffer (for `indices`/`full`, whose kernels bake its data).
    pub weight: String,
    /// The packed weight, attached once the weights are resolved (`indices`/`full`).
    pub data: Option<std::sync::Arc<Vec<u8>>>,
}

impl SparseChoice {
    /// Whether the kernel bakes this weight's structure (one kernel per weight).
    pub fn bakes(&self) -> bool {
        matches!(self.level, Specialize::Indices | Specialize::Full)
    }
}

/// The choice for a matmul with these patterns pruning weight `w`.
pub fn choose(patterns: &[Pattern], w: &PrunedWeight, weight: &str, kernel: &str) -> CompileResult<SparseChoice> {
    let asked = patterns
        .iter()
        .find_map(|p| match p {
            Pattern::Specialize(s) => Some(*s),
            _ => None,
        })
        .unwrap_or(Specialize::Auto);
    let format = w.format();
    let storage = SparseStorage { format, transposed: w.transposed };
    let dense_bytes = (w.n * w.k * 4) as f64;
    let packed = format.bytes() as f64;
    let share = packed / dense_bytes;
    let figures = format!("{} packs {:.0} KB, {:.2} of the dense f32 {:.0} KB", format.name(), packed / 1e3, share, dense_bytes / 1e3);
    let values = format.stored_values();
    let (level, reason) = match asked {
        Specialize::Auto if values <= AUTO_BAKE_MAX_VALUES => {
            (Specialize::Indices, format!("auto: indices, {values} stored values (<= {AUTO_BAKE_MAX_VALUES}: baked code stays small); {figures}"))
        }
        Specialize::Auto if share < SPARSE_PAYS => (Specialize::Generic, format!("auto: generic, {figures} (< {SPARSE_PAYS})")),
        Specialize::Auto => (Specialize::Dense, format!("auto: dense, {figures} (>= {SPARSE_PAYS})")),
        l => (l, format!("{} (asked); {figures}", l.name())),
    };
    let _ = kernel;
    let storage = match level {
        Specialize::Dense => None,
        _ => Some(storage),
    };
    Ok(SparseChoice { level, storage, reason, weight: weight.to_string(), data: None })
}
