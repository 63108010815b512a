//! The plan file (TOML, DESIGN.md's shape): rules that select tensors by layer
//! and role, or attention layers, and say which pattern each gets; presets name
//! seed plans. Parsing checks everything that needs no model (ranges, N ≤ M,
//! known keys); `apply-plan` checks the rest against the graph.

use serde::Deserialize;
use sparsec_ir::kv_sequence::{SeqBasis, SeqParams};
use sparsec_ir::{NativeSparse, NsaCompress, NsaGate, NsaScore, Sparsity, Specialize, ValueCoding};

/// A parsed plan: its rules in order (later rules override earlier ones).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub rules: Vec<Rule>,
    /// The calibration text and token count of calibrated methods (`[calibration]`).
    pub calibration: Calibration,
}

/// How a sparsity pattern chooses what to prune.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PruneMethod {
    /// Smallest |w| (no calibration).
    #[default]
    Magnitude,
    /// |w|·‖x‖ per output row (Wanda), from calibration input norms.
    Wanda,
    /// Optimal-brain-surgeon updates with the calibration Hessian (SparseGPT).
    SparseGpt,
}

impl PruneMethod {
    pub fn name(self) -> &'static str {
        match self {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::Wanda => "wanda",
            PruneMethod::SparseGpt => "sparsegpt",
        }
    }

    fn from_name(s: &str) -> Option<PruneMethod> {
        [PruneMethod::Magnitude, PruneMethod::Wanda, PruneMethod::SparseGpt].into_iter().find(|m| m.name() == s)
    }

    /// Whether the method needs calibration statistics.
    pub fn calibrated(self) -> bool {
        self != PruneMethod::Magnitude
    }
}

/// What calibrated methods run the model over: never the evaluation text.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Files concatenated (`text = "FILE"` or a list).
    pub texts: Vec<std::path::PathBuf>,
    /// Tokens taken from their start.
    pub tokens: usize,
    /// Prune while calibrating: each weight's statistics come from the model
    /// with every earlier weight already pruned (as the SparseGPT and Wanda
    /// papers run, block after block), rather than from the dense model.
    pub sequential: bool,
    /// Outlier-weighted layerwise sparsity (OWL) for calibrated unstructured
    /// rules: each layer's ratio moves within ±`lambda` of the rule's, more
    /// outliers (Wanda scores above `threshold` × their layer's mean) giving
    /// fewer zeros, the mean over layers unchanged.
    pub owl: Option<Owl>,
    /// SparseGPT's dampening: this fraction of the mean diagonal of XᵀX is
    /// added to its diagonal before the inverse (the paper's 0.01).
    pub damp: f64,
    /// The first `skip` positions of every calibration sequence are left out
    /// of the statistics (XᵀX and the input norms): the attention-sink
    /// position carries activations orders of magnitude larger than the rest,
    /// which otherwise decide what the rest keeps. 0 keeps every row. (On
    /// SmolLM2 it helps Wanda and ruins SparseGPT, whose updates then leave
    /// the sink's outputs unconstrained: README.)
    pub skip: usize,
}

/// `[calibration] owl = { lambda = 0.08, threshold = 5.0 }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Owl {
    pub lambda: f32,
    pub threshold: f32,
}

/// SparseGPT's default dampening (the paper's `percdamp`).
pub const DEFAULT_DAMP: f64 = sparsec_ir::sparse_calibrated::SPARSEGPT_DAMP;

/// The default calibration corpus: licence texts every Debian machine has, other
/// than GPL-3 (what sparsec evaluates on).
pub const DEFAULT_CALIBRATION_TEXTS: [&str; 3] =
    ["/usr/share/common-licenses/GPL-2", "/usr/share/common-licenses/LGPL-2.1", "/usr/share/common-licenses/Artistic"];

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            texts: DEFAULT_CALIBRATION_TEXTS.iter().map(Into::into).collect(),
            tokens: 8192,
            sequential: false,
            owl: None,
            damp: DEFAULT_DAMP,
            skip: 0,
        }
    }
}

/// How a factored weight's factors are fitted (`src/factor.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorMethod {
    /// Truncated SVD of the weight (no calibration).
    Svd,
    /// SVD of the weight whitened by the Cholesky factor of its calibration
    /// input Gram `XᵀX` (SVD-LLM): minimizes the output error on that data.
    Whitened,
}

impl FactorMethod {
    pub fn name(self) -> &'static str {
        match self {
            FactorMethod::Svd => "svd",
            FactorMethod::Whitened => "whitened",
        }
    }

    fn from_name(s: &str) -> Option<FactorMethod> {
        [FactorMethod::Svd, FactorMethod::Whitened].into_iter().find(|m| m.name() == s)
    }
}

/// How many parameters a factorization keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FactorSize {
    /// The fraction of the parameters removed, in (0, 1).
    Ratio(f32),
    /// A fixed rank.
    Rank(u32),
}

/// `low_rank = { ratio | rank, method }` (`group: None`) or `share = { group,
/// ratio, method }`: a weight replaced by two factors, the input-side one
/// shared by `group` consecutive selected layers of one role.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FactorPlan {
    pub size: FactorSize,
    pub method: FactorMethod,
    /// Layers per shared basis; `None` for a private factorization.
    pub group: Option<u32>,
}

impl FactorPlan {
    /// The plan key that spells it.
    pub fn key(&self) -> &'static str {
        if self.group.is_some() {
            "share"
        } else {
            "low_rank"
        }
    }

    /// The rank that removes `ratio` of the parameters of `members` matrices of
    /// `n` outputs and `k` inputs sharing one input-side basis (`members = 1`:
    /// a private factorization): `floor((1 - ratio)·m·n·k / (k + m·n))`, at
    /// least 1 and at most `min(k, m·n)`.
    pub fn rank_for_ratio(ratio: f32, members: u64, n: u64, k: u64) -> u32 {
        let keep = (1.0 - ratio as f64) * (members * n * k) as f64 / (k + members * n) as f64;
        (keep.floor() as u64).clamp(1, k.min(members * n).max(1)) as u32
    }
}

/// Which layers a rule selects.
#[derive(Clone, Debug, PartialEq)]
pub enum Layers {
    All,
    /// Half-open `start..end`; `end` open-ended when `None`.
    Range {
        start: u64,
        end: Option<u64>,
    },
    List(Vec<u64>),
}

impl Layers {
    pub fn contains(&self, l: u64) -> bool {
        match self {
            Layers::All => true,
            Layers::Range { start, end } => l >= *start && end.is_none_or(|e| l < e),
            Layers::List(v) => v.contains(&l),
        }
    }

    /// The largest layer named explicitly (to check it exists).
    pub fn max_named(&self) -> Option<u64> {
        match self {
            Layers::All | Layers::Range { end: None, .. } => None,
            Layers::Range { start, end: Some(e) } => Some((*e).max(start + 1) - 1),
            Layers::List(v) => v.iter().copied().max(),
        }
    }
}

