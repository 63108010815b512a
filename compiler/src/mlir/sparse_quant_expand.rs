//! The AVX-512 CPU kernel for sparse weights indexed by a per-row bitmap with
//! kept values stored quantized (`CsrQ` in its bitmap form and `NmQ`, q4 or
//! q8, `generic` level, `k` a multiple of 16): values expanded into place,
//! f32 activations. (AVX2 targets pack the activations instead:
//! `sparse_quant_bitmap.rs`.)
//!
//! A group of `ROWS_AHEAD` weight rows is done at once. First each row's
//! whole value blocks are dequantized into its stack buffer in stored order
//! (`sparse_quant::slot` undone by one byte shuffle, `d·q + m` / `d·q` sixteen
//! lanes at a time, the row's first value at its offset inside its first
//! block). Then the rows walk their `k` positions together, 16 a step: each
//! row's two bitmap bytes are the mask of one `vexpandps` that moves the row's
//! next values from its buffer into the lanes of its kept positions (zeros
//! elsewhere), a running count (`popcnt`) advances the row's cursor, and one
//! FMA per activation row multiplies the expanded values with the contiguous
//! activations, which every weight row of the group shares. Two sums per
//! output (even and odd steps) halve the FMA chain. A prefill row block of
//! `rb` activation rows shares every dequantized and expanded value.
//!
//! Validation (`sparsec_ir::sparse::validate`) guarantees that a row's
//! pointers (N:M: its fixed count) equal its bitmap's count and that no bit is
//! set past `k`, so a row's blocks fit its buffer (`k` + 64 floats) and the
//! expansions read only the row's values.

use super::builder::{KernelBuilder, V};
use super::kernels::{column_groups, row_block, strided, unit_origin, UnitOrder};
use super::sparse_kernels::SparseMatmul;
use super::sparse_quant_bitmap::{block_values, nm_per_row, row_blocks, RowBlocks};
use super::sparse_quant_kernels::QPlanes;
use sparsec_ir::sparse::SparseFormat;
use sparsec_ir::sparse_quant::QB;

/// f32 lanes of a step: one `vexpandps` under 16 bitmap bits.
pub(super) const LANES: u64 = 16;
/// Outputs per CPU unit (as `sparse_kernels.rs`).
const COLS: u64 = 32;
/// Weight rows expanded together (they share each activation load).
const ROWS_AHEAD: u64 = 2;

/// Floats of one weight row's buffer: its blocks span at most `k` values plus
/// the offset of its first value (< 32) rounded up to whole blocks.
fn buffer_len(k: u64) -> u64 {
    k + 2 * QB as u64
}

/// What the kernel's parts share.
struct Ctx<'a> {
    planes: &'a QPlanes,
    a: &'a str,
    out: &'a str,
    /// Dequantized values: `ROWS_AHEAD` buffers of `buffer_len(k)` floats.
    vals: V,
    n: u64,
    k: u64,
    /// N:M: the stored values of every row (its pointers implicit); CSR: `None`.
    per_row: Option<u64>,
}

/// Emits the kernel (see the module doc): `ins[0]` the activations, `ins[1]` the packed weight.
pub(super) fn emit_bitmap_q_expand(b: &mut KernelBuilder, t: &SparseMatmul, planes: &QPlanes, ins: &[V], out: &str) {
    let (n, k) = t.nk();
    let len = b.index(ROWS_AHEAD * buffer_len(k));
    let vals = b.alloca_f32(&len);
    let ctx = Ctx { planes, a: &ins[0], out, vals, n, k, per_row: nm_per_row(t) };
    let (units, ct, rbc, rows) = t.cpu_grid(b);
    let (colsc, nc) = (b.index(COLS), b.index(n));
    let rb = t.rb();
    b.parallel(&units, |b, u| {
        let (r0, j0, j_end) = unit_origin(b, u, UnitOrder::RowMajor { ct: &ct }, &rbc, &colsc, &nc);
        row_block(b, rb, &r0, &rbc, &rows, &|b, r, nr| {
            column_groups(b, &j0, &j_end, ROWS_AHEAD, &|b, j, ncols| ctx.rows(b, r, nr, j, ncols));
        });
    });
}

/// One weight row of a group: its first row index, where its values start in
/// its buffer, where its bitmap starts.
struct Row {
    j: V,
    start: V,
    bits: V,
}

