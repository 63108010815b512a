//! Block-quantized tensors as sparsec packs them: ggml's Q8_0, Q4_0 and Q4_1
//! blocks (32 values along the last axis), split into planes so kernels load
//! the quants, the scales and the minimums as three contiguous streams.
//!
//! For `nb = numel / 32` blocks in row-major order the packed bytes are
//! `qs` (Q8_0: `nb·32` i8; Q4_*: `nb·16` bytes, byte `j` holding value `j` in
//! its low nibble and value `j+16` in its high nibble, as ggml does), then `d`
//! (`nb` f16 scales), then for Q4_1 `m` (`nb` f16 minimums). The size equals
//! ggml's, and dequantization is exact: Q8_0 `d·q`, Q4_0 `d·(q−8)`, Q4_1 `d·q+m`.

use crate::types::DType;
use half::f16;

/// Values per block.
pub const QK: usize = 32;

/// Bytes of one block (quants plus scales), `0` for a type that is not quantized.
pub fn block_bytes(dt: DType) -> usize {
    match dt {
        DType::Q8_0 => QK + 2,
        DType::Q4_0 => QK / 2 + 2,
        DType::Q4_1 => QK / 2 + 4,
        _ => 0,
    }
}

/// Bytes of the quants of one block.
pub fn quant_bytes(dt: DType) -> usize {
    match dt {
        DType::Q8_0 => QK,
        DType::Q4_0 | DType::Q4_1 => QK / 2,
        _ => 0,
    }
}

/// Where the planes of `nb` blocks start in the packed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planes {
    pub blocks: usize,
    /// Byte offset of the f16 scales.
    pub d: usize,
    /// Byte offset of the f16 minimums (Q4_1), else equal to the end.
    pub m: usize,
    pub total: usize,
}

