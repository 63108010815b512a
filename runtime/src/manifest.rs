//! The artifact manifest and execution plan: written by the compiler, read by
//! the runtime. Versioned; the runtime refuses versions it does not know.

use serde::{Deserialize, Serialize};
use sparsec_ir::{Dim, SymSize};

/// Bumped whenever the manifest or the kernel ABI changes.
pub const MANIFEST_VERSION: u32 = 2;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const GRAPH_FILE: &str = "graph.sir";
pub const PLAN_FILE: &str = "plan.toml";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const CPU_LIBRARY: &str = "cpu/kernels.so";
pub const CUDA_DIR: &str = "cuda";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub sparsec_version: String,
    pub graph_name: String,
    /// blake3 of the source graph text, the plan and the weight data.
    pub source_hash: String,
    /// blake3 of the source hash, the compile options and the compiler version.
    pub cache_key: String,
    /// The plan text, when one was given.
    pub plan: Option<String>,
    /// The compile options, as the compiler spelled them.
    pub options: serde_json::Value,
    /// `cpu` and/or `cuda`.
    pub targets: Vec<String>,
    pub kernels: Vec<KernelRecord>,
    pub execution: ExecutionPlan,
    /// Wall time of the whole compile, in milliseconds.
    pub compile_ms: f64,
}

/// One compiled kernel and what it cost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KernelRecord {
    pub name: String,
    /// The IR op it implements.
    pub op: String,
    pub cpu: Option<CodeStats>,
    pub cuda: Option<CodeStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CodeStats {
    /// MLIR generation, lowering, LLVM optimization and code emission.
    pub compile_ms: f64,
    pub mlir_bytes: usize,
    /// Optimized LLVM IR, as text.
    pub llvm_ir_bytes: usize,
    /// Machine code (`.text` of the object) on the CPU; PTX text on CUDA.
    pub code_bytes: usize,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    Input,
    /// Data in `weights.safetensors` under the buffer's name.
    Weight,
    /// Produced by a step.
    Temp,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BufferSpec {
    /// The graph value name (without `%`); the tensor name for weights.
    pub name: String,
    pub kind: BufferKind,
    pub dims: Vec<Dim>,
}

impl BufferSpec {
    pub fn numel(&self) -> SymSize {
        SymSize::of_dims(&self.dims)
    }
}

/// One kernel launch. Kernel ABI (`MANIFEST_VERSION` 2): arguments are the
/// `args` buffers as flat f32 arrays (the last one is written), then `seq` as i64.
/// CPU: `_mlir_ciface_<kernel>(memref descriptor*..., i64 seq, i64 lo, i64 hi)` runs
/// units `lo..hi` of `cpu_units` (disjoint slices may run on different threads);
/// CUDA: `<kernel>(f32*..., i64 seq)`, one thread per unit of `gpu_threads`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub kernel: String,
    pub args: Vec<usize>,
    pub gpu_threads: SymSize,
    pub cpu_units: SymSize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExecutionPlan {
    pub buffers: Vec<BufferSpec>,
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    pub steps: Vec<Step>,
}
