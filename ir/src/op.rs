//! The closed set of tensor ops. Adding one is the checklist in `docs/add-an-op.md`:
//! every `match` on `Op` (shape inference, reference semantics, lowering) must
//! then be extended, and the compiler points at each.

use crate::attr::{AttrArgs, AttrValue};

/// How a weight without checkpoint data is initialized (for IR files and tests).
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Normal(0, std²), from a seeded ChaCha8 stream.
    Normal {
        seed: u64,
        std: f32,
    },
    /// Uniform(-bound, bound), from a seeded ChaCha8 stream.
    Uniform {
        seed: u64,
        bound: f32,
    },
    Zeros,
    Ones,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluApprox {
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), GPT-2's `gelu_new`.
    Tanh,
    /// 0.5·x·(1 + erf(x/√2)).
    Erf,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input.
    Input,
    /// A named weight, data from the checkpoint or from `init`.
    Weight {
        name: String,
        init: Option<Init>,
    },
    /// Literal data, row-major.
    Constant {
        values: Vec<f32>,
    },
    /// `a[.., K] × b[K, N]` (or `b[N, K]` with `transpose_b`) over the leading dims of `a`.
    MatMul {
        transpose_b: bool,
    },
    /// Elementwise with trailing broadcast (`b`'s shape a suffix of `a`'s, or equal).
    Add,
    Mul,
    Gelu {
        approx: GeluApprox,
    },
    Silu,
    /// Over the last axis; operands `x, gamma, beta`.
    LayerNorm {
        eps: f32,
    },
    /// Over the last axis; operands `x, gamma`.
    RmsNorm {
        eps: f32,
    },
    /// Over the last axis.
    Softmax,
    /// Causal multi-head attention; `q[seq, heads·d]`, `k, v[seq, kv_heads·d]`;
    /// under a gated `#nsa`, also its gate and compression (`NativeSparse`).
    Attention {
        heads: u32,
        kv_heads: u32,
    },
    /// Rows of `table[V, D]` picked by `ids[seq]` (i32 token or position ids).
    Embedding,
    /// Rotary position embedding of `x[seq, heads·d]` at positions 0..seq, base
    /// `theta`; `adjacent` rotates pairs (2i, 2i+1) (GGUF/llama.cpp layout), else
    /// pairs (i, i+d/2) (Hugging Face `rotate_half`).
    Rope {
        heads: u32,
        theta: f32,
        adjacent: bool,
    },
    /// The positions `0..seq` as i32.
    Positions,
}

/// Operand count: exact, or a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arity {
    pub min: usize,
    pub max: usize,
}

impl Op {
    /// Every op keyword, for error messages and tests.
    pub const KEYWORDS: [&'static str; 15] = [
        "input",
        "weight",
        "const",
        "matmul",
        "add",
        "mul",
        "gelu",
        "silu",
        "layer_norm",
        "rms_norm",
        "softmax",
        "attention",
        "embedding",
        "rope",
        "positions",
    ];

