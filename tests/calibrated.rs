//! Calibrated pruning through the command line (`method = "wanda" |
//! "sparsegpt"` in a plan): the statistics come from the plan's calibration
//! text and are cached, the compiled model equals the interpreter with the same
//! plan, the pruned weights keep the pattern's exact counts and differ from
//! magnitude pruning, and a plan that cannot be calibrated is refused. (That
//! the methods reconstruct layer outputs better than magnitude pruning is
//! tested in `ir/src/sparse_calibrated.rs`; on the random tiny fixture every
//! variant's perplexity is that of a uniform guess, so quality is measured on
//! SmolLM2, README.)

use crate::word_model;

use sparsec_runtime::Artifact;
use std::path::Path;
use word_model::{eval, model, sparsec, words};

/// A plan pruning the attention and MLP matrices, calibrated on `text`.
fn plan(dir: &Path, name: &str, sparsity: &str, method: &str, text: &Path) -> std::path::PathBuf {
    plan_for(dir, name, "attn.*,mlp.*", sparsity, method, text)
}

/// A plan pruning the matrices `target` selects, calibrated on `text`.
fn plan_for(dir: &Path, name: &str, target: &str, sparsity: &str, method: &str, text: &Path) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[calibration]\ntext = \"{}\"\ntokens = 240\n\n[[rule]]\ntarget = \"{target}\"\nsparsity = {{ {sparsity}, method = \"{method}\" }}\n",
            text.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn calibrated_pruning_compiles_to_what_the_interpreter_computes() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, words(300)).unwrap();
    let text = m.path().join("eval.txt");
    std::fs::write(&text, (0..60).map(|i| format!("w{}", (i * 7) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    for (sparsity, tag) in [("kind = \"unstructured\", ratio = 0.5", "u50"), ("kind = \"nm\", n = 2, m = 4", "nm24")] {
        for method in ["wanda", "sparsegpt"] {
            let p = plan(m.path(), &format!("{method}-{tag}"), sparsity, method, &calib);
            let p = p.to_str().unwrap();
            let (interp, err) = eval(dir, &["--plan", p], &text, &cache);
            assert!(err.contains(&format!("calibrated on 240 tokens of {}", calib.display())), "{err}");
            let (compiled, _) = eval(dir, &["--plan", p, "--compiled"], &text, &cache);
            let rel = (interp - compiled).abs() / interp;
            assert!(rel < 1e-4, "{method} {tag}: interpreter {interp}, compiled {compiled}");
        }
    }
    // The statistics were collected once per model, text and weights, then reused.
    let p = plan(m.path(), "again", "kind = \"unstructured\", ratio = 0.5", "wanda", &calib);
    let (_, err) = eval(dir, &["--plan", p.to_str().unwrap()], &text, &cache);
    assert!(err.contains("statistics cached"), "{err}");
    // A plan calibrating other weights collects what it needs.
    let p = plan_for(m.path(), "mlp-only", "mlp.*", "kind = \"unstructured\", ratio = 0.5", "wanda", &calib);
    let (_, err) = eval(dir, &["--plan", p.to_str().unwrap()], &text, &cache);
    assert!(err.contains("statistics collected"), "{err}");
}

#[test]
fn calibrated_weights_keep_the_pattern_and_differ_from_magnitude() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, (0..300).map(|i| format!("w{}", (i * 13 + i / 7) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let compile = |method: &str| {
        let p = plan(m.path(), method, "kind = \"unstructured\", ratio = 0.5", method, &calib);
        let out = m.path().join(format!("{method}.sparsec"));
        let o = sparsec(&["compile", dir, "--plan", p.to_str().unwrap(), "-o", out.to_str().unwrap()], &cache);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (mag, sgpt) = (compile("magnitude"), compile("sparsegpt"));
    let weight = |art: &Path, name: &str| Artifact::open(art).unwrap().weight_array(name).unwrap();
    for name in ["layers.0.attn.q", "layers.1.mlp.down"] {
        let (a, b) = (weight(&mag, name), weight(&sgpt, name));
        let zeros = |x: &ndarray::ArrayD<f32>| x.iter().filter(|v| **v == 0.0).count();
        assert_eq!(zeros(&a), a.len() / 2, "{name}: magnitude keeps half");
        assert_eq!(zeros(&b), b.len() / 2, "{name}: sparsegpt keeps half");
        assert!(a != b, "{name}: sparsegpt gave magnitude's weights");
    }
}

#[test]
fn plans_that_cannot_be_calibrated_are_refused() {
    let m = model("llama_tiny");
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, words(300)).unwrap();
    // An IR file has no tokenizer to read a calibration text with.
    let sir = m.path().join("g.sir");
    std::fs::write(&sir, "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"layers.0.mlp.up\" init normal(seed = 1, std = 0.3) : f32[8, 8]\n  %y = matmul %x, %w\n  return %y\n}\n").unwrap();
    let p = plan(m.path(), "sgpt", "kind = \"unstructured\", ratio = 0.5", "sparsegpt", &calib);
    let o = sparsec(
        &["compile", sir.to_str().unwrap(), "--plan", p.to_str().unwrap(), "-o", m.path().join("g.sparsec").to_str().unwrap()],
        &cache,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("calibrated pruning methods need a model checkpoint"), "{err}");
    // More calibration tokens than the text has.
    let short = m.path().join("short.txt");
    std::fs::write(&short, words(20)).unwrap();
    let p = plan(m.path(), "short", "kind = \"unstructured\", ratio = 0.5", "wanda", &short);
    let o = sparsec(&["eval", m.path().to_str().unwrap(), "--plan", p.to_str().unwrap(), "--text", short.to_str().unwrap()], &cache);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the calibration text gives 20 tokens, the plan asks for 240"), "{err}");
    // An unknown method names the rule.
    std::fs::write(m.path().join("bad.toml"), "[[rule]]\nsparsity = { kind = \"unstructured\", ratio = 0.5, method = \"obs\" }\n").unwrap();
    let o = sparsec(
        &["eval", m.path().to_str().unwrap(), "--plan", m.path().join("bad.toml").to_str().unwrap(), "--text", short.to_str().unwrap()],
        &cache,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("method = \"obs\" is not one of magnitude, wanda, sparsegpt"), "{err}");
    // OWL: lambda in range, and not with sequential calibration.
    for (calibration, want) in [
        ("owl = { lambda = 0.7 }", "[calibration] owl lambda = 0.7 is not in (0, 0.5)"),
        ("sequential = true\nowl = {}", "[calibration] owl needs every layer's statistics before pruning: it cannot be sequential"),
    ] {
        let bad = m.path().join("bad-owl.toml");
        std::fs::write(
            &bad,
            format!(
                "[calibration]\n{calibration}\n\n[[rule]]\nsparsity = {{ kind = \"unstructured\", ratio = 0.5, method = \"wanda\" }}\n"
            ),
        )
        .unwrap();
        let o = sparsec(&["eval", m.path().to_str().unwrap(), "--plan", bad.to_str().unwrap(), "--text", short.to_str().unwrap()], &cache);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn sequential_calibration_measures_the_model_pruned_so_far() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, (0..300).map(|i| format!("w{}", (i * 11 + i / 5) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let compile = |name: &str, sequential: bool, cache: &Path| {
        let p = plan(m.path(), name, "kind = \"unstructured\", ratio = 0.5", "sparsegpt", &calib);
        if sequential {
            let text = std::fs::read_to_string(&p).unwrap().replace("[calibration]\n", "[calibration]\nsequential = true\n");
            std::fs::write(&p, text).unwrap();
        }
        let out = m.path().join(format!("{name}.sparsec"));
        let o = sparsec(&["compile", dir, "--plan", p.to_str().unwrap(), "-o", out.to_str().unwrap()], cache);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        (out, err)
    };
    let cache = m.path().join("cache");
    let (one_pass, _) = compile("one-pass", false, &cache);
    let (fresh, err) = compile("sequential", true, &cache);
    assert!(err.contains("sequentially (statistics collected"), "{err}");
    let (again, err) = compile("sequential-again", true, &cache);
    assert!(err.contains("sequentially (statistics cached"), "{err}");
    let weight = |art: &Path, name: &str| Artifact::open(art).unwrap().weight_array(name).unwrap();
    for name in ["layers.0.attn.q", "layers.0.mlp.up", "layers.1.attn.k", "layers.1.mlp.down"] {
        // Statistics read back from the cache prune exactly as fresh ones.
        assert_eq!(weight(&fresh, name), weight(&again, name), "{name}: cached and fresh sequential statistics differ");
    }
    // The first layer's attention input is the embedding either way; what
    // comes after it sees the pruned layers before it.
    assert_eq!(weight(&one_pass, "layers.0.attn.q"), weight(&fresh, "layers.0.attn.q"));
    for name in ["layers.0.mlp.up", "layers.1.attn.k", "layers.1.mlp.down"] {
        assert!(weight(&one_pass, name) != weight(&fresh, name), "{name}: sequential calibration measured the dense model");
    }
}

#[test]
fn owl_gives_layers_their_own_ratios_and_compiles_them() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, words(300)).unwrap();
    let text = m.path().join("eval.txt");
    std::fs::write(&text, (0..60).map(|i| format!("w{}", (i * 7) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let p = plan(m.path(), "owl", "kind = \"unstructured\", ratio = 0.5", "wanda", &calib);
    let body = std::fs::read_to_string(&p).unwrap().replace("[calibration]\n", "[calibration]\nowl = { lambda = 0.1, threshold = 2.0 }\n");
    std::fs::write(&p, body).unwrap();
    let p = p.to_str().unwrap();
    let (interp, err) = eval(dir, &["--plan", p], &text, &cache);
    assert!(err.contains("OWL ratios 0.400..0.600"), "{err}");
    let (compiled, _) = eval(dir, &["--plan", p, "--compiled"], &text, &cache);
    assert!((interp - compiled).abs() / interp < 1e-4, "interpreter {interp}, compiled {compiled}");
    // The artifact holds each layer's ratio, and as many zeros in all as the rule asks.
    let out = m.path().join("owl.sparsec");
    let o = sparsec(&["compile", dir, "--plan", p, "-o", out.to_str().unwrap()], &cache);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let art = Artifact::open(&out).unwrap();
    let zeros = |layer: u32| {
        ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
            .iter()
            .map(|r| {
                let w = art.weight_array(&format!("layers.{layer}.{r}")).unwrap();
                (w.iter().filter(|v| **v == 0.0).count(), w.len())
            })
            .fold((0, 0), |(z, n), (a, b)| (z + a, n + b))
    };
    let ((z0, n0), (z1, n1)) = (zeros(0), zeros(1));
    let (r0, r1) = (z0 as f64 / n0 as f64, z1 as f64 / n1 as f64);
    assert!((r0 - r1).abs() > 0.19, "layer ratios {r0} and {r1}");
    assert!(((z0 + z1) as f64 / (n0 + n1) as f64 - 0.5).abs() < 0.01, "{r0} {r1}");
}

#[test]
fn skipped_positions_are_left_out_of_the_statistics() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let calib = m.path().join("calib.txt");
    std::fs::write(&calib, (0..300).map(|i| format!("w{}", (i * 11 + i / 5) % 90)).collect::<Vec<_>>().join(" ")).unwrap();
    let compile = |name: &str, skip: usize| {
        let p = plan(m.path(), name, "kind = \"unstructured\", ratio = 0.5", "wanda", &calib);
        let text = std::fs::read_to_string(&p).unwrap().replace("[calibration]\n", &format!("[calibration]\nskip = {skip}\n"));
        std::fs::write(&p, text).unwrap();
        let cache = m.path().join(format!("cache-{name}"));
        let out = m.path().join(format!("{name}.sparsec"));
        let o = sparsec(&["compile", dir, "--plan", p.to_str().unwrap(), "-o", out.to_str().unwrap()], &cache);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let files: Vec<std::path::PathBuf> = std::fs::read_dir(cache.join("calibration")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        (out, sparsec_runtime::calibrate::load(&files[0]).unwrap().unwrap())
    };
    let (all, g0) = compile("all-rows", 0);
    let (skipped, g3) = compile("skip-3", 3);
    // 240 tokens cut into sequences of the fixture's context (60): 3 rows
    // fewer from each of the four in every Gram.
    for (name, g) in &g0 {
        assert_eq!(g.rows, 240, "{name}");
        assert_eq!(g3[name].rows, 240 - 4 * 3, "{name}");
        assert!(g3[name].xtx != g.xtx, "{name}: the skipped rows still count");
    }
    let weight = |art: &Path, name: &str| Artifact::open(art).unwrap().weight_array(name).unwrap();
    assert!(
        ["layers.0.attn.q", "layers.1.mlp.down"].iter().any(|w| weight(&all, w) != weight(&skipped, w)),
        "the statistics changed but the pruning did not"
    );
    // Refused: nothing left of a sequence, and a plan without calibrated rules.
    let p = plan(m.path(), "too-many", "kind = \"unstructured\", ratio = 0.5", "wanda", &calib);
    let text = std::fs::read_to_string(&p).unwrap().replace("[calibration]\n", "[calibration]\nskip = 512\n");
    std::fs::write(&p, text).unwrap();
    let o =
        sparsec(&["compile", dir, "--plan", p.to_str().unwrap(), "-o", m.path().join("x.sparsec").to_str().unwrap()], &m.path().join("c"));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("skip = 512 leaves nothing"));
    let p = plan(m.path(), "magnitude", "kind = \"unstructured\", ratio = 0.5", "magnitude", &calib);
    let text = std::fs::read_to_string(&p).unwrap().replace("[calibration]\n", "[calibration]\nskip = 1\n");
    std::fs::write(&p, text).unwrap();
    let o =
        sparsec(&["compile", dir, "--plan", p.to_str().unwrap(), "-o", m.path().join("y.sparsec").to_str().unwrap()], &m.path().join("c"));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("skip applies to calibrated pruning"));
}
