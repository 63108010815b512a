//! Sparse matmul kernels for weights whose kept values are stored quantized
//! (`NmQ`, `CsrQ`, `BsrQ` of `sparsec_ir::sparse`, values laid out by
//! `sparsec_ir::sparse_quant`), `generic` level: indices and values read at run
//! time, `out[r, j] = Σ_k a[r, k]·w[j, k]` over the stored entries of output `j`.
//!
//! `generic` (CPU and NVIDIA, every format × {q8, q4}): each stored value is
//! dequantized where it is used (`d·q`, `d·q + m`), with the same units as
//! `sparse_kernels.rs` (CPU: row block × 32 outputs; NVIDIA: a warp per output,
//! `sparse_warp.rs`, or a thread where N:M groups are wider than it reads).
//!
//! 2:4 with 4-bit values and int8 activations (CPU, AVX2, `k` a multiple of 64):
//! every row of activations is quantized to int8 in blocks of 64 (one f32 scale
//! each), and each 64-weight step of a weight row (one block of 32 kept values:
//! 16 bytes of nibbles, an f16 scale and minimum, 8 bitmap bytes) gathers its 32
//! kept activations with two `vpshufb`s and a dword blend. The shuffle control
//! comes from the bitmap alone: each group's nibble (picked by a byte shuffle
//! and a per-dword shift) indexes one 16-entry table that gives the first kept
//! position at the nibble and the second at the nibble with its low bit
//! flipped, plus the group's place in its 16-byte lane. The quants lie in the
//! gather's order (`sparse_quant::slot`), so `Σ q·x` is one `vpmaddubsw` +
//! `vpmaddwd` (one `vpdpbusd` with VNNI), and `Σ x` over the kept positions
//! (what the minimum multiplies) another. A GEMV micro-kernel runs two weight rows at once, forms each row's
//! step scales `d·dx`, `m·dx` eight steps to a vector before its loop, keeps
//! two accumulators per output (one FMA chain each), and prefetches its rows'
//! quants and bitmap as one stream.

use super::builder::{Device, KernelBuilder, V};
use super::kernels::{column_groups, row_block, strided, unit_origin, walk_row_blocks, UnitOrder};
use super::quant_dot::dot_u8_i8;
use super::sparse_kernels::SparseMatmul;
use sparsec_ir::sparse::SparseFormat;
use sparsec_ir::sparse_quant::{CsrIndex, QBits};

/// Outputs per CPU unit (as `sparse_kernels.rs`).
const COLS: u64 = 32;
/// Positions per step of the 2:4 kernel (one block of 32 kept values).
const STEP: u64 = 64;
/// How far ahead of its loads the 2:4 GEMV prefetches quants and bitmap bytes.
const PREFETCH_BYTES: u64 = 8192;

/// The planes of a packed quantized sparse weight.
pub(super) struct QPlanes {
    pub(super) bits: QBits,
    pub(super) q: V,
    pub(super) d: V,
    pub(super) m: Option<V>,
    /// Row (CSR) or block-row (BSR) pointers.
    pub(super) ptr: Option<V>,
    /// Bitmap (i8), columns (i16/i32) or block columns (i32).
    pub(super) idx: V,
    pub(super) idx_ty: &'static str,
}

