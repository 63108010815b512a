//! One kernel per compute op, written against `KernelBuilder`: the lowering of
//! every IR op to MLIR. Buffers are flat f32 arrays; shapes are baked in except
//! `seq`, which arrives at run time.

use super::builder::{Device, KernelBuilder, V};
use super::math;
use super::sparse_kernels::{emit_sparse_matmul, SparseMatmul};
use super::quant_dot::emit_int8_matmul;
use super::sparse_unrolled::emit_unrolled_matmul;
use crate::error::CompileError;
use sparsec_ir::{DType, Op, Pattern, SymSize, TensorType, Window};

/// Lanes of the CPU vector kernels (AVX2: 8 × f32).
const VW: u32 = 8;
/// How far ahead of its loads the f32 GEMV prefetches its weight rows.
const GEMV_PREFETCH_FLOATS: u64 = 2048;
/// Lanes of the quantized CPU kernels: half a block of 32 per vector.
const VQ: u32 = 16;
/// Rows of `seq` per CPU matmul unit: the GEMM micro-kernel's rows.
const MM_ROWS: u64 = 4;
/// Weight rows (output columns) per CPU matmul unit.
pub(super) const MM_COLS: u64 = 32;
/// f32 weights above this size (an LM head) are tiled column-major: prefill
/// would otherwise stream them from memory once per block of 4 rows.
const COL_MAJOR_WEIGHT_BYTES: u64 = 16 << 20;

/// How a CPU matmul with a transposed `[N, K]` weight is tiled: units are
/// (row block, column block) pairs; a full row block runs a register-blocked
/// micro-kernel of `rb` rows, ragged rows one at a time. Prefill is the GEMM
/// case (`rb` rows share each weight load), decode the GEMV case (one row).
#[derive(Clone, Copy, Debug)]
pub(super) struct TiledMatmul {
    pub k: u64,
    pub n: u64,
    pub rows: SymSize,
    /// Rows per unit: `MM_ROWS` when the rows are exactly `seq`, else 1.
    pub rb: u64,
    pub col_tiles: u64,
    /// The weight's block-quantized type, if any.
    pub quant: Option<DType>,
}

/// A tiled matmul's counts as index values: column tiles, rows, rows per
/// block, row blocks, and units (row blocks × column tiles).
pub(super) struct TileCounts {
    pub ct: V,
    pub rows: V,
    pub rbc: V,
    pub row_blocks: V,
    pub units: V,
}

impl TiledMatmul {
    pub(super) fn counts(&self, b: &mut KernelBuilder) -> TileCounts {
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

/// What a kernel computes: the op, its operand types and its result type.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub name: String,
    pub op: Op,
    pub operands: Vec<TensorType>,
    pub result: TensorType,
    /// The op's patterns (attention windows, ...).
    pub patterns: Vec<Pattern>,
    /// A matmul over a pruned weight: the specialization chosen and its storage.
    pub sparse: Option<crate::sparse_select::SparseChoice>,
    /// An add fused into a matmul's stores; its addend is the last operand.
    pub epilogue: Option<Epilogue>,
    /// A unary op fused into the loads of operand 0 (SwiGLU's SiLU into its mul).
    pub prologue: Option<Prologue>,
    /// An activation applied after the epilogue's add (`matmul-add-activation`).
    pub activation: Option<math::Activation>,
    /// CPU matmuls over block-quantized weights quantize their activations to
    /// int8 blocks and use integer dot products (`quant_dot`; needs AVX2).
    pub int8_activations: bool,
}

/// What an elementwise kernel applies to its first operand as it loads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prologue {
    /// `x·sigmoid(x)`.
    Silu,
}

/// What a matmul adds to each result before storing it (a fused `add`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `+ c[r, j]`: a residual of the result's shape.
    Residual,
    /// `+ c[j]`: a bias over the output features.
    Bias,
}

impl KernelSpec {
    /// Units of parallel work (GPU threads): one per output element for
    /// elementwise ops and matmul, one per row for row reductions.
    pub fn work(&self) -> Result<SymSize, CompileError> {
        let numel = self.result.numel();
        let last = |t: &TensorType| match t.last_dim() {
            Some(sparsec_ir::Dim::Fixed(n)) => Ok(n),
            _ => Err(self.unsupported("the last dimension must be fixed")),
        };
        Ok(match &self.op {
            Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Softmax => {
                SymSize { coef: numel.coef / last(&self.result)?, ..numel }
            }
            // One unit per (query row, head).
            Op::Attention { heads, .. } => SymSize { coef: *heads as u64, seq_pow: 1 },
            // One unit per rotated pair.
            Op::Rope { .. } => SymSize { coef: numel.coef / 2, ..numel },
            _ => numel,
        })
    }

    /// A matmul whose weight is stored in a sparse format.
    fn sparse_matmul(&self) -> Option<SparseMatmul> {
        let storage = self.sparse.as_ref()?.storage?;
        let Some(sparsec_ir::Dim::Fixed(n)) = self.result.last_dim() else { return None };
        let numel = self.result.numel();
        Some(SparseMatmul { rows: SymSize { coef: numel.coef / n.max(1), ..numel }, storage })
    }

    fn tiled_matmul(&self) -> Option<TiledMatmul> {
        if self.sparse_matmul().is_some() {
            return None;
        }
        let Op::MatMul { transpose_b: true } = self.op else { return None };
        let (Some(sparsec_ir::Dim::Fixed(k)), Some(sparsec_ir::Dim::Fixed(n))) = (self.operands[0].last_dim(), self.result.last_dim()) else {
            return None;
        };
        let quant = Some(self.operands[1].dtype).filter(|d| d.is_quantized());
        if k % VW as u64 != 0 && quant.is_none() {
            return None;
        }
        let numel = self.result.numel();
        let rows = SymSize { coef: numel.coef / n.max(1), ..numel };
        if rows.seq_pow > 1 {
            return None;
        }
        let rb = if rows == (SymSize { coef: 1, seq_pow: 1 }) { MM_ROWS } else { 1 };
        Some(TiledMatmul { k, n, rows, rb, col_tiles: n.div_ceil(MM_COLS), quant })
    }

    /// Rows of `seq` per CPU unit (the runtime counts `seq` in such blocks).
    pub fn cpu_seq_block(&self) -> u64 {
        if let Some(s) = self.sparse_matmul() {
            return s.rb();
        }
        self.tiled_matmul().map(|t| t.rb).unwrap_or(1)
    }

