//! Elementwise kernels: activations (GELU, SiLU) and `add`/`mul` with trailing
//! broadcast, with SwiGLU's SiLU fused into `mul`'s first operand (`Prologue`).

use super::{KernelCtx, Prologue};
use crate::error::CompileError;
use crate::mlir::builder::KernelBuilder;
use crate::mlir::math;
use sparsec_ir::{Op, SymSize};

/// `out[i] = act(in0[i])` (`gelu`, `silu`).
pub(super) fn emit_activation(b: &mut KernelBuilder, cx: &KernelCtx<'_>, act: math::Activation) -> Result<(), CompileError> {
    let KernelCtx { work, ins, out, .. } = *cx;
    b.parallel(work, |b, i| {
        let x = b.load(&ins[0], i);
        let y = math::activation(b, act, &x);
        b.store(&y, out, i);
    });
    Ok(())
}

/// `out[i] = in0[i] (+|·) in1[i]`, a smaller operand read modulo its size.
pub(super) fn emit_binary(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { spec, work, ins, out, .. } = *cx;
    let n_out = spec.result.numel();
    let sizes: Vec<SymSize> = spec.operands.iter().map(|t| t.numel()).collect();
    let fop = if matches!(spec.op, Op::Add) { "addf" } else { "mulf" };
    let mut moduli = Vec::new();
    for s in &sizes {
        // A broadcast operand is read modulo its own size.
        moduli.push(if *s == n_out { None } else { Some(b.sym(*s)) });
    }
    b.parallel(work, |b, i| {
        let mut vals = Vec::new();
        for (k, m) in moduli.iter().enumerate() {
            let idx = match m {
                None => i.to_string(),
                Some(m) => b.remui(i, m),
            };
            vals.push(b.load(&ins[k], &idx));
        }
        if spec.prologue == Some(Prologue::Silu) {
            vals[0] = math::activation(b, math::Activation::Silu, &vals[0]);
        }
        let y = b.fbin(fop, &vals[0], &vals[1]);
        b.store(&y, out, i);
    });
    Ok(())
}
