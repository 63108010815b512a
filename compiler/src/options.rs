//! Every option that changes what the compiler produces, in one struct. Its
//! canonical JSON is hashed into the cache key; nothing else is.

use serde::{Deserialize, Serialize};

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

    /// A portable x86-64 target with AVX2 and FMA (for reproducible snapshots).
    pub fn x86_64_v3() -> CpuTarget {
        CpuTarget { triple: "x86_64-unknown-linux-gnu".into(), cpu: "x86-64-v3".into(), features: String::new() }
    }
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

/// What `#specialize(auto)` may spend, over the whole graph, on kernels that
/// bake a weight's nonzero structure into code (`indices`): estimated compile
/// time and machine code (`sparse_select` estimates both per stored value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BakeBudget {
    pub compile_ms: u64,
    pub code_bytes: u64,
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

    pub fn wants(&self, e: Emit) -> bool {
        self.emit.contains(&e)
    }
}
