//! NVIDIA sparse matmul kernels at the `generic` level: a warp per output
//! element `out[r, j]` for every packed format (CSR, N:M, BSR) with f32 or
//! quantized values (`CsrQ`, `NmQ`, `BsrQ`, dequantized where loaded).
//!
//! The output's stored entries are numbered `e = 0..count` in storage order
//! and lane `l` takes `e = l, l + 32, ...`, `unroll` of them a step: the
//! step's values and columns are loaded first, then its activations, then the
//! FMAs, so a row costs a few memory round trips instead of two per entry,
//! and the lanes' value loads are contiguous. An entry is found from `e`
//! alone: CSR reads column `e` of the row; N:M takes group `e / keep`, whose
//! `m` bitmap bits give the `e % keep`-th kept position (the lowest bits
//! cleared, then the trailing zeros counted); BSR takes block `e / cols` of
//! the block row and column `e % cols` within it. A CSR row whose columns are
//! a bitmap (quantized values at densities where that is smaller) is walked
//! a bitmap byte per lane: a warp prefix sum of the bytes' bit counts gives
//! each lane the number of its first value. `warp_per_output` adds the lanes'
//! sums and stores through the fused epilogue. Values and columns read from a
//! packed weight are clamped into their planes, so a corrupt file cannot move
//! a load outside them.

use super::builder::{KernelBuilder, V};
use super::kernels::{prefetch_warp_block, warp_per_output, WARP};
use super::sparse_kernels::SparseMatmul;
use super::sparse_quant_kernels::QPlanes;
use sparsec_ir::sparse::SparseFormat;
use sparsec_ir::sparse_quant::CsrIndex;
use sparsec_ir::SymSize;

/// Entries per lane and step (their loads issued together): 16 for N:M, 4
/// for the others. GPT-2 124M decode on an H200 (tok/s at 4 / 8 / 16,
/// `docs/device-runs/2026-12-01-sparse-warp/`): 2:4 f32 1434 / 1639 / 2536,
/// 2:4 q4 1873 / 1845 / 2032, 90% q8 CSR 1695 at all three (2.4 entries per
/// lane), 4x4 BSR 1303 / 1330 / 1123 (and its prefill 11.4 / 13.4 / 13.4 ms).
fn unroll(fmt: &SparseFormat) -> u64 {
    match fmt {
        SparseFormat::Nm { .. } | SparseFormat::NmQ { .. } => 16,
        SparseFormat::Csr { .. } | SparseFormat::CsrQ { .. } | SparseFormat::Bsr { .. } | SparseFormat::BsrQ { .. } => 4,
    }
}
/// The widest N:M group the warp kernel reads: a group's bits lie in one
/// 32-bit word read from the bitmap at any bit offset below 8.
const MAX_GROUP: u32 = 25;

/// Whether a warp per output element serves this format at the `generic`
/// level (else a thread per output: N:M groups wider than `MAX_GROUP`).
pub fn serves(fmt: &SparseFormat) -> bool {
    match *fmt {
        SparseFormat::Csr { .. } | SparseFormat::CsrQ { .. } | SparseFormat::Bsr { .. } | SparseFormat::BsrQ { .. } => true,
        SparseFormat::Nm { group, .. } | SparseFormat::NmQ { group, .. } => group <= MAX_GROUP,
    }
}

/// Where a packed weight's stored values come from.
pub(super) enum Values<'a> {
    /// An f32 plane.
    F32(&'a V),
    /// Blocks of quantized values.
    Quant(&'a QPlanes),
}

impl Values<'_> {
    /// Stored value `p`, as f32.
    fn load(&self, b: &mut KernelBuilder, p: &str) -> V {
        match self {
            Values::F32(v) => b.load_elem(v, p, "f32"),
            Values::Quant(q) => q.value(b, p),
        }
    }
}

/// A packed weight's index planes: row (or block-row) pointers, and the
/// columns, block columns or bitmap, of element type `ty`.
pub(super) struct Index<'a> {
    pub ptr: Option<&'a V>,
    pub idx: &'a V,
    pub ty: &'a str,
}

