//! NVPTX warp-strided folds along a row, unrolled so that a lane's loads are
//! in flight together: the loads of `UNROLL` steps are emitted before the
//! arithmetic that consumes them (a rolled loop waits one memory round trip
//! per step, and ptxas does not hoist loads across the back edge).

use crate::mlir::builder::{KernelBuilder, V};

use super::WARP;

/// Steps whose loads are issued together.
pub(super) const UNROLL: u64 = 8;

/// How the steps of a lane along a row of `k` elements fall: chunks of
/// `chunk = width · WARP` elements, `full` of them whole (every lane in range)
/// and taken `unroll` at a time (`groups` such groups, then `tail` chunks),
/// and a partial chunk of `rem` elements.
struct Chunks {
    chunk: u64,
    full: u64,
    rem: u64,
    unroll: u64,
    groups: u64,
    tail: u64,
}

impl Chunks {
    fn new(k: u64, width: u64) -> Chunks {
        debug_assert_eq!(k % width, 0);
        let chunk = width * WARP;
        let (full, rem) = (k / chunk, k % chunk);
        let unroll = UNROLL.min(full).max(1);
        Chunks { chunk, full, rem, unroll, groups: full / unroll, tail: full % unroll }
    }
}

/// `at(kk)` for the lane's steps in `n` consecutive chunks from element
/// `base` (`kk = base + u·chunk + start`), in order.
fn steps<T>(
    b: &mut KernelBuilder,
    base: &str,
    start: &str,
    n: u64,
    chunk: u64,
    mut at: impl FnMut(&mut KernelBuilder, &str) -> T,
) -> Vec<T> {
    (0..n)
        .map(|u| {
            let off = b.index(u * chunk);
            let first = b.addi(base, &off);
            let kk = b.addi(&first, start);
            at(b, &kk)
        })
        .collect()
}

/// A fold over the row `0..k` of which a lane reads `width` consecutive
/// elements at `start`, `start + chunk`, ... (`chunk = width · WARP`; `start`
/// is the lane's `width · lane`). `load(kk)` reads what the step at element
/// offset `kk` needs, `step(loaded, acc)` folds it into the accumulator (of
/// type `ty`). Whole chunks (every lane in range) go `UNROLL` at a time, loads
/// first, in a loop with a constant trip count; then a last partial chunk, in
/// which lanes past the row's end load a clamped offset and keep their
/// accumulator. Steps are folded in ascending offset order, as a rolled loop
/// would. `k` must be a multiple of `width`.
pub(super) fn warp_fold<L>(
    b: &mut KernelBuilder,
    start: &str,
    k: u64,
    width: u64,
    init: (V, String),
    load: impl Fn(&mut KernelBuilder, &str) -> L,
    step: impl Fn(&mut KernelBuilder, &L, &str) -> V,
) -> V {
    let Chunks { chunk, full, rem, unroll, groups, tail } = Chunks::new(k, width);
    let ty = init.1.clone();
    // `n` consecutive chunks from element `base + start`: loads, then folds.
    let run = |b: &mut KernelBuilder, base: &str, n: u64, acc: V| -> V {
        let loaded = steps(b, base, start, n, chunk, |b, kk| load(b, kk));
        loaded.iter().fold(acc, |acc, l| step(b, l, &acc))
    };
    let mut acc = init.0.clone();
    if groups == 1 {
        let zero = b.index(0);
        acc = run(b, &zero, unroll, acc);
    } else if groups > 1 {
        let zero = b.index(0);
        let ub = b.index(groups * unroll * chunk);
        acc = b.for_fold_typed(&zero, &ub, unroll * chunk, &[(acc, ty.clone())], |b, base, a| vec![run(b, base, unroll, a[0].clone())])[0]
            .clone();
    }
    if tail > 0 {
        let base = b.index(groups * unroll * chunk);
        acc = run(b, &base, tail, acc);
    }
    if rem > 0 {
        // Lanes with `start < rem` hold elements of the partial chunk.
        let (remc, last) = (b.index(rem), b.index(rem - width));
        let valid = b.def(format!("arith.cmpi ult, {start}, {remc} : index"));
        let clamped = b.minui(start, &last);
        let base = b.index(full * chunk);
        let kk = b.addi(&base, &clamped);
        let l = load(b, &kk);
        let next = step(b, &l, &acc);
        acc = b.def(format!("arith.select {valid}, {next}, {acc} : {ty}"));
    }
    acc
}

