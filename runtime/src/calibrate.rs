//! Calibration statistics: runs the reference interpreter over calibration
//! token sequences and accumulates, for every matmul weight, the Gram matrix
//! XᵀX of the activations it multiplies (what Wanda's input norms and
//! SparseGPT's Hessian are made of), and keeps them in a file keyed by what
//! produced them, so a second compile reuses them.
//!
//! The sequences advance in step, one *site* (an activation some measured
//! matmuls read) at a time, on all cores: each sequence runs up to the site's
//! first matmul, the Gram matrix is summed over all of them, and the caller
//! may then replace the weights of that site (sequential calibration: later
//! sites see the pruned earlier layers). Nothing past the last site runs (the
//! LM head is not computed). Matmuls sharing an input (q, k, v; gate, up)
//! share one Gram matrix.

use crate::error::{RuntimeError, RuntimeResult};
use crate::interpreter::{KvState, Stepper};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use sparsec_ir::sparse_calibrated::{lower_product, Gram, GramSum};
use sparsec_ir::{Graph, Op};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Supplies a weight's data by tensor name, from any thread.
pub type SharedWeightFn<'a> = &'a (dyn Fn(&str) -> Option<Arc<ArrayD<f32>>> + Sync);

/// New data for weights, by name.
pub type Replacements = Vec<(String, Arc<ArrayD<f32>>)>;

/// Called after each site with its weights and their Gram matrix: the data
/// those weights take from then on (none: they stay).
pub type ReplaceFn<'a> = &'a mut dyn FnMut(&[String], &Gram) -> RuntimeResult<Replacements>;

/// An activation the measured matmuls read.
struct Site {
    /// The node computing the activation.
    input: usize,
    /// The first matmul reading it.
    first: usize,
    /// The measured weights multiplying it.
    weights: Vec<String>,
}

fn sites(g: &Graph, wanted: &dyn Fn(&str) -> bool) -> Vec<Site> {
    let mut out: Vec<Site> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let (Op::MatMul { .. }, Some(x), Some(w)) = (&n.op, n.operands.first(), n.operands.get(1)) else { continue };
        let Op::Weight { name, .. } = &g.nodes[w.0].op else { continue };
        if !wanted(name) {
            continue;
        }
        match out.iter_mut().find(|s| s.input == x.0) {
            Some(s) if !s.weights.contains(name) => s.weights.push(name.clone()),
            Some(_) => {}
            None => out.push(Site { input: x.0, first: i, weights: vec![name.clone()] }),
        }
    }
    out.sort_by_key(|s| s.first);
    out
}

/// Runs `g` (a language model taking token ids) over `sequences` and returns,
/// for every matmul weight `wanted` selects, the Gram matrix of its input rows
/// (shared by the weights of one input), summed in f64 and rounded to f32.
/// After each site, `replace(weights, gram)` may return new data for weights
/// (by name), which every sequence reads from then on. `progress(done, total)`
/// counts sites. The first `skip` rows of every sequence are left out of
/// the sums (a sequence no longer than that counts whole).
#[allow(clippy::too_many_arguments)]
pub fn collect(
    g: &Graph,
    weight: SharedWeightFn<'_>,
    sequences: &[Vec<u32>],
    skip: usize,
    wanted: &dyn Fn(&str) -> bool,
    replace: ReplaceFn<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<BTreeMap<String, Arc<Gram>>> {
    let sites = sites(g, wanted);
    let inputs: Vec<[ArrayD<f32>; 1]> = sequences
        .iter()
        .map(|ids| ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids.iter().map(|&t| t as f32).collect()).map(|a| [a]))
        .collect::<Result<_, _>>()
        .map_err(|e| RuntimeError::Cpu(e.to_string()))?;
    let mut states: Vec<KvState> = sequences.iter().map(|_| KvState::new()).collect();
    let mut runs: Vec<Stepper> =
        inputs.iter().zip(states.iter_mut()).map(|(x, st)| Stepper::new(g, x, st)).collect::<RuntimeResult<_>>()?;
    // Weights replaced so far: read before the caller's data.
    let replaced: RwLock<HashMap<String, Arc<ArrayD<f32>>>> = RwLock::new(HashMap::new());
    let lookup = |name: &str| match replaced.read() {
        Ok(r) => r.get(name).cloned().or_else(|| weight(name)),
        Err(_) => None,
    };
    let mut grams: BTreeMap<String, Arc<Gram>> = BTreeMap::new();
    for (done, site) in sites.iter().enumerate() {
        let parts: Vec<(Vec<f32>, u64, usize)> = runs
            .par_iter_mut()
            .map(|run| {
                run.run_until(site.first, &lookup)?;
                let x =
                    run.value(site.input).ok_or_else(|| RuntimeError::Cpu(format!("calibration: node {} was not computed", site.input)))?;
                let k = *x.shape().last().unwrap_or(&0);
                let data = x.as_slice().ok_or_else(|| RuntimeError::Cpu("calibration: activation not contiguous".into()))?;
                if k == 0 || data.len() % k != 0 {
                    return Err(RuntimeError::Cpu(format!("calibration: the input of `{}` is not [rows, {k}]", site.weights[0])));
                }
                // Rows `skip..` of the sequence (all of them when it is that short).
                let skip = if data.len() > skip * k { skip * k } else { 0 };
                Ok((lower_product(&data[skip..], k), ((data.len() - skip) / k) as u64, k))
            })
            .collect::<RuntimeResult<_>>()?;
        let k = parts.first().map_or(0, |p| p.2);
        let mut sum = GramSum::new(k);
        for (p, rows, pk) in &parts {
            if *pk != k {
                return Err(RuntimeError::Cpu(format!("calibration: the input of `{}` changes width", site.weights[0])));
            }
            sum.add(p, *rows);
        }
        drop(parts);
        let gram = sum.finish();
        let new = replace(&site.weights, &gram)?;
        if !new.is_empty() {
            let nodes: Vec<(usize, Arc<ArrayD<f32>>)> = g
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| match &n.op {
                    Op::Weight { name, .. } => new.iter().find(|(w, _)| w == name).map(|(_, a)| (i, a.clone())),
                    _ => None,
                })
                .collect();
            for run in runs.iter_mut() {
                for (i, a) in &nodes {
                    run.replace(*i, a.clone());
                }
            }
            let mut r = replaced.write().map_err(|_| RuntimeError::Cpu("calibration: a worker panicked".into()))?;
            r.extend(new);
        }
        let gram = Arc::new(gram);
        for w in &site.weights {
            grams.insert(w.clone(), gram.clone());
        }
        progress(done + 1, sites.len());
    }
    Ok(grams)
}