pub fn planes(dt: DType, numel: usize) -> Option<Planes> {
    if !dt.is_quantized() || !numel.is_multiple_of(QK) {
        return None;
    }
    let blocks = numel / QK;
    let d = blocks * quant_bytes(dt);
    let m = d + 2 * blocks;
    let total = if dt == DType::Q4_1 { m + 2 * blocks } else { m };
    Some(Planes { blocks, d, m, total })
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Repacks ggml blocks (interleaved: scale(s) then quants, per block) into planes.
/// `None` when the byte count is not a whole number of blocks of `dt`.
pub fn pack_ggml(dt: DType, ggml: &[u8]) -> Option<Vec<u8>> {
    let bb = block_bytes(dt);
    if bb == 0 || !ggml.len().is_multiple_of(bb) {
        return None;
    }
    let p = planes(dt, ggml.len() / bb * QK)?;
    let head = bb - quant_bytes(dt);
    let mut out = vec![0u8; p.total];
    for (i, blk) in ggml.chunks_exact(bb).enumerate() {
        let qb = quant_bytes(dt);
        out[i * qb..(i + 1) * qb].copy_from_slice(&blk[head..]);
        out[p.d + 2 * i..p.d + 2 * i + 2].copy_from_slice(&blk[0..2]);
        if dt == DType::Q4_1 {
            out[p.m + 2 * i..p.m + 2 * i + 2].copy_from_slice(&blk[2..4]);
        }
    }
    Some(out)
}

/// Decodes packed bytes into `out` (its length is the element count). Returns
/// `false` when the sizes disagree or the type is not quantized.
pub fn dequantize(dt: DType, packed: &[u8], out: &mut [f32]) -> bool {
    let Some(p) = planes(dt, out.len()) else { return false };
    if packed.len() != p.total {
        return false;
    }
    let qb = quant_bytes(dt);
    for (b, o) in out.chunks_exact_mut(QK).enumerate() {
        let d = f16_at(packed, p.d + 2 * b);
        let qs = &packed[b * qb..(b + 1) * qb];
        match dt {
            DType::Q8_0 => {
                for (x, q) in o.iter_mut().zip(qs) {
                    *x = d * (*q as i8) as f32;
                }
            }
            DType::Q4_0 | DType::Q4_1 => {
                let (scale, min) = if dt == DType::Q4_1 { (d, f16_at(packed, p.m + 2 * b)) } else { (d, -8.0 * d) };
                for (j, q) in qs.iter().enumerate() {
                    o[j] = scale * (q & 0x0F) as f32 + min;
                    o[j + QK / 2] = scale * (q >> 4) as f32 + min;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Quantizes `values` as ggml's reference quantizers do, into packed planes.
/// `None` when the count is not a whole number of blocks or `dt` is not quantized.
pub fn quantize(dt: DType, values: &[f32]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; planes(dt, values.len())?.total];
    quantize_into(dt, values, &mut out)?;
    Some(out)
}

/// `quantize` into `out`, which must hold exactly the packed bytes (a KV
/// cache's row, packed where it lives); `None`, `out` untouched, otherwise.
pub fn quantize_into(dt: DType, values: &[f32], out: &mut [u8]) -> Option<()> {
    let p = planes(dt, values.len())?;
    if out.len() != p.total {
        return None;
    }
    let qb = quant_bytes(dt);
    for (b, x) in values.chunks_exact(QK).enumerate() {
        let qs = &mut out[b * qb..(b + 1) * qb];
        let (d, m) = match dt {
            DType::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (q, v) in qs.iter_mut().zip(x) {
                    *q = ((v * id).round() as i8) as u8;
                }
                (d, 0.0)
            }
            DType::Q4_0 => {
                let max = x.iter().copied().fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for j in 0..QK / 2 {
                    let lo = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let hi = ((x[j + QK / 2] * id + 8.5) as i32).clamp(0, 15) as u8;
                    qs[j] = lo | (hi << 4);
                }
                (d, 0.0)
            }
            DType::Q4_1 => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for j in 0..QK / 2 {
                    let lo = (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let hi = (((x[j + QK / 2] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    qs[j] = lo | (hi << 4);
                }
                (d, min)
            }
            _ => return None,
        };
        out[p.d + 2 * b..p.d + 2 * b + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if dt == DType::Q4_1 {
            out[p.m + 2 * b..p.m + 2 * b + 2].copy_from_slice(&f16::from_f32(m).to_le_bytes());
        }
    }
    Some(())
}

/// `x` multiplied in place by the normalized Hadamard matrix of its length
/// (a power of two): the fast Walsh–Hadamard transform, scaled by 1/√n. The
/// matrix is symmetric and orthogonal, so applying it twice gives `x` back.
/// Returns `false` (and leaves `x`) when the length is not a power of two.
pub fn hadamard(x: &mut [f32]) -> bool {
    let n = x.len();
    if !n.is_power_of_two() {
        return false;
    }
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_is_orthogonal_and_its_own_inverse() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 29 % 23) as f32 - 11.0) / 7.0).collect();
        let mut y = x.clone();
        assert!(hadamard(&mut y));
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x));
        // Row 1 of H_4 is (1, -1, 1, -1)/2.
        let mut e = [0.0, 1.0, 0.0, 0.0];
        assert!(hadamard(&mut e));
        assert_eq!(e, [0.5, -0.5, 0.5, -0.5]);
        assert!(hadamard(&mut y));
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!(!hadamard(&mut [1.0; 6]));
    }

    #[test]
    fn quantize_then_dequantize_is_close_and_repacking_ggml_blocks_is_exact() {
        let values: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for (dt, tol) in [(DType::Q8_0, 0.02), (DType::Q4_0, 0.4), (DType::Q4_1, 0.25)] {
            let packed = quantize(dt, &values).unwrap();
            assert_eq!(Some(packed.len()), dt.storage_bytes(values.len()));
            let mut back = vec![0f32; values.len()];
            assert!(dequantize(dt, &packed, &mut back));
            let err = values.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < tol, "{dt:?}: max error {err}");
            // ggml's interleaved blocks from the planes, then back: the same bytes.
            let p = planes(dt, values.len()).unwrap();
            let (qb, bb) = (quant_bytes(dt), block_bytes(dt));
            let mut ggml = Vec::new();
            for b in 0..p.blocks {
                ggml.extend_from_slice(&packed[p.d + 2 * b..p.d + 2 * b + 2]);
                if dt == DType::Q4_1 {
                    ggml.extend_from_slice(&packed[p.m + 2 * b..p.m + 2 * b + 2]);
                }
                ggml.extend_from_slice(&packed[b * qb..(b + 1) * qb]);
            }
            assert_eq!(ggml.len(), p.blocks * bb);
            assert_eq!(pack_ggml(dt, &ggml).unwrap(), packed);
        }
        assert!(quantize(DType::Q8_0, &values[..31]).is_none());
        assert!(!dequantize(DType::F32, &[], &mut []));
    }
}
