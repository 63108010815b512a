//! Low-rank factoring and basis sharing through the command line (`low_rank`,
//! `share` in a plan), on the tiny Llama fixture (hidden 32, MLP 64, 2 layers):
//! the compiled model equals the interpreter with the same plan (perplexity
//! within 1e-4 relative, as for calibrated pruning, and every logit within
//! 1e-4 + 1e-4·|ref| of the interpreter on the artifact, `run --check`); a full-rank factorization
//! reproduces the weight (1e-4 of its largest entry); the whitened fit has a
//! lower output error than plain SVD on the calibration activations (their
//! Gram matrices, read from the statistics cache); a shared basis is one weight
//! node and one buffer, the manifest counts the parameters, and bad plans are
//! refused with errors that name the rule.

use crate::word_model;

use ndarray::ArrayD;
use sparsec_ir::{Op, Pattern};
use sparsec_runtime::Artifact;
use std::path::{Path, PathBuf};
use word_model::{eval, model, sparsec, words};

/// A plan whose one rule selects `target` and says `factor`, calibrated on `text`.
fn plan(dir: &Path, name: &str, target: &str, factor: &str, text: &Path) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!("[calibration]\ntext = \"{}\"\ntokens = 240\n\n[[rule]]\ntarget = \"{target}\"\n{factor}\n", text.display()),
    )
    .unwrap();
    p
}

/// Compiles the fixture with `plan` into `out`; returns stderr.
fn compile(dir: &Path, plan: &Path, out: &Path, cache: &Path) -> String {
    let o = sparsec(&["compile", dir.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "-o", out.to_str().unwrap()], cache);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// `[rows, cols]` of a 2-d array as f64.
fn mat(a: &ArrayD<f32>) -> (usize, usize, Vec<f64>) {
    let s = a.shape();
    (s[0], s[1], a.iter().map(|v| *v as f64).collect())
}

/// `out · in` (`[n, r]·[r, k]`): the weight `[n, k]` the factors stand for.
fn product(out: &ArrayD<f32>, inp: &ArrayD<f32>) -> (usize, usize, Vec<f64>) {
    let (n, r, o) = mat(out);
    let (r2, k, i) = mat(inp);
    assert_eq!(r, r2);
    let mut w = vec![0.0; n * k];
    for a in 0..n {
        for c in 0..r {
            for b in 0..k {
                w[a * k + b] += o[a * r + c] * i[c * k + b];
            }
        }
    }
    (n, k, w)
}

/// The checkpoint's weight `name` (`[n, k]`).
fn checkpoint_weight(dir: &Path, name: &str) -> (usize, usize, Vec<f64>) {
    let m = sparsec_models::checkpoint::Model::load(dir.to_str().unwrap()).unwrap();
    mat(&m.weight(name).unwrap())
}

#[test]
fn compiled_equals_the_interpreter_for_svd_whitened_and_shared_factors() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, words(300)).unwrap();
    let text = m.path().join("eval.txt");
    std::fs::write(&text, (0..60).map(|i| format!("w{}", (i * 7) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let cases = [
        ("svd", "low_rank = { ratio = 0.3, method = \"svd\" }", "(svd; 0 shared bases)"),
        ("whitened", "low_rank = { ratio = 0.3, method = \"whitened\" }", "(whitened; 0 shared bases)"),
        ("share", "share = { group = 2, ratio = 0.3 }", "(whitened; 7 shared bases)"),
    ];
    let (dense, _) = eval(dir, &[], &text, &cache);
    for (name, factor, says) in cases {
        let p = plan(m.path(), name, "attn.*,mlp.*", factor, &calib);
        let p = p.to_str().unwrap();
        let (interp, err) = eval(dir, &["--plan", p], &text, &cache);
        assert!(err.contains(&format!("factored 14 weights {says}")), "{name}: {err}");
        let (compiled, err) = eval(dir, &["--plan", p, "--compiled"], &text, &cache);
        assert!(err.contains("factored 14 weights"), "{name}: {err}");
        let rel = (interp - compiled).abs() / interp;
        assert!(rel < 1e-4, "{name}: interpreter {interp}, compiled {compiled}");
        // The random fixture predicts near uniformly (perplexity ~96 of 96 ids),
        // so perplexity moves little; it must move.
        assert!(interp != dense, "{name}: the factored model computes what the dense one does ({dense})");
        // Elementwise: the artifact's logits against the interpreter on its graph and weights.
        let out = m.path().join(format!("{name}.sparsec"));
        compile(m.path(), Path::new(p), &out, &cache);
        let o = sparsec(&["run", out.to_str().unwrap(), "--check", "--seq", "7"], &cache);
        let said = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && said.contains("reference interpreter: MATCH"), "{name}: {said}");
    }
}

#[test]
fn full_rank_factors_reproduce_the_weight() {
    let m = model("llama_tiny");
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, words(300)).unwrap();
    // mlp.up is [64, 32]: rank 32 is full; mlp.down [32, 64] likewise.
    for method in ["svd", "whitened"] {
        let p = plan(m.path(), method, "mlp.up,mlp.down", &format!("low_rank = {{ rank = 32, method = \"{method}\" }}"), &calib);
        let out = m.path().join(format!("{method}.sparsec"));
        compile(m.path(), &p, &out, &cache);
        let art = Artifact::open(&out).unwrap();
        for w in ["layers.0.mlp.up", "layers.1.mlp.down"] {
            let (n, k, want) = checkpoint_weight(m.path(), w);
            let got = product(&art.weight_array(&format!("{w}.lr_out")).unwrap(), &art.weight_array(&format!("{w}.lr_in")).unwrap());
            assert_eq!((got.0, got.1), (n, k), "{method} {w}");
            let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let worst = want.iter().zip(&got.2).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst <= 1e-4 * scale, "{method} {w}: off by {worst} (largest entry {scale})");
        }
    }
}

