//! Low-rank factoring and basis sharing of a loaded model's weights (the plan
//! keys `low_rank` and `share`): fits the factors of every weight the plan
//! factors and adds them to the model under the names the `low-rank` pass
//! gives its new weight nodes (`passes/src/low_rank.rs`), so compile and eval
//! read them like checkpoint tensors. The factors are f32 (the checkpoint's
//! quantized blocks are dequantized first); the compiled model multiplies them
//! with the dense f32 matmul kernels.
//!
//! Notation: a matmul computes `y = x·M` for a row `x` of width `k`, with
//! `M = Wᵀ` (`[k, n]`) for a checkpoint weight `W` stored `[n, k]`. The
//! factors are `M ≈ B·C`, `B` `[k, r]` on the input side, `C` `[r, n]`; they
//! are stored as `Bᵀ` (`[r, k]`, `W.lr_in` or the shared basis) and `Cᵀ`
//! (`[n, r]`, `W.lr_out`), both multiplied transposed.
//!
//! - `svd`: `M = UΣVᵀ` truncated: `B = U_r`, `C = Σ_r V_rᵀ` (the best rank-r
//!   approximation in Frobenius norm).
//! - `whitened` (SVD-LLM): with `G = XᵀX/rows + λI` the damped Gram of the
//!   matmul's calibration inputs (λ = 1% of its mean diagonal) and `G = LLᵀ`
//!   its Cholesky factor, `E‖x(M − BC)‖² ∝ ‖Lᵀ(M − BC)‖²_F`; the SVD
//!   `LᵀM = UΣVᵀ` truncated gives the minimizer `B = L⁻ᵀU_r`, `C = Σ_r V_rᵀ`.
//!   (In the `[n, k]` orientation of the issue: `W·S = UΣVᵀ` with `S = L`,
//!   factors `UΣ` and `Vᵀ·S⁻¹`.)
//! - `share` (Basis Sharing): a group of `g` layers of one role, `M_1..M_g`
//!   (each `[k, n]`, Grams `G_l`), shares the input-side basis. Balanced, so
//!   each member counts by its relative error: with `Ĝ_l = G_l / tr G_l`
//!   (each Gram normalized by its rows, damped) and `s_l = ‖Ĝ_l^½ M_l‖_F`,
//!   `L` is the Cholesky factor of `Σ_l Ĝ_l`, the SVD of the horizontally
//!   stacked whitened weights `Lᵀ[M_1/s_1 … M_g/s_g] = UΣVᵀ` (`[k, g·n]`)
//!   gives `B = L⁻ᵀU_r` (`[k, r]`), and
//!   each layer's coefficients are then fitted to its own data by least squares
//!   under its own Gram: `C_l = (BᵀG_lB)⁻¹BᵀG_lM_l` (`[r, n]`; never worse for
//!   layer l than the block `Σ_r V_lᵀ` the joint SVD gives). With
//!   `method = "svd"` every Gram is the identity. The rank removes the ratio of
//!   the group's parameters: `k·r + g·r·n ≤ (1 − ratio)·g·n·k`.

use anyhow::{bail, Context, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use sparsec_ir::sparse_calibrated::Gram;
use sparsec_ir::{LowRank, Op, Pattern};
use sparsec_models::checkpoint::Model;
use sparsec_passes::{factor_names, layer_and_role, FactorMethod, Plan};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Bumped when the fitting changes: part of the compile cache key.
const FIT_VERSION: &str = "factor-v2";

/// Damping of a Gram matrix, relative to its mean diagonal.
const DAMP: f64 = 0.01;

/// What factoring did, for reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FactorReport {
    /// Weights replaced by factors.
    pub weights: usize,
    /// Shared bases among their input-side factors.
    pub bases: usize,
    /// Parameters of the factored weights, and of their factors.
    pub params_before: u64,
    pub params_after: u64,
    /// The methods used (`svd`, `whitened`).
    pub methods: Vec<&'static str>,
    /// The calibration text, tokens, whether the statistics were cached and how
    /// long collecting them took; `None` when no weight is whitened.
    pub calibration: Option<(Vec<String>, usize, bool, f64)>,
    pub fit_s: f64,
    /// Identifies the factors beyond the plan and the checkpoint (the
    /// statistics they were fitted with): part of the compile cache key.
    pub key: String,
}

/// One weight the plan factors.
struct Target {
    name: String,
    rank: usize,
    basis: Option<String>,
    /// The weight is stored `[n, k]` (multiplied transposed).
    transposed: bool,
    method: FactorMethod,
}

