//! The runtime's typed errors.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{path}: {message}")]
    Artifact { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Ir(#[from] sparsec_ir::IrError),
    #[error("input {index} (%{name}): {message}")]
    Input { index: usize, name: String, message: String },
    #[error("{0}")]
    Positions(String),
    #[error("cpu: {0}")]
    Cpu(String),
    #[error("cuda: {0}")]
    Cuda(String),
    #[error("model: {0}")]
    Model(String),
    #[error("no CUDA driver (libcuda) on this machine")]
    NoCuda,
}

pub type RuntimeResult<T> = Result<T, RuntimeError>;
