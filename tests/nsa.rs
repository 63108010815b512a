//! Native sparse attention (`#nsa`) through a KV-cached CPU session, against
//! the reference interpreter (which ranks blocks from the keys themselves, in
//! f64) over the whole sequence: block summaries written as blocks fill
//! (across chunked prefill and one-row decode), the top blocks per KV group,
//! sinks and the window under one softmax, decode split and combined, and a
//! truncated session that fills its blocks again.

use crate::attention_support;

use attention_support::{build, run_in_calls, values};
use ndarray::{ArrayD, Axis, Slice};
use sparsec_compiler::{CompileOptions, KvCacheType, TargetKind};
use sparsec_ir::parse_graph;
use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::interpreter::interpret;
use sparsec_runtime::manifest::{BufferKind, Step};

/// A grouped attention (4 heads of width `d` over 2 KV heads) with `pattern`.
fn graph(pattern: &str, d: usize) -> sparsec_ir::Graph {
    gated_graph(pattern, d, "", "")
}

/// `graph` with more operands: their declarations and their names.
fn gated_graph(pattern: &str, d: usize, decls: &str, operands: &str) -> sparsec_ir::Graph {
    let (qw, kw) = (4 * d, 2 * d);
    let src = format!(
        "graph @nsa {{\n  %q = input : f32[seq, {qw}]\n  %k = input : f32[seq, {kw}]\n  %v = input : f32[seq, {kw}]\n{decls}  \
         %y = attention %q, %k, %v{operands} {{heads = 4, kv_heads = 2}} {pattern}\n  return %y\n}}\n"
    );
    parse_graph(&src).unwrap()
}

/// Runs `total` positions as calls of the given lengths (the rest one row at
/// a time) and compares every row with the interpreter over the whole sequence.
fn check(pattern: &str, d: usize, total: usize, calls: &[usize]) {
    check_graph(graph(pattern, d), pattern, d, total, calls, &[]);
}

/// `check` of any graph over q, k, v and `more` inputs.
fn check_graph(g: sparsec_ir::Graph, pattern: &str, d: usize, total: usize, calls: &[usize], more: &[ArrayD<f32>]) {
    check_caches(g, pattern, d, total, calls, more, KvCacheType::F32, 1e-4);
}

/// `check_graph` with caches of `kv` and a tolerance. Where the split kernel
/// reads them (head width a multiple of 8), the CPU keeps both caches per
/// block of the selection and KV head (`HeadBlocks`), and the rows equal the
/// interpreter's through that layout.
#[allow(clippy::too_many_arguments)]
fn check_caches(
    g: sparsec_ir::Graph,
    pattern: &str,
    d: usize,
    total: usize,
    calls: &[usize],
    more: &[ArrayD<f32>],
    kv: KvCacheType,
    tol: f32,
) {
    let (_tmp, art) = build(g.clone(), CompileOptions { target: TargetKind::All, kv_cache: kv, ..Default::default() });
    let caches: Vec<_> = art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).collect();
    assert_eq!(caches.len(), 2);
    let nsa =
        sparsec_ir::NativeSparse::of(&g.nodes.iter().find_map(|n| Some(n.patterns.clone()).filter(|p| !p.is_empty())).unwrap()).unwrap();
    for c in &caches {
        let want = d.is_multiple_of(8).then_some(sparsec_runtime::manifest::HeadBlocks { block: nsa.block, heads: 2 });
        assert_eq!(c.head_blocks, want, "{pattern} d={d}: the layout of `{}`", c.name);
    }
    let mut inputs = vec![values(total, 4 * d, 1), values(total, 2 * d, 2), values(total, 2 * d, 3)];
    inputs.extend(more.iter().cloned());
    let want = interpret(&g, &inputs, &|_| None).unwrap().remove(0);
    let got = run_in_calls(&art, &inputs, calls, total);
    let c = compare(&got, &want, Tolerance { atol: tol, rtol: tol });
    println!("{pattern} d={d}: {total} positions, max abs error {:.2e}", c.max_abs_error);
    assert!(c.passed, "{pattern} d={d}: max abs error {} at {:?}", c.max_abs_error, c.worst_index);

    // The plan: summary and selection steps before attention, a block cache of
    // a row per block, the selection read by attention.
    let plan = &art.manifest.execution;
    let kernels: Vec<&str> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Kernel(k) => Some(k.kernel.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(kernels.len(), 3, "{kernels:?}");
    assert!(kernels[0].ends_with("_nsa_summary") && kernels[1].ends_with("_nsa_select"), "{kernels:?}");
    // A summary row holds, per KV head, what the score reads (the mean, or
    // the minimum and maximum as f16 pairs: one f32 slab either way), then,
    // gated, the compressed key and value.
    let blocks = plan.buffers.iter().find(|b| matches!(b.kind, BufferKind::BlockCache { .. })).expect("a block cache");
    let slabs = 1 + if nsa.gated() { 2 } else { 0 };
    assert_eq!(blocks.dims.last(), Some(&sparsec_ir::Dim::Fixed(slabs * 2 * d as u64)), "{pattern}: the block cache's row");
}