/// The weights `plan` factors, with the rank and basis `apply-plan` gives them.
fn targets(m: &Model, plan: &Plan) -> Result<Vec<Target>> {
    let mut g = m.graph.clone();
    let passes: Vec<Box<dyn sparsec_passes::Pass>> = vec![
        Box::new(sparsec_passes::Verify),
        Box::new(sparsec_passes::ShapeInference),
        Box::new(sparsec_passes::ApplyPlan { plan: plan.clone() }),
    ];
    sparsec_passes::PassManager::new(passes, Default::default()).run(&mut g)?;
    let mut out: Vec<Target> = Vec::new();
    for n in &g.nodes {
        let Op::MatMul { transpose_b } = n.op else { continue };
        let Some(LowRank { rank, basis }) = n.patterns.iter().find_map(|p| match p {
            Pattern::LowRank(lr) => Some(lr.clone()),
            _ => None,
        }) else {
            continue;
        };
        let Op::Weight { name, .. } = &g.nodes[n.operands[1].0].op else { continue };
        if out.iter().any(|t| &t.name == name) {
            continue;
        }
        let (layer, role) = layer_and_role(name);
        let f = plan.factor_for(layer, &role).with_context(|| format!("`{name}` carries #low_rank but no plan rule factors it"))?;
        out.push(Target { name: name.clone(), rank: rank as usize, basis, transposed: transpose_b, method: f.method });
    }
    Ok(out)
}

/// `M` (`[k, n]`) of a weight.
fn matrix(m: &Model, t: &Target) -> Result<Mat<f64>> {
    let w = m.weight(&t.name)?;
    let &[a, b] = w.shape() else { bail!("`{}` is not a matrix (shape {:?})", t.name, w.shape()) };
    let w = w.as_standard_layout();
    let d = w.as_slice().context("weight data is contiguous")?;
    Ok(if t.transposed { Mat::from_fn(b, a, |i, j| d[j * b + i] as f64) } else { Mat::from_fn(a, b, |i, j| d[i * b + j] as f64) })
}

/// `XᵀX / rows` of a Gram (the mean outer product of the inputs).
fn mean_gram(g: &Gram) -> Mat<f64> {
    let rows = g.rows.max(1) as f64;
    Mat::from_fn(g.k, g.k, |a, b| g.xtx[a * g.k + b] / rows)
}

/// `G + λI` with λ = `DAMP`·mean diagonal (more, up to five tenfold steps,
/// until Cholesky succeeds), and its lower Cholesky factor `L`.
fn damped_cholesky(g: &Mat<f64>, what: &str) -> Result<(Mat<f64>, Mat<f64>)> {
    let k = g.nrows();
    let mean = (0..k).map(|i| g[(i, i)]).sum::<f64>() / k.max(1) as f64;
    let mut lambda = DAMP * if mean > 0.0 { mean } else { 1.0 };
    for _ in 0..6 {
        let d = Mat::from_fn(k, k, |a, b| g[(a, b)] + if a == b { lambda } else { 0.0 });
        if let Ok(llt) = d.llt(Side::Lower) {
            let l = llt.L().to_owned();
            return Ok((d, l));
        }
        lambda *= 10.0;
    }
    bail!("the calibration Gram matrix of `{what}` is not positive definite even with damping {lambda:e}")
}

/// `B = L⁻ᵀU` (solves `Lᵀ·B = U`), or `U` without whitening.
fn unwhiten(l: Option<&Mat<f64>>, u: Mat<f64>) -> Mat<f64> {
    match l {
        None => u,
        Some(l) => {
            let mut b = u;
            faer::linalg::triangular_solve::solve_upper_triangular_in_place(l.transpose(), b.as_mut(), faer::Par::Seq);
            b
        }
    }
}

/// The top `r` left singular vectors and `Σ_r V_rᵀ` of `a`.
fn truncated_svd(a: &Mat<f64>, r: usize, what: &str) -> Result<(Mat<f64>, Mat<f64>)> {
    let svd = sparsec_ir::simd_state::faer(|| a.thin_svd()).map_err(|e| anyhow::anyhow!("SVD of `{what}` did not converge: {e:?}"))?;
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let r = r.min(u.ncols());
    let ur = Mat::from_fn(a.nrows(), r, |i, j| u[(i, j)]);
    let sv = Mat::from_fn(r, a.ncols(), |i, j| s[i] * v[(j, i)]);
    Ok((ur, sv))
}

