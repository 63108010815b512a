//! One kernel per compute op, written against `KernelBuilder`: the lowering of
//! every IR op to MLIR. Buffers are flat f32 arrays; shapes are baked in except
//! `seq`, which arrives at run time.

use super::builder::{Device, KernelBuilder, V};
use super::math;
use crate::error::CompileError;
use sparsec_ir::{GeluApprox, Op, Pattern, SymSize, TensorType, Window};

/// Lanes of the CPU vector kernels (AVX2: 8 × f32).
const VW: u32 = 8;

/// What a kernel computes: the op, its operand types and its result type.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub name: String,
    pub op: Op,
    pub operands: Vec<TensorType>,
    pub result: TensorType,
    /// The op's patterns (attention windows, ...).
    pub patterns: Vec<Pattern>,
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

    /// Units of the CPU kernel's parallel loop (what the runtime splits over
    /// threads): rows for matmul, else the same as `work`.
    pub fn cpu_work(&self) -> Result<SymSize, CompileError> {
        match &self.op {
            Op::MatMul { .. } => {
                let n = fixed_last(self, &self.result)?;
                let numel = self.result.numel();
                Ok(SymSize { coef: numel.coef / n.max(1), ..numel })
            }
            _ => self.work(),
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
    if let Some(t) = spec
        .operands
        .iter()
        .chain([&spec.result])
        .find(|t| !matches!(t.dtype, sparsec_ir::DType::F32 | sparsec_ir::DType::I32))
    {
        return Err(spec.unsupported(&format!("element type {} (f32 and i32 only for now)", t.dtype.name())));
    }
    let mut b = KernelBuilder::new(device);
    let ins: Vec<V> = (0..spec.operands.len()).map(|i| format!("%in{i}")).collect();
    let out: V = "%out".into();
    let work = spec.work()?;
    let work = b.sym(work);
    match &spec.op {
        Op::Input | Op::Weight { .. } | Op::Constant { .. } => {
            return Err(spec.unsupported("leaves are data, not kernels"))
        }
        Op::Gelu { .. } | Op::Silu => {
            let op = spec.op.clone();
            b.parallel(&work, |b, i| {
                let x = b.load(&ins[0], i);
                let y = match op {
                    Op::Gelu { approx: GeluApprox::Tanh } => {
                        // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
                        let c = b.f32((2.0f32 / std::f32::consts::PI).sqrt());
                        let k = b.f32(0.044715);
                        let x2 = b.mul(&x, &x);
                        let x3 = b.mul(&x2, &x);
                        let inner = b.fma(&k, &x3, &x);
                        let arg = b.mul(&c, &inner);
                        let t = math::tanh(b, &arg);
                        let one = b.f32(1.0);
                        let half = b.f32(0.5);
                        let s = b.add(&one, &t);
                        let hx = b.mul(&half, &x);
                        b.mul(&hx, &s)
                    }
                    Op::Gelu { approx: GeluApprox::Erf } => {
                        let r = b.f32(std::f32::consts::FRAC_1_SQRT_2);
                        let arg = b.mul(&x, &r);
                        let e = math::erf(b, &arg);
                        let one = b.f32(1.0);
                        let half = b.f32(0.5);
                        let s = b.add(&one, &e);
                        let hx = b.mul(&half, &x);
                        b.mul(&hx, &s)
                    }
                    _ => {
                        let s = math::sigmoid(b, &x);
                        b.mul(&x, &s)
                    }
                };
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
                let y = b.fbin(fop, &vals[0], &vals[1]);
                b.store(&y, &out, i);
            });
        }
        Op::MatMul { transpose_b } => {
            let k = fixed_last(spec, &spec.operands[0])?;
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
                    let w = b.load(&w_buf, &bi);
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
                            b.store(&y, &out, &o);
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
                            b.store(&y, &out, &o);
                        });
                    });
                }
                Device::Nvptx => {
                    b.parallel(&work, |b, e| {
                        let r = b.divui(e, &nc);
                        let j = b.remui(e, &nc);
                        let y = dot(b, &r, &j);
                        b.store(&y, &out, e);
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
                    vec![b.fbin("maximumf", &acc[0], &x)]
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
                let v = b.load(&ins[0], &src);
                b.store(&v, &out, e);
            });
        }
        Op::Positions => {
            b.parallel(&work, |b, e| {
                let i = b.def(format!("arith.index_cast {e} : index to i64"));
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
            // θ^(−2/d); the pair's frequency is its i-th power, by i products in f64
            // (no transcendental needed on either target).
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
                let freq = b.for_fold_typed(&zero_i, &i, 1, &[(one_f64.clone(), "f64".to_string())], |b, _, acc| {
                    vec![b.def(format!("arith.mulf {}, {base_freq} : f64", acc[0]))]
                });
                let freq = freq[0].clone();
                let pi = b.def(format!("arith.index_cast {row} : index to i64"));
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
            let win = window.map(|(size, sinks)| (b.index(size as u64), b.index(sinks as u64)));
            b.parallel(&work, |b, unit| {
                // unit = row * heads + head; online softmax over keys 0..=row,
                // accumulating the weighted values in the output row itself.
                let row = b.divui(unit, &hc);
                let head = b.remui(unit, &hc);
                let kh = b.divui(&head, &groupc);
                let qrow = b.muli(&row, &qwc);
                let qhd = b.muli(&head, &dc);
                let qbase = b.addi(&qrow, &qhd);
                let khd = b.muli(&kh, &dc);
                b.for_each(&zero_i, &dc, |b, c| {
                    let o = b.addi(&qbase, c);
                    b.store(&zero, &out, &o);
                });
                let end = b.addi(&row, &one_i);
                let ml = b.for_fold(&zero_i, &end, &[ninf.clone(), zero.clone()], |b, j, acc| {
                    let kbase0 = b.muli(j, &kvwc);
                    let kbase = b.addi(&kbase0, &khd);
                    let dot = b.for_fold(&zero_i, &dc, &[zero.clone()], |b, c, a| {
                        let qi = b.addi(&qbase, c);
                        let ki = b.addi(&kbase, c);
                        let qv = b.load(&ins[0], &qi);
                        let kv = b.load(&ins[1], &ki);
                        vec![b.fma(&qv, &kv, &a[0])]
                    });
                    let s = b.mul(&dot[0], &scale);
                    // A key outside the window gets -inf (weight 0).
                    let s = match &win {
                        None => s,
                        Some((size, sinks)) => {
                            let jp = b.addi(j, size);
                            let recent = b.def(format!("arith.cmpi ugt, {jp}, {row} : index"));
                            let sink = b.def(format!("arith.cmpi ult, {j}, {sinks} : index"));
                            let vis = b.def(format!("arith.ori {recent}, {sink} : i1"));
                            b.def(format!("arith.select {vis}, {s}, {ninf} : f32"))
                        }
                    };
                    let m_new = b.fbin("maximumf", &acc[0], &s);
                    let dm = b.sub(&acc[0], &m_new);
                    let corr = math::exp(b, &dm);
                    let ds = b.sub(&s, &m_new);
                    let p = math::exp(b, &ds);
                    let l = b.fma(&acc[1], &corr, &p);
                    b.for_each(&zero_i, &dc, |b, c| {
                        let o = b.addi(&qbase, c);
                        let vi = b.addi(&kbase, c);
                        let prev = b.load(&out, &o);
                        let vv = b.load(&ins[2], &vi);
                        let pv = b.mul(&p, &vv);
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
    let mut params = ins.clone();
    params.push(out);
    Ok(b.finish(&spec.name, &params))
}
