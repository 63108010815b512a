//! A small helper for writing model graphs: named values, weights by role.

use sparsec_ir::{DType, Dim, Graph, Node, Op, TensorType, ValueId};

pub struct GraphBuilder {
    pub g: Graph,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder { g: Graph::new(name) }
    }

    pub fn input(&mut self, name: &str, dtype: DType, dims: &[Dim]) -> ValueId {
        self.g.push(Node::new(name, Op::Input, vec![]).with_type(TensorType::new(dtype, dims.to_vec())))
    }

    /// A weight whose tensor name is its role (`layers.3.attn.q`).
    pub fn weight(&mut self, role: &str, dims: &[u64]) -> ValueId {
        let dims = dims.iter().map(|d| Dim::Fixed(*d)).collect();
        self.g.push(Node::new(role, Op::Weight { name: role.to_string(), init: None }, vec![]).with_type(TensorType::new(DType::F32, dims)))
    }

    pub fn op(&mut self, name: &str, op: Op, operands: &[ValueId]) -> ValueId {
        self.g.push(Node::new(name, op, operands.to_vec()))
    }

    /// `x · Wᵀ` for a weight stored `[out, in]`.
    pub fn linear(&mut self, name: &str, x: ValueId, w: ValueId) -> ValueId {
        self.op(name, Op::MatMul { transpose_b: true }, &[x, w])
    }

    pub fn finish(mut self, outputs: &[ValueId]) -> Graph {
        self.g.outputs = outputs.to_vec();
        self.g
    }
}
