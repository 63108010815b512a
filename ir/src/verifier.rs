//! The verifier: structural rules, type rules and every pattern invariant.
//! Passes run it between each other in debug and test builds.

use crate::error::{IrError, IrResult};
use crate::graph::{Graph, ValueId};
use crate::op::Op;
use crate::pattern::{KvAxis, KvCompression, LowRank, NativeSparse, NsaCompress, NsaGate, Pattern, PatternSite, Sparsity, SvdRank, Window};
use crate::shape::infer_type;
use crate::types::{Dim, TensorType};
use std::collections::HashSet;

/// Checks the whole graph and returns the type of every value (declared, or
/// inferred where the text left it out).
pub fn verify(g: &Graph) -> IrResult<Vec<TensorType>> {
    let mut types: Vec<TensorType> = Vec::with_capacity(g.nodes.len());
    let mut seen = HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let v = ValueId(i);
        let fail = |message: String| -> IrError { IrError::Verify { at: g.loc_of(v), op: n.op.keyword(), value: n.name.clone(), message } };
        if !seen.insert(n.name.as_str()) {
            return Err(fail(format!("value `%{}` is defined twice", n.name)));
        }
        let arity = n.op.arity();
        if n.operands.len() < arity.min || n.operands.len() > arity.max {
            let want = if arity.min == arity.max { arity.min.to_string() } else { format!("{}..={}", arity.min, arity.max) };
            return Err(fail(format!("takes {want} operands, got {}", n.operands.len())));
        }
        if let Some(o) = n.operands.iter().find(|o| o.0 >= i) {
            return Err(fail(format!("operand %{} is not defined before its use", o.0)));
        }
        let ty = match &n.op {
            Op::Input | Op::Weight { .. } | Op::Constant { .. } => {
                let Some(ty) = n.ty.clone() else {
                    return Err(fail("a leaf must declare its type".into()));
                };
                if !matches!(n.op, Op::Input) && ty.has_seq() {
                    return Err(fail(format!("type {ty} depends on `seq`; weights and constants need fixed shapes")));
                }
                if let Op::Constant { values } = &n.op {
                    let want = ty.numel().coef as usize;
                    if values.len() != want {
                        return Err(fail(format!("has {} values, its type {ty} needs {want}", values.len())));
                    }
                }
                ty
            }
            _ => {
                let ops: Vec<&TensorType> = n.operands.iter().map(|o| &types[o.0]).collect();
                let inferred = infer_type(&n.op, &ops).map_err(fail)?;
                if let Some(declared) = &n.ty {
                    if *declared != inferred {
                        return Err(fail(format!("declared type {declared} but its operands give {inferred}")));
                    }
                }
                inferred
            }
        };
        verify_patterns(g, v, &types).map_err(fail)?;
        types.push(ty);
    }
    if g.outputs.is_empty() {
        return Err(IrError::Verify {
            at: "return".into(),
            op: "return",
            value: g.name.clone(),
            message: "the graph returns nothing".into(),
        });
    }
    if let Some(o) = g.outputs.iter().find(|o| o.0 >= g.nodes.len()) {
        return Err(IrError::Verify {
            at: "return".into(),
            op: "return",
            value: g.name.clone(),
            message: format!("returns undefined value %{}", o.0),
        });
    }
    Ok(types)
}

fn ratio_ok(name: &str, r: f32) -> Result<(), String> {
    if (0.0..1.0).contains(&r) {
        Ok(())
    } else {
        Err(format!("{name} = {r} is outside [0, 1)"))
    }
}

fn fraction_ok(name: &str, r: f32) -> Result<(), String> {
    if r > 0.0 && r <= 1.0 {
        Ok(())
    } else {
        Err(format!("{name} = {r} is outside (0, 1]"))
    }
}

