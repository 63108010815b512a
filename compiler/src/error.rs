//! The compiler's typed errors; each says which kernel, stage or file.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CompileError {
    #[error(transparent)]
    Ir(#[from] sparsec_ir::IrError),
    #[error(transparent)]
    Pass(#[from] sparsec_passes::PassError),
    #[error(transparent)]
    Plan(#[from] sparsec_passes::PlanError),
    #[error("kernel `{kernel}` ({op}): cannot lower: {why}")]
    Unsupported { kernel: String, op: &'static str, why: String },
    #[error("kernel `{kernel}`: MLIR {stage} failed:\n{diagnostics}")]
    Mlir { kernel: String, stage: &'static str, diagnostics: String },
    #[error("kernel `{kernel}`: LLVM {stage} failed: {message}")]
    Llvm { kernel: String, stage: &'static str, message: String },
    #[error("linking {output} failed ({command}):\n{stderr}")]
    Link { output: PathBuf, command: String, stderr: String },
    #[error("ptxas rejected {ptx}:\n{stderr}\nreproduce with: {command}")]
    Ptxas { ptx: PathBuf, command: String, stderr: String },
    #[error("weight `{name}` (value %{value}): {message}")]
    Weight { name: String, value: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

impl CompileError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CompileError {
        let path = path.into();
        move |error| CompileError::Io { path, error }
    }
}

pub type CompileResult<T> = Result<T, CompileError>;
