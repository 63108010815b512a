//! Every option that changes what the compiler produces, in one struct. Its
//! canonical JSON is hashed into the cache key; nothing else is.

use serde::{Deserialize, Serialize};
use sparsec_ir::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Cpu,
    Cuda,
    All,
}

impl TargetKind {
    pub fn cpu(self) -> bool {
        matches!(self, TargetKind::Cpu | TargetKind::All)
    }
    pub fn cuda(self) -> bool {
        matches!(self, TargetKind::Cuda | TargetKind::All)
    }
}

/// What `--emit` writes into the artifact's `emit/` folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Emit {
    /// The graph after the passes (`.sir`).
    Ir,
    /// Each kernel's MLIR before and after lowering to the LLVM dialect.
    Mlir,
    /// Each kernel's optimized LLVM IR.
    Llvm,
    /// Each kernel's PTX (also in `cuda/`).
    Ptx,
    /// Each kernel's x86-64 assembly.
    Asm,
}

impl Emit {
    pub fn parse(s: &str) -> Option<Emit> {
        Some(match s {
            "ir" => Emit::Ir,
            "mlir" => Emit::Mlir,
            "llvm" => Emit::Llvm,
            "ptx" => Emit::Ptx,
            "asm" => Emit::Asm,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuTarget {
    pub triple: String,
    /// LLVM CPU name, e.g. `x86-64-v3` or the host's (`znver3`).
    pub cpu: String,
    /// LLVM feature string, e.g. `+avx2,+fma`.
    pub features: String,
}

impl CpuTarget {
    /// The machine this runs on, as LLVM sees it.
    pub fn host() -> CpuTarget {
        use inkwell::targets::TargetMachine;
        CpuTarget {
            triple: TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned(),
            cpu: TargetMachine::get_host_cpu_name().to_string(),
            features: TargetMachine::get_host_cpu_features().to_string(),
        }
    }

    /// Whether code for this target may use the LLVM feature `feature` (`avx2`,
    /// `avx512f`, ...): an explicit `+feature`/`-feature` decides (the last one
    /// written), else the CPU name implies it (`x86-64-v3`/`-v4` and the named
    /// Intel and AMD cores, see [`cpu_implies`]).
    pub fn has_feature(&self, feature: &str) -> bool {
        if !self.triple.starts_with("x86_64") {
            return false;
        }
        for f in self.features.split(',').rev() {
            match f.trim().split_at_checked(1) {
                Some(("+", name)) if name == feature => return true,
                Some(("-", name)) if name == feature => return false,
                _ => {}
            }
        }
        cpu_implies(&self.cpu, feature)
    }

    /// Whether code for this target may use AVX2 (and FMA with it).
    pub fn has_avx2(&self) -> bool {
        self.has_feature("avx2")
    }

    /// Whether code for this target may use 512-bit vectors (AVX-512 F).
    pub fn has_avx512(&self) -> bool {
        self.has_feature("avx512f")
    }

    /// What the CPU kernels take from this target's instruction set.
    pub fn isa(&self) -> CpuIsa {
        CpuIsa {
            lanes: if self.has_avx512() { 16 } else { 8 },
            // `vpdpbusd` on 256-bit vectors: AVX512-VNNI with VL, or AVX-VNNI.
            vnni: (self.has_feature("avx512vnni") && self.has_feature("avx512vl")) || self.has_feature("avxvnni"),
            // Tiles, `tdpbf16ps`, and `vcvtne2ps2bf16` to round activations.
            amx_bf16: self.has_feature("amx-tile") && self.has_feature("amx-bf16") && self.has_feature("avx512bf16"),
            // Tiles, `tdpbsud`; AVX512-BW to unpack nibbles 64 at a time and
            // AVX512-VNNI for one row's dot products.
            amx_int8: self.has_feature("amx-tile")
                && self.has_feature("amx-int8")
                && self.has_feature("avx512bw")
                && self.has_feature("avx512vnni"),
        }
    }

    /// A portable x86-64 target with AVX2 and FMA (for reproducible snapshots).
    pub fn x86_64_v3() -> CpuTarget {
        CpuTarget { triple: "x86_64-unknown-linux-gnu".into(), cpu: "x86-64-v3".into(), features: String::new() }
    }

    /// A portable x86-64 target with AVX-512 (F, BW, CD, DQ, VL) besides
    /// AVX2: the 16-lane kernels' snapshots.
    pub fn x86_64_v4() -> CpuTarget {
        CpuTarget { triple: "x86_64-unknown-linux-gnu".into(), cpu: "x86-64-v4".into(), features: String::new() }
    }
}

/// What the CPU kernel generators take from the target instead of constants
/// (`CpuTarget::isa`): each kernel that uses a field falls back to AVX2's
/// code where the target lacks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuIsa {
    /// f32 lanes of the widest vectors: 16 (one zmm register) with AVX-512,
    /// else 8 (one ymm register).
    pub lanes: u32,
    /// Whether `vpdpbusd` (u8 × i8 dot products of 4, accumulated in i32) runs
    /// on 256-bit vectors: AVX512-VNNI with AVX512-VL, or AVX-VNNI.
    pub vnni: bool,
    /// Whether AMX tiles with bf16 dot products (`tdpbf16ps`) are there, with
    /// AVX512-BF16 to round activations: bf16 matmul weights are then stored
    /// as tiles (`tile_weights`) and multiplied on them (`amx_matmul`).
    pub amx_bf16: bool,
    /// Whether AMX tiles with int8 dot products (`tdpbsud`) are there, with
    /// AVX512-BW and AVX512-VNNI: q4_1 matmul weights whose kernels take int8 activations are
    /// then stored as tile records (`tile_weights`) and multiplied on tiles.
    pub amx_int8: bool,
}

impl Default for CpuIsa {
    /// AVX2: 8 lanes, no VNNI.
    fn default() -> Self {
        CpuIsa { lanes: 8, vnni: false, amx_bf16: false, amx_int8: false }
    }
}

/// Whether an x86-64 CPU of LLVM name `cpu` has `feature` without a feature
/// string saying so: the runtime's table, which the loader's ISA check reads
/// too (`sparsec_runtime::isa::cpu_features`), so that code chosen for a
/// feature is code the loader refuses on a host without it.
fn cpu_implies(cpu: &str, feature: &str) -> bool {
    sparsec_runtime::isa::cpu_features(cpu).iter().any(|group| group.contains(&feature))
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CudaTarget {
    /// `sm_90` for Hopper.
    pub sm: String,
    /// PTX ISA as an LLVM feature, e.g. `+ptx80`; empty for LLVM's default for `sm`.
    pub ptx_features: String,
}

impl Default for CudaTarget {
    fn default() -> Self {
        CudaTarget { sm: "sm_90".into(), ptx_features: String::new() }
    }
}

impl CudaTarget {
    /// Whether the target has `griddepcontrol` (programmatic dependent
    /// launch): `sm_90` and later, family and architecture-specific variants
    /// (`sm_90a`) included.
    pub fn grid_dependency(&self) -> bool {
        let digits: String = self.sm.trim_start_matches("sm_").chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse::<u32>().is_ok_and(|v| v >= 90)
    }
}

/// What `#specialize(auto)` may spend, over the whole graph, on kernels that
/// bake a weight's nonzero structure into code (`indices`): estimated compile
/// time and machine code (`sparse_select` estimates both per stored value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BakeBudget {
    pub compile_ms: u64,
    pub code_bytes: u64,
}

/// How CPU matmuls over block-quantized weights (Q8_0, Q4_0, Q4_1) take their
/// activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantActivations {
    /// Quantized per block of 32 to int8 with an f32 scale, then integer dot
    /// products (what llama.cpp does); needs AVX2, else `f32` is used. Results
    /// differ from the f32 reference by the activations' rounding (~0.4% of each
    /// block's largest value per element).
    #[default]
    Int8,
    /// Kept f32; weights are dequantized in registers: equals the reference to
    /// f32 rounding.
    F32,
}

/// The operands the CUDA tiled tensor-core matmul (`mma_tiled`, prefill over
/// f16/bf16 weights) gives its MMAs for the f32 activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuMmaActivations {
    /// Each activation as a hi and a lo part of the weights' type, two MMAs
    /// (22 bits of each activation for f16 weights, 16 for bf16): products
    /// near f32 rounding.
    #[default]
    Split,
    /// Each activation rounded to the weights' type, one MMA (what an f16 or
    /// bf16 GEMM in PyTorch does): relative error up to 2^-11 (f16) or 2^-8
    /// (bf16) per activation.
    Half,
}

impl GpuMmaActivations {
    fn is_split(&self) -> bool {
        *self == GpuMmaActivations::Split
    }
}

/// The element type of the KV caches (the keys and values every attention op
/// keeps across calls): `CompileOptions::kv_cache` for a CPU-only target,
/// `CompileOptions::cuda_kv_cache` for targets that include CUDA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    /// Half precision (what llama.cpp keeps): half the memory, and half the bytes
    /// decode attention reads per token. Each key and value is rounded to f16
    /// (relative error at most 2^-11) as it is appended.
    #[default]
    F16,
    /// Single precision: attention equals the reference to f32 rounding.
    F32,
    /// Each appended key and value row in blocks of 32 quantized as Q8_0 (an
    /// f16 scale and 32 int8), laid out per row as `sparsec_ir::quant` packs
    /// a tensor (quants, then scales): 34 bytes per 32 values, 53% of f16.
    /// Attention dequantizes a key tile once per KV group. The head width
    /// must be a multiple of 32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// As `Q8_0` with 4-bit Q4_0 blocks (scale only): 28% of f16.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// As `Q8_0` with 4-bit Q4_1 blocks (scale and minimum): 31% of f16.
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl KvCacheType {
    fn f32() -> KvCacheType {
        KvCacheType::F32
    }

    fn is_f32(&self) -> bool {
        *self == KvCacheType::F32
    }
}

/// The element type of dense matmul weights and embedding tables that a model
/// gives as f32 (`--weights-dtype`). Checkpoint tensors stored quantized stay so,
/// and pruned weights stay f32; a bf16 or f16 checkpoint read back as the same
/// type loses nothing (its values widened to f32 exactly). The block-quantized
/// types quantize the matrices whose rows are whole blocks of 32 as the
/// weights are packed (at compile time, or at load with `--strip-weights`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsDType {
    /// Single precision: the exact mode.
    #[default]
    F32,
    /// Half precision (rounded to nearest): decode reads half the bytes.
    F16,
    /// bfloat16 (rounded to nearest even): f32's range, 8 bits of mantissa.
    Bf16,
    /// Blocks of 32 int8 values with an f16 scale (8.5 bits a weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Blocks of 32 4-bit values with an f16 scale and offset (5 bits a weight).
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl WeightsDType {
    pub fn is_f32(&self) -> bool {
        *self == WeightsDType::F32
    }

    /// The IR type of the weights, `None` for f32 (left as they are).
    pub fn stored(self) -> Option<sparsec_ir::DType> {
        match self {
            WeightsDType::F32 => None,
            WeightsDType::F16 => Some(sparsec_ir::DType::F16),
            WeightsDType::Bf16 => Some(sparsec_ir::DType::BF16),
            WeightsDType::Q8_0 => Some(sparsec_ir::DType::Q8_0),
            WeightsDType::Q4_1 => Some(sparsec_ir::DType::Q4_1),
        }
    }
}

impl Default for BakeBudget {
    fn default() -> Self {
        BakeBudget { compile_ms: 5_000, code_bytes: 512 << 10 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CompileOptions {
    pub target: TargetKind,
    pub cpu: CpuTarget,
    pub cuda: CudaTarget,
    /// LLVM optimization level 0..=3.
    pub opt_level: u8,
    pub emit: Vec<Emit>,
    /// The budget `auto` specialization may spend on baked kernels.
    #[serde(default)]
    pub bake_budget: BakeBudget,
    #[serde(default)]
    pub quant_activations: QuantActivations,
    /// The KV caches of a CPU-only target (default f16).
    #[serde(default)]
    pub kv_cache: KvCacheType,
    /// Block-quantized caches hold each head's keys and values rotated by the
    /// normalized Hadamard matrix (`--kv-hadamard`).
    #[serde(default)]
    pub kv_hadamard: bool,
    /// A `q4_1` K cache quantized per channel over groups of positions, the
    /// newest group exact (`--kv-kivi`, `sparsec_ir::kv_channel`); absent
    /// from the canonical JSON when off, so earlier cache keys stay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv_kivi: bool,
    /// The KV caches of a target that includes CUDA (default f32, the exact
    /// mode; absent from the canonical JSON when f32, so earlier cache keys stay).
    #[serde(default = "KvCacheType::f32", skip_serializing_if = "KvCacheType::is_f32")]
    pub cuda_kv_cache: KvCacheType,
    /// Absent from the canonical JSON when f32, so earlier cache keys stay.
    #[serde(default, skip_serializing_if = "WeightsDType::is_f32")]
    pub weights_dtype: WeightsDType,
    /// `--gpu-mma-activations`; absent from the canonical JSON when `split`,
    /// so earlier cache keys stay.
    #[serde(default, skip_serializing_if = "GpuMmaActivations::is_split")]
    pub gpu_mma_activations: GpuMmaActivations,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target: TargetKind::Cpu,
            cpu: CpuTarget::host(),
            cuda: CudaTarget::default(),
            opt_level: 3,
            emit: Vec::new(),
            bake_budget: BakeBudget::default(),
            quant_activations: QuantActivations::default(),
            kv_cache: KvCacheType::default(),
            kv_hadamard: false,
            kv_kivi: false,
            cuda_kv_cache: KvCacheType::F32,
            weights_dtype: WeightsDType::default(),
            gpu_mma_activations: GpuMmaActivations::default(),
        }
    }
}

impl CompileOptions {
    /// Canonical JSON (field order is the struct's; `emit` sorted).
    pub fn canonical_json(&self) -> serde_json::Value {
        let mut o = self.clone();
        o.emit.sort();
        o.emit.dedup();
        serde_json::to_value(&o).unwrap_or(serde_json::Value::Null)
    }

