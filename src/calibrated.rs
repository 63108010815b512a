//! Calibrated pruning of a loaded model (Wanda, SparseGPT): tokenizes the
//! plan's calibration text, collects every pruned matmul's input statistics
//! with the reference interpreter (cached per model, text and token count),
//! prunes those weights with them and hands the pruned data to the model, so
//! that compile and eval read it. Magnitude pruning of an already pruned
//! weight changes nothing, so the plan is applied downstream as usual.

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use sparsec_ir::sparse_calibrated::{prune_calibrated, Gram, Method};
use sparsec_ir::{Op, Sparsity};
use sparsec_models::checkpoint::Model;
use sparsec_passes::{layer_and_role, Plan, PruneMethod};
use sparsec_runtime::calibrate::Replacements;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Rows of one calibration sequence (each starts from position 0).
const SEQUENCE: usize = 512;

/// What calibration did, for reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CalibrationReport {
    pub texts: Vec<String>,
    pub tokens: usize,
    /// Pruned while calibrating (`[calibration] sequential`).
    pub sequential: bool,
    /// SparseGPT's dampening (`[calibration] damp`).
    pub damp: f64,
    /// The statistics came from the cache.
    pub cached: bool,
    pub collect_s: f64,
    pub prune_s: f64,
    pub weights: usize,
    /// Identifies the statistics (model, tokens, the weights they cover): part of the compile cache key.
    pub key: String,
    /// Ratios OWL gave (layer, role, ratio, value coding): `plan_overrides` makes them rules.
    pub owl: Vec<(u64, String, f32, &'static str)>,
}

/// One weight a calibrated method prunes.
struct Target {
    name: String,
    sparsity: Sparsity,
    method: PruneMethod,
    transposed: bool,
    /// How the rule stores the kept values (`values`), kept by OWL's rules.
    values: &'static str,
}

impl Target {
    /// The `[n, k]` view (outputs, reduction) of the weight's `shape`.
    fn nk(&self, shape: &[usize]) -> (usize, usize) {
        if self.transposed {
            (shape[0], shape[1])
        } else {
            (shape[1], shape[0])
        }
    }
}

fn targets(m: &Model, plan: &Plan) -> Result<Vec<Target>> {
    let g = &m.graph;
    let mut out: Vec<Target> = Vec::new();
    for n in &g.nodes {
        let (Op::MatMul { transpose_b }, Some(w)) = (&n.op, n.operands.get(1)) else { continue };
        let Op::Weight { name, .. } = &g.nodes[w.0].op else { continue };
        let (layer, role) = layer_and_role(name);
        let Some((sparsity, method)) = plan.sparsity_for(layer, &role) else { continue };
        if !method.calibrated() || out.iter().any(|t| &t.name == name) {
            continue;
        }
        // A tied weight (the embedding as the LM head) is pruned for the matmul
        // only, as a copy; calibrated pruning of that copy is not built yet.
        if g.nodes.iter().any(|u| u.operands.contains(w) && !matches!(u.op, Op::MatMul { .. })) {
            bail!(
                "`{name}` is tied (the embedding table is also the LM head): method = \"{}\" cannot prune it yet; use magnitude for it",
                method.name()
            );
        }
        let values = plan.rules.iter().rev().find(|r| r.sparsity.is_some() && r.selects(layer, &role)).map_or("f32", |r| r.values.name());
        out.push(Target { name: name.clone(), sparsity, method, transposed: *transpose_b, values });
    }
    Ok(out)
}

/// The calibration token sequences: the texts concatenated, tokenized, the
/// first `tokens` ids cut into sequences of at most `SEQUENCE` (and the context).
fn sequences(m: &Model, plan: &Plan) -> Result<(Vec<Vec<u32>>, Vec<String>, blake3::Hash)> {
    let (ids, names) = calibration_ids(m, plan)?;
    let want = plan.calibration.tokens;
    if ids.len() < want {
        bail!("the calibration text gives {} tokens, the plan asks for {want} ([calibration] tokens)", ids.len());
    }
    let len = SEQUENCE.min(usize::try_from(m.context_length()).unwrap_or(usize::MAX)).max(1);
    if plan.calibration.skip >= len {
        bail!("[calibration] skip = {} leaves nothing of the {len}-token calibration sequences", plan.calibration.skip);
    }
    let seqs: Vec<Vec<u32>> = ids[..want].chunks(len).map(|c| c.to_vec()).collect();
    let mut h = blake3::Hasher::new();
    for s in &seqs {
        for t in s {
            h.update(&t.to_le_bytes());
        }
        h.update(b"|");
    }
    Ok((seqs, names, h.finalize()))
}

