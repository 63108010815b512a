//! The language-model verbs: `sparsec run MODEL|ARTIFACT --prompt` (KV-cached
//! generation, streamed), `sparsec eval` (perplexity) and `sparsec bench` on a
//! language model (prefill and decode speed), on the compiled model or the
//! reference interpreter; both continue a sequence through a KV cache.
//!
//! Every verb checks its tokens against the model's limits (`LmLimits`) before
//! any work: ids inside the vocabulary (a tokenizer that does not match the
//! model), sequences inside the context. Generation refuses up front a prompt
//! plus `--max-new-tokens` longer than the context (it does not slide or
//! truncate); evaluation refuses windows longer than the context (`--stride`
//! covers a longer text with windows that fit). `Lm::forward` checks again.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{ArrayD, IxDyn};
use sparsec_models::checkpoint::Model;
use sparsec_runtime::cuda_session::SessionCapacity;
use sparsec_runtime::execute::{DeviceKind, Executor};
use sparsec_runtime::interpreter::{interpret_cached, KvState};
use sparsec_runtime::lm::{perplexity, LmLimits};
use sparsec_runtime::sampling::Sampler;
use sparsec_runtime::session::Session;
use sparsec_runtime::Artifact;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn ids_array(ids: &[u32]) -> Result<ArrayD<f32>> {
    // Token ids travel as f32 holding integers (exact below 2^24, which the
    // vocabulary check keeps them under).
    Ok(ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids.iter().map(|i| *i as f32).collect())?)
}

/// The first output of a model run, checked to be logits `[n, vocab]` for `n` ids.
fn logits_of(mut out: Vec<ArrayD<f32>>, n: usize) -> Result<ArrayD<f32>> {
    if out.is_empty() {
        bail!("the model graph returned nothing");
    }
    let l = out.remove(0);
    match l.shape() {
        [rows, vocab] if *rows == n && *vocab > 0 => Ok(l),
        s => bail!("the model returned an output of shape {s:?}, expected logits [{n}, vocab]"),
    }
}

/// A language model that continues a sequence: `forward` takes the next ids and
/// returns their logits `[n, vocab]`; `reset` starts a new sequence. Ids outside
/// the vocabulary and positions past the context are errors, checked before
/// the model runs.
pub struct Lm<'a> {
    pub limits: LmLimits,
    pub exec: LmExec<'a>,
}

pub enum LmExec<'a> {
    Interpreter { model: &'a Model, state: KvState },
    Compiled { session: Session<'a> },
}

impl Lm<'_> {
    /// Positions already in the sequence.
    pub fn pos(&self) -> usize {
        match &self.exec {
            LmExec::Interpreter { state, .. } => state.pos,
            LmExec::Compiled { session } => session.pos(),
        }
    }

    pub fn forward(&mut self, ids: &[u32]) -> Result<ArrayD<f32>> {
        self.limits.check_step(self.pos(), ids)?;
        let x = ids_array(ids)?;
        let out = match &mut self.exec {
            LmExec::Interpreter { model, state } => {
                // A weight the checkpoint does not have may come from its `init`
                // (weights a plan adds); when the run fails, the first load error
                // is reported with it, not lost behind "no data for weight".
                let failed: std::cell::RefCell<Option<sparsec_models::ModelError>> = Default::default();
                let w = |role: &str| match model.weight(role) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        failed.borrow_mut().get_or_insert(e);
                        None
                    }
                };
                match (interpret_cached(&model.graph, &[x], &w, state), failed.into_inner()) {
                    (Ok(out), _) => out,
                    (Err(e), Some(load)) => return Err(anyhow::Error::from(e).context(format!("after a weight failed to load ({load})"))),
                    (Err(e), None) => return Err(e.into()),
                }
            }
            LmExec::Compiled { session } => session.run(&[x])?,
        };
        logits_of(out, ids.len())
    }

    /// `forward`, returning only the last id's logits `[1, vocab]` (the
    /// compiled model then runs its final norm and LM head on that row only).
    pub fn forward_last(&mut self, ids: &[u32]) -> Result<ArrayD<f32>> {
        if let LmExec::Interpreter { .. } = self.exec {
            let l = self.forward(ids)?;
            let row = last_row(&l)?.into_owned();
            return Ok(ArrayD::from_shape_vec(IxDyn(&[1, row.len()]), row)?);
        }
        self.limits.check_step(self.pos(), ids)?;
        let x = ids_array(ids)?;
        let LmExec::Compiled { session } = &mut self.exec else { bail!("no compiled session") };
        logits_of(session.run_last(&[x])?, 1)
    }

    pub fn reset(&mut self) {
        match &mut self.exec {
            LmExec::Interpreter { state, .. } => *state = KvState::new(),
            LmExec::Compiled { session } => session.reset(),
        }
    }

    pub fn executor(&self) -> &'static str {
        match &self.exec {
            LmExec::Interpreter { .. } => "reference interpreter",
            LmExec::Compiled { session: Session::Cpu(_) } => "compiled (cpu)",
            LmExec::Compiled { session: Session::Cuda(_) } => "compiled (cuda)",
        }
    }
}

