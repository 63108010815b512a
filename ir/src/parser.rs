//! Reads the text form written by `printer.rs`; every error carries line:column.

use crate::attr::{AttrArgs, AttrValue};
use crate::error::{IrError, IrResult};
use crate::graph::{Graph, Loc, Node, ValueId};
use crate::lexer::{tokenize, Tok, Token};
use crate::op::{Init, Op};
use crate::pattern::Pattern;
use crate::types::{DType, Dim, TensorType};
use std::collections::HashMap;

/// Parses one graph. Types may be left out on compute ops (shape inference fills
/// them in); inputs, weights and constants must declare theirs.
pub fn parse_graph(src: &str) -> IrResult<Graph> {
    let toks = tokenize(src)?;
    let mut p = Parser { toks, pos: 0 };
    let g = p.graph()?;
    p.expect_eof()?;
    Ok(g)
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn err_at<T>(&self, t: &Token, message: impl Into<String>) -> IrResult<T> {
        Err(IrError::Parse { line: t.line, col: t.col, message: message.into() })
    }

    fn expect_punct(&mut self, c: char) -> IrResult<()> {
        let t = self.next();
        if t.tok == Tok::Punct(c) {
            Ok(())
        } else {
            self.err_at(&t, format!("expected `{c}`, found {}", t.tok.describe()))
        }
    }

    fn eat_punct(&mut self, c: char) -> bool {
        if self.peek().tok == Tok::Punct(c) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect_ident(&mut self, what: &str) -> IrResult<(String, Token)> {
        let t = self.next();
        match &t.tok {
            Tok::Ident(s) => Ok((s.clone(), t.clone())),
            other => self.err_at(&t, format!("expected {what}, found {}", other.describe())),
        }
    }

    fn expect_eof(&mut self) -> IrResult<()> {
        let t = self.next();
        match t.tok.clone() {
            Tok::Eof => Ok(()),
            other => self.err_at(&t, format!("expected end of input after the graph, found {}", other.describe())),
        }
    }

    fn graph(&mut self) -> IrResult<Graph> {
        let (kw, t) = self.expect_ident("`graph`")?;
        if kw != "graph" {
            return self.err_at(&t, format!("expected `graph`, found `{kw}`"));
        }
        let t = self.next();
        let name = match t.tok.clone() {
            Tok::Global(n) => n,
            other => return self.err_at(&t, format!("expected the graph name `@name`, found {}", other.describe())),
        };
        self.expect_punct('{')?;
        let mut g = Graph::new(name);
        let mut names: HashMap<String, ValueId> = HashMap::new();
        loop {
            let t = self.peek().clone();
            match &t.tok {
                Tok::Value(_) => {
                    let node = self.node(&g, &names)?;
                    if names.contains_key(&node.name) {
                        return self.err_at(&t, format!("value `%{}` is defined twice", node.name));
                    }
                    names.insert(node.name.clone(), ValueId(g.nodes.len()));
                    g.push(node);
                }
                Tok::Ident(k) if k == "return" => {
                    self.next();
                    g.outputs = self.operands(&names)?;
                    if g.outputs.is_empty() {
                        return self.err_at(&t, "`return` needs at least one value");
                    }
                    self.expect_punct('}')?;
                    return Ok(g);
                }
                other => return self.err_at(&t, format!("expected a definition `%name = ...` or `return`, found {}", other.describe())),
            }
        }
    }

    /// Whether the next tokens start a definition (`%name =`) rather than an operand.
    fn at_definition(&self) -> bool {
        matches!(self.peek().tok, Tok::Value(_)) && self.toks.get(self.pos + 1).is_some_and(|t| t.tok == Tok::Punct('='))
    }

    fn operands(&mut self, names: &HashMap<String, ValueId>) -> IrResult<Vec<ValueId>> {
        let mut out = Vec::new();
        // An op without operands (`positions`) may be followed directly by the next definition.
        if !matches!(self.peek().tok, Tok::Value(_)) || self.at_definition() {
            return Ok(out);
        }
        loop {
            let t = self.next();
            match &t.tok {
                Tok::Value(n) => match names.get(n) {
                    Some(v) => out.push(*v),
                    None => return self.err_at(&t, format!("use of undefined value `%{n}`")),
                },
                other => return self.err_at(&t, format!("expected an operand `%name`, found {}", other.describe())),
            }
            if !self.eat_punct(',') {
                return Ok(out);
            }
        }
    }

    fn node(&mut self, _g: &Graph, names: &HashMap<String, ValueId>) -> IrResult<Node> {
        let start = self.next();
        let name = match start.tok.clone() {
            Tok::Value(n) => n,
            other => return self.err_at(&start, format!("expected `%name`, found {}", other.describe())),
        };
        let loc = Loc { line: start.line, col: start.col };
        self.expect_punct('=')?;
        let (kw, kw_tok) = self.expect_ident("an op name")?;
        let mut node = match kw.as_str() {
            "input" => Node::new(name, Op::Input, vec![]),
            "weight" => {
                let t = self.next();
                let wname = match t.tok.clone() {
                    Tok::Str(s) => s,
                    other => return self.err_at(&t, format!("expected the weight's quoted name, found {}", other.describe())),
                };
                let init = if matches!(&self.peek().tok, Tok::Ident(k) if k == "init") {
                    self.next();
                    let (kind, kt) = self.expect_ident("an initializer (normal, uniform, zeros, ones)")?;
                    let args = if self.peek().tok == Tok::Punct('(') { self.paren_args()? } else { AttrArgs::new() };
                    Some(Init::from_args(&kind, &args).or_else(|m| self.err_at(&kt, m))?)
                } else {
                    None
                };
                Node::new(name, Op::Weight { name: wname, init }, vec![])
            }
            "const" => {
                self.expect_punct('[')?;
                let mut values = Vec::new();
                if !self.eat_punct(']') {
                    loop {
                        let t = self.next();
                        match t.tok.clone() {
                            Tok::Float(v) => values.push(v as f32),
                            Tok::Int(v) => values.push(v as f32),
                            other => return self.err_at(&t, format!("expected a number, found {}", other.describe())),
                        }
                        if self.eat_punct(']') {
                            break;
                        }
                        self.expect_punct(',')?;
                    }
                }
                Node::new(name, Op::Constant { values }, vec![])
            }
            _ => {
                let operands = self.operands(names)?;
                let args = if self.peek().tok == Tok::Punct('{') { self.brace_args()? } else { AttrArgs::new() };
                match Op::compute_from_args(&kw, &args) {
                    Ok(Some(op)) => Node::new(name, op, operands),
                    Ok(None) => return self.err_at(&kw_tok, format!("unknown op `{kw}` (expected one of: {})", Op::KEYWORDS.join(", "))),
                    Err(m) => return self.err_at(&kw_tok, m),
                }
            }
        };
        while let Tok::Hash(pk) = self.peek().tok.clone() {
            let t = self.next();
            let args = self.paren_args()?;
            node.patterns.push(Pattern::from_args(&pk, &args).or_else(|m| self.err_at(&t, m))?);
        }
        if self.eat_punct(':') {
            node.ty = Some(self.tensor_type()?);
        } else if node.op.is_leaf() {
            let t = self.peek().clone();
            return self.err_at(&t, format!("`{kw}` needs its type: `: f32[...]`"));
        }
        node.loc = Some(loc);
        Ok(node)
    }

    fn tensor_type(&mut self) -> IrResult<TensorType> {
        let (dt, t) = self.expect_ident("an element type")?;
        let dtype = match DType::from_name(&dt) {
            Some(d) => d,
            None => return self.err_at(&t, format!("unknown element type `{dt}` (expected f32, f16, bf16 or i32)")),
        };
        self.expect_punct('[')?;
        let mut dims = Vec::new();
        if !self.eat_punct(']') {
            loop {
                let t = self.next();
                match &t.tok {
                    Tok::Int(n) if *n > 0 && *n <= u32::MAX as i128 => dims.push(Dim::Fixed(*n as u64)),
                    Tok::Ident(s) if s == "seq" => dims.push(Dim::Seq),
                    other => return self.err_at(&t, format!("expected a positive extent or `seq`, found {}", other.describe())),
                }
                if self.eat_punct(']') {
                    break;
                }
                self.expect_punct(',')?;
            }
        }
        Ok(TensorType { dtype, dims })
    }

    fn value(&mut self) -> IrResult<AttrValue> {
        let t = self.next();
        Ok(match t.tok.clone() {
            Tok::Int(v) => AttrValue::Int(v),
            Tok::Float(v) => AttrValue::Float(v),
            Tok::Str(s) => AttrValue::Str(s),
            Tok::Ident(w) if w == "true" => AttrValue::Bool(true),
            Tok::Ident(w) if w == "false" => AttrValue::Bool(false),
            Tok::Ident(w) => AttrValue::Word(w),
            other => return self.err_at(&t, format!("expected a value, found {}", other.describe())),
        })
    }

    /// `word, word, key = value, ...` up to `close`.
    fn args_until(&mut self, close: char) -> IrResult<AttrArgs> {
        let mut args = AttrArgs::new();
        if self.eat_punct(close) {
            return Ok(args);
        }
        loop {
            let (word, t) = self.expect_ident("an attribute name")?;
            if self.eat_punct('=') {
                if args.keyed.iter().any(|(k, _)| *k == word) {
                    return self.err_at(&t, format!("attribute `{word}` given twice"));
                }
                let v = self.value()?;
                args.keyed.push((word, v));
            } else if args.keyed.is_empty() {
                args.positional.push(word);
            } else {
                return self.err_at(&t, format!("expected `{word} = value`"));
            }
            if self.eat_punct(close) {
                return Ok(args);
            }
            self.expect_punct(',')?;
        }
    }

    fn paren_args(&mut self) -> IrResult<AttrArgs> {
        self.expect_punct('(')?;
        self.args_until(')')
    }

    fn brace_args(&mut self) -> IrResult<AttrArgs> {
        self.expect_punct('{')?;
        self.args_until('}')
    }
}

impl std::str::FromStr for Graph {
    type Err = IrError;
    fn from_str(s: &str) -> IrResult<Graph> {
        parse_graph(s)
    }
}
