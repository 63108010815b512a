//! `shape-infer`: writes the inferred type on every node that left it out.

use sparsec_ir::{verify, Graph, IrError};

pub struct ShapeInference;

impl crate::Pass for ShapeInference {
    fn name(&self) -> &'static str {
        "shape-infer"
    }
    fn description(&self) -> &'static str {
        "infer and record the type of every value"
    }
    fn run(&self, g: &mut Graph) -> Result<(), IrError> {
        let types = verify(g)?;
        for (n, t) in g.nodes.iter_mut().zip(types) {
            n.ty = Some(t);
        }
        Ok(())
    }
}