    /// Whether quantized-weight CPU matmuls use int8 activations (asked for and
    /// possible on the CPU target).
    pub fn int8_activations(&self) -> bool {
        self.quant_activations == QuantActivations::Int8 && self.cpu.has_avx2()
    }

    /// The KV caches' element type: `cuda_kv_cache` decides for targets that
    /// include CUDA (f32 or f16; the block-quantized types are CPU caches, so
    /// a CUDA target keeps f32 for them), `kv_cache` for the CPU alone.
    pub fn kv_dtype(&self) -> DType {
        let kv = if self.target.cuda() { self.cuda_kv_cache } else { self.kv_cache };
        match kv {
            KvCacheType::F16 => DType::F16,
            KvCacheType::F32 => DType::F32,
            KvCacheType::Q8_0 | KvCacheType::Q4_0 | KvCacheType::Q4_1 if self.target.cuda() => DType::F32,
            KvCacheType::Q8_0 => DType::Q8_0,
            KvCacheType::Q4_0 => DType::Q4_0,
            KvCacheType::Q4_1 => DType::Q4_1,
        }
    }

    pub fn wants(&self, e: Emit) -> bool {
        self.emit.contains(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::{CompileOptions, CpuIsa, CpuTarget, CudaTarget, GpuMmaActivations};

    #[test]
    fn grid_dependency_needs_sm_90() {
        let sm = |s: &str| CudaTarget { sm: s.into(), ptx_features: String::new() }.grid_dependency();
        assert!(sm("sm_90") && sm("sm_90a") && sm("sm_100") && sm("sm_120"));
        assert!(!sm("sm_80") && !sm("sm_89") && !sm("sm_75") && !sm("compute_90") && !sm(""));
    }

    fn target(cpu: &str, features: &str) -> CpuTarget {
        CpuTarget { triple: "x86_64-unknown-linux-gnu".into(), cpu: cpu.into(), features: features.into() }
    }

    #[test]
    fn vector_lanes_follow_the_target_features() {
        // Implied by the CPU name.
        assert_eq!(CpuTarget::x86_64_v3().isa(), CpuIsa::default());
        assert_eq!(CpuTarget::x86_64_v4().isa(), CpuIsa { lanes: 16, vnni: false, amx_bf16: false, amx_int8: false });
        assert_eq!(target("znver4", "").isa(), CpuIsa { lanes: 16, vnni: true, amx_bf16: false, amx_int8: false });
        assert_eq!(target("znver3", "").isa(), CpuIsa { lanes: 8, vnni: false, amx_bf16: false, amx_int8: false });
        assert_eq!(target("alderlake", "").isa(), CpuIsa { lanes: 8, vnni: true, amx_bf16: false, amx_int8: false });
        assert_eq!(target("sapphirerapids", "").isa(), CpuIsa { lanes: 16, vnni: true, amx_bf16: true, amx_int8: true });
        // AMX tiles need the tile feature and AVX512-BF16 besides AMX-BF16.
        assert!(!target("sapphirerapids", "-amx-tile").isa().amx_bf16);
        assert!(!target("icelake-server", "+amx-bf16,+amx-tile").isa().amx_bf16);
        // VNNI on 256-bit vectors needs VL besides AVX512-VNNI.
        assert!(!target("x86-64-v3", "+avx512vnni").isa().vnni);
        assert!(target("x86-64-v3", "+avx512vnni,+avx512vl").isa().vnni);
        assert!(target("znver3", "").has_avx2());
        assert!(!target("x86-64", "").has_avx2());
        // An explicit feature decides, the last one written winning: a host
        // LLVM names znver4 whose VM hides AVX-512 gets 8 lanes.
        assert_eq!(target("znver4", "+avx2,-avx512f").isa().lanes, 8);
        assert_eq!(target("x86-64-v3", "+avx512f").isa().lanes, 16);
        assert_eq!(target("x86-64-v3", "+avx512f,-avx512f").isa().lanes, 8);
        // A feature whose name starts like another is not it.
        assert_eq!(target("x86-64-v3", "+avx512fp16").isa().lanes, 8);
        // Not x86-64: no x86 vectors.
        let arm = CpuTarget { triple: "aarch64-unknown-linux-gnu".into(), cpu: "x86-64-v4".into(), features: String::new() };
        assert!(!arm.has_avx2() && !arm.has_avx512());
    }

    #[test]
    fn gpu_mma_activations_enter_the_cache_key_only_when_half() {
        let split = CompileOptions { cpu: target("x86-64-v3", ""), ..Default::default() };
        assert!(split.canonical_json().get("gpu_mma_activations").is_none(), "earlier cache keys stay");
        let half = CompileOptions { gpu_mma_activations: GpuMmaActivations::Half, ..split.clone() };
        assert_eq!(half.canonical_json()["gpu_mma_activations"], "half");
        assert_ne!(half.canonical_json(), split.canonical_json());
    }
}
