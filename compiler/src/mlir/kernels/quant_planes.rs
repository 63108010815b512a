//! Reading block-quantized operands (Q8_0, Q4_0, Q4_1 packed as
//! `sparsec_ir::quant` lays them out): one element, or a whole block of 32 as
//! vectors, dequantized to f32.

use super::VQ;
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::DType;

/// The f16 planes of a packed quantized tensor (`sparsec_ir::quant`) and the
/// scalar read of one element, for kernels that touch few elements.
pub(in crate::mlir) struct QuantPlanes {
    dt: DType,
    d: V,
    m: Option<V>,
}

impl QuantPlanes {
    pub(in crate::mlir) fn new(b: &mut KernelBuilder, dt: DType, buf: &str, numel: u64) -> QuantPlanes {
        let p = sparsec_ir::quant::planes(dt, numel as usize).unwrap_or(sparsec_ir::quant::Planes { blocks: 0, d: 0, m: 0, total: 0 });
        let d = b.f16_plane(buf, p.d as u64, p.blocks as u64);
        let m = (dt == DType::Q4_1).then(|| b.f16_plane(buf, p.m as u64, p.blocks as u64));
        QuantPlanes { dt, d, m }
    }

    /// The block type (Q8_0, Q4_0 or Q4_1).
    pub(in crate::mlir) fn dtype(&self) -> DType {
        self.dt
    }

    /// The scale and the offset of block `blk`: x = scale·q + offset.
    pub(in crate::mlir) fn scale_offset(&self, b: &mut KernelBuilder, blk: &str) -> (V, Option<V>) {
        self.scales_offsets(b, blk, None)
    }

    /// Scales and offsets of blocks `blk..blk + width` as `vector<width x f32>`
    /// (one load and one widening each), or of block `blk` alone as scalars
    /// (`width` `None`).
    pub(in crate::mlir) fn scales_offsets(&self, b: &mut KernelBuilder, blk: &str, width: Option<u32>) -> (V, Option<V>) {
        let load = |b: &mut KernelBuilder, plane: &str| match width {
            Some(w) => b.vload_f16(plane, blk, w),
            None => b.load_f16(plane, blk),
        };
        let d = load(b, &self.d);
        let off = match (self.dt, &self.m) {
            (DType::Q4_1, Some(m)) => Some(load(b, m)),
            (DType::Q4_0, _) => {
                let m8 = b.f32(-8.0);
                Some(match width {
                    Some(w) => {
                        let m8 = b.vbroadcast(&m8, w);
                        b.def(format!("arith.mulf {d}, {m8} : {}", KernelBuilder::vty(w)))
                    }
                    None => b.mul(&d, &m8),
                })
            }
            _ => None,
        };
        (d, off)
    }

    /// Element `flat` (row-major over the logical shape), dequantized.
    pub(super) fn load(&self, b: &mut KernelBuilder, buf: &str, flat: &str) -> V {
        let qk = b.index(sparsec_ir::quant::QK as u64);
        let blk = b.divui(flat, &qk);
        let within = b.remui(flat, &qk);
        let (d, off) = self.scale_offset(b, &blk);
        let qb = b.index(sparsec_ir::quant::quant_bytes(self.dt) as u64);
        let at = b.muli(&blk, &qb);
        element_value(b, self.dt, buf, &at, &within, &d, off.as_deref())
    }

    /// The 32 values of block `blk` as two `vector<16xf32>` halves (CPU).
    pub(super) fn load_block(&self, b: &mut KernelBuilder, buf: &str, blk: &str) -> (V, V) {
        let (d, off) = self.scale_offset(b, blk);
        let qb = b.index(sparsec_ir::quant::quant_bytes(self.dt) as u64);
        let at = b.muli(blk, &qb);
        block_values(b, self.dt, buf, &at, &d, off.as_deref())
    }
}

/// Value `within` (0..32) of the block whose quants start at byte `at` of
/// `buf`, with scale `d` and offset `off` (`x = d·q + off`), as f32.
pub(super) fn element_value(b: &mut KernelBuilder, dt: DType, buf: &str, at: &str, within: &str, d: &str, off: Option<&str>) -> V {
    let q = if dt == DType::Q8_0 {
        let i = b.addi(at, within);
        b.load_byte(buf, &i, true)
    } else {
        let half = b.index(16);
        let lo = b.remui(within, &half);
        let i = b.addi(at, &lo);
        let byte = b.load_byte(buf, &i, false);
        let is_hi = b.def(format!("arith.cmpi uge, {within}, {half} : index"));
        let four = b.i32(4);
        let fifteen = b.i32(15);
        let hi = b.def(format!("arith.shrui {byte}, {four} : i32"));
        let lo = b.def(format!("arith.andi {byte}, {fifteen} : i32"));
        b.def(format!("arith.select {is_hi}, {hi}, {lo} : i32"))
    };
    let qf = b.def(format!("arith.sitofp {q} : i32 to f32"));
    match off {
        Some(o) => b.fma(&qf, d, o),
        None => b.mul(&qf, d),
    }
}

/// The 32 values of the block whose quants start at byte `at` of `buf`, with
/// scale `d` and offset `off`, as two `vector<16xf32>` halves (CPU).
pub(super) fn block_values(b: &mut KernelBuilder, dt: DType, buf: &str, at: &str, d: &str, off: Option<&str>) -> (V, V) {
    let vf = KernelBuilder::vty(VQ);
    let (qlo, qhi) = if dt == DType::Q8_0 {
        let sixteen = b.index(16);
        let at2 = b.addi(at, &sixteen);
        let lo = b.vload_bytes(buf, at, VQ);
        let hi = b.vload_bytes(buf, &at2, VQ);
        let lo = b.def(format!("arith.extsi {lo} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
        let hi = b.def(format!("arith.extsi {hi} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
        (lo, hi)
    } else {
        let (lo, hi) = nibbles(b, buf, at);
        let lo = b.def(format!("arith.extui {lo} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
        let hi = b.def(format!("arith.extui {hi} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
        (lo, hi)
    };
    let dv = b.vbroadcast(d, VQ);
    let ov = off.map(|o| b.vbroadcast(o, VQ));
    let deq = |b: &mut KernelBuilder, q: &str| {
        let f = b.def(format!("arith.sitofp {q} : vector<{VQ}xi32> to {vf}"));
        match &ov {
            Some(o) => b.vfma(&f, &dv, o, VQ),
            None => b.def(format!("arith.mulf {f}, {dv} : {vf}")),
        }
    };
    let lo = deq(b, &qlo);
    let hi = deq(b, &qhi);
    (lo, hi)
}

/// The 16 bytes of a Q4 block at byte `at` of `buf`, split into its low
/// nibbles (values 0..16) and high nibbles (values 16..32) as `vector<16xi8>`.
pub(in crate::mlir) fn nibbles(b: &mut KernelBuilder, buf: &str, at: &str) -> (V, V) {
    let v = b.vload_bytes(buf, at, 16);
    let mask = b.vsplat_int(15, 16, "i8");
    let four = b.vsplat_int(4, 16, "i8");
    let lo = b.def(format!("arith.andi {v}, {mask} : vector<16xi8>"));
    let hi = b.def(format!("arith.shrui {v}, {four} : vector<16xi8>"));
    (lo, hi)
}
