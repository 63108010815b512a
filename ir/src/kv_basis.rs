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

/// Eigenvectors of the `r` largest eigenvalues of symmetric `m`, as a
/// row-major `d × r` matrix, each with its largest-magnitude entry positive
/// (a fixed sign, so results do not depend on the solver's).
fn top_eigenvectors(m: Mat<f64>, r: usize) -> Option<Vec<f64>> {
    let d = m.nrows();
    let e = m.self_adjoint_eigen(Side::Lower).ok()?;
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
