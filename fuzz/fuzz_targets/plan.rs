//! Fuzz target `plan`: see `sparsec_fuzz::harness::plan`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsec_fuzz::harness::plan(data));