/// Least-squares coefficients of `M` (`[k, n]`) in the basis `B` (`[k, r]`)
/// under the metric `G` (identity when `None`): `(BᵀGB)⁻¹BᵀGM`.
fn coefficients(b: &Mat<f64>, g: Option<&Mat<f64>>, m: &Mat<f64>, what: &str) -> Result<Mat<f64>> {
    let gb = match g {
        Some(g) => g * b,
        None => b.clone(),
    };
    let normal = b.transpose() * &gb;
    let r = normal.nrows();
    let mean = (0..r).map(|i| normal[(i, i)]).sum::<f64>() / r.max(1) as f64;
    let normal = Mat::from_fn(r, r, |i, j| normal[(i, j)] + if i == j { 1e-10 * mean.max(f64::MIN_POSITIVE) } else { 0.0 });
    let llt = normal.llt(Side::Lower).map_err(|e| anyhow::anyhow!("the basis of `{what}` is rank deficient: {e:?}"))?;
    Ok(llt.solve(gb.transpose() * m))
}

/// `tr(MᵀGM)` (`‖LᵀM‖²_F` for `G = LLᵀ`), as `Σ (G·M) ∘ M`: no `n × n` product.
fn whitened_sq_norm(g: &Mat<f64>, m: &Mat<f64>) -> f64 {
    let gm = g * m;
    (0..m.ncols()).map(|j| (0..m.nrows()).map(|i| gm[(i, j)] * m[(i, j)]).sum::<f64>()).sum()
}

/// `[rows, cols]` of `f(i, j)` as f32 data.
fn array(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f64) -> Arc<ndarray::ArrayD<f32>> {
    let data: Vec<f32> = (0..rows * cols).map(|x| f(x / cols, x % cols) as f32).collect();
    Arc::new(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[rows, cols]), data).expect("rows·cols values"))
}