/// NVPTX, ahead of the kernel's wait for the grids before it
/// (`KernelBuilder::before_wait`): in a one-row call, where `warp_per_output`
/// gives block `b` of `BLOCK` threads the outputs `j0 = 8b .. j1 = 8b + 8`
/// (clamped to `n`), the block prefetches into L2 the weight bytes those
/// warps will read: `ranges(j0, j1)` gives them as (start byte, end byte) of
/// `w`, and the block's threads take one 128-byte line at a time. Weights
/// are written by no kernel, so this may run (and `ranges` may load from `w`)
/// while the kernel before still does; the loads after the wait then find
/// the rows in L2.
pub(in crate::mlir) fn prefetch_warp_block(
    b: &mut KernelBuilder,
    w: &str,
    n: u64,
    ranges: impl FnOnce(&mut KernelBuilder, &str, &str) -> Vec<(V, V)>,
) {
    const LINE: u64 = 128;
    let threads = sparsec_runtime::cuda::BLOCK as u64;
    let per_block = threads / WARP;
    b.before_wait(|b| {
        let (seq, one) = (b.seq(), b.index(1));
        let single = b.def(format!("arith.cmpi eq, {seq}, {one} : index"));
        b.if_then(&single, |b| {
            let tid = b.def("nvvm.read.ptx.sreg.tid.x : i32".into());
            let bid = b.def("nvvm.read.ptx.sreg.ctaid.x : i32".into());
            let tid = b.def(format!("arith.index_castui {tid} : i32 to index"));
            let bid = b.def(format!("arith.index_castui {bid} : i32 to index"));
            let (pb, nc, line) = (b.index(per_block), b.index(n), b.index(LINE));
            let j0 = b.muli(&bid, &pb);
            let j0 = b.minui(&j0, &nc);
            let j1 = b.addi(&j0, &pb);
            let j1 = b.minui(&j1, &nc);
            for (start, end) in ranges(b, &j0, &j1) {
                let l0 = b.divui(&start, &line);
                let l1 = b.def(format!("arith.ceildivui {end}, {line} : index"));
                let first = b.addi(&l0, &tid);
                b.for_step(&first, &l1, threads, |b, l| {
                    let at = b.muli(l, &line);
                    let at = b.def(format!("arith.index_cast {at} : index to i64"));
                    let p = b.def(format!("llvm.getelementptr inbounds {w}[{at}] : (!llvm.ptr, i64) -> !llvm.ptr, i8"));
                    b.prefetch_l2(&p);
                });
            }
        });
    });
}

/// `prefetch_warp_block` for dense weight rows of `row_bytes` bytes each from the start of `w`.
pub(in crate::mlir) fn prefetch_warp_rows(b: &mut KernelBuilder, w: &str, n: u64, row_bytes: u64) {
    prefetch_warp_block(b, w, n, |b, j0, j1| {
        let rb = b.index(row_bytes);
        vec![(b.muli(j0, &rb), b.muli(j1, &rb))]
    });
}

/// NVPTX: a warp per element `e = r·n + j` of a `[rows, n]` result whose
/// row `r` reduces over `k` values. `work` counts the warps' lanes (whole
/// warps, so every lane of a warp that enters the bounds check takes part in
/// the shuffles). `partial(lane, j, arow)` is one lane's share of the sum
/// (`arow`: where row `r` of a `k`-wide operand starts); a butterfly of
/// `shfl.sync` adds the lanes' shares and lane 0 stores the result through
/// `store_result` (with the fused epilogue).
pub(in crate::mlir) fn warp_per_output(
    b: &mut KernelBuilder,
    work: &str,
    k: u64,
    n: u64,
    out: &str,
    partial: impl FnOnce(&mut KernelBuilder, &str, &str, &str) -> V,
) {
    let (kc, nc) = (b.index(k), b.index(n));
    b.parallel(work, |b, t| {
        let warp = b.index(WARP);
        let e = b.divui(t, &warp);
        let lane = b.remui(t, &warp);
        let r = b.divui(&e, &nc);
        let j = b.remui(&e, &nc);
        let arow = b.muli(&r, &kc);
        let part = partial(b, &lane, &j, &arow);
        let sum = b.warp_all(&part, "addf");
        let zero = b.index(0);
        let first = b.def(format!("arith.cmpi eq, {lane}, {zero} : index"));
        b.if_then(&first, |b| b.store_result(&sum, out, &e));
    });
}

