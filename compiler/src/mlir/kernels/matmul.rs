//! Matmul: picks the kernel of one matmul (sparse weights: `sparse_kernels` or,
//! baked, `sparse_unrolled`; a transposed weight on the CPU: the tiled
//! micro-kernels of `tiled_matmul`, or `quant_dot`'s int8 dot products), and
//! the row kernels for the rest (untransposed weights, widths the tiles do not
//! take, NVPTX).

use super::amx_int8_matmul::emit_amx_int8_matmul;
use super::amx_matmul::emit_amx_matmul;
use super::half_planes::{HalfPlane, HALF_VEC};
use super::mma_matmul::emit_mma_matmul;
use super::mma_quant::QuantTile;
use super::mma_tiled::{emit_tiled_mma, TileWeight};
use super::quant_planes::{nibbles, QuantPlanes};
use super::tiled_matmul::emit_tiled_matmul;
use super::warp_fold::{f32_lanes_sum, f32_vload, warp_fold, warp_per_output};
use super::{fixed_last, KernelCtx, VW};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use crate::mlir::quant_dot::emit_int8_matmul;
use crate::mlir::sparse_kernels::emit_sparse_matmul;
use crate::mlir::sparse_unrolled::emit_unrolled_matmul;

/// `out = a × w` (`w` transposed when `transpose_b`).
pub(super) fn emit_matmul(b: &mut KernelBuilder, cx: &KernelCtx<'_>, transpose_b: bool) -> Result<(), CompileError> {
    let KernelCtx { spec, device, ins, out, .. } = *cx;
    if let Some(t) = spec.sparse_matmul() {
        match spec.sparse.as_ref().filter(|c| c.bakes()) {
            None => emit_sparse_matmul(b, &t, ins, out),
            Some(c) => {
                let data = c.data.as_ref().ok_or_else(|| spec.unsupported("the baked weight's data was not attached"))?;
                let full = c.level == sparsec_ir::Specialize::Full;
                emit_unrolled_matmul(b, &t, full, data, ins, out, &spec.name)?;
            }
        }
        return Ok(());
    }
    if device == Device::Cpu {
        if let Some(t) = spec.tiled_matmul() {
            if t.amx && t.quant.is_some() {
                emit_amx_int8_matmul(b, &t, ins, out);
            } else if t.amx {
                emit_amx_matmul(b, &t, ins, out);
            } else if spec.int8_activations && t.quant.is_some() && t.k % sparsec_ir::quant::QK as u64 == 0 {
                emit_int8_matmul(b, &t, spec.cpu_isa.vnni, ins, out);
            } else {
                emit_tiled_matmul(b, &t, ins, out);
            }
            return Ok(());
        }
    }
    emit_row_matmul(b, cx, transpose_b)
}

