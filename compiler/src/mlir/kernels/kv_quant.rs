//! Reading KV caches whose rows are block-quantized (`--kv-cache q8_0|q4_0|q4_1`,
//! CPU): each appended row of `width` values is packed on its own as
//! `sparsec_ir::quant` packs a tensor (the row's quants, then its f16 scales,
//! then for Q4_1 its f16 minimums), so row `j` starts at byte `j·row_bytes`
//! and a cache grows by whole rows. With `--kv-hadamard` the rows hold each
//! head rotated by the normalized Hadamard matrix (`hadamard` here rotates
//! queries and results alike).

use super::quant_planes::{block_values, element_value};
use super::VW;
use crate::mlir::builder::{KernelBuilder, PrefetchTo, V};
use sparsec_ir::quant::{planes, quant_bytes, QK};
use sparsec_ir::DType;

/// A quantized KV cache buffer (a byte parameter) and its row layout.
pub(super) struct QuantRows {
    dt: DType,
    /// The cache as bytes (`memref<?xi8>`).
    bytes: V,
    /// The same bytes as f16 (the scales and minimums).
    halves: V,
    row_bytes: u64,
    /// Byte offset of the scales in a row, and of the minimums.
    d_off: u64,
    m_off: u64,
}

impl QuantRows {
    /// `None` when `dt` is not a block type or `width` not a whole number of blocks.
    pub(super) fn new(b: &mut KernelBuilder, dt: DType, buf: &str, width: u64) -> Option<QuantRows> {
        let p = planes(dt, width as usize)?;
        let halves = b.f16_view(buf);
        Some(QuantRows { dt, bytes: buf.to_string(), halves, row_bytes: p.total as u64, d_off: p.d as u64, m_off: p.m as u64 })
    }

    /// Bytes of one row.
    pub(super) fn row_bytes(&self) -> u64 {
        self.row_bytes
    }

    /// The byte buffer (for prefetches).
    pub(super) fn bytes(&self) -> &str {
        &self.bytes
    }

    /// Prefetches into L2 what blocks `blk0..blk0 + n` of the row `ahead`
    /// rows on from row `row` hold: the first and last line of their quants,
    /// and the lines of their scales (and minimums), which lie in planes of
    /// their own at the row's end. `last` is the cache's last byte.
    pub(super) fn prefetch_blocks(&self, b: &mut KernelBuilder, row: &str, ahead: u64, (blk0, n): (&str, u64), last: &str) {
        let base = self.row_start(b, row);
        let qb = b.index(quant_bytes(self.dt) as u64);
        let q0 = b.muli(blk0, &qb);
        let quants = b.addi(&base, &q0);
        let ahead_bytes = ahead * self.row_bytes;
        for off in [0, n * quant_bytes(self.dt) as u64 - 1] {
            b.prefetch_ahead_to(&self.bytes, &quants, ahead_bytes + off, last, "i8", PrefetchTo::L2);
        }
        let two = b.index(2);
        let s0 = b.muli(blk0, &two);
        let scales = b.addi(&base, &s0);
        let planes = if self.dt == DType::Q4_1 { vec![self.d_off, self.m_off] } else { vec![self.d_off] };
        for off in planes {
            b.prefetch_ahead_to(&self.bytes, &scales, ahead_bytes + off, last, "i8", PrefetchTo::L2);
        }
    }

    /// Byte where row `row` starts.
    fn row_start(&self, b: &mut KernelBuilder, row: &str) -> V {
        let rb = b.index(self.row_bytes);
        b.muli(row, &rb)
    }

    /// Byte where row `row` starts, and the scale and offset of its block `blk`.
    fn block(&self, b: &mut KernelBuilder, row: &str, blk: &str) -> (V, V, Option<V>) {
        let base = self.row_start(b, row);
        let two = b.index(2);
        let hb = b.divui(&base, &two);
        let at = |b: &mut KernelBuilder, off: u64| {
            let o = b.index(off / 2);
            let i = b.addi(&hb, &o);
            b.addi(&i, blk)
        };
        let di = at(b, self.d_off);
        let d = b.load_f16(&self.halves, &di);
        let off = match self.dt {
            DType::Q4_1 => {
                let mi = at(b, self.m_off);
                Some(b.load_f16(&self.halves, &mi))
            }
            DType::Q4_0 => {
                let m8 = b.f32(-8.0);
                Some(b.mul(&d, &m8))
            }
            _ => None,
        };
        (base, d, off)
    }

    /// The 32 values of block `blk` of row `row` as two `vector<16xf32>` halves.
    pub(super) fn load_block(&self, b: &mut KernelBuilder, row: &str, blk: &str) -> (V, V) {
        let (base, d, off) = self.block(b, row, blk);
        let qb = b.index(quant_bytes(self.dt) as u64);
        let q = b.muli(blk, &qb);
        let at = b.addi(&base, &q);
        block_values(b, self.dt, &self.bytes, &at, &d, off.as_deref())
    }

    /// Value `col` of row `row`.
    pub(super) fn load(&self, b: &mut KernelBuilder, row: &str, col: &str) -> V {
        let qk = b.index(QK as u64);
        let blk = b.divui(col, &qk);
        let within = b.remui(col, &qk);
        let (base, d, off) = self.block(b, row, &blk);
        let qb = b.index(quant_bytes(self.dt) as u64);
        let q = b.muli(&blk, &qb);
        let at = b.addi(&base, &q);
        element_value(b, self.dt, &self.bytes, &at, &within, &d, off.as_deref())
    }
}

/// `x` (a head of `VW`-wide vectors, its width a power of two) multiplied by
/// the normalized Hadamard matrix, as `sparsec_ir::quant::hadamard` does on
/// the CPU side: one butterfly stage per bit of the index, across vectors for
/// the high bits and by lane shuffles within a vector for the low ones, then
/// scaled by 1/√width.
pub(super) fn hadamard(b: &mut KernelBuilder, x: &[V]) -> Vec<V> {
    let lanes = VW as usize;
    let vty = KernelBuilder::vty(VW);
    let mut v: Vec<V> = x.to_vec();
    // Within a vector: lane i pairs with lane i ^ h.
    let mut h = 1;
    while h < lanes {
        let perm: Vec<String> = (0..lanes).map(|i| (i ^ h).to_string()).collect();
        let pick: Vec<String> = (0..lanes).map(|i| if i & h == 0 { i.to_string() } else { (lanes + i).to_string() }).collect();
        for e in v.iter_mut() {
            let p = b.def(format!("vector.shuffle {e}, {e} [{}] : {vty}, {vty}", perm.join(", ")));
            let sum = b.def(format!("arith.addf {e}, {p} : {vty}"));
            let diff = b.def(format!("arith.subf {p}, {e} : {vty}"));
            *e = b.def(format!("vector.shuffle {sum}, {diff} [{}] : {vty}, {vty}", pick.join(", ")));
        }
        h *= 2;
    }
    // Across vectors: vector j pairs with vector j ^ hv.
    let mut hv = 1;
    while hv < v.len() {
        for j in 0..v.len() {
            if j & hv == 0 {
                let (a, c) = (v[j].clone(), v[j + hv].clone());
                v[j] = b.def(format!("arith.addf {a}, {c} : {vty}"));
                v[j + hv] = b.def(format!("arith.subf {a}, {c} : {vty}"));
            }
        }
        hv *= 2;
    }
    let s = b.f32(1.0 / ((x.len() * lanes) as f32).sqrt());
    let sv = b.vbroadcast(&s, VW);
    v.iter().map(|e| b.def(format!("arith.mulf {e}, {sv} : {vty}"))).collect()
}
