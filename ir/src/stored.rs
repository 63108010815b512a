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

/// `data` as stored (`store`) rearranged in the buffer's tile layout, if it
/// has one (`tiles.rs`): the bf16 words or q4_1 planes of a `[n, k]` weight (`dims`).
pub fn tiled(tiles: Option<crate::tiles::TileLayout>, dims: &[u64], data: WeightData) -> Result<WeightData, String> {
    let Some(t) = tiles else { return Ok(data) };
    match (dims, data) {
        (&[n, k], WeightData::Packed(dt, words)) if t.fits(dt, n, k) => {
            t.tile(&words, n, k).map(|w| WeightData::Packed(dt, w)).ok_or_else(|| format!("{} bytes are not a {n}x{k} matrix", words.len()))
        }
        (dims, _) => Err(format!("a {dims:?} weight cannot be stored as {t:?} tiles (dense {} of whole tiles only)", t.dtype().name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::{unpack, SparseStorage};
    use crate::{Sparsity, ValueCoding};

    fn values(n: usize) -> Vec<f32> {
        crate::Init::Normal { seed: 7, std: 0.5 }.generate(n)
    }

    #[test]
    fn dense_types_are_rounded_or_quantized() {
        let v = values(64);
        assert_eq!(store(DType::F32, None, None, WeightData::F32(v.clone())), Ok(WeightData::F32(v.clone())));
        let Ok(WeightData::Packed(DType::BF16, b)) = store(DType::BF16, None, None, WeightData::F32(v.clone())) else { panic!() };
        assert_eq!(b, half_bytes(DType::BF16, &v).unwrap());
        let q = crate::quant::quantize(DType::Q4_1, &v).unwrap();
        assert_eq!(store(DType::Q4_1, None, None, WeightData::F32(v.clone())), Ok(WeightData::Packed(DType::Q4_1, q.clone())));
        // Blocks a checkpoint stores in the buffer's type are kept as they are.
        assert_eq!(store(DType::Q4_1, None, None, WeightData::Packed(DType::Q4_1, q.clone())), Ok(WeightData::Packed(DType::Q4_1, q)));
    }

    #[test]
    fn a_pruned_weight_is_materialized_then_packed() {
        let (n, k) = (8u64, 32u64);
        let pw = PrunedWeight { sparsity: Sparsity::NM { n: 2, m: 4 }, values: ValueCoding::Q4, transposed: true, n, k };
        let st = SparseStorage { format: pw.format(), transposed: true };
        let v = values((n * k) as usize);
        let mut want = v.clone();
        pw.materialize(&mut want);
        // Stored dense (a `dense` kernel): the reference's values.
        assert_eq!(store(DType::F32, Some(&pw), None, WeightData::F32(v.clone())), Ok(WeightData::F32(want.clone())));
        // Packed: unpacking gives the same values back.
        let Ok(WeightData::Sparse(bytes)) = store(DType::F32, Some(&pw), Some(&st), WeightData::F32(v)) else { panic!() };
        assert_eq!(unpack(&st.format, &bytes, true), Some(want));
    }

    #[test]
    fn what_does_not_fit_is_an_error() {
        let v = values(64);
        let e = store(DType::Q8_0, None, None, WeightData::F32(values(40))).unwrap_err();
        assert!(e.contains("not whole q8_0 blocks"), "{e}");
        let q8 = crate::quant::quantize(DType::Q8_0, &v).unwrap();
        let e = store(DType::Q4_1, None, None, WeightData::Packed(DType::Q8_0, q8.clone())).unwrap_err();
        assert!(e.contains("holds q8_0 blocks, the graph declares q4_1"), "{e}");
        let pw = PrunedWeight { sparsity: Sparsity::Unstructured { ratio: 0.5 }, values: ValueCoding::F32, transposed: true, n: 4, k: 8 };
        let e = store(DType::F32, Some(&pw), None, WeightData::F32(v.clone())).unwrap_err();
        assert!(e.contains("64 values, the pruned weight is 4x8"), "{e}");
        let e = store(DType::Q8_0, Some(&pw), None, WeightData::Packed(DType::Q8_0, q8)).unwrap_err();
        assert!(e.contains("must be f32"), "{e}");
        assert!(store(DType::F32, None, None, WeightData::Sparse(vec![0; 8])).is_err());
    }
}