/// Like `warp_fold` without an accumulator: `body(loaded, kk)` runs for every
/// step a lane covers (stores, say), the loads of up to `UNROLL` steps emitted
/// first; the partial chunk runs only in lanes that hold part of it.
pub(super) fn warp_each<L>(
    b: &mut KernelBuilder,
    start: &str,
    k: u64,
    width: u64,
    load: impl Fn(&mut KernelBuilder, &str) -> L,
    body: impl Fn(&mut KernelBuilder, &L, &str),
) {
    let Chunks { chunk, full, rem, unroll, groups, tail } = Chunks::new(k, width);
    let run = |b: &mut KernelBuilder, base: &str, n: u64| {
        let loaded = steps(b, base, start, n, chunk, |b, kk| (load(b, kk), kk.to_string()));
        for (l, kk) in &loaded {
            body(b, l, kk);
        }
    };
    if groups == 1 {
        let zero = b.index(0);
        run(b, &zero, unroll);
    } else if groups > 1 {
        let zero = b.index(0);
        let ub = b.index(groups * unroll * chunk);
        b.for_step(&zero, &ub, unroll * chunk, |b, base| run(b, base, unroll));
    }
    if tail > 0 {
        let base = b.index(groups * unroll * chunk);
        run(b, &base, tail);
    }
    if rem > 0 {
        let remc = b.index(rem);
        let valid = b.def(format!("arith.cmpi ult, {start}, {remc} : index"));
        b.if_then(&valid, |b| {
            let base = b.index(full * chunk);
            let kk = b.addi(&base, start);
            let l = load(b, &kk);
            body(b, &l, &kk);
        });
    }
}

/// NVPTX: `width` f32 values at `buf[i..]` in one aligned vector load (16-byte
/// alignment; LLVM splits wider vectors into 16-byte loads).
pub(super) fn f32_vload(b: &mut KernelBuilder, buf: &str, i: &str, width: u32) -> V {
    let vty = KernelBuilder::vty(width);
    let i = b.def(format!("arith.index_cast {i} : index to i64"));
    let p = b.def(format!("llvm.getelementptr inbounds {buf}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, f32"));
    b.def(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr -> {vty}"))
}

/// NVPTX: stores the `width` f32 lanes of `v` at `buf[i..]` (16-byte aligned).
pub(super) fn f32_vstore(b: &mut KernelBuilder, v: &str, buf: &str, i: &str, width: u32) {
    let vty = KernelBuilder::vty(width);
    let i = b.def(format!("arith.index_cast {i} : index to i64"));
    let p = b.def(format!("llvm.getelementptr inbounds {buf}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, f32"));
    b.line(format!("llvm.store {v}, {p} {{alignment = 16 : i64}} : {vty}, !llvm.ptr"));
}

/// NVPTX: a vector of `width` copies of the scalar `x` (without the vector
/// dialect, which the NVPTX pipeline does not lower).
pub(super) fn f32_splat(b: &mut KernelBuilder, x: &str, width: u32) -> V {
    let vty = KernelBuilder::vty(width);
    let mut v = b.def(format!("llvm.mlir.undef : {vty}"));
    for l in 0..width as i32 {
        let li = b.i32(l);
        v = b.def(format!("llvm.insertelement {x}, {v}[{li} : i32] : {vty}"));
    }
    v
}

/// NVPTX: the sum of the `width` lanes of `v`, lane 0 first.
pub(super) fn f32_lanes_sum(b: &mut KernelBuilder, v: &str, width: u32) -> V {
    let vty = KernelBuilder::vty(width);
    let mut sum = String::new();
    for l in 0..width as i32 {
        let li = b.i32(l);
        let x = b.def(format!("llvm.extractelement {v}[{li} : i32] : {vty}"));
        sum = if l == 0 { x } else { b.add(&sum, &x) };
    }
    sum
}
