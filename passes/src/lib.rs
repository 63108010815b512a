//! Graph passes: the `Pass` trait, the pass manager and the registered passes.
//! A pass is one file implementing `Pass`, listed once in `registry()`.

mod apply_plan;
mod const_fold;
mod dce;
pub mod kv_basis;
pub mod low_rank;
mod manager;
pub mod plan;
mod shape_infer;
mod verify;

pub use apply_plan::{
    attention_input, layer_and_role, nsa_adapter_names, resolve_from_weights, sparsity_value, ApplyPlan, FoundPattern, ResolvedPlan,
};
pub use const_fold::ConstFold;
pub use dce::DeadCodeElimination;
pub use kv_basis::{kv_basis_names, kv_pre_rope_names, kv_smooth_names};
pub use low_rank::{factor_names, LowRankLowering};
pub use manager::{PassManager, PrintOptions, Snapshot};
pub use plan::{Calibration, FactorMethod, FactorPlan, FactorSize, KvPlan, KvTransform, NsaGatePlan, Plan, PlanError, PruneMethod};
pub use shape_infer::ShapeInference;
pub use verify::Verify;

use sparsec_ir::{Graph, IrError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PassError {
    #[error("pass `{pass}`: {error}")]
    Ir { pass: &'static str, error: IrError },
    #[error("verifier failed after pass `{pass}`: {error}")]
    BrokeInvariant { pass: &'static str, error: IrError },
    #[error("unknown pass `{0}` (known: {1})")]
    UnknownPass(String, String),
}

/// One transformation (or check) of a graph.
pub trait Pass {
    /// The name used by `--print-after=NAME` and in pipelines.
    fn name(&self) -> &'static str;
    /// One line for `--help` and `docs/`.
    fn description(&self) -> &'static str;
    fn run(&self, g: &mut Graph) -> Result<(), IrError>;
}

/// Every pass, in default pipeline order.
pub fn registry() -> Vec<Box<dyn Pass>> {
    vec![Box::new(Verify), Box::new(ShapeInference), Box::new(ConstFold), Box::new(DeadCodeElimination)]
}

/// Looks a pass up by name.
pub fn pass_by_name(name: &str) -> Result<Box<dyn Pass>, PassError> {
    registry()
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| PassError::UnknownPass(name.to_string(), registry().iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")))
}
