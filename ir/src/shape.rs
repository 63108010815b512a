//! Type rules: the result type of each op from its operands' types.

use crate::op::Op;
use crate::types::{Dim, TensorType};

/// Result type of a compute op, or a sentence saying which operand is wrong and
/// what was expected. Leaves (input, weight, const) declare their own type.
pub fn infer_type(op: &Op, operands: &[&TensorType]) -> Result<TensorType, String> {
    // Embedding mixes a float table with integer ids; every other op is uniform.
    if let (Op::Embedding, [table, ids]) = (op, operands) {
        if table.rank() != 2 {
            return Err(format!("operand 0 (table) has type {table}, expected a rank-2 [rows, width] table"));
        }
        if ids.dtype != crate::types::DType::I32 || ids.rank() != 1 {
            return Err(format!("operand 1 (ids) has type {ids}, expected i32[n]"));
        }
        // A quantized or 16-bit table yields f32 rows.
        let dtype = if table.dtype.is_packed_weight() { crate::types::DType::F32 } else { table.dtype };
        return Ok(TensorType::new(dtype, vec![ids.dims[0], table.dims[1]]));
    }
    // Quantized weights enter a matmul only as its transposed `[N, K]` operand,
    // K a whole number of blocks; the product is f32.
    if let (Op::MatMul { transpose_b }, [a, b]) = (op, operands) {
        if b.dtype.is_quantized() {
            let k_ok = matches!(b.dims.get(1), Some(Dim::Fixed(k)) if (*k as usize).is_multiple_of(crate::quant::QK));
            if !*transpose_b || b.rank() != 2 || !k_ok {
                return Err(format!(
                    "operand 1 has type {b}; a quantized matrix must be a transposed operand [N, K] with K a multiple of {}",
                    crate::quant::QK
                ));
            }
            if a.dtype != crate::types::DType::F32 {
                return Err(format!("operand 0 has type {a}, expected f32 activations for a quantized weight"));
            }
            let as_f32 = TensorType::new(crate::types::DType::F32, b.dims.clone());
            return infer_type(op, &[a, &as_f32]);
        }
        // A 16-bit weight (f16, bf16) multiplies f32 activations as a transposed
        // `[N, K]` operand; the product is f32 (accumulated in f32).
        if b.dtype.is_half() && a.dtype == crate::types::DType::F32 {
            if !*transpose_b || b.rank() != 2 {
                return Err(format!("operand 1 has type {b}; a 16-bit weight under f32 activations must be a transposed operand [N, K]"));
            }
            let as_f32 = TensorType::new(crate::types::DType::F32, b.dims.clone());
            return infer_type(op, &[a, &as_f32]);
        }
    }
    if let Some((i, t)) = operands.iter().enumerate().find(|(_, t)| t.dtype.is_quantized()) {
        return Err(format!("operand {i} has type {t}; quantized tensors are only matmul weights and embedding tables"));
    }
    if let Some(first) = operands.first() {
        if let Some((i, t)) = operands.iter().enumerate().find(|(_, t)| t.dtype != first.dtype) {
            return Err(format!("operand {i} has element type {}, expected {} like operand 0", t.dtype.name(), first.dtype.name()));
        }
    }
    match op {
        Op::Input | Op::Weight { .. } | Op::Constant { .. } => Err("leaf ops declare their type; there is nothing to infer".into()),
        Op::Embedding => Err("embedding takes a table and ids".into()),
        Op::Positions => Ok(TensorType::new(crate::types::DType::I32, vec![Dim::Seq])),
        Op::Rope { heads, .. } => {
            let x = operands[0];
            let ok =
                x.rank() == 2 && x.dims[0] == Dim::Seq && matches!(x.dims[1], Dim::Fixed(w) if *heads > 0 && w % (2 * *heads as u64) == 0);
            if !ok {
                return Err(format!(
                    "operand 0 has type {x}, expected {}[seq, heads*head_dim] with an even head_dim (heads = {heads})",
                    x.dtype.name()
                ));
            }
            Ok(x.clone())
        }
        Op::MatMul { transpose_b } => {
            let (a, b) = (operands[0], operands[1]);
            if a.rank() < 1 {
                return Err(format!("operand 0 has type {a}, expected rank >= 1"));
            }
            if b.rank() != 2 {
                return Err(format!("operand 1 has type {b}, expected a rank-2 matrix"));
            }
            let k = a.dims[a.rank() - 1];
            let (bk, n) = if *transpose_b { (b.dims[1], b.dims[0]) } else { (b.dims[0], b.dims[1]) };
            if bk != k {
                let want = if *transpose_b { format!("[N, {k}]") } else { format!("[{k}, N]") };
                return Err(format!("operand 1 has type {b}, expected {}{want} to match operand 0's {a}", b.dtype.name()));
            }
            let mut dims = a.dims[..a.rank() - 1].to_vec();
            dims.push(n);
            Ok(TensorType::new(a.dtype, dims))
        }
        Op::Add | Op::Mul => {
            let (a, b) = (operands[0], operands[1]);
            let (long, short) = if a.rank() >= b.rank() { (a, b) } else { (b, a) };
            if long.dims[long.rank() - short.rank()..] != short.dims[..] {
                return Err(format!("operands have types {a} and {b}; expected equal shapes or one a trailing suffix of the other"));
            }
            Ok(long.clone())
        }
        Op::Gelu { .. } | Op::Silu | Op::Softmax => {
            let a = operands[0];
            if a.rank() < 1 {
                return Err(format!("operand 0 has type {a}, expected rank >= 1"));
            }
            Ok(a.clone())
        }
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
            let x = operands[0];
            let Some(d) = x.last_dim() else {
                return Err(format!("operand 0 has type {x}, expected rank >= 1"));
            };
            for (i, p) in operands.iter().enumerate().skip(1) {
                if p.dims != [d] {
                    return Err(format!("operand {i} has type {p}, expected {}[{d}] (the normalized axis)", p.dtype.name()));
                }
            }
            Ok(x.clone())
        }
        Op::Attention { heads, kv_heads } => {
            let (q, k, v) = (operands[0], operands[1], operands[2]);
            if *heads == 0 || *kv_heads == 0 || heads % kv_heads != 0 {
                return Err(format!("heads = {heads} must be a positive multiple of kv_heads = {kv_heads}"));
            }
            let Some(Dim::Fixed(qw)) = q.dims.get(1).copied().filter(|_| q.rank() == 2 && q.dims[0] == Dim::Seq) else {
                return Err(format!("operand 0 (q) has type {q}, expected {}[seq, heads*head_dim]", q.dtype.name()));
            };
            if qw % *heads as u64 != 0 {
                return Err(format!("operand 0 (q) width {qw} is not divisible by heads = {heads}"));
            }
            let kvw = qw / *heads as u64 * *kv_heads as u64;
            let want = TensorType::new(q.dtype, vec![Dim::Seq, Dim::Fixed(kvw)]);
            // A basis [kv_heads·r, d] as operand 3 (`#kv(pre_rope)`, which the
            // verifier checks) makes k its coefficients, kv_heads·r wide.
            let d = qw / *heads as u64;
            let coefficients = match operands.get(3).map(|b| b.dims.as_slice()) {
                Some(&[Dim::Fixed(kw), Dim::Fixed(bd)]) if bd == d && k.dims == [Dim::Seq, Dim::Fixed(kw)] => k.dtype == q.dtype,
                _ => false,
            };
            for (i, t) in [(1, k), (2, v)].into_iter().filter(|&(i, _)| !(i == 1 && coefficients)) {
                if *t != want {
                    return Err(format!("operand {i} has type {t}, expected {want} (kv_heads*head_dim)"));
                }
            }
            Ok(q.clone())
        }
    }
}