impl QPlanes {
    pub(super) fn new(b: &mut KernelBuilder, fmt: &SparseFormat, bits: QBits, buf: &str) -> QPlanes {
        let lay = fmt.layout();
        let vp = sparsec_ir::sparse_quant::value_planes(bits, lay.values, fmt.stored_values());
        let q = b.plane(buf, vp.q, vp.blocks * bits.quant_bytes(), "i8");
        let d = b.f16_plane(buf, vp.d, vp.blocks);
        let m = (bits == QBits::Q4).then(|| b.f16_plane(buf, vp.m, vp.blocks));
        let (n, k) = fmt.nk();
        let bitmap = |b: &mut KernelBuilder| b.plane(buf, lay.indices, n * SparseFormat::bitmap_row_bytes(k), "i8");
        let (ptr, idx, idx_ty) = match *fmt {
            SparseFormat::CsrQ { nnz, .. } => {
                let ptr = Some(b.plane(buf, lay.ptr, n + 1, "i32"));
                match fmt.csr_index() {
                    CsrIndex::Bitmap => (ptr, bitmap(b), "i8"),
                    CsrIndex::Cols(2) => (ptr, b.plane(buf, lay.indices, nnz, "i16"), "i16"),
                    CsrIndex::Cols(_) => (ptr, b.plane(buf, lay.indices, nnz, "i32"), "i32"),
                }
            }
            SparseFormat::BsrQ { rows, blocks, .. } => {
                (Some(b.plane(buf, lay.ptr, n / rows as u64 + 1, "i32")), b.plane(buf, lay.indices, blocks, "i32"), "i32")
            }
            // N:M (and, unreachable here, the f32 formats): a bitmap.
            _ => (None, bitmap(b), "i8"),
        };
        QPlanes { bits, q, d, m, ptr, idx, idx_ty }
    }

    /// Stored value `p`, dequantized: block `p / 32`, slot `sparse_quant::slot(p % 32)`.
    pub(super) fn value(&self, b: &mut KernelBuilder, p: &str) -> V {
        let c32 = b.index(32);
        let blk = b.divui(p, &c32);
        let t = b.remui(p, &c32);
        // slot: bits t4 t3 t2 t1 t0 → t3 t4 t1 t2 t0.
        let (m0, m_up, m_dn) = (b.index(0b00001), b.index(0b01010), b.index(0b10100));
        let one = b.index(1);
        let s0 = b.def(format!("arith.andi {t}, {m0} : index"));
        let up = b.def(format!("arith.andi {t}, {m_up} : index"));
        let up = b.def(format!("arith.shli {up}, {one} : index"));
        let dn = b.def(format!("arith.andi {t}, {m_dn} : index"));
        let dn = b.def(format!("arith.shrui {dn}, {one} : index"));
        let slot = b.def(format!("arith.ori {s0}, {up} : index"));
        let slot = b.def(format!("arith.ori {slot}, {dn} : index"));
        let d = b.load_f16(&self.d, &blk);
        match (self.bits, &self.m) {
            (QBits::Q4, Some(m)) => {
                let c16 = b.index(16);
                let base = b.muli(&blk, &c16);
                let lo = b.remui(&slot, &c16);
                let at = b.addi(&base, &lo);
                let byte = b.load_byte(&self.q, &at, false);
                let hi = b.divui(&slot, &c16);
                let hi = b.def(format!("arith.index_castui {hi} : index to i32"));
                let four = b.i32(4);
                let sh = b.def(format!("arith.muli {hi}, {four} : i32"));
                let v = b.def(format!("arith.shrui {byte}, {sh} : i32"));
                let fifteen = b.i32(15);
                let q = b.def(format!("arith.andi {v}, {fifteen} : i32"));
                let qf = b.def(format!("arith.sitofp {q} : i32 to f32"));
                let m = b.load_f16(m, &blk);
                b.fma(&qf, &d, &m)
            }
            _ => {
                let base = b.muli(&blk, &c32);
                let at = b.addi(&base, &slot);
                let q = b.load_byte(&self.q, &at, true);
                let qf = b.def(format!("arith.sitofp {q} : i32 to f32"));
                b.mul(&qf, &d)
            }
        }
    }
}

