//! Kernel partitioning: one kernel per distinct compute op (identical ops share
//! it), one buffer per value, and the execution plan the runtime follows.

use crate::error::CompileResult;
use crate::mlir::KernelSpec;
use sparsec_ir::{Graph, Op, TensorType};
use sparsec_runtime::manifest::{BufferKind, BufferSpec, ExecutionPlan, Step};
use std::collections::HashMap;

/// The kernels to compile and the plan to run them.
pub struct Partition {
    pub kernels: Vec<KernelSpec>,
    pub plan: ExecutionPlan,
    /// For each buffer of kind `Weight`, the node that holds its data.
    pub weight_nodes: Vec<(usize, usize)>,
}

/// The buffer name of a weight or constant node: the checkpoint tensor name for
/// weights (tied weights share one buffer), `const.<value>` for constants.
pub fn weight_buffer_name(g: &Graph, node: usize) -> Option<String> {
    match &g.nodes[node].op {
        Op::Weight { name, .. } => Some(name.clone()),
        Op::Constant { .. } => Some(format!("const.{}", g.nodes[node].name)),
        _ => None,
    }
}

/// Splits a typed graph (after `shape-infer`) into kernels and a plan.
pub fn partition(g: &Graph) -> CompileResult<Partition> {
    let types: Vec<TensorType> = sparsec_ir::verify(g)?;
    let mut buffers = Vec::new();
    let mut buffer_of = vec![usize::MAX; g.nodes.len()];
    let mut by_weight_name: HashMap<String, usize> = HashMap::new();
    let mut weight_nodes = Vec::new();
    let mut kernels = Vec::new();
    let mut steps = Vec::new();
    let mut by_signature: HashMap<String, String> = HashMap::new();
    let mut inputs = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let dims = types[i].dims.clone();
        if let Some(wname) = weight_buffer_name(g, i) {
            let id = *by_weight_name.entry(wname.clone()).or_insert_with(|| {
                buffers.push(BufferSpec { name: wname.clone(), kind: BufferKind::Weight, dims: dims.clone() });
                weight_nodes.push((buffers.len() - 1, i));
                buffers.len() - 1
            });
            buffer_of[i] = id;
            continue;
        }
        let kind = if n.op == Op::Input { BufferKind::Input } else { BufferKind::Temp };
        buffers.push(BufferSpec { name: n.name.clone(), kind, dims });
        let id = buffers.len() - 1;
        buffer_of[i] = id;
        if n.op == Op::Input {
            inputs.push(id);
            continue;
        }
        let mut spec = KernelSpec {
            name: String::new(),
            op: n.op.clone(),
            operands: n.operands.iter().map(|o| types[o.0].clone()).collect(),
            result: types[i].clone(),
            patterns: n.patterns.clone(),
        };
        // Ops with the same attributes, types and patterns share one kernel
        // (a model's layers compile once, not once per layer).
        let signature = format!("{:?}|{:?}|{:?}|{:?}", spec.op, spec.operands, spec.result, spec.patterns);
        let name = match by_signature.get(&signature) {
            Some(name) => String::clone(name),
            None => {
                spec.name = format!("k{}_{}", kernels.len(), n.op.keyword());
                by_signature.insert(signature, spec.name.clone());
                let name = spec.name.clone();
                kernels.push(spec.clone());
                name
            }
        };
        spec.name = name;
        let mut args: Vec<usize> = n.operands.iter().map(|o| buffer_of[o.0]).collect();
        args.push(id);
        steps.push(Step { kernel: spec.name.clone(), args, gpu_threads: spec.work()?, cpu_units: spec.cpu_work()? });
    }
    let outputs = g.outputs.iter().map(|o| buffer_of[o.0]).collect();
    Ok(Partition { kernels, plan: ExecutionPlan { buffers, inputs, outputs, steps }, weight_nodes })
}
