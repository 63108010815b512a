//! Orthonormal bases of a head's feature axis for compressed K/V caches
//! (`kv = { transform = ... }`): the DCT-II, discrete prolate spheroidal
//! sequences (PSWF/Slepian), and principal components of calibration rows.
//! Each is `d × r`, column-major order of importance, columns orthonormal.

use faer::{Mat, Side};

/// Columns kept of a head width `d` at `keep` (at least 1, at most `d`).
pub fn kept(d: u64, keep: f32) -> u64 {
    ((keep as f64 * d as f64).round() as u64).clamp(1, d.max(1))
}

/// The first `r` DCT-II basis vectors of length `d` (orthonormal, lowest
/// frequencies first), as a row-major `d × r` matrix.
pub fn dct(d: usize, r: usize) -> Vec<f64> {
    let mut b = vec![0f64; d * r];
    for k in 0..r {
        let s = if k == 0 { (1.0 / d as f64).sqrt() } else { (2.0 / d as f64).sqrt() };
        for n in 0..d {
            b[n * r + k] = s * (std::f64::consts::PI * (n as f64 + 0.5) * k as f64 / d as f64).cos();
        }
    }
    b
}

/// Whether `w` is a PSWF half-bandwidth `dpss` takes: inside (0, 0.5),
/// in cycles per sample (the plan, the verifier and the manifest ask this).
pub fn check_bandwidth(w: f32) -> Result<(), String> {
    if w > 0.0 && w < 0.5 {
        Ok(())
    } else {
        Err(format!("bandwidth = {w} is outside (0, 0.5)"))
    }
}

/// The `r` most concentrated discrete prolate spheroidal sequences of length
/// `d` and half-bandwidth `w` (0 < w < 0.5), as a row-major `d × r` matrix:
/// eigenvectors of the tridiagonal matrix that commutes with the
/// time-and-band limiting operator (diagonal ((d−1)/2 − n)²·cos 2πw,
/// off-diagonal n(d−n)/2), largest eigenvalues first. `None` if the
/// eigendecomposition fails.
pub fn dpss(d: usize, r: usize, w: f64) -> Option<Vec<f64>> {
    let mut t = Mat::<f64>::zeros(d, d);
    for n in 0..d {
        let c = (d as f64 - 1.0) / 2.0 - n as f64;
        t[(n, n)] = c * c * (2.0 * std::f64::consts::PI * w).cos();
        if n + 1 < d {
            let o = (n + 1) as f64 * (d - n - 1) as f64 / 2.0;
            t[(n, n + 1)] = o;
            t[(n + 1, n)] = o;
        }
    }
    top_eigenvectors(t, r)
}

/// The top `r` principal directions of rows whose (uncentered) second
/// moment is the symmetric `d × d` row-major `gram`, largest first.
pub fn pca(gram: &[f64], d: usize, r: usize) -> Option<Vec<f64>> {
    top_eigenvectors(Mat::from_fn(d, d, |i, j| gram[i * d + j]), r)
}