/// Emits the kernel body: `ins[0]` the activations, `ins[1]` the packed weight.
/// `int8`: the compile allows int8 activations (AVX2), which the 2:4 q4 kernel uses.
pub fn emit_sparse_quant_matmul(b: &mut KernelBuilder, t: &SparseMatmul, int8: bool, ins: &[V], out: &str) {
    let fmt = t.storage.format;
    let bits = fmt.bits().unwrap_or(QBits::Q8);
    let (n, k) = t.nk();
    if b.device() == Device::Cpu && int8 && matches!(fmt, SparseFormat::NmQ { keep: 2, group: 4, bits: QBits::Q4, .. }) && k % STEP == 0 {
        return emit_nm24_q4_int8(b, t, ins, out);
    }
    let planes = QPlanes::new(b, &fmt, bits, &ins[1]);
    let bitmap = match fmt {
        SparseFormat::CsrQ { .. } => fmt.csr_index() == CsrIndex::Bitmap,
        SparseFormat::NmQ { .. } => true,
        _ => false,
    };
    if b.device() == Device::Cpu
        && bitmap
        && t.lanes as u64 >= super::sparse_quant_expand::LANES
        && k % super::sparse_quant_expand::LANES == 0
    {
        return super::sparse_quant_expand::emit_bitmap_q_expand(b, t, &planes, ins, out);
    }
    if b.device() == Device::Cpu && bitmap && k % 8 == 0 {
        return super::sparse_quant_bitmap::emit_csr_bitmap_q(b, t, &planes, ins, out);
    }
    let a = ins[0].clone();
    let (kc, nc) = (b.index(k), b.index(n));
    match b.device() {
        Device::Nvptx if t.warp_per_output() => {
            let ix = super::sparse_warp::Index { ptr: planes.ptr.as_ref(), idx: &planes.idx, ty: planes.idx_ty };
            super::sparse_warp::emit(b, t, &ix, &super::sparse_warp::Values::Quant(&planes), &ins[1], &a, out)
        }
        Device::Nvptx => t.per_output_thread(b, |b, u, j, arow| {
            let y = dot(b, &fmt, &planes, &a, j, &[arow.to_string()]);
            b.store_result(&y[0], out, u);
        }),
        Device::Cpu => {
            let (units, ct, rbc, rows) = t.cpu_grid(b);
            let colsc = b.index(COLS);
            b.parallel(&units, |b, u| {
                let (r0, j0, j_end) = unit_origin(b, u, UnitOrder::RowMajor { ct: &ct }, &rbc, &colsc, &nc);
                row_block(b, t.rb(), &r0, &rbc, &rows, &|b, r, nr| {
                    let arows = strided(b, r, nr, &kc);
                    b.for_each(&j0, &j_end, |b, j| {
                        let sums = dot(b, &fmt, &planes, &a, j, &arows);
                        let orows = strided(b, r, nr, &nc);
                        for (y, orow) in sums.iter().zip(&orows) {
                            let o = b.addi(orow, j);
                            b.store_result(y, out, &o);
                        }
                    });
                });
            });
        }
    }
}

