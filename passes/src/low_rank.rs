//! `low-rank`: lowers `#low_rank` — `matmul(x, W) #low_rank(rank, basis)`
//! becomes `matmul(matmul(x, B), C)` over two new f32 weights, both multiplied
//! transposed (`B` is `[rank, k]`, `C` is `[n, rank]`, as checkpoint matrices
//! are stored `[out, in]`). `B` is `W.lr_in`, or for a shared basis the weight
//! named by `basis`: ONE node, used by every matmul of its group, so the
//! artifact holds it once. `C` is `W.lr_out`. Their data come from the model
//! (`src/factor.rs` fits them and adds them under these names) or a weights
//! file; `W` itself is left to `dce` unless something else uses it (a tied
//! embedding). `PassManager::with_plan` runs it after `apply-plan` when the
//! plan factors weights (it is not in `registry()`). Nothing is constant-folded: the factors' neighbours (norms
//! feeding three projections, RoPE, attention per head, SiLU·mul, residual
//! adds) are not linear maps a factor could be multiplied into.

use sparsec_ir::{DType, Dim, Graph, IrError, LowRank, Node, Op, Pattern, TensorType, ValueId};

pub struct LowRankLowering;

/// The weight names of the factors of `weight`: the input-side factor (the
/// shared `basis`, else `WEIGHT.lr_in`) and the output-side one (`WEIGHT.lr_out`).
pub fn factor_names(weight: &str, basis: Option<&str>) -> (String, String) {
    (basis.map_or_else(|| format!("{weight}.lr_in"), str::to_string), format!("{weight}.lr_out"))
}

/// An SSA name not used in `g`, from `base`.
fn fresh(g: &Graph, base: &str) -> String {
    let base: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' { c } else { '_' }).collect();
    if g.find(&base).is_none() {
        return base;
    }
    (1..).map(|i| format!("{base}.{i}")).find(|n| g.find(n).is_none()).unwrap_or(base)
}

fn err(g: &Graph, at: usize, message: String) -> IrError {
    let n = &g.nodes[at];
    IrError::Verify { at: g.loc_of(ValueId(at)), op: n.op.keyword(), value: n.name.clone(), message }
}

