//! sparsec's runtime: loads artifacts without LLVM and runs them on the CPU
//! (dlopen) or an NVIDIA GPU (cudarc, PTX), next to the reference interpreter.

pub mod amx;
pub mod artifact;
pub mod calibrate;
pub mod checkpoint;
pub mod compare;
pub mod cpu;
pub mod cuda;
pub mod cuda_append;
pub mod cuda_greedy;
pub mod cuda_seq_append;
pub mod cuda_session;
pub mod cuda_side;
pub mod error;
pub mod execute;
pub mod integrity;
pub mod interpreter;
pub mod isa;
pub mod lm;
pub mod lm_session;
pub mod manifest;
pub mod pool;
pub mod resident;
pub mod sampling;
pub mod session;
pub mod validate;

pub use artifact::{Artifact, Trust};
pub use error::{RuntimeError, RuntimeResult};
