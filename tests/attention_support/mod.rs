//! What the attention tests (`attention.rs`, `nsa.rs`, `kv_chunked.rs`,
//! `kv_sequence.rs`) share: deterministic inputs, a compile into a fresh
//! directory, a session fed in calls, and the tiny Llama compiled with a plan.
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

/// `tests/fixtures/hf/llama_tiny` compiled by the CLI (CPU) into `dir/a.sparsec`
/// with a plan of one rule over every layer (`rule` its keys).
pub fn compile_tiny_with_rule(dir: &std::path::Path, rule: &str) -> std::process::Output {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama_tiny");
    let plan = dir.join("plan.toml");
    std::fs::write(&plan, format!("[[rule]]\nlayers = \"all\"\n{rule}\n")).unwrap();
    let out = dir.join("a.sparsec");
    std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"))
        .args([
            "compile",
            src.to_str().unwrap(),
            "--target",
            "cpu",
            "--no-cache",
            "--plan",
            plan.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap()
}

/// A CPU session of `art` (a tiny Llama) against the interpreter: 20 prompt
/// ids in calls of 6, then 14 decode steps, every step's logits within 1e-4.
pub fn steps_equal_the_interpreter(art: &Artifact) {
    use sparsec_runtime::compare::Tolerance;
    use sparsec_runtime::execute::{DeviceKind, Executor};
    use sparsec_runtime::lm_session::{compare_steps, Reference};
    let exec = Executor::load(art, DeviceKind::Cpu).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 5 % 96) as u32).collect();
    let cap = sparsec_runtime::cuda_session::SessionCapacity { positions: 40, seq: 6 };
    let mut s = exec.session(art, cap).unwrap();
    let steps = compare_steps(&mut s, &mut Reference::Interpreter(art), &ids, 6, 14, Tolerance { atol: 1e-4, rtol: 1e-4 }).unwrap();
    assert_eq!(steps.len(), 4 + 14);
    for st in &steps {
        assert!(st.cmp.passed, "pos {} differs by {}", st.pos, st.cmp.max_abs_error);
    }
}
