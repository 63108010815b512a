//! Reading 16-bit float operands (f16 and bf16 weights, packed as 2-byte
//! values): one element widened to f32, or `n` consecutive elements from one
//! load, widened to a `vector<nxf32>` (the CPU's tiled matmul: 8 or 16 lanes
//! as the target has; the NVPTX warp dot: 8, one 16-byte load).

use crate::mlir::builder::{Device, KernelBuilder, V};
use sparsec_ir::DType;

/// Elements one 16-byte load reads (NVPTX's widest).
pub(in crate::mlir) const HALF_VEC: u32 = 8;

/// A byte buffer of `numel` f16 or bf16 values, viewed as i16 words.
pub(in crate::mlir) struct HalfPlane {
    bf16: bool,
    words: V,
}

impl HalfPlane {
    /// `None` unless `dt` is f16 or bf16.
    pub(in crate::mlir) fn new(b: &mut KernelBuilder, dt: DType, buf: &str, numel: u64) -> Option<HalfPlane> {
        let bf16 = match dt {
            DType::F16 => false,
            DType::BF16 => true,
            DType::F32 | DType::I32 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => return None,
        };
        Some(HalfPlane { bf16, words: b.plane(buf, 0, numel, "i16") })
    }

    /// Element `flat`, as f32.
    pub(in crate::mlir) fn load(&self, b: &mut KernelBuilder, flat: &str) -> V {
        let raw = b.load_elem(&self.words, flat, "i16");
        self.widen(b, &raw, None)
    }

    /// Elements `flat .. flat + n` as `vector<nxf32>` (on the CPU one load of
    /// `2n` bytes widened in registers: `vcvtph2ps` for f16, a shift for
    /// bf16). On NVPTX `n` is `HALF_VEC` and `flat` a multiple of it (the
    /// buffer's base is 16-byte aligned).
    pub(in crate::mlir) fn vload(&self, b: &mut KernelBuilder, flat: &str, n: u32) -> V {
        debug_assert!(b.device() == Device::Cpu || n == HALF_VEC, "NVPTX reads 16 bytes at a time");
        let raw = match b.device() {
            Device::Cpu => b.def(format!("vector.load {}[{flat}] : memref<?xi16>, vector<{n}xi16>", self.words)),
            Device::Nvptx => {
                let i = b.def(format!("arith.index_cast {flat} : index to i64"));
                let p = b.def(format!("llvm.getelementptr inbounds {}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, i16", self.words));
                b.def(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr -> vector<{n}xi16>"))
            }
        };
        self.widen(b, &raw, Some(n))
    }

    /// The plane of the raw 16-bit words (for `cp_async16` copies).
    pub(in crate::mlir) fn words(&self) -> &str {
        &self.words
    }

    /// The PTX type of the plane's values as an MMA operand: `f16` or `bf16`.
    pub(in crate::mlir) fn mma_type(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "f16"
        }
    }

    /// f16: reinterpret and extend; bf16: the word is the top half of an f32.
    /// A scalar, or a vector of `width` lanes.
    fn widen(&self, b: &mut KernelBuilder, raw: &str, width: Option<u32>) -> V {
        let ty = |e: &str| match width {
            Some(n) => format!("vector<{n}x{e}>"),
            None => e.to_string(),
        };
        if self.bf16 {
            let wide = b.def(format!("arith.extui {raw} : {} to {}", ty("i16"), ty("i32")));
            let sixteen = match width {
                Some(n) => b.vsplat_int(16, n, "i32"),
                None => b.i32(16),
            };
            let bits = b.def(format!("arith.shli {wide}, {sixteen} : {}", ty("i32")));
            b.def(format!("arith.bitcast {bits} : {} to {}", ty("i32"), ty("f32")))
        } else {
            let h = b.def(format!("arith.bitcast {raw} : {} to {}", ty("i16"), ty("f16")));
            b.def(format!("arith.extf {h} : {} to {}", ty("f16"), ty("f32")))
        }
    }
}
