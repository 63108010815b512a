//! Transcendental functions written in arith ops, so every target gets the same
//! accurate, vectorizable code without a libm: exp, tanh, sigmoid, erf, and the
//! activations built on them.

use super::builder::{KernelBuilder, V};
use sparsec_ir::GeluApprox;

/// An elementwise activation: the GELU and SiLU ops, and what a matmul applies
/// to its results when one is fused into it (GPT-2's bias + GELU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu(GeluApprox),
    Silu,
}

/// `act(x)` for a scalar f32 `x`.
pub fn activation(b: &mut KernelBuilder, act: Activation, x: &str) -> V {
    match act {
        Activation::Gelu(approx) => {
            // 0.5·x·(1 + t): t = tanh(√(2/π)·(x + 0.044715·x³)) or erf(x/√2).
            let t = match approx {
                GeluApprox::Tanh => {
                    let c = b.f32((2.0f32 / std::f32::consts::PI).sqrt());
                    let k = b.f32(0.044715);
                    let x2 = b.mul(x, x);
                    let x3 = b.mul(&x2, x);
                    let inner = b.fma(&k, &x3, x);
                    let arg = b.mul(&c, &inner);
                    tanh(b, &arg)
                }
                GeluApprox::Erf => {
                    let r = b.f32(std::f32::consts::FRAC_1_SQRT_2);
                    let arg = b.mul(x, &r);
                    erf(b, &arg)
                }
            };
            let one = b.f32(1.0);
            let half = b.f32(0.5);
            let s = b.add(&one, &t);
            let hx = b.mul(&half, x);
            b.mul(&hx, &s)
        }
        Activation::Silu => {
            let s = sigmoid(b, x);
            b.mul(x, &s)
        }
    }
}

/// e^x: range reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial
/// (relative error below 2e-7 on [-87, 88]; inputs are clamped to that range).
pub fn exp(b: &mut KernelBuilder, x: &str) -> V {
    exp_lanes(b, x, None)
}

/// `exp` lane by lane on a `vector<width x f32>` (the same operations).
pub fn vexp(b: &mut KernelBuilder, x: &str, width: u32) -> V {
    exp_lanes(b, x, Some(width))
}

/// `exp` on f32 (`width` `None`) or on vectors of `width` lanes.
fn exp_lanes(b: &mut KernelBuilder, x: &str, width: Option<u32>) -> V {
    let (ty, ity) = match width {
        None => ("f32".to_string(), "i32".to_string()),
        Some(w) => (KernelBuilder::vty(w), format!("vector<{w}xi32>")),
    };
    let c = |b: &mut KernelBuilder, v: f32| match width {
        None => b.f32(v),
        Some(w) => b.vsplat_f32(v, w),
    };
    let (lo, hi) = (c(b, -87.0), c(b, 88.0));
    let x = b.def(format!("arith.maxnumf {x}, {lo} : {ty}"));
    let x = b.def(format!("arith.minnumf {x}, {hi} : {ty}"));
    let (log2e, half) = (c(b, std::f32::consts::LOG2_E), c(b, 0.5));
    let fma = |b: &mut KernelBuilder, p: &str, q: &str, r: &str| b.def(format!("math.fma {p}, {q}, {r} : {ty}"));
    let t = fma(b, &x, &log2e, &half);
    let n = b.def(format!("math.floor {t} : {ty}"));
    // Cody-Waite: ln2 split in a part exact in f32 and a remainder.
    let (ln2_hi, ln2_lo) = (c(b, -0.693_359_4), c(b, 2.121_944_4e-4));
    let r = fma(b, &n, &ln2_hi, &x);
    let r = fma(b, &n, &ln2_lo, &r);
    // Horner: 1 + r(1 + r(1/2 + r(1/6 + r(1/24 + r(1/120 + r/720)))))
    let coeffs = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
    let mut p = c(b, coeffs[0]);
    for k in &coeffs[1..] {
        let k = c(b, *k);
        p = fma(b, &p, &r, &k);
    }
    // 2^n from its exponent bits.
    let ni = b.def(format!("arith.fptosi {n} : {ty} to {ity}"));
    let (bias, shift) = match width {
        None => (b.i32(127), b.i32(23)),
        Some(w) => (b.vsplat_int(127, w, "i32"), b.vsplat_int(23, w, "i32")),
    };
    let e = b.def(format!("arith.addi {ni}, {bias} : {ity}"));
    let bits = b.def(format!("arith.shli {e}, {shift} : {ity}"));
    let scale = b.def(format!("arith.bitcast {bits} : {ity} to {ty}"));
    b.def(format!("arith.mulf {p}, {scale} : {ty}"))
}

/// tanh(x) = 1 − 2 / (e^{2x} + 1).
pub fn tanh(b: &mut KernelBuilder, x: &str) -> V {
    let x2 = b.add(x, x);
    let e = exp(b, &x2);
    let one = b.f32(1.0);
    let two = b.f32(2.0);
    let d = b.add(&e, &one);
    let q = b.div(&two, &d);
    b.sub(&one, &q)
}

