//! The x86-64 features an artifact's CPU code was compiled for, checked
//! against the host before its library is loaded: an instruction the host
//! lacks would end the process with SIGILL, so such an artifact is refused
//! with an error naming the features instead.
//!
//! The compile records its LLVM target in the manifest (`options.cpu`: the CPU
//! name and the feature string, `+avx2,-avx512f,...`). A feature string names
//! every feature explicitly (`--cpu host` records the host's); a CPU name
//! implies the vector features of [`cpu_features`] (the generic levels
//! `x86-64-v2/v3/v4` and the named Intel and AMD cores since Haswell and Zen),
//! which the compiler's kernel choice reads too (`CpuTarget::has_feature`).
//! Other CPU names with no feature string cannot be checked without LLVM and
//! pass.

/// The features of `x86-64-v2`, `-v3` and `-v4` that vector code can use.
const V2: &[&str] = &["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"];
const V3: &[&str] = &["avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe"];
const V4: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];

/// AVX-512 beyond the base of `x86-64-v4`, as Ice Lake has it (and Zen 4).
const ICL: &[&str] =
    &["avx512vnni", "avx512vbmi", "avx512vbmi2", "avx512ifma", "avx512bitalg", "avx512vpopcntdq", "gfni", "vaes", "vpclmulqdq"];

/// The vector features LLVM CPU `cpu` implies without a feature string, as
/// groups: x86-64-v2/v3/v4 and the named cores since Haswell and Zen (the
/// features this check knows; an unknown name implies none).
pub fn cpu_features(cpu: &str) -> &'static [&'static [&'static str]] {
    match cpu {
        "x86-64-v2" => &[V2],
        "x86-64-v3" | "haswell" | "broadwell" | "skylake" | "znver1" | "znver2" => &[V2, V3],
        "znver3" => &[V2, V3, &["vaes", "vpclmulqdq"]],
        "alderlake" | "raptorlake" | "meteorlake" | "arrowlake" => &[V2, V3, &["avxvnni", "gfni", "vaes", "vpclmulqdq"]],
        "x86-64-v4" | "skylake-avx512" => &[V2, V3, V4],
        "cascadelake" => &[V2, V3, V4, &["avx512vnni"]],
        "cooperlake" => &[V2, V3, V4, &["avx512vnni", "avx512bf16"]],
        "cannonlake" => &[V2, V3, V4, &["avx512vbmi", "avx512ifma"]],
        "icelake-client" | "icelake-server" | "tigerlake" => &[V2, V3, V4, ICL],
        "sapphirerapids" | "emeraldrapids" | "graniterapids" => {
            &[V2, V3, V4, ICL, &["avx512bf16", "avx512fp16", "avxvnni", "amx-tile", "amx-bf16", "amx-int8"]]
        }
        "znver4" => &[V2, V3, V4, ICL, &["avx512bf16"]],
        "znver5" => &[V2, V3, V4, ICL, &["avx512bf16", "avx512vp2intersect", "avxvnni"]],
        _ => &[],
    }
}

/// Whether the host has the LLVM feature `name`; `None` for features this
/// check does not know (they are not vector features kernels emit).
fn host_has(name: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match name {
            "sse3" => has!("sse3"),
            "ssse3" => has!("ssse3"),
            "sse4.1" => has!("sse4.1"),
            "sse4.2" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "f16c" => has!("f16c"),
            "bmi" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "lzcnt" => has!("lzcnt"),
            "movbe" => has!("movbe"),
            "avx512f" => has!("avx512f"),
            "avx512bw" => has!("avx512bw"),
            "avx512cd" => has!("avx512cd"),
            "avx512dq" => has!("avx512dq"),
            "avx512vl" => has!("avx512vl"),
            "avx512vnni" => has!("avx512vnni"),
            "avx512bf16" => has!("avx512bf16"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512vbmi2" => has!("avx512vbmi2"),
            "avx512ifma" => has!("avx512ifma"),
            "avx512bitalg" => has!("avx512bitalg"),
            "avx512vpopcntdq" => has!("avx512vpopcntdq"),
            "avx512fp16" => has!("avx512fp16"),
            "avx512vp2intersect" => has!("avx512vp2intersect"),
            "avxvnni" => has!("avxvnni"),
            "gfni" => has!("gfni"),
            "vaes" => has!("vaes"),
            "vpclmulqdq" => has!("vpclmulqdq"),
            // Tiles need the kernel's permission besides CPUID (`amx.rs`).
            amx if crate::amx::is_amx(amx) => crate::amx::usable(amx),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        None
    }
}

/// The features code for LLVM CPU `cpu` with feature string `features` may
/// use, as far as they can be told without LLVM: the `+` entries of the
/// string, and what the CPU name implies ([`cpu_features`]) unless the string
/// turns it off.
pub fn required(cpu: &str, features: &str) -> Vec<String> {
    let mut out: Vec<String> = cpu_features(cpu).iter().flat_map(|l| l.iter().map(|f| f.to_string())).collect();
    let disabled: Vec<&str> = features.split(',').filter_map(|f| f.trim().strip_prefix('-')).collect();
    out.retain(|f| !disabled.contains(&f.as_str()));
    for f in features.split(',').filter_map(|f| f.trim().strip_prefix('+')) {
        if !out.iter().any(|o| o == f) {
            out.push(f.to_string());
        }
    }
    out
}

/// Of `required`, the features this check knows (the vector and bit
/// manipulation features kernels use), in order.
pub fn checked(required: &[String]) -> Vec<String> {
    required.iter().filter(|f| host_has(f).is_some()).cloned().collect()
}

/// Of `required`, the features the host is known to lack.
pub fn missing_on_host(required: &[String]) -> Vec<String> {
    required.iter().filter(|f| host_has(f) == Some(false)).cloned().collect()
}

/// The CPU target recorded in a manifest's options: `(cpu, features)`.
pub fn recorded_target(options: &serde_json::Value) -> (String, String) {
    let cpu = &options["cpu"];
    (cpu["cpu"].as_str().unwrap_or("").to_string(), cpu["features"].as_str().unwrap_or("").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_imply_their_features_and_the_string_adds_and_removes() {
        let v3 = required("x86-64-v3", "");
        assert!(v3.iter().any(|f| f == "avx2") && !v3.iter().any(|f| f == "avx512f"));
        let v4 = required("x86-64-v4", "-avx512bw,+avx512vnni");
        assert!(v4.iter().any(|f| f == "avx512f") && v4.iter().any(|f| f == "avx512vnni") && !v4.iter().any(|f| f == "avx512bw"));
        assert_eq!(required("x86-64", "+avx2,-avx512f,+fma"), ["avx2", "fma"]);
        // A named core implies its vector features: a `--cpu znver4` artifact
        // (no feature string) is refused on a host without AVX-512 or VNNI.
        let zen4 = required("znver4", "");
        assert!(["avx2", "avx512f", "avx512vl", "avx512vnni", "avx512bf16"].iter().all(|f| zen4.iter().any(|z| z == f)));
        assert!(!required("znver3", "").iter().any(|f| f.starts_with("avx512")));
        assert!(required("alderlake", "").iter().any(|f| f == "avxvnni"));
        // Every feature a name implies is one this check knows.
        for cpu in ["znver5", "sapphirerapids", "cooperlake", "cannonlake", "alderlake"] {
            let r = required(cpu, "");
            assert_eq!(checked(&r), r, "{cpu}");
        }
    }

    #[test]
    fn unknown_features_are_never_reported_missing() {
        assert!(missing_on_host(&["sahf".into(), "64bit".into(), "no-such-feature".into()]).is_empty());
    }
}
