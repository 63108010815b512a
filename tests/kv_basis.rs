//! Feature-axis K/V bases (`kv = { transform = "dct" | "pswf" | "pca", keep }`)
//! on the tiny Llama fixture: a full basis (keep 1) changes nothing, so its
//! logits equal the dense model's; a half basis halves the KV cache rows,
//! and the compiled session equals the interpreter on the same graph through
//! chunked prefill and decode. Keys cached before RoPE (`rope = "before"`)
//! keep the logits at full rank and equal the interpreter at half rank.

use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::cuda_session::SessionCapacity;
use sparsec_runtime::execute::{DeviceKind, Executor};
use sparsec_runtime::lm_session::{compare_steps, Reference};
use sparsec_runtime::manifest::BufferKind;
use sparsec_runtime::Artifact;
use std::path::{Path, PathBuf};

/// `tests/fixtures/hf/llama_tiny` compiled (CPU) with `plan` (none: dense).
fn compile(dir: &Path, name: &str, plan: Option<&str>) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama_tiny");
    let out = dir.join(format!("{name}.sparsec"));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"));
    cmd.args(["compile", src.to_str().unwrap(), "--target", "cpu", "--no-cache", "-o", out.to_str().unwrap()]);
    if let Some(p) = plan {
        let f = dir.join(format!("{name}.toml"));
        std::fs::write(&f, p).unwrap();
        cmd.args(["--plan", f.to_str().unwrap()]);
    }
    let st = cmd.output().unwrap();
    assert!(st.status.success(), "compile {name}: {}", String::from_utf8_lossy(&st.stderr));
    out
}

fn rule(kv: &str) -> String {
    format!("[[rule]]\nlayers = \"all\"\nkv = {{ {kv} }}\n\n[calibration]\ntext = \"{}\"\ntokens = 64\n", calibration_text().display())
}

/// The fixture has no tokenizer of its own; PCA's calibration text is
/// tokenized by it... so PCA runs on the models that have one (SmolLM2 in
/// the README's figures), and here DCT and PSWF.
fn calibration_text() -> PathBuf {
    PathBuf::from("/usr/share/common-licenses/GPL-2")
}

/// KV cache row widths of an artifact.
fn cache_widths(art: &Artifact) -> Vec<String> {
    art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).map(|b| format!("{:?}", b.dims.last())).collect()
}

#[test]
fn a_full_basis_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = Artifact::open(&compile(tmp.path(), "dense", None)).unwrap();
    let ids: Vec<f32> = (0..24).map(|i| (i * 7 % 96) as f32).collect();
    let input = [ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[24]), ids).unwrap()];
    let exec = Executor::load(&dense, DeviceKind::Cpu).unwrap();
    let want = exec.run(&dense, &input).unwrap().remove(0);
    for kv in ["transform = \"dct\", keep = 1.0", "transform = \"pswf\", keep = 1.0, bandwidth = 0.3"] {
        let art = Artifact::open(&compile(tmp.path(), "full", Some(&rule(kv)))).unwrap();
        assert_eq!(cache_widths(&art), cache_widths(&dense), "{kv}");
        let got = Executor::load(&art, DeviceKind::Cpu).unwrap().run(&art, &input).unwrap().remove(0);
        let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
        assert!(c.passed, "{kv}: logits differ from the dense model's by {}", c.max_abs_error);
    }
}

#[test]
fn a_half_basis_halves_the_cache_and_equals_the_interpreter() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = Artifact::open(&compile(tmp.path(), "dense", None)).unwrap();
    for kv in ["transform = \"dct\", keep = 0.5", "transform = \"pswf\", keep = 0.5"] {
        let art = Artifact::open(&compile(tmp.path(), "half", Some(&rule(kv)))).unwrap();
        // Head width 8 -> 4 per KV head: rows of 2·4 instead of 2·8.
        assert!(cache_widths(&dense).iter().all(|w| w == "Some(Fixed(16))"), "{:?}", cache_widths(&dense));
        assert!(cache_widths(&art).iter().all(|w| w == "Some(Fixed(8))"), "{kv}: {:?}", cache_widths(&art));
        let exec = Executor::load(&art, DeviceKind::Cpu).unwrap();
        let ids: Vec<u32> = (0..20).map(|i| (i * 5 % 96) as u32).collect();
        let mut s = exec.session(&art, SessionCapacity { positions: 40, seq: 4 }).unwrap();
        let steps = compare_steps(&mut s, &mut Reference::Interpreter(&art), &ids, 6, 12, Tolerance { atol: 1e-4, rtol: 1e-4 }).unwrap();
        assert_eq!(steps.len(), 4 + 12);
        for st in &steps {
            assert!(st.cmp.passed, "{kv}: pos {} differs by {}", st.pos, st.cmp.max_abs_error);
        }
    }
}

