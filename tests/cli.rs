//! The `sparsec` command line as a user meets it: results, `--json`, and clear
//! errors (with locations) instead of panics.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

fn sparsec(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparsec")).args(args).env("SPARSEC_CACHE_DIR", cache).output().expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mlp_block.sir").display().to_string()
}

#[test]
fn compile_then_run_with_check_then_cache_hit() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("mlp.sparsec");
    let o = sparsec(&["compile", &example(), "-o", out.to_str().unwrap(), "--json"], &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["cache_hit"], false);
    assert_eq!(j["kernels"], 8);
    let o = sparsec(&["compile", &example(), "-o", out.to_str().unwrap(), "--json"], &cache);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["cache_hit"], true);

    let o = sparsec(&["run", out.to_str().unwrap(), "--check", "--seq", "3", "--json"], &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["check"]["passed"], true);
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([3, 64]));

    let o = sparsec(&["inspect", out.to_str().unwrap(), "--json"], &cache);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["version"], sparsec_runtime::manifest::MANIFEST_VERSION);
    assert_eq!(j["kernels"].as_array().unwrap().len(), 8);
}

#[test]
fn run_compiles_an_ir_file_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let o = sparsec(&["run", &example(), "--check", "--seq", "2"], &tmp.path().join("cache"));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("reference interpreter: MATCH"), "{text}");
}

#[test]
fn bad_ir_gives_located_errors_and_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("graph @g {\n  %x = input : f32[seq, 4]\n  %y = frob %x\n  return %y\n}\n", "bad.sir:3:8: unknown op `frob`"),
        ("graph @g {\n  %x = input : f32[seq, 4\n  return %x\n}\n", "bad.sir:3:3: expected `,`"),
        (
            "graph @g {\n  %x = input : f32[seq, 4]\n  %w = weight \"w\" init ones : f32[5, 2]\n  %y = matmul %x, %w\n  return %y\n}\n",
            "4:3: matmul %y: operand 1 has type f32[5, 2], expected f32[4, N]",
        ),
    ];
    for (src, needle) in cases {
        let p = tmp.path().join("bad.sir");
        std::fs::write(&p, src).unwrap();
        let o = sparsec(&["compile", p.to_str().unwrap(), "-o", tmp.path().join("o").to_str().unwrap()], &tmp.path().join("c"));
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(needle), "stderr {e:?} lacks {needle:?}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!tmp.path().join("o").exists());
    }
}

#[test]
fn unimplemented_work_says_so_instead_of_pretending() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tmp.path().join("c");
    // A feature-axis `#kv` written into IR (the plan's feature bases are a
    // pass that rewrites the weights, not a pattern a kernel reads).
    let ir = tmp.path().join("kv.sir");
    std::fs::write(
        &ir,
        "graph @g {\n  %x = input : f32[seq, 8]\n  %y = attention %x, %x, %x {heads = 2, kv_heads = 2} #kv(pswf, keep = 0.5, bandwidth = 0.1) : f32[seq, 8]\n  return %y\n}\n",
    )
    .unwrap();
    let o = sparsec(&["compile", ir.to_str().unwrap()], &c);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("#kv is not lowered yet"), "{}", stderr(&o));
    let o = sparsec(&["eval", &example(), "--text", "/usr/share/common-licenses/GPL-3"], &c);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is an IR file, not a model checkpoint"), "{}", stderr(&o));
    let gguf = tmp.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let o = sparsec(&["compile", gguf.to_str().unwrap()], &c);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("m.gguf") && stderr(&o).contains("truncated"), "{}", stderr(&o));
    let o = sparsec(&["run", &example(), "--prompt", "hi"], &c);
    assert_eq!(o.status.code(), Some(2));
    // A CUDA-only numeric mode on a CPU-only compile is refused, not ignored.
    let o = sparsec(&["compile", &example(), "--gpu-mma-activations", "half"], &c);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--gpu-mma-activations half changes only CUDA kernels"), "{}", stderr(&o));
}

