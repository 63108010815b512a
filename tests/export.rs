//! `sparsec export` and `sparsity = { kind = "from-weights" }` on the tiny HF
//! fixtures: a model exported with a plan (2:4, 50% unstructured, 4×4 blocks)
//! loads through sparsec's own HF reader, its zeros are detected as the plan's
//! pattern, compiled with `from-weights` it computes the logits of the original
//! model compiled with the plan, the reference interpreter gives it the
//! perplexity of the original with the plan, and exporting the compiled
//! artifact writes the same tensors. Bad inputs are refused clearly.

use crate::word_model;

use sparsec_ir::Sparsity;
use sparsec_models::checkpoint::Model;
use std::path::{Path, PathBuf};
use word_model::{model, sparsec};

/// Runs sparsec and returns stdout and stderr, failing the test on an error.
fn ok(args: &[&str], cache: &Path) -> (String, String) {
    let o = sparsec(args, cache);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "sparsec {}: {err}", args.join(" "));
    (String::from_utf8_lossy(&o.stdout).into_owned(), err)
}

/// Runs sparsec expecting a failure whose stderr contains `want`.
fn fails(args: &[&str], cache: &Path, want: &str) {
    let o = sparsec(args, cache);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "sparsec {} succeeded", args.join(" "));
    assert!(err.contains(want), "sparsec {}: {err}", args.join(" "));
}

fn write_plan(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p
}

/// The graph's outputs on seeded random inputs (token ids for a model).
fn logits(artifact: &Path, cache: &Path) -> Vec<f32> {
    let (out, _) = ok(&["run", artifact.to_str().unwrap(), "--seq", "6", "--seed", "3", "--json"], cache);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    j["outputs"][0]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn perplexity(args: &[&str], cache: &Path) -> f64 {
    let (out, _) = ok(args, cache);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["perplexity"].as_f64().unwrap()
}

/// Every tensor of a safetensors file, by name.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (t.shape().to_vec(), t.data().to_vec()))).collect()
}

const FROM_WEIGHTS: &str = "[[rule]]\ntarget = \"attn.*,mlp.*\"\nsparsity = { kind = \"from-weights\" }\n";