    /// Rough scalar operations per CPU unit (for the runtime's threading decision).
    pub fn cpu_unit_cost(&self) -> u64 {
        let last = |t: &TensorType| match t.last_dim() {
            Some(sparsec_ir::Dim::Fixed(n)) => n,
            _ => 1,
        };
        if let Some(s) = self.sparse_matmul() {
            return s.unit_cost();
        }
        match &self.op {
            Op::MatMul { .. } => match self.tiled_matmul() {
                Some(t) => t.rb * MM_COLS * t.k,
                None => last(&self.operands[0]) * last(&self.result),
            },
            // Per (row, head): a dot and an axpy over every cached position (512 assumed).
            Op::Attention { heads, .. } => 4 * 512 * last(&self.operands[0]) / (*heads as u64).max(1),
            Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Softmax => 8 * last(&self.result),
            Op::Rope { .. } => 64,
            Op::Gelu { .. } | Op::Silu => 16,
            _ => 2,
        }
    }

    /// Units of the CPU kernel's parallel loop (what the runtime splits over
    /// threads): tiles for matmul with a transposed weight, rows for other
    /// matmuls, else the same as `work`.
    pub fn cpu_work(&self) -> Result<SymSize, CompileError> {
        if let Some(s) = self.sparse_matmul() {
            return Ok(s.cpu_units());
        }
        if let Some(t) = self.tiled_matmul() {
            return Ok(SymSize { coef: t.rows.coef * t.col_tiles, seq_pow: t.rows.seq_pow });
        }
        match &self.op {
            Op::MatMul { .. } => {
                let n = fixed_last(self, &self.result)?;
                let numel = self.result.numel();
                Ok(SymSize { coef: numel.coef / n.max(1), ..numel })
            }
            _ => self.work(),
        }
    }

    /// Whether output row r reads only row r of each `[rows, ...]` operand
    /// (and whole weights): matmul, norms, activations and same-shape
    /// elementwise ops; not attention, RoPE (positions) or embeddings.
    pub fn row_local(&self) -> bool {
        match &self.op {
            Op::MatMul { .. } | Op::RmsNorm { .. } | Op::LayerNorm { .. } | Op::Softmax | Op::Gelu { .. } | Op::Silu => true,
            Op::Add | Op::Mul => self.operands.iter().all(|t| t.dims == self.result.dims || !t.dims.contains(&sparsec_ir::Dim::Seq)),
            Op::Input | Op::Weight { .. } | Op::Constant { .. } | Op::Attention { .. } | Op::Rope { .. } | Op::Embedding | Op::Positions => false,
        }
    }

    fn unsupported(&self, why: &str) -> CompileError {
        CompileError::Unsupported { kernel: self.name.clone(), op: self.op.keyword(), why: why.to_string() }
    }
}

fn fixed_last(spec: &KernelSpec, t: &TensorType) -> Result<u64, CompileError> {
    match t.last_dim() {
        Some(sparsec_ir::Dim::Fixed(n)) => Ok(n),
        _ => Err(spec.unsupported("the last dimension must be fixed")),
    }
}

