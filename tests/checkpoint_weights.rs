//! `sparsec compile MODEL --strip-weights` and `sparsec-run ARTIFACT --weights
//! CHECKPOINT` on the tiny HF fixtures: an artifact compiled without the
//! checkpoint's tensors, given a checkpoint at load, computes exactly what the
//! artifact compiled from that checkpoint computes (f32 and f16 weights, and
//! SmolLM2's Q4_1/Q8_0 GGUF tensors kept as stored; 2:4 with 4-bit values, 50%
//! unstructured, 4×4 blocks with 8-bit values),
//! also for a checkpoint other than the one it was compiled from. Missing,
//! superfluous, mismatched and underivable weights are refused clearly.

use crate::common;
use crate::word_model;

use safetensors::SafeTensors;
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::{Artifact, Trust};
use std::path::Path;
use word_model::{model, sparsec};

fn ok(args: &[&str], cache: &Path) {
    let o = sparsec(args, cache);
    assert!(o.status.success(), "sparsec {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

fn fails(args: &[&str], cache: &Path, want: &str) {
    let o = sparsec(args, cache);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "sparsec {} succeeded", args.join(" "));
    assert!(err.contains(want), "sparsec {}: {err}", args.join(" "));
}

/// The logits of `art` (its weights from `checkpoint` when given) for seeded ids.
fn logits(art: &Path, checkpoint: Option<&Path>) -> Vec<f32> {
    let a = Artifact::open_checkpoint(art, Trust::Verify, checkpoint).unwrap_or_else(|e| panic!("{}: {e}", art.display()));
    let inputs = a.random_inputs(6, 3).unwrap();
    let exec = CpuExecutor::load(&a).unwrap();
    exec.run(&a, &inputs).unwrap()[0].iter().copied().collect()
}

/// A copy of the fixture directory `from` whose every float tensor is scaled
/// by 1.25 and shifted by 0.01: the same shapes, other weights.
fn other_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let bytes = std::fs::read(from.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v: Vec<u8> =
                t.data().chunks_exact(4).flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 1.25 + 0.01).to_le_bytes()).collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, v)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), v).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &to.join("model.safetensors")).unwrap();
}

const PLAN: &str =
    "[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"nm\", n = 2, m = 4, values = \"q4\" }\nspecialize = \"generic\"\n\n\
[[rule]]\ntarget = \"attn.q,attn.k\"\nsparsity = { kind = \"unstructured\", ratio = 0.5 }\nspecialize = \"generic\"\n\n\
[[rule]]\ntarget = \"attn.o\"\nsparsity = { kind = \"block\", ratio = 0.5, block = [4, 4], values = \"q8\" }\nspecialize = \"generic\"\n";

