//! `apply-plan`: attaches what a plan's rules say to the graph's ops — weight
//! sparsity and the specialization level to matmuls selected by layer and role,
//! windows to attention ops selected by layer — checking each rule against the
//! model (layers that exist, targets that select something, shapes a pattern
//! divides). Later rules override earlier ones. A pruned weight stored
//! quantized becomes f32: pruning works on the dequantized values.

use crate::plan::{Plan, Rule, WindowPlan};
use crate::Pass;
use sparsec_ir::{DType, Dim, Graph, IrError, Op, Pattern, Sparsity, Window};

pub struct ApplyPlan {
    pub plan: Plan,
}

/// A weight's layer and role from its name: `layers.N.ROLE` → (N, ROLE); the
/// embedding table used as a matmul weight (tied head) → `lm_head`.
pub fn layer_and_role(name: &str) -> (Option<u64>, String) {
    if let Some(rest) = name.strip_prefix("layers.") {
        if let Some((n, role)) = rest.split_once('.') {
            if let Ok(n) = n.parse() {
                return (Some(n), role.to_string());
            }
        }
    }
    match name {
        "embed" | "wte" | "token_embd" => (None, "lm_head".into()),
        other => (None, other.to_string()),
    }
}

/// The layer of an op: that of the first layer weight found walking back its operands.
fn layer_of(g: &Graph, node: usize) -> Option<u64> {
    let mut stack = vec![(node, 0)];
    while let Some((v, depth)) = stack.pop() {
        if let Op::Weight { name, .. } = &g.nodes[v].op {
            if let (Some(l), _) = layer_and_role(name) {
                return Some(l);
            }
        }
        if depth < 4 {
            stack.extend(g.nodes[v].operands.iter().rev().map(|o| (o.0, depth + 1)));
        }
    }
    None
}

fn set_pattern(patterns: &mut Vec<Pattern>, p: Pattern) {
    patterns.retain(|q| q.keyword() != p.keyword());
    patterns.push(p);
}

fn rule_err(rule: &Rule, message: String) -> IrError {
    IrError::Plan(format!("plan rule {}: {message}", rule.index))
}

impl ApplyPlan {
    fn apply_rule(&self, g: &mut Graph, rule: &Rule, n_layers: u64) -> Result<(), IrError> {
        if let Some(what) = rule.not_yet.first() {
            return Err(rule_err(rule, format!("`{what}` is not implemented yet (sparsity, specialize and attention windows are)")));
        }
        if let Some(l) = rule.layers.max_named() {
            if l >= n_layers {
                return Err(rule_err(rule, format!("layer {l} does not exist (the model has {n_layers} layers)")));
            }
        }
        if rule.sparsity.is_some() || rule.specialize.is_some() {
            let mut hits = 0;
            let mut next = 0;
            while next < g.nodes.len() {
                let i = next;
                next += 1;
                let Op::MatMul { transpose_b } = g.nodes[i].op else { continue };
                let w = g.nodes[i].operands[1].0;
                let Op::Weight { name, .. } = g.nodes[w].op.clone() else { continue };
                let (layer, role) = layer_and_role(&name);
                if !rule.selects(layer, &role) {
                    continue;
                }
                hits += 1;
                // A tied weight (the embedding table as the LM head) is pruned for
                // this matmul only: it gets its own copy of the weight.
                let tied = rule.sparsity.is_some()
                    && g.nodes.iter().any(|u| u.operands.iter().any(|o| o.0 == w) && !matches!(u.op, Op::MatMul { .. }));
                let (i, w) = if tied {
                    let mut copy = g.nodes[w].clone();
                    copy.name = format!("{}.pruned", copy.name);
                    copy.loc = None;
                    let v = g.insert(w + 1, copy);
                    // Everything from the copy on moved one place later.
                    next += 1;
                    g.nodes[i + 1].operands[1] = v;
                    (i + 1, v.0)
                } else {
                    (i, w)
                };
                if let Some(s) = &rule.sparsity {
                    let Some(ty) = g.nodes[w].ty.clone() else { continue };
                    let (Dim::Fixed(a), Dim::Fixed(b)) = (ty.dims[0], ty.dims[1]) else { continue };
                    let (n, k) = if transpose_b { (a, b) } else { (b, a) };
                    match s {
                        Sparsity::NM { m, .. } if k % *m as u64 != 0 => {
                            return Err(rule_err(rule, format!("N:M groups of {m} do not divide `{name}`'s reduction dimension {k}")))
                        }
                        Sparsity::Block { rows, cols, .. } if n % *rows as u64 != 0 || k % *cols as u64 != 0 => {
                            return Err(rule_err(rule, format!("block {rows}x{cols} does not divide `{name}` ({n} outputs x {k} inputs)")))
                        }
                        _ => {}
                    }
                    set_pattern(&mut g.nodes[i].patterns, Pattern::Sparsity(s.clone()));
                    if let Some(t) = g.nodes[w].ty.as_mut() {
                        t.dtype = DType::F32;
                    }
                }
                if let Some(sp) = rule.specialize {
                    set_pattern(&mut g.nodes[i].patterns, Pattern::Specialize(sp));
                }
            }
            if hits == 0 {
                return Err(rule_err(rule, format!("target `{}` selects no matmul in layers {:?}", rule.targets.join(","), rule.layers)));
            }
        }
        if let Some(wp) = &rule.window {
            let atts: Vec<(usize, u64)> = (0..g.nodes.len())
                .filter(|&i| matches!(g.nodes[i].op, Op::Attention { .. }))
                .filter_map(|i| layer_of(g, i).map(|l| (i, l)))
                .filter(|(_, l)| rule.layers.contains(*l))
                .collect();
            if atts.is_empty() {
                return Err(rule_err(rule, format!("selects no attention layer in layers {:?}", rule.layers)));
            }
            let last = atts.len().saturating_sub(1).max(1) as f64;
            for (j, (i, _)) in atts.iter().enumerate() {
                let w = match *wp {
                    WindowPlan::Full => Window::Full,
                    WindowPlan::Fixed { size, sinks } => Window::Sliding { size, sinks },
                    WindowPlan::Progressive { start, end, sinks } => {
                        let t = j as f64 / last;
                        let size = (start as f64 * (end as f64 / start as f64).powf(t)).round().max(1.0) as u32;
                        Window::Sliding { size, sinks }
                    }
                };
                set_pattern(&mut g.nodes[*i].patterns, Pattern::Window(w));
            }
        }
        Ok(())
    }
}

impl Pass for ApplyPlan {
    fn name(&self) -> &'static str {
        "apply-plan"
    }

    fn description(&self) -> &'static str {
        "attach a plan's sparsity, specialization and window patterns to the ops its rules select"
    }

    fn run(&self, g: &mut Graph) -> Result<(), IrError> {
        let n_layers = g
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Weight { name, .. } => layer_and_role(name).0,
                _ => None,
            })
            .max()
            .map_or(0, |l| l + 1);
        for rule in &self.plan.rules {
            self.apply_rule(g, rule, n_layers)?;
        }
        Ok(())
    }
}
