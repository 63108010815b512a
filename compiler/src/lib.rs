//! sparsec's code generator: graph → kernels → MLIR (melior) → LLVM IR →
//! inkwell → x86-64 shared library and PTX, packed into an artifact with a
//! content-addressed cache.

pub mod abi;
pub mod backend;
pub mod error;
pub mod mlir;
pub mod options;

pub use error::{CompileError, CompileResult};
pub use options::{
    BakeBudget, CompileOptions, CpuTarget, CudaTarget, Emit, GpuMmaActivations, KvCacheType, QuantActivations, TargetKind, WeightsDType,
};
pub mod cache;
pub mod driver;
pub mod fusion;
pub mod half_weights;
pub mod partition;
pub mod sparse_select;
pub mod tile_weights;
pub mod toolchain;
pub mod weights;

pub use cache::Cache;
pub use driver::{compile, CompileRequest, Compiled};
pub use weights::{WeightData, WeightSource};
