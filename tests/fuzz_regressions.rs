//! Replays every input the fuzzers saved (`fuzz/regressions/<target>/`, and
//! the seed corpus `fuzz/corpus/<target>/`) through the same harness the
//! `cargo fuzz` targets run (`fuzz/src/harness.rs`): a finding stays fixed.
//! CI runs this, not the fuzzers (`scripts/fuzz.sh` runs them).

use crate::harness;

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

/// The artifact seeds are artifacts of the current manifest version: a bumped
/// `MANIFEST_VERSION` with stale seeds would have the replay above refuse every
/// one at the version check, before the validation they exist to exercise
/// (rerun `fuzz/make_seeds.py` after a bump).
#[test]
fn artifact_seeds_have_the_current_manifest_version() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/artifact");
    let seeds = inputs(&dir);
    assert!(!seeds.is_empty(), "fuzz/corpus/artifact holds no seeds");
    for p in seeds {
        let data = std::fs::read(&p).unwrap();
        // Mode byte, then the manifest framed by its u32 length (`harness::split`).
        let len = u32::from_le_bytes(data[1..5].try_into().unwrap()) as usize;
        let manifest: serde_json::Value = serde_json::from_slice(&data[5..5 + len]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            manifest["version"].as_u64(),
            Some(sparsec_runtime::manifest::MANIFEST_VERSION as u64),
            "{}: rerun fuzz/make_seeds.py after a manifest version bump",
            p.display()
        );
    }
}
