//! NVPTX prefill attention on tensor cores (flash attention), for calls of
//! more than one row of plain causal attention over f16 caches (no window,
//! NSA or cache compression; head width a multiple of 32, at most 128): a
//! block of `SPLIT` warps per (16 query rows, head), warp w walking the
//! visible keys' tiles of 32 numbered w, w + SPLIT, ...; the warps' partial
//! maxima, sums and outputs meet in shared memory, where each warp combines
//! and stores `d / (8·SPLIT)` of the output's n-tiles.
//! Scores `Q·Kᵀ` and the weighted sum `P·V` are `mma.sync.m16n8k16` with
//! f16 operands: the keys and values as cached, the f32 queries and weights
//! split into f16 `hi` and `lo` parts (`mma_half::half_split`, 22 bits of
//! each), so products stay near f32 accuracy. The softmax is online, per
//! row, in f32; a row's running max and sum are shared by the four lanes
//! that hold it.
//!
//! Index maps that let every operand come from 16-byte loads and every
//! accumulator feed the next MMA in place (a sum does not care how its terms
//! are numbered, so A and B only need the same one): for the scores, MMA step
//! s of a 32-wide slice of the head reads head features `8t + 4s`, `+ 1` as
//! fragment columns 2t, 2t + 1 and `8t + 4s + 2`, `+ 3` as 2t + 8, 2t + 9
//! (lane t loads features `8t..8t + 8`); for `P·V` over the keys of n-tiles
//! 2i and 2i + 1, fragment columns 2t, 2t + 1 are keys `16i + 2t`, `+ 1` and
//! 2t + 8, 2t + 9 keys `16i + 8 + 2t`, `+ 1`, which are exactly the score
//! accumulators the lane holds, and output n-tile q's column c is head
//! feature `(d/8)·c + q`, so a lane's value operands for all n-tiles are one
//! contiguous run of each of four cache rows.