/// Writes the MLIR module of one kernel for `device`.
pub fn emit_kernel(spec: &KernelSpec, device: Device) -> Result<String, CompileError> {
    // Buffers hold f32; i32 values (token ids, positions) travel as exact f32 integers.
    // Quantized weights are packed bytes (shape inference allows them only as
    // matmul weights and embedding tables); f16 only as attention's KV caches.
    let kv_cache_operand = |i: usize| matches!(spec.op, Op::Attention { .. }) && (i == 1 || i == 2);
    let supported = |i: usize, t: &TensorType| match t.dtype {
        DType::F32 | DType::I32 => true,
        DType::F16 => kv_cache_operand(i),
        other => other.is_quantized(),
    };
    if let Some((_, t)) = spec.operands.iter().enumerate().chain([(usize::MAX, &spec.result)]).find(|&(i, t)| !supported(i, t)) {
        return Err(spec.unsupported(&format!("element type {} (f32, i32 and q8_0/q4_0/q4_1 weights only for now)", t.dtype.name())));
    }
    let mut b = KernelBuilder::new(device);
    let ins: Vec<V> = (0..spec.operands.len()).map(|i| format!("%in{i}")).collect();
    for (i, t) in spec.operands.iter().enumerate() {
        if t.dtype.is_quantized() {
            b.byte_param(&ins[i]);
        }
    }
    let sparse = spec.sparse_matmul();
    if sparse.is_some() {
        b.byte_param(&ins[1]);
    }
    if let (Some(e), Some(addend)) = (spec.epilogue, ins.get(2)) {
        let modulus = match e {
            Epilogue::Residual => None,
            Epilogue::Bias => Some(b.index(fixed_last(spec, &spec.result)?)),
        };
        b.set_epilogue(addend, modulus, spec.activation);
    }
    let out: V = "%out".into();
    let work = spec.work()?;
    let work = b.sym(work);
    match &spec.op {
        Op::Input | Op::Weight { .. } | Op::Constant { .. } => {
            return Err(spec.unsupported("leaves are data, not kernels"))
        }
        Op::Gelu { approx } => {
            let act = math::Activation::Gelu(*approx);
            b.parallel(&work, |b, i| {
                let x = b.load(&ins[0], i);
                let y = math::activation(b, act, &x);
                b.store(&y, &out, i);
            });
        }
        Op::Silu => {
            b.parallel(&work, |b, i| {
                let x = b.load(&ins[0], i);
                let y = math::activation(b, math::Activation::Silu, &x);
                b.store(&y, &out, i);
            });
        }
        Op::Add | Op::Mul => {
            let n_out = spec.result.numel();
            let sizes: Vec<SymSize> = spec.operands.iter().map(|t| t.numel()).collect();
            let fop = if matches!(spec.op, Op::Add) { "addf" } else { "mulf" };
            let mut moduli = Vec::new();
            for s in &sizes {
                // A broadcast operand is read modulo its own size.
                moduli.push(if *s == n_out { None } else { Some(b.sym(*s)) });
            }
            b.parallel(&work, |b, i| {
                let mut vals = Vec::new();
                for (k, m) in moduli.iter().enumerate() {
                    let idx = match m {
                        None => i.to_string(),
                        Some(m) => b.remui(i, m),
                    };
                    vals.push(b.load(&ins[k], &idx));
                }
                if spec.prologue == Some(Prologue::Silu) {
                    vals[0] = math::activation(b, math::Activation::Silu, &vals[0]);
                }
                let y = b.fbin(fop, &vals[0], &vals[1]);
                b.store(&y, &out, i);
            });
        }
        Op::MatMul { .. } if sparse.is_some() => {
            let choice = spec.sparse.as_ref().filter(|c| c.bakes());
            match (&sparse, choice) {
                (Some(t), None) => emit_sparse_matmul(&mut b, t, &ins, &out),
                (Some(t), Some(c)) => {
                    let data = c.data.as_ref().ok_or_else(|| spec.unsupported("the baked weight's data was not attached"))?;
                    let full = c.level == sparsec_ir::Specialize::Full;
                    emit_unrolled_matmul(&mut b, t, full, data, &ins, &out, &spec.name)?;
                }
                (None, _) => {}
            }
        }
        Op::MatMul { .. } if device == Device::Cpu && spec.tiled_matmul().is_some() => {
            if let Some(t) = spec.tiled_matmul() {
                if spec.int8_activations && t.quant.is_some() && t.k % sparsec_ir::quant::QK as u64 == 0 {
                    emit_int8_matmul(&mut b, &t, &ins, &out);
                } else {
                    emit_tiled_matmul(&mut b, &t, &ins, &out);
                }
            }
        }
        Op::MatMul { transpose_b } => {
            let k = fixed_last(spec, &spec.operands[0])?;
            let wq = spec.operands[1].dtype;
            let planes = wq.is_quantized().then(|| QuantPlanes::new(&mut b, wq, &ins[1], spec.operands[1].numel().coef));
            let n = fixed_last(spec, &spec.result)?;
            let (kc, nc) = (b.index(k), b.index(n));
            let zero_i = b.index(0);
            let zero = b.f32(0.0);
            let tb = *transpose_b;
            let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
            let (a_vec, w_vec) = (ins[0].clone(), ins[1].clone());
            // The reduction over k for output element (r, j).
            let (kc2, nc2, zero_i2) = (kc.clone(), nc.clone(), zero_i.clone());
            let dot = move |b: &mut KernelBuilder, r: &str, j: &str| -> V {
                let (kc, nc, zero_i) = (&kc2, &nc2, &zero_i2);
                let arow = b.muli(r, kc);
                let brow = if tb { Some(b.muli(j, kc)) } else { None };
                let acc = b.for_fold(zero_i, kc, &[zero.clone()], |b, kk, acc| {
                    let ai = b.addi(&arow, kk);
                    let a = b.load(&a_buf, &ai);
                    let bi = match &brow {
                        Some(brow) => b.addi(brow, kk),
                        None => {
                            let t = b.muli(kk, nc);
                            b.addi(&t, j)
                        }
                    };
                    let w = match &planes {
                        Some(q) => q.load(b, &w_buf, &bi),
                        None => b.load(&w_buf, &bi),
                    };
                    vec![b.fma(&a, &w, &acc[0])]
                });
                acc[0].clone()
            };
            match device {
                Device::Cpu if !tb && n % VW as u64 == 0 => {
                    // Register-blocked over output columns: `u` vectors of VW columns
                    // accumulate across k; each step reads a contiguous slice of a B row.
                    let nvec = n / VW as u64;
                    let u = [4u64, 2, 1].into_iter().find(|u| nvec % u == 0).unwrap_or(1);
                    let rows = b.divui(&work, &nc);
                    b.parallel(&rows, |b, r| {
                        let arow = b.muli(r, &kc);
                        let orow = b.muli(r, &nc);
                        b.for_step(&zero_i, &nc, VW as u64 * u, |b, jb| {
                            let z = b.vzero(VW);
                            let init: Vec<(V, String)> = (0..u).map(|_| (z.clone(), KernelBuilder::vty(VW))).collect();
                            let accs = b.for_fold_typed(&zero_i, &kc, 1, &init, |b, kk, accs| {
                                let ai = b.addi(&arow, kk);
                                let a = b.load(&a_vec, &ai);
                                let av = b.vbroadcast(&a, VW);
                                let brow = b.muli(kk, &nc);
                                let base = b.addi(&brow, jb);
                                (0..u as usize)
                                    .map(|q| {
                                        let off = b.index(q as u64 * VW as u64);
                                        let idx = b.addi(&base, &off);
                                        let w = b.vload(&w_vec, &idx, VW);
                                        b.vfma(&av, &w, &accs[q], VW)
                                    })
                                    .collect()
                            });
                            let obase = b.addi(&orow, jb);
                            for (q, acc) in accs.iter().enumerate() {
                                let off = b.index(q as u64 * VW as u64);
                                let o = b.addi(&obase, &off);
                                b.vstore(acc, &out, &o, VW);
                            }
                        });
                    });
                }
                Device::Cpu if tb && k % VW as u64 == 0 => {
                    // Both operands are contiguous along k: VW-lane partial sums, then a reduction.
                    let rows = b.divui(&work, &nc);
                    b.parallel(&rows, |b, r| {
                        let arow = b.muli(r, &kc);
                        let orow = b.muli(r, &nc);
                        b.for_each(&zero_i, &nc, |b, j| {
                            let brow = b.muli(j, &kc);
                            let z = b.vzero(VW);
                            let acc = b.for_fold_typed(&zero_i, &kc, VW as u64, &[(z, KernelBuilder::vty(VW))], |b, kk, acc| {
                                let ai = b.addi(&arow, kk);
                                let av = b.vload(&a_vec, &ai, VW);
                                let bi = b.addi(&brow, kk);
                                let bv = b.vload(&w_vec, &bi, VW);
                                vec![b.vfma(&av, &bv, &acc[0], VW)]
                            });
                            let y = b.vsum(&acc[0], VW);
                            let o = b.addi(&orow, j);
                            b.store_result(&y, &out, &o);
                        });
                    });
                }
                Device::Cpu => {
                    // Scalar fallback for widths the vector paths do not divide.
                    let rows = b.divui(&work, &nc);
                    b.parallel(&rows, |b, r| {
                        b.for_each(&zero_i, &nc, |b, j| {
                            let y = dot(b, r, j);
                            let rn = b.muli(r, &nc);
                            let o = b.addi(&rn, j);
                            b.store_result(&y, &out, &o);
                        });
                    });
                }
                Device::Nvptx => {
                    b.parallel(&work, |b, e| {
                        let r = b.divui(e, &nc);
                        let j = b.remui(e, &nc);
                        let y = dot(b, &r, &j);
                        b.store_result(&y, &out, e);
                    });
                }
            }
        }
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
            let d = fixed_last(spec, &spec.result)?;
            let is_layer = matches!(spec.op, Op::LayerNorm { .. });
            let (dc, zero_i) = (b.index(d), b.index(0));
            let zero = b.f32(0.0);
            let inv_d = b.f32(1.0 / d as f32);
            let eps = b.f32(*eps);
            b.parallel(&work, |b, r| {
                let base = b.muli(r, &dc);
                let mean = if is_layer {
                    let s = b.for_fold(&zero_i, &dc, &[zero.clone()], |b, j, acc| {
                        let i = b.addi(&base, j);
                        let x = b.load(&ins[0], &i);
                        vec![b.add(&acc[0], &x)]
                    });
                    b.mul(&s[0], &inv_d)
                } else {
                    zero.clone()
                };
                let ss = b.for_fold(&zero_i, &dc, &[zero.clone()], |b, j, acc| {
                    let i = b.addi(&base, j);
                    let x = b.load(&ins[0], &i);
                    let c = b.sub(&x, &mean);
                    vec![b.fma(&c, &c, &acc[0])]
                });
                let var = b.mul(&ss[0], &inv_d);
                let ve = b.add(&var, &eps);
                let sd = b.math("sqrt", &ve);
                let one = b.f32(1.0);
                let inv = b.div(&one, &sd);
                b.for_each(&zero_i, &dc, |b, j| {
                    let i = b.addi(&base, j);
                    let x = b.load(&ins[0], &i);
                    let c = b.sub(&x, &mean);
                    let nrm = b.mul(&c, &inv);
                    let g = b.load(&ins[1], j);
                    let y = if is_layer {
                        let beta = b.load(&ins[2], j);
                        b.fma(&nrm, &g, &beta)
                    } else {
                        b.mul(&nrm, &g)
                    };
                    b.store(&y, &out, &i);
                });
            });
        }
        Op::Softmax => {
            let d = fixed_last(spec, &spec.result)?;
            let (dc, zero_i) = (b.index(d), b.index(0));
            let zero = b.f32(0.0);
            let ninf = b.f32(f32::NEG_INFINITY);
            b.parallel(&work, |b, r| {
                let base = b.muli(r, &dc);
                let m = b.for_fold(&zero_i, &dc, &[ninf.clone()], |b, j, acc| {
                    let i = b.addi(&base, j);
                    let x = b.load(&ins[0], &i);
                    vec![b.fbin("maxnumf", &acc[0], &x)]
                });
                let s = b.for_fold(&zero_i, &dc, &[zero.clone()], |b, j, acc| {
                    let i = b.addi(&base, j);
                    let x = b.load(&ins[0], &i);
                    let c = b.sub(&x, &m[0]);
                    let e = math::exp(b, &c);
                    b.store(&e, &out, &i);
                    vec![b.add(&acc[0], &e)]
                });
                let one = b.f32(1.0);
                let inv = b.div(&one, &s[0]);
                b.for_each(&zero_i, &dc, |b, j| {
                    let i = b.addi(&base, j);
                    let e = b.load(&out, &i);
                    let y = b.mul(&e, &inv);
                    b.store(&y, &out, &i);
                });
            });
        }
        Op::Embedding => {
            let (rows, width) = match (spec.operands[0].dims.first(), spec.operands[0].last_dim()) {
                (Some(sparsec_ir::Dim::Fixed(r)), Some(sparsec_ir::Dim::Fixed(w))) => (*r, w),
                _ => return Err(spec.unsupported("the table needs a fixed shape")),
            };
            let wc = b.index(width);
            let last_row = b.index(rows - 1);
            let tq = spec.operands[0].dtype;
            let planes = tq.is_quantized().then(|| QuantPlanes::new(&mut b, tq, &ins[0], rows * width));
            b.parallel(&work, |b, e| {
                let t = b.divui(e, &wc);
                let c = b.remui(e, &wc);
                let idf = b.load(&ins[1], &t);
                let id = b.def(format!("arith.fptoui {idf} : f32 to i64"));
                let id = b.def(format!("arith.index_cast {id} : i64 to index"));
                // Out-of-range ids are clamped (the interpreter rejects them).
                let id = b.def(format!("arith.minui {id}, {last_row} : index"));
                let base = b.muli(&id, &wc);
                let src = b.addi(&base, &c);
                let v = match &planes {
                    Some(q) => q.load(b, &ins[0], &src),
                    None => b.load(&ins[0], &src),
                };
                b.store(&v, &out, e);
            });
        }
        Op::Positions => {
            let pos = b.pos();
            b.parallel(&work, |b, e| {
                let p = b.addi(e, &pos);
                let i = b.def(format!("arith.index_cast {p} : index to i64"));
                let f = b.def(format!("arith.uitofp {i} : i64 to f32"));
                b.store(&f, &out, e);
            });
        }
        Op::Rope { heads, theta, adjacent } => {
            // One unit per (row, head, pair i); the angle pos·θ^(−2i/d) and its
            // sin/cos are computed in f64 like the reference.
            let w = fixed_last(spec, &spec.result)?;
            let d = w / *heads as u64;
            let half = d / 2;
            let (wc, dc, halfc) = (b.index(w), b.index(d), b.index(half));
            // Pair i's frequency θ^(−2i/d): on the CPU from a table computed here
            // exactly as the reference does; on NVIDIA as the i-th power of
            // θ^(−2/d), by i products in f64 (no transcendental, no table).
            let freqs: Vec<f64> = (0..half).map(|i| (*theta as f64).powf(-2.0 * i as f64 / d as f64)).collect();
            let table = (device == Device::Cpu).then(|| b.f64_table("rope_freqs", &freqs));
            let base_freq = b.f64((*theta as f64).powf(-2.0 / d as f64));
            let one_f64 = b.f64(1.0);
            let zero_i = b.index(0);
            let headsc = b.index(*heads as u64);
            let adjacent = *adjacent;
            b.parallel(&work, |b, u| {
                let i = b.remui(u, &halfc);
                let rh = b.divui(u, &halfc);
                let head = b.remui(&rh, &headsc);
                let row = b.divui(&rh, &headsc);
                let rowbase = b.muli(&row, &wc);
                let hd = b.muli(&head, &dc);
                let base = b.addi(&rowbase, &hd);
                let (ia, ib) = if adjacent {
                    let two = b.index(2);
                    let i2 = b.muli(&i, &two);
                    let a = b.addi(&base, &i2);
                    let one = b.index(1);
                    let bb = b.addi(&a, &one);
                    (a, bb)
                } else {
                    let a = b.addi(&base, &i);
                    let bb = b.addi(&a, &halfc);
                    (a, bb)
                };
                let freq = match &table {
                    Some(t) => b.def(format!("memref.load {t}[{i}] : memref<{half}xf64>")),
                    None => b.for_fold_typed(&zero_i, &i, 1, &[(one_f64.clone(), "f64".to_string())], |b, _, acc| {
                        vec![b.def(format!("arith.mulf {}, {base_freq} : f64", acc[0]))]
                    })[0]
                        .clone(),
                };
                let pos = b.pos();
                let at = b.addi(&row, &pos);
                let pi = b.def(format!("arith.index_cast {at} : index to i64"));
                let pf = b.def(format!("arith.sitofp {pi} : i64 to f64"));
                let angle = b.def(format!("arith.mulf {pf}, {freq} : f64"));
                let (sin, cos) = math::sincos_f64(b, &angle);
                let xa = b.load(&ins[0], &ia);
                let xb = b.load(&ins[0], &ib);
                let xa = b.def(format!("arith.extf {xa} : f32 to f64"));
                let xb = b.def(format!("arith.extf {xb} : f32 to f64"));
                let ac = b.def(format!("arith.mulf {xa}, {cos} : f64"));
                let bs = b.def(format!("arith.mulf {xb}, {sin} : f64"));
                let ya = b.def(format!("arith.subf {ac}, {bs} : f64"));
                let as_ = b.def(format!("arith.mulf {xa}, {sin} : f64"));
                let bc = b.def(format!("arith.mulf {xb}, {cos} : f64"));
                let yb = b.def(format!("arith.addf {as_}, {bc} : f64"));
                let ya = b.def(format!("arith.truncf {ya} : f64 to f32"));
                let yb = b.def(format!("arith.truncf {yb} : f64 to f32"));
                b.store(&ya, &out, &ia);
                b.store(&yb, &out, &ib);
            });
        }
        Op::Attention { heads, kv_heads } => {
            let mut window: Option<(u32, u32)> = None;
            for p in &spec.patterns {
                match p {
                    Pattern::Window(Window::Full) => {}
                    Pattern::Window(Window::Sliding { size, sinks }) => window = Some((*size, *sinks)),
                    other => {
                        return Err(spec.unsupported(&format!("#{} is not lowered yet (its pattern issue adds it)", other.keyword())))
                    }
                }
            }
            let qw = fixed_last(spec, &spec.operands[0])?;
            let (h, kvh) = (*heads as u64, *kv_heads as u64);
            let d = qw / h;
            let kvw = d * kvh;
            let (hc, dc, qwc, kvwc, groupc) = (b.index(h), b.index(d), b.index(qw), b.index(kvw), b.index(h / kvh));
            let zero_i = b.index(0);
            let one_i = b.index(1);
            let zero = b.f32(0.0);
            let ninf = b.f32(-1e30);
            let scale = b.f32(1.0 / (d as f32).sqrt());
            let win = window.map(|(size, sinks)| (b.index(size as u64), b.index(sinks as u64), sinks));
            // f16 caches (`KvCacheType::F16`) are read as f16 views of byte
            // buffers and widened to f32 as they load.
            let f16_kv = spec.operands[1].dtype == DType::F16;
            if f16_kv && device != Device::Cpu {
                return Err(spec.unsupported("f16 KV caches are read on the CPU only"));
            }
            let (kbuf, vbuf) = if f16_kv {
                b.byte_param(&ins[1]);
                b.byte_param(&ins[2]);
                (b.f16_view(&ins[1]), b.f16_view(&ins[2]))
            } else {
                (ins[1].clone(), ins[2].clone())
            };
            let kv_vload = |b: &mut KernelBuilder, buf: &str, i: &str| if f16_kv { b.vload_f16(buf, i, VW) } else { b.vload(buf, i, VW) };
            let kv_load = |b: &mut KernelBuilder, buf: &str, i: &str| if f16_kv { b.load_f16(buf, i) } else { b.load(buf, i) };
            let pos = b.pos();
            // The keys are the KV caches (operands 1 and 2): every position before
            // this call's rows, then the rows themselves (appended by the runtime).
            // Query row r sits at position pos + r and sees keys 0..=pos + r.
            let first_key = |b: &mut KernelBuilder, end: &str| -> V {
                match &win {
                    // Without sinks nothing before the window is visible: start there.
                    Some((size, _, 0)) => {
                        let past = b.def(format!("arith.cmpi ugt, {end}, {size} : index"));
                        let st = b.def(format!("arith.subi {end}, {size} : index"));
                        b.def(format!("arith.select {past}, {st}, {zero_i} : index"))
                    }
                    _ => zero_i.clone(),
                }
            };
            let masked = |b: &mut KernelBuilder, s: &str, j: &str, p: &str| -> V {
                match &win {
                    None => s.to_string(),
                    Some((size, sinks, _)) => {
                        let jp = b.addi(j, size);
                        let recent = b.def(format!("arith.cmpi ugt, {jp}, {p} : index"));
                        let sink = b.def(format!("arith.cmpi ult, {j}, {sinks} : index"));
                        let vis = b.def(format!("arith.ori {recent}, {sink} : i1"));
                        b.def(format!("arith.select {vis}, {s}, {ninf} : f32"))
                    }
                }
            };
            // unit = q * heads + head: where its query, its KV head and its keys are.
            // Causal rows cost more the later they are, and the runtime gives each
            // thread a contiguous range of units; taking rows in the order
            // 0, seq-1, 1, seq-2, ... pairs cheap with dear rows, so every range
            // costs about the same.
            let seq = b.seq();
            let unit_of = |b: &mut KernelBuilder, unit: &str| -> AttnUnit {
                let q = b.divui(unit, &hc);
                let head = b.remui(unit, &hc);
                let two = b.index(2);
                let half = b.divui(&q, &two);
                let odd = b.remui(&q, &two);
                let odd = b.def(format!("arith.index_cast {odd} : index to i1"));
                let last = b.def(format!("arith.subi {seq}, {one_i} : index"));
                let mirrored = b.def(format!("arith.subi {last}, {half} : index"));
                let row = b.def(format!("arith.select {odd}, {mirrored}, {half} : index"));
                let kh = b.divui(&head, &groupc);
                let qrow = b.muli(&row, &qwc);
                let qhd = b.muli(&head, &dc);
                let qbase = b.addi(&qrow, &qhd);
                let khd = b.muli(&kh, &dc);
                let p = b.addi(&pos, &row);
                let end = b.addi(&p, &one_i);
                let start = first_key(b, &end);
                AttnUnit { qbase, khd, p, start, end }
            };
            if device == Device::Cpu && d > 0 && d % VW as u64 == 0 {
                // Three passes per (row, head) over a stack row of scores: q·k (VW keys
                // at a time; then a window's mask), exp and sum, then Σ p·v with the
                // head's d/VW accumulators in registers.
                let total = b.addi(&pos, &b.seq());
                let scores = b.alloca_f32(&total);
                let nv = (d / VW as u64) as usize;
                // The K and V caches hold as many positions of the same width.
                let kv_elem = if f16_kv { "f16" } else { "f32" };
                let kv_len = b.def(format!("memref.dim {kbuf}, {zero_i} : memref<?x{kv_elem}>"));
                let kv_last = b.def(format!("arith.subi {kv_len}, {one_i} : index"));
                b.parallel(&work, |b, unit| {
                    let AttnUnit { qbase, khd, p, start, end } = unit_of(b, unit);
                    let qs: Vec<V> = (0..nv)
                        .map(|v| {
                            let o = b.index(v as u64 * VW as u64);
                            let i = b.addi(&qbase, &o);
                            b.vload(&ins[0], &i, VW)
                        })
                        .collect();
                    // The cache is read from memory (the weights stream through
                    // the caches between layers): ask for rows ATTN_PREFETCH_KEYS
                    // ahead, clamped to the caches' last element.
                    let prefetch_row = |b: &mut KernelBuilder, buf: &str, j: &str| {
                        let rb = b.muli(j, &kvwc);
                        let base = b.addi(&rb, &khd);
                        b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw, &kv_last, kv_elem);
                        b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw + d - 1, &kv_last, kv_elem);
                    };
                    // Key j's q·k as one vector of partial sums (FMAs over the head's slices).
                    let key_dot = |b: &mut KernelBuilder, j: &str| -> V {
                        let kb = b.muli(j, &kvwc);
                        let kbase = b.addi(&kb, &khd);
                        let mut acc = b.vzero(VW);
                        for (v, q) in qs.iter().enumerate() {
                            let o = b.index(v as u64 * VW as u64);
                            let i = b.addi(&kbase, &o);
                            let k = kv_vload(b, &kbuf, &i);
                            acc = b.vfma(q, &k, &acc, VW);
                        }
                        acc
                    };
                    // Scores in blocks of VW keys: the keys' dots overlap in flight,
                    // and one butterfly (`vsums`) sums all VW of them into a vector.
                    let vwc = b.index(VW as u64);
                    let span = b.def(format!("arith.subi {end}, {start} : index"));
                    let blocks = b.divui(&span, &vwc);
                    let blocked = b.muli(&blocks, &vwc);
                    let block_end = b.addi(&start, &blocked);
                    let vninf = b.vbroadcast(&ninf, VW);
                    let vscale = b.vbroadcast(&scale, VW);
                    let vmax = b.for_fold_typed(&start, &block_end, VW as u64, &[(vninf, KernelBuilder::vty(VW))], |b, jb, acc| {
                        let dots: Vec<V> = (0..VW as u64)
                            .map(|t| {
                                let o = b.index(t);
                                let j = b.addi(jb, &o);
                                prefetch_row(b, &kbuf, &j);
                                key_dot(b, &j)
                            })
                            .collect();
                        let sums = b.vsums(&dots, VW);
                        let s = b.def(format!("arith.mulf {sums}, {vscale} : {}", KernelBuilder::vty(VW)));
                        b.vstore(&s, &scores, jb, VW);
                        vec![b.def(format!("arith.maxnumf {}, {s} : {}", acc[0], KernelBuilder::vty(VW)))]
                    });
                    let block_max = b.def(format!("vector.reduction <maxnumf>, {} : {} into f32", vmax[0], KernelBuilder::vty(VW)));
                    let m = b.for_fold(&block_end, &end, &[block_max], |b, j, acc| {
                        let dot = key_dot(b, j);
                        let dsum = b.vsum(&dot, VW);
                        let s = b.mul(&dsum, &scale);
                        b.store(&s, &scores, j);
                        vec![b.fbin("maxnumf", &acc[0], &s)]
                    });
                    // A window masks keys by position: apply it to the stored
                    // scores (-inf outside) and take the max of what is visible.
                    let m = if win.is_some() {
                        b.for_fold(&start, &end, &[ninf.clone()], |b, j, acc| {
                            let s = b.load(&scores, j);
                            let s = masked(b, &s, j, &p);
                            b.store(&s, &scores, j);
                            vec![b.fbin("maxnumf", &acc[0], &s)]
                        })
                    } else {
                        m
                    };
                    let l = b.for_fold(&start, &end, &[zero.clone()], |b, j, acc| {
                        let s = b.load(&scores, j);
                        let c = b.sub(&s, &m[0]);
                        let e = math::exp(b, &c);
                        b.store(&e, &scores, j);
                        // Reassociable, so LLVM may vectorize this loop (exp included).
                        vec![b.def(format!("arith.addf {}, {e} fastmath<reassoc> : f32", acc[0]))]
                    });
                    let z = b.vzero(VW);
                    let init: Vec<(V, String)> = (0..nv).map(|_| (z.clone(), KernelBuilder::vty(VW))).collect();
                    let accs = b.for_fold_typed(&start, &end, 1, &init, |b, j, accs| {
                        let e = b.load(&scores, j);
                        let ev = b.vbroadcast(&e, VW);
                        prefetch_row(b, &vbuf, j);
                        let vb = b.muli(j, &kvwc);
                        let vbase = b.addi(&vb, &khd);
                        (0..nv)
                            .map(|v| {
                                let o = b.index(v as u64 * VW as u64);
                                let i = b.addi(&vbase, &o);
                                let x = kv_vload(b, &vbuf, &i);
                                b.vfma(&ev, &x, &accs[v], VW)
                            })
                            .collect()
                    });
                    let one = b.f32(1.0);
                    let inv = b.div(&one, &l[0]);
                    let invv = b.vbroadcast(&inv, VW);
                    for (v, acc) in accs.iter().enumerate() {
                        let y = b.def(format!("arith.mulf {acc}, {invv} : {}", KernelBuilder::vty(VW)));
                        let o = b.index(v as u64 * VW as u64);
                        let i = b.addi(&qbase, &o);
                        b.vstore(&y, &out, &i, VW);
                    }
                });
            } else {
                b.parallel(&work, |b, unit| {
                    // Online softmax over the visible keys, accumulating the
                    // weighted values in the output row itself.
                    let AttnUnit { qbase, khd, p, start, end } = unit_of(b, unit);
                    b.for_each(&zero_i, &dc, |b, c| {
                        let o = b.addi(&qbase, c);
                        b.store(&zero, &out, &o);
                    });
                    let ml = b.for_fold(&start, &end, &[ninf.clone(), zero.clone()], |b, j, acc| {
                        let kbase0 = b.muli(j, &kvwc);
                        let kbase = b.addi(&kbase0, &khd);
                        let dot = b.for_fold(&zero_i, &dc, &[zero.clone()], |b, c, a| {
                            let qi = b.addi(&qbase, c);
                            let ki = b.addi(&kbase, c);
                            let qv = b.load(&ins[0], &qi);
                            let kv = kv_load(b, &kbuf, &ki);
                            vec![b.fma(&qv, &kv, &a[0])]
                        });
                        let s = b.mul(&dot[0], &scale);
                        // A key outside the window gets -inf (weight 0).
                        let s = masked(b, &s, j, &p);
                        let m_new = b.fbin("maxnumf", &acc[0], &s);
                        let dm = b.sub(&acc[0], &m_new);
                        let corr = math::exp(b, &dm);
                        let ds = b.sub(&s, &m_new);
                        let pr = math::exp(b, &ds);
                        let l = b.fma(&acc[1], &corr, &pr);
                        b.for_each(&zero_i, &dc, |b, c| {
                            let o = b.addi(&qbase, c);
                            let vi = b.addi(&kbase, c);
                            let prev = b.load(&out, &o);
                            let vv = kv_load(b, &vbuf, &vi);
                            let pv = b.mul(&pr, &vv);
                            let y = b.fma(&prev, &corr, &pv);
                            b.store(&y, &out, &o);
                        });
                        vec![m_new, l]
                    });
                    let one = b.f32(1.0);
                    let inv = b.div(&one, &ml[1]);
                    b.for_each(&zero_i, &dc, |b, c| {
                        let o = b.addi(&qbase, c);
                        let y = b.load(&out, &o);
                        let y = b.mul(&y, &inv);
                        b.store(&y, &out, &o);
                    });
                });
            }
        }
    }
    let mut params = ins.clone();
    params.push(out);
    Ok(b.finish(&spec.name, &params))
}