#[test]
fn print_after_all_and_emit_show_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.sparsec");
    let o = sparsec(
        &[
            "compile",
            &example(),
            "-o",
            out.to_str().unwrap(),
            "--print-after-all",
            "--print-before",
            "dce",
            "--emit",
            "ir,mlir,llvm,ptx,asm",
            "--no-cache",
        ],
        &tmp.path().join("c"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    for label in ["IR after verify", "IR after shape-infer", "IR after const-fold", "IR before dce", "IR after dce"] {
        assert!(e.contains(label), "missing {label}");
    }
    for f in [
        "emit/graph.sir",
        "emit/cpu/k1_matmul.mlir",
        "emit/cpu/k1_matmul.llvm.mlir",
        "emit/cpu/k1_matmul.ll",
        "emit/cpu/k1_matmul.s",
        "emit/cuda/k1_matmul.ptx",
        "emit/cuda/k1_matmul.ll",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let o = sparsec(&["compile", &example(), "--print-after", "no-such-pass"], &tmp.path().join("c"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown pass `no-such-pass`"), "{}", stderr(&o));
}

/// `sparsec bench MODEL` compiles (cold, then from the cache) and reports every
/// figure the compiled-model issue asks for, and what setup it measured. Speed
/// itself is not asserted (benchmarks, not tests).
#[test]
fn bench_reports_compile_times_speeds_memory_code_and_setup() {
    if common::require(common::SMOLLM2, sparsec_models::checkpoint::smollm2_path()).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = sparsec(&["bench", "smollm2", "--prompt-len", "16", "--new-tokens", "4", "--threads", "2", "--json"], tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let positive = |k: &str| j[k].as_f64().is_some_and(|v| v > 0.0);
    for k in [
        "compile_cold_ms",
        "compile_cache_hit_ms",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_bytes",
        "cpu_code_bytes",
        "weights_bytes",
    ] {
        assert!(positive(k), "`{k}` missing or not positive in {j}");
    }
    assert!(j["compile_cache_hit_ms"].as_f64() < j["compile_cold_ms"].as_f64(), "a cache hit is faster than a cold compile: {j}");
    assert_eq!((j["prompt_tokens"].as_u64(), j["new_tokens"].as_u64(), j["threads"].as_u64()), (Some(16), Some(4), Some(2)));
    assert_eq!((j["kv_cache"].as_str(), j["weights_placement"].as_str()), (Some("f16"), Some("resident")));
    assert!(matches!(j["quant_activations"].as_str(), Some("int8" | "f32")), "{j}");
    // Every decode step runs every layer's attention once.
    let attention = j["decode_kernels"].as_object().and_then(|m| m.iter().find(|(k, _)| k.ends_with("_attention")).map(|(_, v)| v.clone()));
    assert_eq!(attention.and_then(|a| a["calls_per_token"].as_f64()), Some(30.0), "{j}");
    // KV bytes: 30 layers' K and V caches of 3 KV heads x 64 in f16, held for
    // the 20 positions the run reached.
    let kv = &j["kv"];
    assert_eq!((kv["caches"].as_u64(), kv["bytes_per_position"].as_u64()), (Some(60), Some(60 * 3 * 64 * 2)), "{kv}");
    assert_eq!((kv["positions"].as_u64(), kv["bytes_held"].as_u64()), (Some(20), Some(20 * 60 * 3 * 64 * 2)), "{kv}");
    assert_eq!(kv["per_cache"].as_array().map(|a| a.len()), Some(60), "{kv}");
}

/// Like other Unix tools, `sparsec` ends quietly when the reader of its stdout
/// has gone (`| head`): its write to the pipe kills it with SIGPIPE (the
/// default disposition it restores at start-up), with no panic and no error
/// message. The pipe's read end is closed before the child starts, so its
/// first write always meets a pipe without a reader.
#[test]
fn ends_quietly_when_stdout_closes_early() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors (close-on-exec, so no other child inherits the read end), owned once each below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2: {}", std::io::Error::last_os_error());
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_sparsec")).arg("--help").stdout(Stdio::from(write)).stderr(Stdio::piped()).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "expected death by SIGPIPE, got {:?}; stderr: {err}", out.status);
    assert!(err.is_empty(), "a closed stdout is not an error to report: {err}");
}
