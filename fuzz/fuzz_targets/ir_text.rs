//! Fuzz target `ir_text`: see `sparsec_fuzz::harness::ir_text`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsec_fuzz::harness::ir_text(data));