/// Output `j`'s sums for every row of `arows`, one stored value at a time.
fn dot(b: &mut KernelBuilder, fmt: &SparseFormat, p: &QPlanes, a: &str, j: &str, arows: &[V]) -> Vec<V> {
    let zero = b.f32(0.0);
    let one = b.index(1);
    let nr = arows.len();
    let (_, k) = fmt.nk();
    let fma_rows = |b: &mut KernelBuilder, v: &str, kk: &str, accs: &[V]| -> Vec<V> {
        arows
            .iter()
            .zip(accs)
            .map(|(ar, acc)| {
                let ai = b.addi(ar, kk);
                let x = b.load(a, &ai);
                b.fma(v, &x, acc)
            })
            .collect()
    };
    match *fmt {
        SparseFormat::CsrQ { .. } if fmt.csr_index() != CsrIndex::Bitmap => {
            let ptr = p.ptr.clone().unwrap_or_default();
            let lo = b.load_index(&ptr, j, "i32");
            let j1 = b.addi(j, &one);
            let hi = b.load_index(&ptr, &j1, "i32");
            b.for_fold(&lo, &hi, &vec![zero; nr], |b, q, accs| {
                let v = p.value(b, q);
                let c = b.load_index(&p.idx, q, p.idx_ty);
                fma_rows(b, &v, &c, accs)
            })
        }
        SparseFormat::BsrQ { rows, cols, .. } => {
            let ptr = p.ptr.clone().unwrap_or_default();
            let (rc, cc) = (b.index(rows as u64), b.index(cols as u64));
            let bi = b.divui(j, &rc);
            let i = b.remui(j, &rc);
            let lo = b.load_index(&ptr, &bi, "i32");
            let bi1 = b.addi(&bi, &one);
            let hi = b.load_index(&ptr, &bi1, "i32");
            let bsz = b.index(rows as u64 * cols as u64);
            let ioff = b.muli(&i, &cc);
            b.for_fold(&lo, &hi, &vec![zero; nr], |b, q, accs| {
                let bc = b.load_index(&p.idx, q, "i32");
                let kb = b.muli(&bc, &cc);
                let vb = b.muli(q, &bsz);
                let vb = b.addi(&vb, &ioff);
                let mut s = accs.to_vec();
                for t in 0..cols as u64 {
                    let ti = b.index(t);
                    let vi = b.addi(&vb, &ti);
                    let v = p.value(b, &vi);
                    let kk = b.addi(&kb, &ti);
                    s = fma_rows(b, &v, &kk, &s);
                }
                s
            })
        }
        _ => {
            // A bitmap per row (N:M, or CSR at densities where it is smaller):
            // walk the row's k, a kept k taking the row's next value.
            let base = match (*fmt, &p.ptr) {
                (SparseFormat::NmQ { .. }, _) | (_, None) => {
                    let per_row = b.index(fmt.stored_values() / fmt.nk().0.max(1));
                    b.muli(j, &per_row)
                }
                (_, Some(ptr)) => b.load_index(ptr, j, "i32"),
            };
            let rbytes = b.index(SparseFormat::bitmap_row_bytes(k));
            let mbase = b.muli(j, &rbytes);
            let last = b.index(fmt.stored_values().max(1) - 1);
            let (k0, kt) = (b.index(0), b.index(k));
            let mut init: Vec<(V, String)> = (0..nr).map(|_| (zero.clone(), "f32".to_string())).collect();
            init.push((b.index(0), "index".into()));
            let res = b.for_fold_typed(&k0, &kt, 1, &init, |b, kk, carried| {
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
                let v = p.value(b, &q);
                let z = b.f32(0.0);
                let v = b.def(format!("arith.select {on}, {v}, {z} : f32"));
                let inc = b.def(format!("arith.index_castui {bit} : i8 to index"));
                let next = b.addi(&off, &inc);
                let mut out = fma_rows(b, &v, kk, &carried[..nr]);
                out.push(next);
                out
            });
            res[..nr].to_vec()
        }
    }
}

/// `arith.constant dense<[..]> : vector<32xi8>`.
fn bytes_const(b: &mut KernelBuilder, v: &[i32]) -> V {
    let body: Vec<String> = v.iter().map(|x| (*x as i8).to_string()).collect();
    b.def(format!("arith.constant dense<[{}]> : vector<32xi8>", body.join(", ")))
}

fn pshufb(b: &mut KernelBuilder, table: &str, ctrl: &str) -> V {
    b.def(format!("llvm.call_intrinsic \"llvm.x86.avx2.pshuf.b\"({table}, {ctrl}) : (vector<32xi8>, vector<32xi8>) -> vector<32xi8>"))
}

/// Weight rows one 2:4 GEMV micro-kernel runs at once (they share the loads of
/// the activations and give the core two independent chains).
const GEMV_COLS: u64 = 2;
/// Steps whose scales are formed by one vector operation.
const SCALE_VEC: u64 = 8;

/// What the micro-kernels of the 2:4 q4 kernel share (see `emit_nm24_q4_int8`).
struct Nm24 {
    planes: QPlanes,
    /// The output buffer, `[rows, n]`.
    out: String,
    n: u64,
    k: u64,
    steps: u64,
    /// int8 activations of the row block (`rb × k`), their per-step scales (`rb × steps`).
    xq: V,
    xd: V,
    /// Per (row, weight row) of a micro-kernel: `steps` of `d·dx`, then `steps` of `m·dx`.
    sc: V,
    quants_last: V,
    bitmap_last: V,
    /// `vpdpbusd` for the dot products (`CpuIsa::vnni`).
    vnni: bool,
}

