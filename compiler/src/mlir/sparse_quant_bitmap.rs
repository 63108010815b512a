//! The CPU kernel for sparse weights indexed by a per-row bitmap with kept
//! values stored quantized (`CsrQ` in its bitmap form and `NmQ`, q4 or q8,
//! `generic` level, `k` a multiple of 8): vectorized, f32 activations. (2:4
//! q4 with int8 activations has its own kernel in `sparse_quant_kernels.rs`.)
//!
//! For each weight row `j` and each activation row, the activations at the
//! row's kept positions are first packed in the row's stored order into a
//! stack buffer: per bitmap byte, one `vpermps` whose control (from a 256-entry
//! table) moves the activations of the set bits to the front, stored at the
//! running count (overlapping stores). The buffer starts at the row's offset
//! inside its first value block and is zero before and after the row's values,
//! so the dot product runs over whole blocks of 32 stored values: each block's
//! quants are put back in stored order (`sparse_quant::slot` undone by one
//! byte shuffle), widened to f32 eight at a time, dequantized (`d·q + m`,
//! `d·q`) and multiplied with the packed activations. A prefill row block packs
//! each of its rows once per weight row and shares every dequantized block.
//!
//! Validation (`sparsec_ir::sparse::validate`) guarantees that a row's
//! pointers (N:M: its fixed count) equal its bitmap's count and that no bit is
//! set past `k`, so the
//! packed buffer (`k` + 72 floats a row) bounds every store and load.

use super::builder::{KernelBuilder, V};
use super::kernels::{column_groups, nibbles, row_block, strided, unit_origin, UnitOrder};
use super::sparse_kernels::SparseMatmul;
use super::sparse_quant_kernels::QPlanes;
use sparsec_ir::sparse::SparseFormat;
use sparsec_ir::sparse_quant::{slot, QBits, QB};

/// f32 lanes of a vector.
const VW: u64 = 8;
/// Outputs per CPU unit (as `sparse_kernels.rs`).
const COLS: u64 = 32;
/// Floats of the packed activations of one row: a block's worth of zeros
/// before, `k` values, a block of zeros after, and the last store's slack.
fn packed_len(k: u64) -> u64 {
    QB as u64 + k + QB as u64 + VW
}

/// For each bitmap byte, lane `l` (below the byte's count) holds the position of its `l`-th set bit.
fn compress_table() -> Vec<i32> {
    (0..256u32)
        .flat_map(|m| {
            let set: Vec<i32> = (0..VW as i32).filter(|i| m & (1 << i) != 0).collect();
            (0..VW as usize).map(move |l| set.get(l).copied().unwrap_or(0))
        })
        .collect()
}

/// The slot of each of a block's 32 quants in stored order, as `vector.shuffle`
/// indices into the block's slots (q4: its low nibbles, then its high ones).
fn stored_order() -> String {
    (0..QB).map(|t| slot(t).to_string()).collect::<Vec<_>>().join(", ")
}

/// Weight rows packed before any of them is multiplied (the packing's
/// overlapping stores drain while the other row packs).
const ROWS_AHEAD: u64 = 2;

/// What the kernel's parts share.
struct Ctx<'a> {
    planes: &'a QPlanes,
    a: &'a str,
    out: &'a str,
    /// Packed activations: `rb × ROWS_AHEAD` buffers of `packed_len(k)` floats.
    xk: V,
    lut: V,
    n: u64,
    k: u64,
    /// N:M: the stored values of every row (its pointers implicit); CSR: `None`.
    per_row: Option<u64>,
}

/// Emits the kernel (see the module doc): `ins[0]` the activations, `ins[1]` the packed weight.
pub(super) fn emit_csr_bitmap_q(b: &mut KernelBuilder, t: &SparseMatmul, planes: &QPlanes, ins: &[V], out: &str) {
    let (n, k) = t.nk();
    let rb = t.rb();
    let xk_len = b.index(rb * ROWS_AHEAD * packed_len(k));
    let xk = b.alloca_f32(&xk_len);
    let lut = b.i32_table("csr_compress", &compress_table());
    let per_row = nm_per_row(t);
    let ctx = Ctx { planes, a: &ins[0], out, xk, lut, n, k, per_row };
    let (units, ct, rbc, rows) = t.cpu_grid(b);
    let (colsc, nc) = (b.index(COLS), b.index(n));
    b.parallel(&units, |b, u| {
        let (r0, j0, j_end) = unit_origin(b, u, UnitOrder::RowMajor { ct: &ct }, &rbc, &colsc, &nc);
        row_block(b, rb, &r0, &rbc, &rows, &|b, r, nr| {
            column_groups(b, &j0, &j_end, ROWS_AHEAD, &|b, j, ncols| ctx.rows(b, r, nr, j, ncols));
        });
    });
}