/// A basis of pre-RoPE keys fitted to the scores rather than the keys: the
/// error `e` of a rebuilt key costs `(qᵀ R(t−s) e)²` in a score, so with `M`
/// the queries' second moment `gram_q` rotated by every distance `Δ` in
/// `0..span` and averaged with weights ∝ 1/(Δ+1) (attention reads near keys
/// most: on SmolLM2 at keep 0.5 these weights give +4.3% perplexity where
/// uniform ones give +7.0% and 1/(Δ+1)² +5.6%), the rank-`r` fit minimizing `E[eᵀ M e]` is PCA of `M^½ k`:
/// coefficients `c = Pᵀk` with `P = M^½ U`, keys rebuilt as `E c` with
/// `E = M^-½ U` (`U`: the top `r` eigenvectors of `M^½ C_k M^½`). Returns
/// `(P, E)`, each row-major `d × r`. Pairs as `Op::Rope` (`adjacent`),
/// frequencies `freqs` (one per pair). `M` gets a ridge of 1e-3 of its mean
/// diagonal, so directions no query reads stay invertible.
pub fn score_fitted(
    gram_k: &[f64],
    gram_q: &[f64],
    d: usize,
    r: usize,
    freqs: &[f64],
    adjacent: bool,
    span: usize,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let m = rotation_averaged(gram_q, d, freqs, adjacent, span);
    let ridge = 1e-3 * (0..d).map(|i| m[(i, i)]).sum::<f64>() / d as f64;
    let m = Mat::from_fn(d, d, |i, j| m[(i, j)] + if i == j { ridge.max(1e-12) } else { 0.0 });
    let e = m.self_adjoint_eigen(Side::Lower).ok()?;
    let (v, lam) = (e.U(), e.S());
    let pow = |p: f64| Mat::from_fn(d, d, |i, j| (0..d).map(|k| v[(i, k)] * lam[k].max(0.0).powf(p) * v[(j, k)]).sum::<f64>());
    let (half, inv_half) = (pow(0.5), pow(-0.5));
    let ck = Mat::from_fn(d, d, |i, j| gram_k[i * d + j]);
    let a = &half * &ck * &half;
    let u = top_eigenvectors(Mat::from_fn(d, d, |i, j| 0.5 * (a[(i, j)] + a[(j, i)])), r)?;
    let um = Mat::from_fn(d, r, |i, c| u[i * r + c]);
    let (p, x) = (&half * &um, &inv_half * &um);
    crate::simd_state::clean_upper();
    let flat = |m: &Mat<f64>| (0..d).flat_map(|i| (0..r).map(move |c| (i, c))).map(|(i, c)| m[(i, c)]).collect::<Vec<f64>>();
    Some((flat(&p), flat(&x)))
}

/// `Σ_Δ w(Δ) R(−Δ)ᵀ C R(−Δ)` over distances `Δ = 0..span`, `w(Δ)` ∝ 1/(Δ+1)
/// summing to 1, for the rotation `R` of RoPE (pair i turned by `Δ·freqs[i]`).
fn rotation_averaged(gram: &[f64], d: usize, freqs: &[f64], adjacent: bool, span: usize) -> Mat<f64> {
    let half = d / 2;
    let pair = |p: usize| if adjacent { (2 * p, 2 * p + 1) } else { (p, p + half) };
    let mut m = Mat::<f64>::zeros(d, d);
    let span = span.max(1);
    let wsum: f64 = (0..span).map(|x| 1.0 / (x as f64 + 1.0)).sum();
    for delta in 0..span {
        let wd = 1.0 / (delta as f64 + 1.0) / wsum;
        // Pair p's rotation by −Δ·f: columns (a, b) of R are (c, −s) and (s, c).
        let cs: Vec<(f64, f64)> = freqs.iter().map(|f| ((-(delta as f64) * f).cos(), (-(delta as f64) * f).sin())).collect();
        for p in 0..half {
            let (pa, pb) = pair(p);
            let (cp, sp) = cs[p];
            // R[:, a] = c·e_a + s·e_b; R[:, b] = −s·e_a + c·e_b.
            let col_p = [[(pa, cp), (pb, sp)], [(pa, -sp), (pb, cp)]];
            for (q, &(cq, sq)) in cs.iter().enumerate() {
                let (qa, qb) = pair(q);
                let col_q = [[(qa, cq), (qb, sq)], [(qa, -sq), (qb, cq)]];
                for (i, ci) in [pa, pb].into_iter().zip(&col_p) {
                    for (j, cj) in [qa, qb].into_iter().zip(&col_q) {
                        let mut acc = 0.0;
                        for &(x, wx) in ci {
                            for &(y, wy) in cj {
                                acc += wx * wy * gram[x * d + y];
                            }
                        }
                        m[(i, j)] += wd * acc;
                    }
                }
            }
        }
    }
    m
}