/// Export with each plan, then check the round trip (see the file's doc).
fn round_trip(fixture: &str, fused_qkv: bool) {
    let m = model(fixture);
    let dir = m.path();
    let cache = dir.join("cache");
    let text = dir.join("eval.txt");
    std::fs::write(&text, (0..30).map(|i| format!("w{}", (i * 7) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let fw = write_plan(dir, "fw", FROM_WEIGHTS);
    let cases = [
        ("nm", "kind = \"nm\", n = 2, m = 4", "2:4"),
        ("u50", "kind = \"unstructured\", ratio = 0.5", "unstructured ratio 0.5000"),
        ("b44", "kind = \"block\", ratio = 0.5, block = [4, 4]", "block 4x4 ratio 0.5000"),
    ];
    for (tag, sparsity, shown) in cases {
        let plan = write_plan(dir, tag, &format!("[[rule]]\ntarget = \"attn.*,mlp.*\"\nsparsity = {{ {sparsity} }}\n"));
        let (p, fw) = (plan.to_str().unwrap(), fw.to_str().unwrap());
        let exported = dir.join(format!("export-{tag}"));
        let e = exported.to_str().unwrap();
        ok(&["export", dir.to_str().unwrap(), "--plan", p, "-o", e], &cache);

        // sparsec's own HF reader loads it; the config names the class.
        let loaded = Model::load(e).unwrap_or_else(|err| panic!("{tag}: {err}"));
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "float32");
        assert!(config["architectures"][0].as_str().unwrap().ends_with("ForCausalLM") || config["architectures"][0] == "GPT2LMHeadModel");
        assert!(exported.join("tokenizer.json").is_file());
        let names = tensors(&exported.join("model.safetensors"));
        assert_eq!(names.contains_key("transformer.h.0.attn.c_attn.weight"), fused_qkv, "{:?}", names.keys());

        // Detection finds the plan's pattern in every selected weight.
        let mut weight = |name: &str| loaded.weight(name).map(|a| a.iter().copied().collect()).map_err(|e| e.to_string());
        let r = sparsec_passes::resolve_from_weights(FROM_WEIGHTS, &loaded.graph, &mut weight).unwrap().unwrap();
        assert!(!r.found.is_empty());
        for f in &r.found {
            let want = sparsec_passes::Plan::parse(&std::fs::read_to_string(&plan).unwrap()).unwrap().rules[0].sparsity.clone();
            assert_eq!(f.found.sparsity, want, "{tag}: {}", f.weight);
            assert_eq!(f.found.stored + f.found.zeros, f.found.total, "{tag}: {} stores only its nonzeros", f.weight);
        }

        // Compiled with from-weights it computes the original compiled with the plan.
        let a0 = dir.join(format!("orig-{tag}.sparsec"));
        let a1 = dir.join(format!("fw-{tag}.sparsec"));
        ok(&["compile", dir.to_str().unwrap(), "--plan", p, "-o", a0.to_str().unwrap()], &cache);
        let (_, err) = ok(&["compile", e, "--plan", fw, "-o", a1.to_str().unwrap()], &cache);
        assert!(err.contains("from-weights: mlp.up") && err.contains(shown), "{tag}: {err}");
        let manifest = std::fs::read_to_string(a1.join("manifest.json")).unwrap();
        assert!(manifest.contains("from-weights (rule 1)"), "{tag}: the manifest's plan records what was found");
        let (l0, l1) = (logits(&a0, &cache), logits(&a1, &cache));
        assert_eq!(l0.len(), l1.len());
        // Tolerance 1e-5 absolute: the same weights through the same kernels (in practice bitwise equal).
        let worst = l0.iter().zip(&l1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{tag}: logits differ by {worst}");

        // The interpreter: the exported dense model is the original with the plan.
        let t = text.to_str().unwrap();
        let p0 = perplexity(&["eval", dir.to_str().unwrap(), "--plan", p, "--text", t, "--json"], &cache);
        let p1 = perplexity(&["eval", e, "--text", t, "--json"], &cache);
        assert!((p0 - p1).abs() <= 1e-9 * p0, "{tag}: perplexity {p0} with the plan, {p1} exported");

        // Exporting the artifact writes the same tensors.
        let from_art = dir.join(format!("export-art-{tag}"));
        ok(&["export", a0.to_str().unwrap(), "-o", from_art.to_str().unwrap()], &cache);
        assert_eq!(tensors(&from_art.join("model.safetensors")), names, "{tag}: artifact export differs from model+plan export");
    }
}

#[test]
fn llama_export_round_trips() {
    round_trip("llama_tiny", false);
}

#[test]
fn gpt2_export_round_trips() {
    round_trip("gpt2_tiny", true);
}

#[test]
fn a_pruned_tied_head_is_untied_for_llama_and_refused_for_gpt2() {
    let m = model("llama_tiny");
    let dir = m.path();
    let cache = dir.join("cache");
    let plan = write_plan(dir, "head", "[[rule]]\ntarget = \"lm_head,mlp.*\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }\n");
    let out = dir.join("untied");
    ok(&["export", dir.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "-o", out.to_str().unwrap()], &cache);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    let names = tensors(&out.join("model.safetensors"));
    assert!(names.contains_key("lm_head.weight") && names.contains_key("model.embed_tokens.weight"));
    let text = dir.join("eval.txt");
    std::fs::write(&text, word_model::words(30)).unwrap();
    let t = text.to_str().unwrap();
    let p0 = perplexity(&["eval", dir.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "--text", t, "--json"], &cache);
    let p1 = perplexity(&["eval", out.to_str().unwrap(), "--text", t, "--json"], &cache);
    assert!((p0 - p1).abs() <= 1e-9 * p0, "perplexity {p0} with the plan, {p1} exported");
    // The head's zeros are found too: 2:4 in the untied head.
    let loaded = Model::load(out.to_str().unwrap()).unwrap();
    let mut weight = |name: &str| loaded.weight(name).map(|a| a.iter().copied().collect()).map_err(|e| e.to_string());
    let r = sparsec_passes::resolve_from_weights(
        "[[rule]]\ntarget = \"lm_head\"\nsparsity = { kind = \"from-weights\" }\n",
        &loaded.graph,
        &mut weight,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.found[0].found.sparsity, Some(Sparsity::NM { n: 2, m: 4 }));

    let g = model("gpt2_tiny");
    let plan = write_plan(g.path(), "head", "[[rule]]\ntarget = \"lm_head\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }\n");
    let out = g.path().join("out");
    fails(
        &["export", g.path().to_str().unwrap(), "--plan", plan.to_str().unwrap(), "-o", out.to_str().unwrap()],
        &cache,
        "GPT-2's LM head",
    );
    assert!(!out.exists(), "nothing is left half-written");
}

#[test]
fn bad_exports_and_from_weights_plans_are_refused() {
    let m = model("llama_tiny");
    let dir = m.path();
    let d = dir.to_str().unwrap();
    let cache = dir.join("cache");
    let exists = dir.join("exists");
    std::fs::create_dir(&exists).unwrap();
    fails(&["export", d, "--preset", "2:4", "-o", exists.to_str().unwrap()], &cache, "already exists");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    fails(&["export", d, "--preset", "3:4", "-o", o], &cache, "unknown preset `3:4`");
    let bad = write_plan(dir, "bad", "[[rule]]\nsparsity = { kind = \"diagonal\" }\n");
    fails(&["export", d, "--plan", bad.to_str().unwrap(), "-o", o], &cache, "unknown variant `diagonal`");
    let window = write_plan(dir, "window", "[[rule]]\nattention = { window = 8 }\n");
    fails(&["export", d, "--plan", window.to_str().unwrap(), "-o", o], &cache, "#window");
    fails(&["export", dir.join("nothing").to_str().unwrap(), "-o", o], &cache, "nothing");
    assert!(!out.exists());
    // An artifact's plan is already applied.
    let art = dir.join("a.sparsec");
    ok(&["compile", d, "-o", art.to_str().unwrap()], &cache);
    fails(&["export", art.to_str().unwrap(), "--preset", "2:4", "-o", o], &cache, "already applied");
    // from-weights needs weights: an IR file with inits has none to read.
    let fw = write_plan(dir, "fw", FROM_WEIGHTS);
    let sir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mlp_block.sir");
    let fw_ir = write_plan(dir, "fw_ir", "[[rule]]\nsparsity = { kind = \"from-weights\" }\n");
    fails(
        &["compile", sir.to_str().unwrap(), "--plan", fw_ir.to_str().unwrap(), "-o", dir.join("ir.sparsec").to_str().unwrap()],
        &cache,
        "needs the weights",
    );
    // A dense checkpoint: every weight is found dense and stays so.
    let (_, err) = ok(&["compile", d, "--plan", fw.to_str().unwrap(), "-o", dir.join("dense.sparsec").to_str().unwrap()], &cache);
    assert!(err.contains("dense (no zeros)"), "{err}");
    // A from-weights rule that selects nothing names itself.
    let none = write_plan(dir, "none", "[[rule]]\nlayers = \"1\"\ntarget = \"attn.x\"\nsparsity = { kind = \"from-weights\" }\n");
    fails(&["compile", d, "--plan", none.to_str().unwrap(), "-o", dir.join("none.sparsec").to_str().unwrap()], &cache, "rule 1");
}

#[test]
fn quantized_kept_values_export_dequantized() {
    // `values = "q4"`: what the interpreter computes with (pruned, then each
    // block of kept values quantized and dequantized) is what is written.
    let m = model("llama_tiny");
    let dir = m.path();
    let cache = dir.join("cache");
    let plan = write_plan(dir, "q4", "[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"nm\", n = 2, m = 4, values = \"q4\" }\n");
    let out = dir.join("q4");
    ok(&["export", dir.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "-o", out.to_str().unwrap()], &cache);
    let text = dir.join("eval.txt");
    std::fs::write(&text, word_model::words(30)).unwrap();
    let t = text.to_str().unwrap();
    let p0 = perplexity(&["eval", dir.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "--text", t, "--json"], &cache);
    let p1 = perplexity(&["eval", out.to_str().unwrap(), "--text", t, "--json"], &cache);
    assert!((p0 - p1).abs() <= 1e-9 * p0, "perplexity {p0} with the plan, {p1} exported");
}
