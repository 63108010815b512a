//! sparsec's model front end: recognizes what the user pointed at (an IR file,
//! a GGUF file, a Hugging Face checkpoint directory) and loads it. IR files load
//! into graphs; GGUF files are read and dequantized (`gguf.rs`, `quant.rs`);
//! graph builders for checkpoints and tokenizers are not written yet, so compiling
//! a checkpoint reports that.

pub mod builder;
pub mod checkpoint;
pub mod gguf;
pub mod gpt2;
pub mod llama;
pub mod quant;
pub mod safetensors_dir;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{error}")]
    Ir { path: PathBuf, error: sparsec_ir::IrError },
    #[error("{path}: is a {kind} checkpoint, not an IR file; load it with `checkpoint::Model::load`")]
    NotYetSupported { path: PathBuf, kind: &'static str },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{0}: not found")]
    NotFound(PathBuf),
    #[error("{path}: not an IR file, GGUF file or checkpoint directory ({why})")]
    Unrecognized { path: PathBuf, why: String },
}

/// What a path holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// sparsec IR text (`graph @name { ... }`).
    IrText,
    /// A GGUF file (magic `GGUF`).
    Gguf,
    /// A directory with `config.json` and safetensors.
    HfDirectory,
}

/// Classifies `path` by content, not by extension.
pub fn classify(path: &Path) -> Result<SourceKind, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.into()));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(SourceKind::HfDirectory);
        }
        return Err(ModelError::Unrecognized { path: path.into(), why: "a directory without config.json".into() });
    }
    use std::io::Read;
    let mut head = [0u8; 4096];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|error| ModelError::Io { path: path.into(), error })?;
    if head[..n].starts_with(b"GGUF") {
        return Ok(SourceKind::Gguf);
    }
    let text = String::from_utf8_lossy(&head[..n]);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("//"));
    if first.is_some_and(|l| l.starts_with("graph")) {
        return Ok(SourceKind::IrText);
    }
    Err(ModelError::Unrecognized { path: path.into(), why: "does not start with `graph`, nor the GGUF magic".into() })
}

/// Loads a graph from `path`.
pub fn load_graph(path: &Path) -> Result<sparsec_ir::Graph, ModelError> {
    match classify(path)? {
        SourceKind::IrText => {
            let text = std::fs::read_to_string(path).map_err(|error| ModelError::Io { path: path.into(), error })?;
            sparsec_ir::parse_graph(&text).map_err(|error| ModelError::Ir { path: path.into(), error })
        }
        SourceKind::Gguf => Err(ModelError::NotYetSupported { path: path.into(), kind: "GGUF" }),
        SourceKind::HfDirectory => Err(ModelError::NotYetSupported { path: path.into(), kind: "Hugging Face" }),
    }
}