impl Ctx<'_> {
    /// Outputs of activation rows `r..+nr` × weight rows `j..+ncols`.
    fn rows(&self, b: &mut KernelBuilder, r: &str, nr: u64, j: &str, ncols: u64) {
        let rbytes = b.index(SparseFormat::bitmap_row_bytes(self.k));
        let group: Vec<Row> = (0..ncols)
            .map(|cc| {
                let cci = b.index(cc);
                let jj = b.addi(j, &cci);
                let rbk = row_blocks(b, self.planes, self.per_row, &jj);
                let base = b.index(cc * buffer_len(self.k));
                self.dequantize(b, &rbk, &base);
                let start = b.addi(&base, &rbk.o0);
                let bits = b.muli(&jj, &rbytes);
                Row { j: jj, start, bits }
            })
            .collect();
        let kc = b.index(self.k);
        let arows = strided(b, r, nr, &kc);
        let sums = self.expand_dot(b, &group, &arows);
        let nc = b.index(self.n);
        let orows = strided(b, r, nr, &nc);
        for (cc, row) in group.iter().enumerate() {
            for (ri, orow) in orows.iter().enumerate() {
                let o = b.addi(orow, &row.j);
                b.store_result(&sums[ri * group.len() + cc], self.out, &o);
            }
        }
    }

    /// Dequantizes the row's blocks `b0..b1` into the buffer from `base`, in stored order.
    fn dequantize(&self, b: &mut KernelBuilder, rbk: &RowBlocks, base: &str) {
        let qb = b.index(QB as u64);
        b.for_each(&rbk.b0, &rbk.b1, |b, blk| {
            let rel = b.def(format!("arith.subi {blk}, {} : index", rbk.b0));
            let off = b.muli(&rel, &qb);
            let off = b.addi(base, &off);
            for (h, w) in (0..).zip(block_values(b, self.planes, blk, LANES)) {
                let hi = b.index(h * LANES);
                let at = b.addi(&off, &hi);
                b.vstore(&w, &self.vals, &at, LANES as u32);
            }
        });
    }

    /// Step `st` (positions `16·st..+16`, bitmap bytes `2·st..+2` of each
    /// row): returns the rows' advanced cursors; FMAs into `accs` (activation
    /// row major, `group.len()` a row).
    fn step(&self, b: &mut KernelBuilder, group: &[Row], arows: &[V], st: &str, cursors: &[V], accs: &mut [V]) -> Vec<V> {
        let lanes = b.index(LANES);
        let pos = b.muli(st, &lanes);
        let sb = b.index(LANES / 8);
        let byte = b.muli(st, &sb);
        let xs: Vec<V> = arows
            .iter()
            .map(|ar| {
                let at = b.addi(ar, &pos);
                b.vload(self.a, &at, LANES as u32)
            })
            .collect();
        let mut next = Vec::with_capacity(group.len());
        for (cc, (row, cur)) in group.iter().zip(cursors).enumerate() {
            let mi = b.addi(&row.bits, &byte);
            let (w, word) = b.expand16(&self.planes.idx, &mi, &self.vals, cur);
            let c = b.def(format!("math.ctpop {word} : i16"));
            let c = b.def(format!("arith.index_castui {c} : i16 to index"));
            next.push(b.addi(cur, &c));
            for (ri, x) in xs.iter().enumerate() {
                let acc = &mut accs[ri * group.len() + cc];
                *acc = b.vfma(&w, x, acc, LANES as u32);
            }
        }
        next
    }

    /// The sums of every (activation row, weight row) pair, activation row major.
    fn expand_dot(&self, b: &mut KernelBuilder, group: &[Row], arows: &[V]) -> Vec<V> {
        let vty = KernelBuilder::vty(LANES as u32);
        let vz = b.vzero(LANES as u32);
        let pairs = arows.len() * group.len();
        let steps = self.k / LANES;
        let mut init: Vec<(V, String)> = (0..2 * pairs).map(|_| (vz.clone(), vty.clone())).collect();
        init.extend(group.iter().map(|row| (row.start.clone(), "index".to_string())));
        let zero = b.index(0);
        let pair_end = b.index(steps / 2);
        // Steps two at a time: even steps into the first sums, odd into the second.
        let carried = b.for_fold_typed(&zero, &pair_end, 1, &init, |b, p, carried| {
            let (mut even, rest) = (carried[..pairs].to_vec(), &carried[pairs..]);
            let (mut odd, cursors) = (rest[..pairs].to_vec(), &rest[pairs..]);
            let mut cursors = cursors.to_vec();
            for (half, accs) in [&mut even, &mut odd].into_iter().enumerate() {
                let s = b.index(2);
                let st = b.muli(p, &s);
                let hi = b.index(half as u64);
                let st = b.addi(&st, &hi);
                cursors = self.step(b, group, arows, &st, &cursors, accs);
            }
            let mut next = even;
            next.extend(odd);
            next.extend(cursors);
            next
        });
        let mut sums: Vec<V> = (0..pairs).map(|i| b.def(format!("arith.addf {}, {} : {vty}", carried[i], carried[pairs + i]))).collect();
        if steps % 2 == 1 {
            let last = b.index(steps - 1);
            let cursors = carried[2 * pairs..].to_vec();
            self.step(b, group, arows, &last, &cursors, &mut sums);
        }
        sums.iter().map(|s| b.vsum(s, LANES as u32)).collect()
    }
}
