//! The specialization dial per sparse matmul: the level the plan asks for, or
//! for `auto` the one the cost model picks, with the reason the manifest records.
//!
//! The cost model is memory traffic, which is what GEMV (decode) is bound by:
//! a sparse format pays when its packed bytes (values, indices, pointers) fall
//! below `SPARSE_PAYS` of the dense f32 bytes; otherwise the dense kernel over
//! the pruned weight is at least as fast and needs no index decoding.
//!
//! Kept values stored quantized (`#values(q8|q4)`, formats `nm_q*`, `csr_q*`,
//! `bsr_q*`) have the `generic` kernels of `mlir/sparse_quant_kernels.rs` and
//! `dense` (the f32 kernel over the materialized weight); `indices` and `full`
//! are refused. `auto` reports their bytes against the same matrix dense and
//! quantized alike (Q8_0 for q8, Q4_1 for q4) and picks `generic`: the dense
//! alternative this build has for such a weight is f32, larger still.

use crate::error::CompileResult;
use sparsec_ir::sparse::{PrunedWeight, SparseStorage};
use sparsec_ir::{Pattern, Specialize};

/// A sparse format is picked when it moves less than this share of the dense bytes.
pub const SPARSE_PAYS: f64 = 0.75;

/// `auto` bakes only matrices with at most this many stored values. Measured
/// with `sparsec tradeoff` on the dev box: 64x64 + 128x64 at 90% (1229 values)
/// decode 1.7x faster baked than `generic`; at 50% (6144 values) and for
/// SmolLM2's K/V projections (11k values each at 90%) baked code is slower, its
/// straight lines outgrowing the instruction caches.
pub const AUTO_BAKE_MAX_VALUES: u64 = 2048;

/// Compile milliseconds per baked stored value (dev box: 88k values of a
/// 1536x576 matrix at 90% in 49 s).
pub const BAKE_MS_PER_VALUE: f64 = 0.55;

/// Machine-code bytes per baked stored value (same measurement: 1.7 MB).
pub const BAKE_CODE_BYTES_PER_VALUE: f64 = 19.3;

/// What is left of the `auto` bake budget while partitioning.
#[derive(Clone, Copy, Debug)]
pub struct BakeLeft {
    pub compile_ms: f64,
    pub code_bytes: f64,
}

impl BakeLeft {
    pub fn new(b: crate::options::BakeBudget) -> BakeLeft {
        BakeLeft { compile_ms: b.compile_ms as f64, code_bytes: b.code_bytes as f64 }
    }
}

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
pub fn choose(patterns: &[Pattern], w: &PrunedWeight, weight: &str, left: &mut BakeLeft) -> CompileResult<SparseChoice> {
    let asked = patterns
        .iter()
        .find_map(|p| match p {
            Pattern::Specialize(s) => Some(*s),
            _ => None,
        })
        .unwrap_or(Specialize::Auto);
    let format = w.format();
    let storage = SparseStorage { format, transposed: w.transposed };
    if let Some(bits) = format.bits() {
        return choose_quantized(asked, format, bits, storage, weight);
    }
    let dense_bytes = (w.n * w.k * 4) as f64;
    let packed = format.bytes() as f64;
    let share = packed / dense_bytes;
    let figures = format!("{} packs {:.0} KB, {:.2} of the dense f32 {:.0} KB", format.name(), packed / 1e3, share, dense_bytes / 1e3);
    let values = format.stored_values();
    let (bake_ms, bake_bytes) = (values as f64 * BAKE_MS_PER_VALUE, values as f64 * BAKE_CODE_BYTES_PER_VALUE);
    let fits = values <= AUTO_BAKE_MAX_VALUES && bake_ms <= left.compile_ms && bake_bytes <= left.code_bytes;
    let (level, reason) = match asked {
        Specialize::Auto if fits => {
            left.compile_ms -= bake_ms;
            left.code_bytes -= bake_bytes;
            (
                Specialize::Indices,
                format!(
                    "auto: indices, {values} stored values, est. {bake_ms:.0} ms and {:.0} KB of code ({:.0} ms, {:.0} KB of the bake budget left); {figures}",
                    bake_bytes / 1e3,
                    left.compile_ms,
                    left.code_bytes / 1e3
                ),
            )
        }
        Specialize::Auto if share < SPARSE_PAYS => (
            Specialize::Generic,
            format!("auto: generic, {figures} (< {SPARSE_PAYS}); baking {values} values (est. {bake_ms:.0} ms) is over the budget or {AUTO_BAKE_MAX_VALUES} values"),
        ),
        Specialize::Auto => (Specialize::Dense, format!("auto: dense, {figures} (>= {SPARSE_PAYS})")),
        l => (l, format!("{} (asked); {figures}", l.name())),
    };
    let storage = match level {
        Specialize::Dense => None,
        _ => Some(storage),
    };
    Ok(SparseChoice { level, storage, reason, weight: weight.to_string(), data: None })
}

/// The choice for a weight whose kept values are quantized (see the module doc).
fn choose_quantized(
    asked: Specialize,
    format: sparsec_ir::sparse::SparseFormat,
    bits: sparsec_ir::sparse_quant::QBits,
    storage: SparseStorage,
    weight: &str,
) -> CompileResult<SparseChoice> {
    let dense_dt = match bits {
        sparsec_ir::sparse_quant::QBits::Q8 => sparsec_ir::DType::Q8_0,
        sparsec_ir::sparse_quant::QBits::Q4 => sparsec_ir::DType::Q4_1,
    };
    let (n, k) = format.nk();
    let dense = ((n * k).div_ceil(sparsec_ir::quant::QK as u64) * sparsec_ir::quant::block_bytes(dense_dt) as u64) as f64;
    let packed = format.bytes() as f64;
    let figures = format!(
        "{} packs {:.0} KB, {:.2} of the dense {} {:.0} KB",
        format.name(),
        packed / 1e3,
        packed / dense,
        dense_dt.name(),
        dense / 1e3
    );
    let (level, reason) = match asked {
        Specialize::Auto => {
            let verdict = if packed / dense < SPARSE_PAYS {
                "pays"
            } else {
                "does not pay against a dense quantized kernel, but that is not an option here"
            };
            (Specialize::Generic, format!("auto: generic, {figures} ({verdict}; dense would be f32)"))
        }
        Specialize::Dense | Specialize::Generic => (asked, format!("{} (asked); {figures}", asked.name())),
        Specialize::Indices | Specialize::Full => {
            return Err(crate::error::CompileError::Unsupported {
                kernel: weight.to_string(),
                op: "matmul",
                why: format!(
                    "#specialize({}) is not implemented for quantized sparse values ({}); use generic, dense or auto",
                    asked.name(),
                    format.name()
                ),
            })
        }
    };
    let storage = match level {
        Specialize::Dense => None,
        _ => Some(storage),
    };
    Ok(SparseChoice { level, storage, reason, weight: weight.to_string(), data: None })
}
