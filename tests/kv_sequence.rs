//! Sequence-axis DCT and PSWF caches (`#kv(dct | pswf, axis = sequence)`,
//! `kv = { transform = "dct" | "pswf", axis = "sequence", ... }`): the compiled
//! CPU session equals the reference interpreter through prefills split into
//! calls and decode across block boundaries, in both bases; low-pass blocks
//! really change what attention reads, and the two bases read different
//! rows; a block of keep 1 with no score change is exact; the cache takes a block's
//! low-pass rows instead of its rows; a session refuses to go back past its
//! exact rows; and the plan spelling reaches a model (the tiny Llama
//! fixture) whose logits equal the interpreter's step by step.

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

const LOW_PASS: &str = "#kv(dct, keep = 0.25, axis = sequence, block = 16, sinks = 4, recent = 32)";
/// The same cache in PSWF (the plan's default bandwidth at keep 1/4: 1/16).
const PSWF: &str = "#kv(pswf, keep = 0.25, axis = sequence, block = 16, bandwidth = 0.0625, sinks = 4, recent = 32)";

#[test]
fn low_pass_attention_equals_the_interpreter_through_calls_and_decode() {
    // Decode rows from 1165 on see more than 256 keys: the split kernel
    // spreads them over units and combines their partials.
    let total = 1200;
    let inputs = [values(total, 64, 1), values(total, 32, 2), values(total, 32, 3)];
    let exact = interpret(&graph(""), &inputs, &|_| None).unwrap().remove(0);
    let mut outs = Vec::new();
    for pattern in [LOW_PASS, PSWF] {
        let g = graph(pattern);
        let (_tmp, art) = build(g.clone(), CompileOptions { target: TargetKind::Cpu, ..Default::default() });
        let want = interpret(&g, &inputs, &|_| None).unwrap().remove(0);
        // 45 rows, then calls of 280 (split by the runtime at the ring's limit), then decode across block ends.
        let got = run_in_calls(&art, &inputs, &[45, 280, 280, 280, 280], total);
        let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
        assert!(c.passed, "{pattern}: max abs error {} at {}", c.max_abs_error, c.worst_index);
        // Low-pass blocks are what the later rows read: the exact attention differs there.
        let off = compare(&got, &exact, Tolerance { atol: 1e-2, rtol: 1e-2 });
        assert!(!off.passed, "{pattern}: equals exact attention (max error {})", off.max_abs_error);
        // Rows up to position 50 (4 sinks + 32 recent + 15) read no low-pass block: exact.
        let early = |x: &ndarray::ArrayD<f32>| x.slice(ndarray::s![..51, ..]).to_owned().into_dyn();
        assert!(compare(&early(&got), &early(&exact), Tolerance { atol: 1e-4, rtol: 1e-4 }).passed, "{pattern}");
        outs.push(got);
    }
    // The bases keep different rows of a block.
    let bases = compare(&outs[0], &outs[1], Tolerance { atol: 1e-3, rtol: 1e-3 });
    assert!(!bases.passed, "DCT and PSWF read the same (max difference {})", bases.max_abs_error);
}

#[test]
fn keep_one_reads_every_position_back_to_f16_rounding() {
    let total = 120;
    let inputs = [values(total, 64, 4), values(total, 32, 5), values(total, 32, 6)];
    let exact = interpret(&graph(""), &inputs, &|_| None).unwrap().remove(0);
    for kv in ["dct", "pswf, bandwidth = 0.25"] {
        let g = graph(&format!("#kv({kv}, keep = 1.0, axis = sequence, block = 8, sinks = 0, recent = 8)"));
        let (_tmp, art) = build(g, CompileOptions { target: TargetKind::Cpu, ..Default::default() });
        let got = run_in_calls(&art, &inputs, &[50], total);
        let c = compare(&got, &exact, Tolerance { atol: 3e-3, rtol: 3e-3 });
        assert!(c.passed, "{kv}: a full-length basis and its inverse change attention by {}", c.max_abs_error);
    }
}

