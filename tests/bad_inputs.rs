//! Inputs a language model cannot take, through the `sparsec` command line:
//! a prompt longer than the context, a prompt plus --max-new-tokens past it,
//! evaluation windows longer than it, token ids outside the vocabulary (a
//! tokenizer that does not match the model). Each is one clear error before
//! any work, with exit code 2, on the interpreter and on the compiled model
//! (whose embedding kernels do not check ids themselves).
//!
//! The models are the tiny HF fixtures (GPT-2: 32 positions, Llama: 64; both
//! 96 ids) with a word-level tokenizer added: `w0`..`w89` are ids 0..89 and
//! `zebra` is id 200, outside the models' vocabulary (`x91`..`x199` fill the ids between).

use crate::word_model;

use std::path::Path;
use std::process::Command;
use word_model::{model, sparsec, words};

/// Runs `args`, expecting exit code 2 and every `needle` in stderr; returns stderr.
fn fails(args: &[&str], cache: &Path, needles: &[&str]) -> String {
    let o = sparsec(args, cache);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "`sparsec {}` should fail with exit code 2; stderr: {e}", args.join(" "));
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "`sparsec {}`: stderr {e:?} lacks {n:?}", args.join(" "));
    }
    // Refused before any work: nothing was generated or scored.
    assert!(o.stdout.is_empty(), "printed before failing: {}", String::from_utf8_lossy(&o.stdout));
    e
}

#[test]
fn generation_within_the_context_works_and_past_it_is_refused_up_front() {
    let m = model("gpt2_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    // The control: a prompt that fits, with room for the new tokens.
    let o = sparsec(&["run", dir, "--prompt", &words(20), "--max-new-tokens", "12", "--json"], &cache);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((j["prompt_tokens"].as_u64(), j["executor"].as_str()), (Some(20), Some("reference interpreter")));
    assert!(j["generated_tokens"].as_u64().is_some_and(|n| (1..=12).contains(&n)), "{j}");

    // A prompt longer than the context.
    fails(
        &["run", dir, "--prompt", &words(40), "--max-new-tokens", "1"],
        &cache,
        &["the prompt is 40 tokens: 40 positions exceed the model's context of 32", "`n_positions`", "shorten the prompt"],
    );
    // A prompt that fits, and new tokens that would not.
    fails(
        &["run", dir, "--prompt", &words(20), "--max-new-tokens", "13"],
        &cache,
        &[
            "the prompt (20 tokens) and --max-new-tokens 13: 33 positions exceed the model's context of 32",
            "pass --max-new-tokens 12 or less",
        ],
    );
    // The Llama's context comes from max_position_embeddings (64).
    let l = model("llama_tiny");
    fails(
        &["run", l.path().to_str().unwrap(), "--prompt", &words(65)],
        &cache,
        &["the prompt is 65 tokens: 65 positions exceed the model's context of 64", "`max_position_embeddings`"],
    );
}

#[test]
fn ids_outside_the_vocabulary_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    for name in ["gpt2_tiny", "llama_tiny"] {
        let m = model(name);
        let dir = m.path().to_str().unwrap();
        fails(
            &["run", dir, "--prompt", "w1 w2 zebra w3"],
            cache.path(),
            &[
                "the prompt: the tokenizer gives an id the model does not have",
                "token id 200 (input token 2) is outside the model's vocabulary of 96 ids",
            ],
        );
        let text = m.path().join("text.txt");
        std::fs::write(&text, format!("{} zebra", words(10))).unwrap();
        fails(
            &["eval", dir, "--text", text.to_str().unwrap()],
            cache.path(),
            &["text.txt: the tokenizer gives an id the model does not have", "token id 200 (input token 10)"],
        );
    }
}

#[test]
fn eval_windows_must_fit_the_context() {
    let m = model("gpt2_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let text = m.path().join("long.txt");
    std::fs::write(&text, words(80)).unwrap();
    let t = text.to_str().unwrap();
    // The default --max-tokens (512) takes the whole 80-token text as one window.
    fails(
        &["eval", dir, "--text", t],
        &cache,
        &[
            "--max-tokens 512: a window of 80 tokens of",
            "80 positions exceed the model's context of 32",
            "pass --max-tokens 32 or less (and --stride",
        ],
    );
    fails(&["eval", dir, "--text", t, "--max-tokens", "33"], &cache, &["a window of 33 tokens", "context of 32"]);
    // Windows that fit, sliding over the whole text, work.
    let o = sparsec(&["eval", dir, "--text", t, "--max-tokens", "32", "--stride", "16", "--json"], &cache);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((j["tokens"].as_u64(), j["predicted"].as_u64()), (Some(80), Some(79)), "{j}");
    assert!(j["perplexity"].as_f64().is_some_and(|p| p.is_finite() && p > 1.0), "{j}");
}

/// The compiled model takes its limits from the artifact's graph: the
/// embedding's rows (GPT-2's position table for the context). Its kernels would
/// clamp an out-of-range id to the last row instead of failing.
#[test]
fn the_compiled_model_refuses_the_same_inputs() {
    let m = model("gpt2_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    let o = sparsec(&["run", dir, "--compiled", "--prompt", &words(4), "--max-new-tokens", "2", "--json"], &cache);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["executor"].as_str(), Some("compiled (cpu)"), "{j}");
    fails(
        &["run", dir, "--compiled", "--prompt", "w1 zebra"],
        &cache,
        &["token id 200 (input token 1) is outside the model's vocabulary of 96 ids"],
    );
    fails(
        &["run", dir, "--compiled", "--prompt", &words(30), "--max-new-tokens", "8"],
        &cache,
        &["38 positions exceed the model's context of 32", "the position table of"],
    );
    let text = m.path().join("long.txt");
    std::fs::write(&text, words(80)).unwrap();
    fails(&["eval", dir, "--compiled", "--text", text.to_str().unwrap()], &cache, &["80 positions exceed the model's context of 32"]);
}

/// A compiled Llama has no position table: its artifact records the trained
/// context, which the LM verbs and the runtime itself (`sparsec-run`) enforce.
#[test]
fn a_compiled_llama_keeps_its_trained_context() {
    let m = model("llama_tiny");
    let dir = m.path().to_str().unwrap();
    let cache = m.path().join("cache");
    fails(
        &["run", dir, "--compiled", "--prompt", &words(60), "--max-new-tokens", "8"],
        &cache,
        &["68 positions exceed the model's context of 64", "the trained context recorded in"],
    );
    let art = m.path().join("llama.sparsec");
    let o = sparsec(&["compile", dir, "-o", art.to_str().unwrap()], &cache);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run =
        |seq: &str| Command::new(env!("CARGO_BIN_EXE_sparsec")).args(["run", art.to_str().unwrap(), "--seq", seq]).output().expect("runs");
    assert!(run("64").status.success());
    let e = String::from_utf8_lossy(&run("65").stderr).into_owned();
    assert!(e.contains("exceed the 64 this model can address"), "{e}");
}
