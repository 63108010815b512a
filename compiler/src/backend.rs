//! LLVM side of code generation with inkwell: set target and data layout,
//! optimize, emit an x86-64 object (and assembly) or PTX.

use crate::error::CompileError;
use crate::options::{CpuTarget, CudaTarget};
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;
use std::sync::Once;

/// Output of the LLVM stage for one kernel.
pub struct CodegenOutput {
    /// Optimized LLVM IR text.
    pub llvm_ir: String,
    /// Object file bytes (CPU) or PTX text (NVIDIA).
    pub code: Vec<u8>,
    /// Machine-code bytes: `.text` size of the object, or the PTX length.
    pub code_bytes: usize,
    /// x86-64 assembly, when asked for.
    pub asm: Option<String>,
}

fn init_targets() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let cfg = InitializationConfig::default();
        Target::initialize_x86(&cfg);
        Target::initialize_nvptx(&cfg);
    });
}

fn opt_level(level: u8) -> OptimizationLevel {
    match level {
        0 => OptimizationLevel::None,
        1 => OptimizationLevel::Less,
        2 => OptimizationLevel::Default,
        _ => OptimizationLevel::Aggressive,
    }
}

fn machine(kernel: &str, triple: &str, cpu: &str, features: &str, level: u8) -> Result<TargetMachine, CompileError> {
    init_targets();
    let err = |stage, message: String| CompileError::Llvm { kernel: kernel.to_string(), stage, message };
    let triple = TargetTriple::create(triple);
    let target = Target::from_triple(&triple).map_err(|e| err("target lookup", e.to_string()))?;
    target
        .create_target_machine(&triple, cpu, features, opt_level(level), RelocMode::PIC, CodeModel::Default)
        .ok_or_else(|| err("target machine", format!("no target machine for cpu `{cpu}` features `{features}`")))
}

fn optimize(kernel: &str, module: &Module, tm: &TargetMachine, level: u8) -> Result<(), CompileError> {
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module.verify().map_err(|e| CompileError::Llvm { kernel: kernel.into(), stage: "verify", message: e.to_string() })?;
    let passes = format!("default<O{}>", level.min(3));
    module.run_passes(&passes, tm, PassBuilderOptions::create()).map_err(|e| CompileError::Llvm {
        kernel: kernel.into(),
        stage: "optimize",
        message: e.to_string(),
    })
}

fn text_bytes(object: &[u8]) -> usize {
    use object::{Object, ObjectSection, SectionKind};
    object::File::parse(object)
        .map(|f| f.sections().filter(|s| s.kind() == SectionKind::Text).map(|s| s.size() as usize).sum())
        .unwrap_or(object.len())
}

/// Optimizes for the CPU and emits an object file.
pub fn emit_cpu(kernel: &str, module: &Module, cpu: &CpuTarget, level: u8, want_asm: bool) -> Result<CodegenOutput, CompileError> {
    let tm = machine(kernel, &cpu.triple, &cpu.cpu, &cpu.features, level)?;
    optimize(kernel, module, &tm, level)?;
    let emit = |ft| {
        tm.write_to_memory_buffer(module, ft).map(|b| b.as_slice().to_vec()).map_err(|e| CompileError::Llvm {
            kernel: kernel.into(),
            stage: "emit",
            message: e.to_string(),
        })
    };
    let code = emit(FileType::Object)?;
    let asm = if want_asm { Some(String::from_utf8_lossy(&emit(FileType::Assembly)?).into_owned()) } else { None };
    Ok(CodegenOutput { llvm_ir: module.print_to_string().to_string(), code_bytes: text_bytes(&code), code, asm })
}

/// Optimizes for NVPTX and emits PTX text.
pub fn emit_ptx(kernel: &str, module: &Module, cuda: &CudaTarget, level: u8) -> Result<CodegenOutput, CompileError> {
    let tm = machine(kernel, "nvptx64-nvidia-cuda", &cuda.sm, &cuda.ptx_features, level)?;
    optimize(kernel, module, &tm, level)?;
    let code = tm.write_to_memory_buffer(module, FileType::Assembly).map(|b| b.as_slice().to_vec()).map_err(|e| CompileError::Llvm {
        kernel: kernel.into(),
        stage: "emit ptx",
        message: e.to_string(),
    })?;
    Ok(CodegenOutput { llvm_ir: module.print_to_string().to_string(), code_bytes: code.len(), code, asm: None })
}
