//! `apply-plan`: attaches what a plan's rules say to the graph's ops — weight
//! sparsity and the specialization level to matmuls selected by layer and role,
//! windows to attention ops selected by layer — checking each rule against the
//! model (layers that exist, targets that select something, shapes a pattern
//! divides). Later rules override earlier ones. A pruned weight stored
//! quantized becomes f32: pruning works on the dequantized values.
//! `resolve_from_weights` turns `from-weights` rules into concrete ones per
//! weight, from the data, before the plan is applied. A
//! `low_rank`/`share` rule attaches `#low_rank(rank, basis)` with the rank its
//! ratio gives (groups of consecutive selected layers per role share a basis);
//! the `low-rank` pass lowers it.

use crate::plan::{FactorPlan, FactorSize, NsaGatePlan, Plan, Rule, WindowPlan};
use crate::Pass;
use sparsec_ir::sparse_detect::{detect, Detected};
use sparsec_ir::{
    DType, Dim, Graph, IrError, LowRank, NativeSparse, Node, NsaCompress, Op, Pattern, Sparsity, TensorType, ValueCoding, ValueId, Window,
};
use std::collections::BTreeMap;

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

/// The names of a layer's NSA adapter weights in the model
/// (`docs/nsa-adapters.md`): the gate `[3·heads, d_model]`, its bias
/// `[3·heads]` and the packed compression `[2·kv_heads, block + d + d·d]`.
pub fn nsa_adapter_names(layer: u64) -> [String; 3] {
    [format!("layers.{layer}.nsa.gate"), format!("layers.{layer}.nsa.gate_bias"), format!("layers.{layer}.nsa.compress")]
}

/// The input the projections of attention `att` read (q's matmul's input,
/// through RoPE and a bias), for a gate computed from it, with its width and
/// q's (from q's weight, whose type a leaf declares).
pub fn attention_input(g: &Graph, att: usize) -> Option<(ValueId, u64, u64)> {
    let mut v = g.nodes[att].operands[0];
    for _ in 0..4 {
        match g.node(v).op {
            Op::Rope { .. } | Op::Add => v = g.node(v).operands[0],
            Op::MatMul { transpose_b } => {
                let n = g.node(v);
                let w = g.node(*n.operands.get(1)?).ty.as_ref()?;
                let (Some(Dim::Fixed(a)), Some(Dim::Fixed(b))) = (w.dims.first().copied(), w.dims.get(1).copied()) else { return None };
                let (input, q) = if transpose_b { (b, a) } else { (a, b) };
                return Some((n.operands[0], input, q));
            }
            _ => return None,
        }
    }
    None
}

/// Gives attention `att` (of `layer`) the operands its `#nsa` takes beyond q,
/// k and v (`NativeSparse::extra_operands`), from the rule's gate plan:
/// constant weights, or (adapters) `sigmoid` logits computed from the
/// layer's attention input and the trained compression. `Fitted` leaves it
/// with q, k and v until the fit's rules come (`run` checks that they did).
/// Returns the attention's index after the insertions.
fn set_nsa_operands(g: &mut Graph, name: &str, layer: u64, nsa: &NativeSparse, plan: &NsaGatePlan) -> Result<usize, String> {
    let att = g.find(name).ok_or_else(|| format!("`%{name}` is gone"))?.0;
    g.nodes[att].operands.truncate(3);
    let Op::Attention { heads, kv_heads } = g.nodes[att].op else { return Err("nsa needs an attention".into()) };
    let (h, kvh) = (heads as u64, kv_heads as u64);
    match plan {
        NsaGatePlan::Joint | NsaGatePlan::Fitted => {}
        NsaGatePlan::Values(v) => {
            if v.len() as u64 != 3 * h {
                return Err(format!("nsa gate lists {} weights; `%{name}` has {h} heads, so it takes {}", v.len(), 3 * h));
            }
            let ty = TensorType::new(DType::F32, vec![Dim::Fixed(3 * h)]);
            let c =
                g.insert(att, Node::new(fresh_name(g, &format!("{name}.gate")), Op::Constant { values: v.clone() }, vec![]).with_type(ty));
            g.nodes[att + 1].operands.push(c);
            return Ok(att + 1);
        }
        NsaGatePlan::Adapters(_) => {
            let (x, dm, qw) = attention_input(g, att)
                .ok_or_else(|| format!("`%{name}`: adapters need q to be a projection of the layer input by a weight of fixed shape"))?;
            let d = qw / h.max(1);
            let [gw, gb, cw] = nsa_adapter_names(layer);
            let weight = |g: &Graph, role: &str, dims: Vec<u64>| {
                let ty = TensorType::new(DType::F32, dims.into_iter().map(Dim::Fixed).collect());
                Node::new(fresh_name(g, role), Op::Weight { name: role.to_string(), init: None }, vec![]).with_type(ty)
            };
            let mut at = att;
            let mut put = |g: &mut Graph, n: Node| {
                let v = g.insert(at, n);
                at += 1;
                v
            };
            let w = put(g, weight(g, &gw, vec![3 * h, dm]));
            let bias = put(g, weight(g, &gb, vec![3 * h]));
            let mm = put(g, Node::new(fresh_name(g, &format!("{name}.gate_mm")), Op::MatMul { transpose_b: true }, vec![x, w]));
            let logits = put(g, Node::new(fresh_name(g, &format!("{name}.gate")), Op::Add, vec![mm, bias]));
            let c = put(g, weight(g, &cw, vec![2 * kvh, NsaCompress::linear_words(nsa.block as u64, d)]));
            g.nodes[at].operands.extend([logits, c]);
            return Ok(at);
        }
    }
    Ok(att)
}

