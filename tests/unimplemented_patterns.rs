//! Patterns the text form and the verifier know but nothing implements yet
//! (`#kv` on the feature axis, whose bases are a pass over the weights), and `#specialize` without `#sparsity`, are refused by the
//! compiler and by the interpreter alike, never ignored. `#low_rank` is
//! lowered by the `low-rank` pass, which runs when a plan factors weights
//! (`tests/low_rank.rs`); one that reaches a backend unlowered is refused.

use sparsec_compiler::driver::{compile, CompileRequest};
use sparsec_compiler::options::CompileOptions;
use sparsec_compiler::Cache;
use sparsec_ir::parse_graph;
use sparsec_passes::PrintOptions;

const CASES: [(&str, &str); 4] = [
    ("matmul %x, %w #low_rank(rank = 2)", "this op was not lowered"),
    ("matmul %x, %w #specialize(generic)", "this op has no #sparsity"),
    ("attention %x, %x, %x {heads = 2, kv_heads = 2} #kv(dct, keep = 0.5)", "#kv is not lowered yet"),
    ("attention %x, %x, %x {heads = 2, kv_heads = 2} #kv(pswf, keep = 0.5, bandwidth = 0.1)", "#kv is not lowered yet"),
];

fn graph(op: &str) -> String {
    format!("graph @g {{\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" init normal(seed = 1, std = 0.3) : f32[8, 8]\n  %y = {op}\n  return %y\n}}\n")
}

#[test]
fn the_compiler_refuses_unimplemented_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    for (op, want) in CASES {
        let err = compile(CompileRequest {
            graph: parse_graph(&graph(op)).unwrap(),
            plan_text: None,
            weights: sparsec_compiler::WeightSource::None,
            options: CompileOptions::default(),
            print: PrintOptions::default(),
            cache: None::<Cache>,
            output: tmp.path().join("g.sparsec"),
            lm: None,
        })
        .err()
        .unwrap_or_else(|| panic!("`{op}` compiled"))
        .to_string();
        assert!(err.contains(want), "{op}: {err}");
        assert!(!tmp.path().join("g.sparsec").exists());
    }
}

#[test]
fn the_interpreter_refuses_unimplemented_patterns() {
    for (op, want) in CASES {
        let mut g = parse_graph(&graph(op)).unwrap();
        sparsec_passes::PassManager::with_plan(None, PrintOptions::default()).run(&mut g).unwrap();
        let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 8]), vec![0.5f32; 24]).unwrap();
        let w = std::sync::Arc::new(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[8, 8]), vec![0.1f32; 64]).unwrap());
        let err = sparsec_runtime::interpreter::interpret(&g, &[x], &|_| Some(w.clone()))
            .err()
            .unwrap_or_else(|| panic!("`{op}` was interpreted"))
            .to_string();
        assert!(err.contains(want), "{op}: {err}");
    }
}
