//! NVPTX matmul on tensor cores, for calls of more than one row (prefill):
//! `mma.sync.m16n8k8` with TF32 operands and f32 accumulators, a warp per
//! tile of 16 rows × `8·NT` output features. 16-bit weights widen to TF32
//! exactly; each f32 activation is split into two TF32 parts, `hi` (rounded
//! to a 10-bit mantissa) and `lo = x - hi` (truncated by the MMA), and both are
//! multiplied (two `mma.sync` per step), so a product is off by about 2^-21
//! of itself, near f32 rounding. f32 weights (not exact in TF32) keep the
//! warp GEMV.

use super::half_planes::{HalfPlane, HALF_VEC};
use super::warp_fold::f32_vload;
use super::{fixed_last, KernelSpec, WARP};
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::DType;
use sparsec_runtime::manifest::MMA_ROWS;

/// One k step's operands of a lane: four activations as `[hi, lo]` TF32
/// pairs, and per n-tile the two weights.
type Fragments = (Vec<[V; 2]>, Vec<[V; 2]>);

/// k per `mma.sync`.
const MMA_K: u64 = 8;
/// Output features per `mma.sync`.
const MMA_N: u64 = 8;
/// k steps whose fragments are loaded before their `mma.sync`s (with k a
/// multiple of their 32: in 16-byte vectors).
const K_UNROLL: u64 = 4;
/// n-tiles of 8 features a warp computes. One measured faster than four on
/// an H200 (GPT-2 124M f16, 128-token prefill 6.2 against 8.7 ms): these
/// kernels are short of warps, not of operand reuse.
const NT: u64 = 1;

/// The tile shape of a matmul the tensor-core path takes: `(nt, warps)`,
/// `nt` n-tiles of 8 features per warp (`NT`) and `warps` warps per band of
/// `MMA_ROWS` rows. `None` unless the weight is f16/bf16 and both k and the
/// output width are multiples of 8 (of `8·NT`).
pub(crate) fn mma_tiles(spec: &KernelSpec) -> Option<(u64, u64)> {
    let (k, n) = (fixed_last(spec, spec.operands.first()?).ok()?, fixed_last(spec, &spec.result).ok()?);
    let half = matches!(spec.operands.get(1)?.dtype, DType::F16 | DType::BF16);
    if !spec.warp_matmul() || !half || k % MMA_K != 0 || n % (MMA_N * NT) != 0 {
        return None;
    }
    Some((NT, n / (MMA_N * NT)))
}

