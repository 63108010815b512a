//! The CPU matmul over block-quantized weights with int8 activations: each
//! row of activations is quantized once per call to int8 blocks of 32 (one f32
//! scale per block, like llama.cpp's Q8_1), and each weight block meets its
//! activation block in an integer dot product (AVX2 `vpmaddubsw` +
//! `vpmaddwd`), scaled once per block. Dequantizing weights to f32 costs more
//! than reading them; this does not.
//!
//! Per block, with `x ≈ dx·qx` and `w = dw·qw + mw` (Q4_1; Q4_0 has
//! `mw = -8·dw`, Q8_0 has no offset):
//! `Σ w·x = dw·dx·Σ qw·qx + mw·(dx·Σ qx)`.

use super::builder::{KernelBuilder, V};
use super::kernels::{column_groups, nibbles, row_block, strided, walk_row_blocks, QuantPlanes, TileCounts, TiledMatmul, MM_COLS};
use sparsec_ir::quant::QK;
use sparsec_ir::DType;

/// How far ahead of its loads the GEMV prefetches the weight's quants
/// (measured on the dev box: 1 KB +21% decode on one thread, 8 KB +37%).
const PREFETCH_BYTES: u64 = 8192;
/// Weight rows a GEMV micro-kernel reads at once: one, a single sequential
/// stream (SmolLM2 Q4_1 decode +22% on the Zen 4 guest against 4 rows
/// sharing each activation load; docs/history.md).
const GEMV_COLS: u64 = 1;
/// Blocks whose scales one vector operation forms.
const SCALE_VEC: u64 = 8;
/// Lanes of the per-block integer partial sums (`vector<8xi32>` from `vpmaddwd`).
const LANES: u32 = 8;

/// The activation rows of one row block, quantized (stack buffers of the call).
pub(in crate::mlir) struct QuantizedRows {
    /// int8 values, `rb × k`.
    pub q: V,
    /// Per block: the scale `dx`.
    pub d: V,
    /// Per block: `dx·Σ qx` (what the weight's offset multiplies).
    pub s: V,
}

impl QuantizedRows {
    /// Scratch for `rb` rows of `k` values (`k` a multiple of 32).
    pub(in crate::mlir) fn alloca(b: &mut KernelBuilder, rb: u64, k: u64) -> QuantizedRows {
        let qbytes = b.index(rb * k);
        let sblocks = b.index(rb * (k / QK as u64));
        QuantizedRows { q: b.def(format!("memref.alloca({qbytes}) : memref<?xi8>")), d: b.alloca_f32(&sblocks), s: b.alloca_f32(&sblocks) }
    }
}

/// Quantizes row `row` of `a` (`k` f32, `k` a multiple of 32) into slot `slot` of `qr`.
pub(in crate::mlir) fn quantize_row(b: &mut KernelBuilder, a: &str, row: &str, slot: &str, k: u64, qr: &QuantizedRows) {
    let kc = b.index(k);
    let nbk = b.index(k / QK as u64);
    let src = b.muli(row, &kc);
    let dst = b.muli(slot, &kc);
    let sdst = b.muli(slot, &nbk);
    let zero = b.index(0);
    b.for_each(&zero, &nbk, |b, blk| {
        let qk = b.index(QK as u64);
        let off = b.muli(blk, &qk);
        let at = b.addi(&src, &off);
        let v = b.vload(a, &at, QK as u32);
        let vt = KernelBuilder::vty(QK as u32);
        let abs = b.def(format!("math.absf {v} : {vt}"));
        let amax = b.def(format!("vector.reduction <maxnumf>, {abs} : {vt} into f32"));
        let c127 = b.f32(127.0);
        let d = b.div(&amax, &c127);
        let z = b.f32(0.0);
        let nonzero = b.def(format!("arith.cmpf ogt, {amax}, {z} : f32"));
        let inv = b.div(&c127, &amax);
        let inv = b.def(format!("arith.select {nonzero}, {inv}, {z} : f32"));
        let invv = b.vbroadcast(&inv, QK as u32);
        let scaled = b.def(format!("arith.mulf {v}, {invv} : {vt}"));
        let rounded = b.def(format!("math.roundeven {scaled} : {vt}"));
        let qi = b.def(format!("arith.fptosi {rounded} : {vt} to vector<{QK}xi32>"));
        let q8 = b.def(format!("arith.trunci {qi} : vector<{QK}xi32> to vector<{QK}xi8>"));
        let qat = b.addi(&dst, &off);
        b.vstore_bytes(&q8, &qr.q, &qat, QK as u32);
        let sum = b.def(format!("vector.reduction <add>, {qi} : vector<{QK}xi32> into i32"));
        let sumf = b.def(format!("arith.sitofp {sum} : i32 to f32"));
        let s = b.mul(&sumf, &d);
        let sat = b.addi(&sdst, blk);
        b.store(&d, &qr.d, &sat);
        b.store(&s, &qr.s, &sat);
    });
}