/// Positions a GPU session holds when the model states no context.
pub const SESSION_POSITIONS: usize = 4096;
/// Rows per GPU call: longer prefills and evaluation windows run in chunks.
pub const SESSION_SEQ: usize = 512;

/// Where a language model comes from: a checkpoint (interpreted) or an artifact
/// (compiled), with its tokenizer, end token and limits.
pub struct LmSource {
    pub model: Option<Model>,
    pub artifact: Option<(Artifact, Executor)>,
    pub tokenizer: tokenizers::Tokenizer,
    pub eos: Option<u32>,
    /// The vocabulary and context the model accepts.
    pub limits: LmLimits,
    /// Where `limits.context` comes from, for messages (`n_positions in config.json`).
    pub context_from: String,
}

impl LmSource {
    /// A checkpoint on the reference interpreter, with `plan` (its text) applied to its graph.
    pub fn model(spec: &str, plan: Option<&str>, calibration_cache: Option<&Path>) -> Result<LmSource> {
        let mut m = Model::load(spec)?;
        if let Some(text) = plan {
            // `from-weights` rules become concrete patterns per weight.
            let text = &crate::from_weights::resolve(&m, text)?;
            let mut full = text.to_string();
            let mut plan = sparsec_passes::Plan::parse(&full)?;
            // Low-rank factoring adds the factors the `low-rank` pass multiplies by.
            let fingerprint = if plan.factors() { m.fingerprint() } else { String::new() };
            if let Some(r) = crate::factor::apply(Some(&mut m), &fingerprint, Some(&plan), calibration_cache)? {
                eprintln!("{}", crate::factor::describe(&r));
            }
            // Calibrated methods prune the weights first (on the dense graph);
            // the plan then marks what the interpreter prunes by magnitude,
            // which leaves those weights as they are (with OWL's per-layer ratios).
            if plan.needs_calibration() {
                if let Some(r) = crate::calibrated::apply(&m, &m.fingerprint(), &plan, calibration_cache)? {
                    eprintln!("{}", crate::calibrated::describe(&r));
                    full += &crate::calibrated::plan_overrides(&r);
                    plan = sparsec_passes::Plan::parse(&full)?;
                }
            }
            if let Some(r) = crate::kv_basis::apply(&mut m, &plan)? {
                eprintln!("{}", crate::kv_basis::describe(&r));
            }
            if let Some(r) = crate::nsa_gates::apply(&mut m, &plan)? {
                eprintln!("{}", crate::nsa_gates::describe(&r));
                full += &crate::nsa_gates::plan_overrides(&r, &plan);
                plan = sparsec_passes::Plan::parse(&full)?;
            }
            sparsec_passes::PassManager::with_plan(Some(plan), Default::default()).run(&mut m.graph)?;
        }
        let tokenizer = m.tokenizer()?.clone();
        let eos = m.eos;
        let size =
            |v: u64, what: &str| usize::try_from(v).with_context(|| format!("{}: {what} {v} does not fit this machine", m.path.display()));
        let limits = LmLimits { vocab: size(m.vocab_size(), "vocabulary")?, context: Some(size(m.context_length(), "context")?) };
        let config = if m.path.is_dir() { m.path.join("config.json") } else { m.path.clone() };
        let context_from = format!("`{}` in {}", m.context_field(), config.display());
        Ok(LmSource { model: Some(m), artifact: None, tokenizer, eos, limits, context_from })
    }

