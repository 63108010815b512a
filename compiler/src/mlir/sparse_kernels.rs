//! Sparse matmul kernels at the `generic` level of the specialization dial: the
//! pruned weight arrives packed (CSR, N:M or BSR, `sparsec_ir::sparse`) and its
//! indices are read at run time, so one kernel serves every weight of a shape.
//!
//! `out[r, j] = Σ_k a[r, k]·w[j, k]` over the stored entries of output `j`.
//! CPU: units are (row block, block of `COLS` outputs); a full row block of
//! `ROWS` rows (prefill) shares every index and value load across its rows;
//! CSR runs unrolled scalar sums, N:M expands values into vectors by its
//! bitmap (AVX-512: 16 lanes, one `vexpandps` under the bitmap's 16 bits;
//! AVX2: 8 lanes, a table permutation, `vpermps`), BSR reads
//! contiguous block rows as vectors. NVIDIA: a warp per output element
//! (`sparse_warp`, every format), N:M groups wider than it reads one thread
//! per output element.

use super::builder::{Device, KernelBuilder, V};
use super::kernels::{row_block, strided, unit_origin, UnitOrder};
use sparsec_ir::sparse::{SparseFormat, SparseStorage};
use sparsec_ir::SymSize;

/// Lanes of the vector accumulators (AVX2: 8 × f32).
const VW: u64 = 8;
/// Lanes of the N:M kernel's steps on AVX-512: one `vexpandps` a step.
const EXPAND_LANES: u64 = 16;
/// Rows per CPU unit when the rows are `seq` (prefill's GEMM).
const ROWS: u64 = 4;
/// Outputs per CPU unit.
const COLS: u64 = 32;
/// CSR entries per step of the CPU loop (4: the sums below are written for it).
const CSR_UNROLL: u64 = 4;

/// A sparse matmul's geometry: rows of the activation, the weight's storage.
#[derive(Clone, Copy, Debug)]
pub struct SparseMatmul {
    pub rows: SymSize,
    pub storage: SparseStorage,
    /// The compile allows int8 activations (AVX2): quantized values' kernels may use them.
    pub int8: bool,
    /// The target has `vpdpbusd` (`CpuIsa::vnni`) for those kernels' dot products.
    pub vnni: bool,
    /// f32 lanes of the target's vectors (`CpuIsa::lanes`): at 16 (AVX-512)
    /// the N:M kernel expands values with `vexpandps` instead of a table.
    pub lanes: u32,
}

impl SparseMatmul {
    pub fn nk(&self) -> (u64, u64) {
        self.storage.format.nk()
    }

    /// Rows per CPU unit.
    pub fn rb(&self) -> u64 {
        if self.rows == (SymSize { coef: 1, seq_pow: 1 }) {
            ROWS
        } else {
            1
        }
    }

    pub fn col_tiles(&self) -> u64 {
        self.nk().0.div_ceil(COLS)
    }

    /// Outputs per CPU unit.
    pub fn cols(&self) -> u64 {
        COLS
    }

    /// CPU units, `seq` counted in blocks of `rb` rows.
    pub fn cpu_units(&self) -> SymSize {
        SymSize { coef: self.rows.coef * self.col_tiles(), seq_pow: self.rows.seq_pow }
    }

    /// NVIDIA: whether an output element takes a warp (`sparse_warp`: 32
    /// lanes load its entries at once) rather than a thread.
    pub fn warp_per_output(&self) -> bool {
        super::sparse_warp::serves(&self.storage.format)
    }

    /// NVIDIA: one thread per output element `u = r·n + j`; `body(u, j, arow)`
    /// with `arow` where row `r` of the activations starts.
    pub fn per_output_thread(&self, b: &mut KernelBuilder, body: impl FnOnce(&mut KernelBuilder, &str, &str, &str)) {
        let (n, k) = self.nk();
        let (kc, nc) = (b.index(k), b.index(n));
        let total = b.sym(SymSize { coef: self.rows.coef * n, seq_pow: self.rows.seq_pow });
        b.parallel(&total, |b, u| {
            let r = b.divui(u, &nc);
            let j = b.remui(u, &nc);
            let arow = b.muli(&r, &kc);
            body(b, u, &j, &arow);
        });
    }