/// `#kv(chunked_svd)`'s own ranges: a positive chunk, a rank or energy cap
/// within it, an energy fraction in (0, 1].
pub fn verify_chunked_svd(chunk: u32, rank: SvdRank) -> Result<(), String> {
    positive("chunk", chunk)?;
    match rank {
        SvdRank::Fixed(r) => {
            positive("rank", r)?;
            if r > chunk {
                return Err(format!("rank {r} exceeds the chunk length {chunk}"));
            }
        }
        SvdRank::Energy { fraction, max_rank } => {
            fraction_ok("energy", fraction)?;
            if let Some(m) = max_rank {
                positive("max_rank", m)?;
                if m > chunk {
                    return Err(format!("max_rank {m} exceeds the chunk length {chunk}"));
                }
            }
        }
    }
    Ok(())
}

/// What `#kv(dct)` and `#kv(pswf)` share: a kept fraction, a positive block,
/// sinks and recent on the sequence axis only, and there no window or NSA
/// beside them (`verify_sequence_kv`'s ranges).
fn verify_kv_axis(
    name: &str,
    (keep, axis, block, sinks, recent): (f32, KvAxis, Option<u32>, u32, u32),
    families: &std::collections::HashSet<&str>,
) -> Result<(), String> {
    fraction_ok("keep", keep)?;
    if let Some(b) = block {
        positive("block", b)?;
    }
    match axis {
        KvAxis::Feature if sinks > 0 || recent > 0 => Err("sinks and recent belong to the sequence axis (axis = sequence)".into()),
        KvAxis::Feature => Ok(()),
        KvAxis::Sequence if families.contains("window") || families.contains("nsa") => {
            Err(format!("#kv({name}, axis = sequence) keeps every position: it is not combined with #window or #nsa"))
        }
        KvAxis::Sequence => verify_sequence_kv(keep, block, recent),
    }
}

/// `#kv(dct | pswf, axis = sequence)`'s own ranges: a block, and at least one
/// position kept of it.
pub fn verify_sequence_kv(keep: f32, block: Option<u32>, recent: u32) -> Result<(), String> {
    fraction_ok("keep", keep)?;
    let Some(block) = block else { return Err("the sequence axis needs a block length (block = N)".into()) };
    positive("block", block)?;
    if crate::kv_sequence::kept_rows(block, keep) == 0 {
        return Err(format!("keep = {keep} of a block of {block} keeps no position"));
    }
    positive("recent", recent)?;
    Ok(())
}

fn positive(name: &str, v: u32) -> Result<(), String> {
    if v > 0 {
        Ok(())
    } else {
        Err(format!("{name} must be positive"))
    }
}