impl Nm24 {
    /// The gather control of one step (slot o of the 32: lane L = o/16, half
    /// h = o/8 % 2, a = o/4 % 2, b = o/2 % 2, kept value s = o % 2 of group
    /// g = 8h + 4L + 2b + a of the step's 16): the byte of `x_h` that slot o
    /// takes, `4·(2b + a)` + the group's `s`-th kept position. The group's
    /// bitmap nibble is byte `4h + 2L + b` of the step's 8, shifted by `4a`;
    /// one 16-entry table serves both kept values: the lowest set bit at a
    /// valid 2:4 nibble (3, 5, 6, 9, 10, 12) and the highest at that nibble
    /// with its low bit flipped (2, 4, 7, 8, 11, 13, never a valid nibble), so
    /// odd slots flip it before the lookup.
    fn control(&self, b: &mut KernelBuilder, mat: &str) -> V {
        let rep: Vec<String> = (0..32).map(|o| (4 * ((o >> 3) & 1) + 2 * (o >> 4) + ((o >> 1) & 1)).to_string()).collect();
        let base: Vec<i32> = (0..32).map(|o| 4 * (2 * ((o >> 1) & 1) + ((o >> 2) & 1))).collect();
        let odd: Vec<i32> = (0..32).map(|o| o & 1).collect();
        let mut table = [0i32; 16];
        for nib in [3usize, 5, 6, 9, 10, 12] {
            table[nib] = nib.trailing_zeros() as i32;
            table[nib ^ 1] = 31 - (nib as u32).leading_zeros() as i32;
        }
        let table: Vec<i32> = (0..32).map(|i| table[i % 16]).collect();
        let bm = b.def(format!("vector.load {}[{mat}] : memref<?xi8>, vector<8xi8>", self.planes.idx));
        let rep_v = b.def(format!("vector.shuffle {bm}, {bm} [{}] : vector<8xi8>, vector<8xi8>", rep.join(", ")));
        let r32 = b.def(format!("vector.bitcast {rep_v} : vector<32xi8> to vector<8xi32>"));
        let shifts = b.def("arith.constant dense<[0, 4, 0, 4, 0, 4, 0, 4]> : vector<8xi32>".into());
        let r32 = b.def(format!("arith.shrui {r32}, {shifts} : vector<8xi32>"));
        let r8 = b.def(format!("vector.bitcast {r32} : vector<8xi32> to vector<32xi8>"));
        let f = b.vsplat_int(15, 32, "i8");
        let nib = b.def(format!("arith.andi {r8}, {f} : vector<32xi8>"));
        let oddv = bytes_const(b, &odd);
        let nib = b.def(format!("arith.xori {nib}, {oddv} : vector<32xi8>"));
        let tab = bytes_const(b, &table);
        let pos = pshufb(b, &tab, &nib);
        let basev = bytes_const(b, &base);
        b.def(format!("arith.ori {pos}, {basev} : vector<32xi8>"))
    }

    /// A block's 32 quants in slot order: the 16 bytes in both lanes, the high
    /// lane shifted down a nibble.
    fn quants(&self, b: &mut KernelBuilder, qat: &str) -> V {
        let v = b.vload_bytes(&self.planes.q, qat, 16);
        let both: Vec<String> = (0..32).map(|i| (i % 16).to_string()).collect();
        let v = b.def(format!("vector.shuffle {v}, {v} [{}] : vector<16xi8>, vector<16xi8>", both.join(", ")));
        let w = b.def(format!("vector.bitcast {v} : vector<32xi8> to vector<4xi64>"));
        let sh = b.def("arith.constant dense<[0, 0, 4, 4]> : vector<4xi64>".into());
        let w = b.def(format!("arith.shrui {w}, {sh} : vector<4xi64>"));
        let v = b.def(format!("vector.bitcast {w} : vector<4xi64> to vector<32xi8>"));
        let f = b.vsplat_int(15, 32, "i8");
        b.def(format!("arith.andi {v}, {f} : vector<32xi8>"))
    }

