//! The tiny HF fixtures (GPT-2: 32 positions, Llama: 64; both 96 ids) copied
//! with a word-level tokenizer: `w0`..`w89` are ids 0..89, `<unk>` 90, `x91`..`x199`
//! fill the ids between and `zebra` is id 200, outside the models' vocabulary.
//! Tests that run the language-model verbs on the fixtures include it as
//! `mod word_model;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `sparsec` binary with `args`, its cache under `cache`.
pub fn sparsec(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparsec")).args(args).env("SPARSEC_CACHE_DIR", cache).output().expect("runs")
}

/// `sparsec eval DIR --text TEXT --json ARGS`: the perplexity and stderr,
/// failing the test when the command fails.
pub fn eval(dir: &str, args: &[&str], text: &Path, cache: &Path) -> (f64, String) {
    let mut a = vec!["eval", dir, "--text", text.to_str().unwrap(), "--json"];
    a.extend_from_slice(args);
    let o = sparsec(&a, cache);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "sparsec {}: {err}", a.join(" "));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (j["perplexity"].as_f64().unwrap(), err)
}

/// A copy of fixture `name` with the word-level tokenizer.
pub fn model(name: &str) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut vocab: serde_json::Map<String, serde_json::Value> = (0..90).map(|i| (format!("w{i}"), serde_json::json!(i))).collect();
    vocab.insert("<unk>".into(), serde_json::json!(90));
    // No holes in the ids (the tokenizers crate warns on stdout when it saves such a vocabulary).
    vocab.extend((91..200).map(|i| (format!("x{i}"), serde_json::json!(i))));
    vocab.insert("zebra".into(), serde_json::json!(200));
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "<unk>" }
    });
    std::fs::write(tmp.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    tmp
}

/// `n` in-vocabulary words.
pub fn words(n: usize) -> String {
    (0..n).map(|i| format!("w{}", i % 90)).collect::<Vec<_>>().join(" ")
}
