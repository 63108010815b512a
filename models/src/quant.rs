//! ggml tensor types and their exact dequantization to f32 (as ggml defines
//! them): F32, F16, BF16, Q8_0, Q4_0, Q4_1.

use half::{bf16, f16};

/// A ggml tensor type, by its GGUF code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    /// A type this build cannot decode (code and, where known, name).
    Unsupported(u32),
}

/// Elements per quantization block.
pub const QK: usize = 32;

impl GgmlType {
    pub fn from_code(code: u32) -> GgmlType {
        match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            c => GgmlType::Unsupported(c),
        }
    }

    /// The IR type of data stored in this type; `None` for unsupported types.
    pub fn ir_dtype(self) -> Option<sparsec_ir::DType> {
        use sparsec_ir::DType;
        Some(match self {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            GgmlType::Q8_0 => DType::Q8_0,
            GgmlType::Q4_0 => DType::Q4_0,
            GgmlType::Q4_1 => DType::Q4_1,
            GgmlType::Unsupported(_) => return None,
        })
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::BF16 => "BF16".into(),
            GgmlType::Unsupported(c) => {
                let known = [
                    (6, "Q5_0"),
                    (7, "Q5_1"),
                    (9, "Q8_1"),
                    (10, "Q2_K"),
                    (11, "Q3_K"),
                    (12, "Q4_K"),
                    (13, "Q5_K"),
                    (14, "Q6_K"),
                    (15, "Q8_K"),
                    (24, "I8"),
                    (25, "I16"),
                    (26, "I32"),
                    (27, "I64"),
                    (28, "F64"),
                ];
                match known.iter().find(|(k, _)| *k == c) {
                    Some((_, n)) => format!("{n} (type {c})"),
                    None => format!("type {c}"),
                }
            }
        }
    }

    /// Bytes holding `n` elements, or `None` if `n` is not a whole number of blocks
    /// or the type is unsupported.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let blocks = |bytes_per_block: usize| if n.is_multiple_of(QK) { (n / QK).checked_mul(bytes_per_block) } else { None };
        match self {
            GgmlType::F32 => n.checked_mul(4),
            GgmlType::F16 | GgmlType::BF16 => n.checked_mul(2),
            GgmlType::Q8_0 => blocks(2 + QK),
            GgmlType::Q4_0 => blocks(2 + QK / 2),
            GgmlType::Q4_1 => blocks(4 + QK / 2),
            GgmlType::Unsupported(_) => None,
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes `bytes` (exactly `ty.bytes_for(out.len())` long) into `out`.
/// Returns `false` for an unsupported type or a length mismatch.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
    if ty.bytes_for(out.len()) != Some(bytes.len()) {
        return false;
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            // block: f16 d, i8 q[32]; x = d·q
            for (o, blk) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(2 + QK)) {
                let d = f16_at(blk, 0);
                for (x, q) in o.iter_mut().zip(&blk[2..]) {
                    *x = d * (*q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            // block: f16 d, u8 qs[16]; x[j] = d·(lo(qs[j]) − 8), x[j+16] = d·(hi(qs[j]) − 8)
            for (o, blk) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(2 + QK / 2)) {
                let d = f16_at(blk, 0);
                for (j, q) in blk[2..].iter().enumerate() {
                    o[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                    o[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            // block: f16 d, f16 m, u8 qs[16]; x[j] = d·lo(qs[j]) + m, x[j+16] = d·hi(qs[j]) + m
            for (o, blk) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(4 + QK / 2)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for (j, q) in blk[4..].iter().enumerate() {
                    o[j] = d * (q & 0x0F) as f32 + m;
                    o[j + QK / 2] = d * (q >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Unsupported(_) => return false,
    }
    true
}