/// One unit per output row (CPU) or element (NVPTX): vector paths over output
/// columns (untransposed) or along k (transposed), a scalar dot otherwise.
fn emit_row_matmul(b: &mut KernelBuilder, cx: &KernelCtx<'_>, transpose_b: bool) -> Result<(), CompileError> {
    let KernelCtx { spec, device, work, ins, out } = *cx;
    let k = fixed_last(spec, &spec.operands[0])?;
    let wq = spec.operands[1].dtype;
    let planes = wq.is_quantized().then(|| QuantPlanes::new(b, wq, &ins[1], spec.operands[1].numel().coef));
    let half = HalfPlane::new(b, wq, &ins[1], spec.operands[1].numel().coef);
    let n = fixed_last(spec, &spec.result)?;
    let (kc, nc) = (b.index(k), b.index(n));
    if device == Device::Nvptx && spec.warp_matmul() {
        let w = match (&planes, &half) {
            (Some(q), _) => WarpWeight::Quant(q),
            (None, Some(h)) => WarpWeight::Half(h),
            (None, None) => WarpWeight::F32,
        };
        // A row's bytes at the buffer's start: its quants (the scales, a
        // sixteenth as many, are left to the loads), its 16- or 32-bit values.
        let row_bytes = match w {
            WarpWeight::Quant(_) => k / sparsec_ir::quant::QK as u64 * sparsec_ir::quant::quant_bytes(wq) as u64,
            WarpWeight::Half(_) => 2 * k,
            WarpWeight::F32 => 4 * k,
        };
        super::warp_fold::prefetch_warp_rows(b, &ins[1], n, row_bytes);
        let tile_w = match (&planes, &half) {
            (Some(q), _) => TileWeight::Quant(QuantTile { dt: wq, buf: &ins[1], planes: q }),
            (None, Some(h)) => TileWeight::Half(h),
            (None, None) => TileWeight::F32(&ins[1]),
        };
        match (super::mma_tiled::tiled(spec), super::mma_matmul::mma_tiles(spec), &half) {
            // Calls of more than one row on tensor cores (shared-memory tiles
            // where the shape allows, else a tile per warp); one row: the warp GEMV.
            (Some((tile, _)), _, _) => {
                let (seq, one) = (b.seq(), b.index(1));
                let rows = b.def(format!("arith.cmpi ugt, {seq}, {one} : index"));
                b.if_else(&rows, |b| emit_tiled_mma(b, tile, k, n, ins, out, &tile_w), |b| emit_warp_dot(b, work, k, n, ins, out, w));
            }
            (None, Some((nt, warps)), Some(h)) => {
                let (seq, one) = (b.seq(), b.index(1));
                let rows = b.def(format!("arith.cmpi ugt, {seq}, {one} : index"));
                b.if_else(&rows, |b| emit_mma_matmul(b, k, n, nt, warps, ins, out, h), |b| emit_warp_dot(b, work, k, n, ins, out, w));
            }
            _ => emit_warp_dot(b, work, k, n, ins, out, w),
        }
        return Ok(());
    }
    let dense_f32 = planes.is_none() && half.is_none();
    let zero_i = b.index(0);
    let zero = b.f32(0.0);
    let tb = transpose_b;
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    let (a_vec, w_vec) = (ins[0].clone(), ins[1].clone());
    // The reduction over k for output element (r, j).
    let (kc2, nc2, zero_i2) = (kc.clone(), nc.clone(), zero_i.clone());
    let dot = move |b: &mut KernelBuilder, r: &str, j: &str| -> V {
        let (kc, nc, zero_i) = (&kc2, &nc2, &zero_i2);
        let arow = b.muli(r, kc);
        let brow = if tb { Some(b.muli(j, kc)) } else { None };
        let acc = b.for_fold(zero_i, kc, std::slice::from_ref(&zero), |b, kk, acc| {
            let ai = b.addi(&arow, kk);
            let a = b.load(&a_buf, &ai);
            let bi = match &brow {
                Some(brow) => b.addi(brow, kk),
                None => {
                    let t = b.muli(kk, nc);
                    b.addi(&t, j)
                }
            };
            let w = match (&planes, &half) {
                (Some(q), _) => q.load(b, &w_buf, &bi),
                (None, Some(h)) => h.load(b, &bi),
                (None, None) => b.load(&w_buf, &bi),
            };
            vec![b.fma(&a, &w, &acc[0])]
        });
        acc[0].clone()
    };
    match device {
        Device::Cpu if !tb && n % VW as u64 == 0 && dense_f32 => {
            // Register-blocked over output columns: `u` vectors of VW columns
            // accumulate across k; each step reads a contiguous slice of a B row.
            let nvec = n / VW as u64;
            let u = [4u64, 2, 1].into_iter().find(|u| nvec.is_multiple_of(*u)).unwrap_or(1);
            let rows = b.divui(work, &nc);
            b.parallel(&rows, |b, r| {
                let arow = b.muli(r, &kc);
                let orow = b.muli(r, &nc);
                b.for_step(&zero_i, &nc, VW as u64 * u, |b, jb| {
                    let z = b.vzero(VW);
                    let init: Vec<(V, String)> = (0..u).map(|_| (z.clone(), KernelBuilder::vty(VW))).collect();
                    let accs = b.for_fold_typed(&zero_i, &kc, 1, &init, |b, kk, accs| {
                        let ai = b.addi(&arow, kk);
                        let a = b.load(&a_vec, &ai);
                        let av = b.vbroadcast(&a, VW);
                        let brow = b.muli(kk, &nc);
                        let base = b.addi(&brow, jb);
                        (0..u as usize)
                            .map(|q| {
                                let off = b.index(q as u64 * VW as u64);
                                let idx = b.addi(&base, &off);
                                let w = b.vload(&w_vec, &idx, VW);
                                b.vfma(&av, &w, &accs[q], VW)
                            })
                            .collect()
                    });
                    let obase = b.addi(&orow, jb);
                    for (q, acc) in accs.iter().enumerate() {
                        let off = b.index(q as u64 * VW as u64);
                        let o = b.addi(&obase, &off);
                        b.vstore(acc, out, &o, VW);
                    }
                });
            });
        }
        Device::Cpu if tb && k % VW as u64 == 0 && dense_f32 => {
            // Both operands are contiguous along k: VW-lane partial sums, then a reduction.
            let rows = b.divui(work, &nc);
            b.parallel(&rows, |b, r| {
                let arow = b.muli(r, &kc);
                let orow = b.muli(r, &nc);
                b.for_each(&zero_i, &nc, |b, j| {
                    let brow = b.muli(j, &kc);
                    let z = b.vzero(VW);
                    let acc = b.for_fold_typed(&zero_i, &kc, VW as u64, &[(z, KernelBuilder::vty(VW))], |b, kk, acc| {
                        let ai = b.addi(&arow, kk);
                        let av = b.vload(&a_vec, &ai, VW);
                        let bi = b.addi(&brow, kk);
                        let bv = b.vload(&w_vec, &bi, VW);
                        vec![b.vfma(&av, &bv, &acc[0], VW)]
                    });
                    let y = b.vsum(&acc[0], VW);
                    let o = b.addi(&orow, j);
                    b.store_result(&y, out, &o);
                });
            });
        }
        Device::Cpu => {
            // Scalar fallback for widths the vector paths do not divide.
            let rows = b.divui(work, &nc);
            b.parallel(&rows, |b, r| {
                b.for_each(&zero_i, &nc, |b, j| {
                    let y = dot(b, r, j);
                    let rn = b.muli(r, &nc);
                    let o = b.addi(&rn, j);
                    b.store_result(&y, out, &o);
                });
            });
        }
        Device::Nvptx => {
            b.parallel(work, |b, e| {
                let r = b.divui(e, &nc);
                let j = b.remui(e, &nc);
                let y = dot(b, &r, &j);
                b.store_result(&y, out, e);
            });
        }
    }
    Ok(())
}