/// Where weight row `j`'s values lie: its first block, the offset of its first
/// value in that block, and the block after its last.
pub(super) struct RowBlocks {
    pub(super) b0: V,
    pub(super) o0: V,
    pub(super) b1: V,
}

/// Where weight row `j`'s values lie. `per_row`: N:M's fixed count of stored
/// values a row (its pointers implicit); `None`: CSR, read from the pointers.
pub(super) fn row_blocks(b: &mut KernelBuilder, planes: &QPlanes, per_row: Option<u64>, j: &str) -> RowBlocks {
    let (lo, hi) = match per_row {
        Some(per_row) => {
            let c = b.index(per_row);
            let lo = b.muli(j, &c);
            let hi = b.addi(&lo, &c);
            (lo, hi)
        }
        None => {
            let ptr = planes.ptr.clone().unwrap_or_default();
            let lo = b.load_index(&ptr, j, "i32");
            let one = b.index(1);
            let j1 = b.addi(j, &one);
            (lo, b.load_index(&ptr, &j1, "i32"))
        }
    };
    let qb = b.index(QB as u64);
    let b0 = b.divui(&lo, &qb);
    let first = b.muli(&b0, &qb);
    let o0 = b.def(format!("arith.subi {lo}, {first} : index"));
    let qb_m1 = b.index(QB as u64 - 1);
    let hi_up = b.addi(&hi, &qb_m1);
    let b1 = b.divui(&hi_up, &qb);
    RowBlocks { b0, o0, b1 }
}

/// The stored values a row of an N:M weight has (its pointers implicit); `None` for CSR.
pub(super) fn nm_per_row(t: &SparseMatmul) -> Option<u64> {
    match t.storage.format {
        SparseFormat::NmQ { .. } => Some(t.storage.format.stored_values() / t.nk().0.max(1)),
        _ => None,
    }
}

impl Ctx<'_> {
    /// The packed buffer of activation row `ri` for weight row `cc` of a group.
    fn slot(&self, b: &mut KernelBuilder, ri: u64, cc: u64) -> V {
        b.index((ri * ROWS_AHEAD + cc) * packed_len(self.k))
    }

    /// Outputs of activation rows `r..+nr` × weight rows `j..+ncols`.
    fn rows(&self, b: &mut KernelBuilder, r: &str, nr: u64, j: &str, ncols: u64) {
        let kc = b.index(self.k);
        let arows = strided(b, r, nr, &kc);
        let groups: Vec<(V, RowBlocks)> = (0..ncols)
            .map(|cc| {
                let cci = b.index(cc);
                let jj = b.addi(j, &cci);
                let rbk = row_blocks(b, self.planes, self.per_row, &jj);
                for (ri, ar) in arows.iter().enumerate() {
                    let sl = self.slot(b, ri as u64, cc);
                    self.pack(b, &jj, ar, &sl, &rbk.o0);
                }
                (jj, rbk)
            })
            .collect();
        let nc = b.index(self.n);
        let orows = strided(b, r, nr, &nc);
        for (cc, (jj, rbk)) in groups.iter().enumerate() {
            let slots: Vec<V> = (0..nr).map(|ri| self.slot(b, ri, cc as u64)).collect();
            let sums = self.dot(b, rbk, &slots);
            for (y, orow) in sums.iter().zip(&orows) {
                let o = b.addi(orow, jj);
                b.store_result(y, self.out, &o);
            }
        }
    }

    /// Packs the activations at weight row `j`'s kept positions from `ar`
    /// into the buffer at `sl`, from offset `o0`, zeros around them.
    fn pack(&self, b: &mut KernelBuilder, j: &str, ar: &str, sl: &str, o0: &str) {
        let vty = KernelBuilder::vty(VW as u32);
        let vz = b.vzero(VW as u32);
        for z in (0..QB as u64).step_by(VW as usize) {
            let zi = b.index(z);
            let at = b.addi(sl, &zi);
            b.vstore(&vz, &self.xk, &at, VW as u32);
        }
        let (zero, bytes) = (b.index(0), b.index(self.k / 8));
        let mrow = b.muli(j, &bytes);
        let start = b.addi(sl, o0);
        let init = [(start, "index".to_string())];
        let end = b.for_fold_typed(&zero, &bytes, 1, &init, |b, i, carried| {
            let mi = b.addi(&mrow, i);
            let byte = b.load_elem(&self.planes.idx, &mi, "i8");
            let bi = b.def(format!("arith.index_castui {byte} : i8 to index"));
            let vw = b.index(VW);
            let ti = b.muli(&bi, &vw);
            let ctrl = b.def(format!("vector.load {}[{ti}] : memref<{}xi32>, vector<{VW}xi32>", self.lut, 256 * VW));
            let k0 = b.muli(i, &vw);
            let xat = b.addi(ar, &k0);
            let x = b.vload(self.a, &xat, VW as u32);
            let packed = b.def(format!("llvm.call_intrinsic \"llvm.x86.avx2.permps\"({x}, {ctrl}) : ({vty}, vector<{VW}xi32>) -> {vty}"));
            b.vstore(&packed, &self.xk, &carried[0], VW as u32);
            let c = b.def(format!("math.ctpop {byte} : i8"));
            let c = b.def(format!("arith.index_castui {c} : i8 to index"));
            vec![b.addi(&carried[0], &c)]
        });
        // Zeros after the row's values, to its last block's end.
        for z in (0..QB as u64).step_by(VW as usize) {
            let zi = b.index(z);
            let at = b.addi(&end[0], &zi);
            b.vstore(&vz, &self.xk, &at, VW as u32);
        }
    }

    /// One weight row's sums for the packed buffers `slots` (one per
    /// activation row), over its whole blocks, each dequantized once.
    fn dot(&self, b: &mut KernelBuilder, rbk: &RowBlocks, slots: &[V]) -> Vec<V> {
        let vty = KernelBuilder::vty(VW as u32);
        let vz = b.vzero(VW as u32);
        let qb = b.index(QB as u64);
        let init: Vec<(V, String)> = (0..slots.len() * 2).map(|_| (vz.clone(), vty.clone())).collect();
        let sums = b.for_fold_typed(&rbk.b0, &rbk.b1, 1, &init, |b, blk, accs| {
            let rel = b.def(format!("arith.subi {blk}, {} : index", rbk.b0));
            let xoff = b.muli(&rel, &qb);
            let ws = block_values(b, self.planes, blk, VW);
            let mut next = accs.to_vec();
            for (c, w) in (0..).zip(&ws) {
                let ci = b.index(c * VW);
                let off = b.addi(&xoff, &ci);
                for (ri, sl) in slots.iter().enumerate() {
                    let at = b.addi(sl, &off);
                    let x = b.vload(&self.xk, &at, VW as u32);
                    // Two sums per row: alternate chunks, half the FMA chain.
                    let acc = 2 * ri + (c as usize % 2);
                    next[acc] = b.vfma(w, &x, &next[acc], VW as u32);
                }
            }
            next
        });
        (0..slots.len())
            .map(|ri| {
                let both = b.def(format!("arith.addf {}, {} : {vty}", sums[2 * ri], sums[2 * ri + 1]));
                b.vsum(&both, VW as u32)
            })
            .collect()
    }
}

