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
    /// A hyperparameter the graph cannot be built from: `field` is its name as
    /// the checkpoint spells it (`num_attention_heads`, `llama.block_count`).
    #[error("{path}: config field `{field}` {message}")]
    Config { path: PathBuf, field: String, message: String },
}

/// Token ids (and GPT-2's positions) travel through the graph as f32 holding
/// integers, exact below 2^24: a larger vocabulary or position table is refused.
pub const MAX_EXACT_ID: u64 = 1 << 24;

/// More layers than any real model has; a larger count is a corrupt config
/// (and would make the loader build millions of names before failing).
pub const MAX_LAYERS: u64 = 1 << 16;

/// A hyperparameter that cannot make a model, before the checkpoint's path is
/// attached (`into_error`): its field as the checkpoint spells it, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    pub field: &'static str,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(field: &'static str, message: impl Into<String>) -> ConfigIssue {
        ConfigIssue { field, message: message.into() }
    }

    pub fn into_error(self, path: &Path) -> ModelError {
        ModelError::Config { path: path.into(), field: self.field.into(), message: self.message }
    }
}

/// `value` must lie in `1..=max`.
pub(crate) fn check_size(field: &'static str, value: u64, max: u64, why_max: &str) -> Result<(), ConfigIssue> {
    if value == 0 {
        return Err(ConfigIssue::new(field, "is 0; it must be at least 1"));
    }
    if value > max {
        return Err(ConfigIssue::new(field, format!("is {value}, more than {max} ({why_max})")));
    }
    Ok(())
}

/// Sums `terms` of parameter counts (each a product) and checks that the model's
/// f32 bytes fit in memory arithmetic (`isize::MAX`): every later product of
/// these sizes then fits too. A term that overflows names its field.
pub(crate) fn check_param_bytes(terms: &[(&'static str, &[u64])]) -> Result<u64, ConfigIssue> {
    let limit = isize::MAX as u64 / 4;
    let mut total: u64 = 0;
    for (field, factors) in terms {
        let too_large = || {
            let product = factors.iter().map(u64::to_string).collect::<Vec<_>>().join(" × ");
            ConfigIssue::new(
                field,
                format!(
                    "is too large: {product} parameters (with the rest of the model) exceed the {limit} f32 values a model can address"
                ),
            )
        };
        let n = factors.iter().try_fold(1u64, |a, f| a.checked_mul(*f)).ok_or_else(too_large)?;
        total = total.checked_add(n).filter(|t| *t <= limit).ok_or_else(too_large)?;
    }
    Ok(total)
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
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(|error| ModelError::Io { path: path.into(), error })?;
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