/// Pattern invariants for node `v`; `types` holds the types of earlier values.
fn verify_patterns(g: &Graph, v: ValueId, types: &[TensorType]) -> Result<(), String> {
    let n = g.node(v);
    let site = match n.op {
        Op::MatMul { .. } => Some(PatternSite::MatMul),
        Op::Attention { .. } => Some(PatternSite::Attention),
        _ => None,
    };
    let mut families = HashSet::new();
    for p in &n.patterns {
        if site != Some(p.site()) {
            let want = match p.site() {
                PatternSite::MatMul => "matmul",
                PatternSite::Attention => "attention",
            };
            return Err(format!("pattern #{} applies to {want} ops only", p.keyword()));
        }
        if !families.insert(p.keyword()) {
            return Err(format!("pattern #{} is given twice", p.keyword()));
        }
    }
    let pre_rope = n.patterns.iter().any(|p| matches!(p, Pattern::Kv(KvCompression::PreRope { .. })));
    if matches!(n.op, Op::Attention { .. }) && n.operands.len() > 3 && !families.contains("nsa") && !pre_rope {
        return Err(format!(
            "attention takes 3 operands (q, k, v), got {}; only a gated #nsa takes a gate and a compression",
            n.operands.len()
        ));
    }
    if families.contains("nsa") && n.patterns.iter().any(|p| matches!(p, Pattern::Window(Window::Sliding { .. }))) {
        return Err("#nsa carries its own sliding window; remove #window(sliding, ...)".into());
    }
    // The weight matrix as [K, N] (reduction, output) for matmul patterns.
    let weight_kn = |what: &str| -> Result<(u64, u64), String> {
        let Op::MatMul { transpose_b } = n.op else { return Err(format!("{what} needs a matmul")) };
        let w = g.node(n.operands[1]);
        if !matches!(w.op, Op::Weight { .. } | Op::Constant { .. }) {
            return Err(format!("{what} needs operand 1 to be a weight or constant, got `{}`", w.op.keyword()));
        }
        let t = &types[n.operands[1].0];
        match (t.dims[0], t.dims[1]) {
            (Dim::Fixed(a), Dim::Fixed(b)) => Ok(if transpose_b { (b, a) } else { (a, b) }),
            _ => Err(format!("{what} needs a weight of fixed shape, got {t}")),
        }
    };
    for p in &n.patterns {
        match p {
            Pattern::Sparsity(s) => {
                let (k, nn) = weight_kn("#sparsity")?;
                let w = n.operands[1];
                if types[w.0].dtype != crate::types::DType::F32 {
                    return Err(format!(
                        "#sparsity prunes f32 weights; `%{}` is {} (a plan dequantizes the weights it prunes)",
                        g.node(w).name,
                        types[w.0].dtype.name()
                    ));
                }
                // Pruning changes the weight's data: every use must prune it alike.
                if let Some(other) = g
                    .nodes
                    .iter()
                    .find(|u| u.operands.contains(&w) && !(u.op == n.op && u.operands[1] == w && u.patterns.iter().any(|q| q == p)))
                {
                    return Err(format!(
                        "weight `%{}` is pruned here but `%{}` ({}) uses it unpruned or pruned otherwise; a tied weight must be pruned for all its uses or none",
                        g.node(w).name,
                        other.name,
                        other.op.keyword()
                    ));
                }
                match s {
                    Sparsity::Unstructured { ratio } => ratio_ok("ratio", *ratio)?,
                    Sparsity::NM { n: nz, m } => {
                        positive("m", *m)?;
                        positive("n", *nz)?;
                        if nz > m {
                            return Err(format!("N:M sparsity needs n <= m, got {nz}:{m}"));
                        }
                        if k % *m as u64 != 0 {
                            return Err(format!("N:M groups of m = {m} do not divide the reduction dimension {k}"));
                        }
                    }
                    Sparsity::Block { ratio, rows, cols } => {
                        ratio_ok("ratio", *ratio)?;
                        positive("rows", *rows)?;
                        positive("cols", *cols)?;
                        if nn % *rows as u64 != 0 || k % *cols as u64 != 0 {
                            return Err(format!("block {rows}x{cols} does not divide the weight (output {nn} x reduction {k})"));
                        }
                    }
                }
            }
            Pattern::Specialize(_) => {}
            Pattern::Values(coding) => {
                if !families.contains("sparsity") {
                    return Err(format!("#values({}) stores the kept values of a #sparsity pattern; this matmul has none", coding.name()));
                }
                // The stored values are the weight's data: every use codes them alike.
                let w = n.operands[1];
                if let Some(other) = g.nodes.iter().find(|u| u.operands.get(1) == Some(&w) && !u.patterns.iter().any(|q| q == p)) {
                    return Err(format!(
                        "weight `%{}` keeps {} values here but `%{}` uses it with other values; every use of a pruned weight stores it alike",
                        g.node(w).name,
                        coding.name(),
                        other.name
                    ));
                }
            }
            Pattern::LowRank(lr) => verify_low_rank(g, v, lr, weight_kn("#low_rank")?, &families)?,
            Pattern::Kv(kv) => match kv {
                KvCompression::Dct { keep, axis, block, sinks, recent } => {
                    verify_kv_axis("dct", (*keep, *axis, *block, *sinks, *recent), &families)?
                }
                KvCompression::Pswf { keep, axis, block, bandwidth, sinks, recent } => {
                    verify_kv_axis("pswf", (*keep, *axis, *block, *sinks, *recent), &families)?;
                    crate::kv_basis::check_bandwidth(*bandwidth)?;
                }
                KvCompression::ChunkedSvd { chunk, rank } => {
                    if families.contains("window") || families.contains("nsa") {
                        return Err("#kv(chunked_svd) factors a cache of every position: it is not combined with #window or #nsa".into());
                    }
                    verify_chunked_svd(*chunk, *rank)?;
                }
                KvCompression::PreRope { rank, theta, .. } => verify_pre_rope(g, v, *rank, *theta, types, &families)?,
            },
            Pattern::Window(w) => match w {
                Window::Full => {}
                Window::Sliding { size, .. } => positive("window size", *size)?,
            },
            Pattern::Nsa(nsa) => {
                positive("block", nsa.block)?;
                positive("top_n", nsa.top_n)?;
                positive("window", nsa.window)?;
                verify_nsa_operands(g, v, nsa, types)?;
            }
        }
    }
    Ok(())
}