    /// CPU: the (row block, output block) units: `(units, output blocks, rows per
    /// block, rows)` as values.
    pub fn cpu_grid(&self, b: &mut KernelBuilder) -> (V, V, V, V) {
        let rows = b.sym(self.rows);
        let rbc = b.index(self.rb());
        let rb_m1 = b.index(self.rb() - 1);
        let rows_up = b.addi(&rows, &rb_m1);
        let row_blocks = b.divui(&rows_up, &rbc);
        let ct = b.index(self.col_tiles());
        let units = b.muli(&row_blocks, &ct);
        (units, ct, rbc, rows)
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
            SparseFormat::Nm { n, k, .. } => {
                Planes { ptr: None, vals, idx: b.plane(buf, lay.indices, n * SparseFormat::bitmap_row_bytes(k), "i8"), idx_ty: "i8" }
            }
            SparseFormat::Bsr { n, rows, blocks, .. } => Planes {
                ptr: Some(b.plane(buf, lay.ptr, n / rows as u64 + 1, "i32")),
                vals,
                idx: b.plane(buf, lay.indices, blocks, "i32"),
                idx_ty: "i32",
            },
            SparseFormat::CsrQ { .. } | SparseFormat::NmQ { .. } | SparseFormat::BsrQ { .. } => {
                unreachable!("emit_sparse_matmul sends quantized values to sparse_quant_kernels")
            }
        }
    }
}

/// Emits the kernel body: `ins[0]` the activations, `ins[1]` the packed weight.
/// Quantized values (`NmQ`, `CsrQ`, `BsrQ`) go to `sparse_quant_kernels.rs`.
pub fn emit_sparse_matmul(b: &mut KernelBuilder, t: &SparseMatmul, ins: &[V], out: &str) {
    let fmt = t.storage.format;
    if fmt.bits().is_some() {
        return super::sparse_quant_kernels::emit_sparse_quant_matmul(b, t, t.int8, ins, out);
    }
    let (n, k) = t.nk();
    let planes = Planes::new(b, &fmt, &ins[1]);
    let a = ins[0].clone();
    let (kc, nc) = (b.index(k), b.index(n));
    match b.device() {
        Device::Nvptx if t.warp_per_output() => {
            let ix = super::sparse_warp::Index { ptr: planes.ptr.as_ref(), idx: &planes.idx, ty: planes.idx_ty };
            super::sparse_warp::emit(b, t, &ix, &super::sparse_warp::Values::F32(&planes.vals), &ins[1], &a, out)
        }
        Device::Nvptx => t.per_output_thread(b, |b, u, j, arow| {
            let ctx = Dot { fmt, planes: &planes, a: &a, vectors: false, expand: false };
            let y = ctx.dot(b, j, &[arow.to_string()]);
            b.store_result(&y[0], out, u);
        }),
        Device::Cpu => {
            let (units, ct, rbc, rows) = t.cpu_grid(b);
            let colsc = b.index(COLS);
            let dot = Dot { fmt, planes: &planes, a: &a, vectors: true, expand: t.lanes >= EXPAND_LANES as u32 };
            let ctx = Cpu { dot, out, kc: &kc, nc: &nc };
            b.parallel(&units, |b, u| {
                let (r0, j0, j_end) = unit_origin(b, u, UnitOrder::RowMajor { ct: &ct }, &rbc, &colsc, &nc);
                row_block(b, t.rb(), &r0, &rbc, &rows, &|b, r, nr| ctx.outputs(b, r, nr, &j0, &j_end));
            });
        }
    }
}

/// For each bitmap byte, the source lane of every lane: the number of set bits
/// below it (unset lanes read lane 0 and are zeroed after).
fn expand_table() -> Vec<i32> {
    (0..256u32).flat_map(|m| (0..VW as u32).map(move |l| (m & ((1 << l) - 1)).count_ones() as i32)).collect()
}