/// An attention window request.
#[derive(Clone, Debug, PartialEq)]
pub enum WindowPlan {
    Full,
    Fixed {
        size: u32,
        sinks: u32,
    },
    /// From `start` at the first selected layer to `end` at the last, geometrically.
    Progressive {
        start: u32,
        end: u32,
        sinks: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// 1-based, for messages.
    pub index: usize,
    pub layers: Layers,
    /// Role globs (`mlp.*`, `attn.q`, `lm_head`, `*`).
    pub targets: Vec<String>,
    pub sparsity: Option<Sparsity>,
    /// How `sparsity` chooses what to prune.
    pub method: PruneMethod,
    /// How `sparsity` stores the kept values (`values = "q4"`; f32 when not given).
    pub values: ValueCoding,
    pub specialize: Option<Specialize>,
    pub window: Option<WindowPlan>,
    /// `attention = { nsa = { ... } }`: native sparse attention on the selected layers.
    pub nsa: Option<NativeSparse>,
    /// Where a gated `nsa`'s gate (and compression) come from.
    pub nsa_gate: NsaGatePlan,
    /// `kv = { transform = ... }`: K and V cached in a feature-axis basis.
    pub kv: Option<KvPlan>,
    /// `kv = { transform = "chunked_svd", chunk, rank | energy (, max_rank) }`:
    /// the caches factored per chunk of positions (`#kv(chunked_svd)`).
    pub kv_chunks: Option<(u32, sparsec_ir::SvdRank)>,
    /// `kv = { transform = "dct", axis = "sequence", keep, block, sinks, recent }`:
    /// older blocks of positions read low-pass (`#kv(dct | pswf, axis = sequence)`).
    pub kv_sequence: Option<SeqParams>,
    /// `sparsity = { kind = "from-weights" }`: each selected weight keeps the
    /// zeros it has, as the pattern they form (`sparsity` is `None`);
    /// `resolve_from_weights` turns the rule into concrete ones, and
    /// `apply-plan` refuses it unresolved.
    pub from_weights: bool,
    /// `low_rank` or `share`: the selected weights are factored.
    pub factor: Option<FactorPlan>,
}

impl Rule {
    /// Whether the rule selects the weight of `role` in `layer` (`None`: a
    /// weight outside the layers, selected by `layers = "all"` only).
    pub fn selects(&self, layer: Option<u64>, role: &str) -> bool {
        let layer_ok = match layer {
            Some(l) => self.layers.contains(l),
            None => self.layers == Layers::All,
        };
        layer_ok && self.targets.iter().any(|t| glob(t, role))
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("plan: {0}")]
    Toml(String),
    #[error("plan rule {rule}: {message}")]
    Rule { rule: usize, message: String },
    #[error("unknown preset `{0}` (known: {1})")]
    UnknownPreset(String, String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    rule: Vec<RuleFile>,
    calibration: Option<CalibrationFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrationFile {
    text: Option<TextFiles>,
    tokens: Option<usize>,
    sequential: Option<bool>,
    owl: Option<OwlFile>,
    damp: Option<f64>,
    skip: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwlFile {
    lambda: Option<f32>,
    threshold: Option<f32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextFiles {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    layers: Option<String>,
    target: Option<String>,
    sparsity: Option<SparsityFile>,
    specialize: Option<String>,
    attention: Option<AttentionFile>,
    kv: Option<KvFile>,
    low_rank: Option<LowRankFile>,
    share: Option<ShareFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LowRankFile {
    ratio: Option<f32>,
    rank: Option<u32>,
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareFile {
    group: u32,
    ratio: f32,
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum SparsityFile {
    Unstructured { ratio: f32, method: Option<String>, values: Option<String> },
    Nm { n: u32, m: u32, method: Option<String>, values: Option<String> },
    Block { ratio: f32, block: [u32; 2], method: Option<String>, values: Option<String> },
    // `from-weights`: keep the zeros the checkpoint already has; resolved per
    // weight against its data (`resolve_from_weights`) before the plan is applied.
    FromWeights {},
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttentionFile {
    window: Option<WindowFile>,
    nsa: Option<NsaFile>,
}

/// `kv = { transform = "dct" | "pswf" | "pca", keep = 0.5, on = "k,v", bandwidth = 0.25 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvFile {
    transform: String,
    keep: Option<f32>,
    on: Option<String>,
    bandwidth: Option<f32>,
    axis: Option<String>,
    block: Option<u32>,
    chunk: Option<u32>,
    rank: Option<u32>,
    energy: Option<f32>,
    max_rank: Option<u32>,
    sinks: Option<u32>,
    recent: Option<u32>,
    rope: Option<String>,
    fit: Option<String>,
    alpha: Option<f32>,
}

/// A feature-axis basis for K and V (`kv = { ... }`): per head, K and V are
/// cached as their first `keep·d` coefficients in the basis; queries are
/// projected alike, and the attention's output expanded back.
#[derive(Clone, Debug, PartialEq)]
pub struct KvPlan {
    pub transform: KvTransform,
    pub keep: f32,
    /// `rope = "before"`: K alone, cached before RoPE (`#kv(pre_rope)`);
    /// else K and V after it, through projections around the attention.
    pub pre_rope: bool,
    /// `fit = "scores"` (PCA before RoPE): the basis minimizes the error of
    /// the scores (keys weighted by the queries, rotated by every distance)
    /// rather than of the keys (`sparsec_ir::kv_basis::score_fitted`).
    pub fit_scores: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvTransform {
    /// The lowest DCT-II frequencies.
    Dct,
    /// Discrete prolate spheroidal sequences of half-bandwidth `bandwidth`.
    Pswf { bandwidth: f32 },
    /// Principal directions of the layer's keys and values on the calibration text.
    Pca,
    /// No basis: each channel of K divided, and of q multiplied, by
    /// `s = (rms k / rms q)^alpha` (per RoPE pair; calibrated), so scores are
    /// unchanged and block-quantized caches see channels of like magnitude.
    Smooth { alpha: f32 },
}

impl KvTransform {
    pub fn name(self) -> &'static str {
        match self {
            KvTransform::Dct => "dct",
            KvTransform::Pswf { .. } => "pswf",
            KvTransform::Pca => "pca",
            KvTransform::Smooth { .. } => "smooth",
        }
    }
}

/// Where the gate of a gated NSA comes from (`nsa = { gate = ..., adapters = ... }`).
#[derive(Clone, Debug, PartialEq, Default)]
pub enum NsaGatePlan {
    /// `gate = "joint"` (the default): no gate, one softmax.
    #[default]
    Joint,
    /// `gate = "fitted"`: constant weights per head, fitted by `sparsec
    /// compile` on the calibration text (least squares against full
    /// attention), which then gives each layer a rule with `Values`.
    Fitted,
    /// `gate = [w, ...]`: constant weights, 3 per head (compressed, selected,
    /// window), of every selected layer.
    Values(Vec<f32>),
    /// `adapters = "FILE"`: trained gate and compression weights from a
    /// safetensors file (the layout: `docs/nsa-adapters.md`), loaded into the
    /// model as `layers.N.nsa.*` before the compile.
    Adapters(std::path::PathBuf),
}

/// `gate = "joint" | "fitted"` or a list of weights.
#[derive(Deserialize)]
#[serde(untagged)]
enum GateFile {
    Word(String),
    Values(Vec<f32>),
}

/// `attention = { nsa = { block, top_n, window, sinks, score, gate, adapters } }`; every key
/// has a default (`NSA_DEFAULT`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsaFile {
    block: Option<u32>,
    top_n: Option<u32>,
    window: Option<u32>,
    sinks: Option<u32>,
    score: Option<String>,
    gate: Option<GateFile>,
    adapters: Option<String>,
}

/// NSA's inference defaults: blocks of 64, the top 16, a 512-position window,
/// the first block always seen (NSA's initial block: `sinks` defaults to the
/// block size), blocks ranked by their key bounds.
pub const NSA_DEFAULT: NativeSparse = NativeSparse {
    block: 64,
    top_n: 16,
    window: 512,
    sinks: 64,
    score: NsaScore::Bound,
    gate: NsaGate::Joint,
    compress: NsaCompress::Mean,
};

#[derive(Deserialize)]
#[serde(untagged)]
enum WindowFile {
    Size(u32),
    Word(String),
    Table { size: Option<u32>, sinks: Option<u32>, schedule: Option<String>, start: Option<u32>, end: Option<u32> },
}

fn parse_layers(s: &str) -> Result<Layers, String> {
    let s = s.trim();
    if s == "all" {
        return Ok(Layers::All);
    }
    let num = |t: &str| t.trim().parse::<u64>().map_err(|_| format!("layers = \"{s}\": `{t}` is not a layer number"));
    if let Some((a, b)) = s.split_once("..") {
        let start = if a.trim().is_empty() { 0 } else { num(a)? };
        let end = if b.trim().is_empty() { None } else { Some(num(b)?) };
        if end.is_some_and(|e| e <= start) {
            return Err(format!("layers = \"{s}\" is empty (ranges are half-open)"));
        }
        return Ok(Layers::Range { start, end });
    }
    Ok(Layers::List(s.split(',').map(num).collect::<Result<_, _>>()?))
}

fn ratio_in_range(r: f32) -> Result<f32, String> {
    if (0.0..1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("sparsity ratio {r} is outside [0, 1)"))
    }
}

fn factor_method(m: Option<&str>) -> Result<FactorMethod, String> {
    match m {
        None => Ok(FactorMethod::Whitened),
        Some(m) => FactorMethod::from_name(m).ok_or_else(|| format!("method = \"{m}\" is not one of svd, whitened")),
    }
}

fn factor_ratio(key: &str, r: f32) -> Result<f32, String> {
    if r > 0.0 && r < 1.0 {
        Ok(r)
    } else {
        Err(format!("{key} ratio {r} is outside (0, 1) (the fraction of the parameters removed)"))
    }
}

/// `low_rank = { ratio = R | rank = N, method }` or `share = { group = G, ratio = R, method }`
/// (`method` "svd" or "whitened", the default).
fn parse_factor(low_rank: Option<LowRankFile>, share: Option<ShareFile>) -> Result<Option<FactorPlan>, String> {
    match (low_rank, share) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err("gives both low_rank and share: a weight gets one factorization".into()),
        (Some(l), None) => {
            let size = match (l.ratio, l.rank) {
                (Some(r), None) => FactorSize::Ratio(factor_ratio("low_rank", r)?),
                (None, Some(0)) => return Err("low_rank rank must be positive".into()),
                (None, Some(k)) => FactorSize::Rank(k),
                _ => return Err("low_rank needs exactly one of `ratio` (the fraction of parameters removed) or `rank`".into()),
            };
            Ok(Some(FactorPlan { size, method: factor_method(l.method.as_deref())?, group: None }))
        }
        (None, Some(s)) => {
            if s.group < 2 {
                return Err(format!("share group = {} shares nothing (give 2 or more layers; low_rank factors one)", s.group));
            }
            let size = FactorSize::Ratio(factor_ratio("share", s.ratio)?);
            Ok(Some(FactorPlan { size, method: factor_method(s.method.as_deref())?, group: Some(s.group) }))
        }
    }
}

impl Plan {
    /// Parses plan text; errors name the rule.
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        let file: PlanFile = toml::from_str(text).map_err(|e| PlanError::Toml(e.to_string()))?;
        let mut rules = Vec::new();
        for (i, r) in file.rule.into_iter().enumerate() {
            let index = i + 1;
            let err = |message: String| PlanError::Rule { rule: index, message };
            let layers = parse_layers(r.layers.as_deref().unwrap_or("all")).map_err(err)?;
            let targets: Vec<String> =
                r.target.as_deref().unwrap_or("*").split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            let method = match &r.sparsity {
                Some(SparsityFile::Unstructured { method, .. } | SparsityFile::Nm { method, .. } | SparsityFile::Block { method, .. }) => {
                    match method.as_deref() {
                        None => PruneMethod::Magnitude,
                        Some(m) => PruneMethod::from_name(m)
                            .ok_or_else(|| err(format!("method = \"{m}\" is not one of magnitude, wanda, sparsegpt")))?,
                    }
                }
                Some(SparsityFile::FromWeights {}) | None => PruneMethod::Magnitude,
            };
            // `values = "f32" | "q8" | "q4"`: how the kept values are stored (`#values`).
            let values = match &r.sparsity {
                Some(SparsityFile::Unstructured { values, .. } | SparsityFile::Nm { values, .. } | SparsityFile::Block { values, .. }) => {
                    match values.as_deref() {
                        None => ValueCoding::F32,
                        Some(v) => ValueCoding::from_name(v).ok_or_else(|| err(format!("values = \"{v}\" is not one of f32, q8, q4")))?,
                    }
                }
                Some(SparsityFile::FromWeights {}) | None => ValueCoding::F32,
            };
            let from_weights = matches!(r.sparsity, Some(SparsityFile::FromWeights {}));
            let sparsity = match r.sparsity {
                Some(SparsityFile::FromWeights {}) | None => None,
                Some(SparsityFile::Unstructured { ratio, .. }) => {
                    Some(Sparsity::Unstructured { ratio: ratio_in_range(ratio).map_err(err)? })
                }
                Some(SparsityFile::Nm { n, m, .. }) => {
                    if n == 0 || m == 0 || n > m || m > 255 {
                        return Err(err(format!("N:M sparsity needs 0 < n <= m <= 255, got {n}:{m}")));
                    }
                    Some(Sparsity::NM { n, m })
                }
                Some(SparsityFile::Block { ratio, block: [rows, cols], .. }) => {
                    if rows == 0 || cols == 0 {
                        return Err(err(format!("block shape [{rows}, {cols}] must be positive")));
                    }
                    Some(Sparsity::Block { ratio: ratio_in_range(ratio).map_err(err)?, rows, cols })
                }
            };
            let specialize = match r.specialize.as_deref() {
                None => None,
                Some(s) => Some(
                    Specialize::from_name(s)
                        .ok_or_else(|| err(format!("specialize = \"{s}\" is not one of dense, generic, indices, full, auto")))?,
                ),
            };
            let mut window = None;
            let mut nsa = None;
            let mut nsa_gate = NsaGatePlan::Joint;
            if let Some(a) = r.attention {
                if let Some(f) = a.nsa {
                    if a.window.is_some() {
                        return Err(err("`nsa` carries its own window: give `window` inside it, not next to it".into()));
                    }
                    let d = NSA_DEFAULT;
                    let score = match f.score.as_deref() {
                        None => d.score,
                        Some(w) => {
                            NsaScore::from_name(w).ok_or_else(|| err(format!("nsa score = \"{w}\" (expected \"mean\" or \"bound\")")))?
                        }
                    };
                    let block = f.block.unwrap_or(d.block);
                    nsa_gate = match (f.gate, f.adapters) {
                        (Some(_), Some(_)) => return Err(err("nsa takes `gate` or `adapters` (whose gate is trained), not both".into())),
                        (None, Some(a)) => NsaGatePlan::Adapters(a.into()),
                        (None, None) => NsaGatePlan::Joint,
                        (Some(GateFile::Word(w)), None) if w == "joint" => NsaGatePlan::Joint,
                        (Some(GateFile::Word(w)), None) if w == "fitted" => NsaGatePlan::Fitted,
                        (Some(GateFile::Word(w)), None) => {
                            return Err(err(format!("nsa gate = \"{w}\" (expected \"joint\", \"fitted\" or a list of weights)")))
                        }
                        (Some(GateFile::Values(v)), None) => {
                            if v.is_empty() || v.len() % 3 != 0 || v.iter().any(|x| !x.is_finite()) {
                                return Err(err(format!("nsa gate lists {} weights; it takes 3 finite ones per head", v.len())));
                            }
                            NsaGatePlan::Values(v)
                        }
                    };
                    let (gate, compress) = match nsa_gate {
                        NsaGatePlan::Joint => (NsaGate::Joint, NsaCompress::Mean),
                        NsaGatePlan::Fitted | NsaGatePlan::Values(_) => (NsaGate::Fixed, NsaCompress::Mean),
                        NsaGatePlan::Adapters(_) => (NsaGate::Sigmoid, NsaCompress::Linear),
                    };
                    let n = NativeSparse {
                        block,
                        top_n: f.top_n.unwrap_or(d.top_n),
                        window: f.window.unwrap_or(d.window),
                        sinks: f.sinks.unwrap_or(block),
                        score,
                        gate,
                        compress,
                    };
                    if n.block == 0 || n.top_n == 0 || n.window == 0 {
                        return Err(err(format!(
                            "nsa block, top_n and window must be positive, got {}, {}, {}",
                            n.block, n.top_n, n.window
                        )));
                    }
                    nsa = Some(n);
                }
                window = match a.window {
                    None => None,
                    Some(WindowFile::Size(0)) => return Err(err("window size must be positive".into())),
                    Some(WindowFile::Size(size)) => Some(WindowPlan::Fixed { size, sinks: DEFAULT_SINKS }),
                    Some(WindowFile::Word(w)) if w == "full" => Some(WindowPlan::Full),
                    Some(WindowFile::Word(w)) => match named_schedule(&w, DEFAULT_SINKS) {
                        Some(p) => Some(p),
                        None => {
                            return Err(err(format!(
                                "window = \"{w}\" (expected a size, \"full\", a schedule ({}) or a table)",
                                SCHEDULES.join(", ")
                            )))
                        }
                    },
                    Some(WindowFile::Table { size, sinks, schedule, start, end }) => {
                        let sinks = sinks.unwrap_or(DEFAULT_SINKS);
                        match (size, schedule.as_deref(), start, end) {
                            (Some(size), None, None, None) if size > 0 => Some(WindowPlan::Fixed { size, sinks }),
                            (None, Some("progressive"), Some(start), Some(end)) if start > 0 && end > 0 => {
                                Some(WindowPlan::Progressive { start, end, sinks })
                            }
                            (None, Some(name), None, None) if named_schedule(name, sinks).is_some() => named_schedule(name, sinks),
                            _ => {
                                return Err(err(format!(
                                    "window tables are {{ size = N, sinks = S }}, {{ schedule = \"progressive\", start = A, end = B, sinks = S }} with positive sizes, or {{ schedule = NAME, sinks = S }} with NAME one of {}",
                                    SCHEDULES.join(", ")
                                )))
                            }
                        }
                    }
                };
            }
            let mut kv_chunks = None;
            let mut kv_sequence = None;
            let kv = match r.kv {
                None => None,
                Some(f) if f.transform == "chunked_svd" => {
                    if f.keep.is_some()
                        || f.on.is_some()
                        || f.bandwidth.is_some()
                        || f.axis.is_some()
                        || f.block.is_some()
                        || f.rope.is_some()
                        || f.fit.is_some()
                        || f.alpha.is_some()
                        || f.sinks.is_some()
                        || f.recent.is_some()
                    {
                        return Err(err(
                            "kv transform = \"chunked_svd\" factors K and V by chunks of positions: it takes chunk, and rank or energy (with max_rank)".into(),
                        ));
                    }
                    let chunk = f.chunk.unwrap_or(64);
                    let rank = match (f.rank, f.energy, f.max_rank) {
                        (Some(k), None, None) => sparsec_ir::SvdRank::Fixed(k),
                        (None, Some(fraction), max_rank) => sparsec_ir::SvdRank::Energy { fraction, max_rank },
                        (Some(_), None, Some(_)) => return Err(err("kv max_rank caps an energy rank: give energy with it".into())),
                        _ => return Err(err("kv transform = \"chunked_svd\" needs exactly one of rank or energy".into())),
                    };
                    // The pattern's own checks, without a model (the head width is checked at apply).
                    sparsec_ir::verifier::verify_chunked_svd(chunk, rank).map_err(|m| err(format!("kv: {m}")))?;
                    kv_chunks = Some((chunk, rank));
                    None
                }
                Some(f) if f.axis.as_deref() == Some("sequence") => {
                    if f.on.is_some()
                        || f.chunk.is_some()
                        || f.rank.is_some()
                        || f.energy.is_some()
                        || f.max_rank.is_some()
                        || f.rope.is_some()
                        || f.fit.is_some()
                        || f.alpha.is_some()
                    {
                        return Err(err(
                            "kv axis = \"sequence\" compresses blocks of positions: it takes transform, keep, block, sinks, recent and (pswf) bandwidth"
                                .into(),
                        ));
                    }
                    let keep = f.keep.unwrap_or(0.5);
                    let basis = match f.transform.as_str() {
                        "dct" if f.bandwidth.is_some() => {
                            return Err(err("kv bandwidth is a pswf parameter (transform = \"pswf\")".into()))
                        }
                        "dct" => SeqBasis::Dct,
                        "pswf" => {
                            let bandwidth = f.bandwidth.unwrap_or_else(|| SeqBasis::default_bandwidth(keep));
                            sparsec_ir::kv_basis::check_bandwidth(bandwidth).map_err(|m| err(format!("kv {m}")))?;
                            SeqBasis::Pswf { bandwidth }
                        }
                        other => return Err(err(format!("kv transform = \"{other}\" on the sequence axis (expected dct or pswf)"))),
                    };
                    let seq = SeqParams {
                        basis,
                        keep,
                        block: Some(f.block.unwrap_or(64)),
                        sinks: f.sinks.unwrap_or(4),
                        recent: f.recent.unwrap_or(256),
                    };
                    sparsec_ir::verifier::verify_sequence_kv(seq.keep, seq.block, seq.recent).map_err(|m| err(format!("kv: {m}")))?;
                    kv_sequence = Some(seq);
                    None
                }
                Some(f) => {
                    if let Some(a) = f.axis.as_deref().filter(|a| *a != "feature") {
                        return Err(err(format!("kv axis = \"{a}\" (expected feature or sequence)")));
                    }
                    if f.block.is_some() || f.sinks.is_some() || f.recent.is_some() {
                        return Err(err("kv block, sinks and recent belong to the sequence axis (axis = \"sequence\")".into()));
                    }
                    if f.chunk.is_some() || f.rank.is_some() || f.energy.is_some() || f.max_rank.is_some() {
                        return Err(err("kv chunk, rank, energy and max_rank belong to transform = \"chunked_svd\"".into()));
                    }
                    {
                        let keep = f.keep.unwrap_or(0.5);
                        if !(keep > 0.0 && keep <= 1.0) {
                            return Err(err(format!("kv keep = {keep} is outside (0, 1]")));
                        }
                        let pre_rope = match f.rope.as_deref() {
                            None | Some("after") => false,
                            Some("before") => true,
                            Some(o) => return Err(err(format!("kv rope = \"{o}\" (expected before or after)"))),
                        };
                        let on = f.on.as_deref().map(|o| o.replace(' ', ""));
                        match (pre_rope, on.as_deref()) {
                            (false, None | Some("k,v")) | (true, None | Some("k")) => {}
                            (false, Some(o)) => {
                                return Err(err(format!(
                                    "kv on = \"{o}\": after RoPE K and V are compressed together (one head width for attention); give on = \"k,v\", or rope = \"before\" with on = \"k\""
                                )))
                            }
                            (true, Some(o)) => {
                                return Err(err(format!("kv on = \"{o}\": rope = \"before\" compresses K alone; give on = \"k\"")))
                            }
                        }
                        let transform = match f.transform.as_str() {
                            "dct" => KvTransform::Dct,
                            "pca" => KvTransform::Pca,
                            "pswf" => {
                                let bandwidth = f.bandwidth.unwrap_or(0.25);
                                sparsec_ir::kv_basis::check_bandwidth(bandwidth).map_err(|m| err(format!("kv {m}")))?;
                                KvTransform::Pswf { bandwidth }
                            }
                            "smooth" => {
                                if f.keep.is_some() || pre_rope || f.on.is_some() {
                                    return Err(err(
                                        "kv transform = \"smooth\" scales channels and keeps every one: it takes alpha only".into()
                                    ));
                                }
                                let alpha = f.alpha.unwrap_or(0.5);
                                if !(alpha > 0.0 && alpha <= 1.0) {
                                    return Err(err(format!("kv alpha = {alpha} is outside (0, 1]")));
                                }
                                KvTransform::Smooth { alpha }
                            }
                            other => {
                                return Err(err(format!("kv transform = \"{other}\" (expected dct, pswf, pca, smooth or chunked_svd)")))
                            }
                        };
                        if f.alpha.is_some() && !matches!(transform, KvTransform::Smooth { .. }) {
                            return Err(err("kv alpha is a smooth parameter".into()));
                        }
                        if f.bandwidth.is_some() && !matches!(transform, KvTransform::Pswf { .. }) {
                            return Err(err("kv bandwidth is a pswf parameter".into()));
                        }
                        let fit_scores = match f.fit.as_deref() {
                            None | Some("keys") => false,
                            Some("scores") if pre_rope && transform == KvTransform::Pca => true,
                            Some("scores") => {
                                return Err(err(
                                    "kv fit = \"scores\" fits a PCA basis before RoPE: give transform = \"pca\", rope = \"before\"".into(),
                                ))
                            }
                            Some(o) => return Err(err(format!("kv fit = \"{o}\" (expected keys or scores)"))),
                        };
                        Some(KvPlan { transform, keep, pre_rope, fit_scores })
                    }
                }
            };
            let factor = parse_factor(r.low_rank, r.share).map_err(err)?;
            if let Some(f) = &factor {
                if sparsity.is_some() || specialize.is_some() {
                    let other = if sparsity.is_some() { "sparsity" } else { "specialize" };
                    return Err(err(format!("`{}` and `{other}` on the same weights are not combined", f.key())));
                }
            }
            if sparsity.is_none()
                && !from_weights
                && specialize.is_none()
                && window.is_none()
                && nsa.is_none()
                && kv.is_none()
                && kv_chunks.is_none()
                && kv_sequence.is_none()
                && factor.is_none()
            {
                return Err(err("says nothing: give sparsity, specialize, attention, kv, low_rank or share".into()));
            }
            rules.push(Rule {
                index,
                layers,
                targets,
                sparsity,
                method,
                values,
                specialize,
                window,
                nsa,
                nsa_gate,
                kv,
                kv_chunks,
                kv_sequence,
                factor,
                from_weights,
            });
        }
        let mut calibration = Calibration::default();
        if let Some(c) = file.calibration {
            match c.text {
                Some(TextFiles::One(t)) => calibration.texts = vec![t.into()],
                Some(TextFiles::Many(v)) if !v.is_empty() => calibration.texts = v.into_iter().map(Into::into).collect(),
                Some(TextFiles::Many(_)) => return Err(PlanError::Toml("[calibration] text = [] names no file".into())),
                None => {}
            }
            match c.tokens {
                Some(0) => return Err(PlanError::Toml("[calibration] tokens must be positive".into())),
                Some(t) => calibration.tokens = t,
                None => {}
            }
            calibration.sequential = c.sequential.unwrap_or(calibration.sequential);
            calibration.skip = c.skip.unwrap_or(0);
            if let Some(d) = c.damp {
                if !(d > 0.0 && d < 1.0) {
                    return Err(PlanError::Toml(format!("[calibration] damp = {d} is not in (0, 1)")));
                }
                calibration.damp = d;
            }
            if let Some(o) = c.owl {
                let owl = Owl { lambda: o.lambda.unwrap_or(0.08), threshold: o.threshold.unwrap_or(5.0) };
                if !(owl.lambda > 0.0 && owl.lambda < 0.5) {
                    return Err(PlanError::Toml(format!("[calibration] owl lambda = {} is not in (0, 0.5)", owl.lambda)));
                }
                if !(owl.threshold > 1.0 && owl.threshold.is_finite()) {
                    return Err(PlanError::Toml(format!("[calibration] owl threshold = {} is not above 1", owl.threshold)));
                }
                if calibration.sequential {
                    return Err(PlanError::Toml(
                        "[calibration] owl needs every layer's statistics before pruning: it cannot be sequential".into(),
                    ));
                }
                calibration.owl = Some(owl);
            }
        }
        // OWL reallocates calibrated unstructured ratios: without such a rule it would do nothing.
        if calibration.owl.is_some()
            && !rules.iter().any(|r| r.method.calibrated() && matches!(r.sparsity, Some(Sparsity::Unstructured { .. })))
        {
            return Err(PlanError::Toml(
                "[calibration] owl applies to unstructured sparsity with method = \"wanda\" or \"sparsegpt\", and no rule has one".into(),
            ));
        }
        // The dampening is SparseGPT's: without a SparseGPT rule it would do nothing.
        if calibration.damp != DEFAULT_DAMP && !rules.iter().any(|r| r.method == PruneMethod::SparseGpt) {
            return Err(PlanError::Toml("[calibration] damp applies to method = \"sparsegpt\", and no rule has it".into()));
        }
        // Skipped rows change the statistics, which only calibrated pruning and
        // whitened factors read.
        if calibration.skip > 0
            && !rules.iter().any(|r| r.method.calibrated() || r.factor.as_ref().is_some_and(|f| f.method == FactorMethod::Whitened))
        {
            return Err(PlanError::Toml(
                "[calibration] skip applies to calibrated pruning (wanda, sparsegpt) and whitened factors, and no rule has one".into(),
            ));
        }
        Ok(Plan { rules, calibration })
    }

    /// The sparsity and method the plan gives the matmul weight of `role` in
    /// `layer` (`None`: not in a layer): the last rule that selects it and says
    /// a sparsity wins, as `apply-plan` applies them. `from-weights` rules
    /// count once resolved (`resolve_from_weights`), not before.
    pub fn sparsity_for(&self, layer: Option<u64>, role: &str) -> Option<(Sparsity, PruneMethod)> {
        self.rules.iter().rev().filter(|r| r.selects(layer, role)).find_map(|r| r.sparsity.clone().map(|s| (s, r.method)))
    }

    /// The factorization the plan gives the matmul weight of `role` in `layer`:
    /// the last rule that selects it and says `low_rank` or `share`.
    pub fn factor_for(&self, layer: Option<u64>, role: &str) -> Option<FactorPlan> {
        self.rules.iter().rev().filter(|r| r.selects(layer, role)).find_map(|r| r.factor)
    }

    /// Whether any rule factors weights (`low_rank` or `share`).
    pub fn factors(&self) -> bool {
        self.rules.iter().any(|r| r.factor.is_some())
    }

    /// Whether any rule prunes with a calibrated method.
    /// Whether a rule's NSA gate is fitted on calibration text (`gate = "fitted"`).
    pub fn fits_nsa_gates(&self) -> bool {
        self.rules.iter().any(|r| r.nsa_gate == NsaGatePlan::Fitted)
    }

    /// Whether a rule caches K and V in a feature-axis basis (`kv`).
    pub fn kv_bases(&self) -> bool {
        self.rules.iter().any(|r| r.kv.is_some())
    }

    /// The adapter files rules name (`adapters = "FILE"`).
    pub fn nsa_adapters(&self) -> impl Iterator<Item = &std::path::Path> {
        self.rules.iter().filter_map(|r| match &r.nsa_gate {
            NsaGatePlan::Adapters(p) => Some(p.as_path()),
            _ => None,
        })
    }

    pub fn needs_calibration(&self) -> bool {
        self.rules.iter().any(|r| r.sparsity.is_some() && r.method.calibrated())
    }

    /// The plan text of a named preset.
    pub fn preset(name: &str) -> Result<String, PlanError> {
        let text = match name {
            "half" | "quarter" | "aggressive" => {
                return Ok(format!("[[rule]]\nlayers = \"all\"\nattention = {{ window = {{ schedule = \"{name}\", sinks = {DEFAULT_SINKS} }} }}\n"))
            }
            // Native sparse attention with its defaults (`NSA_DEFAULT`) in every layer.
            "nsa" => "[[rule]]\nlayers = \"all\"\nattention = { nsa = {} }\n",
            "sparse-0.5" | "sparse-0.7" | "sparse-0.9" => {
                return Ok(format!(
                    "[[rule]]\nlayers = \"all\"\ntarget = \"attn.*,mlp.*\"\nsparsity = {{ kind = \"unstructured\", ratio = {} }}\nspecialize = \"auto\"\n",
                    &name["sparse-".len()..]
                ))
            }
            "2:4" => "[[rule]]\nlayers = \"all\"\ntarget = \"attn.*,mlp.*\"\nsparsity = { kind = \"nm\", n = 2, m = 4 }\nspecialize = \"generic\"\n",
            "block4x4-0.8" => {
                "[[rule]]\nlayers = \"all\"\ntarget = \"attn.*,mlp.*\"\nsparsity = { kind = \"block\", ratio = 0.8, block = [4, 4] }\nspecialize = \"generic\"\n"
            }
            other => return Err(PlanError::UnknownPreset(other.to_string(), PRESETS.join(", "))),
        };
        Ok(text.to_string())
    }
}

/// Sink tokens of a window the plan does not give them for: windows without
/// sinks collapse (StreamingLLM), so every window keeps the first 4 positions.
pub const DEFAULT_SINKS: u32 = 4;

/// The sliding-window project's per-layer schedules, by name.
pub const SCHEDULES: [&str; 4] = ["full", "half", "quarter", "aggressive"];

/// A named schedule (`SCHEDULES`): windows from the first selected layer to
/// the last, geometrically (`full`: no window).
pub fn named_schedule(name: &str, sinks: u32) -> Option<WindowPlan> {
    let (start, end) = match name {
        "full" => return Some(WindowPlan::Full),
        "half" => (1024, 512),
        "quarter" => (1024, 256),
        "aggressive" => (512, 16),
        _ => return None,
    };
    Some(WindowPlan::Progressive { start, end, sinks })
}

/// Every preset name.
pub const PRESETS: [&str; 9] = ["half", "quarter", "aggressive", "nsa", "sparse-0.5", "sparse-0.7", "sparse-0.9", "2:4", "block4x4-0.8"];

/// `*` matches any run of characters.
pub fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else { return false };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damp_is_sparsegpt_s_and_in_range() {
        let with = |damp: &str, method: &str| {
            Plan::parse(&format!(
                "[calibration]\ndamp = {damp}\n\n[[rule]]\nsparsity = {{ kind = \"unstructured\", ratio = 0.5, method = \"{method}\" }}\n"
            ))
        };
        assert_eq!(with("0.002", "sparsegpt").unwrap().calibration.damp, 0.002);
        assert_eq!(Plan::parse("[[rule]]\nsparsity = { kind = \"nm\", n = 2, m = 4 }\n").unwrap().calibration.damp, DEFAULT_DAMP);
        for (damp, method, why) in [
            ("0.002", "wanda", "damp applies to method = \"sparsegpt\""),
            ("0.0", "sparsegpt", "is not in (0, 1)"),
            ("1.5", "sparsegpt", "is not in (0, 1)"),
        ] {
            let e = with(damp, method).unwrap_err().to_string();
            assert!(e.contains(why), "{damp} {method}: {e}");
        }
    }

    #[test]
    fn owl_needs_a_calibrated_unstructured_rule() {
        let with = |rule: &str| Plan::parse(&format!("[calibration]\nowl = {{}}\n\n[[rule]]\n{rule}\n"));
        let owl = with("sparsity = { kind = \"unstructured\", ratio = 0.5, method = \"wanda\" }").unwrap().calibration.owl;
        assert_eq!(owl, Some(Owl { lambda: 0.08, threshold: 5.0 }));
        for rule in
            ["sparsity = { kind = \"nm\", n = 2, m = 4, method = \"sparsegpt\" }", "sparsity = { kind = \"unstructured\", ratio = 0.5 }"]
        {
            let e = with(rule).unwrap_err().to_string();
            assert!(e.contains("owl applies to unstructured sparsity with method"), "{rule}: {e}");
        }
    }

    #[test]
    fn windows_get_sinks_and_named_schedules() {
        let window = |w: &str| Plan::parse(&format!("[[rule]]\nattention = {{ window = {w} }}\n")).map(|p| p.rules[0].window.clone());
        let quarter = Some(WindowPlan::Progressive { start: 1024, end: 256, sinks: DEFAULT_SINKS });
        assert_eq!(window("\"quarter\"").unwrap(), quarter);
        assert_eq!(window("{ schedule = \"quarter\" }").unwrap(), quarter);
        assert_eq!(
            window("{ schedule = \"half\", sinks = 0 }").unwrap(),
            Some(WindowPlan::Progressive { start: 1024, end: 512, sinks: 0 })
        );
        assert_eq!(window("{ schedule = \"full\" }").unwrap(), Some(WindowPlan::Full));
        assert_eq!(window("256").unwrap(), Some(WindowPlan::Fixed { size: 256, sinks: DEFAULT_SINKS }));
        assert!(window("\"eighth\"").unwrap_err().to_string().contains("full, half, quarter, aggressive"));
        assert!(window("{ schedule = \"half\", start = 8 }").is_err());
        for name in ["half", "quarter", "aggressive"] {
            let p = Plan::parse(&Plan::preset(name).unwrap()).unwrap();
            assert_eq!(p.rules[0].window, named_schedule(name, DEFAULT_SINKS), "{name}");
        }
    }

    #[test]
    fn nsa_gates_are_joint_fitted_listed_or_trained() {
        let rule = |t: &str| Plan::parse(&format!("[[rule]]\nattention = {{ nsa = {{ {t} }} }}\n")).map(|p| p.rules[0].clone());
        let r = rule("gate = \"fitted\"").unwrap();
        assert_eq!((r.nsa_gate, r.nsa.map(|n| n.gate)), (NsaGatePlan::Fitted, Some(NsaGate::Fixed)));
        let r = rule("gate = [0.5, 0.25, 1.0]").unwrap();
        assert_eq!(r.nsa_gate, NsaGatePlan::Values(vec![0.5, 0.25, 1.0]));
        let r = rule("adapters = \"a.safetensors\"").unwrap();
        assert_eq!(r.nsa.map(|n| (n.gate, n.compress)), Some((NsaGate::Sigmoid, NsaCompress::Linear)));
        assert_eq!(rule("gate = \"joint\"").unwrap().nsa, Some(NSA_DEFAULT));
        for (t, why) in [
            ("gate = \"soft\"", "expected \"joint\", \"fitted\""),
            ("gate = [1.0, 2.0]", "3 finite ones per head"),
            ("gate = \"fitted\", adapters = \"a\"", "not both"),
        ] {
            let e = rule(t).unwrap_err().to_string();
            assert!(e.contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn nsa_tables_take_defaults_and_refuse_a_window_beside_them() {
        let nsa = |t: &str| Plan::parse(&format!("[[rule]]\nattention = {{ {t} }}\n")).map(|p| p.rules[0].nsa);
        assert_eq!(nsa("nsa = {}").unwrap(), Some(NSA_DEFAULT));
        assert_eq!(
            nsa("nsa = { block = 32, top_n = 8, window = 256, sinks = 0, score = \"mean\" }").unwrap(),
            Some(NativeSparse { block: 32, top_n: 8, window: 256, sinks: 0, score: NsaScore::Mean, ..NSA_DEFAULT })
        );
        // The first block is always seen unless `sinks` says otherwise.
        assert_eq!(nsa("nsa = { block = 32 }").unwrap().map(|n| n.sinks), Some(32));
        for (t, needle) in [
            ("nsa = {}, window = 64", "carries its own window"),
            ("nsa = { score = \"max\" }", "expected \"mean\" or \"bound\""),
            ("nsa = { top_n = 0 }", "must be positive"),
            ("nsa = { stride = 16 }", "unknown field"),
        ] {
            let e = nsa(t).unwrap_err().to_string();
            assert!(e.contains(needle), "{t}: {e}");
        }
        assert_eq!(Plan::parse(&Plan::preset("nsa").unwrap()).unwrap().rules[0].nsa, Some(NSA_DEFAULT));
    }

    #[test]
    fn design_md_plan_parses() {
        let text = r#"
[[rule]]
layers = "all"
target = "mlp.*"
sparsity = { kind = "unstructured", ratio = 0.9 }
specialize = "auto"

[[rule]]
layers = "6.."
attention = { window = { schedule = "progressive", start = 512, end = 16 } }

[[rule]]
layers = "1,3,5"
target = "attn.q,attn.k"
sparsity = { kind = "block", ratio = 0.8, block = [4, 4] }
"#;
        let p = Plan::parse(text).unwrap();
        assert_eq!(p.rules.len(), 3);
        assert_eq!(p.rules[0].sparsity, Some(Sparsity::Unstructured { ratio: 0.9 }));
        assert_eq!(p.rules[1].layers, Layers::Range { start: 6, end: None });
        assert_eq!(p.rules[1].window, Some(WindowPlan::Progressive { start: 512, end: 16, sinks: DEFAULT_SINKS }));
        assert_eq!(p.rules[2].targets, vec!["attn.q", "attn.k"]);
        assert_eq!(p.rules[2].layers, Layers::List(vec![1, 3, 5]));
        for name in PRESETS {
            Plan::parse(&Plan::preset(name).unwrap()).unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    #[test]
    fn bad_plans_say_what_and_where() {
        let cases = [
            ("[[rule]]\nsparsity = { kind = \"unstructured\", ratio = 1.0 }", "rule 1: sparsity ratio 1 is outside [0, 1)"),
            ("[[rule]]\nsparsity = { kind = \"nm\", n = 4, m = 2 }", "rule 1: N:M sparsity needs 0 < n <= m"),
            ("[[rule]]\nlayers = \"6..2\"\nspecialize = \"dense\"", "is empty"),
            ("[[rule]]\nlayers = \"x\"\nspecialize = \"dense\"", "`x` is not a layer number"),
            ("[[rule]]\nspecialize = \"fast\"", "is not one of dense"),
            ("[[rule]]\ntarget = \"mlp.*\"", "says nothing"),
            ("[[rule]]\nsparsity = { kind = \"diagonal\" }", "plan:"),
            ("[[rule]]\nsparsty = { kind = \"nm\", n = 2, m = 4 }", "unknown field"),
            ("[[rule]]\nattention = { window = 0 }", "positive"),
            ("[[rule]]\nlow_rank = { ratio = 1.0 }", "rule 1: low_rank ratio 1 is outside (0, 1)"),
            ("[[rule]]\nlow_rank = { ratio = 0.2, rank = 4 }", "exactly one of `ratio`"),
            ("[[rule]]\nlow_rank = { rank = 0 }", "rank must be positive"),
            ("[[rule]]\nlow_rank = { ratio = 0.2, method = \"qr\" }", "method = \"qr\" is not one of svd, whitened"),
            ("[[rule]]\nshare = { group = 1, ratio = 0.2 }", "shares nothing"),
            ("[[rule]]\nshare = { group = 2, ratio = 0.0 }", "share ratio 0 is outside (0, 1)"),
            ("[[rule]]\nshare = { group = 2 }", "missing field `ratio`"),
            ("[[rule]]\nshare = { group = 2, ratio = 0.2 }\nlow_rank = { ratio = 0.2 }", "both low_rank and share"),
            (
                "[[rule]]\nlow_rank = { ratio = 0.2 }\nsparsity = { kind = \"unstructured\", ratio = 0.5 }",
                "rule 1: `low_rank` and `sparsity` on the same weights are not combined",
            ),
        ];
        for (text, want) in cases {
            let e = Plan::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(Plan::preset("nope").unwrap_err().to_string().contains("known: half"));
    }

    #[test]
    fn factor_keys_parse_and_ranks_follow_the_ratio() {
        let p = Plan::parse(
            "[[rule]]\ntarget = \"mlp.*\"\nlow_rank = { ratio = 0.2, method = \"svd\" }\n\n[[rule]]\ntarget = \"attn.q\"\nlow_rank = { rank = 8 }\n\n[[rule]]\ntarget = \"attn.k\"\nshare = { group = 3, ratio = 0.3 }\n",
        )
        .unwrap();
        let f: Vec<FactorPlan> = p.rules.iter().map(|r| r.factor.unwrap()).collect();
        assert_eq!(f[0], FactorPlan { size: FactorSize::Ratio(0.2), method: FactorMethod::Svd, group: None });
        assert_eq!(f[1], FactorPlan { size: FactorSize::Rank(8), method: FactorMethod::Whitened, group: None });
        assert_eq!(f[2], FactorPlan { size: FactorSize::Ratio(0.3), method: FactorMethod::Whitened, group: Some(3) });
        assert_eq!(p.factor_for(Some(4), "attn.k"), Some(f[2]));
        assert_eq!(p.factor_for(Some(4), "attn.v"), None);
        // 20% fewer parameters of a 576x1536 matrix: r(576 + 1536) <= 0.8·576·1536.
        let r = FactorPlan::rank_for_ratio(0.2, 1, 1536, 576) as u64;
        assert_eq!(r, 335);
        assert!(r * (576 + 1536) <= 576 * 1536 * 8 / 10 && (r + 1) * (576 + 1536) > 576 * 1536 * 8 / 10);
        // Shared by 2: k·r + 2·r·n <= 0.8·2·n·k.
        let r = FactorPlan::rank_for_ratio(0.2, 2, 1536, 576) as u64;
        assert!(r * (576 + 2 * 1536) <= 2 * 576 * 1536 * 8 / 10 && (r + 1) * (576 + 2 * 1536) > 2 * 576 * 1536 * 8 / 10);
        assert_eq!(FactorPlan::rank_for_ratio(0.99, 1, 4, 4), 1, "at least rank 1");
    }

    #[test]
    fn from_weights_parses_without_a_model() {
        let p = Plan::parse("[[rule]]\ntarget = \"mlp.*\"\nsparsity = { kind = \"from-weights\" }\nspecialize = \"generic\"").unwrap();
        let r = &p.rules[0];
        assert!(r.from_weights && r.sparsity.is_none() && r.method == PruneMethod::Magnitude);
        assert_eq!(r.specialize, Some(Specialize::Generic));
        assert_eq!(p.sparsity_for(Some(0), "mlp.up"), None);
        for (text, want) in [
            ("[[rule]]\nsparsity = { kind = \"from-weights\", ratio = 0.5 }", "unknown field `ratio`"),
            ("[[rule]]\nsparsity = { kind = \"from-weights\", method = \"wanda\" }", "unknown field `method`"),
            ("[[rule]]\nsparsity = { kind = \"from_weights\" }", "unknown variant `from_weights`"),
        ] {
            let e = Plan::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn globs_and_layers() {
        assert!(glob("mlp.*", "mlp.up") && glob("*", "lm_head") && glob("attn.q", "attn.q"));
        assert!(!glob("mlp.*", "attn.q") && !glob("attn.q", "attn.qq"));
        assert!(Layers::Range { start: 2, end: Some(4) }.contains(3) && !Layers::Range { start: 2, end: Some(4) }.contains(4));
    }
}
