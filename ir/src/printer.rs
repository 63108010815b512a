//! The text form of a graph. `parser.rs` reads exactly what this writes.

use crate::attr::{fmt_float, quote};
use crate::graph::Graph;
use crate::op::Op;
use std::fmt::Write;

/// Prints a graph in canonical text form.
pub fn print_graph(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph @{} {{", g.name);
    for n in &g.nodes {
        let _ = write!(s, "  %{} = {}", n.name, n.op.keyword());
        match &n.op {
            Op::Weight { name, init } => {
                let _ = write!(s, " {}", quote(name));
                if let Some(init) = init {
                    let (kind, args) = init.to_args();
                    let _ = write!(s, " init {kind}");
                    if !args.is_empty() {
                        let _ = write!(s, "({args})");
                    }
                }
            }
            Op::Constant { values } => {
                s.push_str(" [");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    s.push_str(&fmt_float(*v));
                }
                s.push(']');
            }
            _ => {}
        }
        for (i, o) in n.operands.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            let name = g.nodes.get(o.0).map(|d| d.name.as_str()).unwrap_or("<undefined>");
            let _ = write!(s, "{sep}%{name}");
        }
        let attrs = n.op.attr_args();
        if !attrs.is_empty() {
            let _ = write!(s, " {{{attrs}}}");
        }
        for p in &n.patterns {
            let args = p.to_args();
            let _ = write!(s, " #{}({args})", p.keyword());
        }
        if let Some(ty) = &n.ty {
            let _ = write!(s, " : {ty}");
        }
        s.push('\n');
    }
    s.push_str("  return");
    for (i, o) in g.outputs.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        let name = g.nodes.get(o.0).map(|d| d.name.as_str()).unwrap_or("<undefined>");
        let _ = write!(s, "{sep}%{name}");
    }
    s.push_str("\n}\n");
    s
}

impl std::fmt::Display for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&print_graph(self))
    }
}
