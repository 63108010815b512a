//! Sparse matmul kernels at the `generic` level of the specialization dial: the
//! pruned weight arrives packed (CSR, N:M or BSR, `sparsec_ir::sparse`) and its
//! indices are read at run time, so one kernel serves every weight of a shape.
//!
//! `out[r, j] = Σ_k a[r, k]·w[j, k]` over the stored entries of output `j`.
//! CPU: units are (row block, block of `COLS` outputs); a full row block of
//! `ROWS` rows (prefill) shares every index and value load across its rows;
//! CSR and N:M gather 8 activations per step (`vector.gather`), BSR reads
//! contiguous block rows as vectors. NVIDIA: one thread per output element.

use super::builder::{Device, KernelBuilder, V};
use super::kernels::unit_origin;
use sparsec_ir::sparse::{SparseFormat, SparseStorage};
use sparsec_ir::SymSize;

/// Lanes of the gathers and vector accumulators (AVX2: 8 × f32).
const VW: u64 = 8;
/// Rows per CPU unit when the rows are `seq` (prefill's GEMM).
const ROWS: u64 = 4;
/// Outputs per CPU unit.
const COLS: u64 = 32;

/// A sparse matmul's geometry: rows of the activation, the weight's storage.
#[derive(Clone, Copy, Debug)]
pub struct SparseMatmul {
    pub rows: SymSize,
    pub storage: SparseStorage,
}

impl SparseMatmul {
    fn nk(&self) -> (u64, u64) {
        match self.storage.format {
            SparseFormat::Csr { n, k, .. } | SparseFormat::Nm { n, k, .. } | SparseFormat::Bsr { n, k, .. } => (n, k),
        }
    }

    /// Rows per CPU unit.
    pub fn rb(&self) -> u64 {
        if self.rows == (SymSize { coef: 1, seq_pow: 1 }) {
            ROWS
        } else {
            1
        }
    }

    fn col_tiles(&self) -> u64 {
        self.nk().0.div_ceil(COLS)
    }

    /// CPU units, `seq` counted in blocks of `rb` rows.
    pub fn cpu_units(&self) -> SymSize {
        SymSize { coef: self.rows.coef * self.col_tiles(), seq_pow: self.rows.seq_pow }
    }

    /// Rough scalar operations per CPU unit.
    pub fn unit_cost(&self) -> u64 {
        let per_output = self.storage.format.stored_values() / self.nk().0.max(1);
        self.rb() * COLS * per_output.max(1) * 2
    }
}

/// The planes of the packed weight: index pointers, values, indices.
struct Planes {
    ptr: Option<V>,
    vals: V,
    idx: V,
    /// Element type of `idx`.
    idx_ty: &'static str,
}

impl Planes {
    fn new(b: &mut KernelBuilder, fmt: &SparseFormat, buf: &str) -> Planes {
        let lay = fmt.layout();
        let nv = fmt.stored_values();
        let vals = b.plane(buf, lay.values, nv, "f32");
        match *fmt {
            SparseFormat::Csr { n, k, nnz } => {
                let ty = if SparseFormat::csr_index_bytes(k) == 2 { "i16" } else { "i32" };
                Planes { ptr: Some(b.plane(buf, lay.ptr, n + 1, "i32")), vals, idx: b.plane(buf, lay.indices, nnz, ty), idx_ty: ty }
            }
            SparseFormat::Nm { .. } => Planes { ptr: None, vals, idx: b.plane(buf, lay.indices, nv, "i8"), idx_ty: "i8" },
            SparseFormat::Bsr { n, rows, blocks, .. } => Planes {
                ptr: Some(b.plane(buf, lay.ptr, n / rows as u64 + 1, "i32")),
                vals,
                idx: b.plane(buf, lay.indices, blocks, "i32"),
                idx_ty: "i32",
            },
        }
    }
}

