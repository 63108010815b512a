//! Language-model runs over a `Session` on any device, for `sparsec-run`
//! (which links no LLVM and no model loader) and the tests: greedy decoding
//! timed after a prompt, perplexity of a token window, and a step-by-step
//! comparison of a session's logits (prefill, then decode one token at a time
//! through the KV caches) with a reference.

use crate::artifact::Artifact;
use crate::compare::{compare, Comparison, Tolerance};
use crate::error::{RuntimeError, RuntimeResult};
use crate::interpreter::{interpret_cached, KvState};
use crate::sampling::argmax;
use crate::session::Session;
use ndarray::{ArrayD, Axis, IxDyn};
use std::time::Instant;

/// Token ids as the model's input (f32 holding integers).
pub fn ids_input(ids: &[u32]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids.iter().map(|i| *i as f32).collect()).unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])))
}

/// The first output, checked to be logits `[rows, vocab]`.
pub fn logits(mut out: Vec<ArrayD<f32>>, rows: usize) -> RuntimeResult<ArrayD<f32>> {
    if out.is_empty() {
        return Err(RuntimeError::Model("the model returned nothing".into()));
    }
    let l = out.remove(0);
    match l.shape() {
        [r, v] if *r == rows && *v > 0 => Ok(l),
        s => Err(RuntimeError::Model(format!("the model returned an output of shape {s:?}, expected logits [{rows}, vocab]"))),
    }
}

/// The greedy next token after logits `[rows, vocab]` (from the last row).
pub fn greedy(l: &ArrayD<f32>) -> u32 {
    let last = l.index_axis(Axis(0), l.shape()[0].saturating_sub(1));
    let row: Vec<f32> = last.iter().copied().collect();
    argmax(&row)
}

/// Prefill and decode times of one greedy round.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DecodeTiming {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl DecodeTiming {
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.new_tokens as f64 / self.decode_s.max(1e-12)
    }
}

/// `prompt`, then `new_tokens` greedy steps from position 0
/// (`Session::greedy_steps`: on the GPU without logits leaving it); returns
/// the generated ids and the times (host clock around calls that synchronize).
pub fn greedy_round(s: &mut Session<'_>, prompt: &[u32], new_tokens: usize) -> RuntimeResult<(Vec<u32>, DecodeTiming)> {
    s.reset();
    let t = Instant::now();
    let l = logits(s.run_last(&[ids_input(prompt)])?, 1)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let next = greedy(&l);
    let t = Instant::now();
    // `new_tokens` decode steps; the first id came from the prompt, the last
    // step's choice is not returned (as a loop that feeds each id would).
    let chosen = s.greedy_steps(next, new_tokens)?;
    let decode_s = t.elapsed().as_secs_f64();
    let ids: Vec<u32> = std::iter::once(next).chain(chosen).take(new_tokens).collect();
    Ok((ids, DecodeTiming { prompt_tokens: prompt.len(), new_tokens, prefill_s, decode_s }))
}

/// The ids `greedy_round` generates, the slow way: every step's logits come
/// back to the host and the host takes their argmax (what checks
/// `Session::greedy_steps` on a device).
pub fn greedy_round_on_host(s: &mut Session<'_>, prompt: &[u32], new_tokens: usize) -> RuntimeResult<Vec<u32>> {
    s.reset();
    let next = greedy(&logits(s.run_last(&[ids_input(prompt)])?, 1)?);
    let chosen = greedy_loop(next, new_tokens, |id| s.run_last(&[ids_input(&[id])]))?;
    Ok(std::iter::once(next).chain(chosen).take(new_tokens).collect())
}

/// `n` greedy steps on the host from the id `first`: `step(id)` runs one
/// position and returns its outputs (logits `[1, vocab]` first); each step is
/// fed the argmax of the one before. Returns the `n` chosen ids.
pub fn greedy_loop(first: u32, n: usize, mut step: impl FnMut(u32) -> RuntimeResult<Vec<ArrayD<f32>>>) -> RuntimeResult<Vec<u32>> {
    let mut ids = Vec::with_capacity(n);
    let mut next = first;
    for _ in 0..n {
        next = greedy(&logits(step(next)?, 1)?);
        ids.push(next);
    }
    Ok(ids)
}

/// One warm-up round, then `repeat` timed rounds: the generated ids and the
/// round of median decode time.
pub fn bench_decode(s: &mut Session<'_>, prompt: &[u32], new_tokens: usize, repeat: usize) -> RuntimeResult<(Vec<u32>, DecodeTiming)> {
    greedy_round(s, prompt, new_tokens.min(4))?;
    let mut rounds = Vec::with_capacity(repeat.max(1));
    let mut ids = Vec::new();
    for _ in 0..repeat.max(1) {
        let (i, t) = greedy_round(s, prompt, new_tokens)?;
        ids = i;
        rounds.push(t);
    }
    rounds.sort_by(|a, b| a.decode_s.total_cmp(&b.decode_s));
    Ok((ids, rounds[rounds.len() / 2]))
}

/// Perplexity of `ids` as one window from position 0: `(perplexity, predicted tokens)`.
pub fn perplexity(s: &mut Session<'_>, ids: &[u32]) -> RuntimeResult<(f64, usize)> {
    s.reset();
    let l = logits(s.run(&[ids_input(ids)])?, ids.len())?;
    let (ppl, _, n) = crate::lm::perplexity(&l, ids).map_err(|e| RuntimeError::Model(e.to_string()))?;
    Ok((ppl, n))
}

/// What a session is compared with, step by step.
pub enum Reference<'a> {
    /// The reference interpreter on the artifact's graph and weights.
    Interpreter(&'a Artifact),
    /// Another session (the CPU's, say).
    Session(Session<'a>),
}

/// The comparison of one call: `rows` ids at position `pos`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepComparison {
    pub pos: usize,
    pub rows: usize,
    pub cmp: Comparison,
}

/// Runs `prompt` (in calls of `prefill_rows`) and then `steps` greedy decode
/// tokens (chosen from `s`'s logits, fed to both) on `s` and on `reference`,
/// comparing every call's logits (all rows) under `tol`.
pub fn compare_steps(
    s: &mut Session<'_>,
    reference: &mut Reference<'_>,
    prompt: &[u32],
    prefill_rows: usize,
    steps: usize,
    tol: Tolerance,
) -> RuntimeResult<Vec<StepComparison>> {
    s.reset();
    let mut state = KvState::new();
    if let Reference::Session(r) = reference {
        r.reset();
    }
    let mut calls: Vec<Vec<u32>> = prompt.chunks(prefill_rows.max(1)).map(|c| c.to_vec()).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < calls.len() {
        let ids = calls[i].clone();
        let pos = s.pos();
        let x = [ids_input(&ids)];
        let got = logits(s.run(&x)?, ids.len())?;
        let want = match reference {
            Reference::Interpreter(art) => {
                let w = |name: &str| art.weight_array(name).ok().map(std::sync::Arc::new);
                logits(interpret_cached(&art.graph, &x, &w, &mut state)?, ids.len())?
            }
            Reference::Session(r) => logits(r.run(&x)?, ids.len())?,
        };
        out.push(StepComparison { pos, rows: ids.len(), cmp: compare(&got, &want, tol) });
        if i + 1 == calls.len() && calls.len() < prompt.len().div_ceil(prefill_rows.max(1)) + steps {
            calls.push(vec![greedy(&got)]);
        }
        i += 1;
    }
    Ok(out)
}