    /// Offset in `sc` of the scales of (row `rr`, weight row `cc`) of a micro-kernel of `ncols`.
    fn scale_base(&self, rr: u64, cc: u64, ncols: u64) -> u64 {
        (rr * ncols + cc) * 2 * self.steps
    }

    /// Forms `d·dx` and `m·dx` of every step for rows `slot0..+nr` and weight rows `j..+ncols`.
    fn scales(&self, b: &mut KernelBuilder, slot0: &str, nr: u64, j: &str, ncols: u64) {
        let (m_plane, d_plane) = (self.planes.m.clone().unwrap_or_default(), self.planes.d.clone());
        let stepsc = b.index(self.steps);
        let whole = self.steps / SCALE_VEC * SCALE_VEC;
        for rr in 0..nr {
            let rri = b.index(rr);
            let slot = b.addi(slot0, &rri);
            let xrow = b.muli(&slot, &stepsc);
            for cc in 0..ncols {
                let cci = b.index(cc);
                let wrow = b.addi(j, &cci);
                let blk0 = b.muli(&wrow, &stepsc);
                let sd = b.index(self.scale_base(rr, cc, ncols));
                let sm = b.index(self.scale_base(rr, cc, ncols) + self.steps);
                let (zero, wc) = (b.index(0), b.index(whole));
                b.for_step(&zero, &wc, SCALE_VEC, |b, s| {
                    let at = b.addi(&blk0, s);
                    let xat = b.addi(&xrow, s);
                    let dx = b.vload(&self.xd, &xat, SCALE_VEC as u32);
                    for (plane, dst) in [(&d_plane, &sd), (&m_plane, &sm)] {
                        let v = b.vload_f16(plane, &at, SCALE_VEC as u32);
                        let v = b.def(format!("arith.mulf {v}, {dx} : {}", KernelBuilder::vty(SCALE_VEC as u32)));
                        let o = b.addi(dst, s);
                        b.vstore(&v, &self.sc, &o, SCALE_VEC as u32);
                    }
                });
                b.for_each(&wc, &stepsc, |b, s| {
                    let at = b.addi(&blk0, s);
                    let xat = b.addi(&xrow, s);
                    let dx = b.load(&self.xd, &xat);
                    for (plane, dst) in [(&d_plane, &sd), (&m_plane, &sm)] {
                        let v = b.load_f16(plane, &at);
                        let v = b.mul(&v, &dx);
                        let o = b.addi(dst, s);
                        b.store(&v, &self.sc, &o);
                    }
                });
            }
        }
    }

