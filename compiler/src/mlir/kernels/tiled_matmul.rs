//! The CPU matmul with a transposed `[N, K]` weight (f32, f16/bf16 widened in
//! registers, or block-quantized),
//! tiled into (row block, column block) units with register-blocked
//! micro-kernels: GEMM for prefill, GEMV for decode. Its tiling helpers serve
//! `quant_dot` and `sparse_kernels` too.

use super::half_planes::HalfPlane;
use super::quant_planes::QuantPlanes;
use super::VQ;
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::{DType, SymSize};

/// Rows of `seq` per CPU matmul unit: the GEMM micro-kernel's rows.
pub(super) const MM_ROWS: u64 = 4;
/// Weight rows (output columns) per CPU matmul unit.
pub(in crate::mlir) const MM_COLS: u64 = 32;
/// f32 weights above this size (an LM head) are tiled column-major: prefill
/// would otherwise stream them from memory once per block of 4 rows.
const COL_MAJOR_WEIGHT_BYTES: u64 = 16 << 20;

/// How a CPU matmul with a transposed `[N, K]` weight is tiled: units are
/// (row block, column block) pairs; a full row block runs a register-blocked
/// micro-kernel of `rb` rows, ragged rows one at a time. Prefill is the GEMM
/// case (`rb` rows share each weight load), decode the GEMV case (one row).
#[derive(Clone, Copy, Debug)]
pub(in crate::mlir) struct TiledMatmul {
    pub k: u64,
    pub n: u64,
    pub rows: SymSize,
    /// Rows per unit: `MM_ROWS` when the rows are exactly `seq`, else 1.
    pub rb: u64,
    pub col_tiles: u64,
    /// The weight's block-quantized type, if any.
    pub quant: Option<DType>,
    /// The weight's 16-bit float type (f16, bf16), if any: read `lanes`
    /// values at a time and widened in registers.
    pub half: Option<DType>,
    /// f32 lanes per vector of the f32 and 16-bit micro-kernels: 16 on an
    /// AVX-512 target where `k` is a multiple of 16, else 8.
    pub lanes: u32,
    /// The weight is stored as AMX tiles (`KernelSpec::amx_weight`): the
    /// kernel is `amx_matmul`'s, with `rb` = its `AMX_ROWS` rows per block.
    pub amx: bool,
}

/// A tiled matmul's counts as index values: column tiles, rows, rows per
/// block, row blocks, and units (row blocks × column tiles).
pub(in crate::mlir) struct TileCounts {
    pub ct: V,
    pub rows: V,
    pub rbc: V,
    pub row_blocks: V,
    pub units: V,
}

impl TiledMatmul {
    pub(in crate::mlir) fn counts(&self, b: &mut KernelBuilder) -> TileCounts {
        let ct = b.index(self.col_tiles);
        let rows = b.sym(self.rows);
        let rbc = b.index(self.rb);
        let rb_m1 = b.index(self.rb - 1);
        let rows_up = b.addi(&rows, &rb_m1);
        let row_blocks = b.divui(&rows_up, &rbc);
        let units = b.muli(&row_blocks, &ct);
        TileCounts { ct, rows, rbc, row_blocks, units }
    }
}

