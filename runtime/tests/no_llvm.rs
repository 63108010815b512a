//! `sparsec-run` must start on the GPU machine, which has no LLVM or MLIR.

#[test]
fn sparsec_run_links_no_llvm_or_mlir() {
    let bin = env!("CARGO_BIN_EXE_sparsec-run");
    let out = std::process::Command::new("ldd").arg(bin).output().expect("ldd runs");
    assert!(out.status.success(), "ldd failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("libc.so"), "unexpected ldd output:\n{text}");
    for lib in ["llvm", "mlir", "libcuda", "libnvrtc"] {
        assert!(!text.contains(lib), "sparsec-run links {lib}:\n{text}");
    }
}

#[test]
fn sparsec_run_reports_a_missing_artifact_without_panicking() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec-run")).arg("/nonexistent/a.sparsec").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/a.sparsec") && !err.contains("panicked"), "{err}");
}

#[test]
fn sparsec_run_does_not_panic_when_stdout_closes_early() {
    use std::process::{Command, Stdio};
    // An artifact that does not exist still prints to stderr only; use --help for stdout.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparsec-run"))
        .arg("--help")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before the writer writes
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
