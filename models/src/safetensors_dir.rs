//! Hugging Face checkpoint directories: `config.json` plus one or several
//! (`model.safetensors.index.json`) memory-mapped safetensors files.

use crate::ModelError;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct SafetensorsDir {
    pub dir: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name → where it is: read from each header once, at open.
    index: HashMap<String, Entry>,
}

/// A tensor's file (index into `files`), type, shape and bytes in that file.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

fn fmt(path: &Path, message: String) -> ModelError {
    ModelError::Format { path: path.into(), message }
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<SafetensorsDir, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|error| ModelError::Io { path: index_path.clone(), error })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| fmt(&index_path, format!("not JSON: {e}")))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| fmt(&index_path, "no `weight_map`".into()))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in names {
            if name.contains('/') || name.contains("..") {
                return Err(fmt(&index_path, format!("shard name `{name}` leaves the directory")));
            }
            let path = dir.join(&name);
            let f = std::fs::File::open(&path).map_err(|error| ModelError::Io { path: path.clone(), error })?;
            // SAFETY: mapped read-only; the checkpoint is not modified while we hold it.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|error| ModelError::Io { path: path.clone(), error })?;
            let st = SafeTensors::deserialize(&map).map_err(|e| fmt(&path, format!("not a valid safetensors file: {e}")))?;
            for (name, t) in st.tensors() {
                let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
                let entry = Entry { file: files.len(), dtype: t.dtype(), shape: t.shape().to_vec(), bytes: start..start + t.data().len() };
                index.insert(name, entry);
            }
            files.push((path, map));
        }
        Ok(SafetensorsDir { dir: dir.into(), files, index })
    }

    /// Every shard's bytes, as mapped.
    pub fn file_bytes(&self) -> impl Iterator<Item = &[u8]> {
        self.files.iter().map(|(_, m)| &m[..])
    }

    /// How many tensors the directory holds.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        self.index.get(name).ok_or_else(|| ModelError::MissingTensor { path: self.dir.clone(), name: name.into() })
    }

    /// The shape of a tensor, from the file header (no data is read).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        let e = self.entry(name)?;
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(fmt(&self.files[e.file].0, format!("tensor `{name}` has unsupported dtype {:?} (F32, F16, BF16 are)", e.dtype)));
        }
        Ok(e.shape.clone())
    }

    /// The IR float type a tensor is stored in (f32, f16 or bf16); `None` for
    /// other types or a missing tensor.
    pub fn float_dtype(&self, name: &str) -> Option<sparsec_ir::DType> {
        match self.index.get(name)?.dtype {
            Dtype::F32 => Some(sparsec_ir::DType::F32),
            Dtype::F16 => Some(sparsec_ir::DType::F16),
            Dtype::BF16 => Some(sparsec_ir::DType::BF16),
            _ => None,
        }
    }

    /// The tensor as f32 (from F32, F16 or BF16) with its shape.
    pub fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let e = self.entry(name)?;
        let (path, map) = &self.files[e.file];
        let b = &map[e.bytes.clone()];
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(fmt(path, format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        Ok((e.shape.clone(), values))
    }
}