/// `base`, or `base.N` for the first N that no value is named yet.
pub(crate) fn fresh_name(g: &Graph, base: &str) -> String {
    if g.find(base).is_none() {
        return base.to_string();
    }
    (1..).map(|n| format!("{base}.{n}")).find(|c| g.find(c).is_none()).unwrap_or_default()
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
        if rule.from_weights {
            return Err(rule_err(
                rule,
                "sparsity = { kind = \"from-weights\" } needs the weights: compile or eval a model checkpoint (GGUF, HF directory or smollm2), which resolves it per weight".into(),
            ));
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
                if rule.sparsity.is_some() && g.nodes[i].patterns.iter().any(|p| matches!(p, Pattern::LowRank(_))) {
                    return Err(rule_err(
                        rule,
                        format!("`{name}` is factored by an earlier rule; low_rank/share and sparsity on one weight are not combined"),
                    ));
                }
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
                    // `values`: how the kept values are stored; f32 (the default) carries no attribute.
                    match rule.values {
                        ValueCoding::F32 => g.nodes[i].patterns.retain(|p| !matches!(p, Pattern::Values(_))),
                        v => set_pattern(&mut g.nodes[i].patterns, Pattern::Values(v)),
                    }
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
        if let Some(f) = &rule.factor {
            apply_factor(g, rule, f)?;
        }
        // The attention ops of the rule's layers.
        let attentions = |g: &Graph| -> Result<Vec<(usize, u64)>, IrError> {
            let atts: Vec<(usize, u64)> = (0..g.nodes.len())
                .filter(|&i| matches!(g.nodes[i].op, Op::Attention { .. }))
                .filter_map(|i| layer_of(g, i).map(|l| (i, l)))
                .filter(|(_, l)| rule.layers.contains(*l))
                .collect();
            if atts.is_empty() {
                return Err(rule_err(rule, format!("selects no attention layer in layers {:?}", rule.layers)));
            }
            Ok(atts)
        };
        if let Some(nsa) = rule.nsa {
            // By name: the gate's nodes go in before each attention.
            let atts: Vec<(String, u64)> = attentions(g)?.into_iter().map(|(i, l)| (g.nodes[i].name.clone(), l)).collect();
            for (name, layer) in atts {
                let i = set_nsa_operands(g, &name, layer, &nsa, &rule.nsa_gate).map_err(|m| rule_err(rule, m))?;
                // NSA replaces a window an earlier rule gave the layer.
                g.nodes[i].patterns.retain(|p| !matches!(p, Pattern::Window(_)));
                set_pattern(&mut g.nodes[i].patterns, Pattern::Nsa(nsa));
            }
        }
        if let Some(kv) = &rule.kv {
            let atts: Vec<(String, u64)> = attentions(g)?.into_iter().map(|(i, l)| (g.nodes[i].name.clone(), l)).collect();
            for (name, layer) in atts {
                crate::kv_basis::set_kv_basis(g, &name, layer, kv).map_err(|m| rule_err(rule, m))?;
            }
        }
        if let Some((chunk, rank)) = rule.kv_chunks {
            for (i, _) in attentions(g)? {
                set_pattern(&mut g.nodes[i].patterns, Pattern::Kv(sparsec_ir::KvCompression::ChunkedSvd { chunk, rank }));
            }
        }
        if let Some(sq) = rule.kv_sequence {
            let p = Pattern::Kv(sq.pattern());
            for (i, _) in attentions(g)? {
                set_pattern(&mut g.nodes[i].patterns, p.clone());
            }
        }
        if let Some(wp) = &rule.window {
            let atts = attentions(g)?;
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
                g.nodes[*i].patterns.retain(|p| !matches!(p, Pattern::Nsa(_)));
                // A window takes q, k and v only (an earlier NSA's gate goes).
                g.nodes[*i].operands.truncate(3);
                set_pattern(&mut g.nodes[*i].patterns, Pattern::Window(w));
            }
        }
        Ok(())
    }
}

