//! Model configs that cannot make a model give one typed error naming the
//! field (as the checkpoint spells it), never a panic, a division by zero or an
//! overflowing size: Hugging Face `config.json` (Llama and GPT-2) and GGUF
//! metadata. And the context length reaches the loaded model.

#[path = "../../tests/common/mod.rs"]
mod common;

use sparsec_models::checkpoint::{Family, Model};
use sparsec_models::ModelError;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf").join(name)
}

/// A copy of a fixture whose config.json has `edit` applied.
fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), tmp.path().join(f)).unwrap();
    }
    let cfg = tmp.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&cfg, c.to_string()).unwrap();
    tmp
}

/// Loads `dir`, expecting a `ModelError::Config` for `field`; returns its message.
fn config_error(path: &Path, field: &str) -> String {
    let e = match Model::load(path.to_str().unwrap()) {
        Ok(_) => panic!("{} loaded, expected an error about `{field}`", path.display()),
        Err(e) => e,
    };
    let text = e.to_string();
    match &e {
        ModelError::Config { path: p, field: f, .. } => {
            assert_eq!(f, field, "wrong field in: {text}");
            assert!(p.starts_with(path), "error names {} instead of the checkpoint {}: {text}", p.display(), path.display());
        }
        other => panic!("expected a config error about `{field}`, got {other:?}: {text}"),
    }
    assert!(text.contains(&format!("config field `{field}`")), "{text}");
    text
}

fn hf_llama_error(edit: impl FnOnce(&mut serde_json::Value), field: &str) -> String {
    let t = with_config("llama_tiny", edit);
    let e = config_error(t.path(), field);
    assert!(e.contains("config.json"), "{e}");
    e
}

fn hf_gpt2_error(edit: impl FnOnce(&mut serde_json::Value), field: &str) -> String {
    let t = with_config("gpt2_tiny", edit);
    config_error(t.path(), field)
}

#[test]
fn the_fixtures_load_with_their_context_lengths() {
    let llama = Model::load(fixture("llama_tiny").to_str().unwrap()).unwrap();
    assert_eq!((llama.context_length(), llama.vocab_size(), llama.context_field()), (64, 96, "max_position_embeddings"));
    let gpt2 = Model::load(fixture("gpt2_tiny").to_str().unwrap()).unwrap();
    assert_eq!((gpt2.context_length(), gpt2.vocab_size(), gpt2.context_field()), (32, 96, "n_positions"));
}

#[test]
fn hf_llama_zero_sizes_name_their_field() {
    for field in [
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "vocab_size",
        "max_position_embeddings",
        "intermediate_size",
        "hidden_size",
    ] {
        let e = hf_llama_error(|c| c[field] = serde_json::json!(0), field);
        assert!(e.contains("is 0; it must be at least 1"), "{field}: {e}");
    }
}

#[test]
fn hf_llama_heads_that_do_not_divide() {
    let e = hf_llama_error(|c| c["hidden_size"] = serde_json::json!(30), "hidden_size");
    assert!(e.contains("is 30, not divisible by `num_attention_heads` = 4"), "{e}");
    let e = hf_llama_error(|c| c["num_key_value_heads"] = serde_json::json!(3), "num_key_value_heads");
    assert!(e.contains("is 3, which does not divide `num_attention_heads` = 4"), "{e}");
    // More KV heads than query heads does not divide either.
    let e = hf_llama_error(|c| c["num_key_value_heads"] = serde_json::json!(8), "num_key_value_heads");
    assert!(e.contains("is 8, which does not divide"), "{e}");
    // 12 / 4 = 3 features per head: RoPE rotates pairs.
    let e = hf_llama_error(
        |c| {
            c["hidden_size"] = serde_json::json!(12);
            c["head_dim"] = serde_json::json!(3);
        },
        "hidden_size",
    );
    assert!(e.contains("each head is 3 wide, odd, and RoPE rotates pairs"), "{e}");
    // An explicit head_dim other than hidden_size / heads is not silently ignored.
    let e = hf_llama_error(|c| c["head_dim"] = serde_json::json!(16), "head_dim");
    assert!(e.contains("is 16, but `hidden_size` / `num_attention_heads` = 8"), "{e}");
}