/// How CPU matmul units are numbered.
#[derive(Clone, Copy)]
pub(in crate::mlir) enum UnitOrder<'a> {
    /// Unit `u` is row block `u / ct`, column block `u % ct` (`ct` column
    /// blocks): a thread's slice shares activation rows.
    RowMajor { ct: &'a str },
    /// Unit `u` is column block `u / row_blocks`, row block `u % row_blocks`:
    /// a thread's slice reads each weight tile once and reuses it from cache
    /// over every row block (prefill with weights larger than the caches).
    ColMajor { row_blocks: &'a str },
}

/// Where CPU matmul unit `u` of (row block, column block) units starts: its
/// first row, first column and end column (column blocks of `cols` columns,
/// `rb` rows per block, `n` columns in all).
pub(in crate::mlir) fn unit_origin(b: &mut KernelBuilder, u: &str, order: UnitOrder<'_>, rb: &str, cols: &str, n: &str) -> (V, V, V) {
    let (rbi, cb) = match order {
        UnitOrder::RowMajor { ct } => (b.divui(u, ct), b.remui(u, ct)),
        UnitOrder::ColMajor { row_blocks } => (b.remui(u, row_blocks), b.divui(u, row_blocks)),
    };
    let r0 = b.muli(&rbi, rb);
    let j0 = b.muli(&cb, cols);
    let j1 = b.addi(&j0, cols);
    let j_end = b.def(format!("arith.minui {j1}, {n} : index"));
    (r0, j0, j_end)
}

/// `(first + i)·stride` for `i in 0..count`: where rows `first..first+count` start.
pub(in crate::mlir) fn strided(b: &mut KernelBuilder, first: &str, count: u64, stride: &str) -> Vec<V> {
    (0..count)
        .map(|i| {
            let ii = b.index(i);
            let row = b.addi(first, &ii);
            b.muli(&row, stride)
        })
        .collect()
}

/// The CPU matmul `out[r, j] = Σ_k a[r, k]·w[j, k]` over (row block, column
/// block) units, with register-blocked micro-kernels: `r` rows × `c` weight rows
/// of vector accumulators, each weight vector (dequantized once for quantized
/// weights) reused across the rows, each activation vector across the columns.
pub(super) fn emit_tiled_matmul(b: &mut KernelBuilder, t: &TiledMatmul, ins: &[V], out: &str) {
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    let (kc, nc) = (b.index(t.k), b.index(t.n));
    let zero_i = b.index(0);
    let TileCounts { ct, rows, rbc, row_blocks, units } = t.counts(b);
    let planes = t.quant.map(|dt| QuantPlanes::new(b, dt, &w_buf, t.n * t.k));
    let half = t.half.and_then(|dt| HalfPlane::new(b, dt, &w_buf, t.n * t.k));
    let nbk = b.index(t.k / sparsec_ir::quant::QK as u64);
    let colsc = b.index(MM_COLS);
    let vw = t.lanes;
    // One micro-kernel: rows r0..r0+nr, weight rows j..j+nc_.
    let micro = |b: &mut KernelBuilder, r0: &str, nr: u64, j: &str, ncols: u64| {
        let arows = strided(b, r0, nr, &kc);
        let accs: Vec<V> = match &planes {
            None => {
                let z = b.vzero(vw);
                let init: Vec<(V, String)> = (0..nr * ncols).map(|_| (z.clone(), KernelBuilder::vty(vw))).collect();
                let wrows = strided(b, j, ncols, &kc);
                b.for_fold_typed(&zero_i, &kc, vw as u64, &init, |b, kk, accs| {
                    let xs: Vec<V> = arows
                        .iter()
                        .map(|ar| {
                            let i = b.addi(ar, kk);
                            b.vload(&a_buf, &i, vw)
                        })
                        .collect();
                    let mut next = accs.to_vec();
                    for (c, wr) in wrows.iter().enumerate() {
                        let i = b.addi(wr, kk);
                        let w = match &half {
                            Some(h) => h.vload(b, &i, vw),
                            None => b.vload(&w_buf, &i, vw),
                        };
                        for (r, x) in xs.iter().enumerate() {
                            let at = r * ncols as usize + c;
                            next[at] = b.vfma(x, &w, &accs[at], vw);
                        }
                    }
                    next
                })
            }
            Some(q) => {
                let z = b.vzero(VQ);
                let init: Vec<(V, String)> = (0..nr * ncols).map(|_| (z.clone(), KernelBuilder::vty(VQ))).collect();
                let wblocks = strided(b, j, ncols, &nbk);
                b.for_fold_typed(&zero_i, &nbk, 1, &init, |b, blk, accs| {
                    let qk = b.index(sparsec_ir::quant::QK as u64);
                    let koff = b.muli(blk, &qk);
                    let sixteen = b.index(16);
                    let xs: Vec<(V, V)> = arows
                        .iter()
                        .map(|ar| {
                            let i = b.addi(ar, &koff);
                            let i2 = b.addi(&i, &sixteen);
                            (b.vload(&a_buf, &i, VQ), b.vload(&a_buf, &i2, VQ))
                        })
                        .collect();
                    let mut next = accs.to_vec();
                    for (c, wb) in wblocks.iter().enumerate() {
                        let g = b.addi(wb, blk);
                        let (wlo, whi) = q.load_block(b, &w_buf, &g);
                        for (r, (xlo, xhi)) in xs.iter().enumerate() {
                            let at = r * ncols as usize + c;
                            let t = b.vfma(xlo, &wlo, &accs[at], VQ);
                            next[at] = b.vfma(xhi, &whi, &t, VQ);
                        }
                    }
                    next
                })
            }
        };
        let width = if planes.is_some() { VQ } else { vw };
        for r in 0..nr {
            let ri = b.index(r);
            let row = b.addi(r0, &ri);
            let orow = b.muli(&row, &nc);
            for c in 0..ncols {
                let y = b.vsum(&accs[(r * ncols + c) as usize], width);
                let ci = b.index(c);
                let jc = b.addi(j, &ci);
                let o = b.addi(&orow, &jc);
                b.store_result(&y, out, &o);
            }
        }
    };
    let columns = |b: &mut KernelBuilder, r0: &str, nr: u64, j0: &str, j_end: &str, c: u64| {
        column_groups(b, j0, j_end, c, &|b, j, ncols| micro(b, r0, nr, j, ncols));
    };
    // GEMM register budget: f32 4 rows × 2 columns; quantized 4 rows × 1 (the
    // dequantized block is 4 vectors). The f32 and 16-bit GEMV reads one weight
    // row at a time, with no software prefetch: one sequential stream is what
    // the hardware prefetcher follows best (SmolLM2 F32 decode 45 → 84 tok/s
    // on the Zen 4 guest against 4 interleaved rows prefetched 8 KB ahead, at
    // 8 and at 16 lanes alike; docs/history.md). The quantized GEMV here
    // dequantizes to f32 and is bound by that work: 4 rows share its loads.
    let (c_gemm, c_gemv) = if planes.is_some() { (1, 4) } else { (2, 1) };
    // A weight larger than the caches is read once per slice, not once per row block.
    let elem_bytes = if half.is_some() { 2 } else { 4 };
    let order = if t.n * t.k * elem_bytes > COL_MAJOR_WEIGHT_BYTES {
        UnitOrder::ColMajor { row_blocks: &row_blocks }
    } else {
        UnitOrder::RowMajor { ct: &ct }
    };
    b.parallel(&units, |b, u| {
        let (r0, j0, j_end) = unit_origin(b, u, order, &rbc, &colsc, &nc);
        row_block(b, t.rb, &r0, &rbc, &rows, &|b, r, nr| columns(b, r, nr, &j0, &j_end, if nr == 1 { c_gemv } else { c_gemm }));
    });
}

/// Walks a call's units `%lo..min(%hi, units)`, numbered row block by row
/// block (`ct_n` column blocks of `cols` columns each; row blocks of `rbc`
/// rows, `rows` in all): for each row block the call touches,
/// `prepare(r0, r_end)` once (its rows `r0..r_end`: quantized or rounded into
/// a scratch the call keeps), then `unit(r0, r_end, j0)` for each of its
/// units in the call, `j0` the unit's first column.
#[allow(clippy::too_many_arguments)]
pub(in crate::mlir) fn walk_row_blocks(
    b: &mut KernelBuilder,
    units: &str,
    ct_n: u64,
    cols: u64,
    rbc: &str,
    rows: &str,
    prepare: &dyn Fn(&mut KernelBuilder, &str, &str),
    unit: &dyn Fn(&mut KernelBuilder, &str, &str, &str),
) {
    let ct = &b.index(ct_n);
    let ub = b.def(format!("arith.minui %hi, {units} : index"));
    let first = b.divui("%lo", ct);
    let ct_m1 = b.index(ct_n - 1);
    let ub_up = b.addi(&ub, &ct_m1);
    let last = b.divui(&ub_up, ct);
    let colsc = b.index(cols);
    b.for_each(&first, &last, |b, rbi| {
        let r0 = b.muli(rbi, rbc);
        let r1 = b.addi(&r0, rbc);
        let r_end = b.def(format!("arith.minui {r1}, {rows} : index"));
        prepare(b, &r0, &r_end);
        let u_first = b.muli(rbi, ct);
        let u_next = b.addi(&u_first, ct);
        let u0 = b.def(format!("arith.maxui %lo, {u_first} : index"));
        let u1 = b.def(format!("arith.minui {ub}, {u_next} : index"));
        b.for_each(&u0, &u1, |b, u| {
            let cb = b.def(format!("arith.subi {u}, {u_first} : index"));
            let j0 = b.muli(&cb, &colsc);
            unit(b, &r0, &r_end, &j0);
        });
    });
}

/// The weight rows `j0..j_end` of a column block, `c` at a time, then the
/// rest one by one: `micro(first weight row, count)`.
pub(in crate::mlir) fn column_groups(b: &mut KernelBuilder, j0: &str, j_end: &str, c: u64, micro: &dyn Fn(&mut KernelBuilder, &str, u64)) {
    let span = b.def(format!("arith.subi {j_end}, {j0} : index"));
    let cc = b.index(c);
    let whole = b.divui(&span, &cc);
    let whole = b.muli(&whole, &cc);
    let j_main = b.addi(j0, &whole);
    b.for_step(j0, &j_main, c, |b, j| micro(b, j, c));
    b.for_each(&j_main, j_end, |b, j| micro(b, j, 1));
}

/// Runs `body(first row, rows)` for the row block at `r0` of `rb` rows: once
/// with all `rb` rows when the block is full (the register-blocked GEMM case),
/// else once per remaining row (the ragged end, and GEMV where `rb` is 1).
pub(in crate::mlir) fn row_block(
    b: &mut KernelBuilder,
    rb: u64,
    r0: &str,
    rbc: &str,
    rows: &str,
    body: &dyn Fn(&mut KernelBuilder, &str, u64),
) {
    if rb == 1 {
        body(b, r0, 1);
        return;
    }
    let r1 = b.addi(r0, rbc);
    let full = b.def(format!("arith.cmpi ule, {r1}, {rows} : index"));
    b.if_else(&full, |b| body(b, r0, rb), |b| b.for_each(r0, rows, |b, r| body(b, r, 1)));
}
