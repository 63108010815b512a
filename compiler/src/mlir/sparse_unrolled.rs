//! Sparse matmul kernels at the `indices` and `full` levels of the
//! specialization dial: the nonzero structure is baked into the code. Every
//! output's stored entries (`sparsec_ir::sparse::entries`, the same list for
//! CSR, N:M and BSR) become straight-line FMAs at known columns; `indices`
//! still reads the values from the packed weight, `full` bakes them as
//! constants (the weight buffer is then not read at all).
//!
//! Code grows with the nonzeros (a few instructions each), so does compile
//! time: the manifest records both, and `auto` bakes only small matrices.
//! CPU: the generic kernel's (row block, output block) units, a switch over
//! the output block, rows one at a time; NVIDIA: one thread per output element,
//! a switch over the output.

use super::builder::{Device, KernelBuilder, V};
use super::sparse_kernels::SparseMatmul;
use crate::error::CompileError;
use sparsec_ir::sparse::{entries, value_at};

/// Independent partial sums per output (round robin), for instruction-level parallelism.
const SUMS: usize = 4;

/// Emits the kernel body for a weight whose packed bytes are `bytes`.
pub fn emit_unrolled_matmul(
    b: &mut KernelBuilder,
    t: &SparseMatmul,
    full: bool,
    bytes: &[u8],
    ins: &[V],
    out: &str,
    kernel: &str,
) -> Result<(), CompileError> {
    let fmt = t.storage.format;
    let rows_of = entries(&fmt, bytes).ok_or_else(|| CompileError::Unsupported {
        kernel: kernel.to_string(),
        op: "matmul",
        why: format!("the packed weight does not hold {:?}", fmt),
    })?;
    let (n, k) = t.nk();
    let vals = b.plane(&ins[1], fmt.layout().values, fmt.stored_values().max(1), "f32");
    let a = ins[0].clone();
    let (kc, nc) = (b.index(k), b.index(n));
    // Output j of the row starting at `arow`: the baked sum.
    let dot = |b: &mut KernelBuilder, j: usize, arow: &str| -> V {
        let zero = b.f32(0.0);
        let mut sums = vec![zero; SUMS];
        for (e, &(kk, p)) in rows_of[j].iter().enumerate() {
            let v = if full {
                b.f32(value_at(&fmt, bytes, p))
            } else {
                let pi = b.index(p as u64);
                b.load_elem(&vals, &pi, "f32")
            };
            let kci = b.index(kk as u64);
            let ai = b.addi(arow, &kci);
            let x = b.load(&a, &ai);
            sums[e % SUMS] = b.fma(&v, &x, &sums[e % SUMS]);
        }
        let s01 = b.add(&sums[0], &sums[1]);
        let s23 = b.add(&sums[2], &sums[3]);
        b.add(&s01, &s23)
    };
    match b.device() {
        Device::Nvptx => t.per_output_thread(b, |b, u, j, arow| {
            b.switch(j, 0..n, |b, jj| {
                let y = dot(b, jj as usize, arow);
                b.store_result(&y, out, u);
            });
        }),
        Device::Cpu => {
            let tiles = t.col_tiles();
            let (units, ct, rbc, rows) = t.cpu_grid(b);
            let cols = t.cols();
            b.parallel(&units, |b, u| {
                let rbi = b.divui(u, &ct);
                let cb = b.remui(u, &ct);
                let r0 = b.muli(&rbi, &rbc);
                let r1 = b.addi(&r0, &rbc);
                let r_end = b.def(format!("arith.minui {r1}, {rows} : index"));
                b.for_each(&r0, &r_end, |b, r| {
                    let arow = b.muli(r, &kc);
                    let orow = b.muli(r, &nc);
                    b.switch(&cb, 0..tiles, |b, tile| {
                        for j in tile * cols..((tile + 1) * cols).min(n) {
                            let y = dot(b, j as usize, &arow);
                            let ji = b.index(j);
                            let o = b.addi(&orow, &ji);
                            b.store_result(&y, out, &o);
                        }
                    });
                });
            });
        }
    }
    Ok(())
}