/// `#kv(pre_rope, rank = r, ...)`: the attention takes q, the pre-RoPE key
/// coefficients `[seq, kv_heads·r]`, v, and the basis `[kv_heads·r, d]` (a
/// weight or constant) as operand 3; no window or `#nsa` (their kernels read
/// keys as cached).
fn verify_pre_rope(g: &Graph, v: ValueId, rank: u32, theta: f32, types: &[TensorType], families: &HashSet<&str>) -> Result<(), String> {
    let n = g.node(v);
    let Op::Attention { heads, kv_heads } = n.op else { return Err("#kv(pre_rope) needs an attention".into()) };
    if families.contains("nsa") || n.patterns.iter().any(|p| matches!(p, Pattern::Window(Window::Sliding { .. }))) {
        return Err("#kv(pre_rope) takes no sliding #window or #nsa: their kernels read keys as cached".into());
    }
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(format!("#kv(pre_rope) theta = {theta} must be positive"));
    }
    if n.operands.len() != 4 {
        return Err(format!("#kv(pre_rope) attention takes 4 operands (q, k coefficients, v, basis), got {}", n.operands.len()));
    }
    let d = match types[n.operands[0].0].dims.get(1) {
        Some(Dim::Fixed(w)) => w / (heads as u64).max(1),
        _ => return Err("#kv(pre_rope) needs q of a fixed width".into()),
    };
    let (r, kvh) = (rank as u64, kv_heads as u64);
    if r == 0 || r > d || !d.is_multiple_of(2) {
        return Err(format!("#kv(pre_rope) rank = {rank} must be in 1..={d}, of an even head width"));
    }
    let k = &types[n.operands[1].0];
    if k.dims != [Dim::Seq, Dim::Fixed(kvh * r)] {
        return Err(format!("#kv(pre_rope, rank = {rank}) takes key coefficients [seq, {}] as operand 1, got {k}", kvh * r));
    }
    let b = &types[n.operands[3].0];
    if b.dtype != crate::types::DType::F32
        || b.dims != [Dim::Fixed(kvh * r), Dim::Fixed(d)]
        || !matches!(g.node(n.operands[3]).op, Op::Weight { .. } | Op::Constant { .. })
    {
        return Err(format!("#kv(pre_rope, rank = {rank}) takes an f32[{}, {d}] weight as its basis (operand 3), got {b}", kvh * r));
    }
    Ok(())
}