    pub fn keyword(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Weight { .. } => "weight",
            Op::Constant { .. } => "const",
            Op::MatMul { .. } => "matmul",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Gelu { .. } => "gelu",
            Op::Silu => "silu",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Softmax => "softmax",
            Op::Attention { .. } => "attention",
            Op::Embedding => "embedding",
            Op::Rope { .. } => "rope",
            Op::Positions => "positions",
        }
    }

    pub fn arity(&self) -> Arity {
        let n = match self {
            Op::Input | Op::Weight { .. } | Op::Constant { .. } | Op::Positions => 0,
            Op::Gelu { .. } | Op::Silu | Op::Softmax | Op::Rope { .. } => 1,
            Op::MatMul { .. } | Op::Add | Op::Mul | Op::RmsNorm { .. } | Op::Embedding => 2,
            Op::LayerNorm { .. } | Op::Attention { .. } => 3,
        };
        // A gated `#nsa` attention takes its gate and compression as well
        // (the verifier checks the count against the pattern).
        let max = if matches!(self, Op::Attention { .. }) { 5 } else { n };
        Arity { min: n, max }
    }

    /// Leaves carry data or come from outside; they are not kernels.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input | Op::Weight { .. } | Op::Constant { .. })
    }

    /// The `{...}` attributes of compute ops, canonical order. Leaves have their own syntax.
    pub fn attr_args(&self) -> AttrArgs {
        let a = AttrArgs::new();
        match self {
            Op::Input | Op::Weight { .. } | Op::Constant { .. } => a,
            Op::MatMul { transpose_b } => {
                if *transpose_b {
                    a.kv("transpose_b", AttrValue::Bool(true))
                } else {
                    a
                }
            }
            Op::Add | Op::Mul | Op::Silu | Op::Softmax | Op::Embedding | Op::Positions => a,
            Op::Rope { heads, theta, adjacent } => a
                .kv("heads", AttrValue::Int(*heads as i128))
                .kv("theta", AttrValue::Float(*theta as f64))
                .kv("adjacent", AttrValue::Bool(*adjacent)),
            Op::Gelu { approx } => a.kv(
                "approx",
                AttrValue::Word(match approx {
                    GeluApprox::Tanh => "tanh".into(),
                    GeluApprox::Erf => "erf".into(),
                }),
            ),
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => a.kv("eps", AttrValue::Float(*eps as f64)),
            Op::Attention { heads, kv_heads } => {
                a.kv("heads", AttrValue::Int(*heads as i128)).kv("kv_heads", AttrValue::Int(*kv_heads as i128))
            }
        }
    }

    /// Builds a compute op from its keyword and `{...}` attributes.
    /// Returns `Ok(None)` when the keyword is not a compute op.
    pub fn compute_from_args(keyword: &str, args: &AttrArgs) -> Result<Option<Op>, String> {
        let mut r = args.reader(keyword);
        let op = match keyword {
            "matmul" => Op::MatMul { transpose_b: r.opt_bool("transpose_b")?.unwrap_or(false) },
            "add" => Op::Add,
            "mul" => Op::Mul,
            "gelu" => Op::Gelu {
                approx: match r.opt_word("approx")? {
                    None | Some("tanh") => GeluApprox::Tanh,
                    Some("erf") => GeluApprox::Erf,
                    Some(o) => return Err(format!("gelu: unknown approx `{o}` (expected tanh or erf)")),
                },
            },
            "silu" => Op::Silu,
            "layer_norm" => Op::LayerNorm { eps: r.opt_f32("eps")?.unwrap_or(1e-5) },
            "rms_norm" => Op::RmsNorm { eps: r.opt_f32("eps")?.unwrap_or(1e-6) },
            "softmax" => Op::Softmax,
            "attention" => Op::Attention { heads: r.u32("heads")?, kv_heads: r.u32("kv_heads")? },
            "embedding" => Op::Embedding,
            "positions" => Op::Positions,
            "rope" => Op::Rope { heads: r.u32("heads")?, theta: r.f32("theta")?, adjacent: r.opt_bool("adjacent")?.unwrap_or(false) },
            _ => return Ok(None),
        };
        r.finish()?;
        Ok(Some(op))
    }
}

impl Init {
    pub fn to_args(&self) -> (String, AttrArgs) {
        let a = AttrArgs::new();
        match self {
            Init::Normal { seed, std } => {
                ("normal".into(), a.kv("seed", AttrValue::Int(*seed as i128)).kv("std", AttrValue::Float(*std as f64)))
            }
            Init::Uniform { seed, bound } => {
                ("uniform".into(), a.kv("seed", AttrValue::Int(*seed as i128)).kv("bound", AttrValue::Float(*bound as f64)))
            }
            Init::Zeros => ("zeros".into(), a),
            Init::Ones => ("ones".into(), a),
        }
    }

    pub fn from_args(kind: &str, args: &AttrArgs) -> Result<Init, String> {
        let what = format!("init {kind}");
        let mut r = args.reader(&what);
        let init = match kind {
            "normal" => Init::Normal { seed: r.u64("seed")?, std: r.f32("std")? },
            "uniform" => Init::Uniform { seed: r.u64("seed")?, bound: r.f32("bound")? },
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            other => return Err(format!("unknown init `{other}` (expected normal, uniform, zeros or ones)")),
        };
        r.finish()?;
        Ok(init)
    }

    /// Materializes `n` values.
    pub fn generate(&self, n: usize) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        match self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Uniform { seed, bound } => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*seed);
                (0..n).map(|_| rng.gen_range(-*bound..=*bound)).collect()
            }
            Init::Normal { seed, std } => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*seed);
                // Box-Muller; deterministic for a seed on every platform.
                let mut out = Vec::with_capacity(n + 1);
                while out.len() < n {
                    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                    let u2: f64 = rng.gen();
                    let r = (-2.0 * u1.ln()).sqrt();
                    let t = 2.0 * std::f64::consts::PI * u2;
                    out.push((r * t.cos()) as f32 * std);
                    out.push((r * t.sin()) as f32 * std);
                }
                out.truncate(n);
                out
            }
        }
    }
}
