//! `sparsec export`: writes what sparsec made as a Hugging Face safetensors
//! directory (config.json, model.safetensors, tokenizer.json), dense f32 with
//! the zeros in place, under HF's tensor names and layout (the inverse of
//! loading: `checkpoint::hf_tensors`), so other tools can evaluate it.
//!
//! From a model and a plan the weights are pruned as compile prunes them:
//! `from-weights` resolved, calibrated methods first (`calibrated::apply`),
//! then the magnitude pruning of every `#sparsity` the plan attaches, kept
//! values quantized and dequantized where `#values` says
//! (`sparse::PrunedWeight::materialize`, what the compiler and the interpreter call).
//! From an artifact its stored weights are unpacked (`Artifact::weight_array`:
//! sparse formats unpacked, quantized blocks dequantized); its source model
//! (the manifest's `lm.source`) gives the config. A pruned copy of a tied LM
//! head becomes Llama's own `lm_head.weight` (`tie_word_embeddings = false`);
//! GPT-2 cannot untie it and is refused. Patterns that are not weight
//! sparsity (windows, low rank, ...) change more than the weights and are
//! refused: the directory would not compute what sparsec compiled.

use crate::cli::ExportArgs;
use anyhow::{bail, Context, Result};
use sparsec_ir::{Op, Pattern};
use sparsec_models::checkpoint::{hf_tensors, Family, Model};
use sparsec_passes::{PassManager, Plan};
use std::collections::BTreeMap;
use std::path::Path;

/// The weight name of a tied LM head's pruned copy (`graph::weight_buffer_name`).
const PRUNED_HEAD: &str = "embed.pruned";

/// Weight data by name, as the graph has it.
type Weights = BTreeMap<String, Vec<f32>>;

pub fn cmd_export(a: ExportArgs) -> Result<()> {
    if a.output.exists() {
        bail!("{}: already exists; export writes a new directory", a.output.display());
    }
    let (source, family, weights, tokenizer) = if crate::is_artifact(&a.input) {
        if a.plan.is_some() || a.preset.is_some() {
            bail!("{}: an artifact's plan is already applied; export it without --plan/--preset", a.input.display());
        }
        from_artifact(&a.input)?
    } else {
        from_model(&a)?
    };
    let summary = write_dir(&a.output, &source, family, weights, tokenizer)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "exported {} -> {} ({} tensors, {:.1} MB f32, {} of {} matrix entries zero{})",
            a.input.display(),
            a.output.display(),
            summary["tensors"],
            summary["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            summary["zeros"],
            summary["matrix_entries"],
            if summary["untied_lm_head"].as_bool() == Some(true) { "; the pruned LM head written untied" } else { "" }
        );
    }
    Ok(())
}

/// The model with the plan's pruning applied: (its loaded self, weights by role
/// and the pruned head copy, tokenizer JSON).
fn from_model(a: &ExportArgs) -> Result<(Model, Family, Weights, Option<String>)> {
    let spec = a.input.to_string_lossy().into_owned();
    let m = Model::load(&spec).with_context(|| format!("{}: export reads a model (GGUF, HF directory, smollm2) or an artifact", spec))?;
    let text = crate::plan_text_of(a.plan.as_deref(), a.preset.as_deref())?;
    let mut weights = Weights::new();
    if let Some(text) = text {
        let text = crate::from_weights::resolve(&m, &text)?;
        let plan = Plan::parse(&text)?;
        let cache = (!a.no_cache).then(|| a.cache_dir.clone().unwrap_or_else(sparsec_compiler::Cache::default_location));
        if plan.needs_calibration() {
            if let Some(r) = crate::calibrated::apply(&m, &m.fingerprint(), &plan, cache.as_deref())? {
                eprintln!("{}", crate::calibrated::describe(&r));
            }
        }
        let mut g = m.graph.clone();
        PassManager::with_plan(Some(plan), Default::default()).run(&mut g)?;
        for n in &g.nodes {
            if let Some(p) = n.patterns.iter().find(|p| !matches!(p, Pattern::Sparsity(_) | Pattern::Specialize(_) | Pattern::Values(_))) {
                bail!(
                    "the plan gives `%{}` #{}: export writes dense weights, which carry weight sparsity and values only (this pattern would be lost)",
                    n.name,
                    p.keyword()
                );
            }
        }
        for (node, pw) in sparsec_ir::sparse::pruned_weights(&g) {
            let Op::Weight { name, .. } = &g.nodes[node].op else { continue };
            let key = sparsec_ir::graph::weight_buffer_name(&g, node).unwrap_or_else(|| name.clone());
            let mut data: Vec<f32> = m.weight(name)?.iter().copied().collect();
            pw.materialize(&mut data);
            weights.insert(key, data);
        }
    }
    let tokenizer = m.tokenizer.as_ref().map(|t| t.to_string(false).map_err(anyhow::Error::msg)).transpose()?;
    let family = m.family.clone();
    Ok((m, family, weights, tokenizer))
}

