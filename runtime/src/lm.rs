//! Language-model helpers over logits: next-token negative log-likelihood and
//! perplexity (mean NLL of tokens 2..N given their prefixes, no BOS added); and
//! the limits of what a language model accepts (`LmLimits`): token ids inside
//! its vocabulary, sequences inside its context. The compiled embedding kernels
//! do not check ids (an id past the table reads a clamped row), so callers of a
//! compiled model check here, before any work.

use ndarray::ArrayD;
use sparsec_ir::{Dim, Graph, Op};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LmError {
    #[error("token id {id} (input token {index}) is outside the model's vocabulary of {vocab} ids (0..{vocab})")]
    TokenOutOfVocab { index: usize, id: u32, vocab: usize },
    #[error("{what}: {needed} positions exceed the model's context of {context} positions")]
    ContextExceeded { what: String, needed: usize, context: usize },
    #[error("logits of shape {shape:?} do not match {ids} ids")]
    LogitsShape { shape: Vec<usize>, ids: usize },
    #[error("perplexity needs at least 2 tokens")]
    TooFewTokens,
    #[error("logits are not contiguous")]
    NotContiguous,
}

/// What a language model accepts: ids below `vocab`; sequences of at most
/// `context` positions (`None`: the model does not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmLimits {
    pub vocab: usize,
    pub context: Option<usize>,
}

/// Rows of `g`'s value `v` when its type is a `[rows, ...]` table of fixed size.
fn table_rows(g: &Graph, v: sparsec_ir::ValueId) -> Option<usize> {
    match g.nodes.get(v.0)?.ty.as_ref()?.dims.first()? {
        Dim::Fixed(n) => usize::try_from(*n).ok(),
        Dim::Seq => None,
    }
}

impl LmLimits {
    /// The limits a model graph implies: the vocabulary is the rows of the
    /// embedding table its id input indexes; the context, the rows of a
    /// position table (GPT-2's learned positions) if it has one. `None` when
    /// no embedding of an input is found (not a language model).
    pub fn from_graph(g: &Graph) -> Option<LmLimits> {
        let mut vocab = None;
        let mut context = None;
        for n in &g.nodes {
            let (Op::Embedding, [table, ids]) = (&n.op, &n.operands[..]) else { continue };
            match g.nodes.get(ids.0).map(|i| &i.op) {
                Some(Op::Input) => vocab = vocab.or(table_rows(g, *table)),
                Some(Op::Positions) => context = context.or(table_rows(g, *table)),
                _ => {}
            }
        }
        Some(LmLimits { vocab: vocab?, context })
    }

    /// The tighter of the graph's context and one the checkpoint states
    /// (a Llama's trained context length, which its graph does not show).
    pub fn with_context(self, context: Option<usize>) -> LmLimits {
        let context = match (self.context, context) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        LmLimits { context, ..self }
    }

