//! Where a gated NSA's gate comes from, before the compile: `gate =
//! "fitted"` fits constant branch weights per head on the calibration text,
//! and `adapters = "FILE"` loads trained gate and compression weights into the
//! model (layout: `docs/nsa-adapters.md`).
//!
//! The fit, per layer and head: the dense model runs (the interpreter) over
//! one sequence of calibration tokens; at the layer's attention, for sampled
//! query rows at or past the window, the three branch outputs `y_c, y_s, y_w`
//! (`sparsec_ir::reference::nsa_branches`) and full attention's output `o`
//! are taken, and the weights `g` minimizing Σ‖g_c·y_c + g_s·y_s + g_w·y_w −
//! o‖² solve the 3×3 normal equations (with a ridge of 1e-6 of their mean
//! diagonal). Every layer sees the dense model's activations (teacher
//! forcing), not those of the layers gated before it.

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use sparsec_ir::{NativeSparse, Op};
use sparsec_models::checkpoint::Model;
use sparsec_passes::{NsaGatePlan, Plan};
use std::sync::Arc;
use std::time::Instant;

/// The most calibration tokens the fit runs over (one sequence).
const FIT_TOKENS: usize = 2048;
/// Every how many query rows past the window the fit samples.
const FIT_STRIDE: usize = 4;

/// What `apply` did, for the report.
pub struct NsaGateReport {
    /// Layers whose gates were fitted, with the relative residual of the fit
    /// (Σ‖mix − o‖² / Σ‖o‖²) and the weights (3 per head).
    pub fitted: Vec<(u64, f64, Vec<f32>)>,
    /// Rows the fit sampled per layer, and the text it ran over.
    pub rows: usize,
    pub texts: Vec<String>,
    pub fit_s: f64,
    /// Layers given adapters, and the file.
    pub adapters: Vec<(u64, String)>,
    /// blake3 of the adapter files' bytes (part of the compile cache key).
    pub adapters_key: String,
}

/// Fits the gates `gate = "fitted"` asks for and loads the adapters
/// `adapters` names (into `m`); `None` when the plan asks for neither.
pub fn apply(m: &mut Model, plan: &Plan) -> Result<Option<NsaGateReport>> {
    let atts = crate::calibrated::attention_nodes(&m.graph);
    let mut report =
        NsaGateReport { fitted: Vec::new(), rows: 0, texts: Vec::new(), fit_s: 0.0, adapters: Vec::new(), adapters_key: String::new() };
    let mut key = blake3::Hasher::new();
    // The last rule naming a layer decides it (later rules override earlier ones).
    let mut fit: Vec<(u64, NativeSparse)> = Vec::new();
    for (layer, _) in atts.iter().enumerate() {
        let l = layer as u64;
        let Some(rule) = plan.rules.iter().rev().find(|r| r.nsa.is_some() && r.layers.contains(l)) else { continue };
        let Some(nsa) = rule.nsa else { continue };
        match &rule.nsa_gate {
            NsaGatePlan::Fitted => fit.push((l, nsa)),
            NsaGatePlan::Adapters(path) => {
                key.update(&load_adapters(m, path, l, &nsa, atts[layer])?);
                report.adapters.push((l, path.display().to_string()));
            }
            NsaGatePlan::Joint | NsaGatePlan::Values(_) => {}
        }
    }
    if fit.is_empty() && report.adapters.is_empty() {
        return Ok(None);
    }
    report.adapters_key = key.finalize().to_hex().to_string();
    if !fit.is_empty() {
        let t = Instant::now();
        let (input, n, texts) = crate::calibrated::calibration_sequence(m, plan, FIT_TOKENS)?;
        let widest = fit.iter().map(|(_, s)| (s.window + 2 * s.block) as usize).max().unwrap_or(0);
        if n <= widest {
            bail!("fitting NSA gates needs more than {widest} calibration tokens past which the branches differ; the text gives {n}");
        }
        report.texts = texts;
        let mut state = sparsec_runtime::interpreter::KvState::new();
        let weight = |name: &str| m.weight(name).ok();
        let mut run = sparsec_runtime::interpreter::Stepper::new(&m.graph, &input, &mut state)?;
        let bar = crate::lm_verbs::progress(fit.len() as u64, "fitting NSA gates");
        for (done, (layer, nsa)) in fit.iter().enumerate() {
            let node = atts[*layer as usize];
            run.run_until(node, &weight)?;
            let n_op = &m.graph.nodes[node];
            let Op::Attention { heads, kv_heads } = n_op.op else { continue };
            let get = |k: usize| -> Result<Arc<ArrayD<f32>>> {
                run.value(n_op.operands[k].0).cloned().context("the fit's attention operands were not computed")
            };
            let (q, k, v) = (get(0)?, get(1)?, get(2)?);
            let flat = |a: &ArrayD<f32>| a.iter().copied().collect::<Vec<f32>>();
            let (q, k, v) = (flat(&q), flat(&k), flat(&v));
            let (h, kvh) = (heads as usize, kv_heads as usize);
            let d = q.len() / n / h;
            let rows: Vec<usize> = (nsa.block as usize..n).step_by(FIT_STRIDE).collect();
            report.rows = rows.len();
            let (g, residual) = fit_layer(nsa, (h, kvh, d), (&q, &k, &v), &rows);
            report.fitted.push((*layer, residual, g));
            bar.set_position(done as u64 + 1);
        }
        bar.finish_and_clear();
        report.fit_s = t.elapsed().as_secs_f64();
    }
    Ok(Some(report))
}

