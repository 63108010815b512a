//! The pass manager: runs passes in order, verifies between them in debug and
//! test builds, and records the IR before/after the passes the user asked to see.

use crate::{Pass, PassError};
use sparsec_ir::{print_graph, verify, Graph};

/// Which snapshots of the IR to keep (`--print-after-all`, `--print-after=NAME`,
/// `--print-before=NAME`).
#[derive(Clone, Debug, Default)]
pub struct PrintOptions {
    pub after_all: bool,
    pub after: Vec<String>,
    pub before: Vec<String>,
}

/// The IR text at one point of the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// `after NAME` or `before NAME`.
    pub label: String,
    pub ir: String,
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    print: PrintOptions,
    verify_each: bool,
}

impl PassManager {
    /// A manager with the default pipeline (`registry()` order).
    pub fn default_pipeline(print: PrintOptions) -> PassManager {
        PassManager { passes: crate::registry(), print, verify_each: cfg!(debug_assertions) }
    }

    /// The default pipeline with `apply-plan` after shape inference, and
    /// `low-rank` after it when the plan factors weights.
    pub fn with_plan(plan: Option<crate::Plan>, print: PrintOptions) -> PassManager {
        let mut passes = crate::registry();
        if let Some(plan) = plan {
            let at = passes.iter().position(|p| p.name() == "shape-infer").map_or(0, |i| i + 1);
            if plan.factors() {
                passes.insert(at, Box::new(crate::LowRankLowering));
            }
            passes.insert(at, Box::new(crate::ApplyPlan { plan }));
        }
        PassManager { passes, print, verify_each: cfg!(debug_assertions) }
    }

    pub fn new(passes: Vec<Box<dyn Pass>>, print: PrintOptions) -> PassManager {
        PassManager { passes, print, verify_each: cfg!(debug_assertions) }
    }

    /// Verify after every pass even in release builds.
    pub fn verify_each(mut self, on: bool) -> Self {
        self.verify_each = on;
        self
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs the pipeline; returns the snapshots requested by the print options.
    pub fn run(&self, g: &mut Graph) -> Result<Vec<Snapshot>, PassError> {
        let mut snaps = Vec::new();
        for p in &self.passes {
            let name = p.name();
            if self.print.before.iter().any(|n| n == name) {
                snaps.push(Snapshot { label: format!("before {name}"), ir: print_graph(g) });
            }
            p.run(g).map_err(|error| PassError::Ir { pass: name, error })?;
            if self.verify_each {
                verify(g).map_err(|error| PassError::BrokeInvariant { pass: name, error })?;
            }
            if self.print.after_all || self.print.after.iter().any(|n| n == name) {
                snaps.push(Snapshot { label: format!("after {name}"), ir: print_graph(g) });
            }
        }
        Ok(snaps)
    }
}