impl crate::Pass for LowRankLowering {
    fn name(&self) -> &'static str {
        "low-rank"
    }

    fn description(&self) -> &'static str {
        "lower #low_rank: a matmul by W becomes a matmul by the input factor (a shared basis is one weight) and one by the output factor"
    }

    fn run(&self, g: &mut Graph) -> Result<(), IrError> {
        let mut i = 0;
        while i < g.nodes.len() {
            let Some(lr) = g.nodes[i].patterns.iter().find_map(|p| match p {
                Pattern::LowRank(lr) => Some(lr.clone()),
                _ => None,
            }) else {
                i += 1;
                continue;
            };
            let LowRank { rank, basis } = lr;
            let Op::MatMul { transpose_b } = g.nodes[i].op else { return Err(err(g, i, "#low_rank needs a matmul".into())) };
            let (x, w) = (g.nodes[i].operands[0], g.nodes[i].operands[1]);
            let Op::Weight { name, init } = &g.nodes[w.0].op else { return Err(err(g, i, "#low_rank factors a weight".into())) };
            if init.is_some() {
                return Err(err(
                    g,
                    i,
                    format!("#low_rank on `{name}`, which has an `init`: the factors are fitted from a checkpoint's data (sparsec compile MODEL --plan ...) or read from --weights"),
                ));
            }
            let name = name.clone();
            let dims = g.nodes[w.0].ty.as_ref().map(|t| t.dims.clone()).unwrap_or_default();
            let [Dim::Fixed(a), Dim::Fixed(b)] = dims[..] else { return Err(err(g, i, format!("`{name}` has no fixed matrix shape"))) };
            let (n, k) = if transpose_b { (a, b) } else { (b, a) };
            let r = rank as u64;
            let Some(x_ty) = g.nodes[x.0].ty.clone() else { return Err(err(g, i, "the input has no type (run shape-infer first)".into())) };
            let (in_name, out_name) = factor_names(&name, basis.as_deref());
            let mm = g.nodes[i].name.clone();
            let weight = |ssa: String, wname: String, dims: [u64; 2]| {
                Node::new(ssa, Op::Weight { name: wname, init: None }, vec![])
                    .with_type(TensorType::new(DType::F32, dims.iter().map(|d| Dim::Fixed(*d)).collect()))
            };
            // The input-side factor: a shared basis exists once, before its first use.
            let existing = basis.as_ref().and_then(|_| {
                g.nodes[..i].iter().position(|u| matches!(&u.op, Op::Weight { name, .. } if *name == in_name) && u.operands.is_empty())
            });
            let b_node = match existing {
                Some(at) => ValueId(at),
                None => {
                    let ssa = fresh(g, &format!("{mm}.lr_in"));
                    let v = g.insert(i, weight(ssa, in_name, [r, k]));
                    i += 1;
                    v
                }
            };
            let ssa = fresh(g, &format!("{mm}.lr_out"));
            let c_node = g.insert(i, weight(ssa, out_name, [n, r]));
            i += 1;
            let mut h_dims = x_ty.dims.clone();
            if let Some(last) = h_dims.last_mut() {
                *last = Dim::Fixed(r);
            }
            let ssa = fresh(g, &format!("{mm}.lr"));
            let h = g.insert(
                i,
                Node::new(ssa, Op::MatMul { transpose_b: true }, vec![g.nodes[i].operands[0], b_node])
                    .with_type(TensorType::new(x_ty.dtype, h_dims)),
            );
            i += 1;
            let node = &mut g.nodes[i];
            node.op = Op::MatMul { transpose_b: true };
            node.operands = vec![h, c_node];
            node.patterns.retain(|p| !matches!(p, Pattern::LowRank(_)));
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pass;
    use sparsec_ir::{parse_graph, print_graph, verify};

    #[test]
    fn a_shared_basis_is_one_weight_and_private_factors_are_their_own() {
        let mut g = parse_graph(
            "graph @g {\n  %x = input : f32[seq, 8]\n  %w0 = weight \"layers.0.attn.q\" : f32[6, 8]\n  %w1 = weight \"layers.1.attn.q\" : f32[6, 8]\n  %w2 = weight \"layers.2.attn.q\" : f32[8, 6]\n  %a = matmul %x, %w0 {transpose_b = true} #low_rank(rank = 5, basis = \"b\")\n  %b = matmul %x, %w1 {transpose_b = true} #low_rank(rank = 5, basis = \"b\")\n  %c = matmul %x, %w2 #low_rank(rank = 3)\n  return %a, %b, %c\n}\n",
        )
        .unwrap();
        verify(&g).unwrap();
        LowRankLowering.run(&mut g).unwrap();
        verify(&g).unwrap_or_else(|e| panic!("{e}\n{}", print_graph(&g)));
        let weights: Vec<(&str, String)> = g
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Weight { name, .. } => Some((name.as_str(), n.ty.as_ref().unwrap().to_string())),
                _ => None,
            })
            .collect();
        let count = |w: &str| weights.iter().filter(|(n, _)| *n == w).count();
        assert_eq!(count("b"), 1, "{weights:?}");
        assert!(weights.contains(&("b", "f32[5, 8]".into())), "{weights:?}");
        assert!(weights.contains(&("layers.1.attn.q.lr_out", "f32[6, 5]".into())), "{weights:?}");
        assert!(weights.contains(&("layers.2.attn.q.lr_in", "f32[3, 8]".into())), "{weights:?}");
        assert!(weights.contains(&("layers.2.attn.q.lr_out", "f32[6, 3]".into())), "{weights:?}");
        let b = g.find("a.lr_in").unwrap();
        assert_eq!(g.nodes.iter().filter(|n| n.operands.contains(&b)).count(), 2, "both layers multiply by the one basis");
        assert!(g.nodes.iter().all(|n| n.patterns.is_empty()));
        let text = print_graph(&g);
        assert_eq!(print_graph(&parse_graph(&text).unwrap()), text);
    }

    #[test]
    fn a_weight_with_an_init_is_refused() {
        let mut g = parse_graph(
            "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" init normal(seed = 1, std = 0.3) : f32[8, 8]\n  %y = matmul %x, %w #low_rank(rank = 2)\n  return %y\n}\n",
        )
        .unwrap();
        crate::ShapeInference.run(&mut g).unwrap();
        let e = LowRankLowering.run(&mut g).unwrap_err().to_string();
        assert!(e.contains("has an `init`"), "{e}");
    }
}
