//! Fuzz target `gguf`: see `sparsec_fuzz::harness::gguf`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsec_fuzz::harness::gguf(data));