#[test]
fn hf_llama_missing_or_mistyped_fields() {
    let e = hf_llama_error(|c| drop(c.as_object_mut().unwrap().remove("max_position_embeddings")), "max_position_embeddings");
    assert!(e.contains("is missing or not a non-negative integer"), "{e}");
    let e = hf_llama_error(|c| c["num_key_value_heads"] = serde_json::json!(-2), "num_key_value_heads");
    assert!(e.contains("is missing or not a non-negative integer"), "{e}");
    let e = hf_llama_error(|c| c["num_attention_heads"] = serde_json::json!("four"), "num_attention_heads");
    assert!(e.contains("is missing or not a non-negative integer"), "{e}");
    // null KV heads means "as many as the query heads", as in transformers.
    let t = with_config("llama_tiny", |c| {
        c["num_key_value_heads"] = serde_json::Value::Null;
    });
    let e = Model::load(t.path().to_str().unwrap()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("disagrees with the config"), "4 KV heads do not fit the fixture's 2-head K/V weights: {e}");
}

#[test]
fn hf_llama_absurd_sizes_do_not_overflow() {
    let e = hf_llama_error(|c| c["num_hidden_layers"] = serde_json::json!(1u64 << 40), "num_hidden_layers");
    assert!(e.contains("more than 65536"), "{e}");
    // Within the limit, but more layers than the file has tensors: refused
    // before any per-layer table is built (a fuzzer's slow input).
    let e = hf_llama_error(|c| c["num_hidden_layers"] = serde_json::json!(60000), "num_hidden_layers");
    assert!(e.contains("is 60000, but the checkpoint holds only"), "{e}");
    let e = hf_gpt2_error(|c| c["n_layer"] = serde_json::json!(60000), "n_layer");
    assert!(e.contains("is 60000, but the checkpoint holds only"), "{e}");
    let e = hf_llama_error(|c| c["vocab_size"] = serde_json::json!(1u64 << 30), "vocab_size");
    assert!(e.contains("more than 16777216") && e.contains("exact below 2^24"), "{e}");
    let e = hf_llama_error(|c| c["num_attention_heads"] = serde_json::json!(1u64 << 33), "num_attention_heads");
    assert!(e.contains("more than 4294967295"), "{e}");
    let e = hf_llama_error(
        |c| {
            c["hidden_size"] = serde_json::json!(1u64 << 40);
            c["head_dim"] = serde_json::Value::Null;
        },
        "hidden_size",
    );
    assert!(e.contains("is too large"), "{e}");
    let e = hf_llama_error(|c| c["intermediate_size"] = serde_json::json!(u64::MAX), "intermediate_size");
    assert!(e.contains("too large"), "{e}");
    let e = hf_llama_error(|c| c["intermediate_size"] = serde_json::json!(1u64 << 58), "intermediate_size");
    assert!(e.contains("is too large"), "{e}");
    let e = hf_llama_error(|c| c["eos_token_id"] = serde_json::json!(1u64 << 40), "eos_token_id");
    assert!(e.contains("not a token id"), "{e}");
}

#[test]
fn hf_llama_rope_settings_are_read_or_refused() {
    // transformers 5 keeps rope_theta in rope_parameters: it is read from there.
    let t = with_config("llama_tiny", |c| {
        c["rope_parameters"]["rope_theta"] = serde_json::json!(500000.0);
    });
    let m = Model::load(t.path().to_str().unwrap()).unwrap();
    let Family::Llama(cfg) = &m.family else { panic!("not llama") };
    assert_eq!(cfg.rope_theta, 500000.0);
    // Scaled RoPE changes the math: refused, not ignored.
    let e = hf_llama_error(|c| c["rope_parameters"]["rope_type"] = serde_json::json!("llama3"), "rope_parameters");
    assert!(e.contains("RoPE scaling `llama3`"), "{e}");
    let e = hf_llama_error(|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0}), "rope_scaling");
    assert!(e.contains("RoPE scaling `linear`"), "{e}");
    let e = hf_llama_error(|c| c["rope_parameters"]["rope_theta"] = serde_json::json!(-1.0), "rope_theta");
    assert!(e.contains("must be a positive number"), "{e}");
}