/// `Σ qw·qx` over one block as 8 i32 lanes: `w` holds the weight's 32 values
/// (unsigned nibbles for Q4, signed bytes for Q8_0), `x` the activation's.
fn block_dot(b: &mut KernelBuilder, w: &str, x: &str, signed_w: bool, vnni: bool) -> V {
    let (uw, sx) = if signed_w {
        // vpmaddubsw multiplies unsigned by signed: move the weight's sign onto x.
        let uw = b.def(format!("math.absi {w} : vector<{QK}xi8>"));
        let sx = b.def(format!(
            "llvm.call_intrinsic \"llvm.x86.avx2.psign.b\"({x}, {w}) : (vector<{QK}xi8>, vector<{QK}xi8>) -> vector<{QK}xi8>"
        ));
        (uw, sx)
    } else {
        (w.to_string(), x.to_string())
    };
    dot_u8_i8(b, &uw, &sx, vnni)
}

/// `Σ u·s` over groups of 4 consecutive bytes of `u` (unsigned) and `s`
/// (signed), `vector<32xi8>` each, as 8 i32 lanes: one `vpdpbusd` with
/// `vnni`, else `vpmaddubsw` (pairs into i16, saturating) then `vpmaddwd`.
/// The two agree wherever no pair of products leaves i16, which holds for
/// the quantized kernels' operands (|u| ≤ 128, |s| ≤ 127).
pub(super) fn dot_u8_i8(b: &mut KernelBuilder, u: &str, s: &str, vnni: bool) -> V {
    if vnni {
        let zero = b.vsplat_int(0, LANES, "i32");
        return b.def(format!(
            "llvm.call_intrinsic \"llvm.x86.avx512.vpdpbusd.256\"({zero}, {u}, {s}) : (vector<{LANES}xi32>, vector<{QK}xi8>, vector<{QK}xi8>) -> vector<{LANES}xi32>"
        ));
    }
    let pairs = b
        .def(format!("llvm.call_intrinsic \"llvm.x86.avx2.pmadd.ub.sw\"({u}, {s}) : (vector<{QK}xi8>, vector<{QK}xi8>) -> vector<16xi16>"));
    let ones = b.vsplat_int(1, 16, "i16");
    b.def(format!(
        "llvm.call_intrinsic \"llvm.x86.avx2.pmadd.wd\"({pairs}, {ones}) : (vector<16xi16>, vector<16xi16>) -> vector<{LANES}xi32>"
    ))
}

/// The 32 quantized values of the weight block at byte `at` as `vector<32xi8>`.
fn weight_block(b: &mut KernelBuilder, dt: DType, w: &str, at: &str) -> V {
    if dt == DType::Q8_0 {
        return b.vload_bytes(w, at, QK as u32);
    }
    let (lo, hi) = nibbles(b, w, at);
    let order: Vec<String> = (0..QK).map(|i| i.to_string()).collect();
    b.def(format!("vector.shuffle {lo}, {hi} [{}] : vector<16xi8>, vector<16xi8>", order.join(", ")))
}