#[test]
fn gated_branches_with_fixed_weights_equal_the_interpreter() {
    // Per head: compressed, selected and window weights (some negative, as a
    // least-squares fit may give). Mean-pooled compressed keys and values.
    for (pattern, d, total, calls) in [
        ("#nsa(block = 16, top_n = 3, window = 32, sinks = 4, score = mean, gate = fixed)", 8, 700, &[600][..]),
        // Decode rows of 4·16 + 200 keys split: each branch's partials combine apart.
        ("#nsa(block = 16, top_n = 4, window = 200, sinks = 0, gate = fixed)", 8, 600, &[300, 37][..]),
        // The scalar kernel (a head width of 6).
        ("#nsa(block = 32, top_n = 2, window = 64, sinks = 32, gate = fixed)", 6, 400, &[5, 150][..]),
    ] {
        let g = gated_graph(pattern, d, "  %g = weight \"g\" init uniform(seed = 5, bound = 1.0) : f32[12]\n", ", %g");
        check_graph(g, pattern, d, total, calls, &[]);
    }
}

#[test]
fn trained_gates_and_linear_compression_equal_the_interpreter() {
    // Sigmoid gates from per-row logits (a graph input here; the plan computes
    // them from the layer input) and a linear compression of K and V.
    for (block, window, d, calls) in [(16u32, 48u32, 8usize, &[600][..]), (8, 40, 8, &[3, 100][..]), (16, 40, 6, &[3, 100][..])] {
        let pattern = format!("#nsa(block = {block}, top_n = 3, window = {window}, sinks = 4, gate = sigmoid, compress = linear)");
        let words = sparsec_ir::NsaCompress::linear_words(block as u64, d as u64);
        let decls = format!("  %g = input : f32[seq, 12]\n  %c = weight \"c\" init normal(seed = 6, std = 0.2) : f32[4, {words}]\n");
        let g = gated_graph(&pattern, d, &decls, ", %g, %c");
        check_graph(g, &pattern, d, 650, calls, &[values(650, 12, 7)]);
    }
}

#[test]
fn gated_operands_that_do_not_fit_are_refused() {
    for (pattern, decls, operands, why) in [
        ("#nsa(block = 8, top_n = 2, window = 16, gate = fixed)", "", "", "takes 4 operands"),
        ("#nsa(block = 8, top_n = 2, window = 16, gate = fixed)", "  %g = weight \"g\" init zeros : f32[11]\n", ", %g", "f32[12] gate"),
        ("#nsa(block = 8, top_n = 2, window = 16, compress = linear)", "", "", "only a gated NSA"),
        ("#nsa(block = 8, top_n = 2, window = 16, gate = loud)", "", "", "unknown gate"),
    ] {
        let (qw, kw) = (32, 16);
        let src = format!(
            "graph @nsa {{\n  %q = input : f32[seq, {qw}]\n  %k = input : f32[seq, {kw}]\n  %v = input : f32[seq, {kw}]\n{decls}  \
             %y = attention %q, %k, %v{operands} {{heads = 4, kv_heads = 2}} {pattern}\n  return %y\n}}\n"
        );
        let e = parse_graph(&src).and_then(|g| sparsec_ir::verify(&g).map(|_| ())).unwrap_err().to_string();
        assert!(e.contains(why), "{pattern}: {e}");
    }
}