/// The rank-`r` input-side basis `B` (`[k, r]`) of the members `mats` (each
/// `[k, n_l]`, one input width) under their damped Grams `metrics` (`None`:
/// the identity), and `Σ_r V_rᵀ` of the joint SVD (a lone member's optimal
/// coefficients). Balanced: every member counts by its relative error. Each
/// Gram is scaled to unit trace before they are summed into the joint metric,
/// and each member's weight divided by its norm under its own scaled Gram, so
/// a member whose inputs or weights are small (layer 0's attention inputs are
/// about 70x smaller than layer 1's in SmolLM2) is not left to the basis's
/// leftovers, and scaling one member's weight or inputs by a constant
/// changes no basis.
fn joint_basis(mats: &[Mat<f64>], metrics: &[Option<Mat<f64>>], r: usize, what: &str) -> Result<(Mat<f64>, Mat<f64>)> {
    let unit: Vec<Option<Mat<f64>>> = metrics
        .iter()
        .map(|g| {
            g.as_ref().map(|g| {
                let tr = (0..g.nrows()).map(|i| g[(i, i)]).sum::<f64>();
                g * faer::Scale(1.0 / if tr > 0.0 { tr } else { 1.0 })
            })
        })
        .collect();
    let l = match unit.iter().flatten().cloned().reduce(|a, b| a + b) {
        Some(sum) => Some(damped_cholesky(&sum, what)?.1),
        None => None,
    };
    let scales: Vec<f64> = mats
        .iter()
        .zip(&unit)
        .map(|(mt, g)| {
            let sq = match g {
                Some(g) => whitened_sq_norm(g, mt),
                None => mt.squared_norm_l2(),
            };
            if mats.len() > 1 && sq > 0.0 {
                1.0 / sq.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    let k = mats[0].nrows();
    let stacked_cols: usize = mats.iter().map(|x| x.ncols()).sum();
    let stacked = Mat::from_fn(k, stacked_cols, |i, j| {
        let (mut j, mut l) = (j, 0);
        while j >= mats[l].ncols() {
            j -= mats[l].ncols();
            l += 1;
        }
        mats[l][(i, j)] * scales[l]
    });
    let a = match &l {
        Some(l) => l.transpose() * &stacked,
        None => stacked,
    };
    let (u, sv) = truncated_svd(&a, r, what)?;
    Ok((unwhiten(l.as_ref(), u), sv))
}

/// Fits the factors of one group (one weight, or the layers sharing `basis`)
/// and adds them to `m`. Returns the parameters before and after.
fn fit_group(m: &mut Model, group: &[&Target], grams: &BTreeMap<String, Arc<Gram>>) -> Result<(u64, u64)> {
    let first = group[0];
    let what = first.basis.as_deref().unwrap_or(&first.name).to_string();
    let mats: Vec<Mat<f64>> = group.iter().map(|t| matrix(m, t)).collect::<Result<_>>()?;
    let k = mats[0].nrows();
    if mats.iter().any(|x| x.nrows() != k) {
        bail!("the weights sharing `{what}` have different input widths");
    }
    // Each member's damped Gram (whitened), and L of their sum.
    let metrics: Vec<Option<Mat<f64>>> = group
        .iter()
        .map(|t| match t.method {
            FactorMethod::Svd => Ok(None),
            FactorMethod::Whitened => {
                let g = grams.get(&t.name).with_context(|| format!("no calibration statistics for `{}`", t.name))?;
                if g.k != k {
                    bail!("the calibration statistics of `{}` are {} wide, its input {k}", t.name, g.k);
                }
                Ok(Some(damped_cholesky(&mean_gram(g), &t.name)?.0))
            }
        })
        .collect::<Result<_>>()?;
    let (b, sv) = joint_basis(&mats, &metrics, first.rank, &what)?;
    let r = b.ncols();
    let shared = first.basis.is_some();
    let (in_name, _) = factor_names(&first.name, first.basis.as_deref());
    m.add_weight(&in_name, array(r, k, |i, j| b[(j, i)]))?;
    let mut after = (r * k) as u64;
    let mut before = 0u64;
    let mut col = 0;
    for ((t, mt), metric) in group.iter().zip(&mats).zip(&metrics) {
        let c = if shared {
            coefficients(&b, metric.as_ref(), mt, &t.name)?
        } else {
            // The SVD's own coefficients are the optimum for its basis.
            Mat::from_fn(r, mt.ncols(), |i, j| sv[(i, col + j)])
        };
        col += mt.ncols();
        let (_, out_name) = factor_names(&t.name, t.basis.as_deref());
        m.add_weight(&out_name, array(c.ncols(), r, |i, j| c[(j, i)]))?;
        before += (k * mt.ncols()) as u64;
        after += (r * mt.ncols()) as u64;
    }
    Ok((before, after))
}

/// Fits and adds the factors of every weight `plan` factors (`low_rank`,
/// `share`) to `m`. `None` when the plan factors nothing; an error when it
/// does and there is no model (the factors come from a checkpoint's data).
/// `fingerprint` is `Model::fingerprint` (it keys the calibration statistics).
pub fn apply(
    m: Option<&mut Model>,
    fingerprint: &str,
    plan: Option<&Plan>,
    cache_dir: Option<&std::path::Path>,
) -> Result<Option<FactorReport>> {
    let Some(plan) = plan.filter(|p| p.factors()) else { return Ok(None) };
    let Some(m) = m else {
        bail!("low_rank and share fit their factors from a model's weights: compile or eval a model checkpoint (GGUF, HF directory or smollm2)");
    };
    let targets = targets(m, plan)?;
    let whitened: Vec<&str> = targets.iter().filter(|t| t.method == FactorMethod::Whitened).map(|t| t.name.as_str()).collect();
    let (grams, calibration, stats_key) = if whitened.is_empty() {
        (BTreeMap::new(), None, String::new())
    } else {
        let s = crate::calibrated::statistics(m, fingerprint, plan, &whitened, cache_dir)?;
        (s.grams, Some((s.texts, s.tokens, s.cached, s.collect_s)), s.key)
    };
    let t0 = Instant::now();
    let mut groups: Vec<Vec<&Target>> = Vec::new();
    for t in &targets {
        match groups.iter_mut().find(|g| t.basis.is_some() && g[0].basis == t.basis) {
            Some(g) => g.push(t),
            None => groups.push(vec![t]),
        }
    }
    let (mut before, mut after) = (0, 0);
    for g in &groups {
        let (b, a) = sparsec_ir::simd_state::faer(|| fit_group(m, g, &grams))?;
        before += b;
        after += a;
    }
    let mut methods: Vec<&'static str> = targets.iter().map(|t| t.method.name()).collect();
    methods.sort();
    methods.dedup();
    Ok(Some(FactorReport {
        weights: targets.len(),
        bases: groups.iter().filter(|g| g[0].basis.is_some()).count(),
        params_before: before,
        params_after: after,
        methods,
        calibration,
        fit_s: t0.elapsed().as_secs_f64(),
        key: blake3::hash(format!("{FIT_VERSION}|{stats_key}").as_bytes()).to_hex().to_string(),
    }))
}

/// One line saying what was factored and the parameters before and after.
pub fn describe(r: &FactorReport) -> String {
    let calib = match &r.calibration {
        Some((texts, tokens, cached, s)) => format!(
            "; whitened with {tokens} calibration tokens of {} ({}: {s:.1} s)",
            texts.join(" + "),
            if *cached { "statistics cached" } else { "statistics collected" }
        ),
        None => String::new(),
    };
    let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * (b as f64 - a as f64) / b as f64 };
    format!(
        "factored {} weights ({}; {} shared bases) in {:.1} s: their parameters {} -> {} ({:.1}% fewer){calib}",
        r.weights,
        r.methods.join(", "),
        r.bases,
        r.fit_s,
        r.params_before,
        r.params_after,
        pct(r.params_after, r.params_before)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random `[rows, cols]` matrix.
    fn noise(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        Mat::from_fn(rows, cols, |i, j| {
            let x = (i as u64 * 7919 + j as u64 * 104729 + seed * 1_000_003).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
    }

    /// A damped Gram of `rows` pseudo-random inputs of width `k`.
    fn gram(k: usize, seed: u64) -> Mat<f64> {
        let x = noise(4 * k, k, seed);
        damped_cholesky(&(x.transpose() * &x), "g").unwrap().0
    }

    /// `‖Ĝ^½(M − B·C)‖² / ‖Ĝ^½M‖²` with `C` fitted under `g`.
    fn relative_error(b: &Mat<f64>, g: &Mat<f64>, m: &Mat<f64>) -> f64 {
        let c = coefficients(b, Some(g), m, "m").unwrap();
        let d = m - b * &c;
        whitened_sq_norm(g, &d) / whitened_sq_norm(g, m)
    }

    #[test]
    fn a_shared_basis_does_not_change_when_one_member_is_scaled() {
        let (k, n, r) = (12, 9, 7);
        let mats = [noise(k, n, 1), noise(k, n, 2)];
        let grams = [gram(k, 3), gram(k, 4)];
        let metrics: Vec<Option<Mat<f64>>> = grams.iter().cloned().map(Some).collect();
        let (b, _) = joint_basis(&mats, &metrics, r, "t").unwrap();
        // Layer 0's weight 100x smaller and its inputs 30x smaller: the same basis
        // (as a subspace: the same relative errors), where an unbalanced joint
        // SVD would hand the basis to layer 1.
        let small = [&mats[0] * faer::Scale(0.01), mats[1].clone()];
        let small_grams = [&grams[0] * faer::Scale(1.0 / 900.0), grams[1].clone()];
        let small_metrics: Vec<Option<Mat<f64>>> = small_grams.iter().cloned().map(Some).collect();
        let (b2, _) = joint_basis(&small, &small_metrics, r, "t").unwrap();
        for l in 0..2 {
            let e1 = relative_error(&b, &grams[l], &mats[l]);
            let e2 = relative_error(&b2, &small_grams[l], &small[l]);
            assert!((e1 - e2).abs() < 1e-9 * e1.max(1e-12) + 1e-12, "member {l}: {e1} vs {e2}");
            assert!(e1 > 1e-4, "rank {r} of {k} must lose something: {e1}");
        }
    }

    #[test]
    fn a_lone_member_gets_the_whitened_optimum() {
        // One member: B·C is the best rank-r fit under its Gram, so no other
        // rank-r basis (here the plain SVD's) does better, and full rank is exact.
        let (k, n, r) = (10, 8, 4);
        let m = noise(k, n, 5);
        let g = gram(k, 6);
        let (b, sv) = joint_basis(std::slice::from_ref(&m), &[Some(g.clone())], r, "t").unwrap();
        let fitted = relative_error(&b, &g, &m);
        let (u, _) = truncated_svd(&m, r, "t").unwrap();
        assert!(fitted < relative_error(&u, &g, &m), "whitened {fitted}");
        let d = &m - &b * &sv;
        let e = whitened_sq_norm(&g, &d);
        // The SVD's own coefficients are optimal under the joint metric, which
        // damps once more (1%): within a percent of the refit under `g`.
        let sv_err = e / whitened_sq_norm(&g, &m);
        assert!(sv_err >= fitted * (1.0 - 1e-12) && sv_err < fitted * 1.01, "{sv_err} vs {fitted}");
        let (b, sv) = joint_basis(std::slice::from_ref(&m), &[Some(g)], k, "t").unwrap();
        assert!((&m - &b * &sv).norm_max() < 1e-9 * m.norm_max());
    }
}
