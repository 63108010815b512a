//! AMX tiles on Linux: whether the CPU has them (CPUID) and the process may
//! use them. Linux hands out the tile data state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process);
//! a tile instruction run without it ends the process with SIGILL, so the
//! loader asks here before it accepts an artifact whose code uses tiles.

use std::sync::OnceLock;

/// The AMX features CPUID leaf 7 reports, as LLVM names them, with their EDX bit.
const AMX_BITS: [(&str, u32); 3] = [("amx-bf16", 22), ("amx-tile", 24), ("amx-int8", 25)];

/// Whether `name` is an AMX feature (`amx-tile`, `amx-bf16`, `amx-int8`).
pub fn is_amx(name: &str) -> bool {
    AMX_BITS.iter().any(|(n, _)| *n == name)
}

/// Whether the host has AMX feature `name` and this process may use tiles
/// (the permission is requested on the first call). `false` for names that
/// are not AMX features.
pub fn usable(name: &str) -> bool {
    let Some(&(_, bit)) = AMX_BITS.iter().find(|(n, _)| *n == name) else { return false };
    cpuid_edx7() >> bit & 1 == 1 && permitted()
}

/// CPUID leaf 7, subleaf 0, register EDX (0 where the leaf is absent).
fn cpuid_edx7() -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0 says whether leaf 7 exists.
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return 0;
        }
        std::arch::x86_64::__cpuid_count(7, 0).edx
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// Whether the kernel granted this process the tile data state (asked once).
fn permitted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(request)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn request() -> bool {
    /// `arch_prctl` codes of `asm/prctl.h` and the tile data's XSAVE component.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes an integer argument and
    // touches no memory of ours; a kernel without AMX support returns an error.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn request() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_amx_names_are_amx() {
        assert!(is_amx("amx-tile") && is_amx("amx-bf16") && is_amx("amx-int8"));
        assert!(!is_amx("avx512f") && !usable("avx512f"));
    }
}
