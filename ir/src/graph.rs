//! The graph: nodes in definition order, each defining one SSA value.

use crate::op::Op;
use crate::pattern::Pattern;
use crate::types::TensorType;

/// A value, named by the index of the node that defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

/// Where a node came from in IR text (1-based); diagnostics only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    /// The SSA name without `%`.
    pub name: String,
    pub op: Op,
    pub operands: Vec<ValueId>,
    pub patterns: Vec<Pattern>,
    /// Declared or inferred result type; `None` until shape inference.
    pub ty: Option<TensorType>,
    pub loc: Option<Loc>,
}

/// Nodes are equal when they mean the same; where they were parsed from does not
/// matter, so a parsed graph equals the graph it was printed from.
impl PartialEq for Node {
    fn eq(&self, o: &Node) -> bool {
        self.name == o.name && self.op == o.op && self.operands == o.operands && self.patterns == o.patterns && self.ty == o.ty
    }
}

impl Node {
    pub fn new(name: impl Into<String>, op: Op, operands: Vec<ValueId>) -> Node {
        Node { name: name.into(), op, operands, patterns: Vec::new(), ty: None, loc: None }
    }

    pub fn with_type(mut self, ty: TensorType) -> Node {
        self.ty = Some(ty);
        self
    }

    pub fn with_patterns(mut self, patterns: Vec<Pattern>) -> Node {
        self.patterns = patterns;
        self
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), nodes: Vec::new(), outputs: Vec::new() }
    }

    /// Appends a node and returns its value.
    pub fn push(&mut self, node: Node) -> ValueId {
        self.nodes.push(node);
        ValueId(self.nodes.len() - 1)
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.0]
    }

    /// The type of a value; panics only if shape inference has not run, which the
    /// pass pipeline guarantees (callers after `shape-infer` only).
    pub fn ty(&self, v: ValueId) -> Option<&TensorType> {
        self.nodes.get(v.0).and_then(|n| n.ty.as_ref())
    }

    pub fn inputs(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.nodes.iter().enumerate().filter(|(_, n)| n.op == Op::Input).map(|(i, _)| ValueId(i))
    }

    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.nodes.iter().position(|n| n.name == name).map(ValueId)
    }

    /// Location for diagnostics, `?:?` when the node was not parsed.
    pub fn loc_of(&self, v: ValueId) -> String {
        match self.nodes.get(v.0).and_then(|n| n.loc) {
            Some(l) => l.to_string(),
            None => format!("node {}", v.0),
        }
    }

    /// Inserts `node` at position `at`, renumbering later values; returns its value.
    pub fn insert(&mut self, at: usize, node: Node) -> ValueId {
        for n in &mut self.nodes {
            for o in &mut n.operands {
                if o.0 >= at {
                    o.0 += 1;
                }
            }
        }
        for o in &mut self.outputs {
            if o.0 >= at {
                o.0 += 1;
            }
        }
        self.nodes.insert(at, node);
        ValueId(at)
    }

    /// Keeps only `keep[i]` nodes, renumbering operands and outputs.
    /// Every operand of a kept node must be kept.
    pub fn retain(&mut self, keep: &[bool]) {
        let mut remap = vec![usize::MAX; self.nodes.len()];
        let mut next = 0;
        for (i, k) in keep.iter().enumerate() {
            if *k {
                remap[i] = next;
                next += 1;
            }
        }
        let old = std::mem::take(&mut self.nodes);
        for (i, mut n) in old.into_iter().enumerate() {
            if keep[i] {
                for o in &mut n.operands {
                    o.0 = remap[o.0];
                }
                self.nodes.push(n);
            }
        }
        for o in &mut self.outputs {
            o.0 = remap[o.0];
        }
    }
}

/// The buffer name of a weight or constant node in a compiled artifact: the
/// checkpoint tensor name for weights (tied weights share one buffer; a pruned
/// copy of a tied weight is `<name>.pruned`), `const.<value>` for constants.
pub fn weight_buffer_name(g: &Graph, node: usize) -> Option<String> {
    let n = g.nodes.get(node)?;
    match &n.op {
        Op::Weight { name, .. } if n.name.ends_with(".pruned") => Some(format!("{name}.pruned")),
        Op::Weight { name, .. } => Some(name.clone()),
        Op::Constant { .. } => Some(format!("const.{}", n.name)),
        _ => None,
    }
}