/// The operands an `#nsa` attention takes beyond q, k and v
/// (`NativeSparse::extra_operands`): the gate, `[3·heads]` (fixed) or
/// `[seq, 3·heads]` (sigmoid logits), then the linear compression
/// `[2·kv_heads, NsaCompress::linear_words]`, which only a gated NSA reads.
fn verify_nsa_operands(g: &Graph, v: ValueId, nsa: &NativeSparse, types: &[TensorType]) -> Result<(), String> {
    let n = g.node(v);
    let Op::Attention { heads, kv_heads } = n.op else { return Err("#nsa needs an attention".into()) };
    if nsa.compress == NsaCompress::Linear && !nsa.gated() {
        return Err("#nsa compress = linear feeds the compressed branch, which only a gated NSA has (gate = fixed or sigmoid)".into());
    }
    let want = 3 + nsa.extra_operands();
    if n.operands.len() != want {
        return Err(format!(
            "#nsa with gate = {} and compress = {} takes {want} operands (q, k, v{}{}), got {}",
            nsa.gate.name(),
            nsa.compress.name(),
            if nsa.gated() { ", gate" } else { "" },
            if nsa.compress == NsaCompress::Linear { ", compression" } else { "" },
            n.operands.len()
        ));
    }
    let (h, kvh) = (heads as u64, kv_heads as u64);
    let d = match types[n.operands[0].0].dims.get(1) {
        Some(Dim::Fixed(w)) => w / h.max(1),
        _ => return Err("#nsa needs q of a fixed width".into()),
    };
    let mut i = 3;
    if nsa.gated() {
        let t = &types[n.operands[i].0];
        let want = match nsa.gate {
            NsaGate::Sigmoid => vec![Dim::Seq, Dim::Fixed(3 * h)],
            _ => vec![Dim::Fixed(3 * h)],
        };
        if t.dtype != crate::types::DType::F32 || t.dims != want {
            let shape = if nsa.gate == NsaGate::Sigmoid { format!("[seq, {}]", 3 * h) } else { format!("[{}]", 3 * h) };
            return Err(format!("#nsa gate = {} takes an f32{shape} gate as operand 3, got {t}", nsa.gate.name()));
        }
        i += 1;
    }
    if nsa.compress == NsaCompress::Linear {
        let t = &types[n.operands[i].0];
        let want = vec![Dim::Fixed(2 * kvh), Dim::Fixed(NsaCompress::linear_words(nsa.block as u64, d))];
        if t.dtype != crate::types::DType::F32
            || t.dims != want
            || !matches!(g.node(n.operands[i]).op, Op::Weight { .. } | Op::Constant { .. })
        {
            return Err(format!(
                "#nsa compress = linear takes an f32[{}, {}] weight as operand {i} (per K and V of each KV head: {} position weights, {d} biases, a {d}x{d} map), got {t}",
                2 * kvh,
                NsaCompress::linear_words(nsa.block as u64, d),
                nsa.block
            ));
        }
    }
    Ok(())
}

/// `#low_rank` on matmul `v` whose weight is `[k, n]` (reduction, output): a
/// positive rank no larger than the matrix has (`min(k, n)`, or `k` for a
/// shared basis, whose coefficients span the group's stacked outputs); a weight
/// (the factors replace a checkpoint tensor); not with `#sparsity` or
/// `#specialize`; a shared basis named by no weight, and every matmul sharing it
/// (earlier in the graph) agreeing on its rank and input width.
fn verify_low_rank(g: &Graph, v: ValueId, lr: &LowRank, (k, n): (u64, u64), families: &HashSet<&str>) -> Result<(), String> {
    let node = g.node(v);
    if !matches!(g.node(node.operands[1]).op, Op::Weight { .. }) {
        return Err("#low_rank factors a weight; operand 1 is a constant".into());
    }
    positive("rank", lr.rank)?;
    for other in ["sparsity", "specialize", "values"] {
        if families.contains(other) {
            return Err(format!("#low_rank does not combine with #{other} on one matmul"));
        }
    }
    let r = lr.rank as u64;
    let Some(basis) = &lr.basis else {
        if r > k.min(n) {
            return Err(format!("rank {r} exceeds min({k}, {n}), the rank of a {k}x{n} weight"));
        }
        return Ok(());
    };
    if basis.is_empty() {
        return Err("basis name is empty".into());
    }
    if r > k {
        return Err(format!("rank {r} of shared basis \"{basis}\" exceeds the input width {k}"));
    }
    if g.nodes.iter().any(|u| matches!(&u.op, Op::Weight { name, .. } if name == basis)) {
        return Err(format!("basis \"{basis}\" is also the name of a weight"));
    }
    for u in &g.nodes[..v.0] {
        let Op::MatMul { transpose_b } = u.op else { continue };
        let Some(Pattern::LowRank(o)) = u.patterns.iter().find(|p| matches!(p, Pattern::LowRank(_))) else { continue };
        if o.basis.as_deref() != Some(basis.as_str()) {
            continue;
        }
        if o.rank != lr.rank {
            return Err(format!("basis \"{basis}\" has rank {} at `%{}`, {} here", o.rank, u.name, lr.rank));
        }
        let Some(t) = g.node(u.operands[1]).ty.as_ref() else { continue };
        let uk = if transpose_b { t.dims.get(1) } else { t.dims.first() };
        if uk != Some(&Dim::Fixed(k)) {
            return Err(format!("basis \"{basis}\" spans inputs of width {k} here but `%{}` multiplies a different width", u.name));
        }
    }
    Ok(())
}