/// One calibration sequence for the interpreter: the first `max` tokens of
/// the plan's texts (at most the model's context), as its input, with their
/// count and the texts' names. Gate fitting and K/V bases read it.
pub fn calibration_sequence(m: &Model, plan: &Plan, max: usize) -> Result<([ArrayD<f32>; 1], usize, Vec<String>)> {
    let (ids, names) = calibration_ids(m, plan)?;
    let n = ids.len().min(max).min(usize::try_from(m.context_length()).unwrap_or(usize::MAX));
    Ok(([ArrayD::from_shape_vec(IxDyn(&[n]), ids[..n].iter().map(|&t| t as f32).collect())?], n, names))
}

/// The graph's attention nodes, in layer order.
pub fn attention_nodes(g: &sparsec_ir::Graph) -> Vec<usize> {
    g.nodes.iter().enumerate().filter(|(_, n)| matches!(n.op, Op::Attention { .. })).map(|(i, _)| i).collect()
}

/// The plan's calibration texts, concatenated and tokenized, and their names.
pub fn calibration_ids(m: &Model, plan: &Plan) -> Result<(Vec<u32>, Vec<String>)> {
    let mut text = String::new();
    let mut names = Vec::new();
    for p in &plan.calibration.texts {
        text.push_str(&std::fs::read_to_string(p).with_context(|| format!("calibration text {}", p.display()))?);
        text.push('\n');
        names.push(p.display().to_string());
    }
    let tok = m.tokenizer().context("calibration needs the model's tokenizer")?;
    let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing the calibration text: {e}"))?;
    Ok((enc.get_ids().to_vec(), names))
}

/// Calibration statistics (the Gram matrix of the input of every weight
/// `names` lists), from the cache under `cache_dir/calibration/` when a
/// previous run collected them for the same model data (`fingerprint`),
/// calibration tokens and weights, else collected now (progress shown) and
/// stored. Pruning and low-rank factoring both read them.
pub struct Statistics {
    pub grams: BTreeMap<String, Arc<sparsec_ir::sparse_calibrated::Gram>>,
    pub texts: Vec<String>,
    pub tokens: usize,
    pub cached: bool,
    pub collect_s: f64,
    pub key: String,
}

pub fn statistics(m: &Model, fingerprint: &str, plan: &Plan, names: &[&str], cache_dir: Option<&std::path::Path>) -> Result<Statistics> {
    Ok(gather(m, fingerprint, plan, names, cache_dir, None)?.0)
}

/// `statistics`, and with `sequential` targets, each site's weights are
/// pruned as soon as its statistics are complete, so later sites measure the
/// model pruned so far. The pruning is then part of what the statistics
/// depend on, so it is in the key; pruning again from the statistics gives
/// the same weights, so a cache hit prunes after reading them. Also returns
/// the weights pruned while collecting (none on a cache hit).
fn gather(
    m: &Model,
    fingerprint: &str,
    plan: &Plan,
    names: &[&str],
    cache_dir: Option<&std::path::Path>,
    sequential: Option<&[Target]>,
) -> Result<(Statistics, Replacements)> {
    let (seqs, texts, tokens_hash) = sequences(m, plan)?;
    // The statistics cover the weights named (pruned as said): they are in the key.
    let pruning: String = sequential.map_or(String::new(), |ts| {
        let each = ts.iter().map(|t| format!("{}={:?}/{}", t.name, t.sparsity, t.method.name())).collect::<Vec<_>>().join(",");
        each + &damp_key(plan)
    });
    // Skipped rows are in the key when there are any (keys of earlier caches stay valid).
    let skip = match plan.calibration.skip {
        0 => String::new(),
        n => format!("|skip{n}"),
    };
    let key =
        blake3::hash(format!("grams-v2|{}|{}|{}|{}|{}{skip}", fingerprint, tokens_hash, SEQUENCE, names.join(","), pruning).as_bytes())
            .to_hex()
            .to_string();
    let path = cache_dir.map(|d| d.join("calibration").join(format!("{key}.safetensors")));
    let t = Instant::now();
    let cached = match &path {
        Some(p) => sparsec_runtime::calibrate::load(p)?,
        None => None,
    };
    let hit = cached.is_some();
    let mut pruned: Replacements = Vec::new();
    let grams: BTreeMap<String, _> = match cached {
        Some(g) => g,
        None => {
            let wanted = |name: &str| names.contains(&name);
            let weight = |name: &str| m.weight(name).ok();
            let mut replace = |weights: &[String], gram: &Gram| -> sparsec_runtime::RuntimeResult<Replacements> {
                let Some(ts) = sequential else { return Ok(Vec::new()) };
                let here: Vec<&Target> = ts.iter().filter(|t| weights.contains(&t.name)).collect();
                let new: Replacements = here
                    .par_iter()
                    .map(|t| {
                        Ok((
                            t.name.clone(),
                            prune_one(m, t, gram, plan.calibration.damp)
                                .map_err(|e| sparsec_runtime::RuntimeError::Cpu(format!("{e:#}")))?,
                        ))
                    })
                    .collect::<sparsec_runtime::RuntimeResult<_>>()?;
                pruned.extend(new.iter().cloned());
                Ok(new)
            };
            let bar = crate::lm_verbs::progress(names.len() as u64, "calibrating");
            let g = sparsec_runtime::calibrate::collect(
                &m.graph,
                &weight,
                &seqs,
                plan.calibration.skip,
                &wanted,
                &mut replace,
                &mut |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64)
                },
            )?;
            bar.finish_and_clear();
            if let Some(p) = &path {
                sparsec_runtime::calibrate::save(p, &g)?;
            }
            g
        }
    };
    Ok((Statistics { grams, texts, tokens: plan.calibration.tokens, cached: hit, collect_s: t.elapsed().as_secs_f64(), key }, pruned))
}

