//! Kernel fusion, as a small table of rules over the typed graph: which nodes
//! are computed inside another node's kernel instead of by a kernel (and a
//! buffer, and a pass over memory) of their own. The IR is unchanged; the
//! fused kernels are named `k<N>_<op>_<fused>` in the manifest.
//!
//! - `matmul → add` (residual or bias): the add happens in the matmul's stores.
//! - `matmul → add → gelu|silu` (GPT-2's bias + GELU): the activation follows
//!   the add in the matmul's stores.
//! - `matmul → add → add` (GPT-2's bias, then the residual): both adds happen
//!   in the matmul's stores, in the graph's order.
//! - `silu → mul` (SwiGLU's gate): the SiLU is applied to the mul's first
//!   operand as it is loaded.

use crate::mlir::kernels::{Epilogue, Prologue};
use crate::mlir::math::Activation;
use sparsec_ir::{Graph, Op, TensorType};
use std::collections::HashMap;

/// A node computed by a fused kernel at its position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fused {
    /// The node whose op the kernel computes (a matmul, or this mul).
    pub src: usize,
    /// The nodes absorbed into the kernel (computed nowhere else).
    pub absorbed: [Option<usize>; 2],
    /// The kernel's operands (graph values), in ABI order.
    pub operands: [usize; 4],
    pub arity: usize,
    pub epilogue: Option<Epilogue>,
    /// Applied after the epilogue's add.
    pub activation: Option<Activation>,
    pub prologue: Option<Prologue>,
}

impl Fused {
    pub fn operands(&self) -> &[usize] {
        &self.operands[..self.arity]
    }
}

/// One fusion rule: given node `u`, the fused kernel it becomes, if any.
type Rule = fn(g: &Graph, types: &[TensorType], uses: &[usize], u: usize) -> Option<Fused>;

/// The rules, tried in order on every node.
const RULES: [(&str, Rule); 4] = [
    ("matmul-add", matmul_add),
    ("matmul-add-activation", matmul_add_activation),
    ("matmul-bias-residual", matmul_bias_residual),
    ("silu-mul", silu_mul),
];

/// Whether `v` is used exactly once and is not a graph output.
fn single_use(g: &Graph, uses: &[usize], v: usize) -> bool {
    uses[v] == 1 && !g.outputs.iter().any(|o| o.0 == v)
}

/// `add(matmul(a, w), c)`: the matmul reads a transposed weight (its kernels
/// store scalars) and is used by this add only; `c` has the add's shape (a
/// residual) or is a vector over the output features (a bias).
fn matmul_add(g: &Graph, types: &[TensorType], uses: &[usize], u: usize) -> Option<Fused> {
    let n = &g.nodes[u];
    if n.op != Op::Add || n.operands.len() != 2 {
        return None;
    }
    let (a, b) = (n.operands[0].0, n.operands[1].0);
    [(a, b), (b, a)].into_iter().find_map(|(m, r)| {
        let mm = &g.nodes[m];
        if !matches!(mm.op, Op::MatMul { transpose_b: true }) || m == r || !single_use(g, uses, m) || types[m] != types[u] {
            return None;
        }
        let e = if types[r] == types[u] {
            Epilogue::Residual
        } else if types[r].dims.len() == 1 && types[r].dims.last() == types[u].dims.last() {
            Epilogue::Bias
        } else {
            return None;
        };
        Some(Fused {
            src: m,
            absorbed: [Some(m), None],
            operands: [mm.operands[0].0, mm.operands[1].0, r, 0],
            arity: 3,
            epilogue: Some(e),
            activation: None,
            prologue: None,
        })
    })
}

/// `gelu(add(matmul(a, w), c))` or `silu(...)`, where the add fuses with its
/// matmul (`matmul_add`) and is used by the activation only.
fn matmul_add_activation(g: &Graph, types: &[TensorType], uses: &[usize], u: usize) -> Option<Fused> {
    let n = &g.nodes[u];
    let activation = match n.op {
        Op::Gelu { approx } => Activation::Gelu(approx),
        Op::Silu => Activation::Silu,
        _ => return None,
    };
    let add = n.operands.first()?.0;
    if n.operands.len() != 1 || !single_use(g, uses, add) || types[add] != types[u] {
        return None;
    }
    let f = matmul_add(g, types, uses, add)?;
    Some(Fused { absorbed: [f.absorbed[0], Some(add)], activation: Some(activation), ..f })
}

/// `add(add(matmul(a, w), bias), r)`: the inner add fuses with its matmul as
/// a bias (`matmul_add`) and is used by this add only; `r` has the result's
/// shape (a residual; it may also be the matmul's input).
fn matmul_bias_residual(g: &Graph, types: &[TensorType], uses: &[usize], u: usize) -> Option<Fused> {
    let n = &g.nodes[u];
    if n.op != Op::Add || n.operands.len() != 2 || types[n.operands[0].0] != types[u] || types[n.operands[1].0] != types[u] {
        return None;
    }
    let (a, b) = (n.operands[0].0, n.operands[1].0);
    [(a, b), (b, a)].into_iter().find_map(|(inner, r)| {
        if inner == r || !single_use(g, uses, inner) {
            return None;
        }
        let f = matmul_add(g, types, uses, inner).filter(|f| f.epilogue == Some(Epilogue::Bias))?;
        Some(Fused {
            absorbed: [f.absorbed[0], Some(inner)],
            operands: [f.operands[0], f.operands[1], f.operands[2], r],
            arity: 4,
            epilogue: Some(Epilogue::BiasResidual),
            ..f
        })
    })
}

/// `mul(silu(x), y)` with both of the result's shape, the SiLU used only here.
fn silu_mul(g: &Graph, types: &[TensorType], uses: &[usize], u: usize) -> Option<Fused> {
    let n = &g.nodes[u];
    if n.op != Op::Mul || n.operands.len() != 2 {
        return None;
    }
    let (s, y) = (n.operands[0].0, n.operands[1].0);
    let sn = &g.nodes[s];
    if sn.op != Op::Silu || s == y || !single_use(g, uses, s) || types[s] != types[u] || types[y] != types[u] {
        return None;
    }
    Some(Fused {
        src: u,
        absorbed: [Some(s), None],
        operands: [sn.operands[0].0, y, 0, 0],
        arity: 2,
        epilogue: None,
        activation: None,
        prologue: Some(Prologue::Silu),
    })
}

/// Every fusion in `g`, by the node whose position runs the fused kernel.
pub fn fusions(g: &Graph, types: &[TensorType]) -> HashMap<usize, Fused> {
    let mut uses = vec![0usize; g.nodes.len()];
    for n in &g.nodes {
        for o in &n.operands {
            uses[o.0] += 1;
        }
    }
    // Later nodes first: a fusion whose node another fusion absorbs, or that
    // reads a value another absorbs, is dropped (`silu(add(matmul))` feeding a
    // `mul` fuses as silu-mul, and the add keeps its matmul-add).
    let mut out = HashMap::new();
    let mut absorbed = vec![false; g.nodes.len()];
    for u in (0..g.nodes.len()).rev() {
        let Some(f) = RULES.iter().find_map(|(_, rule)| rule(g, types, &uses, u)) else { continue };
        if absorbed[u] || f.operands().iter().any(|&o| absorbed[o]) {
            continue;
        }
        for a in f.absorbed.into_iter().flatten() {
            absorbed[a] = true;
        }
        out.insert(u, f);
    }
    out
}