/// How many keys ahead CPU attention prefetches its K and V rows.
const ATTN_PREFETCH_KEYS: u64 = 16;

/// One attention unit's offsets: its query row and head (`qbase`), its KV head
/// (`khd`), its position `p` and the visible keys `start..end`.
struct AttnUnit {
    qbase: V,
    khd: V,
    p: V,
    start: V,
    end: V,
}

/// The f16 planes of a packed quantized tensor (`sparsec_ir::quant`) and the
/// scalar read of one element, for kernels that touch few elements.
pub(super) struct QuantPlanes {
    dt: DType,
    d: V,
    m: Option<V>,
}

impl QuantPlanes {
    pub(super) fn new(b: &mut KernelBuilder, dt: DType, buf: &str, numel: u64) -> QuantPlanes {
        let p = sparsec_ir::quant::planes(dt, numel as usize).unwrap_or(sparsec_ir::quant::Planes { blocks: 0, d: 0, m: 0, total: 0 });
        let d = b.f16_plane(buf, p.d as u64, p.blocks as u64);
        let m = (dt == DType::Q4_1).then(|| b.f16_plane(buf, p.m as u64, p.blocks as u64));
        QuantPlanes { dt, d, m }
    }

    /// The scale and the offset of block `blk`: x = scale·q + offset.
    pub(super) fn scale_offset(&self, b: &mut KernelBuilder, blk: &str) -> (V, Option<V>) {
        let d = b.load_f16(&self.d, blk);
        let off = match (self.dt, &self.m) {
            (DType::Q4_1, Some(m)) => Some(b.load_f16(m, blk)),
            (DType::Q4_0, _) => {
                let m8 = b.f32(-8.0);
                Some(b.mul(&d, &m8))
            }
            _ => None,
        };
        (d, off)
    }