#[test]
fn the_cache_holds_low_pass_rows_per_block_and_a_ring_of_exact_rows() {
    let (_tmp, art) = build(graph(LOW_PASS), CompileOptions { target: TargetKind::Cpu, ..Default::default() });
    for b in art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache) {
        let s = b.sequence.expect("a sequence layout");
        assert_eq!(s.basis, sparsec_ir::kv_sequence::SeqBasis::Dct);
        // Ring: 32 recent + 16 + 256 call rows, in whole blocks of 16.
        assert_eq!((s.block, s.rows, s.sinks, s.recent, s.ring), (16, 4, 4, 32, 304));
        // 1000 positions: 4 sinks, 62 complete blocks of 4 low-pass f16 rows of 32 channels.
        assert_eq!(b.bytes(1000), (4 + 304) * 32 * 4 + 62 * 4 * 32 * 2);
        // A quarter of the f16 rows' bytes per position.
        assert_eq!(b.position_bytes(), 16);
    }
    let exec = sparsec_runtime::cpu::CpuExecutor::load(&art).unwrap();
    let n = 400;
    let inputs = [values(n, 64, 1), values(n, 32, 2), values(n, 32, 3)];
    let mut s = exec.session(&art).unwrap();
    s.run(&inputs).unwrap();
    s.truncate(150).unwrap();
    let mut s = exec.session(&art).unwrap();
    s.run(&inputs).unwrap();
    let e = s.truncate(60).unwrap_err().to_string();
    assert!(e.contains("sequence-axis DCT cache keeps exact rows of the last 304 positions"), "{e}");
}

#[test]
fn a_plan_compresses_a_models_caches_and_its_logits_equal_the_interpreter() {
    let tmp = tempfile::tempdir().unwrap();
    let st = compile_tiny_with_rule(
        tmp.path(),
        "kv = { transform = \"dct\", axis = \"sequence\", keep = 0.5, block = 4, sinks = 2, recent = 4 }",
    );
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let art = Artifact::open(&tmp.path().join("a.sparsec")).unwrap();
    let caches: Vec<_> = art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).collect();
    assert!(!caches.is_empty() && caches.iter().all(|b| b.sequence.is_some_and(|s| s.block == 4 && s.rows == 2)));
    // 20 prompt ids in calls of 6, then 14 decode steps: blocks complete every 4 positions after 2 sinks.
    steps_equal_the_interpreter(&art);
    // PSWF, its bandwidth left to the default (keep/4), and given.
    for (extra, bandwidth) in [("", 0.125f32), (", bandwidth = 0.2", 0.2)] {
        let st = compile_tiny_with_rule(
            tmp.path(),
            &format!("kv = {{ transform = \"pswf\", axis = \"sequence\", keep = 0.5, block = 4, sinks = 2, recent = 4{extra} }}"),
        );
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let art = Artifact::open(&tmp.path().join("a.sparsec")).unwrap();
        let want = sparsec_ir::kv_sequence::SeqBasis::Pswf { bandwidth };
        assert!(art
            .manifest
            .execution
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::KvCache)
            .all(|b| b.sequence.is_some_and(|s| s.basis == want)));
        steps_equal_the_interpreter(&art);
        // `inspect` names the basis of each cache's layout.
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"))
            .args(["inspect", tmp.path().join("a.sparsec").to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.contains(&format!("2 low-pass rows (PSWF, bandwidth {bandwidth}")), "{text}");
    }
}

#[test]
fn plans_refuse_what_the_sequence_axis_does_not_take() {
    let tmp = tempfile::tempdir().unwrap();
    for (kv, why) in [
        (
            "kv = { transform = \"dct\", axis = \"sequence\", keep = 0.5, on = \"k\" }",
            "it takes transform, keep, block, sinks, recent and (pswf) bandwidth",
        ),
        ("kv = { transform = \"dct\", axis = \"sequence\", keep = 0.01, block = 16 }", "keeps no position"),
        ("kv = { transform = \"dct\", axis = \"sequence\", recent = 0 }", "recent must be positive"),
        ("kv = { transform = \"pca\", axis = \"sequence\" }", "on the sequence axis (expected dct or pswf)"),
        ("kv = { transform = \"dct\", axis = \"sequence\", bandwidth = 0.1 }", "bandwidth is a pswf parameter"),
        ("kv = { transform = \"pswf\", axis = \"sequence\", bandwidth = 0.5 }", "bandwidth = 0.5 is outside (0, 0.5)"),
        ("kv = { transform = \"dct\", keep = 0.5, block = 16 }", "belong to the sequence axis"),
        ("kv = { transform = \"dct\", axis = \"diagonal\" }", "expected feature or sequence"),
        (
            "kv = { transform = \"dct\", axis = \"sequence\" }\nattention = { window = { size = 16, sinks = 4 } }",
            "not combined with #window",
        ),
    ] {
        let st = compile_tiny_with_rule(tmp.path(), kv);
        let e = String::from_utf8_lossy(&st.stderr);
        assert!(!st.status.success() && e.contains(why), "{kv}: {e}");
    }
}
