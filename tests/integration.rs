//! The workspace's integration tests, built as one test binary: each file in
//! `tests/` is a module here. One binary links the compiler (and its static
//! LLVM and MLIR) once, where a binary per file linked it 22 times and a debug
//! build of the tests took about 14 GB of disk. Run one file's tests with
//! `cargo test --test integration filetests::` (any name filter works).

mod attention_support;
mod common;
#[path = "../fuzz/src/harness.rs"]
mod harness;
mod word_model;

mod amx;
mod artifact_corruption;
mod attention;
mod bad_inputs;
mod calibrated;
mod checkpoint_weights;
mod cli;
mod compile_and_run;
mod export;
mod filetests;
mod fuzz_regressions;
mod gpu_launch_shapes;
mod gpu_session;
mod kv_basis;
mod kv_chunked;
mod kv_sequence;
mod low_rank;
mod models;
mod nsa;
mod plans;
mod sparse_random;
mod tradeoff;
mod unimplemented_patterns;
