//! The CPU matmul on AMX tiles: `out[r, j] = Σ_k a[r, k]·w[j, k]` for a bf16
//! weight stored as `tdpbf16ps` B tiles (`sparsec_ir::tiles::TileLayout::AmxBf16`),
//! the f32 activations rounded to bf16 (nearest even), f32 accumulation.
//!
//! Units are (row block, pair of 16-column tiles), numbered row block by row
//! block (`UnitOrder::RowMajor`). A call rounds the rows of each row block it
//! touches once into a scratch of bf16 rows (the tile rows past the block's
//! end hold whatever the scratch held: each result row reads only its own A
//! row, and those results are not written), then each unit keeps 2 × 2 result tiles (32 rows × 32 columns; 1 × 2
//! when the block has at most 16 rows: decode) in tile registers over `k`,
//! one A tile per 16 rows and one B tile per 16 columns per 32 steps of `k`.
//! The result tiles go through a small staging buffer to the output rows,
//! where the fused epilogue is applied 16 columns at a time.
//!
//! q4_1 weights stored as tile records take `amx_int8_matmul` (int8 tiles).

use super::tiled_matmul::{walk_row_blocks, TileCounts, TiledMatmul};
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::tiles::{TILE_BYTES, TILE_K, TILE_N};

/// Rows of one A or result tile.
pub(super) const TILE_ROWS: u64 = 16;
/// Rows per unit: two A tiles.
pub(super) const AMX_ROWS: u64 = 2 * TILE_ROWS;
/// Weight rows (output columns) per unit: two B tiles.
pub(super) const AMX_COLS: u64 = 2 * TILE_N;

/// How far ahead a block of few rows prefetches the weight's tiles (bytes).
const PREFETCH_BYTES: u64 = 8192;

/// The tile type of LLVM's AMX intrinsics.
pub(super) const AMX: &str = "!llvm.x86_amx";

/// A tile shape (rows, bytes per row) as i16 constants, and the tile
/// operations on it. Shapes are constants, so LLVM configures the tiles once
/// per function (`ldtilecfg`) and releases them at its end.
pub(super) struct Shape {
    rows: V,
    colsb: V,
}

impl Shape {
    pub(super) fn new(b: &mut KernelBuilder, rows: u64, colsb: u64) -> Shape {
        Shape { rows: b.i16(rows as i16), colsb: b.i16(colsb as i16) }
    }

    pub(super) fn zero(&self, b: &mut KernelBuilder) -> V {
        let (r, c) = (&self.rows, &self.colsb);
        b.def(format!("llvm.call_intrinsic \"llvm.x86.tilezero.internal\"({r}, {c}) : (i16, i16) -> {AMX}"))
    }

    /// The tile at `ptr`, rows `stride` bytes apart (an i64).
    pub(super) fn load(&self, b: &mut KernelBuilder, ptr: &str, stride: &str) -> V {
        let (r, c) = (&self.rows, &self.colsb);
        b.def(format!(
            "llvm.call_intrinsic \"llvm.x86.tileloadd64.internal\"({r}, {c}, {ptr}, {stride}) : (i16, i16, !llvm.ptr, i64) -> {AMX}"
        ))
    }

    pub(super) fn store(&self, b: &mut KernelBuilder, ptr: &str, stride: &str, tile: &str) {
        let (r, c) = (&self.rows, &self.colsb);
        b.line(format!(
            "llvm.call_intrinsic \"llvm.x86.tilestored64.internal\"({r}, {c}, {ptr}, {stride}, {tile}) : (i16, i16, !llvm.ptr, i64, {AMX}) -> ()"
        ));
    }

    /// `acc + a·w` by the tile dot product `op` (`tdpbf16ps`, `tdpbsud`), this
    /// the result's shape and `a` the A tile's.
    pub(super) fn dot(&self, b: &mut KernelBuilder, op: &str, a: &Shape, acc: &str, at: &str, wt: &str) -> V {
        let (m, n, k) = (&self.rows, &self.colsb, &a.colsb);
        b.def(format!(
            "llvm.call_intrinsic \"llvm.x86.{op}.internal\"({m}, {n}, {k}, {acc}, {at}, {wt}) : (i16, i16, i16, {AMX}, {AMX}, {AMX}) -> {AMX}"
        ))
    }
}

