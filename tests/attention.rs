//! Attention at long context through a KV-cached CPU session, against the
//! reference interpreter over the whole sequence: grouped KV heads read once
//! per group, decode split over positions and combined (flash-decoding), and
//! sliding windows with sinks on ring caches (a prefill longer than the ring's
//! slack runs in chunks; decode wraps the ring many times).

use crate::attention_support;

use attention_support::{build, run_in_calls, values};
use ndarray::{ArrayD, Axis};
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
    let got = run_in_calls(&art, &inputs, &[prefill], total);
    let c = compare(&got, &want, Tolerance { atol: tol, rtol: tol });
    println!("{pattern:?} {kv:?}: {total} positions, max abs error {:.2e}", c.max_abs_error);
    assert!(c.passed, "{pattern}: max abs error {} at {}", c.max_abs_error, c.worst_index);
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

/// Flash prefill pairs the block's (row, head) cells two at a time; with three
/// heads per KV head a pair spans two rows that see different numbers of a
/// tile's keys, and an odd block (the last one) ends on a lone cell. Both
/// against the interpreter, head width 16 (two vectors), a prefill of 200 + 133
/// rows in two calls (the second ends on 5 rows: 15 cells), then decode.
#[test]
fn flash_prefill_pairs_span_rows() {
    let src = "graph @g3 {\n  %q = input : f32[seq, 96]\n  %k = input : f32[seq, 32]\n  %v = input : f32[seq, 32]\n  \
               %y = attention %q, %k, %v {heads = 6, kv_heads = 2}\n  return %y\n}\n";
    let graph = parse_graph(src).unwrap();
    for kv in [KvCacheType::F32, KvCacheType::F16] {
        let (_tmp, art) = build(graph.clone(), CompileOptions { target: TargetKind::Cpu, kv_cache: kv, ..Default::default() });
        let total = 340;
        let inputs = [values(total, 96, 4), values(total, 32, 5), values(total, 32, 6)];
        let want = interpret(&graph, &inputs, &|_| None).unwrap().remove(0);
        let got = run_in_calls(&art, &inputs, &[200, 133], total);
        let tol = if kv == KvCacheType::F32 { 1e-4 } else { 1e-3 };
        let c = compare(&got, &want, Tolerance { atol: tol, rtol: tol });
        println!("{kv:?}: max abs error {:.2e}", c.max_abs_error);
        assert!(c.passed, "{kv:?}: max abs error {} at {}", c.max_abs_error, c.worst_index);
    }
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

/// The rows of `x` (`[rows, width]`) as a block-quantized cache holds them:
/// each row (its heads of `rotate` values Hadamard-rotated first, where given)
/// packed on its own, read back and rotated back.
fn round_trip_rows(x: &ArrayD<f32>, dt: sparsec_ir::DType, rotate: Option<usize>) -> ArrayD<f32> {
    use sparsec_ir::quant::hadamard;
    let width = x.shape()[1];
    let mut out = x.clone();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let mut v: Vec<f32> = row.iter().copied().collect();
        if let Some(d) = rotate {
            v.chunks_mut(d).for_each(|h| assert!(hadamard(h)));
        }
        let packed = sparsec_ir::quant::quantize(dt, &v).unwrap();
        let mut back = vec![0f32; width];
        assert!(sparsec_ir::quant::dequantize(dt, &packed, &mut back));
        if let Some(d) = rotate {
            back.chunks_mut(d).for_each(|h| assert!(hadamard(h)));
        }
        row.iter_mut().zip(back).for_each(|(a, b)| *a = b);
    }
    out
}

#[test]
fn block_quantized_caches_equal_attention_over_their_dequantized_rows() {
    // 4 heads of width 32 over 2 KV heads: each head is one block of 32 per row.
    let src = "graph @q {\n  %q = input : f32[seq, 128]\n  %k = input : f32[seq, 64]\n  %v = input : f32[seq, 64]\n  \
               %y = attention %q, %k, %v {heads = 4, kv_heads = 2}\n  return %y\n}\n";
    let graph = parse_graph(src).unwrap();
    let (total, prefill) = (700, 400);
    let inputs = [values(total, 128, 1), values(total, 64, 2), values(total, 64, 3)];
    for (kv, dt, bytes, kv_hadamard) in [
        (KvCacheType::Q8_0, sparsec_ir::DType::Q8_0, 64 + 4, false),
        (KvCacheType::Q4_0, sparsec_ir::DType::Q4_0, 32 + 4, false),
        (KvCacheType::Q4_1, sparsec_ir::DType::Q4_1, 32 + 8, false),
        (KvCacheType::Q4_1, sparsec_ir::DType::Q4_1, 32 + 8, true),
    ] {
        let (_tmp, art) = build(graph.clone(), CompileOptions { target: TargetKind::Cpu, kv_cache: kv, kv_hadamard, ..Default::default() });
        // What attention should see: the keys and values as the cache stores them
        // (each head of 32 rotated before packing, where asked, and back after).
        let rotate = kv_hadamard.then_some(32);
        let stored = [inputs[0].clone(), round_trip_rows(&inputs[1], dt, rotate), round_trip_rows(&inputs[2], dt, rotate)];
        let want = interpret(&graph, &stored, &|_| None).unwrap().remove(0);
        let got = run_in_calls(&art, &inputs, &[prefill], total);
        let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
        assert!(c.passed, "{kv:?} hadamard {kv_hadamard}: max abs error {} at {}", c.max_abs_error, c.worst_index);
        // Each position's K and V rows: 64 values in 2 blocks each.
        let caches: Vec<usize> = art
            .manifest
            .execution
            .buffers
            .iter()
            .filter(|b| b.kind == sparsec_runtime::manifest::BufferKind::KvCache)
            .map(|b| b.bytes(1))
            .collect();
        assert_eq!(caches, [bytes, bytes], "{kv:?}");
    }
}