/// Per head, the normal equations' matrix and right side summed over rows,
/// and Σ‖o‖².
type Normal = (Vec<[[f64; 3]; 3]>, Vec<[f64; 3]>, f64);

/// The least-squares gate weights of one layer (3 per head) and the fit's
/// relative residual.
fn fit_layer(
    nsa: &NativeSparse,
    (h, kvh, d): (usize, usize, usize),
    (q, k, v): (&[f32], &[f32], &[f32]),
    rows: &[usize],
) -> (Vec<f32>, f64) {
    let group = h / kvh;
    let qw = h * d;
    let kvw = kvh * d;
    // Per chunk of rows (in parallel): the branches and full attention's output.
    let parts: Vec<Normal> = rows
        .par_chunks(16)
        .map(|chunk| {
            let ys = sparsec_ir::reference::nsa_branches(nsa, (h, kvh, d), q, k, v, None, 0, chunk);
            let mut gram = vec![[[0f64; 3]; 3]; h];
            let mut rhs = vec![[0f64; 3]; h];
            let mut norm = 0f64;
            for (ri, &r) in chunk.iter().enumerate() {
                for head in 0..h {
                    let kh = head / group;
                    let qh = &q[r * qw + head * d..r * qw + (head + 1) * d];
                    // Full causal attention, in f64.
                    let scale = 1.0 / (d as f64).sqrt();
                    let sc: Vec<f64> = (0..=r)
                        .map(|j| {
                            qh.iter().zip(&k[j * kvw + kh * d..j * kvw + (kh + 1) * d]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    let mut o = vec![0f64; d];
                    for (j, pj) in p.iter().enumerate() {
                        for (c, oc) in o.iter_mut().enumerate() {
                            *oc += pj / z * v[j * kvw + kh * d + c] as f64;
                        }
                    }
                    let y = &ys[(ri * h + head) * 3 * d..(ri * h + head + 1) * 3 * d];
                    for a in 0..3 {
                        for b in 0..3 {
                            gram[head][a][b] += (0..d).map(|c| y[a * d + c] * y[b * d + c]).sum::<f64>();
                        }
                        rhs[head][a] += (0..d).map(|c| y[a * d + c] * o[c]).sum::<f64>();
                    }
                    norm += o.iter().map(|x| x * x).sum::<f64>();
                }
            }
            (gram, rhs, norm)
        })
        .collect();
    let mut gram = vec![[[0f64; 3]; 3]; h];
    let mut rhs = vec![[0f64; 3]; h];
    let mut norm = 0f64;
    for (g, r, n) in parts {
        for head in 0..h {
            for a in 0..3 {
                rhs[head][a] += r[head][a];
                for b in 0..3 {
                    gram[head][a][b] += g[head][a][b];
                }
            }
        }
        norm += n;
    }
    let mut weights = Vec::with_capacity(3 * h);
    let mut resid = 0f64;
    for head in 0..h {
        let g = solve3(gram[head], rhs[head]);
        // ‖Yg − o‖² = gᵀGg − 2gᵀr + ‖o‖² summed; the ‖o‖² part is in `norm`.
        let gg: f64 = (0..3).map(|a| (0..3).map(|b| g[a] * gram[head][a][b] * g[b]).sum::<f64>()).sum();
        let gr: f64 = (0..3).map(|a| g[a] * rhs[head][a]).sum();
        resid += gg - 2.0 * gr;
        weights.extend(g.iter().map(|&x| x as f32));
    }
    (weights, ((resid + norm) / norm.max(f64::MIN_POSITIVE)).max(0.0))
}

/// The solution of (G + λI)·x = r for a symmetric positive semidefinite 3×3
/// `G`, λ = 1e-6 of its mean diagonal (Gaussian elimination with pivoting).
fn solve3(mut g: [[f64; 3]; 3], mut r: [f64; 3]) -> [f64; 3] {
    let ridge = 1e-6 * (g[0][0] + g[1][1] + g[2][2]) / 3.0;
    for (a, row) in g.iter_mut().enumerate() {
        row[a] += ridge.max(f64::MIN_POSITIVE);
    }
    for col in 0..3 {
        let p = (col..3).max_by(|&a, &b| g[a][col].abs().total_cmp(&g[b][col].abs())).unwrap_or(col);
        g.swap(col, p);
        r.swap(col, p);
        for row in col + 1..3 {
            let f = g[row][col] / g[col][col];
            let pivot = g[col];
            for (x, p) in g[row].iter_mut().zip(pivot).skip(col) {
                *x -= f * p;
            }
            r[row] -= f * r[col];
        }
    }
    let mut x = [0f64; 3];
    for row in (0..3).rev() {
        let s: f64 = (row + 1..3).map(|c| g[row][c] * x[c]).sum();
        x[row] = (r[row] - s) / g[row][row];
    }
    x
}

/// Loads layer `layer`'s adapters from the safetensors file `path` into `m`
/// as the weights the plan's gate and compression read
/// (`sparsec_passes::nsa_adapter_names`), checking every shape; returns the
/// blake3 of the file.
fn load_adapters(m: &mut Model, path: &std::path::Path, layer: u64, nsa: &NativeSparse, att: usize) -> Result<[u8; 32]> {
    let bytes = std::fs::read(path).with_context(|| format!("NSA adapters {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("NSA adapters {}: not safetensors", path.display()))?;
    let Op::Attention { heads, kv_heads } = m.graph.nodes[att].op else { bail!("layer {layer} has no attention") };
    let (h, kvh) = (heads as usize, kv_heads as usize);
    let Some((_, dm, qw)) = sparsec_passes::attention_input(&m.graph, att) else {
        bail!("layer {layer}: adapters need q to be a projection of the layer input by a weight of fixed shape")
    };
    let d = qw as usize / h;
    let dm = dm as usize;
    let block = nsa.block as usize;
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let full = format!("layers.{layer}.nsa.{name}");
        let t = st.tensor(&full).with_context(|| format!("NSA adapters {}: no tensor `{full}`", path.display()))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
            bail!("NSA adapters {}: `{full}` is {:?} {:?}, expected F32 {shape:?}", path.display(), t.dtype(), t.shape());
        }
        Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let gate = tensor("gate.weight", &[3 * h, dm])?;
    let gate_bias = tensor("gate.bias", &[3 * h])?;
    let words = sparsec_ir::NsaCompress::linear_words(block as u64, d as u64) as usize;
    let mut packed = vec![0f32; 2 * kvh * words];
    for (which, name) in ["compress_k", "compress_v"].iter().enumerate() {
        let pos = tensor(&format!("{name}.pos"), &[kvh, block])?;
        let bias = tensor(&format!("{name}.bias"), &[kvh, d])?;
        let map = tensor(&format!("{name}.weight"), &[kvh, d, d])?;
        for kh in 0..kvh {
            let row = &mut packed[(which * kvh + kh) * words..(which * kvh + kh + 1) * words];
            row[..block].copy_from_slice(&pos[kh * block..(kh + 1) * block]);
            row[block..block + d].copy_from_slice(&bias[kh * d..(kh + 1) * d]);
            row[block + d..].copy_from_slice(&map[kh * d * d..(kh + 1) * d * d]);
        }
    }
    let [gw, gb, cw] = sparsec_passes::nsa_adapter_names(layer);
    let arr = |shape: &[usize], v: Vec<f32>| -> Result<Arc<ArrayD<f32>>> { Ok(Arc::new(ArrayD::from_shape_vec(IxDyn(shape), v)?)) };
    m.add_weight(&gw, arr(&[3 * h, dm], gate)?)?;
    m.add_weight(&gb, arr(&[3 * h], gate_bias)?)?;
    m.add_weight(&cw, arr(&[2 * kvh, words], packed)?)?;
    Ok(*blake3::hash(&bytes).as_bytes())
}

/// Plan rules giving each fitted layer its weights (later rules override the
/// `gate = "fitted"` rule).
pub fn plan_overrides(r: &NsaGateReport, plan: &Plan) -> String {
    let mut out = String::new();
    for (layer, _, g) in &r.fitted {
        let Some(nsa) = plan.rules.iter().rev().find(|x| x.nsa.is_some() && x.layers.contains(*layer)).and_then(|x| x.nsa) else {
            continue;
        };
        let w: Vec<String> = g.iter().map(|x| format!("{x:e}")).collect();
        out += &format!(
            "\n[[rule]]\nlayers = \"{layer}\"\nattention = {{ nsa = {{ block = {}, top_n = {}, window = {}, sinks = {}, score = \"{}\", gate = [{}] }} }}\n",
            nsa.block,
            nsa.top_n,
            nsa.window,
            nsa.sinks,
            nsa.score.name(),
            w.join(", ")
        );
    }
    out
}

/// One line per fit, for the compile's report.
pub fn describe(r: &NsaGateReport) -> String {
    let mut s = String::new();
    if !r.fitted.is_empty() {
        let worst = r.fitted.iter().map(|f| f.1).fold(0f64, f64::max);
        let mean = r.fitted.iter().map(|f| f.1).sum::<f64>() / r.fitted.len() as f64;
        s += &format!(
            "nsa gates: fitted on {} ({} rows per layer) for {} layers in {:.1} s; relative residual mean {mean:.4}, worst {worst:.4}",
            r.texts.join(" + "),
            r.rows,
            r.fitted.len(),
            r.fit_s
        );
    }
    if !r.adapters.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s += &format!("nsa adapters: {} layers from {}", r.adapters.len(), r.adapters[0].1);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn a_window_that_covers_every_key_is_fitted_as_full_attention() {
        // Every row's window holds all its keys: the window branch is full
        // attention, the selected one is empty, so the fit is (0, 0, 1) per
        // head with no residual.
        let (h, kvh, d, n) = (4, 2, 8, 96);
        let nsa = NativeSparse { window: 128, block: 8, top_n: 2, sinks: 0, ..sparsec_passes::plan::NSA_DEFAULT };
        let (q, k, v) = (values(n * h * d, 1), values(n * kvh * d, 2), values(n * kvh * d, 3));
        let rows: Vec<usize> = (8..n).step_by(3).collect();
        let (g, residual) = fit_layer(&nsa, (h, kvh, d), (&q, &k, &v), &rows);
        assert!(residual < 1e-9, "residual {residual}");
        for head in g.chunks(3) {
            assert!(head[0].abs() < 1e-4 && head[1].abs() < 1e-4 && (head[2] - 1.0).abs() < 1e-4, "{head:?}");
        }
    }

    #[test]
    fn the_normal_equations_are_solved() {
        let g = [[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]];
        let want = [0.3, -1.2, 2.5];
        let r = [0, 1, 2].map(|a| (0..3).map(|b| g[a][b] * want[b]).sum::<f64>());
        let x = solve3(g, r);
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{x:?}");
        }
    }
}
