//! Language-model helpers over logits: next-token negative log-likelihood and
//! perplexity (mean NLL of tokens 2..N given their prefixes, no BOS added).

use ndarray::ArrayD;

/// `-log softmax(row)[target]`, computed in f64.
pub fn nll(row: &[f32], target: usize) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() + m;
    lse - row[target] as f64
}

/// Perplexity of `ids` under `logits[n, vocab]` (row t predicts token t+1):
/// returns `(perplexity, mean nll, predicted tokens)`.
pub fn perplexity(logits: &ArrayD<f32>, ids: &[u32]) -> Result<(f64, f64, usize), String> {
    let shape = logits.shape();
    if shape.len() != 2 || shape[0] != ids.len() {
        return Err(format!("logits of shape {shape:?} do not match {} ids", ids.len()));
    }
    if ids.len() < 2 {
        return Err("perplexity needs at least 2 tokens".into());
    }
    let vocab = shape[1];
    let flat = logits.as_slice().ok_or("logits are not contiguous")?;
    let mut total = 0.0;
    for t in 0..ids.len() - 1 {
        let target = ids[t + 1] as usize;
        if target >= vocab {
            return Err(format!("token id {target} is outside the vocabulary of {vocab}"));
        }
        total += nll(&flat[t * vocab..(t + 1) * vocab], target);
    }
    let n = ids.len() - 1;
    let mean = total / n as f64;
    Ok((mean.exp(), mean, n))
}