    /// Outputs of rows `r..+nr` (activation slots `slot0..`) × weight rows `j..+ncols`.
    fn micro(&self, b: &mut KernelBuilder, r: &str, slot0: &str, nr: u64, j: &str, ncols: u64) {
        self.scales(b, slot0, nr, j, ncols);
        let (kc, stepsc) = (b.index(self.k), b.index(self.steps));
        let xrows = strided(b, slot0, nr, &kc);
        let wrows: Vec<V> = (0..ncols)
            .map(|cc| {
                let cci = b.index(cc);
                b.addi(j, &cci)
            })
            .collect();
        let vz = b.vzero(8);
        let init: Vec<(V, String)> = (0..2 * nr * ncols).map(|_| (vz.clone(), KernelBuilder::vty(8))).collect();
        let zero = b.index(0);
        let accs = b.for_fold_typed(&zero, &stepsc, 1, &init, |b, s, accs| {
            let mut gathers = Vec::with_capacity(ncols as usize);
            for (cc, wrow) in wrows.iter().enumerate() {
                let (c16, eight, rbytes) = (b.index(16), b.index(8), b.index(self.k / 8));
                // The row's first block and bitmap byte.
                let (wblk, mrow) = (b.muli(wrow, &stepsc), b.muli(wrow, &rbytes));
                let blk = b.addi(&wblk, s);
                let qat = b.muli(&blk, &c16);
                let s8 = b.muli(s, &eight);
                let mat = b.addi(&mrow, &s8);
                if nr == 1 && cc == 0 {
                    // Rows j..j+ncols lie one after another in both planes, and
                    // the micro-kernel reads them together: one stream per
                    // plane, fetched ahead as if read at ncols blocks a step.
                    let sn = b.index(ncols);
                    let sn = b.muli(s, &sn);
                    let qoff = b.muli(&sn, &c16);
                    let qpf = b.muli(&wblk, &c16);
                    let qpf = b.addi(&qpf, &qoff);
                    let moff = b.muli(&sn, &eight);
                    let mpf = b.addi(&mrow, &moff);
                    b.prefetch_ahead(&self.planes.q, &qpf, PREFETCH_BYTES, &self.quants_last, "i8");
                    b.prefetch_ahead(&self.planes.idx, &mpf, PREFETCH_BYTES / 2, &self.bitmap_last, "i8");
                }
                gathers.push((self.control(b, &mat), self.quants(b, &qat)));
            }
            let ones8 = b.vsplat_int(1, 32, "i8");
            // Slots of half h = 1 (bytes 8..16 of each lane) come from x1.
            let pick: Vec<String> = (0..32).map(|o| if o & 8 == 0 { o.to_string() } else { (32 + o).to_string() }).collect();
            let mut next = accs.to_vec();
            for (rr, xr) in xrows.iter().enumerate() {
                let c64 = b.index(STEP);
                let x0at = b.muli(s, &c64);
                let x0at = b.addi(xr, &x0at);
                let c32 = b.index(32);
                let x1at = b.addi(&x0at, &c32);
                let x0 = b.vload_bytes(&self.xq, &x0at, 32);
                let x1 = b.vload_bytes(&self.xq, &x1at, 32);
                for (cc, (ctrl, wq)) in gathers.iter().enumerate() {
                    let g0 = pshufb(b, &x0, ctrl);
                    let g1 = pshufb(b, &x1, ctrl);
                    let g = b.def(format!("vector.shuffle {g0}, {g1} [{}] : vector<32xi8>, vector<32xi8>", pick.join(", ")));
                    let dot = dot_u8_i8(b, wq, &g, self.vnni);
                    let sum = dot_u8_i8(b, &ones8, &g, self.vnni);
                    let base = self.scale_base(rr as u64, cc as u64, ncols);
                    let sdi = b.index(base);
                    let sdi = b.addi(&sdi, s);
                    let smi = b.index(base + self.steps);
                    let smi = b.addi(&smi, s);
                    let sd = b.load(&self.sc, &sdi);
                    let sm = b.load(&self.sc, &smi);
                    let vt = KernelBuilder::vty(8);
                    let dotf = b.def(format!("arith.sitofp {dot} : vector<8xi32> to {vt}"));
                    let sumf = b.def(format!("arith.sitofp {sum} : vector<8xi32> to {vt}"));
                    let sdv = b.vbroadcast(&sd, 8);
                    let smv = b.vbroadcast(&sm, 8);
                    // Two accumulators per output: two chains of one FMA per step.
                    let at = 2 * (rr * ncols as usize + cc);
                    next[at] = b.vfma(&dotf, &sdv, &accs[at], 8);
                    next[at + 1] = b.vfma(&sumf, &smv, &accs[at + 1], 8);
                }
            }
            next
        });
        let nc = b.index(self.n);
        let orows = strided(b, r, nr, &nc);
        for (rr, orow) in orows.iter().enumerate() {
            for (cc, wrow) in wrows.iter().enumerate() {
                let at = 2 * (rr * ncols as usize + cc);
                let both = b.def(format!("arith.addf {}, {} : {}", accs[at], accs[at + 1], KernelBuilder::vty(8)));
                let y = b.vsum(&both, 8);
                let o = b.addi(orow, wrow);
                b.store_result(&y, &self.out, &o);
            }
        }
    }
}

