//! Calibration statistics: runs the reference interpreter over calibration
//! token sequences and accumulates, for every matmul weight, the Gram matrix
//! XᵀX of the activations it multiplies (what Wanda's input norms and
//! SparseGPT's Hessian are made of), and keeps them in a file keyed by what
//! produced them, so a second compile reuses them.

use crate::error::{RuntimeError, RuntimeResult};
use crate::interpreter::{interpret_observed, KvState, WeightFn};
use ndarray::{ArrayD, IxDyn};
use sparsec_ir::sparse_calibrated::Gram;
use sparsec_ir::{Graph, Op};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The weights whose inputs `collect` measures: weight tensor name → the
/// matmul nodes that multiply by it.
fn weight_matmuls(g: &Graph, wanted: &dyn Fn(&str) -> bool) -> HashMap<usize, String> {
    let mut out = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if let (Op::MatMul { .. }, Some(w)) = (&n.op, n.operands.get(1)) {
            if let Op::Weight { name, .. } = &g.nodes[w.0].op {
                if wanted(name) {
                    out.insert(i, name.clone());
                }
            }
        }
    }
    out
}

/// Runs `g` (a language model taking token ids) over each of `sequences` and
/// returns, for every matmul weight `wanted` selects, the Gram matrix of its
/// input rows. Matmuls that share an input (q, k and v) share its product.
/// `progress(done, total)` is called after each sequence.
pub fn collect(
    g: &Graph,
    weight: WeightFn<'_>,
    sequences: &[Vec<u32>],
    wanted: &dyn Fn(&str) -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<BTreeMap<String, Gram>> {
    let targets = weight_matmuls(g, wanted);
    let mut grams: BTreeMap<String, Gram> = BTreeMap::new();
    let mut failure: Option<String> = None;
    for (s, ids) in sequences.iter().enumerate() {
        let input = ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids.iter().map(|&t| t as f32).collect())
            .map_err(|e| RuntimeError::Cpu(e.to_string()))?;
        // One product per distinct input node per sequence.
        let mut products: HashMap<usize, ndarray::Array2<f32>> = HashMap::new();
        let mut observe = |node: usize, x: &ArrayD<f32>| {
            let Some(name) = targets.get(&node) else { return };
            let input_node = g.nodes[node].operands[0].0;
            let k = *x.shape().last().unwrap_or(&0);
            let xtx = products.entry(input_node).or_insert_with(|| match x.view().into_shape_with_order((x.len() / k.max(1), k)) {
                Ok(x2) => x2.t().dot(&x2),
                Err(_) => ndarray::Array2::zeros((0, 0)),
            });
            if xtx.dim() != (k, k) {
                failure.get_or_insert_with(|| format!("matmul input of `{name}` is not [rows, {k}]"));
                return;
            }
            let rows = (x.len() / k.max(1)) as u64;
            let acc = grams.entry(name.clone()).or_insert_with(|| Gram { k, xtx: vec![0.0; k * k], rows: 0 });
            if acc.k != k {
                failure.get_or_insert_with(|| format!("`{name}` multiplies inputs of widths {} and {k}", acc.k));
                return;
            }
            for (a, b) in acc.xtx.iter_mut().zip(xtx.iter()) {
                *a += *b as f64;
            }
            acc.rows += rows;
        };
        interpret_observed(g, &[input], weight, &mut KvState::new(), &mut observe)?;
        if let Some(f) = failure {
            return Err(RuntimeError::Cpu(format!("calibration: {f}")));
        }
        progress(s + 1, sequences.len());
    }
    Ok(grams)
}

/// Writes `grams` to `path` (safetensors, one f32 `[k, k]` tensor per weight and
/// its row count in the metadata), atomically.
pub fn save(path: &Path, grams: &BTreeMap<String, Gram>) -> RuntimeResult<()> {
    let io = |error| RuntimeError::Io { path: path.into(), error };
    let data: Vec<(String, Vec<u8>, usize)> =
        grams.iter().map(|(n, g)| (n.clone(), g.xtx.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(), g.k)).collect();
    let views = data
        .iter()
        .map(|(n, b, k)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*k, *k], b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RuntimeError::Artifact { path: path.into(), message: e.to_string() })?;
    let meta: HashMap<String, String> = grams.iter().map(|(n, g)| (n.clone(), g.rows.to_string())).collect();
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let tmp = path.with_extension("partial");
    safetensors::serialize_to_file(views, &Some(meta), &tmp)
        .map_err(|e| RuntimeError::Artifact { path: path.into(), message: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads what `save` wrote; `None` when the file does not exist.
pub fn load(path: &Path) -> RuntimeResult<Option<BTreeMap<String, Gram>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |message: String| RuntimeError::Artifact { path: path.into(), message };
    let bytes = std::fs::read(path).map_err(|error| RuntimeError::Io { path: path.into(), error })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let rows = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let k = t.shape().first().copied().unwrap_or(0);
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != [k, k] {
            return Err(bad(format!("`{name}` is not an f32 [k, k] Gram matrix")));
        }
        let xtx = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
        let rows = rows.get(&name).and_then(|r| r.parse().ok()).ok_or_else(|| bad(format!("`{name}` has no row count")))?;
        out.insert(name, Gram { k, xtx, rows });
    }
    Ok(Some(out))
}
