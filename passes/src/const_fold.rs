//! `const-fold`: evaluates compute ops whose operands are all constants, with the
//! reference semantics, and replaces them by constants.

use ndarray::{ArrayD, IxDyn};
use sparsec_ir::reference::eval_op;
use sparsec_ir::{Graph, IrError, Op};

pub struct ConstFold;

impl crate::Pass for ConstFold {
    fn name(&self) -> &'static str {
        "const-fold"
    }
    fn description(&self) -> &'static str {
        "evaluate ops on constant operands at compile time"
    }
    fn run(&self, g: &mut Graph) -> Result<(), IrError> {
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if n.op.is_leaf() || n.operands.is_empty() {
                continue;
            }
            if !n.operands.iter().all(|o| matches!(g.nodes[o.0].op, Op::Constant { .. })) {
                continue;
            }
            let mut args = Vec::with_capacity(n.operands.len());
            for o in &n.operands {
                let d = &g.nodes[o.0];
                let (Op::Constant { values }, Some(ty)) = (&d.op, &d.ty) else { continue };
                let a = ArrayD::from_shape_vec(IxDyn(&ty.resolve(0)), values.clone()).map_err(|e| IrError::Eval {
                    op: d.op.keyword(),
                    value: d.name.clone(),
                    message: e.to_string(),
                })?;
                args.push(a);
            }
            if args.len() != n.operands.len() {
                continue; // an operand had no type yet; shape-infer runs first
            }
            let refs: Vec<&ArrayD<f32>> = args.iter().collect();
            let out = eval_op(&n.op, &n.patterns, &refs).map_err(|message| IrError::Eval {
                op: n.op.keyword(),
                value: n.name.clone(),
                message,
            })?;
            let node = &mut g.nodes[i];
            node.op = Op::Constant { values: out.iter().copied().collect() };
            node.operands.clear();
            node.patterns.clear();
        }
        Ok(())
    }
}
