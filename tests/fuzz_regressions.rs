//! Replays every input the fuzzers saved (`fuzz/regressions/<target>/`, and
//! the seed corpus `fuzz/corpus/<target>/`) through the same harness the
//! `cargo fuzz` targets run (`fuzz/src/harness.rs`): a finding stays fixed.
//! CI runs this, not the fuzzers (`scripts/fuzz.sh` runs them).

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::Path;

/// A fuzz target's name and its harness.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 5] = [
    ("ir_text", harness::ir_text),
    ("plan", harness::plan),
    ("gguf", harness::gguf),
    ("safetensors_dir", harness::safetensors_dir),
    ("artifact", harness::artifact),
];

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_saved_fuzz_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (target, run) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} holds no seeds");
        for p in seeds.iter().chain(&inputs(&root.join("regressions").join(target))) {
            let data = std::fs::read(p).unwrap();
            if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!("{target}: {} panics: {msg:?}", p.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 5);
}
