//! How a weight's data becomes what an artifact stores: f32 values, 16-bit
//! words (f16/bf16, rounded to nearest even), quantized blocks (`quant.rs`),
//! or, for a weight under `#sparsity`, its materialized values packed in the
//! buffer's sparse format (`sparse.rs`). One function for the compiler, which
//! writes artifacts, and the runtime, which packs a checkpoint at load
//! (`sparsec-run ARTIFACT --weights CHECKPOINT`), so both store the same bytes.

use crate::sparse::{PrunedWeight, SparseStorage};
use crate::DType;

/// A weight's data as the artifact stores it.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightData {
    /// Row-major f32 values.
    F32(Vec<f32>),
    /// Packed quantized blocks (`quant.rs`) or 16-bit words of the given type.
    Packed(DType, Vec<u8>),
    /// A pruned weight packed as its buffer's `SparseStorage` says (`sparse.rs`).
    Sparse(Vec<u8>),
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

/// `data` (f32 values, or blocks a checkpoint already stores in `dtype`)
/// stored as a weight buffer of type `dtype`: 16-bit types rounded, quantized
/// types kept as stored or quantized here; then, for a weight `pruned` says is
/// under `#sparsity`, materialized as the reference does (pruned by magnitude,
/// kept values quantized by `#values`) and packed in `sparse` when its kernel
/// reads a sparse format. The error says what does not fit.
pub fn store(dtype: DType, pruned: Option<&PrunedWeight>, sparse: Option<&SparseStorage>, data: WeightData) -> Result<WeightData, String> {
    let data = match (dtype.is_quantized(), data) {
        (false, WeightData::F32(v)) => match half_bytes(dtype, &v) {
            Some(bytes) => WeightData::Packed(dtype, bytes),
            None => WeightData::F32(v),
        },
        (true, WeightData::Packed(dt, p)) if dt == dtype => WeightData::Packed(dt, p),
        (true, WeightData::F32(v)) => match crate::quant::quantize(dtype, &v) {
            Some(p) => WeightData::Packed(dtype, p),
            None => return Err(format!("{} values are not whole {} blocks", v.len(), dtype.name())),
        },
        (_, WeightData::Packed(dt, _)) => {
            return Err(format!("the checkpoint holds {} blocks, the graph declares {}", dt.name(), dtype.name()))
        }
        (_, WeightData::Sparse(_)) => return Err("packed sparse data cannot be stored again".into()),
    };
    match (pruned, data) {
        (Some(pw), WeightData::F32(mut v)) => {
            if v.len() as u64 != pw.n * pw.k {
                return Err(format!("{} values, the pruned weight is {}x{}", v.len(), pw.n, pw.k));
            }
            let keep = pw.materialize(&mut v);
            match sparse {
                None => Ok(WeightData::F32(v)),
                Some(st) => crate::sparse::pack(&st.format, &v, &keep, st.transposed)
                    .map(WeightData::Sparse)
                    .ok_or_else(|| format!("the pruned weight does not fit {:?}", st.format)),
            }
        }
        (Some(_), _) => Err("a pruned weight must be f32 (the plan dequantizes it)".into()),
        (None, d) => Ok(d),
    }
}