    /// Every id below the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), LmError> {
        match ids.iter().enumerate().find(|(_, id)| **id as usize >= self.vocab) {
            Some((index, id)) => Err(LmError::TokenOutOfVocab { index, id: *id, vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// `needed` positions fit in the context; `what` says what needs them.
    pub fn check_positions(&self, needed: usize, what: impl FnOnce() -> String) -> Result<(), LmError> {
        match self.context {
            Some(context) if needed > context => Err(LmError::ContextExceeded { what: what(), needed, context }),
            _ => Ok(()),
        }
    }

    /// `ids` may follow `pos` positions already consumed: ids in the
    /// vocabulary, `pos + ids.len()` within the context.
    pub fn check_step(&self, pos: usize, ids: &[u32]) -> Result<(), LmError> {
        self.check_ids(ids)?;
        let needed = pos.saturating_add(ids.len());
        self.check_positions(needed, || format!("{} tokens after the {pos} already in the sequence", ids.len()))
    }
}

/// `-log softmax(row)[target]`, computed in f64; a target outside the row is an error.
pub fn nll(row: &[f32], target: usize) -> Result<f64, LmError> {
    let t =
        *row.get(target).ok_or(LmError::TokenOutOfVocab { index: 0, id: u32::try_from(target).unwrap_or(u32::MAX), vocab: row.len() })?;
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() + m;
    Ok(lse - t as f64)
}

/// Perplexity of `ids` under `logits[n, vocab]` (row t predicts token t+1):
/// returns `(perplexity, mean nll, predicted tokens)`.
pub fn perplexity(logits: &ArrayD<f32>, ids: &[u32]) -> Result<(f64, f64, usize), LmError> {
    let shape = logits.shape();
    if shape.len() != 2 || shape[0] != ids.len() {
        return Err(LmError::LogitsShape { shape: shape.to_vec(), ids: ids.len() });
    }
    if ids.len() < 2 {
        return Err(LmError::TooFewTokens);
    }
    let vocab = shape[1];
    LmLimits { vocab, context: None }.check_ids(ids)?;
    let flat = logits.as_slice().ok_or(LmError::NotContiguous)?;
    let mut total = 0.0;
    for (t, row) in flat.chunks_exact(vocab.max(1)).take(ids.len() - 1).enumerate() {
        total += nll(row, ids[t + 1] as usize)?;
    }
    let n = ids.len() - 1;
    let mean = total / n as f64;
    Ok((mean.exp(), mean, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn limits_reject_ids_outside_the_vocabulary_and_sequences_past_the_context() {
        let l = LmLimits { vocab: 10, context: Some(8) };
        assert_eq!(l.check_ids(&[0, 9, 3]), Ok(()));
        assert_eq!(l.check_ids(&[1, 10, 3]), Err(LmError::TokenOutOfVocab { index: 1, id: 10, vocab: 10 }));
        assert_eq!(l.check_step(5, &[1, 2, 3]), Ok(()));
        let e = l.check_step(6, &[1, 2, 3]).unwrap_err();
        assert_eq!(e.to_string(), "3 tokens after the 6 already in the sequence: 9 positions exceed the model's context of 8 positions");
        assert_eq!(LmLimits { vocab: 10, context: None }.check_step(1 << 40, &[1]), Ok(()));
        assert_eq!(l.with_context(Some(4)).context, Some(4));
        assert_eq!(LmLimits { vocab: 10, context: None }.with_context(Some(4)).context, Some(4));
    }

    #[test]
    fn limits_come_from_the_graph_tables() {
        let text = "graph @g {\n  %ids = input : i32[seq]\n  %p = positions\n  %e = weight \"embed\" init ones : f32[50, 4]\n  \
                    %pe = weight \"pos\" init ones : f32[16, 4]\n  %x = embedding %e, %ids\n  %y = embedding %pe, %p\n  %z = add %x, %y\n  return %z\n}\n";
        // Weights declare their types: no shape inference needed.
        let g = sparsec_ir::parse_graph(text).unwrap();
        assert_eq!(LmLimits::from_graph(&g), Some(LmLimits { vocab: 50, context: Some(16) }));
        let mlp = "graph @m {\n  %x = input : f32[seq, 4]\n  return %x\n}\n";
        assert_eq!(LmLimits::from_graph(&sparsec_ir::parse_graph(mlp).unwrap()), None);
    }

    #[test]
    fn nll_and_perplexity_refuse_targets_outside_the_logits() {
        assert!(nll(&[0.0, 1.0], 2).is_err());
        assert!((nll(&[0.0, 0.0], 1).unwrap() - 2f64.ln()).abs() < 1e-12);
        let logits = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.0; 6]).unwrap();
        assert_eq!(perplexity(&logits, &[0, 3]), Err(LmError::TokenOutOfVocab { index: 1, id: 3, vocab: 3 }));
        let (ppl, _, n) = perplexity(&logits, &[0, 2]).unwrap();
        assert_eq!(n, 1);
        assert!((ppl - 3.0).abs() < 1e-9);
    }
}
