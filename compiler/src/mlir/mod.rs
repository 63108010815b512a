//! Lowering of kernels to MLIR text and through MLIR's passes to LLVM IR.

pub mod builder;
pub mod kernels;
pub mod math;
pub mod pipeline;
pub mod quant_dot;
pub mod sparse_kernels;
pub mod sparse_quant_bitmap;
pub mod sparse_quant_expand;
pub mod sparse_quant_kernels;
pub mod sparse_unrolled;
pub mod sparse_warp;

pub use builder::Device;
pub use kernels::{emit_kernel, KernelSpec};
