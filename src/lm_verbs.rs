//! The language-model verbs: `sparsec run MODEL --prompt` (KV-cached generation,
//! streamed) and `sparsec eval MODEL --text` (perplexity), on the reference
//! interpreter.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{ArrayD, IxDyn};
use sparsec_models::checkpoint::Model;
use sparsec_runtime::interpreter::{interpret_cached, KvState};
use sparsec_runtime::lm::perplexity;
use sparsec_runtime::sampling::Sampler;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn ids_array(ids: &[u32]) -> ArrayD<f32> {
    // Token ids travel as f32 holding integers (exact below 2^24).
    ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids.iter().map(|i| *i as f32).collect()).unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])))
}

fn forward(model: &Model, ids: &[u32], state: &mut KvState) -> Result<ArrayD<f32>> {
    let w = |role: &str| model.weight(role).ok();
    let mut out = interpret_cached(&model.graph, &[ids_array(ids)], &w, state)?;
    if out.is_empty() {
        bail!("the model graph returned nothing");
    }
    Ok(out.remove(0))
}

/// A bar on a terminal, nothing when stderr is piped.
fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_message(what.to_string());
    pb
}

pub struct GenerateArgs<'a> {
    pub model: &'a str,
    pub prompt: &'a str,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub seed: u64,
    pub json: bool,
}

pub fn generate(a: GenerateArgs<'_>) -> Result<()> {
    let t0 = Instant::now();
    let model = Model::load(a.model)?;
    let tok = model.tokenizer()?;
    let prompt_ids = tok.encode(a.prompt, false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut state = KvState::new();
    let mut sampler = Sampler::new(a.temperature, a.top_k, a.seed);
    let t_prefill = Instant::now();
    let logits = forward(&model, &prompt_ids, &mut state)?;
    let vocab = logits.shape()[1];
    let last = |l: &ArrayD<f32>| -> Vec<f32> { l.iter().skip(l.len() - vocab).copied().collect() };
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let mut next = sampler.sample(&last(&logits));
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let stdout = std::io::stdout();
    if !a.json {
        print!("{}", a.prompt);
    }
    let t_decode = Instant::now();
    while generated.len() < a.max_new_tokens {
        if Some(next) == model.eos {
            break;
        }
        generated.push(next);
        let text = tok.decode(&generated, true).map_err(anyhow::Error::msg)?;
        if !a.json && text.len() > printed.len() && text.starts_with(&printed) && !text.ends_with('\u{FFFD}') {
            let mut out = stdout.lock();
            let _ = write!(out, "{}", &text[printed.len()..]);
            let _ = out.flush();
            printed = text;
        }
        if generated.len() == a.max_new_tokens {
            break;
        }
        let logits = forward(&model, &[next], &mut state)?;
        next = sampler.sample(&last(&logits));
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    let text = tok.decode(&generated, true).map_err(anyhow::Error::msg)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "prompt": a.prompt, "prompt_tokens": prompt_ids.len(), "generated_tokens": generated.len(),
                "ids": generated, "text": text, "prefill_s": prefill_s, "decode_s": decode_s,
                "load_s": t0.elapsed().as_secs_f64() - prefill_s - decode_s, "executor": "reference interpreter",
            }))?
        );
    } else {
        if text.len() > printed.len() && text.starts_with(&printed) {
            print!("{}", &text[printed.len()..]);
        }
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2} s, {} new tokens in {:.2} s ({:.2} tok/s), reference interpreter]",
            prompt_ids.len(),
            prefill_s,
            generated.len(),
            decode_s,
            generated.len() as f64 / decode_s.max(1e-9)
        );
    }
    Ok(())
}

pub fn eval(
    model: &str,
    text: &Path,
    max_tokens: usize,
    stride: Option<usize>,
    compiled: Option<&sparsec_runtime::Artifact>,
    json: bool,
) -> Result<()> {
    let model = Model::load(model)?;
    let cpu = compiled.map(sparsec_runtime::cpu::CpuExecutor::load).transpose()?;
    let executor = if compiled.is_some() { "compiled (cpu)" } else { "reference interpreter" };
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    if body.trim().is_empty() {
        bail!("{}: the text is empty", text.display());
    }
    let ids = model.tokenizer()?.encode(body.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    if ids.len() < 2 {
        bail!("{}: fewer than 2 tokens; perplexity needs at least 2", text.display());
    }
    if max_tokens < 2 {
        bail!("--max-tokens must be at least 2");
    }
    // Windows of `max_tokens`; with a stride, slide over the whole text and score
    // only the tokens a window adds (the first window scores all of its tokens).
    let windows: Vec<(usize, usize, usize)> = match stride {
        None => vec![(0, ids.len().min(max_tokens), 0)],
        Some(0) => bail!("--stride must be positive"),
        Some(s) => {
            let mut v = Vec::new();
            let mut start = 0;
            let mut scored_to: usize = 0;
            loop {
                let end = (start + max_tokens).min(ids.len());
                v.push((start, end, scored_to.saturating_sub(start)));
                scored_to = end;
                if end == ids.len() {
                    break;
                }
                start += s;
            }
            v
        }
    };
    let pb = progress(windows.len() as u64, "perplexity");
    let t = Instant::now();
    let (mut total_nll, mut count) = (0.0f64, 0usize);
    for (start, end, skip) in &windows {
        let w = &ids[*start..*end];
        let logits = match (compiled, &cpu) {
            (Some(art), Some(exec)) => exec.run(art, &[ids_array(w)])?.into_iter().next().context("no logits")?,
            _ => forward(&model, w, &mut KvState::new())?,
        };
        let vocab = logits.shape()[1];
        let flat = logits.as_slice().context("logits are not contiguous")?;
        if *skip == 0 {
            let (_, mean, n) = perplexity(&logits, w).map_err(anyhow::Error::msg)?;
            total_nll += mean * n as f64;
            count += n;
        } else {
            for t in (*skip - 1)..w.len() - 1 {
                total_nll += sparsec_runtime::lm::nll(&flat[t * vocab..(t + 1) * vocab], w[t + 1] as usize);
                count += 1;
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let ppl = (total_nll / count as f64).exp();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "perplexity": ppl, "mean_nll": total_nll / count as f64, "tokens": windows.last().map(|w| w.1).unwrap_or(0),
                "predicted": count, "windows": windows.len(), "seconds": t.elapsed().as_secs_f64(), "executor": executor,
            }))?
        );
    } else {
        println!("perplexity: {ppl:.4}");
        println!("tokens: {} ({count} predicted, {} window(s), {:.1} s, {executor})", windows.last().map(|w| w.1).unwrap_or(0), windows.len(), t.elapsed().as_secs_f64());
    }
    Ok(())
}