/// Where row `row_in` of result tile (`tile_i`, `c`) (A tile, column tile)
/// starts in a staging of 2 × 2 tiles of 16 × 16 values (tile `i·2 + c`
/// at value `(i·2 + c)·256`).
pub(super) fn staged_row(b: &mut KernelBuilder, tile_i: &str, row_in: &str, c: u64) -> V {
    let two = b.index(2);
    let ci = b.index(c);
    let tile = b.muli(tile_i, &two);
    let tile = b.addi(&tile, &ci);
    let per_tile = b.index(TILE_ROWS * TILE_N);
    let src = b.muli(&tile, &per_tile);
    let sixteen = b.index(TILE_N);
    let in_row = b.muli(row_in, &sixteen);
    b.addi(&src, &in_row)
}

/// The address `base + off` (indices: a buffer's aligned pointer and a byte offset).
pub(super) fn ptr_at(b: &mut KernelBuilder, base: &str, off: &str) -> V {
    let at = b.addi(base, off);
    let at = b.def(format!("arith.index_cast {at} : index to i64"));
    b.def(format!("llvm.inttoptr {at} : i64 to !llvm.ptr"))
}

/// The aligned pointer of memref `buf` (element type `elem`) as an index.
pub(super) fn base_of(b: &mut KernelBuilder, buf: &str, elem: &str) -> V {
    b.def(format!("memref.extract_aligned_pointer_as_index {buf} : memref<?x{elem}> -> index"))
}

