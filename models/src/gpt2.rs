//! The GPT-2 family (learned positions, LayerNorm, GELU-tanh, fused QKV split
//! into roles at load time, tied LM head) as a sparsec graph. Weights are named by
//! role and stored `[out, in]`: `embed`, `pos_embed`, `layers.N.attn_norm(.bias)`,
//! `layers.N.attn.{q,k,v,o}(.bias)`, `layers.N.mlp_norm(.bias)`,
//! `layers.N.mlp.{up,down}(.bias)`, `final_norm(.bias)`.

use crate::builder::GraphBuilder;
use crate::{check_param_bytes, check_size, ConfigIssue, MAX_EXACT_ID, MAX_LAYERS};
use sparsec_ir::{DType, Dim, GeluApprox, Graph, Op, ValueId};

#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    pub vocab: u64,
    pub positions: u64,
    pub dim: u64,
    pub layers: u64,
    pub heads: u64,
    pub eps: f32,
}

impl Gpt2Config {
    /// Checks, under the names of a Hugging Face `config.json`, that the graph
    /// can be built: every size positive, `n_embd` divisible by `n_head`, id
    /// and position tables within exact f32 integers, weights whose sizes fit
    /// memory arithmetic. Run before `weight_shapes` or `build_graph` on
    /// untrusted values.
    pub fn validate(&self) -> Result<(), ConfigIssue> {
        check_size("vocab_size", self.vocab, MAX_EXACT_ID, "token ids travel as f32, exact below 2^24")?;
        check_size("n_positions", self.positions, MAX_EXACT_ID, "positions travel as f32, exact below 2^24")?;
        check_size("n_embd", self.dim, u64::MAX, "")?;
        check_size("n_layer", self.layers, MAX_LAYERS, "no real model has that many; the config is corrupt")?;
        check_size("n_head", self.heads, u32::MAX as u64, "the IR counts heads in 32 bits")?;
        if !self.dim.is_multiple_of(self.heads) {
            return Err(ConfigIssue::new("n_embd", format!("is {}, not divisible by `n_head` = {}", self.dim, self.heads)));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(ConfigIssue::new("layer_norm_epsilon", format!("is {}; it must be a non-negative number", self.eps)));
        }
        // Per layer 12·dim² + 13·dim ≤ 16·dim·(dim + 1); the token and position tables besides.
        check_param_bytes(&[
            ("n_embd", &[16, self.dim, self.dim]),
            ("vocab_size", &[self.vocab, self.dim]),
            ("n_positions", &[self.positions, self.dim]),
            ("n_layer", &[self.layers, 16, self.dim, self.dim.saturating_add(1)]),
        ])?;
        Ok(())
    }

    pub fn weight_shapes(&self) -> Vec<(String, Vec<u64>)> {
        let d = self.dim;
        let mut v = vec![("embed".to_string(), vec![self.vocab, d]), ("pos_embed".to_string(), vec![self.positions, d])];
        for i in 0..self.layers {
            let l = |r: &str| format!("layers.{i}.{r}");
            for n in ["attn_norm", "mlp_norm"] {
                v.push((l(n), vec![d]));
                v.push((l(&format!("{n}.bias")), vec![d]));
            }
            for p in ["q", "k", "v", "o"] {
                v.push((l(&format!("attn.{p}")), vec![d, d]));
                v.push((l(&format!("attn.{p}.bias")), vec![d]));
            }
            v.push((l("mlp.up"), vec![4 * d, d]));
            v.push((l("mlp.up.bias"), vec![4 * d]));
            v.push((l("mlp.down"), vec![d, 4 * d]));
            v.push((l("mlp.down.bias"), vec![d]));
        }
        v.push(("final_norm".into(), vec![d]));
        v.push(("final_norm.bias".into(), vec![d]));
        v
    }

    pub fn build_graph(&self, name: &str) -> Graph {
        let shapes: std::collections::HashMap<String, Vec<u64>> = self.weight_shapes().into_iter().collect();
        let mut b = GraphBuilder::new(name);
        let w = |b: &mut GraphBuilder, role: &str| b.weight(role, &shapes[role]);
        let ids = b.input("ids", DType::I32, &[Dim::Seq]);
        let pos = b.op("pos", Op::Positions, &[]);
        let embed = w(&mut b, "embed");
        let pos_embed = w(&mut b, "pos_embed");
        let te = b.op("x.tok", Op::Embedding, &[embed, ids]);
        let pe = b.op("x.pos", Op::Embedding, &[pos_embed, pos]);
        let mut x = b.op("x.embed", Op::Add, &[te, pe]);
        let norm = |b: &mut GraphBuilder, name: &str, role: &str, x: ValueId| {
            let g = w(b, role);
            let beta = w(b, &format!("{role}.bias"));
            b.op(name, Op::LayerNorm { eps: self.eps }, &[x, g, beta])
        };
        let affine = |b: &mut GraphBuilder, name: &str, role: &str, x: ValueId| {
            let wt = w(b, role);
            let bias = w(b, &format!("{role}.bias"));
            let y = b.linear(&format!("{name}.mm"), x, wt);
            b.op(name, Op::Add, &[y, bias])
        };
        let heads = self.heads as u32;
        for i in 0..self.layers {
            let p = |s: &str| format!("l{i}.{s}");
            let role = |s: &str| format!("layers.{i}.{s}");
            let h = norm(&mut b, &p("attn_in"), &role("attn_norm"), x);
            let q = affine(&mut b, &p("q"), &role("attn.q"), h);
            let k = affine(&mut b, &p("k"), &role("attn.k"), h);
            let v = affine(&mut b, &p("v"), &role("attn.v"), h);
            let att = b.op(&p("attn"), Op::Attention { heads, kv_heads: heads }, &[q, k, v]);
            let o = affine(&mut b, &p("o"), &role("attn.o"), att);
            x = b.op(&p("resid.attn"), Op::Add, &[x, o]);
            let h2 = norm(&mut b, &p("mlp_in"), &role("mlp_norm"), x);
            let up = affine(&mut b, &p("up"), &role("mlp.up"), h2);
            let act = b.op(&p("up.gelu"), Op::Gelu { approx: GeluApprox::Tanh }, &[up]);
            let down = affine(&mut b, &p("down"), &role("mlp.down"), act);
            x = b.op(&p("resid.mlp"), Op::Add, &[x, down]);
        }
        let xf = norm(&mut b, "x.final", "final_norm", x);
        let logits = b.linear("logits", xf, embed);
        b.finish(&[logits])
    }
}
