//! Fuzz target `artifact`: see `sparsec_fuzz::harness::artifact`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsec_fuzz::harness::artifact(data));
