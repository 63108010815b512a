//! Feature-axis K/V bases (`kv = { transform, keep }` rules): the rewrite
//! that caches an attention's K and V as `keep·d` coefficients per head —
//! q, k and v projected by the layer's basis weights before it, its output
//! expanded after it. The weights themselves are computed by the compile
//! (`src/kv_basis.rs`: DCT, PSWF or calibrated PCA).

use crate::apply_plan::{attention_input, fresh_name};
use sparsec_ir::{DType, Dim, Graph, KvCompression, Node, Op, Pattern, TensorType, ValueId};

/// The names of a layer's feature-axis basis weights (`kv = { ... }`), each
/// block-diagonal over heads, `[in, out]`: q's `[h·d, h·r]` (K's basis of
/// the head's KV group, scaled by √(r/d) so scores keep their 1/√d), k's and
/// v's `[kvh·d, kvh·r]`, and the output's `[h·r, h·d]` (V's basis,
/// transposed). `src/kv_basis.rs` computes them.
pub fn kv_basis_names(layer: u64) -> [String; 4] {
    ["q", "k", "v", "o"].map(|w| format!("layers.{layer}.kv.{w}"))
}

/// The names of a layer's pre-RoPE key basis weights (`kv = { rope =
/// "before" }`): the projection of the key projection's output onto the
/// basis, block-diagonal `[kvh·d, kvh·r]`, and the basis the attention expands
/// cached keys by, `[kvh·r, d]` (`#kv(pre_rope)`'s operand 3).
pub fn kv_pre_rope_names(layer: u64) -> [String; 2] {
    ["k", "kb"].map(|w| format!("layers.{layer}.kv.{w}"))
}

/// Caches attention `name`'s K before RoPE as `keep·d` coefficients per KV
/// head: k is taken before its rope, projected onto the basis, and the
/// attention (`#kv(pre_rope)`) expands and rotates each key as it reads it.
fn set_pre_rope_basis(g: &mut Graph, att: usize, layer: u64, kv: &crate::plan::KvPlan) -> Result<(), String> {
    let Op::Attention { heads, kv_heads } = g.nodes[att].op else { return Err("kv needs an attention".into()) };
    let kvh = kv_heads as u64;
    let k_rope = g.nodes[att].operands[1];
    let Op::Rope { heads: rh, theta, adjacent } = g.node(k_rope).op else {
        return Err("kv rope = \"before\" needs the attention's k to be the rope of a key projection".into());
    };
    if rh != kv_heads {
        return Err(format!("the key rope rotates {rh} heads, the attention has {kv_heads} KV heads"));
    }
    let k_pre = g.node(k_rope).operands[0];
    let (_, _, qw) =
        attention_input(g, att).ok_or_else(|| "kv needs q to be a projection of the layer input by a weight of fixed shape".to_string())?;
    let d = qw / (heads as u64).max(1);
    let r = sparsec_ir::kv_basis::kept(d, kv.keep);
    let [wk, wkb] = kv_pre_rope_names(layer);
    let weight = |g: &Graph, role: &str, rows: u64, cols: u64| {
        let ty = TensorType::new(DType::F32, vec![Dim::Fixed(rows), Dim::Fixed(cols)]);
        Node::new(fresh_name(g, role), Op::Weight { name: role.to_string(), init: None }, vec![]).with_type(ty)
    };
    let name = g.nodes[att].name.clone();
    let w = g.insert(att, weight(g, &wk, kvh * d, kvh * r));
    let coef = g.insert(att + 1, Node::new(fresh_name(g, &format!("{name}.k.kv")), Op::MatMul { transpose_b: false }, vec![k_pre, w]));
    let basis = g.insert(att + 2, weight(g, &wkb, kvh * r, d));
    let att = att + 3;
    let n = &mut g.nodes[att];
    n.operands[1] = coef;
    n.operands.push(basis);
    n.patterns.push(Pattern::Kv(KvCompression::PreRope { rank: r as u32, theta, adjacent }));
    n.ty = None;
    Ok(())
}

