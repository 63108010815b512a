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

/// A weight's data as the artifact stores it.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightData {
    /// Row-major f32 values.
    F32(Vec<f32>),
    /// Packed quantized blocks (`sparsec_ir::quant`) of the given type.
    Packed(DType, Vec<u8>),
    /// A pruned weight packed as its buffer's `SparseStorage` says (`sparsec_ir::sparse`).
    Sparse(Vec<u8>),
}

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
    Lookup { lookup: WeightLookup<'a>, fingerprint: &'a str, calibrated: bool },
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
            Op::Constant { values } => WeightData::F32(values.clone()),
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
                // A quantized weight is stored packed: kept as the checkpoint stores
                // it, or quantized here from f32 data.
                match (spec.dtype.is_quantized(), data) {
                    (false, WeightData::F32(v)) => match half_bytes(spec.dtype, &v) {
                        Some(bytes) => WeightData::Packed(spec.dtype, bytes),
                        None => WeightData::F32(v),
                    },
                    (true, WeightData::Packed(dt, p)) if dt == spec.dtype => WeightData::Packed(dt, p),
                    (true, WeightData::F32(v)) => match sparsec_ir::quant::quantize(spec.dtype, &v) {
                        Some(p) => WeightData::Packed(spec.dtype, p),
                        None => return Err(err(format!("{} values are not whole {} blocks", v.len(), spec.dtype.name()))),
                    },
                    (_, WeightData::Packed(dt, _)) => {
                        return Err(err(format!("the checkpoint holds {} blocks, the graph declares {}", dt.name(), spec.dtype.name())))
                    }
                    (_, WeightData::Sparse(_)) => return Err(err("a checkpoint lookup returned packed sparse data".into())),
                }
            }
            _ => unreachable!("partition only records weight and constant nodes"),
        };
        // A weight under `#sparsity` is materialized as the reference does (pruned by
        // magnitude, kept values quantized by `#values`), then packed if its kernel
        // reads a sparse format.
        let data = match (pruned.get(node), data) {
            (Some(pw), WeightData::F32(mut v)) => {
                let keep = pw.materialize(&mut v);
                match &spec.sparse {
                    None => WeightData::F32(v),
                    Some(st) => WeightData::Sparse(sparsec_ir::sparse::pack(&st.format, &v, &keep, st.transposed).ok_or_else(|| {
                        CompileError::Weight {
                            name: spec.name.clone(),
                            value: n.name.clone(),
                            message: format!("the pruned weight does not fit {:?}", st.format),
                        }
                    })?),
                }
            }
            (Some(_), _) => {
                return Err(CompileError::Weight {
                    name: spec.name.clone(),
                    value: n.name.clone(),
                    message: "a pruned weight must be f32 (the plan dequantizes it)".into(),
                })
            }
            (None, d) => d,
        };
        out.push((spec.name.clone(), shape, data));
    }
    Ok(out)
}

/// f32 values rounded to nearest (even) f16 or bf16, as little-endian bytes;
/// `None` for the other types.
pub fn half_bytes(dt: DType, v: &[f32]) -> Option<Vec<u8>> {
    match dt {
        DType::F16 => Some(v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()),
        DType::BF16 => Some(v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()),
        DType::F32 | DType::I32 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => None,
    }
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