/// `tr((W − F)·G·(W − F)ᵀ)`: the summed squared output error of `F` for
/// weight `W` (`[n, k]`) over inputs with Gram `G` (`[k, k]`).
fn output_error(w: &[f64], f: &[f64], n: usize, k: usize, g: &[f64]) -> f64 {
    let mut e = 0.0;
    for a in 0..n {
        let d: Vec<f64> = (0..k).map(|b| w[a * k + b] - f[a * k + b]).collect();
        for i in 0..k {
            for j in 0..k {
                e += d[i] * g[i * k + j] * d[j];
            }
        }
    }
    e
}

#[test]
fn whitened_factors_have_a_lower_output_error_than_plain_svd_on_the_calibration_data() {
    let m = model("llama_tiny");
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, (0..300).map(|i| format!("w{}", (i * 13 + i / 7) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let mut arts = Vec::new();
    for method in ["svd", "whitened"] {
        let p = plan(m.path(), method, "attn.*,mlp.*", &format!("low_rank = {{ rank = 6, method = \"{method}\" }}"), &calib);
        let out = m.path().join(format!("{method}.sparsec"));
        compile(m.path(), &p, &out, &cache);
        arts.push(Artifact::open(&out).unwrap());
    }
    // The statistics the whitened compile collected: the one file in the cache.
    let files: Vec<PathBuf> = std::fs::read_dir(cache.join("calibration")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let grams = sparsec_runtime::calibrate::load(&files[0]).unwrap().unwrap();
    let mut checked = 0;
    for l in 0..2 {
        for role in ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"] {
            let w = format!("layers.{l}.{role}");
            let (n, k, want) = checkpoint_weight(m.path(), &w);
            let g = grams.get(&w).unwrap_or_else(|| panic!("no Gram for {w}"));
            assert_eq!(g.k, k);
            let err: Vec<f64> = arts
                .iter()
                .map(|a| {
                    let f = product(&a.weight_array(&format!("{w}.lr_out")).unwrap(), &a.weight_array(&format!("{w}.lr_in")).unwrap());
                    output_error(&want, &f.2, n, k, &g.xtx)
                })
                .collect();
            assert!(err[1] < err[0], "{w}: whitened output error {} is not below svd's {}", err[1], err[0]);
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}

#[test]
fn a_shared_basis_is_one_weight_node_and_one_buffer() {
    let m = model("llama_tiny");
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, words(300)).unwrap();
    let p = plan(m.path(), "share", "mlp.up", "share = { group = 2, ratio = 0.2 }", &calib);
    let out = m.path().join("share.sparsec");
    let err = compile(m.path(), &p, &out, &cache);
    // Two [64, 32] weights (4096 parameters) share a rank r basis: 32r + 2·64r <= 0.8·4096 gives r = 20.
    assert!(err.contains("factored 2 weights (whitened; 1 shared bases)") && err.contains("4096 -> 3200 (21.9% fewer)"), "{err}");
    let art = Artifact::open(&out).unwrap();
    let bases: Vec<usize> = (0..art.graph.nodes.len())
        .filter(|&i| matches!(&art.graph.nodes[i].op, Op::Weight { name, .. } if name == "basis.mlp.up.0-1"))
        .collect();
    assert_eq!(bases.len(), 1, "one basis node");
    let users = art.graph.nodes.iter().filter(|n| matches!(n.op, Op::MatMul { .. }) && n.operands[1].0 == bases[0]).count();
    assert_eq!(users, 2, "both layers multiply by it");
    assert!(art.graph.nodes.iter().all(|n| !n.patterns.iter().any(|p| matches!(p, Pattern::LowRank(_)))));
    assert_eq!(art.weight_array("basis.mlp.up.0-1").unwrap().shape(), &[20, 32]);
    assert_eq!(art.weight_array("layers.1.mlp.up.lr_out").unwrap().shape(), &[64, 20]);
    assert!(art.weight_array("layers.0.mlp.up.lr_in").is_err(), "no private input factor");
    assert!(art.weight_array("layers.0.mlp.up").is_err(), "the factored weight is gone");
    // The manifest counts the whole model's weight parameters before and after.
    let params = art.manifest.params.expect("parameter counts");
    assert_eq!(params.before - params.after, 4096 - 3200);
}

#[test]
fn the_model_holds_new_named_weights_and_refuses_checkpoint_names() {
    let m = model("llama_tiny");
    let mut model = sparsec_models::checkpoint::Model::load(m.path().to_str().unwrap()).unwrap();
    let a = std::sync::Arc::new(ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3]), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap());
    model.add_weight("layers.0.mlp.up.lr_in", a.clone()).unwrap();
    assert_eq!(*model.weight("layers.0.mlp.up.lr_in").unwrap(), *a);
    assert_eq!(model.role_shape("layers.0.mlp.up.lr_in"), Some(&[2usize, 3][..]));
    assert_eq!(model.stored_dtype("layers.0.mlp.up.lr_in"), sparsec_ir::DType::F32);
    let e = model.add_weight("layers.0.mlp.up", a).unwrap_err().to_string();
    assert!(e.contains("`layers.0.mlp.up` is a checkpoint tensor"), "{e}");
}

#[test]
fn bad_factor_plans_are_refused_naming_the_rule() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let text = m.path().join("t.txt");
    std::fs::write(&text, words(40)).unwrap();
    let cases = [
        ("[[rule]]\ntarget = \"mlp.up\"\nlow_rank = { rank = 40 }", "plan rule 1: rank 40 exceeds min(64, 32) of `layers.0.mlp.up`"),
        ("[[rule]]\ntarget = \"mlp.up\"\nlow_rank = { ratio = 1.5 }", "plan rule 1: low_rank ratio 1.5 is outside (0, 1)"),
        (
            "[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"unstructured\", ratio = 0.5 }\n\n[[rule]]\ntarget = \"mlp.up\"\nshare = { group = 2, ratio = 0.2, method = \"svd\" }",
            "plan rule 2: `layers.0.mlp.up` is pruned by an earlier rule; share and sparsity on one weight are not combined",
        ),
        (
            "[[rule]]\ntarget = \"mlp.up\"\nlow_rank = { ratio = 0.2, method = \"svd\" }\n\n[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"unstructured\", ratio = 0.5 }",
            "plan rule 2: `layers.0.mlp.up` is factored by an earlier rule",
        ),
        ("[[rule]]\ntarget = \"mlp.sideways\"\nlow_rank = { ratio = 0.2, method = \"svd\" }", "plan rule 1: target `mlp.sideways` selects no matmul"),
    ];
    for (plan, want) in cases {
        let p = m.path().join("bad.toml");
        std::fs::write(&p, plan).unwrap();
        let o = sparsec(&["eval", dir, "--plan", p.to_str().unwrap(), "--text", text.to_str().unwrap()], &cache);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{plan}\n{err}");
    }
    // An IR file has no checkpoint to fit factors from.
    let sir = m.path().join("g.sir");
    std::fs::write(&sir, "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"layers.0.mlp.up\" init normal(seed = 1, std = 0.3) : f32[8, 8]\n  %y = matmul %x, %w\n  return %y\n}\n").unwrap();
    let p = m.path().join("svd.toml");
    std::fs::write(&p, "[[rule]]\ntarget = \"mlp.up\"\nlow_rank = { rank = 2, method = \"svd\" }").unwrap();
    let o = sparsec(
        &["compile", sir.to_str().unwrap(), "--plan", p.to_str().unwrap(), "-o", m.path().join("g.sparsec").to_str().unwrap()],
        &cache,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("fit their factors from a model's weights"), "{err}");
    assert!(!m.path().join("g.sparsec").exists());
}