    /// Element `flat` (row-major over the logical shape), dequantized.
    fn load(&self, b: &mut KernelBuilder, buf: &str, flat: &str) -> V {
        let qk = b.index(sparsec_ir::quant::QK as u64);
        let blk = b.divui(flat, &qk);
        let within = b.remui(flat, &qk);
        let (d, off) = self.scale_offset(b, &blk);
        let q = if self.dt == DType::Q8_0 {
            b.load_byte(buf, flat, true)
        } else {
            let half = b.index(16);
            let lo = b.remui(&within, &half);
            let base = b.muli(&blk, &half);
            let at = b.addi(&base, &lo);
            let byte = b.load_byte(buf, &at, false);
            let is_hi = b.def(format!("arith.cmpi uge, {within}, {half} : index"));
            let four = b.i32(4);
            let fifteen = b.i32(15);
            let hi = b.def(format!("arith.shrui {byte}, {four} : i32"));
            let lo = b.def(format!("arith.andi {byte}, {fifteen} : i32"));
            b.def(format!("arith.select {is_hi}, {hi}, {lo} : i32"))
        };
        let qf = b.def(format!("arith.sitofp {q} : i32 to f32"));
        match off {
            Some(o) => b.fma(&qf, &d, &o),
            None => b.mul(&qf, &d),
        }
    }

