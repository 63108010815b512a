//! Fuzz target `safetensors_dir`: see `sparsec_fuzz::harness::safetensors_dir`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsec_fuzz::harness::safetensors_dir(data));