/// K as a per-channel quantized cache holds it when `n` keys are present:
/// every complete group of 32 positions packed per channel and read back,
/// the rest exact.
fn channel_groups_as_held(k: &ArrayD<f32>, n: usize) -> ArrayD<f32> {
    use sparsec_ir::kv_channel::{dequantize_group, group_bytes, quantize_group, GROUP};
    let width = k.shape()[1];
    let mut out = k.slice(ndarray::s![..n, ..]).to_owned().into_dyn();
    let flat = out.as_slice_mut().unwrap();
    for g in 0..n / GROUP {
        let rows = &mut flat[g * GROUP * width..(g + 1) * GROUP * width];
        let mut packed = vec![0u8; group_bytes(width)];
        assert!(quantize_group(rows, width, &mut packed));
        rows.copy_from_slice(&dequantize_group(&packed, width).unwrap());
    }
    out
}

#[test]
fn kivi_keys_equal_attention_over_their_groups_as_held_at_each_call() {
    // 4 heads of width 32 over 2 KV heads: K is 64 channels, quantized per
    // channel once a group of 32 positions completes; V is q4_1 per token.
    let src = "graph @q {\n  %q = input : f32[seq, 128]\n  %k = input : f32[seq, 64]\n  %v = input : f32[seq, 64]\n  \
               %y = attention %q, %k, %v {heads = 4, kv_heads = 2}\n  return %y\n}\n";
    let graph = parse_graph(src).unwrap();
    let (total, prefill) = (460, 400);
    // Channel 3 of K is an outlier (x30).
    let mut k = values(total, 64, 2);
    k.axis_iter_mut(Axis(0)).for_each(|mut r| r[3] *= 30.0);
    let inputs = [values(total, 128, 1), k, values(total, 64, 3)];
    let opts = CompileOptions { target: TargetKind::Cpu, kv_cache: KvCacheType::Q4_1, kv_kivi: true, ..Default::default() };
    let (_tmp, art) = build(graph.clone(), opts);
    let got = run_in_calls(&art, &inputs, &[prefill], total);
    let v = round_trip_rows(&inputs[2], sparsec_ir::DType::Q4_1, None);
    // The prefill's rows see the groups complete after 400 keys; decode row p
    // those complete after p + 1.
    let upto = |x: &ArrayD<f32>, n: usize| x.slice(ndarray::s![..n, ..]).to_owned().into_dyn();
    let run = |n: usize| {
        let ins = [upto(&inputs[0], n), channel_groups_as_held(&inputs[1], n), upto(&v, n)];
        interpret(&graph, &ins, &|_| None).unwrap().remove(0)
    };
    let mut want = run(prefill);
    for p in prefill..total {
        let row = run(p + 1);
        want.append(Axis(0), row.slice(ndarray::s![p..p + 1, ..]).into_dyn().view()).unwrap();
    }
    let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
    assert!(c.passed, "max abs error {} at {}", c.max_abs_error, c.worst_index);
    // Per-token q4_1 keys would be far off with the outlier channel: the check can tell.
    let per_token = [inputs[0].clone(), round_trip_rows(&inputs[1], sparsec_ir::DType::Q4_1, None), v.clone()];
    let naive = interpret(&graph, &per_token, &|_| None).unwrap().remove(0);
    assert!(!compare(&got, &naive, Tolerance { atol: 1e-4, rtol: 1e-4 }).passed);
    // K: 32 exact f32 rows of 64, then 0.625 bytes per value.
    let k_cache = art.manifest.execution.buffers.iter().find(|b| b.name.ends_with("k_cache")).unwrap();
    assert_eq!(k_cache.bytes(64), 32 * 64 * 4 + 64 * 64 * 5 / 8);
    assert_eq!((k_cache.position_bytes(), k_cache.fixed_bytes()), (64 * 5 / 8, 32 * 64 * 4));
}
