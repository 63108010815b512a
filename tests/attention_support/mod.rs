//! What the attention tests (`attention.rs`, `nsa.rs`) share: deterministic
//! inputs, a compile into a fresh directory, and a session fed in calls.
#![allow(dead_code)]

use ndarray::{ArrayD, Axis, IxDyn, Slice};
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

/// Runs rows `0..total` of `inputs` through a fresh CPU session of `art`: calls
/// of the lengths in `calls`, then one row at a time; the outputs joined by rows.
pub fn run_in_calls(art: &Artifact, inputs: &[ArrayD<f32>], calls: &[usize], total: usize) -> ArrayD<f32> {
    let exec = sparsec_runtime::cpu::CpuExecutor::load(art).unwrap();
    let mut session = exec.session(art).unwrap();
    let rows = |lo: usize, hi: usize| -> Vec<ArrayD<f32>> {
        inputs.iter().map(|a| a.slice_axis(Axis(0), Slice::from(lo..hi)).to_owned()).collect()
    };
    let mut parts = Vec::new();
    let mut at = 0;
    for &n in calls {
        parts.push(session.run(&rows(at, at + n)).unwrap().remove(0));
        at += n;
    }
    for t in at..total {
        parts.push(session.run(&rows(t, t + 1)).unwrap().remove(0));
    }
    assert!(session.cache_bytes() > 0);
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).unwrap()
}