    /// A compiled model's artifact, run on `device` (CPU `threads`).
    pub fn artifact(dir: &Path, threads: Option<usize>, device: DeviceKind) -> Result<LmSource> {
        let art = crate::open_artifact(dir)?;
        let Some(lm) = art.manifest.lm.clone() else {
            bail!("{}: this artifact is not a language model (compile a GGUF or HF checkpoint)", dir.display());
        };
        let tpath = dir.join(&lm.tokenizer);
        let tokenizer = tokenizers::Tokenizer::from_file(&tpath).map_err(|e| anyhow::anyhow!("{}: {e}", tpath.display()))?;
        // The limits come from the graph's tables (the vocabulary; GPT-2's
        // position table) and the trained context the manifest records.
        let context = lm.context.map(|c| usize::try_from(c).unwrap_or(usize::MAX));
        let tables = LmLimits::from_graph(&art.graph).with_context(|| {
            format!("{}: the artifact's graph has no embedding of a token input, so its vocabulary is unknown", dir.display())
        })?;
        // Name whichever bound binds: the position table, or the recorded context.
        let recorded_binds = context.is_some_and(|c| tables.context.is_none_or(|t| c < t));
        let context_from = if recorded_binds {
            format!("the trained context recorded in {}", dir.join(sparsec_runtime::manifest::MANIFEST_FILE).display())
        } else {
            format!("the position table of {}", dir.display())
        };
        let limits = tables.with_context(context);
        let exec = match (Executor::load(&art, device)?, threads) {
            (Executor::Cpu(e), Some(t)) => Executor::Cpu(e.with_threads(t)?),
            (e, _) => e,
        };
        Ok(LmSource { model: None, artifact: Some((art, exec)), tokenizer, eos: lm.eos, limits, context_from })
    }

    pub fn lm(&self) -> Result<Lm<'_>> {
        let exec = match (&self.artifact, &self.model) {
            (Some((art, exec)), _) => LmExec::Compiled { session: exec.session(art, self.session_capacity())? },
            (None, Some(model)) => LmExec::Interpreter { model, state: KvState::new() },
            (None, None) => bail!("no model"),
        };
        Ok(Lm { limits: self.limits, exec })
    }

    /// The rows a GPU session plans its memory for: the model's context (else
    /// `SESSION_POSITIONS`), prefill in chunks of `SESSION_SEQ` rows.
    pub fn session_capacity(&self) -> SessionCapacity {
        SessionCapacity { positions: self.limits.context.unwrap_or(SESSION_POSITIONS), seq: SESSION_SEQ }
    }

    /// `ids` (what `what` names) are all inside the vocabulary: a clear error
    /// when the tokenizer does not match the model.
    pub fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        self.limits.check_ids(ids).with_context(|| format!("{what}: the tokenizer gives an id the model does not have"))
    }

    /// `needed` positions (what `what` says needs them) fit in the context.
    pub fn check_context(&self, needed: usize, what: impl FnOnce() -> String, advice: &str) -> Result<()> {
        match self.limits.context {
            Some(c) if needed > c => {
                bail!("{}: {needed} positions exceed the model's context of {c} ({}); {advice}", what(), self.context_from)
            }
            _ => Ok(()),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec())
    }
}

/// A bar on a terminal, nothing when stderr is piped.
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_message(what.to_string());
    pb
}

/// The last row of logits `[n, vocab]` (`n` ≥ 1), borrowed when they are contiguous.
fn last_row(l: &ArrayD<f32>) -> Result<std::borrow::Cow<'_, [f32]>> {
    let (rows, vocab) = match l.shape() {
        [rows, vocab] if *rows > 0 && *vocab > 0 => (*rows, *vocab),
        s => bail!("logits of shape {s:?} have no last row"),
    };
    let start = (rows - 1) * vocab;
    Ok(match l.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(&s[start..]),
        None => std::borrow::Cow::Owned(l.iter().skip(start).copied().collect()),
    })
}

