//! f16/bf16 tensor-core operands on NVPTX: f32 values split into a `hi` and
//! a `lo` part of the 16-bit type (packed two to a 32-bit word, as the MMA
//! fragments hold them), 16-bit values read in pairs, and one
//! `mma.sync.m16n8k16` with f32 accumulators.

use super::mma_matmul::mma_sync;
use crate::mlir::builder::{KernelBuilder, V};

/// `x` (a `vector<width x f32>`, width even) as two `vector<width/2 x i32>`
/// of packed `kind` (f16 or bf16) pairs, `[hi, lo]`: `hi` is `x` rounded to
/// `kind`, `lo` the rest (exact in f32) rounded to `kind`. `hi + lo` holds 22
/// bits of `x` for f16 (16 for bf16); an f16 `lo` below 2^-14 loses bits as a
/// subnormal, at most 2^-25 absolute. f16 holds magnitudes up to 65504.
pub(super) fn half_split(b: &mut KernelBuilder, x: &str, width: u32, kind: &str) -> [V; 2] {
    half_split_scaled(b, x, width, kind, None)
}

/// `half_split` with the rest multiplied by `lo_scale` (a power of two)
/// before it is rounded: with 2^11 an f16 `lo` stays clear of the subnormals
/// for values down to 2^-3 (a product with it is then 2^11 too large, so it
/// goes to sums of its own).
pub(super) fn half_split_scaled(b: &mut KernelBuilder, x: &str, width: u32, kind: &str, lo_scale: Option<f64>) -> [V; 2] {
    let (fv, hv) = (KernelBuilder::vty(width), format!("vector<{width}x{kind}>"));
    let hi = b.def(format!("arith.truncf {x} : {fv} to {hv}"));
    let back = b.def(format!("arith.extf {hi} : {hv} to {fv}"));
    let mut rest = b.def(format!("arith.subf {x}, {back} : {fv}"));
    if let Some(s) = lo_scale {
        let sv = b.f32(s as f32);
        let sv = b.vbroadcast(&sv, width);
        rest = b.def(format!("arith.mulf {rest}, {sv} : {fv}"));
    }
    let lo = b.def(format!("arith.truncf {rest} : {fv} to {hv}"));
    [hi, lo].map(|h| b.def(format!("llvm.bitcast {h} : {hv} to vector<{}xi32>", width / 2)))
}

/// `x` (a `vector<width x f32>`, width even) rounded to `kind` (f16 or bf16),
/// as a `vector<width/2 x i32>` of packed pairs.
pub(super) fn half_round(b: &mut KernelBuilder, x: &str, width: u32, kind: &str) -> V {
    let (fv, hv) = (KernelBuilder::vty(width), format!("vector<{width}x{kind}>"));
    let h = b.def(format!("arith.truncf {x} : {fv} to {hv}"));
    b.def(format!("llvm.bitcast {h} : {hv} to vector<{}xi32>", width / 2))
}

/// The scalars `x` and `y` as one pair, split as `half_split` does: `[hi,
/// lo]`, each an i32 word (`x` in its low half).
pub(super) fn half_split_pair(b: &mut KernelBuilder, x: &str, y: &str, kind: &str) -> [V; 2] {
    let v2 = KernelBuilder::vty(2);
    let mut v = b.def(format!("llvm.mlir.undef : {v2}"));
    for (l, s) in [x, y].iter().enumerate() {
        let li = b.i32(l as i32);
        v = b.def(format!("llvm.insertelement {s}, {v}[{li} : i32] : {v2}"));
    }
    half_split(b, &v, 2, kind).map(|w| {
        let zero = b.i32(0);
        b.def(format!("llvm.extractelement {w}[{zero} : i32] : vector<1xi32>"))
    })
}

/// Elements `lane` of the `vector<n x f16>` `x` and of `y` as one i32 word
/// (`x`'s in its low half): a B fragment register of two keys' values.
pub(super) fn pair_of(b: &mut KernelBuilder, x: &str, y: &str, n: u64, lane: u64) -> V {
    let p = b.def(format!("llvm.shufflevector {x}, {y} [{lane}, {}] : vector<{n}xf16>", n + lane));
    b.def(format!("llvm.bitcast {p} : vector<2xf16> to i32"))
}

/// The `n` i32 lanes of the `vector<n x i32>` `v`.
pub(super) fn words(b: &mut KernelBuilder, v: &str, n: u32) -> Vec<V> {
    (0..n as i32)
        .map(|e| {
            let ei = b.i32(e);
            b.def(format!("llvm.extractelement {v}[{ei} : i32] : vector<{n}xi32>"))
        })
        .collect()
}

/// One `mma.sync.m16n8k16` on `kind` (f16 or bf16) operands, f32
/// accumulators: `a` the four A registers of the lane, `bq` its two B
/// registers (each a word of two values, the lower k in its low half), `c`
/// its four accumulators; returns the four new accumulators.
pub(super) fn mma_sync_half(b: &mut KernelBuilder, kind: &str, a: &[V], bq: &[V; 2], c: &[V]) -> Vec<V> {
    // NVVM types f16 fragments as `vector<2xf16>`, bf16 ones as `i32`.
    if kind != "f16" {
        return mma_sync(b, (kind, "i32", 16), a, bq, c);
    }
    let mut cast = |v: &V| b.def(format!("llvm.bitcast {v} : i32 to vector<2xf16>"));
    let a: Vec<V> = a.iter().map(&mut cast).collect();
    let bq = [cast(&bq[0]), cast(&bq[1])];
    mma_sync(b, (kind, "vector<2xf16>", 16), &a, &bq, c)
}