/// Emits the kernel: `w` the packed weight's buffer, `a` the activations.
pub(super) fn emit(b: &mut KernelBuilder, t: &SparseMatmul, ix: &Index<'_>, values: &Values<'_>, w: &str, a: &str, out: &str) {
    let fmt = t.storage.format;
    let (n, k) = fmt.nk();
    prefetch(b, &fmt, ix, w);
    let total = b.sym(SymSize { coef: t.rows.coef * n * WARP, seq_pow: t.rows.seq_pow });
    let last_value = fmt.stored_values().max(1) - 1;
    warp_per_output(b, &total, k, n, out, |b, lane, j, arow| {
        if fmt.csr_index() == CsrIndex::Bitmap && matches!(fmt, SparseFormat::CsrQ { .. }) {
            return bitmap_row(b, &fmt, ix, values, lane, j, a, arow);
        }
        let (count, entry) = row_entries(b, &fmt, ix, j);
        let zero = b.f32(0.0);
        let last = b.index(last_value);
        let unroll = unroll(&fmt);
        let acc = b.for_fold_typed(lane, &count, WARP * unroll, &[(zero.clone(), "f32".into())], |b, e0, acc| {
            // The step's entries (the first, `e0`, lies in the row).
            let entries: Vec<(V, V, V)> = (0..unroll)
                .map(|u| {
                    let o = b.index(u * WARP);
                    let e = b.addi(e0, &o);
                    let inside = b.def(format!("arith.cmpi ult, {e}, {count} : index"));
                    let e = b.def(format!("arith.select {inside}, {e}, {e0} : index"));
                    let (p, c) = entry.at(b, &e);
                    let p = b.minui(&p, &last);
                    (inside, values.load(b, &p), c)
                })
                .collect();
            let xs: Vec<V> = entries
                .iter()
                .map(|(_, _, c)| {
                    let ai = b.addi(arow, c);
                    b.load(a, &ai)
                })
                .collect();
            let mut s = acc[0].clone();
            for ((inside, v, _), x) in entries.iter().zip(&xs) {
                let v = b.def(format!("arith.select {inside}, {v}, {zero} : f32"));
                s = b.fma(&v, x, &s);
            }
            vec![s]
        });
        acc[0].clone()
    });
}

/// How entry `e` of output `j`'s stored entries is found.
enum Entry {
    /// CSR: value `lo + e`, its column in the index plane.
    Csr { lo: V, idx: V, ty: String, k: u64 },
    /// N:M: value `base + e`, the `e % keep`-th kept position of group `e / keep`.
    Nm { base: V, mbase: V, row_bytes: u64, bitmap: V, keep: u32, group: u32 },
    /// BSR: block `lo + e / cols` of the block row, column `e % cols`, value
    /// row `i` of the block.
    Bsr { lo: V, i: V, idx: V, rows: u32, cols: u32, k: u64 },
}

/// Output `j`'s entry count and how its entries are found (formats with a
/// count per row: every one but the bitmap CSR).
fn row_entries(b: &mut KernelBuilder, fmt: &SparseFormat, ix: &Index<'_>, j: &str) -> (V, Entry) {
    let one = b.index(1);
    let (n, k) = fmt.nk();
    let ptr = ix.ptr.cloned().unwrap_or_default();
    match *fmt {
        SparseFormat::Csr { .. } | SparseFormat::CsrQ { .. } => {
            let lo = b.load_index(&ptr, j, "i32");
            let j1 = b.addi(j, &one);
            let hi = b.load_index(&ptr, &j1, "i32");
            let count = b.def(format!("arith.subi {hi}, {lo} : index"));
            (count, Entry::Csr { lo, idx: ix.idx.clone(), ty: ix.ty.to_string(), k })
        }
        SparseFormat::Nm { keep, group, .. } | SparseFormat::NmQ { keep, group, .. } => {
            let per_row = b.index(fmt.stored_values() / n.max(1));
            let base = b.muli(j, &per_row);
            let row_bytes = SparseFormat::bitmap_row_bytes(k);
            let rb = b.index(row_bytes);
            let mbase = b.muli(j, &rb);
            (per_row, Entry::Nm { base, mbase, row_bytes, bitmap: ix.idx.clone(), keep, group })
        }
        SparseFormat::Bsr { rows, cols, .. } | SparseFormat::BsrQ { rows, cols, .. } => {
            let rc = b.index(rows as u64);
            let bi = b.divui(j, &rc);
            let i = b.remui(j, &rc);
            let lo = b.load_index(&ptr, &bi, "i32");
            let bi1 = b.addi(&bi, &one);
            let hi = b.load_index(&ptr, &bi1, "i32");
            let blocks = b.def(format!("arith.subi {hi}, {lo} : index"));
            let cc = b.index(cols as u64);
            let count = b.muli(&blocks, &cc);
            (count, Entry::Bsr { lo, i, idx: ix.idx.clone(), rows, cols, k })
        }
    }
}