/// An artifact's weights as stored, unpacked; its source model for the config.
fn from_artifact(dir: &Path) -> Result<(Model, Family, Weights, Option<String>)> {
    let art = crate::open_artifact(dir)?;
    let Some(lm) = art.manifest.lm.clone() else {
        bail!("{}: not the artifact of a language model (export needs a model's config)", dir.display());
    };
    let m = Model::load(&lm.source).with_context(|| {
        format!("{}: its source model `{}` (the manifest's lm.source) gives the config, and it cannot be loaded", dir.display(), lm.source)
    })?;
    let mut weights = Weights::new();
    for b in &art.manifest.execution.buffers {
        if b.kind == sparsec_runtime::manifest::BufferKind::Weight {
            let a = art.weight_array(&b.name).with_context(|| format!("{}: weight `{}`", dir.display(), b.name))?;
            weights.insert(b.name.clone(), a.iter().copied().collect());
        }
    }
    let tpath = dir.join(&lm.tokenizer);
    let tokenizer = std::fs::read_to_string(&tpath).with_context(|| format!("reading {}", tpath.display()))?;
    let family = m.family.clone();
    Ok((m, family, weights, Some(tokenizer)))
}

/// `config.json`: the source's own when it is an HF directory (fields sparsec
/// does not model kept), with every field sparsec reads set from `family`, and
/// what transformers needs to pick the class (`architectures`, `model_type`).
fn config_json(m: &Model, family: &Family) -> Result<serde_json::Value> {
    let mut c = match m.path.join("config.json") {
        p if m.path.is_dir() && p.is_file() => serde_json::from_str(&std::fs::read_to_string(&p)?)?,
        _ => serde_json::json!({}),
    };
    let Some(o) = c.as_object_mut() else { bail!("{}: config.json is not an object", m.path.display()) };
    let fields = match family {
        Family::Llama(l) => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": l.vocab, "hidden_size": l.dim, "intermediate_size": l.ffn,
            "num_hidden_layers": l.layers, "num_attention_heads": l.heads, "num_key_value_heads": l.kv_heads,
            "head_dim": l.head_dim(), "max_position_embeddings": l.context, "rms_norm_eps": l.rms_eps,
            "rope_theta": l.rope_theta, "hidden_act": "silu", "tie_word_embeddings": l.tied,
            "attention_bias": false, "mlp_bias": false,
        }),
        Family::Gpt2(g) => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": g.vocab, "n_positions": g.positions, "n_ctx": g.positions, "n_embd": g.dim,
            "n_layer": g.layers, "n_head": g.heads, "layer_norm_epsilon": g.eps,
            "activation_function": o.get("activation_function").cloned().unwrap_or("gelu_new".into()),
            "tie_word_embeddings": true,
        }),
    };
    if let Some(f) = fields.as_object() {
        o.extend(f.clone());
    }
    // transformers 5 reads `rope_parameters` before `rope_theta`: keep them equal.
    if let (Family::Llama(l), Some(r)) = (family, o.get_mut("rope_parameters").and_then(|r| r.as_object_mut())) {
        r.insert("rope_theta".into(), l.rope_theta.into());
    }
    o.insert("torch_dtype".into(), "float32".into());
    if let Some(e) = m.eos {
        o.insert("eos_token_id".into(), e.into());
    }
    Ok(c)
}

/// Writes the directory (staged beside it, then renamed into place) and
/// returns a summary.
fn write_dir(out: &Path, m: &Model, mut family: Family, mut weights: Weights, tokenizer: Option<String>) -> Result<serde_json::Value> {
    // A pruned tied head: Llama unties it; GPT-2 has no separate head.
    let head = weights.remove(PRUNED_HEAD);
    if head.is_some() {
        match &mut family {
            Family::Llama(l) => l.tied = false,
            Family::Gpt2(_) => {
                bail!("the plan prunes GPT-2's LM head, which is the embedding table; GPT-2 checkpoints cannot hold a separate head")
            }
        }
    }
    let mut role = |r: &str| -> Result<Vec<f32>, sparsec_models::ModelError> {
        match (r, &head, weights.remove(r)) {
            ("lm_head", Some(h), _) => Ok(h.clone()),
            (_, _, Some(w)) => Ok(w),
            _ => m.weight(r).map(|a| a.iter().copied().collect()),
        }
    };
    let tensors = hf_tensors(&family, &mut role)?;
    let config = config_json(m, &family)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let stage = tempfile::Builder::new().prefix(".sparsec-export").tempdir_in(parent)?;
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // transformers reads a safetensors file only when its metadata says the format.
    let meta = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, &meta, &stage.path().join("model.safetensors"))?;
    std::fs::write(stage.path().join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    if let Some(t) = &tokenizer {
        std::fs::write(stage.path().join("tokenizer.json"), t)?;
    }
    let staged = stage.keep();
    if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e).with_context(|| format!("moving the export into {}", out.display()));
    }
    let matrices = tensors.iter().filter(|(_, s, _)| s.len() == 2);
    let (zeros, entries) = matrices.fold((0usize, 0usize), |(z, e), (_, _, d)| (z + d.iter().filter(|x| **x == 0.0).count(), e + d.len()));
    Ok(serde_json::json!({
        "output": out, "tensors": tensors.len(), "bytes": bytes.iter().map(Vec::len).sum::<usize>(),
        "zeros": zeros, "matrix_entries": entries, "untied_lm_head": head.is_some(),
        "model_type": config["model_type"],
    }))
}
