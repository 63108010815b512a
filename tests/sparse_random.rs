//! Sparse matmuls over seeded random shapes, patterns, orientations and
//! specialization levels (odd sizes, empty and full rows at the extremes of the
//! sparsity), each compiled and checked against the reference interpreter by
//! `sparsec run --check` at seq 1 and 5 (prefill's 4-row blocks plus a ragged row).

use std::process::Command;

/// xorshift64*: the cases depend on the seed only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_sparse_matmuls_equal_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_5a25);
    let levels = ["generic", "generic", "indices", "full", "dense"];
    for case in 0..24 {
        let level = levels[rng.below(levels.len() as u64) as usize];
        let (pattern, mult_k, mult_n) = match rng.below(3) {
            0 => {
                let ratio = [0.0, 0.3, 0.9, 0.97][rng.below(4) as usize];
                (format!("#sparsity(unstructured, ratio = {ratio})"), 1, 1)
            }
            1 => {
                let (n, m) = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 3)][rng.below(7) as usize];
                (format!("#sparsity(nm, n = {n}, m = {m})"), m, 1)
            }
            _ => {
                let (r, c) = [(1, 4), (2, 2), (4, 4), (2, 8), (3, 3)][rng.below(5) as usize];
                let ratio = [0.0, 0.5, 0.8][rng.below(3) as usize];
                (format!("#sparsity(block, ratio = {ratio}, rows = {r}, cols = {c})"), c, r)
            }
        };
        let k = mult_k * (1 + rng.below(40 / mult_k + 2));
        let n = mult_n * (1 + rng.below(40 / mult_n + 2));
        let transposed = rng.below(2) == 0;
        let (wshape, attr) = if transposed { (format!("[{n}, {k}]"), " {transpose_b = true}") } else { (format!("[{k}, {n}]"), "") };
        let text = format!(
            "graph @case{case} {{\n  %x = input : f32[seq, {k}]\n  %w = weight \"w\" init normal(seed = {case}, std = 0.5) : f32{wshape}\n  %y = matmul %x, %w{attr} {pattern} #specialize({level})\n  return %y\n}}\n"
        );
        let file = tmp.path().join(format!("case{case}.sir"));
        std::fs::write(&file, &text).unwrap();
        for seq in ["1", "5"] {
            let o = Command::new(env!("CARGO_BIN_EXE_sparsec"))
                .args(["run", file.to_str().unwrap(), "--seq", seq, "--check", "--cache-dir", tmp.path().join("cache").to_str().unwrap()])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.contains("reference interpreter: MATCH"),
                "case {case} at seq {seq}:\n{text}\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// Kept values stored quantized (`#values(q8|q4)`): every format at random
/// shapes, orientations and levels (`generic`, `dense`, `auto`), f32
/// activations (the generic kernels dequantize each value: equal to the
/// reference to f32 rounding). The int8 2:4 kernel is checked by the
/// `lower-matmul-nm-q` filetest, within its activations' rounding.
#[test]
fn random_quantized_sparse_matmuls_equal_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9a17_c0de);
    let levels = ["generic", "generic", "dense", "auto"];
    for case in 0..12 {
        let level = levels[rng.below(levels.len() as u64) as usize];
        let values = ["q8", "q4"][rng.below(2) as usize];
        let (pattern, mult_k, mult_n) = match rng.below(3) {
            0 => {
                let ratio = [0.0, 0.5, 0.9, 0.97][rng.below(4) as usize];
                (format!("#sparsity(unstructured, ratio = {ratio})"), 1, 1)
            }
            1 => {
                let (n, m) = [(2, 4), (1, 4), (3, 4), (2, 8)][rng.below(4) as usize];
                (format!("#sparsity(nm, n = {n}, m = {m})"), m, 1)
            }
            _ => {
                let (r, c) = [(1, 4), (2, 2), (4, 8), (3, 3)][rng.below(4) as usize];
                let ratio = [0.0, 0.5, 0.8][rng.below(3) as usize];
                (format!("#sparsity(block, ratio = {ratio}, rows = {r}, cols = {c})"), c, r)
            }
        };
        let k = mult_k * (1 + rng.below(80 / mult_k + 2));
        let n = mult_n * (1 + rng.below(40 / mult_n + 2));
        let transposed = rng.below(2) == 0;
        let (wshape, attr) = if transposed { (format!("[{n}, {k}]"), " {transpose_b = true}") } else { (format!("[{k}, {n}]"), "") };
        let text = format!(
            "graph @qcase{case} {{\n  %x = input : f32[seq, {k}]\n  %w = weight \"w\" init normal(seed = {case}, std = 0.5) : f32{wshape}\n  %y = matmul %x, %w{attr} {pattern} #values({values}) #specialize({level})\n  return %y\n}}\n"
        );
        let file = tmp.path().join(format!("qcase{case}.sir"));
        std::fs::write(&file, &text).unwrap();
        for seq in ["1", "5"] {
            let o = Command::new(env!("CARGO_BIN_EXE_sparsec"))
                .args(["run", file.to_str().unwrap(), "--seq", seq, "--check", "--quant-activations", "f32"])
                .args(["--cache-dir", tmp.path().join("cache").to_str().unwrap()])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.contains("reference interpreter: MATCH"),
                "case {case} at seq {seq}:\n{text}\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}
