//! What the attention tests (`attention.rs`, `nsa.rs`) share: deterministic
//! inputs and a compile into a fresh directory.
#![allow(dead_code)]

use ndarray::{ArrayD, IxDyn};
use sparsec_compiler::{compile, CompileOptions, CompileRequest, WeightSource};
use sparsec_passes::PrintOptions;
use sparsec_runtime::Artifact;

/// Deterministic values in [-1, 1].
pub fn values(rows: usize, width: usize, seed: u64) -> ArrayD<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v = (0..rows * width)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&[rows, width]), v).unwrap()
}

/// Compiles `graph` into an artifact in a fresh directory (kept alive by the returned guard).
pub fn build(graph: sparsec_ir::Graph, options: CompileOptions) -> (tempfile::TempDir, Artifact) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.sparsec");
    let request = CompileRequest {
        graph,
        plan_text: None,
        weights: WeightSource::None,
        options,
        print: PrintOptions::default(),
        cache: None,
        output: out.clone(),
        lm: None,
    };
    compile(request).unwrap();
    let art = Artifact::open(&out).unwrap();
    (tmp, art)
}