impl Entry {
    /// Entry `e`'s (stored value index, column).
    fn at(&self, b: &mut KernelBuilder, e: &str) -> (V, V) {
        match self {
            Entry::Csr { lo, idx, ty, k } => {
                let p = b.addi(lo, e);
                let c = b.load_index(idx, &p, ty);
                let km1 = b.index(k - 1);
                (p, b.minui(&c, &km1))
            }
            Entry::Nm { base, mbase, row_bytes, bitmap, keep, group } => {
                let (kc, mc) = (b.index(*keep as u64), b.index(*group as u64));
                let g = b.divui(e, &kc);
                let s = b.remui(e, &kc);
                let k0 = b.muli(&g, &mc);
                let eight = b.index(8);
                let first = b.divui(&k0, &eight);
                let shift = b.remui(&k0, &eight);
                // The bytes holding the group's bits, assembled little-endian;
                // those past the row's bitmap repeat its last byte, whose
                // bits land above the group's and are masked off.
                let last = b.index(row_bytes - 1);
                let mut word = b.i32(0);
                for t in 0..(7 + *group as u64).div_ceil(8) {
                    let tc = b.index(t);
                    let at = b.addi(&first, &tc);
                    let at = b.minui(&at, &last);
                    let at = b.addi(mbase, &at);
                    let byte = b.load_byte(bitmap, &at, false);
                    let sh = b.i32(8 * t as i32);
                    let byte = b.def(format!("arith.shli {byte}, {sh} : i32"));
                    word = b.def(format!("arith.ori {word}, {byte} : i32"));
                }
                let shift = b.def(format!("arith.index_castui {shift} : index to i32"));
                let bits = b.def(format!("arith.shrui {word}, {shift} : i32"));
                let mask = b.i32(((1u64 << *group) - 1) as i32);
                let mut bits = b.def(format!("arith.andi {bits}, {mask} : i32"));
                // Clear the `s` lowest kept bits (`s < keep`).
                let (one, s32) = (b.i32(1), b.def(format!("arith.index_castui {s} : index to i32")));
                for t in 0..keep.saturating_sub(1) {
                    let tc = b.i32(t as i32);
                    let more = b.def(format!("arith.cmpi ugt, {s32}, {tc} : i32"));
                    let lower = b.def(format!("arith.subi {bits}, {one} : i32"));
                    let cleared = b.def(format!("arith.andi {bits}, {lower} : i32"));
                    bits = b.def(format!("arith.select {more}, {cleared}, {bits} : i32"));
                }
                let pos = b.def(format!("math.cttz {bits} : i32"));
                let pos = b.def(format!("arith.index_castui {pos} : i32 to index"));
                let gm1 = b.index(*group as u64 - 1);
                let pos = b.minui(&pos, &gm1);
                (b.addi(base, e), b.addi(&k0, &pos))
            }
            Entry::Bsr { lo, i, idx, rows, cols, k } => {
                let cc = b.index(*cols as u64);
                let q = b.divui(e, &cc);
                let q = b.addi(lo, &q);
                let tt = b.remui(e, &cc);
                let bsz = b.index(*rows as u64 * *cols as u64);
                let p = b.muli(&q, &bsz);
                let ioff = b.muli(i, &cc);
                let p = b.addi(&p, &ioff);
                let p = b.addi(&p, &tt);
                let bc = b.load_index(idx, &q, "i32");
                let kb = b.muli(&bc, &cc);
                let c = b.addi(&kb, &tt);
                let km1 = b.index(k - 1);
                (p, b.minui(&c, &km1))
            }
        }
    }
}

