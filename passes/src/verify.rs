//! `verify`: runs the IR verifier; changes nothing.

use sparsec_ir::{verify, Graph, IrError};

pub struct Verify;

impl crate::Pass for Verify {
    fn name(&self) -> &'static str {
        "verify"
    }
    fn description(&self) -> &'static str {
        "check structure, types and pattern invariants"
    }
    fn run(&self, g: &mut Graph) -> Result<(), IrError> {
        verify(g).map(|_| ())
    }
}