/// Block `blk`'s 32 values in stored order, dequantized (`d·q + m` for q4,
/// `d·q` for q8), as `32 / width` vectors of `width` f32.
pub(super) fn block_values(b: &mut KernelBuilder, planes: &QPlanes, blk: &str, width: u64) -> Vec<V> {
    let vty = KernelBuilder::vty(width as u32);
    let q = block_quants(b, planes, blk);
    let d = b.load_f16(&planes.d, blk);
    let dv = b.vbroadcast(&d, width as u32);
    let mv = planes.m.as_ref().map(|m| {
        let m = b.load_f16(m, blk);
        b.vbroadcast(&m, width as u32)
    });
    (0..QB as u64 / width)
        .map(|c| {
            let lanes: Vec<String> = (c * width..(c + 1) * width).map(|i| i.to_string()).collect();
            let qc = b.def(format!("vector.shuffle {q}, {q} [{}] : vector<32xi8>, vector<32xi8>", lanes.join(", ")));
            let ity = format!("vector<{width}xi32>");
            match (planes.bits, &mv) {
                (QBits::Q4, Some(mv)) => {
                    let qi = b.def(format!("arith.extui {qc} : vector<{width}xi8> to {ity}"));
                    let qf = b.def(format!("arith.uitofp {qi} : {ity} to {vty}"));
                    b.vfma(&qf, &dv, mv, width as u32)
                }
                _ => {
                    let qi = b.def(format!("arith.extsi {qc} : vector<{width}xi8> to {ity}"));
                    let qf = b.def(format!("arith.sitofp {qi} : {ity} to {vty}"));
                    b.def(format!("arith.mulf {qf}, {dv} : {vty}"))
                }
            }
        })
        .collect()
}

/// Block `blk`'s 32 quants in stored order, as `vector<32xi8>` (q4: 0..=15; q8: signed).
fn block_quants(b: &mut KernelBuilder, planes: &QPlanes, blk: &str) -> V {
    let order = stored_order();
    match planes.bits {
        QBits::Q4 => {
            let c16 = b.index(16);
            let at = b.muli(blk, &c16);
            let (lo, hi) = nibbles(b, &planes.q, &at);
            b.def(format!("vector.shuffle {lo}, {hi} [{order}] : vector<16xi8>, vector<16xi8>"))
        }
        QBits::Q8 => {
            let c32 = b.index(QB as u64);
            let at = b.muli(blk, &c32);
            let v = b.vload_bytes(&planes.q, &at, 32);
            b.def(format!("vector.shuffle {v}, {v} [{order}] : vector<32xi8>, vector<32xi8>"))
        }
    }
}