/// 1 / (1 + e^{-x}).
pub fn sigmoid(b: &mut KernelBuilder, x: &str) -> V {
    let nx = b.neg(x);
    let e = exp(b, &nx);
    let one = b.f32(1.0);
    let d = b.add(&one, &e);
    b.div(&one, &d)
}

/// erf(x), Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
pub fn erf(b: &mut KernelBuilder, x: &str) -> V {
    let ax = b.math("absf", x);
    let p = b.f32(0.327_591_1);
    let one = b.f32(1.0);
    let d = b.fma(&p, &ax, &one);
    let t = b.div(&one, &d);
    let coeffs = [1.061_405_4, -1.453_152_1, 1.421_413_7, -0.284_496_73, 0.254_829_6];
    let mut poly = b.f32(coeffs[0]);
    for c in &coeffs[1..] {
        let c = b.f32(*c);
        poly = b.fma(&poly, &t, &c);
    }
    poly = b.mul(&poly, &t);
    let x2 = b.mul(&ax, &ax);
    let nx2 = b.neg(&x2);
    let e = exp(b, &nx2);
    let pe = b.mul(&poly, &e);
    let y = b.sub(&one, &pe);
    let ny = b.neg(&y);
    b.select_lt0(x, &ny, &y)
}

/// sin(x) and cos(x) in f64 (x an f64 value): Cody-Waite reduction by π/2 in
/// two parts, Taylor polynomials on |r| ≤ π/4 (error below 1e-15), quadrant
/// selection. All arith ops, so every target computes the same.
pub fn sincos_f64(b: &mut KernelBuilder, x: &str) -> (V, V) {
    let c = |b: &mut KernelBuilder, v: f64| b.f64(v);
    let two_over_pi = c(b, std::f64::consts::FRAC_2_PI);
    let t = b.def(format!("arith.mulf {x}, {two_over_pi} : f64"));
    let k = b.def(format!("math.roundeven {t} : f64"));
    // π/2 = hi + lo with hi exact in 33 bits, so k·hi is exact for |k| < 2^20.
    let hi = c(b, 1.570_796_326_734_125_6);
    let lo = c(b, 6.077_100_506_506_192e-11);
    let khi = b.def(format!("arith.mulf {k}, {hi} : f64"));
    let r = b.def(format!("arith.subf {x}, {khi} : f64"));
    let klo = b.def(format!("arith.mulf {k}, {lo} : f64"));
    let r = b.def(format!("arith.subf {r}, {klo} : f64"));
    let r2 = b.def(format!("arith.mulf {r}, {r} : f64"));
    // sin r = r·(1 − r²/3! + r⁴/5! − ...), cos r = 1 − r²/2! + r⁴/4! − ...
    let horner = |b: &mut KernelBuilder, coeffs: &[f64]| -> V {
        let mut p = b.f64(coeffs[0]);
        for co in &coeffs[1..] {
            let co = b.f64(*co);
            let m = b.def(format!("arith.mulf {p}, {r2} : f64"));
            p = b.def(format!("arith.addf {m}, {co} : f64"));
        }
        p
    };
    let fact = |n: u32| (1..=n).map(|i| i as f64).product::<f64>();
    let sin_c: Vec<f64> = (0..9).rev().map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } / fact(2 * i + 1)).collect();
    let cos_c: Vec<f64> = (0..9).rev().map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } / fact(2 * i)).collect();
    let sp = horner(b, &sin_c);
    let s = b.def(format!("arith.mulf {sp}, {r} : f64"));
    let co = horner(b, &cos_c);
    // quadrant q = k mod 4: (sin, cos) → (s, c), (c, −s), (−s, −c), (−c, s)
    let ki = b.def(format!("arith.fptosi {k} : f64 to i64"));
    let three = b.i64(3);
    let q = b.def(format!("arith.andi {ki}, {three} : i64"));
    let one = b.i64(1);
    let two = b.i64(2);
    let odd_bit = b.def(format!("arith.andi {q}, {one} : i64"));
    let odd = b.def(format!("arith.cmpi eq, {odd_bit}, {one} : i64"));
    let q_plus = b.def(format!("arith.addi {q}, {one} : i64"));
    let sin_neg_bit = b.def(format!("arith.andi {q}, {two} : i64"));
    let sin_neg = b.def(format!("arith.cmpi eq, {sin_neg_bit}, {two} : i64"));
    let cos_neg_bit = b.def(format!("arith.andi {q_plus}, {two} : i64"));
    let cos_neg = b.def(format!("arith.cmpi eq, {cos_neg_bit}, {two} : i64"));
    let sin_mag = b.def(format!("arith.select {odd}, {co}, {s} : f64"));
    let cos_mag = b.def(format!("arith.select {odd}, {s}, {co} : f64"));
    let nsin = b.def(format!("arith.negf {sin_mag} : f64"));
    let ncos = b.def(format!("arith.negf {cos_mag} : f64"));
    let sin = b.def(format!("arith.select {sin_neg}, {nsin}, {sin_mag} : f64"));
    let cos = b.def(format!("arith.select {cos_neg}, {ncos}, {cos_mag} : f64"));
    (sin, cos)
}
