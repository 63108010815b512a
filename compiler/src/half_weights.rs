//! `--weights-dtype f16|bf16|q8_0|q4_1`: retypes a graph's dense f32 weights
//! that only transposed matmuls (as their `[N, K]` operand) and embeddings
//! (as their table) read, so the artifact stores them in 16 bits or in blocks
//! of 32 quantized values and the kernels widen or dequantize them as they
//! load (`weights::resolve` rounds or quantizes the data when it packs it).

use sparsec_ir::graph::weight_buffer_name;
use sparsec_ir::{DType, Graph, Op};
use std::collections::{HashMap, HashSet};

/// Retypes every eligible weight of `g` to `dt` (f16, bf16 or a block-
/// quantized type) and returns the buffer names retyped. A weight is
/// eligible when it is f32 of rank 2 (for a quantized `dt`, its rows whole
/// blocks of 32), and every node of its buffer (a tied table has several) is
/// read only as a dense (unpruned) transposed matmul weight or an embedding table.
pub fn apply(g: &mut Graph, dt: DType) -> Vec<String> {
    if !dt.is_half() && !dt.is_quantized() {
        return Vec::new();
    }
    let whole_blocks = |t: &sparsec_ir::TensorType| {
        !dt.is_quantized() || matches!(t.last_dim(), Some(sparsec_ir::Dim::Fixed(k)) if k % sparsec_ir::quant::QK as u64 == 0)
    };
    let pruned = sparsec_ir::sparse::pruned_weights(g);
    // For every buffer name: whether all its nodes and uses allow 16 bits.
    let mut ok: HashMap<String, bool> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let Op::Weight { .. } = n.op else { continue };
        let Some(name) = weight_buffer_name(g, i) else { continue };
        let f32_matrix = n.ty.as_ref().is_some_and(|t| t.dtype == DType::F32 && t.rank() == 2 && whole_blocks(t));
        let e = ok.entry(name).or_insert(true);
        *e &= f32_matrix && !pruned.contains_key(&i);
    }
    for n in &g.nodes {
        for (slot, v) in n.operands.iter().enumerate() {
            let Some(name) = weight_buffer_name(g, v.0).filter(|_| matches!(g.nodes[v.0].op, Op::Weight { .. })) else { continue };
            let allowed = matches!((&n.op, slot), (Op::MatMul { transpose_b: true }, 1) | (Op::Embedding, 0));
            if let Some(e) = ok.get_mut(&name) {
                *e &= allowed;
            }
        }
    }
    let chosen: HashSet<String> = ok.into_iter().filter_map(|(name, yes)| yes.then_some(name)).collect();
    for i in 0..g.nodes.len() {
        if weight_buffer_name(g, i).is_some_and(|name| chosen.contains(&name)) {
            if let Some(t) = g.nodes[i].ty.as_mut() {
                t.dtype = dt;
            }
        }
    }
    let mut names: Vec<String> = chosen.into_iter().collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "graph @g {
  %ids = input : i32[seq]
  %wte = weight \"wte\" init normal(seed = 1, std = 0.3) : f32[16, 8]
  %w = weight \"w\" init normal(seed = 2, std = 0.3) : f32[8, 8]
  %b = weight \"b\" init normal(seed = 3, std = 0.3) : f32[8]
  %x = embedding %wte, %ids
  %h = matmul %x, %w {transpose_b = true}
  %hb = add %h, %b
  %y = matmul %hb, %wte {transpose_b = true}
  return %y
}";

    fn typed() -> Graph {
        let mut g = sparsec_ir::parse_graph(SRC).unwrap();
        let types = sparsec_ir::verify(&g).unwrap();
        for (n, t) in g.nodes.iter_mut().zip(types) {
            n.ty = Some(t);
        }
        g
    }

    #[test]
    fn retypes_matmul_weights_and_the_tied_table_but_not_a_bias() {
        let mut g = typed();
        assert_eq!(apply(&mut g, DType::BF16), vec!["w".to_string(), "wte".to_string()]);
        let ty = |name: &str| g.nodes.iter().find(|n| n.name == name).and_then(|n| n.ty.clone()).unwrap().dtype;
        assert_eq!((ty("wte"), ty("w"), ty("b")), (DType::BF16, DType::BF16, DType::F32));
        // The graph still verifies, and the products stay f32.
        let types = sparsec_ir::verify(&g).unwrap();
        assert!(types.iter().zip(&g.nodes).filter(|(_, n)| matches!(n.op, Op::MatMul { .. })).all(|(t, _)| t.dtype == DType::F32));
    }

    #[test]
    fn quantized_types_take_only_rows_of_whole_blocks() {
        // Rows of 64 (two blocks): the matmul weight and the tied table.
        let wide = SRC.replace("f32[16, 8]", "f32[16, 64]").replace("f32[8, 8]", "f32[64, 64]").replace("f32[8]", "f32[64]");
        let mut q = sparsec_ir::parse_graph(&wide).unwrap();
        let types = sparsec_ir::verify(&q).unwrap();
        for (n, t) in q.nodes.iter_mut().zip(types) {
            n.ty = Some(t);
        }
        assert_eq!(apply(&mut q, DType::Q4_1), vec!["w".to_string(), "wte".to_string()]);
        let ty = |name: &str| q.nodes.iter().find(|n| n.name == name).and_then(|n| n.ty.clone()).unwrap().dtype;
        assert_eq!((ty("wte"), ty("w"), ty("b")), (DType::Q4_1, DType::Q4_1, DType::F32));
        // Rows of 8 are no whole block: nothing is quantized.
        let mut g = typed();
        assert!(apply(&mut g, DType::Q8_0).is_empty());
    }

    #[test]
    fn f32_leaves_the_graph_alone() {
        let mut g = typed();
        let before = g.clone();
        assert!(apply(&mut g, DType::F32).is_empty());
        assert_eq!(g, before);
    }
}
