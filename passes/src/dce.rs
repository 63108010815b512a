//! `dce`: removes values nothing returned depends on. Inputs stay: they are the
//! graph's signature.

use sparsec_ir::{Graph, IrError, Op};

pub struct DeadCodeElimination;

impl crate::Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn description(&self) -> &'static str {
        "remove values that no output depends on"
    }
    fn run(&self, g: &mut Graph) -> Result<(), IrError> {
        let mut live = vec![false; g.nodes.len()];
        for o in &g.outputs {
            live[o.0] = true;
        }
        for i in (0..g.nodes.len()).rev() {
            if live[i] {
                for o in &g.nodes[i].operands {
                    live[o.0] = true;
                }
            }
        }
        for (i, n) in g.nodes.iter().enumerate() {
            if n.op == Op::Input {
                live[i] = true;
            }
        }
        g.retain(&live);
        Ok(())
    }
}