/// `out[r, j] = a[r, :] · w[j, :]` for `seq` rows: warp `g` of the launch
/// takes rows `16·(g / warps)..` and features `8·nt·(g % warps)..`. Lane
/// `l` holds fragment rows `l / 4` and `l / 4 + 8`, fragment k columns `l % 4`
/// and `l % 4 + 4` (PTX's m16n8k8 TF32 layout); rows past `seq` read the
/// last row and are not stored. Stores go through `store_result` (the fused
/// epilogue).
#[allow(clippy::too_many_arguments)]
pub(super) fn emit_mma_matmul(b: &mut KernelBuilder, k: u64, n: u64, nt: u64, warps: u64, ins: &[V], out: &str, w: &HalfPlane) {
    let (a_buf, seq) = (&ins[0], b.seq());
    let kc = b.index(k);
    let one = b.index(1);
    let last_row = b.def(format!("arith.subi {seq}, {one} : index"));
    let rows16 = b.index(MMA_ROWS);
    let bands = b.def(format!("arith.ceildivui {seq}, {rows16} : index"));
    let wc = b.index(warps);
    let tiles = b.muli(&bands, &wc);
    let lanes = b.index(WARP);
    let work = b.muli(&tiles, &lanes);
    b.parallel(&work, |b, t| {
        let warp = b.divui(t, &lanes);
        let lane = b.remui(t, &lanes);
        let band = b.divui(&warp, &wc);
        let col_tile = b.remui(&warp, &wc);
        let r0 = b.muli(&band, &rows16);
        let c0 = {
            let w8 = b.index(MMA_N * nt);
            b.muli(&col_tile, &w8)
        };
        let four = b.index(4);
        let g = b.divui(&lane, &four);
        let tq = b.remui(&lane, &four);
        let eight = b.index(8);
        let ra = b.addi(&r0, &g);
        let rb = b.addi(&ra, &eight);
        // Rows past the call's end read the last row (their results are not stored).
        let (ra_c, rb_c) = (b.minui(&ra, &last_row), b.minui(&rb, &last_row));
        let (abase, bbase) = (b.muli(&ra_c, &kc), b.muli(&rb_c, &kc));
        // Weight rows (output features) this lane reads, one per n-tile.
        let wrows: Vec<V> = (0..nt)
            .map(|q| {
                let off = b.index(q * MMA_N);
                let f = b.addi(&c0, &off);
                let j = b.addi(&f, &g);
                b.muli(&j, &kc)
            })
            .collect();
        // k a multiple of 32: lane l % 4 = t takes the 8 consecutive k at
        // 8t.. of each 32 (two 16-byte loads of activations per row, one of
        // 8 weights per n-tile); mma step s reads k = 8t + 2s as fragment
        // column t and 8t + 2s + 1 as column t + 4 (A and B alike, so the
        // sum is the same). Else scalar loads at columns t and t + 4 of each 8.
        let wide = k.is_multiple_of(MMA_K * K_UNROLL);
        let unroll = if wide { K_UNROLL } else { 1 };
        let zero = b.f32(0.0);
        let init: Vec<(V, String)> = (0..nt * 4).map(|_| (zero.clone(), "f32".to_string())).collect();
        let zero_i = b.index(0);
        let t8 = b.muli(&tq, &eight);
        let accs = b.for_fold_typed(&zero_i, &kc, MMA_K * unroll, &init, |b, kb, accs| {
            // Fragments of `unroll` k steps, all loaded before the first mma.
            let frags: Vec<Fragments> = if wide {
                let ka = b.addi(kb, &t8);
                let rows: Vec<V> = [&abase, &bbase]
                    .into_iter()
                    .map(|row| {
                        let i = b.addi(row, &ka);
                        f32_vload(b, a_buf, &i, 8)
                    })
                    .collect();
                let ws: Vec<V> = wrows
                    .iter()
                    .map(|wr| {
                        let i = b.addi(wr, &ka);
                        w.vload(b, &i, HALF_VEC)
                    })
                    .collect();
                let lane_of = |b: &mut KernelBuilder, v: &str, e: u64| {
                    let ei = b.i32(e as i32);
                    b.def(format!("llvm.extractelement {v}[{ei} : i32] : vector<8xf32>"))
                };
                (0..unroll)
                    .map(|st| {
                        let (lo, hi) = (2 * st, 2 * st + 1);
                        let a = [(&rows[0], lo), (&rows[1], lo), (&rows[0], hi), (&rows[1], hi)]
                            .into_iter()
                            .map(|(r, e)| {
                                let x = lane_of(b, r, e);
                                tf32_split(b, &x)
                            })
                            .collect();
                        let bw = ws
                            .iter()
                            .map(|v| {
                                [lo, hi].map(|e| {
                                    let x = lane_of(b, v, e);
                                    b.def(format!("arith.bitcast {x} : f32 to i32"))
                                })
                            })
                            .collect();
                        (a, bw)
                    })
                    .collect()
            } else {
                let ka = b.addi(kb, &tq);
                let kb4 = b.addi(&ka, &four);
                let a: Vec<[V; 2]> = [(&abase, &ka), (&bbase, &ka), (&abase, &kb4), (&bbase, &kb4)]
                    .into_iter()
                    .map(|(row, kk)| {
                        let i = b.addi(row, kk);
                        let x = b.load(a_buf, &i);
                        tf32_split(b, &x)
                    })
                    .collect();
                let bw = wrows
                    .iter()
                    .map(|wr| {
                        [&ka, &kb4].map(|kk| {
                            let i = b.addi(wr, kk);
                            let x = w.load(b, &i);
                            b.def(format!("arith.bitcast {x} : f32 to i32"))
                        })
                    })
                    .collect();
                vec![(a, bw)]
            };
            let mut accs: Vec<V> = accs.to_vec();
            for (a, bw) in &frags {
                for (q, bq) in bw.iter().enumerate() {
                    // The low parts first: the small terms enter the sum first.
                    for part in [1, 0] {
                        let frag: Vec<V> = a.iter().map(|x| x[part].clone()).collect();
                        let d = mma_sync_tf32(b, &frag, bq, &accs[q * 4..q * 4 + 4]);
                        accs.splice(q * 4..q * 4 + 4, d);
                    }
                }
            }
            accs
        });
        store_tiles(b, [&ra, &rb], &c0, &tq, &accs, n, out);
    });
}

