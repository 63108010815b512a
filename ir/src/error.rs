//! Errors of the IR crate: parse errors with line:column, verifier errors naming
//! the op and operand, evaluation errors.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    /// Malformed text. `line:col` is 1-based.
    #[error("{line}:{col}: {message}")]
    Parse { line: u32, col: u32, message: String },
    /// A well-formed graph that breaks a rule: `at` is `line:col` or `node N`.
    #[error("{at}: {op} %{value}: {message}")]
    Verify { at: String, op: &'static str, value: String, message: String },
    /// The reference semantics cannot evaluate this op or pattern.
    #[error("{op} %{value}: {message}")]
    Eval { op: &'static str, value: String, message: String },
    /// A plan that does not fit the graph (`plan rule N: ...`).
    #[error("{0}")]
    Plan(String),
}

pub type IrResult<T> = Result<T, IrError>;
