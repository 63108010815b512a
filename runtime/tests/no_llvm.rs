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

/// Like other Unix tools, `sparsec-run` ends quietly when the reader of its
/// stdout has gone (`| head`): its write to the pipe kills it with SIGPIPE (the
/// default disposition it restores at start-up), with no panic and no error
/// message. The pipe's read end is closed before the child starts, so its
/// first write always meets a pipe without a reader.
#[test]
fn sparsec_run_ends_quietly_when_stdout_closes_early() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors (close-on-exec, so no other child inherits the read end), owned once each below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2: {}", std::io::Error::last_os_error());
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    // `--help` writes to stdout and needs no artifact.
    let out =
        Command::new(env!("CARGO_BIN_EXE_sparsec-run")).arg("--help").stdout(Stdio::from(write)).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "expected death by SIGPIPE, got {:?}; stderr: {err}", out.status);
    assert!(err.is_empty(), "a closed stdout is not an error to report: {err}");
}
