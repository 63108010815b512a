//! `sparsec tradeoff` end to end on a small graph: every point is compiled and
//! run or skipped with its reason, the reports are written, the Pareto front is
//! marked, and a rerun resumes from results.jsonl instead of measuring again.

use std::process::Command;

const GRAPH: &str = r#"graph @tiny_mlp {
  %x = input : f32[seq, 32]
  %wu = weight "layers.0.mlp.up" init normal(seed = 1, std = 0.1) : f32[48, 32]
  %wd = weight "layers.0.mlp.down" init normal(seed = 2, std = 0.1) : f32[32, 48]
  %h = matmul %x, %wu {transpose_b = true}
  %y = matmul %h, %wd {transpose_b = true}
  return %y
}
"#;

fn tradeoff(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let g = dir.join("g.sir");
    std::fs::write(&g, GRAPH).unwrap();
    let out = dir.join("out");
    let mut args = vec!["tradeoff", g.to_str().unwrap(), "--out", out.to_str().unwrap(), "--prompt-len", "8"];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_sparsec")).args(&args).output().unwrap()
}

#[test]
fn tradeoff_measures_every_point_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--sparsity", "0.5,0.9", "--pattern", "unstructured,2:4", "--levels", "dense,generic,full", "--max-compile-s", "0.3"];
    let o = tradeoff(tmp.path(), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("out");
    let points: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tradeoff.json")).unwrap()).unwrap();
    let points = points.as_array().unwrap();
    // baseline + unstructured (2 sparsities x 3 levels) + 2:4 (3 levels)
    assert_eq!(points.len(), 1 + 6 + 3);
    let status = |k: &str| points.iter().find(|p| p["key"] == k).unwrap()["status"].as_str().unwrap().to_string();
    assert_eq!(status("unstructured-0.90-generic"), "ok");
    // 0.3 s of budget is too little for the baked 2:4 matrices (1536 values, ~0.8 s estimated)
    assert!(status("2_4-0.50-full").starts_with("skipped: estimated compile"), "{}", status("2_4-0.50-full"));
    assert_eq!(status("unstructured-0.90-full"), "ok", "308 values at 90% (~0.2 s) fit the budget");
    let ok: Vec<&serde_json::Value> = points.iter().filter(|p| p["status"] == "ok").collect();
    assert!(ok.iter().all(|p| p["compile_s"].as_f64().unwrap() > 0.0 && p["decode_ms"].as_f64().unwrap() > 0.0));
    assert!(ok.iter().any(|p| p["pareto"] == true));
    let baked = points.iter().find(|p| p["key"] == "unstructured-0.90-full").unwrap();
    let generic = points.iter().find(|p| p["key"] == "unstructured-0.90-generic").unwrap();
    assert!(baked["llvm_ir_bytes"].as_u64() > generic["llvm_ir_bytes"].as_u64(), "baked code is larger");
    for f in ["tradeoff.csv", "tradeoff.md", "tradeoff.svg", "results.jsonl"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let svg = std::fs::read_to_string(out.join("tradeoff.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("compile s"));
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 10);
    // A rerun resumes: nothing is measured again, nothing appended.
    let o = tradeoff(tmp.path(), &args);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).trim().is_empty(), "remeasured: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().count(), 10);
    let o = tradeoff(tmp.path(), &["--pattern", "diagonal"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown pattern `diagonal`"));
}