fn round_trip(fixture: &str) {
    let m = model(fixture);
    let dir = m.path();
    let cache = dir.join("cache");
    let other = dir.join("other");
    other_checkpoint(dir, &other);
    let plan = dir.join("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let (d, o, p) = (dir.to_str().unwrap(), other.to_str().unwrap(), plan.to_str().unwrap());
    // bf16 weights are AMX tiles on a host with AMX (packed as tiles at load too).
    // q8_0 / q4_1: the f32 checkpoint quantized when the weights are packed
    // (at compile time, or at load for the stripped artifact).
    let cases: [(&str, Vec<&str>); 7] = [
        ("f32", vec![]),
        ("f16", vec!["--weights-dtype", "f16"]),
        ("bf16", vec!["--weights-dtype", "bf16"]),
        ("q8_0", vec!["--weights-dtype", "q8_0"]),
        ("q4_1", vec!["--weights-dtype", "q4_1"]),
        ("sparse", vec!["--plan", p]),
        ("sparse-f16", vec!["--plan", p, "--weights-dtype", "f16"]),
    ];
    for (tag, flags) in cases {
        let art = |name: &str, src: &str, strip: bool| {
            let out = dir.join(format!("{tag}-{name}"));
            let mut args = vec!["compile", src, "-o", out.to_str().unwrap()];
            args.extend(&flags);
            if strip {
                args.push("--strip-weights");
            }
            ok(&args, &cache);
            out
        };
        let (full, stripped, full_other) = (art("full", d, false), art("stripped", d, true), art("other", o, false));
        // The stripped artifact lists every checkpoint weight and stores none of them.
        let a = Artifact::open_checkpoint(&stripped, Trust::Verify, Some(dir)).unwrap();
        assert!(!a.manifest.checkpoint_weights.is_empty(), "{tag}");
        if tag.starts_with('q') {
            let typed = a.manifest.execution.buffers.iter().filter(|b| b.dtype.name() == tag).count();
            assert!(typed >= 4, "{tag}: {typed} buffers of that type");
        }
        let small = std::fs::metadata(stripped.join("weights.safetensors")).unwrap().len();
        let big = std::fs::metadata(full.join("weights.safetensors")).unwrap().len();
        assert!(small * 10 < big, "{tag}: stripped weights file {small} B, full {big} B");
        // Given a checkpoint at load, it computes what the artifact compiled from it computes, bit for bit.
        assert_eq!(logits(&stripped, Some(dir)), logits(&full, None), "{fixture} {tag}: its own checkpoint");
        let (mine, theirs) = (logits(&stripped, Some(&other)), logits(&full_other, None));
        assert_eq!(mine, theirs, "{fixture} {tag}: another checkpoint");
        assert_ne!(mine, logits(&full, None), "{fixture} {tag}: the other checkpoint changed nothing");
        // Without a checkpoint it is refused; a full artifact refuses one.
        let e = Artifact::open_checkpoint(&stripped, Trust::Verify, None).err().unwrap().to_string();
        assert!(e.contains("--strip-weights") && e.contains("--weights CHECKPOINT"), "{e}");
        let e = Artifact::open_checkpoint(&full, Trust::Verify, Some(dir)).err().unwrap().to_string();
        assert!(e.contains("holds its weights"), "{e}");
    }
}

#[test]
fn llama_weights_come_from_the_checkpoint_at_load() {
    round_trip("llama_tiny");
}

#[test]
fn gpt2_weights_come_from_the_checkpoint_at_load() {
    // GPT-2 checkpoints store Conv1D weights transposed and q, k, v fused: the
    // runtime cuts them as the compiler's reader does.
    round_trip("gpt2_tiny");
}

#[test]
fn mismatched_and_underivable_weights_are_refused() {
    let m = model("llama_tiny");
    let dir = m.path();
    let cache = dir.join("cache");
    let d = dir.to_str().unwrap();
    let stripped = dir.join("stripped");
    ok(&["compile", d, "-o", stripped.to_str().unwrap(), "--strip-weights"], &cache);
    // A checkpoint of another architecture: its roles do not fit.
    let gpt2 = model("gpt2_tiny");
    let e = Artifact::open_checkpoint(&stripped, Trust::Verify, Some(gpt2.path())).err().unwrap().to_string();
    assert!(e.contains("layers.0.") || e.contains("embed"), "{e}");
    // A checkpoint whose shapes differ: the Llama fixture with a wider MLP.
    let wide = dir.join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(cfg["intermediate_size"].as_u64().unwrap() * 2);
    std::fs::write(wide.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(dir.join("model.safetensors"), wide.join("model.safetensors")).unwrap();
    let e = Artifact::open_checkpoint(&stripped, Trust::Verify, Some(&wide)).err().unwrap().to_string();
    assert!(e.contains("shape"), "{e}");
    // Weights the compile derives from the checkpoint, and kernels that bake
    // a weight into code, cannot be stripped.
    let low_rank = dir.join("lr.toml");
    std::fs::write(&low_rank, "[[rule]]\ntarget = \"mlp.up\"\nlow_rank = { ratio = 0.5, method = \"svd\" }\n").unwrap();
    fails(
        &["compile", d, "--plan", low_rank.to_str().unwrap(), "--strip-weights", "-o", dir.join("x").to_str().unwrap()],
        &cache,
        "derived from the checkpoint",
    );
    let baked = dir.join("baked.toml");
    std::fs::write(&baked, "[[rule]]\ntarget = \"mlp.up\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }\nspecialize = \"indices\"\n")
        .unwrap();
    fails(&["compile", d, "--plan", baked.to_str().unwrap(), "--strip-weights", "-o", dir.join("y").to_str().unwrap()], &cache, "bakes");
    // Stripping needs a checkpoint to strip.
    let sir = dir.join("g.sir");
    std::fs::write(&sir, "graph @g {\n  %x = input : f32[seq, 4]\n  %w = weight \"w\" init normal(seed = 1, std = 0.1) : f32[4, 4]\n  %y = matmul %x, %w\n  return %y\n}\n").unwrap();
    fails(&["compile", sir.to_str().unwrap(), "--strip-weights", "-o", dir.join("z").to_str().unwrap()], &cache, "compile a MODEL");
}

#[test]
fn smollm2_quantized_weights_come_from_the_gguf_at_load() {
    let Some(path) = common::require(common::SMOLLM2, sparsec_models::checkpoint::smollm2_path()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let (full, stripped) = (tmp.path().join("full"), tmp.path().join("stripped"));
    let p = path.to_str().unwrap();
    ok(&["compile", p, "-o", full.to_str().unwrap()], &cache);
    ok(&["compile", p, "-o", stripped.to_str().unwrap(), "--strip-weights"], &cache);
    let a = Artifact::open_checkpoint(&stripped, Trust::Verify, Some(&path)).unwrap();
    // Every Q4_1/Q8_0 matrix and table is the checkpoint's (nothing is derived).
    assert_eq!(
        a.manifest.checkpoint_weights.len(),
        a.manifest.execution.buffers.iter().filter(|b| b.kind == sparsec_runtime::manifest::BufferKind::Weight).count()
    );
    assert_eq!(logits(&stripped, Some(&path)), logits(&full, None));
}