/// Lanes per output element of the NVPTX dense matmul: one warp.
pub(in crate::mlir) const WARP: u64 = 32;

/// The weight operand of the NVPTX warp matmul, as stored.
#[derive(Clone, Copy)]
enum WarpWeight<'a> {
    F32,
    Half(&'a HalfPlane),
    Quant(&'a QuantPlanes),
}

/// NVPTX `out[r, j] = a[r, :] · w[j, :]`: a warp per output element. Dense
/// f32 (`k` a multiple of 4): lane l reads the 16-byte vectors at 4l, 4l + 128,
/// ... of both rows (a warp's loads are 512 contiguous bytes) and folds them
/// with vector FMAs. f16/bf16 (`k` a multiple of 8): lane l reads 16 bytes of
/// the weight row (8 values) at 8l, 8l + 256, ... and the 32 bytes of
/// activations they meet, widens the weights in registers and accumulates in
/// f32. Block-quantized weights (`planes`; `k` whole blocks of 32): lane l
/// reads 16 bytes of quants a step (`quant_partial`: Q8_0 half a block, Q4 a
/// block), the activations they meet and the block's scale. The steps are unrolled (`warp_fold`): a lane's
/// loads of up to `UNROLL` steps are in flight together. The warps and their
/// sums: `warp_per_output`.
fn emit_warp_dot(b: &mut KernelBuilder, work: &str, k: u64, n: u64, ins: &[V], out: &str, weight: WarpWeight<'_>) {
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    warp_per_output(b, work, k, n, out, |b, lane, j, arow| {
        let kc = b.index(k);
        let wrow = b.muli(j, &kc);
        match weight {
            WarpWeight::Quant(q) => quant_partial(b, &a_buf, arow, lane, k, q, &w_buf, &wrow),
            WarpWeight::F32 => vector_partial(b, &a_buf, arow, lane, k, 4, |b, kk| {
                let i = b.addi(&wrow, kk);
                f32_vload(b, &w_buf, &i, 4)
            }),
            WarpWeight::Half(h) => vector_partial(b, &a_buf, arow, lane, k, HALF_VEC, |b, kk| {
                let i = b.addi(&wrow, kk);
                h.vload(b, &i, HALF_VEC)
            }),
        }
    });
}

/// One lane's partial dot product over a block-quantized weight row (`wrow`,
/// its first element): lane l takes the 16-byte runs of quants at l, l + 32,
/// ... (Q8_0: half a block, 16 values; Q4_0/Q4_1: a whole block, its 32
/// values as low and high nibbles), the activations they meet as 16-byte
/// loads, and the block's scale: `d·Σ a·q`, plus `m·Σ a` with an offset.
#[allow(clippy::too_many_arguments)]
fn quant_partial(b: &mut KernelBuilder, a_buf: &str, arow: &str, lane: &str, k: u64, q: &QuantPlanes, w_buf: &str, wrow: &str) -> V {
    let dt = q.dtype();
    let qb = sparsec_ir::quant::quant_bytes(dt) as u64;
    // Values a lane takes per step: the values of 16 bytes of quants.
    let width: u32 = if dt == sparsec_ir::DType::Q8_0 { 16 } else { 32 };
    let wc = b.index(width as u64);
    let start = b.muli(lane, &wc);
    let zero = b.f32(0.0);
    warp_fold(
        b,
        &start,
        k,
        width as u64,
        (zero, "f32".into()),
        |b, kk| {
            let ai = b.addi(arow, kk);
            let a: Vec<V> = (0..width as u64 / 16)
                .map(|h| {
                    let off = b.index(16 * h);
                    let i = b.addi(&ai, &off);
                    f32_vload(b, a_buf, &i, 16)
                })
                .collect();
            let flat = b.addi(wrow, kk);
            let qk = b.index(sparsec_ir::quant::QK as u64);
            let blk = b.divui(&flat, &qk);
            let within = b.remui(&flat, &qk);
            let (d, off) = q.scale_offset(b, &blk);
            // Q8_0: byte `within` of the block; Q4: the block's 16 bytes.
            let qbc = b.index(qb);
            let at = b.muli(&blk, &qbc);
            let at = if dt == sparsec_ir::DType::Q8_0 { b.addi(&at, &within) } else { at };
            let vf = KernelBuilder::vty(16);
            let qs: Vec<V> = if dt == sparsec_ir::DType::Q8_0 {
                let bytes = b.vload_bytes(w_buf, &at, 16);
                vec![b.def(format!("arith.sitofp {bytes} : vector<16xi8> to {vf}"))]
            } else {
                let (lo, hi) = nibbles(b, w_buf, &at);
                [lo, hi].iter().map(|n| b.def(format!("arith.uitofp {n} : vector<16xi8> to {vf}"))).collect()
            };
            (a, qs, d, off)
        },
        |b, (a, qs, d, off), acc| {
            let vf = KernelBuilder::vty(16);
            let mut dot = b.def(format!("arith.mulf {}, {} : {vf}", a[0], qs[0]));
            for (av, qv) in a.iter().zip(qs).skip(1) {
                dot = b.def(format!("math.fma {av}, {qv}, {dot} : {vf}"));
            }
            let dot = f32_lanes_sum(b, &dot, 16);
            let acc = b.fma(d, &dot, acc);
            match off {
                Some(o) => {
                    let sum = a.iter().skip(1).fold(a[0].clone(), |s, v| b.def(format!("arith.addf {s}, {v} : {vf}")));
                    let sum = f32_lanes_sum(b, &sum, 16);
                    b.fma(o, &sum, &acc)
                }
                None => acc,
            }
        },
    )
}

/// One lane's partial dot product over vectors of `width` elements: lane l
/// takes the vectors at `width`·l, `width`·(l + 32), ... of the f32 activation
/// row and of the weight row (`load_w(kk)`, widened to f32), unrolled.
fn vector_partial(
    b: &mut KernelBuilder,
    a_buf: &str,
    arow: &str,
    lane: &str,
    k: u64,
    width: u32,
    load_w: impl Fn(&mut KernelBuilder, &str) -> V,
) -> V {
    let w = b.index(width as u64);
    let start = b.muli(lane, &w);
    let vty = KernelBuilder::vty(width);
    let z = b.vzero(width);
    let acc = warp_fold(
        b,
        &start,
        k,
        width as u64,
        (z, vty.clone()),
        |b, kk| {
            let ai = b.addi(arow, kk);
            (f32_vload(b, a_buf, &ai, width), load_w(b, kk))
        },
        |b, (av, wv), acc| b.def(format!("math.fma {av}, {wv}, {acc} : {vty}")),
    );
    f32_lanes_sum(b, &acc, width)
}
