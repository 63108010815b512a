//! Chunked-SVD KV caches (`#kv(chunked_svd)`, `kv = { transform =
//! "chunked_svd", ... }`): the compiled CPU session equals the reference
//! interpreter through prefills split into calls and decode across chunk
//! boundaries, with fixed and energy-chosen ranks; the factors really change
//! what attention reads (the exact attention is far from it); the cache
//! takes a record per chunk instead of its rows; a session refuses to go back
//! past the exact rows it keeps; and the plan spelling reaches a model (the
//! tiny Llama fixture) whose logits equal the interpreter's step by step.

use crate::attention_support;

use attention_support::{build, compile_tiny_with_rule, run_in_calls, steps_equal_the_interpreter, values};
use sparsec_compiler::{CompileOptions, TargetKind};
use sparsec_ir::parse_graph;
use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::interpreter::interpret;
use sparsec_runtime::manifest::BufferKind;
use sparsec_runtime::Artifact;

/// One grouped attention (4 heads of width 16 over 2 KV heads) with `pattern`.
fn graph(pattern: &str) -> sparsec_ir::Graph {
    parse_graph(&format!(
        "graph @c {{\n  %q = input : f32[seq, 64]\n  %k = input : f32[seq, 32]\n  %v = input : f32[seq, 32]\n  \
         %y = attention %q, %k, %v {{heads = 4, kv_heads = 2}} {pattern}\n  return %y\n}}\n"
    ))
    .unwrap()
}

#[test]
fn factored_attention_equals_the_interpreter_through_calls_and_decode() {
    let total = 340;
    let inputs = [values(total, 64, 1), values(total, 32, 2), values(total, 32, 3)];
    let exact = interpret(&graph(""), &inputs, &|_| None).unwrap().remove(0);
    for pattern in ["#kv(chunked_svd, chunk = 16, rank = 4)", "#kv(chunked_svd, chunk = 16, energy = 0.9, max_rank = 8)"] {
        let g = graph(pattern);
        let (_tmp, art) = build(g.clone(), CompileOptions { target: TargetKind::Cpu, ..Default::default() });
        let want = interpret(&g, &inputs, &|_| None).unwrap().remove(0);
        // 37 rows (2 chunks and 5 rows of the third), 260 more (the runtime
        // splits them at the ring's 257), then decode across 4 chunk ends.
        let got = run_in_calls(&art, &inputs, &[37, 260], total);
        let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
        assert!(c.passed, "{pattern}: max abs error {} at {}", c.max_abs_error, c.worst_index);
        // The factors are what attention reads: the exact attention differs.
        let off = compare(&got, &exact, Tolerance { atol: 1e-2, rtol: 1e-2 });
        assert!(!off.passed, "{pattern}: equals exact attention (max error {})", off.max_abs_error);
        // Rows of the first chunk read only their own chunk: exact.
        let first = got.slice(ndarray::s![..16, ..]).to_owned().into_dyn();
        let first_exact = exact.slice(ndarray::s![..16, ..]).to_owned().into_dyn();
        assert!(compare(&first, &first_exact, Tolerance { atol: 1e-4, rtol: 1e-4 }).passed, "{pattern}: the first chunk is read exactly");
    }
}

#[test]
fn the_cache_holds_a_record_per_chunk_and_a_ring_of_exact_rows() {
    let (_tmp, art) =
        build(graph("#kv(chunked_svd, chunk = 16, rank = 4)"), CompileOptions { target: TargetKind::Cpu, ..Default::default() });
    let caches: Vec<_> = art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).collect();
    assert_eq!(caches.len(), 2);
    for b in caches {
        let c = b.chunked.expect("a chunked layout");
        // Ring: 16 - 1 rows of the own chunk and 256 of a call, in whole chunks.
        assert_eq!((c.chunk, c.slot, c.head, c.ring), (16, 4, 16, 272));
        // Per chunk: 8 halves of ranks (2 heads, padded), per head 4·16 coefficients and 4·16 basis values.
        let record = 2 * (8 + 2 * (4 * 16 + 4 * 16));
        assert_eq!(b.bytes(1024), 272 * 32 * 4 + 64 * record);
        // Against 16 positions × 32 channels of f16: 528 bytes instead of 1024.
        assert_eq!((record, b.position_bytes()), (528, 33));
    }
}

#[test]
fn a_session_goes_back_only_as_far_as_its_exact_rows_reach() {
    let (_tmp, art) =
        build(graph("#kv(chunked_svd, chunk = 16, rank = 4)"), CompileOptions { target: TargetKind::Cpu, ..Default::default() });
    let exec = sparsec_runtime::cpu::CpuExecutor::load(&art).unwrap();
    let mut s = exec.session(&art).unwrap();
    let n = 300;
    let inputs = [values(n, 64, 1), values(n, 32, 2), values(n, 32, 3)];
    s.run(&inputs).unwrap();
    // The ring keeps positions 28..300: position 40's chunk starts at 32.
    s.truncate(40).unwrap();
    assert_eq!(s.pos(), 40);
    let mut s = exec.session(&art).unwrap();
    s.run(&inputs).unwrap();
    let e = s.truncate(20).unwrap_err().to_string();
    assert!(e.contains("chunked-SVD cache keeps exact rows of the last 272 positions"), "{e}");
}

#[test]
fn a_plan_factors_a_models_caches_and_its_logits_equal_the_interpreter() {
    let tmp = tempfile::tempdir().unwrap();
    let st = compile_tiny_with_rule(tmp.path(), "kv = { transform = \"chunked_svd\", chunk = 8, rank = 2 }");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let art = Artifact::open(&tmp.path().join("a.sparsec")).unwrap();
    let caches: Vec<_> = art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).collect();
    assert!(!caches.is_empty() && caches.iter().all(|b| b.chunked.is_some_and(|c| c.chunk == 8 && c.slot == 2)));
    // 20 prompt ids in calls of 6, then 14 decode steps: chunk ends at 8, 16, 24 and 32.
    steps_equal_the_interpreter(&art);
}

#[test]
fn plans_refuse_what_chunked_svd_does_not_take() {
    let tmp = tempfile::tempdir().unwrap();
    for (kv, why) in [
        ("kv = { transform = \"chunked_svd\", chunk = 8, rank = 2, keep = 0.5 }", "it takes chunk, and rank or energy"),
        ("kv = { transform = \"chunked_svd\", chunk = 8 }", "needs exactly one of rank or energy"),
        ("kv = { transform = \"chunked_svd\", chunk = 8, rank = 2, energy = 0.9 }", "needs exactly one of rank or energy"),
        ("kv = { transform = \"chunked_svd\", chunk = 8, rank = 2, max_rank = 4 }", "max_rank caps an energy rank"),
        ("kv = { transform = \"chunked_svd\", chunk = 8, rank = 9 }", "rank 9 exceeds the chunk length 8"),
        ("kv = { transform = \"chunked_svd\", chunk = 8, energy = 1.5 }", "energy = 1.5 is outside (0, 1]"),
        // Windows read fewer positions than a factored cache holds.
        (
            "kv = { transform = \"chunked_svd\", chunk = 8, rank = 2 }\nattention = { window = { size = 16, sinks = 4 } }",
            "not combined with #window",
        ),
        // Head width 8: a chunk of 12 is not made of 8-lane vectors.
        ("kv = { transform = \"chunked_svd\", chunk = 12, rank = 2 }", "multiples of 8"),
    ] {
        let st = compile_tiny_with_rule(tmp.path(), kv);
        let e = String::from_utf8_lossy(&st.stderr);
        assert!(!st.status.success() && e.contains(why), "{kv}: {e}");
    }
}
