//! `sparsity = { kind = "from-weights" }` on a loaded model: reads every
//! weight the rule selects from the checkpoint, resolves the rule into the
//! patterns its zeros form (`sparsec_passes::resolve_from_weights`) and prints
//! what was found per role. The resolved plan is an ordinary one: compile, the
//! interpreter, the cache key and the manifest all see it.

use anyhow::Result;
use sparsec_models::checkpoint::Model;
use sparsec_passes::{resolve_from_weights, FoundPattern};
use std::collections::BTreeMap;

/// `text` with its `from-weights` rules resolved against `m` (unchanged when it
/// has none); the summary goes to stderr.
pub fn resolve(m: &Model, text: &str) -> Result<String> {
    let mut weight = |name: &str| m.weight(name).map(|a| a.iter().copied().collect()).map_err(|e| e.to_string());
    match resolve_from_weights(text, &m.graph, &mut weight)? {
        None => Ok(text.to_string()),
        Some(r) => {
            eprint!("{}", summary(&r.found));
            Ok(r.text)
        }
    }
}

/// `resolve` when there is a plan and a model; without a model the plan is
/// left as it is (`apply-plan` then refuses a `from-weights` rule, clearly).
pub fn resolve_text(text: Option<String>, m: Option<&Model>) -> Result<Option<String>> {
    match (text, m) {
        (Some(t), Some(m)) => Ok(Some(resolve(m, &t)?)),
        (t, _) => Ok(t),
    }
}

/// One line per role and pattern: how many weights, their zeros, what is stored.
pub fn summary(found: &[FoundPattern]) -> String {
    // (role, pattern) → (weights, zeros, total, stored)
    let mut by: BTreeMap<(String, String), (usize, u64, u64, u64)> = BTreeMap::new();
    for f in found {
        let e = by.entry((f.role.clone(), f.found.describe())).or_default();
        e.0 += 1;
        e.1 += f.found.zeros;
        e.2 += f.found.total;
        e.3 += f.found.stored;
    }
    let mut out = String::new();
    for ((role, pattern), (weights, zeros, total, stored)) in by {
        let pct = |x: u64| 100.0 * x as f64 / total.max(1) as f64;
        let extra = if stored + zeros > total { format!(", {} zeros stored as values", stored + zeros - total) } else { String::new() };
        out.push_str(&format!(
            "from-weights: {role:<9} {pattern} in {weights} weight{}, {:.2}% zeros{extra}\n",
            if weights == 1 { "" } else { "s" },
            pct(zeros)
        ));
    }
    out
}