/// Emits the kernel body: `ins[0]` the activations, `ins[1]` the packed weight.
pub fn emit_sparse_matmul(b: &mut KernelBuilder, t: &SparseMatmul, ins: &[V], out: &str) {
    let fmt = t.storage.format;
    let (n, k) = t.nk();
    let planes = Planes::new(b, &fmt, &ins[1]);
    let a = ins[0].clone();
    let (kc, nc) = (b.index(k), b.index(n));
    match b.device() {
        Device::Nvptx => {
            let total = b.sym(SymSize { coef: t.rows.coef * n, seq_pow: t.rows.seq_pow });
            b.parallel(&total, |b, u| {
                let r = b.divui(u, &nc);
                let j = b.remui(u, &nc);
                let arow = b.muli(&r, &kc);
                let ctx = Dot { fmt, planes: &planes, a: &a, vectors: false, all: "" };
                let y = ctx.dot(b, &j, &[arow]);
                b.store(&y[0], out, u);
            });
        }
        Device::Cpu => {
            let rows = b.sym(t.rows);
            let rbc = b.index(t.rb());
            let rb_m1 = b.index(t.rb() - 1);
            let rows_up = b.addi(&rows, &rb_m1);
            let row_blocks = b.divui(&rows_up, &rbc);
            let ct = b.index(t.col_tiles());
            let units = b.muli(&row_blocks, &ct);
            let colsc = b.index(COLS);
            let all = b.def(format!("arith.constant dense<true> : vector<{VW}xi1>"));
            let dot = Dot { fmt, planes: &planes, a: &a, vectors: true, all: &all };
            let ctx = Cpu { dot, out, kc: &kc, nc: &nc };
            b.parallel(&units, |b, u| {
                let (r0, j0, j_end) = unit_origin(b, u, &ct, &rbc, &colsc, &nc);
                if t.rb() == 1 {
                    ctx.outputs(b, &r0, 1, &j0, &j_end);
                } else {
                    let r1 = b.addi(&r0, &rbc);
                    let full = b.def(format!("arith.cmpi ule, {r1}, {rows} : index"));
                    b.if_else(
                        &full,
                        |b| ctx.outputs(b, &r0, t.rb(), &j0, &j_end),
                        |b| b.for_each(&r0, &rows, |b, r| ctx.outputs(b, r, 1, &j0, &j_end)),
                    );
                }
            });
        }
    }
}

/// The CPU kernel's shared values.
struct Cpu<'a> {
    dot: Dot<'a>,
    out: &'a str,
    kc: &'a str,
    nc: &'a str,
}

/// One output's sums over its stored entries: with 8-lane gathers and vector
/// loads (`vectors`, CPU), or one entry at a time (NVIDIA, and the CPU's tails).
struct Dot<'a> {
    fmt: SparseFormat,
    planes: &'a Planes,
    a: &'a str,
    vectors: bool,
    /// An all-true gather mask (when `vectors`).
    all: &'a str,
}

impl Cpu<'_> {
    /// Outputs `j0..j_end` of rows `r0..r0+nr`.
    fn outputs(&self, b: &mut KernelBuilder, r0: &str, nr: u64, j0: &str, j_end: &str) {
        let arows: Vec<V> = (0..nr)
            .map(|r| {
                let ri = b.index(r);
                let row = b.addi(r0, &ri);
                b.muli(&row, self.kc)
            })
            .collect();
        b.for_each(j0, j_end, |b, j| {
            let sums = self.dot.dot(b, j, &arows);
            for (r, y) in sums.iter().enumerate() {
                let ri = b.index(r as u64);
                let row = b.addi(r0, &ri);
                let orow = b.muli(&row, self.nc);
                let o = b.addi(&orow, j);
                b.store(y, self.out, &o);
            }
        });
    }

}

