//! Transcendental functions written in arith ops, so every target gets the same
//! accurate, vectorizable code without a libm: exp, tanh, sigmoid, erf.

use super::builder::{KernelBuilder, V};

/// e^x: range reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial
/// (relative error below 2e-7 on [-87, 88]; inputs are clamped to that range).
pub fn exp(b: &mut KernelBuilder, x: &str) -> V {
    let lo = b.f32(-87.0);
    let hi = b.f32(88.0);
    let x = b.fbin("maxnumf", x, &lo);
    let x = b.fbin("minnumf", &x, &hi);
    let log2e = b.f32(std::f32::consts::LOG2_E);
    let half = b.f32(0.5);
    let t = b.fma(&x, &log2e, &half);
    let n = b.math("floor", &t);
    // Cody-Waite: ln2 split in a part exact in f32 and a remainder.
    let ln2_hi = b.f32(-0.693_359_4);
    let ln2_lo = b.f32(2.121_944_4e-4);
    let r = b.fma(&n, &ln2_hi, &x);
    let r = b.fma(&n, &ln2_lo, &r);
    // Horner: 1 + r(1 + r(1/2 + r(1/6 + r(1/24 + r(1/120 + r/720)))))
    let coeffs = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
    let mut p = b.f32(coeffs[0]);
    for c in &coeffs[1..] {
        let c = b.f32(*c);
        p = b.fma(&p, &r, &c);
    }
    let scale = b.exp2_int(&n);
    b.mul(&p, &scale)
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