/// The 2:4, 4-bit, int8-activation CPU kernel (see the module doc).
fn emit_nm24_q4_int8(b: &mut KernelBuilder, t: &SparseMatmul, ins: &[V], out: &str) {
    let fmt = t.storage.format;
    let (n, k) = t.nk();
    let steps = k / STEP;
    let rb = t.rb();
    let planes = QPlanes::new(b, &fmt, QBits::Q4, &ins[1]);
    let a = ins[0].clone();
    let (kc, nc, stepsc) = (b.index(k), b.index(n), b.index(steps));
    let (units, _, rbc, rows) = t.cpu_grid(b);
    let qbytes = b.index(rb * k);
    let xq = b.def(format!("memref.alloca({qbytes}) : memref<?xi8>"));
    let nsc = b.index(rb * steps);
    let xd = b.alloca_f32(&nsc);
    let scn = b.index(rb * GEMV_COLS * 2 * steps);
    let sc = b.alloca_f32(&scn);
    let quants_last = b.index((n * steps * 16).saturating_sub(1));
    let bitmap_last = b.index((n * k / 8).saturating_sub(1));
    let ctx = Nm24 { planes, out: out.to_string(), n, k, steps, xq, xd, sc, quants_last, bitmap_last, vnni: t.vnni };

    let prepare = |b: &mut KernelBuilder, r0: &str, r_end: &str| {
        // Quantize the row block's activations: int8 in blocks of 64, one scale each.
        b.for_each(r0, r_end, |b, r| {
            let slot = b.def(format!("arith.subi {r}, {r0} : index"));
            let src = b.muli(r, &kc);
            let dst = b.muli(&slot, &kc);
            let sdst = b.muli(&slot, &stepsc);
            let zero = b.index(0);
            b.for_each(&zero, &stepsc, |b, s| {
                let w = STEP as u32;
                let sc = b.index(STEP);
                let off = b.muli(s, &sc);
                let at = b.addi(&src, &off);
                let v = b.vload(&a, &at, w);
                let vt = KernelBuilder::vty(w);
                let abs = b.def(format!("math.absf {v} : {vt}"));
                let amax = b.def(format!("vector.reduction <maxnumf>, {abs} : {vt} into f32"));
                let c127 = b.f32(127.0);
                let d = b.div(&amax, &c127);
                let z = b.f32(0.0);
                let nonzero = b.def(format!("arith.cmpf ogt, {amax}, {z} : f32"));
                let inv = b.div(&c127, &amax);
                let inv = b.def(format!("arith.select {nonzero}, {inv}, {z} : f32"));
                let invv = b.vbroadcast(&inv, w);
                let scaled = b.def(format!("arith.mulf {v}, {invv} : {vt}"));
                let rounded = b.def(format!("math.roundeven {scaled} : {vt}"));
                let qi = b.def(format!("arith.fptosi {rounded} : {vt} to vector<{w}xi32>"));
                let q8 = b.def(format!("arith.trunci {qi} : vector<{w}xi32> to vector<{w}xi8>"));
                let qat = b.addi(&dst, &off);
                b.vstore_bytes(&q8, &ctx.xq, &qat, w);
                let sat = b.addi(&sdst, s);
                b.store(&d, &ctx.xd, &sat);
            });
        });
    };
    walk_row_blocks(b, &units, t.col_tiles(), COLS, &rbc, &rows, &prepare, &|b, r0, _, j0| {
        let colsc = b.index(COLS);
        let j1 = b.addi(j0, &colsc);
        let j_end = b.def(format!("arith.minui {j1}, {nc} : index"));
        row_block(b, rb, r0, &rbc, &rows, &|b, r, nr| {
            let slot0 = b.def(format!("arith.subi {r}, {r0} : index"));
            let cols = if nr == 1 { GEMV_COLS } else { 1 };
            column_groups(b, j0, &j_end, cols, &|b, j, ncols| ctx.micro(b, r, &slot0, nr, j, ncols));
        });
    });
}