#[test]
fn selected_blocks_window_and_sinks_equal_the_interpreter() {
    // A prefill of 600 rows runs as chunks of 512 and 88: blocks the first
    // chunk filled are read from the cache, the second chunk's own from the
    // summaries it writes first; then 100 decode steps.
    check("#nsa(block = 16, top_n = 3, window = 32, sinks = 4, score = mean)", 8, 700, &[600]);
    // Decode rows see 4·16 + 200 keys: they split and combine.
    check("#nsa(block = 16, top_n = 4, window = 200, sinks = 0, score = bound)", 8, 600, &[300, 37]);
    // Sinks that fill the first block; a head width the vector kernel does not take.
    check("#nsa(block = 32, top_n = 2, window = 64, sinks = 32, score = bound)", 6, 400, &[5, 150]);
    // Blocks of 64 (the default): tiles of 32 keys that lie in one block of
    // the caches' per-block layout take their rows a stride apart from the
    // first key's; the window's tiles cross block boundaries (looked up key
    // by key), and decode rows split their keys at other offsets.
    check("#nsa(block = 64, top_n = 3, window = 100, sinks = 4, score = bound)", 8, 700, &[300, 130]);
    // f16 caches, kept per block and KV head like the f32 ones above: the
    // interpreter computes in f32 from unrounded keys (1e-2 covers f16's rounding).
    let pattern = "#nsa(block = 16, top_n = 3, window = 48, sinks = 4, score = bound)";
    check_caches(graph(pattern, 16), pattern, 16, 500, &[130, 3, 200], &[], KvCacheType::F16, 1e-2);
}

#[test]
fn a_truncated_session_fills_its_blocks_again() {
    let pattern = "#nsa(block = 8, top_n = 2, window = 16, sinks = 1)";
    let g = graph(pattern, 8);
    let (_tmp, art) = build(g.clone(), CompileOptions { target: TargetKind::Cpu, kv_cache: KvCacheType::F32, ..Default::default() });
    let exec = CpuExecutor::load(&art).unwrap();
    let mut session = exec.session(&art).unwrap();
    let a = [values(120, 32, 1), values(120, 16, 2), values(120, 16, 3)];
    let b = [values(120, 32, 4), values(120, 16, 5), values(120, 16, 6)];
    let rows = |x: &[ArrayD<f32>; 3], lo: usize, hi: usize| -> Vec<ArrayD<f32>> {
        x.iter().map(|a| a.slice_axis(Axis(0), Slice::from(lo..hi)).to_owned()).collect()
    };
    // Positions 0..60 from `a`, then back to 40 and on to 120 from `b`: the
    // blocks 40..60 filled with `a`'s keys are summarized again from `b`'s.
    session.run(&rows(&a, 0, 60)).unwrap();
    session.truncate(40).unwrap();
    let got = session.run(&rows(&b, 40, 120)).unwrap().remove(0);
    let mixed: Vec<ArrayD<f32>> = (0..3)
        .map(|i| {
            ndarray::concatenate(Axis(0), &[a[i].slice_axis(Axis(0), Slice::from(0..40)), b[i].slice_axis(Axis(0), Slice::from(40..120))])
                .unwrap()
        })
        .collect();
    let want = interpret(&g, &mixed, &|_| None).unwrap().remove(0);
    let want = want.slice_axis(Axis(0), Slice::from(40..120)).to_owned();
    let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
    assert!(c.passed, "max abs error {} at {:?}", c.max_abs_error, c.worst_index);
}

#[test]
fn nsa_and_a_window_on_one_op_are_refused() {
    let src = "graph @w {\n  %q = input : f32[seq, 16]\n  %k = input : f32[seq, 16]\n  %v = input : f32[seq, 16]\n  \
               %y = attention %q, %k, %v {heads = 2, kv_heads = 2} #nsa(block = 8, top_n = 2, window = 16) #window(sliding, size = 8)\n  return %y\n}\n";
    let e = sparsec_ir::verify(&parse_graph(src).unwrap()).unwrap_err().to_string();
    assert!(e.contains("own sliding window"), "{e}");
    let src = src.replace(" #window(sliding, size = 8)", "").replace("window = 16", "window = 16, score = max");
    let e = parse_graph(&src).unwrap_err().to_string();
    assert!(e.contains("unknown score"), "{e}");
}