/// The names of a layer's channel scales (`kv = { transform = "smooth" }`):
/// q's `[h·d]` and k's `[kvh·d]`.
pub fn kv_smooth_names(layer: u64) -> [String; 2] {
    ["sq", "sk"].map(|w| format!("layers.{layer}.kv.{w}"))
}

/// Multiplies the attention's q and k by the layer's channel scales (`mul`
/// by a weight row, before the attention; `src/kv_basis.rs` makes them
/// reciprocal per channel, so the scores are unchanged).
fn set_smoothing(g: &mut Graph, att: usize, layer: u64) -> Result<(), String> {
    let Op::Attention { heads, kv_heads } = g.nodes[att].op else { return Err("kv needs an attention".into()) };
    let (_, _, qw) =
        attention_input(g, att).ok_or_else(|| "kv needs q to be a projection of the layer input by a weight of fixed shape".to_string())?;
    let d = qw / (heads as u64).max(1);
    let name = g.nodes[att].name.clone();
    let mut at = att;
    for (slot, (role, n)) in kv_smooth_names(layer).iter().zip([heads as u64, kv_heads as u64]).enumerate() {
        let ty = TensorType::new(DType::F32, vec![Dim::Fixed(n * d)]);
        let w = g.insert(at, Node::new(fresh_name(g, role), Op::Weight { name: role.clone(), init: None }, vec![]).with_type(ty));
        at += 1;
        let x = g.nodes[at].operands[slot];
        let base = format!("{name}.{}.smooth", ["q", "k"][slot]);
        let m = g.insert(at, Node::new(fresh_name(g, &base), Op::Mul, vec![x, w]));
        at += 1;
        g.nodes[at].operands[slot] = m;
    }
    Ok(())
}

