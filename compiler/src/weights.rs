//! Weight data for a compile: from a safetensors file (memory-mapped) or from the
//! weight's `init`, checked against the declared shape, packed into the artifact.

use crate::error::{CompileError, CompileResult};
use crate::partition::Partition;
use safetensors::{Dtype, SafeTensors};
use sparsec_ir::{Graph, Op};
use std::path::{Path, PathBuf};

/// A memory-mapped safetensors file.
pub struct WeightFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl WeightFile {
    pub fn open(path: &Path) -> CompileResult<WeightFile> {
        let f = std::fs::File::open(path).map_err(CompileError::io(path))?;
        // SAFETY: the file is opened read-only and not modified while mapped by us;
        // a concurrent writer would be a user error we cannot prevent.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(CompileError::io(path))?;
        SafeTensors::deserialize(&map)
            .map_err(|e| CompileError::File { path: path.into(), message: format!("not a valid safetensors file: {e}") })?;
        Ok(WeightFile { path: path.into(), map })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        // Validated in `open`.
        SafeTensors::deserialize(&self.map).unwrap_or_else(|_| unreachable!("validated at open"))
    }

    /// The tensor `name` as f32 with its shape, or `None` if absent.
    pub fn get(&self, name: &str) -> CompileResult<Option<(Vec<usize>, Vec<f32>)>> {
        let st = self.tensors();
        let Ok(t) = st.tensor(name) else { return Ok(None) };
        if t.dtype() != Dtype::F32 {
            return Err(CompileError::File {
                path: self.path.clone(),
                message: format!("tensor `{name}` has dtype {:?}; only F32 is supported here", t.dtype()),
            });
        }
        let values = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Some((t.shape().to_vec(), values)))
    }
}

/// Weight data by tensor name: shape and row-major f32 values, `None` if unknown.
pub type WeightLookup<'a> = &'a dyn Fn(&str) -> CompileResult<Option<(Vec<usize>, Vec<f32>)>>;

/// Where a compile's weights come from.
#[derive(Clone, Copy, Default)]
pub enum WeightSource<'a> {
    /// Only the graph's `init`s.
    #[default]
    None,
    /// A safetensors file (`--weights`).
    File(&'a Path),
    /// A loaded checkpoint, by tensor name (a model's weight roles), with a
    /// fingerprint of its stored bytes (it keys the cache).
    Lookup { lookup: WeightLookup<'a>, fingerprint: &'a str },
}

/// Resolves the data of every weight buffer of `part`, in buffer order.
pub fn resolve(g: &Graph, part: &Partition, source: WeightSource<'_>) -> CompileResult<Vec<(String, Vec<usize>, Vec<f32>)>> {
    let file = match source {
        WeightSource::File(p) => Some(WeightFile::open(p)?),
        _ => None,
    };
    let lookup = |name: &str| -> CompileResult<Option<(Vec<usize>, Vec<f32>)>> {
        match (&file, source) {
            (Some(f), _) => f.get(name),
            (None, WeightSource::Lookup { lookup, .. }) => lookup(name),
            _ => Ok(None),
        }
    };
    let described = match source {
        WeightSource::None => None,
        WeightSource::File(p) => Some(p.display().to_string()),
        WeightSource::Lookup { .. } => Some("the checkpoint".to_string()),
    };
    let mut out = Vec::new();
    for (buf, node) in &part.weight_nodes {
        let spec = &part.plan.buffers[*buf];
        let n = &g.nodes[*node];
        let shape: Vec<usize> = spec.dims.iter().map(|d| d.resolve(0) as usize).collect();
        let numel: usize = shape.iter().product();
        let values = match &n.op {
            Op::Constant { values } => values.clone(),
            Op::Weight { name, init } => {
                let err = |message: String| CompileError::Weight { name: name.clone(), value: n.name.clone(), message };
                match (lookup(name)?, init) {
                    (Some((fshape, values)), _) => {
                        if fshape != shape {
                            return Err(err(format!("the weights have shape {fshape:?}, the graph declares {shape:?}")));
                        }
                        values
                    }
                    (None, Some(init)) => init.generate(numel),
                    (None, None) => {
                        return Err(err(match &described {
                            Some(d) => format!("not in {d} and no `init` given"),
                            None => "no weights file given (--weights) and no `init` in the graph".into(),
                        }))
                    }
                }
            }
            _ => unreachable!("partition only records weight and constant nodes"),
        };
        out.push((spec.name.clone(), shape, values));
    }
    Ok(out)
}

/// Writes tensors as F32 safetensors.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> CompileResult<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CompileError::File { path: path.into(), message: e.to_string() })?;
    safetensors::serialize_to_file(views, &None, path)
        .map_err(|e| CompileError::File { path: path.into(), message: e.to_string() })
}
