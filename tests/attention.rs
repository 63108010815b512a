//! Attention at long context through a KV-cached CPU session, against the
//! reference interpreter over the whole sequence: grouped KV heads read once
//! per group, decode split over positions and combined (flash-decoding), and
//! sliding windows with sinks on ring caches (a prefill longer than the ring's
//! slack runs in chunks; decode wraps the ring many times).

mod attention_support;

use attention_support::{build, values};
use ndarray::{ArrayD, Axis, Slice};
use sparsec_compiler::{CompileOptions, KvCacheType, TargetKind};
use sparsec_ir::parse_graph;
use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::interpreter::interpret;
use sparsec_runtime::manifest::{ExecutionPlan, Step};

/// Compiles one grouped attention (4 heads of width 8 over 2 KV heads) with
/// `pattern`, runs `total` positions as a prefill of `prefill` rows and then
/// one-row decode steps, and compares every row with the interpreter.
fn check(pattern: &str, kv: KvCacheType, total: usize, prefill: usize, tol: f32) -> ExecutionPlan {
    let src = format!(
        "graph @gqa {{\n  %q = input : f32[seq, 32]\n  %k = input : f32[seq, 16]\n  %v = input : f32[seq, 16]\n  \
         %y = attention %q, %k, %v {{heads = 4, kv_heads = 2}} {pattern}\n  return %y\n}}\n"
    );
    let graph = parse_graph(&src).unwrap();
    // Targets that include CUDA keep f32 caches: f16 ones are checked on the CPU alone.
    let target = if kv == KvCacheType::F16 { TargetKind::Cpu } else { TargetKind::All };
    let (_tmp, art) = build(graph.clone(), CompileOptions { target, kv_cache: kv, ..Default::default() });
    let inputs = [values(total, 32, 1), values(total, 16, 2), values(total, 16, 3)];
    let want = interpret(&graph, &inputs, &|_| None).unwrap().remove(0);
    let exec = CpuExecutor::load(&art).unwrap();
    let mut session = exec.session(&art).unwrap();
    let rows = |lo: usize, hi: usize| -> Vec<ArrayD<f32>> {
        inputs.iter().map(|a| a.slice_axis(Axis(0), Slice::from(lo..hi)).to_owned()).collect()
    };
    let mut parts = vec![session.run(&rows(0, prefill)).unwrap().remove(0)];
    for t in prefill..total {
        parts.push(session.run(&rows(t, t + 1)).unwrap().remove(0));
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let got = ndarray::concatenate(Axis(0), &views).unwrap();
    let c = compare(&got, &want, Tolerance { atol: tol, rtol: tol });
    println!("{pattern:?} {kv:?}: {total} positions, max abs error {:.2e}", c.max_abs_error);
    assert!(c.passed, "{pattern}: max abs error {} at {}", c.max_abs_error, c.worst_index);
    assert!(session.cache_bytes() > 0);
    art.manifest.execution.clone()
}

#[test]
fn full_attention_decode_splits_and_combines() {
    // Decode rows see 601..1100 keys: each splits into ATTN_SPLITS spans.
    let plan = check("", KvCacheType::F32, 1100, 600, 1e-4);
    let step = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::Kernel(k) => Some(k),
            _ => None,
        })
        .unwrap();
    assert!(step.cpu_first_phase.is_some(), "the grouped kernel runs in two phases");
    // Rows below SPLIT_MIN_KEYS keys (256) run unsplit, later ones split.
    check("", KvCacheType::F16, 700, 200, 1e-3);
}

#[test]
fn windows_with_sinks_read_ring_caches() {
    for (pattern, rows) in [
        ("#window(sliding, size = 64, sinks = 4)", 4 + 64 + 256),
        ("#window(sliding, size = 100, sinks = 0)", 100 + 256),
        ("#window(sliding, size = 700, sinks = 2)", 2 + 700 + 256),
    ] {
        // A 600-row prefill runs in chunks of 256; decode wraps the ring.
        let plan = check(pattern, KvCacheType::F32, 1400, 600, 1e-4);
        let caches: Vec<_> = plan.buffers.iter().filter_map(|b| b.ring).collect();
        assert_eq!(caches.len(), 2, "{pattern}: K and V are rings");
        assert!(caches.iter().all(|r| r.capacity() == rows), "{pattern}: {caches:?}");
    }
    check("#window(sliding, size = 64, sinks = 4)", KvCacheType::F16, 900, 300, 1e-3);
}

#[test]
fn a_ring_session_goes_back_only_its_slack() {
    let src = "graph @w {\n  %q = input : f32[seq, 16]\n  %k = input : f32[seq, 16]\n  %v = input : f32[seq, 16]\n  \
               %y = attention %q, %k, %v {heads = 2, kv_heads = 2} #window(sliding, size = 8, sinks = 1)\n  return %y\n}\n";
    let (_tmp, art) = build(parse_graph(src).unwrap(), CompileOptions { target: TargetKind::Cpu, ..Default::default() });
    let exec = CpuExecutor::load(&art).unwrap();
    let mut session = exec.session(&art).unwrap();
    let inputs = [values(600, 16, 1), values(600, 16, 2), values(600, 16, 3)];
    session.run(&inputs).unwrap();
    assert!(session.truncate(500).is_ok());
    let e = session.truncate(100).unwrap_err().to_string();
    assert!(e.contains("ring cache"), "{e}");
    // Ring rows: 1 sink + 8 + 256 slack, each 16 values of 2 bytes (f16), K and V.
    assert_eq!(session.cache_bytes(), 2 * (1 + 8 + 256) * 16 * 2);
}