/// One matmul a factor rule selects.
struct Factored {
    node: usize,
    name: String,
    layer: Option<u64>,
    /// Outputs and inputs of the weight.
    n: u64,
    k: u64,
}

/// Attaches `#low_rank` to the matmuls `rule` selects: a private factor of the
/// rank the rule gives, or, for `share`, one basis per group of `group`
/// consecutive selected layers of a role (`basis.ROLE.FIRST-LAST`; a group of
/// one left over is factored privately at the same ratio).
fn apply_factor(g: &mut Graph, rule: &Rule, f: &FactorPlan) -> Result<(), IrError> {
    let mut by_role: BTreeMap<String, Vec<Factored>> = BTreeMap::new();
    for i in 0..g.nodes.len() {
        let Op::MatMul { transpose_b } = g.nodes[i].op else { continue };
        let w = g.nodes[i].operands[1].0;
        let Op::Weight { name, .. } = &g.nodes[w].op else { continue };
        let (layer, role) = layer_and_role(name);
        if !rule.selects(layer, &role) {
            continue;
        }
        let shape = g.nodes[w].ty.as_ref().and_then(|t| match t.dims[..] {
            [Dim::Fixed(a), Dim::Fixed(b)] => Some((a, b)),
            _ => None,
        });
        let Some((a, b)) = shape else { return Err(rule_err(rule, format!("`{name}` has no fixed matrix shape to factor"))) };
        let (n, k) = if transpose_b { (a, b) } else { (b, a) };
        for p in &g.nodes[i].patterns {
            match p {
                Pattern::Sparsity(_) | Pattern::Specialize(_) | Pattern::Values(_) => {
                    return Err(rule_err(
                        rule,
                        format!("`{name}` is pruned by an earlier rule; {} and sparsity on one weight are not combined", f.key()),
                    ))
                }
                Pattern::LowRank(_) => {
                    return Err(rule_err(
                        rule,
                        format!("`{name}` is factored by an earlier rule; give each weight one low_rank or share rule"),
                    ))
                }
                Pattern::Kv(_) | Pattern::Window(_) | Pattern::Nsa(_) => {}
            }
        }
        by_role.entry(role).or_default().push(Factored { node: i, name: name.clone(), layer, n, k });
    }
    if by_role.is_empty() {
        return Err(rule_err(rule, format!("target `{}` selects no matmul in layers {:?}", rule.targets.join(","), rule.layers)));
    }
    for (role, mut members) in by_role {
        members.sort_by_key(|m| (m.layer, m.node));
        let group = f.group.unwrap_or(1).max(1) as usize;
        for chunk in members.chunks(group) {
            let shared = chunk.len() > 1;
            if shared && chunk.iter().any(|m| (m.n, m.k) != (chunk[0].n, chunk[0].k)) {
                return Err(rule_err(rule, format!("`{role}` weights of different shapes cannot share a basis")));
            }
            let (n, k) = (chunk[0].n, chunk[0].k);
            let rank = match f.size {
                FactorSize::Ratio(r) => FactorPlan::rank_for_ratio(r, chunk.len() as u64, n, k),
                FactorSize::Rank(r) => {
                    if r as u64 > k.min(n) {
                        return Err(rule_err(
                            rule,
                            format!("rank {r} exceeds min({n}, {k}) of `{}` ({n} outputs x {k} inputs)", chunk[0].name),
                        ));
                    }
                    r
                }
            };
            let basis = shared.then(|| {
                let at = |m: &Factored| m.layer.map_or_else(|| "x".to_string(), |l| l.to_string());
                format!("basis.{role}.{}-{}", at(&chunk[0]), at(&chunk[chunk.len() - 1]))
            });
            for m in chunk {
                set_pattern(&mut g.nodes[m.node].patterns, Pattern::LowRank(LowRank { rank, basis: basis.clone() }));
            }
        }
    }
    Ok(())
}