/// Writes `grams` to `path`, atomically: safetensors, one f32 `[k, k]` tensor
/// per distinct Gram matrix (named after the first weight sharing it), and in
/// the metadata, for every weight, `"<tensor> <rows>"`.
pub fn save(path: &Path, grams: &BTreeMap<String, Arc<Gram>>) -> RuntimeResult<()> {
    let io = |error| RuntimeError::Io { path: path.into(), error };
    let bad = |message: String| RuntimeError::Artifact { path: path.into(), message };
    let mut tensors: Vec<(String, &Arc<Gram>)> = Vec::new();
    let mut meta: HashMap<String, String> = HashMap::new();
    for (name, g) in grams {
        let tensor = match tensors.iter().find(|(_, t)| Arc::ptr_eq(t, g)) {
            Some((t, _)) => t.clone(),
            None => {
                tensors.push((name.clone(), g));
                name.clone()
            }
        };
        meta.insert(name.clone(), format!("{tensor} {}", g.rows));
    }
    let data: Vec<(String, Vec<u8>, usize)> =
        tensors.iter().map(|(n, g)| (n.clone(), g.xtx.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(), g.k)).collect();
    let views = data
        .iter()
        .map(|(n, b, k)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*k, *k], b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let tmp = path.with_extension("partial");
    safetensors::serialize_to_file(views, &Some(meta), &tmp).map_err(|e| bad(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads what `save` wrote; `None` when the file does not exist.
pub fn load(path: &Path) -> RuntimeResult<Option<BTreeMap<String, Arc<Gram>>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |message: String| RuntimeError::Artifact { path: path.into(), message };
    let bytes = std::fs::read(path).map_err(|error| RuntimeError::Io { path: path.into(), error })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors: HashMap<String, (usize, Vec<f64>)> = HashMap::new();
    for (name, t) in st.tensors() {
        let k = t.shape().first().copied().unwrap_or(0);
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != [k, k] {
            return Err(bad(format!("`{name}` is not an f32 [k, k] Gram matrix")));
        }
        let xtx = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
        tensors.insert(name, (k, xtx));
    }
    let mut shared: HashMap<(String, u64), Arc<Gram>> = HashMap::new();
    let mut out = BTreeMap::new();
    for (weight, entry) in &meta {
        let (tensor, rows) = entry
            .split_once(' ')
            .and_then(|(t, r)| Some((t.to_string(), r.parse::<u64>().ok()?)))
            .ok_or_else(|| bad(format!("`{weight}`: metadata `{entry}` is not `<tensor> <rows>`")))?;
        let g = match shared.get(&(tensor.clone(), rows)) {
            Some(g) => g.clone(),
            None => {
                let (k, xtx) = tensors.get(&tensor).ok_or_else(|| bad(format!("`{weight}` names a missing tensor `{tensor}`")))?;
                let g = Arc::new(Gram { k: *k, xtx: xtx.clone(), rows });
                shared.insert((tensor, rows), g.clone());
                g
            }
        };
        out.insert(weight.clone(), g);
    }
    Ok(Some(out))
}
