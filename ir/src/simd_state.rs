//! The vector registers' upper halves after faer: its SIMD kernels (AVX2 and
//! AVX-512, dispatched at run time) return with the upper halves of the
//! vector registers in use, and the legacy-SSE code Rust emits for the
//! baseline x86-64 target then runs several times slower on that thread until
//! a `vzeroupper` (on the Zen 4 dev guest a sequence-axis block compression
//! took 90 µs before one 64×64 eigendecomposition and 355 µs after it, and
//! again 90 µs after `vzeroupper`; on an H200 host's Xeon a 2000-token
//! prefill of such caches took 4.9-5.4 s against 1.15 s). Every faer
//! computation of this workspace is followed by `clean_upper`.

/// Clears the upper halves of the vector registers (`vzeroupper`) where the
/// CPU has AVX; does nothing elsewhere.
pub fn clean_upper() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: `vzeroupper` needs AVX, which the line above detected; it
        // only zeroes the upper halves of the vector registers, which the
        // compiler treats as clobbered by this intrinsic.
        unsafe { std::arch::x86_64::_mm256_zeroupper() }
    }
}

/// `f()` (a faer computation), then `clean_upper`.
pub fn faer<T>(f: impl FnOnce() -> T) -> T {
    let out = f();
    clean_upper();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the upper halves of the AVX registers are marked in use
    /// (XINUSE bit 2, `xgetbv` with ECX = 1); `None` where the CPU cannot say.
    #[cfg(target_arch = "x86_64")]
    fn upper_in_use() -> Option<bool> {
        use std::arch::x86_64::{__cpuid_count, _xgetbv};
        // `cpuid` leaf 0xD subleaf 1 exists on every x86-64 CPU with XSAVE,
        // checked first; its EAX bit 2 says `xgetbv` takes ECX = 1.
        let xgetbv1 = std::arch::is_x86_feature_detected!("xsave") && __cpuid_count(0xd, 1).eax & 4 != 0;
        // SAFETY: XSAVE and XGETBV with ECX = 1 are supported (above).
        xgetbv1.then(|| unsafe { _xgetbv(1) } & 4 != 0)
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_faer_computation_leaves_the_upper_halves_clean() {
        let m = faer::Mat::<f64>::from_fn(64, 64, |i, j| 1.0 / (1 + i + j) as f64);
        let e = faer(|| m.self_adjoint_eigen(faer::Side::Lower));
        assert!(e.is_ok());
        if !std::arch::is_x86_feature_detected!("avx") {
            return;
        }
        match upper_in_use() {
            Some(dirty) => assert!(!dirty, "the AVX upper halves are still in use after `faer`"),
            None => eprintln!("SKIPPED: this CPU does not report XINUSE (xgetbv 1)"),
        }
    }
}
