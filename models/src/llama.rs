//! The Llama family (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or
//! untied embeddings) as a sparsec graph. Weights are named by role:
//! `embed`, `layers.N.attn_norm`, `layers.N.attn.{q,k,v,o}`, `layers.N.mlp_norm`,
//! `layers.N.mlp.{gate,up,down}`, `final_norm`, `lm_head` (all `[out, in]`).

use crate::builder::GraphBuilder;
use crate::{check_param_bytes, check_size, ConfigIssue, MAX_EXACT_ID, MAX_LAYERS};
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
    /// The context length it was trained for (`max_position_embeddings`,
    /// `llama.context_length`): generation and evaluation stay within it.
    pub context: u64,
}

/// How a checkpoint spells each hyperparameter, so that errors name the field
/// the user can find in their file.
#[derive(Clone, Copy, Debug)]
pub struct LlamaKeys {
    pub vocab: &'static str,
    pub dim: &'static str,
    pub layers: &'static str,
    pub heads: &'static str,
    pub kv_heads: &'static str,
    pub ffn: &'static str,
    pub context: &'static str,
    pub rope_theta: &'static str,
    pub rms_eps: &'static str,
}

/// `config.json` of a Hugging Face Llama.
pub const HF_KEYS: LlamaKeys = LlamaKeys {
    vocab: "vocab_size",
    dim: "hidden_size",
    layers: "num_hidden_layers",
    heads: "num_attention_heads",
    kv_heads: "num_key_value_heads",
    ffn: "intermediate_size",
    context: "max_position_embeddings",
    rope_theta: "rope_theta",
    rms_eps: "rms_norm_eps",
};

/// GGUF metadata of `general.architecture = llama` (the vocabulary is the rows of the embedding).
pub const GGUF_KEYS: LlamaKeys = LlamaKeys {
    vocab: "token_embd.weight",
    dim: "llama.embedding_length",
    layers: "llama.block_count",
    heads: "llama.attention.head_count",
    kv_heads: "llama.attention.head_count_kv",
    ffn: "llama.feed_forward_length",
    context: "llama.context_length",
    rope_theta: "llama.rope.freq_base",
    rms_eps: "llama.attention.layer_norm_rms_epsilon",
};

impl LlamaConfig {
    /// Checks that the graph can be built: every size positive, heads that
    /// divide the width and are divided by the KV heads, an even head width
    /// (RoPE rotates pairs), and weights whose sizes fit memory arithmetic.
    /// Run before `weight_shapes` or `build_graph` on untrusted values.
    pub fn validate(&self, k: &LlamaKeys) -> Result<(), ConfigIssue> {
        check_size(k.vocab, self.vocab, MAX_EXACT_ID, "token ids travel as f32, exact below 2^24")?;
        check_size(k.dim, self.dim, u64::MAX, "")?;
        check_size(k.layers, self.layers, MAX_LAYERS, "no real model has that many; the config is corrupt")?;
        check_size(k.heads, self.heads, u32::MAX as u64, "the IR counts heads in 32 bits")?;
        check_size(k.kv_heads, self.kv_heads, u32::MAX as u64, "the IR counts heads in 32 bits")?;
        check_size(k.ffn, self.ffn, u64::MAX, "")?;
        check_size(k.context, self.context, u64::MAX, "")?;
        if !self.dim.is_multiple_of(self.heads) {
            return Err(ConfigIssue::new(k.dim, format!("is {}, not divisible by `{}` = {}", self.dim, k.heads, self.heads)));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(ConfigIssue::new(
                k.kv_heads,
                format!(
                    "is {}, which does not divide `{}` = {} (each KV head serves a whole group of query heads)",
                    self.kv_heads, k.heads, self.heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigIssue::new(
                k.dim,
                format!(
                    "is {}: with `{}` = {} each head is {} wide, odd, and RoPE rotates pairs of features",
                    self.dim,
                    k.heads,
                    self.heads,
                    self.head_dim()
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ConfigIssue::new(k.rope_theta, format!("is {}; it must be a positive number", self.rope_theta)));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(ConfigIssue::new(k.rms_eps, format!("is {}; it must be a non-negative number", self.rms_eps)));
        }
        // Per layer 2·dim² + 2·kvw·dim + 3·ffn·dim + 2·dim ≤ 4·(dim + kvw + ffn + 1)·dim,
        // kvw ≤ dim since kv_heads divides heads; the embedding (and an untied head) besides.
        let kvw = self.kv_heads * self.head_dim();
        let width = self.dim.checked_add(kvw).and_then(|w| w.checked_add(self.ffn)).and_then(|w| w.checked_add(1));
        let width = width.ok_or_else(|| ConfigIssue::new(k.ffn, format!("is {}, too large", self.ffn)))?;
        let tables = if self.tied { 1 } else { 2 };
        check_param_bytes(&[
            (k.dim, &[4, self.dim, self.dim]),
            (k.ffn, &[4, self.ffn, self.dim]),
            (k.vocab, &[tables, self.vocab, self.dim]),
            (k.layers, &[self.layers, 4, width, self.dim]),
        ])?;
        Ok(())
    }

    pub fn head_dim(&self) -> u64 {
        self.dim.checked_div(self.heads).unwrap_or(0)
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