/// `out[r, j] = Σ_k a[r, k]·w[j, k]` for a block-quantized `[N, K]` weight
/// with int8 activations, over the same (row block, column block) units as
/// the f32 kernel. Each call quantizes the rows of every row block it touches
/// once, then runs register-blocked micro-kernels of `r` rows × `c` weight rows.
pub(super) fn emit_int8_matmul(b: &mut KernelBuilder, t: &TiledMatmul, vnni: bool, ins: &[V], out: &str) {
    let (a_buf, w_buf) = (ins[0].clone(), ins[1].clone());
    let dt = t.quant.unwrap_or(DType::Q8_0);
    let k = t.k;
    let nbk_n = k / QK as u64;
    let (kc, nc, nbk) = (b.index(k), b.index(t.n), b.index(nbk_n));
    let TileCounts { rows, rbc, units, .. } = t.counts(b);
    let planes = QuantPlanes::new(b, dt, &w_buf, t.n * k);
    let qr = QuantizedRows::alloca(b, t.rb, k);
    // Per (row, weight row) of a micro-kernel (at most `rb` × 2): every
    // block's `dw·dx`, formed before its loop.
    let scn = b.index(t.rb * 2 * nbk_n);
    let sc = b.alloca_f32(&scn);
    let offsets = dt != DType::Q8_0;
    let block_bytes = sparsec_ir::quant::quant_bytes(dt) as u64;
    let qbytes_per_block = b.index(block_bytes);
    let quants_last = b.index((t.n * nbk_n * block_bytes).saturating_sub(1));
    // One micro-kernel: rows r0..r0+nr (slots from `slot0`), weight rows j..j+ncols.
    let micro = |b: &mut KernelBuilder, r0: &str, slot0: &str, nr: u64, j: &str, ncols: u64| {
        let slots = strided(b, slot0, nr, &kc);
        let sslots = strided(b, slot0, nr, &nbk);
        let wblocks = strided(b, j, ncols, &nbk);
        // Before the loop, per (row, weight row): every block's `dw·dx` into
        // `sc` and the sum of its offsets `Σ m·(dx·Σ qx)`, `SCALE_VEC` blocks at
        // a time (one load and widening of eight f16 scales), so the loop
        // reads one f32 per block and carries no offset sum.
        let whole = nbk_n / SCALE_VEC * SCALE_VEC;
        let sv_w = SCALE_VEC as u32;
        let (zero, wc) = (b.index(0), b.index(whole));
        let mut offs: Vec<Option<V>> = Vec::new();
        for (r, ss) in sslots.iter().enumerate() {
            for (c, wb) in wblocks.iter().enumerate() {
                let base = b.index((r as u64 * ncols + c as u64) * nbk_n);
                // Blocks `blk..+w` (vectors of `w`), or block `blk` alone: their
                // `dw·dx` into `sc`, their offsets added to `acc`.
                let step = |b: &mut KernelBuilder, blk: &str, acc: &V, w: Option<u32>| -> V {
                    let g = b.addi(wb, blk);
                    let (dw, mw) = planes.scales_offsets(b, &g, w);
                    let sat = b.addi(ss, blk);
                    let load = |b: &mut KernelBuilder, buf: &str| match w {
                        Some(n) => b.vload(buf, &sat, n),
                        None => b.load(buf, &sat),
                    };
                    let dx = load(b, &qr.d);
                    let scale = match w {
                        Some(n) => b.def(format!("arith.mulf {dw}, {dx} : {}", KernelBuilder::vty(n))),
                        None => b.mul(&dw, &dx),
                    };
                    let o = b.addi(&base, blk);
                    match w {
                        Some(n) => b.vstore(&scale, &sc, &o, n),
                        None => b.store(&scale, &sc, &o),
                    }
                    match &mw {
                        Some(m) => {
                            let sx = load(b, &qr.s);
                            match w {
                                Some(n) => b.vfma(m, &sx, acc, n),
                                None => b.fma(m, &sx, acc),
                            }
                        }
                        None => acc.clone(),
                    }
                };
                let vz = b.vzero(sv_w);
                let acc = b.for_fold_typed(&zero, &wc, SCALE_VEC, &[(vz, KernelBuilder::vty(sv_w))], |b, blk, acc| {
                    vec![step(b, blk, &acc[0], Some(sv_w))]
                });
                let vsum = b.vsum(&acc[0], sv_w);
                let tail = b.for_fold(&wc, &nbk, &[vsum], |b, blk, acc| vec![step(b, blk, &acc[0], None)]);
                offs.push(offsets.then(|| tail[0].clone()));
            }
        }
        let vz = b.vzero(LANES);
        let init: Vec<(V, String)> = (0..nr * ncols).map(|_| (vz.clone(), KernelBuilder::vty(LANES))).collect();
        let accs = b.for_fold_typed(&zero, &nbk, 1, &init, |b, blk, accs| {
            let qk = b.index(QK as u64);
            let koff = b.muli(blk, &qk);
            let xs: Vec<V> = slots
                .iter()
                .map(|s| {
                    let at = b.addi(s, &koff);
                    b.vload_bytes(&qr.q, &at, QK as u32)
                })
                .collect();
            let mut next = accs.to_vec();
            for (c, wb) in wblocks.iter().enumerate() {
                let g = b.addi(wb, blk);
                let at = b.muli(&g, &qbytes_per_block);
                if nr == 1 {
                    // GEMV streams the weight from memory: ask for it ahead (the
                    // quants plane is read in order, column after column).
                    b.prefetch_ahead(&w_buf, &at, PREFETCH_BYTES, &quants_last, "i8");
                }
                let wq = weight_block(b, dt, &w_buf, &at);
                for (r, x) in xs.iter().enumerate() {
                    let at = r * ncols as usize + c;
                    let dot = block_dot(b, &wq, x, dt == DType::Q8_0, vnni);
                    let dotf = b.def(format!("arith.sitofp {dot} : vector<{LANES}xi32> to {}", KernelBuilder::vty(LANES)));
                    let base = b.index(at as u64 * nbk_n);
                    let si = b.addi(&base, blk);
                    let scale = b.load(&sc, &si);
                    let sv = b.vbroadcast(&scale, LANES);
                    next[at] = b.vfma(&dotf, &sv, &accs[at], LANES);
                }
            }
            next
        });
        for r in 0..nr {
            let ri = b.index(r);
            let row = b.addi(r0, &ri);
            let orow = b.muli(&row, &nc);
            for c in 0..ncols {
                let at = (r * ncols + c) as usize;
                let mut y = b.vsum(&accs[at], LANES);
                if let Some(off) = &offs[at] {
                    y = b.add(&y, off);
                }
                let ci = b.index(c);
                let jc = b.addi(j, &ci);
                let o = b.addi(&orow, &jc);
                b.store_result(&y, out, &o);
            }
        }
    };
    let columns = |b: &mut KernelBuilder, r0: &str, slot0: &str, nr: u64, j0: &str, j_end: &str, c: u64| {
        column_groups(b, j0, j_end, c, &|b, j, ncols| micro(b, r0, slot0, nr, j, ncols));
    };
    // The call's units, row block by row block: each block's rows quantized once.
    let prepare = |b: &mut KernelBuilder, r0: &str, r_end: &str| {
        b.for_each(r0, r_end, |b, r| {
            let slot = b.def(format!("arith.subi {r}, {r0} : index"));
            quantize_row(b, &a_buf, r, &slot, k, &qr);
        });
    };
    walk_row_blocks(b, &units, t.col_tiles, MM_COLS, &rbc, &rows, &prepare, &|b, r0, _, j0| {
        let colsc = b.index(MM_COLS);
        let j1 = b.addi(j0, &colsc);
        let j_end = b.def(format!("arith.minui {j1}, {nc} : index"));
        row_block(b, t.rb, r0, &rbc, &rows, &|b, r, nr| {
            let slot0 = b.def(format!("arith.subi {r}, {r0} : index"));
            columns(b, r, &slot0, nr, j0, &j_end, if nr == 1 { GEMV_COLS } else { 2 })
        });
    });
}