/// A CSR row whose columns are a bitmap: lane `l` takes bitmap bytes `l, l +
/// 32, ...` of the row; per step, a warp prefix sum of the bytes' bit counts
/// (`shfl.sync up`) numbers each lane's first value after the values of the
/// steps before, and the lane walks its byte's set bits lowest first.
#[allow(clippy::too_many_arguments)]
fn bitmap_row(
    b: &mut KernelBuilder,
    fmt: &SparseFormat,
    ix: &Index<'_>,
    values: &Values<'_>,
    lane: &str,
    j: &str,
    a: &str,
    arow: &str,
) -> V {
    let (_, k) = fmt.nk();
    let row_bytes = SparseFormat::bitmap_row_bytes(k);
    let ptr = ix.ptr.cloned().unwrap_or_default();
    let base = b.load_index(&ptr, j, "i32");
    let rb = b.index(row_bytes);
    let mbase = b.muli(j, &rb);
    let (zero, zi) = (b.f32(0.0), b.index(0));
    let steps = b.index(row_bytes.div_ceil(WARP));
    let (last_byte, last_value, km1) = (b.index(row_bytes - 1), b.index(fmt.stored_values().max(1) - 1), b.index(k - 1));
    let init = [(zero, "f32".to_string()), (zi.clone(), "index".to_string())];
    let res = b.for_fold_typed(&zi, &steps, 1, &init, |b, st, carried| {
        let warp = b.index(WARP);
        let i = b.muli(st, &warp);
        let i = b.addi(&i, lane);
        let inside = b.def(format!("arith.cmpi ult, {i}, {rb} : index"));
        let at = b.minui(&i, &last_byte);
        let at = b.addi(&mbase, &at);
        let byte = b.load_byte(ix.idx, &at, false);
        let z32 = b.i32(0);
        let byte = b.def(format!("arith.select {inside}, {byte}, {z32} : i32"));
        let count = b.def(format!("math.ctpop {byte} : i32"));
        let incl = b.warp_prefix_sum_i32(&count, lane);
        let l31 = b.index(WARP - 1);
        let total = b.warp_from_i32(&incl, &l31);
        let before = b.def(format!("arith.subi {incl}, {count} : i32"));
        let before = b.def(format!("arith.index_castui {before} : i32 to index"));
        let first = b.addi(&carried[1], &before);
        let first = b.addi(&base, &first);
        let cnt = b.def(format!("arith.index_castui {count} : i32 to index"));
        let eight = b.index(8);
        let k8 = b.muli(&i, &eight);
        let inner = [(carried[0].clone(), "f32".to_string()), (byte.clone(), "i32".to_string())];
        let walked = b.for_fold_typed(&zi, &cnt, 1, &inner, |b, q, acc| {
            let bits = &acc[1];
            let pos = b.def(format!("math.cttz {bits} : i32"));
            let one = b.i32(1);
            let lower = b.def(format!("arith.subi {bits}, {one} : i32"));
            let rest = b.def(format!("arith.andi {bits}, {lower} : i32"));
            let pos = b.def(format!("arith.index_castui {pos} : i32 to index"));
            let c = b.addi(&k8, &pos);
            let c = b.minui(&c, &km1);
            let p = b.addi(&first, q);
            let p = b.minui(&p, &last_value);
            let v = values.load(b, &p);
            let ai = b.addi(arow, &c);
            let x = b.load(a, &ai);
            vec![b.fma(&v, &x, &acc[0]), rest]
        });
        let total = b.def(format!("arith.index_castui {total} : i32 to index"));
        vec![walked[0].clone(), b.addi(&carried[1], &total)]
    });
    res[0].clone()
}

