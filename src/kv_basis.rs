//! The feature-axis bases of `kv = { transform = ... }` rules, before the
//! compile: per layer, the DCT-II or PSWF basis (fixed), or PCA of the
//! layer's keys and values on the calibration text (the dense model run by
//! the interpreter over one sequence), made into the block-diagonal weights
//! the `apply-plan` pass multiplies by (`sparsec_passes::kv_basis_names`).

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use sparsec_ir::kv_basis;
use sparsec_ir::Op;
use sparsec_models::checkpoint::Model;
use sparsec_passes::{KvPlan, KvTransform, Plan};
use std::sync::Arc;
use std::time::Instant;

/// The most calibration tokens PCA runs over (one sequence).
const PCA_TOKENS: usize = 2048;

/// What `apply` did, for the report.
pub struct KvBasisReport {
    /// Per layer: the transform, the kept columns of the head width.
    pub layers: Vec<(u64, &'static str, u64, u64)>,
    pub seconds: f64,
    /// blake3 of every basis weight (part of the compile cache key).
    pub key: String,
}

/// Adds the basis weights of every layer a `kv` rule selects to `m`;
/// `None` when no rule has `kv`.
pub fn apply(m: &mut Model, plan: &Plan) -> Result<Option<KvBasisReport>> {
    if !plan.kv_bases() {
        return Ok(None);
    }
    let t = Instant::now();
    let atts = crate::calibrated::attention_nodes(&m.graph);
    let mut chosen: Vec<(u64, usize, KvPlan)> = Vec::new();
    for (layer, &att) in atts.iter().enumerate() {
        let l = layer as u64;
        if let Some(kv) = plan.rules.iter().rev().find(|r| r.kv.is_some() && r.layers.contains(l)).and_then(|r| r.kv.clone()) {
            chosen.push((l, att, kv));
        }
    }
    // PCA needs each chosen layer's keys and values: the Gram matrices per KV head.
    let grams = if chosen.iter().any(|(_, _, kv)| matches!(kv.transform, KvTransform::Pca | KvTransform::Smooth { .. })) {
        Some(collect_grams(m, plan, &chosen)?)
    } else {
        None
    };
    let mut report = KvBasisReport { layers: Vec::new(), seconds: 0.0, key: String::new() };
    let mut key = blake3::Hasher::new();
    for (i, (layer, att, kv)) in chosen.iter().enumerate() {
        let Op::Attention { heads, kv_heads } = m.graph.nodes[*att].op else { continue };
        let (h, kvh) = (heads as usize, kv_heads as usize);
        let (_, _, qw) = sparsec_passes::attention_input(&m.graph, *att).context("kv needs q to be a projection of the layer input")?;
        let d = qw as usize / h;
        if let KvTransform::Smooth { alpha } = kv.transform {
            let g = &grams.as_ref().context("smoothing statistics")?[i];
            let pairs = match m.graph.node(m.graph.nodes[*att].operands[1]).op {
                Op::Rope { adjacent, .. } => Some(adjacent),
                _ => None,
            };
            let s = channel_scales(&g.0, &g.2, (kvh, d), pairs, alpha);
            let group = h / kvh;
            let sq: Vec<f32> = (0..h * d).map(|i| s[(i / d / group) * d + i % d] as f32).collect();
            let sk: Vec<f32> = s.iter().map(|&x| (1.0 / x) as f32).collect();
            for (name, data) in sparsec_passes::kv_smooth_names(*layer).into_iter().zip([sq, sk]) {
                for x in &data {
                    key.update(&x.to_le_bytes());
                }
                let n = data.len();
                m.add_weight(&name, Arc::new(ArrayD::from_shape_vec(IxDyn(&[n]), data)?))?;
            }
            report.layers.push((*layer, kv.transform.name(), d as u64, d as u64));
            continue;
        }
        let r = kv_basis::kept(d as u64, kv.keep) as usize;
        if kv.pre_rope && kv.fit_scores {
            // Coefficients by P, keys rebuilt by E (`score_fitted`).
            let g = &grams.as_ref().context("score-fit statistics")?[i];
            let Op::Rope { theta, adjacent, .. } = m.graph.node(m.graph.nodes[*att].operands[1]).op else {
                bail!("kv rope = \"before\" needs the attention's k to be a rope")
            };
            let freqs: Vec<f64> = (0..d / 2).map(|p| (theta as f64).powf(-2.0 * p as f64 / d as f64)).collect();
            let (mut ps, mut es) = (Vec::new(), Vec::new());
            for kh in 0..kvh {
                let blk = kh * d * d..(kh + 1) * d * d;
                let (p, e) = kv_basis::score_fitted(&g.0[blk.clone()], &g.2[blk], d, r, &freqs, adjacent, SCORE_SPAN)
                    .context("the score-fitted basis's eigendecomposition failed")?;
                ps.push(p);
                es.push(e);
            }
            add_pre_rope_weights(m, *layer, (&ps, &es), (kvh, d, r), &mut key)?;
            report.layers.push((*layer, kv.transform.name(), r as u64, d as u64));
            continue;
        }
        // Per KV head: K's basis and V's, row-major d × r.
        let (bk, bv): (Vec<Vec<f64>>, Vec<Vec<f64>>) = match kv.transform {
            KvTransform::Dct => {
                let b = kv_basis::dct(d, r);
                (vec![b.clone(); kvh], vec![b; kvh])
            }
            KvTransform::Pswf { bandwidth } => {
                let b = kv_basis::dpss(d, r, bandwidth as f64).context("the PSWF eigendecomposition failed")?;
                (vec![b.clone(); kvh], vec![b; kvh])
            }
            KvTransform::Smooth { .. } => unreachable!("handled above"),
            KvTransform::Pca => {
                let g = &grams.as_ref().context("PCA statistics")?[i];
                let basis = |gram: &[f64]| kv_basis::pca(gram, d, r).context("the PCA eigendecomposition failed");
                (
                    (0..kvh).map(|kh| basis(&g.0[kh * d * d..(kh + 1) * d * d])).collect::<Result<_>>()?,
                    // Before RoPE only K is compressed (no V statistics).
                    (0..kvh).filter(|_| !kv.pre_rope).map(|kh| basis(&g.1[kh * d * d..(kh + 1) * d * d])).collect::<Result<_>>()?,
                )
            }
        };
        if kv.pre_rope {
            // One orthonormal basis: coefficients by it, keys rebuilt by it.
            add_pre_rope_weights(m, *layer, (&bk, &bk), (kvh, d, r), &mut key)?;
            report.layers.push((*layer, kv.transform.name(), r as u64, d as u64));
            continue;
        }
        let group = h / kvh;
        let q_scale = (r as f64 / d as f64).sqrt();
        // Block-diagonal [n·d, n·r] from per-head bases.
        let diag = |n: usize, bases: &[Vec<f64>], per: usize, s: f64| -> Vec<f32> {
            let mut w = vec![0f32; n * d * n * r];
            for hh in 0..n {
                let b = &bases[hh / per];
                for row in 0..d {
                    for c in 0..r {
                        w[(hh * d + row) * n * r + hh * r + c] = (b[row * r + c] * s) as f32;
                    }
                }
            }
            w
        };
        let wq = diag(h, &bk, group, q_scale);
        let wk = diag(kvh, &bk, 1, 1.0);
        let wv = diag(kvh, &bv, 1, 1.0);
        // The expansion [h·r, h·d]: V's basis transposed.
        let mut wo = vec![0f32; h * r * h * d];
        for hh in 0..h {
            let b = &bv[hh / group];
            for row in 0..d {
                for c in 0..r {
                    wo[(hh * r + c) * h * d + hh * d + row] = b[row * r + c] as f32;
                }
            }
        }
        let names = sparsec_passes::kv_basis_names(*layer);
        for (name, data, shape) in [
            (&names[0], wq, vec![h * d, h * r]),
            (&names[1], wk, vec![kvh * d, kvh * r]),
            (&names[2], wv, vec![kvh * d, kvh * r]),
            (&names[3], wo, vec![h * r, h * d]),
        ] {
            for x in &data {
                key.update(&x.to_le_bytes());
            }
            m.add_weight(name, Arc::new(ArrayD::from_shape_vec(IxDyn(&shape), data)?))?;
        }
        report.layers.push((*layer, kv.transform.name(), r as u64, d as u64));
    }
    report.seconds = t.elapsed().as_secs_f64();
    report.key = key.finalize().to_hex().to_string();
    Ok(Some(report))
}

/// The weights of a pre-RoPE key basis (`sparsec_passes::kv_pre_rope_names`):
/// the block-diagonal projection `[kvh·d, kvh·r]` from each KV head's `P`
/// and the expansion `[kvh·r, d]` (row `kh·r + c` is column c of its `E`).
fn add_pre_rope_weights(
    m: &mut Model,
    layer: u64,
    (ps, es): (&[Vec<f64>], &[Vec<f64>]),
    (kvh, d, r): (usize, usize, usize),
    key: &mut blake3::Hasher,
) -> Result<()> {
    let mut proj = vec![0f32; kvh * d * kvh * r];
    let mut expand = vec![0f32; kvh * r * d];
    for (kh, (p, e)) in ps.iter().zip(es).enumerate() {
        for row in 0..d {
            // Each row times the normalized Hadamard matrix H (r a power of
            // two): the cached coefficients are Hᵀ c, rebuilt by E·H, so a
            // block-quantized cache sees coefficients of one magnitude, not
            // PCA's falling variances; exact arithmetic is unchanged (HHᵀ = I).
            let mut pr: Vec<f32> = p[row * r..(row + 1) * r].iter().map(|&x| x as f32).collect();
            let mut er: Vec<f32> = e[row * r..(row + 1) * r].iter().map(|&x| x as f32).collect();
            sparsec_ir::quant::hadamard(&mut pr);
            sparsec_ir::quant::hadamard(&mut er);
            for c in 0..r {
                proj[(kh * d + row) * kvh * r + kh * r + c] = pr[c];
                expand[(kh * r + c) * d + row] = er[c];
            }
        }
    }
    let [wk, wkb] = sparsec_passes::kv_pre_rope_names(layer);
    for (name, data, shape) in [(wk, proj, vec![kvh * d, kvh * r]), (wkb, expand, vec![kvh * r, d])] {
        for x in &data {
            key.update(&x.to_le_bytes());
        }
        m.add_weight(&name, Arc::new(ArrayD::from_shape_vec(IxDyn(&shape), data)?))?;
    }
    Ok(())
}

/// Per KV head channel, `s = (rms k / rms q)^alpha` from the diagonals of
/// the K and grouped q Gram matrices (`kvh × d × d`); with RoPE (`pairs` =
/// its `adjacent`) both channels of a rotated pair share their mean square,
/// so the scaling commutes with the rotation. A channel no query reads keeps 1.
fn channel_scales(gk: &[f64], gq: &[f64], (kvh, d): (usize, usize), pairs: Option<bool>, alpha: f32) -> Vec<f64> {
    let diag = |g: &[f64], kh: usize, c: usize| g[kh * d * d + c * d + c];
    let partner = |c: usize| match pairs {
        Some(true) => c ^ 1,
        Some(false) => (c + d / 2) % d,
        None => c,
    };
    let mut s = vec![1f64; kvh * d];
    for kh in 0..kvh {
        for c in 0..d {
            let p = partner(c);
            let (k, q) = (diag(gk, kh, c) + diag(gk, kh, p), diag(gq, kh, c) + diag(gq, kh, p));
            if k > 0.0 && q > 0.0 {
                s[kh * d + c] = (k / q).sqrt().powf(alpha as f64);
            }
        }
    }
    s
}

/// Per chosen layer, the Gram matrices (Σ xxᵀ over calibration rows, f64) of
/// each KV head's keys (after RoPE, as cached; before it under `rope =
/// "before"`) and values (none before RoPE), and under `fit = "scores"` its
/// pre-RoPE queries' (summed over the KV head's group of query heads).
type LayerGrams = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Distances the score fit averages the queries' rotations over.
const SCORE_SPAN: usize = 2048;

/// Per KV head, the Gram matrices of its group's query heads summed
/// (`kvh × d × d`) from queries `[n, h·d]`.
fn group_grams(a: &ndarray::ArrayD<f32>, n: usize, h: usize, kvh: usize) -> Vec<f64> {
    let per = head_grams(a, n, h);
    let dd = per.len() / h.max(1);
    let mut g = vec![0f64; kvh * dd];
    for hh in 0..h {
        let kh = hh / (h / kvh).max(1);
        for (o, v) in g[kh * dd..(kh + 1) * dd].iter_mut().zip(&per[hh * dd..(hh + 1) * dd]) {
            *o += v;
        }
    }
    g
}

/// Per head of a value `[n, heads·d]`: Σ xxᵀ over its rows, `heads × d × d`.
fn head_grams(a: &ndarray::ArrayD<f32>, n: usize, heads: usize) -> Vec<f64> {
    let x: Vec<f32> = a.iter().copied().collect();
    let w = x.len() / n.max(1);
    let d = w / heads.max(1);
    let mut g = vec![0f64; heads * d * d];
    for row in x.chunks(w) {
        for h in 0..heads {
            let xs = &row[h * d..(h + 1) * d];
            let gh = &mut g[h * d * d..(h + 1) * d * d];
            for i in 0..d {
                for j in 0..d {
                    gh[i * d + j] += xs[i] as f64 * xs[j] as f64;
                }
            }
        }
    }
    g
}

fn collect_grams(m: &Model, plan: &Plan, chosen: &[(u64, usize, KvPlan)]) -> Result<Vec<LayerGrams>> {
    let (input, n, _) = crate::calibrated::calibration_sequence(m, plan, PCA_TOKENS)?;
    if n == 0 {
        bail!("kv transform = \"pca\" needs calibration text");
    }
    let mut state = sparsec_runtime::interpreter::KvState::new();
    let weight = |name: &str| m.weight(name).ok();
    let mut run = sparsec_runtime::interpreter::Stepper::new(&m.graph, &input, &mut state)?;
    let bar = crate::lm_verbs::progress(chosen.len() as u64, "kv pca");
    let mut out = Vec::new();
    for (done, (_, att, kv)) in chosen.iter().enumerate() {
        let node = &m.graph.nodes[*att];
        let Op::Attention { heads, kv_heads } = node.op else { bail!("not an attention") };
        let (h, kvh) = (heads as usize, kv_heads as usize);
        if !kv.pre_rope {
            run.run_until(*att, &weight)?;
            let value = |id: usize| run.value(id).context("kv pca: the attention's operands were not computed");
            // Smoothing reads K and the queries; a basis K and V.
            let (gv, gq) = if matches!(kv.transform, KvTransform::Smooth { .. }) {
                (Vec::new(), group_grams(value(node.operands[0].0)?, n, h, kvh))
            } else {
                (head_grams(value(node.operands[2].0)?, n, kvh), Vec::new())
            };
            out.push((head_grams(value(node.operands[1].0)?, n, kvh), gv, gq));
            bar.set_position(done as u64 + 1);
            continue;
        }
        // Before RoPE: the keys (and for the score fit the queries) as their
        // ropes take them, read just before each rope runs.
        let (q_rope, k_rope) = (node.operands[0].0, node.operands[1].0);
        for r in [q_rope, k_rope] {
            if !matches!(m.graph.nodes[r].op, Op::Rope { .. }) {
                bail!("kv rope = \"before\" needs the attention's q and k to be ropes");
            }
        }
        let mut points = vec![(k_rope, false)];
        if kv.fit_scores {
            points.push((q_rope, true));
        }
        points.sort();
        let (mut gk, mut gq) = (Vec::new(), Vec::new());
        for (at, is_q) in points {
            run.run_until(at, &weight)?;
            let x = run.value(m.graph.nodes[at].operands[0].0).context("kv pca: the rope's input was not computed")?;
            if is_q {
                gq = group_grams(x, n, h, kvh);
            } else {
                gk = head_grams(x, n, kvh);
            }
        }
        out.push((gk, Vec::new(), gq));
        bar.set_position(done as u64 + 1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// One line for the compile's report.
pub fn describe(r: &KvBasisReport) -> String {
    let Some(first) = r.layers.first() else { return String::new() };
    if first.1 == "smooth" {
        return format!("kv smoothing: {} layers, q and k channels scaled, in {:.1} s", r.layers.len(), r.seconds);
    }
    format!("kv bases: {} layers, {} keeping {} of {} columns per head, in {:.1} s", r.layers.len(), first.1, first.2, first.3, r.seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Diagonal Gram matrices of one KV head of width 4 from per-channel mean squares.
    fn diag(ms: [f64; 4]) -> Vec<f64> {
        let mut g = vec![0f64; 16];
        for (c, m) in ms.iter().enumerate() {
            g[c * 4 + c] = *m;
        }
        g
    }

    #[test]
    fn channel_scales_balance_k_against_q_and_share_a_rope_pair() {
        let (gk, gq) = (diag([16.0, 16.0, 1.0, 4.0]), diag([1.0, 1.0, 1.0, 1.0]));
        // No RoPE, alpha 0.5: s = (rms k / rms q)^0.5, so k/s and q·s have equal rms.
        let s = channel_scales(&gk, &gq, (1, 4), None, 0.5);
        assert!((s[0] - 2.0).abs() < 1e-12 && (s[2] - 1.0).abs() < 1e-12 && (s[3] - 2f64.sqrt()).abs() < 1e-12, "{s:?}");
        // Adjacent pairs (0, 1), (2, 3): one scale per pair, from its summed mean squares.
        let s = channel_scales(&gk, &gq, (1, 4), Some(true), 1.0);
        assert_eq!(s[0], s[1]);
        assert_eq!(s[2], s[3]);
        assert!((s[2] - (5f64 / 2.0).sqrt()).abs() < 1e-12, "{s:?}");
        // Halves: pairs (0, 2), (1, 3).
        let s = channel_scales(&gk, &gq, (1, 4), Some(false), 1.0);
        assert_eq!(s[0], s[2]);
        assert_eq!(s[1], s[3]);
        // A channel no query reads keeps 1.
        let s = channel_scales(&gk, &diag([0.0, 1.0, 1.0, 1.0]), (1, 4), None, 0.5);
        assert_eq!(s[0], 1.0);
    }
}