/// Stores a lane's accumulators of `accs.len() / 4` n-tiles of 8 features
/// from feature `c0`: accumulator i of n-tile q is row `rows[i / 2]` (the
/// lane's g and g + 8), feature `c0 + 8q + 2t + i % 2` (t = lane % 4), stored
/// through `store_result` (the fused epilogue) where the row is below `seq`.
pub(super) fn store_tiles(b: &mut KernelBuilder, rows: [&V; 2], c0: &str, t: &str, accs: &[V], n: u64, out: &str) {
    let (seq, nc) = (b.seq(), b.index(n));
    let two = b.index(2);
    let col = b.muli(t, &two);
    for (j, v) in accs.iter().enumerate() {
        let (q, i) = (j as u64 / 4, j as u64 % 4);
        let row = rows[(i / 2) as usize];
        let inb = b.def(format!("arith.cmpi ult, {row}, {seq} : index"));
        let off = b.index(q * MMA_N + i % 2);
        let f0 = b.addi(c0, &off);
        let f = b.addi(&f0, &col);
        let rn = b.muli(row, &nc);
        let at = b.addi(&rn, &f);
        b.if_then(&inb, |b| b.store_result(v, out, &at));
    }
}

/// One `mma.sync.m16n8k8` on TF32 operands (their bits as i32): `a` the four
/// A registers of the lane, `bq` its two B registers, `c` its four f32
/// accumulators; returns the four new accumulators.
pub(super) fn mma_sync_tf32(b: &mut KernelBuilder, a: &[V], bq: &[V; 2], c: &[V]) -> Vec<V> {
    mma_sync(b, ("tf32", "i32", 8), a, bq, c)
}

/// One `mma.sync` of shape m16n8k`k`, row-major A and column-major B of PTX
/// type `ptx` (NVVM operand type `ty`) and f32 accumulators: `a` the four A
/// registers of the lane, `bq` its two B registers, `c` its four
/// accumulators; returns the four new accumulators.
pub(super) fn mma_sync(b: &mut KernelBuilder, (ptx, ty, k): (&str, &str, u32), a: &[V], bq: &[V; 2], c: &[V]) -> Vec<V> {
    let d = b.def(format!(
        "nvvm.mma.sync A[{}, {}, {}, {}] B[{}, {}] C[{}, {}, {}, {}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<{ptx}>, multiplicandBPtxType = #nvvm.mma_type<{ptx}>, shape = #nvvm.shape<m = 16, n = 8, k = {k}>}} : ({ty}, {ty}, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
        a[0], a[1], a[2], a[3], bq[0], bq[1], c[0], c[1], c[2], c[3]
    ));
    (0..4).map(|i| b.def(format!("llvm.extractvalue {d}[{i}] : !llvm.struct<(f32, f32, f32, f32)>"))).collect()
}

/// `x` as two TF32 operands (their bits), `[hi, lo]`: `hi` is `x` with its
/// mantissa rounded to 10 bits (to nearest, ties away from zero), `lo` the
/// rest, exact in f32 and at most 2^-11 of `x`. `lo` is not rounded: an MMA
/// reads a TF32 operand's top 19 bits, so the truncation it makes costs at
/// most 2^-10 of `lo`, 2^-21 of `x` (rounding it first cost 2^-22, for two
/// more instructions per value).
pub(super) fn tf32_split(b: &mut KernelBuilder, x: &str) -> [V; 2] {
    let hi = tf32_round(b, x);
    let hi_f = b.def(format!("arith.bitcast {hi} : i32 to f32"));
    let rest = b.sub(x, &hi_f);
    let lo = b.def(format!("arith.bitcast {rest} : f32 to i32"));
    [hi, lo]
}

/// `x`'s bits as TF32: the 10-bit mantissa rounded to nearest (ties away from
/// zero), the low 13 bits cleared.
fn tf32_round(b: &mut KernelBuilder, x: &str) -> V {
    let bits = b.def(format!("arith.bitcast {x} : f32 to i32"));
    let half = b.i32(0x1000);
    let mask = b.i32(-0x2000);
    let r = b.def(format!("arith.addi {bits}, {half} : i32"));
    b.def(format!("arith.andi {r}, {mask} : i32"))
}