/// What SparseGPT's dampening adds to a key of pruned weights: nothing at the
/// default (so earlier keys stay valid), else `|damp=X`.
fn damp_key(plan: &Plan) -> String {
    if plan.calibration.damp == sparsec_passes::plan::DEFAULT_DAMP {
        String::new()
    } else {
        format!("|damp={}", plan.calibration.damp)
    }
}

/// `target`'s weight (as the checkpoint has it) pruned with `gram`.
fn prune_one(m: &Model, target: &Target, gram: &Gram, damp: f64) -> Result<Arc<ArrayD<f32>>> {
    let w = m.weight(&target.name)?;
    let shape = w.shape().to_vec();
    let (n, k) = target.nk(&shape);
    let method = match target.method {
        PruneMethod::Wanda => Method::Wanda,
        PruneMethod::SparseGpt => Method::SparseGpt { block: sparsec_ir::sparse_calibrated::SPARSEGPT_BLOCK, damp },
        PruneMethod::Magnitude => return Ok(w),
    };
    let mut data: Vec<f32> = w.iter().copied().collect();
    prune_calibrated(&target.sparsity, &method, &mut data, n, k, target.transposed, gram)
        .map_err(|e| anyhow::anyhow!("pruning `{}` with {}: {e}", target.name, target.method.name()))?;
    Ok(Arc::new(ArrayD::from_shape_vec(IxDyn(&shape), data)?))
}

/// Prunes every weight `plan` gives a calibrated method, in `m`. `None` when
/// the plan has none. `fingerprint` is `Model::fingerprint`, which the caller
/// also needs and computes once.
pub fn apply(m: &Model, fingerprint: &str, plan: &Plan, cache_dir: Option<&std::path::Path>) -> Result<Option<CalibrationReport>> {
    if !plan.needs_calibration() {
        return Ok(None);
    }
    let mut targets = targets(m, plan)?;
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let sequential = plan.calibration.sequential.then_some(targets.as_slice());
    let (Statistics { grams, texts, tokens, cached: hit, collect_s, key }, done) =
        gather(m, fingerprint, plan, &names, cache_dir, sequential)?;
    let sequential = sequential.is_some();
    let t = Instant::now();
    let owl = match plan.calibration.owl {
        Some(o) => allocate(m, &mut targets, &grams, o)?,
        None => Vec::new(),
    };
    // The weights, one per core (SparseGPT holds two k×k f64 matrices per
    // weight), except those sequential calibration pruned already.
    let done: BTreeMap<String, Arc<ArrayD<f32>>> = done.into_iter().collect();
    let pruned: Replacements = targets
        .par_iter()
        .map(|target| {
            if let Some(a) = done.get(&target.name) {
                return Ok((target.name.clone(), a.clone()));
            }
            let gram = grams.get(&target.name).with_context(|| format!("no calibration statistics for `{}`", target.name))?;
            Ok((target.name.clone(), prune_one(m, target, gram, plan.calibration.damp)?))
        })
        .collect::<Result<_>>()?;
    for (name, a) in pruned {
        m.set_weight(&name, a)?;
    }
    Ok(Some(CalibrationReport {
        texts,
        tokens,
        sequential,
        damp: plan.calibration.damp,
        cached: hit,
        collect_s,
        prune_s: t.elapsed().as_secs_f64(),
        weights: targets.len(),
        // What was pruned depends on SparseGPT's dampening too.
        key: key + &damp_key(plan),
        owl,
    }))
}