pub(super) fn emit_amx_matmul(b: &mut KernelBuilder, t: &TiledMatmul, ins: &[V], out: &str) {
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    let (k, n) = (t.k, t.n);
    // The units' column blocks are the tiled matmul's (`MM_COLS`, the same 32).
    debug_assert_eq!(n / AMX_COLS, t.col_tiles);
    let (kc, nc) = (b.index(k), b.index(n));
    let TileCounts { rows, rbc, units, .. } = t.counts(b);
    // Every tile of this kernel is 16 rows of 64 bytes.
    let tiles = Shape::new(b, TILE_ROWS, 64);
    // The row block's activations as bf16 rows (AMX_ROWS of them), and the
    // staging of one unit's result tiles.
    let xs_len = b.index(AMX_ROWS * k);
    let xs = b.def(format!("memref.alloca({xs_len}) : memref<?xbf16>"));
    let cs_len = b.index(4 * TILE_ROWS * TILE_N);
    let cs = b.alloca_f32(&cs_len);
    let a_stride = b.i64(2 * k as i64);
    let tile_stride = b.i64(64);
    let steps = b.index(k / TILE_K);
    let k_tile_bytes = b.index(TILE_BYTES);
    let w_last = b.index((2 * n * k).saturating_sub(1));
    let zero_i = b.index(0);
    let w_base = base_of(b, &w_buf, "i8");
    let x_base = base_of(b, &xs, "bf16");
    let c_base = base_of(b, &cs, "f32");
    // bf16 rows `r0..r_end` into `xs`.
    let round_rows = |b: &mut KernelBuilder, r0: &str, r_end: &str| {
        b.for_each(r0, r_end, |b, r| {
            let slot = b.def(format!("arith.subi {r}, {r0} : index"));
            let src = b.muli(r, &kc);
            let dst = b.muli(&slot, &kc);
            b.for_step(&zero_i, &kc, 16, |b, kk| {
                let i = b.addi(&src, kk);
                let x = b.vload(&a_buf, &i, 16);
                let h = b.def(format!("arith.truncf {x} : vector<16xf32> to vector<16xbf16>"));
                let o = b.addi(&dst, kk);
                b.line(format!("vector.store {h}, {xs}[{o}] : memref<?xbf16>, vector<16xbf16>"));
            });
        });
    };
    // One unit: `a_tiles` A tiles (16 rows each) of the block at `r0` with
    // `nr` valid rows, against the column tiles `nt0`, `nt0 + 1` (columns `j0..j0+32`).
    let unit = |b: &mut KernelBuilder, r0: &str, nr: &str, j0: &str, nt0: &str, a_tiles: u64| {
        let init: Vec<(V, String)> = (0..a_tiles * 2).map(|_| (tiles.zero(b), AMX.to_string())).collect();
        let w_block0 = b.muli(nt0, &steps);
        let accs = b.for_fold_typed(&zero_i, &steps, 1, &init, |b, s, accs| {
            let kb = b.index(2 * TILE_K);
            let a_off = b.muli(s, &kb);
            let a: Vec<V> = (0..a_tiles)
                .map(|i| {
                    let row_bytes = b.index(i * TILE_ROWS * 2 * k);
                    let off = b.addi(&a_off, &row_bytes);
                    let p = ptr_at(b, &x_base, &off);
                    tiles.load(b, &p, &a_stride)
                })
                .collect();
            let w: Vec<V> = (0..2u64)
                .map(|c| {
                    let blocks = b.index(c * (k / TILE_K));
                    let blk = b.addi(&w_block0, &blocks);
                    let blk = b.addi(&blk, s);
                    let off = b.muli(&blk, &k_tile_bytes);
                    if a_tiles == 1 {
                        // A block of few rows (decode) streams the weight from
                        // memory: ask for its tiles ahead, every line.
                        for line in 0..TILE_BYTES / 64 {
                            let l = b.index(line * 64);
                            let at = b.addi(&off, &l);
                            b.prefetch_ahead(&w_buf, &at, PREFETCH_BYTES, &w_last, "i8");
                        }
                    }
                    let p = ptr_at(b, &w_base, &off);
                    tiles.load(b, &p, &tile_stride)
                })
                .collect();
            let mut next = Vec::new();
            for (i, ai) in a.iter().enumerate() {
                for (c, wc) in w.iter().enumerate() {
                    next.push(tiles.dot(b, "tdpbf16ps", &tiles, &accs[i * 2 + c], ai, wc));
                }
            }
            next
        });
        // Stage the result tiles (tile `i·2 + c` at float `(i·2 + c)·256`), then
        // write the valid rows, 16 columns at a time, through the epilogue.
        for (at, acc) in accs.iter().enumerate() {
            let off = b.index(at as u64 * TILE_BYTES);
            let p = ptr_at(b, &c_base, &off);
            tiles.store(b, &p, &tile_stride, acc);
        }
        b.for_each(&zero_i, nr, |b, slot| {
            let sixteen = b.index(TILE_ROWS);
            let tile_i = b.divui(slot, &sixteen);
            let row_in = b.remui(slot, &sixteen);
            let row = b.addi(r0, slot);
            let orow = b.muli(&row, &nc);
            for c in 0..2u64 {
                let src = staged_row(b, &tile_i, &row_in, c);
                let y = b.vload(&cs, &src, TILE_N as u32);
                let col = b.index(c * TILE_N);
                let j = b.addi(j0, &col);
                let o = b.addi(&orow, &j);
                b.vstore_result(&y, out, &o, TILE_N as u32);
            }
        });
    };
    // The call's units, row block by row block: each block's rows rounded once.
    let one_tile = b.index(TILE_ROWS);
    walk_row_blocks(b, &units, t.col_tiles, AMX_COLS, &rbc, &rows, &round_rows, &|b, r0, r_end, j0| {
        // Two A tiles for more than 16 rows.
        let nr = b.def(format!("arith.subi {r_end}, {r0} : index"));
        let w = b.def(format!("arith.cmpi ugt, {nr}, {one_tile} : index"));
        let tile_cols = b.index(TILE_N);
        let nt0 = b.divui(j0, &tile_cols);
        b.if_else(&w, |b| unit(b, r0, &nr, j0, &nt0, 2), |b| unit(b, r0, &nr, j0, &nt0, 1));
    });
}