/// For each bitmap byte, every lane's mask: all ones where the bit is set.
fn lane_masks() -> Vec<i32> {
    (0..256u32).flat_map(|m| (0..VW as u32).map(move |l| if m & (1 << l) != 0 { -1 } else { 0 })).collect()
}

/// The CPU kernel's shared values.
struct Cpu<'a> {
    dot: Dot<'a>,
    out: &'a str,
    kc: &'a str,
    nc: &'a str,
}

/// One output's sums over its stored entries: unrolled and vectorized on the
/// CPU (`vectors`), one entry at a time on NVIDIA (and in the CPU's tails).
struct Dot<'a> {
    fmt: SparseFormat,
    planes: &'a Planes,
    a: &'a str,
    vectors: bool,
    /// AVX-512: N:M values expanded 16 lanes at a time (`vexpandps`).
    expand: bool,
}

impl Cpu<'_> {
    /// Outputs `j0..j_end` of rows `r0..r0+nr`.
    fn outputs(&self, b: &mut KernelBuilder, r0: &str, nr: u64, j0: &str, j_end: &str) {
        let arows = strided(b, r0, nr, self.kc);
        b.for_each(j0, j_end, |b, j| {
            let sums = self.dot.dot(b, j, &arows);
            let orows = strided(b, r0, nr, self.nc);
            for (y, orow) in sums.iter().zip(&orows) {
                let o = b.addi(orow, j);
                b.store_result(y, self.out, &o);
            }
        });
    }
}

