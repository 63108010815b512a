//! sparsec's fuzz harnesses (`harness.rs`), shared by the `cargo fuzz`
//! targets and by the regression tests of the main test suite
//! (`tests/fuzz_regressions.rs` includes the same file).
pub mod harness;