impl Dot<'_> {
    /// Gathers `a[arow + idx[lane]]` for 8 lanes (`idx` a vector<8xi32>).
    fn gather(&self, b: &mut KernelBuilder, arow: &str, idx: &str) -> V {
        let z = b.vzero(VW as u32);
        b.def(format!(
            "vector.gather {}[{arow}][{idx}], {}, {z} : memref<?xf32>, vector<{VW}xi32>, vector<{VW}xi1>, vector<{VW}xf32> into vector<{VW}xf32>",
            self.a, self.all
        ))
    }

    /// One vector step: the 8 values at `at` times the activations at columns
    /// `cols` (a vector<8xi32>) of every row, added to the rows' accumulators.
    fn gather_fma(&self, b: &mut KernelBuilder, at: &str, cols: &str, arows: &[V], accs: &[V]) -> Vec<V> {
        let v = b.def(format!("vector.load {}[{at}] : memref<?xf32>, vector<{VW}xf32>", self.planes.vals));
        arows
            .iter()
            .zip(accs)
            .map(|(ar, acc)| {
                let x = self.gather(b, ar, cols);
                b.vfma(&v, &x, acc, VW as u32)
            })
            .collect()
    }

    /// Output `j`'s sums for every row of `arows`.
    fn dot(&self, b: &mut KernelBuilder, j: &str, arows: &[V]) -> Vec<V> {
        let p = self.planes;
        let zero = b.f32(0.0);
        let one = b.index(1);
        let vz = b.vzero(VW as u32);
        let vty = KernelBuilder::vty(VW as u32);
        let nr = arows.len();
        match self.fmt {
            SparseFormat::Csr { .. } => {
                let ptr = p.ptr.clone().unwrap_or_default();
                let lo = b.load_index(&ptr, j, "i32");
                let j1 = b.addi(j, &one);
                let hi = b.load_index(&ptr, &j1, "i32");
                let len = b.def(format!("arith.subi {hi}, {lo} : index"));
                let w = b.index(VW);
                let whole = b.divui(&len, &w);
                let whole = b.muli(&whole, &w);
                let main = if self.vectors { b.addi(&lo, &whole) } else { lo.clone() };
                let mut init: Vec<V> = vec![zero.clone(); nr];
                if self.vectors {
                    // 8 entries per step: their values and columns as vectors, the activations gathered.
                    let vinit: Vec<(V, String)> = (0..nr).map(|_| (vz.clone(), vty.clone())).collect();
                    let vaccs = b.for_fold_typed(&lo, &main, VW, &vinit, |b, q, accs| {
                        let raw = b.def(format!("vector.load {}[{q}] : memref<?x{}>, vector<{VW}x{}>", p.idx, p.idx_ty, p.idx_ty));
                        let cols = if p.idx_ty == "i32" {
                            raw
                        } else {
                            b.def(format!("arith.extui {raw} : vector<{VW}x{}> to vector<{VW}xi32>", p.idx_ty))
                        };
                        self.gather_fma(b, q, &cols, arows, accs)
                    });
                    init = vaccs.iter().map(|v| b.vsum(v, VW as u32)).collect();
                }
                b.for_fold(&main, &hi, &init, |b, q, accs| {
                    let v = b.load_elem(&p.vals, q, "f32");
                    let c = b.load_index(&p.idx, q, p.idx_ty);
                    arows
                        .iter()
                        .zip(accs)
                        .map(|(ar, acc)| {
                            let ai = b.addi(ar, &c);
                            let x = b.load(self.a, &ai);
                            b.fma(&v, &x, acc)
                        })
                        .collect()
                })
            }
            SparseFormat::Nm { k, keep, group, .. } => {
                let groups = k / group as u64;
                let stored = groups * keep as u64;
                let per_row = b.index(stored);
                let base = b.muli(j, &per_row);
                let (nz, m) = (keep as u64, group as u64);
                // Vector steps of 8 stored values = 8/nz whole groups, when nz divides 8.
                let (vec_values, lane_k) = if self.vectors && VW % nz == 0 && stored >= VW {
                    let lanes: Vec<String> = (0..VW).map(|l| ((l / nz) * m).to_string()).collect();
                    (stored / VW * VW, Some(b.def(format!("arith.constant dense<[{}]> : vector<{VW}xi32>", lanes.join(", ")))))
                } else {
                    (0, None)
                };
                let mut accs: Vec<V> = vec![zero.clone(); nr];
                if let Some(lane_k) = lane_k {
                    let (zi, vend) = (b.index(0), b.index(vec_values));
                    let init: Vec<(V, String)> = (0..nr).map(|_| (vz.clone(), vty.clone())).collect();
                    let vaccs = b.for_fold_typed(&zi, &vend, VW, &init, |b, q, accs| {
                        let at = b.addi(&base, q);
                        let raw = b.def(format!("vector.load {}[{at}] : memref<?xi8>, vector<{VW}xi8>", p.idx));
                        let slots = b.def(format!("arith.extui {raw} : vector<{VW}xi8> to vector<{VW}xi32>"));
                        // The first k of this step: (q / nz)·m.
                        let nzc = b.index(nz);
                        let mc = b.index(m);
                        let g0 = b.divui(q, &nzc);
                        let k0 = b.muli(&g0, &mc);
                        let k0 = b.def(format!("arith.index_cast {k0} : index to i32"));
                        let k0v = b.def(format!("vector.broadcast {k0} : i32 to vector<{VW}xi32>"));
                        let cols = b.def(format!("arith.addi {slots}, {lane_k} : vector<{VW}xi32>"));
                        let cols = b.def(format!("arith.addi {cols}, {k0v} : vector<{VW}xi32>"));
                        self.gather_fma(b, &at, &cols, arows, accs)
                    });
                    accs = vaccs.iter().map(|v| b.vsum(v, VW as u32)).collect();
                }
                // The remaining groups, one stored value at a time.
                let (g_from, g_to) = (b.index(vec_values / nz), b.index(groups));
                b.for_fold(&g_from, &g_to, &accs, |b, g, accs| {
                    let mc = b.index(m);
                    let kb = b.muli(g, &mc);
                    let nzc = b.index(nz);
                    let pg = b.muli(g, &nzc);
                    let pg = b.addi(&base, &pg);
                    let mut s = accs.to_vec();
                    for slot in 0..nz {
                        let si = b.index(slot);
                        let q = b.addi(&pg, &si);
                        let v = b.load_elem(&p.vals, &q, "f32");
                        let tpos = b.load_index(&p.idx, &q, "i8");
                        let kk = b.addi(&kb, &tpos);
                        for (r, ar) in arows.iter().enumerate() {
                            let ai = b.addi(ar, &kk);
                            let x = b.load(self.a, &ai);
                            s[r] = b.fma(&v, &x, &s[r]);
                        }
                    }
                    s
                })
            }
            SparseFormat::Bsr { rows, cols, .. } => {
                let ptr = p.ptr.clone().unwrap_or_default();
                let (rc, cc) = (b.index(rows as u64), b.index(cols as u64));
                let bi = b.divui(j, &rc);
                let i = b.remui(j, &rc);
                let lo = b.load_index(&ptr, &bi, "i32");
                let bi1 = b.addi(&bi, &one);
                let hi = b.load_index(&ptr, &bi1, "i32");
                let bsz = b.index(rows as u64 * cols as u64);
                let ioff = b.muli(&i, &cc);
                let c = cols as u64;
                let lanes = [8u64, 4].into_iter().find(|l| self.vectors && c % l == 0).unwrap_or(1);
                if lanes == 1 {
                    return b.for_fold(&lo, &hi, &vec![zero; nr], |b, q, accs| {
                        let bc = b.load_index(&p.idx, q, "i32");
                        let kb = b.muli(&bc, &cc);
                        let vb = b.muli(q, &bsz);
                        let vb = b.addi(&vb, &ioff);
                        let mut s = accs.to_vec();
                        for t in 0..c {
                            let ti = b.index(t);
                            let vi = b.addi(&vb, &ti);
                            let v = b.load_elem(&p.vals, &vi, "f32");
                            let kk = b.addi(&kb, &ti);
                            for (r, ar) in arows.iter().enumerate() {
                                let ai = b.addi(ar, &kk);
                                let x = b.load(self.a, &ai);
                                s[r] = b.fma(&v, &x, &s[r]);
                            }
                        }
                        s
                    });
                }
                let lw = lanes as u32;
                let lz = b.vzero(lw);
                let init: Vec<(V, String)> = (0..nr).map(|_| (lz.clone(), KernelBuilder::vty(lw))).collect();
                let vaccs = b.for_fold_typed(&lo, &hi, 1, &init, |b, q, accs| {
                    let bc = b.load_index(&p.idx, q, "i32");
                    let kb = b.muli(&bc, &cc);
                    let vb = b.muli(q, &bsz);
                    let vb = b.addi(&vb, &ioff);
                    let mut s = accs.to_vec();
                    for t in (0..c).step_by(lanes as usize) {
                        let ti = b.index(t);
                        let vi = b.addi(&vb, &ti);
                        let v = b.def(format!("vector.load {}[{vi}] : memref<?xf32>, vector<{lw}xf32>", p.vals));
                        let kk = b.addi(&kb, &ti);
                        for (r, ar) in arows.iter().enumerate() {
                            let ai = b.addi(ar, &kk);
                            let x = b.vload(self.a, &ai, lw);
                            s[r] = b.vfma(&v, &x, &s[r], lw);
                        }
                    }
                    s
                });
                vaccs.iter().map(|v| b.vsum(v, lw)).collect()
            }
        }
    }
}