    /// The 32 values of block `blk` as two `vector<16xf32>` halves (CPU).
    fn load_block(&self, b: &mut KernelBuilder, buf: &str, blk: &str) -> (V, V) {
        let (d, off) = self.scale_offset(b, blk);
        let vf = KernelBuilder::vty(VQ);
        let (qlo, qhi) = if self.dt == DType::Q8_0 {
            let qk = b.index(32);
            let at = b.muli(blk, &qk);
            let sixteen = b.index(16);
            let at2 = b.addi(&at, &sixteen);
            let lo = b.vload_bytes(buf, &at, VQ);
            let hi = b.vload_bytes(buf, &at2, VQ);
            let lo = b.def(format!("arith.extsi {lo} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
            let hi = b.def(format!("arith.extsi {hi} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
            (lo, hi)
        } else {
            let sixteen = b.index(16);
            let at = b.muli(blk, &sixteen);
            let (lo, hi) = nibbles(b, buf, &at);
            let lo = b.def(format!("arith.extui {lo} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
            let hi = b.def(format!("arith.extui {hi} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
            (lo, hi)
        };
        let dv = b.vbroadcast(&d, VQ);
        let ov = off.map(|o| b.vbroadcast(&o, VQ));
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
}

/// The 16 bytes of a Q4 block at byte `at` of `buf`, split into its low
/// nibbles (values 0..16) and high nibbles (values 16..32) as `vector<16xi8>`.
pub(super) fn nibbles(b: &mut KernelBuilder, buf: &str, at: &str) -> (V, V) {
    let v = b.vload_bytes(buf, at, 16);
    let mask = b.vsplat_int(15, 16, "i8");
    let four = b.vsplat_int(4, 16, "i8");
    let lo = b.def(format!("arith.andi {v}, {mask} : vector<16xi8>"));
    let hi = b.def(format!("arith.shrui {v}, {four} : vector<16xi8>"));
    (lo, hi)
}

/// How CPU matmul units are numbered.
#[derive(Clone, Copy)]
pub(super) enum UnitOrder<'a> {
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
pub(super) fn unit_origin(b: &mut KernelBuilder, u: &str, order: UnitOrder<'_>, rb: &str, cols: &str, n: &str) -> (V, V, V) {
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
pub(super) fn strided(b: &mut KernelBuilder, first: &str, count: u64, stride: &str) -> Vec<V> {
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
fn emit_tiled_matmul(b: &mut KernelBuilder, t: &TiledMatmul, ins: &[V], out: &str) {
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    let (kc, nc) = (b.index(t.k), b.index(t.n));
    let zero_i = b.index(0);
    let TileCounts { ct, rows, rbc, row_blocks, units } = t.counts(b);
    let planes = t.quant.map(|dt| QuantPlanes::new(b, dt, &w_buf, t.n * t.k));
    let w_last = b.index((t.n * t.k).saturating_sub(1));
    let nbk = b.index(t.k / sparsec_ir::quant::QK as u64);
    let colsc = b.index(MM_COLS);
    // One micro-kernel: rows r0..r0+nr, weight rows j..j+nc_.
    let micro = |b: &mut KernelBuilder, r0: &str, nr: u64, j: &str, ncols: u64| {
        let arows = strided(b, r0, nr, &kc);
        let accs: Vec<V> = match &planes {
            None => {
                let z = b.vzero(VW);
                let init: Vec<(V, String)> = (0..nr * ncols).map(|_| (z.clone(), KernelBuilder::vty(VW))).collect();
                let wrows = strided(b, j, ncols, &kc);
                b.for_fold_typed(&zero_i, &kc, VW as u64, &init, |b, kk, accs| {
                    let xs: Vec<V> = arows
                        .iter()
                        .map(|ar| {
                            let i = b.addi(ar, kk);
                            b.vload(&a_buf, &i, VW)
                        })
                        .collect();
                    let mut next = accs.to_vec();
                    for (c, wr) in wrows.iter().enumerate() {
                        let i = b.addi(wr, kk);
                        if nr == 1 {
                            // GEMV streams the weight rows in order: ask for them ahead.
                            b.prefetch_ahead(&w_buf, &i, GEMV_PREFETCH_FLOATS, &w_last, "f32");
                        }
                        let w = b.vload(&w_buf, &i, VW);
                        for (r, x) in xs.iter().enumerate() {
                            let at = r * ncols as usize + c;
                            next[at] = b.vfma(x, &w, &accs[at], VW);
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
        let width = if planes.is_some() { VQ } else { VW };
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
    // Register budget: f32 4 rows × 2 columns; quantized 4 rows × 1 (the dequantized block is 4 vectors).
    let (c_gemm, c_gemv) = if planes.is_some() { (1, 4) } else { (2, 4) };
    // A weight larger than the caches is read once per slice, not once per row block.
    let order = if t.n * t.k * 4 > COL_MAJOR_WEIGHT_BYTES {
        UnitOrder::ColMajor { row_blocks: &row_blocks }
    } else {
        UnitOrder::RowMajor { ct: &ct }
    };
    b.parallel(&units, |b, u| {
        let (r0, j0, j_end) = unit_origin(b, u, order, &rbc, &colsc, &nc);
        row_block(b, t.rb, &r0, &rbc, &rows, &|b, r, nr| columns(b, r, nr, &j0, &j_end, if nr == 1 { c_gemv } else { c_gemm }));
    });
}

/// The weight rows `j0..j_end` of a column block, `c` at a time, then the
/// rest one by one: `micro(first weight row, count)`.
pub(super) fn column_groups(b: &mut KernelBuilder, j0: &str, j_end: &str, c: u64, micro: &dyn Fn(&mut KernelBuilder, &str, u64)) {
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
pub(super) fn row_block(b: &mut KernelBuilder, rb: u64, r0: &str, rbc: &str, rows: &str, body: &dyn Fn(&mut KernelBuilder, &str, u64)) {
    if rb == 1 {
        body(b, r0, 1);
        return;
    }
    let r1 = b.addi(r0, rbc);
    let full = b.def(format!("arith.cmpi ule, {r1}, {rows} : index"));
    b.if_else(&full, |b| body(b, r0, rb), |b| b.for_each(r0, rows, |b, r| body(b, r, 1)));
}
