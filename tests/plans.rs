//! Plans end to end: a plan applied to a checkpoint compiles (CPU and PTX,
//! every specialization level,
//! ptxas-checked) to what the reference interpreter computes on the same
//! pruned weights, through a KV-cached session; bad plans are clear errors.

use crate::common;

use ndarray::{ArrayD, IxDyn};
use sparsec_models::checkpoint::Model;
use sparsec_passes::{PassManager, Plan};
use std::path::{Path, PathBuf};
use std::process::Command;

const PLAN: &str = r#"
[[rule]]
layers = "0"
target = "mlp.*"
sparsity = { kind = "nm", n = 2, m = 4 }
specialize = "generic"

[[rule]]
layers = "0"
target = "attn.q,attn.k"
sparsity = { kind = "unstructured", ratio = 0.6 }
specialize = "generic"

[[rule]]
layers = "1.."
target = "attn.*,mlp.*"
sparsity = { kind = "block", ratio = 0.5, block = [4, 4] }
specialize = "generic"

[[rule]]
layers = "1"
target = "attn.v"
specialize = "dense"

[[rule]]
layers = "1"
target = "attn.o"
specialize = "indices"

[[rule]]
layers = "1"
target = "mlp.up"
specialize = "full"

[[rule]]
layers = "1"
attention = { window = { size = 3, sinks = 1 } }

[[rule]]
target = "lm_head"
sparsity = { kind = "unstructured", ratio = 0.5 }
specialize = "generic"
"#;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn sparsec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sparsec")).args(args).output().unwrap()
}