use super::mma_half::{half_split, half_split_pair, mma_sync_half, pair_of, words};
use super::warp_fold::f32_vload;
use super::{fixed_last, KernelSpec, Stage, WARP};
use crate::mlir::builder::{KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::{DType, Op};

/// Query rows of a warp (the MMA's m).
const ROWS: u64 = 16;
/// Keys per step of the walk: four n-tiles of 8.
const KEYS: u64 = 32;
/// Warps sharing a (16 rows, head)'s keys. With one, an H200 held under two
/// warps per SM at a 512-token prefill of GPT-2 124M, each waiting on its loads.
pub(crate) const SPLIT: u64 = 4;

/// `(heads, kv_heads, head width)` when the attention takes the tensor-core
/// prefill: plain causal attention (no patterns: no window, NSA or cache
/// compression), f16 caches that are neither rotated nor KIVI, a head width
/// that is a multiple of 32 up to 128.
pub(crate) fn flash_dims(spec: &KernelSpec) -> Option<(u64, u64, u64)> {
    let Op::Attention { heads, kv_heads } = spec.op else { return None };
    let plain = spec.stage == Stage::Op && spec.patterns.is_empty() && !spec.hadamard_kv && !spec.kivi_keys;
    let f16 = spec.operands.get(1)?.dtype == DType::F16 && spec.operands.get(2)?.dtype == DType::F16;
    let (h, kvh) = (heads as u64, kv_heads as u64);
    let d = fixed_last(spec, spec.operands.first()?).ok()? / h.max(1);
    (plain && f16 && h > 0 && kvh > 0 && h % kvh == 0 && d % 32 == 0 && d <= 128).then_some((h, kvh, d))
}

/// `n` consecutive f16 values of the plane `p` from element `i` (aligned to
/// their size, up to 16 bytes), as a `vector<n x f16>`.
fn half_run(b: &mut KernelBuilder, p: &str, i: &str, n: u64) -> V {
    let ii = b.def(format!("arith.index_cast {i} : index to i64"));
    let ptr = b.def(format!("llvm.getelementptr inbounds {p}[{ii}] : (!llvm.ptr, i64) -> !llvm.ptr, f16"));
    let align = (2 * n).min(16);
    b.def(format!("llvm.load {ptr} {{alignment = {align} : i64}} : !llvm.ptr -> vector<{n}xf16>"))
}

/// `op` ("maxnumf", "addf") of `x` over the four lanes of a quad (lanes that
/// differ in their two low bits: those holding one row's accumulators).
fn quad_all(b: &mut KernelBuilder, x: &str, op: &str) -> V {
    let (mask, clamp) = (b.i32(-1), b.i32(31));
    let mut x = x.to_string();
    for off in [1, 2] {
        let o = b.i32(off);
        let other = b.def(format!("nvvm.shfl.sync bfly {mask}, {x}, {o}, {clamp} : f32 -> f32"));
        x = b.fbin(op, &x, &other);
    }
    x
}

/// The tensor-core prefill for `(h, kvh, d)` (`flash_dims`): `q` `[seq, h·d]`
/// f32, `k` and `v` the f16 caches' planes (`[positions, kvh·d]`, rows
/// `0..pos + seq` written), `out` `[seq, h·d]`. The launch is
/// `ceil(seq/16) · h · SPLIT` warps in blocks of `SPLIT`
/// (`KernelStep::gpu_mma_warps` = h · SPLIT, `gpu_mma_block` = 32 · SPLIT).
pub(super) fn emit_flash(b: &mut KernelBuilder, (h, kvh, d): (u64, u64, u64), q: &str, k: &str, v: &str, out: &str) {
    let (seq, pos) = (b.seq(), b.pos());
    let one = b.index(1);
    let last_row = b.def(format!("arith.subi {seq}, {one} : index"));
    let rows16 = b.index(ROWS);
    let bands = b.def(format!("arith.ceildivui {seq}, {rows16} : index"));
    let hc = b.index(h);
    let splitc = b.index(SPLIT);
    let warps = b.muli(&bands, &hc);
    let warps = b.muli(&warps, &splitc);
    let lanes = b.index(WARP);
    let work = b.muli(&warps, &lanes);
    // A lane's partial in shared memory: the two rows' max and sum, then the
    // output accumulators; word i of warp w's lane l at (w·SLOT + i)·32 + l.
    let slot = 4 + 4 * (d / 8);
    let parts = b.shared_f32("attn_split", SPLIT * slot * WARP);
    let (qw, kvw, dc, group) = (b.index(h * d), b.index(kvh * d), b.index(d), b.index(h / kvh));
    // Output n-tiles (of 8 head features) and the value run a lane loads per key.
    let ntd = d / 8;
    let groups = d / 32;
    let scale = b.f32(1.0 / (d as f32).sqrt());
    let (zero, ninf) = (b.f32(0.0), b.f32(-1e30));
    b.parallel(&work, |b, t| {
        let warp = b.divui(t, &lanes);
        let lane = b.remui(t, &lanes);
        let w = b.remui(&warp, &splitc);
        let warp = b.divui(&warp, &splitc);
        // Bands in reverse: a band's keys grow with its index, so the
        // longest blocks start first and the short ones fill the SMs they
        // free, instead of the longest starting last, in a tail wave.
        let from_end = b.divui(&warp, &hc);
        let last_band = b.def(format!("arith.subi {bands}, {one} : index"));
        let band = b.def(format!("arith.subi {last_band}, {from_end} : index"));
        let head = b.remui(&warp, &hc);
        let kh = b.divui(&head, &group);
        let (four, eight) = (b.index(4), b.index(8));
        let g = b.divui(&lane, &four);
        let tq = b.remui(&lane, &four);
        let t8 = b.muli(&tq, &eight);
        let r0 = b.muli(&band, &rows16);
        let ra = b.addi(&r0, &g);
        let rb = b.addi(&ra, &eight);
        // Rows past the call's end compute the last row's (not stored).
        let rows = [b.minui(&ra, &last_row), b.minui(&rb, &last_row)];
        // The rows' positions: a row sees the keys up to its own.
        let at = [b.addi(&pos, &rows[0]), b.addi(&pos, &rows[1])];
        let head_q = b.muli(&head, &dc);
        let head_kv = b.muli(&kh, &dc);
        // Queries, [row][group] → 8 features `32·group + 8t..` as [hi, lo],
        // each four words of two f16 (features 0-1, 2-3, 4-5, 6-7 of the 8).
        let qf: Vec<Vec<[Vec<V>; 2]>> = rows
            .iter()
            .map(|r| {
                let rq = b.muli(r, &qw);
                let base = b.addi(&rq, &head_q);
                (0..groups)
                    .map(|c| {
                        let off = b.index(32 * c);
                        let i = b.addi(&base, &off);
                        let i = b.addi(&i, &t8);
                        let x = f32_vload(b, q, &i, 8);
                        half_split(b, &x, 8, "f16").map(|v| words(b, &v, 4))
                    })
                    .collect()
            })
            .collect();
        // The warp's keys: up to its last row's position.
        let top = {
            let r = b.addi(&r0, &rows16);
            let r = b.def(format!("arith.subi {r}, {one} : index"));
            let r = b.minui(&r, &last_row);
            let p = b.addi(&pos, &r);
            b.addi(&p, &one)
        };
        let key_last = b.def(format!("arith.subi {top}, {one} : index"));
        let keysc = b.index(KEYS);
        let tiles = b.def(format!("arith.ceildivui {top}, {keysc} : index"));
        // Carried: the two rows' max and sum, then the output accumulators.
        let mut init: Vec<(V, String)> = vec![(ninf.clone(), "f32".into()), (ninf.clone(), "f32".into())];
        init.push((zero.clone(), "f32".into()));
        init.push((zero.clone(), "f32".into()));
        init.extend((0..ntd * 4).map(|_| (zero.clone(), "f32".to_string())));
        let res = b.for_fold_typed(&w, &tiles, SPLIT, &init, |b, tile, carried| {
            let (m, l, o) = (&carried[0..2], &carried[2..4], &carried[4..]);
            let kb = b.muli(tile, &keysc);
            // Scores of n-tile j: key 8j + g of the tile is the lane's B column.
            let mut s: Vec<V> = Vec::with_capacity(16);
            for j in 0..KEYS / 8 {
                let off = b.index(8 * j);
                let key = b.addi(&kb, &off);
                let key = b.addi(&key, &g);
                let key = b.minui(&key, &key_last);
                let kr = b.muli(&key, &kvw);
                let kbase = b.addi(&kr, &head_kv);
                let mut acc = vec![zero.clone(); 4];
                for (c, (qa, qb)) in qf[0].iter().zip(&qf[1]).enumerate() {
                    let off = b.index(32 * c as u64);
                    let i = b.addi(&kbase, &off);
                    let i = b.addi(&i, &t8);
                    let raw = half_run(b, k, &i, 8);
                    let kw = b.def(format!("llvm.bitcast {raw} : vector<8xf16> to vector<4xi32>"));
                    let kw = words(b, &kw, 4);
                    for st in 0..2 {
                        let (c0, c1) = (2 * st, 2 * st + 1);
                        let bq = [kw[c0].clone(), kw[c1].clone()];
                        for part in [1, 0] {
                            let a = [&qa[part][c0], &qb[part][c0], &qa[part][c1], &qb[part][c1]].map(|x| x.clone());
                            acc = mma_sync_half(b, "f16", &a, &bq, &acc);
                        }
                    }
                }
                s.extend(acc);
            }
            // Accumulator i of n-tile j: row i / 2, key kb + 8j + 2t + i % 2;
            // scaled, and masked where the key is past the row's position.
            let two = b.index(2);
            let t2 = b.muli(&tq, &two);
            let mut vis = Vec::with_capacity(16);
            for (idx, x) in s.iter_mut().enumerate() {
                let (j, i) = (idx as u64 / 4, idx as u64 % 4);
                let off = b.index(8 * j + i % 2);
                let key = b.addi(&kb, &off);
                let key = b.addi(&key, &t2);
                let ok = b.def(format!("arith.cmpi ule, {key}, {} : index", at[(i / 2) as usize]));
                let sc = b.mul(x, &scale);
                *x = b.def(format!("arith.select {ok}, {sc}, {ninf} : f32"));
                vis.push(ok);
            }
            // The online softmax, per row r (accumulators i with i / 2 = r).
            let mut m_new = Vec::new();
            let mut corr = Vec::new();
            for (r, m_r) in m.iter().enumerate() {
                let mut mx = m_r.clone();
                for (idx, x) in s.iter().enumerate() {
                    if (idx % 4) / 2 == r {
                        mx = b.fbin("maxnumf", &mx, x);
                    }
                }
                let mx = quad_all(b, &mx, "maxnumf");
                let dm = b.sub(m_r, &mx);
                corr.push(math::exp(b, &dm));
                m_new.push(mx);
            }
            let p: Vec<V> = s
                .iter()
                .zip(&vis)
                .enumerate()
                .map(|(idx, (x, ok))| {
                    let dx = b.sub(x, &m_new[(idx % 4) / 2]);
                    let e = math::exp(b, &dx);
                    b.def(format!("arith.select {ok}, {e}, {zero} : f32"))
                })
                .collect();
            let mut l_new = Vec::new();
            for (r, (l_r, c_r)) in l.iter().zip(&corr).enumerate() {
                let mut sum = zero.clone();
                for (idx, x) in p.iter().enumerate() {
                    if (idx % 4) / 2 == r {
                        sum = b.add(&sum, x);
                    }
                }
                let sum = quad_all(b, &sum, "addf");
                l_new.push(b.fma(l_r, c_r, &sum));
            }
            let mut o: Vec<V> = o.iter().enumerate().map(|(idx, x)| b.mul(x, &corr[(idx % 4) / 2])).collect();
            // P·V: n-tiles 2i and 2i + 1's keys are the k of one MMA step;
            // the lane's value operands are keys 16i + 2t, + 1, 16i + 8 + 2t
            // and + 1, features (d/8)·g.. of its head.
            let vcol = {
                let n = b.index(ntd);
                let gc = b.muli(&g, &n);
                b.addi(&head_kv, &gc)
            };
            for i in 0..(KEYS / 16) as usize {
                let vals: Vec<V> = [0, 1, 8, 9]
                    .iter()
                    .map(|&e| {
                        let off = b.index(16 * i as u64 + e);
                        let key = b.addi(&kb, &off);
                        let key = b.addi(&key, &t2);
                        let key = b.minui(&key, &key_last);
                        let kr = b.muli(&key, &kvw);
                        let at = b.addi(&kr, &vcol);
                        half_run(b, v, &at, ntd)
                    })
                    .collect();
                // A: rows g and g + 8 at keys 16i + 2t.. (n-tile 2i), then 16i + 8 + 2t.. (2i + 1).
                let (j0, j1) = (8 * i, 8 * i + 4);
                let a: Vec<[V; 2]> = [j0, j0 + 2, j1, j1 + 2].iter().map(|&x| half_split_pair(b, &p[x], &p[x + 1], "f16")).collect();
                for (qn, acc) in o.chunks_mut(4).enumerate() {
                    let bq = [pair_of(b, &vals[0], &vals[1], ntd, qn as u64), pair_of(b, &vals[2], &vals[3], ntd, qn as u64)];
                    for part in [1, 0] {
                        let frag = [&a[0][part], &a[1][part], &a[2][part], &a[3][part]].map(|x| x.clone());
                        let d4 = mma_sync_half(b, "f16", &frag, &bq, acc);
                        acc.clone_from_slice(&d4);
                    }
                }
            }
            let mut next = m_new;
            next.extend(l_new);
            next.extend(o);
            next
        });
        // Every partial to shared memory, then warp w combines the output
        // n-tiles w, w + SPLIT, ... of every warp: each row's max M over the
        // warps, each warp's share weighted by exp(m − M).
        let word = |b: &mut KernelBuilder, ww: &str, i: &str| {
            let sc = b.index(slot);
            let x = b.muli(ww, &sc);
            let x = b.addi(&x, i);
            let x = b.muli(&x, &lanes);
            b.addi(&x, &lane)
        };
        for (i, x) in res.iter().enumerate() {
            let ic = b.index(i as u64);
            let at = word(b, &w, &ic);
            b.store_shared(x, &parts, &at);
        }
        b.barrier();
        let peers: Vec<V> = (0..SPLIT).map(|p| b.index(p)).collect();
        let read = |b: &mut KernelBuilder, p: &str, i: &str| {
            let at = word(b, p, i);
            b.load_shared(&parts, &at)
        };
        let (mut big, mut sums) = (vec![ninf.clone(); 2], vec![zero.clone(); 2]);
        let mut ms: Vec<[V; 2]> = Vec::new();
        for p in &peers {
            let m = [0, 1].map(|r| {
                let ic = b.index(r);
                read(b, p, &ic)
            });
            for (mx, x) in big.iter_mut().zip(&m) {
                *mx = b.fbin("maxnumf", mx, x);
            }
            ms.push(m);
        }
        let weights: Vec<[V; 2]> = ms
            .iter()
            .map(|m| {
                [0, 1].map(|r| {
                    let dm = b.sub(&m[r], &big[r]);
                    math::exp(b, &dm)
                })
            })
            .collect();
        for (p, wt) in peers.iter().zip(&weights) {
            for r in 0..2 {
                let ic = b.index(2 + r as u64);
                let l = read(b, p, &ic);
                sums[r] = b.fma(&l, &wt[r], &sums[r]);
            }
        }
        let inv: Vec<V> = sums
            .iter()
            .map(|l| {
                let onef = b.f32(1.0);
                b.div(&onef, l)
            })
            .collect();
        // Output n-tile qn, accumulator i: row i / 2, column c = 2t + i % 2, head feature (d/8)·c + qn.
        let two = b.index(2);
        let t2 = b.muli(&tq, &two);
        let raw_rows = [&ra, &rb];
        for j in 0..ntd / SPLIT {
            let jc = b.index(j * SPLIT);
            let qn = b.addi(&w, &jc);
            for i in 0..4u64 {
                let r = (i / 2) as usize;
                let four_c = b.index(4);
                let wi = b.muli(&qn, &four_c);
                let ic = b.index(4 + i);
                let wi = b.addi(&wi, &ic);
                let mut y = zero.clone();
                for (p, wt) in peers.iter().zip(&weights) {
                    let x = read(b, p, &wi);
                    y = b.fma(&x, &wt[r], &y);
                }
                let row = raw_rows[r];
                let inb = b.def(format!("arith.cmpi ult, {row}, {seq} : index"));
                let c = b.index(i % 2);
                let c = b.addi(&t2, &c);
                let n = b.index(ntd);
                let f = b.muli(&c, &n);
                let f = b.addi(&f, &qn);
                let ro = b.muli(row, &qw);
                let o = b.addi(&ro, &head_q);
                let o = b.addi(&o, &f);
                let y = b.mul(&y, &inv[r]);
                b.if_then(&inb, |b| b.store(&y, out, &o));
            }
        }
    });
}