pub struct GenerateArgs<'a> {
    pub prompt: &'a str,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub seed: u64,
    pub json: bool,
}

pub fn generate(src: &LmSource, a: GenerateArgs<'_>) -> Result<()> {
    let tok = &src.tokenizer;
    let prompt_ids = src.encode(a.prompt)?;
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    // Refused up front, before any work: a prompt that does not fit, or one the
    // new tokens would push past the context (generation does not slide).
    src.check_ids(&prompt_ids, "the prompt")?;
    let n = prompt_ids.len();
    src.check_context(n, || format!("the prompt is {n} tokens"), "shorten the prompt")?;
    let total = n.saturating_add(a.max_new_tokens);
    src.check_context(
        total,
        || format!("the prompt ({n} tokens) and --max-new-tokens {}", a.max_new_tokens),
        &format!("pass --max-new-tokens {} or less, or shorten the prompt", src.limits.context.unwrap_or(0).saturating_sub(n)),
    )?;
    let mut lm = src.lm()?;
    let mut sampler = Sampler::new(a.temperature, a.top_k, a.seed);
    let t_prefill = Instant::now();
    let logits = lm.forward_last(&prompt_ids)?;
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let mut next = sampler.sample(&last_row(&logits)?);
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let stdout = std::io::stdout();
    if !a.json {
        print!("{}", a.prompt);
    }
    let t_decode = Instant::now();
    while generated.len() < a.max_new_tokens {
        if Some(next) == src.eos {
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
        let logits = lm.forward_last(&[next])?;
        next = sampler.sample(&last_row(&logits)?);
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    let text = tok.decode(&generated, true).map_err(anyhow::Error::msg)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "prompt": a.prompt, "prompt_tokens": prompt_ids.len(), "generated_tokens": generated.len(),
                "ids": generated, "text": text, "prefill_s": prefill_s, "decode_s": decode_s, "executor": lm.executor(),
            }))?
        );
    } else {
        if text.len() > printed.len() && text.starts_with(&printed) {
            print!("{}", &text[printed.len()..]);
        }
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2} s, {} new tokens in {:.2} s ({:.2} tok/s), {}]",
            prompt_ids.len(),
            prefill_s,
            generated.len(),
            decode_s,
            generated.len() as f64 / decode_s.max(1e-9),
            lm.executor()
        );
    }
    Ok(())
}