/// One-row calls: the weight bytes a block's outputs read, prefetched into
/// L2 before the wait for the kernel before (`prefetch_warp_block`).
fn prefetch(b: &mut KernelBuilder, fmt: &SparseFormat, ix: &Index<'_>, w: &str) {
    let (n, k) = fmt.nk();
    let lay = fmt.layout();
    let vp = fmt.value_planes();
    let ptr_plane = lay.ptr;
    let ptr_count = match *fmt {
        SparseFormat::Bsr { rows, .. } | SparseFormat::BsrQ { rows, .. } => n / rows as u64 + 1,
        _ => n + 1,
    };
    let idx_bytes: u64 = match ix.ty {
        "i8" => 1,
        "i16" => 2,
        _ => 4,
    };
    let fmt = *fmt;
    prefetch_warp_block(b, w, n, |b, j0, j1| {
        // Stored values p0..p1 and their index entries i0..i1 of outputs j0..j1.
        let (p0, p1, i0, i1) = match fmt {
            SparseFormat::Nm { .. } | SparseFormat::NmQ { .. } => {
                let per_row = b.index(fmt.stored_values() / n.max(1));
                let rb = b.index(SparseFormat::bitmap_row_bytes(k));
                (b.muli(j0, &per_row), b.muli(j1, &per_row), b.muli(j0, &rb), b.muli(j1, &rb))
            }
            SparseFormat::Csr { .. } | SparseFormat::CsrQ { .. } => {
                let ptr = b.plane(w, ptr_plane, ptr_count, "i32");
                let lo = b.load_index(&ptr, j0, "i32");
                let hi = b.load_index(&ptr, j1, "i32");
                if fmt.csr_index() == CsrIndex::Bitmap {
                    let rb = b.index(SparseFormat::bitmap_row_bytes(k));
                    let (m0, m1) = (b.muli(j0, &rb), b.muli(j1, &rb));
                    (lo, hi, m0, m1)
                } else {
                    (lo.clone(), hi.clone(), lo, hi)
                }
            }
            SparseFormat::Bsr { rows, cols, .. } | SparseFormat::BsrQ { rows, cols, .. } => {
                let ptr = b.plane(w, ptr_plane, ptr_count, "i32");
                let rc = b.index(rows as u64);
                let bi0 = b.divui(j0, &rc);
                let rm1 = b.index(rows as u64 - 1);
                let bi1 = b.addi(j1, &rm1);
                let bi1 = b.divui(&bi1, &rc);
                let lo = b.load_index(&ptr, &bi0, "i32");
                let hi = b.load_index(&ptr, &bi1, "i32");
                let bsz = b.index(rows as u64 * cols as u64);
                (b.muli(&lo, &bsz), b.muli(&hi, &bsz), lo, hi)
            }
        };
        let span = |b: &mut KernelBuilder, base: u64, unit: u64, lo: &str, hi: &str| -> (V, V) {
            let (base, unit) = (b.index(base), b.index(unit));
            let s = b.muli(lo, &unit);
            let e = b.muli(hi, &unit);
            (b.addi(&base, &s), b.addi(&base, &e))
        };
        let mut ranges = vec![span(b, lay.indices, idx_bytes, &i0, &i1)];
        match vp {
            None => ranges.push(span(b, lay.values, 4, &p0, &p1)),
            Some(vp) => {
                // Blocks of 32 values: quants, scales, minimums.
                let c32 = b.index(32);
                let c31 = b.index(31);
                let b0 = b.divui(&p0, &c32);
                let b1 = b.addi(&p1, &c31);
                let b1 = b.divui(&b1, &c32);
                let bits = fmt.bits().unwrap_or(sparsec_ir::sparse_quant::QBits::Q8);
                ranges.push(span(b, vp.q, bits.quant_bytes(), &b0, &b1));
                ranges.push(span(b, vp.d, 2, &b0, &b1));
                if vp.m < vp.end {
                    ranges.push(span(b, vp.m, 2, &b0, &b1));
                }
            }
        }
        ranges
    });
}