/// KV cache row widths of an artifact, K and V apart (`k_cache` / `v_cache`).
fn cache_widths_of(art: &Artifact, role: &str) -> Vec<String> {
    art.manifest
        .execution
        .buffers
        .iter()
        .filter(|b| b.kind == BufferKind::KvCache && b.name.ends_with(role))
        .map(|b| format!("{:?}", b.dims.last()))
        .collect()
}

#[test]
fn keys_before_rope_keep_the_logits_at_full_rank_and_equal_the_interpreter_at_half() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = Artifact::open(&compile(tmp.path(), "dense", None)).unwrap();
    let ids: Vec<f32> = (0..24).map(|i| (i * 7 % 96) as f32).collect();
    let input = [ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[24]), ids).unwrap()];
    let want = Executor::load(&dense, DeviceKind::Cpu).unwrap().run(&dense, &input).unwrap().remove(0);
    // A full basis before RoPE: every key is rebuilt exactly and rotated in
    // the kernel instead of the rope op.
    let full = Artifact::open(&compile(tmp.path(), "pre_full", Some(&rule("transform = \"dct\", keep = 1.0, rope = \"before\"")))).unwrap();
    let got = Executor::load(&full, DeviceKind::Cpu).unwrap().run(&full, &input).unwrap().remove(0);
    let c = compare(&got, &want, Tolerance { atol: 1e-4, rtol: 1e-4 });
    assert!(c.passed, "a full pre-RoPE basis changes the logits by {}", c.max_abs_error);
    for kv in ["transform = \"dct\", keep = 0.5, rope = \"before\"", "transform = \"pswf\", keep = 0.5, rope = \"before\", on = \"k\""] {
        let art = Artifact::open(&compile(tmp.path(), "pre_half", Some(&rule(kv)))).unwrap();
        // K: 2 KV heads of 4 coefficients; V keeps its head width 8.
        assert!(cache_widths_of(&art, "k_cache").iter().all(|w| w == "Some(Fixed(8))"), "{kv}: {:?}", cache_widths_of(&art, "k_cache"));
        assert!(cache_widths_of(&art, "v_cache").iter().all(|w| w == "Some(Fixed(16))"), "{kv}: {:?}", cache_widths_of(&art, "v_cache"));
        let exec = Executor::load(&art, DeviceKind::Cpu).unwrap();
        // 40 positions: decode crosses the key tile boundary at 32.
        let ids: Vec<u32> = (0..20).map(|i| (i * 5 % 96) as u32).collect();
        let mut s = exec.session(&art, SessionCapacity { positions: 48, seq: 4 }).unwrap();
        let steps = compare_steps(&mut s, &mut Reference::Interpreter(&art), &ids, 6, 20, Tolerance { atol: 1e-4, rtol: 1e-4 }).unwrap();
        assert_eq!(steps.len(), 4 + 20);
        for st in &steps {
            assert!(st.cmp.passed, "{kv}: pos {} differs by {}", st.pos, st.cmp.max_abs_error);
        }
    }
}

#[test]
fn feature_bases_refuse_what_they_do_not_do() {
    for (kv, why) in [
        ("transform = \"dct\", keep = 0.5, on = \"v\"", "K and V are compressed together"),
        ("transform = \"dct\", keep = 1.5", "outside (0, 1]"),
        ("transform = \"pswf\", bandwidth = 0.7", "outside (0, 0.5)"),
        ("transform = \"dct\", bandwidth = 0.2", "pswf parameter"),
        ("transform = \"wavelet\"", "expected dct, pswf, pca, smooth"),
        ("transform = \"pca\", rope = \"before\", on = \"k,v\"", "compresses K alone"),
        ("transform = \"pca\", rope = \"sideways\"", "expected before or after"),
        ("transform = \"dct\", rope = \"before\", fit = \"scores\"", "fits a PCA basis before RoPE"),
        ("transform = \"pca\", fit = \"scores\"", "fits a PCA basis before RoPE"),
        ("transform = \"pca\", rope = \"before\", fit = \"values\"", "expected keys or scores"),
        ("transform = \"smooth\", keep = 0.5", "takes alpha only"),
        ("transform = \"smooth\", alpha = 2.0", "outside (0, 1]"),
        ("transform = \"dct\", alpha = 0.5", "smooth parameter"),
    ] {
        let e = sparsec_passes::Plan::parse(&rule(kv)).unwrap_err().to_string();
        assert!(e.contains(why), "{kv}: {e}");
    }
    // The sequence axis (DCT and PSWF): tests/kv_sequence.rs; chunked SVD: tests/kv_chunked.rs.
}
