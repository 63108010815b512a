//! Comparing outputs: the tolerance rule used by `--check` and the tests.

use ndarray::ArrayD;

/// `|got − want| ≤ atol + rtol·|want|` elementwise, with NaN never passing.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Default for Tolerance {
    /// f32 kernels against the f64-accumulating reference.
    fn default() -> Self {
        Tolerance { atol: 1e-4, rtol: 1e-4 }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    pub max_abs_error: f32,
    /// Index (flat) of the worst element.
    pub worst_index: usize,
    pub passed: bool,
}

pub fn compare(got: &ArrayD<f32>, want: &ArrayD<f32>, tol: Tolerance) -> Comparison {
    if got.shape() != want.shape() {
        return Comparison { max_abs_error: f32::INFINITY, worst_index: 0, passed: false };
    }
    let mut c = Comparison { max_abs_error: 0.0, worst_index: 0, passed: true };
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let e = (g - w).abs();
        if e.is_nan() || e > tol.atol + tol.rtol * w.abs() {
            c.passed = false;
        }
        if e.is_nan() || e > c.max_abs_error {
            c.max_abs_error = if e.is_nan() { f32::NAN } else { e };
            c.worst_index = i;
        }
    }
    c
}