impl Pass for ApplyPlan {
    fn name(&self) -> &'static str {
        "apply-plan"
    }

    fn description(&self) -> &'static str {
        "attach a plan's sparsity, specialization, low-rank and window patterns to the ops its rules select"
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
        // `gate = "fitted"` leaves its layers to the rules the fit adds.
        for n in &g.nodes {
            if let Some(nsa) = NativeSparse::of(&n.patterns) {
                if n.operands.len() != 3 + nsa.extra_operands() {
                    return Err(IrError::Plan(format!(
                        "`%{}`: nsa gate = \"fitted\" is fitted by `sparsec compile` or `eval` of a model checkpoint on the calibration text, which adds the weights it finds; give `gate = [...]` to apply a plan without a model",
                        n.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What a `from-weights` rule found in one weight.
#[derive(Clone, Debug, PartialEq)]
pub struct FoundPattern {
    /// The rule (1-based).
    pub rule: usize,
    /// The weight's tensor name, its layer and role.
    pub weight: String,
    pub layer: Option<u64>,
    pub role: String,
    pub found: Detected,
}

/// A plan with its `from-weights` rules resolved: the text (every such rule
/// replaced by one rule per weight it selects with the pattern found, in its
/// place, so later rules still override it) and what was found.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPlan {
    pub text: String,
    pub found: Vec<FoundPattern>,
}

/// A ratio as TOML: the shortest decimal that reads back as the same f32.
fn ratio_value(r: f32) -> toml::Value {
    let short: f64 = format!("{r}").parse().unwrap_or(r as f64);
    toml::Value::Float(if short as f32 == r { short } else { r as f64 })
}

/// The plan spelling of a concrete sparsity.
pub fn sparsity_value(s: &Sparsity) -> toml::Value {
    let mut t = toml::map::Map::new();
    match *s {
        Sparsity::Unstructured { ratio } => {
            t.insert("kind".into(), "unstructured".into());
            t.insert("ratio".into(), ratio_value(ratio));
        }
        Sparsity::NM { n, m } => {
            t.insert("kind".into(), "nm".into());
            t.insert("n".into(), toml::Value::Integer(n.into()));
            t.insert("m".into(), toml::Value::Integer(m.into()));
        }
        Sparsity::Block { ratio, rows, cols } => {
            t.insert("kind".into(), "block".into());
            t.insert("ratio".into(), ratio_value(ratio));
            t.insert("block".into(), toml::Value::Array(vec![toml::Value::Integer(rows.into()), toml::Value::Integer(cols.into())]));
        }
    }
    toml::Value::Table(t)
}

/// Writes `key = value` lines (values inline) of a table.
fn write_pairs(out: &mut String, t: &toml::map::Map<String, toml::Value>) {
    for (k, v) in t {
        out.push_str(&format!("{k} = {v}\n"));
    }
}

/// Resolves the `from-weights` rules of `plan_text` against `g` (a model
/// graph) and the data of its weights (`weight(name)`: f32 values as stored).
/// Each selected matmul weight gets the pattern of its zeros
/// (`sparse_detect::detect`); a weight without zeros gets no rule (it stays
/// dense). `None` when the plan has no such rule. Errors name the rule: one
/// that selects no matmul, a dense weight an earlier rule prunes (a later rule
/// cannot un-prune it), data that cannot be read.
pub fn resolve_from_weights(
    plan_text: &str,
    g: &Graph,
    weight: &mut dyn FnMut(&str) -> Result<Vec<f32>, String>,
) -> Result<Option<ResolvedPlan>, IrError> {
    let plan = Plan::parse(plan_text).map_err(|e| IrError::Plan(e.to_string()))?;
    if !plan.rules.iter().any(|r| r.from_weights) {
        return Ok(None);
    }
    let doc: toml::Table = toml::from_str(plan_text).map_err(|e| IrError::Plan(format!("plan: {e}")))?;
    let rule_tables: Vec<toml::map::Map<String, toml::Value>> = match doc.get("rule") {
        Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_table().cloned()).collect(),
        _ => Vec::new(),
    };
    if rule_tables.len() != plan.rules.len() {
        return Err(IrError::Plan(format!("plan: {} rule tables, {} rules parsed", rule_tables.len(), plan.rules.len())));
    }
    // Every matmul weight once: (name, layer, role, transposed, n, k).
    let mut matmuls: Vec<(String, Option<u64>, String, bool, usize, usize)> = Vec::new();
    for node in &g.nodes {
        let Op::MatMul { transpose_b } = node.op else { continue };
        let Some(w) = node.operands.get(1) else { continue };
        let Op::Weight { name, .. } = &g.nodes[w.0].op else { continue };
        let Some([Dim::Fixed(a), Dim::Fixed(b)]) = g.nodes[w.0].ty.as_ref().map(|t| &t.dims[..]) else { continue };
        let (n, k) = if transpose_b { (*a, *b) } else { (*b, *a) };
        if !matmuls.iter().any(|m| m.0 == *name) {
            let (layer, role) = layer_and_role(name);
            matmuls.push((name.clone(), layer, role, transpose_b, n as usize, k as usize));
        }
    }
    let mut detected: BTreeMap<String, Detected> = BTreeMap::new();
    let mut found = Vec::new();
    let mut out_rules: Vec<(Option<String>, toml::map::Map<String, toml::Value>)> = Vec::new();
    for (i, (rule, mut table)) in plan.rules.iter().zip(rule_tables).enumerate() {
        if !rule.from_weights {
            out_rules.push((None, table));
            continue;
        }
        table.remove("sparsity");
        let (layers, target) = (table.get("layers").cloned(), table.get("target").cloned());
        if table.keys().any(|k| k != "layers" && k != "target") {
            out_rules.push((None, table));
        }
        let mut hits = 0;
        for (name, layer, role, transposed, n, k) in &matmuls {
            if !rule.selects(*layer, role) {
                continue;
            }
            hits += 1;
            let d = match detected.get(name) {
                Some(d) => d.clone(),
                None => {
                    let w = weight(name).map_err(|m| rule_err(rule, format!("from-weights: `{name}`: {m}")))?;
                    if w.len() != n * k {
                        return Err(rule_err(rule, format!("from-weights: `{name}` holds {} values, the graph says {n}x{k}", w.len())));
                    }
                    let d = detect(&w, *n, *k, *transposed);
                    detected.insert(name.clone(), d.clone());
                    d
                }
            };
            match &d.sparsity {
                Some(s) => {
                    let mut t = toml::map::Map::new();
                    t.insert("layers".into(), layer.map_or_else(|| "all".to_string(), |l| l.to_string()).into());
                    t.insert("target".into(), role.clone().into());
                    t.insert("sparsity".into(), sparsity_value(s));
                    let note = format!("from-weights (rule {}): `{name}` {} of {} zero, {}", rule.index, d.zeros, d.total, d.describe());
                    out_rules.push((Some(note), t));
                }
                None => {
                    if let Some(earlier) = plan.rules[..i].iter().rev().find(|r| r.sparsity.is_some() && r.selects(*layer, role)) {
                        return Err(rule_err(
                            rule,
                            format!(
                                "from-weights finds `{name}` dense (no zeros), but rule {} prunes it; a later rule cannot undo that",
                                earlier.index
                            ),
                        ));
                    }
                }
            }
            found.push(FoundPattern { rule: rule.index, weight: name.clone(), layer: *layer, role: role.clone(), found: d });
        }
        if hits == 0 {
            let show = |v: Option<toml::Value>, d: &str| v.map_or_else(|| d.to_string(), |v| v.to_string());
            let (target, layers) = (show(target, "\"*\""), show(layers, "\"all\""));
            return Err(rule_err(rule, format!("target {target} selects no matmul in layers {layers}")));
        }
    }
    let mut text = String::from("# from-weights resolved against the checkpoint: one rule per weight, in the rule's place\n");
    for (k, v) in &doc {
        if k != "rule" && !v.is_table() {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    for (k, v) in &doc {
        if let (false, Some(t)) = (k == "rule", v.as_table()) {
            text.push_str(&format!("\n[{k}]\n"));
            write_pairs(&mut text, t);
        }
    }
    for (note, t) in &out_rules {
        text.push_str("\n[[rule]]\n");
        if let Some(n) = note {
            text.push_str(&format!("# {n}\n"));
        }
        write_pairs(&mut text, t);
    }
    // What comes out is an ordinary plan.
    Plan::parse(&text).map_err(|e| IrError::Plan(format!("the resolved plan does not parse ({e}):\n{text}")))?;
    Ok(Some(ResolvedPlan { text, found }))
}

#[cfg(test)]
mod from_weights_tests {
    use super::*;

    fn mlp() -> Graph {
        sparsec_ir::parse_graph(
            "graph @g {\n  %x = input : f32[seq, 16]\n  %a = weight \"layers.0.mlp.up\" init normal(seed = 1, std = 1.0) : f32[32, 16]\n  %h = matmul %x, %a {transpose_b = true}\n  %b = weight \"layers.0.mlp.down\" init normal(seed = 2, std = 1.0) : f32[32, 16]\n  %y = matmul %h, %b {transpose_b = true}\n  return %y\n}\n",
        )
        .unwrap()
    }

    #[test]
    fn resolves_each_weight_in_the_rules_place() {
        let g = mlp();
        let mut up = sparsec_ir::Init::Normal { seed: 1, std: 1.0 }.generate(32 * 16);
        sparsec_ir::sparse::prune(&Sparsity::NM { n: 2, m: 4 }, &mut up, 32, 16, true);
        let down = sparsec_ir::Init::Normal { seed: 2, std: 1.0 }.generate(32 * 16);
        let mut weight = |name: &str| -> Result<Vec<f32>, String> {
            match name {
                "layers.0.mlp.up" => Ok(up.clone()),
                "layers.0.mlp.down" => Ok(down.clone()),
                other => Err(format!("no {other}")),
            }
        };
        let text = "[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"unstructured\", ratio = 0.5 }\n\n[[rule]]\ntarget = \"mlp.up\"\nsparsity = { kind = \"from-weights\" }\nspecialize = \"generic\"\n";
        let r = resolve_from_weights(text, &g, &mut weight).unwrap().unwrap();
        let p = Plan::parse(&r.text).unwrap();
        assert_eq!(p.sparsity_for(Some(0), "mlp.up").map(|s| s.0), Some(Sparsity::NM { n: 2, m: 4 }), "{}", r.text);
        assert_eq!(p.sparsity_for(Some(0), "mlp.down").map(|s| s.0), Some(Sparsity::Unstructured { ratio: 0.5 }));
        assert_eq!(p.rules.iter().filter(|r| r.specialize.is_some()).count(), 1);
        assert_eq!(r.found.len(), 1);
        assert_eq!((r.found[0].found.zeros, r.found[0].role.as_str()), (256, "mlp.up"));
        // Unresolved, apply-plan refuses it.
        let mut g2 = g.clone();
        let e = ApplyPlan { plan: Plan::parse(text).unwrap() }.run(&mut g2).unwrap_err().to_string();
        assert!(e.contains("rule 2") && e.contains("from-weights"), "{e}");
        // A dense weight an earlier rule prunes cannot be kept dense.
        let text = "[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }\n\n[[rule]]\ntarget = \"mlp.down\"\nsparsity = { kind = \"from-weights\" }\n";
        let e = resolve_from_weights(text, &g, &mut weight).unwrap_err().to_string();
        assert!(e.contains("rule 2") && e.contains("dense") && e.contains("rule 1 prunes"), "{e}");
        let e = resolve_from_weights("[[rule]]\ntarget = \"attn.q\"\nsparsity = { kind = \"from-weights\" }\n", &g, &mut weight)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rule 1") && e.contains("selects no matmul"), "{e}");
        assert_eq!(resolve_from_weights("[[rule]]\nspecialize = \"dense\"\n", &g, &mut weight).unwrap(), None);
    }
}
