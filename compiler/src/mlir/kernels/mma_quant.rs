//! Block-quantized weights (Q8_0, Q4_0, Q4_1) as tensor-core operands of the
//! shared-memory tiled matmul (`mma_tiled.rs`): a k-tile of 32 is one block
//! of each weight row, so the block copies the rows' quants into shared
//! memory as they are stored; a warp reads its B fragments as the integer
//! quants themselves, made f16 exactly (a byte `u` becomes the f16 `1024 + u`
//! by a byte permute, `prmt`, that puts the exponent byte 0x64 above it;
//! then 1024, or 1152 for Q8_0's signed bytes, is subtracted); the k-tile's MMAs go to accumulators of their own, which
//! the block's scale multiplies into the sums: `Σ a·(d·q + m) = d·Σ a·q +
//! m·Σ a`, the row sums `Σ a` taken by one more MMA against a fragment of
//! ones (Q4_0's offset is `-8·d`). No weight is rounded: the products are
//! those of the activations' f16 parts and the exact quants, the scales
//! applied in f32.

use super::quant_planes::QuantPlanes;
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::DType;

/// f16 1.0 in both halves of a word: a B fragment of ones.
const ONES: i32 = 0x3C00_3C00;
/// The high byte of f16 1024, in every byte: `0x6400 | u` is `1024 + u`.
const MAGIC: i32 = 0x6464_6464;
/// `prmt` selectors (a nibble per result byte, 0-3 the source word's bytes,
/// 4 a byte of `MAGIC`): bytes 0 and 1 as the halves `0x64uu`, then 2 and 3.
const LOW_PAIR: i32 = 0x4140;
const HIGH_PAIR: i32 = 0x4342;

/// A quantized weight read by the tiled matmul: its type, its byte buffer
/// (the quants at byte 0, `sparsec_ir::quant`'s layout) and its scale planes.
pub(super) struct QuantTile<'a> {
    pub dt: DType,
    pub buf: &'a str,
    pub planes: &'a QuantPlanes,
}

impl QuantTile<'_> {
    /// Bytes of one block's quants (32 values): 32 for Q8_0, 16 for Q4.
    pub fn block_bytes(&self) -> u64 {
        sparsec_ir::quant::quant_bytes(self.dt) as u64
    }

    /// Shared-memory words of one weight row of a k-tile (its block's quants).
    pub fn row_words(&self) -> u64 {
        self.block_bytes() / 4
    }

    /// Whether the type has an offset (`x = d·q + m`), so the k-tile also
    /// needs the activations' row sums.
    pub fn has_offset(&self) -> bool {
        self.dt != DType::Q8_0
    }

    /// The word (within a row) where lane column `t` (0..4, k `8t..8t+8` of
    /// the block) finds its 8 quants, and the right shift that brings them
    /// to the low nibbles (Q4: value `k` is byte `k % 16`, high nibble from
    /// 16 on; Q8_0: byte `k`, no shift).
    pub fn lane_word(&self, b: &mut KernelBuilder, t: &str) -> (V, V) {
        let two = b.index(2);
        if self.dt == DType::Q8_0 {
            let w = b.muli(t, &two);
            let zero = b.i32(0);
            return (w, zero);
        }
        let half = b.remui(t, &two);
        let w = b.muli(&half, &two);
        let upper = b.divui(t, &two);
        let four = b.index(4);
        let sh = b.muli(&upper, &four);
        let sh = b.def(format!("arith.index_cast {sh} : index to i32"));
        (w, sh)
    }

    /// The lane's 8 quants at shared word `idx` of `ring` (8-byte aligned),
    /// as 4 words of f16 pairs (k 0-1, 2-3, 4-5, 6-7 of the 8), exact.
    pub fn fragment(&self, b: &mut KernelBuilder, ring: &str, idx: &str, shift: &str) -> Vec<V> {
        let p = b.shared_ptr(ring, idx);
        let raw = b.def(format!("llvm.load {p} {{alignment = 8 : i64}} : !llvm.ptr<3> -> vector<2xi32>"));
        let mut out = Vec::new();
        for e in 0..2 {
            let ei = b.i32(e);
            let mut x = b.def(format!("llvm.extractelement {raw}[{ei} : i32] : vector<2xi32>"));
            let bias = if self.dt == DType::Q8_0 {
                // Signed bytes biased to unsigned: q + 128.
                let flip = b.i32(0x8080_8080_u32 as i32);
                x = b.def(format!("arith.xori {x}, {flip} : i32"));
                1152.0
            } else {
                let s = b.def(format!("arith.shrui {x}, {shift} : i32"));
                let mask = b.i32(0x0F0F_0F0F);
                x = b.def(format!("arith.andi {s}, {mask} : i32"));
                1024.0
            };
            for pair in byte_pairs(b, &x) {
                out.push(biased_pair(b, &pair, bias));
            }
        }
        out
    }

    /// A B fragment register of ones (for the row sums).
    pub fn ones(b: &mut KernelBuilder) -> V {
        b.i32(ONES)
    }
}

/// The four bytes of `x` as two words, bytes 0 and 1 in the low and high
/// halves of the first, 2 and 3 of the second, each half `0x6400 | byte`:
/// one `prmt.b32` each.
fn byte_pairs(b: &mut KernelBuilder, x: &str) -> [V; 2] {
    let magic = b.i32(MAGIC);
    [LOW_PAIR, HIGH_PAIR].map(|sel| {
        let sel = b.i32(sel);
        b.def(format!("llvm.inline_asm \"prmt.b32 $0, $1, $2, $3;\", \"=r,r,r,r\" {x}, {magic}, {sel} : (i32, i32, i32) -> i32"))
    })
}

/// A word of two f16 `1024 + u` (from `byte_pairs`) minus `bias` in both
/// halves: the quants, exact (Q4: bias 1024, `u`; Q8_0: bias 1152, `u - 128`).
fn biased_pair(b: &mut KernelBuilder, w: &str, bias: f64) -> V {
    let h = b.def(format!("llvm.bitcast {w} : i32 to vector<2xf16>"));
    let c = b.def(format!("arith.constant dense<{bias:.1}> : vector<2xf16>"));
    let q = b.def(format!("arith.subf {h}, {c} : vector<2xf16>"));
    b.def(format!("llvm.bitcast {q} : vector<2xf16> to i32"))
}