fn check_planned(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let dir = fixture(name);
    let out = tmp.path().join("m.sparsec");
    // Without ptxas (outside CI) the PTX is still generated, only not checked.
    let ptxas = common::require(
        &format!("{} to check the PTX", common::PTXAS),
        sparsec_compiler::toolchain::find_ptxas().ok_or(common::PTXAS_NOT_FOUND),
    );
    let mut args = vec![
        "compile",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--no-cache",
        "--target",
        "all",
    ];
    if ptxas.is_some() {
        args.push("--ptxas");
    }
    let o = sparsec(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let art = sparsec_runtime::Artifact::open(&out).unwrap();
    let formats: Vec<&str> = art.manifest.execution.buffers.iter().filter_map(|b| b.sparse.as_ref().map(|s| s.format.name())).collect();
    // Layer 0: 2 (GPT-2) or 3 (Llama) N:M MLP matrices, q and k as CSR; layer 1: BSR except v (dense).
    // q, k (layer 0) and the LM head, a pruned copy of the tied embedding.
    assert_eq!(formats.iter().filter(|f| **f == "csr").count(), 3, "{formats:?}");
    let bufs = &art.manifest.execution.buffers;
    assert!(bufs.iter().any(|b| b.name == "embed.pruned" && b.sparse.is_some()), "the LM head is pruned");
    assert!(bufs.iter().any(|b| b.name == "embed" && b.sparse.is_none()), "the embedding table is not");
    assert!(formats.contains(&"nm") && formats.contains(&"bsr"), "{formats:?}");
    for level in ["dense", "generic", "indices", "full"] {
        assert!(
            art.manifest.kernels.iter().any(|k| k.specialization.as_deref().is_some_and(|s| s.starts_with(level))),
            "no {level} kernel"
        );
    }

    // The reference: the same plan on the checkpoint's graph, on the interpreter.
    let mut model = Model::load(dir.to_str().unwrap()).unwrap();
    PassManager::with_plan(Some(Plan::parse(PLAN).unwrap()), Default::default()).run(&mut model.graph).unwrap();
    let ids: Vec<f32> = (0..9).map(|i| ((i * 37 + 5) % 96) as f32).collect();
    let arr = |s: &[f32]| ArrayD::from_shape_vec(IxDyn(&[s.len()]), s.to_vec()).unwrap();
    let want = sparsec_runtime::interpreter::interpret(&model.graph, &[arr(&ids)], &|r| model.weight(r).ok()).unwrap().remove(0);
    let exec = sparsec_runtime::cpu::CpuExecutor::load(&art).unwrap();
    let mut session = exec.session(&art).unwrap();
    let mut rows: Vec<f32> = session.run(&[arr(&ids[..4])]).unwrap()[0].iter().copied().collect();
    for t in 4..ids.len() {
        rows.extend(session.run(&[arr(&ids[t..t + 1])]).unwrap()[0].iter());
    }
    assert_eq!(rows.len(), want.len());
    let err = rows.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("{name} with a plan (N:M, CSR, BSR, dense, window): compiled KV-cached decode vs the interpreter: max abs error {err:.3e}");
    assert!(err < 1e-4, "{name}: {err}");
    // Pruning changed the model: the unplanned logits differ.
    let plain = Model::load(dir.to_str().unwrap()).unwrap();
    let dense = sparsec_runtime::interpreter::interpret(&plain.graph, &[arr(&ids)], &|r| plain.weight(r).ok()).unwrap().remove(0);
    assert!(dense.iter().zip(want.iter()).any(|(a, b)| (a - b).abs() > 1e-3), "the plan changed nothing");
}

#[test]
fn planned_llama_compiles_to_the_interpreters_logits() {
    check_planned("llama_tiny");
}

#[test]
fn planned_gpt2_compiles_to_the_interpreters_logits() {
    check_planned("gpt2_tiny");
}

#[test]
fn bad_plans_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("llama_tiny");
    let cases = [
        (
            "[[rule]]\nlayers = \"5\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }",
            "plan rule 1: layer 5 does not exist (the model has 2 layers)",
        ),
        (
            "[[rule]]\ntarget = \"mlp.up\"\nsparsity = { kind = \"nm\", n = 2, m = 5 }",
            "N:M groups of 5 do not divide `layers.0.mlp.up`'s reduction dimension 32",
        ),
        (
            "[[rule]]\ntarget = \"mlp.down\"\nsparsity = { kind = \"block\", ratio = 0.5, block = [3, 4] }",
            "block 3x4 does not divide `layers.0.mlp.down`",
        ),
        ("[[rule]]\ntarget = \"mlp.sideways\"\nspecialize = \"generic\"", "target `mlp.sideways` selects no matmul"),
        ("[[rule]]\nsparsity = { kind = \"unstructured\", ratio = 1.5 }", "plan rule 1: sparsity ratio 1.5 is outside [0, 1)"),
        ("[[rule]]\nsparsity = { kind = \"nm\", n = 3, m = 2 }", "N:M sparsity needs 0 < n <= m"),
        ("[[rule]]\nsparsity = { kind = \"nm\", n = 2, m = 4, values = \"q3\" }", "values = \"q3\" is not one of f32, q8, q4"),
        (
            "[[rule]]\ntarget = \"mlp.up\"\nsparsity = { kind = \"nm\", n = 2, m = 4, values = \"q4\" }\nspecialize = \"indices\"",
            "#specialize(indices) is not implemented for quantized sparse values (nm_q4)",
        ),
        ("[[rule]]\ntarget = \"attn.q\"\nshare = { group = 1, ratio = 0.2 }", "plan rule 1: share group = 1 shares nothing"),
    ];
    for (text, want) in cases {
        let plan = tmp.path().join("bad.toml");
        std::fs::write(&plan, text).unwrap();
        let o = sparsec(&[
            "compile",
            dir.to_str().unwrap(),
            "-o",
            tmp.path().join("x").to_str().unwrap(),
            "--no-cache",
            "--plan",
            plan.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{text}\n--- got:\n{err}");
        assert!(!tmp.path().join("x").exists(), "a failed compile left an artifact");
    }
    let o = sparsec(&["compile", dir.to_str().unwrap(), "--preset", "nope"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown preset `nope`"));
}

/// Kept values stored quantized through a plan (`values = "q4" | "q8"` inside
/// `sparsity`, combined with `method`): every format compiles (f32 activations:
/// the generic kernels dequantize each value) to what the interpreter computes
/// on the same materialized weights, through a KV-cached session.
#[test]
fn quantized_values_plan_compiles_to_the_interpreters_logits() {
    const QPLAN: &str = r#"
[[rule]]
target = "mlp.*"
sparsity = { kind = "nm", n = 2, m = 4, values = "q4", method = "magnitude" }
specialize = "generic"

[[rule]]
target = "attn.q,attn.k,attn.v"
sparsity = { kind = "unstructured", ratio = 0.5, values = "q8" }

[[rule]]
layers = "1"
target = "attn.o"
sparsity = { kind = "block", ratio = 0.5, block = [4, 4], values = "q4" }
"#;
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("plan.toml");
    std::fs::write(&plan, QPLAN).unwrap();
    let dir = fixture("llama_tiny");
    let out = tmp.path().join("m.sparsec");
    let args = ["compile", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "--no-cache"];
    let o = sparsec(&[&args[..], &["--quant-activations", "f32"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let art = sparsec_runtime::Artifact::open(&out).unwrap();
    let formats: Vec<&str> = art.manifest.execution.buffers.iter().filter_map(|b| b.sparse.as_ref().map(|s| s.format.name())).collect();
    for f in ["nm_q4", "csr_q8", "bsr_q4"] {
        assert!(formats.contains(&f), "no {f} in {formats:?}");
    }
    assert!(!formats.iter().any(|f| ["nm", "csr", "bsr"].contains(f)), "{formats:?}");

    let mut model = Model::load(dir.to_str().unwrap()).unwrap();
    PassManager::with_plan(Some(Plan::parse(QPLAN).unwrap()), Default::default()).run(&mut model.graph).unwrap();
    let ids: Vec<f32> = (0..9).map(|i| ((i * 37 + 5) % 96) as f32).collect();
    let arr = |s: &[f32]| ArrayD::from_shape_vec(IxDyn(&[s.len()]), s.to_vec()).unwrap();
    let want = sparsec_runtime::interpreter::interpret(&model.graph, &[arr(&ids)], &|r| model.weight(r).ok()).unwrap().remove(0);
    let exec = sparsec_runtime::cpu::CpuExecutor::load(&art).unwrap();
    let mut session = exec.session(&art).unwrap();
    let mut rows: Vec<f32> = session.run(&[arr(&ids[..4])]).unwrap()[0].iter().copied().collect();
    for t in 4..ids.len() {
        rows.extend(session.run(&[arr(&ids[t..t + 1])]).unwrap()[0].iter());
    }
    let err = rows.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("llama_tiny with quantized sparse values: compiled KV-cached decode vs the interpreter: max abs error {err:.3e}");
    assert!(err < 1e-4, "{err}");
    // The quantization is part of the reference: the same plan with f32 values differs.
    let mut f32_model = Model::load(dir.to_str().unwrap()).unwrap();
    let f32_plan = QPLAN.replace(", values = \"q4\"", "").replace(", values = \"q8\"", "");
    PassManager::with_plan(Some(Plan::parse(&f32_plan).unwrap()), Default::default()).run(&mut f32_model.graph).unwrap();
    let unq = sparsec_runtime::interpreter::interpret(&f32_model.graph, &[arr(&ids)], &|r| f32_model.weight(r).ok()).unwrap().remove(0);
    assert!(unq.iter().zip(want.iter()).any(|(a, b)| (a - b).abs() > 1e-4), "quantizing the kept values changed nothing");
}
