//! The Llama family (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or
//! untied embeddings) as a sparsec graph. Weights are named by role:
//! `embed`, `layers.N.attn_norm`, `layers.N.attn.{q,k,v,o}`, `layers.N.mlp_norm`,
//! `layers.N.mlp.{gate,up,down}`, `final_norm`, `lm_head` (all `[out, in]`).

use crate::builder::GraphBuilder;
use sparsec_ir::{DType, Dim, Graph, Op};

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab: u64,
    pub dim: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ffn: u64,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// The LM head is the embedding table.
    pub tied: bool,
    /// RoPE over adjacent pairs (GGUF's permuted Q/K) instead of `rotate_half`.
    pub rope_adjacent: bool,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> u64 {
        self.dim / self.heads
    }

    /// Every weight role with its `[out, in]` (or `[n]`) shape.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<u64>)> {
        let kvw = self.kv_heads * self.head_dim();
        let mut v = vec![("embed".to_string(), vec![self.vocab, self.dim])];
        for i in 0..self.layers {
            let l = |r: &str| format!("layers.{i}.{r}");
            v.push((l("attn_norm"), vec![self.dim]));
            v.push((l("attn.q"), vec![self.dim, self.dim]));
            v.push((l("attn.k"), vec![kvw, self.dim]));
            v.push((l("attn.v"), vec![kvw, self.dim]));
            v.push((l("attn.o"), vec![self.dim, self.dim]));
            v.push((l("mlp_norm"), vec![self.dim]));
            v.push((l("mlp.gate"), vec![self.ffn, self.dim]));
            v.push((l("mlp.up"), vec![self.ffn, self.dim]));
            v.push((l("mlp.down"), vec![self.dim, self.ffn]));
        }
        v.push(("final_norm".into(), vec![self.dim]));
        if !self.tied {
            v.push(("lm_head".into(), vec![self.vocab, self.dim]));
        }
        v
    }

    /// The whole model over `ids[seq]`, returning `logits[seq, vocab]`.
    pub fn build_graph(&self, name: &str) -> Graph {
        let shapes: std::collections::HashMap<String, Vec<u64>> = self.weight_shapes().into_iter().collect();
        let mut b = GraphBuilder::new(name);
        let w = |b: &mut GraphBuilder, role: &str| b.weight(role, &shapes[role]);
        let ids = b.input("ids", DType::I32, &[Dim::Seq]);
        let embed = w(&mut b, "embed");
        let mut x = b.op("x.embed", Op::Embedding, &[embed, ids]);
        let (heads, kv_heads) = (self.heads as u32, self.kv_heads as u32);
        for i in 0..self.layers {
            let p = |s: &str| format!("l{i}.{s}");
            let role = |s: &str| format!("layers.{i}.{s}");
            let g = w(&mut b, &role("attn_norm"));
            let h = b.op(&p("attn_in"), Op::RmsNorm { eps: self.rms_eps }, &[x, g]);
            let proj = |b: &mut GraphBuilder, r: &str, input| {
                let wt = w(b, &role(&format!("attn.{r}")));
                b.linear(&p(r), input, wt)
            };
            let q = proj(&mut b, "q", h);
            let k = proj(&mut b, "k", h);
            let v = proj(&mut b, "v", h);
            let rope = |heads| Op::Rope { heads, theta: self.rope_theta, adjacent: self.rope_adjacent };
            let qr = b.op(&p("q.rope"), rope(heads), &[q]);
            let kr = b.op(&p("k.rope"), rope(kv_heads), &[k]);
            let att = b.op(&p("attn"), Op::Attention { heads, kv_heads }, &[qr, kr, v]);
            let wo = w(&mut b, &role("attn.o"));
            let o = b.linear(&p("o"), att, wo);
            x = b.op(&p("resid.attn"), Op::Add, &[x, o]);
            let g2 = w(&mut b, &role("mlp_norm"));
            let h2 = b.op(&p("mlp_in"), Op::RmsNorm { eps: self.rms_eps }, &[x, g2]);
            let wg = w(&mut b, &role("mlp.gate"));
            let wu = w(&mut b, &role("mlp.up"));
            let wd = w(&mut b, &role("mlp.down"));
            let gate = b.linear(&p("gate"), h2, wg);
            let up = b.linear(&p("up"), h2, wu);
            let act = b.op(&p("gate.silu"), Op::Silu, &[gate]);
            let m = b.op(&p("swiglu"), Op::Mul, &[act, up]);
            let down = b.linear(&p("down"), m, wd);
            x = b.op(&p("resid.mlp"), Op::Add, &[x, down]);
        }
        let gf = w(&mut b, "final_norm");
        let xf = b.op("x.final", Op::RmsNorm { eps: self.rms_eps }, &[x, gf]);
        let head = if self.tied { embed } else { w(&mut b, "lm_head") };
        let logits = b.linear("logits", xf, head);
        b.finish(&[logits])
    }
}