/// Caches attention `name`'s K and V in a feature-axis basis of `keep·d`
/// columns per head: q, k and v are projected by the layer's basis weights
/// before it, and its output is expanded after it (every use of it then reads
/// the expansion).
pub(crate) fn set_kv_basis(g: &mut Graph, name: &str, layer: u64, kv: &crate::plan::KvPlan) -> Result<(), String> {
    let att = g.find(name).ok_or_else(|| format!("`%{name}` is gone"))?.0;
    if g.nodes[att].patterns.iter().any(|p| matches!(p, Pattern::Kv(_))) || g.nodes[att].operands.len() > 3 {
        return Err(format!("`%{name}` is given a kv basis twice, or one with #nsa"));
    }
    if kv.pre_rope {
        return set_pre_rope_basis(g, att, layer, kv);
    }
    if let crate::plan::KvTransform::Smooth { .. } = kv.transform {
        return set_smoothing(g, att, layer);
    }
    let Op::Attention { heads, kv_heads } = g.nodes[att].op else { return Err("kv needs an attention".into()) };
    let (h, kvh) = (heads as u64, kv_heads as u64);
    let (_, _, qw) = attention_input(g, att)
        .ok_or_else(|| format!("`%{name}`: kv needs q to be a projection of the layer input by a weight of fixed shape"))?;
    let d = qw / h.max(1);
    let r = sparsec_ir::kv_basis::kept(d, kv.keep);
    if g.nodes.iter().any(|n| matches!(&n.op, Op::Weight { name: w, .. } if w.starts_with(&format!("layers.{layer}.kv.")))) {
        return Err(format!("layer {layer} is given a kv basis twice"));
    }
    let [wq, wk, wv, wo] = kv_basis_names(layer);
    let weight = |g: &Graph, role: &str, rows: u64, cols: u64| {
        let ty = TensorType::new(DType::F32, vec![Dim::Fixed(rows), Dim::Fixed(cols)]);
        Node::new(fresh_name(g, role), Op::Weight { name: role.to_string(), init: None }, vec![]).with_type(ty)
    };
    // Inserted before the attention, which moves down one each time.
    let mut at = att;
    let mut projected = Vec::new();
    for (slot, (role, n_heads)) in [(&wq, h), (&wk, kvh), (&wv, kvh)].into_iter().enumerate() {
        let w = g.insert(at, weight(g, role, n_heads * d, n_heads * r));
        at += 1;
        let x = g.nodes[at].operands[slot];
        let base = format!("{name}.{}", ["q", "k", "v"][slot]);
        projected.push(g.insert(at, Node::new(fresh_name(g, &format!("{base}.kv")), Op::MatMul { transpose_b: false }, vec![x, w])));
        at += 1;
    }
    let w_out = g.insert(at, weight(g, &wo, h * r, h * d));
    at += 1;
    g.nodes[at].operands[..3].copy_from_slice(&projected);
    // Its width is now the kept columns' (shape inference gives it again).
    g.nodes[at].ty = None;
    // The expansion, right after the attention; every other use reads it.
    let att_v = ValueId(at);
    let o = g.insert(at + 1, Node::new(fresh_name(g, &format!("{name}.kv_out")), Op::MatMul { transpose_b: false }, vec![att_v, w_out]));
    for (i, n) in g.nodes.iter_mut().enumerate() {
        if i != o.0 {
            for v in n.operands.iter_mut().filter(|v| **v == att_v) {
                *v = o;
            }
        }
    }
    for v in g.outputs.iter_mut().filter(|v| **v == att_v) {
        *v = o;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{KvPlan, KvTransform};

    fn graph() -> Graph {
        sparsec_ir::parse_graph(
            "graph @g {\n  %x = input : f32[seq, 16]\n  %wq = weight \"wq\" : f32[16, 16]\n  %wk = weight \"wk\" : f32[16, 8]\n  %q = matmul %x, %wq\n  %k = matmul %x, %wk\n  %qr = rope %q {heads = 4, theta = 10000.0, adjacent = true}\n  %kr = rope %k {heads = 2, theta = 10000.0, adjacent = true}\n  %attn = attention %qr, %kr, %k {heads = 4, kv_heads = 2}\n  return %attn\n}\n",
        )
        .unwrap()
    }

    #[test]
    fn smoothing_scales_q_and_k_by_the_layers_weights() {
        let mut g = graph();
        let kv = KvPlan { transform: KvTransform::Smooth { alpha: 0.5 }, keep: 1.0, pre_rope: false, fit_scores: false };
        set_kv_basis(&mut g, "attn", 3, &kv).unwrap();
        sparsec_ir::verify(&g).unwrap();
        let att = g.find("attn").unwrap();
        for (slot, (want, width)) in [("layers.3.kv.sq", 16), ("layers.3.kv.sk", 8)].into_iter().enumerate() {
            let m = g.node(g.node(att).operands[slot]);
            assert!(matches!(m.op, Op::Mul), "operand {slot} is {}", m.op.keyword());
            let w = g.node(m.operands[1]);
            assert!(matches!(&w.op, Op::Weight { name, .. } if name == want), "{slot}: {}", w.name);
            assert_eq!(w.ty.as_ref().map(|t| t.dims.clone()), Some(vec![Dim::Fixed(width)]));
        }
        // Twice is refused.
        assert!(set_kv_basis(&mut g, "attn", 3, &kv).is_err());
    }

    #[test]
    fn keys_before_rope_read_the_projection_before_its_rope() {
        let mut g = graph();
        let kv = KvPlan { transform: KvTransform::Pca, keep: 0.5, pre_rope: true, fit_scores: true };
        set_kv_basis(&mut g, "attn", 0, &kv).unwrap();
        sparsec_ir::verify(&g).unwrap();
        let n = g.node(g.find("attn").unwrap());
        assert!(
            n.patterns.iter().any(|p| matches!(p, Pattern::Kv(KvCompression::PreRope { rank: 2, adjacent: true, .. }))),
            "{:?}",
            n.patterns
        );
        // k = (x·wk)·P, the rope skipped; the basis is operand 3.
        let coef = g.node(n.operands[1]);
        assert!(matches!(coef.op, Op::MatMul { .. }) && g.node(coef.operands[0]).name == "k", "{}", coef.name);
        assert!(matches!(&g.node(n.operands[3]).op, Op::Weight { name, .. } if name == "layers.0.kv.kb"));
    }
}