#[test]
fn hf_gpt2_bad_sizes_name_their_field() {
    for field in ["n_head", "n_layer", "n_positions", "vocab_size", "n_embd"] {
        let e = hf_gpt2_error(|c| c[field] = serde_json::json!(0), field);
        assert!(e.contains("is 0; it must be at least 1"), "{field}: {e}");
    }
    let e = hf_gpt2_error(|c| c["n_embd"] = serde_json::json!(30), "n_embd");
    assert!(e.contains("is 30, not divisible by `n_head` = 4"), "{e}");
    let e = hf_gpt2_error(|c| c["n_positions"] = serde_json::json!(1u64 << 25), "n_positions");
    assert!(e.contains("more than 16777216"), "{e}");
    let e = hf_gpt2_error(|c| c["n_embd"] = serde_json::json!(1u64 << 40), "n_embd");
    assert!(e.contains("is too large"), "{e}");
    let e = hf_gpt2_error(|c| c["n_layer"] = serde_json::json!(u64::MAX), "n_layer");
    assert!(e.contains("more than 65536"), "{e}");
    let e = hf_gpt2_error(|c| drop(c.as_object_mut().unwrap().remove("n_positions")), "n_positions");
    assert!(e.contains("is missing"), "{e}");
}

// GGUF metadata: a minimal file with a token embedding and the llama keys.

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Metadata value: (GGUF type, payload).
enum V {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// A GGUF file with `kv` and one F32 tensor per `tensors` entry (ggml dims).
fn gguf(kv: &[(&str, V)], tensors: &[(&str, &[u64])]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        gstr(&mut out, k);
        match v {
            V::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                gstr(&mut out, s);
            }
        }
    }
    let mut data = Vec::new();
    for (name, dims) in tensors {
        while data.len() % 32 != 0 {
            data.push(0);
        }
        gstr(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend((data.len() as u64).to_le_bytes());
        data.extend(std::iter::repeat_n(0u8, 4 * dims.iter().product::<u64>() as usize));
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(data);
    out
}

/// The llama keys of a small valid model (dim 8, 2 heads, 1 KV head), with
/// `change` replacing or (value `None`) removing keys.
fn llama_kv(change: Vec<(&'static str, Option<V>)>) -> Vec<(&'static str, V)> {
    let mut kv: Vec<(&'static str, V)> = vec![
        ("general.architecture", V::Str("llama")),
        ("llama.embedding_length", V::U32(8)),
        ("llama.block_count", V::U32(1)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.feed_forward_length", V::U32(16)),
        ("llama.context_length", V::U32(128)),
    ];
    for (k, v) in change {
        kv.retain(|(key, _)| *key != k);
        if let Some(v) = v {
            kv.push((k, v));
        }
    }
    kv
}

fn gguf_error(change: Vec<(&'static str, Option<V>)>, extra_tensors: &[(&str, &[u64])], field: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.gguf");
    let mut tensors: Vec<(&str, &[u64])> = vec![("token_embd.weight", &[8, 10])];
    tensors.extend_from_slice(extra_tensors);
    std::fs::write(&p, gguf(&llama_kv(change), &tensors)).unwrap();
    let e = config_error(&p, field);
    assert!(e.contains("m.gguf"), "{e}");
    e
}

#[test]
fn gguf_bad_hyperparameters_name_their_metadata_key() {
    for key in [
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.block_count",
        "llama.context_length",
        "llama.feed_forward_length",
    ] {
        let e = gguf_error(vec![(key, Some(V::U32(0)))], &[], key);
        assert!(e.contains("is 0; it must be at least 1"), "{key}: {e}");
    }
    let e = gguf_error(vec![("llama.embedding_length", Some(V::U32(9)))], &[], "llama.embedding_length");
    assert!(e.contains("not divisible by `llama.attention.head_count` = 2"), "{e}");
    let e = gguf_error(vec![("llama.attention.head_count_kv", Some(V::U32(3)))], &[], "llama.attention.head_count_kv");
    assert!(e.contains("does not divide `llama.attention.head_count` = 2"), "{e}");
    let e = gguf_error(vec![("llama.attention.head_count", Some(V::U32(8)))], &[], "llama.embedding_length");
    assert!(e.contains("each head is 1 wide, odd"), "{e}");
    let e = gguf_error(vec![("llama.block_count", Some(V::U32(u32::MAX)))], &[], "llama.block_count");
    assert!(e.contains("more than 65536"), "{e}");
    // The vocabulary is the embedding's rows.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.gguf");
    std::fs::write(&p, gguf(&llama_kv(vec![]), &[("token_embd.weight", &[8, 0])])).unwrap();
    let e = config_error(&p, "token_embd.weight");
    assert!(e.contains("is 0"), "{e}");
}

#[test]
fn gguf_missing_mistyped_and_unsupported_rope_metadata() {
    // A required key missing, an optional one of the wrong type: errors, not defaults.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.gguf");
    std::fs::write(&p, gguf(&llama_kv(vec![("llama.context_length", None)]), &[("token_embd.weight", &[8, 10])])).unwrap();
    let e = Model::load(p.to_str().unwrap()).err().unwrap().to_string();
    assert!(e.contains("metadata `llama.context_length` is missing or not an integer"), "{e}");
    std::fs::write(&p, gguf(&llama_kv(vec![("llama.attention.head_count_kv", Some(V::Str("one")))]), &[("token_embd.weight", &[8, 10])]))
        .unwrap();
    let e = Model::load(p.to_str().unwrap()).err().unwrap().to_string();
    assert!(e.contains("metadata `llama.attention.head_count_kv` is missing or not an integer"), "{e}");
    std::fs::write(&p, gguf(&llama_kv(vec![("llama.rope.freq_base", Some(V::Str("big")))]), &[("token_embd.weight", &[8, 10])])).unwrap();
    let e = Model::load(p.to_str().unwrap()).err().unwrap().to_string();
    assert!(e.contains("metadata `llama.rope.freq_base` is missing or not a number"), "{e}");
    let e = gguf_error(vec![("llama.rope.freq_base", Some(V::F32(0.0)))], &[], "llama.rope.freq_base");
    assert!(e.contains("must be a positive number"), "{e}");
    // Partial or scaled RoPE is refused, not ignored.
    let e = gguf_error(vec![("llama.rope.dimension_count", Some(V::U32(2)))], &[], "llama.rope.dimension_count");
    assert!(e.contains("is 2, but heads are 4 wide"), "{e}");
    let e = gguf_error(vec![("llama.rope.scaling.type", Some(V::Str("linear")))], &[], "llama.rope.scaling.type");
    assert!(e.contains("is `linear`; RoPE scaling is not supported"), "{e}");
    std::fs::write(&p, gguf(&llama_kv(vec![]), &[("token_embd.weight", &[8, 10]), ("rope_freqs.weight", &[2])])).unwrap();
    let e = Model::load(p.to_str().unwrap()).err().unwrap().to_string();
    assert!(e.contains("rope_freqs.weight") && e.contains("not supported"), "{e}");
    // Past the config: the first missing layer tensor is named (the config itself was fine).
    std::fs::write(&p, gguf(&llama_kv(vec![("llama.rope.dimension_count", Some(V::U32(4)))]), &[("token_embd.weight", &[8, 10])])).unwrap();
    let e = Model::load(p.to_str().unwrap()).err().unwrap();
    assert!(matches!(e, ModelError::Format { .. } | ModelError::MissingTensor { .. }), "{e:?}");
}

/// The real SmolLM2 GGUF passes every check (its RoPE covers whole heads, its
/// context length is stated), when it is installed.
#[test]
fn smollm2_passes_the_config_checks() {
    let Some(path) = common::require(common::SMOLLM2, sparsec_models::checkpoint::smollm2_path()) else { return };
    let m = Model::load(path.to_str().unwrap()).unwrap();
    assert_eq!((m.vocab_size(), m.context_field()), (49152, "llama.context_length"));
    assert_eq!(m.context_length(), 8192);
}
