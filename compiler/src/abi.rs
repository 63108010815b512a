//! The ABI table of a CPU library: one constant `sparsec_abi_<kernel>` per
//! kernel, holding the record `sparsec_runtime::manifest::abi_record` computes
//! for the buffers the kernel was generated for. The runtime reads it back from
//! the library and refuses a plan whose buffers differ, so the manifest and the
//! code are checked against each other at load.

use crate::backend::{emit_cpu, CodegenOutput};
use crate::error::CompileError;
use crate::options::CpuTarget;
use inkwell::context::Context;
use inkwell::module::Linkage;
use sparsec_runtime::manifest::{abi_record, BufferSpec, ExecutionPlan, Step, ABI_SYMBOL_PREFIX};
use std::collections::BTreeMap;

/// Per kernel of `plan`, the ABI record of the first step that launches it.
pub fn records(plan: &ExecutionPlan) -> BTreeMap<String, Vec<u64>> {
    let mut out = BTreeMap::new();
    for step in &plan.steps {
        if let Step::Kernel(k) = step {
            out.entry(k.kernel.clone()).or_insert_with(|| {
                let bufs: Vec<&BufferSpec> = k.args.iter().map(|&a| &plan.buffers[a]).collect();
                abi_record(&bufs)
            });
        }
    }
    out
}

/// An object file defining the ABI table of `plan`'s kernels.
pub fn object(plan: &ExecutionPlan, cpu: &CpuTarget) -> Result<CodegenOutput, CompileError> {
    let ctx = Context::create();
    let module = ctx.create_module("sparsec_abi");
    let i64t = ctx.i64_type();
    for (kernel, record) in records(plan) {
        let values: Vec<_> = record.iter().map(|&w| i64t.const_int(w, false)).collect();
        let init = i64t.const_array(&values);
        let g = module.add_global(init.get_type(), None, &format!("{ABI_SYMBOL_PREFIX}{kernel}"));
        g.set_initializer(&init);
        g.set_constant(true);
        g.set_linkage(Linkage::External);
        g.set_alignment(8);
    }
    emit_cpu("sparsec_abi", &module, cpu, 0, false)
}
