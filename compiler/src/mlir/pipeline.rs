//! MLIR side of code generation with melior: parse and verify a kernel module,
//! lower it to the LLVM dialect with MLIR's conversion passes, translate to LLVM IR.

use super::builder::Device;
use crate::error::CompileError;
use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes};
use melior::Context;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Once;

/// The lowering pipeline from our dialect mix to the LLVM dialect.
pub fn lowering_pipeline(device: Device) -> &'static str {
    match device {
        Device::Cpu => {
            "builtin.module(convert-scf-to-cf, convert-vector-to-llvm, convert-math-to-llvm, convert-arith-to-llvm, \
             finalize-memref-to-llvm, convert-func-to-llvm, convert-cf-to-llvm, reconcile-unrealized-casts)"
        }
        Device::Nvptx => {
            "builtin.module(convert-scf-to-cf, convert-math-to-llvm, convert-arith-to-llvm, \
             convert-cf-to-llvm, reconcile-unrealized-casts)"
        }
    }
}

/// An MLIR context with every dialect, pass and LLVM translation registered, and
/// diagnostics collected so errors can quote them.
pub struct MlirSession {
    context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

impl Default for MlirSession {
    fn default() -> Self {
        Self::new()
    }
}

impl MlirSession {
    pub fn new() -> MlirSession {
        static PASSES: Once = Once::new();
        PASSES.call_once(register_all_passes);
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        let context = Context::new_with_registry(&registry, false);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        let diagnostics = Rc::new(RefCell::new(Vec::new()));
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(format!("{}: {}", d.location(), d));
            true
        });
        MlirSession { context, diagnostics }
    }

    fn take_diagnostics(&self) -> String {
        std::mem::take(&mut *self.diagnostics.borrow_mut()).join("\n")
    }

    /// Parses and verifies `text`, lowers it to the LLVM dialect and translates it
    /// to LLVM IR in `llvm`. Returns the lowered MLIR text too (for `--emit`).
    pub fn lower_to_llvm<'ctx>(
        &self,
        kernel: &str,
        text: &str,
        device: Device,
        llvm: &'ctx inkwell::context::Context,
    ) -> Result<(inkwell::module::Module<'ctx>, String), CompileError> {
        let mlir_err =
            |stage: &'static str, s: &Self| CompileError::Mlir { kernel: kernel.to_string(), stage, diagnostics: s.take_diagnostics() };
        let mut module = Module::parse(&self.context, text).ok_or_else(|| mlir_err("parse", self))?;
        if !module.as_operation().verify() {
            return Err(mlir_err("verify", self));
        }
        let pm = PassManager::new(&self.context);
        parse_pass_pipeline(pm.as_operation_pass_manager(), lowering_pipeline(device)).map_err(|_| mlir_err("pass pipeline", self))?;
        pm.run(&mut module).map_err(|_| mlir_err("lower to llvm dialect", self))?;
        let lowered = module.as_operation().to_string();
        // SAFETY: the module is a verified LLVM-dialect module owned by `self.context`;
        // the returned LLVMModuleRef is created in (and owned by the caller through)
        // `llvm`, which outlives the wrapper we build from it.
        let raw = unsafe { mlir_sys::mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), llvm.raw() as mlir_sys::LLVMContextRef) };
        if raw.is_null() {
            return Err(mlir_err("translate to llvm ir", self));
        }
        // SAFETY: `raw` is a fresh module in `llvm`'s context; inkwell takes ownership.
        let m = unsafe { inkwell::module::Module::new(raw as inkwell::llvm_sys::prelude::LLVMModuleRef) };
        Ok((m, lowered))
    }
}
