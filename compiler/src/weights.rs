//! Weight data for a compile: from a safetensors file (memory-mapped), a loaded
//! checkpoint or the weight's `init`, checked against the declared shape, and
//! packed into the artifact: f32, 16-bit values for f16/bf16 weights (rounded
//! here), or quantized blocks for weights whose type is q8_0/q4_0/q4_1 (kept as
//! stored when the checkpoint has them, else quantized).

use crate::error::{CompileError, CompileResult};
use crate::partition::Partition;
use safetensors::{Dtype, SafeTensors};
use sparsec_ir::{DType, Graph, Op};
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

pub use sparsec_ir::stored::{half_bytes, WeightData};

/// Weight data by tensor name and the type the graph declares: shape and data
/// (packed when the checkpoint holds that quantized type, else f32), `None` if unknown.
pub type WeightLookup<'a> = &'a dyn Fn(&str, DType) -> CompileResult<Option<(Vec<usize>, WeightData)>>;

/// Where a compile's weights come from.
#[derive(Clone, Copy, Default)]
pub enum WeightSource<'a> {
    /// Only the graph's `init`s.
    #[default]
    None,
    /// A safetensors file (`--weights`).
    File(&'a Path),
    /// A loaded checkpoint, by tensor name (a model's weight roles), with a
    /// fingerprint of its stored bytes (it keys the cache); `calibrated` when
    /// the plan's calibrated methods (Wanda, SparseGPT) already pruned them.
    /// With `strip`, the artifact leaves out the weights the checkpoint holds
    /// as stored (`--strip-weights`; the runtime packs them at load): `strip`
    /// says of a name whether it is such a tensor (`Some(true)`), data derived
    /// from the checkpoint at compile time (`Some(false)`: calibrated pruning,
    /// factors, fitted bases; refused, as the runtime cannot redo it), or not
    /// the checkpoint's (`None`: kept in the artifact).
    Lookup { lookup: WeightLookup<'a>, fingerprint: &'a str, calibrated: bool, strip: Option<StripRule<'a>> },
}

/// See `WeightSource::Lookup`.
pub type StripRule<'a> = &'a dyn Fn(&str) -> Option<bool>;

/// The weights `--strip-weights` leaves out of the artifact (`WeightSource::Lookup`'s
/// `strip`), in buffer order; an error for a weight whose data the runtime
/// could not pack from a checkpoint alone, or whose kernel bakes it into code.
pub fn stripped(g: &Graph, part: &Partition, strip: StripRule<'_>) -> CompileResult<Vec<String>> {
    let mut out = Vec::new();
    for (buf, node) in &part.weight_nodes {
        let n = &g.nodes[*node];
        let Op::Weight { name, .. } = &n.op else { continue };
        let err = |message: String| CompileError::Weight { name: name.clone(), value: n.name.clone(), message };
        match strip(name) {
            None => {}
            Some(false) => {
                return Err(err(
                    "--strip-weights: this weight is derived from the checkpoint at compile time (calibrated pruning, low rank, a fitted basis), which the runtime cannot redo from a checkpoint".into(),
                ))
            }
            Some(true) => {
                if part.kernels.iter().any(|k| k.sparse.as_ref().is_some_and(|c| c.bakes() && c.weight == *name)) {
                    return Err(err(
                        "--strip-weights: a kernel bakes this weight's structure into code (specialize indices or full; auto picks indices for small matrices): give specialize = \"generic\"".into(),
                    ));
                }
                out.push(part.plan.buffers[*buf].name.clone());
            }
        }
    }
    Ok(out)
}

/// Resolves the data of every weight buffer of `part`, in buffer order.
pub fn resolve(g: &Graph, part: &Partition, source: WeightSource<'_>) -> CompileResult<Vec<(String, Vec<usize>, WeightData)>> {
    let file = match source {
        WeightSource::File(p) => Some(WeightFile::open(p)?),
        _ => None,
    };
    let lookup = |name: &str, dtype: DType| -> CompileResult<Option<(Vec<usize>, WeightData)>> {
        match (&file, source) {
            (Some(f), _) => Ok(f.get(name)?.map(|(s, v)| (s, WeightData::F32(v)))),
            (None, WeightSource::Lookup { lookup, .. }) => lookup(name, dtype),
            _ => Ok(None),
        }
    };
    let described = match source {
        WeightSource::None => None,
        WeightSource::File(p) => Some(p.display().to_string()),
        WeightSource::Lookup { .. } => Some("the checkpoint".to_string()),
    };
    let mut out = Vec::new();
    let pruned = sparsec_ir::sparse::pruned_weights(g);
    for (buf, node) in &part.weight_nodes {
        let spec = &part.plan.buffers[*buf];
        let n = &g.nodes[*node];
        let shape: Vec<usize> = spec.dims.iter().map(|d| d.resolve(0) as usize).collect();
        let numel: usize = shape.iter().product();
        let data = match &n.op {
            // A constant keeps its f32 values (pruned and packed as a weight is, under `#sparsity`).
            Op::Constant { values } => {
                sparsec_ir::stored::store(DType::F32, pruned.get(node), spec.sparse.as_ref(), WeightData::F32(values.clone()))
                    .map_err(|message| CompileError::Weight { name: spec.name.clone(), value: n.name.clone(), message })?
            }
            Op::Weight { name, init } => {
                let err = |message: String| CompileError::Weight { name: name.clone(), value: n.name.clone(), message };
                let data = match (lookup(name, spec.dtype)?, init) {
                    (Some((fshape, data)), _) => {
                        if fshape != shape {
                            return Err(err(format!("the weights have shape {fshape:?}, the graph declares {shape:?}")));
                        }
                        data
                    }
                    (None, Some(init)) => WeightData::F32(init.generate(numel)),
                    (None, None) => {
                        return Err(err(match &described {
                            Some(d) => format!("not in {d} and no `init` given"),
                            None => "no weights file given (--weights) and no `init` in the graph".into(),
                        }))
                    }
                };
                // Stored as the buffer's type says; a weight under `#sparsity`
                // materialized as the reference does and packed if its kernel
                // reads a sparse format (`sparsec_ir::stored`).
                let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                sparsec_ir::stored::store(spec.dtype, pruned.get(node), spec.sparse.as_ref(), data)
                    .and_then(|d| sparsec_ir::stored::tiled(spec.tiles, &dims, d))
                    .map_err(err)?
            }
            _ => unreachable!("partition only records weight and constant nodes"),
        };
        out.push((spec.name.clone(), shape, data));
    }
    Ok(out)
}

/// Writes tensors as safetensors: F32 tensors of their shape, packed quantized
/// weights as U8 tensors of their bytes (padded to 64 so every tensor after
/// them stays aligned; the plan's buffer type says how many bytes count).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, WeightData)]) -> CompileResult<()> {
    let bytes: Vec<(Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(_, shape, d)| match d {
            WeightData::F32(v) => (Dtype::F32, shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            WeightData::Packed(_, p) | WeightData::Sparse(p) => {
                let mut p = p.clone();
                p.resize(p.len().next_multiple_of(64), 0);
                (Dtype::U8, vec![p.len()], p)
            }
        })
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, _), (dt, shape, b))| safetensors::tensor::TensorView::new(*dt, shape.clone(), b).map(|v| (name.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CompileError::File { path: path.into(), message: e.to_string() })?;
    safetensors::serialize_to_file(views, &None, path).map_err(|e| CompileError::File { path: path.into(), message: e.to_string() })
}
