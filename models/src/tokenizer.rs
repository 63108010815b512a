//! Tokenizers through the `tokenizers` crate: from a `tokenizer.json`, or built
//! from GGUF metadata (`tokenizer.ggml.model = gpt2`: byte-level BPE with the
//! vocabulary, merges, special tokens and the pre-tokenizer llama.cpp uses).

use crate::gguf::{GgufFile, GgufValue};
use crate::ModelError;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token type of control tokens (`<|im_start|>` and the like).
const TOKEN_TYPE_CONTROL: u64 = 3;

/// Loads a Hugging Face `tokenizer.json`.
pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path).map_err(|e| ModelError::Format { path: path.into(), message: format!("tokenizer: {e}") })
}

/// Builds the tokenizer a GGUF file describes.
pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, ModelError> {
    let bad = |message: String| ModelError::Format { path: g.path.clone(), message };
    let model = g.meta_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(bad(format!("tokenizer model `{model}` is not supported (gpt2 byte-level BPE is)")));
    }
    let strings = |key: &str| -> Result<Vec<String>, ModelError> {
        let arr = g.meta(key).and_then(GgufValue::as_array).ok_or_else(|| bad(format!("metadata `{key}` is missing or not an array")))?;
        arr.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(format!("metadata `{key}` holds a non-string")))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Merges = strings("tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("merge `{m}` is not two tokens separated by a space")))
        })
        .collect::<Result<_, _>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| bad(format!("tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = g.meta("tokenizer.ggml.pre").and_then(GgufValue::as_str).unwrap_or("default");
    let byte_level: PreTokenizerWrapper = ByteLevel::new(false, true, true).into();
    let pre_tokenizer = match pre {
        // Digits one by one, then GPT-2's regex over bytes (llama.cpp's SMOLLM pre-tokenizer).
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level]),
        "gpt2" | "default" => Sequence::new(vec![byte_level]),
        other => return Err(bad(format!("pre-tokenizer `{other}` is not supported (smollm, gpt2 and default are)"))),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    if let Some(types) = g.meta("tokenizer.ggml.token_type").and_then(GgufValue::as_array) {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.as_u64() == Some(TOKEN_TYPE_CONTROL))
            .map(|(_, s)| AddedToken::from(s.clone(), true))
            .collect();
        tok.add_special_tokens(&special);
    }
    Ok(tok)
}