/// Perplexity of `src` on `body`, the contents of the file `text`.
pub fn eval(src: &LmSource, text: &Path, body: &str, max_tokens: usize, stride: Option<usize>, json: bool) -> Result<()> {
    let ids = src.encode(body)?;
    if ids.len() < 2 {
        bail!("{}: fewer than 2 tokens; perplexity needs at least 2", text.display());
    }
    if max_tokens < 2 {
        bail!("--max-tokens must be at least 2");
    }
    src.check_ids(&ids, &text.display().to_string())?;
    let window = ids.len().min(max_tokens);
    src.check_context(
        window,
        || format!("--max-tokens {max_tokens}: a window of {window} tokens of {}", text.display()),
        &format!("pass --max-tokens {} or less (and --stride to cover a longer text)", src.limits.context.unwrap_or(0)),
    )?;
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
    let mut lm = src.lm()?;
    let pb = progress(windows.len() as u64, "perplexity");
    let t = Instant::now();
    let (mut total_nll, mut count) = (0.0f64, 0usize);
    for (start, end, skip) in &windows {
        let w = &ids[*start..*end];
        lm.reset();
        let logits = lm.forward(w)?;
        if *skip == 0 {
            let (_, mean, n) = perplexity(&logits, w)?;
            total_nll += mean * n as f64;
            count += n;
        } else {
            // `forward` returned logits [w.len(), vocab]: row t predicts w[t + 1].
            let vocab = logits.shape()[1];
            let flat = logits.as_slice().context("logits are not contiguous")?;
            for (row, target) in flat.chunks_exact(vocab).zip(&w[1..]).skip(*skip - 1) {
                total_nll += sparsec_runtime::lm::nll(row, *target as usize)?;
                count += 1;
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let ppl = (total_nll / count as f64).exp();
    let executor = lm.executor();
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
        println!(
            "tokens: {} ({count} predicted, {} window(s), {:.1} s, {executor})",
            windows.last().map(|w| w.1).unwrap_or(0),
            windows.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Peak resident memory of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    // VmHWM is this address space's own high-water mark; getrusage's maxrss
    // survives exec, so a process started by a big parent (a Python script
    // with llama.cpp loaded) would report the parent's size.
    if let Some(kb) = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
    }) {
        return kb * 1024;
    }
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0 {
            return u.ru_maxrss as u64 * 1024;
        }
    }
    0
}

/// Prefill and decode speed of a language model: a prompt of `prompt_len`
/// tokens (the start of `text`, repeated if short), then `new_tokens` greedy
/// decode steps through the KV cache. Returns a JSON report.
pub fn bench_lm(src: &LmSource, text: &Path, prompt_len: usize, new_tokens: usize, repeat: usize) -> Result<serde_json::Value> {
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut ids = src.encode(&body)?;
    if ids.is_empty() {
        bail!("{}: no tokens", text.display());
    }
    while ids.len() < prompt_len {
        ids.extend_from_within(..ids.len().min(prompt_len - ids.len()));
    }
    ids.truncate(prompt_len.max(1));
    src.check_ids(&ids, &text.display().to_string())?;
    let needed = ids.len().saturating_add(new_tokens);
    src.check_context(
        needed,
        || format!("--prompt-len {} and --new-tokens {new_tokens}", ids.len()),
        "lower --prompt-len or --new-tokens",
    )?;
    let mut lm = src.lm()?;
    let mut greedy = Sampler::new(0.0, 0, 0);
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..repeat.max(1) {
        lm.reset();
        let t = Instant::now();
        // Like generation (and llama.cpp's), the prompt's logits are the last token's.
        let logits = lm.forward_last(&ids)?;
        prefill.push(t.elapsed().as_secs_f64());
        let mut next = greedy.sample(&last_row(&logits)?);
        // The CPU's per-kernel times cost little; the GPU's would synchronize
        // every launch, so its decode is timed whole.
        if let LmExec::Compiled { session: session @ Session::Cpu(_) } = &mut lm.exec {
            session.profile_kernels();
        }
        let t = Instant::now();
        for _ in 0..new_tokens {
            let l = lm.forward_last(&[next])?;
            next = greedy.sample(&last_row(&l)?);
        }
        decode.push(t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (p, d) = (median(&mut prefill), median(&mut decode));
    // Per kernel, the last decode round's milliseconds per token.
    let kernels: serde_json::Map<String, serde_json::Value> = match &lm.exec {
        LmExec::Compiled { session } => session
            .kernel_times()
            .into_iter()
            .map(|(k, ms, calls)| (k, serde_json::json!({ "ms_per_token": ms / new_tokens.max(1) as f64, "calls_per_token": calls as f64 / new_tokens.max(1) as f64 })))
            .collect(),
        _ => serde_json::Map::new(),
    };
    // Chunked-SVD caches: how many (chunk, KV head) factors took each rank, K and V apart.
    let mut ranks: BTreeMap<&str, BTreeMap<usize, usize>> = BTreeMap::new();
    if let LmExec::Compiled { session } = &lm.exec {
        for (name, rs) in session.chunk_ranks() {
            let role = if name.ends_with("k_cache") { "k" } else { "v" };
            for r in rs {
                *ranks.entry(role).or_default().entry(r).or_default() += 1;
            }
        }
    }
    Ok(serde_json::json!({
        "executor": lm.executor(),
        "chunk_ranks": ranks,
        "prompt_tokens": ids.len(), "new_tokens": new_tokens, "repeat": repeat.max(1),
        "prefill_s": p, "prefill_tokens_per_s": ids.len() as f64 / p,
        "decode_s": d, "decode_tokens_per_s": new_tokens as f64 / d.max(1e-12),
        "peak_rss_bytes": peak_rss_bytes(),
        "decode_kernels": kernels,
    }))
}
