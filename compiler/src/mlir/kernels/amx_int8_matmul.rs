//! The CPU matmul on AMX int8 tiles: `out[r, j] = Σ_k a[r, k]·w[j, k]` for a
//! q4_1 weight stored as tile records (`sparsec_ir::tiles::TileLayout::AmxQ4_1`),
//! with the activations quantized to int8 per block of 32 as `quant_dot`
//! does (`x ≈ dx·qx`), so that `Σ_k x·w = Σ_blocks dw·dx·Σ qx·qw + m·dx·Σ qx`.
//!
//! Units and the row-block walk are `amx_matmul`'s: (row block of 32 rows,
//! pair of 16-column tiles); a call quantizes each row block it touches once.
//! Every block of 32 along `k` has its own scales, so a unit takes the tiles
//! one block at a time: the block's two B tiles unpacked from their records'
//! nibbles into a scratch, `tdpbsud` (signed activations × unsigned weights)
//! into fresh result tiles (2 × 2, or 1 × 2 for a block of at most 16 rows),
//! and the i32 results scaled into f32 accumulators row by row (`dw·dx` per
//! column and row, plus the offset term `m·dx·Σ qx`). After the last block the
//! accumulators go through the fused epilogue to the output, 16 columns at a time.
//! A block of one row (decode) takes no tiles: each record's tile rows go
//! through `vpdpbusd` against the row's values, 4 at a time broadcast.

use super::amx_matmul::{base_of, ptr_at, staged_row, Shape, AMX_COLS, TILE_ROWS};
use super::tiled_matmul::{walk_row_blocks, TileCounts, TiledMatmul};
use crate::mlir::builder::{KernelBuilder, V};
use crate::mlir::quant_dot::{quantize_row, QuantizedRows};
use sparsec_ir::quant::QK;
use sparsec_ir::tiles::{Q4_RECORD, TILE_N};

/// Rows per unit: two A tiles.
const ROWS: u64 = 2 * TILE_ROWS;
/// Bytes of one unpacked B tile: 8 rows of 64 (16 columns × 32 values).
const B_TILE: u64 = 512;
/// How far ahead one row's dot products prefetch the records (bytes).
const PREFETCH_BYTES: u64 = 8192;

/// The byte offset of the record of column tile `nt0 + c` and block `blk`.
fn record_at(b: &mut KernelBuilder, nt0: &str, c: u64, blk: &str, nbk: &str) -> V {
    let ci = b.index(c);
    let nt = b.addi(nt0, &ci);
    let rec = b.muli(&nt, nbk);
    let rec = b.addi(&rec, blk);
    let record = b.index(Q4_RECORD);
    b.muli(&rec, &record)
}

/// Part `part` (0..4) of the record at byte `rec` of `w`: its 64 bytes'
/// low nibbles (tile row `part`: values `4·part .. 4·part + 3` of each of the
/// 16 columns) and high nibbles (tile row `part + 4`), as bytes.
fn record_nibbles(b: &mut KernelBuilder, w: &str, rec: &str, part: u64) -> (V, V) {
    let off = b.index(part * 64);
    let src = b.addi(rec, &off);
    let v = b.vload_bytes(w, &src, 64);
    let low = b.vsplat_int(15, 64, "i8");
    let four = b.vsplat_int(4, 64, "i8");
    let lo = b.def(format!("arith.andi {v}, {low} : vector<64xi8>"));
    let hi = b.def(format!("arith.shrui {v}, {four} : vector<64xi8>"));
    (lo, hi)
}

/// Where accumulator row `slot`'s columns `16·c ..` start (rows of 32 floats).
fn acc_at(b: &mut KernelBuilder, slot: &str, c: u64) -> V {
    let row = b.index(AMX_COLS);
    let at = b.muli(slot, &row);
    let cc = b.index(c * TILE_N);
    b.addi(&at, &cc)
}

/// The scales and minimums of the record at byte `rec` as f32 vectors
/// (`scales`: the weight buffer viewed as f16).
fn record_scales(b: &mut KernelBuilder, scales: &str, rec: &str) -> (V, V) {
    let two = b.index(2);
    let words = b.divui(rec, &two);
    let mut load = |word_off: u64| {
        let o = b.index(word_off);
        let at = b.addi(&words, &o);
        let h = b.def(format!("vector.load {scales}[{at}] : memref<?xf16>, vector<16xf16>"));
        b.def(format!("arith.extf {h} : vector<16xf16> to vector<16xf32>"))
    };
    let d = load(128);
    let m = load(144);
    (d, m)
}