impl Dot<'_> {
    /// Output `j`'s sums for every row of `arows`.
    fn dot(&self, b: &mut KernelBuilder, j: &str, arows: &[V]) -> Vec<V> {
        let p = self.planes;
        let zero = b.f32(0.0);
        let one = b.index(1);
        let vty = KernelBuilder::vty(VW as u32);
        let nr = arows.len();
        match self.fmt {
            SparseFormat::Csr { .. } => {
                let ptr = p.ptr.clone().unwrap_or_default();
                let lo = b.load_index(&ptr, j, "i32");
                let j1 = b.addi(j, &one);
                let hi = b.load_index(&ptr, &j1, "i32");
                let mut init: Vec<V> = vec![zero.clone(); nr];
                let mut main = lo.clone();
                if self.vectors {
                    // Unrolled by `CSR_UNROLL` with as many independent sums per row: every
                    // entry is three scalar loads and an FMA, with no gather (which LLVM
                    // scalarizes on AMD cores, and which is slow where it does not).
                    let len = b.def(format!("arith.subi {hi}, {lo} : index"));
                    let u = b.index(CSR_UNROLL);
                    let whole = b.divui(&len, &u);
                    let whole = b.muli(&whole, &u);
                    main = b.addi(&lo, &whole);
                    let accs0: Vec<(V, String)> = (0..nr as u64 * CSR_UNROLL).map(|_| (zero.clone(), "f32".to_string())).collect();
                    let accs = b.for_fold_typed(&lo, &main, CSR_UNROLL, &accs0, |b, q, accs| {
                        let mut next = accs.to_vec();
                        for t in 0..CSR_UNROLL as usize {
                            let ti = b.index(t as u64);
                            let qt = b.addi(q, &ti);
                            let v = b.load_elem(&p.vals, &qt, "f32");
                            let c = b.load_index(&p.idx, &qt, p.idx_ty);
                            for (r, ar) in arows.iter().enumerate() {
                                let ai = b.addi(ar, &c);
                                let x = b.load(self.a, &ai);
                                let at = r * CSR_UNROLL as usize + t;
                                next[at] = b.fma(&v, &x, &accs[at]);
                            }
                        }
                        next
                    });
                    init = (0..nr)
                        .map(|r| {
                            let w = CSR_UNROLL as usize;
                            let s01 = b.add(&accs[r * w], &accs[r * w + 1]);
                            let s23 = b.add(&accs[r * w + 2], &accs[r * w + 3]);
                            b.add(&s01, &s23)
                        })
                        .collect();
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
            SparseFormat::Nm { k, .. } => {
                let per_row = self.fmt.stored_values() / self.fmt.nk().0.max(1);
                let prc = b.index(per_row);
                let base = b.muli(j, &prc);
                let rbytes = b.index(SparseFormat::bitmap_row_bytes(k));
                let mbase = b.muli(j, &rbytes);
                let zi = b.index(0);
                // AVX-512 steps of 16 k where they tile the row, else AVX2's 8.
                let lanes = if self.expand && k.is_multiple_of(EXPAND_LANES) { EXPAND_LANES } else { VW };
                let (lw, lty) = (lanes as u32, KernelBuilder::vty(lanes as u32));
                let steps = if self.vectors && k.is_multiple_of(lanes) { k / lanes } else { 0 };
                let mut accs: Vec<V> = vec![zero.clone(); nr];
                if steps > 0 {
                    // `lanes` consecutive k per step: the bitmap bits say which lanes
                    // are kept, the row's next values are moved into those lanes
                    // (AVX-512: one `vexpandps` from memory under the 16-bit mask;
                    // AVX2: a permutation, `vpermps`, from a table, the unset lanes
                    // zeroed by another) and multiplied with the contiguous
                    // activations. Two sums per row hide the FMA latency.
                    let pairs = steps / 2;
                    let fixed_step = match self.fmt {
                        SparseFormat::Nm { keep, group, .. } if lanes.is_multiple_of(group as u64) => {
                            Some(lanes / group as u64 * keep as u64)
                        }
                        _ => None,
                    };
                    let tables = (lanes == VW).then(|| (b.i32_table("nm_expand", &expand_table()), b.i32_table("nm_lanes", &lane_masks())));
                    let vzl = b.vzero(lw);
                    let mut init: Vec<(V, String)> = (0..2 * nr).map(|_| (vzl.clone(), lty.clone())).collect();
                    init.push((zi.clone(), "index".into()));
                    let step = |b: &mut KernelBuilder, st: &str, off: &str, accs: &[V]| -> (Vec<V>, V) {
                        let nbytes = b.index(lanes / 8);
                        let mb = b.muli(st, &nbytes);
                        let mi = b.addi(&mbase, &mb);
                        let at = b.addi(&base, off);
                        let (w, count) = match &tables {
                            None => {
                                let (w, word) = b.expand16(&p.idx, &mi, &p.vals, &at);
                                (w, (word, "i16"))
                            }
                            Some((lut, masks)) => {
                                let byte = b.load_elem(&p.idx, &mi, "i8");
                                // Lane l takes the row's value number rank(l) (set bits below l).
                                let bi = b.def(format!("arith.index_castui {byte} : i8 to index"));
                                let vw = b.index(VW);
                                let ti = b.muli(&bi, &vw);
                                let perm = b.def(format!("vector.load {lut}[{ti}] : memref<{}xi32>, vector<{VW}xi32>", 256 * VW));
                                let vals = b.def(format!("vector.load {}[{at}] : memref<?xf32>, {vty}", p.vals));
                                let moved = b.def(format!(
                                    "llvm.call_intrinsic \"llvm.x86.avx2.permps\"({vals}, {perm}) : ({vty}, vector<{VW}xi32>) -> {vty}"
                                ));
                                let keep = b.def(format!("vector.load {masks}[{ti}] : memref<{}xi32>, vector<{VW}xi32>", 256 * VW));
                                let mi = b.def(format!("vector.bitcast {moved} : {vty} to vector<{VW}xi32>"));
                                let kept = b.def(format!("arith.andi {mi}, {keep} : vector<{VW}xi32>"));
                                (b.def(format!("vector.bitcast {kept} : vector<{VW}xi32> to {vty}")), (byte, "i8"))
                            }
                        };
                        // Values per step: fixed when groups tile the lanes, else counted.
                        let next = match fixed_step {
                            Some(c) => {
                                let c = b.index(c);
                                b.addi(off, &c)
                            }
                            None => {
                                let (bits, ty) = count;
                                let cnt = b.def(format!("math.ctpop {bits} : {ty}"));
                                let cnt = b.def(format!("arith.index_castui {cnt} : {ty} to index"));
                                b.addi(off, &cnt)
                            }
                        };
                        let lc = b.index(lanes);
                        let k0 = b.muli(st, &lc);
                        let out = arows
                            .iter()
                            .zip(accs)
                            .map(|(ar, acc)| {
                                let ai = b.addi(ar, &k0);
                                let x = b.vload(self.a, &ai, lw);
                                b.vfma(&w, &x, acc, lw)
                            })
                            .collect();
                        (out, next)
                    };
                    let pc = b.index(pairs);
                    let res = b.for_fold_typed(&zi, &pc, 1, &init, |b, pi, carried| {
                        let off = carried[2 * nr].clone();
                        let two = b.index(2);
                        let s0 = b.muli(pi, &two);
                        let (a0, off) = step(b, &s0, &off, &carried[..nr]);
                        let one = b.index(1);
                        let s1 = b.addi(&s0, &one);
                        let (a1, off) = step(b, &s1, &off, &carried[nr..2 * nr]);
                        a0.into_iter().chain(a1).chain([off]).collect()
                    });
                    let mut sums: Vec<V> = (0..nr).map(|r| b.def(format!("arith.addf {}, {} : {lty}", res[r], res[nr + r]))).collect();
                    if steps % 2 == 1 {
                        let last = b.index(steps - 1);
                        sums = step(b, &last, &res[2 * nr], &sums).0;
                    }
                    accs = sums.iter().map(|v| b.vsum(v, lw)).collect();
                }
                // The rest of the row (all of it when not vectorized), one k at a
                // time: a kept k takes the row's next value.
                let last = b.index(self.fmt.stored_values().max(1) - 1);
                let (kf, kt) = (b.index(steps * lanes), b.index(k));
                let first_off = b.index(0);
                let mut init: Vec<(V, String)> = accs.iter().map(|a| (a.clone(), "f32".to_string())).collect();
                // Values before `kf` were consumed by the vector steps: count them.
                // (the vector steps cover whole rows: `steps · lanes = k` when they run).
                let consumed = if steps > 0 { prc.clone() } else { first_off };
                init.push((consumed, "index".into()));
                let res = b.for_fold_typed(&kf, &kt, 1, &init, |b, kk, carried| {
                    let off = carried[nr].clone();
                    let eight = b.index(8);
                    let bi = b.divui(kk, &eight);
                    let bi = b.addi(&mbase, &bi);
                    let byte = b.load_elem(&p.idx, &bi, "i8");
                    let sh = b.remui(kk, &eight);
                    let sh = b.def(format!("arith.index_cast {sh} : index to i8"));
                    let bit = b.def(format!("arith.shrui {byte}, {sh} : i8"));
                    let one8 = b.def("arith.constant 1 : i8".into());
                    let bit = b.def(format!("arith.andi {bit}, {one8} : i8"));
                    let zero8 = b.def("arith.constant 0 : i8".into());
                    let on = b.def(format!("arith.cmpi ne, {bit}, {zero8} : i8"));
                    let q = b.addi(&base, &off);
                    let q = b.def(format!("arith.minui {q}, {last} : index"));
                    let v = b.load_elem(&p.vals, &q, "f32");
                    let v = b.def(format!("arith.select {on}, {v}, {zero} : f32"));
                    let inc = b.def(format!("arith.index_castui {bit} : i8 to index"));
                    let next = b.addi(&off, &inc);
                    let mut out: Vec<V> = arows
                        .iter()
                        .zip(carried)
                        .map(|(ar, acc)| {
                            let ai = b.addi(ar, kk);
                            let x = b.load(self.a, &ai);
                            b.fma(&v, &x, acc)
                        })
                        .collect();
                    out.push(next);
                    out
                });
                res[..nr].to_vec()
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
                let lanes = [8u64, 4].into_iter().find(|l| self.vectors && c.is_multiple_of(*l)).unwrap_or(1);
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
            SparseFormat::CsrQ { .. } | SparseFormat::NmQ { .. } | SparseFormat::BsrQ { .. } => {
                unreachable!("emit_sparse_matmul sends quantized values to sparse_quant_kernels")
            }
        }
    }
}