/// OWL: replaces the ratio of every calibrated unstructured target by its
/// layer's (`src/owl.rs`), per group of targets sharing a ratio; returns the
/// ratios given.
fn allocate(
    m: &Model,
    targets: &mut [Target],
    grams: &BTreeMap<String, Arc<Gram>>,
    owl: sparsec_passes::plan::Owl,
) -> Result<Vec<(u64, String, f32, &'static str)>> {
    let mut out = Vec::new();
    let mut bases: Vec<f32> = targets
        .iter()
        .filter_map(|t| match t.sparsity {
            Sparsity::Unstructured { ratio } => Some(ratio),
            _ => None,
        })
        .collect();
    bases.sort_by(f32::total_cmp);
    bases.dedup();
    for base in bases {
        let group: Vec<usize> =
            (0..targets.len()).filter(|&i| matches!(targets[i].sparsity, Sparsity::Unstructured { ratio } if ratio == base)).collect();
        let data: Vec<(Vec<f32>, usize, usize)> = group
            .iter()
            .map(|&i| {
                let w = m.weight(&targets[i].name)?;
                let (n, k) = targets[i].nk(w.shape());
                Ok((w.iter().copied().collect(), n, k))
            })
            .collect::<Result<_>>()?;
        let mut mats = Vec::new();
        for (&i, (w, n, k)) in group.iter().zip(&data) {
            let t = &targets[i];
            let layer = layer_and_role(&t.name).0.with_context(|| format!("OWL: `{}` belongs to no layer", t.name))?;
            let gram = grams.get(&t.name).with_context(|| format!("no calibration statistics for `{}`", t.name))?;
            mats.push(crate::owl::Scored { layer, w, n: *n, k: *k, transposed: t.transposed, gram });
        }
        let ratios = crate::owl::layer_ratios(&crate::owl::outlier_shares(&mats, owl.threshold), base, owl);
        for &i in &group {
            let (layer, role) = layer_and_role(&targets[i].name);
            let r = layer.and_then(|l| ratios.get(&l)).copied().unwrap_or(base);
            targets[i].sparsity = Sparsity::Unstructured { ratio: r };
            out.push((layer.unwrap_or(0), role, r, targets[i].values));
        }
    }
    Ok(out)
}

/// The plan rules that give every weight OWL pruned its own ratio (appended
/// to the plan, so they override the rule it came from): the compile packs
/// exactly the weights calibration pruned.
pub fn plan_overrides(r: &CalibrationReport) -> String {
    r.owl
        .iter()
        .map(|(l, role, ratio, values)| {
            format!(
                "\n[[rule]]\nlayers = \"{l}\"\ntarget = \"{role}\"\nsparsity = {{ kind = \"unstructured\", ratio = {ratio}, values = \"{values}\" }}\n"
            )
        })
        .collect()
}

/// One line saying which text calibrated and how long it took.
pub fn describe(r: &CalibrationReport) -> String {
    let owl =
        match r.owl.iter().map(|o| o.2).fold(None, |acc: Option<(f32, f32)>, v| Some(acc.map_or((v, v), |(a, b)| (a.min(v), b.max(v))))) {
            Some((lo, hi)) => format!(", OWL ratios {lo:.3}..{hi:.3}"),
            None => String::new(),
        };
    let damp = if r.damp == sparsec_passes::plan::DEFAULT_DAMP { String::new() } else { format!(", SparseGPT damp {}", r.damp) };
    format!(
        "calibrated on {} tokens of {}{}{damp} ({}: {:.1} s), pruned {} weights in {:.1} s{owl}",
        r.tokens,
        r.texts.join(" + "),
        if r.sequential { ", sequentially" } else { "" },
        if r.cached { "statistics cached" } else { "statistics collected" },
        r.collect_s,
        r.weights,
        r.prune_s
    )
}