pub(super) fn emit_amx_int8_matmul(b: &mut KernelBuilder, t: &TiledMatmul, ins: &[V], out: &str) {
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    let (k, n) = (t.k, t.n);
    let nbk_n = k / QK as u64;
    debug_assert_eq!(n / AMX_COLS, t.col_tiles);
    let (nc, nbk) = (b.index(n), b.index(nbk_n));
    let TileCounts { rows, rbc, units, .. } = t.counts(b);
    // A: 16 rows of one block's 32 int8 values; B: 8 rows of 16 columns × 4
    // values; C: 16 × 16 i32.
    let (a_shape, b_shape, c_shape) = (Shape::new(b, TILE_ROWS, QK as u64), Shape::new(b, 8, 64), Shape::new(b, TILE_ROWS, 64));
    let qr = QuantizedRows::alloca(b, ROWS, k);
    let unpacked_len = b.index(2 * B_TILE);
    let unpacked = b.def(format!("memref.alloca({unpacked_len}) : memref<?xi8>"));
    let staged_len = b.index(4 * TILE_ROWS * TILE_N);
    let staged = b.def(format!("memref.alloca({staged_len}) : memref<?xi32>"));
    let acc_len = b.index(ROWS * AMX_COLS);
    let acc = b.alloca_f32(&acc_len);
    let (q_base, u_base, s_base) = (base_of(b, &qr.q, "i8"), base_of(b, &unpacked, "i8"), base_of(b, &staged, "i32"));
    let scales = b.f16_view(&w_buf);
    let a_stride = b.i64(k as i64);
    let row64 = b.i64(64);
    let zero_i = b.index(0);
    let sixteen = b.index(TILE_N);
    let vzero = b.vzero(TILE_N as u32);
    let last_byte = b.index((n / TILE_N * nbk_n * Q4_RECORD).saturating_sub(1));
    // One unit: `a_tiles` A tiles of the row block at `r0` (`nr` valid rows),
    // against the column tiles `nt0`, `nt0 + 1` (columns `j0..j0 + 32`).
    let unit = |b: &mut KernelBuilder, r0: &str, nr: &str, j0: &str, nt0: &str, a_tiles: u64| {
        b.for_each(&zero_i, nr, |b, slot| {
            for c in 0..2u64 {
                let at = acc_at(b, slot, c);
                b.vstore(&vzero, &acc, &at, TILE_N as u32);
            }
        });
        b.for_each(&zero_i, &nbk, |b, blk| {
            // The block's records of the two column tiles: nibbles unpacked
            // into B tiles, the scales and minimums as f32 vectors.
            let mut dm = Vec::new();
            for c in 0..2u64 {
                let rec = record_at(b, nt0, c, blk, &nbk);
                for part in 0..4u64 {
                    let (lo, hi) = record_nibbles(b, &w_buf, &rec, part);
                    let dst = b.index(c * B_TILE + part * 64);
                    b.vstore_bytes(&lo, &unpacked, &dst, 64);
                    let dst = b.index(c * B_TILE + 256 + part * 64);
                    b.vstore_bytes(&hi, &unpacked, &dst, 64);
                }
                dm.push(record_scales(b, &scales, &rec));
            }
            // The block's products on tiles, staged as i32 (tile `i·2 + c` at word `(i·2 + c)·256`).
            let qk = b.index(QK as u64);
            let a_off = b.muli(blk, &qk);
            let w_tiles: Vec<V> = (0..2u64)
                .map(|c| {
                    let off = b.index(c * B_TILE);
                    let p = ptr_at(b, &u_base, &off);
                    b_shape.load(b, &p, &row64)
                })
                .collect();
            for i in 0..a_tiles {
                let rows_off = b.index(i * TILE_ROWS * k);
                let off = b.addi(&a_off, &rows_off);
                let p = ptr_at(b, &q_base, &off);
                let at = a_shape.load(b, &p, &a_stride);
                for (c, wt) in w_tiles.iter().enumerate() {
                    let z = c_shape.zero(b);
                    let ct = c_shape.dot(b, "tdpbsud", &a_shape, &z, &at, wt);
                    let off = b.index((i * 2 + c as u64) * TILE_ROWS * TILE_N * 4);
                    let p = ptr_at(b, &s_base, &off);
                    c_shape.store(b, &p, &row64, &ct);
                }
            }
            // Scaled into the accumulators, row by row.
            b.for_each(&zero_i, nr, |b, slot| {
                let tile_i = b.divui(slot, &sixteen);
                let row_in = b.remui(slot, &sixteen);
                let sb = b.muli(slot, &nbk);
                let sb = b.addi(&sb, blk);
                let dx = b.load(&qr.d, &sb);
                let sx = b.load(&qr.s, &sb);
                let (dxv, sxv) = (b.vbroadcast(&dx, TILE_N as u32), b.vbroadcast(&sx, TILE_N as u32));
                for (c, (dw, mw)) in dm.iter().enumerate() {
                    let src = staged_row(b, &tile_i, &row_in, c as u64);
                    let p = b.def(format!("vector.load {staged}[{src}] : memref<?xi32>, vector<16xi32>"));
                    let pf = b.def(format!("arith.sitofp {p} : vector<16xi32> to vector<16xf32>"));
                    let at = acc_at(b, slot, c as u64);
                    let a = b.vload(&acc, &at, TILE_N as u32);
                    let scale = b.def(format!("arith.mulf {dw}, {dxv} : vector<16xf32>"));
                    let a = b.vfma(&pf, &scale, &a, TILE_N as u32);
                    let a = b.vfma(mw, &sxv, &a, TILE_N as u32);
                    b.vstore(&a, &acc, &at, TILE_N as u32);
                }
            });
        });
        b.for_each(&zero_i, nr, |b, slot| {
            let r = b.addi(r0, slot);
            let orow = b.muli(&r, &nc);
            for c in 0..2u64 {
                let at = acc_at(b, slot, c);
                let y = b.vload(&acc, &at, TILE_N as u32);
                let cc = b.index(c * TILE_N);
                let j = b.addi(j0, &cc);
                let o = b.addi(&orow, &j);
                b.vstore_result(&y, out, &o, TILE_N as u32);
            }
        });
    };
    let one_tile = b.index(TILE_ROWS);
    let prepare = |b: &mut KernelBuilder, r0: &str, r_end: &str| {
        b.for_each(r0, r_end, |b, r| {
            let slot = b.def(format!("arith.subi {r}, {r0} : index"));
            quantize_row(b, &a_buf, r, &slot, k, &qr);
        });
    };
    // One row (decode): `vpdpbusd` over the records' tile rows, no tiles.
    let gemv = |b: &mut KernelBuilder, r0: &str, j0: &str, nt0: &str| {
        let init: Vec<(V, String)> = (0..2).map(|_| (vzero.clone(), KernelBuilder::vty(TILE_N as u32))).collect();
        let zero_i32 = b.vsplat_int(0, TILE_N as u32, "i32");
        let accs = b.for_fold_typed(&zero_i, &nbk, 1, &init, |b, blk, accs| {
            let qk = b.index(QK as u64);
            let xo = b.muli(blk, &qk);
            let xb = b.vload_bytes(&qr.q, &xo, QK as u32);
            let groups = b.def(format!("vector.bitcast {xb} : vector<{QK}xi8> to vector<8xi32>"));
            let dx = b.load(&qr.d, blk);
            let sx = b.load(&qr.s, blk);
            let (dxv, sxv) = (b.vbroadcast(&dx, TILE_N as u32), b.vbroadcast(&sx, TILE_N as u32));
            let bcast: Vec<V> = (0..8)
                .map(|g| {
                    let e = b.def(format!("vector.extract {groups}[{g}] : i32 from vector<8xi32>"));
                    let v = b.def(format!("vector.broadcast {e} : i32 to vector<16xi32>"));
                    b.def(format!("vector.bitcast {v} : vector<16xi32> to vector<64xi8>"))
                })
                .collect();
            let mut next = Vec::new();
            for (c, acc) in accs.iter().enumerate() {
                let rec = record_at(b, nt0, c as u64, blk, &nbk);
                let mut dot = zero_i32.clone();
                // One row streams the records from memory: ask for them ahead.
                for line in 0..Q4_RECORD.div_ceil(64) {
                    let off = b.index(line * 64);
                    let at = b.addi(&rec, &off);
                    b.prefetch_ahead(&w_buf, &at, PREFETCH_BYTES, &last_byte, "i8");
                }
                for part in 0..4usize {
                    let (lo, hi) = record_nibbles(b, &w_buf, &rec, part as u64);
                    // Tile rows `part` and `part + 4`: values 4·row .. 4·row + 3 of every column.
                    for (w, g) in [(lo, part), (hi, part + 4)] {
                        dot = b.def(format!(
                            "llvm.call_intrinsic \"llvm.x86.avx512.vpdpbusd.512\"({dot}, {w}, {}) : (vector<16xi32>, vector<64xi8>, vector<64xi8>) -> vector<16xi32>",
                            bcast[g]
                        ));
                    }
                }
                let (dw, mw) = record_scales(b, &scales, &rec);
                let pf = b.def(format!("arith.sitofp {dot} : vector<16xi32> to vector<16xf32>"));
                let scale = b.def(format!("arith.mulf {dw}, {dxv} : vector<16xf32>"));
                let a = b.vfma(&pf, &scale, acc, TILE_N as u32);
                next.push(b.vfma(&mw, &sxv, &a, TILE_N as u32));
            }
            next
        });
        let orow = b.muli(r0, &nc);
        for (c, y) in accs.iter().enumerate() {
            let cc = b.index(c as u64 * TILE_N);
            let j = b.addi(j0, &cc);
            let o = b.addi(&orow, &j);
            b.vstore_result(y, out, &o, TILE_N as u32);
        }
    };
    let one = b.index(1);
    walk_row_blocks(b, &units, t.col_tiles, AMX_COLS, &rbc, &rows, &prepare, &|b, r0, r_end, j0| {
        let nr = b.def(format!("arith.subi {r_end}, {r0} : index"));
        let nt0 = b.divui(j0, &sixteen);
        let single = b.def(format!("arith.cmpi eq, {nr}, {one} : index"));
        b.if_else(
            &single,
            |b| gemv(b, r0, j0, &nt0),
            |b| {
                let wide = b.def(format!("arith.cmpi ugt, {nr}, {one_tile} : index"));
                b.if_else(&wide, |b| unit(b, r0, &nr, j0, &nt0, 2), |b| unit(b, r0, &nr, j0, &nt0, 1));
            },
        );
    });
}