/// Eigenvectors of the `r` largest eigenvalues of symmetric `m`, as a
/// row-major `d × r` matrix, each with its largest-magnitude entry positive
/// (a fixed sign, so results do not depend on the solver's).
fn top_eigenvectors(m: Mat<f64>, r: usize) -> Option<Vec<f64>> {
    let d = m.nrows();
    let e = crate::simd_state::faer(|| m.self_adjoint_eigen(Side::Lower)).ok()?;
    let u = e.U();
    let mut b = vec![0f64; d * r];
    for k in 0..r {
        let col = d - 1 - k;
        let big = (0..d).map(|n| u[(n, col)]).fold(0f64, |a, x| if x.abs() > a.abs() { x } else { a });
        let s = if big < 0.0 { -1.0 } else { 1.0 };
        for n in 0..d {
            b[n * r + k] = s * u[(n, col)];
        }
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orthonormal(b: &[f64], d: usize, r: usize) {
        for a in 0..r {
            for c in 0..r {
                let dot: f64 = (0..d).map(|n| b[n * r + a] * b[n * r + c]).sum();
                let want = if a == c { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-9, "columns {a}, {c}: {dot}");
            }
        }
    }

    #[test]
    fn every_basis_has_orthonormal_columns() {
        orthonormal(&dct(64, 32), 64, 32);
        orthonormal(&dpss(64, 16, 0.2).unwrap(), 64, 16);
        let g: Vec<f64> = (0..16 * 16).map(|i| if i / 16 == i % 16 { (i / 16) as f64 + 1.0 } else { 0.1 }).collect();
        orthonormal(&pca(&g, 16, 5).unwrap(), 16, 5);
    }

    #[test]
    fn a_score_fit_under_isotropic_queries_is_plain_pca_and_rebuilds_its_span() {
        let d = 8;
        let freqs: Vec<f64> = (0..d / 2).map(|i| 10000f64.powf(-2.0 * i as f64 / d as f64)).collect();
        let gk: Vec<f64> = (0..d * d).map(|i| if i / d == i % d { (i / d) as f64 + 1.0 } else { 0.2 }).collect();
        let eye: Vec<f64> = (0..d * d).map(|i| if i / d == i % d { 1.0 } else { 0.0 }).collect();
        // Rotations keep the identity: M = I, so P = E = the PCA basis.
        let (p, e) = score_fitted(&gk, &eye, d, 3, &freqs, true, 64).unwrap();
        assert!(p.iter().zip(&e).all(|(a, b)| (a - b).abs() < 1e-3), "P = E under M = I");
        let plain = pca(&gk, d, 3).unwrap();
        for c in 0..3 {
            let dot: f64 = (0..d).map(|n| p[n * 3 + c] * plain[n * 3 + c]).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-3, "column {c}: {dot}");
        }
        // With anisotropic queries P and E differ, but Eᵀ-then-P is a
        // projection: a key in the kept span is rebuilt exactly (PᵀE = I).
        let gq: Vec<f64> = (0..d * d).map(|i| if i / d == i % d { 1.0 + 3.0 * (i / d == 1) as u8 as f64 } else { 0.1 }).collect();
        let (p, e) = score_fitted(&gk, &gq, d, 3, &freqs, false, 64).unwrap();
        for a in 0..3 {
            for c in 0..3 {
                let dot: f64 = (0..d).map(|n| p[n * 3 + a] * e[n * 3 + c]).sum();
                assert!((dot - if a == c { 1.0 } else { 0.0 }).abs() < 1e-9, "({a}, {c}): {dot}");
            }
        }
    }

    #[test]
    fn the_dct_keeps_a_constant_and_pca_finds_the_dominant_axis() {
        // A constant row is the first DCT vector.
        let b = dct(8, 2);
        assert!((0..8).all(|n| (b[n * 2] - (1.0f64 / 8.0).sqrt()).abs() < 1e-12));
        // Rows along e_3 (plus a little noise): the first principal direction is e_3.
        let mut g = vec![0f64; 36];
        for i in 0..6 {
            g[i * 6 + i] = 0.01;
        }
        g[3 * 6 + 3] = 5.0;
        let p = pca(&g, 6, 1).unwrap();
        assert!((p[3] - 1.0).abs() < 1e-9, "{p:?}");
        // The most concentrated Slepian sequence of a narrow band is even and positive.
        let s = dpss(16, 1, 0.1).unwrap();
        assert!(s.iter().all(|&x| x > 0.0));
        assert!((0..8).all(|n| (s[n] - s[15 - n]).abs() < 1e-9));
    }
}
